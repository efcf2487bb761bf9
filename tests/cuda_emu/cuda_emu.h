// CUDA on the CPU for tests: csrc/cuda/*.cu compiled as host C++ (after tests/cuda_emu/emu_source.py rewrites
// `kernel<<<cfg>>>(args)` into `emu::launch(cfg)(kernel-call)`), each block run alone with one ucontext fiber
// per thread. Shared memory is a function-local static (one block runs at a time), __syncthreads a barrier
// over the block's fibers, warp shuffles go through a per-warp slot array with warp barriers, atomics are
// plain read-modify-writes (fibers switch only at barriers), and the cub block primitives are re-done on
// shared arrays. A barrier some threads never reach ends the run with a "barrier deadlock" error (what
// compute-sanitizer's synccheck reports as divergence); a kernel's memory is host memory.
// Between barriers the fibers run in an order shuffled anew on every sweep (seed: the environment's EMU_SEED,
// default 1; EMU_SEED=0 runs them in thread order), so a missing barrier that thread order would hide (thread 0
// writes, the others read) shows. Not emulated: timing, races inside one sweep (a fiber runs to its next
// barrier uninterrupted), the GPU's float summation order (cub sums here serially), texture / async copies.
// Memory checks: every reinterpret_cast in the .cu files is checked for the target type's alignment
// (checked_cast: a misaligned float4 / uint4 access aborts naming the kernel and the line), and the cases'
// buffers sit against inaccessible pages (guard.h), so one element out of bounds kills the case.
#pragma once
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static  // one block at a time: the block's threads share the function-local static

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

using std::isnan;
template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) { return b < a ? b : a; }
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) { return a < b ? b : a; }

