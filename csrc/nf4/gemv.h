// Small-M forward (decode, M <= 16): out[m, n] = sum_k x[m, k] W[n, k], streaming each packed byte of W once.
//
// Nibble order (note): a byte holds W[n, 2i] (high nibble) and W[n, 2i+1] (low). Instead of interleaving the
// decoded weights back into row order, x is permuted once per call: within each group of 2L elements (L = SIMD
// lanes) the even elements come first, then the odd ones. Then the high nibbles of L bytes meet x's evens and the
// low nibbles its odds, each one FMA. The codebook sits in registers (one zmm, or two ymm), multiplied by the
// block's scale once per block, so each decoded weight is code * scale rounded once, as the reference has it.
#pragma once

#include <cstdint>

#include "common/simd.h"
#include "nf4/weight.h"

namespace phi3fast {
namespace nf4 {

// Elements per permutation group of each SIMD level (0: no permutation).
inline int64_t gemv_group(SimdLevel s) { return s == SimdLevel::AVX512 ? 32 : s == SimdLevel::AVX2 ? 16 : 0; }

// Strided layout (AVX-512, K and the blocksize multiples of 64; note): 64 packed bytes are loaded as 16 dwords
// and the dword shifted right by 0, 4, ..., 28 bits; vpermps reads only an index's low 4 bits, so each shift is
// directly the codebook index of one nibble per lane, without widening the bytes or masking. Lane i of shift
// 4c holds element 8i + (c ^ 1) of the 128-element group (byte 4i + c/2; its low nibble is the odd element), so
// x is permuted to match: xp[e0 + 16c + i] = x[e0 + 8i + (c ^ 1)]. A 64-element tail (K = 64 mod 128) loads 32
// bytes widened to 16-bit lanes: element 4i + (c ^ 1) of shift 4c, c < 4. One group covers two 64-blocks
// (lanes 0-7 and 8-15), so the block scale multiplies the group's sum per lane: sum(code * x) * scale, the
// rounding the scalar path has.
constexpr int64_t kStridedGroup = -1;  // gemv_group's value for the strided layout

inline bool gemv_strided(SimdLevel s, const WeightView& w) {
  return s == SimdLevel::AVX512 && w.k % 64 == 0 && w.blocksize % 64 == 0;
}

inline int64_t gemv_group(SimdLevel s, const WeightView& w) { return gemv_strided(s, w) ? kStridedGroup : gemv_group(s); }

inline void permute_strided(const float* src, int64_t k, float* dst) {
  int64_t e0 = 0;
  for (; e0 + 128 <= k; e0 += 128)
    for (int c = 0; c < 8; ++c)
      for (int i = 0; i < 16; ++i) dst[e0 + 16 * c + i] = src[e0 + 8 * i + (c ^ 1)];
  if (e0 < k)
    for (int c = 0; c < 4; ++c)
      for (int i = 0; i < 16; ++i) dst[e0 + 16 * c + i] = src[e0 + 4 * i + (c ^ 1)];
}

// xp[m * k + ...] = x rows in fp32, permuted in groups of `g` (evens first); k is a multiple of g.
inline void permute_rows(const float* x, int64_t m, int64_t k, int64_t g, float* xp) {
  for (int64_t r = 0; r < m; ++r) {
    const float* src = x + r * k;
    float* dst = xp + r * k;
    if (g == kStridedGroup) {
      permute_strided(src, k, dst);
      continue;
    }
    if (g == 0) {
      for (int64_t j = 0; j < k; ++j) dst[j] = src[j];
      continue;
    }
    for (int64_t j0 = 0; j0 < k; j0 += g)
      for (int64_t i = 0; i < g / 2; ++i) {
        dst[j0 + i] = src[j0 + 2 * i];
        dst[j0 + g / 2 + i] = src[j0 + 2 * i + 1];
      }
  }
}

// ---- scalar ----
template <int MR>
void gemv_rows_scalar(const WeightView& w, const float* xp, int64_t r0, int64_t r1, float* acc_out) {
  const int64_t bpr = w.k / w.blocksize;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* bytes = w.row(r);
    float acc[MR] = {};
    for (int64_t b = 0; b < bpr; ++b) {
      const float s = w.scale(r * bpr + b);
      float blk[MR] = {};
      for (int64_t i = b * w.blocksize / 2; i < (b + 1) * w.blocksize / 2; ++i) {
        const float w0 = w.code[bytes[i] >> 4], w1 = w.code[bytes[i] & 15];
        for (int m = 0; m < MR; ++m) blk[m] += w0 * xp[m * w.k + 2 * i] + w1 * xp[m * w.k + 2 * i + 1];
      }
      // scale after the block sum: one multiply per block; the reference's fp32 code*scale differs only in rounding
      for (int m = 0; m < MR; ++m) acc[m] += blk[m] * s;
    }
    for (int m = 0; m < MR; ++m) acc_out[m * w.n + r] = acc[m];
  }
}

#ifdef PHI3FAST_X86
// ---- AVX-512: 16 bytes -> 32 weights per step, codebook lookup with vpermps ----
__attribute__((target("avx512f"))) inline float hsum512(__m512 v) { return _mm512_reduce_add_ps(v); }

template <int MR>
__attribute__((target("avx512f"))) void gemv_rows_avx512(const WeightView& w, const float* xp, int64_t r0,
                                                         int64_t r1, float* acc_out) {
  const int64_t bpr = w.k / w.blocksize, k = w.k;
  const __m512 cb = _mm512_loadu_ps(w.code);
  const __m512i low4 = _mm512_set1_epi32(15);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* bytes = w.row(r);
    __m512 acc[MR];
    for (int m = 0; m < MR; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < bpr; ++b) {
      const __m512 cbs = _mm512_mul_ps(cb, _mm512_set1_ps(w.scale(r * bpr + b)));
      for (int64_t j = b * w.blocksize; j < (b + 1) * w.blocksize; j += 32) {
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + j / 2)));
        const __m512 whi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), cbs);
        const __m512 wlo = _mm512_permutexvar_ps(_mm512_and_si512(v, low4), cbs);
        for (int m = 0; m < MR; ++m) {
          acc[m] = _mm512_fmadd_ps(whi, _mm512_loadu_ps(xp + m * k + j), acc[m]);
          acc[m] = _mm512_fmadd_ps(wlo, _mm512_loadu_ps(xp + m * k + j + 16), acc[m]);
        }
      }
    }
    for (int m = 0; m < MR; ++m) acc_out[m * w.n + r] = hsum512(acc[m]);
  }
}

