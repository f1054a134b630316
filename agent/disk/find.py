"""Finding the disk: which configured disk is attached, by its LUKS UUID (``blkid``).

Also which disk a command means (``--disk``, ``--crypto``, ``--mount``, or
the first attached), and the one-line messages when none is there.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Final, Iterable

from agent.core.commands import Runner
from agent.config.load import SYSTEM_CONFIG
from agent.config.model import Disk, Settings
from agent.core.errors import DiskError, UsageError

log = logging.getLogger(__name__)

# Seconds.
BLKID_TIMEOUT: Final = 60.0


def parse_blkid_export(lines: Iterable[str]) -> list[dict[str, str]]:
    """The devices in ``blkid -o export`` output (pure).

    KEY=value lines; each device starts with DEVNAME (blank lines between
    devices are not relied on: the Runner drops empty lines).
    """
    devices: list[dict[str, str]] = []
    for line in lines:
        key, separator, value = line.strip().partition("=")
        if not separator:
            continue
        if key == "DEVNAME" or not devices:
            devices.append({})
        devices[-1][key] = re.sub(r"\\(.)", r"\1", value)
    return devices


def find_device(disk: Disk, settings: Settings, runner: Runner) -> str | None:
    """The block device carrying the disk's LUKS UUID, or None when the disk is not attached.

    ``blkid`` probes the devices itself (no udev needed), bypassing its cache
    (``-c /dev/null``): a cached answer is trusted for 2 seconds, long enough
    to miss a disk that was just swapped on the same device. A device with
    the UUID that is not a LUKS container is a configuration error; two
    devices with it (a cloned disk) are ambiguous, as cryptdisks_start would
    open either.
    """
    argv = (settings.commands.blkid, "-c", "/dev/null", "-o", "export", "-t", f"UUID={disk.luks_uuid}")
    lines: list[str] = []
    result = runner.run(argv, step="disk", mutating=False, check=False, on_stdout=lines.append, timeout=BLKID_TIMEOUT)
    if result.returncode == 2:
        return None
    devices = [device for device in parse_blkid_export(lines) if device.get("DEVNAME")]
    if result.returncode != 0 or not devices:
        detail = f": {result.stderr_tail[-1]}" if result.stderr_tail else ""
        raise DiskError(
            f"looking for disk {disk.name} (UUID {disk.luks_uuid}) with blkid failed ({result.meaning}){detail}",
            step="disk",
        )
    if len(devices) > 1:
        names = ", ".join(sorted(device["DEVNAME"] for device in devices))
        raise DiskError(
            f"disk {disk.name}: several attached devices carry the LUKS UUID {disk.luks_uuid} ({names}), "
            "as a cloned disk does: detach all but the backup disk (and give a clone its own UUID with "
            "cryptsetup luksUUID --uuid)",
            step="disk",
        )
    device, fstype = devices[0]["DEVNAME"], devices[0].get("TYPE", "unknown")
    if fstype != "crypto_LUKS":
        raise DiskError(
            f"disk {disk.name}: the UUID {disk.luks_uuid} belongs to {device}, which is {fstype}, not a LUKS "
            'container: set luks_uuid to the UUID blkid shows with TYPE="crypto_LUKS" (see crypttab-examples/)',
            step="disk",
        )
    return device


def present_disks(settings: Settings, runner: Runner) -> list[tuple[Disk, str]]:
    """The configured disks that are attached, in config order, each with its LUKS device."""
    present: list[tuple[Disk, str]] = []
    for disk in settings.disks:
        device = find_device(disk, settings, runner)
        if device is not None:
            present.append((disk, device))
    return present


def select_disk(settings: Settings, *, name: str | None, crypto: str | None, mount: str | None) -> Disk | None:
    """The configured disk named by --disk, --crypto (crypttab name) or --mount (mount point)."""
    wanted = [(option, value) for option, value in (("--disk", name), ("--crypto", crypto), ("--mount", mount)) if value]
    if not wanted:
        return None
    if not settings.disks:
        raise UsageError(
            f"{wanted[0][0]} {wanted[0][1]}: no [[disk]] is configured in {settings.path or SYSTEM_CONFIG}; "
            "add one (see crypttab-examples/)"
        )
    chosen: Disk | None = None
    for option, value in wanted:
        if option == "--mount":
            value = os.path.normpath(os.path.abspath(value))
            matches = [d for d in settings.disks if d.mount_point == value]
        else:
            matches = [d for d in settings.disks if d.name == value]
        if not matches:
            known = ", ".join(f"{d.name} ({d.mount_point})" for d in settings.disks)
            raise UsageError(f"{option} {value}: no configured disk matches; configured: {known}")
        if chosen is not None and matches[0] != chosen:
            raise UsageError(f"{option} {value} names another disk than {chosen.name}: give one disk")
        chosen = matches[0]
    return chosen


def first_present(settings: Settings, runner: Runner) -> Disk | None:
    """Without --disk: the first configured disk that is attached (None when none is)."""
    present = present_disks(settings, runner)
    if len(present) > 1:
        log.info("several backup disks are attached; using %s", present[0][0].name)
    return present[0][0] if present else None


def none_attached(settings: Settings) -> str:
    """What was looked for when no configured disk is attached, in one line."""
    described = "; ".join(f"{d.name} (LUKS UUID {d.luks_uuid})" for d in settings.disks)
    return f"no configured backup disk is attached: looked for {described}"


def not_attached(disk: Disk) -> str:
    """Why a named disk cannot be used, and what to do, in one line."""
    return (
        f"backup disk {disk.name} is not attached (looked for the LUKS partition with UUID {disk.luks_uuid}): "
        "plug it in; `blkid` lists the UUIDs of attached disks"
    )
