// LockService: see lock_service.h and docs/DESIGN.md "Cluster layer".
//
// Threads: the engine thread does all disk messaging, elections and the master's
// work; the worker thread runs revoke and recovery callbacks. `mu` guards all state
// below; no I/O and no callback runs under it. Only the engine touches mbox/paxos.
#include "cluster/lock_service.h"

#include <sys/random.h>

#include <algorithm>
#include <condition_variable>
#include <deque>
#include <map>
#include <mutex>
#include <set>
#include <thread>
#include <unordered_map>
#include <unordered_set>

#include <spdlog/spdlog.h>

#include "cluster/mailbox.h"
#include "cluster/net_channel.h"
#include "util/clock.h"

namespace agorafs {

namespace {
bool LiveState(PeerState s) { return s == PeerState::kAlive || s == PeerState::kObserving; }
// States whose holder must be recovered before its locks are free.
bool NeedsRecovery(PeerState s) {
  return s == PeerState::kDead || s == PeerState::kRecovering || s == PeerState::kFenced;
}
Msg MakeMsg(MsgOp op, LockId lock, LockMode mode, uint32_t dest, uint64_t epoch) {
  Msg m{};
  m.op = op;
  m.lock = lock;
  m.mode = uint8_t(mode);
  m.dest = uint16_t(dest);
  m.epoch = epoch;
  return m;
}
}  // namespace

struct LockService::Impl {
  // --- configuration (immutable after Start)
  BlockDevice* raw = nullptr;
  Membership* m = nullptr;
  Superblock sb{};
  Geometry g;
  Uuid uuid{};
  Options o;
  ClusterTimings t;
  uint32_t me = 0;
  uint64_t my_gen = 0;
  std::unique_ptr<Mailbox> mbox;     // engine only
  std::unique_ptr<DiskPaxos> paxos;  // engine only
  std::unique_ptr<NetChannel> net;

  // --- shared state
  mutable std::mutex mu;
  std::condition_variable cv;         // lock waiters
  std::condition_variable engine_cv;  // engine wake-ups
  std::condition_variable worker_cv;
  // When the worker's current wait ends (BootNowUs), 0 while it runs: it scans every
  // pending revoke again before it waits. Unpin wakes it only when the lock's revoke
  // falls due before that, not at every unpin of a busy lock.
  uint64_t worker_wake_us = 0;
  bool poked = false;
  bool stopping = false;
  bool fenced = false;
  bool lapsed = false;  // lease ran out, handshake pending: waiters fail, nothing is sent
  uint64_t last_warn_ms = 0;
  uint64_t busy_until_ms = 0;  // poll every busy_poll_ms until then
  RevokeFn on_revoke;

  struct ClientLock {
    LockMode held = LockMode::kNone;
    LockMode wanted = LockMode::kNone;  // outstanding request (not covered by held)
    bool req_sent = false;
    uint64_t granted_us = 0;
    uint64_t last_used_us = 0;  // when the last pin went
    int pins = 0;
    int waiting[4] = {};  // Lock calls waiting, by the LockMode they want
    uint64_t grant_seq = 0;
    int unserved = 0;  // waiters woken by the last grant that have not pinned yet
    bool revoke_pending = false;
    LockMode revoke_to = LockMode::kNone;
    bool revoking = false;
    // Whether an exclusive Lock succeeded since the node last held nothing, and
    // whether that was so when it last went down to nothing: then a shared request
    // from nothing asks for exclusive at once (see LockLocked).
    bool used_exclusive = false;
    bool ask_exclusive = false;
  };
  std::unordered_map<LockId, ClientLock> cl;
  // Indexes into cl so the engine and the worker never scan every cached lock.
  std::unordered_set<LockId> to_request;  // wanted not covered by held, request not sent
  std::unordered_set<LockId> revoke_set;  // revoke_pending
  std::vector<Msg> to_master;  // client messages not yet sent (dest filled on send)

  // epoch as this node sees it
  MasterRecord master;
  bool epoch_ready = false;   // our mail header is written and reclaim queued
  uint64_t master_next = 0;   // next seq to read from the master's ring (0 = unknown)
  uint64_t ring_start = 1;    // first seq of our ring in this epoch
  uint64_t published_consumed = 0;
  uint64_t last_header_ms = 0;
  uint64_t last_paxos_ms = 0;

  // master state (valid while master.slot == me)
  struct Req {
    uint32_t slot;
    LockMode mode;
    uint64_t since_ms;
  };
  struct MasterLock {
    std::map<uint32_t, LockMode> holders;
    std::map<uint32_t, uint64_t> granted_ms;
    std::deque<Req> queue;
    std::set<uint32_t> revoke_sent;
  };
  struct NodeState {
    uint64_t gen = 0;
    uint64_t next = 0;  // next seq of its ring to read (0 = ring start unknown)
    bool reclaimed = false;
  };
  std::unordered_map<LockId, MasterLock> table;
  std::unordered_set<LockId> dirty;  // locks whose queue may be grantable
  std::vector<NodeState> nodes;
  std::vector<Msg> from_master;  // master messages not yet sent
  std::set<uint32_t> recovering;  // recovery task queued or running
  // slot -> generation this node has recovered. The peer view MasterTick works from is
  // read before the tick, so it can still say "dead" for a recovery that finished
  // meanwhile; replaying that journal again could overwrite newer blocks of a node
  // that has since claimed the slot. Kept across epochs: it is a fact about the disk.
  std::unordered_map<uint32_t, uint64_t> recovered_gen;
  std::unordered_map<uint32_t, uint64_t> recovery_backoff_ms;  // slot -> no retry before
  bool grants_open = false;
  bool table_changed = true;
  uint64_t last_snapshot_ms = 0;
  uint64_t last_acks_ms = 0;
  uint64_t last_view_ms = 0;
  bool acks_changed = false;

