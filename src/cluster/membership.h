// Membership: node slots as delta leases on the shared disk, liveness judged by each
// observer's own clock, the node's own lease, self-fencing, and the fence handshake.
//
// Contract
// - Join() claims a slot so that no two nodes ever own one: it reads every heartbeat
//   block, picks a random claimable slot (state kSlotFree, or a generation some live
//   node's verdict marks kVerdictRecovered), writes a claim (state kSlotMounted, a new
//   generation = old + 1, a random nonce, counter 1), waits timings.JoinWaitMs(),
//   re-reads, and owns the slot only if the block still carries its nonce. It aborts
//   and retries (random backoff) if its read, read-to-write gap or write took longer
//   than JoinWaitMs()/4 (see timings.h). A slot that is mounted but dead and not yet
//   recovered is never claimed: its journal must be replayed first.
// - After Join() a heartbeat thread rewrites the slot block every heartbeat_ms
//   (counter + 1) from an in-memory copy, and an observer thread reads every slot's
//   heartbeat block every heartbeat_ms and keeps, per slot, the BootNowMs() at which it
//   last saw (counter, generation, nonce) change. Liveness never compares clocks
//   between nodes. Observation restarts for all slots when the observer's own scan was
//   unhealthy (see timings.h), so a storage-wide stall declares nobody dead.
// - Lease: LeaseValid() is true while BootNowMs() < (issue time of the last completed
//   heartbeat write) + timings.LeaseMs(). CheckWrite() returns kFenced when it is not.
//   LeaseRemainingMs() is how long it stays valid without a further renewal (0 when
//   not valid): anything this node lets others rely on may be promised that long.
//   Every write the node issues must pass through GuardedDevice (below), which checks
//   the lease immediately before each Write/Flush.
// - Lease lapse: when the lease runs out the node stops writing (GuardedDevice fails
//   writes with kFenced) and the heartbeat thread runs the handshake as soon as I/O
//   answers: (1) read every slot's verdicts and its own block; if a verdict names
//   (slot, generation), or its own block no longer carries its nonce -> fenced.
//   (2) otherwise write its heartbeat once; (3) read the same again; verdict or lost
//   block -> fenced, else the lease is renewed and the node goes on with the same
//   generation (a storage-wide stall is survived without fencing).
// - CheckWrite() (and so GuardedDevice) refuses unless the node is kActive *and* within
//   its lease: right after the handshake's heartbeat lands the clock says "valid"
//   although a verdict may already name the node (the Spin model shows two valid
//   holders with a clock-only guard).
// - Fenced is final for this generation: State() == kFenced, every CheckWrite() and
//   GuardedDevice write fails, the fence callback runs once (the lock manager fails
//   its waiters with kFenced). Rejoin() then claims a slot again as a new generation.
// - DeclareDead(slot, gen) is for the lock master of the current epoch only: it adds a
//   kVerdictRecovering verdict to its own heartbeat block, writes it (completed), then
//   re-reads the victim's block. It returns true ("confirmed") only if the victim's
//   (counter, generation, nonce) are what this observer saw when it judged the slot
//   dead; otherwise it drops the verdict and returns false (the node came back).
//   MarkRecovered(slot, gen) first rewrites the victim's heartbeat block with state
//   kSlotFree (generation kept), then sets the verdict to kVerdictRecovered and writes
//   it. In this order nobody can claim the slot before the one free rewrite landed (a
//   slow rewrite landing on a new owner's claim could otherwise free a taken slot). A
//   verdict is kept until that slot is seen alive with a newer generation, or the
//   table is full (oldest recovered verdicts go first).
// - Leave() stops the threads and writes the slot kSlotFree (clean unmount); the slot
//   may then be claimed by anyone.
// - Peers() is the observer's view of every slot, for the lock manager and status.
//
// Thread-safety: all methods may be called from any thread.
#pragma once

#include <atomic>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "cluster/timings.h"
#include "device/block_device.h"
#include "format/format.h"
#include "util/status.h"

