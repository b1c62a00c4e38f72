"""The store: SQLite (WAL) through SQLAlchemy 2, schema managed by Alembic.

Calls are synchronous and short (local SQLite, indexed lookups), so core calls
them directly from the event loop. Writes that must be atomic with a check
(admission) run in one `BEGIN IMMEDIATE` transaction.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any, cast

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, Table, bindparam, create_engine, delete, event, func, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from stacyvm_server.core.models import ACTIVE_STATES, Event, Quota, Reason, Sandbox, State, Template
from stacyvm_server.errors import Conflict, NotFound
from stacyvm_server.providers.base import SandboxHandle
from stacyvm_server.store.tables import ApiKeyRow, EventRow, QuotaRow, SandboxRow, TemplateRow

_ACTIVE = [s.value for s in ACTIVE_STATES]

# Sandbox writes sit on every spawn's and destroy's path: they use these prebuilt Core
# statements on a plain connection (0.11 ms here) instead of an ORM session's merge
# (SELECT + UPDATE through the unit of work, 0.41 ms; about 1.8 ms next to a busy dockerd).
_SANDBOXES = cast(Table, SandboxRow.__table__)
_SB_INSERT = insert(_SANDBOXES)
_SB_UPDATE = update(_SANDBOXES).where(_SANDBOXES.c.id == bindparam("_id"))
_SB_COUNT_ACTIVE = select(func.count()).select_from(_SANDBOXES).where(_SANDBOXES.c.state.in_(_ACTIVE))
_SB_COUNT_OWNER = _SB_COUNT_ACTIVE.where(_SANDBOXES.c.owner_id == bindparam("owner"))
_EV_INSERT = insert(cast(Table, EventRow.__table__))


def _sqlite_engine(path: Path) -> Engine:
    engine = create_engine(f"sqlite:///{path}", connect_args={"check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        # Autocommit at the driver level; SQLAlchemy's "begin" event issues BEGIN itself.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=5000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        # IMMEDIATE takes the write lock up front, so check-then-insert is atomic.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _to_sandbox(row: SandboxRow) -> Sandbox:
    handle = SandboxHandle(**row.handle) if row.handle else None
    return Sandbox(
        id=row.id,
        provider=row.provider,
        image=row.image,
        memory_mb=row.memory_mb,
        vcpus=row.vcpus,
        network=row.network,
        state=State(row.state),
        created_at=row.created_at,
        expires_at=row.expires_at,
        owner_id=row.owner_id,
        tenant_id=row.tenant_id,
        metadata=dict(row.metadata_ or {}),
        reason=Reason(row.reason) if row.reason else None,
        destroyed_at=row.destroyed_at,
        error=row.error,
        handle=handle,
        disk_mb=row.disk_mb,
    )


def _to_template(row: TemplateRow) -> Template:
    return Template(
        name=row.name,
        image=row.image,
        version=row.version,
        description=row.description or "",
        memory_mb=row.memory_mb,
        vcpus=row.vcpus,
        ttl_seconds=row.ttl_seconds,
        provider=row.provider or "",
        metadata=dict(row.metadata_ or {}),
        env=dict(row.env or {}),
        setup=list(row.setup or []),
        pool_size=row.pool_size or 0,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _to_quota(row: QuotaRow) -> Quota:
    return Quota(
        owner_id=row.owner_id,
        max_sandboxes=row.max_sandboxes or 0,
        max_ttl_s=row.max_ttl_s or 0,
        max_exec_timeout_s=row.max_exec_timeout_s or 0,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


class Store:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.engine = _sqlite_engine(path)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def migrate(self) -> None:
        cfg = Config(str(Path(__file__).with_name("alembic.ini")))
        with self.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    # sandboxes ---------------------------------------------------------------
    def reserve(self, sb: Sandbox, max_total: int, owner_limit: int) -> tuple[int, int] | None:
        """Insert `sb` if the limits allow; return None on success, else (active, owner_active)."""
        with self.engine.begin() as conn:  # BEGIN IMMEDIATE: the counts and the insert are atomic
            active = conn.execute(_SB_COUNT_ACTIVE).scalar() or 0
            owner_active = 0
            if sb.owner_id is not None:
                owner_active = conn.execute(_SB_COUNT_OWNER, {"owner": sb.owner_id}).scalar() or 0
            if (max_total and active >= max_total) or (owner_limit and owner_active >= owner_limit):
                return active, owner_active
            conn.execute(_SB_INSERT, {"id": sb.id, **self._values(sb)})
        return None

    @staticmethod
    def _values(sb: Sandbox) -> dict[str, Any]:
        """The row's columns (by column name) but the id."""
        return {
            "provider": sb.provider,
            "image": sb.image,
            "memory_mb": sb.memory_mb,
            "vcpus": sb.vcpus,
            "network": sb.network,
            "state": sb.state.value,
            "reason": sb.reason.value if sb.reason else None,
            "error": sb.error,
            "owner_id": sb.owner_id,
            "tenant_id": sb.tenant_id,
            "created_at": sb.created_at,
            "expires_at": sb.expires_at,
            "destroyed_at": sb.destroyed_at,
            "metadata": sb.metadata,
            "handle": asdict(sb.handle) if sb.handle else None,
            "disk_mb": sb.disk_mb,
        }

    def save_sandbox(self, sb: Sandbox) -> None:
        values = self._values(sb)
        with self.engine.begin() as conn:
            if conn.execute(_SB_UPDATE, {"_id": sb.id, **values}).rowcount == 0:
                conn.execute(_SB_INSERT, {"id": sb.id, **values})

    def get_sandbox(self, sandbox_id: str) -> Sandbox | None:
        with self._sessions() as s:
            row = s.get(SandboxRow, sandbox_id)
            return _to_sandbox(row) if row else None

    def active_sandboxes(self, provider: str | None = None) -> list[Sandbox]:
        with self._sessions() as s:
            q = select(SandboxRow).where(SandboxRow.state.in_(_ACTIVE))
            if provider:
                q = q.where(SandboxRow.provider == provider)
            return [_to_sandbox(r) for r in s.scalars(q.order_by(SandboxRow.created_at.desc()))]

    def count_active(self, owner_id: str | None = None) -> int:
        with self._sessions() as s:
            q = select(func.count()).where(SandboxRow.state.in_(_ACTIVE))
            if owner_id is not None:
                q = q.where(SandboxRow.owner_id == owner_id)
            return s.scalar(q) or 0

    def counts_by_state_provider(self) -> dict[tuple[str, str], int]:
        with self._sessions() as s:
            q = (
                select(SandboxRow.state, SandboxRow.provider, func.count())
                .where(SandboxRow.state.in_(_ACTIVE))
                .group_by(SandboxRow.state, SandboxRow.provider)
            )
            return {(state, provider): n for state, provider, n in s.execute(q)}

    def expired(self, now: datetime) -> list[Sandbox]:
        with self._sessions() as s:
            q = select(SandboxRow).where(
                SandboxRow.state.in_([State.RUNNING.value, State.ERROR.value]), SandboxRow.expires_at <= now
            )
            return [_to_sandbox(r) for r in s.scalars(q)]

    def next_expiry(self) -> datetime | None:
        with self._sessions() as s:
            return s.scalar(
                select(func.min(SandboxRow.expires_at)).where(
                    SandboxRow.state.in_([State.RUNNING.value, State.ERROR.value])
                )
            )

    # templates ---------------------------------------------------------------
    def list_templates(self) -> list[Template]:
        with self._sessions() as s:
            return [_to_template(r) for r in s.scalars(select(TemplateRow).order_by(TemplateRow.name))]

    def get_template(self, name: str) -> Template:
        with self._sessions() as s:
            row = s.get(TemplateRow, name)
            if row is None:
                raise NotFound(f'template "{name}" not found')
            return _to_template(row)

    def put_template(self, t: Template, create: bool) -> Template:
        with self._tx() as s:
            existing = s.get(TemplateRow, t.name)
            if create and existing is not None:
                raise Conflict(f'template "{t.name}" already exists')
            if not create and existing is None:
                raise NotFound(f'template "{t.name}" not found')
            if existing is not None:
                t.created_at = existing.created_at
            s.merge(
                TemplateRow(
                    name=t.name,
                    version=t.version,
                    image=t.image,
                    description=t.description,
                    memory_mb=t.memory_mb,
                    vcpus=t.vcpus,
                    ttl_seconds=t.ttl_seconds,
                    provider=t.provider,
                    metadata_=t.metadata,
                    env=t.env,
                    setup=t.setup,
                    pool_size=t.pool_size,
                    created_at=t.created_at,
                    updated_at=t.updated_at,
                )
            )
        return t

    def delete_template(self, name: str) -> None:
        with self._tx() as s:
            if s.execute(delete(TemplateRow).where(TemplateRow.name == name)).rowcount == 0:  # type: ignore[attr-defined]
                raise NotFound(f'template "{name}" not found')

    # quotas ------------------------------------------------------------------
    def list_quotas(self) -> list[Quota]:
        with self._sessions() as s:
            return [_to_quota(r) for r in s.scalars(select(QuotaRow).order_by(QuotaRow.owner_id))]

    def get_quota(self, owner_id: str) -> Quota | None:
        with self._sessions() as s:
            row = s.get(QuotaRow, owner_id)
            return _to_quota(row) if row else None

    def put_quota(self, q: Quota) -> Quota:
        with self._tx() as s:
            existing = s.get(QuotaRow, q.owner_id)
            if existing is not None:
                q.created_at = existing.created_at
            s.merge(
                QuotaRow(
                    owner_id=q.owner_id,
                    max_sandboxes=q.max_sandboxes,
                    max_ttl_s=q.max_ttl_s,
                    max_exec_timeout_s=q.max_exec_timeout_s,
                    created_at=q.created_at,
                    updated_at=q.updated_at,
                )
            )
        return q

    def delete_quota(self, owner_id: str) -> None:
        with self._tx() as s:
            if s.execute(delete(QuotaRow).where(QuotaRow.owner_id == owner_id)).rowcount == 0:  # type: ignore[attr-defined]
                raise NotFound(f'quota for owner "{owner_id}" not found')

    # api keys ----------------------------------------------------------------
    def replace_config_keys(self, rows: list[ApiKeyRow]) -> None:
        """Config is the source of truth for config keys: drop the old set, insert the new."""
        with self._tx() as s:
            s.execute(delete(ApiKeyRow).where(ApiKeyRow.source == "config"))
            for row in rows:
                s.merge(row)

    def list_keys(self) -> list[ApiKeyRow]:
        with self._sessions() as s:
            return list(s.scalars(select(ApiKeyRow)))

    # events ------------------------------------------------------------------
    def append_events(self, events: list[Event], keep: int) -> None:
        # A Core executemany, like the sandbox writes: this runs on the event loop.
        with self.engine.begin() as conn:
            conn.execute(_EV_INSERT, [{"seq": e.seq, "type": e.type, "sandbox_id": e.sandbox_id,
                                       "timestamp": e.timestamp, "data": e.data} for e in events])
            last = events[-1].seq
            if last // 100 != (events[0].seq - 1) // 100:  # trim now and then, not on every batch
                conn.execute(delete(EventRow).where(EventRow.seq <= last - keep))

    def recent_events(self, limit: int) -> list[Event]:
        with self._sessions() as s:
            rows = list(s.scalars(select(EventRow).order_by(EventRow.seq.desc()).limit(limit)))
        return [Event(r.seq, r.type, r.timestamp, r.sandbox_id, r.data) for r in reversed(rows)]
