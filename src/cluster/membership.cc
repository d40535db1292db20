// Membership: node slots as delta leases on the shared disk. The protocol and its
// safety arguments are in membership.h and timings.h; comments here say why the code
// is shaped the way it is.
#include "cluster/membership.h"

#include <sys/random.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <random>

#include "util/clock.h"

namespace agorafs {

const char* PeerStateName(PeerState s) {
  switch (s) {
    case PeerState::kFree: return "free";
    case PeerState::kObserving: return "observing";
    case PeerState::kAlive: return "alive";
    case PeerState::kDead: return "dead";
    case PeerState::kRecovering: return "recovering";
    case PeerState::kRecovered: return "recovered";
    case PeerState::kFenced: return "fenced";
    case PeerState::kUnreadable: return "unreadable";
  }
  return "unknown";
}

namespace {

// A random non-zero 64-bit value (nonces, PRNG seeds).
uint64_t RandomU64() {
  uint64_t v = 0;
  while (v == 0) {
    if (getrandom(&v, sizeof(v), 0) != static_cast<ssize_t>(sizeof(v))) {
      v = std::random_device{}() ^ (uint64_t(std::random_device{}()) << 32) ^ BootNowUs();
    }
  }
  return v;
}

std::string Field(const char* p, size_t n) { return std::string(p, strnlen(p, n)); }

void SetField(char* dst, size_t n, const std::string& v) {
  std::memset(dst, 0, n);
  std::memcpy(dst, v.data(), std::min(v.size(), n - 1));
}

void SleepMs(uint64_t ms) { std::this_thread::sleep_for(std::chrono::milliseconds(ms)); }

// One slot's heartbeat block as read from the disk.
struct SlotRead {
  enum Kind : uint8_t { kOk, kZero, kBad } kind = kZero;
  // kOk: the block; kZero: all zero (mkfs state = free, generation 0). SlotBlock is
  // packed (alignment 1): without alignas it would sit at offset 1, and references to
  // its fields (std::min(b.verdict_count, ...)) would be misaligned.
  alignas(8) SlotBlock b{};
  std::string why;  // kBad: why verification failed
  bool foreign = false;  // kBad: an intact heartbeat of another filesystem
};

bool IsMounted(const SlotRead& r) { return r.kind == SlotRead::kOk && r.b.state == kSlotMounted; }

// Does some slot other than `slot` hold a verdict naming (slot, gen) of at least `min`?
bool VerdictOnDisk(const std::vector<SlotRead>& r, uint32_t slot, uint64_t gen, uint32_t min) {
  for (uint32_t w = 0; w < r.size(); w++) {
    if (w == slot || r[w].kind != SlotRead::kOk) continue;
    const SlotBlock& b = r[w].b;
    uint32_t n = std::min<uint32_t>(b.verdict_count, kMaxVerdicts);
    for (uint32_t i = 0; i < n; i++) {
      const Verdict& v = b.verdicts[i];
      if (v.slot == slot && v.generation == gen && v.state >= min) return true;
    }
  }
  return false;
}

constexpr int kMaxJoinAttempts = 64;

}  // namespace

struct Membership::Impl {
  // What the observer last saw of one slot.
  struct Seen {
    bool have = false;        // a verified (or all-zero) block has been read
    bool unreadable = false;  // the last read failed verification (logged once)
    uint32_t state = kSlotFree;
    uint64_t counter = 0, generation = 0, nonce = 0, epoch = 0;
    std::string host, address;
    uint64_t changed_ms = 0;  // BootNowMs() of the last change or observation restart
    bool moved = false;       // a change was seen since observation (re)started
    // For PeerState::kFenced: the counter when a verdict on `verdict_gen` was first seen.
    bool verdict_marked = false;
    uint64_t verdict_gen = 0, verdict_counter = 0;
  };

  Impl(Membership* m, BlockDevice* d, const Superblock& sb, Options o)
      : dev(d), g(GeometryOf(sb)), opts(std::move(o)), t(opts.timings),
        guarded(std::make_unique<GuardedDevice>(d, m)), seen(g.node_slots) {
    std::memcpy(uuid.data(), sb.hdr.uuid, uuid.size());
    host = opts.host;
    if (host.empty()) {
      char buf[256] = {};
      if (gethostname(buf, sizeof(buf) - 1) == 0) host = buf;
    }
    std::memset(&mine, 0, sizeof(mine));
  }

  BlockDevice* const dev;  // inner device: reads, heartbeats and join claims
  const Geometry g;
  Uuid uuid{};
  Options opts;  // address may change (SetAddress), under mu
  const ClusterTimings t;
  std::string host;
  const std::unique_ptr<GuardedDevice> guarded;

