#include "extent/extent.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <set>

#include "cache/test_meta_txn.h"

namespace agorafs::extent {
namespace {

constexpr uint64_t kIno = 7;

// Records what is freed (data vs. extent node) and can refuse node allocations.
class RecTxn : public TestMetaTxn {
 public:
  using TestMetaTxn::TestMetaTxn;
  Status Free(uint64_t blk, uint64_t count) override {
    for (uint64_t b = blk; b < blk + count; b++) {
      if (blocks().count(b)) {
        node_frees.push_back(b);
      } else {
        data_frees.push_back(b);
      }
    }
    return TestMetaTxn::Free(blk, count);
  }
  Result<std::pair<uint64_t, uint8_t*>> NewBlock(BlockType type, LockId lock,
                                                 uint64_t hint) override {
    if (fail_new_block) return Err(Code::kNoSpace, "test: no node blocks");
    return TestMetaTxn::NewBlock(type, lock, hint);
  }
  std::vector<uint64_t> node_frees, data_frees;
  bool fail_new_block = false;
};

struct Blk {
  uint64_t phys;
  bool unwritten;
  bool operator==(const Blk&) const = default;
};
using Model = std::map<uint64_t, Blk>;

class ExtentTest : public ::testing::Test {
 protected:
  ExtentTest() : txn_(1000, 1u << 21), ino_(std::make_unique<InodeBlock>()) {
    std::memset(ino_.get(), 0, sizeof(InodeBlock));
    InitHeader(reinterpret_cast<uint8_t*>(ino_.get()), BlockType::kInode, kIno, txn_.uuid());
    InitRoot(ino_.get());
  }

  // Maps [l, l+c) completely, checking every answer against the model.
  void Map(uint64_t l, uint32_t c, bool unwritten) {
    uint64_t cur = l;
    while (cur < l + c) {
      auto r = MapOrAllocate(txn_, kIno, ino_.get(), cur, uint32_t(l + c - cur), unwritten, 0);
      ASSERT_TRUE(r.ok()) << r.status().ToString();
      const Mapping& m = r->m;
      ASSERT_EQ(m.logical, cur);
      ASSERT_GT(m.len, 0u);
      ASSERT_NE(m.physical, 0u);
      const uint64_t n = std::min<uint64_t>(m.len, l + c - cur);
      if (r->fresh) {
        ASSERT_LE(m.len, l + c - cur);
        ASSERT_EQ(m.flags, unwritten ? uint32_t(kExtentUnwritten) : 0u);
        for (uint64_t i = 0; i < n; i++) {
          ASSERT_EQ(model_.count(cur + i), 0u) << cur + i;
          model_[cur + i] = Blk{m.physical + i, unwritten};
        }
      } else {
        for (uint64_t i = 0; i < n; i++) {
          auto it = model_.find(cur + i);
          ASSERT_NE(it, model_.end()) << cur + i;
          ASSERT_EQ(it->second, (Blk{m.physical + i, (m.flags & kExtentUnwritten) != 0}));
        }
      }
      cur += n;
    }
  }

  void PunchModel(uint64_t l, uint64_t end, std::vector<uint64_t>* expect) {
    for (auto it = model_.lower_bound(l); it != model_.end() && it->first < end;) {
      expect->push_back(it->second.phys);
      it = model_.erase(it);
    }
  }

  // Punches [l, l+c) and checks that exactly the model's blocks were freed, once each.
  void DoPunch(uint64_t l, uint64_t c) {
    const uint64_t end = c >= kMaxFileBlocks - l ? kMaxFileBlocks : l + c;
    std::vector<uint64_t> expect;
    PunchModel(l, end, &expect);
    auto nodes_before = Nodes();
    txn_.data_frees.clear();
    txn_.node_frees.clear();
    Status s = Punch(txn_, kIno, ino_.get(), l, c);
    ASSERT_TRUE(s.ok()) << s.ToString();
    std::sort(expect.begin(), expect.end());
    std::vector<uint64_t> got = txn_.data_frees;
    std::sort(got.begin(), got.end());
    ASSERT_EQ(got, expect);
    std::set<uint64_t> before(nodes_before.begin(), nodes_before.end());
    for (uint64_t b : txn_.node_frees) ASSERT_TRUE(before.count(b)) << b;
  }

  std::vector<uint64_t> Nodes() {
    std::vector<uint64_t> nodes;
    Status s = ForEach(
        txn_, kIno, *ino_, [](const Extent&) { return true; }, &nodes);
    EXPECT_TRUE(s.ok()) << s.ToString();
    return nodes;
  }

  std::vector<Extent> Extents() {
    std::vector<Extent> v;
    Status s = ForEach(txn_, kIno, *ino_, [&](const Extent& e) {
      v.push_back(e);
      return true;
    });
    EXPECT_TRUE(s.ok()) << s.ToString();
    return v;
  }

