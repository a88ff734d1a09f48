// The CPU's SIMD level, chosen once at run time from CPUID and capped by PHI3FAST_SIMD. Shared by the index's
// distance kernels and the NF4 CPU kernels: every SIMD path is compiled per function (target attributes),
// so a module built on an AVX-512 machine still runs on a CPU with only SSE2.
#pragma once

#include <cstdlib>
#include <optional>
#include <stdexcept>
#include <string>

#if defined(__x86_64__) || defined(_M_X64)
#define PHI3FAST_X86 1
#include <immintrin.h>
#endif

namespace phi3fast {

enum class SimdLevel : int { Scalar = 0, AVX2 = 1, AVX512 = 2 };

inline const char* simd_name(SimdLevel s) {
  switch (s) {
    case SimdLevel::AVX512: return "avx512";
    case SimdLevel::AVX2: return "avx2";
    default: return "scalar";
  }
}

inline SimdLevel simd_from_name(const std::string& name) {
  if (name == "scalar") return SimdLevel::Scalar;
  if (name == "avx2") return SimdLevel::AVX2;
  if (name == "avx512") return SimdLevel::AVX512;
  throw std::invalid_argument("unknown SIMD level '" + name + "' (expected 'scalar', 'avx2' or 'avx512')");
}

// The best level this CPU supports, capped by the environment variable PHI3FAST_SIMD (scalar|avx2|avx512) when
// set: a way to check or work around one SIMD path without rebuilding.
inline SimdLevel detect_simd() {
  SimdLevel best = SimdLevel::Scalar;
#if defined(PHI3FAST_X86) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) best = SimdLevel::AVX512;
  else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = SimdLevel::AVX2;
#endif
  if (const char* cap = std::getenv("PHI3FAST_SIMD")) {
    SimdLevel c = simd_from_name(cap);
    if (static_cast<int>(c) < static_cast<int>(best)) best = c;
  }
  return best;
}

// The level a binding's `simd=` argument asks for (none: the best here). Asking for more than this CPU has is an
// error rather than a silent downgrade, so a test that names a level really runs it.
inline SimdLevel simd_requested(const std::optional<std::string>& name) {
  const SimdLevel best = detect_simd();
  if (!name) return best;
  const SimdLevel want = simd_from_name(*name);
  if (static_cast<int>(want) > static_cast<int>(best))
    throw std::invalid_argument("simd='" + *name + "' is not supported here (best: " +
                                std::string(simd_name(best)) + ")");
  return want;
}

}  // namespace phi3fast
