#include "dir/dir.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>
#include <unordered_set>

#include "util/hash.h"

namespace agorafs::dir {
namespace {

HashFn g_hash_fn = nullptr;

// Entry field offsets (format.h: u64 hash | u64 ino | u8 type | u8 name_len | name).
constexpr size_t kOffIno = 8;
constexpr size_t kOffType = 16;
constexpr size_t kOffLen = 17;
constexpr size_t kOffName = kDirEntryFixed;
constexpr size_t kMinEntry = kDirEntryFixed + 1;
constexpr size_t kRootTableOff = sizeof(DirRoot);
constexpr int kMaxAddRounds = 4 * kDirMaxDepth + 8;
// Bound on an overflow chain walk besides DirRoot::leaves (which may be corrupt too).
constexpr size_t kMaxChain = size_t(1) << 20;

inline uint64_t Ld64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}
inline void St64(uint8_t* p, uint64_t v) { std::memcpy(p, &v, 8); }

inline std::string_view NameAt(const uint8_t* e) {
  return {reinterpret_cast<const char*>(e + kOffName), e[kOffLen]};
}
inline size_t SizeAt(const uint8_t* e) { return kDirEntryFixed + e[kOffLen]; }

// Order of (hash, name) keys.
inline int CompareKey(uint64_t h1, std::string_view n1, uint64_t h2, std::string_view n2) {
  if (h1 != h2) return h1 < h2 ? -1 : 1;
  int c = n1.compare(n2);
  return c < 0 ? -1 : (c > 0 ? 1 : 0);
}
inline bool EntryLess(const uint8_t* a, const uint8_t* b) {
  return CompareKey(Ld64(a), NameAt(a), Ld64(b), NameAt(b)) < 0;
}

inline void PutEntry(uint8_t* e, uint64_t hash, uint64_t ino, uint8_t type, std::string_view name) {
  St64(e, hash);
  St64(e + kOffIno, ino);
  e[kOffType] = type;
  e[kOffLen] = static_cast<uint8_t>(name.size());
  std::memcpy(e + kOffName, name.data(), name.size());
}

inline void FillEntry(const uint8_t* e, Entry* out) {
  out->cookie = Ld64(e);
  out->ino = Ld64(e + kOffIno);
  out->type = e[kOffType];
  out->name.assign(reinterpret_cast<const char*>(e + kOffName), e[kOffLen]);
}

inline uint32_t TablesFor(uint32_t gd) {
  return static_cast<uint32_t>(((uint64_t(1) << gd) + kDirTableSlots - 1) / kDirTableSlots);
}
inline uint64_t SlotIndex(uint64_t hash, uint32_t gd) { return gd == 0 ? 0 : hash >> (63 - gd); }
// Bit number `depth` (1-based from the top of the 63-bit hash).
inline unsigned HashBit(uint64_t hash, uint32_t depth) { return (hash >> (63 - depth)) & 1; }
// Whether `hash` lies in the range of a leaf (prefix, ld).
inline bool InLeafRange(uint64_t hash, uint64_t prefix, uint32_t ld) {
  return ld == 0 ? true : (hash >> (63 - ld)) == prefix;
}

Status Corrupt(uint64_t dir, std::string_view what, uint64_t blk, std::string_view msg) {
  return Err(Code::kCorruption, fmt::format("dir {}: {} {}: {}", dir, what, blk, msg));
}
Status CorruptInline(uint64_t dir, std::string_view msg) {
  return Err(Code::kCorruption, fmt::format("dir {}: inline: {}", dir, msg));
}
Status CorruptRoot(uint64_t dir, std::string_view msg) {
  return Err(Code::kCorruption, fmt::format("dir {}: root: {}", dir, msg));
}

// MetaTxn failures keep their code and gain the directory and block.
Status Annotate(const Status& st, uint64_t dir, std::string_view what, uint64_t blk) {
  return Status(st.code(), fmt::format("dir {}: {} {}: {}", dir, what, blk, st.message()));
}
template <typename T>
Result<const T*> ReadBlock(MetaTxn& txn, uint64_t dir, std::string_view what, uint64_t blk,
                           BlockType type, LockId lock) {
  auto r = txn.ReadAs<T>(blk, type, lock);
  if (!r.ok()) return Annotate(r.status(), dir, what, blk);
  return *r;
}
template <typename T>
Result<T*> WriteBlock(MetaTxn& txn, uint64_t dir, std::string_view what, uint64_t blk,
                      BlockType type, LockId lock) {
  auto r = txn.WriteAs<T>(blk, type, lock);
  if (!r.ok()) return Annotate(r.status(), dir, what, blk);
  return *r;
}
Result<std::pair<uint64_t, uint8_t*>> NewDirBlock(MetaTxn& txn, uint64_t dir, BlockType type,
                                                  LockId lock, uint64_t hint) {
  auto r = txn.NewBlock(type, lock, hint);
  if (!r.ok()) {
    return Status(
        r.status().code(),
        fmt::format("dir {}: allocating a {}: {}", dir,
                    type == BlockType::kDirLeaf ? "leaf" : "table block", r.status().message()));
  }
  return *r;
}

// ---------------------------------------------------------------------------------
// Packed entry areas.

struct Seek {
  size_t off = 0;   // where the key is, or would be inserted
  size_t size = 0;  // size of the entry found
  size_t end = 0;   // end of the last entry (valid when walked_all)
  bool found = false;
  bool walked_all = false;
};

// Walks `count` packed entries in p[0, limit), looking for (hash, name). Every entry
// passed is bounds-checked. With `full`, walks all of them and checks their order.
// Returns nullptr or a description of the corruption.
const char* SeekKey(const uint8_t* p, size_t limit, size_t count, uint64_t hash,
                    std::string_view name, bool full, Seek* s) {
  size_t off = 0;
  bool placed = false;
  const uint8_t* prev = nullptr;
  if (count > limit / kMinEntry) return "entry count exceeds the space";
  for (size_t i = 0; i < count; i++) {
    if (limit - off < kDirEntryFixed) return "entry header runs past the used bytes";
    const uint8_t* e = p + off;
    size_t len = e[kOffLen];
    if (len == 0) return "entry with an empty name";
    size_t sz = kDirEntryFixed + len;
    if (limit - off < sz) return "entry name runs past the used bytes";
    uint64_t h = Ld64(e);
    if (full) {
      if (prev != nullptr && !EntryLess(prev, e)) return "entries out of order or duplicated";
      prev = e;
    }
    if (!placed && h >= hash) {
      int c = h > hash ? 1 : NameAt(e).compare(name);
      if (c >= 0) {
        placed = true;
        s->off = off;
        s->found = c == 0;
        s->size = sz;
        if (!full) {
          s->walked_all = false;
          return nullptr;
        }
      }
    }
    off += sz;
  }
  s->end = off;
  s->walked_all = true;
  if (!placed) {
    s->off = off;
    s->found = false;
    s->size = 0;
  }
  return nullptr;
}

// Calls f(entry_ptr) for each of `count` entries in p[0, used), bounds-checked; the
// walk must end exactly at `used`. Returns nullptr or a description.
template <typename F>
const char* WalkEntries(const uint8_t* p, size_t used, size_t count, F&& f) {
  if (count > used / kMinEntry) return "entry count exceeds the used bytes";
  size_t off = 0;
  for (size_t i = 0; i < count; i++) {
    if (used - off < kDirEntryFixed) return "entry header runs past the used bytes";
    const uint8_t* e = p + off;
    size_t len = e[kOffLen];
    if (len == 0) return "entry with an empty name";
    if (used - off < kDirEntryFixed + len) return "entry name runs past the used bytes";
    if (!f(e)) return nullptr;
    off += kDirEntryFixed + len;
  }
  if (off != used) return "used bytes do not match the entries";
  return nullptr;
}

// Inline area: returns the end of the packed entries (d.size of them).
const char* InlineSeek(const InodeBlock& d, uint64_t hash, std::string_view name, bool full,
                       Seek* s) {
  if (d.size > kInodeDataSize / kMinEntry) return "entry count exceeds the inline space";
  return SeekKey(d.data, kInodeDataSize, d.size, hash, name, full, s);
}

// ---------------------------------------------------------------------------------
// Hashed directories.

struct LeafRef {
  uint64_t blk;
  const DirLeaf* l;
};

class Hashed {
 public:
  Hashed(MetaTxn& txn, uint64_t ino, const InodeBlock& d, InodeBlock* w)
      : txn_(txn), ino_(ino), d_(d), w_(w) {}

