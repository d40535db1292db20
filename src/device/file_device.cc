// FileDevice: BlockDevice over a regular file or a block device (see block_device.h).
//
// Opened with O_DIRECT when asked; if the filesystem refuses O_DIRECT (EINVAL, e.g.
// tmpfs) the open is retried buffered. Size is fixed at open. Read/Write loop over
// pread/pwrite until every byte moved, retrying EINTR; Flush is fdatasync.
#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>

#include "device/block_device.h"

namespace agorafs {
namespace {

std::string ErrnoText(int err) { return std::strerror(err); }

Status OpenError(const std::string& what, const std::string& path, int err) {
  std::string msg = what + " " + path + ": " + ErrnoText(err);
  switch (err) {
    case ENOENT: return Err(Code::kNotFound, msg);
    case EACCES:
    case EPERM: return Err(Code::kPermission, msg);
    case EISDIR: return Err(Code::kInvalid, msg);
    default: return Err(Code::kIOError, msg);
  }
}

class FileDevice final : public BlockDevice {
 public:
  FileDevice(int fd, std::string path, uint64_t size, bool read_only)
      : fd_(fd), path_(std::move(path)), size_(size), read_only_(read_only) {}
  ~FileDevice() override { ::close(fd_); }
  FileDevice(const FileDevice&) = delete;
  FileDevice& operator=(const FileDevice&) = delete;

  Status Read(uint64_t offset, void* buf, size_t len) override {
    AGFS_RETURN_IF_ERROR(CheckIo(offset, buf, len, size_));
    auto* p = static_cast<uint8_t*>(buf);
    size_t done = 0;
    while (done < len) {
      ssize_t n = ::pread(fd_, p + done, len - done, static_cast<off_t>(offset + done));
      if (n < 0) {
        if (errno == EINTR) continue;
        return IoErr("read", offset + done, len - done, ErrnoText(errno));
      }
      if (n == 0) return IoErr("read", offset + done, len - done, "short read (end of file)");
      done += static_cast<size_t>(n);
    }
    return Status::Ok();
  }

  Status Write(uint64_t offset, const void* buf, size_t len) override {
    AGFS_RETURN_IF_ERROR(CheckIo(offset, buf, len, size_));
    if (read_only_) return Err(Code::kReadOnly, path_ + ": device opened read-only");
    const auto* p = static_cast<const uint8_t*>(buf);
    size_t done = 0;
    while (done < len) {
      ssize_t n = ::pwrite(fd_, p + done, len - done, static_cast<off_t>(offset + done));
      if (n < 0) {
        if (errno == EINTR) continue;
        return IoErr("write", offset + done, len - done, ErrnoText(errno));
      }
      if (n == 0) return IoErr("write", offset + done, len - done, "short write");
      done += static_cast<size_t>(n);
    }
    return Status::Ok();
  }

  Status Flush() override {
    while (::fdatasync(fd_) != 0) {
      if (errno == EINTR) continue;
      return Err(Code::kIOError, "fdatasync " + path_ + ": " + ErrnoText(errno));
    }
    return Status::Ok();
  }

  uint64_t Size() const override { return size_; }
  std::string Name() const override { return path_; }

 private:
  Status IoErr(const char* op, uint64_t off, size_t len, const std::string& why) const {
    return Err(Code::kIOError, std::string(op) + " " + path_ + " at offset " +
                                   std::to_string(off) + " (" + std::to_string(len) +
                                   " bytes): " + why);
  }

  const int fd_;
  const std::string path_;
  const uint64_t size_;
  const bool read_only_;
};

int OpenRetryingEintr(const char* path, int flags, mode_t mode) {
  int fd;
  do {
    fd = ::open(path, flags, mode);
  } while (fd < 0 && errno == EINTR);
  return fd;
}

}  // namespace

Result<std::unique_ptr<BlockDevice>> OpenFileDevice(const std::string& path,
                                                    const OpenOptions& opts) {
  if (path.empty() || path == "-") return Err(Code::kInvalid, "bad device path '" + path + "'");
  if (opts.read_only && opts.create) {
    return Err(Code::kInvalid, path + ": cannot create a device opened read-only");
  }
  int flags = (opts.read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC;
  if (opts.create) flags |= O_CREAT;
  int fd = -1;
  if (opts.direct) {
    fd = OpenRetryingEintr(path.c_str(), flags | O_DIRECT, 0600);
    if (fd < 0 && errno != EINVAL) return OpenError("open", path, errno);
  }
  if (fd < 0) {  // not asked for O_DIRECT, or the filesystem refused it
    fd = OpenRetryingEintr(path.c_str(), flags, 0600);
    if (fd < 0) return OpenError("open", path, errno);
  }

  struct stat st;
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    return OpenError("stat", path, err);
  }
  uint64_t size = 0;
  if (S_ISBLK(st.st_mode)) {
    if (::ioctl(fd, BLKGETSIZE64, &size) != 0) {
      int err = errno;
      ::close(fd);
      return OpenError("ioctl BLKGETSIZE64", path, err);
    }
  } else if (S_ISREG(st.st_mode)) {
    size = static_cast<uint64_t>(st.st_size);
    if (opts.create && size < opts.create_size) {
      if (::ftruncate(fd, static_cast<off_t>(opts.create_size)) != 0) {
        int err = errno;
        ::close(fd);
        return OpenError("ftruncate", path, err);
      }
      size = opts.create_size;
    }
  } else {
    ::close(fd);
    return Err(Code::kInvalid, path + ": neither a regular file nor a block device");
  }
  return std::unique_ptr<BlockDevice>(
      std::make_unique<FileDevice>(fd, path, size, opts.read_only));
}

}  // namespace agorafs
