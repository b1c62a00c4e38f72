"""Preview proxy benchmark: one HTTP server in a sandbox, through the proxy and directly, side by side.

The server (bench/preview_app.py, HTTP/1.1 keep-alive, one asyncio loop) runs in a
native debian-python sandbox. Three keep-alive httpx clients talk to it:

  direct  a TCP connection made the way the provider's connect() makes it (a socket
          created inside the sandbox's netns, connected to 127.0.0.1:PORT there), with
          no HTTP proxy in between: the same upstream path the proxy uses, minus the proxy
  host    through the server's proxy, host form `PORT-sb-x.<domain>` (Host header)
  path    through the server's proxy, path form `/preview/sb_x/PORT/`

Every phase rotates the order of the three modes from one iteration to the next, so
host noise lands on all of them. The token goes in the X-Preview-Token header, as an
API client would send it (the browser's cookie exchange is a one-off redirect).
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio.abc
import httpcore
import httpx
from httpcore._backends.anyio import AnyIOStream

from bench.api import Api, ApiError, SandboxSpec, file_body
from bench.runner import log
from bench.sections import PREVIEW
from bench.stats import Series, summarize

APP = Path(__file__).with_name("preview_app.py")
MODES = ("direct", "host", "path")
FAILURES = (ApiError, httpx.HTTPError, OSError, TimeoutError)
TEMPLATE = Path(__file__).with_name("preview_template.md")


@dataclass
class PreviewPlan:
    requests: int  # small-response latency samples per mode
    warmup: int  # discarded small requests per mode
    rps_rounds: int  # throughput rounds per mode
    rps_seconds: float  # length of one round
    concurrency: int  # concurrent keep-alive requests in a throughput round
    big_mb: int  # size of one large download (10^6 bytes)
    big_reps: int
    image: str
    port: int = 8000
    domain: str = "localhost"  # the server's server.preview_domain


# ------------------------------------------------------------------------- direct client


class NetnsBackend(httpcore.AsyncNetworkBackend):
    """httpcore connections made like the provider's connect(): a socket created in the netns.

    The host name of the URL is ignored; every connection goes to 127.0.0.1:port inside
    the sandbox's network namespace. The stream is anyio's, as for the proxied clients.
    """

    def __init__(self, netns: str) -> None:
        self.netns = netns

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        from stacyvm_server.providers.native.network import socket_in_netns

        sock = await asyncio.to_thread(socket_in_netns, self.netns)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port)), timeout)
        except BaseException:
            sock.close()
            raise
        stream = await anyio.abc.SocketStream.from_socket(sock)
        return AnyIOStream(stream)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class NetnsTransport(httpx.AsyncHTTPTransport):
    """httpx's own transport (same HTTP/1.1 code and pool) over NetnsBackend connections."""

    def __init__(self, netns: str, limits: httpx.Limits) -> None:
        super().__init__(limits=limits)
        self._pool = httpcore.AsyncConnectionPool(
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=NetnsBackend(netns),
        )


# ------------------------------------------------------------------------- measurement


@dataclass
class PreviewResults:
    series: dict[str, Series] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    def s(self, name: str, unit: str, what: str) -> Series:
        if name not in self.series:
            self.series[name] = Series(name, unit, what)
        return self.series[name]


WHAT = {
    "small": ("ms", "GET /small (13-byte body) on a keep-alive client -> last body byte, status 200 checked"),
    "rps": ("req/s", "GET /small completed per second by {c} concurrent keep-alive requests, one round of {t:g} s"),
    "big": ("MB/s", "GET /big?n={mb}e6 streamed to the last byte (length checked), 10^6 bytes per MB"),
}
MODE_WHAT = {
    "direct": "direct (socket made in the sandbox's netns, to 127.0.0.1:PORT; no proxy)",
    "host": "proxy, host form PORT-sb-x.<domain>",
    "path": "proxy, path form /preview/sb_x/PORT/",
}


def _rot(i: int) -> tuple[str, ...]:
    """The three modes in the order of iteration i (rotates, so each leads equally often)."""
    k = i % len(MODES)
    return MODES[k:] + MODES[:k]


