// Fuzz target: the decoders of everything rooted in an inode block (inode fields,
// inline and hashed directories with their table and leaf blocks, extent trees,
// inline and external xattrs), read-only and, optionally, through the mutating
// calls (dir::Add/Remove/Replace/FreeAll, extent::MapOrAllocate/MarkWritten/PunchStep,
// xattr::Store) that must also refuse corrupt structures instead of crashing.
//
// Input: flags (u8), n = 1 + u8 % 8, n block numbers (u64, the first is the inode),
// then the n blocks' bytes, 4096 each (the last ones zero-padded). The MetaTxn serves
// exactly these blocks; any other number is "not present" (kCorruption). The
// filesystem UUID is the one in the first block's header.
//   bit 0: every block read gets a valid header and checksum for the number and type
//          asked (the fuzzer then reaches the payload checks without a checksum).
//   bit 1: run the mutating calls too (each on its own copy of the inode).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <map>
#include <set>

#include "dir/dir.h"
#include "extent/extent.h"
#include "fs/inode.h"
#include "fs/xattr.h"
#include "fsck/fsck_internal.h"
#include "fuzz/fuzz_common.h"

namespace agorafs::fuzz {
namespace {

constexpr uint64_t kNewBase = uint64_t(1) << 40;  // blocks NewBlock/AllocData hand out
constexpr uint32_t kMaxNew = 64;

class FuzzMetaTxn final : public MetaTxn {
 public:
  FuzzMetaTxn(const Uuid& uuid, bool fixup, bool writable)
      : uuid_(uuid), fixup_(fixup), writable_(writable) {}

  void Add(uint64_t blk, const uint8_t* data, size_t n) {
    auto& b = blocks_[blk];
    b.assign(kBlockSize, 0);
    std::memcpy(b.data(), data, std::min<size_t>(n, kBlockSize));
  }

  bool read_only() const override { return !writable_; }
  const Uuid& uuid() const override { return uuid_; }

  Result<const uint8_t*> Read(uint64_t blk, BlockType type, LockId lock) override {
    auto r = Get(blk, type, lock);
    if (!r.ok()) return r.status();
    return static_cast<const uint8_t*>(*r);
  }
  Result<uint8_t*> Write(uint64_t blk, BlockType type, LockId lock) override {
    if (!writable_) return Err(Code::kReadOnly, "read-only fuzz transaction");
    return Get(blk, type, lock);
  }
  Result<std::pair<uint64_t, uint8_t*>> NewBlock(BlockType type, LockId, uint64_t) override {
    if (!writable_) return Err(Code::kReadOnly, "read-only fuzz transaction");
    if (allocated_ >= kMaxNew) return Err(Code::kNoSpace, "fuzz store full");
    const uint64_t blk = kNewBase + allocated_++;
    auto& b = blocks_[blk];
    b.assign(kBlockSize, 0);
    InitHeader(b.data(), type, blk, uuid_);
    verified_.insert(blk);
    return std::make_pair(blk, b.data());
  }
  Result<Allocation> AllocData(uint64_t, uint32_t want) override {
    if (!writable_) return Err(Code::kReadOnly, "read-only fuzz transaction");
    if (allocated_ >= kMaxNew || want == 0) return Err(Code::kNoSpace, "fuzz store full");
    const uint32_t n = std::min<uint32_t>(want, kMaxNew - allocated_);
    Allocation a{kNewBase + allocated_, n};
    allocated_ += n;
    return a;
  }
  Status Free(uint64_t, uint64_t) override {
    if (!writable_) return Err(Code::kReadOnly, "read-only fuzz transaction");
    return Status::Ok();
  }

 private:
  Result<uint8_t*> Get(uint64_t blk, BlockType type, LockId) {
    auto it = blocks_.find(blk);
    if (it == blocks_.end()) return Err(Code::kCorruption, "block not present");
    uint8_t* p = it->second.data();
    if (verified_.count(blk)) {  // already handed out: changed in place since, unsealed
      if (Header(p)->type != uint16_t(type)) return Err(Code::kCorruption, "wrong type");
      return p;
    }
    if (fixup_) {
      Header(p)->type = uint16_t(type);
      FixHeader(p, blk, uuid_);
    }
    AGFS_RETURN_IF_ERROR(VerifyBlock(p, type, blk, uuid_));
    verified_.insert(blk);
    return p;
  }

