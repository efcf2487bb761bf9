// CPU kernel of ties_merge: pass 1 the row means, pass 2 the merge over [B, V] with the E-loop inside,
// both in one OpenMP region. The math is csrc/ties_merge.h, shared with the CUDA kernel.

// Before any include, so it covers the shared header too. GCC will not if-convert (and so not vectorise)
// a select whose arm could raise a floating-point exception; nothing here reads the FP exception flags.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
// No fma: the merge must round every product as the reference does (ties_merge.h: mul_rn).
#pragma GCC optimize("fp-contract=off")
#endif
#if defined(__clang__)
#pragma clang fp contract(off)
#endif

#include <algorithm>
#include <charconv>
#include <cstdio>
#include <string>
#include <vector>

#include "../ops.h"
#include "../ties_merge.h"

// Portable build (no -march=native): the hot loops are cloned for AVX-512 and AVX2 and picked at load time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TIES_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TIES_CLONES
#endif

namespace dlmom {
namespace {

// Work items are chunks of a row, so that B = 1 still feeds every core. Pass 1: 16K tokens keep the
// partial sums few; pass 2: the E row pieces of a 4K-token chunk (E x 16 KiB in fp32) sit in L2.
constexpr int64_t kSumChunk = 16384;
constexpr int64_t kMergeChunk = 4096;
// Below this many logits one thread is faster than waking the team.
constexpr int64_t kParallelMin = 1 << 16;

// Same values as to_float, but for f16 without branches: common.h's version stops the vectoriser.
inline float load(float x) { return x; }
inline float load(bf16 x) { return to_float(x); }
inline float load(f16 x) {
  const uint32_t sign = uint32_t(x.bits & 0x8000u) << 16, em = x.bits & 0x7fffu;
  const float normal = bits_float((em << 13) + 0x38000000u);  // exponent bias 15 -> 127
  const float subnormal = float(em) * 5.9604644775390625e-8f;  // em < 0x400: em * 2^-24
  const float inf_nan = bits_float((em << 13) | 0x7f800000u);
  const float f = em < 0x400u ? subnormal : em >= 0x7c00u ? inf_nan : normal;
  return bits_float(float_bits(f) | sign);
}

struct Partial {
  float sum;
  int count;
  int bad;
};

template <typename T>
TIES_CLONES void sum_chunk(const T* x, int64_t n, Partial* p) {  // x [n]
  float sum = 0.f;
  int count = 0, bad = 0;
  // The simd reduction lets the compiler split the sum over lanes (plain code would keep it serial).
#pragma omp simd reduction(+ : sum, count) reduction(| : bad)
  for (int64_t j = 0; j < n; ++j) ties::row_add(load(x[j]), sum, count, bad);
  *p = {sum, count, bad};
}

// rows[e] points at token 0 of the chunk in expert e's row; mean, w [E]; out [n].
// kMass is a template argument because GCC cannot vectorise a select on a runtime scalar bool.
template <typename T, int kE, bool kMass>
TIES_CLONES void merge_chunk(const T* const* rows, int E, const float* mean, const float* w, float theta,
                             float* out, int64_t n) {
  if constexpr (kE > 0) {
    // Local copies: the compiler may keep them in registers and need not fear aliasing with out.
    const T* r[kE];
    float m[kE], wt[kE];
    for (int e = 0; e < kE; ++e) {
      r[e] = rows[e];
      m[e] = mean[e];
      wt[e] = w[e];
    }
    // ivdep, not omp simd: omp simd would turn the loader lambda (it captures j) into a per-lane array.
#pragma GCC ivdep
    for (int64_t j = 0; j < n; ++j)
      out[j] = ties::merge_token<kE>([&](int e) { return load(r[e][j]); }, kE, m, wt, theta, kMass);
  } else {
    for (int64_t j = 0; j < n; ++j)
      out[j] = ties::merge_token<0>([&](int e) { return load(rows[e][j]); }, E, mean, w, theta, kMass);
  }
}

template <typename T>
using MergeFn = void (*)(const T* const*, int, const float*, const float*, float, float*, int64_t);

// E is small (2-8 experts): those counts get unrolled kernels, more experts the generic loop.
template <typename T, bool kMass>
MergeFn<T> pick_merge(int64_t E) {
  switch (E) {
    case 1: return merge_chunk<T, 1, kMass>;
    case 2: return merge_chunk<T, 2, kMass>;
    case 3: return merge_chunk<T, 3, kMass>;
    case 4: return merge_chunk<T, 4, kMass>;
    case 5: return merge_chunk<T, 5, kMass>;
    case 6: return merge_chunk<T, 6, kMass>;
    case 7: return merge_chunk<T, 7, kMass>;
    case 8: return merge_chunk<T, 8, kMass>;
    default: return merge_chunk<T, 0, kMass>;
  }
}

// w [B, E]: the scaled weights of each row. Returns whether some row holds NaN, +inf or |x| > 2^96 (its mean is
// NaN; the merge is then skipped and the caller raises).
template <typename T>
bool run(const ties::Dims& d, const View& logits, const float* w, float theta, bool mass, const View& means,
         const View& out) {
  const int64_t E = d.E, B = d.B, V = d.V;
  const T* x = static_cast<const T*>(logits.data);  // [E, B, V], rows strided
  const int64_t sE = logits.stride[0], sB = logits.stride[1];
  float* mo = static_cast<float*>(means.data);  // [E, B]
  float* o = static_cast<float*>(out.data);     // [B, V]
  const int64_t n1 = (V + kSumChunk - 1) / kSumChunk, items1 = E * B * n1;
  const int64_t n2 = (V + kMergeChunk - 1) / kMergeChunk, items2 = B * n2;
  std::vector<Partial> part(items1);  // [E, B, n1]
  std::vector<float> mean(B * E);     // [B, E]: pass 2 reads the E means of one b together
  const MergeFn<T> merge = mass ? pick_merge<T, true>(E) : pick_merge<T, false>(E);
  bool any_bad = false;  // written in the single region, read after its barrier

  // Dynamic schedules: the items are large (a 4-16K token chunk each), and on a shared machine a thread
  // that is descheduled leaves its items to the others instead of stalling the team at the barrier.
#pragma omp parallel if (E * B * V >= kParallelMin)
  {
#pragma omp for schedule(dynamic)
    for (int64_t i = 0; i < items1; ++i) {
      const int64_t row = i / n1, j0 = (i % n1) * kSumChunk;
      const int64_t e = row / B, b = row % B;
      sum_chunk(x + e * sE + b * sB + j0, std::min(kSumChunk, V - j0), &part[i]);
    }
    // Combined in a fixed order, so the means do not depend on the thread count.
#pragma omp single
    for (int64_t row = 0; row < E * B; ++row) {
      float sum = 0.f;
      int64_t count = 0;
      bool bad = false;
      for (int64_t c = 0; c < n1; ++c) {
        const Partial& p = part[row * n1 + c];
        sum += p.sum;
        count += p.count;
        bad = bad || p.bad;
      }
      const int64_t e = row / B, b = row % B;
      const float m = ties::row_mean(sum, count, bad);
      mo[e * means.stride[0] + b * means.stride[1]] = m;
      mean[b * E + e] = m;
      any_bad = any_bad || bad;
    }
    std::vector<const T*> rows(E);
#pragma omp for schedule(dynamic)
    for (int64_t i = 0; i < (any_bad ? 0 : items2); ++i) {
      const int64_t b = i / n2, j0 = (i % n2) * kMergeChunk;
      for (int64_t e = 0; e < E; ++e) rows[e] = x + e * sE + b * sB + j0;
      merge(rows.data(), int(E), mean.data() + b * E, w + b * E, theta, o + b * out.stride[0] + j0,
            std::min(kMergeChunk, V - j0));
    }
  }
  return any_bad;
}

// The error for logits with NaN, +inf or a finite |x| > 2^96 (the error path: a pass of its own is fine).
template <typename T>
[[noreturn]] void raise_bad_logits(const ties::Dims& d, const View& logits) {
  const T* x = static_cast<const T*>(logits.data);
  float big = 0.f;
  for (int64_t e = 0; e < d.E; ++e)
    for (int64_t b = 0; b < d.B; ++b)
      for (int64_t j = 0; j < d.V; ++j) {
        const float v = load(x[e * logits.stride[0] + b * logits.stride[1] + j]);
        DLMOM_CHECK(!std::isnan(v) && v != ties::kInf, "ties_merge", "logits must be finite or -inf, got NaN or +inf");
        if (v != -ties::kInf) big = std::max(big, std::fabs(v));
      }
  char text[32];
  std::snprintf(text, sizeof text, "%.4g", double(big));  // as Python's f"{big:.4g}"
  fail("ties_merge", "logits must be -inf or finite with |x| <= 2^96 (about 7.9e28), got ", text);
}

// v as Python's repr(float) writes it: the shortest digits that round-trip, fixed notation for exponents in
// [-4, 16), else d.ddde+XX.
std::string py_float(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  char buf[64];
  const auto res = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::scientific);
  const std::string sci(buf, res.ptr);  // e.g. "-1.25e+02", "1e-05"
  const size_t epos = sci.find('e');
  const int exponent = std::stoi(sci.substr(epos + 1));
  const bool neg = sci[0] == '-';
  std::string digits;
  for (size_t i = neg ? 1 : 0; i < epos; ++i)
    if (sci[i] != '.') digits += sci[i];
  std::string text = neg ? "-" : "";
  if (exponent >= 16 || exponent < -4) {
    text += digits.substr(0, 1) + (digits.size() > 1 ? "." + digits.substr(1) : "");
    char e[8];
    std::snprintf(e, sizeof e, "e%c%02d", exponent < 0 ? '-' : '+', exponent < 0 ? -exponent : exponent);
    return text + e;
  }
  if (exponent < 0) return text + "0." + std::string(size_t(-exponent - 1), '0') + digits;
  if (digits.size() <= size_t(exponent) + 1) digits += std::string(size_t(exponent) + 1 - digits.size(), '0');
  const std::string frac = digits.substr(size_t(exponent) + 1);
  return text + digits.substr(0, size_t(exponent) + 1) + "." + (frac.empty() ? "0" : frac);
}

// The weights as Python's Tensor.tolist() prints them ([E] or nested [E, B]).
std::string weights_text(const View& w) {
  const float* p = static_cast<const float*>(w.data);
  std::string text = "[";
  for (int64_t e = 0; e < w.size[0]; ++e) {
    if (e) text += ", ";
    if (w.ndim == 1) {
      text += py_float(p[e * w.stride[0]]);
      continue;
    }
    text += "[";
    for (int64_t b = 0; b < w.size[1]; ++b) text += (b ? ", " : "") + py_float(p[e * w.stride[0] + b * w.stride[1]]);
    text += "]";
  }
  return text + "]";
}

}  // namespace