namespace emu {

struct Thread {
  ucontext_t ctx;
  dim3 tid;
  int linear = 0;
  bool done = false;
  const uint64_t* wait_gen = nullptr;  // waiting until *wait_gen != wait_val
  uint64_t wait_val = 0;
};

struct Barrier {
  int expected = 0, arrived = 0;
  uint64_t gen = 0;
  int flag_or = 0, result_or = 0;
};

struct Block {
  dim3 block_idx, grid_dim, block_dim;
  std::vector<Thread> threads;
  Thread* cur = nullptr;
  ucontext_t sched;
  Barrier block_bar;
  std::vector<Barrier> warp_bars;
  std::vector<unsigned char> shfl;  // [threads][16 bytes]: one value per lane in flight
  std::vector<unsigned char> dyn_smem;
};

inline Block*& block() {
  static Block* b = nullptr;
  return b;
}
inline Thread& self() { return *block()->cur; }

// Arrive at bar (with `flag` for the OR-reduction); returns once every expected thread has arrived.
inline int arrive(Barrier& bar, int flag = 0) {
  Block& b = *block();
  bar.flag_or |= flag;
  if (++bar.arrived == bar.expected) {
    bar.result_or = bar.flag_or;
    bar.flag_or = 0;
    bar.arrived = 0;
    ++bar.gen;  // releases the waiting threads; this one goes on
    return bar.result_or;
  }
  Thread& t = self();
  t.wait_gen = &bar.gen;
  t.wait_val = bar.gen;
  swapcontext(&t.ctx, &b.sched);
  return bar.result_or;
}

inline Barrier& warp_barrier() {
  Block& b = *block();
  return b.warp_bars[size_t(self().linear / 32)];
}

template <typename T>
T shfl(T v, int src_lane_of) {
  static_assert(sizeof(T) <= 16, "shuffle of a value over 16 bytes");
  Block& b = *block();
  const int me = self().linear, base = me & ~31;
  std::memcpy(&b.shfl[size_t(me) * 16], &v, sizeof(T));
  arrive(warp_barrier());
  const int src = base + src_lane_of;
  const int nthreads = int(b.threads.size());
  T out = v;  // a lane outside the warp (or the block) gives back the caller's own value, as on the GPU
  if (src_lane_of >= 0 && src_lane_of < 32 && src < nthreads) std::memcpy(&out, &b.shfl[size_t(src) * 16], sizeof(T));
  arrive(warp_barrier());  // all have read before the slots are written again
  return out;
}

// The scheduler's random order (EMU_SEED; 0: thread order), one stream for the whole process.
inline std::mt19937_64* order_rng() {
  static std::unique_ptr<std::mt19937_64> rng = [] {
    const char* env = std::getenv("EMU_SEED");
    const unsigned long long seed = env ? std::strtoull(env, nullptr, 10) : 1ull;
    return seed ? std::make_unique<std::mt19937_64>(seed) : std::unique_ptr<std::mt19937_64>();
  }();
  return rng.get();
}

constexpr size_t kStack = 128 * 1024;

inline void trampoline(unsigned lo, unsigned hi) {
  auto* fn = reinterpret_cast<std::function<void()>*>((uintptr_t(hi) << 32) | uintptr_t(lo));
  (*fn)();
  Block& b = *block();
  b.cur->done = true;
  swapcontext(&b.cur->ctx, &b.sched);
}

// Runs fn once per thread of each block of grid x block (x fastest); smem: dynamic shared bytes.
inline void run_grid(dim3 grid, dim3 blk, size_t smem, std::function<void()> fn) {
  static std::vector<std::unique_ptr<char[]>> stacks;  // not zeroed: untouched pages stay uncommitted
  const int n = int(blk.x * blk.y * blk.z);
  if (n < 1 || n > 1024) throw std::runtime_error("emu: block of " + std::to_string(n) + " threads");
  while (int(stacks.size()) < n) stacks.emplace_back(new char[kStack]);
  Block b;
  b.grid_dim = grid;
  b.block_dim = blk;
  b.threads.resize(size_t(n));
  b.warp_bars.resize(size_t((n + 31) / 32));
  for (size_t w = 0; w < b.warp_bars.size(); ++w) b.warp_bars[w].expected = std::min(32, n - int(w) * 32);
  b.block_bar.expected = n;
  b.shfl.assign(size_t(n) * 16, 0);
  b.dyn_smem.assign(smem + 16, 0);
  Block* saved = block();
  block() = &b;
  const uintptr_t p = reinterpret_cast<uintptr_t>(&fn);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        b.block_idx = dim3(bx, by, bz);
        for (int i = 0; i < n; ++i) {
          Thread& t = b.threads[size_t(i)];
          t = Thread{};
          t.linear = i;
          t.tid = dim3(unsigned(i) % blk.x, (unsigned(i) / blk.x) % blk.y, unsigned(i) / (blk.x * blk.y));
          getcontext(&t.ctx);
          t.ctx.uc_stack.ss_sp = stacks[size_t(i)].get();
          t.ctx.uc_stack.ss_size = kStack;
          t.ctx.uc_link = nullptr;
          makecontext(&t.ctx, reinterpret_cast<void (*)()>(trampoline), 2, unsigned(p & 0xffffffffu),
                      unsigned(p >> 32));
        }
        int live = n;
        std::vector<int> order(size_t(n), 0);
        std::iota(order.begin(), order.end(), 0);
        while (live > 0) {
          bool progressed = false;
          if (order_rng()) std::shuffle(order.begin(), order.end(), *order_rng());
          for (int i : order) {
            Thread& t = b.threads[size_t(i)];
            if (t.done) continue;
            if (t.wait_gen && *t.wait_gen == t.wait_val) continue;  // still at its barrier
            t.wait_gen = nullptr;
            b.cur = &t;
            swapcontext(&b.sched, &t.ctx);
            progressed = true;
            if (t.done) --live;
          }
          if (!progressed) {
            block() = saved;
            throw std::runtime_error("emu: barrier deadlock in block (" + std::to_string(bx) + ", " +
                                     std::to_string(by) + "): " + std::to_string(live) +
                                     " threads wait at a barrier the others never reach");
          }
        }
      }
  block() = saved;
}

// The launch that runs now (emu_source.py names each one), for the fault and alignment messages.
struct Running {
  const char* kernel = nullptr;
  const char* file = nullptr;
  int line = 0;
};
inline Running& running() {
  static Running r;
  return r;
}

