"""The off-site copy (agent.engine.offsite) with real restic, real rclone and real backup cycles.

Real parts: restic (Debian's 0.14) against a local directory repository and
against a REST repository that ``rclone serve restic`` serves on 127.0.0.1
(a port the kernel picked), also with ``--append-only``; the backup cycle
with real rsync; ``unshare`` and bind mounts for the stable path. The one
stand-in is a program that says it is an old restic (a process boundary),
as this machine has only one restic. Each server is stopped by its pid.
Trees are small and pack sizes 4 MiB (restic's least), so each test takes a few seconds.

Time: every restic command opens the repository by deriving its key with
scrypt, at the cost ``restic init`` calibrated (half a second of this
machine's time), and ``init`` itself calibrates for a second or two. restic
0.14 has no option for that cost, so the module initialises one repository
(:func:`template`) with the calibration slowed down, which leaves restic's
cheapest key, and each test that does not test creating a repository gets a
copy of it (``cp -a``) that ``init --offsite`` adopts. The first test
creates its repository with ``init --offsite`` as a user would.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import filecmp
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from agent import cli
from agent.policy.rotation import parse_snapshot_name
from agent.core.errors import EXIT_BUSY, EXIT_DISK_FULL, EXIT_NOT_AVAILABLE, EXIT_OFFSITE, EXIT_OFFSITE_PASSWORD, EXIT_OK

pytestmark = pytest.mark.integration

RESTIC = shutil.which("restic")
RCLONE = shutil.which("rclone")
PASSWORD = "correct horse"


def _need(program: str | None, name: str) -> str:
    if program is None:
        pytest.skip(reason=f"{name} is not installed: run scripts/test, which installs it")
    if os.geteuid() != 0:
        pytest.skip(reason="the off-site copy bind-mounts the snapshot in a private mount namespace, which needs root")
    return program


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class World:
    """A source tree, a local repository, a password and a config with one [[offsite]]."""

    def __init__(self, base: Path, template: Path) -> None:
        self.base = base
        self.template = template
        self.said = ""
        self.source = base / "src"
        self.local = base / "local"
        self.state = base / "state"
        self.password = base / "password"
        self.config = base / "config.toml"
        (self.source / "docs").mkdir(parents=True)
        for index in range(20):
            (self.source / "docs" / f"note{index}.txt").write_text(f"note {index}\n" * (index + 1))
        (self.source / "bin.dat").write_bytes(os.urandom(200_000))
        os.link(self.source / "bin.dat", self.source / "hardlink.dat")
        (self.source / "link").symlink_to("docs/note1.txt")
        os.chmod(self.source / "docs" / "note3.txt", 0o600)
        self.password.write_text(PASSWORD + "\n")
        os.chmod(self.password, 0o600)

    def write_config(self, repository: str, **extra: Any) -> None:
        lines = [
            "[backup]", f'source = "{self.source}"', f'repository = "{self.local}"',
            "[system]", f'state_dir = "{self.state}"',
            "[[offsite]]", 'name = "far"', f'repository = "{repository}"', f'password_file = "{self.password}"',
            'interval = "0"', "pack_size = 4",
        ]
        for key, value in extra.items():
            lines.append(f"{key} = {json.dumps(value) if not isinstance(value, bool) else str(value).lower()}")
        self.config.write_text("\n".join(lines) + "\n")

    def cli(self, *arguments: str) -> int:
        return cli.main(["--config", str(self.config), *arguments])

    def backup(self, capsys: pytest.CaptureFixture[str], *verbose: str) -> tuple[int, list[dict[str, Any]]]:
        """A backup with --json; its events. ``-v`` leaves its log (every command run) in ``self.said``."""
        capsys.readouterr()
        code = self.cli("backup", "--no-sudo", "--json", *verbose)
        captured = capsys.readouterr()
        self.said = captured.err
        lines = [json.loads(line) for line in captured.out.splitlines() if line.startswith("{")]
        return code, lines

    def newest_local(self) -> Path:
        return Path(os.path.realpath(self.local / "latest"))

    def repository(self, where: Path | None = None) -> Path:
        """A fresh copy of the module's restic repository at ``where`` (``base/restic``), for init --offsite to adopt."""
        target = where or self.base / "restic"
        subprocess.run(["cp", "-a", "--", str(self.template), str(target)], check=True)
        return target

    def next_second(self) -> None:
        """Wait until the newest snapshot's second is past, so the next snapshot has a name of its own and of its time.

        A backup takes longer than a second here, so this rarely waits at all.
        """
        newest = parse_snapshot_name(self.newest_local().name)
        assert newest is not None
        while dt.datetime.now(dt.timezone.utc) < newest + dt.timedelta(seconds=1):
            time.sleep(0.02)


