"""Corrupted images end to end: damage chosen metadata with `agorafs debug corrupt`,
mount, check that only the damaged objects fail (EIO, logged with their block), that
nothing is written over the damage, that fsck --repair converges, and that every
undamaged file survives."""
import errno
import json
import os
import stat
import subprocess
import time
import unittest

import agfs

BS = 4096
IMAGE = "96M"

# (metadata kind, seed, mode). Kinds with an owner object get three seeds; a long run
# (AGORAFS_CORRUPT_SEEDS=N) gives every kind seeds 1..N, odd ones flipping bits.
KINDS = ("inode", "dir", "extent", "xattr", "bitmap", "aghdr", "super", "journal", "orphan")
_LONG = int(os.environ.get("AGORAFS_CORRUPT_SEEDS", "0"))
# The fourth field is how many blocks one case damages.
if _LONG:
    CASES = [(k, s, "flip" if s % 2 else "zero", 1 + s % 3 if k in KINDS[:3] else 1)
             for k in KINDS for s in range(1, _LONG + 1)]
else:
    CASES = [(k, s, m, 1) for k in KINDS[:4] for s, m in ((1, "flip"), (2, "zero"), (3, "flip"))] + \
            [(k, s, m, 1) for k in KINDS[4:] for s, m in ((1, "flip"), (2, "zero"))] + \
            [("inode", 4, "flip", 3), ("dir", 4, "zero", 2), ("extent", 4, "flip", 2)]


# Kinds the mount itself reads, so the daemon log must name their block even though
# no path answers EIO for them.
LOGGED_AT_MOUNT = {"orphan"}


def populate(mp):
    """Builds the tree; returns {path: ("file", bytes) | ("link", target) | ("dir",)}
    and {path: {xattr: value}}, paths relative to the mount point."""
    want, xat = {}, {}

    def wfile(rel, data):
        with open(os.path.join(mp, rel), "wb") as f:
            f.write(data)
        want[rel] = ("file", data)

    def mkdir(rel):
        os.mkdir(os.path.join(mp, rel))
        want[rel] = ("dir",)

    mkdir("data")
    for i in range(6):
        wfile(f"data/f{i}", bytes([65 + i]) * (100 if i % 2 else 150000 + i))
    mkdir("bigdir")  # several leaf blocks
    for i in range(160):
        wfile(f"bigdir/entry-with-a-rather-long-name-{i:04d}", f"small {i}".encode())
    mkdir("sub")
    mkdir("sub/deep")
    wfile("sub/deep/file", os.urandom(20000))
    # A fragmented file: one extent per written block, more than the root holds.
    frag = bytearray(300 * 2 * BS)
    with open(os.path.join(mp, "frag"), "wb") as f:
        for i in range(300):
            f.seek(i * 2 * BS)
            f.write(b"z")
            frag[i * 2 * BS] = ord("z")
        f.truncate(len(frag))
    want["frag"] = ("file", bytes(frag))
    os.symlink("data/f0", os.path.join(mp, "link"))
    want["link"] = ("link", "data/f0")
    os.symlink("x" * 1000, os.path.join(mp, "longlink"))
    want["longlink"] = ("link", "x" * 1000)
    os.link(os.path.join(mp, "data/f1"), os.path.join(mp, "hardlink"))
    want["hardlink"] = want["data/f1"]
    wfile("xat", b"has xattrs")
    os.setxattr(os.path.join(mp, "xat"), "user.big", b"v" * 2000)
    os.setxattr(os.path.join(mp, "xat"), "user.small", b"s")
    xat["xat"] = {"user.big": b"v" * 2000, "user.small": b"s"}
    os.setxattr(os.path.join(mp, "data/f2"), "user.tag", b"two")
    xat["data/f2"] = {"user.tag": b"two"}
    return want, xat


def read_block(image, blk):
    with open(image, "rb") as f:
        f.seek(blk * BS)
        return f.read(BS)


