// Worker threads for batch add/search, and the pool of per-thread search scratch (visited tags, heaps).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <new>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

namespace phi3fast {

inline size_t hardware_threads() { return std::max<size_t>(1, std::thread::hardware_concurrency()); }

// Runs fn(i, worker) for i in [0, n) on up to `threads` threads (<= 0: all cores). The first exception thrown by
// any worker stops the others from taking new work and is re-raised on the calling thread after all joined.
template <class Fn>
void parallel_for(size_t n, int threads, Fn&& fn) {
  size_t t = threads <= 0 ? hardware_threads() : static_cast<size_t>(threads);
  t = std::min(t, n);
  if (t <= 1) {
    for (size_t i = 0; i < n; ++i) fn(i, size_t{0});
    return;
  }
  std::atomic<size_t> next{0};
  std::exception_ptr error;
  std::mutex error_mu;
  auto work = [&](size_t worker) {
    for (;;) {
      const size_t i = next.fetch_add(1);
      if (i >= n) return;
      try {
        fn(i, worker);
      } catch (...) {
        std::lock_guard<std::mutex> g(error_mu);
        if (!error) error = std::current_exception();
        next.store(n);
        return;
      }
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(t - 1);
  for (size_t w = 1; w < t; ++w) pool.emplace_back(work, w);
  work(0);
  for (auto& th : pool) th.join();
  if (error) std::rethrow_exception(error);
}

using Cand = std::pair<float, uint32_t>;  // (distance, internal id)

// Keeps the k smallest (distance, id) pairs in a max-heap.
template <class Pair>
inline void push_topk(std::vector<Pair>& heap, size_t k, Pair item) {
  if (heap.size() < k) {
    heap.push_back(item);
    std::push_heap(heap.begin(), heap.end());
  } else if (item.first < heap.front().first) {
    std::pop_heap(heap.begin(), heap.end());
    heap.back() = item;
    std::push_heap(heap.begin(), heap.end());
  }
}

// One entry of the sorted search beam (hnsw.h search_beam).
struct BeamSlot {
  float dist;
  uint32_t id;
  uint32_t expanded;
};

// Scratch for one search: visited tags with an epoch (no clearing per query), the two heaps, decode buffers.
struct SearchScratch {
  // calloc'd: a large zeroed block is fresh mapped pages, so an index with a large capacity and few nodes
  // pays memory only for the tags its searches touch.
  std::unique_ptr<uint16_t[], decltype(&std::free)> tags{nullptr, &std::free};
  size_t tags_size = 0;
  uint16_t epoch = 0;
  std::vector<Cand> cand, top;
  std::vector<BeamSlot> beam;
  std::vector<float> buf_a, buf_b;
  std::vector<uint32_t> ids;

  void begin(size_t n) {
    if (tags_size < n) {
      tags.reset(static_cast<uint16_t*>(std::calloc(n, sizeof(uint16_t))));
      if (!tags) throw std::bad_alloc();
      tags_size = n;
      epoch = 0;
    }
    if (++epoch == 0) {  // wrapped: old tags could collide with the new epoch
      std::fill(tags.get(), tags.get() + tags_size, 0);
      epoch = 1;
    }
    cand.clear();
    top.clear();
  }
  bool visit(uint32_t id) {
    if (tags[id] == epoch) return false;
    tags[id] = epoch;
    return true;
  }
};

class ScratchPool {
 public:
  std::unique_ptr<SearchScratch> acquire() {
    std::lock_guard<std::mutex> g(mu_);
    if (free_.empty()) return std::make_unique<SearchScratch>();
    auto s = std::move(free_.back());
    free_.pop_back();
    return s;
  }
  void release(std::unique_ptr<SearchScratch> s) {
    std::lock_guard<std::mutex> g(mu_);
    free_.push_back(std::move(s));
  }
  void clear() {
    std::lock_guard<std::mutex> g(mu_);
    free_.clear();
  }

 private:
  std::mutex mu_;
  std::vector<std::unique_ptr<SearchScratch>> free_;
};

// RAII lease from a ScratchPool.
class ScratchLease {
 public:
  explicit ScratchLease(ScratchPool& p) : pool_(p), s_(p.acquire()) {}
  ~ScratchLease() { pool_.release(std::move(s_)); }
  SearchScratch& operator*() { return *s_; }
  SearchScratch* operator->() { return s_.get(); }

 private:
  ScratchPool& pool_;
  std::unique_ptr<SearchScratch> s_;
};

}  // namespace phi3fast
