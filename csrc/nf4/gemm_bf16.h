// bf16 compute for the large-M NF4 GEMMs (prefill, a training step's forward and dX): an explicit option, never
// the default. Activations and decoded weights are rounded to bf16 (round to nearest even), products summed in
// fp32 with AVX512-BF16's vdpbf16ps, which multiplies a pair of bf16 per fp32 lane: twice the products per
// instruction of an fp32 FMA. Error bound: each product a*w carries a, w rounded to 8 significant bits, so
// |y - y_fp32| <= 2^-8 * sum |a w| (+ fp32 accumulation); the tests check that bound.
//
// Layout (note): vdpbf16ps pairs consecutive contraction indices, so a panel holds, per pair of contraction rows
// q2 = (2i, 2i+1), NR columns of interleaved pairs: panel[i * 2 NR + 2 j + (q & 1)]. A row of A in bf16 is then
// read as 32-bit words, each broadcast to every lane. The forward panel is natural for NF4: one packed byte holds
// W[n, 2i] and W[n, 2i+1], exactly one pair, decoded with one 32-bit store.
// Only the x86 AVX-512 level with AVX512-BF16 runs it; the dispatcher (csrc/python/nf4.cpp) uses the fp32 kernels
// otherwise, so a PHI3FAST_SIMD cap below avx512 turns it off.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include "common/simd.h"
#include "nf4/kernels.h"

