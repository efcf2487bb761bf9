// The C++ API of the four ops: one CPU entry point each (csrc/cpu/<op>.cpp) and one CUDA entry point
// each (csrc/cuda/<op>.cu, taking the stream as void*). Outputs are allocated by the caller.
// Every entry point checks ranks, dtypes and sizes again and throws std::invalid_argument. Value errors found
// while the kernels read the data (ids out of range, NaN logits, ...) throw std::invalid_argument on the CPU;
// the CUDA kernels record them in `status` (int64 [4] on the device, or nullptr; cuda/cuda_common.cuh).
#pragma once
#include "common.h"

namespace dlmom {

// out[b, :] = scale * sum_i probs[b, i] * weight[ids[b, i], :], accumulated in fp64
//   ids [B, k] int32/int64, probs [B, k] float, weight [V, D] float (any row stride), out [B, D] weight.dtype
void soft_embed_cpu(const View& ids, const View& probs, const View& weight, double scale, const View& out);
void soft_embed_cuda(const View& ids, const View& probs, const View& weight, double scale, const View& out,
                     int64_t* status, void* stream);

// logits [B, V] float -> ids [B, k] int64, probs [B, k] float32, entropy [B] float32 (NaN for a row that
// holds NaN, +inf or only -inf: a ValueError on the CPU, an error in `status` on CUDA).
void topk_packet_cpu(const View& logits, int64_t k, float temperature, float top_p, const View& ids,
                     const View& probs, const View& entropy);
// CUDA also takes the scratch: workspace uint8 [>= topk_packet_cuda_workspace_bytes(B, V, k)], 16-byte aligned.
void topk_packet_cuda(const View& logits, int64_t k, float temperature, float top_p, const View& ids,
                      const View& probs, const View& entropy, const View& workspace, int64_t* status,
                      void* stream);
int64_t topk_packet_cuda_workspace_bytes(int64_t B, int64_t V, int64_t k);

// logits [E, B, V] float, weights [E] or [E, B] float32 (any strides; >= 0 and finite, scaled per row by a
// power of two in the kernel) or empty View (all ones), elect 0 = vote, 1 = mass
// -> means [E, B] float32 (row means over finite entries; NaN flags bad input), out [B, V] float32
void ties_merge_cpu(const View& logits, const View& weights, float theta, int elect, const View& means,
                    const View& out);
void ties_merge_cuda(const View& logits, const View& weights, float theta, int elect, const View& means,
                     const View& out, int64_t* status, void* stream);

// x [R, L, C] float, contiguous; groups of `group_size` run along L.
// -> codes [R, ceil(L/4), C] uint8 (4 codes per byte along L, least significant bits first),
//    scale, zero [R, ceil(L/group_size), C] in the dtype the caller chose (float32 or x.dtype).
void kv_quant2_cpu(const View& x, int64_t group_size, const View& codes, const View& scale, const View& zero);
void kv_quant2_cuda(const View& x, int64_t group_size, const View& codes, const View& scale, const View& zero,
                    int64_t* status, void* stream);
// codes, scale, zero as above -> out [R, L, C] float
void kv_dequant2_cpu(const View& codes, const View& scale, const View& zero, int64_t group_size, const View& out);
void kv_dequant2_cuda(const View& codes, const View& scale, const View& zero, int64_t group_size,
                      const View& out, int64_t* status, void* stream);

}  // namespace dlmom
