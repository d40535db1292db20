// Clocks. RealtimeNs() is for informational on-disk timestamps only (never used to
// order events between nodes); BootNow*() is this node's own monotonic clock.
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

// CLOCK_BOOTTIME in milliseconds: monotonic and counting time spent suspended or
// stopped, so a paused process sees that its lease ran out. Used for every lease and
// liveness decision; never compared between nodes.
inline uint64_t BootNowMs() {
  struct timespec ts;
  clock_gettime(CLOCK_BOOTTIME, &ts);
  return uint64_t(ts.tv_sec) * 1000ull + uint64_t(ts.tv_nsec) / 1000000ull;
}
inline uint64_t BootNowUs() {
  struct timespec ts;
  clock_gettime(CLOCK_BOOTTIME, &ts);
  return uint64_t(ts.tv_sec) * 1000000ull + uint64_t(ts.tv_nsec) / 1000ull;
}

}  // namespace agorafs
