// cub::BlockScan for the CPU emulation (tests/cuda_emu/cuda_emu.h): InclusiveSum by thread 0 in thread order
// between two barriers; every thread gets its prefix and the block's total. Every thread must call it.
#pragma once
namespace cub {
template <typename T, int kThreads>
class BlockScan {
 public:
  struct TempStorage { T data[kThreads]; T total; };
  explicit BlockScan(TempStorage& s) : s_(s) {}
  void InclusiveSum(T in, T& out, T& aggregate) {
    const int tid = ::emu::self().linear;
    s_.data[tid] = in;
    __syncthreads();
    if (tid == 0) {
      T run = T(0);
      for (int i = 0; i < int(blockDim.x * blockDim.y * blockDim.z); ++i) s_.data[i] = run = run + s_.data[i];
      s_.total = run;
    }
    __syncthreads();
    out = s_.data[tid];
    aggregate = s_.total;
  }

 private:
  TempStorage& s_;
};
}  // namespace cub
