// Directories: name -> (inode, type) maps stored in a directory inode.
//
// Layout (format.h, "Directories")
// - Entry encoding, inline and in leaves: u64 hash | u64 ino | u8 type | u8 name_len |
//   name bytes (kDirEntryFixed + name_len bytes, packed, no padding). Entries of one
//   area are kept sorted by (hash, name bytes), with no duplicate names.
// - hash = NameHash(inode.hash_seed, name): XXH3-64 >> 1, raised to kMinDirHash. It is
//   also the entry's readdir cookie, so cookies are stable for the life of an entry
//   and never move when the directory is reorganised.
// - Inline (data_kind kInline): the entries are packed from InodeBlock::data[0]; the
//   bytes after the last one are zero. InodeBlock::size is the entry count, which is
//   what tells where the packed entries end.
// - Hashed (data_kind kDirHash): InodeBlock::data holds a DirRoot followed by the
//   block numbers of TablesFor(global_depth) DirTable blocks (the rest zero). The
//   table has 2^global_depth slots (slot i lives in table block i / kDirTableSlots);
//   unused slots of the last table block are 0. A hash uses slot
//   hash >> (63 - global_depth) (slot 0 when global_depth is 0). Each slot names the
//   primary DirLeaf for its range. A leaf with local_depth d <= global_depth and
//   `prefix` p covers exactly the hashes whose top d bits (of 63) equal p, and all
//   2^(global_depth - d) slots of that range name it.
// - Overflow chains: a leaf's `next` links further DirLeaf blocks with the same
//   dir_ino, prefix and local_depth. A chain is started only when a full leaf cannot
//   be split usefully: its entries and the new one share the top kDirMaxDepth hash
//   bits (63-bit collisions, or many names in one 2^-16 slice of the hash space), so
//   no split could separate them; splitting a chained leaf may leave a chained half.
//   A chain can thus sit at any local depth. Each chain block is sorted on its own;
//   a name appears in at most one block of the chain.
// - Growth: a name goes into the first block of its leaf's chain with room. A full
//   leaf that can be split is split by its next hash bit (local_depth + 1): the
//   lower half keeps the block, the upper half gets a new leaf; when local_depth ==
//   global_depth the table is doubled first (every slot i becomes slots 2i, 2i+1).
//   Inline directories become hashed (global_depth 0, one table block, one leaf)
//   when the next entry does not fit in kInodeDataSize bytes.
// - Shrinking: a chain block that becomes empty is unlinked and freed (an emptied
//   primary takes over its successor's entries). A primary leaf without a chain that
//   becomes empty is merged into its buddy (the leaf at the same depth whose prefix
//   differs in the last bit) when the buddy has the same depth and no chain; this
//   repeats while the merged leaf is empty. The table is never halved and a hashed
//   directory never goes back to inline except through FreeAll.
// - Counters: InodeBlock::size is the number of live entries ("." and ".." are not
//   stored and not counted); for hashed directories DirRoot::entries holds the same
//   number and DirRoot::leaves counts every DirLeaf block (chain blocks included).
//   InodeBlock::blocks grows and shrinks by every table and leaf block allocated or
//   freed here. All are kept exact by every call.
//
// Ownership, locks and blocks touched
// - `d` is the caller's copy of the directory inode block (normally the pointer
//   txn.Write gave for it). Mutating calls change d->data, d->size, d->blocks and
//   d->data_kind in place; the caller keeps it dirty in `txn`. d->hash_seed must be
//   set before the first Add and never changed while the directory has entries.
// - DirTable blocks: read/written/allocated (NewBlock hint dir_ino) under
//   InodeLock(dir_ino). Every block of a leaf chain: under LeafLock(primary block).
//   A new primary leaf is allocated with NewBlock(kDirLeaf, SelfLock(kDirLeaf), hint):
//   its own LeafLock, as its number is not known before allocation. Hints: dir_ino
//   for table blocks and the first leaf, the leaf being split or extended otherwise.
// - Per call (T = table blocks = 2^global_depth / kDirTableSlots rounded up; it only
//   exceeds 1 from global depth 9 on, and is at most 256):
//     Lookup, Empty, List, Check, LeafOf   read only. Lookup reads one table block
//                  and the name's leaf (its whole chain only if it overflowed).
//     Add (inline, fits)        only *d.
//     Add (hashed, leaf room)   reads one table block and the leaf chain, writes ONE
//                  leaf block (the chain block that gets the entry); in *d only
//                  size and DirRoot::entries change.
//     Add (split)               + the leaf's chain, one new leaf (+ chain blocks if a
//                  half still overflows), the table blocks of the new leaf's range;
//                  when the leaf was at global depth the table doubles first: all T
//                  blocks rewritten and T more allocated. Splitting repeats while the
//                  name's leaf is still full, at most kDirMaxDepth times (with random
//                  hashes almost always once). Journal budget for one Add: at most
//                  256 table blocks + kDirMaxDepth + 2 leaves + chain blocks; a
//                  doubling from global depth g costs 2^(g+1)/256 table blocks (64 at
//                  g = 13, the depth reached near 500k short names).
//     Add (chain)               + one new chain block and the previous chain block.
//     Add (inline -> hashed)    allocates one table block and one leaf.
//     Remove                    the leaf (chain) block holding the name; when a chain
//                  block empties, its predecessor (or the primary takes over its
//                  successor); when a primary leaf empties, its buddy leaf and the
//                  table blocks of its range (merge; repeats at most kDirMaxDepth
//                  times).
//     Replace                   only the block holding the name (or *d inline).
//     FreeAll                   reads everything, then frees every table and leaf
//                  block.
//
// Thread-safety: none inside. The caller serialises calls on one directory and holds
// the locks named above (exclusively for the blocks a call writes).
//
// Success and failure
// - kNotFound: the name is not there (Lookup/Remove/Replace).
// - kExists: Add of a name already there.
// - kNameTooLong: a name longer than kMaxNameLen (255) bytes.
// - kInvalid: an empty name, one containing '/' or NUL, "." or "..", ino 0, or the
//   inode is not a directory layout this code knows.
// - kNoSpace: no block could be allocated. Every Add step (inline conversion, table
//   doubling, leaf split, chain append) allocates everything it needs before it
//   changes anything, so a failing Add leaves a valid directory (possibly with a
//   doubled table or a split leaf) and the name not added.
// - kCorruption: a block failed MetaTxn verification, or a header, count, length,
//   order or table slot read from disk is inconsistent. Every length and count read
//   from disk is bounds-checked; messages name the directory and the block:
//   "dir 12: leaf 3456: entry runs past the used bytes", "dir 12: inline: ...",
//   "dir 12: root: ...", "dir 12: table 789: ...".
// - Any other status comes from the MetaTxn (kIOError, kReadOnly, ...).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "cache/meta_txn.h"
#include "format/format.h"
#include "util/status.h"

