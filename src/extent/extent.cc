#include "extent/extent.h"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <string>
#include <utility>

namespace agorafs::extent {
namespace {

constexpr size_t kNodeHeaderOffset = sizeof(BlockHeader);

size_t RootMax(uint16_t depth) { return depth == 0 ? kExtentRootLeafMax : kExtentRootIndexMax; }
size_t NodeMax(uint16_t depth) { return depth == 0 ? kExtentNodeLeafMax : kExtentNodeIndexMax; }
uint64_t End(const Extent& e) { return e.logical + e.len; }

// A node decoded into memory. Changes are made here and stored back by Tree::Update.
struct Node {
  uint64_t blk = 0;  // 0: the root, in the inode
  uint16_t depth = 0;
  std::vector<Extent> ext;       // depth == 0
  std::vector<ExtentIndex> idx;  // depth > 0
  size_t count() const { return depth == 0 ? ext.size() : idx.size(); }
  uint64_t first_key() const { return depth == 0 ? ext.front().logical : idx.front().logical; }
};

// One level of a root-to-leaf path. Every logical block under `node` is in [lo, hi).
struct Level {
  Node node;
  size_t pos = 0;  // index nodes: the child followed; leaf: the extent of interest
  uint64_t lo = 0;
  uint64_t hi = kMaxFileBlocks;
};
using Path = std::vector<Level>;

// b can follow a directly: logically and physically contiguous, same flags.
bool Contiguous(const Extent& a, const Extent& b) {
  return End(a) == b.logical && a.physical + a.len == b.physical && a.flags == b.flags &&
         uint64_t(a.len) + b.len <= UINT32_MAX;
}

// Merges contiguous neighbours in a sorted leaf.
void Normalize(std::vector<Extent>* ext) {
  if (ext->empty()) return;
  size_t out = 0;
  for (size_t i = 1; i < ext->size(); i++) {
    Extent& last = (*ext)[out];
    const Extent& e = (*ext)[i];
    if (Contiguous(last, e)) {
      last.len += e.len;
    } else {
      (*ext)[++out] = e;
    }
  }
  ext->resize(out + 1);
}

Mapping Hole(uint64_t lblk, uint64_t next) {
  return Mapping{lblk, 0, uint32_t(std::min<uint64_t>(next - lblk, UINT32_MAX)), 0};
}

Mapping From(const Extent& e, uint64_t lblk) {
  uint64_t start = std::max(lblk, e.logical);
  return Mapping{start, e.physical + (start - e.logical), uint32_t(End(e) - start), e.flags};
}

// The tree of one inode within one transaction. `rw` is null for read-only use.
class Tree {
 public:
  Tree(MetaTxn& txn, uint64_t ino_nr, const InodeBlock* ino, InodeBlock* rw)
      : txn_(txn), ino_nr_(ino_nr), ino_(ino), rw_(rw) {}

  Result<Node> LoadRoot();
  Result<Node> LoadNode(uint64_t blk, uint16_t depth, uint64_t lo, uint64_t hi);
  // Loads the child at p.back().pos and appends it to the path (pos 0).
  Status PushChild(Path* p);
  // Path to the leaf where lblk belongs; leaf pos = first extent ending after lblk.
  Result<Path> Descend(uint64_t lblk);
  // Moves the path to the first extent of the next leaf; false at the last leaf.
  Result<bool> NextLeaf(Path* p);
  // Stores the changed leaf p->back().node, splitting, growing, freeing and fixing
  // keys upward as needed. `at_end`: the change appended to the leaf (split unevenly).
  Status Update(Path* p, bool at_end);
  // While the root has one child that fits in the root, pulls it up and frees it.
  Status Collapse();
  Status Walk(const Node& n, uint64_t lo, uint64_t hi, const std::function<bool(const Extent&)>& fn,
              std::vector<uint64_t>* nodes, bool* stop);
  Status FreeData(uint64_t physical, uint64_t n);

