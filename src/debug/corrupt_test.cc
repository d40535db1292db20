#include "debug/corrupt.h"

#include <sys/stat.h>

#include <gtest/gtest.h>

#include <map>
#include <set>

#include "device/mem_device.h"
#include "fs/filesystem.h"
#include "fs/super.h"
#include "fsck/fsck.h"

namespace agorafs {
namespace {

class CorruptTest : public ::testing::Test {
 protected:
  void SetUp() override {
    mem_ = std::make_shared<MemDevice>(uint64_t(128) << 20);
    MkfsOptions mo;
    mo.params.node_slots = 2;
    ASSERT_TRUE(Mkfs(mem_.get(), mo).ok());
  }
  std::unique_ptr<Filesystem> MountFs() {
    MountOptions o;
    o.store.background = false;
    o.heartbeat_ms_override = 50;
    auto r = Filesystem::Mount(std::make_unique<MemView>(mem_), o);
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return r.ok() ? std::move(r).value() : nullptr;
  }
  // A populated tree: a big directory (hashed), a fragmented file (extent nodes), a
  // file with an xattr block.
  void Populate() {
    auto fs = MountFs();
    ASSERT_TRUE(fs);
    Caller c;
    auto d = fs->Mkdir(c, fs->root_ino(), "big", 0755);
    ASSERT_TRUE(d.ok());
    for (int i = 0; i < 200; i++) {
      ASSERT_TRUE(fs->Mknod(c, d->ino, "entry-with-a-long-name-" + std::to_string(i),
                            S_IFREG | 0644, 0)
                      .ok());
    }
    auto f = fs->Mknod(c, fs->root_ino(), "frag", S_IFREG | 0644, 0);
    ASSERT_TRUE(f.ok());
    frag_ = f->ino;
    for (int i = 0; i < 300; i++) {
      ASSERT_TRUE(fs->Write(c, f->ino, uint64_t(i) * 2 * 4096, "x", 1).ok());
    }
    auto x = fs->Mknod(c, fs->root_ino(), "xat", S_IFREG | 0644, 0);
    ASSERT_TRUE(x.ok());
    ASSERT_TRUE(fs->SetXattr(c, x->ino, "user.big", std::string(2000, 'v'), 0).ok());
    ASSERT_TRUE(fs->Unmount().ok());
  }

  // Shares the MemDevice so a Filesystem can own a device of its own.
  class MemView final : public BlockDevice {
   public:
    explicit MemView(std::shared_ptr<MemDevice> m) : m_(std::move(m)) {}
    Status Read(uint64_t o, void* b, size_t l) override { return m_->Read(o, b, l); }
    Status Write(uint64_t o, const void* b, size_t l) override { return m_->Write(o, b, l); }
    Status Flush() override { return m_->Flush(); }
    uint64_t Size() const override { return m_->Size(); }
    std::string Name() const override { return m_->Name(); }

   private:
    std::shared_ptr<MemDevice> m_;
  };

  std::shared_ptr<MemDevice> mem_;
  uint64_t frag_ = 0;
};

TEST_F(CorruptTest, FindsEveryKindWithOwners) {
  Populate();
  auto all = FindMetadata(mem_.get());
  ASSERT_TRUE(all.ok()) << all.status().ToString();
  std::map<MetaKind, int> n;
  for (const auto& m : *all) {
    n[m.kind]++;
    if (m.kind == MetaKind::kExtent) {
      EXPECT_EQ(m.ino, frag_);
      EXPECT_EQ(m.path, "/frag");
    }
    if (m.kind == MetaKind::kXattr) {
      EXPECT_EQ(m.path, "/xat");
    }
    if (m.kind == MetaKind::kDir) {
      EXPECT_EQ(m.path, "/big");
    }
  }
  for (const auto& name : MetaKindNames()) {
    MetaKind k;
    ASSERT_TRUE(ParseMetaKind(name, &k));
    EXPECT_GT(n[k], 0) << name;
  }
  EXPECT_EQ(n[MetaKind::kSuper], 3);
  EXPECT_GE(n[MetaKind::kInode], 204);
}

TEST_F(CorruptTest, DamagedBlocksFailVerificationAndAreNotFoundAgain) {
  Populate();
  auto sb = ReadSuperblock(mem_.get());
  ASSERT_TRUE(sb.ok());
  for (CorruptMode mode : {CorruptMode::kFlip, CorruptMode::kZero}) {
    CorruptOptions o;
    o.kind = MetaKind::kInode;
    o.count = 3;
    o.mode = mode;
    o.seed = 7;
    auto r = Corrupt(mem_.get(), o);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    ASSERT_EQ(r->damaged.size(), 3u);
    AlignedBuffer b(kBlockSize);
    for (const auto& m : r->damaged) {
      EXPECT_NE(m.ino, sb->root_ino);
      ASSERT_TRUE(mem_->Read(m.block * kBlockSize, b.data(), kBlockSize).ok());
      EXPECT_FALSE(VerifyBlock(b.data(), BlockType::kInode, m.block, SuperUuid(*sb)).ok());
    }
    auto all = FindMetadata(mem_.get());
    ASSERT_TRUE(all.ok());
    for (const auto& m : *all) {
      for (const auto& d : r->damaged) EXPECT_NE(m.block, d.block);
    }
  }
  // Only what was asked for.
  CorruptOptions o;
  o.kind = MetaKind::kExtent;
  o.ino = frag_ + 1000000;
  EXPECT_TRUE(Corrupt(mem_.get(), o).status().Is(Code::kNotFound));
  o.ino = frag_;
  auto r = Corrupt(mem_.get(), o);
  ASSERT_TRUE(r.ok());
  ASSERT_EQ(r->damaged.size(), 1u);
  EXPECT_EQ(r->damaged[0].ino, frag_);
  EXPECT_NE(r->ToJson().find("\"kind\":\"extent\""), std::string::npos);
}

TEST_F(CorruptTest, RefusesWhileALiveNodeHasItMounted) {
  Populate();
  auto fs = MountFs();
  ASSERT_TRUE(fs);
  CorruptOptions o;
  o.kind = MetaKind::kInode;
  o.heartbeat_ms_override = 50;
  auto before = FindMetadata(mem_.get());
  auto r = Corrupt(mem_.get(), o);
  EXPECT_TRUE(r.status().Is(Code::kBusy)) << r.status().ToString();
  ASSERT_TRUE(fs->Unmount().ok());
  auto after = FindMetadata(mem_.get());
  ASSERT_TRUE(before.ok() && after.ok());
  EXPECT_EQ(before->size(), after->size());
  EXPECT_TRUE(Corrupt(mem_.get(), o).ok());
}

}  // namespace
}  // namespace agorafs
