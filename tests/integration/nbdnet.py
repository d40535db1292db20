"""Multi-node test plumbing: a shared disk served by nbdkit, nodes in network namespaces.

- NbdServer / start_nbdkit(): nbdkit serving an image file on a Unix socket, with
  optional log, pause, delay and error filters. Path-based Unix sockets live in the
  filesystem, not in a network namespace, so every namespace can reach the disk while
  the namespaces cannot reach each other over the network.
- NetNamespace / netns_add() / netns_delete() / netns_prefix(): `ip netns` namespaces
  holding only a loopback device; netns_prefix(name) is the `nsenter --net=...`
  command prefix that runs a process there. nsenter switches only the network
  namespace, so the process still sees the host's mounts (and FUSE mounts it makes
  are visible to the test).
- parse_log() / write_requests(): the nbdkit log filter's file as request records,
  and the write requests per connection with their timestamps.
- pause() / resume(): stop and restart all request processing through the pause
  filter's control socket.

Every object here cleans up after itself; use them as context managers or register
their stop()/delete() with addCleanup.
"""
import contextlib
import datetime
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field

NBDKIT = os.environ.get("NBDKIT", "nbdkit")


def have_nbdkit():
    return shutil.which(NBDKIT) is not None


def nbd_uri(socket_path):
    """The libnbd URI agorafs takes for an export on a Unix socket."""
    return f"nbd+unix:///?socket={socket_path}"


# ----------------------------------------------------------------------------- nbdkit

class NbdServer:
    """One nbdkit process serving `image` (file plugin) on Unix socket `socket_path`.

    Filters, outermost (nearest the client) first: log, pause, delay, error. So the
    log sees every request as the client sent it, including ones the pause filter
    holds and the error filter fails (they are logged with return=-1).

    log_file:      path for the log filter's logfile= (None: no log filter).
    pause_control: path for the pause filter's control socket (None: no pause filter).
    delay:         dict of delay-filter parameters, e.g. {"delay-write": "20ms"}.
    error:         dict of error-filter parameters, e.g. {"error-pwrite-rate": "100%",
                   "error-pwrite-file": "/tmp/x/fail"} (errors only while that file
                   exists).
    readonly:      serve read-only (-r).
    extra_args:    more nbdkit arguments, appended after the plugin parameters.
    """

    def __init__(self, image, socket_path, *, log_file=None, pause_control=None, delay=None,
                 error=None, readonly=False, extra_args=(), start_timeout=20):
        self.image = image
        self.socket = socket_path
        self.uri = nbd_uri(socket_path)
        self.log_file = log_file
        self.pause_control = pause_control
        base = os.path.dirname(os.path.abspath(socket_path))
        stem = os.path.basename(socket_path)
        self.pidfile = os.path.join(base, stem + ".pid")
        self.stderr_file = os.path.join(base, stem + ".stderr")
        filters, params = [], []
        if log_file:
            # Appends, so a restarted server (start() after stop()) keeps the history;
            # each run starts with a "Ready" line (see LogRecord.run).
            filters.append("--filter=log")
            params += [f"logfile={log_file}", "logappend=true"]
            open(log_file, "w").close()
        if pause_control:
            filters.append("--filter=pause")
            params.append(f"pause-control={pause_control}")
        if delay:
            filters.append("--filter=delay")
            params += [f"{k}={v}" for k, v in delay.items()]
        if error:
            filters.append("--filter=error")
            params += [f"{k}={v}" for k, v in error.items()]
        self.argv = [NBDKIT, "--exit-with-parent", "-f", "-U", socket_path, "-P", self.pidfile,
                     *(["-r"] if readonly else []), *filters, "file", image, *params,
                     *extra_args]
        self.proc = None
        self.start(start_timeout)

    def start(self, timeout=20):
        """Starts (or restarts after stop()/kill()) nbdkit; returns once it accepts
        connections (nbdkit writes its pid file only then)."""
        assert self.proc is None, "nbdkit already running"
        for stale in (self.pidfile, self.socket):  # nbdkit -f leaves its socket behind
            with contextlib.suppress(FileNotFoundError):
                os.unlink(stale)
        with open(self.stderr_file, "ab") as err:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                rc, self.proc = self.proc.returncode, None
                raise AssertionError(f"nbdkit exited {rc} at start: {shlex.join(self.argv)}\n"
                                     f"{self.stderr()}")
            with contextlib.suppress(OSError):
                if os.path.getsize(self.pidfile) > 0:
                    return self
            if time.time() > deadline:
                self.kill()
                raise AssertionError(f"nbdkit not ready after {timeout}s: {self.stderr()}")
            time.sleep(0.02)

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig=signal.SIGTERM, timeout=10):
        """Stops nbdkit (SIGTERM; SIGKILL if it lingers). Clients see their connections
        close. Safe to call twice."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self):
        """SIGKILL: the disk server crashes."""
        self.stop(signal.SIGKILL)

    def pause(self, timeout=30):
        """Holds every request received from now on; returns once the ones already in
        flight have finished."""
        pause(self.pause_control, timeout)

    def resume(self, timeout=30):
        resume(self.pause_control, timeout)

    def stderr(self):
        try:
            with open(self.stderr_file, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def writes(self, run=None):
        """write_requests() of this server's log file."""
        return write_requests(self.log_file, run)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def start_nbdkit(image, socket_path, **kw):
    """Starts nbdkit serving `image` on `socket_path`; see NbdServer for the keywords."""
    return NbdServer(image, socket_path, **kw)


