// topk_packet on CUDA. Each row is cut into segments of kSeg logits, one block each, so that even B = 1
// spreads over many SMs; the logits are read once.
//   1. topk_partial: a segment's online softmax state (per thread over its kItems logits, merged over the
//      block) and its best min(k, kSeg) candidates, sorted. Candidates: the k-th best of the threads'
//      own best values is a threshold that at least k logits reach, so only the few logits at or above
//      it are sorted; k above the thread count, or a filter that lets too many through (heavy ties),
//      sorts the whole segment instead.
//   2. topk_rank_merge (only when the segments' lists are too long for shared memory): every candidate
//      finds its final rank by binary search in the other sorted lists and writes itself if rank < k.
//   3. topk_finish: one block per row merges the states (entropy), the candidate lists (in shared memory,
//      unless step 2 did it), and turns the k logits into the packet's probabilities.
// Candidates are the packed uint64 of topk_packet.h: one integer compare orders (value desc, id asc).
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <cstdint>

#include "../ops.h"
#include "../topk_packet.h"
#include "cuda_common.cuh"

namespace dlmom {
namespace {

using topk::OnlineSoftmax;
constexpr const char* kOp = "topk_packet";

constexpr int kThreads = 512;            // topk_partial block
constexpr int kItems = 8;                // logits per thread: one 16-byte load of fp16/bf16, two of fp32
constexpr int kSeg = kThreads * kItems;  // logits per segment (block)
constexpr int kCandCap = 1024;           // filtered candidates sorted directly (else the whole segment)
constexpr int kFinishThreads = 1024;     // topk_finish block
constexpr int kMergeCap = 4096;          // candidates of a row merged in shared memory (32 KiB)
constexpr int kRankThreads = 256;        // topk_rank_merge block

struct MergeStates {
  __device__ OnlineSoftmax operator()(const OnlineSoftmax& a, const OnlineSoftmax& b) const {
    return topk::online_merge(a, b);
  }
};

__device__ __forceinline__ int next_pow2(int n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
}

// Bitonic sort, best (largest) first, of a[0, n) in shared memory, n a power of two. Every thread of
// the block must call it; it ends with a barrier.
__device__ void block_sort_desc(uint64_t* a, int n) {
  for (int size = 2; size <= n; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = threadIdx.x; i < n / 2; i += blockDim.x) {
        const int lo = 2 * i - (i & (stride - 1));  // the pair (lo, lo + stride) inside a run of `size`
        const int hi = lo + stride;
        const bool desc = (lo & size) == 0;  // alternate directions build bitonic runs; the last is desc
        const uint64_t x = a[lo], y = a[hi];
        if ((x < y) == desc) {
          a[lo] = y;
          a[hi] = x;
        }
      }
      __syncthreads();
    }
  }
}

