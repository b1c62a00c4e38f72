"""The measurement plan: server milestones interleaved with the raw crun baseline.

Every phase alternates the order of the server and the raw side from one
iteration to the next, so that a burst of host noise hits both. Warm-up
iterations run the same code and are thrown away.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx

from bench import memory
from bench.api import Api, ApiError, SandboxSpec, file_body
from bench.raw import RawCrun, RawError
from bench.raw_docker import RawDocker
from bench.raw_microvm import RawMicroVM
from bench.stats import Series

STREAM_ARGV = ["sh", "-c", "echo first; sleep 0.1; echo second"]
PYTHON_ARGV = ["python3", "-c", "pass"]
FAILURES = (ApiError, httpx.HTTPError, RawError, OSError, TimeoutError)


@dataclass
class Plan:
    iterations: int  # lifecycle and stream samples
    exec_iterations: int  # exec `true` samples
    python_iterations: int  # exec `python3 -c pass` samples
    warmup: int
    bursts: list[int]
    file_mb: int
    file_reps: int
    density: int
    busybox: str
    python: str
    raw: bool = True


# name -> (unit, what one sample is). Raw milestones use the same names under "raw_crun".
WHAT: dict[str, tuple[str, str]] = {
    "create": ("ms", "POST /sandboxes (busybox, cached image, network none, 256 MB, 1 vCPU) -> 201, state running"),
    "create_to_first_exec": ("ms", "start of POST /sandboxes -> end of the first exec `true` response"),
    "exec_true": ("ms", "POST /exec {command: true, mode: argv} on a running sandbox -> JSON result, exit 0"),
    "exec_python": ("ms", "POST /exec python3 -c pass (argv) on a running debian-python sandbox -> JSON result"),
    "exec_true_server_duration": ("ms", "the `duration` the server reports inside those exec_true results"),
    "exec_python_server_duration": ("ms", "the `duration` the server reports inside those exec_python results"),
    "http_health": ("ms", "GET /api/v1/health on the same keep-alive client (HTTP floor, no sandbox work)"),
    "http_health_httpx": ("ms", "the same GET through httpx.AsyncClient (what that client library adds per call)"),
    "stream_ttfb": ("ms", "POST /exec stream=true of `sh -c 'echo first; sleep 0.1; echo second'` -> first body byte"),
    "stream_total": ("ms", "the same streamed exec -> last body byte (includes the 100 ms sleep)"),
    "destroy": ("ms", "DELETE /sandboxes/{id} -> response (container, cgroups, overlay, netns gone)"),
    "file_write": ("MB/s", "one POST /files of N MB as base64 JSON (encoding done before the clock starts)"),
    "file_read": ("MB/s", "GET /files?path= streamed to the last byte, sha256 checked after the clock stops"),
}
RAW_WHAT: dict[str, tuple[str, str]] = {
    "create": ("ms", "overlay mount + config.json + `crun create` + `crun start` (tini, busybox sleep)"),
    "runtime_create": ("ms", "`crun create` (or `runsc create`) alone"),
    "runtime_start": ("ms", "`crun start` (or `runsc start`) alone"),
    "create_to_first_exec": ("ms", "raw create above + the first `crun exec` of true"),
    "exec_true": ("ms", "`crun exec --process p.json <id>` running true, stdout/stderr piped, until exit"),
    "exec_python": ("ms", "`crun exec` of python3 -c pass in the debian-python container"),
    "exec_true_server_duration": ("ms", "the `duration` the server reports inside those exec_true results"),
    "exec_python_server_duration": ("ms", "the `duration` the server reports inside those exec_python results"),
    "http_health": ("ms", "GET /api/v1/health on the same keep-alive client (HTTP floor, no sandbox work)"),
    "stream_ttfb": ("ms", "`crun exec` of the same sh command -> first stdout byte on a pipe"),
    "stream_total": ("ms", "the same -> exit"),
    "destroy": ("ms", "`crun delete --force` + unmount the overlay + remove the bundle dir"),
    "file_write": ("MB/s", "N MB piped into `crun exec ... sh -c 'cat > f'`"),
    "file_read": ("MB/s", "`crun exec ... cat f` read from a pipe to EOF"),
}


@dataclass
class Results:
    server: dict[str, Series] = field(default_factory=dict)
    raw: dict[str, Series] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    def s(self, name: str) -> Series:
        if name not in self.server:
            unit, what = WHAT.get(name, ("ms", name))
            self.server[name] = Series(name, unit, what)
        return self.server[name]

    def r(self, name: str) -> Series:
        if name not in self.raw:
            unit, what = RAW_WHAT.get(name, ("ms", name))
            self.raw[name] = Series(name, unit, what)
        return self.raw[name]


def _err(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Runner:
    def __init__(self, api: Api, raw: RawCrun | RawDocker | RawMicroVM | None, plan: Plan,
                 rootfs: dict[str, Path | str], server_pid: int | None,
                 memory_cgroups: memory.CgroupLocator = memory.MEMORY_CGROUPS) -> None:
        self.api = api
        self.raw = raw
        self.plan = plan
        self.rootfs = rootfs  # image ref -> unpacked rootfs (crun/runsc) or image ref (docker) for the raw side
        self.server_pid = server_pid
        self.memory_cgroups = memory_cgroups  # the provider's memory cgroup parent, for density
        self.res = Results()
        self.live: set[str] = set()  # server sandboxes we still have to destroy
        self.raw_live: set[str] = set()

    # ------------------------------------------------------------------ helpers

    def spec(self, image: str) -> SandboxSpec:
        return SandboxSpec(image=image)

    def _create(self, image: str) -> tuple[str, float]:
        sid, ms = self.api.create(self.spec(image))
        self.live.add(sid)
        return sid, ms

    def _destroy(self, sid: str) -> float:
        ms = self.api.destroy(sid)
        self.live.discard(sid)
        return ms

    def _raw_up(self, image: str) -> tuple[str, float, float, float]:
        assert self.raw is not None
        cid, t = self.raw.up(self.rootfs[image])
        self.raw_live.add(cid)
        return cid, t.total_ms, t.create_ms, t.start_ms

    def _raw_down(self, cid: str) -> float:
        assert self.raw is not None
        try:
            return self.raw.down(cid)
        finally:
            self.raw_live.discard(cid)

    async def _pair(self, i: int, server: Callable[[], Awaitable[None]], raw: Callable[[], None]) -> None:
        """Run both sides of one iteration, alternating which goes first."""
        if self.raw is None:
            await server()
        elif i % 2 == 0:
            await server()
            raw()
        else:
            raw()
            await server()

    def _pair_blocking(self, i: int, server: Callable[[], None], raw: Callable[[], None]) -> None:
        """_pair for the JSON calls, which both sides make with the blocking client (bench/http1.py)."""
        if self.raw is None:
            server()
        elif i % 2 == 0:
            server()
            raw()
        else:
            raw()
            server()

    # ------------------------------------------------------------------ phases

    def warm_images(self, first_create: bool = False) -> None:
        """Pull and unpack both images on the server (not measured).

        first_create (microvm): the busybox image is first warmed with another shape
        (memory_mb 512, so another guest RAM size and snapshot), then the first create of
        the measured shape, which boots it cold and saves its snapshot with the image and
        its disk already cached, is kept as the `first_create` sample.
        """
        firsts = self.res.extras.setdefault("first_create_ms", {})
        for image in (self.plan.busybox, self.plan.python):
            if first_create and image == self.plan.busybox:
                sid, ms = self.api.create(SandboxSpec(image=image, memory_mb=512))
                self.live.add(sid)
                self._destroy(sid)
                log(f"image warm: {image} with another shape ({ms:.0f} ms, not counted)")
            sid, ms = self._create(image)
            self._destroy(sid)
            firsts[image] = round(ms, 1)
            if first_create and image == self.plan.busybox:
                self.res.s("first_create").add(ms)
                log(f"first create of the measured shape (snapshot built): {ms:.0f} ms, reported apart")
            else:
                log(f"image warm: {image} (first create {ms:.0f} ms, not counted)")

    def lifecycle(self) -> None:
        p = self.plan
        log(f"lifecycle: {p.warmup} warm-up + {p.iterations} create/exec/destroy, server and raw interleaved")
        for i in range(p.warmup + p.iterations):
            res = self.res if i >= p.warmup else Results()  # warm-ups land in a throwaway
            self._pair_blocking(i, partial(self._lifecycle_server, res), partial(self._lifecycle_raw, res))

    def _lifecycle_server(self, res: Results) -> None:
        t0 = time.perf_counter()
        try:
            sid, c_ms = self._create(self.plan.busybox)
        except FAILURES as exc:
            res.s("create").fail(_err(exc))
            res.s("create_to_first_exec").fail("create failed")
            return
        res.s("create").add(c_ms)
        try:
            self.api.exec(sid, "true", [])
            res.s("create_to_first_exec").add((time.perf_counter() - t0) * 1000)
        except FAILURES as exc:
            res.s("create_to_first_exec").fail(_err(exc))
        try:
            res.s("destroy").add(self._destroy(sid))
        except FAILURES as exc:
            res.s("destroy").fail(_err(exc))

    def _lifecycle_raw(self, res: Results) -> None:
        assert self.raw is not None
        try:
            cid, total, c_ms, s_ms = self._raw_up(self.plan.busybox)
        except FAILURES as exc:
            res.r("create").fail(_err(exc))
            res.r("create_to_first_exec").fail("create failed")
            return
        res.r("create").add(total)
        res.r("runtime_create").add(c_ms)
        res.r("runtime_start").add(s_ms)
        try:
            res.r("create_to_first_exec").add(total + self.raw.exec(cid, ["true"]))
        except FAILURES as exc:
            res.r("create_to_first_exec").fail(_err(exc))
        try:
            res.r("destroy").add(self._raw_down(cid))
        except FAILURES as exc:
            res.r("destroy").fail(_err(exc))

    def _with_pair(self, image: str, name: str) -> tuple[str | None, str | None]:
        """One server sandbox and one raw container of `image`; failures are counted under `name`."""
        sid = cid = None
        try:
            sid, _ = self._create(image)
        except FAILURES as exc:
            self.res.s(name).fail(f"sandbox: {_err(exc)}")
        if self.raw is not None:
            try:
                cid = self._raw_up(image)[0]
            except FAILURES as exc:
                self.res.r(name).fail(f"container: {_err(exc)}")
        return sid, cid

    def _release_pair(self, sid: str | None, cid: str | None) -> None:
        if sid is not None:
            self._destroy_quietly(sid)
        if cid is not None:
            self._raw_down_quietly(cid)

    def exec_loop(self, image: str, argv: list[str], name: str, n: int) -> None:
        p = self.plan
        log(f"{name}: {p.warmup} warm-up + {n} execs of {' '.join(argv)!r} on one sandbox, interleaved with raw")
        sid, cid = self._with_pair(image, name)
        try:
            for i in range(p.warmup + n):
                res = self.res if i >= p.warmup else Results()
                self._pair_blocking(i, partial(self._exec_server, res, sid, argv, name),
                           partial(self._exec_raw, res, cid, argv, name))
        finally:
            self._release_pair(sid, cid)

    def _exec_server(self, res: Results, sid: str | None, argv: list[str], name: str) -> None:
        if sid is None:
            return
        try:
            ms, inner = self.api.exec(sid, argv[0], argv[1:])
        except FAILURES as exc:
            res.s(name).fail(_err(exc))
            return
        res.s(name).add(ms)
        if inner is not None:
            res.s(f"{name}_server_duration").add(inner)

    def _exec_raw(self, res: Results, cid: str | None, argv: list[str], name: str) -> None:
        if cid is None or self.raw is None:
            return
        try:
            res.r(name).add(self.raw.exec(cid, argv))
        except FAILURES as exc:
            res.r(name).fail(_err(exc))

    async def http_floor(self) -> None:
        """GET /health: what the HTTP stack and client cost with no sandbox work at all."""
        p = self.plan
        log(f"http floor: {p.warmup} warm-up + {p.exec_iterations} GET /health")
        for i in range(p.warmup + p.exec_iterations):
            res = self.res if i >= p.warmup else Results()
            try:
                res.s("http_health").add(self.api.health_ms())
            except FAILURES as exc:
                res.s("http_health").fail(_err(exc))
            try:
                res.s("http_health_httpx").add(await self.api.health_ms_httpx())
            except FAILURES as exc:
                res.s("http_health_httpx").fail(_err(exc))

    async def stream(self) -> None:
        p = self.plan
        log(f"stream: {p.warmup} warm-up + {p.iterations} streamed execs")
        sid, cid = self._with_pair(p.busybox, "stream_ttfb")
        try:
            for i in range(p.warmup + p.iterations):
                res = self.res if i >= p.warmup else Results()
                await self._pair(i, partial(self._stream_server, res, sid), partial(self._stream_raw, res, cid))
        finally:
            self._release_pair(sid, cid)
        headers = sorted(self.res.extras.pop("stream_headers", []))
        if headers:
            self.res.extras["stream_headers_ms_p50"] = round(headers[len(headers) // 2], 3)

    async def _stream_server(self, res: Results, sid: str | None) -> None:
        if sid is None:
            return
        try:
            t = await self.api.exec_stream(sid, STREAM_ARGV[0], STREAM_ARGV[1:])
        except FAILURES as exc:
            res.s("stream_ttfb").fail(_err(exc))
            return
        res.s("stream_ttfb").add(t.first_byte_ms)
        res.s("stream_total").add(t.total_ms)
        res.extras.setdefault("stream_headers", []).append(t.headers_ms)

    def _stream_raw(self, res: Results, cid: str | None) -> None:
        if cid is None or self.raw is None:
            return
        try:
            ttfb, total = self.raw.exec_ttfb(cid, STREAM_ARGV)
        except FAILURES as exc:
            res.r("stream_ttfb").fail(_err(exc))
            return
        res.r("stream_ttfb").add(ttfb)
        res.r("stream_total").add(total)

    def bursts(self) -> None:
        for k, size in enumerate(self.plan.bursts):
            log(f"burst: {size} concurrent creates (server and raw)")
            if self.raw is None or k % 2 == 0:
                self._server_burst(size)
                self._raw_burst_sync(size)
            else:
                self._raw_burst_sync(size)
                self._server_burst(size)

    def _server_burst(self, size: int) -> None:
        name = f"burst_{size}"
        series = self.res.s(name)
        series.what = f"latency of each of {size} concurrent POST /sandboxes (busybox), all sent at once, threads"

        def one(_: int) -> str | None:
            try:
                sid, ms = self._create(self.plan.busybox)
                series.add(ms)
                return sid
            except FAILURES as exc:
                series.fail(_err(exc))
                return None

        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=size) as pool:
            ids = list(pool.map(one, range(size)))
        wall = (time.perf_counter() - t0) * 1000
        t1 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=size) as pool:
            list(pool.map(self._destroy_quietly, [sid for sid in ids if sid]))
        self.res.extras[f"{name}_wall_ms"] = round(wall, 1)
        self.res.extras[f"{name}_destroy_wall_ms"] = round((time.perf_counter() - t1) * 1000, 1)

    def _raw_burst_sync(self, size: int) -> None:
        if self.raw is None:
            return
        name = f"burst_{size}"
        series = self.res.r(name)
        series.what = f"latency of each of {size} concurrent raw creates (overlay + crun create + start), threads"

        def one(_: int) -> str | None:
            try:
                cid, total, _c, _s = self._raw_up(self.plan.busybox)
                series.add(total)
                return cid
            except FAILURES as exc:
                series.fail(_err(exc))
                return None

        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=size) as pool:
            ids = list(pool.map(one, range(size)))
        self.res.extras[f"raw_{name}_wall_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        with ThreadPoolExecutor(max_workers=size) as pool:
            list(pool.map(self._raw_down_quietly, [c for c in ids if c]))

    async def files(self) -> None:
        p = self.plan
        log(f"files: {p.file_reps} x write+read of {p.file_mb} MB (server and raw pipe), sha256 checked")
        data = os.urandom(p.file_mb * 1_000_000)
        sid, cid = self._with_pair(p.busybox, "file_write")
        try:
            for rep in range(p.file_reps):
                await self._pair(rep, partial(self._files_server, sid, rep, data),
                                 partial(self._files_raw, cid, rep, data))
        finally:
            self._release_pair(sid, cid)
        self.res.extras["file_mb"] = p.file_mb
        self.res.extras.setdefault("file_requests_per_write", 1)

    async def _files_server(self, sid: str | None, rep: int, data: bytes) -> None:
        if sid is None:
            return
        mb = len(data) / 1e6
        parts = int(self.res.extras.get("file_requests_per_write", 1))
        try:
            parts, w_ms = await self._write_parts(sid, rep, data, parts)
            self.res.extras["file_requests_per_write"] = parts
            self.res.s("file_write").add(mb / (w_ms / 1000))
        except FAILURES as exc:
            self.res.s("file_write").fail(_err(exc))
            return
        try:
            self.res.s("file_read").add(mb / (await self._read_parts(sid, rep, data, parts) / 1000))
        except FAILURES as exc:
            self.res.s("file_read").fail(_err(exc))

    def _files_raw(self, cid: str | None, rep: int, data: bytes) -> None:
        if cid is None or self.raw is None:
            return
        mb = len(data) / 1e6
        path = f"/tmp/bench-{rep}.bin"
        try:
            self.res.r("file_write").add(mb / (self.raw.pipe_in(cid, path, data) / 1000))
        except FAILURES as exc:
            self.res.r("file_write").fail(_err(exc))
            return
        try:
            r_ms, out = self.raw.pipe_out(cid, path)
            if out != data:
                raise RawError("raw read back differs from what was written")
            self.res.r("file_read").add(mb / (r_ms / 1000))
        except FAILURES as exc:
            self.res.r("file_read").fail(_err(exc))

    async def _write_parts(self, sid: str, rep: int, data: bytes, parts: int) -> tuple[int, float]:
        """Write `data` as one file, or as `parts` files when the server's body limit refuses one."""
        while True:
            bodies = [file_body(f"/tmp/bench-{rep}-{k}.bin", c) for k, c in enumerate(self._split(data, parts))]
            try:
                total = 0.0
                for k, body in enumerate(bodies):
                    total += await self.api.write_file(sid, f"/tmp/bench-{rep}-{k}.bin", body)
                return parts, total
            except ApiError as exc:
                if "HTTP 413" not in str(exc) or parts >= 64:
                    raise
                parts *= 2
                log(f"files: body limit hit, retrying as {parts} files")

    @staticmethod
    def _split(data: bytes, parts: int) -> list[bytes]:
        step = -(-len(data) // parts)
        return [data[k * step:(k + 1) * step] for k in range(parts)]

    async def _read_parts(self, sid: str, rep: int, data: bytes, parts: int) -> float:
        """Read back what _write_parts wrote; the sha256 of every part must match."""
        total_ms = 0.0
        for k, chunk in enumerate(self._split(data, parts)):
            ms, n, got = await self.api.read_file(sid, f"/tmp/bench-{rep}-{k}.bin")
            total_ms += ms
            if n != len(chunk) or got != hashlib.sha256(chunk).hexdigest():
                raise ApiError(f"read back part {k}: {n} bytes, sha256 differs from what was written")
        return total_ms

    async def density(self) -> None:
        n = self.plan.density
        if n <= 0:
            return
        log(f"density: holding {n} idle busybox sandboxes")
        series = self.res.s("density_create")
        series.what = f"POST /sandboxes while 0..{n - 1} other sandboxes of this run are alive"
        gc.collect()  # our own garbage must not move the host numbers
        before = memory.snapshot([], self.server_pid, self.memory_cgroups)
        ids: list[str] = []
        for _ in range(n):
            try:
                sid, ms = self._create(self.plan.busybox)
                ids.append(sid)
                series.add(ms)
            except FAILURES as exc:
                series.fail(_err(exc))
        await asyncio.sleep(3.0)  # let page cache and lazy allocations settle
        after = memory.snapshot(ids, self.server_pid, self.memory_cgroups)
        with ThreadPoolExecutor(max_workers=len(ids) or 1) as pool:
            list(pool.map(self._destroy_quietly, ids))
        await asyncio.sleep(0.5)
        gone = memory.snapshot([], self.server_pid, self.memory_cgroups)
        held = max(after.sandboxes, 1)
        self.res.extras["density"] = {
            "requested": n,
            "held": after.sandboxes,
            "before": before.to_json(),
            "after": after.to_json(),
            "after_destroy": gone.to_json(),
            "leftover_cgroups": memory.leftover_cgroups(ids, self.memory_cgroups),
            "per_sandbox_bytes": {
                "cgroup_usage": after.cgroup_usage // held,
                "cgroup_rss": after.cgroup_rss // held,
                "cgroup_cache": after.cgroup_cache // held,
                "procs_rss": after.procs_rss // held,
                "procs_pss": after.procs_pss // held,
                "server_rss_delta": (after.server_rss - before.server_rss) // held,
                "host_used_delta": (after.host_used - before.host_used) // held,
                "host_slab_unreclaimable_delta": (after.host_slab_unreclaimable - before.host_slab_unreclaimable)
                // held,
            },
            "procs_per_sandbox": round(after.procs / held, 2),
            # Whole-host drift over the run (after destroy vs before): when it is as large as the
            # held-minus-before signal, the host columns say nothing about the sandboxes.
            "host_used_drift": gone.host_used - before.host_used,
            "host_slab_drift": gone.host_slab_unreclaimable - before.host_slab_unreclaimable,
        }

    # ------------------------------------------------------------------ cleanup

    def _destroy_quietly(self, sid: str) -> None:
        try:
            self._destroy(sid)
        except FAILURES as exc:
            self.res.extras.setdefault("cleanup_errors", []).append(f"destroy {sid}: {_err(exc)}")

    def _raw_down_quietly(self, cid: str) -> None:
        try:
            self._raw_down(cid)
        except FAILURES as exc:
            self.res.extras.setdefault("cleanup_errors", []).append(f"raw down {cid}: {_err(exc)}")

    def cleanup(self) -> None:
        for sid in list(self.live):
            self._destroy_quietly(sid)
        for cid in list(self.raw_live):
            self._raw_down_quietly(cid)

    async def run_all(self) -> Results:
        """Every phase after warm_images (which the caller runs first)."""
        try:
            self.lifecycle()
            await self.http_floor()
            self.exec_loop(self.plan.busybox, ["true"], "exec_true", self.plan.exec_iterations)
            self.exec_loop(self.plan.python, PYTHON_ARGV, "exec_python", self.plan.python_iterations)
            await self.stream()
            self.bursts()
            await self.density()  # before files: their 100 MB buffers would blur the host numbers
            await self.files()
        finally:
            self.cleanup()
        return self.res
