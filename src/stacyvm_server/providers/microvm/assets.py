"""Guest assets: kernel and initramfs, built reproducibly from Debian packages.

`stacyvm microvm build-assets` downloads the packages with `apt-get download`
(no host installation), unpacks them with `dpkg-deb -x`, and writes:

- `vmlinuz`: the kernel of `linux-image-cloud-amd64` (virtio drivers are modules);
- `initrd.img`: an uncompressed newc cpio (no decompression under TCG) holding
  busybox-static, the virtio modules in load order, our /init, and the agent
  with Debian's python3.11 interpreter, its libc and only the stdlib modules the
  agent imports (found by running the agent with `--list-modules` under that very
  interpreter), precompiled and without sources;
- `manifest.json`: package versions and a content hash (`assets_id`) that the
  snapshots are keyed on, so new assets never restore an old snapshot.

Operators may replace `vmlinuz` (for example with a PVM-enabled guest kernel for
KVM on PVM hosts) as long as it has virtio-mmio, virtio-blk, virtio-console and
ext4, built in or as the modules listed in MODULES.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

KERNEL_META = "linux-image-cloud-amd64"
PACKAGES = ["busybox-static", "python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib",
            "libc6", "zlib1g", "libexpat1"]
# insmod order matters: each needs the symbols of the ones before it.
MODULES = ["virtio_ring", "virtio", "virtio_mmio", "virtio_blk", "virtio_console",
           "failover", "net_failover", "virtio_net"]
PY = "usr/bin/python3.11"
LIBS = ["lib64/ld-linux-x86-64.so.2", "lib/x86_64-linux-gnu/libc.so.6", "lib/x86_64-linux-gnu/libm.so.6",
        "lib/x86_64-linux-gnu/libz.so.1", "lib/x86_64-linux-gnu/libexpat.so.1"]
BUSYBOX_APPLETS = ["sh", "mount", "insmod", "mkdir", "ip", "sleep", "echo", "cat", "poweroff"]
HERE = Path(__file__).parent

INIT = """#!/bin/sh
# StacyVM guest init: load virtio, mount the image disk, hand over to the agent.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in {modules}; do
    insmod /lib/modules/$m.ko 2>/dev/null || echo "stacyvm-init: insmod $m failed"
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 500 ]; do sleep 0.01; i=$((i+1)); done
mkdir -p /newroot
mount -t ext4 -o noatime /dev/vda /newroot || {{ echo "stacyvm-init: cannot mount the root disk"; poweroff -f; }}
for d in proc sys dev tmp; do mkdir -p /newroot/$d; done
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -t cgroup2 cgroup2 /newroot/sys/fs/cgroup
mount -t devtmpfs devtmpfs /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts -o ptmxmode=0666 devpts /newroot/dev/pts
mount -t tmpfs -o mode=1777 tmpfs /newroot/dev/shm
# Overcommit like a large host does: a big allocation then meets the sandbox's
# memory cgroup (an OOM kill, reason "oom"), not the guest's small RAM (ENOMEM).
echo 1 > /proc/sys/vm/overcommit_memory
ip link set lo up
if [ -e /sys/class/net/eth0 ]; then
    # QEMU user-mode networking: fixed guest address, gateway and DNS.
    ip link set eth0 up
    ip addr add 10.0.2.15/24 dev eth0
    ip route add default via 10.0.2.2
    mkdir -p /newroot/etc && echo "nameserver 10.0.2.3" > /newroot/etc/resolv.conf