  // worker
  std::deque<std::function<void()>> tasks;
  std::thread engine, worker;
  Stats stats;

  bool IsMaster() const { return master.slot == me && master.generation == my_gen; }
  // Engine: I/O trouble repeats every poll; say it once every 5 s.
  void Warn(const std::string& what, const Status& st) {
    uint64_t now = BootNowMs();
    if (now < last_warn_ms + 5000) return;
    last_warn_ms = now;
    spdlog::warn("slot {}: {}: {}", me, what, st.ToString());
  }
  void Poke() {
    poked = true;
    engine_cv.notify_one();
  }
  // Locks are moving: a reply or a follow-up message is likely within milliseconds.
  // With the network channel on, wake-ups bring messages at once; polling fast as well
  // made handovers slower there (bench/locks ping-pong with the network: p50 1.26 ms
  // against 0.80 ms), so only a node without it polls fast.
  void Busy() { busy_until_ms = BootNowMs() + kBusyWindowMs; }
  uint32_t PollMs() const {
    const bool fast = !net && BootNowMs() < busy_until_ms;
    return fast ? std::min(o.busy_poll_ms, o.poll_ms) : o.poll_ms;
  }

  // ---------------------------------------------------------------- client side
  Status LockLocked(std::unique_lock<std::mutex>& lk, LockId id, LockMode mode) {
    stats.lock_calls++;
    bool first = true;
    uint64_t seen_grant = 0;
    bool waiting = false;
    auto stop_wait = [&](ClientLock& c) {
      if (!waiting) return;
      c.waiting[int(mode)]--;
      waiting = false;
    };
    for (;;) {
      ClientLock& c = cl[id];
      const bool woken_by_grant = waiting && c.grant_seq != seen_grant && c.unserved > 0;
      if (fenced || lapsed || stopping) {
        // A waiter the last grant woke and counted as unserved leaves without its
        // pin: uncount it, or a pending revoke waits for it forever (RevokeReady).
        if (woken_by_grant && Covers(c.held, mode)) c.unserved--;
        stop_wait(c);
        if (fenced) return Err(Code::kFenced, "node was fenced: its lease ran out");
        if (lapsed) return Err(Code::kFenced, "lease lapsed: this node may not write now");
        return Err(Code::kAborted, "lock service stopped");
      }
      bool enough = Covers(c.held, mode);
      // A pending revoke lets local users in until the minimum hold time is over (that
      // is what the hold time is for); after that it goes first, so the node that
      // asked is not starved by this node's own traffic.
      bool revoke_blocks = (c.revoke_pending && !Covers(c.revoke_to, mode) &&
                            BootNowUs() >= c.granted_us + uint64_t(o.min_hold_ms) * 1000) ||
                           c.revoking;
      if (enough && (!revoke_blocks || woken_by_grant) && !c.revoking) {
        if (woken_by_grant) c.unserved--;
        stop_wait(c);
        c.pins++;
        if (mode == LockMode::kExclusive) c.used_exclusive = true;
        if (first) stats.cached_hits++;
        return Status::Ok();
      }
      first = false;
      if (!enough && !Covers(c.wanted, mode)) {
        // A node whose last hold wrote asks for exclusive even when this caller needs
        // only shared or intent: a node that writes looks a name up or stats first
        // (shared, or intent for a stat on a node that held exclusive) and then creates
        // (exclusive), and the weaker grant would cost the holder a second revoke, to
        // nothing, a moment later. A hold that only read or used intent asks as asked
        // the next time.
        LockMode ask = Join(c.wanted, mode);
        if ((ask == LockMode::kShared || ask == LockMode::kIntent) &&
            c.held == LockMode::kNone && c.ask_exclusive) {
          ask = LockMode::kExclusive;
          stats.exclusive_for_shared++;
        }
        c.wanted = ask;
        c.req_sent = false;
        Busy();
        to_request.insert(id);
        Poke();
      }
      if (!waiting) {
        c.waiting[int(mode)]++;
        waiting = true;
      }
      seen_grant = c.grant_seq;
      cv.wait(lk);
    }
  }

  void ApplyGrant(LockId id, LockMode mode) {
    Busy();
    ClientLock& c = cl[id];
    c.held = Join(c.held, mode);
    if (Covers(c.held, c.wanted)) {
      c.wanted = LockMode::kNone;
      c.req_sent = false;
    }
    c.granted_us = BootNowUs();
    c.grant_seq++;
    c.unserved = 0;
    for (int m = 1; m < 4; m++) {
      if (Covers(c.held, LockMode(m))) c.unserved += c.waiting[m];
    }
    stats.grants++;
    cv.notify_all();
  }

  void ApplyRevoke(LockId id, LockMode to) {
    Busy();
    stats.revokes_received++;
    ClientLock& c = cl[id];
    if (Covers(to, c.held) && !c.revoking) {
      // Already there (a release crossed the revoke): confirm so the master updates.
      to_master.push_back(MakeMsg(kMsgRelease, id, c.held, 0, 0));
      Poke();
      return;
    }
    c.revoke_to = c.revoke_pending ? Meet(c.revoke_to, to) : to;
    c.revoke_pending = true;
    revoke_set.insert(id);
    worker_cv.notify_one();
  }

  // A revoke may run when nobody on this node uses the lock, every waiter the last
  // grant woke has had its turn, and either the lock was held min_hold_ms or nobody
  // used it for idle_release_us (an idle holder need not make the requester wait out
  // the hold time meant for busy ones).
  uint64_t RevokeDue(const ClientLock& c) const {
    return std::min(c.granted_us + uint64_t(o.min_hold_ms) * 1000,
                    c.last_used_us + o.idle_release_us);
  }
  bool RevokeReady(const ClientLock& c, uint64_t now) const {
    return c.revoke_pending && !c.revoking && c.pins == 0 && c.unserved == 0 &&
           now >= RevokeDue(c);
  }

