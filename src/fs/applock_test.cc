// Application locks: the table's range arithmetic and encoding (applock.h), and the
// Filesystem calls with two nodes on one in-memory device (applock_ops.cc).
#include "fs/applock.h"

#include <gtest/gtest.h>

#include <sys/xattr.h>

#include <chrono>
#include <thread>
#include <tuple>

#include "device/fault_device.h"
#include "device/mem_device.h"
#include "fs/filesystem.h"
#include "fs/super.h"
#include "fs/test_mount_options.h"
#include "fsck/fsck.h"

namespace agorafs {
namespace {

using applock::kToEof;
using applock::Table;

AppLock Posix(AppLockType type, uint64_t start, uint64_t end, uint64_t owner, uint32_t slot = 0,
              uint64_t gen = 1) {
  AppLock l;
  l.kind = AppLockKind::kPosix;
  l.type = type;
  l.start = start;
  l.end = end;
  l.owner = owner;
  l.slot = slot;
  l.generation = gen;
  l.pid = 100 + static_cast<uint32_t>(owner);
  return l;
}
AppLock Flock(AppLockType type, uint64_t owner, uint32_t slot = 0, uint64_t gen = 1) {
  AppLock l = Posix(type, 0, kToEof, owner, slot, gen);
  l.kind = AppLockKind::kFlock;
  return l;
}
constexpr auto R = AppLockType::kRead;
constexpr auto W = AppLockType::kWrite;
constexpr auto U = AppLockType::kUnlock;

bool AllLive(uint32_t, uint64_t) { return true; }

// (type, start, end) of the entries of `owner`, in table order.
std::vector<std::tuple<AppLockType, uint64_t, uint64_t>> Ranges(const Table& t, uint64_t owner) {
  std::vector<std::tuple<AppLockType, uint64_t, uint64_t>> out;
  for (const auto& l : t) {
    if (l.owner == owner) out.emplace_back(l.type, l.start, l.end);
  }
  return out;
}
using Rg = std::vector<std::tuple<AppLockType, uint64_t, uint64_t>>;

TEST(AppLockTable, MergeAdjacentAndOverlappingRangesOfOneType) {
  Table t;
  applock::Apply(&t, Posix(W, 0, 9, 1));
  applock::Apply(&t, Posix(W, 10, 19, 1));
  EXPECT_EQ(Ranges(t, 1), (Rg{{W, 0, 19}}));
  applock::Apply(&t, Posix(W, 15, 29, 1));
  EXPECT_EQ(Ranges(t, 1), (Rg{{W, 0, 29}}));
  applock::Apply(&t, Posix(W, 40, kToEof, 1));
  EXPECT_EQ(Ranges(t, 1), (Rg{{W, 0, 29}, {W, 40, kToEof}}));
  applock::Apply(&t, Posix(W, 30, 39, 1));
  EXPECT_EQ(Ranges(t, 1), (Rg{{W, 0, kToEof}}));
}

TEST(AppLockTable, UnlockOfAMiddleRangeSplits) {
  Table t;
  applock::Apply(&t, Posix(W, 0, 99, 1));
  applock::Apply(&t, Posix(U, 40, 59, 1));
  EXPECT_EQ(Ranges(t, 1), (Rg{{W, 0, 39}, {W, 60, 99}}));
  applock::Apply(&t, Posix(U, 0, kToEof, 1));
  EXPECT_TRUE(t.empty());
}

TEST(AppLockTable, UpgradeAndDowngradeReplaceTheOwnersRangeOnly) {
  Table t;
  applock::Apply(&t, Posix(R, 0, 99, 1));
  applock::Apply(&t, Posix(W, 20, 29, 1));  // upgrade a middle part
  EXPECT_EQ(Ranges(t, 1), (Rg{{R, 0, 19}, {W, 20, 29}, {R, 30, 99}}));
  applock::Apply(&t, Posix(R, 20, 29, 1));  // downgrade: merges back
  EXPECT_EQ(Ranges(t, 1), (Rg{{R, 0, 99}}));
  applock::Apply(&t, Posix(R, 0, 9, 2));  // another owner's lock is left alone
  applock::Apply(&t, Posix(U, 0, kToEof, 1));
  EXPECT_EQ(Ranges(t, 2), (Rg{{R, 0, 9}}));
  EXPECT_EQ(t.size(), 1u);
}

TEST(AppLockTable, ConflictsOnlyBetweenOwnersWithAWriteLockOnOverlappingRanges) {
  Table t;
  applock::Apply(&t, Posix(W, 0, 99, 1));
  applock::Apply(&t, Posix(R, 200, 299, 2));
  EXPECT_EQ(applock::FindConflict(t, Posix(W, 50, 59, 3), AllLive), &t[0]);
  EXPECT_EQ(applock::FindConflict(t, Posix(R, 99, 99, 3), AllLive), &t[0]);
  EXPECT_EQ(applock::FindConflict(t, Posix(W, 100, 199, 3), AllLive), nullptr);
  EXPECT_EQ(applock::FindConflict(t, Posix(R, 250, 260, 3), AllLive), nullptr);
  EXPECT_EQ(applock::FindConflict(t, Posix(W, 250, 260, 3), AllLive), &t[1]);
  // The same owner never conflicts with itself; the same lock_owner on another node
  // (slot or generation) is another owner.
  EXPECT_EQ(applock::FindConflict(t, Posix(W, 0, 99, 1), AllLive), nullptr);
  EXPECT_NE(applock::FindConflict(t, Posix(W, 0, 99, 1, /*slot=*/1), AllLive), nullptr);
  EXPECT_NE(applock::FindConflict(t, Posix(W, 0, 99, 1, 0, /*gen=*/2), AllLive), nullptr);
  // Unlocks never conflict.
  EXPECT_EQ(applock::FindConflict(t, Posix(U, 0, kToEof, 3), AllLive), nullptr);
}

TEST(AppLockTable, FlockAndPosixDoNotConflictAndFlockConverts) {
  Table t;
  applock::Apply(&t, Flock(W, 1));
  EXPECT_EQ(applock::FindConflict(t, Posix(W, 0, kToEof, 2), AllLive), nullptr);
  EXPECT_NE(applock::FindConflict(t, Flock(R, 2), AllLive), nullptr);
  applock::Apply(&t, Flock(R, 1));  // LOCK_EX -> LOCK_SH in one step
  ASSERT_EQ(t.size(), 1u);
  EXPECT_EQ(t[0].type, R);
  EXPECT_EQ(applock::FindConflict(t, Flock(R, 2), AllLive), nullptr);
  applock::Apply(&t, Flock(R, 2));
  EXPECT_NE(applock::FindConflict(t, Flock(W, 3), AllLive), nullptr);
  EXPECT_EQ(applock::ReleaseOwner(&t, AppLockKind::kFlock, 0, 1, 1), 1u);
  EXPECT_EQ(applock::ReleaseOwner(&t, AppLockKind::kPosix, 0, 1, 2), 0u);
  EXPECT_EQ(t.size(), 1u);
}

TEST(AppLockTable, EntriesOfGoneOwnersAreIgnoredAndPruned) {
  Table t;
  applock::Apply(&t, Posix(W, 0, 99, 1, /*slot=*/3, /*gen=*/7));
  applock::Apply(&t, Posix(W, 0, 99, 2, /*slot=*/4, /*gen=*/1));
  auto slot3_gone = [](uint32_t s, uint64_t) { return s != 3; };
  const AppLock* c = applock::FindConflict(t, Posix(W, 10, 10, 9), slot3_gone);
  ASSERT_NE(c, nullptr);
  EXPECT_EQ(c->slot, 4u);
  EXPECT_EQ(applock::Prune(&t, slot3_gone), 1u);
  ASSERT_EQ(t.size(), 1u);
  EXPECT_EQ(t[0].slot, 4u);
}

TEST(AppLockTable, EncodeDecodeRoundTrip) {
  Table t;
  applock::Apply(&t, Posix(W, 5, 99, 0xfedcba9876543210ull, 7, 0x1122334455667788ull));
  applock::Apply(&t, Flock(R, 3, 1, 2));
  applock::Apply(&t, Posix(R, 100, kToEof, 4, 0, 1));
  std::string b = applock::Encode(t);
  EXPECT_EQ(b.size(), applock::kHeaderSize + 3 * applock::kEntrySize);
  auto back = applock::Decode(b);
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(*back, t);
  EXPECT_TRUE(applock::Decode(applock::Encode({})).ok());
}

TEST(AppLockTable, CorruptTablesAreCorruptionNeverACrash) {
  Table t;
  applock::Apply(&t, Posix(W, 5, 99, 1));
  const std::string good = applock::Encode(t);
  auto corrupt = [](std::string b) {
    auto r = applock::Decode(b);
    return !r.ok() && r.status().Is(Code::kCorruption);
  };
  EXPECT_TRUE(corrupt(""));
  EXPECT_TRUE(corrupt(good.substr(0, 3)));
  EXPECT_TRUE(corrupt(good.substr(0, good.size() - 1)));
  EXPECT_TRUE(corrupt(good + "x"));
  std::string b = good;
  b[0] = 2;  // version
  EXPECT_TRUE(corrupt(b));
  b = good;
  b[2] = 2;  // count says 2
  EXPECT_TRUE(corrupt(b));
  b = good;
  b[4] = 9;  // kind
  EXPECT_TRUE(corrupt(b));
  b = good;
  b[5] = 0;  // type unlock is never stored
  EXPECT_TRUE(corrupt(b));
  b = good;
  b[4 + 24] = static_cast<char>(200);  // start 200 > end 99
  EXPECT_TRUE(corrupt(b));
  // Every single-byte change of every position decodes or is kCorruption.
  for (size_t i = 0; i < good.size(); i++) {
    for (int v : {0x00, 0x01, 0x7f, 0xff}) {
      std::string x = good;
      x[i] = static_cast<char>(v);
      auto r = applock::Decode(x);
      EXPECT_TRUE(r.ok() || r.status().Is(Code::kCorruption));
    }
  }
}

TEST(AppLockTable, WaitsRoundTripAndBadOnesAreCorruption) {
  applock::Waits w = {{77, Posix(W, 5, 99, 3, 1, 2)}, {1u << 20, Posix(R, 0, kToEof, 4)}};
  const std::string good = applock::EncodeWaits(w);
  EXPECT_EQ(good.size(), applock::kHeaderSize + 2 * applock::kWaitEntrySize);
  auto back = applock::DecodeWaits(good);
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(*back, w);
  EXPECT_TRUE(applock::CheckInternalXattr(applock::kWaitsXattrName, good).ok());
  auto corrupt = [](const std::string& b) {
    return applock::CheckInternalXattr(applock::kWaitsXattrName, b).Is(Code::kCorruption);
  };
  EXPECT_TRUE(corrupt(good.substr(0, good.size() - 1)));
  EXPECT_TRUE(corrupt(applock::EncodeWaits({{0, Posix(W, 5, 99, 3)}})));     // inode 0
  EXPECT_TRUE(corrupt(applock::EncodeWaits({{77, Flock(W, 3)}})));           // flock
  // A lock table is not a list of waits, nor the other way round.
  EXPECT_TRUE(corrupt(applock::Encode({Posix(W, 5, 99, 3)})));
  EXPECT_TRUE(applock::CheckInternalXattr(applock::kXattrName, good).Is(Code::kCorruption));
  for (size_t i = 0; i < good.size(); i++) {
    std::string x = good;
    x[i] = static_cast<char>(0xff);
    auto r = applock::DecodeWaits(x);
    EXPECT_TRUE(r.ok() || r.status().Is(Code::kCorruption));
  }
}

// ---------------------------------------------------------------- Filesystem, 2 nodes

class AppLockFsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    mem_ = std::make_shared<MemDevice>(uint64_t(128) << 20);
    MkfsOptions mo;
    mo.params.node_slots = 2;
    ASSERT_TRUE(Mkfs(mem_.get(), mo).ok());
    a_ = Node("a");
    b_ = Node("b");
    ASSERT_TRUE(a_ && b_);
    auto f = a_->Mknod(caller_, a_->root_ino(), "f", S_IFREG | 0644, 0);
    ASSERT_TRUE(f.ok()) << f.status().ToString();
    ino_ = f->ino;
  }
  void TearDown() override {
    for (auto* n : {&a_, &b_}) {
      if (*n) {
        EXPECT_TRUE((*n)->Unmount().ok());
      }
      n->reset();
    }
  }
  std::unique_ptr<Filesystem> Node(const std::string& host) {
    MountOptions o = FastTestMountOptions();
    o.host = host;
    auto r = Filesystem::Mount(std::make_unique<FaultDevice>(mem_), o);
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return r.ok() ? std::move(r).value() : nullptr;
  }
  static AppLock Want(AppLockKind kind, AppLockType type, uint64_t start, uint64_t end,
                      uint64_t owner, uint32_t pid = 42) {
    AppLock l;
    l.kind = kind;
    l.type = type;
    l.start = start;
    l.end = end;
    l.owner = owner;
    l.pid = pid;
    return l;
  }
  std::shared_ptr<MemDevice> mem_;
  std::unique_ptr<Filesystem> a_, b_;
  Caller caller_;
  uint64_t ino_ = 0;
};

