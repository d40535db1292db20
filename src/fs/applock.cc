// Application lock table: encoding and range arithmetic; see applock.h.
#include "fs/applock.h"

#include <algorithm>
#include <cstring>

namespace agorafs::applock {
namespace {

void Put16(std::string* s, size_t at, uint16_t v) {
  (*s)[at] = static_cast<char>(v & 0xff);
  (*s)[at + 1] = static_cast<char>(v >> 8);
}
void Put32(std::string* s, size_t at, uint32_t v) {
  for (int i = 0; i < 4; i++) (*s)[at + i] = static_cast<char>((v >> (8 * i)) & 0xff);
}
void Put64(std::string* s, size_t at, uint64_t v) {
  for (int i = 0; i < 8; i++) (*s)[at + i] = static_cast<char>((v >> (8 * i)) & 0xff);
}
uint64_t Get(std::string_view s, size_t at, int bytes) {
  uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; i--) v = (v << 8) | static_cast<uint8_t>(s[at + i]);
  return v;
}

// Entry layout (48 bytes):
//   0 u8 kind  1 u8 type  2 u16 reserved  4 u32 slot  8 u64 generation  16 u64 owner
//   24 u64 start  32 u64 end  40 u32 pid  44 u32 reserved
void PutEntry(std::string* s, size_t at, const AppLock& l) {
  (*s)[at] = static_cast<char>(l.kind);
  (*s)[at + 1] = static_cast<char>(l.type);
  Put32(s, at + 4, l.slot);
  Put64(s, at + 8, l.generation);
  Put64(s, at + 16, l.owner);
  Put64(s, at + 24, l.start);
  Put64(s, at + 32, l.end);
  Put32(s, at + 40, l.pid);
}

// Reads the entry at `at`; the empty string, or what is wrong with it.
std::string GetEntry(std::string_view b, size_t at, AppLock* l) {
  uint8_t kind = static_cast<uint8_t>(b[at]);
  uint8_t type = static_cast<uint8_t>(b[at + 1]);
  if (kind != uint8_t(AppLockKind::kPosix) && kind != uint8_t(AppLockKind::kFlock)) {
    return "bad kind " + std::to_string(kind);
  }
  if (type != uint8_t(AppLockType::kRead) && type != uint8_t(AppLockType::kWrite)) {
    return "bad type " + std::to_string(type);
  }
  if (Get(b, at + 2, 2) != 0 || Get(b, at + 44, 4) != 0) return "reserved bytes set";
  l->kind = static_cast<AppLockKind>(kind);
  l->type = static_cast<AppLockType>(type);
  l->slot = static_cast<uint32_t>(Get(b, at + 4, 4));
  l->generation = Get(b, at + 8, 8);
  l->owner = Get(b, at + 16, 8);
  l->start = Get(b, at + 24, 8);
  l->end = Get(b, at + 32, 8);
  l->pid = static_cast<uint32_t>(Get(b, at + 40, 4));
  if (l->start > l->end) return "start after end";
  return "";
}

// Checks the header of a table of `entry_size`-byte entries; returns the count, or
// sets *why.
size_t GetCount(std::string_view b, size_t entry_size, size_t max, std::string* why) {
  if (b.size() < kHeaderSize) {
    *why = "truncated header";
    return 0;
  }
  if (static_cast<uint8_t>(b[0]) != kVersion) {
    *why = "unknown version " + std::to_string(static_cast<uint8_t>(b[0]));
    return 0;
  }
  if (b[1] != 0) {
    *why = "reserved header byte set";
    return 0;
  }
  size_t count = Get(b, 2, 2);
  if (b.size() != kHeaderSize + count * entry_size) {
    *why = "size " + std::to_string(b.size()) + " does not hold " + std::to_string(count) +
           " entries";
  } else if (count > max) {
    *why = std::to_string(count) + " entries, at most " + std::to_string(max) + " allowed";
  }
  return count;
}

}  // namespace

std::string Encode(const Table& t) {
  std::string s(kHeaderSize + t.size() * kEntrySize, '\0');
  s[0] = static_cast<char>(kVersion);
  Put16(&s, 2, static_cast<uint16_t>(t.size()));
  for (size_t i = 0; i < t.size(); i++) PutEntry(&s, kHeaderSize + i * kEntrySize, t[i]);
  return s;
}

Result<Table> Decode(std::string_view b) {
  std::string why;
  size_t count = GetCount(b, kEntrySize, kMaxEntries, &why);
  if (!why.empty()) return Err(Code::kCorruption, "application lock table: " + why);
  Table t(count);
  for (size_t i = 0; i < count; i++) {
    why = GetEntry(b, kHeaderSize + i * kEntrySize, &t[i]);
    if (!why.empty()) {
      return Err(Code::kCorruption,
                 "application lock table: entry " + std::to_string(i) + ": " + why);
    }
  }
  return t;
}

