"""Helpers for agorafs integration tests: real images, real mounts, real processes.

Every test gets a scratch directory under AGORAFS_TEST_DIR (default: the build
tree's test-scratch), an image file, and mounts through the real `agorafs` binary
(AGORAFS_BIN). Mounts are always torn down, even when a test fails.
"""
import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import tempfile
import time
import unittest

BIN = os.environ.get("AGORAFS_BIN", os.path.join(os.path.dirname(__file__), "../../build/agorafs"))
SCRATCH = os.environ.get("AGORAFS_TEST_DIR", os.path.join(os.path.dirname(BIN), "test-scratch"))

libc = ctypes.CDLL(None, use_errno=True)


def run(*args, check=True, timeout=120, **kw):
    """Runs the agorafs binary; returns CompletedProcess with text output."""
    p = subprocess.run([BIN, *args], capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"agorafs {' '.join(args)} exited {p.returncode}: {p.stderr}{p.stdout}")
    return p


def is_mounted(path):
    path = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == path for line in f)


def wait_unmounted(path, timeout=30):
    deadline = time.time() + timeout
    while is_mounted(path):
        if time.time() > deadline:
            raise AssertionError(f"{path} still mounted after {timeout}s")
        time.sleep(0.05)


def daemon_pids(image):
    """PIDs of agorafs daemons with `image` (or a mount point) among their arguments."""
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if len(argv) > 2 and argv[0].endswith(b"agorafs") and b"mount" in argv and \
                os.fsencode(image) in argv:
            pids.append(int(pid))
    return pids


def umount(path):
    if is_mounted(path):
        subprocess.run(["umount", path], capture_output=True)
        if is_mounted(path):
            subprocess.run(["umount", "-l", path], capture_output=True)
    wait_unmounted(path)


class ForegroundDaemon:
    """A daemon started with `mount -f` whose output goes to a log file, not a pipe:
    a pipe nobody drains fills up and blocks the daemon at its next log line. Offers
    the parts of subprocess.Popen the tests use; communicate() and stderr.read()
    return the whole log."""

    def __init__(self, argv, log_path):
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        self.stderr = self

    def read(self):
        with open(self.log_path, "rb") as f:
            return f.read()

    @property
    def returncode(self):
        return self.proc.returncode

    def poll(self):
        return self.proc.poll()

    def wait(self, timeout=None):
        return self.proc.wait(timeout=timeout)

    def terminate(self):
        self.proc.terminate()

    def communicate(self, timeout=None):
        self.proc.wait(timeout=timeout)
        return self.read(), b""


class Scratch:
    """A scratch directory with an image file and mount points."""

    def __init__(self, size="512M", nodes=4, profile="fast", mkfs=True, extra=()):
        os.makedirs(SCRATCH, exist_ok=True)
        self.dir = tempfile.mkdtemp(dir=SCRATCH)
        os.chmod(self.dir, 0o755)  # tests run steps as other users below it
        self.image = os.path.join(self.dir, "disk.img")
        self.mounts = []
        if mkfs:
            run("mkfs", "--size", size, "--nodes", str(nodes), "--profile", profile, *extra,
                self.image)

    def mount(self, name="mnt", opts="", foreground=False):
        mp = os.path.join(self.dir, name)
        os.makedirs(mp, exist_ok=True)
        args = ["mount"]
        if opts:
            args += ["-o", opts]
        args += [self.image, mp]
        if foreground:
            proc = ForegroundDaemon([BIN, "mount", "-f", *args[1:]],
                                    os.path.join(self.dir, f"{name}.log"))
            deadline = time.time() + 30
            while not is_mounted(mp):
                if proc.poll() is not None or time.time() > deadline:
                    raise AssertionError(f"foreground mount failed: {proc.stderr.read().decode()}")
                time.sleep(0.05)
            self.mounts.append(mp)
            return mp, proc
        run(*args)
        assert is_mounted(mp), f"{mp} not mounted after agorafs mount returned"
        self.mounts.append(mp)
        return mp

    def unmount(self, mp):
        pids = daemon_pids(self.image)
        umount(mp)
        # The daemon syncs and releases its slot after the kernel lets go.
        deadline = time.time() + 30
        while any(os.path.exists(f"/proc/{p}") for p in pids) and time.time() < deadline:
            time.sleep(0.05)
        if mp in self.mounts:
            self.mounts.remove(mp)

    def kill9(self):
        """Kills every daemon on this image with SIGKILL (a node crash)."""
        for pid in daemon_pids(self.image):
            os.kill(pid, signal.SIGKILL)
        for mp in list(self.mounts):
            subprocess.run(["umount", "-l", mp], capture_output=True)
            self.mounts.remove(mp)
        deadline = time.time() + 10
        while daemon_pids(self.image) and time.time() < deadline:
            time.sleep(0.05)

    def fsck(self, repair=False):
        args = ["fsck"] + (["--repair"] if repair else []) + [self.image]
        return run(*args, check=False, timeout=600)

    def cleanup(self):
        for mp in list(self.mounts):
            with contextlib.suppress(Exception):
                umount(mp)
        self.kill9()
        shutil.rmtree(self.dir, ignore_errors=True)


class MountedTest(unittest.TestCase):
    """A test case with one fresh filesystem mounted at self.mnt."""
    size = "512M"
    mount_opts = "allow_other"

    def setUp(self):
        self.s = Scratch(size=self.size)
        self.addCleanup(self.s.cleanup)
        self.mnt = self.s.mount(opts=self.mount_opts)

    def p(self, *parts):
        return os.path.join(self.mnt, *parts)

    def assertClean(self):
        self.s.unmount(self.mnt)
        r = self.s.fsck()
        self.assertEqual(r.returncode, 0, f"fsck not clean:\n{r.stdout}{r.stderr}")


def as_user(uid, gid, fn, *args):
    """Runs fn(*args) in a child process with the given uid/gid; returns its result or
    raises the OSError it raised (errno preserved)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        code = 0
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            res = fn(*args)
            os.write(w, b"ok:" + repr(res).encode())
        except OSError as e:
            os.write(w, b"err:" + str(e.errno).encode())
        except BaseException as e:  # noqa: BLE001
            os.write(w, b"exc:" + repr(e).encode())
            code = 1
        os._exit(code)
    os.close(w)
    data = b""
    while True:
        chunk = os.read(r, 65536)
        if not chunk:
            break
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    kind, _, payload = data.partition(b":")
    if kind == b"ok":
        import ast
        return ast.literal_eval(payload.decode())
    if kind == b"err":
        err = int(payload)
        raise OSError(err, os.strerror(err))
    raise AssertionError(f"child failed: {data!r}")


def renameat2(old, new, flags):
    AT_FDCWD = -100
    rc = libc.syscall(316, AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


def fallocate(fd, mode, off, length):
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    rc = libc.fallocate(fd, mode, off, length)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2
FALLOC_FL_ZERO_RANGE = 0x10


def utimensat(path, atime, mtime):
    """atime/mtime: (sec, nsec) or 'now' or 'omit'."""
    class Timespec(ctypes.Structure):
        _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]
    UTIME_NOW = (1 << 30) - 1
    UTIME_OMIT = (1 << 30) - 2

    def ts(v):
        if v == "now":
            return Timespec(0, UTIME_NOW)
        if v == "omit":
            return Timespec(0, UTIME_OMIT)
        return Timespec(v[0], v[1])
    arr = (Timespec * 2)(ts(atime), ts(mtime))
    rc = libc.utimensat(-100, os.fsencode(path), arr, 0)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
