// Fuzz target: the journal decoders and replayer. The input becomes part of the
// journal region of slot 0 of a real image; fsck then scans every journal
// (fsck_internal::ScanJournal) and checks the filesystem as it would be after replay,
// Journal::Open + Replay write the complete transactions home, and the tree is read
// back the way a mount would.
//
// Input: flags (u8), start (u16, a block index in the region, modulo its size), then
// up to 16 blocks of 4096 bytes written at region blocks start, start+1, ... (mod
// size; a short last block is zero-padded).
//   bit 0: fix up headers: blocks typed journal header/descriptor/commit get a valid
//          header for where they land and a checksum; a commit also gets the body
//          hash of the descriptor and data blocks written since the previous commit.
//   bit 1: start from the cleanly unmounted image (default: the crashed one, whose
//          journal holds committed transactions that were never written home).
#include <cstdint>
#include <cstring>

#include "fs/super.h"
#include "fsck/fsck.h"
#include "fsck/fsck_internal.h"
#include "fuzz/fuzz_common.h"
#include "journal/journal.h"
#include "util/hash.h"

namespace agorafs::fuzz {
namespace {

constexpr size_t kMaxBlocks = 16;

uint32_t TailPos(const std::vector<uint8_t>& img, const Geometry& g) {
  const auto* a = reinterpret_cast<const JournalHeader*>(img.data() + g.JournalStart(0) * kBlockSize);
  const auto* b =
      reinterpret_cast<const JournalHeader*>(img.data() + (g.JournalStart(0) + 1) * kBlockSize);
  return (b->update > a->update ? b : a)->tail_pos;
}

void Seeds(const std::string& dir) {
  const Images& im = BaseImages();
  const uint64_t region = im.g.JournalStart(0);
  for (int clean = 0; clean < 2; clean++) {
    const std::vector<uint8_t>& img = clean ? im.clean : im.crashed;
    const uint32_t tail = TailPos(img, im.g);
    for (uint32_t start : {uint32_t(0), kJournalLogStart + tail}) {
      for (uint8_t fix = 0; fix < 2; fix++) {
        std::vector<uint8_t> s{uint8_t(fix | (clean << 1)), uint8_t(start), uint8_t(start >> 8)};
        for (size_t i = 0; i < kMaxBlocks; i++) {
          const uint64_t blk = region + (start + i) % im.g.journal_blocks;
          s.insert(s.end(), img.begin() + blk * kBlockSize, img.begin() + (blk + 1) * kBlockSize);
        }
        WriteSeed(dir,
                  std::string(clean ? "clean" : "crashed") + "-at-" + std::to_string(start) +
                      (fix ? "-fixup" : ""),
                  s);
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
  const uint32_t start = in.U16() % im.g.journal_blocks;
  OverlayDevice dev((flags & 2) ? &im.clean : &im.crashed);
  const uint64_t region = im.g.JournalStart(0);
  Hasher body;
  for (size_t i = 0; i < kMaxBlocks && in.left() > 0; i++) {
    const uint64_t blk = region + (start + i) % im.g.journal_blocks;
    uint8_t* b = dev.MutableBlock(blk);
    std::memset(b, 0, kBlockSize);
    in.Bytes(b, kBlockSize);
    if (!(flags & 1)) continue;
    const uint16_t type = Header(b)->type;
    if (type == uint16_t(BlockType::kJournalHeader)) {
      FixHeader(b, blk, im.uuid);
      body = Hasher();
    } else if (type == uint16_t(BlockType::kJournalDesc)) {
      FixHeader(b, blk, im.uuid);
      body.Update(b, kBlockSize);
    } else if (type == uint16_t(BlockType::kJournalCommit)) {
      reinterpret_cast<JournalCommit*>(b)->body_hash = body.Digest();
      FixHeader(b, blk, im.uuid);
      body = Hasher();
    } else {
      body.Update(b, kBlockSize);
    }
  }

  FsckOptions fo;
  fo.heartbeat_ms_override = 1;
  (void)Fsck(&dev, fo);

  auto j = Journal::Open(&dev, im.g, im.uuid, 0, 1);
  if (!j.ok()) return 0;
  auto r = (*j)->Replay();
  if (!r.ok()) return 0;
  fsck_internal::DeviceTxn txn(&dev, im.g, im.uuid, nullptr);
  Walk(txn, im.sb.root_ino);
  return 0;
}