// "kernel K launched at FILE:LINE, block (x, y, z) thread (x, y, z)" or "in host code (no kernel running)";
// async-signal-safe enough for the fault handler (snprintf of plain values).
inline void describe_running_kernel(char* buf, size_t len) {
  const Running& r = running();
  const Block* b = block();
  if (r.kernel == nullptr || b == nullptr || b->cur == nullptr) {
    std::snprintf(buf, len, "in host code (no kernel running)");
    return;
  }
  std::snprintf(buf, len, "in kernel %s launched at %s:%d, block (%u, %u, %u) thread (%u, %u, %u)", r.kernel, r.file,
                r.line, b->block_idx.x, b->block_idx.y, b->block_idx.z, b->cur->tid.x, b->cur->tid.y, b->cur->tid.z);
}

struct Launch {
  dim3 grid, blk;
  size_t smem;
  template <typename F>
  void operator()(F&& f) const { run_grid(grid, blk, smem, std::function<void()>(std::forward<F>(f))); }
  // A launch rewritten from a .cu file: kernel's name and launch site kept for messages.
  template <typename F>
  void operator()(const char* kernel, const char* file, int line, F&& f) const {
    const Running saved = running();
    running() = Running{kernel, file, line};
    (*this)(std::forward<F>(f));
    running() = saved;
  }
};
inline Launch launch(dim3 grid, dim3 blk, size_t smem = 0, void* = nullptr) { return Launch{grid, blk, smem}; }

inline void* dyn_smem() { return block()->dyn_smem.data(); }

// Every reinterpret_cast of the .cu files goes through here (emu_source.py): a pointer cast to T* must be aligned
// to alignof(T), as the GPU requires of every access (16 bytes for float4 / uint4; x86 does not fault on a
// misaligned vector load, so without this check the emulation would pass a kernel that faults on the GPU).
template <typename To, typename From>
inline To checked_cast(From p, const char* file, int line, const char* func) {
  static_assert(!std::is_reference_v<To>, "emu: reinterpret_cast to a reference is not checked");
  if constexpr (std::is_pointer_v<To> && std::is_pointer_v<From>) {
    using Pointee = std::remove_cv_t<std::remove_pointer_t<To>>;
    if constexpr (!std::is_void_v<Pointee> && !std::is_function_v<Pointee>) {
      const uintptr_t a = reinterpret_cast<uintptr_t>(p);
      if (a % alignof(Pointee) != 0) {
        char where[512];
        describe_running_kernel(where, sizeof(where));
        std::fprintf(stderr,
                     "emu: misaligned %zu-byte access: address %p (%zu mod %zu) cast to a %zu-byte type in %s at "
                     "%s:%d, %s; a GPU faults here (misaligned address)\n",
                     sizeof(Pointee), static_cast<const void*>(p), size_t(a % alignof(Pointee)), alignof(Pointee),
                     sizeof(Pointee), func, file, line, where);
        std::abort();
      }
    }
  }
  return reinterpret_cast<To>(p);
}

}  // namespace emu

#define threadIdx (::emu::self().tid)
#define blockIdx (::emu::block()->block_idx)
#define blockDim (::emu::block()->block_dim)
#define gridDim (::emu::block()->grid_dim)

inline void __syncthreads() { ::emu::arrive(::emu::block()->block_bar); }
inline int __syncthreads_or(int p) { return ::emu::arrive(::emu::block()->block_bar, p != 0); }
inline void __syncwarp(unsigned = 0xffffffffu) { ::emu::arrive(::emu::warp_barrier()); }
template <typename T>
T __shfl_down_sync(unsigned, T v, int delta) { return ::emu::shfl(v, (::emu::self().linear & 31) + delta); }
template <typename T>
T __shfl_xor_sync(unsigned, T v, int mask) { return ::emu::shfl(v, (::emu::self().linear & 31) ^ mask); }
template <typename T>
T __shfl_sync(unsigned, T v, int lane) { return ::emu::shfl(v, lane); }

// Fibers switch only at barriers: a read-modify-write is atomic.
template <typename T>
T atomicAdd(T* p, T v) { T old = *p; *p = old + v; return old; }
template <typename T>
T atomicCAS(T* p, T cmp, T v) { T old = *p; if (old == cmp) *p = v; return old; }
template <typename T>
T atomicMax(T* p, T v) { T old = *p; if (old < v) *p = v; return old; }
template <typename T>
T __ldg(const T* p) { return *p; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
