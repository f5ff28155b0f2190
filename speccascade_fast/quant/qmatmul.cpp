// Weight-only quantised matmuls on the CPU, for speccascade_fast.quant (compiled on first use
// with the machine's own instruction set, loaded through ctypes: see kernels.py).
//
// Weight format (one output row n of K inputs; K a multiple of G, and of G * gps):
//   bits = 4, 5, 6 ("nibble" formats; K a multiple of 32): codes[n * K/2 + u * 16 + j], low
//                      nibble = bits 0..3 of the stored value u of k = 32 u + j, high nibble =
//                      those of k = 32 u + 16 + j (j < 16); bits 5 and 6 keep their bits 4 (and 5)
//                      in bit planes qh[n * HB + c * 16 * (bits - 4) ...], HB = ceil(K / 128) *
//                      16 * (bits - 4): per chunk c of 128 inputs (nibble bytes 64 c..64 c + 63)
//                      one little-endian uint64 per plane p and half h, in the order (p 0, low
//                      nibbles), (p 0, high), (p 1, low), (p 1, high); its bit i = 16 r + j is
//                      bit 4 + p of the value at byte 64 c + i's nibble of that half. The code
//                      is the value minus z (a constant of the weight: Q5_0 16, Q6_K 32).
//   bits = 8:          codes[n * K + k], a signed int8 code
//   group g (= k / G; G = 32, or 16 for bits 5, 6 and 8) of row n:
//                               scale  s = D[n * nsb + g / gps] * (sc ? sc[n * ng + g] : 1)
//                               offset o = Mn ? Mn[n * nsb + g / gps] * (mq ? mq[n * ng + g] : 1)
//                                             : 0
//   (nsb = K / (G * gps) "super-blocks" per row, ng = K / G groups per row)
//   weight w = fma(s, code, -o) in fp32.
// Every GGUF block type of the Q4/Q5/Q6/Q8 families maps onto this exactly: s and o are products
// of an fp16 and a small integer (exact in fp32), s * code is exact, so fma(s, code, -o) rounds
// once, as gguf-py's and ggml's reference de-quantisation (d * q - dm in fp32) do: the weights
// below are bit for bit those of the fp32 reference de-quantisation. Q5_x and Q6_K keep their
// 5 and 6 bits per code (a nibble and one or two bit planes) as ggml stores them.
//
// y[m, n] = sum_k x[m, k] w[n, k] (+ bias[n]), fp32 FMAs in a fixed order per output: group by
// group, 16 lanes, then the lanes' horizontal sum. The order does not depend on M, on the
// thread count or on which rows are computed together, so a row's logits are the same whether
// it is decoded alone (M = 1) or verified with others (M = gamma + 1).
//
// x and y are fp32 or bf16 (x converted to fp32 once per call; y rounded to nearest even).
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define QM_AVX2_ISA 1  // AVX2 + FMA: the int8-activation kernel without VNNI, and its helpers
#else
#define QM_AVX2_ISA 0
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define QM_AVX512 1
#define QM_AVX2 0
#else
#define QM_AVX512 0
#define QM_AVX2 QM_AVX2_ISA  // the fp32 path on AVX2 (AMD Zen 1-3, Intel before AVX-512)
#endif


// FN<BITS, G> ARGS for the layout's (bits, G) (check_layout has accepted it)
#define QM_DISPATCH(bits, G, FN, ARGS)                  \
  do {                                                  \
    switch ((bits) * 100 + (G)) {                       \
      case 432: FN<4, 32> ARGS; break;                  \
      case 516: FN<5, 16> ARGS; break;                  \
      case 532: FN<5, 32> ARGS; break;                  \
      case 616: FN<6, 16> ARGS; break;                  \
      case 632: FN<6, 32> ARGS; break;                  \
      case 816: FN<8, 16> ARGS; break;                  \
      default: FN<8, 32> ARGS; break;                   \
    }                                                   \
  } while (0)

namespace {

struct QW {
  const uint8_t* codes;
  int bits, G, gps;
  const float* D;
  const int8_t* sc;
  const float* Mn;
  const int8_t* mq;
  const uint8_t* qh;  // bits 5, 6: the high bit planes
  int z;              // nibble formats: code = stored value - z
  int64_t N, K;
  int64_t ng() const { return K / G; }
  int64_t nsb() const { return K / ((int64_t)G * gps); }
  int64_t row_bytes() const { return bits == 8 ? K : K / 2; }
  int64_t h_bytes() const { return bits == 5 || bits == 6 ? (K + 127) / 128 * 16 * (bits - 4) : 0; }
  inline float scale(int64_t n, int64_t g) const {
    float d = D[n * nsb() + g / gps];
    return sc ? d * (float)sc[n * ng() + g] : d;
  }
  inline float offset(int64_t n, int64_t g) const {
    if (!Mn) return 0.0f;
    float m = Mn[n * nsb() + g / gps];
    return mq ? m * (float)mq[n * ng() + g] : m;
  }
  inline float code(int64_t n, int64_t k) const {
    if (bits != 8) {
      const int64_t u = k / 32, j = k % 32;
      const uint8_t b = codes[n * (K / 2) + u * 16 + (j & 15)];
      int v = j < 16 ? (b & 15) : (b >> 4);
      const int i = (int)(16 * (u % 4) + (j & 15)), half = j < 16 ? 0 : 1;
      for (int p = 0; p + 4 < bits; ++p) {
        const uint8_t* word = qh + n * h_bytes() + (u / 4) * 16 * (bits - 4) + (2 * p + half) * 8;
        v |= ((word[i / 8] >> (i % 8)) & 1) << (4 + p);
      }
      return (float)(v - z);
    }
    return (float)(int8_t)codes[n * K + k];
  }
};

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even; NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

// one row's de-quantised weights, fp32 (the reference every path agrees with)
void dequant_row(const QW& w, int64_t n, float* out) {
  for (int64_t g = 0; g < w.ng(); ++g) {
    const float s = w.scale(n, g), o = w.offset(n, g);
    for (int j = 0; j < w.G; ++j) {
      const int64_t k = g * w.G + j;
      out[k] = __builtin_fmaf(s, w.code(n, k), -o);
    }
  }
}

inline void store(void* y, bool y_bf16, int64_t idx, float v) {
  if (y_bf16)
    ((uint16_t*)y)[idx] = f32_to_bf16(v);
  else
    ((float*)y)[idx] = v;
}

inline float load_bias(const void* bias, bool bf16, int64_t n) {
  if (!bias) return 0.0f;
  return bf16 ? bf16_to_f32(((const uint16_t*)bias)[n]) : ((const float*)bias)[n];
}

// portable path (neither AVX-512 nor AVX2 + FMA): one output at a time, 16 lanes per output as
// the vector paths
// (lane j accumulates k = 16 i + j), then the lanes folded in halves
void rows_scalar(const QW& w, const float* x, int64_t M, int64_t n0, int64_t n1, void* y,
                 bool y_bf16, int64_t ldy, const void* bias, float* wrow) {
  for (int64_t n = n0; n < n1; ++n) {
    dequant_row(w, n, wrow);
    for (int64_t m = 0; m < M; ++m) {
      float lane[16] = {0};
      const float* xm = x + m * w.K;
      for (int64_t k = 0; k < w.K; k += 16)
        for (int j = 0; j < 16; ++j) lane[j] = __builtin_fmaf(wrow[k + j], xm[k + j], lane[j]);
      float a8[8], a4[4], a2[2];
      for (int j = 0; j < 8; ++j) a8[j] = lane[j] + lane[j + 8];
      for (int j = 0; j < 4; ++j) a4[j] = a8[j] + a8[j + 4];
      for (int j = 0; j < 2; ++j) a2[j] = a4[j] + a4[j + 2];
      float v = a2[0] + a2[1];
      store(y, y_bf16, m * ldy + n, v + load_bias(bias, y_bf16, n));
    }
  }
}

#if QM_AVX512
// Groups g..g+15 of a row (g a multiple of 16; the first cnt of them): its per-super-block
// factors F[g / gps] spread over the groups, zeros past cnt. GPS is gps where it is 1, 2, 4 or
// 8 (constant divisors), 16 for any multiple of 16 (sb16 = g / gps, kept by the caller) and 0
// for any other. This runs once per row and 16 groups beside a main loop of a few
// instructions per group: an integer division here costs as much as that loop.
template <int GPS>
inline __m512 spread16(const float* F, int64_t g, int64_t gps, int64_t cnt, int64_t sb16) {
  const __mmask16 km = cnt >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << cnt) - 1);
  if constexpr (GPS == 1) {
    return _mm512_maskz_loadu_ps(km, F + g);
  } else if constexpr (GPS == 16) {
    return _mm512_maskz_mov_ps(km, _mm512_set1_ps(F[sb16]));
  } else if constexpr (GPS == 2 || GPS == 4 || GPS == 8) {  // lane i's super-block: i / GPS
    const int nf = (int)((cnt + GPS - 1) / GPS);
    const __m512 f = _mm512_maskz_loadu_ps((__mmask16)((1u << nf) - 1), F + g / GPS);
    const __m512i idx = GPS == 2 ? _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0)
                      : GPS == 4 ? _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0)
                                 : _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    return _mm512_maskz_permutexvar_ps(km, idx, f);
  } else {
    alignas(64) float t[16] = {0};
    int64_t sb = g / gps, r = g % gps;
    for (int64_t i = 0; i < cnt; ++i) {
      t[i] = F[sb];
      if (++r == gps) r = 0, ++sb;
    }
    return _mm512_load_ps(t);
  }
}

