// csrc/cuda/ties_merge.cu and csrc/cuda/kv_quant2.cu run emulated (cuda_emu.h) against the CPU kernels (linked in):
// ties_merge's means and merge to 1e-5 (the row sums add in another order), its device error records (NaN logit,
// bad weight); kv_quant2's codes, scale and zero exactly (the math is csrc/kv_quant2.h, shared) and kv_dequant2
// exactly. Prints one line per case; exit status 1 when any fails.
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "case_main.h"
static View none() { return View{}; }

static Buf<float> randn(int64_t n, unsigned seed, float scale = 2.f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  Buf<float> x(static_cast<size_t>(n));
  for (auto& v : x) v = scale * normal(rng);
  return x;
}

static double max_diff(const Buf<float>& a, const Buf<float>& b, double rtol) {
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(a[i]) && std::isnan(b[i])) continue;
    worst = std::max(worst, std::fabs(double(a[i]) - double(b[i])) / (1e-5 + rtol * std::fabs(double(b[i]))));
  }
  return worst;
}

// ---- ties_merge ----
// x [E, B, V] of T; with off > 0 the view x[..., off:] of [E, B, V + off] (rows that start off 16-byte boundaries).
template <typename T = float>
static void ties_case(const std::string& name, int64_t E, int64_t B, int64_t V, int weights_dims, int elect,
                      float theta, unsigned seed, int64_t off = 0) {
  const int64_t S = V + off;  // row stride
  const Buf<float> xf = randn(E * B * S, seed);
  Buf<T> x(xf.size());
  for (size_t i = 0; i < x.size(); ++i) x[i] = dlmom::from_float<T>(i % 97 == 7 ? -INFINITY : xf[i]);  // masked
  Buf<float> w = randn(weights_dims == 2 ? E * B : E, seed + 1);
  for (auto& v : w) v = std::fabs(v);
  const View wv = weights_dims == 0 ? none() : weights_dims == 1 ? view(w.data(), DType::f32, {E})
                                                                  : view(w.data(), DType::f32, {E, B});
  Buf<float> m_gpu(size_t(E * B)), m_cpu(size_t(E * B)), o_gpu(size_t(B * V)), o_cpu(size_t(B * V));
  Buf<int64_t> status(4, 0);
  const DType dt = std::is_same_v<T, float> ? DType::f32 : std::is_same_v<T, dlmom::bf16> ? DType::bf16 : DType::f16;
  const View xv = view(x.data() + off, dt, {E, B, V}, {B * S, S, 1});
  dlmom::ties_merge_cuda(xv, wv, theta, elect, view(m_gpu.data(), DType::f32, {E, B}),
                         view(o_gpu.data(), DType::f32, {B, V}), status.data(), nullptr);
  dlmom::ties_merge_cpu(xv, wv, theta, elect, view(m_cpu.data(), DType::f32, {E, B}),
                        view(o_cpu.data(), DType::f32, {B, V}));
  const double dm = max_diff(m_gpu, m_cpu, 1e-5), dout = max_diff(o_gpu, o_cpu, 1e-5);
  report(status[0] == 0 && dm <= 1 && dout <= 1,
         "ties_merge " + name + " E=" + std::to_string(E) + " B=" + std::to_string(B) + " V=" + std::to_string(V) +
             ": means / out error over tolerance " + std::to_string(dm) + " / " + std::to_string(dout));
}

static void ties_errors() {
  const int64_t E = 3, B = 2, V = 300;
  Buf<float> x = randn(E * B * V, 9), w = {1.f, -0.5f, 1.f}, m(size_t(E * B)), o(size_t(B * V));
  x[size_t((2 * B + 1) * V + 17)] = NAN;  // expert 2, row 1
  Buf<int64_t> status(4, 0);
  dlmom::ties_merge_cuda(view(x.data(), DType::f32, {E, B, V}), none(), 0.f, 0, view(m.data(), DType::f32, {E, B}),
                         view(o.data(), DType::f32, {B, V}), status.data(), nullptr);
  report(status[0] == 3 && status[1] == 2 && status[2] == 1 && status[3] == 1,
         "ties_merge records a NaN logit as (3, expert 2, row 1, 1): " + std::to_string(status[0]) + ", " +
             std::to_string(status[1]) + ", " + std::to_string(status[2]));
  x[size_t((2 * B + 1) * V + 17)] = 0.f;
  status.assign(4, 0);
  dlmom::ties_merge_cuda(view(x.data(), DType::f32, {E, B, V}), view(w.data(), DType::f32, {E}), 0.f, 0,
                         view(m.data(), DType::f32, {E, B}), view(o.data(), DType::f32, {B, V}), status.data(), nullptr);
  report(status[0] == 4 && status[1] == 1, "ties_merge records a negative weight as (4, expert 1, ...): " +
                                               std::to_string(status[0]) + ", " + std::to_string(status[1]));
  status.assign(4, 0);  // B == 0: no merge runs, the weights [E] are still checked (as on the CPU)
  dlmom::ties_merge_cuda(view(x.data(), DType::f32, {E, 0, V}), view(w.data(), DType::f32, {E}), 0.f, 0,
                         view(m.data(), DType::f32, {E, 0}), view(o.data(), DType::f32, {0, V}), status.data(), nullptr);
  report(status[0] == 4 && status[1] == 1, "ties_merge checks weights [E] when B == 0: " + std::to_string(status[0]));
}

