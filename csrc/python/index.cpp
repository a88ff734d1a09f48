// Python class Index: hnswlib 0.8's Python API over phi3fast::HnswIndex. Every method validates its numpy inputs
// with the GIL held, then releases the GIL before touching the index (so a filter callable can re-take it from
// worker threads without deadlock), and worker exceptions are re-raised here on the calling thread.
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "hnsw/index_file.h"
#include "python/bindings.h"
#include "python/convert.h"

namespace phi3fast {
namespace bind {

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

}  // namespace bind
}  // namespace phi3fast

void bind_index(py::module_& m) {
  using phi3fast::bind::PyIndex;
  using phi3fast::bind::reduce_newobj;
  namespace pf = phi3fast;

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
}
