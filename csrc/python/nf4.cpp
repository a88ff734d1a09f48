// pybind11 bindings of the NF4 CPU kernels (csrc/nf4). Tensors cross as raw addresses: the Python wrapper
// (phi3fast.kernels.nf4_cpu) owns every check of dtype, device, contiguity and shape and keeps the tensors alive
// for the call; this layer re-checks the sizes it can and releases the GIL around the work.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "common/simd.h"
#include "nf4/dense.h"
#include "nf4/dropout.h"
#include "nf4/gemm_bf16.h"
#include "nf4/kernels.h"
#include "nf4/rowwise.h"
#include "python/bindings.h"

namespace py = pybind11;
using namespace phi3fast::nf4;

namespace {

template <class T>
const T* ptr(uintptr_t a) {
  return reinterpret_cast<const T*>(a);
}

WeightView make_view(uintptr_t packed, uintptr_t absmax, bool double_quant, uintptr_t nested_code,
                     uintptr_t nested_absmax, float offset, const std::vector<float>& code, int64_t n, int64_t k,
                     int64_t blocksize) {
  if (code.size() != 16) throw std::invalid_argument("NF4 code must have 16 entries");
  WeightView w;
  w.packed = ptr<uint8_t>(packed);
  if (double_quant) {
    w.absmax_q = ptr<uint8_t>(absmax);
    w.nested_code = ptr<float>(nested_code);
    w.nested_absmax = ptr<float>(nested_absmax);
    w.offset = offset;
  } else {
    w.absmax_f = ptr<float>(absmax);
  }
  for (int i = 0; i < 16; ++i) w.code[i] = code[i];
  w.n = n;
  w.k = k;
  w.blocksize = blocksize;
  w.validate();
  return w;
}

void run_op(bool is_dx, const WeightView& w, uintptr_t a, const std::string& a_dtype, int64_t m, int64_t cols,
            uintptr_t out, const std::string& out_dtype, uintptr_t lora_left, uintptr_t lora_right, int64_t r,
            float scale, const std::optional<std::string>& simd, int threads, const std::string& compute) {
  if (m < 0) throw std::invalid_argument("M must be >= 0");
  if (r < 0 || (r > 0 && (!lora_left || !lora_right))) throw std::invalid_argument("LoRA operands missing");
  const Matrix mat{reinterpret_cast<const void*>(a), dtype_from_name(a_dtype), m, cols};
  const DType odt = dtype_from_name(out_dtype);
  Lora lora{ptr<float>(lora_left), ptr<float>(lora_right), r, scale};
  const phi3fast::SimdLevel s = phi3fast::simd_requested(simd);
  if (compute != "fp32" && compute != "bf16")
    throw std::invalid_argument("compute='" + compute + "': expected 'fp32' or 'bf16'");
  // bf16 compute: the large-M GEMMs only (decode's GEMV stays fp32), on AVX-512 with AVX512-BF16, else fp32.
  const bool bf16 = compute == "bf16" && s == phi3fast::SimdLevel::AVX512 && cpu_has_avx512bf16() &&
                    (is_dx || m > kSmallM);
  py::gil_scoped_release release;
  if (bf16) {
    w.validate();
    if (m > 0) gemm_panels_bf16(w, is_dx, mat, reinterpret_cast<void*>(out), odt, lora, threads);
  } else if (is_dx) dx(w, mat, reinterpret_cast<void*>(out), odt, lora, s, threads);
  else linear(w, mat, reinterpret_cast<void*>(out), odt, lora, s, threads);
}

}  // namespace

