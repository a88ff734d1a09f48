// Header-only HNSW index (Malkov & Yashunin) with hnswlib-compatible semantics.
//
// Layout (design note): three arrays indexed by internal id, each in 2 MiB-aligned huge-page memory
// (memory.h): level-0 link lists [u32 header | maxM0 u32 links], padded to whole cache lines; vectors,
// each starting on a cache line (a 384-d float32 vector is exactly 24 lines, and no SIMD load straddles two
// lines); u64 labels. hnswlib keeps all three in one block per node, so a link list read drags vector
// bytes along and vectors are misaligned; split, the 13-19 MB of link lists of a 100k index can stay
// cache-resident while the vectors stream. On (a) of bench/ann.py the split and huge pages gave a few
// percent; most of the float32 search speed-up over hnswlib comes from how vectors are prefetched
// (prefetch_payload) and the sorted beam (hnsw_search.h). Files keep hnswlib's per-node block
// [header | links | payload | label] (index_file.h assembles it), so its files still import directly.
// Header: low 16 bits = link count, byte 2 = deleted mark (hnswlib's DELETE_MARK), byte 3 = ready (vector
// and links written; used by exact scans). Upper levels: one malloc'd block of `level` link lists per node
// with level > 0.
//
// Concurrency note: `struct_mu_` is held shared by add and search and exclusively by resize/save, so buffers
// never move under a reader. Writers lock one node's links at a time (striped mutexes) and publish a node only
// after its vector, label and own links are written. Readers on the query path take no per-node locks and no
// atomics: link slots and counts are single aligned stores, and every id ever stored in a list is a node whose
// data is complete (x86-TSO plus a release fence on the writer side), as in hnswlib.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <memory>
#include <mutex>
#include <random>
#include <shared_mutex>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "fileio.h"
#include "filter.h"
#include "memory.h"
#include "common/parallel.h"
#include "vector_space.h"

namespace phi3fast {

constexpr int kMaxLevel = 64;  // levels are ~ -ln(U)/ln(M): 64 is unreachable for M >= 2 in practice

class HnswIndex {
 public:
  HnswIndex(Space space, size_t dim, Storage storage, size_t max_elements, size_t M, size_t ef_construction,
            size_t seed, bool allow_replace_deleted, SimdLevel simd)
      : vs_(space, storage, dim, simd), M_(M), maxM_(M), maxM0_(2 * M),
        ef_construction_(std::max(ef_construction, M)), seed_(seed), allow_replace_(allow_replace_deleted),
        mult_(1.0 / std::log(static_cast<double>(M))), rng_(static_cast<uint32_t>(seed)),
        label_locks_(kLabelLocks), link_locks_(kLinkLocks) {
    if (dim == 0) throw std::invalid_argument("dim must be >= 1");
    if (M < 2 || M > 10000) throw std::invalid_argument("M must be in [2, 10000], got " + std::to_string(M));
    links0_bytes_ = 4 * (maxM0_ + 1);
    links0_stride_ = (links0_bytes_ + 63) / 64 * 64;
    upper_bytes_ = 4 * (maxM_ + 1);
    node_bytes_ = links0_bytes_ + vs_.payload_bytes() + 8;
    // Whole cache lines per vector unless that pads by more than 1/8 (int8 codes of 384-d: 396 -> 400, not
    // 448): then 16-byte alignment, which SIMD loads still like.
    const size_t pb = vs_.payload_bytes(), line = (pb + 63) / 64 * 64;
    vec_stride_ = line - pb <= pb / 8 ? line : (pb + 15) / 16 * 16;
    prefetch_lines_ = std::min<size_t>(32, (pb + 63) / 64);
    // ~112 lines in flight: 5 vectors of 384-d float32, 14 of 128-d (see prefetch_payload).
    prefetch_ahead_ = std::min<size_t>(16, std::max<size_t>(2, (112 + prefetch_lines_ - 1) / prefetch_lines_));
    allocate(max_elements);
  }
  ~HnswIndex() {
    for (size_t i = 0, n = count(); i < n; ++i) std::free(upper_[i]);
  }
  HnswIndex(const HnswIndex&) = delete;
  HnswIndex& operator=(const HnswIndex&) = delete;

