// csrc/cuda/topk_packet.cu run emulated (cuda_emu.h) against the CPU kernel (csrc/cpu/topk_packet.cpp, linked in):
// the same ids, probs to 1e-6 (bit for bit at exact ties), entropy to 1e-5, and the device error record for a bad
// row. Covers the three kernels and their paths: filtered and whole-segment sorts, the shared-memory merge and
// the rank merge, one and several scan tiles. Prints one line per case; exit status 1 when any fails.
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "case_main.h"

struct Packet {
  Buf<int64_t> ids;
  Buf<float> probs, entropy;
  Buf<int64_t> status = Buf<int64_t>(4, 0);
  std::string error;
};

template <typename T>
// x holds the logits [B, V] from element `offset` on, rows `stride` apart (0: V, contiguous).
static Packet run(bool cuda, Buf<T>& x, int64_t B, int64_t V, int64_t k, float temperature, float top_p,
                  int64_t offset = 0, int64_t stride = 0) {
  Packet p;
  p.ids.assign(size_t(B * k), -1);
  p.probs.assign(size_t(B * k), -1.f);
  p.entropy.assign(size_t(B), -1.f);
  const DType dt = std::is_same_v<T, float> ? DType::f32 : std::is_same_v<T, dlmom::bf16> ? DType::bf16 : DType::f16;
  const View xv = view(x.data() + offset, dt, {B, V}, {stride ? stride : V, 1}), iv = view(p.ids.data(), DType::i64, {B, k}),
             pv = view(p.probs.data(), DType::f32, {B, k}), ev = view(p.entropy.data(), DType::f32, {B});
  try {
    if (cuda) {
      // The size rounded up to 16 bytes (torch's allocator hands out 512-byte blocks): a guarded buffer that
      // ends at a page is then 16-byte aligned, as the op requires.
      const int64_t bytes = (dlmom::topk_packet_cuda_workspace_bytes(B, V, k) + 15) / 16 * 16;
      Buf<unsigned char> ws(static_cast<size_t>(bytes));
      dlmom::topk_packet_cuda(xv, k, temperature, top_p, iv, pv, ev, view(ws.data(), DType::u8, {bytes}),
                              p.status.data(), nullptr);
    } else {
      dlmom::topk_packet_cpu(xv, k, temperature, top_p, iv, pv, ev);
    }
  } catch (const std::exception& e) {
    p.error = e.what();
  }
  return p;
}

template <typename T>
static void compare(const std::string& name, Buf<T> x, int64_t B, int64_t V, int64_t k, float temperature,
                    float top_p, bool exact = false, int64_t offset = 0, int64_t stride = 0) {
  const Packet g = run(true, x, B, V, k, temperature, top_p, offset, stride),
               c = run(false, x, B, V, k, temperature, top_p, offset, stride);
  bool ok = g.error.empty() && c.error.empty() && g.status[0] == 0 && g.ids == c.ids;
  double dp = 0, de = 0;
  for (size_t i = 0; i < g.probs.size(); ++i) dp = std::max(dp, double(std::fabs(g.probs[i] - c.probs[i])));
  for (size_t i = 0; i < g.entropy.size(); ++i) de = std::max(de, double(std::fabs(g.entropy[i] - c.entropy[i])));
  ok = ok && (exact ? dp == 0 : dp <= 1e-6) && de <= 1e-5;
  int kept = 0;
  for (int64_t j = 0; j < k; ++j) kept += g.probs[size_t(j)] > 0;
  report(ok, "topk " + name + " B=" + std::to_string(B) + " V=" + std::to_string(V) + " k=" + std::to_string(k) +
                 ": max |dprobs| " + std::to_string(dp) + ", |dentropy| " + std::to_string(de) + ", row 0 keeps " +
                 std::to_string(kept) + (g.error.empty() ? "" : " cuda error: " + g.error) +
                 (c.error.empty() ? "" : " cpu error: " + c.error) +
                 (g.status[0] ? " status " + std::to_string(g.status[0]) : ""));
}

