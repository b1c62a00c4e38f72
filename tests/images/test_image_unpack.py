"""Layer application against hand-made malicious and tricky tars."""

import os
import stat
import tarfile
from pathlib import Path

import pytest

from stacyvm_server.errors import ImageError
from stacyvm_server.images.unpack import apply_layer

from .conftest import Entry, make_tar

D, F, S, H = tarfile.DIRTYPE, tarfile.REGTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    return r


def apply(tmp_path: Path, root: Path, entries: list[Entry], shift: int = 0, gzip: bool = False) -> int:
    layer = make_tar(tmp_path / f"layer{len(list(tmp_path.iterdir()))}.tar", entries, gzip=gzip)
    return apply_layer(layer, root, shift)


def test_plain_layer_gzip_and_modes(tmp_path: Path, root: Path) -> None:
    n = apply(tmp_path, root, [
        Entry("./etc/", type=D),
        Entry("./etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
        Entry("./bin/su", b"\x7fELF", mode=0o4755),
        Entry("./bin/sh", type=S, linkname="/bin/busybox"),
        Entry("./tmp/", type=D, mode=0o1777),
    ], gzip=True)
    assert n == len(b"root:x:0:0::/root:/bin/sh\n") + 4
    assert (root / "etc/passwd").read_bytes().startswith(b"root:")
    assert stat.S_IMODE((root / "bin/su").stat().st_mode) == 0o4755  # modes are kept
    assert stat.S_IMODE((root / "tmp").stat().st_mode) == 0o1777
    assert os.readlink(root / "bin/sh") == "/bin/busybox"


@pytest.mark.parametrize("name", ["../x", "a/../../x", "/x", "/etc/passwd"])
def test_refuses_traversal_and_absolute(tmp_path: Path, root: Path, name: str) -> None:
    with pytest.raises(ImageError, match=r"absolute|'\.\.'"):
        apply(tmp_path, root, [Entry(name, b"evil")])
    assert not (tmp_path / "x").exists()


def test_refuses_write_through_symlink(tmp_path: Path, root: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    with pytest.raises(ImageError, match="symlink"):
        apply(tmp_path, root, [Entry("escape", type=S, linkname=str(victim)), Entry("escape/pwned", b"x")])
    assert not (victim / "pwned").exists()


def test_refuses_write_through_symlink_from_earlier_layer(tmp_path: Path, root: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    apply(tmp_path, root, [Entry("d", type=S, linkname="../../victim")])
    with pytest.raises(ImageError, match="symlink"):
        apply(tmp_path, root, [Entry("d/sub/pwned", b"x")])
    assert list(victim.iterdir()) == []


def test_file_replacing_symlink_does_not_follow_it(tmp_path: Path, root: Path) -> None:
    victim = tmp_path / "victim-file"
    victim.write_text("safe")
    apply(tmp_path, root, [Entry("f", type=S, linkname=str(victim)), Entry("f", b"replaced")])
    assert victim.read_text() == "safe"
    assert (root / "f").read_bytes() == b"replaced" and not (root / "f").is_symlink()


@pytest.mark.parametrize("target", ["../outside", "/etc/passwd", "a/../../x"])
def test_refuses_hardlink_outside(tmp_path: Path, root: Path, target: str) -> None:
    with pytest.raises(ImageError, match=r"absolute|'\.\.'"):
        apply(tmp_path, root, [Entry("h", type=H, linkname=target)])
    assert not (root / "h").exists()


def test_refuses_hardlink_through_symlink(tmp_path: Path, root: Path) -> None:
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "key").write_text("k")
    with pytest.raises(ImageError, match="symlink"):
        apply(tmp_path, root, [Entry("s", type=S, linkname=str(secret)), Entry("h", type=H, linkname="s/key")])
    assert not (root / "h").exists()


def test_hardlink_inside(tmp_path: Path, root: Path) -> None:
    apply(tmp_path, root, [Entry("a", b"data"), Entry("b", type=H, linkname="a")])
    assert os.stat(root / "a").st_ino == os.stat(root / "b").st_ino


def test_skips_device_nodes_and_fifos(tmp_path: Path, root: Path) -> None:
    apply(tmp_path, root, [
        Entry("dev/", type=D),
        Entry("dev/sda", type=tarfile.BLKTYPE),
        Entry("dev/mem", type=tarfile.CHRTYPE),
        Entry("dev/fifo", type=tarfile.FIFOTYPE),
        Entry("dev/ok", b"1"),
    ])
    assert sorted(os.listdir(root / "dev")) == ["ok"]


def test_uid_shift(tmp_path: Path, root: Path) -> None:
    apply(tmp_path, root, [
        Entry("home/", type=D),
        Entry("home/u/", type=D, uid=1000, gid=1000),
        Entry("home/u/f", b"x", uid=1000, gid=100),
        Entry("home/u/l", type=S, linkname="f", uid=1000, gid=1000),
        Entry("implicit/parent/file", b"y"),
    ], shift=100000)
    st = (root / "home/u/f").stat()
    assert (st.st_uid, st.st_gid) == (101000, 100100)
    assert os.lstat(root / "home/u/l").st_uid == 101000
    assert (root / "home").stat().st_uid == 100000
    assert (root / "implicit/parent").stat().st_uid == 100000  # dirs the tar never named


def test_setuid_survives_chown(tmp_path: Path, root: Path) -> None:
    apply(tmp_path, root, [Entry("su", b"x", mode=0o4755, uid=0)], shift=100000)
    st = (root / "su").stat()
    assert st.st_uid == 100000 and stat.S_IMODE(st.st_mode) == 0o4755


def test_whiteouts_across_layers(tmp_path: Path, root: Path) -> None:
    apply(tmp_path, root, [
        Entry("etc/", type=D), Entry("etc/keep", b"1"), Entry("etc/gone", b"2"),
        Entry("tree/", type=D), Entry("tree/a/", type=D), Entry("tree/a/deep", b"3"),
        Entry("opq/", type=D), Entry("opq/old1", b"4"), Entry("opq/sub/", type=D), Entry("opq/sub/old2", b"5"),
    ])
    apply(tmp_path, root, [
        Entry("etc/.wh.gone"),
        Entry(".wh.tree"),
        Entry("opq/", type=D),
        Entry("opq/.wh..wh..opq"),
        Entry("opq/new", b"6"),
        Entry("opq/sub/", type=D),
        Entry("opq/sub/new2", b"7"),
    ])
    assert sorted(os.listdir(root / "etc")) == ["keep"]
    assert not (root / "tree").exists()
    assert sorted(os.listdir(root / "opq")) == ["new", "sub"]
    assert sorted(os.listdir(root / "opq/sub")) == ["new2"]  # lower contents of a kept dir go too
    assert not any(".wh." in p for _, _, files in os.walk(root) for p in files)


def test_opaque_marker_after_same_layer_files(tmp_path: Path, root: Path) -> None:
    apply(tmp_path, root, [Entry("o/", type=D), Entry("o/lower", b"1")])
    apply(tmp_path, root, [Entry("o/upper", b"2"), Entry("o/.wh..wh..opq")])
    assert os.listdir(root / "o") == ["upper"]


def test_whiteout_cannot_escape(tmp_path: Path, root: Path) -> None:
    keep = tmp_path / "keep"
    keep.write_text("k")
    with pytest.raises(ImageError):
        apply(tmp_path, root, [Entry("../.wh.keep")])
    apply(tmp_path, root, [Entry("s", type=S, linkname=str(tmp_path))])
    with pytest.raises(ImageError, match="symlink"):
        apply(tmp_path, root, [Entry("s/.wh.keep")])
    assert keep.exists()


def test_dir_replaces_file_and_file_replaces_dir(tmp_path: Path, root: Path) -> None:
    apply(tmp_path, root, [Entry("x", b"file"), Entry("y/", type=D), Entry("y/z", b"1")])
    apply(tmp_path, root, [Entry("x/", type=D), Entry("y", b"now a file")])
    assert (root / "x").is_dir() and (root / "y").read_bytes() == b"now a file"


def test_large_layer_streams(tmp_path: Path, root: Path) -> None:
    big = tmp_path / "big.tar"
    chunk = os.urandom(1 << 20)
    with tarfile.open(big, "w") as tar:
        info = tarfile.TarInfo("big.bin")
        info.size = 64 << 20

        class Repeat:
            left = info.size

            def read(self, n: int = -1) -> bytes:
                n = min(n if n >= 0 else self.left, self.left, len(chunk))
                self.left -= n
                return chunk[:n]

        tar.addfile(info, Repeat())  # type: ignore[arg-type]
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert apply_layer(big, root) == 64 << 20
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 32 * 1024, f"unpacking a 64 MiB file grew RSS by {grown_kib} KiB"


def test_whiteout_in_missing_dir_creates_nothing(tmp_path: Path, root: Path) -> None:
    apply(tmp_path, root, [Entry("a/b/.wh.c"), Entry("x/.wh..wh..opq")])
    assert os.listdir(root) == []