namespace phi3fast {
namespace nf4 {

inline bool cpu_has_avx512bf16() {
#if defined(PHI3FAST_X86) && defined(__GNUC__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

constexpr int64_t kBf16Nr = 32;  // panel columns: two zmm of 16 fp32 accumulators
constexpr int kBf16Mr = 12;      // rows per register tile: 24 accumulators + 2 panel vectors + 1 broadcast

inline std::vector<uint16_t>& bf16_scratch(int slot) {
  // 0 panel (every task runner); 1 A in bf16, 2 scaled LoRA left in bf16 (the caller).
  thread_local std::vector<uint16_t> bufs[3];
  return bufs[slot];
}

inline int64_t round_even(int64_t q) { return (q + 1) / 2 * 2; }

// dst [m, qp] bf16 = scale * src [m, q] (fp32 or bf16, row stride q), zero-padded to qp columns.
inline void rows_to_bf16(const void* src, DType dt, int64_t m, int64_t q, int64_t qp, float scale, uint16_t* dst) {
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t j = 0; j < q; ++j) {
      const float v = dt == DType::F32 ? static_cast<const float*>(src)[r * q + j]
                                       : bf16_to_f32(static_cast<const uint16_t*>(src)[r * q + j]);
      dst[r * qp + j] = f32_to_bf16(v * scale);
    }
    for (int64_t j = q; j < qp; ++j) dst[r * qp + j] = 0;
  }
}

// Forward panel: pair i of W's row p0 + j (columns past N are 0).
inline void decode_panel_rows_bf16(const WeightView& w, int64_t p0, uint16_t* panel) {
  constexpr int64_t nr = kBf16Nr;
  const int64_t bpr = w.k / w.blocksize;
  for (int64_t j = 0; j < nr; ++j) {
    const int64_t r = p0 + j;
    if (r >= w.n) {
      for (int64_t i = 0; i < w.k / 2; ++i) panel[i * 2 * nr + 2 * j] = panel[i * 2 * nr + 2 * j + 1] = 0;
      continue;
    }
    const uint8_t* bytes = w.row(r);
    for (int64_t b = 0; b < bpr; ++b) {
      const float s = w.scale(r * bpr + b);
      uint16_t lut[16];
      for (int c = 0; c < 16; ++c) lut[c] = f32_to_bf16(w.code[c] * s);
      for (int64_t i = b * w.blocksize / 2; i < (b + 1) * w.blocksize / 2; ++i) {
        panel[i * 2 * nr + 2 * j] = lut[bytes[i] >> 4];
        panel[i * 2 * nr + 2 * j + 1] = lut[bytes[i] & 15];
      }
    }
  }
}

// dX panel: pair i = W's rows (2i, 2i+1), columns p0 + j (columns past K are 0).
inline void decode_panel_cols_bf16(const WeightView& w, int64_t p0, uint16_t* panel) {
  constexpr int64_t nr = kBf16Nr;
  const int64_t bpr = w.k / w.blocksize;
  const int64_t width = p0 + nr <= w.k ? nr : w.k - p0;
  for (int64_t q = 0; q < w.n; ++q) {
    const uint8_t* bytes = w.row(q);
    uint16_t* dst = panel + (q / 2) * 2 * nr + (q & 1);
    for (int64_t j = 0; j < width; j += 2) {
      const int64_t col = p0 + j;
      const float s = w.scale(q * bpr + col / w.blocksize);
      const uint8_t v = bytes[col / 2];
      dst[2 * j] = f32_to_bf16(w.code[v >> 4] * s);
      dst[2 * j + 2] = f32_to_bf16(w.code[v & 15] * s);
    }
    for (int64_t j = width; j < nr; ++j) dst[2 * j] = 0;
  }
}

#ifdef PHI3FAST_X86
template <int MR>
__attribute__((target("avx512f,avx512bf16"), always_inline)) inline void sweep_bf16(
    const uint16_t* a, int64_t lda, int64_t m0, int64_t pairs, const uint16_t* p, __m512* acc0, __m512* acc1) {
  const uint16_t* rows[MR];
  for (int m = 0; m < MR; ++m) rows[m] = a + (m0 + m) * lda;
  for (int64_t i = 0; i < pairs; ++i) {
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(p + i * 2 * kBf16Nr);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(p + i * 2 * kBf16Nr + 32);
    for (int m = 0; m < MR; ++m) {
      int32_t word;
      std::memcpy(&word, rows[m] + 2 * i, 4);
      const __m512bh av = (__m512bh)_mm512_set1_epi32(word);
      acc0[m] = _mm512_dpbf16_ps(acc0[m], av, w0);
      acc1[m] = _mm512_dpbf16_ps(acc1[m], av, w1);
    }
  }
}

// C tile [MR, 32] (row stride ldc) = A1 rows m0.. (pairs1 pairs) x panel (+ A2 x the panel's LoRA pairs).
template <int MR>
__attribute__((target("avx512f,avx512bf16"))) void micro_bf16(const uint16_t* a1, int64_t lda1, int64_t pairs1,
                                                            const uint16_t* a2, int64_t lda2, int64_t pairs2,
                                                            const uint16_t* panel, int64_t m0, float* c,
                                                            int64_t ldc) {
  __m512 acc0[MR], acc1[MR];
  for (int m = 0; m < MR; ++m) acc0[m] = acc1[m] = _mm512_setzero_ps();
  sweep_bf16<MR>(a1, lda1, m0, pairs1, panel, acc0, acc1);
  if (pairs2) sweep_bf16<MR>(a2, lda2, m0, pairs2, panel + pairs1 * 2 * kBf16Nr, acc0, acc1);
  for (int m = 0; m < MR; ++m) {
    _mm512_storeu_ps(c + m * ldc, acc0[m]);
    _mm512_storeu_ps(c + m * ldc + 16, acc1[m]);
  }
}

inline void micro_tile_bf16(int mr, const uint16_t* a1, int64_t lda1, int64_t pairs1, const uint16_t* a2,
                            int64_t lda2, int64_t pairs2, const uint16_t* panel, int64_t m0, float* c, int64_t ldc) {
#define PHI3FAST_BF16_CASE(R) \
  case R: return micro_bf16<R>(a1, lda1, pairs1, a2, lda2, pairs2, panel, m0, c, ldc);
  switch (mr) {
    PHI3FAST_BF16_CASE(1) PHI3FAST_BF16_CASE(2) PHI3FAST_BF16_CASE(3) PHI3FAST_BF16_CASE(4)
    PHI3FAST_BF16_CASE(5) PHI3FAST_BF16_CASE(6) PHI3FAST_BF16_CASE(7) PHI3FAST_BF16_CASE(8)
    PHI3FAST_BF16_CASE(9) PHI3FAST_BF16_CASE(10) PHI3FAST_BF16_CASE(11) PHI3FAST_BF16_CASE(12)
    default: break;
  }
#undef PHI3FAST_BF16_CASE
  throw std::logic_error("micro_tile_bf16: bad row count");
}
#endif

// gemm_panels (kernels.h) with bf16 operands: out = a W^T (cols = false) or a W (cols = true), + the LoRA term.
// The caller checks cpu_has_avx512bf16().
inline void gemm_panels_bf16(const WeightView& w, bool cols, const Matrix& a, void* out, DType odt,
                             const Lora& lora, int threads) {
#ifdef PHI3FAST_X86
  const int64_t m = a.rows;
  const int64_t p = cols ? w.k : w.n, q1 = cols ? w.n : w.k;  // q1 is even: a multiple of the blocksize
  const uint16_t* a1 = static_cast<const uint16_t*>(a.data);
  if (a.dtype != DType::BF16) {
    std::vector<uint16_t>& buf = bf16_scratch(1);
    buf.resize(static_cast<size_t>(m * q1));
    rows_to_bf16(a.data, a.dtype, m, q1, q1, 1.f, buf.data());
    a1 = buf.data();
  }
  const int64_t rp = round_even(lora.r);
  std::vector<uint16_t>& left = bf16_scratch(2);
  if (lora.r) {
    left.resize(static_cast<size_t>(m * rp));
    rows_to_bf16(lora.left, DType::F32, m, lora.r, rp, lora.scale, left.data());
  }
  constexpr int64_t nr = kBf16Nr;
  const int64_t p_blocks = ceil_div(p, nr), m_blocks = ceil_div(m, kRowBlock);
  ThreadPool::instance().run(p_blocks * m_blocks, threads, [&](int64_t task) {
    const int64_t pb = task / m_blocks, mb = task % m_blocks;
    const int64_t p0 = pb * nr, width = std::min(nr, p - p0);
    std::vector<uint16_t>& panel = bf16_scratch(0);
    std::vector<float>& tile = scratch(1);
    panel.resize(static_cast<size_t>((q1 + rp) * nr));
    tile.resize(static_cast<size_t>(kBf16Mr * nr));
    if (cols) decode_panel_cols_bf16(w, p0, panel.data());
    else decode_panel_rows_bf16(w, p0, panel.data());
    uint16_t* ext = panel.data() + q1 * nr;  // LoRA pairs: B^T (forward) or A (dX) restricted to this panel
    for (int64_t i = 0; i < rp; ++i)
      for (int64_t j = 0; j < nr; ++j) {
        float v = 0.f;
        if (i < lora.r && j < width) v = cols ? lora.right[i * w.k + p0 + j] : lora.right[(p0 + j) * lora.r + i];
        ext[(i / 2) * 2 * nr + 2 * j + (i & 1)] = f32_to_bf16(v);
      }
    const int64_t m_end = std::min(m, (mb + 1) * kRowBlock);
    for (int64_t m0 = mb * kRowBlock; m0 < m_end; m0 += kBf16Mr) {
      const int mr = static_cast<int>(std::min<int64_t>(kBf16Mr, m_end - m0));
      micro_tile_bf16(mr, a1, q1, q1 / 2, lora.r ? left.data() : nullptr, rp, rp / 2, panel.data(), m0,
                      tile.data(), nr);
      for (int i = 0; i < mr; ++i)
        for (int64_t j = 0; j < width; ++j) store_f32(out, odt, (m0 + i) * p + p0 + j, tile[i * nr + j]);
    }
  });
#else
  (void)w, (void)cols, (void)a, (void)out, (void)odt, (void)lora, (void)threads;
  throw std::logic_error("bf16 compute needs an x86 CPU with AVX512-BF16");
#endif
}

}  // namespace nf4
}  // namespace phi3fast