  // Lock order: wmu before mu. No I/O is done while holding mu.
  std::mutex rejoin_mu;
  std::mutex wmu;  // serialises writes of the own heartbeat block, so the last write
                   // that lands always carries the newest in-memory state (verdicts!)
  mutable std::mutex mu;
  std::condition_variable hb_cv, obs_cv;
  bool stop = false, poke = false;
  std::thread hb_thread, obs_thread;

  // Identity (under mu; state and lease also readable without it).
  uint32_t slot = 0;
  uint64_t generation = 0, nonce = 0;
  SlotBlock mine;  // in-memory copy of the own heartbeat block, incl. verdicts
  std::atomic<SelfState> state{SelfState::kActive};
  std::atomic<uint64_t> lease_until{0};
  std::atomic<bool> fence_pending{false};  // the observer saw a verdict naming us
  bool fence_notified = false;             // on_fenced ran for this generation
  std::string fence_reason;
  bool hb_error_logged = false, lapse_error_logged = false;

  // Observer (under mu).
  std::vector<Seen> seen;
  // The tables of the other mounted slots, from the last scan. A free slot's table is
  // left out: its author is gone (cleanly, or recovered), so a kVerdictRecovering in it
  // means nobody is recovering that node any more. It still fences (Handshake, Scan).
  std::vector<Verdict> other_verdicts;
  uint64_t last_scan_end = 0;
  bool scan_error_logged = false;

  uint64_t Blk(uint32_t s) const { return g.SlotBlock(s, kSlotHeartbeat); }

  // ------------------------------------------------------------------ disk access

  Result<SlotRead> ReadSlot(uint32_t s) {
    AlignedBuffer buf(kBlockSize);
    AGFS_RETURN_IF_ERROR(dev->Read(Blk(s) * kBlockSize, buf.data(), kBlockSize));
    SlotRead r;
    Status v = VerifyBlock(buf.data(), BlockType::kSlot, Blk(s), uuid);
    if (v.ok()) {
      r.kind = SlotRead::kOk;
      std::memcpy(&r.b, buf.data(), kBlockSize);
    } else if (IsZeroBlock(buf.data())) {
      r.kind = SlotRead::kZero;  // mkfs zeroes the slot region: a never-used slot
    } else {
      r.kind = SlotRead::kBad;
      r.why = v.ToString();
      r.foreign = IsForeignBlock(buf.data(), BlockType::kSlot, Blk(s), uuid);
    }
    return r;
  }

  // Reads every slot's heartbeat block; logs each unreadable one once per episode.
  Status ReadAll(std::vector<SlotRead>& r) {
    r.resize(g.node_slots);
    for (uint32_t s = 0; s < g.node_slots; s++) {
      AGFS_ASSIGN_OR_RETURN(r[s], ReadSlot(s));
    }
    std::lock_guard<std::mutex> l(mu);
    for (uint32_t s = 0; s < g.node_slots; s++) {
      bool bad = r[s].kind == SlotRead::kBad;
      if (bad && !seen[s].unreadable) {
        spdlog::error("node slot {} heartbeat block is unreadable, never claimed: {}", s, r[s].why);
      }
      seen[s].unreadable = bad;
    }
    return Status::Ok();
  }

  Status WriteBlock(BlockDevice* via, uint32_t s, SlotBlock b, bool flush) {
    AlignedBuffer buf(kBlockSize);
    std::memcpy(buf.data(), &b, kBlockSize);
    InitHeader(buf.data(), BlockType::kSlot, Blk(s), uuid);
    SealBlock(buf.data());
    AGFS_RETURN_IF_ERROR(via->Write(Blk(s) * kBlockSize, buf.data(), kBlockSize));
    return flush ? via->Flush() : Status::Ok();
  }

  // Writes the in-memory copy of the own block with counter + 1. `via` is the inner
  // device for heartbeats and the handshake, the guarded one for everything else.
  // The lease is renewed to issue + LeaseMs() only if the write completed while the
  // lease was still valid: a write that completes after a lapse may have landed
  // after a master's re-read, so only the handshake may renew then.
  Status WriteOwn(BlockDevice* via, bool flush, uint64_t* issue_out) {
    std::lock_guard<std::mutex> wl(wmu);
    SlotBlock b;
    uint32_t s;
    uint64_t gen;
    {
      std::lock_guard<std::mutex> l(mu);
      mine.counter++;
      b = mine;
      s = slot;
      gen = generation;
    }
    const uint64_t issue = BootNowMs();
    AGFS_RETURN_IF_ERROR(WriteBlock(via, s, b, flush));
    if (issue_out) *issue_out = issue;
    std::lock_guard<std::mutex> l(mu);
    if (generation == gen && state == SelfState::kActive && BootNowMs() < lease_until) {
      lease_until = std::max<uint64_t>(lease_until, issue + t.LeaseMs());
    }
    return Status::Ok();
  }

