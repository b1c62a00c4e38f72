"""Initial schema: sandboxes, templates, quotas, api keys, events.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sandboxes",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("image", sa.Text, nullable=False),
        sa.Column("memory_mb", sa.Integer, nullable=False),
        sa.Column("vcpus", sa.Integer, nullable=False),
        sa.Column("network", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(32)),
        sa.Column("error", sa.Text),
        sa.Column("owner_id", sa.String(128)),
        sa.Column("tenant_id", sa.String(128)),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("expires_at", sa.DateTime, nullable=False),
        sa.Column("destroyed_at", sa.DateTime),
        sa.Column("metadata", sa.JSON),
        sa.Column("handle", sa.JSON),
    )
    op.create_index("ix_sandboxes_state", "sandboxes", ["state"])
    op.create_index("ix_sandboxes_owner_id", "sandboxes", ["owner_id"])
    op.create_index("ix_sandboxes_expires_at", "sandboxes", ["expires_at"])
    op.create_table(
        "templates",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("image", sa.Text, nullable=False),
        sa.Column("description", sa.Text),
        sa.Column("memory_mb", sa.Integer, nullable=False),
        sa.Column("vcpus", sa.Integer, nullable=False),
        sa.Column("ttl_seconds", sa.Integer, nullable=False),
        sa.Column("provider", sa.String(64)),
        sa.Column("metadata", sa.JSON),
        sa.Column("env", sa.JSON),
        sa.Column("setup", sa.JSON),
        sa.Column("pool_size", sa.Integer),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "quotas",
        sa.Column("owner_id", sa.String(128), primary_key=True),
        sa.Column("max_sandboxes", sa.Integer),
        sa.Column("max_ttl_s", sa.Integer),
        sa.Column("max_exec_timeout_s", sa.Integer),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "api_keys",
        sa.Column("key_sha256", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(128)),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("tenant", sa.String(128)),
        sa.Column("owner", sa.String(128)),
        sa.Column("source", sa.String(16)),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "events",
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("sandbox_id", sa.String(64)),
        sa.Column("timestamp", sa.DateTime, nullable=False),
        sa.Column("data", sa.JSON),
    )


def downgrade() -> None:
    for table in ("events", "api_keys", "quotas", "templates", "sandboxes"):
        op.drop_table(table)