  // Raw structural check of the on-disk tree: depths, non-empty nodes, exact keys.
  // Returns the smallest logical block under the node.
  uint64_t CheckNode(const uint8_t* entries, const ExtentNodeHeader& h, bool root, size_t* n) {
    const uint64_t owner = h.owner;
    const size_t max = h.max, count = h.count;
    EXPECT_EQ(owner, kIno);
    EXPECT_EQ(max, root ? (h.depth ? kExtentRootIndexMax : kExtentRootLeafMax)
                        : (h.depth ? kExtentNodeIndexMax : kExtentNodeLeafMax));
    if (!root) {
      EXPECT_GT(count, 0u);
    }
    if (h.depth == 0) {
      if (h.count == 0) return UINT64_MAX;
      Extent e;
      std::memcpy(&e, entries, sizeof(e));
      return e.logical;
    }
    uint64_t first = UINT64_MAX;
    for (size_t i = 0; i < h.count; i++) {
      ExtentIndex x;
      std::memcpy(&x, entries + i * sizeof(x), sizeof(x));
      auto it = txn_.blocks().find(x.child);
      EXPECT_NE(it, txn_.blocks().end());
      if (it == txn_.blocks().end()) return 0;
      EXPECT_EQ(txn_.locks().at(x.child), InodeLock(kIno));
      ExtentNodeHeader ch;
      std::memcpy(&ch, it->second.data() + sizeof(BlockHeader), sizeof(ch));
      EXPECT_EQ(unsigned(ch.depth) + 1, unsigned(h.depth));
      (*n)++;
      uint64_t k = CheckNode(it->second.data() + sizeof(BlockHeader) + sizeof(ch), ch, false, n);
      EXPECT_EQ(k, x.logical) << "index key of child " << x.child;
      if (i == 0) first = k;
    }
    return first;
  }

  // Full comparison of tree and model, plus block accounting.
  void Verify() {
    ExtentNodeHeader h;
    std::memcpy(&h, ino_->data, sizeof(h));
    size_t raw_nodes = 0;
    CheckNode(ino_->data + sizeof(h), h, true, &raw_nodes);

    std::vector<uint64_t> nodes;
    Model got;
    uint64_t prev_end = 0;
    Status s = ForEach(
        txn_, kIno, *ino_,
        [&](const Extent& e) {
          EXPECT_GE(e.logical, prev_end);
          prev_end = e.logical + e.len;
          for (uint64_t i = 0; i < e.len; i++) {
            got[e.logical + i] = Blk{e.physical + i, (e.flags & kExtentUnwritten) != 0};
          }
          return true;
        },
        &nodes);
    ASSERT_TRUE(s.ok()) << s.ToString();
    ASSERT_EQ(nodes.size(), raw_nodes);
    ASSERT_TRUE(got == model_) << "tree has " << got.size() << " blocks, model " << model_.size();
    EXPECT_EQ(ino_->blocks, model_.size() + nodes.size());
    EXPECT_EQ(txn_.used_blocks(), model_.size() + nodes.size());
  }

  // Lookup and NextData at lblk against the model.
  void Probe(uint64_t lblk) {
    auto r = Lookup(txn_, kIno, *ino_, lblk);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    auto it = model_.lower_bound(lblk);
    if (it != model_.end() && it->first == lblk) {
      ASSERT_EQ(r->physical, it->second.phys) << lblk;
      ASSERT_EQ((r->flags & kExtentUnwritten) != 0, it->second.unwritten);
      for (uint64_t i = 0; i < r->len; i++) {
        auto jt = model_.find(lblk + i);
        ASSERT_NE(jt, model_.end());
        ASSERT_EQ(jt->second.phys, r->physical + i);
      }
    } else {
      ASSERT_EQ(r->physical, 0u);
      uint64_t next = it == model_.end() ? kMaxFileBlocks : it->first;
      ASSERT_EQ(r->len, std::min<uint64_t>(next - lblk, UINT32_MAX)) << lblk;
    }
    for (bool skip : {false, true}) {
      auto d = NextData(txn_, kIno, *ino_, lblk, skip);
      ASSERT_TRUE(d.ok()) << d.status().ToString();
      auto jt = model_.lower_bound(lblk);
      while (skip && jt != model_.end() && jt->second.unwritten) ++jt;
      if (jt == model_.end()) {
        ASSERT_FALSE(d->has_value()) << lblk;
      } else {
        ASSERT_TRUE(d->has_value()) << lblk;
        ASSERT_EQ((*d)->logical, jt->first);
        ASSERT_EQ((*d)->physical, jt->second.phys);
      }
    }
  }

