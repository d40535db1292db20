// Open-file table encoding and decoding: what a node reading another node's table
// concludes from every state the blocks can be in.
#include "fs/open_table.h"

#include <gtest/gtest.h>

#include <cstring>
#include <numeric>

#include "device/mem_device.h"

namespace agorafs {
namespace {

class OpenTableTest : public ::testing::Test {
 protected:
  void SetUp() override {
    MkfsParams p;
    p.total_blocks = (uint64_t(64) << 20) / kBlockSize;
    p.node_slots = 2;
    auto g = ComputeGeometry(p);
    ASSERT_TRUE(g.ok()) << g.status().ToString();
    g_ = *g;
    dev_ = std::make_unique<MemDevice>(g_.total_blocks * kBlockSize);
    uuid_.fill(7);
  }
  // Publishes `inos` as slot 1, generation `gen`; returns the blocks written.
  uint32_t Publish(uint64_t gen, uint64_t publication, const std::vector<uint64_t>& inos) {
    AlignedBuffer buf(size_t(kSlotOpenBlocks) * kBlockSize);
    uint32_t n = EncodeOpenTable(g_, uuid_, 1, gen, publication, inos, buf.data());
    EXPECT_TRUE(dev_->Write(g_.SlotBlock(1, kSlotOpen) * kBlockSize, buf.data(),
                            size_t(n) * kBlockSize).ok());
    return n;
  }
  OpenTableState Read(uint64_t gen, std::vector<uint64_t>* inos) {
    auto r = ReadOpenTable(dev_.get(), g_, uuid_, 1, gen, inos);
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return r.ok() ? *r : OpenTableState::kAnything;
  }
  static std::vector<uint64_t> Inos(size_t n) {
    std::vector<uint64_t> v(n);
    std::iota(v.begin(), v.end(), 1000);
    return v;
  }

  Geometry g_;
  Uuid uuid_;
  std::unique_ptr<MemDevice> dev_;
};

TEST_F(OpenTableTest, RoundTripsOneAndSeveralBlocks) {
  std::vector<uint64_t> got;
  EXPECT_EQ(Read(3, &got), OpenTableState::kNothing);  // never written
  EXPECT_EQ(Publish(3, 1, {}), 1u);
  EXPECT_EQ(Read(3, &got), OpenTableState::kListed);
  EXPECT_TRUE(got.empty());
  const auto many = Inos(3 * kOpenInosPerBlock + 5);
  EXPECT_EQ(Publish(3, 2, many), 4u);
  EXPECT_EQ(Read(3, &got), OpenTableState::kListed);
  EXPECT_EQ(got, many);
  // A shorter table later leaves the old blocks behind; they are not read.
  EXPECT_EQ(Publish(3, 3, {42}), 1u);
  EXPECT_EQ(Read(3, &got), OpenTableState::kListed);
  EXPECT_EQ(got, std::vector<uint64_t>{42});
}

TEST_F(OpenTableTest, AnEarlierOccupantsTableListsNothing) {
  Publish(3, 1, {42});
  std::vector<uint64_t> got;
  EXPECT_EQ(Read(4, &got), OpenTableState::kNothing);
  EXPECT_TRUE(got.empty());
}

TEST_F(OpenTableTest, OverflowTornAndDamagedTablesMeanAnything) {
  std::vector<uint64_t> got;
  // More than fit.
  EXPECT_EQ(Publish(3, 1, Inos(kSlotOpenBlocks * kOpenInosPerBlock + 1)), kSlotOpenBlocks);
  EXPECT_EQ(Read(3, &got), OpenTableState::kAnything);
  EXPECT_EQ(Publish(3, 2, Inos(kSlotOpenBlocks * kOpenInosPerBlock)), kSlotOpenBlocks);
  EXPECT_EQ(Read(3, &got), OpenTableState::kListed);

  // A write that reached block 0 but not block 1: two publications mixed.
  Publish(3, 3, Inos(2 * kOpenInosPerBlock));
  AlignedBuffer b(2 * kBlockSize);
  EncodeOpenTable(g_, uuid_, 1, 3, 4, Inos(2 * kOpenInosPerBlock - 1), b.data());
  ASSERT_TRUE(dev_->Write(g_.SlotBlock(1, kSlotOpen) * kBlockSize, b.data(), kBlockSize).ok());
  EXPECT_EQ(Read(3, &got), OpenTableState::kAnything);

  // A flipped bit.
  Publish(3, 5, {42});
  uint64_t off = g_.SlotBlock(1, kSlotOpen) * kBlockSize + 100;
  uint8_t byte = 0;
  ASSERT_TRUE(dev_->Read(off & ~uint64_t(kBlockSize - 1), b.data(), kBlockSize).ok());
  byte = b.data()[100] ^ 1;
  b.data()[100] = byte;
  ASSERT_TRUE(dev_->Write(off & ~uint64_t(kBlockSize - 1), b.data(), kBlockSize).ok());
  EXPECT_EQ(Read(3, &got), OpenTableState::kAnything);
}

}  // namespace
}  // namespace agorafs
