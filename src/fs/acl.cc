#include "fs/acl.h"

#include <sys/stat.h>

#include <cstring>

namespace agorafs::acl {
namespace {

constexpr size_t kHeaderSize = 4;
constexpr size_t kEntrySize = 8;

uint32_t Le32(const char* p) {
  const auto* u = reinterpret_cast<const unsigned char*>(p);
  return uint32_t(u[0]) | uint32_t(u[1]) << 8 | uint32_t(u[2]) << 16 | uint32_t(u[3]) << 24;
}
uint16_t Le16(const char* p) {
  const auto* u = reinterpret_cast<const unsigned char*>(p);
  return uint16_t(u[0] | u[1] << 8);
}
void Put32(std::string* s, uint32_t v) {
  for (int i = 0; i < 4; i++) s->push_back(char((v >> (8 * i)) & 0xff));
}
void Put16(std::string* s, uint16_t v) {
  s->push_back(char(v & 0xff));
  s->push_back(char(v >> 8));
}

Status Invalid(const char* why) { return Err(Code::kInvalid, std::string("invalid ACL: ") + why); }

// The kernel's order: owner, named users, owning group, named groups, mask, other;
// a mask exactly when there are named entries is not required, but one is needed
// whenever there is a named entry.
Status Validate(const Acl& acl) {
  enum { kWantUserObj, kInUsers, kInGroups, kWantOther, kDone } state = kWantUserObj;
  bool needs_mask = false;
  const Entry* prev = nullptr;
  for (const Entry& e : acl) {
    if (e.perm & ~7u) return Invalid("permission bits beyond rwx");
    if ((e.tag == kUser || e.tag == kGroup) && prev != nullptr && prev->tag == e.tag &&
        prev->id >= e.id) {
      return Invalid("named entries not in increasing id order");
    }
    prev = &e;
    switch (e.tag) {
      case kUserObj:
        if (state != kWantUserObj) return Invalid("owner entry out of place");
        state = kInUsers;
        break;
      case kUser:
        if (state != kInUsers) return Invalid("named user entry out of place");
        needs_mask = true;
        break;
      case kGroupObj:
        if (state != kInUsers) return Invalid("owning group entry out of place");
        state = kInGroups;
        break;
      case kGroup:
        if (state != kInGroups) return Invalid("named group entry out of place");
        needs_mask = true;
        break;
      case kMask:
        if (state != kInGroups) return Invalid("mask entry out of place");
        state = kWantOther;
        break;
      case kOther:
        if (state == kWantOther || (state == kInGroups && !needs_mask)) {
          state = kDone;
          break;
        }
        return Invalid(state == kInGroups ? "named entries without a mask" : "other entry out of place");
      default:
        return Invalid("unknown tag");
    }
  }
  if (state != kDone) return Invalid("owner, owning group or other entry missing");
  return Status::Ok();
}

// The entry that stands for the group class: the mask if there is one, else the
// owning group.
Entry* GroupClass(Acl* acl) {
  Entry* group_obj = nullptr;
  for (Entry& e : *acl) {
    if (e.tag == kMask) return &e;
    if (e.tag == kGroupObj) group_obj = &e;
  }
  return group_obj;
}

}  // namespace

Result<Acl> Decode(std::string_view value) {
  if (value.size() < kHeaderSize || (value.size() - kHeaderSize) % kEntrySize != 0) {
    return Invalid("size is not a header plus whole entries");
  }
  if (Le32(value.data()) != kVersion) return Invalid("unknown version");
  Acl acl;
  for (size_t off = kHeaderSize; off < value.size(); off += kEntrySize) {
    Entry e;
    e.tag = Le16(value.data() + off);
    e.perm = Le16(value.data() + off + 2);
    e.id = Le32(value.data() + off + 4);
    if (e.tag != kUser && e.tag != kGroup) e.id = kUndefinedId;
    acl.push_back(e);
  }
  if (acl.empty()) return acl;
  AGFS_RETURN_IF_ERROR(Validate(acl));
  return acl;
}

std::string Encode(const Acl& acl) {
  std::string s;
  s.reserve(kHeaderSize + kEntrySize * acl.size());
  Put32(&s, kVersion);
  for (const Entry& e : acl) {
    Put16(&s, e.tag);
    Put16(&s, e.perm);
    Put32(&s, e.id);
  }
  return s;
}

bool IsMinimal(const Acl& acl) {
  for (const Entry& e : acl) {
    if (e.tag != kUserObj && e.tag != kGroupObj && e.tag != kOther) return false;
  }
  return true;
}

uint32_t PermBits(const Acl& acl) {
  uint32_t owner = 0, group = 0, other = 0;
  bool have_mask = false;
  for (const Entry& e : acl) {
    switch (e.tag) {
      case kUserObj: owner = e.perm & 7u; break;
      case kGroupObj: if (!have_mask) group = e.perm & 7u; break;
      case kMask: group = e.perm & 7u; have_mask = true; break;
      case kOther: other = e.perm & 7u; break;
      default: break;
    }
  }
  return owner << 6 | group << 3 | other;
}

void Chmod(Acl* acl, uint32_t mode) {
  for (Entry& e : *acl) {
    if (e.tag == kUserObj) e.perm = uint16_t((mode >> 6) & 7u);
    if (e.tag == kOther) e.perm = uint16_t(mode & 7u);
  }
  if (Entry* g = GroupClass(acl)) g->perm = uint16_t((mode >> 3) & 7u);
}

void CreateMasq(Acl* acl, uint32_t* mode) {
  uint32_t m = *mode;
  for (Entry& e : *acl) {
    if (e.tag == kUserObj) e.perm &= uint16_t((m >> 6) & 7u);
    if (e.tag == kOther) e.perm &= uint16_t(m & 7u);
  }
  if (Entry* g = GroupClass(acl)) g->perm &= uint16_t((m >> 3) & 7u);
  *mode = (m & ~uint32_t(0777)) | PermBits(*acl);
}

Acl FromMode(uint32_t mode) {
  return {Entry{kUserObj, uint16_t((mode >> 6) & 7u), kUndefinedId},
          Entry{kGroupObj, uint16_t((mode >> 3) & 7u), kUndefinedId},
          Entry{kOther, uint16_t(mode & 7u), kUndefinedId}};
}

}  // namespace agorafs::acl