// the int8 factors f[g..g+15] (the first cnt) as fp32
inline __m512 int8x16(const int8_t* f, int64_t g, int64_t cnt) {
  const __mmask16 km = cnt >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << cnt) - 1);
  const __m128i b = _mm512_castsi512_si128(_mm512_maskz_loadu_epi8((__mmask64)km, f + g));
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));  // (AVX512BW: no AVX512VL needed)
}

template <int GPS>
void group_factors_t(const QW& w, int64_t n0, int nb, float* sbuf, float* obuf, int64_t stride) {
  const int64_t ng = w.ng(), nsb = w.nsb(), gps = w.gps;
  const __m512 sign = _mm512_set1_ps(-0.0f);
  for (int b = 0; b < nb; ++b) {
    const int64_t n = n0 + b;
    const float* Drow = w.D + n * nsb;
    const float* Mrow = w.Mn ? w.Mn + n * nsb : nullptr;
    const int8_t* srow = w.sc ? w.sc + n * ng : nullptr;
    const int8_t* mrow = w.mq ? w.mq + n * ng : nullptr;
    int64_t sb16 = 0, r16 = 0;  // (GPS == 16: g / gps and g % gps)
    for (int64_t g = 0; g < ng; g += 16) {
      const int64_t cnt = std::min<int64_t>(16, ng - g);
      const __mmask16 km = cnt == 16 ? (__mmask16)0xffff : (__mmask16)((1u << cnt) - 1);
      __m512 s = spread16<GPS>(Drow, g, gps, cnt, sb16);
      if (srow) s = _mm512_mul_ps(s, int8x16(srow, g, cnt));
      __m512 o = sign;  // -0 without offsets
      if (Mrow) {
        o = spread16<GPS>(Mrow, g, gps, cnt, sb16);
        if (mrow) o = _mm512_mul_ps(o, int8x16(mrow, g, cnt));
        o = _mm512_xor_ps(o, sign);
      }
      _mm512_mask_storeu_ps(sbuf + b * stride + g, km, s);
      _mm512_mask_storeu_ps(obuf + b * stride + g, km, o);
      if (GPS == 16 && (r16 += 16) == gps) r16 = 0, ++sb16;
    }
  }
}

// rows n0..n0+nb-1: their group scales into sbuf[b * stride + g] and negated offsets into
// obuf[b * stride + g] (fp32, exact; the same values as QW::scale / QW::offset), 16 groups per
// vector
inline void group_factors(const QW& w, int64_t n0, int nb, float* sbuf, float* obuf,
                          int64_t stride) {
  switch (w.gps) {
    case 1: return group_factors_t<1>(w, n0, nb, sbuf, obuf, stride);
    case 2: return group_factors_t<2>(w, n0, nb, sbuf, obuf, stride);
    case 4: return group_factors_t<4>(w, n0, nb, sbuf, obuf, stride);
    case 8: return group_factors_t<8>(w, n0, nb, sbuf, obuf, stride);
    default:
      if (w.gps % 16 == 0) return group_factors_t<16>(w, n0, nb, sbuf, obuf, stride);
      return group_factors_t<0>(w, n0, nb, sbuf, obuf, stride);
  }
}

// the codes of a nibble row's inputs 32 u..32 u + 15 (lo) and 32 u + 16..32 u + 31 (hi), int32
template <int BITS>
inline void nibble_codes(const uint8_t* crow, const uint8_t* hrow, int64_t u, __m512i zv,
                         __m512i& lo, __m512i& hi) {
  const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(crow + u * 16)));
  lo = _mm512_and_si512(c, _mm512_set1_epi32(0x0f));
  hi = _mm512_srli_epi32(c, 4);
  if constexpr (BITS > 4) {
    const uint8_t* h = hrow + (u / 4) * 16 * (BITS - 4);
    const int sh = 16 * (int)(u % 4);
    for (int p = 0; p < BITS - 4; ++p) {
      uint64_t a, b;
      std::memcpy(&a, h + 16 * p, 8);
      std::memcpy(&b, h + 16 * p + 8, 8);
      const __m512i add = _mm512_set1_epi32(16 << p);
      lo = _mm512_mask_add_epi32(lo, (__mmask16)(a >> sh), lo, add);
      hi = _mm512_mask_add_epi32(hi, (__mmask16)(b >> sh), hi, add);
    }
  }
  lo = _mm512_sub_epi32(lo, zv);
  hi = _mm512_sub_epi32(hi, zv);
}

// NB output rows n at a time, MB input rows m; acc[m][nb] accumulates 16 lanes of w[n] x[m]
// (16 inputs at a time, in input order)
template <int MB, int NB, int BITS, int G>
inline void block_avx512(const QW& w, const float* x, int64_t n0, void* y, bool y_bf16,
                         int64_t ldy, const void* bias) {
  __m512 acc[MB][NB];
  for (int m = 0; m < MB; ++m)
    for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_setzero_ps();
  const int64_t K = w.K, ng = w.ng(), row_bytes = w.row_bytes(), hb = w.h_bytes();
  // the block's group scales and (negated) offsets, fp32, computed once for all its groups
  thread_local std::vector<float> scratch;
  if ((int64_t)scratch.size() < 2 * NB * ng) scratch.resize(2 * NB * ng);
  float* sbuf = scratch.data();
  float* obuf = sbuf + NB * ng;
  const uint8_t* crow[NB];
  const uint8_t* hrow[NB];
  for (int b = 0; b < NB; ++b) {
    crow[b] = w.codes + (n0 + b) * row_bytes;
    hrow[b] = w.qh ? w.qh + (n0 + b) * hb : nullptr;
  }
  group_factors(w, n0, NB, sbuf, obuf, ng);
  if constexpr (BITS != 8) {  // 32 inputs (16 code bytes) at a time: groups u, or 2 u and 2 u + 1
    const __m512i zv = _mm512_set1_epi32(w.z);
    for (int64_t u = 0; u < K / 32; ++u) {
      __m512 wv[NB][2];
      if (u % 4 == 0)  // the same line of the rows some blocks ahead
        for (int b = 0; b < NB; ++b)
          _mm_prefetch((const char*)(crow[b] + 4 * NB * row_bytes + u * 16), _MM_HINT_T0);
      for (int b = 0; b < NB; ++b) {
        __m512i lo, hi;
        nibble_codes<BITS>(crow[b], hrow[b], u, zv, lo, hi);
        const int64_t g0 = G == 32 ? u : 2 * u, g1 = G == 32 ? u : 2 * u + 1;
        wv[b][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), _mm512_set1_ps(sbuf[b * ng + g0]),
                                   _mm512_set1_ps(obuf[b * ng + g0]));
        wv[b][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), _mm512_set1_ps(sbuf[b * ng + g1]),
                                   _mm512_set1_ps(obuf[b * ng + g1]));
      }
      for (int v = 0; v < 2; ++v)
        for (int m = 0; m < MB; ++m) {
          const __m512 xv = _mm512_loadu_ps(x + m * K + u * 32 + v * 16);
          for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_fmadd_ps(wv[b][v], xv, acc[m][b]);
        }
    }
  } else {
    constexpr int V = G / 16;  // vectors per group
    for (int64_t g = 0; g < ng; ++g) {
      __m512 wv[NB][V];
      if ((g * G) % 64 == 0)  // the same line of the rows some blocks ahead
        for (int b = 0; b < NB; ++b)
          _mm_prefetch((const char*)(crow[b] + 4 * NB * row_bytes + g * G), _MM_HINT_T0);
      for (int b = 0; b < NB; ++b) {
        const __m512 vs = _mm512_set1_ps(sbuf[b * ng + g]), vo = _mm512_set1_ps(obuf[b * ng + g]);
        for (int v = 0; v < V; ++v) {
          const __m128i c = _mm_loadu_si128((const __m128i*)(crow[b] + g * G + v * 16));
          wv[b][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(c)), vs, vo);
        }
      }
      for (int v = 0; v < V; ++v) {
        for (int m = 0; m < MB; ++m) {
          const __m512 xv = _mm512_loadu_ps(x + m * K + g * G + v * 16);
          for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_fmadd_ps(wv[b][v], xv, acc[m][b]);
        }
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int b = 0; b < NB; ++b) {
      const int64_t n = n0 + b;
      store(y, y_bf16, m * ldy + n, _mm512_reduce_add_ps(acc[m][b]) + load_bias(bias, y_bf16, n));
    }
}

