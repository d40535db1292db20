// Wall-clock helpers for informational on-disk timestamps (never used to order events
// between nodes).
#pragma once

#include <cstdint>
#include <ctime>

namespace agorafs {

// CLOCK_REALTIME in nanoseconds since the epoch.
inline uint64_t RealtimeNs() {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return uint64_t(ts.tv_sec) * 1000000000ull + uint64_t(ts.tv_nsec);
}

}  // namespace agorafs
