"""The btrfs layout (agent.engine.btrfs): real btrfs on a loop device, real rsync, real subvolumes.

The pure parts (which filesystem, which layout, the argv, which hard links
to split) are tested directly. The rest runs whole backups into a
repository on a loop-mounted btrfs (the session's ``btrfs_mount``), and
checks what a careful user relies on: read-only snapshots, history never
rewritten, a file changed in place (same inode number in every snapshot)
told from an unchanged one by the manifest, versions, diff and verify in
both layouts, rotation by ``btrfs subvolume delete``, and a kill at each
btrfs step leaving nothing that looks complete and is not.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.cli import main
from agent.core.errors import RepositoryError
from agent.core.mounts import MountEntry
from agent.engine import btrfs, history
from agent.engine.rsync import build_argv
from agent.repository.store import MARKER, Repository
from tests.test_disk import rig  # noqa: F401  (the fixture bench uses)
from tests.test_disk_cycle import Bench, bench  # noqa: F401  (a LUKS disk rig with the CLI)

pytestmark = pytest.mark.integration

FAST = '[backup]\nionice = "none"\nnice = 0\n[rotation]\nhourly = "always"\n'


def entry(point: str, fstype: str) -> MountEntry:
    return MountEntry(point, fstype, "/dev/x", "0:1")


# -- pure ----------------------------------------------------------------------------


def test_filesystem_type_is_the_deepest_mount_above_the_path() -> None:
    mounts = [entry("/", "ext4"), entry("/mnt/backup", "btrfs"), entry("/mnt/backup/other", "xfs"), entry("/mnt/b", "vfat")]
    assert btrfs.filesystem_type("/mnt/backup/host", mounts) == "btrfs"
    assert btrfs.filesystem_type("/mnt/backup", mounts) == "btrfs"
    assert btrfs.filesystem_type("/mnt/backup/other/x", mounts) == "xfs"
    assert btrfs.filesystem_type("/mnt/backupx", mounts) == "ext4"  # not below /mnt/backup
    assert btrfs.filesystem_type("/srv", [entry("/mnt", "btrfs")]) is None


def test_choose_layout() -> None:
    assert btrfs.choose_layout("auto", "btrfs", "/r") == "btrfs"
    assert btrfs.choose_layout("auto", "ext4", "/r") == "links"
    assert btrfs.choose_layout("links", "btrfs", "/r") == "links"
    assert btrfs.choose_layout("btrfs", "btrfs", "/r") == "btrfs"
    with pytest.raises(RepositoryError, match=r'layout = "btrfs" needs a btrfs filesystem, and /r is on ext4'):
        btrfs.choose_layout("btrfs", "ext4", "/r")


def test_inplace_argv_updates_the_clone_and_takes_no_link_dest() -> None:
    argv = build_argv(rsync="/usr/bin/rsync", source="/src", target="/t", link_dests=(), one_file_system=True, excludes=(), inplace=True)
    assert {"--inplace", "--no-whole-file", "--delete", "--delete-excluded"} <= set(argv)
    assert not any(a.startswith("--link-dest") for a in argv)
    with pytest.raises(ValueError, match="no --link-dest"):
        build_argv(rsync="/usr/bin/rsync", source="/src", target="/t", link_dests=("/l",), one_file_system=True, excludes=(), inplace=True)
    assert btrfs.subvolume_snapshot_argv("/bin/btrfs", "/a", "/b", readonly=True) == ("/bin/btrfs", "subvolume", "snapshot", "-r", "/a", "/b")
    assert btrfs.set_readonly_argv("/bin/btrfs", "/b") == ("/bin/btrfs", "property", "set", "-ts", "/b", "ro", "true")


def test_groups_to_split_keeps_groups_the_source_still_links(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("1")
    os.link(tmp_path / "a", tmp_path / "b")
    (tmp_path / "c").write_text("2")
    (tmp_path / "d").write_text("2")

    def lstat(path: bytes) -> os.stat_result | None:
        try:
            return os.lstat(os.fsencode(tmp_path) + b"/" + path)
        except OSError:
            return None

    groups = {1: [b"a", b"b"], 2: [b"d", b"c"], 3: [b"e", b"a"]}
    # a/b still one file: kept; c/d split in the source: d unlinked; e is gone from the source: a... kept, e unlinked
    assert btrfs.groups_to_split(groups, lstat) == [b"d", b"e"]


# -- real btrfs ------------------------------------------------------------------


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(FAST)
    return path


def backup(source: Path, repo: Path, config: Path) -> str:
    assert main(["backup", "--no-sudo", "-q", "--config", str(config), str(source), str(repo)]) == 0
    return os.readlink(repo / "latest").split("/")[-1]


def read_only(path: Path) -> bool:
    out = subprocess.run(["btrfs", "property", "get", "-ts", str(path), "ro"], capture_output=True, text=True, check=True)
    return out.stdout.strip() == "ro=true"


def tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink() and ".backup-agent-send" not in p.parts  # method = "send"'s own
    }


def layout_root(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    return Path(request.getfixturevalue("btrfs_dir")) if kind == "btrfs" else tmp_path


def test_snapshots_are_read_only_subvolumes_of_a_btrfs_repository(btrfs_dir: Path, tmp_path: Path, config: Path, rsync_path: str) -> None:
    source, repo = tmp_path / "src", btrfs_dir / "repo"
    source.mkdir()
    (source / "a").write_text("one\n")
    (source / "gone").write_text("deleted later\n")
    first = backup(source, repo, config)
    assert Repository.open(str(repo)).marker.layout == "btrfs"
    (source / "a").write_text("two, longer\n")
    (source / "gone").unlink()
    second = backup(source, repo, config)
    snaps = repo / "snapshots"
    assert sorted(os.listdir(snaps)) == [first, second]
    for name in (first, second):
        assert os.lstat(snaps / name).st_ino == btrfs.SUBVOLUME_INODE and read_only(snaps / name)
        assert json.loads((repo / "metadata" / f"{name}.json").read_text())["state"] == "complete"
    assert tree(snaps / first).keys() == {"a", "gone"} and (snaps / first / "a").read_text() == "one\n"
    assert tree(snaps / second) == tree(source)
    with pytest.raises(OSError):
        (snaps / first / "a").write_text("history")  # read-only: nothing rewrites a snapshot
    # A dry run writes nothing; restore reads a read-only subvolume like any snapshot.
    before = sorted(os.listdir(snaps)), os.readlink(repo / "latest")
    (source / "a").write_text("three\n")
    assert main(["backup", "--no-sudo", "-q", "--dry-run", "--config", str(config), str(source), str(repo)]) == 0
    assert (sorted(os.listdir(snaps)), os.readlink(repo / "latest")) == before
    restore = ["restore", "-q", "--config", str(config), "--repository", str(repo), "--snapshot", first, str(source / "gone")]
    assert main(restore) == 0
    assert (source / f"restored-{first}" / "gone").read_text() == "deleted later\n"


def test_init_style_choice_refuses_btrfs_on_another_filesystem(tmp_path: Path, config: Path, rsync_path: str) -> None:
    source = tmp_path / "src"
    source.mkdir()
    forced = tmp_path / "forced.toml"
    forced.write_text(FAST.replace("nice = 0\n", 'nice = 0\nlayout = "btrfs"\n'))
    assert main(["backup", "--no-sudo", "-q", "--config", str(forced), str(source), str(tmp_path / "repo")]) != 0
    assert not (tmp_path / "repo").exists()  # nothing written


def test_a_repository_keeps_its_layout(btrfs_dir: Path, tmp_path: Path, config: Path, rsync_path: str) -> None:
    source, repo = tmp_path / "src", btrfs_dir / "repo"
    source.mkdir()
    backup(source, repo, config)
    links = tmp_path / "links.toml"
    links.write_text(FAST.replace("nice = 0\n", 'nice = 0\nlayout = "links"\n'))
    assert main(["backup", "--no-sudo", "-q", "--config", str(links), str(source), str(repo)]) != 0


@pytest.mark.parametrize("kind", ["links", "btrfs"])
def test_a_file_changed_in_place_is_told_from_an_unchanged_one(
    kind: str, tmp_path: Path, config: Path, request: pytest.FixtureRequest, rsync_path: str
) -> None:
    """Manifest reuse, versions, diff and verify: same size, new content, new mtime; the btrfs snapshot keeps its inode number."""
    source, repo = tmp_path / "src", layout_root(kind, tmp_path, request) / "repo"
    source.mkdir()
    (source / "changed").write_bytes(b"A" * 5000)
    (source / "same").write_bytes(b"S" * 5000)
    os.utime(source / "changed", (1_600_000_000, 1_600_000_000))
    first = backup(source, repo, config)
    (source / "changed").write_bytes(b"B" * 5000)  # same size
    os.utime(source / "changed", (1_600_000_100, 1_600_000_100))
    second = backup(source, repo, config)
    snaps = repo / "snapshots"
    if kind == "btrfs":  # the case the inode alone cannot tell
        assert os.lstat(snaps / first / "changed").st_ino == os.lstat(snaps / second / "changed").st_ino

    recorded = json.loads((repo / "metadata" / f"{second}.json").read_text())["manifest"]
    assert (recorded["hashed_files"], recorded["reused_files"]) == (1, 1), recorded
    manifest = (repo / "metadata" / f"{second}.manifest").read_text()
    assert hashlib.sha256(b"B" * 5000).hexdigest() + " 5000 " in manifest

    repository = Repository.open(str(repo))
    snaps_list = history.snapshots(repository)
    assert [(v.first, v.last) for v in history.versions(snaps_list, str(source / "changed"))] == [(first, first), (second, second)]
    assert [(v.first, v.last) for v in history.versions(snaps_list, str(source / "same"))] == [(first, second)]
    assert [(c.path, c.change) for c in history.diff(str(snaps / first), str(snaps / second))] == [("changed", "changed")]
    assert main(["verify", "--all", "-q", "--config", str(config), "--repository", str(repo)]) == 0


def test_a_hard_link_the_source_split_is_split_in_the_clone(btrfs_dir: Path, tmp_path: Path, config: Path, rsync_path: str) -> None:
    """rsync --inplace writes through hard links: the clone's must follow the source's first."""
    source, repo = tmp_path / "src", btrfs_dir / "repo"
    (source / "deep").mkdir(parents=True)
    (source / "hard-a").write_text("shared inode\n")
    os.link(source / "hard-a", source / "deep" / "hard-b")
    (source / "x").write_text("1\n")
    os.link(source / "x", source / "y")
    first = backup(source, repo, config)
    (source / "deep" / "hard-b").unlink()
    (source / "deep" / "hard-b").write_text("split\n")
    second = backup(source, repo, config)
    snap = repo / "snapshots" / second
    assert (snap / "hard-a").read_text() == "shared inode\n" and (snap / "deep" / "hard-b").read_text() == "split\n"
    assert os.lstat(snap / "x").st_ino == os.lstat(snap / "y").st_ino  # a link the source keeps stays one
    assert (repo / "snapshots" / first / "deep" / "hard-b").read_text() == "shared inode\n"


OLD = "2020-01-01T00-00-00+0000"


def add_old_snapshot(repo: Path, of: str) -> None:
    """A read-only snapshot from long ago (another hour, so hourly = 1 rotates it away)."""
    snaps = repo / "snapshots"
    subprocess.run(["btrfs", "subvolume", "snapshot", "-r", str(snaps / of), str(snaps / OLD)], check=True, capture_output=True)
    (repo / "metadata" / f"{OLD}.json").write_text((repo / "metadata" / f"{of}.json").read_text())


def test_rotation_deletes_subvolumes(btrfs_dir: Path, tmp_path: Path, rsync_path: str) -> None:
    source, repo = tmp_path / "src", btrfs_dir / "repo"
    source.mkdir()
    (source / "a").write_text("a\n")
    keep_one = tmp_path / "one.toml"
    keep_one.write_text('[backup]\nionice = "none"\nnice = 0\n[rotation]\nhourly = 1\n')
    first = backup(source, repo, keep_one)
    add_old_snapshot(repo, first)
    backup(source, repo, keep_one)
    assert OLD not in os.listdir(repo / "snapshots")
    assert not (repo / "metadata" / f"{OLD}.json").exists()
    assert not (repo / ".trash").exists() or os.listdir(repo / ".trash") == []  # deleted as a subvolume, not moved aside


# -- a kill at each btrfs step ---------------------------------------------------------

# A stand-in for btrfs at the process boundary: the real btrfs runs, and
# the backup process is killed (SIGKILL) just before or just after the
# step named.
WRAPPER = """#!/bin/sh
echo $$ >> {pids}
case "$1 $2" in
"{step}"*)
    {before}
    {real} "$@"
    kill -9 $PPID
    exit 0;;
