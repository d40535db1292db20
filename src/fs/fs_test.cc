// Filesystem core tests without FUSE: MemDevice underneath, real journal and cache.
#include "fs/filesystem.h"

#include <dirent.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/xattr.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <functional>
#include <initializer_list>
#include <mutex>
#include <map>
#include <random>
#include <set>
#include <thread>

#include "device/fault_device.h"
#include "device/mem_device.h"
#include "fs/acl.h"
#include "fs/super.h"
#include "fs/test_mount_options.h"
#include "fsck/fsck.h"

namespace agorafs {
namespace {

class FsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    mem_ = std::make_shared<MemDevice>(uint64_t(256) << 20);
    MkfsOptions mo;
    mo.params.node_slots = 2;
    ASSERT_TRUE(Mkfs(mem_.get(), mo).ok());
    Remount();
  }
  void TearDown() override {
    if (fs_) {
      EXPECT_TRUE(fs_->Unmount().ok());
      fs_.reset();
    }
  }
  void Remount() {
    if (fs_) {
      ASSERT_TRUE(fs_->Unmount().ok());
      fs_.reset();
    }
    auto fault = std::make_unique<FaultDevice>(mem_);
    fault_ = fault.get();
    auto r = Filesystem::Mount(std::move(fault), NodeOptions());
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    fs_ = std::move(r).value();
  }
  // Short cluster timings (a crashed node is dead after 0.5 s), no background commits.
  static MountOptions NodeOptions() { return FastTestMountOptions(); }
  // Another node on the same device: its own slot, journal and cache.
  std::unique_ptr<Filesystem> MountSecondNode(bool background, FaultDevice** dev = nullptr) {
    MountOptions o = NodeOptions();
    o.store.background = background;
    o.host = "second";
    auto fault = std::make_unique<FaultDevice>(mem_);
    if (dev) *dev = fault.get();
    auto r = Filesystem::Mount(std::move(fault), o);
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return r.ok() ? std::move(r).value() : nullptr;
  }
  // Power cut: nothing more reaches the device; unflushed writes are lost.
  void CrashAndRemount() {
    fault_->SetGone(true);
    (void)fs_->Unmount();
    fs_.reset();
    mem_->Crash();
    Remount();
  }
  // kill -9 of the daemon: nothing more reaches the device, but everything written
  // so far stays (the host's page cache survives a process), committed or not.
  void KillAndRemount() {
    fault_->SetGone(true);
    (void)fs_->Unmount();
    fs_.reset();
    Remount();
  }
  uint64_t Root() { return fs_->root_ino(); }
  uint64_t Create(uint64_t dir, const std::string& name, uint32_t mode = S_IFREG | 0644) {
    auto r = fs_->Mknod(caller_, dir, name, mode, 0);
    EXPECT_TRUE(r.ok()) << name << ": " << r.status().ToString();
    return r.ok() ? r->ino : 0;
  }
  std::string ReadAll(uint64_t ino) {
    auto a = fs_->GetAttr(ino);
    EXPECT_TRUE(a.ok());
    std::string s(a->size, '\0');
    auto r = fs_->Read(ino, 0, s.size(), s.data());
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    s.resize(r.ok() ? *r : 0);
    return s;
  }
  void WriteAt(uint64_t ino, uint64_t off, const std::string& data) {
    auto r = fs_->Write(caller_, ino, off, data.data(), data.size());
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    ASSERT_EQ(*r, data.size());
  }
  // Runs `round` (writes that need intent) up to four times, until each of `nodes`
  // holds the filesystem lock in intent. A node whose last hold took the lock
  // exclusively (a mount, a create) asks exclusive even for intent, so it takes a round
  // or two of holds that used intent only. The caller checks the outcome.
  void SettleIntoIntent(std::initializer_list<Filesystem*> nodes,
                        const std::function<void()>& round) {
    for (int i = 0; i < 4; i++) {
      round();
      if (HasFatalFailure()) return;
      if (std::all_of(nodes.begin(), nodes.end(), [](Filesystem* n) {
            return n->lock_service()->Held(kFsLock) == LockMode::kIntent;
          })) {
        return;
      }
    }
  }
  // The AG where a node's allocations under intent start: its slot's share of them.
  static uint32_t FirstAg(Filesystem* n) {
    const Geometry& g = n->store()->geometry();
    return static_cast<uint32_t>(uint64_t(n->info().slot) * g.ag_count / g.node_slots);
  }
  // Unmounts this node (the last one) and checks the image: fsck must find it clean.
  void UnmountAndExpectClean() {
    ASSERT_TRUE(fs_->Unmount().ok());
    fs_.reset();
    auto rep = Fsck(mem_.get(), FsckOptions{});
    ASSERT_TRUE(rep.ok()) << rep.status().ToString();
    EXPECT_EQ(rep->ExitCode(), 0) << rep->ToText();
  }
  std::set<std::string> List(uint64_t dir) {
    std::set<std::string> names;
    EXPECT_TRUE(fs_->ReadDir(dir, 0, false, [&](const DirEntryOut& e) {
                     names.insert(e.name);
                     return true;
                   }).ok());
    return names;
  }

  std::shared_ptr<MemDevice> mem_;
  FaultDevice* fault_ = nullptr;
  std::unique_ptr<Filesystem> fs_;
  Caller caller_;
};

TEST_F(FsTest, CreateWriteReadInlineAndExtents) {
  uint64_t f = Create(Root(), "a");
  WriteAt(f, 0, "hello");
  EXPECT_EQ(ReadAll(f), "hello");
  std::string big(100000, 'x');
  for (size_t i = 0; i < big.size(); i++) big[i] = char('a' + i % 26);
  WriteAt(f, 3, big);  // converts inline data to extents, keeps the first bytes
  std::string want = "hel" + big;
  EXPECT_EQ(ReadAll(f), want);
  Remount();
  EXPECT_EQ(ReadAll(f), want);
}

TEST_F(FsTest, SparseWritesAndTruncate) {
  uint64_t f = Create(Root(), "sparse");
  WriteAt(f, 1 << 20, "end");
  auto a = fs_->GetAttr(f);
  EXPECT_EQ(a->size, (1u << 20) + 3);
  std::string s = ReadAll(f);
  EXPECT_EQ(s.substr(0, 10), std::string(10, '\0'));
  EXPECT_EQ(s.substr(1 << 20), "end");
  SetAttrRequest r;
  r.size = true;
  r.new_size = 5000;
  ASSERT_TRUE(fs_->SetAttr(caller_, f, r).ok());
  r.new_size = (1 << 20) + 3;
  ASSERT_TRUE(fs_->SetAttr(caller_, f, r).ok());
  EXPECT_EQ(ReadAll(f), std::string((1 << 20) + 3, '\0'));  // no stale "end"
  auto seek = fs_->Lseek(f, 0, SEEK_DATA);
  EXPECT_FALSE(seek.ok());  // nothing but holes now
}

TEST_F(FsTest, DirectoriesRenameUnlink) {
  auto d = fs_->Mkdir(caller_, Root(), "d", 0755);
  ASSERT_TRUE(d.ok());
  for (int i = 0; i < 500; i++) Create(d->ino, "f" + std::to_string(i));
  EXPECT_EQ(List(d->ino).size(), 502u);
  ASSERT_TRUE(fs_->Rename(caller_, d->ino, "f1", Root(), "moved", 0).ok());
  EXPECT_TRUE(fs_->Lookup(Root(), "moved").ok());
  EXPECT_TRUE(fs_->Lookup(d->ino, "f1").status().Is(Code::kNotFound));
  EXPECT_TRUE(fs_->Rename(caller_, d->ino, "f2", Root(), "moved", RENAME_NOREPLACE)
                  .Is(Code::kExists));
  ASSERT_TRUE(fs_->Rename(caller_, d->ino, "f2", Root(), "moved", RENAME_EXCHANGE).ok());
  EXPECT_TRUE(fs_->Lookup(d->ino, "f2").ok());
  EXPECT_TRUE(fs_->Rmdir(caller_, Root(), "d").Is(Code::kNotEmpty));
  for (int i = 0; i < 500; i++) {
    if (i == 1) continue;
    ASSERT_TRUE(fs_->Unlink(caller_, d->ino, "f" + std::to_string(i)).ok()) << i;
  }
  EXPECT_TRUE(fs_->Rename(caller_, Root(), "d", d->ino, "inside", 0).Is(Code::kInvalid));
  ASSERT_TRUE(fs_->Rmdir(caller_, Root(), "d").ok());
  auto root = fs_->GetAttr(Root());
  EXPECT_EQ(root->nlink, 2u);
  Remount();
  EXPECT_EQ(List(Root()), (std::set<std::string>{".", "..", "moved"}));
}

TEST_F(FsTest, UnlinkedOpenFileStaysUntilReleased) {
  uint64_t f = Create(Root(), "tmp");
  WriteAt(f, 0, std::string(50000, 'z'));
  uint64_t before = fs_->StatFs()->bfree;
  ASSERT_TRUE(fs_->Open(f, O_RDWR, caller_).ok());
  ASSERT_TRUE(fs_->Unlink(caller_, Root(), "tmp").ok());
  EXPECT_EQ(ReadAll(f).size(), 50000u);
  fs_->Release(f);
  ASSERT_TRUE(fs_->SyncAll().ok());
  ASSERT_TRUE(fs_->store()->Sync().ok());
  EXPECT_GT(fs_->StatFs()->bfree, before);
}

