// CPU kernels of kv_quant2 / kv_dequant2 on the canonical [R, L, C] layout (groups of G along L).
//
// Work items are (row r, segment of L, block of columns): a segment is a multiple of 4 * G long, so no group and
// no byte of codes straddles two items, and items run in parallel with OpenMP. For C > 1 (axis=-2, KIVI's keys)
// the loops run along C, contiguous in memory, with the group's fp32 statistics in small arrays; for C == 1
// (axis=-1, KIVI's values) they run along L. The per-element math is in ../kv_quant2.h, shared with CUDA.

// Before any include, so it covers the shared header too. GCC will not if-convert (and so not vectorise) a
// select whose arm could raise a floating-point exception, as the overflow fallbacks of kv_quant2.h are;
// nothing here reads the FP exception flags.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../kv_quant2.h"
#include "../ops.h"

namespace dlmom {
namespace {

using kvq::ceil_div;

constexpr int64_t kColBlock = 64;          // columns per item: a group's stats stay in a few cache lines
constexpr int64_t kItemElems = 1 << 15;    // elements per item, about: amortises the scheduling
constexpr int64_t kParallelElems = 1 << 16;  // below this one thread is faster than waking the team

// Raw storage of a float dtype: what a lookup table of dequantised values holds and selects between.
template <typename T> using Raw = std::conditional_t<std::is_same_v<T, float>, float, uint16_t>;
template <typename T> inline Raw<T> raw(T v) {
  if constexpr (std::is_same_v<T, float>) return v; else return v.bits;
}

// x elements as fp32. Same values as common.h's to_float (the conversions are exact), but the fp16 one is
// branch-free so that the loops over x vectorise (the branchy one does not).
inline float load(float v) { return v; }
inline float load(bf16 v) { return to_float(v); }
inline float load(f16 v) {
  const uint32_t sign = uint32_t(v.bits & 0x8000u) << 16;
  const uint32_t em = uint32_t(v.bits & 0x7fffu) << 13;  // exponent and mantissa at their fp32 places
  const uint32_t exp = em & 0x0f800000u;
  const uint32_t normal = em + 0x38000000u;              // rebias the exponent: 127 - 15
  const uint32_t special = normal + 0x38000000u;         // inf / nan: exponent 255
  // subnormal or zero: (1.m * 2^-14) - 2^-14 = m * 2^-24, exactly
  const float sub = bits_float(normal + 0x00800000u) - bits_float(0x38800000u);
  const uint32_t is_special = 0u - uint32_t(exp == 0x0f800000u), is_sub = 0u - uint32_t(exp == 0);  // masks
  const uint32_t mag = (normal & ~(is_special | is_sub)) | (special & is_special) | (float_bits(sub) & is_sub);
  return bits_float(sign | mag);
}

// fp32 to the storage bits of TO, rounded to nearest even: the same bits as common.h's from_float (and torch's
// .to()), but the fp16 one is branch-free (the FP16 library's method, which c10::Half uses) so that it
// vectorises and does not mispredict on the rounding direction.
template <typename TO> inline Raw<TO> store_raw(float v) { return raw(from_float<TO>(v)); }
template <> inline uint16_t store_raw<f16>(float v) {
  const uint32_t w = float_bits(v), two_w = w + w, sign = w & 0x80000000u;
  // |v| * 2^112 * 2^-110: inf where v rounds to inf in fp16, |v| * 4 (exact) otherwise
  float base = (bits_float(two_w >> 1) * 0x1.0p+112f) * 0x1.0p-110f;
  uint32_t bias = two_w & 0xff000000u;
  const uint32_t small = 0u - uint32_t(bias < 0x71000000u);  // masks, not selects: they vectorise
  bias = (bias & ~small) | (0x71000000u & small);
  // adding 2^(e + 15 - 10) leaves fp16's 10 mantissa bits at the bottom, rounded to nearest even by the add
  base = bits_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x7c00u) + (bits & 0x0fffu);
  const uint32_t nan = 0u - uint32_t(two_w > 0xff000000u);  // nan stays nan
  return uint16_t((sign >> 16) | (0x7e00u & nan) | (nonsign & ~nan));
}

struct Split {
  int64_t seg = 1, nseg = 0, cb = 1, ncb = 0, items = 0;
};

Split split(int64_t R, int64_t L, int64_t C, int64_t G) {
  Split s;
  if (R == 0 || L == 0 || C == 0) return s;
  s.cb = C == 1 ? 1 : std::min(C, kColBlock);
  s.ncb = ceil_div(C, s.cb);
  if (G >= L) {
    s.seg = L;  // one group per row
  } else {
    const int64_t unit = 4 * G;  // a multiple of both G and 4
    s.seg = unit * std::max<int64_t>(1, kItemElems / (unit * s.cb));
  }
  s.nseg = ceil_div(L, s.seg);
  s.items = R * s.nseg * s.ncb;
  return s;
}

// [R, L, C] seen as [1, R * L, C] when that changes nothing: rows that hold whole groups and whole bytes
// (L % G == 0, L % 4 == 0) and follow each other in every tensor. axis=-1 rows are short (one head_dim),
// so the items, and the loops inside them, get longer.
struct Rows {
  int64_t R, L;
};
Rows merged_rows(const View& full, const View& codes, const View& scale, const View& zero, int64_t G) {
  const int64_t R = full.size[0], L = full.size[1], C = full.size[2];
  const bool whole = L % G == 0 && L % kvq::kCodesPerByte == 0;
  if (R > 1 && whole && full.stride[0] == L * C && codes.stride[0] == L / kvq::kCodesPerByte * C &&
      scale.stride[0] == L / G * C && zero.stride[0] == L / G * C)
    return {1, R * L};
  return {R, L};
}

struct Item {
  int64_t r, l0, l1, c0, nc;
};

Item item_at(const Split& s, int64_t it, int64_t L, int64_t C) {
  Item m;
  const int64_t cbk = it % s.ncb, t = it / s.ncb;
  m.r = t / s.nseg;
  m.l0 = (t % s.nseg) * s.seg;
  m.l1 = std::min(L, m.l0 + s.seg);
  m.c0 = cbk * s.cb;
  m.nc = std::min(s.cb, C - m.c0);
  return m;
}

// ---- quant ----

#define DLMOM_INLINE inline __attribute__((always_inline))  // into each target clone, with its ISA

// Min / max along the rows of v [rows, nc] (row stride ld) for each of the nc columns. chk[c] becomes NaN when
// the column holds NaN or inf (e - e is 0 for every finite e): the finiteness check rides on this pass.
template <typename TV>
DLMOM_INLINE void cols_minmax(const TV* v, int64_t ld, int64_t rows, int64_t nc, float* mn, float* mx, float* chk) {
  for (int64_t c = 0; c < nc; ++c) {
    mn[c] = mx[c] = load(v[c]);
    chk[c] = mn[c] - mn[c];
  }
  for (int64_t l = 1; l < rows; ++l) {
    const TV* vr = v + l * ld;
    for (int64_t c = 0; c < nc; ++c) {
      const float e = load(vr[c]);
      mn[c] = kvq::min2(mn[c], e);
      mx[c] = kvq::max2(mx[c], e);
      chk[c] += e - e;
    }
  }
}

// The codes of v [rows, nc] (rows l0 .. l0 + rows of L), OR-ed into acc, one byte per column, which goes to
// codes [ceil(L/4), ld_codes] when its four codes are in or L ends.
template <typename TV>
DLMOM_INLINE void cols_codes(const TV* v, int64_t ld, int64_t l0, int64_t rows, int64_t nc, int64_t L,
                             const float* s, const float* z, uint8_t* acc, uint8_t* codes, int64_t ld_codes) {
  for (int64_t i = 0; i < rows; ++i) {
    const TV* vr = v + i * ld;
    const int64_t l = l0 + i;
    const int k = int(l & 3);
    if (k == 0) {
      for (int64_t c = 0; c < nc; ++c) acc[c] = uint8_t(kvq::code_of(load(vr[c]), s[c], z[c]));
    } else {
      for (int64_t c = 0; c < nc; ++c)
        acc[c] = uint8_t(acc[c] | (kvq::code_of(load(vr[c]), s[c], z[c]) << (2 * k)));
    }
    if (k == 3 || l == L - 1) std::copy(acc, acc + nc, codes + (l >> 2) * ld_codes);  // codes past L stay 0
  }
}

// One row segment [l0, l1) x columns [c0, c0 + nc) of x [L, C] (C > 1): per group, min/max along L for every
// column, scale/zero, then the codes. fp16 / bf16 groups are converted once into an fp32 tile that both
// passes read.
template <typename TX, typename TS>
__attribute__((target_clones("avx2", "default")))
int quant_cols(const TX* x, uint8_t* codes, TS* scale, TS* zero, int64_t L, int64_t C, int64_t G, int64_t l0,
               int64_t l1, int64_t c0, int64_t nc) {
  constexpr int64_t kTileRows = 64;
  float mn[kColBlock], mx[kColBlock], s[kColBlock], z[kColBlock], chk[kColBlock];
  int bad = 0;
  uint8_t acc[kColBlock];
  float tile[std::is_same_v<TX, float> ? 1 : kTileRows * kColBlock];  // [rows, nc]
  for (int64_t g0 = l0; g0 < l1; g0 += G) {
    const int64_t g1 = std::min(l1, g0 + G), g = g0 / G, rows = g1 - g0;
    const TX* xg = x + g0 * C + c0;  // [rows, nc], row stride C
    const bool tiled = !std::is_same_v<TX, float> && rows <= kTileRows;
    if (tiled) {
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t c = 0; c < nc; ++c) tile[i * nc + c] = load(xg[i * C + c]);
      cols_minmax(tile, nc, rows, nc, mn, mx, chk);
    } else {
      cols_minmax(xg, C, rows, nc, mn, mx, chk);
    }
    for (int64_t c = 0; c < nc; ++c) bad |= chk[c] != 0.f;
    TS* sr = scale + g * C + c0;  // [nc]
    TS* zr = zero + g * C + c0;
    for (int64_t c = 0; c < nc; ++c) {
      TS sc, ze;
      kvq::scale_zero(mn[c], mx[c], sc, ze);
      sr[c] = sc;
      zr[c] = ze;
      s[c] = to_float(sc);  // the codes use the stored values, as the reference does
      z[c] = to_float(ze);
    }
    if (tiled)
      cols_codes(tile, nc, g0, rows, nc, L, s, z, acc, codes + c0, C);
    else
      cols_codes(xg, C, g0, rows, nc, L, s, z, acc, codes + c0, C);
  }
  return bad;
}

