"""The StacyVM guest agent: PID 1 of every microVM.

It runs from the initramfs under Debian's own python3.11 (interpreter, libc and
the few stdlib modules it needs are copied in by `stacyvm microvm build-assets`),
so it works with any image, alpine/musl or no Python at all. After importing
everything it needs it chroots into the image root (/dev/vda, mounted by /init
at /newroot): every command and every file path is then resolved by the guest
kernel inside the image, symlinks and `..` included, and nothing in the image
can point the agent at its own files.

It speaks protocol.py over the virtio-serial port named "stacyvm.agent", with
one selectors loop (no threads: PID 1 must reap every orphan, and a thread
racing `waitpid(-1)` would steal exit statuses). Each exec runs in its own
cgroup under /sys/fs/cgroup/sandbox, whose limits are the sandbox's memory,
pids and CPU; killing an exec writes its cgroup.kill, so nothing it started
survives, `setsid` or not.

Stdlib only, and only modules the initramfs carries (see assets.AGENT_MODULES).
"""

from __future__ import annotations

import base64
import errno
import fcntl
import glob
import os
import selectors
import signal
import socket
import stat
import struct
import sys
import termios
import time
from typing import Any

try:
    from . import protocol as P
except ImportError:  # in the guest: protocol.py sits next to this file
    import protocol as P  # type: ignore[no-redef]

Msg = P.Msg
PORT_NAME = "stacyvm.agent"
NEWROOT = "/newroot"
CG = "/sys/fs/cgroup/sandbox"
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207


def log(text: str) -> None:
    os.write(2, f"stacyvm-agent: {text}\n".encode())


def find_port() -> str:
    for d in glob.glob("/sys/class/virtio-ports/*"):
        try:
            with open(d + "/name") as f:
                if f.read().strip() == PORT_NAME:
                    return "/dev/" + os.path.basename(d)
        except OSError:
            pass
    raise SystemExit(f"no virtio port named {PORT_NAME}")


def file_info(path: str) -> Msg:
    s = os.lstat(path)
    return {"path": path, "size": s.st_size, "mode": stat.S_IMODE(s.st_mode), "is_dir": stat.S_ISDIR(s.st_mode),
            "is_symlink": stat.S_ISLNK(s.st_mode), "mtime": s.st_mtime}


def users() -> dict[str, tuple[int, int, str]]:
    out = {}
    try:
        with open("/etc/passwd") as f:
            for line in f:
                parts = line.rstrip("\n").split(":")
                if len(parts) >= 6 and parts[2].isdigit() and parts[3].isdigit():
                    out[parts[0]] = (int(parts[2]), int(parts[3]), parts[5])
    except OSError:
        pass
    return out


def resolve_user(user: str) -> tuple[int, int, str]:
    table = users()
    if user in table:
        return table[user]
    name, _, group = user.partition(":")
    if name.isdigit():
        uid = int(name)
        match = next((v for v in table.values() if v[0] == uid), None)
        gid = int(group) if group.isdigit() else (match[1] if match else uid)
        return uid, gid, match[2] if match else "/"
    raise OSError(errno.ENOENT, f"no such user: {user}")


def rmtree(path: str) -> None:
    for entry in os.scandir(path):
        if entry.is_dir(follow_symlinks=False):
            rmtree(entry.path)
        else:
            os.unlink(entry.path)
    os.rmdir(path)


class Channel:
    def __init__(self, agent: Agent, chan: int) -> None:
        self.agent, self.chan = agent, chan
        self.credit = P.WINDOW
        self.paused: list[int] = []

    def on_msg(self, m: Msg) -> None:
        if m.get("op") == "cancel":
            self.close()

    def on_data(self, stream: int, payload: bytes) -> None:
        pass

    def emit(self, frame: bytes) -> None:
        if self.agent.chans.get(self.chan) is self:  # nothing for a cancelled channel
            self.agent.send(frame)

    def on_ack(self, n: int) -> None:
        self.credit += n
        for fd in self.paused:
            self.agent.on_read(fd, self._readable)
        self.paused = []

    def _readable(self, fd: int) -> None:
        pass

    def _pause(self, fd: int) -> None:
        """Out of credit: stop reading fd until the host acknowledges data."""
        self.agent.on_read(fd, None)
        self.paused.append(fd)

    def close(self) -> None:
        if self.agent.chans.get(self.chan) is self:
            del self.agent.chans[self.chan]


