"""Results as JSON (machine-readable) and as docs/benchmarks.md (for people)."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from bench.runner import Results
from bench.sections import MICROVM
from bench.stats import WIDE_FACTOR, Summary, summarize

# Issue 3 acceptance: (milestone, statistic, limit in ms).
TARGETS = (("create", "p50", 60.0), ("exec_true", "p50", 15.0), ("exec_true", "p99", 40.0))
# Issue 4 acceptance: the docker provider's overhead on top of raw Docker API calls, at p50.
DOCKER_TARGET_MILESTONES = ("create", "exec_true", "destroy")
DOCKER_MAX_RATIO = 1.15


# Providers whose results live in a section of their own (markers below), not under "Current results":
# a run of only these replaces that section and leaves the rest of the page as it is.
SEPARATE = ("microvm",)

# Table order; anything else follows in the order it was measured.
ORDER = (
    "first_create", "cold_boot", "create", "create_to_first_exec", "exec_true", "exec_true_server_duration",
    "exec_python", "exec_python_server_duration", "http_health", "http_health_httpx", "stream_ttfb", "stream_total",
    "destroy", "runtime_create", "runtime_start",
)


def _ordered(d: dict[str, Summary]) -> dict[str, Summary]:
    rank = {n: i for i, n in enumerate(ORDER)}
    return dict(sorted(d.items(), key=lambda kv: rank.get(kv[0], len(ORDER))))


def _ratio(server: Summary, raw: Summary | None) -> float | None:
    if raw is None or not server.p50 or not raw.p50:
        return None
    return round(server.p50 / raw.p50, 2)


def build_json(measured: dict[str, tuple[Results, dict[str, Any]]], head: dict[str, Any]) -> dict[str, Any]:
    providers: dict[str, Any] = {}
    baselines: dict[str, Any] = {}
    errors = 0
    for label, (res, info) in measured.items():
        server = _ordered({k: summarize(v) for k, v in res.server.items()})
        raw = _ordered({k: summarize(v) for k, v in res.raw.items()})
        milestones: dict[str, Any] = {}
        for name, s in server.items():
            entry = s.to_json()
            base = raw.get(name)
            entry["raw_p50"] = base.p50 if base else None
            entry["ratio_p50"] = _ratio(s, base)
            milestones[name] = entry
        providers[label] = {**info, "milestones": milestones, "extras": res.extras}
        baselines[info["baseline"]] = {**info["raw"], "milestones": {k: v.to_json() for k, v in raw.items()}}
        errors += sum(s.errors for s in server.values()) + sum(s.errors for s in raw.values())
    targets = []
    native = providers.get("native", {}).get("milestones", {})
    for name, stat, limit in TARGETS:
        value = native.get(name, {}).get(stat)
        targets.append({"provider": "native", "milestone": name, "stat": stat, "limit_ms": limit,
                        "value_ms": value, "met": value is not None and value <= limit})
    return {"schema": 1, **head, "providers": providers, "baselines": baselines, "errors_total": errors,
            "targets": targets, "docker_targets": docker_targets(providers)}


def docker_targets(providers: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 4: ours / raw Docker at p50, from the unrounded p50s (ratio_p50 is rounded to 0.01)."""
    out = []
    for label, prov in providers.items():
        if prov.get("provider") != "docker":
            continue
        for name in DOCKER_TARGET_MILESTONES:
            m = prov["milestones"].get(name, {})
            ours, raw = m.get("p50"), m.get("raw_p50")
            ratio = round(ours / raw, 4) if ours and raw else None
            out.append({"provider": label, "milestone": name, "stat": "p50", "value_ms": ours, "raw_ms": raw,
                        "ratio": ratio, "max_ratio": DOCKER_MAX_RATIO,
                        "met": ratio is not None and ratio <= DOCKER_MAX_RATIO})
    return out


# ---------------------------------------------------------------------------- markdown


