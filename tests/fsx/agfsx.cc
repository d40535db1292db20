// agfsx: an fsx-style random-operation exerciser for agorafs (or any POSIX filesystem).
//
// One file per worker, an in-memory model of its exact contents, and a seeded stream of
// operations: buffered writes (tiny, ordinary, 1 MiB; inside the file, at EOF, past EOF),
// reads, MAP_SHARED reads and writes (msync), truncates up and down, fallocate (mode 0,
// KEEP_SIZE, PUNCH_HOLE|KEEP_SIZE, ZERO_RANGE, ZERO_RANGE|KEEP_SIZE), fsync/fdatasync,
// close+reopen, close+reopen with O_TRUNC, and O_DIRECT reads/writes through aligned buffers
// on a second descriptor.
// Every read and every file size is checked against the model; the first difference
// prints the seed, the first mismatching offset, the bytes around it, which ops last
// touched that offset, and the tail of the op log, then exits 1.
//
// Written bytes are never zero: byte = 1 + (op + offset) % 255, so a stale zero, a
// lost write or a byte from another op is always visible, and a wrong byte names the op
// (mod 255) that wrote it.
//
// The op stream depends only on the seed and the options, so a failure reproduces with
// the same flags; --ops can be cut to the failing op number.
//
// Usage: agfsx --file PATH [--ops N] [--seed S] [--maxlen L] [--maxsize M] [--threads K]
//              [--no-mmap] [--no-direct] [--no-fallocate] [--no-otrunc] [--progress N]
//              [--verbose]
//              [--inject-corruption N]   (self-test: flips a byte behind the model before op N)
//              [--save-model DIR]        (writes each file's final expected content to
//                                         DIR/<name>.model, to compare after a remount)
// With --threads K > 1 the files are PATH.0 .. PATH.K-1, worker i uses seed S+i and runs
// N ops; the final line counts every worker's ops.
#include <fcntl.h>
#include <linux/falloc.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cinttypes>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace {

constexpr uint64_t kDirectAlign = 4096;
constexpr size_t kLogKeep = 4096;  // ring of recent ops; the report prints the last 50
constexpr size_t kLogPrint = 50;

struct Options {
  uint64_t ops = 10000;
  uint64_t seed = 0;
  bool seed_given = false;
  uint64_t maxlen = 256 * 1024;
  uint64_t maxsize = 8ull << 20;
  std::string file;
  int threads = 1;
  bool use_mmap = true;
  bool use_direct = true;
  bool use_falloc = true;
  bool use_otrunc = true;
  bool verbose = false;
  uint64_t progress = 0;
  uint64_t inject = 0;  // self-test: corrupt one byte behind the model's back before op N
  std::string save_model;  // directory: write each file's final expected content there
};

enum Op {
  kWrite,
  kRead,
  kMapRead,
  kMapWrite,
  kTruncate,
  kFalloc,
  kFsync,
  kFdatasync,
  kCloseOpen,
  kDirectWrite,
  kDirectRead,
  kVerifyAll,
  kTruncOpen,
  kNumOps
};
const char* const kOpNames[kNumOps] = {"WRITE",    "READ",     "MAPREAD",   "MAPWRITE",
                                       "TRUNCATE", "FALLOC",   "FSYNC",     "FDATASYNC",
                                       "CLOSEOPEN", "DWRITE",  "DREAD",     "VERIFY",
                                       "OPEN_TRUNC"};

struct FallocMode {
  int mode;
  const char* name;
};
const FallocMode kFallocModes[] = {
    {0, "ALLOC"},
    {FALLOC_FL_KEEP_SIZE, "KEEP_SIZE"},
    {FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, "PUNCH_HOLE|KEEP_SIZE"},
    {FALLOC_FL_ZERO_RANGE, "ZERO_RANGE"},
    {FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, "ZERO_RANGE|KEEP_SIZE"},
};
constexpr int kNumFallocModes = sizeof(kFallocModes) / sizeof(kFallocModes[0]);

struct LogEntry {
  uint64_t n = 0;
  Op op = kWrite;
  uint64_t off = 0, len = 0;
  uint64_t size_before = 0, size_after = 0;
  int mode = -1;  // fallocate mode index
  bool done = false;
};

std::mutex g_print_mu;
std::atomic<bool> g_failed{false};
std::atomic<uint64_t> g_verified{0};

uint8_t PatternByte(uint64_t opn, uint64_t pos) {
  return static_cast<uint8_t>(1 + (opn + pos) % 255);
}

class Worker;
thread_local Worker* t_worker = nullptr;
thread_local sigjmp_buf t_bus_jmp;
thread_local volatile sig_atomic_t t_in_map = 0;

