"""The microvm provider (QEMU microvm; TCG here) against the conformance suite, plus
what only a VM can show: its own kernel, distinct restored VMs, reattach after a
server restart, a crashed VM reported as such.

Guest assets are built once into /var/cache/stacyvm/microvm-assets (Debian
packages, about 10 s) and reused while the agent and packages are unchanged.
Snapshots are made per test session (one cold boot per shape).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from stacyvm_server.config import MicroVMConfig, NativeConfig, ServerConfig, Settings
from stacyvm_server.ids import new_sandbox_id
from stacyvm_server.providers.base import Provider, SandboxHandle, SandboxSpec
from stacyvm_server.providers.microvm.provider import MicroVMProvider
from stacyvm_server.providers.native import network, nft
from tests.providers.conformance import ProviderConformance, run, sh, wait_ended
from tests.providers.test_native_tty import TtyChecks

pytestmark = pytest.mark.asyncio(loop_scope="session")
ASSETS = Path("/var/cache/stacyvm/microvm-assets")


def microvm_settings(scratch: Path) -> Settings:
    return Settings(server=ServerConfig(data_dir=scratch / "data"),
                    native=NativeConfig(state_dir=scratch / "native-microvm"),
                    microvm=MicroVMConfig(enabled=True, state_dir=scratch / "microvm", assets_dir=ASSETS))


@pytest_asyncio.fixture(scope="class", loop_scope="session")
async def provider(native_scratch: Path, native_images: object) -> AsyncIterator[Provider]:
    if os.geteuid() != 0:
        pytest.skip("the microvm provider needs root (cgroups, network namespaces)")
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (scripts/install.sh --test installs it)")
    p = MicroVMProvider(microvm_settings(native_scratch), native_images)  # type: ignore[arg-type]
    await p.start()
    yield p
    for item in await p.inventory():
        await p.destroy(item.handle)
    await p.close()


def _mvm(p: Provider) -> MicroVMProvider:
    assert isinstance(p, MicroVMProvider)
    return p


class TestMicroVM(ProviderConformance):
    share_sandbox = True  # everything is emulated: one default sandbox per class
    # 20 cycles of restore + destroy; TCG makes each one ~0.5-1 s.
    leak_cycles = 20
    leak_budget_s = 120.0

    async def leaks(self, provider: Provider, sandbox_id: str) -> list[str]:
        found = _mvm(provider).leftovers(sandbox_id)
        if any(b[0] == network.host_ifname(sandbox_id) for b in await nft.list_bindings()):
            found.append("nft binding")
        if await asyncio.to_thread(qemu_pids, sandbox_id):
            found.append("qemu process")
        return found

    async def test_own_kernel(self, provider: Provider, sandbox: SandboxHandle) -> None:
        guest = (await run(provider, sandbox, ["uname", "-r"])).out.decode().strip()
        assert guest and guest != os.uname().release
        host_swappiness = Path("/proc/sys/vm/swappiness").read_text()
        new = "13" if host_swappiness.strip() != "13" else "17"
        r = await run(provider, sandbox, sh(f"echo {new} > /proc/sys/vm/swappiness && cat /proc/sys/vm/swappiness"))
        assert r.out.decode().strip() == new, r  # the guest kernel took the write...
        assert Path("/proc/sys/vm/swappiness").read_text() == host_swappiness  # ...the host's did not change

    async def test_restored_vms_are_distinct(self, provider: Provider, make_sandbox: object) -> None:
        a, b = await asyncio.gather(make_sandbox(), make_sandbox())  # type: ignore[operator]
        probe = "hostname; head -c 16 /dev/urandom | od -An -tx1; date +%s"
        ra, rb = await asyncio.gather(run(provider, a, sh(probe)), run(provider, b, sh(probe)))
        (ha, ea, ta), (hb, eb, tb) = (r.out.decode().split("\n")[:3] for r in (ra, rb))
        assert (ha, hb) == (a.sandbox_id, b.sandbox_id)
        assert ea != eb  # fresh entropy after restore, not the snapshot's RNG state
        assert abs(int(ta) - time.time()) < 30 and abs(int(tb) - time.time()) < 30  # clock set at restore
        await run(provider, a, sh("echo only-in-a > /marker"))
        assert (await run(provider, b, ["cat", "/marker"])).rc != 0  # its own disk overlay

    async def test_reattach_after_server_restart(self, provider: Provider, native_scratch: Path,
                                                 native_images: object, make_sandbox: object) -> None:
        h = await make_sandbox()  # type: ignore[operator]
        await run(provider, h, sh("echo kept > /state"))
        await provider.close()  # the old server goes away (its agent connections with it)
        second = MicroVMProvider(microvm_settings(native_scratch), native_images)  # type: ignore[arg-type]
        await second.start()
        item = next(i for i in await second.inventory() if i.sandbox_id == h.sandbox_id)
        assert item.alive and item.labels == {}
        assert (await run(second, item.handle, ["cat", "/state"])).out == b"kept\n"
        await second.close()
        assert (await run(provider, h, ["true"])).rc == 0  # and the first reconnects on demand

    async def test_dead_vm_is_reported(self, provider: Provider, image_ref: str) -> None:
        p = _mvm(provider)
        h = await p.create(SandboxSpec(new_sandbox_id(), image_ref, 64, 1))
        try:
            pid = int(p._meta(h.sandbox_id)["pid"])
            os.kill(pid, signal.SIGKILL)
            st = await wait_ended(p, h, 100, 0.05)
            assert (st.alive, st.reason) == (False, "crashed")
        finally:
            await p.destroy(h)
        assert await self.leaks(p, h.sandbox_id) == []

    async def test_disk_mb_caps_writes(self, provider: Provider, make_sandbox: object) -> None:
        h = await make_sandbox(disk_mb=32)  # type: ignore[operator]
        r = await run(provider, h, sh("dd if=/dev/zero of=/fill bs=1M count=200 2>&1; sync; "
                                      "ls -l /fill | awk '{print $5}'"))
        assert b"No space left" in r.out, r.out
        assert int(r.out.split()[-1]) < 100 << 20  # stopped near the cap, far from 200 MB
        await run(provider, h, ["rm", "/fill"])
        assert (await run(provider, h, sh("echo fine > /after && cat /after"))).out == b"fine\n"

    async def test_cache_trim_keeps_what_sandboxes_use(self, native_scratch: Path, native_images: object,
                                                       image_ref: str) -> None:
        """cache_max_mb 0: every disk and snapshot no sandbox uses goes when the cache grows
        and at start; what a live sandbox reads stays, and it keeps working."""
        settings = microvm_settings(native_scratch)
        settings.microvm.state_dir = native_scratch / "microvm-cache"
        settings.microvm.cache_max_mb = 0
        p = MicroVMProvider(settings, native_images)  # type: ignore[arg-type]
        await p.start()
        root = settings.microvm.state_dir
        made: list[SandboxHandle] = []

        def cached() -> tuple[set[str], set[str]]:
            return ({d.name for d in (root / "disks").glob("*m.ext4")},
                    {d.name for d in (root / "snapshots").iterdir()})

        async def spawn(disk_mb: int) -> SandboxHandle:
            h = await p.create(SandboxSpec(new_sandbox_id(), image_ref, 64, 1, disk_mb=disk_mb))
            made.append(h)
            return h

        try:
            a = await spawn(200)
            first = cached()
            assert len(first[0]) == 1 and len(first[1]) == 1  # in use by a: kept although over budget
            await p.destroy(a)
            b = await spawn(300)  # the cache grows: a's disk and snapshot are unused now
            second = cached()
            assert second[0].isdisjoint(first[0]) and second[1].isdisjoint(first[1]), (first, second)
            assert len(second[0]) == 1 and len(second[1]) == 1
            c = await spawn(300)  # restored from b's snapshot: nothing new, nothing removed
            assert cached() == second
            for h in (b, c):
                assert (await run(p, h, ["echo", "ok"])).out == b"ok\n"
            await p.destroy(b)
            await p.destroy(c)
            (root / "snapshots" / "deadbeef.building").mkdir()  # what a crash mid-build leaves
            await p.close()
            p = MicroVMProvider(settings, native_images)  # type: ignore[arg-type]
            await p.start()  # at start: nothing in use, budget 0
            assert cached() == (set(), set())
        finally:
            for h in made:
                await p.destroy(h)
            await p.close()
            shutil.rmtree(root, ignore_errors=True)


class TestMicroVMTty(TtyChecks):
    """Issue #6's terminal checks, as for native: the agent's pty in the guest."""

    share_sandbox = True


def qemu_pids(sandbox_id: str) -> list[int]:
    """Pids of QEMU processes running this sandbox's VM (their paths name its directory)."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                cmd = Path(f"/proc/{d}/cmdline").read_bytes()
            except OSError:
                continue
            if cmd.startswith(b"qemu-system") and f"/sandboxes/{sandbox_id}/".encode() in cmd:
                pids.append(int(d))
    return pids
