// Helpers for the CUDA kernels: launch checks and block reductions.
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

}  // namespace dlmom
