// csrc/cuda/soft_embed.cu run emulated (cuda_emu.h) against an fp64 reference (dlmom.reference.soft_embed's
// definition) and its device error record; plus two checks of the emulator itself. Prints one line per case
// ("ok ..." or "FAIL ..."); exit status 1 when any case fails.
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "case_main.h"

template <typename W>
static void case_random(const char* name, int64_t B, int64_t k, int64_t V, int64_t D, int64_t w_stride, double scale,
                        unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int64_t> pick(0, V - 1);
  std::normal_distribution<float> normal;
  Buf<int64_t> ids(size_t(B * k));
  Buf<float> probs(size_t(B * k));
  Buf<W> weight(size_t(V * w_stride));
  for (auto& i : ids) i = pick(rng);
  for (auto& p : probs) p = std::fabs(normal(rng));
  for (auto& w : weight) w = dlmom::from_float<W>(normal(rng));
  Buf<W> out(size_t(B * D));
  Buf<int64_t> status(4, 0);
  const DType wt = std::is_same_v<W, float> ? DType::f32 : DType::bf16;
  dlmom::soft_embed_cuda(view(ids.data(), DType::i64, {B, k}), view(probs.data(), DType::f32, {B, k}),
                         view(weight.data(), wt, {V, D}, {w_stride, 1}), scale, view(out.data(), wt, {B, D}),
                         status.data(), nullptr);
  double worst = 0.0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t d = 0; d < D; ++d) {
      double want = 0.0;
      for (int64_t i = 0; i < k; ++i)
        want += double(probs[size_t(b * k + i)]) * double(dlmom::to_float(weight[size_t(ids[size_t(b * k + i)] * w_stride + d)]));
      want = double(dlmom::to_float(dlmom::from_float<W>(float(scale * want))));
      const double got = double(dlmom::to_float(out[size_t(b * D + d)]));
      const double tol = (std::is_same_v<W, float> ? 1e-5 : 1.6e-2) * (1.0 + std::fabs(want));
      worst = std::max(worst, std::fabs(got - want) / tol);
    }
  report(worst <= 1.0 && status[0] == 0,
         std::string("soft_embed ") + name + " B=" + std::to_string(B) + " k=" + std::to_string(k) + " D=" +
             std::to_string(D) + " (worst error / tolerance " + std::to_string(worst) + ")");
}

static void case_bad_id() {
  const int64_t B = 3, k = 4, V = 10, D = 5;
  Buf<int64_t> ids(size_t(B * k), 1);
  ids[size_t(2 * k + 3)] = 10;  // == V
  Buf<float> probs(size_t(B * k), 0.25f), weight(size_t(V * D), 1.0f), out(size_t(B * D));
  Buf<int64_t> status(4, 0);
  dlmom::soft_embed_cuda(view(ids.data(), DType::i64, {B, k}), view(probs.data(), DType::f32, {B, k}),
                         view(weight.data(), DType::f32, {V, D}), 1.0, view(out.data(), DType::f32, {B, D}),
                         status.data(), nullptr);
  report(status[0] == 1 && status[1] == 10 && status[2] == 10 && out[0] == 1.0f,
         "soft_embed records an id out of range (code 1, id 10, V 10) and computes the other rows");
}

static void case_redo_fp64() {
  // 3e38 * 0.75 + 3e38 * 0.75 overflows an fp32 sum but fits after the scale 0.5: the fp64 redo path.
  const int64_t k = 2, V = 2, D = 3;
  Buf<int64_t> ids = {0, 1};
  Buf<float> probs = {0.75f, 0.75f}, weight(static_cast<size_t>(V * D), 3e38f), out(static_cast<size_t>(D));
  Buf<int64_t> status(4, 0);
  dlmom::soft_embed_cuda(view(ids.data(), DType::i64, {1, k}), view(probs.data(), DType::f32, {1, k}),
                         view(weight.data(), DType::f32, {V, D}), 0.5, view(out.data(), DType::f32, {1, D}),
                         status.data(), nullptr);
  report(std::fabs(out[0] - 2.25e38f) < 1e32f && std::fabs(out[2] - 2.25e38f) < 1e32f,
         "soft_embed redoes an overflowing fp32 sum in fp64 (" + std::to_string(out[0]) + ")");
}

// ---- the emulator itself ----
__global__ void divergent_barrier(int* x) {
  if (threadIdx.x < 16) __syncthreads();  // a barrier half the block never reaches
  x[threadIdx.x] = 1;
}
__global__ void shuffle_sum(const int* in, int* out) {
  int v = in[threadIdx.x];
  for (int d = 16; d > 0; d >>= 1) v += __shfl_down_sync(0xffffffffu, v, d);
  __shared__ int s_warp[32];
  if ((threadIdx.x & 31) == 0) s_warp[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    int total = 0;
    for (unsigned w = 0; w < (blockDim.x + 31) / 32; ++w) total += s_warp[w];
    out[blockIdx.x] = total;
  }
}

static void case_emulator() {
  Buf<int> x(64, 0);
  std::string msg = "no error";
  try {
    ::emu::launch(dim3(1), dim3(64))([&] { divergent_barrier(x.data()); });
  } catch (const std::exception& e) {
    msg = e.what();
  }
  report(msg.find("barrier deadlock") != std::string::npos, "emulator reports a divergent __syncthreads: " + msg);
  Buf<int> in(256), out(2, 0);
  for (int i = 0; i < 256; ++i) in[size_t(i)] = i;
  ::emu::launch(dim3(2), dim3(256))([&] { shuffle_sum(in.data(), out.data()); });
  report(out[0] == 32640 && out[1] == 32640, "emulator's warp shuffles and shared memory sum 0..255 = " +
                                                 std::to_string(out[0]));
}

int main() {
  case_emulator();
  case_random<float>("f32", 3, 50, 1000, 300, 300, 1.0, 1);
  case_random<float>("f32 strided weight, scale 8", 2, 7, 100, 257, 300, 8.0, 2);
  case_random<dlmom::bf16>("bf16", 70, 3, 500, 64, 64, 1.0, 3);  // B > one column block's rows
  case_random<float>("f32 k > 256 (two packet tiles)", 2, 300, 2000, 33, 33, 1.0, 4);
  case_bad_id();
  case_redo_fp64();
  return failures ? 1 : 0;
}
