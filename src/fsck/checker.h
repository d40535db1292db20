// fsck's checker: one full read-only pass over the allocation groups, orphan lists
// and the directory tree, producing problems and the repair plan for them.
// (Superblock copies, node slots and journals are checked in fsck.cc.)
//
// Thread-safety: none; one pass on one thread.
#pragma once

#include <cstdint>
#include <deque>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

#include "dir/dir.h"
#include "fsck/fsck.h"
#include "fs/xattr.h"
#include "fsck/fsck_internal.h"

namespace agorafs::fsck_internal {

enum Own : uint8_t {
  kOwnNone = 0,
  kOwnAg = 1,     // AG header and bitmap blocks
  kOwnInode = 2,  // an inode block
  kOwnMeta = 3,   // extent node, directory table or leaf, xattr block
  kOwnData = 4,   // file data
};
const char* OwnName(uint8_t o);

struct Problem {
  FsckProblem p;
  // Fixed by rebuilding bitmaps and AG counts alone (no inode or directory change).
  bool bitmap_only = false;
};

// What to change in one inode. Absolute values are applied first, then the extent
// tree rewrite / directory rebuild, then relative directory operations.
struct Fix {
  std::optional<uint32_t> nlink;
  std::optional<uint64_t> parent;
  std::optional<uint64_t> blocks;
  std::optional<uint64_t> size;
  bool clear_orphan_flag = false;
  bool clear_inline_xattr = false;
  bool drop_xattr_block = false;
  std::vector<std::string> drop_xattrs;  // entries whose values are invalid (ACLs, lock table)
  bool zero_inline_tail = false;
  bool reset_data = false;       // files/symlinks: empty inline data
  bool rewrite_extents = false;
  std::vector<Extent> extents;
  bool rebuild_dir = false;      // start empty, add `entries`
  std::vector<dir::Entry> entries;
  std::vector<std::string> remove;                     // entries to drop
  std::vector<std::pair<std::string, uint8_t>> retype;  // entries with a wrong type
};

struct Plan {
  std::map<uint64_t, Fix> fixes;
  std::vector<uint64_t> lost;               // unreachable inodes for /lost+found
  std::set<uint32_t> clear_orphans;         // slots whose orphan lists are emptied
  std::vector<uint64_t> rewrite_orphan_blocks;  // unreadable orphan blocks: write empty
  bool root_bad = false;
};

struct AgState {
  bool hdr_ok = false;
  // AgHeader is packed (alignment 1): without alignas it would sit at offset 1 and a
  // reference to one of its fields (fmt::format takes its arguments by reference)
  // would be misaligned.
  alignas(8) AgHeader hdr{};
  std::vector<uint8_t> bits;     // bitmap_blocks * kBitmapBytes
  std::vector<bool> bm_ok;       // per bitmap block
};

class Checker {
 public:
  Checker(BlockDevice* dev, const Superblock& sb, const Overlay* overlay, size_t max_problems);

  Status Run();

  const std::vector<Problem>& problems() const { return problems_; }
  uint64_t problem_count() const { return problem_count_; }
  bool structural() const { return structural_; }
  bool clean() const { return problem_count_ == 0; }
  const Plan& plan() const { return plan_; }
  const std::vector<uint8_t>& owners() const { return own_; }
  const std::vector<AgState>& ags() const { return ags_; }
  // Bitmap bits the AG should have: owned blocks (+ the AG's own blocks and the bits
  // past its end); with `keep_set`, every bit set now stays set.
  std::vector<uint8_t> WantedBits(uint32_t ag, bool keep_set) const;
  void FillStats(FsckReport* r) const;

 private:
  struct Ino {
    bool processed = false;
    bool valid = false;
    bool contents_done = false;
    bool lost = false;
    bool lost_top = false;
    bool freeing = false;        // unlinked orphan: everything it owns goes back
    bool reset = false;          // bad data kind
    bool free_inode = false;     // a freed inode (nlink 0, bit clear, on no orphan list)
    bool rewrite = false;        // extent tree to rebuild from the claims
    bool rebuild = false;        // directory to rebuild from its salvaged entries
    bool xattr_kept = false;
    uint32_t mode = 0, nlink = 0, flags = 0;
    uint8_t data_kind = 0;
    uint64_t size = 0, blocks = 0, parent = 0, xattr_block = 0;
    uint64_t meta_blocks = 0, data_blocks = 0;  // as the structure stands now
    uint64_t refs = 0, subdirs = 0, entry_parent = 0;
    std::string entry_name;      // directories: the name in entry_parent
    int32_t orphan_slot = -1;
    uint64_t trim_written = UINT64_MAX;  // drop written blocks at/after this file block
    uint64_t trim_all = UINT64_MAX;      // drop all blocks at/after this file block
    size_t claim_begin = 0, claim_end = 0;
  };
  struct Claim {
    uint64_t ino;
    Extent e;
    std::vector<Extent> kept;  // set when part of it could not be claimed
    bool partial = false;
  };

  void CheckXattrValues(uint64_t ino, const InodeBlock& I, const xattr::Entries& list);
  void AddProblem(const std::string& kind, uint64_t block, uint64_t ino, std::string detail,
                  bool bitmap_only = false);
  Fix& FixOf(uint64_t ino) { return plan_.fixes[ino]; }

  bool InAg(uint64_t blk) const;
  bool IsAgMeta(uint64_t blk) const;
  bool ValidBlock(uint64_t blk) const { return InAg(blk) && !IsAgMeta(blk); }
  // The block's bitmap bit: 1 set, 0 clear, -1 unknown (bitmap block unreadable).
  int BitOf(uint64_t blk) const;
  // 0 claimed, 1 not a usable block, 2 already owned.
  int ClaimMeta(uint64_t blk, Own kind);
  void MaybeClear();
  std::string PathOf(uint64_t dir) const;
  std::string Describe(uint64_t ino) const;

  void ReadAgs();
  void ReadOrphans();
  Ino& ProcessInode(uint64_t ino);
  void CheckXattrs(uint64_t ino, const InodeBlock& I, Ino& in);
  void CheckFileData(uint64_t ino, const InodeBlock& I, Ino& in);
  void ProcessDirContents(uint64_t dino);
  // Returns false when the entry must go; *type is the type it should have.
  bool HandleEntry(uint64_t dino, const dir::Entry& e, uint8_t* type);
  void Walk();
  void ApplyClaims();
  void FindLost();
  void Detach(uint64_t dir);
  void ResolveLost(const std::vector<uint64_t>& candidates);
  void FinalInodeChecks();
  void CheckBitmaps();

  Superblock sb_;
  Geometry g_;
  Uuid uuid_;
  DeviceTxn txn_;
  size_t max_problems_;

  std::vector<Problem> problems_;
  uint64_t problem_count_ = 0;
  bool structural_ = false;
  Plan plan_;

  std::vector<uint8_t> own_;
  std::vector<AgState> ags_;
  std::unordered_map<uint64_t, Ino> inodes_;
  std::vector<Claim> claims_;
  size_t claims_applied_ = 0;
  std::deque<uint64_t> queue_;
  bool lost_walk_ = false;
  uint64_t walk_root_ = 0;  // the unreachable directory whose subtree is being walked
};

}  // namespace agorafs::fsck_internal
