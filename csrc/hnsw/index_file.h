// The phi3fast HNSW file format, and a reader for hnswlib's own files (an import path for its users).
//
// phi3fast format, version 1 (little-endian):
//   "PHI3HNSW" | u32 version | u8 space | u8 storage | u8 allow_replace_deleted | u8 0 | u32 dim
//   | u64 M, max_elements, count, seed, ef_construction | i32 top level | u32 entry id | u64 node_bytes
//   | u64 upper_bytes | level-0 blocks [count * node_bytes] | i32 levels [count] | upper link lists
//   | u64 checksum of all preceding bytes
// Every size is checked against the file length before anything is allocated, then the checksum, then the
// graph itself (link counts and ids in range), so a bad file is a clear error and never a crash.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "hnsw.h"

namespace phi3fast {

constexpr char kMagic[8] = {'P', 'H', 'I', '3', 'H', 'N', 'S', 'W'};
constexpr uint32_t kFormatVersion = 1;
constexpr size_t kHeaderBytes = 8 + 4 + 4 + 4 + 5 * 8 + 4 + 4 + 8 + 8;

struct IndexFile {
  static size_t size(const HnswIndex& ix) {
    size_t upper = 0;
    const size_t n = ix.count();
    for (size_t i = 0; i < n; ++i) upper += static_cast<size_t>(ix.levels_[i]) * ix.upper_bytes_;
    return kHeaderBytes + n * ix.node_bytes_ + 4 * n + upper + 8;
  }

  static std::string save(const HnswIndex& ix) {
    std::unique_lock<std::shared_mutex> ul(ix.struct_mu_);  // a consistent snapshot: no add runs meanwhile
    const size_t n = ix.count();
    ByteWriter w;
    w.reserve(size(ix));
    w.bytes(kMagic, 8);
    w.put(kFormatVersion);
    w.put(static_cast<uint8_t>(ix.vs_.space));
    w.put(static_cast<uint8_t>(ix.vs_.storage));
    w.put(static_cast<uint8_t>(ix.allow_replace_));
    w.put(uint8_t{0});
    w.put(static_cast<uint32_t>(ix.vs_.dim));
    w.put(static_cast<uint64_t>(ix.M_));
    w.put(static_cast<uint64_t>(ix.max_elements_));
    w.put(static_cast<uint64_t>(n));
    w.put(static_cast<uint64_t>(ix.seed_));
    w.put(static_cast<uint64_t>(ix.ef_construction_));
    const uint64_t entry = ix.entry_.load();
    w.put(static_cast<int32_t>(entry >> 32) - 1);
    w.put(entry == 0 ? uint32_t{0xFFFFFFFFu} : static_cast<uint32_t>(entry));
    w.put(static_cast<uint64_t>(ix.node_bytes_));
    size_t upper = 0;
    for (size_t i = 0; i < n; ++i) upper += static_cast<size_t>(ix.levels_[i]) * ix.upper_bytes_;
    w.put(static_cast<uint64_t>(upper));
    std::vector<uint8_t> block(ix.node_bytes_);
    for (size_t i = 0; i < n; ++i) {
      ix.write_block(static_cast<uint32_t>(i), block.data());
      w.bytes(block.data(), block.size());
    }
    w.bytes(ix.levels_, 4 * n);
    for (size_t i = 0; i < n; ++i)
      if (ix.levels_[i] > 0) w.bytes(ix.upper_[i], static_cast<size_t>(ix.levels_[i]) * ix.upper_bytes_);
    w.seal();
    return std::move(w.str());
  }