  RecTxn txn_;
  std::unique_ptr<InodeBlock> ino_;
  Model model_;
};

TEST_F(ExtentTest, EmptyTree) {
  auto r = Lookup(txn_, kIno, *ino_, 0);
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(r->hole());
  EXPECT_EQ(r->len, UINT32_MAX);
  auto d = NextData(txn_, kIno, *ino_, 0);
  ASSERT_TRUE(d.ok());
  EXPECT_FALSE(d->has_value());
  EXPECT_TRUE(Extents().empty());
  EXPECT_TRUE(Punch(txn_, kIno, ino_.get(), 0, UINT64_MAX).ok());
  EXPECT_TRUE(MarkWritten(txn_, kIno, ino_.get(), 0, 100).ok());
  EXPECT_EQ(Depth(*ino_), 0);
  EXPECT_TRUE(Lookup(txn_, kIno, *ino_, kMaxFileBlocks).status().Is(Code::kTooBig));
  EXPECT_TRUE(MapOrAllocate(txn_, kIno, ino_.get(), kMaxFileBlocks, 1, false, 0)
                  .status()
                  .Is(Code::kTooBig));
  EXPECT_TRUE(MapOrAllocate(txn_, kIno, ino_.get(), 0, 0, false, 0).status().Is(Code::kInvalid));
  InodeBlock other = *ino_;
  other.data_kind = uint8_t(DataKind::kInline);
  EXPECT_TRUE(Lookup(txn_, kIno, other, 0).status().Is(Code::kInvalid));
}

TEST_F(ExtentTest, SequentialAppendsMerge) {
  for (uint64_t l = 0; l < 4096; l += 8) Map(l, 8, false);
  auto ext = Extents();
  ASSERT_EQ(ext.size(), 1u);
  EXPECT_EQ(ext[0].logical, 0u);
  EXPECT_EQ(ext[0].len, 4096u);
  // A big request is served in one call when the allocator can.
  auto r = MapOrAllocate(txn_, kIno, ino_.get(), 4096, 100000, false, 0);
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(r->fresh);
  EXPECT_EQ(r->m.len, 100000u);
  for (uint64_t i = 0; i < r->m.len; i++) model_[4096 + i] = Blk{r->m.physical + i, false};
  EXPECT_EQ(Extents().size(), 1u);
  // Mapping an already mapped block returns the existing mapping.
  r = MapOrAllocate(txn_, kIno, ino_.get(), 10, 1, false, 0);
  ASSERT_TRUE(r.ok());
  EXPECT_FALSE(r->fresh);
  EXPECT_EQ(r->m.physical, model_[10].phys);
  EXPECT_EQ(r->m.len, 4096u + 100000u - 10u);
  txn_.Commit();
  Verify();
}

TEST_F(ExtentTest, FragmentedAppendsFillLeaves) {
  // Every other block: nothing merges; appends split leaves unevenly (full left).
  const uint64_t n = 20000;
  for (uint64_t i = 0; i < n; i++) {
    Map(2 * i, 1, false);
    if (i % 5000 == 0) txn_.Commit();
  }
  txn_.Commit();
  Verify();
  EXPECT_EQ(Extents().size(), n);
  // Appended leaves are full: close to n / kExtentNodeLeafMax leaves.
  const size_t nodes = Nodes().size();
  EXPECT_LE(nodes, n / kExtentNodeLeafMax + 3);
  EXPECT_GE(Depth(*ino_), 1);
}

TEST_F(ExtentTest, RandomSingleBlockWritesBuildDeepTree) {
  std::mt19937_64 rng(42);
  const uint64_t span = 120000;
  const int writes = 45000;
  for (int i = 0; i < writes; i++) {
    uint64_t l = 2 * (rng() % span);
    Map(l, 1, rng() % 4 == 0);
    if (HasFatalFailure()) return;
    if (i % 3000 == 0) {
      txn_.Commit();
      Verify();
      for (int k = 0; k < 50; k++) Probe(rng() % (2 * span + 10));
      if (HasFatalFailure()) return;
    }
  }
  txn_.Commit();
  Verify();
  EXPECT_GE(Depth(*ino_), 2);
  EXPECT_GT(Extents().size(), 30000u);
  for (int k = 0; k < 500; k++) Probe(rng() % (2 * span + 10));
  Probe(2 * span + 100);

  // Punch everything: the height collapses and every block comes back.
  DoPunch(0, UINT64_MAX);
  txn_.Commit();
  Verify();
  EXPECT_EQ(Depth(*ino_), 0);
  EXPECT_EQ(txn_.used_blocks(), 0u);
  EXPECT_EQ(ino_->blocks, 0u);
}

TEST_F(ExtentTest, RandomWritesPunchesAndMarkWritten) {
  std::mt19937_64 rng(7);
  const uint64_t span = 200000;
  for (int step = 0; step < 30000; step++) {
    int op = int(rng() % 10);
    uint64_t l = rng() % span;
    if (op < 6) {
      Map(l, uint32_t(1 + rng() % 16), rng() % 3 == 0);
    } else if (op < 8) {
      uint64_t c = rng() % 3 == 0 ? 1 + rng() % 5000 : 1 + rng() % 20;
      DoPunch(l, c);
    } else {
      uint64_t c = 1 + rng() % 40;
      ASSERT_TRUE(MarkWritten(txn_, kIno, ino_.get(), l, c).ok());
      for (auto it = model_.lower_bound(l); it != model_.end() && it->first < l + c; ++it) {
        it->second.unwritten = false;
      }
    }
    if (HasFatalFailure()) return;
    if (step % 2000 == 0) {
      txn_.Commit();
      Verify();
      for (int k = 0; k < 30; k++) Probe(rng() % (span + 100));
      if (HasFatalFailure()) return;
    }
  }
  txn_.Commit();
  Verify();
  // Punch to the end from the middle, then everything.
  DoPunch(span / 2, UINT64_MAX);
  Verify();
  for (int k = 0; k < 100; k++) Probe(rng() % span);
  DoPunch(0, UINT64_MAX);
  txn_.Commit();
  Verify();
  EXPECT_EQ(Depth(*ino_), 0);
  EXPECT_EQ(txn_.used_blocks(), 0u);
}

TEST_F(ExtentTest, PunchInsideAndAcrossExtents) {
  Map(0, 1000, false);
  ASSERT_EQ(Extents().size(), 1u);
  DoPunch(100, 10);  // inside one extent: splits it
  auto ext = Extents();
  ASSERT_EQ(ext.size(), 2u);
  EXPECT_EQ(ext[0].len, 100u);
  EXPECT_EQ(ext[1].logical, 110u);
  EXPECT_EQ(ext[1].physical, model_[110].phys);
  DoPunch(50, 100);   // across the hole and both extents' edges
  DoPunch(990, 10);   // the tail
  DoPunch(5000, 10);  // nothing there
  txn_.Commit();
  Verify();
  for (uint64_t l : {0, 49, 50, 149, 150, 989, 990, 5000}) Probe(l);
  DoPunch(0, UINT64_MAX);
  Verify();
  EXPECT_EQ(txn_.used_blocks(), 0u);
}

TEST_F(ExtentTest, PunchStepRespectsBudget) {
  std::mt19937_64 rng(3);
  for (int i = 0; i < 6000; i++) Map(rng() % 50000, uint32_t(1 + rng() % 8), false);
  txn_.Commit();
  Verify();
  ASSERT_GE(Depth(*ino_), 1);
  const uint64_t start = 1234, end = 40000;
  uint64_t cur = start;
  int steps = 0;
  while (cur < end) {
    txn_.data_frees.clear();
    txn_.node_frees.clear();
    PunchBudget budget{7, 3};
    auto r = PunchStep(txn_, kIno, ino_.get(), cur, end - cur, budget);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    ASSERT_GT(*r, cur);
    ASSERT_LE(*r, end);
    EXPECT_LE(txn_.data_frees.size(), 7u);
    EXPECT_LE(txn_.node_frees.size(), size_t(kMaxNodeFreesPerUpdate));
    std::vector<uint64_t> expect;
    PunchModel(cur, *r, &expect);
    std::sort(expect.begin(), expect.end());
    std::sort(txn_.data_frees.begin(), txn_.data_frees.end());
    ASSERT_EQ(txn_.data_frees, expect);
    cur = *r;
    if (++steps % 500 == 0) {
      txn_.Commit();
      Verify();
    }
  }
  txn_.Commit();
  Verify();
  EXPECT_TRUE(
      PunchStep(txn_, kIno, ino_.get(), 0, 1, PunchBudget{0, 1}).status().Is(Code::kInvalid));

  // Calling again with the same start (a truncate loop) also finishes: every call
  // that does not return the end frees something.
  const uint64_t from = 20001;
  std::vector<uint64_t> expect;
  PunchModel(from, kMaxFileBlocks, &expect);
  txn_.data_frees.clear();
  int calls = 0;
  while (true) {
    ASSERT_LT(++calls, 100000);
    const size_t before = txn_.data_frees.size();
    auto r = PunchStep(txn_, kIno, ino_.get(), from, UINT64_MAX, PunchBudget{50, 10});
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    if (*r == kMaxFileBlocks) break;
    ASSERT_GT(txn_.data_frees.size(), before);
    if (calls % 100 == 0) txn_.Commit();
  }
  std::sort(expect.begin(), expect.end());
  std::sort(txn_.data_frees.begin(), txn_.data_frees.end());
  EXPECT_EQ(txn_.data_frees, expect);
  auto again = PunchStep(txn_, kIno, ino_.get(), from, UINT64_MAX, PunchBudget{50, 10});
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, kMaxFileBlocks);
  txn_.Commit();
  Verify();
}

TEST_F(ExtentTest, UnwrittenAndMarkWritten) {
  auto r = MapOrAllocate(txn_, kIno, ino_.get(), 0, 100, true, 0);
  ASSERT_TRUE(r.ok());
  ASSERT_EQ(r->m.len, 100u);
  EXPECT_EQ(r->m.flags, uint32_t(kExtentUnwritten));
  const uint64_t p = r->m.physical;
  for (uint64_t i = 0; i < 100; i++) model_[i] = Blk{p + i, true};
  // Appending written blocks does not merge with an unwritten extent.
  Map(100, 10, false);
  ASSERT_EQ(Extents().size(), 2u);

  ASSERT_TRUE(MarkWritten(txn_, kIno, ino_.get(), 10, 5).ok());
  for (uint64_t i = 10; i < 15; i++) model_[i].unwritten = false;
  auto ext = Extents();
  ASSERT_EQ(ext.size(), 4u);
  EXPECT_EQ(ext[0].logical, 0u);
  EXPECT_EQ(ext[0].len, 10u);
  EXPECT_EQ(ext[0].flags, uint32_t(kExtentUnwritten));
  EXPECT_EQ(ext[1].logical, 10u);
  EXPECT_EQ(ext[1].len, 5u);
  EXPECT_EQ(ext[1].flags, 0u);
  EXPECT_EQ(ext[1].physical, p + 10);
  EXPECT_EQ(ext[2].logical, 15u);
  EXPECT_EQ(ext[2].len, 85u);
  EXPECT_EQ(ext[2].flags, uint32_t(kExtentUnwritten));
  Verify();

  // Writing the rest merges everything back into one written extent.
  ASSERT_TRUE(MarkWritten(txn_, kIno, ino_.get(), 15, 85).ok());
  ASSERT_TRUE(MarkWritten(txn_, kIno, ino_.get(), 0, 10).ok());
  for (auto& [l, b] : model_) b.unwritten = false;
  ext = Extents();
  ASSERT_EQ(ext.size(), 1u);
  EXPECT_EQ(ext[0].len, 110u);
  EXPECT_EQ(ext[0].flags, 0u);
  txn_.Commit();
  Verify();

  // MarkWritten over holes and written blocks is a no-op.
  ASSERT_TRUE(MarkWritten(txn_, kIno, ino_.get(), 0, 100000).ok());
  Verify();
}

TEST_F(ExtentTest, MarkWrittenSplitsAcrossLeaves) {
  // Many unwritten extents spread over several leaves, then one MarkWritten over all.
  for (uint64_t i = 0; i < 3000; i++) Map(3 * i, 2, true);
  txn_.Commit();
  ASSERT_GE(Depth(*ino_), 1);
  ASSERT_TRUE(MarkWritten(txn_, kIno, ino_.get(), 1, 3 * 3000 - 2).ok());
  for (auto& [l, b] : model_) {
    if (l >= 1 && l < 3 * 3000 - 1) b.unwritten = false;
  }
  txn_.Commit();
  Verify();
  for (uint64_t l = 0; l < 100; l++) Probe(l);
  Probe(3 * 3000 - 2);
}

TEST_F(ExtentTest, NextDataAndHoles) {
  Map(10, 10, false);
  Map(100, 10, true);
  Map(200, 1, false);
  Verify();
  auto d = NextData(txn_, kIno, *ino_, 0);
  ASSERT_TRUE(d.ok() && d->has_value());
  EXPECT_EQ((*d)->logical, 10u);
  EXPECT_EQ((*d)->len, 10u);
  d = NextData(txn_, kIno, *ino_, 15);
  ASSERT_TRUE(d.ok() && d->has_value());
  EXPECT_EQ((*d)->logical, 15u);
  EXPECT_EQ((*d)->len, 5u);
  d = NextData(txn_, kIno, *ino_, 20);
  ASSERT_TRUE(d.ok() && d->has_value());
  EXPECT_EQ((*d)->logical, 100u);
  d = NextData(txn_, kIno, *ino_, 20, /*skip_unwritten=*/true);
  ASSERT_TRUE(d.ok() && d->has_value());
  EXPECT_EQ((*d)->logical, 200u);
  d = NextData(txn_, kIno, *ino_, 201);
  ASSERT_TRUE(d.ok());
  EXPECT_FALSE(d->has_value());
  auto m = Lookup(txn_, kIno, *ino_, 20);
  ASSERT_TRUE(m.ok());
  EXPECT_TRUE(m->hole());
  EXPECT_EQ(m->len, 80u);
  m = Lookup(txn_, kIno, *ino_, 300);
  ASSERT_TRUE(m.ok());
  EXPECT_TRUE(m->hole());
  EXPECT_EQ(m->len, UINT32_MAX);
  m = Lookup(txn_, kIno, *ino_, kMaxFileBlocks - 5);
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->len, 5u);
  // Filling a hole is capped by the next extent.
  auto r = MapOrAllocate(txn_, kIno, ino_.get(), 95, 1000, false, 0);
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(r->fresh);
  EXPECT_EQ(r->m.len, 5u);
  for (uint64_t i = 0; i < 5; i++) model_[95 + i] = Blk{r->m.physical + i, false};
  Verify();
}

