// Small-M product with a dense weight: out[m, n] = sum_k x[m, k] W[n, k], W in fp32 or bf16 (lm_head in decode).
// The vocabulary projection is the largest single weight a decode step streams (49152 x 576 fp32 = 113 MB for
// SmolLM2); it runs on the same persistent pool as the NF4 kernels, tolerant of a descheduled worker, instead of
// an OpenMP region. fp32 accumulation; each output is one task's dot product, so any thread count gives the same
// bits.
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>

#include "common/simd.h"
#include "nf4/thread_pool.h"
#include "nf4/weight.h"

namespace phi3fast {
namespace nf4 {

constexpr int kDenseMaxRows = 8;  // x rows per pass over a weight row (accumulators in registers)

template <int MR>
void dense_rows_scalar(const void* w, DType wdt, int64_t k, const float* x, int64_t r0, int64_t r1, float* acc,
                       int64_t ldo) {
  for (int64_t r = r0; r < r1; ++r) {
    float s[MR] = {};
    for (int64_t j = 0; j < k; ++j) {
      const float wv = wdt == DType::F32 ? static_cast<const float*>(w)[r * k + j]
                                         : bf16_to_f32(static_cast<const uint16_t*>(w)[r * k + j]);
      for (int m = 0; m < MR; ++m) s[m] += wv * x[m * k + j];
    }
    for (int m = 0; m < MR; ++m) acc[m * ldo + r] = s[m];
  }
}

#ifdef PHI3FAST_X86
__attribute__((target("avx512f"), always_inline)) inline __m512 load16_avx512(const void* w, DType wdt, int64_t i) {
  if (wdt == DType::F32) return _mm512_loadu_ps(static_cast<const float*>(w) + i);
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(w) + i));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <int MR>
__attribute__((target("avx512f"))) void dense_rows_avx512(const void* w, DType wdt, int64_t k, const float* x,
                                                          int64_t r0, int64_t r1, float* acc, int64_t ldo) {
  const int64_t k16 = k / 16 * 16;
  for (int64_t r = r0; r < r1; ++r) {
    __m512 s[MR];
    for (int m = 0; m < MR; ++m) s[m] = _mm512_setzero_ps();
    for (int64_t j = 0; j < k16; j += 16) {
      const __m512 wv = load16_avx512(w, wdt, r * k + j);
      for (int m = 0; m < MR; ++m) s[m] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * k + j), s[m]);
    }
    for (int m = 0; m < MR; ++m) {
      float v = _mm512_reduce_add_ps(s[m]);
      for (int64_t j = k16; j < k; ++j) {
        const float wv = wdt == DType::F32 ? static_cast<const float*>(w)[r * k + j]
                                           : bf16_to_f32(static_cast<const uint16_t*>(w)[r * k + j]);
        v += wv * x[m * k + j];
      }
      acc[m * ldo + r] = v;
    }
  }
}

__attribute__((target("avx2,fma"), always_inline)) inline __m256 load8_avx2(const void* w, DType wdt, int64_t i) {
  if (wdt == DType::F32) return _mm256_loadu_ps(static_cast<const float*>(w) + i);
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + i));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

__attribute__((target("avx2,fma"))) inline float hsum8(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

template <int MR>
__attribute__((target("avx2,fma"))) void dense_rows_avx2(const void* w, DType wdt, int64_t k, const float* x,
                                                         int64_t r0, int64_t r1, float* acc, int64_t ldo) {
  const int64_t k8 = k / 8 * 8;
  for (int64_t r = r0; r < r1; ++r) {
    __m256 s[MR];
    for (int m = 0; m < MR; ++m) s[m] = _mm256_setzero_ps();
    for (int64_t j = 0; j < k8; j += 8) {
      const __m256 wv = load8_avx2(w, wdt, r * k + j);
      for (int m = 0; m < MR; ++m) s[m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * k + j), s[m]);
    }
    for (int m = 0; m < MR; ++m) {
      float v = hsum8(s[m]);
      for (int64_t j = k8; j < k; ++j) {
        const float wv = wdt == DType::F32 ? static_cast<const float*>(w)[r * k + j]
                                           : bf16_to_f32(static_cast<const uint16_t*>(w)[r * k + j]);
        v += wv * x[m * k + j];
      }
      acc[m * ldo + r] = v;
    }
  }
}
#endif

