// One whole decode step of a Phi-3 model in one native call: M sequences, one new token each, every layer, the
// final norm and the vocabulary projection. Python's per-token work drops to one call (the torch path runs ~300
// small ops per step; at M = 1 their dispatch costs more than the arithmetic).
//
// What it computes is what the torch path computes in fp32 (phi3fast/model/phi3.py): RMSNorm, the fused qkv
// projection (+ the row's LoRA term), RoPE from the caller's cos/sin table, K/V appended into the caller's cache at
// the row's own position, GQA attention over positions [max(0, p - window + 1), p], o_proj, residual, norm,
// gate_up, SwiGLU, down, residual; then the final norm and lm_head. Sums run in a different order than torch's
// (SIMD lanes, expf), so results agree within fp32 rounding, not bit for bit.
//
// Memory: the weights, the KV cache, the cos/sin table and the logits are the caller's tensors (addresses); the
// activations live in buffers of this object, sized at construction for kMaxRows rows and grown only when a longer
// cache is first seen, so a step allocates nothing.
#pragma once

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/simd.h"
#include "nf4/dense.h"
#include "nf4/kernels.h"
#include "nf4/rowwise.h"
#include "nf4/thread_pool.h"
#include "nf4/weight.h"

namespace phi3fast {
namespace nf4 {

// One projection's frozen base: an NF4 weight or a dense fp32 [n, k] matrix.
struct Proj {
  bool is_nf4 = false;
  WeightView nf4;
  const float* dense = nullptr;
  int64_t n = 0, k = 0;
};

// One LoRA term: y += scale * (x A^T) B^T with A [r, k] and B [n, r] in fp32.
struct LoraTerm {
  const float* a = nullptr;
  const float* b = nullptr;
  int64_t r = 0;
  float scale = 0.f;
};

enum ProjSlot : int { kQkv = 0, kO = 1, kGateUp = 2, kDown = 3, kProjs = 4 };

struct DecodeShape {
  int64_t layers = 0, hidden = 0, heads = 0, kv_heads = 0, head_dim = 0, inter = 0, vocab = 0;
  float eps = 1e-5f;
  int64_t window = 0;  // sliding window (0: none)
};

struct LayerWeights {
  const float* in_norm = nullptr;
  const float* post_norm = nullptr;
  Proj proj[kProjs];
};

// The caller's KV cache: k and v [layers, slots, kv_heads, cap, head_dim] fp32; row m of a step uses slot m.
struct KvCache {
  float* k = nullptr;
  float* v = nullptr;
  int64_t slots = 0, cap = 0;
};

// The caller's RoPE table: cos and sin [positions, head_dim / 2] fp32, row p for position p.
struct RopeTable {
  const float* cos = nullptr;
  const float* sin = nullptr;
  int64_t positions = 0;
};

constexpr int64_t kMaxRows = kSmallM;  // rows per pass over the weights; more rows run in chunks

class Decoder {
 public:
  explicit Decoder(const DecodeShape& s) : shape_(s), layers_(static_cast<size_t>(s.layers)) {
    if (s.layers <= 0 || s.hidden <= 0 || s.heads <= 0 || s.kv_heads <= 0 || s.head_dim <= 0 || s.inter <= 0 ||
        s.vocab <= 0 || s.heads % s.kv_heads || s.head_dim % 2 || s.window < 0)
      throw std::invalid_argument("decoder: bad model shape");
    const int64_t m = kMaxRows;
    h_.resize(m * s.hidden);
    xn_.resize(m * s.hidden);
    tmp_.resize(m * std::max(s.hidden, 2 * s.inter));
    qkv_.resize(m * (s.heads + 2 * s.kv_heads) * s.head_dim);
    attn_.resize(m * s.heads * s.head_dim);
    act_.resize(m * s.inter);
    lora_t_.resize(m * 64);
    lora_delta_.resize(std::max({s.hidden, 2 * s.inter, (s.heads + 2 * s.kv_heads) * s.head_dim}));
    if (s.heads / s.kv_heads > kDenseMaxRows)
      throw std::invalid_argument("decoder: more than 8 query heads per kv head");
  }

  const DecodeShape& shape() const { return shape_; }

  void set_norms(int64_t layer, const float* in_norm, const float* post_norm) {
    LayerWeights& l = layer_at(layer);
    l.in_norm = in_norm;
    l.post_norm = post_norm;
  }

