"""Every FUSE operation through real syscalls on a real agorafs mount."""
import errno
import os
import stat
import subprocess
import time
import unittest

import agfs
from agfs import MountedTest, as_user


class FilesTest(MountedTest):
    def test_write_read_sizes(self):
        for size in [0, 1, 100, 3328, 3329, 4096, 4097, 65536, 1 << 20, (3 << 20) + 17]:
            path = self.p(f"f{size}")
            data = os.urandom(size)
            with open(path, "wb") as f:
                f.write(data)
            self.assertEqual(os.stat(path).st_size, size)
            with open(path, "rb") as f:
                self.assertEqual(f.read(), data, size)
        self.assertClean()

    def test_one_mib_writes_and_overwrite_in_middle(self):
        path = self.p("big")
        data = bytearray(os.urandom(4 << 20))
        fd = os.open(path, os.O_CREAT | os.O_RDWR)
        for off in range(0, len(data), 1 << 20):
            self.assertEqual(os.pwrite(fd, data[off:off + (1 << 20)], off), 1 << 20)
        patch = os.urandom(10000)
        os.pwrite(fd, patch, 123457)
        data[123457:123457 + 10000] = patch
        os.fsync(fd)
        os.close(fd)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), bytes(data))

    def test_o_direct_unaligned_and_aligned(self):
        path = self.p("direct")
        fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_DIRECT)
        import mmap
        buf = mmap.mmap(-1, 8192)
        buf.write(b"A" * 8192)
        self.assertEqual(os.pwrite(fd, buf, 0), 8192)
        os.pwrite(fd, b"xyz", 5)  # FUSE direct_io accepts unaligned I/O
        self.assertEqual(os.pread(fd, 10, 0), b"AAAAAxyzAA")
        os.close(fd)
        with open(path, "rb") as f:
            self.assertEqual(len(f.read()), 8192)

    def test_append(self):
        path = self.p("log")
        for i in range(100):
            with open(path, "a") as f:
                f.write(f"line {i}\n")
        with open(path) as f:
            self.assertEqual(f.read().splitlines()[-1], "line 99")

    def test_truncate_updates_times_and_zeroes(self):
        path = self.p("t")
        with open(path, "wb") as f:
            f.write(b"x" * 10000)
        st = os.stat(path)
        time.sleep(0.01)
        os.truncate(path, 10)
        st2 = os.stat(path)
        self.assertGreater(st2.st_mtime_ns, st.st_mtime_ns)
        self.assertGreater(st2.st_ctime_ns, st.st_ctime_ns)
        os.truncate(path, 20000)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"x" * 10 + b"\0" * 19990)
        time.sleep(0.01)
        before = os.stat(path).st_mtime_ns
        with open(path, "wb"):  # O_TRUNC updates mtime
            pass
        self.assertGreater(os.stat(path).st_mtime_ns, before)
        self.assertEqual(os.stat(path).st_size, 0)

    def test_fallocate_punch_zero_and_seek(self):
        path = self.p("fa")
        fd = os.open(path, os.O_CREAT | os.O_RDWR)
        os.pwrite(fd, b"d" * 8192, 0)
        os.posix_fallocate(fd, 1 << 20, 1 << 20)
        self.assertEqual(os.fstat(fd).st_size, 2 << 20)
        agfs.fallocate(fd, agfs.FALLOC_FL_KEEP_SIZE, 4 << 20, 4096)
        self.assertEqual(os.fstat(fd).st_size, 2 << 20)
        self.assertEqual(os.lseek(fd, 0, os.SEEK_DATA), 0)
        self.assertEqual(os.lseek(fd, 0, os.SEEK_HOLE), 8192)
        with self.assertRaises(OSError) as cm:
            os.lseek(fd, 8192, os.SEEK_DATA)
        self.assertEqual(cm.exception.errno, errno.ENXIO)
        agfs.fallocate(fd, agfs.FALLOC_FL_PUNCH_HOLE | agfs.FALLOC_FL_KEEP_SIZE, 100, 5000)
        self.assertEqual(os.pread(fd, 5200, 0), b"d" * 100 + b"\0" * 5000 + b"d" * 100)
        agfs.fallocate(fd, agfs.FALLOC_FL_ZERO_RANGE, 6000, 100)
        self.assertEqual(os.pread(fd, 100, 6000), b"\0" * 100)
        os.close(fd)
        self.assertClean()

    def test_copy_file_range(self):
        src, dst = self.p("src"), self.p("dst")
        data = os.urandom(300000)
        with open(src, "wb") as f:
            f.write(data)
        with open(src, "rb") as fi, open(dst, "wb") as fo:
            n = os.copy_file_range(fi.fileno(), fo.fileno(), len(data))
            while n < len(data):
                n += os.copy_file_range(fi.fileno(), fo.fileno(), len(data) - n)
        with open(dst, "rb") as f:
            self.assertEqual(f.read(), data)

    def test_mmap_shared_write_and_read(self):
        import mmap
        path = self.p("mm")
        with open(path, "wb") as f:
            f.write(b"\0" * 16384)
        with open(path, "r+b") as f:
            m = mmap.mmap(f.fileno(), 16384)
            m[100:105] = b"hello"
            m.flush()
            m.close()
        with open(path, "rb") as f:
            self.assertEqual(f.read()[100:105], b"hello")

    def test_statfs_tracks_usage(self):
        before = os.statvfs(self.mnt)
        self.assertEqual(before.f_bsize, 4096)
        self.assertEqual(before.f_namemax, 255)
        with open(self.p("fill"), "wb") as f:
            f.write(b"z" * (8 << 20))
            os.fsync(f.fileno())
        mid = os.statvfs(self.mnt)
        self.assertLessEqual(mid.f_bfree, before.f_bfree - 2048)
        os.unlink(self.p("fill"))
        deadline = time.time() + 10
        while os.statvfs(self.mnt).f_bfree < before.f_bfree and time.time() < deadline:
            time.sleep(0.1)
        self.assertEqual(os.statvfs(self.mnt).f_bfree, before.f_bfree)

    def test_fsync_and_fsyncdir(self):
        path = self.p("s")
        fd = os.open(path, os.O_CREAT | os.O_WRONLY)
        os.write(fd, b"x")
        os.fsync(fd)
        os.fdatasync(fd)
        os.close(fd)
        dfd = os.open(self.mnt, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(dfd)
        os.close(dfd)


class NamespaceTest(MountedTest):
    def test_mkdir_rmdir_nlink(self):
        os.mkdir(self.p("d"))
        os.mkdir(self.p("d", "sub"))
        self.assertEqual(os.stat(self.p("d")).st_nlink, 3)
        with self.assertRaises(OSError) as cm:
            os.rmdir(self.p("d"))
        self.assertEqual(cm.exception.errno, errno.ENOTEMPTY)
        os.rmdir(self.p("d", "sub"))
        self.assertEqual(os.stat(self.p("d")).st_nlink, 2)
        os.rmdir(self.p("d"))
        self.assertFalse(os.path.exists(self.p("d")))
        self.assertClean()

    def test_rename_variants(self):
        for n in "abc":
            with open(self.p(n), "w") as f:
                f.write(n)
        os.rename(self.p("a"), self.p("a2"))
        self.assertEqual(open(self.p("a2")).read(), "a")
        os.rename(self.p("a2"), self.p("b"))  # replaces
        self.assertEqual(open(self.p("b")).read(), "a")
        with self.assertRaises(OSError) as cm:
            agfs.renameat2(self.p("b"), self.p("c"), agfs.RENAME_NOREPLACE)
        self.assertEqual(cm.exception.errno, errno.EEXIST)
        agfs.renameat2(self.p("b"), self.p("c"), agfs.RENAME_EXCHANGE)
        self.assertEqual(open(self.p("b")).read(), "c")
        self.assertEqual(open(self.p("c")).read(), "a")
        os.makedirs(self.p("x", "y"))
        with self.assertRaises(OSError) as cm:
            os.rename(self.p("x"), self.p("x", "y", "z"))
        self.assertEqual(cm.exception.errno, errno.EINVAL)
        os.mkdir(self.p("other"))
        os.rename(self.p("x", "y"), self.p("other", "y"))
        self.assertEqual(os.stat(self.p("x")).st_nlink, 2)
        self.assertEqual(os.stat(self.p("other")).st_nlink, 3)
        os.mkdir(self.p("full"))
        open(self.p("full", "f"), "w").close()
        with self.assertRaises(OSError) as cm:
            os.rename(self.p("other"), self.p("full"))
        self.assertEqual(cm.exception.errno, errno.ENOTEMPTY)
        os.mkdir(self.p("empty"))
        os.rename(self.p("other"), self.p("empty"))
        self.assertTrue(os.path.isdir(self.p("empty", "y")))
        self.assertClean()

    def test_links_and_symlinks(self):
        with open(self.p("f"), "w") as f:
            f.write("data")
        os.link(self.p("f"), self.p("g"))
        self.assertEqual(os.stat(self.p("f")).st_nlink, 2)
        self.assertEqual(os.stat(self.p("f")).st_ino, os.stat(self.p("g")).st_ino)
        os.unlink(self.p("f"))
        self.assertEqual(os.stat(self.p("g")).st_nlink, 1)
        os.symlink("g", self.p("s"))
        self.assertEqual(os.readlink(self.p("s")), "g")
        self.assertEqual(open(self.p("s")).read(), "data")
        long_target = "t" * 4000  # longer than the inline area
        os.symlink(long_target, self.p("long"))
        self.assertEqual(os.readlink(self.p("long")), long_target)
        with self.assertRaises(OSError) as cm:
            os.link(self.mnt, self.p("dirlink"))
        self.assertIn(cm.exception.errno, (errno.EPERM, errno.EISDIR))
        self.assertClean()

    def test_mknod_fifo(self):
        os.mkfifo(self.p("fifo"))
        self.assertTrue(stat.S_ISFIFO(os.stat(self.p("fifo")).st_mode))
        os.mknod(self.p("chr"), stat.S_IFCHR | 0o600, os.makedev(1, 3))
        self.assertEqual(os.stat(self.p("chr")).st_rdev, os.makedev(1, 3))

    def test_name_too_long_and_exists(self):
        with self.assertRaises(OSError) as cm:
            open(self.p("n" * 256), "w")
        self.assertEqual(cm.exception.errno, errno.ENAMETOOLONG)
        open(self.p("n" * 255), "w").close()
        os.mkdir(self.p("e"))
        with self.assertRaises(FileExistsError):
            os.mkdir(self.p("e"))

    def test_unlinked_open_file_stays_readable(self):
        path = self.p("tmpf")
        f = open(path, "w+b")
        f.write(b"q" * 100000)
        f.flush()
        os.unlink(path)
        self.assertFalse(os.path.exists(path))
        f.seek(0)
        self.assertEqual(f.read(), b"q" * 100000)
        f.write(b"more")
        f.close()
        self.assertClean()

    def test_times_and_ctime(self):
        path = self.p("tm")
        open(path, "w").close()
        agfs.utimensat(path, (1000, 5), (2000, 7))
        st = os.stat(path)
        self.assertEqual(st.st_atime_ns, 1000 * 10**9 + 5)
        self.assertEqual(st.st_mtime_ns, 2000 * 10**9 + 7)
        agfs.utimensat(path, "omit", "now")
        st2 = os.stat(path)
        self.assertEqual(st2.st_atime_ns, st.st_atime_ns)
        self.assertGreater(st2.st_mtime_ns, st.st_mtime_ns)
        c0 = os.stat(path).st_ctime_ns
        time.sleep(0.01)
        os.chmod(path, 0o600)
        c1 = os.stat(path).st_ctime_ns
        self.assertGreater(c1, c0)
        time.sleep(0.01)
        os.setxattr(path, "user.k", b"v")
        self.assertGreater(os.stat(path).st_ctime_ns, c1)

    def test_large_directory(self):
        d = self.p("big")
        os.mkdir(d)
        n = 100000
        for i in range(n):
            os.close(os.open(os.path.join(d, f"entry-{i:06d}"), os.O_CREAT | os.O_WRONLY, 0o644))
        names = os.listdir(d)
        self.assertEqual(len(names), n)
        self.assertEqual(len(set(names)), n)
        for i in range(0, n, 997):
            self.assertTrue(os.path.exists(os.path.join(d, f"entry-{i:06d}")))
        for i in range(0, n, 2):
            os.unlink(os.path.join(d, f"entry-{i:06d}"))
        self.assertEqual(len(os.listdir(d)), n // 2)
        self.assertClean()


class XattrTest(MountedTest):
    def test_xattr_calls(self):
        path = self.p("x")
        open(path, "w").close()
        os.setxattr(path, "user.one", b"1")
        os.setxattr(path, "user.big", b"b" * 3000)
        self.assertEqual(os.getxattr(path, "user.one"), b"1")
        self.assertEqual(sorted(os.listxattr(path)), ["user.big", "user.one"])
        with self.assertRaises(OSError) as cm:
            os.setxattr(path, "user.one", b"2", os.XATTR_CREATE)
        self.assertEqual(cm.exception.errno, errno.EEXIST)
        with self.assertRaises(OSError) as cm:
            os.getxattr(path, "user.none")
        self.assertEqual(cm.exception.errno, errno.ENODATA)
        os.removexattr(path, "user.one")
        self.assertEqual(os.listxattr(path), ["user.big"])
        os.setxattr(path, "trusted.t", b"root only")
        self.assertEqual(os.getxattr(path, "trusted.t"), b"root only")
        self.assertClean()


class PermissionTest(MountedTest):
    def test_denials_as_nobody(self):
        os.chmod(self.mnt, 0o755)
        with open(self.p("private"), "w") as f:
            f.write("secret")
        os.chmod(self.p("private"), 0o600)
        nobody = 65534

        def read(p):
            with open(p) as f:
                return f.read()
        with self.assertRaises(PermissionError):
            as_user(nobody, nobody, read, self.p("private"))
        with self.assertRaises(PermissionError):
            as_user(nobody, nobody, lambda: open(self.p("new"), "w").close())
        with self.assertRaises(PermissionError):
            as_user(nobody, nobody, os.chmod, self.p("private"), 0o777)
        with self.assertRaises(PermissionError):
            as_user(nobody, nobody, os.chown, self.p("private"), nobody, nobody)
        with self.assertRaises(PermissionError):
            as_user(nobody, nobody, os.setxattr, self.p("private"), "trusted.x", b"1")
        # security.*: the kernel leaves it to the filesystem; root only, even on a file
        # the caller owns.
        with open(self.p("owned"), "w"):
            pass
        os.chown(self.p("owned"), nobody, nobody)
        as_user(nobody, nobody, os.setxattr, self.p("owned"), "user.ok", b"1")
        with self.assertRaises(PermissionError):
            as_user(nobody, nobody, os.setxattr, self.p("owned"), "security.x", b"1")
        os.setxattr(self.p("owned"), "security.x", b"root may")
        self.assertEqual(os.getxattr(self.p("owned"), "security.x"), b"root may")

    def test_new_files_owned_by_caller_and_setgid_dirs(self):
        os.chmod(self.mnt, 0o777)
        as_user(1000, 1000, lambda: open(self.p("mine"), "w").close())
        st = os.stat(self.p("mine"))
        self.assertEqual((st.st_uid, st.st_gid), (1000, 1000))
        os.mkdir(self.p("sg"))
        os.chown(self.p("sg"), 0, 50)
        os.chmod(self.p("sg"), 0o2777)
        as_user(1000, 1000, os.mkdir, self.p("sg", "sub"))
        st = os.stat(self.p("sg", "sub"))
        self.assertEqual(st.st_gid, 50)
        self.assertTrue(st.st_mode & stat.S_ISGID)

    def test_sticky_directory(self):
        os.mkdir(self.p("tmp"))
        os.chmod(self.p("tmp"), 0o1777)
        as_user(1000, 1000, lambda: open(self.p("tmp", "a"), "w").close())
        with self.assertRaises(PermissionError):
            as_user(1001, 1001, os.unlink, self.p("tmp", "a"))
        with self.assertRaises(PermissionError):
            as_user(1001, 1001, os.rename, self.p("tmp", "a"), self.p("tmp", "b"))
        as_user(1001, 1001, lambda: open(self.p("tmp", "c"), "w").close())
        with self.assertRaises(PermissionError):  # nor replace someone else's file
            as_user(1001, 1001, os.rename, self.p("tmp", "c"), self.p("tmp", "a"))
        as_user(1000, 1000, os.unlink, self.p("tmp", "a"))

    def test_suid_cleared_on_write_and_chown(self):
        path = self.p("suid")
        with open(path, "w") as f:
            f.write("x")
        os.chmod(path, 0o6777)
        as_user(1000, 1000, lambda: open(path, "a").write("y"))
        self.assertEqual(os.stat(path).st_mode & 0o6000, 0)
        os.chmod(path, 0o4755)
        os.chown(path, 1000, -1)
        self.assertEqual(os.stat(path).st_mode & 0o4000, 0)

    def test_chown_minus_one_keeps_ids(self):
        path = self.p("c")
        open(path, "w").close()
        os.chown(path, 1234, 5678)
        os.chown(path, -1, -1)
        st = os.stat(path)
        self.assertEqual((st.st_uid, st.st_gid), (1234, 5678))
        os.chown(path, -1, 42)
        self.assertEqual((os.stat(path).st_uid, os.stat(path).st_gid), (1234, 42))


def facl(*args):
    """setfacl/getfacl as the admin runs them; returns getfacl's output."""
    p = subprocess.run(list(args), capture_output=True, text=True)
    if p.returncode != 0:
        raise AssertionError(f"{args}: {p.stderr}")
    return p.stdout


def read_file(path):
    with open(path) as f:
        return f.read()


def append(path, data):
    with open(path, "a") as f:
        f.write(data)


class AclTest(MountedTest):
    """POSIX ACLs set with setfacl are enforced by the kernel against what agorafs
    stores, stay consistent with the mode, and are inherited from default ACLs."""

    def setUp(self):
        super().setUp()
        os.chmod(self.mnt, 0o755)

    def secret(self, name="secret"):
        path = self.p(name)
        with open(path, "w") as f:
            f.write("secret")
        os.chmod(path, 0o600)
        return path

    def test_named_entries_grant_what_the_mode_denies_and_the_mask_limits(self):
        path = self.secret()
        with self.assertRaises(PermissionError):
            as_user(1000, 1000, read_file, path)
        facl("setfacl", "-m", "u:1000:r,g:2000:rw", path)
        self.assertEqual(as_user(1000, 1000, read_file, path), "secret")
        as_user(1001, 2000, append, path, "+g")  # named group entry
        with self.assertRaises(PermissionError):
            as_user(1001, 1001, read_file, path)  # nobody else
        with self.assertRaises(PermissionError):
            as_user(1000, 1000, append, path, "x")  # r only
        # The mode's group bits show the mask.
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o660)
        out = facl("getfacl", "-n", path)
        self.assertIn("user:1000:r--", out)
        self.assertIn("group:2000:rw-", out)
        # The mask limits named entries; chmod rewrites the mask.
        facl("setfacl", "-m", "m::-", path)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        with self.assertRaises(PermissionError):
            as_user(1000, 1000, read_file, path)
        os.chmod(path, 0o640)
        self.assertIn("mask::r--", facl("getfacl", "-n", path))
        self.assertEqual(as_user(1000, 1000, read_file, path), "secret+g")
        with self.assertRaises(PermissionError):
            as_user(1001, 2000, append, path, "x")  # rw limited to r by the mask
        # Directories: search and listing follow the ACL too.
        os.mkdir(self.p("d"), 0o700)
        open(self.p("d", "f"), "w").close()
        with self.assertRaises(PermissionError):
            as_user(1000, 1000, os.listdir, self.p("d"))
        facl("setfacl", "-m", "u:1000:rx", self.p("d"))
        self.assertEqual(as_user(1000, 1000, os.listdir, self.p("d")), ["f"])
        # Removing the ACL takes the grants away; the other users' bits stay as they were.
        facl("setfacl", "-b", path)
        self.assertNotIn("user:1000", facl("getfacl", "-n", path))
        os.chmod(path, 0o600)
        with self.assertRaises(PermissionError):
            as_user(1000, 1000, read_file, path)
        # Only the owner (or root) may change an ACL.
        with self.assertRaises(PermissionError):
            as_user(1000, 1000, os.setxattr, path, "system.posix_acl_access",
                    os.getxattr(self.p("d"), "system.posix_acl_access"))
        self.assertClean()

    def test_default_acl_is_inherited_and_umask_applies_only_without_one(self):
        os.mkdir(self.p("shared"), 0o755)
        facl("setfacl", "-d", "-m", "u:1000:rwx", self.p("shared"))
        os.mkdir(self.p("plain"), 0o755)
        subprocess.run(["sh", "-c", f"umask 077; touch {self.p('shared', 'f')} "
                        f"{self.p('plain', 'f')}; mkdir {self.p('shared', 'sub')}"], check=True)
        # Without a default ACL: 0666 & ~077.
        self.assertEqual(os.stat(self.p("plain", "f")).st_mode & 0o777, 0o600)
        # With one: the umask is ignored, the default ACL limits 0666 instead.
        self.assertEqual(os.stat(self.p("shared", "f")).st_mode & 0o777, 0o664)
        out = facl("getfacl", "-n", self.p("shared", "f"))
        self.assertRegex(out, r"user:1000:rwx\s+#effective:rw-")
        as_user(1000, 1000, append, self.p("shared", "f"), "from 1000")
        # A subdirectory inherits the default ACL as its own default and access ACL.
        self.assertIn("default:user:1000:rwx", facl("getfacl", "-n", self.p("shared", "sub")))
        as_user(1000, 1000, lambda: open(self.p("shared", "sub", "g"), "w").close())
        self.assertEqual(os.stat(self.p("shared", "sub", "g")).st_uid, 1000)
        self.assertClean()

    def test_acl_change_on_one_node_counts_at_once_on_another(self):
        m2 = self.s.mount("m2", opts=self.mount_opts)
        path = self.secret()
        other = os.path.join(m2, "secret")
        with self.assertRaises(PermissionError):
            as_user(1000, 1000, read_file, other)
        facl("setfacl", "-m", "u:1000:r", path)
        self.assertEqual(as_user(1000, 1000, read_file, other), "secret")
        facl("setfacl", "-x", "u:1000", path)
        with self.assertRaises(PermissionError):
            as_user(1000, 1000, read_file, other)
        # The other way round, on a directory (cached longer than a file's attributes).
        os.mkdir(os.path.join(m2, "d"), 0o700)
        self.assertEqual(os.listdir(self.p("d")), [])
        with self.assertRaises(PermissionError):
            as_user(1000, 1000, os.listdir, self.p("d"))
        facl("setfacl", "-m", "u:1000:rx", os.path.join(m2, "d"))
        self.assertEqual(as_user(1000, 1000, os.listdir, self.p("d")), [])
        facl("setfacl", "-m", "u:1000:-", os.path.join(m2, "d"))
        with self.assertRaises(PermissionError):
            as_user(1000, 1000, os.listdir, self.p("d"))
        self.s.unmount(m2)
        self.assertClean()


class MountLifecycleTest(unittest.TestCase):
    def setUp(self):
        self.s = agfs.Scratch(size="256M")
        self.addCleanup(self.s.cleanup)

    def test_sigterm_unmounts_cleanly(self):
        mp, proc = self.s.mount(foreground=True)
        with open(os.path.join(mp, "f"), "w") as f:
            f.write("persist")
        proc.terminate()
        proc.wait(timeout=30)
        self.assertEqual(proc.returncode, 0, proc.stderr.read().decode())
        agfs.wait_unmounted(mp)
        self.s.mounts.remove(mp)
        self.assertEqual(self.s.fsck().returncode, 0)
        mp = self.s.mount()
        self.assertEqual(open(os.path.join(mp, "f")).read(), "persist")

    def test_umount_then_remount_keeps_data(self):
        mp = self.s.mount()
        os.makedirs(os.path.join(mp, "a", "b"))
        with open(os.path.join(mp, "a", "b", "c"), "wb") as f:
            f.write(b"z" * 50000)
        self.s.unmount(mp)
        info = agfs.run("info", self.s.image).stdout
        self.assertIn("node slots", info)
        mp = self.s.mount()
        self.assertEqual(open(os.path.join(mp, "a", "b", "c"), "rb").read(), b"z" * 50000)

    def test_second_mount_of_live_device_joins_as_another_node(self):
        m1 = self.s.mount("m1")
        with open(os.path.join(m1, "f"), "w") as f:
            f.write("first")
        m2 = self.s.mount("m2")
        self.assertEqual(open(os.path.join(m2, "f")).read(), "first")
        with open(os.path.join(m2, "g"), "w") as f:
            f.write("second")
        self.assertEqual(open(os.path.join(m1, "g")).read(), "second")
        self.s.unmount(m2)
        self.s.unmount(m1)
        self.assertEqual(self.s.fsck().returncode, 0)


if __name__ == "__main__":
    unittest.main()