def offsite_steps(events: list[dict[str, Any]], name: str = "offsite") -> list[dict[str, Any]]:
    return [event for event in events if event["event"] == "step" and event["step"] == name]


def _init_with_the_cheapest_key(restic: str, repository: Path, password: Path) -> None:
    """``restic init`` paused most of the time (SIGSTOP/SIGCONT to this child only).

    restic 0.14 picks its key's scrypt cost from the wall time of trial runs,
    aiming at half a second (and every later command pays it again to open the
    repository); slowed down twentyfold, the trials keep the cost at its
    least. Nothing else about the repository differs from any other.
    """
    env = {"PATH": "/usr/bin:/bin", "RESTIC_REPOSITORY": str(repository), "RESTIC_PASSWORD_FILE": str(password),
           "RESTIC_CACHE_DIR": str(repository.parent / "cache"), "HOME": str(repository.parent)}
    process = subprocess.Popen([restic, "init"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while process.poll() is None:
            time.sleep(0.005)
            process.send_signal(signal.SIGSTOP)
            time.sleep(0.1)
            process.send_signal(signal.SIGCONT)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)
            process.kill()
        _out, err = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"restic init of the template failed: {err.decode(errors='replace')[-500:]}")


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One restic repository of the password :data:`PASSWORD`, with the cheapest key restic 0.14 makes, copied by each test."""
    program = _need(RESTIC, "restic")
    base = tmp_path_factory.mktemp("restic-template")
    password = base / "password"
    password.write_text(PASSWORD + "\n")
    os.chmod(password, 0o600)
    _init_with_the_cheapest_key(program, base / "repository", password)
    return base / "repository"


@pytest.fixture
def world(trusted_dir: Path, template: Path) -> World:
    _need(RESTIC, "restic")
    return World(trusted_dir, template)


@contextlib.contextmanager
def rclone_rest(directory: Path, *, append_only: bool = False) -> Iterator[str]:
    """``rclone serve restic`` on 127.0.0.1 and a free port; stopped by its pid."""
    program = _need(RCLONE, "rclone")
    port = free_port()
    argv = [program, "serve", "restic", "--addr", f"127.0.0.1:{port}", str(directory)]
    if append_only:
        argv.insert(3, "--append-only")
    with listening(argv, port, within=10):
        yield f"rest:http://127.0.0.1:{port}/"


@contextlib.contextmanager
def listening(argv: list[str], port: int, *, within: float) -> Iterator[None]:
    """A server started from ``argv``, once it accepts on 127.0.0.1:``port``; stopped (then killed) by its pid."""
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + within
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(f"{argv[0]} did not start listening on 127.0.0.1:{port}")
            time.sleep(0.05)
        yield
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_a_directory_repository_gets_the_newest_snapshot_and_gives_it_back_byte_for_byte(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    world.write_config(str(world.base / "restic"))
    assert world.cli("init", "--offsite", "far") == EXIT_OK
    code, events = world.backup(capsys)
    assert code == EXIT_OK
    steps = offsite_steps(events)
    assert [s["state"] for s in steps] == ["start", "done"], steps
    local = world.newest_local()
    assert steps[-1]["snapshot"] == local.name and steps[-1]["files_new"] == 22
    # restic's progress arrives as our progress fields, marked with the step.
    assert any(e["event"] == "progress" and e.get("step") == "offsite" and "files_total" in e for e in events)
    # The complete event (the local result) comes before the off-site step.
    kinds = [(e["event"], e.get("step")) for e in events]
    assert kinds.index(("complete", None)) < kinds.index(("step", "offsite"))

    capsys.readouterr()
    assert world.cli("list", "--offsite", "--json") == EXIT_OK
    listed = json.loads(capsys.readouterr().out)
    assert [row["snapshot"] for row in listed] == [local.name]
    # --time: the off-site snapshot carries the local snapshot's own time.
    assert dt.datetime.fromisoformat(listed[0]["time"]) == parse_snapshot_name(local.name)

    # Restored from the off-site copy, without the local repository: the same bytes, modes and links.
    local = world.base / "aside" / local.name
    os.rename(world.local / "snapshots", world.base / "aside")
    target = world.base / "back"
    assert world.cli("restore", "--offsite", str(world.source / "docs"), "--to", str(target)) == EXIT_OK
    comparison = filecmp.dircmp(local / "docs", target / "docs")
    assert not comparison.diff_files and not comparison.left_only and not comparison.right_only
    for name in os.listdir(local / "docs"):
        assert (local / "docs" / name).read_bytes() == (target / "docs" / name).read_bytes()
        assert os.lstat(local / "docs" / name).st_mode == os.lstat(target / "docs" / name).st_mode
    # Nothing is written over.
    assert world.cli("restore", "--offsite", str(world.source / "docs"), "--to", str(target)) != EXIT_OK


def restic_commands(log: str) -> list[str]:
    """The restic subcommands a verbose run started, in order (the log line of each command run)."""
    found = []
    for line in log.splitlines():
        if "running: " in line and "restic" in line:
            words = line.split("running: ", 1)[1].split()
            restic_at = max(i for i, word in enumerate(words) if word.endswith("/restic"))
            found.append(next(word for word in words[restic_at + 1:] if not word.startswith("-") and not word.isdigit()))
    return found


def test_the_second_copy_uses_the_stable_path_and_the_parent_and_reads_only_what_changed(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    world.write_config(str(world.repository()))
    with open(world.config, "a") as config:
        config.write("[offsite.rotation]\nlast = 5\n")  # both copies fall in one hour: keep them
    assert world.cli("init", "--offsite", "far") == EXIT_OK
    assert world.backup(capsys)[0] == EXIT_OK
    (world.source / "docs" / "note5.txt").write_text("changed\n")
    world.next_second()
    code, events = world.backup(capsys, "-v")
    done = offsite_steps(events)[-1]
    assert code == EXIT_OK and done["state"] == "done"
    # Hard-linked snapshot trees change every ctime and the path is new each time:
    # only the stable path, --parent and --ignore-ctime keep the rest unread.
    assert (done["files_new"], done["files_changed"]) == (0, 1)
    # The recorded copy is the parent: no id check or listing before it, each a key derivation of restic's.
    assert restic_commands(world.said) == ["version", "backup", "forget"]

    capsys.readouterr()
    assert world.cli("versions", "--offsite", "--json", str(world.source / "docs" / "note5.txt")) == EXIT_OK
    found = json.loads(capsys.readouterr().out)["versions"]
    assert len(found) == 2 and found[0]["size"] != found[1]["size"]
    # --snapshot picks the older copy by its local name.
    older = found[0]["snapshot"]
    target = world.base / "old"
    assert world.cli("restore", "--offsite", "--snapshot", older, str(world.source / "docs" / "note5.txt"), "--to", str(target)) == EXIT_OK
    assert (target / "note5.txt").read_text() == "note 5\n" * 6

    # The recorded copy is forgotten behind this machine's back: the next copy checks the repository,
    # lists it and takes the copy that is there as its parent.
    env = {"PATH": "/usr/bin:/bin", "RESTIC_REPOSITORY": str(world.base / "restic"), "RESTIC_PASSWORD_FILE": str(world.password),
           "RESTIC_CACHE_DIR": str(world.base / "cache"), "HOME": str(world.base)}
    recorded = json.loads((world.state / "offsite" / "far.json").read_text())["offsite_id"]
    subprocess.run([str(RESTIC), "forget", recorded], env=env, check=True, capture_output=True)
    world.next_second()
    code, events = world.backup(capsys, "-v")
    done = offsite_steps(events)[-1]
    assert code == EXIT_OK and done["state"] == "done", done
    assert (done["files_new"], done["files_changed"]) == (0, 1)  # note5, against the older copy
    assert restic_commands(world.said) == ["version", "backup", "cat", "snapshots", "backup", "forget"]


def test_a_rest_server_and_an_append_only_one_where_forget_is_never_tried(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    served = world.repository(world.base / "served")
    with rclone_rest(served) as url:
        world.write_config(url)
        assert world.cli("init", "--offsite", "far") == EXIT_OK
        code, events = world.backup(capsys)
        assert code == EXIT_OK and offsite_steps(events)[-1]["state"] == "done"
        assert [s["state"] for s in offsite_steps(events, "offsite-forget")] == ["start", "done"]
    with rclone_rest(served, append_only=True) as url:
        world.write_config(url, append_only=True)
        world.next_second()
        code, events = world.backup(capsys)
        assert code == EXIT_OK and offsite_steps(events)[-1]["state"] == "done"
        forget = offsite_steps(events, "offsite-forget")
        assert [s["state"] for s in forget] == ["skipped"] and "server's owner" in forget[0]["reason"]
        assert not offsite_steps(events, "offsite-prune")


def test_an_append_only_server_refuses_deletion_and_the_local_backup_is_still_a_success(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    served = world.repository(world.base / "served")
    with rclone_rest(served, append_only=True) as url:
        # Not told it is append-only, and keeping one snapshot: forget must delete and is refused.
        world.write_config(url)
        with open(world.config, "a") as config:
            config.write("[offsite.rotation]\nhourly = 1\n")
        assert world.cli("init", "--offsite", "far") == EXIT_OK
        assert world.backup(capsys)[0] == EXIT_OK
        world.next_second()
        (world.source / "new.txt").write_text("new\n")
        code, events = world.backup(capsys)
        assert code == EXIT_OK
        forget = offsite_steps(events, "offsite-forget")
        assert forget[-1]["state"] == "failed" and forget[-1]["reason"] == "append-only", forget
        assert any(e["event"] == "warning" and e["step"] == "offsite-forget" for e in events)
        capsys.readouterr()
        assert world.cli("list", "--offsite", "--json") == EXIT_OK
        assert len(json.loads(capsys.readouterr().out)) == 2  # nothing was deleted
        # The refusal is remembered: the next run does not try again.
        world.next_second()
        (world.source / "newer.txt").write_text("newer\n")
        code, events = world.backup(capsys)
        assert [s["state"] for s in offsite_steps(events, "offsite-forget")] == ["skipped"]


def test_a_wrong_password_is_one_line_with_its_exit_status_and_the_local_backup_succeeds(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    world.write_config(str(world.repository()))
    assert world.cli("init", "--offsite", "far") == EXIT_OK
    world.password.write_text("wrong\n")
    code, events = world.backup(capsys)
    assert code == EXIT_OK
    failed = offsite_steps(events)[-1]
    assert failed["state"] == "failed" and failed["reason"] == "password" and failed["exit_code"] == EXIT_OFFSITE_PASSWORD
    assert world.newest_local().is_dir()
    capsys.readouterr()
    assert world.cli("list", "--offsite") == EXIT_OFFSITE_PASSWORD
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "password" in err[0] and "correct horse" not in err[0]
    # The summary of a backup from a terminal says it apart from the backup's own result.
    world.next_second()
    assert world.cli("backup", "--no-sudo") == EXIT_OK
    summary = capsys.readouterr().out
    assert summary.startswith("made snapshot") and "; NOT copied off-site to far: off-site far: the repository refused the password" in summary


def test_an_unreachable_backend_and_a_missing_or_old_restic_are_told_apart(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    world.write_config(f"rest:http://127.0.0.1:{free_port()}/")
    assert world.cli("init", "--offsite", "far") == EXIT_OFFSITE
    assert "cannot be reached" in capsys.readouterr().err
    world.write_config(str(world.base / "restic"))
    with open(world.config, "a") as config:
        config.write(f'[commands]\nrestic = "{world.base / "no-restic"}"\n')
    assert world.cli("init", "--offsite", "far") == EXIT_NOT_AVAILABLE
    assert "restic was not found" in capsys.readouterr().err
    old = world.base / "old-restic"
    old.write_text("#!/bin/sh\necho 'restic 0.9.6 compiled with go1.13 on linux/amd64'\n")
    os.chmod(old, 0o755)
    world.write_config(str(world.base / "restic"))
    with open(world.config, "a") as config:
        config.write(f'[commands]\nrestic = "{old}"\n')
    assert world.cli("init", "--offsite", "far") == EXIT_NOT_AVAILABLE
    assert "too old" in capsys.readouterr().err
    assert not (world.base / "restic").exists()


def test_a_repository_locked_by_a_live_client_is_refused_and_its_lock_is_kept(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    world.write_config(str(world.repository()))
    assert world.cli("init", "--offsite", "far") == EXIT_OK
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "RESTIC_REPOSITORY": str(world.base / "restic"),
        "RESTIC_PASSWORD_FILE": str(world.password), "RESTIC_CACHE_DIR": str(world.base / "cache"),
    }
    # A live client: restic backup --stdin holds its lock while it waits for input.
    holder = subprocess.Popen(
        [str(RESTIC), "backup", "--stdin", "--stdin-filename", "x"], stdin=subprocess.PIPE, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        locks = world.base / "restic" / "locks"
        deadline = time.monotonic() + 10
        while not any(locks.iterdir()):
            assert time.monotonic() < deadline, "restic did not take its lock"
            time.sleep(0.05)
        # Adopting checks the repository, which needs it alone.
        assert world.cli("init", "--offsite", "far") == EXIT_BUSY
        err = capsys.readouterr().err
        assert "locked by another client" in err and "--remove-all yourself" in err
        assert any(locks.iterdir())  # the live client's lock was not removed
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=20)


def _descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (this test started them all)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                parent = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def test_restic_killed_mid_upload_then_the_next_run_completes(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    (world.source / "big.dat").write_bytes(os.urandom(3 * 1024 * 1024))
    world.write_config(str(world.repository()), limit_upload=512)
    assert world.cli("init", "--offsite", "far") == EXIT_OK
    process = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "--config", str(world.config), "backup", "--no-sudo", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    killed = False
    events = []
    assert process.stdout is not None
    for line in process.stdout:
        event = json.loads(line)
        events.append(event)
        if not killed and event["event"] == "progress" and event.get("step") == "offsite" and event["bytes"] > 0:
            for pid in _descendants(process.pid):
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{pid}/comm").read_text().strip() == "restic":
                        os.kill(pid, signal.SIGKILL)
                        killed = True
    assert process.wait(timeout=60) == EXIT_OK and killed
    failed = offsite_steps(events)[-1]
    assert failed["state"] == "failed" and "SIGKILL" in failed["message"]
    # The next run copies again (the failure makes it due) and completes, the dead client's lock notwithstanding.
    world.write_config(str(world.base / "restic"))
    world.next_second()
    code, events = world.backup(capsys)
    assert code == EXIT_OK
    assert offsite_steps(events)[-1]["state"] == "done"
    assert [s["state"] for s in offsite_steps(events, "offsite-forget")][-1] == "done"
    target = world.base / "back"
    assert world.cli("restore", "--offsite", str(world.source / "big.dat"), "--to", str(target)) == EXIT_OK
    assert (target / "big.dat").read_bytes() == (world.source / "big.dat").read_bytes()


def test_a_full_offsite_store_is_quota_exceeded_at_once_and_the_backup_succeeds(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real full filesystem: a tmpfs of 6 MiB holds the repository; the source holds 12 MiB that do not compress."""
    store = world.base / "small"
    store.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m,mode=0700", "tmpfs", str(store)], check=True)
    try:
        (world.source / "big.dat").write_bytes(os.urandom(12 * 1024 * 1024))
        # restic 0.14 now and then stops for good on the full store instead of retrying (seen here once in about
        # fifteen runs, its status printing the same numbers): the stall watch ends that after stall_timeout.
        world.write_config(str(world.repository(store / "restic")), stall_timeout="5s")
        assert world.cli("init", "--offsite", "far") == EXIT_OK
        started = time.monotonic()
        code, events = world.backup(capsys)
        assert code == EXIT_OK and world.newest_local().is_dir()
        failed = offsite_steps(events)[-1]
        assert failed["state"] == "failed" and failed["reason"] in ("quota", "stalled")
        if failed["reason"] == "quota":
            assert failed["exit_code"] == EXIT_DISK_FULL and "quota exceeded" in failed["message"]
        assert time.monotonic() - started < 30, "restic's retries were waited out"
    finally:
        subprocess.run(["umount", str(store)], check=True)


