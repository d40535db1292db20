"""Metadata-heavy workload for crash tests, and the checker for what it promised.

    python3 crash_workload.py run --root MNT/w --manifest FILE --seed S [--max-bytes N]

runs until it is killed or the filesystem goes away (ENOTCONN/EIO after the daemon is
killed): creates files of every size class (empty, inline, a few blocks, up to 8 MiB in
random-sized writes), overwrites, appends, truncates and punched holes, renames files (in
place, across directories, over existing files), renames directories, unlinks,
mkdir/rmdir, hard links, symlinks, files unlinked while held open (orphans at the crash),
and fsyncs a random subset. It works on whatever tree earlier runs left under ROOT.

The manifest (outside the mount, O_APPEND, fsync after every record) holds one JSON
object per line:

  {"op": "sync", "path": P, "ino": I, "size": N, "sha": H}   regular file P holds exactly
        this content; written only after fsync(file) and fsync of every directory from
        P's parent up to ROOT returned
  {"op": "dir", "path": P} / {"op": "symlink", "path": P, "target": T}   likewise, after
        the parent directories were fsynced
  {"op": "inval", "paths": [...], "inos": [...], "why": W, "phase": "begin"|"done"}
        an operation that may change the content or the name of what those paths (and
        everything below them) or inodes (every hard link) hold. Written BEFORE the
        operation starts (so a crash in the middle of it cannot make the checker expect
        the old state) and again after it returned.

verify() replays the manifest: every sync/dir/symlink record not invalidated by a later
record must be found intact on the remounted filesystem.

Every path operation goes through a directory fd opened on ROOT at start (the *at()
calls), so once the daemon is killed and the mount is detached the workload gets errors
instead of writing into the directory underneath.
"""
import argparse
import ctypes
import errno
import hashlib
import json
import os
import random
import stat
import sys

MiB = 1 << 20
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def punch_hole(fd, off, length):
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


# The filesystem went away (daemon killed): stop quietly. (An EIO while the daemon is
# still alive makes the workload exit before the kill, which the test reports.)
GONE_ERRNOS = {errno.ENOTCONN, errno.EIO, errno.ECONNABORTED, errno.ENODEV, errno.ESHUTDOWN}


class Manifest:
    def __init__(self, path):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.blobs = os.path.join(os.path.dirname(os.path.abspath(path)), "blobs")
        os.makedirs(self.blobs, exist_ok=True)

    def record(self, **rec):
        line = (json.dumps(rec, sort_keys=True) + "\n").encode()
        n = os.write(self.fd, line)  # one write: appends are not interleaved or torn
        assert n == len(line)
        os.fsync(self.fd)

    def blob(self, data, sha):
        """Keeps small synced contents so that a failure can show the first bad offset."""
        if len(data) > MiB:
            return
        p = os.path.join(self.blobs, sha)
        if not os.path.exists(p):
            with open(p + ".tmp", "wb") as f:
                f.write(data)
            os.rename(p + ".tmp", p)


def sha(data):
    return hashlib.sha256(data).hexdigest()


