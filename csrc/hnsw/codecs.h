// Compact vector codecs for the HNSW index: float16 and 8-bit codes, with distances computed directly on the
// codes against a float32 query (asymmetric: the query keeps full precision, only the stored side is lossy).
//
// Design note (int8 codec): each vector x is stored as uint8 codes u with its own offset `lo` and step `s`
// (x ~= lo + s * u, u in [0, 255]) plus the squared norm of that reconstruction. Then
//   <q, x>      ~= lo * sum(q) + s * <q, u>
//   ||q - x||^2 ~= ||q||^2 - 2 <q, x> + ||x||^2
// so every space needs only one float x uint8 dot product per candidate. A per-vector scale keeps unit
// vectors and raw L2 data alike within 1/255 of their own range; no training pass over the data is needed,
// so vectors can be added one at a time as in hnswlib. There is no float32 copy kept for re-ranking: that
// copy would cost more bytes than the codes save (see docs in phi3fast/hnsw.py).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "distances.h"

namespace phi3fast {

// ---- portable float <-> IEEE half conversion (round to nearest even), used for encoding and as fallback ----
inline uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t mag = x & 0x7fffffffu;
  if (mag >= 0x7f800000u) return static_cast<uint16_t>(sign | 0x7c00u | (mag > 0x7f800000u ? 0x200u : 0u));
  if (mag >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (mag < 0x38800000u) {                                                // subnormal half (or zero)
    if (mag < 0x33000000u) return static_cast<uint16_t>(sign);
    const uint32_t shift = 126u - (mag >> 23);
    const uint32_t mant = (mag & 0x7fffffu) | 0x800000u;
    uint32_t h = mant >> (shift + 1);
    const uint32_t rem = mant & ((1u << (shift + 1)) - 1u), half = 1u << shift;
    if (rem > half || (rem == half && (h & 1u))) ++h;
    return static_cast<uint16_t>(sign | h);
  }
  uint32_t h = ((mag - 0x38000000u) >> 13);
  const uint32_t rem = mag & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, x;
  if (exp == 0) {
    if (mant == 0) {
      x = sign;
    } else {  // subnormal: normalize
      exp = 127 - 15 + 1;
      while (!(mant & 0x400u)) { mant <<= 1; --exp; }
      x = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    x = sign | 0x7f800000u | (mant << 13);
  } else {
    x = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

// ---- float32 query x float16 stored vector ----
inline float l2sq_f16_scalar(const float* q, const uint16_t* h, size_t d) {
  float s = 0.f;
  for (size_t i = 0; i < d; ++i) { float t = q[i] - half_to_float(h[i]); s += t * t; }
  return s;
}
inline float ip_f16_scalar(const float* q, const uint16_t* h, size_t d) {
  float s = 0.f;
  for (size_t i = 0; i < d; ++i) s += q[i] * half_to_float(h[i]);
  return s;
}

// ---- float32 query x uint8 codes: <q, u> ----
inline float dot_u8_scalar(const float* q, const uint8_t* u, size_t d) {
  float s0 = 0.f, s1 = 0.f;
  size_t i = 0;
  for (; i + 2 <= d; i += 2) { s0 += q[i] * u[i]; s1 += q[i + 1] * u[i + 1]; }
  if (i < d) s0 += q[i] * u[i];
  return s0 + s1;
}

#ifdef PHI3FAST_X86
__attribute__((target("avx2,fma,f16c"))) inline float l2sq_f16_avx2(const float* q, const uint16_t* h, size_t d) {
  __m256 acc = _mm256_setzero_ps();
  size_t i = 0;
  for (; i + 8 <= d; i += 8) {
    __m256 t = _mm256_sub_ps(_mm256_loadu_ps(q + i),
                             _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
    acc = _mm256_fmadd_ps(t, t, acc);
  }
  float s = hsum256(acc);
  for (; i < d; ++i) { float t = q[i] - half_to_float(h[i]); s += t * t; }
  return s;
}
__attribute__((target("avx2,fma,f16c"))) inline float ip_f16_avx2(const float* q, const uint16_t* h, size_t d) {
  __m256 acc = _mm256_setzero_ps();
  size_t i = 0;
  for (; i + 8 <= d; i += 8)
    acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i),
                          _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))), acc);
  float s = hsum256(acc);
  for (; i < d; ++i) s += q[i] * half_to_float(h[i]);
  return s;
}
__attribute__((target("avx2,fma"))) inline float dot_u8_avx2(const float* q, const uint8_t* u, size_t d) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  size_t i = 0;
  for (; i + 16 <= d; i += 16) {
    __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(u + i));
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8),
                           _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8))), acc1);
  }
  float s = hsum256(_mm256_add_ps(acc0, acc1));
  for (; i < d; ++i) s += q[i] * u[i];
  return s;
}

