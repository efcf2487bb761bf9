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

static std::vector<float> randn(int64_t n, unsigned seed, float scale = 2.f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<float> x(static_cast<size_t>(n));
  for (auto& v : x) v = scale * normal(rng);
  return x;
}

static double max_diff(const std::vector<float>& a, const std::vector<float>& b, double rtol) {
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(a[i]) && std::isnan(b[i])) continue;
    worst = std::max(worst, std::fabs(double(a[i]) - double(b[i])) / (1e-5 + rtol * std::fabs(double(b[i]))));
  }
  return worst;
}

// ---- ties_merge ----
static void ties_case(const std::string& name, int64_t E, int64_t B, int64_t V, int weights_dims, int elect,
                      float theta, unsigned seed) {
  std::vector<float> x = randn(E * B * V, seed);
  for (size_t i = 7; i < x.size(); i += 97) x[i] = -INFINITY;  // masked logits
  std::vector<float> w = randn(weights_dims == 2 ? E * B : E, seed + 1);
  for (auto& v : w) v = std::fabs(v);
  const View wv = weights_dims == 0 ? none() : weights_dims == 1 ? view(w.data(), DType::f32, {E})
                                                                  : view(w.data(), DType::f32, {E, B});
  std::vector<float> m_gpu(size_t(E * B)), m_cpu(size_t(E * B)), o_gpu(size_t(B * V)), o_cpu(size_t(B * V));
  std::vector<int64_t> status(4, 0);
  const View xv = view(x.data(), DType::f32, {E, B, V});
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
  std::vector<float> x = randn(E * B * V, 9), w = {1.f, -0.5f, 1.f}, m(size_t(E * B)), o(size_t(B * V));
  x[size_t((2 * B + 1) * V + 17)] = NAN;  // expert 2, row 1
  std::vector<int64_t> status(4, 0);
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
  std::vector<float> x = randn(R * L * C, seed);
  const int64_t nb = (L + 3) / 4, ng = (L + G - 1) / G;
  std::vector<uint8_t> c_gpu(size_t(R * nb * C)), c_cpu(c_gpu.size());
  std::vector<float> s_gpu(size_t(R * ng * C)), s_cpu(s_gpu.size()), z_gpu(s_gpu.size()), z_cpu(s_gpu.size());
  std::vector<int64_t> status(4, 0);
  const View xv = view(x.data(), DType::f32, {R, L, C});
  dlmom::kv_quant2_cuda(xv, G, view(c_gpu.data(), DType::u8, {R, nb, C}), view(s_gpu.data(), DType::f32, {R, ng, C}),
                        view(z_gpu.data(), DType::f32, {R, ng, C}), status.data(), nullptr);
  dlmom::kv_quant2_cpu(xv, G, view(c_cpu.data(), DType::u8, {R, nb, C}), view(s_cpu.data(), DType::f32, {R, ng, C}),
                       view(z_cpu.data(), DType::f32, {R, ng, C}));
  std::vector<float> d_gpu(x.size()), d_cpu(x.size());
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
  ties_errors();
  kv_case("G % 4 == 0", 2, 67, 64, 32, 4);
  kv_case("G = 6 (codes per byte pass)", 3, 29, 5, 6, 5);
  return failures ? 1 : 0;
}
