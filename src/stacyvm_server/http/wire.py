"""Wire models: what the API accepts (strict pydantic models) and what it emits.

Requests are parsed by `parse_body`, which turns every decode or validation
problem into a 400 that names the field. Responses are built by the `*_json`
helpers from core dataclasses, so the JSON shape lives in one file.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from stacyvm_server.core.models import (
    AdmissionDecision,
    ExecRequest,
    ExecResult,
    Quota,
    Sandbox,
    SpawnRequest,
    State,
    Template,
)
from stacyvm_server.durations import DurationError, format_go_duration, parse_go_duration_ns
from stacyvm_server.errors import BadRequest
from stacyvm_server.providers.base import FileInfo, SandboxStats

# 32-bit positive bound: anything above is nonsense and could overflow a store column.
_MAX_INT = 2**31 - 1
_OCTAL_MODE = re.compile(r"^0?[0-7]{3,4}$")

M = TypeVar("M", bound=BaseModel)


# --------------------------------------------------------------------------- errors

_TYPE_MESSAGES = {
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "string_type": "must be a string",
    "bool_type": "must be a boolean",
    "bool_parsing": "must be a boolean",
    "dict_type": "must be an object",
    "list_type": "must be an array",
    "missing": "is required",
    "model_type": "must be an object",
    "model_attributes_type": "must be an object",
    "literal_error": "has an unsupported value",
    "too_long": "is too long",
    "string_too_long": "is too long",
}


def describe_errors(errors: list[Any], prefix_skip: tuple[str, ...] = ("body", "query", "path", "header")) -> str:
    """Turn pydantic/FastAPI errors into one message like `memory_mb: must be an integer`."""
    parts = []
    for err in errors[:3]:
        loc = [str(p) for p in err.get("loc", ()) if p not in prefix_skip]
        field = ".".join(loc) or "body"
        etype = err.get("type", "")
        if etype in _TYPE_MESSAGES:
            text = _TYPE_MESSAGES[etype]
        elif etype in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
            text = str(err.get("msg", "")).replace("Input should be", "must be")
        elif etype == "value_error":
            # Our own validators: the message already says what is wrong.
            text = str(err.get("ctx", {}).get("error", err.get("msg", "")))
        else:
            text = str(err.get("msg", "is invalid")).replace("Input should be", "must be")
        parts.append(f"{field}: {text}")
    return "; ".join(parts)


def parse_body(raw: bytes, model: type[M], *, optional: bool = False) -> M:
    """Decode a JSON object body into `model`. Any problem is a 400 naming the field."""
    if not raw.strip():
        if optional:
            return model()
        raise BadRequest("request body is required (a JSON object)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest("request body must be UTF-8 JSON") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    except RecursionError as exc:
        raise BadRequest("malformed JSON: nested too deeply") from exc
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise BadRequest(describe_errors(exc.errors())) from exc


# --------------------------------------------------------------------------- field checks


def check_text(value: str, field: str) -> str:
    """Reject NUL bytes: they cannot reach a path, an argv or an env entry."""
    if "\x00" in value:
        raise ValueError(f"{field}: must not contain NUL bytes")
    return value


def check_duration(value: str | None, field: str, *, positive: bool = False) -> str | None:
    """Validate a Go duration string; "" and None mean "not given"."""
    if value is None or value == "":
        return None
    try:
        ns = parse_go_duration_ns(value)
    except DurationError as exc:
        raise ValueError(f"{field}: {exc}") from exc
    if ns < 0:
        raise ValueError(f"{field}: duration cannot be negative")
    if positive and ns == 0:
        raise ValueError(f"{field}: must be positive")
    return value


def check_mode(value: str | None, field: str = "mode") -> str | None:
    if value is None or value == "":
        return None
    if not _OCTAL_MODE.match(value):
        raise ValueError(f'{field}: must be an octal permission string like "644" or "0755"')
    return value


def _check_str_map(value: dict[str, str] | None, field: str) -> dict[str, str] | None:
    if value is None:
        return None
    for k, v in value.items():
        check_text(k, f"{field} key")
        check_text(v, f"{field}.{k}")
    return value


# --------------------------------------------------------------------------- requests


class _Body(BaseModel):
    # strict: "1" is not an int, 1 is not a string; unknown keys are ignored (contract §1.1).
    model_config = ConfigDict(strict=True, extra="ignore")


class SpawnBody(_Body):
    image: str | None = None
    provider: str | None = None
    memory_mb: int | None = Field(default=None, gt=0, le=_MAX_INT)
    vcpus: int | None = Field(default=None, gt=0, le=1024)
    ttl: str | None = None
    owner_id: str | None = None
    template: str | None = None
    metadata: dict[str, str] | None = None
    network: Literal["none", "bridge"] | None = None
    env: dict[str, str] | None = None
    disk_mb: int | None = Field(default=None, gt=0, le=_MAX_INT)
    runtime: str | None = Field(default=None, max_length=64)

    @field_validator("ttl")
    @classmethod
    def _ttl(cls, v: str | None) -> str | None:
        return check_duration(v, "ttl", positive=True)

    @field_validator("image", "provider", "template", "owner_id", "runtime")
    @classmethod
    def _text(cls, v: str | None, info: Any) -> str | None:
        return None if v is None else check_text(v, info.field_name)

    @field_validator("env", "metadata")
    @classmethod
    def _maps(cls, v: dict[str, str] | None, info: Any) -> dict[str, str] | None:
        return _check_str_map(v, info.field_name)

    def to_core(self, owner_id: str | None) -> SpawnRequest:
        return SpawnRequest(
            image=self.image or None,
            provider=self.provider or None,
            memory_mb=self.memory_mb,
            vcpus=self.vcpus,
            ttl=self.ttl or None,
            owner_id=owner_id,
            template=self.template or None,
            metadata=dict(self.metadata or {}),
            network=self.network,
            env=dict(self.env or {}),
            disk_mb=self.disk_mb,
            runtime=self.runtime or None,
        )


class ExtendBody(_Body):
    ttl: str | None = None

    @field_validator("ttl")
    @classmethod
    def _ttl(cls, v: str | None) -> str | None:
        return check_duration(v, "ttl", positive=True)


class ExecBody(_Body):
    command: str = ""
    args: list[str] | None = None
    mode: str | None = None
    env: dict[str, str] | None = None
    workdir: str | None = None
    timeout: str | None = None
    stream: bool = False
    report_exit: bool = False

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, v: str | None) -> str | None:
        return check_duration(v, "timeout")

    @field_validator("command", "workdir")
    @classmethod
    def _text(cls, v: str | None, info: Any) -> str | None:
        return None if v is None else check_text(v, info.field_name)

    @field_validator("args")
    @classmethod
    def _args(cls, v: list[str] | None) -> list[str] | None:
        for i, a in enumerate(v or []):
            check_text(a, f"args.{i}")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        for k in v or {}:
            if not k or "=" in k:
                raise ValueError(f"env: invalid variable name {k!r}")
        return _check_str_map(v, "env")

    @field_validator("mode")
    @classmethod
    def _mode(cls, v: str | None) -> str | None:
        mode = (v or "").strip()
        if mode not in ("", "shell", "argv"):
            raise ValueError(f'mode: unsupported exec mode "{v}" (use "shell" or "argv")')
        return mode or None

    def to_core(self) -> ExecRequest:
        mode: Literal["shell", "argv"] = "argv" if self.mode == "argv" else "shell"
        if mode == "argv" and not self.command.strip():
            raise BadRequest("command: argv exec mode requires command")
        return ExecRequest(
            command=self.command,
            args=list(self.args or []),
            mode=mode,
            env=dict(self.env or {}),
            workdir=self.workdir or None,
            timeout=self.timeout or None,
            report_exit=self.report_exit and self.stream,
        )


class WriteFileBody(_Body):
    path: str | None = None
    content: str = ""
    mode: str | None = None
    encoding: Literal["utf-8", "base64"] | None = None

    @field_validator("mode")
    @classmethod
    def _mode(cls, v: str | None) -> str | None:
        return check_mode(v)

    def data(self) -> bytes:
        if self.encoding == "base64":
            try:
                return base64.b64decode(self.content, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise BadRequest("content: invalid base64") from exc
        return self.content.encode()


class MoveBody(_Body):
    old_path: str | None = None
    new_path: str | None = None


class ChmodBody(_Body):
    path: str | None = None
    mode: str | None = None

    @field_validator("mode")
    @classmethod
    def _mode(cls, v: str | None) -> str | None:
        return check_mode(v)


class TemplateBody(_Body):
    """Both name sets: the reference's cpu_cores/ttl_seconds and the SDK's vcpus/ttl (contract §7.1)."""

    name: str | None = None
    image: str | None = None
    version: int | None = Field(default=None, gt=0, le=_MAX_INT)
    description: str | None = None
    memory_mb: int | None = Field(default=None, gt=0, le=_MAX_INT)
    cpu_cores: int | None = Field(default=None, gt=0, le=1024)
    vcpus: int | None = Field(default=None, gt=0, le=1024)
    ttl_seconds: int | None = Field(default=None, gt=0, le=_MAX_INT)
    ttl: str | None = None
    provider: str | None = None
    metadata: dict[str, str] | None = None
    env: dict[str, str] | None = None
    setup: list[str] | None = None
    pool_size: int | None = Field(default=None, ge=0, le=1000)

    @field_validator("ttl")
    @classmethod
    def _ttl(cls, v: str | None) -> str | None:
        return check_duration(v, "ttl", positive=True)

    @field_validator("name", "image", "provider", "description")
    @classmethod
    def _text(cls, v: str | None, info: Any) -> str | None:
        return None if v is None else check_text(v, info.field_name)

    @field_validator("env", "metadata")
    @classmethod
    def _maps(cls, v: dict[str, str] | None, info: Any) -> dict[str, str] | None:
        return _check_str_map(v, info.field_name)

    def to_core(self, name: str | None = None) -> Template:
        name = name if name is not None else (self.name or "").strip()
        if not name:
            raise BadRequest("name is required")
        if "/" in name or "\x00" in name:
            raise BadRequest("name: must not contain '/' or NUL bytes")
        if not (self.image or "").strip():
            raise BadRequest("image is required")
        vcpus = _agree("vcpus", self.vcpus, "cpu_cores", self.cpu_cores)
        ttl_from_go = None
        if self.ttl:
            ns = parse_go_duration_ns(self.ttl)
            if ns % 1_000_000_000:
                raise BadRequest("ttl: must be whole seconds")
            ttl_from_go = ns // 1_000_000_000
        ttl_seconds = _agree("ttl", ttl_from_go, "ttl_seconds", self.ttl_seconds)
        tpl = Template(name=name, image=self.image or "")
        if self.version is not None:
            tpl.version = self.version
        if self.description:
            tpl.description = self.description
        if self.memory_mb is not None:
            tpl.memory_mb = self.memory_mb
        if vcpus is not None:
            tpl.vcpus = vcpus
        if ttl_seconds is not None:
            tpl.ttl_seconds = ttl_seconds
        tpl.provider = self.provider or ""
        tpl.metadata = dict(self.metadata or {})
        tpl.env = dict(self.env or {})
        tpl.setup = list(self.setup or [])
        if self.pool_size is not None:
            tpl.pool_size = self.pool_size
        return tpl


def _agree(a_name: str, a: int | None, b_name: str, b: int | None) -> int | None:
    if a is not None and b is not None and a != b:
        raise BadRequest(f"{a_name} and {b_name} disagree; send one of them")
    return a if a is not None else b


class TemplateSpawnBody(_Body):
    provider: str | None = None
    ttl: str | None = None

    @field_validator("ttl")
    @classmethod
    def _ttl(cls, v: str | None) -> str | None:
        return check_duration(v, "ttl", positive=True)


class QuotaBody(_Body):
    max_sandboxes: int = Field(default=0, ge=0, le=_MAX_INT)
    max_ttl: str = ""
    max_exec_timeout: str = ""

    @field_validator("max_ttl", "max_exec_timeout")
    @classmethod
    def _dur(cls, v: str, info: Any) -> str:
        check_duration(v, info.field_name)
        return v


# --------------------------------------------------------------------------- responses


def rfc3339(dt: datetime) -> str:
    """RFC 3339 UTC with Z, second precision (contract: timestamps)."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def rfc3339_nano(dt: datetime) -> str:
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    text = dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f").rstrip("0").rstrip(".")
    return text + "Z"