  Status Load() {
    const DirRoot* r = root();
    if (r->global_depth > kDirMaxDepth) {
      return CorruptRoot(ino_,
                         fmt::format("global depth {} exceeds {}", r->global_depth, kDirMaxDepth));
    }
    gd_ = r->global_depth;
    if (TablesFor(gd_) > kDirMaxTableBlocks) return CorruptRoot(ino_, "table too large");
    for (uint32_t t = 0; t < TablesFor(gd_); t++) {
      if (TableBlock(t) == 0) return CorruptRoot(ino_, fmt::format("table block {} is 0", t));
    }
    if (r->leaves == 0) return CorruptRoot(ino_, "no leaves");
    return Status::Ok();
  }

  uint32_t gd() const { return gd_; }
  uint64_t nslots() const { return uint64_t(1) << gd_; }
  const DirRoot* root() const { return reinterpret_cast<const DirRoot*>(d_.data); }
  DirRoot* wroot() { return reinterpret_cast<DirRoot*>(w_->data); }
  uint64_t TableBlock(uint32_t t) const { return Ld64(d_.data + kRootTableOff + 8 * size_t(t)); }

  Result<const DirTable*> ReadTable(uint32_t t) {
    uint64_t blk = TableBlock(t);
    AGFS_ASSIGN_OR_RETURN(
        const DirTable* tb,
        ReadBlock<DirTable>(txn_, ino_, "table", blk, BlockType::kDirTable, InodeLock(ino_)));
    AGFS_RETURN_IF_ERROR(CheckTable(blk, t, tb));
    return tb;
  }
  Result<DirTable*> WriteTable(uint32_t t) {
    uint64_t blk = TableBlock(t);
    AGFS_ASSIGN_OR_RETURN(
        DirTable * tb,
        WriteBlock<DirTable>(txn_, ino_, "table", blk, BlockType::kDirTable, InodeLock(ino_)));
    AGFS_RETURN_IF_ERROR(CheckTable(blk, t, tb));
    return tb;
  }
  Status CheckTable(uint64_t blk, uint32_t t, const DirTable* tb) const {
    if (tb->dir_ino != ino_) {
      return Corrupt(ino_, "table", blk, fmt::format("belongs to dir {}", tb->dir_ino));
    }
    if (tb->index != t) {
      return Corrupt(ino_, "table", blk, fmt::format("has index {}, expected {}", tb->index, t));
    }
    return Status::Ok();
  }

  // The primary leaf named by table slot `idx`.
  Result<uint64_t> SlotAt(uint64_t idx) {
    uint32_t t = static_cast<uint32_t>(idx / kDirTableSlots);
    AGFS_ASSIGN_OR_RETURN(const DirTable* tb, ReadTable(t));
    uint64_t blk = tb->slot[idx % kDirTableSlots];
    if (blk == 0) {
      return Corrupt(ino_, "table", TableBlock(t), fmt::format("slot {} is empty", idx));
    }
    return blk;
  }

  // Sets slots [first, first+count) to blk.
  // Sets slots [first, first+count) to blk. Gets every table block it needs before
  // changing any, so a failure changes nothing.
  Status SetSlots(uint64_t first, uint64_t count, uint64_t blk) {
    const uint64_t end = first + count;
    DirTable* one = nullptr;  // the usual case: the range lies in one table block
    std::vector<DirTable*> many;
    for (uint64_t t = first / kDirTableSlots; t * kDirTableSlots < end; t++) {
      AGFS_ASSIGN_OR_RETURN(DirTable * tb, WriteTable(static_cast<uint32_t>(t)));
      if (one == nullptr) {
        one = tb;
      } else {
        if (many.empty()) many.push_back(one);
        many.push_back(tb);
      }
    }
    for (uint64_t i = first; i < end; i++) {
      DirTable* tb = many.empty() ? one : many[i / kDirTableSlots - first / kDirTableSlots];
      tb->slot[i % kDirTableSlots] = blk;
    }
    return Status::Ok();
  }

  Status CheckLeafCommon(uint64_t blk, const DirLeaf* l) const {
    if (l->dir_ino != ino_) {
      return Corrupt(ino_, "leaf", blk, fmt::format("belongs to dir {}", l->dir_ino));
    }
    if (l->used > kDirLeafSpace) {
      return Corrupt(ino_, "leaf", blk, fmt::format("used bytes {} exceed the space", l->used));
    }
    if (size_t(l->count) * kMinEntry > l->used) {
      return Corrupt(ino_, "leaf", blk,
                     fmt::format("{} entries cannot fit in {} bytes", l->count, l->used));
    }
    return Status::Ok();
  }

  // Reads the primary leaf `blk` reached through slot `idx` and validates its header.
  Result<const DirLeaf*> ReadPrimary(uint64_t blk, uint64_t idx) {
    AGFS_ASSIGN_OR_RETURN(const DirLeaf* l, ReadBlock<DirLeaf>(txn_, ino_, "leaf", blk,
                                                               BlockType::kDirLeaf, LeafLock(blk)));
    AGFS_RETURN_IF_ERROR(CheckLeafCommon(blk, l));
    if (l->local_depth > gd_) {
      return Corrupt(ino_, "leaf", blk,
                     fmt::format("local depth {} exceeds global depth {}", l->local_depth, gd_));
    }
    if ((idx >> (gd_ - l->local_depth)) != l->prefix) {
      return Corrupt(ino_, "leaf", blk,
                     fmt::format("prefix {:#x}/{} does not cover table slot {}", l->prefix,
                                 l->local_depth, idx));
    }
    return l;
  }

  // Reads chain block `blk` of the chain whose primary is `pblk`/`p`.
  Result<const DirLeaf*> ReadChain(uint64_t blk, uint64_t pblk, const DirLeaf* p) {
    AGFS_ASSIGN_OR_RETURN(
        const DirLeaf* l,
        ReadBlock<DirLeaf>(txn_, ino_, "leaf", blk, BlockType::kDirLeaf, LeafLock(pblk)));
    AGFS_RETURN_IF_ERROR(CheckLeafCommon(blk, l));
    if (l->prefix != p->prefix || l->local_depth != p->local_depth) {
      return Corrupt(ino_, "leaf", blk,
                     fmt::format("chain block of leaf {} has another prefix or depth", pblk));
    }
    return l;
  }

  Result<DirLeaf*> WriteLeaf(uint64_t blk, uint64_t pblk) {
    return WriteBlock<DirLeaf>(txn_, ino_, "leaf", blk, BlockType::kDirLeaf, LeafLock(pblk));
  }

  // Follows `l`'s next pointer; `n` is the number of blocks visited so far.
  Status NextGuard(uint64_t blk, size_t n) const {
    if (n >= root()->leaves || n >= kMaxChain) {
      return Corrupt(ino_, "leaf", blk, "overflow chain is longer than the leaf count (loop?)");
    }
    return Status::Ok();
  }

  Status SeekLeaf(uint64_t blk, const DirLeaf* l, uint64_t hash, std::string_view name, bool full,
                  Seek* s) const {
    const char* err = SeekKey(l->entries, l->used, l->count, hash, name, full, s);
    if (err != nullptr) return Corrupt(ino_, "leaf", blk, err);
    if (s->walked_all && s->end != l->used) {
      return Corrupt(ino_, "leaf", blk, "used bytes do not match the entries");
    }
    return Status::Ok();
  }

