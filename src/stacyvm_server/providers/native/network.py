"""Per-sandbox network namespaces and routed veth pairs, without forking `ip`.

Why routed veths and not a bridge: on a bridge, sandbox-to-sandbox frames are
switched at layer 2 and never reach `table inet stacyvm` unless the host turns
on br_netfilter, a host-wide switch that also changes Docker's bridges. With a
point-to-point veth per sandbox every packet is routed by the host, so the one
inet table sees all of it. The sandbox gets `addr/32` and a default route via
the gateway address `onlink`; the host side carries the gateway address /32
and a /32 route back.

Namespaces are created by unshare(CLONE_NEWNET) in a short-lived thread and
bind-mounted at /run/netns/stacyvm-<id> (visible to `ip netns`). netns changes
are per thread, so the event loop's thread is never moved.

runc needs one more thing: `runc exec` joins the container's user namespace
before its netns, and a netns owned by the host user namespace cannot be
joined from inside the container's (EPERM). For runc the user namespace is
therefore made here too (`create_userns_netns`): a short-lived
`unshare --user --net` child, whose maps we write (0-65535 -> 100000-165535)
and whose two namespaces we bind-mount (/run/stacyvm/userns/stacyvm-<id> and
the usual netns path). The netns then belongs to the sandbox's user
namespace, so runc can also mount a fresh sysfs for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import ipaddress
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from stacyvm_server.errors import PortClosed, ProviderError
from stacyvm_server.providers.native import syscalls
from stacyvm_server.providers.native.nft import IF_PREFIX

NETNS_DIR = Path("/run/netns")
USERNS_DIR = Path("/run/stacyvm/userns")
ADDRESS_DIR = Path("/run/stacyvm/addresses")
SANDBOX_IF = "eth0"

T = TypeVar("T")


@dataclass(frozen=True)
class NetPlan:
    netns_path: str
    host_if: str = ""  # empty for network "none"
    address: str = ""
    gateway: str = ""


def netns_path(sandbox_id: str) -> str:
    return str(NETNS_DIR / f"stacyvm-{sandbox_id}")


def userns_path(sandbox_id: str) -> str:
    return str(USERNS_DIR / f"stacyvm-{sandbox_id}")


def host_ifname(sandbox_id: str) -> str:
    # IFNAMSIZ is 16: "svh" + 12 hex chars of a hash of the id.
    return IF_PREFIX + hashlib.sha256(sandbox_id.encode()).hexdigest()[:12]


class AddressPool:
    """Sandbox addresses from the subnet, reserved by O_EXCL marker files.

    Files survive a server restart and work across processes; the marker holds
    the sandbox id so a leak check can tell whose address it is.
    """

    def __init__(self, subnet: str, state_dir: Path) -> None:
        self.net = ipaddress.ip_network(subnet)
        self.dir = state_dir
        hosts = self.net.hosts()
        self.gateway = str(next(hosts))
        self._lock = threading.Lock()
        self._next = 0

    def allocate(self, sandbox_id: str) -> str:
        self.dir.mkdir(parents=True, exist_ok=True)
        size = self.net.num_addresses
        with self._lock:
            for i in range(size):
                offset = 2 + (self._next + i) % (size - 3)  # skip network, gateway, broadcast
                addr = str(self.net.network_address + offset)
                try:
                    fd = os.open(self.dir / addr, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
                except FileExistsError:
                    continue
                with os.fdopen(fd, "w") as f:
                    f.write(sandbox_id)
                self._next = offset - 1
                return addr
        raise ProviderError(f"no free address left in {self.net}")

    def release(self, addr: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.dir / addr).unlink()

    def owned_by(self, sandbox_id: str) -> list[str]:
        out = []
        for p in self.dir.glob("*") if self.dir.is_dir() else []:
            with contextlib.suppress(OSError):
                if p.read_text() == sandbox_id:
                    out.append(p.name)
        return out


def _in_thread(fn: Callable[[], T]) -> T:
    """Run fn in a fresh thread: a thread whose netns we move is thrown away."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["v"] = fn()
        except BaseException as exc:
            box["e"] = exc

    t = threading.Thread(target=target, name="stacyvm-netns")
    t.start()
    t.join()
    if "e" in box:
        raise box["e"]
    return box["v"]  # type: ignore[no-any-return,unused-ignore]


