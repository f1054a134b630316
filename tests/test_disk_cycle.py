"""The whole cycle on the encrypted disk, through the real CLI (issue 3, "Tests with real parts").

``backup-agent init --disk NAME --yes`` and ``backup-agent backup --disk NAME``
run as users run them (``python -m agent.cli`` in a subprocess, config file in
a directory only root can write), on tests/test_disk.py's rig: a real LUKS2
header on a loop device (blkid finds its UUID, cryptsetup checks the key) and
a plain ext4 image on a second loop device that the stand-in
cryptdisks_start exposes as the "mapped device" (this kernel has no
device-mapper; only that step is replaced). mount, umount, sync, rsync and
the repository are real.

Every failure test checks the same things: the exit status (agent/core/errors.py),
the one error line names the step and the cause, what the run opened is
closed again (the kernel's /proc/self/mountinfo, the mapped device, the
stand-in's call log: stop refuses while mounted, so a clean stop proves the
order), what it found open stays open, and every earlier snapshot is
byte-for-byte intact (content hashes, modes, owners, mtimes, xattrs, inode
numbers, metadata bytes, the marker and ``latest``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import pty
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from agent.core import lock
from agent.core.errors import EXIT_USAGE
from agent.repository.store import MARKER, Marker
from tests.test_disk import NAME, Rig, _run, rig  # noqa: F401  (rig is the fixture these tests use)
from tests.treeutil import describe, inodes

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
FAKE_RSYNC = Path(__file__).resolve().parent / "helpers" / "fake_rsync.py"
MiB = 1024 * 1024

# exit statuses (agent/core/errors.py), spelled out so a renumbering is noticed
EXIT_OK, EXIT_REPOSITORY, EXIT_BUSY, EXIT_STEP_FAILED, EXIT_DISK_MISSING, EXIT_DISK_BUSY, EXIT_DISK_FULL = 0, 3, 4, 5, 6, 9, 12


# ---------------------------------------------------------------------------
# What the kernel says (read here, not through agent.core.mounts)


def kernel_mounts() -> list[tuple[str, str, str]]:
    """(mount point, major:minor, fstype) of every line of the real /proc/self/mountinfo."""
    found = []
    with open("/proc/self/mountinfo", "rb") as handle:
        for raw in handle:
            fields = raw.decode("utf-8", "surrogateescape").split(" ")
            dash = fields.index("-", 6)
            point = fields[4].replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
            found.append((point, fields[2], fields[dash + 1]))
    return found


def device_number(path: str) -> str:
    rdev = os.stat(path).st_rdev
    return f"{os.major(rdev)}:{os.minor(rdev)}"


@dataclasses.dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str

    @property
    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stdout.splitlines() if line.startswith("{")]

    @property
    def error_line(self) -> str:
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        assert lines, f"no error line (exit {self.returncode}); stdout: {self.stdout}"
        return lines[-1]

    def steps(self) -> list[tuple[str, str]]:
        """(step, state) of the step events, and ("complete"/"error", "") in their place."""
        out = []
        for event in self.events:
            if event["event"] == "step":
                out.append((event["step"], event["state"]))
            elif event["event"] in ("complete", "error"):
                out.append((event["event"], ""))
        return out

    def the(self, kind: str) -> dict[str, Any]:
        found = [event for event in self.events if event["event"] == kind]
        assert len(found) == 1, f"expected one {kind} event, got {found}"
        return found[0]

    def __str__(self) -> str:
        return f"exit {self.returncode}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


class Bench:
    """The rig plus a source, a config file in the trusted directory, and the CLI."""

    def __init__(self, rig: Rig, trusted: Path) -> None:
        self.rig = rig
        self.trusted = trusted
        self.tmp = rig.tmp
        self.source = self.tmp / "src"
        self.config = trusted / "config.toml"
        self.hook_log = self.tmp / "hooks.log"
        self.check = self.tmp / "check"
        self.check.mkdir()
        self.repository = rig.mount_point / "host"
        self.sleepers: list[int] = []
        self.build_source()
        self.write_config()

    # -- building ------------------------------------------------------------

    def build_source(self) -> None:
        root = self.source
        root.mkdir()
        (root / "plain.txt").write_text("plain\n")
        (root / "sub" / "deeper").mkdir(parents=True)
        (root / "sub" / "deeper" / "data.bin").write_bytes(os.urandom(50_000))
        (root / "secret").write_text("s\n")
        os.chmod(root / "secret", 0o600)
        (root / "script.sh").write_text("#!/bin/sh\necho hi\n")
        os.chmod(root / "script.sh", 0o750)
        os.chown(root / "script.sh", 1234, 5678)
        os.symlink("plain.txt", root / "link")
        (root / "hard-a").write_text("one inode\n")
        os.link(root / "hard-a", root / "sub" / "hard-b")
        os.setxattr(root / "plain.txt", "user.comment", b"kept")
        os.utime(root / "plain.txt", ns=(1_500_000_000_000_000_000, 1_500_000_000_123_456_789))

    def write_config(
        self,
        *,
        variant: str = "normal",
        target: str | None = None,
        disk: dict[str, Any] | None = None,
        hooks: list[dict[str, Any]] | None = None,
        rotation: dict[str, Any] | None = None,
        rsync: Path | None = None,
    ) -> None:
        """The config the CLI reads; the stand-ins (rewritten for ``variant``, ``target``) are named in [commands]."""
        commands = self.rig.stand_ins(variant, target)
        values: dict[str, Any] = {
            "name": self.rig.name,
            "luks_uuid": self.rig.luks_uuid,
            "mount_point": str(self.rig.mount_point),
            "mapped_device": str(self.rig.mapped),
            "repository": str(self.repository),
            "unlock": "cryptdisks",
            "filesystem": "ext4",
        }
        values.update(disk or {})
        lines = ["[backup]", f"source = {json.dumps(str(self.source))}", 'ionice = "none"', "nice = 0"]
        lines += ["[commands]", f"cryptdisks_start = {json.dumps(commands.cryptdisks_start)}"]
        lines += [f"cryptdisks_stop = {json.dumps(commands.cryptdisks_stop)}"]
        if rsync is not None:
            lines.append(f"rsync = {json.dumps(str(rsync))}")
        lines += ["[system]", f"state_dir = {json.dumps(str(self.tmp / 'state'))}"]
        lines += [f"crypttab = {json.dumps(str(self.rig.crypttab))}", f"fstab = {json.dumps(str(self.rig.fstab))}"]
        if rotation:
            lines.append("[rotation]")
            lines += [f"{key} = {json.dumps(value)}" for key, value in rotation.items()]
        lines.append("[[disk]]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items() if value is not None]
        for hook in hooks or []:
            lines.append("[[hooks]]")
            lines += [f"{key} = {json.dumps(value)}" for key, value in hook.items()]
        self.config.write_text("\n".join(lines) + "\n")
        self.config.chmod(0o644)

    def logging_hook(self, name: str, around: str, **extra: Any) -> dict[str, Any]:
        """A hook whose before and after append "STEP NAME OUTCOME" to the hook log."""
        record = f'echo "$BACKUP_AGENT_STEP {name} ${{BACKUP_AGENT_OUTCOME:-}}" >> {self.hook_log}'
        hook = {"name": name, "around": around, "before": ["/bin/sh", "-c", record], "after": ["/bin/sh", "-c", record]}
        hook.update(extra)
        return hook

    def hook_calls(self) -> list[str]:
        return self.hook_log.read_text().splitlines() if self.hook_log.exists() else []

    def install_rsync(self, **behaviour: Any) -> Path:
        """tests/helpers/fake_rsync.py where root may run it; told what to do by fake-rsync.json above the target."""
        copy = self.trusted / "rsync"
        shutil.copyfile(FAKE_RSYNC, copy)
        copy.chmod(0o755)
        # The target is <tmp>/mnt/host/snapshots/<name>.in-progress: <tmp> is 4 levels up.
        (self.tmp / "fake-rsync.json").write_text(json.dumps(behaviour))
        return copy

    # -- running ---------------------------------------------------------------

    def cli(self, *args: str, stdin: Any = subprocess.DEVNULL, timeout: float = 60) -> Run:
        env = dict(os.environ)
        env.pop("SUDO_UID", None)
        done = subprocess.run(
            [sys.executable, "-m", "agent.cli", *args],
            cwd=REPO, env=env, stdin=stdin, capture_output=True, text=True, timeout=timeout,
        )
        return Run(done.returncode, done.stdout, done.stderr)

    def init(self) -> Run:
        run = self.cli("init", "--disk", self.rig.name, "--yes", "--config", str(self.config))
        assert run.returncode == 0, str(run)
        return run

    def backup(self, *extra: str, stdin: Any = subprocess.DEVNULL) -> Run:
        return self.cli("backup", "--disk", self.rig.name, "--config", str(self.config), "--json", *extra, stdin=stdin)

    def backup_ok(self, *extra: str) -> str:
        run = self.backup(*extra)
        assert run.returncode == 0, str(run)
        snapshot = run.the("complete")["snapshot"]
        assert isinstance(snapshot, str) and snapshot
        return snapshot

    def prepared(self, snapshots: int = 1) -> dict[str, Any]:
        """init, then ``snapshots`` complete backups; returns the disk's fingerprint, the call log emptied."""
        self.init()
        for _ in range(snapshots):
            self.backup_ok()
        self.assert_locked_and_unmounted()
        state = self.fingerprint()
        assert len(state["snapshots"]) == snapshots
        self.reset_calls()
        return state

    def reset_calls(self) -> None:
        self.rig.log.unlink(missing_ok=True)

    def calls(self) -> list[tuple[str, int]]:
        return self.rig.calls()

    def write_id(self, value: str) -> None:
        (self.tmp / "state" / "disks" / f"{self.rig.name}.id").write_text(value + "\n")

    # -- looking at the disk -------------------------------------------------------

    def mounted_here(self) -> list[tuple[str, str, str]]:
        return [entry for entry in kernel_mounts() if entry[0] == str(self.rig.mount_point)]

    def mounts_of(self, device: str) -> list[tuple[str, str, str]]:
        number = device_number(device)
        return [entry for entry in kernel_mounts() if entry[1] == number]

    def assert_locked_and_unmounted(self, device: str | None = None) -> None:
        assert self.mounted_here() == [], kernel_mounts()
        assert self.mounts_of(device or self.rig.plain_device) == []
        assert not os.path.lexists(self.rig.mapped), "the mapped device is still there"
        assert list(self.rig.mount_point.iterdir()) == [], "something was written to the bare mount point"

    @contextlib.contextmanager
    def looking(self, device: str | None = None) -> Iterator[Path]:
        """The disk's filesystem: where it is mounted now, else mounted read-only for the look."""
        device = device or self.rig.plain_device
        mounted = self.mounts_of(device)
        if mounted:
            yield Path(mounted[-1][0])
            return
        _run("mount", "-o", "ro", device, str(self.check))
        try:
            yield self.check
        finally:
            _run("umount", str(self.check))

    def fingerprint(self, device: str | None = None) -> dict[str, Any]:
        """Everything a complete snapshot is: trees with content hashes, inodes, metadata bytes; marker, latest."""
        with self.looking(device) as root:
            repo = root / "host"
            if not repo.exists():
                return {"repository": False, "snapshots": {}, "in_progress": []}
            snapshots = {}
            names = sorted(os.listdir(repo / "snapshots"))
            for name in names:
                if name.endswith(".in-progress"):
                    continue
                path = repo / "snapshots" / name
                info = os.lstat(path)
                snapshots[name] = {
                    "tree": describe(str(path)),
                    "inodes": inodes(str(path)),
                    "top": (info.st_ino, info.st_mode, info.st_mtime_ns),
                    "metadata": (repo / "metadata" / f"{name}.json").read_bytes(),
                }
            return {
                "repository": True,
                "marker": (repo / MARKER).read_bytes(),
                "latest": os.readlink(repo / "latest") if os.path.lexists(repo / "latest") else None,
                "snapshots": snapshots,
                "in_progress": [name for name in names if name.endswith(".in-progress")],
            }

    def source_equals(self, snapshot: str) -> None:
        with self.looking() as root:
            copy = describe(str(root / "host" / "snapshots" / snapshot))
        assert copy == describe(str(self.source))

    def sleeper_pid(self, pidfile: Path) -> int:
        pid = int(pidfile.read_text())
        self.sleepers.append(pid)
        return pid

    def cleanup(self) -> None:
        for pid in self.sleepers:  # the hook's background sleep, by the pid it wrote
            with contextlib.suppress(OSError):
                with open(f"/proc/{pid}/comm") as handle:
                    if handle.read().strip() == "sleep":
                        os.kill(pid, signal.SIGKILL)
        for pid in self.sleepers:
            for _ in range(100):
                if not _alive(pid):
                    break
                time.sleep(0.02)