TEST_F(FsTest, OrphanOfCrashedMountIsFreedAtNextMount) {
  uint64_t f = Create(Root(), "victim");
  WriteAt(f, 0, std::string(200000, 'v'));
  ASSERT_TRUE(fs_->Open(f, O_RDWR, caller_).ok());
  ASSERT_TRUE(fs_->Unlink(caller_, Root(), "victim").ok());
  ASSERT_TRUE(fs_->SyncAll().ok());
  uint64_t free_before = fs_->StatFs()->bfree;
  CrashAndRemount();
  EXPECT_GE(fs_->info().orphans_freed, 1u);
  EXPECT_GT(fs_->StatFs()->bfree, free_before + 40);
}

TEST_F(FsTest, FsyncedDataSurvivesCrash) {
  uint64_t f = Create(Root(), "durable");
  WriteAt(f, 0, std::string(300000, 'd'));
  ASSERT_TRUE(fs_->Fsync(f, false).ok());
  uint64_t g = Create(Root(), "lost-maybe");
  WriteAt(g, 0, "unsynced");
  CrashAndRemount();
  auto a = fs_->Lookup(Root(), "durable");
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(ReadAll(a->ino), std::string(300000, 'd'));
}

// An append whose data reached the device but whose commit did not leaves bytes past
// the end of file in the last block. Nothing that later moves the end of file up may
// show them: every such call must read zeros there.
TEST_F(FsTest, BytesAnInterruptedAppendLeftPastTheEndReadAsZeros) {
  const uint64_t kOld = 65536 + 101;  // ends inside a block
  const std::vector<std::string> names = {"truncate", "write-same-block", "write-gap",
                                          "fallocate"};
  std::vector<uint64_t> inos;
  std::string head(kOld, '\0');
  for (size_t i = 0; i < head.size(); i++) head[i] = char('a' + i % 26);
  for (const auto& n : names) {
    inos.push_back(Create(Root(), n));
    WriteAt(inos.back(), 0, head);
  }
  ASSERT_TRUE(fs_->SyncAll().ok());
  for (uint64_t ino : inos) WriteAt(ino, kOld, std::string(20000, 'X'));  // never committed
  KillAndRemount();
  for (uint64_t ino : inos) ASSERT_EQ(fs_->GetAttr(ino)->size, kOld);

  const uint64_t kNew = 300000;
  SetAttrRequest grow;
  grow.size = true;
  grow.new_size = kNew;
  ASSERT_TRUE(fs_->SetAttr(caller_, inos[0], grow).ok());
  WriteAt(inos[1], kOld + 500, "y");        // starts in the old last block
  WriteAt(inos[2], kNew - 1, "y");          // leaves a gap of whole blocks
  ASSERT_TRUE(fs_->Fallocate(caller_, inos[3], 0, 0, kNew).ok());
  for (size_t i = 0; i < inos.size(); i++) {
    std::string got = ReadAll(inos[i]);
    ASSERT_GT(got.size(), kOld + 100) << names[i];
    EXPECT_EQ(got.substr(0, kOld), head) << names[i];
    const size_t x = got.find('X');
    EXPECT_EQ(x, std::string::npos) << names[i] << ": the lost append shows at " << x;
  }
}

TEST_F(FsTest, XattrsInlineAndExternal) {
  uint64_t f = Create(Root(), "x");
  ASSERT_TRUE(fs_->SetXattr(caller_, f, "user.a", "1", 0).ok());
  EXPECT_TRUE(fs_->SetXattr(caller_, f, "user.a", "2", XATTR_CREATE).Is(Code::kExists));
  EXPECT_TRUE(fs_->SetXattr(caller_, f, "user.b", "2", XATTR_REPLACE).Is(Code::kNoData));
  std::string big(2000, 'b');
  ASSERT_TRUE(fs_->SetXattr(caller_, f, "user.big", big, 0).ok());
  ASSERT_TRUE(fs_->SetXattr(caller_, f, "user.big2", big, 0).ok());
  EXPECT_TRUE(fs_->SetXattr(caller_, f, "user.big3", std::string(3000, 'c'), 0).Is(Code::kNoSpace));
  Remount();
  EXPECT_EQ(*fs_->GetXattr(caller_, f, "user.big"), big);
  EXPECT_EQ(*fs_->GetXattr(caller_, f, "user.a"), "1");
  auto list = fs_->ListXattr(caller_, f);
  EXPECT_EQ(*list, std::string("user.a\0user.big\0user.big2\0", 26));
  ASSERT_TRUE(fs_->RemoveXattr(caller_, f, "user.big").ok());
  ASSERT_TRUE(fs_->RemoveXattr(caller_, f, "user.big2").ok());
  EXPECT_TRUE(fs_->GetXattr(caller_, f, "user.big").status().Is(Code::kNoData));
  Caller user;
  user.uid = 1000;
  EXPECT_TRUE(fs_->SetXattr(user, f, "trusted.t", "v", 0).Is(Code::kPermission));
  EXPECT_TRUE(fs_->SetXattr(caller_, f, "weird.t", "v", 0).Is(Code::kNotSupported));
}

// POSIX ACLs: the filesystem keeps the ACL and the mode consistent (the kernel
// evaluates them; tests/integration/test_security.py checks enforcement).
TEST_F(FsTest, AccessAclSetsModeAndChmodRewritesIt) {
  using namespace acl;
  uint64_t f = Create(Root(), "acl", S_IFREG | 0644);
  Acl a = {{kUserObj, 6, kUndefinedId}, {kUser, 7, 1000}, {kGroupObj, 4, kUndefinedId},
           {kMask, 5, kUndefinedId}, {kOther, 0, kUndefinedId}};
  ASSERT_TRUE(fs_->SetXattr(caller_, f, kAccessName, Encode(a), 0).ok());
  EXPECT_EQ(fs_->GetAttr(f)->mode & 07777, 0650u);  // group bits = mask
  EXPECT_EQ(*fs_->GetXattr(caller_, f, kAccessName), Encode(a));
  // chmod rewrites owner, mask and other; named entries stay.
  SetAttrRequest r;
  r.mode = true;
  r.new_mode = 0741;
  ASSERT_TRUE(fs_->SetAttr(caller_, f, r).ok());
  Remount();
  auto got = Decode(*fs_->GetXattr(caller_, f, kAccessName));
  ASSERT_TRUE(got.ok());
  Acl want = {{kUserObj, 7, kUndefinedId}, {kUser, 7, 1000}, {kGroupObj, 4, kUndefinedId},
              {kMask, 4, kUndefinedId}, {kOther, 1, kUndefinedId}};
  EXPECT_EQ(*got, want);
  // An ACL that says no more than the mode is not stored: it only sets the mode.
  ASSERT_TRUE(fs_->SetXattr(caller_, f, kAccessName, Encode(FromMode(0604)), 0).ok());
  EXPECT_EQ(fs_->GetAttr(f)->mode & 07777, 0604u);
  EXPECT_TRUE(fs_->GetXattr(caller_, f, kAccessName).status().Is(Code::kNoData));
  // Invalid values, the wrong caller, symlinks and default ACLs on files are refused.
  EXPECT_TRUE(fs_->SetXattr(caller_, f, kAccessName, "junk", 0).Is(Code::kInvalid));
  Caller other;
  other.uid = 1000;
  EXPECT_TRUE(fs_->SetXattr(other, f, kAccessName, Encode(a), 0).Is(Code::kPermission));
  EXPECT_TRUE(fs_->SetXattr(caller_, f, kDefaultName, Encode(a), 0).Is(Code::kAccess));
  auto l = fs_->Symlink(caller_, Root(), "ln", "acl");
  ASSERT_TRUE(l.ok());
  EXPECT_TRUE(fs_->SetXattr(caller_, l->ino, kAccessName, Encode(a), 0).Is(Code::kNotSupported));
  // The owner (not root) may set it; a set-group-ID bit it could not set goes.
  uint64_t g = Create(Root(), "sgid", S_IFREG | 02755);
  SetAttrRequest own;
  own.uid = own.gid = true;
  own.new_uid = 1000;
  own.new_gid = 77;
  ASSERT_TRUE(fs_->SetAttr(caller_, g, own).ok());
  r.new_mode = 02755;
  ASSERT_TRUE(fs_->SetAttr(caller_, g, r).ok());
  ASSERT_TRUE(fs_->SetXattr(other, g, kAccessName, Encode(a), 0).ok());
  EXPECT_EQ(fs_->GetAttr(g)->mode & 07777, 0650u);
}

