#include "fsck/fsck.h"

#include <dirent.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <linux/falloc.h>
#include <sys/stat.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "cache/meta_store.h"
#include "device/fault_device.h"
#include "device/mem_device.h"
#include "dir/dir.h"
#include "fs/acl.h"
#include "fs/filesystem.h"
#include "fs/super.h"
#include "fs/test_mount_options.h"
#include "journal/journal.h"
#include "lock/lock_manager.h"

namespace agorafs {
namespace {

constexpr uint64_t kDevSize = 64ull << 20;

bool Has(const FsckReport& r, const std::string& kind, uint64_t ino = 0, uint64_t block = 0) {
  for (const auto& p : r.problems) {
    if (p.kind == kind && (ino == 0 || p.ino == ino) && (block == 0 || p.block == block)) return true;
  }
  return false;
}

class FsckTest : public ::testing::Test {
 protected:
  void SetUp() override {
    mem_ = std::make_unique<MemDevice>(kDevSize);
    MkfsOptions mo;
    mo.params.heartbeat_interval_ms = 50;
    // A journal big enough for the 96-credit handles of truncate (MetaStore::Begin
    // never returns a handle asking for more than a third of the log).
    mo.params.node_slots = 4;
    mo.params.journal_blocks = 1024;
    auto sb = Mkfs(mem_.get(), mo);
    ASSERT_TRUE(sb.ok()) << sb.status().ToString();
    sb_ = *sb;
    g_ = GeometryOf(sb_);
  }

  std::unique_ptr<Filesystem> MountFs() {
    MountOptions o = FastTestMountOptions();
    o.host = "testhost";
    auto fd = std::make_unique<FaultDevice>(mem_.get());
    fault_ = fd.get();
    auto fs = Filesystem::Mount(std::move(fd), o);
    EXPECT_TRUE(fs.ok()) << fs.status().ToString();
    return fs.ok() ? std::move(fs).value() : nullptr;
  }

  FsckReport Check(bool repair = false) {
    FsckOptions fo;
    fo.repair = repair;
    auto r = Fsck(mem_.get(), fo);
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return r.ok() ? *r : FsckReport{};
  }

  // Repairs, expects every problem repaired, and a clean check afterwards.
  FsckReport RepairAndVerify() {
    FsckReport r = Check(true);
    if (getenv("FSCK_TEST_VERBOSE")) std::printf("%s", r.ToText().c_str());
    EXPECT_EQ(r.ExitCode(), 1) << r.ToText();
    for (const auto& p : r.problems) EXPECT_TRUE(p.repaired) << p.kind << ": " << p.detail;
    FsckReport again = Check(false);
    EXPECT_EQ(again.ExitCode(), 0) << again.ToText();
    EXPECT_TRUE(again.problems.empty()) << again.ToText();
    return r;
  }

  std::vector<uint8_t> ReadBlk(uint64_t blk) {
    AlignedBuffer b(kBlockSize);
    EXPECT_TRUE(mem_->Read(blk * kBlockSize, b.data(), kBlockSize).ok());
    return std::vector<uint8_t>(b.data(), b.data() + kBlockSize);
  }
  void WriteBlk(uint64_t blk, std::vector<uint8_t> data, bool seal) {
    AlignedBuffer b(kBlockSize);
    std::memcpy(b.data(), data.data(), kBlockSize);
    if (seal) SealBlock(b.data());
    ASSERT_TRUE(mem_->Write(blk * kBlockSize, b.data(), kBlockSize).ok());
    ASSERT_TRUE(mem_->Flush().ok());
  }
  template <typename T, typename F>
  void EditBlk(uint64_t blk, F&& f) {
    auto b = ReadBlk(blk);
    f(reinterpret_cast<T*>(b.data()));
    WriteBlk(blk, b, true);
  }
  // Bitmap location of a block: (bitmap block, byte, bit).
  void BitOf(uint64_t blk, uint64_t* bmblk, size_t* byte, unsigned* bit) {
    uint32_t ag = g_.AgOf(blk);
    uint64_t off = blk - g_.AgStart(ag);
    *bmblk = g_.AgStart(ag) + 1 + off / kBitsPerBitmap;
    uint64_t i = off % kBitsPerBitmap;
    *byte = i >> 3;
    *bit = unsigned(i & 7);
  }
  bool BitmapBit(uint64_t blk) {
    uint64_t bm;
    size_t byte;
    unsigned bit;
    BitOf(blk, &bm, &byte, &bit);
    auto b = ReadBlk(bm);
    return reinterpret_cast<BitmapBlock*>(b.data())->bits[byte] & (1u << bit);
  }
  void SetBitmapBit(uint64_t blk, bool on) {
    uint64_t bm;
    size_t byte;
    unsigned bit;
    BitOf(blk, &bm, &byte, &bit);
    EditBlk<BitmapBlock>(bm, [&](BitmapBlock* b) {
      if (on) {
        b->bits[byte] |= uint8_t(1u << bit);
      } else {
        b->bits[byte] &= uint8_t(~(1u << bit));
      }
    });
  }

  struct Tree {
    uint64_t dir = 0, sub = 0, small = 0, big = 0, sparse = 0, many = 0, lnk = 0, longlnk = 0,
             prealloc = 0;
  };