  // ---- properties ----
  const VectorSpace& space() const { return vs_; }
  size_t dim() const { return vs_.dim; }
  size_t M() const { return M_; }
  size_t ef_construction() const { return ef_construction_; }
  size_t max_elements() const { return max_elements_; }
  size_t count() const { return count_.load(std::memory_order_acquire); }
  size_t num_deleted() const { return num_deleted_.load(); }
  bool allow_replace_deleted() const { return allow_replace_; }
  size_t node_bytes() const { return node_bytes_; }

  // ---- add / update ----

  // Adds v (already normalized for cosine) under `label`; an existing label is updated in place.
  void add(const float* v, uint64_t label, bool replace_deleted, SearchScratch& s) {
    if (replace_deleted && !allow_replace_)
      throw std::runtime_error("Replacement of deleted elements is disabled in constructor");
    std::shared_lock<std::shared_mutex> sl(struct_mu_);
    std::lock_guard<std::mutex> ll(label_locks_[label_hash(label)]);
    uint32_t id = 0;
    if (lookup(label, &id)) {
      if (is_deleted(id)) {
        if (allow_replace_ && !replace_deleted)
          throw std::runtime_error(
              "Can't use addPoint to update deleted elements if replacement of deleted elements is enabled.");
        unmark_internal(id);
      }
      relink(id, v, s);
      return;
    }
    if (replace_deleted && take_vacant(&id)) {
      {
        // The slot's old label, unless a later slot holds it (an hnswlib file can hold a label twice).
        std::lock_guard<std::mutex> g(label_mu_);
        auto it = label_map_.find(get_label(id));
        if (it != label_map_.end() && it->second == id) label_map_.erase(it);
      }
      set_label(id, label);
      relink(id, v, s);  // still marked deleted: searches skip it until it is relinked
      clear_deleted_flag(id);
      std::lock_guard<std::mutex> g(label_mu_);
      label_map_[label] = id;
      return;
    }
    {
      std::lock_guard<std::mutex> g(count_mu_);
      if (count_.load() >= max_elements_)
        throw std::runtime_error("The number of elements exceeds the specified limit");
      id = static_cast<uint32_t>(count_.load());
      count_.store(id + 1, std::memory_order_release);
    }
    insert_new(id, v, label, s);
    std::lock_guard<std::mutex> g(label_mu_);
    label_map_[label] = id;
  }

  // How many of these labels would need a new slot (not present, not filling a deleted one): lets add_items
  // refuse a batch that cannot fit before changing anything.
  size_t slots_needed(const uint64_t* labels, size_t n, bool replace_deleted) const {
    std::unordered_set<uint64_t> fresh;
    {
      std::lock_guard<std::mutex> g(label_mu_);
      for (size_t i = 0; i < n; ++i)
        if (!label_map_.count(labels[i])) fresh.insert(labels[i]);
    }
    size_t vacant = 0;
    if (replace_deleted) {
      std::lock_guard<std::mutex> g(deleted_mu_);
      vacant = deleted_ids_.size();
    }
    return fresh.size() > vacant ? fresh.size() - vacant : 0;
  }

  // ---- search (defined in hnsw_search.h) ----
  // Writes up to k nearest (ascending distance) into labels/dists; returns how many were found.
  size_t search(const float* qv, size_t k, size_t ef, const Filter* filt, SearchScratch& s, uint64_t* labels,
                float* dists) const;

  // ---- deletion (defined in hnsw_repair.h) ----
  void mark_deleted(uint64_t label);
  void unmark_deleted(uint64_t label);

