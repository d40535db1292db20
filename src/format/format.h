// On-disk format v1 of agorafs: constants and block layouts.
//
// docs/FORMAT.md is the prose specification with byte tables; this header is its
// single source of constants. Every structure here is little-endian, packed, and
// checked with static_assert against the documented size. The build refuses
// big-endian hosts (see static_assert below).
//
// Every metadata block starts with a 48-byte BlockHeader carrying a magic, the block
// type, an XXH3-64 checksum of the whole block (computed with the checksum field set
// to zero), the block's own number and the filesystem UUID. A block is trusted only
// after VerifyBlock() accepted all four. Journal data blocks are verbatim copies of
// metadata blocks and are protected by the commit record instead.
//
// Thread-safety: pure functions and plain data.
#pragma once

#include <array>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#include "util/status.h"

namespace agorafs {

static_assert(std::endian::native == std::endian::little,
              "agorafs encodes its format with little-endian packed structs");

inline constexpr uint32_t kBlockSize = 4096;
inline constexpr uint32_t kBlockShift = 12;
inline constexpr uint32_t kMagic = 0x53464741;  // "AGFS"
inline constexpr uint32_t kFormatVersion = 2;  // 2: open-file tables in the node slots
// features_incompat bits. Intent locks: nodes take the filesystem lock in mode 3
// (intent) beside inode locks; a binary that does not know mode 3 would read a revoke
// to intent as already satisfied and keep writing, so it must not mount.
inline constexpr uint64_t kIncompatIntentLocks = 1;
inline constexpr uint64_t kKnownIncompat = kIncompatIntentLocks;
inline constexpr uint32_t kMaxNameLen = 255;
inline constexpr uint32_t kMinNodeSlots = 1;
inline constexpr uint32_t kMaxNodeSlots = 1024;
inline constexpr uint32_t kDefaultNodeSlots = 16;

using Uuid = std::array<uint8_t, 16>;

enum class BlockType : uint16_t {
  kFree = 0,  // never stored: a zeroed block has type 0 and magic 0
  kSuper = 1,
  kSlot = 2,          // node slot heartbeat block
  kJournalHeader = 3,
  kJournalDesc = 4,
  kJournalCommit = 5,
  kAgHeader = 6,
  kBitmap = 7,
  kInode = 8,
  kExtentNode = 9,
  kDirTable = 10,
  kDirLeaf = 11,
  kXattr = 12,
  kOrphan = 13,
  kMailHeader = 14,    // cluster: a node's message-ring positions and counts
  kPaxos = 15,         // cluster: a node's Disk Paxos block (two copies)
  kAckTable = 16,      // cluster: the lock master's consumption positions
  kLockSnapshot = 17,  // cluster: the lock master's published lock table
  kRing = 18,          // cluster: one block of a node's outgoing message ring
  kPeerView = 19,      // cluster: the lock master's view of every slot
  kOpenTable = 20,     // the inodes a node has open (files deleted elsewhere stay)
};
const char* BlockTypeName(BlockType t);

struct __attribute__((packed)) BlockHeader {
  uint32_t magic;      // kMagic
  uint16_t type;       // BlockType
  uint16_t reserved;   // 0
  uint64_t checksum;   // XXH3-64 of the block with this field zeroed
  uint64_t blocknr;    // this block's own address
  uint8_t uuid[16];    // filesystem UUID
  uint64_t seq;        // journal sequence of the last transaction that wrote it
};
static_assert(sizeof(BlockHeader) == 48);
inline constexpr size_t kPayload = kBlockSize - sizeof(BlockHeader);

// Fills magic/type/blocknr/uuid (seq untouched) and leaves the checksum to Seal.
void InitHeader(uint8_t* block, BlockType type, uint64_t blocknr, const Uuid& uuid);
// Computes and stores the checksum. Call after the last change, before writing.
void SealBlock(uint8_t* block);
// Accepts the block only if magic, type, blocknr, uuid and checksum all match.
// Returns kCorruption naming the block and the first mismatch.
Status VerifyBlock(const uint8_t* block, BlockType type, uint64_t blocknr, const Uuid& uuid);
// True when the block is intact (magic, type, blocknr and checksum match) but carries
// another filesystem's UUID: written by a node of another filesystem, not damaged.
bool IsForeignBlock(const uint8_t* block, BlockType type, uint64_t blocknr, const Uuid& uuid);
uint64_t BlockChecksum(const uint8_t* block);  // over the block with checksum zeroed
// True when all kBlockSize bytes are zero: a block never written since mkfs zeroed it
// (cluster blocks read as their initial state then, not as corruption).
bool IsZeroBlock(const uint8_t* block);
inline BlockHeader* Header(uint8_t* b) { return reinterpret_cast<BlockHeader*>(b); }
inline const BlockHeader* Header(const uint8_t* b) {
  return reinterpret_cast<const BlockHeader*>(b);
}

// ---------------------------------------------------------------------------------
// Superblock: block 0, with identical copies (but their own blocknr) at block 1 and
// at the last block of the device. Written at mkfs only; never by a mounted node.
enum TimingProfile : uint32_t { kProfileDefault = 0, kProfileFast = 1 };

struct __attribute__((packed)) Superblock {
  BlockHeader hdr;
  uint32_t version;            // kFormatVersion
  uint32_t block_size;         // 4096
  uint64_t features_compat;    // unknown bits ignored
  uint64_t features_ro_compat; // unknown bits: mount read-only refused (we are rw only)
  uint64_t features_incompat;  // unknown bits: refuse to mount
  uint64_t total_blocks;       // device size in blocks at mkfs
  uint64_t created_ns;         // CLOCK_REALTIME at mkfs
  char label[64];              // NUL-padded
  // Node slots: slot s owns blocks [slot_start + s*slot_blocks, +slot_blocks).
  uint32_t node_slots;
  uint32_t slot_blocks;
  uint64_t slot_start;
  // Journals: slot s owns blocks [journal_start + s*journal_blocks, +journal_blocks).
  uint64_t journal_start;
  uint32_t journal_blocks;
  uint32_t pad0;
  // Allocation groups: AG g covers [ag_start + g*ag_blocks, +ag_blocks), the last one
  // possibly shorter (ends before the superblock copy in the last block).
  uint64_t ag_start;
  uint32_t ag_blocks;
  uint32_t ag_count;
  uint32_t bitmap_blocks;      // per AG, following the AG header
  uint32_t pad1;
  uint64_t root_ino;           // inode number of "/" (an inode number is its block number)
  // Cluster timings chosen at mkfs (used by the cluster layer).
  uint32_t timing_profile;     // TimingProfile
  uint32_t heartbeat_interval_ms;
  uint32_t io_timeout_ms;
  uint32_t dead_after_ms;      // a slot whose counter is unchanged this long is dead
  uint8_t cluster_secret[32];  // random at mkfs; keys the network channel's MAC
  uint8_t reserved[kPayload - 4 * 2 - 8 * 5 - 64 - 4 * 2 - 8 * 2 - 4 * 2 - 8 - 4 * 4 - 8 -
                   4 * 4 - 32];
};
static_assert(sizeof(Superblock) == kBlockSize);

// ---------------------------------------------------------------------------------
// Node slot region. Each slot owns kDefaultSlotBlocks blocks; every one of them is
// written only by the node that owns the slot (single-writer), except that the lock
// master of the current epoch rewrites a dead slot's heartbeat block to kSlotFree
// after recovering it. docs/DESIGN.md "Cluster layer" explains the protocol.
inline constexpr uint32_t kSlotHeartbeat = 0;  // SlotBlock
inline constexpr uint32_t kSlotMailbox = 1;    // MailHeader
inline constexpr uint32_t kSlotOrphan = 2;     // OrphanBlock x2 (journaled)
inline constexpr uint32_t kSlotOrphanBlocks = 2;
inline constexpr uint32_t kSlotPaxos = 4;      // PaxosBlock copy A; copy B at +1
inline constexpr uint32_t kSlotAcks = 6;       // AckTableBlock x kSlotAckBlocks
inline constexpr uint32_t kSlotAckBlocks = 5;
inline constexpr uint32_t kSlotSnapshot = 11;  // LockSnapshotBlock x kSlotSnapshotBlocks
inline constexpr uint32_t kSlotSnapshotBlocks = 8;
inline constexpr uint32_t kSlotPeerView = 19;  // PeerViewBlock (lock master only)
inline constexpr uint32_t kSlotRing = 20;      // RingBlock x kSlotRingBlocks
inline constexpr uint32_t kSlotRingBlocks = 44;
inline constexpr uint32_t kSlotOpen = 64;      // OpenTableBlock x kSlotOpenBlocks
inline constexpr uint32_t kSlotOpenBlocks = 8;
inline constexpr uint32_t kDefaultSlotBlocks = 72;
static_assert(kSlotRing + kSlotRingBlocks == kSlotOpen);
static_assert(kSlotOpen + kSlotOpenBlocks == kDefaultSlotBlocks);

enum SlotState : uint32_t {
  kSlotFree = 0,     // never used, cleanly released, or recovered by the lock master
  kSlotMounted = 1,  // a node owns it; its journal may hold unreplayed transactions
};

// A lock master's verdict on a silent node (slot, generation), kept in the master's
// own heartbeat block. It is the fence handshake: the master writes the verdict and
// then re-reads the victim's heartbeat; a node whose lease ran out reads all verdicts
// before and after its one heartbeat write. At least one of the two sees the other.
enum VerdictState : uint32_t {
  kVerdictNone = 0,
  kVerdictRecovering = 1,  // declared dead; recovery (journal replay) running
  kVerdictRecovered = 2,   // recovery done; its locks are free; the slot is free
};
struct __attribute__((packed)) Verdict {
  uint32_t slot;
  uint32_t state;       // VerdictState
  uint64_t generation;  // the generation declared dead
};
static_assert(sizeof(Verdict) == 16);
inline constexpr size_t kMaxVerdicts = 241;

struct __attribute__((packed)) SlotBlock {
  BlockHeader hdr;
  uint32_t state;        // SlotState
  uint32_t slot;         // index, redundant with the address
  uint64_t counter;      // incremented at every heartbeat
  uint64_t generation;   // new for every mount of this slot
  uint64_t mount_ns;     // CLOCK_REALTIME at mount, informational
  char host[64];         // NUL-padded host name
  char address[64];      // optional network address "ip:port", NUL-padded
  uint64_t nonce;        // random per join attempt: tells two racing joiners apart
  uint64_t epoch;        // lock-master epoch this node has adopted (informational)
  uint32_t verdict_count;
  uint32_t pad;
  Verdict verdicts[kMaxVerdicts];
  uint8_t reserved[kPayload - 8 - 8 * 3 - 64 - 64 - 8 * 2 - 8 - 16 * kMaxVerdicts];
};
static_assert(sizeof(SlotBlock) == kBlockSize);

// Block 1: where the owner has got to in the lock master's ring, and its lock counts
// (for `agorafs status`). Written lazily by the owner.
struct __attribute__((packed)) MailHeader {
  BlockHeader hdr;
  uint64_t generation;       // owner's generation
  uint64_t epoch;            // epoch the positions below belong to
  uint32_t master_slot;      // master of that epoch
  uint32_t pad;
  uint64_t master_gen;
  uint64_t master_consumed;  // every master ring message with seq < this was read
  uint64_t held;             // locks held, informational
  uint64_t waiting;          // locks waited for, informational
  uint64_t ring_start;       // first seq of the owner's ring written in `epoch`
  uint8_t reserved[kPayload - 8 * 2 - 8 - 8 * 5];
};
static_assert(sizeof(MailHeader) == kBlockSize);

// Blocks 4 and 5: the owner's Disk Paxos block for electing the lock master, written
// as copy A, then copy B. A reader takes A if it verifies, else B, else "initial".
// A value is a (slot, generation) pair; slot kNoSlot means none.
inline constexpr uint32_t kNoSlot = 0xffffffffu;
struct __attribute__((packed)) PaxosBlock {
  BlockHeader hdr;
  uint64_t generation;     // owner's generation when written
  uint64_t instance;       // epoch this ballot state is for
  uint64_t mbal;           // highest ballot the owner started (0 = none)
  uint64_t bal;            // ballot of the accepted value (0 = none)
  uint32_t inp_slot;       // accepted value
  uint32_t pad0;
  uint64_t inp_gen;
  uint64_t decided_epoch;  // newest decision the owner knows (0 = none)
  uint32_t decided_slot;
  uint32_t pad1;
  uint64_t decided_gen;
  uint8_t reserved[kPayload - 8 * 4 - 8 - 8 - 8 - 8 - 8];
};
static_assert(sizeof(PaxosBlock) == kBlockSize);

// Blocks 6..10, written by the lock master: for each slot, how far it has read that
// slot's ring (all seq < `consumed` read) in this epoch.
struct __attribute__((packed)) AckEntry {
  uint64_t generation;  // generation of the ring's owner the position belongs to
  uint64_t consumed;
};
inline constexpr size_t kAcksPerBlock = 252;
struct __attribute__((packed)) AckTableBlock {
  BlockHeader hdr;
  uint64_t epoch;
  uint64_t master_gen;
  AckEntry acks[kAcksPerBlock];
  uint8_t reserved[kPayload - 16 - 16 * kAcksPerBlock];
};
static_assert(sizeof(AckTableBlock) == kBlockSize);
static_assert(kSlotAckBlocks * kAcksPerBlock >= kMaxNodeSlots);

// Blocks 11..18, written by the lock master about once per heartbeat while its table
// changes: who holds and who waits for which lock (waiters and contended locks first).
enum SnapshotWhat : uint8_t { kSnapHeld = 1, kSnapWaiting = 2, kSnapRevoking = 3 };
struct __attribute__((packed)) SnapshotEntry {
  uint64_t lock;
  uint16_t slot;
  uint8_t mode;  // LockMode
  uint8_t what;  // SnapshotWhat
  uint32_t age_ms;  // since granted / since requested
};
static_assert(sizeof(SnapshotEntry) == 16);
inline constexpr size_t kSnapshotPerBlock = 251;
struct __attribute__((packed)) LockSnapshotBlock {
  BlockHeader hdr;
  uint64_t epoch;
  uint32_t index;   // 0..kSlotSnapshotBlocks-1
  uint32_t count;   // entries used in this block
  uint64_t total;   // entries in the whole table (may exceed what fits)
  SnapshotEntry entries[kSnapshotPerBlock];
  uint8_t reserved[kPayload - 24 - 16 * kSnapshotPerBlock];
};
static_assert(sizeof(LockSnapshotBlock) == kBlockSize);

// Block 19, written by the lock master every heartbeat: its observer's view of every
// used slot, so `agorafs status` can show heartbeat ages and states without watching
// for dead_after_ms itself.
struct __attribute__((packed)) PeerViewEntry {
  uint16_t slot;
  uint8_t state;  // PeerState (cluster/membership.h)
  uint8_t pad;
  uint32_t heartbeat_age_ms;
  uint64_t generation;
};
static_assert(sizeof(PeerViewEntry) == 16);
inline constexpr size_t kPeerViewEntries = 252;
struct __attribute__((packed)) PeerViewBlock {
  BlockHeader hdr;
  uint64_t epoch;
  uint32_t count;
  uint32_t pad;
  PeerViewEntry entries[kPeerViewEntries];
  uint8_t reserved[kPayload - 16 - 16 * kPeerViewEntries];
};
static_assert(sizeof(PeerViewBlock) == kBlockSize);

// Blocks 20..63: the owner's outgoing message ring. Message seq s lives in ring block
// (s / kMsgsPerRingBlock) % kSlotRingBlocks at index s % kMsgsPerRingBlock; the block
// is rewritten whole as messages are appended. Sequence numbers start at 1 for each
// generation and never repeat within it.
enum MsgOp : uint8_t {
  kMsgRequest = 1,      // node -> master: want `lock` in `mode`
  kMsgRelease = 2,      // node -> master: now hold `lock` only in `mode` (kNone = none)
  kMsgReclaim = 3,      // node -> new master: I hold `lock` in `mode`
  kMsgReclaimDone = 4,  // node -> new master: all my holdings are sent
  kMsgGrant = 5,        // master -> node: you hold `lock` in `mode`
  kMsgRevoke = 6,       // master -> node: go down to `mode` on `lock`
  kMsgCancel = 7,       // node -> master: no longer wants `lock`
};
struct __attribute__((packed)) Msg {
  uint64_t seq;
  uint64_t epoch;
  uint64_t lock;
  uint16_t dest;  // destination slot
  uint8_t op;     // MsgOp
  uint8_t mode;   // LockMode
  // Master to node: the low 32 bits of the destination's generation. A node that
  // takes over a slot in the middle of an epoch reads the master's ring from the
  // epoch's start and must not take its predecessor's grants for its own.
  uint32_t dest_gen;
};
static_assert(sizeof(Msg) == 32);
inline constexpr size_t kMsgsPerRingBlock = 125;
struct __attribute__((packed)) RingBlock {
  BlockHeader hdr;
  uint64_t generation;  // writer's generation
  uint64_t first_seq;   // seq of msgs[0]; a multiple of kMsgsPerRingBlock
  uint32_t count;       // messages used
  uint32_t pad;
  uint64_t reserved0;
  Msg msgs[kMsgsPerRingBlock];
  uint8_t reserved[kPayload - 32 - 32 * kMsgsPerRingBlock];
};
static_assert(sizeof(RingBlock) == kBlockSize);

// Orphan list block: inodes unlinked while open, or being truncated. Owned by its slot.
inline constexpr size_t kOrphansPerBlock = (kPayload - 8) / 8;
struct __attribute__((packed)) OrphanBlock {
  BlockHeader hdr;
  uint32_t count;
  uint32_t pad;
  uint64_t ino[kOrphansPerBlock];
};
static_assert(sizeof(OrphanBlock) == kBlockSize);

// Open-file table: the inodes the slot's node had open when it last let the
// filesystem lock go. Not journaled; rewritten whole (only the blocks in use) by the
// owner. A table whose generation is not the slot's current one lists nothing.
inline constexpr size_t kOpenInosPerBlock = (kPayload - 32) / 8;
inline constexpr uint32_t kOpenTableOverflow = 1;  // more open than fit: assume any
struct __attribute__((packed)) OpenTableBlock {
  BlockHeader hdr;
  uint64_t generation;   // the owner's slot generation
  uint64_t publication;  // +1 at every rewrite; every block of one table carries it
  uint32_t total;        // inodes in the whole table; blocks in use: at least 1,
                         // ceil(total / kOpenInosPerBlock)
  uint32_t flags;        // kOpenTableOverflow
  uint32_t count;        // inodes in this block
  uint32_t pad;
  uint64_t ino[kOpenInosPerBlock];
};
static_assert(sizeof(OpenTableBlock) == kBlockSize);

// ---------------------------------------------------------------------------------
// Journal, one per slot. Blocks 0 and 1 are two copies of the header (the valid one
// with the higher `update` wins, so a torn header write loses nothing). Blocks
// 2..journal_blocks-1 are the circular log. A transaction with sequence S is:
//   DESC(S)  data blocks...  [DESC(S) data blocks...]  COMMIT(S)
// A DESC lists the home addresses of the data blocks that follow it. The COMMIT holds
// an XXH3-64 over every DESC and data block of the transaction in log order; replay
// applies a transaction only if its COMMIT is valid and the hash matches, and stops
// at the first transaction that is not (a torn or partial transaction is discarded
// whole).
inline constexpr uint32_t kJournalLogStart = 2;
inline constexpr uint32_t kMinJournalBlocks = 256;  // 1 MiB

struct __attribute__((packed)) JournalHeader {
  BlockHeader hdr;
  uint64_t update;       // incremented at every header write; higher valid copy wins
  uint64_t tail_seq;     // first sequence that may need replay
  uint32_t tail_pos;     // log index (0-based within the log area) where tail_seq starts
  uint32_t slot;
  uint64_t generation;   // generation of the node that wrote it
  uint8_t reserved[kPayload - 8 * 3 - 4 * 2];
};
static_assert(sizeof(JournalHeader) == kBlockSize);

inline constexpr size_t kDescEntries = (kPayload - 16) / 8;
struct __attribute__((packed)) JournalDesc {
  BlockHeader hdr;        // hdr.seq = transaction sequence; hdr.blocknr = log address
  uint32_t count;         // data blocks following this descriptor
  uint32_t index;         // 0-based index of this DESC within the transaction
  uint64_t pad;
  uint64_t home[kDescEntries];
};
static_assert(sizeof(JournalDesc) == kBlockSize);

struct __attribute__((packed)) JournalCommit {
  BlockHeader hdr;        // hdr.seq = transaction sequence
  uint32_t desc_count;    // DESC blocks in the transaction
  uint32_t data_count;    // data blocks in the transaction
  uint64_t body_hash;     // XXH3-64 streamed over all DESC and data blocks, in order
  uint64_t commit_ns;     // CLOCK_REALTIME, informational
  uint8_t reserved[kPayload - 8 * 3];
};
static_assert(sizeof(JournalCommit) == kBlockSize);

// ---------------------------------------------------------------------------------
// Allocation group: header block, then bitmap_blocks bitmap blocks, then space for
// inodes and data. Bit i of the AG's bitmap is block (AG start + i); 1 = in use.
inline constexpr size_t kBitmapBytes = kPayload - 16;
inline constexpr size_t kBitsPerBitmap = kBitmapBytes * 8;

struct __attribute__((packed)) AgHeader {
  BlockHeader hdr;
  uint32_t ag_index;
  uint32_t blocks;        // blocks in this AG (the last AG may be short)
  uint64_t free_blocks;   // free blocks in this AG
  uint64_t inodes;        // allocated inodes in this AG
  uint8_t reserved[kPayload - 8 * 3];
};
static_assert(sizeof(AgHeader) == kBlockSize);

struct __attribute__((packed)) BitmapBlock {
  BlockHeader hdr;
  uint32_t ag_index;
  uint32_t index;         // which bitmap block of the AG
  uint64_t pad;
  uint8_t bits[kBitmapBytes];
};
static_assert(sizeof(BitmapBlock) == kBlockSize);

// ---------------------------------------------------------------------------------
// Inode: one per block; its inode number IS its block number, so two inodes never
// share a block and an inode's lock covers exactly its block.
enum class DataKind : uint8_t {
  kInline = 1,   // file bytes / symlink target / packed dir entries in `data`
  kExtents = 2,  // `data` holds an extent tree root (regular files, symlinks)
  kDirHash = 3,  // `data` holds an extendible-hash directory root
};

struct __attribute__((packed)) Timespec64 {
  int64_t sec;
  uint32_t nsec;
};
static_assert(sizeof(Timespec64) == 12);

inline constexpr size_t kInodeDataOffset = 256;
inline constexpr size_t kInodeXattrOffset = 3584;
inline constexpr size_t kInodeDataSize = kInodeXattrOffset - kInodeDataOffset;  // 3328
inline constexpr size_t kInodeXattrSize = kBlockSize - kInodeXattrOffset;       // 512

struct __attribute__((packed)) InodeBlock {
  BlockHeader hdr;
  uint64_t generation;
  uint32_t mode;          // S_IFMT | permission bits
  uint32_t uid;
  uint32_t gid;
  uint32_t nlink;
  uint64_t size;
  uint64_t blocks;        // data + extent/xattr/dir blocks owned, in 4 KiB blocks
  Timespec64 atime, mtime, ctime, btime;
  uint64_t parent;        // directories: the parent directory's inode number
  uint64_t rdev;
  uint64_t xattr_block;   // external xattr block or 0
  uint64_t hash_seed;     // directories: per-directory name hash seed
  uint8_t data_kind;      // DataKind
  uint8_t pad0;
  uint16_t xattr_len;     // bytes used in the inline xattr area
  uint32_t flags;         // kInodeFlag*
  uint8_t reserved0[kInodeDataOffset - 48 - 8 - 4 * 4 - 8 * 2 - 12 * 4 - 8 * 4 - 4 - 4];
  uint8_t data[kInodeDataSize];
  uint8_t xattr[kInodeXattrSize];
};
static_assert(sizeof(InodeBlock) == kBlockSize);
static_assert(offsetof(InodeBlock, data) == kInodeDataOffset);
static_assert(offsetof(InodeBlock, xattr) == kInodeXattrOffset);

inline constexpr uint32_t kInodeFlagOrphan = 1;  // on an orphan list (unlinked/open)

// ---------------------------------------------------------------------------------
// Extents. A file's block map is a B+tree rooted in InodeBlock::data.
enum ExtentFlags : uint32_t { kExtentUnwritten = 1 };  // allocated, reads as zeros

struct __attribute__((packed)) Extent {
  uint64_t logical;       // first file block
  uint64_t physical;      // first device block
  uint32_t len;           // blocks
  uint32_t flags;         // ExtentFlags
};
static_assert(sizeof(Extent) == 24);

struct __attribute__((packed)) ExtentIndex {
  uint64_t logical;       // smallest logical block under `child`
  uint64_t child;         // block of an ExtentNode
};
static_assert(sizeof(ExtentIndex) == 16);

struct __attribute__((packed)) ExtentNodeHeader {
  uint16_t depth;         // 0 = entries are Extent, else ExtentIndex
  uint16_t count;
  uint16_t max;
  uint16_t pad;
  uint64_t owner;         // inode number
};
static_assert(sizeof(ExtentNodeHeader) == 16);

inline constexpr size_t kExtentRootLeafMax = (kInodeDataSize - 16) / sizeof(Extent);
inline constexpr size_t kExtentRootIndexMax = (kInodeDataSize - 16) / sizeof(ExtentIndex);
inline constexpr size_t kExtentNodeLeafMax = (kPayload - 16) / sizeof(Extent);
inline constexpr size_t kExtentNodeIndexMax = (kPayload - 16) / sizeof(ExtentIndex);

// ---------------------------------------------------------------------------------
// Directories. Entry encoding (inline in the inode or in a DirLeaf), sorted by hash:
//   u64 hash | u64 ino | u8 type (DT_*) | u8 name_len | name bytes
// hash = XXH3-64(name, seed = inode.hash_seed) >> 1, raised to at least 3
// (readdir offsets 1 and 2 are "." and "..").
inline constexpr size_t kDirEntryFixed = 18;
inline constexpr uint64_t kMinDirHash = 3;

// A hashed directory keeps, in InodeBlock::data, a DirRoot followed by the block
// numbers of its table blocks. The table has 2^global_depth slots, each the block
// number of a DirLeaf; kDirTableSlots slots per DirTable block.
struct __attribute__((packed)) DirRoot {
  uint8_t global_depth;
  uint8_t pad[7];
  uint64_t entries;       // live entries (not counting . and ..)
  uint64_t leaves;        // leaf blocks in use
};
static_assert(sizeof(DirRoot) == 24);
inline constexpr size_t kDirTableSlots = 256;
inline constexpr size_t kDirMaxTableBlocks = (kInodeDataSize - sizeof(DirRoot)) / 8;

struct __attribute__((packed)) DirTable {
  BlockHeader hdr;
  uint64_t dir_ino;
  uint32_t index;         // which table block
  uint32_t pad;
  uint64_t slot[kDirTableSlots];
  uint8_t reserved[kPayload - 16 - kDirTableSlots * 8];
};
static_assert(sizeof(DirTable) == kBlockSize);

inline constexpr size_t kDirLeafSpace = kPayload - 40;
struct __attribute__((packed)) DirLeaf {
  BlockHeader hdr;
  uint64_t dir_ino;
  uint64_t prefix;        // hash prefix this leaf covers (top local_depth bits)
  uint64_t next;          // overflow chain when local_depth is at its maximum
  uint16_t local_depth;
  uint16_t count;         // entries
  uint16_t used;          // bytes used in `entries`
  uint16_t pad;
  uint32_t pad2;
  uint32_t pad3;
  uint8_t entries[kDirLeafSpace];
};
static_assert(sizeof(DirLeaf) == kBlockSize);
// Global depth is bounded by the table blocks the root can name: 2^16 slots.
inline constexpr uint16_t kDirMaxDepth = 16;

// ---------------------------------------------------------------------------------
// Xattrs: inline area of the inode, then one external XattrBlock.
// Entry: u8 name_len | u16 value_len | name | value   (name includes the namespace)
inline constexpr size_t kXattrBlockSpace = kPayload - 16;
struct __attribute__((packed)) XattrBlock {
  BlockHeader hdr;
  uint64_t owner;
  uint16_t used;
  uint8_t pad[6];
  uint8_t entries[kXattrBlockSpace];
};
static_assert(sizeof(XattrBlock) == kBlockSize);

// ---------------------------------------------------------------------------------
// Lock ids: every cached metadata block belongs to exactly one lock.
enum class LockKind : uint8_t {
  kInode = 1,    // inode block, its extent nodes, dir table blocks, xattr block
  kDirLeaf = 2,  // one directory leaf block (and its overflow chain)
  kAg = 3,       // AG header and its bitmap blocks
  kSlot = 4,     // a node slot's own blocks (heartbeat, mailbox, orphans) and journal
  kSuper = 5,    // superblock (mkfs/grow only)
};
using LockId = uint64_t;
inline constexpr LockId MakeLockId(LockKind k, uint64_t n) {
  return (static_cast<uint64_t>(k) << 56) | (n & ((1ull << 56) - 1));
}
inline constexpr LockKind LockIdKind(LockId id) { return static_cast<LockKind>(id >> 56); }
inline constexpr uint64_t LockIdNumber(LockId id) { return id & ((1ull << 56) - 1); }

// ---------------------------------------------------------------------------------
// Geometry derived from the superblock.
struct Geometry {
  uint64_t total_blocks = 0;
  uint32_t node_slots = 0;
  uint32_t slot_blocks = 0;
  uint64_t slot_start = 0;
  uint64_t journal_start = 0;
  uint32_t journal_blocks = 0;
  uint64_t ag_start = 0;
  uint32_t ag_blocks = 0;
  uint32_t ag_count = 0;
  uint32_t bitmap_blocks = 0;

