"""The backup cycle under crashes, signals, locks, dry runs and rsync failures.

Every test runs the CLI as users do, ``python -m agent.cli`` in a subprocess,
against real directories and (except where a stand-in rsync is the point) the
real rsync. The stand-in (tests/helpers/fake_rsync.py) sits at the process
boundary: it is set as ``[commands] rsync`` and copies with the real rsync
before it exits with the status a test chooses.

Each test gets a machine lock of its own (``BACKUP_AGENT_RUNTIME_DIR``, which
the CLI inherits), so a backup running elsewhere on this machine cannot make
these tests fail with "busy", and the tests can look at that lock.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from agent.core import lock
from agent.core.errors import (
    EXIT_BUSY,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_REPOSITORY,
    EXIT_STEP_FAILED,
    EXIT_USAGE,
    BusyError,
)
from agent.policy.rotation import parse_snapshot_name
from tests.conftest import ReadableCode

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
FAKE_RSYNC = Path(__file__).resolve().parent / "helpers" / "fake_rsync.py"
REAL_RSYNC = "/usr/bin/rsync"
IN_PROGRESS = ".in-progress"
SEED = 20261122

if not os.access(REAL_RSYNC, os.X_OK):  # pragma: no cover - scripts/test installs it
    pytest.skip(reason=f"{REAL_RSYNC} is not installed: run scripts/test, which installs it", allow_module_level=True)


# -- running the CLI -----------------------------------------------------------


@dataclasses.dataclass
class Cli:
    """Runs ``python -m agent.cli`` as users do, with its machine lock in ``run_dir``."""

    run_dir: Path

    @property
    def machine_lock(self) -> Path:
        return Path(lock.machine_lock_path())

    def argv(self, *args: Any) -> list[str]:
        return [sys.executable, "-m", "agent.cli", *(str(a) for a in args)]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("SUDO_UID", None)
        return env

    def run(self, *args: Any, timeout: float = 60, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*args), cwd=ROOT, env=self.env(), capture_output=True, text=True, timeout=timeout, **kwargs
        )

    def popen(self, *args: Any, stdout: Any, stderr: Any) -> subprocess.Popen[bytes]:
        # A session of its own: out of reach of the terminal's signals.
        return subprocess.Popen(
            self.argv(*args), cwd=ROOT, env=self.env(), stdout=stdout, stderr=stderr, start_new_session=True
        )


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Cli:
    """A machine lock of this test's own (BACKUP_AGENT_RUNTIME_DIR), seen alike by the CLI and the test."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    monkeypatch.setenv("BACKUP_AGENT_RUNTIME_DIR", str(run_dir))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run_dir))
    made = Cli(run_dir)
    assert made.machine_lock == run_dir / "backup-agent.lock", "agent.core.lock ignores BACKUP_AGENT_RUNTIME_DIR"
    return made


