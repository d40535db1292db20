// Hashing helpers over xxHash (inlined): XXH3-64 one-shot and streaming.
// Thread-safety: Hasher is a value; one per thread.
#pragma once

#include <cstddef>
#include <cstdint>

#define XXH_INLINE_ALL
#include <xxhash.h>

namespace agorafs {

inline uint64_t Hash64(const void* p, size_t n, uint64_t seed = 0) {
  return XXH3_64bits_withSeed(p, n, seed);
}

class Hasher {
 public:
  Hasher() { XXH3_64bits_reset(&st_); }
  void Update(const void* p, size_t n) { XXH3_64bits_update(&st_, p, n); }
  uint64_t Digest() const { return XXH3_64bits_digest(&st_); }

 private:
  XXH3_state_t st_;
};

}  // namespace agorafs
