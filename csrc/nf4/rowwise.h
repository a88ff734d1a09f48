// Row-wise ops of a decode step on CPU, each one pass instead of 5-10 small torch ops (RMSNorm, SwiGLU, RoPE):
// at M = 1 the torch versions cost their dispatch, not their arithmetic. Each computes what the torch reference
// in kernels/ computes, with the same roundings per op (fp32 math; bf16 results rounded where the reference
// rounds), so results differ from the reference only by the order of the RMSNorm sum and expf vs torch's exp.
#pragma once

#include <cmath>
#include <cstdint>

#include "nf4/weight.h"

namespace phi3fast {
namespace nf4 {

inline float load_at(const void* p, DType dt, int64_t i) {
  return dt == DType::F32 ? static_cast<const float*>(p)[i] : bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
}

// Rounds v to the storage dtype (identity for fp32).
inline float round_to(DType dt, float v) { return dt == DType::F32 ? v : bf16_to_f32(f32_to_bf16(v)); }

// out[m, :] = w * (x[m, :] * rsqrt(mean(x^2) + eps)) with x, w, out all of dtype dt.
inline void rms_norm_rows(const void* x, const void* w, void* out, DType dt, int64_t m, int64_t h, float eps) {
  for (int64_t r = 0; r < m; ++r) {
    double acc = 0.0;  // a wide sum: the reference's fp32 mean is itself within rounding of the exact one
    for (int64_t j = 0; j < h; ++j) {
      const float v = load_at(x, dt, r * h + j);
      acc += static_cast<double>(v * v);
    }
    const float mean = static_cast<float>(acc) / static_cast<float>(h);
    const float rstd = 1.0f / std::sqrt(mean + eps);
    for (int64_t j = 0; j < h; ++j) {
      const float xn = round_to(dt, load_at(x, dt, r * h + j) * rstd);
      store_f32(out, dt, r * h + j, load_at(w, dt, j) * xn);
    }
  }
}

// out[m, :I] = up * silu(gate) for gu[m, :] = [gate | up] (2I wide).
inline void swiglu_rows(const void* gu, void* out, DType dt, int64_t m, int64_t i_width) {
  for (int64_t r = 0; r < m; ++r)
    for (int64_t j = 0; j < i_width; ++j) {
      const float g = load_at(gu, dt, r * 2 * i_width + j), u = load_at(gu, dt, r * 2 * i_width + i_width + j);
      const float s = round_to(dt, g / (1.0f + std::exp(-g)));
      store_f32(out, dt, r * i_width + j, u * s);
    }
}

// In place on qkv [B, T, heads * D]: the first n_rot heads of each row become (x1 c - x2 s, x2 c + x1 s) with
// x1, x2 the two halves of a head and c, s = cos, sin [B, T, D/2] (strides in elements, the last one 1).
inline void rope_rows(void* qkv, DType dt, int64_t b, int64_t t, int64_t row_width, int64_t n_rot, int64_t half,
                      const void* cos, const void* sin, DType cdt, int64_t cs_b, int64_t cs_t) {
  for (int64_t i = 0; i < b; ++i)
    for (int64_t p = 0; p < t; ++p) {
      const int64_t row = (i * t + p) * row_width, c0 = i * cs_b + p * cs_t;
      for (int64_t hd = 0; hd < n_rot; ++hd) {
        const int64_t base = row + hd * 2 * half;
        for (int64_t j = 0; j < half; ++j) {
          const float c = load_at(cos, cdt, c0 + j), s = load_at(sin, cdt, c0 + j);
          const float x1 = load_at(qkv, dt, base + j), x2 = load_at(qkv, dt, base + half + j);
          const float o1 = round_to(dt, x1 * c) - round_to(dt, x2 * s);
          const float o2 = round_to(dt, x2 * c) + round_to(dt, x1 * s);
          store_f32(qkv, dt, base + j, o1);
          store_f32(qkv, dt, base + half + j, o2);
        }
      }
    }
}

}  // namespace nf4
}  // namespace phi3fast
