"""Getting files back as the desktop user: ``backup-agent open`` through the real sudo rule.

A LUKS disk on loop devices (device-mapper is replaced by the rig's
stand-in, tests/test_disk.py), a system config in /etc/backup-agent (the
only one root reads through sudo), and two real users made for the test:
alice, whose files are backed up and whose sudo rule ``install`` would
write, and mallory, another user of the machine. alice opens the disk
read-only through sudo and reads her own files; mallory reads only what the
live system would let her read; a backup runs on the open disk and leaves
it open read-only; alice ejects it.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from agent.disk import browse
from agent.config.load import SYSTEM_CONFIG
from agent.config.model import Disk
from agent.desktop.daemon import browse_reply
from agent.core.errors import EXIT_USAGE
from agent.system.install import sudoers_rule
from tests.conftest import ReadableCode
from tests.test_disk import NAME, Rig, _require_parts
from tests.test_disk_cycle import Bench
from agent.desktop.state import BrowseReply
from tests.test_daemon import agent_on, here, one_cycle, real, settle, until  # noqa: F401  (here: fixture)
from tests.test_dbus_control import run
from tests.test_disk import rig  # noqa: F401  (rig: the fixture bench uses)
from tests.test_disk_cycle import bench  # noqa: F401  (fixture)
from tests.test_sudo_door import _run, as_user, real_sudo, wrapper  # noqa: F401  (fixtures)
from tests.test_udev import udevd  # noqa: F401  (fixture of @real)

pytestmark = pytest.mark.integration


def test_browse_options_win_over_the_disks_own() -> None:
    mine = Disk(name="d", luks_uuid="u", mapped_device="/dev/mapper/d", mount_point="/m", repository="/m/h",
                filesystem="ext4", mount_options=("rw", "noatime", "exec", "suid"))
    assert browse.browse_disk(mine).mount_options == ("noatime", "ro", "nosuid", "nodev", "noexec")
    assert browse.missing_flags(os.ST_RDONLY | os.ST_NOSUID) == ["nodev", "noexec"]


def test_manifests_are_made_root_s_alone_and_no_link_is_followed(tmp_path: Path) -> None:
    (tmp_path / "a.manifest").write_text("x")
    (tmp_path / "a.manifest").chmod(0o644)
    (tmp_path / "b.manifest").write_text("y")
    (tmp_path / "b.manifest").chmod(0o600)
    (tmp_path / "a.json").write_text("{}")
    (tmp_path / "a.json").chmod(0o644)
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.write_text("not ours")
    outside.chmod(0o644)
    (tmp_path / "c.manifest").symlink_to(outside)
    try:
        assert browse.private_manifests(str(tmp_path)) == ["a.manifest"]
        assert [oct((tmp_path / n).stat().st_mode & 0o777) for n in ("a.manifest", "b.manifest", "a.json")] == [
            "0o600", "0o600", "0o644"]
        assert outside.stat().st_mode & 0o777 == 0o644
    finally:
        outside.unlink()


def _user() -> str:
    name = f"bkatest{secrets.randbelow(10**6):06d}"
    _run(["useradd", "-M", "-s", "/bin/sh", name], check=True)
    return name


def _remove_user(name: str) -> None:
    deadline = time.monotonic() + 10
    while _run(["userdel", name]).returncode != 0 and time.monotonic() < deadline:
        time.sleep(0.2)  # su's session may take a moment to end
    _run(["userdel", "-f", name])


@pytest.fixture
def people(real_sudo: None) -> Iterator[tuple[str, str]]:
    alice, mallory = _user(), _user()
    try:
        yield alice, mallory
    finally:
        _remove_user(alice)
        _remove_user(mallory)


@pytest.fixture
def open_bench(trusted_dir: Path) -> Iterator[Bench]:
    """The disk rig and bench, in a directory every user may enter (pytest's tmp_path is root's alone)."""
    _require_parts()
    if shutil.which("rsync") is None:
        pytest.skip(reason="rsync is not installed: run scripts/test, which installs it")
    base = Path(tempfile.mkdtemp(prefix="browse-"))
    os.chmod(base, 0o755)
    rig = Rig(base, trusted_dir)
    try:
        bench = Bench(rig, trusted_dir)
        try:
            yield bench
        finally:
            bench.cleanup()
    finally:
        rig.cleanup()
        shutil.rmtree(base, ignore_errors=True)


#: The first line of a system config written by these tests: whose it is, so another run waits for it.
TEST_CONFIG_MARK = "# written by backup-agent's tests for pid "


def write_system_config(target: Path, source: Path) -> None:
    """``source``'s text as the system config, after the line that says which test process wrote it."""
    target.write_text(f"{TEST_CONFIG_MARK}{os.getpid()}\n" + source.read_text())
    target.chmod(0o644)


def _test_config_holder(target: Path) -> int | None:
    """The live test process whose system config ``target`` is, or None (the machine's own, or a dead run's)."""
    try:
        first = target.read_text().split("\n", 1)[0]
    except FileNotFoundError:
        return 0  # gone meanwhile: try again at once
    if not first.startswith(TEST_CONFIG_MARK) or not first[len(TEST_CONFIG_MARK):].isdigit():
        return None
    pid = int(first[len(TEST_CONFIG_MARK):])
    return pid if os.path.exists(f"/proc/{pid}") else None


