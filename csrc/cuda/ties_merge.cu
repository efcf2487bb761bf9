// CUDA kernel of ties_merge: pass 1 one block per (e, b) row reduces the row mean; pass 2 a grid over
// [B, V] merges a 16-byte group of tokens per thread with the E-loop inside. The math is
// csrc/ties_merge.h, shared with the CPU kernel.
// Known limit: at small B pass 1 has only E * B blocks, so only that many SMs read the rows. Splitting a
// row over several blocks needs a workspace for the partial sums, which this API does not have.
#include <algorithm>
#include <cstdint>

#include "../ops.h"
#include "../ties_merge.h"
#include "cuda_common.cuh"

namespace dlmom {
namespace {

constexpr int kMaxUnrolledE = 8;  // larger E runs the generic kernel (runtime loop, scalar loads)
constexpr int kMergeThreads = 128;  // small blocks spread B = 1 over more SMs
constexpr int64_t kMaxGridY = 65535;
// row_means_kernel's block: big blocks for few rows (more loads in flight per SM), else small ones.
constexpr int kMeanThreadsFew = 1024;
constexpr int kMeanThreadsMany = 256;

// Tokens in one 16-byte load: 4 fp32 or 8 fp16/bf16.
template <typename T>
constexpr int kVecOf = int(16 / sizeof(T));

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

__device__ __forceinline__ void unpack(const uint4& u, float (&d)[4]) {
  d[0] = __uint_as_float(u.x);
  d[1] = __uint_as_float(u.y);
  d[2] = __uint_as_float(u.z);
  d[3] = __uint_as_float(u.w);
}
// p must be 16-byte aligned.
template <typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&d)[kVecOf<T>]) {
  const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
  if constexpr (sizeof(T) == 4) {
    unpack(u, d);
  } else {
    unpack_halves<T>(u, d);
  }
}

// ---- pass 1: row means ----

template <typename T>
__device__ __forceinline__ T shfl_down(T v, int delta) { return __shfl_down_sync(0xffffffffu, v, delta); }

// Sums of the whole block, valid in thread 0.
__device__ __forceinline__ void block_reduce(float& sum, long long& count, int& bad) {
  __shared__ float s_sum[32];
  __shared__ long long s_count[32];
  __shared__ int s_bad[32];
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) {
    sum += shfl_down(sum, d);
    count += shfl_down(count, d);
    bad |= shfl_down(bad, d);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  if (lane == 0) {
    s_sum[warp] = sum;
    s_count[warp] = count;
    s_bad[warp] = bad;
  }
  __syncthreads();
  if (warp == 0) {
    sum = lane < warps ? s_sum[lane] : 0.f;
    count = lane < warps ? s_count[lane] : 0;
    bad = lane < warps ? s_bad[lane] : 0;
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) {
      sum += shfl_down(sum, d);
      count += shfl_down(count, d);
      bad |= shfl_down(bad, d);
    }
  }
}

// One block per row (e, b) of x [E, B, V]: means[e, b].
template <typename T>
__global__ void __launch_bounds__(kMeanThreadsFew) row_means_kernel(const T* __restrict__ x, int64_t sE, int64_t sB, int64_t B, int64_t V,
                                 float* __restrict__ means, int64_t msE, int64_t msB, int64_t* status) {
  constexpr int kVec = kVecOf<T>;
  const int64_t e = blockIdx.x / B, b = blockIdx.x % B;
  const T* p = x + e * sE + b * sB;  // [V]
  float sum = 0.f;
  int count = 0, bad = 0;
  // bad: 1 for |x| > 2^96 (row_add), | 2 for NaN or +inf, which the error message names apart.
  auto add = [&](float v) {
    ties::row_add(v, sum, count, bad);
    bad |= (v != v || v == ties::kInf) ? 2 : 0;
  };
  // Scalar head up to the first 16-byte boundary, 16-byte body, scalar tail.
  const int64_t head = min(V, int64_t(((16u - (reinterpret_cast<uintptr_t>(p) & 15u)) & 15u) / sizeof(T)));
  const int64_t nvec = (V - head) / kVec;
  for (int64_t j = threadIdx.x; j < head; j += blockDim.x) add(to_float(p[j]));
  const T* body = p + head;
  // Unrolled so that several independent loads are in flight per thread.
#pragma unroll 4
  for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
    float f[kVec];
    load_vec(body + i * kVec, f);
#pragma unroll
    for (int k = 0; k < kVec; ++k) add(f[k]);
  }
  for (int64_t j = head + nvec * kVec + threadIdx.x; j < V; j += blockDim.x) add(to_float(p[j]));
  long long total = count;
  block_reduce(sum, total, bad);
  if (threadIdx.x == 0) {
    means[e * msE + b * msB] = ties::row_mean(sum, total, bad != 0);
    if (bad) flag_error(status, kTiesLogits, e, b, (bad & 2) ? 1 : 0);  // NaN, +inf or |x| > 2^96 in the row
  }
}