// one row's fp32 weights (the same values as dequant_row)
template <int BITS, int G>
inline void dequant_row_avx512(const QW& w, int64_t n, float* dst) {
  const int64_t ng = w.ng();
  thread_local std::vector<float> scratch;
  if ((int64_t)scratch.size() < 2 * ng) scratch.resize(2 * ng);
  float* sbuf = scratch.data();
  float* obuf = sbuf + ng;  // (negated offsets)
  group_factors(w, n, 1, sbuf, obuf, ng);
  const uint8_t* crow = w.codes + n * w.row_bytes();
  if constexpr (BITS != 8) {
    const uint8_t* hrow = w.qh ? w.qh + n * w.h_bytes() : nullptr;
    const __m512i zv = _mm512_set1_epi32(w.z);
    for (int64_t u = 0; u < w.K / 32; ++u) {
      __m512i lo, hi;
      nibble_codes<BITS>(crow, hrow, u, zv, lo, hi);
      const int64_t g0 = G == 32 ? u : 2 * u, g1 = G == 32 ? u : 2 * u + 1;
      _mm512_storeu_ps(dst + u * 32, _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo),
                                                     _mm512_set1_ps(sbuf[g0]),
                                                     _mm512_set1_ps(obuf[g0])));
      _mm512_storeu_ps(dst + u * 32 + 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi),
                                                          _mm512_set1_ps(sbuf[g1]),
                                                          _mm512_set1_ps(obuf[g1])));
    }
  } else {
    for (int64_t g = 0; g < ng; ++g) {
      const __m512 vs = _mm512_set1_ps(sbuf[g]), vo = _mm512_set1_ps(obuf[g]);
      for (int v = 0; v < G / 16; ++v) {
        const __m128i c = _mm_loadu_si128((const __m128i*)(crow + g * G + v * 16));
        _mm512_storeu_ps(dst + g * G + v * 16,
                         _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(c)), vs, vo));
      }
    }
  }
}

template <int MB, int BITS, int G>
void rows_avx512(const QW& w, const float* x, int64_t n0, int64_t n1, void* y, bool y_bf16,
                 int64_t ldy, const void* bias) {
  // two rows at a time: each row is a stream of code bytes, and with four interleaved streams
  // the 1.5B's long rows (K = 1536, 8960) came from memory slower, even at M = 1 (a row's
  // outputs do not depend on NB)
  constexpr int NB = 2;
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) block_avx512<MB, NB, BITS, G>(w, x, n, y, y_bf16, ldy, bias);
  for (; n < n1; ++n) block_avx512<MB, 1, BITS, G>(w, x, n, y, y_bf16, ldy, bias);
}

template <int BITS, int G>
void rows_mb(const QW& w, const float* x, int64_t mb, int64_t n0, int64_t n1, void* y,
             bool y_bf16, int64_t ldy, const void* bias) {
  switch (mb) {
    case 1: return rows_avx512<1, BITS, G>(w, x, n0, n1, y, y_bf16, ldy, bias);
    case 2: return rows_avx512<2, BITS, G>(w, x, n0, n1, y, y_bf16, ldy, bias);
    case 3: return rows_avx512<3, BITS, G>(w, x, n0, n1, y, y_bf16, ldy, bias);
    case 4: return rows_avx512<4, BITS, G>(w, x, n0, n1, y, y_bf16, ldy, bias);
    case 5: return rows_avx512<5, BITS, G>(w, x, n0, n1, y, y_bf16, ldy, bias);
    case 6: return rows_avx512<6, BITS, G>(w, x, n0, n1, y, y_bf16, ldy, bias);
    case 7: return rows_avx512<7, BITS, G>(w, x, n0, n1, y, y_bf16, ldy, bias);
    default: return rows_avx512<8, BITS, G>(w, x, n0, n1, y, y_bf16, ldy, bias);
  }
}
#endif

#if QM_AVX2_ISA
// ---- AVX2 + FMA (no AVX-512): the AVX-512 path's arithmetic in two 8-lane halves ------------
// The 16 lanes of the AVX-512 path (lane j accumulates inputs k = 16 i + j) are two __m256
// accumulators, lanes 0..7 and 8..15, fed the same fma(code, s, -o) weights and the same
// fma(w, x, acc) in the same order; the horizontal sum folds the halves as
// _mm512_reduce_add_ps (and rows_scalar) do. So every output is bit for bit the other paths'.

// rows n0..n0+nb-1: group scales into sbuf and negated offsets into obuf (QW::scale and
// QW::offset, per super-block; the same fp32 products as group_factors)
inline void group_factors_avx2(const QW& w, int64_t n0, int nb, float* sbuf, float* obuf,
                               int64_t stride) {
  const int64_t ng = w.ng(), nsb = w.nsb(), gps = w.gps;
  for (int b = 0; b < nb; ++b) {
    const int64_t n = n0 + b;
    const float* Drow = w.D + n * nsb;
    const float* Mrow = w.Mn ? w.Mn + n * nsb : nullptr;
    const int8_t* srow = w.sc ? w.sc + n * ng : nullptr;
    const int8_t* mrow = w.mq ? w.mq + n * ng : nullptr;
    float* s = sbuf + b * stride;
    float* o = obuf + b * stride;
    for (int64_t sb = 0, g = 0; sb < nsb; ++sb) {
      const float d = Drow[sb], m = Mrow ? Mrow[sb] : 0.0f;
      for (int64_t r = 0; r < gps; ++r, ++g) {
        s[g] = srow ? d * (float)srow[g] : d;
        o[g] = -(Mrow ? (mrow ? m * (float)mrow[g] : m) : 0.0f);
      }
    }
  }
}

// lanes i (0..7) whose bit i of m8 is set: add; others 0
inline __m256i bit_lanes(uint32_t m8, __m256i add) {
  const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i v = _mm256_and_si256(_mm256_set1_epi32((int)m8), sel);
  return _mm256_and_si256(_mm256_cmpeq_epi32(v, sel), add);
}

// the codes (minus z) of a nibble row's inputs 32 u + 16 h + 8 q .. + 7 (h: 0 low nibbles, 1
// high; q: 0, 1), int32 in c[2 h + q]
template <int BITS>
inline void nibble_codes_avx2(const uint8_t* crow, const uint8_t* hrow, int64_t u, __m256i zv,
                              __m256i c[4]) {
  const __m128i b = _mm_loadu_si128((const __m128i*)(crow + u * 16));
  const __m128i m4 = _mm_set1_epi8(0x0f);
  const __m128i lo = _mm_and_si128(b, m4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m4);
  c[0] = _mm256_cvtepu8_epi32(lo);
  c[1] = _mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8));
  c[2] = _mm256_cvtepu8_epi32(hi);
  c[3] = _mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8));
  if constexpr (BITS > 4) {
    const uint8_t* h = hrow + (u / 4) * 16 * (BITS - 4);
    const int sh = 16 * (int)(u % 4);
    for (int p = 0; p < BITS - 4; ++p) {
      uint64_t a, bb;
      std::memcpy(&a, h + 16 * p, 8);
      std::memcpy(&bb, h + 16 * p + 8, 8);
      const __m256i add = _mm256_set1_epi32(16 << p);
      const uint32_t la = (uint32_t)(a >> sh), lb = (uint32_t)(bb >> sh);
      c[0] = _mm256_add_epi32(c[0], bit_lanes(la & 0xff, add));
      c[1] = _mm256_add_epi32(c[1], bit_lanes((la >> 8) & 0xff, add));
      c[2] = _mm256_add_epi32(c[2], bit_lanes(lb & 0xff, add));
      c[3] = _mm256_add_epi32(c[3], bit_lanes((lb >> 8) & 0xff, add));
    }
  }
  for (int i = 0; i < 4; ++i) c[i] = _mm256_sub_epi32(c[i], zv);
}

inline float reduce16(__m256 lo, __m256 hi) {  // as _mm512_reduce_add_ps over (lo, hi)
  const __m256 a8 = _mm256_add_ps(hi, lo);
  const __m128 a4 = _mm_add_ps(_mm256_extractf128_ps(a8, 1), _mm256_castps256_ps128(a8));
  const __m128 a2 = _mm_add_ps(a4, _mm_movehl_ps(a4, a4));
  return _mm_cvtss_f32(a2) + _mm_cvtss_f32(_mm_shuffle_ps(a2, a2, 1));
}

