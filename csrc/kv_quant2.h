// 2-bit asymmetric KV quantisation: the per-group and per-element math of kv_quant2 / kv_dequant2, shared by
// the CPU and the CUDA kernels so that the CPU tests exercise the arithmetic the GPU runs.
//
// Every function repeats dlmom.reference.kv_quant2 / kv_dequant2 operation for operation, in fp32 and with the
// same roundings: the kernels must give the reference's codes, scale and zero bit for bit. Two traps:
//   - a true fp32 division, never a multiply by a reciprocal (1/3 and 1/scale are inexact);
//   - no multiply followed by an add, which a compiler may contract into an fma (one rounding instead of
//     two: a different last bit on the host with -ffp-contract=fast and on the GPU by default).
//
// Extreme values: a group of finite values near the float32 maximum has a range max - min, and codes a
// code * scale + zero, beyond float32. Where the plain fp32 result overflows, it is computed again at half scale
// (every operand halves exactly then: all are >= 2^103 or absorbed), which gives the value fp32 arithmetic with
// an unbounded exponent would round to; and a scale whose top value zero + 3 * scale would overflow the stored
// dtype is stepped down (scale_fits). So every finite x dequantises to finite values within half a step.
#pragma once
#include "common.h"

namespace dlmom {
namespace kvq {

constexpr int kCodesPerByte = 4;
constexpr float kFloatMax = 3.40282347e38f;
// Steps down of a scale whose top overflows (reference._SCALE_STEPS): a fixed count of selects, so that the
// loops over groups still vectorise. A search over near-max groups needed one step for fp16 / bf16 scales
// and at most two for fp32 ones.
constexpr int kScaleSteps = 3;

// +-inf (or NaN): the fp32 result of an operation on finite values overflowed.
DLMOM_HD bool overflowed(float v) { return !(fabsf(v) <= kFloatMax); }

// The min and max that vectorise (minps / maxps take exactly this form). The group is finite (checked in
// Python), so only the sign of a zero can depend on the order, and -0 == +0 for every later use.
DLMOM_HD float min2(float a, float b) { return a < b ? a : b; }
DLMOM_HD float max2(float a, float b) { return a > b ? a : b; }

DLMOM_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);  // IEEE division even under -prec-div=false / --use_fast_math
#else
  return a / b;
#endif
}

DLMOM_HD float rint_even(float v) {
#if defined(__CUDA_ARCH__)
  return rintf(v);
#else
  return std::rint(v);  // round half to even (default rounding mode), as torch.round
#endif
}

// reference._step_down on the bits of an fp16 / bf16 value: the next value towards -inf.
DLMOM_HD uint16_t step_down_bits(uint16_t b) {
  if (b == 0) return 0x8001u;                        // +0 -> the smallest negative subnormal
  return (b & 0x8000u) ? uint16_t(b + 1) : uint16_t(b - 1);  // negative (and -0): one ulp larger magnitude
}
// reference._step_up on the bits of a non-negative fp16 / bf16 value: the next value towards +inf.
DLMOM_HD uint16_t step_up_bits(uint16_t b) { return uint16_t(b + 1); }

// (a - b) / c (reference._sub_div). a - b overflows only for large a, b of opposite signs: then
// (a/2 - b/2) / (c/2), the same quotient. Selects, not branches, so the loops over x vectorise.
DLMOM_HD float sub_div(float a, float b, float c) {
  const float d = a - b, dh = a * 0.5f - b * 0.5f, ch = c * 0.5f;  // both arms first: selects if-convert
  const bool big = overflowed(d);
  return div_rn(big ? dh : d, big ? ch : c);
}

// code * s + z as torch computes it: the product rounded, then the sum rounded. 0*s, 1*s and 2*s are exact
// and 3*s rounds exactly as 2s + s does, so no multiply is left that could be contracted into an fma. Where
// that overflows, 2 * (code * (s/2) + z/2) (reference.kv_dequant_values): inf only past the fp32 range.
DLMOM_HD float dequant_value(int code, float s, float z) {
  const float two = s + s;
  const float t = code == 0 ? 0.0f * s : code == 1 ? s : code == 2 ? two : two + s;
  const float v = t + z;
  const float h = s * 0.5f, two_h = h + h;
  const float th = code == 0 ? 0.0f * h : code == 1 ? h : code == 2 ? two_h : two_h + h;
  const float v2 = (th + z * 0.5f) * 2.0f;
  return overflowed(v) ? v2 : v;
}

// Whether the top value zero + 3 * scale of a group is finite once stored as T (the default dequant dtype).
template <typename T>
DLMOM_HD bool scale_fits(float s, float z) {
  return !overflowed(to_float(from_float<T>(dequant_value(3, s, z))));
}