def _pause_command(control, cmd, timeout):
    if not control:
        raise ValueError("nbdkit was started without a pause filter (pause_control=...)")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(control)
        s.sendall(cmd)
        reply = s.recv(1)
    if reply != cmd.upper():
        raise AssertionError(f"pause filter answered {reply!r} to {cmd!r}")


def pause(control, timeout=30):
    """Sends 'p' to the pause filter's control socket and waits for 'P' (all requests
    received before the pause have completed; later ones hang until resume)."""
    _pause_command(control, b"p", timeout)


def resume(control, timeout=30):
    """Sends 'r' and waits for 'R': held requests proceed."""
    _pause_command(control, b"r", timeout)


# ---------------------------------------------------------------- nbdkit log parsing

@dataclass
class LogRecord:
    """One request from the log filter: its call line and, once it returned, its
    return line merged in."""
    time: float                 # call timestamp, seconds since the epoch
    connection: int
    id: int
    op: str                     # Read, Write, Flush, Zero, Trim, Extents, Cache
    offset: int = None
    count: int = None
    fua: bool = False
    args: dict = field(default_factory=dict)
    run: int = 0                # which server run: 0 until the 2nd "Ready" line, ...
    end_time: float = None      # None: never returned (server stopped or paused)
    ret: int = None             # 0 ok, -1 failed
    error: str = None           # e.g. "EIO" when ret == -1


_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+) (.*)$")


def _timestamp(text):
    # The log filter writes local time with microseconds.
    return datetime.datetime.strptime(text, "%Y-%m-%d %H:%M:%S.%f").timestamp()


def _fields(words):
    out = {}
    for w in words:
        k, sep, v = w.partition("=")
        if sep:
            out[k] = v
    return out