esac
exec {real} "$@"
"""

STEPS = [
    ("rsync", "subvolume snapshot", "before"),  # begin: the clone of latest
    ("rsync", "subvolume snapshot", "after"),
    ("rsync", "property set", "before"),  # complete: read-only
    ("rsync", "property set", "after"),
    ("rsync", "subvolume delete", "before"),  # rotation
    ("rsync", "subvolume delete", "after"),
    ("send", "subvolume snapshot", "before"),  # the source's snapshot
    ("send", "subvolume snapshot", "after"),
    ("send", "send", "before"),
    ("send", "send", "after"),
    ("send", "receive", "before"),
    ("send", "receive", "after"),
    ("send", "subvolume delete", "after"),  # rotation
]


def wait_gone(pids: Path) -> None:
    """The stand-in's processes that outlived the killed backup (the other half of send | receive) have ended."""
    deadline = time.monotonic() + 20
    for pid in pids.read_text().split() if pids.exists() else []:
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.02)


def check_nothing_looks_complete_that_is_not(repo: Path, states: list[dict[str, str]]) -> None:
    repository = Repository.open(str(repo))
    for name in repository.snapshot_names():
        path = repo / "snapshots" / name
        assert os.lstat(path).st_ino == btrfs.SUBVOLUME_INODE and read_only(path), name
        assert (repository.read_metadata(name) or {}).get("state") == "complete", name
        assert tree(path) in states, name
    assert len(repository.in_progress_names()) <= 1


