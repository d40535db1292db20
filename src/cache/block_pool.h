// BlockPool: 4 KiB-aligned block buffers for the metadata cache and its committed
// copies.
//
// Buffers are carved from 1 MiB anonymous mappings and recycled through a free list.
// Memory is never handed back to the system, but it never exceeds the peak number of
// blocks in use at once (rounded up to a chunk): the cache budget bounds that peak.
// malloc's aligned allocations, by contrast, cost up to twice the block size each and
// fragment the heap, which let the daemon grow far beyond its cache size.
//
// Thread-safety: Alloc/Free may be called from any thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <vector>

namespace agorafs {

class BlockPool {
 public:
  BlockPool() = default;
  ~BlockPool();
  BlockPool(const BlockPool&) = delete;
  BlockPool& operator=(const BlockPool&) = delete;

  // A zeroed, 4096-aligned 4096-byte buffer; nullptr only when mmap fails.
  uint8_t* Alloc();
  void Free(uint8_t* block);
  size_t reserved_blocks() const;  // blocks mapped so far (in use + free)

 private:
  mutable std::mutex mu_;
  std::vector<uint8_t*> free_;
  std::vector<void*> chunks_;
};

// One pool block owned by an object; returned to the pool on destruction.
class PoolBlock {
 public:
  explicit PoolBlock(BlockPool* pool) : pool_(pool), data_(pool->Alloc()) {}
  ~PoolBlock() {
    if (data_) pool_->Free(data_);
  }
  PoolBlock(const PoolBlock&) = delete;
  PoolBlock& operator=(const PoolBlock&) = delete;
  uint8_t* data() { return data_; }
  const uint8_t* data() const { return data_; }

 private:
  BlockPool* pool_;
  uint8_t* data_;
};

}  // namespace agorafs
