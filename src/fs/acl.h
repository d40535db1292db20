// POSIX access control lists: the xattr codec and the rules that tie an ACL to the
// mode bits (POSIX.1e draft 17, as Linux implements them).
//
// Storage: an ACL lives in the inode's xattrs under "system.posix_acl_access" (what
// the kernel checks access against) or "system.posix_acl_default" (directories only:
// what new entries inherit), in the kernel's xattr form: a little-endian u32 version
// (2), then one 8-byte entry per line: u16 tag, u16 perm (rwx = 4|2|1), u32 id (uid
// or gid for named entries, 0xffffffff otherwise). docs/FORMAT.md has the layout.
//
// Who enforces what: the kernel evaluates the ACL on every permission check
// (FUSE_CAP_POSIX_ACL; it fetches the access ACL with getxattr and caches it until the
// inode's attributes are refreshed or invalidated). The filesystem keeps the ACL and
// the mode consistent, which the kernel leaves to it: setting an access ACL sets the
// mode's permission bits (and stores nothing if the ACL says no more than the mode);
// chmod rewrites the owner, mask (or group) and other entries; a new file or
// directory under a directory with a default ACL inherits it (Create), and the umask
// applies only where there is none.
//
// Decode validates what the kernel's posix_acl_valid does: known tags, perms within
// rwx, one owner, owning-group and other entry, named entries in increasing id order
// without duplicates, a mask whenever there is a named entry, entries in tag order.
// Thread-safety: pure functions.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "util/status.h"

namespace agorafs::acl {

inline constexpr std::string_view kAccessName = "system.posix_acl_access";
inline constexpr std::string_view kDefaultName = "system.posix_acl_default";
inline constexpr uint32_t kVersion = 2;
inline constexpr uint32_t kUndefinedId = 0xffffffffu;

enum Tag : uint16_t {
  kUserObj = 0x01,
  kUser = 0x02,
  kGroupObj = 0x04,
  kGroup = 0x08,
  kMask = 0x10,
  kOther = 0x20,
};

struct Entry {
  uint16_t tag = 0;
  uint16_t perm = 0;  // 0..7
  uint32_t id = kUndefinedId;
  bool operator==(const Entry&) const = default;
};

using Acl = std::vector<Entry>;

// The ACL in `value`; kInvalid (EINVAL) with the reason when it is not a valid one.
// A header with no entries decodes to an empty ACL (the kernel's "remove").
Result<Acl> Decode(std::string_view value);
std::string Encode(const Acl& acl);

// True when the ACL holds only the owner, owning-group and other entries: then it says
// nothing the mode bits do not, and is not stored.
bool IsMinimal(const Acl& acl);
// The rwxrwxrwx bits the ACL implies: owner from the owner entry, group from the mask
// if there is one (else the owning group), other from other.
uint32_t PermBits(const Acl& acl);
// chmod: the owner, mask-or-owning-group and other entries take `mode`'s bits.
void Chmod(Acl* acl, uint32_t mode);
// A new inode inheriting the default ACL `acl` with requested permission bits
// `*mode` (not masked by the umask): the owner, mask-or-owning-group and other entries
// are limited to `*mode`'s bits, and `*mode`'s permission bits become the ACL's
// (set-ID and sticky bits are kept).
void CreateMasq(Acl* acl, uint32_t* mode);
// The minimal ACL of a mode (what getfacl shows for a file without one).
Acl FromMode(uint32_t mode);

}  // namespace agorafs::acl
