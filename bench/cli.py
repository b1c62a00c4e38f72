"""`python -m bench`: measure, print the table, optionally write docs/benchmarks.md and JSON."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from bench import memory
from bench import preview as preview_bench
from bench import server as own_server
from bench.api import Api, ApiError
from bench.machine import describe
from bench.raw import RawCrun, RawError, server_rootfs, uid_shift, umoci_rootfs
from bench.raw_docker import DockerCgroups, RawDocker
from bench.raw_microvm import RawMicroVM
from bench.report import (
    SEPARATE,
    build_json,
    microvm_section,
    results_markdown,
    write_markdown,
)
from bench.runner import Plan, Results, Runner, log
from bench.sections import MICROVM, PREVIEW
from stacyvm_server.config import MicroVMConfig
from stacyvm_server.providers.microvm import assets as assets_mod
from stacyvm_server.providers.microvm.provider import guest_mem_mb

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = Path(__file__).with_name("benchmarks_template.md")
BUSYBOX = "127.0.0.1:5000/stacyvm/busybox:1.35"
PYTHON = "127.0.0.1:5000/stacyvm/debian-python:3.11"
# OCI layouts kept by scripts/build-test-images.sh: the raw side's fallback source.
OCI_CACHE = Path("/var/cache/stacyvm/oci")
# Provider label -> (provider, its OCI runtime; for microvm its accelerator, see --microvm-accel).
PROVIDERS = {"native": ("native", "crun"), "native-runsc": ("native", "runsc"),
             "docker": ("docker", "runc"), "docker-crun": ("docker", "crun"), "docker-runsc": ("docker", "runsc"),
             "microvm": ("microvm", "tcg")}
MICROVM_TEMPLATE = Path(__file__).with_name("microvm_template.md")
MICROVM_CGROUPS = Path("/sys/fs/cgroup/memory/stacyvm-microvm")
# What the raw QEMU side measures, in place of the crun descriptions.
MICROVM_RAW_WHAT = {
    "create": "qcow2 overlay on the snapshot's disk + QEMU -incoming (same argv) + QMP until running + agent ping",
    "runtime_create": "spawn QEMU -incoming -> QMP query-status says the state is loaded, `cont` sent (restore)",
    "runtime_start": "connect to the agent socket + `ping` answered (first agent reply after the restore)",
    "create_to_first_exec": "raw create above + the first exec of true over the agent socket",
    "exec_true": "an `exec` channel of true on the open agent connection -> `started` -> `exit` (code 0)",
    "exec_python": "the same exec of python3 -c pass in a debian-python VM",
    "stream_ttfb": "an exec channel of the same sh command -> first stdout DATA frame",
    "stream_total": "the same -> `exit`",
    "destroy": "close the agent connection, SIGKILL QEMU until gone, remove the VM's directory",
    "file_write": "the agent's `write` op: N MB as DATA frames within the credit window, EOF, `done`",
    "file_read": "the agent's `read` op of that file to its final message",
    "cold_boot": "qcow2 overlay on the image disk + spawn QEMU (cold, same argv) -> agent `ping` answered",
    "first_create": "cold boot above + QMP stop/migrate to a file (snapshot) + the first restore to ping "
                    "(sum of the parts)",
}
# Server-side milestones that exist only for microvm.
MICROVM_WHAT = {
    "first_create": "the first POST /sandboxes of the measured shape (image and its disk cached): cold boot, "
                    "snapshot save, then the restore -> 201 running. Excluded from `create` as warm-up",
    "cold_boot": "the provider's own timer for a shape's cold boot (overlay + QEMU spawn -> agent ping), "
                 "read from snapshots/<shape>/meta.json; one sample per image",
}
DOCKER_SOCKET = "/var/run/docker.sock"
# What the raw Docker side measures, in place of the crun descriptions.
DOCKER_RAW_WHAT = {
    "create": "POST /containers/create (the provider's body: same hardening and limits) + POST /start",
    "runtime_create": "POST /containers/create alone",
    "runtime_start": "POST /containers/{id}/start alone",
    "create_to_first_exec": "raw create above + the first exec of true (as exec_true)",
    "exec_true": "POST /containers/{id}/exec + POST /exec/{id}/start (hijacked, read to EOF) + GET /exec/{id}/json",
    "exec_python": "the same exec of python3 -c pass in a debian-python container",
    "stream_ttfb": "exec create + start of the same sh command -> first byte of the multiplexed stream",
    "stream_total": "the same -> EOF + exec inspect",
    "destroy": "DELETE /containers/{id}?force=1&v=1",
    "file_write": "PUT /containers/{id}/archive?path=/tmp with a one-file tar of N MB (tar built before the clock)",
    "file_read": "GET /containers/{id}/archive?path=<file> to the last byte (untarred after the clock)",
}


def run_head(command: str, quick: bool, started: datetime, t0: float, machine: Any) -> dict[str, Any]:
    """What every results JSON says about its run: command, mode, time, load, machine."""
    return {
        "command": command.strip(),
        "mode": "quick" if quick else "full",
        "started_at": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "duration_s": round(time.monotonic() - t0, 1),
        "load_avg_end": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "machine": machine.to_json(),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="fewer samples: under a minute, for use before a commit")
    p.add_argument("--providers", default="native",
                   help="comma-separated: native (crun), native-runsc (gVisor, ptrace), docker (runc), "
                        "docker-crun, docker-runsc (Docker with gVisor), microvm (QEMU microvm, TCG; its own "
                        "section of --out); --url takes one")
    p.add_argument("--url", help="a running server (default: start one in a temp dir)")
    p.add_argument("--api-key", help="API key for --url")
    p.add_argument("--data-dir", type=Path, help="data_dir of the --url server (to reuse its unpacked images)")
    p.add_argument("--iterations", type=int, help="lifecycle and stream samples (default 30, quick 8)")
    p.add_argument("--exec-iterations", type=int, help="exec `true` samples (default 200, quick 40)")
    p.add_argument("--warmup", type=int, help="discarded warm-up iterations per phase (default 3, quick 2)")
    p.add_argument("--bursts", default="10,20,50", help="concurrent-create burst sizes")
    p.add_argument("--file-mb", type=int, default=100, help="file size for the throughput milestone (MB)")
    p.add_argument("--file-reps", type=int, help="file write+read repetitions (default 3, quick 1)")
    p.add_argument("--density", type=int, help="idle sandboxes held for the memory milestone (default 20, quick 5)")
    p.add_argument("--no-raw", action="store_true",
                   help="skip the raw baseline (crun/runsc, Docker API calls, or QEMU driven directly)")
    p.add_argument("--microvm-accel", choices=("tcg", "kvm"), default="tcg",
                   help="accelerator of the microvm provider and its raw QEMU baseline (KVM does not boot our "
                        "guest on the CI host)")
    p.add_argument("--busybox", default=BUSYBOX)
    p.add_argument("--python", default=PYTHON)
    p.add_argument("--out", type=Path, help="write the Markdown report here (e.g. docs/benchmarks.md)")
    p.add_argument("--json", type=Path, dest="json_out", help="write the JSON results here")
    p.add_argument("--from-json", type=Path, help="measure nothing: render --out (and stdout) from a saved JSON run")
    g = p.add_argument_group("preview proxy (--preview: only this, native provider; --out replaces only its section)")
    g.add_argument("--preview", action="store_true",
                   help="measure the preview proxy against a direct connection instead of the other milestones")
    g.add_argument("--preview-requests", type=int, help="small-response samples per route (default 2000, quick 300)")
    g.add_argument("--preview-rounds", type=int, help="req/s rounds per route (default 7, quick 3)")
    g.add_argument("--preview-seconds", type=float, default=2.0, help="length of one req/s round (s)")
    g.add_argument("--preview-concurrency", type=int, default=8, help="concurrent requests in a req/s round")
    g.add_argument("--preview-mb", type=int, default=100, help="size of the large download (MB)")
    g.add_argument("--preview-reps", type=int, help="large downloads per route (default 5, quick 1)")
    g.add_argument("--preview-domain", default="localhost", help="server.preview_domain of a --url server")
    return p.parse_args(argv)


def make_plan(a: argparse.Namespace) -> Plan:
    q = a.quick
    iterations = a.iterations or (8 if q else 30)
    exec_n = a.exec_iterations or (5 * a.iterations if a.iterations else (40 if q else 200))
    return Plan(
        iterations=iterations,
        exec_iterations=exec_n,
        python_iterations=max(3, exec_n // 4),
        warmup=a.warmup if a.warmup is not None else (2 if q else 3),
        bursts=[int(x) for x in a.bursts.split(",") if x.strip()],
        file_mb=a.file_mb,
        file_reps=a.file_reps or (1 if q else 3),
        density=a.density if a.density is not None else (5 if q else 20),
        busybox=a.busybox,
        python=a.python,
        raw=not a.no_raw,
    )


def raw_rootfs(images: list[str], data_dir: Path | None, work: Path, shift: int) -> tuple[dict[str, Path], str]:
    """The server's own unpacked rootfs when we can see it, else our umoci unpack of the same image."""
    found = {ref: server_rootfs(data_dir, ref, shift) for ref in images} if data_dir else {}
    if all(found.get(ref) for ref in images):
        return {ref: p for ref, p in found.items() if p}, "the server's unpacked image cache (same files)"
    out: dict[str, Path] = {}
    for ref in images:
        name, _, tag = ref.rsplit("/", 1)[-1].partition(":")
        out[ref] = umoci_rootfs(OCI_CACHE / name, tag or "latest", work, shift)
    return out, f"umoci unpack of {OCI_CACHE}/<name> (the layouts pushed to the registry)"


