// Filesystem: extended attributes.
//
// Storage (format.h): entries `u8 name_len | u16 value_len | name | value` packed
// into the inode's inline area (512 bytes) and then into one external XattrBlock
// (owned by the inode, under the inode's lock). A whole attribute set is at most
// one inline area plus one block; a value that cannot fit is kNoSpace, as on ext4
// without large-xattr inodes.
//
// Namespaces: user.* (regular files and directories only), trusted.* and security.*
// (set and read by root only; trusted.* hidden from others in listings). Anything
// else, including system.* POSIX ACLs until the ACL work lands, is kNotSupported.
#include <sys/xattr.h>

#include <cstring>
#include <string>
#include <vector>

#include "fs/filesystem.h"
#include "fs/fs_internal.h"
#include "fs/inode.h"
#include "fs/xattr.h"

namespace agorafs {
namespace {

enum class Ns { kUser, kTrusted, kSecurity, kOther };
Ns NamespaceOf(std::string_view n) {
  if (n.starts_with("user.")) return Ns::kUser;
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
    case Ns::kOther:
      return Err(Code::kNotSupported, "unsupported xattr namespace");
  }
  return Status::Ok();
}

}  // namespace

// Loads the xattrs of `ino` for a change to `name` (access checked), lets `edit`
// change the list given the entry named `name` (or end()), then stores the list back
// and updates ctime. Shared by set and remove.
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
  AGFS_RETURN_IF_ERROR(edit(list, it));
  AGFS_RETURN_IF_ERROR(xattr::Store(*h, ino, I, list));
  I->ctime = NowTs();
  return Status::Ok();
}

Status Filesystem::SetXattr(const Caller& c, uint64_t ino, std::string_view name,
                            std::string_view value, int flags) {
  AGFS_GATE(Exclusive, ino);
  if (value.size() > kXattrBlockSpace) return Err(Code::kNoSpace, "xattr value too large");
  return EditXattrs(store_.get(), g_, c, ino, name,
                    [&](xattr::Entries& list, xattr::Entries::iterator it) -> Status {
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

Result<std::string> Filesystem::GetXattr(const Caller& c, uint64_t ino, std::string_view name) {
  AGFS_GATE(Shared, ino);
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
  AGFS_GATE(Shared, ino);
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
                    [&](xattr::Entries& list, xattr::Entries::iterator it) -> Status {
                      if (it == list.end()) return Err(Code::kNoData, "no such xattr");
                      list.erase(it);
                      return Status::Ok();
                    });
}

}  // namespace agorafs
