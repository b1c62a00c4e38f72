"""`--out` with a microvm-only run: only the "microvm under TCG" section changes (no VM is started).

The harness's --from-json renders a saved run; here the run is a small hand-made
JSON document in the shape bench/report.py writes, so the test costs no QEMU time.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import REPO

# bench/report.py's markers (tests/bench shadows the bench package here, so not imported)
BEGIN, END = "<!-- microvm-tcg:begin -->", "<!-- microvm-tcg:end -->"
PREVIEW = "<!-- preview-proxy:begin -->\n## Preview proxy\n\npreview numbers\n<!-- preview-proxy:end -->"
PAGE = ("# StacyVM benchmarks\n\n## Current results\n\n### native: kept numbers\n\n### docker: kept rows\n\n"
        f"{PREVIEW}\n\n## Not measured yet\n\n* kept too\n")


def _m(p50: float, unit: str = "ms") -> dict[str, Any]:
    return {"unit": unit, "what": "x", "n": 3, "errors": 0, "error_messages": [], "p50": p50, "p95": p50,
            "p99": p50, "min": p50, "max": p50, "mean": p50, "spread": 1.0, "wide": False}


def _doc() -> dict[str, Any]:
    server = {name: {**_m(v), "raw_p50": v / 2, "ratio_p50": 2.0}
              for name, v in (("first_create", 4000.0), ("cold_boot", 3000.0), ("create", 400.0),
                              ("exec_true", 45.0), ("destroy", 20.0))}
    machine = {"git_commit": "abc", "cpu_model": "cpu", "nproc": 2, "memory_gib": 1, "os": "os", "kernel": "k",
               "crun": "crun", "python": "3.11", "load_avg": "0 0 0"}
    plan = {"iterations": 2, "exec_iterations": 5, "python_iterations": 3, "warmup": 1, "bursts": [10],
            "file_reps": 1, "file_mb": 2, "density": 2}
    prov = {"provider": "microvm", "runtime": "tcg", "baseline": "raw_qemu_tcg", "plan": plan,
            "server": {"url": "http://127.0.0.1:1", "own": True, "version": "0"}, "raw": {},
            "milestones": server, "extras": {"first_create_ms": {"reg/busybox:1.35": 4000.0}}}
    return {"schema": 1, "command": "python -m bench --providers microvm", "mode": "quick",
            "started_at": "2026-01-01T00:00:00Z", "duration_s": 1.0, "load_avg_end": "0 0 0", "machine": machine,
            "providers_failed": {}, "providers": {"microvm": prov},
            "baselines": {"raw_qemu_tcg": {"bundle": "qemu_argv", "rootfs_source": "disks",
                                           "milestones": {"create": _m(200.0), "cold_boot": _m(1500.0)}}},
            "errors_total": 0, "targets": [], "docker_targets": []}


def _render(tmp: Path, page: str | None) -> str:
    doc, out = tmp / "mv.json", tmp / "benchmarks.md"
    doc.write_text(json.dumps(_doc()))
    if page is not None:
        out.write_text(page)
    res = subprocess.run([sys.executable, "-m", "bench", "--from-json", str(doc), "--out", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    return out.read_text()


def test_microvm_run_replaces_only_its_section(tmp_path: Path) -> None:
    first = _render(tmp_path, PAGE)
    head, _, rest = first.partition(BEGIN)
    section, _, tail = rest.partition(END)
    assert head == PAGE[:PAGE.index("<!-- preview-proxy:begin -->")]  # everything above it untouched
    assert tail.strip().startswith(PREVIEW)  # the preview section and what follows survive
    assert "* kept too" in tail
    assert "## microvm under TCG" in section and "| `first_create` |" in section
    assert "### microvm: microvm provider with tcg" in section and "raw QEMU (TCG)" in section
    assert "excluded from `create` as warm-up" in section and "{{" not in section
    # A second run replaces the section in place: one section, nothing else moved.
    again = _render(tmp_path, first)
    assert again.count(BEGIN) == 1 and again == first