  // Finds the block of the chain holding `name`.
  struct Found {
    uint64_t primary = 0;
    uint64_t idx = 0;
    uint64_t blk = 0;   // 0: not found
    uint64_t prev = 0;  // previous block in the chain (0 when blk is the primary)
    const DirLeaf* l = nullptr;
    Seek s;
  };
  Status Find(uint64_t hash, std::string_view name, bool full, Found* f) {
    f->idx = SlotIndex(hash, gd_);
    AGFS_ASSIGN_OR_RETURN(f->primary, SlotAt(f->idx));
    AGFS_ASSIGN_OR_RETURN(const DirLeaf* p, ReadPrimary(f->primary, f->idx));
    uint64_t blk = f->primary, prev = 0;
    const DirLeaf* l = p;
    for (size_t n = 1;; n++) {
      AGFS_RETURN_IF_ERROR(SeekLeaf(blk, l, hash, name, full, &f->s));
      if (f->s.found) {
        f->blk = blk;
        f->prev = prev;
        f->l = l;
        return Status::Ok();
      }
      if (l->next == 0) break;
      AGFS_RETURN_IF_ERROR(NextGuard(blk, n));
      prev = blk;
      blk = l->next;
      AGFS_ASSIGN_OR_RETURN(l, ReadChain(blk, f->primary, p));
    }
    f->blk = 0;
    return Status::Ok();
  }

  // --- counters (w_ only) ---
  void AddEntries(int64_t delta) {
    wroot()->entries = root()->entries + delta;
    w_->size = root()->entries;
  }
  void AddLeaves(int64_t delta) {
    wroot()->leaves = root()->leaves + delta;
    w_->blocks = w_->blocks + delta;
  }

  // Allocates a new primary leaf: its lock is its own LeafLock (SelfLock, meta_txn.h).
  Result<std::pair<uint64_t, DirLeaf*>> NewPrimary(uint64_t hint) {
    AGFS_ASSIGN_OR_RETURN(
        auto nb, NewDirBlock(txn_, ino_, BlockType::kDirLeaf, SelfLock(LockKind::kDirLeaf), hint));
    return std::make_pair(nb.first, reinterpret_cast<DirLeaf*>(nb.second));
  }
  Result<std::pair<uint64_t, DirLeaf*>> NewChain(uint64_t pblk, uint64_t hint) {
    AGFS_ASSIGN_OR_RETURN(auto nb,
                          NewDirBlock(txn_, ino_, BlockType::kDirLeaf, LeafLock(pblk), hint));
    return std::make_pair(nb.first, reinterpret_cast<DirLeaf*>(nb.second));
  }

  void FillLeaf(DirLeaf* l, uint64_t prefix, uint32_t ld, uint64_t next, const uint8_t* bytes,
                size_t n, size_t count) {
    l->dir_ino = ino_;
    l->prefix = prefix;
    l->next = next;
    l->local_depth = static_cast<uint16_t>(ld);
    l->count = static_cast<uint16_t>(count);
    l->used = static_cast<uint16_t>(n);
    l->pad = 0;
    l->pad2 = 0;
    l->pad3 = 0;
    if (n > 0) std::memmove(l->entries, bytes, n);
    std::memset(l->entries + n, 0, kDirLeafSpace - n);
  }

  Status AddEntry(uint64_t hash, std::string_view name, uint64_t ino, uint8_t type);
  Status RemoveEntry(uint64_t hash, std::string_view name);
  Result<bool> Splittable(uint64_t pblk, uint64_t idx, uint64_t hash);
  Status Split(uint64_t pblk, uint64_t idx);
  Status DoubleTable();
  Status AppendChain(uint64_t pblk, const DirLeaf* p, uint64_t last, uint64_t hash,
                     std::string_view name, uint64_t ino, uint8_t type);
  Status MergeEmpty(uint64_t blk, uint64_t idx);
  Status Gather(uint64_t pblk, uint64_t idx, std::vector<LeafRef>* chain);

