// Fuzz target: the readers of the cluster blocks in the node slot region, which fsck
// and replay never decode: `agorafs status` (ReadClusterStatus: every slot's
// heartbeat block with its verdict table, the Disk Paxos blocks, the master's peer
// view and lock snapshot, the mail headers; then StatusJson/StatusText), the message
// rings and single-block records of Mailbox (Read, ReadMailHeader, ReadAck), the
// open-file tables (ReadOpenTable) and Disk
// Paxos (the constructor's load of its own block, ReadDecided, and a bounded Propose
// against the damaged blocks of the other slots).
//
// Input: a flag byte, the generation a reader expects (u64: ring reads, open-file
// tables, the Paxos proposer's own generation), a ring reader's next seq (u64), a Paxos epoch (u64),
// then up to 8 records: slot (u8, modulo node_slots), index in the slot's region (u8,
// modulo slot_blocks), and up to 4096 bytes of block (zero-padded).
//   bit 0: give each placed block a valid header for its address, the type its
//          index holds (heartbeat, mail header, Paxos, ack table, snapshot, peer view,
//          ring, open-file table) and a valid checksum, so that the payload checks are reached.
//   bit 1: start from the `crashed` image (its node died mounted) instead of `clean`.
//   bit 2: the heartbeats beat: the second read of a heartbeat block that verifies
//          returns it with the counter advanced, so that status takes its nodes for
//          alive and reads the master's peer view.
//
// Not reached: Membership's own reading of the heartbeats (Join claims a slot and
// waits at least 200 ms, its observer runs in a thread) and the lock service's
// handling of ring messages (it needs a whole running node).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#include "cluster/mailbox.h"
#include "cluster/paxos.h"
#include "cluster/status.h"
#include "fs/open_table.h"
#include "fuzz/fuzz_common.h"

namespace agorafs::fuzz {
namespace {

constexpr size_t kMaxRecords = 8;

// The type slot block `index` holds.
BlockType TypeAt(uint32_t index) {
  if (index == kSlotHeartbeat) return BlockType::kSlot;
  if (index == kSlotMailbox) return BlockType::kMailHeader;
  if (index < kSlotPaxos) return BlockType::kOrphan;
  if (index < kSlotAcks) return BlockType::kPaxos;
  if (index < kSlotSnapshot) return BlockType::kAckTable;
  if (index < kSlotPeerView) return BlockType::kLockSnapshot;
  if (index == kSlotPeerView) return BlockType::kPeerView;
  if (index >= kSlotOpen) return BlockType::kOpenTable;
  return BlockType::kRing;
}

// Serves the second and later reads of a verified heartbeat block with its counter
// advanced (flag bit 2): status then sees the node beat during its sample.
class BeatingDevice final : public BlockDevice {
 public:
  BeatingDevice(OverlayDevice* inner, const Geometry& g, const Uuid& uuid)
      : inner_(inner), g_(g), uuid_(uuid), reads_(g.node_slots, 0) {}
  Status Read(uint64_t offset, void* buf, size_t len) override {
    AGFS_RETURN_IF_ERROR(inner_->Read(offset, buf, len));
    if (len != kBlockSize || offset % kBlockSize != 0) return Status::Ok();
    const uint64_t blk = offset / kBlockSize;
    for (uint32_t s = 0; s < g_.node_slots; s++) {
      if (blk != g_.SlotBlock(s, kSlotHeartbeat)) continue;
      auto* p = static_cast<uint8_t*>(buf);
      if (reads_[s]++ > 0 && VerifyBlock(p, BlockType::kSlot, blk, uuid_).ok()) {
        auto* b = reinterpret_cast<SlotBlock*>(p);
        b->counter = b->counter + reads_[s];
        SealBlock(p);
      }
    }
    return Status::Ok();
  }
  Status Write(uint64_t offset, const void* buf, size_t len) override {
    return inner_->Write(offset, buf, len);
  }
  Status Flush() override { return Status::Ok(); }
  uint64_t Size() const override { return inner_->Size(); }
  std::string Name() const override { return "fuzz-beating"; }

