// MetaStore over a real journal on MemDevice/FaultDevice.
#include "cache/meta_store.h"

#include <gtest/gtest.h>

#include <cstring>
#include <random>

#include "device/fault_device.h"
#include "device/mem_device.h"
#include "fs/super.h"

namespace agorafs {
namespace {

class MetaStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    mem_ = std::make_shared<MemDevice>(uint64_t(64) << 20);
    MkfsOptions mo;
    mo.params.node_slots = 2;
    auto sb = Mkfs(mem_.get(), mo);
    ASSERT_TRUE(sb.ok());
    sb_ = *sb;
    g_ = GeometryOf(sb_);
    fault_ = std::make_unique<FaultDevice>(mem_.get());
    Open(64);
  }
  void Open(size_t cache_blocks) {
    store_.reset();
    auto j = Journal::Open(fault_.get(), g_, SuperUuid(sb_), 0, 1);
    ASSERT_TRUE(j.ok());
    journal_ = std::move(j).value();
    auto r = journal_->Replay();
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    replayed_ = r->transactions;
    StoreOptions o;
    o.cache_blocks = cache_blocks;
    o.background = false;
    store_ = std::make_unique<MetaStore>(fault_.get(), sb_, journal_.get(), &locks_, o);
    ASSERT_TRUE(store_->Init().ok());
  }
  // A new xattr-type block with a recognisable payload.
  uint64_t NewBlock(uint8_t fill, LockId lock = MakeLockId(LockKind::kInode, 777)) {
    auto h = store_->Begin();
    auto nb = h->NewBlock(BlockType::kXattr, lock, 0);
    EXPECT_TRUE(nb.ok());
    std::memset(nb->second + sizeof(BlockHeader), fill, 100);
    return nb->first;
  }
  uint8_t OnDisk(uint64_t blk) {
    AlignedBuffer b(kBlockSize);
    EXPECT_TRUE(mem_->Read(blk * kBlockSize, b.data(), kBlockSize).ok());
    if (!VerifyBlock(b.data(), BlockType::kXattr, blk, SuperUuid(sb_)).ok()) return 0;
    return b.data()[sizeof(BlockHeader)];
  }

  std::shared_ptr<MemDevice> mem_;
  std::unique_ptr<FaultDevice> fault_;
  Superblock sb_;
  Geometry g_;
  LocalLockManager locks_;
  std::unique_ptr<Journal> journal_;
  std::unique_ptr<MetaStore> store_;
  uint64_t replayed_ = 0;
};

TEST_F(MetaStoreTest, CommittedChangesSurviveACrashUncommittedDoNot) {
  uint64_t a = NewBlock(0x11);
  ASSERT_TRUE(store_->Commit().ok());
  uint64_t b = NewBlock(0x22);  // never committed
  EXPECT_EQ(OnDisk(a), 0);      // only in the journal so far
  mem_->Crash();
  Open(64);
  EXPECT_EQ(replayed_, 1u);
  EXPECT_EQ(OnDisk(a), 0x11);
  EXPECT_EQ(OnDisk(b), 0);
}

TEST_F(MetaStoreTest, FreedBlockIsNotReusedBeforeCheckpoint) {
  uint64_t a = NewBlock(1);
  ASSERT_TRUE(store_->Commit().ok());
  {
    auto h = store_->Begin();
    ASSERT_TRUE(h->Free(a, 1).ok());
  }
  ASSERT_TRUE(store_->Commit().ok());
  for (int i = 0; i < 50; i++) EXPECT_NE(NewBlock(2), a);
  ASSERT_TRUE(store_->Sync().ok());
  bool reused = false;
  {
    auto h = store_->Begin();
    auto al = h->AllocData(a, 1);
    ASSERT_TRUE(al.ok());
    reused = al->start == a;
  }
  EXPECT_TRUE(reused);
}

TEST_F(MetaStoreTest, DropLockWritesHomeThenForgets) {
  uint64_t a = NewBlock(0x33);
  LockId lock = MakeLockId(LockKind::kInode, 777);
  ASSERT_TRUE(locks_.Revoke(lock, LockMode::kNone).ok());  // no callback set: nothing
  locks_.SetRevokeCallback([&](LockId id, LockMode) { return store_->DropLock(id); });
  ASSERT_TRUE(locks_.Revoke(lock, LockMode::kNone).ok());
  EXPECT_EQ(OnDisk(a), 0x33);  // home before the lock went
  uint64_t misses = store_->stats().cache_misses;
  {
    auto h = store_->Begin(true);
    ASSERT_TRUE(h->Read(a, BlockType::kXattr, lock).ok());
  }
  EXPECT_EQ(store_->stats().cache_misses, misses + 1);  // it had been dropped
}