  // ---------------------------------------------------------------- worker
  void WorkerLoop() {
    std::unique_lock<std::mutex> lk(mu);
    while (!stopping) {
      if (!tasks.empty()) {
        auto fn = std::move(tasks.front());
        tasks.pop_front();
        lk.unlock();
        fn();
        lk.lock();
        continue;
      }
      uint64_t now = BootNowUs();
      LockId ready = 0;
      bool found = false;
      uint64_t next_due = UINT64_MAX;
      for (LockId id : revoke_set) {
        if (fenced) break;
        ClientLock& c = cl[id];
        if (RevokeReady(c, now)) {
          ready = id;
          found = true;
          break;
        }
        if (c.revoke_pending && !c.revoking && c.pins == 0 && c.unserved == 0) {
          next_due = std::min(next_due, RevokeDue(c));
        }
      }
      if (found) {
        ClientLock& c = cl[ready];
        c.revoking = true;
        LockMode to = c.revoke_to;
        RevokeFn fn = on_revoke;
        lk.unlock();
        Status st = fn ? fn(ready, to) : Status::Ok();
        lk.lock();
        ClientLock& c2 = cl[ready];
        c2.revoking = false;
        if (!st.ok()) {
          spdlog::critical("revoke of lock {:#x} failed, cannot release it safely: {}", ready,
                           st.ToString());
          auto fatal = o.on_fatal;
          lk.unlock();
          if (fatal) fatal(st);
          lk.lock();
          continue;
        }
        c2.held = Meet(c2.held, to);
        if (c2.held == LockMode::kNone) {
          c2.ask_exclusive = c2.used_exclusive;
          c2.used_exclusive = false;
        }
        c2.revoke_pending = false;
        revoke_set.erase(ready);
        to_master.push_back(MakeMsg(kMsgRelease, ready, c2.held, 0, 0));
        stats.releases_sent++;
        cv.notify_all();
        Poke();
        continue;
      }
      uint64_t wait_us = next_due != UINT64_MAX ? std::max<uint64_t>(50, next_due - now) : 200000;
      worker_wake_us = now + wait_us;
      worker_cv.wait_for(lk, std::chrono::microseconds(wait_us));
      worker_wake_us = 0;
      stats.worker_wakeups++;
    }
  }

  // ---------------------------------------------------------------- epochs
  // Called under mu when a newer decision is learned.
  void Adopt(const MasterRecord& rec) {
    spdlog::info("slot {}: lock master of epoch {} is slot {} (generation {})", me, rec.epoch,
                 rec.slot, rec.generation);
    master = rec;
    stats.epoch = rec.epoch;
    stats.master_slot = rec.slot;
    epoch_ready = false;
    master_next = 0;
    to_master.clear();
    from_master.clear();
    to_request.clear();
    for (auto& [id, c] : cl) {
      c.req_sent = false;
      if (!Covers(c.held, c.wanted)) to_request.insert(id);
      if (!c.revoking && c.revoke_pending) {
        c.revoke_pending = false;  // the new master will ask again
        revoke_set.erase(id);
      }
    }
    table.clear();
    dirty.clear();
    recovering.clear();
    nodes.assign(g.node_slots, NodeState{});
    grants_open = false;
    table_changed = true;
    m->SetEpoch(rec.epoch);
  }

  // Engine: make our side of the new epoch ready. Returns false to retry later.
  bool MakeReady() {
    uint64_t start = mbox->next_seq();
    if (IsMaster()) {
      MailHeader h{};
      h.generation = my_gen;
      h.epoch = master.epoch;
      h.master_slot = me;
      h.master_gen = my_gen;
      h.ring_start = start;
      if (Status st = mbox->WriteMailHeader(h); !st.ok()) {
        Warn("writing the mail header", st);
        return false;
      }
      std::lock_guard<std::mutex> g2(mu);
      ring_start = start;
      mbox->SetFloor(start);
      // Our own holdings are the first reclaim.
      for (auto& [id, c] : cl) {
        if (c.held != LockMode::kNone) table[id].holders[me] = c.held;
        if (!Covers(c.held, c.wanted)) {
          c.req_sent = false;
          to_request.insert(id);
        }
      }
      nodes[me].gen = my_gen;
      nodes[me].reclaimed = true;
      epoch_ready = true;
      return true;
    }
    auto mh = mbox->ReadMailHeader(master.slot);
    if (!mh.ok()) return false;
    if (mh->epoch != master.epoch || mh->generation != master.generation) return false;
    MailHeader h{};
    h.generation = my_gen;
    h.epoch = master.epoch;
    h.master_slot = master.slot;
    h.master_gen = master.generation;
    h.master_consumed = mh->ring_start;
    h.ring_start = start;
    if (Status st = mbox->WriteMailHeader(h); !st.ok()) return false;
    std::lock_guard<std::mutex> g2(mu);
    master_next = mh->ring_start;
    published_consumed = master_next;
    ring_start = start;
    mbox->SetFloor(start);
    for (auto& [id, c] : cl) {
      if (c.held != LockMode::kNone) to_master.push_back(MakeMsg(kMsgReclaim, id, c.held, 0, 0));
      if (!Covers(c.held, c.wanted)) {
        c.req_sent = false;
        to_request.insert(id);
      }
    }
    to_master.push_back(MakeMsg(kMsgReclaimDone, 0, LockMode::kNone, 0, 0));
    epoch_ready = true;
    return true;
  }

  // Engine: learn the newest decision; elect when there is no live master.
  // Engine: reads the newest decision, adopts it if newer; `cur` becomes the master as
  // this node now sees it. False when the read failed.
  bool ReadDecision(uint64_t now, PaxosView* view, MasterRecord* cur) {
    auto v = paxos->ReadDecided();
    if (!v.ok()) return false;
    *view = *v;
    std::lock_guard<std::mutex> g2(mu);
    last_paxos_ms = now;
    if (view->decided.epoch > master.epoch) Adopt(view->decided);
    *cur = master;
    return true;
  }