def parse_log(path):
    """All requests (connection-scoped calls with an id) in the log file, in the order
    they were issued. Connect/Disconnect and server-wide lines are skipped."""
    records, open_calls, run = [], {}, -1
    with open(path, errors="replace") as f:
        for line in f:
            m = _LINE.match(line.rstrip("\n"))
            if not m:
                continue
            t = _timestamp(m.group(1))
            try:
                words = shlex.split(m.group(2))
            except ValueError:
                words = m.group(2).split()
            if words and words[0] == "Ready":
                run += 1
                open_calls = {}
                continue
            if not words or not words[0].startswith("connection="):
                continue
            conn = int(words[0].split("=", 1)[1])
            if len(words) < 2:
                continue
            action, kv = words[1], _fields(words[2:])
            if "id" not in kv:
                continue
            rid = int(kv["id"])
            if action.startswith("..."):
                rec = open_calls.pop((conn, rid), None)
                if rec is not None:
                    rec.end_time = t
                    rec.ret = int(kv["return"]) if "return" in kv else None
                    rec.error = kv.get("error")
                continue
            rec = LogRecord(time=t, connection=conn, id=rid, op=action, args=kv,
                            run=max(run, 0))
            if "offset" in kv:
                rec.offset = int(kv["offset"], 0)
            if "count" in kv:
                rec.count = int(kv["count"], 0)
            rec.fua = kv.get("fua") == "1"
            records.append(rec)
            open_calls[(conn, rid)] = rec
    return records


def write_requests(path, run=None):
    """{connection: [LogRecord of each Write, in issue order]} from a log file.

    Connection numbers restart with each server run, so with run=None (default) and a
    log spanning several runs the keys are (run, connection); pass run=N (or -1 for
    the last run) for plain connection keys. A single-run log always has plain keys."""
    recs = parse_log(path)
    runs = sorted({r.run for r in recs})
    if run is not None and runs:
        want = runs[run] if run < 0 else run
        recs = [r for r in recs if r.run == want]
    multi = run is None and len(runs) > 1
    out = {}
    for r in recs:
        if r.op == "Write":
            key = (r.run, r.connection) if multi else r.connection
            out.setdefault(key, []).append(r)
    return out


# --------------------------------------------------------------- network namespaces

class NetnsUnavailable(Exception):
    """`ip netns add` failed (no privilege, no ip tool, ...)."""


def netns_prefix(name):
    """Command prefix running a program in namespace `name`: only the network
    namespace changes, so host mounts and Unix sockets stay visible."""
    return ["nsenter", f"--net=/run/netns/{name}"]


def netns_add(name, loopback_up=True):
    """Creates network namespace `name` holding only a loopback device (brought up
    unless loopback_up=False). Raises NetnsUnavailable when `ip netns add` fails."""
    try:
        p = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True,
                           timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NetnsUnavailable(f"ip netns add {name}: {e}") from e
    if p.returncode != 0:
        raise NetnsUnavailable(f"ip netns add {name}: {p.stderr.strip() or p.returncode}")
    if loopback_up:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True,
                       capture_output=True, timeout=30)


def netns_delete(name):
    """Deletes namespace `name` if it exists (processes still in it keep it alive
    until they exit, but it is gone from /run/netns)."""
    if os.path.exists(f"/run/netns/{name}"):
        subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=30)


def netns_available():
    """(True, "") if a namespace can be created here, else (False, reason)."""
    name = f"agfs-probe-{os.getpid()}"
    try:
        netns_add(name, loopback_up=False)
    except NetnsUnavailable as e:
        return False, str(e)
    netns_delete(name)
    return True, ""


def netns_of_pid(pid):
    """Identity (st_dev, st_ino) of the network namespace process `pid` is in."""
    st = os.stat(f"/proc/{pid}/ns/net")
    return st.st_dev, st.st_ino


def netns_id(name):
    """Identity of namespace `name`, comparable with netns_of_pid()."""
    st = os.stat(f"/run/netns/{name}")
    return st.st_dev, st.st_ino


class NetNamespace:
    """A network namespace for one node; deleted by delete() / on leaving `with`."""

    def __init__(self, name, loopback_up=True):
        self.name = name
        netns_add(name, loopback_up)
        self.prefix = netns_prefix(name)

    def cmd(self, argv):
        """argv prefixed to run inside the namespace."""
        return [*self.prefix, *argv]

    def run(self, argv, **kw):
        """subprocess.run(argv) inside the namespace (capture_output/text default on)."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.cmd(argv), **kw)

    def popen(self, argv, **kw):
        return subprocess.Popen(self.cmd(argv), **kw)

    def ident(self):
        return netns_id(self.name)

    def delete(self):
        netns_delete(self.name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.delete()