TEST_F(FsTest, DefaultAclIsInheritedAndUmaskOnlyWithoutOne) {
  using namespace acl;
  Caller c = caller_;
  c.umask = 027;
  // Without a default ACL the umask applies.
  auto plain = fs_->Mkdir(c, Root(), "plain", 0777);
  ASSERT_TRUE(plain.ok());
  EXPECT_EQ(plain->mode & 07777, 0750u);
  auto pf = fs_->Mknod(c, plain->ino, "f", S_IFREG | 0666, 0);
  ASSERT_TRUE(pf.ok());
  EXPECT_EQ(pf->mode & 07777, 0640u);
  // With one, the umask does not; the default ACL limits the requested mode instead.
  Acl d = {{kUserObj, 7, kUndefinedId}, {kUser, 7, 1000}, {kGroupObj, 5, kUndefinedId},
           {kMask, 7, kUndefinedId}, {kOther, 5, kUndefinedId}};
  ASSERT_TRUE(fs_->SetXattr(caller_, plain->ino, kDefaultName, Encode(d), 0).ok());
  auto f = fs_->Mknod(c, plain->ino, "file", S_IFREG | 0666, 0);
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(f->mode & 07777, 0664u);  // rw- / mask rw- / r--
  auto fa = Decode(*fs_->GetXattr(caller_, f->ino, kAccessName));
  ASSERT_TRUE(fa.ok());
  Acl want = {{kUserObj, 6, kUndefinedId}, {kUser, 7, 1000}, {kGroupObj, 5, kUndefinedId},
              {kMask, 6, kUndefinedId}, {kOther, 4, kUndefinedId}};
  EXPECT_EQ(*fa, want);
  EXPECT_TRUE(fs_->GetXattr(caller_, f->ino, kDefaultName).status().Is(Code::kNoData));
  // A subdirectory inherits both: the access ACL and the default ACL itself.
  auto sub = fs_->Mkdir(c, plain->ino, "sub", 0755);
  ASSERT_TRUE(sub.ok());
  EXPECT_EQ(sub->mode & 07777, 0755u);
  EXPECT_EQ(*fs_->GetXattr(caller_, sub->ino, kDefaultName), Encode(d));
  EXPECT_TRUE(fs_->GetXattr(caller_, sub->ino, kAccessName).ok());
  auto deeper = fs_->Mknod(c, sub->ino, "deeper", S_IFREG | 0600, 0);
  ASSERT_TRUE(deeper.ok());
  EXPECT_EQ(deeper->mode & 07777, 0600u);
  // Symlinks take nothing.
  auto ln = fs_->Symlink(c, plain->ino, "ln", "file");
  ASSERT_TRUE(ln.ok());
  EXPECT_EQ(ln->mode & 07777, 0777u);
  // Removing the default ACL brings the umask back; everything stays consistent.
  ASSERT_TRUE(fs_->RemoveXattr(caller_, plain->ino, kDefaultName).ok());
  auto after = fs_->Mknod(c, plain->ino, "after", S_IFREG | 0666, 0);
  ASSERT_TRUE(after.ok());
  EXPECT_EQ(after->mode & 07777, 0640u);
  EXPECT_TRUE(fs_->GetXattr(caller_, after->ino, kAccessName).status().Is(Code::kNoData));
  UnmountAndExpectClean();
}

TEST_F(FsTest, FallocateAndSeekHoles) {
  uint64_t f = Create(Root(), "fa");
  WriteAt(f, 0, std::string(8192, 'a'));
  ASSERT_TRUE(fs_->Fallocate(caller_, f, 0, 1 << 20, 1 << 20).ok());
  EXPECT_EQ(fs_->GetAttr(f)->size, 2u << 20);
  EXPECT_EQ(*fs_->Lseek(f, 0, SEEK_DATA), 0u);
  EXPECT_EQ(*fs_->Lseek(f, 0, SEEK_HOLE), 8192u);
  EXPECT_TRUE(fs_->Lseek(f, 8192, SEEK_DATA).status().Is(Code::kNoAddress));
  ASSERT_TRUE(fs_->Fallocate(caller_, f, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 100, 5000).ok());
  std::string s = ReadAll(f);
  EXPECT_EQ(s.substr(0, 100), std::string(100, 'a'));
  EXPECT_EQ(s.substr(100, 5000), std::string(5000, '\0'));
  EXPECT_EQ(s.substr(5100, 3092), std::string(3092, 'a'));
}

TEST_F(FsTest, PermissionsAndOwnership) {
  Caller alice;
  alice.uid = 1000;
  alice.gid = 1000;
  uint64_t f = Create(Root(), "p", S_IFREG | 06755);
  SetAttrRequest chown;
  chown.uid = true;
  chown.new_uid = 1000;
  EXPECT_TRUE(fs_->SetAttr(alice, f, chown).status().Is(Code::kPermission));
  ASSERT_TRUE(fs_->SetAttr(caller_, f, chown).ok());
  auto a = fs_->GetAttr(f);
  EXPECT_EQ(a->uid, 1000u);
  EXPECT_EQ(a->mode & (S_ISUID | S_ISGID), 0u);  // chown cleared both
  SetAttrRequest chmod;
  chmod.mode = true;
  chmod.new_mode = 04755;
  ASSERT_TRUE(fs_->SetAttr(alice, f, chmod).ok());
  WriteAt(f, 0, "x");  // root writes: keeps suid
  EXPECT_TRUE(fs_->GetAttr(f)->mode & S_ISUID);
  ASSERT_TRUE(fs_->Write(alice, f, 0, "y", 1).ok());  // others clear it
  EXPECT_FALSE(fs_->GetAttr(f)->mode & S_ISUID);
  // setgid directory: new entries inherit its group; subdirectories inherit the bit.
  auto d = fs_->Mkdir(caller_, Root(), "sg", 02777);
  SetAttrRequest chg;
  chg.gid = true;
  chg.new_gid = 50;
  ASSERT_TRUE(fs_->SetAttr(caller_, d->ino, chg).ok());
  auto sub = fs_->Mkdir(alice, d->ino, "sub", 0755);
  EXPECT_EQ(sub->gid, 50u);
  EXPECT_TRUE(sub->mode & S_ISGID);
  // Sticky directory: alice cannot remove root's file.
  auto t = fs_->Mkdir(caller_, Root(), "tmpdir", 01777);
  Create(t->ino, "rootfile");
  EXPECT_TRUE(fs_->Unlink(alice, t->ino, "rootfile").Is(Code::kPermission));
}

TEST_F(FsTest, NamesAreChecked) {
  EXPECT_TRUE(fs_->Mknod(caller_, Root(), std::string(256, 'n'), S_IFREG | 0644, 0)
                  .status()
                  .Is(Code::kNameTooLong));
  Create(Root(), std::string(255, 'n'));
  EXPECT_TRUE(fs_->Mknod(caller_, Root(), "dup", S_IFREG, 0).ok());
  EXPECT_TRUE(fs_->Mknod(caller_, Root(), "dup", S_IFREG, 0).status().Is(Code::kExists));
}

TEST_F(FsTest, NoSpaceIsCleanAndAccountingRecovers) {
  uint64_t free0 = fs_->StatFs()->bfree;
  uint64_t f = Create(Root(), "fill");
  std::string chunk(1 << 20, 'f');
  uint64_t off = 0;
  Status last;
  for (;;) {
    auto r = fs_->Write(caller_, f, off, chunk.data(), chunk.size());
    if (!r.ok()) {
      last = r.status();
      break;
    }
    off += *r;
  }
  EXPECT_TRUE(last.Is(Code::kNoSpace)) << last.ToString();
  ASSERT_TRUE(fs_->Unlink(caller_, Root(), "fill").ok());
  ASSERT_TRUE(fs_->store()->Sync().ok());
  Remount();
  EXPECT_EQ(fs_->StatFs()->bfree, free0);
}

// The kernel's forget of a deleted inode comes after the unlink's reply, queued behind
// every other forget: an unlink that finds this node's orphan list full waits for room
// instead of failing at once, and reports ENOSPC, changing nothing, only when no room
// comes.
TEST_F(FsTest, UnlinkWaitsForRoomOnTheOrphanList) {
  const size_t cap = size_t(kSlotOrphanBlocks) * kOrphansPerBlock;
  std::vector<uint64_t> held;  // referenced as if by the kernel
  for (size_t i = 0; i <= cap + 1; i++) {
    uint64_t f = Create(Root(), "o" + std::to_string(i));
    auto a = fs_->GetAttr(f);
    ASSERT_TRUE(a.ok());
    fs_->AddRef(f, a->generation);
    held.push_back(f);
  }
  for (size_t i = 0; i < cap; i++) {
    ASSERT_TRUE(fs_->Unlink(caller_, Root(), "o" + std::to_string(i)).ok()) << i;
  }
  // Full. The forget of the first comes while the next unlink waits.
  std::thread forgetter([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    fs_->Forget(held[0], 1);
  });
  Status waited = fs_->Unlink(caller_, Root(), "o" + std::to_string(cap));
  forgetter.join();
  EXPECT_TRUE(waited.ok()) << waited.ToString();
  // Full again, and nothing is forgotten: ENOSPC after the wait, nothing changed.
  Status full = fs_->Unlink(caller_, Root(), "o" + std::to_string(cap + 1));
  EXPECT_TRUE(full.Is(Code::kNoSpace)) << full.ToString();
  EXPECT_TRUE(fs_->Lookup(Root(), "o" + std::to_string(cap + 1)).ok());
  // Once the kernel lets go, every orphan is freed and the last name can go.
  EXPECT_EQ(fs_->info().orphans_freed, 1u);
  for (size_t i = 1; i <= cap + 1; i++) fs_->Forget(held[i], 1);
  EXPECT_EQ(fs_->info().orphans_freed, cap + 1);
  ASSERT_TRUE(fs_->Unlink(caller_, Root(), "o" + std::to_string(cap + 1)).ok());
  UnmountAndExpectClean();
}

