// HnswIndex's construction path: the locked greedy descent, the ef_construction search, hnswlib's neighbour
// selection heuristic, linking with reverse links, and the insert of a new node. Writers lock one node's links
// at a time (see hnsw.h's concurrency note).
#pragma once

#include "hnsw.h"

namespace phi3fast {

inline uint32_t HnswIndex::greedy_locked(const Query& q, uint32_t cur, int from, int to_exclusive) const {
  return vs_.with_distance(q, [&](const auto& dist) { return greedy_locked(dist, cur, from, to_exclusive); });
}
// Greedy descent from level `from` down to (not including) `to_exclusive`, copying each list under its lock.
template <class Dist>
uint32_t HnswIndex::greedy_locked(const Dist& dist, uint32_t cur, int from, int to_exclusive) const {
  float d = dist(payload(cur));
  std::vector<uint32_t> buf(maxM_ + 1);
  for (int l = from; l > to_exclusive; --l) {
    for (bool changed = true; changed;) {
      changed = false;
      size_t c;
      {
        std::lock_guard<std::mutex> g(link_lock(cur));
        const uint32_t* ll = links(cur, l);
        c = list_count(ll);
        std::memcpy(buf.data(), ll + 1, 4 * c);
      }
      for (size_t j = 0; j < c; ++j) {
        const float dd = dist(payload(buf[j]));
        if (dd < d) { d = dd; cur = buf[j]; changed = true; }
      }
    }
  }
  return cur;
}

// ef_construction search at one level; fills s.top (not deleted nodes) as an unsorted vector.
inline void HnswIndex::search_build(const Query& q, uint32_t ep, int level, SearchScratch& s) const {
  vs_.with_distance(q, [&](const auto& dist) { search_build(dist, ep, level, s); });
}
template <class Dist>
void HnswIndex::search_build(const Dist& dist, uint32_t ep, int level, SearchScratch& s) const {
  s.begin(max_elements_);
  auto& top = s.top;
  auto& cand = s.cand;
  const size_t ef = ef_construction_;
  std::vector<uint32_t>& buf = s.ids;
  buf.resize(maxM0_ + 1);
  const bool has_del = num_deleted_.load(std::memory_order_relaxed) > 0;
  float lower = std::numeric_limits<float>::infinity();
  const float d0 = dist(payload(ep));
  s.visit(ep);
  if (!has_del || !is_deleted(ep)) { top.emplace_back(d0, ep); lower = d0; }
  cand.emplace_back(d0, ep);
  while (!cand.empty()) {
    const Cand c = cand.front();
    if (c.first > lower && top.size() >= ef) break;
    std::pop_heap(cand.begin(), cand.end(), std::greater<Cand>());
    cand.pop_back();
    size_t cnt;
    {
      std::lock_guard<std::mutex> g(link_lock(c.second));
      const uint32_t* ll = links(c.second, level);
      cnt = list_count(ll);
      std::memcpy(buf.data(), ll + 1, 4 * cnt);
    }
    visit_fresh(dist, buf.data(), cnt, buf.data(), s, [&](uint32_t id, float dd) {
      if (top.size() < ef || dd < lower) {
        cand.emplace_back(dd, id);
        std::push_heap(cand.begin(), cand.end(), std::greater<Cand>());
        if (!has_del || !is_deleted(id)) {
          top.emplace_back(dd, id);
          std::push_heap(top.begin(), top.end());
          if (top.size() > ef) { std::pop_heap(top.begin(), top.end()); top.pop_back(); }
        }
        if (!top.empty()) lower = top.front().first;
      }
    });
  }
}

// hnswlib's neighbor-selection heuristic: keep a candidate only if it is closer to the base than to every
// candidate already kept (spreads links over directions instead of clustering them).
inline void HnswIndex::select_neighbors(std::vector<Cand>& c, size_t m, std::vector<float>& buf) const {
  std::sort(c.begin(), c.end());
  if (c.size() <= m) return;
  size_t kept = 0;
  for (size_t i = 0; i < c.size() && kept < m; ++i) {
    if (i + prefetch_ahead_ < c.size()) prefetch_payload(c[i + prefetch_ahead_].second);
    const bool good = vs_.with_distance(node_query(c[i].second, buf), [&](const auto& dist) {
      for (size_t j = 0; j < kept; ++j)
        if (dist(payload(c[j].second)) < c[i].first) return false;
      return true;
    });
    if (good) c[kept++] = c[i];
  }
  c.resize(kept);
}

// Links `id` at `level` to the selected candidates and adds the reverse links (pruning full lists).
// Returns the closest selected node: the entry point for the next level down.
inline uint32_t HnswIndex::connect(uint32_t id, int level, std::vector<Cand>& cands, bool is_update, SearchScratch& s) {
  select_neighbors(cands, M_, s.buf_b);
  {
    std::lock_guard<std::mutex> g(link_lock(id));
    uint32_t* ll = links(id, level);
    for (size_t j = 0; j < cands.size(); ++j) ll[1 + j] = cands[j].second;
    std::atomic_thread_fence(std::memory_order_release);
    set_count(ll, cands.size());
  }
  const size_t maxc = level == 0 ? maxM0_ : maxM_;
  std::vector<Cand> pool;
  for (const Cand& sel : cands) {
    const uint32_t nb = sel.second;
    if (nb == id) continue;
    std::lock_guard<std::mutex> g(link_lock(nb));
    uint32_t* ll = links(nb, level);
    const size_t c = list_count(ll);
    if (is_update && std::find(ll + 1, ll + 1 + c, id) != ll + 1 + c) continue;
    if (c < maxc) {
      ll[1 + c] = id;
      std::atomic_thread_fence(std::memory_order_release);
      set_count(ll, c + 1);
      continue;
    }
    const Query qn = node_query(nb, s.buf_a);
    pool.clear();
    vs_.with_distance(qn, [&](const auto& dist) {
      pool.emplace_back(dist(payload(id)), id);
      for_each_dist(dist, ll + 1, c, [&](uint32_t o, float d) { pool.emplace_back(d, o); });
    });
    select_neighbors(pool, maxc, s.buf_b);
    for (size_t j = 0; j < pool.size(); ++j) ll[1 + j] = pool[j].second;
    set_count(ll, pool.size());
  }
  return cands.empty() ? id : cands.front().second;
}

// A new node: its vector, label and level first, then search every level top-down and link bottom-up.
inline void HnswIndex::insert_new(uint32_t id, const float* v, uint64_t label, SearchScratch& s) {
  const int level = random_level();
  uint8_t* nd = node(id);
  std::memset(nd, 0, links0_bytes_);
  vs_.encode(v, payload(id));
  set_label(id, label);
  if (level > 0) {
    uint32_t* up = static_cast<uint32_t*>(std::calloc(static_cast<size_t>(level), upper_bytes_));
    if (!up) throw std::runtime_error("Not enough memory for the links of a new element");
    std::free(upper_[id]);
    upper_[id] = up;
  } else if (upper_[id]) {
    std::free(upper_[id]);
    upper_[id] = nullptr;
  }
  levels_[id] = level;
  std::atomic_thread_fence(std::memory_order_release);

  std::unique_lock<std::mutex> eg(entry_mu_, std::defer_lock);
  uint64_t entry = entry_.load(std::memory_order_acquire);
  int top_level = static_cast<int>(entry >> 32) - 1;
  if (level > top_level || entry == 0) {  // may become the new entry point: serialize with other such inserts
    eg.lock();
    entry = entry_.load(std::memory_order_acquire);
    top_level = static_cast<int>(entry >> 32) - 1;
    if (level <= top_level) eg.unlock();
  }
  if (entry == 0) {
    nd[3] = 1;
    entry_.store((static_cast<uint64_t>(level + 1) << 32) | id, std::memory_order_release);
    return;
  }
  const Query q = vs_.prepare(v);
  uint32_t cur = greedy_locked(q, static_cast<uint32_t>(entry), top_level, level);
  // Search every level top-down first, then link bottom-up: a concurrent reader can only step onto the new
  // node at level l once its lists below l exist, so it never dead-ends on a half-linked node.
  const int start = std::min(level, top_level);
  std::vector<std::vector<Cand>> found(static_cast<size_t>(start) + 1);
  for (int l = start; l >= 0; --l) {
    search_build(q, cur, l, s);
    found[l].assign(s.top.begin(), s.top.end());
    if (!found[l].empty()) cur = std::min_element(found[l].begin(), found[l].end())->second;
  }
  for (int l = 0; l <= start; ++l) connect(id, l, found[l], false, s);
  nd[3] = 1;
  if (level > top_level) entry_.store((static_cast<uint64_t>(level + 1) << 32) | id, std::memory_order_release);
}

}  // namespace phi3fast
