"""The exec WebSocket over a live server (native provider, crun): terminals, stdin, exit, auth."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.conftest import KEYS, ServerProc
from tests.interactive.conftest import ALLOWED_ORIGIN, api, session, spawn, ws_url

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_sh_in_a_terminal(open_server: ServerProc, box: str) -> None:
    async with session(open_server, box, command="/bin/sh", mode="argv", tty=True) as s:
        await s.stdin("echo $((6*7))zz\n")
        await s.until(b"42zz")
        await s.stdin("tty\n")
        await s.until(b"/dev/pts/")
        await s.stdin("exit 42\n")
        ex = await s.wait_exit()
    assert ex["exit_code"] == 42 and ex["signal"] is None and ex["reason"] is None
    # One stream for a terminal.
    assert {m["type"] for m in s.messages} <= {"output", "exit"}


async def test_python_repl(open_server: ServerProc, pybox: str) -> None:
    async with session(open_server, pybox, command="python3", args=["-i", "-q"], mode="argv", tty=True) as s:
        await s.until(b">>> ")
        await s.stdin("print(6 * 7, 'ok')\n")
        await s.until(b"42 ok")
        await s.stdin("import sys; sys.exit(5)\n")
        ex = await s.wait_exit()
    assert ex["exit_code"] == 5


async def test_ctrl_c_interrupts_sleep(open_server: ServerProc, box: str) -> None:
    async with session(open_server, box, command="/bin/sh", mode="argv", tty=True) as s:
        await s.stdin("echo ready; exec sleep 100\n")
        await s.until(b"ready\r\n")
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        await s.stdin("\x03")
        ex = await s.wait_exit(10)
    assert time.monotonic() - t0 < 5
    assert ex["signal"] == 2 and ex["exit_code"] == 130


async def test_resize_shows_in_stty(open_server: ServerProc, box: str) -> None:
    async with session(open_server, box, command="/bin/sh", mode="argv", tty=True, rows=20, cols=70) as s:
        await s.stdin("stty size\n")
        await s.until(b"20 70")
        await s.send(type="resize", rows=33, cols=111)
        await s.stdin("stty size\n")
        await s.until(b"33 111")
        await s.send(type="close_stdin")  # Ctrl-D on a terminal: the shell exits
        ex = await s.wait_exit()
    assert ex["exit_code"] == 0


async def test_binary_stdin_round_trips_through_cat(open_server: ServerProc, box: str) -> None:
    payload = bytes(range(256)) * 300  # 76,800 bytes, every byte value, invalid UTF-8
    async with session(open_server, box, command="cat", mode="argv", binary=True) as s:
        for i in range(0, len(payload), 10000):
            await s.stdin(payload[i : i + 10000])
        await s.send(type="close_stdin")
        ex = await s.wait_exit()
    assert ex["exit_code"] == 0
    assert bytes(s.out) == payload


async def test_stdout_stderr_and_exit_code(open_server: ServerProc, box: str) -> None:
    async with session(open_server, box, command="echo out; echo err >&2; exit 42") as s:
        ex = await s.wait_exit()
    assert (bytes(s.out), bytes(s.err)) == (b"out\n", b"err\n")
    assert ex == {"type": "exit", "exit_code": 42, "signal": None, "reason": None}


async def test_signal_message(open_server: ServerProc, box: str) -> None:
    async with session(open_server, box, command="sleep", args=["100"], mode="argv") as s:
        await asyncio.sleep(0.3)
        await s.send(type="signal", signal="SIGTERM")
        ex = await s.wait_exit(10)
    assert ex["signal"] == 15 and ex["exit_code"] == 143


async def test_timeout_kills(open_server: ServerProc, box: str) -> None:
    t0 = time.monotonic()
    async with session(open_server, box, command="sleep 171; echo never", timeout="1s") as s:
        ex = await s.wait_exit(15)
    assert ex["reason"] == "timeout" and ex["exit_code"] == 137
    assert time.monotonic() - t0 < 8
    with api(open_server) as c:
        ps = c.post(f"/sandboxes/{box}/exec", json={"command": "ps"}).json()["stdout"]
    assert "sleep 171" not in ps


async def test_bad_messages_get_errors(open_server: ServerProc, box: str) -> None:
    async with session(open_server, box, command="cat", mode="argv") as s:
        await s.send(type="bogus")
        await s.send(type="resize", rows=10, cols=10)  # no terminal
        await s.ws.send("not json")
        await s.stdin("still alive\n")
        await s.until(b"still alive")
        await s.send(type="close_stdin")
        await s.wait_exit()
    errors = [m for m in s.messages if m["type"] == "error"]
    assert len(errors) == 3, s.messages


async def test_start_errors(open_server: ServerProc, box: str) -> None:
    async with session(open_server, box, command="true", mode="weird") as s:
        m = json.loads(await asyncio.wait_for(s.ws.recv(), 10))
    assert m["type"] == "error" and "mode" in m["message"]


async def test_disconnect_kills_the_process(open_server: ServerProc, box: str) -> None:
    async with session(open_server, box, command="sleep 172") as s:
        await asyncio.sleep(0.5)
        del s
    with api(open_server) as c:
        for _ in range(50):
            ps = c.post(f"/sandboxes/{box}/exec", json={"command": "ps"}).json()["stdout"]
            if "sleep 172" not in ps:
                break
            time.sleep(0.1)
    assert "sleep 172" not in ps


async def test_reference_style_first_message(open_server: ServerProc, box: str) -> None:
    async with connect(ws_url(open_server, box)) as ws:
        await ws.send(json.dumps({"command": "echo hi; echo oops >&2"}))
        got = [json.loads(m) async for m in ws]
        assert ws.close_code == 1000
    assert got[-1] == {"type": "done"}
    assert {"stream": "stdout", "data": "hi\n"} in got and {"stream": "stderr", "data": "oops\n"} in got
    assert all(set(m) == {"stream", "data"} for m in got[:-1])


async def test_reference_style_errors(open_server: ServerProc, box: str) -> None:
    # Unlike the reference, an unknown sandbox is refused at the upgrade (like auth).
    assert await _status(ws_url(open_server, "sb_doesnotexist")) == 404
    async with connect(ws_url(open_server, box)) as ws:
        await ws.send(json.dumps({"command": "true", "timeout": "20m"}))  # above max_exec_timeout
        first = json.loads(await ws.recv())
        await asyncio.wait_for(ws.wait_closed(), 5)
    assert "exceeds" in first["error"] and ws.close_code == 1011
    async with connect(ws_url(open_server, box)) as ws:
        await ws.send("{not json")
        await asyncio.wait_for(ws.wait_closed(), 5)
    assert ws.close_code == 1007


# auth ------------------------------------------------------------------------------------
async def _status(url: str, **kw: object) -> int:
    try:
        async with connect(url, **kw):  # type: ignore[arg-type]
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


async def test_headers_and_tokens(cors_server: ServerProc) -> None:
    srv = cors_server
    sid = spawn(srv, key=KEYS["api"])
    other = spawn(srv, key=KEYS["api"])
    url = ws_url(srv, sid)
    assert await _status(url) == 401
    assert await _status(url, additional_headers={"X-API-Key": "wrong"}) == 401
    assert await _status(url, additional_headers={"X-API-Key": KEYS["viewer"]}) == 403
    async with session(srv, sid, {"X-API-Key": KEYS["api"]}, command="echo keyed") as s:
        await s.wait_exit()
    assert bytes(s.out) == b"keyed\n"

    with api(srv, KEYS["api"]) as c:
        r = c.post(f"/sandboxes/{sid}/exec/token")
        assert r.status_code == 201, r.text
        tok = r.json()
        assert tok["url"].endswith(tok["token"])
        assert c.post("/sandboxes/sb_doesnotexist/exec/token").status_code == 404
    with api(srv, KEYS["viewer"]) as c:
        assert c.post(f"/sandboxes/{sid}/exec/token").status_code == 403
    with httpx.Client() as c:
        assert c.post(f"{srv.base_url}/api/v1/sandboxes/{sid}/exec/token").status_code == 401

    # Query parameter, from a browser page on an allowed origin.
    async with connect(url + "?token=" + tok["token"], origin=ALLOWED_ORIGIN) as ws:  # type: ignore[arg-type]
        await ws.send(json.dumps({"type": "start", "command": "echo by-token"}))
        msgs = [json.loads(m) async for m in ws]
    assert {"type": "stdout", "data": "by-token\n"} in msgs
    # Subprotocol: the server selects the one it understood.
    async with connect(url, subprotocols=[tok["subprotocol"]]) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == tok["subprotocol"]
        await ws.send(json.dumps({"type": "start", "command": "echo by-subprotocol"}))
        msgs = [json.loads(m) async for m in ws]
    assert {"type": "stdout", "data": "by-subprotocol\n"} in msgs
    # Scoped to one sandbox, and tamper-proof.
    assert await _status(ws_url(srv, other) + "?token=" + tok["token"]) == 403
    forged = tok["token"][:-3] + ("AAA" if not tok["token"].endswith("AAA") else "BBB")
    assert await _status(url + "?token=" + forged) == 401
    assert await _status(url + "?token=garbage") == 401


async def test_token_keeps_owner_scope(cors_server: ServerProc) -> None:
    srv = cors_server
    mine = spawn(srv, key=KEYS["owned"])  # owner alice
    theirs = spawn(srv, key=KEYS["api"], user="bob")
    with api(srv, KEYS["owned"]) as c:
        assert c.post(f"/sandboxes/{theirs}/exec/token").status_code == 404
        tok = c.post(f"/sandboxes/{mine}/exec/token").json()["token"]
    assert await _status(ws_url(srv, mine) + "?token=" + tok) == 101
    assert await _status(ws_url(srv, theirs) + "?token=" + tok) == 403


async def test_origin_is_checked(cors_server: ServerProc) -> None:
    srv = cors_server
    sid = spawn(srv, key=KEYS["api"])
    headers = {"X-API-Key": KEYS["api"]}
    url = ws_url(srv, sid)
    assert await _status(url, additional_headers=headers, origin="https://evil.example") == 403
    assert await _status(url, additional_headers=headers, origin=ALLOWED_ORIGIN) == 101
    assert await _status(url, additional_headers=headers) == 101  # not a browser: no Origin


async def test_expired_token(cors_server: ServerProc) -> None:
    from stacyvm_server.core.exec_tokens import ExecTokens
    from stacyvm_server.core.models import Caller

    sid = spawn(cors_server, key=KEYS["api"])
    tokens = ExecTokens(cors_server.data_dir)  # the server's own key file (test-only access)
    old, _ = tokens.issue(Caller(role="api"), sid, ttl=-1)
    assert await _status(ws_url(cors_server, sid) + "?token=" + old) == 401
    fresh, _ = tokens.issue(Caller(role="api"), sid)
    assert await _status(ws_url(cors_server, sid) + "?token=" + fresh) == 101


def _rss_kib(pid: int) -> int:
    from pathlib import Path

    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_slow_client_does_not_grow_server_memory(open_server: ServerProc, box: str) -> None:
    """A client that stops reading: the process is throttled (flow control), the server buffers nothing."""
    pid = open_server.proc.pid
    before = _rss_kib(pid)
    peak = before
    async with session(open_server, box, command="yes stacyvm-says-yes") as s:
        await s._recv(10)  # it runs
        for _ in range(30):  # 3 s without reading
            await asyncio.sleep(0.1)
            peak = max(peak, _rss_kib(pid))
    growth_mib = (peak - before) / 1024
    print(f"server RSS {before / 1024:.0f} -> peak {peak / 1024:.0f} MiB while the client did not read")
    assert growth_mib < 40