class PreviewBench:
    def __init__(self, api: Api, url: str, api_key: str | None, plan: PreviewPlan) -> None:
        self.api = api
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.plan = plan
        self.res = PreviewResults()
        self.clients: dict[str, httpx.AsyncClient] = {}
        self.sid: str | None = None

    async def run(self) -> PreviewResults:
        p = self.plan
        try:
            await self._setup()
            await self._latency()
            await self._throughput()
            await self._big()
        finally:
            for c in self.clients.values():
                await c.aclose()  # before the destroy: our direct sockets hold the netns
            if self.sid is not None:
                try:
                    self.api.destroy(self.sid)
                except FAILURES as exc:
                    self.res.extras.setdefault("cleanup_errors", []).append(f"destroy {self.sid}: {exc}")
        self.res.extras["plan"] = dataclasses.asdict(p)
        return self.res

    async def _setup(self) -> None:
        p = self.plan
        log(f"preview: sandbox of {p.image}, app on port {p.port}")
        self.sid, _ = self.api.create(SandboxSpec(image=p.image))
        sid = self.sid
        await self.api.write_file(sid, "/bench_app.py", file_body("/bench_app.py", APP.read_bytes()))
        self.api.exec(sid, "sh", ["-c", f"nohup python3 /bench_app.py {p.port} >/tmp/bench_app.log 2>&1 &"])
        resp = await self.api.client.post(f"/sandboxes/{sid}/previews", json={"port": p.port, "ttl": "2h"})
        if resp.status_code != 201:
            raise ApiError(f"previews: HTTP {resp.status_code}: {resp.text[:300]}")
        token = str(resp.json()["token"])
        n = max(64, p.concurrency * 2)
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n, keepalive_expiry=60)
        timeout = httpx.Timeout(120.0)
        from stacyvm_server.providers.native.network import netns_path

        self.clients["direct"] = httpx.AsyncClient(base_url=f"http://127.0.0.1:{p.port}", timeout=timeout,
                                                   transport=NetnsTransport(netns_path(sid), limits))
        host = f"{p.port}-{sid.replace('_', '-')}.{p.domain}"
        self.clients["host"] = httpx.AsyncClient(base_url=self.url, limits=limits, timeout=timeout,
                                                 headers={"Host": host, "X-Preview-Token": token})
        self.clients["path"] = httpx.AsyncClient(base_url=f"{self.url}/preview/{sid}/{p.port}", limits=limits,
                                                 timeout=timeout, headers={"X-Preview-Token": token})
        deadline = time.monotonic() + 30
        while True:
            try:
                if (await self.clients["direct"].get("/small")).status_code == 200:
                    break
            except (httpx.HTTPError, OSError):
                pass
            if time.monotonic() > deadline:
                raise ApiError("preview: the app in the sandbox did not answer within 30 s")
            await asyncio.sleep(0.1)
        for mode in MODES:  # each route works before anything is timed
            r = await self.clients[mode].get("/small")
            if r.status_code != 200 or r.content != b"hello, world\n":
                raise ApiError(f"preview {mode}: HTTP {r.status_code}: {r.text[:200]}")
        self.res.extras.update(sandbox=sid, host=host, port=p.port, direct_netns=netns_path(sid))

    async def _small(self, mode: str) -> float:
        c = self.clients[mode]
        t0 = time.perf_counter()
        r = await c.get("/small")
        ms = (time.perf_counter() - t0) * 1000
        if r.status_code != 200 or len(r.content) != 13:
            raise ApiError(f"{mode} /small: HTTP {r.status_code}: {r.text[:200]}")
        return ms

    async def _latency(self) -> None:
        p = self.plan
        log(f"preview latency: {p.warmup} warm-up + {p.requests} GET /small per mode, modes rotated")
        unit, what = WHAT["small"]
        for i in range(p.warmup + p.requests):
            for mode in _rot(i):
                series = self.res.s(f"small_{mode}", unit, f"{MODE_WHAT[mode]}: {what}")
                try:
                    ms = await self._small(mode)
                except FAILURES as exc:
                    series.fail(f"{type(exc).__name__}: {exc}")
                    continue
                if i >= p.warmup:
                    series.add(ms)

    async def _round(self, mode: str, seconds: float, concurrency: int) -> tuple[int, float, int]:
        """(completed, elapsed s, failed) for `concurrency` workers looping GET /small."""
        c = self.clients[mode]
        done = failed = 0
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done, failed
            while time.perf_counter() < deadline:
                try:
                    r = await c.get("/small")
                    if r.status_code == 200:
                        done += 1
                    else:
                        failed += 1
                except FAILURES:
                    failed += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done, time.perf_counter() - t0, failed

    async def _throughput(self) -> None:
        p = self.plan
        log(f"preview req/s: {p.rps_rounds} rounds x {p.rps_seconds:g} s per mode, {p.concurrency} concurrent, "
            "modes rotated")
        unit, what = WHAT["rps"]
        what = what.format(c=p.concurrency, t=p.rps_seconds)
        for mode in MODES:  # warm the pools to `concurrency` connections
            await self._round(mode, min(0.5, p.rps_seconds), p.concurrency)
        for i in range(p.rps_rounds):
            for mode in _rot(i):
                done, elapsed, failed = await self._round(mode, p.rps_seconds, p.concurrency)
                series = self.res.s(f"rps_{mode}", unit, f"{MODE_WHAT[mode]}: {what}")
                series.add(done / elapsed)
                for _ in range(failed):
                    series.fail("request failed during a throughput round")

    async def _download(self, mode: str, n: int) -> float:
        c = self.clients[mode]
        got = 0
        t0 = time.perf_counter()
        async with c.stream("GET", "/big", params={"n": n}) as r:
            if r.status_code != 200:
                await r.aread()
                raise ApiError(f"{mode} /big: HTTP {r.status_code}: {r.text[:200]}")
            async for chunk in r.aiter_raw():
                got += len(chunk)
        secs = time.perf_counter() - t0
        if got != n:
            raise ApiError(f"{mode} /big: {got} bytes, expected {n}")
        return n / 1e6 / secs

    async def _big(self) -> None:
        p = self.plan
        if p.big_reps <= 0 or p.big_mb <= 0:
            return
        log(f"preview download: {p.big_reps} x {p.big_mb} MB per mode, modes rotated")
        unit, what = WHAT["big"]
        what = what.format(mb=p.big_mb)
        await self._download("direct", 1_000_000)  # one small warm-up download
        for i in range(p.big_reps):
            for mode in _rot(i):
                series = self.res.s(f"big_{mode}", unit, f"{MODE_WHAT[mode]}: {what}")
                try:
                    series.add(await self._download(mode, p.big_mb * 1_000_000))
                except FAILURES as exc:
                    series.fail(f"{type(exc).__name__}: {exc}")


