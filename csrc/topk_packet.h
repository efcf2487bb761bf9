// topk_packet: the per-element math shared by the CPU and the CUDA kernel, so the CPU tests exercise the
// arithmetic the GPU runs (online softmax/entropy state, candidate ordering, packet probabilities).
#pragma once
#include <cstdint>

#include "common.h"

namespace dlmom {
namespace topk {

constexpr float kInf = __builtin_huge_valf();

// exp(x) for x in [-87.5, 88]: Cody-Waite range reduction x = n ln2 + r, |r| <= ln2/2, then Cephes'
// polynomial (about 1 ulp, 8e-8 relative). Branch-free, so loops over it vectorise. No float->int
// conversion: a NaN input gives NaN, not undefined behaviour.
DLMOM_HD float expf_core(float x) {
  // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits.
  const float magic = 12582912.0f;
  const float t = x * 1.44269504088896341f + magic;
  const float n = t - magic;
  const uint32_t ni = float_bits(t) - float_bits(magic);  // n mod 2^32, n in [-126, 127]
  float r = x - n * 0.693359375f;  // ln2 split in a short hi part (n * hi is exact) and a lo part
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * bits_float((ni + 127u) << 23);  // times 2^n, built from its bits
}

// Below this exp(x) is under FLT_MIN: exactly 0 here, so masked (-inf) logits add exactly nothing.
constexpr float kExpZeroBelow = -87.336f;

// exp(x) for any x: 0 below kExpZeroBelow (-inf included), +inf above 88 (a little early: exp(88.7)
// still fits a float; the kernels only pass x <= 0), NaN for NaN.
DLMOM_HD float fast_expf(float x) {
  const float y = expf_core(x < -87.5f ? -87.5f : (x > 88.0f ? 88.0f : x));
  return x < kExpZeroBelow ? 0.0f : (x > 88.0f ? kInf : y);
}

// Online softmax state of a set of logits: m = max, s = sum exp(x - m), t = sum exp(x - m) * (x - m),
// so H = log s - t / s. bad flags NaN or +inf. s == 0 means no finite logit seen (m is -inf then).
// A plain aggregate (no constructor) so CUDA code may keep it in shared memory.
struct OnlineSoftmax {
  float m, s, t;
  int bad;
};
DLMOM_HD OnlineSoftmax online_empty() { return OnlineSoftmax{-kInf, 0.0f, 0.0f, 0}; }

// Adds one logit, given d = x - m <= 0 with m the state's (final) max, to the running sums: the hot
// loop, so fast_expf's checks are cut to the ones d <= 0 needs. d is clamped before the product so
// that d = -inf adds exp(d) * d = 0 * -87.5 = 0, not 0 * -inf = NaN.
DLMOM_HD void online_add(float d, float& s, float& t) {
  const float dc = d < -87.5f ? -87.5f : d;
  const float e = d < kExpZeroBelow ? 0.0f : expf_core(dc);
  s += e;
  t += e * dc;
}

// Moves the sums to a larger max m_new: with a = exp(m - m_new), s' = a s and t' = a (t + s (m - m_new)).
// d is clamped as in online_add: two finite maxima more than FLT_MAX apart (-3e38 and 3e38) give d = -inf,
// and a huge finite d can make s * d overflow; either way a = 0 and the old sums vanish (t' = 0 * finite =
// 0, not 0 * -inf = NaN). For d >= -87.5 nothing changes.
DLMOM_HD void online_rescale(OnlineSoftmax& st, float m_new) {
  if (st.s > 0.0f) {
    const float d = st.m - m_new;
    const float dc = d < -87.5f ? -87.5f : d;
    const float a = fast_expf(d);
    st.t = a * (st.t + st.s * dc);
    st.s *= a;
  }
  st.m = m_new;
}

// Combines the states of two disjoint sets of logits (threads, warps, blocks, row segments).
DLMOM_HD OnlineSoftmax online_merge(OnlineSoftmax a, OnlineSoftmax b) {
  OnlineSoftmax r = online_empty();
  r.bad = a.bad | b.bad;
  if (b.s == 0.0f) {
    r.m = a.m, r.s = a.s, r.t = a.t;
  } else if (a.s == 0.0f) {
    r.m = b.m, r.s = b.s, r.t = b.t;
  } else {
    const float m = a.m > b.m ? a.m : b.m;
    online_rescale(a, m);
    online_rescale(b, m);
    r.m = m, r.s = a.s + b.s, r.t = a.t + b.t;
  }
  return r;
}

// H(softmax(logits)) / log V; NaN for a row with NaN, +inf or no finite logit (dlmom.ops raises then).
DLMOM_HD float entropy_normalised(const OnlineSoftmax& st, int64_t V) {
  if (st.bad || !(st.s > 0.0f)) return __builtin_nanf("");
  float h = logf(st.s) - st.t / st.s;
  h = h < 0.0f ? 0.0f : h;  // rounding may leave -1e-8 where the true value is >= 0
  return V > 1 ? h / logf(float(V)) : h;
}

// ---- candidates: (value, id) packed in one uint64, larger = better ----
// Order: value descending, then id ascending (torch's stable descending sort). -0.0 equals +0.0 as in a
// float compare; -inf sorts below every finite value. The high word is the value mapped to an unsigned
// key with the float order, the low word ~id. 0 (key 0, id 0xffffffff) is below every real candidate
// and pads lists. Needs id < 2^31.
DLMOM_HD uint32_t order_key(float x) {
  const uint32_t u = x == 0.0f ? 0u : float_bits(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
DLMOM_HD float key_value(uint32_t key) {
  return bits_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}
DLMOM_HD uint64_t pack_cand(float x, int64_t id) {
  return (uint64_t(order_key(x)) << 32) | uint64_t(~uint32_t(id));
}
DLMOM_HD float cand_value(uint64_t c) { return key_value(uint32_t(c >> 32)); }
DLMOM_HD int64_t cand_id(uint64_t c) { return int64_t(~uint32_t(c)); }
constexpr uint64_t kNoCand = 0;

// ---- packet probabilities from the top-k logits, best first ----
// As dlmom.reference: softmax((vals - vals[0]) / temperature), then top-p on that (entry j kept when the mass
// before it is < top_p), renormalised; temperature 0 gives [1, 0, ...].
// exp((x - m) / temperature) with m the largest logit: the difference comes before the division, so a tiny
// temperature takes it to -inf (exp 0) instead of overflowing x / temperature to inf (and inf - inf to NaN).
DLMOM_HD float tempered_exp(float x, float m, float temperature) { return fast_expf((x - m) / temperature); }
DLMOM_HD bool topp_keep(float before, float top_p) { return before < top_p; }

// Serial version (CPU; vals and probs may alias). Sums run in double: k may be as large as V, where a
// float running sum drifts by 1e-4; torch's CPU cumsum accumulates float in double too.
DLMOM_HD void packet_probs(const float* vals, int64_t k, float temperature, float top_p, float* probs) {
  if (temperature == 0.0f) {
    for (int64_t j = 0; j < k; ++j) probs[j] = j == 0 ? 1.0f : 0.0f;
    return;
  }
  const float m = vals[0];
  double sum = 0.0;
  for (int64_t j = 0; j < k; ++j) {
    probs[j] = tempered_exp(vals[j], m, temperature);
    sum += probs[j];
  }
  const float total = float(sum);
  for (int64_t j = 0; j < k; ++j) probs[j] /= total;
  if (!(top_p < 1.0f)) return;
  double cum = 0.0, kept = 0.0;
  for (int64_t j = 0; j < k; ++j) {
    cum += probs[j];
    const float before = float(cum) - probs[j];
    probs[j] = topp_keep(before, top_p) ? probs[j] : 0.0f;
    kept += probs[j];
  }
  const float kept_f = float(kept);
  for (int64_t j = 0; j < k; ++j) probs[j] /= kept_f;
}

// ---- argument checks of both entry points (host only; they throw std::invalid_argument) ----
inline void check_args(const View& logits, int64_t k, float temperature, float top_p, const View& ids,
                       const View& probs, const View& entropy) {
  const char* op = "topk_packet";
  check_view(logits, op, "logits", 2);  // logits: [B, V]
  check_float(logits, op, "logits");
  check_view(ids, op, "ids", 2);  // ids: [B, k]
  check_dtype(ids, DType::i64, op, "ids");
  check_view(probs, op, "probs", 2);  // probs: [B, k]
  check_dtype(probs, DType::f32, op, "probs");
  check_view(entropy, op, "entropy", 1);  // entropy: [B]
  check_dtype(entropy, DType::f32, op, "entropy");
  const int64_t B = logits.size[0], V = logits.size[1];
  DLMOM_CHECK(V >= 1 && V <= INT32_MAX, op, "logits must have 1 to 2^31-1 entries per row, got ", V);
  DLMOM_CHECK(k >= 1 && k <= V, op, "k must be in [1, V=", V, "], got ", k);
  DLMOM_CHECK(ids.size[0] == B && ids.size[1] == k, op, "ids must have shape [", B, ", ", k, "], got [",
              ids.size[0], ", ", ids.size[1], "]");
  DLMOM_CHECK(probs.size[0] == B && probs.size[1] == k, op, "probs must have shape [", B, ", ", k, "], got [",
              probs.size[0], ", ", probs.size[1], "]");
  DLMOM_CHECK(entropy.size[0] == B, op, "entropy must have shape [", B, "], got [", entropy.size[0], "]");
  DLMOM_CHECK(std::isfinite(temperature) && temperature >= 0.0f, op,
              "temperature must be a finite number >= 0, got ", temperature);
  DLMOM_CHECK(top_p > 0.0f && top_p <= 1.0f, op, "top_p must be in (0, 1], got ", top_p);
  check_disjoint(ids, "ids", logits, "logits", op);
  check_disjoint(probs, "probs", logits, "logits", op);
  check_disjoint(entropy, "entropy", logits, "logits", op);
  check_disjoint(probs, "probs", ids, "ids", op);
  check_disjoint(entropy, "entropy", ids, "ids", op);
  check_disjoint(entropy, "entropy", probs, "probs", op);
}

}  // namespace topk
}  // namespace dlmom
