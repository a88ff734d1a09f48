// pybind11 binding of the native decode step (csrc/nf4/decode_step.h) as NativeDecoder. As in nf4.cpp, tensors
// cross as raw addresses: phi3fast.model.native_decode checks dtypes, shapes and contiguity and keeps every
// tensor alive as long as the decoder; this layer checks what it can and releases the GIL around a step.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <string>

#include "common/simd.h"
#include "nf4/decode_step.h"
#include "python/bindings.h"

namespace py = pybind11;
using namespace phi3fast::nf4;

namespace {

template <class T>
T* addr(uintptr_t a, const char* what) {
  if (!a) throw std::invalid_argument(std::string("NativeDecoder: null address for ") + what);
  return reinterpret_cast<T*>(a);
}

}  // namespace

void bind_decode(py::module_& m) {
  py::class_<Decoder>(m, "NativeDecoder", "One whole Phi-3 decode step per call (csrc/nf4/decode_step.h).")
      .def(py::init([](int64_t layers, int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim,
                       int64_t inter, int64_t vocab, float eps, int64_t window) {
             DecodeShape s;
             s.layers = layers, s.hidden = hidden, s.heads = heads, s.kv_heads = kv_heads, s.head_dim = head_dim;
             s.inter = inter, s.vocab = vocab, s.eps = eps, s.window = window;
             return new Decoder(s);
           }),
           py::arg("layers"), py::arg("hidden"), py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"),
           py::arg("intermediate"), py::arg("vocab"), py::arg("eps"), py::arg("window"))
      .def("set_norms",
           [](Decoder& d, int64_t layer, uintptr_t in_norm, uintptr_t post_norm) {
             d.set_norms(layer, addr<const float>(in_norm, "input norm"), addr<const float>(post_norm, "post norm"));
           })
      .def("set_nf4",
           [](Decoder& d, int64_t layer, int slot, const WeightView& w) {
             Proj p;
             p.is_nf4 = true, p.nf4 = w, p.n = w.n, p.k = w.k;
             d.set_proj(layer, slot, p);
           })
      .def("set_dense",
           [](Decoder& d, int64_t layer, int slot, uintptr_t w, int64_t n, int64_t k) {
             Proj p;
             p.dense = addr<const float>(w, "dense weight"), p.n = n, p.k = k;
             d.set_proj(layer, slot, p);
           })
      .def("set_globals",
           [](Decoder& d, uintptr_t embed, uintptr_t final_norm, uintptr_t head, const std::string& head_store,
              uintptr_t head_scale) {
             d.set_globals(addr<const float>(embed, "embedding"), addr<const float>(final_norm, "final norm"),
                           addr<const void>(head, "lm_head"), head_store_from_name(head_store),
                           reinterpret_cast<const float*>(head_scale));
           })
      .def("set_lora",
           [](Decoder& d, int64_t index, int64_t layer, int slot, uintptr_t a, uintptr_t b, int64_t r, float scale) {
             d.set_lora(index, layer, slot, LoraTerm{addr<const float>(a, "LoRA A"), addr<const float>(b, "LoRA B"),
                                                     r, scale});
           })
      .def_property_readonly("adapters", &Decoder::adapters)
      .def("set_profiling", &Decoder::set_profiling, py::arg("on"), py::arg("cpu_clock") = false,
           "Phase timers on/off (and reset); cpu_clock: the calling thread's CPU time instead of wall time.")
      .def("profile", &Decoder::profile,
           "Seconds per phase since set_profiling: other (embed, norms, residuals), qkv, attention, o_proj, "
           "gate_up, swiglu, down, lm_head.")
      .def(
          "step",
          [](Decoder& d, uintptr_t tokens, uintptr_t positions, uintptr_t adapter, int64_t m, uintptr_t k,
             uintptr_t v, int64_t slots, int64_t cap, uintptr_t cos, uintptr_t sin, int64_t table_len,
             uintptr_t logits, std::optional<std::string> simd, int threads) {
            const KvCache kv{addr<float>(k, "K cache"), addr<float>(v, "V cache"), slots, cap};
            const RopeTable rope{addr<const float>(cos, "cos"), addr<const float>(sin, "sin"), table_len};
            const phi3fast::SimdLevel s = phi3fast::simd_requested(simd);
            const int64_t* tok = addr<const int64_t>(tokens, "tokens");
            const int64_t* pos = addr<const int64_t>(positions, "positions");
            const int32_t* ad = addr<const int32_t>(adapter, "adapters");
            float* out = addr<float>(logits, "logits");
            py::gil_scoped_release release;
            d.step(tok, pos, ad, m, kv, rope, out, s, threads);
          },
          py::arg("tokens"), py::arg("positions"), py::arg("adapters"), py::arg("m"), py::arg("k"), py::arg("v"),
          py::arg("slots"), py::arg("cap"), py::arg("cos"), py::arg("sin"), py::arg("table_len"), py::arg("logits"),
          py::arg("simd") = py::none(), py::arg("threads") = 0,
          "logits[m, vocab] of one decode step; K/V written into the cache at each row's position; GIL released.");
  m.def(
      "head_linear",
      [](uintptr_t w, const std::string& store, uintptr_t scale, int64_t n, int64_t k, uintptr_t x, int64_t m_rows,
         uintptr_t out, std::optional<std::string> simd, int threads) {
        const HeadStore hs = head_store_from_name(store);
        if (n <= 0 || k <= 0 || m_rows < 0) throw std::invalid_argument("head_linear: bad sizes");
        if (hs == HeadStore::I8 && !scale) throw std::invalid_argument("head_linear: int8 needs row scales");
        const void* wp = addr<const void>(w, "weight");
        const float* xp = addr<const float>(x, "x");
        float* op = addr<float>(out, "out");
        const phi3fast::SimdLevel s = phi3fast::simd_requested(simd);
        py::gil_scoped_release release;
        head_linear(wp, hs, reinterpret_cast<const float*>(scale), n, k, xp, m_rows, op, s, threads);
      },
      py::arg("w"), py::arg("store"), py::arg("scale"), py::arg("n"), py::arg("k"), py::arg("x"), py::arg("m"),
      py::arg("out"), py::arg("simd") = py::none(), py::arg("threads") = 0,
      "out[M, N] = x[M, K] W^T, fp32 x and out, W an lm_head stored as float32, bfloat16 or int8 (+ row scales).");
}