def sandbox_json(sb: Sandbox, preview_domain: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": sb.id,
        "state": str(sb.state),
        "provider": sb.provider,
        "image": sb.image,
        "memory_mb": sb.memory_mb,
        "vcpus": sb.vcpus,
    }
    if sb.owner_id:
        out["owner_id"] = sb.owner_id
    if sb.tenant_id:
        out["tenant_id"] = sb.tenant_id
    out["worker_id"] = "local"
    out["created_at"] = rfc3339(sb.created_at)
    out["expires_at"] = rfc3339(sb.expires_at)
    if sb.metadata:
        out["metadata"] = dict(sb.metadata)
    # Omitted when empty: the Python SDK builds a broken preview URL from "" (contract §16).
    if preview_domain:
        out["preview_domain"] = preview_domain
    out["network"] = sb.network
    if sb.disk_mb:
        out["disk_mb"] = sb.disk_mb
    if sb.reason is not None and sb.state in (State.DESTROYED, State.ERROR, State.STOPPING):
        out["reason"] = str(sb.reason)
    return out


def exec_result_json(res: ExecResult) -> dict[str, Any]:
    out: dict[str, Any] = {
        "exit_code": res.exit_code,
        "stdout": res.stdout,
        "stderr": res.stderr,
        "duration": format_go_duration(res.duration_s),
    }
    if res.truncated:
        out["truncated"] = True
    return out


