#include "cluster/paxos.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "device/fault_device.h"
#include "device/mem_device.h"

namespace agorafs {

// Drives a DiskPaxos one step at a time, for the deterministic interleaving simulator.
class DiskPaxosTestPeer {
 public:
  enum class Out { kContinue, kDecided, kAborted, kStale };
  static void Begin(DiskPaxos& p, uint64_t epoch, MasterRecord v) { p.Begin(epoch, v); }
  static Result<Out> Step(DiskPaxos& p) {
    Result<DiskPaxos::Outcome> r = p.Step();
    if (!r.ok()) return r.status();
    switch (*r) {
      case DiskPaxos::Outcome::kContinue: return Out::kContinue;
      case DiskPaxos::Outcome::kDecided: return Out::kDecided;
      case DiskPaxos::Outcome::kAborted: return Out::kAborted;
      case DiskPaxos::Outcome::kStale: return Out::kStale;
    }
    return Err(Code::kInvalid, "bad outcome");
  }
  static MasterRecord Decided(const DiskPaxos& p) { return p.own_.decided; }
  // The block the next step writes (a crash "during" it may leave it torn).
  static std::optional<uint64_t> PendingWrite(const DiskPaxos& p) {
    switch (p.op_) {
      case DiskPaxos::Op::kSync: {
        // Writes copy B only if copy A is valid and B is not the same.
        AlignedBuffer a(kBlockSize), b(kBlockSize);
        uint64_t ba = p.g_.SlotBlock(p.slot_, kSlotPaxos);
        uint64_t bb = p.g_.SlotBlock(p.slot_, kSlotPaxos + 1);
        if (!p.dev_->Read(ba * kBlockSize, a.data(), kBlockSize).ok() ||
            !p.dev_->Read(bb * kBlockSize, b.data(), kBlockSize).ok()) {
          return std::nullopt;
        }
        if (!VerifyBlock(a.data(), BlockType::kPaxos, ba, p.uuid_).ok()) return std::nullopt;
        if (VerifyBlock(b.data(), BlockType::kPaxos, bb, p.uuid_).ok() &&
            std::memcmp(a.data() + sizeof(BlockHeader), b.data() + sizeof(BlockHeader),
                        kPayload) == 0) {
          return std::nullopt;
        }
        return bb;
      }
      case DiskPaxos::Op::kWriteB:
        return p.g_.SlotBlock(p.slot_, kSlotPaxos + 1);
      case DiskPaxos::Op::kWriteA:
        return p.g_.SlotBlock(p.slot_, kSlotPaxos);
      default:
        return std::nullopt;
    }
  }
  static bool InPhase2Write(const DiskPaxos& p) {
    return p.stage_ == DiskPaxos::Stage::kPhase2 && p.op_ == DiskPaxos::Op::kWriteA;
  }
};

namespace {

using Out = DiskPaxosTestPeer::Out;

constexpr Uuid kUuid = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};

Geometry MakeGeometry(uint32_t slots) {
  Geometry g;
  g.node_slots = slots;
  g.slot_blocks = kDefaultSlotBlocks;
  g.slot_start = 3;
  g.total_blocks = g.slot_start + uint64_t(slots) * g.slot_blocks + 1;
  return g;
}

uint64_t DeviceBytes(const Geometry& g) { return g.total_blocks * kBlockSize; }

bool Forever() { return true; }

MasterRecord Rec(uint64_t e, uint32_t slot, uint64_t gen) { return MasterRecord{e, slot, gen}; }

std::string Str(const MasterRecord& r) {
  return "{epoch " + std::to_string(r.epoch) + ", slot " + std::to_string(r.slot) + ", gen " +
         std::to_string(r.generation) + "}";
}

void WriteGarbage(BlockDevice* dev, uint64_t blk, uint64_t seed) {
  AlignedBuffer b(kBlockSize);
  std::mt19937_64 rng(seed);
  for (size_t i = 0; i < kBlockSize; i += 8) {
    uint64_t v = rng();
    std::memcpy(b.data() + i, &v, 8);
  }
  ASSERT_TRUE(dev->Write(blk * kBlockSize, b.data(), kBlockSize).ok());
}

// Raw copy `copy` of `slot`'s Paxos block; nullopt if it does not verify.
std::optional<PaxosBlock> RawCopy(BlockDevice* dev, const Geometry& g, uint32_t slot,
                                  uint32_t copy) {
  AlignedBuffer b(kBlockSize);
  uint64_t blk = g.SlotBlock(slot, kSlotPaxos + copy);
  if (!dev->Read(blk * kBlockSize, b.data(), kBlockSize).ok()) return std::nullopt;
  if (!VerifyBlock(b.data(), BlockType::kPaxos, blk, kUuid).ok()) return std::nullopt;
  PaxosBlock p;
  std::memcpy(&p, b.data(), sizeof(p));
  return p;
}

// Sleeps a random 0..max_us before every I/O, so that threads interleave at random.
class DelayDevice final : public BlockDevice {
 public:
  DelayDevice(BlockDevice* base, uint32_t max_us) : base_(base), max_us_(max_us) {}
  Status Read(uint64_t off, void* buf, size_t len) override {
    Delay();
    return base_->Read(off, buf, len);
  }
  Status Write(uint64_t off, const void* buf, size_t len) override {
    Delay();
    return base_->Write(off, buf, len);
  }
  Status Flush() override {
    Delay();
    return base_->Flush();
  }
  uint64_t Size() const override { return base_->Size(); }
  std::string Name() const override { return "delay:" + base_->Name(); }

