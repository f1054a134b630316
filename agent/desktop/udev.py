"""Recognising the configured backup disks in udev's events, and watching udev from asyncio.

A disk is recognised by the UUID of its LUKS header (``ID_FS_UUID`` with
``ID_FS_TYPE=crypto_LUKS``), whatever its device name: /dev/sdb1 today may
be /dev/sdc1 tomorrow, and a loop device in the tests.

The pure part (:class:`DeviceEvent`, :func:`match`, :class:`Tracker`) takes
values and returns values, so it is tested without udev. The adapter
(:func:`enumerate_present`, :class:`Monitor`) reads pyudev: the monitor's
socket sits on the asyncio loop (``loop.add_reader``), so an idle agent
sleeps in the loop and wakes only when udev has something to say.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, Sequence

import pyudev

from agent.config.model import Disk

log = logging.getLogger(__name__)

LUKS_TYPE = "crypto_LUKS"
# At most this many events are handled per wake-up; the rest wait for the
# next turn of the loop (the reader fires again while the socket is readable),
# so a flood of events cannot starve everything else the agent does.
_EVENTS_PER_WAKEUP = 256


@dataclass(frozen=True)
class DeviceEvent:
    """What the agent needs from a udev event or an enumerated device.

    ``action``: "add", "change", "remove" (and any other udev action), or
    "present" for a device found by enumeration at start.
    ``device``: the device node (/dev/sdb1, /dev/loop3), or the sys path of
    a device that has none.
    """

    action: str
    device: str
    properties: Mapping[str, str]


@dataclass(frozen=True)
class DiskSeen:
    """The configured disk ``disk`` (its name) is now carried by ``device``."""

    disk: str
    device: str


@dataclass(frozen=True)
class DiskGone:
    """The configured disk ``disk`` is no longer carried by ``device`` (removed, or detached)."""

    disk: str
    device: str



def match(disks: Sequence[Disk], event: DeviceEvent) -> str | None:
    """The name of the configured disk whose LUKS header the event's device carries, else None.

    Only the properties decide (not the action): ``ID_FS_TYPE`` must be
    exactly ``crypto_LUKS`` (a filesystem with the same UUID is not our
    encrypted partition), and ``ID_FS_UUID`` must equal the disk's
    ``luks_uuid`` ignoring case (blkid prints lower case, users may paste
    upper case). The first configured disk that matches wins.
    """
    if event.properties.get("ID_FS_TYPE") != LUKS_TYPE:
        return None
    uuid = event.properties.get("ID_FS_UUID", "").strip().lower()
    if not uuid:
        return None
    for disk in disks:
        if disk.luks_uuid.strip().lower() == uuid:
            return disk.name
    return None


class Tracker:
    """Which configured disk each device carries; turns raw events into DiskSeen/DiskGone, dropping duplicates.

    udev repeats itself: a plug-in may give ``add`` and then ``change``
    events, a loop device several ``change`` events, and the enumeration at
    start may report a device the monitor then reports again. The tracker
    remembers which disk each device's latest event showed, and reports
    only what changes the answer to "which device carries each disk":

    - ``add``/``change``/``present`` (any action but ``remove``) that
      matches a disk not carried yet: DiskSeen. More of them for the same
      device and disk: nothing (a burst gives one DiskSeen).
    - ``remove`` of the device carrying a disk: DiskGone.
    - Any other event for the device carrying a disk whose properties no
      longer carry that disk's UUID: DiskGone. Detaching a loop device
      sends such ``change`` events rather than ``remove``. A device re-used
      for another disk gives DiskGone then DiskSeen.
    - Devices that carry no configured disk: nothing.
    - A second device with the same UUID (a clone, or the same disk seen
      twice) while the first still carries it: nothing, the first keeps it.
      When the first is gone, the second (the one that has shown it the
      longest, if several) gets its own DiskSeen, right after the DiskGone:
      it is the disk attached now.

    So for each disk DiskSeen and DiskGone alternate, starting with DiskSeen,
    and :meth:`attached` always follows from each device's latest event.
    """

    def __init__(self, disks: Sequence[Disk]) -> None:
        self._disks = tuple(disks)
        # Every device whose latest event carries a configured disk -> that
        # disk, oldest first (only those: a handful of entries).
        self._carrying: dict[str, str] = {}
        self._attached: dict[str, str] = {}  # disk -> the device reported for it

    def feed(self, event: DeviceEvent) -> list[DiskSeen | DiskGone]:
        """The changes this event makes, in order: DiskGone before DiskSeen."""
        name = None if event.action == "remove" else match(self._disks, event)
        if self._carrying.get(event.device) == name:
            return []  # nothing new about this device: the usual case
        self._carrying.pop(event.device, None)
        if name is not None:
            self._carrying[event.device] = name
        return self._update()

    def resync(self, present: Iterable[DeviceEvent]) -> list[DiskSeen | DiskGone]:
        """Start over from a fresh enumeration, reporting only the differences.

        For when events were lost (the monitor's socket overflowed): what
        ``present`` shows is the truth now. A disk still on its device gives
        nothing (a clone does not take it over); one that went, or moved,
        gives DiskGone (then DiskSeen on its new device); one that came gives
        DiskSeen.
        """
        carrying: dict[str, str] = {}
        for event in present:  # a device listed twice: its last entry counts
            name = None if event.action == "remove" else match(self._disks, event)
            carrying.pop(event.device, None)
            if name is not None:
                carrying[event.device] = name
        self._carrying = carrying
        return self._update()

    def attached(self) -> dict[str, str]:
        """Disk name -> the device carrying it, for the disks attached now (a copy)."""
        return dict(self._attached)

    def _update(self) -> list[DiskSeen | DiskGone]:
        """Bring ``_attached`` in line with ``_carrying``, returning what that changed."""
        changes: list[DiskSeen | DiskGone] = []
        for disk, device in list(self._attached.items()):
            if self._carrying.get(device) != disk:
                del self._attached[disk]
                changes.append(DiskGone(disk, device))
        for device, disk in self._carrying.items():
            if disk not in self._attached:
                self._attached[disk] = device
                changes.append(DiskSeen(disk, device))
        return changes


def event_from_device(device: Any, action: str | None = None) -> DeviceEvent:
    """A :class:`DeviceEvent` from a pyudev Device (from the monitor, or ``action="present"`` from enumeration)."""
    properties = {str(key): str(device.properties.get(key, "")) for key in device.properties}
    node = device.device_node
    return DeviceEvent(
        action=action or device.action or "present",
        device=str(node) if node else str(device.sys_path),
        properties=MappingProxyType(properties),
    )


def enumerate_present(context: pyudev.Context) -> list[DeviceEvent]:
    """Every block device present now, with the properties udev recorded for it; action "present".

    A disk plugged in before the agent started sends no event: this is how
    it is found.
    """
    return [event_from_device(device, "present") for device in context.list_devices(subsystem="block")]


class Monitor:
    """pyudev's monitor on an asyncio loop: its file descriptor on the loop (loop.add_reader), no thread, no polling.

    ``on_change`` is called on the loop with each DiskSeen/DiskGone, in
    order. An exception it raises is logged and does not stop the watching
    nor lose the changes that follow.
    """

    def __init__(
        self,
        disks: Sequence[Disk],
        on_change: Callable[[DiskSeen | DiskGone], None],
        *,
        context: pyudev.Context | None = None,
    ) -> None:
        self._tracker = Tracker(disks)
        self._on_change = on_change
        self._context = context if context is not None else pyudev.Context()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._monitor: Any = None  # the started pyudev.Monitor, None when stopped
        self._fd = -1

    def attached(self) -> dict[str, str]:
        """Disk name -> device, for the configured disks attached now."""
        return self._tracker.attached()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the monitor, THEN enumerate what is present, both through one tracker.

        In this order nothing is missed: a disk that arrives during the
        enumeration is either in it or in an event queued on the already
        started monitor (or both: the tracker drops the duplicate). Devices
        found by the enumeration are reported before this returns. Started
        again after :meth:`stop`, only what changed meanwhile is reported
        (a disk that went while stopped gives its DiskGone).
        """
        if self._monitor is not None:
            raise RuntimeError("the udev monitor is already started")
        self._loop = loop
        self._open(loop)
        try:
            present = enumerate_present(self._context)
        except BaseException:
            self.stop()
            raise
        self._report(self._tracker.resync(present))

    def stop(self) -> None:
        """Take the monitor off the loop and close its socket; safe to call twice, or from ``on_change``."""
        if self._monitor is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._fd)
        # pyudev has no close(): dropping the last reference unrefs the
        # libudev monitor, which closes its socket.
        self._monitor = None
        self._fd = -1

    def _open(self, loop: asyncio.AbstractEventLoop) -> None:
        monitor = pyudev.Monitor.from_netlink(self._context, source="udev")
        monitor.filter_by(subsystem="block")
        monitor.start()  # receiving from here on; the socket is non-blocking
        self._monitor = monitor
        self._fd = monitor.fileno()
        loop.add_reader(self._fd, self._readable, loop)

    def _readable(self, loop: asyncio.AbstractEventLoop) -> None:
        """The socket has events: handle those queued now, without blocking."""
        monitor = self._monitor
        for _ in range(_EVENTS_PER_WAKEUP):
            if monitor is None or monitor is not self._monitor:
                return  # stopped (or reopened) by on_change
            try:
                device = monitor.poll(timeout=0)
            except OSError as error:
                # The socket overflowed (ENOBUFS shows as POLLERR, which pyudev
                # raises before reading, so it would be raised again at once
                # forever): events were lost. Start over with a fresh socket
                # and a fresh look at what is present.
                log.warning("udev events were lost (%s): re-reading the devices present", error)
                self._reopen(loop)
                return
            if device is None:
                return
            self._report(self._tracker.feed(event_from_device(device)))

    def _reopen(self, loop: asyncio.AbstractEventLoop) -> None:
        self.stop()
        self._open(loop)
        self._report(self._tracker.resync(enumerate_present(self._context)))

    def _report(self, changes: list[DiskSeen | DiskGone]) -> None:
        for change in changes:
            try:
                self._on_change(change)
            except Exception:
                log.exception("handling %s failed", change)