@pytest.mark.parametrize(("method", "step", "when"), STEPS, ids=[f"{m}-{s.replace(' ', '-')}-{w}" for m, s, w in STEPS])
def test_a_kill_at_each_btrfs_step_leaves_nothing_that_looks_complete(
    method: str, step: str, when: str, btrfs_dir: Path, tmp_path: Path, trusted_dir: Path, rsync_path: str
) -> None:
    real = shutil.which("btrfs")
    assert real is not None
    wrapper = trusted_dir / "btrfs"
    pids = tmp_path / "pids"
    wrapper.write_text(
        WRAPPER.format(step=step, real=real, pids=pids, before="kill -9 $PPID; exit 0" if when == "before" else ":")
    )
    wrapper.chmod(0o755)
    source, repo = btrfs_dir / "src", btrfs_dir / "repo"
    subprocess.run(["btrfs", "subvolume", "create", str(source)], check=True, capture_output=True)
    plain = tmp_path / "plain.toml"
    plain.write_text(f'[backup]\nionice = "none"\nnice = 0\nmethod = "{method}"\n[rotation]\nhourly = 1\n')
    killing = tmp_path / "killing.toml"
    killing.write_text(plain.read_text() + f'[commands]\nbtrfs = "{wrapper}"\n')
    states = []
    (source / "a").write_text("first\n")
    states.append(tree(source))
    first = backup(source, repo, plain)
    add_old_snapshot(repo, first)
    (source / "a").write_text("second state\n")
    (source / "b").write_text("new\n")
    states.append(tree(source))
    run = subprocess.run(
        [sys.executable, "-m", "agent.cli", "backup", "--no-sudo", "-q", "--config", str(killing), str(source), str(repo)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == -9, run.stderr  # killed, at the step named
    wait_gone(pids)
    check_nothing_looks_complete_that_is_not(repo, states)
    name = backup(source, repo, plain)  # the next run finishes the work
    check_nothing_looks_complete_that_is_not(repo, states)
    assert tree(repo / "snapshots" / name) == tree(source)
    assert OLD not in Repository.open(str(repo)).snapshot_names() and Repository.open(str(repo)).latest_name() == name
    assert main(["verify", "--all", "-q", "--config", str(plain), "--repository", str(repo)]) == 0


# -- method = "send" -------------------------------------------------------------------


def run_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[dict[str, object]]]:
    status = main(argv)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    return status, lines


def test_send_is_incremental_and_its_snapshots_are_ordinary(
    btrfs_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], rsync_path: str
) -> None:
    source, repo = btrfs_dir / "src", btrfs_dir / "repo"
    subprocess.run(["btrfs", "subvolume", "create", str(source)], check=True, capture_output=True)
    (source / "a").write_text("one\n")
    (source / "same").write_bytes(b"S" * 9000)
    config = tmp_path / "send.toml"
    config.write_text('[backup]\nionice = "none"\nnice = 0\nmethod = "send"\n[rotation]\nhourly = "always"\n')
    argv = ["backup", "--no-sudo", "--json", "--config", str(config), str(source), str(repo)]
    status, events = run_json(argv, capsys)
    assert status == 0
    assert any(e["event"] == "warning" and "whole subvolume is sent" in str(e["message"]) for e in events)
    first = os.readlink(repo / "latest").split("/")[-1]
    (source / "a").write_text("two, longer\n")
    status, events = run_json(argv, capsys)
    assert status == 0 and not [e for e in events if e["event"] == "warning"]
    second = os.readlink(repo / "latest").split("/")[-1]
    meta = json.loads((repo / "metadata" / f"{second}.json").read_text())
    assert meta["method"] == "send" and meta["sent"]["parent"] == first and meta["sent"]["whole"] is False
    assert (meta["manifest"]["hashed_files"], meta["manifest"]["reused_files"]) == (1, 1)
    snaps = repo / "snapshots"
    assert tree(snaps / second) == tree(source) and (snaps / first / "a").read_text() == "one\n"
    assert read_only(snaps / second) and os.lstat(snaps / second).st_ino == btrfs.SUBVOLUME_INODE
    # Ordinary snapshots for every other command.
    assert main(["verify", "--all", "-q", "--config", str(config), "--repository", str(repo)]) == 0
    found = history.versions(history.snapshots(Repository.open(str(repo))), str(source / "a"))
    assert [(v.first, v.last) for v in found] == [(first, first), (second, second)]
    # The source side keeps the parent it used and the snapshot just sent (the next run's parent); no more.
    (chain,) = os.listdir(source / ".backup-agent-send")
    assert sorted(os.listdir(source / ".backup-agent-send" / chain)) == [f"{first}.in-progress", f"{second}.in-progress"]