  // A tree exercising every structure: inline and extent files, an extent tree with
  // nodes, unwritten extents past EOF, inline and hashed directories, symlinks of
  // both kinds, hard links, inline and external xattrs, renames, removals.
  Tree Build(Filesystem* fs) {
    Tree t;
    Caller c;
    const uint64_t root = fs->root_ino();
    auto mk = [&](uint64_t parent, const std::string& name) {
      auto a = fs->Mknod(c, parent, name, S_IFREG | 0644, 0);
      EXPECT_TRUE(a.ok()) << name << ": " << a.status().ToString();
      return a.ok() ? a->ino : 0;
    };
    auto write = [&](uint64_t ino, uint64_t off, size_t len, char fill) {
      std::string buf(len, fill);
      auto w = fs->Write(c, ino, off, buf.data(), buf.size());
      EXPECT_TRUE(w.ok()) << w.status().ToString();
    };
    auto d = fs->Mkdir(c, root, "dir", 0755);
    EXPECT_TRUE(d.ok());
    t.dir = d->ino;
    auto s = fs->Mkdir(c, t.dir, "sub", 0755);
    EXPECT_TRUE(s.ok());
    t.sub = s->ino;
    EXPECT_TRUE(fs->Mkdir(c, t.sub, "subsub", 0700).ok());
    t.small = mk(t.dir, "small");
    write(t.small, 0, 100, 'a');
    EXPECT_TRUE(fs->Link(c, t.small, t.sub, "hard").ok());
    t.big = mk(root, "big");
    write(t.big, 0, 300 * 1024, 'b');
    SetAttrRequest tr;
    tr.size = true;
    tr.new_size = 150 * 1024 + 17;
    EXPECT_TRUE(fs->SetAttr(c, t.big, tr).ok());
    EXPECT_TRUE(fs->SetXattr(c, t.big, "user.small", "value", 0).ok());
    EXPECT_TRUE(fs->SetXattr(c, t.big, "user.large1", std::string(400, 'x'), 0).ok());
    EXPECT_TRUE(fs->SetXattr(c, t.big, "user.large2", std::string(400, 'y'), 0).ok());
    t.sparse = mk(root, "sparse");
    for (int i = 0; i < 160; i++) write(t.sparse, uint64_t(i) * 2 * kBlockSize, 10, 'c');
    t.prealloc = mk(t.dir, "prealloc");
    write(t.prealloc, 0, 5000, 'p');
    EXPECT_TRUE(fs->Fallocate(c, t.prealloc, FALLOC_FL_KEEP_SIZE, 8192, 64 * 1024).ok());
    auto m = fs->Mkdir(c, root, "many", 0755);
    EXPECT_TRUE(m.ok());
    t.many = m->ino;
    for (int i = 0; i < 300; i++) mk(t.many, "entry_with_a_longish_name_" + std::to_string(i));
    auto l = fs->Symlink(c, root, "ln", "dir/small");
    EXPECT_TRUE(l.ok());
    t.lnk = l->ino;
    auto ll = fs->Symlink(c, root, "longln", std::string(4000, 'z'));
    EXPECT_TRUE(ll.ok()) << ll.status().ToString();
    t.longlnk = ll->ino;
    EXPECT_TRUE(fs->Mknod(c, t.dir, "fifo", S_IFIFO | 0600, 0).ok());
    EXPECT_TRUE(fs->Rename(c, root, "sparse", t.dir, "sparse2", 0).ok());
    uint64_t gone = mk(root, "gone");
    write(gone, 0, 20000, 'g');
    EXPECT_TRUE(fs->Unlink(c, root, "gone").ok());
    EXPECT_TRUE(fs->Mkdir(c, root, "emptydir", 0755).ok());
    EXPECT_TRUE(fs->Rmdir(c, root, "emptydir").ok());
    for (int i = 0; i < 50; i++) {
      EXPECT_TRUE(fs->Unlink(c, t.many, "entry_with_a_longish_name_" + std::to_string(i * 3)).ok());
    }
    return t;
  }

  Tree BuildAndUnmount() {
    auto fs = MountFs();
    if (!fs) return {};
    Tree t = Build(fs.get());
    EXPECT_TRUE(fs->Unmount().ok());
    return t;
  }

  // Runs fn in a write handle of a MetaStore on slot 0's journal, then syncs.
  template <typename F>
  void WithStore(F&& fn) {
    LocalLockManager locks;
    auto j = Journal::Open(mem_.get(), g_, SuperUuid(sb_), 0, 0);
    ASSERT_TRUE(j.ok());
    ASSERT_TRUE((*j)->Replay().ok());
    MetaStore store(mem_.get(), sb_, j->get(), &locks, StoreOptions{1024, 1000, false});
    ASSERT_TRUE(store.Init().ok());
    {
      auto h = store.Begin(false, 16);
      fn(*h);
    }
    ASSERT_TRUE(store.Sync().ok());
    store.Stop();
  }