def file_info_json(fi: FileInfo) -> dict[str, Any]:
    return {
        "path": fi.path,
        "size": fi.size,
        "mode": format(fi.mode & 0o7777, "o"),
        "is_dir": fi.is_dir,
        "mod_time": rfc3339(fi.mod_time),
    }


def admission_json(d: AdmissionDecision) -> dict[str, Any]:
    """Only the 8 keys the Python SDK dataclass accepts (contract §4.3); omitempty ones dropped."""
    out: dict[str, Any] = {"allowed": d.allowed, "queueable": d.queueable}
    if d.reason:
        out["reason"] = d.reason
    out["active_sandboxes"] = d.active_sandboxes
    out["max_sandboxes"] = d.max_sandboxes
    if d.active_owner_sandboxes:
        out["active_owner_sandboxes"] = d.active_owner_sandboxes
    if d.max_owner_sandboxes:
        out["max_owner_sandboxes"] = d.max_owner_sandboxes
    if d.max_ttl:
        out["max_ttl"] = d.max_ttl
    return out


def template_json(t: Template) -> dict[str, Any]:
    out: dict[str, Any] = {"name": t.name, "version": t.version, "image": t.image}
    if t.description:
        out["description"] = t.description
    if t.setup:
        out["setup"] = list(t.setup)
    out.update(
        {
            "memory_mb": t.memory_mb,
            "cpu_cores": t.vcpus,
            "vcpus": t.vcpus,
            "ttl_seconds": t.ttl_seconds,
            "ttl": format_go_duration(float(t.ttl_seconds)),
            "provider": t.provider,
            "metadata": dict(t.metadata),
        }
    )
    if t.env:
        out["env"] = dict(t.env)
    out["pool_size"] = t.pool_size
    out["created_at"] = rfc3339(t.created_at)
    out["updated_at"] = rfc3339(t.updated_at)
    return out