  MetaTxn& txn_;
  uint64_t ino_;
  const InodeBlock& d_;
  InodeBlock* w_;
  uint32_t gd_ = 0;
};

// Reads the primary at slot idx and its whole chain.
Status Hashed::Gather(uint64_t pblk, uint64_t idx, std::vector<LeafRef>* chain) {
  chain->clear();
  AGFS_ASSIGN_OR_RETURN(const DirLeaf* p, ReadPrimary(pblk, idx));
  chain->push_back({pblk, p});
  const DirLeaf* l = p;
  uint64_t blk = pblk;
  std::unordered_set<uint64_t> seen;  // used only for long chains
  while (l->next != 0) {
    AGFS_RETURN_IF_ERROR(NextGuard(blk, chain->size()));
    const uint64_t next = l->next;
    // A loop would make callers gather the same entries again and again.
    bool loop = false;
    if (chain->size() < 32) {
      for (const LeafRef& r : *chain) loop = loop || r.blk == next;
    } else {
      if (seen.empty()) {
        for (const LeafRef& r : *chain) seen.insert(r.blk);
      }
      loop = !seen.insert(next).second;
    }
    if (loop)
      return Corrupt(ino_, "leaf", blk, fmt::format("overflow chain loops back to {}", next));
    blk = next;
    AGFS_ASSIGN_OR_RETURN(l, ReadChain(blk, pblk, p));
    chain->push_back({blk, l});
  }
  return Status::Ok();
}

Status Hashed::AddEntry(uint64_t hash, std::string_view name, uint64_t ino, uint8_t type) {
  const size_t sz = kDirEntryFixed + name.size();
  for (int round = 0; round < kMaxAddRounds; round++) {
    uint64_t idx = SlotIndex(hash, gd_);
    AGFS_ASSIGN_OR_RETURN(uint64_t pblk, SlotAt(idx));
    AGFS_ASSIGN_OR_RETURN(const DirLeaf* p, ReadPrimary(pblk, idx));
    uint64_t room_blk = 0, last = pblk;
    size_t room_off = 0;
    const DirLeaf* l = p;
    uint64_t blk = pblk;
    for (size_t n = 1;; n++) {
      Seek s;
      AGFS_RETURN_IF_ERROR(SeekLeaf(blk, l, hash, name, true, &s));
      if (s.found) {
        return Err(Code::kExists, fmt::format("dir {}: '{}' exists", ino_, name));
      }
      if (room_blk == 0 && l->used + sz <= kDirLeafSpace) {
        room_blk = blk;
        room_off = s.off;
      }
      last = blk;
      if (l->next == 0) break;
      AGFS_RETURN_IF_ERROR(NextGuard(blk, n));
      blk = l->next;
      AGFS_ASSIGN_OR_RETURN(l, ReadChain(blk, pblk, p));
    }
    if (room_blk != 0) {
      AGFS_ASSIGN_OR_RETURN(DirLeaf * wl, WriteLeaf(room_blk, pblk));
      uint8_t* e = wl->entries;
      std::memmove(e + room_off + sz, e + room_off, wl->used - room_off);
      PutEntry(e + room_off, hash, ino, type, name);
      wl->used = static_cast<uint16_t>(wl->used + sz);
      wl->count = static_cast<uint16_t>(wl->count + 1);
      AddEntries(1);
      return Status::Ok();
    }
    AGFS_ASSIGN_OR_RETURN(bool can_split, Splittable(pblk, idx, hash));
    if (!can_split) return AppendChain(pblk, p, last, hash, name, ino, type);
    AGFS_RETURN_IF_ERROR(Split(pblk, idx));
  }
  return CorruptRoot(ino_, "splitting leaves did not make room");
}

// A full leaf is worth splitting when it can go one level deeper and its entries plus
// the new hash do not all share the top kDirMaxDepth bits.
Result<bool> Hashed::Splittable(uint64_t pblk, uint64_t idx, uint64_t hash) {
  std::vector<LeafRef> chain;
  AGFS_RETURN_IF_ERROR(Gather(pblk, idx, &chain));
  uint32_t ld = chain[0].l->local_depth;
  if (ld >= kDirMaxDepth) return false;
  if (ld == gd_ && (gd_ + 1 > kDirMaxDepth || TablesFor(gd_ + 1) > kDirMaxTableBlocks)) {
    return false;
  }
  const uint64_t top = hash >> (63 - kDirMaxDepth);
  bool differs = false;
  for (const LeafRef& r : chain) {
    const char* err = WalkEntries(r.l->entries, r.l->used, r.l->count, [&](const uint8_t* e) {
      if ((Ld64(e) >> (63 - kDirMaxDepth)) != top) differs = true;
      return !differs;
    });
    if (err != nullptr) return Corrupt(ino_, "leaf", r.blk, err);
    if (differs) return true;
  }
  return false;
}

Status Hashed::DoubleTable() {
  const uint32_t old_t = TablesFor(gd_), new_t = TablesFor(gd_ + 1);
  if (gd_ + 1 > kDirMaxDepth || new_t > kDirMaxTableBlocks) {
    return Err(Code::kNoSpace, fmt::format("dir {}: hash table at its maximum size", ino_));
  }
  const uint64_t old_n = nslots();
  std::vector<uint64_t> slots(old_n);
  for (uint32_t t = 0; t < old_t; t++) {
    AGFS_ASSIGN_OR_RETURN(const DirTable* tb, ReadTable(t));
    for (uint64_t i = 0; i < kDirTableSlots && uint64_t(t) * kDirTableSlots + i < old_n; i++) {
      slots[t * kDirTableSlots + i] = tb->slot[i];
    }
  }
  // Allocate the new table blocks first; nothing changes if that fails.
  std::vector<std::pair<uint64_t, DirTable*>> fresh;
  for (uint32_t t = old_t; t < new_t; t++) {
    auto nb = NewDirBlock(txn_, ino_, BlockType::kDirTable, InodeLock(ino_), ino_);
    if (!nb.ok()) {
      for (auto& f : fresh) (void)txn_.Free(f.first, 1);
      return nb.status();
    }
    fresh.emplace_back(nb->first, reinterpret_cast<DirTable*>(nb->second));
  }
  std::vector<DirTable*> tables;
  for (uint32_t t = 0; t < old_t; t++) {
    auto tb = WriteTable(t);
    if (!tb.ok()) {
      for (auto& f : fresh) (void)txn_.Free(f.first, 1);
      return tb.status();
    }
    tables.push_back(*tb);
  }
  for (uint32_t t = old_t; t < new_t; t++) {
    DirTable* tb = fresh[t - old_t].second;
    tb->dir_ino = ino_;
    tb->index = t;
    tb->pad = 0;
    tables.push_back(tb);
    St64(w_->data + kRootTableOff + 8 * size_t(t), fresh[t - old_t].first);
  }
  const uint64_t new_n = old_n * 2;
  for (uint64_t i = 0; i < new_n; i++)
    tables[i / kDirTableSlots]->slot[i % kDirTableSlots] = slots[i / 2];
  for (uint64_t i = new_n; i < uint64_t(new_t) * kDirTableSlots; i++) {
    tables[i / kDirTableSlots]->slot[i % kDirTableSlots] = 0;
  }
  wroot()->global_depth = static_cast<uint8_t>(gd_ + 1);
  gd_++;
  w_->blocks += new_t - old_t;
  return Status::Ok();
}

// Greedy packing of sorted entry bytes into leaf-sized pieces.
struct Piece {
  size_t start, end, count;
};
std::vector<Piece> PackPieces(const std::vector<uint8_t>& buf) {
  std::vector<Piece> out{{0, 0, 0}};
  size_t off = 0;
  while (off < buf.size()) {
    size_t sz = SizeAt(buf.data() + off);
    if (off + sz - out.back().start > kDirLeafSpace) out.push_back({off, off, 0});
    off += sz;
    out.back().end = off;
    out.back().count++;
  }
  return out;
}

Status Hashed::Split(uint64_t pblk, uint64_t idx) {
  std::vector<LeafRef> chain;
  AGFS_RETURN_IF_ERROR(Gather(pblk, idx, &chain));
  const uint32_t ld = chain[0].l->local_depth;
  const uint64_t prefix = chain[0].l->prefix;
  if (ld == gd_) AGFS_RETURN_IF_ERROR(DoubleTable());
  const uint32_t nd = ld + 1;

  // Partition the entries, in (hash, name) order, by hash bit nd.
  std::vector<uint8_t> side[2];
  auto take = [&](const uint8_t* e) {
    std::vector<uint8_t>& v = side[HashBit(Ld64(e), nd)];
    v.insert(v.end(), e, e + SizeAt(e));
  };
  if (chain.size() == 1) {
    const char* err = WalkEntries(chain[0].l->entries, chain[0].l->used, chain[0].l->count,
                                  [&](const uint8_t* e) {
                                    take(e);
                                    return true;
                                  });
    if (err != nullptr) return Corrupt(ino_, "leaf", pblk, err);
  } else {
    std::vector<const uint8_t*> refs;
    for (const LeafRef& r : chain) {
      const char* err = WalkEntries(r.l->entries, r.l->used, r.l->count, [&](const uint8_t* e) {
        refs.push_back(e);
        return true;
      });
      if (err != nullptr) return Corrupt(ino_, "leaf", r.blk, err);
    }
    std::sort(refs.begin(), refs.end(), EntryLess);
    for (const uint8_t* e : refs) take(e);
  }
  const std::vector<Piece> p0 = PackPieces(side[0]), p1 = PackPieces(side[1]);

  // Allocate every new block before changing anything.
  std::vector<uint64_t> allocated;
  auto undo = [&](Status st) {
    for (uint64_t b : allocated) (void)txn_.Free(b, 1);
    return st;
  };
  std::vector<std::pair<uint64_t, DirLeaf*>> lo, hi;  // blocks of each side, in chain order
  {
    auto np = NewPrimary(pblk);
    if (!np.ok()) return np.status();
    allocated.push_back(np->first);
    hi.push_back(*np);
  }
  const uint64_t nblk = hi[0].first;
  for (size_t i = 1; i < p1.size(); i++) {
    auto nb = NewChain(nblk, hi.back().first);
    if (!nb.ok()) return undo(nb.status());
    allocated.push_back(nb->first);
    hi.push_back(*nb);
  }
  for (size_t i = 0; i < p0.size(); i++) {
    if (i < chain.size()) {
      auto w = WriteLeaf(chain[i].blk, pblk);
      if (!w.ok()) return undo(w.status());
      lo.emplace_back(chain[i].blk, *w);
    } else {
      auto nb = NewChain(pblk, lo.back().first);
      if (!nb.ok()) return undo(nb.status());
      allocated.push_back(nb->first);
      lo.push_back(*nb);
    }
  }
  // The table slots of the upper half move to the new leaf.
  const uint64_t hi_prefix = prefix * 2 + 1, lo_prefix = prefix * 2;
  const uint32_t shift = gd_ - nd;
  Status st = SetSlots(hi_prefix << shift, uint64_t(1) << shift, nblk);
  if (!st.ok()) return undo(st);

  for (size_t i = 0; i < p1.size(); i++) {
    uint64_t next = i + 1 < hi.size() ? hi[i + 1].first : 0;
    FillLeaf(hi[i].second, hi_prefix, nd, next, side[1].data() + p1[i].start,
             p1[i].end - p1[i].start, p1[i].count);
  }
  for (size_t i = 0; i < p0.size(); i++) {
    uint64_t next = i + 1 < lo.size() ? lo[i + 1].first : 0;
    FillLeaf(lo[i].second, lo_prefix, nd, next, side[0].data() + p0[i].start,
             p0[i].end - p0[i].start, p0[i].count);
  }
  int64_t freed = 0;
  for (size_t i = p0.size(); i < chain.size(); i++) {
    AGFS_RETURN_IF_ERROR(txn_.Free(chain[i].blk, 1));
    freed++;
  }
  AddLeaves(int64_t(allocated.size()) - freed);
  return Status::Ok();
}

Status Hashed::AppendChain(uint64_t pblk, const DirLeaf* p, uint64_t last, uint64_t hash,
                           std::string_view name, uint64_t ino, uint8_t type) {
  AGFS_ASSIGN_OR_RETURN(DirLeaf * wl, WriteLeaf(last, pblk));
  AGFS_ASSIGN_OR_RETURN(auto nb, NewChain(pblk, last));
  uint8_t tmp[kDirEntryFixed + kMaxNameLen];
  PutEntry(tmp, hash, ino, type, name);
  FillLeaf(nb.second, p->prefix, p->local_depth, 0, tmp, kDirEntryFixed + name.size(), 1);
  wl->next = nb.first;
  AddLeaves(1);
  AddEntries(1);
  return Status::Ok();
}

Status Hashed::RemoveEntry(uint64_t hash, std::string_view name) {
  Found f;
  AGFS_RETURN_IF_ERROR(Find(hash, name, true, &f));
  if (f.blk == 0) return Err(Code::kNotFound, fmt::format("dir {}: no entry '{}'", ino_, name));
  AGFS_ASSIGN_OR_RETURN(DirLeaf * wl, WriteLeaf(f.blk, f.primary));
  uint8_t* e = wl->entries;
  size_t off = f.s.off, sz = f.s.size;
  std::memmove(e + off, e + off + sz, wl->used - off - sz);
  std::memset(e + wl->used - sz, 0, sz);
  wl->used = static_cast<uint16_t>(wl->used - sz);
  wl->count = static_cast<uint16_t>(wl->count - 1);
  AddEntries(-1);
  if (wl->count != 0) return Status::Ok();

  if (f.blk != f.primary) {
    // An emptied chain block is unlinked and freed.
    AGFS_ASSIGN_OR_RETURN(DirLeaf * pv, WriteLeaf(f.prev, f.primary));
    pv->next = wl->next;
    AGFS_RETURN_IF_ERROR(txn_.Free(f.blk, 1));
    AddLeaves(-1);
    return Status::Ok();
  }
  if (wl->next != 0) {
    // An emptied primary takes over its successor.
    uint64_t nblk = wl->next;
    AGFS_ASSIGN_OR_RETURN(const DirLeaf* nl, ReadChain(nblk, f.primary, wl));
    FillLeaf(wl, wl->prefix, wl->local_depth, nl->next, nl->entries, nl->used, nl->count);
    AGFS_RETURN_IF_ERROR(txn_.Free(nblk, 1));
    AddLeaves(-1);
    return Status::Ok();
  }
  return MergeEmpty(f.primary, f.idx);
}

// `blk` is an empty primary leaf without a chain, reached through slot idx.
Status Hashed::MergeEmpty(uint64_t blk, uint64_t idx) {
  for (int round = 0; round <= kDirMaxDepth; round++) {
    AGFS_ASSIGN_OR_RETURN(const DirLeaf* l, ReadPrimary(blk, idx));
    const uint32_t ld = l->local_depth;
    if (ld == 0 || l->count != 0 || l->next != 0) return Status::Ok();
    const uint32_t shift = gd_ - ld;
    const uint64_t bprefix = l->prefix ^ 1;
    const uint64_t bidx = bprefix << shift;
    AGFS_ASSIGN_OR_RETURN(uint64_t bblk, SlotAt(bidx));
    if (bblk == blk) return Corrupt(ino_, "leaf", blk, "is its own buddy in the table");
    AGFS_ASSIGN_OR_RETURN(const DirLeaf* b, ReadPrimary(bblk, bidx));
    if (b->local_depth != ld || b->next != 0) return Status::Ok();
    const uint64_t my_first = l->prefix << shift;
    AGFS_ASSIGN_OR_RETURN(DirLeaf * wb, WriteLeaf(bblk, bblk));
    AGFS_RETURN_IF_ERROR(SetSlots(my_first, uint64_t(1) << shift, bblk));
    wb->local_depth = static_cast<uint16_t>(ld - 1);
    wb->prefix = bprefix >> 1;
    AGFS_RETURN_IF_ERROR(txn_.Free(blk, 1));
    AddLeaves(-1);
    if (wb->count != 0) return Status::Ok();
    blk = bblk;
    idx = bidx;
  }
  return Status::Ok();
}

// ---------------------------------------------------------------------------------

Status CheckKind(uint64_t dir_ino, const InodeBlock& d) {
  if (d.data_kind != uint8_t(DataKind::kInline) && d.data_kind != uint8_t(DataKind::kDirHash)) {
    return Err(Code::kInvalid,
               fmt::format("dir {}: data kind {} is not a directory layout", dir_ino, d.data_kind));
  }
  return Status::Ok();
}
bool IsInline(const InodeBlock& d) { return d.data_kind == uint8_t(DataKind::kInline); }

// Moves the inline entries into a new hashed structure (gd 0, one leaf).
Status ConvertToHashed(MetaTxn& txn, uint64_t dir_ino, InodeBlock* d, size_t used) {
  AGFS_ASSIGN_OR_RETURN(
      auto tb, NewDirBlock(txn, dir_ino, BlockType::kDirTable, InodeLock(dir_ino), dir_ino));
  auto nl = NewDirBlock(txn, dir_ino, BlockType::kDirLeaf, SelfLock(LockKind::kDirLeaf), dir_ino);
  if (!nl.ok()) {
    (void)txn.Free(tb.first, 1);
    return nl.status();
  }
  DirTable* t = reinterpret_cast<DirTable*>(tb.second);
  t->dir_ino = dir_ino;
  t->index = 0;
  t->slot[0] = nl->first;
  DirLeaf* l = reinterpret_cast<DirLeaf*>(nl->second);
  l->dir_ino = dir_ino;
  l->prefix = 0;
  l->next = 0;
  l->local_depth = 0;
  l->count = static_cast<uint16_t>(d->size);
  l->used = static_cast<uint16_t>(used);
  std::memcpy(l->entries, d->data, used);

  std::memset(d->data, 0, kInodeDataSize);
  DirRoot* r = reinterpret_cast<DirRoot*>(d->data);
  r->global_depth = 0;
  r->entries = d->size;
  r->leaves = 1;
  St64(d->data + kRootTableOff, tb.first);
  d->data_kind = uint8_t(DataKind::kDirHash);
  d->blocks += 2;
  return Status::Ok();
}

}  // namespace