void bind_nf4(py::module_& m) {
  py::class_<WeightView>(m, "NF4View", "Addresses and sizes of one NF4 weight's tensors (kept alive by the caller).")
      .def(py::init(&make_view), py::arg("packed"), py::arg("absmax"), py::arg("double_quant"),
           py::arg("nested_code"), py::arg("nested_absmax"), py::arg("offset"), py::arg("code"), py::arg("n"),
           py::arg("k"), py::arg("blocksize"))
      .def_readonly("n", &WeightView::n)
      .def_readonly("k", &WeightView::k)
      .def_readonly("blocksize", &WeightView::blocksize);
  m.def(
      "nf4_linear",
      [](const WeightView& w, uintptr_t x, const std::string& x_dtype, int64_t m_rows, uintptr_t out,
         const std::string& out_dtype, uintptr_t lora_t, uintptr_t lora_b, int64_t r, float scale,
         std::optional<std::string> simd, int threads, const std::string& compute) {
        run_op(false, w, x, x_dtype, m_rows, w.k, out, out_dtype, lora_t, lora_b, r, scale, simd, threads, compute);
      },
      py::arg("w"), py::arg("x"), py::arg("x_dtype"), py::arg("m"), py::arg("out"), py::arg("out_dtype"),
      py::arg("lora_t") = 0, py::arg("lora_b") = 0, py::arg("r") = 0, py::arg("scale") = 0.f,
      py::arg("simd") = py::none(), py::arg("threads") = 0, py::arg("compute") = "fp32",
      "out[M, N] = x[M, K] W^T (+ scale * t[M, r] B[N, r]^T); fp32 accumulation; GIL released. compute='bf16': "
      "bf16 products for M > 16 on AVX512-BF16 (else fp32).");
  m.def(
      "nf4_dx",
      [](const WeightView& w, uintptr_t g, const std::string& g_dtype, int64_t m_rows, uintptr_t out,
         const std::string& out_dtype, uintptr_t lora_u, uintptr_t lora_a, int64_t r, float scale,
         std::optional<std::string> simd, int threads, const std::string& compute) {
        run_op(true, w, g, g_dtype, m_rows, w.n, out, out_dtype, lora_u, lora_a, r, scale, simd, threads, compute);
      },
      py::arg("w"), py::arg("g"), py::arg("g_dtype"), py::arg("m"), py::arg("out"), py::arg("out_dtype"),
      py::arg("lora_u") = 0, py::arg("lora_a") = 0, py::arg("r") = 0, py::arg("scale") = 0.f,
      py::arg("simd") = py::none(), py::arg("threads") = 0, py::arg("compute") = "fp32",
      "out[M, K] = dY[M, N] W (+ scale * u[M, r] A[r, K]); fp32 accumulation; GIL released. compute='bf16': "
      "bf16 products on AVX512-BF16 (else fp32).");
  m.def(
      "dense_linear",
      [](uintptr_t w, const std::string& w_dtype, int64_t n, int64_t k, uintptr_t x, const std::string& x_dtype,
         int64_t m_rows, uintptr_t out, const std::string& out_dtype, std::optional<std::string> simd, int threads) {
        if (!w || !x || !out || m_rows < 0) throw std::invalid_argument("dense_linear: bad pointer or M");
        const DType wdt = dtype_from_name(w_dtype), xdt = dtype_from_name(x_dtype), odt = dtype_from_name(out_dtype);
        const phi3fast::SimdLevel s = phi3fast::simd_requested(simd);
        py::gil_scoped_release release;
        dense_linear(reinterpret_cast<const void*>(w), wdt, n, k, reinterpret_cast<const void*>(x), xdt, m_rows,
                     reinterpret_cast<void*>(out), odt, s, threads);
      },
      py::arg("w"), py::arg("w_dtype"), py::arg("n"), py::arg("k"), py::arg("x"), py::arg("x_dtype"), py::arg("m"),
      py::arg("out"), py::arg("out_dtype"), py::arg("simd") = py::none(), py::arg("threads") = 0,
      "out[M, N] = x[M, K] W[N, K]^T for a dense fp32/bf16 W, on the NF4 kernels' thread pool; GIL released.");
  // Row-wise ops of a decode step (single-threaded: at decode sizes they cost microseconds).
  m.def(
      "rms_norm_rows",
      [](uintptr_t x, uintptr_t w, uintptr_t out, const std::string& dtype, int64_t m_rows, int64_t h, float eps) {
        if (!x || !w || !out || m_rows < 0 || h <= 0) throw std::invalid_argument("rms_norm_rows: bad arguments");
        rms_norm_rows(reinterpret_cast<const void*>(x), reinterpret_cast<const void*>(w),
                      reinterpret_cast<void*>(out), dtype_from_name(dtype), m_rows, h, eps);
      },
      py::arg("x"), py::arg("w"), py::arg("out"), py::arg("dtype"), py::arg("m"), py::arg("h"), py::arg("eps"));
  m.def(
      "swiglu_rows",
      [](uintptr_t gu, uintptr_t out, const std::string& dtype, int64_t m_rows, int64_t width) {
        if (!gu || !out || m_rows < 0 || width <= 0) throw std::invalid_argument("swiglu_rows: bad arguments");
        swiglu_rows(reinterpret_cast<const void*>(gu), reinterpret_cast<void*>(out), dtype_from_name(dtype), m_rows,
                    width);
      },
      py::arg("gate_up"), py::arg("out"), py::arg("dtype"), py::arg("m"), py::arg("width"));
  m.def(
      "rope_rows",
      [](uintptr_t qkv, const std::string& dtype, int64_t b, int64_t t, int64_t row_width, int64_t n_rot,
         int64_t half, uintptr_t cos, uintptr_t sin, const std::string& cs_dtype, int64_t cs_b, int64_t cs_t) {
        if (!qkv || !cos || !sin || b < 0 || t < 0 || half <= 0 || n_rot * 2 * half > row_width)
          throw std::invalid_argument("rope_rows: bad arguments");
        rope_rows(reinterpret_cast<void*>(qkv), dtype_from_name(dtype), b, t, row_width, n_rot, half,
                  reinterpret_cast<const void*>(cos), reinterpret_cast<const void*>(sin), dtype_from_name(cs_dtype),
                  cs_b, cs_t);
      },
      py::arg("qkv"), py::arg("dtype"), py::arg("b"), py::arg("t"), py::arg("row_width"), py::arg("n_rot"),
      py::arg("half"), py::arg("cos"), py::arg("sin"), py::arg("cs_dtype"), py::arg("cs_b"), py::arg("cs_t"));
  m.def(
      "dropout_forward",
      [](uintptr_t x, uintptr_t out, uintptr_t mask, const std::string& dtype, int64_t n, double p, uint64_t seed,
         int threads) {
        if (!x || !out || !mask || n < 0 || !(p >= 0.0 && p < 1.0))
          throw std::invalid_argument("dropout_forward: bad arguments");
        const DType dt = dtype_from_name(dtype);
        py::gil_scoped_release release;
        dropout_forward(reinterpret_cast<const void*>(x), reinterpret_cast<void*>(out),
                        reinterpret_cast<uint8_t*>(mask), dt, n, p, seed, threads);
      },
      py::arg("x"), py::arg("out"), py::arg("mask"), py::arg("dtype"), py::arg("n"), py::arg("p"), py::arg("seed"),
      py::arg("threads") = 0, "out = x * keep / (1 - p), keep (uint8) a hash of (seed, index); GIL released.");
  m.def(
      "dropout_backward",
      [](uintptr_t g, uintptr_t mask, uintptr_t out, const std::string& dtype, int64_t n, double p, int threads) {
        if (!g || !out || !mask || n < 0 || !(p >= 0.0 && p < 1.0))
          throw std::invalid_argument("dropout_backward: bad arguments");
        const DType dt = dtype_from_name(dtype);
        py::gil_scoped_release release;
        dropout_backward(reinterpret_cast<const void*>(g), reinterpret_cast<const uint8_t*>(mask),
                         reinterpret_cast<void*>(out), dt, n, p, threads);
      },
      py::arg("g"), py::arg("mask"), py::arg("out"), py::arg("dtype"), py::arg("n"), py::arg("p"),
      py::arg("threads") = 0, "out = g * mask / (1 - p); GIL released.");
  m.def("nf4_bf16_compute_supported", &cpu_has_avx512bf16,
        "Whether this CPU has AVX512-BF16 (what compute='bf16' of nf4_linear/nf4_dx needs).");
  m.def("nf4_max_threads", &ThreadPool::max_threads, "Threads the NF4 kernels use by default (every core).");
}
