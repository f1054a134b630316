"""versions and diff (agent/engine/history.py) agree with a brute-force comparison on random histories.

Each history is a few snapshots of random changes, made with the real backup
cycle (``backup --no-sudo``, real rsync). The brute force looks at every
entry of every snapshot in full (lstat, content, link target) and knows
nothing of inodes; ``versions`` and ``diff`` must find exactly what it
finds. Every change sets a new modification time, as an editor does: rsync
itself only notices a change of content by size and time.
"""

from __future__ import annotations

import errno
import hashlib
import os
import posixpath
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.engine import history
from agent.cli import main
from agent.core.errors import RepositoryError, UsageError
from agent.repository.store import Repository

pytestmark = pytest.mark.integration

FAST = '[backup]\nionice = "none"\nnice = 0\n[rotation]\nhourly = "always"\n'
FILES = ["a", "d0/a", "d0/d1/b", "x"]
DIRS = ["d0", "d0/d1", "x"]  # "x" is a file or a directory in turn

operation = st.one_of(
    st.tuples(st.just("write"), st.sampled_from(FILES), st.integers(0, 3), st.integers(0, 2)),
    st.tuples(st.just("touch"), st.sampled_from(FILES)),
    st.tuples(st.just("chmod"), st.sampled_from(FILES), st.sampled_from([0o600, 0o644, 0o755])),
    st.tuples(st.just("delete"), st.sampled_from(FILES + DIRS)),
    st.tuples(st.just("symlink"), st.sampled_from(FILES), st.sampled_from(["a", "/nowhere", "d0"])),
    st.tuples(st.just("mkdir"), st.sampled_from(DIRS)),
    st.tuples(st.just("chmod-dir"), st.sampled_from(DIRS), st.sampled_from([0o700, 0o750, 0o755])),
)
if os.geteuid() == 0:
    operation = operation | st.tuples(st.just("chown"), st.sampled_from(FILES + DIRS), st.sampled_from([0, 4321]))
steps = st.lists(st.lists(operation, min_size=1, max_size=4), min_size=1, max_size=3)