def test_send_falls_back_to_rsync_with_a_warning(
    btrfs_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], rsync_path: str
) -> None:
    source, repo = tmp_path / "plain-dir", btrfs_dir / "repo"
    source.mkdir()
    (source / "a").write_text("x\n")
    config = tmp_path / "send.toml"
    config.write_text('[backup]\nionice = "none"\nnice = 0\nmethod = "send"\n')
    status, events = run_json(["backup", "--no-sudo", "--json", "--config", str(config), str(source), str(repo)], capsys)
    assert status == 0
    warned = [str(e["message"]) for e in events if e["event"] == "warning"]
    assert any('method = "send" is not used' in w and "not on btrfs" in w for w in warned), warned
    name = os.readlink(repo / "latest").split("/")[-1]
    assert tree(repo / "snapshots" / name) == tree(source)
    assert "method" not in json.loads((repo / "metadata" / f"{name}.json").read_text())


# -- init on a btrfs disk ------------------------------------------------------------------


def test_init_records_the_btrfs_layout_of_a_btrfs_disk(bench: Bench) -> None:
    """The disk rig (LUKS header, stand-in mapping, real mounts) with its plain device made btrfs, as crypttab-examples/btrfs."""
    image = bench.tmp / "btrfs.img"
    with open(image, "wb") as handle:
        handle.truncate(64 << 20)
    subprocess.run(["mkfs.btrfs", "-q", "-f", "--mixed", str(image)], check=True, capture_output=True)
    device = bench.rig.attach(image)  # detached by the rig's cleanup
    bench.write_config(target=device, disk={"filesystem": "btrfs", "mount_options": ["noatime", "compress=zstd"]})
    run = bench.init()
    assert "layout btrfs (read-only btrfs subvolume snapshots)" in run.stdout
    name = bench.backup_ok()
    bench.assert_locked_and_unmounted(device)
    with bench.looking(device) as root:
        assert 'layout = "btrfs"' in (root / "host" / MARKER).read_text()
        snapshot = root / "host" / "snapshots" / name
        assert os.lstat(snapshot).st_ino == btrfs.SUBVOLUME_INODE and (snapshot / "plain.txt").read_text() == "plain\n"