class Worker {
 public:
  Worker(const Options& o, std::string path, uint64_t seed, int index)
      : o_(o), path_(std::move(path)), seed_(seed), index_(index), rng_(seed) {
    for (auto& e : falloc_ok_) e = o.use_falloc;
    pagesz_ = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  }

  // Returns true when every op verified.
  bool Run() {
    t_worker = this;
    fd_ = open(path_.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (fd_ < 0) return Fail("open %s: %s", path_.c_str(), strerror(errno));
    if (posix_memalign(reinterpret_cast<void**>(&dbuf_), kDirectAlign, DirectBufSize()) != 0)
      return Fail("posix_memalign failed");
    for (opn_ = 1; opn_ <= o_.ops; opn_++) {
      if (g_failed.load()) break;
      if (opn_ == o_.inject && !model_.empty()) {  // checks that the checker catches it
        uint64_t pos = Rand(model_.size());
        uint8_t b = static_cast<uint8_t>(model_[pos] ^ 0x5a);
        if (pwrite(fd_, &b, 1, static_cast<off_t>(pos)) != 1) return Fail("inject failed");
        std::fprintf(stderr, "agfsx[%d]: injected a bad byte at 0x%" PRIx64 " before op %" PRIu64
                     "\n", index_, pos, opn_);
      }
      if (!Step()) return false;
      g_verified.fetch_add(1);
      if (o_.progress && opn_ % o_.progress == 0) {
        std::lock_guard<std::mutex> l(g_print_mu);
        std::printf("agfsx[%d]: %" PRIu64 " ops, size %zu\n", index_, opn_, model_.size());
        std::fflush(stdout);
      }
    }
    if (g_failed.load()) return false;
    // Final full verification, through a fresh descriptor.
    if (!Reopen()) return false;
    if (!VerifyRange(0, model_.size() + 4096, "final verify")) return false;
    CloseAll();
    if (!o_.save_model.empty()) {
      std::string base = path_.substr(path_.find_last_of('/') + 1);
      std::string mp = o_.save_model + "/" + base + ".model";
      int mfd = open(mp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      if (mfd < 0) return Fail("open %s: %s", mp.c_str(), strerror(errno));
      bool ok = FullPwrite(mfd, model_.data(), model_.size(), 0, "save model");
      close(mfd);
      if (!ok) return false;
    }
    std::free(dbuf_);
    dbuf_ = nullptr;
    return true;
  }

  // Called from the SIGBUS handler while a mapping is being accessed.
  bool in_map() const { return t_in_map != 0; }

 private:
  uint64_t Rand(uint64_t n) { return n ? rng_() % n : 0; }
  bool Chance(unsigned pct) { return Rand(100) < pct; }
  uint64_t DirectBufSize() const {
    return std::max<uint64_t>(o_.maxlen, 1 << 20) + 2 * kDirectAlign;
  }

  // ---- reporting ----------------------------------------------------------------

  LogEntry& Log(Op op, uint64_t off, uint64_t len, int mode = -1) {
    LogEntry& e = log_[log_n_++ % kLogKeep];
    e = LogEntry{};
    e.n = opn_;
    e.op = op;
    e.off = off;
    e.len = len;
    e.mode = mode;
    e.size_before = model_.size();
    if (o_.verbose) {
      std::lock_guard<std::mutex> l(g_print_mu);
      std::printf("[%d] ", index_);
      PrintEntry(stdout, e);
      std::fflush(stdout);
    }
    return e;
  }
  void Done(LogEntry& e) {
    e.size_after = model_.size();
    e.done = true;
  }

  static void PrintEntry(FILE* f, const LogEntry& e) {
    std::fprintf(f, "#%-7" PRIu64 " %-9s", e.n, kOpNames[e.op]);
    switch (e.op) {
      case kFsync:
      case kFdatasync:
      case kCloseOpen:
      case kTruncOpen:
        break;
      case kTruncate:
        std::fprintf(f, " to 0x%" PRIx64 " (%" PRIu64 ")", e.off, e.off);
        break;
      default:
        std::fprintf(f, " 0x%" PRIx64 " thru 0x%" PRIx64 " (0x%" PRIx64 " bytes)", e.off,
                     e.len ? e.off + e.len - 1 : e.off, e.len);
    }
    if (e.op == kFalloc && e.mode >= 0) std::fprintf(f, " %s", kFallocModes[e.mode].name);
    std::fprintf(f, "  size 0x%" PRIx64, e.size_before);
    if (e.done && e.size_after != e.size_before) std::fprintf(f, " -> 0x%" PRIx64, e.size_after);
    if (!e.done) std::fprintf(f, "  <- failing op");
    std::fprintf(f, "\n");
  }

  // Which logged ops touched `pos` (newest first), as a hint where the bad byte came from.
  void PrintTouchers(FILE* f, uint64_t pos) {
    int shown = 0;
    size_t have = std::min<size_t>(log_n_, kLogKeep);
    for (size_t i = 0; i < have && shown < 6; i++) {
      const LogEntry& e = log_[(log_n_ - 1 - i) % kLogKeep];
      bool touches = false;
      switch (e.op) {
        case kWrite:
        case kMapWrite:
        case kDirectWrite:
        case kFalloc:
          touches = pos >= e.off && pos < e.off + e.len;
          break;
        case kTruncate:
          touches = pos >= std::min(e.off, e.size_before) && pos < std::max(e.off, e.size_before);
          break;
        case kTruncOpen:
          touches = true;
          break;
        default:
          break;
      }
      if (touches) {
        std::fprintf(f, "  touched by: ");
        PrintEntry(f, e);
        shown++;
      }
    }
    if (!shown) std::fprintf(f, "  no op in the log (last %zu) touched it\n", have);
  }

  void PrintLogTail(FILE* f) {
    size_t have = std::min<size_t>(log_n_, kLogKeep);
    size_t n = std::min(have, kLogPrint);
    std::fprintf(f, "op log, last %zu of %" PRIu64 " ops:\n", n, opn_);
    for (size_t i = n; i > 0; i--) PrintEntry(f, log_[(log_n_ - i) % kLogKeep]);
  }

  void PrintHeader(FILE* f) {
    std::fprintf(f, "agfsx: FAILURE in worker %d, file %s\n", index_, path_.c_str());
    std::fprintf(f, "agfsx: seed %" PRIu64 " (reproduce this file alone: --seed %" PRIu64
                    " --ops %" PRIu64 " --maxlen %" PRIu64 " --maxsize %" PRIu64 "%s%s%s%s)\n",
                 seed_, seed_, opn_, o_.maxlen, o_.maxsize, o_.use_mmap ? "" : " --no-mmap",
                 o_.use_direct ? "" : " --no-direct", o_.use_falloc ? "" : " --no-fallocate",
                 o_.use_otrunc ? "" : " --no-otrunc");
    std::fprintf(f, "agfsx: failing op #%" PRIu64 ", model size 0x%zx\n", opn_, model_.size());
  }

  __attribute__((format(printf, 2, 3))) bool Fail(const char* fmt, ...) {
    std::lock_guard<std::mutex> l(g_print_mu);
    bool first = !g_failed.exchange(true);
    FILE* f = stderr;
    if (!first) std::fprintf(f, "\nagfsx: (another worker failed first)\n");
    PrintHeader(f);
    va_list ap;
    va_start(ap, fmt);
    std::fprintf(f, "agfsx: ");
    std::vfprintf(f, fmt, ap);
    std::fprintf(f, "\n");
    va_end(ap);
    PrintLogTail(f);
    std::fflush(f);
    return false;
  }

  bool Mismatch(const char* what, uint64_t file_off, const uint8_t* got, size_t got_len,
                size_t exp_len) {
    // First differing position.
    size_t n = std::min(got_len, exp_len);
    size_t i = 0;
    while (i < n && got[i] == model_[file_off + i]) i++;
    std::lock_guard<std::mutex> l(g_print_mu);
    bool first = !g_failed.exchange(true);
    FILE* f = stderr;
    if (!first) std::fprintf(f, "\nagfsx: (another worker failed first)\n");
    PrintHeader(f);
    if (got_len != exp_len && i == n) {
      std::fprintf(f,
                   "agfsx: %s at 0x%" PRIx64 ": short/long read: got %zu bytes, expected %zu "
                   "(file size in model 0x%zx)\n",
                   what, file_off, got_len, exp_len, model_.size());
    } else {
      uint64_t bad = file_off + i;
      std::fprintf(f,
                   "agfsx: %s mismatch: first bad byte at file offset 0x%" PRIx64 " (%" PRIu64
                   "), %zu bytes into the read of 0x%zx at 0x%" PRIx64 "\n",
                   what, bad, bad, i, exp_len, file_off);
      size_t bad_count = 0, last_bad = i;
      for (size_t j = i; j < n; j++)
        if (got[j] != model_[file_off + j]) bad_count++, last_bad = j;
      std::fprintf(f, "agfsx: %zu bad bytes in this read, last at 0x%" PRIx64 "\n", bad_count,
                   file_off + last_bad);
      size_t s = i >= 8 ? i - 8 : 0;
      size_t e = std::min(n, i + 24);
      std::fprintf(f, "  offset            expected got\n");
      for (size_t j = s; j < e; j++) {
        uint8_t g = got[j], x = model_[file_off + j];
        std::fprintf(f, "  0x%-14" PRIx64 "  %02x       %02x%s", file_off + j, x, g,
                     g != x ? "  <-" : "");
        if (g != x && g != 0) {
          uint64_t k = (uint64_t(g) + 254 - (file_off + j) % 255) % 255;  // g = 1+(op+pos)%255
          std::fprintf(f, "  (written by an op = %" PRIu64 " mod 255?)", k);
        }
        std::fprintf(f, "\n");
      }
      PrintTouchers(f, bad);
    }
    PrintLogTail(f);
    std::fflush(f);
    return false;
  }

  // ---- file handling --------------------------------------------------------------

  void CloseAll() {
    if (fd_ >= 0) close(fd_);
    if (dfd_ >= 0) close(dfd_);
    fd_ = dfd_ = -1;
  }

  bool Reopen() {
    CloseAll();
    fd_ = open(path_.c_str(), O_RDWR);
    if (fd_ < 0) return Fail("reopen %s: %s", path_.c_str(), strerror(errno));
    return true;
  }

  bool DirectFd() {
    if (dfd_ >= 0) return true;
    dfd_ = open(path_.c_str(), O_RDWR | O_DIRECT);
    if (dfd_ < 0) return Fail("open O_DIRECT %s: %s", path_.c_str(), strerror(errno));
    return true;
  }

  bool CheckSize(const char* when) {
    struct stat st;
    if (fstat(fd_, &st) != 0) return Fail("fstat: %s", strerror(errno));
    if (static_cast<uint64_t>(st.st_size) != model_.size())
      return Fail("size mismatch %s: file has 0x%" PRIx64 " (%" PRIu64 "), model 0x%zx (%zu)",
                  when, static_cast<uint64_t>(st.st_size), static_cast<uint64_t>(st.st_size),
                  model_.size(), model_.size());
    return true;
  }

  bool FullPwrite(int fd, const uint8_t* p, size_t len, uint64_t off, const char* what) {
    size_t done = 0;
    while (done < len) {
      ssize_t w = pwrite(fd, p + done, len - done, static_cast<off_t>(off + done));
      if (w < 0) {
        if (errno == EINTR) continue;
        return Fail("%s pwrite(0x%zx at 0x%" PRIx64 "): %s", what, len - done, off + done,
                    strerror(errno));
      }
      if (w == 0) return Fail("%s pwrite returned 0", what);
      done += static_cast<size_t>(w);
    }
    return true;
  }

  // Reads until len bytes or EOF; returns bytes read or -1 (after Fail).
  ssize_t FullPread(int fd, uint8_t* p, size_t len, uint64_t off, const char* what) {
    size_t done = 0;
    while (done < len) {
      ssize_t r = pread(fd, p + done, len - done, static_cast<off_t>(off + done));
      if (r < 0) {
        if (errno == EINTR) continue;
        Fail("%s pread(0x%zx at 0x%" PRIx64 "): %s", what, len - done, off + done,
             strerror(errno));
        return -1;
      }
      if (r == 0) break;
      done += static_cast<size_t>(r);
    }
    return static_cast<ssize_t>(done);
  }

  void ModelWrite(uint64_t off, const uint8_t* p, size_t len) {
    if (off + len > model_.size()) model_.resize(off + len, 0);
    std::memcpy(model_.data() + off, p, len);
  }
  void ModelZero(uint64_t off, uint64_t end) {
    end = std::min<uint64_t>(end, model_.size());
    if (off < end) std::memset(model_.data() + off, 0, end - off);
  }

  void Fill(uint8_t* p, uint64_t off, size_t len) {
    for (size_t i = 0; i < len; i++) p[i] = PatternByte(opn_, off + i);
  }

  bool VerifyRange(uint64_t off, uint64_t len, const char* what) {
    if (rbuf_.size() < len) rbuf_.resize(len);
    ssize_t r = FullPread(fd_, rbuf_.data(), len, off, what);
    if (r < 0) return false;
    size_t exp = off >= model_.size() ? 0 : std::min<uint64_t>(len, model_.size() - off);
    if (static_cast<size_t>(r) != exp ||
        (exp && std::memcmp(rbuf_.data(), model_.data() + off, exp) != 0))
      return Mismatch(what, off, rbuf_.data(), static_cast<size_t>(r), exp);
    return true;
  }

  // ---- op parameters --------------------------------------------------------------

  uint64_t PickLen() {
    unsigned c = static_cast<unsigned>(Rand(100));
    if (c < 2) return 1 << 20;                        // a whole MiB
    if (c < 17) return 1 + Rand(16);                  // tiny
    if (c < 27) return 1 + Rand(8192);                // around a block
    return 1 + Rand(o_.maxlen);
  }

  // An offset/length for a write-like op, clipped to maxsize.
  void PickWrite(uint64_t* off, uint64_t* len) {
    uint64_t size = model_.size();
    uint64_t l = std::min<uint64_t>(PickLen(), o_.maxsize);
    unsigned c = static_cast<unsigned>(Rand(100));
    uint64_t o;
    if (c < 10) {
      o = size;  // append
    } else if (c < 30) {
      o = size + Rand(std::max<uint64_t>(o_.maxsize - std::min(size, o_.maxsize), 1));  // past EOF
    } else if (c < 38) {
      o = Rand(4096);  // the start: inline data and the first block
    } else {
      o = Rand(std::max<uint64_t>(size, 1));
    }
    if (Chance(20)) o &= ~uint64_t(4095);
    if (o >= o_.maxsize) o = o_.maxsize - 1;
    if (o + l > o_.maxsize) l = o_.maxsize - o;
    *off = o;
    *len = std::max<uint64_t>(l, 1);
  }

  // ---- ops ----------------------------------------------------------------------

  bool DoWrite() {
    uint64_t off, len;
    PickWrite(&off, &len);
    auto& e = Log(kWrite, off, len);
    if (wbuf_.size() < len) wbuf_.resize(len);
    Fill(wbuf_.data(), off, len);
    if (!FullPwrite(fd_, wbuf_.data(), len, off, "write")) return false;
    ModelWrite(off, wbuf_.data(), len);
    Done(e);
    return true;
  }

  bool DoRead() {
    uint64_t size = model_.size();
    uint64_t len = PickLen(), off;
    if (Chance(5)) {
      off = size + Rand(8192);  // at/past EOF
    } else {
      off = Rand(std::max<uint64_t>(size, 1));
      if (Chance(20)) off &= ~uint64_t(4095);
    }
    auto& e = Log(kRead, off, len);
    if (!VerifyRange(off, len, "read")) return false;
    Done(e);
    return true;
  }

  bool DoVerifyAll() {
    auto& e = Log(kVerifyAll, 0, model_.size());
    if (!VerifyRange(0, model_.size() + 4096, "full-file read")) return false;
    Done(e);
    return true;
  }

  // Maps [off, off+len) (file must cover it) and returns the mapping and its start.
  uint8_t* Map(uint64_t off, uint64_t len, int prot, uint8_t** base, size_t* maplen) {
    uint64_t pg = off & ~(pagesz_ - 1);
    *maplen = len + (off - pg);
    void* m = mmap(nullptr, *maplen, prot, MAP_SHARED, fd_, static_cast<off_t>(pg));
    if (m == MAP_FAILED) {
      Fail("mmap(0x%zx at 0x%" PRIx64 "): %s", *maplen, pg, strerror(errno));
      return nullptr;
    }
    *base = static_cast<uint8_t*>(m);
    return *base + (off - pg);
  }

  bool DoMapRead() {
    uint64_t size = model_.size();
    if (size == 0) return DoRead();
    uint64_t off = Rand(size);
    uint64_t len = std::min<uint64_t>(PickLen(), size - off);
    auto& e = Log(kMapRead, off, len);
    uint8_t* base;
    size_t maplen;
    uint8_t* p = Map(off, len, PROT_READ, &base, &maplen);
    if (!p) return false;
    if (rbuf_.size() < len) rbuf_.resize(len);
    if (sigsetjmp(t_bus_jmp, 1) != 0) {
      t_in_map = 0;
      munmap(base, maplen);
      return Fail("SIGBUS reading the mapping (file shorter than the model?)");
    }
    t_in_map = 1;
    std::memcpy(rbuf_.data(), p, len);
    t_in_map = 0;
    munmap(base, maplen);
    if (std::memcmp(rbuf_.data(), model_.data() + off, len) != 0)
      return Mismatch("mmap read", off, rbuf_.data(), len, len);
    Done(e);
    return true;
  }

  bool DoMapWrite() {
    uint64_t off, len;
    PickWrite(&off, &len);
    auto& e = Log(kMapWrite, off, len);
    if (off + len > model_.size()) {
      // A mapping cannot extend a file: grow it first, as fsx does.
      if (ftruncate(fd_, static_cast<off_t>(off + len)) != 0)
        return Fail("ftruncate before mapwrite: %s", strerror(errno));
      model_.resize(off + len, 0);
    }
    if (wbuf_.size() < len) wbuf_.resize(len);
    Fill(wbuf_.data(), off, len);
    uint8_t* base;
    size_t maplen;
    uint8_t* p = Map(off, len, PROT_READ | PROT_WRITE, &base, &maplen);
    if (!p) return false;
    if (sigsetjmp(t_bus_jmp, 1) != 0) {
      t_in_map = 0;
      munmap(base, maplen);
      return Fail("SIGBUS writing the mapping");
    }
    t_in_map = 1;
    std::memcpy(p, wbuf_.data(), len);
    t_in_map = 0;
    if (msync(base, maplen, MS_SYNC) != 0) {
      int err = errno;
      munmap(base, maplen);
      return Fail("msync: %s", strerror(err));
    }
    munmap(base, maplen);
    ModelWrite(off, wbuf_.data(), len);
    Done(e);
    return true;
  }

  bool DoTruncate() {
    uint64_t size = model_.size(), ns;
    unsigned c = static_cast<unsigned>(Rand(100));
    if (c < 12) {
      ns = Rand(4097);  // small: back to (or near) inline sizes
    } else if (c < 45) {
      ns = Rand(size + 1);  // down
    } else if (c < 55) {
      ns = size;  // same
    } else {
      ns = size + Rand(std::max<uint64_t>(o_.maxsize - std::min(size, o_.maxsize), 1));  // up
    }
    if (Chance(25)) ns &= ~uint64_t(4095);
    auto& e = Log(kTruncate, ns, 0);
    if (ftruncate(fd_, static_cast<off_t>(ns)) != 0)
      return Fail("ftruncate(0x%" PRIx64 "): %s", ns, strerror(errno));
    model_.resize(ns, 0);
    Done(e);
    return true;
  }

  bool DoFalloc() {
    int enabled[kNumFallocModes], n = 0;
    for (int i = 0; i < kNumFallocModes; i++)
      if (falloc_ok_[i]) enabled[n++] = i;
    if (n == 0) return DoWrite();
    int mi = enabled[Rand(n)];
    uint64_t size = model_.size();
    uint64_t off, len;
    unsigned c = static_cast<unsigned>(Rand(100));
    if (c < 70 && size > 0) {
      off = Rand(size);
    } else if (c < 80) {
      off = Rand(4096);
    } else {
      off = size + Rand(std::max<uint64_t>(o_.maxsize - std::min(size, o_.maxsize), 1) / 2);
    }
    len = 1 + Rand(Chance(30) ? 4096 : o_.maxlen * 2);
    if (Chance(30)) {
      off &= ~uint64_t(4095);
      len = (len + 4095) & ~uint64_t(4095);
    }
    if (off >= o_.maxsize) off = o_.maxsize - 1;
    if (off + len > o_.maxsize) len = o_.maxsize - off;
    const int mode = kFallocModes[mi].mode;
    auto& e = Log(kFalloc, off, len, mi);
    if (fallocate(fd_, mode, static_cast<off_t>(off), static_cast<off_t>(len)) != 0) {
      if (errno == EOPNOTSUPP) {
        falloc_ok_[mi] = false;
        std::lock_guard<std::mutex> l(g_print_mu);
        std::printf("agfsx[%d]: fallocate mode %s returned EOPNOTSUPP: disabled\n", index_,
                    kFallocModes[mi].name);
        std::fflush(stdout);
        Done(e);
        return true;
      }
      return Fail("fallocate(%s, 0x%" PRIx64 ", 0x%" PRIx64 "): %s", kFallocModes[mi].name, off,
                  len, strerror(errno));
    }
    const uint64_t end = off + len;
    const bool keep = mode & FALLOC_FL_KEEP_SIZE;
    if (mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE)) ModelZero(off, end);
    if (!keep && end > model_.size()) model_.resize(end, 0);
    Done(e);
    return true;
  }

  bool DoSync(bool data) {
    auto& e = Log(data ? kFdatasync : kFsync, 0, 0);
    if ((data ? fdatasync(fd_) : fsync(fd_)) != 0)
      return Fail("%s: %s", data ? "fdatasync" : "fsync", strerror(errno));
    Done(e);
    return true;
  }

  bool DoCloseOpen() {
    auto& e = Log(kCloseOpen, 0, 0);
    if (!Reopen()) return false;
    Done(e);
    return true;
  }

  // close, then open(O_RDWR|O_TRUNC) of the existing file: it must come back empty.
  bool DoTruncOpen() {
    auto& e = Log(kTruncOpen, 0, 0);
    CloseAll();
    fd_ = open(path_.c_str(), O_RDWR | O_TRUNC);
    if (fd_ < 0) return Fail("open O_TRUNC %s: %s", path_.c_str(), strerror(errno));
    model_.clear();
    Done(e);
    return true;
  }

  bool DoDirectWrite() {
    uint64_t off, len;
    PickWrite(&off, &len);
    off &= ~(kDirectAlign - 1);
    len = (len + kDirectAlign - 1) & ~(kDirectAlign - 1);
    const uint64_t lim = o_.maxsize & ~(kDirectAlign - 1);
    if (off + len > lim) {
      if (off + kDirectAlign > lim) {
        off = lim - kDirectAlign;
        len = kDirectAlign;
      } else {
        len = lim - off;
      }
    }
    auto& e = Log(kDirectWrite, off, len);
    if (!DirectFd()) return false;
    Fill(dbuf_, off, len);
    if (!FullPwrite(dfd_, dbuf_, len, off, "O_DIRECT write")) return false;
    ModelWrite(off, dbuf_, len);
    Done(e);
    return true;
  }

  bool DoDirectRead() {
    uint64_t size = model_.size();
    uint64_t off = Rand(size + 1) & ~(kDirectAlign - 1);
    uint64_t len = (PickLen() + kDirectAlign - 1) & ~(kDirectAlign - 1);
    auto& e = Log(kDirectRead, off, len);
    if (!DirectFd()) return false;
    ssize_t r = FullPread(dfd_, dbuf_, len, off, "O_DIRECT read");
    if (r < 0) return false;
    size_t exp = off >= size ? 0 : std::min<uint64_t>(len, size - off);
    if (static_cast<size_t>(r) != exp ||
        (exp && std::memcmp(dbuf_, model_.data() + off, exp) != 0))
      return Mismatch("O_DIRECT read", off, dbuf_, static_cast<size_t>(r), exp);
    Done(e);
    return true;
  }

  bool Step() {
    // Weights out of 1000.
    static const struct {
      Op op;
      unsigned w;
    } kWeights[] = {
        {kWrite, 300},     {kRead, 230},      {kMapRead, 60},     {kMapWrite, 60},
        {kTruncate, 70},   {kFalloc, 110},    {kFsync, 20},       {kFdatasync, 10},
        {kCloseOpen, 30},  {kDirectWrite, 45}, {kDirectRead, 45}, {kVerifyAll, 20},
        {kTruncOpen, 4},
    };
    unsigned total = 0;
    for (auto& w : kWeights) total += w.w;
    unsigned r = static_cast<unsigned>(Rand(total));
    Op op = kWrite;
    for (auto& w : kWeights) {
      if (r < w.w) {
        op = w.op;
        break;
      }
      r -= w.w;
    }
    // The op stream must not depend on the options' switches: draw the same randomness,
    // then substitute.
    if ((op == kMapRead || op == kMapWrite) && !o_.use_mmap) op = op == kMapRead ? kRead : kWrite;
    if ((op == kDirectRead || op == kDirectWrite) && !o_.use_direct)
      op = op == kDirectRead ? kRead : kWrite;
    if (op == kTruncOpen && !o_.use_otrunc) op = kCloseOpen;
    bool ok = true;
    switch (op) {
      case kWrite: ok = DoWrite(); break;
      case kRead: ok = DoRead(); break;
      case kMapRead: ok = DoMapRead(); break;
      case kMapWrite: ok = DoMapWrite(); break;
      case kTruncate: ok = DoTruncate(); break;
      case kFalloc: ok = DoFalloc(); break;
      case kFsync: ok = DoSync(false); break;
      case kFdatasync: ok = DoSync(true); break;
      case kCloseOpen: ok = DoCloseOpen(); break;
      case kDirectWrite: ok = DoDirectWrite(); break;
      case kDirectRead: ok = DoDirectRead(); break;
      case kVerifyAll: ok = DoVerifyAll(); break;
      case kTruncOpen: ok = DoTruncOpen(); break;
      default: break;
    }
    if (!ok) return false;
    // The O_DIRECT descriptor comes and goes.
    if (dfd_ >= 0 && Chance(5)) {
      close(dfd_);
      dfd_ = -1;
    }
    return CheckSize("after the op");
  }

  const Options& o_;
  std::string path_;
  uint64_t seed_;
  int index_;
  std::mt19937_64 rng_;
  uint64_t pagesz_ = 4096;
  int fd_ = -1, dfd_ = -1;
  uint64_t opn_ = 0;
  std::vector<uint8_t> model_, wbuf_, rbuf_;
  uint8_t* dbuf_ = nullptr;
  bool falloc_ok_[kNumFallocModes];
  LogEntry log_[kLogKeep];
  size_t log_n_ = 0;
};

void OnSigbus(int) {
  if (t_worker && t_in_map) siglongjmp(t_bus_jmp, 1);
  const char msg[] = "agfsx: SIGBUS outside a mapping access\n";
  ssize_t w = write(2, msg, sizeof(msg) - 1);
  (void)w;
  _exit(3);
}

[[noreturn]] void Usage(const char* why) {
  if (why) std::fprintf(stderr, "agfsx: %s\n", why);
  std::fprintf(stderr,
               "usage: agfsx --file PATH [--ops N] [--seed S] [--maxlen L] [--maxsize M]\n"
               "             [--threads K] [--no-mmap] [--no-direct] [--no-fallocate] [--no-otrunc]\n"
               "             [--progress N] [--verbose] [--inject-corruption N]\n"
               "             [--save-model DIR]\n"
               "  sizes accept k/m/g suffixes; with --threads K the files are PATH.0..PATH.K-1\n"
               "  and worker i uses seed S+i, running N ops each.\n");
  std::exit(2);
}

uint64_t ParseNum(const char* s, const char* flag) {
  char* end = nullptr;
  errno = 0;
  unsigned long long v = std::strtoull(s, &end, 0);
  if (errno || end == s) Usage((std::string("bad number for ") + flag).c_str());
  switch (*end) {
    case 'k': case 'K': v <<= 10; end++; break;
    case 'm': case 'M': v <<= 20; end++; break;
    case 'g': case 'G': v <<= 30; end++; break;
    default: break;
  }
  if (*end) Usage((std::string("bad number for ") + flag).c_str());
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; i++) {
    std::string a = argv[i];
    auto val = [&]() -> const char* {
      if (i + 1 >= argc) Usage((a + " needs a value").c_str());
      return argv[++i];
    };
    if (a == "--ops" || a == "-N") o.ops = ParseNum(val(), "--ops");
    else if (a == "--seed" || a == "-S") o.seed = ParseNum(val(), "--seed"), o.seed_given = true;
    else if (a == "--maxlen" || a == "-l") o.maxlen = ParseNum(val(), "--maxlen");
    else if (a == "--maxsize") o.maxsize = ParseNum(val(), "--maxsize");
    else if (a == "--file" || a == "-f") o.file = val();
    else if (a == "--threads" || a == "-K") o.threads = static_cast<int>(ParseNum(val(), "--threads"));
    else if (a == "--progress") o.progress = ParseNum(val(), "--progress");
    else if (a == "--inject-corruption") o.inject = ParseNum(val(), "--inject-corruption");
    else if (a == "--save-model") o.save_model = val();
    else if (a == "--no-mmap") o.use_mmap = false;
    else if (a == "--no-direct") o.use_direct = false;
    else if (a == "--no-fallocate") o.use_falloc = false;
    else if (a == "--no-otrunc") o.use_otrunc = false;
    else if (a == "--verbose" || a == "-v") o.verbose = true;
    else if (a == "--help" || a == "-h") Usage(nullptr);
    else Usage(("unknown argument " + a).c_str());
  }
  if (o.file.empty()) Usage("--file is required");
  if (o.maxlen == 0 || o.maxsize < 2 * kDirectAlign || o.threads < 1 || o.threads > 256)
    Usage("bad --maxlen/--maxsize/--threads");
  if (!o.seed_given) {
    o.seed = static_cast<uint64_t>(
                 std::chrono::steady_clock::now().time_since_epoch().count()) ^
             static_cast<uint64_t>(getpid());
    o.seed %= 1000000007ull;
  }

