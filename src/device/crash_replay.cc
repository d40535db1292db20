#include "device/crash_replay.h"

#include <algorithm>
#include <cstring>
#include <random>

namespace agorafs {

namespace {

uint64_t SplitMix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

void ApplyWrite(const IoRecord& r, std::vector<uint8_t>* img) {
  std::memcpy(img->data() + r.offset, r.data.data(), r.data.size());
}

}  // namespace

const char* TearGrainName(TearGrain g) {
  switch (g) {
    case TearGrain::kNone: return "none";
    case TearGrain::kWrite: return "write";
    case TearGrain::kBlock: return "4k-block";
    case TearGrain::kSector: return "512-sector";
  }
  return "?";
}

Result<std::unique_ptr<CrashLog>> CrashLog::Make(std::vector<uint8_t> base,
                                                 std::vector<IoRecord> log) {
  std::unique_ptr<CrashLog> c(new CrashLog());
  c->base_ = std::move(base);
  c->log_ = std::move(log);
  for (size_t i = 0; i < c->log_.size(); i++) {
    const IoRecord& r = c->log_[i];
    if (r.kind == IoRecord::Kind::kFlush) {
      c->barrier_pos_.push_back(i);
      continue;
    }
    if (r.offset > c->base_.size() || r.data.size() > c->base_.size() - r.offset) {
      return Err(Code::kInvalid, "logged write at offset " + std::to_string(r.offset) + " (" +
                                     std::to_string(r.data.size()) +
                                     " bytes) lies beyond the base image");
    }
    c->writes_++;
  }
  return c;
}

size_t CrashLog::EpochBegin(uint32_t k) const { return k == 0 ? 0 : barrier_pos_[k - 1] + 1; }

size_t CrashLog::EpochEnd(uint32_t k) const {
  return k < barrier_pos_.size() ? barrier_pos_[k] : log_.size();
}

size_t CrashLog::EpochWrites(uint32_t k) const { return EpochEnd(k) - EpochBegin(k); }

std::vector<CrashImageSpec> CrashLog::Plan(uint64_t seed, uint64_t images) const {
  std::vector<CrashImageSpec> specs;
  const uint64_t cuts = uint64_t(barriers()) + 1;
  std::vector<uint32_t> epochs;  // epochs with writes
  for (uint32_t k = 0; k < cuts; k++) {
    if (EpochWrites(k) > 0) epochs.push_back(k);
  }
  // Every prefix when there is room for as many samples; else half prefixes.
  uint64_t prefixes = images >= 2 * cuts || epochs.empty() ? std::min(images, cuts)
                                                           : (images + 1) / 2;
  for (uint64_t i = 0; i < prefixes; i++) {
    CrashImageSpec s;
    s.cut = static_cast<uint32_t>(i * cuts / prefixes);
    specs.push_back(s);
  }
  if (epochs.empty() || images <= prefixes) return specs;
  const uint64_t remaining = images - prefixes;
  std::vector<uint64_t> count(cuts, remaining / epochs.size());
  std::mt19937_64 rng(SplitMix(seed));
  std::shuffle(epochs.begin(), epochs.end(), rng);
  for (uint64_t i = 0; i < remaining % epochs.size(); i++) count[epochs[i]]++;
  for (uint32_t k : epochs) {
    for (uint64_t j = 1; j <= count[k]; j++) {
      CrashImageSpec s;
      s.cut = k;
      s.sample = static_cast<uint32_t>(j);
      s.sample_seed = SplitMix(seed ^ SplitMix((uint64_t(k) << 32) | j));
      specs.push_back(s);
    }
  }
  std::sort(specs.begin(), specs.end(), [](const CrashImageSpec& a, const CrashImageSpec& b) {
    return a.cut != b.cut ? a.cut < b.cut : a.sample < b.sample;
  });
  return specs;
}

std::string CrashLog::ApplyEpochSample(uint32_t k, uint64_t sample_seed,
                                       std::vector<uint8_t>* img) const {
  std::mt19937_64 rng(sample_seed);
  const auto grain = static_cast<TearGrain>(1 + rng() % 3);
  // Probability that a unit landed, in (0, 1]: nearly empty to complete epochs.
  const uint64_t keep_per_mille = 1 + rng() % 1000;
  struct Unit {
    const uint8_t* src;
    uint64_t off;
    size_t len;
  };
  std::vector<Unit> units, kept;
  for (size_t i = EpochBegin(k); i < EpochEnd(k); i++) {
    const IoRecord& r = log_[i];
    if (r.kind != IoRecord::Kind::kWrite) continue;
    const uint64_t end = r.offset + r.data.size();
    uint64_t off = r.offset;
    while (off < end) {
      uint64_t next = end;
      if (grain == TearGrain::kBlock) next = std::min(end, (off / kIoAlign + 1) * kIoAlign);
      if (grain == TearGrain::kSector) next = off + kSectorSize;
      units.push_back({r.data.data() + (off - r.offset), off, size_t(next - off)});
      off = next;
    }
  }
  for (const Unit& u : units) {
    if (rng() % 1000 < keep_per_mille) kept.push_back(u);
  }
  std::shuffle(kept.begin(), kept.end(), rng);
  for (const Unit& u : kept) std::memcpy(img->data() + u.off, u.src, u.len);
  return "grain " + std::string(TearGrainName(grain)) + ", " + std::to_string(kept.size()) +
         " of " + std::to_string(units.size()) + " units landed";
}

std::vector<uint8_t> CrashLog::Build(const CrashImageSpec& spec, std::string* what) const {
  std::vector<CrashImageSpec> one{spec};
  std::vector<uint8_t> out;
  ForEachImage(one, [&](const CrashImageSpec&, std::vector<uint8_t> img, const std::string& w) {
    out = std::move(img);
    if (what) *what = w;
    return false;
  });
  return out;
}

void CrashLog::ForEachImage(
    const std::vector<CrashImageSpec>& specs,
    const std::function<bool(const CrashImageSpec&, std::vector<uint8_t>, const std::string&)>&
        fn) const {
  std::vector<uint8_t> prefix = base_;
  size_t pos = 0;  // log records applied to `prefix`
  for (const CrashImageSpec& s : specs) {
    const size_t target = EpochBegin(std::min<uint32_t>(s.cut, barriers()));
    for (; pos < target; pos++) {
      if (log_[pos].kind == IoRecord::Kind::kWrite) ApplyWrite(log_[pos], &prefix);
    }
    std::vector<uint8_t> img = prefix;
    std::string what = "cut after barrier " + std::to_string(s.cut) + " of " +
                       std::to_string(barriers()) + ", open epoch of " +
                       std::to_string(EpochWrites(s.cut)) + " writes: ";
    if (s.sample == 0) {
      what += "none landed (prefix image)";
    } else {
      what += "sample " + std::to_string(s.sample) + ", " +
              ApplyEpochSample(s.cut, s.sample_seed, &img);
    }
    if (!fn(s, std::move(img), what)) return;
  }
}

}  // namespace agorafs
