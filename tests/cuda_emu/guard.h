// Guarded buffers for the emulated cases (tests/cuda_emu/cuda_emu.h): every buffer a case hands to a kernel is
// its own mapping with an inaccessible page (PROT_NONE) on both sides, the data flush against one of them:
//   EMU_GUARD=after (default): the data ends where the page after it begins, so reading or writing one element
//                              past the end faults;
//   EMU_GUARD=before:          the data starts where the page before it ends, so element -1 faults;
//   EMU_GUARD=off:             plain heap memory.
// A fault is a SIGSEGV; the handler below names the buffer side, the distance and the kernel that was running
// (name, launch site, block and thread) on stderr, then lets the signal kill the process, so the test that ran
// the case sees a crash, not a wrong number. Not guarded: shared memory (function-local statics here) and the
// fibers' stacks.
#pragma once
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

#include "cuda_emu.h"  // describe_running_kernel

namespace emu {

enum class GuardMode { off, after, before };

inline GuardMode guard_mode() {
  static const GuardMode mode = [] {
    const char* env = std::getenv("EMU_GUARD");
    if (env == nullptr || std::strcmp(env, "after") == 0) return GuardMode::after;
    if (std::strcmp(env, "before") == 0) return GuardMode::before;
    if (std::strcmp(env, "off") == 0) return GuardMode::off;
    std::fprintf(stderr, "emu: EMU_GUARD must be after, before or off, got '%s'\n", env);
    std::exit(2);
  }();
  return mode;
}

struct GuardedRegion {
  char* map = nullptr;  // [guard page][data pages][guard page]
  size_t map_len = 0;
  char* data = nullptr;
  size_t bytes = 0;
};

constexpr int kMaxRegions = 4096;
inline GuardedRegion g_regions[kMaxRegions];  // read by the signal handler: a fixed array, no allocation

inline size_t page_size() {
  static const size_t page = size_t(sysconf(_SC_PAGESIZE));
  return page;
}

void install_fault_handler();

// `bytes` of memory aligned to `align` (a power of two dividing bytes when the mode is `after`).
inline void* guarded_alloc(size_t bytes, size_t align) {
  if (guard_mode() == GuardMode::off) return ::operator new(bytes == 0 ? 1 : bytes);
  install_fault_handler();
  const size_t page = page_size(), data_pages = (bytes + page - 1) / page + (bytes == 0);
  const size_t len = (data_pages + 2) * page;
  void* m = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) throw std::bad_alloc();
  char* map = static_cast<char*>(m);
  mprotect(map, page, PROT_NONE);
  mprotect(map + len - page, page, PROT_NONE);
  char* data = guard_mode() == GuardMode::before ? map + page : map + len - page - bytes;
  if (reinterpret_cast<uintptr_t>(data) % align != 0) {
    std::fprintf(stderr, "emu: a guarded buffer of %zu bytes cannot end at a page and be %zu-byte aligned\n", bytes,
                 align);
    std::abort();
  }
  for (auto& r : g_regions)
    if (r.map == nullptr) {
      r = GuardedRegion{map, len, data, bytes};
      return data;
    }
  std::fprintf(stderr, "emu: more than %d guarded buffers alive\n", kMaxRegions);
  std::abort();
}

inline void guarded_free(void* p) {
  if (guard_mode() == GuardMode::off) return ::operator delete(p);
  for (auto& r : g_regions)
    if (r.data == p && r.map != nullptr) {
      munmap(r.map, r.map_len);
      r = GuardedRegion{};
      return;
    }
}

template <typename T>
struct GuardedAllocator {
  using value_type = T;
  GuardedAllocator() = default;
  template <typename U>
  GuardedAllocator(const GuardedAllocator<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(guarded_alloc(n * sizeof(T), alignof(T))); }
  void deallocate(T* p, size_t) { guarded_free(p); }
  template <typename U>
  bool operator==(const GuardedAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const GuardedAllocator<U>&) const { return false; }
};

inline void on_fault(int sig, siginfo_t* info, void*) {
  const char* addr = static_cast<const char*>(info->si_addr);
  char where[512], msg[1024];
  describe_running_kernel(where, sizeof(where));
  const char* what = "outside every guarded buffer";
  long long dist = 0;
  size_t bytes = 0;
  for (const auto& r : g_regions) {
    if (r.map == nullptr || addr < r.map || addr >= r.map + r.map_len) continue;
    bytes = r.bytes;
    if (addr >= r.data + r.bytes) {
      what = "past the end of";
      dist = addr - (r.data + r.bytes);
    } else if (addr < r.data) {
      what = "before the start of";
      dist = r.data - addr;
    }
    break;
  }
  const int n = std::snprintf(msg, sizeof(msg),
                              "emu: out-of-bounds access (signal %d) at %p: %lld bytes %s a guarded buffer of %zu bytes "
                              "(EMU_GUARD=%s), %s\n",
                              sig, info->si_addr, dist, what, bytes,
                              guard_mode() == GuardMode::before ? "before" : "after", where);
  if (n > 0) (void)!write(2, msg, size_t(n < int(sizeof(msg)) ? n : int(sizeof(msg)) - 1));
  signal(sig, SIG_DFL);  // returning re-runs the access: the default action ends the process with this signal
}

inline void install_fault_handler() {
  static bool done = false;
  if (done) return;
  done = true;
  static std::vector<char> alt(1 << 16);  // the fibers' stacks are small: the handler runs on its own
  stack_t ss{};
  ss.ss_sp = alt.data();
  ss.ss_size = alt.size();
  sigaltstack(&ss, nullptr);
  struct sigaction sa {};
  sa.sa_sigaction = on_fault;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, nullptr);
  sigaction(SIGBUS, &sa, nullptr);
}

}  // namespace emu

// The vector type of the cases' buffers: guarded as EMU_GUARD says.
template <typename T>
using Buf = std::vector<T, emu::GuardedAllocator<T>>;
