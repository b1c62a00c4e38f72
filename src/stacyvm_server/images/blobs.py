"""Content-addressed blob files: `blobs/sha256/<hex>`, written only after the digest checks."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import IO

from stacyvm_server.errors import ImageError
from stacyvm_server.images.manifest import check_digest, sha256_digest

_CHUNK = 1 << 20


class BlobWriter:
    """Stream bytes into a temp file while hashing; `commit` verifies and publishes them."""

    def __init__(self, store: BlobStore, expected: str | None, size: int | None) -> None:
        self.store, self.expected, self.size = store, expected, size
        self._hash = hashlib.sha256()
        self.written = 0
        # The pid in the name lets a later process tell a crashed writer's leftovers from live ones.
        fd, name = tempfile.mkstemp(dir=store.dir, prefix=f".tmp-{os.getpid()}-")
        self._tmp = Path(name)
        self._file = os.fdopen(fd, "wb")

    def write(self, chunk: bytes) -> None:
        self.written += len(chunk)
        if self.size is not None and self.written > self.size:
            raise ImageError(f"blob {self.expected} is larger than its declared {self.size} bytes")
        self._hash.update(chunk)
        self._file.write(chunk)

    def commit(self) -> str:
        """Check digest and size, then rename into place; return the digest."""
        self._file.close()
        digest = "sha256:" + self._hash.hexdigest()
        if self.expected is not None and digest != self.expected:
            self.abort()
            raise ImageError(f"digest mismatch: expected {self.expected}, got {digest}")
        if self.size is not None and self.written != self.size:
            self.abort()
            raise ImageError(f"blob {digest}: got {self.written} bytes, expected {self.size}")
        os.replace(self._tmp, self.store.path(digest))
        return digest

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.dir = root / "blobs" / "sha256"
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        return self.dir / check_digest(digest)

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def writer(self, expected: str | None = None, size: int | None = None) -> BlobWriter:
        return BlobWriter(self, expected, size)

    def put_bytes(self, data: bytes, expected: str | None = None) -> str:
        w = self.writer(expected, None)
        w.write(data)
        return w.commit()

    def put_file(self, src: IO[bytes], expected: str | None = None, size: int | None = None) -> str:
        w = self.writer(expected, size)
        try:
            while chunk := src.read(_CHUNK):
                w.write(chunk)
        except BaseException:
            w.abort()
            raise
        return w.commit()

    def read(self, digest: str) -> bytes:
        """A small blob (manifest, config), re-verified: the cache may have been tampered with."""
        try:
            data = self.path(digest).read_bytes()
        except FileNotFoundError:
            raise ImageError(f"blob {digest} is missing from the cache") from None
        if sha256_digest(data) != digest:
            self.path(digest).unlink(missing_ok=True)  # so the next pull fetches it again
            raise ImageError(f"cached blob {digest} is corrupt (digest mismatch)")
        return data

    def verify(self, digest: str) -> bool:
        """Re-hash a cached blob in constant memory."""
        h = hashlib.sha256()
        try:
            with open(self.path(digest), "rb") as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
        except FileNotFoundError:
            return False
        return "sha256:" + h.hexdigest() == digest