TEST_F(ExtentTest, ExtentsNearTheMaximumFileSize) {
  Map(kMaxFileBlocks - 3, 3, false);
  Map(0, 1, false);
  auto r = MapOrAllocate(txn_, kIno, ino_.get(), kMaxFileBlocks - 5, 100, false, 0);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->m.len, 2u);
  for (uint64_t i = 0; i < 2; i++) model_[kMaxFileBlocks - 5 + i] = Blk{r->m.physical + i, false};
  txn_.Commit();
  Verify();
  Probe(kMaxFileBlocks - 1);
  Probe(1);
  DoPunch(kMaxFileBlocks - 4, UINT64_MAX);
  Verify();
}

TEST_F(ExtentTest, NoSpaceLeavesTreeUnchanged) {
  // A full root leaf: the next insert needs a new level.
  for (uint64_t i = 0; i < kExtentRootLeafMax; i++) Map(2 * i, 1, false);
  txn_.Commit();
  Verify();
  ASSERT_EQ(Depth(*ino_), 0);
  uint64_t blocks = ino_->blocks;
  std::vector<uint8_t> root(ino_->data, ino_->data + kInodeDataSize);
  txn_.fail_new_block = true;
  auto r = MapOrAllocate(txn_, kIno, ino_.get(), 2 * kExtentRootLeafMax, 1, false, 0);
  ASSERT_TRUE(r.status().Is(Code::kNoSpace)) << r.status().ToString();
  EXPECT_EQ(ino_->blocks, blocks);
  EXPECT_TRUE(std::equal(root.begin(), root.end(), ino_->data));
  txn_.fail_new_block = false;
  txn_.Commit();
  Verify();  // the data block taken for the insert was given back

  // With nodes allowed again, the insert succeeds and grows the tree.
  Map(2 * kExtentRootLeafMax, 1, false);
  EXPECT_EQ(Depth(*ino_), 1);
  txn_.Commit();
  Verify();
  // Fill the (only) leaf; the next append needs a split.
  for (uint64_t i = kExtentRootLeafMax + 1; i < kExtentNodeLeafMax; i++) Map(2 * i, 1, false);
  txn_.Commit();
  Verify();
  ASSERT_EQ(Nodes().size(), 1u);
  blocks = ino_->blocks;
  root.assign(ino_->data, ino_->data + kInodeDataSize);
  const uint64_t leaf = Nodes()[0];
  const std::vector<uint8_t> leaf_bytes = txn_.blocks()[leaf];
  txn_.fail_new_block = true;
  r = MapOrAllocate(txn_, kIno, ino_.get(), 2 * kExtentNodeLeafMax, 1, false, 0);
  ASSERT_TRUE(r.status().Is(Code::kNoSpace)) << r.status().ToString();
  EXPECT_EQ(ino_->blocks, blocks);
  EXPECT_TRUE(std::equal(root.begin(), root.end(), ino_->data));
  EXPECT_TRUE(txn_.blocks()[leaf] == leaf_bytes);
  txn_.fail_new_block = false;
  txn_.Commit();
  Verify();
  Map(2 * kExtentNodeLeafMax, 1, false);
  txn_.Commit();
  Verify();
  EXPECT_EQ(Nodes().size(), 2u);

  // Data allocation failure: a full store.
  RecTxn small(1000, 50);
  auto ino = std::make_unique<InodeBlock>();
  std::memset(ino.get(), 0, sizeof(InodeBlock));
  InitHeader(reinterpret_cast<uint8_t*>(ino.get()), BlockType::kInode, kIno, small.uuid());
  InitRoot(ino.get());
  auto a = MapOrAllocate(small, kIno, ino.get(), 0, 50, false, 0);
  ASSERT_TRUE(a.ok());
  auto b = MapOrAllocate(small, kIno, ino.get(), 100, 1, false, 0);
  EXPECT_TRUE(b.status().Is(Code::kNoSpace)) << b.status().ToString();
  EXPECT_EQ(ino->blocks, 50u);
}

