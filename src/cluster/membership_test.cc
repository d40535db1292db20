// Membership tests: several "nodes" (Membership objects, each with its own path to
// one shared MemDevice) in one process. Tiny timings keep the tests short; every wait
// is a generous poll with a deadline, never a timing assertion.
#include "cluster/membership.h"

#include <gtest/gtest.h>
#include <spdlog/spdlog.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <thread>
#include <vector>

#include "device/fault_device.h"
#include "device/mem_device.h"

namespace agorafs {
namespace {

constexpr uint32_t kH = 20;   // heartbeat_ms
constexpr uint32_t kN = 200;  // io_timeout_ms
constexpr uint32_t kD = 800;  // dead_after_ms: lease 720 ms, join wait 200 ms. The lease
                              // outlasts a heartbeat by 700 ms: margin for a loaded VM.
constexpr int kWaitMs = 15000;

ClusterTimings FastTimings() {
  ClusterTimings t;
  t.heartbeat_ms = kH;
  t.io_timeout_ms = kN;
  t.dead_after_ms = kD;
  return t;
}

Superblock MakeSuper(uint32_t slots) {
  Superblock sb;
  std::memset(&sb, 0, sizeof(sb));
  for (int i = 0; i < 16; i++) sb.hdr.uuid[i] = uint8_t(0xA0 + i);
  sb.node_slots = slots;
  sb.slot_blocks = kDefaultSlotBlocks;
  sb.slot_start = 2;
  sb.total_blocks = 2 + uint64_t(slots) * kDefaultSlotBlocks;
  return sb;
}

uint64_t HbOffset(const Superblock& sb, uint32_t slot) {
  return GeometryOf(sb).SlotBlock(slot, kSlotHeartbeat) * kBlockSize;
}

SlotBlock ReadRaw(BlockDevice* d, const Superblock& sb, uint32_t slot) {
  AlignedBuffer b(kBlockSize);
  EXPECT_TRUE(d->Read(HbOffset(sb, slot), b.data(), kBlockSize).ok());
  SlotBlock s;
  std::memcpy(&s, b.data(), kBlockSize);
  return s;
}

void WriteRaw(BlockDevice* d, const Superblock& sb, uint32_t slot, const SlotBlock& s) {
  AlignedBuffer b(kBlockSize);
  std::memcpy(b.data(), &s, kBlockSize);
  ASSERT_TRUE(d->Write(HbOffset(sb, slot), b.data(), kBlockSize).ok());
}

bool WaitUntil(const std::function<bool()>& pred, int timeout_ms = kWaitMs) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  while (std::chrono::steady_clock::now() < deadline) {
    if (pred()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return pred();
}

// One node's path to the shared disk: optional random latency per I/O, stalls (I/O
// blocks until resumed, then goes through: a write issued during a stall lands after
// it), and a hook run after each completed write.
class NodeDevice final : public BlockDevice {
 public:
  NodeDevice(BlockDevice* base, uint32_t max_latency_us = 0)
      : base_(base), max_latency_us_(max_latency_us) {}

  Status Read(uint64_t off, void* buf, size_t len) override {
    Gate(false);
    return base_->Read(off, buf, len);
  }
  Status Write(uint64_t off, const void* buf, size_t len) override {
    Gate(true);
    Status st = base_->Write(off, buf, len);
    std::function<void(uint64_t, const uint8_t*)> hook;
    {
      std::lock_guard<std::mutex> l(mu_);
      hook = hook_;
    }
    if (st.ok() && hook) hook(off, static_cast<const uint8_t*>(buf));
    return st;
  }
  Status Flush() override {
    Gate(true);
    return base_->Flush();
  }
  uint64_t Size() const override { return base_->Size(); }
  std::string Name() const override { return "node(" + base_->Name() + ")"; }

  void Stall(bool reads, bool writes) {
    std::lock_guard<std::mutex> l(mu_);
    stall_reads_ = reads;
    stall_writes_ = writes;
    cv_.notify_all();
  }
  void Resume() { Stall(false, false); }
  // The next `n` writes each take `ms` longer.
  void SlowWrites(int n, int ms) {
    slow_ms_ = ms;
    slow_writes_ = n;
  }
  void SetHook(std::function<void(uint64_t, const uint8_t*)> h) {
    std::lock_guard<std::mutex> l(mu_);
    hook_ = std::move(h);
  }

 private:
  void Gate(bool write) {
    if (max_latency_us_ > 0) {
      thread_local std::mt19937 rng(std::random_device{}());
      std::this_thread::sleep_for(std::chrono::microseconds(rng() % (max_latency_us_ + 1)));
    }
    if (write && slow_writes_.fetch_sub(1) > 0) {
      std::this_thread::sleep_for(std::chrono::milliseconds(slow_ms_));
    }
    std::unique_lock<std::mutex> l(mu_);
    cv_.wait(l, [&] { return write ? !stall_writes_ : !stall_reads_; });
  }

  BlockDevice* const base_;
  const uint32_t max_latency_us_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stall_reads_ = false, stall_writes_ = false;
  std::atomic<int> slow_writes_{0};
  std::atomic<int> slow_ms_{0};
  std::function<void(uint64_t, const uint8_t*)> hook_;
};

// A shared disk and the nodes on it.
class Cluster {
 public:
  explicit Cluster(uint32_t slots)
      : sb(MakeSuper(slots)), disk((2 + uint64_t(slots) * kDefaultSlotBlocks) * kBlockSize) {}

  // A path to the disk for one more node (owned by the cluster, so it outlives nodes).
  NodeDevice* Path(uint32_t latency_us = 0) {
    std::lock_guard<std::mutex> l(mu_);
    paths_.push_back(std::make_unique<NodeDevice>(&disk, latency_us));
    return paths_.back().get();
  }

  Result<std::unique_ptr<Membership>> Join(BlockDevice* dev, std::atomic<int>* fenced = nullptr,
                                           const std::string& host = "") {
    Membership::Options o;
    o.host = host;
    o.address = "10.0.0.1:7000";
    o.timings = FastTimings();
    if (fenced) o.on_fenced = [fenced] { fenced->fetch_add(1); };
    return Membership::Join(dev, sb, o);
  }

  SlotBlock Raw(uint32_t slot) { return ReadRaw(&disk, sb, slot); }

  Superblock sb;
  MemDevice disk;

 private:
  std::mutex mu_;
  std::vector<std::unique_ptr<NodeDevice>> paths_;
};

// Resumes a stalled path however the test ends, so no node thread stays blocked.
struct ResumeOnExit {
  std::vector<NodeDevice*> paths;
  ~ResumeOnExit() {
    for (NodeDevice* p : paths) p->Resume();
  }
};

PeerState StateOf(const Membership& observer, uint32_t slot) {
  return observer.Peer(slot).state;
}

bool AllAlive(const std::vector<Membership*>& nodes) {
  for (Membership* a : nodes) {
    for (Membership* b : nodes) {
      if (a != b && StateOf(*a, b->slot()) != PeerState::kAlive) return false;
    }
  }
  return true;
}

// A write through the node's guarded device to a block of its own slot (the mailbox).
Status GuardedWrite(Membership& m, const Superblock& sb) {
  AlignedBuffer b(kBlockSize);
  uint64_t off = GeometryOf(sb).SlotBlock(m.slot(), kSlotMailbox) * kBlockSize;
  return m.guarded_device()->Write(off, b.data(), kBlockSize);
}

// ---------------------------------------------------------------------------- join

TEST(MembershipTest, ConcurrentJoinsGetDistinctSlots) {
  constexpr int kNodes = 8;
  // Create spdlog's registry before threads race to (a TSan report otherwise: spdlog's
  // shared library is not instrumented).
  spdlog::default_logger();
  for (int round = 0; round < 20; round++) {
    SCOPED_TRACE("round " + std::to_string(round));
    Cluster c(kNodes);  // exactly as many slots as joiners: every race is contested
    std::vector<NodeDevice*> paths;
    for (int i = 0; i < kNodes; i++) paths.push_back(c.Path(/*latency_us=*/3000));
    std::vector<std::unique_ptr<Membership>> nodes(kNodes);
    std::vector<Status> errors(kNodes);
    std::vector<std::thread> threads;
    for (int i = 0; i < kNodes; i++) {
      threads.emplace_back([&, i] {
        auto m = c.Join(paths[i], nullptr, "node" + std::to_string(i));
        if (m.ok()) {
          nodes[i] = std::move(*m);
        } else {
          errors[i] = m.status();
        }
      });
    }
    for (auto& t : threads) t.join();
    std::set<uint32_t> slots;
    for (int i = 0; i < kNodes; i++) {
      ASSERT_TRUE(nodes[i]) << errors[i].ToString();
      slots.insert(nodes[i]->slot());
    }
    EXPECT_EQ(slots.size(), size_t(kNodes));
    // The disk agrees with every owner (the same claim nonce and generation).
    for (auto& m : nodes) {
      EXPECT_TRUE(WaitUntil([&] {
        SlotBlock raw = c.Raw(m->slot());
        return raw.state == kSlotMounted && raw.nonce == m->Peer(m->slot()).nonce &&
               raw.generation == m->generation();
      }));
      // A node starved of CPU may lapse and renew; it must never be fenced.
      EXPECT_NE(m->State(), Membership::SelfState::kFenced);
      EXPECT_TRUE(WaitUntil([&] { return m->State() == Membership::SelfState::kActive; }));
    }
    for (auto& m : nodes) EXPECT_TRUE(m->Leave().ok());
    for (uint32_t s = 0; s < kNodes; s++) EXPECT_EQ(c.Raw(s).state, kSlotFree);
  }
}

TEST(MembershipTest, SlowClaimWriteIsRetriedNotTrusted) {
  Cluster c(1);
  NodeDevice* p = c.Path();
  p->SlowWrites(1, 150);  // > JoinWaitMs()/4 = 50 ms: the first claim is not trusted
  auto a = c.Join(p);
  // The aborted claim (generation 1) stays on the disk and is retried, not stranded.
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  EXPECT_EQ((*a)->slot(), 0u);
  EXPECT_EQ((*a)->generation(), 2u);
}

TEST(MembershipTest, LeaveFreesTheSlot) {
  Cluster c(2);
  auto a = c.Join(c.Path());
  auto b = c.Join(c.Path());
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_NE((*a)->slot(), (*b)->slot());
  EXPECT_EQ((*a)->generation(), 1u);  // an all-zero (mkfs) slot is free, generation 0
  auto full = c.Join(c.Path());
  ASSERT_FALSE(full.ok());
  EXPECT_EQ(full.status().code(), Code::kBusy) << full.status().ToString();

  const uint32_t slot = (*a)->slot();
  const uint64_t gen = (*a)->generation();
  ASSERT_TRUE((*a)->Leave().ok());
  EXPECT_EQ((*a)->State(), Membership::SelfState::kLeft);
  EXPECT_EQ((*a)->CheckWrite().code(), Code::kFenced);
  EXPECT_EQ(GuardedWrite(**a, c.sb).code(), Code::kFenced);
  SlotBlock raw = c.Raw(slot);
  EXPECT_EQ(raw.state, kSlotFree);
  EXPECT_EQ(raw.generation, gen);
  EXPECT_TRUE(WaitUntil([&] { return StateOf(**b, slot) == PeerState::kFree; }));

  auto n = c.Join(c.Path());
  ASSERT_TRUE(n.ok()) << n.status().ToString();
  EXPECT_EQ((*n)->slot(), slot);
  EXPECT_EQ((*n)->generation(), gen + 1);
}

TEST(MembershipTest, UnreadableSlotIsNeverClaimed) {
  Cluster c(2);
  SlotBlock junk;
  std::memset(&junk, 0x5A, sizeof(junk));
  WriteRaw(&c.disk, c.sb, 0, junk);
  auto a = c.Join(c.Path());
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  EXPECT_EQ((*a)->slot(), 1u);
  EXPECT_EQ(StateOf(**a, 0), PeerState::kUnreadable);
  auto b = c.Join(c.Path());
  ASSERT_FALSE(b.ok());
  EXPECT_EQ(b.status().code(), Code::kBusy);
}

// An intact heartbeat of another filesystem means a node of another cluster writes to
// this device: joining would have two clusters overwrite each other. Junk does not.
TEST(MembershipTest, ForeignHeartbeatRefusesTheJoin) {
  Cluster c(3);
  AlignedBuffer b(kBlockSize);
  uint64_t blk = GeometryOf(c.sb).SlotBlock(2, kSlotHeartbeat);
  Uuid other{};
  other.fill(0x42);
  SlotBlock foreign;
  std::memset(&foreign, 0, sizeof(foreign));
  foreign.state = kSlotMounted;
  std::memcpy(b.data(), &foreign, kBlockSize);
  InitHeader(b.data(), BlockType::kSlot, blk, other);
  SealBlock(b.data());
  ASSERT_TRUE(c.disk.Write(blk * kBlockSize, b.data(), kBlockSize).ok());
  auto a = c.Join(c.Path());
  ASSERT_FALSE(a.ok());
  EXPECT_EQ(a.status().code(), Code::kBusy);
  EXPECT_NE(a.status().message().find("another filesystem"), std::string::npos)
      << a.status().ToString();
  EXPECT_NE(a.status().message().find("slot 2"), std::string::npos);

  b.data()[100] ^= 1;  // the same block damaged: unreadable, never claimed, no refusal
  ASSERT_TRUE(c.disk.Write(blk * kBlockSize, b.data(), kBlockSize).ok());
  auto a2 = c.Join(c.Path());
  ASSERT_TRUE(a2.ok()) << a2.status().ToString();
  EXPECT_NE((*a2)->slot(), 2u);
}

// ---------------------------------------------------------------------------- liveness

TEST(MembershipTest, SilentNodeIsSeenDead) {
  Cluster c(3);
  auto a = c.Join(c.Path(), nullptr, "alpha");
  auto b = c.Join(c.Path(), nullptr, "beta");
  ASSERT_TRUE(a.ok() && b.ok());
  const uint32_t bs = (*b)->slot();
  (*a)->SetEpoch(7);
  ASSERT_TRUE(WaitUntil([&] { return AllAlive({a->get(), b->get()}); }));
  EXPECT_TRUE(WaitUntil([&] { return (*b)->Peer((*a)->slot()).epoch == 7; }));
  PeerInfo pb = (*a)->Peer(bs);
  EXPECT_EQ(pb.host, "beta");
  EXPECT_EQ(pb.address, "10.0.0.1:7000");
  EXPECT_EQ(pb.generation, (*b)->generation());
  EXPECT_EQ((*a)->LiveSlots().size(), 2u);
  EXPECT_EQ(StateOf(**a, 3 - bs - (*a)->slot()), PeerState::kFree);

  b->reset();  // stops heartbeating without leaving, like a crash
  ASSERT_TRUE(WaitUntil([&] { return StateOf(**a, bs) == PeerState::kDead; }));
  EXPECT_GE((*a)->Peer(bs).heartbeat_age_ms, kD);
  EXPECT_EQ((*a)->LiveSlots(), std::vector<uint32_t>{(*a)->slot()});
  EXPECT_EQ(c.Raw(bs).state, kSlotMounted);  // not recovered (see RecoveredSlotIsClaimable)
}

TEST(MembershipTest, StorageWideStallDeclaresNobodyDead) {
  Cluster c(3);
  std::atomic<int> fenced{0};
  std::vector<NodeDevice*> paths = {c.Path(), c.Path(), c.Path()};
  std::vector<std::unique_ptr<Membership>> nodes;
  for (NodeDevice* p : paths) {
    auto m = c.Join(p, &fenced);
    ASSERT_TRUE(m.ok()) << m.status().ToString();
    nodes.push_back(std::move(*m));
  }
  std::vector<Membership*> raw;
  std::vector<uint64_t> gens;
  for (auto& m : nodes) {
    raw.push_back(m.get());
    gens.push_back(m->generation());
  }
  ASSERT_TRUE(WaitUntil([&] { return AllAlive(raw); }));

  // Watch every node's view throughout the stall and after it.
  std::atomic<bool> done{false};
  std::atomic<int> bad_views{0};
  std::thread watcher([&] {
    while (!done) {
      for (Membership* m : raw) {
        for (const PeerInfo& p : m->Peers()) {
          if (p.state == PeerState::kDead || p.state == PeerState::kFenced) bad_views++;
        }
        if (m->State() == Membership::SelfState::kFenced) bad_views++;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
  });
  {
    ResumeOnExit resume{paths};
    for (NodeDevice* p : paths) p->Stall(true, true);
    std::this_thread::sleep_for(std::chrono::milliseconds(3 * kD));
    // Everybody's lease ran out: nobody may write during a stall this long.
    for (Membership* m : raw) {
      EXPECT_EQ(m->State(), Membership::SelfState::kLapsed);
      EXPECT_EQ(m->CheckWrite().code(), Code::kFenced);
    }
  }
  // After the stall the handshake renews every lease with the same generation.
  EXPECT_TRUE(WaitUntil([&] {
    for (Membership* m : raw) {
      if (m->State() != Membership::SelfState::kActive) return false;
    }
    return AllAlive(raw);
  }));
  std::this_thread::sleep_for(std::chrono::milliseconds(2 * kD));
  done = true;
  watcher.join();
  EXPECT_EQ(bad_views.load(), 0);
  EXPECT_EQ(fenced.load(), 0);
  for (size_t i = 0; i < raw.size(); i++) {
    EXPECT_EQ(raw[i]->generation(), gens[i]);
    EXPECT_TRUE(WaitUntil([&] { return GuardedWrite(*raw[i], c.sb).ok(); }));
  }
}

// ---------------------------------------------------------------------------- fencing

TEST(MembershipTest, StalledNodeIsDeclaredDeadFencedAndRejoins) {
  Cluster c(3);
  std::atomic<int> fenced_a{0}, fenced_b{0}, fenced_c{0};
  NodeDevice* pb = c.Path();
  auto a = c.Join(c.Path(), &fenced_a);
  auto b = c.Join(pb, &fenced_b);
  auto cc = c.Join(c.Path(), &fenced_c);
  ASSERT_TRUE(a.ok() && b.ok() && cc.ok());
  Membership& A = **a;
  Membership& B = **b;
  Membership& C = **cc;
  const uint32_t bs = B.slot();
  const uint64_t bg = B.generation();
  ASSERT_TRUE(WaitUntil([&] { return AllAlive({&A, &B, &C}); }));

  {
    ResumeOnExit resume{{pb}};
    pb->Stall(true, true);
    ASSERT_TRUE(WaitUntil([&] {
      return StateOf(A, bs) == PeerState::kDead && StateOf(C, bs) == PeerState::kDead;
    }));
    // The lease is shorter than D: by the time anyone sees B dead, B stopped writing.
    EXPECT_EQ(B.State(), Membership::SelfState::kLapsed);
    EXPECT_EQ(B.CheckWrite().code(), Code::kFenced);
    EXPECT_EQ(GuardedWrite(B, c.sb).code(), Code::kFenced);

    auto confirmed = A.DeclareDead(bs, bg);
    ASSERT_TRUE(confirmed.ok()) << confirmed.status().ToString();
    EXPECT_TRUE(*confirmed);
    EXPECT_EQ(StateOf(A, bs), PeerState::kRecovering);
    EXPECT_TRUE(WaitUntil([&] { return StateOf(C, bs) == PeerState::kRecovering; }));
    ASSERT_TRUE(A.MarkRecovered(bs, bg).ok());
    EXPECT_EQ(c.Raw(bs).state, kSlotFree);
    EXPECT_EQ(c.Raw(bs).generation, bg);
    EXPECT_TRUE(WaitUntil([&] { return StateOf(C, bs) == PeerState::kFree; }));
  }

  // B comes back: its heartbeat write stuck in the stall lands, then it reads the
  // verdict and fences itself.
  ASSERT_TRUE(WaitUntil([&] { return B.State() == Membership::SelfState::kFenced; }));
  EXPECT_EQ(GuardedWrite(B, c.sb).code(), Code::kFenced);
  EXPECT_EQ(B.CheckWrite().code(), Code::kFenced);
  EXPECT_TRUE(WaitUntil([&] { return StateOf(A, bs) == PeerState::kFenced; }));
  EXPECT_TRUE(WaitUntil([&] { return fenced_b.load() == 1; }));  // runs just after the flip

  // Rejoin: the only claimable slot is B's old one (mounted again by the late write,
  // but named recovered by A's verdict): a new generation.
  ASSERT_TRUE(B.Rejoin().ok());
  EXPECT_TRUE(WaitUntil([&] { return B.State() == Membership::SelfState::kActive; }));
  EXPECT_EQ(B.slot(), bs);
  EXPECT_EQ(B.generation(), bg + 1);
  EXPECT_TRUE(WaitUntil([&] { return GuardedWrite(B, c.sb).ok(); }));
  EXPECT_TRUE(WaitUntil([&] { return AllAlive({&A, &B, &C}); }));
  // A's verdict goes once the slot runs under a newer generation.
  EXPECT_TRUE(WaitUntil([&] { return c.Raw(A.slot()).verdict_count == 0; }));
  EXPECT_EQ(fenced_b.load(), 1);
  EXPECT_EQ(fenced_a.load() + fenced_c.load(), 0);
}

TEST(MembershipTest, NodeBackBetweenVerdictAndReReadIsNotDeclaredDead) {
  Cluster c(2);
  std::atomic<int> fenced_b{0};
  NodeDevice* pa = c.Path();
  NodeDevice* pb = c.Path();
  auto a = c.Join(pa);
  auto b = c.Join(pb, &fenced_b);
  ASSERT_TRUE(a.ok() && b.ok());
  Membership& A = **a;
  Membership& B = **b;
  const uint32_t as = A.slot(), bs = B.slot();
  const uint64_t bg = B.generation();
  ASSERT_TRUE(WaitUntil([&] { return AllAlive({&A, &B}); }));

  ResumeOnExit resume{{pb}};
  pb->Stall(true, true);
  ASSERT_TRUE(WaitUntil([&] { return StateOf(A, bs) == PeerState::kDead; }));
  const uint64_t judged = A.Peer(bs).counter;

  // Once A's verdict has landed, let B's stuck heartbeat write through (B's reads stay
  // stalled, so B cannot run its handshake yet) and wait until it is on the disk.
  const uint64_t a_off = HbOffset(c.sb, as);
  std::atomic<bool> fired{false};
  std::atomic<bool> landed{false};
  pa->SetHook([&](uint64_t off, const uint8_t* buf) {
    if (off != a_off || reinterpret_cast<const SlotBlock*>(buf)->verdict_count == 0) return;
    if (fired.exchange(true)) return;
    pb->Stall(/*reads=*/true, /*writes=*/false);
    landed = WaitUntil([&] { return c.Raw(bs).counter != judged; });
  });
  auto confirmed = A.DeclareDead(bs, bg);
  pa->SetHook(nullptr);
  ASSERT_TRUE(landed);
  ASSERT_TRUE(confirmed.ok()) << confirmed.status().ToString();
  EXPECT_FALSE(*confirmed);
  EXPECT_EQ(c.Raw(as).verdict_count, 0u);  // the verdict is withdrawn from the disk too

  // B's handshake finds no verdict: same generation, lease renewed.
  pb->Resume();
  ASSERT_TRUE(WaitUntil([&] { return B.State() == Membership::SelfState::kActive; }));
  EXPECT_EQ(B.slot(), bs);
  EXPECT_EQ(B.generation(), bg);
  EXPECT_TRUE(WaitUntil([&] { return GuardedWrite(B, c.sb).ok(); }));
  EXPECT_TRUE(WaitUntil([&] { return StateOf(A, bs) == PeerState::kAlive; }));
  EXPECT_EQ(fenced_b.load(), 0);
}

TEST(MembershipTest, LeaseLapseWithoutVerdictResumesSameGeneration) {
  Cluster c(2);
  std::atomic<int> fenced_b{0};
  NodeDevice* pb = c.Path();
  auto a = c.Join(c.Path());
  auto b = c.Join(pb, &fenced_b);
  ASSERT_TRUE(a.ok() && b.ok());
  Membership& B = **b;
  const uint32_t bs = B.slot();
  const uint64_t bg = B.generation();
  ASSERT_TRUE(WaitUntil([&] { return AllAlive({a->get(), &B}); }));
  {
    ResumeOnExit resume{{pb}};
    pb->Stall(/*reads=*/false, /*writes=*/true);
    ASSERT_TRUE(WaitUntil([&] { return B.State() == Membership::SelfState::kLapsed; }));
    EXPECT_FALSE(B.LeaseValid());
    EXPECT_EQ(B.CheckWrite().code(), Code::kFenced);
    std::this_thread::sleep_for(std::chrono::milliseconds(kD));
  }
  ASSERT_TRUE(WaitUntil([&] { return B.State() == Membership::SelfState::kActive; }));
  EXPECT_EQ(B.slot(), bs);
  EXPECT_EQ(B.generation(), bg);
  EXPECT_TRUE(WaitUntil([&] { return GuardedWrite(B, c.sb).ok(); }));
  EXPECT_EQ(fenced_b.load(), 0);
  EXPECT_TRUE(WaitUntil([&] { return StateOf(**a, bs) == PeerState::kAlive; }));
}

TEST(MembershipTest, HeartbeatWriteErrorsFenceTheNodeByLapse) {
  Cluster c(2);
  std::atomic<int> fenced_b{0};
  FaultDevice fb(&c.disk);
  auto a = c.Join(c.Path());
  auto b = c.Join(&fb, &fenced_b);
  ASSERT_TRUE(a.ok() && b.ok());
  Membership& A = **a;
  Membership& B = **b;
  const uint32_t bs = B.slot();
  const uint64_t bg = B.generation();
  ASSERT_TRUE(WaitUntil([&] { return AllAlive({&A, &B}); }));

  fb.FailRange(HbOffset(c.sb, bs), kBlockSize, /*reads=*/false, /*writes=*/true);
  ASSERT_TRUE(WaitUntil([&] { return B.State() == Membership::SelfState::kLapsed; }));
  EXPECT_EQ(GuardedWrite(B, c.sb).code(), Code::kFenced);
  ASSERT_TRUE(WaitUntil([&] { return StateOf(A, bs) == PeerState::kDead; }));
  EXPECT_EQ(B.State(), Membership::SelfState::kLapsed);  // its handshake write fails too
  auto confirmed = A.DeclareDead(bs, bg);
  ASSERT_TRUE(confirmed.ok() && *confirmed);
  ASSERT_TRUE(A.MarkRecovered(bs, bg).ok());
  // B can still read: its handshake sees the verdict.
  ASSERT_TRUE(WaitUntil([&] { return B.State() == Membership::SelfState::kFenced; }));
  EXPECT_TRUE(WaitUntil([&] { return fenced_b.load() == 1; }));  // runs just after the flip

  fb.ClearRanges();
  ASSERT_TRUE(B.Rejoin().ok());
  EXPECT_EQ(B.slot(), bs);
  EXPECT_EQ(B.generation(), bg + 1);
  EXPECT_TRUE(WaitUntil([&] { return StateOf(A, bs) == PeerState::kAlive; }));
  EXPECT_EQ(fenced_b.load(), 1);
}

TEST(MembershipTest, RecoveredSlotIsClaimable) {
  Cluster c(2);
  auto a = c.Join(c.Path());
  auto b = c.Join(c.Path());
  ASSERT_TRUE(a.ok() && b.ok());
  Membership& A = **a;
  const uint32_t bs = (*b)->slot();
  const uint64_t bg = (*b)->generation();
  ASSERT_TRUE(WaitUntil([&] { return AllAlive({&A, b->get()}); }));
  b->reset();
  const SlotBlock last = c.Raw(bs);  // B's last heartbeat

  // Dead but not recovered: its journal must be replayed first.
  auto n = c.Join(c.Path());
  ASSERT_FALSE(n.ok());
  EXPECT_EQ(n.status().code(), Code::kBusy);
  EXPECT_FALSE(A.MarkRecovered(bs, bg).ok());  // no verdict yet

  ASSERT_TRUE(WaitUntil([&] { return StateOf(A, bs) == PeerState::kDead; }));
  auto confirmed = A.DeclareDead(bs, bg);
  ASSERT_TRUE(confirmed.ok() && *confirmed);
  ASSERT_TRUE(A.MarkRecovered(bs, bg).ok());
  EXPECT_EQ(c.Raw(bs).state, kSlotFree);
  // Suppose the free rewrite was lost (or a stale write of B's landed on it): the
  // slot is mounted again, and only the kVerdictRecovered verdict makes it claimable.
  WriteRaw(&c.disk, c.sb, bs, last);
  EXPECT_TRUE(WaitUntil([&] {
    PeerState s = StateOf(A, bs);
    return s == PeerState::kRecovered || s == PeerState::kFenced;
  }));

  n = c.Join(c.Path());
  ASSERT_TRUE(n.ok()) << n.status().ToString();
  EXPECT_EQ((*n)->slot(), bs);
  EXPECT_EQ((*n)->generation(), bg + 1);
  EXPECT_TRUE(WaitUntil([&] { return StateOf(A, bs) == PeerState::kAlive; }));
  EXPECT_TRUE(WaitUntil([&] { return c.Raw(A.slot()).verdict_count == 0; }));
}

TEST(MembershipTest, VerdictsOfARecoveredMasterStillFenceButNoLongerCount) {
  Cluster c(3);
  std::atomic<int> fenced_x{0};
  NodeDevice* px = c.Path();
  auto m = c.Join(c.Path());
  auto x = c.Join(px, &fenced_x);
  auto o = c.Join(c.Path());
  ASSERT_TRUE(m.ok() && x.ok() && o.ok());
  Membership& O = **o;
  Membership& X = **x;
  const uint32_t ms = (*m)->slot(), xs = X.slot();
  const uint64_t mg = (*m)->generation(), xg = X.generation();
  ASSERT_TRUE(WaitUntil([&] { return AllAlive({m->get(), &X, &O}); }));

  ResumeOnExit resume{{px}};
  px->Stall(true, true);
  ASSERT_TRUE(WaitUntil([&] { return StateOf(**m, xs) == PeerState::kDead; }));
  auto r = (*m)->DeclareDead(xs, xg);
  ASSERT_TRUE(r.ok() && *r);
  EXPECT_TRUE(WaitUntil([&] { return StateOf(O, xs) == PeerState::kRecovering; }));
  m->reset();  // the master dies while recovering X

  // O becomes master: recovers M; M's freed block keeps its verdict on X, which no
  // longer makes X "recovering" (nobody is), so O can declare X itself.
  ASSERT_TRUE(WaitUntil([&] { return StateOf(O, ms) == PeerState::kDead; }));
  r = O.DeclareDead(ms, mg);
  ASSERT_TRUE(r.ok() && *r);
  ASSERT_TRUE(O.MarkRecovered(ms, mg).ok());
  EXPECT_EQ(c.Raw(ms).verdict_count, 1u);
  ASSERT_TRUE(WaitUntil([&] { return StateOf(O, xs) == PeerState::kDead; }));
  r = O.DeclareDead(xs, xg);
  ASSERT_TRUE(r.ok() && *r);

  px->Resume();
  ASSERT_TRUE(WaitUntil([&] { return X.State() == Membership::SelfState::kFenced; }));
  EXPECT_TRUE(WaitUntil([&] { return fenced_x.load() == 1; }));  // runs just after the flip
}

TEST(MembershipTest, DeclareDeadNeedsOwnJudgment) {
  Cluster c(2);
  auto a = c.Join(c.Path());
  auto b = c.Join(c.Path());
  ASSERT_TRUE(a.ok() && b.ok());
  ASSERT_TRUE(WaitUntil([&] { return AllAlive({a->get(), b->get()}); }));
  auto r = (*a)->DeclareDead((*b)->slot(), (*b)->generation());
  ASSERT_TRUE(r.ok());
  EXPECT_FALSE(*r);  // alive: not declared
  EXPECT_EQ(c.Raw((*a)->slot()).verdict_count, 0u);
  EXPECT_FALSE((*a)->DeclareDead((*a)->slot(), (*a)->generation()).ok());
  EXPECT_FALSE((*a)->DeclareDead(99, 1).ok());
}

}  // namespace
}  // namespace agorafs
