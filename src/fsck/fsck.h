// fsck: checks every invariant of an agorafs filesystem and repairs with --repair.
//
// What it checks (each finding names the object and block):
// - superblock copies agree; node slots and orphan lists are valid; journals: a slot
//   left mounted by a crashed node, or a journal holding unreplayed transactions.
// - every reachable inode: checksum/header, mode/kind consistency, link count against
//   the directory entries that name it, size against data, `blocks` against what it
//   owns; extent trees (extent::ForEach) and directories (dir::Check); xattr blocks.
// - block accounting: every block owned by exactly one object; bitmaps and AG free
//   counts match the blocks actually owned (leaks and double use both reported).
// - directory tree: "." / ".." parents, no directory reachable twice, no cycles.
// Refuses to run while a live node has the device mounted (its heartbeat moves).
//
// Repair (--repair): replays pending journals, rewrites in place the blocks that
// cannot be read at all (superblock copies, slot heartbeats, orphan-list blocks, AG
// headers and bitmaps, the root inode: the cache refuses to load them), then fixes
// everything else through the journal (MetaStore): bitmaps and AG counts rebuilt
// from what is owned, link counts, `blocks` and parents corrected, entries pointing
// at damaged or free inodes removed, damaged directories rebuilt from the entries
// that can still be read, damaged extent trees rebuilt from the extents that can,
// blocks used twice or written past the end dropped from the later owner,
// unfinished truncations and unlinked orphans finished, unreachable inodes attached
// to /lost+found (created in the root, mode 0700) as "#<ino>". The report lists
// what was lost.
//
// Exit codes follow fsck(8): 0 clean, 1 errors corrected, 4 errors left uncorrected,
// 8 operational error (Result error).
//
// Problem kinds (FsckProblem::kind): bad-super, bad-slot, journal-needs-replay,
// bad-journal, bad-orphan-list, orphan, bad-root, bad-checksum, bad-inode, bad-size,
// bad-inline, bad-xattr, bad-extent, bad-dir, bad-dirent-type, bad-flags,
// dangling-entry, dir-hardlink, unreachable, nlink, blocks-count, bad-parent,
// double-use, bitmap-leak, bitmap-missing, ag-count, bad-ag; repair-failed when a fix
// could not be applied. For entry problems `ino` is the directory and `block` the
// inode the entry names. Runs of bitmap bits are reported as one problem.
// An inode with nlink 0 is free when its bitmap bit is clear and no orphan list
// names it (entries naming it are stale); with its bit set it is in use and its link
// count is what is wrong.
//
// Read-only check: nothing is written; journals that still hold committed
// transactions are applied in memory (an overlay), so the check sees the filesystem
// as the next mount would after replaying them.
//
// Repair runs in rounds until a check finds nothing (at most a few): a round with
// structural problems only ever sets bitmap bits (never clears one while something
// might still point at the block) and fixes inodes and directories; blocks it drops
// are returned to the bitmaps by the next round. While repairing, fsck holds node
// slot 0 as mounted (host "fsck"), so an interrupted repair is replayed by the next
// mount or fsck; an interrupted repair may leave work that the next
// `fsck --repair` finishes.
//
// Thread-safety: runs single-threaded on a device nobody else writes.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "device/block_device.h"
#include "util/status.h"

namespace agorafs {

struct FsckOptions {
  bool repair = false;
  size_t max_problems = 10000;  // stop listing (not checking) after this many
  // Heartbeat interval used to decide whether a slot marked mounted is alive (its
  // counter is re-read after 2 * interval + 200 ms). 0: the superblock's value.
  uint32_t heartbeat_ms_override = 0;
};

struct FsckProblem {
  std::string kind;     // short machine-readable tag, e.g. "bitmap-leak", "bad-checksum"
  uint64_t block = 0;   // the block concerned, 0 when none
  uint64_t ino = 0;     // the inode concerned, 0 when none
  std::string detail;   // one human sentence
  bool repaired = false;
};

struct FsckReport {
  std::vector<FsckProblem> problems;
  // Problems found beyond max_problems (not listed), and how many of those are not
  // repaired.
  uint64_t problems_omitted = 0, omitted_unrepaired = 0;
  uint64_t inodes = 0, directories = 0, files = 0, symlinks = 0, other = 0;
  uint64_t data_blocks_used = 0, metadata_blocks_used = 0, free_blocks = 0;
  uint64_t journal_transactions_replayed = 0;
  std::string ToText() const;
  std::string ToJson() const;
  int ExitCode() const;  // 0, 1 or 4 as above
};

Result<FsckReport> Fsck(BlockDevice* dev, const FsckOptions& opts);

// The liveness check fsck makes before anything else, for other offline tools: when a
// node slot is marked mounted, waits 2 heartbeat intervals + 200 ms (interval from
// the superblock unless overridden) and fails with kBusy, naming the host and `tool`,
// if its heartbeat moved. Crashed nodes (a still counter) do not count. Never writes.
Status CheckNoLiveNode(BlockDevice* dev, uint32_t heartbeat_ms_override, const char* tool);

}  // namespace agorafs