 private:
  void Delay() {
    static std::atomic<uint64_t> seeds{12345};
    thread_local std::mt19937 rng(uint32_t(seeds.fetch_add(7919)));
    uint32_t us = rng() % (max_us_ + 1);
    if (us > 0) std::this_thread::sleep_for(std::chrono::microseconds(us));
  }
  BlockDevice* base_;
  uint32_t max_us_;
};

// A liveness guard, not a timing assertion: a proposer still running after this long
// is stuck, and the test reports it instead of hanging.
std::function<bool()> Deadline(std::chrono::seconds s) {
  auto until = std::chrono::steady_clock::now() + s;
  return [until] { return std::chrono::steady_clock::now() < until; };
}

// ---------------------------------------------------------------- basics

TEST(DiskPaxosTest, FreshRegionHasNoDecision) {
  Geometry g = MakeGeometry(8);
  MemDevice mem(DeviceBytes(g));
  DiskPaxos px(&mem, g, kUuid, 3, 1);
  auto v = px.ReadDecided();
  ASSERT_TRUE(v.ok()) << v.status().ToString();
  EXPECT_EQ(v->decided.epoch, 0u);
  EXPECT_EQ(v->decided.slot, kNoSlot);
  EXPECT_EQ(v->decided.generation, 0u);
  EXPECT_EQ(v->highest_instance, 0u);
}

TEST(DiskPaxosTest, LoneProposerDecidesItselfInOneBallot) {
  Geometry g = MakeGeometry(8);
  MemDevice mem(DeviceBytes(g));
  DiskPaxos px(&mem, g, kUuid, 5, 42);
  auto r = px.Propose(1, Rec(0, 5, 42), Forever);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(*r, Rec(1, 5, 42));
  EXPECT_EQ(px.stats().ballots, 1u);
  EXPECT_EQ(px.stats().aborted, 0u);
  EXPECT_GT(px.stats().writes, 0u);
  EXPECT_GT(px.stats().reads, 0u);
  auto v = px.ReadDecided();
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(v->decided, Rec(1, 5, 42));
  EXPECT_EQ(v->highest_instance, 1u);
  // Both copies hold the same decided state.
  auto a = RawCopy(&mem, g, 5, 0), b = RawCopy(&mem, g, 5, 1);
  ASSERT_TRUE(a && b);
  EXPECT_EQ(a->decided_epoch, 1u);
  EXPECT_EQ(b->decided_epoch, 1u);
  EXPECT_EQ(a->generation, 42u);
  EXPECT_EQ(0, std::memcmp(reinterpret_cast<const uint8_t*>(&*a) + sizeof(BlockHeader),
                           reinterpret_cast<const uint8_t*>(&*b) + sizeof(BlockHeader),
                           kPayload));
  // Every write is flushed: nothing is lost by a power cut of the storage.
  EXPECT_EQ(mem.unflushed_bytes(), 0u);

  auto r2 = px.Propose(2, Rec(0, 5, 42), Forever);
  ASSERT_TRUE(r2.ok());
  EXPECT_EQ(*r2, Rec(2, 5, 42));
}

TEST(DiskPaxosTest, SingleSlotGeometry) {
  Geometry g = MakeGeometry(1);
  MemDevice mem(DeviceBytes(g));
  DiskPaxos px(&mem, g, kUuid, 0, 9);
  auto r = px.Propose(1, Rec(0, 0, 9), Forever);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(*r, Rec(1, 0, 9));
}

TEST(DiskPaxosTest, LateProposerAdoptsTheDecision) {
  Geometry g = MakeGeometry(4);
  MemDevice mem(DeviceBytes(g));
  DiskPaxos a(&mem, g, kUuid, 0, 1), b(&mem, g, kUuid, 1, 1);
  ASSERT_EQ(*a.Propose(1, Rec(0, 0, 1), Forever), Rec(1, 0, 1));
  auto r = b.Propose(1, Rec(0, 1, 1), Forever);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, Rec(1, 0, 1));
}

