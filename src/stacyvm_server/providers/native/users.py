"""Resolve an image/exec `user` string ("1000", "app", "app:staff", "1000:50") to ids.

Names are looked up in the sandbox's own /etc/passwd and /etc/group, read
through SandboxFS (never the host's files).
"""

from __future__ import annotations

import os

from stacyvm_server.errors import BadRequest, SandboxFileError
from stacyvm_server.providers.native.files import SandboxFS


def _table(fs: SandboxFS, path: str) -> list[list[str]]:
    try:
        fd = fs.open_read(path)
    except SandboxFileError:
        return []
    with os.fdopen(fd, "rb") as f:
        data = f.read(1 << 20)
    return [line.split(":") for line in data.decode(errors="replace").splitlines() if line and ":" in line]


def resolve_user(fs: SandboxFS, spec: str) -> tuple[int, int]:
    spec = spec.strip()
    if not spec:
        return 0, 0
    user, _, group = spec.partition(":")
    uid: int | None = int(user) if user.isdigit() else None
    gid: int | None = None
    if uid is None or not group:
        for row in _table(fs, "/etc/passwd"):
            if len(row) >= 4 and ((uid is None and row[0] == user) or (uid is not None and row[2] == str(uid))):
                uid, gid = int(row[2]), int(row[3])
                break
    if uid is None:
        raise BadRequest(f"unknown user in sandbox: {user}")
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            match = [int(r[2]) for r in _table(fs, "/etc/group") if len(r) >= 3 and r[0] == group]
            if not match:
                raise BadRequest(f"unknown group in sandbox: {group}")
            gid = match[0]
    return uid, gid if gid is not None else 0