def provider_plan(plan: Plan, provider: str, runtime: str, quick: bool = False) -> Plan:
    """runsc deletes take about 1.6 s and each sandbox runs a Sentry: fewer samples, smaller bursts.

    microvm under TCG: every restore costs ~0.3-0.5 s of CPU and the agent moves ~10 MB/s:
    fewer samples, bursts of at most 20, files of at most 20 MB (the report says so).
    """
    if provider == "microvm":
        return dataclasses.replace(
            plan,
            iterations=min(plan.iterations, 5 if quick else 10),
            exec_iterations=min(plan.exec_iterations, 30 if quick else 60),
            python_iterations=min(plan.python_iterations, 5 if quick else 10),
            warmup=min(plan.warmup, 2),
            bursts=[b for b in plan.bursts if b <= (10 if quick else 20)] or [10],
            file_mb=min(plan.file_mb, 10 if quick else 20),
            file_reps=min(plan.file_reps, 1 if quick else 2),
            density=min(plan.density, 3 if quick else 5),
        )
    if runtime != "runsc":
        return plan
    return dataclasses.replace(
        plan,
        iterations=min(plan.iterations, 10),
        exec_iterations=min(plan.exec_iterations, 60),
        python_iterations=min(plan.python_iterations, 15),
        bursts=[b for b in plan.bursts if b <= 10] or [min(plan.bursts, default=10)],
        file_reps=1,
        density=min(plan.density, 5),
    )


