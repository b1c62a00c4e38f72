"""Which image disks and snapshots the microVM cache trims (no QEMU needed here; the
provider-level check with real VMs is TestMicroVM.test_cache_trim_keeps_what_sandboxes_use)."""

from __future__ import annotations

import json
from pathlib import Path

from stacyvm_server.providers.microvm import cache
from stacyvm_server.providers.microvm.cache import Entry

MB = 1 << 20
D1, D2 = "a" * 32 + "-1024m.ext4", "b" * 32 + "-1024m.ext4"


def entries() -> list[Entry]:
    return [
        Entry(Path("/d/1"), D1, 100 * MB, used=1.0),
        Entry(Path("/d/2"), D2, 100 * MB, used=2.0),
        Entry(Path("/s/old"), "old", 300 * MB, used=3.0, disk=D1),
        Entry(Path("/s/new"), "new", 300 * MB, used=9.0, disk=D2),
    ]


def names(gone: list[Entry]) -> list[str]:
    return [e.name for e in gone]


def test_nothing_goes_while_it_fits() -> None:
    assert cache.victims(entries(), set(), 800 * MB) == []


def test_least_recently_used_snapshot_goes_first_and_its_disk_after_it() -> None:
    # D1 is the oldest, but the snapshot "old" reads from it: "old" goes, then D1 is free
    # and goes before the more recently used "new".
    assert names(cache.victims(entries(), set(), 450 * MB)) == ["old", D1]


def test_stops_as_soon_as_the_rest_fits() -> None:
    assert names(cache.victims(entries(), set(), 600 * MB)) == ["old"]


def test_what_sandboxes_use_is_kept_even_over_budget() -> None:
    gone = cache.victims(entries(), {"old", D2, "new"}, 0)
    assert gone == []  # D1 still backs the kept snapshot "old"
    assert names(cache.victims(entries(), {"new", D2}, 0)) == ["old", D1]


def test_scan_reads_disks_and_finished_snapshots_only(tmp_path: Path) -> None:
    (tmp_path / "disks").mkdir()
    (tmp_path / "disks" / D1).write_bytes(b"x" * 8192)
    (tmp_path / "disks" / "empty.ext4").write_bytes(b"probe")  # the KVM probe's disk is no image disk
    (tmp_path / "disks" / f".{D2}.123.tmp").write_bytes(b"half")
    snap = tmp_path / "snapshots" / "k1"
    snap.mkdir(parents=True)
    (snap / "mem.state").write_bytes(b"y" * 4096)
    (snap / "meta.json").write_text(json.dumps({"shape": {"disk": D1}}))
    (tmp_path / "snapshots" / "k2.building").mkdir()
    found = {e.name: e for e in cache.scan(tmp_path)}
    assert set(found) == {D1, "k1"}
    assert found["k1"].disk == D1 and found[D1].disk is None
    assert found[D1].size >= 8192
    left = cache.remove_partial(tmp_path)
    assert sorted(p.name for p in left) == sorted([f".{D2}.123.tmp", "k2.building"])
    assert not (tmp_path / "snapshots" / "k2.building").exists()
    assert (tmp_path / "disks" / D1).exists() and (snap / "mem.state").exists()


def test_discarded_entries_leave_the_cache_at_once_and_a_crash_cannot_strand_them(tmp_path: Path) -> None:
    (tmp_path / "disks").mkdir()
    (tmp_path / "snapshots" / "k1").mkdir(parents=True)
    (tmp_path / "snapshots" / "k1" / "mem.state").write_bytes(b"m")
    (tmp_path / "disks" / D1).write_bytes(b"d")
    moved = [cache.discard(e, tmp_path / cache.TRASH) for e in cache.scan(tmp_path)]
    assert cache.scan(tmp_path) == [] and all(p.exists() for p in moved)
    # the run dies before the deletion: the next start finds and deletes them
    assert sorted(cache.remove_partial(tmp_path)) == sorted(moved)
    assert not any((tmp_path / cache.TRASH).iterdir())