  void set_proj(int64_t layer, int slot, const Proj& p) {
    if (slot < 0 || slot >= kProjs) throw std::invalid_argument("decoder: projection slot out of range");
    const int64_t kv = shape_.kv_heads * shape_.head_dim;
    const int64_t want_n[kProjs] = {shape_.heads * shape_.head_dim + 2 * kv, shape_.hidden, 2 * shape_.inter,
                                    shape_.hidden};
    const int64_t want_k[kProjs] = {shape_.hidden, shape_.heads * shape_.head_dim, shape_.hidden, shape_.inter};
    if (p.n != want_n[slot] || p.k != want_k[slot])
      throw std::invalid_argument("decoder: projection " + std::to_string(slot) + " of layer " +
                                  std::to_string(layer) + " is [" + std::to_string(p.n) + ", " +
                                  std::to_string(p.k) + "], expected [" + std::to_string(want_n[slot]) + ", " +
                                  std::to_string(want_k[slot]) + "]");
    if (p.is_nf4) p.nf4.validate();
    else if (!p.dense) throw std::invalid_argument("decoder: null dense weight");
    layer_at(layer).proj[slot] = p;
  }

  void set_globals(const float* embed, const float* final_norm, const void* head, DType head_dt) {
    if (!embed || !final_norm || !head) throw std::invalid_argument("decoder: null embedding/norm/lm_head");
    embed_ = embed;
    final_norm_ = final_norm;
    head_ = head;
    head_dt_ = head_dt;
  }

  // Adapter `index` (0, 1, ...: rows name it in step) gets a LoRA term on one projection.
  void set_lora(int64_t index, int64_t layer, int slot, const LoraTerm& t) {
    if (index < 0 || slot < 0 || slot >= kProjs) throw std::invalid_argument("decoder: bad adapter index/slot");
    const Proj& p = layer_at(layer).proj[slot];
    if (!t.a || !t.b || t.r <= 0) throw std::invalid_argument("decoder: LoRA term needs A, B and r > 0");
    if (p.n == 0) throw std::invalid_argument("decoder: set the projection before its LoRA term");
    if (static_cast<int64_t>(adapters_.size()) <= index) adapters_.resize(index + 1);
    auto& table = adapters_[index];
    if (table.empty()) table.resize(static_cast<size_t>(shape_.layers * kProjs));
    table[layer * kProjs + slot] = t;
    if (t.r > max_r_) {
      max_r_ = t.r;
      lora_t_.resize(kMaxRows * max_r_);
    }
  }

  int64_t adapters() const { return static_cast<int64_t>(adapters_.size()); }

  // Phase timers (seconds summed over steps since the last reset), off unless enabled: the profile of
  // docs/cpu-inference.md. Phases: embed+norms+residuals, qkv, attention (RoPE, cache append), o_proj, gate_up,
  // SwiGLU, down, lm_head (with the final norm).
  static constexpr int kPhases = 8;
  void set_profiling(bool on) {
    profiling_ = on;
    phase_s_.fill(0.0);
  }
  std::array<double, kPhases> profile() const { return phase_s_; }

  // logits [m, vocab] for tokens [m] at positions [m]; adapter [m] is each row's adapter index or -1 (none).
  void step(const int64_t* tokens, const int64_t* positions, const int32_t* adapter, int64_t m, const KvCache& kv,
            const RopeTable& rope, float* logits, SimdLevel s, int threads) {
    check_ready();
    if (m < 0 || m > kv.slots) throw std::invalid_argument("decoder: more rows than cache slots");
    for (int64_t i = 0; i < m; ++i) {
      if (tokens[i] < 0 || tokens[i] >= shape_.vocab)
        throw std::invalid_argument("decoder: token id " + std::to_string(tokens[i]) + " out of the vocabulary");
      if (positions[i] < 0 || positions[i] >= kv.cap || positions[i] >= rope.positions)
        throw std::invalid_argument("decoder: position " + std::to_string(positions[i]) +
                                    " past the KV cache or the RoPE table");
      if (adapter[i] < -1 || adapter[i] >= adapters())
        throw std::invalid_argument("decoder: adapter index " + std::to_string(adapter[i]) + " not registered");
    }
    for (int64_t r0 = 0; r0 < m; r0 += kMaxRows) {
      const int64_t mc = std::min(kMaxRows, m - r0);
      step_rows(tokens + r0, positions + r0, adapter + r0, r0, mc, kv, rope, logits + r0 * shape_.vocab, s,
                threads);
    }
  }

 private:
  LayerWeights& layer_at(int64_t layer) {
    if (layer < 0 || layer >= shape_.layers) throw std::invalid_argument("decoder: layer out of range");
    return layers_[static_cast<size_t>(layer)];
  }

