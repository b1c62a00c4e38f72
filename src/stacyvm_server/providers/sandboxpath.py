"""In-sandbox paths and file-error messages, shared by every provider."""

from __future__ import annotations

import errno
import posixpath

from stacyvm_server.errors import SandboxFileError

MESSAGES = {
    errno.ENOENT: "no such file or directory",
    errno.ENOTDIR: "not a directory",
    errno.EISDIR: "is a directory",
    errno.EXDEV: "path leaves the sandbox filesystem",
    errno.ELOOP: "too many levels of symbolic links",
    errno.ENOTEMPTY: "directory not empty",
    errno.EEXIST: "already exists",
    errno.ENAMETOOLONG: "name too long",
    errno.ENOSPC: "no space left on device",
}


def file_error(err: int, strerror: str, path: str) -> SandboxFileError:
    return SandboxFileError(f"{MESSAGES.get(err, strerror)}: {path}")


def normalize(path: str) -> str:
    """Absolute, lexically clean in-sandbox path ("a/../../b" -> "/b")."""
    if "\x00" in path:
        raise SandboxFileError("path contains a NUL byte")
    return posixpath.normpath("/" + path.lstrip("/")) if path else "/"
