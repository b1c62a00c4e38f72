"""The provider contract: every isolation backend implements `Provider`.

A provider knows nothing about HTTP, auth or the store. Core hands it a
`SandboxSpec`, keeps the returned `SandboxHandle` (persisted as JSON), and calls
the other methods with that handle. Errors are raised as `stacyvm_server.errors`
types: `ProviderError` for runtime failures, `SandboxFileError` for bad paths or
missing files, `ImageError`/`ImageNotFound` for images.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, Protocol

from stacyvm_server.errors import BadRequest, Unavailable
from stacyvm_server.images.model import Image


class ImageSource(Protocol):
    """Where providers that unpack images themselves get them (images.store.ImageStore)."""

    async def ensure(self, ref: str, uid_shift: int = 0) -> Image: ...


NetworkMode = Literal["none", "bridge"]
StreamName = Literal["stdout", "stderr"]


@dataclass(frozen=True)
class SandboxSpec:
    sandbox_id: str
    image: str
    memory_mb: int
    vcpus: int
    network: NetworkMode = "none"
    env: dict[str, str] = field(default_factory=dict)
    pids_limit: int = 256
    disk_mb: int | None = None  # writable-layer size limit, where the provider supports it
    # Free-form labels the provider stores with the sandbox so inventory() can
    # report them after a restart (owner, expires_at, ...).
    labels: dict[str, str] = field(default_factory=dict)
    # The OCI runtime asked for at spawn (None: the provider's configured one);
    # core has checked it with Provider.check_runtime().
    runtime: str | None = None


@dataclass
class SandboxHandle:
    sandbox_id: str
    provider: str
    # Provider-private data (paths, container ids, netns names...). JSON-serialisable.
    data: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ExecSpec:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    workdir: str | None = None  # None: the image's WorkingDir, else "/"
    user: str | None = None  # None: the image's User
    stdin: bool = False  # the caller will write stdin (else stdin is /dev/null)
    # A pseudo-terminal: stdin, stdout and stderr are its slave side, and output()
    # yields everything as "stdout" (one stream). Providers without one raise BadRequest.
    tty: bool = False
    tty_size: tuple[int, int] | None = None  # (rows, cols) of the terminal at start


@dataclass(frozen=True)
class ExitStatus:
    exit_code: int  # shell convention: 128+N when killed by signal N
    signal: int | None = None
    reason: str | None = None  # "oom", "killed" ... when known


class ExecProcess(abc.ABC):
    """A running command inside a sandbox."""

    @abc.abstractmethod
    def output(self) -> AsyncIterator[tuple[StreamName, bytes]]:
        """Chunks as they arrive, until both streams close. Iterate once."""

    @abc.abstractmethod
    async def wait(self) -> ExitStatus:
        """Wait for exit. Call after (or concurrently with) draining output()."""

    @abc.abstractmethod
    async def kill(self) -> None:
        """Kill the process and everything it started. Idempotent."""

    @abc.abstractmethod
    async def write_stdin(self, data: bytes) -> None: ...

    @abc.abstractmethod
    async def close_stdin(self) -> None: ...

    async def resize(self, rows: int, cols: int) -> None:
        """Set the terminal's window size (tty execs only)."""
        raise BadRequest("this exec has no terminal to resize")

    async def signal(self, sig: int) -> None:
        """Send signal `sig` to the exec's main process (not to what it started)."""
        raise BadRequest("this provider cannot signal an exec")


@dataclass(frozen=True)
class FileInfo:
    path: str  # absolute path inside the sandbox
    size: int
    mode: int  # permission bits, e.g. 0o644
    is_dir: bool
    mod_time: datetime  # UTC
    is_symlink: bool = False


@dataclass(frozen=True)
class SandboxStats:
    cpu_seconds: float
    mem_bytes: int
    mem_limit_bytes: int
    pids: int


@dataclass(frozen=True)
class RuntimeState:
    """What the runtime says about a sandbox right now."""

    alive: bool
    reason: str | None = None  # why it ended: "oom", "crashed", ...


@dataclass(frozen=True)
class InventoryItem:
    """Something of ours that the provider found on the host (for startup reconcile)."""

    sandbox_id: str
    alive: bool
    handle: SandboxHandle
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ProviderHealth:
    healthy: bool
    error: str | None = None
    latency_ms: float = 0.0


