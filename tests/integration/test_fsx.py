"""agfsx (tests/fsx/agfsx.cc) against a real agorafs mount, then fsck.

agfsx keeps an exact in-memory model of each file and checks every read (buffered,
mmap, O_DIRECT) and every size against it while running random writes, truncates,
fallocate modes, mmap writes, fsync and close/reopen. The binary comes from AGORAFS_FSX
(set by CTest). After the run the filesystem is unmounted and must fsck clean, then it is
mounted again and every file must hold exactly what agfsx's model says (--save-model),
so the data came from the disk, not the page cache. AGORAFS_FSX_SEED fixes the seed, AGORAFS_FSX_OPS the ops per file,
AGORAFS_FSX_ARGS adds agfsx flags (e.g. "--no-otrunc" to skip open(O_TRUNC) reopens).
"""
import os
import random
import subprocess
import sys
import time
import unittest

import agfs
from agfs import MountedTest

FSX = os.environ.get("AGORAFS_FSX",
                     os.path.join(os.path.dirname(agfs.BIN), "tests", "fsx", "agfsx"))


def fsx_seed():
    return int(os.environ.get("AGORAFS_FSX_SEED", random.randrange(1, 1 << 31)))


class FsxTest(MountedTest):
    size = "1G"

    def setUp(self):
        if not os.path.exists(FSX):
            self.fail(f"agfsx not found at {FSX} (set AGORAFS_FSX)")
        super().setUp()

    def run_fsx(self, *args, expect_ops, timeout=600):
        self.models = os.path.join(self.s.dir, "models")
        os.makedirs(self.models, exist_ok=True)
        cmd = [FSX, *map(str, args), "--save-model", self.models,
               *os.environ.get("AGORAFS_FSX_ARGS", "").split()]
        sys.stderr.write(f"\n  running: {' '.join(cmd)}\n")
        t0 = time.time()
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        took = time.time() - t0
        out = p.stdout + p.stderr
        sys.stderr.write("".join(f"  | {line}\n" for line in p.stdout.splitlines()[-6:]))
        sys.stderr.write(f"  agfsx took {took:.1f}s\n")
        self.assertEqual(p.returncode, 0, f"agfsx failed (exit {p.returncode}):\n{out[-20000:]}")
        self.assertIn(f"agfsx: {expect_ops} ops verified", p.stdout.splitlines()[-1], out[-5000:])

    def assertCleanAndPersisted(self):
        """Unmount, fsck, mount again: every file matches its saved model."""
        self.assertClean()
        mnt = self.s.mount()
        names = sorted(f[:-len(".model")] for f in os.listdir(self.models))
        self.assertTrue(names)
        for name in names:
            with open(os.path.join(self.models, name + ".model"), "rb") as f:
                want = f.read()
            with open(os.path.join(mnt, name), "rb") as f:
                got = f.read()
            if got != want:
                i = next((k for k in range(min(len(got), len(want))) if got[k] != want[k]),
                         min(len(got), len(want)))
                self.fail(f"{name} after unmount and mount: size {len(got)} (want {len(want)}), "
                          f"first difference at offset {i}: got {got[i:i + 16].hex()} "
                          f"want {want[i:i + 16].hex()}")
        self.s.unmount(mnt)

    def test_fsx_two_files_100k_ops(self):
        """2 files x 50,000 ops in parallel threads; maxlen 256 KiB (plus 1 MiB writes)."""
        ops = int(os.environ.get("AGORAFS_FSX_OPS", "50000"))
        self.run_fsx("--file", self.p("fsx"), "--threads", 2, "--ops", ops,
                     "--seed", fsx_seed(), "--maxlen", "256k", "--maxsize", "8m",
                     "--progress", 10000, expect_ops=2 * ops)
        self.assertCleanAndPersisted()

    def test_fsx_small_files_inline_boundary(self):
        """Files that stay around the 3328-byte inline-data limit and the first blocks."""
        ops = int(os.environ.get("AGORAFS_FSX_SMALL_OPS", "10000"))
        self.run_fsx("--file", self.p("small"), "--ops", ops, "--seed", fsx_seed(),
                     "--maxlen", "5000", "--maxsize", "24k", expect_ops=ops)
        self.assertCleanAndPersisted()


if __name__ == "__main__":
    unittest.main()
