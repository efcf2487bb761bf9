// Contrastive TIES merge: the per-element math shared by csrc/cpu/ties_merge.cpp and
// csrc/cuda/ties_merge.cu, plus the argument checks both entry points run.
//
// Decisions the spec leaves open (see python/dlmom/reference.py, the oracle):
// - the row mean runs over finite logits only: -inf masks a token and must not drag the mean to -inf;
//   a row with no finite logit has mean 0;
// - |v| == theta is kept, |v| < theta trimmed to 0 (so theta = 0 trims nothing);
// - a tie in the election (score exactly 0) elects 0 and the token merges to 0;
// - a token that any expert holds at -inf stays -inf;
// - finite logits must have |x| <= 2^96 (row_add flags larger ones like NaN): then no fp32 sum below can
//   overflow for V, E < 2^31 (row sums <= 2^127, |v| <= 2^97); the weights come scaled by a power of two so
//   that the largest is in [0.5, 1) (dlmom.reference.ties_weights), so den <= E.
#pragma once
#include <cmath>

#include "common.h"

namespace dlmom {
namespace ties {

constexpr float kInf = INFINITY;
constexpr float kMaxLogit = 0x1p96f;  // dlmom.reference.TIES_MAX_LOGIT

// The expert loops must be gone before the CPU vectoriser looks at the token loop (GCC does not
// vectorise a loop nest with two inner loops); E <= 8 in the unrolled kernels.
#if defined(__CUDA_ARCH__)
#define TIES_UNROLL _Pragma("unroll")
#elif defined(__CUDACC__)
#define TIES_UNROLL  // host side of a .cu file: not a hot path, and nvcc rejects GCC's pragma
#elif defined(__GNUC__) && !defined(__clang__)
#define TIES_UNROLL _Pragma("GCC unroll 8")
#else
#define TIES_UNROLL
#endif
// DLMOM_HD is a plain `inline` on the host, which GCC may decline for merge_token; the CPU token loop
// only vectorises with it inlined. (nvcc: DLMOM_HD is already __forceinline__.)
#if defined(__GNUC__) && !defined(__CUDACC__)
#define TIES_FORCE_INLINE __attribute__((always_inline))
#else
#define TIES_FORCE_INLINE
#endif

DLMOM_HD bool is_finite(float x) { return fabsf(x) < kInf; }

// A product that is never contracted with the add after it into an fma: the reference rounds each product and
// each sum, so the scores match it bit for bit even where rounding decides an election. (ties_merge.cpp builds
// with fp-contract=off; nvcc keeps __fmul_rn apart.)
DLMOM_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
DLMOM_HD float sign(float v) { return float(v > 0.f) - float(v < 0.f); }

// ---- pass 1: row means over [V] ----

// NaN, +inf and |x| > kMaxLogit are bad input. The caller checks the means instead of the logits (that would
// be a third pass), so `bad` must make the mean non-finite; the finite sum alone would hide a +inf.
DLMOM_HD void row_add(float x, float& sum, int& count, int& bad) {
  const bool fin = is_finite(x);
  sum += fin ? x : 0.f;
  count += fin ? 1 : 0;
  bad |= (!(fabsf(x) <= kMaxLogit) && x != -kInf) ? 1 : 0;
}

DLMOM_HD float row_mean(float sum, int64_t count, bool bad) {
  if (bad) return bits_float(0x7fc00000u);  // NaN
  return count > 0 ? sum / float(count) : 0.f;
}

// ---- pass 2: one token of the merge ----

// The centred, trimmed logit of one expert; a non-finite logit contributes 0 (it neither votes nor
// averages; -inf is handled by the mask).
// Both arms of every select are computed first: the CPU compiler will not if-convert a ternary whose arm
// could raise a floating-point exception, and a loop with branches does not vectorise.
DLMOM_HD float centre(float x, float mean, float theta) {
  const float d = x - mean;
  const float v = is_finite(x) ? d : 0.f;
  return fabsf(v) >= theta ? v : 0.f;
}

// merged value of one token from its E logits x(e) (as float), the row means mean[e] and the weights
// w[e]. kE > 0 fixes E at compile time (unrolled loops, everything in registers); kE == 0 loops over the
// runtime E. Branch-free apart from the loops, so the CPU kernel vectorises it across tokens. The sums over
// experts run in expert order from 0, every product rounded (mul_rn), as dlmom.reference.ties_merge does.
// The second loop recomputes v instead of storing it: with kE > 0 the compiler shares the loads, and
// with kE == 0 no [E] scratch is needed.
template <int kE, typename Load>
DLMOM_HD TIES_FORCE_INLINE float merge_token(const Load& x, int E, const float* mean, const float* w,
                                              float theta, bool mass) {
  const int n = kE > 0 ? kE : E;
  float score = 0.f;
  // -inf iff some expert masks the token. A running minimum, not a bool flag, because GCC vectorises
  // bool state mixed with float selects poorly; a select, not fminf, which has no x86 vector instruction.
  float lowest = kInf;
  TIES_UNROLL
  for (int e = 0; e < n; ++e) {
    const float xe = x(e);
    lowest = xe < lowest ? xe : lowest;
    const float v = centre(xe, mean[e], theta);
    const float s = sign(v);
    score += mul_rn(w[e], mass ? v : s);
  }
  const float elected = sign(score);
  float num = 0.f, den = 0.f;
  TIES_UNROLL
  for (int e = 0; e < n; ++e) {
    const float v = centre(x(e), mean[e], theta);
    const float wv = mul_rn(w[e], v);
    // Signs are -1, 0 or 1: the product is 1 exactly when sign(v) == elected != 0 (so trimmed experts,
    // v == 0, never agree).
    const bool agree = sign(v) * elected > 0.f;
    num += agree ? wv : 0.f;
    den += agree ? w[e] : 0.f;
  }
  // den is a sum of weights of which the largest is >= 0.5 or 0: a positive den divides exactly as the
  // reference does. Both arms first (a select, no division by 0 where den is 0).
  const float q = num / (den > 0.f ? den : 1.f);
  const float merged = den > 0.f ? q : 0.f;
  return lowest == -kInf ? -kInf : merged;
}

// ---- the weights of one row ----

// wt[e] = the weights w[e * sE] of one row b, scaled by a power of two so that the largest is in [0.5, 1) (all 0
// stays 0), as dlmom.reference.ties_weights: only their ratios count, and den <= E. w == nullptr: all ones.
// Returns the first expert whose weight is negative, NaN or inf (the row is then bad input), or -1.
template <int kE>
DLMOM_HD int row_weights(const float* w, int64_t sE, int E, float* wt) {
  const int n = kE > 0 ? kE : E;
  if (w == nullptr) {
    for (int e = 0; e < n; ++e) wt[e] = 1.f;
    return -1;
  }
  float mx = 0.f;
  int bad = -1;
  for (int e = 0; e < n; ++e) {
    const float v = w[e * sE];
    if (!(v >= 0.f && v < kInf) && bad < 0) bad = e;
    mx = v > mx ? v : mx;
  }
  int exponent = 0;
  frexp(double(mx), &exponent);  // mx = m * 2^exponent, m in [0.5, 1); 0 for mx == 0
  const double f = ldexp(1.0, -exponent);
  for (int e = 0; e < n; ++e) wt[e] = float(double(w[e * sE]) * f);  // exact down to float32's subnormals
  return bad;
}

// ---- argument checks (host) ----

struct Dims {
  int64_t E, B, V;
  bool has_weights;
  int64_t wsE, wsB;  // the weights' strides over experts and rows (0 over rows for weights [E])
};

// logits [E, B, V] float, weights [E] or [E, B] f32 or empty, means [E, B] f32, out [B, V] f32.
inline Dims check_args(const View& logits, const View& weights, float theta, int elect, const View& means,
                       const View& out) {
  const char* op = "ties_merge";
  check_view(logits, op, "logits", 3);
  check_float(logits, op, "logits");
  const int64_t E = logits.size[0], B = logits.size[1], V = logits.size[2];
  DLMOM_CHECK(E >= 1 && V >= 1, op, "logits must be [E >= 1, B, V >= 1], got [", E, ", ", B, ", ", V, "]");
  DLMOM_CHECK(std::isfinite(theta) && theta >= 0.f, op, "theta must be a finite number >= 0, got ", theta);
  DLMOM_CHECK(elect == 0 || elect == 1, op, "elect must be 0 (vote) or 1 (mass), got ", elect);
  const bool has_weights = !(weights.data == nullptr && weights.ndim == 0);
  if (has_weights) {
    DLMOM_CHECK(weights.ndim == 1 || weights.ndim == 2, op, "weights must have 1 or 2 dims, got ", weights.ndim);
    check_view(weights, op, "weights", weights.ndim, /*unit_last=*/false);
    check_dtype(weights, DType::f32, op, "weights");
    DLMOM_CHECK(weights.size[0] == E && (weights.ndim == 1 || weights.size[1] == B), op,
                "weights must have shape [E=", E, "] or [E=", E, ", B=", B, "], got [", weights.size[0],
                weights.ndim == 2 ? ", " : "", weights.ndim == 2 ? std::to_string(weights.size[1]) : "", "]");
  }
  check_view(means, op, "means", 2);
  check_dtype(means, DType::f32, op, "means");
  DLMOM_CHECK(means.size[0] == E && means.size[1] == B, op, "means must have shape [", E, ", ", B, "], got [",
              means.size[0], ", ", means.size[1], "]");
  check_view(out, op, "out", 2);
  check_dtype(out, DType::f32, op, "out");
  DLMOM_CHECK(out.size[0] == B && out.size[1] == V, op, "out must have shape [", B, ", ", V, "], got [",
              out.size[0], ", ", out.size[1], "]");
  check_disjoint(means, "means", logits, "logits", op);
  check_disjoint(out, "out", logits, "logits", op);
  check_disjoint(out, "out", means, "means", op);
  if (has_weights) {
    check_disjoint(means, "means", weights, "weights", op);
    check_disjoint(out, "out", weights, "weights", op);
  }
  const int64_t wsE = has_weights ? weights.stride[0] : 0;
  const int64_t wsB = has_weights && weights.ndim == 2 ? weights.stride[1] : 0;
  return {E, B, V, has_weights, wsE, wsB};
}

}  // namespace ties
}  // namespace dlmom