  // `expect_space`/`expect_dim` come from the Index object the user created; a file for another space or
  // dimension is refused rather than silently searched with the wrong metric.
  static std::unique_ptr<HnswIndex> load(const std::string& data, const std::string& what, Space expect_space,
                                         size_t expect_dim, size_t max_elements, bool allow_replace, SimdLevel simd) {
    const uint8_t* p = reinterpret_cast<const uint8_t*>(data.data());
    ByteReader r(p, data.size(), what);
    if (data.size() < 8 || std::memcmp(p, kMagic, 8) != 0) return load_hnswlib(data, what, expect_space, expect_dim, max_elements, allow_replace, simd);
    r.take(8);
    const uint32_t version = r.get<uint32_t>();
    if (version != kFormatVersion)
      r.fail("format version " + std::to_string(version) + " (this build reads version " + std::to_string(kFormatVersion) + ")");
    const uint8_t space = r.get<uint8_t>(), storage = r.get<uint8_t>(), file_allow = r.get<uint8_t>();
    r.get<uint8_t>();
    const uint32_t dim = r.get<uint32_t>();
    const uint64_t M = r.get<uint64_t>(), max_el = r.get<uint64_t>(), n = r.get<uint64_t>();
    const uint64_t seed = r.get<uint64_t>(), efc = r.get<uint64_t>();
    const int32_t top_level = r.get<int32_t>();
    const uint32_t ep = r.get<uint32_t>();
    const uint64_t node_bytes = r.get<uint64_t>(), upper = r.get<uint64_t>();
    if (space > 2 || storage > 2) r.fail("unknown space or storage code");
    if (static_cast<Space>(space) != expect_space)
      r.fail(std::string("file is for space '") + space_name(static_cast<Space>(space)) + "', this index is '" +
             space_name(expect_space) + "'");
    if (dim != expect_dim) r.fail("file has dim " + std::to_string(dim) + ", this index has dim " + std::to_string(expect_dim));
    if (M < 2 || M > 10000) r.fail("M = " + std::to_string(M) + " out of range");
    if (n > max_el || max_el > 0xFFFFFFF0ull) r.fail("element count " + std::to_string(n) + " exceeds capacity " + std::to_string(max_el));
    if (efc > (1ull << 32)) r.fail("ef_construction out of range");
    (void)file_allow;
    auto ix = std::make_unique<HnswIndex>(static_cast<Space>(space), dim, static_cast<Storage>(storage), 0, M, efc,
                                          seed, allow_replace, simd);
    if (node_bytes != ix->node_bytes_) r.fail("element size " + std::to_string(node_bytes) + " does not match its header");
    // Exact length check before trusting any count: n * node_bytes and upper must fit in the file.
    const uint64_t rest = data.size() - r.pos();
    if (n > rest / (node_bytes + 4) || upper > rest || n * (node_bytes + 4) + upper + 8 != rest)
      r.fail("size " + std::to_string(data.size()) + " bytes does not match its header");
    const uint64_t want = checksum64(p, data.size() - 8);
    uint64_t got;
    std::memcpy(&got, p + data.size() - 8, 8);
    if (want != got) r.fail("checksum mismatch");
    ix->allocate(std::max<uint64_t>(max_el, std::max<uint64_t>(max_elements, n)));
    const uint8_t* blocks = r.take(n * node_bytes);
    for (size_t i = 0; i < n; ++i) ix->read_block(static_cast<uint32_t>(i), blocks + i * node_bytes);
    std::memcpy(ix->levels_, r.take(4 * n), 4 * n);
    uint64_t used = 0;
    for (size_t i = 0; i < n; ++i) {
      const int32_t lv = ix->levels_[i];
      if (lv < 0 || lv >= kMaxLevel) r.fail("element " + std::to_string(i) + " has level " + std::to_string(lv));
      used += static_cast<uint64_t>(lv) * ix->upper_bytes_;
    }
    if (used != upper) r.fail("upper link lists do not add up");
    for (size_t i = 0; i < n; ++i) {
      const int32_t lv = ix->levels_[i];
      if (lv == 0) continue;
      ix->upper_[i] = static_cast<uint32_t*>(std::malloc(static_cast<size_t>(lv) * ix->upper_bytes_));
      if (!ix->upper_[i]) throw std::runtime_error("Not enough memory to load " + what);
      std::memcpy(ix->upper_[i], r.take(static_cast<size_t>(lv) * ix->upper_bytes_), static_cast<size_t>(lv) * ix->upper_bytes_);
    }
    finish(*ix, r, n, top_level, ep, false);
    return ix;
  }