// One row segment [l0, l1) of x [L] (C == 1): per group a min / max reduction along L, the codes into buf (one
// per element), then four per byte.
template <typename TX, typename TS>
__attribute__((target_clones("avx2", "default")))
int quant_row(const TX* x, uint8_t* codes, TS* scale, TS* zero, int64_t G, int64_t l0, int64_t l1,
              uint8_t* buf) {
  int bad = 0;
  for (int64_t g0 = l0; g0 < l1; g0 += G) {
    const int64_t g1 = std::min(l1, g0 + G);
    float mn = load(x[g0]), mx = mn, chk = 0.f;  // chk: NaN when the group holds NaN or inf (cols_minmax)
    // omp simd: a min / max reduction vectorises only when its lanes may be combined in any order, which is
    // exact here (the group is finite; the order can only pick the sign of a zero).
#pragma omp simd reduction(min : mn) reduction(max : mx) reduction(+ : chk)
    for (int64_t l = g0; l < g1; ++l) {  // from g0 again: whole vectors when G is a multiple of 8
      const float v = load(x[l]);
      mn = kvq::min2(mn, v);
      mx = kvq::max2(mx, v);
      chk += v - v;
    }
    bad |= chk != 0.f;
    TS sc, ze;
    kvq::scale_zero(mn, mx, sc, ze);
    scale[g0 / G] = sc;
    zero[g0 / G] = ze;
    const float s = to_float(sc), z = to_float(ze);
    uint8_t* b = buf + (g0 - l0);
    for (int64_t i = 0; i < g1 - g0; ++i) b[i] = uint8_t(kvq::code_of(load(x[g0 + i]), s, z));
  }
  const int64_t n = l1 - l0, nb = ceil_div(n, 4);
  for (int64_t i = n; i < nb * 4; ++i) buf[i] = 0;  // codes past L are 0
  uint8_t* out = codes + l0 / 4;
  for (int64_t i = 0; i < nb; ++i) out[i] = kvq::pack4(buf[4 * i], buf[4 * i + 1], buf[4 * i + 2], buf[4 * i + 3]);
  return bad;
}

