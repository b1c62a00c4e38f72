"""The docker provider against the conformance suite (runc, and runsc when it works through
Docker here), plus docker-specific checks: pulls, hardening, read-only root, adoption and leaks."""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from stacyvm_server.errors import BadRequest, ImageError, ImageNotFound
from stacyvm_server.ids import new_sandbox_id
from stacyvm_server.providers.base import ExecSpec, Provider, SandboxSpec
from stacyvm_server.providers.docker import DockerProvider
from stacyvm_server.providers.docker.provider import container_name
from tests.providers import docker_fixtures
from tests.providers.conformance import ProviderConformance, chunks_of, read_all, run, sh, wait_ended
from tests.providers.docker_fixtures import (
    DOCKER_BUSYBOX,
    DOCKER_PYTHON,
    destroy_everything,
    docker_api,
    labelled_containers,
    make_docker_provider,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")

# Fixtures shared with the docker API tests, made visible to this module.
docker_daemon = docker_fixtures.docker_daemon
docker_scratch = docker_fixtures.docker_scratch
docker_provider = docker_fixtures.docker_provider


# The conformance suite's fixtures, pointed at docker (these override tests/providers/conftest.py's).
@pytest_asyncio.fixture(scope="class", loop_scope="session")
async def provider(docker_provider: Provider) -> AsyncIterator[Provider]:
    yield docker_provider


@pytest.fixture(scope="session")
def image_ref(docker_daemon: None) -> str:
    return DOCKER_BUSYBOX


@pytest.fixture(scope="session")
def python_image_ref(docker_daemon: None) -> str:
    return DOCKER_PYTHON


def _docker(p: Provider) -> DockerProvider:
    assert isinstance(p, DockerProvider)
    return p


def _container_pids(container_id: str) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if container_id in Path(f"/proc/{name}/cgroup").read_text():
                    out.append(int(name))
            except OSError:
                pass
    return out


class DockerChecks(ProviderConformance):
    runtime = "runc"
    # The 200-cycle acceptance loop runs in parallel below (test_leak_200_parallel);
    # the suite's sequential loop stays short.
    leak_cycles = 30
    leak_budget_s = 60.0
    timing_rounds = 10

    async def leaks(self, provider: Provider, sandbox_id: str) -> list[str]:
        found = labelled_containers(f"stacyvm.sandbox_id={sandbox_id}")
        return [f"container {c[:12]}" for c in found]

    async def host_processes(self, provider: Provider, sandbox_id: str) -> list[str]:
        ids = labelled_containers(f"stacyvm.sandbox_id={sandbox_id}")
        comms = []
        for cid in ids:
            for pid in _container_pids(cid):
                try:
                    comms.append(Path(f"/proc/{pid}/comm").read_text().strip())
                except OSError:
                    pass
        return comms

    async def test_kill_leaves_no_sleep_behind(self, provider: Provider, sandbox: object) -> None:
        """The issue's proof: `sh -c 'sleep 1000 & sleep 1000'` killed leaves no sleep, seen from the host."""
        h = sandbox
        proc = await provider.exec(h, ExecSpec(argv=sh("sleep 1000 & sleep 1000")))  # type: ignore[arg-type]
        await self._wait_for_sleeps(provider, h, 2)  # type: ignore[arg-type]
        t0 = time.perf_counter()
        await proc.kill()
        st = await asyncio.wait_for(proc.wait(), 10)
        print(f"\ndocker+{self.runtime}: kill of a 2-sleep tree {1000 * (time.perf_counter() - t0):.0f} ms")
        assert st.exit_code == 137
        for _ in range(50):
            if "sleep" not in await self.host_processes(provider, h.sandbox_id):  # type: ignore[attr-defined]
                break
            await asyncio.sleep(0.05)
        assert "sleep" not in await self.host_processes(provider, h.sandbox_id)  # type: ignore[attr-defined]

    async def test_hardening(self, provider: Provider, sandbox: object) -> None:
        p = _docker(provider)
        h = sandbox
        info = docker_api("GET", f"/containers/{container_name(h.sandbox_id)}/json").json()  # type: ignore[attr-defined]
        hc = info["HostConfig"]
        assert hc["CapDrop"] == ["ALL"] and "SYS_ADMIN" not in hc["CapAdd"]
        assert "no-new-privileges:true" in hc["SecurityOpt"] and not hc["Privileged"]
        assert hc["Init"] is True and hc["PidsLimit"] == p._host_pids_limit(256, self.runtime)
        assert hc["Memory"] == hc["MemorySwap"] == 256 << 20 and hc["NanoCpus"] == 1_000_000_000
        assert hc["Runtime"] == self.runtime
        assert info["Config"]["Labels"]["stacyvm.sandbox_id"] == h.sandbox_id  # type: ignore[attr-defined]
        status = (await run(p, h, ["cat", "/proc/self/status"])).out.decode()  # type: ignore[arg-type]
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        assert int(fields["CapBnd"], 16) & (1 << 21) == 0  # no CAP_SYS_ADMIN
        assert int(fields["CapBnd"], 16) & (1 << 13) == 0  # no CAP_NET_RAW
        if self.runtime != "runsc":
            assert fields["NoNewPrivs"].strip() == "1" and fields["Seccomp"].strip() == "2"

    async def test_timings(self, provider: Provider, image_ref: str) -> None:
        c, e, d = [], [], []
        for _ in range(self.timing_rounds):
            t0 = time.perf_counter()
            h = await provider.create(SandboxSpec(new_sandbox_id(), image_ref, 64, 1))
            t1 = time.perf_counter()
            await run(provider, h, ["true"])
            t2 = time.perf_counter()
            await provider.destroy(h)
            t3 = time.perf_counter()
            c.append(t1 - t0)
            e.append(t2 - t1)
            d.append(t3 - t2)
        med = [statistics.median(x) * 1000 for x in (c, e, d)]
        print(f"\ndocker+{self.runtime}: create {med[0]:.0f} ms, exec true {med[1]:.0f} ms, "
              f"destroy {med[2]:.0f} ms")


class TestDockerRunc(DockerChecks):
    runtime = "runc"


class TestDockerCrun(DockerChecks):
    """crun through Docker: its execs are not session leaders, so kill and signal go by the
    exec's marker (process.kill_marked); everything else as with runc."""

    runtime = "crun"
    share_sandbox = True
    leak_cycles = 10
    timing_rounds = 3


async def _probe_runtime(p: DockerProvider) -> str:
    """Why this runtime cannot run a sandbox through Docker here ("" when it can)."""
    h = None
    try:
        h = await p.create(SandboxSpec(new_sandbox_id(), DOCKER_BUSYBOX, 64, 1))
        r = await asyncio.wait_for(run(p, h, ["true"]), 60)
        if r.rc != 0:
            return f"exec true exited {r.rc}: {r.err[-300:]!r}"
        proc = await p.exec(h, ExecSpec(argv=["sleep", "100"]))
        await asyncio.sleep(0.3)
        await proc.kill()
        try:
            st = await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            return "kill() did not end an exec within 5 s under this runtime"
        if st.exit_code != 137:
            return f"kill() of an exec does not work under this runtime (exit {st.exit_code})"
        return ""
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"[-500:]
    finally:
        if h is not None:
            await p.destroy(h)


class TestDockerRunsc(DockerChecks):
    """gVisor through Docker (daemon.json runtime `runsc --platform=ptrace`); skipped, with the
    reason printed, when it cannot run here."""

    runtime = "runsc"
    probe_runtime = staticmethod(_probe_runtime)
    share_sandbox = True
    limits_end_whole_sandbox = True
    leak_cycles = 10
    leak_budget_s = 90.0
    timing_rounds = 3

    # Seen failing once in a full run of this file ("Connection refused" from the upstream),
    # passing alone and in repeated partial runs. Not explained yet: kept running, but not
    # allowed to break main. (The isolation test's failure of that run was the test's own
    # race, an httpd asked before it listened; fixed in the conformance suite.)
    @pytest.mark.xfail(reason="docker+runsc bridge egress flaky in long runs (unexplained)", strict=False)
    async def test_network_bridge_egress_but_not_host(self, provider: Provider, make_sandbox: Any,
                                                      upstream_server: Any, host_server: Any) -> None:
        await super().test_network_bridge_egress_but_not_host(provider, make_sandbox, upstream_server, host_server)

    async def test_symlink_and_dotdot_escapes(self, provider: Provider, sandbox: object) -> None:
        pytest.skip("gVisor 0.0~20221219 bug inside the sandbox: a path through a symlink to / "
                    "(`ln -s / /rootlink; ls /rootlink/tmp`) lists / itself, so this test's in-sandbox "
                    "expectations fail; the host is not involved (runc runs the full test)")


# Docker-specific checks (runc) --------------------------------------------------------------
class TestDockerSpecific:
    runtime = "runc"

    async def test_unknown_image_is_404_and_refusal_is_image_error(self, provider: Provider) -> None:
        with pytest.raises(ImageNotFound):
            await provider.create(SandboxSpec(new_sandbox_id(), "127.0.0.1:5000/stacyvm/no-such-image:1", 64, 1))
        with pytest.raises(ImageError) as info:  # nothing listens on port 1: the registry refuses
            await provider.create(SandboxSpec(new_sandbox_id(), "127.0.0.1:1/stacyvm/busybox:1.35", 64, 1))
        assert not isinstance(info.value, ImageNotFound) and info.value.status == 400
        assert labelled_containers(f"stacyvm.instance={_docker(provider).instance}") == []

    async def test_concurrent_creates_pull_once(self, provider: Provider, monkeypatch: pytest.MonkeyPatch) -> None:
        p = _docker(provider)
        ref = DOCKER_BUSYBOX
        docker_api("DELETE", f"/images/{ref}", force="1")  # untag; running containers keep the layers
        pulls: list[str] = []
        real_pull = p._pull

        async def counting_pull(r: str) -> None:
            pulls.append(r)
            await real_pull(r)

        monkeypatch.setattr(p, "_pull", counting_pull)
        specs = [SandboxSpec(new_sandbox_id(), ref, 64, 1) for _ in range(4)]
        handles = await asyncio.gather(*(p.create(s) for s in specs))
        try:
            assert pulls == [ref]
        finally:
            await asyncio.gather(*(p.destroy(h) for h in handles))

    async def test_per_spawn_runtime_allowed_and_refused(self, docker_daemon: None, docker_scratch: Path) -> None:
        """docker.allowed_runtimes: a spawn may ask for runsc on a runc server; other runtimes are refused."""
        if "runsc" not in (docker_api("GET", "/info").json().get("Runtimes") or {}):
            pytest.skip("runsc is not registered in dockerd here (scripts/setup-docker.sh registers it)")
        p = _docker(await make_docker_provider(docker_scratch / "rt", allowed_runtimes=["runsc"]))
        try:
            assert p.runtimes == ("runc", "runsc")
            for refused in ("crun", "kata-runtime", "nope"):
                with pytest.raises(BadRequest, match=f"runtime '{refused}'"):
                    p.check_runtime(refused)
                with pytest.raises(BadRequest):
                    await p.create(SandboxSpec(new_sandbox_id(), DOCKER_BUSYBOX, 64, 1, runtime=refused))
            assert labelled_containers(f"stacyvm.instance={p.instance}") == []
            gv = await p.create(SandboxSpec(new_sandbox_id(), DOCKER_BUSYBOX, 64, 1, runtime="runsc"))
            rc = await p.create(SandboxSpec(new_sandbox_id(), DOCKER_BUSYBOX, 64, 1))
            for h, rt in ((gv, "runsc"), (rc, "runc")):
                assert h.data["runtime"] == rt
                info = docker_api("GET", f"/containers/{h.data['id']}/json").json()
                assert info["HostConfig"]["Runtime"] == rt and info["Config"]["Labels"]["stacyvm.runtime"] == rt
                assert info["HostConfig"]["PidsLimit"] == p._host_pids_limit(256, rt)
            # gVisor's own kernel answers inside the runsc sandbox; the host's inside the runc one.
            assert b"4.4.0" in (await run(p, gv, ["cat", "/proc/version"])).out
            assert b"4.4.0" not in (await run(p, rc, ["cat", "/proc/version"])).out
            # The runsc code paths follow the sandbox, not docker.runtime: writes by exec, in-sandbox kill.
            await p.write_file(gv, "/tmp/f.txt", chunks_of(b"written into gVisor"))
            assert (await run(p, gv, ["cat", "/tmp/f.txt"])).out == b"written into gVisor"
            proc = await p.exec(gv, ExecSpec(argv=sh("sleep 1000 & sleep 1000")))
            for _ in range(50):
                if (await run(p, gv, ["ps"])).out.decode().count("sleep 1000") == 2:
                    break
                await asyncio.sleep(0.1)
            await proc.kill()
            assert (await asyncio.wait_for(proc.wait(), 10)).exit_code == 137
            assert "sleep 1000" not in (await run(p, gv, ["ps"])).out.decode()
            inv = {i.sandbox_id: i.handle.data["runtime"] for i in await p.inventory()}
            assert inv == {gv.sandbox_id: "runsc", rc.sandbox_id: "runc"}  # from the stacyvm.runtime label
        finally:
            await destroy_everything(p)
            await p.close()
        assert labelled_containers(f"stacyvm.instance={p.instance}") == []

    async def test_allowed_runtime_not_in_dockerd_is_dropped(self, docker_daemon: None, docker_scratch: Path) -> None:
        registered = set(docker_api("GET", "/info").json().get("Runtimes") or {})
        if "kata-runtime" in registered:
            pytest.skip("kata-runtime is registered here")
        p = _docker(await make_docker_provider(docker_scratch / "rt2", allowed_runtimes=["kata-runtime"]))
        try:
            assert p.runtimes == ("runc",)
            with pytest.raises(BadRequest, match="not registered in dockerd"):
                p.check_runtime("kata-runtime")
        finally:
            await p.close()

    async def test_readonly_rootfs(self, docker_daemon: None, docker_scratch: Path) -> None:
        p = await make_docker_provider(docker_scratch / "ro", readonly_rootfs=True)
        try:
            h = await p.create(SandboxSpec(new_sandbox_id(), DOCKER_BUSYBOX, 64, 1))
            vols = [m["Name"] for m in docker_api("GET", f"/containers/{h.data['id']}/json").json()["Mounts"]
                    if m["Type"] == "volume"]
            assert len(vols) == 2
            assert (await run(p, h, sh("echo x > /etc/probe"))).rc != 0
            assert (await run(p, h, sh("echo x > /tmp/a && echo y > /workspace/b"))).rc == 0
            await p.write_file(h, "/workspace/sub/f.txt", chunks_of(b"through the archive API"))
            assert await read_all(p, h, "/workspace/sub/f.txt") == b"through the archive API"
            await p.destroy(h)
            for v in vols:  # anonymous volumes go with the container
                assert docker_api("GET", f"/volumes/{v}").status_code == 404
        finally:
            await destroy_everything(p)
            await p.close()

    async def test_inventory_after_restart_and_other_servers(self, provider: Provider,
                                                            docker_scratch: Path) -> None:
        p = _docker(provider)
        h = await p.create(SandboxSpec(new_sandbox_id(), DOCKER_BUSYBOX, 64, 1, labels={"owner": "bob"}))
        try:
            again = DockerProvider(p.settings)  # the same server after a restart
            other = await make_docker_provider(docker_scratch / "other")  # another server, same dockerd
            try:
                mine = {i.sandbox_id: i for i in await again.inventory()}
                assert mine[h.sandbox_id].labels == {"owner": "bob"} and mine[h.sandbox_id].alive
                assert (await run(again, mine[h.sandbox_id].handle, ["echo", "ok"])).out == b"ok\n"
                assert h.sandbox_id not in {i.sandbox_id for i in await other.inventory()}
            finally:
                await again.close()
                await other.close()
        finally:
            await p.destroy(h)

    async def test_state_reports_oom_and_exit(self, provider: Provider) -> None:
        p = _docker(provider)
        h = await p.create(SandboxSpec(new_sandbox_id(), DOCKER_BUSYBOX, 64, 1))
        try:
            docker_api("POST", f"/containers/{h.data['id']}/kill")
            st = await wait_ended(p, h, 100, 0.02)
            assert (st.alive, st.reason) == (False, "crashed")
            assert not {i.sandbox_id: i for i in await p.inventory()}[h.sandbox_id].alive
            r = await run(p, h, ["true"])  # like a runtime's exec into a stopped container
            assert r.rc == 126 and b"not running" in r.err
        finally:
            await p.destroy(h)

    async def test_leak_200_parallel(self, provider: Provider) -> None:
        """The acceptance loop: 200 create/destroy cycles, 4 at a time, leave no labelled container."""
        p = _docker(provider)
        before = set(labelled_containers())
        t0 = time.monotonic()
        sem = asyncio.Semaphore(4)

        async def cycle(i: int) -> None:
            async with sem:
                h = await p.create(SandboxSpec(new_sandbox_id(), DOCKER_BUSYBOX, 64, 1,
                                               network="bridge" if i % 4 == 0 else "none"))
                try:
                    if i % 10 == 0:
                        assert (await run(p, h, ["true"])).rc == 0
                finally:
                    await p.destroy(h)

        await asyncio.gather(*(cycle(i) for i in range(200)))
        took = time.monotonic() - t0
        print(f"\ndocker+runc: 200 create/destroy cycles (4 in parallel) in {took:.1f} s")
        assert set(labelled_containers()) <= before
        assert took < 90