def microvm_disk(data_dir: Path, state_dir: Path, ref: str) -> Path:
    """The ext4 image disk the microvm provider built for `ref` (the raw side boots the same file)."""
    try:
        digest = json.loads((data_dir / "images" / "refs.json").read_text())["refs"][ref]["digest"]
    except (OSError, KeyError, ValueError) as exc:
        raise RawError(f"microvm: {ref} not in the server's image store ({exc!r})") from None
    # <hex>.ext4, or <hex>-<free MB>m.ext4 once disks are made per free-space size: take the default size's.
    found = sorted((state_dir / "disks").glob(f"{digest.removeprefix('sha256:')[:32]}*.ext4"))
    default = [p for p in found if p.name.endswith(f"-{MicroVMConfig().disk_free_mb}m.ext4")]
    if not found:
        raise RawError(f"microvm: no image disk for {ref} in {state_dir / 'disks'}")
    return (default or found)[0]


def microvm_cold_boots(state_dir: Path, mem_mb: int) -> list[tuple[str, float]]:
    """(shape key, cold boot ms) the provider recorded when it built each snapshot of guest RAM mem_mb."""
    out = []
    for meta in sorted((state_dir / "snapshots").glob("*/meta.json")):
        try:
            m = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue
        if m.get("shape", {}).get("mem_mb") == mem_mb and "boot_s" in m:
            out.append((meta.parent.name, float(m["boot_s"]) * 1000))
    return out