TEST_F(AppLockFsTest, LocksOfOneNodeAreHonouredOnTheOther) {
  const auto P = AppLockKind::kPosix;
  ASSERT_TRUE(a_->SetLock(ino_, Want(P, W, 0, 99, 1, 4242)).ok());
  // B: the overlapping range is refused, the next one is free.
  Status st = b_->SetLock(ino_, Want(P, W, 50, 59, 1));
  EXPECT_TRUE(st.Is(Code::kAgain)) << st.ToString();
  EXPECT_TRUE(b_->SetLock(ino_, Want(P, W, 100, 199, 1)).ok());
  // F_GETLK on B reports A's lock with pid 0 (another node's pid means nothing here);
  // on A, the local holder's pid.
  auto t = b_->TestLock(ino_, Want(P, R, 0, kToEof, 9));
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  EXPECT_EQ(t->type, W);
  EXPECT_EQ(t->start, 0u);
  EXPECT_EQ(t->end, 99u);
  EXPECT_EQ(t->pid, 0u);
  auto ta = a_->TestLock(ino_, Want(P, R, 0, 10, 9));
  ASSERT_TRUE(ta.ok());
  EXPECT_EQ(ta->pid, 4242u);
  auto none = b_->TestLock(ino_, Want(P, W, 300, 400, 9));
  ASSERT_TRUE(none.ok());
  EXPECT_EQ(none->type, U);
  // flock is independent of POSIX locks.
  const auto F = AppLockKind::kFlock;
  ASSERT_TRUE(a_->SetLock(ino_, Want(F, W, 0, kToEof, 5)).ok());
  EXPECT_TRUE(b_->SetLock(ino_, Want(F, R, 0, kToEof, 6)).Is(Code::kAgain));
  // Close on A (flush of owner 1) drops its POSIX locks; release drops the flock.
  ASSERT_TRUE(a_->ReleaseLocks(ino_, P, 1).ok());
  EXPECT_TRUE(b_->SetLock(ino_, Want(P, W, 50, 59, 1)).ok());
  ASSERT_TRUE(a_->ReleaseLocks(ino_, F, 5).ok());
  EXPECT_TRUE(b_->SetLock(ino_, Want(F, R, 0, kToEof, 6)).ok());
  // The table is invisible to users and changes no times.
  Caller root;
  auto list = a_->ListXattr(root, ino_);
  ASSERT_TRUE(list.ok());
  EXPECT_EQ(*list, "");
  EXPECT_TRUE(a_->GetXattr(root, ino_, "agorafs.locks").status().Is(Code::kNotSupported));
  EXPECT_TRUE(a_->SetXattr(root, ino_, "agorafs.locks", "x", 0).Is(Code::kNotSupported));
  // User xattrs live beside it.
  ASSERT_TRUE(a_->SetXattr(root, ino_, "user.k", "v", 0).ok());
  EXPECT_EQ(*a_->ListXattr(root, ino_), std::string("user.k\0", 7));
  EXPECT_TRUE(a_->SetLock(ino_, Want(F, W, 0, kToEof, 5)).Is(Code::kAgain));
}