TEST_F(FsTest, DeviceErrorsBecomeEioAndNothingIsAcknowledgedFalsely) {
  uint64_t f = Create(Root(), "io");
  WriteAt(f, 0, std::string(100000, 'a'));
  ASSERT_TRUE(fs_->Fsync(f, false).ok());
  // A failing data write: the call fails, the file keeps its old contents.
  fault_->FailNth(IoKind::kWrite, 1);
  auto w = fs_->Write(caller_, f, 0, std::string(8192, 'b').data(), 8192);
  EXPECT_TRUE(w.status().Is(Code::kIOError));
  // A failing read.
  fault_->FailNth(IoKind::kRead, 1);
  std::string buf(4096, '\0');
  EXPECT_TRUE(fs_->Read(f, 0, buf.size(), buf.data()).status().Is(Code::kIOError));
  // A failing flush: fsync must not report success.
  WriteAt(f, 200000, "tail");
  fault_->FailNth(IoKind::kFlush, 1);
  EXPECT_FALSE(fs_->Fsync(f, false).ok());
  // The journal can no longer be written: every later change fails, nothing is lost
  // that an fsync acknowledged.
  EXPECT_FALSE(fs_->health().ok());
  EXPECT_FALSE(fs_->Mknod(caller_, Root(), "after", S_IFREG | 0644, 0).ok());
  CrashAndRemount();
  auto a = fs_->Lookup(Root(), "io");
  ASSERT_TRUE(a.ok());
  std::string got = ReadAll(a->ino);
  EXPECT_EQ(got.substr(0, 100000), std::string(100000, 'a'));
}

TEST_F(FsTest, DeviceThatDisappearsStopsTheNodeCleanly) {
  uint64_t f = Create(Root(), "gone");
  WriteAt(f, 0, "kept");
  ASSERT_TRUE(fs_->Fsync(f, false).ok());
  fault_->SetGone(true);
  EXPECT_FALSE(fs_->Write(caller_, f, 0, "x", 1).ok() && fs_->Fsync(f, false).ok());
  EXPECT_FALSE(fs_->Mknod(caller_, Root(), "n", S_IFREG | 0644, 0).ok() &&
               fs_->SyncAll().ok());
  CrashAndRemount();
  auto a = fs_->Lookup(Root(), "gone");
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(ReadAll(a->ino).substr(0, 4), "kept");
}

// The journal cannot be written: the fsync fails, the node stops and writes nothing
// more anywhere outside its slot; what was fsynced before survives, fsck is clean.
TEST_F(FsTest, JournalWriteFailureStopsTheNodeAndNothingElseIsWritten) {
  uint64_t f = Create(Root(), "synced");
  WriteAt(f, 0, std::string(50000, 'a'));
  ASSERT_TRUE(fs_->Fsync(f, false).ok());
  auto sb = ReadSuperblock(mem_.get());
  ASSERT_TRUE(sb.ok());
  const Geometry g = GeometryOf(*sb);
  const uint64_t from = g.journal_start * kBlockSize;
  fault_->FailRange(from, mem_->Size() - from, false, true);
  auto lost = fs_->Mknod(caller_, Root(), "lost", S_IFREG | 0644, 0);
  if (lost.ok()) {
    (void)fs_->Write(caller_, lost->ino, 0, std::string(20000, 'l').data(), 20000);
    EXPECT_FALSE(fs_->Fsync(lost->ino, false).ok());
  } else {
    EXPECT_TRUE(lost.status().Is(Code::kIOError)) << lost.status().ToString();
  }
  EXPECT_FALSE(fs_->SyncAll().ok());
  EXPECT_FALSE(fs_->health().ok());
  // Stopped: later calls fail without even trying to write the journal or data area.
  const uint64_t attempts = fault_->injected();
  auto m = fs_->Mknod(caller_, Root(), "after", S_IFREG | 0644, 0);
  EXPECT_TRUE(m.status().Is(Code::kIOError)) << m.status().ToString();
  auto w = fs_->Write(caller_, f, 0, "b", 1);
  EXPECT_FALSE(w.ok() && fs_->Fsync(f, false).ok());
  EXPECT_FALSE(fs_->SyncAll().ok());
  EXPECT_EQ(fault_->injected(), attempts);
  fault_->ClearRanges();
  CrashAndRemount();
  auto a = fs_->Lookup(Root(), "synced");
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(ReadAll(a->ino), std::string(50000, 'a'));
  UnmountAndExpectClean();
}

// fsyncgate: once a flush failed, no later fsync may report success for data that
// was only covered by the failed flush, even though the device works again.
TEST_F(FsTest, FailedFlushIsNeverAcknowledgedByALaterFsync) {
  uint64_t f = Create(Root(), "f");
  WriteAt(f, 0, std::string(100000, 'a'));
  ASSERT_TRUE(fs_->Fsync(f, false).ok());
  WriteAt(f, 0, std::string(8192, 'b'));  // in place: data only, no new blocks
  fault_->FailNth(IoKind::kFlush, 1);
  EXPECT_FALSE(fs_->Fsync(f, false).ok());
  EXPECT_FALSE(fs_->Fsync(f, false).ok());
  EXPECT_FALSE(fs_->Fsync(f, true).ok());
  EXPECT_FALSE(fs_->SyncAll().ok());
  CrashAndRemount();  // the unsynced overwrite may or may not be there; the rest is
  auto a = fs_->Lookup(Root(), "f");
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(ReadAll(a->ino).substr(8192), std::string(100000 - 8192, 'a'));
}

// A failed metadata read answers EIO to that call only: the node carries on.
TEST_F(FsTest, MetadataReadErrorIsEioAndTheNodeCarriesOn) {
  uint64_t f = Create(Root(), "r");
  WriteAt(f, 0, "data");
  ASSERT_TRUE(fs_->Fsync(f, false).ok());
  Remount();  // nothing cached
  fault_->FailRange(f * kBlockSize, kBlockSize, true, false);
  auto a = fs_->Lookup(Root(), "r");
  EXPECT_TRUE(a.status().Is(Code::kIOError)) << a.status().ToString();
  fault_->ClearRanges();
  EXPECT_TRUE(fs_->health().ok());
  a = fs_->Lookup(Root(), "r");
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  EXPECT_EQ(ReadAll(a->ino), "data");
  uint64_t n = Create(Root(), "n");
  WriteAt(n, 0, "new");
  EXPECT_TRUE(fs_->Fsync(n, false).ok());
}

// Regression: the stale-inode check read the inode's bitmap bit, so one damaged bitmap
// block made every inode of its range answer EIO.
TEST_F(FsTest, DamagedBitmapBlockLeavesItsInodesReachable) {
  uint64_t f = Create(Root(), "f");
  WriteAt(f, 0, std::string(10000, 'f'));
  Remount();
  auto sb = ReadSuperblock(mem_.get());
  ASSERT_TRUE(sb.ok());
  const Geometry g = GeometryOf(*sb);
  AlignedBuffer zero(kBlockSize);
  ASSERT_TRUE(mem_->Write((g.AgStart(g.AgOf(f)) + 1) * kBlockSize, zero.data(), kBlockSize).ok());
  auto a = fs_->Lookup(Root(), "f");
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  fs_->AddRef(a->ino, a->generation);  // as the FUSE adapter does: now checked for staleness
  EXPECT_EQ(ReadAll(a->ino), std::string(10000, 'f'));
  EXPECT_TRUE(fs_->GetAttr(a->ino).ok());
  uint64_t n = Create(Root(), "new");
  WriteAt(n, 0, std::string(100000, 'n'));
  EXPECT_TRUE(fs_->Fsync(n, false).ok());
  EXPECT_EQ(ReadAll(n), std::string(100000, 'n'));
}

// Regression: freed space waited for a checkpoint that only journal pressure caused,
// so a rewrite loop hit ENOSPC with the disk nearly empty.
TEST_F(FsTest, RewritingOneFileNeverRunsOutOfFreedSpace) {
  uint64_t f = Create(Root(), "loop");
  std::string chunk(8 << 20, 'r');
  for (int i = 0; i < 80; i++) {  // 640 MiB through a 256 MiB device
    auto w = fs_->Write(caller_, f, 0, chunk.data(), chunk.size());
    ASSERT_TRUE(w.ok()) << "iteration " << i << ": " << w.status().ToString();
    SetAttrRequest r;
    r.size = true;
    r.new_size = 0;
    ASSERT_TRUE(fs_->SetAttr(caller_, f, r).ok());
  }
}

// Regression: the heartbeat rewrote the slot from a copy that said "free", so a live
// node looked unmounted and a second mount took its slot and journal.
TEST_F(FsTest, HeartbeatKeepsTheSlotMarkedMounted) {
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // several heartbeats
  auto sb = ReadSuperblock(mem_.get());
  ASSERT_TRUE(sb.ok());
  Geometry g = GeometryOf(*sb);
  AlignedBuffer b(kBlockSize);
  uint64_t blk = g.SlotBlock(fs_->info().slot, kSlotHeartbeat);
  ASSERT_TRUE(mem_->Read(blk * kBlockSize, b.data(), kBlockSize).ok());
  const auto* slot = reinterpret_cast<const SlotBlock*>(b.data());
  EXPECT_EQ(slot->state, uint32_t(kSlotMounted));
  EXPECT_GT(slot->counter, 2u);
}