def microvm_baseline(runner: Runner, plan: Plan, raw: RawMicroVM, disks: dict[str, Path], quick: bool) -> None:
    """Not interleaved: the raw side's cold boots and first create, before the phases start."""
    cold = runner.res.r("cold_boot")
    for image in (plan.busybox, plan.python):
        log(f"raw microvm: cold boot + snapshot of {image}")
        t = raw.prepare(disks[image])
        cold.add(t.boot_ms)
        if image == plan.busybox:
            cid, up = raw.up(disks[image])
            runner.res.r("first_create").add(t.boot_ms + t.save_ms + up.total_ms)
            raw.down(cid)
    for _ in range(0 if quick else 2):
        log("raw microvm: one more cold boot of busybox (no save)")
        cold.add(raw.cold_boot(disks[plan.busybox]))


def microvm_reap(state_dir: Path) -> list[str]:
    """After the server stopped: kill VMs it left behind (QEMU runs in its own session) and their cgroups."""
    from stacyvm_server.providers.microvm import vm

    left = []
    for d in sorted((state_dir / "sandboxes").glob("*")) if (state_dir / "sandboxes").is_dir() else []:
        left.append(d.name)
        try:
            pid = int(json.loads((d / "meta.json").read_text())["pid"])
            vm.kill(pid, vm.VMFiles(d))
        except (OSError, KeyError, ValueError):
            pass
        vm.cgroup_remove(d.name)
    return left


async def measure(a: argparse.Namespace, label: str, plan: Plan, work: Path) -> tuple[Results, dict[str, Any]]:
    """All milestones for one provider: its own server (or --url) and its raw runtime."""
    provider, runtime = PROVIDERS[label]
    if provider == "microvm":
        runtime = a.microvm_accel
    own = None
    url, data_dir, server_pid = a.url, a.data_dir, None
    if not url:
        log(f"{label}: starting a server of our own ({provider}.runtime {runtime})")
        own = own_server.start(work / "server", plan.busybox, runtime, provider)
        url, data_dir, server_pid = own.url, own.data_dir, own.proc.pid
    api = Api(url, a.api_key, max_connections=max([64, *plan.bursts]))
    raw: RawCrun | RawDocker | RawMicroVM | None = None
    baseline = {"docker": f"raw_docker_{runtime}", "microvm": f"raw_qemu_{runtime}"}.get(provider, f"raw_{runtime}")
    state_dir = (own.root / "microvm") if own is not None else (data_dir / "microvm" if data_dir else None)
    info: dict[str, Any] = {"provider": provider, "runtime": runtime, "baseline": baseline,
                            "plan": dataclasses.asdict(plan), "server": {"url": url, "own": own is not None},
                            "raw": {}}
    try:
        info["server"]["version"] = (await api.health()).get("version")
        cgroups: memory.CgroupLocator = (MICROVM_CGROUPS if provider == "microvm" else
                                         DockerCgroups() if provider == "docker" else memory.MEMORY_CGROUPS)
        runner = Runner(api, None, plan, {}, server_pid, cgroups)
        # The server pulls/unpacks; the raw side may then reuse its rootfs (microvm: its image disks).
        runner.warm_images(first_create=provider == "microvm")
        if provider == "microvm" and state_dir is not None:
            for _key, ms in microvm_cold_boots(state_dir, guest_mem_mb(256, MicroVMConfig().guest_overhead_mb)):
                runner.res.s("cold_boot").add(ms)
        if plan.raw and provider == "microvm":
            if state_dir is None or data_dir is None:
                raise RawError("microvm raw baseline: give --data-dir with --url (its image disks are reused)")
            disks = {ref: microvm_disk(data_dir, state_dir, ref) for ref in (plan.busybox, plan.python)}
            raw = RawMicroVM(work / "raw", own_server.MICROVM_ASSETS, runtime)
            microvm_baseline(runner, plan, raw, disks, a.quick)
            runner.raw, runner.rootfs = raw, dict(disks)
            info["raw"] = {"bundle": raw.bundle_source,
                           "rootfs_source": "the server's own ext4 image disks (same files), one qcow2 overlay per VM",
                           "rootfs": {k: str(v) for k, v in disks.items()}}
        elif plan.raw and provider == "docker":
            raw = RawDocker(work / "raw", runtime, DOCKER_SOCKET)
            runner.raw, runner.rootfs = raw, {plan.busybox: plan.busybox, plan.python: plan.python}
            info["raw"] = {"bundle": raw.bundle_source, "docker_version": raw.version,
                           "rootfs_source": "the same image in dockerd's store (pulled by the server's warm-up)"}
        elif plan.raw:
            rootfs, source = raw_rootfs([plan.busybox, plan.python], data_dir, work, uid_shift(runtime))
            raw = RawCrun(work / "raw", kind=runtime)
            runner.raw, runner.rootfs = raw, dict(rootfs)
            info["raw"] = {"bundle": raw.bundle_source, "rootfs_source": source,
                           "rootfs": {k: str(v) for k, v in rootfs.items()}}
        results = await runner.run_all()
        if provider == "docker":
            for name, series in results.raw.items():
                series.what = DOCKER_RAW_WHAT.get(name, series.what)
        if provider == "microvm":
            for name, series in results.raw.items():
                series.what = MICROVM_RAW_WHAT.get(name, series.what)
                if name.startswith("burst_"):
                    series.what = f"latency of each of {name[6:]} concurrent raw restores (as `create`), threads"
            for name, series in results.server.items():
                series.what = MICROVM_WHAT.get(name, series.what)
    finally:
        await api.aclose()
        if raw is not None:
            raw.cleanup()
        if own is not None:
            own_server.stop(own)
            info["server"]["log_tail"] = own.log_tail(15)
            if provider == "microvm" and state_dir is not None and (left := microvm_reap(state_dir)):
                info["server"]["vms_left_behind"] = left
    return results, info


