// A read-only view of one NF4 weight W[N, K] in bitsandbytes' layout, and the scalar pieces every SIMD path
// shares: the per-block scale (double quantization decoded in place), bf16 <-> fp32, and the panel decoder of
// the large-M GEMMs.
//
// Layout (phi3fast/quant.py): W is flattened row-major and cut into blocks of `blocksize` elements; element 2i
// sits in the high nibble of byte i, 2i+1 in the low nibble. With double quantization the block scale is
// nested_code[absmax_q[b]] * nested_absmax[b / 256] + offset, computed as a multiply then an add in fp32 (as
// bitsandbytes does), so a decoded weight code[q] * scale equals the reference's bit for bit.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

namespace phi3fast {
namespace nf4 {

constexpr int64_t kNestedBlock = 256;  // bitsandbytes quantizes the absmax in blocks of 256, always

struct WeightView {
  const uint8_t* packed = nullptr;         // N*K/2 bytes
  const uint8_t* absmax_q = nullptr;       // [nblocks] uint8 codes (double quant), or null
  const float* absmax_f = nullptr;         // [nblocks] fp32 scales (no double quant), or null
  const float* nested_code = nullptr;      // [256]
  const float* nested_absmax = nullptr;    // [ceil(nblocks / 256)]
  float offset = 0.f;
  float code[16] = {};
  int64_t n = 0, k = 0, blocksize = 0;

  // Every kernel tile relies on whole blocks per row; quant.py's check_weight enforces the same on the Python side.
  void validate() const {
    if (!packed || (!absmax_q && !absmax_f)) throw std::invalid_argument("NF4 weight: null packed/absmax pointer");
    if (absmax_q && (!nested_code || !nested_absmax))
      throw std::invalid_argument("NF4 weight: double quantization needs nested_code and nested_absmax");
    if (blocksize < 32 || (blocksize & (blocksize - 1)))
      throw std::invalid_argument("NF4 blocksize " + std::to_string(blocksize) + ": expected a power of two >= 32");
    if (n <= 0 || k <= 0 || k % blocksize || n % blocksize)
      throw std::invalid_argument("NF4 weight of shape (" + std::to_string(n) + ", " + std::to_string(k) +
                                  "): K and N must be positive multiples of the blocksize " +
                                  std::to_string(blocksize));
  }

  float scale(int64_t block) const {
    if (absmax_q) {
      // volatile-free two-step: a product rounded to fp32, then the add (no FMA contraction in this TU's
      // baseline target), matching bitsandbytes' and quant.py's real_absmax.
      const float prod = nested_code[absmax_q[block]] * nested_absmax[block / kNestedBlock];
      return prod + offset;
    }
    return absmax_f[block];
  }
  const uint8_t* row(int64_t r) const { return packed + r * (k / 2); }
};

// ---- bf16 <-> fp32 (bf16 is the top half of an fp32; round to nearest even on the way down) ----
inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

enum class DType : int { F32 = 0, BF16 = 1 };

inline DType dtype_from_name(const std::string& s) {
  if (s == "float32") return DType::F32;
  if (s == "bfloat16") return DType::BF16;
  throw std::invalid_argument("NF4 CPU kernels take float32 or bfloat16 tensors, got " + s);
}

// Row `r` of an [rows, cols] matrix of `dt` (row stride `ld` elements) as fp32 into dst[0, cols).
inline void load_row_f32(const void* base, DType dt, int64_t ld, int64_t r, int64_t cols, float* dst) {
  if (dt == DType::F32) {
    std::memcpy(dst, static_cast<const float*>(base) + r * ld, cols * sizeof(float));
  } else {
    const uint16_t* src = static_cast<const uint16_t*>(base) + r * ld;
    for (int64_t j = 0; j < cols; ++j) dst[j] = bf16_to_f32(src[j]);
  }
}

inline void store_f32(void* base, DType dt, int64_t idx, float v) {
  if (dt == DType::F32) static_cast<float*>(base)[idx] = v;
  else static_cast<uint16_t*>(base)[idx] = f32_to_bf16(v);
}

// Panel of W^T for the forward GEMM: panel[q * nr + j] = W[p0 + j, q] for q < K, j < nr (columns past N are 0).
inline void decode_panel_rows(const WeightView& w, int64_t p0, int64_t nr, float* panel) {
  const int64_t bpr = w.k / w.blocksize;  // blocks per row
  for (int64_t j = 0; j < nr; ++j) {
    const int64_t r = p0 + j;
    if (r >= w.n) {
      for (int64_t q = 0; q < w.k; ++q) panel[q * nr + j] = 0.f;
      continue;
    }
    const uint8_t* bytes = w.row(r);
    for (int64_t b = 0; b < bpr; ++b) {
      const float s = w.scale(r * bpr + b);
      const int64_t q0 = b * w.blocksize;
      for (int64_t i = 0; i < w.blocksize / 2; ++i) {
        const uint8_t v = bytes[q0 / 2 + i];
        panel[(q0 + 2 * i) * nr + j] = w.code[v >> 4] * s;
        panel[(q0 + 2 * i + 1) * nr + j] = w.code[v & 15] * s;
      }
    }
  }
}

// Panel of W for the dX GEMM: panel[q * nr + j] = W[q, p0 + j] for q < N, j < nr (columns past K are 0).
// p0 is a multiple of nr and nr divides the blocksize or vice versa, so a panel row spans whole bytes.
inline void decode_panel_cols(const WeightView& w, int64_t p0, int64_t nr, float* panel) {
  const int64_t bpr = w.k / w.blocksize;
  const int64_t width = p0 + nr <= w.k ? nr : w.k - p0;
  for (int64_t q = 0; q < w.n; ++q) {
    const uint8_t* bytes = w.row(q);
    float* dst = panel + q * nr;
    for (int64_t j = 0; j < width; j += 2) {
      const int64_t col = p0 + j;
      const float s = w.scale(q * bpr + col / w.blocksize);
      const uint8_t v = bytes[col / 2];
      dst[j] = w.code[v >> 4] * s;
      dst[j + 1] = w.code[v & 15] * s;
    }
    for (int64_t j = width; j < nr; ++j) dst[j] = 0.f;
  }
}

}  // namespace nf4
}  // namespace phi3fast
