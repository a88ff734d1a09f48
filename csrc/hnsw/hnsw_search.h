// HnswIndex's query path: greedy descent, the sorted-beam level-0 search, the filtered two-heap search, the
// exact fallback and filter construction. Readers take no per-node locks and no atomics (see hnsw.h).
#pragma once

#include "hnsw.h"

namespace phi3fast {

// Writes up to k nearest (ascending distance) into labels/dists; returns how many were found.
inline size_t HnswIndex::search(const float* qv, size_t k, size_t ef, const Filter* filt, SearchScratch& s,
                                uint64_t* labels, float* dists) const {
  std::shared_lock<std::shared_mutex> sl(struct_mu_);
  if (k == 0) return 0;
  const uint64_t entry = entry_.load(std::memory_order_acquire);
  if (entry == 0) return 0;
  const Query q = vs_.prepare(qv);
  const size_t n = count();
  // Small index, large ef: a walk keeping a quarter of the index in its beam ends up visiting most nodes, each
  // through a link list; a scan reads the vectors in order and is exact (in 'ip', where the graph can leave
  // nodes hard to reach, the walk misses neighbours that no ef finds).
  if (std::max(ef, k) * 4 >= n && (!filt || filt->has_bits())) return exact(q, k, filt, s, labels, dists);
  if (filt && filt->has_bits()) {
    if (filt->allowed == 0) return 0;
    // Low selectivity: a graph walk would visit most nodes to find k allowed ones (and hnswlib's recall
    // collapses there); scanning the allowed set exactly costs `allowed` distances and is always right.
    if (filt->allowed * 20 < n || filt->allowed <= 32 * std::max(ef, k)) return exact(q, k, filt, s, labels, dists);
  }
  const int top_level = static_cast<int>(entry >> 32) - 1;
  if (!filt && num_deleted_.load(std::memory_order_relaxed) == 0) {
    // The common case: one distance kernel resolved per query, a sorted beam instead of two heaps.
    return vs_.with_distance(q, [&](const auto& dist) {
      const uint32_t ep = greedy(dist, static_cast<uint32_t>(entry), top_level);
      search_beam(dist, ep, std::max(ef, k), s);
      const size_t found = std::min(k, s.beam.size());
      for (size_t i = 0; i < found; ++i) {
        labels[i] = get_label(s.beam[i].id);
        dists[i] = s.beam[i].dist;
      }
      return found;
    });
  }
  const uint32_t cur = greedy([&](const uint8_t* p) { return vs_.dist(q, p); }, static_cast<uint32_t>(entry), top_level);
  search_level0(q, cur, std::max(ef, k), filt, s);
  auto& top = s.top;
  std::sort_heap(top.begin(), top.end());
  const size_t found = std::min(k, top.size());
  for (size_t i = 0; i < found; ++i) {
    labels[i] = get_label(top[i].second);
    dists[i] = top[i].first;
  }
  if (found < k && filt) return exact(q, k, filt, s, labels, dists);  // the walk ran out: scan exactly
  return found;
}

// Allowed set from labels (numpy id array) or from a boolean mask indexed by label. Deleted nodes are left out:
// they are never returned, and add_items(replace_deleted=True) may give one a new label during the query.
inline Filter HnswIndex::filter_from_labels(const uint64_t* ids, size_t n) const {
  std::shared_lock<std::shared_mutex> sl(struct_mu_);
  Filter f = Filter::bitset(max_elements_);
  std::lock_guard<std::mutex> g(label_mu_);
  for (size_t i = 0; i < n; ++i) {
    auto it = label_map_.find(ids[i]);
    if (it != label_map_.end() && !is_deleted(it->second)) f.set(it->second);
  }
  return f;
}

inline Filter HnswIndex::filter_from_mask(const bool* mask, size_t len) const {
  std::shared_lock<std::shared_mutex> sl(struct_mu_);
  Filter f = Filter::bitset(max_elements_);
  const size_t n = count();
  for (uint32_t id = 0; id < n; ++id) {
    if (!is_ready(id) || is_deleted(id)) continue;
    const uint64_t lab = get_label(id);
    if (lab < len && mask[lab]) f.set(id);
  }
  return f;
}

// Greedy descent through the upper levels to the node closest to the query on level 1.
template <class Dist>
uint32_t HnswIndex::greedy(const Dist& dist, uint32_t cur, int top_level) const {
  float d = dist(payload(cur));
  for (int l = top_level; l > 0; --l) {
    for (bool changed = true; changed;) {
      changed = false;
      const uint32_t* ll = links(cur, l);
      const size_t c = list_count(ll);
      for (size_t j = 1; j <= c; ++j) {
        const float dd = dist(payload(ll[j]));
        if (dd < d) { d = dd; cur = ll[j]; changed = true; }
      }
    }
  }
  return cur;
}

// Level-0 search without filter or deleted nodes: the ef best found so far in one array sorted by distance,
// each with an "expanded" mark; always expand the closest unexpanded one. This visits exactly the nodes
// hnswlib's two-heap loop visits (a candidate that falls out of its top-ef is never expanded there
// either), but an insert is a short memmove in one or two cache lines instead of two heap sifts, and the
// next node to expand is found by a scan instead of a heap pop.
template <class Dist>
void HnswIndex::search_beam(const Dist& dist, uint32_t ep, size_t ef, SearchScratch& s) const {
  s.begin(max_elements_);
  auto& beam = s.beam;
  beam.resize(ef + 1);  // one spare slot: an insert into a full beam shifts the worst out past the end
  BeamSlot* b = beam.data();
  size_t size = 1, cur = 0;
  b[0] = {dist(payload(ep)), ep, 0};
  s.visit(ep);
  s.ids.resize(maxM0_ + 1);
  while (cur < size) {
    b[cur].expanded = 1;
    const uint32_t* ll = links(b[cur].id, 0);
    size_t first_new = size;
    visit_fresh(dist, ll + 1, list_count(ll), s.ids.data(), s, [&](uint32_t id, float d) {
      if (size == ef && !(d < b[size - 1].dist)) return;
      size_t pos = size;
      while (pos > 0 && b[pos - 1].dist > d) --pos;  // from the back: most inserts land near the end
      std::memmove(b + pos + 1, b + pos, (size - pos) * sizeof(BeamSlot));
      b[pos] = {d, id, 0};
      if (size < ef) ++size;
      first_new = std::min(first_new, pos);
      prefetch_links(id);
    });
    cur = first_new <= cur ? first_new : cur + 1;
    while (cur < size && b[cur].expanded) ++cur;
  }
  beam.resize(size);
}

// Its link list will be read when it is expanded, likely soon after it entered the results: load it now.
inline void HnswIndex::prefetch_links(uint32_t id) const {
  const char* lp = reinterpret_cast<const char*>(node(id));
  for (size_t o = 0; o < links0_bytes_; o += 64) __builtin_prefetch(lp + o, 0, 3);
}

inline void HnswIndex::search_level0(const Query& q, uint32_t ep, size_t ef, const Filter* filt, SearchScratch& s) const {
  s.begin(max_elements_);
  auto& top = s.top;  // max-heap on distance: the current best ef
  auto& cand = s.cand;  // min-heap via std::greater
  const bool has_del = num_deleted_.load(std::memory_order_relaxed) > 0;
  const bool filtering = filt != nullptr;
  auto ok = [&](uint32_t id) {
    if (has_del && is_deleted(id)) return false;
    if (!filtering) return true;
    return filt->has_bits() ? filt->test(id) : filt->fn(get_label(id));
  };
  float lower = std::numeric_limits<float>::infinity();
  const float d0 = vs_.dist(q, payload(ep));
  s.visit(ep);
  if (ok(ep)) { top.emplace_back(d0, ep); lower = d0; }
  cand.emplace_back(d0, ep);
  s.ids.resize(maxM0_ + 1);
  auto dist = [&](const uint8_t* p) { return vs_.dist(q, p); };
  while (!cand.empty()) {
    const Cand c = cand.front();
    if (c.first > lower && (top.size() >= ef || (!filtering && !has_del))) break;
    std::pop_heap(cand.begin(), cand.end(), std::greater<Cand>());
    cand.pop_back();
    const uint32_t* ll = links(c.second, 0);
    visit_fresh(dist, ll + 1, list_count(ll), s.ids.data(), s, [&](uint32_t id, float dd) {
      if (top.size() < ef || dd < lower) {
        cand.emplace_back(dd, id);
        std::push_heap(cand.begin(), cand.end(), std::greater<Cand>());
        if (ok(id)) {
          top.emplace_back(dd, id);
          std::push_heap(top.begin(), top.end());
          if (top.size() > ef) { std::pop_heap(top.begin(), top.end()); top.pop_back(); }
        }
        if (!top.empty()) lower = top.front().first;
      }
    });
  }
}

// Exact scan over ready, live, allowed nodes.
inline size_t HnswIndex::exact(const Query& q, size_t k, const Filter* filt, SearchScratch& s, uint64_t* labels, float* dists) const {
  auto& top = s.top;
  top.clear();
  const size_t n = count();
  // The distance first: a callable filter (Python) is asked only about a node that would enter the top k.
  auto consider = [&](uint32_t id) {
    if (!is_ready(id) || is_deleted(id)) return;
    const float d = vs_.dist(q, payload(id));
    if (top.size() >= k && !(d < top.front().first)) return;
    if (filt && !filt->has_bits() && filt->fn && !filt->fn(get_label(id))) return;
    push_topk(top, k, Cand(d, id));
  };
  if (filt && filt->has_bits()) {
    for (size_t w = 0, words = filt->bits.size(); w < words && w * 64 < n; ++w) {
      for (uint64_t bits = filt->bits[w]; bits; bits &= bits - 1) {
        const uint32_t id = static_cast<uint32_t>(w * 64 + __builtin_ctzll(bits));
        if (id < n) consider(id);
      }
    }
  } else {
    for (uint32_t id = 0; id < n; ++id) consider(id);
  }
  std::sort_heap(top.begin(), top.end());
  for (size_t i = 0; i < top.size(); ++i) {
    labels[i] = get_label(top[i].second);
    dists[i] = top[i].first;
  }
  return top.size();
}

}  // namespace phi3fast