class Exec(Channel):
    def __init__(self, agent: Agent, chan: int, m: Msg) -> None:
        super().__init__(agent, chan)
        self.cg = f"{CG}/e{chan}"
        self.status: int | None = None
        self.exited_at = 0.0
        self.outs: dict[int, int] = {}  # fd -> stream
        self.stdin_fd: int | None = None
        self.pending = bytearray()
        self.stdin_eof = False
        self.tty = bool(m.get("tty"))
        self.pid = self._spawn(m)
        agent.pids[self.pid] = self

    def _spawn(self, m: Msg) -> int:
        cfg = self.agent.config
        uid, gid, home = resolve_user(m.get("user") or cfg.get("user") or "root")
        env = {"HOME": home, "HOSTNAME": cfg.get("hostname", "")}
        for kv in cfg.get("env", []):
            k, _, v = kv.partition("=")
            env[k] = v
        env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        if self.tty:
            env.setdefault("TERM", "xterm")
        env.update(m.get("env") or {})
        cwd = m.get("workdir") or cfg.get("workdir") or "/"
        argv = m["argv"]
        os.mkdir(self.cg)
        if self.tty:
            master, slave = os.openpty()
            rows, cols = m.get("rows") or 24, m.get("cols") or 80
            fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
            child_fds = (slave, slave, slave)
            self.outs = {master: P.OUT}
            self.stdin_fd = master if m.get("stdin") else None
            parent_close = [slave]
        else:
            r_out, w_out = os.pipe()
            r_err, w_err = os.pipe()
            if m.get("stdin"):
                r_in, w_in = os.pipe()
                self.stdin_fd = w_in
            else:
                r_in, w_in = os.open("/dev/null", os.O_RDONLY), -1
            child_fds = (r_in, w_out, w_err)
            self.outs = {r_out: P.OUT, r_err: P.ERR}
            parent_close = [r_in, w_out, w_err]
        pid = os.fork()
        if pid == 0:  # child: never return into the agent
            try:
                os.setsid()
                if self.tty:
                    fcntl.ioctl(child_fds[0], termios.TIOCSCTTY, 0)
                with open(self.cg + "/cgroup.procs", "w") as f:
                    f.write("0")
                with open("/proc/self/oom_score_adj", "w") as f:
                    f.write("0")  # not the agent's -1000: the OOM killer must be able to pick it
                for i, fd in enumerate(child_fds):
                    os.dup2(fd, i, inheritable=True)
                os.closerange(3, 4096)
                for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD, signal.SIGINT, signal.SIGTERM):
                    signal.signal(sig, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_SETMASK, [])
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
                os.chdir(cwd)
                os.execvpe(argv[0], argv, env)
            except OSError as exc:
                os.write(2, f"stacyvm: {argv[0]}: {exc.strerror}\n".encode())
                os._exit(127 if exc.errno == errno.ENOENT else 126)
            finally:
                os._exit(127)
        for fd in parent_close:
            os.close(fd)
        for fd in self.outs:
            os.set_blocking(fd, False)
            self.agent.on_read(fd, self._readable)
        if self.stdin_fd is not None:
            os.set_blocking(self.stdin_fd, False)
        return pid

    # output ---------------------------------------------------------------------
    def _readable(self, fd: int) -> None:
        if self.credit <= 0:
            self._pause(fd)
            return
        try:
            chunk = os.read(fd, min(P.CHUNK, self.credit))
        except BlockingIOError:
            return
        except OSError:  # EIO: the pty's last slave holder closed it
            chunk = b""
        if not chunk:
            self._close_out(fd)
            return
        self.credit -= len(chunk)
        self.emit(P.data(self.chan, self.outs[fd], chunk))

    def _close_out(self, fd: int) -> None:
        stream = self.outs.pop(fd)
        self.agent.on_read(fd, None)
        if fd in self.paused:
            self.paused.remove(fd)
        if fd != self.stdin_fd:
            os.close(fd)
        self.emit(P.data(self.chan, stream, b""))
        self.maybe_done()

    # input ----------------------------------------------------------------------
    def on_data(self, stream: int, payload: bytes) -> None:
        if self.stdin_fd is None:
            return
        if not payload:
            self.stdin_eof = True
        self.pending += payload
        self._flush_stdin()

    def _flush_stdin(self) -> None:
        fd = self.stdin_fd
        if fd is None:
            return
        while self.pending:
            try:
                n = os.write(fd, self.pending[: P.CHUNK])
            except BlockingIOError:
                self.agent.on_write(fd, self._flush_stdin)
                return
            except OSError:  # the reader is gone: drop what it will never read
                n = len(self.pending)
            del self.pending[:n]
            self.emit(P.ack(self.chan, n))
        self.agent.on_write(fd, None)
        if self.stdin_eof and self.tty:
            self.stdin_eof = False
            os.write(fd, b"\x04")  # ^D: the line discipline's end of input
        elif self.stdin_eof:
            os.close(fd)
            self.stdin_fd = None

    # control ----------------------------------------------------------------------
    def on_msg(self, m: Msg) -> None:
        op = m.get("op")
        if op in ("kill", "cancel"):
            self.kill()
        elif op == "signal" and self.status is None:
            try:
                os.kill(self.pid, int(m["sig"]))
            except ProcessLookupError:
                pass
        elif op == "resize" and self.tty:
            fd = next(iter(self.outs), None)
            if fd is not None:
                fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", m["rows"], m["cols"], 0, 0))

    def kill(self) -> None:
        try:
            with open(self.cg + "/cgroup.kill", "w") as f:
                f.write("1")
        except OSError:
            pass

    def reaped(self, status: int) -> None:
        self.status = status
        self.exited_at = time.monotonic()
        self.maybe_done()

    def tick(self, now: float) -> None:
        # A terminal's output ends when every holder closes it; a daemon keeping
        # the pty open must not keep the exec alive after its main process is gone.
        if self.tty and self.status is not None and self.outs and now - self.exited_at > 0.1:
            for fd in list(self.outs):
                self._close_out(fd)

    def maybe_done(self) -> None:
        if self.status is None or self.outs:
            return
        st = self.status
        sig = os.WTERMSIG(st) if os.WIFSIGNALED(st) else None
        code = 128 + sig if sig is not None else os.WEXITSTATUS(st)
        oom = False
        try:
            with open(self.cg + "/memory.events") as f:
                oom = any(ln.startswith("oom_kill ") and ln.split()[1] != "0" for ln in f)
        except OSError:
            pass
        if self.stdin_fd is not None:
            self.agent.on_write(self.stdin_fd, None)
            os.close(self.stdin_fd)
            self.stdin_fd = None
        self.emit(P.msg(self.chan, {"ev": "exit", "code": code, "signal": sig, "oom": oom}))
        self.agent.retire_cgroup(self.cg)
        self.agent.pids.pop(self.pid, None)
        self.close()

    def close(self) -> None:
        if self.status is None:  # channel cancelled (host gone): the process goes too
            self.kill()
        super().close()