def create_netns(sandbox_id: str, plan: NetPlan, uid_shift: int | None = None, id_range: int = 65536) -> None:
    """Blocking. Make the netns, bring lo up, and wire the veth if plan has one.

    With uid_shift, the netns is owned by a new user namespace mapping
    0..id_range-1 to uid_shift.. (see the module docstring: runc).
    """
    _netns_dir_mounted()  # before any mount of ours lands in it
    if uid_shift is not None:
        create_userns_netns(sandbox_id, plan.netns_path, uid_shift, id_range)
    _in_thread(lambda: _create(sandbox_id, plan, existing=uid_shift is not None))


def create_userns_netns(sandbox_id: str, net_path: str, uid_shift: int, id_range: int) -> None:
    """Blocking. A user namespace and a netns it owns, bind-mounted at their paths."""
    import subprocess

    user_path = userns_path(sandbox_id)
    USERNS_DIR.mkdir(parents=True, exist_ok=True, mode=0o700)
    NETNS_DIR.mkdir(parents=True, exist_ok=True)
    for path in (user_path, net_path):
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDONLY, 0o444)
        os.close(fd)
    # The child prints a line once it runs inside both namespaces, then waits
    # for stdin to close; it never gets a mapping to anything but the range.
    child = subprocess.Popen(
        ["unshare", "--user", "--net", "--", "/bin/busybox", "sh", "-c", "echo ready; read x"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, close_fds=True,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        if child.stdout.readline() != b"ready\n":
            raise ProviderError(f"unshare --user --net failed for {sandbox_id} (rc {child.poll()})")
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{child.pid}/{name}", "w") as f:
                f.write(f"0 {uid_shift} {id_range}\n")
        syscalls.mount(f"/proc/{child.pid}/ns/user", user_path, None, syscalls.MS_BIND)
        syscalls.mount(f"/proc/{child.pid}/ns/net", net_path, None, syscalls.MS_BIND)
    finally:
        if child.stdin is not None:
            child.stdin.close()
        try:
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


_netns_dir_lock = threading.Lock()
_netns_dir_ready = False


def _netns_dir_mounted() -> None:
    """Make /run/netns a shared mount point of its own, as `ip netns add` does.

    Otherwise the first `ip netns add` on the host (any tool, any time) bind-mounts
    /run/netns onto itself and hides every netns we mounted there before it: their
    destroy then fails with EBUSY and the mounts leak.
    """
    global _netns_dir_ready
    if _netns_dir_ready:  # once per process: not a mount syscall and a lock per create
        return
    with _netns_dir_lock:  # two first creates must not stack two bind mounts
        if _netns_dir_ready:
            return
        NETNS_DIR.mkdir(parents=True, exist_ok=True)
        try:
            syscalls.mount("none", str(NETNS_DIR), None, syscalls.MS_SHARED | syscalls.MS_REC)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: not a mount point yet
                raise
            # MS_REC: netns files mounted here before (an earlier server) stay visible.
            syscalls.mount(str(NETNS_DIR), str(NETNS_DIR), None, syscalls.MS_BIND | syscalls.MS_REC)
            syscalls.mount("none", str(NETNS_DIR), None, syscalls.MS_SHARED | syscalls.MS_REC)
        _netns_dir_ready = True


def _create(sandbox_id: str, plan: NetPlan, existing: bool = False) -> None:
    from pyroute2 import IPRoute

    NETNS_DIR.mkdir(parents=True, exist_ok=True)
    path = plan.netns_path
    if not existing:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDONLY, 0o444)
        os.close(fd)
    host_ipr = IPRoute() if plan.host_if else None  # opened in the host netns
    try:
        if existing:
            nsfd = os.open(path, os.O_RDONLY)
            try:
                syscalls.setns(nsfd, syscalls.CLONE_NEWNET)  # this short-lived thread only
            finally:
                os.close(nsfd)
        else:
            syscalls.unshare(syscalls.CLONE_NEWNET)
            syscalls.mount(f"/proc/self/task/{threading.get_native_id()}/ns/net", path, None, syscalls.MS_BIND)
        with IPRoute() as ipr:  # opened in the new netns
            lo = ipr.link_lookup(ifname="lo")[0]
            ipr.link("set", index=lo, state="up")
            if host_ipr is None:
                return
            nsfd = os.open(path, os.O_RDONLY)
            try:
                host_ipr.link("add", ifname=plan.host_if, kind="veth",
                              peer={"ifname": SANDBOX_IF, "net_ns_fd": nsfd})
            finally:
                os.close(nsfd)
            hidx = host_ipr.link_lookup(ifname=plan.host_if)[0]
            host_ipr.addr("add", index=hidx, address=plan.gateway, prefixlen=32)
            host_ipr.link("set", index=hidx, state="up")
            host_ipr.route("add", dst=f"{plan.address}/32", oif=hidx, scope="link")
            sidx = ipr.link_lookup(ifname=SANDBOX_IF)[0]
            ipr.addr("add", index=sidx, address=plan.address, prefixlen=32)
            ipr.link("set", index=sidx, state="up")
            ipr.route("add", dst="0.0.0.0/0", gateway=plan.gateway, oif=sidx, flags=4)  # RTNH_F_ONLINK
    finally:
        if host_ipr is not None:
            host_ipr.close()


def destroy_netns(sandbox_id: str) -> None:
    """Blocking and idempotent: remove the host veth (its peer dies with it) and the netns."""
    _delete_link(host_ifname(sandbox_id))
    for path in (netns_path(sandbox_id), userns_path(sandbox_id)):
        try:
            syscalls.umount(path)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOENT):
                raise
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _delete_link(ifname: str) -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if idx:
            with contextlib.suppress(Exception):
                ipr.link("del", index=idx[0])