def _f(v: float | None, unit: str = "ms") -> str:
    if v is None:
        return "-"
    if unit == "MB/s":
        return f"{v:.0f}"
    return f"{v:.1f}" if v < 100 else f"{v:.0f}"


def _row(name: str, s: dict[str, Any], with_raw: bool) -> str:
    unit = s["unit"]
    cells = [f"`{name}`", unit, str(s["n"]), f"**{s['errors']}**" if s["errors"] else "0",
             _f(s["p50"], unit), _f(s["p95"], unit), _f(s["p99"], unit), _f(s["min"], unit), _f(s["max"], unit)]
    if with_raw:
        cells += [_f(s.get("raw_p50"), unit), f"{s['ratio_p50']:.2f}x" if s.get("ratio_p50") else "-"]
    note = f"wide ({s['spread']:.1f}x)" if s["wide"] and s["spread"] else ""
    cells.append(note)
    return "| " + " | ".join(cells) + " |"


def _table(rows: dict[str, Any], with_raw: bool) -> list[str]:
    head = "| milestone | unit | n | errors | p50 | p95 | p99 | min | max |"
    sep = "|---|---|--:|--:|--:|--:|--:|--:|--:|"
    if with_raw:
        head += " raw p50 | ratio p50 |"
        sep += "--:|--:|"
    out = [head + " note |", sep + "---|"]
    out += [_row(name, s, with_raw) for name, s in rows.items()]
    return out


def _kib(b: int) -> str:
    return f"{b / 1024:,.0f}"


def _breakdown(ms: dict[str, Any], raw: dict[str, Any], runtime: str) -> list[str]:
    """Where an exec's time goes, from p50s of this run (differences of medians: approximate)."""
    def p50(d: dict[str, Any], k: str) -> float | None:
        return d[k]["p50"] if k in d and d[k]["p50"] is not None else None

    out: list[str] = []
    for name in ("exec_true", "exec_python"):
        total, inner, base = p50(ms, name), p50(ms, f"{name}_server_duration"), p50(raw, name)
        if total is None or inner is None or base is None:
            continue
        floor = p50(ms, "http_health") or 0.0
        out.append(
            f"- `{name}` p50 {total:.1f} ms = raw {runtime} exec {base:.1f} ms"
            f" + provider/exec plumbing beyond raw {runtime} {inner - base:.1f} ms (server-reported {inner:.1f} ms)"
            f" + HTTP and core around it {total - inner:.1f} ms (of which the bare HTTP floor is {floor:.1f} ms)."
        )
    if out:
        out = ["Where the exec time goes (differences of p50s, approximate):", "", *out, ""]
    return out


def _drift(signal: int, drift: int | None) -> str:
    """A warning when the host moved as much on its own as while our sandboxes were held."""
    if drift is None or abs(drift) < abs(signal) / 2:
        return ""
    return f" (not meaningful: the host drifted {drift / 1024:+,.0f} KiB over the run)"