TEST(DiskPaxosTest, ProposerBehindByAnInstanceIsStale) {
  Geometry g = MakeGeometry(4);
  MemDevice mem(DeviceBytes(g));
  DiskPaxos a(&mem, g, kUuid, 0, 1), b(&mem, g, kUuid, 2, 3);
  ASSERT_EQ(*a.Propose(1, Rec(0, 0, 1), Forever), Rec(1, 0, 1));
  ASSERT_EQ(*a.Propose(2, Rec(0, 0, 1), Forever), Rec(2, 0, 1));
  auto r = b.Propose(1, Rec(0, 2, 3), Forever);
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.status().Is(Code::kStale)) << r.status().ToString();
  EXPECT_NE(r.status().message().find("stale"), std::string::npos);
  auto v = b.ReadDecided();
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(v->decided, Rec(2, 0, 1));
  EXPECT_EQ(v->highest_instance, 2u);
  // Caught up, b takes part in the next instance normally.
  auto r3 = b.Propose(v->decided.epoch + 1, Rec(0, 2, 3), Forever);
  ASSERT_TRUE(r3.ok());
  EXPECT_EQ(*r3, Rec(3, 2, 3));
  // a still knows its own decision of 2, and learns 3 from b's block.
  EXPECT_EQ(*a.Propose(2, Rec(0, 0, 1), Forever), Rec(2, 0, 1));
  EXPECT_EQ(*a.Propose(3, Rec(0, 0, 1), Forever), Rec(3, 2, 3));
}

TEST(DiskPaxosTest, StartedButUndecidedInstanceIsVisible) {
  Geometry g = MakeGeometry(4);
  MemDevice mem(DeviceBytes(g));
  DiskPaxos a(&mem, g, kUuid, 1, 1);
  ASSERT_TRUE(a.Propose(1, Rec(0, 1, 1), Forever).ok());
  // b writes its phase-1 block for instance 2 (both copies), then its device is gone.
  FaultDevice f(&mem);
  f.GoneAfter(IoKind::kWrite, 2);
  DiskPaxos b(&f, g, kUuid, 3, 1);
  auto r = b.Propose(2, Rec(0, 3, 1), Forever);
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.status().Is(Code::kIOError)) << r.status().ToString();
  auto v = a.ReadDecided();
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(v->decided, Rec(1, 1, 1));
  EXPECT_EQ(v->highest_instance, 2u);
  // Anyone can finish instance 2.
  auto r2 = a.Propose(2, Rec(0, 1, 1), Forever);
  ASSERT_TRUE(r2.ok());
  EXPECT_EQ(r2->epoch, 2u);
}

TEST(DiskPaxosTest, KeepGoingFalseTimesOut) {
  Geometry g = MakeGeometry(4);
  MemDevice mem(DeviceBytes(g));
  DiskPaxos a(&mem, g, kUuid, 1, 1);
  auto r = a.Propose(1, Rec(0, 1, 1), [] { return false; });
  EXPECT_TRUE(r.status().Is(Code::kTimedOut));
  EXPECT_EQ(mem.writes(), 0u);
  // Not sticky.
  EXPECT_TRUE(a.Propose(1, Rec(0, 1, 1), Forever).ok());
}

// ---------------------------------------------------------------- copies, restarts

TEST(DiskPaxosTest, TornCopyAIsReadFromCopyB) {
  Geometry g = MakeGeometry(4);
  MemDevice mem(DeviceBytes(g));
  {
    DiskPaxos p2(&mem, g, kUuid, 2, 7);
    ASSERT_EQ(*p2.Propose(1, Rec(0, 2, 7), Forever), Rec(1, 2, 7));
  }
  WriteGarbage(&mem, g.SlotBlock(2, kSlotPaxos), 99);
  DiskPaxos p0(&mem, g, kUuid, 0, 1);
  auto v = p0.ReadDecided();
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(v->decided, Rec(1, 2, 7));
  auto r0 = p0.Propose(1, Rec(0, 0, 1), Forever);
  ASSERT_TRUE(r0.ok());
  EXPECT_EQ(*r0, Rec(1, 2, 7));
  // The slot's next owner loads its block from copy B and carries on.
  DiskPaxos p2b(&mem, g, kUuid, 2, 8);
  auto r1 = p2b.Propose(1, Rec(0, 2, 8), Forever);
  ASSERT_TRUE(r1.ok());
  EXPECT_EQ(*r1, Rec(1, 2, 7));
  auto r2 = p2b.Propose(2, Rec(0, 2, 8), Forever);
  ASSERT_TRUE(r2.ok());
  EXPECT_EQ(r2->epoch, 2u);
  auto a = RawCopy(&mem, g, 2, 0), b = RawCopy(&mem, g, 2, 1);
  ASSERT_TRUE(a && b);  // copy A rewritten
  EXPECT_EQ(a->instance, 2u);
  EXPECT_EQ(b->instance, 2u);
}