  // ---- items ----
  // Decoded vector of a live label (lossy for compact storage); throws "Label not found" otherwise.
  void get_vector(uint64_t label, float* out) const {
    std::shared_lock<std::shared_mutex> sl(struct_mu_);
    uint32_t id;
    if (!lookup(label, &id) || is_deleted(id)) throw std::runtime_error("Label not found");
    vs_.decode(payload(id), out);
  }
  std::vector<uint64_t> labels() const {
    std::lock_guard<std::mutex> g(label_mu_);
    std::vector<uint64_t> out;
    out.reserve(label_map_.size());
    for (const auto& kv : label_map_) out.push_back(kv.first);
    return out;
  }

  // Allowed set from labels (numpy id array) or from a boolean mask indexed by label (hnsw_search.h).
  Filter filter_from_labels(const uint64_t* ids, size_t n) const;
  Filter filter_from_mask(const bool* mask, size_t len) const;

  void resize(size_t new_max) {
    std::unique_lock<std::shared_mutex> ul(struct_mu_);
    if (new_max < count()) throw std::runtime_error("Cannot resize, max element is less than the current number of elements");
    allocate(new_max);
  }

  // ---- files (format in index_file.h) ----
  friend struct IndexFile;

 private:
  static constexpr size_t kLabelLocks = 1 << 12;
  static constexpr size_t kLinkLocks = 1 << 16;

  VectorSpace vs_;
  size_t M_, maxM_, maxM0_, ef_construction_, seed_;
  bool allow_replace_;
  double mult_;
  std::mt19937 rng_;
  std::mutex rng_mu_;

  size_t links0_bytes_, links0_stride_, upper_bytes_, vec_stride_, node_bytes_, prefetch_lines_, prefetch_ahead_;
  size_t max_elements_ = 0;
  HugeBuffer links0_buf_, vecs_buf_, labels_buf_;
  uint8_t* links0_ = nullptr;  // the buffers' data(), cached: read on every hop
  uint8_t* vecs_ = nullptr;
  uint64_t* labels_ = nullptr;
  // Per node: its upper link lists (malloc'd, null at level 0) and its level. Mapped like the node arrays, so
  // capacity costs address space, not memory, until nodes are added (a file or init_index may declare a
  // capacity far above what it holds).
  HugeBuffer upper_buf_, levels_buf_;
  uint32_t** upper_ = nullptr;
  int32_t* levels_ = nullptr;

  std::atomic<size_t> count_{0};
  std::atomic<size_t> num_deleted_{0};
  std::atomic<uint64_t> entry_{0};  // (top level + 1) << 32 | entry id; 0 = empty

  mutable std::shared_mutex struct_mu_;
  mutable std::mutex label_mu_;
  std::mutex count_mu_, entry_mu_;
  mutable std::mutex deleted_mu_;
  std::unordered_map<uint64_t, uint32_t> label_map_;
  std::unordered_set<uint32_t> deleted_ids_;
  std::vector<std::mutex> label_locks_;
  mutable std::vector<std::mutex> link_locks_;

  // ---- memory ----
  void allocate(size_t new_max) {
    if (new_max > 0xFFFFFFF0ull) throw std::invalid_argument("max_elements must be < 2**32");
    const size_t per_node = links0_stride_ + vec_stride_ + 8 + sizeof(uint32_t*) + sizeof(int32_t);
    if (new_max != 0 && per_node > (uint64_t{1} << 62) / new_max)
      throw std::invalid_argument("max_elements is too large");
    const uint64_t bytes = static_cast<uint64_t>(new_max) * per_node;
    if (bytes > physical_memory_bytes())
      throw std::runtime_error("Not enough memory: " + std::to_string(new_max) + " elements need " +
                               std::to_string(bytes) + " bytes, more than this machine has");
    // New bytes are zero (a null upper list, level 0). At least one element each, so the pointers are never null.
    const size_t m = std::max<size_t>(new_max, 1);
    links0_buf_.resize(m * links0_stride_);
    vecs_buf_.resize(m * vec_stride_);
    labels_buf_.resize(m * 8);
    links0_ = links0_buf_.data();
    vecs_ = vecs_buf_.data();
    labels_ = reinterpret_cast<uint64_t*>(labels_buf_.data());
    upper_buf_.resize(m * sizeof(uint32_t*));
    levels_buf_.resize(m * sizeof(int32_t));
    upper_ = reinterpret_cast<uint32_t**>(upper_buf_.data());
    levels_ = reinterpret_cast<int32_t*>(levels_buf_.data());
    max_elements_ = new_max;
  }