// ---------------------------------------------------------------------------------
// Public API.

uint64_t NameHash(uint64_t seed, std::string_view name) {
  uint64_t h =
      g_hash_fn != nullptr ? g_hash_fn(seed, name) : Hash64(name.data(), name.size(), seed);
  h >>= 1;
  return h < kMinDirHash ? kMinDirHash : h;
}

HashFn SetHashFnForTesting(HashFn fn) {
  HashFn old = g_hash_fn;
  g_hash_fn = fn;
  return old;
}

Status ValidateName(std::string_view name) {
  if (name.empty()) return Err(Code::kInvalid, "empty name");
  if (name.size() > kMaxNameLen) {
    return Err(Code::kNameTooLong, fmt::format("name of {} bytes", name.size()));
  }
  if (name == "." || name == "..") return Err(Code::kInvalid, "'.' and '..' are not stored");
  if (std::memchr(name.data(), '/', name.size()) != nullptr) {
    return Err(Code::kInvalid, "name contains '/'");
  }
  if (std::memchr(name.data(), '\0', name.size()) != nullptr) {
    return Err(Code::kInvalid, "name contains NUL");
  }
  return Status::Ok();
}

void InitEmpty(InodeBlock* d) {
  d->data_kind = uint8_t(DataKind::kInline);
  std::memset(d->data, 0, kInodeDataSize);
  d->size = 0;
}

Result<Entry> Lookup(MetaTxn& txn, uint64_t dir_ino, const InodeBlock& d, std::string_view name) {
  AGFS_RETURN_IF_ERROR(ValidateName(name));
  AGFS_RETURN_IF_ERROR(CheckKind(dir_ino, d));
  const uint64_t hash = NameHash(d.hash_seed, name);
  Entry out;
  if (IsInline(d)) {
    Seek s;
    const char* err = InlineSeek(d, hash, name, false, &s);
    if (err != nullptr) return CorruptInline(dir_ino, err);
    if (!s.found) return Err(Code::kNotFound, fmt::format("dir {}: no entry '{}'", dir_ino, name));
    FillEntry(d.data + s.off, &out);
    return out;
  }
  Hashed h(txn, dir_ino, d, nullptr);
  AGFS_RETURN_IF_ERROR(h.Load());
  Hashed::Found f;
  AGFS_RETURN_IF_ERROR(h.Find(hash, name, false, &f));
  if (f.blk == 0) return Err(Code::kNotFound, fmt::format("dir {}: no entry '{}'", dir_ino, name));
  FillEntry(f.l->entries + f.s.off, &out);
  return out;
}