// Directory leaves are used under their directory's inode lock (until leaf locks
// exist), and the store cannot tell which directory a leaf belongs to: dropping any
// inode lock drops every leaf, home first; dropping another kind of lock does not.
TEST_F(MetaStoreTest, DroppingAnInodeLockDropsDirectoryLeavesToo) {
  const LockId leaf_lock = MakeLockId(LockKind::kDirLeaf, 5);
  const uint64_t leaf = NewBlock(0x55, leaf_lock);
  auto read_leaf = [&] {
    auto h = store_->Begin(true);
    auto r = h->Read(leaf, BlockType::kXattr, leaf_lock);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_EQ((*r)[sizeof(BlockHeader)], 0x55);
  };
  uint64_t misses = store_->stats().cache_misses;
  ASSERT_TRUE(store_->DropLock(MakeLockId(LockKind::kAg, 0)).ok());
  ASSERT_TRUE(store_->DropLock(MakeLockId(LockKind::kDirLeaf, 6)).ok());
  read_leaf();
  EXPECT_EQ(store_->stats().cache_misses, misses) << "dropped with a lock not an inode's";
  ASSERT_TRUE(store_->DropLock(MakeLockId(LockKind::kInode, 12345)).ok());
  EXPECT_EQ(OnDisk(leaf), 0x55);  // home before it went
  read_leaf();
  EXPECT_EQ(store_->stats().cache_misses, misses + 1) << "the leaf outlived an inode lock";
}

// After DropAll the allocation counts are whatever the disk says by the time they are
// needed (another node may have allocated meanwhile), and a node that only reads does
// not pay for reading them.
TEST_F(MetaStoreTest, AllocationCountsAreReadAgainOnlyWhenNeeded) {
  uint64_t a = NewBlock(0x44);
  ASSERT_TRUE(store_->DropAll().ok());
  EXPECT_EQ(OnDisk(a), 0x44);

  // "Another node" (the journal of slot 1, its own store) allocates while this one
  // holds nothing.
  uint64_t other_free = 0;
  uint64_t b = 0;
  {
    auto j1 = Journal::Open(fault_.get(), g_, SuperUuid(sb_), 1, 1);
    ASSERT_TRUE(j1.ok());
    ASSERT_TRUE((*j1)->Replay().ok());
    LocalLockManager locks1;
    StoreOptions o;
    o.background = false;
    MetaStore other(fault_.get(), sb_, j1->get(), &locks1, o);
    ASSERT_TRUE(other.Init().ok());
    {
      auto h = other.Begin();
      auto nb = h->NewBlock(BlockType::kXattr, MakeLockId(LockKind::kInode, 778), 0);
      ASSERT_TRUE(nb.ok());
      std::memset(nb->second + sizeof(BlockHeader), 0x55, 100);
      b = nb->first;
    }
    ASSERT_TRUE(other.Sync().ok());
    other_free = other.FreeBlocks();
  }
  ASSERT_NE(a, b);

  // Reading costs one read (the block itself), none for the AG headers.
  uint64_t reads = fault_->reads();
  {
    auto h = store_->Begin(true);
    ASSERT_TRUE(h->Read(a, BlockType::kXattr, MakeLockId(LockKind::kInode, 777)).ok());
  }
  EXPECT_EQ(fault_->reads(), reads + 1);

  // The count and the next allocation follow the disk, not what this store knew.
  EXPECT_EQ(store_->FreeBlocks(), other_free);
  uint64_t c = NewBlock(0x66);
  EXPECT_NE(c, a);
  EXPECT_NE(c, b);
  EXPECT_EQ(store_->FreeBlocks(), other_free - 1);
}

TEST_F(MetaStoreTest, JournalWriteErrorStopsAllWriting) {
  NewBlock(1);
  fault_->FailNth(IoKind::kWrite, 1);
  EXPECT_FALSE(store_->Commit().ok());
  EXPECT_FALSE(store_->failed().ok());
  auto h = store_->Begin();
  EXPECT_TRUE(h->NewBlock(BlockType::kXattr, MakeLockId(LockKind::kInode, 1), 0)
                  .status()
                  .Is(Code::kIOError));
}

TEST_F(MetaStoreTest, CacheStaysWithinItsBudget) {
  std::vector<uint64_t> blocks;
  for (int i = 0; i < 600; i++) {
    blocks.push_back(NewBlock(uint8_t(i)));
    if (i % 50 == 0) {
      ASSERT_TRUE(store_->Commit().ok());
    }
  }
  ASSERT_TRUE(store_->Sync().ok());
  for (uint64_t b : blocks) {
    auto h = store_->Begin(true);
    ASSERT_TRUE(h->Read(b, BlockType::kXattr, MakeLockId(LockKind::kInode, 777)).ok());
  }
  EXPECT_LE(store_->stats().cached_blocks, 256u + 1);  // minimum budget is 256 blocks
}