@pytest.fixture
def system_config(open_bench: Bench) -> Iterator[Path]:
    """The bench's config as /etc/backup-agent/config.toml, which must not exist before (it is not ours otherwise).

    Through sudo the cycle reads only that path, so a test run elsewhere on
    this machine (another checkout's) may hold it: then this one waits for
    it, up to a minute. The machine's own config, or one a dead run left,
    is never replaced: the test skips, saying so.
    """
    target = Path(SYSTEM_CONFIG)
    made_directory = not target.parent.exists()
    target.parent.mkdir(mode=0o755, exist_ok=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            break
        except FileExistsError:
            holder = _test_config_holder(target)
            if holder is None or time.monotonic() > deadline:
                whose = "it belongs to this machine" if holder is None else f"test process {holder} still holds it"
                pytest.skip(reason=f"{target} exists: {whose}, and this test does not replace it")
            time.sleep(0.5)
    try:
        write_system_config(target, open_bench.config)
        yield target
    finally:
        target.unlink(missing_ok=True)
        if made_directory and not any(target.parent.iterdir()):
            target.parent.rmdir()


@pytest.fixture
def alices_rule(people: tuple[str, str], wrapper: Path) -> Iterator[Path]:
    """The rule install writes for alice, checked by visudo, under a name of its own."""
    alice, _ = people
    target = Path("/etc/sudoers.d") / alice
    fd, temporary = tempfile.mkstemp(prefix=".bkatest.", dir="/etc/sudoers.d")
    try:
        with os.fdopen(fd, "w") as stream:
            stream.write(sudoers_rule(alice, str(wrapper), [NAME]))
        os.chmod(temporary, 0o440)
        checked = _run(["visudo", "-c", "-s", "-f", temporary])
        assert checked.returncode == 0, checked.stdout + checked.stderr
        os.rename(temporary, target)
        yield target
    finally:
        for path in (temporary, str(target)):
            Path(path).unlink(missing_ok=True)


def as_plain(user: str, code: ReadableCode, *argv: str) -> subprocess.CompletedProcess[str]:
    """The checkout's CLI (a copy every user can read) as ``user``, without sudo."""
    return subprocess.run(
        ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", *code.argv(*argv)],
        capture_output=True, text=True, timeout=60, cwd="/", env=code.env({"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}),
    )


def through_sudo(user: str, wrapper: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    """``sudo -n backup-agent ARGUMENTS`` as ``user``, waiting while a root cycle elsewhere holds the machine lock.

    Through sudo the machine lock is /run/backup-agent.lock whatever the
    environment says (agent.core.lock): a backup run on this machine by someone
    else meanwhile holds it, and open and eject then rightly refuse.
    """
    deadline = time.monotonic() + 60
    while True:
        result = as_user(user, [str(wrapper), *arguments])
        if result.returncode != 4 or "lock failed" not in result.stderr or time.monotonic() > deadline:
            return result
        time.sleep(0.5)


def reads(user: str, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "cat", str(path)],
                          capture_output=True, text=True, timeout=30)


def test_the_desktop_user_opens_the_disk_read_only_and_reads_only_what_the_live_system_lets_them(
    open_bench: Bench, people: tuple[str, str], alices_rule: Path, wrapper: Path, system_config: Path,
    readable_code: ReadableCode,
) -> None:
    bench = open_bench
    alice, mallory = people
    home = bench.source / "alice"
    home.mkdir()
    (home / "private.txt").write_text("alice's own\n")
    (home / "private.txt").chmod(0o600)
    (home / "shared.txt").write_text("anyone may read this\n")
    (home / "shared.txt").chmod(0o644)
    shutil.chown(home, alice, alice)
    for name in ("private.txt", "shared.txt"):
        shutil.chown(home / name, alice, alice)
    (bench.source / "root-only.txt").write_text("root's\n")
    (bench.source / "root-only.txt").chmod(0o600)
    bench.init()
    first = bench.backup_ok()
    bench.assert_locked_and_unmounted()

    # Without the disk open, alice is told what to do instead of "not attached".
    refused = as_plain(alice, readable_code, "versions", str(home / "private.txt"))
    assert refused.returncode == EXIT_USAGE, refused.stderr
    assert refused.stderr.strip() == (
        f"backup-agent: opening the backup disk {NAME} needs root: open it for browsing with "
        f"`sudo backup-agent open --disk {NAME}` (the tray's Browse backups does this), then run this again; "
        "or give --repository DIR"
    )
    # mallory has no rule: sudo itself refuses.
    denied = as_user(mallory, [str(wrapper), "open", "--json", "--disk", NAME])
    assert "a password is required" in denied.stderr and denied.returncode == 1

    opened = through_sudo(alice, wrapper, "open", "--json", "--disk", NAME)
    assert opened.returncode == 0, opened.stderr
    done = [json.loads(line) for line in opened.stdout.splitlines() if line.startswith("{")][-1]
    assert done["event"] == "complete" and done["already_open"] is False and done["read_only"] is True
    snapshots = bench.repository / "snapshots"
    assert done["snapshots"] == str(snapshots)
    flags = os.statvfs(bench.rig.mount_point).f_flag
    assert browse.missing_flags(flags) == []  # ro, nosuid, nodev, noexec
    with pytest.raises(OSError, match="Read-only file system"):
        (snapshots / first / "plain.txt").write_text("changed\n")  # not even root

    copy = snapshots / first / "alice"
    assert reads(alice, copy / "private.txt").stdout == "alice's own\n"
    history = as_plain(alice, readable_code, "versions", "--json", str(home / "private.txt"))
    assert history.returncode == 0, history.stderr
    assert [v["first"] for v in json.loads(history.stdout)["versions"]] == [first]
    for path in (copy / "private.txt", snapshots / first / "root-only.txt"):
        looked = reads(mallory, path)
        assert looked.returncode != 0 and "Permission denied" in looked.stderr, (path, looked)
    assert reads(mallory, copy / "shared.txt").stdout == "anyone may read this\n"
    # The manifest names every file with a checksum of its content: root's alone.
    manifest = bench.repository / "metadata" / f"{first}.manifest"
    assert reads(mallory, manifest).returncode != 0 and reads(alice, manifest).returncode != 0
    assert reads(alice, snapshots / first / "root-only.txt").returncode != 0

    # A backup while it is open: made writable for the cycle, read-only again after; left open.
    (home / "shared.txt").write_text("edited\n")
    second = bench.backup_ok()
    assert browse.missing_flags(os.statvfs(bench.rig.mount_point).f_flag) == []
    assert (snapshots / second / "alice" / "shared.txt").read_text() == "edited\n"

    closed = through_sudo(alice, wrapper, "eject", "--json", "--disk", NAME)
    assert closed.returncode == 0, closed.stderr
    bench.assert_locked_and_unmounted()


# -- the agent: Browse backups, and closing the disk when nobody uses it ------------------------


@real
def test_the_agent_opens_a_disk_for_browsing_and_closes_it_once_unused(bench: Bench, here: None) -> None:
    bench.init()
    settle()

    async def scenario() -> None:
        open_argv = (sys.executable, "-m", "agent.cli", "open", "--json", "--config", str(bench.config))
        async with agent_on(bench, open_argv=open_argv, browse_idle=0.5) as (agent, recorder):
            await until(lambda: agent.cycle_pid is not None, "the plug-in's cycle to start")
            refused = await agent.browse(NAME)
            assert refused.result == "refused" and refused.message.startswith("a backup is running")
            await one_cycle(agent, recorder)
            bench.assert_locked_and_unmounted()

            assert recorder.of("disk_opened") == []  # refused: nothing opened
            reply = await agent.browse(NAME)
            assert recorder.of("disk_opened") == [(NAME,)]  # listeners hear it: "safe to unplug" is untrue now
            assert reply == BrowseReply("opened", f"{NAME} is open for browsing, read-only", str(bench.repository / "snapshots"))
            assert browse.missing_flags(os.statvfs(bench.rig.mount_point).f_flag) == []
            latest = bench.repository / "latest"
            with open(latest / "plain.txt", encoding="utf-8") as held:  # a program still reading: it stays open
                await asyncio.sleep(1.5)
                assert held.read() == "plain\n"
                assert browse.missing_flags(os.statvfs(bench.rig.mount_point).f_flag) == []
            await until(lambda: not bench.mounted_here() and not os.path.lexists(bench.rig.mapped),
                        "the disk to be closed once unused", 10)
            bench.assert_locked_and_unmounted()
            # Closed because browsing ended, not ejected: the schedule goes on
            # (once the agent has seen the close end, a moment after the disk is locked).
            await until(lambda: agent.timer is not None, "the schedule to go on after browsing", 10)
            assert agent.status().next_due is not None
            assert recorder.of("backup_failed") == []

    run(scenario(), timeout=60)
    bench.assert_locked_and_unmounted()


def test_the_agent_reads_how_the_open_ended() -> None:
    done = json.dumps({"event": "complete", "disk": NAME, "snapshots": "/mnt/b/h/snapshots", "already_open": False})
    assert browse_reply(NAME, 0, [done], [], through_sudo=True) == BrowseReply(
        "opened", f"{NAME} is open for browsing, read-only", "/mnt/b/h/snapshots")
    again = done.replace('"already_open": false', '"already_open": true')
    assert browse_reply(NAME, 0, [again], [], through_sudo=True).result == "already"
    busy = json.dumps({"event": "error", "step": "lock", "message": "a backup is running", "exit_code": 4})
    assert browse_reply(NAME, 4, [busy], [], through_sudo=True) == BrowseReply("refused", "a backup is running")
    no_rule = browse_reply(NAME, 1, [], ["sudo: a password is required"], through_sudo=True)
    assert no_rule.result == "failed" and "run sudo backup-agent install again" in no_rule.message
    assert browse_reply(NAME, 6, [], ["backup-agent: disk failed: not attached"], through_sudo=False) == BrowseReply(
        "failed", "disk failed: not attached")
