// topk_packet on the CPU: one pass over each row in chunks. Per chunk: its max (and a NaN flag), one
// rescale of the running sums, a vectorised exp loop for the entropy sums, and the candidate scan, which
// a chunk whose max does not beat the current k-th value skips entirely.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <type_traits>
#include <vector>

#include "../ops.h"
#include "../topk_packet.h"

namespace dlmom {
namespace {

using topk::OnlineSoftmax;
constexpr const char* kOp = "topk_packet";
// The hot loops must be inlined into each target clone below, or they run as baseline x86-64 code.
#define DLMOM_INLINE inline __attribute__((always_inline))
// 4 KiB of floats: stays in L1 between the max, exp and candidate loops over the chunk.
constexpr int64_t kChunk = 1024;
// Candidate test granularity inside a chunk: one vector compare-and-or per block, a scalar look only
// at the rare block holding a value above the k-th.
constexpr int64_t kBlock = 64;
// Rows are split into pieces (each at least kMinSegment long) until there are kItemsPerThread work items
// per thread, handed out dynamically: on a shared machine one slow thread then holds back little.
constexpr int64_t kMinSegment = 16384;
constexpr int64_t kItemsPerThread = 4;
// Below this many logits in all, one thread does the work (thread start-up costs more).
constexpr int64_t kParallelMin = 1 << 15;

// The best k candidates seen so far as a binary min-heap of packed candidates: the root is the worst
// kept one, so "does x enter?" is one compare against the root's value.
struct TopK {
  uint64_t* heap;
  int64_t k;
  int64_t n = 0;

  bool full() const { return n == k; }
  float threshold() const { return topk::cand_value(heap[0]); }

