// How one stored vector is encoded (float32 / float16 / uint8 codes) and how a float32 query is compared with
// it in a given space ('l2': squared L2; 'ip' and 'cosine': 1 - dot, cosine on unit vectors), as in hnswlib.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "codecs.h"

namespace phi3fast {

enum class Space : uint8_t { L2 = 0, IP = 1, Cosine = 2 };
enum class Storage : uint8_t { F32 = 0, F16 = 1, U8 = 2 };

inline Space space_from_name(const std::string& s) {
  if (s == "l2") return Space::L2;
  if (s == "ip") return Space::IP;
  if (s == "cosine") return Space::Cosine;
  throw std::runtime_error("Space name must be one of l2, ip, or cosine.");
}
inline const char* space_name(Space s) { return s == Space::L2 ? "l2" : s == Space::IP ? "ip" : "cosine"; }

inline Storage storage_from_name(const std::string& s) {
  if (s == "float32") return Storage::F32;
  if (s == "float16") return Storage::F16;
  if (s == "int8") return Storage::U8;
  throw std::invalid_argument("storage must be 'float32', 'float16' or 'int8', got '" + s + "'");
}
inline const char* storage_name(Storage s) {
  return s == Storage::F32 ? "float32" : s == Storage::F16 ? "float16" : "int8";
}

// A query prepared for one index: the float vector plus the two scalars the int8 codec needs.
struct Query {
  const float* v;
  float sum;    // sum(v), for the int8 offset term
  float sqnorm; // ||v||^2, for int8 L2
};

// int8 payload tail: lo, step, ||reconstruction||^2 (three floats after the dim codes).
constexpr size_t kU8Extra = 3 * sizeof(float);

struct VectorSpace {
  Space space;
  Storage storage;
  size_t dim;
  Kernels k;

  VectorSpace(Space sp, Storage st, size_t d, SimdLevel level) : space(sp), storage(st), dim(d), k(select_kernels(level)) {}

  size_t payload_bytes() const {
    switch (storage) {
      case Storage::F32: return dim * 4;
      case Storage::F16: return dim * 2;
      default: return dim + kU8Extra;
    }
  }

  Query prepare(const float* v) const {
    Query q{v, 0.f, 0.f};
    if (storage == Storage::U8) {
      for (size_t i = 0; i < dim; ++i) { q.sum += v[i]; q.sqnorm += v[i] * v[i]; }
    }
    return q;
  }

  void encode(const float* x, uint8_t* out) const {
    if (storage == Storage::F32) {
      std::memcpy(out, x, dim * 4);
    } else if (storage == Storage::F16) {
      uint16_t* h = reinterpret_cast<uint16_t*>(out);
      for (size_t i = 0; i < dim; ++i) h[i] = float_to_half(x[i]);
    } else {
      float lo = x[0], hi = x[0];
      for (size_t i = 1; i < dim; ++i) { lo = std::min(lo, x[i]); hi = std::max(hi, x[i]); }
      const float step = hi > lo ? (hi - lo) / 255.f : 1.f;
      float sq = 0.f;
      for (size_t i = 0; i < dim; ++i) {
        float c = std::nearbyint((x[i] - lo) / step);
        c = std::min(255.f, std::max(0.f, c));
        out[i] = static_cast<uint8_t>(c);
        const float r = lo + step * c;
        sq += r * r;
      }
      float tail[3] = {lo, step, sq};
      std::memcpy(out + dim, tail, sizeof(tail));
    }
  }

  void decode(const uint8_t* p, float* out) const {
    if (storage == Storage::F32) {
      std::memcpy(out, p, dim * 4);
    } else if (storage == Storage::F16) {
      const uint16_t* h = reinterpret_cast<const uint16_t*>(p);
      for (size_t i = 0; i < dim; ++i) out[i] = half_to_float(h[i]);
    } else {
      float tail[3];
      std::memcpy(tail, p + dim, sizeof(tail));
      for (size_t i = 0; i < dim; ++i) out[i] = tail[0] + tail[1] * p[i];
    }
  }

  // Calls fn(dist) with `dist(payload) -> float` for this storage and space, with the kernel and the
  // space's formula resolved here once instead of per distance (the hot search loop is instantiated per
  // case). Returns what fn returns.
  template <class Fn>
  auto with_distance(const Query& q, Fn&& fn) const {
    const size_t d = dim;
    const float* v = q.v;
    switch (storage) {
      case Storage::F32: {
        if (space == Space::L2) {
          const DistFn f = k.f32.l2sq;
          return fn([=](const uint8_t* p) { return f(v, reinterpret_cast<const float*>(p), d); });
        }
        const DistFn f = k.f32.ip;
        return fn([=](const uint8_t* p) { return 1.f - f(v, reinterpret_cast<const float*>(p), d); });
      }
      case Storage::F16: {
        if (space == Space::L2) {
          const F16Fn f = k.l2sq_f16;
          return fn([=](const uint8_t* p) { return f(v, reinterpret_cast<const uint16_t*>(p), d); });
        }
        const F16Fn f = k.ip_f16;
        return fn([=](const uint8_t* p) { return 1.f - f(v, reinterpret_cast<const uint16_t*>(p), d); });
      }
      default:
        return fn([this, &q](const uint8_t* p) { return dist(q, p); });
    }
  }

  // Distance between a prepared query and one stored payload. The switch is on constants fixed at
  // construction, so it predicts perfectly; the cost is the kernel itself.
  float dist(const Query& q, const uint8_t* p) const {
    switch (storage) {
      case Storage::F32: {
        const float* x = reinterpret_cast<const float*>(p);
        return space == Space::L2 ? k.f32.l2sq(q.v, x, dim) : 1.f - k.f32.ip(q.v, x, dim);
      }
      case Storage::F16: {
        const uint16_t* h = reinterpret_cast<const uint16_t*>(p);
        return space == Space::L2 ? k.l2sq_f16(q.v, h, dim) : 1.f - k.ip_f16(q.v, h, dim);
      }
      default: {
        float tail[3];
        std::memcpy(tail, p + dim, sizeof(tail));
        const float dot = tail[0] * q.sum + tail[1] * k.dot_u8(q.v, p, dim);
        if (space == Space::L2) return std::max(0.f, q.sqnorm - 2.f * dot + tail[2]);
        return 1.f - dot;
      }
    }
  }
};

// Scales v to unit length in place (cosine space), as hnswlib does: v / (||v|| + 1e-30).
inline void normalize(float* v, size_t d) {
  float n = 0.f;
  for (size_t i = 0; i < d; ++i) n += v[i] * v[i];
  const float inv = 1.f / (std::sqrt(n) + 1e-30f);
  for (size_t i = 0; i < d; ++i) v[i] *= inv;
}

}  // namespace phi3fast