  std::unique_ptr<MemDevice> mem_;
  FaultDevice* fault_ = nullptr;
  Superblock sb_{};
  Geometry g_{};
};

TEST_F(FsckTest, FreshFilesystemIsClean) {
  FsckReport r = Check();
  EXPECT_EQ(r.ExitCode(), 0) << r.ToText();
  EXPECT_TRUE(r.problems.empty());
  EXPECT_EQ(r.inodes, 1u);
  EXPECT_EQ(r.directories, 1u);
  EXPECT_NE(r.ToText().find("clean"), std::string::npos);
  EXPECT_EQ(r.ToJson().rfind("{\"clean\":true,", 0), 0u) << r.ToJson();
}

// Regression: one damaged journal header copy went unreported (the other copy is
// used), leaving the journal one torn header write away from unusable.
TEST_F(FsckTest, DamagedJournalHeaderCopyIsRewritten) {
  BuildAndUnmount();
  for (uint32_t slot : {0u, 3u}) {
    for (uint64_t copy : {0u, 1u}) {
      const uint64_t blk = g_.JournalStart(slot) + copy;
      auto d = ReadBlk(blk);
      d[100] ^= 0x10;
      WriteBlk(blk, d, false);
      FsckReport r = Check();
      EXPECT_EQ(r.ExitCode(), 4) << r.ToText();
      EXPECT_TRUE(Has(r, "bad-journal", 0, blk)) << r.ToText();
      RepairAndVerify();
    }
  }
  auto fs = MountFs();  // the repaired journals work
  ASSERT_TRUE(fs);
  Caller c;
  ASSERT_TRUE(fs->Mknod(c, fs->root_ino(), "after", S_IFREG | 0644, 0).ok());
  ASSERT_TRUE(fs->Unmount().ok());
  EXPECT_EQ(Check().ExitCode(), 0);
}

TEST_F(FsckTest, BuiltTreeIsClean) {
  Tree t = BuildAndUnmount();
  FsckReport r = Check();
  EXPECT_EQ(r.ExitCode(), 0) << r.ToText();
  EXPECT_GE(r.directories, 5u);
  EXPECT_GE(r.files, 250u);
  EXPECT_EQ(r.symlinks, 2u);
  EXPECT_EQ(r.other, 1u);
  EXPECT_GT(r.data_blocks_used, 100u);
  // Repair of a clean filesystem changes nothing and reports nothing.
  FsckReport rr = Check(true);
  EXPECT_EQ(rr.ExitCode(), 0) << rr.ToText();
  // It mounts again and still holds the data.
  auto fs = MountFs();
  ASSERT_TRUE(fs);
  auto a = fs->GetAttr(t.big);
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->size, 150u * 1024 + 17);
}

TEST_F(FsckTest, DamagedInodeMakesEntriesDangling) {
  Tree t = BuildAndUnmount();
  auto b = ReadBlk(t.small);
  b[kInodeDataOffset + 7] ^= 0x40;  // not resealed: checksum mismatch
  WriteBlk(t.small, b, false);
  FsckReport r = Check();
  EXPECT_EQ(r.ExitCode(), 4);
  EXPECT_TRUE(Has(r, "bad-checksum", t.small)) << r.ToText();
  EXPECT_TRUE(Has(r, "dangling-entry", t.dir)) << r.ToText();
  EXPECT_TRUE(Has(r, "dangling-entry", t.sub)) << r.ToText();  // the hard link
  RepairAndVerify();
  auto fs = MountFs();
  ASSERT_TRUE(fs);
  EXPECT_FALSE(fs->Lookup(t.dir, "small").ok());
  EXPECT_FALSE(fs->Lookup(t.sub, "hard").ok());
  EXPECT_TRUE(fs->Lookup(t.dir, "prealloc").ok());
}

TEST_F(FsckTest, ClearedBitmapBitOfUsedBlock) {
  Tree t = BuildAndUnmount();
  ASSERT_TRUE(BitmapBit(t.big));
  SetBitmapBit(t.big, false);
  FsckReport r = Check();
  EXPECT_TRUE(Has(r, "bitmap-missing", 0, t.big)) << r.ToText();
  EXPECT_TRUE(Has(r, "ag-count")) << r.ToText();
  EXPECT_EQ(r.ExitCode(), 4);
  RepairAndVerify();
  EXPECT_TRUE(BitmapBit(t.big));
}

TEST_F(FsckTest, SetBitmapBitOfFreeBlock) {
  BuildAndUnmount();
  // The last block of the last AG is free on this small filesystem.
  uint32_t ag = g_.ag_count - 1;
  uint64_t blk = g_.AgStart(ag) + g_.AgSize(ag) - 1;
  ASSERT_FALSE(BitmapBit(blk));
  SetBitmapBit(blk, true);
  FsckReport r = Check();
  EXPECT_TRUE(Has(r, "bitmap-leak", 0, blk)) << r.ToText();
  EXPECT_TRUE(Has(r, "ag-count")) << r.ToText();
  RepairAndVerify();
  EXPECT_FALSE(BitmapBit(blk));
}

TEST_F(FsckTest, WrongAgFreeCount) {
  BuildAndUnmount();
  EditBlk<AgHeader>(g_.AgStart(0), [](AgHeader* h) { h->free_blocks -= 5; });
  FsckReport r = Check();
  ASSERT_EQ(r.problems.size(), 1u) << r.ToText();
  EXPECT_EQ(r.problems[0].kind, "ag-count");
  RepairAndVerify();
}

TEST_F(FsckTest, WrongLinkCountsAndParent) {
  Tree t = BuildAndUnmount();
  EditBlk<InodeBlock>(t.big, [](InodeBlock* i) { i->nlink = 7; });
  EditBlk<InodeBlock>(t.dir, [](InodeBlock* i) { i->nlink = 9; });
  EditBlk<InodeBlock>(t.sub, [&](InodeBlock* i) { i->parent = t.many; });
  EditBlk<InodeBlock>(t.lnk, [](InodeBlock* i) { i->blocks = 12; });
  EditBlk<InodeBlock>(t.many, [](InodeBlock* i) { i->blocks = 2; });
  FsckReport r = Check();
  EXPECT_TRUE(Has(r, "nlink", t.big)) << r.ToText();
  EXPECT_TRUE(Has(r, "nlink", t.dir)) << r.ToText();
  EXPECT_TRUE(Has(r, "bad-parent", t.sub)) << r.ToText();
  EXPECT_TRUE(Has(r, "blocks-count", t.lnk)) << r.ToText();
  EXPECT_TRUE(Has(r, "blocks-count", t.many)) << r.ToText();
  EXPECT_EQ(r.problems.size(), 5u) << r.ToText();
  RepairAndVerify();
  auto fs = MountFs();
  ASSERT_TRUE(fs);
  EXPECT_EQ(fs->GetAttr(t.big)->nlink, 1u);
  EXPECT_EQ(fs->GetAttr(t.dir)->nlink, 3u);
}

// A value the filesystem interprets but cannot decode (here an ACL with a bad version)
// is reported and dropped; the other xattrs stay.
TEST_F(FsckTest, InvalidAclValueIsDropped) {
  uint64_t ino = 0;
  {
    auto fs = MountFs();
    ASSERT_TRUE(fs);
    Caller c;
    auto f = fs->Mknod(c, fs->root_ino(), "acl", S_IFREG | 0640, 0);
    ASSERT_TRUE(f.ok());
    ino = f->ino;
    acl::Acl a = {{acl::kUserObj, 6, acl::kUndefinedId}, {acl::kUser, 4, 1000},
                  {acl::kGroupObj, 4, acl::kUndefinedId}, {acl::kMask, 4, acl::kUndefinedId},
                  {acl::kOther, 0, acl::kUndefinedId}};
    ASSERT_TRUE(fs->SetXattr(c, ino, "user.keep", "kept", 0).ok());
    ASSERT_TRUE(fs->SetXattr(c, ino, acl::kAccessName, acl::Encode(a), 0).ok());
    ASSERT_TRUE(fs->Unmount().ok());
  }
  EXPECT_EQ(Check().ExitCode(), 0);
  EditBlk<InodeBlock>(ino, [](InodeBlock* i) {
    std::string_view area(reinterpret_cast<const char*>(i->xattr), kInodeXattrSize);
    size_t at = area.find(acl::kAccessName);
    ASSERT_NE(at, std::string_view::npos);
    i->xattr[at + acl::kAccessName.size()] = 3;  // the value's version byte
  });
  FsckReport r = Check();
  EXPECT_TRUE(Has(r, "bad-xattr-value", ino)) << r.ToText();
  EXPECT_EQ(r.problems.size(), 1u) << r.ToText();
  RepairAndVerify();
  auto fs = MountFs();
  ASSERT_TRUE(fs);
  Caller c;
  EXPECT_TRUE(fs->GetXattr(c, ino, acl::kAccessName).status().Is(Code::kNoData));
  EXPECT_EQ(*fs->GetXattr(c, ino, "user.keep"), "kept");
  EXPECT_EQ(fs->GetAttr(ino)->mode & 0777, 0640u);  // the mode the ACL had set stays
}

TEST_F(FsckTest, WrittenDataPastEofIsTrimmed) {
  Tree t = BuildAndUnmount();
  EditBlk<InodeBlock>(t.big, [](InodeBlock* i) { i->size = 10000; });
  FsckReport r = Check();
  EXPECT_TRUE(Has(r, "bad-extent", t.big)) << r.ToText();
  FsckReport rr = RepairAndVerify();
  auto fs = MountFs();
  ASSERT_TRUE(fs);
  auto a = fs->GetAttr(t.big);
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->blocks, (1u + 3u + 1u) * (kBlockSize / 512));  // inode + 3 data + xattr
}