  void CheckMaster(const std::vector<PeerInfo>& peers) {
    uint64_t now = BootNowMs();
    bool need_read;
    MasterRecord cur;
    {
      std::lock_guard<std::mutex> g2(mu);
      cur = master;
      need_read = cur.slot == kNoSlot || now >= last_paxos_ms + t.heartbeat_ms;
    }
    PaxosView view;
    if (need_read && !ReadDecision(now, &view, &cur)) return;
    bool alive = false;
    if (cur.slot != kNoSlot) {
      if (cur.slot == me) {
        alive = cur.generation == my_gen;
      } else if (cur.slot < peers.size()) {
        const PeerInfo& p = peers[cur.slot];
        alive = LiveState(p.state) && p.generation == cur.generation;
      }
    }
    if (alive) return;
    if (!need_read) {
      uint64_t seen = cur.epoch;
      if (!ReadDecision(now, &view, &cur)) return;
      // Someone was elected since our last read: follow it (the next tick checks that
      // it is alive) rather than depose a master that may be seconds old.
      if (cur.epoch != seen) return;
    }
    uint64_t epoch = std::max(view.decided.epoch, cur.epoch) + 1;
    {
      std::lock_guard<std::mutex> g2(mu);
      stats.elections++;
    }
    MasterRecord mine{epoch, me, my_gen};
    auto r = paxos->Propose(epoch, mine, [this] {
      std::lock_guard<std::mutex> g2(mu);
      return !stopping && m->LeaseValid();
    });
    if (!r.ok()) {
      if (!r.status().Is(Code::kStale) && !r.status().Is(Code::kTimedOut)) {
        spdlog::warn("slot {}: election for epoch {} failed: {}", me, epoch, r.status().ToString());
      }
      std::lock_guard<std::mutex> g2(mu);
      last_paxos_ms = 0;  // re-read at once
      return;
    }
    std::lock_guard<std::mutex> g2(mu);
    if (r->epoch > master.epoch) Adopt(*r);
  }

  // ---------------------------------------------------------------- master
  void Send(uint32_t dest, MsgOp op, LockId id, LockMode mode) {
    if (dest == me) {
      // Our own client: no disk round trip.
      if (op == kMsgGrant) ApplyGrant(id, mode);
      if (op == kMsgRevoke) ApplyRevoke(id, mode);
      return;
    }
    Msg m = MakeMsg(op, id, mode, dest, master.epoch);
    m.dest_gen = uint32_t(nodes[dest].gen);
    from_master.push_back(m);
  }

  void MasterHandle(uint32_t from, const Msg& msg) {
    Busy();
    if (!IsLockMode(msg.mode)) {
      spdlog::warn("slot {}: message with unknown lock mode {} from slot {}", me, msg.mode, from);
      return;
    }
    LockMode mode = LockMode(msg.mode);
    switch (msg.op) {
      case kMsgRequest: {
        MasterLock& l = table[msg.lock];
        auto h = l.holders.find(from);
        if (h != l.holders.end() && Covers(h->second, mode)) {
          Send(from, kMsgGrant, msg.lock, h->second);  // duplicate request
          break;
        }
        bool queued = false;
        for (Req& q : l.queue) {
          if (q.slot == from) {
            q.mode = Join(q.mode, mode);
            queued = true;
          }
        }
        if (!queued) l.queue.push_back(Req{from, mode, BootNowMs()});
        dirty.insert(msg.lock);
        break;
      }
      case kMsgRelease:
      case kMsgReclaim: {
        MasterLock& l = table[msg.lock];
        if (msg.op == kMsgReclaim) {
          for (auto& [h, hm] : l.holders) {
            if (h != from && !Compatible(hm, mode)) {
              spdlog::error("slot {} reclaims lock {:#x} in a mode conflicting with slot {}",
                            from, msg.lock, h);
            }
          }
        }
        if (mode == LockMode::kNone) {
          l.holders.erase(from);
          l.granted_ms.erase(from);
        } else {
          l.holders[from] = mode;
        }
        l.revoke_sent.erase(from);
        dirty.insert(msg.lock);
        break;
      }
      case kMsgReclaimDone:
        nodes[from].reclaimed = true;
        break;
      case kMsgCancel: {
        auto it = table.find(msg.lock);
        if (it != table.end()) {
          auto& q = it->second.queue;
          q.erase(std::remove_if(q.begin(), q.end(), [&](const Req& r) { return r.slot == from; }),
                  q.end());
          dirty.insert(msg.lock);
        }
        break;
      }
      default:
        spdlog::warn("slot {}: unexpected message op {} from slot {}", me, msg.op, from);
    }
    table_changed = true;
  }

  void GrantPass() {
    if (!grants_open) return;
    std::vector<LockId> ids(dirty.begin(), dirty.end());
    dirty.clear();
    uint64_t now = BootNowMs();
    for (LockId id : ids) {
      auto it = table.find(id);
      if (it == table.end()) continue;
      MasterLock& l = it->second;
      while (!l.queue.empty()) {
        Req head = l.queue.front();
        // What the requester holds after the grant: a holder of intent that asks
        // shared ends up exclusive, and every other holder must make room for that.
        auto own = l.holders.find(head.slot);
        const LockMode after =
            Join(own == l.holders.end() ? LockMode::kNone : own->second, head.mode);
        // A requester that was sent a revoke has a release on the way (every revoke
        // gets one), which says the mode it went down to, absolutely. Granted before
        // that release is read, the release would then erase the new grant here
        // while the requester holds it: wait for the release first. (Reached when the
        // request the revoke made room for went away: its node died or left.)
        bool conflict = l.revoke_sent.count(head.slot) > 0;
        for (auto& [h, hm] : l.holders) {
          if (h == head.slot || Compatible(hm, after)) continue;
          conflict = true;
          if (!l.revoke_sent.count(h)) {
            LockMode to = KeepBeside(hm, after);
            Send(h, kMsgRevoke, id, to);
            l.revoke_sent.insert(h);
          }
        }
        if (conflict) break;
        l.holders[head.slot] = after;
        l.granted_ms[head.slot] = now;
        l.queue.pop_front();
        Send(head.slot, kMsgGrant, id, after);
      }
      if (l.holders.empty() && l.queue.empty()) table.erase(it);
    }
    table_changed = true;
  }