# ------------------------------------------------------------------------- JSON and Markdown


def build_json(res: PreviewResults, head: dict[str, Any], server: dict[str, Any]) -> dict[str, Any]:
    ms = {k: summarize(v).to_json() for k, v in res.series.items()}
    errors = sum(v["errors"] for v in ms.values())
    return {"schema": 1, "kind": "preview", **head, "server": server, "milestones": ms, "extras": res.extras,
            "errors_total": errors, "summary": summary(ms)}


def summary(ms: dict[str, Any]) -> dict[str, Any]:
    """Added latency (proxy - direct) and ratios (proxy / direct), from the same run."""
    out: dict[str, Any] = {}
    d = ms.get("small_direct", {})
    for mode in ("host", "path"):
        s = ms.get(f"small_{mode}", {})
        row: dict[str, Any] = {}
        for stat in ("p50", "p95", "p99"):
            a, b = s.get(stat), d.get(stat)
            row[f"added_{stat}_ms"] = round(a - b, 3) if a is not None and b is not None else None
        rps, rps_d = ms.get(f"rps_{mode}", {}).get("p50"), ms.get("rps_direct", {}).get("p50")
        row["rps_ratio"] = round(rps / rps_d, 3) if rps and rps_d else None
        big, big_d = ms.get(f"big_{mode}", {}).get("p50"), ms.get("big_direct", {}).get("p50")
        row["big_ratio"] = round(big / big_d, 3) if big and big_d else None
        out[mode] = row
    host = out.get("host", {}).get("added_p50_ms")
    path = out.get("path", {}).get("added_p50_ms")
    worst = max((v for v in (host, path) if v is not None), default=None)
    out["target"] = {"limit_ms": 1.0, "added_p50_ms": worst, "met": worst is not None and worst <= 1.0}
    return out


