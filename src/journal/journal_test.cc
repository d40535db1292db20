#include "journal/journal.h"

#include <gtest/gtest.h>

#include <cstring>
#include <map>
#include <random>
#include <vector>

#include "device/fault_device.h"
#include "device/mem_device.h"

namespace agorafs {
namespace {

constexpr uint64_t kTotalBlocks = 4096;
constexpr uint64_t kDataStart = 2048;  // ag_start: first block a transaction may target

Uuid TestUuid() {
  Uuid u{};
  for (size_t i = 0; i < u.size(); i++) u[i] = uint8_t(0x30 + i);
  return u;
}

Geometry MakeGeometry(uint32_t journal_blocks) {
  Geometry g;
  g.total_blocks = kTotalBlocks;
  g.node_slots = 2;
  g.slot_blocks = 4;
  g.slot_start = 2;
  g.journal_start = 10;
  g.journal_blocks = journal_blocks;
  g.ag_start = kDataStart;
  g.ag_blocks = 1024;
  g.ag_count = 2;
  g.bitmap_blocks = 1;
  EXPECT_LE(g.journal_start + 2 * journal_blocks, kDataStart);
  return g;
}

// A metadata block image tagged with its home and a version.
std::vector<uint8_t> MakeBlock(uint64_t home, uint64_t version) {
  std::vector<uint8_t> b(kBlockSize);
  for (size_t i = 16; i < kBlockSize; i++) b[i] = uint8_t(home * 31 + version * 7 + i);
  std::memcpy(b.data(), &home, 8);
  std::memcpy(b.data() + 8, &version, 8);
  return b;
}

// Version stored at `home`: 0 for a zero block, UINT64_MAX for anything garbled.
uint64_t VersionAt(BlockDevice* dev, uint64_t home) {
  AlignedBuffer b(kBlockSize);
  if (!dev->Read(home * kBlockSize, b.data(), kBlockSize).ok()) return UINT64_MAX;
  uint64_t h, v;
  std::memcpy(&h, b.data(), 8);
  std::memcpy(&v, b.data() + 8, 8);
  if (h == 0 && v == 0) {
    for (size_t i = 0; i < kBlockSize; i++) {
      if (b.data()[i] != 0) return UINT64_MAX;
    }
    return 0;
  }
  if (h != home || std::memcmp(b.data(), MakeBlock(home, v).data(), kBlockSize) != 0) {
    return UINT64_MAX;
  }
  return v;
}

void WriteHome(BlockDevice* dev, uint64_t home, uint64_t version) {
  AlignedBuffer b(kBlockSize);
  std::memcpy(b.data(), MakeBlock(home, version).data(), kBlockSize);
  ASSERT_TRUE(dev->Write(home * kBlockSize, b.data(), kBlockSize).ok());
}

Result<uint64_t> CommitVersion(Journal* j, const std::vector<uint64_t>& homes,
                               uint64_t version) {
  std::vector<std::vector<uint8_t>> images;
  std::vector<JournalBlock> blocks;
  for (uint64_t h : homes) images.push_back(MakeBlock(h, version));
  for (size_t i = 0; i < homes.size(); i++) blocks.push_back({homes[i], images[i].data()});
  return j->Commit(blocks);
}

std::vector<uint64_t> Homes(uint64_t first, size_t n) {
  std::vector<uint64_t> v;
  for (size_t i = 0; i < n; i++) v.push_back(first + i);
  return v;
}

// Opens and replays; fails the test on error.
std::unique_ptr<Journal> Mount(BlockDevice* dev, const Geometry& g, ReplayStats* stats = nullptr,
                               uint32_t slot = 0) {
  auto j = Journal::Open(dev, g, TestUuid(), slot, /*generation=*/7);
  EXPECT_TRUE(j.ok()) << j.status().ToString();
  if (!j.ok()) return nullptr;
  auto st = (*j)->Replay();
  EXPECT_TRUE(st.ok()) << st.status().ToString();
  if (!st.ok()) return nullptr;
  if (stats) *stats = *st;
  return std::move(*j);
}

void FlipBit(MemDevice* dev, uint64_t blk, size_t byte) {
  AlignedBuffer b(kBlockSize);
  ASSERT_TRUE(dev->Read(blk * kBlockSize, b.data(), kBlockSize).ok());
  b.data()[byte] ^= 0x04;
  ASSERT_TRUE(dev->Write(blk * kBlockSize, b.data(), kBlockSize).ok());
  ASSERT_TRUE(dev->Flush().ok());
}

uint64_t LogBlock(const Geometry& g, uint32_t pos, uint32_t slot = 0) {
  return g.JournalStart(slot) + kJournalLogStart + pos;
}

// ---------------------------------------------------------------------------------

TEST(JournalTest, BlocksNeeded) {
  EXPECT_EQ(Journal::BlocksNeeded(0), 0u);
  EXPECT_EQ(Journal::BlocksNeeded(1), 3u);
  EXPECT_EQ(Journal::BlocksNeeded(kDescEntries), kDescEntries + 2);
  EXPECT_EQ(Journal::BlocksNeeded(kDescEntries + 1), kDescEntries + 4);
}

// Runs of 1 to 7 blocks with gaps, 600 blocks in all: more than one 256-block stage,
// with a run cut by the stage boundary. The stage buffer first served a smaller batch
// (it grows, and nothing of the earlier batch leaks into this one).
TEST(JournalTest, WriteHomeWritesEveryBlockAndNothingElse) {
  MemDevice mem(uint64_t(16) << 20);
  StageBuffer stage;
  {
    std::vector<AlignedBuffer> early;
    std::vector<JournalBlock> small;
    for (uint64_t blk = 3000; blk < 3005; blk++) {
      AlignedBuffer b(kBlockSize);
      std::memset(b.data(), 0xEE, kBlockSize);
      small.push_back(JournalBlock{blk, b.data()});
      early.push_back(std::move(b));
    }
    ASSERT_TRUE(WriteHome(&mem, small, &stage).ok());
  }
  std::vector<AlignedBuffer> data;
  std::vector<JournalBlock> blocks;
  uint64_t home = 100;
  for (size_t run = 1; blocks.size() < 600; run = run % 7 + 1) {
    for (size_t k = 0; k < run && blocks.size() < 600; k++) {
      AlignedBuffer b(kBlockSize);
      std::memset(b.data(), int(blocks.size() % 251) + 1, kBlockSize);
      blocks.push_back(JournalBlock{home++, b.data()});
      data.push_back(std::move(b));
    }
    home += 2;  // a gap of two blocks
  }
  ASSERT_TRUE(WriteHome(&mem, blocks, &stage).ok());
  AlignedBuffer r(kBlockSize);
  size_t next = 0;
  for (uint64_t blk = 100; blk < home; blk++) {
    ASSERT_TRUE(mem.Read(blk * kBlockSize, r.data(), kBlockSize).ok());
    const bool written = next < blocks.size() && blocks[next].home == blk;
    const uint8_t want = written ? uint8_t(next % 251 + 1) : 0;
    for (size_t i = 0; i < kBlockSize; i++) {
      ASSERT_EQ(r.data()[i], want) << "block " << blk;
    }
    if (written) next++;
  }
  EXPECT_EQ(next, blocks.size());
  ASSERT_TRUE(mem.Read(3004 * kBlockSize, r.data(), kBlockSize).ok());
  EXPECT_EQ(r.data()[0], 0xEE);
  EXPECT_EQ(r.data()[kBlockSize - 1], 0xEE);
}

TEST(JournalTest, CommitThenReplayWritesHome) {
  Geometry g = MakeGeometry(1000);
  MemDevice mem(kTotalBlocks * kBlockSize);
  ASSERT_TRUE(Journal::Format(&mem, g, TestUuid(), 0).ok());
  ASSERT_TRUE(Journal::Format(&mem, g, TestUuid(), 1).ok());
  ReplayStats st;
  auto j = Mount(&mem, g, &st);
  ASSERT_TRUE(j);
  EXPECT_EQ(st.transactions, 0u);
  EXPECT_EQ(j->Capacity(), 998u);
  EXPECT_EQ(j->FreeBlocks(), 998u);

  uint64_t w0 = mem.writes(), f0 = mem.flushes();
  auto s1 = CommitVersion(j.get(), {3000, 3001, 3500}, 1);
  ASSERT_TRUE(s1.ok()) << s1.status().ToString();
  EXPECT_EQ(mem.writes() - w0, 2u);  // DESC+data in one write, then COMMIT
  EXPECT_EQ(mem.flushes() - f0, 2u);
  // A transaction needing two descriptors, and a repeated home (the later copy wins).
  std::vector<uint64_t> big = Homes(2100, kDescEntries + 10);
  big.push_back(2100);
  std::vector<std::vector<uint8_t>> images;
  std::vector<JournalBlock> blocks;
  for (size_t i = 0; i < big.size(); i++) images.push_back(MakeBlock(big[i], i + 1 == big.size() ? 9 : 2));
  for (size_t i = 0; i < big.size(); i++) blocks.push_back({big[i], images[i].data()});
  auto s2 = j->Commit(blocks);
  ASSERT_TRUE(s2.ok()) << s2.status().ToString();
  EXPECT_EQ(*s2, *s1 + 1);
  auto s3 = CommitVersion(j.get(), {3001}, 3);
  ASSERT_TRUE(s3.ok());
  EXPECT_EQ(j->last_committed(), *s3);
  EXPECT_EQ(j->FreeBlocks(), 998u - 5 - Journal::BlocksNeeded(big.size()) - 3);
  EXPECT_EQ(VersionAt(&mem, 3000), 0u);  // the journal does not write home by itself

  // Crash (nothing unflushed) and recover with a new instance.
  mem.Crash();
  j.reset();
  j = Mount(&mem, g, &st);
  ASSERT_TRUE(j);
  EXPECT_EQ(st.transactions, 3u);
  EXPECT_EQ(st.blocks, 3u + big.size() + 1);
  EXPECT_EQ(st.last_seq, *s3);
  EXPECT_EQ(VersionAt(&mem, 3000), 1u);
  EXPECT_EQ(VersionAt(&mem, 3001), 3u);
  EXPECT_EQ(VersionAt(&mem, 3500), 1u);
  EXPECT_EQ(VersionAt(&mem, 2100), 9u);
  EXPECT_EQ(VersionAt(&mem, 2101), 2u);
  EXPECT_EQ(VersionAt(&mem, 2100 + kDescEntries + 9), 2u);
  EXPECT_GT(j->last_committed(), *s3);  // sequences keep increasing across mounts
  EXPECT_EQ(j->checkpointed(), j->last_committed());

  // The log is now empty: a second recovery replays nothing.
  j.reset();
  j = Mount(&mem, g, &st);
  ASSERT_TRUE(j);
  EXPECT_EQ(st.transactions, 0u);
  // Slot 1's journal was never touched.
  auto j1 = Mount(&mem, g, &st, 1);
  ASSERT_TRUE(j1);
  EXPECT_EQ(st.transactions, 0u);
}

TEST(JournalTest, RefusesMisuse) {
  Geometry g = MakeGeometry(64);
  MemDevice mem(kTotalBlocks * kBlockSize);
  ASSERT_TRUE(Journal::Format(&mem, g, TestUuid(), 0).ok());
  auto j = Journal::Open(&mem, g, TestUuid(), 0, 1);
  ASSERT_TRUE(j.ok());
  EXPECT_TRUE(CommitVersion(j->get(), {3000}, 1).status().Is(Code::kInvalid));  // no Replay
  ASSERT_TRUE((*j)->Replay().ok());
  EXPECT_TRUE((*j)->Replay().status().Is(Code::kInvalid));
  EXPECT_TRUE((*j)->Commit({}).status().Is(Code::kInvalid));
  EXPECT_TRUE(CommitVersion(j->get(), {g.JournalStart(0) + 5}, 1).status().Is(Code::kInvalid));
  EXPECT_TRUE(CommitVersion(j->get(), {kTotalBlocks - 1}, 1).status().Is(Code::kInvalid));
  EXPECT_TRUE(CommitVersion(j->get(), {kTotalBlocks + 9}, 1).status().Is(Code::kInvalid));
  EXPECT_TRUE((*j)->Checkpoint((*j)->last_committed() + 1).Is(Code::kInvalid));
  EXPECT_TRUE(Journal::Open(&mem, g, TestUuid(), 2, 1).status().Is(Code::kInvalid));
  Uuid other = TestUuid();
  other[0] ^= 1;
  EXPECT_TRUE(Journal::Open(&mem, g, other, 0, 1).status().Is(Code::kCorruption));
}

TEST(JournalTest, NoSpaceUntilCheckpoint) {
  Geometry g = MakeGeometry(22);  // 20 log blocks
  MemDevice mem(kTotalBlocks * kBlockSize);
  ASSERT_TRUE(Journal::Format(&mem, g, TestUuid(), 0).ok());
  auto j = Mount(&mem, g);
  ASSERT_TRUE(j);
  EXPECT_TRUE(CommitVersion(j.get(), Homes(3000, 19), 1).status().Is(Code::kInvalid));
  std::vector<uint64_t> seqs;
  for (int i = 0; i < 5; i++) {
    auto s = CommitVersion(j.get(), Homes(3000 + 10 * i, 2), 1);
    ASSERT_TRUE(s.ok()) << i << " " << s.status().ToString();
    seqs.push_back(*s);
  }
  EXPECT_EQ(j->FreeBlocks(), 0u);
  Status full = CommitVersion(j.get(), {3100}, 1).status();
  EXPECT_TRUE(full.Is(Code::kNoSpace)) << full.ToString();
  EXPECT_FALSE(j->failed());

  // A completely full log replays whole.
  {
    MemDevice copy(mem.DurableImage());
    ReplayStats st;
    ASSERT_TRUE(Mount(&copy, g, &st));
    EXPECT_EQ(st.transactions, 5u);
    EXPECT_EQ(VersionAt(&copy, 3041), 1u);
  }

  for (int i = 0; i < 2; i++) WriteHome(&mem, 3000 + i, 1);
  ASSERT_TRUE(mem.Flush().ok());
  ASSERT_TRUE(j->Checkpoint(seqs[0]).ok());
  EXPECT_EQ(j->checkpointed(), seqs[0]);
  EXPECT_EQ(j->FreeBlocks(), 4u);
  EXPECT_TRUE(CommitVersion(j.get(), Homes(3100, 3), 1).status().Is(Code::kNoSpace));
  auto s = CommitVersion(j.get(), Homes(3100, 2), 2);
  ASSERT_TRUE(s.ok()) << s.status().ToString();  // wraps to log index 0
  EXPECT_TRUE(j->Checkpoint(seqs[0]).ok());       // already checkpointed: no-op
  EXPECT_EQ(j->FreeBlocks(), 0u);

  mem.Crash();
  ReplayStats st;
  j = Mount(&mem, g, &st);
  ASSERT_TRUE(j);
  EXPECT_EQ(st.transactions, 5u);  // seqs[1..4] and the wrapped one
  EXPECT_EQ(VersionAt(&mem, 3101), 2u);
}

TEST(JournalTest, WrapsTheLogManyTimesWithCheckpointsAndCrashes) {
  Geometry g = MakeGeometry(2 + 50);
  MemDevice mem(kTotalBlocks * kBlockSize);
  ASSERT_TRUE(Journal::Format(&mem, g, TestUuid(), 0).ok());
  auto j = Mount(&mem, g);
  ASSERT_TRUE(j);
  std::mt19937_64 rng(1234);
  std::map<uint64_t, uint64_t> committed;  // home -> latest committed version
  struct Pending {
    uint64_t seq;
    std::vector<uint64_t> homes;
    uint64_t version;
  };
  std::vector<Pending> pending;  // committed, not yet checkpointed
  uint64_t log_blocks_written = 0;
  auto checkpoint_through = [&](size_t n) {
    for (size_t i = 0; i < n; i++) {
      for (uint64_t h : pending[i].homes) WriteHome(&mem, h, pending[i].version);
    }
    ASSERT_TRUE(mem.Flush().ok());
    ASSERT_TRUE(j->Checkpoint(pending[n - 1].seq).ok());
    pending.erase(pending.begin(), pending.begin() + n);
  };
  for (uint64_t version = 1; version <= 400; version++) {
    std::vector<uint64_t> homes;
    size_t n = 1 + rng() % 7;
    for (size_t i = 0; i < n; i++) homes.push_back(kDataStart + rng() % 40);
    if (Journal::BlocksNeeded(n) > j->FreeBlocks()) {
      ASSERT_FALSE(pending.empty());
      checkpoint_through(1 + rng() % pending.size());
      if (Journal::BlocksNeeded(n) > j->FreeBlocks()) checkpoint_through(pending.size());
    }
    auto s = CommitVersion(j.get(), homes, version);
    ASSERT_TRUE(s.ok()) << version << " " << s.status().ToString();
    log_blocks_written += Journal::BlocksNeeded(n);
    for (uint64_t h : homes) committed[h] = version;
    pending.push_back({*s, homes, version});
    if (rng() % 25 == 0) {  // power cut, then recovery
      mem.Crash();
      j.reset();
      j = Mount(&mem, g);
      ASSERT_TRUE(j);
      pending.clear();
      for (auto [h, v] : committed) ASSERT_EQ(VersionAt(&mem, h), v) << "home " << h;
    }
  }
  EXPECT_GT(log_blocks_written, 5u * j->Capacity());
  mem.Crash();
  j = Mount(&mem, g);
  ASSERT_TRUE(j);
  for (auto [h, v] : committed) EXPECT_EQ(VersionAt(&mem, h), v) << "home " << h;
}

// Power cut at every write and flush of a commit whose log run wraps and which has two
// descriptors: the transaction is replayed whole or not at all.
TEST(JournalTest, CrashAtEveryPointOfACommitIsAllOrNothing) {
  Geometry g = MakeGeometry(2 + 600);
  const size_t n = kDescEntries + 6;
  const std::vector<uint64_t> homes = Homes(kDataStart + 100, n);
  std::vector<uint8_t> baseline;
  {
    MemDevice mem(kTotalBlocks * kBlockSize);
    ASSERT_TRUE(Journal::Format(&mem, g, TestUuid(), 0).ok());
    for (uint64_t h : homes) WriteHome(&mem, h, 1);
    ASSERT_TRUE(mem.Flush().ok());
    auto j = Mount(&mem, g);
    ASSERT_TRUE(j);
    auto s = CommitVersion(j.get(), Homes(kDataStart, 400 - 2), 1);  // head to index 400
    ASSERT_TRUE(s.ok());
    ASSERT_TRUE(j->Checkpoint(*s).ok());
    baseline = mem.DurableImage();
  }
  // How many writes the commit takes: the body goes out in staging-buffer pieces and
  // wraps at the end of the log, then the COMMIT block.
  uint64_t total_writes = 0;
  {
    MemDevice mem(baseline);
    FaultDevice fault(&mem);
    auto j = Mount(&fault, g);
    ASSERT_TRUE(j);
    uint64_t w0 = fault.writes();
    ASSERT_TRUE(CommitVersion(j.get(), homes, 2).ok());
    total_writes = fault.writes() - w0;
  }
  ASSERT_GE(total_writes, 3u);  // two wrapped runs at least, + COMMIT
  int applied = 0, discarded = 0;
  auto run = [&](IoKind kind, uint64_t after, int torn_seed) {
    SCOPED_TRACE(testing::Message() << IoKindName(kind) << " after " << after << " torn "
                                    << torn_seed);
    MemDevice mem(baseline);
    FaultDevice fault(&mem);
    auto j = Mount(&fault, g);
    ASSERT_TRUE(j);
    uint64_t w0 = fault.writes();
    fault.GoneAfter(kind, after);
    auto s = CommitVersion(j.get(), homes, 2);
    if (!s.ok()) {
      EXPECT_TRUE(s.status().Is(Code::kIOError));
    }
    if (kind == IoKind::kWrite && after >= total_writes) {
      EXPECT_TRUE(s.ok());
      EXPECT_EQ(fault.writes() - w0, total_writes);
    }
    if (torn_seed) {
      mem.CrashTorn(torn_seed);
    } else {
      mem.Crash();
    }
    ReplayStats st;
    auto j2 = Mount(&mem, g, &st);
    ASSERT_TRUE(j2);
    uint64_t v0 = VersionAt(&mem, homes[0]);
    ASSERT_TRUE(v0 == 1 || v0 == 2) << v0;
    for (uint64_t h : homes) ASSERT_EQ(VersionAt(&mem, h), v0) << "home " << h;
    if (s.ok()) {
      EXPECT_EQ(v0, 2u);
    }
    EXPECT_EQ(st.transactions, v0 == 2 ? 1u : 0u);
    (v0 == 2 ? applied : discarded)++;
  };
  for (uint64_t k = 0; k <= total_writes; k++) run(IoKind::kWrite, k, 0);
  for (uint64_t k = 0; k <= 2; k++) run(IoKind::kFlush, k, 0);
  for (int seed = 1; seed <= 6; seed++) {
    for (uint64_t k = 0; k < total_writes; k++) run(IoKind::kWrite, k, seed);
    for (uint64_t k = 0; k <= 1; k++) run(IoKind::kFlush, k, seed);
  }
  EXPECT_GT(applied, 0);
  EXPECT_GT(discarded, 0);
}

// Three transactions of 2 data blocks each at log indexes 0-3, 4-7, 8-11.
class DamageTest : public testing::Test {
 protected:
  void SetUp() override {
    g_ = MakeGeometry(64);
    MemDevice mem(kTotalBlocks * kBlockSize);
    ASSERT_TRUE(Journal::Format(&mem, g_, TestUuid(), 0).ok());
    auto j = Mount(&mem, g_);
    ASSERT_TRUE(j);
    for (uint64_t t = 1; t <= 3; t++) ASSERT_TRUE(CommitVersion(j.get(), Homes(3000 + 10 * t, 2), t).ok());
    image_ = mem.DurableImage();
  }
  // Damages a byte of log block `pos`, replays, returns how many transactions landed.
  uint64_t ReplayWithFlip(uint32_t pos, size_t byte, MemDevice* mem) {
    FlipBit(mem, LogBlock(g_, pos), byte);
    ReplayStats st;
    EXPECT_TRUE(Mount(mem, g_, &st));
    const uint32_t txn_start = pos / 4 * 4;
    EXPECT_NE(st.stop_reason.find("at log index " + std::to_string(txn_start) + ":"),
              std::string::npos)
        << st.stop_reason;
    for (uint64_t t = 1; t <= 3; t++) {
      uint64_t want = t <= st.transactions ? t : 0;
      EXPECT_EQ(VersionAt(mem, 3000 + 10 * t), want) << t;
      EXPECT_EQ(VersionAt(mem, 3001 + 10 * t), want) << t;
    }
    return st.transactions;
  }
  Geometry g_;
  std::vector<uint8_t> image_;
};

TEST_F(DamageTest, FlippedBitInDataStopsReplayThere) {
  MemDevice mem(image_);
  EXPECT_EQ(ReplayWithFlip(6, 2000, &mem), 1u);
}

TEST_F(DamageTest, FlippedBitInDescriptorStopsReplayThere) {
  MemDevice a(image_);
  EXPECT_EQ(ReplayWithFlip(4, 60, &a), 1u);  // a home address
  MemDevice b(image_);
  EXPECT_EQ(ReplayWithFlip(4, 3000, &b), 1u);  // unused tail of the block
}

TEST_F(DamageTest, FlippedBitInCommitStopsReplayThere) {
  MemDevice a(image_);
  EXPECT_EQ(ReplayWithFlip(7, 64, &a), 1u);  // body hash
  MemDevice b(image_);
  EXPECT_EQ(ReplayWithFlip(11, 100, &b), 2u);  // last transaction only
}

// After replay stopped at a damaged transaction, the transactions stranded behind it
// must never be replayed later, even when new commits line up with them exactly.
TEST_F(DamageTest, StrandedTransactionIsNeverResurrected) {
  MemDevice mem(image_);
  ASSERT_EQ(ReplayWithFlip(5, 100, &mem), 1u);
  auto j = Mount(&mem, g_);
  ASSERT_TRUE(j);
  ASSERT_TRUE(CommitVersion(j.get(), Homes(3500, 2), 9).ok());  // same size as seq 2
  mem.Crash();
  ReplayStats st;
  ASSERT_TRUE(Mount(&mem, g_, &st));
  EXPECT_EQ(st.transactions, 1u);
  EXPECT_EQ(VersionAt(&mem, 3500), 9u);
  EXPECT_EQ(VersionAt(&mem, 3030), 0u);  // the stranded third transaction
}

TEST(JournalTest, StaleTransactionFromEarlierLapIsNotReplayed) {
  Geometry g = MakeGeometry(22);  // 20 log blocks: five 4-block transactions per lap
  MemDevice mem(kTotalBlocks * kBlockSize);
  ASSERT_TRUE(Journal::Format(&mem, g, TestUuid(), 0).ok());
  auto j = Mount(&mem, g);
  ASSERT_TRUE(j);
  for (uint64_t t = 1; t <= 5; t++) {  // lap 1, each written home and checkpointed
    auto s = CommitVersion(j.get(), Homes(3000 + 10 * t, 2), t);
    ASSERT_TRUE(s.ok());
    for (uint64_t h : Homes(3000 + 10 * t, 2)) WriteHome(&mem, h, t);
    ASSERT_TRUE(mem.Flush().ok());
    ASSERT_TRUE(j->Checkpoint(*s).ok());
  }
  // The filesystem later rewrites lap-1 homes directly (after their checkpoint).
  for (uint64_t h : Homes(3030, 2)) WriteHome(&mem, h, 50);
  ASSERT_TRUE(mem.Flush().ok());
  // Lap 2: two transactions at log indexes 0-3 and 4-7; index 8 still holds the
  // complete lap-1 transaction that wrote homes 3030/3031.
  ASSERT_TRUE(CommitVersion(j.get(), Homes(3100, 2), 60).ok());
  ASSERT_TRUE(CommitVersion(j.get(), Homes(3110, 2), 61).ok());
  mem.Crash();
  ReplayStats st;
  ASSERT_TRUE(Mount(&mem, g, &st));
  EXPECT_EQ(st.transactions, 2u);
  EXPECT_NE(st.stop_reason.find("at log index 8:"), std::string::npos) << st.stop_reason;
  EXPECT_EQ(VersionAt(&mem, 3100), 60u);
  EXPECT_EQ(VersionAt(&mem, 3111), 61u);
  EXPECT_EQ(VersionAt(&mem, 3030), 50u);
  EXPECT_EQ(VersionAt(&mem, 3031), 50u);
}

TEST(JournalTest, TornHeaderCopyStillOpens) {
  Geometry g = MakeGeometry(64);
  MemDevice mem(kTotalBlocks * kBlockSize);
  ASSERT_TRUE(Journal::Format(&mem, g, TestUuid(), 0).ok());
  auto j = Mount(&mem, g);  // header update 2 -> copy 0
  ASSERT_TRUE(j);
  auto s1 = CommitVersion(j.get(), Homes(3000, 2), 1);
  ASSERT_TRUE(s1.ok());
  for (uint64_t h : Homes(3000, 2)) WriteHome(&mem, h, 1);
  ASSERT_TRUE(mem.Flush().ok());
  ASSERT_TRUE(j->Checkpoint(*s1).ok());  // update 3 -> copy 1
  ASSERT_TRUE(CommitVersion(j.get(), Homes(3010, 2), 2).ok());
  j.reset();

  // The newest copy (block 1) is torn: the older copy's tail still covers everything.
  FlipBit(&mem, g.JournalStart(0) + 1, 700);
  ReplayStats st;
  j = Mount(&mem, g, &st);
  ASSERT_TRUE(j);
  EXPECT_EQ(st.transactions, 2u);  // the checkpointed one again, harmlessly
  EXPECT_EQ(VersionAt(&mem, 3001), 1u);
  EXPECT_EQ(VersionAt(&mem, 3011), 2u);
  j.reset();

  FlipBit(&mem, g.JournalStart(0) + 0, 900);
  FlipBit(&mem, g.JournalStart(0) + 1, 900);
  auto bad = Journal::Open(&mem, g, TestUuid(), 0, 1);
  ASSERT_FALSE(bad.ok());
  EXPECT_TRUE(bad.status().Is(Code::kCorruption));
  EXPECT_NE(bad.status().message().find("slot 0"), std::string::npos) << bad.status().ToString();
}

TEST(JournalTest, WriteErrorStopsTheJournal) {
  Geometry g = MakeGeometry(64);
  MemDevice mem(kTotalBlocks * kBlockSize);
  ASSERT_TRUE(Journal::Format(&mem, g, TestUuid(), 0).ok());
  FaultDevice fault(&mem);
  auto j = Mount(&fault, g);
  ASSERT_TRUE(j);
  auto ok = CommitVersion(j.get(), Homes(3000, 2), 1);
  ASSERT_TRUE(ok.ok());
  fault.FailNth(IoKind::kWrite, 1);
  Status s = CommitVersion(j.get(), Homes(3010, 2), 2).status();
  EXPECT_TRUE(s.Is(Code::kIOError)) << s.ToString();
  EXPECT_NE(s.message().find("injected"), std::string::npos);
  EXPECT_TRUE(j->failed());
  uint64_t w = fault.writes();
  EXPECT_TRUE(CommitVersion(j.get(), Homes(3020, 1), 3).status().Is(Code::kIOError));
  EXPECT_TRUE(j->Checkpoint(*ok).Is(Code::kIOError));
  EXPECT_EQ(fault.writes(), w);  // refused without touching the device

  // A failed flush is as fatal.
  MemDevice mem2(kTotalBlocks * kBlockSize);
  ASSERT_TRUE(Journal::Format(&mem2, g, TestUuid(), 0).ok());
  FaultDevice fault2(&mem2);
  auto j2 = Mount(&fault2, g);
  ASSERT_TRUE(j2);
  fault2.FailNth(IoKind::kFlush, 2);
  EXPECT_TRUE(CommitVersion(j2.get(), Homes(3000, 1), 1).status().Is(Code::kIOError));
  EXPECT_TRUE(CommitVersion(j2.get(), Homes(3000, 1), 1).status().Is(Code::kIOError));

  // A failed header write during Checkpoint too, and the space stays reserved.
  MemDevice mem3(kTotalBlocks * kBlockSize);
  ASSERT_TRUE(Journal::Format(&mem3, g, TestUuid(), 0).ok());
  FaultDevice fault3(&mem3);
  auto j3 = Mount(&fault3, g);
  ASSERT_TRUE(j3);
  auto s3 = CommitVersion(j3.get(), Homes(3000, 1), 1);
  ASSERT_TRUE(s3.ok());
  uint32_t free_before = j3->FreeBlocks();
  fault3.FailRange(g.JournalStart(0) * kBlockSize, 2 * kBlockSize, false, true);
  EXPECT_TRUE(j3->Checkpoint(*s3).Is(Code::kIOError));
  EXPECT_EQ(j3->FreeBlocks(), free_before);
  EXPECT_EQ(j3->checkpointed() + 1, *s3);
}

TEST(JournalTest, ReplayRefusesHomeOutsideTheDataArea) {
  Geometry g = MakeGeometry(64);
  MemDevice mem(kTotalBlocks * kBlockSize);
  ASSERT_TRUE(Journal::Format(&mem, g, TestUuid(), 0).ok());
  ASSERT_TRUE(Journal::Format(&mem, g, TestUuid(), 1).ok());
  // A node with a wrong idea of the layout journals a block inside slot 1's journal.
  Geometry lax = g;
  lax.ag_start = g.JournalStart(1);
  const uint64_t target = g.JournalStart(1) + 5;
  {
    auto j = Mount(&mem, lax);
    ASSERT_TRUE(j);
    ASSERT_TRUE(CommitVersion(j.get(), {3000}, 1).ok());
    ASSERT_TRUE(CommitVersion(j.get(), {3001, target}, 1).ok());
  }
  auto j = Journal::Open(&mem, g, TestUuid(), 0, 1);
  ASSERT_TRUE(j.ok());
  auto st = (*j)->Replay();
  ASSERT_FALSE(st.ok());
  EXPECT_TRUE(st.status().Is(Code::kCorruption)) << st.status().ToString();
  EXPECT_NE(st.status().message().find(std::to_string(target)), std::string::npos);
  EXPECT_EQ(VersionAt(&mem, target), 0u);
  EXPECT_EQ(VersionAt(&mem, 3001), 0u);  // nothing of that transaction was written
  EXPECT_EQ(VersionAt(&mem, 3000), 1u);  // the earlier one was
  EXPECT_TRUE(CommitVersion(j->get(), {3002}, 1).status().Is(Code::kInvalid));
}

}  // namespace
}  // namespace agorafs