  // ------------------------------------------------------------------ join

  // Claims a slot (Join and Rejoin) and installs it as this node's identity.
  Status Claim() {
    const uint64_t J = t.JoinWaitMs(), quarter = J / 4;
    std::mt19937_64 rng(RandomU64());
    // Nonces of our own claims whose write was too slow to trust. Such a slot looks
    // mounted to everybody else, so we retry it first instead of stranding it.
    std::vector<uint64_t> aborted;
    std::vector<SlotRead> r;
    for (int attempt = 1; attempt <= kMaxJoinAttempts; attempt++) {
      if (attempt > 1) SleepMs(quarter + rng() % (J - quarter + 1));  // random backoff
      const uint64_t t0 = BootNowMs();
      AGFS_RETURN_IF_ERROR(ReadAll(r));
      const uint64_t t1 = BootNowMs();
      if (t1 - t0 > quarter) {
        spdlog::info("join: reading the slots took {} ms (> {}), retrying", t1 - t0, quarter);
        continue;
      }
      std::vector<uint32_t> retry, claimable;
      uint32_t mounted = 0, unreadable = 0;
      for (uint32_t s = 0; s < g.node_slots; s++) {
        const SlotRead& x = r[s];
        if (x.foreign) {
          // mkfs zeroed the slot region: a node of another filesystem wrote this since,
          // so it writes to this device too and would overwrite what we write.
          return Err(Code::kBusy, "node slot " + std::to_string(s) + " on " + dev->Name() +
                                      " holds the heartbeat of another filesystem: a node "
                                      "of another cluster is using this device (after "
                                      "unmounting it there, 'agorafs fsck --repair' clears "
                                      "the slot)");
        }
        if (x.kind == SlotRead::kBad) {
          unreadable++;
        } else if (!IsMounted(x)) {
          claimable.push_back(s);  // free, or never written
        } else if (std::find(aborted.begin(), aborted.end(), x.b.nonce) != aborted.end()) {
          retry.push_back(s);
        } else if (VerdictOnDisk(r, s, x.b.generation, kVerdictRecovered)) {
          claimable.push_back(s);  // recovered, but the master's free rewrite was lost
        } else {
          mounted++;
        }
      }
      if (retry.empty() && claimable.empty()) {
        return Err(Code::kBusy, "no free node slot on " + dev->Name() + " (" +
                                    std::to_string(mounted) + " mounted, " +
                                    std::to_string(unreadable) + " unreadable)");
      }
      const uint32_t s = !retry.empty() ? retry[0] : claimable[rng() % claimable.size()];
      SlotBlock c;
      std::memset(&c, 0, sizeof(c));
      c.state = kSlotMounted;
      c.slot = s;
      c.counter = 1;
      c.generation = (r[s].kind == SlotRead::kOk ? r[s].b.generation : 0) + 1;
      c.mount_ns = RealtimeNs();
      SetField(c.host, sizeof(c.host), host);
      SetField(c.address, sizeof(c.address), opts.address);
      c.nonce = RandomU64();
      const uint64_t t2 = BootNowMs();
      if (t2 - t1 > quarter) continue;  // we were descheduled: the read is stale
      AGFS_RETURN_IF_ERROR(WriteBlock(dev, s, c, false));
      const uint64_t t3 = BootNowMs();
      if (t3 - t2 > quarter) {
        // The claim may have landed late, after a competitor's re-read: never own it.
        // It stays on disk (rewriting it could land late in turn); we retry it first.
        spdlog::warn("join: claim write of slot {} took {} ms (> {}), retrying", s, t3 - t2,
                     quarter);
        aborted.push_back(c.nonce);
        continue;
      }
      // Any competitor that saw the slot free read it before our claim landed, and its
      // own claim (if it did not abort) landed within 3J/4 of that read: before now + J.
      SleepMs(J);
      AGFS_ASSIGN_OR_RETURN(SlotRead back, ReadSlot(s));
      if (!IsMounted(back) || back.b.nonce != c.nonce || back.b.generation != c.generation) {
        spdlog::info("join: lost the race for slot {}, retrying", s);
        continue;
      }
      {
        std::lock_guard<std::mutex> wl(wmu);
        std::lock_guard<std::mutex> l(mu);
        slot = s;
        generation = c.generation;
        nonce = c.nonce;
        mine = c;
        // The claim is our first heartbeat write: it was issued at t2 and completed.
        lease_until = t2 + t.LeaseMs();
        fence_pending = false;
        fence_notified = false;
        fence_reason.clear();
        hb_error_logged = false;
        state = SelfState::kActive;
      }
      spdlog::info("joined as node slot {} generation {} on {}", s, uint64_t(c.generation),
                   dev->Name());
      // The lease dates from the claim, J ago: beat at once so the caller starts with a
      // fresh one (on failure the heartbeat thread takes over).
      Beat();
      return Status::Ok();
    }
    return Err(Code::kBusy, "could not claim a node slot on " + dev->Name() + " after " +
                                std::to_string(kMaxJoinAttempts) + " attempts");
  }

