// HnswIndex's graph repair: deletion marks, reuse of deleted slots, and relinking a node whose vector
// changed (its old neighbours' lists are repaired first, then it is linked where it now belongs).
#pragma once

#include "hnsw.h"

namespace phi3fast {

inline void HnswIndex::mark_deleted(uint64_t label) {
  std::shared_lock<std::shared_mutex> sl(struct_mu_);
  std::lock_guard<std::mutex> ll(label_locks_[label_hash(label)]);
  uint32_t id;
  if (!lookup(label, &id)) throw std::runtime_error("Label not found");
  if (is_deleted(id)) throw std::runtime_error("The requested to delete element is already deleted");
  flags(id)[0] |= 1;
  num_deleted_.fetch_add(1);
  if (allow_replace_) {
    std::lock_guard<std::mutex> g(deleted_mu_);
    deleted_ids_.insert(id);
  }
}

inline void HnswIndex::unmark_deleted(uint64_t label) {
  std::shared_lock<std::shared_mutex> sl(struct_mu_);
  std::lock_guard<std::mutex> ll(label_locks_[label_hash(label)]);
  uint32_t id;
  if (!lookup(label, &id)) throw std::runtime_error("Label not found");
  if (!is_deleted(id)) throw std::runtime_error("The requested to undelete element is not deleted");
  unmark_internal(id);
}

inline bool HnswIndex::take_vacant(uint32_t* id) {
  std::lock_guard<std::mutex> g(deleted_mu_);
  if (deleted_ids_.empty()) return false;
  *id = *deleted_ids_.begin();
  deleted_ids_.erase(deleted_ids_.begin());
  return true;
}

inline void HnswIndex::clear_deleted_flag(uint32_t id) {
  flags(id)[0] &= static_cast<uint8_t>(~1u);
  num_deleted_.fetch_sub(1);
}

inline void HnswIndex::unmark_internal(uint32_t id) {
  clear_deleted_flag(id);
  if (allow_replace_) {
    std::lock_guard<std::mutex> g(deleted_mu_);
    deleted_ids_.erase(id);
  }
}

// New vector for an existing node: repair the lists of its old neighbors that pointed to it (they lose a
// router), then link it where it now belongs, as a fresh insert at its existing level.
inline void HnswIndex::relink(uint32_t id, const float* v, SearchScratch& s) {
  vs_.encode(v, payload(id));
  const int level = levels_[id];
  const uint64_t entry = entry_.load(std::memory_order_acquire);
  const int top_level = static_cast<int>(entry >> 32) - 1;
  std::vector<uint32_t> old;
  std::vector<Cand> pool;
  for (int l = 0; l <= level; ++l) {
    {
      std::lock_guard<std::mutex> g(link_lock(id));
      const uint32_t* ll = links(id, l);
      old.assign(ll + 1, ll + 1 + list_count(ll));
    }
    const size_t maxc = l == 0 ? maxM0_ : maxM_;
    for (uint32_t nb : old) {
      std::lock_guard<std::mutex> g(link_lock(nb));
      uint32_t* ll = links(nb, l);
      const size_t c = list_count(ll);
      if (std::find(ll + 1, ll + 1 + c, id) == ll + 1 + c) continue;
      const Query qn = node_query(nb, s.buf_a);
      pool.clear();
      for (size_t j = 1; j <= c; ++j)
        if (ll[j] != id) pool.emplace_back(vs_.dist(qn, payload(ll[j])), ll[j]);
      for (uint32_t o : old)
        if (o != nb && std::find(ll + 1, ll + 1 + c, o) == ll + 1 + c) pool.emplace_back(vs_.dist(qn, payload(o)), o);
      select_neighbors(pool, maxc, s.buf_b);
      for (size_t j = 0; j < pool.size(); ++j) ll[1 + j] = pool[j].second;
      set_count(ll, pool.size());
    }
  }
  if (count() <= 1 || entry == 0) return;
  const Query q = vs_.prepare(v);
  uint32_t cur = greedy_locked(q, static_cast<uint32_t>(entry), top_level, level);
  for (int l = std::min(level, top_level); l >= 0; --l) {
    search_build(q, cur, l, s);
    std::vector<Cand> cands;
    for (const Cand& c : s.top)
      if (c.second != id) cands.push_back(c);
    if (cands.empty()) continue;
    cur = connect(id, l, cands, true, s);
  }
}

}  // namespace phi3fast