TEST_F(ExtentTest, PunchNeedingASplitCanFailCleanly) {
  for (uint64_t i = 0; i < kExtentRootLeafMax; i++) Map(4 * i, 3, false);
  txn_.Commit();
  Verify();
  ASSERT_EQ(Extents().size(), kExtentRootLeafMax);
  const uint64_t blocks = ino_->blocks;
  txn_.fail_new_block = true;
  txn_.data_frees.clear();
  auto r = PunchStep(txn_, kIno, ino_.get(), 21, 1, PunchBudget{});
  ASSERT_TRUE(r.status().Is(Code::kNoSpace)) << r.status().ToString();
  EXPECT_TRUE(txn_.data_frees.empty());
  EXPECT_EQ(ino_->blocks, blocks);
  txn_.fail_new_block = false;
  Verify();
  DoPunch(21, 1);
  EXPECT_EQ(Depth(*ino_), 1);
  txn_.Commit();
  Verify();
  // Punching the middle block back out of the way lets the root collapse again.
  DoPunch(0, 4);
  EXPECT_EQ(Depth(*ino_), 0);
  txn_.Commit();
  Verify();
}

TEST_F(ExtentTest, LenientIndexKeysAreAccepted) {
  // Another writer may leave the first index key at 0 (or any key <= the child's
  // first block): reads still work and a change under that child makes it exact.
  for (uint64_t i = 0; i < kExtentRootLeafMax + 10; i++) Map(100 + 2 * i, 1, false);
  ASSERT_EQ(Depth(*ino_), 1);
  ExtentIndex x;
  std::memcpy(&x, ino_->data + sizeof(ExtentNodeHeader), sizeof(x));
  ASSERT_EQ(x.logical, 100u);
  x.logical = 0;
  std::memcpy(ino_->data + sizeof(ExtentNodeHeader), &x, sizeof(x));
  txn_.Commit();
  for (uint64_t l : {0, 99, 100, 101, 102}) Probe(l);
  EXPECT_EQ(Extents().size(), kExtentRootLeafMax + 10);
  Map(50, 1, false);
  std::memcpy(&x, ino_->data + sizeof(ExtentNodeHeader), sizeof(x));
  EXPECT_EQ(x.logical, 50u);
  txn_.Commit();
  Verify();
}

