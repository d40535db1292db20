// LockManager: which metadata this node may cache and change.
//
// Every cached metadata block belongs to exactly one lock (format.h LockKind). A node
// may cache or change a block only while it holds that block's lock: shared to read,
// exclusive to write. When another node needs a lock, the manager calls the revoke
// callback; the callback commits the journal, writes the covered blocks home, drops
// them from the cache (MetaStore::DropLock) and only then is the lock released or
// downgraded.
//
// This header is the seam the cluster lock manager (issue "cluster core") plugs into.
// LocalLockManager is the single-node implementation: a node that is alone on the
// device holds every lock forever, so Acquire never waits and nothing is revoked
// unless a test calls Revoke().
//
// Thread-safety: all methods may be called from any thread.
#pragma once

#include <functional>
#include <mutex>

#include "format/format.h"
#include "util/status.h"

namespace agorafs {

// Modes of a lock. kShared and kExclusive are the usual read and write modes.
// kIntent is held by nodes whose operations also take finer locks under this one
// (docs/DESIGN.md "Next: finer locks"): intent holders share the lock with each other, but
// not with shared or exclusive holders. So the modes are not ordered: exclusive covers
// every mode, while shared and intent do not cover each other. Use Covers, Join and
// Meet, never <, >, or max. (The values are on disk in lock messages.)
enum class LockMode : uint8_t { kNone = 0, kShared = 1, kExclusive = 2, kIntent = 3 };

// Whether a mode byte read from the device is a LockMode.
constexpr bool IsLockMode(uint8_t m) { return m <= uint8_t(LockMode::kIntent); }

// Whether holding `held` allows what `want` allows.
constexpr bool Covers(LockMode held, LockMode want) {
  return want == LockMode::kNone || held == want || held == LockMode::kExclusive;
}
// Whether two nodes may hold `a` and `b` at once.
constexpr bool Compatible(LockMode a, LockMode b) {
  if (a == LockMode::kNone || b == LockMode::kNone) return true;
  return a == b && a != LockMode::kExclusive;
}
// The weakest mode that covers both (shared and intent together: exclusive).
constexpr LockMode Join(LockMode a, LockMode b) {
  if (Covers(a, b)) return a;
  if (Covers(b, a)) return b;
  return LockMode::kExclusive;
}
// The strongest mode both cover (shared and intent: none).
constexpr LockMode Meet(LockMode a, LockMode b) {
  if (Covers(a, b)) return b;
  if (Covers(b, a)) return a;
  return LockMode::kNone;
}
// What a holder of `held` may keep beside another node's request for `want`: the
// strongest mode `held` covers that is compatible with `want`.
constexpr LockMode KeepBeside(LockMode held, LockMode want) {
  if (Compatible(held, want)) return held;
  if (held == LockMode::kExclusive && want != LockMode::kExclusive) return want;
  return LockMode::kNone;
}
constexpr const char* LockModeName(LockMode m) {
  switch (m) {
    case LockMode::kNone:
      return "none";
    case LockMode::kShared:
      return "shared";
    case LockMode::kExclusive:
      return "exclusive";
    case LockMode::kIntent:
      return "intent";
  }
  return "?";
}

class LockManager {
 public:
  // Called with the lock and the mode the holder must go down to (kNone, kShared or
  // kIntent; always one the held mode covers).
  // The callback must flush and drop everything the lock covers before returning.
  using RevokeFn = std::function<Status(LockId, LockMode)>;

  virtual ~LockManager() = default;
  // Returns once this node holds `id` in a mode that covers `mode`. kTimedOut /
  // kFenced on failure.
  virtual Status Acquire(LockId id, LockMode mode) = 0;
  virtual LockMode Held(LockId id) const = 0;
  virtual void SetRevokeCallback(RevokeFn fn) = 0;
};

class LocalLockManager : public LockManager {
 public:
  Status Acquire(LockId, LockMode) override { return Status::Ok(); }
  LockMode Held(LockId) const override { return LockMode::kExclusive; }
  void SetRevokeCallback(RevokeFn fn) override {
    std::lock_guard<std::mutex> g(mu_);
    revoke_ = std::move(fn);
  }
  // Simulates another node asking for `id`: runs the revoke callback.
  Status Revoke(LockId id, LockMode to) {
    RevokeFn fn;
    {
      std::lock_guard<std::mutex> g(mu_);
      fn = revoke_;
    }
    return fn ? fn(id, to) : Status::Ok();
  }

 private:
  std::mutex mu_;
  RevokeFn revoke_;
};

}  // namespace agorafs
