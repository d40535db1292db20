#include "dir/dir.h"

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "cache/test_meta_txn.h"
#include "util/hash.h"

namespace agorafs {
namespace {

constexpr uint64_t kDirIno = 500;

// Records which blocks were written (not merely read), allocated and freed.
class TrackingTxn : public TestMetaTxn {
 public:
  explicit TrackingTxn(uint64_t blocks = uint64_t(1) << 22) : TestMetaTxn(1000, blocks) {}
  Result<const uint8_t*> Read(uint64_t blk, BlockType type, LockId lock) override {
    reading_ = true;
    auto r = TestMetaTxn::Read(blk, type, lock);
    reading_ = false;
    reads.push_back(blk);
    return r;
  }
  Result<uint8_t*> Write(uint64_t blk, BlockType type, LockId lock) override {
    if (!reading_) writes.insert(blk);
    return TestMetaTxn::Write(blk, type, lock);
  }
  Result<std::pair<uint64_t, uint8_t*>> NewBlock(BlockType type, LockId lock,
                                                 uint64_t hint) override {
    auto r = TestMetaTxn::NewBlock(type, lock, hint);
    if (r.ok()) news.insert(r->first);
    return r;
  }
  Status Free(uint64_t blk, uint64_t count) override {
    frees.insert(blk);
    return TestMetaTxn::Free(blk, count);
  }
  void ClearTracking() {
    reads.clear();
    writes.clear();
    news.clear();
    frees.clear();
  }

  std::vector<uint64_t> reads;
  std::set<uint64_t> writes, news, frees;

 private:
  bool reading_ = false;
};

struct Dir {
  explicit Dir(uint64_t blocks = uint64_t(1) << 22)
      : txn(blocks), d(std::make_unique<InodeBlock>()) {
    d->hash_seed = 0x5eed1234abcdULL;
    dir::InitEmpty(d.get());
  }
  Status Add(std::string_view name, uint64_t ino, uint8_t type = 8) {
    return dir::Add(txn, kDirIno, d.get(), name, ino, type);
  }
  Status Remove(std::string_view name) { return dir::Remove(txn, kDirIno, d.get(), name); }
  Result<dir::Entry> Lookup(std::string_view name) { return dir::Lookup(txn, kDirIno, *d, name); }
  // Check, expecting no problems; returns the number of valid entries.
  uint64_t CheckClean() {
    std::vector<std::string> problems;
    uint64_t n = 0;
    Status st = dir::Check(txn, kDirIno, *d, &problems, [&](const dir::Entry&) { n++; });
    EXPECT_TRUE(st.ok()) << st.ToString();
    for (size_t i = 0; i < problems.size() && i < 10; i++) ADD_FAILURE() << problems[i];
    EXPECT_EQ(n, d->size);
    return n;
  }
  std::vector<dir::Entry> ListAll() {
    std::vector<dir::Entry> out;
    Status st = dir::List(txn, kDirIno, *d, 0, [&](const dir::Entry& e) {
      out.push_back(e);
      return true;
    });
    EXPECT_TRUE(st.ok()) << st.ToString();
    return out;
  }
  // Every block's covering lock is right: table blocks under the inode lock, every
  // block of a leaf chain under the primary's leaf lock; nothing else allocated.
  void CheckLocks() {
    std::map<uint64_t, LockId> want;
    if (d->data_kind == uint8_t(DataKind::kDirHash)) {
      dir::Shape s = dir::ShapeOf(*d);
      for (uint32_t t = 0; t < s.table_blocks; t++) {
        uint64_t tb;
        std::memcpy(&tb, d->data + sizeof(DirRoot) + 8 * t, 8);
        want[tb] = InodeLock(kDirIno);
        auto* table = reinterpret_cast<const DirTable*>(txn.blocks()[tb].data());
        for (size_t i = 0; i < kDirTableSlots && t * kDirTableSlots + i < (1u << s.global_depth);
             i++) {
          uint64_t p = table->slot[i];
          for (uint64_t b = p; b != 0;
               b = reinterpret_cast<const DirLeaf*>(txn.blocks()[b].data())->next) {
            want[b] = LeafLock(p);
          }
        }
      }
    }
    EXPECT_EQ(txn.used_blocks(), want.size());
    for (auto& [blk, lock] : want) {
      auto it = txn.locks().find(blk);
      ASSERT_NE(it, txn.locks().end()) << blk;
      EXPECT_EQ(it->second, lock) << "block " << blk;
    }
  }

