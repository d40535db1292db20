#include "fs/inode.h"

#include <dirent.h>

#include <cstring>

namespace agorafs {

void InitInodeCore(InodeBlock* ino, uint32_t mode, uint32_t uid, uint32_t gid,
                   uint64_t generation, Timespec64 now) {
  std::memset(reinterpret_cast<uint8_t*>(ino) + sizeof(BlockHeader), 0,
              kBlockSize - sizeof(BlockHeader));
  ino->generation = generation;
  ino->mode = mode;
  ino->uid = uid;
  ino->gid = gid;
  ino->nlink = S_ISDIR(mode) ? 2 : 1;
  ino->atime = ino->mtime = ino->ctime = ino->btime = now;
}

uint8_t DirentType(uint32_t mode) {
  switch (mode & S_IFMT) {
    case S_IFREG: return DT_REG;
    case S_IFDIR: return DT_DIR;
    case S_IFLNK: return DT_LNK;
    case S_IFCHR: return DT_CHR;
    case S_IFBLK: return DT_BLK;
    case S_IFIFO: return DT_FIFO;
    case S_IFSOCK: return DT_SOCK;
  }
  return DT_UNKNOWN;
}

}  // namespace agorafs