class ReadFile(Channel):
    def __init__(self, agent: Agent, chan: int, path: str) -> None:
        super().__init__(agent, chan)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(errno.EISDIR if os.path.isdir(path) else errno.EINVAL, "not a regular file")
        self.fd = fd
        agent.producers.add(self)

    def produce(self) -> None:
        if self.credit <= 0:
            return
        chunk = os.read(self.fd, min(P.CHUNK, self.credit))
        self.credit -= len(chunk)
        self.emit(P.data(self.chan, P.OUT, chunk))
        if not chunk:
            self.emit(P.msg(self.chan, {"ev": "done"}))
            self.close()

    def close(self) -> None:
        self.agent.producers.discard(self)
        os.close(self.fd)
        super().close()


class WriteFile(Channel):
    def __init__(self, agent: Agent, chan: int, path: str, mode: int) -> None:
        super().__init__(agent, chan)
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        if os.path.islink(path):
            os.unlink(path)  # replace the link, never follow it
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        os.fchmod(self.fd, mode)
        self.size = 0

    def on_data(self, stream: int, payload: bytes) -> None:
        if not payload:
            self.emit(P.msg(self.chan, {"ev": "done", "size": self.size}))
            self.close()
            return
        view = memoryview(payload)
        try:
            while view:
                view = view[os.write(self.fd, view):]
        except OSError as exc:
            self.emit(P.msg(self.chan, error_event(exc)))
            self.close()
            return
        self.size += len(payload)
        self.emit(P.ack(self.chan, len(payload)))

    def close(self) -> None:
        os.close(self.fd)
        super().close()