TEST(DiskPaxosTest, ReadErrorsAndGarbage) {
  Geometry g = MakeGeometry(4);
  MemDevice mem(DeviceBytes(g));
  {
    DiskPaxos p2(&mem, g, kUuid, 2, 7);
    ASSERT_TRUE(p2.Propose(1, Rec(0, 2, 7), Forever).ok());
  }
  FaultDevice f(&mem);
  DiskPaxos p0(&f, g, kUuid, 0, 1);
  // Copy A unreadable: copy B serves.
  f.FailRange(g.SlotBlock(2, kSlotPaxos) * kBlockSize, kBlockSize, true, false);
  auto v = p0.ReadDecided();
  ASSERT_TRUE(v.ok()) << v.status().ToString();
  EXPECT_EQ(v->decided, Rec(1, 2, 7));
  // Both unreadable: an error, never "initial" (that could hide an accepted value).
  f.FailRange(g.SlotBlock(2, kSlotPaxos + 1) * kBlockSize, kBlockSize, true, false);
  EXPECT_TRUE(p0.ReadDecided().status().Is(Code::kIOError));
  EXPECT_TRUE(p0.Propose(1, Rec(0, 0, 1), Forever).status().Is(Code::kIOError));
  // Copy A unreadable and copy B garbage: unknown, also an error.
  f.ClearRanges();
  WriteGarbage(&mem, g.SlotBlock(2, kSlotPaxos + 1), 5);
  f.FailRange(g.SlotBlock(2, kSlotPaxos) * kBlockSize, kBlockSize, true, false);
  EXPECT_TRUE(p0.ReadDecided().status().Is(Code::kIOError));
  // Both copies garbage: counted as the initial state (logged).
  f.ClearRanges();
  WriteGarbage(&mem, g.SlotBlock(2, kSlotPaxos), 6);
  v = p0.ReadDecided();
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(v->decided.epoch, 0u);
  EXPECT_EQ(v->decided.slot, kNoSlot);
}

TEST(DiskPaxosTest, RestartedSlotUsesHigherBallots) {
  Geometry g = MakeGeometry(4);
  MemDevice mem(DeviceBytes(g));
  uint64_t m1 = 0;
  {
    DiskPaxos p(&mem, g, kUuid, 3, 1);
    DiskPaxosTestPeer::Begin(p, 1, Rec(1, 3, 1));
    // Run until the phase-2 write is next: phase 1 is on disk.
    for (int i = 0; i < 100 && !DiskPaxosTestPeer::InPhase2Write(p); i++) {
      ASSERT_EQ(*DiskPaxosTestPeer::Step(p), Out::kContinue);
    }
    ASSERT_TRUE(DiskPaxosTestPeer::InPhase2Write(p));
    auto a = RawCopy(&mem, g, 3, 0);
    ASSERT_TRUE(a);
    m1 = a->mbal;
    EXPECT_EQ(a->bal, 0u);
    EXPECT_EQ(a->instance, 1u);
  }  // crashed
  DiskPaxos p(&mem, g, kUuid, 3, 2);
  auto r = p.Propose(1, Rec(0, 3, 2), Forever);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, Rec(1, 3, 2));
  auto a = RawCopy(&mem, g, 3, 0);
  ASSERT_TRUE(a);
  EXPECT_GT(a->mbal, m1);
  EXPECT_EQ(a->mbal % kMaxNodeSlots, 4u);  // slot 3's ballots
  EXPECT_EQ(a->generation, 2u);
}

TEST(DiskPaxosTest, RestartedSlotKeepsItsAcceptedValue) {
  Geometry g = MakeGeometry(4);
  MemDevice mem(DeviceBytes(g));
  {
    // Slot 1 accepts its value in phase 2 (both copies written), then crashes.
    DiskPaxos p(&mem, g, kUuid, 1, 1);
    DiskPaxosTestPeer::Begin(p, 1, Rec(1, 1, 1));
    for (int i = 0; i < 100 && !DiskPaxosTestPeer::InPhase2Write(p); i++) {
      ASSERT_EQ(*DiskPaxosTestPeer::Step(p), Out::kContinue);
    }
    ASSERT_EQ(*DiskPaxosTestPeer::Step(p), Out::kContinue);  // copy A
    ASSERT_EQ(*DiskPaxosTestPeer::Step(p), Out::kContinue);  // copy B
  }
  // Its next incarnation proposes something else: the accepted value must win.
  DiskPaxos p(&mem, g, kUuid, 1, 2);
  auto r = p.Propose(1, Rec(0, 1, 2), Forever);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, Rec(1, 1, 1));
  DiskPaxos q(&mem, g, kUuid, 0, 5);
  EXPECT_EQ(*q.Propose(1, Rec(0, 0, 5), Forever), Rec(1, 1, 1));
}

