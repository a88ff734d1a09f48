// LoRA dropout on CPU: out = x * keep / (1 - p), keep[i] = 1 with probability 1 - p, and its backward.
//
// Why native: torch's CPU bernoulli draws each element from a sequential Mersenne Twister (~8 ns per element on
// one thread, 60x an elementwise multiply), and a QLoRA step draws a mask for the input of every adapted
// projection. Here each element's draw is a hash of (seed, index) (MurmurHash3's 32-bit finalizer, twice), so the mask depends
// only on the seed the caller draws from torch's generator: deterministic under torch.manual_seed, checkpointed
// RNG state included, and the same on any thread count.
#pragma once

#include <algorithm>
#include <cstdint>

#include "common/simd.h"
#include "nf4/thread_pool.h"
#include "nf4/weight.h"

namespace phi3fast {
namespace nf4 {

inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  return h ^ (h >> 16);
}

constexpr int64_t kDropoutChunk = 1 << 16;  // elements per pool task

// keep[i] = fmix32(fmix32(i_lo + s1) ^ s2) >= threshold for i in [i0, i1), i_lo the low 32 bits of i. A plain
// loop of 32-bit integer ops that the compiler vectorizes; `target` compiles it for AVX-512 too.
template <class Out>
__attribute__((always_inline)) inline void keep_mask_f32(const float* x, Out* out, uint8_t* mask, int64_t i0, int64_t i1, uint32_t s1, uint32_t s2,
                          uint32_t threshold, float scale) {
  for (int64_t i = i0; i < i1; ++i) {
    const uint32_t h = fmix32(fmix32(static_cast<uint32_t>(i) + s1) ^ s2);
    const bool keep = h >= threshold;
    mask[i] = keep;
    out[i] = keep ? x[i] * scale : 0.f;
  }
}

#ifdef PHI3FAST_X86
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline void keep_mask_f32_avx512(
    const float* x, float* out, uint8_t* mask, int64_t i0, int64_t i1, uint32_t s1, uint32_t s2, uint32_t threshold,
    float scale) {
  keep_mask_f32(x, out, mask, i0, i1, s1, s2, threshold, scale);
}
#endif

// p in [0, 1): an element is kept when its 32-bit hash is >= p * 2^32. Each element's draw depends only on
// (seed, index), never on the thread count or the task split.
inline void dropout_forward(const void* x, void* out, uint8_t* mask, DType dt, int64_t n, double p, uint64_t seed,
                            int threads) {
  const uint32_t threshold = static_cast<uint32_t>(std::min(p * 4294967296.0, 4294967295.0));
  const float scale = static_cast<float>(1.0 / (1.0 - p));
  const bool avx512 = detect_simd() == SimdLevel::AVX512;
  ThreadPool::instance().run((n + kDropoutChunk - 1) / kDropoutChunk, threads, [&](int64_t task) {
    const int64_t i0 = task * kDropoutChunk, i1 = std::min(n, i0 + kDropoutChunk);
    // the high half of the index goes into the seed (chunks never straddle a 2^32 boundary: 2^16 divides it)
    const uint32_t s1 = fmix32(static_cast<uint32_t>(seed) ^ static_cast<uint32_t>(static_cast<uint64_t>(i0) >> 32));
    const uint32_t s2 = fmix32(static_cast<uint32_t>(seed >> 32) + 0x9e3779b9u);
    if (dt == DType::F32) {
      const float* xf = static_cast<const float*>(x);
      float* of = static_cast<float*>(out);
#ifdef PHI3FAST_X86
      if (avx512) return keep_mask_f32_avx512(xf, of, mask, i0, i1, s1, s2, threshold, scale);
#endif
      return keep_mask_f32(xf, of, mask, i0, i1, s1, s2, threshold, scale);
    }
    for (int64_t i = i0; i < i1; ++i) {
      const uint32_t h = fmix32(fmix32(static_cast<uint32_t>(i) + s1) ^ s2);
      const bool keep = h >= threshold;
      mask[i] = keep;
      const float v = bf16_to_f32(static_cast<const uint16_t*>(x)[i]);
      static_cast<uint16_t*>(out)[i] = f32_to_bf16(keep ? v * scale : 0.f);
    }
  });
}

// grad_in = grad_out * mask / (1 - p)
inline void dropout_backward(const void* g, const uint8_t* mask, void* out, DType dt, int64_t n, double p,
                             int threads) {
  const float scale = static_cast<float>(1.0 / (1.0 - p));
  ThreadPool::instance().run((n + kDropoutChunk - 1) / kDropoutChunk, threads, [&](int64_t task) {
    const int64_t i0 = task * kDropoutChunk, i1 = std::min(n, i0 + kDropoutChunk);
    if (dt == DType::F32) {
      const float* gi = static_cast<const float*>(g);
      float* o = static_cast<float*>(out);
      for (int64_t i = i0; i < i1; ++i) o[i] = mask[i] ? gi[i] * scale : 0.f;
    } else {
      for (int64_t i = i0; i < i1; ++i) {
        const float v = bf16_to_f32(static_cast<const uint16_t*>(g)[i]);
        static_cast<uint16_t*>(out)[i] = f32_to_bf16(mask[i] ? v * scale : 0.f);
      }
    }
  });
}

}  // namespace nf4
}  // namespace phi3fast
