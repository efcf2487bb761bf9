// soft_embed: a packet as an input embedding, out[b, :] = scale * sum_i probs[b, i] * weight[ids[b, i], :].
// The per-element math shared by the CPU and the CUDA kernel.
#pragma once
#include "common.h"

namespace dlmom {

// Columns the CPU kernel accumulates at once (16 KiB of fp32, in L1): each weight row is then read as one
// long sequential stream, which the hardware prefetcher follows (64-column register blocks that hop
// between rows measured 3-4x slower).
constexpr int64_t kSoftEmbedTile = 4096;

template <typename I>
DLMOM_HD int64_t load_id(const I* ids, int64_t i) { return static_cast<int64_t>(ids[i]); }

// acc[d] += w * row[d] for d in [0, n): the inner loop of both kernels.
template <typename W>
DLMOM_HD void soft_embed_axpy(float* acc, const W* row, float w, int64_t n) {
  for (int64_t d = 0; d < n; ++d) acc[d] += w * to_float(row[d]);
}

}  // namespace dlmom
