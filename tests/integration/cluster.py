"""Multi-node test rig: real agfs-locknode processes sharing one image, either through
the image file directly (O_DIRECT) or each through its own nbdkit server (own log,
pause control and error trigger) from its own network namespace, so the nodes have
no network path to each other at all."""
import json
import os
import signal
import subprocess
import threading
import time

import agfs
import nbdnet

LOCKNODE = os.environ.get("AGORAFS_LOCKNODE",
                          os.path.join(os.path.dirname(agfs.BIN), "tests/cluster/agfs-locknode"))


class Node:
    """One agfs-locknode process; its JSON events are collected as they arrive."""

    def __init__(self, argv, log_path):
        self.log_path = log_path
        self.stderr = open(log_path, "w")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        self.events = []
        self.cv = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            with self.cv:
                self.events.append(ev)
                self.cv.notify_all()
        with self.cv:
            self.cv.notify_all()

    def wait_event(self, name, timeout=60, pred=None):
        deadline = time.time() + timeout
        with self.cv:
            while True:
                for ev in self.events:
                    if ev.get("event") == name and (pred is None or pred(ev)):
                        return ev
                left = deadline - time.time()
                if left <= 0 or (self.proc.poll() is not None and not self.reader.is_alive()):
                    raise AssertionError(f"no '{name}' event from pid {self.proc.pid} within "
                                         f"{timeout}s; events {self.events}; stderr:\n{self.log()}")
                self.cv.wait(min(left, 0.5))

    def all(self, name):
        with self.cv:
            return [e for e in self.events if e.get("event") == name]

    def wait_exit(self, timeout=120):
        rc = self.proc.wait(timeout)
        self.reader.join(5)
        return rc

    def signal(self, sig):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def log(self):
        self.stderr.flush()
        with open(self.log_path, errors="replace") as f:
            return f.read()[-4000:]

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.reader.join(5)
        self.proc.stdout.close()
        self.stderr.close()


class Rig:
    """An image made with `agorafs mkfs` and up to `count` node seats. With via_nbd,
    seat i has its own nbdkit server and its own network namespace."""

    def __init__(self, count, profile="fast", via_nbd=False, slots=16):
        self.scratch = agfs.Scratch(size="64M", nodes=slots, profile=profile)
        self.via_nbd = via_nbd
        self.servers, self.namespaces, self.nodes = [], [], []
        self.trigger = [os.path.join(self.scratch.dir, f"fail-{i}") for i in range(count)]
        try:
            self._start_servers(count)
        except BaseException:
            self.close()
            raise

    def _start_servers(self, count):
        if self.via_nbd:
            for i in range(count):
                d = self.scratch.dir
                srv = nbdnet.NbdServer(self.scratch.image, os.path.join(d, f"nbd{i}.sock"),
                                       log_file=os.path.join(d, f"nbd{i}.log"),
                                       pause_control=os.path.join(d, f"pause{i}.sock"),
                                       error={"error-pwrite-rate": "100%",
                                              "error-pwrite-file": self.trigger[i]})
                self.servers.append(srv)
                self.namespaces.append(nbdnet.NetNamespace(f"agfsc{os.getpid()}n{i}"))

    def device(self, i):
        return self.servers[i].uri if self.via_nbd else self.scratch.image

    def spawn(self, i, mode="idle", **opts):
        argv = [LOCKNODE, "--device", self.device(i), "--mode", mode, "--host", f"node{i}"]
        for k, v in opts.items():
            argv += [f"--{k.replace('_', '-')}", str(v)]
        if self.via_nbd:
            argv = self.namespaces[i].cmd(argv)
        node = Node(argv, os.path.join(self.scratch.dir, f"node{i}-{len(self.nodes)}.log"))
        self.nodes.append(node)
        return node

    def fail_writes(self, i, on=True):
        if on:
            open(self.trigger[i], "w").close()
        elif os.path.exists(self.trigger[i]):
            os.unlink(self.trigger[i])

    def status(self, *extra):
        return agfs.run("status", *extra, self.scratch.image, check=False)

    def close(self):
        for n in self.nodes:
            n.close()
        for s in self.servers:
            try:
                s.resume(timeout=2)
            except Exception:
                pass
            s.stop()
        for ns in self.namespaces:
            ns.delete()
        self.scratch.cleanup()


def stop_all(nodes, sig=signal.SIGTERM, timeout=60):
    for n in nodes:
        n.signal(sig)
    return [n.wait_exit(timeout) for n in nodes]