def quota_json(q: Quota) -> dict[str, Any]:
    return {
        "owner_id": q.owner_id,
        "max_sandboxes": q.max_sandboxes,
        "max_ttl": format_go_duration(float(q.max_ttl_s)),
        "max_exec_timeout": format_go_duration(float(q.max_exec_timeout_s)),
        "created_at": rfc3339(q.created_at),
        "updated_at": rfc3339(q.updated_at),
    }


QUOTA_SUMMARY_KEYS = ("total", "with_max_sandboxes", "with_max_ttl", "with_max_exec_timeout")


def stats_json(st: SandboxStats) -> dict[str, Any]:
    return {
        "supported": True,
        # cpu_pct needs two samples; the cumulative counter is what we have.
        "cpu_seconds": round(st.cpu_seconds, 6),
        "mem_bytes": st.mem_bytes,
        "mem_limit_bytes": st.mem_limit_bytes,
        "pids": st.pids,
    }


def provider_json(p: Any) -> dict[str, Any]:
    """Contract §8.1 shape from core's ProviderInfo."""
    out: dict[str, Any] = {
        "name": p.name,
        "healthy": p.healthy,
        "default": p.default,
        "latency_ms": round(float(p.latency_ms), 3),
        "last_checked": rfc3339(p.last_checked),
        "capabilities": list(p.capabilities),
    }
    if p.error:
        out["error"] = p.error
    out["sandbox_count"] = p.sandbox_count
    return out


def provider_detail_json(p: Any) -> dict[str, Any]:
    """Contract §8.3 shape."""
    return {
        "name": p.name,
        "healthy": p.healthy,
        "default": p.default,
        "sandbox_count": p.sandbox_count,
        "health": provider_json(p),
        "config": {str(k): str(v) for k, v in (p.config or {}).items()},
    }


def json_value(v: Any) -> Any:
    """Make core-provided dicts JSON-safe (datetimes become RFC 3339)."""
    if isinstance(v, datetime):
        return rfc3339(v)
    if isinstance(v, dict):
        return {str(k): json_value(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [json_value(x) for x in v]
    return v