// F_SETLKW that would close a cycle of waiting owners answers EDEADLK, wherever the
// owners run; a wait that closes none, a non-blocking request and flock just wait.
TEST_F(AppLockFsTest, AWaitThatClosesACycleOfWaitersIsADeadlock) {
  const auto P = AppLockKind::kPosix;
  std::vector<uint64_t> f = {ino_};
  for (const char* n : {"g", "h"}) {
    auto r = a_->Mknod(caller_, a_->root_ino(), n, S_IFREG | 0644, 0);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    f.push_back(r->ino);
  }
  // A's owner 1 holds f0, B's owner 2 holds f1; owner 1 waits for f1.
  ASSERT_TRUE(a_->SetLock(f[0], Want(P, W, 0, 9, 1)).ok());
  ASSERT_TRUE(b_->SetLock(f[1], Want(P, W, 0, kToEof, 2)).ok());
  EXPECT_TRUE(a_->SetLock(f[1], Want(P, W, 0, 0, 1), true).Is(Code::kAgain));
  // Owner 2 waiting for f0 would close the cycle; asking without waiting is no wait.
  Status st = b_->SetLock(f[0], Want(P, R, 5, 5, 2), true);
  EXPECT_TRUE(st.Is(Code::kDeadlock)) << st.ToString();
  EXPECT_TRUE(b_->SetLock(f[0], Want(P, R, 5, 5, 2)).Is(Code::kAgain));
  // A range owner 1 does not hold, and an owner that holds nothing, are no cycle.
  EXPECT_TRUE(b_->SetLock(f[0], Want(P, R, 20, 30, 2), true).ok());
  EXPECT_TRUE(b_->SetLock(f[0], Want(P, W, 0, 0, 3), true).Is(Code::kAgain));
  ASSERT_TRUE(b_->CancelLockWait(f[0], Want(P, W, 0, 0, 3)).ok());
  // flock waits are not followed (as on Linux).
  const auto F = AppLockKind::kFlock;
  ASSERT_TRUE(a_->SetLock(f[2], Want(F, W, 0, kToEof, 1)).ok());
  EXPECT_TRUE(b_->SetLock(f[2], Want(F, W, 0, kToEof, 2), true).Is(Code::kAgain));

  // Three owners on two nodes: 1 (A) waits for 2 (B) as before, 2 waits for owner 4
  // (A) on f2, and 4 then waiting for f0 (held by 1) is the deadlock.
  ASSERT_TRUE(a_->SetLock(f[2], Want(P, W, 100, 199, 4)).ok());
  EXPECT_TRUE(b_->SetLock(f[2], Want(P, W, 150, 150, 2), true).Is(Code::kAgain));
  st = a_->SetLock(f[0], Want(P, W, 9, 9, 4), true);
  EXPECT_TRUE(st.Is(Code::kDeadlock)) << st.ToString();
  // Owner 1 stops waiting (a signal): 4 now just waits.
  ASSERT_TRUE(a_->CancelLockWait(f[1], Want(P, W, 0, 0, 1)).ok());
  EXPECT_TRUE(a_->SetLock(f[0], Want(P, W, 9, 9, 4), true).Is(Code::kAgain));
  ASSERT_TRUE(a_->CancelLockWait(f[0], Want(P, W, 9, 9, 4)).ok());

  // A granted wait is no wait any more: 1 waits for f1 again and gets it once 2
  // unlocks; 2 then waits for f0, which 1 holds, and that is no deadlock.
  EXPECT_TRUE(a_->SetLock(f[1], Want(P, W, 0, 0, 1), true).Is(Code::kAgain));
  ASSERT_TRUE(b_->SetLock(f[1], Want(P, U, 0, kToEof, 2)).ok());
  EXPECT_TRUE(a_->SetLock(f[1], Want(P, W, 0, 0, 1), true).ok());
  ASSERT_TRUE(b_->CancelLockWait(f[2], Want(P, W, 150, 150, 2)).ok());
  EXPECT_TRUE(b_->SetLock(f[0], Want(P, W, 0, 0, 2), true).Is(Code::kAgain));
  ASSERT_TRUE(b_->CancelLockWait(f[0], Want(P, W, 0, 0, 2)).ok());

  // The record is invisible to users, and fsck accepts it.
  Caller root;
  EXPECT_EQ(*a_->ListXattr(root, a_->root_ino()), "");
  EXPECT_TRUE(a_->SetLock(f[1], Want(P, W, 0, 0, 6), true).Is(Code::kAgain));  // kept
  EXPECT_TRUE(a_->GetXattr(root, a_->root_ino(), "agorafs.lockwaits").status().Is(
      Code::kNotSupported));
  for (auto* n : {&a_, &b_}) {
    ASSERT_TRUE((*n)->Unmount().ok());
    n->reset();
  }
  auto rep = Fsck(mem_.get(), FsckOptions{});
  ASSERT_TRUE(rep.ok()) << rep.status().ToString();
  EXPECT_EQ(rep->ExitCode(), 0) << rep->ToText();
}