class Connect(Channel):
    """A TCP connection to 127.0.0.1:port in the guest, relayed for preview."""

    def __init__(self, agent: Agent, chan: int, port: int) -> None:
        super().__init__(agent, chan)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.pending = bytearray()
        self.host_eof = False
        self.guest_eof = False
        err = self.sock.connect_ex(("127.0.0.1", port))
        if err not in (0, errno.EINPROGRESS):
            self.sock.close()
            raise OSError(err, os.strerror(err))
        self.fileno = self.sock.fileno()
        agent.on_write(self.fileno, self._connected)

    def _connected(self) -> None:
        self.agent.on_write(self.fileno, None)
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.emit(P.msg(self.chan, {"ev": "error", "errno": err, "message": os.strerror(err)}))
            self.close()
            return
        self.emit(P.msg(self.chan, {"ev": "connected"}))
        self.agent.on_read(self.fileno, self._readable)

    def _readable(self, fd: int) -> None:
        if self.credit <= 0:
            self._pause(fd)
            return
        try:
            chunk = self.sock.recv(min(P.CHUNK, self.credit))
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        self.credit -= len(chunk)
        self.emit(P.data(self.chan, P.OUT, chunk))
        if not chunk:
            self.guest_eof = True
            self.agent.on_read(fd, None)
            self._maybe_closed()

    def on_ack(self, n: int) -> None:
        if not self.guest_eof:
            super().on_ack(n)

    def on_data(self, stream: int, payload: bytes) -> None:
        if not payload:
            self.host_eof = True
        self.pending += payload
        self._flush()

    def _flush(self) -> None:
        while self.pending:
            try:
                n = self.sock.send(self.pending[: P.CHUNK])
            except BlockingIOError:
                self.agent.on_write(self.fileno, self._flush)
                return
            except OSError:
                n = len(self.pending)
            del self.pending[:n]
            self.emit(P.ack(self.chan, n))
        self.agent.on_write(self.fileno, None)
        if self.host_eof:
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            self._maybe_closed()

    def _maybe_closed(self) -> None:
        if self.host_eof and self.guest_eof and not self.pending:
            self.emit(P.msg(self.chan, {"ev": "done"}))
            self.close()

    def close(self) -> None:
        self.agent.on_read(self.fileno, None)
        self.agent.on_write(self.fileno, None)
        self.sock.close()
        super().close()


def error_event(exc: OSError) -> Msg:
    return {"ev": "error", "errno": exc.errno or 0, "message": exc.strerror or str(exc)}


