// Helpers shared by the filesystem core's source files (not a public API).
#pragma once

#include "cache/meta_txn.h"
#include "format/format.h"
#include "fs/filesystem.h"

namespace agorafs {

Attr AttrOf(uint64_t ino, const InodeBlock& i);
bool ValidIno(const Geometry& g, uint64_t ino);
// The inode block, verified; kNotFound when ino is not a possible inode number.
Result<const InodeBlock*> RIno(MetaTxn& h, const Geometry& g, uint64_t ino);
Result<InodeBlock*> WIno(MetaTxn& h, const Geometry& g, uint64_t ino);

inline constexpr uint32_t kMaxLinks = 65000;
inline constexpr uint64_t kMaxFileSize = (1ull << 51) * kBlockSize - 1;

// kNameTooLong / kInvalid for names no directory may hold.
Status CheckName(std::string_view name);

inline const Status& StatusOf(const Status& s) { return s; }
template <typename T>
const Status& StatusOf(const Result<T>& r) { return r.status(); }

// Runs f; if it ran out of space while freed blocks were waiting for a checkpoint,
// checkpoints (MetaStore::Reclaim) and runs it once more. f must be safe to repeat
// after a kNoSpace (it changed nothing, or only things a second run reuses).
template <typename F>
auto RetryOnNoSpace(MetaStore* store, F f) -> decltype(f()) {
  auto r = f();
  if (!StatusOf(r).Is(Code::kNoSpace)) return r;
  auto reclaimed = store->Reclaim();
  if (!reclaimed.ok() || !*reclaimed) return r;
  return f();
}

}  // namespace agorafs