// Two nodes in one process on one device: each sees the other's changes at once, the
// filesystem lock moves between them, and their slots differ.
// A node mounting into the slot another node left during this lock epoch sees what
// the remaining node changed since (it once took its predecessor's grants for its own).
TEST_F(FsTest, NodeInAFreedSlotSeesTheOthersChanges) {
  uint64_t f = Create(Root(), "f");
  auto b = MountSecondNode(true);
  ASSERT_TRUE(b);
  ASSERT_TRUE(b->Lookup(b->root_ino(), "f").ok());
  ASSERT_TRUE(b->GetXattr(caller_, f, "user.z").status().Is(Code::kNoData));
  ASSERT_TRUE(b->Unmount().ok());
  b.reset();
  ASSERT_TRUE(fs_->SetXattr(caller_, f, "user.z", "zz", 0).ok());
  ASSERT_TRUE(fs_->Mkdir(caller_, Root(), "d", 0755).ok());
  b = MountSecondNode(true);  // two slots: it takes the freed one
  ASSERT_TRUE(b);
  auto x = b->GetXattr(caller_, f, "user.z");
  ASSERT_TRUE(x.ok()) << x.status().ToString();
  EXPECT_EQ(*x, "zz");
  EXPECT_TRUE(b->Lookup(b->root_ino(), "d").ok());
  ASSERT_TRUE(b->Unmount().ok());
}

TEST_F(FsTest, SecondNodeSeesEveryChangeAtOnce) {
  std::unique_ptr<Filesystem> b = MountSecondNode(false);
  ASSERT_TRUE(b);
  EXPECT_NE(b->info().slot, fs_->info().slot);

  uint64_t f = Create(Root(), "shared");
  WriteAt(f, 0, "from A");
  auto la = b->Lookup(b->root_ino(), "shared");
  ASSERT_TRUE(la.ok()) << la.status().ToString();
  EXPECT_EQ(la->ino, f);
  std::string got(6, '\0');
  auto rr = b->Read(f, 0, 6, got.data());
  ASSERT_TRUE(rr.ok()) << rr.status().ToString();
  EXPECT_EQ(got, "from A");

  // B changes; A sees it.
  auto w = b->Write(caller_, f, 0, "FROM B, longer", 14);
  ASSERT_TRUE(w.ok()) << w.status().ToString();
  auto d = b->Mkdir(caller_, b->root_ino(), "dir-b", 0755);
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  EXPECT_EQ(ReadAll(f), "FROM B, longer");
  EXPECT_EQ(List(Root()), (std::set<std::string>{".", "..", "shared", "dir-b"}));
  EXPECT_GE(fs_->info().lock_revokes + b->info().lock_revokes, 2u);

  // A deletes the file while B's kernel still knows the inode number: B gets ESTALE
  // (never another file's data) once the inode is gone.
  b->AddRef(f, la->generation);
  ASSERT_TRUE(fs_->Unlink(caller_, Root(), "shared").ok());
  auto gone = b->GetAttr(f);
  ASSERT_FALSE(gone.ok());
  EXPECT_TRUE(gone.status().Is(Code::kStaleInode)) << gone.status().ToString();
  b->Forget(f, 1);

  // Space accounting agrees on both nodes.
  EXPECT_EQ(fs_->StatFs()->bfree, b->StatFs()->bfree);
  ASSERT_TRUE(b->Unmount().ok());
  // A goes on alone after B left.
  uint64_t g2 = Create(Root(), "after");
  WriteAt(g2, 0, "alone");
  EXPECT_EQ(ReadAll(g2), "alone");
}