Status Add(MetaTxn& txn, uint64_t dir_ino, InodeBlock* d, std::string_view name, uint64_t ino,
           uint8_t type) {
  AGFS_RETURN_IF_ERROR(ValidateName(name));
  if (ino == 0) return Err(Code::kInvalid, fmt::format("dir {}: entry for inode 0", dir_ino));
  AGFS_RETURN_IF_ERROR(CheckKind(dir_ino, *d));
  const uint64_t hash = NameHash(d->hash_seed, name);
  if (IsInline(*d)) {
    Seek s;
    const char* err = InlineSeek(*d, hash, name, true, &s);
    if (err != nullptr) return CorruptInline(dir_ino, err);
    if (s.found) return Err(Code::kExists, fmt::format("dir {}: '{}' exists", dir_ino, name));
    const size_t sz = kDirEntryFixed + name.size();
    if (s.end + sz <= kInodeDataSize) {
      std::memmove(d->data + s.off + sz, d->data + s.off, s.end - s.off);
      PutEntry(d->data + s.off, hash, ino, type, name);
      d->size++;
      return Status::Ok();
    }
    AGFS_RETURN_IF_ERROR(ConvertToHashed(txn, dir_ino, d, s.end));
  }
  Hashed h(txn, dir_ino, *d, d);
  AGFS_RETURN_IF_ERROR(h.Load());
  return h.AddEntry(hash, name, ino, type);
}

Status Remove(MetaTxn& txn, uint64_t dir_ino, InodeBlock* d, std::string_view name) {
  AGFS_RETURN_IF_ERROR(ValidateName(name));
  AGFS_RETURN_IF_ERROR(CheckKind(dir_ino, *d));
  const uint64_t hash = NameHash(d->hash_seed, name);
  if (IsInline(*d)) {
    Seek s;
    const char* err = InlineSeek(*d, hash, name, true, &s);
    if (err != nullptr) return CorruptInline(dir_ino, err);
    if (!s.found) return Err(Code::kNotFound, fmt::format("dir {}: no entry '{}'", dir_ino, name));
    std::memmove(d->data + s.off, d->data + s.off + s.size, s.end - s.off - s.size);
    std::memset(d->data + s.end - s.size, 0, s.size);
    d->size--;
    return Status::Ok();
  }
  Hashed h(txn, dir_ino, *d, d);
  AGFS_RETURN_IF_ERROR(h.Load());
  return h.RemoveEntry(hash, name);
}

Status Replace(MetaTxn& txn, uint64_t dir_ino, InodeBlock* d, std::string_view name, uint64_t ino,
               uint8_t type) {
  AGFS_RETURN_IF_ERROR(ValidateName(name));
  if (ino == 0) return Err(Code::kInvalid, fmt::format("dir {}: entry for inode 0", dir_ino));
  AGFS_RETURN_IF_ERROR(CheckKind(dir_ino, *d));
  const uint64_t hash = NameHash(d->hash_seed, name);
  uint8_t* e = nullptr;
  if (IsInline(*d)) {
    Seek s;
    const char* err = InlineSeek(*d, hash, name, true, &s);
    if (err != nullptr) return CorruptInline(dir_ino, err);
    if (!s.found) return Err(Code::kNotFound, fmt::format("dir {}: no entry '{}'", dir_ino, name));
    e = d->data + s.off;
  } else {
    Hashed h(txn, dir_ino, *d, d);
    AGFS_RETURN_IF_ERROR(h.Load());
    Hashed::Found f;
    AGFS_RETURN_IF_ERROR(h.Find(hash, name, true, &f));
    if (f.blk == 0)
      return Err(Code::kNotFound, fmt::format("dir {}: no entry '{}'", dir_ino, name));
    AGFS_ASSIGN_OR_RETURN(DirLeaf * wl, h.WriteLeaf(f.blk, f.primary));
    e = wl->entries + f.s.off;
  }
  St64(e + kOffIno, ino);
  e[kOffType] = type;
  return Status::Ok();
}

Result<bool> Empty(MetaTxn& txn, uint64_t dir_ino, const InodeBlock& d) {
  (void)txn;
  AGFS_RETURN_IF_ERROR(CheckKind(dir_ino, d));
  if (IsInline(d)) return d.size == 0;
  const DirRoot* r = reinterpret_cast<const DirRoot*>(d.data);
  if (r->entries != d.size) {
    return CorruptRoot(dir_ino,
                       fmt::format("entry count {} but inode size {}", r->entries, d.size));
  }
  return d.size == 0;
}

Status List(MetaTxn& txn, uint64_t dir_ino, const InodeBlock& d, uint64_t after,
            const std::function<bool(const Entry&)>& fn) {
  AGFS_RETURN_IF_ERROR(CheckKind(dir_ino, d));
  if (after >= kMaxCookie) return Status::Ok();
  Entry ent;
  bool stop = false;
  if (IsInline(d)) {
    if (d.size > kInodeDataSize / kMinEntry)
      return CorruptInline(dir_ino, "entry count exceeds the inline space");
    Seek s;
    const char* err =
        SeekKey(d.data, kInodeDataSize, d.size, after + 1, std::string_view(), true, &s);
    if (err != nullptr) return CorruptInline(dir_ino, err);
    for (size_t off = s.off; off < s.end && !stop; off += SizeAt(d.data + off)) {
      FillEntry(d.data + off, &ent);
      stop = !fn(ent);
    }
    return Status::Ok();
  }
  Hashed h(txn, dir_ino, d, nullptr);
  AGFS_RETURN_IF_ERROR(h.Load());
  std::vector<LeafRef> chain;
  std::vector<const uint8_t*> refs;
  uint64_t idx = SlotIndex(after + 1, h.gd());
  while (idx < h.nslots() && !stop) {
    AGFS_ASSIGN_OR_RETURN(uint64_t pblk, h.SlotAt(idx));
    AGFS_ASSIGN_OR_RETURN(const DirLeaf* p, h.ReadPrimary(pblk, idx));
    if (p->next == 0) {
      const char* err =
          WalkEntries(p->entries, p->used, p->count, [&](const uint8_t*) { return true; });
      if (err != nullptr) return Corrupt(dir_ino, "leaf", pblk, err);
      for (size_t off = 0, i = 0; i < p->count && !stop; i++, off += SizeAt(p->entries + off)) {
        const uint8_t* e = p->entries + off;
        if (Ld64(e) <= after) continue;
        FillEntry(e, &ent);
        stop = !fn(ent);
      }
    } else {
      AGFS_RETURN_IF_ERROR(h.Gather(pblk, idx, &chain));
      refs.clear();
      for (const LeafRef& r : chain) {
        const char* err = WalkEntries(r.l->entries, r.l->used, r.l->count, [&](const uint8_t* e) {
          if (Ld64(e) > after) refs.push_back(e);
          return true;
        });
        if (err != nullptr) return Corrupt(dir_ino, "leaf", r.blk, err);
      }
      std::sort(refs.begin(), refs.end(), EntryLess);
      for (size_t i = 0; i < refs.size() && !stop; i++) {
        FillEntry(refs[i], &ent);
        stop = !fn(ent);
      }
    }
    const uint32_t shift = h.gd() - p->local_depth;
    idx = (p->prefix + 1) << shift;
  }
  return Status::Ok();
}

