// Helpers for the CUDA kernels: launch checks, streams, vector unpacking.
#pragma once
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "../common.h"

namespace dlmom {

inline void check_launch(const char* op) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(op) + ": CUDA launch failed: " + cudaGetErrorString(err));
}

inline cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

// Value errors found on the device (an id out of range, NaN logits, ...) are not raised by the launch: the kernel
// records the first one in the caller's status buffer, int64 [4] on the tensors' device = (code, a, b, c), and
// dlmom.ops.raise_pending_errors reads it once per step (no host sync per op). Codes: python/dlmom/op_library.py.
enum ErrorCode : long long { kIdRange = 1, kTopkRow = 2, kTiesLogits = 3, kTiesWeights = 4, kKvNonFinite = 5 };

__device__ __forceinline__ void flag_error(int64_t* status, long long code, long long a, long long b = 0,
                                           long long c = 0) {
  if (status == nullptr) return;
  auto* word = reinterpret_cast<unsigned long long*>(status);
  if (atomicCAS(word, 0ull, static_cast<unsigned long long>(code)) == 0ull) {  // the first error wins
    status[1] = a;
    status[2] = b;
    status[3] = c;
  }
}

// Eight f16 / bf16 values from one 16-byte load: two per 32-bit word, the lower address in the low half.
template <typename H>
__device__ __forceinline__ void unpack_halves(const uint4& u, float (&d)[8]) {
  const uint32_t words[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    d[2 * i] = to_float(H{uint16_t(words[i] & 0xffffu)});
    d[2 * i + 1] = to_float(H{uint16_t(words[i] >> 16)});
  }
}

}  // namespace dlmom
