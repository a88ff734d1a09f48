// Which results a search may return, shared by HnswIndex and BruteForceIndex: a bitset over the index's
// internal ids (built from a numpy id array or boolean mask, checked without Python), or a callable on the
// label (hnswlib's filter, evaluated lazily per candidate). The bitset is resolved against the index's
// contents when the query starts; nodes added later are outside it and never allowed.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

namespace phi3fast {

struct Filter {
  std::vector<uint64_t> bits;
  size_t allowed = 0;  // set bits
  std::function<bool(uint64_t)> fn;
  // What the bitset was resolved from (borrowed from the caller for the query's duration) and the index's
  // layout version then: an index whose ids changed meaning meanwhile resolves it again (BruteForceIndex).
  const uint64_t* src_ids = nullptr;
  size_t src_n = 0;
  const bool* src_mask = nullptr;
  size_t src_len = 0;
  uint64_t version = 0;

  // An empty bitset with room for internal ids [0, capacity).
  static Filter bitset(size_t capacity) {
    Filter f;
    f.bits.assign(capacity / 64 + 1, 0);
    return f;
  }
  bool has_bits() const { return !bits.empty(); }
  void set(size_t id) {
    uint64_t& w = bits[id >> 6];
    const uint64_t m = uint64_t{1} << (id & 63);
    if (!(w & m)) { w |= m; ++allowed; }
  }
  // Ids past the bitset are not allowed: they were added after the filter was resolved (a concurrent resize
  // and add can grow the index during a query).
  bool test(size_t id) const {
    const size_t w = id >> 6;
    return w < bits.size() && ((bits[w] >> (id & 63)) & 1);
  }
};

}  // namespace phi3fast