class Workload:
    def __init__(self, root, manifest, seed, max_bytes):
        self.rng = random.Random(seed)
        self.seed = seed
        self.rootfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        self.m = Manifest(manifest)
        self.max_bytes = max_bytes
        self.dirs = {""}
        self.files = {}      # rel path -> size (regular files)
        self.known = {}      # rel path -> (sha, data-or-None) when this run knows the content
        self.inos = {}       # rel path -> inode number (regular files; hard links share one)
        self.symlinks = set()
        self.held = []       # fds of unlinked files kept open: orphans when the node dies
        self.ops = 0
        self.synced = 0
        self.scan()

    # ---- helpers ----------------------------------------------------------------

    def scan(self):
        for dirpath, dirnames, filenames, dfd in os.fwalk(".", dir_fd=self.rootfd):
            rel = os.path.normpath(dirpath)
            rel = "" if rel == "." else rel
            for d in dirnames:
                self.dirs.add(os.path.join(rel, d))
            for f in filenames:
                st = os.stat(f, dir_fd=dfd, follow_symlinks=False)
                p = os.path.join(rel, f)
                if stat.S_ISREG(st.st_mode):
                    self.files[p] = st.st_size
                    self.inos[p] = st.st_ino
                elif stat.S_ISLNK(st.st_mode):
                    self.symlinks.add(p)

    def total_bytes(self):
        return sum(self.files.values())

    def name(self, prefix):
        return f"{prefix}{self.rng.getrandbits(32):08x}"

    def pick_dir(self, max_depth=3):
        cands = [d for d in self.dirs if d.count("/") < max_depth]
        return self.rng.choice(sorted(cands))

    def new_path(self, prefix):
        d = self.pick_dir()
        return os.path.join(d, self.name(prefix))

    def ancestors(self, rel):
        """Directories from rel's parent up to ROOT ('' is ROOT)."""
        out = []
        d = os.path.dirname(rel)
        while True:
            out.append(d)
            if d == "":
                return out
            d = os.path.dirname(d)

    def fsync_dirs(self, *rels):
        seen = set()
        for rel in rels:
            for d in self.ancestors(rel):
                if d in seen:
                    continue
                seen.add(d)
                if d == "":
                    os.fsync(self.rootfd)
                else:
                    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY, dir_fd=self.rootfd)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)

    def inval(self, phase, why, paths, inos=()):
        self.m.record(op="inval", phase=phase, why=why, paths=list(paths), inos=list(inos))

    def ino_of(self, rel):
        try:
            return os.stat(rel, dir_fd=self.rootfd, follow_symlinks=False).st_ino
        except FileNotFoundError:
            return None

    def size_class(self):
        c = self.rng.random()
        if c < 0.08:
            return 0
        if c < 0.35:
            return self.rng.randint(1, 3328)          # inline in the inode
        if c < 0.60:
            return self.rng.randint(3329, 64 * 1024)  # a few blocks
        if c < 0.90:
            return self.rng.randint(64 * 1024, 1 * MiB)
        return self.rng.randint(1 * MiB, 4 * MiB)

    def write_chunks(self, fd, data, base=0):
        off = 0
        while off < len(data):
            n = min(len(data) - off, self.rng.choice([1, 100, 4096, 65536, 300000, MiB]))
            n = min(n, len(data) - off)
            w = os.pwrite(fd, data[off:off + n], base + off)
            off += w

    def sync_file(self, rel, fd, data):
        """fsync file and its directories, then record what it must hold."""
        ino = os.fstat(fd).st_ino
        if self.rng.random() < 0.2:
            os.fdatasync(fd)
        os.fsync(fd)
        self.fsync_dirs(rel)
        h = sha(data)
        self.m.blob(data, h)
        self.m.record(op="sync", path=rel, ino=ino, size=len(data), sha=h)
        self.synced += 1

    # ---- operations -------------------------------------------------------------

    def op_create(self, big=False):
        rel = self.new_path("f")
        size = self.rng.randint(4 * MiB, 8 * MiB) if big else self.size_class()
        data = self.rng.randbytes(size)
        fd = os.open(rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=self.rootfd)
        try:
            self.files[rel] = 0
            self.inos[rel] = os.fstat(fd).st_ino
            self.write_chunks(fd, data)
            self.files[rel] = size
            self.known[rel] = (sha(data), data if size <= 8 * MiB else None)
            if self.rng.random() < 0.45:
                self.sync_file(rel, fd, data)
        finally:
            os.close(fd)

    def op_create_big(self):
        self.op_create(big=True)

    def read_all(self, rel):
        fd = os.open(rel, os.O_RDONLY, dir_fd=self.rootfd)
        try:
            chunks = []
            while True:
                b = os.read(fd, MiB)
                if not b:
                    break
                chunks.append(b)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def op_modify(self):
        if not self.files:
            return self.op_create()
        rel = self.rng.choice(sorted(self.files))
        if self.files[rel] > 8 * MiB:
            return
        k = self.known.get(rel)
        data = bytearray(k[1]) if k and k[1] is not None else bytearray(self.read_all(rel))
        ino = self.ino_of(rel)
        self.inval("begin", "modify", [rel], [ino] if ino else [])
        # Every other name of this inode now holds content this run did not track.
        for p in [p for p in self.known if p != rel and self.inos.get(p) == ino]:
            del self.known[p]
        fd = os.open(rel, os.O_WRONLY, dir_fd=self.rootfd)
        try:
            kind = self.rng.choice(["overwrite", "append", "truncate_down", "truncate_up",
                                    "punch"])
            if kind == "overwrite" and data:
                off = self.rng.randrange(len(data))
                n = self.rng.randint(1, min(300000, max(1, len(data) - off) + 5000))
                patch = self.rng.randbytes(n)
                os.pwrite(fd, patch, off)
                if off + n > len(data):
                    data.extend(b"\0" * (off + n - len(data)))
                data[off:off + n] = patch
            elif kind == "append" or (kind == "overwrite" and not data):
                patch = self.rng.randbytes(self.rng.randint(1, 200000))
                self.write_chunks(fd, patch, len(data))
                data.extend(patch)
            elif kind == "truncate_down":
                ns = self.rng.randint(0, len(data))
                os.ftruncate(fd, ns)
                del data[ns:]
            elif kind == "truncate_up":
                ns = len(data) + self.rng.randint(1, 500000)
                os.ftruncate(fd, ns)
                data.extend(b"\0" * (ns - len(data)))
            else:  # punch a hole (keep size)
                if data:
                    off = self.rng.randrange(len(data))
                    n = self.rng.randint(1, 200000)
                    try:
                        punch_hole(fd, off, n)
                        end = min(off + n, len(data))
                        data[off:end] = b"\0" * (end - off)
                    except OSError as e:
                        if e.errno != errno.EOPNOTSUPP:
                            raise
            data = bytes(data)
            self.files[rel] = len(data)
            self.known[rel] = (sha(data), data)
            if self.rng.random() < 0.4:
                self.sync_file(rel, fd, data)
        finally:
            os.close(fd)
        self.inval("done", "modify", [rel], [ino] if ino else [])

    def op_fsync_existing(self):
        """fsync a file whose content this run knows, and promise it."""
        cands = sorted(p for p in self.known if p in self.files and self.known[p][1] is not None)
        if not cands:
            return self.op_create()
        rel = self.rng.choice(cands)
        fd = os.open(rel, os.O_RDONLY, dir_fd=self.rootfd)
        try:
            self.sync_file(rel, fd, self.known[rel][1])
        finally:
            os.close(fd)

    def op_rename_file(self):
        if not self.files:
            return self.op_create()
        src = self.rng.choice(sorted(self.files))
        if self.rng.random() < 0.3 and len(self.files) > 1:
            dst = self.rng.choice(sorted(p for p in self.files if p != src))  # replace
        elif self.rng.random() < 0.5:
            dst = os.path.join(os.path.dirname(src), self.name("r"))  # same directory
        else:
            dst = self.new_path("r")
        if self.inos.get(src) == self.inos.get(dst):
            return  # two names of one inode: rename() does nothing
        self.inval("begin", "rename", [src, dst])
        os.rename(src, dst, src_dir_fd=self.rootfd, dst_dir_fd=self.rootfd)
        self.inval("done", "rename", [src, dst])
        self.files[dst] = self.files.pop(src)
        self.inos[dst] = self.inos.pop(src)
        k = self.known.pop(src, None)
        self.known.pop(dst, None)
        if k:
            self.known[dst] = k
        if k and k[1] is not None and self.rng.random() < 0.5:
            fd = os.open(dst, os.O_RDONLY, dir_fd=self.rootfd)
            try:
                self.fsync_dirs(src)  # the old name is gone durably too
                self.sync_file(dst, fd, k[1])
            finally:
                os.close(fd)

    def op_unlink(self):
        pool = sorted(self.files) + sorted(self.symlinks)
        if not pool:
            return
        rel = self.rng.choice(pool)
        self.inval("begin", "unlink", [rel])
        os.unlink(rel, dir_fd=self.rootfd)
        self.inval("done", "unlink", [rel])
        self.files.pop(rel, None)
        self.known.pop(rel, None)
        self.inos.pop(rel, None)
        self.symlinks.discard(rel)
        if self.rng.random() < 0.3:
            self.fsync_dirs(rel)

    def op_orphan(self):
        """Unlinks a file while holding it open and keeps writing to it: at the crash it
        sits on the node's orphan list, which the next mount must free."""
        pool = sorted(self.files)
        if not pool or self.rng.random() < 0.3:
            rel = self.new_path("o")
            fd = os.open(rel, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=self.rootfd)
            os.write(fd, self.rng.randbytes(self.size_class()))
        else:
            rel = self.rng.choice(pool)
            fd = os.open(rel, os.O_RDWR, dir_fd=self.rootfd)
        self.held.append(fd)
        self.inval("begin", "orphan", [rel])
        os.unlink(rel, dir_fd=self.rootfd)
        self.inval("done", "orphan", [rel])
        self.files.pop(rel, None)
        self.known.pop(rel, None)
        ino = self.inos.pop(rel, None)
        if ino is not None and ino in self.inos.values():
            # Other names remain: writing through this fd would change their content.
            self.inval("begin", "orphan-write", [], [ino])
            for p in [p for p in self.known if self.inos.get(p) == ino]:
                del self.known[p]
        os.pwrite(fd, self.rng.randbytes(self.rng.randint(1, 300000)),
                  self.rng.randint(0, 1 << 20))
        if self.rng.random() < 0.3:
            os.fsync(fd)
        while len(self.held) > 16:
            os.close(self.held.pop(0))

    def op_mkdir(self):
        rel = self.new_path("d")
        os.mkdir(rel, 0o755, dir_fd=self.rootfd)
        self.dirs.add(rel)
        if self.rng.random() < 0.5:
            self.fsync_dirs(rel)
            self.m.record(op="dir", path=rel)

    def under(self, rel, d):
        return rel == d or rel.startswith(d + "/")

    def op_rmdir(self):
        cands = sorted(d for d in self.dirs if d and not any(
            self.under(x, d) and x != d for x in list(self.dirs) + list(self.files) +
            list(self.symlinks)))
        if not cands:
            return self.op_mkdir()
        rel = self.rng.choice(cands)
        self.inval("begin", "rmdir", [rel])
        os.rmdir(rel, dir_fd=self.rootfd)
        self.inval("done", "rmdir", [rel])
        self.dirs.discard(rel)

    def op_rename_dir(self):
        cands = sorted(d for d in self.dirs if d)
        if not cands:
            return self.op_mkdir()
        src = self.rng.choice(cands)
        targets = [d for d in self.dirs if not self.under(d, src) and d.count("/") < 2]
        parent = self.rng.choice(sorted(targets))
        dst = os.path.join(parent, self.name("D"))
        self.inval("begin", "rename-dir", [src, dst])
        os.rename(src, dst, src_dir_fd=self.rootfd, dst_dir_fd=self.rootfd)
        self.inval("done", "rename-dir", [src, dst])

        def move(p):
            return dst + p[len(src):] if self.under(p, src) else p
        self.dirs = {move(d) for d in self.dirs}
        self.files = {move(p): s for p, s in self.files.items()}
        self.known = {move(p): k for p, k in self.known.items()}
        self.inos = {move(p): i for p, i in self.inos.items()}
        self.symlinks = {move(p) for p in self.symlinks}
        if self.rng.random() < 0.3:
            self.fsync_dirs(src, os.path.join(dst, "x"))
            self.m.record(op="dir", path=dst)

    def op_link(self):
        if not self.files:
            return self.op_create()
        src = self.rng.choice(sorted(self.files))
        dst = self.new_path("h")
        os.link(src, dst, src_dir_fd=self.rootfd, dst_dir_fd=self.rootfd, follow_symlinks=False)
        self.files[dst] = self.files[src]
        self.inos[dst] = self.inos[src]
        k = self.known.get(src)
        if k:
            self.known[dst] = k
        if k and k[1] is not None and self.rng.random() < 0.5:
            fd = os.open(dst, os.O_RDONLY, dir_fd=self.rootfd)
            try:
                self.sync_file(dst, fd, k[1])
            finally:
                os.close(fd)

    def op_symlink(self):
        rel = self.new_path("s")
        n = self.rng.choice([1, 20, 200, 3000, 4000])
        target = "t" * self.rng.randint(1, n)
        if self.files and self.rng.random() < 0.5:
            target = os.path.relpath(self.rng.choice(sorted(self.files)),
                                     os.path.dirname(rel) or ".")
        os.symlink(target, rel, dir_fd=self.rootfd)
        self.symlinks.add(rel)
        if self.rng.random() < 0.5:
            self.fsync_dirs(rel)
            self.m.record(op="symlink", path=rel, target=target)

    # ---- main loop ----------------------------------------------------------------

    def step(self):
        over = self.total_bytes() > self.max_bytes
        ops = [
            (self.op_create, 0 if over else 24), (self.op_create_big, 0 if over else 2),
            (self.op_modify, 16), (self.op_fsync_existing, 5),
            (self.op_rename_file, 11), (self.op_unlink, 40 if over else 8),
            (self.op_mkdir, 6), (self.op_rmdir, 4), (self.op_rename_dir, 3),
            (self.op_link, 6), (self.op_symlink, 5), (self.op_orphan, 3),
        ]
        fns, ws = zip(*ops)
        fn = self.rng.choices(fns, weights=ws)[0]
        try:
            fn()
        except FileExistsError:
            pass  # a random name collided
        self.ops += 1

    def run(self, max_ops=None):
        while max_ops is None or self.ops < max_ops:
            self.step()


