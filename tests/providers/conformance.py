"""The shared provider conformance suite.

Subclass `ProviderConformance` in a `test_<provider>.py` and make the fixtures
`provider`, `image_ref` (a busybox image), `python_image_ref`, `make_sandbox`
and `sandbox` resolve for it (see tests/providers/conftest.py). Optional hooks:
`leaks(provider, sandbox_id)` and `host_processes(provider, sandbox_id)` let a
provider prove that nothing is left on the host.

Every test asserts observable behaviour through the Provider contract only.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import resource
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from stacyvm_server.errors import SandboxFileError
from stacyvm_server.ids import new_sandbox_id
from stacyvm_server.providers.base import ExecSpec, ExitStatus, Provider, RuntimeState, SandboxHandle, SandboxSpec

pytestmark = pytest.mark.asyncio(loop_scope="session")

MakeSandbox = Callable[..., Awaitable[SandboxHandle]]


@dataclass
class Result:
    rc: int
    out: bytes
    err: bytes
    status: ExitStatus


def sh(cmd: str) -> list[str]:
    return ["/bin/sh", "-c", cmd]


async def run(
    provider: Provider, h: SandboxHandle, argv: list[str], stdin: bytes | None = None, timeout: float = 60,
    **kw: Any,
) -> Result:
    proc = await provider.exec(h, ExecSpec(argv=argv, stdin=stdin is not None, **kw))
    out, err = bytearray(), bytearray()

    async def drain() -> None:
        async for name, chunk in proc.output():
            (out if name == "stdout" else err).extend(chunk)

    if stdin is not None:
        await proc.write_stdin(stdin)
        await proc.close_stdin()
    try:
        await asyncio.wait_for(drain(), timeout)
    except TimeoutError:
        await proc.kill()
        raise
    status = await proc.wait()
    return Result(status.exit_code, bytes(out), bytes(err), status)


async def fetch(provider: Provider, h: SandboxHandle, addr: str, port: int, path: str = "/",
                timeout: int = 2) -> Result:
    """HTTP GET from inside the sandbox with busybox nc (busybox-static wget segfaults on lookup)."""
    req = f"printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' | nc -w {timeout} {addr} {port}"
    return await run(provider, h, sh(req))


async def wait_ended(provider: Provider, h: SandboxHandle, tries: int, delay: float) -> RuntimeState:
    """Ask state() until the sandbox is no longer alive (at most `tries` times); the last answer."""
    for _ in range(tries):
        st = await provider.state(h)
        if not st.alive:
            break
        await asyncio.sleep(delay)
    return st


async def chunks_of(data: bytes, size: int = 65536) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def read_all(provider: Provider, h: SandboxHandle, path: str) -> bytes:
    return b"".join([c async for c in provider.read_file(h, path)])


class ProviderConformance:
    # Set by providers whose memory and pids limits bound the whole sandbox as
    # one host-side unit (gVisor: the cgroup holds the Sentry, not the
    # application's processes): hitting a limit then ends the sandbox, and the
    # tests assert that instead of "only the offender dies".
    limits_end_whole_sandbox = False
    # The leak loop: how many create/destroy cycles, within how many seconds
    # (slow runtimes shorten it; the acceptance run is 200 on crun).
    leak_cycles = 200
    leak_budget_s = 60.0

    # hooks ----------------------------------------------------------------------------
    async def leaks(self, provider: Provider, sandbox_id: str) -> list[str]:
        """Host resources still held for a destroyed sandbox (override per provider)."""
        return []

    async def host_processes(self, provider: Provider, sandbox_id: str) -> list[str]:
        """Command names of the sandbox's processes as the host sees them."""
        return []

    # lifecycle ------------------------------------------------------------------------
    async def test_lifecycle(self, provider: Provider, image_ref: str) -> None:
        sid = new_sandbox_id()
        spec = SandboxSpec(sid, image_ref, memory_mb=128, vcpus=1, labels={"owner": "alice", "k": "v"})
        h = await provider.create(spec)
        try:
            assert (await provider.state(h)).alive
            inv = {i.sandbox_id: i for i in await provider.inventory()}
            assert inv[sid].alive and inv[sid].labels == {"owner": "alice", "k": "v"}
            assert (await run(provider, h, ["true"])).rc == 0
            assert (await provider.health()).healthy
        finally:
            await provider.destroy(h)
        await provider.destroy(h)  # idempotent
        assert not (await provider.state(h)).alive
        assert sid not in {i.sandbox_id for i in await provider.inventory()}
        assert await self.leaks(provider, sid) == []

    async def test_inventory_handle_is_usable(self, provider: Provider, sandbox: SandboxHandle) -> None:
        # After a server restart core only has what inventory() returns.
        item = next(i for i in await provider.inventory() if i.sandbox_id == sandbox.sandbox_id)
        assert (await run(provider, item.handle, ["echo", "adopted"])).out == b"adopted\n"

    # exec ---------------------------------------------------------------------------
    async def test_exit_codes_and_streams(self, provider: Provider, sandbox: SandboxHandle) -> None:
        r = await run(provider, sandbox, sh("echo out; echo err >&2; exit 7"))
        assert (r.rc, r.out, r.err) == (7, b"out\n", b"err\n")
        r = await run(provider, sandbox, sh("kill -9 $$"))
        assert r.rc == 137 and r.status.signal == 9
        r = await run(provider, sandbox, sh("kill -TERM $$"))
        assert r.rc == 143
        r = await run(provider, sandbox, ["/no/such/binary"])
        assert r.rc != 0

    async def test_argv_env_workdir_user(self, provider: Provider, sandbox: SandboxHandle) -> None:
        r = await run(provider, sandbox, ["printf", "[%s]", "a b", "'c'", "$HOME", ""])
        assert r.out == b"[a b]['c'][$HOME][]"
        r = await run(provider, sandbox, sh('echo "$FOO|$BAR"'), env={"FOO": "x y", "BAR": "=z"})
        assert r.out == b"x y|=z\n"
        assert b"/usr/bin" in (await run(provider, sandbox, sh("echo $PATH"))).out
        await run(provider, sandbox, ["mkdir", "-p", "/work dir"])
        assert (await run(provider, sandbox, ["pwd"], workdir="/work dir")).out == b"/work dir\n"
        assert (await run(provider, sandbox, ["id", "-u"], user="65534")).out == b"65534\n"
        assert (await run(provider, sandbox, ["id", "-u"], user="nobody")).out == b"65534\n"
        assert (await run(provider, sandbox, ["id", "-u"])).out == b"0\n"

    async def test_stdin(self, provider: Provider, sandbox: SandboxHandle) -> None:
        data = bytes(range(256)) * 1000
        r = await run(provider, sandbox, ["sha256sum"], stdin=data)
        assert r.out.split()[0].decode() == hashlib.sha256(data).hexdigest()

    async def test_streams_output_as_it_arrives(self, provider: Provider, sandbox: SandboxHandle) -> None:
        proc = await provider.exec(sandbox, ExecSpec(argv=sh("echo first; sleep 2; echo second")))
        t0 = time.monotonic()
        it = proc.output().__aiter__()
        name, chunk = await it.__anext__()
        assert (name, chunk) == ("stdout", b"first\n")
        assert time.monotonic() - t0 < 1.5
        rest = b"".join([c async for _, c in it])
        assert rest == b"second\n" and (await proc.wait()).exit_code == 0

    async def test_kill_takes_the_whole_tree(self, provider: Provider, sandbox: SandboxHandle) -> None:
        proc = await provider.exec(sandbox, ExecSpec(argv=sh("sleep 1000 & sleep 1001 & sleep 1002")))
        await self._wait_for_sleeps(provider, sandbox, 3)
        # A caller-side timeout: give up waiting, then kill.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(proc.wait()), 0.3)
        t0 = time.monotonic()
        await proc.kill()
        status = await asyncio.wait_for(proc.wait(), 10)
        assert status.exit_code == 137 and time.monotonic() - t0 < 5
        await proc.kill()  # idempotent
        await self._wait_for_sleeps(provider, sandbox, 0)
        assert not [c for c in await self.host_processes(provider, sandbox.sandbox_id) if c == "sleep"]

    async def test_kill_spares_other_execs(self, provider: Provider, sandbox: SandboxHandle) -> None:
        keep = await provider.exec(sandbox, ExecSpec(argv=["sleep", "77"]))
        victim = await provider.exec(sandbox, ExecSpec(argv=sh("sleep 88 & sleep 89")))
        await self._wait_for_sleeps(provider, sandbox, 3)
        await victim.kill()
        await victim.wait()
        ps = (await run(provider, sandbox, ["ps", "-o", "args"])).out.decode()
        assert "sleep 77" in ps and "sleep 88" not in ps and "sleep 89" not in ps
        await keep.kill()
        assert (await keep.wait()).exit_code == 137

    async def _wait_for_sleeps(self, provider: Provider, h: SandboxHandle, n: int) -> None:
        for _ in range(100):
            ps = (await run(provider, h, ["ps", "-o", "comm"])).out.split()
            if ps.count(b"sleep") == n:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"expected {n} sleep processes, ps shows {ps!r}")

    async def test_no_zombies(self, provider: Provider, sandbox: SandboxHandle) -> None:
        # Orphans of an exec are reparented to the sandbox init, which must reap them.
        await run(provider, sandbox, sh("for i in 1 2 3 4 5; do (sleep 0.1 &) ; done"))
        await asyncio.sleep(0.5)
        stat = (await run(provider, sandbox, ["ps", "-o", "stat"])).out.decode()
        assert "Z" not in stat

    async def test_logs(self, provider: Provider, sandbox: SandboxHandle) -> None:
        await run(provider, sandbox, sh("for i in 1 2 3; do echo line$i >> /proc/1/fd/1; done"))
        assert (await provider.logs(sandbox, 2))[-2:] == ["line2", "line3"]

    # files ------------------------------------------------------------------------
    async def test_file_round_trip_and_ownership(self, provider: Provider, sandbox: SandboxHandle) -> None:
        data = bytes(range(256)) * 10
        n = await provider.write_file(sandbox, "/data/sub/blob.bin", chunks_of(data), mode=0o640)
        assert n == len(data)
        assert await read_all(provider, sandbox, "/data/sub/blob.bin") == data
        r = await run(provider, sandbox, ["stat", "-c", "%u:%g %a %s", "/data/sub/blob.bin", "/data/sub"])
        assert r.out.decode().split("\n")[:2] == [f"0:0 640 {len(data)}", "0:0 755 4096"]
        await provider.write_file(sandbox, "data/sub/blob.bin", chunks_of(b"new"))  # replace, relative
        assert await read_all(provider, sandbox, "/data/sub/blob.bin") == b"new"
        assert (await run(provider, sandbox, ["cat", "/data/sub/blob.bin"])).out == b"new"

    async def test_large_binary_file_constant_memory(self, provider: Provider, sandbox: SandboxHandle) -> None:
        size = 100 * 1024 * 1024
        block = hashlib.sha512(b"seed").digest() * 1024  # 64 KiB, not compressible to zero
        want = hashlib.sha256()

        async def gen() -> AsyncIterator[bytes]:
            for i in range(size // len(block)):
                chunk = i.to_bytes(8, "little") + block[8:]
                want.update(chunk)
                yield chunk

        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert await provider.write_file(sandbox, "/big.bin", gen()) == size
        got, total = hashlib.sha256(), 0
        async for chunk in provider.read_file(sandbox, "/big.bin"):
            got.update(chunk)
            total += len(chunk)
        growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
        assert total == size and got.hexdigest() == want.hexdigest()
        assert growth_mb < 30, f"peak RSS grew by {growth_mb:.0f} MiB for a 100 MiB file"
        inside = (await run(provider, sandbox, ["sha256sum", "/big.bin"])).out.split()[0].decode()
        assert inside == want.hexdigest()

    async def test_file_operations(self, provider: Provider, sandbox: SandboxHandle) -> None:
        for p in ("/w/a.txt", "/w/b.py", "/w/c.py", "/w/sub/d.py", "/w/.hidden.py"):
            await provider.write_file(sandbox, p, chunks_of(p.encode()))
        names = [(f.path, f.is_dir) for f in await provider.list_dir(sandbox, "/w")]
        assert names == [("/w/.hidden.py", False), ("/w/a.txt", False), ("/w/b.py", False),
                         ("/w/c.py", False), ("/w/sub", True)]
        info = await provider.stat(sandbox, "/w/a.txt")
        assert info.path == "/w/a.txt" and info.size == 8 and info.mode == 0o644 and not info.is_dir
        assert info.mod_time.tzinfo is not None and abs(info.mod_time.timestamp() - time.time()) < 60
        assert (await provider.stat(sandbox, "/")).is_dir
        assert await provider.glob(sandbox, "/w/*.py") == ["/w/b.py", "/w/c.py"]
        assert await provider.glob(sandbox, "/w/*/*.py") == ["/w/sub/d.py"]
        assert await provider.glob(sandbox, "/nope/*") == []
        await provider.chmod(sandbox, "/w/b.py", 0o755)
        assert (await provider.stat(sandbox, "/w/b.py")).mode == 0o755
        await provider.move(sandbox, "/w/b.py", "/moved/deep/b.py")  # creates the parent
        assert await read_all(provider, sandbox, "/moved/deep/b.py") == b"/w/b.py"
        with pytest.raises(SandboxFileError):
            await provider.stat(sandbox, "/w/b.py")
        with pytest.raises(SandboxFileError):
            await provider.move(sandbox, "/w/missing", "/w/x")
        await provider.delete(sandbox, "/w/missing", recursive=False)  # rm -f semantics
        with pytest.raises(SandboxFileError):
            await provider.delete(sandbox, "/w/sub", recursive=False)
        await provider.delete(sandbox, "/w/sub", recursive=True)
        await provider.delete(sandbox, "/w/a.txt", recursive=False)
        assert [f.path for f in await provider.list_dir(sandbox, "/w")] == ["/w/.hidden.py", "/w/c.py"]

    async def test_file_errors(self, provider: Provider, sandbox: SandboxHandle) -> None:
        with pytest.raises(SandboxFileError, match="no such file"):
            await read_all(provider, sandbox, "/does/not/exist")
        with pytest.raises(SandboxFileError):
            await read_all(provider, sandbox, "/etc")  # a directory
        await provider.write_file(sandbox, "/f", chunks_of(b"x"))
        with pytest.raises(SandboxFileError, match="not a directory"):
            await provider.list_dir(sandbox, "/f")
        with pytest.raises(SandboxFileError):
            await provider.write_file(sandbox, "/f/child", chunks_of(b"x"))
        with pytest.raises(SandboxFileError):
            await provider.list_dir(sandbox, "/missing-dir")

    async def test_symlink_and_dotdot_escapes(self, provider: Provider, sandbox: SandboxHandle) -> None:
        setup = (
            "echo sandbox-shadow > /etc/shadow && ln -s /etc /x && ln -s / /rootlink && "
            "ln -s ../../../../../../etc/shadow /rel && ln -s /etc/hostname-probe /dangling && "
            "mkdir -p /d && ln -s /etc /d/up"
        )
        assert (await run(provider, sandbox, sh(setup))).rc == 0
        for path in ("/x/shadow", "/rootlink/etc/shadow", "/rel", "/../../../etc/shadow", "/d/up/shadow",
                     "x/../../../../etc/shadow"):
            assert await read_all(provider, sandbox, path) == b"sandbox-shadow\n", path
        # Writes through a symlinked directory land in the sandbox, never on the host.
        await provider.write_file(sandbox, "/x/stacyvm-escape-probe", chunks_of(b"pwned"))
        await provider.write_file(sandbox, "/rootlink/tmp/stacyvm-escape-probe", chunks_of(b"pwned"))
        host_files = ["/etc/stacyvm-escape-probe", "/tmp/stacyvm-escape-probe"]
        assert not any(await asyncio.gather(*(asyncio.to_thread(os.path.exists, f) for f in host_files)))
        r = await run(provider, sandbox, ["cat", "/etc/stacyvm-escape-probe", "/tmp/stacyvm-escape-probe"])
        assert r.out == b"pwnedpwned"
        # Writing onto a symlink replaces the link, it does not follow it.
        await provider.write_file(sandbox, "/dangling", chunks_of(b"plain"))
        assert (await provider.stat(sandbox, "/dangling")).is_symlink is False
        assert (await run(provider, sandbox, ["ls", "/etc/hostname-probe"])).rc != 0
        # Deleting a symlinked dir removes the link only.
        await provider.delete(sandbox, "/x", recursive=True)
        assert (await run(provider, sandbox, ["cat", "/etc/shadow"])).out == b"sandbox-shadow\n"
        assert (await provider.stat(sandbox, "/rootlink")).is_symlink
        names = {f.path for f in await provider.list_dir(sandbox, "/rootlink/etc")}
        assert "/rootlink/etc/shadow" in names

    # limits ------------------------------------------------------------------------
    async def test_pids_limit_contains_fork_bomb(self, provider: Provider, make_sandbox: MakeSandbox) -> None:
        h = await make_sandbox(pids_limit=32)
        # The sleeps do not hold the exec's output open, so it returns when the
        # shell gives up; they end on their own 2 s later.
        r = await run(provider, h, sh("i=0; while [ $i -lt 100 ]; do sleep 2 >/dev/null 2>&1 & i=$((i+1)); done; "
                                      "echo started; exit 0"))
        if self.limits_end_whole_sandbox:
            # The bomb is stopped by ending the sandbox; the host is untouched. gVisor notices the
            # host pids budget a little after the guest forks, so the shell may already have
            # printed "started" (seen once in 4 CI runs), even exited: the sandbox's end is what
            # is required, and without a limit it would live on.
            if (await wait_ended(provider, h, 50, 0.1)).alive:
                raise AssertionError(f"the sandbox survived the fork bomb: rc {r.rc}, {r.out[-200:]!r}")
            assert (await run(provider, h, ["echo", "alive"])).rc != 0
            return
        assert b"fork" in r.err.lower() or b"resource" in r.err.lower(), r.err[-300:]
        assert (await provider.stats(h)).pids <= 32
        for _ in range(100):  # the sandbox recovers once the sleeps are gone
            if (await run(provider, h, ["echo", "alive"])).out == b"alive\n":
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the sandbox did not recover from the fork bomb")

    async def test_memory_oom(self, provider: Provider, make_sandbox: MakeSandbox, python_image_ref: str) -> None:
        h = await make_sandbox(image=python_image_ref, memory_mb=64)
        st = await provider.stats(h)
        assert st.mem_limit_bytes == 64 * 1024 * 1024
        r = await run(provider, h, ["python3", "-c", "x = b'a' * (512 << 20); print(len(x))"])
        assert r.rc == 137 and r.status.reason == "oom", (r.rc, r.status, r.err[-200:])
        if self.limits_end_whole_sandbox:
            st = await provider.state(h)
            assert (st.alive, st.reason) == (False, "oom")
            return
        assert (await provider.state(h)).alive  # only the hog dies
        assert (await run(provider, h, ["python3", "-c", "print(6*7)"])).out == b"42\n"

    async def test_cpu_quota(self, provider: Provider, make_sandbox: MakeSandbox) -> None:
        h = await make_sandbox(vcpus=1)
        before = (await provider.stats(h)).cpu_seconds
        t0 = time.monotonic()
        await run(provider, h, sh("(while :; do :; done) & (while :; do :; done) & sleep 2; kill $(jobs -p)"))
        used = (await provider.stats(h)).cpu_seconds - before
        wall = time.monotonic() - t0
        assert used / wall < 1.3, f"{used:.2f}s CPU in {wall:.2f}s wall with vcpus=1"
        assert used > 0.5  # it did run

    # network -------------------------------------------------------------------------
    async def test_network_none(self, provider: Provider, sandbox: SandboxHandle,
                                upstream_server: tuple[str, int], host_server: tuple[list[str], int]) -> None:
        links = (await run(provider, sandbox, ["cat", "/proc/net/dev"])).out.decode()
        ifaces = sorted(line.split(":")[0].strip() for line in links.splitlines()[2:])
        assert ifaces == ["lo"]
        addr, port = upstream_server
        r = await fetch(provider, sandbox, addr, port)
        assert r.rc != 0 and b"hello" not in r.out

    async def test_network_bridge_egress_but_not_host(
        self, provider: Provider, make_sandbox: MakeSandbox,
        upstream_server: tuple[str, int], host_server: tuple[list[str], int],
    ) -> None:
        h = await make_sandbox(network="bridge")
        addr, port = upstream_server
        r = await fetch(provider, h, addr, port, timeout=5)
        assert r.out.endswith(b"\r\n\r\nhello-from-upstream"), (r.rc, r.out, r.err)
        host_addrs, hport = host_server
        route = (await run(provider, h, ["cat", "/proc/net/route"])).out.decode()
        gw_hex = next(ln.split()[2] for ln in route.splitlines()[1:] if ln.split()[1] == "00000000")
        gateway = ".".join(str(int(gw_hex[i : i + 2], 16)) for i in (6, 4, 2, 0))
        for target in sorted({*host_addrs, gateway}):
            if target.startswith("127."):
                continue  # the sandbox's own loopback
            r = await fetch(provider, h, target, hport)
            assert b"hello-from-host" not in r.out and r.rc != 0, f"sandbox reached host address {target}"

    async def test_bridge_sandboxes_isolated_from_each_other(
        self, provider: Provider, make_sandbox: MakeSandbox
    ) -> None:
        a, b = await make_sandbox(network="bridge"), await make_sandbox(network="bridge")
        srv = await provider.exec(b, ExecSpec(argv=sh("mkdir -p /www && echo from-b > /www/i && "
                                                      "exec httpd -f -p 8080 -h /www")))
        b_ip = (await run(provider, b, ["ip", "-4", "-o", "addr", "show", "eth0"])).out.split()[3]
        b_ip = b_ip.split(b"/")[0].decode()
        for _ in range(50):  # httpd starts in the background: wait until it answers inside b
            local = await fetch(provider, b, "127.0.0.1", 8080, "/i")
            if local.out.endswith(b"from-b\n"):
                break
            await asyncio.sleep(0.1)
        assert local.out.endswith(b"from-b\n"), local  # the server works...
        r = await fetch(provider, a, b_ip, 8080, "/i")
        assert r.rc != 0 and b"from-b" not in r.out  # ...but a cannot reach it
        await srv.kill()
        await srv.wait()

    # scale and hygiene ------------------------------------------------------------------
    async def test_concurrent_creates(self, provider: Provider, image_ref: str) -> None:
        specs = [SandboxSpec(new_sandbox_id(), image_ref, 64, 1, network="bridge" if i % 2 else "none")
                 for i in range(20)]
        results = await asyncio.gather(*(provider.create(s) for s in specs), return_exceptions=True)
        handles = [r for r in results if isinstance(r, SandboxHandle)]
        try:
            assert len(handles) == 20, [r for r in results if not isinstance(r, SandboxHandle)]
            outs = await asyncio.gather(*(run(provider, h, ["hostname"]) for h in handles))
            assert all(o.rc == 0 for o in outs)
        finally:
            await asyncio.gather(*(provider.destroy(h) for h in handles))
        for s in specs:
            assert await self.leaks(provider, s.sandbox_id) == []

    @pytest.mark.slow
    async def test_create_destroy_cycles_leave_nothing(self, provider: Provider, image_ref: str) -> None:
        t0 = time.monotonic()
        for i in range(self.leak_cycles):
            sid = new_sandbox_id()
            h = await provider.create(SandboxSpec(sid, image_ref, 64, 1, network="bridge" if i % 4 == 0 else "none"))
            if i % 10 == 0:
                assert (await run(provider, h, ["true"])).rc == 0
            await provider.destroy(h)
            assert await self.leaks(provider, sid) == []
        assert time.monotonic() - t0 < self.leak_budget_s