template <int MR>
__attribute__((target("avx512f"))) void gemv_rows_strided(const WeightView& w, const float* xp, int64_t r0,
                                                          int64_t r1, float* acc_out) {
  constexpr int C = 2;  // accumulator chains per row (FMA latency at M = 1); the same for every MR, so a
                       // row gets the same bits whichever rows share its pass
  const int64_t k = w.k, bs = w.blocksize, bpr = k / bs, k128 = k / 128 * 128;
  const __m512 cb = _mm512_loadu_ps(w.code);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* bytes = w.row(r);
    __m512 tot[MR];
    for (int m = 0; m < MR; ++m) tot[m] = _mm512_setzero_ps();
    for (int64_t e0 = 0; e0 < k128; e0 += 128) {
      const __m512i v = _mm512_loadu_si512(bytes + e0 / 2);
      __m512 g[MR][C];
      for (int m = 0; m < MR; ++m)
        for (int a = 0; a < C; ++a) g[m][a] = _mm512_setzero_ps();
#pragma GCC unroll 8
      for (int c = 0; c < 8; ++c) {
        const __m512 wc = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4 * c), cb);
        for (int m = 0; m < MR; ++m)
          g[m][c % C] = _mm512_fmadd_ps(wc, _mm512_loadu_ps(xp + m * k + e0 + 16 * c), g[m][c % C]);
      }
      const int64_t blk = r * bpr + e0 / bs;
      const __m512 sv = bs == 64 ? _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(w.scale(blk)),
                                                        _mm512_set1_ps(w.scale(blk + 1)))
                                 : _mm512_set1_ps(w.scale(blk));
      for (int m = 0; m < MR; ++m) {
        const __m512 sum = C == 2 ? _mm512_add_ps(g[m][0], g[m][C - 1]) : g[m][0];
        tot[m] = _mm512_fmadd_ps(sum, sv, tot[m]);
      }
    }
    if (k128 < k) {  // the 64-element tail (one block: bs == 64 here)
      const __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes + k128 / 2)));
      __m512 g[MR];
      for (int m = 0; m < MR; ++m) g[m] = _mm512_setzero_ps();
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) {
        const __m512 wc = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4 * c), cb);
        for (int m = 0; m < MR; ++m) g[m] = _mm512_fmadd_ps(wc, _mm512_loadu_ps(xp + m * k + k128 + 16 * c), g[m]);
      }
      const __m512 sv = _mm512_set1_ps(w.scale(r * bpr + k128 / bs));
      for (int m = 0; m < MR; ++m) tot[m] = _mm512_fmadd_ps(g[m], sv, tot[m]);
    }
    for (int m = 0; m < MR; ++m) acc_out[m * w.n + r] = hsum512(tot[m]);
  }
}