  void check_ready() const {
    if (!embed_) throw std::invalid_argument("decoder: globals not set");
    for (const LayerWeights& l : layers_) {
      if (!l.in_norm || !l.post_norm) throw std::invalid_argument("decoder: a layer's norms are not set");
      for (const Proj& p : l.proj)
        if (p.n == 0) throw std::invalid_argument("decoder: a layer's projection is not set");
    }
  }

  // out [m, n] = x [m, k] W^T (+ each row's LoRA term); x fp32 rows of stride k.
  void project(int64_t layer, int slot, const float* x, int64_t m, float* out, const int32_t* adapter,
               SimdLevel s, int threads) {
    const Proj& p = layers_[static_cast<size_t>(layer)].proj[slot];
    if (p.is_nf4) {
      linear_small_m(p.nf4, Matrix{x, DType::F32, m, p.k}, out, DType::F32, Lora{}, s, threads);
    } else {
      dense_project(p.dense, DType::F32, p.n, p.k, x, m, out, s, threads);
    }
    for (int64_t i = 0; i < m; ++i) {
      if (adapter[i] < 0) continue;
      const auto& table = adapters_[static_cast<size_t>(adapter[i])];
      const LoraTerm& t = table[layer * kProjs + slot];
      if (t.r == 0) continue;
      // t = x A^T, then out += scale * t B^T: two small dense products on the SIMD row kernel.
      float* tv = lora_t_.data();
      dense_rows(s, 1, t.a, DType::F32, p.k, x + i * p.k, 0, t.r, tv, t.r);
      float* delta = lora_delta_.data();
      dense_rows(s, 1, t.b, DType::F32, t.r, tv, 0, p.n, delta, p.n);
      for (int64_t j = 0; j < p.n; ++j) out[i * p.n + j] += t.scale * delta[j];
    }
  }

  // out [m, n] = x [m, k] W^T for a dense W (fp32 or bf16) on the pool; x fp32.
  static void dense_project(const void* w, DType wdt, int64_t n, int64_t k, const float* x, int64_t m, float* out,
                            SimdLevel s, int threads) {
    const int t = threads <= 0 ? ThreadPool::max_threads() : threads;
    const int64_t rows_per_task = std::max<int64_t>(16, ceil_div(n, static_cast<int64_t>(t) * 8));
    const int64_t tasks = ceil_div(n, rows_per_task);
    ThreadPool::instance().run(tasks, t, [&](int64_t task) {
      const int64_t r0 = task * rows_per_task, r1 = std::min(n, r0 + rows_per_task);
      for (int64_t m0 = 0; m0 < m; m0 += kDenseMaxRows) {
        const int mr = static_cast<int>(std::min<int64_t>(kDenseMaxRows, m - m0));
        dense_rows(s, mr, w, wdt, k, x + m0 * k, r0, r1, out + m0 * n, n);
      }
    });
  }

  void attention(int64_t layer, const int64_t* positions, int64_t row0, int64_t m, const KvCache& kv,
                 const RopeTable& rope, SimdLevel s, int threads) {
    const DecodeShape& c = shape_;
    const int64_t hd = c.head_dim, half = hd / 2, width = (c.heads + 2 * c.kv_heads) * hd;
    const int64_t head_stride = kv.cap * hd, slot_stride = c.kv_heads * head_stride;
    const int64_t layer_stride = kv.slots * slot_stride;
    float* kl = kv.k + layer * layer_stride;
    float* vl = kv.v + layer * layer_stride;
    // RoPE on the q and k heads (rope_rows' math), then the row's k and v into its slot at its position.
    for (int64_t i = 0; i < m; ++i) {
      float* row = qkv_.data() + i * width;
      const int64_t p = positions[i];
      rope_rows(row, DType::F32, 1, 1, width, c.heads + c.kv_heads, half, rope.cos + p * half, rope.sin + p * half,
                DType::F32, 0, 0);
      const int64_t slot = row0 + i;
      for (int64_t g = 0; g < c.kv_heads; ++g) {
        const float* ks = row + (c.heads + g) * hd;
        const float* vs = row + (c.heads + c.kv_heads + g) * hd;
        std::copy(ks, ks + hd, kl + slot * slot_stride + g * head_stride + p * hd);
        std::copy(vs, vs + hd, vl + slot * slot_stride + g * head_stride + p * hd);
      }
    }
    // One task per (row, kv head): the group of query heads sharing that kv head is contiguous in the qkv row,
    // so the scores of all of them are one multi-row pass over the keys (dense_rows, group <= kDenseMaxRows).
    const int64_t group = c.heads / c.kv_heads;
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    ThreadPool::instance().run(m * c.kv_heads, threads, [&](int64_t task) {
      const int64_t i = task / c.kv_heads, g = task % c.kv_heads;
      const int64_t p = positions[i], slot = row0 + i, n_keys = p + 1;
      const int64_t lo = c.window > 0 ? std::max<int64_t>(0, p - c.window + 1) : 0;
      const float* q = qkv_.data() + i * width + g * group * hd;
      const float* keys = kl + slot * slot_stride + g * head_stride;
      const float* vals = vl + slot * slot_stride + g * head_stride;
      thread_local std::vector<float> scores;
      if (static_cast<int64_t>(scores.size()) < group * n_keys) scores.resize(static_cast<size_t>(group * n_keys));
      dense_rows(s, static_cast<int>(group), keys, DType::F32, hd, q, lo, n_keys, scores.data(), n_keys);
      for (int64_t h = 0; h < group; ++h) {
        float* sc = scores.data() + h * n_keys;
        float mx = -INFINITY;
        for (int64_t j = lo; j < n_keys; ++j) {
          sc[j] *= scale;
          mx = std::max(mx, sc[j]);
        }
        float sum = 0.f;
        for (int64_t j = lo; j < n_keys; ++j) {
          sc[j] = std::exp(sc[j] - mx);
          sum += sc[j];
        }
        const float inv = 1.0f / sum;
        float* o = attn_.data() + i * c.heads * hd + (g * group + h) * hd;
        std::fill(o, o + hd, 0.f);
        for (int64_t j = lo; j < n_keys; ++j) {
          const float w = sc[j] * inv;
          const float* vj = vals + j * hd;
          for (int64_t e = 0; e < hd; ++e) o[e] += w * vj[e];
        }
      }
    });
  }

