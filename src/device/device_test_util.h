// Helpers shared by the device tests (device_test.cc, nbd_device_test.cc).
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "device/block_device.h"

namespace agorafs {

inline AlignedBuffer Filled(size_t len, uint8_t v) {
  AlignedBuffer b(len);
  std::memset(b.data(), v, len);
  return b;
}

inline bool AllBytes(const uint8_t* p, size_t len, uint8_t v) {
  for (size_t i = 0; i < len; i++) {
    if (p[i] != v) return false;
  }
  return true;
}

// WriteBatch on a device of at least 2 MiB: a batch larger than FileDevice's ring
// and NbdDevice's in-flight limit (64) with runs of one and two blocks, scattered
// with gaps between them; then the checks that refuse a batch before writing any of it.
inline void CheckWriteBatch(BlockDevice* dev) {
  constexpr size_t kOps = 150;
  std::vector<AlignedBuffer> bufs;
  std::vector<WriteOp> ops;
  for (size_t k = 0; k < kOps; k++) {
    const size_t len = (k % 3 == 0 ? 2 : 1) * 4096;
    bufs.push_back(Filled(len, uint8_t(k + 1)));
    // Op k lives in slot (k * 37) % kOps of 3 blocks each: out of order, never touching.
    ops.push_back(WriteOp{uint64_t((k * 37) % kOps) * 3 * 4096, bufs.back().data(), len});
  }
  ASSERT_TRUE(dev->WriteBatch(ops.data(), ops.size()).ok());
  AlignedBuffer r(3 * 4096);
  for (size_t k = 0; k < kOps; k++) {
    ASSERT_TRUE(dev->Read(ops[k].offset, r.data(), r.size()).ok());
    EXPECT_TRUE(AllBytes(r.data(), ops[k].len, uint8_t(k + 1))) << "op " << k;
    EXPECT_TRUE(AllBytes(r.data() + ops[k].len, r.size() - ops[k].len, 0)) << "after op " << k;
  }

  // One bad op refuses the whole batch; the good ones before it are not written.
  AlignedBuffer b = Filled(4096, 0xEE);
  const uint64_t free_off = kOps * 3 * 4096;
  std::vector<WriteOp> bad = {{free_off, b.data(), 4096},
                              {free_off + 4096, b.data(), 100},
                              {free_off + 8192, b.data(), 4096}};
  EXPECT_TRUE(dev->WriteBatch(bad.data(), bad.size()).Is(Code::kInvalid));
  bad[1] = WriteOp{dev->Size(), b.data(), 4096};  // past the end
  EXPECT_TRUE(dev->WriteBatch(bad.data(), bad.size()).Is(Code::kInvalid));
  ASSERT_TRUE(dev->Read(free_off, r.data(), r.size()).ok());
  EXPECT_TRUE(AllBytes(r.data(), r.size(), 0));
  EXPECT_TRUE(dev->WriteBatch(nullptr, 0).ok());
}

}  // namespace agorafs