TEST_F(AppLockFsTest, TimesDoNotMoveAndTheTableHasALimit) {
  auto before = a_->GetAttr(ino_);
  ASSERT_TRUE(before.ok());
  const auto P = AppLockKind::kPosix;
  Status st;
  size_t taken = 0;
  for (uint64_t i = 0; i < 100; i++) {
    st = a_->SetLock(ino_, Want(P, W, i * 10, i * 10 + 4, 7));
    if (!st.ok()) break;
    taken++;
  }
  EXPECT_TRUE(st.Is(Code::kNoLocks)) << st.ToString();
  EXPECT_EQ(taken, applock::kMaxEntries);
  auto after = a_->GetAttr(ino_);
  ASSERT_TRUE(after.ok());
  EXPECT_EQ(after->ctime.tv_sec, before->ctime.tv_sec);
  EXPECT_EQ(after->ctime.tv_nsec, before->ctime.tv_nsec);
  EXPECT_EQ(after->mtime.tv_nsec, before->mtime.tv_nsec);
  ASSERT_TRUE(a_->ReleaseLocks(ino_, P, 7).ok());
  EXPECT_TRUE(b_->SetLock(ino_, Want(P, W, 0, kToEof, 1)).ok());
}

TEST_F(AppLockFsTest, LocksOfANodeThatLeftAreIgnoredAndPruned) {
  const auto F = AppLockKind::kFlock;
  ASSERT_TRUE(b_->SetLock(ino_, Want(F, W, 0, kToEof, 3)).ok());
  EXPECT_TRUE(a_->SetLock(ino_, Want(F, W, 0, kToEof, 4)).Is(Code::kAgain));
  const uint32_t b_slot = b_->info().slot;
  const uint64_t b_gen = b_->info().generation;
  EXPECT_TRUE(a_->LockOwnerLive(b_slot, b_gen));
  // A generation a node has not seen yet is live (never a grant on a guess).
  EXPECT_TRUE(a_->LockOwnerLive(b_slot, b_gen + 5));
  ASSERT_TRUE(b_->Unmount().ok());  // leaves its entry on disk, slot free
  b_.reset();
  // A sees the slot free under that generation once its observer has read it.
  for (int i = 0; i < 200 && a_->LockOwnerLive(b_slot, b_gen); i++) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_FALSE(a_->LockOwnerLive(b_slot, b_gen));
  EXPECT_TRUE(a_->SetLock(ino_, Want(F, W, 0, kToEof, 4)).ok());
  auto t = a_->TestLock(ino_, Want(F, W, 0, kToEof, 9));
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(t->slot, a_->info().slot);  // A's own lock is the one that conflicts now
  EXPECT_TRUE(a_->SetLock(ino_, Want(F, U, 0, kToEof, 4)).ok());
  // A newer generation in B's slot makes the old one gone for that node too.
  b_ = Node("b2");
  ASSERT_TRUE(b_);
  EXPECT_FALSE(b_->LockOwnerLive(b_slot, b_gen));
  EXPECT_TRUE(b_->LockOwnerLive(a_->info().slot, a_->info().generation));
}

}  // namespace
}  // namespace agorafs
