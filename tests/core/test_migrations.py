"""A store created by an older schema is upgraded in place, keeping its rows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text

from stacyvm_server.store.db import Store


def test_upgrade_from_0001_keeps_sandboxes(tmp_path: Path) -> None:
    store = Store(tmp_path / "old.db")
    cfg = Config(str(Path(__import__("stacyvm_server.store.db").store.db.__file__).with_name("alembic.ini")))
    now = datetime.now(UTC).replace(tzinfo=None)
    with store.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
        conn.execute(
            text(
                "INSERT INTO sandboxes (id, provider, image, memory_mb, vcpus, network, state, created_at, expires_at)"
                " VALUES ('sb_old000000001', 'native', 'img', 256, 1, 'none', 'running', :c, :e)"
            ),
            {"c": now, "e": now + timedelta(minutes=5)},
        )
    store.migrate()
    sb = store.get_sandbox("sb_old000000001")
    assert sb is not None and sb.memory_mb == 256 and sb.disk_mb is None
    store.close()
