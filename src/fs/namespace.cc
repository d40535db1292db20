// Filesystem: names — lookup, create, link, unlink, rename, readdir, setattr.
#include <dirent.h>
#include <linux/fs.h>
#include <sys/random.h>

#include <spdlog/spdlog.h>

#include <cstring>
#include <optional>

#include "dir/dir.h"
#include "extent/extent.h"
#include "fs/filesystem.h"
#include "fs/fs_internal.h"
#include "fs/inode.h"

namespace agorafs {

Status CheckName(std::string_view name) {
  if (name.empty()) return Err(Code::kNotFound, "empty name");
  if (name.size() > kMaxNameLen) {
    return Err(Code::kNameTooLong, "name longer than 255 bytes");
  }
  if (name.find('/') != std::string_view::npos || name.find('\0') != std::string_view::npos) {
    return Err(Code::kInvalid, "name contains '/' or NUL");
  }
  return Status::Ok();
}

static bool IsDotName(std::string_view n) { return n == "." || n == ".."; }

static Result<InodeBlock*> WDir(MetaTxn& h, const Geometry& g, uint64_t ino) {
  auto r = WIno(h, g, ino);
  if (!r.ok()) return r.status();
  if (!IsDir(**r)) return Err(Code::kNotDir, "inode " + std::to_string(ino) + " is not a directory");
  if ((*r)->nlink == 0) return Err(Code::kNotFound, "directory was removed");
  return *r;
}

// Under intent (InodeGate), in rounds: the name is resolved under the directory's
// inode lock held shared, then, with no handle open, the child's lock is taken
// shared as well (parent before child), and the name resolved again under both
// before the child's attributes are read. ".." would take them child before parent,
// which could close a cycle with a lookup going down: it runs under the filesystem
// lock held shared instead, as every lookup does where intent locks are off.
Result<Attr> Filesystem::Lookup(uint64_t parent, std::string_view name, uint64_t* epoch) {
  if (epoch) *epoch = 0;
  AGFS_RETURN_IF_ERROR(CheckName(name));
  std::optional<Gate> dotdot;
  std::optional<InodeGate> dir_gate;
  if (name == "..") {
    dotdot.emplace(this, LockMode::kShared);
    AGFS_RETURN_IF_ERROR(dotdot->status());
  } else {
    dir_gate.emplace(this, parent, LockMode::kShared);
    AGFS_RETURN_IF_ERROR(dir_gate->status());
  }
  AGFS_RETURN_IF_ERROR(CheckKnown(parent));
  if (epoch) *epoch = GateEpoch();
  // The inode `name` leads to in `parent`.
  auto resolve = [&](MetaTxn& h) -> Result<uint64_t> {
    auto pr = RIno(h, g_, parent);
    if (!pr.ok()) return pr.status();
    const InodeBlock* P = *pr;
    if (!IsDir(*P)) return Err(Code::kNotDir, "not a directory");
    if (name == ".") return parent;
    if (name == "..") return P->parent;
    auto e = dir::Lookup(h, parent, *P, name);
    if (!e.ok()) return e.status();
    return e->ino;
  };
  uint64_t target;
  {
    auto h = store_->Begin(true);
    AGFS_ASSIGN_OR_RETURN(target, resolve(*h));
    if (!GateIsIntent() || target == parent) {
      auto ir = RIno(*h, g_, target);
      if (!ir.ok()) return ir.status();
      return AttrOf(target, **ir);
    }
  }
  for (int round = 0;; round++) {
    InodeGate child(this, target, LockMode::kShared);
    AGFS_RETURN_IF_ERROR(child.status());
    auto h = store_->Begin(true);
    uint64_t now;
    AGFS_ASSIGN_OR_RETURN(now, resolve(*h));
    if (now == target || now == parent) {
      auto ir = RIno(*h, g_, now);
      if (!ir.ok()) return ir.status();
      return AttrOf(now, **ir);
    }
    // Replaced while the lock was on its way (by this node, under the filesystem
    // lock: another node would have needed the directory's lock). Try the new inode.
    if (round >= 8) return Err(Code::kBusy, "the name keeps changing while it is looked up");
    target = now;
  }
}

Result<Attr> Filesystem::CreateNode(const Caller& c, uint64_t parent, std::string_view name,
                                    uint32_t mode, uint64_t rdev,
                                    std::string_view symlink_target) {
  AGFS_GATE(Exclusive, parent);
  return RetryOnNoSpace(store_.get(), [&] {
    return CreateNodeOnce(c, parent, name, mode, rdev, symlink_target);
  });
}

Result<Attr> Filesystem::CreateNodeOnce(const Caller& c, uint64_t parent, std::string_view name,
                                        uint32_t mode, uint64_t rdev,
                                        std::string_view symlink_target) {
  AGFS_RETURN_IF_ERROR(CheckName(name));
  if (IsDotName(name)) return Err(Code::kExists, "name exists");
  bool is_dir = S_ISDIR(mode);
  bool is_lnk = S_ISLNK(mode);
  if (is_lnk && symlink_target.size() >= 4096) {
    return Err(Code::kNameTooLong, "symlink target longer than 4095 bytes");
  }
  auto h = store_->Begin(false, 64);
  auto pr = WDir(*h, g_, parent);
  if (!pr.ok()) return pr.status();
  InodeBlock* P = *pr;
  auto existing = dir::Lookup(*h, parent, *P, name);
  if (existing.ok()) return Err(Code::kExists, "name exists");
  if (!existing.status().Is(Code::kNotFound)) return existing.status();
  if (is_dir && P->nlink >= kMaxLinks) return Err(Code::kTooManyLinks, "too many subdirectories");

  uint32_t gid = c.gid;
  if (P->mode & S_ISGID) {
    gid = P->gid;
    if (is_dir) mode |= S_ISGID;
  }
  if (!is_dir && (mode & S_ISGID) && !c.root() && !c.InGroup(gid)) mode &= ~S_ISGID;
  xattr::Entries inherited;
  AGFS_RETURN_IF_ERROR(InheritAcl(*h, parent, *P, c.umask, &mode, &inherited));

  auto nb = h->NewBlock(BlockType::kInode, SelfLock(LockKind::kInode), parent);
  if (!nb.ok()) return nb.status();
  uint64_t ino = nb->first;
  auto* I = reinterpret_cast<InodeBlock*>(nb->second);
  Timespec64 now = NowTs();
  InitInodeCore(I, mode, c.uid, gid, NextGeneration(), now);
  I->rdev = rdev;
  I->blocks = 1;  // the inode block itself
  if (is_dir) {
    I->parent = parent;
    if (getrandom(&I->hash_seed, sizeof(I->hash_seed), 0) != sizeof(I->hash_seed)) {
      I->hash_seed = ino * 0x9E3779B97F4A7C15ull;
    }
    dir::InitEmpty(I);
  } else if (is_lnk && symlink_target.size() <= kInodeDataSize) {
    I->data_kind = uint8_t(DataKind::kInline);
    std::memcpy(I->data, symlink_target.data(), symlink_target.size());
    I->size = symlink_target.size();
  } else if (is_lnk) {
    extent::InitRoot(I);
  } else {
    I->data_kind = uint8_t(DataKind::kInline);
  }
  Status st = inherited.empty() ? Status::Ok() : xattr::Store(*h, ino, I, inherited);
  if (st.ok()) st = dir::Add(*h, parent, P, name, ino, DirentType(mode));
  if (!st.ok()) {
    // Undo the allocations; nothing else changed yet.
    if (I->xattr_block != 0) {
      Status xs = xattr::Store(*h, ino, I, {});
      if (!xs.ok()) spdlog::error("undoing the inherited ACLs: {}", xs.ToString());
    }
    Status fs = h->Free(ino, 1);
    if (!fs.ok()) spdlog::error("undoing inode allocation: {}", fs.ToString());
    return st;
  }
  if (is_dir) P->nlink++;
  P->mtime = P->ctime = now;
  Attr a = AttrOf(ino, *I);
  h.reset();
  if (is_lnk && symlink_target.size() > kInodeDataSize) {
    auto w = Write(Caller{}, ino, 0, symlink_target.data(), symlink_target.size());
    if (!w.ok()) return w.status();
    auto g = GetAttr(ino);
    if (!g.ok()) return g.status();
    a = *g;
  }
  return a;
}

Result<Attr> Filesystem::Mknod(const Caller& c, uint64_t parent, std::string_view name,
                               uint32_t mode, uint64_t rdev) {
  uint32_t type = mode & S_IFMT;
  if (type == 0) mode |= S_IFREG;
  if (type == S_IFDIR || type == S_IFLNK) return Err(Code::kInvalid, "mknod of dir or symlink");
  return CreateNode(c, parent, name, mode, rdev, {});
}

Result<Attr> Filesystem::Mkdir(const Caller& c, uint64_t parent, std::string_view name,
                               uint32_t mode) {
  return CreateNode(c, parent, name, S_IFDIR | (mode & 07777), 0, {});
}

Result<Attr> Filesystem::Symlink(const Caller& c, uint64_t parent, std::string_view name,
                                 std::string_view target) {
  if (target.empty()) return Err(Code::kNotFound, "empty symlink target");
  return CreateNode(c, parent, name, S_IFLNK | 0777, 0, target);
}

Result<std::string> Filesystem::Readlink(uint64_t ino) {
  AGFS_GATE(Shared, ino);
  uint64_t size;
  {
    auto h = store_->Begin(true);
    auto ir = RIno(*h, g_, ino);
    if (!ir.ok()) return ir.status();
    const InodeBlock* I = *ir;
    if (!IsLnk(*I)) return Err(Code::kInvalid, "not a symlink");
    if (I->size >= 4096) return Err(Code::kCorruption, "symlink target too long");
    if (I->data_kind == uint8_t(DataKind::kInline)) {
      if (I->size > kInodeDataSize) return Err(Code::kCorruption, "inline symlink too long");
      return std::string(reinterpret_cast<const char*>(I->data), I->size);
    }
    size = I->size;
  }
  std::string s(size, '\0');
  auto r = Read(ino, 0, size, s.data());
  if (!r.ok()) return r.status();
  s.resize(*r);
  return s;
}

static Status StickyCheck(const Caller& c, const InodeBlock& dirI, const InodeBlock& victim) {
  if ((dirI.mode & S_ISVTX) && !c.root() && c.uid != dirI.uid && c.uid != victim.uid) {
    return Err(Code::kPermission, "sticky directory: not the owner");
  }
  return Status::Ok();
}

// Under h: the directory `parent` and the inode its entry `name` names, both writable.
struct Victim {
  InodeBlock* dir;
  uint64_t ino;
  InodeBlock* inode;
};
static Result<Victim> OpenVictim(MetaTxn& h, const Geometry& g, uint64_t parent,
                                 std::string_view name) {
  auto pr = WDir(h, g, parent);
  if (!pr.ok()) return pr.status();
  auto e = dir::Lookup(h, parent, **pr, name);
  if (!e.ok()) return e.status();
  auto ir = WIno(h, g, e->ino);
  if (!ir.ok()) return ir.status();
  return Victim{*pr, e->ino, *ir};
}

Status Filesystem::Unlink(const Caller& c, uint64_t parent, std::string_view name) {
  return RetryWhileOrphanListFull([&] { return UnlinkOnce(c, parent, name); });
}

Status Filesystem::UnlinkOnce(const Caller& c, uint64_t parent, std::string_view name) {
  AGFS_GATE(Exclusive, parent);
  AGFS_RETURN_IF_ERROR(CheckName(name));
  if (IsDotName(name)) return Err(Code::kIsDir, "cannot unlink . or ..");
  uint64_t ino;
  bool orphaned = false;
  {
    auto h = store_->Begin(false, 32);
    auto v = OpenVictim(*h, g_, parent, name);
    if (!v.ok()) return v.status();
    InodeBlock* P = v->dir;
    InodeBlock* I = v->inode;
    ino = v->ino;
    if (IsDir(*I)) return Err(Code::kIsDir, "is a directory");
    AGFS_RETURN_IF_ERROR(StickyCheck(c, *P, *I));
    if (I->nlink == 1) AGFS_RETURN_IF_ERROR(AddOrphan(*h, ino));
    AGFS_RETURN_IF_ERROR(dir::Remove(*h, parent, P, name));
    Timespec64 now = NowTs();
    P->mtime = P->ctime = now;
    if (I->nlink > 0) I->nlink--;
    I->ctime = now;
    if (I->nlink == 0) {
      I->flags |= kInodeFlagOrphan;
      orphaned = true;
    }
  }
  if (orphaned) MaybeFreeOrphan(ino);
  return Status::Ok();
}

Status Filesystem::Rmdir(const Caller& c, uint64_t parent, std::string_view name) {
  return RetryWhileOrphanListFull([&] { return RmdirOnce(c, parent, name); });
}

Status Filesystem::RmdirOnce(const Caller& c, uint64_t parent, std::string_view name) {
  AGFS_GATE(Exclusive, parent);
  AGFS_RETURN_IF_ERROR(CheckName(name));
  if (name == ".") return Err(Code::kInvalid, "cannot remove .");
  if (name == "..") return Err(Code::kNotEmpty, "cannot remove ..");
  uint64_t ino;
  {
    auto h = store_->Begin(false, 64);
    auto v = OpenVictim(*h, g_, parent, name);
    if (!v.ok()) return v.status();
    InodeBlock* P = v->dir;
    InodeBlock* I = v->inode;
    ino = v->ino;
    if (!IsDir(*I)) return Err(Code::kNotDir, "not a directory");
    if (ino == sb_.root_ino) return Err(Code::kBusy, "cannot remove the root");
    AGFS_RETURN_IF_ERROR(StickyCheck(c, *P, *I));
    auto empty = dir::Empty(*h, ino, *I);
    if (!empty.ok()) return empty.status();
    if (!*empty) return Err(Code::kNotEmpty, "directory not empty");
    AGFS_RETURN_IF_ERROR(AddOrphan(*h, ino));
    AGFS_RETURN_IF_ERROR(dir::Remove(*h, parent, P, name));
    AGFS_RETURN_IF_ERROR(dir::FreeAll(*h, ino, I));
    Timespec64 now = NowTs();
    P->mtime = P->ctime = now;
    if (P->nlink > 2) P->nlink--;
    I->nlink = 0;
    I->ctime = now;
    I->flags |= kInodeFlagOrphan;
  }
  MaybeFreeOrphan(ino);
  return Status::Ok();
}

Result<Attr> Filesystem::Link(const Caller& c, uint64_t ino, uint64_t newparent,
                              std::string_view newname) {
  AGFS_GATE(Exclusive, ino, newparent);
  (void)c;
  AGFS_RETURN_IF_ERROR(CheckName(newname));
  if (IsDotName(newname)) return Err(Code::kExists, "name exists");
  auto h = store_->Begin(false, 32);
  auto ir = WIno(*h, g_, ino);
  if (!ir.ok()) return ir.status();
  InodeBlock* I = *ir;
  if (IsDir(*I)) return Err(Code::kPermission, "hard links to directories are not allowed");
  if (I->nlink == 0) return Err(Code::kNotFound, "file was removed");
  if (I->nlink >= kMaxLinks) return Err(Code::kTooManyLinks, "too many links");
  auto pr = WDir(*h, g_, newparent);
  if (!pr.ok()) return pr.status();
  InodeBlock* P = *pr;
  auto e = dir::Lookup(*h, newparent, *P, newname);
  if (e.ok()) return Err(Code::kExists, "name exists");
  if (!e.status().Is(Code::kNotFound)) return e.status();
  AGFS_RETURN_IF_ERROR(dir::Add(*h, newparent, P, newname, ino, DirentType(I->mode)));
  Timespec64 now = NowTs();
  I->nlink++;
  I->ctime = now;
  P->mtime = P->ctime = now;
  return AttrOf(ino, *I);
}

// True when `ino` is `ancestor` or lies below it.
static Result<bool> IsBelow(MetaTxn& h, const Geometry& g, uint64_t root, uint64_t ino,
                            uint64_t ancestor) {
  for (int depth = 0; depth < 100000; depth++) {
    if (ino == ancestor) return true;
    if (ino == root) return false;
    auto r = RIno(h, g, ino);
    if (!r.ok()) return r.status();
    ino = (*r)->parent;
  }
  return Err(Code::kCorruption, "directory parent chain loops");
}

Status Filesystem::Rename(const Caller& c, uint64_t p1, std::string_view n1, uint64_t p2,
                          std::string_view n2, unsigned flags) {
  return RetryWhileOrphanListFull([&] { return RenameOnce(c, p1, n1, p2, n2, flags); });
}

Status Filesystem::RenameOnce(const Caller& c, uint64_t p1, std::string_view n1, uint64_t p2,
                              std::string_view n2, unsigned flags) {
  AGFS_GATE(Exclusive, p1, p2);
  AGFS_RETURN_IF_ERROR(CheckName(n1));
  AGFS_RETURN_IF_ERROR(CheckName(n2));
  if (flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE)) return Err(Code::kInvalid, "rename flags");
  if ((flags & RENAME_NOREPLACE) && (flags & RENAME_EXCHANGE)) {
    return Err(Code::kInvalid, "NOREPLACE with EXCHANGE");
  }
  if (IsDotName(n1) || IsDotName(n2)) return Err(Code::kBusy, "cannot rename . or ..");
  uint64_t orphan = 0;
  {
    auto h = store_->Begin(false, 128);
    auto pr1 = WDir(*h, g_, p1);
    if (!pr1.ok()) return pr1.status();
    InodeBlock* P1 = *pr1;
    InodeBlock* P2 = P1;
    if (p2 != p1) {
      auto pr2 = WDir(*h, g_, p2);
      if (!pr2.ok()) return pr2.status();
      P2 = *pr2;
    }
    auto e1 = dir::Lookup(*h, p1, *P1, n1);
    if (!e1.ok()) return e1.status();
    uint64_t src = e1->ino;
    auto sr = WIno(*h, g_, src);
    if (!sr.ok()) return sr.status();
    InodeBlock* S = *sr;
    auto e2 = dir::Lookup(*h, p2, *P2, n2);
    if (!e2.ok() && !e2.status().Is(Code::kNotFound)) return e2.status();
    bool has_target = e2.ok();
    if (has_target && e2->ino == src) return Status::Ok();  // same file: nothing to do
    if ((flags & RENAME_EXCHANGE) && !has_target) return Err(Code::kNotFound, "no target");
    if ((flags & RENAME_NOREPLACE) && has_target) return Err(Code::kExists, "target exists");
    AGFS_RETURN_IF_ERROR(StickyCheck(c, *P1, *S));
    InodeBlock* T = nullptr;
    uint64_t tgt = 0;
    if (has_target) {
      tgt = e2->ino;
      auto tr = WIno(*h, g_, tgt);
      if (!tr.ok()) return tr.status();
      T = *tr;
      AGFS_RETURN_IF_ERROR(StickyCheck(c, *P2, *T));
    }
    bool s_dir = IsDir(*S);
    bool t_dir = T && IsDir(*T);
    if (s_dir && p1 != p2) {
      auto below = IsBelow(*h, g_, sb_.root_ino, p2, src);
      if (!below.ok()) return below.status();
      if (*below) return Err(Code::kInvalid, "cannot move a directory below itself");
    }
    if ((flags & RENAME_EXCHANGE) && t_dir && p1 != p2) {
      auto below = IsBelow(*h, g_, sb_.root_ino, p1, tgt);
      if (!below.ok()) return below.status();
      if (*below) return Err(Code::kInvalid, "cannot move a directory below itself");
    }
    Timespec64 now = NowTs();
    if (flags & RENAME_EXCHANGE) {
      AGFS_RETURN_IF_ERROR(dir::Replace(*h, p1, P1, n1, tgt, DirentType(T->mode)));
      AGFS_RETURN_IF_ERROR(dir::Replace(*h, p2, P2, n2, src, DirentType(S->mode)));
      if (p1 != p2) {
        if (s_dir) S->parent = p2;
        if (t_dir) T->parent = p1;
        P1->nlink = P1->nlink + (t_dir ? 1 : 0) - (s_dir ? 1 : 0);
        P2->nlink = P2->nlink + (s_dir ? 1 : 0) - (t_dir ? 1 : 0);
      }
      T->ctime = now;
    } else {
      if (T) {
        if (s_dir && !t_dir) return Err(Code::kNotDir, "target is not a directory");
        if (!s_dir && t_dir) return Err(Code::kIsDir, "target is a directory");
        if (t_dir) {
          auto empty = dir::Empty(*h, tgt, *T);
          if (!empty.ok()) return empty.status();
          if (!*empty) return Err(Code::kNotEmpty, "target directory not empty");
        }
        if (t_dir || T->nlink == 1) AGFS_RETURN_IF_ERROR(AddOrphan(*h, tgt));
        AGFS_RETURN_IF_ERROR(dir::Replace(*h, p2, P2, n2, src, DirentType(S->mode)));
        if (t_dir) {
          AGFS_RETURN_IF_ERROR(dir::FreeAll(*h, tgt, T));
          T->nlink = 0;
          if (P2->nlink > 2) P2->nlink--;
        } else if (T->nlink > 0) {
          T->nlink--;
        }
        T->ctime = now;
        if (T->nlink == 0) {
          T->flags |= kInodeFlagOrphan;
          orphan = tgt;
        }
      } else {
        if (s_dir && P2->nlink >= kMaxLinks) return Err(Code::kTooManyLinks, "too many links");
        AGFS_RETURN_IF_ERROR(dir::Add(*h, p2, P2, n2, src, DirentType(S->mode)));
      }
      AGFS_RETURN_IF_ERROR(dir::Remove(*h, p1, P1, n1));
      if (s_dir && p1 != p2) {
        S->parent = p2;
        if (P1->nlink > 2) P1->nlink--;
        P2->nlink++;
      }
    }
    S->ctime = now;
    P1->mtime = P1->ctime = now;
    P2->mtime = P2->ctime = now;
  }
  if (orphan) MaybeFreeOrphan(orphan);
  return Status::Ok();
}

