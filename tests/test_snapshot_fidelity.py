"""A snapshot equals its source, and nothing ever changes a completed snapshot.

Real rsync, real files, in both layouts: hard links (a repository in tmp_path)
and btrfs subvolumes (a repository on a real btrfs on a loop device, where
rsync updates a writable clone in place). The history test also runs against the classic design
(rsync into one mirror, then ``cp --archive --link``), where it must fail:
that is the reason snapshots are made with ``rsync --link-dest``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Callable

import pytest

from agent.cli import main
from tests.conftest import requires_root
from tests.treeutil import describe, inodes

pytestmark = pytest.mark.integration

FAST = "[backup]\nionice = \"none\"\nnice = 0\n[rotation]\nhourly = \"always\"\n"


def build_source(root: Path) -> None:
    """A tree with every kind of thing a snapshot must preserve."""
    root.mkdir()
    (root / "plain.txt").write_text("plain\n")
    (root / "name with spaces").write_text("spaces\n")
    (root / "line\nbreak").write_text("newline in name\n")
    os.makedirs(os.fsencode(root) + b"/bytes-\xff\xfe-dir")
    with open(os.fsencode(root) + b"/bytes-\xff\xfe-dir/\xe9t\xe9-latin1", "wb") as handle:
        handle.write(b"not utf-8 name\n")
    (root / "empty-dir").mkdir()
    (root / "deep" / "er" / "est").mkdir(parents=True)
    (root / "deep" / "er" / "est" / "leaf").write_bytes(os.urandom(70_000))
    (root / "script.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(root / "script.sh", 0o750)
    (root / "secret").write_text("s\n")
    os.chmod(root / "secret", 0o600)
    os.symlink("plain.txt", root / "link-to-plain")
    os.symlink("/nonexistent/target", root / "dangling-link")
    (root / "hard-a").write_text("shared inode\n")
    os.link(root / "hard-a", root / "deep" / "hard-b")
    (root / "with-xattr").write_text("x\n")
    os.setxattr(root / "with-xattr", "user.comment", b"kept")
    (root / "with-acl").write_text("acl\n")
    subprocess.run(["setfacl", "-m", "u:4321:r", str(root / "with-acl")], check=True)
    os.utime(root / "plain.txt", ns=(1_500_000_000_000_000_000, 1_500_000_000_123_456_789))
    for link in ("link-to-plain", "dangling-link"):
        os.utime(root / link, (1_400_000_000, 1_400_000_000), follow_symlinks=False)


def backup(source: Path, repo: Path, config: Path) -> str:
    status = main(["backup", "--no-sudo", "-q", "--config", str(config), str(source), str(repo)])
    assert status == 0
    return os.readlink(repo / "latest").split("/")[-1]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(FAST)
    return path


@pytest.fixture
def source(tmp_path: Path) -> Path:
    if shutil.which("setfacl") is None:
        pytest.skip(reason="setfacl is missing: run scripts/test, which installs the acl package")
    root = tmp_path / "source"
    build_source(root)
    return root


LAYOUTS = ["links", "btrfs"]


def repository_in(layout: str, tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    """Where the repository goes: tmp_path (hard links), or a real btrfs on a loop device (the layout is detected)."""
    return (Path(request.getfixturevalue("btrfs_dir")) if layout == "btrfs" else tmp_path) / "repo"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_snapshot_equals_source(
    layout: str, source: Path, tmp_path: Path, config: Path, rsync_path: str, request: pytest.FixtureRequest
) -> None:
    repo = repository_in(layout, tmp_path, request)
    name = backup(source, repo, config)
    expected = describe(source)
    assert describe(repo / "snapshots" / name) == expected
    # the checks above are only meaningful if the odd cases are really there
    kinds = {key for entry in expected.values() for key in entry}
    assert {"target", "link_group", "sha256"} <= kinds
    assert any(b"system.posix_acl_access" in e["xattrs"] or "system.posix_acl_access" in e["xattrs"] for e in expected.values())


@requires_root
@pytest.mark.parametrize("layout", LAYOUTS)
def test_owners_are_kept_numerically(
    layout: str, source: Path, tmp_path: Path, config: Path, rsync_path: str, request: pytest.FixtureRequest
) -> None:
    os.chown(source / "plain.txt", 4242, 4343)
    os.lchown(source / "link-to-plain", 4444, 4545)
    os.chown(source / "empty-dir", 4646, 4747)
    repo = repository_in(layout, tmp_path, request)
    name = backup(source, repo, config)
    snap = repo / "snapshots" / name
    assert (os.lstat(snap / "plain.txt").st_uid, os.lstat(snap / "plain.txt").st_gid) == (4242, 4343)
    assert (os.lstat(snap / "link-to-plain").st_uid, os.lstat(snap / "link-to-plain").st_gid) == (4444, 4545)
    assert describe(snap) == describe(source)


def test_unchanged_files_share_one_inode(source: Path, tmp_path: Path, config: Path, rsync_path: str) -> None:
    repo = tmp_path / "repo"
    first = backup(source, repo, config)
    (source / "plain.txt").write_text("changed\n")
    second = backup(source, repo, config)
    assert first != second
    one, two = inodes(repo / "snapshots" / first), inodes(repo / "snapshots" / second)
    assert one.keys() == two.keys()
    changed = {path for path in one if one[path] != two[path]}
    assert changed == {b"plain.txt"}


# -- history: a change in the source never reaches an older snapshot ------------

def chown_file(path: Path) -> None:
    os.chown(path, 4001, 4002)


CHANGES: dict[str, Callable[[Path], None]] = {
    "content": lambda s: (s / "plain.txt").write_text("new content\n"),
    "mode": lambda s: os.chmod(s / "plain.txt", 0o600),
    "xattr": lambda s: os.setxattr(s / "with-xattr", "user.comment", b"rewritten"),
    "acl": lambda s: subprocess.run(["setfacl", "-m", "u:4321:rw", str(s / "with-acl")], check=True),
    "mtime": lambda s: os.utime(s / "plain.txt", ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000)),
    "delete": lambda s: os.unlink(s / "plain.txt"),
    "hard-link broken": lambda s: (os.unlink(s / "deep" / "hard-b"), (s / "deep" / "hard-b").write_text("split\n")),
}
if os.geteuid() == 0:
    CHANGES["owner"] = lambda s: chown_file(s / "plain.txt")


def snapshot_with_backup_agent(source: Path, repo: Path, config: Path) -> Path:
    return repo / "snapshots" / backup(source, repo, config)


def snapshot_classic(source: Path, repo: Path, config: Path) -> Path:
    """rsync-system-backup / rsnapshot sync_first: one mirror, then cp -al of it."""
    mirror = repo / "current"
    subprocess.run(["rsync", "-aHAX", "--numeric-ids", "--delete", f"{source}/", f"{mirror}/"], check=True)
    count = len(list(repo.glob("snap*")))
    snap = repo / f"snap{count}"
    subprocess.run(["cp", "--archive", "--link", str(mirror), str(snap)], check=True)
    return snap


DESIGNS = {
    "rsync --link-dest": snapshot_with_backup_agent,
    "btrfs subvolumes": snapshot_with_backup_agent,  # the same command; the repository is on btrfs
    "classic mirror + cp -al": snapshot_classic,
}


# rsync writes new content (and a new mtime) to a new inode, so the classic
# design keeps those; only changes rsync applies in place leak into history.
IN_PLACE = [change for change in ("mode", "owner", "xattr", "acl") if change in CHANGES]
CASES = [pytest.param("rsync --link-dest", change, id=f"link-dest-{change}") for change in sorted(CHANGES)] + [
    pytest.param("btrfs subvolumes", change, id=f"btrfs-{change}") for change in sorted(CHANGES)
] + [
    pytest.param(
        "classic mirror + cp -al",
        change,
        id=f"classic-{change}",
        marks=pytest.mark.xfail(strict=True, reason="the classic design rewrites older snapshots in place"),
    )
    for change in IN_PLACE
]


@pytest.mark.parametrize(("design", "change"), CASES)
def test_older_snapshot_is_never_rewritten(
    design: str, change: str, source: Path, tmp_path: Path, config: Path, rsync_path: str, request: pytest.FixtureRequest
) -> None:
    repo = repository_in("btrfs" if design == "btrfs subvolumes" else "links", tmp_path, request)
    repo.mkdir()
    make = DESIGNS[design]
    first = make(source, repo, config)
    before = describe(first)
    CHANGES[change](source)
    second = make(source, repo, config)
    assert describe(second) == describe(source), "the new snapshot must show the change"
    assert describe(first) == before, f"{change} in the source changed the older snapshot"