  // Drops everything a recovered (slot, generation) held or wanted.
  void ForgetSlot(uint32_t slot) {
    for (auto it = table.begin(); it != table.end();) {
      MasterLock& l = it->second;
      l.holders.erase(slot);
      l.granted_ms.erase(slot);
      l.revoke_sent.erase(slot);
      auto& q = l.queue;
      q.erase(std::remove_if(q.begin(), q.end(), [&](const Req& r) { return r.slot == slot; }),
              q.end());
      dirty.insert(it->first);
      ++it;
    }
    nodes[slot] = NodeState{};
    table_changed = true;
  }

  void StartRecovery(uint32_t slot, uint64_t gen) {
    recovering.insert(slot);
    uint64_t epoch = master.epoch;
    tasks.push_back([this, slot, gen, epoch] {
      auto confirmed = m->DeclareDead(slot, gen);
      Status st;
      bool done = false;
      if (!confirmed.ok()) {
        st = confirmed.status();
      } else if (!*confirmed) {
        // Our observer no longer judges it dead (it came back, or another master
        // recovered it and the peer view has not caught up): look again after a
        // heartbeat rather than at every tick.
        spdlog::info("slot {}: slot {} generation {} is not dead to this observer; not recovering it",
                     me, slot, gen);
      } else {
        spdlog::warn("slot {}: node in slot {} (generation {}) is dead: recovering it", me, slot,
                     gen);
        st = o.on_recover ? o.on_recover(slot, gen) : Status::Ok();
        if (st.ok()) st = m->MarkRecovered(slot, gen);
        done = st.ok();
      }
      std::lock_guard<std::mutex> g2(mu);
      if (!st.ok()) {
        spdlog::error("slot {}: recovery of slot {} failed (will retry): {}", me, slot,
                      st.ToString());
      }
      if (!done) recovery_backoff_ms[slot] = BootNowMs() + t.heartbeat_ms;
      recovering.erase(slot);
      if (done) recovered_gen[slot] = gen;
      if (done && master.epoch == epoch && IsMaster()) {
        ForgetSlot(slot);
        stats.recoveries++;
        spdlog::info("slot {}: slot {} recovered; its locks are free", me, slot);
      }
      Poke();
    });
    worker_cv.notify_one();
  }

  // Engine, master only: read every live node's ring, handle, grant.
  void MasterTick(const std::vector<PeerInfo>& peers) {
    std::vector<uint32_t> need_start;
    std::vector<std::pair<uint32_t, NodeState>> readable;
    {
      std::lock_guard<std::mutex> g2(mu);
      bool open = true;
      for (uint32_t s = 0; s < g.node_slots && s < peers.size(); s++) {
        if (s == me) continue;
        const PeerInfo& p = peers[s];
        NodeState& n = nodes[s];
        if (LiveState(p.state)) {
          if (n.gen != p.generation) {
            if (n.gen != 0) ForgetSlot(s);  // an older generation of this slot
            nodes[s].gen = p.generation;
          }
          if (nodes[s].next == 0) {
            need_start.push_back(s);
          } else {
            readable.push_back({s, nodes[s]});
          }
          if (!nodes[s].reclaimed) open = false;
        } else if (NeedsRecovery(p.state)) {
          auto done = recovered_gen.find(s);
          if (done != recovered_gen.end() && done->second == p.generation) {
            if (nodes[s].gen != 0) ForgetSlot(s);  // recovered under an earlier master term
          } else {
            open = false;
            auto back = recovery_backoff_ms.find(s);
            bool wait = back != recovery_backoff_ms.end() && BootNowMs() < back->second;
            if (!recovering.count(s) && !wait) StartRecovery(s, p.generation);
          }
        } else if (nodes[s].gen != 0 &&
                   (p.state == PeerState::kRecovered || p.state == PeerState::kFree)) {
          // Recovered, or left cleanly (a node leaves only after writing everything
          // home): whatever it held is free.
          ForgetSlot(s);
        }
        if (recovering.count(s)) open = false;
      }
      if (open && !grants_open) {
        spdlog::info("slot {}: epoch {} ready, granting locks", me, master.epoch);
        for (auto& [id, l] : table) dirty.insert(id);
      }
      grants_open = open;
    }
    for (uint32_t s : need_start) {
      auto mh = mbox->ReadMailHeader(s);
      if (!mh.ok()) continue;
      std::lock_guard<std::mutex> g2(mu);
      if (mh->epoch == master.epoch && mh->generation == nodes[s].gen &&
          mh->master_slot == me && mh->master_gen == my_gen) {
        nodes[s].next = mh->ring_start;
        readable.push_back({s, nodes[s]});
      }
    }
    for (auto& [s, n] : readable) {
      uint64_t next = n.next;
      auto msgs = mbox->Read(s, n.gen, &next);
      if (!msgs.ok()) {
        Warn("reading slot " + std::to_string(s) + "'s messages", msgs.status());
        continue;
      }
      std::lock_guard<std::mutex> g2(mu);
      if (nodes[s].gen != n.gen || !IsMaster()) continue;
      nodes[s].next = next;
      if (!msgs->empty()) acks_changed = true;
      for (const Msg& msg : *msgs) {
        if (msg.dest != me || msg.epoch != master.epoch) continue;
        MasterHandle(s, msg);
      }
    }
    std::lock_guard<std::mutex> g2(mu);
    // Our own client's messages.
    for (Msg& msg : to_master) MasterHandle(me, msg);
    to_master.clear();
    GrantPass();
  }

