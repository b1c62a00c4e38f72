"""Background processes over a live server: detached start, list, logs, follow, stdin, signal, kill."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import KEYS, ServerProc
from tests.interactive.conftest import api, spawn


def _start(c: httpx.Client, sid: str, **body: Any) -> dict[str, Any]:
    r = c.post(f"/sandboxes/{sid}/processes", json=body)
    assert r.status_code == 201, r.text
    out: dict[str, Any] = r.json()
    assert out["id"].startswith("proc_") and out["status"] == "running"
    return out


def _wait_exit(c: httpx.Client, sid: str, pid: str, timeout: float = 15) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        p: dict[str, Any] = c.get(f"/sandboxes/{sid}/processes/{pid}").json()
        if p["status"] == "exited" or time.monotonic() > deadline:
            return p
        time.sleep(0.05)


def test_detached_process_seen_from_another_connection(open_server: ServerProc, box: str) -> None:
    script = "for i in 1 2 3; do echo $i; sleep 0.2; done; echo warn >&2; exit 7"
    with api(open_server) as c:
        p = _start(c, box, command=script)
    # The creator's connection is gone; a new client finds the process and follows it.
    with api(open_server) as c2:
        listed = c2.get(f"/sandboxes/{box}/processes").json()
        assert p["id"] in [x["id"] for x in listed]
        with c2.stream("GET", f"/sandboxes/{box}/processes/{p['id']}/logs", params={"follow": "true"}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
            lines = [json.loads(line) for line in r.iter_lines() if line]
        out = "".join(x["data"] for x in lines if x["stream"] == "stdout")
        assert out == "1\n2\n3\n"
        assert {"stream": "stderr", "data": "warn\n"} in lines
        assert lines[-1] == {"stream": "exit", "exit_code": 7, "signal": None, "reason": None}
        done = c2.get(f"/sandboxes/{box}/processes/{p['id']}").json()
        assert done["status"] == "exited" and done["exit_code"] == 7 and done["ended_at"]
        logs = c2.get(f"/sandboxes/{box}/processes/{p['id']}/logs").json()
        assert logs["output"] == "1\n2\n3\nwarn\n" and logs["dropped_bytes"] == 0
        text = c2.get(f"/sandboxes/{box}/processes/{p['id']}/logs", params={"format": "text", "offset": 2})
        assert text.text == "2\n3\nwarn\n"
        # Follow from an offset after exit: the rest, then the exit line.
        with c2.stream("GET", f"/sandboxes/{box}/processes/{p['id']}/logs",
                       params={"follow": "true", "format": "text"}) as r:
            assert r.read() == b"1\n2\n3\nwarn\n"


def test_http_server_listed_logged_and_killed(open_server: ServerProc, pybox: str) -> None:
    with api(open_server) as c:
        p = _start(c, pybox, command="python3", args=["-u", "-m", "http.server", "8000"], mode="argv")
    with api(open_server) as c2:
        deadline = time.monotonic() + 15
        while "Serving HTTP" not in c2.get(f"/sandboxes/{pybox}/processes/{p['id']}/logs").json()["output"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        r = c2.post(f"/sandboxes/{pybox}/exec", json={
            "command": "python3 -c \"import urllib.request as u; print(u.urlopen('http://127.0.0.1:8000/').status)\""})
        assert r.json()["stdout"].strip() == "200"
        # The request shows up in the server's log (stderr).
        assert "GET / HTTP" in c2.get(f"/sandboxes/{pybox}/processes/{p['id']}/logs").json()["output"]
    with api(open_server) as c3:
        killed = c3.delete(f"/sandboxes/{pybox}/processes/{p['id']}")
        assert killed.status_code == 200
        assert killed.json()["status"] == "exited" and killed.json()["reason"] == "killed"
        ps = c3.post(f"/sandboxes/{pybox}/exec", json={"command": "ps"}).json()["stdout"]
        assert "http.server" not in ps


def test_stdin_to_background_cat(open_server: ServerProc, box: str) -> None:
    with api(open_server) as c:
        p = _start(c, box, command="cat", mode="argv", stdin=True)
        url = f"/sandboxes/{box}/processes/{p['id']}"
        assert c.post(url + "/stdin", json={"data": "hello\n"}).json() == {"written": 6, "closed": False}
        assert c.post(url + "/stdin", json={"data_b64": "AAH/"}).status_code == 200
        assert c.post(url + "/stdin", json={"close": True}).status_code == 200
        done = _wait_exit(c, box, p["id"])
        assert done["exit_code"] == 0
        logs = c.get(url + "/logs").json()
        assert logs["output"].startswith("hello\n")
        assert logs["next_offset"] == 6 + 3
        # Exited: stdin is a conflict; a process without stdin is a 400.
        assert c.post(url + "/stdin", json={"data": "x"}).status_code == 409
        q = _start(c, box, command="sleep 5")
        assert c.post(f"/sandboxes/{box}/processes/{q['id']}/stdin", json={"data": "x"}).status_code == 400
        c.delete(f"/sandboxes/{box}/processes/{q['id']}")


def test_signal_and_errors(open_server: ServerProc, box: str) -> None:
    with api(open_server) as c:
        p = _start(c, box, command="sleep", args=["100"], mode="argv")
        url = f"/sandboxes/{box}/processes/{p['id']}"
        time.sleep(0.2)
        assert c.post(url + "/signal", json={"signal": "NOPE"}).status_code == 400
        assert c.post(url + "/signal", json={"signal": "TERM"}).status_code == 200
        done = _wait_exit(c, box, p["id"])
        assert done["signal"] == 15 and done["exit_code"] == 143
        assert c.post(url + "/signal", json={"signal": 9}).status_code == 409
        assert c.get(f"/sandboxes/{box}/processes/proc_nope").status_code == 404
        assert c.get("/sandboxes/sb_doesnotexist/processes").status_code == 404
        assert c.post(f"/sandboxes/{box}/processes", json={"command": "x", "mode": "bad"}).status_code == 400


def test_timeout(open_server: ServerProc, box: str) -> None:
    with api(open_server) as c:
        p = _start(c, box, command="sleep 100", timeout="1s")
        done = _wait_exit(c, box, p["id"])
        assert done["reason"] == "timeout" and done["exit_code"] == 137


def test_owner_scoping(keyed_server: ServerProc) -> None:
    sid = spawn(keyed_server, key=KEYS["api"], user="carol")
    with api(keyed_server, KEYS["api"], "carol") as c:
        p = _start(c, sid, command="sleep 30")
    with api(keyed_server, KEYS["api"], "dave") as other:
        assert other.get(f"/sandboxes/{sid}/processes").status_code == 404
        assert other.delete(f"/sandboxes/{sid}/processes/{p['id']}").status_code == 404
    with api(keyed_server, KEYS["viewer"]) as viewer:
        assert viewer.get(f"/sandboxes/{sid}/processes").status_code == 200
        assert viewer.delete(f"/sandboxes/{sid}/processes/{p['id']}").status_code == 403
    with api(keyed_server, KEYS["api"], "carol") as c:
        c.delete(f"/sandboxes/{sid}")


def _children_mentioning(server: ServerProc, needle: str) -> list[int]:
    """Host processes (the runtime's exec clients) whose command line mentions needle."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmd and " exec " in cmd:
            out.append(int(d.name))
    return out


def test_processes_die_with_their_sandbox(open_server: ServerProc) -> None:
    sid = spawn(open_server)
    with api(open_server) as c:
        p = _start(c, sid, command="sleep 100")
        assert _children_mentioning(open_server, sid)
        assert c.delete(f"/sandboxes/{sid}").status_code == 200
        assert c.get(f"/sandboxes/{sid}/processes").status_code == 404
        assert c.get(f"/sandboxes/{sid}/processes/{p['id']}").status_code == 404
    deadline = time.monotonic() + 10
    while _children_mentioning(open_server, sid):
        assert time.monotonic() < deadline, "exec clients outlived their sandbox"
        time.sleep(0.1)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.slow
def test_slow_follower_keeps_memory_bounded(open_server: ServerProc, box: str) -> None:
    """`yes` for 3 s (hundreds of MB) with a follower reading 4 KiB every 10 ms: the server keeps a 1 MiB ring."""
    pid = open_server.proc.pid
    with api(open_server) as c:
        before = _rss_kib(pid)
        p = _start(c, box, command="yes stacyvm-says-yes", timeout="3s")
        follower: dict[str, Any] = {"bytes": 0, "dropped": 0, "exit": None}

        def follow() -> None:
            with api(open_server) as f, f.stream(
                "GET", f"/sandboxes/{box}/processes/{p['id']}/logs", params={"follow": "true"}
            ) as r:
                buf = b""
                for chunk in r.iter_raw(4096):
                    time.sleep(0.01)
                    buf += chunk
                    *lines, buf = buf.split(b"\n")
                    for line in lines:
                        m = json.loads(line)
                        if m["stream"] == "dropped":
                            follower["dropped"] += m["bytes"]
                        elif m["stream"] == "exit":
                            follower["exit"] = m
                        else:
                            follower["bytes"] += len(m["data"])

        t = threading.Thread(target=follow, daemon=True)
        t.start()
        peak = before
        deadline = time.monotonic() + 60
        while t.is_alive() and time.monotonic() < deadline:
            peak = max(peak, _rss_kib(pid))
            time.sleep(0.05)
        t.join(5)
        done = c.get(f"/sandboxes/{box}/processes/{p['id']}").json()
    assert done["reason"] == "timeout"
    assert done["output_bytes"] > 50 * 1024 * 1024, done  # it really produced a lot
    assert follower["exit"] is not None and follower["dropped"] > 0
    growth_mib = (peak - before) / 1024
    print(f"yes wrote {done['output_bytes'] / 2**20:.0f} MiB; follower read {follower['bytes'] / 2**20:.1f} MiB, "
          f"missed {follower['dropped'] / 2**20:.0f} MiB; server RSS {before / 1024:.0f} -> peak "
          f"{peak / 1024:.0f} MiB")
    assert growth_mib < 40, f"server RSS grew by {growth_mib:.0f} MiB"


def test_background_terminal(open_server: ServerProc, box: str) -> None:
    with api(open_server) as c:
        p = _start(c, box, command="/bin/sh", mode="argv", tty=True, rows=30, cols=100)
        assert p["tty"] and p["stdin"]
        url = f"/sandboxes/{box}/processes/{p['id']}"
        assert c.post(url + "/stdin", json={"data": "stty size; exit 4\n"}).status_code == 200
        done = _wait_exit(c, box, p["id"])
        assert done["exit_code"] == 4
        logs = c.get(url + "/logs").json()
        assert "30 100" in logs["output"]
        assert {ch["stream"] for ch in logs["chunks"]} == {"output"}


def test_logs_mark_dropped_output(open_server: ServerProc, box: str) -> None:
    """300,000 lines (about 2 MB): the newest 1 MiB is kept and the cut is marked."""
    with api(open_server) as c:
        p = _start(c, box, command="seq 1 300000")
        done = _wait_exit(c, box, p["id"])
        assert done["exit_code"] == 0 and done["output_bytes"] == 1_988_895
        assert done["dropped_bytes"] == done["output_bytes"] - 1024 * 1024
        logs = c.get(f"/sandboxes/{box}/processes/{p['id']}/logs").json()
        assert logs["output"].startswith(f"[stacyvm: {done['dropped_bytes']} bytes of older output dropped]\n")
        assert logs["output"].endswith("299999\n300000\n")
        text = c.get(f"/sandboxes/{box}/processes/{p['id']}/logs", params={"format": "text"}).text
        assert text.startswith("[stacyvm: ") and len(text) > 1024 * 1024