// ---- kv_quant2 / kv_dequant2 ----
static void kv_case(const std::string& name, int64_t R, int64_t L, int64_t C, int64_t G, unsigned seed) {
  Buf<float> x = randn(R * L * C, seed);
  const int64_t nb = (L + 3) / 4, ng = (L + G - 1) / G;
  Buf<uint8_t> c_gpu(size_t(R * nb * C)), c_cpu(c_gpu.size());
  Buf<float> s_gpu(size_t(R * ng * C)), s_cpu(s_gpu.size()), z_gpu(s_gpu.size()), z_cpu(s_gpu.size());
  Buf<int64_t> status(4, 0);
  const View xv = view(x.data(), DType::f32, {R, L, C});
  dlmom::kv_quant2_cuda(xv, G, view(c_gpu.data(), DType::u8, {R, nb, C}), view(s_gpu.data(), DType::f32, {R, ng, C}),
                        view(z_gpu.data(), DType::f32, {R, ng, C}), status.data(), nullptr);
  dlmom::kv_quant2_cpu(xv, G, view(c_cpu.data(), DType::u8, {R, nb, C}), view(s_cpu.data(), DType::f32, {R, ng, C}),
                       view(z_cpu.data(), DType::f32, {R, ng, C}));
  Buf<float> d_gpu(x.size()), d_cpu(x.size());
  dlmom::kv_dequant2_cuda(view(c_cpu.data(), DType::u8, {R, nb, C}), view(s_cpu.data(), DType::f32, {R, ng, C}),
                          view(z_cpu.data(), DType::f32, {R, ng, C}), G, view(d_gpu.data(), DType::f32, {R, L, C}),
                          status.data(), nullptr);
  dlmom::kv_dequant2_cpu(view(c_cpu.data(), DType::u8, {R, nb, C}), view(s_cpu.data(), DType::f32, {R, ng, C}),
                         view(z_cpu.data(), DType::f32, {R, ng, C}), G, view(d_cpu.data(), DType::f32, {R, L, C}));
  report(status[0] == 0 && c_gpu == c_cpu && s_gpu == s_cpu && z_gpu == z_cpu && d_gpu == d_cpu,
         "kv_quant2 / kv_dequant2 " + name + " R=" + std::to_string(R) + " L=" + std::to_string(L) + " C=" +
             std::to_string(C) + " G=" + std::to_string(G) + ": codes, scale, zero and values identical to the CPU");
}

int main() {
  ties_case("vote, no weights", 3, 2, 5003, 0, 0, 0.5f, 1);
  ties_case("mass, weights [E, B]", 4, 3, 1000, 2, 1, 0.0f, 2);
  ties_case("E = 9 (generic kernel), weights [E]", 9, 2, 777, 1, 0, 0.3f, 3);
  // Unaligned rows (the host code passes x[..., 1:] as it is): scalar heads and tails around the 16-byte loads,
  // scalar loads for experts whose rows are aligned otherwise than expert 0's.
  ties_case<dlmom::bf16>("bf16 x[..., 1:] (unaligned rows)", 3, 3, 1001, 0, 0, 0.5f, 6, 1);
  ties_case<dlmom::f16>("fp16 x[..., 3:], E = 9 (generic kernel)", 9, 2, 300, 1, 1, 0.2f, 7, 3);
  ties_case<float>("fp32 x[..., 1:] (unaligned rows)", 2, 3, 1001, 2, 0, 0.0f, 8, 1);
  ties_errors();
  kv_case("G % 4 == 0", 2, 67, 64, 32, 4);
  kv_case("G = 6 (codes per byte pass)", 3, 29, 5, 6, 5);
  return failures ? 1 : 0;
}