  // ---------------------------------------------------------------- client tick
  void ClientTick() {
    uint32_t ms;
    uint64_t mg, next;
    {
      std::lock_guard<std::mutex> g2(mu);
      ms = master.slot;
      mg = master.generation;
      next = master_next;
    }
    if (next == 0) return;
    auto msgs = mbox->Read(ms, mg, &next);
    if (!msgs.ok()) {
      Warn("reading the master's messages", msgs.status());
      return;
    }
    std::lock_guard<std::mutex> g2(mu);
    if (master.slot != ms || master.generation != mg) return;
    master_next = next;
    for (const Msg& msg : *msgs) {
      // Messages to an earlier occupant of our slot (same epoch) are not ours.
      if (msg.dest != me || msg.epoch != master.epoch || msg.dest_gen != uint32_t(my_gen)) {
        continue;
      }
      if (!IsLockMode(msg.mode)) {
        spdlog::warn("slot {}: message with unknown lock mode {} from the master", me, msg.mode);
        continue;
      }
      if (msg.op == kMsgGrant) ApplyGrant(msg.lock, LockMode(msg.mode));
      if (msg.op == kMsgRevoke) ApplyRevoke(msg.lock, LockMode(msg.mode));
    }
  }

  // Engine: queue requests, then write our ring and wake receivers.
  void Flush(const std::vector<PeerInfo>& peers) {
    std::vector<Msg> out;
    bool master_role;
    uint64_t epoch;
    {
      std::lock_guard<std::mutex> g2(mu);
      if (!epoch_ready || master.slot == kNoSlot) return;
      master_role = IsMaster();
      epoch = master.epoch;
      // The master's own client: releases first. A release queued by the worker is
      // older than any request for the same lock in to_request (a request needs a
      // wanted mode that held does not cover, which that release made so). Handling
      // the request first would find this node still listed as holder, answer it as
      // a duplicate with a grant, and then let the release drop the holding the
      // client now believes it has: two nodes exclusive at once.
      if (master_role) {
        for (Msg& msg : to_master) MasterHandle(me, msg);
        to_master.clear();
      }
      for (LockId id : to_request) {
        ClientLock& c = cl[id];
        if (!Covers(c.held, c.wanted) && !c.req_sent) {
          c.req_sent = true;
          stats.requests_sent++;
          if (master_role) {
            MasterHandle(me, MakeMsg(kMsgRequest, id, c.wanted, me, epoch));
          } else {
            to_master.push_back(MakeMsg(kMsgRequest, id, c.wanted, 0, 0));
          }
        }
      }
      to_request.clear();
      if (master_role) {
        GrantPass();
        out.swap(from_master);
      } else {
        for (Msg& msg : to_master) {
          msg.dest = uint16_t(master.slot);
          msg.epoch = epoch;
        }
        out.swap(to_master);
      }
    }
    if (out.empty()) return;
    if (out.size() > mbox->Room()) RefreshFloor(peers, master_role);
    size_t n = std::min<size_t>(out.size(), mbox->Room());
    std::vector<Msg> now(out.begin(), out.begin() + long(n));
    std::vector<Msg> later(out.begin() + long(n), out.end());
    if (n > 0) {
      auto r = mbox->Append(now);
      if (!r.ok()) {
        Warn("writing messages", r.status());
        later.insert(later.begin(), now.begin(), now.end());
        now.clear();
      } else if (net) {
        std::set<uint32_t> dests;
        for (const Msg& msg : now) dests.insert(msg.dest);
        for (uint32_t d : dests) {
          if (d < peers.size() && !peers[d].address.empty()) {
            net->SendWake(peers[d].address, *r, epoch);
          }
        }
      }
    }
    if (!later.empty()) {
      std::lock_guard<std::mutex> g2(mu);
      if (master.epoch != epoch) return;  // stale: the new epoch resends what matters
      auto& q = master_role ? from_master : to_master;
      q.insert(q.begin(), later.begin(), later.end());
    }
  }

  // Learns how far our ring's readers have got.
  void RefreshFloor(const std::vector<PeerInfo>& peers, bool master_role) {
    uint64_t floor = UINT64_MAX;
    MasterRecord mr;
    uint64_t start;
    {
      std::lock_guard<std::mutex> g2(mu);
      mr = master;
      start = ring_start;
    }
    if (!master_role) {
      auto a = mbox->ReadAck(mr.slot, me);
      if (!a.ok()) return;
      if (a->epoch == mr.epoch && a->master_gen == mr.generation && a->entry.generation == my_gen) {
        floor = std::max(a->entry.consumed, start);
      } else {
        floor = start;
      }
    } else {
      for (uint32_t s = 0; s < peers.size(); s++) {
        if (s == me || !LiveState(peers[s].state)) continue;
        auto h = mbox->ReadMailHeader(s);
        if (!h.ok()) return;
        if (h->epoch == mr.epoch && h->master_slot == me && h->master_gen == my_gen &&
            h->generation == peers[s].generation) {
          floor = std::min(floor, std::max(h->master_consumed, start));
        } else {
          floor = std::min(floor, start);  // has not started reading this epoch yet
        }
      }
      if (floor == UINT64_MAX) floor = mbox->next_seq();
    }
    mbox->SetFloor(floor);
  }

