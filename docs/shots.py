"""Drives the real agent through a real backup and captures the README's pictures.

Run by ``scripts/screenshots``, which starts the virtual desktop (Xvfb, a
private session bus, dunst, xfce4-panel's status tray) and exports DISPLAY
and DBUS_SESSION_BUS_ADDRESS; this file is a documentation tool, not part of
the package.

Everything shown is real: ``backup-agent run --no-sudo`` runs as users run
it, finds the disk through udev, starts the real cycle (``backup --json``),
and its own notifier and tray talk to dunst and the panel over D-Bus. The
disk is the tests' rig (tests/test_disk.py): a real LUKS2 header on a loop
device, with the one stand-in this kernel needs (no device-mapper: the
"unlocked" device is a second, plain ext4 image; tests/helpers/fake_cryptdisks.py).
Two things are staged, and only these: rsync is the real one slowed with
``--bwlimit`` (a progress notification needs a transfer that lasts more than
a few seconds), and the agent's record of the last backup is set back in
time (3 days before the first picture, 9 days for the reminder).

Each picture is taken when the notification it shows has been sent (a
monitor on the private bus sees every ``Notify`` call), cropped to the top
right of the screen (the panel's end with the tray icon, and the
notifications below it), and refused if it came out empty.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dbus_fast import Message, MessageType, Variant  # noqa: E402
from dbus_fast.aio import MessageBus  # noqa: E402

from agent.desktop.passphrase import prompt_for, remember_question  # noqa: E402
from agent.desktop.pinentry import Pinentry  # noqa: E402
from agent.desktop.state import AgentStatus  # noqa: E402
from agent.desktop.statefile import DiskRecord, load_state, save_state, state_file_path  # noqa: E402
from tests.helpers.desktop_services import serve_upower  # noqa: E402
from tests.test_disk import Rig  # noqa: E402
from tests.test_disk_cycle import Bench  # noqa: E402
from tests.test_dbus_control import private_bus  # noqa: E402

CROP_WIDTH = 460  # the screen's right end: dunst (400 wide, 12 from the edge) and the tray
PANEL = 32  # xfce4-panel's height (scripts/screenshots); the tray icon is the last PANEL x PANEL square
WAIT = 60.0  # seconds any one awaited notification may take
MIN_COLOURS = 16  # fewer distinct colours than this: an empty capture
PHOTOS = 12  # new 1 MB files for the second backup, sent at ...
BWLIMIT_KB = 1000  # ... 1 MB/s: about 12 s, so a progress notification shows
DAY = 86400.0
DISK = "backup1"  # the disk's name in the pictures, as in the README's examples


class ShotError(Exception):
    """A picture could not be taken; the message says which and why."""


class Shown(NamedTuple):
    """One Notify call seen on the bus."""

    summary: str
    body: str
    hints: dict[str, Any]


# -- the bus ------------------------------------------------------------------------------


class NotifyWatch:
    """A monitor connection on the private session bus: every Notify call, in order."""

    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus
        self.seen: asyncio.Queue[Shown] = asyncio.Queue()

    @classmethod
    async def open(cls) -> "NotifyWatch":
        bus = await MessageBus().connect()
        watch = cls(bus)
        rule = "type='method_call',interface='org.freedesktop.Notifications',member='Notify'"
        reply = await bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                                       interface="org.freedesktop.DBus.Monitoring", member="BecomeMonitor",
                                       signature="asu", body=[[rule], 0]))
        if reply is None or reply.message_type is MessageType.ERROR:
            raise ShotError(f"cannot watch the session bus: {reply.body if reply else 'no reply'}")
        bus.add_message_handler(watch._on_message)
        return watch

    def _on_message(self, message: Message) -> bool:
        if message.member == "Notify" and message.signature == "susssasa{sv}i":
            hints = {key: value.value for key, value in message.body[6].items()}
            self.seen.put_nowait(Shown(str(message.body[3]), str(message.body[4]), hints))
        return True  # a monitor never answers

    async def next(self, wanted: Callable[[Shown], bool], what: str, agent: "Agent", timeout: float = WAIT) -> Shown:
        """The next notification that is ``wanted`` (others are passed over)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ShotError(f"no {what} notification within {timeout:.0f} s{agent.tail()}")
            try:
                shown = await asyncio.wait_for(self.seen.get(), min(left, 1.0))
            except asyncio.TimeoutError:
                agent.check()
                continue
            print(f"  notification: {shown.summary}", flush=True)
            if wanted(shown):
                return shown

    def drain(self) -> None:
        while not self.seen.empty():
            self.seen.get_nowait()