template <int MB, int NB, int BITS, int G>
inline void block_avx2(const QW& w, const float* x, int64_t n0, void* y, bool y_bf16,
                       int64_t ldy, const void* bias) {
  __m256 acc[MB][NB][2];
  for (int m = 0; m < MB; ++m)
    for (int b = 0; b < NB; ++b) acc[m][b][0] = acc[m][b][1] = _mm256_setzero_ps();
  const int64_t K = w.K, ng = w.ng(), row_bytes = w.row_bytes(), hb = w.h_bytes();
  thread_local std::vector<float> scratch;
  if ((int64_t)scratch.size() < 2 * NB * ng) scratch.resize(2 * NB * ng);
  float* sbuf = scratch.data();
  float* obuf = sbuf + NB * ng;
  const uint8_t* crow[NB];
  const uint8_t* hrow[NB];
  for (int b = 0; b < NB; ++b) {
    crow[b] = w.codes + (n0 + b) * row_bytes;
    hrow[b] = w.qh ? w.qh + (n0 + b) * hb : nullptr;
  }
  group_factors_avx2(w, n0, NB, sbuf, obuf, ng);
  if constexpr (BITS != 8) {
    const __m256i zv = _mm256_set1_epi32(w.z);
    for (int64_t u = 0; u < K / 32; ++u) {
      if (u % 4 == 0)
        for (int b = 0; b < NB; ++b)
          _mm_prefetch((const char*)(crow[b] + 4 * NB * row_bytes + u * 16), _MM_HINT_T0);
      __m256 wv[NB][4];
      for (int b = 0; b < NB; ++b) {
        __m256i c[4];
        nibble_codes_avx2<BITS>(crow[b], hrow[b], u, zv, c);
        const int64_t g0 = G == 32 ? u : 2 * u, g1 = G == 32 ? u : 2 * u + 1;
        const __m256 s0 = _mm256_set1_ps(sbuf[b * ng + g0]), o0 = _mm256_set1_ps(obuf[b * ng + g0]);
        const __m256 s1 = _mm256_set1_ps(sbuf[b * ng + g1]), o1 = _mm256_set1_ps(obuf[b * ng + g1]);
        wv[b][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(c[0]), s0, o0);
        wv[b][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(c[1]), s0, o0);
        wv[b][2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(c[2]), s1, o1);
        wv[b][3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(c[3]), s1, o1);
      }
      for (int v = 0; v < 4; ++v)  // inputs 32 u + 8 v .. + 7: lanes 8 (v % 2) ..
        for (int m = 0; m < MB; ++m) {
          const __m256 xv = _mm256_loadu_ps(x + m * K + u * 32 + v * 8);
          for (int b = 0; b < NB; ++b)
            acc[m][b][v & 1] = _mm256_fmadd_ps(wv[b][v], xv, acc[m][b][v & 1]);
        }
    }
  } else {
    for (int64_t g = 0; g < ng; ++g) {
      if ((g * G) % 64 == 0)
        for (int b = 0; b < NB; ++b)
          _mm_prefetch((const char*)(crow[b] + 4 * NB * row_bytes + g * G), _MM_HINT_T0);
      for (int v = 0; v < G / 8; ++v) {  // inputs g G + 8 v .. + 7: lanes 8 (v % 2) ..
        __m256 wv[NB];
        for (int b = 0; b < NB; ++b) {
          const __m128i c = _mm_loadl_epi64((const __m128i*)(crow[b] + g * G + v * 8));
          wv[b] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c)),
                                  _mm256_set1_ps(sbuf[b * ng + g]), _mm256_set1_ps(obuf[b * ng + g]));
        }
        for (int m = 0; m < MB; ++m) {
          const __m256 xv = _mm256_loadu_ps(x + m * K + g * G + v * 8);
          for (int b = 0; b < NB; ++b)
            acc[m][b][v & 1] = _mm256_fmadd_ps(wv[b], xv, acc[m][b][v & 1]);
        }
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int b = 0; b < NB; ++b) {
      const int64_t n = n0 + b;
      store(y, y_bf16, m * ldy + n,
            reduce16(acc[m][b][0], acc[m][b][1]) + load_bias(bias, y_bf16, n));
    }
}

// one row's fp32 weights (the same values as dequant_row)
template <int BITS, int G>
inline void dequant_row_avx2(const QW& w, int64_t n, float* dst) {
  const int64_t ng = w.ng();
  thread_local std::vector<float> scratch;
  if ((int64_t)scratch.size() < 2 * ng) scratch.resize(2 * ng);
  float* sbuf = scratch.data();
  float* obuf = sbuf + ng;
  group_factors_avx2(w, n, 1, sbuf, obuf, ng);
  const uint8_t* crow = w.codes + n * w.row_bytes();
  if constexpr (BITS != 8) {
    const uint8_t* hrow = w.qh ? w.qh + n * w.h_bytes() : nullptr;
    const __m256i zv = _mm256_set1_epi32(w.z);
    for (int64_t u = 0; u < w.K / 32; ++u) {
      __m256i c[4];
      nibble_codes_avx2<BITS>(crow, hrow, u, zv, c);
      const int64_t g0 = G == 32 ? u : 2 * u, g1 = G == 32 ? u : 2 * u + 1;
      for (int v = 0; v < 4; ++v) {
        const int64_t g = v < 2 ? g0 : g1;
        _mm256_storeu_ps(dst + u * 32 + v * 8,
                         _mm256_fmadd_ps(_mm256_cvtepi32_ps(c[v]), _mm256_set1_ps(sbuf[g]),
                                         _mm256_set1_ps(obuf[g])));
      }
    }
  } else {
    for (int64_t g = 0; g < ng; ++g) {
      const __m256 vs = _mm256_set1_ps(sbuf[g]), vo = _mm256_set1_ps(obuf[g]);
      for (int v = 0; v < G / 8; ++v) {
        const __m128i c = _mm_loadl_epi64((const __m128i*)(crow + g * G + v * 8));
        _mm256_storeu_ps(dst + g * G + v * 8,
                         _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c)), vs, vo));
      }
    }
  }
}

template <int MB, int BITS, int G>
void rows_avx2(const QW& w, const float* x, int64_t n0, int64_t n1, void* y, bool y_bf16,
               int64_t ldy, const void* bias) {
  // two code streams at M = 1 (as the AVX-512 path); one row at a time past it, which keeps
  // the accumulators and weights within the 16 ymm registers
  constexpr int NB = MB == 1 ? 2 : 1;
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) block_avx2<MB, NB, BITS, G>(w, x, n, y, y_bf16, ldy, bias);
  for (; n < n1; ++n) block_avx2<MB, 1, BITS, G>(w, x, n, y, y_bf16, ldy, bias);
}

template <int BITS, int G>
void rows_mb_avx2(const QW& w, const float* x, int64_t mb, int64_t n0, int64_t n1, void* y,
                  bool y_bf16, int64_t ldy, const void* bias) {
  for (int64_t m0 = 0; m0 < mb; m0 += 4) {  // at most 4 rows of x per pass (registers)
    const int64_t k = std::min<int64_t>(4, mb - m0);
    const float* xm = x + m0 * w.K;
    void* ym = y_bf16 ? (void*)((uint16_t*)y + m0 * ldy) : (void*)((float*)y + m0 * ldy);
    switch (k) {
      case 1: rows_avx2<1, BITS, G>(w, xm, n0, n1, ym, y_bf16, ldy, bias); break;
      case 2: rows_avx2<2, BITS, G>(w, xm, n0, n1, ym, y_bf16, ldy, bias); break;
      case 3: rows_avx2<3, BITS, G>(w, xm, n0, n1, ym, y_bf16, ldy, bias); break;
      default: rows_avx2<4, BITS, G>(w, xm, n0, n1, ym, y_bf16, ldy, bias); break;
    }
  }
}
#endif

#if (QM_AVX512 && defined(__AVX512VNNI__)) || QM_AVX2_ISA
#define QM_A8 1
#if QM_AVX512 && defined(__AVX512VNNI__)
#define QM_VNNI 1  // VNNI's dpbusd; otherwise AVX2's maddubs + madd (the same integer sums)
#else
#define QM_VNNI 0
#endif
#ifndef QM_PF
#define QM_PF 2
#endif
// ---- int8 activations (integer dot products in the manner of llama.cpp's) ------------------
// Each activation row is quantised per block of 32 inputs: d = max|x| / 127, q = round(x * (127 /
// max|x|)) (nearest even; d = 0 and q = 0 for a block of zeros). Per group of weights the integer
// dot product sum_j code_j q_j is exact (VNNI: unsigned codes times signed q, int32), and
//   y[m, n] = sum_groups s_g * d_b * idot_g  -  sum_groups o_g * (fp32 sum of x over g)
// the first sum accumulated in 16 fp32 lanes (each group's terms in its 4 or 8 lanes), then
// the lanes' horizontal sum; the second a 16-lane dot product over the groups, then its sum.
// As in the fp32 path, the order depends on nothing but the row, so a row's outputs are the
// same for every M, thread count and blocking. A block of activations with an infinity or a
// NaN gives NaN outputs; one too small for 127 / max|x| counts as zeros.
// 8-bit codes are signed; the VNNI kernel reads them as unsigned code + 128 and starts each
// lane's integer sum at -128 * (the sum of its four q), which is exact (the AVX2 kernel
// multiplies their magnitudes by q carrying their sign: the same integer). Nibble codes are read as their
// stored values (unsigned) and, where z is not 0, each lane's sum starts at -z * (its q's sum).
struct XQ {
  int64_t M = 0, K = 0, chunks = 0;  // chunk: 64 code bytes (128 inputs in nibbles, 64 at 8)
  std::vector<int8_t> qlo, qhi;      // [M][chunks][64]: q in the codes' byte order (qhi: nibbles)
  std::vector<float> dexp;           // [M][chunks][16]: each lane's activation scale
  // [M][chunks][16]: each lane's integer start: 8 bits (VNNI): -128 * its sum of q; nibbles with z:
  // -z * that sum over the lane's low- and high-nibble q (G = 32), or the low ones only (G =
  // 16, the high ones in ncorr_hi: they are two groups)
  std::vector<int32_t> ncorr, ncorr_hi;
  std::vector<float> gsum;           // [M][ng]: fp32 sum of x over each weight group
};