  // Engine: publish how far we read (mail header / ack table) and the lock table.
  void Publish(const std::vector<PeerInfo>& peers) {
    uint64_t now = BootNowMs();
    uint64_t period = std::max<uint64_t>(t.heartbeat_ms / 4, 20);
    MailHeader h{};
    bool write_header = false;
    std::vector<AckEntry> acks;
    bool write_acks = false;
    std::vector<SnapshotEntry> snap;
    bool write_snap = false;
    bool write_view = false;
    uint64_t epoch;
    {
      std::lock_guard<std::mutex> g2(mu);
      epoch = master.epoch;
      if (!epoch_ready) return;
      if (!IsMaster() && master_next != 0 &&
          ((master_next != published_consumed && now >= last_header_ms + period) ||
           master_next - published_consumed > Mailbox::kCapacity / 8)) {
        h.generation = my_gen;
        h.epoch = master.epoch;
        h.master_slot = master.slot;
        h.master_gen = master.generation;
        h.master_consumed = master_next;
        h.ring_start = ring_start;
        for (auto& [id, c] : cl) {
          h.held += c.held != LockMode::kNone;
          h.waiting += !Covers(c.held, c.wanted);
        }
        write_header = true;
        published_consumed = master_next;
        last_header_ms = now;
      }
      if (IsMaster() && acks_changed && now >= last_acks_ms + period) {
        acks.resize(g.node_slots);
        for (uint32_t s = 0; s < g.node_slots; s++) acks[s] = AckEntry{nodes[s].gen, nodes[s].next};
        write_acks = true;
        acks_changed = false;
        last_acks_ms = now;
      }
      if (IsMaster() && now >= last_view_ms + t.heartbeat_ms) {
        write_view = true;
        last_view_ms = now;
      }
      if (IsMaster() && table_changed && now >= last_snapshot_ms + t.heartbeat_ms) {
        BuildSnapshot(now, &snap);
        write_snap = true;
        table_changed = false;
        last_snapshot_ms = now;
      }
    }
    if (write_header) (void)mbox->WriteMailHeader(h);
    if (write_acks) (void)mbox->WriteAcks(epoch, acks);
    if (write_snap) WriteSnapshot(epoch, snap);
    if (write_view) WritePeerView(epoch, peers);
  }

  void WritePeerView(uint64_t epoch, const std::vector<PeerInfo>& peers) {
    AlignedBuffer b(kBlockSize);
    auto* v = reinterpret_cast<PeerViewBlock*>(b.data());
    v->epoch = epoch;
    for (const PeerInfo& p : peers) {
      if (p.state == PeerState::kFree || v->count >= kPeerViewEntries) continue;
      PeerViewEntry& e = v->entries[v->count++];
      e.slot = uint16_t(p.slot);
      e.state = uint8_t(p.state);
      e.heartbeat_age_ms = uint32_t(std::min<uint64_t>(p.heartbeat_age_ms, UINT32_MAX));
      e.generation = p.generation;
    }
    uint64_t blk = g.SlotBlock(me, kSlotPeerView);
    InitHeader(b.data(), BlockType::kPeerView, blk, uuid);
    SealBlock(b.data());
    (void)m->guarded_device()->Write(blk * kBlockSize, b.data(), kBlockSize);
  }

  void BuildSnapshot(uint64_t now, std::vector<SnapshotEntry>* out) {
    auto age = [&](uint64_t since) { return uint32_t(std::min<uint64_t>(now - since, UINT32_MAX)); };
    // Waiters and contended holders first: they are what a hang is traced by.
    for (int pass = 0; pass < 2; pass++) {
      for (auto& [id, l] : table) {
        bool contended = !l.queue.empty();
        if ((pass == 0) != contended) continue;
        for (auto& [s, hm] : l.holders) {
          auto gm = l.granted_ms.find(s);
          out->push_back(SnapshotEntry{id, uint16_t(s), uint8_t(hm),
                                       uint8_t(l.revoke_sent.count(s) ? kSnapRevoking : kSnapHeld),
                                       gm == l.granted_ms.end() ? 0 : age(gm->second)});
        }
        for (const Req& q : l.queue) {
          out->push_back(SnapshotEntry{id, uint16_t(q.slot), uint8_t(q.mode), uint8_t(kSnapWaiting),
                                       age(q.since_ms)});
        }
      }
    }
  }

  void WriteSnapshot(uint64_t epoch, const std::vector<SnapshotEntry>& snap) {
    size_t pos = 0;
    for (uint32_t i = 0; i < kSlotSnapshotBlocks; i++) {
      AlignedBuffer b(kBlockSize);
      auto* sbk = reinterpret_cast<LockSnapshotBlock*>(b.data());
      sbk->epoch = epoch;
      sbk->index = i;
      sbk->total = snap.size();
      while (sbk->count < kSnapshotPerBlock && pos < snap.size()) sbk->entries[sbk->count++] = snap[pos++];
      uint64_t blk = g.SlotBlock(me, kSlotSnapshot + i);
      InitHeader(b.data(), BlockType::kLockSnapshot, blk, uuid);
      SealBlock(b.data());
      if (!m->guarded_device()->Write(blk * kBlockSize, b.data(), kBlockSize).ok()) return;
      if (pos >= snap.size() && i > 0) break;
    }
  }

