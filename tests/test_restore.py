"""restore (agent/engine/restore.py, ``backup-agent restore``): real rsync, real files.

What is restored equals what was backed up in content, mode, owner, times,
ACLs, xattrs, hard links and symbolic links (tests/treeutil.describe);
``--in-place`` never loses what it replaces, also when rsync fails half-way
(a real full filesystem: a small tmpfs); the planner and the through-sudo
rules are pure and tested directly.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from agent.config import load as configuration
from agent.engine import history
from agent.cli import build_parser, main, through_sudo_refusal
from agent.core.commands import Runner
from agent.core.errors import EXIT_STEP_FAILED, EXIT_USAGE, StepError, UsageError
from agent.repository.store import Repository
from agent.engine.restore import Plan, Target, caller_refusal, choose, early_refusal, execute, may_search, plan_restore
from agent.engine.rsync import restore_argv
from tests.conftest import requires_root
from tests.test_snapshot_fidelity import build_source, config  # noqa: F401  (config is a fixture)
from tests.treeutil import describe

NOW = dt.datetime(2026, 11, 25, 16, 30, 12, tzinfo=dt.timezone.utc)


# -- pure: argv, plan, the sudo door -----------------------------------------------------


def test_restore_argv() -> None:
    assert restore_argv(rsync="/usr/bin/rsync", source="/r/s/n/home/./me/x", destination="/home/restored-n") == (
        "/usr/bin/rsync", "--archive", "--hard-links", "--acls", "--xattrs", "--numeric-ids", "--relative",
        "/r/s/n/home/./me/x", "/home/restored-n/",
    )
    assert "--dry-run" in restore_argv(rsync="rsync", source="/s/./x", destination="/d", dry_run=True)
    with pytest.raises(ValueError, match="/./"):
        restore_argv(rsync="rsync", source="/s/x", destination="/d")
    with pytest.raises(ValueError, match="absolute"):
        restore_argv(rsync="rsync", source="/s/./x", destination="d")


SNAP = history.Snapshot("2026-11-20T10-00-00+0000", "/repo/snapshots/2026-11-20T10-00-00+0000", "/home", False)


def target(path: str, kind: str = "file") -> Target:
    rel = history.within(SNAP.source, path)
    assert rel is not None
    return Target(path, SNAP, rel, kind)


def test_plan_default_is_a_new_directory_beside_the_original() -> None:
    live = {"/home", "/home/me", "/home/me/restored-2026-11-20T10-00-00+0000"}
    plan = plan_restore(
        [target("/home/me/thesis.tex"), target("/home/me/gone/deep/notes", "directory")],
        to=None, in_place=False, now=NOW, exists=live.__contains__, is_dir=live.__contains__,
    )
    second = "/home/me/restored-2026-11-20T10-00-00+0000-2"  # the first name is taken
    assert plan.make == (second,) and plan.beside == (second,)
    first, deep = plan.items
    assert (first.source, first.destination, first.result) == (f"{SNAP.path}/me/./thesis.tex", second, f"{second}/thesis.tex")
    # /home/me/gone no longer exists: restored from /home/me down, its directories as they were
    assert (deep.source, deep.result) == (f"{SNAP.path}/me/./gone/deep/notes", f"{second}/gone/deep/notes")
    assert first.aside is None and deep.aside is None


def test_plan_in_place_moves_aside_without_overwriting_an_earlier_aside() -> None:
    aside = "/home/me/thesis.tex.before-restore-2026-11-25T16-30-12+0000"
    live = {"/home", "/home/me", "/home/me/thesis.tex", aside}
    plan = plan_restore(
        [target("/home/me/thesis.tex"), target("/home/me/new")],
        to=None, in_place=True, now=NOW, exists=live.__contains__, is_dir=live.__contains__,
    )
    assert plan.make == ()
    moved, fresh = plan.items
    assert (moved.destination, moved.result, moved.aside) == ("/home/me", "/home/me/thesis.tex", aside + ".2")
    assert (fresh.result, fresh.aside) == ("/home/me/new", None)


def test_plan_to_refuses_what_exists_and_the_whole_source_without_to() -> None:
    live = {"/home", "/home/me", "/tmp", "/tmp/out", "/tmp/out/thesis.tex"}
    with pytest.raises(UsageError, match="/tmp/out/thesis.tex exists already: nothing was restored"):
        plan_restore([target("/home/me/thesis.tex")], to="/tmp/out", in_place=False, now=NOW, exists=live.__contains__, is_dir=live.__contains__)
    with pytest.raises(UsageError, match="/tmp/new/x: its parent directory does not exist"):
        plan_restore([target("/home/me/a")], to="/tmp/new/x", in_place=False, now=NOW, exists=live.__contains__, is_dir=live.__contains__)
    with pytest.raises(UsageError, match="/home is the whole backed-up source: restore it with --to DIR"):
        plan_restore([target("/home", "directory")], to=None, in_place=False, now=NOW, exists=live.__contains__, is_dir=live.__contains__)
    whole = plan_restore([target("/home", "directory")], to="/tmp/new", in_place=False, now=NOW, exists=live.__contains__, is_dir=live.__contains__)
    assert (whole.make, whole.items[0].source, whole.items[0].result) == (("/tmp/new",), f"{SNAP.path}/./", "/tmp/new")


def test_may_search() -> None:
    assert may_search(0o700, 1000, 1000, 1000, [1000])
    assert not may_search(0o700, 0, 0, 1000, [1000])
    assert may_search(0o750, 0, 50, 1000, [1000, 50])
    assert not may_search(0o750, 0, 50, 1000, [1000])
    assert may_search(0o701, 0, 0, 1000, [])
    assert not may_search(0o077, 1000, 0, 1000, [0])  # the owner's own bits count, not the group's


SUDO_ACCEPTED = [
    ["versions", "/home/me/x"],
    ["versions", "--json", "--disk", "usb", "x"],
    ["diff"],
    ["diff", "--json", "--disk", "usb", "A", "B"],
    ["restore", "x", "y"],
    ["restore", "--disk", "usb", "--at", "yesterday 14:00", "-n", "x"],
    ["restore", "--snapshot", "S", "-q", "x"],
]
SUDO_REFUSED = [
    (["versions", "--repository", "/tmp/r", "x"], "--repository"),
    (["versions", "--config", "/tmp/c.toml", "x"], "--config"),
    (["diff", "--repository", "/tmp/r"], "--repository"),
    (["restore", "--to", "/etc", "x"], "--to"),
    (["restore", "--in-place", "x"], "--in-place"),
    (["restore", "--repository", "/tmp/r", "x"], "--repository"),
]


@pytest.mark.parametrize("argv", SUDO_ACCEPTED, ids=[" ".join(a) for a in SUDO_ACCEPTED])
def test_through_sudo_reading_and_restoring_into_a_new_directory_pass(argv: list[str]) -> None:
    assert through_sudo_refusal(build_parser().parse_args(argv)) is None


@pytest.mark.parametrize(("argv", "named"), SUDO_REFUSED, ids=[" ".join(a) for a, _ in SUDO_REFUSED])
def test_through_sudo_choosing_what_is_read_or_written_is_refused(argv: list[str], named: str) -> None:
    message = through_sudo_refusal(build_parser().parse_args(argv))
    assert message is not None and message.startswith(named) and "is not accepted through sudo" in message


# -- real rsync ----------------------------------------------------------------------------


def backup(source: Path, repo: Path, config: Path) -> str:
    assert main(["backup", "--no-sudo", "-q", "-b", "-s", "--config", str(config), str(source), str(repo)]) == 0
    return os.readlink(repo / "latest").split("/")[-1]


def restore(config: Path, repo: Path, *args: str) -> int:
    return main(["restore", "-q", "--config", str(config), "--repository", str(repo), *args])


@pytest.fixture
def source(tmp_path: Path, rsync_path: str) -> Path:
    if shutil.which("setfacl") is None:
        pytest.skip(reason="setfacl is missing: run scripts/test, which installs the acl package")
    root = tmp_path / "source"
    build_source(root)
    if os.geteuid() == 0:
        os.chown(root / "plain.txt", 4242, 4343)
        os.lchown(root / "link-to-plain", 4444, 4545)
        os.chown(root / "deep" / "er", 4646, 4747)
    return root


@pytest.mark.integration
def test_restored_trees_equal_what_was_backed_up(source: Path, tmp_path: Path, config: Path) -> None:
    repo = tmp_path / "repo"
    name = backup(source, repo, config)
    if os.geteuid() == 0:
        assert os.lstat(source / "plain.txt").st_uid == 4242  # the owners really are others'
    whole, deep, plain = describe(source), describe(source / "deep"), describe(source / "plain.txt")
    shutil.rmtree(source / "deep")
    os.unlink(source / "plain.txt")
    # the whole source, into a new directory
    assert restore(config, repo, "--to", str(tmp_path / "copy"), str(source)) == 0
    assert describe(tmp_path / "copy") == whole
    # a tree and a file, beside the originals (the default)
    assert restore(config, repo, str(source / "deep"), str(source / "plain.txt")) == 0
    restored = source / f"restored-{name}"
    assert sorted(os.listdir(restored)) == ["deep", "plain.txt"]
    assert describe(restored / "deep") == deep
    assert describe(restored / "plain.txt") == plain
    assert (os.stat(restored).st_mode, os.stat(restored).st_uid) == (os.stat(source).st_mode, os.stat(source).st_uid)
    # hard links within the restored tree are hard links again; the link's target is kept
    assert (restored / "deep" / "hard-b").stat().st_nlink == 1  # its partner hard-a was not restored
    assert os.path.samefile(tmp_path / "copy" / "hard-a", tmp_path / "copy" / "deep" / "hard-b")
    assert os.readlink(tmp_path / "copy" / "dangling-link") == "/nonexistent/target"
    # a second restore never writes over the first
    assert restore(config, repo, str(source / "plain.txt")) == 0
    assert describe(source / f"restored-{name}-2" / "plain.txt") == plain


@pytest.mark.integration
def test_in_place_puts_back_the_old_version_and_keeps_the_current_one(
    source: Path, tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "repo"
    first = backup(source, repo, config)
    old = describe(source / "deep")
    (source / "plain.txt").write_text("edited since\n")
    (source / "deep" / "er" / "est" / "leaf").write_text("changed\n")
    current = describe(source / "deep")
    backup(source, repo, config)
    capsys.readouterr()
    assert restore(config, repo, "--in-place", "--snapshot", first, str(source / "plain.txt"), str(source / "deep")) == 0
    out = capsys.readouterr().out
    assert (source / "plain.txt").read_text() == "plain\n"
    assert describe(source / "deep") == old
    asides = sorted(p.name for p in source.iterdir() if ".before-restore-" in p.name)
    assert [a.split(".before-restore-")[0] for a in asides] == ["deep", "plain.txt"]
    assert (source / asides[1]).read_text() == "edited since\n"
    assert describe(source / asides[0]) == current
    for aside in asides:
        assert f"aside to {source / aside}" in out


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs: a real filesystem that fills up."""
    if os.geteuid() != 0:
        pytest.skip(reason="needs root to mount a tmpfs: run the suite as root")
    point = tmp_path / "small"
    point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(point)], check=True)
    try:
        yield point
    finally:
        # A process of the test's restore may still be closing its files here for a moment on a loaded
        # machine ("target is busy" was seen): a few tries, and the mount is never left behind.
        for _ in range(20):
            if subprocess.run(["umount", str(point)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        else:
            subprocess.run(["umount", "--lazy", str(point)], check=True)


@pytest.mark.integration
@pytest.mark.parametrize("what", ["file", "directory"])
def test_in_place_never_loses_what_it_replaces_when_rsync_fails(
    small_fs: Path, tmp_path: Path, config: Path, rsync_path: str, what: str, capsys: pytest.CaptureFixture[str]
) -> None:
    source = small_fs / "src"
    (source / "d").mkdir(parents=True)
    big = os.urandom(1_200_000)
    if what == "file":
        (source / "d" / "big").write_bytes(big)
        path = source / "d" / "big"
    else:
        (source / "d" / "a-small").write_bytes(b"fits\n")
        (source / "d" / "z-big").write_bytes(big)
        path = source / "d"
    repo = tmp_path / "repo"
    backup(source, repo, config)
    # Now the file (or tree) is small, and the disk too full for the old version.
    if what == "file":
        path.write_text("the current version\n")
    else:
        shutil.rmtree(path)
        path.mkdir()
        (path / "current").write_text("the current version\n")
    (small_fs / "filler").write_bytes(b"\0" * 1_000_000)
    before = describe(path) if what == "directory" else {b"": (path.read_bytes(), os.lstat(path).st_ino)}
    capsys.readouterr()
    assert restore(config, repo, "--in-place", str(path)) == EXIT_STEP_FAILED
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("backup-agent: restore failed: rsync failed"), error
    if what == "file":
        # rsync wrote into a temporary file, which it removed: the current one went back
        assert error.endswith(f"; {path} was put back as it was"), error
        assert {b"": (path.read_bytes(), os.lstat(path).st_ino)} == before
    else:
        aside = [p for p in source.iterdir() if p.name.startswith("d.before-restore-")]
        assert len(aside) == 1
        assert f"what was at {path} before is kept at {aside[0]}, the unfinished restore is at {path}" in error
        assert describe(aside[0]) == before
        assert (path / "a-small").read_bytes() == b"fits\n"


@pytest.mark.integration
def test_in_place_that_cannot_move_the_current_one_aside_is_one_line_and_loses_nothing(
    source: Path, tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if os.geteuid() != 0:
        pytest.skip(reason="needs root to mount a tmpfs: run the suite as root")
    repo = tmp_path / "repo"
    backup(source, repo, config)
    (source / "plain.txt").write_text("edited since\n")
    point = source / "deep"
    # A mount point cannot be renamed (EBUSY): the move aside fails for real.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(point)], check=True)
    try:
        (point / "current").write_text("on the mount\n")
        capsys.readouterr()
        assert restore(config, repo, "--in-place", str(source / "plain.txt"), str(point)) == EXIT_STEP_FAILED
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"backup-agent: restore failed: cannot move {point} aside to {point}.before-restore-")
        assert lines[0].endswith(f"it is left as it was; restored before it stopped: {source}/plain.txt"), lines[0]
        assert os.listdir(point) == ["current"] and (point / "current").read_text() == "on the mount\n"
        assert (source / "plain.txt").read_text() == "plain\n"
        (aside,) = [p for p in source.iterdir() if p.name.startswith("plain.txt.before-restore-")]
        assert aside.read_text() == "edited since\n"
    finally:
        subprocess.run(["umount", str(point)], check=True)


@pytest.mark.integration
def test_bad_requests_are_one_line_and_touch_nothing(source: Path, tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = tmp_path / "repo"
    name = backup(source, repo, config)
    listing = sorted(os.listdir(source))
    capsys.readouterr()
    cases = [
        (["--at", "whenever", str(source / "plain.txt")], "--at 'whenever': not a time backup-agent understands; accepted:"),
        (["--at", "2001-01-01", str(source / "plain.txt")], "--at 2001-01-01T23:59:59+"),
        ([str(source / "deep" / "nothing")], f"no snapshot holds {source}/deep/nothing; the nearest parent that one does is {source}/deep"),
        (["/elsewhere/x"], f"/elsewhere/x is outside what was backed up ({source})"),
        (["--snapshot", "nope", str(source / "plain.txt")], "--snapshot nope: no such snapshot"),
        (["--to", str(source), str(source / "plain.txt")], f"{source}/plain.txt exists already: nothing was restored"),
    ]
    for args, expected in cases:
        assert restore(config, repo, *args) == EXIT_USAGE, args
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], (args, lines)
    assert sorted(os.listdir(source)) == listing
    # --dry-run says what it would do, and does nothing
    assert restore(config, repo, "-n", str(source / "plain.txt")) == 0
    assert f"would restore {source}/plain.txt from {name} to {source}/restored-{name}/plain.txt" in capsys.readouterr().out
    assert sorted(os.listdir(source)) == listing


@requires_root
@pytest.mark.integration
def test_through_sudo_restore_only_into_the_callers_directories_and_what_they_could_reach(
    source: Path, tmp_path: Path, config: Path
) -> None:
    os.chmod(source / "deep", 0o700)  # root's private directory, at backup time
    repo = tmp_path / "repo"
    backup(source, repo, config)
    snaps = history.snapshots(Repository.open(str(repo)))
    caller = 4321

    def plan_for(path: Path) -> tuple[Plan, list[Target]]:
        targets = [choose(snaps, str(path), snapshot=None, at=None)]
        return plan_restore(targets, to=None, in_place=False, now=NOW, exists=os.path.lexists, is_dir=os.path.isdir), targets

    plan, targets = plan_for(source / "plain.txt")
    assert caller_refusal(plan, targets, caller, [caller]) == (
        f"{source} is not yours (owner uid 0): through sudo, restore only into your own directories")
    os.chown(source, caller, caller)
    assert caller_refusal(plan, targets, caller, [caller]) is None
    # The caller takes over the live directory that was root's private one: the snapshot still says no.
    os.chown(source / "deep", caller, caller)
    plan, targets = plan_for(source / "deep" / "er")
    refusal = caller_refusal(plan, targets, caller, [caller])
    assert refusal is not None and refusal.startswith(f"in snapshot {snaps[-1].name}, {source}/deep did not let you in")


# -- through sudo, against a caller who swaps the new directory -------------------------

# The caller's side of the race, as the caller: each real restored-* directory
# that appears is renamed away and a symbolic link to root's directory put in
# its place (rename(2) and symlink(2) through mv and ln). Prints how many
# swaps it made.
ATTACKER = """\
home=$1 victim=$2 stop=$3 swaps=0
while [ ! -e "$stop" ]; do
    for found in "$home"/restored-*; do
        if [ -d "$found" ] && [ ! -L "$found" ]; then
            mv "$found" "$home/moved-$swaps" && ln -s "$victim" "$found" && swaps=$((swaps + 1))
        fi
    done
done
echo "$swaps"
"""


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A directory another user can enter (pytest's tmp_path is root's 0700 as root)."""
    base = Path(tempfile.mkdtemp(prefix="backup-agent-race-"))
    os.chmod(base, 0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base)


@requires_root
@pytest.mark.integration
def test_through_sudo_root_never_writes_where_the_caller_swaps_the_new_directory(
    shared_tmp: Path, tmp_path: Path, trusted_dir: Path, config: Path, rsync_path: str,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """Root restores through sudo into the caller's directory while the caller (a real process of
    another uid) keeps replacing ``restored-*`` with a link to a directory of root's. rsync here is
    the real one behind a stand-in that waits first (a root-owned script in the trusted directory),
    so the caller has time to swap before anything is written."""
    caller = 4321  # no account needed: sudo's SUDO_UID is all the door reads
    home = shared_tmp / "home"
    home.mkdir(mode=0o755)
    os.chmod(home, 0o755)
    (home / "thesis.tex").write_text("the thesis\n")
    (home / "docs").mkdir()
    (home / "docs" / "notes").write_text("notes\n")
    (home / "old" / "deep").mkdir(parents=True)
    (home / "old" / "deep" / "draft").write_text("draft\n")
    for path in (home, home / "thesis.tex", home / "docs", home / "docs" / "notes",
                 home / "old", home / "old" / "deep", home / "old" / "deep" / "draft"):
        os.chown(path, caller, caller)
    victim = shared_tmp / "victim"  # root's, like /etc
    victim.mkdir()
    (victim / "passwd").write_text("root's own\n")
    untouched = describe(victim)
    repo = tmp_path / "repo"
    backup(home, repo, config)
    shutil.rmtree(home / "old")  # its directories are made again, inside the new directory

    # rsync 3.5 refuses, by itself, a link the caller owns in the destination path; the rsync most
    # systems have (3.2, 3.4) follows it. The stand-in asks for the older behaviour when the option
    # exists, so the test holds for every rsync.
    options = subprocess.run([rsync_path, "--help"], capture_output=True, text=True, check=True).stdout
    older = " --insecure-links" if "--insecure-links" in options else ""
    slow = trusted_dir / "slow-rsync"
    slow.write_text(f"#!/bin/sh\nsleep 0.2\nexec {rsync_path}{older} \"$@\"\n")
    slow.chmod(0o755)
    (trusted_dir / "etc").mkdir(mode=0o755)
    system = trusted_dir / "etc" / "config.toml"
    system.write_text(f'[backup]\nrepository = "{repo}"\nionice = "none"\nnice = 0\n[commands]\nrsync = "{slow}"\n')
    system.chmod(0o644)
    monkeypatch.setattr(configuration, "SYSTEM_CONFIG", str(system))
    monkeypatch.setenv("SUDO_UID", str(caller))
    monkeypatch.setenv("SUDO_GID", str(caller))

    stop = shared_tmp / "stop"
    attacker = subprocess.Popen(
        ["/bin/sh", "-c", ATTACKER, "attacker", str(home), str(victim), str(stop)],
        user=caller, group=caller, extra_groups=[], stdout=subprocess.PIPE, text=True,
    )
    statuses = []
    try:
        for _ in range(3):
            capsys.readouterr()
            status = main(["restore", "-q", str(home / "thesis.tex"), str(home / "docs"), str(home / "old" / "deep" / "draft")])
            err = capsys.readouterr().err
            statuses.append(status)
            if status != 0:
                assert err.count("\n") == 1 and err.startswith("backup-agent: restore failed: "), err
            assert describe(victim) == untouched
    finally:
        stop.touch()
        try:
            swaps, _ = attacker.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            attacker.kill()
            raise
    assert attacker.returncode == 0 and int(swaps) >= 1, swaps
    # What was restored went into root's own new directories, handed to the caller at the end.
    restored = [p for p in home.iterdir() if not p.is_symlink() and (p / "thesis.tex").exists()]
    assert len(restored) == statuses.count(0) and statuses.count(0) >= 1, (statuses, sorted(os.listdir(home)))
    for directory in restored:
        info = os.lstat(directory)
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (caller, caller, 0o755)
        assert (directory / "thesis.tex").read_text() == "the thesis\n"
        assert (directory / "docs" / "notes").read_text() == "notes\n"
        assert (directory / "old" / "deep" / "draft").read_text() == "draft\n"
        assert os.lstat(directory / "old" / "deep").st_uid == caller  # as it was in the snapshot


@requires_root
@pytest.mark.integration
def test_through_sudo_a_directory_that_is_no_longer_the_callers_gets_nothing(
    source: Path, tmp_path: Path, config: Path, rsync_path: str
) -> None:
    """The owner is checked again on the opened directory, after planning: a swap in between is caught."""
    repo = tmp_path / "repo"
    backup(source, repo, config)
    caller = 4321
    os.chown(source, caller, caller)
    snaps = history.snapshots(Repository.open(str(repo)))
    targets = [choose(snaps, str(source / "plain.txt"), snapshot=None, at=None)]
    plan = plan_restore(targets, to=None, in_place=False, now=NOW, exists=os.path.lexists, is_dir=os.path.isdir)
    assert caller_refusal(plan, targets, caller, [caller]) is None
    os.chown(source, 0, 0)  # as if another directory had been put in its place
    listing = sorted(os.listdir(source))
    with pytest.raises(StepError, match=rf"^{source} is no longer yours \(owner uid 0\): nothing was restored$"):
        execute(plan, Runner(), rsync_path, say=print, caller=caller)
    assert sorted(os.listdir(source)) == listing


# vfs_cap_data, revision 2: cap_net_raw permitted and effective (as `setcap cap_net_raw+ep` writes it)
CAPABILITY = bytes.fromhex("0100000200200000000000000000000000000000")


@requires_root
@pytest.mark.integration
def test_through_sudo_a_restored_program_brings_no_setuid_bit_or_capability(
    source: Path, tmp_path: Path, config: Path, rsync_path: str
) -> None:
    """What is handed to the caller must not carry root's powers; a root shell's restore keeps them."""
    program = source / "tool"
    program.write_bytes(b"#!/bin/sh\n")
    os.chmod(program, 0o6755)
    os.setxattr(program, "security.capability", CAPABILITY)
    os.setxattr(program, "user.kept", b"yes")
    repo = tmp_path / "repo"
    backup(source, repo, config)
    caller = 4321
    os.chown(source, caller, caller)
    snaps = history.snapshots(Repository.open(str(repo)))

    def restored(by: int | None) -> Path:
        plan = plan_restore(
            [choose(snaps, str(program), snapshot=None, at=None)],
            to=None, in_place=False, now=NOW, exists=os.path.lexists, is_dir=os.path.isdir,
        )
        execute(plan, Runner(), rsync_path, say=print, caller=by)
        (item,) = plan.items
        return Path(item.result)

    handed = restored(caller)
    assert stat.S_IMODE(os.lstat(handed).st_mode) == 0o755
    assert "security.capability" not in os.listxattr(handed)
    assert os.getxattr(handed, "user.kept") == b"yes"
    as_root = restored(None)
    assert stat.S_IMODE(os.lstat(as_root).st_mode) == 0o6755
    assert os.getxattr(as_root, "security.capability") == CAPABILITY


@pytest.mark.integration
@pytest.mark.parametrize("what", ["file", "empty directory"])
def test_in_place_never_moves_aside_over_a_name_that_appeared_after_planning(
    source: Path, tmp_path: Path, config: Path, rsync_path: str, what: str
) -> None:
    """A plain rename would replace the newcomer (a file by a file, an empty directory by a directory)."""
    repo = tmp_path / "repo"
    backup(source, repo, config)
    path = source / ("plain.txt" if what == "file" else "empty-dir")
    if what == "file":
        path.write_text("edited since\n")
    else:
        (path / "new").write_text("added since\n")
    snaps = history.snapshots(Repository.open(str(repo)))
    plan = plan_restore(
        [choose(snaps, str(path), snapshot=None, at=None)],
        to=None, in_place=True, now=NOW, exists=os.path.lexists, is_dir=os.path.isdir,
    )
    (item,) = plan.items
    assert item.aside is not None
    newcomer = Path(item.aside)
    if what == "file":
        newcomer.write_text("someone else's\n")
    else:
        newcomer.mkdir()
    said: list[str] = []
    execute(plan, Runner(), rsync_path, say=said.append)
    assert said == [f"moved the current {path} aside to {item.aside}.2"]
    if what == "file":
        assert newcomer.read_text() == "someone else's\n"
        assert Path(f"{item.aside}.2").read_text() == "edited since\n"
        assert path.read_text() == "plain\n"
    else:
        assert newcomer.is_dir() and os.listdir(newcomer) == []
        assert os.listdir(f"{item.aside}.2") == ["new"]
        assert path.is_dir() and os.listdir(path) == []


@pytest.mark.integration
def test_a_new_directory_is_handed_over_also_when_rsync_fails(
    small_fs: Path, tmp_path: Path, config: Path, rsync_path: str, capsys: pytest.CaptureFixture[str]
) -> None:
    source = small_fs / "src"
    source.mkdir(mode=0o750)
    os.chmod(source, 0o750)
    (source / "big").write_bytes(os.urandom(1_200_000))
    repo = tmp_path / "repo"
    name = backup(source, repo, config)
    os.chown(source, 4321, 4322)
    (source / "big").unlink()  # deleted since: restored beside, where it no longer fits
    (small_fs / "filler").write_bytes(b"\0" * 1_000_000)
    capsys.readouterr()
    assert restore(config, repo, str(source / "big")) == EXIT_STEP_FAILED
    err = capsys.readouterr().err
    assert err.startswith("backup-agent: restore failed: rsync failed")
    assert f'write failed on "{source}/restored-{name}/big": No space left on device' in err, err
    info = os.lstat(source / f"restored-{name}")
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (4321, 4322, 0o750)


def test_early_refusal_names_the_first_directory_that_is_not_the_callers() -> None:
    """Pure: the nearest existing directory above each path, and whose it is."""
    there = {"/home/alice", "/home/alice/docs", "/etc"}
    owners = {"/home/alice": 1000, "/home/alice/docs": 1000, "/etc": 0, "/": 0}
    exists = there.__contains__
    assert early_refusal(["/home/alice/docs/gone/a.txt", "/home/alice/b"], 1000, exists, owners.__getitem__) is None
    assert early_refusal(["/home/alice/b", "/etc/shadow"], 1000, exists, owners.__getitem__) == (
        "/etc is not yours (owner uid 0): through sudo, restore only into your own directories"
    )
    assert early_refusal(["/nowhere/x"], 1000, exists, owners.__getitem__) == (
        "/ is not yours (owner uid 0): through sudo, restore only into your own directories"
    )


@requires_root
def test_through_sudo_a_restore_that_will_be_refused_opens_nothing_first(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Refused before the repository (or a disk) is looked for: the message is about the caller, not a missing disk."""
    monkeypatch.setenv("SUDO_UID", "4321")  # no account needed: sudo's SUDO_UID is all the door reads
    status = main(["restore", str(tmp_path / "notes.txt")])
    assert status == EXIT_USAGE
    assert capsys.readouterr().err == (
        f"backup-agent: {tmp_path} is not yours (owner uid 0): through sudo, restore only into your own directories; "
        "nothing was opened or restored\n"
    )


def test_a_restore_into_a_to_that_cannot_be_used_is_refused_before_anything_is_opened(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """No repository is even looked for (the config names none): the --to refusal comes first."""
    (tmp_path / "file").write_text("x")
    config = tmp_path / "config.toml"
    config.write_text("")
    status = main(["restore", "--config", str(config), "--to", str(tmp_path / "file"), str(tmp_path / "notes.txt")])
    assert status == EXIT_USAGE
    assert capsys.readouterr().err == f"backup-agent: --to {tmp_path / 'file'} exists and is not a directory: give a directory\n"
