// soft_embed on the GPU: one thread per output column, blocks over (column tiles, batch rows). The packet
// of a row (ids, probs) is staged in shared memory; the weight rows are read coalesced along D.
#include "../ops.h"
#include "../soft_embed.h"
#include "cuda_common.cuh"

namespace dlmom {
namespace {

constexpr const char* kOp = "soft_embed";
constexpr int kThreads = 256;

// This thread's sum_i probs[b, i] * weight[ids[b, i], d] as Acc; every thread of the block must call it (it
// stages the packet in shared memory).
template <typename Acc, typename W, typename P, typename I>
__device__ Acc row_sum(const I* __restrict__ row_ids, const P* __restrict__ row_probs, const W* __restrict__ weight,
                       int64_t w_s0, int64_t V, int64_t k, int64_t D, int64_t d, int64_t* s_id, float* s_p,
                       int64_t* status) {
  Acc acc = Acc(0);
  for (int64_t i0 = 0; i0 < k; i0 += kThreads) {
    const int64_t n = (k - i0 < kThreads) ? k - i0 : kThreads;
    if (threadIdx.x < n) {
      s_id[threadIdx.x] = load_id(row_ids, i0 + threadIdx.x);
      s_p[threadIdx.x] = to_float(row_probs[i0 + threadIdx.x]);
      // The id range is checked here, in the kernel's own read of the ids (the first column block reports).
      const int64_t id = s_id[threadIdx.x];
      if (blockIdx.x == 0 && (id < 0 || id >= V)) flag_error(status, kIdRange, id, V);
    }
    __syncthreads();
    if (d < D) {
      for (int64_t i = 0; i < n; ++i) {
        const int64_t id = s_id[i];
        // An out-of-range id is reported above and never read.
        if (id >= 0 && id < V) acc += Acc(s_p[i]) * Acc(to_float(weight[id * w_s0 + d]));
      }
    }
    __syncthreads();
  }
  return acc;
}

template <typename W, typename P, typename I>
__global__ void __launch_bounds__(kThreads) soft_embed_kernel(const I* __restrict__ ids, int64_t ids_s0, const P* __restrict__ probs,
                                  int64_t probs_s0, const W* __restrict__ weight, int64_t w_s0, int64_t V,
                                  W* __restrict__ out, int64_t out_s0, int64_t B, int64_t k, int64_t D,
                                  double scale, bool float_scale, int64_t* status) {
  __shared__ int64_t s_id[kThreads];
  __shared__ float s_p[kThreads];
  const int64_t d = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const I* row_ids = ids + b * ids_s0;
    const P* row_probs = probs + b * probs_s0;
    const float acc = row_sum<float>(row_ids, row_probs, weight, w_s0, V, k, D, d, s_id, s_p, status);
    const float v = soft_embed_scaled(acc, float_scale, float(scale), scale);
    // An extreme sum anywhere in the block: the block redoes the row in fp64 (soft_embed.h).
    if (__syncthreads_or(d < D && soft_embed_redo<W>(acc, v))) {
      const double acc64 = row_sum<double>(row_ids, row_probs, weight, w_s0, V, k, D, d, s_id, s_p, nullptr);
      if (d < D) out[b * out_s0 + d] = from_float<W>(float(scale * acc64));
    } else if (d < D) {
      out[b * out_s0 + d] = from_float<W>(v);
    }
  }
}

}  // namespace

void soft_embed_cuda(const View& ids, const View& probs, const View& weight, double scale, const View& out,
                     int64_t* status, void* stream) {
  soft_embed_check(ids, probs, weight, out);
  const int64_t B = ids.size[0], k = ids.size[1], V = weight.size[0], D = weight.size[1];
  if (B == 0) return;
  // D == 0 still launches one column block: it checks the ids.
  const dim3 grid(unsigned(D > 0 ? (D + kThreads - 1) / kThreads : 1), unsigned(B < 65535 ? B : 65535));
  DLMOM_DISPATCH_FLOAT(weight.dtype, W, kOp, {
    DLMOM_DISPATCH_FLOAT(probs.dtype, P, kOp, {
      if (ids.dtype == DType::i32)
        soft_embed_kernel<<<grid, kThreads, 0, as_stream(stream)>>>(
            static_cast<const int32_t*>(ids.data), ids.stride[0], static_cast<const P*>(probs.data), probs.stride[0],
            static_cast<const W*>(weight.data), weight.stride[0], V, static_cast<W*>(out.data), out.stride[0], B, k,
            D, scale, soft_embed_float_scale(scale), status);
      else
        soft_embed_kernel<<<grid, kThreads, 0, as_stream(stream)>>>(
            static_cast<const int64_t*>(ids.data), ids.stride[0], static_cast<const P*>(probs.data), probs.stride[0],
            static_cast<const W*>(weight.data), weight.stride[0], V, static_cast<W*>(out.data), out.stride[0], B, k,
            D, scale, soft_embed_float_scale(scale), status);
    });
  });
  check_launch(kOp);
}

}  // namespace dlmom