static Buf<float> randn(int64_t n, unsigned seed, float scale = 3.f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  Buf<float> x(static_cast<size_t>(n));
  for (auto& v : x) v = scale * normal(rng);
  return x;
}
template <typename T>
static Buf<T> as(const Buf<float>& x) {
  Buf<T> y(x.size());
  for (size_t i = 0; i < x.size(); ++i) y[i] = dlmom::from_float<T>(x[i]);
  return y;
}

int main() {
  compare("random", randn(3 * 5000, 1), 3, 5000, 50, 0.7f, 0.9f);
  compare("random k=1", randn(2 * 5000, 2), 2, 5000, 1, 1.0f, 1.0f);
  compare("random bf16", as<dlmom::bf16>(randn(2 * 4999, 3)), 2, 4999, 50, 0.7f, 0.95f);
  compare("random fp16 short row", as<dlmom::f16>(randn(3 * 7, 4)), 3, 7, 7, 1.0f, 0.9f);
  compare("k=2049 (whole-segment sorts, 3 scan tiles)", randn(2 * 5000, 5), 2, 5000, 2049, 1.0f, 0.9f);
  compare("k=3000 (rank merge)", randn(1 * 20000, 6), 1, 20000, 3000, 1.0f, 0.9f);
  // Exact ties: 50 equal probabilities and top_p 0.8 keep 40 on the CPU (double sums); float sums kept 41.
  Buf<float> ties(static_cast<size_t>(2 * 1000), 0.f);
  for (size_t i = 0; i < ties.size(); i += 2) ties[i] = 1.f;
  compare("exact ties top_p 0.8", ties, 2, 1000, 50, 0.5f, 0.8f, /*exact=*/true);
  Buf<float> ties2(static_cast<size_t>(20000), 0.f);
  for (size_t i = 0; i < ties2.size(); i += 2) ties2[i] = 1.f;
  compare("exact ties k=3000 top_p 0.5 (rank merge, 3 tiles)", ties2, 1, 20000, 3000, 0.5f, 0.5f, true);
  // Finite logits more than FLT_MAX apart, in different thread items / segments: entropy 0, not NaN.
  Buf<float> ext = randn(3 * 9000, 7);
  ext[3] = -3e38f, ext[4500] = 3e38f;                 // row 0: different segments
  ext[9000 + 1] = -3e38f, ext[9000 + 17] = 3e38f;     // row 1: different threads of one segment
  ext[18000 + 0] = -3.4028235e38f, ext[18000 + 8999] = 3.4028235e38f;
  compare("finite logits beyond FLT_MAX apart", ext, 3, 9000, 8, 0.7f, 0.9f);
  // Rows that start off a 16-byte boundary (x[:, 1:] of [B, V + 1]: the host code passes such views as they are):
  // the segments take the scalar loads (a misaligned vector load aborts the emulation, as it faults on a GPU).
  // Rows start at 2, 4, 6, ... 14 and 0 bytes mod 16 for the halves, 4, 8, 12, 0 for fp32; two segments a row.
  compare("bf16 x[:, 1:] (unaligned rows)", as<dlmom::bf16>(randn(8 * 4201, 9)), 8, 4200, 50, 0.7f, 0.9f, false, 1,
          4201);
  compare("fp16 x[:, 1:] (unaligned rows)", as<dlmom::f16>(randn(8 * 4201, 10)), 8, 4200, 20, 1.0f, 0.95f, false, 1,
          4201);
  compare("fp32 x[:, 1:] (unaligned rows)", randn(4 * 4201, 11), 4, 4200, 20, 1.0f, 0.95f, false, 1, 4201);
  // A NaN row: recorded as (2, row) on the device; the CPU raises.
  Buf<float> bad = randn(3 * 300, 8);
  bad[2 * 300 + 5] = NAN;
  const Packet g = run(true, bad, 3, 300, 4, 1.f, 1.f);
  report(g.status[0] == 2 && g.status[1] == 2 && std::isnan(g.entropy[2]) && !std::isnan(g.entropy[0]),
         "topk records a NaN row as (code 2, row 2): status " + std::to_string(g.status[0]) + ", " +
             std::to_string(g.status[1]));
  return failures ? 1 : 0;
}