  // ---------------------------------------------------------------- engine loop
  void EngineLoop() {
    while (true) {
      {
        std::unique_lock<std::mutex> lk(mu);
        if (!poked) engine_cv.wait_for(lk, std::chrono::milliseconds(PollMs()));
        poked = false;
        if (stopping) return;
        if (m->State() == Membership::SelfState::kFenced && !fenced) {
          spdlog::error("slot {}: fenced; every lock is lost", me);
          fenced = true;
          for (auto& [id, c] : cl) c.held = LockMode::kNone;
          cv.notify_all();
        }
        if (fenced) continue;
      }
      if (!m->LeaseValid()) {
        // Lapsed: fail what waits (like every other pending operation of this node) and
        // send nothing until the handshake renews the lease or fences us.
        std::lock_guard<std::mutex> g2(mu);
        if (!lapsed) {
          spdlog::warn("slot {}: lease lapsed; failing lock waiters", me);
          lapsed = true;
          cv.notify_all();
        }
        continue;
      }
      {
        std::lock_guard<std::mutex> g2(mu);
        lapsed = false;
      }
      std::vector<PeerInfo> peers = m->Peers();
      CheckMaster(peers);
      bool ready, is_master;
      {
        std::lock_guard<std::mutex> g2(mu);
        ready = epoch_ready;
        is_master = IsMaster();
        if (master.slot == kNoSlot) continue;
      }
      if (!ready && !MakeReady()) continue;
      if (is_master) {
        MasterTick(peers);
      } else {
        ClientTick();
      }
      Flush(peers);
      Publish(peers);
      // Copy the engine-only counters for stats() readers.
      auto ms = mbox->stats();
      auto ps = paxos->stats();
      std::lock_guard<std::mutex> g2(mu);
      stats.disk_reads = ms.reads + ps.reads;
      stats.disk_writes = ms.writes + ps.writes;
    }
  }
};

Result<std::unique_ptr<LockService>> LockService::Start(BlockDevice* raw_dev,
                                                        const Superblock& sb, Membership* m,
                                                        Options opts) {
  std::unique_ptr<LockService> ls(new LockService());
  auto im = std::make_unique<Impl>();
  im->raw = raw_dev;
  im->m = m;
  im->sb = sb;
  im->g = GeometryOf(sb);
  std::memcpy(im->uuid.data(), sb.hdr.uuid, 16);
  im->o = opts;
  im->on_revoke = opts.on_revoke;
  im->t = m->timings();
  im->t.poll_ms = opts.poll_ms;
  im->me = m->slot();
  im->my_gen = m->generation();
  im->mbox = std::make_unique<Mailbox>(m->guarded_device(), raw_dev, im->g, im->uuid, im->me,
                                       im->my_gen);
  im->paxos = std::make_unique<DiskPaxos>(m->guarded_device(), im->g, im->uuid, im->me, im->my_gen);
  im->nodes.assign(im->g.node_slots, Impl::NodeState{});
  if (!opts.net_bind.empty()) {
    NetChannel::Options no;
    no.bind = opts.net_bind;
    std::memcpy(no.secret.data(), sb.cluster_secret, 32);
    no.uuid = im->uuid;
    no.slot = im->me;
    no.generation = im->my_gen;
    Impl* p = im.get();
    no.is_alive = [p](uint32_t slot, uint64_t gen) {
      PeerInfo pi = p->m->Peer(slot);
      return LiveState(pi.state) && pi.generation == gen;
    };
    no.on_wake = [p](uint32_t) {
      std::lock_guard<std::mutex> g2(p->mu);
      p->Poke();
    };
    auto n = NetChannel::Start(no);
    if (!n.ok()) return n.status();
    im->net = std::move(n).value();
    m->SetAddress(im->net->address());
  }
  Impl* p = im.get();
  ls->impl_ = std::move(im);
  p->engine = std::thread([p] { p->EngineLoop(); });
  p->worker = std::thread([p] { p->WorkerLoop(); });
  return ls;
}

LockService::~LockService() { Stop(); }

void LockService::Stop() {
  if (!impl_) return;
  {
    std::lock_guard<std::mutex> g2(impl_->mu);
    impl_->stopping = true;
    impl_->engine_cv.notify_all();
    impl_->worker_cv.notify_all();
    impl_->cv.notify_all();
  }
  if (impl_->engine.joinable()) impl_->engine.join();
  if (impl_->worker.joinable()) impl_->worker.join();
  impl_->net.reset();
}

Status LockService::Lock(LockId id, LockMode mode) {
  if (mode == LockMode::kNone) return Err(Code::kInvalid, "lock mode none");
  std::unique_lock<std::mutex> lk(impl_->mu);
  return impl_->LockLocked(lk, id, mode);
}

void LockService::Unpin(LockId id) {
  std::lock_guard<std::mutex> g2(impl_->mu);
  auto it = impl_->cl.find(id);
  if (it == impl_->cl.end() || it->second.pins == 0) return;
  Impl::ClientLock& c = it->second;
  if (--c.pins == 0) {
    c.last_used_us = BootNowUs();
    // A busy holder unpins thousands of times a second; waking the worker each time
    // cost as much CPU as the calls themselves while another node waited.
    if (c.revoke_pending && impl_->worker_wake_us != 0 &&
        impl_->RevokeDue(c) < impl_->worker_wake_us) {
      impl_->worker_cv.notify_one();
    }
  }
}

Status LockService::Acquire(LockId id, LockMode mode) {
  Status st = Lock(id, mode);
  if (st.ok()) Unpin(id);
  return st;
}

LockMode LockService::Held(LockId id) const {
  std::lock_guard<std::mutex> g2(impl_->mu);
  auto it = impl_->cl.find(id);
  return it == impl_->cl.end() ? LockMode::kNone : it->second.held;
}

void LockService::SetRevokeCallback(RevokeFn fn) {
  std::lock_guard<std::mutex> g2(impl_->mu);
  impl_->on_revoke = std::move(fn);
}

LockService::Stats LockService::stats() const {
  std::lock_guard<std::mutex> g2(impl_->mu);
  Stats s = impl_->stats;
  s.is_master = impl_->IsMaster();
  if (impl_->net) {
    const auto& ns = impl_->net->stats();
    s.net_sent = ns.sent;
    s.net_accepted = ns.accepted;
    s.net_dropped = ns.bad_size + ns.bad_header + ns.bad_mac + ns.not_alive + ns.replayed;
  }
  return s;
}

MasterRecord LockService::master() const {
  std::lock_guard<std::mutex> g2(impl_->mu);
  return impl_->master;
}

}  // namespace agorafs