  // hnswlib's saveIndex: 13 header fields, level-0 blocks, then per element u32 size + upper link lists.
  static std::unique_ptr<HnswIndex> load_hnswlib(const std::string& data, const std::string& what, Space space,
                                                 size_t dim, size_t max_elements, bool allow_replace, SimdLevel simd) {
    ByteReader r(reinterpret_cast<const uint8_t*>(data.data()), data.size(), what);
    const uint64_t off0 = r.get<uint64_t>(), max_el = r.get<uint64_t>(), n = r.get<uint64_t>();
    const uint64_t size_data = r.get<uint64_t>(), label_off = r.get<uint64_t>(), off_data = r.get<uint64_t>();
    const int32_t top_level = r.get<int32_t>();
    const uint32_t ep = r.get<uint32_t>();
    const uint64_t maxM = r.get<uint64_t>(), maxM0 = r.get<uint64_t>(), M = r.get<uint64_t>();
    r.get<double>();
    const uint64_t efc = r.get<uint64_t>();
    if (off0 != 0 || M < 2 || M > 10000 || maxM != M || maxM0 != 2 * M || off_data != 4 * (maxM0 + 1) ||
        label_off < off_data || (label_off - off_data) % 4 != 0 || size_data != label_off + 8 || n > max_el ||
        max_el > 0xFFFFFFF0ull || efc > (1ull << 32))
      r.fail("not a phi3fast index, and its header is not a valid hnswlib header");
    const uint64_t file_dim = (label_off - off_data) / 4;
    if (file_dim != dim) r.fail("hnswlib file has dim " + std::to_string(file_dim) + ", this index has dim " + std::to_string(dim));
    if (n > r.remaining() / size_data) r.fail("truncated (level-0 data)");
    auto ix = std::make_unique<HnswIndex>(space, dim, Storage::F32, 0, M, efc, 100, allow_replace, simd);
    if (ix->node_bytes_ != size_data) r.fail("element layout differs from hnswlib's");
    ix->allocate(std::max<uint64_t>(max_el, std::max<uint64_t>(max_elements, n)));
    const uint8_t* blocks = r.take(n * size_data);
    for (size_t i = 0; i < n; ++i) ix->read_block(static_cast<uint32_t>(i), blocks + i * size_data);
    for (size_t i = 0; i < n; ++i) {
      const uint32_t bytes = r.get<uint32_t>();
      if (bytes % ix->upper_bytes_ != 0 || bytes / ix->upper_bytes_ >= kMaxLevel)
        r.fail("element " + std::to_string(i) + " has a link list of " + std::to_string(bytes) + " bytes");
      const int lv = static_cast<int>(bytes / ix->upper_bytes_);
      ix->levels_[i] = lv;
      if (lv == 0) continue;
      const uint8_t* src = r.take(bytes);
      ix->upper_[i] = static_cast<uint32_t*>(std::malloc(bytes));
      if (!ix->upper_[i]) throw std::runtime_error("Not enough memory to load " + what);
      std::memcpy(ix->upper_[i], src, bytes);
    }
    if (r.remaining() != 0) r.fail(std::to_string(r.remaining()) + " unexpected trailing bytes");
    finish(*ix, r, n, top_level, ep, true);
    return ix;
  }

 private:
  // Validates the graph (every count and id in range), then rebuilds the label map and deletion state.
  static void finish(HnswIndex& ix, const ByteReader& r, size_t n, int32_t top_level, uint32_t ep, bool hnswlib) {
    if (n == 0) {
      if (top_level >= 0 && !hnswlib && ep != 0xFFFFFFFFu) r.fail("empty index with an entry point");
    } else {
      if (ep >= n || top_level < 0 || top_level != ix.levels_[ep]) r.fail("bad entry point");
    }
    for (size_t i = 0; i < n; ++i) {
      for (int l = 0; l <= ix.levels_[i]; ++l) {
        const uint32_t* ll = ix.links(static_cast<uint32_t>(i), l);
        const size_t c = HnswIndex::list_count(ll), maxc = l == 0 ? ix.maxM0_ : ix.maxM_;
        if (c > maxc) r.fail("element " + std::to_string(i) + " has " + std::to_string(c) + " links at level " + std::to_string(l));
        for (size_t j = 1; j <= c; ++j)
          if (ll[j] >= n || ix.levels_[ll[j]] < l) r.fail("element " + std::to_string(i) + " links to a missing element");
      }
      uint8_t* nd = ix.node(static_cast<uint32_t>(i));
      nd[3] = 1;  // ready (hnswlib files leave this byte 0)
      nd[2] &= 1;
      // hnswlib's addPoint(replace_deleted=true) can give a vacant slot a label that another slot still holds,
      // so its files may hold a label twice. As its loader does, the last slot wins the label; the other keeps
      // its block (a search can still reach it and report its label, as in hnswlib).
      ix.label_map_[ix.get_label(static_cast<uint32_t>(i))] = static_cast<uint32_t>(i);
      if (nd[2]) {
        ix.num_deleted_.fetch_add(1);
        if (ix.allow_replace_) ix.deleted_ids_.insert(static_cast<uint32_t>(i));
      }
    }
    ix.count_.store(n);
    if (n) ix.entry_.store((static_cast<uint64_t>(top_level + 1) << 32) | ep);
  }
};

}  // namespace phi3fast