// AVX-512: 16 lanes; the tail is k-masked so any dimension stays on the vector path.
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline float l2sq_f16_avx512(const float* q, const uint16_t* h, size_t d) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  size_t i = 0;
  for (; i + 32 <= d; i += 32) {
    __m512 t0 = _mm512_sub_ps(_mm512_loadu_ps(q + i),
                              _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + i))));
    __m512 t1 = _mm512_sub_ps(_mm512_loadu_ps(q + i + 16),
                              _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + i + 16))));
    acc0 = _mm512_fmadd_ps(t0, t0, acc0);
    acc1 = _mm512_fmadd_ps(t1, t1, acc1);
  }
  for (; i < d; i += 16) {
    const size_t r = d - i < 16 ? d - i : 16;
    const __mmask16 m = static_cast<__mmask16>((1u << r) - 1u);
    __m512 t = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, q + i),
                             _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, h + i)));
    acc0 = _mm512_fmadd_ps(t, t, acc0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline float ip_f16_avx512(const float* q, const uint16_t* h,
                                                                                size_t d) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  size_t i = 0;
  for (; i + 32 <= d; i += 32) {
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(q + i),
                           _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + i))), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(q + i + 16),
                           _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + i + 16))),
                           acc1);
  }
  for (; i < d; i += 16) {
    const size_t r = d - i < 16 ? d - i : 16;
    const __mmask16 m = static_cast<__mmask16>((1u << r) - 1u);
    acc0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + i), _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, h + i)),
                           acc0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline float dot_u8_avx512(const float* q, const uint8_t* u,
                                                                                size_t d) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  size_t i = 0;
  for (; i + 32 <= d; i += 32) {
    __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(u + i));
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(q + i),
                           _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(b))), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(q + i + 16),
                           _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(b, 1))), acc1);
  }
  for (; i < d; i += 16) {
    const size_t r = d - i < 16 ? d - i : 16;
    const __mmask16 m = static_cast<__mmask16>((1u << r) - 1u);
    acc0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + i),
                           _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, u + i))), acc0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}
#endif  // PHI3FAST_X86

using F16Fn = float (*)(const float*, const uint16_t*, size_t);
using U8Fn = float (*)(const float*, const uint8_t*, size_t);

// All kernels the index needs, chosen once at construction from the same SIMD level as the float32 ones.
struct Kernels {
  DistanceFunctions f32;
  F16Fn l2sq_f16, ip_f16;
  U8Fn dot_u8;
};

inline Kernels select_kernels(SimdLevel level) {
  Kernels k{select_distances(level), l2sq_f16_scalar, ip_f16_scalar, dot_u8_scalar};
#ifdef PHI3FAST_X86
  if (k.f32.level == SimdLevel::AVX512) {
    k.l2sq_f16 = l2sq_f16_avx512; k.ip_f16 = ip_f16_avx512; k.dot_u8 = dot_u8_avx512;
  } else if (k.f32.level == SimdLevel::AVX2 && __builtin_cpu_supports("f16c")) {
    k.l2sq_f16 = l2sq_f16_avx2; k.ip_f16 = ip_f16_avx2; k.dot_u8 = dot_u8_avx2;
  } else if (k.f32.level == SimdLevel::AVX2) {
    k.dot_u8 = dot_u8_avx2;
  }
#endif
  return k;
}

// AVX-512 kernels above also use BW/VL instructions (16-bit masked loads, 128-bit byte loads), so AVX512 is
// only chosen when those are present too.
inline SimdLevel detect_index_simd() {
  SimdLevel s = detect_simd();
#if defined(PHI3FAST_X86) && defined(__GNUC__)
  if (s == SimdLevel::AVX512 && !(__builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")))
    s = SimdLevel::AVX2;
#endif
  return s;
}

}  // namespace phi3fast
