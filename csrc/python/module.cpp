// pybind11 bindings for phi3fast._hnsw: the error classes, the distance functions (exposed directly so tests can
// check every SIMD path against numpy), then Index (index.cpp) and BFIndex (bfindex.cpp), which build on the
// same DistanceFunctions.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>

#include "hnsw/distances.h"
#include "python/bindings.h"
#include "python/convert.h"

namespace py = pybind11;
using phi3fast::DistanceFunctions;

namespace {

using F32Array = py::array_t<float, py::array::c_style | py::array::forcecast>;

// Rejects what forcecast would silently mangle (complex -> real drops the imaginary part).
F32Array as_float32(const py::array& a, const char* name) {
  const char kind = a.dtype().kind();
  if (kind != 'f' && kind != 'i' && kind != 'u')
    throw py::type_error(std::string(name) + ": expected a real numeric array, got dtype " +
                         std::string(py::str(a.dtype())));
  return F32Array::ensure(a);
}

DistanceFunctions pick(const std::optional<std::string>& simd) {
  return simd ? phi3fast::select_distances(phi3fast::simd_from_name(*simd)) : phi3fast::select_distances();
}

float pair_distance(const py::array& a_in, const py::array& b_in, const std::optional<std::string>& simd,
                    bool l2) {
  F32Array a = as_float32(a_in, "a"), b = as_float32(b_in, "b");
  if (a.ndim() != 1 || b.ndim() != 1) throw py::value_error("a and b must be 1-D vectors");
  if (a.shape(0) != b.shape(0))
    throw py::value_error("dimension mismatch: a has " + std::to_string(a.shape(0)) + ", b has " +
                          std::to_string(b.shape(0)));
  DistanceFunctions f = pick(simd);
  const size_t d = static_cast<size_t>(a.shape(0));
  return l2 ? f.l2sq(a.data(), b.data(), d) : f.ip(a.data(), b.data(), d);
}

py::array_t<float> pairwise(const py::array& q_in, const py::array& x_in, const std::string& metric,
                            const std::optional<std::string>& simd) {
  F32Array q = as_float32(q_in, "queries"), x = as_float32(x_in, "data");
  if (q.ndim() != 2 || x.ndim() != 2) throw py::value_error("queries and data must be 2-D [n, dim]");
  if (q.shape(1) != x.shape(1))
    throw py::value_error("dimension mismatch: queries have " + std::to_string(q.shape(1)) + ", data has " +
                          std::to_string(x.shape(1)));
  bool l2;
  if (metric == "l2") l2 = true;
  else if (metric == "ip") l2 = false;
  else throw py::value_error("metric must be 'l2' or 'ip', got '" + metric + "'");
  DistanceFunctions f = pick(simd);
  const py::ssize_t n = q.shape(0), m = x.shape(0), d = q.shape(1);
  py::array_t<float> out({n, m});
  float* o = out.mutable_data();
  const float* qp = q.data();
  const float* xp = x.data();
  {
    py::gil_scoped_release release;
    phi3fast::DistFn fn = l2 ? f.l2sq : f.ip;
    for (py::ssize_t i = 0; i < n; ++i)
      for (py::ssize_t j = 0; j < m; ++j) o[i * m + j] = fn(qp + i * d, xp + j * d, static_cast<size_t>(d));
  }
  return out;
}

}  // namespace

// The error classes every binding raises through, and the names the index classes accept.
void bind_errors(py::module_& m) {
  namespace pf = phi3fast;
  // Exception classes that are both what hnswlib raises (RuntimeError, ValueError, TypeError) and
  // phi3fast's user error, so hnswlib code keeps working and the phi3fast CLI prints one clean line.
  py::object base = py::module_::import("phi3fast.errors").attr("Phi3FastError");
  auto make = [&](const char* name, PyObject* builtin) {
    py::tuple bases = py::make_tuple(base, py::handle(builtin));
    PyObject* t = PyErr_NewException((std::string("phi3fast.hnsw.") + name).c_str(), bases.ptr(), nullptr);
    if (!t) throw py::error_already_set();
    m.attr(name) = py::reinterpret_borrow<py::object>(t);
    return t;
  };
  // The names space_from_name and storage_from_name accept, in their code order: Python reads them from here.
  m.attr("SPACES") = py::make_tuple("l2", "ip", "cosine");
  m.attr("STORAGES") = py::make_tuple("float32", "float16", "int8");

  static PyObject* runtime_t = make("HnswError", PyExc_RuntimeError);
  static PyObject* value_t = make("HnswValueError", PyExc_ValueError);
  static PyObject* type_t = make("HnswTypeError", PyExc_TypeError);
  static PyObject* overflow_t = make("HnswOverflowError", PyExc_OverflowError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const py::builtin_exception& e) {
      e.set_error();
    } catch (const pf::TypeErr& e) {
      PyErr_SetString(type_t, e.what());
    } catch (const pf::OverflowErr& e) {
      PyErr_SetString(overflow_t, e.what());
    } catch (const std::invalid_argument& e) {
      PyErr_SetString(value_t, e.what());
    } catch (const std::runtime_error& e) {
      PyErr_SetString(runtime_t, e.what());
    }
  });
}

PYBIND11_MODULE(_hnsw, m) {
  m.doc() = "phi3fast native core: SIMD distances and the HNSW index";

  m.def("simd_level", [] { return std::string(phi3fast::simd_name(phi3fast::detect_simd())); },
        "Best SIMD level this CPU supports: 'avx512', 'avx2' or 'scalar'.");
  m.def("supported_simd_levels", [] {
    py::list out;
    int best = static_cast<int>(phi3fast::detect_simd());
    for (int s = 0; s <= best; ++s) out.append(phi3fast::simd_name(static_cast<phi3fast::SimdLevel>(s)));
    return out;
  });
  m.def("l2_sq", [](const py::array& a, const py::array& b, std::optional<std::string> simd) {
    return pair_distance(a, b, simd, true);
  }, py::arg("a"), py::arg("b"), py::arg("simd") = py::none(), "Squared L2 distance of two vectors.");
  m.def("inner_product", [](const py::array& a, const py::array& b, std::optional<std::string> simd) {
    return pair_distance(a, b, simd, false);
  }, py::arg("a"), py::arg("b"), py::arg("simd") = py::none(), "Dot product of two vectors.");
  m.def("pairwise", &pairwise, py::arg("queries"), py::arg("data"), py::arg("metric") = "l2",
        py::arg("simd") = py::none(),
        "All-pairs squared L2 or inner product, [n, dim] x [m, dim] -> [n, m] float32 (GIL released).");

  bind_errors(m);
  bind_index(m);
  bind_bfindex(m);
  bind_nf4(m);
  bind_decode(m);
}