def main_run(args):
    w = None
    try:
        w = Workload(args.root, args.manifest, args.seed, args.max_bytes)
        print(f"crash_workload: ready: {len(w.files)} files, {len(w.dirs)} dirs, "
              f"{len(w.symlinks)} symlinks", flush=True)
        w.run(args.max_ops)
    except OSError as e:
        if e.errno in GONE_ERRNOS or (w is None and e.errno == errno.ENOENT):
            print(f"crash_workload: filesystem gone ({e}); ops {w.ops if w else 0}, "
                  f"synced {w.synced if w else 0}", flush=True)
            return 0
        raise
    print(f"crash_workload: done; ops {w.ops}, synced {w.synced}", flush=True)
    return 0


# ---- checking ---------------------------------------------------------------------


def load_manifest(path):
    recs = []
    with open(path, "rb") as f:
        for ln, line in enumerate(f.read().split(b"\n"), 1):
            if not line.strip():
                continue
            try:
                recs.append(json.loads(line))
            except ValueError:
                raise AssertionError(f"manifest line {ln} is torn: {line[:200]!r}")
    return recs


def expectations(recs):
    """What the filesystem must still hold: rel path -> record."""
    live = {}
    for r in recs:
        op = r["op"]
        if op in ("sync", "dir", "symlink"):
            live[r["path"]] = r
        elif op == "inval":
            paths = r["paths"]
            inos = set(r["inos"])
            for p in list(live):
                e = live[p]
                if any(p == q or p.startswith(q + "/") for q in paths) or \
                        (e["op"] == "sync" and e["ino"] in inos):
                    del live[p]
    return live