template <typename TX, typename TS>
bool quant(const View& x, int64_t G, const View& codes, const View& scale, const View& zero) {
  const auto [R, L] = merged_rows(x, codes, scale, zero, G);
  const int64_t C = x.size[2];
  const Split sp = split(R, L, C, G);
  const TX* xp = static_cast<const TX*>(x.data);
  uint8_t* cp = static_cast<uint8_t*>(codes.data);
  TS* sp_ = static_cast<TS*>(scale.data);
  TS* zp = static_cast<TS*>(zero.data);
  int bad = 0;  // some group holds NaN or inf
#pragma omp parallel if (R * L * C >= kParallelElems && sp.items > 1) reduction(| : bad)
  {
    std::vector<uint8_t> buf(C == 1 ? size_t(sp.seg + 4) : 0);  // per thread, for quant_row
#pragma omp for schedule(dynamic)  // a thread the OS stalls does not hold up a fixed share
    for (int64_t it = 0; it < sp.items; ++it) {
      const Item m = item_at(sp, it, L, C);
      const TX* xr = xp + m.r * x.stride[0];  // [L, C]
      uint8_t* cr = cp + m.r * codes.stride[0];
      TS* sr = sp_ + m.r * scale.stride[0];
      TS* zr = zp + m.r * zero.stride[0];
      if (C == 1)
        bad |= quant_row<TX, TS>(xr, cr, sr, zr, G, m.l0, m.l1, buf.data());
      else
        bad |= quant_cols<TX, TS>(xr, cr, sr, zr, L, C, G, m.l0, m.l1, m.c0, m.nc);
    }
  }
  return bad != 0;
}