  // ------------------------------------------------------------------ lease and fence

  bool LeaseValid() const {
    return state == SelfState::kActive && !fence_pending && BootNowMs() < lease_until;
  }

  void Fence(const std::string& why) {
    std::function<void()> cb;
    {
      std::lock_guard<std::mutex> l(mu);
      if (state == SelfState::kFenced || state == SelfState::kLeft) return;
      state = SelfState::kFenced;
      fence_pending = false;
      fence_reason = why;
      spdlog::error("node slot {} generation {} is fenced: {}", slot, generation, why);
      if (!fence_notified) {
        fence_notified = true;
        cb = opts.on_fenced;
      }
    }
    if (cb) cb();
  }

  // Why the disk says this generation is over, or "" if it does not.
  std::string FenceReason(const std::vector<SlotRead>& r) {
    uint32_t s;
    uint64_t gen, n;
    {
      std::lock_guard<std::mutex> l(mu);
      s = slot;
      gen = generation;
      n = nonce;
    }
    if (VerdictOnDisk(r, s, gen, kVerdictRecovering)) return "a lock master declared it dead";
    if (!IsMounted(r[s]) || r[s].b.nonce != n || r[s].b.generation != gen) {
      return "its heartbeat block was rewritten by another node";
    }
    return "";
  }

  // The fence handshake after a lapse (see membership.h). One attempt; the heartbeat
  // thread repeats it every heartbeat_ms until it renews the lease or fences.
  void Handshake() {
    {
      std::lock_guard<std::mutex> l(mu);
      if (state == SelfState::kActive) {
        state = SelfState::kLapsed;
        lapse_error_logged = false;
        spdlog::warn("node slot {} generation {}: lease lapsed, writes stopped", slot, generation);
      }
      if (state != SelfState::kLapsed) return;
    }
    auto io_failed = [&](const Status& st) {
      std::lock_guard<std::mutex> l(mu);
      if (!lapse_error_logged) spdlog::warn("fence handshake waits for I/O: {}", st.ToString());
      lapse_error_logged = true;
    };
    std::vector<SlotRead> r;
    if (Status st = ReadAll(r); !st.ok()) return io_failed(st);
    if (std::string why = FenceReason(r); !why.empty()) return Fence(why);
    uint64_t issue = 0;
    if (Status st = WriteOwn(dev, false, &issue); !st.ok()) return io_failed(st);
    if (Status st = ReadAll(r); !st.ok()) return io_failed(st);
    if (std::string why = FenceReason(r); !why.empty()) return Fence(why);
    // Either a master's verdict landed after our re-read, and then its re-read of our
    // block comes after our write and sees the counter move; or there is none.
    std::lock_guard<std::mutex> l(mu);
    if (state != SelfState::kLapsed) return;
    lease_until = issue + t.LeaseMs();
    state = SelfState::kActive;
    spdlog::info("node slot {} generation {}: lease renewed after the handshake", slot,
                 generation);
  }

  void Beat() {
    Status st = WriteOwn(dev, false, nullptr);
    std::lock_guard<std::mutex> l(mu);
    if (!st.ok() && !hb_error_logged) {
      // Not renewing is the whole reaction: the lease lapses and the node fences itself.
      spdlog::error("heartbeat write failed (the lease will lapse): {}", st.ToString());
    } else if (st.ok() && hb_error_logged) {
      spdlog::info("heartbeat writes succeed again");
    }
    hb_error_logged = !st.ok();
  }

  void HeartbeatLoop() {
    std::unique_lock<std::mutex> lk(mu);
    while (!stop) {
      hb_cv.wait_for(lk, std::chrono::milliseconds(t.heartbeat_ms), [&] { return stop; });
      if (stop) break;
      SelfState s = state;
      if (s == SelfState::kFenced || s == SelfState::kLeft) continue;
      lk.unlock();
      if (fence_pending) {
        Fence("a verdict names this generation");
      } else if (s == SelfState::kActive && LeaseValid()) {
        Beat();
      } else {
        Handshake();
      }
      lk.lock();
    }
  }

