// JSON string escaping for the CLI's and fsck's machine-readable output.
//
// Contract: JsonEscape returns `s` escaped for use between double quotes in JSON
// (quotes, backslashes, control characters; invalid UTF-8 bytes as \u00XX), without
// the surrounding quotes. Pure function.
#pragma once

#include <string>

namespace agorafs {

std::string JsonEscape(const std::string& s);

}  // namespace agorafs