def preview_plan(a: argparse.Namespace) -> preview_bench.PreviewPlan:
    q = a.quick
    return preview_bench.PreviewPlan(
        requests=a.preview_requests or (300 if q else 2000),
        warmup=a.warmup if a.warmup is not None else (20 if q else 100),
        rps_rounds=a.preview_rounds or (3 if q else 7),
        rps_seconds=a.preview_seconds,
        concurrency=a.preview_concurrency,
        big_mb=a.preview_mb,
        big_reps=a.preview_reps if a.preview_reps is not None else (1 if q else 5),
        image=a.python,
        domain=a.preview_domain,
    )


async def measure_preview(a: argparse.Namespace, plan: preview_bench.PreviewPlan,
                          work: Path) -> tuple[preview_bench.PreviewResults, dict[str, Any]]:
    own = None
    url = a.url
    if not url:
        log("preview: starting a server of our own (native provider, crun)")
        own = own_server.start(work / "server", plan.image, "crun", "native")
        url = own.url
    api = Api(url, a.api_key)
    server: dict[str, Any] = {"url": url, "own": own is not None}
    try:
        server["version"] = (await api.health()).get("version")
        results = await preview_bench.PreviewBench(api, url, a.api_key, plan).run()
    finally:
        await api.aclose()
        if own is not None:
            own_server.stop(own)
            server["log_tail"] = own.log_tail(15)
    return results, server