def results_markdown(doc: dict[str, Any], only: Collection[str] | None = None,
                     exclude: Collection[str] = ()) -> list[str]:
    """The run's header and the sections of its providers (`only` these, none of `exclude`)."""
    def wanted(label: str) -> bool:
        return (only is None or label in only) and label not in exclude

    m = doc["machine"]
    out = [
        f"Run of {doc['started_at']} ({doc['duration_s']:.0f} s), mode `{doc['mode']}`, "
        f"commit {m['git_commit']}.",
        "",
        "```",
        doc["command"],
        "```",
        "",
        f"Machine: {m['cpu_model']}, {m['nproc']} CPUs, {m['memory_gib']} GiB RAM, {m['os']}, kernel {m['kernel']}, "
        f"{m['crun']}, {m.get('runsc', 'runsc ?')}, Python {m['python']}, load average at start {m['load_avg']}, "
        f"at end {doc.get('load_avg_end', '?')}.",
        "",
        f"Failed operations in this run, all providers and baselines: **{doc['errors_total']}**.",
        "",
    ]
    for label, why in doc.get("providers_failed", {}).items():
        if wanted(label):
            out += [f"**{label} could not be measured in this run**: {why}", ""]
    for label, prov in doc["providers"].items():
        if wanted(label):
            out += _provider_markdown(label, prov, doc["baselines"].get(prov["baseline"], {}))
    if doc["targets"] and "native" in doc["providers"] and wanted("native"):
        out += ["### issue 3 targets (native with crun, image cached)", "",
                "| target | measured | met |", "|---|--:|---|"]
        for t in doc["targets"]:
            v = "-" if t["value_ms"] is None else f"{t['value_ms']:.1f} ms"
            met = "yes" if t["met"] else "**no**"
            out.append(f"| {t['milestone']} {t['stat']} <= {t['limit_ms']:.0f} ms | {v} | {met} |")
        out.append("")
    if any(wanted(t["provider"]) for t in doc.get("docker_targets", [])):
        out += ["### issue 4 target: docker overhead on top of raw Docker API calls <= 15% at p50", "",
                "| provider | milestone | ours p50 | raw Docker p50 | overhead | met |", "|---|---|--:|--:|--:|---|"]
        for t in doc["docker_targets"]:
            ours = "-" if t["value_ms"] is None else f"{t['value_ms']:.1f} ms"
            raw = "-" if t["raw_ms"] is None else f"{t['raw_ms']:.1f} ms"
            over = "-" if t["ratio"] is None else f"{(t['ratio'] - 1) * 100:+.1f}%"
            out.append(f"| {t['provider']} | {t['milestone']} | {ours} | {raw} | {over} | "
                       f"{'yes' if t['met'] else '**no**'} |")
        out.append("")
    return out


def _provider_markdown(label: str, prov: dict[str, Any], base: dict[str, Any]) -> list[str]:
    ms = prov["milestones"]
    raw = base.get("milestones", {})
    ex = prov["extras"]
    kind = prov.get("provider", "native")
    rt = {"native": prov["runtime"], "docker": f"Docker API ({prov['runtime']})",
          "microvm": f"QEMU ({prov['runtime'].upper()})"}.get(kind, prov["runtime"])
    srv = prov["server"]
    out = [
        f"### {label}: {kind} provider with {prov['runtime']}, through HTTP, beside raw {rt}",
        "",
        f"Server: {srv['url']} ({'started by the harness' if srv['own'] else 'given with --url'}, "
        f"version {srv.get('version', '?')}). Raw bundle: {base.get('bundle', 'not run')}. "
        f"Raw rootfs: {base.get('rootfs_source', 'not run')}.",
        "",
        *(_microvm_notes(prov) if kind == "microvm" else []),
        *_table(ms, with_raw=True),
        "",
        f"Raw {rt} baseline (same run, interleaved):",
        "",
        *_table(raw, with_raw=False),
        "",
    ]
    bursts = [k for k in ms if k.startswith("burst_")]
    if bursts:
        out += ["| burst | server wall (ms) | server destroy-all wall (ms) | raw wall (ms) |", "|---|--:|--:|--:|"]
        for k in bursts:
            out.append(f"| {k.removeprefix('burst_')} concurrent creates | {ex.get(k + '_wall_ms', '-')} | "
                       f"{ex.get(k + '_destroy_wall_ms', '-')} | {ex.get('raw_' + k + '_wall_ms', '-')} |")
        out.append("")
    d = ex.get("density")
    if d:
        per = d["per_sandbox_bytes"]
        out += [
            f"Density: {d['held']} of {d['requested']} idle sandboxes held "
            f"({d['procs_per_sandbox']} host processes each; leftover cgroups after destroy: "
            f"{len(d['leftover_cgroups'])}).",
            "",
            "| per idle sandbox | KiB |",
            "|---|--:|",
            f"| cgroup `memory.usage_in_bytes` (rss + page cache + kernel memory) | {_kib(per['cgroup_usage'])} |",
            f"| cgroup `total_rss` (anonymous memory) | {_kib(per['cgroup_rss'])} |",
            f"| cgroup `total_cache` (page cache charged to the sandbox) | {_kib(per['cgroup_cache'])} |",
            f"| sum of VmRSS of the sandbox's processes | {_kib(per['procs_rss'])} |",
            f"| sum of Pss of the sandbox's processes | {_kib(per['procs_pss'])} |",
            f"| growth of the server process tree's RSS / N | {_kib(per['server_rss_delta'])} |",
            f"| growth of host MemTotal - MemAvailable / N (whole host) | {_kib(per['host_used_delta'])}"
            f"{_drift(per['host_used_delta'] * d['held'], d.get('host_used_drift'))} |",
            f"| growth of host unreclaimable slab (SUnreclaim) / N (kernel objects; whole host) | "
            f"{_kib(per['host_slab_unreclaimable_delta'])}"
            f"{_drift(per['host_slab_unreclaimable_delta'] * d['held'], d.get('host_slab_drift'))} |",
            "",
        ]
    out += _breakdown(ms, raw, rt)
    if ex.get("file_mb"):
        out.append(f"File milestone: {ex['file_mb']} MB (10^6 bytes) of random data, "
                   f"{ex.get('file_requests_per_write', 1)} request(s) per write.")
    if ex.get("stream_headers_ms_p50") is not None:
        out.append(f"Streamed exec: response headers arrived after {ex['stream_headers_ms_p50']} ms (p50).")
    errs = [(n, s) for n, s in {**ms, **{f"raw {k}": v for k, v in raw.items()}}.items() if s["errors"]]
    if errs or ex.get("cleanup_errors"):
        out += ["", "Failures (first messages):", ""]
        out += [f"- `{n}`: {s['errors']} x {'; '.join(s['error_messages'][:2])}" for n, s in errs]
        out += [f"- cleanup: {e}" for e in ex.get("cleanup_errors", [])[:5]]
    out.append("")
    return out


