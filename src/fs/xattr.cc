// Extended attribute storage codec; see xattr.h.
#include "fs/xattr.h"

#include <cstring>
#include <set>

namespace agorafs::xattr {
namespace {

using XattrList = Entries;

Status Parse(const uint8_t* p, size_t used, size_t cap, XattrList* out, const char* where) {
  if (used > cap) return Err(Code::kCorruption, std::string(where) + ": xattr length");
  size_t i = 0;
  while (i < used) {
    if (used - i < 3) return Err(Code::kCorruption, std::string(where) + ": truncated xattr");
    uint8_t nl = p[i];
    uint16_t vl;
    std::memcpy(&vl, p + i + 1, 2);
    if (nl == 0 || used - i - 3 < size_t(nl) + vl) {
      return Err(Code::kCorruption, std::string(where) + ": bad xattr entry");
    }
    out->emplace_back(std::string(reinterpret_cast<const char*>(p + i + 3), nl),
                      std::string(reinterpret_cast<const char*>(p + i + 3 + nl), vl));
    i += 3 + nl + vl;
  }
  return Status::Ok();
}

size_t EntrySize(const std::pair<std::string, std::string>& e) {
  return 3 + e.first.size() + e.second.size();
}

void Put(uint8_t* p, size_t* used, const std::pair<std::string, std::string>& e) {
  p[*used] = static_cast<uint8_t>(e.first.size());
  uint16_t vl = static_cast<uint16_t>(e.second.size());
  std::memcpy(p + *used + 1, &vl, 2);
  std::memcpy(p + *used + 3, e.first.data(), e.first.size());
  std::memcpy(p + *used + 3 + e.first.size(), e.second.data(), e.second.size());
  *used += EntrySize(e);
}

Status Load(MetaTxn& h, uint64_t ino, const InodeBlock& I, XattrList* out) {
  AGFS_RETURN_IF_ERROR(Parse(I.xattr, I.xattr_len, kInodeXattrSize, out, "inode xattrs"));
  if (I.xattr_block) {
    auto r = h.ReadAs<XattrBlock>(I.xattr_block, BlockType::kXattr, InodeLock(ino));
    if (!r.ok()) return r.status();
    if ((*r)->owner != ino) return Err(Code::kCorruption, "xattr block owned by another inode");
    AGFS_RETURN_IF_ERROR(Parse((*r)->entries, (*r)->used, kXattrBlockSpace, out, "xattr block"));
  }
  return Status::Ok();
}

}  // namespace

Status Store(MetaTxn& h, uint64_t ino, InodeBlock* I, const XattrList& list) {
  // Inline first, the rest in the external block.
  size_t in_used = 0;
  std::vector<const std::pair<std::string, std::string>*> rest;
  uint8_t inl[kInodeXattrSize] = {};
  for (const auto& e : list) {
    if (rest.empty() && in_used + EntrySize(e) <= kInodeXattrSize) {
      Put(inl, &in_used, e);
    } else {
      rest.push_back(&e);
    }
  }
  size_t ext = 0;
  for (auto* e : rest) ext += EntrySize(*e);
  if (ext > kXattrBlockSpace) return Err(Code::kNoSpace, "no room for extended attributes");
  if (!rest.empty()) {
    XattrBlock* xb;
    if (I->xattr_block) {
      auto w = h.WriteAs<XattrBlock>(I->xattr_block, BlockType::kXattr, InodeLock(ino));
      if (!w.ok()) return w.status();
      xb = *w;
    } else {
      auto nb = h.NewBlock(BlockType::kXattr, InodeLock(ino), ino);
      if (!nb.ok()) return nb.status();
      I->xattr_block = nb->first;
      I->blocks++;
      xb = reinterpret_cast<XattrBlock*>(nb->second);
      xb->owner = ino;
    }
    size_t used = 0;
    std::memset(xb->entries, 0, kXattrBlockSpace);
    for (auto* e : rest) Put(xb->entries, &used, *e);
    xb->used = static_cast<uint16_t>(used);
  } else if (I->xattr_block) {
    AGFS_RETURN_IF_ERROR(h.Free(I->xattr_block, 1));
    I->xattr_block = 0;
    if (I->blocks > 0) I->blocks--;
  }
  std::memcpy(I->xattr, inl, kInodeXattrSize);
  I->xattr_len = static_cast<uint16_t>(in_used);
  return Status::Ok();
}

Result<Entries> List(MetaTxn& h, uint64_t ino, const InodeBlock& I) {
  Entries out;
  AGFS_RETURN_IF_ERROR(Load(h, ino, I, &out));
  std::set<std::string_view> seen;
  for (const auto& e : out) {
    if (!seen.insert(e.first).second) {
      return Err(Code::kCorruption, "inode " + std::to_string(ino) + ": xattr '" + e.first +
                                        "' stored twice");
    }
  }
  return out;
}

}  // namespace agorafs::xattr