def run_preview(a: argparse.Namespace, argv: list[str] | None) -> int:
    if shutil.which("crun") is None and not a.url:
        print("bench: not installed: crun", file=sys.stderr)
        return 2
    command = "python -m bench " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    started = datetime.now(UTC)
    t0 = time.monotonic()
    machine = describe(REPO)
    work = Path(tempfile.mkdtemp(prefix="stacyvm-bench-preview-"))
    work.chmod(0o711)
    try:
        results, server = asyncio.run(measure_preview(a, preview_plan(a), work))
    except (own_server.ServerError, ApiError, httpx.HTTPError, OSError) as exc:
        print(f"bench: preview: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc = preview_bench.build_json(results, run_head(command, a.quick, started, t0, machine), server)
    if a.json_out:
        a.json_out.parent.mkdir(parents=True, exist_ok=True)
        a.json_out.write_text(json.dumps(doc, indent=1) + "\n")
    render(doc, a.out)
    return 1 if doc["errors_total"] else 0


def render(doc: dict[str, Any], out: Path | None) -> None:
    """Print the results; write --out: the whole page, or only the preview section for a preview run."""
    old = out.read_text() if out and out.exists() else ""
    if doc.get("kind") == "preview":
        print("\n".join(preview_bench.results_markdown(doc)))
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(PREVIEW.splice(old, preview_bench.section(doc)))
        return
    print("\n".join(results_markdown(doc)))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        separate = [label for label in doc["providers"] if label in SEPARATE]
        failed = doc.get("providers_failed", {})
        others = [p for p in [*doc["providers"], *failed] if p not in SEPARATE]
        if others or not old:
            text = write_markdown(doc, TEMPLATE.read_text())
            kept = PREVIEW.extract(old)  # a full run does not measure the preview: keep its section
            text = PREVIEW.splice(text, kept) if kept else text
            mv = MICROVM.extract(old)  # nor, unless asked, the microvm section
            text = MICROVM.splice(text, mv) if mv and not separate else text
        else:
            text = old  # a microvm-only run replaces its own section and nothing else
        if separate:
            text = MICROVM.splice(text, microvm_section(doc, MICROVM_TEMPLATE.read_text()))
        out.write_text(text)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.from_json:
        render(json.loads(a.from_json.read_text()), a.out)
        return 0
    if a.preview:
        return run_preview(a, argv)
    wanted = [p.strip() for p in a.providers.split(",") if p.strip()]
    unknown = [p for p in wanted if p not in PROVIDERS]
    if unknown:
        print(f"bench: providers not measured by this harness yet: {', '.join(unknown)}", file=sys.stderr)
        return 2
    if a.url is not None and len(wanted) != 1:
        print("bench: --url measures one server: give exactly one provider", file=sys.stderr)
        return 2
    missing = [PROVIDERS[p][1] for p in wanted if PROVIDERS[p][0] == "native" and shutil.which(PROVIDERS[p][1]) is None]
    if "microvm" in wanted:
        if shutil.which(MicroVMConfig().qemu_path) is None:
            missing.append("qemu-system-x86_64 (scripts/setup-microvm.sh)")
        elif not a.url and assets_mod.load(own_server.MICROVM_ASSETS) is None:
            missing.append(f"guest assets in {own_server.MICROVM_ASSETS} (scripts/setup-microvm.sh)")
    if any(PROVIDERS[p][0] == "docker" for p in wanted) and not os.path.exists(DOCKER_SOCKET):
        missing.append(f"dockerd ({DOCKER_SOCKET}; start it with scripts/setup-docker.sh)")
    if missing:
        print(f"bench: not installed: {', '.join(missing)}", file=sys.stderr)
        return 2
    plan = make_plan(a)
    command = "python -m bench " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    started = datetime.now(UTC)
    t0 = time.monotonic()
    machine = describe(REPO)
    measured: dict[str, tuple[Results, dict[str, Any]]] = {}
    failed: dict[str, str] = {}
    for label in wanted:
        work = Path(tempfile.mkdtemp(prefix=f"stacyvm-bench-{label}-"))
        work.chmod(0o711)  # sandbox roots (host uid 100000) must traverse to their bundles
        try:
            measured[label] = asyncio.run(measure(a, label, provider_plan(plan, *PROVIDERS[label], a.quick), work))
        except (own_server.ServerError, RawError, ApiError, httpx.HTTPError, OSError) as exc:
            # One provider that cannot run (e.g. dockerd went away) must not lose the others' results.
            print(f"bench: {label}: {type(exc).__name__}: {exc}", file=sys.stderr)
            failed[label] = f"{type(exc).__name__}: {str(exc)[:500]}"
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if not measured:
        return 1
    doc = build_json(measured, {**run_head(command, a.quick, started, t0, machine), "providers_failed": failed})
    if a.json_out:
        a.json_out.parent.mkdir(parents=True, exist_ok=True)
        a.json_out.write_text(json.dumps(doc, indent=1) + "\n")
    render(doc, a.out)
    return 1 if failed else 0