Status FreeAll(MetaTxn& txn, uint64_t dir_ino, InodeBlock* d) {
  AGFS_RETURN_IF_ERROR(CheckKind(dir_ino, *d));
  if (IsInline(*d)) {
    InitEmpty(d);
    return Status::Ok();
  }
  Hashed h(txn, dir_ino, *d, d);
  AGFS_RETURN_IF_ERROR(h.Load());
  std::vector<uint64_t> blocks;
  const uint32_t ntab = TablesFor(h.gd());
  std::vector<LeafRef> chain;
  for (uint32_t t = 0; t < ntab; t++) {
    AGFS_ASSIGN_OR_RETURN(const DirTable* tb, h.ReadTable(t));
    blocks.push_back(h.TableBlock(t));
    uint64_t base = uint64_t(t) * kDirTableSlots;
    uint64_t i = 0;
    while (i < kDirTableSlots && base + i < h.nslots()) {
      uint64_t pblk = tb->slot[i];
      if (pblk == 0) {
        return Corrupt(dir_ino, "table", h.TableBlock(t),
                       fmt::format("slot {} is empty", base + i));
      }
      AGFS_RETURN_IF_ERROR(h.Gather(pblk, base + i, &chain));
      uint64_t span = uint64_t(1) << (h.gd() - chain[0].l->local_depth);
      // The leaf's range starts here (ranges are aligned) and may cross table blocks.
      if (((base + i) & (span - 1)) != 0) {
        return Corrupt(dir_ino, "leaf", pblk, "table slot range is not aligned to its depth");
      }
      for (const LeafRef& r : chain) blocks.push_back(r.blk);
      uint64_t stop = std::min<uint64_t>(span, kDirTableSlots - i);
      for (uint64_t k = 1; k < stop; k++) {
        if (tb->slot[i + k] != pblk) {
          return Corrupt(dir_ino, "table", h.TableBlock(t),
                         fmt::format("slot {} disagrees with leaf {}'s depth", base + i + k, pblk));
        }
      }
      i += span;
      if (span > kDirTableSlots) {  // one leaf covers several whole table blocks
        uint64_t skip_tables = span / kDirTableSlots - 1;
        for (uint64_t k = 0; k < skip_tables; k++) {
          t++;
          AGFS_ASSIGN_OR_RETURN(const DirTable* tb2, h.ReadTable(t));
          blocks.push_back(h.TableBlock(t));
          for (uint64_t j = 0; j < kDirTableSlots; j++) {
            if (tb2->slot[j] != pblk) {
              return Corrupt(dir_ino, "table", h.TableBlock(t),
                             fmt::format("slot {} disagrees with leaf {}'s depth",
                                         uint64_t(t) * kDirTableSlots + j, pblk));
            }
          }
        }
      }
    }
  }
  std::vector<uint64_t> sorted = blocks;
  std::sort(sorted.begin(), sorted.end());
  if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end()) {
    return CorruptRoot(dir_ino, "a block is referenced twice");
  }
  for (uint64_t b : blocks) AGFS_RETURN_IF_ERROR(txn.Free(b, 1));
  d->blocks = d->blocks >= blocks.size() ? d->blocks - blocks.size() : 0;
  InitEmpty(d);
  return Status::Ok();
}

// ---------------------------------------------------------------------------------
// Check.

namespace {

class Checker {
 public:
  Checker(MetaTxn& txn, uint64_t ino, const InodeBlock& d, std::vector<std::string>* out,
          const std::function<void(const Entry&)>& fn)
      : txn_(txn), ino_(ino), d_(d), out_(out), fn_(fn) {}

  void Problem(std::string s) {
    if (first_.empty()) first_ = s;
    n_++;
    if (out_ != nullptr) out_->push_back(std::move(s));
  }
  void ProblemAt(std::string_view what, uint64_t blk, std::string_view msg) {
    Problem(fmt::format("dir {}: {} {}: {}", ino_, what, blk, msg));
  }

  // Checks the entries of one area. `what`/`blk` name it; range = leaf prefix/depth
  // (ld < 0 for inline). Returns the number of entries walked, and appends the keys
  // to `keys` when non-null (for duplicate detection across a chain).
  size_t CheckArea(std::string_view what, uint64_t blk, const uint8_t* p, size_t used, size_t count,
                   bool exact_used, uint64_t prefix, int ld, std::vector<const uint8_t*>* keys) {
    size_t off = 0, i = 0;
    const uint8_t* prev = nullptr;
    for (; i < count; i++) {
      if (used - off < kDirEntryFixed) {
        ProblemAt(what, blk, fmt::format("entry {} header runs past the used bytes", i));
        return i;
      }
      const uint8_t* e = p + off;
      size_t len = e[kOffLen];
      if (len == 0) {
        ProblemAt(what, blk, fmt::format("entry {} has an empty name", i));
        return i;
      }
      if (used - off < kDirEntryFixed + len) {
        ProblemAt(what, blk, fmt::format("entry {} name runs past the used bytes", i));
        return i;
      }
      off += kDirEntryFixed + len;
      std::string_view name = NameAt(e);
      uint64_t h = Ld64(e);
      bool ok = true;
      if (!ValidateName(name).ok()) {
        ProblemAt(what, blk, fmt::format("entry {} has an invalid name", i));
        ok = false;
      } else if (NameHash(d_.hash_seed, name) != h) {
        ProblemAt(what, blk, fmt::format("entry {} ('{}') hash does not match its name", i, name));
        ok = false;
      } else if (ld >= 0 && !InLeafRange(h, prefix, uint32_t(ld))) {
        ProblemAt(what, blk,
                  fmt::format("entry {} ('{}') is misplaced: hash {:#x} outside prefix {:#x}/{}", i,
                              name, h, prefix, ld));
        ok = false;
      }
      if (Ld64(e + kOffIno) == 0) {
        ProblemAt(what, blk, fmt::format("entry {} ('{}') points at inode 0", i, name));
        ok = false;
      }
      if (prev != nullptr && !EntryLess(prev, e)) {
        ProblemAt(what, blk, fmt::format("entry {} ('{}') out of order or duplicated", i, name));
        ok = false;
      }
      prev = e;
      if (keys != nullptr) keys->push_back(e);
      if (ok) {
        FillEntry(e, &ent_);
        if (fn_) fn_(ent_);
      }
    }
    if (exact_used && off != used) {
      ProblemAt(what, blk, fmt::format("used bytes {} but entries end at {}", used, off));
    }
    if (!exact_used) {
      for (size_t k = off; k < used; k++) {
        if (p[k] != 0) {
          ProblemAt(what, blk, "non-zero bytes after the last entry");
          break;
        }
      }
    }
    return i;
  }

  Status Run() {
    if (d_.data_kind == uint8_t(DataKind::kInline)) {
      if (d_.size > kInodeDataSize / kMinEntry) {
        Problem(fmt::format("dir {}: inline: entry count {} exceeds the space", ino_, d_.size));
      } else {
        size_t n = CheckArea("inline in inode", ino_, d_.data, kInodeDataSize, d_.size, false, 0,
                             -1, nullptr);
        if (n != d_.size) {
          Problem(fmt::format("dir {}: inline: size {} but {} entries readable", ino_, d_.size, n));
        }
      }
    } else if (d_.data_kind == uint8_t(DataKind::kDirHash)) {
      CheckHashed();
    } else {
      Problem(fmt::format("dir {}: data kind {} is not a directory layout", ino_, d_.data_kind));
    }
    if (n_ == 0) return Status::Ok();
    return Err(Code::kCorruption,
               n_ == 1 ? first_ : fmt::format("{} (and {} more problems)", first_, n_ - 1));
  }

