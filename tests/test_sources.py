"""The source seam (agent.engine.sources): what a backup reads, and what the metadata says of it.

A second Source, written here in a few lines, goes through real cycles with
real rsync: the cycle reads whatever tree a source gives, records the
source's own fields, links unchanged files to the previous snapshot, and the
source's teardown runs whether the transfer succeeds or fails. The
configured PathSource keeps today's behaviour: its refusals, and
CACHEDIR.TAG directories kept with their tag but without their contents.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

from agent.cli import main
from agent.core.commands import Runner
from agent.config.load import load_settings
from agent.config.model import DEFAULT_SYSTEM_EXCLUDES
from agent.engine.cycle import Cycle, Request
from agent.core.errors import CommandError, UsageError
from agent.core.events import CompleteEvent, Emitter, ErrorEvent, Event
from agent.repository.store import Repository
from agent.engine.rsync import CACHEDIR_SIGNATURE
from agent.engine.sources import PathSource, Source, Tree

FAST = '[backup]\nionice = "none"\nnice = 0\n[rotation]\nhourly = "always"\n'


@dataclass
class StagedSource:
    """A source that is not a live path: files written into a staging directory on open, removed on exit.

    It stands for the sources to come whose tree exists only during the
    transfer (a frozen snapshot, a command's output): ``path`` is what the
    snapshot stands for, ``root`` a directory that exists only while opened.
    """

    path: str
    files: dict[str, bytes]
    roots: list[str] = field(default_factory=list)

    def check(self, repository: str) -> None:
        if not self.files:
            raise UsageError("nothing staged", step="prepare")

    @contextlib.contextmanager
    def opened(self, repository: str) -> Iterator[Tree]:
        root = tempfile.mkdtemp(prefix="staged-")
        self.roots.append(root)
        try:
            for name, data in self.files.items():
                Path(root, name).write_bytes(data)
                # One time for every staging: a file the same in content and time is "unchanged" to rsync's quick
                # check, whichever second each cycle happened to run in.
                os.utime(Path(root, name), (1_700_000_000, 1_700_000_000))
            yield Tree(root=root, one_file_system=True, filter_rules=(), excludes=(), skipped_mounts=(),
                       record={"staged": sorted(self.files)})
        finally:
            shutil.rmtree(root)


def _settings(tmp_path: Path, rsync: str) -> Any:
    config = tmp_path / "config.toml"
    config.write_text(FAST + f'[commands]\nrsync = "{rsync}"\n')
    return load_settings(str(config))


def _cycle(settings: Any, repo: Path, source: Source, events: list[Event]) -> Cycle:
    request = Request(settings=settings, source=settings.source, repository=str(repo))
    emitter = Emitter()
    emitter.subscribe(events.append)
    return Cycle(request, emitter, Runner(), source=source)


def test_the_configured_source_is_a_path_source(tmp_path: Path, rsync_path: str) -> None:
    settings = _settings(tmp_path, rsync_path)
    source: Source = PathSource.from_settings(settings, settings.source)
    # The configured source is "/": it gets the system excludes.
    assert source == PathSource("/", excludes=DEFAULT_SYSTEM_EXCLUDES, one_file_system=True, skip_cachedir_tagged=True)
    elsewhere = dataclasses.replace(settings, source="/srv", exclude=("*.o",), one_file_system=False, skip_cachedir_tagged=False)
    assert PathSource.from_settings(elsewhere, "/srv") == PathSource("/srv", ("*.o",), False, False)


@pytest.mark.integration
def test_a_second_source_goes_through_real_cycles(tmp_path: Path, rsync_path: str) -> None:
    settings = _settings(tmp_path, rsync_path)
    repo = tmp_path / "repo"
    source = StagedSource("/var/lib/staged", {"kept": b"same in both\n", "changed": b"first\n"})
    events: list[Event] = []
    first = _cycle(settings, repo, source, events).run().snapshot
    source.files["changed"] = b"second\n"
    second = _cycle(settings, repo, source, events).run().snapshot
    assert first is not None and second is not None and first != second

    opened = Repository.open(str(repo))
    assert opened.snapshot_names() == [first, second]
    snap = Path(opened.snapshot_path(second))
    assert sorted(os.listdir(snap)) == ["changed", "kept"]
    assert (snap / "changed").read_bytes() == b"second\n"
    # The layout linked the unchanged file to the previous snapshot, whatever the source.
    assert (snap / "kept").stat().st_ino == (Path(opened.snapshot_path(first)) / "kept").stat().st_ino
    metadata = opened.read_metadata(second) or {}
    assert metadata["source"] == "/var/lib/staged"
    assert metadata["staged"] == ["changed", "kept"]
    assert "cachedir_tagged" not in metadata  # the path source's fields come from the path source only
    assert [e.snapshot for e in events if isinstance(e, CompleteEvent)] == [first, second]
    # Each staging directory existed during its transfer only.
    assert len(source.roots) == 2 and not any(os.path.exists(root) for root in source.roots)


@pytest.mark.integration
def test_a_failed_transfer_still_closes_the_source(tmp_path: Path) -> None:
    false = shutil.which("false")
    assert false is not None
    settings = _settings(tmp_path, false)  # "rsync" exits 1: the transfer fails
    repo = tmp_path / "repo"
    source = StagedSource("/var/lib/staged", {"a": b"a\n"})
    events: list[Event] = []
    with pytest.raises(CommandError):
        _cycle(settings, repo, source, events).run()
    assert len(source.roots) == 1 and not os.path.exists(source.roots[0])
    assert Repository.open(str(repo)).snapshot_names() == []
    assert isinstance(events[-1], ErrorEvent) and events[-1].step == "transfer"


def test_a_source_refusing_stops_the_cycle_before_anything_is_written(tmp_path: Path) -> None:
    settings = _settings(tmp_path, "/usr/bin/rsync")
    repo = tmp_path / "repo"
    events: list[Event] = []
    with pytest.raises(UsageError, match="nothing staged"):
        _cycle(settings, repo, StagedSource("/x", {}), events).run()
    assert not repo.exists()
    assert isinstance(events[-1], ErrorEvent) and events[-1].step == "prepare"


@pytest.mark.parametrize(
    "where, message",
    [
        ("missing", "is not a directory: give the directory to back up"),
        ("repository", "is a backup-agent repository: did you swap SOURCE and DESTINATION?"),
        ("inside", "lies inside the repository"),
    ],
)
def test_the_path_source_refuses_what_cannot_be_backed_up(tmp_path: Path, where: str, message: str) -> None:
    repo = Repository.create(str(tmp_path / "repo"))
    path = {
        "missing": str(tmp_path / "nothing"),
        "repository": repo.root,
        "inside": repo.snapshots_dir,
    }[where]
    destination = str(tmp_path / "elsewhere") if where == "repository" else repo.root
    with pytest.raises(UsageError, match=message):
        PathSource(path).check(destination)
    PathSource(str(tmp_path)).check(str(tmp_path.parent / "other-repo"))  # an ordinary directory passes


def test_the_path_source_tree_names_tagged_caches_and_the_repository_inside_it(tmp_path: Path) -> None:
    source = tmp_path / "src"
    (source / "cache").mkdir(parents=True)
    (source / "cache" / "CACHEDIR.TAG").write_bytes(CACHEDIR_SIGNATURE + b"\n")
    (source / "fake").mkdir()
    (source / "fake" / "CACHEDIR.TAG").write_bytes(b"not the signature\n")
    with PathSource(str(source), excludes=("*.tmp",), one_file_system=False).opened(str(source / "repo")) as tree:
        assert tree.root == str(source)
        assert tree.excludes == ("*.tmp",)
        assert tree.filter_rules == ("--include=/cache/CACHEDIR.TAG", "--exclude=/cache/*", "--exclude=/repo")
        assert tree.skipped_mounts == ()
        assert dict(tree.record) == {
            "excludes": ["*.tmp"],
            "cachedir_tagged": [str(source / "cache")],
            "skipped_mounts": [],
            "one_file_system": False,
        }
    with PathSource(str(source), skip_cachedir_tagged=False).opened(str(tmp_path / "repo")) as tree:
        assert tree.filter_rules == () and tree.record["cachedir_tagged"] == []


@pytest.mark.integration
def test_a_backup_keeps_a_tagged_cache_with_its_tag_only(tmp_path: Path, rsync_path: str) -> None:
    source = tmp_path / "src"
    (source / "cache" / "deep").mkdir(parents=True)
    (source / "cache" / "CACHEDIR.TAG").write_bytes(CACHEDIR_SIGNATURE + b"\n# a cache\n")
    (source / "cache" / "blob").write_bytes(b"x" * 1000)
    (source / "cache" / "deep" / "more").write_bytes(b"y")
    (source / "kept.txt").write_text("kept\n")
    config = tmp_path / "config.toml"
    config.write_text(FAST)
    repo = tmp_path / "repo"
    assert main(["backup", "--no-sudo", "-q", "--config", str(config), str(source), str(repo)]) == 0
    snap = repo / "snapshots" / os.readlink(repo / "latest").split("/")[-1]
    assert sorted(os.listdir(snap)) == ["cache", "kept.txt"]
    assert os.listdir(snap / "cache") == ["CACHEDIR.TAG"]
    name = snap.name
    metadata = json.loads((repo / "metadata" / f"{name}.json").read_text())
    assert metadata["cachedir_tagged"] == [str(source / "cache")]
    assert metadata["source"] == str(source)