def test_a_restic_backup_that_stops_moving_is_stopped_and_the_backup_succeeds(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    """restic 0.14 stuck after a backend error prints the same status for ever; a stand-in at the process boundary
    (a script in restic's place that passes every other command to the real restic) prints exactly that."""
    stuck = world.base / "restic-stuck"
    status = json.dumps({"message_type": "status", "seconds_elapsed": 1, "percent_done": 1, "total_files": 3,
                         "files_done": 3, "total_bytes": 10, "bytes_done": 10})
    stuck.write_text(
        "#!/bin/sh\n"
        f'case " $* " in *" backup "*) while :; do echo \'{status}\'; sleep 0.2; done ;; esac\n'
        'exec /usr/bin/restic "$@"\n'
    )
    stuck.chmod(0o755)
    world.write_config(str(world.repository(world.base / "restic")), stall_timeout="2s")
    with world.config.open("a") as config:
        config.write(f'[commands]\nrestic = "{stuck}"\n')
    assert world.cli("init", "--offsite", "far") == EXIT_OK
    started = time.monotonic()
    code, events = world.backup(capsys)
    assert code == EXIT_OK and world.newest_local().is_dir()
    failed = offsite_steps(events)[-1]
    assert failed["state"] == "failed" and failed["reason"] == "stalled" and failed["exit_code"] == EXIT_OFFSITE
    assert "no progress" in failed["message"] and "3 files" in failed["message"]
    assert time.monotonic() - started < 20
    leftover = subprocess.run(["pgrep", "-f", str(stuck)], capture_output=True, text=True)
    assert leftover.stdout == "", "the stuck restic was left running"


@contextlib.contextmanager
def sshd(base: Path) -> Iterator[tuple[int, Path, Path]]:
    """A real sshd on 127.0.0.1 and a free port, key login only, with sftp; yields (port, client key, known_hosts).

    Stopped by its pid. ``/run/sshd`` (sshd's privilege separation directory) is made when missing and left.
    """
    program = "/usr/sbin/sshd"
    if not os.access(program, os.X_OK) or shutil.which("ssh-keygen") is None:
        pytest.skip(reason="openssh-server is not installed: apt-get install -y openssh-server")
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(base / name)], check=True)
    (base / "authorized_keys").write_text((base / "client.pub").read_text())
    port = free_port()
    (base / "known_hosts").write_text(f"[127.0.0.1]:{port} {(base / 'host.pub').read_text()}")
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    argv = [
        program, "-D", "-e", "-f", "/dev/null", "-o", f"Port={port}", "-o", "ListenAddress=127.0.0.1",
        "-o", f"HostKey={base / 'host'}", "-o", f"AuthorizedKeysFile={base / 'authorized_keys'}",
        "-o", f"PidFile={base / 'sshd.pid'}", "-o", "StrictModes=no", "-o", "Subsystem sftp internal-sftp",
        "-o", "PermitRootLogin=prohibit-password", "-o", "PasswordAuthentication=no",
    ]
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("sshd did not start")
            time.sleep(0.05)
        yield port, base / "client", base / "known_hosts"
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_an_sftp_repository_through_a_real_sshd(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    keys = world.base / "ssh"
    keys.mkdir(mode=0o700)
    with sshd(keys) as (port, key, known_hosts):
        command = (
            f"/usr/bin/ssh -p {port} -i {key} -o UserKnownHostsFile={known_hosts} -o StrictHostKeyChecking=yes "
            "-o BatchMode=yes -o IdentitiesOnly=yes root@127.0.0.1 -s sftp"
        )
        world.write_config(f"sftp:root@127.0.0.1:{world.repository(world.base / 'over-ssh')}", options=[f"sftp.command={command}"])
        assert world.cli("init", "--offsite", "far") == EXIT_OK
        code, events = world.backup(capsys)
        assert code == EXIT_OK and offsite_steps(events)[-1]["state"] == "done"
        target = world.base / "back"
        assert world.cli("restore", "--offsite", str(world.source / "bin.dat"), "--to", str(target)) == EXIT_OK
        assert (target / "bin.dat").read_bytes() == (world.source / "bin.dat").read_bytes()
    assert any((world.base / "over-ssh" / "snapshots").iterdir())  # the copy went there, over ssh


def _moto_server() -> str:
    """moto's S3 server, from the peers' environment that scripts/test makes (or this one, or PATH)."""
    repo = Path(__file__).resolve().parent.parent
    for candidate in (repo / ".venv-peers" / "bin" / "moto_server", Path(sys.executable).parent / "moto_server"):
        if os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("moto_server")
    if found is None:
        pytest.skip(reason="moto_server is not installed: run scripts/test, which installs moto's S3 server in .venv-peers")
    return found


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 and a free port, its objects in memory; stopped by its pid."""
    port = free_port()
    with listening([_moto_server(), "-H", "127.0.0.1", "-p", str(port)], port, within=20):
        yield f"http://127.0.0.1:{port}"


def test_an_s3_repository_with_the_credentials_from_the_root_only_environment_file(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    """restic's S3 backend against moto's S3 server: a stand-in at the process boundary (restic speaks S3 over HTTP).

    moto accepts any credentials, so this shows the S3 path end to end and that
    the keys reach restic from the environment file, not that a store checks them.
    """
    credentials = world.base / "s3.env"
    credentials.write_text("# the store's keys\nAWS_ACCESS_KEY_ID=backup-agent-test\nexport AWS_SECRET_ACCESS_KEY='not a real secret'\n")
    os.chmod(credentials, 0o600)
    with s3_server() as endpoint:
        world.write_config(f"s3:{endpoint}/backup-agent-offsite", environment_file=str(credentials))
        assert world.cli("init", "--offsite", "far") == EXIT_OK  # restic creates the bucket and the repository in it
        code, events = world.backup(capsys)
        assert code == EXIT_OK and offsite_steps(events)[-1]["state"] == "done", offsite_steps(events)
        capsys.readouterr()
        assert world.cli("list", "--offsite", "--json") == EXIT_OK
        assert [row["snapshot"] for row in json.loads(capsys.readouterr().out)] == [world.newest_local().name]
        target = world.base / "back"
        assert world.cli("restore", "--offsite", str(world.source), "--to", str(target)) == EXIT_OK
    restored = target / world.source.name
    local = world.newest_local()
    for path in sorted(local.rglob("*")):
        twin = restored / path.relative_to(local)
        assert os.lstat(path).st_mode == os.lstat(twin).st_mode, path
        if path.is_symlink():
            assert os.readlink(path) == os.readlink(twin)
        elif path.is_file():
            assert path.read_bytes() == twin.read_bytes(), path
    assert sorted(p.relative_to(restored) for p in restored.rglob("*")) == sorted(p.relative_to(local) for p in local.rglob("*"))


def test_a_dry_run_says_what_it_would_copy_and_a_copy_already_there_is_not_made_again(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    world.write_config(str(world.repository()))
    assert world.cli("init", "--offsite", "far") == EXIT_OK
    capsys.readouterr()
    assert world.cli("backup", "--no-sudo", "--json", "--dry-run") == EXIT_OK
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    [said] = offsite_steps(events)
    assert said["state"] == "skipped" and said["reason"].startswith("dry run: would copy")
    assert not (world.base / "restic" / "snapshots").exists() or not any((world.base / "restic" / "snapshots").iterdir())
    code, events = world.backup(capsys)
    assert code == EXIT_OK and offsite_steps(events)[-1]["state"] == "done"
    # The record of that copy is lost: the next run finds it in the repository instead of copying it again.
    os.unlink(world.state / "offsite" / "far.json")
    assert world.cli("init", "--offsite", "far") == EXIT_OK  # adopts it, after checking
    capsys.readouterr()
    from agent.config.load import load_settings
    from agent.core.commands import Runner
    from agent.core.events import Emitter
    from agent.engine import offsite
    from agent.repository.store import Repository

    settings = load_settings(str(world.config))
    seen: list[Any] = []
    emitter = Emitter()
    emitter.subscribe(seen.append)
    [copied] = offsite.OffsiteCopy(settings, emitter, Runner()).run(Repository.open(str(world.local)))
    assert copied.state == "done" and copied.summary is None
    assert [e.detail.get("already") for e in seen if e.kind == "step" and e.step == "offsite" and e.state == "done"] == [True]


def test_the_metered_hook_holds_the_copy_back_unless_metered_is_allowed(world: World) -> None:
    """The hook the off-site copy asks (Cycle(metered=...)): the CLI passes NetworkManager's answer (agent.engine.metered)."""
    from agent.config.load import load_settings
    from agent.core.commands import Runner
    from agent.core.events import Emitter
    from agent.engine.cycle import Cycle, Request

    def run(metered: bool) -> list[Any]:
        settings = load_settings(str(world.config))
        heard: list[Any] = []
        emitter = Emitter()
        emitter.subscribe(heard.append)
        request = Request(settings=settings, source=settings.source, repository=str(world.local))
        Cycle(request, emitter, Runner(), metered=lambda: metered).run()
        return [e for e in heard if e.kind == "step" and e.step == "offsite" and e.state != "start"]

    world.write_config(str(world.repository()))
    assert world.cli("init", "--offsite", "far") == EXIT_OK
    [held] = run(True)
    assert held.state == "skipped" and "metered" in held.detail["reason"]
    world.write_config(str(world.base / "restic"), metered=True)
    world.next_second()
    [copied] = run(True)
    assert copied.state == "done"


_NETWORKMANAGER = """
import asyncio, sys
from tests.helpers.desktop_services import serve_networkmanager

async def main() -> None:
    await serve_networkmanager(sys.argv[1], metered=int(sys.argv[2]))
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


@contextlib.contextmanager
def networkmanager(address: str, metered: int) -> Iterator[None]:
    """NetworkManager's stand-in (its Metered property only) on a private system bus, in a process of its own."""
    process = subprocess.Popen([sys.executable, "-c", _NETWORKMANAGER, address, str(metered)], cwd=Path(__file__).parent.parent,
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "ready"
        yield
    finally:
        process.kill()
        process.wait()


def test_the_cycle_asks_networkmanager_whether_the_connection_is_metered(
    world: World, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real CLI, busctl and a private system bus; NetworkManager is a stand-in at the process boundary."""
    from tests.test_dbus_control import private_bus

    world.write_config(str(world.repository()))
    assert world.cli("init", "--offsite", "far") == EXIT_OK
    with private_bus("system") as system:
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", system.address)
        with networkmanager(system.address, 1):  # NMMetered 1: yes
            code, events = world.backup(capsys)
        assert code == EXIT_OK
        held = offsite_steps(events)[-1]
        assert held["state"] == "skipped" and "metered" in held["reason"]
        world.next_second()
        with networkmanager(system.address, 4):  # 4: guess-no
            code, events = world.backup(capsys)
        assert code == EXIT_OK and offsite_steps(events)[-1]["state"] == "done"
        world.next_second()
        code, events = world.backup(capsys)  # no NetworkManager on the bus: not known, copied
        assert code == EXIT_OK and offsite_steps(events)[-1]["state"] == "done"


def test_a_stop_during_the_copy_ends_only_the_copy(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    """SIGTERM to the cycle while restic uploads (what the agent's Stop sends): restic is stopped, the backup stands."""
    (world.source / "big.dat").write_bytes(os.urandom(3 * 1024 * 1024))
    world.write_config(str(world.repository()), limit_upload=256)
    assert world.cli("init", "--offsite", "far") == EXIT_OK
    process = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "--config", str(world.config), "backup", "--no-sudo", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    events, stopped, restic_pids = [], False, []
    assert process.stdout is not None
    for line in process.stdout:
        event = json.loads(line)
        events.append(event)
        if not stopped and event["event"] == "progress" and event.get("step") == "offsite":
            restic_pids = [pid for pid in _descendants(process.pid) if Path(f"/proc/{pid}/comm").read_text().strip() == "restic"]
            process.send_signal(signal.SIGTERM)
            stopped = True
    assert process.wait(timeout=60) == EXIT_OK and stopped and restic_pids
    kinds = [(e["event"], e.get("step"), e.get("state")) for e in events]
    assert ("complete", None, None) in kinds and not any(kind == "error" for kind, _, _ in kinds)
    failed = offsite_steps(events)[-1]
    assert failed["state"] == "failed" and failed["reason"] == "interrupted"
    assert not any(os.path.exists(f"/proc/{pid}") for pid in restic_pids)
    assert world.newest_local().is_dir()


def test_the_rolling_check_reads_the_data_and_reports_damage_as_verify_does(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    world.write_config(str(world.repository()), check_interval="0", check_parts=1)
    assert world.cli("init", "--offsite", "far") == EXIT_OK
    code, events = world.backup(capsys)
    check = offsite_steps(events, "offsite-check")
    assert code == EXIT_OK and check[-1]["state"] == "done" and check[-1]["subset"] == "1/1"
    # A pack of file contents is damaged where it is stored.
    packs = sorted(path for path in (world.base / "restic" / "data").rglob("*") if path.is_file())
    biggest = max(packs, key=lambda path: path.stat().st_size)
    data = bytearray(biggest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    biggest.write_bytes(bytes(data))
    (world.source / "docs" / "note1.txt").write_text("changed\n")
    world.next_second()
    code, events = world.backup(capsys)
    assert code == EXIT_OK and offsite_steps(events)[-1]["state"] == "done"
    check = offsite_steps(events, "offsite-check")
    assert check[-1]["state"] == "failed" and check[-1]["reason"] == "damaged" and "found damage" in check[-1]["message"]
    assert any(e["event"] == "warning" and e["step"] == "offsite-check" for e in events)


def test_through_sudo_list_and_versions_may_read_off_site_and_restore_may_not() -> None:
    parser = cli.build_parser()
    for argv in (["list", "--offsite"], ["versions", "--offsite", "--offsite-name", "far", "/etc/hosts"]):
        assert cli.through_sudo_refusal(parser.parse_args(argv), parser) is None
    refusal = cli.through_sudo_refusal(parser.parse_args(["restore", "--offsite", "/etc/hosts"]), parser)
    assert refusal is not None and "--offsite" in refusal
