// 2-bit asymmetric KV quantisation: the per-group and per-element math of kv_quant2 / kv_dequant2, shared by
// the CPU and the CUDA kernels so that the CPU tests exercise the arithmetic the GPU runs.
//
// Every function repeats dlmom.reference.kv_quant2 / kv_dequant2 operation for operation, in fp32 and with the
// same roundings: the kernels must give the reference's codes, scale and zero bit for bit. Two traps:
//   - a true fp32 division, never a multiply by a reciprocal (1/3 and 1/scale are inexact);
//   - no multiply followed by an add, which a compiler may contract into an fma (one rounding instead of
//     two: a different last bit on the host with -ffp-contract=fast and on the GPU by default).
#pragma once
#include "common.h"

namespace dlmom {
namespace kvq {

constexpr int kCodesPerByte = 4;

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

// Scale and zero of a group with minimum mn and maximum mx, stored as TS (reference.kv_scale_zero).
// float: zero = mn, scale = (mx - mn) / 3.
DLMOM_HD void scale_zero(float mn, float mx, float& scale, float& zero) {
  zero = mn;
  scale = div_rn(mx - mn, 3.0f);
}
// fp16 / bf16: rounded outward so that every element stays within half a step of its code: zero rounded
// down, then scale = (mx - zero) / 3 rounded up.
// The steps are selects, not branches: whether the scale rounded down is a coin flip per group.
template <typename T>
DLMOM_HD void scale_zero_16(float mn, float mx, T& scale, T& zero) {
  const T z = from_float<T>(mn);
  zero.bits = to_float(z) > mn ? step_down_bits(z.bits) : z.bits;
  const float s32 = div_rn(mx - to_float(zero), 3.0f);
  const T s = from_float<T>(s32);
  scale.bits = to_float(s) < s32 ? step_up_bits(s.bits) : s.bits;
}
DLMOM_HD void scale_zero(float mn, float mx, f16& scale, f16& zero) { scale_zero_16(mn, mx, scale, zero); }
DLMOM_HD void scale_zero(float mn, float mx, bf16& scale, bf16& zero) { scale_zero_16(mn, mx, scale, zero); }

// code = clamp(rint((x - z) / s), 0, 3), 0 where s == 0; s and z are the stored scale and zero read back
// as fp32. A NaN quotient (only (inf - z) / inf, a group whose range overflows fp32) gives 0.
DLMOM_HD int code_of(float x, float s, float z) {
  const bool live = s > 0.0f;
  float q = rint_even(div_rn(x - z, live ? s : 1.0f));
  q = q > 0.0f ? q : 0.0f;
  q = q < 3.0f ? q : 3.0f;
  return live ? int(q) : 0;
}

// Four codes per byte along L, the first one in the least significant bits.
DLMOM_HD uint8_t pack4(int c0, int c1, int c2, int c3) {
  return uint8_t(c0 | (c1 << 2) | (c2 << 4) | (c3 << 6));
}
DLMOM_HD int unpack(uint8_t byte, int k) { return (byte >> (2 * k)) & 3; }

// code * s + z as torch computes it: the product rounded, then the sum rounded. 0*s, 1*s and 2*s are exact
// and 3*s rounds exactly as 2s + s does, so no multiply is left that could be contracted into an fma.
DLMOM_HD float dequant_value(int code, float s, float z) {
  const float two = s + s;
  const float t = code == 0 ? 0.0f * s : code == 1 ? s : code == 2 ? two : two + s;
  return t + z;
}

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