  using Clock = std::chrono::steady_clock;
  void lap(Clock::time_point& t, int phase) {
    if (!profiling_) return;
    const Clock::time_point now = Clock::now();
    phase_s_[phase] += std::chrono::duration<double>(now - t).count();
    t = now;
  }

  void step_rows(const int64_t* tokens, const int64_t* positions, const int32_t* adapter, int64_t row0, int64_t m,
                 const KvCache& kv, const RopeTable& rope, float* logits, SimdLevel s, int threads) {
    const DecodeShape& c = shape_;
    const int64_t hs = c.hidden;
    Clock::time_point t = profiling_ ? Clock::now() : Clock::time_point{};
    for (int64_t i = 0; i < m; ++i) std::copy(embed_ + tokens[i] * hs, embed_ + (tokens[i] + 1) * hs, &h_[i * hs]);
    for (int64_t l = 0; l < c.layers; ++l) {
      const LayerWeights& lw = layers_[static_cast<size_t>(l)];
      rms_norm_rows(h_.data(), lw.in_norm, xn_.data(), DType::F32, m, hs, c.eps);
      lap(t, 0);
      project(l, kQkv, xn_.data(), m, qkv_.data(), adapter, s, threads);
      lap(t, 1);
      attention(l, positions, row0, m, kv, rope, s, threads);
      lap(t, 2);
      project(l, kO, attn_.data(), m, tmp_.data(), adapter, s, threads);
      lap(t, 3);
      for (int64_t j = 0; j < m * hs; ++j) h_[j] += tmp_[j];
      rms_norm_rows(h_.data(), lw.post_norm, xn_.data(), DType::F32, m, hs, c.eps);
      lap(t, 0);
      project(l, kGateUp, xn_.data(), m, tmp_.data(), adapter, s, threads);
      lap(t, 4);
      swiglu_rows(tmp_.data(), act_.data(), DType::F32, m, c.inter);
      lap(t, 5);
      project(l, kDown, act_.data(), m, tmp_.data(), adapter, s, threads);
      lap(t, 6);
      for (int64_t j = 0; j < m * hs; ++j) h_[j] += tmp_[j];
    }
    rms_norm_rows(h_.data(), final_norm_, xn_.data(), DType::F32, m, hs, c.eps);
    dense_project(head_, head_dt_, c.vocab, hs, xn_.data(), m, logits, s, threads);
    lap(t, 7);
  }

  DecodeShape shape_;
  std::vector<LayerWeights> layers_;
  std::vector<std::vector<LoraTerm>> adapters_;  // [adapter][layer * kProjs + slot]; r == 0: no term there
  int64_t max_r_ = 64;
  const float* embed_ = nullptr;
  const float* final_norm_ = nullptr;
  const void* head_ = nullptr;
  DType head_dt_ = DType::F32;
  bool profiling_ = false;
  std::array<double, kPhases> phase_s_{};
  std::vector<float> h_, xn_, tmp_, qkv_, attn_, act_, lora_t_, lora_delta_;
};

}  // namespace nf4
}  // namespace phi3fast