// ---- dequant ----

// Codes of one row segment of [L, C] (C > 1) back to values: per group and column, the four possible outputs
// code * s + z are computed once and stored in out's dtype, so each element is a 2-bit select.
template <typename TS, typename TO>
__attribute__((target_clones("avx2", "default")))
void dequant_cols(const uint8_t* codes, const TS* scale, const TS* zero, Raw<TO>* out, int64_t C, int64_t G,
                  int64_t l0, int64_t l1, int64_t c0, int64_t nc) {
  float val[4][kColBlock];
  Raw<TO> lut[4][kColBlock];
  for (int64_t g0 = l0; g0 < l1; g0 += G) {
    const int64_t g1 = std::min(l1, g0 + G), g = g0 / G;
    const TS* sr = scale + g * C + c0;  // [nc]
    const TS* zr = zero + g * C + c0;
    for (int64_t c = 0; c < nc; ++c) {
      const float s = load(sr[c]), z = load(zr[c]);
      for (int k = 0; k < 4; ++k) val[k][c] = kvq::dequant_value(k, s, z);
    }
    for (int k = 0; k < 4; ++k)
      for (int64_t c = 0; c < nc; ++c) lut[k][c] = store_raw<TO>(val[k][c]);
    for (int64_t l = g0; l < g1; ++l) {
      const uint8_t* br = codes + (l >> 2) * C + c0;  // [nc]
      Raw<TO>* o = out + l * C + c0;
      const int shift = 2 * int(l & 3);
      for (int64_t c = 0; c < nc; ++c) {
        const uint8_t code = uint8_t((br[c] >> shift) & 3);  // 8-bit lanes
        o[c] = code == 0 ? lut[0][c] : code == 1 ? lut[1][c] : code == 2 ? lut[2][c] : lut[3][c];
      }
    }
  }
}