TEST_F(FsckTest, DamagedDirectoryLeafIsRebuilt) {
  Tree t = BuildAndUnmount();
  // Find a leaf of the hashed directory through its table.
  auto ib = ReadBlk(t.many);
  const auto* I = reinterpret_cast<const InodeBlock*>(ib.data());
  ASSERT_EQ(I->data_kind, uint8_t(DataKind::kDirHash));
  uint64_t table;
  std::memcpy(&table, I->data + sizeof(DirRoot), 8);
  auto tb = ReadBlk(table);
  uint64_t leaf = reinterpret_cast<const DirTable*>(tb.data())->slot[0];
  ASSERT_NE(leaf, 0u);
  auto lb = ReadBlk(leaf);
  lb[200] ^= 0xff;
  WriteBlk(leaf, lb, false);
  FsckReport r = Check();
  EXPECT_TRUE(Has(r, "bad-dir", t.many)) << r.ToText();
  EXPECT_TRUE(Has(r, "unreachable")) << r.ToText();
  RepairAndVerify();
  // Nothing is lost: the files of the damaged leaf are in /lost+found.
  auto fs = MountFs();
  ASSERT_TRUE(fs);
  auto lf = fs->Lookup(fs->root_ino(), "lost+found");
  ASSERT_TRUE(lf.ok());
  uint64_t in_many = 0, in_lf = 0;
  ASSERT_TRUE(fs->ReadDir(t.many, 0, false, [&](const DirEntryOut& e) {
                  in_many += e.name != "." && e.name != "..";
                  return true;
                }).ok());
  ASSERT_TRUE(fs->ReadDir(lf->ino, 0, false, [&](const DirEntryOut& e) {
                  in_lf += e.name != "." && e.name != "..";
                  return true;
                }).ok());
  EXPECT_GT(in_lf, 0u);
  EXPECT_EQ(in_many + in_lf, 250u);
}

