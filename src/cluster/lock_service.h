// LockService: the cluster lock manager. Shared, intent and exclusive locks on 64-bit
// ids (LockMode: intent is compatible with intent only), granted by the lock master of
// the current epoch over the disk message rings.
//
// Contract
// - Lock(id, mode) returns once this node holds `id` in a mode that Covers `mode`, with
//   a pin that keeps it: a revoke waits until every pin on the lock is gone (Unpin). A
//   lock stays cached after Unpin at no I/O cost until the master revokes it. kFenced
//   when this node lost its lease, kAborted when the service stops. Callers must not
//   wait for a mode its pin does not cover (shared -> intent or exclusive, intent ->
//   shared or exclusive) while pinning the lock: unpin first. A node holding shared
//   that asks intent (or the reverse) is granted exclusive. Locks held together must be
//   taken in one global order (the caller's ordering). A shared or intent Lock may be
//   granted exclusive: when the node last went down to nothing from a hold in which
//   it took the lock exclusively, it asks for exclusive at once (a writer's lookup
//   would otherwise cost the holder two revokes).
// - Revocation: the master asks a holder to go down to the strongest mode it may keep
//   beside the request (KeepBeside: exclusive keeps shared beside a shared request,
//   intent beside an intent one; anything else goes to none). The holder waits until
//   the lock is unpinned and was held min_hold_ms since its grant (so a node that
//   waited for a lock gets to use it: no ping-pong) or has not been used for
//   idle_release_us (an idle holder lets go at once), calls the revoke
//   callback (flush and drop what the lock covers), then sends the release. While a
//   revoke is pending, new pins that would conflict with it wait (no starvation of the
//   requester by local users).
// - Fairness: the master grants each lock's requests in FIFO order; a compatible
//   request never overtakes an earlier waiting one.
// - Dead nodes: the master keeps a dead node's locks held until Membership confirms
//   the verdict, the recovery callback has run for (slot, generation) and the slot is
//   marked recovered. A new master grants nothing until every live node has re-sent
//   its holdings (reclaim) and every dead node is recovered.
// - Master: elected by DiskPaxos when there is none or it is dead. Any node may be
//   master; the master is also an ordinary client of itself.
// - Network: with a NetChannel, every appended message batch is followed by a wake-up
//   datagram to its receiver; receivers poll every poll_ms. A node without the channel
//   polls every busy_poll_ms for kBusyWindowMs after it last sent, received or waited
//   for a lock message (a handover takes four hops through the rings; polling fast
//   only while locks move keeps an idle cluster at poll_ms).
// - Fencing: when Membership fences this node, every waiter and every later Lock
//   returns kFenced, held locks count as lost (no callback: nothing may be written).
// - If the revoke callback fails, the lock cannot be released safely: the node calls
//   on_fatal (the daemon exits; survivors then recover it like a crashed node).
//
// Thread-safety: all public methods from any thread. Callbacks run on the service's
// worker thread, never under the service's mutex.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "cluster/membership.h"
#include "cluster/paxos.h"
#include "lock/lock_manager.h"
#include "util/status.h"

namespace agorafs {

class LockService : public LockManager {
 public:
  using RecoverFn = std::function<Status(uint32_t slot, uint64_t generation)>;
  static constexpr uint32_t kBusyWindowMs = 200;
  struct Options {
    uint32_t poll_ms = 5;
    uint32_t busy_poll_ms = 1;  // while locks move; never slower than poll_ms
    uint32_t min_hold_ms = 1;
    // A revoked lock unused this long goes before min_hold. Short, because a holder
    // that is done makes the requester wait this long; a busy node's calls follow one
    // another far closer than this.
    uint32_t idle_release_us = 500;
    std::string net_bind;  // "ip:port" for the network channel; empty = disk only
    RevokeFn on_revoke;    // may be empty (nothing cached)
    RecoverFn on_recover;  // may be empty (nothing to replay)
    std::function<void(const Status&)> on_fatal;
  };
  struct Stats {
    uint64_t lock_calls = 0, cached_hits = 0, requests_sent = 0, grants = 0;
    uint64_t revokes_received = 0, releases_sent = 0, elections = 0, epoch = 0;
    uint64_t exclusive_for_shared = 0;  // shared or intent Lock calls that asked exclusive
    uint64_t worker_wakeups = 0;        // the revoke worker's waits that ended
    uint32_t master_slot = kNoSlot;
    bool is_master = false;
    uint64_t recoveries = 0;
    uint64_t disk_reads = 0, disk_writes = 0;
    uint64_t net_sent = 0, net_accepted = 0, net_dropped = 0;
  };

  // `m` must outlive the service. Starts the engine and worker threads.
  static Result<std::unique_ptr<LockService>> Start(BlockDevice* raw_dev, const Superblock& sb,
                                                    Membership* m, Options opts);
  ~LockService() override;  // Stop()
  void Stop();

  Status Lock(LockId id, LockMode mode);
  void Unpin(LockId id);

  // LockManager: a pin taken and dropped at once (the caller's own mutex keeps the
  // revoke callback out while it uses the lock).
  Status Acquire(LockId id, LockMode mode) override;
  LockMode Held(LockId id) const override;
  void SetRevokeCallback(RevokeFn fn) override;

  Stats stats() const;
  MasterRecord master() const;

 private:
  LockService() = default;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace agorafs
