// cub::BlockReduce for the CPU emulation (tests/cuda_emu/cuda_emu.h): every thread stores its value, a barrier,
// thread 0 folds them in thread order (cub's order differs: the float rounding may too). The result is
// valid in thread 0 only, as in cub; every thread of the block must call it.
#pragma once
namespace cub {
template <typename T, int kThreads>
class BlockReduce {
 public:
  struct TempStorage { T data[kThreads]; };
  explicit BlockReduce(TempStorage& s) : s_(s) {}
  template <typename Op>
  T Reduce(T v, Op op) {
    const int tid = ::emu::self().linear;
    s_.data[tid] = v;
    __syncthreads();
    if (tid != 0) return v;
    T r = s_.data[0];
    for (int i = 1; i < int(blockDim.x * blockDim.y * blockDim.z); ++i) r = op(r, s_.data[i]);
    return r;
  }
  T Sum(T v) { return Reduce(v, [](const T& a, const T& b) { return a + b; }); }

 private:
  TempStorage& s_;
};
}  // namespace cub
