"""The `stacyvm` command against a live server: spawn, exec, ls, logs, kill, doctor."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ServerProc


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