// A crash between copy A and copy B, then a torn copy A in the next incarnation's
// first write: readers must still see the newest state that was visible (copy A of
// the crashed write), which needs copy B brought up to date before copy A is touched.
TEST(DiskPaxosTest, CopiesAreResyncedAfterACrashBetweenThem) {
  Geometry g = MakeGeometry(4);
  MemDevice mem(DeviceBytes(g));
  {
    FaultDevice f(&mem);
    DiskPaxos p(&f, g, kUuid, 1, 1);
    // Writes: phase 1 A, B; phase 2 A, B; decision A, then gone.
    f.GoneAfter(IoKind::kWrite, 5);
    auto r = p.Propose(1, Rec(0, 1, 1), Forever);
    ASSERT_TRUE(r.status().Is(Code::kIOError)) << r.status().ToString();
  }
  auto a = RawCopy(&mem, g, 1, 0), b = RawCopy(&mem, g, 1, 1);
  ASSERT_TRUE(a && b);
  ASSERT_EQ(a->decided_epoch, 1u);
  ASSERT_EQ(b->decided_epoch, 0u);
  DiskPaxos reader(&mem, g, kUuid, 0, 1);
  ASSERT_EQ(reader.ReadDecided()->decided, Rec(1, 1, 1));

  DiskPaxos p(&mem, g, kUuid, 1, 2);
  DiskPaxosTestPeer::Begin(p, 2, Rec(2, 1, 2));
  // Step until copy A is about to be written, then tear it instead.
  for (int i = 0; i < 10; i++) {
    auto w = DiskPaxosTestPeer::PendingWrite(p);
    if (w && *w == g.SlotBlock(1, kSlotPaxos)) break;
    ASSERT_EQ(*DiskPaxosTestPeer::Step(p), Out::kContinue);
  }
  ASSERT_EQ(DiskPaxosTestPeer::PendingWrite(p), g.SlotBlock(1, kSlotPaxos));
  WriteGarbage(&mem, g.SlotBlock(1, kSlotPaxos), 3);
  auto v = reader.ReadDecided();
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(v->decided, Rec(1, 1, 1));
}

// The storage loses its volatile cache while the nodes live on: a decision survives.
TEST(DiskPaxosTest, DecisionSurvivesStoragePowerCut) {
  Geometry g = MakeGeometry(4);
  MemDevice mem(DeviceBytes(g));
  DiskPaxos a(&mem, g, kUuid, 0, 1), b(&mem, g, kUuid, 1, 1);
  ASSERT_EQ(*a.Propose(1, Rec(0, 0, 1), Forever), Rec(1, 0, 1));
  mem.CrashTorn(17);
  mem.Crash();
  EXPECT_EQ(*b.Propose(1, Rec(0, 1, 1), Forever), Rec(1, 0, 1));
  EXPECT_EQ(b.ReadDecided()->decided, Rec(1, 0, 1));
}

// ---------------------------------------------------------------- threads

struct Outcomes {
  std::mutex mu;
  std::map<uint64_t, MasterRecord> decided;  // epoch -> value
  std::vector<std::string> failures;
  uint64_t reports = 0;

  void Report(const MasterRecord& r, const std::string& who) {
    std::lock_guard<std::mutex> l(mu);
    reports++;
    auto [it, inserted] = decided.emplace(r.epoch, r);
    if (!inserted && !(it->second == r)) {
      failures.push_back("epoch " + std::to_string(r.epoch) + ": " + who + " got " + Str(r) +
                         ", someone else " + Str(it->second));
    }
  }
  void Fail(const std::string& f) {
    std::lock_guard<std::mutex> l(mu);
    failures.push_back(f);
  }
};

