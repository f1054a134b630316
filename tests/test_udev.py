"""Watching udev (agent/desktop/udev.py): the pure matching and tracking, then real udev events.

The pure part is fed hand-made events shaped like udev's. The integration
tests (``-m integration``) use a real udevd (the one running, or one started
here and stopped afterwards by its pid), a real LUKS2 header on a loop
device, and the real events the kernel and udevd send: loop devices send
``change`` when attached and detached (no ``remove``), and ``udevadm
trigger`` makes more. Each test detaches the loop devices it attached, by
the names losetup gave it, and only while they still hold its image.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config.model import Disk
from agent.desktop.udev import DeviceEvent, DiskGone, DiskSeen, Monitor, Tracker, enumerate_present, match

UUID_A = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
UUID_B = "9f8e7d6c-5b4a-4392-8170-6f5e4d3c2b1a"
UUID_OTHER = "11111111-2222-4333-8444-555555555555"


def make_disk(name: str = "usb-a", uuid: str = UUID_A) -> Disk:
    return Disk(
        name=name,
        luks_uuid=uuid,
        mount_point=f"/mnt/{name}",
        mapped_device=f"/dev/mapper/{name}",
        repository=f"/mnt/{name}/host",
    )


DISK_A = make_disk("usb-a", UUID_A)
DISK_B = make_disk("usb-b", UUID_B)


def luks(uuid: str) -> dict[str, str]:
    """The properties udev gives a LUKS partition (ID_FS_* from blkid), with some company."""
    return {"SUBSYSTEM": "block", "DEVTYPE": "partition", "ID_FS_TYPE": "crypto_LUKS", "ID_FS_UUID": uuid, "ID_FS_VERSION": "2"}


def event(action: str, device: str, properties: dict[str, str] | None = None) -> DeviceEvent:
    return DeviceEvent(action, device, {"SUBSYSTEM": "block", "DEVNAME": device} if properties is None else properties)


# -- match ------------------------------------------------------------------


def test_match_names_the_disk_whose_luks_uuid_the_device_carries() -> None:
    disks = [DISK_A, DISK_B]
    assert match(disks, event("add", "/dev/sdb1", luks(UUID_A))) == "usb-a"
    assert match(disks, event("change", "/dev/loop3", luks(UUID_B))) == "usb-b"
    assert match(disks, event("add", "/dev/sdc1", luks(UUID_OTHER))) is None
    assert match([], event("add", "/dev/sdb1", luks(UUID_A))) is None


def test_match_ignores_the_case_of_the_uuid_on_either_side() -> None:
    assert match([DISK_A], event("add", "/dev/sdb1", luks(UUID_A.upper()))) == "usb-a"
    assert match([make_disk("usb-a", UUID_A.upper())], event("add", "/dev/sdb1", luks(UUID_A))) == "usb-a"


def test_match_requires_a_luks_header_not_just_the_uuid() -> None:
    for fs_type in ("ext4", "crypto_luks", "LUKS", "", "crypto_LUKS "):
        properties = {**luks(UUID_A), "ID_FS_TYPE": fs_type}
        assert match([DISK_A], event("add", "/dev/sdb1", properties)) is None, fs_type


def test_match_without_the_properties_is_none() -> None:
    no_type = {k: v for k, v in luks(UUID_A).items() if k != "ID_FS_TYPE"}
    no_uuid = {k: v for k, v in luks(UUID_A).items() if k != "ID_FS_UUID"}
    assert match([DISK_A], event("add", "/dev/sdb1", no_type)) is None
    assert match([DISK_A], event("add", "/dev/sdb1", no_uuid)) is None
    assert match([DISK_A], event("add", "/dev/sdb1", {})) is None
    assert match([make_disk("blank", "")], event("add", "/dev/sdb1", {**luks(UUID_A), "ID_FS_UUID": ""})) is None


def test_match_looks_at_properties_only_not_at_the_device_name_or_action() -> None:
    assert match([DISK_A], event("remove", "/sys/devices/virtual/block/loop9", luks(UUID_A))) == "usb-a"


# -- Tracker ----------------------------------------------------------------


def test_a_burst_of_events_for_one_plug_in_gives_one_disk_seen() -> None:
    tracker = Tracker([DISK_A])
    assert tracker.feed(event("add", "/dev/sdb1", luks(UUID_A))) == [DiskSeen("usb-a", "/dev/sdb1")]
    for action in ("change", "change", "add", "present", "change"):
        assert tracker.feed(event(action, "/dev/sdb1", luks(UUID_A))) == []
    assert tracker.attached() == {"usb-a": "/dev/sdb1"}


def test_change_and_present_count_as_plug_in() -> None:
    for action in ("change", "present"):
        tracker = Tracker([DISK_A])
        assert tracker.feed(event(action, "/dev/loop3", luks(UUID_A))) == [DiskSeen("usb-a", "/dev/loop3")]


def test_loop_detach_is_a_change_without_the_properties() -> None:
    tracker = Tracker([DISK_A])
    tracker.feed(event("change", "/dev/loop3", luks(UUID_A)))
    assert tracker.feed(event("change", "/dev/loop3")) == [DiskGone("usb-a", "/dev/loop3")]
    assert tracker.feed(event("change", "/dev/loop3")) == []  # the second change of a detach
    assert tracker.attached() == {}


def test_remove_is_gone_even_though_it_still_carries_the_properties() -> None:
    tracker = Tracker([DISK_A])
    tracker.feed(event("add", "/dev/sdb1", luks(UUID_A)))
    # udev's remove events repeat the device's last properties
    assert tracker.feed(event("remove", "/dev/sdb1", luks(UUID_A))) == [DiskGone("usb-a", "/dev/sdb1")]
    assert tracker.feed(event("remove", "/dev/sdb1", luks(UUID_A))) == []
    assert tracker.attached() == {}


def test_reattached_after_gone_is_seen_again_on_whatever_device() -> None:
    tracker = Tracker([DISK_A])
    assert tracker.feed(event("add", "/dev/sdb1", luks(UUID_A))) == [DiskSeen("usb-a", "/dev/sdb1")]
    assert tracker.feed(event("remove", "/dev/sdb1")) == [DiskGone("usb-a", "/dev/sdb1")]
    assert tracker.feed(event("add", "/dev/sdc1", luks(UUID_A))) == [DiskSeen("usb-a", "/dev/sdc1")]
    assert tracker.feed(event("remove", "/dev/sdc1")) == [DiskGone("usb-a", "/dev/sdc1")]
    assert tracker.feed(event("add", "/dev/sdb1", luks(UUID_A))) == [DiskSeen("usb-a", "/dev/sdb1")]


def test_two_disks_are_tracked_independently() -> None:
    tracker = Tracker([DISK_A, DISK_B])
    assert tracker.feed(event("add", "/dev/sdb1", luks(UUID_A))) == [DiskSeen("usb-a", "/dev/sdb1")]
    assert tracker.feed(event("add", "/dev/sdc1", luks(UUID_B))) == [DiskSeen("usb-b", "/dev/sdc1")]
    assert tracker.attached() == {"usb-a": "/dev/sdb1", "usb-b": "/dev/sdc1"}
    assert tracker.feed(event("remove", "/dev/sdb1")) == [DiskGone("usb-a", "/dev/sdb1")]
    assert tracker.feed(event("change", "/dev/sdc1", luks(UUID_B))) == []
    assert tracker.attached() == {"usb-b": "/dev/sdc1"}


def test_unrelated_devices_give_nothing() -> None:
    tracker = Tracker([DISK_A])
    assert tracker.feed(event("add", "/dev/sda1", {**luks(UUID_A), "ID_FS_TYPE": "ext4"})) == []
    assert tracker.feed(event("add", "/dev/sdd1", luks(UUID_OTHER))) == []
    assert tracker.feed(event("change", "/dev/loop0")) == []
    assert tracker.feed(event("remove", "/dev/sdd1", luks(UUID_OTHER))) == []
    assert tracker.feed(event("remove", "/dev/sde")) == []
    assert tracker.attached() == {}


def test_a_clone_is_ignored_while_the_first_device_carries_the_disk() -> None:
    tracker = Tracker([DISK_A])
    tracker.feed(event("add", "/dev/sdb1", luks(UUID_A)))
    assert tracker.feed(event("add", "/dev/sdc1", luks(UUID_A))) == []
    assert tracker.feed(event("change", "/dev/sdc1", luks(UUID_A))) == []
    assert tracker.feed(event("remove", "/dev/sdc1")) == []  # the clone never carried it
    assert tracker.attached() == {"usb-a": "/dev/sdb1"}
    assert tracker.feed(event("remove", "/dev/sdb1")) == [DiskGone("usb-a", "/dev/sdb1")]  # and no clone left


def test_when_the_first_device_goes_a_clone_still_present_is_seen_at_once() -> None:
    tracker = Tracker([DISK_A])
    tracker.feed(event("add", "/dev/sdb1", luks(UUID_A)))
    tracker.feed(event("add", "/dev/sdc1", luks(UUID_A)))
    tracker.feed(event("add", "/dev/sdd1", luks(UUID_A)))
    assert tracker.feed(event("change", "/dev/sdb1")) == [DiskGone("usb-a", "/dev/sdb1"), DiskSeen("usb-a", "/dev/sdc1")]
    assert tracker.attached() == {"usb-a": "/dev/sdc1"}
    assert tracker.feed(event("change", "/dev/sdc1", luks(UUID_A))) == []


def test_a_device_reused_for_another_disk_gives_gone_then_seen() -> None:
    tracker = Tracker([DISK_A, DISK_B])
    tracker.feed(event("change", "/dev/loop3", luks(UUID_A)))
    assert tracker.feed(event("change", "/dev/loop3", luks(UUID_B))) == [
        DiskGone("usb-a", "/dev/loop3"),
        DiskSeen("usb-b", "/dev/loop3"),
    ]


def test_attached_is_a_copy() -> None:
    tracker = Tracker([DISK_A])
    tracker.feed(event("add", "/dev/sdb1", luks(UUID_A)))
    tracker.attached().clear()
    assert tracker.attached() == {"usb-a": "/dev/sdb1"}


def test_resync_reports_only_the_differences() -> None:
    tracker = Tracker([DISK_A, DISK_B])
    tracker.feed(event("add", "/dev/sdb1", luks(UUID_A)))
    tracker.feed(event("add", "/dev/sdc1", luks(UUID_B)))
    same = [event("present", "/dev/sda1"), event("present", "/dev/sdb1", luks(UUID_A)), event("present", "/dev/sdc1", luks(UUID_B))]
    assert tracker.resync(same) == []
    # while events were lost, B went, and A moved to sdd1 (sdb1 is now plain)
    moved = [event("present", "/dev/sdb1"), event("present", "/dev/sdd1", luks(UUID_A))]
    assert tracker.resync(moved) == [
        DiskGone("usb-a", "/dev/sdb1"),
        DiskGone("usb-b", "/dev/sdc1"),
        DiskSeen("usb-a", "/dev/sdd1"),
    ]
    assert tracker.attached() == {"usb-a": "/dev/sdd1"}
    assert tracker.feed(event("change", "/dev/sdd1", luks(UUID_A))) == []
    assert tracker.feed(event("remove", "/dev/sdd1")) == [DiskGone("usb-a", "/dev/sdd1")]


def test_resync_keeps_the_disk_on_its_device_over_a_clone_listed_first() -> None:
    tracker = Tracker([DISK_A])
    tracker.feed(event("add", "/dev/sdc1", luks(UUID_A)))
    present = [event("present", "/dev/sdb1", luks(UUID_A)), event("present", "/dev/sdc1", luks(UUID_A))]
    assert tracker.resync(present) == []
    assert tracker.attached() == {"usb-a": "/dev/sdc1"}
    assert tracker.feed(event("remove", "/dev/sdc1")) == [DiskGone("usb-a", "/dev/sdc1"), DiskSeen("usb-a", "/dev/sdb1")]


# Any sequence of events over a few devices, two disks and some strangers.
DEVICES = ["/dev/sdb1", "/dev/sdc1", "/dev/loop3"]
PROPERTIES = [
    luks(UUID_A),
    luks(UUID_A.upper()),
    luks(UUID_B),
    luks(UUID_OTHER),
    {**luks(UUID_A), "ID_FS_TYPE": "ext4"},
    {"SUBSYSTEM": "block"},
]
events = st.builds(
    event,
    st.sampled_from(["add", "change", "present", "remove"]),
    st.sampled_from(DEVICES),
    st.sampled_from(PROPERTIES),
)
# A tuple is a resync: the devices present now, after events were lost.
steps = st.lists(st.one_of(events, st.lists(events, max_size=4).map(tuple)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(steps)
def test_seen_and_gone_alternate_per_disk_and_attached_follows_the_latest_events(
    sequence: list[DeviceEvent | tuple[DeviceEvent, ...]],
) -> None:
    disks = [DISK_A, DISK_B]
    tracker = Tracker(disks)
    shown: dict[str, str] = {}  # what the reported changes say is attached
    latest: dict[str, str | None] = {}  # device -> the disk its latest event carries
    for item in sequence:
        if isinstance(item, tuple):
            present = [DeviceEvent("present", e.device, e.properties) for e in item]
            latest = {e.device: match(disks, e) for e in present}
            changes = tracker.resync(present)
        else:
            latest[item.device] = None if item.action == "remove" else match(disks, item)
            changes = tracker.feed(item)
            if item.device not in shown.values() and latest[item.device] in (None, *shown):
                assert changes == [], "an event that changes nothing must report nothing"
        for change in changes:
            if isinstance(change, DiskSeen):
                assert change.disk not in shown, f"two DiskSeen in a row for {change.disk}"
                shown[change.disk] = change.device
            else:
                assert shown.get(change.disk) == change.device, f"{change} for a disk not seen there"
                del shown[change.disk]
        assert tracker.attached() == shown
        # Nothing missed, nothing stale: a disk is attached exactly when some device's latest event
        # carries it, and then on such a device.
        for disk in ("usb-a", "usb-b"):
            carriers = {device for device, carried in latest.items() if carried == disk}
            assert (disk in shown) == bool(carriers), (disk, latest, shown)
            if disk in shown:
                assert shown[disk] in carriers
        # Re-reading what is known already changes nothing.
        assert tracker.resync([event("present", d, luks(UUID_A if c == "usb-a" else UUID_B)) for d, c in latest.items() if c]) == []


# -- real udev --------------------------------------------------------------

UDEVD = "/lib/systemd/systemd-udevd"
NAME = "usb-backup"
WAIT = 2.0  # seconds an event may take from the kernel to the agent


def _missing_parts() -> str | None:
    if os.geteuid() != 0:
        return "needs root (loop devices, udevd)"
    for tool in ("udevadm", "losetup", "cryptsetup"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed: run scripts/test, which installs udev, util-linux and cryptsetup"
    if not os.path.exists(UDEVD):
        return f"{UDEVD} is missing: run scripts/test, which installs udev"
    if not os.path.exists("/dev/loop-control"):
        return "no loop devices here (/dev/loop-control is missing)"
    return None


def _udevd_answers() -> bool:
    result = subprocess.run(["udevadm", "control", "--ping", "--timeout=1"], capture_output=True)
    return result.returncode == 0


@pytest.fixture(scope="module")
def udevd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A running udevd: the machine's own, or one started here and stopped afterwards.

    Started in the foreground (not --daemon) so that its pid is known
    exactly, with no search that could pick someone else's udevd; it is
    stopped by that pid, then what is left of its process group (its
    workers). A udevd that was already running is used and never touched.
    If none can start, the tests skip with the reason (which fails CI).
    """
    missing = _missing_parts()
    if missing is not None:
        pytest.skip(reason=missing)
    if _udevd_answers():
        yield
        return
    log_path = tmp_path_factory.mktemp("udevd") / "udevd.log"
    with open(log_path, "wb") as log_file:
        # Its own process group: its workers join it, and are stopped with it.
        process = subprocess.Popen(
            [UDEVD], stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 5
        while not _udevd_answers():
            if process.poll() is not None:
                output = log_path.read_text(errors="replace").strip()[-500:]
                pytest.skip(reason=f"{UDEVD} could not start (exit status {process.returncode}): {output}")
            if time.monotonic() > deadline:
                pytest.skip(reason=f"{UDEVD} (pid {process.pid}) did not answer udevadm control --ping within 5 s")
            time.sleep(0.05)
        yield
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        # A worker may outlive it (workers block SIGTERM): the group is only
        # udevd's own processes, and exists only while one of them does.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


def run(*argv: str) -> str:
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed with {result.returncode}: {result.stderr.strip()}")
    return result.stdout.strip()


def settle() -> None:
    run("udevadm", "settle", "--timeout=5")


class Loops:
    """Loop devices this test attached; detached by name at the end, only while they still hold its image."""

    def __init__(self) -> None:
        self.attached: dict[str, str] = {}  # device -> image

    def attach(self, image: Path) -> str:
        device = run("losetup", "-f", "--show", str(image))
        self.attached[device] = str(image)
        return device

    def detach(self, device: str) -> None:
        run("losetup", "-d", device)
        del self.attached[device]

    def cleanup(self) -> None:
        for device, image in list(self.attached.items()):
            backing = subprocess.run(
                ["losetup", "--noheadings", "--list", "-O", "BACK-FILE", device], capture_output=True, text=True
            ).stdout.strip()
            if backing.removesuffix(" (deleted)") == image:
                subprocess.run(["losetup", "-d", device], capture_output=True)
            del self.attached[device]


@pytest.fixture
def loops() -> Iterator[Loops]:
    made = Loops()
    try:
        yield made
    finally:
        made.cleanup()


@pytest.fixture
def luks_image(tmp_path: Path) -> tuple[Path, str]:
    """A 20 MB image with a real LUKS2 header (fast pbkdf2), and the header's UUID."""
    image = tmp_path / "disk.img"
    key = tmp_path / "key"
    key.write_bytes(secrets.token_bytes(32))
    run("truncate", "-s", "20M", str(image))
    run(
        "cryptsetup", "luksFormat", "--type", "luks2", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
        "--batch-mode", str(image), str(key),
    )
    return image, run("cryptsetup", "luksUUID", str(image))


class Recorder:
    """Collects what the Monitor reports, for awaiting one change at a time."""

    def __init__(self) -> None:
        self.changes: list[DiskSeen | DiskGone] = []
        self._queue: asyncio.Queue[DiskSeen | DiskGone] = asyncio.Queue()

    def __call__(self, change: DiskSeen | DiskGone) -> None:
        self.changes.append(change)
        self._queue.put_nowait(change)

    async def next(self) -> DiskSeen | DiskGone:
        """The oldest change not yet taken, waiting up to WAIT seconds for it."""
        return await asyncio.wait_for(self._queue.get(), WAIT)

    async def quiet(self, seconds: float = 0.3) -> None:
        """Let the loop handle whatever is still queued on the monitor's socket."""
        await asyncio.sleep(seconds)


class RawEvents:
    """An independent pyudev monitor counting the raw events per device, to know udev really sent them."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        import pyudev

        self.counts: Counter[str] = Counter()
        self._loop = loop
        self._monitor = pyudev.Monitor.from_netlink(pyudev.Context())
        self._monitor.filter_by(subsystem="block")
        self._monitor.start()
        loop.add_reader(self._monitor.fileno(), self._read)

    def _read(self) -> None:
        for device in iter(lambda: self._monitor.poll(timeout=0), None):
            self.counts[device.device_node] += 1

    async def wait(self, device: str, count: int) -> None:
        deadline = time.monotonic() + WAIT
        while self.counts[device] < count:
            assert time.monotonic() < deadline, f"udev sent {self.counts[device]} events for {device}, expected {count}"
            await asyncio.sleep(0.02)

    def close(self) -> None:
        self._loop.remove_reader(self._monitor.fileno())


@pytest.mark.usefixtures("udevd")
@pytest.mark.integration
@pytest.mark.root
def test_attach_and_detach_give_seen_and_gone(luks_image: tuple[Path, str], loops: Loops) -> None:
    image, uuid = luks_image

    async def scenario() -> None:
        recorder = Recorder()
        monitor = Monitor([make_disk(NAME, uuid)], recorder)
        monitor.start(asyncio.get_running_loop())
        try:
            assert recorder.changes == []
            for _ in range(2):  # and once more: re-attached after gone is seen again
                device = loops.attach(image)
                assert await recorder.next() == DiskSeen(NAME, device)
                assert monitor.attached() == {NAME: device}
                loops.detach(device)
                assert await recorder.next() == DiskGone(NAME, device)
                assert monitor.attached() == {}
            settle()
            await recorder.quiet()
            assert len(recorder.changes) == 4
        finally:
            monitor.stop()

    asyncio.run(scenario())


@pytest.mark.usefixtures("udevd")
@pytest.mark.integration
@pytest.mark.root
def test_a_disk_attached_before_the_start_is_found_by_enumeration(luks_image: tuple[Path, str], loops: Loops) -> None:
    image, uuid = luks_image
    device = loops.attach(image)
    settle()  # udevd has recorded its properties, and its event is long gone
    assert any(e.device == device and e.properties.get("ID_FS_UUID") == uuid for e in enumerate_present(_context()))

    async def scenario() -> None:
        recorder = Recorder()
        monitor = Monitor([make_disk(NAME, uuid.upper())], recorder)
        monitor.start(asyncio.get_running_loop())
        try:
            assert recorder.changes == [DiskSeen(NAME, device)]  # reported by start() itself
            assert await recorder.next() == DiskSeen(NAME, device)
            await recorder.quiet()
            assert recorder.changes == [DiskSeen(NAME, device)]
            loops.detach(device)
            assert await recorder.next() == DiskGone(NAME, device)
        finally:
            monitor.stop()

    asyncio.run(scenario())


@pytest.mark.usefixtures("udevd")
@pytest.mark.integration
@pytest.mark.root
def test_a_disk_attached_just_before_the_start_is_reported_once(luks_image: tuple[Path, str], loops: Loops) -> None:
    """Attached with no settling: its event may reach the monitor, the enumeration, or both; one DiskSeen."""
    image, uuid = luks_image

    async def scenario() -> None:
        recorder = Recorder()
        device = loops.attach(image)
        monitor = Monitor([make_disk(NAME, uuid)], recorder)
        monitor.start(asyncio.get_running_loop())
        try:
            assert await recorder.next() == DiskSeen(NAME, device)
            settle()
            await recorder.quiet()
            assert recorder.changes == [DiskSeen(NAME, device)]
        finally:
            monitor.stop()

    asyncio.run(scenario())


@pytest.mark.usefixtures("udevd")
@pytest.mark.integration
@pytest.mark.root
def test_a_burst_of_change_events_gives_one_disk_seen(luks_image: tuple[Path, str], loops: Loops) -> None:
    image, uuid = luks_image

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        raw = RawEvents(loop)
        recorder = Recorder()
        monitor = Monitor([make_disk(NAME, uuid)], recorder)
        monitor.start(loop)
        try:
            device = loops.attach(image)
            for _ in range(4):
                run("udevadm", "trigger", "--action=change", device)
            await raw.wait(device, 5)  # the attach, and the four triggered changes
            await recorder.quiet()
            assert recorder.changes == [DiskSeen(NAME, device)]
            assert await recorder.next() == DiskSeen(NAME, device)
            loops.detach(device)
            assert await recorder.next() == DiskGone(NAME, device)
            await raw.wait(device, 7)  # a detach sends two changes
            await recorder.quiet()
            assert recorder.changes == [DiskSeen(NAME, device), DiskGone(NAME, device)]
        finally:
            monitor.stop()
            raw.close()

    asyncio.run(scenario())


@pytest.mark.usefixtures("udevd")
@pytest.mark.integration
@pytest.mark.root
def test_a_real_remove_event_is_gone_and_add_is_seen_again(luks_image: tuple[Path, str], loops: Loops) -> None:
    """udevadm trigger --action=remove makes the kernel send a real remove (still carrying the UUID in udev's copy)."""
    image, uuid = luks_image

    async def scenario() -> None:
        recorder = Recorder()
        monitor = Monitor([make_disk(NAME, uuid)], recorder)
        monitor.start(asyncio.get_running_loop())
        try:
            device = loops.attach(image)
            assert await recorder.next() == DiskSeen(NAME, device)
            run("udevadm", "trigger", "--action=remove", device)
            assert await recorder.next() == DiskGone(NAME, device)
            run("udevadm", "trigger", "--action=add", device)
            assert await recorder.next() == DiskSeen(NAME, device)
        finally:
            monitor.stop()

    asyncio.run(scenario())


@pytest.mark.usefixtures("udevd")
@pytest.mark.integration
@pytest.mark.root
def test_a_failing_handler_is_logged_and_stop_from_the_handler_is_clean(
    luks_image: tuple[Path, str], loops: Loops, caplog: pytest.LogCaptureFixture
) -> None:
    image, uuid = luks_image

    async def scenario() -> None:
        recorder = Recorder()

        def handler(change: DiskSeen | DiskGone) -> None:
            recorder(change)
            if isinstance(change, DiskSeen):
                raise RuntimeError("a bug in the agent")
            monitor.stop()

        monitor = Monitor([make_disk(NAME, uuid)], handler)
        monitor.start(asyncio.get_running_loop())
        try:
            with caplog.at_level(logging.ERROR, logger="agent.desktop.udev"):
                device = loops.attach(image)
                assert await recorder.next() == DiskSeen(NAME, device)
            assert "a bug in the agent" in caplog.text
            loops.detach(device)
            assert await recorder.next() == DiskGone(NAME, device)  # still watching after the exception
            loops.attach(image)
            settle()
            await recorder.quiet()
            assert recorder.changes == [DiskSeen(NAME, device), DiskGone(NAME, device)]  # stopped from the handler
        finally:
            monitor.stop()

    asyncio.run(scenario())


@pytest.mark.usefixtures("udevd")
@pytest.mark.integration
@pytest.mark.root
def test_lost_events_are_recovered_by_reading_the_devices_again(
    luks_image: tuple[Path, str], loops: Loops, caplog: pytest.LogCaptureFixture
) -> None:
    """The monitor's socket overflows (a tiny receive buffer, a loop too busy to read): the detach is not
    lost, and the socket is not left in an error that would wake the loop forever."""
    image, uuid = luks_image

    async def scenario() -> None:
        recorder = Recorder()
        monitor = Monitor([make_disk(NAME, uuid)], recorder)
        monitor.start(asyncio.get_running_loop())
        try:
            device = loops.attach(image)
            assert await recorder.next() == DiskSeen(NAME, device)
            with socket.socket(fileno=os.dup(monitor._fd)) as sock:  # the same socket, made tiny
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
            # The loop does not run while these are sent: they overflow the socket.
            for _ in range(20):
                run("udevadm", "trigger", "--action=change", device)
            loops.detach(device)
            settle()
            with caplog.at_level(logging.WARNING, logger="agent.desktop.udev"):
                assert await recorder.next() == DiskGone(NAME, device)
                await recorder.quiet()
            assert "udev events were lost" in caplog.text
            assert recorder.changes == [DiskSeen(NAME, device), DiskGone(NAME, device)]
            device = loops.attach(image)  # the new socket works
            assert await recorder.next() == DiskSeen(NAME, device)
        finally:
            monitor.stop()

    asyncio.run(scenario())


def _context() -> Any:
    import pyudev

    return pyudev.Context()
