// Python classes Index and BFIndex: hnswlib 0.8's Python API over phi3fast::HnswIndex / BruteForceIndex.
// Its own translation unit; module.cpp calls bind_index. Every method validates its numpy inputs with the GIL
// held, then releases the GIL before touching the index (so a filter callable can re-take it from worker threads without
// deadlock), and worker exceptions are re-raised here on the calling thread.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <optional>
#include <string>
#include <unordered_set>
#include <vector>

#include "hnsw/bruteforce.h"
#include "hnsw/index_file.h"
#include "python/bindings.h"

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


// ----------------------------------------------------------------------------------------------------------
class PyIndex {
 public:
  std::string space_name;
  Space space;
  size_t dim;
  SimdLevel simd;
  // Shared, not unique: every call copies this pointer with the GIL held and works on its copy with the GIL
  // released, so load_index can swap in a new graph while other threads finish on the old one.
  std::shared_ptr<HnswIndex> ix;
  size_t ef = 10;
  int num_threads = static_cast<int>(hardware_threads());
  uint64_t next_label = 0;
  ScratchPool pool;

  PyIndex(const std::string& sp, int d, std::optional<std::string> simd_name)
      : space_name(sp), space(space_from_name(sp)), dim(static_cast<size_t>(d)) {
    if (d <= 0) throw std::invalid_argument("dim must be a positive integer, got " + std::to_string(d));
    simd = simd_arg(simd_name).value_or(detect_index_simd());
  }

  std::shared_ptr<HnswIndex> need() const {
    if (!ix) throw std::runtime_error("Index is not initialized: call init_index() or load_index() first");
    return ix;
  }

  void init_index(size_t max_elements, size_t M, size_t efc, size_t seed, bool allow_replace, const std::string& storage) {
    if (ix) throw std::runtime_error("The index is already initiated.");
    const Storage st = storage_from_name(storage);
    std::shared_ptr<HnswIndex> made;
    {
      py::gil_scoped_release r;
      made = std::make_shared<HnswIndex>(space, dim, st, max_elements, M, efc, seed, allow_replace, simd);
    }
    if (ix) throw std::runtime_error("The index is already initiated.");  // by another thread meanwhile
    ix = std::move(made);
    next_label = 0;
  }

  void add_items(const py::object& data, const py::object& ids_in, int threads, bool replace_deleted) {
    const std::shared_ptr<HnswIndex> xp = need();
    HnswIndex& x = *xp;
    Rows rows = as_rows(data, dim, "data");
    std::vector<uint64_t> ids = as_ids(ids_in, rows.rows);
    if (replace_deleted && !x.allow_replace_deleted())
      throw std::runtime_error("Replacement of deleted elements is disabled in constructor");
    if (x.space().storage == Storage::F16 && space != Space::Cosine) {
      const float* p = rows.arr.data();
      for (size_t i = 0, n = rows.rows * dim; i < n; ++i)
        if (std::fabs(p[i]) > 65504.f)
          throw std::invalid_argument("data: storage='float16' cannot hold |x| > 65504 (row " + std::to_string(i / dim) + ")");
    }
    const int t = resolve_threads(threads, num_threads, rows.rows);
    // Automatic labels are taken here, with the GIL held, so two concurrent calls never get the same ones.
    const uint64_t first = next_label;
    if (ids.empty())
      for (size_t i = 0; i < rows.rows; ++i) ids.push_back(first + i);
    next_label = first + rows.rows;
    bool refused = false;
    {
      py::gil_scoped_release r;
      if (x.count() + x.slots_needed(ids.data(), ids.size(), replace_deleted) > x.max_elements()) {
        refused = true;
      } else {
        std::vector<std::vector<float>> bufs(static_cast<size_t>(t), std::vector<float>(dim));
        parallel_for(rows.rows, t, [&](size_t i, size_t w) {
          const float* v = prepared_row(rows, i, dim, space, bufs[w]);
          ScratchLease s(pool);
          x.add(v, ids[i], replace_deleted, *s);
        });
      }
    }
    if (refused) {
      if (next_label == first + rows.rows) next_label = first;  // nothing was added: the labels stay free
      throw std::runtime_error("The number of elements exceeds the specified limit");
    }
  }

