// Extended attribute storage codec (format.h "Xattrs"): the inode's inline area, then
// one external XattrBlock under the inode's lock.
//
// List() parses and validates both areas (lengths in bounds, non-empty names, no name
// twice) and returns every (name, value) pair in storage order; kCorruption names the
// area. Store() packs a list back: inline first, the rest into the external block
// (allocated or freed as needed, ino->blocks kept exact); kNoSpace when it cannot fit,
// with nothing changed.
// Thread-safety: none; callers hold the inode's lock and a MetaTxn handle.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "cache/meta_txn.h"
#include "format/format.h"

namespace agorafs::xattr {

using Entries = std::vector<std::pair<std::string, std::string>>;

Result<Entries> List(MetaTxn& h, uint64_t ino, const InodeBlock& I);
Status Store(MetaTxn& h, uint64_t ino, InodeBlock* I, const Entries& list);

}  // namespace agorafs::xattr
