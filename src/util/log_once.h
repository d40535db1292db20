// LogOnce: damage is reported once, not once per access.
//
// A damaged block answers EIO every time something reads it; logging each time lets
// one bad block fill the log (and a stdout pipe nobody drains blocks the daemon).
// FirstReport(key) is true the first time a key is seen; callers log at error level
// then and at debug level afterwards. It remembers up to 4,096 keys and then starts
// over, so a long-running daemon repeats a report now and then, in bounded memory.
// Thread-safe.
#pragma once

#include <mutex>
#include <string>
#include <unordered_set>

namespace agorafs {

inline bool FirstReport(const std::string& key) {
  static std::mutex mu;
  static std::unordered_set<std::string> seen;
  std::lock_guard<std::mutex> g(mu);
  if (seen.size() >= 4096) seen.clear();
  return seen.insert(key).second;
}

}  // namespace agorafs