  // ------------------------------------------------------------------ observer

  bool Dead(const Seen& x, uint64_t now) const {
    // Only what was actually observed counts: if our own scans stopped (our I/O is
    // stalled), we cannot vouch for anyone's silence.
    return last_scan_end + t.heartbeat_ms + t.io_timeout_ms >= now &&
           last_scan_end - x.changed_ms >= t.dead_after_ms;
  }

  // Strongest verdict naming (s, gen): ours in memory, others' from the last scan.
  uint32_t VerdictOn(uint32_t s, uint64_t gen) const {
    uint32_t best = kVerdictNone;
    for (uint32_t i = 0; i < mine.verdict_count; i++) {
      const Verdict& v = mine.verdicts[i];
      if (v.slot == s && v.generation == gen) best = std::max(best, v.state);
    }
    for (const Verdict& v : other_verdicts) {
      if (v.slot == s && v.generation == gen) best = std::max(best, v.state);
    }
    return best;
  }

  int FindVerdict(uint32_t s, uint64_t gen) const {
    for (uint32_t i = 0; i < mine.verdict_count; i++) {
      if (mine.verdicts[i].slot == s && mine.verdicts[i].generation == gen) return int(i);
    }
    return -1;
  }

  void RemoveVerdict(uint32_t i) {
    std::memmove(&mine.verdicts[i], &mine.verdicts[i + 1],
                 (mine.verdict_count - i - 1) * sizeof(Verdict));
    mine.verdict_count--;
    std::memset(&mine.verdicts[mine.verdict_count], 0, sizeof(Verdict));
  }

  void Scan() {
    const uint64_t start = BootNowMs();
    std::vector<SlotRead> r;
    Status st = ReadAll(r);
    const uint64_t end = BootNowMs();
    std::lock_guard<std::mutex> l(mu);
    // An unhealthy scan restarts every liveness clock (timings.h).
    const bool healthy = st.ok() && last_scan_end != 0 && end - start <= t.io_timeout_ms &&
                         end - last_scan_end <= uint64_t(t.heartbeat_ms) + t.io_timeout_ms;
    last_scan_end = end;
    if (!st.ok()) {
      if (!scan_error_logged) spdlog::warn("heartbeat scan failed: {}", st.ToString());
      scan_error_logged = true;
      for (Seen& x : seen) {
        x.changed_ms = end;
        x.moved = false;
      }
      return;
    }
    scan_error_logged = false;
    other_verdicts.clear();
    for (uint32_t s = 0; s < g.node_slots; s++) {
      Seen& x = seen[s];
      const SlotRead& rd = r[s];
      if (rd.kind == SlotRead::kBad) {
        x.have = false;
        continue;
      }
      const SlotBlock& b = rd.b;  // all zero for kZero: free, generation 0
      const bool changed = !x.have || b.state != x.state || b.counter != x.counter ||
                           b.generation != x.generation || b.nonce != x.nonce;
      if (!healthy || changed) {
        // A change seen in this scan landed at most now: counting from the scan's end
        // can only declare death later, never earlier.
        x.moved = healthy && x.have;
        x.changed_ms = end;
      }
      x.have = true;
      x.state = b.state;
      x.counter = b.counter;
      x.generation = b.generation;
      x.nonce = b.nonce;
      x.epoch = b.epoch;
      x.host = Field(b.host, sizeof(b.host));
      x.address = Field(b.address, sizeof(b.address));
      if (s == slot || rd.kind != SlotRead::kOk) continue;  // our own table is in memory
      uint32_t n = std::min<uint32_t>(b.verdict_count, kMaxVerdicts);
      if (b.state == kSlotMounted) {
        other_verdicts.insert(other_verdicts.end(), b.verdicts, b.verdicts + n);
      }
    }
    // A verdict on us (in any table) while we think we hold the lease: the heartbeat
    // thread fences at its next tick.
    if (state == SelfState::kActive || state == SelfState::kLapsed) {
      if (VerdictOnDisk(r, slot, generation, kVerdictRecovering)) fence_pending = true;
    }
    for (uint32_t s = 0; s < g.node_slots; s++) {
      Seen& x = seen[s];
      if (!x.have) continue;
      if (VerdictOn(s, x.generation) == kVerdictNone) {
        x.verdict_marked = false;
      } else if (!x.verdict_marked || x.verdict_gen != x.generation) {
        x.verdict_marked = true;
        x.verdict_gen = x.generation;
        x.verdict_counter = x.counter;
      }
    }
    // Our verdicts are kept until the slot runs again under a newer generation.
    for (uint32_t i = 0; i < mine.verdict_count;) {
      const Verdict& v = mine.verdicts[i];
      const Seen& x = seen[v.slot];  // DeclareDead only accepts slots that exist
      if (x.have && x.state == kSlotMounted && x.generation > v.generation && x.moved) {
        RemoveVerdict(i);
      } else {
        i++;
      }
    }
  }