TEST_F(FsckTest, DetachedSubtreeGoesToLostAndFound) {
  Tree t = BuildAndUnmount();
  // Drop the entry "dir" from the root through the journal, as a bug would.
  WithStore([&](MetaTxn& h) {
    auto w = h.WriteAs<InodeBlock>(sb_.root_ino, BlockType::kInode, InodeLock(sb_.root_ino));
    ASSERT_TRUE(w.ok());
    ASSERT_TRUE(dir::Remove(h, sb_.root_ino, *w, "dir").ok());
  });
  FsckReport r = Check();
  EXPECT_TRUE(Has(r, "unreachable", t.dir)) << r.ToText();
  EXPECT_TRUE(Has(r, "nlink", sb_.root_ino)) << r.ToText();
  RepairAndVerify();
  auto fs = MountFs();
  ASSERT_TRUE(fs);
  auto lf = fs->Lookup(fs->root_ino(), "lost+found");
  ASSERT_TRUE(lf.ok());
  auto d = fs->Lookup(lf->ino, "#" + std::to_string(t.dir));
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->ino, t.dir);
  EXPECT_TRUE(fs->Lookup(t.dir, "small").ok());
  auto dotdot = fs->Lookup(t.dir, "..");
  ASSERT_TRUE(dotdot.ok());
  EXPECT_EQ(dotdot->ino, lf->ino);
}

TEST_F(FsckTest, DetachedDirectoryCycleIsBroken) {
  Tree t = BuildAndUnmount();
  // "dir" leaves the root and its own subdirectory "sub" names it: a cycle that no
  // path from the root reaches.
  WithStore([&](MetaTxn& h) {
    auto w = h.WriteAs<InodeBlock>(sb_.root_ino, BlockType::kInode, InodeLock(sb_.root_ino));
    ASSERT_TRUE(w.ok());
    ASSERT_TRUE(dir::Remove(h, sb_.root_ino, *w, "dir").ok());
    auto s = h.WriteAs<InodeBlock>(t.sub, BlockType::kInode, InodeLock(t.sub));
    ASSERT_TRUE(s.ok());
    ASSERT_TRUE(dir::Add(h, t.sub, *s, "loop", t.dir, DT_DIR).ok());
  });
  FsckReport r = Check();
  EXPECT_TRUE(Has(r, "unreachable")) << r.ToText();
  RepairAndVerify();
  auto fs = MountFs();
  ASSERT_TRUE(fs);
  auto lf = fs->Lookup(fs->root_ino(), "lost+found");
  ASSERT_TRUE(lf.ok());
  size_t n = 0;
  ASSERT_TRUE(fs->ReadDir(lf->ino, 2, false, [&](const DirEntryOut&) {
                  n++;
                  return true;
                }).ok());
  EXPECT_EQ(n, 1u);
  EXPECT_TRUE(fs->Lookup(t.sub, "subsub").ok());
}

TEST_F(FsckTest, DoubleUsedDataBlock) {
  Tree t = BuildAndUnmount();
  // Point the prealloc file's first extent at the first data block of big.
  uint64_t big_first = 0;
  {
    auto b = ReadBlk(t.big);
    const auto* I = reinterpret_cast<const InodeBlock*>(b.data());
    ASSERT_EQ(I->data_kind, uint8_t(DataKind::kExtents));
    Extent e;
    std::memcpy(&e, I->data + sizeof(ExtentNodeHeader), sizeof(e));
    big_first = e.physical;
  }
  uint64_t old_first = 0;
  EditBlk<InodeBlock>(t.prealloc, [&](InodeBlock* i) {
    Extent e;
    std::memcpy(&e, i->data + sizeof(ExtentNodeHeader), sizeof(e));
    old_first = e.physical;
    e.physical = big_first;
    std::memcpy(i->data + sizeof(ExtentNodeHeader), &e, sizeof(e));
  });
  FsckReport r = Check();
  EXPECT_TRUE(Has(r, "double-use")) << r.ToText();
  EXPECT_TRUE(Has(r, "bitmap-leak", 0, old_first)) << r.ToText();
  RepairAndVerify();
}

