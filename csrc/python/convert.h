// Shared by the binding translation units (index.cpp, bfindex.cpp): numpy inputs checked and converted with the
// GIL held (float32 rows, integer ids, the filter argument), the batch search loop that runs with the GIL
// released, and the exception kinds module.cpp translates into hnswlib's types.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/parallel.h"
#include "hnsw/fileio.h"
#include "hnsw/filter.h"
#include "hnsw/vector_space.h"
#include "hnsw/distances.h"

namespace py = pybind11;

namespace phi3fast {

// Python-side exception kinds; translated to classes that are both hnswlib's builtin type and Phi3FastError.
struct TypeErr : std::runtime_error { using std::runtime_error::runtime_error; };
struct OverflowErr : std::runtime_error { using std::runtime_error::runtime_error; };

namespace bind {

using F32 = py::array_t<float, py::array::c_style | py::array::forcecast>;

struct Rows {
  F32 arr;
  size_t rows = 0;
  const float* row(size_t i, size_t dim) const { return arr.data() + i * dim; }
};

inline py::array as_array(const py::object& o) {
  return py::reinterpret_borrow<py::array>(py::module_::import("numpy").attr("asarray")(o));
}

// float32 [rows, dim] from anything array-like: float64/ints converted, complex and non-numeric refused,
// 1-D taken as one row, NaN/inf refused (they would poison every distance they touch).
inline Rows as_rows(const py::object& data, size_t dim, const char* what) {
  py::array a = as_array(data);
  const char kind = a.dtype().kind();
  if (kind == 'c') throw TypeErr(std::string(what) + ": complex values are not supported (got dtype " + std::string(py::str(a.dtype())) + ")");
  if (kind != 'f' && kind != 'i' && kind != 'u' && kind != 'b')
    throw TypeErr(std::string(what) + ": expected a real numeric array, got dtype " + std::string(py::str(a.dtype())));
  if (a.ndim() != 1 && a.ndim() != 2)
    throw std::runtime_error("Input vector data wrong shape. Number of dimensions " + std::to_string(a.ndim()) +
                             ". Data must be a 1D or 2D array.");
  Rows r;
  r.arr = F32::ensure(a);
  const size_t features = static_cast<size_t>(a.ndim() == 2 ? a.shape(1) : a.shape(0));
  r.rows = a.ndim() == 2 ? static_cast<size_t>(a.shape(0)) : 1;
  if (features != dim)
    throw std::runtime_error("Wrong dimensionality of the vectors: " + std::string(what) + " has " +
                             std::to_string(features) + ", the index has dim " + std::to_string(dim));
  const float* p = r.arr.data();
  for (size_t i = 0, n = r.rows * dim; i < n; ++i)
    if (!std::isfinite(p[i]))
      throw std::invalid_argument(std::string(what) + " contains NaN or infinity (row " + std::to_string(i / dim) + ")");
  return r;
}

inline std::vector<uint64_t> as_ids(const py::object& ids, size_t rows) {
  std::vector<uint64_t> out;
  if (ids.is_none()) return out;
  py::array a = as_array(ids);
  const char kind = a.dtype().kind();
  if (a.size() > 0 && kind != 'i' && kind != 'u')
    throw TypeErr("ids must be integers, got dtype " + std::string(py::str(a.dtype())));
  const bool ok = (a.ndim() == 1 && static_cast<size_t>(a.shape(0)) == rows) || (a.ndim() == 0 && rows == 1);
  if (!ok) {
    std::string shape = "(";
    for (py::ssize_t d = 0; d < a.ndim(); ++d) shape += (d ? ", " : "") + std::to_string(a.shape(d));
    shape += a.ndim() == 1 ? ",)" : ")";
    throw std::runtime_error("The input label shape " + shape + " does not match the input data vector shape (" +
                             std::to_string(rows) + " rows): ids must be a 1-D array with one label per row");
  }
  if (kind == 'i') {
    auto s = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(a);
    for (py::ssize_t i = 0; i < s.size(); ++i) {
      if (s.data()[i] < 0) throw OverflowErr("ids must be non-negative, got " + std::to_string(s.data()[i]));
      out.push_back(static_cast<uint64_t>(s.data()[i]));
    }
  } else if (a.size() > 0) {
    auto u = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>::ensure(a);
    out.assign(u.data(), u.data() + u.size());
  }
  return out;
}

// The filter argument: None, a callable on the label (hnswlib), a boolean mask indexed by label, or an
// array of allowed labels.
struct FilterArg {
  enum Kind { None, Callable, Mask, Ids } kind = None;
  PyObject* fn = nullptr;  // borrowed: the argument outlives the call
  py::array_t<bool, py::array::c_style | py::array::forcecast> mask;
  std::vector<uint64_t> ids;
};

inline FilterArg parse_filter(const py::object& f) {
  FilterArg out;
  if (f.is_none()) return out;
  if (!py::isinstance<py::array>(f) && PyCallable_Check(f.ptr())) {
    out.kind = FilterArg::Callable;
    out.fn = f.ptr();
    return out;
  }
  py::array a = as_array(f);
  if (a.ndim() != 1) throw std::invalid_argument("filter: an id array or boolean mask must be 1-D");
  const char kind = a.dtype().kind();
  if (kind == 'b') {
    out.kind = FilterArg::Mask;
    out.mask = decltype(out.mask)::ensure(a);
  } else if (kind == 'i' || kind == 'u' || a.size() == 0) {
    out.kind = FilterArg::Ids;
    out.ids = as_ids(a, static_cast<size_t>(a.shape(0)));
  } else {
    throw TypeErr("filter must be a callable, a boolean mask or an array of allowed ids, got dtype " +
                  std::string(py::str(a.dtype())));
  }
  return out;
}

inline std::function<bool(uint64_t)> callable_filter(PyObject* fn) {
  return [fn](uint64_t label) {
    py::gil_scoped_acquire g;
    return py::handle(fn)(label).cast<bool>();
  };
}

// The filter argument resolved against index x (HnswIndex or BruteForceIndex) when the query starts: a
// bitset over x's internal ids for an id array or mask, the callable for hnswlib's filter. Call without the GIL.
template <class Ix>
Filter make_filter(const Ix& x, const FilterArg& fa) {
  Filter f;
  if (fa.kind == FilterArg::Callable) f.fn = callable_filter(fa.fn);
  else if (fa.kind == FilterArg::Mask) f = x.filter_from_mask(fa.mask.data(), static_cast<size_t>(fa.mask.size()));
  else if (fa.kind == FilterArg::Ids) f = x.filter_from_labels(fa.ids.data(), fa.ids.size());
  return f;
}

inline int resolve_threads(int requested, int dflt, size_t rows) {
  int t = requested <= 0 ? dflt : requested;
  if (t <= 0) t = static_cast<int>(hardware_threads());
  if (rows <= static_cast<size_t>(t) * 4) t = 1;  // as hnswlib: threads do not pay off for a few rows
  return t;
}

inline std::optional<SimdLevel> simd_arg(const std::optional<std::string>& s) {
  if (!s) return std::nullopt;
  SimdLevel want = simd_from_name(*s), best = detect_index_simd();
  if (static_cast<int>(want) > static_cast<int>(best))
    throw std::invalid_argument(std::string("SIMD level '") + *s + "' is not supported by this CPU");
  return want;
}

// Row i of the input, normalized into buf for the cosine space (the index stores unit vectors, as hnswlib).
inline const float* prepared_row(const Rows& rows, size_t i, size_t dim, Space space, std::vector<float>& buf) {
  const float* v = rows.row(i, dim);
  if (space != Space::Cosine) return v;
  std::memcpy(buf.data(), v, dim * 4);
  normalize(buf.data(), dim);
  return buf.data();
}

inline const char* const kShortResult = "Cannot return the results in a contiguous 2D array. Probably ef or M is too small";

// knn_query for both index classes: validates the rows, k and filter, allocates the [rows, k] results, then
// runs search_row(query, filter or nullptr, labels_out, dists_out) -> found for every row (cosine rows
// normalized first) on the threads, with the GIL released. A row with fewer than k results raises hnswlib's
// error.
template <class Ix, class SearchRow>
py::tuple knn_query_rows(const Ix& x, Space space, size_t dim, const py::object& data, size_t k, int threads,
                         int default_threads, const py::object& filter, SearchRow&& search_row) {
  Rows rows = as_rows(data, dim, "data");
  if (k > x.count() && rows.rows > 0) throw std::runtime_error(kShortResult);  // before allocating [rows, k]
  FilterArg fa = parse_filter(filter);
  py::array_t<uint64_t> labels({rows.rows, k});
  py::array_t<float> dists({rows.rows, k});
  uint64_t* lp = labels.mutable_data();
  float* dp = dists.mutable_data();
  const int t = resolve_threads(threads, default_threads, rows.rows);
  {
    py::gil_scoped_release r;
    const Filter f = make_filter(x, fa);
    const Filter* fp = fa.kind == FilterArg::None ? nullptr : &f;
    std::vector<std::vector<float>> bufs(static_cast<size_t>(t), std::vector<float>(dim));
    parallel_for(rows.rows, t, [&](size_t i, size_t w) {
      const float* v = prepared_row(rows, i, dim, space, bufs[w]);
      if (search_row(v, fp, lp + i * k, dp + i * k) < k) throw std::runtime_error(kShortResult);
    });
  }
  return py::make_tuple(labels, dists);
}

inline std::string read_file_nogil(const std::string& path) {
  py::gil_scoped_release r;
  return read_file(path);
}

// Pickle at every protocol the way protocol 2+ does: a new instance via cls.__new__, then __setstate__. Protocols 0
// and 1 would otherwise go through copyreg._reconstructor -> object.__new__, which builds an instance without the
// C++ holder, and pybind11 aborts the process on it. type(self) keeps Python subclasses (phi3fast.hnsw.Index).
inline py::tuple reduce_newobj(const py::object& self, int /*protocol*/) {
  py::object newobj = py::module_::import("copyreg").attr("__newobj__");
  return py::make_tuple(newobj, py::make_tuple(py::type::of(self)), self.attr("__getstate__")());
}

}  // namespace bind
}  // namespace phi3fast