// Builds a tree with several nodes and returns one leaf node's block number.
uint64_t BuildTree(ExtentTest* t, RecTxn* txn, InodeBlock* ino, std::vector<uint64_t>* nodes) {
  (void)t;
  for (uint64_t i = 0; i < 2000; i++) {
    auto r = MapOrAllocate(*txn, kIno, ino, 2 * i, 1, false, 0);
    EXPECT_TRUE(r.ok());
  }
  txn->Commit();
  EXPECT_TRUE(ForEach(
                  *txn, kIno, *ino, [](const Extent&) { return true; }, nodes)
                  .ok());
  EXPECT_FALSE(nodes->empty());
  return nodes->empty() ? 0 : nodes->back();
}

// Every operation on a corrupt tree returns an error (kCorruption for bad nodes)
// without crashing. Returns the first error seen.
Status Exercise(RecTxn* txn, InodeBlock* ino, uint64_t probe) {
  Status first;
  auto note = [&](const Status& s) {
    if (first.ok() && !s.ok()) first = s;
  };
  note(Lookup(*txn, kIno, *ino, probe).status());
  note(NextData(*txn, kIno, *ino, probe).status());
  note(ForEach(*txn, kIno, *ino, [](const Extent&) { return true; }));
  note(MapOrAllocate(*txn, kIno, ino, probe + 1, 1, false, 0).status());
  note(MarkWritten(*txn, kIno, ino, probe, 10));
  note(PunchStep(*txn, kIno, ino, probe, 3, PunchBudget{}).status());
  return first;
}