TEST_F(FsckTest, CrashImageNeedsReplayAndOrphanFreeing) {
  uint64_t orphan = 0, kept = 0;
  {
    auto fs = MountFs();
    ASSERT_TRUE(fs);
    Build(fs.get());
    Caller c;
    auto a = fs->Mknod(c, fs->root_ino(), "open-unlinked", S_IFREG | 0644, 0);
    ASSERT_TRUE(a.ok());
    orphan = a->ino;
    std::string data(50000, 'o');
    ASSERT_TRUE(fs->Write(c, orphan, 0, data.data(), data.size()).ok());
    ASSERT_TRUE(fs->Open(orphan, O_RDWR, c).ok());
    ASSERT_TRUE(fs->Unlink(c, fs->root_ino(), "open-unlinked").ok());
    auto k = fs->Mknod(c, fs->root_ino(), "kept", S_IFREG | 0644, 0);
    ASSERT_TRUE(k.ok());
    kept = k->ino;
    ASSERT_TRUE(fs->Write(c, kept, 0, data.data(), data.size()).ok());
    ASSERT_TRUE(fs->SyncAll().ok());  // committed to the journal, not written home
    fault_->SetGone(true);            // the node dies: nothing more reaches the disk
  }
  mem_->Crash();
  FsckReport r = Check();
  EXPECT_EQ(r.ExitCode(), 4);
  EXPECT_TRUE(Has(r, "journal-needs-replay")) << r.ToText();
  EXPECT_TRUE(Has(r, "orphan", orphan)) << r.ToText();
  // The journal overlay makes the check see the replayed state: nothing else.
  for (const auto& p : r.problems) {
    EXPECT_TRUE(p.kind == "journal-needs-replay" || p.kind == "orphan") << r.ToText();
  }
  FsckReport rr = RepairAndVerify();
  EXPECT_GT(rr.journal_transactions_replayed, 0u);
  EXPECT_FALSE(BitmapBit(orphan));  // the unlinked inode was freed
  auto fs = MountFs();
  ASSERT_TRUE(fs);
  EXPECT_EQ(fs->info().replayed_transactions, 0u);
  auto k = fs->Lookup(fs->root_ino(), "kept");
  ASSERT_TRUE(k.ok());
  EXPECT_EQ(k->ino, kept);
  EXPECT_EQ(k->size, 50000u);
}

TEST_F(FsckTest, RefusesWhileMounted) {
  auto fs = MountFs();
  ASSERT_TRUE(fs);
  FsckOptions fo;
  auto r = Fsck(mem_.get(), fo);
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.status().Is(Code::kBusy)) << r.status().ToString();
  EXPECT_NE(r.status().message().find("testhost"), std::string::npos);
}

TEST_F(FsckTest, DamagedRootSendsEverythingToLostAndFound) {
  Tree t = BuildAndUnmount();
  auto b = ReadBlk(sb_.root_ino);
  b[100] ^= 1;
  WriteBlk(sb_.root_ino, b, false);
  FsckReport r = Check();
  EXPECT_TRUE(Has(r, "bad-root")) << r.ToText();
  RepairAndVerify();
  auto fs = MountFs();
  ASSERT_TRUE(fs);
  auto lf = fs->Lookup(fs->root_ino(), "lost+found");
  ASSERT_TRUE(lf.ok());
  auto d = fs->Lookup(lf->ino, "#" + std::to_string(t.dir));
  ASSERT_TRUE(d.ok());
  EXPECT_TRUE(fs->Lookup(lf->ino, "#" + std::to_string(t.big)).ok());
}

TEST_F(FsckTest, DamagedSuperblockCopyAndBitmapBlock) {
  BuildAndUnmount();
  auto b = ReadBlk(1);
  b[300] ^= 1;
  WriteBlk(1, b, false);
  auto bm = ReadBlk(g_.AgStart(0) + 1);
  bm[1000] ^= 0x10;
  WriteBlk(g_.AgStart(0) + 1, bm, false);
  FsckReport r = Check();
  EXPECT_TRUE(Has(r, "bad-super", 0, 1)) << r.ToText();
  EXPECT_TRUE(Has(r, "bad-checksum", 0, g_.AgStart(0) + 1)) << r.ToText();
  RepairAndVerify();
}

TEST_F(FsckTest, JsonReport) {
  Tree t = BuildAndUnmount();
  EditBlk<InodeBlock>(t.big, [](InodeBlock* i) { i->nlink = 3; });
  FsckReport r = Check();
  std::string j = r.ToJson();
  EXPECT_EQ(j.rfind("{\"clean\":false,", 0), 0u) << j;
  EXPECT_NE(j.find("\"kind\":\"nlink\""), std::string::npos) << j;
  EXPECT_NE(j.find("\"ino\":" + std::to_string(t.big)), std::string::npos) << j;
  EXPECT_NE(j.find("\"repaired\":false"), std::string::npos) << j;
  EXPECT_NE(r.ToText().find("nlink inode " + std::to_string(t.big)), std::string::npos)
      << r.ToText();
}