  uint64_t SlotBlock(uint32_t slot, uint32_t i) const {
    return slot_start + uint64_t(slot) * slot_blocks + i;
  }
  uint64_t JournalStart(uint32_t slot) const {
    return journal_start + uint64_t(slot) * journal_blocks;
  }
  uint64_t AgStart(uint32_t ag) const { return ag_start + uint64_t(ag) * ag_blocks; }
  // Blocks in AG `ag` (the last one is short).
  uint32_t AgSize(uint32_t ag) const;
  uint32_t AgOf(uint64_t blk) const { return uint32_t((blk - ag_start) / ag_blocks); }
  bool InDataArea(uint64_t blk) const {
    return blk >= ag_start && blk < total_blocks - 1;
  }
  // A slot's orphan-list blocks: metadata that goes through the journal although it
  // lies in the slot region.
  bool IsOrphanBlock(uint64_t blk) const {
    if (blk < slot_start || blk >= slot_start + uint64_t(node_slots) * slot_blocks) return false;
    uint64_t i = (blk - slot_start) % slot_blocks;
    return i >= kSlotOrphan && i < kSlotOrphan + kSlotOrphanBlocks;
  }
  // Blocks a journal transaction may write home.
  bool Journaled(uint64_t blk) const { return InDataArea(blk) || IsOrphanBlock(blk); }
};

struct MkfsParams {
  uint64_t total_blocks = 0;
  uint32_t node_slots = kDefaultNodeSlots;
  uint32_t journal_blocks = 0;   // 0 = choose from the device size
  uint32_t ag_blocks = 0;        // 0 = choose
  uint32_t profile = kProfileDefault;
  uint32_t heartbeat_interval_ms = 0;  // 0 = from profile
  uint32_t io_timeout_ms = 0;
  uint32_t dead_after_ms = 0;
};

// Chooses the layout for a device. kInvalid/kNoSpace when it cannot fit.
Result<Geometry> ComputeGeometry(const MkfsParams& p);
Geometry GeometryOf(const Superblock& sb);

}  // namespace agorafs