// A node that holds the filesystem lock and is revoked down to intent (another node
// asked for intent, under which operations take inode locks of their own) keeps
// nothing it cached under the filesystem lock alone, and takes back the kernel's
// attributes, exactly as when it gives the lock up. Its next readdir waits for the
// intent holder, then holds the lock exclusively (intent and shared make exclusive).
TEST_F(FsTest, RevokeToIntentDropsEverythingCachedUnderTheFilesystemLock) {
  uint64_t f = Create(Root(), "f");
  WriteAt(f, 0, "kept");
  std::unique_ptr<Filesystem> b = MountSecondNode(false);
  ASSERT_TRUE(b);
  std::atomic<int> lost{0};
  fs_->SetLockLossHook([&] { lost++; });
  // b's next hold uses intent only (after its mount's exclusive hold is taken from it),
  // so that it asks intent, not exclusive, after losing that one.
  Create(Root(), "x");
  ASSERT_TRUE(b->lock_service()->Lock(kFsLock, LockMode::kIntent).ok());
  b->lock_service()->Unpin(kFsLock);
  Create(Root(), "g");  // takes the lock back from b, exclusively
  ASSERT_EQ(fs_->lock_service()->Held(kFsLock), LockMode::kExclusive);
  EXPECT_GT(fs_->store()->stats().cached_blocks, 0u);
  const uint64_t epoch = fs_->lock_epoch();
  const int lost_before = lost.load();

  ASSERT_TRUE(b->lock_service()->Lock(kFsLock, LockMode::kIntent).ok());
  EXPECT_EQ(fs_->lock_service()->Held(kFsLock), LockMode::kIntent);
  EXPECT_EQ(fs_->store()->stats().cached_blocks, 0u);
  EXPECT_GT(fs_->lock_epoch(), epoch);
  EXPECT_EQ(lost.load(), lost_before + 1);

  std::atomic<bool> done{false};
  std::thread reader([&] {
    List(Root());  // a shared gate
    done = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_FALSE(done.load()) << "a shared gate passed while another node held intent";
  b->lock_service()->Unpin(kFsLock);
  reader.join();
  EXPECT_EQ(fs_->lock_service()->Held(kFsLock), LockMode::kExclusive);
  EXPECT_EQ(ReadAll(f), "kept");
  EXPECT_EQ(List(Root()), (std::set<std::string>{".", "..", "f", "g", "x"}));
  fs_->SetLockLossHook(nullptr);
  ASSERT_TRUE(b->Unmount().ok());
}

// Two nodes rewriting different files in place hold the filesystem lock together, in
// intent, each with its own file's inode lock: after the first handover the
// filesystem lock never moves. A read of the other node's file takes that inode's
// lock over (its writer writes the inode home first) and sees every write.
TEST_F(FsTest, NodesRewritingDifferentFilesInPlaceShareTheFilesystemLock) {
  const std::string base(3 * kBlockSize, 'o');
  const uint64_t fa = Create(Root(), "a");
  const uint64_t fb = Create(Root(), "b");
  WriteAt(fa, 0, base);
  WriteAt(fb, 0, base);  // allocated and written: later writes within are in place
  std::unique_ptr<Filesystem> b = MountSecondNode(false);
  ASSERT_TRUE(b);
  auto write_b = [&](uint64_t off, const std::string& d) {
    auto r = b->Write(caller_, fb, off, d.data(), d.size());
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    ASSERT_EQ(*r, d.size());
  };
  std::string want_a = base, want_b = base;
  // B's mount and A's creates were exclusive holds: a round or two before both
  // ask intent and hold it together.
  SettleIntoIntent({fs_.get(), b.get()}, [&] {
    write_b(0, "B0");
    WriteAt(fa, 0, "A0");
  });
  want_b.replace(0, 2, "B0");
  want_a.replace(0, 2, "A0");
  ASSERT_EQ(fs_->lock_service()->Held(kFsLock), LockMode::kIntent);
  ASSERT_EQ(b->lock_service()->Held(kFsLock), LockMode::kIntent);
  const uint64_t fs_revokes = fs_->info().lock_revokes + b->info().lock_revokes;
  const uint64_t inode_revokes = fs_->info().inode_lock_revokes + b->info().inode_lock_revokes;

  std::mt19937 rng(7);
  for (int i = 0; i < 200; i++) {
    const std::string d = "<" + std::to_string(i) + ">";
    const uint64_t off = rng() % (base.size() - d.size());
    if (i % 2) {
      WriteAt(fa, off, d);
      want_a.replace(off, d.size(), d);
    } else {
      write_b(off, d);
      want_b.replace(off, d.size(), d);
    }
    if (i % 50 == 0) {
      ASSERT_TRUE(fs_->Fsync(fa, false).ok());
      ASSERT_TRUE(b->Fsync(fb, false).ok());
    }
  }
  EXPECT_EQ(fs_->info().lock_revokes + b->info().lock_revokes, fs_revokes);
  EXPECT_EQ(fs_->info().inode_lock_revokes + b->info().inode_lock_revokes, inode_revokes);
  auto before = fs_->GetAttr(fb);  // under intent and fb's lock, shared with B's
  ASSERT_TRUE(before.ok()) << before.status().ToString();
  EXPECT_EQ(before->lock_epoch, 0u) << "attributes read under intent promised to the kernel";

  // Each node reads the other's file: the inode locks move, the filesystem lock not.
  EXPECT_EQ(ReadAll(fb), want_b);
  std::string got(want_a.size(), '\0');
  auto r = b->Read(fa, 0, got.size(), got.data());
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(got, want_a);
  EXPECT_GT(b->info().inode_lock_revokes + fs_->info().inode_lock_revokes, inode_revokes);
  write_b(5, "later");  // takes fb's lock back from A's read
  want_b.replace(5, 5, "later");
  auto after = fs_->GetAttr(fb);
  ASSERT_TRUE(after.ok()) << after.status().ToString();
  EXPECT_TRUE(after->mtime.tv_sec > before->mtime.tv_sec ||
              (after->mtime.tv_sec == before->mtime.tv_sec &&
               after->mtime.tv_nsec > before->mtime.tv_nsec));
  EXPECT_EQ(ReadAll(fb), want_b);
  EXPECT_EQ(fs_->info().lock_revokes + b->info().lock_revokes, fs_revokes);

  ASSERT_TRUE(b->Unmount().ok());
  UnmountAndExpectClean();
}

// Under intent a lookup takes the directory's inode lock and then the child's, both
// shared, and an open the file's: nodes writing their own files keep sharing the
// filesystem lock while they look names up and open files, and still see names
// another node created or removed since.
TEST_F(FsTest, LookupsAndOpensUnderIntentKeepTheFilesystemLockWithItsHolders) {
  const std::string base(2 * kBlockSize, 'o');
  const uint64_t fa = Create(Root(), "a");
  const uint64_t fb = Create(Root(), "b");
  auto md = fs_->Mkdir(caller_, Root(), "d", 0755);
  ASSERT_TRUE(md.ok()) << md.status().ToString();
  const uint64_t d = md->ino;
  const uint64_t x = Create(d, "x");
  WriteAt(fa, 0, base);
  WriteAt(fb, 0, base);
  std::unique_ptr<Filesystem> b = MountSecondNode(false);
  ASSERT_TRUE(b);
  auto write_b = [&](uint64_t off, const std::string& data) {
    auto r = b->Write(caller_, fb, off, data.data(), data.size());
    ASSERT_TRUE(r.ok()) << r.status().ToString();
  };
  SettleIntoIntent({fs_.get(), b.get()}, [&] {
    write_b(0, "B0");
    WriteAt(fa, 0, "A0");
  });
  ASSERT_EQ(fs_->lock_service()->Held(kFsLock), LockMode::kIntent);
  ASSERT_EQ(b->lock_service()->Held(kFsLock), LockMode::kIntent);
  const uint64_t fs_revokes = fs_->info().lock_revokes + b->info().lock_revokes;

  auto expect_lookup = [&](Filesystem* n, uint64_t dir, const char* name, uint64_t want) {
    uint64_t epoch = 99;
    auto r = n->Lookup(dir, name, &epoch);
    ASSERT_TRUE(r.ok()) << name << ": " << r.status().ToString();
    EXPECT_EQ(r->ino, want) << name;
    EXPECT_EQ(epoch, 0u) << name << ": a name found under intent promised to the kernel";
    EXPECT_EQ(r->lock_epoch, 0u) << name;
  };
  for (int i = 0; i < 3; i++) {
    expect_lookup(b.get(), Root(), "a", fa);
    expect_lookup(b.get(), Root(), "d", d);
    expect_lookup(b.get(), d, "x", x);
    expect_lookup(b.get(), d, ".", d);
    EXPECT_TRUE(b->Lookup(d, "missing", nullptr).status().Is(Code::kNotFound));
    ASSERT_TRUE(b->Open(fa, O_RDONLY, caller_).ok());
    b->Release(fa);
    expect_lookup(fs_.get(), Root(), "b", fb);
    expect_lookup(fs_.get(), d, "x", x);
    write_b(100, "B" + std::to_string(i));
    WriteAt(fa, 100, "A" + std::to_string(i));
  }
  auto size_a = b->Lookup(Root(), "a", nullptr);
  ASSERT_TRUE(size_a.ok());
  EXPECT_EQ(size_a->size, base.size());
  EXPECT_EQ(fs_->info().lock_revokes + b->info().lock_revokes, fs_revokes);
  EXPECT_EQ(fs_->lock_service()->Held(kFsLock), LockMode::kIntent);
  EXPECT_EQ(b->lock_service()->Held(kFsLock), LockMode::kIntent);

  // Names change under the filesystem lock held exclusively (for now): B sees them.
  const uint64_t y = Create(d, "y");
  ASSERT_TRUE(fs_->Unlink(caller_, d, "x").ok());
  auto ry = b->Lookup(d, "y", nullptr);
  ASSERT_TRUE(ry.ok()) << ry.status().ToString();
  EXPECT_EQ(ry->ino, y);
  EXPECT_TRUE(b->Lookup(d, "x", nullptr).status().Is(Code::kNotFound));
  // And again once both are back in intent, with the directory's blocks cached
  // under its lock on both nodes.
  SettleIntoIntent({fs_.get(), b.get()}, [&] {
    write_b(0, "B1");
    WriteAt(fa, 0, "A1");
  });
  ASSERT_EQ(b->lock_service()->Held(kFsLock), LockMode::kIntent);
  expect_lookup(b.get(), d, "y", y);
  EXPECT_TRUE(b->Lookup(d, "x", nullptr).status().Is(Code::kNotFound));
  expect_lookup(fs_.get(), d, "y", y);

  ASSERT_TRUE(b->Unmount().ok());
  UnmountAndExpectClean();
}

// A write that must allocate takes, under intent, the lock of its node's own AG (its
// slot's share of the AGs) beside the inode lock: two nodes appending to their own
// files keep sharing the filesystem lock, and neither takes the other's AG lock.
TEST_F(FsTest, AWriteThatAllocatesUnderIntentTakesItsNodesAgLockNotTheFilesystemLock) {
  const uint64_t fa = Create(Root(), "a");
  const uint64_t fb = Create(Root(), "b");
  WriteAt(fa, 0, std::string(kBlockSize, 'a'));
  WriteAt(fb, 0, std::string(kBlockSize, 'b'));
  std::unique_ptr<Filesystem> b = MountSecondNode(false);
  ASSERT_TRUE(b);
  b->AddRef(fb, 0);  // the kernel knows it: where the node remembers how writes went
  auto write_b = [&](uint64_t off, const std::string& d) {
    auto r = b->Write(caller_, fb, off, d.data(), d.size());
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    ASSERT_EQ(*r, d.size());
  };
  SettleIntoIntent({fs_.get(), b.get()}, [&] {
    write_b(0, "B");
    WriteAt(fa, 0, "A");
  });
  ASSERT_EQ(fs_->lock_service()->Held(kFsLock), LockMode::kIntent);
  ASSERT_EQ(b->lock_service()->Held(kFsLock), LockMode::kIntent);
  const uint32_t ags = fs_->store()->geometry().ag_count;
  ASSERT_GE(ags, 2u);
  const LockId ag_a = AgLock(FirstAg(fs_.get())), ag_b = AgLock(FirstAg(b.get()));
  ASSERT_NE(ag_a, ag_b);
  const uint64_t revokes = fs_->info().lock_revokes + b->info().lock_revokes;

  // Both nodes append, each in its own AG, without taking the filesystem lock from
  // the other; B's later writes take the AG lock at once (it remembers), in place too.
  std::string want_a = "A" + std::string(kBlockSize - 1, 'a');
  std::string want_b = "B" + std::string(kBlockSize - 1, 'b');
  for (int i = 1; i <= 8; i++) {
    const std::string ta(3 * kBlockSize + 17, char('0' + i)), tb(2 * kBlockSize + 5, char('a' + i));
    WriteAt(fa, want_a.size(), ta);
    want_a += ta;
    write_b(want_b.size(), tb);
    want_b += tb;
    write_b(1, "x");
    want_b[1] = 'x';
  }
  write_b(40 * kBlockSize, "tail");  // past the end, leaving a hole
  want_b.resize(40 * kBlockSize, '\0');
  want_b += "tail";
  // Preallocation beyond the end takes the AG lock too, not the filesystem lock.
  ASSERT_TRUE(b->Fallocate(caller_, fb, FALLOC_FL_KEEP_SIZE, want_b.size(), 16 * kBlockSize).ok());
  ASSERT_TRUE(b->Fallocate(caller_, fb, 0, want_b.size(), 3).ok());
  want_b += std::string(3, '\0');
  EXPECT_EQ(fs_->lock_service()->Held(kFsLock), LockMode::kIntent);
  EXPECT_EQ(b->lock_service()->Held(kFsLock), LockMode::kIntent);
  EXPECT_EQ(fs_->info().lock_revokes + b->info().lock_revokes, revokes);
  EXPECT_EQ(fs_->lock_service()->Held(ag_a), LockMode::kExclusive);
  EXPECT_EQ(b->lock_service()->Held(ag_b), LockMode::kExclusive);
  EXPECT_EQ(fs_->info().ag_lock_revokes + b->info().ag_lock_revokes, 0u);
  b->Forget(fb, 1);

  ASSERT_TRUE(b->Unmount().ok());
  EXPECT_EQ(ReadAll(fa), want_a);
  EXPECT_EQ(ReadAll(fb), want_b);
  UnmountAndExpectClean();
}

// A node whose own AG is full moves on to the next AG; once every AG is full the write
// fails with ENOSPC (after the filesystem lock held exclusively saw them all), and
// nothing is allocated twice: the AG lock a node takes over from another comes with
// that node's allocations written home.
TEST_F(FsTest, WritesUnderIntentMoveOnFromAFullAgAndEndInNoSpace) {
  const uint64_t fa = Create(Root(), "a");
  const uint64_t fb = Create(Root(), "b");
  WriteAt(fa, 0, std::string(kBlockSize, 'a'));
  WriteAt(fb, 0, std::string(kBlockSize, 'b'));
  std::unique_ptr<Filesystem> b = MountSecondNode(false);
  ASSERT_TRUE(b);
  auto write_b = [&](uint64_t off, const std::string& d) {
    return b->Write(caller_, fb, off, d.data(), d.size());
  };
  SettleIntoIntent({fs_.get(), b.get()}, [&] {
    ASSERT_TRUE(write_b(0, "B").ok());
    WriteAt(fa, 0, "A");
  });
  ASSERT_EQ(b->lock_service()->Held(kFsLock), LockMode::kIntent);
  const Geometry& g = fs_->store()->geometry();
  const LockId ag_a = AgLock(FirstAg(fs_.get()));
  const LockId ag_b = AgLock(FirstAg(b.get()));
  const LockId ag_next = AgLock((FirstAg(b.get()) + 1) % g.ag_count);
  std::string want_a = "A" + std::string(kBlockSize - 1, 'a');
  WriteAt(fa, want_a.size(), std::string(kBlockSize, 'c'));  // A takes its own AG
  want_a += std::string(kBlockSize, 'c');
  ASSERT_EQ(fs_->lock_service()->Held(ag_a), LockMode::kExclusive);

  // More than one AG holds: B goes on into the next one.
  const std::string chunk(1 << 20, 'z');
  uint64_t size_b = kBlockSize;
  while (size_b < uint64_t(g.ag_blocks) * kBlockSize * 3 / 2) {
    auto r = write_b(size_b, chunk);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    size_b += chunk.size();
  }
  EXPECT_EQ(b->lock_service()->Held(kFsLock), LockMode::kIntent);
  EXPECT_EQ(b->lock_service()->Held(ag_b), LockMode::kExclusive);
  EXPECT_EQ(b->lock_service()->Held(ag_next), LockMode::kExclusive);
  EXPECT_EQ(b->info().alloc_ag, FirstAg(b.get()) + 1);

  // Until the disk is full: B passes through A's AG too, taking its lock over.
  Status last;
  for (int i = 0; i < 100000; i++) {
    auto r = write_b(size_b, chunk);
    if (!r.ok()) {
      last = r.status();
      break;
    }
    size_b += chunk.size();
  }
  ASSERT_TRUE(last.Is(Code::kNoSpace)) << last.ToString();
  EXPECT_GE(fs_->info().ag_lock_revokes, 1u);
  auto ra = fs_->Write(caller_, fa, want_a.size(), "more", 4);
  ASSERT_FALSE(ra.ok());
  EXPECT_TRUE(ra.status().Is(Code::kNoSpace)) << ra.status().ToString();

  // B gives most of it back (under the filesystem lock held exclusively); both append
  // again, and B, having seen the lock go, goes back to its own AG.
  EXPECT_NE(b->info().alloc_ag, FirstAg(b.get()));
  SetAttrRequest shrink;
  shrink.size = true;
  shrink.new_size = 3 * kBlockSize;
  ASSERT_TRUE(b->SetAttr(caller_, fb, shrink).ok());
  size_b = 3 * kBlockSize;
  for (int i = 0; i < 4; i++) {
    WriteAt(fa, want_a.size(), std::string(2 * kBlockSize, char('0' + i)));
    want_a += std::string(2 * kBlockSize, char('0' + i));
    auto r = write_b(size_b, std::string(kBlockSize, char('k' + i)));
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    size_b += kBlockSize;
  }
  EXPECT_EQ(b->lock_service()->Held(kFsLock), LockMode::kIntent);
  EXPECT_EQ(b->info().alloc_ag, FirstAg(b.get()));
  ASSERT_TRUE(b->Unmount().ok());
  EXPECT_EQ(ReadAll(fa), want_a);
  std::string tail(4 * kBlockSize, '\0');
  ASSERT_EQ(fs_->Read(fb, 3 * kBlockSize, tail.size(), tail.data()).value(), tail.size());
  EXPECT_EQ(tail, std::string(kBlockSize, 'k') + std::string(kBlockSize, 'l') +
                      std::string(kBlockSize, 'm') + std::string(kBlockSize, 'n'));
  UnmountAndExpectClean();
}

// A file deleted and freed on one node while another node's kernel still knows it:
// that node's calls under intent answer ESTALE, as under the filesystem lock. The
// freed inode block keeps its last copy at home, which looks alive; only the
// allocation bitmap tells, and intent holders read it (nobody frees beside them).
TEST_F(FsTest, AFileFreedOnAnotherNodeIsStaleUnderIntentToo) {
  const uint64_t f = Create(Root(), "f");
  const uint64_t g = Create(Root(), "g");
  WriteAt(f, 0, std::string(2 * kBlockSize, 'f'));
  WriteAt(g, 0, std::string(kBlockSize, 'g'));
  std::unique_ptr<Filesystem> b = MountSecondNode(false);
  ASSERT_TRUE(b);
  auto la = b->Lookup(b->root_ino(), "f");
  ASSERT_TRUE(la.ok()) << la.status().ToString();
  b->AddRef(f, la->generation);
  // Holds that use intent only, so that B asks intent next, not exclusive.
  SettleIntoIntent({b.get()}, [&] {
    auto wg = b->Write(caller_, g, 0, "B", 1);
    ASSERT_TRUE(wg.ok()) << wg.status().ToString();
    WriteAt(g, 1, "A");
  });
  ASSERT_FALSE(HasFatalFailure());
  ASSERT_TRUE(fs_->Unlink(caller_, Root(), "f").ok());  // open nowhere: freed at once

  auto w = b->Write(caller_, f, 0, "late", 4);  // B asks intent for an in-place write
  ASSERT_FALSE(w.ok()) << "a write to a freed inode succeeded";
  EXPECT_TRUE(w.status().Is(Code::kStaleInode)) << w.status().ToString();
  ASSERT_EQ(b->lock_service()->Held(kFsLock), LockMode::kIntent);
  auto a = b->GetAttr(f);  // B holds intent: under intent as well
  ASSERT_FALSE(a.ok());
  EXPECT_TRUE(a.status().Is(Code::kStaleInode)) << a.status().ToString();
  std::string buf(4, '\0');
  auto r = b->Read(f, 0, buf.size(), buf.data());
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.status().Is(Code::kStaleInode)) << r.status().ToString();
  b->Forget(f, 1);

  ASSERT_TRUE(b->Unmount().ok());
  UnmountAndExpectClean();
}

// Images carry kIncompatIntentLocks: a binary that does not know lock mode 3 must not
// mount them beside nodes that use it. A bit this binary does not know is refused
// the same way, with one clear sentence.
TEST_F(FsTest, MountRefusesIncompatibleFeaturesItDoesNotKnow) {
  ASSERT_TRUE(fs_->Unmount().ok());
  fs_.reset();
  auto sb = ReadSuperblock(mem_.get());
  ASSERT_TRUE(sb.ok());
  EXPECT_EQ(sb->features_incompat, kIncompatIntentLocks);
  const uint64_t copies[] = {0, 1, sb->total_blocks - 1};
  AlignedBuffer blk(kBlockSize);
  for (uint64_t c : copies) {
    ASSERT_TRUE(mem_->Read(c * kBlockSize, blk.data(), kBlockSize).ok());
    reinterpret_cast<Superblock*>(blk.data())->features_incompat |= 1ull << 40;
    SealBlock(blk.data());
    ASSERT_TRUE(mem_->Write(c * kBlockSize, blk.data(), kBlockSize).ok());
  }
  auto r = Filesystem::Mount(std::make_unique<FaultDevice>(mem_), NodeOptions());
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.status().Is(Code::kNotSupported)) << r.status().ToString();
  EXPECT_NE(r.status().message().find("newer agorafs"), std::string::npos)
      << r.status().ToString();
}

