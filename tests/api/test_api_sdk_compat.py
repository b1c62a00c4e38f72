"""The official `stacyvm==0.1.1` SDK, unchanged, against a live server (contract §16, §17.1).

Every public SDK method is called at least once: sync Client, Sandbox and
TemplateManager, ProviderManager, AsyncClient and AsyncSandbox, both context
managers, and each exception class the SDK maps statuses to.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest
import stacyvm
from stacyvm import (
    AsyncClient,
    Client,
    QuotaSummary,
    SandboxInfo,
    SandboxNotFound,
    SpawnAdmissionDecision,
    StacyVMError,
    Template,
)
from stacyvm.exceptions import ProviderError
from stacyvm.providers import ProviderManager
from stacyvm.sandbox import Sandbox
from stacyvm.streaming import StreamChunk


def _ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@pytest.fixture(scope="module")
def client(base_url: str, api_key: str) -> Iterator[Client]:
    with Client(base_url, api_key=api_key) as c:
        yield c


@pytest.fixture(scope="module")
def sb(client: Client, images: dict[str, str]) -> Iterator[Sandbox]:
    with client.spawn(image=images["busybox"], ttl="20m", metadata={"suite": "sdk"}) as s:
        yield s


# --------------------------------------------------------------------------- Client


def test_health_and_system(client: Client) -> None:
    health = client.health()
    assert health["status"] == "ok"
    assert set(health) == {"status", "version", "uptime"}
    assert client.pool_status() == {"enabled": False}
    summary = client.quota_summary()
    assert isinstance(summary, QuotaSummary)
    providers = client.providers()
    native = [p for p in providers if p["name"] == "native"]
    assert native and native[0]["default"] is True and native[0]["healthy"] is True
    assert [p["name"] for p in providers] == sorted(p["name"] for p in providers)


def test_provider_manager(client: Client) -> None:
    pm = ProviderManager(client._http)
    assert any(p["name"] == "native" for p in pm.list())
    assert pm.test() == {"native": True}


def test_spawn_get_list(client: Client, sb: Sandbox, images: dict[str, str]) -> None:
    assert sb.id.startswith("sb_")
    assert sb.state == "running"
    assert sb.provider == "native"
    assert sb.image == images["busybox"]
    assert repr(sb) == f"Sandbox(id={sb.id!r}, state='running')"
    got = client.get(sb.id)
    assert got.id == sb.id and got.state == "running"
    listed = client.list()
    assert all(isinstance(i, SandboxInfo) for i in listed)
    mine = [i for i in listed if i.id == sb.id]
    assert mine and mine[0].metadata == {"suite": "sdk"}
    assert sb.get_preview_url(3000) == f"http://3000-{sb.id}.localhost"


def test_admission(client: Client, images: dict[str, str]) -> None:
    ok = client.admission(image=images["busybox"], ttl="10m", memory_mb=128, vcpus=1, metadata={"a": "b"})
    assert isinstance(ok, SpawnAdmissionDecision)
    assert ok.allowed is True and ok.queueable is False
    assert ok.max_ttl == "24h0m0s"
    too_long = client.admission(ttl="100h")
    assert too_long.allowed is False and too_long.reason == "max_ttl"
    owned = client.admission(owner_id="someone")
    assert owned.allowed is True


def test_prune(client: Client) -> None:
    assert isinstance(client.prune(), int)


# --------------------------------------------------------------------------- exec


def test_exec(sb: Sandbox) -> None:
    r = sb.exec("echo hello")
    assert r.exit_code == 0 and r.stdout == "hello\n" and r.stderr == ""
    assert r.duration.endswith("s")
    assert sb.exec("exit 42").exit_code == 42
    assert sb.exec("echo oops >&2").stderr == "oops\n"
    assert sb.exec("echo", args=["a b", "it's"]).stdout == "a b it's\n"
    assert sb.exec("echo", args=["$HOME"], mode="argv").stdout == "$HOME\n"
    assert sb.exec("echo $FOO", env={"FOO": "bar"}).stdout == "bar\n"
    assert sb.exec("pwd", workdir="/tmp").stdout == "/tmp\n"
    assert sb.exec("echo fast", timeout="30s").stdout == "fast\n"


def test_exec_timeout_is_an_error(sb: Sandbox) -> None:
    with pytest.raises(StacyVMError) as ei:
        sb.exec("sleep 30", timeout="300ms")
    assert ei.value.code == "timeout"


def test_exec_stream(sb: Sandbox) -> None:
    chunks = list(sb.exec_stream("echo one; echo two >&2; echo three"))
    assert all(isinstance(c, StreamChunk) for c in chunks)
    out = "".join(c.data for c in chunks if c.stream == "stdout")
    err = "".join(c.data for c in chunks if c.stream == "stderr")
    assert out == "one\nthree\n" and err == "two\n"
    argv = list(sb.exec_stream("sh", args=["-c", "echo $X"], mode="argv", env={"X": "y"}, workdir="/"))
    assert "".join(c.data for c in argv) == "y\n"


# --------------------------------------------------------------------------- files


def test_files(sb: Sandbox) -> None:
    sb.write_file("/workspace/hello.txt", "hello world")
    assert sb.read_file("/workspace/hello.txt") == "hello world"
    sb.write_file("/workspace/subdir/nested.txt", "nested", mode="0600")
    assert sb.read_file("/workspace/subdir/nested.txt") == "nested"

    listed = sb.list_files("/workspace")
    assert {f["path"].rsplit("/", 1)[-1] for f in listed} >= {"hello.txt", "subdir"}
    for f in listed:
        assert set(f) == {"path", "size", "mode", "is_dir", "mod_time"}
    assert any(f["path"] for f in sb.list_files())  # default "/"

    st = sb.stat_file("/workspace/hello.txt")
    assert st["size"] == 11 and st["is_dir"] is False and st["mode"] == "644"
    assert sb.stat_file("/workspace/subdir/nested.txt")["mode"] == "600"
    assert sb.stat_file("/workspace/subdir")["is_dir"] is True

    for name in ("a.log", "b.log", "c.txt"):
        sb.write_file(f"/workspace/{name}", name)
    matches = sb.glob_files("/workspace/*.log")
    assert sorted(m.rsplit("/", 1)[-1] for m in matches) == ["a.log", "b.log"]
    assert sb.glob_files("/workspace/*.nothing") == []

    sb.move_file("/workspace/c.txt", "/workspace/moved/c2.txt")
    assert sb.read_file("/workspace/moved/c2.txt") == "c.txt"
    with pytest.raises(StacyVMError):
        sb.read_file("/workspace/c.txt")

    sb.chmod_file("/workspace/hello.txt", "0755")
    assert sb.stat_file("/workspace/hello.txt")["mode"] == "755"

    sb.delete_file("/workspace/hello.txt")
    with pytest.raises(StacyVMError):
        sb.read_file("/workspace/hello.txt")
    sb.delete_file("/workspace/subdir", recursive=True)
    with pytest.raises(StacyVMError):
        sb.stat_file("/workspace/subdir")


def test_extend_and_refresh(sb: Sandbox) -> None:
    before = _ts(sb._info["expires_at"])
    sb.extend_ttl("2h")
    after = _ts(sb._info["expires_at"])
    assert after > before
    assert timedelta(hours=1, minutes=59) <= after - datetime.now(after.tzinfo) <= timedelta(hours=2)
    sb.refresh()
    assert sb.state == "running"


# --------------------------------------------------------------------------- lifecycle and errors


def test_context_manager_destroys(client: Client, images: dict[str, str]) -> None:
    with client.spawn(image=images["busybox"]) as s:
        sid = s.id
        assert s.exec("echo hi").stdout == "hi\n"
    with pytest.raises(SandboxNotFound):
        client.get(sid)


def test_destroy_then_404(client: Client, images: dict[str, str]) -> None:
    s = client.spawn(image=images["busybox"], memory_mb=128, vcpus=1)
    s.destroy()
    s.destroy()  # idempotent
    with pytest.raises(SandboxNotFound):
        client.get(s.id)
    with pytest.raises(SandboxNotFound):
        client.get("sb_nonexistent")


def test_spawn_with_user_id(base_url: str, api_key: str, images: dict[str, str]) -> None:
    with Client(base_url, api_key=api_key, user_id="testuser") as c, c.spawn(image=images["busybox"]) as s:
        assert s._info["owner_id"] == "testuser"
        assert s.id in [i.id for i in c.list()]
    with Client(base_url, api_key=api_key, user_id="otheruser") as other:
        assert s.id not in [i.id for i in other.list()]


def test_error_classes(base_url: str, api_key: str, keyed_server: object, images: dict[str, str]) -> None:
    with Client(base_url, api_key="wrong") as bad, pytest.raises(StacyVMError) as ei:
        bad.list()
    assert ei.value.code == "UNAUTHORIZED"
    assert not isinstance(ei.value, SandboxNotFound | ProviderError)
    with Client(base_url) as nokey:
        assert nokey.health()["status"] == "ok"  # open
        with pytest.raises(StacyVMError):
            nokey.list()
    with Client(base_url, api_key=api_key) as c:
        with pytest.raises(StacyVMError) as ei:
            c.spawn(image=images["busybox"], ttl="ten minutes")
        assert ei.value.code == "bad_request" and "ttl" in str(ei.value)
        with pytest.raises(SandboxNotFound):
            c.spawn(image=images["busybox"], provider="nope")
    viewer_key = keyed_server.keys["viewer"]  # type: ignore[attr-defined]
    with Client(base_url, api_key=viewer_key) as v, pytest.raises(StacyVMError) as ei:
        v.spawn(image=images["busybox"])
    assert ei.value.code == "forbidden"


def test_connection_error() -> None:
    with Client("http://127.0.0.1:9", timeout=2) as c, pytest.raises(stacyvm.ConnectionError):
        c.spawn(image="x")


# --------------------------------------------------------------------------- templates


def test_templates(client: Client, images: dict[str, str]) -> None:
    name = f"sdk-{uuid.uuid4().hex[:8]}"
    tpl = Template(
        name=name, image=images["busybox"], memory_mb=256, vcpus=2, ttl="5m", provider="native", metadata={"k": "v"}
    )
    # Durations come back in Go's Duration.String() form (contract appendix A).
    expected = Template(**{**tpl.__dict__, "ttl": "5m0s"})
    saved = client.templates.save(tpl)
    assert saved == expected
    with pytest.raises(StacyVMError) as ei:
        client.templates.save(tpl)
    assert ei.value.code == "conflict"
    assert client.templates.get(name) == expected
    assert name in [t.name for t in client.templates.list()]

    s = client.spawn_template(name)
    try:
        assert s.state == "running"
        assert s._info["memory_mb"] == 256 and s._info["vcpus"] == 2
        assert s._info["metadata"].get("template") == name
        lifetime = _ts(s._info["expires_at"]) - _ts(s._info["created_at"])
        assert lifetime == timedelta(minutes=5)
    finally:
        s.destroy()

    client.templates.delete(name)
    with pytest.raises(SandboxNotFound):
        client.templates.get(name)
    with pytest.raises(SandboxNotFound):
        client.spawn_template(name)


# --------------------------------------------------------------------------- async


async def test_async_client(base_url: str, api_key: str, images: dict[str, str]) -> None:
    async with AsyncClient(base_url, api_key=api_key) as c:
        assert (await c.health())["status"] == "ok"
        assert (await c.pool_status())["enabled"] is False
        assert isinstance(await c.quota_summary(), QuotaSummary)
        assert any(p["name"] == "native" for p in await c.providers())
        assert (await c.admission(image=images["busybox"])).allowed is True
        assert isinstance(await c.prune(), int)

        async with await c.spawn(image=images["python"], ttl="10m", metadata={"suite": "async"}) as s:
            assert s.state == "running" and s.provider == "native" and s.image == images["python"]
            assert repr(s).startswith("AsyncSandbox(")
            assert (await c.get(s.id)).id == s.id
            assert s.id in [i.id for i in await c.list()]

            r = await s.exec("python3", args=["-c", "print(6*7)"], mode="argv", timeout="30s")
            assert r.exit_code == 0 and r.stdout == "42\n"
            r = await s.exec("echo $V >&2; exit 3", env={"V": "w"}, workdir="/tmp")
            assert (r.exit_code, r.stderr) == (3, "w\n")

            chunks = [
                ch
                async for ch in s.exec_stream(
                    "python3", args=["-u", "-c", "import sys; print('a'); print('b', file=sys.stderr)"], mode="argv"
                )
            ]
            assert "".join(ch.data for ch in chunks if ch.stream == "stdout") == "a\n"
            assert "".join(ch.data for ch in chunks if ch.stream == "stderr") == "b\n"

            await s.write_file("/work/x.txt", "héllo", mode="0640")
            assert await s.read_file("/work/x.txt") == "héllo"
            assert (await s.stat_file("/work/x.txt"))["size"] == len("héllo".encode())
            assert any(f["path"].endswith("x.txt") for f in await s.list_files("/work"))
            assert [p.rsplit("/", 1)[-1] for p in await s.glob_files("/work/*.txt")] == ["x.txt"]
            await s.move_file("/work/x.txt", "/work/y.txt")
            await s.chmod_file("/work/y.txt", "600")
            assert (await s.stat_file("/work/y.txt"))["mode"] == "600"
            await s.delete_file("/work", recursive=True)
            with pytest.raises(StacyVMError):
                await s.read_file("/work/y.txt")

            await s.extend_ttl("45m")
            await s.refresh()
            assert s.state == "running"
            assert s.get_preview_url(8080) == f"http://8080-{s.id}.localhost"
        with pytest.raises(SandboxNotFound):
            await c.get(s.id)

        await s.destroy()  # idempotent on an already destroyed sandbox


async def test_async_template_spawn(base_url: str, api_key: str, images: dict[str, str]) -> None:
    name = f"async-{uuid.uuid4().hex[:8]}"
    with Client(base_url, api_key=api_key) as sync:
        sync.templates.save(Template(name=name, image=images["busybox"]))
    try:
        async with AsyncClient(base_url, api_key=api_key) as c:
            s = await c.spawn_template(name)
            async with s:
                assert s.state == "running"
    finally:
        with Client(base_url, api_key=api_key) as sync:
            sync.templates.delete(name)


def test_open_server_without_key(open_url: str, images: dict[str, str]) -> None:
    """The reference live suite runs without auth: that must work too."""
    with Client(open_url) as c, c.spawn(image=images["busybox"]) as s:
        assert s.exec("exit 42").exit_code == 42
        assert s.id in [i.id for i in c.list()]
