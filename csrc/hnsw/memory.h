// Zeroed, 2 MiB-aligned buffers for the index's node array, backed by transparent huge pages where the kernel
// allows it.
//
// Design note (why huge pages): a search touches a few hundred nodes scattered over the whole array (100k x
// 384-d float32 = 155 MB). With 4 KiB pages nearly every node is a TLB miss and a page walk, and under a
// hypervisor that walk is two-dimensional; 2 MiB pages cover the array with a few dozen TLB entries. Measured
// on (a) in bench/ann.py. madvise(MADV_HUGEPAGE) is only a hint: where THP is disabled the buffer is an
// ordinary mapping and nothing else changes. The region is mmap'ed with 2 MiB of slack and aligned by hand,
// because the kernel can only back 2 MiB-aligned ranges with huge pages.
#pragma once

#include <sys/mman.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

namespace phi3fast {

class HugeBuffer {
 public:
  static constexpr size_t kAlign = size_t{2} << 20;

  HugeBuffer() = default;
  HugeBuffer(const HugeBuffer&) = delete;
  HugeBuffer& operator=(const HugeBuffer&) = delete;
  ~HugeBuffer() { release(); }

  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }

  // Grows or shrinks to `bytes`, keeping the first min(old, new) bytes; new bytes are zero.
  void resize(size_t bytes) {
    if (bytes == size_) return;
    if (bytes == 0) {
      release();
      return;
    }
    const size_t span = bytes + kAlign;
    void* m = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) throw std::runtime_error("Not enough memory: cannot map " + std::to_string(bytes) + " bytes");
    uint8_t* base = static_cast<uint8_t*>(m);
    uint8_t* aligned = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(base) + kAlign - 1) & ~(kAlign - 1));
#ifdef MADV_HUGEPAGE
    if (bytes >= kAlign) madvise(aligned, bytes, MADV_HUGEPAGE);  // a hint: failure just means 4 KiB pages
#endif
    if (data_) std::memcpy(aligned, data_, size_ < bytes ? size_ : bytes);
    release();
    map_ = base;
    map_bytes_ = span;
    data_ = aligned;
    size_ = bytes;
  }

 private:
  void release() {
    if (map_) munmap(map_, map_bytes_);
    map_ = nullptr;
    map_bytes_ = 0;
    data_ = nullptr;
    size_ = 0;
  }

  uint8_t* map_ = nullptr;
  size_t map_bytes_ = 0;
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace phi3fast
