// Filesystem: extended attributes.
//
// Storage (format.h): entries `u8 name_len | u16 value_len | name | value` packed
// into the inode's inline area (512 bytes) and then into one external XattrBlock
// (owned by the inode, under the inode's lock). A whole attribute set is at most
// one inline area plus one block; a value that cannot fit is kNoSpace, as on ext4
// without large-xattr inodes.
//
// Namespaces: user.* (regular files and directories only), trusted.* and security.*
// (set and read by root only; trusted.* hidden from others in listings), and the two
// POSIX ACLs (fs/acl.h): readable by anyone, set by the owner or root, not on
// symlinks, the default ACL only on directories. Setting the access ACL sets the
// mode's permission bits and stores the ACL only if it says more than they do.
// Anything else is kNotSupported.
#include <sys/xattr.h>

#include <cstring>
#include <string>
#include <vector>

#include "fs/acl.h"
#include "fs/filesystem.h"
#include "fs/fs_internal.h"
#include "fs/inode.h"
#include "fs/xattr.h"

namespace agorafs {
namespace {

enum class Ns { kUser, kTrusted, kSecurity, kAclAccess, kAclDefault, kOther };
Ns NamespaceOf(std::string_view n) {
  if (n.starts_with("user.")) return Ns::kUser;
  if (n == acl::kAccessName) return Ns::kAclAccess;
  if (n == acl::kDefaultName) return Ns::kAclDefault;
  if (n.starts_with("trusted.")) return Ns::kTrusted;
  if (n.starts_with("security.")) return Ns::kSecurity;
  return Ns::kOther;
}

Status CheckAccess(const Caller& c, const InodeBlock& I, std::string_view name, bool write) {
  if (name.empty() || name.size() > 255) {
    return Err(name.empty() ? Code::kInvalid : Code::kRange, "bad xattr name length");
  }
  switch (NamespaceOf(name)) {
    case Ns::kUser:
      if (name.size() == 5) return Err(Code::kInvalid, "empty user xattr name");
      if (!IsReg(I) && !IsDir(I)) {
        return Err(write ? Code::kPermission : Code::kNoData, "user xattrs only on files and dirs");
      }
      return Status::Ok();
    case Ns::kTrusted:
      if (!c.root()) return Err(write ? Code::kPermission : Code::kNoData, "trusted.* needs root");
      return Status::Ok();
    case Ns::kSecurity:
      if (write && !c.root()) return Err(Code::kPermission, "security.* needs root");
      return Status::Ok();
    case Ns::kAclAccess:
    case Ns::kAclDefault:
      if (IsLnk(I)) return Err(Code::kNotSupported, "no ACLs on symlinks");
      if (NamespaceOf(name) == Ns::kAclDefault && !IsDir(I)) {
        return Err(write ? Code::kAccess : Code::kNoData, "default ACLs only on directories");
      }
      if (write && !c.root() && c.uid != I.uid) {
        return Err(Code::kPermission, "only the owner may set an ACL");
      }
      return Status::Ok();
    case Ns::kOther:
      return Err(Code::kNotSupported, "unsupported xattr namespace");
  }
  return Status::Ok();
}

bool HasXattrs(const InodeBlock& I) { return I.xattr_len != 0 || I.xattr_block != 0; }

}  // namespace

Status AclChmod(MetaTxn& h, uint64_t ino, InodeBlock* I) {
  if (!HasXattrs(*I) || IsLnk(*I)) return Status::Ok();
  auto lr = xattr::List(h, ino, *I);
  if (!lr.ok()) return lr.status();
  xattr::Entries list = std::move(lr).value();
  for (auto& e : list) {
    if (e.first != acl::kAccessName) continue;
    auto ar = acl::Decode(e.second);
    if (!ar.ok()) {
      return Err(Code::kCorruption, "inode " + std::to_string(ino) +
                                        ": stored access ACL: " + ar.status().ToString());
    }
    acl::Acl a = std::move(ar).value();
    acl::Chmod(&a, I->mode);
    e.second = acl::Encode(a);
    return xattr::Store(h, ino, I, list);
  }
  return Status::Ok();
}

Status InheritAcl(MetaTxn& h, uint64_t parent, const InodeBlock& P, uint32_t umask,
                  uint32_t* mode, xattr::Entries* inherited) {
  inherited->clear();
  if (S_ISLNK(*mode)) return Status::Ok();
  std::string dflt;
  if (HasXattrs(P)) {
    auto lr = xattr::List(h, parent, P);
    if (!lr.ok()) return lr.status();
    for (auto& e : *lr) {
      if (e.first == acl::kDefaultName) dflt = std::move(e.second);
    }
  }
  if (dflt.empty()) {
    *mode &= ~(umask & 0777);
    return Status::Ok();
  }
  auto ar = acl::Decode(dflt);
  if (!ar.ok()) {
    return Err(Code::kCorruption, "directory " + std::to_string(parent) +
                                      ": stored default ACL: " + ar.status().ToString());
  }
  acl::Acl a = std::move(ar).value();
  if (S_ISDIR(*mode)) inherited->emplace_back(std::string(acl::kDefaultName), dflt);
  acl::CreateMasq(&a, mode);
  if (!acl::IsMinimal(a)) inherited->emplace_back(std::string(acl::kAccessName), acl::Encode(a));
  return Status::Ok();
}

// Loads the xattrs of `ino` for a change to `name` (access checked), lets `edit`
// change the list given the entry named `name` (or end()) and the inode, then stores
// the list back and updates ctime. Shared by set and remove.
template <typename Edit>
static Status EditXattrs(MetaStore* store, const Geometry& g, const Caller& c, uint64_t ino,
                         std::string_view name, Edit edit) {
  auto h = store->Begin(false, 8);
  auto ir = WIno(*h, g, ino);
  if (!ir.ok()) return ir.status();
  InodeBlock* I = *ir;
  AGFS_RETURN_IF_ERROR(CheckAccess(c, *I, name, true));
  auto lr = xattr::List(*h, ino, *I);
  if (!lr.ok()) return lr.status();
  xattr::Entries list = std::move(lr).value();
  auto it = std::find_if(list.begin(), list.end(), [&](const auto& e) { return e.first == name; });
  AGFS_RETURN_IF_ERROR(edit(list, it, I));
  AGFS_RETURN_IF_ERROR(xattr::Store(*h, ino, I, list));
  I->ctime = NowTs();
  return Status::Ok();
}

Status Filesystem::SetXattr(const Caller& c, uint64_t ino, std::string_view name,
                            std::string_view value, int flags) {
  AGFS_GATE(Exclusive, ino);
  if (value.size() > kXattrBlockSpace) return Err(Code::kNoSpace, "xattr value too large");
  Ns ns = NamespaceOf(name);
  if (ns == Ns::kAclAccess || ns == Ns::kAclDefault) {
    auto ar = acl::Decode(value);
    if (!ar.ok()) return ar.status();
    acl::Acl a = std::move(ar).value();
    bool access = ns == Ns::kAclAccess;
    return EditXattrs(
        store_.get(), g_, c, ino, name,
        [&](xattr::Entries& list, xattr::Entries::iterator it, InodeBlock* I) -> Status {
          if (it != list.end() && (flags & XATTR_CREATE)) return Err(Code::kExists, "xattr exists");
          if (it == list.end() && (flags & XATTR_REPLACE)) return Err(Code::kNoData, "no such xattr");
          bool keep = !a.empty();
          if (access && !a.empty()) {
            // The mode's permission bits follow the ACL; set-group-ID goes unless the
            // caller could have set it (as chmod: root or a member of the group).
            I->mode = (I->mode & ~uint32_t(0777)) | acl::PermBits(a);
            if (!c.root() && !c.InGroup(I->gid)) I->mode &= ~S_ISGID;
            keep = !acl::IsMinimal(a);
          }
          if (!keep) {
            if (it != list.end()) list.erase(it);
          } else if (it != list.end()) {
            it->second = acl::Encode(a);
          } else {
            list.emplace_back(std::string(name), acl::Encode(a));
          }
          return Status::Ok();
        });
  }
  return EditXattrs(store_.get(), g_, c, ino, name,
                    [&](xattr::Entries& list, xattr::Entries::iterator it, InodeBlock*) -> Status {
                      if (it != list.end()) {
                        if (flags & XATTR_CREATE) return Err(Code::kExists, "xattr exists");
                        it->second = std::string(value);
                      } else {
                        if (flags & XATTR_REPLACE) return Err(Code::kNoData, "no such xattr");
                        list.emplace_back(std::string(name), std::string(value));
                      }
                      return Status::Ok();
                    });
}

// Reads take the inode's lock under intent (InodeGate): the kernel asks for
// security.capability before every write(2) to a file, which under the filesystem
// lock alone would pull it away from every other writer at each write.
Result<std::string> Filesystem::GetXattr(const Caller& c, uint64_t ino, std::string_view name) {
  AGFS_INODE_GATE(Shared, ino);
  auto h = store_->Begin(true);
  auto ir = RIno(*h, g_, ino);
  if (!ir.ok()) return ir.status();
  AGFS_RETURN_IF_ERROR(CheckAccess(c, **ir, name, false));
  auto lr = xattr::List(*h, ino, **ir);
  if (!lr.ok()) return lr.status();
  const xattr::Entries& list = *lr;
  for (auto& e : list) {
    if (e.first == name) return e.second;
  }
  return Err(Code::kNoData, "no such xattr");
}

Result<std::string> Filesystem::ListXattr(const Caller& c, uint64_t ino) {
  AGFS_INODE_GATE(Shared, ino);
  auto h = store_->Begin(true);
  auto ir = RIno(*h, g_, ino);
  if (!ir.ok()) return ir.status();
  auto lr = xattr::List(*h, ino, **ir);
  if (!lr.ok()) return lr.status();
  const xattr::Entries& list = *lr;
  std::string out;
  for (auto& e : list) {
    if (NamespaceOf(e.first) == Ns::kTrusted && !c.root()) continue;
    if (applock::IsInternalXattr(e.first)) continue;  // the application lock table
    out += e.first;
    out.push_back('\0');
  }
  return out;
}

Status Filesystem::RemoveXattr(const Caller& c, uint64_t ino, std::string_view name) {
  AGFS_GATE(Exclusive, ino);
  return EditXattrs(store_.get(), g_, c, ino, name,
                    [&](xattr::Entries& list, xattr::Entries::iterator it, InodeBlock*) -> Status {
                      if (it == list.end()) return Err(Code::kNoData, "no such xattr");
                      list.erase(it);
                      return Status::Ok();
                    });
}

}  // namespace agorafs
