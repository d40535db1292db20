// CrashReplay: rebuilds the disk images a power cut could have left, from the image
// before a workload ran and the write/flush log a RecordingDevice took meanwhile.
//
// Crash model
// - The log's flushes are barriers, numbered 1..B in log order. A write logged before
//   barrier k had completed before flush k started, so once flush k returned it is on
//   the media. Writes logged after barrier k were issued after flush k returned.
// - A cut "at barrier k" (0 <= k <= B) happens after flush k returned (k = 0: before
//   the first flush) and before flush k + 1 returned. Every write logged before
//   barrier k is on the media. The writes of the open epoch k (logged between barrier
//   k and barrier k + 1, or the end of the log for k = B) sat in the volatile cache:
//   any subset of them may have reached the media, in any order. Nothing logged after
//   barrier k + 1 can be there (it was not issued yet).
// - Atomicity: each image samples one tearing grain for the whole epoch: whole writes,
//   4 KiB blocks or 512-byte sectors. A unit of that grain lands whole or not at all
//   (a device never tears a sector). Units that overlap land in the sampled order, so
//   an older write may end up over a newer one of the same epoch: the image then
//   shows the older write landed and the newer did not, which the model allows.
// - The images of a plan: the prefix image of every barrier (epoch writes: none),
//   plus samples spread evenly over the epochs that hold writes (when fewer images
//   are asked for than twice the barriers, half of them are evenly spaced prefixes). A sample keeps each
//   unit with a probability drawn per sample, so both nearly empty and nearly full
//   epochs come up. Everything follows from the plan's seed: the same base, log and
//   seed give the same images.
//
// Thread-safety: a CrashLog is immutable after Make(); its methods may be called from
// any thread. ForEachImage calls its callback on the calling thread.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "device/recording_device.h"
#include "util/status.h"

namespace agorafs {

enum class TearGrain : uint8_t { kNone = 0, kWrite = 1, kBlock = 2, kSector = 3 };
const char* TearGrainName(TearGrain g);

struct CrashImageSpec {
  uint32_t cut = 0;         // the barrier k the cut follows
  uint32_t sample = 0;      // 0: the prefix image alone; else the sample's number in epoch k
  uint64_t sample_seed = 0;  // drives the sample's grain, subset and order
};

class CrashLog {
 public:
  // Checks every write lies inside `base` (kInvalid otherwise).
  static Result<std::unique_ptr<CrashLog>> Make(std::vector<uint8_t> base,
                                                std::vector<IoRecord> log);

  uint32_t barriers() const { return static_cast<uint32_t>(barrier_pos_.size()); }
  uint64_t writes() const { return writes_; }
  size_t image_size() const { return base_.size(); }
  // Writes in the open epoch k.
  size_t EpochWrites(uint32_t k) const;

  // `images` specs: every prefix (or, when images < 2 * (barriers() + 1), images / 2
  // evenly spaced ones), the rest samples spread over the epochs with writes (when
  // no epoch holds a write, prefixes only). Sorted by cut.
  std::vector<CrashImageSpec> Plan(uint64_t seed, uint64_t images) const;

  // Builds the image of one spec from the base (slow: replays the whole prefix).
  std::vector<uint8_t> Build(const CrashImageSpec& spec, std::string* what = nullptr) const;

  // Builds the images of `specs` (sorted by cut) in one pass over the log and hands
  // each to fn with a description; stops early when fn returns false.
  void ForEachImage(const std::vector<CrashImageSpec>& specs,
                    const std::function<bool(const CrashImageSpec&, std::vector<uint8_t>,
                                             const std::string& what)>& fn) const;

 private:
  CrashLog() = default;
  // Applies the sampled part of epoch k onto `img` (already the prefix image of k).
  std::string ApplyEpochSample(uint32_t k, uint64_t sample_seed, std::vector<uint8_t>* img) const;
  // Record range [begin, end) of epoch k.
  size_t EpochBegin(uint32_t k) const;
  size_t EpochEnd(uint32_t k) const;

  std::vector<uint8_t> base_;
  std::vector<IoRecord> log_;
  std::vector<size_t> barrier_pos_;  // index in log_ of flush k + 1 (0-based)
  uint64_t writes_ = 0;
};

}  // namespace agorafs