class Agent:
    def __init__(self, port_fd: int) -> None:
        self.fd = port_fd
        self.sel = selectors.DefaultSelector()
        self.handlers: dict[int, list[Any]] = {}  # fd -> [on_read(fd), on_write()]
        self.parser = P.Parser()
        self.out = bytearray()
        self.chans: dict[int, Channel] = {}
        self.pids: dict[int, Exec] = {}
        self.producers: set[ReadFile] = set()
        self.retired: set[str] = set()
        self.config: Msg = {}
        self.connected = True
        self.gone_at = 0.0
        os.set_blocking(port_fd, False)
        self.on_read(port_fd, self._port_readable)
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        signal.set_wakeup_fd(w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.on_read(r, self._sigchld)

    # the selector: one read and one write callback per fd ---------------------------------
    def on_read(self, fd: int, cb: object) -> None:
        self._set(fd, 0, cb)

    def on_write(self, fd: int, cb: object) -> None:
        self._set(fd, 1, cb)

    def _set(self, fd: int, slot: int, cb: object) -> None:
        h = self.handlers.setdefault(fd, [None, None])
        h[slot] = cb
        mask = (selectors.EVENT_READ if h[0] else 0) | (selectors.EVENT_WRITE if h[1] else 0)
        registered = fd in self.sel.get_map()
        if not mask:
            del self.handlers[fd]
            if registered:
                self.sel.unregister(fd)
        elif registered:
            self.sel.modify(fd, mask)
        else:
            self.sel.register(fd, mask)

    # port I/O -------------------------------------------------------------------------
    def send(self, frame: bytes) -> None:
        self.out += frame
        if self.connected:
            self._flush_port()

    def _flush_port(self) -> None:
        while self.out:
            try:
                n = os.write(self.fd, self.out[: P.MAX_PAYLOAD])
            except BlockingIOError:
                self.on_write(self.fd, self._flush_port)
                return
            except OSError:
                return  # the host went away; the next read notices and resets
            del self.out[:n]
        self.on_write(self.fd, None)

    def _port_readable(self, fd: int) -> None:
        try:
            chunk = os.read(fd, 1 << 18)
        except BlockingIOError:
            return
        if not chunk:
            self._host_gone()
            return
        try:
            frames = self.parser.feed(chunk)
            for chan, kind, payload in frames:
                self._dispatch(chan, kind, payload)
        except (P.ProtocolError, ValueError) as exc:
            log(f"protocol error, dropping the connection state: {exc}")
            self._host_gone()

    def _host_gone(self) -> None:
        """The host closed the port (server restart, snapshot save): start afresh.

        Its requests died with it, so their processes and transfers end too.
        """
        self.connected = False
        self.gone_at = time.monotonic()
        self.on_read(self.fd, None)
        self.on_write(self.fd, None)
        self.parser = P.Parser()
        self.out = bytearray()
        for ch in list(self.chans.values()):
            ch.close()

    def _dispatch(self, chan: int, kind: int, payload: bytes) -> None:
        ch = self.chans.get(chan)
        if kind == P.MSG:
            m = P.decode_msg(payload)
            if ch is not None:
                ch.on_msg(m)
            elif "op" in m:
                self._request(chan, m)
        elif ch is None:
            return  # late frames for a finished channel
        elif kind == P.DATA:
            ch.on_data(payload[0], payload[1:])
        else:
            ch.on_ack(P.decode_ack(payload))

    def _request(self, chan: int, m: Msg) -> None:
        op = m["op"]
        try:
            if op == "exec":
                self.chans[chan] = Exec(self, chan, m)
                self.send(P.msg(chan, {"ev": "started"}))
            elif op == "read":
                self.chans[chan] = ReadFile(self, chan, m["path"])
            elif op == "write":
                self.chans[chan] = WriteFile(self, chan, m["path"], int(m.get("mode", 0o644)))
            elif op == "connect":
                self.chans[chan] = Connect(self, chan, int(m["port"]))
            elif op in ONE_SHOT:
                result = getattr(self, "op_" + op)(m)
                self.send(P.msg(chan, {"ev": "done", **result}))
            else:
                raise ValueError(f"unknown op {op!r}")
        except OSError as exc:
            self.send(P.msg(chan, error_event(exc)))
        except (KeyError, TypeError, ValueError) as exc:
            self.send(P.msg(chan, {"ev": "error", "errno": errno.EINVAL, "message": f"bad request: {exc!r}"}))

    # one-shot operations ----------------------------------------------------------------
    def op_init(self, m: Msg) -> Msg:
        """Make this VM distinct (after a snapshot restore) and set its limits."""
        self.config = m
        socket.sethostname(m["hostname"])
        time.clock_settime(time.CLOCK_REALTIME, float(m["time"]))
        seed = base64.b64decode(m["seed"])
        with open("/dev/urandom", "wb") as f:
            fcntl.ioctl(f, RNDADDENTROPY, struct.pack("ii", len(seed) * 8, len(seed)) + seed)
            fcntl.ioctl(f, RNDRESEEDCRNG)
        limits = {"memory.max": str(m["memory_mb"] << 20), "memory.swap.max": "0",
                  "pids.max": str(m["pids_limit"]), "cpu.max": f"{m['vcpus'] * 100000} 100000"}
        for name, value in limits.items():
            with open(f"{CG}/{name}", "w") as f:
                f.write(value)
        return {"kernel": os.uname().release}

    def op_ping(self, m: Msg) -> Msg:
        return {}

    def op_stats(self, m: Msg) -> Msg:
        def read(name: str) -> str:
            with open(f"{CG}/{name}") as f:
                return f.read()
        usage = next(int(ln.split()[1]) for ln in read("cpu.stat").splitlines() if ln.startswith("usage_usec"))
        limit = read("memory.max").strip()
        return {"cpu_usec": usage, "mem": int(read("memory.current")),
                "mem_limit": 0 if limit == "max" else int(limit), "pids": int(read("pids.current"))}

    def op_stat(self, m: Msg) -> Msg:
        return {"info": file_info(m["path"])}

    def op_list(self, m: Msg) -> Msg:
        path = m["path"]
        base = path.rstrip("/")
        return {"entries": [file_info(f"{base}/{n}") for n in sorted(os.listdir(path))]}

    def op_glob(self, m: Msg) -> Msg:
        return {"paths": sorted(glob.glob(m["pattern"]))}

    def op_move(self, m: Msg) -> Msg:
        os.lstat(m["src"])
        os.makedirs(os.path.dirname(m["dst"]), exist_ok=True)
        os.rename(m["src"], m["dst"])
        return {}

    def op_chmod(self, m: Msg) -> Msg:
        os.chmod(m["path"], int(m["mode"]))
        return {}

    def op_delete(self, m: Msg) -> Msg:
        path = m["path"]
        try:
            s = os.lstat(path)
        except FileNotFoundError:
            return {}
        if stat.S_ISDIR(s.st_mode):
            if not m.get("recursive"):
                raise OSError(errno.EISDIR, "is a directory (use recursive)")
            rmtree(path)
        else:
            os.unlink(path)
        return {}

    # children ---------------------------------------------------------------------------
    def _sigchld(self, fd: int) -> None:
        try:
            os.read(fd, 512)
        except BlockingIOError:
            pass
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            ex = self.pids.get(pid)
            if ex is not None:
                ex.reaped(status)  # anything else is an orphan, reaped for the kernel
        for cg in list(self.retired):
            try:
                os.rmdir(cg)
                self.retired.discard(cg)
            except OSError:
                pass

    def retire_cgroup(self, cg: str) -> None:
        """Remove an exec's cgroup once its last process (maybe a daemon) is gone."""
        try:
            os.rmdir(cg)
        except OSError:
            self.retired.add(cg)

    def run(self) -> None:
        # No hello: the host sends its first request ("ping" or "init") as soon
        # as it connects, and QEMU holds it until this port is open.
        while True:
            busy = any(p.credit > 0 for p in self.producers)
            waiting = not self.connected or any(ex.status is not None for ex in self.pids.values())
            timeout = 0 if busy else (0.05 if waiting else None)
            for key, ev in self.sel.select(timeout):
                h = self.handlers.get(key.fd)
                if h and ev & selectors.EVENT_READ and h[0]:
                    h[0](key.fd)
                h = self.handlers.get(key.fd)
                if h and ev & selectors.EVENT_WRITE and h[1]:
                    h[1]()
            for p in list(self.producers):
                p.produce()
            now = time.monotonic()
            for ex in list(self.pids.values()):
                ex.tick(now)
            if not self.connected and now - self.gone_at >= 0.05:
                # Poll for the next host: while none is connected the port reads EOF at once.
                self.connected = True
                self.on_read(self.fd, self._port_readable)


ONE_SHOT = {"init", "ping", "stats", "stat", "list", "glob", "move", "chmod", "delete"}


def main() -> None:
    if "--list-modules" in sys.argv:  # build time: which stdlib files the initramfs needs
        for mod in sorted(sys.modules.values(), key=lambda m: m.__name__):
            f = getattr(mod, "__file__", None)
            if f:
                print(f)
        return
    port = os.open(find_port(), os.O_RDWR | os.O_CLOEXEC)
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write("-1000")  # an OOM in the guest takes the hog, never the agent
    os.chroot(NEWROOT)
    os.chdir("/")
    with open("/sys/fs/cgroup/cgroup.subtree_control", "w") as f:
        f.write("+memory +pids +cpu")
    os.makedirs(CG, exist_ok=True)
    with open(f"{CG}/cgroup.subtree_control", "w") as f:
        f.write("+memory +pids +cpu")
    Agent(port).run()


if __name__ == "__main__":
    main()
