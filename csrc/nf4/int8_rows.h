// Rows of an int8 matrix with one fp32 scale per row: out[m, r] = scale[r] * sum_j q[r, j] x[m, j]. The optional
// int8 storage of the lm_head (phi3fast.model.lm_head): a quarter of the fp32 head's bytes, which is what a
// decode step's vocabulary projection is bound by. Each int8 widens to fp32 exactly; sums in fp32.
#pragma once

#include <cstdint>
#include <stdexcept>

#include "common/simd.h"

namespace phi3fast {
namespace nf4 {

constexpr int kInt8MaxRows = 8;  // x rows per pass over a weight row

template <int MR>
void int8_rows_scalar(const int8_t* q, const float* scale, int64_t k, const float* x, int64_t r0, int64_t r1,
                      float* acc, int64_t ldo) {
  for (int64_t r = r0; r < r1; ++r) {
    float s[MR] = {};
    for (int64_t j = 0; j < k; ++j)
      for (int m = 0; m < MR; ++m) s[m] += static_cast<float>(q[r * k + j]) * x[m * k + j];
    for (int m = 0; m < MR; ++m) acc[m * ldo + r] = scale[r] * s[m];
  }
}

#ifdef PHI3FAST_X86
template <int MR>
__attribute__((target("avx512f"))) void int8_rows_avx512(const int8_t* q, const float* scale, int64_t k,
                                                         const float* x, int64_t r0, int64_t r1, float* acc,
                                                         int64_t ldo) {
  const int64_t k16 = k / 16 * 16;
  for (int64_t r = r0; r < r1; ++r) {
    __m512 s[MR];
    for (int m = 0; m < MR; ++m) s[m] = _mm512_setzero_ps();
    for (int64_t j = 0; j < k16; j += 16) {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + r * k + j));
      const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
      for (int m = 0; m < MR; ++m) s[m] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * k + j), s[m]);
    }
    for (int m = 0; m < MR; ++m) {
      float v = _mm512_reduce_add_ps(s[m]);
      for (int64_t j = k16; j < k; ++j) v += static_cast<float>(q[r * k + j]) * x[m * k + j];
      acc[m * ldo + r] = scale[r] * v;
    }
  }
}

template <int MR>
__attribute__((target("avx2,fma"))) void int8_rows_avx2(const int8_t* q, const float* scale, int64_t k,
                                                        const float* x, int64_t r0, int64_t r1, float* acc,
                                                        int64_t ldo) {
  const int64_t k8 = k / 8 * 8;
  for (int64_t r = r0; r < r1; ++r) {
    __m256 s[MR];
    for (int m = 0; m < MR; ++m) s[m] = _mm256_setzero_ps();
    for (int64_t j = 0; j < k8; j += 8) {
      const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + r * k + j));
      const __m256 wv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
      for (int m = 0; m < MR; ++m) s[m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * k + j), s[m]);
    }
    for (int m = 0; m < MR; ++m) {
      __m128 lo = _mm_add_ps(_mm256_castps256_ps128(s[m]), _mm256_extractf128_ps(s[m], 1));
      lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
      lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
      float v = _mm_cvtss_f32(lo);
      for (int64_t j = k8; j < k; ++j) v += static_cast<float>(q[r * k + j]) * x[m * k + j];
      acc[m * ldo + r] = scale[r] * v;
    }
  }
}
#endif

// acc[m * ldo + r] for rows r in [r0, r1) and mr (<= kInt8MaxRows) x rows of length k.
inline void int8_rows(SimdLevel s, int mr, const int8_t* q, const float* scale, int64_t k, const float* x,
                      int64_t r0, int64_t r1, float* acc, int64_t ldo) {
#define PHI3FAST_INT8_SWITCH(FN)                               \
  switch (mr) {                                                \
    case 1: return FN<1>(q, scale, k, x, r0, r1, acc, ldo);    \
    case 2: return FN<2>(q, scale, k, x, r0, r1, acc, ldo);    \
    case 3: return FN<3>(q, scale, k, x, r0, r1, acc, ldo);    \
    case 4: return FN<4>(q, scale, k, x, r0, r1, acc, ldo);    \
    case 5: return FN<5>(q, scale, k, x, r0, r1, acc, ldo);    \
    case 6: return FN<6>(q, scale, k, x, r0, r1, acc, ldo);    \
    case 7: return FN<7>(q, scale, k, x, r0, r1, acc, ldo);    \
    case 8: return FN<8>(q, scale, k, x, r0, r1, acc, ldo);    \
    default: throw std::logic_error("int8_rows: bad row count"); \
  }
#ifdef PHI3FAST_X86
  if (s == SimdLevel::AVX512) { PHI3FAST_INT8_SWITCH(int8_rows_avx512) }
  if (s == SimdLevel::AVX2) { PHI3FAST_INT8_SWITCH(int8_rows_avx2) }
#endif
  PHI3FAST_INT8_SWITCH(int8_rows_scalar)
#undef PHI3FAST_INT8_SWITCH
}

}  // namespace nf4
}  // namespace phi3fast
