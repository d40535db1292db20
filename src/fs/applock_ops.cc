// Filesystem: application locks (flock, POSIX fcntl), cluster-wide.
//
// The table of each inode lives in its internal xattr entry applock::kXattrName (see
// applock.h for the encoding and the range rules), read under the shared gate to test
// and changed under the exclusive gate, so every node sees every lock. An entry of a
// node generation that membership positively knows is gone (LockOwnerLive) is ignored
// and pruned at the next change. Lock changes do not touch ctime or mtime.
//
// Deadlock detection: every POSIX request that waits is recorded in the root inode's
// internal xattr applock::kWaitsXattrName while it waits. A request about to wait
// follows holders to what they wait for, and the holders of that, and answers
// kDeadlock when the chain comes back to its own owner (what Linux does for local
// POSIX locks, here across nodes).
#include <algorithm>
#include <map>
#include <set>
#include <string>
#include <tuple>

#include <spdlog/spdlog.h>

#include "fs/applock.h"
#include "fs/filesystem.h"
#include "fs/fs_internal.h"
#include "fs/xattr.h"

namespace agorafs {
namespace {

// The table stored in `list` (empty if none); kCorruption names the inode.
Result<applock::Table> TableOf(const xattr::Entries& list, uint64_t ino) {
  for (const auto& e : list) {
    if (e.first != applock::kXattrName) continue;
    auto t = applock::Decode(e.second);
    if (!t.ok()) {
      return Err(Code::kCorruption, "inode " + std::to_string(ino) + ": " + t.status().message());
    }
    return std::move(t).value();
  }
  return applock::Table{};
}

Status CheckRange(const AppLock& l) {
  if (l.start > l.end) return Err(Code::kInvalid, "lock range ends before it starts");
  return Status::Ok();
}


bool SameWait(const applock::Wait& a, uint64_t ino, const AppLock& l) {
  return a.ino == ino && a.lock.SameOwner(l) && a.lock.type == l.type &&
         a.lock.start == l.start && a.lock.end == l.end;
}

// Stores `value` as the entry `name` of `list`, or removes the entry if `value` is empty.
void PutEntry(xattr::Entries* list, std::string_view name, std::string value) {
  auto it = std::find_if(list->begin(), list->end(),
                         [&](const auto& e) { return e.first == name; });
  if (value.empty()) {
    if (it != list->end()) list->erase(it);
  } else if (it != list->end()) {
    it->second = std::move(value);
  } else {
    list->emplace_back(std::string(name), std::move(value));
  }
}

// Bounds the walk of WouldDeadlock: tables read, over all chains.
constexpr size_t kMaxDeadlockSteps = 256;

}  // namespace

Result<bool> Filesystem::WouldDeadlock(MetaTxn& h, uint64_t ino, const applock::Table& t,
                                       const AppLock& want, const applock::Waits& waits) {
  auto live = [this](uint32_t s, uint64_t g) { return LockOwnerLive(s, g); };
  std::map<uint64_t, applock::Table> tables{{ino, t}};
  std::set<std::tuple<uint32_t, uint64_t, uint64_t>> seen;
  std::vector<AppLock> holders;
  for (const AppLock* c : applock::Conflicting(t, want, live)) holders.push_back(*c);
  size_t steps = 0;
  while (!holders.empty()) {
    const AppLock o = holders.back();
    holders.pop_back();
    if (o.SameOwner(want)) return true;
    if (o.kind != AppLockKind::kPosix || !seen.emplace(o.slot, o.generation, o.owner).second) {
      continue;
    }
    for (const applock::Wait& w : waits) {
      if (!w.lock.SameOwner(o)) continue;
      if (++steps > kMaxDeadlockSteps) return false;
      auto it = tables.find(w.ino);
      if (it == tables.end()) {
        // An inode deleted meanwhile (or unreadable) holds nothing anyone waits for.
        applock::Table wt;
        auto ir = RIno(h, g_, w.ino);
        if (ir.ok()) {
          auto list = xattr::List(h, w.ino, **ir);
          if (list.ok()) {
            auto tt = TableOf(*list, w.ino);
            if (tt.ok()) wt = std::move(tt).value();
          }
        }
        it = tables.emplace(w.ino, std::move(wt)).first;
      }
      for (const AppLock* c : applock::Conflicting(it->second, w.lock, live)) {
        holders.push_back(*c);
      }
    }
  }
  return false;
}

Result<Filesystem::LockWaits> Filesystem::ReadLockWaits(MetaTxn& h) {
  const uint64_t root = root_ino();
  auto rr = RIno(h, g_, root);
  if (!rr.ok()) return rr.status();
  LockWaits lw;
  AGFS_ASSIGN_OR_RETURN(lw.xattrs, xattr::List(h, root, **rr));
  for (const auto& e : lw.xattrs) {
    if (e.first != applock::kWaitsXattrName) continue;
    lw.stored = e.second;
    auto w = applock::DecodeWaits(e.second);
    if (w.ok()) {
      lw.waits = std::move(w).value();
    } else {
      // It only ever held waits in progress; the next change rewrites it.
      spdlog::error("inode {}: {}; lock waits recorded so far are forgotten", root,
                    w.status().ToString());
    }
  }
  return lw;
}

Status Filesystem::UpdateLockWaits(MetaTxn& h, LockWaits lw, uint64_t ino, const AppLock& l,
                                   bool add) {
  const uint64_t root = root_ino();
  applock::Waits next;
  for (const applock::Wait& w : lw.waits) {
    if (SameWait(w, ino, l) || !LockOwnerLive(w.lock.slot, w.lock.generation)) continue;
    next.push_back(w);
  }
  if (add) {
    if (next.size() >= applock::kMaxWaits) {
      // Deadlocks through this wait go undetected; the wait itself still works.
      spdlog::warn("inode {}: {} POSIX lock waits recorded already; this one is not",
                   ino, next.size());
    } else {
      next.push_back(applock::Wait{ino, l});
    }
  }
  std::string after = next.empty() ? "" : applock::EncodeWaits(next);
  if (after == lw.stored) return Status::Ok();  // the root inode stays clean
  PutEntry(&lw.xattrs, applock::kWaitsXattrName, std::move(after));
  auto ir = WIno(h, g_, root);
  if (!ir.ok()) return ir.status();
  Status st = xattr::Store(h, root, *ir, lw.xattrs);
  if (st.Is(Code::kNoSpace)) {
    spdlog::warn("inode {}: no room beside the root's xattrs to record a lock wait", ino);
    return Status::Ok();
  }
  return st;
}

Status Filesystem::CancelLockWait(uint64_t ino, AppLock want) {
  want.slot = member_->slot();
  want.generation = member_->generation();
  AGFS_GATE(Exclusive, ino);
  auto h = store_->Begin(false, 8);
  AGFS_ASSIGN_OR_RETURN(LockWaits lw, ReadLockWaits(*h));
  return UpdateLockWaits(*h, std::move(lw), ino, want, false);
}

bool Filesystem::LockOwnerLive(uint32_t slot, uint64_t generation) const {
  if (slot == member_->slot() && generation == member_->generation()) return true;
  PeerInfo p = member_->Peer(slot);
  // A newer generation in the slot: the old one was recovered or left first.
  if (p.generation > generation) return false;
  // Free or recovered under that very generation: it left cleanly or its journal was
  // replayed and it can never write again. Anything else (alive, not yet observed,
  // dead but not recovered, unreadable, or a generation this observer has not seen
  // yet) holds its locks.
  if (p.generation == generation &&
      (p.state == PeerState::kFree || p.state == PeerState::kRecovered)) {
    return false;
  }
  return true;
}

Result<AppLock> Filesystem::TestLock(uint64_t ino, AppLock want) {
  AGFS_RETURN_IF_ERROR(CheckRange(want));
  want.slot = member_->slot();
  want.generation = member_->generation();
  AGFS_GATE(Shared, ino);
  auto h = store_->Begin(true);
  auto ir = RIno(*h, g_, ino);
  if (!ir.ok()) return ir.status();
  AGFS_ASSIGN_OR_RETURN(xattr::Entries list, xattr::List(*h, ino, **ir));
  AGFS_ASSIGN_OR_RETURN(applock::Table t, TableOf(list, ino));
  const AppLock* c = applock::FindConflict(
      t, want, [this](uint32_t s, uint64_t g) { return LockOwnerLive(s, g); });
  if (!c) {
    AppLock none = want;
    none.type = AppLockType::kUnlock;
    return none;
  }
  AppLock out = *c;
  // A pid of another node means nothing here (the kernel would name a local process).
  if (out.slot != want.slot || out.generation != want.generation) out.pid = 0;
  return out;
}

Status Filesystem::SetLock(uint64_t ino, AppLock want, bool wait) {
  AGFS_RETURN_IF_ERROR(CheckRange(want));
  const uint32_t slot = member_->slot();
  const uint64_t gen = member_->generation();
  want.slot = slot;
  want.generation = gen;
  AGFS_GATE(Exclusive, ino);
  auto live = [this](uint32_t s, uint64_t g) { return LockOwnerLive(s, g); };
  auto h = store_->Begin(false, 16);
  auto ir = RIno(*h, g_, ino);
  if (!ir.ok()) return ir.status();
  AGFS_ASSIGN_OR_RETURN(xattr::Entries list, xattr::List(*h, ino, **ir));
  AGFS_ASSIGN_OR_RETURN(applock::Table t, TableOf(list, ino));
  // Only POSIX waits count for deadlocks (flock deadlocks are not detected on Linux
  // either).
  const bool track = wait && want.kind == AppLockKind::kPosix && want.type != AppLockType::kUnlock;
  if (const AppLock* c = applock::FindConflict(t, want, live)) {
    const std::string who = std::to_string(c->slot);
    if (track) {
      AGFS_ASSIGN_OR_RETURN(LockWaits lw, ReadLockWaits(*h));
      AGFS_ASSIGN_OR_RETURN(bool cycle, WouldDeadlock(*h, ino, t, want, lw.waits));
      AGFS_RETURN_IF_ERROR(UpdateLockWaits(*h, std::move(lw), ino, want, !cycle));
      if (cycle) {
        return Err(Code::kDeadlock, "inode " + std::to_string(ino) + ": waiting for node slot " +
                                        who + " would deadlock");
      }
    }
    return Err(Code::kAgain, "inode " + std::to_string(ino) + ": locked by node slot " + who);
  }
  // Granted (or an unlock): stores the new table; a granted wait stops waiting after.
  AGFS_RETURN_IF_ERROR(StoreLockTable(*h, ino, t, std::move(list), want));
  if (track) {
    // Read after the table was stored: when `ino` is the root, that changed its xattrs.
    AGFS_ASSIGN_OR_RETURN(LockWaits lw, ReadLockWaits(*h));
    AGFS_RETURN_IF_ERROR(UpdateLockWaits(*h, std::move(lw), ino, want, false));
  }
  return Status::Ok();
}

Status Filesystem::StoreLockTable(MetaTxn& h, uint64_t ino, const applock::Table& t,
                                  xattr::Entries list, const AppLock& want) {
  const uint32_t slot = want.slot;
  const uint64_t gen = want.generation;
  auto live = [this](uint32_t s, uint64_t g) { return LockOwnerLive(s, g); };
  applock::Table next = t;
  applock::Prune(&next, live);
  applock::Apply(&next, want);
  const bool ours = std::any_of(next.begin(), next.end(), [&](const AppLock& l) {
    return l.slot == slot && l.generation == gen;
  });
  if (next == t) {
    if (!ours) {
      std::lock_guard<std::mutex> lk(applock_mu_);
      applock_inos_.erase(ino);
    }
    return Status::Ok();
  }
  if (next.size() > applock::kMaxEntries) {
    return Err(Code::kNoLocks, "inode " + std::to_string(ino) + ": lock table full");
  }
  if (ours) {
    std::lock_guard<std::mutex> lk(applock_mu_);
    applock_inos_.insert(ino);
  }
  PutEntry(&list, applock::kXattrName, next.empty() ? "" : applock::Encode(next));
  auto w = WIno(h, g_, ino);
  if (!w.ok()) return w.status();
  Status st = xattr::Store(h, ino, *w, list);
  if (st.Is(Code::kNoSpace)) {
    return Err(Code::kNoLocks, "inode " + std::to_string(ino) +
                                   ": no room for the lock table beside the xattrs");
  }
  AGFS_RETURN_IF_ERROR(st);
  if (!ours) {
    std::lock_guard<std::mutex> lk(applock_mu_);
    applock_inos_.erase(ino);
  }
  return Status::Ok();
}

Status Filesystem::ReleaseLocks(uint64_t ino, AppLockKind kind, uint64_t owner) {
  {
    std::lock_guard<std::mutex> lk(applock_mu_);
    if (!applock_inos_.contains(ino)) return Status::Ok();
  }
  AppLock all;
  all.kind = kind;
  all.type = AppLockType::kUnlock;
  all.start = 0;
  all.end = applock::kToEof;
  all.owner = owner;
  return SetLock(ino, all);
}

}  // namespace agorafs