inline void dense_rows(SimdLevel s, int mr, const void* w, DType wdt, int64_t k, const float* x, int64_t r0,
                       int64_t r1, float* acc, int64_t ldo) {
#define PHI3FAST_DENSE_SWITCH(FN)                                                                     \
  switch (mr) {                                                                                       \
    case 1: return FN<1>(w, wdt, k, x, r0, r1, acc, ldo);                                             \
    case 2: return FN<2>(w, wdt, k, x, r0, r1, acc, ldo);                                             \
    case 3: return FN<3>(w, wdt, k, x, r0, r1, acc, ldo);                                             \
    case 4: return FN<4>(w, wdt, k, x, r0, r1, acc, ldo);                                             \
    case 5: return FN<5>(w, wdt, k, x, r0, r1, acc, ldo);                                             \
    case 6: return FN<6>(w, wdt, k, x, r0, r1, acc, ldo);                                             \
    case 7: return FN<7>(w, wdt, k, x, r0, r1, acc, ldo);                                             \
    case 8: return FN<8>(w, wdt, k, x, r0, r1, acc, ldo);                                             \
    default: throw std::logic_error("dense_rows: bad row count");                                     \
  }
#ifdef PHI3FAST_X86
  if (s == SimdLevel::AVX512) { PHI3FAST_DENSE_SWITCH(dense_rows_avx512) }
  if (s == SimdLevel::AVX2) { PHI3FAST_DENSE_SWITCH(dense_rows_avx2) }
#endif
  PHI3FAST_DENSE_SWITCH(dense_rows_scalar)
#undef PHI3FAST_DENSE_SWITCH
}

// out [M, N] (odt) = x [M, K] W^T with W [N, K] in wdt; x converted to fp32 once.
inline void dense_linear(const void* w, DType wdt, int64_t n, int64_t k, const void* x, DType xdt, int64_t m,
                         void* out, DType odt, SimdLevel s, int threads) {
  if (n <= 0 || k <= 0) throw std::invalid_argument("dense weight must be non-empty");
  if (m == 0) return;
  std::vector<float> xf(static_cast<size_t>(m * k));
  for (int64_t r = 0; r < m; ++r) load_row_f32(x, xdt, k, r, k, xf.data() + r * k);
  const bool direct = odt == DType::F32;
  std::vector<float> acc_buf(direct ? 0 : static_cast<size_t>(m * n));
  float* acc = direct ? static_cast<float*>(out) : acc_buf.data();
  const int t = threads <= 0 ? ThreadPool::max_threads() : threads;
  const int64_t rows_per_task = std::max<int64_t>(64, (n + 8 * t - 1) / (8 * t));
  const int64_t tasks = (n + rows_per_task - 1) / rows_per_task;
  ThreadPool::instance().run(tasks, t, [&](int64_t task) {
    const int64_t r0 = task * rows_per_task, r1 = std::min(n, r0 + rows_per_task);
    for (int64_t m0 = 0; m0 < m; m0 += kDenseMaxRows) {
      const int mr = static_cast<int>(std::min<int64_t>(kDenseMaxRows, m - m0));
      dense_rows(s, mr, w, wdt, k, xf.data() + m0 * k, r0, r1, acc + m0 * n, n);
    }
    if (!direct)
      for (int64_t mi = 0; mi < m; ++mi)
        for (int64_t r = r0; r < r1; ++r) store_f32(out, odt, mi * n + r, acc[mi * n + r]);
  });
}

}  // namespace nf4
}  // namespace phi3fast