namespace agorafs {

enum class PeerState : uint8_t {
  kFree = 0,        // slot not in use
  kObserving = 1,   // mounted, but this observer has not watched it for D yet
                    // and has not seen it change: treat as alive
  kAlive = 2,       // counter changed within D
  kDead = 3,        // counter unchanged for D of healthy observation; not recovered
  kRecovering = 4,  // a verdict kVerdictRecovering names this generation
  kRecovered = 5,   // a verdict kVerdictRecovered names it (slot claimable)
  kFenced = 6,      // a verdict names it but its counter moved after it: the node is
                    // back and has fenced itself; it must rejoin
  kUnreadable = 7,  // heartbeat block failed verification (logged once)
};
const char* PeerStateName(PeerState s);

struct PeerInfo {
  uint32_t slot = 0;
  PeerState state = PeerState::kFree;
  uint64_t generation = 0;
  uint64_t counter = 0;
  uint64_t nonce = 0;
  uint64_t epoch = 0;
  std::string host;
  std::string address;
  uint64_t heartbeat_age_ms = 0;  // observer time since the counter last changed
};

class Membership {
 public:
  struct Options {
    std::string host;     // empty = gethostname()
    std::string address;  // published "ip:port" of the network channel, may be empty
    ClusterTimings timings;
    // Called once, from the heartbeat thread, when this generation is fenced.
    std::function<void()> on_fenced;
  };

  // `dev` must outlive the Membership. Reads the superblock's geometry/uuid from `sb`.
  static Result<std::unique_ptr<Membership>> Join(BlockDevice* dev, const Superblock& sb,
                                                  Options opts);
  ~Membership();  // stops the threads; does NOT free the slot (that is Leave())

  uint32_t slot() const;
  uint64_t generation() const;
  const ClusterTimings& timings() const;

  enum class SelfState : uint8_t { kActive, kLapsed, kFenced, kLeft };
  SelfState State() const;
  bool LeaseValid() const;
  uint64_t LeaseRemainingMs() const;
  Status CheckWrite() const;  // OK, or kFenced with the reason

  std::vector<PeerInfo> Peers() const;
  PeerInfo Peer(uint32_t slot) const;
  // Slots this observer currently considers alive (kAlive or kObserving), incl. self.
  std::vector<uint32_t> LiveSlots() const;

  Result<bool> DeclareDead(uint32_t slot, uint64_t generation);
  Status MarkRecovered(uint32_t slot, uint64_t generation);

  // Publishes the epoch this node has adopted (informational, next heartbeat).
  void SetEpoch(uint64_t epoch);
  // Publishes the network channel's address (next heartbeat).
  void SetAddress(const std::string& address);
  // Wakes the observer for an immediate scan (e.g. after a network hint).
  void Poke();

  Status Rejoin();  // after kFenced: claim a slot as a new generation
  Status Leave();

  // The device wrapper all of this node's writes go through.
  BlockDevice* guarded_device();

 private:
  Membership() = default;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Passes reads through; refuses writes, write batches and flushes with kFenced unless
// the lease is valid at the instant of the call. Owned by Membership.
class GuardedDevice : public BlockDevice {
 public:
  GuardedDevice(BlockDevice* inner, const Membership* m) : inner_(inner), m_(m) {}
  Status Read(uint64_t off, void* buf, size_t len) override { return inner_->Read(off, buf, len); }
  Status Write(uint64_t off, const void* buf, size_t len) override {
    if (Status st = m_->CheckWrite(); !st.ok()) return st;
    return inner_->Write(off, buf, len);
  }
  // One check for the whole batch: it is submitted at the instant of the call.
  Status WriteBatch(const WriteOp* ops, size_t n) override {
    if (Status st = m_->CheckWrite(); !st.ok()) return st;
    return inner_->WriteBatch(ops, n);
  }
  Status Flush() override {
    if (Status st = m_->CheckWrite(); !st.ok()) return st;
    return inner_->Flush();
  }
  uint64_t Size() const override { return inner_->Size(); }
  std::string Name() const override { return inner_->Name(); }

 private:
  BlockDevice* inner_;
  const Membership* m_;
};

}  // namespace agorafs
