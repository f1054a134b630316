"""Frozen sources (agent.engine.frozen): a btrfs subvolume backed up from a read-only snapshot at its live path.

Real btrfs filesystems on loop devices (mkfs.btrfs), real ``btrfs subvolume
snapshot``/``delete``, a real private mount namespace (``unshare``) and
real rsync. What a process inside the namespace reads is the snapshot,
while the live file has changed since, and the live system's mount table
never shows the bind; a process killed while it held a snapshot leaves it
behind, and the next backup deletes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from agent.cli import main
from agent.core.commands import Runner
from agent.core.errors import CommandError, UsageError
from agent.core.mounts import MountEntry, read_mountinfo
from agent.engine.frozen import MARK, FrozenSource, containing_mount, view_prefix
from agent.engine.sources import PathSource
from tests.loopfs import mounted, need_root_and_tools

FAST = '[backup]\nionice = "none"\nnice = 0\n[rotation]\nhourly = "always"\n'


def test_the_namespace_argv_binds_over_the_path_or_changes_root_for_slash() -> None:
    carried = [("/s/inner/.snap", "/s/.snap/inner", True), ("/s/mnt", "/s/.snap/mnt", False)]
    argv = view_prefix(unshare="/usr/bin/unshare", python="/usr/bin/python3", path="/s", snapshot="/s/.snap", carried=carried)
    assert argv == (
        "/usr/bin/unshare", "--mount", "--propagation", "private", "--", "/usr/bin/python3", "-I", "-m",
        "agent.engine.frozen_view", "--carry", "/s/inner/.snap", "/s/.snap/inner",
        "--carry-if-present", "/s/mnt", "/s/.snap/mnt", "--over", "/s/.snap", "/s", "--",
    )
    root = view_prefix(unshare="/u", python="/p", path="/", snapshot="/.snap", carried=[])
    assert root[-4:] == ("agent.engine.frozen_view", "--root", "/.snap", "--")


def test_the_mount_a_path_lies_on_is_the_longest_and_last() -> None:
    entries = [
        MountEntry("/", "ext4", "/dev/sda1", "8:1"),
        MountEntry("/srv", "btrfs", "/dev/sdb", "0:40"),
        MountEntry("/srv", "ext4", "/dev/sdc", "8:33"),
        MountEntry("/srvx", "xfs", "/dev/sdd", "8:49"),
    ]
    found = containing_mount(entries, "/srv/data")
    assert found is not None and found.fstype == "ext4" and found.device == "8:33"
    root = containing_mount(entries, "/srvy")
    assert root is not None and root.mount_point == "/"


@pytest.fixture
def btrfs(tmp_path: Path) -> Iterator[Path]:
    """A btrfs filesystem with subvolume ``sv`` (a file, nested subvolume ``inner``) and subvolume ``sv2``."""
    need_root_and_tools("btrfs")
    top = tmp_path / "btrfs"
    with mounted(tmp_path / "images", "btrfs", top):
        for name in ("sv", "sv/inner", "sv2"):
            subprocess.run(["btrfs", "subvolume", "create", str(top / name)], check=True, capture_output=True)
        (top / "sv" / "db").write_text("first\n")
        (top / "sv" / "inner" / "mail").write_text("inbox\n")
        (top / "sv2" / "other").write_text("two\n")
        try:
            yield top
        finally:
            for leftover in sorted(top.glob(f"**/{MARK}*"), key=lambda p: -len(p.parts)):
                subprocess.run(["btrfs", "subvolume", "delete", str(leftover)], check=False, capture_output=True)


def _ours(top: Path) -> list[str]:
    return sorted(str(p.relative_to(top)) for p in top.glob(f"**/{MARK}*"))


@pytest.mark.integration
def test_a_subvolume_is_read_frozen_at_its_live_path_in_a_private_namespace(btrfs: Path, tmp_path: Path) -> None:
    sv = btrfs / "sv"
    source = FrozenSource(live=PathSource(str(sv), one_file_system=False), runner=Runner())
    with contextlib.ExitStack() as stack:
        stack.enter_context(mounted(tmp_path / "images", "ext4", sv / "inner" / "mnt"))
        (sv / "inner" / "mnt" / "on-ext4").write_text("carried\n")
        with source.opened(str(tmp_path / "repo")) as tree:
            (sv / "db").write_text("second\n")
            (sv / "inner" / "mail").write_text("sent\n")
            inside = subprocess.run(
                [*tree.command_prefix, "/bin/cat", str(sv / "db"), str(sv / "inner" / "mail"),
                 str(sv / "inner" / "mnt" / "on-ext4"), "/proc/self/mountinfo"],
                check=True, capture_output=True, text=True,
            ).stdout
            assert tree.record["frozen"] is True
            assert tree.record["frozen_subvolumes"] == [str(sv), str(sv / "inner")]
            assert _ours(btrfs) == sorted([f"sv/{p}" for p in os.listdir(sv) if p.startswith(MARK)]
                                          + [f"sv/inner/{p}" for p in os.listdir(sv / "inner") if p.startswith(MARK)])
            # The live system never sees the bind; inside, the live path is a mount of the snapshot.
            assert str(sv) not in {entry.mount_point for entry in read_mountinfo()}
        lines = inside.splitlines()
        assert lines[:3] == ["first", "inbox", "carried"]
        assert any(f" {sv} " in line and "btrfs" in line for line in lines[3:]), inside
        assert _ours(btrfs) == []


@pytest.mark.integration
def test_several_subvolume_sources_are_each_frozen_and_backed_up(btrfs: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    config = tmp_path / "config.toml"
    config.write_text(
        FAST + f'[[source]]\npath = "{btrfs / "sv"}"\none_file_system = false\n'
        + f'[[source]]\npath = "{btrfs / "sv2"}"\nfreeze = "always"\n'
    )
    assert main(["backup", "--no-sudo", "-q", "--config", str(config), str(repo)]) == 0
    (name,) = os.listdir(repo / "snapshots")
    metadata = json.loads((repo / "metadata" / f"{name}.json").read_text())
    assert [(s["frozen"], s["frozen_subvolumes"]) for s in metadata["sources"]] == [
        (True, [str(btrfs / "sv"), str(btrfs / "sv" / "inner")]),
        (True, [str(btrfs / "sv2")]),
    ]
    sv_dir, sv2_dir = (repo / "snapshots" / name / s["directory"] for s in metadata["sources"])
    assert (sv_dir / "db").read_text() == "first\n" and (sv_dir / "inner" / "mail").read_text() == "inbox\n"
    assert (sv2_dir / "other").read_text() == "two\n"
    assert not [p for p in os.listdir(sv_dir) if p.startswith(MARK)]
    assert _ours(btrfs) == []


_KILLED = """
import os, signal, sys
from agent.core.commands import Runner
from agent.engine.frozen import FrozenSource
from agent.engine.sources import PathSource
with FrozenSource(live=PathSource(sys.argv[1]), runner=Runner()).opened(sys.argv[2]):
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.integration
def test_a_killed_run_leaves_a_snapshot_that_the_next_backup_removes(
    btrfs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sv, repo = btrfs / "sv", tmp_path / "repo"
    killed = subprocess.run([sys.executable, "-c", _KILLED, str(sv), str(repo)], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (leftover,) = _ours(btrfs)
    assert leftover.startswith(f"sv/{MARK}")
    config = tmp_path / "config.toml"
    config.write_text(FAST)
    capsys.readouterr()
    assert main(["backup", "--no-sudo", "--json", "--config", str(config), str(sv), str(repo)]) == 0
    warnings = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"warning"' in line]
    assert any("an interrupted backup left behind" in w["message"] and leftover in w["message"] for w in warnings)
    assert _ours(btrfs) == []
    (name,) = os.listdir(repo / "snapshots")
    assert sorted(os.listdir(repo / "snapshots" / name)) == ["db", "inner"]


@pytest.mark.integration
def test_what_is_not_a_subvolume_is_read_live_or_refused_when_freeze_is_always(btrfs: Path, tmp_path: Path) -> None:
    plain = btrfs / "sv" / "plain"  # a directory inside a subvolume, not one itself
    plain.mkdir()
    (plain / "f").write_text("live\n")
    with FrozenSource(live=PathSource(str(plain)), runner=Runner()).opened(str(tmp_path / "repo")) as tree:
        assert tree.record["frozen"] is False and tree.command_prefix == ()
    always = FrozenSource(live=PathSource(str(plain)), runner=Runner(), freeze="always")
    with pytest.raises(UsageError, match='is not a btrfs subvolume, but freeze = "always"'):
        always.check(str(tmp_path / "repo"))
    inside = FrozenSource(live=PathSource(str(btrfs / "sv")), runner=Runner())
    with pytest.raises(UsageError, match="lies in the btrfs subvolume"):
        inside.check(str(btrfs / "sv" / "backups"))
    never = FrozenSource(live=PathSource(str(btrfs / "sv")), runner=Runner(), freeze="never")
    with never.opened(str(tmp_path / "repo")) as tree:
        assert tree.record["frozen"] is False
    assert _ours(btrfs) == []


@pytest.mark.integration
def test_for_slash_the_command_runs_chrooted_in_the_snapshot_with_the_mounts_carried(tmp_path: Path) -> None:
    """Freezing / itself needs a btrfs root, which this machine has not: the view's --root is tried on a
    directory standing in for the snapshot, with the system's programs carried onto it as mounts are."""
    need_root_and_tools()
    root = tmp_path / "snapshot"
    root.mkdir()
    (root / "marker").write_text("inside the snapshot\n")
    carried: list[tuple[str, str, bool]] = []
    for name in ("usr", "bin", "lib", "lib64"):
        host = Path("/") / name
        if host.is_symlink():
            os.symlink(os.readlink(host), root / name)
        elif host.is_dir():
            (root / name).mkdir()
            carried.append((str(host), str(root / name), True))
    prefix = view_prefix(unshare="/usr/bin/unshare", python=sys.executable, path="/", snapshot=str(root), carried=carried)
    seen = subprocess.run([*prefix, "/bin/cat", "/marker"], capture_output=True, text=True)
    assert (seen.returncode, seen.stdout) == (0, "inside the snapshot\n"), seen.stderr
    assert not (Path("/") / "marker").exists()


@pytest.mark.integration
def test_a_failed_transfer_still_deletes_the_frozen_snapshot(
    btrfs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(FAST + '[commands]\nrsync = "/bin/false"\n')  # run in the namespace, after the snapshot
    capsys.readouterr()
    argv = ["backup", "--no-sudo", "--json", "--config", str(config), str(btrfs / "sv"), str(tmp_path / "repo")]
    assert main(argv) != 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(e["step"], e["message"][:12]) for e in events if e["event"] == "error"] == [("transfer", "rsync failed")]
    assert _ours(btrfs) == []


@pytest.mark.integration
def test_a_subvolume_that_cannot_be_snapshotted_is_read_live_with_auto_and_refused_with_always(
    btrfs: Path, tmp_path: Path
) -> None:
    warnings: list[str] = []
    subprocess.run(["mount", "-o", "remount,ro", str(btrfs)], check=True)  # a read-only root, say
    try:
        auto = FrozenSource(live=PathSource(str(btrfs / "sv")), runner=Runner(), warn=warnings.append)
        with auto.opened(str(tmp_path / "repo")) as tree:
            assert tree.record["frozen"] is False and tree.command_prefix == ()
            assert "Read-only file system" in tree.record["freeze_failed"]
        assert len(warnings) == 1 and "could not be frozen" in warnings[0] and "backed up live" in warnings[0]
        always = FrozenSource(live=PathSource(str(btrfs / "sv")), runner=Runner(), freeze="always")
        with pytest.raises(CommandError), always.opened(str(tmp_path / "repo")):
            pass
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(btrfs)], check=True)
    assert _ours(btrfs) == []