def test_init_refuses_a_forced_btrfs_layout_on_ext4_and_writes_nothing(bench: Bench) -> None:
    bench.write_config(disk={"layout": "btrfs"})
    run = bench.cli("init", "--disk", bench.rig.name, "--yes", "--config", str(bench.config))
    assert run.returncode != 0
    assert 'layout = "btrfs" needs a btrfs filesystem' in run.stderr and "nothing was written" in run.stderr
    bench.assert_locked_and_unmounted()
    with bench.looking() as root:
        assert not (root / "host").exists()


def test_mountinfo_names_the_block_device_under_a_btrfs_mount(btrfs_mount: Path) -> None:
    """btrfs shows an anonymous device in mountinfo; the disk checks compare the one its source names."""
    from agent.core.mounts import read_mountinfo
    from agent.disk.devices import device_number, top_mount

    entry = top_mount(read_mountinfo(), str(btrfs_mount))
    assert entry is not None and entry.fstype == "btrfs"
    loop = device_number(os.stat(entry.source).st_rdev)
    assert entry.device != loop and entry.backing == loop and entry.from_device(loop)


def test_a_stop_during_receive_stops_and_does_not_fall_back_to_rsync(
    btrfs_dir: Path, tmp_path: Path, trusted_dir: Path, rsync_path: str
) -> None:
    """SIGTERM (the agent's Stop) while btrfs receive runs: the cycle stops, deletes the partial copy, makes nothing else."""
    real = shutil.which("btrfs")
    started = tmp_path / "receive-started"
    wrapper = trusted_dir / "btrfs"  # a stand-in only for receive, which waits like a slow one
    wrapper.write_text(f'#!/bin/sh\nif [ "$1" = receive ]; then : > {started}; exec sleep 30; fi\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    source, repo = btrfs_dir / "src", btrfs_dir / "repo"
    subprocess.run(["btrfs", "subvolume", "create", str(source)], check=True, capture_output=True)
    (source / "a").write_text("a\n")
    config = tmp_path / "send.toml"
    config.write_text(f'[backup]\nionice = "none"\nnice = 0\nmethod = "send"\n[commands]\nbtrfs = "{wrapper}"\n')
    process = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "backup", "--no-sudo", "--json", "--config", str(config), str(source), str(repo)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not started.exists() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.02)
        assert started.exists()
        process.terminate()
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 128 + 15, err

    events = [json.loads(line) for line in out.splitlines()]
    assert not [e for e in events if e.get("fallback") or e["event"] == "complete"]
    assert Repository.open(str(repo)).snapshot_names() == [] and Repository.open(str(repo)).in_progress_names() == []
    (chain,) = os.listdir(source / ".backup-agent-send")
    assert os.listdir(source / ".backup-agent-send" / chain) == []  # the source side's snapshot deleted too


