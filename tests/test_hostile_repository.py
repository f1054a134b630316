"""A repository is data on a removable disk: whatever it holds, no command
follows a link out of it, reads without bound, or crashes on it.

Each case is a repository made hostile by hand (links where directories
belong, a link with a snapshot's name, metadata nested 100,000 deep,
leftovers of killed writes), then the real commands run on it in-process.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import pytest

from agent.core import lock
from agent.repository import manifest as manifests
from agent.cli import main
from agent.core.commands import Runner
from agent.core.errors import EXIT_OK, EXIT_REPOSITORY, RepositoryError
from agent.repository.store import Repository, classify
from agent.policy.rotation import format_snapshot_name

pytestmark = pytest.mark.usefixtures("rsync_path")


def names(count: int) -> list[str]:
    start = dt.datetime(2026, 11, 22, 10, 0, 0).astimezone()
    return [format_snapshot_name(start + dt.timedelta(hours=hour)) for hour in range(count)]


def make_repository(root: Path, count: int = 3) -> Repository:
    repo = Repository.create(str(root))
    for name in names(count):
        os.mkdir(repo.snapshot_path(name))
        (Path(repo.snapshot_path(name)) / "file").write_text(name)
    repo.set_latest(names(count)[-1])
    return repo


def precious(tmp_path: Path) -> Path:
    """A directory outside the repository that nothing may touch."""
    outside = tmp_path / "outside"
    outside.mkdir()
    for index in range(3):
        (outside / f"keep-{index}").write_text("mine")
    (outside / "sub").mkdir()
    (outside / "sub" / "deep").write_text("mine too")
    return outside


def contents(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*"))


def config(tmp_path: Path) -> str:
    path = tmp_path / "config.toml"
    path.write_text('[backup]\nionice = "none"\nnice = 0\n')
    return str(path)


def source(tmp_path: Path) -> str:
    src = tmp_path / "source"
    src.mkdir()
    (src / "a").write_text("a")
    return str(src)


# -- point 1: a link at .trash, snapshots/ or metadata/ ----------------------------------


def test_rotate_refuses_a_linked_trash_and_leaves_its_target(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = make_repository(tmp_path / "repo")
    outside = precious(tmp_path)
    before = contents(outside)
    os.symlink(outside, repo.trash_dir)
    code = main(["rotate", "--hourly", "1", repo.root])
    assert code == EXIT_REPOSITORY
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert ".trash is a symbolic link" in error and str(outside) in error
    assert contents(outside) == before
    assert sorted(os.listdir(repo.snapshots_dir)) == names(3)


def test_backup_refuses_a_linked_trash_and_leaves_its_target(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = make_repository(tmp_path / "repo")
    outside = precious(tmp_path)
    before = contents(outside)
    os.symlink(outside, repo.trash_dir)
    code = main(["backup", "--no-sudo", "-q", "--config", config(tmp_path), source(tmp_path), repo.root])
    assert code == EXIT_REPOSITORY
    assert ".trash is a symbolic link" in capsys.readouterr().err
    assert contents(outside) == before
    assert sorted(os.listdir(repo.snapshots_dir)) == names(3)


@pytest.mark.parametrize("sub", ["snapshots", "metadata"])
def test_a_linked_snapshots_or_metadata_directory_is_refused(tmp_path: Path, sub: str, capsys: pytest.CaptureFixture[str]) -> None:
    repo = make_repository(tmp_path / "repo")
    real = tmp_path / "elsewhere"
    os.rename(os.path.join(repo.root, sub), real)
    os.symlink(real, os.path.join(repo.root, sub))
    before = contents(real)
    for argv in (["list", repo.root], ["rotate", "--hourly", "1", repo.root]):
        assert main(argv) == EXIT_REPOSITORY
        assert f"{sub} is a symbolic link" in capsys.readouterr().err
    assert contents(real) == before


def test_a_link_put_at_trash_after_opening_is_not_followed(tmp_path: Path) -> None:
    """The race check and use leave: the repository opened clean, then .trash became a link."""
    repo = make_repository(tmp_path / "repo")
    outside = precious(tmp_path)
    before = contents(outside)
    opened = Repository.open(repo.root)
    os.symlink(outside, repo.trash_dir)
    with pytest.raises(RepositoryError, match="symbolic link"):
        opened.discard([names(3)[0]], step="rotate")
    with pytest.raises(RepositoryError, match="symbolic link"):
        opened.empty_trash(Runner(), ("rm",), step="rotate")
    assert contents(outside) == before
    assert sorted(os.listdir(repo.snapshots_dir)) == names(3)


def test_trash_is_emptied_through_its_descriptor(tmp_path: Path) -> None:
    repo = make_repository(tmp_path / "repo")
    repo.discard([names(3)[0]], step="rotate")
    assert repo.snapshot_names() == names(3)[1:]
    moved = repo.trash_names()
    assert len(moved) == 1 and moved[0].startswith(names(3)[0] + ".")
    assert repo.empty_trash(Runner(), ("rm",), step="rotate") == moved
    assert os.listdir(repo.trash_dir) == []


# -- point 2: a link with a snapshot's name -------------------------------------------------


def test_a_link_named_like_a_snapshot_is_no_snapshot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = make_repository(tmp_path / "repo", count=2)
    outside = precious(tmp_path)
    before = contents(outside)
    fake = names(4)[-1]  # newer than every real one
    os.symlink(outside, repo.snapshot_path(fake))
    os.symlink(f"../outside/{fake}", repo.snapshot_path(names(3)[-1] + ".in-progress"))
    assert repo.snapshot_names() == names(2)
    assert repo.in_progress_names() == []
    assert fake in repo.foreign_names()
    repo.set_latest(fake)  # latest pointing at the link is not believed either
    assert repo.latest_name() == names(2)[-1]

    assert main(["list", "--json", repo.root]) == EXIT_OK
    listed = [row["name"] for row in json.loads(capsys.readouterr().out)]
    assert listed == names(2)
    assert main(["diff", "--repository", repo.root, names(2)[0], fake]) != EXIT_OK
    shown = capsys.readouterr()
    assert "keep-0" not in shown.out + shown.err
    assert main(["rotate", "--hourly", "1", repo.root]) == EXIT_OK
    assert f"snapshots/{fake} is not a directory" in capsys.readouterr().err
    assert os.path.islink(repo.snapshot_path(fake))
    assert contents(outside) == before
    assert repo.snapshot_names() == names(2)[-1:]


def test_a_marker_that_is_a_link_makes_no_repository(tmp_path: Path) -> None:
    repo = make_repository(tmp_path / "repo")
    os.rename(os.path.join(repo.root, ".backup-agent.toml"), tmp_path / "marker")
    os.symlink(tmp_path / "marker", os.path.join(repo.root, ".backup-agent.toml"))
    assert classify(repo.root) == "foreign"


# -- point 3: metadata nested too deep, or too big --------------------------------------------


def test_deeply_nested_metadata_is_a_warning_not_a_crash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    repo = make_repository(tmp_path / "repo", count=2)
    bad = names(2)[-1]
    Path(repo.metadata_path(bad)).write_text("[" * 100_000 + "]" * 100_000)
    assert repo.read_metadata(bad) is None
    assert "nested too deeply" in caplog.text
    assert main(["list", repo.root]) == EXIT_OK
    assert bad in capsys.readouterr().out
    assert main(["versions", "--repository", repo.root, "/file"]) == EXIT_OK
    assert main(["rotate", "--hourly", "5", repo.root]) == EXIT_OK
    code = main(["backup", "--no-sudo", "-q", "--config", config(tmp_path), source(tmp_path), repo.root])
    assert code == EXIT_OK
    assert repo.snapshot_names()[-1] > names(2)[-1]  # a new snapshot, rotation went by the others' names


def test_oversized_or_special_metadata_is_not_read(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    repo = make_repository(tmp_path / "repo", count=2)
    first, second = names(2)
    with open(repo.metadata_path(first), "wb") as handle:
        handle.truncate(64 * 1024 * 1024)  # sparse: costs nothing unless it is read
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text('{"state": "complete"}')
    os.symlink(elsewhere, repo.metadata_path(second))  # a link is not followed, even to good JSON
    assert repo.read_metadata(first) is None
    assert repo.read_metadata(second) is None
    assert "more than the" in caplog.text


# -- point 4: what killed writes left ------------------------------------------------------------


def test_backup_removes_temporary_files_of_killed_writes(tmp_path: Path) -> None:
    repo = make_repository(tmp_path / "repo", count=1)
    leftover = Path(repo.metadata_dir) / ".k2j4h5g.tmp"
    leftover.write_bytes(b"x" * 1024)
    latest_leftover = Path(repo.root) / "latest.new-424242"
    os.symlink("snapshots/nothing", latest_leftover)
    kept = Path(repo.metadata_dir) / ".not-ours"  # not a name write_atomic makes: left alone
    kept.write_text("")
    code = main(["backup", "--no-sudo", "-q", "--config", config(tmp_path), source(tmp_path), repo.root])
    assert code == EXIT_OK
    assert not leftover.exists() and not os.path.lexists(latest_leftover)
    assert kept.exists()


def test_a_latest_that_is_not_a_link_is_refused_by_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A directory at latest could not be replaced: the backup would fail after its rename. Said up front."""
    repo = make_repository(tmp_path / "repo", count=1)
    os.unlink(repo.latest_link)
    os.mkdir(repo.latest_link)
    code = main(["backup", "--no-sudo", "-q", "--config", config(tmp_path), source(tmp_path), repo.root])
    assert code == EXIT_REPOSITORY
    assert "latest is a directory, not the symbolic link" in capsys.readouterr().err
    assert os.listdir(repo.snapshots_dir) == names(1)


def test_a_lock_file_nested_too_deeply_says_nothing_about_its_holder(tmp_path: Path) -> None:
    """The lock file lives in the repository too: what it says is read bounded and never crashes."""
    repo = make_repository(tmp_path / "repo", count=1)
    Path(repo.lock_path).write_text("[" * 2000 + "]" * 2000)
    assert lock.read_holder(repo.lock_path) == {}


def test_a_manifest_that_is_a_link_is_not_read(tmp_path: Path) -> None:
    repo = make_repository(tmp_path / "repo", count=1)
    elsewhere = tmp_path / "elsewhere.manifest"
    elsewhere.write_bytes(manifests.render(b"", 0)[0])
    assert manifests.load(str(elsewhere)).entries == ()
    os.symlink(elsewhere, repo.manifest_path(names(1)[0]))
    with pytest.raises(OSError):
        manifests.load(repo.manifest_path(names(1)[0]))