  py::tuple knn_query(const py::object& data, size_t k, int threads, const py::object& filter) {
    const std::shared_ptr<HnswIndex> xp = need();
    HnswIndex& x = *xp;
    const size_t ef = this->ef;
    return knn_query_rows(x, space, dim, data, k, threads, num_threads, filter,
                          [&](const float* v, const Filter* fp, uint64_t* lab, float* dis) {
                            ScratchLease s(pool);
                            return x.search(v, k, ef, fp, *s, lab, dis);
                          });
  }

  py::object get_items(const py::object& ids_in, const std::string& return_type) {
    if (return_type != "numpy" && return_type != "list")
      throw std::invalid_argument("return_type should be \"numpy\" or \"list\"");
    const std::shared_ptr<HnswIndex> xp = need();
    HnswIndex& x = *xp;
    std::vector<uint64_t> ids;
    if (!ids_in.is_none()) {
      py::array a = as_array(ids_in);
      if (a.ndim() == 0) throw std::invalid_argument("get_items accepts a list of indices and returns a list of vectors");
      // Any shape of labels, read in order (hnswlib takes knn_query's [n, k] label array as it is).
      a = py::reinterpret_borrow<py::array>(a.attr("reshape")(-1));
      ids = as_ids(a, static_cast<size_t>(a.shape(0)));
    }
    py::array_t<float> out(ids.empty() ? std::vector<py::ssize_t>{0} : std::vector<py::ssize_t>{static_cast<py::ssize_t>(ids.size()), static_cast<py::ssize_t>(dim)});
    float* o = out.mutable_data();
    {
      py::gil_scoped_release r;
      for (size_t i = 0; i < ids.size(); ++i) x.get_vector(ids[i], o + i * dim);
    }
    if (return_type == "list") return out.attr("tolist")();
    return std::move(out);
  }

  // The engine's file bytes, saved with the GIL released: the save takes the index's exclusive lock, which
  // waits for running searches, and a search with a Python filter needs the GIL to finish.
  std::string state_string() const {
    const std::shared_ptr<HnswIndex> xp = need();
    py::gil_scoped_release r;
    return IndexFile::save(*xp);
  }
  py::bytes state_bytes() const { return py::bytes(state_string()); }

  void load_bytes(const std::string& data, const std::string& what, size_t max_elements, bool allow_replace) {
    std::shared_ptr<HnswIndex> loaded;
    {
      py::gil_scoped_release r;
      loaded = IndexFile::load(data, what, space, dim, max_elements, allow_replace, simd);
    }
    next_label = loaded->count();
    ix = std::move(loaded);  // threads still searching the old graph hold their own reference to it
  }

  void save_index(const std::string& path) {
    const std::shared_ptr<HnswIndex> xp = need();
    py::gil_scoped_release r;
    write_file_atomic(path, IndexFile::save(*xp));
  }

  void load_index(const std::string& path, size_t max_elements, bool allow_replace) {
    load_bytes(read_file_nogil(path), path, max_elements, allow_replace);
  }

  std::string storage() const { return ix ? storage_name(ix->space().storage) : "float32"; }
  std::string repr() const {
    return "<phi3fast.hnsw.Index(space='" + space_name + "', dim=" + std::to_string(dim) + ", storage='" + storage() + "')>";
  }
};

// ----------------------------------------------------------------------------------------------------------
class PyBFIndex {
 public:
  std::string space_name;
  Space space;
  size_t dim;
  SimdLevel simd;
  std::shared_ptr<BruteForceIndex> ix;  // shared for the same reason as PyIndex::ix
  int num_threads = static_cast<int>(hardware_threads());
  uint64_t next_label = 0;

