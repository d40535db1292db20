#include "cache/block_pool.h"

#include <sys/mman.h>

#include <cstring>

#include "format/format.h"

namespace agorafs {

namespace {
constexpr size_t kChunkBlocks = 256;  // 1 MiB
}

BlockPool::~BlockPool() {
  for (void* c : chunks_) munmap(c, kChunkBlocks * kBlockSize);
}

uint8_t* BlockPool::Alloc() {
  uint8_t* b = nullptr;
  {
    std::lock_guard<std::mutex> g(mu_);
    if (free_.empty()) {
      void* c = mmap(nullptr, kChunkBlocks * kBlockSize, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (c == MAP_FAILED) return nullptr;
      chunks_.push_back(c);
      auto* base = static_cast<uint8_t*>(c);
      for (size_t i = kChunkBlocks; i-- > 0;) free_.push_back(base + i * kBlockSize);
    }
    b = free_.back();
    free_.pop_back();
  }
  std::memset(b, 0, kBlockSize);
  return b;
}

void BlockPool::Free(uint8_t* block) {
  std::lock_guard<std::mutex> g(mu_);
  free_.push_back(block);
}

size_t BlockPool::reserved_blocks() const {
  std::lock_guard<std::mutex> g(mu_);
  return chunks_.size() * kChunkBlocks;
}

}  // namespace agorafs
