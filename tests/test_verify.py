"""``backup-agent verify`` finds what a test plants in real snapshots.

Backups are real (rsync through the cycle); verify runs as users run it,
``python -m agent.cli verify`` in a subprocess (it lowers its own I/O
priority, which must not reach the test process). The damage is made on the
snapshot's files themselves: a flipped byte, a truncated file, a missing
file, a file the manifest does not list, a corrupted manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.repository import manifest as manifests
from agent.cli import build_parser, sudo_door, through_sudo_refusal
from agent.core.errors import EXIT_DAMAGED, EXIT_OK, EXIT_UNVERIFIED, EXIT_USAGE
from agent.core.errors import UsageError
from agent.engine.verify import Location, Problem, choose, describe
from tests.conftest import ReadableCode, requires_root
from tests.test_cycle_robustness import Cli, cli  # noqa: F401  (cli is a fixture)
from tests.test_disk import NAME, _run, rig  # noqa: F401  (rig is the fixture bench uses)
from tests.test_disk_cycle import Bench, bench  # noqa: F401  (bench is a fixture)
from tests.test_manifest import backup, build_source, config, manifest_path, metadata, same_size_damage

pytestmark = pytest.mark.integration


@dataclass
class History:
    source: Path
    repo: Path
    config: Path
    first: str
    second: str

    def snapshot(self, name: str) -> Path:
        return self.repo / "snapshots" / name


@pytest.fixture
def history(tmp_path: Path, rsync_path: str) -> History:
    """Two snapshots that share every file but one."""
    source, repo, cfg = tmp_path / "source", tmp_path / "repo", config(tmp_path)
    build_source(source)
    first = backup(source, repo, cfg)
    (source / "deep" / "f03.txt").write_text("changed for the second snapshot\n")
    second = backup(source, repo, cfg)
    return History(source, repo, cfg, first, second)


def verify(cli: Cli, history: History, *args: str) -> tuple[int, dict[str, Any], str]:
    """verify --json: exit status, the report, stderr."""
    result = cli.run("verify", "--json", "-q", "--config", history.config, "--repository", history.repo, *args)
    assert result.stdout, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return result.returncode, report, result.stderr


def kinds(report: dict[str, Any]) -> list[str]:
    return [problem["kind"] for problem in report["problems"]]


def where(problem: dict[str, Any]) -> list[tuple[str, str]]:
    return [(place["snapshot"], place["path"]) for place in problem["locations"]]


def test_an_intact_repository_reports_nothing(cli: Cli, history: History) -> None:
    status, report, _ = verify(cli, history, "--all")
    assert status == EXIT_OK
    assert report["intact"] is True and report["problems"] == [] and report["unchecked"] == {}
    assert report["checked"] == [history.first, history.second]
    # 29 paths in each snapshot; 28 inodes in the first, plus the one changed file: each read once.
    assert report["files"] == 58 and report["read"]["files"] == 29
    human = cli.run("verify", "--config", history.config, "--repository", history.repo)
    assert human.returncode == EXIT_OK
    assert human.stdout.splitlines() == [human.stdout.splitlines()[0]]
    assert human.stdout.startswith("intact: 1 snapshot, 29 files (28 read, ")


def test_the_json_report_has_its_documented_shape(cli: Cli, history: History) -> None:
    same_size_damage(history.snapshot(history.second) / "plain.txt")
    status, report, _ = verify(cli, history)
    assert status == EXIT_DAMAGED
    assert set(report) == {"repository", "intact", "checked", "unchecked", "files", "read", "duration", "problems"}
    assert report["repository"] == str(history.repo) and set(report["read"]) == {"files", "bytes"}
    (problem,) = report["problems"]
    assert set(problem) == {"kind", "locations", "detail", "expected", "actual", "expected_size", "size"}
    assert all(set(place) == {"snapshot", "path"} for place in problem["locations"])


def test_a_flipped_byte_is_found_and_every_snapshot_sharing_the_file_is_named(cli: Cli, history: History) -> None:
    damaged = history.snapshot(history.second) / "deep" / "er" / "big.bin"
    expected = manifests.hash_file(os.fsencode(damaged))[0]
    same_size_damage(damaged)
    for args in ((), ("--all",), (history.first,)):
        status, report, _ = verify(cli, history, *args)
        assert status == EXIT_DAMAGED, args
        (problem,) = report["problems"]
        assert problem["kind"] == "damaged"
        # One file on the disk, reported once, with both snapshots that link to it.
        assert where(problem) == [(history.first, "deep/er/big.bin"), (history.second, "deep/er/big.bin")]
        assert problem["expected"] == expected and problem["actual"] == manifests.hash_file(os.fsencode(damaged))[0]
        assert problem["size"] == problem["expected_size"]
    human = cli.run("verify", "--config", history.config, "--repository", history.repo)
    lines = human.stdout.splitlines()
    assert human.returncode == EXIT_DAMAGED and len(lines) == 2
    assert lines[0].startswith(f"DAMAGE FOUND in {history.repo}: 1 damaged; 1 snapshot")
    assert lines[1] == (
        f"damaged: deep/er/big.bin (in 2 snapshots: {history.first}, {history.second}): "
        "content differs from the checksum recorded when it was backed up"
    )


def test_a_truncated_file_and_a_missing_file_are_found(cli: Cli, history: History) -> None:
    newest = history.snapshot(history.second)
    os.truncate(newest / "deep" / "f07.txt", 3)
    os.unlink(os.fsencode(newest) + b"/bytes-\xff\xfe-dir/\xe9t\xe9")
    (newest / "line\nbreak").unlink()
    status, report, _ = verify(cli, history)
    assert status == EXIT_DAMAGED
    assert kinds(report) == ["damaged", "missing", "missing"]
    truncated = report["problems"][0]
    assert where(truncated) == [(history.first, "deep/f07.txt"), (history.second, "deep/f07.txt")]
    assert (truncated["size"], truncated["expected_size"]) == (3, len("file 7\n" * 8))
    assert "truncated" in truncated["detail"]
    missing = sorted(where(p)[0][1] for p in report["problems"][1:])
    assert missing == sorted([os.fsdecode(b"bytes-\xff\xfe-dir/\xe9t\xe9"), "line\nbreak"])
    # Only the newest lost them: the first snapshot still holds its own links.
    status, report, _ = verify(cli, history, history.first)
    assert kinds(report) == ["damaged"]


def test_a_file_missing_from_the_manifest_is_reported(cli: Cli, history: History) -> None:
    (history.snapshot(history.second) / "deep" / "stowaway").write_text("not backed up by us\n")
    status, report, _ = verify(cli, history)
    assert status == EXIT_DAMAGED and kinds(report) == ["not-in-manifest"]
    assert where(report["problems"][0]) == [(history.second, "deep/stowaway")]


def test_a_corrupted_manifest_is_reported_as_such(cli: Cli, history: History) -> None:
    path = manifest_path(history.repo, history.second)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    status, report, _ = verify(cli, history, "--all")
    assert status == EXIT_DAMAGED
    (problem,) = report["problems"]  # not thousands of damaged files
    assert problem["kind"] == "corrupted-manifest" and where(problem) == [(history.second, "")]
    assert "does not match its own checksum" in problem["detail"]
    assert report["checked"] == [history.first]


def test_a_deleted_manifest_that_the_metadata_records_is_reported(cli: Cli, history: History) -> None:
    manifest_path(history.repo, history.second).unlink()
    status, report, _ = verify(cli, history)
    assert status == EXIT_DAMAGED and kinds(report) == ["missing-manifest"]


def test_a_snapshot_made_before_manifests_is_not_checked_and_says_so(cli: Cli, history: History) -> None:
    manifest_path(history.repo, history.first).unlink()
    info = metadata(history.repo, history.first)
    del info["manifest"]
    (history.repo / "metadata" / f"{history.first}.json").write_text(json.dumps(info))
    status, report, _ = verify(cli, history, "--all")
    assert status == EXIT_OK and report["checked"] == [history.second]
    assert report["unchecked"] == {history.first: "no manifest: made before manifests existed"}


def test_a_run_that_could_check_no_snapshot_is_not_called_intact(cli: Cli, history: History) -> None:
    # The newest snapshot lost its manifest and its metadata: nothing says whether it had a manifest.
    manifest_path(history.repo, history.second).unlink()
    (history.repo / "metadata" / f"{history.second}.json").unlink()
    status, report, _ = verify(cli, history)
    assert status == EXIT_UNVERIFIED
    assert report["intact"] is False and report["problems"] == [] and report["checked"] == []
    assert report["unchecked"] == {history.second: "no manifest, and no metadata to say whether one was written"}
    human = cli.run("verify", "--config", history.config, "--repository", history.repo)
    assert human.returncode == EXIT_UNVERIFIED
    assert human.stdout.splitlines() == [
        f"NOT VERIFIED: no snapshot could be checked; not checked: {history.second} "
        "(no manifest, and no metadata to say whether one was written)"
    ]
    # With a snapshot that could be checked beside it, the run speaks of that one.
    status, report, _ = verify(cli, history, "--all")
    assert status == EXIT_OK and report["intact"] is True and report["checked"] == [history.first]


@requires_root
@pytest.mark.may_skip
def test_a_directory_verify_cannot_list_is_named_and_nothing_below_it_is_called_missing(
    rsync_path: str, readable_code: ReadableCode
) -> None:
    """verify as an ordinary user (setpriv, a real process) of a backup root made, with a private directory."""
    if shutil.which("setpriv") is None:
        pytest.skip(reason="setpriv is missing (util-linux)")
    # readable_code skips (allowed: may_skip) where no Python of this version
    # can start as another user, as a pyenv under /root cannot.
    base = Path(tempfile.mkdtemp(prefix="verify-unlistable-"))  # not below pytest's root-only tmp_path
    try:
        os.chmod(base, 0o755)
        source, repo, cfg = base / "source", base / "repo", config(base)
        build_source(source)
        os.chmod(source / "deep", 0o700)  # root's own, as /root is in a backup of /
        name = backup(source, repo, cfg)
        nobody = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
        argv = [*nobody, *readable_code.argv("verify", "--json", "-q", "--config", str(cfg), "--repository", str(repo))]
        # The manifest is root's alone: as anyone else, verify says it could not check, not that it is damaged.
        private = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=base, env=readable_code.env())
        assert private.returncode == EXIT_UNVERIFIED, private.stderr
        assert json.loads(private.stdout)["problems"] == []
        os.chmod(manifest_path(repo, name), 0o644)  # as an older version wrote it: the rest is about a private directory
        result = subprocess.run(
            [*nobody, *readable_code.argv("verify", "--json", "-q", "--config", str(cfg), "--repository", str(repo))],
            capture_output=True, text=True, timeout=60, cwd=base, env=readable_code.env(),
        )
        assert result.returncode == EXIT_DAMAGED, result.stderr
        report = json.loads(result.stdout)
        assert [(p["kind"], where(p)) for p in report["problems"]] == [("unreadable", [(name, "deep")])]
        assert report["problems"][0]["detail"] == "cannot list this directory: Permission denied; nothing below it was checked"
        # Everything outside the private directory was still checked.
        entries = manifests.load(str(manifest_path(repo, name))).entries
        assert report["files"] == sum(1 for e in entries if not e.path.startswith(b"deep/")) > 0
    finally:
        shutil.rmtree(base)


def test_an_unknown_snapshot_is_refused_with_the_nearest_names(cli: Cli, history: History) -> None:
    typo = history.second[:-6]
    result = cli.run("verify", "--config", history.config, "--repository", history.repo, typo)
    assert result.returncode == EXIT_USAGE and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"backup-agent: no snapshot named '{typo}': nearest: ") and history.second in line
    result = cli.run("verify", "--all", history.first, "--config", history.config, "--repository", history.repo)
    assert result.returncode == EXIT_USAGE and "not both" in result.stderr


def test_a_missing_repository_is_one_line(cli: Cli, tmp_path: Path) -> None:
    result = cli.run("verify", "--repository", tmp_path / "nowhere")
    assert result.returncode == 3 and len(result.stderr.splitlines()) == 1 and "does not exist" in result.stderr


# -- pure parts ---------------------------------------------------------------------------

NAMES = ["2026-11-20T10-00-00+0100", "2026-11-21T10-00-00+0100", "2026-11-22T10-00-00+0100"]


def test_choose() -> None:
    assert choose(NAMES, None, False) == NAMES[-1:]
    assert choose(NAMES, "latest", False) == NAMES[-1:]
    assert choose(NAMES, None, True) == NAMES
    assert choose(NAMES, NAMES[0], False) == NAMES[:1]
    assert choose([], None, False) == []
    with pytest.raises(UsageError) as caught:
        choose(NAMES, "2026-11-21T10-00", False)
    assert caught.value.message.split("nearest: ")[1].startswith(NAMES[1])


def test_describe_escapes_names_onto_one_line() -> None:
    problem = Problem("missing", [Location("S", b"a\nb\xff")], "not in the snapshot")
    assert describe(problem) == "missing: a\\nb\\xff (in S): not in the snapshot"


# -- the sudo door --------------------------------------------------------------------------


def refusal(argv: list[str]) -> str | None:
    return through_sudo_refusal(build_parser().parse_args(argv))


@pytest.mark.parametrize(
    "argv",
    [["verify"], ["verify", "--all", "--json"], ["verify", "2026-11-22T10-00-00+0100", "-q"], ["verify", "--disk", "backup1", "-v"]],
)
def test_read_only_verify_forms_pass_through_sudo(argv: list[str]) -> None:
    assert refusal(argv) is None


@pytest.mark.parametrize(
    ("argv", "named"),
    [(["verify", "--repository", "/home/me/fake"], "--repository"), (["verify", "--config", "/tmp/evil.toml"], "--config")],
)
def test_verify_options_that_choose_what_root_reads_are_refused_through_sudo(argv: list[str], named: str) -> None:
    message = refusal(argv)
    assert message is not None and message.startswith(f"{named} is not accepted through sudo")
    assert message.endswith(sudo_door("verify")) and "verify [SNAPSHOT | --all]" in message


# -- the configured disk ----------------------------------------------------------------------


@pytest.mark.integration
def test_verify_opens_the_disk_leaves_it_as_found_and_finds_a_byte_corrupted_on_it(bench: Bench) -> None:
    """tests/test_disk_cycle.py's bench: a real LUKS header and ext4 image on loop devices, the stand-in
    cryptdisks_start/stop only for the device-mapper step this kernel lacks."""
    bench.prepared(snapshots=2)
    config = str(bench.config)
    run = bench.cli("verify", "--disk", NAME, "--config", config, "--json", "-q")
    assert run.returncode == EXIT_OK, str(run)
    assert json.loads(run.stdout)["intact"] is True
    bench.assert_locked_and_unmounted()
    assert bench.calls() == [("start", 0), ("stop", 0)]

    # Corrupt one byte on the disk's filesystem, under the repository's back.
    bench.reset_calls()
    _run("mount", bench.rig.plain_device, str(bench.check))
    try:
        newest = sorted((bench.check / "host" / "snapshots").iterdir())[-1]
        same_size_damage(newest / "sub" / "deeper" / "data.bin")
    finally:
        _run("umount", str(bench.check))
    run = bench.cli("verify", "--all", "--config", config, "--json", "-q")
    assert run.returncode == EXIT_DAMAGED, str(run)
    (problem,) = json.loads(run.stdout)["problems"]
    assert problem["kind"] == "damaged" and len(problem["locations"]) == 2
    assert {place["path"] for place in problem["locations"]} == {"sub/deeper/data.bin"}
    bench.assert_locked_and_unmounted()


# -- what the manifest records beyond contents (format 2) ---------------------------------------


def test_changed_type_mode_owner_and_link_target_are_reported(cli: Cli, tmp_path: Path, rsync_path: str) -> None:
    source, repo, cfg = tmp_path / "source", tmp_path / "repo", config(tmp_path)
    build_source(source)
    (source / "dir").mkdir()
    (source / "dir" / "inside").write_text("x")
    (source / "gone").mkdir()
    (source / "becomes-file").mkdir()
    os.symlink("plain.txt", source / "link")
    os.mkfifo(source / "pipe")
    os.chmod(source / "plain.txt", 0o640)
    name = backup(source, repo, cfg)
    snap = repo / "snapshots" / name
    status, report, _ = verify(cli, History(source, repo, cfg, name, name))
    assert status == EXIT_OK and report["problems"] == []

    os.chmod(snap / "plain.txt", 0o666)  # mode of a file (its contents untouched)
    os.chown(snap / "dir", 4242, 4343)  # owner of a directory
    os.unlink(snap / "link")
    os.symlink("/etc/shadow", snap / "link")  # a link's target
    os.rmdir(snap / "becomes-file")
    (snap / "becomes-file").write_text("")  # a directory replaced by a file
    os.rmdir(snap / "gone")  # a directory removed
    os.symlink("/", snap / "new-link")  # an entry the manifest never saw
    status, report, _ = verify(cli, History(source, repo, cfg, name, name))
    assert status == EXIT_DAMAGED
    problems = {problem["locations"][0]["path"]: (problem["kind"], problem["detail"]) for problem in report["problems"]}
    assert problems["plain.txt"] == ("changed", "mode 0666, was 0640")
    assert problems["dir"] == ("changed", "owner 4242:4343, was 0:0")
    assert problems["link"] == ("changed", "points to /etc/shadow, was plain.txt")
    assert problems["becomes-file"] == ("changed", "a file, was a directory")
    assert problems["gone"] == ("missing", "not in the snapshot (was a directory)")
    assert problems["new-link"][0] == "not-in-manifest"
    assert "pipe" not in problems and "dir/inside" not in problems
    assert len(problems) == 6


def test_a_format_1_manifest_is_still_read() -> None:
    body = manifests.line("ab" * 32, 3, 7, b"old file")
    head = b"# backup-agent manifest 1 sha256\n"
    own = "sha256:" + hashlib.sha256(head + body).hexdigest()
    data = head + body + manifests.trailer(1, own)
    loaded = manifests.parse(data, "m")
    assert [(e.path, e.size, e.inode) for e in loaded.entries] == [(b"old file", 3, 7)]
    assert loaded.attributes == ()
