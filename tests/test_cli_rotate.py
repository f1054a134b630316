"""`backup-agent rotate --dry-run --json` on real repositories agrees with rotate-backups.

The planner's parity is tested at length in test_rotation.py; this checks the
whole command on directories: the names it reads from snapshots/, the scheme
it builds from its options, the JSON it prints, and that a dry run deletes
nothing while a real run deletes exactly the plan.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Iterator

import pytest
from hypothesis import HealthCheck, assume, given, settings

from agent.cli import main
from agent.core.errors import EXIT_USAGE
from agent.repository.store import Repository
from agent.policy.rotation import Scheme
from tests.test_rotation import Oracle, name_sets, peers_python, schemes, weeks_agree, with_newest_kept


@pytest.fixture(scope="module")
def oracle() -> Iterator[Oracle]:
    oracle = Oracle(peers_python())
    yield oracle
    oracle.close()


def scheme_options(scheme: Scheme) -> list[str]:
    options = [f"--{frequency}={count}" for frequency, count in scheme.counts.items()]
    if scheme.prefer_recent:
        options.append("--prefer-recent")
    if not scheme.strict:
        options.append("--relaxed")
    return options


def make_repository(root: Path, names: set[str]) -> Repository:
    repo = Repository.create(str(root))
    for name in names:
        os.mkdir(repo.snapshot_path(name))
        (Path(repo.snapshot_path(name)) / "file").write_text(name)
    return repo


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name_sets(), schemes)
def test_rotate_json_agrees_with_rotate_backups(
    oracle: Oracle, capsys: pytest.CaptureFixture[str], names: set[str], scheme: Scheme
) -> None:
    if "weekly" in scheme.counts and not weeks_agree(names):
        # difference 1 (ISO weeks) has its own tests in test_rotation.py
        scheme = Scheme({f: c for f, c in scheme.counts.items() if f != "weekly"}, scheme.prefer_recent, scheme.strict)
        assume(scheme.counts)
    with tempfile.TemporaryDirectory() as tmp:
        repo = make_repository(Path(tmp) / "repo", names)
        (Path(repo.snapshots_dir) / "not-a-snapshot").mkdir()
        capsys.readouterr()
        config = Path(tmp) / "empty.toml"
        config.write_text("")
        status = main(["rotate", "--dry-run", "--json", "--config", str(config), *scheme_options(scheme), repo.root])
        printed = json.loads(capsys.readouterr().out)
        assert status == 0
        expected = with_newest_kept(oracle.ask(names, scheme))
        assert printed["delete"] == expected["delete"]
        assert {k: v for k, v in printed["keep"].items() if k in names} == expected["keep"]
        assert printed["keep"]["not-a-snapshot"] == ["not a snapshot name"]
        # the dry run deleted nothing
        assert set(os.listdir(repo.snapshots_dir)) == names | {"not-a-snapshot"}
        # a real run deletes exactly the plan, and nothing else
        status = main(["rotate", "-q", "--config", str(config), *scheme_options(scheme), repo.root])
        assert status == 0
        assert set(os.listdir(repo.snapshots_dir)) == (names - set(expected["delete"])) | {"not-a-snapshot"}
        assert not os.path.exists(repo.trash_dir) or not os.listdir(repo.trash_dir)


def test_rotate_removes_what_an_interrupted_run_left_in_the_trash(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The files of rotated snapshots go after success; a run stopped then leaves them, and rotate finishes."""
    kept = "2026-11-22T13-00-00+0100"
    repo = make_repository(tmp_path / "repo", {kept})
    left = Path(repo.trash_dir) / "2026-11-22T12-00-00+0100.0123456789ab"
    (left / "half" / "deep").mkdir(parents=True)
    (left / "half" / "deep" / "file").write_text("not removed yet\n")
    config = tmp_path / "empty.toml"
    config.write_text("")
    assert main(["rotate", "--json", "--config", str(config), "--hourly=1", repo.root]) == 0
    assert json.loads(capsys.readouterr().out)["delete"] == []
    assert os.listdir(repo.trash_dir) == []
    assert os.listdir(repo.snapshots_dir) == [kept]
    assert Path(repo.snapshot_path(kept), "file").read_text() == kept


def test_an_empty_scheme_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = make_repository(tmp_path / "repo", {"2026-11-22T13-00-00+0100"})
    config = tmp_path / "empty.toml"
    config.write_text("")
    status = main(["rotate", "--config", str(config), "--hourly=0", "--daily=0", repo.root])
    assert status == 2
    assert "would delete every snapshot but the newest" in capsys.readouterr().err
    assert os.listdir(repo.snapshots_dir) == ["2026-11-22T13-00-00+0100"]


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["list", "--bogus"], "backup-agent: unrecognized arguments: --bogus (see backup-agent --help)"),
        (["restore"], "backup-agent: restore: the following arguments are required: PATH (see backup-agent restore --help)"),
        (["--bogus"], "backup-agent: unrecognized arguments: --bogus (see backup-agent --help)"),
    ],
)
def test_a_command_line_error_is_one_line_with_one_prefix(
    argv: list[str], line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == EXIT_USAGE
    assert capsys.readouterr().err == line + "\n"


def test_a_command_leaves_no_log_handler_on_its_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Tests run many commands in one process, each with its own captured stderr."""
    assert main(["list", str(tmp_path / "missing")]) != 0
    assert capsys.readouterr().err.startswith("backup-agent: ")
    assert not [h for h in logging.getLogger("agent").handlers if type(h) is logging.StreamHandler]