std::string EncodeWaits(const Waits& w) {
  std::string s(kHeaderSize + w.size() * kWaitEntrySize, '\0');
  s[0] = static_cast<char>(kVersion);
  Put16(&s, 2, static_cast<uint16_t>(w.size()));
  for (size_t i = 0; i < w.size(); i++) {
    const size_t at = kHeaderSize + i * kWaitEntrySize;
    PutEntry(&s, at, w[i].lock);
    Put64(&s, at + kEntrySize, w[i].ino);
  }
  return s;
}

Result<Waits> DecodeWaits(std::string_view b) {
  std::string why;
  size_t count = GetCount(b, kWaitEntrySize, kMaxWaits, &why);
  if (!why.empty()) return Err(Code::kCorruption, "application lock waits: " + why);
  Waits w(count);
  for (size_t i = 0; i < count; i++) {
    const size_t at = kHeaderSize + i * kWaitEntrySize;
    why = GetEntry(b, at, &w[i].lock);
    w[i].ino = Get(b, at + kEntrySize, 8);
    if (why.empty() && w[i].lock.kind != AppLockKind::kPosix) why = "not a POSIX lock";
    if (why.empty() && w[i].ino == 0) why = "inode 0";
    if (!why.empty()) {
      return Err(Code::kCorruption,
                 "application lock waits: entry " + std::to_string(i) + ": " + why);
    }
  }
  return w;
}

Status CheckInternalXattr(std::string_view name, std::string_view value) {
  if (name == kXattrName) return Decode(value).status();
  if (name == kWaitsXattrName) return DecodeWaits(value).status();
  return Status::Ok();
}

bool Overlaps(const AppLock& a, const AppLock& b) { return a.start <= b.end && b.start <= a.end; }

bool Conflicts(const AppLock& held, const AppLock& want) {
  if (held.kind != want.kind || held.SameOwner(want)) return false;
  if (held.type != AppLockType::kWrite && want.type != AppLockType::kWrite) return false;
  return Overlaps(held, want);
}

std::vector<const AppLock*> Conflicting(const Table& t, const AppLock& want, const LiveFn& live) {
  std::vector<const AppLock*> out;
  if (want.type == AppLockType::kUnlock) return out;
  for (const AppLock& l : t) {
    if (Conflicts(l, want) && live(l.slot, l.generation)) out.push_back(&l);
  }
  return out;
}

const AppLock* FindConflict(const Table& t, const AppLock& want, const LiveFn& live) {
  if (want.type == AppLockType::kUnlock) return nullptr;
  for (const AppLock& l : t) {
    if (Conflicts(l, want) && live(l.slot, l.generation)) return &l;
  }
  return nullptr;
}

size_t Prune(Table* t, const LiveFn& live) {
  size_t before = t->size();
  std::erase_if(*t, [&](const AppLock& l) { return !live(l.slot, l.generation); });
  return before - t->size();
}

void Apply(Table* t, const AppLock& want) {
  Table mine, rest;
  for (const AppLock& l : *t) (l.SameOwner(want) ? mine : rest).push_back(l);
  if (want.kind == AppLockKind::kFlock) {
    // One flock per open file description: the new one replaces the old.
    mine.clear();
    if (want.type != AppLockType::kUnlock) {
      AppLock l = want;
      l.start = 0;
      l.end = kToEof;
      mine.push_back(l);
    }
  } else {
    // Cut [start, end] out of the owner's ranges, then add the new one.
    Table cut;
    for (const AppLock& m : mine) {
      if (!Overlaps(m, want)) {
        cut.push_back(m);
        continue;
      }
      if (m.start < want.start) {
        AppLock left = m;
        left.end = want.start - 1;
        cut.push_back(left);
      }
      if (m.end > want.end) {  // want.end < kToEof here
        AppLock right = m;
        right.start = want.end + 1;
        cut.push_back(right);
      }
    }
    if (want.type != AppLockType::kUnlock) cut.push_back(want);
    std::sort(cut.begin(), cut.end(),
              [](const AppLock& a, const AppLock& b) { return a.start < b.start; });
    // Merge adjacent ranges of one type (they no longer overlap).
    mine.clear();
    for (const AppLock& c : cut) {
      if (!mine.empty()) {
        AppLock& last = mine.back();
        if (last.type == c.type && last.end != kToEof && last.end + 1 == c.start) {
          last.end = c.end;
          last.pid = want.pid;
          continue;
        }
      }
      mine.push_back(c);
    }
  }
  rest.insert(rest.end(), mine.begin(), mine.end());
  *t = std::move(rest);
}

size_t ReleaseOwner(Table* t, AppLockKind kind, uint32_t slot, uint64_t generation,
                    uint64_t owner) {
  size_t before = t->size();
  std::erase_if(*t, [&](const AppLock& l) {
    return l.kind == kind && l.slot == slot && l.generation == generation && l.owner == owner;
  });
  return before - t->size();
}

}  // namespace agorafs::applock