  void push(uint64_t c) {  // while not full
    int64_t i = n++;
    while (i > 0) {
      const int64_t parent = (i - 1) / 2;
      if (heap[parent] <= c) break;
      heap[i] = heap[parent];
      i = parent;
    }
    heap[i] = c;
  }
  void replace_root(uint64_t c) {  // when full and c beats the root
    int64_t i = 0;
    for (;;) {
      int64_t child = 2 * i + 1;
      if (child >= n) break;
      if (child + 1 < n && heap[child + 1] < heap[child]) ++child;
      if (c <= heap[child]) break;
      heap[i] = heap[child];
      i = child;
    }
    heap[i] = c;
  }
  // Candidates of x[0, len) with ids id0 + i, scanned in id order: a later equal value never beats a kept
  // one, so the test is a strict `>` against the k-th value.
  DLMOM_INLINE void scan(const float* x, int64_t len, int64_t id0) {
    int64_t i = 0;
    for (; i < len && !full(); ++i) push(topk::pack_cand(x[i], id0 + i));  // -inf and all, until k held
    float thr = full() ? threshold() : topk::kInf;
    // Fast path: a vectorised "does any of the next kBlock beat the k-th value?" rejects most blocks.
    for (; i < len; i += kBlock) {
      const int64_t n = std::min(kBlock, len - i);
      int any = 0;
#pragma omp simd reduction(| : any)
      for (int64_t j = 0; j < n; ++j) any |= x[i + j] > thr;  // NaN never enters; its row is bad anyway
      if (!any) continue;
      for (int64_t j = 0; j < n; ++j) {
        if (x[i + j] > thr) {
          replace_root(topk::pack_cand(x[i + j], id0 + i + j));
          thr = threshold();
        }
      }
    }
  }
};

// Max and NaN flag of a chunk. NaN is flagged explicitly: max() would silently skip it.
DLMOM_INLINE float chunk_max(const float* x, int64_t n, int& has_nan) {
  float m = -topk::kInf;
  int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
  for (int64_t i = 0; i < n; ++i) {
    m = x[i] > m ? x[i] : m;
    nan |= x[i] != x[i];
  }
  has_nan = nan;
  return m;
}

// One chunk: fold it into the online state and the candidates.
DLMOM_INLINE void fold_chunk(const float* x, int64_t n, int64_t id0, OnlineSoftmax& st, TopK& top) {
  int has_nan = 0;
  const float cm = chunk_max(x, n, has_nan);
  if (has_nan || cm == topk::kInf) st.bad = 1;
  if (!st.bad && cm > -topk::kInf) {  // an all -inf chunk adds nothing to the sums
    if (cm > st.m) topk::online_rescale(st, cm);
    const float m = st.m;
    float s = 0.0f, t = 0.0f;
#pragma omp simd reduction(+ : s, t)
    for (int64_t i = 0; i < n; ++i) topk::online_add(x[i] - m, s, t);
    st.s += s;
    st.t += t;
  }
  if (!top.full() || cm > top.threshold()) top.scan(x, n, id0);
}

// fp16 -> fp32 without branches (common.h's to_float has some), so the conversion loop vectorises. Exact,
// like to_float: normals rebias the exponent, inf/nan get the top exponent, subnormals and zero are
// renormalised by one float subtraction.
DLMOM_INLINE float half_to_float(uint16_t h) {
  const uint32_t em = uint32_t(h & 0x7fffu) << 13;  // exponent and mantissa in their fp32 places
  const uint32_t exp = em & (0x1fu << 23);
  uint32_t u = em + ((127u - 15u) << 23);
  u = exp == (0x1fu << 23) ? u + ((128u - 16u) << 23) : u;
  float f = bits_float(exp == 0 ? u + (1u << 23) : u);
  f = exp == 0 ? f - bits_float(113u << 23) : f;
  return bits_float(float_bits(f) | (uint32_t(h & 0x8000u) << 16));
}
DLMOM_INLINE float load_float(float x) { return x; }
DLMOM_INLINE float load_float(bf16 x) { return to_float(x); }
DLMOM_INLINE float load_float(f16 x) { return half_to_float(x.bits); }

// x[begin, end) of one row into st and top. Converted chunks of fp16/bf16 go through a float buffer.
template <typename T>
DLMOM_INLINE void scan_segment_impl(const T* x, int64_t begin, int64_t end, OnlineSoftmax& st, TopK& top) {
  alignas(64) float buf[kChunk];
  for (int64_t c = begin; c < end; c += kChunk) {
    const int64_t n = std::min(kChunk, end - c);
    const float* xf;
    if constexpr (std::is_same_v<T, float>) {
      xf = x + c;
    } else {
      for (int64_t i = 0; i < n; ++i) buf[i] = load_float(x[c + i]);
      xf = buf;
    }
    fold_chunk(xf, n, c, st, top);
  }
}

// One entry point per dtype, cloned for AVX-512 / AVX2 / baseline x86-64 and picked at load time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DLMOM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DLMOM_CLONES
#endif
DLMOM_CLONES void scan_segment(const float* x, int64_t b, int64_t e, OnlineSoftmax& st, TopK& top) {
  scan_segment_impl(x, b, e, st, top);
}
DLMOM_CLONES void scan_segment(const f16* x, int64_t b, int64_t e, OnlineSoftmax& st, TopK& top) {
  scan_segment_impl(x, b, e, st, top);
}
DLMOM_CLONES void scan_segment(const bf16* x, int64_t b, int64_t e, OnlineSoftmax& st, TopK& top) {
  scan_segment_impl(x, b, e, st, top);
}

// Writes one row of the packet from its candidates (n == k for any row with at least k logits).
void finish_row(uint64_t* cands, int64_t n, int64_t k, const OnlineSoftmax& st, int64_t V, float temperature,
                float top_p, int64_t* ids, float* probs, float* entropy) {
  std::sort(cands, cands + n, std::greater<uint64_t>());
  for (int64_t j = 0; j < k; ++j) {
    const uint64_t c = j < n ? cands[j] : topk::kNoCand;
    ids[j] = j < n ? topk::cand_id(c) : 0;
    probs[j] = topk::cand_value(c);  // the logit, until packet_probs turns it into a probability
  }
  topk::packet_probs(probs, k, temperature, top_p, probs);
  *entropy = topk::entropy_normalised(st, V);
}

template <typename T>
void run(const View& logits, int64_t k, float temperature, float top_p, const View& ids, const View& probs,
         const View& entropy) {
  const int64_t B = logits.size[0], V = logits.size[1];
  const T* x = static_cast<const T*>(logits.data);
  int64_t* ids_p = static_cast<int64_t*>(ids.data);
  float* probs_p = static_cast<float*>(probs.data);
  float* ent_p = static_cast<float*>(entropy.data);
  const int64_t xs = logits.stride[0], is = ids.stride[0], ps = probs.stride[0], es = entropy.stride[0];
  const bool parallel = B * V >= kParallelMin;
  const int nthreads = parallel ? omp_get_max_threads() : 1;

  // Few long rows: split each row into pieces and merge the pieces' states and candidates.
  int64_t nseg = 1;
  const int64_t want_items = kItemsPerThread * nthreads;
  if (nthreads > 1 && B < want_items)
    nseg = std::max<int64_t>(1, std::min<int64_t>((want_items + B - 1) / B, V / kMinSegment));

  if (nseg == 1) {
    std::vector<uint64_t> heaps(size_t(nthreads) * size_t(k));  // one heap per thread, reused over rows
#pragma omp parallel num_threads(nthreads) if (parallel)
    {
      uint64_t* heap = heaps.data() + size_t(omp_get_thread_num()) * size_t(k);
#pragma omp for schedule(dynamic, 1)
      for (int64_t b = 0; b < B; ++b) {
        OnlineSoftmax st = topk::online_empty();
        TopK top{heap, k};
        scan_segment(x + b * xs, 0, V, st, top);
        finish_row(heap, top.n, k, st, V, temperature, top_p, ids_p + b * is, probs_p + b * ps,
                   ent_p + b * es);
      }
    }
    return;
  }

  const int64_t items = B * nseg, seg_len = (V + nseg - 1) / nseg;
  std::vector<uint64_t> heaps(size_t(items) * size_t(k));  // [B, nseg, k]
  std::vector<int64_t> counts(items);
  std::vector<OnlineSoftmax> states(items);
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
  for (int64_t item = 0; item < items; ++item) {
    const int64_t b = item / nseg, s = item % nseg;
    const int64_t begin = s * seg_len, end = std::min(V, begin + seg_len);
    OnlineSoftmax st = topk::online_empty();
    TopK top{heaps.data() + item * k, k};
    scan_segment(x + b * xs, begin, end, st, top);
    states[item] = st;
    counts[item] = top.n;
  }
  for (int64_t b = 0; b < B; ++b) {  // B is small here: cheap
    OnlineSoftmax st = topk::online_empty();
    uint64_t* all = heaps.data() + b * nseg * k;
    int64_t n = 0;
    for (int64_t s = 0; s < nseg; ++s) {
      st = topk::online_merge(st, states[b * nseg + s]);
      const uint64_t* part = heaps.data() + (b * nseg + s) * k;
      n = std::copy(part, part + counts[b * nseg + s], all + n) - all;  // compact: a piece may hold < k
    }
    // The best k of all pieces' candidates; finish_row sorts them.
    if (n > k) std::nth_element(all, all + (k - 1), all + n, std::greater<uint64_t>());
    finish_row(all, std::min(n, k), k, st, V, temperature, top_p, ids_p + b * is, probs_p + b * ps,
               ent_p + b * es);
  }
}

}  // namespace

void topk_packet_cpu(const View& logits, int64_t k, float temperature, float top_p, const View& ids,
                     const View& probs, const View& entropy) {
  topk::check_args(logits, k, temperature, top_p, ids, probs, entropy);
  if (logits.size[0] == 0) return;
  DLMOM_DISPATCH_FLOAT(logits.dtype, T, kOp, run<T>(logits, k, temperature, top_p, ids, probs, entropy));
  // The single pass flags a row with NaN, +inf or no finite logit by a NaN entropy.
  const float* ent = static_cast<const float*>(entropy.data);
  for (int64_t b = 0; b < logits.size[0]; ++b)
    DLMOM_CHECK(!std::isnan(ent[b * entropy.stride[0]]), kOp, "logits must be finite or -inf with at least one "
                "finite value per row; row ", b, " holds NaN, +inf or only -inf");
}

}  // namespace dlmom
