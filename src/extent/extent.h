// File block map: a B+tree of extents rooted in InodeBlock::data.
//
// Layout (format.h, "Extents")
// - The root lives in InodeBlock::data: ExtentNodeHeader followed by entries, Extent
//   when depth == 0, ExtentIndex otherwise (kExtentRootLeafMax / kExtentRootIndexMax).
// - Every other node is a kExtentNode block: BlockHeader, ExtentNodeHeader, entries
//   (kExtentNodeLeafMax / kExtentNodeIndexMax). Every leaf is at the same depth.
// - Extents are sorted by logical block and never overlap; each has len >= 1 and a
//   non-zero physical block. ExtentIndex.logical is the smallest logical block under
//   its child; this code keeps it exact, and accepts on read any key that is <= every
//   logical block under the child and > every logical block under the previous child
//   (so a first key of 0 is valid). Non-root nodes are never empty.
// - Logical blocks lie in [0, kMaxFileBlocks). kExtentUnwritten marks blocks that are
//   allocated but read as zeros (fallocate, or written but not yet marked written).
// - When the root overflows, its entries move into a new node and the root becomes an
//   index one level higher (ext4 style). A full non-root node splits in two. A node
//   that becomes empty is freed; Punch collapses the height when the root's only
//   child fits back into the root. Nodes are not merged with siblings.
// - ino->blocks counts data blocks plus extent node blocks: every call here keeps it
//   up to date.
//
// Validation: every node is checked when read: header depth (<= kMaxDepth, and one
// less than its parent), max, owner, count (1..max, root 0 only as a leaf), entries
// sorted, non-overlapping and inside the key range their parent gives them, lengths
// and physical blocks non-zero, no arithmetic overflow. Failures are kCorruption
// naming the inode and the block ("inode 12: extent node 345: ..."; the root is named
// "inode 12: extent root: ..."). Nothing here crashes on corrupt input.
//
// Ownership and blocks touched
// - `ino` is the caller's copy of the inode block (normally the pointer txn.Write gave
//   for it); the mutating calls change its data area and `blocks` field in place, and
//   the caller is responsible for having it dirty in `txn`.
// - Extent node blocks are read, written, allocated (txn.NewBlock, hint = ino_nr) and
//   freed under InodeLock(ino_nr). Data blocks come from txn.AllocData and go back
//   through txn.Free.
// - Let D be the root's depth (0..kMaxDepth). One "tree update" (one leaf changed)
//   dirties the inode, at most D existing nodes (the path from the root's child to
//   the leaf) and at most D + 1 new nodes (one split per level plus a new root
//   level; NewBlock calls): at most 2*D + 2 <= kMaxDirtyPerUpdate (12) journaled
//   tree blocks. It frees (txn.Free, one block each) at most 2*D node blocks: nodes
//   that became empty and, in PunchStep, nodes collapsed into the root. Allocator
//   metadata (bitmap/AG blocks) touched by NewBlock/AllocData/Free comes on top.
//   Per call:
//     Lookup, NextData, ForEach   read only.
//     MapOrAllocate               one tree update + one AllocData.
//     MarkWritten                 one tree update per leaf the range overlaps (one
//                                 when the range lies inside one extent, e.g. a
//                                 Mapping returned by MapOrAllocate).
//     PunchStep                   reads at most one leaf beyond lblk's; one tree
//                                 update (a single leaf) + at most
//                                 budget.max_extents Free calls of at most
//                                 budget.max_blocks data blocks in total.
//     Punch                       unbounded: loops PunchStep over the whole range.
//
// Success and failure
// - kInvalid: the inode does not hold an extent tree, or a bad argument.
// - kTooBig: a logical block at or beyond kMaxFileBlocks.
// - kCorruption: a node failed validation (see above) or the MetaTxn said so.
// - kNoSpace: no data or node block could be allocated, or the tree would need more
//   than kMaxDepth levels. MapOrAllocate, MarkWritten and PunchStep leave the tree,
//   the inode and the allocations exactly as they were when they fail this way
//   (blocks they allocated are freed again), except that MarkWritten may have
//   finished earlier leaves of a multi-leaf range.
// - Any other error (kIOError, kReadOnly, ...) from the MetaTxn is passed through;
//   one returned after a node was changed means the transaction must be aborted.
//
// Thread-safety: none of its own. Callers serialise all calls for one inode (they
// hold the inode's lock and the filesystem's per-inode mutex); calls for different
// inodes are independent.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <vector>

#include "cache/meta_txn.h"
#include "format/format.h"
#include "util/status.h"