void quantise_x(const float* x, int64_t M, int64_t K, int bits, int G, int z, bool sums, XQ& xq) {
  const bool nib = bits != 8;
  const int64_t inputs_per_chunk = nib ? 128 : 64;
  xq.M = M, xq.K = K;
  xq.chunks = (K + inputs_per_chunk - 1) / inputs_per_chunk;
  const int64_t nb = K / 32, ng = K / G, C = xq.chunks;
  xq.qlo.assign(M * C * 64, 0);
  if (nib) xq.qhi.assign(M * C * 64, 0);
  xq.dexp.assign(M * C * 16, 0.0f);
  if (!nib || z) xq.ncorr.assign(M * C * 16, 0);
  if (nib && z && G == 16) xq.ncorr_hi.assign(M * C * 16, 0);
  if (sums) xq.gsum.assign(M * ng, 0.0f);
  std::vector<int8_t> q(K);
  std::vector<float> d(nb);
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * K;
    for (int64_t b = 0; b < nb; ++b) {
#if QM_VNNI
      const __m512 a0 = _mm512_loadu_ps(xm + 32 * b), a1 = _mm512_loadu_ps(xm + 32 * b + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a0), _mm512_abs_ps(a1)));
      const bool nan = (_mm512_cmp_ps_mask(a0, a0, _CMP_UNORD_Q) |
                        _mm512_cmp_ps_mask(a1, a1, _CMP_UNORD_Q)) != 0;
#else
      __m256 a[4];
      const __m256 nosign = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
      int unord = 0;
      __m256 mx = _mm256_setzero_ps();
      for (int i = 0; i < 4; ++i) {
        a[i] = _mm256_loadu_ps(xm + 32 * b + 8 * i);
        mx = _mm256_max_ps(mx, _mm256_and_ps(a[i], nosign));
        unord |= _mm256_movemask_ps(_mm256_cmp_ps(a[i], a[i], _CMP_UNORD_Q));
      }
      alignas(32) float mxs[8];
      _mm256_store_ps(mxs, mx);
      float amax = mxs[0];
      for (int i = 1; i < 8; ++i) amax = std::max(amax, mxs[i]);  // (exact: any order)
      const bool nan = unord != 0;
#endif
      // a block with an infinity or a NaN makes its outputs NaN, as an fp32 product would;
      // a block whose 127 / max|x| overflows (all |x| < 4e-37) counts as zeros, as a block of 0
      const float r = amax > 0.0f ? 127.0f / amax : 0.0f;
      const bool zero = !(r <= 3.4028235e38f) || amax == 0.0f;
      d[b] = (nan || !(amax <= 3.4028235e38f)) ? __builtin_nanf("") : zero ? 0.0f : amax / 127.0f;
#if QM_VNNI
      const __m512 inv = _mm512_set1_ps(zero || nan ? 0.0f : r);
      const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(a0, inv));  // nearest even
      const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(a1, inv));
      _mm_storeu_si128((__m128i*)(q.data() + 32 * b), _mm512_cvtsepi32_epi8(q0));
      _mm_storeu_si128((__m128i*)(q.data() + 32 * b + 16), _mm512_cvtsepi32_epi8(q1));
#else
      const __m256 inv = _mm256_set1_ps(zero || nan ? 0.0f : r);
      for (int i = 0; i < 4; ++i) {
        alignas(32) int32_t qi[8];
        _mm256_store_si256((__m256i*)qi, _mm256_cvtps_epi32(_mm256_mul_ps(a[i], inv)));
        for (int j = 0; j < 8; ++j)  // (saturated as _mm512_cvtsepi32_epi8)
          q[32 * b + 8 * i + j] = (int8_t)std::min(127, std::max(-128, qi[j]));
      }
#endif
    }
    if (sums)
      for (int64_t g = 0; g < ng; ++g) {  // fixed order: 16 lanes (G = 32: two vectors), then
#if QM_VNNI                               // their horizontal sum
        __m512 v = _mm512_loadu_ps(xm + g * G);
        if (G == 32) v = _mm512_add_ps(v, _mm512_loadu_ps(xm + g * G + 16));
        xq.gsum[m * ng + g] = _mm512_reduce_add_ps(v);
#else
        __m256 lo = _mm256_loadu_ps(xm + g * G), hi = _mm256_loadu_ps(xm + g * G + 8);
        if (G == 32) {
          lo = _mm256_add_ps(lo, _mm256_loadu_ps(xm + g * G + 16));
          hi = _mm256_add_ps(hi, _mm256_loadu_ps(xm + g * G + 24));
        }
        xq.gsum[m * ng + g] = reduce16(lo, hi);
#endif
      }
    int8_t* lo = xq.qlo.data() + m * C * 64;
    float* de = xq.dexp.data() + m * C * 16;
    if (nib) {  // chunk c, quarter r = block 4c + r of 32 inputs: lo = its inputs 0..15, hi = 16..31
      int8_t* hi = xq.qhi.data() + m * C * 64;
      int32_t* nc = z ? xq.ncorr.data() + m * C * 16 : nullptr;
      int32_t* nh = z && G == 16 ? xq.ncorr_hi.data() + m * C * 16 : nullptr;
      for (int64_t g = 0; g < nb; ++g) {
        const int64_t c = g / 4, r = g % 4;
        std::memcpy(lo + c * 64 + r * 16, q.data() + 32 * g, 16);
        std::memcpy(hi + c * 64 + r * 16, q.data() + 32 * g + 16, 16);
        for (int l = 0; l < 4; ++l) {
          de[c * 16 + r * 4 + l] = d[g];
          if (!nc) continue;
          int32_t sl = 0, sh = 0;
          for (int j = 0; j < 4; ++j) sl += q[32 * g + 4 * l + j], sh += q[32 * g + 16 + 4 * l + j];
          if (nh)
            nc[c * 16 + r * 4 + l] = -z * sl, nh[c * 16 + r * 4 + l] = -z * sh;
          else
            nc[c * 16 + r * 4 + l] = -z * (sl + sh);
        }
      }
    } else {  // chunk c = inputs 64c..64c+63 in order; lane l = inputs 64c + 4l..4l+3
      std::memcpy(lo, q.data(), K);
      int32_t* nc = xq.ncorr.data() + m * C * 16;
      for (int64_t k4 = 0; k4 < K / 4; ++k4) {
        const int64_t c = k4 / 16, l = k4 % 16;
        int32_t s = 0;
        for (int j = 0; j < 4; ++j) s += q[4 * k4 + j];
        nc[c * 16 + l] = -128 * s;
        de[c * 16 + l] = d[(4 * k4) / 32];
      }
    }
  }
}

#if !QM_VNNI
// ---- the int8-activation kernel on AVX2: VNNI's lanes in two halves ------------------------
// Lane l (0..15) of a chunk holds the integer dot product of its 4 code bytes with their q, as
// dpbusd computes it: here maddubs (unsigned codes times signed q, pairs summed in int16,
// exact: |pair| <= 2 * 63 * 127 for nibble formats) then madd with ones (int32). 8-bit codes
// are signed: their magnitudes times q carrying the code's sign (|pair| <= 2 * 128 * 127), the
// same integer as VNNI's (code + 128) q - 128 q. Lanes 0..7 and 8..15 are two __m256, and
// every fp32 operation is the VNNI path's, lane by lane, so the outputs are bit for bit its.

// 0xff in byte i of the 32 where bit i of m is set
inline __m256i bytes_of_bits(uint32_t m) {
  const __m256i spread = _mm256_setr_epi64x(0, 0x0101010101010101LL, 0x0202020202020202LL,
                                            0x0303030303030303LL);
  const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
  const __m256i v = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)m), spread), bit);
  return _mm256_cmpeq_epi8(v, bit);
}

inline __m256i dot4(__m256i w_u8, __m256i q_s8) {  // per int32 lane: sum of 4 byte products
  return _mm256_madd_epi16(_mm256_maddubs_epi16(w_u8, q_s8), _mm256_set1_epi16(1));
}

// the 8 lanes of half h as 2 x 4 (GPC 4: lanes 0..3 group 4 c + 2 h, lanes 4..7 the next; one
// load and a permute) or 8 (GPC 2: group 2 c + h) equal values
template <int GPC>
inline __m256 lanes_of(const float* f, int64_t c, int h) {
  if constexpr (GPC == 2) return _mm256_set1_ps(f[2 * c + h]);
  const __m256 v = _mm256_castps128_ps256(_mm_loadu_ps(f + 4 * c));
  return _mm256_permutevar8x32_ps(v, h ? _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3)
                                       : _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
}