def test_itemized_changes_name_the_files_written_byte_for_byte() -> None:
    from agent.engine.rsync import Written

    written = Written()
    for line in [
        ">f+++++++++ new.txt",
        ".f...p..... mode only",
        ">f.st...... d/we\\#377ird",  # rsync's escape of a byte that is not printable ASCII
        "hf+++++++++ hard => link",
        "cd+++++++++ d/",
        "*deleting   gone.txt",
        "cL+++++++++ link -> target",
    ]:
        written.feed(line)
    assert written.files == {b"new.txt", b"mode only", b"d/we\xffird", b"hard => link"} and written.exact
    assert not written.feed("Number of files: 3") and written.feed(">f..t...... caf\u00e9") and not written.exact


def test_manifest_reuse_without_a_list_compares_the_previous_snapshot(btrfs_dir: Path) -> None:
    """No itemized list (a received snapshot, a resumed clone): inode, ctime, mtime and size decide, file by file."""
    from agent.repository import manifest as manifests

    tree = btrfs_dir / "tree"
    subprocess.run(["btrfs", "subvolume", "create", str(tree)], check=True, capture_output=True)
    (tree / "changed").write_bytes(b"A" * 4096)
    (tree / "same").write_bytes(b"S" * 4096)
    previous = btrfs_dir / "previous"
    subprocess.run(["btrfs", "subvolume", "snapshot", "-r", str(tree), str(previous)], check=True, capture_output=True)
    manifests.record(str(previous), str(btrfs_dir / "previous.manifest"), manifests.Known())
    with open(tree / "changed", "r+b") as handle:  # in place: the inode stays
        os.pwrite(handle.fileno(), b"B", 100)
    known = manifests.reusable(str(btrfs_dir / "previous.manifest"))
    for written in (None, frozenset({b"changed"})):
        recorded = manifests.record(str(tree), str(btrfs_dir / "new.manifest"), known, previous=str(previous), written=written)
        assert (recorded.hashed_files, recorded.reused_files) == (1, 1)
        entries = {e.path: e.digest for e in manifests.load(str(btrfs_dir / "new.manifest")).entries}
        assert entries[b"changed"] == hashlib.sha256((tree / "changed").read_bytes()).hexdigest()