async def name_owned(bus: MessageBus, name: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reply = await bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                                       interface="org.freedesktop.DBus", member="NameHasOwner",
                                       signature="s", body=[name]))
        if reply is not None and reply.message_type is MessageType.METHOD_RETURN and reply.body[0]:
            return True
        await asyncio.sleep(0.2)
    return False


async def tray_items(bus: MessageBus) -> list[str]:
    """The items registered with the panel's StatusNotifierWatcher."""
    reply = await bus.call(Message(destination="org.kde.StatusNotifierWatcher", path="/StatusNotifierWatcher",
                                   interface="org.freedesktop.DBus.Properties", member="Get", signature="ss",
                                   body=["org.kde.StatusNotifierWatcher", "RegisteredStatusNotifierItems"]))
    if reply is None or reply.message_type is MessageType.ERROR:
        return []
    value = reply.body[0]
    return [str(item) for item in (value.value if isinstance(value, Variant) else value)]


# -- the agent ----------------------------------------------------------------------------


class Agent:
    """``backup-agent run --no-sudo`` in a subprocess, its log in a file."""

    def __init__(self, config: Path, log: Path, state_home: Path) -> None:
        self.config, self.log, self.state_home = config, log, state_home
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def state_file(self) -> str:
        return state_file_path({"XDG_STATE_HOME": str(self.state_home), "HOME": str(self.state_home)})

    def start(self, system_bus: str | None = None) -> None:
        env = dict(os.environ, XDG_STATE_HOME=str(self.state_home))
        if system_bus is not None:  # the laptop's battery: a UPower stand-in on a bus of its own
            env["DBUS_SYSTEM_BUS_ADDRESS"] = system_bus
        env.pop("SUDO_UID", None)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [str(REPO / ".venv" / "bin" / "backup-agent"), "run", "--no-sudo", "--config", str(self.config)],
                cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )

    def check(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise ShotError(f"the agent exited with status {self.process.returncode}{self.tail()}")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def tail(self) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()[-15:]
        except OSError:
            return ""
        return "; the agent's log ends with:\n" + "\n".join(lines) if lines else ""

    def remember(self, last_success: float, snapshot: str | None) -> None:
        """Set the agent's record of the last backup (it reads it when it starts)."""
        records, _ = load_state(self.state_file)
        records[DISK] = DiskRecord(last_success=last_success, last_result="success", last_snapshot=snapshot)
        save_state(self.state_file, records, AgentStatus(disk=DISK, last_success=last_success, last_result="success"))


# -- pictures -----------------------------------------------------------------------------


@dataclasses.dataclass
class Camera:
    out: Path
    work: Path
    width: int
    height: int
    background: str
    taken: list[str] = dataclasses.field(default_factory=list)

    def shoot(self, name: str, settle: float = 0.6) -> None:
        """The screen's top right, trimmed to what is on it, as OUT/NAME; refused if empty."""
        time.sleep(settle)  # dunst draws a notification a moment after Notify returns
        raw = self.work / "screen.png"
        target = self.out / name
        _run("import", "-window", "root", str(raw))
        # Xvfb's root window is black (xsetroot does not show in a capture): the
        # desktop is the black area around the pictures, coloured by a flood
        # fill from a bottom corner. Then a one-pixel frame of that colour makes
        # every corner the background, so -trim keeps exactly the panel's end
        # and what hangs below it.
        _run("convert", str(raw), "-crop", f"{CROP_WIDTH}x{self.height}+{self.width - CROP_WIDTH}+0", "+repage",
             "-fill", self.background, "-draw", f"color 0,{self.height - 1} floodfill",
             "-bordercolor", self.background, "-border", "1", "-trim", "+repage",
             "-gravity", "south", "-background", self.background, "-splice", "0x12", str(target))
        colours, width, height = (int(v) for v in _run("identify", "-format", "%k %w %h", str(target)).split())
        if colours < MIN_COLOURS or height < PANEL + 40:
            raise ShotError(f"{target} came out empty ({colours} colours, {width}x{height}): nothing was on screen")
        self.taken.append(name)
        print(f"  took {target} ({width}x{height}, {colours} colours)", flush=True)

    def shoot_screen(self, name: str, settle: float = 1.0) -> None:
        """The whole screen as OUT/NAME (a file manager window beside the panel and a notification)."""
        time.sleep(settle)
        target = self.out / name
        _run("import", "-window", "root", str(self.work / "screen.png"))
        _run("convert", str(self.work / "screen.png"), "-fill", self.background,
             "-draw", f"color {self.width - 1},{self.height - 1} floodfill", str(target))
        colours, width, height = (int(v) for v in _run("identify", "-format", "%k %w %h", str(target)).split())
        if colours < MIN_COLOURS:
            raise ShotError(f"{target} came out empty ({colours} colours): nothing was on screen")
        self.taken.append(name)
        print(f"  took {target} ({width}x{height}, {colours} colours)", flush=True)


def _run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise ShotError(f"{' '.join(argv)} failed (exit {done.returncode}): {done.stderr.strip()}")
    return done.stdout


def close_notifications() -> None:
    _run("dunstctl", "close-all")
    time.sleep(0.3)


def trusted_directory() -> Path:
    """Where root may run the stand-ins from: root's own cache, 0755 (agent.config.trust.check_trusted)."""
    base = Path(pwd.getpwuid(os.geteuid()).pw_dir) / ".cache" / "backup-agent-shots"  # not $HOME: a temporary one
    base.mkdir(mode=0o755, parents=True, exist_ok=True)
    made = Path(tempfile.mkdtemp(dir=base))
    made.chmod(0o755)
    return made


def slow_rsync(directory: Path) -> Path:
    """The real rsync, slowed down (the one staged part of the transfer)."""
    path = directory / "rsync-slow"
    path.write_text(f'#!/bin/sh\nexec {shutil.which("rsync") or "/usr/bin/rsync"} --bwlimit={BWLIMIT_KB} "$@"\n')
    path.chmod(0o755)
    return path


# -- the story ----------------------------------------------------------------------------


def category(name: str, *, progress: bool | None = None) -> Callable[[Shown], bool]:
    def wanted(shown: Shown) -> bool:
        if shown.hints.get("category") != name:
            return False
        return progress is None or ("value" in shown.hints) == progress

    return wanted


async def passphrase_prompt(camera: Camera) -> None:
    """The prompt for a disk without a key file: the real pinentry-gtk-2, asked with the agent's own words.

    The agent's Pinentry speaks to it as it does in a session (agent.desktop.pinentry);
    once its window is up, the window alone is captured and the question is
    given up on, which closes it.
    """
    program = shutil.which("pinentry-gtk-2") or shutil.which("pinentry-gtk2")
    if program is None:
        raise ShotError("pinentry-gtk-2 is not installed (apt-get install -y pinentry-gtk2)")
    asking = asyncio.create_task(Pinentry(program).get_pin(prompt_for(DISK, "backup"), remember_question(DISK)))
    try:
        window = ""
        deadline = time.monotonic() + 20
        while not window:
            if asking.done() or time.monotonic() > deadline:
                raise ShotError("the passphrase prompt did not show within 20 s")
            found = subprocess.run(["xdotool", "search", "--onlyvisible", "--name", f"Backup disk {DISK}"],
                                   capture_output=True, text=True)
            window = found.stdout.split()[0] if found.stdout.split() else ""
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # drawn a moment after it is mapped
        target = camera.out / "passphrase-prompt.png"
        _run("import", "-window", window, str(camera.work / "prompt.png"))
        _run("convert", str(camera.work / "prompt.png"), "-bordercolor", "#4c566a", "-border", "1", str(target))
        colours = int(_run("identify", "-format", "%k", str(target)))
        if colours < MIN_COLOURS:
            raise ShotError(f"{target} came out empty ({colours} colours)")
        camera.taken.append(target.name)
        print(f"  took {target}", flush=True)
    finally:
        asking.cancel()  # the dialog is closed with it
        with contextlib.suppress(asyncio.CancelledError):
            await asking


async def story(camera: Camera, bench: Bench, agent: Agent, watch: NotifyWatch, bus: MessageBus) -> list[str]:
    """Take the pictures; returns what could not be taken yet (a part not built), with why."""
    missing: list[str] = []
    rig = bench.rig

    bench.init()
    first = bench.backup_ok()  # a first snapshot, so the pictured backup is an incremental one
    photos = bench.source / "photos"
    photos.mkdir()
    for number in range(PHOTOS):
        (photos / f"IMG_{number + 1:04d}.jpg").write_bytes(os.urandom(1_000_000))
    bench.write_config(rsync=slow_rsync(bench.trusted))
    agent.remember(time.time() - 3 * DAY, first)

    print("plugged-in disk: started, progress, complete", flush=True)
    agent.start()
    await watch.next(category("transfer", progress=False), "backup started", agent)
    camera.shoot("notification-started.png")
    await watch.next(category("transfer", progress=True), "progress", agent)
    camera.shoot("notification-progress.png")
    await watch.next(category("transfer.complete"), "completed (safe to unplug)", agent)
    camera.shoot("notification-complete.png")

    print("tray menu", flush=True)
    if await tray_items(bus):
        close_notifications()
        _run("xdotool", "mousemove", str(camera.width - PANEL // 2), str(PANEL // 2), "click", "1")
        camera.shoot("tray-menu.png", settle=1.0)
        _run("xdotool", "key", "Escape")
        # The pointer leaves the icon: its tooltip would cover the next picture.
        _run("xdotool", "mousemove", "0", str(camera.height - 1))
    else:
        missing.append("tray-menu.png: the agent registered no StatusNotifierItem with the panel (no tray yet)")

    print("browsing the backups from the tray", flush=True)
    if await tray_items(bus) and shutil.which("xdg-open"):
        close_notifications()
        watch.drain()
        _run("xdotool", "mousemove", str(camera.width - PANEL // 2), str(PANEL // 2), "click", "1")
        time.sleep(1.0)
        # Keyboard through the menu: Down skips disabled items (Stop, Open latest backup):
        # Back up now, Eject backup1, Browse backups.
        _run("xdotool", "key", "Down", "Down", "Down")
        camera.shoot("tray-browse.png", settle=0.8)
        _run("xdotool", "key", "Return")
        _run("xdotool", "mousemove", "0", str(camera.height - 1))
        await watch.next(lambda shown: shown.summary.startswith("Browsing the backups on"), "browsing", agent)
        # The file manager's window, when there is one within 15 s (the picture shows what is there).
        subprocess.run(["timeout", "15", "xdotool", "search", "--sync", "--onlyvisible", "--class", "Thunar"],
                       capture_output=True)
        camera.shoot_screen("browse-backups.png", settle=2.0)
        close_notifications()
        closed = subprocess.run([str(REPO / ".venv" / "bin" / "backup-agent"), "eject", "--disk", DISK,
                                 "--config", str(bench.config)], capture_output=True, text=True)
        if closed.returncode != 0:
            print(f"  the disk stays open: {closed.stderr.strip()}", flush=True)
    else:
        missing.append("browse-backups.png: no tray, or xdg-open is not installed (package xdg-utils)")

    print("a failed backup (the disk is full)", flush=True)
    close_notifications()
    watch.drain()
    for number in range(PHOTOS, 3 * PHOTOS):
        (photos / f"IMG_{number + 1:04d}.jpg").write_bytes(os.urandom(1_000_000))
    _run(str(REPO / ".venv" / "bin" / "backup-agent"), "now")
    await watch.next(category("transfer.error"), "failed", agent)
    camera.shoot("notification-failed.png")

    print("the reminder at login, the last backup 9 days ago, the disk not attached", flush=True)
    agent.stop()
    _run("losetup", "-d", rig.luks_device)  # unplugged (the rig's cleanup leaves a detached device alone)
    agent.remember(time.time() - 9 * DAY, first)
    close_notifications()
    watch.drain()
    agent.start()
    try:
        await watch.next(lambda shown: True, "reminder", agent, timeout=15)
        camera.shoot("notification-reminder.png")
    except ShotError as exc:
        agent.check()
        missing.append(f"notification-reminder.png: {exc}".split("; the agent's log")[0])
    agent.stop()

    print("plugged in on a low battery: the due backup waits", flush=True)
    agent.remember(time.time() - 3 * DAY, first)
    close_notifications()
    watch.drain()
    # This machine has no battery: UPower is a stand-in (tests/helpers/desktop_services.py) on a
    # private bus that the agent takes for the system bus; it says "on battery, 18 %".
    with private_bus("system") as system:
        upower_bus, _, _ = await serve_upower(system.address, on_battery=True, percent=18.0)
        try:
            agent.start(system_bus=system.address)
            await asyncio.sleep(2.0)  # the agent reads the battery, then watches udev
            rig.attach(rig.luks_image)
            await watch.next(lambda shown: shown.summary == f"{DISK}: backup waits", "waits on battery", agent)
            camera.shoot("notification-skipped-battery.png")
        finally:
            agent.stop()
            upower_bus.disconnect()
    return missing


async def main(args: argparse.Namespace) -> int:
    width, height = (int(v) for v in args.screen.split("x"))
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="backup-agent-shots-"))
    trusted = trusted_directory()
    camera = Camera(args.out, work, width, height, args.background)
    # A machine lock of its own (as the tests do): a backup running on this
    # machine meanwhile neither blocks these cycles nor is blocked by them.
    os.environ["BACKUP_AGENT_RUNTIME_DIR"] = str(work / "run")
    (work / "run").mkdir(mode=0o700)
    buses: list[MessageBus] = []
    try:
        bus = await MessageBus().connect()
        buses.append(bus)
        for name, what in (("org.freedesktop.Notifications", "the notification server (dunst)"),
                           ("org.kde.StatusNotifierWatcher", "the tray host (xfce4-panel's status tray)")):
            if not await name_owned(bus, name, 20):
                raise ShotError(f"{what} did not appear on the session bus ({name}) within 20 s")
        watch = await NotifyWatch.open()
        buses.append(watch.bus)
        await passphrase_prompt(camera)
        rig = Rig(work, trusted, name=DISK)
        try:
            bench = Bench(rig, trusted)
            agent = Agent(bench.config, args.log, work / "state-home")
            try:
                missing = await story(camera, bench, agent, watch, bus)
            finally:
                agent.stop()
                bench.cleanup()
        finally:
            rig.cleanup()
    except ShotError as exc:
        print(f"screenshots: {exc}", file=sys.stderr)
        return 1
    finally:
        for connection in buses:
            connection.disconnect()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(trusted, ignore_errors=True)
    print(f"took {', '.join(camera.taken)} in {args.out}")
    for line in missing:
        print(f"not taken: {line}", file=sys.stderr)
    return 0


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, required=True, help="where the PNGs go")
    parser.add_argument("--screen", required=True, help="the virtual screen's WIDTHxHEIGHT")
    parser.add_argument("--background", required=True, help="the desktop's colour (trimmed around the pictures)")
    parser.add_argument("--log", type=Path, required=True, help="the agent's log")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse(sys.argv[1:]))))