  void ObserverLoop() {
    std::unique_lock<std::mutex> lk(mu);
    while (!stop) {
      obs_cv.wait_for(lk, std::chrono::milliseconds(t.heartbeat_ms),
                      [&] { return stop || poke; });
      if (stop) break;
      poke = false;
      lk.unlock();
      Scan();
      lk.lock();
    }
  }

  PeerInfo PeerOf(uint32_t s, uint64_t now) const {
    PeerInfo p;
    p.slot = s;
    if (s >= g.node_slots) return p;
    if (s == slot && state != SelfState::kLeft) {
      p.state = state == SelfState::kFenced ? PeerState::kFenced : PeerState::kAlive;
      p.generation = generation;
      p.counter = mine.counter;
      p.nonce = nonce;
      p.epoch = mine.epoch;
      p.host = host;
      p.address = opts.address;
      return p;
    }
    const Seen& x = seen[s];
    if (x.unreadable) {
      p.state = PeerState::kUnreadable;
      return p;
    }
    if (!x.have) {
      p.state = PeerState::kObserving;  // never read it: treat as alive
      return p;
    }
    p.generation = x.generation;
    p.counter = x.counter;
    p.nonce = x.nonce;
    p.epoch = x.epoch;
    p.host = x.host;
    p.address = x.address;
    p.heartbeat_age_ms = last_scan_end - x.changed_ms;
    if (x.state != kSlotMounted) {
      p.state = PeerState::kFree;
    } else if (uint32_t v = VerdictOn(s, x.generation); v != kVerdictNone) {
      if (x.verdict_marked && x.counter != x.verdict_counter) {
        p.state = PeerState::kFenced;
      } else {
        p.state = v == kVerdictRecovered ? PeerState::kRecovered : PeerState::kRecovering;
      }
    } else if (Dead(x, now)) {
      p.state = PeerState::kDead;
    } else {
      p.state = x.moved ? PeerState::kAlive : PeerState::kObserving;
    }
    return p;
  }

  // ------------------------------------------------------------------ lifecycle

  void Start() {
    hb_thread = std::thread([this] { HeartbeatLoop(); });
    obs_thread = std::thread([this] { ObserverLoop(); });
  }

  void Stop() {
    {
      std::lock_guard<std::mutex> l(mu);
      stop = true;
    }
    hb_cv.notify_all();
    obs_cv.notify_all();
    // Leave() may be called from on_fenced, i.e. from the heartbeat thread itself.
    for (std::thread* th : {&hb_thread, &obs_thread}) {
      if (th->joinable() && th->get_id() != std::this_thread::get_id()) th->join();
    }
  }