 private:
  OverlayDevice* inner_;
  Geometry g_;
  Uuid uuid_;
  std::vector<uint64_t> reads_;
};

struct Record {
  uint8_t slot, index;
  std::vector<uint8_t> block;
};

std::vector<uint8_t> Encode(uint8_t flags, uint64_t gen, uint64_t next, uint64_t epoch,
                            const std::vector<Record>& recs) {
  std::vector<uint8_t> out{flags};
  for (uint64_t v : {gen, next, epoch}) {
    for (int i = 0; i < 8; i++) out.push_back(uint8_t(v >> (8 * i)));
  }
  for (const Record& r : recs) {
    out.push_back(r.slot);
    out.push_back(r.index);
    out.insert(out.end(), r.block.begin(), r.block.end());
  }
  return out;
}

std::vector<uint8_t> BlockOf(const std::vector<uint8_t>& img, uint64_t blk) {
  const auto* p = img.data() + blk * kBlockSize;
  return std::vector<uint8_t>(p, p + kBlockSize);
}

// The non-zero cluster blocks of `img` (at most kMaxRecords, heartbeats first).
std::vector<Record> RealBlocks(const std::vector<uint8_t>& img, const Geometry& g) {
  std::vector<Record> recs;
  const uint32_t order[] = {kSlotHeartbeat, kSlotPaxos, kSlotMailbox, kSlotPeerView,
                            kSlotSnapshot, kSlotAcks,    kSlotRing,    kSlotPaxos + 1,
                            kSlotRing + 1};
  for (uint32_t index : order) {
    for (uint32_t s = 0; s < g.node_slots; s++) {
      std::vector<uint8_t> b = BlockOf(img, g.SlotBlock(s, index));
      if (IsZeroBlock(b.data()) || recs.size() >= kMaxRecords) continue;
      recs.push_back(Record{uint8_t(s), uint8_t(index), std::move(b)});
    }
  }
  return recs;
}

void Seeds(const std::string& dir) {
  const Images& im = BaseImages();
  const Geometry& g = im.g;
  // 1. The cluster blocks the real nodes of the base images left behind.
  for (uint8_t base = 0; base < 2; base++) {
    const auto& img = base ? im.crashed : im.clean;
    const auto* hb = reinterpret_cast<const SlotBlock*>(
        img.data() + g.SlotBlock(0, kSlotHeartbeat) * kBlockSize);
    std::vector<Record> recs = RealBlocks(img, g);
    for (uint8_t bits : {0, 4}) {
      WriteSeed(dir, "real-" + std::to_string(base) + "-" + std::to_string(bits),
                Encode(uint8_t(bits | (base << 1)), hb->generation, 1, 2, recs));
    }
  }
  // 2. Blocks written by the real encoders on a copy of `clean`: a master in slot 0
  //    (generation 7) that decided epoch 2 by Disk Paxos, appended 130 messages to its
  //    ring (two blocks), published its ack table and mail header; slot 1 (generation
  //    3) mounted with verdicts on slot 0's older generations.
  OverlayDevice dev(&im.clean);
  constexpr uint64_t kGen = 7;
  {
    DiskPaxos px(&dev, g, im.uuid, 0, kGen);
    int polls = 0;
    // The base image's node decided epoch 1 already.
    auto r = px.Propose(2, MasterRecord{2, 0, kGen}, [&] { return ++polls < 1000; });
    if (!r.ok()) std::fprintf(stderr, "seed propose: %s\n", r.status().ToString().c_str());
  }
  Mailbox mb(&dev, &dev, g, im.uuid, 0, kGen);
  std::vector<Msg> msgs(130);
  for (size_t i = 0; i < msgs.size(); i++) {
    msgs[i].epoch = 2;
    msgs[i].lock = 0x0100000000000000ull | (i + 16);
    msgs[i].dest = 1;
    msgs[i].op = uint8_t(1 + i % 4);
    msgs[i].mode = uint8_t(1 + i % 2);
    msgs[i].dest_gen = uint32_t(i);
  }
  (void)mb.Append(msgs);
  MailHeader mh;
  std::memset(&mh, 0, sizeof(mh));
  mh.generation = kGen;
  mh.epoch = 2;
  mh.master_slot = 0;
  mh.master_gen = kGen;
  mh.held = 3;
  mh.waiting = 1;
  mh.ring_start = 1;
  (void)mb.WriteMailHeader(mh);
  (void)mb.WriteAcks(2, {AckEntry{kGen, 131}, AckEntry{3, 12}});
  for (uint32_t s = 0; s < 2; s++) {
    AlignedBuffer buf(kBlockSize);
    auto* b = reinterpret_cast<SlotBlock*>(buf.data());
    b->state = kSlotMounted;
    b->slot = s;
    b->counter = 40 + s;
    b->generation = s == 0 ? kGen : 3;
    std::snprintf(b->host, sizeof(b->host), "node-%u", s);
    std::snprintf(b->address, sizeof(b->address), "10.0.0.%u:7000", s + 1);
    b->nonce = 0x1234 + s;
    b->epoch = 2;
    if (s == 1) {
      b->verdict_count = 2;
      b->verdicts[0] = Verdict{0, kVerdictRecovered, kGen - 2};
      b->verdicts[1] = Verdict{0, kVerdictRecovering, kGen - 1};
    }
    const uint64_t blk = g.SlotBlock(s, kSlotHeartbeat);
    InitHeader(buf.data(), BlockType::kSlot, blk, im.uuid);
    SealBlock(buf.data());
    (void)dev.Write(blk * kBlockSize, buf.data(), kBlockSize);
  }
  std::vector<Record> recs;
  for (auto [s, index] : std::vector<std::pair<uint8_t, uint8_t>>{
           {0, kSlotHeartbeat}, {1, kSlotHeartbeat}, {0, kSlotPaxos}, {0, kSlotPaxos + 1},
           {0, kSlotMailbox}, {0, kSlotAcks}, {0, kSlotRing}, {0, kSlotRing + 1}}) {
    // Through an aligned buffer: devices require one (CheckIo).
    AlignedBuffer buf(kBlockSize);
    if (Status st = dev.Read(g.SlotBlock(s, index) * kBlockSize, buf.data(), kBlockSize);
        !st.ok()) {
      std::fprintf(stderr, "seed read: %s\n", st.ToString().c_str());
      std::exit(1);
    }
    recs.push_back(Record{s, index, std::vector<uint8_t>(buf.data(), buf.data() + kBlockSize)});
  }
  for (uint8_t bits : {0, 1, 4, 5}) {
    WriteSeed(dir, "encoded-" + std::to_string(bits), Encode(bits, kGen, 1, 3, recs));
  }
  // Slot 1 works on epoch 3 with a higher ballot: a proposal of epoch 3 loses it and
  // takes the back-off path (one Scan of the other blocks, then gives up).
  // (In place of the second ring block: an input holds kMaxRecords blocks.)
  std::vector<Record> lost = recs;
  lost.back() = Record{1, uint8_t(kSlotPaxos), recs[2].block};
  auto* pb = reinterpret_cast<PaxosBlock*>(lost.back().block.data());
  pb->generation = 3;
  pb->instance = 3;
  pb->mbal = uint64_t(1) << 40;
  WriteSeed(dir, "encoded-lost-ballot", Encode(1, kGen, 1, 3, lost));
  // The ring read from the middle of its first block, and a proposal of the decided
  // epoch again.
  WriteSeed(dir, "encoded-mid", Encode(5, kGen, 60, 2, recs));
}

}  // namespace
}  // namespace agorafs::fuzz