  void CheckHashed() {
    const DirRoot* r = reinterpret_cast<const DirRoot*>(d_.data);
    if (r->global_depth > kDirMaxDepth) {
      Problem(fmt::format("dir {}: root: global depth {} exceeds {}", ino_, r->global_depth,
                          kDirMaxDepth));
      return;
    }
    const uint32_t gd = r->global_depth;
    const uint64_t nslots = uint64_t(1) << gd;
    const uint32_t ntab = TablesFor(gd);
    if (r->entries != d_.size) {
      Problem(
          fmt::format("dir {}: root: entry count {} but inode size {}", ino_, r->entries, d_.size));
    }
    for (size_t t = ntab; t < kDirMaxTableBlocks; t++) {
      if (Ld64(d_.data + kRootTableOff + 8 * t) != 0) {
        Problem(fmt::format("dir {}: root: table block number {} set beyond the table", ino_, t));
        break;
      }
    }
    // Load the table.
    std::vector<uint64_t> slots(nslots, 0);
    std::unordered_set<uint64_t> seen;  // every directory block
    for (uint32_t t = 0; t < ntab; t++) {
      uint64_t blk = Ld64(d_.data + kRootTableOff + 8 * size_t(t));
      if (blk == 0) {
        Problem(fmt::format("dir {}: root: table block {} is 0", ino_, t));
        continue;
      }
      if (!seen.insert(blk).second) {
        ProblemAt("table", blk, "referenced twice");
        continue;
      }
      auto tb = txn_.ReadAs<DirTable>(blk, BlockType::kDirTable, InodeLock(ino_));
      if (!tb.ok()) {
        ProblemAt("table", blk, fmt::format("unreadable: {}", tb.status().ToString()));
        continue;
      }
      const DirTable* x = *tb;
      if (x->dir_ino != ino_) ProblemAt("table", blk, fmt::format("belongs to dir {}", x->dir_ino));
      if (x->index != t)
        ProblemAt("table", blk, fmt::format("has index {}, expected {}", x->index, t));
      for (uint64_t i = 0; i < kDirTableSlots; i++) {
        uint64_t s = uint64_t(t) * kDirTableSlots + i;
        if (s < nslots) {
          slots[s] = x->slot[i];
          if (x->slot[i] == 0) ProblemAt("table", blk, fmt::format("slot {} is empty", s));
        } else if (x->slot[i] != 0) {
          ProblemAt("table", blk, fmt::format("unused slot {} is not 0", s));
          break;
        }
      }
    }
    // Walk the leaves in slot order.
    uint64_t leaf_blocks = 0, entries = 0;
    std::vector<const uint8_t*> keys;
    uint64_t i = 0;
    while (i < nslots) {
      uint64_t pblk = slots[i];
      if (pblk == 0) {
        i++;
        continue;
      }
      if (seen.count(pblk)) {
        ProblemAt("leaf", pblk, fmt::format("slot {} names a block already used elsewhere", i));
        i++;
        continue;
      }
      seen.insert(pblk);
      auto rl = txn_.ReadAs<DirLeaf>(pblk, BlockType::kDirLeaf, LeafLock(pblk));
      if (!rl.ok()) {
        ProblemAt("leaf", pblk, fmt::format("unreadable: {}", rl.status().ToString()));
        uint64_t j = i;
        while (j < nslots && slots[j] == pblk) j++;
        leaf_blocks++;
        i = j;
        continue;
      }
      const DirLeaf* p = *rl;
      const uint32_t ld = p->local_depth;
      int range_ld = int(ld);
      uint64_t span = 1;
      if (ld > gd) {
        ProblemAt("leaf", pblk, fmt::format("local depth {} exceeds global depth {}", ld, gd));
        range_ld = -1;
      } else {
        span = uint64_t(1) << (gd - ld);
        uint64_t first = uint64_t(p->prefix) << (gd - ld);
        if ((i >> (gd - ld)) != p->prefix || first != i) {
          ProblemAt("leaf", pblk,
                    fmt::format("prefix {:#x}/{} does not match table slot {}", p->prefix, ld, i));
        }
        for (uint64_t k = i; k < i + span && k < nslots; k++) {
          if (slots[k] != pblk) {
            ProblemAt("table", TableBlk(k),
                      fmt::format("slot {} names {} but leaf {} (depth {}) covers it", k, slots[k],
                                  pblk, ld));
            break;
          }
        }
      }
      // Slots after the range that still name this leaf.
      uint64_t j = i + span;
      while (j < nslots && slots[j] == pblk) {
        ProblemAt("table", TableBlk(j),
                  fmt::format("slot {} names leaf {} outside its range", j, pblk));
        j++;
      }
      keys.clear();
      uint64_t blk = pblk;
      const DirLeaf* l = p;
      size_t chain_len = 0;
      while (true) {
        chain_len++;
        leaf_blocks++;
        if (l->dir_ino != ino_)
          ProblemAt("leaf", blk, fmt::format("belongs to dir {}", l->dir_ino));
        if (blk != pblk && (l->prefix != p->prefix || l->local_depth != p->local_depth)) {
          ProblemAt("leaf", blk,
                    fmt::format("chain block of leaf {} has another prefix or depth", pblk));
        }
        if (l->used > kDirLeafSpace) {
          ProblemAt("leaf", blk, fmt::format("used bytes {} exceed the space", l->used));
        } else {
          if (blk != pblk && l->count == 0) ProblemAt("leaf", blk, "empty chain block");
          size_t n = CheckArea("leaf", blk, l->entries, l->used, l->count, true, p->prefix,
                               range_ld, &keys);
          if (n != l->count) {
            ProblemAt("leaf", blk, fmt::format("count {} but {} entries readable", l->count, n));
          }
          entries += n;
          for (size_t k = l->used; k < kDirLeafSpace; k++) {
            if (l->entries[k] != 0) {
              ProblemAt("leaf", blk, "non-zero bytes after the last entry");
              break;
            }
          }
        }
        if (l->next == 0) break;
        uint64_t nb = l->next;
        if (!seen.insert(nb).second) {
          ProblemAt("leaf", blk, fmt::format("chain points at block {} already used (loop?)", nb));
          break;
        }
        auto rn = txn_.ReadAs<DirLeaf>(nb, BlockType::kDirLeaf, LeafLock(pblk));
        if (!rn.ok()) {
          ProblemAt("leaf", blk,
                    fmt::format("next block {} unreadable: {}", nb, rn.status().ToString()));
          leaf_blocks++;
          break;
        }
        blk = nb;
        l = *rn;
      }
      if (chain_len > 1) {
        std::sort(keys.begin(), keys.end(), EntryLess);
        for (size_t k = 1; k < keys.size(); k++) {
          if (!EntryLess(keys[k - 1], keys[k])) {
            ProblemAt("leaf", pblk,
                      fmt::format("name '{}' appears twice in the chain", NameAt(keys[k])));
          }
        }
      }
      i = j;
    }
    if (entries != r->entries) {
      Problem(fmt::format("dir {}: root: entry count {} but {} entries found", ino_, r->entries,
                          entries));
    }
    if (leaf_blocks != r->leaves) {
      Problem(fmt::format("dir {}: root: leaf count {} but {} leaf blocks found", ino_, r->leaves,
                          leaf_blocks));
    }
    if (d_.blocks < ntab + leaf_blocks) {
      Problem(fmt::format("dir {}: inode blocks {} is less than the {} directory blocks", ino_,
                          d_.blocks, ntab + leaf_blocks));
    }
  }

  uint64_t TableBlk(uint64_t slot) const {
    return Ld64(d_.data + kRootTableOff + 8 * size_t(slot / kDirTableSlots));
  }

 private:
  MetaTxn& txn_;
  uint64_t ino_;
  const InodeBlock& d_;
  std::vector<std::string>* out_;
  const std::function<void(const Entry&)>& fn_;
  std::string first_;
  size_t n_ = 0;
  Entry ent_;
};

}  // namespace

Status Check(MetaTxn& txn, uint64_t dir_ino, const InodeBlock& d,
             std::vector<std::string>* problems, const std::function<void(const Entry&)>& fn) {
  Checker c(txn, dir_ino, d, problems, fn);
  return c.Run();
}

Shape ShapeOf(const InodeBlock& d) {
  Shape s;
  s.entries = d.size;
  if (d.data_kind != uint8_t(DataKind::kDirHash)) return s;
  const DirRoot* r = reinterpret_cast<const DirRoot*>(d.data);
  s.hashed = true;
  s.global_depth = r->global_depth;
  s.table_blocks = r->global_depth <= kDirMaxDepth ? TablesFor(r->global_depth) : 0;
  s.entries = r->entries;
  s.leaves = r->leaves;
  return s;
}

Result<uint64_t> LeafOf(MetaTxn& txn, uint64_t dir_ino, const InodeBlock& d,
                        std::string_view name) {
  AGFS_RETURN_IF_ERROR(CheckKind(dir_ino, d));
  if (IsInline(d)) return uint64_t(0);
  Hashed h(txn, dir_ino, d, nullptr);
  AGFS_RETURN_IF_ERROR(h.Load());
  uint64_t idx = SlotIndex(NameHash(d.hash_seed, name), h.gd());
  AGFS_ASSIGN_OR_RETURN(uint64_t blk, h.SlotAt(idx));
  AGFS_RETURN_IF_ERROR(h.ReadPrimary(blk, idx).status());
  return blk;
}

}  // namespace agorafs::dir
