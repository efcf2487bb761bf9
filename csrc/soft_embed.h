// soft_embed: a packet as an input embedding, out[b, :] = scale * sum_i probs[b, i] * weight[ids[b, i], :].
// The per-element math shared by the CPU and the CUDA kernel.
#pragma once
#include "common.h"

namespace dlmom {

// Columns the CPU kernel accumulates at once (16 KiB of fp32, in L1): each weight row is then read as one
// long sequential stream, which the hardware prefetcher follows (64-column register blocks that hop
// between rows measured 3-4x slower).
constexpr int64_t kSoftEmbedTile = 4096;

// The argument checks of both entry points (host only): ranks, dtypes and matching sizes.
inline void soft_embed_check(const View& ids, const View& probs, const View& weight, const View& out) {
  constexpr const char* op = "soft_embed";
  check_view(ids, op, "ids", 2);        // [B, k]
  check_view(probs, op, "probs", 2);    // [B, k]
  check_view(weight, op, "weight", 2);  // [V, D]
  check_view(out, op, "out", 2);        // [B, D]
  DLMOM_CHECK(ids.dtype == DType::i32 || ids.dtype == DType::i64, op, "ids must be int32 or int64, got ",
              dtype_name(ids.dtype));
  check_float(probs, op, "probs");
  check_float(weight, op, "weight");
  check_dtype(out, weight.dtype, op, "out");
  const int64_t B = ids.size[0], k = ids.size[1], D = weight.size[1];
  DLMOM_CHECK(probs.size[0] == B && probs.size[1] == k, op, "probs must be [", B, ", ", k, "], got [",
              probs.size[0], ", ", probs.size[1], "]");
  DLMOM_CHECK(out.size[0] == B && out.size[1] == D, op, "out must be [", B, ", ", D, "], got [", out.size[0],
              ", ", out.size[1], "]");
  // The kernels write out while they read the inputs (dlmom.ops computes into a new tensor then).
  DLMOM_CHECK(!may_overlap(out, weight), op, "out must not overlap weight");
  DLMOM_CHECK(!may_overlap(out, ids), op, "out must not overlap ids");
  DLMOM_CHECK(!may_overlap(out, probs), op, "out must not overlap probs");
}

template <typename I>
DLMOM_HD int64_t load_id(const I* ids, int64_t i) { return static_cast<int64_t>(ids[i]); }

// acc[d] += w * row[d] for d in [0, n): the inner loop of both kernels.
template <typename W>
DLMOM_HD void soft_embed_axpy(float* acc, const W* row, float w, int64_t n) {
  for (int64_t d = 0; d < n; ++d) acc[d] += w * to_float(row[d]);
}

}  // namespace dlmom
