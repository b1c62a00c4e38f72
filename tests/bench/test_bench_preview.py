"""Smoke check of `python -m bench --preview` against a live server (shape only, never a timing)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import httpx
import pytest

from tests.conftest import REPO, ServerProc

# bench/preview.py's markers (tests/bench shadows the bench package here, so not imported)
BEGIN, END = "<!-- preview-proxy:begin -->", "<!-- preview-proxy:end -->"

OTHER = "# StacyVM benchmarks\n\nkept numbers\n\n## Not measured yet\n\n* kept too\n"


def _live(server: ServerProc) -> set[str]:
    return {str(s["id"]) for s in httpx.get(f"{server.base_url}/api/v1/sandboxes", timeout=30).json()}


@pytest.fixture(scope="module")
def preview_result(open_server: ServerProc, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench-preview")
    json_path, md_path = out / "preview.json", out / "benchmarks.md"
    md_path.write_text(OTHER)
    before = _live(open_server)
    cmd = [
        sys.executable, "-m", "bench", "--preview", "--quick", "--url", open_server.base_url,
        "--preview-requests", "20", "--warmup", "2", "--preview-rounds", "1", "--preview-seconds", "0.3",
        "--preview-concurrency", "2", "--preview-mb", "2", "--preview-reps", "1",
        "--json", str(json_path), "--out", str(md_path),
    ]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, f"bench failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    doc: dict[str, Any] = json.loads(json_path.read_text())
    doc["_markdown"] = md_path.read_text()
    doc["_leftovers"] = sorted(_live(open_server) - before)
    return doc


def test_every_route_measured_without_errors(preview_result: dict[str, Any]) -> None:
    ms = preview_result["milestones"]
    for kind in ("small", "rps", "big"):
        for route in ("direct", "host", "path"):
            s = ms[f"{kind}_{route}"]
            assert s["n"] > 0 and s["errors"] == 0, (kind, route, s["error_messages"])
    assert preview_result["errors_total"] == 0
    summary = preview_result["summary"]
    for route in ("host", "path"):
        assert summary[route]["added_p50_ms"] is not None and summary[route]["rps_ratio"] is not None
    assert preview_result["_leftovers"] == []
    assert not preview_result["extras"].get("cleanup_errors")


def test_out_replaces_only_the_preview_section(preview_result: dict[str, Any]) -> None:
    md = preview_result["_markdown"]
    assert md.count(BEGIN) == 1 and md.count(END) == 1
    assert md.startswith("# StacyVM benchmarks\n\nkept numbers\n")
    assert md.index(END) < md.index("## Not measured yet") and "* kept too" in md
    assert "| `small_host` |" in md and "python -m bench --preview" in md and "{{" not in md