TEST_F(FsckTest, UnfinishedTruncationIsFinished) {
  Tree t = BuildAndUnmount();
  // As if a truncate to 5000 bytes was cut short by a crash after its first handle:
  // the size is set, the inode is on the orphan list, the blocks are still mapped.
  EditBlk<InodeBlock>(t.prealloc, [](InodeBlock* i) { i->size = 3000; });
  EditBlk<OrphanBlock>(g_.SlotBlock(0, kSlotOrphan), [&](OrphanBlock* o) {
    o->count = 1;
    o->ino[0] = t.prealloc;
  });
  FsckReport r = Check();
  ASSERT_EQ(r.problems.size(), 1u) << r.ToText();
  EXPECT_TRUE(Has(r, "orphan", t.prealloc)) << r.ToText();
  RepairAndVerify();
  auto fs = MountFs();
  ASSERT_TRUE(fs);
  auto a = fs->GetAttr(t.prealloc);
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->size, 3000u);
  EXPECT_EQ(a->blocks, 2u * (kBlockSize / 512));  // inode + the one block below EOF
}

TEST_F(FsckTest, EntryToFreedInodeIsDropped) {
  Tree t = BuildAndUnmount();
  // The inode of "small" was freed (nlink 0, bit clear) but its entries remain.
  EditBlk<InodeBlock>(t.small, [](InodeBlock* i) { i->nlink = 0; });
  SetBitmapBit(t.small, false);
  EditBlk<AgHeader>(g_.AgStart(g_.AgOf(t.small)), [](AgHeader* h) { h->free_blocks++; });
  FsckReport r = Check();
  EXPECT_TRUE(Has(r, "dangling-entry", t.dir, t.small)) << r.ToText();
  EXPECT_TRUE(Has(r, "dangling-entry", t.sub, t.small)) << r.ToText();
  EXPECT_EQ(r.problems.size(), 2u) << r.ToText();
  RepairAndVerify();
}

TEST_F(FsckTest, ZeroLinkCountOfAnInodeInUseIsFixed) {
  Tree t = BuildAndUnmount();
  // nlink 0 but the inode is marked in use and named: a damaged count, not a free inode.
  EditBlk<InodeBlock>(t.small, [](InodeBlock* i) { i->nlink = 0; });
  FsckReport r = Check();
  ASSERT_EQ(r.problems.size(), 1u) << r.ToText();
  EXPECT_TRUE(Has(r, "nlink", t.small)) << r.ToText();
  RepairAndVerify();
  auto fs = MountFs();
  ASSERT_TRUE(fs);
  EXPECT_EQ(fs->GetAttr(t.small)->nlink, 2u);
}

// Power cuts at random points of a random workload: the read-only check of the image
// must find nothing but the crashed node's journal (and its orphans), and repair
// must leave a clean filesystem.
TEST_F(FsckTest, RandomCrashImages) {
  const int seeds = getenv("FSCK_CRASH_SEEDS") ? atoi(getenv("FSCK_CRASH_SEEDS")) : 12;
  const std::vector<uint8_t> fresh = mem_->DurableImage();
  for (int seed = 1; seed <= seeds; seed++) {
    SCOPED_TRACE("seed " + std::to_string(seed));
    std::mt19937_64 rng{uint64_t(seed) * 7919};
    mem_ = std::make_unique<MemDevice>(fresh);
    {
      auto fs = MountFs();
      ASSERT_TRUE(fs);
      fault_->GoneAfter(IoKind::kWrite, 50 + rng() % 1500);
      Caller c;
      std::vector<uint64_t> dirs{fs->root_ino()};
      std::vector<std::pair<uint64_t, std::string>> names;
      std::string data(70000, 'd');
      for (int op = 0; op < 400 && !fault_->gone(); op++) {
        uint64_t d = dirs[rng() % dirs.size()];
        std::string name = "n" + std::to_string(rng() % 200);
        switch (rng() % 8) {
          case 0: {
            auto a = fs->Mkdir(c, d, name, 0755);
            if (a.ok()) dirs.push_back(a->ino);
            break;
          }
          case 1:
          case 2: {
            auto a = fs->Mknod(c, d, name, S_IFREG | 0644, 0);
            if (a.ok()) {
              names.emplace_back(d, name);
              (void)fs->Write(c, a->ino, rng() % 20000, data.data(), rng() % data.size());
            }
            break;
          }
          case 3:
            if (!names.empty()) {
              auto& [pd, pn] = names[rng() % names.size()];
              (void)fs->Unlink(c, pd, pn);
            }
            break;
          case 4:
            if (!names.empty()) {
              auto& [pd, pn] = names[rng() % names.size()];
              auto a = fs->Lookup(pd, pn);
              if (a.ok()) {
                SetAttrRequest tr;
                tr.size = true;
                tr.new_size = rng() % 30000;
                (void)fs->SetAttr(c, a->ino, tr);
              }
            }
            break;
          case 5:
            if (!names.empty()) {
              auto& [pd, pn] = names[rng() % names.size()];
              (void)fs->Rename(c, pd, pn, d, name, 0);
            }
            break;
          case 6:
            if (!names.empty()) {
              auto& [pd, pn] = names[rng() % names.size()];
              auto a = fs->Lookup(pd, pn);
              if (a.ok()) (void)fs->SetXattr(c, a->ino, "user.x", std::string(rng() % 700, 'x'), 0);
            }
            break;
          default:
            (void)fs->SyncAll();
        }
      }
      fault_->SetGone(true);
    }
    if (seed % 2) {
      mem_->Crash();
    } else {
      mem_->CrashTorn(uint64_t(seed));
    }
    FsckReport r = Check(false);
    for (const auto& p : r.problems) {
      EXPECT_TRUE(p.kind == "journal-needs-replay" || p.kind == "orphan") << r.ToText();
    }
    FsckReport rr = Check(true);
    EXPECT_NE(rr.ExitCode(), 4) << rr.ToText();
    if (getenv("FSCK_TEST_VERBOSE")) {
      std::printf("seed %d: %zu problems, %llu replayed, %llu inodes\n", seed, r.problems.size(),
                  (unsigned long long)rr.journal_transactions_replayed,
                  (unsigned long long)rr.inodes);
    }
    FsckReport again = Check(false);
    ASSERT_EQ(again.ExitCode(), 0) << again.ToText();
    auto fs = MountFs();
    ASSERT_TRUE(fs);
    ASSERT_TRUE(fs->Unmount().ok());
  }
}

