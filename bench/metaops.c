// metaops: the metadata micro-benchmark behind bench/single-node.
//
//   metaops create DIR N   create N empty files DIR/f0000000.. (open O_CREAT|O_EXCL + close)
//   metaops stat   DIR N   fstatat each of them
//   metaops unlink DIR N   unlink each of them
//   metaops sync   DIR     only the durability point below
//
// create and unlink end with syncfs(DIR) + fsync(DIR), and that time is counted: on
// ext4 it commits the journal; on a FUSE mount syncfs does not reach the daemon but
// fsync(DIR) does (agorafs commits its journal on fsyncdir).
//
// Prints one line: "ops=N seconds=S ops_per_s=R". Exit status 1 on any failed call.
// Plain C so that per-operation overhead is a syscall, not an interpreter.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int durable(int dfd) {
  if (syncfs(dfd) != 0) {
    perror("metaops: syncfs");
    return -1;
  }
  if (fsync(dfd) != 0) {
    perror("metaops: fsync(dir)");
    return -1;
  }
  return 0;
}

int main(int argc, char** argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: metaops create|stat|unlink DIR N | metaops sync DIR\n");
    return 2;
  }
  const char* op = argv[1];
  long n = argc > 3 ? strtol(argv[3], NULL, 10) : 0;
  int dfd = open(argv[2], O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0) {
    fprintf(stderr, "metaops: open %s: %s\n", argv[2], strerror(errno));
    return 1;
  }
  char name[32];
  struct stat st;
  double t0 = now();
  if (strcmp(op, "create") == 0) {
    for (long i = 0; i < n; i++) {
      snprintf(name, sizeof(name), "f%07ld", i);
      int fd = openat(dfd, name, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0644);
      if (fd < 0 || close(fd) != 0) {
        fprintf(stderr, "metaops: create %s: %s\n", name, strerror(errno));
        return 1;
      }
    }
    if (durable(dfd) != 0) return 1;
  } else if (strcmp(op, "stat") == 0) {
    for (long i = 0; i < n; i++) {
      snprintf(name, sizeof(name), "f%07ld", i);
      if (fstatat(dfd, name, &st, AT_SYMLINK_NOFOLLOW) != 0) {
        fprintf(stderr, "metaops: stat %s: %s\n", name, strerror(errno));
        return 1;
      }
    }
  } else if (strcmp(op, "unlink") == 0) {
    for (long i = 0; i < n; i++) {
      snprintf(name, sizeof(name), "f%07ld", i);
      if (unlinkat(dfd, name, 0) != 0) {
        fprintf(stderr, "metaops: unlink %s: %s\n", name, strerror(errno));
        return 1;
      }
    }
    if (durable(dfd) != 0) return 1;
  } else if (strcmp(op, "sync") == 0) {
    if (durable(dfd) != 0) return 1;
  } else {
    fprintf(stderr, "metaops: unknown operation %s\n", op);
    return 2;
  }
  double s = now() - t0;
  printf("ops=%ld seconds=%.6f ops_per_s=%.1f\n", n, s, s > 0 ? (double)n / s : 0.0);
  close(dfd);
  return 0;
}
