// Exact search (hnswlib's BFIndex): float32 vectors in one array, deletion by moving the last vector into the
// hole. Used as the ground truth in tests and as the exact path users compare against.
#pragma once

#include <algorithm>
#include <functional>
#include <memory>
#include <shared_mutex>
#include <unordered_map>
#include <vector>

#include "fileio.h"
#include "filter.h"
#include "common/parallel.h"
#include "vector_space.h"

namespace phi3fast {

constexpr char kBfMagic[8] = {'P', 'H', 'I', '3', 'B', 'F', 'I', 'X'};

class BruteForceIndex {
 public:
  BruteForceIndex(Space space, size_t dim, size_t max_elements, SimdLevel simd)
      : vs_(space, Storage::F32, dim, simd), max_elements_(max_elements) {
    if (max_elements > (uint64_t{1} << 40) / std::max<size_t>(dim, 1) / 4 ||
        max_elements * dim * 4 > physical_memory_bytes())
      throw std::runtime_error("Not enough memory for " + std::to_string(max_elements) + " elements");
    data_.reserve(max_elements * dim);
    labels_.reserve(max_elements);
  }

  size_t count() const { return labels_.size(); }
  size_t max_elements() const { return max_elements_; }
  const VectorSpace& space() const { return vs_; }
  bool has(uint64_t label) const {
    std::shared_lock<std::shared_mutex> g(mu_);
    return map_.count(label) > 0;
  }

  void add(const float* v, uint64_t label) {
    std::unique_lock<std::shared_mutex> g(mu_);
    auto it = map_.find(label);
    if (it != map_.end()) {
      std::memcpy(&data_[it->second * vs_.dim], v, vs_.dim * 4);
      return;
    }
    if (labels_.size() >= max_elements_) throw std::runtime_error("The number of elements exceeds the specified limit");
    map_[label] = labels_.size();
    labels_.push_back(label);
    data_.insert(data_.end(), v, v + vs_.dim);
  }

  void remove(uint64_t label) {
    std::unique_lock<std::shared_mutex> g(mu_);
    auto it = map_.find(label);
    if (it == map_.end()) throw std::runtime_error("Label not found");
    const size_t pos = it->second, last = labels_.size() - 1;
    if (pos != last) {
      std::memcpy(&data_[pos * vs_.dim], &data_[last * vs_.dim], vs_.dim * 4);
      labels_[pos] = labels_[last];
      map_[labels_[pos]] = pos;
    }
    map_.erase(label);
    labels_.pop_back();
    data_.resize(labels_.size() * vs_.dim);
    ++version_;  // positions moved: bitsets resolved before this are stale
  }

  // Allowed set (filter.h) over positions, from labels or from a boolean mask indexed by label.
  Filter filter_from_labels(const uint64_t* ids, size_t n) const {
    std::shared_lock<std::shared_mutex> g(mu_);
    Filter f;
    f.src_ids = ids;
    f.src_n = n;
    return resolve(f);
  }
  Filter filter_from_mask(const bool* mask, size_t len) const {
    std::shared_lock<std::shared_mutex> g(mu_);
    Filter f;
    f.src_mask = mask;
    f.src_len = len;
    return resolve(f);
  }

  // k best (ascending) among the entries the filter allows; returns how many were found.
  size_t search(const float* q, size_t k, const Filter* filt, std::vector<std::pair<float, size_t>>& heap,
                uint64_t* out_labels, float* out_dists) const {
    std::shared_lock<std::shared_mutex> g(mu_);
    heap.clear();
    if (k == 0) return 0;
    // A delete since the filter was resolved moved elements between positions: resolve it again (positions
    // cannot move while this search holds the lock).
    Filter fresh;
    if (filt && filt->has_bits() && filt->version != version_) {
      fresh = resolve(*filt);
      filt = &fresh;
    }
    const Query qq = vs_.prepare(q);
    const size_t n = labels_.size();
    auto dist = [&](size_t i) { return vs_.dist(qq, reinterpret_cast<const uint8_t*>(&data_[i * vs_.dim])); };
    if (filt && !filt->has_bits()) {
      // A callable filter (Python) is asked only about an element that would enter the current top k, as in
      // hnswlib: the distance is the cheap test, the call the expensive one.
      for (size_t i = 0; i < n; ++i) {
        const float d = dist(i);
        if (heap.size() >= k && !(d < heap.front().first)) continue;
        if (filt->fn(labels_[i])) push_topk(heap, k, std::pair<float, size_t>(d, i));
      }
    } else {
      for (size_t i = 0; i < n; ++i)
        if (!filt || filt->test(i)) push_topk(heap, k, std::pair<float, size_t>(dist(i), i));
    }
    std::sort_heap(heap.begin(), heap.end());
    for (size_t i = 0; i < heap.size(); ++i) {
      out_labels[i] = labels_[heap[i].second];
      out_dists[i] = heap[i].first;
    }
    return heap.size();
  }

