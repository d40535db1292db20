// Shared pieces of the libFuzzer targets; see fuzz_common.h.
#include "fuzz/fuzz_common.h"

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>

#include "device/fault_device.h"
#include "device/mem_device.h"
#include "dir/dir.h"
#include "extent/extent.h"
#include "fs/filesystem.h"
#include "fs/inode.h"
#include "fs/super.h"
#include "fs/test_mount_options.h"
#include "fs/xattr.h"
#include "util/hash.h"

namespace agorafs::fuzz {
namespace {

constexpr uint64_t kImageBytes = uint64_t(16) << 20;

[[noreturn]] void Die(const std::string& what, const Status& st) {
  std::fprintf(stderr, "fuzz harness: %s: %s\n", what.c_str(), st.ToString().c_str());
  std::abort();
}

#define FUZZ_CHECK(expr, what)                 \
  do {                                         \
    const auto& _st = (expr);                  \
    if (!_st.ok()) Die(what, _st.status());    \
  } while (0)

// Result<T> and Status both answer ok(); status() exists only on Result.
struct AsResult {
  Status st;
  bool ok() const { return st.ok(); }
  const Status& status() const { return st; }
};
inline AsResult R(Status s) { return AsResult{std::move(s)}; }

MountOptions NodeOptions() {
  MountOptions o = FastTestMountOptions();
  o.host = "fuzz";
  return o;
}

std::vector<uint64_t> MetaBlocks(const std::vector<uint8_t>& img, const Geometry& g) {
  std::vector<uint64_t> out;
  const uint64_t n = img.size() / kBlockSize;
  for (uint64_t b = 0; b < n; b++) {
    const uint8_t* p = img.data() + b * kBlockSize;
    if (Header(p)->magic != kMagic) continue;
    // Cluster blocks (mailboxes, Disk Paxos, rings, ...) are not decoded by fsck or
    // replay, and how many there are depends on timing: leaving them out keeps the
    // list (and what a patch index names) the same in every process.
    if (Header(p)->type >= uint16_t(BlockType::kMailHeader)) continue;
    bool heartbeat = false;
    for (uint32_t s = 0; s < g.node_slots; s++) heartbeat |= b == g.SlotBlock(s, kSlotHeartbeat);
    if (!heartbeat) out.push_back(b);
  }
  return out;
}

// Directory name hashes without the per-directory random seed: the images (which
// blocks the directories use, so which block a patch index names) are then the same
// in every process, and a saved crashing input replays the same damage.
uint64_t FixedSeedHash(uint64_t, std::string_view name) {
  return Hash64(name.data(), name.size(), 0x6167667a7a);
}

Images Build() {
  QuietLogs();
  dir::SetHashFnForTesting(FixedSeedHash);
  Images im;
  auto mem = std::make_shared<MemDevice>(kImageBytes);
  MkfsOptions mo;
  mo.params.node_slots = 2;
  mo.params.journal_blocks = 512;
  mo.params.heartbeat_interval_ms = 50;
  auto sb = Mkfs(mem.get(), mo);
  FUZZ_CHECK(sb, "mkfs");
  im.sb = *sb;
  im.g = GeometryOf(im.sb);
  im.uuid = SuperUuid(im.sb);

  Caller c;
  {
    auto r = Filesystem::Mount(std::make_unique<FaultDevice>(mem), NodeOptions());
    FUZZ_CHECK(r, "mount");
    Filesystem* fs = r->get();
    const uint64_t root = fs->root_ino();
    im.inodes.push_back(root);
    auto d = fs->Mkdir(c, root, "d", 0755);
    FUZZ_CHECK(d, "mkdir d");
    im.inodes.push_back(d->ino);

    auto small = fs->Mknod(c, d->ino, "small", S_IFREG | 0644, 0);
    FUZZ_CHECK(small, "create small");
    std::string text(300, 's');
    FUZZ_CHECK(fs->Write(c, small->ino, 0, text.data(), text.size()), "write small");
    FUZZ_CHECK(R(fs->SetXattr(c, small->ino, "user.a", "1", 0)), "setxattr");
    FUZZ_CHECK(R(fs->SetXattr(c, small->ino, "user.big", std::string(1200, 'x'), 0)),
               "setxattr big");
    im.inodes.push_back(small->ino);

    // Every other block of 300: 150 extents, more than the root holds (depth 1).
    auto big = fs->Mknod(c, d->ino, "big", S_IFREG | 0644, 0);
    FUZZ_CHECK(big, "create big");
    std::string blk(kBlockSize, 'b');
    for (uint64_t i = 0; i < 300; i += 2) {
      FUZZ_CHECK(fs->Write(c, big->ino, i * kBlockSize, blk.data(), blk.size()), "write big");
    }
    im.inodes.push_back(big->ino);
    FUZZ_CHECK(fs->Link(c, big->ino, root, "big-link"), "link");

    auto s1 = fs->Symlink(c, d->ino, "short-link", "small");
    FUZZ_CHECK(s1, "symlink");
    im.inodes.push_back(s1->ino);
    auto s2 = fs->Symlink(c, root, "long-link", std::string(3500, 'l'));
    FUZZ_CHECK(s2, "long symlink");
    im.inodes.push_back(s2->ino);
    FUZZ_CHECK(fs->Mknod(c, root, "fifo", S_IFIFO | 0600, 0), "mkfifo");

    auto many = fs->Mkdir(c, root, "many", 0755);
    FUZZ_CHECK(many, "mkdir many");
    for (int i = 0; i < 200; i++) {
      char name[64];
      std::snprintf(name, sizeof(name), "entry-with-a-longer-name-%04d", i);
      FUZZ_CHECK(fs->Mknod(c, many->ino, name, S_IFREG | 0644, 0), "create entry");
    }
    im.inodes.push_back(many->ino);
    FUZZ_CHECK(R(fs->Unmount()), "unmount");
  }
  im.clean = mem->DurableImage();

  // The crashed image: more work reaches the journal, then the node dies.
  {
    auto mem2 = std::make_shared<MemDevice>(im.clean);
    auto fd = std::make_unique<FaultDevice>(mem2);
    FaultDevice* fault = fd.get();
    auto r = Filesystem::Mount(std::move(fd), NodeOptions());
    FUZZ_CHECK(r, "remount");
    Filesystem* fs = r->get();
    const uint64_t root = fs->root_ino();
    auto e = fs->Mkdir(c, root, "after", 0700);
    FUZZ_CHECK(e, "mkdir after");
    auto f = fs->Mknod(c, e->ino, "file", S_IFREG | 0644, 0);
    FUZZ_CHECK(f, "create file");
    std::string data(20000, 'f');
    FUZZ_CHECK(fs->Write(c, f->ino, 0, data.data(), data.size()), "write file");
    FUZZ_CHECK(R(fs->SetXattr(c, f->ino, "user.z", "zz", 0)), "setxattr");
    FUZZ_CHECK(R(fs->Rename(c, root, "fifo", e->ino, "fifo2", 0)), "rename");
    auto many = fs->Lookup(root, "many");
    FUZZ_CHECK(many, "lookup many");
    for (int i = 0; i < 200; i += 7) {
      char name[64];
      std::snprintf(name, sizeof(name), "entry-with-a-longer-name-%04d", i);
      FUZZ_CHECK(R(fs->Unlink(c, many->ino, name)), "unlink entry");
    }
    auto o = fs->Mknod(c, root, "open-unlinked", S_IFREG | 0644, 0);
    FUZZ_CHECK(o, "create orphan");
    FUZZ_CHECK(fs->Write(c, o->ino, 0, data.data(), data.size()), "write orphan");
    FUZZ_CHECK(R(fs->Open(o->ino, O_RDWR, c)), "open orphan");
    FUZZ_CHECK(R(fs->Unlink(c, root, "open-unlinked")), "unlink orphan");
    FUZZ_CHECK(R(fs->SyncAll()), "sync");  // in the journal, not home
    fault->SetGone(true);
    r->reset();
    mem2->Crash();
    im.crashed = mem2->DurableImage();
  }
  // Slots left mounted by the dead node: free them, so that fsck does not wait a
  // heartbeat interval for a node that will never beat again.
  for (uint32_t s = 0; s < im.g.node_slots; s++) {
    uint8_t* p = im.crashed.data() + im.g.SlotBlock(s, kSlotHeartbeat) * kBlockSize;
    auto* slot = reinterpret_cast<SlotBlock*>(p);
    if (slot->state == kSlotMounted) {
      slot->state = kSlotFree;
      SealBlock(p);
    }
  }
  im.clean_meta = MetaBlocks(im.clean, im.g);
  im.crashed_meta = MetaBlocks(im.crashed, im.g);
  return im;
}

}  // namespace

const Images& BaseImages() {
  static const Images* images = new Images(Build());
  return *images;
}

void QuietLogs() { spdlog::set_level(spdlog::level::off); }

int InitTarget(SeedWriter write) {
  QuietLogs();
  MaybeWriteSeeds(write);
  (void)BaseImages();
  return 0;
}

Status OverlayDevice::Read(uint64_t offset, void* buf, size_t len) {
  AGFS_RETURN_IF_ERROR(CheckIo(offset, buf, len, Size()));
  auto* out = static_cast<uint8_t*>(buf);
  for (uint64_t pos = offset; pos < offset + len;) {
    const uint64_t blk = pos / kBlockSize, in = pos % kBlockSize;
    const size_t n = std::min<uint64_t>(kBlockSize - in, offset + len - pos);
    auto it = overlay_.find(blk);
    const uint8_t* src = it != overlay_.end() ? it->second.get() + in : base_->data() + pos;
    std::memcpy(out + (pos - offset), src, n);
    pos += n;
  }
  return Status::Ok();
}

Status OverlayDevice::Write(uint64_t offset, const void* buf, size_t len) {
  AGFS_RETURN_IF_ERROR(CheckIo(offset, buf, len, Size()));
  const auto* in_buf = static_cast<const uint8_t*>(buf);
  for (uint64_t pos = offset; pos < offset + len;) {
    const uint64_t blk = pos / kBlockSize, in = pos % kBlockSize;
    const size_t n = std::min<uint64_t>(kBlockSize - in, offset + len - pos);
    std::memcpy(MutableBlock(blk) + in, in_buf + (pos - offset), n);
    pos += n;
  }
  return Status::Ok();
}

uint8_t* OverlayDevice::MutableBlock(uint64_t blk) {
  auto& slot = overlay_[blk];
  if (!slot) {
    slot = std::make_unique<uint8_t[]>(kBlockSize);
    std::memcpy(slot.get(), base_->data() + blk * kBlockSize, kBlockSize);
  }
  return slot.get();
}

void FixHeader(uint8_t* block, uint64_t blocknr, const Uuid& uuid) {
  BlockHeader* h = Header(block);
  h->magic = kMagic;
  h->blocknr = blocknr;
  std::memcpy(h->uuid, uuid.data(), uuid.size());
  SealBlock(block);
}

void Walk(MetaTxn& txn, uint64_t root, size_t max_inodes) {
  std::vector<uint64_t> queue{root};
  std::set<uint64_t> seen{root};
  volatile uint64_t sink = 0;  // keeps the reads from being optimised away
  for (size_t qi = 0; qi < queue.size() && qi < max_inodes; qi++) {
    const uint64_t ino = queue[qi];
    auto r = txn.ReadAs<InodeBlock>(ino, BlockType::kInode, InodeLock(ino));
    if (!r.ok()) continue;
    InodeBlock I;
    std::memcpy(&I, *r, sizeof(I));
    // getattr
    sink = sink + I.mode + I.nlink + I.size + I.blocks + I.uid + I.gid + I.rdev +
           uint64_t(I.mtime.sec) + I.mtime.nsec + I.generation;
    // listxattr / getxattr
    auto xl = xattr::List(txn, ino, I);
    if (xl.ok()) {
      for (const auto& [name, value] : *xl) sink = sink + name.size() + value.size();
    }
    if (IsDir(I)) {
      (void)dir::Empty(txn, ino, I);
      std::vector<dir::Entry> ents;
      (void)dir::List(txn, ino, I, 2, [&](const dir::Entry& e) {
        if (ents.size() >= 1024) return false;
        ents.push_back(e);
        return true;
      });
      if (ents.size() > 2) {  // readdir resuming from a cookie in the middle
        size_t n = 0;
        (void)dir::List(txn, ino, I, ents[ents.size() / 2].cookie,
                        [&](const dir::Entry&) { return ++n < 16; });
      }
      for (size_t i = 0; i < ents.size(); i++) {
        if (i < 64) {
          (void)dir::Lookup(txn, ino, I, ents[i].name);
          (void)dir::LeafOf(txn, ino, I, ents[i].name);
        }
        if (seen.insert(ents[i].ino).second) queue.push_back(ents[i].ino);
      }
      (void)dir::Lookup(txn, ino, I, "no-such-name");
    } else if (IsReg(I) || IsLnk(I)) {
      if (I.data_kind == uint8_t(DataKind::kInline)) {
        const size_t n = std::min<uint64_t>(I.size, kInodeDataSize);
        for (size_t i = 0; i < n; i++) sink = sink + I.data[i];
      } else if (I.data_kind == uint8_t(DataKind::kExtents)) {
        uint64_t lblk = 0;
        for (int i = 0; i < 64; i++) {
          auto m = extent::Lookup(txn, ino, I, lblk);
          if (!m.ok() || m->len == 0) break;
          sink = sink + m->physical;
          lblk = m->logical + m->len;
          if (lblk >= extent::kMaxFileBlocks || lblk * kBlockSize >= I.size) break;
        }
        (void)extent::NextData(txn, ino, I, 0, false);
        (void)extent::NextData(txn, ino, I, 1, true);
        (void)extent::NextData(txn, ino, I, I.size / kBlockSize, false);
        size_t k = 0;
        (void)extent::ForEach(txn, ino, I, [&](const Extent&) { return ++k < 4096; });
        sink = sink + extent::Depth(I);
      }
    }
  }
}

void WriteSeed(const std::string& dir, const std::string& name, const std::vector<uint8_t>& data) {
  std::ofstream f(dir + "/" + name, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(data.data()), std::streamsize(data.size()));
  if (!f) {
    std::fprintf(stderr, "cannot write seed %s/%s\n", dir.c_str(), name.c_str());
    std::exit(1);
  }
}

void MaybeWriteSeeds(SeedWriter write) {
  const char* dir = std::getenv("AGORAFS_FUZZ_WRITE_SEEDS");
  if (dir == nullptr || *dir == 0) return;
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) {
    std::fprintf(stderr, "cannot create %s: %s\n", dir, ec.message().c_str());
    std::exit(1);
  }
  write(dir);
  std::exit(0);
}

}  // namespace agorafs::fuzz