class Source:
    """The source tree and the changes applied to it, each with a new mtime."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.clock = 1_600_000_000
        root.mkdir()
        for path in FILES[:3]:
            self.apply(("write", path, 1, 0))

    def _tick(self, path: Path) -> None:
        self.clock += 10
        os.utime(path, (self.clock, self.clock), follow_symlinks=False)

    def _clear(self, path: Path) -> None:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif os.path.lexists(path):
            path.unlink()

    def _parent(self, path: Path) -> None:
        for parent in reversed(path.relative_to(self.root).parents):
            here = self.root / parent
            if os.path.lexists(here) and not here.is_dir():
                here.unlink()
        path.parent.mkdir(parents=True, exist_ok=True)

    def apply(self, op: tuple[Any, ...]) -> None:
        kind, rel = op[0], op[1]
        path = self.root / rel
        if kind == "write":
            self._parent(path)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.is_symlink():
                path.unlink()
            path.write_bytes(bytes([op[3]]) * (op[2] * 7))
            self._tick(path)
        elif kind == "touch" and os.path.lexists(path) and not path.is_dir():
            self._tick(path)
        elif kind == "chmod" and path.is_file() and not path.is_symlink():
            os.chmod(path, op[2])
        elif kind == "delete":
            self._clear(path)
        elif kind == "symlink":
            self._parent(path)
            self._clear(path)
            os.symlink(op[2], path)
            self._tick(path)
        elif kind == "mkdir":
            self._parent(path)
            if os.path.lexists(path) and not path.is_dir():
                path.unlink()
            path.mkdir(exist_ok=True)
        elif kind == "chmod-dir" and path.is_dir() and not path.is_symlink():
            os.chmod(path, op[2])
        elif kind == "chown" and os.path.lexists(path):
            os.lchown(path, op[2], op[2])


# -- the brute force -----------------------------------------------------------------


def describe(path: str) -> tuple[Any, ...]:
    """Everything about one entry but its inode; a directory by its own mode and owner only."""
    info = os.lstat(path)
    own = (stat.S_IFMT(info.st_mode), stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid)
    if stat.S_ISDIR(info.st_mode):
        return own
    if stat.S_ISLNK(info.st_mode):
        body: Any = os.readlink(path)
    else:
        with open(path, "rb") as handle:
            body = hashlib.sha256(handle.read()).hexdigest()
    return (*own, info.st_size, info.st_mtime_ns, body)


def everything(root: str) -> dict[str, tuple[Any, ...]]:
    found = {"": describe(root)}
    for directory, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(directory, name)
            found[os.path.relpath(path, root)] = describe(path)
    return found


def brute_diff(a: str, b: str) -> set[tuple[str, str, str | None]]:
    old, new = everything(a), everything(b)
    old.pop(""), new.pop("")
    out: set[tuple[str, str, str | None]] = set()
    for path in old.keys() - new.keys():
        out.add((path, "removed", None))
    for path in new.keys() - old.keys():
        out.add((path, "added", None))
    for path in old.keys() & new.keys():
        before, after = old[path], new[path]
        if before == after:
            continue
        if before[0] != after[0]:
            what = "type"
        elif stat.S_ISDIR(before[0]):
            what = "metadata"
        else:
            what = "content" if (before[4], before[6]) != (after[4], after[6]) else "metadata"
        out.add((path, "changed", what))
    return out


def brute_versions(roots: list[tuple[str, str]], rel: str) -> list[tuple[str, str]]:
    """(first, last) of each run of consecutive snapshots where the entry is the same in every respect."""
    runs: list[tuple[str, str]] = []
    previous: Any = None
    for name, root in roots:
        path = os.path.join(root, rel) if rel else root
        if history.lstat_in(root, rel) is None:
            previous = None
            continue
        here: Any = describe(path)
        if stat.S_ISDIR(os.lstat(path).st_mode):
            with os.scandir(path) as entries:
                members = sorted(
                    (e.name, "dir" if e.is_dir(follow_symlinks=False) else describe(e.path)) for e in entries
                )
            here = (here, tuple(members))
        if runs and here == previous:
            runs[-1] = (runs[-1][0], name)
        else:
            runs.append((name, name))
        previous = here
    return runs


# -- the histories -----------------------------------------------------------------


def make_history(workdir: Path, plan: list[list[tuple[Any, ...]]]) -> tuple[Repository, Source]:
    config = workdir / "config.toml"
    config.write_text(FAST)
    source = Source(workdir / "src")
    repo = workdir / "repo"
    for ops in [[], *plan]:
        for op in ops:
            source.apply(op)
        assert main(["backup", "--no-sudo", "-q", "-b", "-s", "--config", str(config), str(source.root), str(repo)]) == 0
    return Repository.open(str(repo)), source


@pytest.fixture
def workdir(rsync_path: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="history-") as name:
        yield Path(name)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=steps)
def test_versions_and_diff_agree_with_brute_force(workdir: Path, plan: list[list[tuple[Any, ...]]]) -> None:
    with tempfile.TemporaryDirectory(dir=workdir) as name:
        repo, source = make_history(Path(name), plan)
        snaps = history.snapshots(repo)
        assert len(snaps) == len(plan) + 1
        roots = [(s.name, s.path) for s in snaps]
        for rel in ["", *FILES, *DIRS]:
            path = posixpath.join(str(source.root), rel) if rel else str(source.root)
            found = [(v.first, v.last) for v in history.versions(snaps, path)]
            assert found == brute_versions(roots, rel), rel
        for i, older in enumerate(snaps):
            for newer in snaps[i + 1 :]:
                got = {(c.path, c.change, c.what) for c in history.diff(older.path, newer.path)}
                assert got == brute_diff(older.path, newer.path), (older.name, newer.name)


def test_a_backup_of_the_root_and_of_a_directory_hold_a_path_in_different_places(tmp_path: Path) -> None:
    assert history.within("/", "/home/me/x") == "home/me/x"
    assert history.within("/home", "/home/me/x") == "me/x"
    assert history.within("/home/", "/home") == ""
    assert history.within("/home", "/homework/x") is None
    assert history.within("/srv", "/home/me/x") is None


def test_live_path_resolves_the_directories_above_but_not_the_name(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "via").symlink_to(tmp_path / "real")
    (tmp_path / "real" / "link").symlink_to("/etc")
    assert history.live_path("via/link", str(tmp_path)) == str(tmp_path / "real" / "link")
    assert history.live_path("../x", str(tmp_path / "real")) == str(tmp_path / "x")
    assert history.live_path("/", "/tmp") == "/"


def test_lstat_in_follows_no_link_inside_the_snapshot(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "file").write_text("x")
    (tmp_path / "out").symlink_to(tmp_path / "dir")
    assert history.lstat_in(str(tmp_path), "dir/file") is not None
    assert history.lstat_in(str(tmp_path), "out/file") is None  # through a link: not held
    assert history.lstat_in(str(tmp_path), "out") is not None  # the link itself is
    assert history.lstat_in(str(tmp_path), "dir/file/deeper") is None
    assert history.lstat_in(str(tmp_path), "missing") is None


def test_unknown_paths_name_the_nearest_parent(workdir: Path) -> None:
    repo, source = make_history(workdir, [])
    snaps = history.snapshots(repo)
    root = str(source.root)
    with pytest.raises(UsageError) as caught:
        raise history.not_held(snaps, f"{root}/d0/d1/nothing/here")
    assert caught.value.message == (
        f"no snapshot holds {root}/d0/d1/nothing/here; the nearest parent that one does is {root}/d0/d1 "
        f"(newest in {snaps[-1].name}): see what it held with backup-agent versions {root}/d0/d1"
    )
    outside = history.not_held(snaps, "/somewhere/else")
    assert outside.message == f"/somewhere/else is outside what was backed up ({root}): give a path below it"
    assert history.not_held([], "/x").message == "/x: the repository holds no snapshot yet"


def test_pick_pair(workdir: Path) -> None:
    repo, _source = make_history(workdir, [[("touch", "a")], [("touch", "a")]])
    snaps = history.snapshots(repo)
    assert history.pick_pair(snaps, None, None) == (snaps[1], snaps[2])
    assert history.pick_pair(snaps, snaps[0].name, None) == (snaps[0], snaps[2])
    assert history.pick_pair(snaps, snaps[2].name, snaps[0].name) == (snaps[2], snaps[0])
    with pytest.raises(UsageError, match="no snapshot is named nope: `backup-agent list` shows them"):
        history.pick_pair(snaps, "nope", None)
    with pytest.raises(UsageError, match="is the newest snapshot"):
        history.pick_pair(snaps, snaps[2].name, None)
    with pytest.raises(UsageError, match="diff needs two snapshots; the repository holds 1"):
        history.pick_pair(snaps[:1], None, None)


@pytest.fixture
def no_xattr_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory whose filesystem says xattrs are "not supported": an empty mount point of a private
    sysfs mount (tmpfs, ext2/4, ramfs, bpf and tracefs here list xattrs, even when there are none, and
    vfat is not in this kernel)."""
    if os.geteuid() != 0:
        pytest.skip(reason="needs root to mount a filesystem: run the suite as root")
    point = tmp_path / "sys"
    point.mkdir()
    subprocess.run(["mount", "-t", "sysfs", "sysfs", str(point)], check=True)
    try:
        found = [point / p for p in ("kernel/debug", "kernel/tracing", "fs/bpf", "fs/pstore") if (point / p).is_dir()]
        if not found:
            pytest.skip(reason="this kernel's sysfs has none of the empty mount points that say xattrs are unsupported")
        yield found[0]
    finally:
        subprocess.run(["umount", str(point)], check=True)


def test_xattrs_are_none_only_where_the_filesystem_has_none(no_xattr_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(OSError) as unsupported:
        os.listxattr(no_xattr_dir)
    assert unsupported.value.errno == errno.EOPNOTSUPP  # what the filter is for, for real
    assert history._xattrs(str(no_xattr_dir)) == {}
    plain = tmp_path / "plain"
    plain.write_text("x")
    os.setxattr(plain, "user.comment", b"kept")
    assert history._xattrs(str(plain)) == {"user.comment": b"kept"}
    # Any other failure is one line naming the entry, not "no xattrs" (here: it vanished).
    with pytest.raises(RepositoryError, match=rf"^cannot read the extended attributes of {tmp_path}/gone: No such file or directory$"):
        history._xattrs(str(tmp_path / "gone"))