  PyBFIndex(const std::string& sp, int d) : space_name(sp), space(space_from_name(sp)), dim(static_cast<size_t>(d)) {
    if (d <= 0) throw std::invalid_argument("dim must be a positive integer, got " + std::to_string(d));
    simd = detect_index_simd();
  }
  std::shared_ptr<BruteForceIndex> need() const {
    if (!ix) throw std::runtime_error("Index is not initialized: call init_index() or load_index() first");
    return ix;
  }
  void init_index(size_t max_elements) {
    if (ix) throw std::runtime_error("The index is already initiated.");
    ix = std::make_shared<BruteForceIndex>(space, dim, max_elements, simd);
  }
  void add_items(const py::object& data, const py::object& ids_in) {
    const std::shared_ptr<BruteForceIndex> xp = need();
    BruteForceIndex& x = *xp;
    Rows rows = as_rows(data, dim, "data");
    std::vector<uint64_t> ids = as_ids(ids_in, rows.rows);
    const uint64_t first = next_label;  // automatic labels taken with the GIL held (see PyIndex::add_items)
    if (ids.empty())
      for (size_t i = 0; i < rows.rows; ++i) ids.push_back(first + i);
    next_label = first + rows.rows;
    bool refused = false;
    {
      py::gil_scoped_release r;
      std::unordered_set<uint64_t> fresh(ids.begin(), ids.end());
      size_t need_slots = 0;
      for (uint64_t id : fresh) need_slots += x.has(id) ? 0 : 1;
      if (x.count() + need_slots > x.max_elements()) {
        refused = true;
      } else {
        std::vector<float> buf(dim);
        for (size_t i = 0; i < rows.rows; ++i) x.add(prepared_row(rows, i, dim, space, buf), ids[i]);
      }
    }
    if (refused) {
      if (next_label == first + rows.rows) next_label = first;
      throw std::runtime_error("The number of elements exceeds the specified limit");
    }
  }
  py::tuple knn_query(const py::object& data, size_t k, int threads, const py::object& filter) {
    const std::shared_ptr<BruteForceIndex> xp = need();
    BruteForceIndex& x = *xp;
    return knn_query_rows(x, space, dim, data, k, threads, num_threads, filter,
                          [&](const float* v, const Filter* fp, uint64_t* lab, float* dis) {
                            thread_local std::vector<std::pair<float, size_t>> heap;
                            return x.search(v, k, fp, heap, lab, dis);
                          });
  }
  void save_index(const std::string& path) {
    const std::shared_ptr<BruteForceIndex> xp = need();
    py::gil_scoped_release r;
    write_file_atomic(path, xp->save());
  }
  void load_bytes(const std::string& data, const std::string& what, size_t max_elements) {
    std::shared_ptr<BruteForceIndex> loaded;
    {
      py::gil_scoped_release r;
      loaded = BruteForceIndex::load(data, what, space, dim, max_elements, simd);
    }
    next_label = loaded->count();
    ix = std::move(loaded);
  }
  void load_index(const std::string& path, size_t max_elements) {
    load_bytes(read_file_nogil(path), path, max_elements);
  }
  std::string repr() const {
    return "<phi3fast.hnsw.BFIndex(space='" + space_name + "', dim=" + std::to_string(dim) + ")>";
  }
};

}  // namespace bind
}  // namespace phi3fast

// Pickle at every protocol the way protocol 2+ does: a new instance via cls.__new__, then __setstate__. Protocols 0
// and 1 would otherwise go through copyreg._reconstructor -> object.__new__, which builds an instance without the
// C++ holder, and pybind11 aborts the process on it. type(self) keeps Python subclasses (phi3fast.hnsw.Index).
inline py::tuple reduce_newobj(const py::object& self, int /*protocol*/) {
  py::object newobj = py::module_::import("copyreg").attr("__newobj__");
  return py::make_tuple(newobj, py::make_tuple(py::type::of(self)), self.attr("__getstate__")());
}