  Uuid uuid_;
  bool fixup_, writable_;
  uint32_t allocated_ = 0;
  std::map<uint64_t, std::vector<uint8_t>> blocks_;
  std::set<uint64_t> verified_;
};

struct Parsed {
  uint8_t flags = 0;
  std::vector<uint64_t> nrs;
  std::vector<std::vector<uint8_t>> blocks;
};

Parsed Parse(const uint8_t* data, size_t size) {
  Input in(data, size);
  Parsed p;
  p.flags = in.U8();
  const size_t n = 1 + in.U8() % 8;
  for (size_t i = 0; i < n; i++) p.nrs.push_back(in.U64());
  for (size_t i = 0; i < n; i++) {
    p.blocks.emplace_back(kBlockSize, 0);
    in.Bytes(p.blocks.back().data(), kBlockSize);
  }
  return p;
}

void Load(FuzzMetaTxn& txn, const Parsed& p) {
  for (size_t i = 0; i < p.nrs.size(); i++) txn.Add(p.nrs[i], p.blocks[i].data(), kBlockSize);
}

void ReadOnly(const Parsed& p, const Uuid& uuid) {
  FuzzMetaTxn txn(uuid, p.flags & 1, false);
  Load(txn, p);
  const uint64_t ino = p.nrs[0];
  auto r = txn.ReadAs<InodeBlock>(ino, BlockType::kInode, InodeLock(ino));
  if (!r.ok()) return;
  const InodeBlock I = **r;
  Walk(txn, ino, 1);
  // Every decoder, whatever the mode says: each must check the layout itself.
  std::vector<std::string> problems;
  size_t k = 0;
  (void)dir::Check(txn, ino, I, &problems, [&](const dir::Entry&) { k++; });
  (void)dir::ShapeOf(I);
  std::vector<dir::Entry> ents;
  (void)dir::List(txn, ino, I, 0, [&](const dir::Entry& e) {
    ents.push_back(e);
    return ents.size() < 256;
  });
  for (size_t i = 0; i < ents.size() && i < 16; i++) (void)dir::Lookup(txn, ino, I, ents[i].name);
  (void)dir::Lookup(txn, ino, I, "x");
  (void)dir::Empty(txn, ino, I);
  bool complete = false;
  (void)fsck_internal::DirBlocks(txn, ino, I, &complete);
  std::vector<uint64_t> nodes;
  (void)extent::ForEach(txn, ino, I, [&](const Extent&) { return ++k < 100000; }, &nodes);
  for (uint64_t lblk : {uint64_t(0), uint64_t(1), uint64_t(7), uint64_t(1000), I.size / kBlockSize,
                        extent::kMaxFileBlocks - 1}) {
    (void)extent::Lookup(txn, ino, I, lblk);
    (void)extent::NextData(txn, ino, I, lblk, true);
  }
  (void)xattr::List(txn, ino, I);
}

void Mutating(const Parsed& p, const Uuid& uuid) {
  const uint64_t ino = p.nrs[0];
  std::string first;
  {
    FuzzMetaTxn txn(uuid, p.flags & 1, false);
    Load(txn, p);
    auto r = txn.ReadAs<InodeBlock>(ino, BlockType::kInode, InodeLock(ino));
    if (!r.ok()) return;
    (void)dir::List(txn, ino, **r, 0, [&](const dir::Entry& e) {
      first = e.name;
      return false;
    });
  }
  // Each call gets a fresh transaction over the input and its own inode copy.
  auto run = [&](auto&& fn) {
    FuzzMetaTxn txn(uuid, p.flags & 1, true);
    Load(txn, p);
    auto w = txn.WriteAs<InodeBlock>(ino, BlockType::kInode, InodeLock(ino));
    if (w.ok()) fn(txn, *w);
  };
  run([&](MetaTxn& t, InodeBlock* I) { (void)dir::Add(t, ino, I, "fuzz-new-name", 4242, 8); });
  run([&](MetaTxn& t, InodeBlock* I) {
    for (int i = 0; i < 40; i++) {
      (void)dir::Add(t, ino, I, "n" + std::to_string(i) + std::string(200, 'a'), 4242, 8);
    }
  });
  if (!first.empty()) {
    run([&](MetaTxn& t, InodeBlock* I) { (void)dir::Remove(t, ino, I, first); });
    run([&](MetaTxn& t, InodeBlock* I) { (void)dir::Replace(t, ino, I, first, 4243, 4); });
  }
  run([&](MetaTxn& t, InodeBlock* I) { (void)dir::FreeAll(t, ino, I); });
  run([&](MetaTxn& t, InodeBlock* I) {
    auto m = extent::MapOrAllocate(t, ino, I, 5, 3, true, 0);
    if (m.ok()) (void)extent::MarkWritten(t, ino, I, 5, 3);
  });
  run([&](MetaTxn& t, InodeBlock* I) { (void)extent::MarkWritten(t, ino, I, 0, 1000); });
  run([&](MetaTxn& t, InodeBlock* I) {
    extent::PunchBudget b;
    b.max_blocks = 64;
    b.max_extents = 8;
    (void)extent::PunchStep(t, ino, I, 1, UINT64_MAX, b);
  });
  run([&](MetaTxn& t, InodeBlock* I) {
    auto l = xattr::List(t, ino, *I);
    if (!l.ok()) return;
    l->emplace_back("user.fuzz", std::string(300, 'v'));
    (void)xattr::Store(t, ino, I, *l);
  });
}

void Seeds(const std::string& dir) {
  const Images& im = BaseImages();
  OverlayDevice dev(&im.clean);
  fsck_internal::DeviceTxn txn(&dev, im.g, im.uuid, nullptr);
  for (uint64_t ino : im.inodes) {
    auto r = txn.ReadAs<InodeBlock>(ino, BlockType::kInode, InodeLock(ino));
    if (!r.ok()) continue;
    const InodeBlock I = **r;
    std::vector<uint64_t> nrs{ino};
    bool complete = false;
    for (uint64_t b : fsck_internal::DirBlocks(txn, ino, I, &complete)) nrs.push_back(b);
    std::vector<uint64_t> nodes;
    if (I.data_kind == uint8_t(DataKind::kExtents)) {
      (void)extent::ForEach(txn, ino, I, [](const Extent&) { return true; }, &nodes);
    }
    nrs.insert(nrs.end(), nodes.begin(), nodes.end());
    if (I.xattr_block) nrs.push_back(I.xattr_block);
    if (nrs.size() > 8) nrs.resize(8);
    for (uint8_t flags = 0; flags < 4; flags++) {
      std::vector<uint8_t> s{flags, uint8_t(nrs.size() - 1)};
      for (uint64_t n : nrs) {
        for (int i = 0; i < 8; i++) s.push_back(uint8_t(n >> (8 * i)));
      }
      for (uint64_t n : nrs) {
        const uint8_t* b = im.clean.data() + n * kBlockSize;
        s.insert(s.end(), b, b + kBlockSize);
      }
      WriteSeed(dir, "inode-" + std::to_string(ino) + "-" + std::to_string(flags), s);
    }
  }
}

}  // namespace
}  // namespace agorafs::fuzz

using namespace agorafs;
using namespace agorafs::fuzz;

extern "C" int LLVMFuzzerInitialize(int*, char***) { return InitTarget(Seeds); }

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) return 0;
  Parsed p = Parse(data, size);
  // The filesystem UUID is the one the inode block claims.
  Uuid uuid;
  std::memcpy(uuid.data(), Header(p.blocks[0].data())->uuid, uuid.size());
  ReadOnly(p, uuid);
  if (p.flags & 2) Mutating(p, uuid);
  return 0;
}
