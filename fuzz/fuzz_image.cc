// Fuzz target: a whole damaged filesystem. The input patches chosen metadata blocks
// of a real populated image (any block with a block header: superblock copies,
// journal headers and log blocks, AG headers, bitmaps, orphan lists, inodes, extent
// nodes, directory tables and leaves, xattr blocks; not the cluster blocks). Then:
// a read-only fsck, journal replay of every slot (as mount does), the read-only walk
// of the tree (readdir, lookup, getattr, read, readlink, getxattr) and, optionally,
// fsck --repair followed by another check.
//
// Input: flags (u8), then patches until the input ends (at most 32): index (u16, into
// the list of metadata blocks, modulo its length), offset (u16, modulo 4096), length
// (u8), bytes.
//   bit 0: reseal every patched block (recompute its checksum) after patching.
//   bit 1: start from the crashed image (journal of slot 0 holds unreplayed
//          transactions, an orphan is pending) instead of the clean one.
//   bit 2: run fsck --repair and a check after it.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <set>

#include "fs/super.h"
#include "fsck/fsck.h"
#include "fsck/fsck_internal.h"
#include "fuzz/fuzz_common.h"
#include "journal/journal.h"

namespace agorafs::fuzz {
namespace {

constexpr size_t kMaxPatches = 32;

void Seeds(const std::string& dir) {
  const Images& im = BaseImages();
  for (int crashed = 0; crashed < 2; crashed++) {
    const auto& img = crashed ? im.crashed : im.clean;
    const auto& meta = crashed ? im.crashed_meta : im.clean_meta;
    for (uint8_t flags : {uint8_t(1), uint8_t(5)}) {
      flags |= uint8_t(crashed << 1);
      WriteSeed(dir, "plain-" + std::to_string(flags), {flags});
      // One seed per block type: a patch that rewrites 16 payload bytes unchanged.
      std::set<uint16_t> types;
      for (size_t i = 0; i < meta.size(); i++) {
        const uint8_t* b = img.data() + meta[i] * kBlockSize;
        if (Header(b)->blocknr != meta[i]) continue;  // a copy inside a journal
        if (!types.insert(Header(b)->type).second) continue;
        std::vector<uint8_t> s{flags, uint8_t(i), uint8_t(i >> 8), 48, 0, 16};
        s.insert(s.end(), b + 48, b + 64);
        WriteSeed(dir, "type-" + std::to_string(Header(b)->type) + "-" + std::to_string(flags), s);
      }
    }
  }
}

}  // namespace
}  // namespace agorafs::fuzz

using namespace agorafs;
using namespace agorafs::fuzz;

extern "C" int LLVMFuzzerInitialize(int*, char***) { return InitTarget(Seeds); }

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const Images& im = BaseImages();
  Input in(data, size);
  const uint8_t flags = in.U8();
  const bool crashed = flags & 2;
  const auto& meta = crashed ? im.crashed_meta : im.clean_meta;
  OverlayDevice dev(crashed ? &im.crashed : &im.clean);
  std::set<uint64_t> patched;
  for (size_t i = 0; i < kMaxPatches && in.left() > 0; i++) {
    const uint64_t blk = meta[in.U16() % meta.size()];
    const uint32_t off = in.U16() % kBlockSize;
    const uint32_t len = std::min<uint32_t>(in.U8(), kBlockSize - off);
    in.Bytes(dev.MutableBlock(blk) + off, len);
    patched.insert(blk);
  }
  if (flags & 1) {
    for (uint64_t blk : patched) SealBlock(dev.MutableBlock(blk));
  }

  FsckOptions fo;
  fo.heartbeat_ms_override = 1;
  (void)Fsck(&dev, fo);

  auto sb = ReadSuperblock(&dev);
  if (!sb.ok()) return 0;
  const Geometry g = GeometryOf(*sb);
  const Uuid uuid = SuperUuid(*sb);
  for (uint32_t s = 0; s < g.node_slots; s++) {
    auto j = Journal::Open(&dev, g, uuid, s, 1);
    if (j.ok()) (void)(*j)->Replay();
  }
  {
    fsck_internal::DeviceTxn txn(&dev, g, uuid, nullptr);
    Walk(txn, sb->root_ino);
  }
  if (flags & 4) {
    fo.repair = true;
    (void)Fsck(&dev, fo);
    fo.repair = false;
    (void)Fsck(&dev, fo);
  }
  return 0;
}