namespace agorafs::extent {

// Deepest root allowed (levels below the root).
inline constexpr uint16_t kMaxDepth = 5;
// Logical blocks are < kMaxFileBlocks: 2^51 blocks of 4 KiB = 2^63 bytes (off_t).
inline constexpr uint64_t kMaxFileBlocks = 1ull << 51;
// Tree blocks (inode included) one tree update may dirty: the inode, the path below
// the root, and one new node per level plus one for a new root level.
inline constexpr uint32_t kMaxDirtyPerUpdate = 2 * kMaxDepth + 2;
// Node blocks one tree update may free.
inline constexpr uint32_t kMaxNodeFreesPerUpdate = 2 * kMaxDepth;

// A run of file blocks starting at `logical`. physical == 0: a hole of `len` blocks
// (len is capped to the next extent, to kMaxFileBlocks and to UINT32_MAX).
struct Mapping {
  uint64_t logical = 0;
  uint64_t physical = 0;
  uint32_t len = 0;
  uint32_t flags = 0;  // ExtentFlags; 0 for holes
  bool hole() const { return physical == 0; }
};

struct MapResult {
  Mapping m;
  bool fresh = false;  // blocks were allocated by this call (their contents are garbage)
};

// Limits for one PunchStep. Both must be >= 1.
struct PunchBudget {
  uint64_t max_blocks = UINT64_MAX;   // data blocks freed
  uint32_t max_extents = UINT32_MAX;  // txn.Free calls for data (extent pieces)
};

// Empty tree in ino->data (depth 0, no extents), data_kind = kExtents. The owner field
// is ino->hdr.blocknr (the inode number), so call it after the header is set. Does
// not touch ino->blocks.
void InitRoot(InodeBlock* ino);

// The mapping at `lblk`, starting at lblk: the rest of the extent holding it, or the
// hole up to the next extent. Reads the path from root to one leaf, and the next leaf
// when lblk lies after the last extent of its leaf.
Result<Mapping> Lookup(MetaTxn& txn, uint64_t ino_nr, const InodeBlock& ino, uint64_t lblk);

// Maps lblk. If it is mapped, returns that mapping (from lblk to the end of its
// extent, possibly longer than count; unwritten flag as stored) with fresh = false.
// Otherwise allocates 1..count blocks (never beyond the hole at lblk) with
// txn.AllocData, hinted to continue the previous extent physically (else the next
// one, else `goal`), inserts the extent (kExtentUnwritten when `unwritten`), merged
// with physically contiguous neighbours of equal flags, adds its length to
// ino->blocks and returns it with fresh = true. count >= 1.
Result<MapResult> MapOrAllocate(MetaTxn& txn, uint64_t ino_nr, InodeBlock* ino, uint64_t lblk,
                                uint32_t count, bool unwritten, uint64_t goal);

// Clears kExtentUnwritten over [lblk, lblk+count), splitting extents at the range's
// edges and merging contiguous written neighbours. Holes in the range are ignored.
Status MarkWritten(MetaTxn& txn, uint64_t ino_nr, InodeBlock* ino, uint64_t lblk, uint64_t count);

// Unmaps a prefix of [lblk, lblk+count) (count may be UINT64_MAX: to the end),
// changing a single leaf and staying within `budget`: frees the data blocks, splits
// partial extents, frees nodes that become empty, collapses the height when it can,
// and subtracts what it freed from ino->blocks. Returns `done`: everything in
// [lblk, done) is unmapped. The range is finished exactly when done == end, where
// end = min(lblk+count, kMaxFileBlocks) (kMaxFileBlocks when count is UINT64_MAX).
// A call that returns done < end has freed at least one block, so a caller may
// either continue from `done` or call again with the same lblk (each call then
// frees something until the range is empty). To split a giant truncate across
// transactions, call it once (or a few times) per transaction until done == end.
Result<uint64_t> PunchStep(MetaTxn& txn, uint64_t ino_nr, InodeBlock* ino, uint64_t lblk,
                           uint64_t count, const PunchBudget& budget);

// PunchStep until the whole range is unmapped, all in `txn`.
Status Punch(MetaTxn& txn, uint64_t ino_nr, InodeBlock* ino, uint64_t lblk, uint64_t count);

// Calls fn on every extent in logical order until it returns false. Validates every
// node it reads. If `nodes` is given, appends the block number of every tree node
// visited (every node when fn never stops it), for fsck's block accounting.
Status ForEach(MetaTxn& txn, uint64_t ino_nr, const InodeBlock& ino,
               const std::function<bool(const Extent&)>& fn,
               std::vector<uint64_t>* nodes = nullptr);

// The first mapped block at or after lblk, as a Mapping from there to its extent's
// end (nullopt when there is none). With skip_unwritten, unwritten extents count as
// holes (lseek SEEK_DATA). Reads leaves in order until it finds one.
Result<std::optional<Mapping>> NextData(MetaTxn& txn, uint64_t ino_nr, const InodeBlock& ino,
                                        uint64_t lblk, bool skip_unwritten = false);

// The root's depth (0 = the root is the only leaf); 0 when the root is not an extent
// tree. For tests and statistics.
uint16_t Depth(const InodeBlock& ino);

}  // namespace agorafs::extent