Status Filesystem::ReadDir(uint64_t ino, uint64_t off, bool with_attrs,
                           const std::function<bool(const DirEntryOut&)>& fn) {
  AGFS_GATE(Shared, ino);
  auto h = store_->Begin(true);
  auto ir = RIno(*h, g_, ino);
  if (!ir.ok()) return ir.status();
  const InodeBlock* I = *ir;
  if (!IsDir(*I)) return Err(Code::kNotDir, "not a directory");
  uint64_t parent = I->parent;
  auto emit = [&](DirEntryOut e) {
    if (with_attrs) {
      auto r = RIno(*h, g_, e.ino);
      if (r.ok()) {
        e.attr = AttrOf(e.ino, **r);
        e.has_attr = true;
      }
    }
    return fn(e);
  };
  if (off < 1) {
    if (!emit(DirEntryOut{".", ino, DT_DIR, 1})) return Status::Ok();
    off = 1;
  }
  if (off < 2) {
    if (!emit(DirEntryOut{"..", parent, DT_DIR, 2})) return Status::Ok();
    off = 2;
  }
  return dir::List(*h, ino, *I, off, [&](const dir::Entry& e) {
    return emit(DirEntryOut{e.name, e.ino, e.type, e.cookie});
  });
}

Result<Attr> Filesystem::SetAttr(const Caller& c, uint64_t ino, const SetAttrRequest& r) {
  AGFS_GATE(Exclusive, ino);
  if (r.size) {
    {
      auto h = store_->Begin(true);
      auto ir = RIno(*h, g_, ino);
      if (!ir.ok()) return ir.status();
      if (IsDir(**ir)) return Err(Code::kIsDir, "truncate of a directory");
      if (!IsReg(**ir)) return Err(Code::kInvalid, "truncate of a special file");
    }
    AGFS_RETURN_IF_ERROR(Truncate(c, ino, r.new_size, true));
  }
  auto h = store_->Begin(false, 8);
  auto ir = WIno(*h, g_, ino);
  if (!ir.ok()) return ir.status();
  InodeBlock* I = *ir;
  bool owner = c.root() || c.uid == I->uid;
  Timespec64 now = NowTs();
  bool changed = r.size;
  if (r.uid || r.gid) {
    uint32_t nuid = r.uid ? r.new_uid : I->uid;
    uint32_t ngid = r.gid ? r.new_gid : I->gid;
    if (!c.root()) {
      if (nuid != I->uid) return Err(Code::kPermission, "only root may change the owner");
      if (ngid != I->gid && (!owner || !c.InGroup(ngid))) {
        return Err(Code::kPermission, "may only change the group to one of your groups");
      }
    }
    if (!IsDir(*I)) {
      // chown clears set-user-ID, and set-group-ID when group-executable (as Linux
      // does, even for root and even when the ids do not change).
      I->mode &= ~S_ISUID;
      if (I->mode & S_IXGRP) I->mode &= ~S_ISGID;
    }
    I->uid = nuid;
    I->gid = ngid;
    changed = true;
  }
  if (r.mode) {
    // Anyone may drop set-user/group-ID bits: the kernel asks exactly that when a
    // non-owner writes to or truncates such a file (file_remove_privs).
    uint32_t cur = I->mode & 07777;
    bool only_kills_priv = (r.new_mode & 07777) == (r.new_mode & cur) &&
                           ((cur & ~(r.new_mode & 07777)) & ~uint32_t(S_ISUID | S_ISGID)) == 0;
    if (!owner && !only_kills_priv) {
      return Err(Code::kPermission, "only the owner may change the mode");
    }
    uint32_t m = r.new_mode & 07777;
    if (!c.root() && !IsDir(*I) && (m & S_ISGID) && !c.InGroup(I->gid)) m &= ~S_ISGID;
    I->mode = (I->mode & S_IFMT) | m;
    AGFS_RETURN_IF_ERROR(AclChmod(*h, ino, I));
    changed = true;
  }
  if (r.atime || r.mtime) {
    bool explicit_time = (r.atime && !r.atime_now) || (r.mtime && !r.mtime_now);
    if (explicit_time && !owner) return Err(Code::kPermission, "only the owner may set times");
    if (r.atime) I->atime = r.atime_now ? now : ToTs(r.new_atime);
    if (r.mtime) I->mtime = r.mtime_now ? now : ToTs(r.new_mtime);
    changed = true;
  }
  if (r.ctime) {
    I->ctime = ToTs(r.new_ctime);
  } else if (changed) {
    I->ctime = now;
  }
  return AttrOf(ino, *I);
}

}  // namespace agorafs