TEST_F(ExtentTest, CorruptNodeIsDetected) {
  std::vector<uint64_t> nodes;
  const uint64_t leaf = BuildTree(this, &txn_, ino_.get(), &nodes);
  ASSERT_NE(leaf, 0u);
  // The last node visited is the rightmost leaf; find a block it maps.
  auto& blk = txn_.blocks()[leaf];
  ExtentNodeHeader h;
  std::memcpy(&h, blk.data() + sizeof(BlockHeader), sizeof(h));
  ASSERT_EQ(h.depth, 0);
  Extent e0;
  std::memcpy(&e0, blk.data() + sizeof(BlockHeader) + sizeof(h), sizeof(e0));

  // 1. A flipped byte fails the checksum.
  blk[sizeof(BlockHeader) + sizeof(h) + 5] ^= 0x40;
  auto r = Lookup(txn_, kIno, *ino_, e0.logical);
  ASSERT_TRUE(r.status().Is(Code::kCorruption)) << r.status().ToString();
  EXPECT_NE(r.status().message().find("inode 7"), std::string::npos) << r.status().ToString();
  EXPECT_NE(r.status().message().find(std::to_string(leaf)), std::string::npos)
      << r.status().ToString();
  EXPECT_TRUE(Exercise(&txn_, ino_.get(), e0.logical).Is(Code::kCorruption));
  blk[sizeof(BlockHeader) + sizeof(h) + 5] ^= 0x40;

  // 2. Resealed semantic damage is caught by validation, naming the block.
  auto damage = [&](const std::function<void(uint8_t*)>& f, const char* what) {
    std::vector<uint8_t> saved = blk;
    f(blk.data() + sizeof(BlockHeader));
    SealBlock(blk.data());
    Status s = Lookup(txn_, kIno, *ino_, e0.logical).status();
    EXPECT_TRUE(s.Is(Code::kCorruption)) << what << ": " << s.ToString();
    EXPECT_NE(s.message().find("extent node " + std::to_string(leaf)), std::string::npos)
        << what << ": " << s.ToString();
    EXPECT_FALSE(Exercise(&txn_, ino_.get(), e0.logical).ok()) << what;
    blk = saved;
    SealBlock(blk.data());
  };
  damage([](uint8_t* p) { reinterpret_cast<ExtentNodeHeader*>(p)->count = 500; }, "count");
  damage([](uint8_t* p) { reinterpret_cast<ExtentNodeHeader*>(p)->count = 0; }, "empty");
  damage([](uint8_t* p) { reinterpret_cast<ExtentNodeHeader*>(p)->depth = 3; }, "depth");
  damage([](uint8_t* p) { reinterpret_cast<ExtentNodeHeader*>(p)->owner = 99; }, "owner");
  damage([](uint8_t* p) { reinterpret_cast<ExtentNodeHeader*>(p)->max = 1000; }, "max");
  damage(
      [](uint8_t* p) {
        Extent* e = reinterpret_cast<Extent*>(p + sizeof(ExtentNodeHeader));
        std::swap(e[0], e[1]);
      },
      "unsorted");
  damage(
      [](uint8_t* p) {
        Extent* e = reinterpret_cast<Extent*>(p + sizeof(ExtentNodeHeader));
        e[0].len = 0;
      },
      "zero length");
  damage(
      [](uint8_t* p) {
        Extent* e = reinterpret_cast<Extent*>(p + sizeof(ExtentNodeHeader));
        e[0].logical = 0;  // below the leaf's key
      },
      "below key");
  damage(
      [](uint8_t* p) {
        Extent* e = reinterpret_cast<Extent*>(p + sizeof(ExtentNodeHeader));
        e[0].len = 0xFFFFFFFF;  // overlaps the next extent
      },
      "overlap");
  // The tree is intact again.
  model_.clear();
  for (const Extent& e : Extents()) model_[e.logical] = Blk{e.physical, false};
  Verify();
}