fi
exec /usr/bin/python3.11 -E -s -S /stacyvm/agent.pyc
"""


@dataclass(frozen=True)
class Assets:
    kernel: Path
    initrd: Path
    assets_id: str
    kernel_release: str


def load(dest: Path) -> Assets | None:
    try:
        m = json.loads((dest / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    a = Assets(dest / "vmlinuz", dest / "initrd.img", m["assets_id"], m["kernel_release"])
    return a if a.kernel.is_file() and a.initrd.is_file() and m.get("agent") == agent_hash() else None


def agent_hash() -> str:
    h = hashlib.sha256()
    for name in ("agent.py", "protocol.py", "assets.py"):
        h.update((HERE / name).read_bytes())
    return h.hexdigest()[:16]


def build(dest: Path, log: Callable[[str], None] = print, force: bool = False) -> Assets:
    """Build (or reuse) the assets in `dest`. Blocking; about 10 s with a warm apt cache."""
    if not force and (have := load(dest)) is not None:
        return have
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="stacyvm-assets-", dir=dest) as tmp:
        work = Path(tmp)
        kernel_pkg = _kernel_package()
        debs = work / "debs"
        debs.mkdir()
        log(f"downloading {kernel_pkg} {' '.join(PACKAGES)}")
        _run(["apt-get", "download", "-q", kernel_pkg, *PACKAGES], cwd=debs)
        tree = work / "tree"
        versions = {}
        for deb in sorted(debs.glob("*.deb")):
            _run(["dpkg-deb", "-x", str(deb), str(tree)])
            name, version = _run(["dpkg-deb", "-f", str(deb), "Package", "Version"]).split("\n")[:2]
            versions[name.split(": ", 1)[1]] = version.split(": ", 1)[1]
        release = next((tree / "lib/modules").iterdir()).name
        initrd_root = work / "initrd"
        _assemble_initrd(tree, initrd_root, release)
        shutil.copy2(next((tree / "boot").glob("vmlinuz-*")), work / "vmlinuz")
        write_cpio(initrd_root, work / "initrd.img")
        h = hashlib.sha256()
        for f in ("vmlinuz", "initrd.img"):
            h.update(hashlib.sha256((work / f).read_bytes()).digest())
        manifest = {"assets_id": h.hexdigest()[:16], "kernel_release": release, "agent": agent_hash(),
                    "packages": versions}
        for f in ("vmlinuz", "initrd.img"):
            os.replace(work / f, dest / f)
        (dest / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"assets in {dest}: kernel {release}, id {manifest['assets_id']}")
    a = load(dest)
    assert a is not None
    return a


def _kernel_package() -> str:
    out = _run(["apt-cache", "depends", KERNEL_META])
    for line in out.splitlines():
        dep = line.strip().removeprefix("Depends: ")
        if dep.startswith("linux-image-") and dep != KERNEL_META:
            return dep
    raise RuntimeError(f"cannot resolve {KERNEL_META}: {out!r}")


def _assemble_initrd(tree: Path, root: Path, release: str) -> None:
    for d in ("bin", "dev", "proc", "sys", "newroot", "lib/modules", "stacyvm"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(tree / "bin/busybox", root / "bin/busybox")
    for applet in BUSYBOX_APPLETS:
        os.symlink("busybox", root / "bin" / applet)
    kmods = tree / "lib/modules" / release / "kernel"
    for m in MODULES:
        found = list(kmods.rglob(f"{m}.ko"))
        if len(found) != 1:
            raise RuntimeError(f"module {m}.ko not found once in {kmods}: {found}")
        shutil.copy2(found[0], root / "lib/modules" / f"{m}.ko")
    for rel in [PY, *LIBS]:
        src = tree / rel
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src.resolve(), root / rel)
    init = root / "init"
    init.write_text(INIT.format(modules=" ".join(MODULES)))
    init.chmod(0o755)
    # The stdlib files the agent loads, found by running it under the guest's interpreter.
    for name in ("agent.py", "protocol.py"):
        shutil.copy2(HERE / name, root / "stacyvm" / name)
    py = [str(tree / LIBS[0]), "--library-path", f"{tree}/lib/x86_64-linux-gnu:{tree}/usr/lib/x86_64-linux-gnu",
          str(tree / PY), "-E", "-s", "-S"]
    listing = _run([*py, str(root / "stacyvm/agent.py"), "--list-modules"])
    stdlib = tree / "usr/lib/python3.11"
    for line in listing.splitlines():
        f = Path(line)
        if f.is_relative_to(stdlib):
            target = root / "usr/lib/python3.11" / f.relative_to(stdlib)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)
    # Sourceless, precompiled: nothing to compile at boot under TCG.
    _run([*py, "-m", "compileall", "-q", "-b", "-d", "/", str(root / "usr/lib/python3.11"), str(root / "stacyvm")])
    for src in [*root.joinpath("usr/lib/python3.11").rglob("*.py"), *root.joinpath("stacyvm").glob("*.py")]:
        src.unlink()


def write_cpio(root: Path, out: Path) -> None:
    """An uncompressed newc archive of `root` (what the kernel unpacks as initramfs)."""
    ino = 1

    def entry(f: object, name: str, st: os.stat_result, data: bytes) -> None:
        nonlocal ino
        fields = [ino, st.st_mode, 0, 0, 1, int(st.st_mtime), len(data), 0, 0, 0, 0, len(name) + 1, 0]
        ino += 1
        hdr = b"070701" + b"".join(b"%08X" % v for v in fields) + name.encode() + b"\0"
        f.write(hdr + b"\0" * (-len(hdr) % 4) + data + b"\0" * (-len(data) % 4))  # type: ignore[attr-defined]

    with open(out, "wb") as f:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for n in sorted([*dirnames, *filenames]):
                p = Path(dirpath) / n
                st = os.lstat(p)
                rel = str(p.relative_to(root))
                if stat.S_ISLNK(st.st_mode):
                    entry(f, rel, st, os.readlink(p).encode())
                elif stat.S_ISREG(st.st_mode):
                    entry(f, rel, st, p.read_bytes())
                else:
                    entry(f, rel, st, b"")
        trailer = os.stat_result((0,) * 10)
        entry(f, "TRAILER!!!", trailer, b"")


def _run(argv: list[str], cwd: Path | None = None) -> str:
    r = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    return r.stdout