// ---- pass 2: the merge ----

struct MergeArgs {
  int64_t sE, sB, B, V;
  const float* means;  // [E, B]
  int64_t msE, msB;
  const float* w;  // [E, B] (strides wsE, wsB; wsB = 0 for weights [E]) or nullptr (all ones)
  int64_t wsE, wsB;
  float theta;
  bool mass;
  float* out;  // [B, V]
  int64_t osB;
  int64_t* status;
};

// The scaled weights of row b (ties::row_weights); a bad weight is reported once per row.
template <int kE>
__device__ __forceinline__ void weights_of_row(const MergeArgs& a, int E, int64_t b, float* wt) {
  const int bad = ties::row_weights<kE>(a.w ? a.w + b * a.wsB : nullptr, a.wsE, E, wt);
  if (bad >= 0 && blockIdx.x == 0 && threadIdx.x == 0)
    flag_error(a.status, kTiesWeights, bad, b, (long long)__float_as_uint(a.w[bad * a.wsE + b * a.wsB]));
}

// Thread groups of kVec tokens start at 16-byte boundaries of expert 0's row b, so its loads, and those
// of every expert whose row shares that alignment (all of them when the row strides are multiples of
// 16 bytes, e.g. V = 151936), are single 16-byte loads; a group at the row ends or in a row of another
// alignment (contiguous V = 50257) falls back to scalar loads.
template <typename T, int kE>
__global__ void __launch_bounds__(kMergeThreads) merge_kernel(const T* __restrict__ x, MergeArgs a) {
  constexpr int kVec = kVecOf<T>;
  for (int64_t b = blockIdx.y; b < a.B; b += gridDim.y) {
    const T* rows[kE];
    float m[kE], wt[kE];
#pragma unroll
    for (int e = 0; e < kE; ++e) {
      rows[e] = x + e * a.sE + b * a.sB;
      m[e] = a.means[e * a.msE + b * a.msB];
    }
    weights_of_row<kE>(a, kE, b, wt);
    float* o = a.out + b * a.osB;
    const int64_t h = int64_t((reinterpret_cast<uintptr_t>(rows[0]) & 15u) / sizeof(T));
    const int64_t groups = (a.V + h + kVec - 1) / kVec;
    for (int64_t g = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
         g += int64_t(gridDim.x) * blockDim.x) {
      const int64_t j0 = g * kVec - h;  // may be negative in the first group
      const bool full = j0 >= 0 && j0 + kVec <= a.V;
      float xs[kE][kVec];
#pragma unroll
      for (int e = 0; e < kE; ++e) {
        if (full && aligned16(rows[e] + j0)) {
          load_vec(rows[e] + j0, xs[e]);
        } else {
#pragma unroll
          for (int k = 0; k < kVec; ++k) {
            const int64_t j = j0 + k;
            xs[e][k] = j >= 0 && j < a.V ? to_float(rows[e][j]) : 0.f;
          }
        }
      }
      float r[kVec];
#pragma unroll
      for (int k = 0; k < kVec; ++k)
        r[k] = ties::merge_token<kE>([&](int e) { return xs[e][k]; }, kE, m, wt, a.theta, a.mass);
      if (full && aligned16(o + j0)) {
#pragma unroll
        for (int k = 0; k < kVec; k += 4)
          *reinterpret_cast<float4*>(o + j0 + k) = make_float4(r[k], r[k + 1], r[k + 2], r[k + 3]);
      } else {
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          const int64_t j = j0 + k;
          if (j >= 0 && j < a.V) o[j] = r[k];
        }
      }
    }
  }
}

// Any E: one token per thread, the E means and weights of row b staged in shared memory.
template <typename T>
__global__ void __launch_bounds__(kMergeThreads) merge_kernel_any_e(const T* __restrict__ x, int E, MergeArgs a) {
  extern __shared__ float s_mw[];  // [2 * E]: means, then weights
  float* s_mean = s_mw;
  float* s_w = s_mw + E;
  for (int64_t b = blockIdx.y; b < a.B; b += gridDim.y) {
    __syncthreads();  // the previous b's values are no longer read
    for (int e = threadIdx.x; e < E; e += blockDim.x) s_mean[e] = a.means[e * a.msE + b * a.msB];
    if (threadIdx.x == 0) weights_of_row<0>(a, E, b, s_w);  // a max over E: one thread
    __syncthreads();
    const T* row = x + b * a.sB;
    float* o = a.out + b * a.osB;
    const int64_t step = int64_t(gridDim.x) * blockDim.x;
    for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < a.V; j += step)
      o[j] = ties::merge_token<0>([&](int e) { return to_float(row[e * a.sE + j]); }, E, s_mean, s_w, a.theta,
                                  a.mass);
  }
}