// ---- AVX2: 8 bytes -> 16 weights per step; the 16-entry codebook is two 8-entry halves picked by bit 3 ----
__attribute__((target("avx2,fma"))) inline float hsum256_nf4(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

__attribute__((target("avx2,fma"))) inline __m256 lookup16_avx2(__m256i idx, __m256 lo8, __m256 hi8) {
  const __m256 a = _mm256_permutevar8x32_ps(lo8, idx), b = _mm256_permutevar8x32_ps(hi8, idx);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));  // bit 3 -> sign bit
}

template <int MR>
__attribute__((target("avx2,fma"))) void gemv_rows_avx2(const WeightView& w, const float* xp, int64_t r0,
                                                        int64_t r1, float* acc_out) {
  const int64_t bpr = w.k / w.blocksize, k = w.k;
  const __m256 cb_lo = _mm256_loadu_ps(w.code), cb_hi = _mm256_loadu_ps(w.code + 8);
  const __m256i low4 = _mm256_set1_epi32(15);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* bytes = w.row(r);
    __m256 acc[MR];
    for (int m = 0; m < MR; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < bpr; ++b) {
      const __m256 s = _mm256_set1_ps(w.scale(r * bpr + b));
      const __m256 lo8 = _mm256_mul_ps(cb_lo, s), hi8 = _mm256_mul_ps(cb_hi, s);
      for (int64_t j = b * w.blocksize; j < (b + 1) * w.blocksize; j += 16) {
        const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + j / 2)));
        const __m256 whi = lookup16_avx2(_mm256_srli_epi32(v, 4), lo8, hi8);
        const __m256 wlo = lookup16_avx2(_mm256_and_si256(v, low4), lo8, hi8);
        for (int m = 0; m < MR; ++m) {
          acc[m] = _mm256_fmadd_ps(whi, _mm256_loadu_ps(xp + m * k + j), acc[m]);
          acc[m] = _mm256_fmadd_ps(wlo, _mm256_loadu_ps(xp + m * k + j + 8), acc[m]);
        }
      }
    }
    for (int m = 0; m < MR; ++m) acc_out[m * w.n + r] = hsum256_nf4(acc[m]);
  }
}
#endif

// Rows per register pass: AVX-512 has 32 vector registers (8 accumulators + codebook + 2 weights), AVX2 16.
inline int gemv_max_rows(SimdLevel s) { return s == SimdLevel::AVX512 ? 8 : 4; }

// out[m, r] for rows r in [r0, r1) and mr (<= gemv_max_rows) x rows at xp (fp32, permuted), written to acc_out
// with row stride w.n.
inline void gemv_rows(SimdLevel s, int mr, const WeightView& w, const float* xp, int64_t r0, int64_t r1,
                      float* acc_out) {
#define PHI3FAST_GEMV_CASE(FN, R) \
  case R: return FN<R>(w, xp, r0, r1, acc_out);
#define PHI3FAST_GEMV_SWITCH(FN)                                                                   \
  switch (mr) {                                                                                    \
    PHI3FAST_GEMV_CASE(FN, 1) PHI3FAST_GEMV_CASE(FN, 2) PHI3FAST_GEMV_CASE(FN, 3)                  \
    PHI3FAST_GEMV_CASE(FN, 4) PHI3FAST_GEMV_CASE(FN, 5) PHI3FAST_GEMV_CASE(FN, 6)                  \
    PHI3FAST_GEMV_CASE(FN, 7) PHI3FAST_GEMV_CASE(FN, 8)                                            \
    default: throw std::logic_error("gemv_rows: bad row count");                                   \
  }
#ifdef PHI3FAST_X86
  if (gemv_strided(s, w)) { PHI3FAST_GEMV_SWITCH(gemv_rows_strided) }
  if (s == SimdLevel::AVX512) { PHI3FAST_GEMV_SWITCH(gemv_rows_avx512) }
  if (s == SimdLevel::AVX2) { PHI3FAST_GEMV_SWITCH(gemv_rows_avx2) }
#endif
  PHI3FAST_GEMV_SWITCH(gemv_rows_scalar)
#undef PHI3FAST_GEMV_SWITCH
#undef PHI3FAST_GEMV_CASE
}

}  // namespace nf4
}  // namespace phi3fast
