// Application locks (flock and POSIX fcntl byte-range locks), cluster-wide: the
// per-inode lock table, its on-disk encoding and the range arithmetic.
//
// Contract
// - The table of an inode is stored in an internal xattr entry named kXattrName
//   ("agorafs.locks", no user-reachable namespace: set/get refuse it, list hides it),
//   so every node reads the same table under the filesystem lock. Encoding
//   (docs/FORMAT.md "Application lock table"): u8 version (1), u8 reserved (0),
//   u16 count, then count fixed 48-byte little-endian entries. Decode() validates
//   everything (version, size, kinds, types, start <= end) and answers kCorruption
//   naming what is wrong; it never crashes on any input.
// - An entry's owner is (kind, slot, generation, owner): the node slot and generation
//   of the node that took it and the kernel's lock_owner id on that node. Two entries
//   conflict when they have the same kind, different owners, overlapping ranges and
//   at least one is a write lock. flock and POSIX locks never conflict (as on Linux).
// - Apply() changes one owner's entries as Linux does: a POSIX lock replaces the
//   owner's overlapping ranges (upgrade, downgrade, split), an unlock of a middle range
//   splits, adjacent or overlapping ranges of one type merge; a flock replaces the
//   owner's flock entry (LOCK_SH <-> LOCK_EX converts in one step). It does not check
//   conflicts: callers call FindConflict first.
// - Liveness is the caller's: `live(slot, generation)` must answer false only when the
//   node generation is POSITIVELY gone (slot free or recovered under that generation,
//   or the slot runs a newer generation); entries of live owners are never ignored.
// - Ranges are inclusive; end == kToEof means "to the end of any file".
// - Waits (deadlock detection, docs/DESIGN.md "Application locks"): the POSIX
//   requests that wait right now, cluster-wide, are one internal xattr entry
//   kWaitsXattrName on the root inode: the same header, then count 56-byte entries
//   (a 48-byte entry naming the waiting owner and the range and type it wants, then
//   the u64 inode). DecodeWaits() validates like Decode() and also refuses flock
//   entries and inode 0. At most kMaxWaits entries.
// Thread-safety: pure functions on values.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "util/status.h"

namespace agorafs {

enum class AppLockKind : uint8_t { kPosix = 1, kFlock = 2 };
enum class AppLockType : uint8_t { kUnlock = 0, kRead = 1, kWrite = 2 };

struct AppLock {
  AppLockKind kind = AppLockKind::kPosix;
  AppLockType type = AppLockType::kUnlock;
  uint64_t start = 0;
  uint64_t end = 0;         // inclusive; kToEof = to the end of any file
  uint32_t slot = 0;        // node slot of the owner
  uint64_t generation = 0;  // node generation of the owner
  uint64_t owner = 0;       // the kernel's lock_owner on that node
  uint32_t pid = 0;         // the holder's pid on its node (informational)

  bool SameOwner(const AppLock& o) const {
    return kind == o.kind && slot == o.slot && generation == o.generation && owner == o.owner;
  }
  bool operator==(const AppLock&) const = default;
};

namespace applock {

inline constexpr uint64_t kToEof = UINT64_MAX;
inline constexpr std::string_view kXattrName = "agorafs.locks";
inline constexpr uint8_t kVersion = 1;
inline constexpr size_t kHeaderSize = 4;
inline constexpr size_t kEntrySize = 48;
// At most this many entries per inode (ENOLCK beyond); 4 + 64 * 48 = 3076 bytes,
// which leaves room for user xattrs in the inode's xattr space.
inline constexpr size_t kMaxEntries = 64;

using Table = std::vector<AppLock>;
using LiveFn = std::function<bool(uint32_t slot, uint64_t generation)>;

inline constexpr std::string_view kWaitsXattrName = "agorafs.lockwaits";
inline constexpr size_t kWaitEntrySize = kEntrySize + 8;
// 4 + 48 * 56 = 2692 bytes on the root inode.
inline constexpr size_t kMaxWaits = 48;

// A POSIX request that waits: `lock` (its owner, range and type) on inode `ino`.
struct Wait {
  uint64_t ino = 0;
  AppLock lock;
  bool operator==(const Wait&) const = default;
};
using Waits = std::vector<Wait>;

inline bool IsInternalXattr(std::string_view name) {
  return name == kXattrName || name == kWaitsXattrName;
}

std::string Encode(const Table& t);
Result<Table> Decode(std::string_view bytes);
std::string EncodeWaits(const Waits& w);
Result<Waits> DecodeWaits(std::string_view bytes);
// kCorruption when `name` is an internal xattr whose value does not decode.
Status CheckInternalXattr(std::string_view name, std::string_view value);

bool Overlaps(const AppLock& a, const AppLock& b);
bool Conflicts(const AppLock& held, const AppLock& want);
// Every live entry that conflicts with `want`, in table order.
std::vector<const AppLock*> Conflicting(const Table& t, const AppLock& want, const LiveFn& live);
// The first live entry that conflicts with `want` (in table order), or nullptr.
const AppLock* FindConflict(const Table& t, const AppLock& want, const LiveFn& live);
// Removes the entries whose owner is gone; returns how many.
size_t Prune(Table* t, const LiveFn& live);
// Sets (type read/write) or unlocks (type kUnlock) `want` for its owner.
void Apply(Table* t, const AppLock& want);
// Drops every entry of (kind, slot, generation, owner); returns how many.
size_t ReleaseOwner(Table* t, AppLockKind kind, uint32_t slot, uint64_t generation,
                    uint64_t owner);

}  // namespace applock
}  // namespace agorafs