class Provider(abc.ABC):
    name: str
    # Tags like "spawn", "exec", "exec_stream", "files", "health", "runtime_inventory".
    capabilities: tuple[str, ...] = ()

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Prepare the host (check binaries, create tables). Called once at server start."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release provider-wide resources. Sandboxes are left as they are."""

    def describe(self) -> dict[str, str]:
        """Non-secret configuration shown by GET /providers/{name}."""
        return {"type": self.name}

    @abc.abstractmethod
    async def health(self) -> ProviderHealth: ...

    def check_runtime(self, runtime: str | None) -> None:
        """Raise BadRequest unless a spawn may ask for this OCI runtime (None: the default).

        Called by core before anything is stored. Providers that let a spawn choose
        (docker: `docker.allowed_runtimes`) override this; the others take none."""
        if runtime is not None:
            raise BadRequest(f"runtime: the {self.name} provider has no per-spawn runtime choice "
                             f"(leave runtime out)")

    def check_disk(self, disk_mb: int | None, runtime: str | None) -> None:
        """Raise BadRequest when this provider cannot enforce a `disk_mb` cap for such a spawn.

        Called by core before anything is stored. Native and microvm enforce it always."""
        return None

    # lifecycle -------------------------------------------------------------
    @abc.abstractmethod
    async def create(self, spec: SandboxSpec) -> SandboxHandle:
        """Create and start a sandbox. On failure nothing may be left behind."""

    @abc.abstractmethod
    async def destroy(self, handle: SandboxHandle) -> None:
        """Remove everything the sandbox owns. Idempotent; safe on half-created sandboxes."""

    @abc.abstractmethod
    async def state(self, handle: SandboxHandle) -> RuntimeState: ...

    @abc.abstractmethod
    async def inventory(self) -> list[InventoryItem]: ...

    # exec --------------------------------------------------------------------
    @abc.abstractmethod
    async def exec(self, handle: SandboxHandle, spec: ExecSpec) -> ExecProcess: ...

    # files: paths are absolute inside the sandbox; relative paths are taken from "/".
    @abc.abstractmethod
    def read_file(self, handle: SandboxHandle, path: str) -> AsyncIterator[bytes]:
        """Stream a regular file's bytes. Raises SandboxFileError if missing."""

    @abc.abstractmethod
    async def write_file(
        self, handle: SandboxHandle, path: str, chunks: AsyncIterator[bytes], mode: int = 0o644
    ) -> int:
        """Create parent dirs, write (replace) the file, return bytes written."""

    @abc.abstractmethod
    async def list_dir(self, handle: SandboxHandle, path: str) -> list[FileInfo]: ...

    @abc.abstractmethod
    async def stat(self, handle: SandboxHandle, path: str) -> FileInfo: ...

    @abc.abstractmethod
    async def move(self, handle: SandboxHandle, src: str, dst: str) -> None: ...

    @abc.abstractmethod
    async def chmod(self, handle: SandboxHandle, path: str, mode: int) -> None: ...

    @abc.abstractmethod
    async def delete(self, handle: SandboxHandle, path: str, recursive: bool) -> None:
        """Missing path is not an error (rm -f). A directory needs recursive=True."""

    @abc.abstractmethod
    async def glob(self, handle: SandboxHandle, pattern: str) -> list[str]: ...

    # observability -------------------------------------------------------------
    @abc.abstractmethod
    async def stats(self, handle: SandboxHandle) -> SandboxStats: ...

    @abc.abstractmethod
    async def logs(self, handle: SandboxHandle, lines: int) -> list[str]:
        """Last `lines` lines of the sandbox's main process output."""

    # preview -------------------------------------------------------------------
    async def connect(self, handle: SandboxHandle, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A TCP connection to `port` inside the sandbox, as the sandbox itself sees it.

        It must reach servers bound to 127.0.0.1 inside the sandbox as well as 0.0.0.0,
        in every network mode. Raise `PortClosed` when nothing listens there.
        Providers without preview support keep this default.
        """
        raise Unavailable(f"preview is not supported by the {self.name} provider")
