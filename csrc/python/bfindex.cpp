// Python class BFIndex: hnswlib 0.8's exact index over phi3fast::BruteForceIndex, with the same input checks and
// GIL discipline as Index (index.cpp).
#include <memory>
#include <string>
#include <unordered_set>
#include <vector>

#include "hnsw/bruteforce.h"
#include "python/bindings.h"
#include "python/convert.h"

namespace phi3fast {
namespace bind {

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

void bind_bfindex(py::module_& m) {
  using phi3fast::bind::PyBFIndex;
  using phi3fast::bind::reduce_newobj;

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