DUMP = r"""snapshot        ./new.in-progress                uuid=4d transid=51 parent_uuid=9f parent_transid=50
rename          ./new.in-progress/dir                        dest=./new.in-progress/dir2
update_extent   ./new.in-progress/dir2/a                     offset=0 len=10
chmod           ./new.in-progress/b                          mode=600
mkdir           ./new.in-progress/o260-51-0
mkfile          ./new.in-progress/o261-51-0
update_extent   ./new.in-progress/o261-51-0                  offset=0 len=2
rename          ./new.in-progress/o261-51-0                  dest=./new.in-progress/o260-51-0/we\ ird\377
rename          ./new.in-progress/o260-51-0                  dest=./new.in-progress/newdir
unlink          ./new.in-progress/gone
utimes          ./new.in-progress/                           atime=2026-12-05T08:54:23+0000 mtime=2026-12-05T08:54:23+0000"""


def test_what_an_incremental_stream_changed_is_read_from_its_dump() -> None:
    from agent.engine.send import written_from_dump

    found = written_from_dump(DUMP.splitlines(), "new.in-progress")
    assert found is not None
    assert {b"dir2/a", b"b", b"newdir/we ird\xff"} <= found and b"gone" not in found
    assert not any(p.startswith(b"o26") for p in found)  # temporary names followed to their final ones
    assert written_from_dump([r"update_extent ./new.in-progress/odd\q  offset=0 len=1"], "new.in-progress") is None
    # Control characters as btrfs-progs prints them, C's escapes and octal.
    assert written_from_dump([r"write ./new.in-progress/a\nb\tc\\d\ e\001f\377 offset=0 len=1"], "new.in-progress") == {
        b"a\nb\tc\\d e\001f\377"
    }


def test_send_lists_what_it_changed(btrfs_dir: Path, tmp_path: Path, rsync_path: str) -> None:
    from agent.core.commands import Runner
    from agent.engine import layouts
    from agent.engine import send as sending

    source, repo = btrfs_dir / "src", btrfs_dir / "repo"
    subprocess.run(["btrfs", "subvolume", "create", str(source)], check=True, capture_output=True)
    (source / "a").write_text("one\n")
    (source / "same").write_text("same\n")
    config = tmp_path / "send.toml"
    config.write_text('[backup]\nionice = "none"\nnice = 0\nmethod = "send"\n')
    backup(source, repo, config)
    (source / "a").write_text("two\n")
    repository = Repository.open(str(repo))
    layout = layouts.for_repository(str(repo), repository, runner=Runner(), rm_argv=("/bin/rm",), warn=print)
    assert isinstance(layout, btrfs.BtrfsLayout)
    sent = sending.send(repository, layout, str(source), "2030-01-01T00-00-00+0000", runner=Runner(), btrfs="btrfs", warn=print)
    assert sent.parent is not None and sent.written is not None
    assert b"a" in sent.written and b"same" not in sent.written