def write_markdown(doc: dict[str, Any], intro: str) -> str:
    return intro.replace("{{RESULTS}}", "\n".join(results_markdown(doc, exclude=SEPARATE))).replace(
        "{{WIDE}}", f"{WIDE_FACTOR:g}"
    )


def _microvm_notes(prov: dict[str, Any]) -> list[str]:
    """What the microvm run left out or shrank, said next to its table (never silently)."""
    p = prov.get("plan", {})
    firsts = prov["extras"].get("first_create_ms", {})
    first = ", ".join(f"{k.rsplit('/', 1)[-1]} {v:.0f} ms" for k, v in firsts.items())
    return [
        f"Sizes for microvm under {prov['runtime'].upper()} (reduced from the other providers' plan): "
        f"{p.get('iterations')} lifecycle and stream samples, {p.get('exec_iterations')} `exec true`, "
        f"{p.get('python_iterations')} `python3 -c pass`, {p.get('warmup')} warm-ups per phase, bursts of "
        f"{', '.join(str(b) for b in p.get('bursts', []))}, {p.get('file_reps')} file round trip(s) of "
        f"{p.get('file_mb')} MB, density {p.get('density')}.",
        "",
        "The first create of a shape boots it cold and saves its snapshot; every later create of that shape "
        "restores it. That first create is excluded from `create` as warm-up and reported on its own as "
        "`first_create` (busybox: its image and disk were warmed with another shape first, so it is the "
        f"cold boot + save + first restore alone). First creates in this run, image pull and disk build "
        f"included where they happened: {first or '-'}. `cold_boot` and `first_create` are not interleaved "
        "with the raw side (the raw side's run right after the server's warm-up).",
        "",
    ]


def microvm_section(doc: dict[str, Any], template: str) -> str:
    """The whole "microvm under TCG" section of docs/benchmarks.md, markers included."""
    body = template.replace("{{RESULTS}}", "\n".join(results_markdown(doc, only=SEPARATE)))
    return MICROVM.wrap(body)