// Random damage to random metadata blocks: repair must always succeed, leave a
// filesystem that checks clean, mounts, and whose every file can be read.
TEST_F(FsckTest, RandomDamageIsAlwaysRepaired) {
  BuildAndUnmount();
  const std::vector<uint8_t> image = mem_->DurableImage();
  std::vector<uint64_t> meta;
  for (uint64_t b = g_.ag_start; b < g_.total_blocks - 1; b++) {
    const auto* h = reinterpret_cast<const BlockHeader*>(image.data() + b * kBlockSize);
    if (h->magic == kMagic && h->blocknr == b) meta.push_back(b);
  }
  ASSERT_GT(meta.size(), 200u);
  const int seeds = getenv("FSCK_FUZZ_SEEDS") ? atoi(getenv("FSCK_FUZZ_SEEDS")) : 40;
  for (int seed = 1; seed <= seeds; seed++) {
    SCOPED_TRACE("seed " + std::to_string(seed));
    std::mt19937_64 rng{uint64_t(seed)};
    mem_ = std::make_unique<MemDevice>(image);
    const int maxn = getenv("FSCK_FUZZ_MAXN") ? atoi(getenv("FSCK_FUZZ_MAXN")) : 3;
    const int first = getenv("FSCK_FUZZ_FIRST") ? atoi(getenv("FSCK_FUZZ_FIRST")) : 0;
    rng.seed(uint64_t(seed + first));
    const int n = 1 + int(rng() % uint64_t(maxn));
    for (int k = 0; k < n; k++) {
      uint64_t blk = meta[rng() % meta.size()];
      auto b = ReadBlk(blk);
      switch (rng() % 4) {
        case 0:  // bit rot
          b[sizeof(BlockHeader) + rng() % kPayload] ^= uint8_t(1u << (rng() % 8));
          WriteBlk(blk, b, false);
          break;
        case 1: {  // a field made small or large, checksum kept valid
          size_t off = sizeof(BlockHeader) + (rng() % 64) * 4;
          uint32_t v = rng() % 2 ? uint32_t(rng() % 8) : uint32_t(rng());
          std::memcpy(b.data() + off, &v, 4);
          WriteBlk(blk, b, true);
          break;
        }
        case 2: {  // random bytes anywhere in the payload, checksum kept valid
          for (int i = 0; i < 4; i++) b[sizeof(BlockHeader) + rng() % kPayload] = uint8_t(rng());
          WriteBlk(blk, b, true);
          break;
        }
        default:  // lost write
          std::fill(b.begin(), b.end(), 0);
          WriteBlk(blk, b, false);
      }
    }
    FsckOptions fo;
    fo.repair = true;
    auto r = Fsck(mem_.get(), fo);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    if (getenv("FSCK_TEST_VERBOSE")) {
      for (const auto& p : r->problems) std::printf("seed %d: %s %s\n", seed, p.kind.c_str(), p.detail.substr(0, 150).c_str());
    }
    FsckReport again = Check(false);
    ASSERT_EQ(again.ExitCode(), 0) << "after repair:\n" << r->ToText() << "check:\n" << again.ToText();
    auto fs = MountFs();
    ASSERT_TRUE(fs);
    // Walk everything and read every file (first MiB).
    std::vector<uint64_t> dirs{fs->root_ino()};
    std::string buf(1 << 20, '\0');
    size_t seen = 0;
    while (!dirs.empty()) {
      uint64_t d = dirs.back();
      dirs.pop_back();
      std::vector<DirEntryOut> ents;
      ASSERT_TRUE(fs->ReadDir(d, 2, false, [&](const DirEntryOut& e) {
                      ents.push_back(e);
                      return true;
                    }).ok());
      for (const auto& e : ents) {
        seen++;
        auto a = fs->Lookup(d, e.name);
        ASSERT_TRUE(a.ok()) << e.name << ": " << a.status().ToString();
        if (S_ISDIR(a->mode)) {
          dirs.push_back(a->ino);
        } else if (S_ISREG(a->mode) || S_ISLNK(a->mode)) {
          auto rd = fs->Read(a->ino, 0, buf.size(), buf.data());
          ASSERT_TRUE(rd.ok()) << e.name << ": " << rd.status().ToString();
        }
      }
    }
    EXPECT_GT(seen, 10u);
    ASSERT_TRUE(fs->Unmount().ok());
    fs.reset();
    FsckReport after = Check(false);
    ASSERT_EQ(after.ExitCode(), 0) << "after mount:\n" << after.ToText();
  }
}

}  // namespace
}  // namespace agorafs
