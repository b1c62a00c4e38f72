"""The OCI runtime config (config.json) for a sandbox, built in code.

Every hardening choice is made here, once, and is the same for crun, runc and
runsc. See docs/native-provider.md for the reasoning behind each one.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from typing import Any

from stacyvm_server.providers.native.seccomp import default_profile

# Container uid/gid 0 is this host id; the range is this long. The image store
# shifts the rootfs ownership by the same amount, so files look right inside.
UID_SHIFT = 100000
UID_RANGE = 65536

# Where the host's static helpers appear inside every sandbox (read-only binds).
HELPER_DIR = "/.stacyvm"
TINI = f"{HELPER_DIR}/tini"
BUSYBOX = f"{HELPER_DIR}/busybox"
HOST_TINI = "/usr/bin/tini-static"
HOST_BUSYBOX = "/bin/busybox"

# Capabilities kept (inside the user namespace only; they mean nothing on the host):
KEPT_CAPS = (
    "CAP_CHOWN",  # package managers and tar chown files they unpack
    "CAP_DAC_OVERRIDE",  # root in the sandbox may read/write any file of the sandbox
    "CAP_FOWNER",  # chmod/utime on files owned by other sandbox users
    "CAP_FSETID",  # keep setgid bits when root writes files (dpkg, cp -p)
    "CAP_KILL",  # root may signal processes of other sandbox users
    "CAP_SETUID",  # su/sudo/gosu/setpriv: switch to an unprivileged user
    "CAP_SETGID",  # same, for groups
    "CAP_SETPCAP",  # lets a process drop caps from its bounding set before exec
    "CAP_NET_BIND_SERVICE",  # servers on ports < 1024 (only inside the sandbox netns)
    "CAP_SYS_CHROOT",  # some build/package scripts chroot; harmless in our mount ns
)
# Dropped on purpose (a selection): SYS_ADMIN (mounts, namespaces), NET_ADMIN
# (routes/addresses: anti-spoofing), NET_RAW (raw sockets, ARP/ICMP spoofing),
# MKNOD (device nodes), SYS_PTRACE (cross-process inspection beyond the default
# same-uid rules), SYS_MODULE, SYS_TIME, SYS_RESOURCE, AUDIT_*, SETFCAP, BPF, PERFMON.

# runc's defaults: kernel data that leaks host information or allows host changes.
MASKED_PATHS = (
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
    "/sys/firmware", "/sys/devices/virtual/powercap",
)
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")

# Default-deny device access; only the usual pseudo devices (runc's default list).
_DEVICES_ALLOWED = (
    ("c", 1, 3), ("c", 1, 5), ("c", 1, 7), ("c", 1, 8), ("c", 1, 9),  # null zero full random urandom
    ("c", 5, 0), ("c", 5, 1), ("c", 5, 2), ("c", 136, -1),  # tty console ptmx pts/*
)

PATH_DEFAULT = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class BundleParams:
    sandbox_id: str
    rootfs: str  # merged overlay dir (absolute host path)
    netns_path: str
    cgroups_path: str
    memory_mb: int
    vcpus: int
    pids_limit: int
    env: list[str]  # "KEY=value", init's environment
    # False only for runsc: its Debian build cannot start with a user namespace
    # in the spec; gVisor's Sentry is the isolation boundary there.
    user_namespace: bool = True
    # runc: join this user namespace (made by network.create_userns_netns; it
    # owns the netns) instead of creating one; /sys is then a fresh sysfs.
    userns_path: str | None = None
    # A sysfs of the sandbox's own instead of a read-only bind of the host's:
    # runc (with userns_path) and runsc (gVisor's own sysfs; a bind would
    # show the host's /sys through the gofer).
    fresh_sysfs: bool = False
    # runsc only: bind the rootfs's own /tmp over /tmp. Without a /tmp mount in
    # the spec runsc mounts a Sentry-internal tmpfs there, and files the API
    # writes to /tmp (on the host overlay) would be invisible inside.
    tmp_bind: str | None = None


def rlimits() -> list[dict[str, Any]]:
    """Explicit limits; never above the server's own hard limits.

    This host lacks CAP_SYS_RESOURCE, so asking for more than the hard limit
    makes the runtime fail (host-notes §5). RLIMIT_NPROC is counted per host
    uid and every sandbox shares uid 100000, so it is no per-sandbox limit: the
    pids cgroup is. We pass the host hard value through.
    """
    nofile_hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nofile_hard = 1048576 if nofile_hard == resource.RLIM_INFINITY else min(nofile_hard, 1048576)
    nproc_hard = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    nproc_hard = 1048576 if nproc_hard == resource.RLIM_INFINITY else nproc_hard
    return [
        {"type": "RLIMIT_NOFILE", "soft": min(1024, nofile_hard), "hard": nofile_hard},
        {"type": "RLIMIT_NPROC", "soft": nproc_hard, "hard": nproc_hard},
        {"type": "RLIMIT_CORE", "soft": 0, "hard": 0},  # no core dumps filling the upper dir
    ]


def process(
    args: list[str], env: list[str], cwd: str, uid: int, gid: int, tty_size: tuple[int, int] | None = None
) -> dict[str, Any]:
    """The OCI process object; also used for `exec --process`.

    With tty_size (rows, cols) the process gets a pseudo-terminal of that size
    as its stdio and controlling terminal (the runtime needs a console socket).
    """
    caps = list(KEPT_CAPS)
    extra: dict[str, Any] = {}
    if tty_size is not None:
        extra["consoleSize"] = {"height": tty_size[0], "width": tty_size[1]}
    return {
        **extra,
        "terminal": tty_size is not None,
        "user": {"uid": uid, "gid": gid},
        "args": args,
        "env": env,
        "cwd": cwd or "/",
        "capabilities": {
            "bounding": caps,
            "effective": caps if uid == 0 else [],
            "permitted": caps if uid == 0 else [],
            "inheritable": [],
            "ambient": [],
        },
        "rlimits": rlimits(),
        # setuid binaries and file caps can never raise privileges.
        "noNewPrivileges": True,
    }


def _mounts(fresh_sysfs: bool = False, tmp_bind: str | None = None) -> list[dict[str, Any]]:
    nsd = ["nosuid", "noexec", "nodev"]
    if fresh_sysfs:
        # The netns belongs to the sandbox's user namespace: a sysfs of its own.
        sys_mount = {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["ro", *nsd]}
    else:
        # sysfs cannot be mounted: our netns belongs to the host user namespace.
        # A non-recursive read-only bind shows /sys without any of the host's
        # sub-mounts (cgroupfs, debugfs, ...); the sandbox's own cgroups come next.
        sys_mount = {"destination": "/sys", "type": "bind", "source": "/sys", "options": ["bind", "ro", *nsd]}
    return [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": nsd},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": [*nsd, "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": nsd},
        sys_mount,
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": [*nsd, "relatime", "ro"]},
        {"destination": "/run", "type": "tmpfs", "source": "tmpfs", "options": [*nsd, "mode=755"]},
        # Host static helpers: tini as PID 1 (reaps zombies) and busybox for the
        # keepalive, so the sandbox needs nothing from the image to stay up.
        {"destination": TINI, "type": "bind", "source": HOST_TINI, "options": ["bind", "ro", "nosuid", "nodev"]},
        {"destination": BUSYBOX, "type": "bind", "source": HOST_BUSYBOX,
         "options": ["bind", "ro", "nosuid", "nodev"]},
        *([{"destination": "/tmp", "type": "bind", "source": tmp_bind, "options": ["bind", "rw", "nodev"]}]
          if tmp_bind else []),
    ]


def build_config(p: BundleParams) -> dict[str, Any]:
    mem = p.memory_mb * 1024 * 1024
    period = 100000
    init_args = [TINI, "-s", "--", BUSYBOX, "sleep", "infinity"]
    namespaces: list[dict[str, str]] = [
        {"type": "pid"},
        {"type": "ipc"},
        {"type": "uts"},
        {"type": "mount"},
        {"type": "cgroup"},
        # We create the netns ourselves so network teardown stays ours.
        {"type": "network", "path": p.netns_path},
    ]
    idmaps: dict[str, Any] = {}
    if p.user_namespace:
        namespaces.append({"type": "user", "path": p.userns_path} if p.userns_path else {"type": "user"})
        idmaps = {
            "uidMappings": [{"containerID": 0, "hostID": UID_SHIFT, "size": UID_RANGE}],
            "gidMappings": [{"containerID": 0, "hostID": UID_SHIFT, "size": UID_RANGE}],
        }
    return {
        "ociVersion": "1.0.2",
        "process": process(init_args, p.env, "/", 0, 0),
        "root": {"path": p.rootfs, "readonly": False},
        "hostname": p.sandbox_id.replace("_", "-"),  # "_" is not valid in a hostname
        "mounts": _mounts(p.fresh_sysfs, p.tmp_bind),
        "linux": {
            **idmaps,
            "namespaces": namespaces,
            "cgroupsPath": p.cgroups_path,
            "resources": {
                "devices": [{"allow": False, "access": "rwm"}]
                + [
                    {"allow": True, "type": t, "major": ma, "minor": mi, "access": "rwm"}
                    if mi >= 0
                    else {"allow": True, "type": t, "major": ma, "access": "rwm"}
                    for t, ma, mi in _DEVICES_ALLOWED
                ],
                # swap == limit: the sandbox cannot escape its limit into swap.
                "memory": {"limit": mem, "swap": mem},
                "pids": {"limit": p.pids_limit},
                "cpu": {"quota": p.vcpus * period, "period": period},
            },
            "seccomp": default_profile(),
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
            "rootfsPropagation": "private",
        },
    }