class CorruptedImageTest(unittest.TestCase):
    template = None

    @classmethod
    def setUpClass(cls):
        cls.ts = agfs.Scratch(size=IMAGE, nodes=2)
        mp = cls.ts.mount()
        cls.want, cls.xat = populate(mp)
        cls.ts.unmount(mp)
        assert cls.ts.fsck().returncode == 0
        cls.inos = {}  # path -> inode number, from a second mount
        mp = cls.ts.mount()
        for rel in cls.want:
            cls.inos[rel] = os.lstat(os.path.join(mp, rel)).st_ino
        cls.ts.unmount(mp)
        cls.cases = 0
        cls.failures = 0
        cls.started = time.time()

    @classmethod
    def tearDownClass(cls):
        cls.ts.cleanup()
        print(f"\ncorrupted-image cases: {cls.cases}, failures: {cls.failures} "
              f"({time.time() - cls.started:.1f} s)")

    def test_cases(self):
        only = os.environ.get("AGORAFS_CORRUPT_ONLY")  # e.g. "inode" or "inode:2"
        for kind, seed, mode, count in CASES:
            if only and only not in (kind, f"{kind}:{seed}"):
                continue
            with self.subTest(kind=kind, seed=seed, mode=mode, count=count):
                type(self).cases += 1
                try:
                    self.one_case(kind, seed, mode, count)
                except BaseException:
                    type(self).failures += 1
                    raise

    def affected(self, dmg):
        """Paths whose checks are skipped: the damaged owner, its hard links and
        everything below it. Returns (affected, owners) with owners the paths of the
        owning inode."""
        owners = set()
        for d in dmg:
            if d["ino"] == 0:
                continue
            for rel, ino in self.inos.items():
                if ino == d["ino"]:
                    owners.add(rel)
        aff = set(owners)
        for o in owners:
            aff |= {r for r in self.want if r.startswith(o + "/")}
        return aff, owners

    @staticmethod
    def blocks_by_owner(dmg):
        by_owner = {}
        for d in dmg:
            by_owner.setdefault(d["ino"], []).append(str(d["block"]))
        return by_owner

    def expect_eio(self, fn, what):
        with self.assertRaises(OSError, msg=what) as cm:
            fn()
        self.assertEqual(cm.exception.errno, errno.EIO, what)

    def check_damaged(self, mp, kind, owners):
        for rel in owners:
            p = os.path.join(mp, rel)
            if kind == "inode":
                self.expect_eio(lambda: os.lstat(p), f"stat {rel}")
            elif kind == "dir":
                self.expect_eio(lambda: os.listdir(p), f"readdir {rel}")
            elif kind == "extent":
                def rd():
                    with open(p, "rb") as f:
                        f.read()
                self.expect_eio(rd, f"read {rel}")
            elif kind == "xattr":
                self.expect_eio(lambda: os.getxattr(p, "user.big"), f"getxattr {rel}")

    def check_below_damage(self, mp, kind, aff, owners):
        """Objects that may sit behind the damage (names in a damaged directory, the
        subtree of a damaged directory inode) answer EIO or are intact: never ENOENT
        or wrong bytes. An xattr block's owner still reads its data."""
        for rel in sorted(aff - owners if kind != "xattr" else aff):
            w = self.want[rel]
            p = os.path.join(mp, rel)
            try:
                if w[0] == "file":
                    with open(p, "rb") as f:
                        self.assertEqual(f.read(), w[1], rel)
                elif w[0] == "link":
                    self.assertEqual(os.readlink(p), w[1], rel)
                else:
                    self.assertTrue(stat.S_ISDIR(os.lstat(p).st_mode), rel)
            except OSError as e:
                self.assertEqual(e.errno, errno.EIO, f"{rel}: {e}")
                self.assertNotEqual(kind, "xattr", f"{rel}: {e}")

    def check_tree(self, mp, skip, modified):
        for rel, w in self.want.items():
            if rel in skip:
                continue
            p = os.path.join(mp, rel)
            if w[0] == "file":
                with open(p, "rb") as f:
                    self.assertEqual(f.read(), modified.get(rel, w[1]), rel)
            elif w[0] == "link":
                self.assertEqual(os.readlink(p), w[1], rel)
            else:
                self.assertTrue(os.path.isdir(p), rel)
        for rel, attrs in self.xat.items():
            if rel in skip:
                continue
            for k, v in attrs.items():
                self.assertEqual(os.getxattr(os.path.join(mp, rel), k), v, rel)

    def one_case(self, kind, seed, mode, count):
        s = agfs.Scratch(mkfs=False)
        try:
            self.run_case(s, kind, seed, mode, count)
        finally:
            s.cleanup()

    def run_case(self, s, kind, seed, mode, count):
        subprocess.run(["cp", "--sparse=always", self.ts.image, s.image], check=True)
        r = agfs.run("debug", "corrupt", "--type", kind, "--seed", str(seed), "--mode", mode,
                     "--count", str(count), "--json", s.image)
        rep = json.loads(r.stdout)
        dmg = rep["damaged"]
        self.assertEqual(len(dmg), min(count, rep["candidates"]), r.stdout)
        blocks = {d["block"]: read_block(s.image, d["block"]) for d in dmg}
        aff, owners = self.affected(dmg)

        # Mounted: damaged objects answer EIO, the rest reads and writes.
        mp, proc = s.mount(foreground=True)
        self.check_damaged(mp, kind, owners)
        self.check_tree(mp, aff, {})
        self.check_below_damage(mp, kind, aff, owners)
        modified = {}
        for rel, w in self.want.items():  # append to one undamaged file
            if rel not in aff and w[0] == "file" and rel.startswith("data/"):
                with open(os.path.join(mp, rel), "ab") as f:
                    f.write(b"+appended")
                    os.fsync(f.fileno())
                modified[rel] = w[1] + b"+appended"
                if rel in ("data/f1", "hardlink"):
                    modified["hardlink" if rel == "data/f1" else "data/f1"] = modified[rel]
                break
        self.assertTrue(modified)
        new = os.urandom(300000)
        os.mkdir(os.path.join(mp, "newdir"))
        with open(os.path.join(mp, "newdir/open-unlinked"), "wb") as f:  # an orphan
            f.write(b"o" * 50000)
            os.unlink(os.path.join(mp, "newdir/open-unlinked"))
            f.write(b"p" * 50000)
            f.flush()
            os.fsync(f.fileno())
        with open(os.path.join(mp, "newdir/new"), "wb") as f:
            f.write(new)
            os.fsync(f.fileno())
        with open(os.path.join(mp, "newdir/new"), "rb") as f:
            self.assertEqual(f.read(), new)
        agfs.umount(mp)
        s.mounts.remove(mp)
        out, err = proc.communicate(timeout=30)  # the daemon syncs and exits
        log = (out + err).decode(errors="replace")
        self.assertEqual(proc.returncode, 0, log)
        if owners or kind in LOGGED_AT_MOUNT:  # logged with their block
            # Per owner: the call that failed stopped at its first damaged block (a
            # readdir never reaches a directory's second damaged leaf).
            for ino, blks in self.blocks_by_owner(dmg).items():
                self.assertTrue(any(b in log for b in blks),
                                f"none of blocks {blks} (inode {ino}) in the daemon log:\n{log}")
        # Nothing was written over the damage (journal headers are rewritten by design).
        if kind != "journal":
            for blk, data in blocks.items():
                self.assertEqual(read_block(s.image, blk), data, f"block {blk} was rewritten")

        r = s.fsck()
        if kind != "journal" or read_block(s.image, dmg[0]["block"]) == blocks[dmg[0]["block"]]:
            self.assertEqual(r.returncode, 4, r.stdout + r.stderr)
        rep = s.fsck(repair=True)
        if r.returncode != 0:
            self.assertEqual(rep.returncode, 1, rep.stdout + rep.stderr)
            for ino, blks in self.blocks_by_owner(dmg).items():  # each names its first
                self.assertTrue(any(b in rep.stdout for b in blks), rep.stdout)
        r = s.fsck()
        self.assertEqual(r.returncode, 0, f"after repair:\n{rep.stdout}\nnow:\n{r.stdout}")

        mp = s.mount()
        self.check_tree(mp, aff, modified)
        with open(os.path.join(mp, "newdir/new"), "rb") as f:
            self.assertEqual(f.read(), new)
        s.unmount(mp)
        self.assertEqual(s.fsck().returncode, 0)


class CorruptToolTest(unittest.TestCase):
    def test_refuses_live_mount_and_names_blocks(self):
        s = agfs.Scratch(size="64M", nodes=2)
        self.addCleanup(s.cleanup)
        mp = s.mount()
        with open(os.path.join(mp, "f"), "w") as f:
            f.write("x")
        ino = os.stat(os.path.join(mp, "f")).st_ino
        r = agfs.run("debug", "corrupt", "--type", "inode", s.image, check=False)
        self.assertEqual(r.returncode, 1)
        self.assertIn("mounted by host", r.stderr)
        s.unmount(mp)
        r = agfs.run("debug", "corrupt", "--type", "extent", s.image, check=False)
        self.assertEqual(r.returncode, 3, r.stderr)
        r = agfs.run("debug", "corrupt", "--ino", str(ino), "--type", "inode", s.image)
        self.assertIn(f"block {ino} (inode, inode) of inode {ino} /f", r.stdout)
        r = s.fsck()
        self.assertEqual(r.returncode, 4)
        self.assertIn(str(ino), r.stdout)


if __name__ == "__main__":
    unittest.main()
