// Fuzz target: the superblock decoder (ReadSuperblock: header, version, features,
// layout recomputed and compared) and, for a superblock it accepts, what the
// geometry drives: journal open/replay of the first slots and a read-only fsck.
//
// Input: one flag byte, then up to 4096 bytes of superblock (zero-padded).
//   bit 0: fix the header (magic, blocknr, uuid kept from the input) and checksum.
//   bit 1: zero block 0 and put the input at block 1 (the first backup copy).
#include <cstdint>
#include <cstring>

#include "fs/super.h"
#include "fsck/fsck.h"
#include "fuzz/fuzz_common.h"
#include "journal/journal.h"

namespace agorafs::fuzz {
namespace {

void Seeds(const std::string& dir) {
  const Images& im = BaseImages();
  for (uint8_t flags = 0; flags < 4; flags++) {
    std::vector<uint8_t> s{flags};
    s.insert(s.end(), im.clean.begin(), im.clean.begin() + kBlockSize);
    WriteSeed(dir, "super-" + std::to_string(flags), s);
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
  OverlayDevice dev(&im.clean);
  const uint64_t where = (flags & 2) ? 1 : 0;
  if (where == 1) std::memset(dev.MutableBlock(0), 0, kBlockSize);
  uint8_t* b = dev.MutableBlock(where);
  std::memset(b, 0, kBlockSize);
  in.Bytes(b, kBlockSize);
  if (flags & 1) {
    Uuid u;
    std::memcpy(u.data(), Header(b)->uuid, u.size());
    Header(b)->type = uint16_t(BlockType::kSuper);
    FixHeader(b, where, u);
  }
  (void)DetectExisting(&dev);
  auto sb = ReadSuperblock(&dev);
  if (!sb.ok()) return 0;
  const Geometry g = GeometryOf(*sb);
  const Uuid uuid = SuperUuid(*sb);
  for (uint32_t s = 0; s < g.node_slots && s < 2; s++) {
    auto j = Journal::Open(&dev, g, uuid, s, 1);
    if (j.ok()) (void)(*j)->Replay();
  }
  FsckOptions fo;
  fo.heartbeat_ms_override = 1;
  (void)Fsck(&dev, fo);
  return 0;
}