// kItems consecutive logits starting at p (16-byte aligned) as floats.
__device__ __forceinline__ void load_items(const float* p, float (&v)[kItems]) {
  const float4 a = reinterpret_cast<const float4*>(p)[0];
  const float4 b = reinterpret_cast<const float4*>(p)[1];
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
template <typename T>  // f16 / bf16: 8 x 16 bits in one 16-byte load
__device__ __forceinline__ void load_items(const T* p, float (&v)[kItems]) {
  unpack_halves<T>(*reinterpret_cast<const uint4*>(p), v);
}

// grid: B * nsplit blocks, block (row, split) -> states[row, split] and cands[row, split, 0:kk], best first.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    topk_partial(const T* __restrict__ logits, int64_t row_stride, int V, int nsplit, int k, int kk,
                 OnlineSoftmax* __restrict__ states, uint64_t* __restrict__ cands) {
  using Reduce = cub::BlockReduce<OnlineSoftmax, kThreads>;
  __shared__ typename Reduce::TempStorage reduce_tmp;
  __shared__ uint64_t s_cand[kSeg];
  __shared__ uint64_t s_best[kThreads];
  __shared__ int s_count;

  const int64_t item = blockIdx.x;
  const int64_t row = item / nsplit;
  const int start = int(item % nsplit) * kSeg;
  const int len = min(kSeg, V - start);
  const T* x = logits + row * row_stride + start;  // [len]
  const int base = threadIdx.x * kItems;
  const int nvalid = max(0, min(kItems, len - base));

  float v[kItems];
  if (nvalid == kItems && (reinterpret_cast<uintptr_t>(x) & 15u) == 0) {
    load_items(x + base, v);
  } else {  // the segment's tail, or rows that are not 16-byte aligned (odd V, strided rows)
#pragma unroll
    for (int j = 0; j < kItems; ++j) v[j] = j < nvalid ? to_float(x[base + j]) : -topk::kInf;
  }

  // This thread's kItems logits are one chunk of the online softmax: max, then the sums against it.
  OnlineSoftmax st = topk::online_empty();
  float m = -topk::kInf;
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    if (j < nvalid) {
      st.bad |= v[j] != v[j];  // NaN: the max below would skip it
      m = v[j] > m ? v[j] : m;
    }
  }
  st.bad |= m == topk::kInf;
  if (!st.bad && m > -topk::kInf) {
    st.m = m;
#pragma unroll
    for (int j = 0; j < kItems; ++j)
      if (j < nvalid) topk::online_add(v[j] - m, st.s, st.t);
  }
  st = Reduce(reduce_tmp).Reduce(st, MergeStates());
  if (threadIdx.x == 0) states[item] = st;

  uint64_t c[kItems];
  uint64_t best = topk::kNoCand;
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    c[j] = j < nvalid ? topk::pack_cand(v[j], start + base + j) : topk::kNoCand;
    best = c[j] > best ? c[j] : best;
  }

  bool sorted = false;
  if (k <= kThreads) {
    s_best[threadIdx.x] = best;
    if (threadIdx.x == 0) s_count = 0;
    __syncthreads();
    block_sort_desc(s_best, kThreads);
    // The k best thread-bests are k logits >= thr, so the segment's best k are all >= thr. thr is
    // kNoCand when fewer than k threads hold a logit: then every logit passes.
    const uint64_t thr = s_best[k - 1];
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      if (c[j] != topk::kNoCand && c[j] >= thr) {
        const int pos = atomicAdd(&s_count, 1);
        if (pos < kCandCap) s_cand[pos] = c[j];
      }
    }
    __syncthreads();
    const int count = s_count;  // >= min(k, len)
    if (count <= kCandCap) {
      const int n = next_pow2(max(count, kk));
      for (int i = count + threadIdx.x; i < n; i += kThreads) s_cand[i] = topk::kNoCand;
      __syncthreads();
      block_sort_desc(s_cand, n);
      sorted = true;
    }
  }
  if (!sorted) {
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kItems; ++j) s_cand[base + j] = c[j];
    __syncthreads();
    block_sort_desc(s_cand, kSeg);
  }
  uint64_t* out = cands + item * kk;
  for (int i = threadIdx.x; i < kk; i += kThreads) out[i] = s_cand[i];
}

// grid: B * blocks_per_row blocks of kRankThreads; one thread per candidate of the row's nsplit lists.
// A real candidate's rank = its index in its own list + the entries of the other lists that beat it
// (candidates are distinct: ids differ), so the ranks below k fill ids/probs exactly once each.
__global__ void __launch_bounds__(kRankThreads)
    topk_rank_merge(const uint64_t* __restrict__ cands, int nsplit, int kk, int k, int64_t blocks_per_row,
                    int64_t* __restrict__ ids, int64_t ids_stride, float* __restrict__ probs,
                    int64_t probs_stride) {
  const int64_t row = blockIdx.x / blocks_per_row;
  const int64_t C = int64_t(nsplit) * kk;
  const int64_t i = (blockIdx.x % blocks_per_row) * kRankThreads + threadIdx.x;
  if (i >= C) return;
  const uint64_t* rc = cands + row * C;  // [nsplit, kk]
  const uint64_t x = rc[i];
  if (x == topk::kNoCand) return;
  const int own = int(i / kk);
  int64_t rank = i % kk;
  for (int l = 0; l < nsplit && rank < k; ++l) {
    if (l == own) continue;
    const uint64_t* list = rc + int64_t(l) * kk;
    int lo = 0, hi = kk;  // the entries that beat x are a prefix of the list
    while (lo < hi) {
      const int mid = (lo + hi) >> 1;
      if (list[mid] > x) lo = mid + 1;
      else hi = mid;
    }
    rank += lo;
  }
  if (rank < k) {
    ids[row * ids_stride + rank] = topk::cand_id(x);
    probs[row * probs_stride + rank] = topk::cand_value(x);  // the logit; topk_finish makes it a prob
  }
}

