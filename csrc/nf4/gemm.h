// Large-M GEMM against a decoded panel: C[m, p0 + j] = sum_q A[m, q] * panel[q, j], j < NR.
//
// Blocking (note): the driver (kernels.h) decodes a panel of NR output columns of W, for all of the contraction
// dimension, into a per-thread buffer (K * NR fp32: 72 KB at K = 576 and NR = 32, in L2), then sweeps a block of
// rows of A over it, MR rows at a time with MR x NR accumulators held in registers. A panel is decoded once per
// row block and reused by every row in it; W is never decoded whole.
// A second operand segment (A2 [M, Q2] against panel rows Q1..Q1+Q2) adds the LoRA term in the same
// accumulators: y = x W^T + (s t) B^T is [x, s t] [W, B]^T.
#pragma once

#include <cstdint>

#include "common/simd.h"

namespace phi3fast {
namespace nf4 {

struct Segments {
  const float* a1;
  int64_t lda1, q1;
  const float* a2;  // may be null (q2 == 0)
  int64_t lda2, q2;
};

inline int64_t panel_width(SimdLevel s) { return s == SimdLevel::AVX512 ? 32 : s == SimdLevel::AVX2 ? 16 : 8; }
inline int panel_rows(SimdLevel s) { return s == SimdLevel::AVX512 ? 12 : s == SimdLevel::AVX2 ? 6 : 4; }

// ---- scalar: NR = 8 ----
template <int MR>
void micro_scalar(const Segments& sg, const float* panel, int64_t m0, float* c, int64_t ldc) {
  constexpr int NR = 8;
  float acc[MR][NR] = {};
  for (int64_t q = 0; q < sg.q1; ++q)
    for (int m = 0; m < MR; ++m) {
      const float a = sg.a1[(m0 + m) * sg.lda1 + q];
      for (int j = 0; j < NR; ++j) acc[m][j] += a * panel[q * NR + j];
    }
  const float* p2 = panel + sg.q1 * NR;
  for (int64_t q = 0; q < sg.q2; ++q)
    for (int m = 0; m < MR; ++m) {
      const float a = sg.a2[(m0 + m) * sg.lda2 + q];
      for (int j = 0; j < NR; ++j) acc[m][j] += a * p2[q * NR + j];
    }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NR; ++j) c[m * ldc + j] = acc[m][j];
}

#ifdef PHI3FAST_X86
// ---- AVX-512: NR = 32 (two zmm), up to 12 rows: 24 accumulators, A broadcast from memory ----
template <int MR>
__attribute__((target("avx512f"), always_inline)) inline void sweep_avx512(const float* a, int64_t lda, int64_t m0,
                                                                          int64_t q_end, const float* p,
                                                                          __m512* acc0, __m512* acc1) {
  const float* rows[MR];
  for (int m = 0; m < MR; ++m) rows[m] = a + (m0 + m) * lda;
  for (int64_t q = 0; q < q_end; ++q) {
    const __m512 w0 = _mm512_loadu_ps(p + q * 32), w1 = _mm512_loadu_ps(p + q * 32 + 16);
    for (int m = 0; m < MR; ++m) {
      const __m512 av = _mm512_set1_ps(rows[m][q]);
      acc0[m] = _mm512_fmadd_ps(av, w0, acc0[m]);
      acc1[m] = _mm512_fmadd_ps(av, w1, acc1[m]);
    }
  }
}

template <int MR>
__attribute__((target("avx512f"))) void micro_avx512(const Segments& sg, const float* panel, int64_t m0, float* c,
                                                     int64_t ldc) {
  __m512 acc0[MR], acc1[MR];
  for (int m = 0; m < MR; ++m) acc0[m] = acc1[m] = _mm512_setzero_ps();
  sweep_avx512<MR>(sg.a1, sg.lda1, m0, sg.q1, panel, acc0, acc1);
  if (sg.q2) sweep_avx512<MR>(sg.a2, sg.lda2, m0, sg.q2, panel + sg.q1 * 32, acc0, acc1);
  for (int m = 0; m < MR; ++m) {
    _mm512_storeu_ps(c + m * ldc, acc0[m]);
    _mm512_storeu_ps(c + m * ldc + 16, acc1[m]);
  }
}

// ---- AVX2: NR = 16 (two ymm), up to 6 rows: 12 accumulators ----
template <int MR>
__attribute__((target("avx2,fma"), always_inline)) inline void sweep_avx2(const float* a, int64_t lda, int64_t m0,
                                                                         int64_t q_end, const float* p,
                                                                         __m256* acc0, __m256* acc1) {
  const float* rows[MR];
  for (int m = 0; m < MR; ++m) rows[m] = a + (m0 + m) * lda;
  for (int64_t q = 0; q < q_end; ++q) {
    const __m256 w0 = _mm256_loadu_ps(p + q * 16), w1 = _mm256_loadu_ps(p + q * 16 + 8);
    for (int m = 0; m < MR; ++m) {
      const __m256 av = _mm256_broadcast_ss(rows[m] + q);
      acc0[m] = _mm256_fmadd_ps(av, w0, acc0[m]);
      acc1[m] = _mm256_fmadd_ps(av, w1, acc1[m]);
    }
  }
}

template <int MR>
__attribute__((target("avx2,fma"))) void micro_avx2(const Segments& sg, const float* panel, int64_t m0, float* c,
                                                    int64_t ldc) {
  __m256 acc0[MR], acc1[MR];
  for (int m = 0; m < MR; ++m) acc0[m] = acc1[m] = _mm256_setzero_ps();
  sweep_avx2<MR>(sg.a1, sg.lda1, m0, sg.q1, panel, acc0, acc1);
  if (sg.q2) sweep_avx2<MR>(sg.a2, sg.lda2, m0, sg.q2, panel + sg.q1 * 16, acc0, acc1);
  for (int m = 0; m < MR; ++m) {
    _mm256_storeu_ps(c + m * ldc, acc0[m]);
    _mm256_storeu_ps(c + m * ldc + 8, acc1[m]);
  }
}
#endif

// C tile [mr, NR] (row stride ldc) for rows m0..m0+mr of the segments, mr <= panel_rows(s).
inline void micro_tile(SimdLevel s, int mr, const Segments& sg, const float* panel, int64_t m0, float* c,
                       int64_t ldc) {
#define PHI3FAST_MICRO_CASE(FN, R) \
  case R: return FN<R>(sg, panel, m0, c, ldc);
#ifdef PHI3FAST_X86
  if (s == SimdLevel::AVX512) {
    switch (mr) {
      PHI3FAST_MICRO_CASE(micro_avx512, 1) PHI3FAST_MICRO_CASE(micro_avx512, 2)
      PHI3FAST_MICRO_CASE(micro_avx512, 3) PHI3FAST_MICRO_CASE(micro_avx512, 4)
      PHI3FAST_MICRO_CASE(micro_avx512, 5) PHI3FAST_MICRO_CASE(micro_avx512, 6)
      PHI3FAST_MICRO_CASE(micro_avx512, 7) PHI3FAST_MICRO_CASE(micro_avx512, 8)
      PHI3FAST_MICRO_CASE(micro_avx512, 9) PHI3FAST_MICRO_CASE(micro_avx512, 10)
      PHI3FAST_MICRO_CASE(micro_avx512, 11) PHI3FAST_MICRO_CASE(micro_avx512, 12)
      default: break;
    }
  } else if (s == SimdLevel::AVX2) {
    switch (mr) {
      PHI3FAST_MICRO_CASE(micro_avx2, 1) PHI3FAST_MICRO_CASE(micro_avx2, 2) PHI3FAST_MICRO_CASE(micro_avx2, 3)
      PHI3FAST_MICRO_CASE(micro_avx2, 4) PHI3FAST_MICRO_CASE(micro_avx2, 5) PHI3FAST_MICRO_CASE(micro_avx2, 6)
      default: break;
    }
  } else
#endif
  {
    switch (mr) {
      PHI3FAST_MICRO_CASE(micro_scalar, 1) PHI3FAST_MICRO_CASE(micro_scalar, 2)
      PHI3FAST_MICRO_CASE(micro_scalar, 3) PHI3FAST_MICRO_CASE(micro_scalar, 4)
      default: break;
    }
  }
#undef PHI3FAST_MICRO_CASE
  throw std::logic_error("micro_tile: bad row count");
}

}  // namespace nf4
}  // namespace phi3fast