  // Withdraws an unconfirmed verdict, also from the disk (best effort: the next
  // heartbeat writes the table again anyway).
  void Withdraw(uint32_t s, uint64_t gen) {
    {
      std::lock_guard<std::mutex> l(mu);
      if (int i = FindVerdict(s, gen); i >= 0) RemoveVerdict(uint32_t(i));
      seen[s].verdict_marked = false;
    }
    if (Status st = WriteOwn(guarded.get(), false, nullptr); !st.ok()) {
      spdlog::warn("withdrawing the verdict on slot {}: {}", s, st.ToString());
    }
  }
};

// -------------------------------------------------------------------- Membership

Result<std::unique_ptr<Membership>> Membership::Join(BlockDevice* dev, const Superblock& sb,
                                                     Options opts) {
  const ClusterTimings& t = opts.timings;
  if (dev == nullptr) return Err(Code::kInvalid, "membership: no device");
  if (t.heartbeat_ms == 0 || t.io_timeout_ms == 0 || t.dead_after_ms <= t.heartbeat_ms ||
      t.LeaseMs() == 0) {
    return Err(Code::kInvalid, "membership: bad cluster timings (heartbeat " +
                                   std::to_string(t.heartbeat_ms) + " ms, dead after " +
                                   std::to_string(t.dead_after_ms) + " ms)");
  }
  Geometry g = GeometryOf(sb);
  if (g.node_slots < kMinNodeSlots || g.node_slots > kMaxNodeSlots || g.slot_blocks == 0 ||
      (g.slot_start + uint64_t(g.node_slots) * g.slot_blocks) * kBlockSize > dev->Size()) {
    return Err(Code::kInvalid, "membership: node slot region does not fit " + dev->Name());
  }
  std::unique_ptr<Membership> m(new Membership());
  m->impl_ = std::make_unique<Impl>(m.get(), dev, sb, std::move(opts));
  AGFS_RETURN_IF_ERROR(m->impl_->Claim());
  m->impl_->Scan();  // so Peers() means something at once (everyone kObserving)
  m->impl_->Start();
  return Result<std::unique_ptr<Membership>>(std::move(m));
}

Membership::~Membership() {
  if (impl_) impl_->Stop();
}

uint32_t Membership::slot() const {
  std::lock_guard<std::mutex> l(impl_->mu);
  return impl_->slot;
}

uint64_t Membership::generation() const {
  std::lock_guard<std::mutex> l(impl_->mu);
  return impl_->generation;
}

const ClusterTimings& Membership::timings() const { return impl_->t; }

Membership::SelfState Membership::State() const {
  SelfState s = impl_->state;
  // The lease runs out by the clock, not when the heartbeat thread notices.
  if (s == SelfState::kActive && !impl_->LeaseValid()) return SelfState::kLapsed;
  return s;
}

bool Membership::LeaseValid() const { return impl_->LeaseValid(); }

uint64_t Membership::LeaseRemainingMs() const {
  uint64_t until = impl_->lease_until.load();
  uint64_t now = BootNowMs();
  if (!impl_->LeaseValid() || now >= until) return 0;
  return until - now;
}

Status Membership::CheckWrite() const {
  if (impl_->LeaseValid()) return Status::Ok();
  std::lock_guard<std::mutex> l(impl_->mu);
  std::string who = "node slot " + std::to_string(impl_->slot) + " generation " +
                    std::to_string(impl_->generation);
  switch (impl_->state.load()) {
    case SelfState::kFenced:
      return Err(Code::kFenced, who + " is fenced: " + impl_->fence_reason);
    case SelfState::kLeft:
      return Err(Code::kFenced, who + " has left the cluster");
    default:
      if (impl_->fence_pending) return Err(Code::kFenced, who + ": a verdict names it");
      return Err(Code::kFenced, who + ": lease expired");
  }
}

std::vector<PeerInfo> Membership::Peers() const {
  std::lock_guard<std::mutex> l(impl_->mu);
  const uint64_t now = BootNowMs();
  std::vector<PeerInfo> v;
  v.reserve(impl_->g.node_slots);
  for (uint32_t s = 0; s < impl_->g.node_slots; s++) v.push_back(impl_->PeerOf(s, now));
  return v;
}

PeerInfo Membership::Peer(uint32_t slot) const {
  std::lock_guard<std::mutex> l(impl_->mu);
  return impl_->PeerOf(slot, BootNowMs());
}

std::vector<uint32_t> Membership::LiveSlots() const {
  std::vector<uint32_t> live;
  for (const PeerInfo& p : Peers()) {
    if (p.state == PeerState::kAlive || p.state == PeerState::kObserving) live.push_back(p.slot);
  }
  return live;
}

Result<bool> Membership::DeclareDead(uint32_t slot, uint64_t generation) {
  Impl& m = *impl_;
  if (slot >= m.g.node_slots) return Err(Code::kInvalid, "DeclareDead: no such slot");
  AGFS_RETURN_IF_ERROR(CheckWrite());
  uint64_t counter, nonce;
  {
    std::lock_guard<std::mutex> l(m.mu);
    if (slot == m.slot) return Err(Code::kInvalid, "DeclareDead: a node cannot declare itself");
    Impl::Seen& x = m.seen[slot];
    // Only a judgment of our own observer counts; its values are what the re-read
    // must find unchanged.
    if (!x.have || x.state != kSlotMounted || x.generation != generation ||
        !m.Dead(x, BootNowMs())) {
      return false;
    }
    counter = x.counter;
    nonce = x.nonce;
    int i = m.FindVerdict(slot, generation);
    if (i >= 0 && m.mine.verdicts[i].state == kVerdictRecovered) return true;
    if (i < 0) {
      if (m.mine.verdict_count == kMaxVerdicts) {
        for (uint32_t j = 0; j < m.mine.verdict_count; j++) {
          if (m.mine.verdicts[j].state == kVerdictRecovered) {
            m.RemoveVerdict(j);  // the oldest recovered one goes first
            break;
          }
        }
        if (m.mine.verdict_count == kMaxVerdicts) {
          return Err(Code::kNoSpace, "DeclareDead: verdict table full of recoveries in progress");
        }
      }
      m.mine.verdicts[m.mine.verdict_count++] = Verdict{slot, kVerdictRecovering, generation};
    }
    x.verdict_marked = true;
    x.verdict_gen = generation;
    x.verdict_counter = counter;
  }
  // The verdict must have landed before the re-read: a victim that wrote its heartbeat
  // before reading verdicts then shows a moved counter here.
  if (Status st = m.WriteOwn(m.guarded.get(), false, nullptr); !st.ok()) {
    m.Withdraw(slot, generation);
    return st;
  }
  auto rd = m.ReadSlot(slot);
  if (rd.ok() && IsMounted(*rd) && rd->b.counter == counter && rd->b.generation == generation &&
      rd->b.nonce == nonce) {
    spdlog::warn("node slot {} generation {} ({}) declared dead", slot, generation,
                 Field(rd->b.host, sizeof(rd->b.host)));
    return true;
  }
  m.Withdraw(slot, generation);
  if (!rd.ok()) return rd.status();
  spdlog::info("node slot {} generation {} came back; verdict withdrawn", slot, generation);
  return false;
}

Status Membership::MarkRecovered(uint32_t slot, uint64_t generation) {
  Impl& m = *impl_;
  if (slot >= m.g.node_slots) return Err(Code::kInvalid, "MarkRecovered: no such slot");
  {
    std::lock_guard<std::mutex> l(m.mu);
    if (m.FindVerdict(slot, generation) < 0) {
      return Err(Code::kInvalid, "MarkRecovered: no verdict on slot " + std::to_string(slot) +
                                     " generation " + std::to_string(generation));
    }
  }
  AGFS_RETURN_IF_ERROR(CheckWrite());
  // Free the victim's block first, then publish kVerdictRecovered. While only our
  // kVerdictRecovering verdict is out, nobody may claim the slot, so this rewrite can
  // never land on a joiner's fresh claim however slow it is. (The other order makes the
  // slot claimable through the verdict before the rewrite, which a slow rewrite could
  // then erase.)
  AGFS_ASSIGN_OR_RETURN(SlotRead rd, m.ReadSlot(slot));
  if (rd.kind == SlotRead::kBad) return Err(Code::kCorruption, rd.why);
  if (IsMounted(rd) && rd.b.generation == generation) {
    SlotBlock f = rd.b;
    f.state = kSlotFree;  // generation kept: the next claim takes generation + 1
    AGFS_RETURN_IF_ERROR(m.WriteBlock(m.guarded.get(), slot, f, true));
  }
  {
    std::lock_guard<std::mutex> l(m.mu);
    if (int i = m.FindVerdict(slot, generation); i >= 0) {
      m.mine.verdicts[i].state = kVerdictRecovered;
    }
  }
  spdlog::info("node slot {} generation {} recovered and freed", slot, generation);
  return m.WriteOwn(m.guarded.get(), true, nullptr);
}

void Membership::SetEpoch(uint64_t epoch) {
  std::lock_guard<std::mutex> l(impl_->mu);
  impl_->mine.epoch = epoch;
}

void Membership::SetAddress(const std::string& address) {
  std::lock_guard<std::mutex> l(impl_->mu);
  impl_->opts.address = address;
  SetField(impl_->mine.address, sizeof(impl_->mine.address), address);
}

void Membership::Poke() {
  {
    std::lock_guard<std::mutex> l(impl_->mu);
    impl_->poke = true;
  }
  impl_->obs_cv.notify_all();
}

Status Membership::Rejoin() {
  std::lock_guard<std::mutex> l(impl_->rejoin_mu);  // one claim at a time
  if (impl_->state != SelfState::kFenced) {
    return Err(Code::kInvalid, "Rejoin: this node is not fenced");
  }
  // The heartbeat thread idles while fenced; Claim() installs the new identity and it
  // resumes with it.
  return impl_->Claim();
}

Status Membership::Leave() {
  Impl& m = *impl_;
  m.Stop();
  if (m.state == SelfState::kLeft) return Status::Ok();
  if (m.state != SelfState::kFenced && !m.LeaseValid()) m.Handshake();  // threads are stopped
  if (m.state == SelfState::kFenced) {
    m.state = SelfState::kLeft;
    return Err(Code::kFenced, "fenced: the slot is left to the lock master's recovery");
  }
  if (Status st = CheckWrite(); !st.ok()) {
    m.state = SelfState::kLeft;
    return Err(Code::kFenced, "could not leave cleanly (" + st.message() +
                                  "); the slot stays mounted for recovery");
  }
  {
    std::lock_guard<std::mutex> l(m.mu);
    m.mine.state = kSlotFree;
  }
  Status st = m.WriteOwn(m.guarded.get(), true, nullptr);
  m.state = SelfState::kLeft;
  if (st.ok()) spdlog::info("left node slot {} generation {}", m.slot, m.generation);
  return st;
}

BlockDevice* Membership::guarded_device() { return impl_->guarded.get(); }

}  // namespace agorafs