// Scale and zero of a group with minimum mn and maximum mx, stored as TS (reference.kv_scale_zero).
// float: zero = mn, scale = (mx - mn) / 3, stepped down while zero + 3 * scale overflows.
DLMOM_HD void scale_zero(float mn, float mx, float& scale, float& zero) {
  zero = mn;
  scale = sub_div(mx, mn, 3.0f);
  for (int i = 0; i < kScaleSteps; ++i) {
    const float lower = bits_float(float_bits(scale) - 1u);
    scale = scale > 0.0f && !scale_fits<float>(scale, zero) ? lower : scale;
  }
}
// fp16 / bf16: rounded outward so that every element stays within half a step of its code: zero rounded
// down, then scale = (mx - zero) / 3 rounded up, but stepped down while zero + 3 * scale overflows T (the
// top element then lies a few units of the scale above its value: still far within half a step).
// The steps are selects, not branches: whether the scale rounded down is a coin flip per group.
template <typename T>
DLMOM_HD void scale_zero_16(float mn, float mx, T& scale, T& zero) {
  const T z = from_float<T>(mn);
  zero.bits = to_float(z) > mn ? step_down_bits(z.bits) : z.bits;
  const float zf = to_float(zero);
  const float s32 = sub_div(mx, zf, 3.0f);
  const T s = from_float<T>(s32);
  scale.bits = to_float(s) < s32 ? step_up_bits(s.bits) : s.bits;
  for (int i = 0; i < kScaleSteps; ++i) {
    const float sf = to_float(scale);
    scale.bits = sf > 0.0f && !scale_fits<T>(sf, zf) ? uint16_t(scale.bits - 1u) : scale.bits;
  }
}
DLMOM_HD void scale_zero(float mn, float mx, f16& scale, f16& zero) { scale_zero_16(mn, mx, scale, zero); }
DLMOM_HD void scale_zero(float mn, float mx, bf16& scale, bf16& zero) { scale_zero_16(mn, mx, scale, zero); }

// code = clamp(rint((x - z) / s), 0, 3), 0 where s == 0; s and z are the stored scale and zero read back
// as fp32. A NaN quotient gives 0.
DLMOM_HD int code_of(float x, float s, float z) {
  const bool live = s > 0.0f;
  float q = rint_even(sub_div(x, z, live ? s : 1.0f));
  q = q > 0.0f ? q : 0.0f;
  q = q < 3.0f ? q : 3.0f;
  return live ? int(q) : 0;
}

// Four codes per byte along L, the first one in the least significant bits.
DLMOM_HD uint8_t pack4(int c0, int c1, int c2, int c3) {
  return uint8_t(c0 | (c1 << 2) | (c2 << 4) | (c3 << 6));
}
DLMOM_HD int unpack(uint8_t byte, int k) { return (byte >> (2 * k)) & 3; }


// ---- argument checks (host only), shared by the CPU and the CUDA entry points ----

inline int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0); }  // no overflow for a huge b

// [R, L, C] with dims 1 and 2 dense: the kernels index a row's [L, C] block as l * C + c. Rows (dim 0) may
// be strided.
inline void check_rows_dense(const View& v, const char* op, const char* name) {
  check_view(v, op, name, 3);
  DLMOM_CHECK(v.numel() == 0 || v.size[1] <= 1 || v.stride[1] == v.size[2], op, name,
              " must be dense in its last two dims, got sizes [", v.size[0], ", ", v.size[1], ", ", v.size[2],
              "] and strides [", v.stride[0], ", ", v.stride[1], ", ", v.stride[2], "]");
}

inline void check_shape(const View& v, int64_t d0, int64_t d1, int64_t d2, const char* op, const char* name) {
  DLMOM_CHECK(v.size[0] == d0 && v.size[1] == d1 && v.size[2] == d2, op, name, " must have shape [", d0, ", ", d1,
              ", ", d2, "], got [", v.size[0], ", ", v.size[1], ", ", v.size[2], "]");
}

// codes [R, ceil(L/4), C] uint8; scale, zero [R, ceil(L/G), C] of one float dtype; the [R, L, C] tensor is x
// (quant) or out (dequant).
inline void check_args(const View& full, const View& codes, const View& scale, const View& zero,
                       int64_t group_size, const char* op, const char* full_name) {
  check_rows_dense(full, op, full_name);
  check_float(full, op, full_name);
  check_rows_dense(codes, op, "codes");
  check_dtype(codes, DType::u8, op, "codes");
  check_rows_dense(scale, op, "scale");
  check_float(scale, op, "scale");
  check_rows_dense(zero, op, "zero");
  check_dtype(zero, scale.dtype, op, "zero");
  DLMOM_CHECK(group_size >= 1, op, "group_size must be >= 1, got ", group_size);
  const int64_t R = full.size[0], L = full.size[1], C = full.size[2];
  check_shape(codes, R, ceil_div(L, kCodesPerByte), C, op, "codes");
  check_shape(scale, R, ceil_div(L, group_size), C, op, "scale");
  check_shape(zero, R, ceil_div(L, group_size), C, op, "zero");
}

inline void check_quant_args(const View& x, int64_t group_size, const View& codes, const View& scale,
                             const View& zero, const char* op) {
  check_args(x, codes, scale, zero, group_size, op, "x");
  DLMOM_CHECK(scale.dtype == DType::f32 || scale.dtype == x.dtype, op, "scale must be float32 or x's dtype ",
              dtype_name(x.dtype), ", got ", dtype_name(scale.dtype));
}

}  // namespace kvq
}  // namespace dlmom