def host_links() -> list[str]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return [str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()]


def socket_in_netns(path: str) -> socket.socket:
    """Blocking. A TCP socket created inside the netns at `path` (preview connections).

    A socket belongs to the netns it was created in, whatever thread uses it later,
    so a short-lived thread enters the netns, makes the socket, and goes back to
    the original netns before it ends (the thread is discarded either way). Connect
    it to 127.0.0.1:port and it reaches the sandbox's loopback: no route, no NAT.
    """

    def make() -> socket.socket:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            target = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            os.close(own)
            raise
        try:
            syscalls.setns(target, syscalls.CLONE_NEWNET)
            try:
                return socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            finally:
                syscalls.setns(own, syscalls.CLONE_NEWNET)
        finally:
            os.close(target)
            os.close(own)

    return _in_thread(make)


async def connect_in_netns(path: str, port: int, sandbox_id: str,
                           ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to 127.0.0.1:port inside the netns at `path` (preview; native and docker).

    The socket is made by socket_in_netns, then connected by the event loop.
    Raises FileNotFoundError when `path` is gone, PortClosed when nothing listens.
    """
    sock = await asyncio.to_thread(socket_in_netns, path)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port)), 10)
    except (ConnectionRefusedError, TimeoutError) as exc:
        sock.close()
        why = "connection refused" if isinstance(exc, ConnectionRefusedError) else "connect timed out"
        raise PortClosed(
            f"nothing is listening on port {port} in sandbox {sandbox_id} ({why}): start a server there that "
            "binds 0.0.0.0 or 127.0.0.1"
        ) from None
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock, limit=256 * 1024)