TEST(DiskPaxosTest, ConcurrentProposersAgree) {
  constexpr int kRounds = 40;
  constexpr uint32_t kProposers = 5;
  constexpr uint64_t kInstances = 5;
  Geometry g = MakeGeometry(6);  // one slot stays empty
  uint64_t total_ballots = 0, total_aborted = 0, stale = 0;
  for (int round = 0; round < kRounds; round++) {
    MemDevice mem(DeviceBytes(g));
    DelayDevice delay(&mem, 2000);
    Outcomes out;
    std::atomic<uint64_t> ballots{0}, aborted{0}, stales{0};
    auto keep_going = Deadline(std::chrono::seconds(120));
    std::vector<std::thread> threads;
    for (uint32_t i = 0; i < kProposers; i++) {
      threads.emplace_back([&, i] {
        uint32_t slot = (i + round) % g.node_slots;
        uint64_t gen = 100 + slot;
        DiskPaxos px(&delay, g, kUuid, slot, gen);
        std::string who = "slot " + std::to_string(slot);
        uint64_t e = 1;
        while (e <= kInstances) {
          auto r = px.Propose(e, Rec(e, slot, gen), keep_going);
          if (r.ok()) {
            if (r->epoch != e || r->generation != 100 + r->slot) {
              out.Fail(who + ": epoch " + std::to_string(e) + ": not a proposed value: " + Str(*r));
            }
            out.Report(*r, who);
            e++;
          } else if (r.status().Is(Code::kStale)) {
            stales++;
            auto v = px.ReadDecided();
            if (!v.ok() || v->decided.epoch < e) {
              out.Fail(who + ": stale at " + std::to_string(e) + " but decided is behind");
              return;
            }
            out.Report(v->decided, who + " (ReadDecided)");
            e = v->decided.epoch + 1;
          } else {
            out.Fail(who + ": " + r.status().ToString());
            return;
          }
        }
        ballots += px.stats().ballots;
        aborted += px.stats().aborted;
      });
    }
    for (auto& t : threads) t.join();
    for (const auto& f : out.failures) ADD_FAILURE() << "round " << round << ": " << f;
    ASSERT_TRUE(out.failures.empty());
    for (uint64_t e = 1; e <= kInstances; e++) {
      EXPECT_TRUE(out.decided.count(e)) << "round " << round << " epoch " << e;
    }
    DiskPaxos reader(&mem, g, kUuid, (round + kProposers) % g.node_slots, 1);
    auto v = reader.ReadDecided();
    ASSERT_TRUE(v.ok());
    EXPECT_EQ(v->decided, out.decided[kInstances]);
    total_ballots += ballots;
    total_aborted += aborted;
    stale += stales;
  }
  std::printf("[paxos] %d rounds x %llu instances x %u proposers: %llu ballots, %llu aborted, "
              "%llu stale\n",
              kRounds, (unsigned long long)kInstances, kProposers,
              (unsigned long long)total_ballots, (unsigned long long)total_aborted,
              (unsigned long long)stale);
}

TEST(DiskPaxosTest, ReadDecidedFromAnotherThreadDuringPropose) {
  Geometry g = MakeGeometry(4);
  MemDevice mem(DeviceBytes(g));
  DelayDevice delay(&mem, 500);
  DiskPaxos a(&delay, g, kUuid, 0, 1), b(&delay, g, kUuid, 1, 1);
  std::atomic<bool> done{false};
  std::atomic<uint64_t> seen{0};
  std::thread watcher([&] {
    while (!done) {
      auto v = a.ReadDecided();  // same object as a running Propose
      ASSERT_TRUE(v.ok());
      seen = std::max<uint64_t>(seen, v->decided.epoch);
      (void)a.stats();
    }
  });
  std::thread tb([&] {
    for (uint64_t e = 1; e <= 5; e++) {
      auto r = b.Propose(e, Rec(e, 1, 1), Deadline(std::chrono::seconds(120)));
      if (!r.ok() && r.status().Is(Code::kStale)) continue;
      ASSERT_TRUE(r.ok()) << r.status().ToString();
    }
  });
  for (uint64_t e = 1; e <= 5; e++) {
    auto r = a.Propose(e, Rec(e, 0, 1), Deadline(std::chrono::seconds(120)));
    if (!r.ok() && r.status().Is(Code::kStale)) continue;
    ASSERT_TRUE(r.ok()) << r.status().ToString();
  }
  tb.join();
  done = true;
  watcher.join();
  EXPECT_EQ(a.ReadDecided()->decided.epoch, 5u);
}

TEST(DiskPaxosTest, CrashedProposersDoNotBlockTheOthers) {
  constexpr int kRounds = 30;
  constexpr uint32_t kProposers = 5;
  constexpr uint32_t kCrashing = 2;
  Geometry g = MakeGeometry(kProposers);
  std::mt19937_64 rng(2024);
  uint64_t crashed_total = 0;
  for (int round = 0; round < kRounds; round++) {
    MemDevice mem(DeviceBytes(g));
    DelayDevice delay(&mem, 1000);
    std::vector<std::unique_ptr<FaultDevice>> faults;
    for (uint32_t i = 0; i < kCrashing; i++) {
      faults.push_back(std::make_unique<FaultDevice>(&delay));
      // Gone after a random number of reads or writes: at any point of a ballot,
      // including between copy A and copy B.
      if (rng() % 2) {
        faults.back()->GoneAfter(IoKind::kWrite, rng() % 7);
      } else {
        faults.back()->GoneAfter(IoKind::kRead, rng() % 16);
      }
    }
    Outcomes out;
    std::atomic<uint32_t> crashed{0};
    auto keep_going = Deadline(std::chrono::seconds(120));
    std::vector<std::thread> threads;
    for (uint32_t i = 0; i < kProposers; i++) {
      threads.emplace_back([&, i] {
        BlockDevice* dev = i < kCrashing ? static_cast<BlockDevice*>(faults[i].get())
                                         : static_cast<BlockDevice*>(&delay);
        DiskPaxos px(dev, g, kUuid, i, 1);
        auto r = px.Propose(1, Rec(1, i, 1), keep_going);
        if (r.ok()) {
          out.Report(*r, "slot " + std::to_string(i));
        } else if (i < kCrashing && r.status().Is(Code::kIOError)) {
          crashed++;
        } else {
          out.Fail("slot " + std::to_string(i) + ": " + r.status().ToString());
        }
      });
    }
    for (auto& t : threads) t.join();
    for (const auto& f : out.failures) ADD_FAILURE() << "round " << round << ": " << f;
    ASSERT_TRUE(out.failures.empty());
    ASSERT_TRUE(out.decided.count(1));
    MasterRecord d = out.decided[1];
    crashed_total += crashed;
    // The crashed proposers restart (same slot, new generation) and learn the same.
    for (uint32_t i = 0; i < kCrashing; i++) {
      DiskPaxos px(&mem, g, kUuid, i, 2);
      auto r = px.Propose(1, Rec(1, i, 2), Forever);
      ASSERT_TRUE(r.ok()) << r.status().ToString();
      EXPECT_EQ(*r, d) << "round " << round;
    }
  }
  EXPECT_GT(crashed_total, 0u);
  std::printf("[paxos] %d rounds, %llu proposers crashed mid-ballot\n", kRounds,
              (unsigned long long)crashed_total);
}