// A file deleted on one node stays readable and writable on a node that has it open
// (it moves onto that node's orphan list), and its space comes back once that node
// closes it.
TEST_F(FsTest, FileDeletedOnOneNodeStaysUsableWhereItIsOpen) {
  const std::string data(200000, 'a');
  uint64_t f = Create(Root(), "shared");
  WriteAt(f, 0, data);
  auto b = MountSecondNode(false);
  ASSERT_TRUE(b);
  auto la = b->Lookup(b->root_ino(), "shared");
  ASSERT_TRUE(la.ok()) << la.status().ToString();
  b->AddRef(f, la->generation);
  ASSERT_TRUE(b->Open(f, O_RDWR, caller_).ok());
  const uint64_t free_before = fs_->StatFs()->bfree;  // A takes the lock back from B
  ASSERT_TRUE(fs_->Unlink(caller_, Root(), "shared").ok());
  EXPECT_EQ(fs_->info().orphans_handed_over, 1u);
  EXPECT_EQ(fs_->info().orphans_freed, 0u);

  std::string got(data.size(), '\0');
  auto r = b->Read(f, 0, got.size(), got.data());
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(got, data);
  auto w = b->Write(caller_, f, data.size(), "tail", 4);
  ASSERT_TRUE(w.ok()) << w.status().ToString();
  auto at = b->GetAttr(f);
  ASSERT_TRUE(at.ok()) << at.status().ToString();
  EXPECT_EQ(at->nlink, 0u);
  EXPECT_EQ(at->size, data.size() + 4);
  EXPECT_TRUE(fs_->Lookup(Root(), "shared").status().Is(Code::kNotFound));
  EXPECT_LE(fs_->StatFs()->bfree, free_before);

  // The close on B asks its janitor to sweep its orphan list.
  b->Release(f);
  for (int i = 0; i < 500 && b->info().orphans_freed == 0; i++) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(b->info().orphans_freed, 1u);
  EXPECT_GT(fs_->StatFs()->bfree, free_before + 40);
  b->Forget(f, 1);
  ASSERT_TRUE(b->Unmount().ok());
  b.reset();
  UnmountAndExpectClean();
}