// B == 0 with weights [E]: no row runs the merge kernels, but a bad weight is still an error, as on the CPU.
__global__ void __launch_bounds__(1) check_weights_kernel(const float* __restrict__ w, int64_t sE, int E,
                                                          int64_t* status) {
  for (int e = 0; e < E; ++e) {
    const float v = w[e * sE];
    if (!(v >= 0.f && v < ties::kInf)) {
      flag_error(status, kTiesWeights, e, 0, (long long)__float_as_uint(v));
      return;
    }
  }
}

int sm_count() {
  int dev = 0, n = 0;
  const bool ok = cudaGetDevice(&dev) == cudaSuccess &&
                  cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) == cudaSuccess;
  return ok && n > 0 ? n : 108;
}

template <typename T>
void launch(const ties::Dims& d, const View& logits, const View& weights, float theta, bool mass,
            const View& means, const View& out, int64_t* status, cudaStream_t stream) {
  const T* x = static_cast<const T*>(logits.data);
  float* mo = static_cast<float*>(means.data);
  const int64_t rows = d.E * d.B;
  // Few rows (small B) get big blocks: each block then has more loads in flight on its SM.
  const int mean_threads = rows < 2 * sm_count() ? kMeanThreadsFew : kMeanThreadsMany;
  row_means_kernel<T><<<unsigned(rows), mean_threads, 0, stream>>>(
      x, logits.stride[0], logits.stride[1], d.B, d.V, mo, means.stride[0], means.stride[1], status);
  check_launch("ties_merge");

  const MergeArgs a{logits.stride[0], logits.stride[1], d.B, d.V, mo, means.stride[0], means.stride[1],
                    d.has_weights ? static_cast<const float*>(weights.data) : nullptr, d.wsE, d.wsB, theta,
                    mass, static_cast<float*>(out.data), out.stride[0], status};
  const unsigned grid_y = unsigned(std::min(d.B, kMaxGridY));
  if (d.E <= kMaxUnrolledE) {
    const int64_t groups = d.V / kVecOf<T> + 2;  // + the partial groups at both ends
    const int64_t blocks = (groups + kMergeThreads - 1) / kMergeThreads;
    const dim3 grid(unsigned(std::min<int64_t>(blocks, 1 << 20)), grid_y);
    switch (d.E) {
#define TIES_CASE(n) \
  case n: merge_kernel<T, n><<<grid, kMergeThreads, 0, stream>>>(x, a); break;
      TIES_CASE(1) TIES_CASE(2) TIES_CASE(3) TIES_CASE(4) TIES_CASE(5) TIES_CASE(6) TIES_CASE(7) TIES_CASE(8)
#undef TIES_CASE
    }
  } else {
    const dim3 grid(unsigned(std::min<int64_t>((d.V + kMergeThreads - 1) / kMergeThreads, 1 << 20)), grid_y);
    merge_kernel_any_e<T><<<grid, kMergeThreads, 2 * d.E * sizeof(float), stream>>>(x, int(d.E), a);
  }
  check_launch("ties_merge");
}

}  // namespace

void ties_merge_cuda(const View& logits, const View& weights, float theta, int elect, const View& means,
                     const View& out, int64_t* status, void* stream) {
  const ties::Dims d = ties::check_args(logits, weights, theta, elect, means, out);
  // Shared memory of the generic kernel holds 2 * E floats; far beyond any real expert count.
  DLMOM_CHECK(d.E <= 4096, "ties_merge", "at most 4096 experts on CUDA, got ", d.E);
  DLMOM_CHECK(d.E * d.B <= INT32_MAX, "ties_merge", "E * B must fit a grid (< 2^31 rows), got ", d.E * d.B);
  if (d.B == 0) {
    if (d.has_weights && weights.ndim == 1) {
      check_weights_kernel<<<1, 1, 0, as_stream(stream)>>>(static_cast<const float*>(weights.data), d.wsE, int(d.E),
                                                           status);
      check_launch("ties_merge");
    }
    return;
  }
  DLMOM_DISPATCH_FLOAT(logits.dtype, T, "ties_merge",
                       launch<T>(d, logits, weights, theta, elect == 1, means, out, status, as_stream(stream)));
}

}  // namespace dlmom