  std::string Name(uint64_t blk) const {
    return blk == 0 ? fmt::format("inode {}: extent root", ino_nr_)
                    : fmt::format("inode {}: extent node {}", ino_nr_, blk);
  }
  Status Corrupt(uint64_t blk, const std::string& what) const {
    return Err(Code::kCorruption, Name(blk) + ": " + what);
  }
  Status Wrap(const Status& s, const std::string& what) const {
    return Err(s.code(), fmt::format("inode {}: {}: {}", ino_nr_, what, s.message()));
  }
  void AddBlocks(int64_t delta) {
    if (delta >= 0) {
      rw_->blocks += uint64_t(delta);
    } else {
      rw_->blocks -= std::min<uint64_t>(rw_->blocks, uint64_t(-delta));
    }
  }

 private:
  Status Validate(const Node& n, uint64_t lo, uint64_t hi) const;
  Status Decode(const uint8_t* entries, const ExtentNodeHeader& h, Node* n) const;
  void StoreRoot(const Node& n);
  void StoreNode(const Node& n, uint8_t* block) const;
  Result<uint8_t*> NewNode();

  MetaTxn& txn_;
  const uint64_t ino_nr_;
  const InodeBlock* ino_;
  InodeBlock* rw_;
};

Status Tree::Validate(const Node& n, uint64_t lo, uint64_t hi) const {
  if (n.depth == 0) {
    uint64_t prev_end = lo;
    for (size_t i = 0; i < n.ext.size(); i++) {
      const Extent& e = n.ext[i];
      if (e.len == 0) return Corrupt(n.blk, fmt::format("extent {} has length 0", i));
      if (e.physical == 0) return Corrupt(n.blk, fmt::format("extent {} at physical 0", i));
      if (e.physical + e.len < e.physical) {
        return Corrupt(n.blk, fmt::format("extent {} physical range overflows", i));
      }
      if (e.logical < prev_end) {
        return Corrupt(n.blk, i == 0 ? fmt::format("extent 0 at {} below its key {}", e.logical, lo)
                                     : fmt::format("extent {} at {} overlaps or is out of order", i,
                                                   e.logical));
      }
      if (e.logical >= hi || e.len > hi - e.logical) {
        return Corrupt(
            n.blk, fmt::format("extent {} [{}, +{}) beyond its bound {}", i, e.logical, e.len, hi));
      }
      prev_end = End(e);
    }
    return Status::Ok();
  }
  std::vector<uint64_t> children;
  children.reserve(n.idx.size());
  for (size_t i = 0; i < n.idx.size(); i++) {
    const ExtentIndex& x = n.idx[i];
    if (i == 0 ? x.logical < lo : x.logical <= n.idx[i - 1].logical) {
      return Corrupt(n.blk, fmt::format("index {} key {} out of order", i, x.logical));
    }
    if (x.logical >= hi) {
      return Corrupt(n.blk, fmt::format("index {} key {} beyond its bound {}", i, x.logical, hi));
    }
    if (x.child == 0 || x.child == ino_nr_ || x.child == n.blk) {
      return Corrupt(n.blk, fmt::format("index {} has bad child {}", i, x.child));
    }
    children.push_back(x.child);
  }
  std::sort(children.begin(), children.end());
  auto dup = std::adjacent_find(children.begin(), children.end());
  if (dup != children.end()) return Corrupt(n.blk, fmt::format("child {} listed twice", *dup));
  return Status::Ok();
}

Status Tree::Decode(const uint8_t* entries, const ExtentNodeHeader& h, Node* n) const {
  n->depth = h.depth;
  if (h.depth == 0) {
    n->ext.resize(h.count);
    if (h.count) std::memcpy(n->ext.data(), entries, h.count * sizeof(Extent));
  } else {
    n->idx.resize(h.count);
    if (h.count) std::memcpy(n->idx.data(), entries, h.count * sizeof(ExtentIndex));
  }
  return Status::Ok();
}

Result<Node> Tree::LoadRoot() {
  if (ino_->data_kind != uint8_t(DataKind::kExtents)) {
    return Err(Code::kInvalid, fmt::format("inode {}: data kind {} is not an extent tree", ino_nr_,
                                           ino_->data_kind));
  }
  ExtentNodeHeader h;
  std::memcpy(&h, ino_->data, sizeof(h));
  if (h.depth > kMaxDepth)
    return Corrupt(0, fmt::format("depth {} > {}", unsigned(h.depth), kMaxDepth));
  if (h.max != RootMax(h.depth)) {
    return Corrupt(0, fmt::format("max {} where {} expected", unsigned(h.max), RootMax(h.depth)));
  }
  if (h.count > h.max)
    return Corrupt(0, fmt::format("count {} > max {}", unsigned(h.count), unsigned(h.max)));
  if (h.depth > 0 && h.count == 0) return Corrupt(0, "empty index root");
  Node n;
  AGFS_RETURN_IF_ERROR(Decode(ino_->data + sizeof(h), h, &n));
  AGFS_RETURN_IF_ERROR(Validate(n, 0, kMaxFileBlocks));
  return n;
}

Result<Node> Tree::LoadNode(uint64_t blk, uint16_t depth, uint64_t lo, uint64_t hi) {
  auto r = txn_.Read(blk, BlockType::kExtentNode, InodeLock(ino_nr_));
  if (!r.ok()) return Err(r.status().code(), Name(blk) + ": " + r.status().message());
  ExtentNodeHeader h;
  std::memcpy(&h, *r + kNodeHeaderOffset, sizeof(h));
  if (h.owner != ino_nr_) return Corrupt(blk, fmt::format("owned by inode {}", uint64_t(h.owner)));
  if (h.depth != depth) {
    return Corrupt(blk, fmt::format("depth {} where {} expected", unsigned(h.depth), depth));
  }
  if (h.max != NodeMax(depth)) {
    return Corrupt(blk, fmt::format("max {} where {} expected", unsigned(h.max), NodeMax(depth)));
  }
  if (h.count == 0) return Corrupt(blk, "empty node");
  if (h.count > h.max)
    return Corrupt(blk, fmt::format("count {} > max {}", unsigned(h.count), unsigned(h.max)));
  Node n;
  n.blk = blk;
  AGFS_RETURN_IF_ERROR(Decode(*r + kNodeHeaderOffset + sizeof(h), h, &n));
  AGFS_RETURN_IF_ERROR(Validate(n, lo, hi));
  return n;
}

Status Tree::PushChild(Path* p) {
  const Level& l = p->back();
  const size_t i = l.pos;
  const uint64_t lo = l.node.idx[i].logical;
  const uint64_t hi = i + 1 < l.node.idx.size() ? l.node.idx[i + 1].logical : l.hi;
  const uint64_t child = l.node.idx[i].child;
  const uint16_t depth = uint16_t(l.node.depth - 1);
  AGFS_ASSIGN_OR_RETURN(Node n, LoadNode(child, depth, lo, hi));
  p->push_back(Level{std::move(n), 0, lo, hi});
  return Status::Ok();
}

Result<Path> Tree::Descend(uint64_t lblk) {
  Path p;
  p.reserve(kMaxDepth + 1);
  AGFS_ASSIGN_OR_RETURN(Node root, LoadRoot());
  p.push_back(Level{std::move(root), 0, 0, kMaxFileBlocks});
  while (p.back().node.depth > 0) {
    const auto& idx = p.back().node.idx;
    auto it = std::upper_bound(idx.begin(), idx.end(), lblk,
                               [](uint64_t v, const ExtentIndex& x) { return v < x.logical; });
    p.back().pos = it == idx.begin() ? 0 : size_t(it - idx.begin()) - 1;
    AGFS_RETURN_IF_ERROR(PushChild(&p));
  }
  const auto& ext = p.back().node.ext;
  p.back().pos = size_t(std::partition_point(ext.begin(), ext.end(),
                                             [&](const Extent& e) { return End(e) <= lblk; }) -
                        ext.begin());
  return p;
}

Result<bool> Tree::NextLeaf(Path* p) {
  size_t lvl = p->size() - 1;
  while (lvl > 0 && (*p)[lvl - 1].pos + 1 >= (*p)[lvl - 1].node.count()) lvl--;
  if (lvl == 0) return false;
  p->resize(lvl);
  p->back().pos++;
  while (p->back().node.depth > 0) AGFS_RETURN_IF_ERROR(PushChild(p));
  return true;
}

void Tree::StoreRoot(const Node& n) {
  ExtentNodeHeader h{n.depth, uint16_t(n.count()), uint16_t(RootMax(n.depth)), 0, ino_nr_};
  std::memset(rw_->data, 0, sizeof(rw_->data));
  std::memcpy(rw_->data, &h, sizeof(h));
  if (n.depth == 0) {
    if (!n.ext.empty()) {
      std::memcpy(rw_->data + sizeof(h), n.ext.data(), n.ext.size() * sizeof(Extent));
    }
  } else {
    std::memcpy(rw_->data + sizeof(h), n.idx.data(), n.idx.size() * sizeof(ExtentIndex));
  }
}

void Tree::StoreNode(const Node& n, uint8_t* block) const {
  ExtentNodeHeader h{n.depth, uint16_t(n.count()), uint16_t(NodeMax(n.depth)), 0, ino_nr_};
  uint8_t* p = block + kNodeHeaderOffset;
  std::memset(p, 0, kPayload);
  std::memcpy(p, &h, sizeof(h));
  if (n.depth == 0) {
    std::memcpy(p + sizeof(h), n.ext.data(), n.ext.size() * sizeof(Extent));
  } else {
    std::memcpy(p + sizeof(h), n.idx.data(), n.idx.size() * sizeof(ExtentIndex));
  }
}

Status Tree::Update(Path* p, bool at_end) {
  struct Fresh {
    Node node;
    uint8_t* block;
  };
  std::vector<Fresh> fresh;
  std::vector<uint64_t> freed;
  // A path holds the root plus at most kMaxDepth levels (LoadRoot checks the depth).
  std::array<bool, kMaxDepth + 1> dirty{};
  if (p->empty() || p->size() > dirty.size()) {
    return Err(Code::kInvalid, fmt::format("inode {}: bad extent path", ino_nr_));
  }
  auto undo = [&]() {
    for (const Fresh& f : fresh) (void)txn_.Free(f.node.blk, 1);
  };
  auto alloc = [&](Node n) -> Status {
    auto r = txn_.NewBlock(BlockType::kExtentNode, InodeLock(ino_nr_), ino_nr_);
    if (!r.ok()) {
      undo();
      return Wrap(r.status(), "allocating an extent node");
    }
    n.blk = r->first;
    fresh.push_back(Fresh{std::move(n), r->second});
    return Status::Ok();
  };

  // Phase 1, in memory: walk up from the leaf while a level changes.
  size_t lvl = p->size() - 1;
  while (true) {
    Node& n = (*p)[lvl].node;
    dirty[lvl] = true;
    if (lvl == 0) {
      if (n.count() == 0) {
        n.depth = 0;
        n.ext.clear();
        n.idx.clear();
      } else if (n.count() > RootMax(n.depth)) {
        if (n.depth >= kMaxDepth) {
          undo();
          return Err(Code::kNoSpace, fmt::format("inode {}: extent tree would exceed {} levels",
                                                 ino_nr_, kMaxDepth));
        }
        // New level: everything moves into one new node (it fits: node capacities
        // exceed root capacities by more than the 2 entries one change can add).
        Node child;
        child.depth = n.depth;
        child.ext = std::move(n.ext);
        child.idx = std::move(n.idx);
        const uint64_t key = child.first_key();
        AGFS_RETURN_IF_ERROR(alloc(std::move(child)));
        n.ext.clear();
        n.idx.clear();
        n.depth++;
        n.idx.push_back(ExtentIndex{key, fresh.back().node.blk});
      }
      break;
    }
    Level& par = (*p)[lvl - 1];
    if (n.count() == 0) {
      freed.push_back(n.blk);
      dirty[lvl] = false;
      par.node.idx.erase(par.node.idx.begin() + long(par.pos));
      at_end = false;
      lvl--;
      continue;
    }
    const size_t cap = NodeMax(n.depth);
    if (n.count() > cap) {
      const size_t total = n.count();
      const size_t left = at_end ? std::min(cap, total - 1) : total / 2;
      Node right;
      right.depth = n.depth;
      if (n.depth == 0) {
        right.ext.assign(n.ext.begin() + long(left), n.ext.end());
        n.ext.resize(left);
      } else {
        right.idx.assign(n.idx.begin() + long(left), n.idx.end());
        n.idx.resize(left);
      }
      const uint64_t rkey = right.first_key();
      AGFS_RETURN_IF_ERROR(alloc(std::move(right)));
      par.node.idx[par.pos].logical = n.first_key();
      par.node.idx.insert(par.node.idx.begin() + long(par.pos) + 1,
                          ExtentIndex{rkey, fresh.back().node.blk});
      at_end = par.pos + 2 == par.node.idx.size();
      lvl--;
      continue;
    }
    if (par.node.idx[par.pos].logical != n.first_key()) {
      par.node.idx[par.pos].logical = n.first_key();
      at_end = false;
      lvl--;
      continue;
    }
    break;
  }

  // Phase 2: get every existing node we change writable before changing any.
  std::array<uint8_t*, kMaxDepth + 1> blocks{};
  for (size_t l = 1; l < p->size(); l++) {
    if (!dirty[l]) continue;
    auto w = txn_.Write((*p)[l].node.blk, BlockType::kExtentNode, InodeLock(ino_nr_));
    if (!w.ok()) {
      undo();
      return Err(w.status().code(), Name((*p)[l].node.blk) + ": " + w.status().message());
    }
    blocks[l] = *w;
  }

  // Phase 3: store. Nothing below fails before the tree is consistent again.
  if (dirty[0]) StoreRoot((*p)[0].node);
  for (size_t l = 1; l < p->size(); l++) {
    if (dirty[l]) StoreNode((*p)[l].node, blocks[l]);
  }
  for (const Fresh& f : fresh) StoreNode(f.node, f.block);
  AddBlocks(int64_t(fresh.size()) - int64_t(freed.size()));
  for (uint64_t b : freed) {
    Status s = txn_.Free(b, 1);
    if (!s.ok()) return Err(s.code(), Name(b) + ": freeing: " + s.message());
  }
  return Status::Ok();
}

Status Tree::Collapse() {
  while (true) {
    AGFS_ASSIGN_OR_RETURN(Node root, LoadRoot());
    if (root.depth == 0 || root.idx.size() != 1) return Status::Ok();
    const uint64_t blk = root.idx[0].child;
    AGFS_ASSIGN_OR_RETURN(
        Node child, LoadNode(blk, uint16_t(root.depth - 1), root.idx[0].logical, kMaxFileBlocks));
    if (child.count() > RootMax(child.depth)) return Status::Ok();
    child.blk = 0;
    StoreRoot(child);
    AddBlocks(-1);
    Status s = txn_.Free(blk, 1);
    if (!s.ok()) return Err(s.code(), Name(blk) + ": freeing: " + s.message());
  }
}

Status Tree::Walk(const Node& n, uint64_t lo, uint64_t hi,
                  const std::function<bool(const Extent&)>& fn, std::vector<uint64_t>* nodes,
                  bool* stop) {
  (void)lo;
  if (n.depth == 0) {
    for (const Extent& e : n.ext) {
      if (!fn(e)) {
        *stop = true;
        return Status::Ok();
      }
    }
    return Status::Ok();
  }
  for (size_t i = 0; i < n.idx.size(); i++) {
    const uint64_t clo = n.idx[i].logical;
    const uint64_t chi = i + 1 < n.idx.size() ? n.idx[i + 1].logical : hi;
    AGFS_ASSIGN_OR_RETURN(Node child, LoadNode(n.idx[i].child, uint16_t(n.depth - 1), clo, chi));
    if (nodes) nodes->push_back(child.blk);
    AGFS_RETURN_IF_ERROR(Walk(child, clo, chi, fn, nodes, stop));
    if (*stop) return Status::Ok();
  }
  return Status::Ok();
}

Status Tree::FreeData(uint64_t physical, uint64_t n) {
  Status s = txn_.Free(physical, n);
  if (!s.ok()) {
    return Err(s.code(), fmt::format("inode {}: freeing data blocks [{}, +{}): {}", ino_nr_,
                                     physical, n, s.message()));
  }
  return Status::Ok();
}

uint64_t RangeEnd(uint64_t lblk, uint64_t count) {
  if (lblk >= kMaxFileBlocks) return kMaxFileBlocks;
  return count >= kMaxFileBlocks - lblk ? kMaxFileBlocks : lblk + count;
}

}  // namespace

void InitRoot(InodeBlock* ino) {
  std::memset(ino->data, 0, sizeof(ino->data));
  ExtentNodeHeader h{0, 0, uint16_t(kExtentRootLeafMax), 0, ino->hdr.blocknr};
  std::memcpy(ino->data, &h, sizeof(h));
  ino->data_kind = uint8_t(DataKind::kExtents);
}

uint16_t Depth(const InodeBlock& ino) {
  if (ino.data_kind != uint8_t(DataKind::kExtents)) return 0;
  ExtentNodeHeader h;
  std::memcpy(&h, ino.data, sizeof(h));
  return h.depth;
}

Result<Mapping> Lookup(MetaTxn& txn, uint64_t ino_nr, const InodeBlock& ino, uint64_t lblk) {
  if (lblk >= kMaxFileBlocks) {
    return Err(Code::kTooBig,
               fmt::format("inode {}: block {} beyond the maximum file size", ino_nr, lblk));
  }
  Tree t(txn, ino_nr, &ino, nullptr);
  AGFS_ASSIGN_OR_RETURN(Path p, t.Descend(lblk));
  const Level& leaf = p.back();
  if (leaf.pos < leaf.node.ext.size()) {
    const Extent& e = leaf.node.ext[leaf.pos];
    if (e.logical <= lblk) return From(e, lblk);
    return Hole(lblk, e.logical);
  }
  AGFS_ASSIGN_OR_RETURN(bool more, t.NextLeaf(&p));
  if (!more) return Hole(lblk, kMaxFileBlocks);
  return Hole(lblk, p.back().node.ext.front().logical);
}

Result<MapResult> MapOrAllocate(MetaTxn& txn, uint64_t ino_nr, InodeBlock* ino, uint64_t lblk,
                                uint32_t count, bool unwritten, uint64_t goal) {
  if (count == 0) return Err(Code::kInvalid, fmt::format("inode {}: mapping 0 blocks", ino_nr));
  if (lblk >= kMaxFileBlocks) {
    return Err(Code::kTooBig,
               fmt::format("inode {}: block {} beyond the maximum file size", ino_nr, lblk));
  }
  Tree t(txn, ino_nr, ino, ino);
  AGFS_ASSIGN_OR_RETURN(Path p, t.Descend(lblk));
  Level& leaf = p.back();
  std::vector<Extent>& ext = leaf.node.ext;
  const size_t pos = leaf.pos;
  if (pos < ext.size() && ext[pos].logical <= lblk) return MapResult{From(ext[pos], lblk), false};

  // A hole up to the next extent of this leaf, or the leaf's bound.
  const uint64_t limit = pos < ext.size() ? ext[pos].logical : leaf.hi;
  const uint32_t want = uint32_t(std::min<uint64_t>(count, limit - lblk));
  uint64_t hint = goal;
  if (pos > 0) {
    hint = ext[pos - 1].physical + (lblk - ext[pos - 1].logical);
  } else if (pos < ext.size() && ext[pos].physical > ext[pos].logical - lblk) {
    hint = ext[pos].physical - (ext[pos].logical - lblk);
  }
  auto a = txn.AllocData(hint, want);
  if (!a.ok()) return t.Wrap(a.status(), fmt::format("allocating data for block {}", lblk));
  if (a->len == 0 || a->start == 0) {
    return Err(Code::kNoSpace, fmt::format("inode {}: allocator returned no blocks", ino_nr));
  }
  if (a->len > want) {
    AGFS_RETURN_IF_ERROR(t.FreeData(a->start + want, a->len - want));
    a->len = want;
  }
  const Extent x{lblk, a->start, a->len, unwritten ? uint32_t(kExtentUnwritten) : 0u};
  const bool at_end = pos == ext.size();
  ext.insert(ext.begin() + long(pos), x);
  Normalize(&ext);
  Status s = t.Update(&p, at_end);
  if (!s.ok()) {
    (void)txn.Free(a->start, a->len);
    return s;
  }
  ino->blocks += a->len;
  return MapResult{Mapping{lblk, x.physical, x.len, x.flags}, true};
}

Status MarkWritten(MetaTxn& txn, uint64_t ino_nr, InodeBlock* ino, uint64_t lblk, uint64_t count) {
  const uint64_t end = RangeEnd(lblk, count);
  Tree t(txn, ino_nr, ino, ino);
  uint64_t cur = lblk;
  while (cur < end) {
    AGFS_ASSIGN_OR_RETURN(Path p, t.Descend(cur));
    Level& leaf = p.back();
    const std::vector<Extent>& ext = leaf.node.ext;
    const uint64_t next = std::min(end, leaf.hi);
    std::vector<Extent> out(ext.begin(), ext.begin() + long(leaf.pos));
    bool changed = false;
    size_t i = leaf.pos;
    for (; i < ext.size() && ext[i].logical < end; i++) {
      const Extent& e = ext[i];
      if (!(e.flags & kExtentUnwritten)) {
        out.push_back(e);
        continue;
      }
      const uint64_t s = std::max(cur, e.logical);
      const uint64_t f = std::min(end, End(e));
      if (s > e.logical)
        out.push_back(Extent{e.logical, e.physical, uint32_t(s - e.logical), e.flags});
      out.push_back(Extent{s, e.physical + (s - e.logical), uint32_t(f - s),
                           e.flags & ~uint32_t(kExtentUnwritten)});
      if (f < End(e)) {
        out.push_back(Extent{f, e.physical + (f - e.logical), uint32_t(End(e) - f), e.flags});
      }
      changed = true;
    }
    out.insert(out.end(), ext.begin() + long(i), ext.end());
    if (changed) {
      Normalize(&out);
      leaf.node.ext = std::move(out);
      AGFS_RETURN_IF_ERROR(t.Update(&p, false));
    }
    cur = next;
  }
  return Status::Ok();
}

Result<uint64_t> PunchStep(MetaTxn& txn, uint64_t ino_nr, InodeBlock* ino, uint64_t lblk,
                           uint64_t count, const PunchBudget& budget) {
  if (budget.max_blocks == 0 || budget.max_extents == 0) {
    return Err(Code::kInvalid, fmt::format("inode {}: empty punch budget", ino_nr));
  }
  const uint64_t end = RangeEnd(lblk, count);
  if (lblk >= end) return end;
  Tree t(txn, ino_nr, ino, ino);
  AGFS_ASSIGN_OR_RETURN(Path p, t.Descend(lblk));
  // Find the leaf holding the first extent that overlaps the range: the leaf of lblk
  // or, when nothing of the range is left there, the next one (read only). No
  // overlapping extent at all means the range is done.
  while (true) {
    const Level& l = p.back();
    if (l.pos < l.node.ext.size() && l.node.ext[l.pos].logical < end) break;
    if (l.hi >= end) return end;
    AGFS_ASSIGN_OR_RETURN(bool more, t.NextLeaf(&p));
    if (!more) return end;
  }
  Level& leaf = p.back();
  const std::vector<Extent>& ext = leaf.node.ext;
  uint64_t progress = std::min(end, leaf.hi);
  std::vector<Extent> out(ext.begin(), ext.begin() + long(leaf.pos));
  std::vector<std::pair<uint64_t, uint64_t>> frees;  // physical, n
  uint64_t blocks_left = budget.max_blocks;
  uint32_t pieces_left = budget.max_extents;
  size_t i = leaf.pos;
  for (; i < ext.size() && ext[i].logical < end; i++) {
    const Extent& e = ext[i];
    const uint64_t s = std::max(lblk, e.logical);
    if (blocks_left == 0 || pieces_left == 0) {
      progress = s;
      break;
    }
    const uint64_t want_end = std::min(end, End(e));
    const uint64_t f = blocks_left >= want_end - s ? want_end : s + blocks_left;
    if (s > e.logical)
      out.push_back(Extent{e.logical, e.physical, uint32_t(s - e.logical), e.flags});
    if (f < End(e)) {
      out.push_back(Extent{f, e.physical + (f - e.logical), uint32_t(End(e) - f), e.flags});
    }
    frees.emplace_back(e.physical + (s - e.logical), f - s);
    blocks_left -= f - s;
    pieces_left--;
    if (f < want_end) {  // the budget ran out inside this extent
      progress = f;
      i++;
      break;
    }
  }
  out.insert(out.end(), ext.begin() + long(i), ext.end());
  leaf.node.ext = std::move(out);
  AGFS_RETURN_IF_ERROR(t.Update(&p, false));
  uint64_t freed = 0;
  for (const auto& [phys, n] : frees) {
    AGFS_RETURN_IF_ERROR(t.FreeData(phys, n));
    freed += n;
  }
  t.AddBlocks(-int64_t(freed));
  AGFS_RETURN_IF_ERROR(t.Collapse());
  return progress;
}

Status Punch(MetaTxn& txn, uint64_t ino_nr, InodeBlock* ino, uint64_t lblk, uint64_t count) {
  const uint64_t end = RangeEnd(lblk, count);
  uint64_t cur = lblk;
  while (cur < end) {
    AGFS_ASSIGN_OR_RETURN(cur, PunchStep(txn, ino_nr, ino, cur, end - cur, PunchBudget{}));
  }
  return Status::Ok();
}

Status ForEach(MetaTxn& txn, uint64_t ino_nr, const InodeBlock& ino,
               const std::function<bool(const Extent&)>& fn, std::vector<uint64_t>* nodes) {
  Tree t(txn, ino_nr, &ino, nullptr);
  AGFS_ASSIGN_OR_RETURN(Node root, t.LoadRoot());
  bool stop = false;
  return t.Walk(root, 0, kMaxFileBlocks, fn, nodes, &stop);
}

Result<std::optional<Mapping>> NextData(MetaTxn& txn, uint64_t ino_nr, const InodeBlock& ino,
                                        uint64_t lblk, bool skip_unwritten) {
  if (lblk >= kMaxFileBlocks) return std::optional<Mapping>();
  Tree t(txn, ino_nr, &ino, nullptr);
  AGFS_ASSIGN_OR_RETURN(Path p, t.Descend(lblk));
  while (true) {
    Level& leaf = p.back();
    for (; leaf.pos < leaf.node.ext.size(); leaf.pos++) {
      const Extent& e = leaf.node.ext[leaf.pos];
      if (skip_unwritten && (e.flags & kExtentUnwritten)) continue;
      return std::optional<Mapping>(From(e, lblk));
    }
    AGFS_ASSIGN_OR_RETURN(bool more, t.NextLeaf(&p));
    if (!more) return std::optional<Mapping>();
  }
}

}  // namespace agorafs::extent