// grid: B blocks. Entropy from the segments' states, the row's best k candidates (unless topk_rank_merge
// already wrote them, as logits into probs), then softmax / temperature, top-p and renormalisation as
// topk::packet_probs does, with block reductions and a tiled block scan.
__global__ void __launch_bounds__(kFinishThreads)
    topk_finish(const OnlineSoftmax* __restrict__ states, const uint64_t* __restrict__ cands, int nsplit,
                int kk, int k, int V, float temperature, float top_p, bool merged, int64_t* __restrict__ ids,
                int64_t ids_stride, float* __restrict__ probs, int64_t probs_stride,
                float* __restrict__ entropy, int64_t entropy_stride, int64_t* status) {
  using StateReduce = cub::BlockReduce<OnlineSoftmax, kFinishThreads>;
  // The sums over the k entries run in double, as topk::packet_probs on the CPU: with float sums the mass
  // before an entry drifts, and at exact ties (k equal probabilities, top_p * k a whole number) the kernel
  // kept one entry more than the CPU. Double partial sums of equal floats are exact in any order, so the
  // block's tree order gives the CPU's serial result there (elsewhere it differs by double rounding only).
  using SumReduce = cub::BlockReduce<double, kFinishThreads>;
  using Scan = cub::BlockScan<double, kFinishThreads>;
  __shared__ union {
    typename StateReduce::TempStorage state;
    typename SumReduce::TempStorage sum;
    typename Scan::TempStorage scan;
  } tmp;
  __shared__ uint64_t s_cand[kMergeCap];
  __shared__ double s_total;

  const int64_t row = blockIdx.x;
  const int tid = threadIdx.x;
  int64_t* row_ids = ids + row * ids_stride;  // [k]
  float* row_p = probs + row * probs_stride;   // [k]

  OnlineSoftmax st = topk::online_empty();
  for (int i = tid; i < nsplit; i += kFinishThreads) st = topk::online_merge(st, states[row * nsplit + i]);
  st = StateReduce(tmp.state).Reduce(st, MergeStates());
  if (tid == 0) {
    const float h = topk::entropy_normalised(st, V);
    entropy[row * entropy_stride] = h;
    if (isnan(h)) flag_error(status, kTopkRow, row);  // NaN, +inf or no finite logit in the row
  }
  __syncthreads();

  if (!merged) {  // nsplit * kk <= kMergeCap
    const int C = nsplit * kk, n = next_pow2(C);
    const uint64_t* rc = cands + row * C;
    for (int i = tid; i < n; i += kFinishThreads) s_cand[i] = i < C ? rc[i] : topk::kNoCand;
    __syncthreads();
    block_sort_desc(s_cand, n);
    for (int j = tid; j < k; j += kFinishThreads) {
      row_ids[j] = topk::cand_id(s_cand[j]);
      row_p[j] = topk::cand_value(s_cand[j]);
    }
    __syncthreads();
  }

  if (temperature == 0.0f) {
    for (int j = tid; j < k; j += kFinishThreads) row_p[j] = j == 0 ? 1.0f : 0.0f;
    return;
  }
  // Each thread owns entries j = tid + i * kFinishThreads in every loop below.
  const float m = row_p[0];  // the largest logit
  __syncthreads();  // all have read row_p[0] before it is overwritten
  double local = 0.0;
  for (int j = tid; j < k; j += kFinishThreads) {
    const float e = topk::tempered_exp(row_p[j], m, temperature);
    row_p[j] = e;
    local += e;
  }
  const double sum = SumReduce(tmp.sum).Sum(local);
  if (tid == 0) s_total = sum;
  __syncthreads();
  const float total = float(s_total);
  for (int j = tid; j < k; j += kFinishThreads) row_p[j] /= total;
  if (!(top_p < 1.0f)) return;
  __syncthreads();  // the scan reads other threads' entries

  double carry = 0.0, kept_local = 0.0;  // carry: the mass of the tiles before
  for (int tile = 0; tile < k; tile += kFinishThreads) {
    const int j = tile + tid;
    float p = j < k ? row_p[j] : 0.0f;
    double incl, tile_sum;
    Scan(tmp.scan).InclusiveSum(double(p), incl, tile_sum);
    __syncthreads();  // tmp is reused by the next tile
    const float before = float(carry + incl) - p;  // as packet_probs (and the reference): cumsum - probs
    if (j < k) {
      p = topk::topp_keep(before, top_p) ? p : 0.0f;
      row_p[j] = p;
      kept_local += p;
    }
    carry += tile_sum;
  }
  const double kept = SumReduce(tmp.sum).Sum(kept_local);
  if (tid == 0) s_total = kept;
  __syncthreads();
  const float kept_all = float(s_total);
  for (int j = tid; j < k; j += kFinishThreads) row_p[j] /= kept_all;
}

