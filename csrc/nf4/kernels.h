// The NF4 CPU ops: y = x W^T (+ s (x A^T) B^T) and dX = dY W (+ s (dY B) A), fp32 accumulation, activations in
// fp32 or bf16. Small M (<= kSmallM, decode) streams W once per call through the GEMV kernels (gemv.h); larger M
// decodes panels of W into a per-thread buffer and runs the register-blocked GEMM over them (gemm.h).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/simd.h"
#include "nf4/gemm.h"
#include "nf4/gemv.h"
#include "nf4/thread_pool.h"
#include "nf4/weight.h"

namespace phi3fast {
namespace nf4 {

constexpr int64_t kSmallM = 16;  // rows up to which the forward streams W (GEMV); batched decode stays below
constexpr int64_t kRowBlock = 2048;  // rows of A per GEMM task: a panel is decoded once per 2048 rows

// An activation matrix [rows, cols] in fp32 or bf16, rows contiguous.
struct Matrix {
  const void* data;
  DType dtype;
  int64_t rows, cols;
};

// The LoRA term's operands, already in fp32: `left` [M, r] (t = x A^T forward, u = dY B for dX) and `right`
// (B [N, r] forward, A [r, K] for dX), with its scale. r == 0: no LoRA term.
struct Lora {
  const float* left = nullptr;
  const float* right = nullptr;
  int64_t r = 0;
  float scale = 0.f;
};

inline std::vector<float>& scratch(int slot) {
  // Reused across calls (page faults on fresh large buffers would cost more than a decode step's GEMV):
  // 0 panel, 1 tile (every task runner); 2 converted A, 3 permuted x, 4 accumulators, 5 scaled LoRA (the caller).
  thread_local std::vector<float> bufs[6];
  return bufs[slot];
}

// A as fp32 [rows, cols]: the caller's buffer when it already is fp32, else a converted copy in `buf`.
inline const float* as_f32(const Matrix& a, std::vector<float>& buf) {
  if (a.dtype == DType::F32) return static_cast<const float*>(a.data);
  buf.resize(static_cast<size_t>(a.rows * a.cols));
  for (int64_t r = 0; r < a.rows; ++r) load_row_f32(a.data, a.dtype, a.cols, r, a.cols, buf.data() + r * a.cols);
  return buf.data();
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- forward, small M: one pass over W ----
inline void linear_small_m(const WeightView& w, const Matrix& x, void* out, DType odt, const Lora& lora,
                           SimdLevel s, int threads) {
  const int64_t m = x.rows, n = w.n, k = w.k;
  const float* xf = as_f32(x, scratch(2));
  std::vector<float>& xp = scratch(3);
  xp.resize(static_cast<size_t>(m * k));
  permute_rows(xf, m, k, gemv_group(s, w), xp.data());
  const bool direct = odt == DType::F32 && lora.r == 0;  // accumulate straight into the output
  std::vector<float>& acc_buf = scratch(4);
  if (!direct) acc_buf.resize(static_cast<size_t>(m * n));
  float* acc = direct ? static_cast<float*>(out) : acc_buf.data();
  const int mr_max = gemv_max_rows(s);
  const int t = threads <= 0 ? ThreadPool::max_threads() : threads;
  // Tasks of whole rows: a few per thread so a late or busy worker costs little.
  const int64_t rows_per_task = std::max<int64_t>(8, ceil_div(n, static_cast<int64_t>(t) * 4));
  const int64_t tasks = ceil_div(n, rows_per_task);
  ThreadPool::instance().run(tasks, t, [&](int64_t task) {
    const int64_t r0 = task * rows_per_task, r1 = std::min(n, r0 + rows_per_task);
    for (int64_t m0 = 0; m0 < m; m0 += mr_max) {
      const int mr = static_cast<int>(std::min<int64_t>(mr_max, m - m0));
      gemv_rows(s, mr, w, xp.data() + m0 * k, r0, r1, acc + m0 * n);
    }
    if (direct) return;
    for (int64_t mi = 0; mi < m; ++mi)
      for (int64_t r = r0; r < r1; ++r) {
        float v = acc[mi * n + r];
        if (lora.r) {
          float d = 0.f;
          for (int64_t i = 0; i < lora.r; ++i) d += lora.left[mi * lora.r + i] * lora.right[r * lora.r + i];
          v += lora.scale * d;
        }
        store_f32(out, odt, mi * n + r, v);
      }
  });
}

// ---- large M (and every dX): panels of W, `cols` = true decodes W's columns (dX), else its rows (forward) ----
inline void gemm_panels(const WeightView& w, bool cols, const Matrix& a, void* out, DType odt, const Lora& lora,
                        SimdLevel s, int threads) {
  const int64_t m = a.rows;
  const int64_t p = cols ? w.k : w.n, q1 = cols ? w.n : w.k;  // output columns, contraction length
  const float* af = as_f32(a, scratch(2));
  std::vector<float>& left_scaled = scratch(5);  // s * left: the LoRA term rides in the same accumulators
  if (lora.r) {
    left_scaled.resize(static_cast<size_t>(m * lora.r));
    for (int64_t i = 0; i < m * lora.r; ++i) left_scaled[i] = lora.scale * lora.left[i];
  }
  const Segments sg{af, q1, q1, lora.r ? left_scaled.data() : nullptr, lora.r, lora.r};
  const int64_t nr = panel_width(s);
  const int mr_max = panel_rows(s);
  const int64_t p_blocks = ceil_div(p, nr), m_blocks = ceil_div(m, kRowBlock);
  ThreadPool::instance().run(p_blocks * m_blocks, threads, [&](int64_t task) {
    const int64_t pb = task / m_blocks, mb = task % m_blocks;
    const int64_t p0 = pb * nr, width = std::min(nr, p - p0);
    std::vector<float>& panel = scratch(0);
    std::vector<float>& tile = scratch(1);
    panel.resize(static_cast<size_t>((q1 + lora.r) * nr));
    tile.resize(static_cast<size_t>(mr_max * nr));
    if (cols) decode_panel_cols(w, p0, nr, panel.data());
    else decode_panel_rows(w, p0, nr, panel.data());
    float* ext = panel.data() + q1 * nr;  // LoRA rows: B^T (forward) or A (dX) restricted to this panel
    for (int64_t i = 0; i < lora.r; ++i)
      for (int64_t j = 0; j < nr; ++j)
        ext[i * nr + j] =
            j < width ? (cols ? lora.right[i * w.k + p0 + j] : lora.right[(p0 + j) * lora.r + i]) : 0.f;
    const int64_t m_end = std::min(m, (mb + 1) * kRowBlock);
    for (int64_t m0 = mb * kRowBlock; m0 < m_end; m0 += mr_max) {
      const int mr = static_cast<int>(std::min<int64_t>(mr_max, m_end - m0));
      micro_tile(s, mr, sg, panel.data(), m0, tile.data(), nr);
      for (int i = 0; i < mr; ++i)
        for (int64_t j = 0; j < width; ++j) store_f32(out, odt, (m0 + i) * p + p0 + j, tile[i * nr + j]);
    }
  });
}

// y [M, N] = x [M, K] W^T (+ lora.scale * left [M, r] right[N, r]^T).
inline void linear(const WeightView& w, const Matrix& x, void* out, DType odt, const Lora& lora, SimdLevel s,
                   int threads) {
  w.validate();
  if (x.cols != w.k) throw std::invalid_argument("x has " + std::to_string(x.cols) + " columns, W has K=" +
                                                 std::to_string(w.k));
  if (x.rows == 0) return;
  if (x.rows <= kSmallM) linear_small_m(w, x, out, odt, lora, s, threads);
  else gemm_panels(w, false, x, out, odt, lora, s, threads);
}

// dX [M, K] = dY [M, N] W (+ lora.scale * left [M, r] right [r, K]).
inline void dx(const WeightView& w, const Matrix& g, void* out, DType odt, const Lora& lora, SimdLevel s,
               int threads) {
  w.validate();
  if (g.cols != w.n) throw std::invalid_argument("dY has " + std::to_string(g.cols) + " columns, W has N=" +
                                                 std::to_string(w.n));
  if (g.rows == 0) return;
  gemm_panels(w, true, g, out, odt, lora, s, threads);
}

}  // namespace nf4
}  // namespace phi3fast
