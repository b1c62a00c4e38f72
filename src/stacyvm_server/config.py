"""Configuration: `stacyvm.yaml` plus `STACYVM_<SECTION>_<KEY>` environment variables.

Precedence: environment > YAML file > defaults. Every section is its own
pydantic-settings class so each key has exactly one env name, e.g.
`STACYVM_SERVER_PORT`, `STACYVM_DEFAULTS_MAX_TTL`, `STACYVM_NATIVE_RUNTIME`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from stacyvm_server.durations import DurationError, parse_go_duration_ns

DEFAULT_CONFIG_PATHS = ("./stacyvm.yaml", "/etc/stacyvm/stacyvm.yaml")


def _duration(v: Any, field_name: str) -> str:
    try:
        parse_go_duration_ns(str(v))
    except DurationError as exc:
        raise ValueError(f"{field_name}: {exc}") from exc
    return str(v)


class _Section(BaseSettings):
    model_config = SettingsConfigDict(extra="forbid", env_nested_delimiter="__")


class ServerConfig(_Section):
    model_config = SettingsConfigDict(env_prefix="STACYVM_SERVER_", extra="forbid")
    host: str = "0.0.0.0"
    port: int = 7423
    data_dir: Path = Path("/var/lib/stacyvm")
    preview_domain: str = "localhost"
    cors_allowed_origins: list[str] = Field(default_factory=lambda: ["*"])
    # Refuse a non-loopback bind without API keys unless this is set.
    allow_unauthenticated_remote: bool = False
    max_body_bytes: int = 64 * 1024 * 1024
    log_level: str = "info"


class ApiKeyConfig(BaseModel):
    model_config = {"extra": "forbid"}
    # Either the key itself or its sha256 hex digest (preferred in files).
    key: str | None = None
    key_sha256: str | None = None
    name: str = ""
    role: Literal["viewer", "api", "admin"] = "api"
    tenant: str | None = None
    owner: str | None = None  # the key may only act as this owner


class AuthConfig(_Section):
    model_config = SettingsConfigDict(env_prefix="STACYVM_AUTH_", extra="forbid")
    api_key: str | None = None  # one plain key with role "api"
    admin_api_key: str | None = None
    keys: list[ApiKeyConfig] = Field(default_factory=list)

    @property
    def enabled(self) -> bool:
        return bool(self.api_key or self.admin_api_key or self.keys)


class DefaultsConfig(_Section):
    model_config = SettingsConfigDict(env_prefix="STACYVM_DEFAULTS_", extra="forbid")
    image: str = "alpine:latest"
    provider: str = "native"
    memory_mb: int = 512
    vcpus: int = 1
    ttl: str = "30m"
    max_ttl: str = "24h"
    default_exec_timeout: str = "0s"
    max_exec_timeout: str = "10m"
    max_sandboxes: int = 0  # 0 = unlimited
    max_sandboxes_per_owner: int = 0
    max_memory_mb: int = 8192
    max_vcpus: int = 8
    pids_limit: int = 256
    disk_mb: int = 0  # writable-layer cap per sandbox; 0 = none
    max_disk_mb: int = 16384
    network: Literal["none", "bridge"] = "none"
    allowed_networks: list[Literal["none", "bridge"]] = Field(default_factory=lambda: ["none", "bridge"])  # type: ignore[arg-type]
    # Sync exec keeps at most this many bytes per stream, then marks the cut.
    max_exec_output_bytes: int = 8 * 1024 * 1024

    @field_validator("ttl", "max_ttl", "default_exec_timeout", "max_exec_timeout")
    @classmethod
    def _check_duration(cls, v: Any, info: Any) -> str:
        return _duration(v, info.field_name)


class RegistryConfig(BaseModel):
    model_config = {"extra": "forbid"}
    insecure: bool = False  # plain HTTP (loopback registries)
    mirrors: list[str] = Field(default_factory=list)  # "host:port" tried before the registry itself
    username: str | None = None
    password: str | None = None


class ImagesConfig(_Section):
    model_config = SettingsConfigDict(env_prefix="STACYVM_IMAGES_", extra="forbid")
    # Defaults to <server.data_dir>/images when unset.
    cache_dir: Path | None = None
    registries: dict[str, RegistryConfig] = Field(default_factory=dict)
    # Short names ("python:3.11") resolve against this registry.
    default_registry: str = "docker.io"
    # Local aliases: "stacyvm/python:3.11" -> "127.0.0.1:5000/stacyvm/python:3.11".
    aliases: dict[str, str] = Field(default_factory=dict)


class NativeConfig(_Section):
    model_config = SettingsConfigDict(env_prefix="STACYVM_NATIVE_", extra="forbid")
    enabled: bool = True
    runtime: Literal["crun", "runc", "runsc"] = "crun"
    runtime_path: str | None = None
    # Defaults to <server.data_dir>/native when unset.
    state_dir: Path | None = None
    bridge_subnet: str = "10.88.0.0/16"
    # Sandboxes may reach each other over the bridge only when this is set.
    allow_inter_sandbox: bool = False


# Docker's default capability set minus what sandboxes rarely need (MKNOD, NET_RAW,
# SETFCAP, SETPCAP, SYS_CHROOT, AUDIT_WRITE). See docs/docker-provider.md.
DOCKER_DEFAULT_CAPS = ["CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
                       "NET_BIND_SERVICE"]


class DockerConfig(_Section):
    model_config = SettingsConfigDict(env_prefix="STACYVM_DOCKER_", extra="forbid")
    # Off by default: a server must start without dockerd.
    enabled: bool = False
    socket: str = "/var/run/docker.sock"
    runtime: Literal["runc", "crun", "runsc", "kata-runtime"] = "runc"
    # Runtimes a spawn may ask for with its `runtime` field, besides `runtime` (the
    # default, always allowed). Empty: every sandbox uses `runtime`.
    allowed_runtimes: list[Literal["runc", "crun", "runsc", "kata-runtime"]] = Field(default_factory=list)
    # Our own bridge network for network "bridge" (created when missing).
    network: str = "stacyvm"
    bridge_name: str = "stacyvm0"
    subnet: str = "10.89.0.0/16"
    # Sandboxes may reach each other over the bridge only when this is set.
    allow_inter_sandbox: bool = False
    # Read-only root filesystem; /tmp and /workspace are then writable anonymous volumes.
    readonly_rootfs: bool = False
    cap_add: list[str] = Field(default_factory=lambda: list(DOCKER_DEFAULT_CAPS))
    # A static busybox bind-mounted read-only at /.stacyvm/busybox: file operations
    # and the main process use it, so images need not ship any tools.
    helper_busybox: str = "/bin/busybox"
    pull_timeout: float = 600.0


class MicroVMConfig(_Section):
    """QEMU microVMs (docs/microvm-provider.md)."""

    model_config = SettingsConfigDict(env_prefix="STACYVM_MICROVM_", extra="forbid")
    enabled: bool = False
    # auto: KVM when it really boots our guest (probed at start), else TCG.
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    qemu_path: str = "qemu-system-x86_64"
    # Default <server.data_dir>/microvm; assets default to <state_dir>/assets.
    state_dir: Path | None = None
    assets_dir: Path | None = None
    # Build the kernel and initramfs from Debian packages at start when missing.
    build_assets: bool = True
    # Restore new sandboxes from a per-shape snapshot instead of booting each one.
    snapshots: bool = True
    kernel_args: str = "console=ttyS0 quiet loglevel=1 panic=-1"
    # Guest RAM is memory_mb plus this (kernel, agent), rounded up to a power of two;
    # memory_mb itself is enforced by a cgroup inside the guest.
    guest_overhead_mb: int = Field(default=96, ge=32)
    # Free space on each image's root disk above its content.
    disk_free_mb: int = Field(default=1024, ge=64)
    # Image disks and snapshots kept for reuse, in MiB actually allocated on the host. Beyond
    # it the least recently used that no sandbox needs are removed (when the cache grows, and
    # at start); 0 keeps only what sandboxes use.
    cache_max_mb: int = Field(default=20480, ge=0)
    boot_timeout: float = 180.0


class PreviewConfig(_Section):
    """The preview proxy (docs/preview.md)."""

    model_config = SettingsConfigDict(env_prefix="STACYVM_PREVIEW_", extra="forbid")
    enabled: bool = True
    # Host header sent to the sandbox's server: "localhost" sends localhost:<port>
    # (dev servers such as Vite or webpack reject unknown hosts); "original" passes
    # the preview host through.
    host_header: Literal["original", "localhost"] = "localhost"
    token_ttl: str = "1h"  # default token lifetime
    max_token_ttl: str = "24h"
    # URLs handed out: "https://{host}" behind a TLS proxy; unset means http://{host}:<server.port>/.
    public_url: str | None = None

    @field_validator("token_ttl", "max_token_ttl")
    @classmethod
    def _check_duration(cls, v: Any, info: Any) -> str:
        return _duration(v, info.field_name)


class EventsConfig(_Section):
    model_config = SettingsConfigDict(env_prefix="STACYVM_EVENTS_", extra="forbid")
    history: int = 1000


class Settings(BaseModel):
    server: ServerConfig = Field(default_factory=ServerConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    defaults: DefaultsConfig = Field(default_factory=DefaultsConfig)
    images: ImagesConfig = Field(default_factory=ImagesConfig)
    native: NativeConfig = Field(default_factory=NativeConfig)
    docker: DockerConfig = Field(default_factory=DockerConfig)
    microvm: MicroVMConfig = Field(default_factory=MicroVMConfig)
    events: EventsConfig = Field(default_factory=EventsConfig)
    preview: PreviewConfig = Field(default_factory=PreviewConfig)

    @property
    def images_dir(self) -> Path:
        return self.images.cache_dir or self.server.data_dir / "images"

    @property
    def native_dir(self) -> Path:
        return self.native.state_dir or self.server.data_dir / "native"

    @property
    def microvm_dir(self) -> Path:
        return self.microvm.state_dir or self.server.data_dir / "microvm"

    @property
    def db_path(self) -> Path:
        return self.server.data_dir / "stacyvm.db"


_SECTIONS: dict[str, type[BaseSettings]] = {
    "server": ServerConfig,
    "auth": AuthConfig,
    "defaults": DefaultsConfig,
    "images": ImagesConfig,
    "native": NativeConfig,
    "docker": DockerConfig,
    "microvm": MicroVMConfig,
    "events": EventsConfig,
    "preview": PreviewConfig,
}


def load_settings(path: str | Path | None = None) -> Settings:
    """Load YAML (explicit path, $STACYVM_CONFIG, or the default locations) then apply env."""
    data: dict[str, Any] = {}
    candidates = [path] if path else [os.environ.get("STACYVM_CONFIG"), *DEFAULT_CONFIG_PATHS]
    for cand in candidates:
        if cand and Path(cand).is_file():
            loaded = yaml.safe_load(Path(cand).read_text()) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"{cand}: top level must be a mapping")
            data = loaded
            break
        if path:
            raise FileNotFoundError(f"config file not found: {path}")
    unknown = set(data) - set(_SECTIONS)
    if unknown:
        raise ValueError(f"unknown config sections: {', '.join(sorted(unknown))}")
    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        from_env = cls()  # reads STACYVM_<SECTION>_* only
        env_values = {k: getattr(from_env, k) for k in from_env.model_fields_set}
        sections[name] = cls.model_validate({**(data.get(name) or {}), **env_values})
    return Settings(**sections)