// ---------------------------------------------------------------- simulator
//
// Single-threaded model check: proposers advance one I/O step at a time in a random
// order over one MemDevice; they crash (possibly tearing the block they were writing),
// restart as a new generation of the same slot, and the storage loses its volatile
// cache now and then. Every decision of an epoch, whether returned by Propose or read
// by ReadDecided, must be the same.

struct SimTotals {
  uint64_t schedules = 0, steps = 0, decisions = 0, aborts = 0, stales = 0, crashes = 0,
           torn = 0, power_cuts = 0;
};

void RunSchedule(uint64_t seed, SimTotals* tot) {
  std::mt19937_64 rng(seed);
  const uint32_t slots = 2 + uint32_t(rng() % 4);            // 2..5
  const uint32_t nprop = slots - uint32_t(rng() % 2);        // maybe one slot empty
  const uint64_t max_epoch = 1 + rng() % 3;
  const uint32_t crash_permille = uint32_t(rng() % 30);
  Geometry g = MakeGeometry(slots);
  MemDevice mem(DeviceBytes(g));
  std::map<uint64_t, MasterRecord> decided;
  std::map<uint32_t, uint64_t> max_gen;  // slot -> newest generation
  uint64_t max_known = 0;                // newest decision anyone learnt

  auto record = [&](const MasterRecord& r, const char* how) {
    ASSERT_GE(r.epoch, 1u) << "seed " << seed;
    ASSERT_LE(r.epoch, max_epoch) << "seed " << seed;
    ASSERT_LT(r.slot, nprop) << "seed " << seed << " " << how << " " << Str(r);
    ASSERT_GE(r.generation, 1u);
    ASSERT_LE(r.generation, max_gen[r.slot]) << "seed " << seed;
    max_known = std::max(max_known, r.epoch);
    auto [it, inserted] = decided.emplace(r.epoch, r);
    ASSERT_EQ(it->second, r) << "seed " << seed << ": disagreement on epoch " << r.epoch
                             << " (" << how << ")";
    if (inserted) tot->decisions++;
  };

  DiskPaxos observer(&mem, g, kUuid, slots - 1, 1000);  // only reads
  // What is decided stays readable: a torn or lost write never brings back an older
  // state than one already seen.
  auto observe = [&](const PaxosView& v) {
    ASSERT_GE(v.decided.epoch, max_known) << "seed " << seed << ": decision went back";
    if (v.decided.epoch > 0) record(v.decided, "ReadDecided");
  };

  struct Prop {
    std::unique_ptr<DiskPaxos> px;
    uint32_t slot = 0;
    uint64_t gen = 0, epoch = 0;
    bool finished = false;
  };
  std::vector<Prop> props(nprop);

  // Starts the next instance this proposer should work on, from what the disk says.
  auto start_from_disk = [&](Prop& p) {
    auto v = p.px->ReadDecided();
    ASSERT_TRUE(v.ok()) << v.status().ToString();
    observe(*v);
    if (::testing::Test::HasFatalFailure()) return;
    uint64_t e = v->decided.epoch + 1;
    if (e > max_epoch) {
      p.finished = true;
      return;
    }
    p.epoch = e;
    DiskPaxosTestPeer::Begin(*p.px, e, Rec(e, p.slot, p.gen));
  };
  auto start = [&](Prop& p) {
    p.gen++;
    max_gen[p.slot] = p.gen;
    p.px = std::make_unique<DiskPaxos>(&mem, g, kUuid, p.slot, p.gen);
    start_from_disk(p);
  };
  auto step = [&](Prop& p) {
    tot->steps++;
    auto r = DiskPaxosTestPeer::Step(*p.px);
    ASSERT_TRUE(r.ok()) << "seed " << seed << ": " << r.status().ToString();
    switch (*r) {
      case Out::kContinue:
        break;
      case Out::kAborted:
        tot->aborts++;
        break;
      case Out::kDecided: {
        MasterRecord d = DiskPaxosTestPeer::Decided(*p.px);
        ASSERT_EQ(d.epoch, p.epoch) << "seed " << seed;
        record(d, "Propose");
        if (p.epoch == max_epoch) {
          p.finished = true;
        } else {
          p.epoch++;
          DiskPaxosTestPeer::Begin(*p.px, p.epoch, Rec(p.epoch, p.slot, p.gen));
        }
        break;
      }
      case Out::kStale: {
        tot->stales++;
        uint64_t was = p.epoch;
        auto v = p.px->ReadDecided();
        ASSERT_TRUE(v.ok());
        // A newer instance starts only after this one was decided, and the decision
        // stays readable.
        ASSERT_GE(v->decided.epoch, was) << "seed " << seed;
        start_from_disk(p);
        break;
      }
    }
  };

  for (uint32_t i = 0; i < nprop; i++) {
    props[i].slot = i;
    start(props[i]);
    if (::testing::Test::HasFatalFailure()) return;
  }

  // Random interleaving with crashes.
  const int kRandomSteps = 400 + int(rng() % 800);
  for (int s = 0; s < kRandomSteps; s++) {
    Prop& p = props[rng() % nprop];
    if (p.finished) continue;
    uint32_t dice = uint32_t(rng() % 1000);
    // Crashes hit writes more often: those are the moments that matter.
    uint32_t crash = crash_permille;
    if (p.px && DiskPaxosTestPeer::PendingWrite(*p.px)) crash *= 8;
    if (!p.px) {
      if (dice < 250) start(p);  // restart
    } else if (dice < crash) {
      tot->crashes++;
      auto w = DiskPaxosTestPeer::PendingWrite(*p.px);
      if (w && rng() % 2) {  // crashed during the write: the block is torn
        tot->torn++;
        WriteGarbage(&mem, *w, rng());
      }
      p.px.reset();
    } else if (dice < crash + 50) {
      auto v = observer.ReadDecided();
      ASSERT_TRUE(v.ok());
      observe(*v);
    } else if (dice < crash + 53) {
      tot->power_cuts++;
      if (rng() % 2) {
        mem.Crash();
      } else {
        mem.CrashTorn(rng());
      }
    } else {
      step(p);
    }
    if (::testing::Test::HasFatalFailure()) return;
  }
  // Then everyone (restarted if crashed) runs alone until done: each must finish.
  for (auto& p : props) {
    if (!p.finished && !p.px) start(p);
    for (int s = 0; !p.finished; s++) {
      ASSERT_LT(s, 10000) << "seed " << seed << ": a lone proposer does not finish";
      step(p);
      if (::testing::Test::HasFatalFailure()) return;
    }
  }
  ASSERT_TRUE(decided.count(max_epoch)) << "seed " << seed;
  DiskPaxos reader(&mem, g, kUuid, 0, 1000);
  auto v = reader.ReadDecided();
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(v->decided, decided[max_epoch]) << "seed " << seed;
  EXPECT_EQ(v->highest_instance, max_epoch) << "seed " << seed;
  tot->schedules++;
}