def _alive(pid: int) -> bool:
    """Running (a zombie nobody reaped holds no file open)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def bench(rig: Rig, trusted_dir: Path) -> Iterator[Bench]:
    if shutil.which("rsync") is None:
        pytest.skip(reason="rsync is not installed: run scripts/test, which installs it")
    made = Bench(rig, trusted_dir)
    try:
        yield made
    finally:
        made.cleanup()  # before the rig unmounts and detaches


def assert_failed(run: Run, status: int, step: str, *causes: str, completed: bool = False) -> None:
    """The exit status, and one error line naming the step and the cause (also in the error event).

    ``completed``: the snapshot was made before the failure (the disk is closed after the cycle's result).
    """
    assert run.returncode == status, str(run)
    line = run.error_line
    assert line.startswith(f"backup-agent: {step} failed: "), line
    for cause in causes:
        assert cause in line, f"{cause!r} not in {line!r}"
    assert line.endswith(" (earlier snapshots are untouched)"), line
    error = run.the("error")
    assert (error["step"], error["exit_code"], error["snapshots_untouched"]) == (step, status, True)
    assert ("complete" in [event["event"] for event in run.events]) is completed


# ===========================================================================
# The "Done when" scenario


def test_init_without_a_terminal_or_yes_refuses_before_touching_the_disk(bench: Bench) -> None:
    bench.assert_locked_and_unmounted()
    init = bench.cli("-q", "init", "--disk", NAME, "--config", str(bench.config))  # stdin is /dev/null
    assert init.returncode == EXIT_USAGE, str(init)
    assert init.error_line == (
        "backup-agent: init asks before writing to a disk: pass --yes to confirm when there is no terminal; "
        "nothing was touched"
    )
    assert bench.calls() == []  # never unlocked
    bench.assert_locked_and_unmounted()


def test_a_locked_disk_goes_through_a_whole_cycle_and_back_to_locked(bench: Bench) -> None:
    bench.assert_locked_and_unmounted()
    init = bench.cli("init", "--disk", NAME, "--yes", "--config", str(bench.config))
    assert init.returncode == 0, str(init)
    assert f"will create the repository {bench.repository}" in init.stdout
    recorded = (bench.tmp / "state" / "disks" / f"{NAME}.id").read_text().strip()
    assert f"initialised {bench.repository} (id {recorded})" in init.stdout
    bench.assert_locked_and_unmounted()
    assert bench.calls() == [("start", 0), ("stop", 0)]
    with bench.looking() as root:
        assert f'id = "{recorded}"' in (root / "host" / MARKER).read_text()
    bench.reset_calls()

    started = time.monotonic()
    run = bench.backup()
    took = time.monotonic() - started
    assert run.returncode == 0, str(run)
    steps = run.steps()
    assert [s for s in steps if s[1] != "start"] == [
        ("lock", "done"),  # the machine lock
        ("disk", "done"),
        ("unlock", "done"),
        ("mount", "done"),
        ("verify", "done"),
        ("prepare", "done"),
        ("transfer", "done"),
        ("snapshot", "done"),
        ("rotate", "done"),
        ("complete", ""),
        ("unmount", "done"),
        ("lock-disk", "done"),  # the disk locked again
    ]
    # each step starts right before it is done
    starts = [s for s in steps if s[1] == "start"]
    assert [name for name, _ in starts] == ["lock", "disk", "unlock", "mount", "verify", "prepare", "transfer", "snapshot", "rotate"]
    events = {(e["event"], e.get("step"), e.get("state")): e for e in run.events}
    assert events[("step", "disk", "done")]["device"] == bench.rig.luks_device
    assert events[("step", "unlock", "done")]["unlocked_now"] is True
    assert events[("step", "mount", "done")]["mounted_now"] is True
    assert events[("step", "verify", "done")]["id"] == recorded
    snapshot = run.the("complete")["snapshot"]
    assert run.the("complete")["skipped"] is None
    assert [e for e in run.events if e["event"] in ("warning", "error")] == []

    bench.assert_locked_and_unmounted()
    assert bench.calls() == [("start", 0), ("stop", 0)]
    state = bench.fingerprint()
    assert list(state["snapshots"]) == [snapshot] and state["in_progress"] == []
    assert state["latest"] == f"snapshots/{snapshot}"
    assert json.loads(state["snapshots"][snapshot]["metadata"])["state"] == "complete"
    bench.source_equals(snapshot)
    assert took < 10

    # Without --json: the summary says what was made; the disk again ends locked.
    bench.reset_calls()
    plain = bench.cli("backup", "--disk", NAME, "--config", str(bench.config))
    assert plain.returncode == 0, str(plain)
    assert plain.stdout.startswith("made snapshot "), plain.stdout
    bench.assert_locked_and_unmounted()
    assert bench.calls() == [("start", 0), ("stop", 0)]
    after = bench.fingerprint()
    assert after["snapshots"][snapshot] == state["snapshots"][snapshot]
    assert len(after["snapshots"]) == 2


# ===========================================================================
# Left as found


@pytest.mark.parametrize("found", ["unlocked", "mounted"])
def test_a_disk_found_open_is_left_open(bench: Bench, found: str) -> None:
    before = bench.prepared()
    bench.rig.unlock_by_hand()
    if found == "mounted":
        bench.rig.mount_by_hand(str(bench.rig.mapped))
        mounted_before = bench.mounted_here()
    run = bench.backup()
    assert run.returncode == 0, str(run)
    events = {(e["event"], e.get("step"), e.get("state")): e for e in run.events}
    assert events[("step", "unlock", "done")]["unlocked_now"] is False
    assert events[("step", "mount", "done")]["mounted_now"] is (found == "unlocked")
    assert bench.calls() == []  # neither unlocked nor locked by this run
    assert os.path.islink(bench.rig.mapped)  # still unlocked
    if found == "mounted":
        assert bench.mounted_here() == mounted_before  # still mounted, the same mount
    else:
        assert bench.mounted_here() == []
    after = bench.fingerprint()
    for name, snapshot in before["snapshots"].items():
        assert after["snapshots"][name] == snapshot
    assert len(after["snapshots"]) == 2
    bench.source_equals(run.the("complete")["snapshot"])


@pytest.mark.parametrize(
    ("found", "failure"),
    [("unlocked", "wrong id"), ("unlocked", "rsync dies"), ("mounted", "wrong id"), ("mounted", "rsync dies")],
)
def test_a_failure_leaves_a_disk_found_open_as_it_was(bench: Bench, found: str, failure: str) -> None:
    before = bench.prepared()
    bench.rig.unlock_by_hand()
    if found == "mounted":
        bench.rig.mount_by_hand(str(bench.rig.mapped))
    mounted_before = bench.mounted_here()
    if failure == "wrong id":
        bench.write_id("f" * 32)
    else:
        bench.write_config(rsync=bench.install_rsync(exit="SIGKILL"))
    run = bench.backup()
    if failure == "wrong id":
        assert_failed(run, EXIT_REPOSITORY, "verify", f"this is not the disk backup-agent knows as {NAME}")
    else:
        assert_failed(run, EXIT_STEP_FAILED, "transfer", "rsync failed (killed by SIGKILL)")
    assert bench.calls() == []
    assert os.path.islink(bench.rig.mapped)  # still unlocked
    assert bench.mounted_here() == mounted_before  # still mounted, or still not
    after = bench.fingerprint()
    assert after["snapshots"] == before["snapshots"] and after["latest"] == before["latest"]


@pytest.mark.parametrize("case", ["found unlocked", "found mounted", "lock fails"])
def test_the_events_do_not_claim_a_lock_or_unmount_that_did_not_happen(bench: Bench, case: str) -> None:
    bench.prepared()
    if case == "lock fails":
        bench.write_config(variant="stop-fails")
    else:
        bench.rig.unlock_by_hand()
    if case == "found mounted":
        bench.rig.mount_by_hand(str(bench.rig.mapped))
    run = bench.backup()
    assert run.returncode == 0, str(run)
    assert os.path.lexists(bench.rig.mapped)  # in every case the disk stays unlocked
    closing = {e["step"]: e["state"] for e in run.events if e["event"] == "step" and e["step"] in ("unmount", "lock-disk")}
    if case == "lock fails":
        assert closing == {"unmount": "done", "lock-disk": "failed"}
    elif case == "found unlocked":
        assert closing == {"unmount": "done", "lock-disk": "left-as-found"}
    else:
        assert closing == {"unmount": "left-as-found", "lock-disk": "left-as-found"}


def test_a_failed_lock_is_reported_with_how_to_finish(bench: Bench) -> None:
    """cryptdisks_stop fails after a complete snapshot: unmounted, left unlocked, and the user told how to lock it."""
    before = bench.prepared()
    bench.write_config(variant="stop-fails")
    run = bench.backup()
    stop = bench.rig.bin / "cryptdisks_stop"
    # The snapshot is complete, so the cycle succeeds; the failed lock is a warning that says how to finish.
    assert run.returncode == 0, str(run)
    warnings = [e["message"] for e in run.events if e["event"] == "warning"]
    assert len(warnings) == 1 and f"locking {NAME} failed" in warnings[0] and f"lock it with `{stop} {NAME}`" in warnings[0]
    assert f"locking {NAME} failed" in run.stderr
    assert bench.calls() == [("start", 0), ("stop", 1)]  # stop came after the unmount: it found nothing mounted
    assert bench.mounted_here() == [] and bench.mounts_of(bench.rig.plain_device) == []
    assert os.path.islink(bench.rig.mapped)
    after = bench.fingerprint()
    for name, snapshot in before["snapshots"].items():
        assert after["snapshots"][name] == snapshot
    assert run.the("complete")["snapshot"] in after["snapshots"]
    bench.write_config()  # a stop that works, as the user's fixed one would
    _run(str(stop), NAME)
    bench.assert_locked_and_unmounted()


def test_a_failed_lock_warning_names_the_lock_step(bench: Bench) -> None:
    bench.prepared()
    bench.write_config(variant="stop-fails")
    run = bench.backup()
    warnings = [e for e in run.events if e["event"] == "warning"]
    assert [w["step"] for w in warnings] == ["lock-disk"], warnings


# ===========================================================================
# A failure at every step, in turn


def test_wrong_key(bench: Bench) -> None:
    before = bench.prepared()
    bench.rig.key.write_bytes(os.urandom(64))  # the key file replaced by another key
    run = bench.backup()
    assert_failed(run, EXIT_STEP_FAILED, "unlock", f"unlocking {NAME}", "No key available with this passphrase", "nothing was unlocked")
    assert bench.calls() == [("start", 1)]
    bench.assert_locked_and_unmounted()
    assert bench.fingerprint() == before


@pytest.mark.parametrize(
    ("variant", "cause", "calls"),
    [
        ("maps-nothing", "reported success but {mapped} does not exist", [("start", 0), ("stop", 0)]),
        ("map-then-fail", "failed after mapping", [("start", 1), ("stop", 0)]),
    ],
)
def test_mapping_missing_or_half_done(bench: Bench, variant: str, cause: str, calls: list[tuple[str, int]]) -> None:
    before = bench.prepared()
    bench.write_config(variant=variant)
    run = bench.backup()
    assert_failed(run, EXIT_STEP_FAILED, "unlock", cause.format(mapped=bench.rig.mapped))
    assert bench.calls() == calls
    bench.assert_locked_and_unmounted()
    assert bench.fingerprint() == before


def _write_block_device(device: str, offset: int, data: bytes) -> bytes:
    """Write ``data`` at ``offset`` of the block device itself (not its image: the device's cache would be stale)."""
    fd = os.open(device, os.O_RDWR)
    try:
        old = os.pread(fd, len(data), offset)
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    return old


@pytest.mark.parametrize("how", ["corrupt-superblock", "wrong-filesystem-type"])
def test_mount_fails(bench: Bench, how: str) -> None:
    before = bench.prepared()
    superblock = None
    if how == "corrupt-superblock":
        superblock = _write_block_device(bench.rig.plain_device, 1024, bytes(1024))
    else:
        bench.write_config(disk={"filesystem": "xfs"})
    try:
        run = bench.backup()
    finally:
        if superblock is not None:
            _write_block_device(bench.rig.plain_device, 1024, superblock)
    assert_failed(run, EXIT_STEP_FAILED, "mount", f"mounting {bench.rig.mapped} on {bench.rig.mount_point} failed")
    assert bench.calls() == [("start", 0), ("stop", 0)]
    bench.assert_locked_and_unmounted()
    assert bench.fingerprint() == before


def test_wrong_recorded_repository_id(bench: Bench) -> None:
    before = bench.prepared()
    recorded = before["marker"].decode().split('id = "')[1].split('"')[0]
    bench.write_id("f" * 32)
    run = bench.backup()
    assert_failed(
        run, EXIT_REPOSITORY, "verify",
        f"this is not the disk backup-agent knows as {NAME}", f"id {recorded}, expected {'f' * 32}", "nothing was written",
    )
    assert bench.calls() == [("start", 0), ("stop", 0)]
    bench.assert_locked_and_unmounted()
    assert bench.fingerprint() == before


def test_a_cloned_disk_with_another_repository_is_refused(bench: Bench) -> None:
    """Same LUKS header (so the same UUID), but the filesystem behind it holds another repository."""
    before = bench.prepared()
    clone = bench.rig.attach(bench.rig.image("clone.img", "ext4"))
    other = Marker(version=1, id="c" * 32, host=os.uname().nodename, created="2026-11-22T13:00:00+01:00")
    _run("mount", clone, str(bench.check))
    try:
        repo = bench.check / "host"
        (repo / "snapshots").mkdir(parents=True)
        (repo / "metadata").mkdir()
        (repo / MARKER).write_text(other.render())
    finally:
        _run("umount", str(bench.check))
    clone_before = bench.fingerprint(clone)
    bench.write_config(target=clone)
    run = bench.backup()
    assert_failed(run, EXIT_REPOSITORY, "verify", f"this is not the disk backup-agent knows as {NAME}", f"id {'c' * 32}")
    assert bench.calls() == [("start", 0), ("stop", 0)]
    bench.assert_locked_and_unmounted(clone)
    assert bench.fingerprint(clone) == clone_before  # nothing written to the clone
    assert bench.fingerprint() == before


def test_a_filesystem_without_hard_links_is_refused(bench: Bench) -> None:
    if shutil.which("mkntfs") is None or shutil.which("mount.ntfs-3g") is None:
        pytest.skip(reason="mkntfs and mount.ntfs-3g are not installed (package ntfs-3g): run scripts/test")
    bench.prepared()
    ntfs = bench.rig.attach(bench.rig.image("ntfs.img", "ntfs"))
    # The config refuses filesystem = "ntfs-3g" itself; through fstab the disk is what it is.
    bench.rig.fstab.write_text(f"{bench.rig.mapped} {bench.rig.mount_point} ntfs-3g noauto 0 0\n")
    bench.write_config(target=ntfs, disk={"filesystem": None})
    run = bench.backup()
    assert_failed(run, EXIT_REPOSITORY, "verify", "holds fuseblk", "cannot keep hard-linked snapshots", "nothing was written")
    assert bench.calls() == [("start", 0), ("stop", 0)]
    bench.assert_locked_and_unmounted(ntfs)
    _run("mount", "-t", "ntfs-3g", "-o", "ro", ntfs, str(bench.check))
    try:
        assert not (bench.check / "host").exists()
    finally:
        _run("umount", str(bench.check))


def test_a_critical_before_backup_hook_fails(bench: Bench) -> None:
    before = bench.prepared()
    bench.write_config(
        hooks=[
            bench.logging_hook("service", "backup"),
            {"name": "must pass", "around": "backup", "before": ["/bin/false"]},
            bench.logging_hook("never", "backup"),
        ]
    )
    run = bench.backup()
    assert_failed(run, EXIT_STEP_FAILED, "before_backup", "backup hook 'must pass' failed", "false failed", "nothing was written")
    assert bench.hook_calls() == ["before_backup service ", "after_backup service failure"]
    assert bench.calls() == [("start", 0), ("stop", 0)]
    bench.assert_locked_and_unmounted()
    assert bench.fingerprint() == before


def test_a_critical_before_snapshot_hook_fails(bench: Bench) -> None:
    before = bench.prepared()
    bench.write_config(
        hooks=[
            bench.logging_hook("service", "backup"),
            bench.logging_hook("dump", "snapshot"),
            {"name": "must pass", "around": "snapshot", "before": ["/bin/false"], "after": ["/bin/true"]},
        ]
    )
    run = bench.backup()
    assert_failed(run, EXIT_STEP_FAILED, "before_snapshot", "snapshot hook 'must pass' failed", "nothing was written")
    assert bench.hook_calls() == [
        "before_backup service ",
        "before_snapshot dump ",
        "after_snapshot dump failure",
        "after_backup service failure",
    ]
    assert bench.calls() == [("start", 0), ("stop", 0)]
    bench.assert_locked_and_unmounted()
    after = bench.fingerprint()
    assert after == before  # no transfer started: not even an .in-progress


def test_rsync_dies(bench: Bench) -> None:
    before = bench.prepared()
    bench.write_config(rsync=bench.install_rsync(exit="SIGKILL"), hooks=[bench.logging_hook("dump", "snapshot")])
    (bench.source / "new.txt").write_text("changed since\n")
    run = bench.backup()
    assert_failed(run, EXIT_STEP_FAILED, "transfer", "rsync failed (killed by SIGKILL)", "the next run resumes from it")
    assert run.the("error")["snapshots_untouched"] is True
    assert bench.hook_calls() == ["before_snapshot dump ", "after_snapshot dump failure"]
    assert bench.calls() == [("start", 0), ("stop", 0)]
    bench.assert_locked_and_unmounted()
    after = bench.fingerprint()
    assert after["snapshots"] == before["snapshots"] and after["latest"] == before["latest"]
    assert len(after["in_progress"]) == 1  # kept for the next run to resume from
    # ... which it does, with the real rsync again.
    bench.write_config()
    snapshot = bench.backup_ok()
    assert bench.fingerprint()["in_progress"] == []
    bench.source_equals(snapshot)


def test_disk_full(bench: Bench) -> None:
    before = bench.prepared()
    with bench.looking() as root:
        free = os.statvfs(root).f_bavail * os.statvfs(root).f_frsize
    assert free < 20 * MiB
    (bench.source / "big.bin").write_bytes(os.urandom(free + 4 * MiB))
    run = bench.backup()
    assert_failed(run, EXIT_DISK_FULL, "transfer", "the backup disk is full (", " free", "no snapshot was completed")
    latest = before["latest"].split("/")[-1]
    assert f"; the last snapshot ({latest}) added " in run.error_line and "keep_free" in run.error_line
    assert bench.calls() == [("start", 0), ("stop", 0)]
    bench.assert_locked_and_unmounted()
    after = bench.fingerprint()
    assert after["snapshots"] == before["snapshots"] and after["latest"] == before["latest"]
    # What takes the space is named, with the command that frees it; and that command works on the configured disk.
    [unfinished] = after["in_progress"]
    assert f"the unfinished transfer {unfinished.removesuffix('.in-progress')} holds " in run.error_line, run.error_line
    assert f"free it with: sudo backup-agent rotate --discard-unfinished --disk {NAME})" in run.error_line
    bench.reset_calls()
    freed = bench.cli("rotate", "--discard-unfinished", "--disk", NAME, "--config", str(bench.config))
    assert freed.returncode == 0, str(freed)
    assert f"deleted {unfinished}" in freed.stdout
    assert bench.calls() == [("start", 0), ("stop", 0)]
    bench.assert_locked_and_unmounted()
    assert bench.fingerprint()["in_progress"] == [] and bench.fingerprint()["snapshots"] == before["snapshots"]


def test_list_and_rotate_open_the_configured_disk_and_leave_it_as_found(bench: Bench) -> None:
    before = bench.prepared(snapshots=2)
    listed = bench.cli("list", "--config", str(bench.config))  # no REPOSITORY: the attached configured disk
    assert listed.returncode == 0, str(listed)
    assert all(name in listed.stdout for name in before["snapshots"])
    rotated = bench.cli("rotate", "--config", str(bench.config))
    assert rotated.returncode == 0, str(rotated)
    assert [line.split()[1] for line in rotated.stdout.splitlines() if line.startswith("keep")] == sorted(before["snapshots"])
    assert bench.calls() == [("start", 0), ("stop", 0)] * 2
    bench.assert_locked_and_unmounted()
    assert bench.fingerprint() == before


def test_a_busy_unmount_leaves_the_disk_mounted_and_unlocked(bench: Bench) -> None:
    before = bench.prepared()
    pidfile = bench.tmp / "sleeper.pid"
    hold = (
        'cd "$BACKUP_AGENT_REPOSITORY" || exit 1\n'
        f"sleep 60 </dev/null >/dev/null 2>&1 &\necho $! > {pidfile}\n"
    )
    bench.write_config(hooks=[{"name": "holder", "around": "backup", "before": ["/bin/sh", "-c", hold]}])
    started = time.monotonic()
    run = bench.backup()
    took = time.monotonic() - started
    sleeper = bench.sleeper_pid(pidfile)
    assert_failed(run, EXIT_DISK_BUSY, "unmount", f"cannot unmount {bench.rig.mount_point}: it is busy", f"pid {sleeper} (sleep)", completed=True)
    assert "left mounted and unlocked" in run.error_line
    assert took < 15
    assert bench.calls() == [("start", 0)]  # never locked under the mount
    assert os.path.islink(bench.rig.mapped)
    assert [entry[1] for entry in bench.mounted_here()] == [device_number(bench.rig.plain_device)]
    # Released, the two commands the message gives finish the job.
    os.kill(sleeper, signal.SIGKILL)
    bench.cleanup()
    _run("umount", str(bench.rig.mount_point))
    _run(str(bench.rig.bin / "cryptdisks_stop"), NAME)
    bench.assert_locked_and_unmounted()
    after = bench.fingerprint()
    for name, snapshot in before["snapshots"].items():
        assert after["snapshots"][name] == snapshot
    assert len(after["snapshots"]) == 2  # the new snapshot had completed before the unmount


def test_the_machine_lock_held_by_another_run(bench: Bench) -> None:
    before = bench.prepared()
    holder = {"pid": 424242, "started": "2026-11-22T13:00:00+01:00", "repository": str(bench.repository)}
    with lock.hold(lock.machine_lock_path(), holder):
        run = bench.backup()
    assert run.returncode == EXIT_BUSY, str(run)
    assert run.error_line.startswith("backup-agent: lock failed: another backup is running (pid 424242"), run.error_line
    assert bench.calls() == []
    bench.assert_locked_and_unmounted()
    assert bench.fingerprint() == before


# ===========================================================================
# The disk is not attached


def _detach_luks(bench: Bench) -> None:
    _run("losetup", "-d", bench.rig.luks_device)
    for _ in range(50):
        if _run("blkid", "-c", "/dev/null", "-t", f"UUID={bench.rig.luks_uuid}", check=False).returncode == 2:
            return
        time.sleep(0.05)
    pytest.fail("blkid still finds the detached LUKS header")


@pytest.mark.parametrize(
    "selected",
    [
        "--disk",
        "any configured disk",
    ],
)
def test_a_missing_disk_from_a_timer_is_a_quiet_success(bench: Bench, selected: str) -> None:
    before = bench.prepared()
    _detach_luks(bench)
    args = ["--disk", NAME] if selected == "--disk" else []
    run = bench.cli("backup", *args, "--config", str(bench.config), stdin=subprocess.DEVNULL)
    assert run.returncode == EXIT_OK, str(run)
    # Beside the trace of each command run ("running: ARGV", with -v), one line says it all.
    lines = [line for line in run.stderr.splitlines() if not line.startswith("backup-agent: running: ")]
    assert len(lines) == 1, run.stderr
    assert NAME in lines[0] and bench.rig.luks_uuid in lines[0] and "attached" in lines[0]
    assert bench.calls() == []
    bench.assert_locked_and_unmounted()
    # Reattached, the disk holds exactly what it held: no snapshot was made.
    bench.rig.luks_device = bench.rig.attach(bench.rig.luks_image)
    assert bench.fingerprint() == before
    assert run.stdout == "", "a run from a timer with no disk says nothing more"


@pytest.mark.parametrize("selected", ["--disk", "any configured disk"])
def test_a_missing_disk_at_a_terminal_says_what_it_looked_for(bench: Bench, selected: str) -> None:
    bench.prepared()
    _detach_luks(bench)
    args = ["--disk", NAME] if selected == "--disk" else []
    primary, secondary = pty.openpty()
    try:
        run = bench.cli("backup", *args, "--config", str(bench.config), stdin=secondary)
    finally:
        os.close(secondary)
        os.close(primary)
    assert run.returncode == EXIT_DISK_MISSING, str(run)
    assert NAME in run.error_line and bench.rig.luks_uuid in run.error_line and "blkid" in run.error_line
    assert bench.calls() == []
    bench.assert_locked_and_unmounted()


# ===========================================================================
# keep_free


_FILLS = itertools.count(1)


def _fill(bench: Bench, size: int) -> None:
    """``size`` bytes in the source that no snapshot holds yet.

    A size of its own each time: rsync's quick check (size and mtime) would
    take a rewrite of the same size in the same second for the same file, and
    hard-link the old one.
    """
    (bench.source / "fill.bin").unlink(missing_ok=True)
    (bench.source / "fill.bin").write_bytes(os.urandom(size + 4096 * next(_FILLS)))


def _snapshots_of(bench: Bench, count: int) -> dict[str, Any]:
    """init, then ``count`` snapshots of 4 MiB each that share nothing (no rotation: -b -s)."""
    bench.init()
    for _ in range(count):
        _fill(bench, 4 * MiB)
        bench.backup_ok("-b", "-s")
    bench.reset_calls()
    return bench.fingerprint()


@pytest.mark.parametrize(
    ("keep_free", "min_snapshots", "deleted", "refused"),
    [
        ("room for one more", 1, 1, False),  # the oldest alone makes enough room
        ("64M", 2, 1, True),  # never below min_snapshots
        ("64M", 1, 2, True),  # never the newest
    ],
)
def test_keep_free_deletes_the_oldest_snapshots_first(
    bench: Bench, keep_free: str, min_snapshots: int, deleted: int, refused: bool
) -> None:
    before = _snapshots_of(bench, 3)
    names = list(before["snapshots"])
    if keep_free == "room for one more":
        with bench.looking() as root:
            free = os.statvfs(root).f_bavail * os.statvfs(root).f_frsize
        keep_free = f"{(free + 2 * MiB) // 1024}K"  # deleting one 4 MiB snapshot makes that room, with space to spare
    bench.write_config(rotation={"keep_free": keep_free, "min_snapshots": min_snapshots})
    _fill(bench, 2 * MiB)
    run = bench.backup("-b", "-s")
    assert run.returncode == 0, str(run)
    gone = names[:deleted]
    warnings = [e["message"] for e in run.events if e["event"] == "warning"]
    assert any(f"deleted {deleted} old snapshots" in w and ", ".join(gone) in w for w in warnings), warnings
    assert any("no snapshot may be deleted" in w for w in warnings) is refused, warnings
    room = [e for e in run.events if e["event"] == "step" and e["step"] == "make-room" and e["state"] == "done"]
    assert len(room) == 1 and room[0]["deleted"] == gone
    assert run.the("complete")["deleted"] == gone
    assert bench.calls() == [("start", 0), ("stop", 0)]
    bench.assert_locked_and_unmounted()
    after = bench.fingerprint()
    made = run.the("complete")["snapshot"]
    # (A set: runs this fast reserve names seconds ahead, so the new one may take a deleted one's name.)
    assert set(after["snapshots"]) == {*names[deleted:], made}
    for name in names[deleted:]:
        assert after["snapshots"][name] == before["snapshots"][name]


def test_keep_free_never_deletes_the_newest_even_past_protected_ones(bench: Bench) -> None:
    """A partial oldest snapshot is not deleted to make room; then only the newest is left to delete, and it stays."""
    bench.init()
    bench.write_config(rsync=bench.install_rsync(exit=23, stderr=['rsync: [sender] send_files failed to open "/x": Permission denied (13)']))
    _fill(bench, 4 * MiB)
    partial = bench.backup("-b", "-s")
    assert partial.returncode == 7, str(partial)  # EXIT_PARTIAL: complete, but flagged partial
    bench.write_config()
    for _ in range(2):
        _fill(bench, 4 * MiB)
        bench.backup_ok("-b", "-s")
    before = bench.fingerprint()
    names = list(before["snapshots"])
    assert len(names) == 3
    bench.reset_calls()
    bench.write_config(rotation={"keep_free": "64M", "min_snapshots": 1})
    _fill(bench, 2 * MiB)
    run = bench.backup("-b", "-s")
    assert run.returncode == 0, str(run)
    room = [e for e in run.events if e["event"] == "step" and e["step"] == "make-room" and e["state"] == "done"]
    assert room[0]["deleted"] == [names[1]]
    after = bench.fingerprint()
    assert set(after["snapshots"]) == {names[0], names[2], run.the("complete")["snapshot"]}
    for name in (names[0], names[2]):
        assert after["snapshots"][name] == before["snapshots"][name]
    bench.assert_locked_and_unmounted()


def test_keep_free_deletions_are_reported_after_a_rotation_too(bench: Bench) -> None:
    before = _snapshots_of(bench, 2)
    names = list(before["snapshots"])
    bench.write_config(rotation={"keep_free": "64M", "min_snapshots": 1})
    _fill(bench, 2 * MiB)
    run = bench.backup()  # the whole cycle: backup, snapshot and rotate
    assert run.returncode == 0, str(run)
    room = [e for e in run.events if e["event"] == "step" and e["step"] == "make-room" and e["state"] == "done"]
    assert room[0]["deleted"] == names[:1]
    rotate = [e for e in run.events if e["event"] == "step" and e["step"] == "rotate" and e["state"] == "done"]
    assert rotate[0]["delete"] == []  # two snapshots in one hour: the oldest (hourly) and the newest stay
    assert run.the("complete")["deleted"] == names[:1]


def test_rotated_snapshots_are_removed_after_success_and_before_the_disk_closes(bench: Bench) -> None:
    before = _snapshots_of(bench, 2)
    names = list(before["snapshots"])
    bench.write_config(rotation={"hourly": 1, "daily": 0, "weekly": 0, "monthly": 0, "yearly": 0})
    run = bench.backup()
    assert run.returncode == 0, str(run)
    # The hour's first snapshot and the newest stay; the one between goes.
    assert run.the("complete")["deleted"] == [names[1]]
    tail = [s for s in run.steps() if s[0] in ("rotate", "complete", "empty-trash", "unmount", "lock-disk")]
    assert tail == [
        ("rotate", "start"), ("rotate", "done"), ("complete", ""),
        ("empty-trash", "start"), ("empty-trash", "done"), ("unmount", "done"), ("lock-disk", "done"),
    ]
    (emptied,) = [e["emptied"] for e in run.events if e.get("step") == "empty-trash" and e["state"] == "done"]
    assert len(emptied) == 1 and emptied[0].startswith(names[1] + ".")
    bench.assert_locked_and_unmounted()
    after = bench.fingerprint()
    assert set(after["snapshots"]) == {names[0], run.the("complete")["snapshot"]}
    assert after["snapshots"][names[0]] == before["snapshots"][names[0]]
    with bench.looking() as root:
        assert os.listdir(root / "host" / ".trash") == []


# ===========================================================================
# What hooks are told


def test_hooks_are_told_the_disk_repository_snapshot_step_and_outcome(bench: Bench) -> None:
    bench.prepared()
    record = f'{{ echo "== $BACKUP_AGENT_STEP"; env | grep ^BACKUP_AGENT_ | sort; }} >> {bench.hook_log}'
    argv = ["/bin/sh", "-c", record]
    bench.write_config(
        hooks=[
            {"name": "around all", "around": "backup", "before": argv, "after": argv},
            {"name": "around transfer", "around": "snapshot", "before": argv, "after": argv},
        ]
    )
    run = bench.backup()
    assert run.returncode == 0, str(run)
    snapshot = run.the("complete")["snapshot"]
    seen: dict[str, dict[str, str]] = {}
    for block in bench.hook_log.read_text().split("== ")[1:]:
        step, *lines = block.strip().splitlines()
        seen[step] = dict(line.split("=", 1) for line in lines)
    assert list(seen) == ["before_backup", "before_snapshot", "after_snapshot", "after_backup"]
    common = {"BACKUP_AGENT_DISK": NAME, "BACKUP_AGENT_REPOSITORY": str(bench.repository)}
    assert seen["before_backup"] == {**common, "BACKUP_AGENT_SNAPSHOT": "", "BACKUP_AGENT_STEP": "before_backup"}
    assert seen["before_snapshot"] == {**common, "BACKUP_AGENT_SNAPSHOT": "", "BACKUP_AGENT_STEP": "before_snapshot"}
    for step in ("after_snapshot", "after_backup"):
        assert seen[step] == {**common, "BACKUP_AGENT_SNAPSHOT": snapshot, "BACKUP_AGENT_STEP": step, "BACKUP_AGENT_OUTCOME": "success"}

    # After a failure: outcome "failure" and the error, in the after-hooks of both stages.
    bench.hook_log.unlink()
    bench.write_config(
        rsync=bench.install_rsync(exit=12, stderr=["rsync error: error in rsync protocol data stream (code 12)"]),
        hooks=[
            {"name": "around all", "around": "backup", "before": argv, "after": argv},
            {"name": "around transfer", "around": "snapshot", "before": argv, "after": argv},
        ],
    )
    failed = bench.backup()
    assert failed.returncode == EXIT_STEP_FAILED, str(failed)
    seen = {}
    for block in bench.hook_log.read_text().split("== ")[1:]:
        step, *lines = block.strip().splitlines()
        seen[step] = dict(line.split("=", 1) for line in lines)
    for step in ("after_snapshot", "after_backup"):
        assert seen[step]["BACKUP_AGENT_OUTCOME"] == "failure"
        assert "rsync failed" in seen[step]["BACKUP_AGENT_ERROR"]
        assert seen[step]["BACKUP_AGENT_SNAPSHOT"] != ""
    bench.assert_locked_and_unmounted()