// The node holding a deleted file open crashes: the survivor recovers it, adopts the
// orphan and frees it. A node that closed the file before the delete does not keep it.
TEST_F(FsTest, FileOpenOnACrashedNodeIsFreedAfterRecovery) {
  uint64_t kept = Create(Root(), "kept");
  WriteAt(kept, 0, std::string(200000, 'k'));
  uint64_t closed = Create(Root(), "closed");
  WriteAt(closed, 0, std::string(200000, 'c'));
  FaultDevice* bdev = nullptr;
  auto b = MountSecondNode(false, &bdev);
  ASSERT_TRUE(b);
  for (uint64_t ino : {kept, closed}) {
    b->AddRef(ino, 0);
    ASSERT_TRUE(b->Open(ino, O_RDONLY, caller_).ok());
  }
  ASSERT_TRUE(fs_->SyncAll().ok());  // B publishes both as open
  b->Release(closed);
  ASSERT_TRUE(b->GetAttr(closed).ok());  // B has the lock again: its table is current
  const uint64_t free_before = fs_->StatFs()->bfree;
  ASSERT_TRUE(fs_->Unlink(caller_, Root(), "closed").ok());
  ASSERT_TRUE(fs_->Unlink(caller_, Root(), "kept").ok());
  EXPECT_EQ(fs_->info().orphans_freed, 1u);  // "closed" at once
  EXPECT_EQ(fs_->info().orphans_handed_over, 1u);
  EXPECT_GT(fs_->StatFs()->bfree, free_before + 40);
  const uint64_t free_mid = fs_->StatFs()->bfree;

  bdev->SetGone(true);  // B crashes with "kept" open
  (void)b->Unmount();
  b.reset();
  for (int i = 0; i < 1000 && fs_->info().orphans_freed < 2; i++) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(fs_->info().recoveries, 1u);
  EXPECT_EQ(fs_->info().orphans_freed, 2u);
  EXPECT_GT(fs_->StatFs()->bfree, free_mid + 40);
  UnmountAndExpectClean();
}

// Kernel attribute caching: attributes carry the lock epoch they were read under; the
// epoch moves and the lock-loss hook runs before the lock goes to another node; the
// marks of cached inodes go with the kernel's references.
TEST_F(FsTest, LockLossMovesTheEpochAndRunsTheHook) {
  uint64_t f = Create(Root(), "cached");
  auto a1 = fs_->GetAttr(f);
  ASSERT_TRUE(a1.ok());
  EXPECT_NE(a1->lock_epoch, 0u);
  EXPECT_EQ(a1->lock_epoch, fs_->lock_epoch());
  EXPECT_GT(fs_->LeaseRemainingMs(), 0u);

  EXPECT_FALSE(fs_->MarkAttrsCached(f)) << "marked an inode the kernel holds no reference to";
  fs_->AddRef(f, a1->generation);
  EXPECT_TRUE(fs_->MarkAttrsCached(f));
  EXPECT_TRUE(fs_->MarkAttrsCached(Root()));
  std::mutex mu;  // the hook runs on the lock service's worker thread
  int hooks = 0;
  std::vector<uint64_t> taken;
  uint64_t epoch_in_hook = 0;
  fs_->SetLockLossHook([&] {
    std::lock_guard<std::mutex> g(mu);
    hooks++;
    epoch_in_hook = fs_->lock_epoch();
    taken = fs_->TakeAttrsCached();
  });

  std::unique_ptr<Filesystem> b = MountSecondNode(false);
  ASSERT_TRUE(b);
  ASSERT_TRUE(b->Mkdir(caller_, b->root_ino(), "from-b", 0755).ok());  // takes the lock
  {
    std::lock_guard<std::mutex> g(mu);
    EXPECT_GE(hooks, 1);
    EXPECT_GT(epoch_in_hook, a1->lock_epoch) << "the hook ran before the epoch moved";
    std::sort(taken.begin(), taken.end());
    std::vector<uint64_t> want{f, Root()};
    std::sort(want.begin(), want.end());
    EXPECT_EQ(taken, want);
  }
  EXPECT_TRUE(fs_->TakeAttrsCached().empty());

  auto a2 = fs_->GetAttr(f);  // A takes the lock back: a new epoch
  ASSERT_TRUE(a2.ok());
  EXPECT_GT(a2->lock_epoch, a1->lock_epoch);
  EXPECT_EQ(a2->lock_epoch, fs_->lock_epoch());

  // A lookup reports the epoch it answered under, for a missing name too (the FUSE
  // adapter lets the kernel cache both until the epoch moves).
  uint64_t found_epoch = 0, missing_epoch = 0;
  auto l1 = fs_->Lookup(Root(), "cached", &found_epoch);
  ASSERT_TRUE(l1.ok());
  EXPECT_EQ(found_epoch, fs_->lock_epoch());
  EXPECT_EQ(l1->lock_epoch, found_epoch);
  auto l2 = fs_->Lookup(Root(), "no-such-name", &missing_epoch);
  EXPECT_TRUE(l2.status().Is(Code::kNotFound));
  EXPECT_EQ(missing_epoch, fs_->lock_epoch());
  ASSERT_TRUE(b->Mkdir(caller_, b->root_ino(), "from-b-2", 0755).ok());
  auto l3 = fs_->Lookup(Root(), "from-b-2", &missing_epoch);
  ASSERT_TRUE(l3.ok()) << "a name B created is found once A has the lock back";
  EXPECT_GT(missing_epoch, found_epoch);

  // A forgotten inode leaves the set.
  EXPECT_TRUE(fs_->MarkAttrsCached(f));
  fs_->Forget(f, 1);
  EXPECT_TRUE(fs_->TakeAttrsCached().empty());
  // Forgotten and looked up again many times: taken back once.
  for (int i = 0; i < 1000; i++) {
    fs_->AddRef(f, a1->generation);
    EXPECT_TRUE(fs_->MarkAttrsCached(f));
    EXPECT_TRUE(fs_->MarkAttrsCached(f));
    if (i < 999) fs_->Forget(f, 1);
  }
  EXPECT_EQ(fs_->TakeAttrsCached(), std::vector<uint64_t>{f});

  // A file this node has open is not marked unless asked; an unmarked inode is not
  // taken back by the hook.
  ASSERT_TRUE(fs_->Open(f, O_RDONLY, caller_).ok());
  EXPECT_FALSE(fs_->MarkAttrsCached(f, /*unless_open=*/true));
  EXPECT_FALSE(fs_->AttrsMarked(f));
  EXPECT_TRUE(fs_->MarkAttrsCached(f));
  EXPECT_TRUE(fs_->AttrsMarked(f));
  EXPECT_TRUE(fs_->UnmarkAttrs(f));
  EXPECT_FALSE(fs_->UnmarkAttrs(f));
  EXPECT_FALSE(fs_->AttrsMarked(f));
  EXPECT_TRUE(fs_->TakeAttrsCached().empty());
  fs_->Release(f);
  EXPECT_TRUE(fs_->MarkAttrsCached(f, /*unless_open=*/true)) << "closed again";
  EXPECT_EQ(fs_->TakeAttrsCached(), std::vector<uint64_t>{f});
  fs_->Forget(f, 1);
  fs_->SetLockLossHook(nullptr);
  ASSERT_TRUE(b->Unmount().ok());
}

// Two nodes, two threads each, changing and reading at once: the filesystem lock moves
// back and forth under load and nothing is lost or seen half-done.
TEST_F(FsTest, TwoNodesBusyAtOnceAgreeOnEverything) {
  std::unique_ptr<Filesystem> b = MountSecondNode(true);
  ASSERT_TRUE(b);
  Filesystem* nodes[2] = {fs_.get(), b.get()};
  uint64_t dirs[4];
  for (int t = 0; t < 4; t++) {
    auto d = fs_->Mkdir(caller_, Root(), "t" + std::to_string(t), 0755);
    ASSERT_TRUE(d.ok());
    dirs[t] = d->ino;
  }
  constexpr int kFiles = 40;
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; t++) {
    threads.emplace_back([&, t] {
      Filesystem* me = nodes[t % 2];
      Filesystem* other = nodes[(t + 1) % 2];
      for (int i = 0; i < kFiles; i++) {
        std::string name = "f" + std::to_string(i);
        std::string data(100 + 997 * i % 9000, char('a' + t));
        auto f = me->Mknod(caller_, dirs[t], name, S_IFREG | 0644, 0);
        if (!f.ok()) { failures++; continue; }
        auto w = me->Write(caller_, f->ino, 0, data.data(), data.size());
        if (!w.ok() || *w != data.size()) { failures++; continue; }
        // The other node sees the name and the data at once.
        auto l = other->Lookup(dirs[t], name);
        std::string got(data.size(), '\0');
        auto rd = l.ok() ? other->Read(l->ino, 0, got.size(), got.data()) : Result<size_t>(l.status());
        if (!rd.ok() || got != data) failures++;
        if (i % 4 == 3) {
          // The other node removes every fourth file again.
          if (!other->Unlink(caller_, dirs[t], name).ok()) failures++;
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
  for (int t = 0; t < 4; t++) {
    for (Filesystem* n : nodes) {
      std::set<std::string> names;
      ASSERT_TRUE(n->ReadDir(dirs[t], 0, false, [&](const DirEntryOut& e) {
                       names.insert(e.name);
                       return true;
                     }).ok());
      EXPECT_EQ(names.size(), size_t(2 + kFiles - kFiles / 4)) << "dir " << t;
    }
  }
  EXPECT_EQ(fs_->StatFs()->bfree, b->StatFs()->bfree);
  ASSERT_TRUE(b->Unmount().ok());
}

}  // namespace
}  // namespace agorafs