void bind_index(py::module_& m) {
  using phi3fast::bind::PyBFIndex;
  using phi3fast::bind::PyIndex;
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

  py::class_<PyIndex>(m, "Index")
      .def(py::init<const std::string&, int, std::optional<std::string>>(), py::arg("space"), py::arg("dim"),
           py::kw_only(), py::arg("simd") = py::none())
      .def(py::init([](const PyIndex& other) {
             auto p = std::make_unique<PyIndex>(other.space_name, static_cast<int>(other.dim), std::nullopt);
             p->simd = other.simd;
             p->ef = other.ef;
             p->num_threads = other.num_threads;
             if (other.ix) {
               const bool allow_replace = other.ix->allow_replace_deleted();
               const uint64_t next_label = other.next_label;
               p->load_bytes(other.state_string(), "copy", 0, allow_replace);
               p->next_label = next_label;
             }
             return p;
           }),
           py::arg("index"))
      .def("init_index", &PyIndex::init_index, py::arg("max_elements"), py::arg("M") = 16,
           py::arg("ef_construction") = 200, py::arg("random_seed") = 100, py::arg("allow_replace_deleted") = false,
           py::arg("storage") = "float32")
      .def("add_items", &PyIndex::add_items, py::arg("data"), py::arg("ids") = py::none(), py::arg("num_threads") = -1,
           py::arg("replace_deleted") = false)
      .def("knn_query", &PyIndex::knn_query, py::arg("data"), py::arg("k") = 1, py::arg("num_threads") = -1,
           py::arg("filter") = py::none())
      .def("set_ef", [](PyIndex& s, size_t ef) { s.ef = ef; }, py::arg("ef"))
      .def("set_num_threads", [](PyIndex& s, int t) { s.num_threads = t; }, py::arg("num_threads"))
      .def("get_items", &PyIndex::get_items, py::arg("ids") = py::none(), py::arg("return_type") = "numpy")
      .def("get_ids_list", [](const PyIndex& s) { return s.need()->labels(); })
      .def("mark_deleted", [](PyIndex& s, size_t label) {
             const auto x = s.need();
             py::gil_scoped_release r;
             x->mark_deleted(label);
           }, py::arg("label"))
      .def("unmark_deleted", [](PyIndex& s, size_t label) {
             const auto x = s.need();
             py::gil_scoped_release r;
             x->unmark_deleted(label);
           }, py::arg("label"))
      .def("resize_index", [](PyIndex& s, size_t n) {
             const auto x = s.need();
             py::gil_scoped_release r;
             x->resize(n);
           }, py::arg("new_size"))
      .def("save_index", &PyIndex::save_index, py::arg("path_to_index"))
      .def("load_index", &PyIndex::load_index, py::arg("path_to_index"), py::arg("max_elements") = 0,
           py::arg("allow_replace_deleted") = false)
      .def("index_file_size", [](const PyIndex& s) { return pf::IndexFile::size(*s.need()); })
      .def("get_max_elements", [](const PyIndex& s) { return s.need()->max_elements(); })
      .def("get_current_count", [](const PyIndex& s) { return s.need()->count(); })
      .def_property_readonly("space", [](const PyIndex& s) { return s.space_name; })
      .def_property_readonly("dim", [](const PyIndex& s) { return s.dim; })
      .def_property_readonly("storage", &PyIndex::storage)
      .def_property_readonly("M", [](const PyIndex& s) { return s.ix ? s.ix->M() : 0; })
      .def_property_readonly("ef_construction", [](const PyIndex& s) { return s.ix ? s.ix->ef_construction() : 0; })
      .def_property_readonly("max_elements", [](const PyIndex& s) { return s.ix ? s.ix->max_elements() : 0; })
      .def_property_readonly("element_count", [](const PyIndex& s) { return s.ix ? s.ix->count() : 0; })
      .def_property("ef", [](const PyIndex& s) { return s.ef; }, [](PyIndex& s, size_t ef) { s.ef = ef; })
      .def_property("num_threads", [](const PyIndex& s) { return s.num_threads; },
                    [](PyIndex& s, int t) { s.num_threads = t; })
      .def("__repr__", &PyIndex::repr)
      .def("__reduce_ex__", &reduce_newobj, py::arg("protocol"))
      .def(py::pickle(
          [](const PyIndex& s) {
            py::object blob = s.ix ? py::object(s.state_bytes()) : py::none();
            return py::make_tuple(1, s.space_name, s.dim, s.ef, s.num_threads, s.next_label,
                                  s.ix ? s.ix->allow_replace_deleted() : false, blob);
          },
          [](const py::tuple& t) {
            if (t.size() != 8 || t[0].cast<int>() != 1) throw std::runtime_error("Unpickle Error: unsupported state");
            auto p = std::make_unique<PyIndex>(t[1].cast<std::string>(), t[2].cast<int>(), std::nullopt);
            p->ef = t[3].cast<size_t>();
            p->num_threads = t[4].cast<int>();
            if (!t[7].is_none()) p->load_bytes(t[7].cast<std::string>(), "pickle", 0, t[6].cast<bool>());
            p->next_label = t[5].cast<uint64_t>();
            return p;
          }));

  py::class_<PyBFIndex>(m, "BFIndex")
      .def(py::init<const std::string&, int>(), py::arg("space"), py::arg("dim"))
      .def("init_index", &PyBFIndex::init_index, py::arg("max_elements"))
      .def("add_items", &PyBFIndex::add_items, py::arg("data"), py::arg("ids") = py::none())
      .def("delete_vector", [](PyBFIndex& s, size_t label) {
             const auto x = s.need();
             py::gil_scoped_release r;
             x->remove(label);
           }, py::arg("label"))
      .def("knn_query", &PyBFIndex::knn_query, py::arg("data"), py::arg("k") = 1, py::arg("num_threads") = -1,
           py::arg("filter") = py::none())
      .def("save_index", &PyBFIndex::save_index, py::arg("path_to_index"))
      .def("load_index", &PyBFIndex::load_index, py::arg("path_to_index"), py::arg("max_elements") = 0)
      .def("get_max_elements", [](const PyBFIndex& s) { return s.need()->max_elements(); })
      .def("get_current_count", [](const PyBFIndex& s) { return s.need()->count(); })
      .def("set_num_threads", [](PyBFIndex& s, int t) { s.num_threads = t; }, py::arg("num_threads"))
      .def_property("num_threads", [](const PyBFIndex& s) { return s.num_threads; },
                    [](PyBFIndex& s, int t) { s.num_threads = t; })
      .def_property_readonly("space", [](const PyBFIndex& s) { return s.space_name; })
      .def_property_readonly("dim", [](const PyBFIndex& s) { return s.dim; })
      .def("__repr__", &PyBFIndex::repr)
      .def("__reduce_ex__", &reduce_newobj, py::arg("protocol"))
      .def(py::pickle(
          [](const PyBFIndex& s) {
            py::object blob = py::none();
            if (const auto x = s.ix) {
              std::string bytes;
              {
                py::gil_scoped_release r;
                bytes = x->save();
              }
              blob = py::bytes(bytes);
            }
            return py::make_tuple(1, s.space_name, s.dim, s.num_threads, s.next_label, blob);
          },
          [](const py::tuple& t) {
            if (t.size() != 6 || t[0].cast<int>() != 1) throw std::runtime_error("Unpickle Error: unsupported state");
            auto p = std::make_unique<PyBFIndex>(t[1].cast<std::string>(), t[2].cast<int>());
            p->num_threads = t[3].cast<int>();
            if (!t[5].is_none()) p->load_bytes(t[5].cast<std::string>(), "pickle", 0);
            p->next_label = t[4].cast<uint64_t>();
            return p;
          }));
}