using namespace agorafs;
using namespace agorafs::fuzz;

extern "C" int LLVMFuzzerInitialize(int*, char***) { return InitTarget(Seeds); }

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const Images& im = BaseImages();
  const Geometry& g = im.g;
  Input in(data, size);
  const uint8_t flags = in.U8();
  const uint64_t gen = in.U64();
  const uint64_t next = in.U64();
  const uint64_t epoch = in.U64();
  OverlayDevice overlay((flags & 2) ? &im.crashed : &im.clean);
  for (size_t r = 0; r < kMaxRecords && in.left() > 0; r++) {
    const uint32_t slot = in.U8() % g.node_slots;
    const uint32_t index = in.U8() % g.slot_blocks;
    const uint64_t blk = g.SlotBlock(slot, index);
    uint8_t* b = overlay.MutableBlock(blk);
    std::memset(b, 0, kBlockSize);
    in.Bytes(b, kBlockSize);
    if (flags & 1) {
      Header(b)->type = uint16_t(TypeAt(index));
      FixHeader(b, blk, im.uuid);
    }
  }
  BeatingDevice beating(&overlay, g, im.uuid);
  BlockDevice* dev = (flags & 4) ? static_cast<BlockDevice*>(&beating) : &overlay;

  // agorafs status, read-only, without a sample interval.
  auto st = ReadClusterStatus(dev, 0);
  if (st.ok()) {
    volatile size_t sink = StatusJson(*st).size() + StatusText(*st).size();
    (void)sink;
  }

  // Every slot's mail header, ack table entries and ring.
  Mailbox mb(&overlay, &overlay, g, im.uuid, 0, gen);
  for (uint32_t s = 0; s < g.node_slots; s++) {
    (void)mb.ReadMailHeader(s);
    for (uint32_t k = 0; k < g.node_slots; k++) (void)mb.ReadAck(s, k);
    uint64_t n = next;
    auto r = mb.Read(s, gen, &n);
    if (r.ok() && !r->empty()) (void)mb.Read(s, gen, &n);  // resumed where it stopped
    // The open-file table, as a node deciding whether to free an orphan reads it.
    std::vector<uint64_t> inos;
    (void)ReadOpenTable(&overlay, g, im.uuid, s, gen, &inos);
  }

  // Disk Paxos: load, read the decision, and one bounded proposal. The proposal gives
  // up at its first lost ballot (keep_going is asked before every back-off sleep).
  {
    DiskPaxos px(&overlay, g, im.uuid, 0, gen);
    (void)px.ReadDecided();
    int polls = 0;
    (void)px.Propose(epoch == 0 ? 1 : epoch, MasterRecord{0, 0, gen},
                     [&] { return ++polls < 64 && px.stats().aborted == 0; });
    (void)px.ReadDecided();
  }
  return 0;
}
