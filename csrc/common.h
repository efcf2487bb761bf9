// Shared by the C++ and the CUDA kernels: tensor views, dtype codes, fp16/bf16 conversions and checks.
// No torch header here, on purpose: one build serves every torch version.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <string>

#if defined(__CUDACC__)
#define DLMOM_HD __host__ __device__ __forceinline__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#else
#define DLMOM_HD inline
#endif

namespace dlmom {

// Must match _DTYPE_CODES in python/dlmom/ops.py.
enum class DType : int { f32 = 0, f16 = 1, bf16 = 2, i32 = 3, i64 = 4, u8 = 5 };

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::f32: return "float32";
    case DType::f16: return "float16";
    case DType::bf16: return "bfloat16";
    case DType::i32: return "int32";
    case DType::i64: return "int64";
    case DType::u8: return "uint8";
  }
  return "unknown";
}

// A strided tensor as raw memory: sizes and strides in elements, at most 4 dims.
struct View {
  void* data = nullptr;
  DType dtype = DType::f32;
  int ndim = 0;
  int64_t size[4] = {0, 0, 0, 0};
  int64_t stride[4] = {0, 0, 0, 0};
  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= size[i];
    return n;
  }
};

// ---- checks (host only): std::invalid_argument becomes ValueError in Python ----
template <typename... Args>
[[noreturn]] void fail(const char* op, Args&&... parts) {
  std::ostringstream os;
  os << op << ": ";
  (os << ... << parts);
  throw std::invalid_argument(os.str());
}
#define DLMOM_CHECK(cond, op, ...) \
  do {                             \
    if (!(cond)) ::dlmom::fail(op, __VA_ARGS__); \
  } while (0)

// Rank, dtype and a unit stride on the last dim (the kernels vectorise along it). An empty view is
// never read or written, so any strides are fine for it.
inline void check_view(const View& v, const char* op, const char* name, int ndim, bool unit_last = true) {
  DLMOM_CHECK(v.data != nullptr || v.numel() == 0, op, name, " is a null pointer");
  DLMOM_CHECK(v.ndim == ndim, op, name, " must have ", ndim, " dims, got ", v.ndim);
  for (int i = 0; i < v.ndim; ++i) DLMOM_CHECK(v.size[i] >= 0, op, name, " has a negative size");
  if (unit_last && ndim > 0 && v.size[ndim - 1] > 1 && v.numel() > 0)
    DLMOM_CHECK(v.stride[ndim - 1] == 1, op, name, " must have unit stride on its last dim, got ",
                v.stride[ndim - 1]);
}
inline int64_t dtype_size(DType d) {
  switch (d) {
    case DType::f32: case DType::i32: return 4;
    case DType::f16: case DType::bf16: return 2;
    case DType::i64: return 8;
    case DType::u8: return 1;
  }
  return 1;
}

// Whether two views may share a byte: their address ranges intersect (conservative for interleaved views).
// Strides are >= 0 (torch has no negative strides).
inline bool may_overlap(const View& a, const View& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  auto end = [](const View& v) {
    int64_t last = 0;
    for (int i = 0; i < v.ndim; ++i) last += (v.size[i] - 1) * v.stride[i];
    return reinterpret_cast<uintptr_t>(v.data) + uintptr_t((last + 1) * dtype_size(v.dtype));
  };
  const uintptr_t a0 = reinterpret_cast<uintptr_t>(a.data), b0 = reinterpret_cast<uintptr_t>(b.data);
  return a0 < end(b) && b0 < end(a);
}

inline void check_float(const View& v, const char* op, const char* name) {
  DLMOM_CHECK(v.dtype == DType::f32 || v.dtype == DType::f16 || v.dtype == DType::bf16, op, name,
              " must be float32, float16 or bfloat16, got ", dtype_name(v.dtype));
}
inline void check_dtype(const View& v, DType want, const char* op, const char* name) {
  DLMOM_CHECK(v.dtype == want, op, name, " must be ", dtype_name(want), ", got ", dtype_name(v.dtype));
}

// ---- fp16 / bf16 storage types with the same bits on host and device ----
struct f16 { uint16_t bits; };
struct bf16 { uint16_t bits; };

DLMOM_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}
DLMOM_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

DLMOM_HD float to_float(float x) { return x; }
DLMOM_HD float to_float(bf16 x) { return bits_float(uint32_t(x.bits) << 16); }
DLMOM_HD float to_float(f16 x) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(x.bits));
#else
  const uint32_t sign = uint32_t(x.bits & 0x8000u) << 16;
  uint32_t exp = (x.bits >> 10) & 0x1fu, man = x.bits & 0x3ffu;
  if (exp == 0x1fu) return bits_float(sign | 0x7f800000u | (man << 13));  // inf / nan
  if (exp == 0) {
    if (man == 0) return bits_float(sign);
    // subnormal: value = man * 2^-24
    float v = float(man) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  return bits_float(sign | ((exp + 112u) << 23) | (man << 13));
#endif
}

template <typename T> DLMOM_HD T from_float(float x);
template <> DLMOM_HD float from_float<float>(float x) { return x; }
template <> DLMOM_HD bf16 from_float<bf16>(float x) {
  uint32_t u = float_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{uint16_t((u >> 16) | 0x40u)};  // quiet nan
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return bf16{uint16_t(u >> 16)};
}
template <> DLMOM_HD f16 from_float<f16>(float x) {
#if defined(__CUDA_ARCH__)
  return f16{__half_as_ushort(__float2half_rn(x))};
#else
  uint32_t u = float_bits(x);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return f16{uint16_t(sign | 0x7e00u)};  // nan
  if (u >= 0x477ff000u) return f16{uint16_t(sign | 0x7c00u)};  // rounds to inf
  if (u < 0x38800000u) {  // subnormal or zero in fp16: round value * 2^24 to an integer (nearest even)
    float v = bits_float(u) * 16777216.0f;
    float r = std::nearbyint(v);
    return f16{uint16_t(sign | uint16_t(r))};
  }
  uint32_t exp = (u >> 23) - 112u, man = u & 0x7fffffu;
  uint32_t h = (exp << 10) | (man >> 13);
  uint32_t rest = man & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // may carry into the exponent: correct
  return f16{uint16_t(sign | h)};
#endif
}

// Dispatch a float dtype code to a storage type T.
#define DLMOM_DISPATCH_FLOAT(dtype, T, op, ...)                              \
  switch (dtype) {                                                           \
    case ::dlmom::DType::f32: { using T = float; __VA_ARGS__; break; }        \
    case ::dlmom::DType::f16: { using T = ::dlmom::f16; __VA_ARGS__; break; } \
    case ::dlmom::DType::bf16: { using T = ::dlmom::bf16; __VA_ARGS__; break; } \
    default: ::dlmom::fail(op, "unsupported dtype ", ::dlmom::dtype_name(dtype)); \
  }

}  // namespace dlmom
