"""Smoke check of the benchmark harness against a live server.

It runs `python -m bench` with very few samples and checks the shape of the
JSON: every milestone present, samples taken, zero failed operations, and no
leftovers. It never asserts a timing: this machine is too small and shared for
timing asserts to mean anything in a test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from tests.conftest import REPO, ServerProc
from tests.providers import docker_fixtures
from tests.providers.docker_fixtures import docker_api

SERVER_MILESTONES = (
    "create", "create_to_first_exec", "exec_true", "exec_python", "http_health", "http_health_httpx",
    "stream_ttfb", "stream_total", "destroy", "burst_10", "file_write", "file_read", "density_create",
)
docker_daemon = docker_fixtures.docker_daemon  # a session fixture, used by the docker smoke run

RAW_MILESTONES = (
    "create", "runtime_create", "runtime_start", "create_to_first_exec", "exec_true", "exec_python",
    "stream_ttfb", "destroy", "burst_10", "file_write", "file_read",
)


@pytest.fixture(scope="module")
def bench_result(open_server: ServerProc, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench")
    json_path, md_path = out / "latest.json", out / "benchmarks.md"
    cmd = [
        sys.executable, "-m", "bench", "--quick", "--providers", "native",
        "--url", open_server.base_url, "--data-dir", str(open_server.data_dir),
        "--iterations", "3", "--warmup", "1", "--bursts", "10", "--density", "3",
        # 4 MB as base64 is larger than this server's 4 MiB body limit: the split path runs too.
        "--file-mb", "4", "--json", str(json_path), "--out", str(md_path),
    ]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, f"bench failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    doc: dict[str, Any] = json.loads(json_path.read_text())
    doc["_markdown"] = md_path.read_text()
    return doc


def test_all_milestones_measured_without_errors(bench_result: dict[str, Any]) -> None:
    ms = bench_result["providers"]["native"]["milestones"]
    raw = bench_result["baselines"]["raw_crun"]["milestones"]
    for name in SERVER_MILESTONES:
        assert name in ms, f"missing server milestone {name}"
        assert ms[name]["n"] > 0 and ms[name]["errors"] == 0, (name, ms[name]["error_messages"])
    for name in RAW_MILESTONES:
        assert name in raw, f"missing raw milestone {name}"
        assert raw[name]["n"] > 0 and raw[name]["errors"] == 0, (name, raw[name]["error_messages"])
    assert bench_result["errors_total"] == 0
    for name in ("create", "exec_true", "destroy"):
        assert ms[name]["ratio_p50"] is not None  # a raw baseline stood beside it


def test_density_and_cleanup(bench_result: dict[str, Any]) -> None:
    extras = bench_result["providers"]["native"]["extras"]
    density = extras["density"]
    assert density["held"] == density["requested"] == 3
    assert density["leftover_cgroups"] == []
    assert density["per_sandbox_bytes"]["cgroup_usage"] > 0
    assert not extras.get("cleanup_errors")
    assert extras["file_requests_per_write"] >= 2  # the body limit forced the split


def test_report_has_machine_targets_and_command(bench_result: dict[str, Any]) -> None:
    machine = bench_result["machine"]
    assert machine["nproc"] > 0 and machine["kernel"] and machine["crun"]
    assert {t["milestone"] for t in bench_result["targets"]} == {"create", "exec_true"}
    md = bench_result["_markdown"]
    assert "python -m bench" in md and "| `exec_true` |" in md and "{{" not in md


@pytest.fixture(scope="module")
def docker_bench_result(docker_daemon: None, test_images: dict[str, str],
                        tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The docker provider (runc) beside raw Docker API calls: a server of the harness's own, tiny plan."""
    out = tmp_path_factory.mktemp("bench-docker")
    json_path = out / "docker.json"
    cmd = [
        sys.executable, "-m", "bench", "--quick", "--providers", "docker",
        "--iterations", "2", "--exec-iterations", "4", "--warmup", "0", "--bursts", "3",
        "--file-mb", "1", "--json", str(json_path),
    ]
    before = _raw_bench_containers()
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, f"bench failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    doc: dict[str, Any] = json.loads(json_path.read_text())
    doc["_leftovers"] = sorted(_raw_bench_containers() - before)
    return doc


def _raw_bench_containers() -> set[str]:
    """Names of the raw Docker baseline's containers on this dockerd (any state)."""
    found = docker_api("GET", "/containers/json", all="1", filters=json.dumps({"label": ["stacyvm.bench=raw"]}))
    return {n for c in found.json() for n in c["Names"] if n.startswith("/stacyvm-bench-raw-")}


def test_docker_milestones_beside_raw_docker(docker_bench_result: dict[str, Any]) -> None:
    prov = docker_bench_result["providers"]["docker"]
    assert prov["provider"] == "docker" and prov["runtime"] == "runc"
    ms = prov["milestones"]
    raw = docker_bench_result["baselines"]["raw_docker_runc"]["milestones"]
    for name in ("create", "create_to_first_exec", "exec_true", "exec_python", "stream_ttfb", "destroy",
                 "burst_3", "file_write", "file_read"):
        assert ms[name]["n"] > 0 and ms[name]["errors"] == 0, (name, ms[name]["error_messages"])
        assert raw[name]["n"] > 0 and raw[name]["errors"] == 0, (name, raw[name]["error_messages"])
        assert ms[name]["ratio_p50"] is not None
    assert not prov["extras"].get("cleanup_errors")
    assert {t["milestone"] for t in docker_bench_result["docker_targets"]} == {"create", "exec_true", "destroy"}
    assert docker_bench_result["_leftovers"] == []
