"""The `stacyvm` command against a live server: spawn, exec, ls, logs, kill, doctor."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

from tests.conftest import ServerProc, start_server, stop_server


def stacyvm(*args: str, url: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STACYVM_")}
    if url:
        env["STACYVM_URL"] = url
    res = subprocess.run(
        [sys.executable, "-m", "stacyvm_server", *args], capture_output=True, text=True, env=env, timeout=120
    )
    if check:
        assert res.returncode == 0, f"stacyvm {' '.join(args)}: rc={res.returncode}\n{res.stdout}\n{res.stderr}"
    return res


def test_version() -> None:
    assert stacyvm("version").stdout.startswith("stacyvm-server ")


def test_client_commands(open_server: ServerProc, test_images: dict[str, str]) -> None:
    url = open_server.base_url
    sid = stacyvm("spawn", "--image", test_images["busybox"], "--ttl", "5m", url=url).stdout.strip()
    assert sid.startswith("sb_")
    try:
        assert sid in stacyvm("ls", url=url).stdout
        # argv mode by default: the words are not re-split by a shell.
        out = stacyvm("exec", sid, "--", "echo", "a  b", url=url)
        assert out.stdout == "a  b\n"
        shell = stacyvm("exec", sid, "--shell", "--", "echo $((6*7)); exit 3", url=url, check=False)
        assert shell.stdout == "42\n"
        assert shell.returncode == 3  # the command's exit code becomes ours
        err = stacyvm("exec", sid, "--shell", "--", "echo oops >&2", url=url)
        assert err.stderr == "oops\n"
        stacyvm("logs", sid, url=url)
    finally:
        assert f"destroyed {sid}" in stacyvm("kill", sid, url=url).stdout
    gone = stacyvm("exec", sid, "--", "true", url=url, check=False)
    assert gone.returncode == 1
    assert "not found" in gone.stderr


def test_plain_errors() -> None:
    res = stacyvm("ls", url="http://127.0.0.1:9", check=False)
    assert res.returncode == 1
    assert "cannot reach the server" in res.stderr
    assert "Traceback" not in res.stderr


def test_doctor_passes_on_prepared_host() -> None:
    res = stacyvm("doctor", check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "all checks passed" in res.stdout


def test_doctor_names_a_data_dir_sandboxes_cannot_reach() -> None:
    """A 0700 directory above data_dir (mkdtemp, /root) would fail every native create with
    EACCES: doctor (and the provider at start) names it and the fix."""
    shut = Path(tempfile.mkdtemp(prefix="stacyvm-doctor-", dir="/var/tmp"))  # mode 0700
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("STACYVM_")}
        env["STACYVM_SERVER_DATA_DIR"] = str(shut / "data")
        cmd = [sys.executable, "-m", "stacyvm_server", "doctor"]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
        assert res.returncode == 1, res.stdout + res.stderr
        assert f"[FAIL] data-dir-traversable: {shut} (mode 0700)" in res.stdout
        assert f"chmod o+x {shut}" in res.stdout
        shut.chmod(0o711)
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
        assert res.returncode == 0 and "[ok  ] data-dir-traversable" in res.stdout, res.stdout + res.stderr
    finally:
        shutil.rmtree(shut, ignore_errors=True)


def _image_cmd(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STACYVM_")}
    env["STACYVM_IMAGES_CACHE_DIR"] = str(cache)
    res = subprocess.run(
        [sys.executable, "-m", "stacyvm_server", "image", *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert res.returncode == 0, f"image {' '.join(args)}: {res.stdout}\n{res.stderr}"
    return res


def test_image_commands(tmp_path: Path, test_images: dict[str, str]) -> None:
    ref = test_images["busybox"]
    cache = tmp_path / "cache"
    pulled = _image_cmd("pull", ref, cache=cache).stdout
    assert ref in pulled and "sha256:" in pulled
    assert ref in _image_cmd("ls", cache=cache).stdout
    _image_cmd("rm", ref, cache=cache)
    assert ref not in _image_cmd("ls", cache=cache).stdout
    assert "freed" in _image_cmd("prune", cache=cache).stdout
    assert not any((cache / "rootfs").iterdir())


def test_image_prune_keeps_what_a_sandbox_uses(tmp_path: Path, test_images: dict[str, str]) -> None:
    """`stacyvm image prune` beside a running server never removes a rootfs a sandbox is built on."""
    server = start_server(tmp_path / "srv")
    try:
        with httpx.Client(base_url=server.base_url + "/api/v1", timeout=60) as c:
            sid = c.post("/sandboxes", json={"image": test_images["busybox"]}).json()["id"]
            cache = server.data_dir / "images"
            _image_cmd("rm", test_images["busybox"], cache=cache)
            _image_cmd("prune", cache=cache)
            assert any((cache / "rootfs").iterdir())
            r = c.post(f"/sandboxes/{sid}/exec", json={"command": "ls /bin/sh && echo ok"})
            assert r.json()["stdout"].endswith("ok\n"), r.text
            assert c.delete(f"/sandboxes/{sid}").status_code == 200
    finally:
        stop_server(server)
        shutil.rmtree(server.data_dir, ignore_errors=True)


def test_serve_refuses_remote_bind_without_keys(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STACYVM_")}
    env["STACYVM_SERVER_DATA_DIR"] = str(tmp_path)
    res = subprocess.run(
        [sys.executable, "-m", "stacyvm_server", "serve", "--host", "0.0.0.0"],
        capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path,
    )
    assert res.returncode == 1
    assert "refusing to listen on 0.0.0.0 without API keys" in res.stderr


def test_serve_without_keys_binds_loopback(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STACYVM_")}
    env.update(STACYVM_SERVER_DATA_DIR=str(tmp_path / "data"), STACYVM_SERVER_PORT="0", STACYVM_NATIVE_ENABLED="false")
    proc = subprocess.Popen(
        [sys.executable, "-m", "stacyvm_server", "serve"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path,
    )
    try:
        seen = ""
        assert proc.stdout is not None
        for line in proc.stdout:
            seen += line
            if "Uvicorn running on" in line:
                break
        assert "No API keys configured: listening on 127.0.0.1 only" in seen
        assert "Uvicorn running on http://127.0.0.1:" in seen
    finally:
        proc.terminate()
        proc.wait(30)
