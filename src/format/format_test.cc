#include "format/format.h"

#include <gtest/gtest.h>

#include <vector>

namespace agorafs {
namespace {

Uuid TestUuid() {
  Uuid u{};
  for (size_t i = 0; i < u.size(); i++) u[i] = uint8_t(i * 7 + 1);
  return u;
}

TEST(FormatTest, SealedBlockVerifies) {
  std::vector<uint8_t> b(kBlockSize, 0xAB);
  InitHeader(b.data(), BlockType::kInode, 1234, TestUuid());
  SealBlock(b.data());
  EXPECT_TRUE(VerifyBlock(b.data(), BlockType::kInode, 1234, TestUuid()).ok());
}

TEST(FormatTest, EveryMismatchIsCorruption) {
  std::vector<uint8_t> b(kBlockSize, 0);
  InitHeader(b.data(), BlockType::kDirLeaf, 77, TestUuid());
  SealBlock(b.data());
  EXPECT_TRUE(VerifyBlock(b.data(), BlockType::kInode, 77, TestUuid()).Is(Code::kCorruption));
  EXPECT_TRUE(VerifyBlock(b.data(), BlockType::kDirLeaf, 78, TestUuid()).Is(Code::kCorruption));
  Uuid other = TestUuid();
  other[3] ^= 1;
  EXPECT_TRUE(VerifyBlock(b.data(), BlockType::kDirLeaf, 77, other).Is(Code::kCorruption));
  // A single flipped bit anywhere in the block is caught.
  for (size_t off : {size_t(0), size_t(9), size_t(100), size_t(kBlockSize - 1)}) {
    std::vector<uint8_t> c = b;
    c[off] ^= 0x10;
    EXPECT_FALSE(VerifyBlock(c.data(), BlockType::kDirLeaf, 77, TestUuid()).ok()) << off;
  }
  std::vector<uint8_t> zero(kBlockSize, 0);
  Status s = VerifyBlock(zero.data(), BlockType::kSuper, 0, TestUuid());
  EXPECT_TRUE(s.Is(Code::kCorruption));
  EXPECT_NE(s.message().find("magic"), std::string::npos);
}

TEST(FormatTest, GeometryFitsRegionsWithoutOverlap) {
  for (uint64_t blocks : {uint64_t(16384), uint64_t(262144), uint64_t(1) << 22, uint64_t(1) << 28}) {
    for (uint32_t slots : {1u, 3u, 16u}) {
      MkfsParams p;
      p.total_blocks = blocks;
      p.node_slots = slots;
      auto g = ComputeGeometry(p);
      ASSERT_TRUE(g.ok()) << blocks << " " << slots << " " << g.status().ToString();
      EXPECT_GE(g->journal_start, g->slot_start + uint64_t(slots) * g->slot_blocks);
      EXPECT_GE(g->ag_start, g->journal_start + uint64_t(slots) * g->journal_blocks);
      uint64_t end = g->AgStart(g->ag_count - 1) + g->AgSize(g->ag_count - 1);
      EXPECT_LE(end, blocks - 1);  // last block is the superblock copy
      EXPECT_GE(uint64_t(g->bitmap_blocks) * kBitsPerBitmap, g->ag_blocks);
      for (uint32_t a = 0; a < g->ag_count; a++) EXPECT_LE(g->AgSize(a), g->ag_blocks);
    }
  }
}

TEST(FormatTest, TooSmallDeviceIsRefused) {
  MkfsParams p;
  p.total_blocks = 512;
  EXPECT_FALSE(ComputeGeometry(p).ok());
  p.total_blocks = 1 << 20;
  p.node_slots = 0;
  EXPECT_TRUE(ComputeGeometry(p).status().Is(Code::kInvalid));
}

TEST(FormatTest, LockIdsRoundTrip) {
  LockId id = MakeLockId(LockKind::kDirLeaf, 123456789);
  EXPECT_EQ(LockIdKind(id), LockKind::kDirLeaf);
  EXPECT_EQ(LockIdNumber(id), 123456789u);
}

}  // namespace
}  // namespace agorafs