TEST(DiskPaxosSimTest, RandomSchedulesAgree) {
  // AGORAFS_PAXOS_SIM_SEED / AGORAFS_PAXOS_SIM_SCHEDULES explore beyond the default.
  SimTotals tot;
  const char* seed_env = std::getenv("AGORAFS_PAXOS_SIM_SEED");
  const char* n_env = std::getenv("AGORAFS_PAXOS_SIM_SCHEDULES");
  const uint64_t base = seed_env ? std::strtoull(seed_env, nullptr, 0) : 0x5eed0000;
  const uint64_t n = n_env ? std::strtoull(n_env, nullptr, 0) : 5000;
  for (uint64_t i = 0; i < n; i++) {
    RunSchedule(base + i, &tot);
    if (::testing::Test::HasFailure()) break;
  }
  EXPECT_EQ(tot.schedules, n);
  EXPECT_GT(tot.aborts, 0u);
  EXPECT_GT(tot.stales, 0u);
  EXPECT_GT(tot.torn, 0u);
  std::printf("[paxos-sim] %llu schedules, %llu steps, %llu decisions, %llu aborted ballots, "
              "%llu stale, %llu crashes (%llu torn), %llu storage power cuts\n",
              (unsigned long long)tot.schedules, (unsigned long long)tot.steps,
              (unsigned long long)tot.decisions, (unsigned long long)tot.aborts,
              (unsigned long long)tot.stales, (unsigned long long)tot.crashes,
              (unsigned long long)tot.torn, (unsigned long long)tot.power_cuts);
}

}  // namespace
}  // namespace agorafs
