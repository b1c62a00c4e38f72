"""Path-safe file access to a sandbox's root from the host.

The server runs as host root, and the sandbox controls every symlink in its
tree. So no path is ever resolved by the host's normal lookup: each one goes
through openat2(rootfd, path, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS |
RESOLVE_NO_XDEV). The kernel then treats the sandbox root as "/" for `..` and
absolute symlinks alike, so `ln -s /etc /x` makes /x/shadow the *sandbox's*
/etc/shadow, never the host's. The last component is then handled with
dir_fd= and follow_symlinks=False, so a symlink is replaced or removed, not
followed, by write/move/delete.

All functions here block; the provider calls them through asyncio.to_thread.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import os
import posixpath
import secrets
import shutil
import stat as st
from collections.abc import Iterator
from datetime import UTC, datetime

from stacyvm_server.errors import SandboxFileError
from stacyvm_server.providers.base import FileInfo
from stacyvm_server.providers.native import syscalls
from stacyvm_server.providers.sandboxpath import file_error, normalize

RESOLVE = syscalls.RESOLVE_IN_ROOT | syscalls.RESOLVE_NO_MAGICLINKS | syscalls.RESOLVE_NO_XDEV
CHUNK = 64 * 1024

def _err(exc: OSError, path: str) -> SandboxFileError:
    return file_error(exc.errno or 0, exc.strerror or str(exc), path)


class SandboxFS:
    def __init__(self, root: str, uid: int, gid: int) -> None:
        self.root = root
        self.uid = uid  # host uid of sandbox root: files we create belong to it
        self.gid = gid

    # resolution ----------------------------------------------------------------
    @contextlib.contextmanager
    def _rootfd(self) -> Iterator[int]:
        fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            yield fd
        finally:
            os.close(fd)

    def _open(self, rootfd: int, path: str, flags: int, mode: int = 0) -> int:
        rel = path.lstrip("/") or "."
        try:
            return syscalls.openat2(rootfd, rel, flags, mode, RESOLVE)
        except OSError as exc:
            raise _err(exc, path) from None

    def _parent(self, rootfd: int, path: str, create: bool = False) -> tuple[int, str]:
        """(O_PATH fd of the parent directory, final name). Caller closes the fd."""
        if path == "/":
            raise SandboxFileError("operation not allowed on /")
        parent, name = posixpath.split(path)
        if create:
            self._makedirs(rootfd, parent)
        return self._open(rootfd, parent, os.O_PATH | os.O_DIRECTORY), name

    def _makedirs(self, rootfd: int, path: str) -> None:
        parts = [p for p in path.split("/") if p]
        cur = "/"
        for part in parts:
            parent, cur = cur, posixpath.join(cur, part)
            try:
                os.close(syscalls.openat2(rootfd, cur.lstrip("/"), os.O_PATH | os.O_DIRECTORY, 0, RESOLVE))
                continue
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise _err(exc, cur) from None
            pfd = self._open(rootfd, parent, os.O_PATH | os.O_DIRECTORY)
            try:
                os.mkdir(part, 0o755, dir_fd=pfd)
                os.chown(part, self.uid, self.gid, dir_fd=pfd, follow_symlinks=False)
            except FileExistsError:
                pass  # created concurrently, or a dangling symlink: the next open decides
            except OSError as exc:
                raise _err(exc, cur) from None
            finally:
                os.close(pfd)
            os.close(self._open(rootfd, cur, os.O_PATH | os.O_DIRECTORY))

    # reads ---------------------------------------------------------------------
    def open_read(self, path: str) -> int:
        """fd of a regular file (symlinks followed inside the sandbox root)."""
        path = normalize(path)
        with self._rootfd() as rootfd:
            # O_NONBLOCK: opening a FIFO must not hang the server.
            fd = self._open(rootfd, path, os.O_RDONLY | os.O_NONBLOCK)
        if not st.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise SandboxFileError(f"not a regular file: {path}")
        return fd

    def stat(self, path: str) -> FileInfo:
        path = normalize(path)
        with self._rootfd() as rootfd:
            if path == "/":
                return _info("/", os.fstat(rootfd))
            pfd, name = self._parent(rootfd, path)
            try:
                return _info(path, os.stat(name, dir_fd=pfd, follow_symlinks=False))
            except OSError as exc:
                raise _err(exc, path) from None
            finally:
                os.close(pfd)

    def list_dir(self, path: str) -> list[FileInfo]:
        path = normalize(path)
        with self._rootfd() as rootfd:
            fd = self._open(rootfd, path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with os.scandir(fd) as it:
                entries = [(e.name, e.stat(follow_symlinks=False)) for e in it]
        finally:
            os.close(fd)
        return [_info(posixpath.join(path, n), s) for n, s in sorted(entries)]

    def glob(self, pattern: str) -> list[str]:
        pattern = normalize(pattern)
        parts = [p for p in pattern.split("/") if p]
        found: list[str] = []
        with self._rootfd() as rootfd:
            self._glob(rootfd, "/", parts, found)
        return sorted(found)

    def _glob(self, rootfd: int, base: str, parts: list[str], found: list[str]) -> None:
        if not parts:
            found.append(base)
            return
        head, rest = parts[0], parts[1:]
        if not _magic(head):
            cand = posixpath.join(base, head)
            try:
                if rest:
                    os.close(syscalls.openat2(rootfd, cand.lstrip("/"), os.O_PATH | os.O_DIRECTORY, 0, RESOLVE))
                else:
                    os.close(syscalls.openat2(rootfd, cand.lstrip("/"), os.O_PATH | os.O_NOFOLLOW, 0, RESOLVE))
            except OSError:
                return
            self._glob(rootfd, cand, rest, found)
            return
        try:
            fd = syscalls.openat2(rootfd, base.lstrip("/") or ".", os.O_RDONLY | os.O_DIRECTORY, 0, RESOLVE)
        except OSError:
            return
        try:
            with os.scandir(fd) as it:
                names = [e.name for e in it]
        finally:
            os.close(fd)
        for name in sorted(names):
            if name.startswith(".") and not head.startswith("."):
                continue  # shell convention: wildcards skip dotfiles
            if fnmatch.fnmatchcase(name, head):
                self._glob(rootfd, posixpath.join(base, name), rest, found)

    # writes --------------------------------------------------------------------
    def open_write(self, path: str, mode: int) -> tuple[int, int, str, str]:
        """Create a temp file next to `path`: (fd, parent fd, temp name, final name)."""
        path = normalize(path)
        with self._rootfd() as rootfd:
            pfd, name = self._parent(rootfd, path, create=True)
        tmp = f".{name[:200]}.stacyvm-{secrets.token_hex(4)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=pfd)
            os.fchown(fd, self.uid, self.gid)
        except OSError as exc:
            os.close(pfd)
            raise _err(exc, path) from None
        return fd, pfd, tmp, name

    def finish_write(self, fd: int, pfd: int, tmp: str, name: str, mode: int, ok: bool, path: str) -> None:
        try:
            if ok:
                os.fchmod(fd, mode & 0o7777)
            os.close(fd)
            if ok:
                # rename() replaces a symlink at `name` itself; it never follows it.
                os.rename(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=pfd)
            raise _err(exc, normalize(path)) from None
        finally:
            if not ok:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=pfd)
            os.close(pfd)

    def move(self, src: str, dst: str) -> None:
        src, dst = normalize(src), normalize(dst)
        with self._rootfd() as rootfd:
            spfd, sname = self._parent(rootfd, src)
            try:
                os.stat(sname, dir_fd=spfd, follow_symlinks=False)
            except OSError as exc:
                os.close(spfd)
                raise _err(exc, src) from None
            try:
                dpfd, dname = self._parent(rootfd, dst, create=True)
            except BaseException:
                os.close(spfd)
                raise
            try:
                os.rename(sname, dname, src_dir_fd=spfd, dst_dir_fd=dpfd)
            except OSError as exc:
                raise _err(exc, f"{src} -> {dst}") from None
            finally:
                os.close(spfd)
                os.close(dpfd)

    def chmod(self, path: str, mode: int) -> None:
        path = normalize(path)
        with self._rootfd() as rootfd:
            fd = self._open(rootfd, path, os.O_PATH)
        try:
            # Linux has no lchmod; chmod through the O_PATH fd changes exactly the
            # inode openat2 resolved inside the root.
            os.chmod(f"/proc/self/fd/{fd}", mode & 0o7777)
        except OSError as exc:
            raise _err(exc, path) from None
        finally:
            os.close(fd)

    def delete(self, path: str, recursive: bool) -> None:
        path = normalize(path)
        with self._rootfd() as rootfd:
            try:
                pfd, name = self._parent(rootfd, path)
            except SandboxFileError:
                if path == "/":
                    raise
                return  # parent missing: nothing to delete
            try:
                try:
                    s = os.stat(name, dir_fd=pfd, follow_symlinks=False)
                except FileNotFoundError:
                    return
                if st.S_ISDIR(s.st_mode):
                    if not recursive:
                        raise SandboxFileError(f"is a directory (use recursive): {path}")
                    # fd-based rmtree: never follows symlinks found inside.
                    shutil.rmtree(name, dir_fd=pfd)
                else:
                    os.unlink(name, dir_fd=pfd)
            except OSError as exc:
                raise _err(exc, path) from None
            finally:
                os.close(pfd)


def _magic(part: str) -> bool:
    return any(c in part for c in "*?[")


def _info(path: str, s: os.stat_result) -> FileInfo:
    return FileInfo(
        path=path,
        size=s.st_size,
        mode=st.S_IMODE(s.st_mode),
        is_dir=st.S_ISDIR(s.st_mode),
        mod_time=datetime.fromtimestamp(s.st_mtime, tz=UTC),
        is_symlink=st.S_ISLNK(s.st_mode),
    )
