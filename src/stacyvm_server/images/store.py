"""The image cache: content-addressed blobs, unpacked root filesystems, and refs.

Layout under root:
  blobs/sha256/<hex>              manifests, configs and layers, shared by all images
  rootfs/<manifest-hex>-<shift>/  flattened root, owned by ids shifted by <shift>
  refs.json                       normalised ref -> manifest digest and image config

A rootfs is unpacked into `rootfs/.tmp-*` and renamed into place when complete,
so a crash mid-unpack is never mistaken for a finished image.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import stat
import tempfile
from collections.abc import AsyncIterator, Collection, Iterator
from pathlib import Path
from typing import Any

from stacyvm_server.config import ImagesConfig
from stacyvm_server.errors import ImageError, ImageNotFound
from stacyvm_server.images.archive import import_archive
from stacyvm_server.images.blobs import BlobStore
from stacyvm_server.images.manifest import Manifest, check_digest, parse_config, parse_manifest
from stacyvm_server.images.model import Image, ImageConfig
from stacyvm_server.images.reference import Reference, parse_reference
from stacyvm_server.images.registry import RegistryClient
from stacyvm_server.images.unpack import apply_layer

_TMP = ".tmp-"


@dataclasses.dataclass
class _Entry:
    digest: str
    config: ImageConfig


class ImageStore:
    def __init__(self, root: Path, config: ImagesConfig) -> None:
        self.root = root
        self.config = config
        self.blobs = BlobStore(root)
        self.registry = RegistryClient(config, self.blobs)
        self._rootfs_dir = root / "rootfs"
        self._rootfs_dir.mkdir(parents=True, exist_ok=True)
        self._refs_path = root / "refs.json"
        self._refs: dict[str, _Entry] = {}
        self._sizes: dict[str, int] = {}
        self._refs_stamp: tuple[int, int] | None = None
        self._refresh()
        _remove_leftovers(self._rootfs_dir, self.blobs.dir)
        self._inflight: dict[tuple[str, int], asyncio.Task[Image]] = {}
        self._unpack_locks: dict[str, asyncio.Lock] = {}
        # Pulls and imports run concurrently; prune waits until none runs and blocks new ones.
        self._busy = 0
        self._pruning = False
        self._idle = asyncio.Condition()

    def parse(self, ref: str) -> Reference:
        return parse_reference(ref, default_registry=self.config.default_registry, aliases=self.config.aliases)

    async def ensure(self, ref: str, uid_shift: int = 0) -> Image:
        """The cached image if there is one, else pull it. Concurrent callers share one pull."""
        r = self.parse(ref)
        key = (str(r), uid_shift)
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._ensure(r, uid_shift))
            self._inflight[key] = task
            task.add_done_callback(lambda _: self._inflight.pop(key, None))
        # shield: one caller giving up must not cancel the pull others wait for.
        return await asyncio.shield(task)

    async def _ensure(self, r: Reference, uid_shift: int) -> Image:
        self._refresh()
        entry = self._refs.get(str(r))
        if entry is not None:
            with contextlib.suppress(ImageError):  # cache damaged or blobs pruned: pull again
                async with self._activity():
                    return await self._materialise(str(r), entry, uid_shift)
        return await self._pull(r, uid_shift)

    async def pull(self, ref: str, uid_shift: int = 0) -> Image:
        """Always ask the registry again (a tag may have moved); reuse blobs already cached."""
        return await self._pull(self.parse(ref), uid_shift)

    async def _pull(self, r: Reference, uid_shift: int) -> Image:
        async with self._activity():
            manifest = await self.registry.pull(r)
            return await self._record(r, manifest, uid_shift)

    async def import_archive(self, path: Path, ref: str, uid_shift: int = 0) -> Image:
        """Import a `docker save` tar, an OCI layout (directory or tar) or a plain rootfs tar."""
        r = self.parse(ref)
        async with self._activity():
            manifest = await asyncio.to_thread(import_archive, Path(path), r, self.blobs)
            return await self._record(r, manifest, uid_shift)

    def list(self) -> list[Image]:
        """Every ref with each rootfs unpacked for it (one Image per uid shift)."""
        self._refresh()
        images = []
        for ref, entry in sorted(self._refs.items()):
            hexd = check_digest(entry.digest)
            for d in sorted(self._rootfs_dir.glob(f"{hexd}-*")):
                shift = d.name.rsplit("-", 1)[1]
                images.append(self._image(ref, entry, int(shift)))
        return images

    async def remove(self, ref: str) -> None:
        """Forget a ref. Its data stays until prune(): a sandbox may still run on its rootfs."""
        key = str(self.parse(ref))
        if not await asyncio.to_thread(self._drop_ref, key):
            raise ImageNotFound(f"image {key} is not in the cache")

    async def prune(self, in_use: Collection[Path] = ()) -> int:
        """Delete blobs and rootfs trees no ref uses (nor any path in in_use); return bytes freed."""
        async with self._idle:
            await self._idle.wait_for(lambda: self._busy == 0)
            self._pruning = True
        try:
            return await asyncio.to_thread(self._prune, in_use)
        finally:
            async with self._idle:
                self._pruning = False
                self._idle.notify_all()

    # -- internals --

    @contextlib.asynccontextmanager
    async def _activity(self) -> AsyncIterator[None]:
        async with self._idle:
            await self._idle.wait_for(lambda: not self._pruning)
            self._busy += 1
        try:
            yield
        finally:
            async with self._idle:
                self._busy -= 1
                self._idle.notify_all()

    async def _record(self, r: Reference, manifest: Manifest, uid_shift: int) -> Image:
        config = parse_config(self.blobs.read(manifest.config.digest))
        entry = _Entry(manifest.digest, config)
        image = await self._materialise(str(r), entry, uid_shift)
        await asyncio.to_thread(self._set_ref, str(r), entry)
        return image

    async def _materialise(self, ref: str, entry: _Entry, uid_shift: int) -> Image:
        """Make sure the rootfs for (digest, shift) exists, unpacking from cached blobs if needed."""
        name = f"{check_digest(entry.digest)}-{uid_shift}"
        async with self._unpack_locks.setdefault(name, asyncio.Lock()):
            if not (self._rootfs_dir / name).is_dir():
                manifest = parse_manifest(self.blobs.read(entry.digest), entry.digest)
                size = await asyncio.to_thread(self._unpack, manifest, uid_shift, name)
                await asyncio.to_thread(self._set_size, name, size)
        return self._image(ref, entry, uid_shift)

    def _unpack(self, manifest: Manifest, uid_shift: int, name: str) -> int:
        tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP}{os.getpid()}-{name}-", dir=self._rootfs_dir))
        try:
            os.chown(tmp, uid_shift, uid_shift)
            os.chmod(tmp, 0o755)
            for layer in manifest.layers:
                if not self.blobs.verify(layer.digest):
                    self.blobs.path(layer.digest).unlink(missing_ok=True)  # a re-pull fetches it again
                    raise ImageError(f"cached layer {layer.digest} is missing or corrupt")
                apply_layer(self.blobs.path(layer.digest), tmp, uid_shift)
            size = _tree_size(tmp)
            os.rename(tmp, self._rootfs_dir / name)
            return size
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _image(self, ref: str, entry: _Entry, uid_shift: int) -> Image:
        name = f"{check_digest(entry.digest)}-{uid_shift}"
        rootfs = self._rootfs_dir / name
        if name not in self._sizes:  # unpacked before a crash that lost refs.json's update
            self._sizes[name] = _tree_size(rootfs)
        return Image(ref, entry.digest, entry.config, rootfs, self._sizes[name])

    # refs.json is shared with other processes on the same cache (the `stacyvm image` CLI):
    # every change is a read-modify-write under an flock, and readers reload when it changed.

    def _refresh(self) -> None:
        try:
            st = self._refs_path.stat()
        except FileNotFoundError:
            return
        if (st.st_ino, st.st_mtime_ns) != self._refs_stamp:
            self._refs, self._sizes = self._load_refs()
            self._refs_stamp = (st.st_ino, st.st_mtime_ns)

    @contextlib.contextmanager
    def _refs_locked(self) -> Iterator[None]:
        with open(self.root / "refs.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._refresh()
            yield
            self._save_refs()

    def _set_ref(self, ref: str, entry: _Entry) -> None:
        with self._refs_locked():
            self._refs[ref] = entry

    def _set_size(self, name: str, size: int) -> None:
        with self._refs_locked():
            self._sizes[name] = size

    def _drop_ref(self, ref: str) -> bool:
        with self._refs_locked():
            return self._refs.pop(ref, None) is not None

    def _load_refs(self) -> tuple[dict[str, _Entry], dict[str, int]]:
        try:
            doc = json.loads(self._refs_path.read_text())
        except FileNotFoundError:
            return {}, {}
        except ValueError as exc:
            raise ImageError(f"{self._refs_path} is corrupt: {exc}") from None
        refs = {
            ref: _Entry(e["digest"], ImageConfig(**e["config"])) for ref, e in doc.get("refs", {}).items()
        }
        return refs, {k: int(v) for k, v in doc.get("rootfs_sizes", {}).items()}

    def _save_refs(self) -> None:
        doc: dict[str, Any] = {
            "version": 1,
            "refs": {
                ref: {"digest": e.digest, "config": dataclasses.asdict(e.config)}
                for ref, e in sorted(self._refs.items())
            },
            "rootfs_sizes": dict(sorted(self._sizes.items())),
        }
        tmp = self._refs_path.with_name(f"{_TMP}refs.json")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, self._refs_path)
        st = self._refs_path.stat()
        self._refs_stamp = (st.st_ino, st.st_mtime_ns)

    def _prune(self, in_use_paths: Collection[Path]) -> int:
        # A tree mounted as an overlay lower layer is in use by some sandbox, whichever
        # process asks (the server, or `stacyvm image prune` beside a running server).
        in_use = {Path(p).resolve() for p in in_use_paths} | mounted_lowerdirs()
        with self._refs_locked():
            return self._prune_locked(in_use)

    def _prune_locked(self, in_use: set[Path]) -> int:
        keep_blobs: set[str] = set()
        keep_rootfs: set[str] = set()
        for entry in self._refs.values():
            keep_rootfs.add(check_digest(entry.digest))
            keep_blobs.add(check_digest(entry.digest))
            with contextlib.suppress(ImageError):
                m = parse_manifest(self.blobs.read(entry.digest), entry.digest)
                keep_blobs.update(check_digest(d.digest) for d in [m.config, *m.layers])
        freed = 0
        _remove_leftovers(self.blobs.dir, self._rootfs_dir)
        for blob in self.blobs.dir.iterdir():
            if blob.name not in keep_blobs and not blob.name.startswith(_TMP):
                freed += blob.lstat().st_size
                blob.unlink()
        for tree in self._rootfs_dir.iterdir():
            if tree.name.startswith(_TMP) or tree.name.split("-")[0] in keep_rootfs or tree.resolve() in in_use:
                continue
            freed += _tree_size(tree)
            shutil.rmtree(tree)
            self._sizes.pop(tree.name, None)
        return freed


def mounted_lowerdirs() -> set[Path]:
    """Every overlayfs lower directory currently mounted on this host."""
    found: set[Path] = set()
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        _, _, tail = line.partition(" - ")
        parts = tail.split(" ")
        if len(parts) < 3 or parts[0] != "overlay":
            continue
        for opt in parts[2].split(","):
            if opt.startswith("lowerdir="):
                # mountinfo escapes spaces etc. as octal; our cache paths have none.
                found.update(Path(d) for d in opt.removeprefix("lowerdir=").split(":") if d)
    return found


def _remove_leftovers(*dirs: Path) -> None:
    """Drop temp files and half-unpacked trees whose process (pid in the name) is gone."""
    for d in dirs:
        for p in d.glob(f"{_TMP}*"):
            if _pid_alive(p.name.removeprefix(_TMP).split("-", 1)[0]):
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _pid_alive(text: str) -> bool:
    try:
        os.kill(int(text), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _tree_size(path: Path) -> int:
    """Bytes used by regular files under path, each inode counted once."""
    seen: set[int] = set()
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            st = os.lstat(os.path.join(dirpath, f))
            if stat.S_ISREG(st.st_mode) and st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_size
    return total