template <int MB, int NB, int BITS, int G, bool ZC>
inline void block_a8_avx2(const QW& w, const XQ& xq, int64_t m0, int64_t n0, void* y,
                          bool y_bf16, int64_t ldy, const void* bias) {
  // ZC: nibble codes with z != 0, whose lanes' integer sums start at xq.ncorr (and ncorr_hi)
  constexpr bool NIB = BITS != 8;
  constexpr bool TWO = NIB && G == 16;
  constexpr int GPC = TWO ? 8 : (NIB || G == 16) ? 4 : 2;
  __m256 acc[MB][NB][2];
  for (int m = 0; m < MB; ++m)
    for (int b = 0; b < NB; ++b) acc[m][b][0] = acc[m][b][1] = _mm256_setzero_ps();
  const int64_t ng = w.ng(), C = xq.chunks, row_bytes = w.row_bytes(), hb = w.h_bytes();
  const int64_t stride = ng + 8;
  thread_local std::vector<float> scratch;
  if ((int64_t)scratch.size() < 2 * NB * stride) scratch.resize(2 * NB * stride);
  float* sbuf = scratch.data();
  float* obuf = sbuf + NB * stride;
  group_factors_avx2(w, n0, NB, sbuf, obuf, stride);
  for (int b = 0; b < NB; ++b)
    for (int64_t g = ng; g < stride; ++g) sbuf[b * stride + g] = obuf[b * stride + g] = 0.0f;
  const __m256i lo4 = _mm256_set1_epi8(0x0f);
  const __m256i c16 = _mm256_set1_epi8(16), c32 = _mm256_set1_epi8(32);
  const uint8_t* crow[NB];
  const uint8_t* hrow[NB];
  for (int b = 0; b < NB; ++b) {
    crow[b] = w.codes + (n0 + b) * row_bytes;
    hrow[b] = w.qh ? w.qh + (n0 + b) * hb : nullptr;
  }
  const int8_t* qlo = xq.qlo.data() + m0 * C * 64;
  const int8_t* qhi = NIB ? xq.qhi.data() + m0 * C * 64 : nullptr;
  const float* dexp = xq.dexp.data() + m0 * C * 16;
  const int32_t* ncorr = ZC ? xq.ncorr.data() + m0 * C * 16 : nullptr;
  const int32_t* ncorr_hi = ZC && TWO ? xq.ncorr_hi.data() + m0 * C * 16 : nullptr;
  // a part-filled last chunk is read from a copy with zeros past the row, made here: a call
  // inside the loop would make the compiler keep the accumulators in memory (every vector
  // register is caller-saved)
  const int64_t full = row_bytes / 64;
  alignas(32) uint8_t tail[NB][64];
  if (full < C)
    for (int b = 0; b < NB; ++b) {
      std::memset(tail[b], 0, 64);
      std::memcpy(tail[b], crow[b] + full * 64, row_bytes - full * 64);
    }
  for (int64_t c = 0; c < C; ++c) {
    for (int b = 0; b < NB; ++b)
      _mm_prefetch((const char*)(crow[b] + QM_PF * NB * row_bytes + c * 64), _MM_HINT_T0);
    for (int h = 0; h < 2; ++h) {  // code bytes 32 h .. 32 h + 31 of the chunk: lanes 8 h ..
      __m256i wlo[NB], whi[NB];
      for (int b = 0; b < NB; ++b) {
        const uint8_t* src = c < full ? crow[b] + c * 64 : tail[b];
        const __m256i v = _mm256_loadu_si256((const __m256i*)(src + 32 * h));
        if constexpr (NIB) {
          wlo[b] = _mm256_and_si256(v, lo4);
          whi[b] = _mm256_and_si256(_mm256_srli_epi16(v, 4), lo4);
          if constexpr (BITS > 4) {
            uint32_t hm[4];
            for (int i = 0; i < 2 * (BITS - 4); ++i) {
              uint64_t word;
              std::memcpy(&word, hrow[b] + c * 16 * (BITS - 4) + 8 * i, 8);
              hm[i] = (uint32_t)(word >> (32 * h));
            }
            wlo[b] = _mm256_add_epi8(wlo[b], _mm256_and_si256(bytes_of_bits(hm[0]), c16));
            whi[b] = _mm256_add_epi8(whi[b], _mm256_and_si256(bytes_of_bits(hm[1]), c16));
            if constexpr (BITS > 5) {
              wlo[b] = _mm256_add_epi8(wlo[b], _mm256_and_si256(bytes_of_bits(hm[2]), c32));
              whi[b] = _mm256_add_epi8(whi[b], _mm256_and_si256(bytes_of_bits(hm[3]), c32));
            }
          }
        } else {
          wlo[b] = v;  // signed codes (their magnitudes and signs are taken per row of x)
        }
      }
      __m256 ws[NB];  // each lane's group scale (TWO: in the loop below, two per lane)
      if constexpr (!TWO)
        for (int b = 0; b < NB; ++b) ws[b] = lanes_of<GPC>(sbuf + b * stride, c, h);
      for (int m = 0; m < MB; ++m) {
        const int64_t off = (m * C + c) * 64 + 32 * h, loff = (m * C + c) * 16 + 8 * h;
        const __m256i xl = _mm256_loadu_si256((const __m256i*)(qlo + off));
        const __m256 xd = _mm256_loadu_ps(dexp + loff);
        if constexpr (TWO) {
          const __m256i xh = _mm256_loadu_si256((const __m256i*)(qhi + off));
          const __m256i nc = ZC ? _mm256_loadu_si256((const __m256i*)(ncorr + loff))
                                : _mm256_setzero_si256();
          const __m256i nh = ZC ? _mm256_loadu_si256((const __m256i*)(ncorr_hi + loff))
                                : _mm256_setzero_si256();
          for (int b = 0; b < NB; ++b) {
            const float* f = sbuf + b * stride + 8 * c + 4 * h;  // lanes' groups 8 c + 2 (l / 4)
            const __m256 wl = _mm256_set_m128(_mm_set1_ps(f[2]), _mm_set1_ps(f[0]));
            const __m256 wh = _mm256_set_m128(_mm_set1_ps(f[3]), _mm_set1_ps(f[1]));
            __m256i sl = dot4(wlo[b], xl), sh = dot4(whi[b], xh);
            if constexpr (ZC) sl = _mm256_add_epi32(nc, sl), sh = _mm256_add_epi32(nh, sh);
            acc[m][b][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sl), _mm256_mul_ps(wl, xd),
                                           acc[m][b][h]);
            acc[m][b][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sh), _mm256_mul_ps(wh, xd),
                                           acc[m][b][h]);
          }
        } else {
          __m256i xh = xl, nc = _mm256_setzero_si256();
          if constexpr (NIB) xh = _mm256_loadu_si256((const __m256i*)(qhi + off));
          if constexpr (ZC) nc = _mm256_loadu_si256((const __m256i*)(ncorr + loff));
          for (int b = 0; b < NB; ++b) {
            __m256i s;
            if constexpr (NIB)  // both nibbles' pair sums in int16: |sum| <= 4 * 63 * 128
              s = _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(wlo[b], xl),
                                                     _mm256_maddubs_epi16(whi[b], xh)),
                                    _mm256_set1_epi16(1));
            else
              s = dot4(_mm256_abs_epi8(wlo[b]), _mm256_sign_epi8(xl, wlo[b]));
            if constexpr (ZC) s = _mm256_add_epi32(nc, s);
            acc[m][b][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(ws[b], xd),
                                           acc[m][b][h]);
          }
        }
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int b = 0; b < NB; ++b) {
      const int64_t n = n0 + b;
      float v = reduce16(acc[m][b][0], acc[m][b][1]);
      if (w.Mn) {  // + sum_g (-o_g) gsum_g: 16 groups per lane pass, then the lanes' sum
        const float* ob = obuf + b * stride;
        const float* gs = xq.gsum.data() + (m0 + m) * ng;
        __m256 o0 = _mm256_setzero_ps(), o1 = _mm256_setzero_ps();
        const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        for (int64_t g = 0; g < ng; g += 16) {
          const int64_t cnt = std::min<int64_t>(16, ng - g);
          const __m256i k0 = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)cnt), idx);
          const __m256i k1 = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)cnt - 8), idx);
          o0 = _mm256_fmadd_ps(_mm256_maskload_ps(ob + g, k0), _mm256_maskload_ps(gs + g, k0), o0);
          o1 = _mm256_fmadd_ps(_mm256_maskload_ps(ob + g + 8, k1),
                               _mm256_maskload_ps(gs + g + 8, k1), o1);
        }
        v += reduce16(o0, o1);
      }
      store(y, y_bf16, m * ldy + n, v + load_bias(bias, y_bf16, n));
    }
}
#endif