def _f(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit.endswith("/s"):
        return f"{v:,.0f}"
    return f"{v:.2f}" if v < 10 else f"{v:.1f}"


def _added(v: float | None) -> str:
    return "-" if v is None else f"{v:+.2f} ms"


def results_markdown(doc: dict[str, Any]) -> list[str]:
    m = doc["machine"]
    ms = doc["milestones"]
    ex = doc["extras"]
    plan = ex.get("plan", {})
    sm = doc["summary"]
    out = [
        f"Run of {doc['started_at']} ({doc['duration_s']:.0f} s), commit {m['git_commit']}.",
        "",
        "```",
        doc["command"],
        "```",
        "",
        f"Machine: {m['cpu_model']}, {m['nproc']} CPUs, {m['memory_gib']} GiB RAM, kernel {m['kernel']}, "
        f"{m['crun']}, Python {m['python']}, load average at start {m['load_avg']}, "
        f"at end {doc.get('load_avg_end', '?')}. Server: {doc['server'].get('url')} "
        f"({'started by the harness' if doc['server'].get('own') else 'given with --url'}). "
        f"Sandbox: {plan.get('image')}, network none, 256 MB, 1 vCPU; app on port {plan.get('port')}.",
        "",
        f"Failed requests in this run: **{doc['errors_total']}**.",
        "",
        "| milestone | unit | n | errors | p50 | p95 | p99 | min | max | note |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for name, s in ms.items():
        unit = s["unit"]
        note = f"wide ({s['spread']:.1f}x)" if s["wide"] and s["spread"] else ""
        out.append(f"| `{name}` | {unit} | {s['n']} | {s['errors']} | {_f(s['p50'], unit)} | {_f(s['p95'], unit)} | "
                   f"{_f(s['p99'], unit)} | {_f(s['min'], unit)} | {_f(s['max'], unit)} | {note} |")
    out += ["", "Proxy against direct, same run:", "",
            "| route | added p50 | added p95 | added p99 | req/s (median round) | req/s vs direct | "
            "download MB/s (p50) | download vs direct |",
            "|---|--:|--:|--:|--:|--:|--:|--:|"]
    for mode in MODES:
        rps = ms.get(f"rps_{mode}", {}).get("p50")
        big = ms.get(f"big_{mode}", {}).get("p50")
        if mode == "direct":
            out.append(f"| direct | - | - | - | {_f(rps, 'req/s')} | 1.00x | {_f(big, 'MB/s')} | 1.00x |")
            continue
        row = sm.get(mode, {})
        rr, br = row.get("rps_ratio"), row.get("big_ratio")
        out.append(f"| {mode} | {_added(row.get('added_p50_ms'))} | {_added(row.get('added_p95_ms'))} | "
                   f"{_added(row.get('added_p99_ms'))} | {_f(rps, 'req/s')} | "
                   f"{'-' if rr is None else f'{rr:.2f}x'} | {_f(big, 'MB/s')} | "
                   f"{'-' if br is None else f'{br:.2f}x'} |")
    t = sm.get("target", {})
    added = t.get("added_p50_ms")
    out += ["", f"Target (issue 7): at most 1 ms added at p50 for small responses: worst route "
            f"{'-' if added is None else f'{added:+.2f} ms'}, **{'met' if t.get('met') else 'not met'}**.", ""]
    errs = [(n, s) for n, s in ms.items() if s["errors"]]
    if errs or ex.get("cleanup_errors"):
        out += ["Failures (first messages):", ""]
        out += [f"- `{n}`: {s['errors']} x {'; '.join(s['error_messages'][:2])}" for n, s in errs]
        out += [f"- cleanup: {e}" for e in ex.get("cleanup_errors", [])[:5]]
        out.append("")
    return out


def section(doc: dict[str, Any]) -> str:
    """The whole "Preview proxy" section of docs/benchmarks.md, markers included."""
    body = TEMPLATE.read_text().replace("{{RESULTS}}", "\n".join(results_markdown(doc)))
    return PREVIEW.wrap(body)