def first_diff(a, b):
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def verify(root, manifest):
    """Returns (checked count, list of problems)."""
    recs = load_manifest(manifest)
    live = expectations(recs)
    blobs = os.path.join(os.path.dirname(os.path.abspath(manifest)), "blobs")
    problems = []
    for rel, e in sorted(live.items()):
        p = os.path.join(root, rel)
        try:
            st = os.lstat(p)
        except OSError as ex:
            problems.append(f"{rel}: {e['op']} promised, but lstat fails: {ex}")
            continue
        if e["op"] == "dir":
            if not stat.S_ISDIR(st.st_mode):
                problems.append(f"{rel}: directory promised, found mode {st.st_mode:o}")
        elif e["op"] == "symlink":
            if not stat.S_ISLNK(st.st_mode):
                problems.append(f"{rel}: symlink promised, found mode {st.st_mode:o}")
            elif os.readlink(p) != e["target"]:
                problems.append(f"{rel}: symlink target {os.readlink(p)[:80]!r}, "
                                f"expected {e['target'][:80]!r} ({len(e['target'])} chars)")
        else:
            if not stat.S_ISREG(st.st_mode):
                problems.append(f"{rel}: file promised, found mode {st.st_mode:o}")
                continue
            with open(p, "rb") as f:
                data = f.read()
            if len(data) != e["size"] or sha(data) != e["sha"]:
                msg = (f"{rel}: content differs from what was fsynced: size {len(data)} "
                       f"(st_size {st.st_size}), expected {e['size']}; ino {st.st_ino}, "
                       f"synced ino {e['ino']}")
                bp = os.path.join(blobs, e["sha"])
                if os.path.exists(bp):
                    with open(bp, "rb") as f:
                        want = f.read()
                    i = first_diff(data, want)
                    msg += (f"; first difference at offset {i} (got {data[i:i+8].hex()} "
                            f"want {want[i:i+8].hex()})")
                problems.append(msg)
    return len(live), problems


def walk_all(root):
    """Reads every file and symlink under root (no I/O errors allowed); returns counts."""
    nfiles = ndirs = nbytes = 0
    for dirpath, dirnames, filenames in os.walk(root):
        ndirs += len(dirnames)
        for f in filenames:
            p = os.path.join(dirpath, f)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                with open(p, "rb") as fh:
                    nbytes += len(fh.read())
                nfiles += 1
    return nfiles, ndirs, nbytes


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--root", required=True)
    r.add_argument("--manifest", required=True)
    r.add_argument("--seed", type=int, required=True)
    r.add_argument("--max-bytes", type=int, default=120 * MiB)
    r.add_argument("--max-ops", type=int, default=None)
    v = sub.add_parser("verify")
    v.add_argument("--root", required=True)
    v.add_argument("--manifest", required=True)
    args = ap.parse_args()
    if args.cmd == "run":
        return main_run(args)
    n, problems = verify(args.root, args.manifest)
    for p in problems:
        print(p)
    print(f"checked {n} promises, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
