"""Core data: what a sandbox, template, quota, caller and request are. No HTTP here."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from stacyvm_server.providers.base import SandboxHandle

Role = Literal["viewer", "api", "admin"]


def utcnow() -> datetime:
    return datetime.now(UTC)


class State(enum.StrEnum):
    CREATING = "creating"
    RUNNING = "running"
    STOPPING = "stopping"
    DESTROYED = "destroyed"
    ERROR = "error"


ACTIVE_STATES = (State.CREATING, State.RUNNING, State.STOPPING, State.ERROR)


class Reason(enum.StrEnum):
    USER = "user"
    TTL = "ttl"
    OOM = "oom"
    CRASHED = "crashed"
    HOST_LOST = "host_lost"
    STARTUP_FAILED = "startup_failed"


@dataclass(frozen=True)
class Caller:
    """Who is asking. `owner_id` set means the caller sees only that owner's sandboxes."""

    role: Role = "admin"
    tenant_id: str | None = None
    owner_id: str | None = None
    key_name: str = "anonymous"

    def can_write(self) -> bool:
        return self.role in ("api", "admin")

    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass
class Sandbox:
    id: str
    provider: str
    image: str
    memory_mb: int
    vcpus: int
    network: str
    state: State
    created_at: datetime
    expires_at: datetime
    owner_id: str | None = None
    tenant_id: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    reason: Reason | None = None
    destroyed_at: datetime | None = None
    error: str | None = None
    handle: SandboxHandle | None = None
    disk_mb: int | None = None


@dataclass
class SpawnRequest:
    """A validated spawn: None means "use the template's or the server's default"."""

    image: str | None = None
    provider: str | None = None
    memory_mb: int | None = None
    vcpus: int | None = None
    ttl: str | None = None  # Go duration
    owner_id: str | None = None
    template: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    network: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    disk_mb: int | None = None  # cap on the writable layer; None = the server default
    runtime: str | None = None  # OCI runtime, where the provider lets a spawn choose; None = its default


@dataclass(frozen=True)
class AdmissionDecision:
    allowed: bool
    queueable: bool = False
    reason: str = ""
    active_sandboxes: int = 0
    max_sandboxes: int = 0
    active_owner_sandboxes: int = 0
    max_owner_sandboxes: int = 0
    max_ttl: str = ""


@dataclass
class ExecRequest:
    command: str
    args: list[str] = field(default_factory=list)
    mode: Literal["shell", "argv"] = "shell"
    env: dict[str, str] = field(default_factory=dict)
    workdir: str | None = None
    timeout: str | None = None  # Go duration; None/"" = server default
    report_exit: bool = False  # streaming only: end with an exit line (the SDK never asks)


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: str
    stderr: str
    duration_s: float
    truncated: bool = False


@dataclass(frozen=True)
class StreamChunk:
    stream: str  # "stdout" | "stderr" | "exit" (only with report_exit)
    data: str


@dataclass
class Template:
    name: str
    image: str
    version: int = 1
    description: str = ""
    memory_mb: int = 512
    vcpus: int = 1
    ttl_seconds: int = 300
    provider: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)
    pool_size: int = 0
    created_at: datetime = field(default_factory=utcnow)
    updated_at: datetime = field(default_factory=utcnow)


@dataclass
class Quota:
    owner_id: str
    max_sandboxes: int = 0
    max_ttl_s: int = 0
    max_exec_timeout_s: int = 0
    created_at: datetime = field(default_factory=utcnow)
    updated_at: datetime = field(default_factory=utcnow)


@dataclass(frozen=True)
class Event:
    seq: int
    type: str
    timestamp: datetime
    sandbox_id: str | None = None
    data: dict[str, object] | None = None