  std::string save() const {
    std::shared_lock<std::shared_mutex> g(mu_);
    ByteWriter w;
    w.bytes(kBfMagic, 8);
    w.put(uint32_t{1});
    w.put(static_cast<uint8_t>(vs_.space));
    w.put(static_cast<uint32_t>(vs_.dim));
    w.put(static_cast<uint64_t>(max_elements_));
    w.put(static_cast<uint64_t>(labels_.size()));
    w.bytes(data_.data(), data_.size() * 4);
    w.bytes(labels_.data(), labels_.size() * 8);
    w.seal();
    return std::move(w.str());
  }

  static std::unique_ptr<BruteForceIndex> load(const std::string& data, const std::string& what, Space space, size_t dim,
                                               size_t max_elements, SimdLevel simd) {
    const uint8_t* p = reinterpret_cast<const uint8_t*>(data.data());
    ByteReader r(p, data.size(), what);
    if (data.size() < 8 || std::memcmp(p, kBfMagic, 8) != 0) r.fail("not a phi3fast BFIndex file (bad magic)");
    r.take(8);
    if (r.get<uint32_t>() != 1) r.fail("unsupported format version");
    const uint8_t sp = r.get<uint8_t>();
    const uint32_t d = r.get<uint32_t>();
    const uint64_t max_el = r.get<uint64_t>(), n = r.get<uint64_t>();
    if (sp != static_cast<uint8_t>(space)) r.fail("file is for another space");
    if (d != dim) r.fail("file has dim " + std::to_string(d) + ", this index has dim " + std::to_string(dim));
    if (n > max_el) r.fail("element count exceeds capacity");
    const uint64_t rest = r.remaining();
    if (n > rest / (4 * dim + 8) || n * (4 * dim + 8) + 8 != rest) r.fail("size does not match its header");
    uint64_t got;
    std::memcpy(&got, p + data.size() - 8, 8);
    if (checksum64(p, data.size() - 8) != got) r.fail("checksum mismatch");
    auto ix = std::make_unique<BruteForceIndex>(space, dim, std::max<uint64_t>(max_el, std::max<uint64_t>(max_elements, n)), simd);
    ix->data_.resize(n * dim);
    ix->labels_.resize(n);
    std::memcpy(ix->data_.data(), r.take(n * dim * 4), n * dim * 4);
    std::memcpy(ix->labels_.data(), r.take(n * 8), n * 8);
    for (size_t i = 0; i < n; ++i)
      if (!ix->map_.emplace(ix->labels_[i], i).second) r.fail("label appears twice");
    return ix;
  }

 private:
  // The bitset over positions for a filter's source; call with mu_ held.
  Filter resolve(const Filter& src) const {
    Filter f = Filter::bitset(max_elements_);
    f.src_ids = src.src_ids;
    f.src_n = src.src_n;
    f.src_mask = src.src_mask;
    f.src_len = src.src_len;
    f.version = version_;
    for (size_t i = 0; i < f.src_n; ++i) {
      auto it = map_.find(f.src_ids[i]);
      if (it != map_.end()) f.set(it->second);
    }
    if (f.src_mask)
      for (size_t i = 0; i < labels_.size(); ++i)
        if (labels_[i] < f.src_len && f.src_mask[labels_[i]]) f.set(i);
    return f;
  }

  VectorSpace vs_;
  size_t max_elements_;
  uint64_t version_ = 0;  // bumped by remove (under mu_)
  std::vector<float> data_;
  std::vector<uint64_t> labels_;
  std::unordered_map<uint64_t, size_t> map_;
  mutable std::shared_mutex mu_;
};

}  // namespace phi3fast