template <typename T>
void launch(const View& logits, int64_t k, float temperature, float top_p, const View& ids, const View& probs,
            const View& entropy, const View& workspace, int64_t* status, cudaStream_t stream) {
  const int64_t B = logits.size[0], V = logits.size[1];
  const int64_t nsplit = (V + kSeg - 1) / kSeg;
  const int64_t kk = std::min<int64_t>(k, kSeg);  // candidates kept per segment
  const int64_t items = B * nsplit, C = nsplit * kk;
  const bool merged = C > kMergeCap;
  const int64_t blocks_per_row = (C + kRankThreads - 1) / kRankThreads;
  DLMOM_CHECK(items <= INT32_MAX && B * blocks_per_row <= INT32_MAX, kOp, "logits [", B, ", ", V,
              "] are too large for one launch");

  auto* states = static_cast<OnlineSoftmax*>(workspace.data);  // [B, nsplit] (checked: large enough)
  auto* cands = reinterpret_cast<uint64_t*>(states + items);  // [B, nsplit, kk]
  auto* ids_p = static_cast<int64_t*>(ids.data);
  auto* probs_p = static_cast<float*>(probs.data);

  topk_partial<T><<<unsigned(items), kThreads, 0, stream>>>(
      static_cast<const T*>(logits.data), logits.stride[0], int(V), int(nsplit), int(k), int(kk), states,
      cands);
  check_launch(kOp);
  if (merged) {
    topk_rank_merge<<<unsigned(B * blocks_per_row), kRankThreads, 0, stream>>>(
        cands, int(nsplit), int(kk), int(k), blocks_per_row, ids_p, ids.stride[0], probs_p, probs.stride[0]);
    check_launch(kOp);
  }
  topk_finish<<<unsigned(B), kFinishThreads, 0, stream>>>(
      states, cands, int(nsplit), int(kk), int(k), int(V), temperature, top_p, merged, ids_p, ids.stride[0],
      probs_p, probs.stride[0], static_cast<float*>(entropy.data), entropy.stride[0], status);
  check_launch(kOp);
}

// Bytes of the scratch for the segments' states and candidate lists: [B, nsplit] states, then
// [B, nsplit, min(k, kSeg)] candidates.
int64_t workspace_bytes(int64_t B, int64_t V, int64_t k) {
  const int64_t nsplit = (std::max<int64_t>(V, 0) + kSeg - 1) / kSeg;
  const int64_t kk = std::min<int64_t>(std::max<int64_t>(k, 0), kSeg);
  return std::max<int64_t>(B, 0) * nsplit * (int64_t(sizeof(OnlineSoftmax)) + kk * int64_t(sizeof(uint64_t)));
}

}  // namespace

int64_t topk_packet_cuda_workspace_bytes(int64_t B, int64_t V, int64_t k) { return workspace_bytes(B, V, k); }

void topk_packet_cuda(const View& logits, int64_t k, float temperature, float top_p, const View& ids,
                      const View& probs, const View& entropy, const View& workspace, int64_t* status,
                      void* stream) {
  topk::check_args(logits, k, temperature, top_p, ids, probs, entropy);
  // The scratch comes from the caller (dlmom.ops takes it from torch's caching allocator, so it shows in
  // torch.cuda.memory_* and is reused stream-ordered), as uint8 [>= topk_workspace_bytes(B, V, k)].
  DLMOM_CHECK(workspace.ndim != 0 || workspace.data != nullptr, kOp, "workspace is required on CUDA: a uint8 "
              "tensor of topk_workspace_bytes(B, V, k) bytes on the logits' device (dlmom.ops passes one)");
  check_view(workspace, kOp, "workspace", 1);
  check_dtype(workspace, DType::u8, kOp, "workspace");
  const int64_t need = workspace_bytes(logits.size[0], logits.size[1], k);
  DLMOM_CHECK(workspace.size[0] >= need, kOp, "workspace must hold at least ", need, " bytes, got ",
              workspace.size[0]);
  DLMOM_CHECK(need == 0 || (reinterpret_cast<uintptr_t>(workspace.data) & 15u) == 0, kOp,
              "workspace must be 16-byte aligned");
  check_disjoint(workspace, "workspace", logits, "logits", kOp);
  check_disjoint(workspace, "workspace", ids, "ids", kOp);
  check_disjoint(workspace, "workspace", probs, "probs", kOp);
  check_disjoint(workspace, "workspace", entropy, "entropy", kOp);
  if (logits.size[0] == 0) return;
  DLMOM_DISPATCH_FLOAT(logits.dtype, T, kOp,
                       launch<T>(logits, k, temperature, top_p, ids, probs, entropy, workspace, status,
                                 as_stream(stream)));
}

}  // namespace dlmom
