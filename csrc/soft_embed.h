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

// acc[d] += w * row[d] for d in [0, n): the inner loop of both kernels, Acc = float, or double for a redo.
template <typename Acc, typename W>
DLMOM_HD void soft_embed_axpy(Acc* acc, const W* row, Acc w, int64_t n) {
  for (int64_t d = 0; d < n; ++d) acc[d] += w * Acc(to_float(row[d]));
}

// Extreme magnitudes. The sums run in fp32 and are scaled in fp32 (in fp64 for a scale beyond the float
// range). A sum that may be far off is recomputed in fp64, where a product of two floats is exact and no sum
// of them overflows: one below 2^-96 in magnitude (products may have underflowed, losing more than fp32's
// relative error, or all of it: 0), and one whose scaled value is not finite in the output dtype (a product or
// partial sum of finite inputs overflowed, fp32's rounding error times a huge scale overflowed, or the exact
// value is beyond the dtype: then fp64 gives inf too; NaN / inf inputs propagate). Above 2^-96 the
// underflowed products (each off by less than 2^-149) change the sum by less than k * 2^-53 of it. So finite
// inputs get the error of an fp32 sum, and a result that fits the dtype never comes out inf, NaN or 0.
constexpr float kSoftEmbedRedoBelow = 0x1p-96f;

template <typename W> DLMOM_HD float max_of();
template <> DLMOM_HD float max_of<float>() { return 3.40282347e38f; }
template <> DLMOM_HD float max_of<bf16>() { return 3.38953139e38f; }
template <> DLMOM_HD float max_of<f16>() { return 65504.0f; }

// acc the fp32 sum, v its scaled value about to be stored as W. `|`, not `||`: no branch, so it vectorises.
template <typename W>
DLMOM_HD int soft_embed_redo(float acc, float v) {
  return int(!(fabsf(acc) >= kSoftEmbedRedoBelow)) | int(!(fabsf(v) <= max_of<W>()));
}

// Whether the scale is a normal float (or 0): then the sums are scaled in fp32; otherwise in fp64.
inline bool soft_embed_float_scale(double scale) {
  const double a = scale < 0 ? -scale : scale;
  return scale == 0.0 || (a >= 1.17549435e-38 && a <= 3.40282347e38);
}

// scale * sum: in fp32 with float_scale (scale_f = float(scale)), else in fp64 rounded to float, as torch's
// Tensor.to(float) of a float64 tensor does.
DLMOM_HD float soft_embed_scaled(float acc, bool float_scale, float scale_f, double scale) {
  return float_scale ? scale_f * acc : float(scale * double(acc));
}

}  // namespace dlmom
