"""Tests of agent.core.mounts: the mountinfo parser, the pure skip rule, and real mounts."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from agent.core import mounts
from agent.core.mounts import MountEntry, find_skipped_mounts, parse_mountinfo, read_mountinfo, skipped_mount_points
from agent.engine.rsync import build_argv

# Lines in the format of proc(5): with and without optional fields, escapes
# for space (\040), tab (\011), newline (\012) and backslash (\134).
MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard
36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
61 27 8:17 / /media/My\\040Disk rw,nosuid shared:33 master:2 propagate_from:1 - exfat /dev/sdb1 rw,fmask=0022
62 27 0:50 / /srv/a\\011b\\012c\\134d rw - fuse.sshfs user@host:/a\\040b rw
this line is not mountinfo
70 27 0:51 / /short rw -
71 27 0:52 / /tmp/\u00e9t\u00e9 rw - tmpfs tmpfs rw
"""


def test_parse_mountinfo() -> None:
    assert parse_mountinfo(MOUNTINFO) == [
        MountEntry("/proc", "proc", "proc", "0:21"),
        MountEntry("/", "ext4", "/dev/vda", "254:0"),
        MountEntry("/mnt2", "ext3", "/dev/root", "98:0"),
        MountEntry("/media/My Disk", "exfat", "/dev/sdb1", "8:17"),
        MountEntry("/srv/a\tb\nc\\d", "fuse.sshfs", "user@host:/a b", "0:50"),
        MountEntry("/tmp/\u00e9t\u00e9", "tmpfs", "tmpfs", "0:52"),
    ]
    assert parse_mountinfo("") == []


@pytest.mark.parametrize(
    ("written", "name"),
    [
        ("plain", "plain"),
        ("My\\040Disk", "My Disk"),
        ("a\\011b\\012c\\134d", "a\tb\nc\\d"),
        ("\\303\\251t\\303\\251", "\u00e9t\u00e9"),  # one escape per byte, decoded together
        ("\\377", os.fsdecode(b"\xff")),  # not UTF-8: kept as os.fsdecode keeps it
        ("a\\400b\\04\\x", "a\\400b\\04\\x"),  # no byte's escape: left as written
    ],
)
def test_unescape(written: str, name: str) -> None:
    assert mounts.unescape(written) == name


def test_read_mountinfo_real() -> None:
    entries = read_mountinfo()
    assert any(entry.mount_point == "/" for entry in entries)
    assert all(entry.mount_point.startswith("/") for entry in entries)
    assert all(":" in entry.device for entry in entries)


def test_read_mountinfo_decodes_bytes(tmp_path: Path) -> None:
    path = tmp_path / "mountinfo"
    path.write_bytes(b"1 0 8:1 / /mnt/caf\xe9\\040x rw - ext4 /dev/sda1 rw\n")
    [entry] = read_mountinfo(str(path))
    assert entry.mount_point == os.fsdecode(b"/mnt/caf\xe9 x")


def _never_same(point: str) -> bool:
    return False


def test_skipped_mount_points_under_source() -> None:
    points = ["/", "/proc", "/proc/sys/fs/binfmt_misc", "/home", "/home2", "/home/user/usb", "/home/", "/homework"]
    assert skipped_mount_points("/home", points, _never_same) == ("/home/user/usb",)
    assert skipped_mount_points("/home/", points, _never_same) == ("/home/user/usb",)
    # Nested under another skipped one: left out; sorted; no duplicates.
    assert skipped_mount_points("/", points, _never_same) == ("/home", "/home2", "/homework", "/proc")
    assert skipped_mount_points("/elsewhere", points, _never_same) == ()


def test_skipped_mount_points_same_device() -> None:
    # /data is a bind mount of the source's filesystem: rsync -x walks into
    # it, so what is mounted below it is skipped at its own level.
    same = {"/data", "/data/sub"}
    points = ["/data/sub/usb", "/data", "/data/sub", "/data/a b", "/data/a b/c", "/data/a", "/data/a/b"]
    assert skipped_mount_points("/", points, lambda point: point in same) == ("/data/a", "/data/a b", "/data/sub/usb")


def test_skipped_mount_points_asks_only_what_it_needs() -> None:
    asked: list[str] = []

    def same_device(point: str) -> bool:
        asked.append(point)
        return False

    assert skipped_mount_points("/src", ["/src/m", "/src/m/n", "/other"], same_device) == ("/src/m",)
    assert asked == ["/src/m"]


def test_find_skipped_mounts_real_root() -> None:
    skipped = find_skipped_mounts("/")
    root_device = os.stat("/").st_dev
    for point in skipped:
        assert point.startswith("/") and point != "/"
        assert not any(point.startswith(outer + "/") for outer in skipped)
    if os.path.ismount("/proc") and os.stat("/proc").st_dev != root_device:
        assert "/proc" in skipped


def test_find_skipped_mounts_unstatable_and_same_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "src"
    (source / "same").mkdir(parents=True)
    entries = [
        MountEntry(str(source / "gone"), "tmpfs", "tmpfs", "0:99"),
        MountEntry(str(source / "same"), "ext4", "/dev/x", "0:98"),
        MountEntry(str(tmp_path / "outside"), "tmpfs", "tmpfs", "0:97"),
    ]
    monkeypatch.setattr(mounts, "read_mountinfo", lambda: entries)
    assert find_skipped_mounts(str(source)) == (str(source / "gone"),)
    # A symlink to the source finds the same mounts.
    (tmp_path / "link").symlink_to(source)
    assert find_skipped_mounts(str(tmp_path / "link")) == (str(source / "gone"),)


# --- real mounts (root) ------------------------------------------------------


@pytest.fixture
def tmpfs_mounts(tmp_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    """source/, with a tmpfs at "source/mnt point" and another inside it."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip(reason="needs root to mount a tmpfs")
    source = tmp_path / "src"
    outer = source / "mnt point"
    outer.mkdir(parents=True)
    (source / "kept").write_text("x")
    mounted: list[Path] = []
    try:
        for point in (outer, outer / "inner"):
            point.mkdir(exist_ok=True)
            completed = subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(point)], capture_output=True, text=True)
            if completed.returncode != 0:
                pytest.skip(reason=f"cannot mount a tmpfs: {completed.stderr.strip()}")
            mounted.append(point)
            (point / "data").write_text("x")
        yield source, outer, outer / "inner"
    finally:
        for point in reversed(mounted):
            subprocess.run(["umount", str(point)], check=True)


@pytest.mark.root
@pytest.mark.integration
def test_find_skipped_mounts_matches_rsync(tmpfs_mounts: tuple[Path, Path, Path], tmp_path: Path) -> None:
    source, outer, inner = tmpfs_mounts
    assert any(entry.mount_point == str(outer) for entry in read_mountinfo())
    assert find_skipped_mounts(str(source)) == (str(outer),)
    assert find_skipped_mounts(str(outer)) == (str(inner),)
    target = tmp_path / "dst"
    argv = build_argv(rsync="rsync", source=str(source), target=str(target), link_dests=(), one_file_system=True, excludes=())
    subprocess.run(argv, check=True, capture_output=True)
    # rsync -x leaves exactly the reported mount point there, empty.
    assert (target / "kept").exists()
    assert (target / "mnt point").is_dir()
    assert list((target / "mnt point").iterdir()) == []
