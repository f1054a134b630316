"""The destination layout seam (agent.engine.layouts): begin, end a transfer, complete, delete, on a real repository.

The links layout is driven step by step as the cycle drives it, with files
written where rsync would write them, real hard links from folding, and the
real rm deleting through .trash. What each step leaves on the disk is checked.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest

from agent.core.commands import Runner
from agent.core.errors import StepError
from agent.engine.layouts import Begun, Layout, LinksLayout, for_repository
from agent.repository.store import Repository

UTC = dt.timezone.utc


def at(hour: int, minute: int = 0) -> dt.datetime:
    return dt.datetime(2026, 12, 5, hour, minute, tzinfo=UTC)


def layout_of(repo: Repository, warnings: list[str] | None = None) -> Layout:
    sink = warnings if warnings is not None else []
    return for_repository(repo.root, repo, runner=Runner(), rm_argv=("/bin/rm",), warn=sink.append)


def listing(repo: Repository) -> list[str]:
    return sorted(os.listdir(repo.snapshots_dir))


def write(directory: str, name: str, text: str) -> None:
    Path(directory, name).write_text(text)


def test_begin_complete_and_delete_on_a_real_repository(tmp_path: Path) -> None:
    repo = Repository.create(str(tmp_path / "repo"))
    layout = layout_of(repo)
    assert isinstance(layout, LinksLayout)

    first = layout.begin(at(10), dry_run=False)
    assert first == Begun("2026-12-05T10-00-00+0000", repo.in_progress_path(first.name), (), None, ())
    assert first.copies_all and os.path.isdir(first.target)
    assert layout.transfer_path(first.name) == first.target
    write(first.target, "a", "one")
    layout.end_transfer(first, whole=True)
    assert layout.complete(first.name) == ()
    assert listing(repo) == [first.name]
    assert os.readlink(os.path.join(repo.root, "latest")) == f"snapshots/{first.name}"

    second = layout.begin(at(11), dry_run=False)
    assert second.previous == first.name and not second.copies_all
    assert second.link_dests == (repo.snapshot_path(first.name),)
    assert listing(repo) == [first.name, second.name + ".in-progress"]
    os.link(Path(first.target.removesuffix(".in-progress"), "a"), Path(second.target, "a"))  # what --link-dest does
    layout.complete(second.name)
    assert repo.latest_name() == second.name

    repo.write_metadata(first.name, {"state": "complete"})
    layout.delete([first.name], step="rotate")
    assert listing(repo) == [second.name]
    assert not os.path.exists(repo.metadata_path(first.name))
    # Out of the listing at once; its files go when the trash is emptied.
    (moved,) = os.listdir(repo.trash_dir)
    assert moved.startswith(first.name + ".")
    assert layout.empty_trash(step="empty-trash") == (moved,)
    assert os.listdir(repo.trash_dir) == []
    # The file both shared lives on in the snapshot kept.
    assert Path(repo.snapshot_path(second.name), "a").read_text() == "one"


def test_an_interrupted_transfer_is_resumed_from_and_then_deleted(tmp_path: Path) -> None:
    repo = Repository.create(str(tmp_path / "repo"))
    layout = layout_of(repo)
    stopped = layout.begin(at(10), dry_run=False)
    write(stopped.target, "copied", "before the stop")
    layout.end_transfer(stopped, whole=False)  # nothing it resumed from: it stays as it is
    assert listing(repo) == [stopped.name + ".in-progress"]

    again = layout.begin(at(11), dry_run=False)
    assert again.resumed_from == (stopped.name,) and again.previous is None
    assert again.link_dests == (repo.in_progress_path(stopped.name),)
    assert not again.copies_all
    layout.end_transfer(again, whole=True)
    assert listing(repo) == [again.name + ".in-progress"]


def test_a_transfer_stopped_again_absorbs_the_one_it_resumed_from(tmp_path: Path) -> None:
    repo = Repository.create(str(tmp_path / "repo"))
    layout = layout_of(repo)
    stopped = layout.begin(at(10), dry_run=False)
    write(stopped.target, "old", "from the first try")
    layout.end_transfer(stopped, whole=False)
    again = layout.begin(at(11), dry_run=False)
    write(again.target, "new", "from the second try")
    inode = os.stat(Path(stopped.target, "old")).st_ino
    layout.end_transfer(again, whole=False)
    # One unfinished transfer is left, holding what both copied (hard links, nothing copied twice).
    assert listing(repo) == [again.name + ".in-progress"]
    assert sorted(os.listdir(again.target)) == ["new", "old"]
    assert os.stat(Path(again.target, "old")).st_ino == inode


def test_completing_deletes_the_other_unfinished_transfers(tmp_path: Path) -> None:
    repo = Repository.create(str(tmp_path / "repo"))
    layout = layout_of(repo)
    stopped = layout.begin(at(10), dry_run=False)
    done = layout.begin(at(11), dry_run=False)
    assert done.resumed_from == (stopped.name,)
    with pytest.raises(StepError, match="no finished transfer to complete"):
        layout.finished_transfer()
    repo.write_metadata(done.name, {"state": "transferred"})
    assert layout.finished_transfer() == done.name
    assert layout.complete(done.name) == (stopped.name + ".in-progress",)
    assert listing(repo) == [done.name]


def test_a_dry_run_begins_nothing(tmp_path: Path) -> None:
    repo = Repository.create(str(tmp_path / "repo"))
    layout = layout_of(repo)
    first = layout.begin(at(10), dry_run=False)
    layout.complete(first.name)
    before = listing(repo)
    preview = layout.begin(at(11), dry_run=True)
    # rsync -n compares with the latest snapshot itself.
    assert preview.target == repo.snapshot_path(first.name) and preview.link_dests == ()
    assert preview.previous == first.name
    assert listing(repo) == before

    missing = tmp_path / "not-yet"
    nothing = for_repository(str(missing), None, runner=Runner(), rm_argv=("/bin/rm",), warn=print)
    planned = nothing.begin(at(12), dry_run=True)
    assert planned.target == str(missing / "snapshots" / (planned.name + ".in-progress"))
    assert planned.copies_all and not missing.exists()


def test_empty_trash_finishes_an_interrupted_deletion(tmp_path: Path) -> None:
    repo = Repository.create(str(tmp_path / "repo"))
    layout = layout_of(repo)
    half = Path(repo.trash_dir, "2026-12-01T10-00-00+0000.0123456789ab")
    (half / "deep").mkdir(parents=True)
    (half / "deep" / "file").write_text("left by a killed rm")
    layout.empty_trash(step="rotate")
    assert os.listdir(repo.trash_dir) == []