TEST_F(ExtentTest, CorruptRootIsDetected) {
  std::vector<uint64_t> nodes;
  BuildTree(this, &txn_, ino_.get(), &nodes);
  ASSERT_GE(Depth(*ino_), 1);
  auto damage = [&](const std::function<void(uint8_t*)>& f, const char* what) {
    std::vector<uint8_t> saved(ino_->data, ino_->data + kInodeDataSize);
    f(ino_->data);
    Status s = Exercise(&txn_, ino_.get(), 100);
    EXPECT_TRUE(s.Is(Code::kCorruption)) << what << ": " << s.ToString();
    EXPECT_NE(s.message().find("inode 7: extent"), std::string::npos) << s.ToString();
    std::memcpy(ino_->data, saved.data(), saved.size());
  };
  damage([](uint8_t* p) { reinterpret_cast<ExtentNodeHeader*>(p)->depth = 9; }, "depth 9");
  damage([](uint8_t* p) { reinterpret_cast<ExtentNodeHeader*>(p)->depth = 2; }, "depth 2");
  damage([](uint8_t* p) { reinterpret_cast<ExtentNodeHeader*>(p)->count = 300; }, "count");
  damage([](uint8_t* p) { reinterpret_cast<ExtentNodeHeader*>(p)->count = 0; }, "empty index");
  damage(
      [](uint8_t* p) {
        ExtentIndex* x = reinterpret_cast<ExtentIndex*>(p + sizeof(ExtentNodeHeader));
        x[1].child = x[0].child;
      },
      "duplicate child");
  damage(
      [](uint8_t* p) {
        ExtentIndex* x = reinterpret_cast<ExtentIndex*>(p + sizeof(ExtentNodeHeader));
        x[0].child = kIno;
      },
      "child is the inode");
  damage(
      [](uint8_t* p) {
        ExtentIndex* x = reinterpret_cast<ExtentIndex*>(p + sizeof(ExtentNodeHeader));
        x[0].child = 123456789;
      },
      "child missing");
  damage(
      [](uint8_t* p) {
        ExtentIndex* x = reinterpret_cast<ExtentIndex*>(p + sizeof(ExtentNodeHeader));
        const uint64_t k = x[0].logical;
        x[0].logical = x[1].logical;
        x[1].logical = k;
      },
      "keys out of order");
  damage(
      [](uint8_t* p) {
        ExtentIndex* x = reinterpret_cast<ExtentIndex*>(p + sizeof(ExtentNodeHeader));
        x[1].logical += 3;  // above the child's first extent
      },
      "key above child");
}

// Random byte damage (resealed, so only validation stands between it and the code):
// nothing crashes, and whatever succeeds leaves a tree that still validates or
// reports corruption.
TEST_F(ExtentTest, RandomDamageNeverCrashes) {
  std::mt19937_64 rng(11);
  for (int round = 0; round < 300; round++) {
    RecTxn txn(1000, 1u << 16);
    auto ino = std::make_unique<InodeBlock>();
    std::memset(ino.get(), 0, sizeof(InodeBlock));
    InitHeader(reinterpret_cast<uint8_t*>(ino.get()), BlockType::kInode, kIno, txn.uuid());
    InitRoot(ino.get());
    for (uint64_t i = 0; i < 600; i++) {
      ASSERT_TRUE(MapOrAllocate(txn, kIno, ino.get(), 2 * i, 1, false, 0).ok());
    }
    txn.Commit();
    std::vector<uint64_t> nodes;
    ASSERT_TRUE(ForEach(
                    txn, kIno, *ino, [](const Extent&) { return true; }, &nodes)
                    .ok());
    for (int k = 0; k < 3; k++) {
      if (rng() % 3 == 0) {
        // The root: only its header and first entries are interesting.
        ino->data[rng() % 256] ^= uint8_t(1u << (rng() % 8));
      } else {
        auto& b = txn.blocks()[nodes[rng() % nodes.size()]];
        b[sizeof(BlockHeader) + rng() % 400] ^= uint8_t(1u << (rng() % 8));
        SealBlock(b.data());
      }
    }
    for (int k = 0; k < 5; k++) {
      (void)Exercise(&txn, ino.get(), rng() % 1300);
      txn.Commit();
    }
    (void)Punch(txn, kIno, ino.get(), 0, UINT64_MAX);
  }
}

}  // namespace
}  // namespace agorafs::extent
