// JsonEscape: see json.h.
#include "util/json.h"

#include <fmt/format.h>

namespace agorafs {

std::string JsonEscape(const std::string& s) {
  std::string o;
  o.reserve(s.size() + 2);
  size_t i = 0;
  while (i < s.size()) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      switch (c) {
        case '"': o += "\\\""; break;
        case '\\': o += "\\\\"; break;
        case '\n': o += "\\n"; break;
        case '\r': o += "\\r"; break;
        case '\t': o += "\\t"; break;
        default:
          if (c < 0x20 || c == 0x7f) {
            o += fmt::format("\\u{:04x}", unsigned(c));
          } else {
            o.push_back(char(c));
          }
      }
      i++;
      continue;
    }
    // Multi-byte UTF-8 sequences pass through when well formed; anything else (names
    // are arbitrary bytes) becomes U+FFFD.
    size_t n = (c >= 0xC2 && c <= 0xDF) ? 2 : (c >= 0xE0 && c <= 0xEF) ? 3 : (c >= 0xF0 && c <= 0xF4) ? 4 : 0;
    bool ok = n != 0 && i + n <= s.size();
    for (size_t k = 1; ok && k < n; k++) ok = (static_cast<unsigned char>(s[i + k]) & 0xC0) == 0x80;
    if (ok && n == 3) {
      unsigned char c1 = static_cast<unsigned char>(s[i + 1]);
      ok = !(c == 0xE0 && c1 < 0xA0) && !(c == 0xED && c1 >= 0xA0);
    }
    if (ok && n == 4) {
      unsigned char c1 = static_cast<unsigned char>(s[i + 1]);
      ok = !(c == 0xF0 && c1 < 0x90) && !(c == 0xF4 && c1 >= 0x90);
    }
    if (ok) {
      o.append(s, i, n);
      i += n;
    } else {
      o += "\\ufffd";
      i++;
    }
  }
  return o;
}

}  // namespace agorafs