void ties_merge_cpu(const View& logits, const View& weights, float theta, int elect, const View& means,
                    const View& out) {
  const ties::Dims d = ties::check_args(logits, weights, theta, elect, means, out);
  // A NaN weight would silently poison the merge: every weight is checked, even with B == 0.
  const float* wp = d.has_weights ? static_cast<const float*>(weights.data) : nullptr;
  const int64_t wB = d.has_weights && weights.ndim == 2 ? d.B : 1;
  for (int64_t e = 0; e < (d.has_weights ? d.E : 0); ++e)
    for (int64_t b = 0; b < wB; ++b) {
      const float v = wp[e * d.wsE + b * d.wsB];
      DLMOM_CHECK(v >= 0.f && v < ties::kInf, "ties_merge", "weights must be finite and >= 0, got ",
                  weights_text(weights));
    }
  std::vector<float> w(size_t(d.B * d.E));  // [B, E]: the scaled weights of every row
  for (int64_t b = 0; b < d.B; ++b) ties::row_weights<0>(wp ? wp + b * d.wsB : nullptr, d.wsE, int(d.E), &w[b * d.E]);
  if (d.B == 0) return;
  bool bad = false;
  DLMOM_DISPATCH_FLOAT(logits.dtype, T, "ties_merge",
                       bad = run<T>(d, logits, w.data(), theta, elect == 1, means, out));
  if (bad) DLMOM_DISPATCH_FLOAT(logits.dtype, T, "ties_merge", raise_bad_logits<T>(d, logits));
}

}  // namespace dlmom