namespace agorafs::dir {

struct Entry {
  std::string name;
  uint64_t ino = 0;
  uint8_t type = 0;     // DT_*
  uint64_t cookie = 0;  // the name hash: >= kMinDirHash, <= kMaxCookie
};

inline constexpr uint64_t kMaxCookie = (uint64_t(1) << 63) - 1;

// The entry hash (and readdir cookie) of `name` in a directory with `seed`.
uint64_t NameHash(uint64_t seed, std::string_view name);

// OK, kInvalid (empty, '/', NUL, "." or "..") or kNameTooLong.
Status ValidateName(std::string_view name);

// An empty inline directory: data_kind = kInline, data zeroed, size = 0. Leaves
// hash_seed and blocks alone.
void InitEmpty(InodeBlock* d);

// The entry for `name`. kNotFound if absent; kInvalid/kNameTooLong for bad names.
Result<Entry> Lookup(MetaTxn& txn, uint64_t dir_ino, const InodeBlock& d, std::string_view name);

// Adds name -> (ino, type). kExists if the name is there.
Status Add(MetaTxn& txn, uint64_t dir_ino, InodeBlock* d, std::string_view name, uint64_t ino,
           uint8_t type);

// Removes `name`. kNotFound if absent.
Status Remove(MetaTxn& txn, uint64_t dir_ino, InodeBlock* d, std::string_view name);

// Points an existing `name` at (ino, type) in place (rename over an existing name).
// kNotFound if absent.
Status Replace(MetaTxn& txn, uint64_t dir_ino, InodeBlock* d, std::string_view name, uint64_t ino,
               uint8_t type);

// True when the directory has no entries (from the counters; O(1)).
Result<bool> Empty(MetaTxn& txn, uint64_t dir_ino, const InodeBlock& d);

// Calls fn for each entry with cookie > after, in cookie order, until fn returns
// false (that entry is not consumed) or the entries run out; OK either way.
// Entries sharing one cookie (a group) are delivered consecutively in one call and
// are consumed all or none: when fn refuses a member of a group after accepting
// earlier members of it in this call, those members count as not delivered too -
// the caller must drop them (they carry the refused entry's cookie) and resume
// with `after` = the cookie before the group. (Groups need a 63-bit hash collision.)
// Resuming from any cookie returned by an earlier call delivers every entry that
// existed during the whole listing exactly once, whatever was added or removed in
// between (cookies are hashes and never move).
Status List(MetaTxn& txn, uint64_t dir_ino, const InodeBlock& d, uint64_t after,
            const std::function<bool(const Entry&)>& fn);

// Frees every table and leaf block (rmdir; the caller checked Empty) and turns `d`
// into an empty inline directory. Reads the whole structure before freeing
// anything: on kCorruption nothing was freed.
Status FreeAll(MetaTxn& txn, uint64_t dir_ino, InodeBlock* d);

// For fsck: walks the whole structure, appends one line per problem to `problems`
// (unreadable or bad-checksum blocks, bad headers, lengths, counts, unsorted or
// duplicate names, hashes that do not match names, entries in the wrong leaf,
// table slots inconsistent with local depths, counter mismatches, chain loops) and
// calls fn for every entry that passed all checks. OK when nothing was found,
// otherwise kCorruption naming the first problem. Never changes anything.
Status Check(MetaTxn& txn, uint64_t dir_ino, const InodeBlock& d,
             std::vector<std::string>* problems, const std::function<void(const Entry&)>& fn);

// Diagnostics (tests, tools) --------------------------------------------------------

struct Shape {
  bool hashed = false;
  uint32_t global_depth = 0;
  uint32_t table_blocks = 0;
  uint64_t entries = 0;
  uint64_t leaves = 0;  // leaf blocks, chain blocks included
};
// From the inode alone; no validation.
Shape ShapeOf(const InodeBlock& d);

// The primary leaf block that covers `name` (0 for an inline directory).
Result<uint64_t> LeafOf(MetaTxn& txn, uint64_t dir_ino, const InodeBlock& d, std::string_view name);

// Test hook: when set, fn's result replaces the XXH3-64 value inside NameHash (it is
// still shifted right by one and raised to kMinDirHash). Returns the previous hook;
// nullptr restores XXH3. Not thread-safe; for unit tests only.
using HashFn = uint64_t (*)(uint64_t seed, std::string_view name);
HashFn SetHashFnForTesting(HashFn fn);

}  // namespace agorafs::dir
