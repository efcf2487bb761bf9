// soft_embed on the CPU: rows of the batch (and column tiles) in parallel; an fp32 accumulator tile stays
// in L1 while the k embedding rows stream through it sequentially (a tile with extreme sums is redone in fp64,
// see soft_embed.h).

// Before any include, so it covers the shared header too: GCC will not if-convert (and so not vectorise) a
// select whose arm could raise a floating-point exception; nothing here reads the FP exception flags.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#include "../ops.h"
#include "../soft_embed.h"

namespace dlmom {
namespace {

constexpr const char* kOp = "soft_embed";
#define DLMOM_INLINE inline __attribute__((always_inline))  // into each target clone, with its ISA

// acc[0, n) = sum_i probs[i] * weight[ids[i], d0 + d], the k rows of one batch row streamed through the tile.
template <typename Acc, typename W, typename P, typename I>
DLMOM_INLINE void accumulate_tile(Acc* acc, const I* row_ids, const P* row_probs, const W* weight, int64_t w_s0,
                                  int64_t k, int64_t d0, int64_t n) {
  constexpr int64_t kLine = 64 / int64_t(sizeof(W));  // elements per cache line
  constexpr int64_t kChunk = 4 * kLine;              // elements per prefetch step
  for (int64_t d = 0; d < n; ++d) acc[d] = Acc(0);
  for (int64_t i = 0; i < k; ++i) {
    const W* row = weight + load_id(row_ids, i) * w_s0 + d0;
    // Rows are scattered over the whole matrix: fetch the next one while this one streams through.
    const W* next = i + 1 < k ? weight + load_id(row_ids, i + 1) * w_s0 + d0 : row;
    const Acc w = Acc(to_float(row_probs[i]));
    for (int64_t c = 0; c < n; c += kChunk) {
      for (int64_t line = 0; line < kChunk; line += kLine) __builtin_prefetch(next + c + line, 0, 3);
      soft_embed_axpy(acc + c, row + c, w, (n - c < kChunk) ? n - c : kChunk);
    }
  }
}

// The tile again in fp64, for extreme sums (soft_embed.h; rare: out of the hot loop's way).
template <typename W, typename P, typename I>
__attribute__((noinline, cold)) void redo_tile(W* o, const I* row_ids, const P* row_probs, const W* weight,
                                              int64_t w_s0, int64_t k, int64_t d0, int64_t n, double scale) {
  double acc[kSoftEmbedTile];
  accumulate_tile(acc, row_ids, row_probs, weight, w_s0, k, d0, n);
  for (int64_t d = 0; d < n; ++d) o[d] = from_float<W>(float(scale * acc[d]));
}

template <typename W, typename P, typename I>
__attribute__((target_clones("arch=x86-64-v3", "default")))
void soft_embed_rows(const I* ids, int64_t ids_s0, const P* probs, int64_t probs_s0, const W* weight, int64_t w_s0,
                     W* out, int64_t out_s0, int64_t B, int64_t k, int64_t D, double scale) {
  const int64_t tiles = (D + kSoftEmbedTile - 1) / kSoftEmbedTile;
  const bool float_scale = soft_embed_float_scale(scale);
  const float scale_f = float(scale);
  // Parallel only when the work pays for waking the threads.
#pragma omp parallel for collapse(2) schedule(static) if (B * k * D > (1 << 17))
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t d0 = t * kSoftEmbedTile, n = (D - d0 < kSoftEmbedTile) ? D - d0 : kSoftEmbedTile;
      const I* row_ids = ids + b * ids_s0;
      const P* row_probs = probs + b * probs_s0;
      W* o = out + b * out_s0 + d0;
      float acc[kSoftEmbedTile];
      accumulate_tile(acc, row_ids, row_probs, weight, w_s0, k, d0, n);
      int redo = 0;
      if (float_scale) {  // two loops, so that each vectorises without a select between them
        for (int64_t d = 0; d < n; ++d) {
          const float v = soft_embed_scaled(acc[d], true, scale_f, scale);
          redo |= soft_embed_redo<W>(acc[d], v);
          o[d] = from_float<W>(v);
        }
      } else {
        for (int64_t d = 0; d < n; ++d) {
          const float v = soft_embed_scaled(acc[d], false, scale_f, scale);
          redo |= soft_embed_redo<W>(acc[d], v);
          o[d] = from_float<W>(v);
        }
      }
      if (__builtin_expect(redo, 0)) redo_tile(o, row_ids, row_probs, weight, w_s0, k, d0, n, scale);
    }
  }
}

template <typename I>
void check_ids(const View& ids, int64_t V) {
  // Before the parallel region: an exception must not cross an OpenMP boundary.
  for (int64_t b = 0; b < ids.size[0]; ++b) {
    const I* row = static_cast<const I*>(ids.data) + b * ids.stride[0];
    for (int64_t i = 0; i < ids.size[1]; ++i) {
      const int64_t id = load_id(row, i);
      DLMOM_CHECK(id >= 0 && id < V, kOp, "ids must be in [0, V=", V, "), got ", id, " at [", b, ", ", i, "]");
    }
  }
}

}  // namespace

void soft_embed_cpu(const View& ids, const View& probs, const View& weight, double scale, const View& out) {
  soft_embed_check(ids, probs, weight, out);
  const int64_t B = ids.size[0], k = ids.size[1], V = weight.size[0], D = weight.size[1];
  if (ids.dtype == DType::i32) check_ids<int32_t>(ids, V); else check_ids<int64_t>(ids, V);
  DLMOM_DISPATCH_FLOAT(weight.dtype, W, kOp, {
    DLMOM_DISPATCH_FLOAT(probs.dtype, P, kOp, {
      if (ids.dtype == DType::i32)
        soft_embed_rows(static_cast<const int32_t*>(ids.data), ids.stride[0], static_cast<const P*>(probs.data),
                        probs.stride[0], static_cast<const W*>(weight.data), weight.stride[0],
                        static_cast<W*>(out.data), out.stride[0], B, k, D, scale);
      else
        soft_embed_rows(static_cast<const int64_t*>(ids.data), ids.stride[0], static_cast<const P*>(probs.data),
                        probs.stride[0], static_cast<const W*>(weight.data), weight.stride[0],
                        static_cast<W*>(out.data), out.stride[0], B, k, D, scale);
    });
  });
}

}  // namespace dlmom
