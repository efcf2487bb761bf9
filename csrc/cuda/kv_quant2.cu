// CUDA kernels of kv_quant2 / kv_dequant2 on the canonical [R, L, C] layout (groups of G along L).
//
// quant: one thread per (row, group, column) finds the group's min / max and writes scale / zero; when G is a
// multiple of 4 the group owns whole bytes of codes and the same thread writes them (one pass over x). Otherwise
// a byte can hold codes of two groups, and a second kernel, one thread per (row, byte, column), writes the
// codes from the stored scale / zero. dequant: one thread per (row, byte, column) writes its four values.
// Consecutive threads take consecutive columns, so loads and stores are coalesced along C (axis=-2); for C == 1
// (axis=-1) a thread walks its own contiguous group or byte. The math is in ../kv_quant2.h, shared with the CPU.
#include <algorithm>

#include "../kv_quant2.h"
#include "../ops.h"
#include "cuda_common.cuh"

namespace dlmom {
namespace {

constexpr int kThreads = 256;

inline unsigned blocks_for(int64_t total) {
  return unsigned(std::min<int64_t>(kvq::ceil_div(total, kThreads), int64_t(1) << 20));  // grid-stride beyond
}

__device__ __forceinline__ int64_t first_index() { return int64_t(blockIdx.x) * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int64_t grid_stride() { return int64_t(gridDim.x) * blockDim.x; }

struct Dims {
  int64_t R, L, C, G, ng, nb;
};

Dims dims_of(const View& full, int64_t G) {
  return {full.size[0], full.size[1], full.size[2], G, kvq::ceil_div(full.size[1], G),
          kvq::ceil_div(full.size[1], kvq::kCodesPerByte)};
}

// One thread per (r, g, c): scale and zero of the group; with write_codes (G % 4 == 0) also its codes.
// x [R, L, C] (row stride xs), codes [R, nb, C], scale / zero [R, ng, C].
template <typename TX, typename TS>
__global__ void __launch_bounds__(kThreads) quant_groups_kernel(const TX* __restrict__ x, int64_t xs, uint8_t* __restrict__ codes, int64_t cs,
                                    TS* __restrict__ scale, int64_t ss, TS* __restrict__ zero, int64_t zs, Dims d,
                                    bool write_codes, int64_t* status) {
  const int64_t total = d.R * d.ng * d.C;
  for (int64_t i = first_index(); i < total; i += grid_stride()) {
    const int64_t c = i % d.C, t = i / d.C, g = t % d.ng, r = t / d.ng;
    const int64_t l0 = g * d.G, l1 = l0 + d.G < d.L ? l0 + d.G : d.L;
    const TX* xc = x + r * xs + c;  // element l at xc[l * C]
    float mn = to_float(xc[l0 * d.C]), mx = mn, chk = mn - mn;  // chk: NaN when the group holds NaN or inf
    for (int64_t l = l0 + 1; l < l1; ++l) {
      const float v = to_float(xc[l * d.C]);
      mn = kvq::min2(mn, v);
      mx = kvq::max2(mx, v);
      chk += v - v;
    }
    if (chk != 0.f) flag_error(status, kKvNonFinite, r, g, c);
    TS sc, ze;
    kvq::scale_zero(mn, mx, sc, ze);
    scale[r * ss + g * d.C + c] = sc;
    zero[r * zs + g * d.C + c] = ze;
    if (!write_codes) continue;
    const float s = to_float(sc), z = to_float(ze);
    for (int64_t l = l0; l < l1; l += kvq::kCodesPerByte) {
      int q[kvq::kCodesPerByte];
#pragma unroll
      for (int k = 0; k < kvq::kCodesPerByte; ++k)
        q[k] = l + k < l1 ? kvq::code_of(to_float(xc[(l + k) * d.C]), s, z) : 0;  // codes past L are 0
      codes[r * cs + (l / kvq::kCodesPerByte) * d.C + c] = kvq::pack4(q[0], q[1], q[2], q[3]);
    }
  }
}

// One thread per (r, b, c): the byte of codes b from the stored scale / zero (the groups may change inside it).
template <typename TX, typename TS>
__global__ void __launch_bounds__(kThreads) quant_bytes_kernel(const TX* __restrict__ x, int64_t xs, uint8_t* __restrict__ codes, int64_t cs,
                                   const TS* __restrict__ scale, int64_t ss, const TS* __restrict__ zero,
                                   int64_t zs, Dims d) {
  const int64_t total = d.R * d.nb * d.C;
  for (int64_t i = first_index(); i < total; i += grid_stride()) {
    const int64_t c = i % d.C, t = i / d.C, b = t % d.nb, r = t / d.nb;
    int q[kvq::kCodesPerByte];
#pragma unroll
    for (int k = 0; k < kvq::kCodesPerByte; ++k) {
      const int64_t l = b * kvq::kCodesPerByte + k;
      q[k] = 0;  // codes past L are 0
      if (l < d.L) {
        const int64_t g = l / d.G;
        const float s = to_float(scale[r * ss + g * d.C + c]), z = to_float(zero[r * zs + g * d.C + c]);
        q[k] = kvq::code_of(to_float(x[r * xs + l * d.C + c]), s, z);
      }
    }
    codes[r * cs + b * d.C + c] = kvq::pack4(q[0], q[1], q[2], q[3]);
  }
}

// One thread per (r, b, c): the four values of byte b, code * scale + zero, stored in out's dtype.
template <typename TS, typename TO>
__global__ void __launch_bounds__(kThreads) dequant_kernel(const uint8_t* __restrict__ codes, int64_t cs, const TS* __restrict__ scale,
                               int64_t ss, const TS* __restrict__ zero, int64_t zs, TO* __restrict__ out,
                               int64_t os, Dims d) {
  const int64_t total = d.R * d.nb * d.C;
  for (int64_t i = first_index(); i < total; i += grid_stride()) {
    const int64_t c = i % d.C, t = i / d.C, b = t % d.nb, r = t / d.nb;
    const uint8_t byte = codes[r * cs + b * d.C + c];
#pragma unroll
    for (int k = 0; k < kvq::kCodesPerByte; ++k) {
      const int64_t l = b * kvq::kCodesPerByte + k;
      if (l >= d.L) break;
      const int64_t g = l / d.G;
      const float s = to_float(scale[r * ss + g * d.C + c]), z = to_float(zero[r * zs + g * d.C + c]);
      out[r * os + l * d.C + c] = from_float<TO>(kvq::dequant_value(kvq::unpack(byte, k), s, z));
    }
  }
}

template <typename TX, typename TS>
void launch_quant(const View& x, const View& codes, const View& scale, const View& zero, const Dims& d,
                  int64_t* status, cudaStream_t stream) {
  const TX* xp = static_cast<const TX*>(x.data);
  uint8_t* cp = static_cast<uint8_t*>(codes.data);
  TS* sp = static_cast<TS*>(scale.data);
  TS* zp = static_cast<TS*>(zero.data);
  const bool fused = d.G % kvq::kCodesPerByte == 0;
  const int64_t groups = d.R * d.ng * d.C;
  quant_groups_kernel<TX, TS><<<blocks_for(groups), kThreads, 0, stream>>>(
      xp, x.stride[0], cp, codes.stride[0], sp, scale.stride[0], zp, zero.stride[0], d, fused, status);
  check_launch("kv_quant2");
  if (fused) return;
  const int64_t bytes = d.R * d.nb * d.C;
  quant_bytes_kernel<TX, TS><<<blocks_for(bytes), kThreads, 0, stream>>>(
      xp, x.stride[0], cp, codes.stride[0], sp, scale.stride[0], zp, zero.stride[0], d);
  check_launch("kv_quant2");
}

}  // namespace

void kv_quant2_cuda(const View& x, int64_t group_size, const View& codes, const View& scale, const View& zero,
                    int64_t* status, void* stream) {
  constexpr const char* op = "kv_quant2";
  kvq::check_quant_args(x, group_size, codes, scale, zero, op);
  const Dims d = dims_of(x, group_size);
  if (d.R == 0 || d.L == 0 || d.C == 0) return;
  const cudaStream_t st = as_stream(stream);
  if (scale.dtype == DType::f32) {
    DLMOM_DISPATCH_FLOAT(x.dtype, TX, op, launch_quant<TX, float>(x, codes, scale, zero, d, status, st));
  } else {  // scale and zero in x's dtype, rounded outward
    DLMOM_DISPATCH_FLOAT(x.dtype, TX, op, launch_quant<TX, TX>(x, codes, scale, zero, d, status, st));
  }
}

void kv_dequant2_cuda(const View& codes, const View& scale, const View& zero, int64_t group_size, const View& out,
                      int64_t* status, void* stream) {
  constexpr const char* op = "kv_dequant2";
  kvq::check_dequant_args(codes, scale, zero, group_size, out, op);
  const Dims d = dims_of(out, group_size);
  if (d.R == 0 || d.L == 0 || d.C == 0) return;
  const cudaStream_t st = as_stream(stream);
  const int64_t total = d.R * d.nb * d.C;
  DLMOM_DISPATCH_FLOAT(scale.dtype, TS, op, DLMOM_DISPATCH_FLOAT(out.dtype, TO, op, {
    dequant_kernel<TS, TO><<<blocks_for(total), kThreads, 0, st>>>(
        static_cast<const uint8_t*>(codes.data), codes.stride[0], static_cast<const TS*>(scale.data),
        scale.stride[0], static_cast<const TS*>(zero.data), zero.stride[0], static_cast<TO*>(out.data),
        out.stride[0], d);
    check_launch(op);
  }));
}

}  // namespace dlmom