#if QM_VNNI
// NB output rows at a time, MB activation rows
template <int MB, int NB, int BITS, int G>
inline void block_a8(const QW& w, const XQ& xq, int64_t m0, int64_t n0, void* y, bool y_bf16,
                     int64_t ldy, const void* bias) {
  constexpr bool NIB = BITS != 8;
  constexpr bool TWO = NIB && G == 16;  // a lane's low and high nibbles are two groups
  __m512 acc[MB][NB];
  for (int m = 0; m < MB; ++m)
    for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_setzero_ps();
  const int64_t ng = w.ng(), C = xq.chunks, row_bytes = w.row_bytes(), hb = w.h_bytes();
  // the rows' group scales and negated offsets (fp32, exact), 8 zeros past the last group
  const int64_t stride = ng + 8;
  thread_local std::vector<float> scratch;
  if ((int64_t)scratch.size() < 2 * NB * stride) scratch.resize(2 * NB * stride);
  float* sbuf = scratch.data();
  float* obuf = sbuf + NB * stride;
  group_factors(w, n0, NB, sbuf, obuf, stride);
  for (int b = 0; b < NB; ++b)
    for (int64_t g = ng; g < stride; ++g) sbuf[b * stride + g] = obuf[b * stride + g] = 0.0f;
  // lane l of a chunk belongs to group GPC * c + l / (16 / GPC) (TWO: its low nibbles to
  // group 8 c + 2 (l / 4), its high ones to the next)
  constexpr int GPC = TWO ? 8 : (NIB || G == 16) ? 4 : 2;
  const __m512i gidx = GPC == 2
      ? _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0)
      : _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  const __m512i glo = _mm512_set_epi32(6, 6, 6, 6, 4, 4, 4, 4, 2, 2, 2, 2, 0, 0, 0, 0);
  const __m512i ghi = _mm512_set_epi32(7, 7, 7, 7, 5, 5, 5, 5, 3, 3, 3, 3, 1, 1, 1, 1);
  const __m512i lo4 = _mm512_set1_epi8(0x0f), flip = _mm512_set1_epi8((char)0x80);
  const __m512i c16 = _mm512_set1_epi8(16), c32 = _mm512_set1_epi8(32);
  const uint8_t* crow[NB];
  const uint8_t* hrow[NB];
  for (int b = 0; b < NB; ++b) {
    crow[b] = w.codes + (n0 + b) * row_bytes;
    hrow[b] = w.qh ? w.qh + (n0 + b) * hb : nullptr;
  }
  const int8_t* qlo = xq.qlo.data() + m0 * C * 64;
  const int8_t* qhi = NIB ? xq.qhi.data() + m0 * C * 64 : nullptr;
  const float* dexp = xq.dexp.data() + m0 * C * 16;
  const int32_t* ncorr = xq.ncorr.empty() ? nullptr : xq.ncorr.data() + m0 * C * 16;
  const int32_t* ncorr_hi = xq.ncorr_hi.empty() ? nullptr : xq.ncorr_hi.data() + m0 * C * 16;
  for (int64_t c = 0; c < C; ++c) {
    const int64_t nbytes = std::min<int64_t>(64, row_bytes - c * 64);
    const __mmask64 km = nbytes == 64 ? ~(__mmask64)0 : (((__mmask64)1 << nbytes) - 1);
    for (int b = 0; b < NB; ++b)  // the same line of the rows some blocks ahead
      _mm_prefetch((const char*)(crow[b] + QM_PF * NB * row_bytes + c * 64), _MM_HINT_T0);
    __m512i wlo[NB], whi[NB];
    __m512 ws[NB], wh[NB];
    for (int b = 0; b < NB; ++b) {
      const __m512i v = _mm512_maskz_loadu_epi8(km, crow[b] + c * 64);
      if constexpr (NIB) {
        wlo[b] = _mm512_and_si512(v, lo4);
        whi[b] = _mm512_and_si512(_mm512_srli_epi16(v, 4), lo4);
        if constexpr (BITS > 4) {  // the high bit planes: + 16 (and + 32) where set
          uint64_t h[4];
          std::memcpy(h, hrow[b] + c * 16 * (BITS - 4), 16 * (BITS - 4));
          wlo[b] = _mm512_mask_add_epi8(wlo[b], _cvtu64_mask64(h[0]), wlo[b], c16);
          whi[b] = _mm512_mask_add_epi8(whi[b], _cvtu64_mask64(h[1]), whi[b], c16);
          if constexpr (BITS > 5) {
            wlo[b] = _mm512_mask_add_epi8(wlo[b], _cvtu64_mask64(h[2]), wlo[b], c32);
            whi[b] = _mm512_mask_add_epi8(whi[b], _cvtu64_mask64(h[3]), whi[b], c32);
          }
        }
      } else {
        wlo[b] = _mm512_maskz_mov_epi8(km, _mm512_xor_si512(v, flip));
        whi[b] = wlo[b];
      }
      if constexpr (TWO) {
        const __m512 f = _mm512_castps256_ps512(_mm256_loadu_ps(sbuf + b * stride + 8 * c));
        ws[b] = _mm512_permutexvar_ps(glo, f);
        wh[b] = _mm512_permutexvar_ps(ghi, f);
      } else {
        ws[b] = _mm512_permutexvar_ps(
            gidx, _mm512_castps128_ps512(_mm_loadu_ps(sbuf + b * stride + GPC * c)));
        wh[b] = ws[b];
      }
    }
    for (int m = 0; m < MB; ++m) {
      const __m512i xl = _mm512_loadu_si512(qlo + (m * C + c) * 64);
      const __m512 xd = _mm512_loadu_ps(dexp + (m * C + c) * 16);
      const __m512i xh = NIB ? _mm512_loadu_si512(qhi + (m * C + c) * 64) : xl;
      const __m512i nc = ncorr ? _mm512_loadu_si512(ncorr + (m * C + c) * 16)
                               : _mm512_setzero_si512();
      if constexpr (TWO) {
        const __m512i nh = ncorr_hi ? _mm512_loadu_si512(ncorr_hi + (m * C + c) * 16)
                                    : _mm512_setzero_si512();
        for (int b = 0; b < NB; ++b) {
          const __m512i sl = _mm512_dpbusd_epi32(nc, wlo[b], xl);
          const __m512i sh = _mm512_dpbusd_epi32(nh, whi[b], xh);
          acc[m][b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sl), _mm512_mul_ps(ws[b], xd), acc[m][b]);
          acc[m][b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sh), _mm512_mul_ps(wh[b], xd), acc[m][b]);
        }
      } else {
        for (int b = 0; b < NB; ++b) {
          __m512i s = _mm512_dpbusd_epi32(nc, wlo[b], xl);
          if constexpr (NIB) s = _mm512_dpbusd_epi32(s, whi[b], xh);
          acc[m][b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(ws[b], xd), acc[m][b]);
        }
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int b = 0; b < NB; ++b) {
      const int64_t n = n0 + b;
      float v = _mm512_reduce_add_ps(acc[m][b]);
      if (w.Mn) {  // + sum_g (-o_g) gsum_g: 16 groups per lane pass, then the lanes' sum
        const float* ob = obuf + b * stride;
        const float* gs = xq.gsum.data() + (m0 + m) * ng;
        __m512 o = _mm512_setzero_ps();
        for (int64_t g = 0; g < ng; g += 16) {
          const __mmask16 gm = ng - g >= 16 ? (__mmask16)0xffff
                                            : (__mmask16)((1u << (ng - g)) - 1);
          o = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(gm, ob + g), _mm512_maskz_loadu_ps(gm, gs + g),
                              o);
        }
        v += _mm512_reduce_add_ps(o);
      }
      store(y, y_bf16, m * ldy + n, v + load_bias(bias, y_bf16, n));
    }
}

#define QM_BLOCK_A8 block_a8
#else
template <int MB, int NB, int BITS, int G>
inline void block_a8_z(const QW& w, const XQ& xq, int64_t m0, int64_t n0, void* y, bool y_bf16,
                       int64_t ldy, const void* bias) {
  if constexpr (BITS != 8) {  // (8-bit codes have no integer starts on this path)
    if (w.z) return block_a8_avx2<MB, NB, BITS, G, true>(w, xq, m0, n0, y, y_bf16, ldy, bias);
  }
  block_a8_avx2<MB, NB, BITS, G, false>(w, xq, m0, n0, y, y_bf16, ldy, bias);
}
#define QM_BLOCK_A8 block_a8_z
#endif

template <int MB, int BITS, int G>
void rows_a8(const QW& w, const XQ& xq, int64_t m0, int64_t n0, int64_t n1, void* y, bool y_bf16,
             int64_t ldy, const void* bias) {
  // (as rows_avx512; AVX2 has 16 vector registers: one row at a time past 2 rows of x)
  constexpr int NB = (QM_VNNI || MB <= 2) ? 2 : 1;
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) QM_BLOCK_A8<MB, NB, BITS, G>(w, xq, m0, n, y, y_bf16, ldy, bias);
  for (; n < n1; ++n) QM_BLOCK_A8<MB, 1, BITS, G>(w, xq, m0, n, y, y_bf16, ldy, bias);
}

template <int BITS, int G>
void rows_a8_mb(const QW& w, const XQ& xq, int64_t m0, int64_t mb, int64_t n0, int64_t n1,
                void* y, bool y_bf16, int64_t ldy, const void* bias) {
  switch (mb) {
    case 1: return rows_a8<1, BITS, G>(w, xq, m0, n0, n1, y, y_bf16, ldy, bias);
    case 2: return rows_a8<2, BITS, G>(w, xq, m0, n0, n1, y, y_bf16, ldy, bias);
    case 3: return rows_a8<3, BITS, G>(w, xq, m0, n0, n1, y, y_bf16, ldy, bias);
    case 4: return rows_a8<4, BITS, G>(w, xq, m0, n0, n1, y, y_bf16, ldy, bias);
    case 5: return rows_a8<5, BITS, G>(w, xq, m0, n0, n1, y, y_bf16, ldy, bias);
    case 6: return rows_a8<6, BITS, G>(w, xq, m0, n0, n1, y, y_bf16, ldy, bias);
    case 7: return rows_a8<7, BITS, G>(w, xq, m0, n0, n1, y, y_bf16, ldy, bias);
    default: return rows_a8<8, BITS, G>(w, xq, m0, n0, n1, y, y_bf16, ldy, bias);
  }
}
#else
#define QM_A8 0
#define QM_VNNI 0
#endif

constexpr int64_t MB_MAX = 8;
#if QM_A8
constexpr int64_t MB_A8 = QM_VNNI ? 8 : 4;  // rows of x per pass of the int8-activation kernel
#endif
constexpr int64_t ROW_CHUNK = 16;  // rows of W per task (a multiple of NB)
constexpr int64_t MIN_WORK_PER_THREAD = 1 << 19;