def write_config(path: Path, *, rsync: str | Path | None = None, rotation: dict[str, Any] | None = None) -> Path:
    lines = ["[backup]", 'ionice = "none"', "nice = 0"]
    if rotation:
        lines.append("[rotation]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in rotation.items()]
    if rsync is not None:
        lines += ["[commands]", f"rsync = {json.dumps(str(rsync))}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def install_stand_in(trusted_dir: Path) -> Path:
    """A copy of the stand-in where the config accepts it as root (root's alone)."""
    copy = trusted_dir / "rsync"
    shutil.copyfile(FAKE_RSYNC, copy)
    copy.chmod(0o755)
    return copy


def make_fake_rsync(directory: Path, **behaviour: Any) -> Path:
    """Tell the stand-in rsync how to behave for repositories in ``directory``.

    Returns the file whose ``.argv`` and ``.ready`` siblings the stand-in
    writes. The executable itself stays in tests/helpers: the config accepts
    programs only in directories that only root can write, not in /tmp.
    """
    assert os.access(FAKE_RSYNC, os.X_OK), f"{FAKE_RSYNC} must be executable"
    control = directory / "fake-rsync.json"
    control.write_text(json.dumps(behaviour))
    return control


def events(text: str) -> list[dict[str, Any]]:
    """The JSON-lines events; a last line cut short by a kill is dropped."""
    out = []
    lines = text.splitlines()
    for index, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except ValueError:
            if index == len(lines) - 1:
                break
            raise AssertionError(f"not a JSON line on stdout: {line!r}") from None
    return out


def step_event(evs: list[dict[str, Any]], name: str, state: str) -> dict[str, Any]:
    found = [e for e in evs if e["event"] == "step" and e["step"] == name and e["state"] == state]
    assert len(found) == 1, f"expected one {name}/{state} step event in {evs}"
    return found[0]


def the_event(evs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [e for e in evs if e["event"] == kind]
    assert len(found) == 1, f"expected one {kind} event in {evs}"
    return found[0]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


# -- looking at trees ----------------------------------------------------------


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tree(root: Path | str) -> dict[str, tuple[Any, ...]]:
    """What a snapshot must reproduce: relative path -> type, mode, content (and mtime)."""
    result: dict[str, tuple[Any, ...]] = {}
    for directory, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(directory, name)
            rel = os.path.relpath(path, root)
            info = os.lstat(path)
            mode = stat.S_IMODE(info.st_mode)
            if stat.S_ISLNK(info.st_mode):
                result[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                result[rel] = ("dir", mode)
            else:
                result[rel] = ("file", mode, info.st_mtime_ns, _sha256(path))
    return result


def inodes(root: Path | str) -> dict[str, int]:
    return {
        os.path.relpath(os.path.join(d, n), root): os.lstat(os.path.join(d, n)).st_ino
        for d, dirnames, filenames in os.walk(root)
        for n in dirnames + filenames
    }


def fingerprint(root: Path | str) -> dict[str, tuple[Any, ...]] | None:
    """Everything a write could change under ``root`` (root included), or None if absent."""
    if not os.path.lexists(root):
        return None
    result: dict[str, tuple[Any, ...]] = {}

    def add(path: str) -> None:
        info = os.lstat(path)
        fields: tuple[Any, ...] = (
            info.st_mode, info.st_ino, info.st_nlink, info.st_uid, info.st_gid,
            info.st_size, info.st_mtime_ns, info.st_ctime_ns,
        )
        if stat.S_ISLNK(info.st_mode):
            fields += (os.readlink(path),)
        elif stat.S_ISREG(info.st_mode):
            fields += (_sha256(path),)
        result[os.path.relpath(path, root)] = fields

    add(str(root))
    if os.path.isdir(root) and not os.path.islink(root):
        for directory, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                add(os.path.join(directory, name))
    return result


def snapshot_entries(repo: Path) -> tuple[list[str], list[str]]:
    """(complete snapshot names, in-progress names without the suffix)."""
    try:
        entries = sorted(os.listdir(repo / "snapshots"))
    except FileNotFoundError:
        return [], []
    complete = [e for e in entries if not e.endswith(IN_PROGRESS)]
    leftovers = [e[: -len(IN_PROGRESS)] for e in entries if e.endswith(IN_PROGRESS)]
    return complete, leftovers


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name: [state, ppid, pgrp, session, ...]."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (whatever session or group it moved to)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


Proc = tuple[int, str]  # pid and start time: a pid is not reused under our feet


def identify(pids: list[int]) -> list[Proc]:
    out = []
    for pid in pids:
        fields = _stat(pid)
        if fields is not None:
            out.append((pid, fields[19]))
    return out


def running(proc: Proc) -> bool:
    """Still there and not dying: not a zombie, and no SIGKILL on its way."""
    fields = _stat(proc[0])
    if fields is None or fields[19] != proc[1] or fields[0] in ("Z", "X"):
        return False
    try:
        with open(f"/proc/{proc[0]}/status") as handle:
            status = dict(line.split(":", 1) for line in handle if ":" in line)
    except OSError:
        return False
    pending = int(status.get("SigPnd", "0").strip(), 16) | int(status.get("ShdPnd", "0").strip(), 16)
    return not pending & (1 << (signal.SIGKILL - 1))


def wait_gone(procs: list[Proc], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while [p for p in procs if running(p)]:
        assert time.monotonic() < deadline, f"still running: {[p for p in procs if running(p)]}"
        time.sleep(0.005)


def kill_tree(process: subprocess.Popen[bytes]) -> None:
    """A crash or a power cut: freeze the CLI and everything below it, then SIGKILL them all."""
    frozen: list[Proc] = []
    if process.poll() is None:
        while True:
            new = [p for p in identify([process.pid, *descendants(process.pid)]) if p not in frozen]
            if not new:
                break
            for pid, _start in new:
                try:
                    os.kill(pid, signal.SIGSTOP)
                except ProcessLookupError:
                    pass
            frozen += new
    for pid, _start in frozen:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=30)
    wait_gone(frozen)


def kill_procs(procs: list[Proc]) -> None:
    for proc in procs:
        if running(proc):
            try:
                os.kill(proc[0], signal.SIGKILL)
            except ProcessLookupError:
                pass
    wait_gone(procs)


def wait_for(predicate: Any, timeout: float, what: str, process: subprocess.Popen[bytes] | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the backup ended (status {process.returncode}) before {what}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.003)


def finished_files(directory: Path) -> dict[str, int]:
    """Regular files rsync has finished in ``directory`` (not its .name.XXXXXX temporaries): rel -> inode."""
    found = {}
    for d, _dirs, files in os.walk(directory):
        for name in files:
            if name.startswith("."):
                continue
            path = os.path.join(d, name)
            try:
                info = os.lstat(path)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(info.st_mode):
                found[os.path.relpath(path, directory)] = info.st_ino
    return found


# -- sources -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Source:
    path: Path
    tree: dict[str, tuple[Any, ...]]
    total_size: int


@pytest.fixture(scope="module")
def big_source(tmp_path_factory: pytest.TempPathFactory) -> Source:
    """~2000 small files and 13 MiB of large ones: a transfer that takes a good part of a second."""
    root = tmp_path_factory.mktemp("big") / "source"
    rng = random.Random(SEED)
    (root / "big").mkdir(parents=True)
    for index, mib in enumerate((1, 2, 3, 4, 1, 2)):
        (root / "big" / f"blob{index}.bin").write_bytes(rng.randbytes(mib << 20))
    for d in range(20):
        directory = root / f"dir{d:02}"
        directory.mkdir()
        for f in range(100):
            (directory / f"file{f:03}.txt").write_bytes(rng.randbytes(rng.randint(0, 3000)))
    os.chmod(root / "dir03" / "file007.txt", 0o600)
    os.chmod(root / "dir04", 0o750)
    os.symlink("../big/blob0.bin", root / "dir05" / "link")
    return Source(root, tree(root), total_size(root))


def total_size(root: Path) -> int:
    """What rsync calls the total file size: regular files and symlink targets."""
    return sum(os.lstat(root / rel).st_size for rel, kind in tree(root).items() if kind[0] in ("file", "link"))


def small_source(root: Path, files: int = 12) -> Source:
    root.mkdir(parents=True)
    (root / "sub").mkdir()
    for index in range(files):
        where = root / ("sub" if index % 2 else "") / f"f{index:02}.txt"
        where.write_text(f"file {index}\n" * (index + 1))
    os.chmod(root / "f00.txt", 0o640)
    os.symlink("f00.txt", root / "link")
    return Source(root, tree(root), total_size(root))


def backup_ok(cli: Cli, config: Path, source: Path, repo: Path) -> str:
    result = cli.run("backup", "--no-sudo", "-q", "--config", config, source, repo)
    assert result.returncode == EXIT_OK, result.stderr
    return os.readlink(repo / "latest").split("/")[-1]


def list_json(cli: Cli, config: Path, repo: Path) -> list[dict[str, Any]]:
    result = cli.run("list", "--json", "--config", config, repo)
    assert result.returncode == EXIT_OK, result.stderr
    rows = json.loads(result.stdout)
    assert isinstance(rows, list)
    return rows


# -- 1. killed at random points ------------------------------------------------


def check_invariants(cli: Cli, config: Path, repo: Path, source: Source, verified: set[str]) -> tuple[list[str], list[str]]:
    """What must hold whenever a run died, however it died."""
    complete, leftovers = snapshot_entries(repo)
    for name in complete:
        assert parse_snapshot_name(name) is not None, f"snapshots/{name} is neither a snapshot nor an in-progress"
        assert (repo / "snapshots" / name).is_dir() and not (repo / "snapshots" / name).is_symlink()
        if name not in verified:
            assert tree(repo / "snapshots" / name) == source.tree, f"complete snapshot {name} differs from the source"
            verified.add(name)
    for name in leftovers:
        assert parse_snapshot_name(name) is not None, f"odd in-progress name {name}"
    if os.path.lexists(repo / "latest"):
        target = os.readlink(repo / "latest")
        assert target.startswith("snapshots/") and target.split("/", 1)[1] in complete, (
            f"latest -> {target}, which is not a complete snapshot ({complete})"
        )
    if (repo / ".backup-agent.toml").exists():
        rows = list_json(cli, config, repo)
        listed = [row["name"] for row in rows]
        assert listed == sorted(complete), f"list shows {listed}, snapshots/ holds {complete}"
        trash = set(os.listdir(repo / ".trash")) if (repo / ".trash").is_dir() else set()
        for row in rows:
            assert not row["name"].endswith(IN_PROGRESS)
            assert row["name"] not in trash and row["name"] + IN_PROGRESS not in trash
            assert row.get("state") == "complete", f"{row['name']} listed with state {row.get('state')!r}"
    return complete, leftovers


def test_sigkill_at_random_points_keeps_the_repository_consistent(cli: Cli, big_source: Source, tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.toml")
    repo = tmp_path / "repo"
    rng = random.Random(SEED)
    # Kills land anywhere from start-up to a little past the end of a run.
    # How long a run takes depends on the machine's load and on what is left
    # to copy, so the window follows the runs that were not killed.
    span = 1.0
    verified: set[str] = set()
    outcomes = []
    for iteration in range(12):
        delay = rng.uniform(0.0, span)
        with open(tmp_path / f"events-{iteration}.jsonl", "wb") as out, open(tmp_path / f"stderr-{iteration}", "wb") as err:
            started = time.monotonic()
            process = cli.popen("backup", "--no-sudo", "--json", "--config", config, big_source.path, repo, stdout=out, stderr=err)
            try:
                process.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                pass
            ran = time.monotonic() - started
            kill_tree(process)
        stderr = (tmp_path / f"stderr-{iteration}").read_text()
        assert process.returncode in (-signal.SIGKILL, EXIT_OK), f"run {iteration}: status {process.returncode}: {stderr}"
        if process.returncode == EXIT_OK:
            span = max(0.2, 1.1 * ran)
        evs = events((tmp_path / f"events-{iteration}.jsonl").read_text())
        assert not [e for e in evs if e["event"] == "error"], f"run {iteration} failed before the kill: {evs[-1]}"
        reached = [e["step"] for e in evs if e["event"] == "step" and e["state"] == "start"]
        outcomes.append((round(delay, 3), process.returncode, reached[-1] if reached else None))
        check_invariants(cli, config, repo, big_source, verified)
    # The kills must have hit mid-run, not only before start-up or after the end.
    assert sum(1 for _, status, _ in outcomes if status == -signal.SIGKILL) >= 6, outcomes
    assert any(last == "transfer" for _, status, last in outcomes if status == -signal.SIGKILL), outcomes

    result = cli.run("backup", "--no-sudo", "--json", "--config", config, big_source.path, repo)
    assert result.returncode == EXIT_OK, result.stderr
    made = the_event(events(result.stdout), "complete")["snapshot"]
    complete, leftovers = check_invariants(cli, config, repo, big_source, set())  # every snapshot again
    assert leftovers == [], f"leftovers not removed: {leftovers}"
    assert made in complete and os.readlink(repo / "latest") == f"snapshots/{made}"
    assert tree(repo / "snapshots" / made) == big_source.tree
    assert not (repo / ".trash").exists() or os.listdir(repo / ".trash") == []
    print("kills (delay s, status, last step started):", outcomes)


def test_resume_after_a_kill_mid_transfer_links_what_was_copied(cli: Cli, big_source: Source, tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.toml")
    repo = tmp_path / "repo"
    with open(tmp_path / "events-1.jsonl", "wb") as out:
        process = cli.popen("backup", "--no-sudo", "--json", "--config", config, big_source.path, repo, stdout=out, stderr=subprocess.DEVNULL)
        try:
            def copied() -> dict[str, int] | None:
                _complete, leftovers = snapshot_entries(repo)
                if len(leftovers) != 1:
                    return None
                files = finished_files(repo / "snapshots" / (leftovers[0] + IN_PROGRESS))
                return files if any(rel.startswith("big/") for rel in files) else None

            wait_for(copied, 30, "rsync to finish a large file", process)
        finally:
            kill_tree(process)
    assert process.returncode == -signal.SIGKILL
    complete, leftovers = snapshot_entries(repo)
    assert complete == [] and len(leftovers) == 1
    leftover = repo / "snapshots" / (leftovers[0] + IN_PROGRESS)
    copied_before = finished_files(leftover)  # after the kill: nothing moves any more
    assert copied_before and len(copied_before) < len([k for k in big_source.tree.values() if k[0] == "file"])
    copied_bytes = sum(os.lstat(leftover / rel).st_size for rel in copied_before)

    result = cli.run("backup", "--no-sudo", "--json", "--config", config, big_source.path, repo)
    assert result.returncode == EXIT_OK, result.stderr
    evs = events(result.stdout)
    assert step_event(evs, "transfer", "start")["resumed_from"] == leftovers
    done = the_event(evs, "complete")
    stats = done["statistics"]
    assert stats["total_size"] == big_source.total_size
    assert stats["transferred_size"] <= big_source.total_size - copied_bytes, (
        f"resumed transfer copied {stats['transferred_size']} bytes, {copied_bytes} of {big_source.total_size} were already there"
    )
    snapshot = repo / "snapshots" / done["snapshot"]
    after = inodes(snapshot)
    relinked = [rel for rel, ino in copied_before.items() if after.get(rel) == ino]
    assert sorted(relinked) == sorted(copied_before), "files already in the leftover were copied again, not hard-linked"
    assert tree(snapshot) == big_source.tree
    assert snapshot_entries(repo) == ([done["snapshot"]], []), "the leftover was not removed"
    metadata = json.loads((repo / "metadata" / f"{done['snapshot']}.json").read_text())
    assert metadata["resumed_from"] == leftovers and metadata["statistics"]["transferred_size"] == stats["transferred_size"]


def test_sigterm_mid_transfer_cleans_up_and_keeps_the_leftover(cli: Cli, big_source: Source, tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.toml")
    repo = tmp_path / "repo"
    with open(tmp_path / "events.jsonl", "wb") as out, open(tmp_path / "stderr", "wb") as err:
        process = cli.popen("backup", "--no-sudo", "--json", "--config", config, big_source.path, repo, stdout=out, stderr=err)
        try:
            wait_for(
                lambda: snapshot_entries(repo)[1] and finished_files(repo / "snapshots" / (snapshot_entries(repo)[1][0] + IN_PROGRESS)),
                30, "rsync to copy a file", process,
            )
            below = identify(descendants(process.pid))
            assert below, "no rsync under the CLI"
            os.kill(process.pid, signal.SIGTERM)  # the CLI only: it must stop rsync itself
            process.wait(timeout=30)
            # When the CLI exits (and its lock goes), nothing it started may
            # still write into the repository: rsync, its receiver and its
            # generator are gone or being killed.
            lingering = [proc for proc in below if running(proc)]
            kill_procs(below)
            assert lingering == [], f"the CLI exited on SIGTERM and left {lingering} of {below} running"
        finally:
            kill_tree(process)
    stderr = (tmp_path / "stderr").read_text()
    assert process.returncode == 128 + signal.SIGTERM, stderr
    evs = events((tmp_path / "events.jsonl").read_text())
    last = evs[-1]
    assert last["event"] == "error" and last["step"] == "transfer", last
    assert last["exit_code"] == 143 and last["snapshots_untouched"] is True and "SIGTERM" in last["message"]
    assert "SIGTERM" in error_lines(stderr)[-1]
    complete, leftovers = snapshot_entries(repo)
    assert complete == [] and len(leftovers) == 1, "the unfinished transfer must be kept"
    # Both locks are free at once.
    lock.probe(str(repo / ".lock"))
    lock.probe(str(cli.machine_lock))
    started = time.monotonic()
    result = cli.run("backup", "--no-sudo", "--json", "--config", config, big_source.path, repo)
    assert result.returncode == EXIT_OK, result.stderr
    assert time.monotonic() - started < 30
    evs = events(result.stdout)
    assert step_event(evs, "transfer", "start")["resumed_from"] == leftovers
    made = the_event(evs, "complete")["snapshot"]
    assert snapshot_entries(repo) == ([made], [])
    assert tree(repo / "snapshots" / made) == big_source.tree


def test_a_run_killed_while_creating_the_repository_does_not_block_the_next(cli: Cli, tmp_path: Path) -> None:
    source = small_source(tmp_path / "source")
    repo = tmp_path / "repo"
    # What Repository.create leaves when a kill lands before the marker is
    # renamed into place (it writes the marker before anything else).
    repo.mkdir()
    (repo / ".backup-agent.toml.tmp-4242").write_text("# backup-agent repository marker: do not edit\n")
    result = cli.run("backup", "--no-sudo", "-q", "--config", write_config(tmp_path / "c.toml"), source.path, repo)
    assert result.returncode == EXIT_OK, result.stderr
    made = os.readlink(repo / "latest").split("/")[-1]
    assert tree(repo / "snapshots" / made) == source.tree


def test_a_discarded_leftover_leaves_no_metadata_behind(cli: Cli, tmp_path: Path) -> None:
    source = small_source(tmp_path / "source")
    repo = tmp_path / "repo"
    config = write_config(tmp_path / "c.toml")
    # --backup alone stops where a kill after the transfer step would: the
    # transfer finished, its metadata written, the snapshot not completed.
    result = cli.run("backup", "-b", "--no-sudo", "-q", "--config", config, source.path, repo)
    assert result.returncode == EXIT_OK, result.stderr
    (leftover,) = snapshot_entries(repo)[1]
    assert (repo / "metadata" / f"{leftover}.json").exists()
    made = backup_ok(cli, config, source.path, repo)
    assert snapshot_entries(repo) == ([made], [])
    assert sorted(os.listdir(repo / "metadata")) == [f"{made}.json", f"{made}.manifest"]


def test_a_half_emptied_trash_does_not_wedge_later_runs(cli: Cli, tmp_path: Path) -> None:
    source = small_source(tmp_path / "source")
    repo = tmp_path / "repo"
    config = write_config(tmp_path / "c.toml")
    backup_ok(cli, config, source.path, repo)
    # What the kill loop above produced: a run completed, was killed while rm
    # emptied .trash/NAME.in-progress, and a run started in that same second
    # reserved NAME again and was killed mid-transfer.
    name = time.strftime("%Y-%m-%dT%H-%M-%S+0000", time.gmtime(time.time() - 5))
    (repo / ".trash" / f"{name}.in-progress" / "half").mkdir(parents=True)
    (repo / ".trash" / f"{name}.in-progress" / "half" / "deleted-next").write_text("x\n")
    shutil.copytree(source.path, repo / "snapshots" / f"{name}.in-progress", symlinks=True)
    result = cli.run("backup", "--no-sudo", "--json", "--config", config, source.path, repo)
    assert result.returncode == EXIT_OK, result.stderr
    made = the_event(events(result.stdout), "complete")["snapshot"]
    assert snapshot_entries(repo)[1] == []
    assert not (repo / ".trash").exists() or os.listdir(repo / ".trash") == []
    assert tree(repo / "snapshots" / made) == source.tree


def test_emptying_the_trash_stopped_after_success_is_finished_by_the_next_run(
    cli: Cli, tmp_path: Path, trusted_dir: Path
) -> None:
    """Rotation's files are removed after the complete event; a stop then costs nothing and the next run finishes.

    The first run's rm is a stand-in at the process boundary (it says it
    started, then waits like an rm deleting a large tree), so the stop lands
    in the emptying for certain; the next run uses the real rm.
    """
    source = small_source(tmp_path / "source")
    repo = tmp_path / "repo"
    old = "2020-01-01T00-00-00+0000"
    real = tmp_path / "real.toml"
    real.write_text('[backup]\nionice = "none"\nnice = 0\n[rotation]\nhourly = 1\n')
    backup_ok(cli, real, source.path, repo)
    shutil.copytree(source.path, repo / "snapshots" / old, symlinks=True)
    started = tmp_path / "rm-started"
    slow_rm = trusted_dir / "rm"
    slow_rm.write_text(f"#!/bin/sh\n: > {started}\nexec sleep 60\n")
    slow_rm.chmod(0o755)
    slow = tmp_path / "slow.toml"
    slow.write_text(real.read_text() + f"[commands]\nrm = {json.dumps(str(slow_rm))}\n")
    with open(tmp_path / "events.jsonl", "wb") as out:
        process = cli.popen("backup", "--no-sudo", "--json", "--config", slow, source.path, repo, stdout=out, stderr=subprocess.DEVNULL)
        below: list[Proc] = []
        try:
            wait_for(started.exists, 30, "the rm of the empty-trash step to start", process)
            below = identify(descendants(process.pid))
            os.kill(process.pid, signal.SIGTERM)  # as the agent's Stop does
            assert process.wait(timeout=30) == EXIT_OK  # the backup itself had succeeded
            wait_gone(below)  # the stand-in rm was stopped with it
        finally:
            kill_tree(process)
            kill_procs(below)
    evs = events((tmp_path / "events.jsonl").read_text())
    kinds = [(e["event"], e.get("step"), e.get("state")) for e in evs]
    done = the_event(evs, "complete")
    assert old in done["deleted"]
    at = kinds.index(("complete", None, None))
    assert kinds[at + 1] == ("step", "empty-trash", "start")
    assert ("step", "empty-trash", "failed") in kinds[at:] and ("step", "empty-trash", "done") not in kinds
    warned = [e for e in evs[at:] if e["event"] == "warning"]
    assert len(warned) == 1 and "next backup" in warned[0]["message"] and "SIGTERM" in warned[0]["message"]
    assert not [e for e in evs if e["event"] == "error"]
    # Out of the listing, its files still there, and never listed again.
    (left,) = os.listdir(repo / ".trash")
    assert left.startswith(old + ".") and (repo / ".trash" / left / "f00.txt").exists()
    assert old not in [row["name"] for row in list_json(cli, real, repo)]

    result = cli.run("backup", "--no-sudo", "--json", "--config", real, source.path, repo)
    assert result.returncode == EXIT_OK, result.stderr
    assert left in step_event(events(result.stdout), "empty-trash", "done")["emptied"]
    assert os.listdir(repo / ".trash") == []


# -- 2. a killed run never blocks the next -------------------------------------


@pytest.mark.parametrize("scope", ["everything", "cli-only"])
def test_a_killed_run_never_blocks_the_next(cli: Cli, tmp_path: Path, trusted_dir: Path, scope: str) -> None:
    source = small_source(tmp_path / "source")
    repo = tmp_path / "repo"
    fake = make_fake_rsync(tmp_path, exit=0, sleep=60)
    slow = write_config(tmp_path / "slow.toml", rsync=install_stand_in(trusted_dir))
    real = write_config(tmp_path / "real.toml")
    with open(tmp_path / "events.jsonl", "wb") as out:
        process = cli.popen("backup", "--no-sudo", "--json", "--config", slow, source.path, repo, stdout=out, stderr=subprocess.DEVNULL)
        below: list[Proc] = []
        try:
            wait_for(lambda: Path(str(fake) + ".ready").exists(), 30, "the stand-in rsync to copy", process)
            # The run holds both locks, and says who it is.
            for held in (repo / ".lock", cli.machine_lock):
                with pytest.raises(BusyError, match=f"pid {process.pid}"):
                    lock.probe(str(held))
            below = identify(descendants(process.pid))
            if scope == "everything":
                kill_tree(process)  # a crash or power cut: everything dies
            else:
                os.kill(process.pid, signal.SIGKILL)  # only the CLI: its rsync lives on
                process.wait(timeout=30)
                assert any(running(p) for p in below), "the stand-in rsync should have outlived the CLI"
            for held in (repo / ".lock", cli.machine_lock):
                lock.probe(str(held))
            started = time.monotonic()
            result = cli.run("backup", "--no-sudo", "--json", "--config", real, source.path, repo)
            assert result.returncode == EXIT_OK, result.stderr
            assert time.monotonic() - started < 20
        finally:
            kill_tree(process)
            kill_procs(below)
    made = the_event(events(result.stdout), "complete")["snapshot"]
    assert snapshot_entries(repo) == ([made], [])
    assert tree(repo / "snapshots" / made) == source.tree


# -- 3. one cycle at a time ----------------------------------------------------


@pytest.mark.parametrize("which", ["repository", "machine"])
def test_one_cycle_at_a_time(cli: Cli, tmp_path: Path, which: str) -> None:
    source = small_source(tmp_path / "source")
    repo = tmp_path / "repo"
    config = write_config(tmp_path / "config.toml")
    backup_ok(cli, config, source.path, repo)
    (source.path / "new.txt").write_text("would be backed up\n")
    held = repo / ".lock" if which == "repository" else cli.machine_lock
    with lock.hold(str(held), {"pid": 12345, "started": "2026-11-22T13:00:00+01:00"}):
        before = fingerprint(repo)
        started = time.monotonic()
        result = cli.run("backup", "--no-sudo", "--json", "--config", config, source.path, repo)
        elapsed = time.monotonic() - started
        after = fingerprint(repo)
    assert result.returncode == EXIT_BUSY, result.stderr
    assert elapsed < 10, f"the second run waited {elapsed:.1f} s instead of giving up at once"
    lines = error_lines(result.stderr)
    assert len(lines) == 1, f"expected one line, got {lines}"
    assert "pid 12345" in lines[0] and "2026-11-22T13:00:00+01:00" in lines[0]
    last = events(result.stdout)[-1]
    assert last["event"] == "error" and last["step"] == "lock" and last["exit_code"] == EXIT_BUSY
    assert "pid 12345" in last["message"]
    assert after == before, "the refused run wrote into the repository"


# -- 4. --dry-run writes nothing anywhere --------------------------------------


def test_dry_run_on_a_new_destination_creates_nothing(cli: Cli, tmp_path: Path) -> None:
    source = small_source(tmp_path / "source")
    config = write_config(tmp_path / "config.toml")
    destination = tmp_path / "new" / "repo"
    source_before = fingerprint(source.path)
    lock_before = fingerprint(cli.machine_lock)
    result = cli.run("backup", "-n", "--no-sudo", "--config", config, source.path, destination)
    assert result.returncode == EXIT_OK, result.stderr
    assert not (tmp_path / "new").exists(), "the dry run created the destination"
    assert fingerprint(source.path) == source_before
    assert fingerprint(cli.machine_lock) == lock_before
    assert lock_before is None and os.listdir(cli.run_dir) == []
    assert "dry run: would make snapshot" in result.stdout
    assert f"{len(source.tree) + 1} files" in result.stdout  # rsync counts the top directory too
    assert f"would create the repository {destination}" in result.stderr

    result = cli.run("backup", "-n", "--no-sudo", "--json", "--config", config, source.path, destination)
    assert result.returncode == EXIT_OK, result.stderr
    done = the_event(events(result.stdout), "complete")
    assert done["dry_run"] is True and done["statistics"]["transferred_files"] == len(
        [k for k in source.tree.values() if k[0] == "file"]
    )
    assert not (tmp_path / "new").exists()


def test_dry_run_on_an_existing_repository_changes_nothing(cli: Cli, tmp_path: Path) -> None:
    source = small_source(tmp_path / "source")
    repo = tmp_path / "repo"
    config = write_config(tmp_path / "config.toml")
    first = backup_ok(cli, config, source.path, repo)
    (source.path / "f01.txt").write_text("changed once\n")
    second = backup_ok(cli, config, source.path, repo)
    assert snapshot_entries(repo) == (sorted([first, second]), [])
    # Changes a real run would pick up: content, a new file, a deletion, a mode.
    (source.path / "f02.txt").write_text("changed twice\n")
    (source.path / "sub" / "added.txt").write_text("added\n")
    (source.path / "f04.txt").unlink()
    os.chmod(source.path / "f06.txt", 0o600)

    repo_before, source_before = fingerprint(repo), fingerprint(source.path)
    lock_before = fingerprint(cli.machine_lock)
    plain = cli.run("backup", "--dry-run", "--no-sudo", "--config", config, source.path, repo)
    as_json = cli.run("backup", "-n", "--no-sudo", "--json", "--config", config, source.path, repo)
    assert fingerprint(repo) == repo_before, "the dry run wrote into the repository"
    assert fingerprint(source.path) == source_before
    assert fingerprint(cli.machine_lock) == lock_before

    # (The exit status is test_dry_run_of_an_incremental_backup_is_not_partial's.)
    assert plain.stdout.startswith("dry run: would make snapshot"), plain.stdout + plain.stderr
    assert "would delete" in plain.stdout
    evs = events(as_json.stdout)
    assert step_event(evs, "transfer", "start")["link_dest"] == second
    done = the_event(evs, "complete")
    assert done["dry_run"] is True and done["deleted"] == []
    assert done["statistics"]["transferred_files"] >= 2  # f02 and added.txt at least
    assert done["snapshot"] not in os.listdir(repo / "snapshots")


def test_dry_run_of_an_incremental_backup_is_not_partial(cli: Cli, tmp_path: Path) -> None:
    source = small_source(tmp_path / "source")
    repo = tmp_path / "repo"
    config = write_config(tmp_path / "config.toml")
    backup_ok(cli, config, source.path, repo)
    (source.path / "sub" / "added.txt").write_text("added\n")
    result = cli.run("backup", "-n", "--no-sudo", "--json", "--config", config, source.path, repo)
    done = the_event(events(result.stdout), "complete")
    assert (result.returncode, done["partial"]) == (EXIT_OK, False), result.stderr


def test_the_first_snapshot_counts_bytes_and_the_next_counts_files(cli: Cli, tmp_path: Path) -> None:
    """The progress events' percent, with the real rsync: what each measures shows at the end.

    A hard link is never sent, so a first snapshot counting bytes ends below
    100%; a next one with nothing changed sends nothing and, counting files,
    ends at 100%.
    """
    source = small_source(tmp_path / "source")
    (source.path / "big.bin").write_bytes(os.urandom(100_000))
    os.link(source.path / "big.bin", source.path / "big-link")
    repo = tmp_path / "repo"
    config = write_config(tmp_path / "config.toml")
    for run in ("first", "next"):
        result = cli.run("backup", "--no-sudo", "--json", "--config", config, source.path, repo)
        assert result.returncode == EXIT_OK, result.stderr
        evs = events(result.stdout)
        last = [e for e in evs if e["event"] == "progress"][-1]
        statistics = the_event(evs, "complete")["statistics"]
        if run == "first":
            assert last["bytes"] == statistics["transferred_size"] <= statistics["total_size"] - 100_000
            assert last["percent"] == 100 * last["bytes"] // statistics["total_size"] == 50
        else:
            assert (last["bytes"], last["percent"]) == (0, 100)


def test_rotate_dry_run_deletes_nothing(cli: Cli, tmp_path: Path) -> None:
    source = small_source(tmp_path / "source")
    repo = tmp_path / "repo"
    config = write_config(tmp_path / "config.toml")
    newest = backup_ok(cli, config, source.path, repo)
    old = ["2020-01-01T00-00-00+0000", "2020-02-01T00-00-00+0000", "2021-06-01T12-00-00+0000"]
    for name in old:
        shutil.copytree(repo / "snapshots" / newest, repo / "snapshots" / name, symlinks=True)
        (repo / "metadata" / f"{name}.json").write_text(json.dumps({"format": 1, "name": name, "state": "complete"}))
    before = fingerprint(repo)
    result = cli.run("rotate", "--dry-run", "--json", "--hourly", "1", "--config", config, repo)
    assert result.returncode == EXIT_OK, result.stderr
    plan = json.loads(result.stdout)
    assert sorted(plan["delete"]) == old and newest in plan["keep"]
    assert fingerprint(repo) == before, "rotate --dry-run changed the repository"
    plain = cli.run("rotate", "-n", "--hourly", "1", "--config", config, repo)
    assert plain.returncode == EXIT_OK and plain.stdout.count("would delete") == len(old), plain.stdout
    assert fingerprint(repo) == before
    # The same plan without --dry-run really deletes: the scheme was not a no-op.
    real = cli.run("rotate", "--json", "--hourly", "1", "--config", config, repo)
    assert real.returncode == EXIT_OK, real.stderr
    assert snapshot_entries(repo) == ([newest], [])
    assert sorted(os.listdir(repo / "metadata")) == [f"{newest}.json", f"{newest}.manifest"]


# -- 5. the rsync exit table through the whole cycle ---------------------------

FAKE_CASES: dict[str, dict[str, Any]] = {
    "vanished-24": {
        "exit": 24,
        "stderr": [
            'file has vanished: "/home/u/.cache/gone.tmp"',
            "rsync warning: some files vanished before they could be transferred (code 24) at main.c(1338) [sender=3.5.0]",
        ],
    },
    "partial-23": {
        "exit": 23,
        "stderr": [
            'rsync: [sender] send_files failed to open "/etc/shadow-a": Permission denied (13)',
            'rsync: [sender] send_files failed to open "/etc/shadow-b": Permission denied (13)',
            "rsync error: some files/attrs were not transferred (see previous errors) (code 23) at main.c(1338) [sender=3.5.0]",
        ],
    },
    "protocol-12": {
        "exit": 12,
        "stderr": [
            "rsync: connection unexpectedly closed (0 bytes received so far) [receiver]",
            "rsync error: error in rsync protocol data stream (code 12) at io.c(232) [receiver=3.5.0]",
        ],
    },
    "sigkill": {"exit": "SIGKILL", "stderr": ["rsync: about to be killed"]},
}


@pytest.mark.parametrize("case", list(FAKE_CASES))
def test_rsync_exit_status_through_the_cycle(cli: Cli, tmp_path: Path, trusted_dir: Path, case: str) -> None:
    behaviour = FAKE_CASES[case]
    source = small_source(tmp_path / "source")
    repo = tmp_path / "repo"
    real = write_config(tmp_path / "real.toml")
    base = backup_ok(cli, real, source.path, repo)
    base_dir = repo / "snapshots" / base
    base_tree, base_inodes = tree(base_dir), inodes(base_dir)
    base_metadata = (repo / "metadata" / f"{base}.json").read_bytes()
    (source.path / "f03.txt").write_text("changed for the second snapshot\n")
    source = dataclasses.replace(source, tree=tree(source.path))

    fake = make_fake_rsync(tmp_path, **behaviour)
    config = write_config(tmp_path / "fake.toml", rsync=install_stand_in(trusted_dir))
    result = cli.run("backup", "--no-sudo", "-q", "--json", "--config", config, source.path, repo)
    evs = events(result.stdout)
    assert Path(str(fake) + ".argv").exists(), "the stand-in rsync was not run"
    complete, leftovers = snapshot_entries(repo)

    # Earlier snapshots byte-for-byte intact, whatever happened.
    assert tree(base_dir) == base_tree and inodes(base_dir) == base_inodes
    assert (repo / "metadata" / f"{base}.json").read_bytes() == base_metadata

    if case in ("vanished-24", "partial-23"):
        expected = EXIT_OK if case == "vanished-24" else EXIT_PARTIAL
        assert result.returncode == expected, result.stderr
        done = the_event(evs, "complete")
        made = done["snapshot"]
        assert complete == sorted([base, made]) and leftovers == []
        assert os.readlink(repo / "latest") == f"snapshots/{made}"
        assert tree(repo / "snapshots" / made) == source.tree
        metadata = json.loads((repo / "metadata" / f"{made}.json").read_text())
        assert metadata["state"] == "complete"
        warnings = [e for e in evs if e["event"] == "warning" and e.get("code") == behaviour["exit"]]
        assert len(warnings) == 1 and warnings[0]["step"] == "transfer", evs
        if case == "vanished-24":
            assert done["partial"] is False and metadata["partial"] is False and metadata["vanished"] == 1
        else:
            assert done["partial"] is True and metadata["partial"] is True
            per_file = behaviour["stderr"][:2]
            assert metadata["errors"] == {"count": 2, "first": per_file}
            assert warnings[0]["errors"] == per_file
            # Rotation never deletes a partial snapshot, even when it is no
            # longer the newest and the scheme keeps only one.
            newest = backup_ok(cli, real, source.path, repo)
            rotated = cli.run("rotate", "--json", "--hourly", "1", "--prefer-recent", "--config", real, repo)
            assert rotated.returncode == EXIT_OK, rotated.stderr
            plan = json.loads(rotated.stdout)
            assert plan["keep"][made] == ["partial"] and plan["delete"] == [base], plan
            assert snapshot_entries(repo) == (sorted([made, newest]), [])
        return

    # A failure: no new snapshot, the transfer kept, one clear line.
    assert result.returncode == EXIT_STEP_FAILED, result.stderr
    assert complete == [base] and len(leftovers) == 1, (complete, leftovers)
    assert os.readlink(repo / "latest") == f"snapshots/{base}"
    assert finished_files(repo / "snapshots" / (leftovers[0] + IN_PROGRESS)), "the partial transfer was not kept"
    lines = error_lines(result.stderr)
    assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    line = lines[0]
    assert line.startswith("backup-agent: transfer failed:"), line
    assert behaviour["stderr"][-1] in line, "the message must quote rsync's last error line"
    assert "earlier snapshots are untouched" in line
    if case == "sigkill":
        assert "killed by SIGKILL" in line
    last = evs[-1]
    assert last["event"] == "error" and last["step"] == "transfer"
    assert last["exit_code"] == EXIT_STEP_FAILED and last["snapshots_untouched"] is True
    assert not [e for e in evs if e["event"] == "complete"]
    # ...and the next run, with a working rsync, resumes and completes.
    made = backup_ok(cli, real, source.path, repo)
    assert snapshot_entries(repo) == (sorted([base, made]), [])
    assert tree(repo / "snapshots" / made) == source.tree


# -- 6. refusals, nothing touched ----------------------------------------------


def test_refuses_a_foreign_destination(cli: Cli, tmp_path: Path) -> None:
    source = small_source(tmp_path / "source")
    foreign = tmp_path / "photos"
    (foreign / "2024").mkdir(parents=True)
    (foreign / "2024" / "beach.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (foreign / "notes.txt").write_text("mine\n")
    before = fingerprint(foreign)
    result = cli.run("backup", "--no-sudo", "--config", write_config(tmp_path / "c.toml"), source.path, foreign)
    assert result.returncode == EXIT_REPOSITORY, result.stderr
    line = error_lines(result.stderr)[-1]
    assert "not empty" in line and "not a backup-agent repository" in line
    assert "give an empty or new directory" in line, "the message must say how to proceed"
    assert fingerprint(foreign) == before


def test_refuses_swapped_source_and_destination(cli: Cli, tmp_path: Path) -> None:
    source = small_source(tmp_path / "source")
    repo = tmp_path / "repo"
    config = write_config(tmp_path / "c.toml")
    backup_ok(cli, config, source.path, repo)
    repo_before, source_before = fingerprint(repo), fingerprint(source.path)
    result = cli.run("backup", "--no-sudo", "--config", config, repo, source.path)
    assert result.returncode == EXIT_USAGE, result.stderr
    assert "swap" in error_lines(result.stderr)[-1]
    assert fingerprint(repo) == repo_before and fingerprint(source.path) == source_before


def test_refuses_a_missing_source(cli: Cli, tmp_path: Path) -> None:
    destination = tmp_path / "repo"
    result = cli.run("backup", "--no-sudo", "--config", write_config(tmp_path / "c.toml"), tmp_path / "nowhere", destination)
    assert result.returncode == EXIT_USAGE, result.stderr
    assert str(tmp_path / "nowhere") in error_lines(result.stderr)[-1]
    assert not destination.exists()


def test_the_tunnel_option_needs_an_rsync_daemon_destination(cli: Cli, tmp_path: Path) -> None:
    """--tunnel reaches an rsync daemon (tests/test_daemon_repository.py); with a directory it is a usage error."""
    source = small_source(tmp_path / "source")
    destination = tmp_path / "repo"
    result = cli.run("backup", "--no-sudo", "-t", "host", "--config", write_config(tmp_path / "c.toml"), source.path, destination)
    assert result.returncode == EXIT_USAGE, result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "--tunnel" in lines[0] and "rsync://" in lines[0]
    assert not destination.exists() and os.listdir(cli.run_dir) == []


@pytest.mark.parametrize("option", [["-m", "/mnt"], ["-c", "name"], ["--disk", "usb"]])
def test_disk_options_without_a_configured_disk_are_refused(cli: Cli, tmp_path: Path, option: list[str]) -> None:
    """The disk lifecycle exists now (exit 8 was "not built yet"): with no [[disk]] it is a usage error."""
    source = small_source(tmp_path / "source")
    destination = tmp_path / "repo"
    result = cli.run("backup", "--no-sudo", *option, "--config", write_config(tmp_path / "c.toml"), source.path, destination)
    assert result.returncode == EXIT_USAGE, result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and option[0] in lines[0] and "[[disk]]" in lines[0], lines
    assert not destination.exists() and os.listdir(cli.run_dir) == []


def test_refuses_to_run_without_root_unless_no_sudo(cli: Cli, tmp_path: Path, readable_code: ReadableCode) -> None:
    """As non-root the CLI runs as us; as root it runs as nobody (setuid in the child), from a copy nobody can read."""
    source = small_source(tmp_path / "source")
    destination = tmp_path / "repo"
    drop: dict[str, Any] = {}
    if os.geteuid() == 0:
        drop = {"user": 65534, "group": 65534, "extra_groups": []}
    argv = readable_code.argv("backup", str(source.path), str(destination))
    result = subprocess.run(
        argv, cwd=readable_code.directory, env=readable_code.env(cli.env()), capture_output=True, text=True, timeout=60, **drop
    )
    assert result.returncode == EXIT_USAGE, result.stderr
    line = error_lines(result.stderr)[-1]
    assert "needs root" in line and "--no-sudo" in line
    assert not destination.exists()


# -- 7. the shrink guard -------------------------------------------------------


def test_a_shrunken_source_is_kept_flagged_and_not_rotated(cli: Cli, tmp_path: Path) -> None:
    source = small_source(tmp_path / "source", files=40)
    repo = tmp_path / "repo"
    # This scheme keeps one snapshot an hour, the newest: after the second
    # backup it would delete the first.
    config = write_config(tmp_path / "c.toml", rotation={"hourly": 1, "prefer_recent": True})
    first = backup_ok(cli, config, source.path, repo)
    first_tree = tree(repo / "snapshots" / first)
    victims = sorted(p for p in source.path.rglob("*.txt"))[: 30]
    for path in victims:
        path.unlink()
    result = cli.run("backup", "--no-sudo", "--json", "--config", config, source.path, repo)
    assert result.returncode == EXIT_OK, result.stderr
    evs = events(result.stdout)
    done = the_event(evs, "complete")
    second = done["snapshot"]
    assert done["flagged"] and "dropped" in done["flagged"]
    assert snapshot_entries(repo) == (sorted([first, second]), [])
    assert tree(repo / "snapshots" / second) == tree(source.path)
    assert tree(repo / "snapshots" / first) == first_tree
    metadata = json.loads((repo / "metadata" / f"{second}.json").read_text())
    assert metadata["state"] == "complete" and metadata["flagged"] == done["flagged"]
    assert any(e["event"] == "warning" and "dropped" in e["message"] for e in evs)
    assert step_event(evs, "rotate", "done").get("skipped") == "flagged"
    assert done["deleted"] == []
    # With the same scheme, the next (unflagged) backup does rotate: the
    # first snapshot goes, the flagged one stays.
    (source.path / "one-more.txt").write_text("x\n")
    result = cli.run("backup", "--no-sudo", "--json", "--config", config, source.path, repo)
    assert result.returncode == EXIT_OK, result.stderr
    third = the_event(events(result.stdout), "complete")
    assert third["flagged"] is None and third["deleted"] == [first]
    assert snapshot_entries(repo) == (sorted([second, third["snapshot"]]), [])


# -- 8. the snapshot just made survives its own rotation -----------------------


def test_the_new_snapshot_survives_its_rotation_after_the_clock_went_back(cli: Cli, tmp_path: Path) -> None:
    source = small_source(tmp_path / "source")
    repo = tmp_path / "repo"
    config = write_config(tmp_path / "config.toml")
    first = backup_ok(cli, config, source.path, repo)
    # A snapshot made while the clock ran two hours ahead (later corrected).
    ahead = time.strftime("%Y-%m-%dT%H-%M-%S+0000", time.gmtime(time.time() + 7200))
    shutil.copytree(repo / "snapshots" / first, repo / "snapshots" / ahead, symlinks=True)
    metadata = json.loads((repo / "metadata" / f"{first}.json").read_text())
    (repo / "metadata" / f"{ahead}.json").write_text(json.dumps({**metadata, "name": ahead}))
    (source.path / "f01.txt").write_text("changed\n")
    result = cli.run("backup", "--no-sudo", "--json", "--config", config, source.path, repo)
    assert result.returncode == EXIT_OK, result.stderr
    made = the_event(events(result.stdout), "complete")
    assert made["snapshot"] not in made["deleted"]
    assert os.readlink(repo / "latest") == f"snapshots/{made['snapshot']}"
    assert tree(repo / "snapshots" / made["snapshot"]) == tree(source.path)


# -- at most one unfinished transfer ----------------------------------------------------------------


def test_two_failed_runs_leave_one_unfinished_transfer_holding_what_both_copied(
    cli: Cli, tmp_path: Path, trusted_dir: Path
) -> None:
    source = small_source(tmp_path / "source")
    repo = tmp_path / "repo"
    base = backup_ok(cli, write_config(tmp_path / "real.toml"), source.path, repo)
    base_dir = repo / "snapshots" / base
    base_tree, base_inodes = tree(base_dir), inodes(base_dir)
    (source.path / "f03.txt").write_text("changed\n")
    make_fake_rsync(tmp_path, **FAKE_CASES["protocol-12"])  # copies, then fails
    fake = write_config(tmp_path / "fake.toml", rsync=install_stand_in(trusted_dir))

    first = cli.run("backup", "--no-sudo", "-q", "--config", fake, source.path, repo)
    assert first.returncode != EXIT_OK
    _complete, leftovers = snapshot_entries(repo)
    assert len(leftovers) == 1
    older = repo / "snapshots" / (leftovers[0] + IN_PROGRESS)
    (older / "only-in-the-first").write_text("copied by the first run only\n")  # what the second did not reach
    kept_inode = os.lstat(older / "only-in-the-first").st_ino
    time.sleep(1.1)  # the next name is a second later

    second = cli.run("backup", "--no-sudo", "-q", "--json", "--config", fake, source.path, repo)
    assert second.returncode != EXIT_OK
    assert step_event(events(second.stdout), "transfer", "start")["resumed_from"] == leftovers
    _complete, now = snapshot_entries(repo)
    assert len(now) == 1 and now != leftovers, "the older unfinished transfer is folded into the newer, never kept beside it"
    newer = repo / "snapshots" / (now[0] + IN_PROGRESS)
    assert os.lstat(newer / "only-in-the-first").st_ino == kept_inode  # linked, not copied
    assert (newer / "f03.txt").read_text() == "changed\n"  # the newer run's own copy wins
    assert tree(base_dir) == base_tree and inodes(base_dir) == base_inodes

    # The next good run resumes from it and leaves none; the folded extra is not in the snapshot.
    made = backup_ok(cli, write_config(tmp_path / "real.toml"), source.path, repo)
    assert snapshot_entries(repo) == (sorted([base, made]), [])
    assert not (repo / "snapshots" / made / "only-in-the-first").exists()


def test_a_repository_with_two_unfinished_transfers_is_brought_to_one_and_rotate_can_discard_it(
    cli: Cli, tmp_path: Path
) -> None:
    """Left by an older version: the next run folds the older into the newer before it starts."""
    source = small_source(tmp_path / "source")
    repo = tmp_path / "repo"
    config = write_config(tmp_path / "real.toml")
    base = backup_ok(cli, config, source.path, repo)
    snapshots = repo / "snapshots"
    names = ["2001-01-01T00-00-00+0000", "2001-01-02T00-00-00+0000"]
    for index, name in enumerate(names):
        (snapshots / (name + IN_PROGRESS) / "sub").mkdir(parents=True)
        (snapshots / (name + IN_PROGRESS) / "sub" / f"part{index}").write_text(f"part {index}\n")
    listed = cli.run("list", "--config", config, repo)
    assert "unfinished transfer (resumed by the next backup; rotate --discard-unfinished deletes it): " in listed.stdout

    result = cli.run("backup", "--no-sudo", "--json", "--config", config, "--backup", source.path, repo)
    assert result.returncode == EXIT_OK, result.stderr
    assert step_event(events(result.stdout), "transfer", "start")["resumed_from"] == [names[1]]
    _complete, leftovers = snapshot_entries(repo)
    assert len(leftovers) == 1 and leftovers[0] not in names  # a whole transfer: what it resumed from is gone

    dry = cli.run("rotate", "--dry-run", "--discard-unfinished", "--config", config, repo)
    assert dry.returncode == EXIT_OK, dry.stderr
    assert f"would delete {leftovers[0]}{IN_PROGRESS}" in dry.stdout
    assert snapshot_entries(repo)[1] == leftovers
    done = cli.run("rotate", "--discard-unfinished", "--config", config, repo)
    assert done.returncode == EXIT_OK, done.stderr
    assert snapshot_entries(repo) == ([base], [])
    assert not (repo / "metadata" / f"{leftovers[0]}.json").exists()
    assert tree(snapshots / base) == source.tree