  // ---- node accessors ----
  // The level-0 link block; its first u32 is the node header (count, deleted and ready bytes).
  uint8_t* node(uint32_t id) const { return links0_ + static_cast<size_t>(id) * links0_stride_; }
  uint32_t* links(uint32_t id, int level) const {
    return level == 0 ? reinterpret_cast<uint32_t*>(node(id)) : upper_[id] + static_cast<size_t>(level - 1) * (maxM_ + 1);
  }
  static size_t list_count(const uint32_t* ll) { return *reinterpret_cast<const uint16_t*>(ll); }
  static void set_count(uint32_t* ll, size_t c) { *reinterpret_cast<uint16_t*>(ll) = static_cast<uint16_t>(c); }
  uint8_t* flags(uint32_t id) const { return node(id) + 2; }
  bool is_deleted(uint32_t id) const { return node(id)[2] & 1; }
  bool is_ready(uint32_t id) const { return node(id)[3] != 0; }
  uint8_t* payload(uint32_t id) const { return vecs_ + static_cast<size_t>(id) * vec_stride_; }
  uint64_t get_label(uint32_t id) const { return labels_[id]; }
  void set_label(uint32_t id, uint64_t l) { labels_[id] = l; }

  // hnswlib's level-0 block of one node, [header | links | payload | label] (node_bytes_): the file format.
  void write_block(uint32_t id, uint8_t* out) const {
    std::memcpy(out, node(id), links0_bytes_);
    std::memcpy(out + links0_bytes_, payload(id), vs_.payload_bytes());
    std::memcpy(out + links0_bytes_ + vs_.payload_bytes(), &labels_[id], 8);
  }
  void read_block(uint32_t id, const uint8_t* in) {
    std::memcpy(node(id), in, links0_bytes_);
    std::memcpy(payload(id), in + links0_bytes_, vs_.payload_bytes());
    std::memcpy(&labels_[id], in + links0_bytes_ + vs_.payload_bytes(), 8);
  }
  std::mutex& link_lock(uint32_t id) const { return link_locks_[id & (kLinkLocks - 1)]; }
  static size_t label_hash(uint64_t l) { return (l * 0x9E3779B97F4A7C15ull) >> 52; }  // 12 bits

  bool lookup(uint64_t label, uint32_t* id) const {
    std::lock_guard<std::mutex> g(label_mu_);
    auto it = label_map_.find(label);
    if (it == label_map_.end()) return false;
    *id = it->second;
    return true;
  }

  // A stored node as a query (decoded into buf for compact storage).
  Query node_query(uint32_t id, std::vector<float>& buf) const {
    if (vs_.storage == Storage::F32) return vs_.prepare(reinterpret_cast<const float*>(payload(id)));
    buf.resize(vs_.dim);
    vs_.decode(payload(id), buf.data());
    return vs_.prepare(buf.data());
  }

  // All lines of one stored vector, into L2 (prefetcht2), not L1: a core has few L1 miss buffers and
  // prefetcht0 of several 24-line vectors stalls on them, while L2 tracks many more misses. Measured on
  // (a) with the same graph, 1000 queries at ef=32: 5,600 QPS with prefetcht0 and 1-2 vectors ahead,
  // ~9,500-10,300 with prefetcht2 and 3-5 vectors ahead (prefetch_ahead_).
  void prefetch_payload(uint32_t id) const {
    const char* p = reinterpret_cast<const char*>(payload(id));
    for (size_t i = 0; i < prefetch_lines_; ++i) __builtin_prefetch(p + 64 * i, 0, 1);
  }