// One row segment [l0, l1) of [L] (C == 1): unpack into buf, then a 4-entry table per group.
template <typename TS, typename TO>
__attribute__((target_clones("avx2", "default")))
void dequant_row(const uint8_t* codes, const TS* scale, const TS* zero, Raw<TO>* out, int64_t G, int64_t l0,
                 int64_t l1, uint8_t* buf) {
  const int64_t n = l1 - l0, nb = ceil_div(n, 4);
  const uint8_t* in = codes + l0 / 4;
  for (int64_t i = 0; i < nb; ++i) {
    const uint8_t byte = in[i];
    for (int k = 0; k < 4; ++k) buf[4 * i + k] = uint8_t(kvq::unpack(byte, k));
  }
  // The tables of kChunk groups at a time, built in loops over the groups (they vectorise; one group's
  // four entries alone would not).
  constexpr int64_t kChunk = 64;
  float val[4][kChunk];
  Raw<TO> lut[4][kChunk];
  for (int64_t ga = l0 / G, gend = ceil_div(l1, G); ga < gend; ga += kChunk) {
    const int64_t ng = std::min(kChunk, gend - ga);
    for (int64_t j = 0; j < ng; ++j) {
      const float s = load(scale[ga + j]), z = load(zero[ga + j]);
      for (int k = 0; k < 4; ++k) val[k][j] = kvq::dequant_value(k, s, z);
    }
    for (int k = 0; k < 4; ++k)
      for (int64_t j = 0; j < ng; ++j) lut[k][j] = store_raw<TO>(val[k][j]);
    for (int64_t j = 0; j < ng; ++j) {
      const int64_t g0 = (ga + j) * G, g1 = std::min(l1, g0 + G);
      const Raw<TO> v0 = lut[0][j], v1 = lut[1][j], v2 = lut[2][j], v3 = lut[3][j];
      const uint8_t* b = buf + (g0 - l0);
      for (int64_t i = 0; i < g1 - g0; ++i) {
        const uint8_t code = b[i];
        out[g0 + i] = code == 0 ? v0 : code == 1 ? v1 : code == 2 ? v2 : v3;
      }
    }
  }
}

template <typename TS, typename TO>
void dequant(const View& codes, const View& scale, const View& zero, int64_t G, const View& out) {
  const auto [R, L] = merged_rows(out, codes, scale, zero, G);
  const int64_t C = out.size[2];
  const Split sp = split(R, L, C, G);
  const uint8_t* cp = static_cast<const uint8_t*>(codes.data);
  const TS* sp_ = static_cast<const TS*>(scale.data);
  const TS* zp = static_cast<const TS*>(zero.data);
  Raw<TO>* op = static_cast<Raw<TO>*>(out.data);
#pragma omp parallel if (R * L * C >= kParallelElems && sp.items > 1)
  {
    std::vector<uint8_t> buf(C == 1 ? size_t(sp.seg + 4) : 0);  // per thread, for dequant_row
#pragma omp for schedule(dynamic)  // a thread the OS stalls does not hold up a fixed share
    for (int64_t it = 0; it < sp.items; ++it) {
      const Item m = item_at(sp, it, L, C);
      const uint8_t* cr = cp + m.r * codes.stride[0];  // [ceil(L/4), C]
      const TS* sr = sp_ + m.r * scale.stride[0];      // [ceil(L/G), C]
      const TS* zr = zp + m.r * zero.stride[0];
      Raw<TO>* orow = op + m.r * out.stride[0];        // [L, C]
      if (C == 1)
        dequant_row<TS, TO>(cr, sr, zr, orow, G, m.l0, m.l1, buf.data());
      else
        dequant_cols<TS, TO>(cr, sr, zr, orow, C, G, m.l0, m.l1, m.c0, m.nc);
    }
  }
}

}  // namespace

void kv_quant2_cpu(const View& x, int64_t group_size, const View& codes, const View& scale, const View& zero) {
  constexpr const char* op = "kv_quant2";
  kvq::check_quant_args(x, group_size, codes, scale, zero, op);
  bool bad = false;
  if (scale.dtype == DType::f32) {
    DLMOM_DISPATCH_FLOAT(x.dtype, TX, op, bad = quant<TX, float>(x, group_size, codes, scale, zero));
  } else {  // scale and zero in x's dtype, rounded outward
    DLMOM_DISPATCH_FLOAT(x.dtype, TX, op, bad = quant<TX, TX>(x, group_size, codes, scale, zero));
  }
  // Found in the kernel's own min / max pass (the outputs are then meaningless).
  DLMOM_CHECK(!bad, op, "x must be finite, got NaN or inf");
}

void kv_dequant2_cpu(const View& codes, const View& scale, const View& zero, int64_t group_size, const View& out) {
  constexpr const char* op = "kv_dequant2";
  kvq::check_dequant_args(codes, scale, zero, group_size, out, op);
  const int64_t G = group_size;
  DLMOM_DISPATCH_FLOAT(scale.dtype, TS, op,
                       DLMOM_DISPATCH_FLOAT(out.dtype, TO, op, dequant<TS, TO>(codes, scale, zero, G, out)));
}

}  // namespace dlmom