  struct sigaction sa;
  std::memset(&sa, 0, sizeof(sa));
  sa.sa_handler = OnSigbus;
  sigaction(SIGBUS, &sa, nullptr);

  std::printf("agfsx: seed %" PRIu64 ", %d file(s) x %" PRIu64 " ops, maxlen %" PRIu64
              ", maxsize %" PRIu64 "%s%s%s%s\n",
              o.seed, o.threads, o.ops, o.maxlen, o.maxsize, o.use_mmap ? "" : ", no mmap",
              o.use_direct ? "" : ", no O_DIRECT", o.use_falloc ? "" : ", no fallocate",
              o.use_otrunc ? "" : ", no O_TRUNC reopen");
  std::fflush(stdout);
  auto t0 = std::chrono::steady_clock::now();

  std::vector<char> ok(o.threads, 0);
  std::vector<std::unique_ptr<Worker>> workers;
  for (int i = 0; i < o.threads; i++) {
    std::string path = o.threads == 1 ? o.file : o.file + "." + std::to_string(i);
    workers.push_back(std::make_unique<Worker>(o, path, o.seed + i, i));
  }
  if (o.threads == 1) {
    ok[0] = workers[0]->Run();
  } else {
    std::vector<std::thread> ts;
    for (int i = 0; i < o.threads; i++) ts.emplace_back([&, i] { ok[i] = workers[i]->Run(); });
    for (auto& t : ts) t.join();
  }
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  bool all = std::all_of(ok.begin(), ok.end(), [](char b) { return b != 0; });
  if (!all || g_failed.load()) {
    std::fprintf(stderr, "agfsx: FAILED after %" PRIu64 " verified ops (%.1fs)\n",
                 g_verified.load(), secs);
    return 1;
  }
  std::printf("agfsx: all files verified in %.1fs\n", secs);
  std::printf("agfsx: %" PRIu64 " ops verified\n", g_verified.load());
  return 0;
}