TEST_F(MetaStoreTest, CorruptBlockIsRefusedAndNamed) {
  uint64_t a = NewBlock(5);
  ASSERT_TRUE(store_->Sync().ok());
  Open(64);  // cold cache
  AlignedBuffer b(kBlockSize);
  ASSERT_TRUE(mem_->Read(a * kBlockSize, b.data(), kBlockSize).ok());
  b.data()[200] ^= 1;
  ASSERT_TRUE(mem_->Write(a * kBlockSize, b.data(), kBlockSize).ok());
  auto h = store_->Begin(true);
  auto r = h->Read(a, BlockType::kXattr, MakeLockId(LockKind::kInode, 777));
  ASSERT_TRUE(r.status().Is(Code::kCorruption));
  EXPECT_NE(r.status().message().find(std::to_string(a)), std::string::npos);
}

TEST_F(MetaStoreTest, ColdInodeReadCachesItsNeighboursOnly) {
  std::vector<uint64_t> inos;
  {
    auto h = store_->Begin();
    for (int i = 0; i < 10; i++) {
      auto nb = h->NewBlock(BlockType::kInode, SelfLock(LockKind::kInode), 0);
      ASSERT_TRUE(nb.ok());
      inos.push_back(nb->first);
    }
    // A freed neighbour must not come back through readahead.
    ASSERT_TRUE(h->Free(inos[5], 1).ok());
  }
  ASSERT_TRUE(store_->Sync().ok());
  Open(1024);  // cold cache
  {
    auto h = store_->Begin(true);
    ASSERT_TRUE(h->Read(inos[0], BlockType::kInode, InodeLock(inos[0])).ok());
  }
  StoreStats st = store_->stats();
  EXPECT_EQ(st.cache_misses, 1u);
  EXPECT_GE(st.readahead_blocks, 8u);
  for (int i : {1, 2, 9}) {
    auto h = store_->Begin(true);
    ASSERT_TRUE(h->Read(inos[i], BlockType::kInode, InodeLock(inos[i])).ok());
  }
  EXPECT_EQ(store_->stats().cache_misses, 1u);  // served by the readahead
  auto h = store_->Begin(true);
  EXPECT_FALSE(h->Read(inos[5], BlockType::kInode, InodeLock(inos[5])).ok() &&
               store_->stats().cache_misses == 1u);
}

// A scan of more inodes than the cache holds still reads them a window at a time;
// random reads over a large set soon stop paying for windows they do not use.
TEST_F(MetaStoreTest, InodeReadaheadFollowsTheAccessPattern) {
  constexpr int kInodes = 3000;
  std::vector<uint64_t> inos;
  for (int done = 0; done < kInodes;) {
    auto h = store_->Begin(false, 256);
    for (int i = 0; i < 200 && done < kInodes; i++, done++) {
      auto nb = h->NewBlock(BlockType::kInode, SelfLock(LockKind::kInode), 0);
      ASSERT_TRUE(nb.ok()) << nb.status().ToString();
      inos.push_back(nb->first);
    }
  }
  ASSERT_TRUE(store_->Sync().ok());
  Open(256);  // cold, and far smaller than the set
  for (uint64_t ino : inos) {
    auto h = store_->Begin(true);
    ASSERT_TRUE(h->Read(ino, BlockType::kInode, InodeLock(ino)).ok());
  }
  StoreStats st = store_->stats();
  EXPECT_LE(st.cache_misses, uint64_t(kInodes) / 8) << "the scan missed on most inodes";
  EXPECT_GE(st.readahead_used, uint64_t(kInodes) * 3 / 4);
  EXPECT_LE(st.cached_blocks, 256u + 16);

  Open(256);
  std::mt19937_64 rng(7);
  constexpr int kReads = 600;
  for (int i = 0; i < kReads; i++) {
    uint64_t ino = inos[rng() % inos.size()];
    auto h = store_->Begin(true);
    ASSERT_TRUE(h->Read(ino, BlockType::kInode, InodeLock(ino)).ok());
  }
  st = store_->stats();
  // Every miss reading a window would cache about 15 neighbours each.
  EXPECT_LT(st.readahead_blocks, uint64_t(st.cache_misses) * 15 / 4)
      << st.cache_misses << " misses";
}

}  // namespace
}  // namespace agorafs