  // Marks the unvisited ids among ids[0, cnt) visited, then calls on_dist(id, dist(payload(id))) for each,
  // streaming the vectors prefetch_ahead_ ahead of the one being computed. `fresh` (room for cnt ids) may be
  // `ids` itself: it is compacted in place.
  template <class Dist, class OnDist>
  void visit_fresh(const Dist& dist, const uint32_t* ids, size_t cnt, uint32_t* fresh, SearchScratch& s,
                   OnDist&& on_dist) const {
    size_t m = 0;
    for (size_t j = 0; j < cnt; ++j) {
      const uint32_t id = ids[j];
      if (s.visit(id)) {
        fresh[m++] = id;
        __builtin_prefetch(payload(id), 0, 1);  // first line of every fresh neighbour at once
      }
    }
    for_each_dist(dist, fresh, m, on_dist);
  }

  // on_dist(id, dist(payload(id))) for ids[0, n), streaming the vectors prefetch_ahead_ ahead.
  template <class Dist, class OnDist>
  void for_each_dist(const Dist& dist, const uint32_t* ids, size_t n, OnDist&& on_dist) const {
    const size_t ahead = prefetch_ahead_;
    for (size_t j = 0; j < std::min(ahead, n); ++j) prefetch_payload(ids[j]);
    for (size_t j = 0; j < n; ++j) {
      if (j + ahead < n) prefetch_payload(ids[j + ahead]);
      on_dist(ids[j], dist(payload(ids[j])));
    }
  }

  void prefetch_links(uint32_t id) const;

  int random_level() {
    std::lock_guard<std::mutex> g(rng_mu_);
    std::uniform_real_distribution<double> u(0.0, 1.0);
    const double r = -std::log(std::max(u(rng_), 1e-300)) * mult_;
    return std::min(static_cast<int>(r), kMaxLevel - 1);
  }

  // ---- search (query path: no locks; defined in hnsw_search.h) ----

  template <class Dist>
  uint32_t greedy(const Dist& dist, uint32_t cur, int top_level) const;

  template <class Dist>
  void search_beam(const Dist& dist, uint32_t ep, size_t ef, SearchScratch& s) const;

  // ---- search on level 0 with a filter or deleted nodes (two heaps, hnswlib's loop) ----
  void search_level0(const Query& q, uint32_t ep, size_t ef, const Filter* filt, SearchScratch& s) const;

  size_t exact(const Query& q, size_t k, const Filter* filt, SearchScratch& s, uint64_t* labels, float* dists) const;

  // ---- construction: per-node link locks while reading/writing links (defined in hnsw_build.h) ----
  // Distance kernels are resolved once per call through vs_.with_distance, as on the query path.
  uint32_t greedy_locked(const Query& q, uint32_t cur, int from, int to_exclusive) const;
  template <class Dist>
  uint32_t greedy_locked(const Dist& dist, uint32_t cur, int from, int to_exclusive) const;
  // ef_construction search at one level; fills s.top (not deleted nodes) as an unsorted vector.
  void search_build(const Query& q, uint32_t ep, int level, SearchScratch& s) const;
  template <class Dist>
  void search_build(const Dist& dist, uint32_t ep, int level, SearchScratch& s) const;
  void select_neighbors(std::vector<Cand>& c, size_t m, std::vector<float>& buf) const;
  uint32_t connect(uint32_t id, int level, std::vector<Cand>& cands, bool is_update, SearchScratch& s);
  void insert_new(uint32_t id, const float* v, uint64_t label, SearchScratch& s);

  // ---- graph repair: a new vector for an existing node, deleted slots (defined in hnsw_repair.h) ----
  bool take_vacant(uint32_t* id);
  void clear_deleted_flag(uint32_t id);
  void unmark_internal(uint32_t id);
  void relink(uint32_t id, const float* v, SearchScratch& s);
};

}  // namespace phi3fast

// Out-of-line members, split by concern; they need the class above.
#include "hnsw_build.h"
#include "hnsw_repair.h"
#include "hnsw_search.h"