  TrackingTxn txn;
  std::unique_ptr<InodeBlock> d;
};

std::string Name(uint64_t i) { return fmt::format("file{:07d}", i); }

// Names of assorted lengths, up to 255 bytes.
std::string VarName(uint64_t i) {
  std::string s = fmt::format("n{}-", i);
  size_t len = s.size() + (i * 7919) % 60;
  if (i % 97 == 0) len = kMaxNameLen;
  while (s.size() < len) s.push_back(char('a' + (s.size() + i) % 26));
  return s;
}

struct HashHook {
  explicit HashHook(dir::HashFn fn) : old(dir::SetHashFnForTesting(fn)) {}
  ~HashHook() { dir::SetHashFnForTesting(old); }
  dir::HashFn old;
};

// ---------------------------------------------------------------------------------

TEST(DirTest, InlineAddLookupRemoveReplace) {
  Dir t;
  EXPECT_TRUE(*dir::Empty(t.txn, kDirIno, *t.d));
  ASSERT_TRUE(t.Add("alpha", 11, 8).ok());
  ASSERT_TRUE(t.Add("beta", 12, 4).ok());
  ASSERT_TRUE(t.Add("gamma", 13, 10).ok());
  EXPECT_EQ(t.d->size, 3u);
  EXPECT_EQ(t.d->data_kind, uint8_t(DataKind::kInline));
  EXPECT_EQ(t.txn.used_blocks(), 0u);
  EXPECT_FALSE(*dir::Empty(t.txn, kDirIno, *t.d));

  auto e = t.Lookup("beta");
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(e->name, "beta");
  EXPECT_EQ(e->ino, 12u);
  EXPECT_EQ(e->type, 4);
  EXPECT_EQ(e->cookie, dir::NameHash(t.d->hash_seed, "beta"));
  EXPECT_TRUE(t.Lookup("delta").status().Is(Code::kNotFound));
  EXPECT_TRUE(t.Add("alpha", 99).Is(Code::kExists));

  ASSERT_TRUE(dir::Replace(t.txn, kDirIno, t.d.get(), "beta", 77, 8).ok());
  EXPECT_EQ(t.Lookup("beta")->ino, 77u);
  EXPECT_EQ(t.Lookup("beta")->type, 8);
  EXPECT_TRUE(dir::Replace(t.txn, kDirIno, t.d.get(), "nope", 1, 8).Is(Code::kNotFound));

  auto all = t.ListAll();
  ASSERT_EQ(all.size(), 3u);
  for (size_t i = 1; i < all.size(); i++) EXPECT_LT(all[i - 1].cookie, all[i].cookie);
  t.CheckClean();

  ASSERT_TRUE(t.Remove("alpha").ok());
  EXPECT_TRUE(t.Remove("alpha").Is(Code::kNotFound));
  EXPECT_TRUE(t.Lookup("alpha").status().Is(Code::kNotFound));
  EXPECT_EQ(t.Lookup("gamma")->ino, 13u);
  ASSERT_TRUE(t.Remove("beta").ok());
  ASSERT_TRUE(t.Remove("gamma").ok());
  EXPECT_TRUE(*dir::Empty(t.txn, kDirIno, *t.d));
  EXPECT_EQ(t.d->size, 0u);
  for (size_t i = 0; i < kInodeDataSize; i++) ASSERT_EQ(t.d->data[i], 0) << i;
  t.CheckClean();
}

TEST(DirTest, InvalidNamesRejected) {
  Dir t;
  const std::string too_long(kMaxNameLen + 1, 'x');
  const std::string longest(kMaxNameLen, 'y');
  const std::string with_nul("a\0b", 3);
  for (std::string_view bad :
       {std::string_view(""), std::string_view("."), std::string_view(".."),
        std::string_view("a/b"), std::string_view("/"), std::string_view(with_nul)}) {
    EXPECT_TRUE(t.Add(bad, 5).Is(Code::kInvalid)) << bad;
    EXPECT_TRUE(t.Lookup(bad).status().Is(Code::kInvalid)) << bad;
    EXPECT_TRUE(t.Remove(bad).Is(Code::kInvalid)) << bad;
    EXPECT_TRUE(dir::Replace(t.txn, kDirIno, t.d.get(), bad, 5, 8).Is(Code::kInvalid));
  }
  EXPECT_TRUE(t.Add(too_long, 5).Is(Code::kNameTooLong));
  EXPECT_TRUE(t.Lookup(too_long).status().Is(Code::kNameTooLong));
  EXPECT_TRUE(t.Add("ok", 0).Is(Code::kInvalid));
  ASSERT_TRUE(t.Add(longest, 5).ok());
  ASSERT_TRUE(t.Add("...", 6).ok());  // only "." and ".." are special
  EXPECT_EQ(t.Lookup(longest)->ino, 5u);
  EXPECT_EQ(t.d->size, 2u);
  t.CheckClean();
}

TEST(DirTest, ConvertsToHashedWhenInlineIsFull) {
  Dir t;
  int n = 0;
  while (t.d->data_kind == uint8_t(DataKind::kInline)) {
    ASSERT_TRUE(t.Add(Name(n), 100 + n).ok());
    n++;
    ASSERT_LT(n, 1000);
  }
  dir::Shape s = dir::ShapeOf(*t.d);
  EXPECT_TRUE(s.hashed);
  EXPECT_EQ(s.global_depth, 0u);
  EXPECT_EQ(s.leaves, 1u);
  EXPECT_EQ(s.entries, uint64_t(n));
  EXPECT_EQ(t.d->blocks, 2u);
  EXPECT_EQ(t.txn.used_blocks(), 2u);
  for (int i = 0; i < n; i++) ASSERT_EQ(t.Lookup(Name(i))->ino, uint64_t(100 + i));
  t.CheckClean();
  t.CheckLocks();
  t.txn.Commit();
  // Keep going through the first splits and doublings.
  for (int i = n; i < 2000; i++) ASSERT_TRUE(t.Add(Name(i), 100 + i).ok());
  t.txn.Commit();
  for (int i = 0; i < 2000; i++) ASSERT_EQ(t.Lookup(Name(i))->ino, uint64_t(100 + i));
  EXPECT_EQ(t.ListAll().size(), 2000u);
  s = dir::ShapeOf(*t.d);
  EXPECT_GT(s.global_depth, 0u);
  EXPECT_EQ(t.d->blocks, s.table_blocks + s.leaves);
  t.CheckClean();
  t.CheckLocks();
  ASSERT_TRUE(dir::FreeAll(t.txn, kDirIno, t.d.get()).ok());
  EXPECT_EQ(t.d->blocks, 0u);
  EXPECT_EQ(t.txn.used_blocks(), 0u);
  EXPECT_EQ(t.d->data_kind, uint8_t(DataKind::kInline));
  EXPECT_TRUE(*dir::Empty(t.txn, kDirIno, *t.d));
}

TEST(DirTest, HundredThousandNamesAddFindRemove) {
  Dir t;
  const uint64_t kN = 100000;
  for (uint64_t i = 0; i < kN; i++) {
    ASSERT_TRUE(t.Add(VarName(i), 1000 + i, uint8_t(i % 16)).ok()) << i;
    if (i % 5000 == 4999) t.txn.Commit();
    if (i % 25000 == 24999) t.CheckClean();
  }
  t.txn.Commit();
  for (uint64_t i = 0; i < kN; i++) {
    auto e = t.Lookup(VarName(i));
    ASSERT_TRUE(e.ok()) << i << " " << e.status().ToString();
    ASSERT_EQ(e->ino, 1000 + i);
    ASSERT_EQ(e->type, i % 16);
  }
  EXPECT_EQ(t.CheckClean(), kN);
  t.CheckLocks();
  dir::Shape s = dir::ShapeOf(*t.d);
  std::printf("100k names: global depth %u, %llu leaves, %u table blocks\n", s.global_depth,
              (unsigned long long)s.leaves, s.table_blocks);
  EXPECT_EQ(t.d->blocks, s.table_blocks + s.leaves);

  // Replace a few, then remove everything in random order.
  for (uint64_t i = 0; i < kN; i += 1000) {
    ASSERT_TRUE(dir::Replace(t.txn, kDirIno, t.d.get(), VarName(i), 7, 4).ok());
    ASSERT_EQ(t.Lookup(VarName(i))->ino, 7u);
  }
  std::vector<uint64_t> order(kN);
  for (uint64_t i = 0; i < kN; i++) order[i] = i;
  std::mt19937_64 rng(42);
  std::shuffle(order.begin(), order.end(), rng);
  for (uint64_t k = 0; k < kN; k++) {
    ASSERT_TRUE(t.Remove(VarName(order[k])).ok()) << k;
    if (k % 7 == 0) {
      ASSERT_TRUE(t.Lookup(VarName(order[k])).status().Is(Code::kNotFound));
    }
    if (k % 5000 == 4999) t.txn.Commit();
    if (k % 20000 == 19999 || k == kN - 2) {
      t.CheckClean();
      t.CheckLocks();
      if (k + 1 < kN) {
        ASSERT_TRUE(t.Lookup(VarName(order[k + 1])).ok());
      }
    }
  }
  t.txn.Commit();
  EXPECT_TRUE(*dir::Empty(t.txn, kDirIno, *t.d));
  t.CheckClean();
  s = dir::ShapeOf(*t.d);
  std::printf("after removing all: global depth %u, %llu leaves left after merging\n",
              s.global_depth, (unsigned long long)s.leaves);
  EXPECT_EQ(t.d->blocks, s.table_blocks + s.leaves);
  EXPECT_EQ(t.ListAll().size(), 0u);
  ASSERT_TRUE(dir::FreeAll(t.txn, kDirIno, t.d.get()).ok());
  EXPECT_EQ(t.d->blocks, 0u);
  EXPECT_EQ(t.txn.used_blocks(), 0u);
}

TEST(DirTest, MillionNames) {
  Dir t;
  const uint64_t kN = 1000000;
  std::vector<std::string> names(kN);
  for (uint64_t i = 0; i < kN; i++) names[i] = Name(i);
  auto t0 = std::chrono::steady_clock::now();
  for (uint64_t i = 0; i < kN; i++) {
    Status st = t.Add(names[i], i + 1);
    if (!st.ok()) {
      FAIL() << i << " " << st.ToString();
    }
    if (i % 100000 == 99999) t.txn.Commit();
  }
  t.txn.Commit();
  auto t1 = std::chrono::steady_clock::now();
  for (uint64_t i = 0; i < kN; i++) {
    auto e = t.Lookup(names[i]);
    if (!e.ok() || e->ino != i + 1) {
      FAIL() << i << " " << e.status().ToString();
    }
  }
  auto t2 = std::chrono::steady_clock::now();
  t.txn.ClearTracking();
  ASSERT_TRUE(t.Lookup(names[123456]).ok());
  EXPECT_EQ(t.txn.reads.size(), 2u);  // one table block, one leaf
  auto sec = [](auto a, auto b) { return std::chrono::duration<double>(b - a).count(); };
  dir::Shape s = dir::ShapeOf(*t.d);
  std::printf(
      "1M names: add %.2f s, lookup %.2f s; global depth %u, %llu leaves, %u table "
      "blocks\n",
      sec(t0, t1), sec(t1, t2), s.global_depth, (unsigned long long)s.leaves, s.table_blocks);
  EXPECT_EQ(s.entries, kN);
  auto t3 = std::chrono::steady_clock::now();
  EXPECT_EQ(t.CheckClean(), kN);
  std::printf("1M names: check %.2f s\n", sec(t3, std::chrono::steady_clock::now()));
}

// Lists in small batches while names come and go; applies the group rule.
void ListWhileChanging(Dir& t, uint64_t seed, const std::function<std::string(uint64_t)>& name,
                       uint64_t initial, uint64_t max_batch) {
  std::mt19937_64 rng(seed);
  std::set<std::string> stable, vol;
  uint64_t next = 0;
  for (; next < initial; next++) {
    ASSERT_TRUE(t.Add(name(next), next + 1).ok());
    (next % 2 ? vol : stable).insert(name(next));
  }
  t.txn.Commit();
  std::map<std::string, int> seen;
  uint64_t after = 0, last_cookie = 0;
  int calls = 0;
  while (true) {
    uint64_t k = 1 + rng() % max_batch;
    std::vector<dir::Entry> batch;
    bool refused = false;
    uint64_t refused_cookie = 0;
    Status st = dir::List(t.txn, kDirIno, *t.d, after, [&](const dir::Entry& e) {
      if (batch.size() >= k) {
        refused = true;
        refused_cookie = e.cookie;
        return false;
      }
      batch.push_back(e);
      return true;
    });
    ASSERT_TRUE(st.ok()) << st.ToString();
    calls++;
    if (refused) {
      while (!batch.empty() && batch.back().cookie == refused_cookie) batch.pop_back();
      if (batch.empty()) {  // group larger than the batch: take a bigger one
        max_batch *= 2;
        continue;
      }
    }
    for (const dir::Entry& e : batch) {
      ASSERT_GE(e.cookie, last_cookie);
      ASSERT_GT(e.cookie, after);
      last_cookie = e.cookie;
      seen[e.name]++;
    }
    if (!refused) break;
    after = batch.back().cookie;
    // Change the directory between calls: add new names, remove volatile ones.
    for (int j = 0; j < 20; j++, next++) {
      ASSERT_TRUE(t.Add(name(next), next + 1).ok());
      vol.insert(name(next));
    }
    for (int j = 0; j < 15 && !vol.empty(); j++) {
      auto it = vol.begin();
      std::advance(it, rng() % vol.size());
      ASSERT_TRUE(t.Remove(*it).ok());
      vol.erase(it);
    }
    if (calls % 10 == 0) t.txn.Commit();
  }
  for (auto& [n, c] : seen) ASSERT_EQ(c, 1) << n << " listed " << c << " times";
  for (const std::string& n : stable) ASSERT_EQ(seen.count(n), 1u) << n << " skipped";
  t.CheckClean();
  std::printf("listing took %d calls, %zu names seen\n", calls, seen.size());
}

TEST(DirTest, ListResumesWhileNamesComeAndGo) {
  {
    Dir t;  // starts inline, converts and splits during the listing
    ListWhileChanging(t, 1, Name, 50, 8);
  }
  {
    Dir t;  // a big hashed directory with splits and merges during the listing
    ListWhileChanging(t, 2, VarName, 20000, 400);
  }
}

constexpr uint64_t kFixedHash = 0x2bcdef0123456789ULL;
uint64_t AllCollide(uint64_t, std::string_view) { return kFixedHash << 1; }
uint64_t XCollide(uint64_t seed, std::string_view n) {
  if (!n.empty() && n[0] == 'x') return kFixedHash << 1;
  return Hash64(n.data(), n.size(), seed);
}
// Top kDirMaxDepth bits shared, low bits from the real hash: unsplittable, not equal.
uint64_t Top16Same(uint64_t seed, std::string_view n) {
  uint64_t low = Hash64(n.data(), n.size(), seed) & ((uint64_t(1) << (63 - kDirMaxDepth)) - 1);
  return ((uint64_t(0x4321) << (63 - kDirMaxDepth)) | low) << 1;
}

TEST(DirTest, AllNamesCollide) {
  HashHook hook(AllCollide);
  Dir t;
  const int kN = 800;
  for (int i = 0; i < kN; i++) ASSERT_TRUE(t.Add(Name(i), i + 1).ok()) << i;
  t.txn.Commit();
  dir::Shape s = dir::ShapeOf(*t.d);
  EXPECT_EQ(s.global_depth, 0u);  // no useless splits
  EXPECT_GT(s.leaves, 3u);        // an overflow chain
  for (int i = 0; i < kN; i++) ASSERT_EQ(t.Lookup(Name(i))->ino, uint64_t(i + 1));
  EXPECT_TRUE(t.Add(Name(5), 1).Is(Code::kExists));
  EXPECT_TRUE(t.Lookup("other").status().Is(Code::kNotFound));
  t.CheckClean();
  t.CheckLocks();
  auto all = t.ListAll();
  ASSERT_EQ(all.size(), size_t(kN));
  for (auto& e : all) EXPECT_EQ(e.cookie, kFixedHash);
  // A group is delivered all or none: refusing part of it leaves nothing consumable.
  size_t taken = 0;
  ASSERT_TRUE(
      dir::List(t.txn, kDirIno, *t.d, 0, [&](const dir::Entry&) { return ++taken <= 10; }).ok());
  EXPECT_EQ(taken, 11u);
  taken = 0;
  ASSERT_TRUE(dir::List(t.txn, kDirIno, *t.d, kFixedHash, [&](const dir::Entry&) {
                taken++;
                return true;
              }).ok());
  EXPECT_EQ(taken, 0u);

  std::vector<int> order(kN);
  for (int i = 0; i < kN; i++) order[i] = i;
  std::shuffle(order.begin(), order.end(), std::mt19937_64(7));
  for (int k = 0; k < kN; k++) {
    ASSERT_TRUE(t.Remove(Name(order[k])).ok()) << k;
    if (k % 100 == 0) {
      t.CheckClean();
      t.CheckLocks();
    }
  }
  EXPECT_EQ(dir::ShapeOf(*t.d).leaves, 1u);  // chain blocks freed
  t.CheckClean();
}

TEST(DirTest, CollisionGroupSplitsAwayFromOtherNames) {
  HashHook hook(XCollide);
  Dir t;
  for (int i = 0; i < 400; i++) ASSERT_TRUE(t.Add("x" + Name(i), i + 1).ok());
  for (int i = 0; i < 20000; i++) ASSERT_TRUE(t.Add(Name(i), 10000 + i).ok());
  t.txn.Commit();
  dir::Shape s = dir::ShapeOf(*t.d);
  EXPECT_LE(s.global_depth, 12u);
  for (int i = 0; i < 400; i++) ASSERT_EQ(t.Lookup("x" + Name(i))->ino, uint64_t(i + 1));
  for (int i = 0; i < 20000; i++) ASSERT_EQ(t.Lookup(Name(i))->ino, uint64_t(10000 + i));
  t.CheckClean();
  t.CheckLocks();
  // Only the collision leaf may have a chain: the other leaf of its range is short.
  uint64_t xleaf = *dir::LeafOf(t.txn, kDirIno, *t.d, "x" + Name(0));
  uint64_t pfx = reinterpret_cast<const DirLeaf*>(t.txn.blocks()[xleaf].data())->prefix;
  uint64_t ld = reinterpret_cast<const DirLeaf*>(t.txn.blocks()[xleaf].data())->local_depth;
  EXPECT_EQ(pfx, kFixedHash >> (63 - ld));
  ListWhileChanging(
      t, 3, [](uint64_t i) { return (i % 3 ? "y" : "x") + Name(100000 + i); }, 0, 50);
  for (int i = 0; i < 400; i++) ASSERT_TRUE(t.Remove("x" + Name(i)).ok());
  for (int i = 0; i < 20000; i++) ASSERT_TRUE(t.Remove(Name(i)).ok());
  t.CheckClean();
  t.CheckLocks();
}

TEST(DirTest, SharedTopBitsChainWithoutGrowingTheTable) {
  HashHook hook(Top16Same);
  Dir t;
  const int kN = 3000;
  for (int i = 0; i < kN; i++) ASSERT_TRUE(t.Add(VarName(i), i + 1).ok()) << i;
  t.txn.Commit();
  dir::Shape s = dir::ShapeOf(*t.d);
  EXPECT_EQ(s.global_depth, 0u);
  for (int i = 0; i < kN; i++) ASSERT_EQ(t.Lookup(VarName(i))->ino, uint64_t(i + 1));
  auto all = t.ListAll();
  ASSERT_EQ(all.size(), size_t(kN));
  for (size_t i = 1; i < all.size(); i++) ASSERT_LT(all[i - 1].cookie, all[i].cookie);
  t.CheckClean();
  t.CheckLocks();
  for (int i = 0; i < kN; i += 2) ASSERT_TRUE(t.Remove(VarName(i)).ok());
  t.CheckClean();
  t.CheckLocks();
}

// After warm-up, adding a name whose leaf has room writes only that leaf.
TEST(DirTest, AddToLeafWithRoomTouchesOnlyThatLeaf) {
  Dir t;
  for (int i = 0; i < 5000; i++) ASSERT_TRUE(t.Add(Name(i), i + 1).ok());
  t.txn.Commit();
  int checked = 0;
  for (int i = 5000; checked < 200; i++) {
    std::string n = Name(i);
    uint64_t leaf = *dir::LeafOf(t.txn, kDirIno, *t.d, n);
    const DirLeaf* l = reinterpret_cast<const DirLeaf*>(t.txn.blocks()[leaf].data());
    bool room = l->next == 0 && l->used + kDirEntryFixed + n.size() <= kDirLeafSpace;
    InodeBlock before = *t.d;
    t.txn.ClearTracking();
    ASSERT_TRUE(t.Add(n, i + 1).ok());
    if (!room) continue;
    checked++;
    EXPECT_EQ(t.txn.writes, std::set<uint64_t>{leaf});
    EXPECT_TRUE(t.txn.news.empty());
    EXPECT_TRUE(t.txn.frees.empty());
    EXPECT_EQ(t.txn.reads.size(), 2u);  // the table block and the leaf
    EXPECT_EQ(t.txn.locks().at(leaf), LeafLock(leaf));
    // The inode changed only in its counters.
    before.size++;
    reinterpret_cast<DirRoot*>(before.data)->entries++;
    EXPECT_EQ(std::memcmp(&before, t.d.get(), kBlockSize), 0);
    if (checked % 50 == 0) t.txn.Commit();
  }
  t.CheckLocks();
  // A lookup reads one table block and one leaf.
  t.txn.ClearTracking();
  ASSERT_TRUE(t.Lookup(Name(17)).ok());
  EXPECT_EQ(t.txn.reads.size(), 2u);
  EXPECT_TRUE(t.txn.writes.empty());
}

// Finds a leaf block holding some name.
uint64_t SomeLeaf(Dir& t, const std::string& name) {
  auto r = dir::LeafOf(t.txn, kDirIno, *t.d, name);
  EXPECT_TRUE(r.ok());
  return r.ok() ? *r : 0;
}

bool AnyProblemContains(const std::vector<std::string>& p, const std::string& s) {
  for (auto& x : p) {
    if (x.find(s) != std::string::npos) return true;
  }
  return false;
}

TEST(DirTest, CheckReportsCorruptLeaf) {
  Dir t;
  for (int i = 0; i < 3000; i++) ASSERT_TRUE(t.Add(Name(i), i + 1).ok());
  t.txn.Commit();
  uint64_t leaf = SomeLeaf(t, Name(100));
  t.txn.Commit();  // reading unsealed it; seal again, then damage it
  t.txn.blocks()[leaf][sizeof(BlockHeader) + 40 + 30] ^= 0x10;  // after Commit: bad checksum
  auto r = t.Lookup(Name(100));
  ASSERT_TRUE(r.status().Is(Code::kCorruption));
  EXPECT_NE(r.status().message().find(std::to_string(leaf)), std::string::npos)
      << r.status().ToString();
  EXPECT_NE(r.status().message().find("checksum"), std::string::npos);
  std::vector<std::string> problems;
  uint64_t valid = 0;
  Status st = dir::Check(t.txn, kDirIno, *t.d, &problems, [&](const dir::Entry&) { valid++; });
  EXPECT_TRUE(st.Is(Code::kCorruption));
  ASSERT_FALSE(problems.empty());
  EXPECT_TRUE(AnyProblemContains(problems, "leaf " + std::to_string(leaf)));
  EXPECT_LT(valid, 3000u);
  EXPECT_GT(valid, 0u);
  // List stops with the corruption when it reaches that leaf.
  EXPECT_TRUE(dir::List(t.txn, kDirIno, *t.d, 0, [](const dir::Entry&) {
                return true;
              }).Is(Code::kCorruption));
}

// Rewrites a committed block through `edit` and reseals it (a "valid" bad block).
template <typename F>
void EditSealed(Dir& t, uint64_t blk, F edit) {
  uint8_t* b = t.txn.blocks()[blk].data();
  edit(b);
  SealBlock(b);
}

TEST(DirTest, CheckReportsMisplacedEntry) {
  Dir t;
  for (int i = 0; i < 3000; i++) ASSERT_TRUE(t.Add(Name(i), i + 1).ok());
  t.txn.Commit();
  t.CheckClean();
  // First leaf (slot 0) and last leaf (last slot): every hash in the first is lower.
  dir::Shape s = dir::ShapeOf(*t.d);
  uint64_t tb0, tbl;
  std::memcpy(&tb0, t.d->data + sizeof(DirRoot), 8);
  std::memcpy(&tbl, t.d->data + sizeof(DirRoot) + 8 * (s.table_blocks - 1), 8);
  uint64_t first = reinterpret_cast<const DirTable*>(t.txn.blocks()[tb0].data())->slot[0];
  uint64_t last = reinterpret_cast<const DirTable*>(t.txn.blocks()[tbl].data())
                      ->slot[((uint64_t(1) << s.global_depth) - 1) % kDirTableSlots];
  ASSERT_NE(first, last);
  // Move the first entry of `first` to the front of `last`.
  std::vector<uint8_t> ent;
  EditSealed(t, first, [&](uint8_t* b) {
    auto* l = reinterpret_cast<DirLeaf*>(b);
    size_t sz = kDirEntryFixed + l->entries[17];
    ent.assign(l->entries, l->entries + sz);
    std::memmove(l->entries, l->entries + sz, l->used - sz);
    std::memset(l->entries + l->used - sz, 0, sz);
    l->used = uint16_t(l->used - sz);
    l->count = uint16_t(l->count - 1);
  });
  EditSealed(t, last, [&](uint8_t* b) {
    auto* l = reinterpret_cast<DirLeaf*>(b);
    std::memmove(l->entries + ent.size(), l->entries, l->used);
    std::memcpy(l->entries, ent.data(), ent.size());
    l->used = uint16_t(l->used + ent.size());
    l->count = uint16_t(l->count + 1);
  });
  std::string moved(reinterpret_cast<const char*>(ent.data() + kDirEntryFixed), ent[17]);
  std::vector<std::string> problems;
  uint64_t valid = 0;
  Status st = dir::Check(t.txn, kDirIno, *t.d, &problems, [&](const dir::Entry&) { valid++; });
  EXPECT_TRUE(st.Is(Code::kCorruption));
  ASSERT_EQ(problems.size(), 1u) << problems[0];
  EXPECT_TRUE(AnyProblemContains(problems, "misplaced")) << problems[0];
  EXPECT_TRUE(AnyProblemContains(problems, "leaf " + std::to_string(last)));
  EXPECT_TRUE(AnyProblemContains(problems, moved));
  EXPECT_EQ(valid, 2999u);
  EXPECT_TRUE(t.Lookup(moved).status().Is(Code::kNotFound));
}

TEST(DirTest, BadLengthsAreCorruptionNotCrashes) {
  Dir t;
  for (int i = 0; i < 3000; i++) ASSERT_TRUE(t.Add(Name(i), i + 1).ok());
  t.txn.Commit();
  uint64_t leaf = SomeLeaf(t, Name(7));
  // A name that is not there but belongs to `leaf`: looking for it walks the leaf.
  std::string absent;
  for (int i = 0; absent.empty(); i++) {
    if (SomeLeaf(t, fmt::format("absent{}", i)) == leaf) absent = fmt::format("absent{}", i);
  }
  t.txn.Commit();
  const TrackingTxn saved = t.txn;
  const InodeBlock saved_d = *t.d;
  auto expect_corrupt = [&](const char* what) {
    // Lookup validates what it walks and stops at the name's position, so it may
    // miss damage behind it; Add/Remove/Replace validate the whole leaf chain.
    auto r = t.Lookup(absent);
    EXPECT_TRUE(r.status().Is(Code::kCorruption) || r.status().Is(Code::kNotFound)) << what;
    Status st = t.Remove(absent);
    EXPECT_TRUE(st.Is(Code::kCorruption)) << what;
    EXPECT_NE(st.message().find("dir 500: leaf"), std::string::npos)
        << what << ": " << st.ToString();
    EXPECT_TRUE(t.Add(absent, 1).Is(Code::kCorruption)) << what;
    EXPECT_TRUE(dir::Replace(t.txn, kDirIno, t.d.get(), absent, 3, 3).Is(Code::kCorruption))
        << what;
    (void)t.Remove(Name(7));  // may or may not see the damage; must not crash
    (void)t.Add(Name(7) + "q", 9);
    std::vector<std::string> problems;
    EXPECT_TRUE(dir::Check(t.txn, kDirIno, *t.d, &problems, nullptr).Is(Code::kCorruption)) << what;
    EXPECT_TRUE(AnyProblemContains(problems, "leaf " + std::to_string(leaf))) << what;
    // Put the leaf and the inode back.
    t.txn = saved;
    *t.d = saved_d;
  };
  EditSealed(t, leaf, [](uint8_t* b) { reinterpret_cast<DirLeaf*>(b)->used = 5000; });
  expect_corrupt("used too big");
  EditSealed(t, leaf, [](uint8_t* b) { reinterpret_cast<DirLeaf*>(b)->count = 1000; });
  expect_corrupt("count too big");
  EditSealed(t, leaf, [](uint8_t* b) {
    auto* l = reinterpret_cast<DirLeaf*>(b);
    for (size_t off = 0, i = 0; i < l->count; i++) {
      size_t sz = kDirEntryFixed + l->entries[off + 17];
      if (i + 1 == l->count) l->entries[off + 17] = 255;  // runs past `used`
      off += sz;
    }
  });
  expect_corrupt("last name length too big");
  EditSealed(t, leaf, [](uint8_t* b) { reinterpret_cast<DirLeaf*>(b)->entries[17] = 0; });
  expect_corrupt("empty name");
  EditSealed(t, leaf, [](uint8_t* b) { reinterpret_cast<DirLeaf*>(b)->local_depth = 60; });
  expect_corrupt("depth too big");
  EditSealed(t, leaf, [](uint8_t* b) { reinterpret_cast<DirLeaf*>(b)->next = 12345; });
  expect_corrupt("chain to nowhere");
  EditSealed(t, leaf, [](uint8_t* b) { reinterpret_cast<DirLeaf*>(b)->dir_ino = 7; });
  expect_corrupt("wrong directory");
  t.CheckClean();

  // Inline directory with a bad count.
  Dir u;
  ASSERT_TRUE(u.Add("a", 1).ok());
  u.d->size = 500;
  EXPECT_TRUE(u.Lookup("b").status().Is(Code::kCorruption));
  EXPECT_TRUE(u.Add("b", 2).Is(Code::kCorruption));
  u.d->size = 2;
  EXPECT_TRUE(u.Lookup("b").status().Is(Code::kCorruption));
  u.d->size = 1;
  u.d->data[17] = 200;  // name runs into zeros: still parses, but hash mismatch
  std::vector<std::string> problems;
  EXPECT_TRUE(dir::Check(u.txn, kDirIno, *u.d, &problems, nullptr).Is(Code::kCorruption));
  // Hashed root with a bad depth.
  Dir w;
  for (int i = 0; i < 300; i++) ASSERT_TRUE(w.Add(Name(i), i + 1).ok());
  reinterpret_cast<DirRoot*>(w.d->data)->global_depth = 40;
  EXPECT_TRUE(w.Lookup(Name(1)).status().Is(Code::kCorruption));
  EXPECT_TRUE(w.Add("zz", 1).Is(Code::kCorruption));
  EXPECT_TRUE(dir::Check(w.txn, kDirIno, *w.d, nullptr, nullptr).Is(Code::kCorruption));
}

TEST(DirTest, CheckReportsTableInconsistentWithDepths) {
  Dir t;
  for (int i = 0; i < 3000; i++) ASSERT_TRUE(t.Add(Name(i), i + 1).ok());
  t.txn.Commit();
  uint64_t tb0;
  std::memcpy(&tb0, t.d->data + sizeof(DirRoot), 8);
  // Point slot 0 at the leaf of slot 1's neighbour range: find a slot naming another leaf.
  const DirTable* tab = reinterpret_cast<const DirTable*>(t.txn.blocks()[tb0].data());
  uint64_t s0 = tab->slot[0], other = 0, other_slot = 0;
  for (size_t i = 1; i < kDirTableSlots && other == 0; i++) {
    if (tab->slot[i] != s0) {
      other = tab->slot[i];
      other_slot = i;
    }
  }
  ASSERT_NE(other, 0u);
  EditSealed(t, tb0, [&](uint8_t* b) { reinterpret_cast<DirTable*>(b)->slot[0] = other; });
  std::vector<std::string> problems;
  EXPECT_TRUE(dir::Check(t.txn, kDirIno, *t.d, &problems, nullptr).Is(Code::kCorruption));
  EXPECT_TRUE(AnyProblemContains(problems, "does not match table slot 0")) << problems[0];
  // A name hashing to slot 0 now reaches a leaf whose prefix does not cover it.
  for (int i = 0; i < 3000; i++) {
    uint64_t h = dir::NameHash(t.d->hash_seed, Name(i));
    if (h >> (63 - dir::ShapeOf(*t.d).global_depth) != 0) continue;
    auto r = t.Lookup(Name(i));
    ASSERT_TRUE(r.status().Is(Code::kCorruption));
    EXPECT_NE(r.status().message().find("leaf " + std::to_string(other)), std::string::npos)
        << r.status().ToString();
    EXPECT_TRUE(t.Add(Name(i) + "new", 1).Is(Code::kCorruption) ||
                dir::NameHash(t.d->hash_seed, Name(i) + "new") >>
                        (63 - dir::ShapeOf(*t.d).global_depth) !=
                    0);
    break;
  }
  (void)other_slot;
  EXPECT_TRUE(dir::FreeAll(t.txn, kDirIno, t.d.get()).Is(Code::kCorruption));
  EXPECT_GT(t.txn.used_blocks(), 0u);  // nothing freed
}

// Running out of blocks fails the Add cleanly: the directory stays valid and whole.
TEST(DirTest, NoSpaceLeavesTheDirectoryValid) {
  for (uint64_t blocks : {1, 2, 3, 5, 8, 13, 40}) {
    Dir t(blocks);
    int added = 0;
    Status st;
    for (int i = 0; i < 100000; i++) {
      st = t.Add(VarName(i), i + 1);
      if (!st.ok()) break;
      added++;
    }
    ASSERT_TRUE(st.Is(Code::kNoSpace)) << st.ToString();
    EXPECT_EQ(t.d->size, uint64_t(added));
    EXPECT_TRUE(t.Lookup(VarName(added)).status().Is(Code::kNotFound));
    for (int i = 0; i < added; i++) ASSERT_TRUE(t.Lookup(VarName(i)).ok()) << i;
    t.CheckClean();
    t.CheckLocks();
    // Removing makes room again.
    for (int i = 0; i < added; i += 2) ASSERT_TRUE(t.Remove(VarName(i)).ok());
    t.txn.Commit();
    t.CheckClean();
    t.CheckLocks();
  }
}

uint64_t EnvOr(const char* name, uint64_t dflt) {
  const char* v = std::getenv(name);
  return v != nullptr ? std::strtoull(v, nullptr, 10) : dflt;
}

// Random damage (resealed, so only the structure checks can catch it) never crashes.
// AGFS_FUZZ_ITERS / AGFS_FUZZ_SEED run it longer or differently.
void FuzzDir(Dir& base, const std::function<std::string(uint64_t)>& name, uint64_t n, uint64_t seed,
             int iters) {
  base.txn.Commit();
  std::vector<uint64_t> blocks;
  for (auto& [b, data] : base.txn.blocks()) blocks.push_back(b);
  std::mt19937_64 rng(seed);
  for (int iter = 0; iter < iters; iter++) {
    Dir t;
    t.txn = base.txn;
    *t.d = *base.d;
    int flips = 1 + int(rng() % 4);
    for (int f = 0; f < flips; f++) {
      if (blocks.empty() || rng() % 5 == 0) {
        if (rng() % 4 == 0) {  // inode fields: size, blocks, data_kind
          size_t which = rng() % 3;
          if (which == 0) t.d->size ^= uint64_t(1) << (rng() % 64);
          if (which == 1) t.d->blocks ^= uint64_t(1) << (rng() % 64);
          if (which == 2) t.d->data_kind ^= uint8_t(1u << (rng() % 3));
        } else {
          size_t off = rng() % (rng() % 2 ? 64 : kInodeDataSize);
          t.d->data[off] ^= uint8_t(1u << (rng() % 8));
        }
      } else {
        uint64_t b = blocks[rng() % blocks.size()];
        EditSealed(t, b, [&](uint8_t* p) {
          size_t off = sizeof(BlockHeader) + rng() % (kPayload);
          if (rng() % 2) off = sizeof(BlockHeader) + rng() % 64;  // headers more often
          p[off] ^= uint8_t(1u << (rng() % 8));
        });
      }
    }
    for (int k = 0; k < 20; k++) (void)t.Lookup(name(rng() % (n + 100)));
    (void)dir::List(t.txn, kDirIno, *t.d, rng() % 2 ? 0 : rng() >> 1,
                    [](const dir::Entry&) { return true; });
    (void)dir::Check(t.txn, kDirIno, *t.d, nullptr, nullptr);
    (void)dir::Empty(t.txn, kDirIno, *t.d);
    for (int k = 0; k < 30; k++) (void)t.Add(fmt::format("fuzz{}", k), 5);
    for (int k = 0; k < 30; k++) (void)t.Remove(name(rng() % n));
    for (int k = 0; k < 5; k++) {
      (void)dir::Replace(t.txn, kDirIno, t.d.get(), name(rng() % n), 4, 4);
    }
    (void)dir::Check(t.txn, kDirIno, *t.d, nullptr, nullptr);
    (void)dir::FreeAll(t.txn, kDirIno, t.d.get());
  }
}

TEST(DirTest, FuzzedBlocksNeverCrash) {
  const uint64_t seed = EnvOr("AGFS_FUZZ_SEED", 99);
  const int iters = int(EnvOr("AGFS_FUZZ_ITERS", 300));
  {
    Dir base;
    for (int i = 0; i < 1500; i++) ASSERT_TRUE(base.Add(VarName(i), i + 1).ok());
    FuzzDir(base, VarName, 1500, seed, iters);
  }
  {
    Dir base;
    for (int i = 0; i < 60; i++) ASSERT_TRUE(base.Add(Name(i), i + 1).ok());
    ASSERT_EQ(base.d->data_kind, uint8_t(DataKind::kInline));
    FuzzDir(base, Name, 60, seed + 1, iters);
  }
  {
    HashHook hook(XCollide);
    Dir base;
    auto name = [](uint64_t i) { return (i % 2 ? "x" : "") + Name(i); };
    for (int i = 0; i < 1200; i++) ASSERT_TRUE(base.Add(name(i), i + 1).ok());
    FuzzDir(base, name, 1200, seed + 2, iters);
  }
}

}  // namespace
}  // namespace agorafs