// x as fp32: x itself, or its bf16 values converted into buf
inline const float* as_f32(const void* x, bool bf16, int64_t n, std::vector<float>& buf) {
  if (!bf16) return (const float*)x;
  buf.resize(n);
  const uint16_t* xb = (const uint16_t*)x;
  for (int64_t i = 0; i < n; ++i) buf[i] = bf16_to_f32(xb[i]);
  return buf.data();
}

// a thread per half a million weights (times blocks of 4 rows) at least: smaller products are
// not worth a fork and a join (on a busy machine the join can wait for a time slice)
inline int threads_for(int64_t N, int64_t K, int64_t M, int64_t tasks, int nthreads) {
  const int64_t work = N * K * ((M + 3) / 4);
  return (int)std::max<int64_t>(
      1, std::min<int64_t>({(int64_t)nthreads, tasks, work / MIN_WORK_PER_THREAD}));
}

// 0, or the entry points' error code for an unsupported layout (-1) or shape (-2)
inline int check_layout(int bits, int G, int gps, const uint8_t* qh, int z, int64_t N,
                        int64_t K) {
  const bool nib = bits == 4 || bits == 5 || bits == 6;
  if (!((bits == 4 && G == 32) || ((bits == 5 || bits == 6 || bits == 8) && (G == 16 || G == 32))))
    return -1;
  if (N > 0 && (qh != nullptr) != (bits == 5 || bits == 6)) return -1;  // (N = 0: qh is empty)
  if (nib ? (z < 0 || z >= (1 << bits)) : z != 0) return -1;
  if (gps < 1 || K < 1 || K % ((int64_t)G * gps) != 0 || (nib && K % 32 != 0)) return -2;
  return 0;
}

}  // namespace

extern "C" {

int qm_has_avx512() { return QM_AVX512; }
int qm_has_avx2() { return QM_AVX512 || QM_AVX2; }  // a vector path (AVX-512, or AVX2 + FMA)

// y[M, N] (leading dimension ldy) = x[M, K] w^T (+ bias[N]); x_bf16 / y_bf16 choose the
// dtypes (bias has y's dtype). Returns 0, or a negative code for an unsupported layout.
int qm_matmul(const void* x, int x_bf16, int64_t M, const uint8_t* codes, int bits, int G,
              int gps, const float* D, const int8_t* sc, const float* Mn, const int8_t* mq,
              const uint8_t* qh, int z, int64_t N, int64_t K, void* y, int y_bf16, int64_t ldy, const void* bias,
              int nthreads) {
  if (const int rc = check_layout(bits, G, gps, qh, z, N, K)) return rc;
  if (M < 1) return -2;
  QW w{codes, bits, G, gps, D, sc, Mn, mq, qh, z, N, K};
  std::vector<float> xf;
  const float* xp = as_f32(x, x_bf16, M * K, xf);
  const int64_t tasks = (N + ROW_CHUNK - 1) / ROW_CHUNK;
  const int nt = threads_for(N, K, M, tasks, nthreads);
#pragma omp parallel num_threads(nt)
  {
#if !QM_AVX512 && !QM_AVX2
    std::vector<float> wrow(K);
#endif
#pragma omp for schedule(dynamic, 4)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t n0 = t * ROW_CHUNK, n1 = std::min(N, n0 + ROW_CHUNK);
      for (int64_t m0 = 0; m0 < M; m0 += MB_MAX) {
        const int64_t mb = std::min(MB_MAX, M - m0);
        const float* xm = xp + m0 * K;
        void* ym = y_bf16 ? (void*)((uint16_t*)y + m0 * ldy) : (void*)((float*)y + m0 * ldy);
#if QM_AVX512
        QM_DISPATCH(bits, G, rows_mb, (w, xm, mb, n0, n1, ym, y_bf16, ldy, bias));
#elif QM_AVX2
        QM_DISPATCH(bits, G, rows_mb_avx2, (w, xm, mb, n0, n1, ym, y_bf16, ldy, bias));
#else
        rows_scalar(w, xm, mb, n0, n1, ym, y_bf16, ldy, bias, wrow.data());
#endif
      }
    }
  }
  return 0;
}

// as qm_matmul, with the activations quantised to int8 per block of 32 inputs (QM_A8 builds:
// AVX-512 VNNI or AVX2; -4 otherwise). K must be a multiple of 32.
int qm_matmul_a8(const void* x, int x_bf16, int64_t M, const uint8_t* codes, int bits, int G,
                 int gps, const float* D, const int8_t* sc, const float* Mn, const int8_t* mq,
                 const uint8_t* qh, int z, int64_t N, int64_t K, void* y, int y_bf16, int64_t ldy, const void* bias,
                 int nthreads) {
#if QM_A8
  if (const int rc = check_layout(bits, G, gps, qh, z, N, K)) return rc;
  if (K % 32 != 0 || M < 1) return -2;
  QW w{codes, bits, G, gps, D, sc, Mn, mq, qh, z, N, K};
  std::vector<float> xf;
  const float* xp = as_f32(x, x_bf16, M * K, xf);
  XQ xq;
  quantise_x(xp, M, K, bits, G, z, Mn != nullptr, xq);
  const int64_t tasks = (N + ROW_CHUNK - 1) / ROW_CHUNK;
  const int nt = threads_for(N, K, M, tasks, nthreads);
#pragma omp parallel for num_threads(nt) schedule(dynamic, 4)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t n0 = t * ROW_CHUNK, n1 = std::min(N, n0 + ROW_CHUNK);
    for (int64_t m0 = 0; m0 < M; m0 += MB_A8) {
      const int64_t mb = std::min(MB_A8, M - m0);
      void* ym = y_bf16 ? (void*)((uint16_t*)y + m0 * ldy) : (void*)((float*)y + m0 * ldy);
      QM_DISPATCH(bits, G, rows_a8_mb, (w, xq, m0, mb, n0, n1, ym, y_bf16, ldy, bias));
    }
  }
  return 0;
#else
  (void)x, (void)x_bf16, (void)M, (void)codes, (void)bits, (void)G, (void)gps, (void)D, (void)sc;
  (void)Mn, (void)mq, (void)qh, (void)z, (void)N, (void)K, (void)y, (void)y_bf16, (void)ldy, (void)bias;
  (void)nthreads;
  return -4;
#endif
}

int qm_has_a8() { return QM_A8; }  // the int8-activation kernel (AVX-512 VNNI, or AVX2)

// out[r, K] = the de-quantised rows rows[r] (all rows 0..R-1 when rows is null), fp32 or bf16
int qm_dequant(const uint8_t* codes, int bits, int G, int gps, const float* D, const int8_t* sc,
               const float* Mn, const int8_t* mq, const uint8_t* qh, int z, int64_t N, int64_t K,
               const int64_t* rows, int64_t R, void* out, int out_bf16, int nthreads) {
  if (const int rc = check_layout(bits, G, gps, qh, z, N, K)) return rc;
  QW w{codes, bits, G, gps, D, sc, Mn, mq, qh, z, N, K};
  for (int64_t r = 0; rows && r < R; ++r)
    if (rows[r] < 0 || rows[r] >= N) return -3;
  const int nt = (int)std::max<int64_t>(1, std::min<int64_t>(nthreads, R / 64 + 1));
#pragma omp parallel num_threads(nt)
  {
    std::vector<float> buf(K);
#pragma omp for schedule(dynamic, 8)
    for (int64_t r = 0; r < R; ++r) {
      const int64_t n = rows ? rows[r] : r;
      float* dst = out_bf16 ? buf.data() : (float*)out + r * K;
#if QM_AVX512
      QM_DISPATCH(bits, G, dequant_row_avx512, (w, n, dst));
#elif QM_AVX2
      QM_DISPATCH(bits, G, dequant_row_avx2, (w, n, dst));
#else
      dequant_row(w, n, dst);
#endif
      if (out_bf16) {
        uint16_t* o = (uint16_t*)out + r * K;
        int64_t k = 0;
#if QM_AVX512
        // round to nearest even, as f32_to_bf16 (the weights are finite)
        const __m512i bias7 = _mm512_set1_epi32(0x7fff), one = _mm512_set1_epi32(1);
        for (; k + 16 <= K; k += 16) {
          __m512i u = _mm512_castps_si512(_mm512_loadu_ps(dst + k));
          const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
          u = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, bias7), lsb), 16);
          _mm256_storeu_si256((__m256i*)(o + k), _mm512_cvtepi32_epi16(u));
        }
#elif QM_AVX2
        const __m256i bias7 = _mm256_set1_epi32(0x7fff), one = _mm256_set1_epi32(1);
        for (; k + 8 <= K; k += 8) {
          __m256i u = _mm256_castps_si256(_mm256_loadu_ps(dst + k));
          const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), one);
          u = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, bias7), lsb), 16);
          _mm_storeu_si128((__m128i*)(o + k), _mm_packus_epi32(_mm256_castsi256_si128(u),
                                                               _mm256_extracti128_si256(u, 1)));
        }
#endif
        for (; k < K; ++k) o[k] = f32_to_bf16(dst[k]);
      }
    }
  }
  return 0;
}

}  // extern "C"
