"""The encrypted backup disk: find it, unlock it, mount it, prove it, and leave it as found.

Two halves, as DESIGN.md asks:

- Pure rules (values in, values out, tested directly): reading crypttab and
  fstab, whether a key file is safe, which unlock method and argv to use
  (with systemd's unit-name escaping), the mount and umount argv, whether
  what is mounted at the mount point is the backup disk
  (:func:`check_mount`), whether the repository on it is the one this
  machine knows (:func:`check_marker`), and whether rsync ran out of space.
- Adapters doing I/O: :func:`find_device` asks ``blkid`` for the LUKS UUID;
  :func:`recorded_id`/:func:`record_id` keep each disk's repository id under
  the state directory; :func:`holders` names the processes that keep a mount
  busy; the two context managers :func:`unlocked` and :func:`mounted`; and
  :func:`verify_identity`, which proves an opened disk is the right one.

Every external program runs through :class:`~agent.commands.Runner`, and
every step's result is checked on the system itself (the mapped device
exists, mountinfo shows the mount, the mapped device is gone) instead of
trusting an exit status. "Leave it as found": each context manager undoes
only what it did itself. The caller enters :func:`unlocked`, then
:func:`mounted`, on one ExitStack, so the undo runs unmount first, lock last:

    with contextlib.ExitStack() as stack:
        stack.enter_context(unlocked(disk, settings, runner, warn))
        stack.enter_context(mounted(disk, settings, runner, warn))
        verify_identity(disk, settings)
        ...

A filesystem is never locked while it is mounted, and never unmounted
lazily: when the mount is busy it stays mounted and unlocked, and the error
says who holds it and how to finish by hand.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import posixpath
import re
import shlex
import socket
import stat
import time
from dataclasses import dataclass
from typing import Callable, Final, Iterable, Iterator, Protocol, TypeVar

from .commands import Result, Runner
from .config.load import SYSTEM_CONFIG
from .config.model import Commands, Disk, Settings
from .errors import CommandError, DiskBusyError, DiskError, UnsafeKeyFileError, UsageError, WrongDiskError
from .files import write_atomic
from .mounts import MountEntry, read_mountinfo
from .repository import Marker, Repository, classify


class _HasMountPoint(Protocol):
    @property
    def mount_point(self) -> str: ...


_AtMountPoint = TypeVar("_AtMountPoint", bound=_HasMountPoint)

log = logging.getLogger(__name__)

# Filesystems that cannot hold snapshots: no hard links (every snapshot would
# be a full copy) or no Unix owners and permissions (a restore would lose
# them), or read-only. fuseblk is how ntfs-3g and exfat-fuse mounts appear.
UNSUPPORTED_FILESYSTEMS: Final = frozenset(
    {
        "vfat",
        "msdos",
        "umsdos",
        "fat",
        "exfat",
        "ntfs",
        "ntfs3",
        "fuseblk",
        "hfs",
        "iso9660",
        "udf",
        "squashfs",
        "erofs",
        "cramfs",
        "romfs",
    }
)
_READ_ONLY_FILESYSTEMS: Final = frozenset({"iso9660", "udf", "squashfs", "erofs", "cramfs", "romfs"})
SUPPORTED_HINT: Final = "ext4, xfs or btrfs"

UNLOCK_METHODS: Final = ("auto", "cryptdisks", "systemd")

# Seconds. A passphrase typed into a systemd password agent needs time;
# sync on a slow USB disk with much dirty data takes as long as it takes.
BLKID_TIMEOUT: Final = 60.0
UNLOCK_TIMEOUT: Final = 300.0
LOCK_TIMEOUT: Final = 120.0
MOUNT_TIMEOUT: Final = 120.0
UMOUNT_TIMEOUT: Final = 120.0
# How long a device node may take to appear or vanish after the command returned.
SETTLE_TIME: Final = 2.0
# Pauses between unmount attempts when the filesystem is busy (about 3 s in all).
UMOUNT_RETRY_DELAYS: Final[tuple[float, ...]] = (0.25, 0.5, 0.75, 1.5)

_DISK_FULL_RE: Final = re.compile(r"No space left on device|Disk quota exceeded")
_OCTAL_RE: Final = re.compile(r"\\([0-7]{3})")
_UNIT_SAFE: Final = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:_.")
_ID_RE: Final = re.compile(r"[A-Za-z0-9_.-]{1,128}")

# --------------------------------------------------------------------------
# crypttab and fstab


@dataclass(frozen=True)
class CrypttabEntry:
    """One line of crypttab(5): ``name device [key_file [options]]``."""

    name: str
    device: str  # "UUID=…", "PARTUUID=…", "LABEL=…" or a path
    key_file: str | None  # None: no key file ("none", "-" or absent): a passphrase is asked
    options: tuple[str, ...]


@dataclass(frozen=True)
class FstabEntry:
    """One line of fstab(5), escapes decoded."""

    device: str
    mount_point: str
    fstype: str
    options: tuple[str, ...]


def _unescape(field: str) -> str:
    """Undo octal escapes (``\\040`` space, ``\\011`` tab, ``\\134`` backslash)."""
    return _OCTAL_RE.sub(lambda match: chr(int(match.group(1), 8)), field)


def _options(field: str) -> tuple[str, ...]:
    return tuple(option for option in field.split(",") if option)


def parse_crypttab(text: str) -> dict[str, CrypttabEntry]:
    """The entries of a crypttab by name (pure); the first line for a name wins, as in cryptdisks_start.

    Comments (``#`` at the start of a line) and blank lines are skipped, and
    so are lines with fewer than two fields.
    """
    entries: dict[str, CrypttabEntry] = {}
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        fields = stripped.split()
        if len(fields) < 2:
            continue
        name, device = _unescape(fields[0]), _unescape(fields[1])
        key_file: str | None = _unescape(fields[2]) if len(fields) > 2 else None
        if key_file in ("none", "-", ""):
            key_file = None
        options = _options(fields[3]) if len(fields) > 3 else ()
        entries.setdefault(name, CrypttabEntry(name, device, key_file, options))
    return entries


def parse_fstab(text: str) -> list[FstabEntry]:
    """The entries of an fstab in order (pure); fields are separated by blanks, spaces inside written ``\\040``.

    A missing type is "auto" and missing options "defaults", as mount(8) reads them.
    """
    entries: list[FstabEntry] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        fields = stripped.split()
        if len(fields) < 2:
            continue
        entries.append(
            FstabEntry(
                device=_unescape(fields[0]),
                mount_point=_unescape(fields[1]),
                fstype=_unescape(fields[2]) if len(fields) > 2 else "auto",
                options=_options(_unescape(fields[3])) if len(fields) > 3 else ("defaults",),
            )
        )
    return entries


def _last_at(entries: Iterable[_AtMountPoint], mount_point: str) -> _AtMountPoint | None:
    """The last entry for ``mount_point``, paths compared normalized."""
    wanted = _normalize(mount_point)
    found: _AtMountPoint | None = None
    for entry in entries:
        if _normalize(entry.mount_point) == wanted:
            found = entry
    return found


def fstab_entry_for(entries: Iterable[FstabEntry], mount_point: str) -> FstabEntry | None:
    """The fstab line for ``mount_point``; the last one wins, as for mount."""
    return _last_at(entries, mount_point)


# --------------------------------------------------------------------------
# Pure rules


def key_file_problem(key_file: str, info: os.stat_result, *, on_backup_disk: bool) -> str | None:
    """Why the key file named in crypttab is unsafe, in one line; None when it is safe.

    Unsafe: it lies on the backup disk itself (whoever holds the disk holds
    its key), it is not owned by root, or group or others may read or write it.
    """
    if on_backup_disk:
        return (
            f"the key file {key_file} lies on the backup disk itself, so whoever has the disk has its key: "
            "keep the key on this machine (for example in /etc/backup-agent/keys/)"
        )
    if info.st_uid != 0:
        return f"the key file {key_file} is owned by uid {info.st_uid}, not root: run chown root:root {key_file}"
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        return (
            f"the key file {key_file} is readable or writable by group or others (mode {mode:04o}): "
            f"run chmod 0400 {key_file}"
        )
    return None


def unlock_method(disk: Disk, have_cryptdisks: bool, have_systemctl: bool) -> str:
    """ "cryptdisks" or "systemd": the disk's choice, or for "auto" what the system has (cryptdisks first)."""
    if disk.unlock == "cryptdisks":
        if not have_cryptdisks:
            raise DiskError(
                f'disk {disk.name} is set to unlock = "cryptdisks", but cryptdisks_start is not installed: '
                "install cryptsetup (Debian, Ubuntu), set its path in [commands], or choose unlock = \"systemd\"",
                step="unlock",
            )
        return "cryptdisks"
    if disk.unlock == "systemd":
        if not have_systemctl:
            raise DiskError(
                f'disk {disk.name} is set to unlock = "systemd", but systemctl is not installed: '
                'set its path in [commands], or choose unlock = "cryptdisks"',
                step="unlock",
            )
        return "systemd"
    if disk.unlock != "auto":
        raise DiskError(
            f"disk {disk.name} has unlock = {disk.unlock!r}; expected one of {', '.join(UNLOCK_METHODS)}", step="unlock"
        )
    if have_cryptdisks:
        return "cryptdisks"
    if have_systemctl:
        return "systemd"
    raise DiskError(
        f"cannot unlock disk {disk.name}: neither cryptdisks_start (Debian, Ubuntu: package cryptsetup) "
        "nor systemctl was found; install one, or set its path in the [commands] table",
        step="unlock",
    )


def systemd_escape(name: str) -> str:
    """A string escaped as a unit name component, like ``systemd-escape NAME`` (pure).

    "/" becomes "-"; ASCII letters, digits, ":", "_" and "." (not leading)
    stay; every other byte of the UTF-8 form, "-" and "\\" included, becomes
    ``\\xNN`` in lower-case hex.
    """
    out: list[str] = []
    for index, byte in enumerate(name.encode("utf-8")):
        if byte == ord("/"):
            out.append("-")
        elif byte in _UNIT_SAFE and not (index == 0 and byte == ord(".")):
            out.append(chr(byte))
        else:
            out.append(f"\\x{byte:02x}")
    return "".join(out)


def cryptsetup_unit(disk: Disk) -> str:
    """The systemd unit that systemd-cryptsetup-generator makes for the disk's crypttab line."""
    return f"systemd-cryptsetup@{systemd_escape(disk.name)}.service"


def unlock_argv(disk: Disk, method: str, commands: Commands) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(start argv, stop argv) for the unlock method (pure)."""
    if method == "cryptdisks":
        return (commands.cryptdisks_start, disk.name), (commands.cryptdisks_stop, disk.name)
    if method == "systemd":
        unit = cryptsetup_unit(disk)
        return (commands.systemctl, "start", unit), (commands.systemctl, "stop", unit)
    raise ValueError(f"unknown unlock method {method!r}")


def mount_argv(disk: Disk, settings: Settings) -> tuple[str, ...]:
    """How to mount the disk: with ``filesystem`` set, the mapped device directly; else its fstab line.

    The fstab form names the file (util-linux ``--fstab``), so the line is
    read from ``settings.fstab``, the file that was checked.
    """
    mount = settings.commands.mount
    if disk.filesystem is not None:
        argv: tuple[str, ...] = (mount, "-t", disk.filesystem)
        if disk.mount_options:
            argv += ("-o", ",".join(disk.mount_options))
        return argv + (disk.mapped_device, disk.mount_point)
    # Options of our own (browsing: agent.browse) come after the line's, so they win.
    extra = ("--options-mode", "append", "-o", ",".join(disk.mount_options)) if disk.mount_options else ()
    return (mount, "--fstab", settings.fstab, *extra, disk.mount_point)


def umount_argv(disk: Disk, settings: Settings) -> tuple[str, ...]:
    """How to unmount the disk: plain umount, never ``-l`` (lazily, under pending writes)."""
    return (settings.commands.umount, disk.mount_point)


def _normalize(path: str) -> str:
    return "/" + posixpath.normpath(path).lstrip("/")


def _is_within(path: str, directory: str) -> bool:
    """``path`` is ``directory`` or lies below it (both normalized)."""
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def top_mount(entries: Iterable[MountEntry], mount_point: str) -> MountEntry | None:
    """What is visible at ``mount_point``: with mounts stacked there, the last in mountinfo."""
    return _last_at(entries, mount_point)


def _unsupported_reason(fstype: str) -> str:
    if fstype in _READ_ONLY_FILESYSTEMS:
        return "a read-only filesystem"
    return "a filesystem without hard links or Unix owners and permissions"


def check_mount(disk: Disk, entries: list[MountEntry], mapped_rdev: str, root_device: str) -> MountEntry:
    """The mount at the disk's mount point, proved to be the backup disk's (pure; DESIGN rule 2).

    ``entries`` is mountinfo, ``mapped_rdev`` the mapped device's and
    ``root_device`` the root filesystem's "major:minor". Refuses (WrongDiskError)
    an unmounted mount point (an empty directory on the root filesystem), a
    mount of another device, the root filesystem's device, and a filesystem
    that cannot keep snapshots.
    """
    mount_point = _normalize(disk.mount_point)
    entry = top_mount(entries, mount_point)
    if entry is None:
        raise WrongDiskError(
            f"{mount_point} is not mounted: nothing is written to an empty mount point on the root filesystem; "
            f"the backup disk {disk.name} ({disk.mapped_device}) should be mounted there",
            step="verify",
        )
    if entry.device == root_device:
        raise WrongDiskError(
            f"{mount_point} is on the root filesystem's device ({entry.source}, {entry.device}), "
            f"not on the backup disk {disk.name}: nothing was written",
            step="verify",
        )
    if entry.device != mapped_rdev:
        raise WrongDiskError(
            f"{mount_point} is mounted from {entry.source} ({entry.fstype}, device {entry.device}), "
            f"not from the backup disk {disk.name} ({disk.mapped_device}, device {mapped_rdev}): "
            "nothing was written; unmount it, or fix mount_point in the config",
            step="verify",
        )
    if entry.fstype in UNSUPPORTED_FILESYSTEMS:
        raise WrongDiskError(
            f"{mount_point} holds {entry.fstype}, {_unsupported_reason(entry.fstype)}, which cannot keep "
            f"hard-linked snapshots: format the backup disk's filesystem (on {disk.mapped_device}) as "
            f"{SUPPORTED_HINT}; nothing was written",
            step="verify",
        )
    return entry


def check_marker(disk: Disk, marker: Marker | None, recorded_id: str | None, host: str) -> None:
    """The repository on the disk is the one this machine recorded for it (pure; raises WrongDiskError).

    Same label or a cloned LUKS UUID is not enough: the random repository id
    written by ``backup-agent init`` must match.
    """
    init = f"backup-agent init --disk {disk.name}"
    if marker is None:
        raise WrongDiskError(
            f"there is no backup-agent repository at {disk.repository} on disk {disk.name}: "
            f"run {init} to create one (the backup never creates it by itself); nothing was written",
            step="verify",
        )
    if recorded_id is None:
        raise WrongDiskError(
            f"no repository id is recorded on this machine for disk {disk.name} (the disk holds id {marker.id}): "
            f"run {init} to adopt or create its repository; nothing was written",
            step="verify",
        )
    if marker.id != recorded_id:
        raise WrongDiskError(
            f"this is not the disk backup-agent knows as {disk.name}: same label or cloned LUKS UUID, "
            f"another repository (id {marker.id}, expected {recorded_id}); nothing was written",
            step="verify",
        )
    if marker.host != host:
        raise WrongDiskError(
            f"the repository {disk.repository} on disk {disk.name} belongs to host {marker.host}, "
            f"not to this machine ({host}): nothing was written; each machine backs up into its own "
            "repository (the default is <mount point>/<hostname>)",
            step="verify",
        )


def disk_full(stderr_lines: Iterable[str]) -> bool:
    """rsync's output says the disk ran out of space or inodes (ENOSPC 28) or quota (EDQUOT 122)."""
    return any(_DISK_FULL_RE.search(line) for line in stderr_lines)


def device_number(dev: int) -> str:
    """A dev_t as mountinfo writes it: "major:minor"."""
    return f"{os.major(dev)}:{os.minor(dev)}"


# --------------------------------------------------------------------------
# Finding the disk, and its recorded repository id


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


def id_path(settings: Settings, disk: Disk) -> str:
    """Where this machine records the repository id of the disk: ``<state_dir>/disks/<name>.id``."""
    if not disk.name or "/" in disk.name or disk.name.startswith(".") or "\0" in disk.name:
        raise DiskError(f"disk name {disk.name!r} cannot name a file: expected a crypttab name without / or a leading .")
    return os.path.join(settings.state_dir, "disks", disk.name + ".id")


def recorded_id(settings: Settings, disk: Disk) -> str | None:
    """The repository id recorded for the disk on this machine; None when none is recorded.

    The file must not be writable by others (it decides which disk is trusted).
    """
    path = id_path(settings, disk)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise DiskError(f"cannot read the recorded repository id {path}: {error.strerror}", step="verify") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if stat.S_IMODE(info.st_mode) & 0o022 or info.st_uid not in (0, os.geteuid()):
            raise DiskError(
                f"refusing the recorded repository id {path}: it must be owned by root and writable by root only "
                f"(owner uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):04o})",
                step="verify",
            )
        text = handle.read(4096).decode("utf-8", "replace").strip()
    if not text:
        return None
    if not _ID_RE.fullmatch(text):
        raise DiskError(f"{path} does not hold a repository id: remove it and run backup-agent init --disk {disk.name}", step="verify")
    return text


def _make_directories(path: str) -> None:
    """mkdir -p with mode 0755 for each directory created (whatever the umask)."""
    missing: list[str] = []
    current = path
    while not os.path.isdir(current):
        missing.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o755)
        except FileExistsError:
            continue
        os.chmod(directory, 0o755)


def record_id(settings: Settings, disk: Disk, repository_id: str) -> None:
    """Record the disk's repository id on this machine: written atomically, mode 0644."""
    if not _ID_RE.fullmatch(repository_id):
        raise ValueError(f"not a repository id: {repository_id!r}")
    path = id_path(settings, disk)
    directory = os.path.dirname(path)
    _make_directories(directory)
    write_atomic(path, repository_id.encode() + b"\n", prefix=f".{disk.name}.")
    log.info("recorded repository id %s for disk %s in %s", repository_id, disk.name, path)


# --------------------------------------------------------------------------
# Who keeps a mount busy


def _maps_device(path: str, major: int, minor: int) -> bool:
    """/proc/PID/maps has a mapping of a file on the device (field 4 is "MAJ:MIN" in hex)."""
    with open(path, "rb") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) < 6:
                continue
            device_major, _, device_minor = fields[3].partition(b":")
            try:
                if int(device_major, 16) == major and int(device_minor, 16) == minor:
                    return True
            except ValueError:
                continue
    return False


def _holds(process: str, device: int) -> bool:
    for link in ("cwd", "root", "exe"):
        with contextlib.suppress(OSError):
            if os.stat(f"{process}/{link}").st_dev == device:
                return True
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"{process}/fd"):
            with contextlib.suppress(OSError):
                if os.stat(f"{process}/fd/{fd}").st_dev == device:
                    return True
    with contextlib.suppress(OSError):
        return _maps_device(f"{process}/maps", os.major(device), os.minor(device))
    return False


def holders(mount_point: str) -> list[tuple[int, str]]:
    """Processes using files on the filesystem mounted at ``mount_point``: (pid, command), by pid.

    Looks at each process's working directory, root, executable, open files
    and mapped files, comparing devices (so deleted files count too). What
    cannot be read (a process that ended, another's in a stricter setup) is skipped.
    """
    try:
        device = os.stat(mount_point).st_dev
    except OSError:
        return []
    found: list[tuple[int, str]] = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    for name in names:
        if not name.isdigit():
            continue
        process = f"/proc/{name}"
        if not _holds(process, device):
            continue
        try:
            with open(f"{process}/comm", encoding="utf-8", errors="replace") as handle:
                command = handle.read().strip()
        except OSError:
            command = "?"
        found.append((int(name), command))
    return sorted(found)


# --------------------------------------------------------------------------
# Unlocking and locking


def _wait_until(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _mapped_exists(disk: Disk) -> bool:
    return os.path.exists(disk.mapped_device)


def mapped_rdev(disk: Disk, *, step: str = "mount") -> str:
    """The mapped device's "major:minor"; DiskError when it is missing or not a block device."""
    try:
        info = os.stat(disk.mapped_device)
    except FileNotFoundError:
        raise DiskError(f"disk {disk.name} is not unlocked: {disk.mapped_device} does not exist", step=step) from None
    except OSError as error:
        raise DiskError(f"cannot examine {disk.mapped_device}: {error.strerror}", step=step) from None
    if not stat.S_ISBLK(info.st_mode):
        raise DiskError(
            f"{disk.mapped_device} is not a block device: check mapped_device of disk {disk.name} in the config",
            step=step,
        )
    return device_number(info.st_rdev)


def _mounts_of(entries: Iterable[MountEntry], device: str) -> list[MountEntry]:
    return [entry for entry in entries if entry.device == device]


def _crypttab_entry(disk: Disk, settings: Settings) -> CrypttabEntry:
    line = f"{disk.name} UUID={disk.luks_uuid} /etc/backup-agent/keys/{disk.name}.key luks"
    try:
        with open(settings.crypttab, encoding="utf-8", errors="replace") as handle:
            text = handle.read()
    except FileNotFoundError:
        text = ""
    except OSError as error:
        raise DiskError(f"cannot read {settings.crypttab}: {error.strerror}", step="unlock") from None
    entry = parse_crypttab(text).get(disk.name)
    if entry is None:
        raise DiskError(
            f"{settings.crypttab} has no line for the backup disk {disk.name}: add one such as `{line}` "
            "(see crypttab-examples/); nothing was unlocked",
            step="unlock",
        )
    named = entry.device
    for prefix in ("UUID=", "/dev/disk/by-uuid/"):
        if named.startswith(prefix) and named[len(prefix) :].strip('"').lower() != disk.luks_uuid.lower():
            raise DiskError(
                f"{settings.crypttab} unlocks {disk.name} from {named}, but the config gives its LUKS UUID as "
                f"{disk.luks_uuid}: make them agree; nothing was unlocked",
                step="unlock",
            )
    return entry


def _check_key_file(disk: Disk, entry: CrypttabEntry, settings: Settings) -> None:
    """Refuse (UnsafeKeyFileError) a key file others could read or change, or one on the backup disk."""
    key_file = entry.key_file
    if key_file is None:
        return  # a passphrase: asked by cryptdisks_start or systemd's password agent
    if not key_file.startswith("/"):
        raise UnsafeKeyFileError(
            f"{settings.crypttab}: the key file {key_file!r} for {disk.name} is not an absolute path; nothing was unlocked",
            step="unlock",
        )
    try:
        info = os.stat(key_file)
    except OSError as error:
        raise DiskError(
            f"the key file {key_file} named in {settings.crypttab} for {disk.name} cannot be read "
            f"({error.strerror}); nothing was unlocked",
            step="unlock",
        ) from None
    real = os.path.realpath(key_file)
    mount_points = {_normalize(disk.mount_point), os.path.realpath(disk.mount_point)}
    on_disk = any(_is_within(path, point) for path in (_normalize(key_file), real) for point in mount_points)
    if not on_disk:
        try:
            entries = read_mountinfo()
        except OSError:
            entries = []
        devices = {entry.device for entry in entries if _normalize(entry.mount_point) in mount_points}
        if _mapped_exists(disk):
            with contextlib.suppress(OSError):
                devices.add(device_number(os.stat(disk.mapped_device).st_rdev))
        on_disk = device_number(info.st_dev) in devices
    problem = key_file_problem(key_file, info, on_backup_disk=on_disk)
    if problem is not None:
        raise UnsafeKeyFileError(f"refusing to unlock {disk.name}: {problem}; nothing was unlocked", step="unlock")


def _tail(result_or_error: Result | CommandError, stdout: Iterable[str] = ()) -> str:
    """": <what the program said last>": its last stderr line, else its last stdout line."""
    said = [*result_or_error.stderr_tail] or [line for line in stdout if line.strip()]
    return f": {said[-1].strip()}" if said else ""


def _lock(
    disk: Disk, stop: tuple[str, ...], device: str | None, runner: Runner, warn: Callable[[str], None], *, why: str
) -> None:
    """Run the stop argv and check the mapped device is gone; problems are warnings (nothing to undo)."""
    shown = shlex.join(stop)
    if device is not None:
        try:
            in_use = _mounts_of(read_mountinfo(), device)
        except OSError:
            in_use = []
        if in_use:
            where = ", ".join(entry.mount_point for entry in in_use)
            warn(
                f"{disk.mapped_device} is still mounted on {where}: leaving {disk.name} unlocked "
                f"(a filesystem is never locked under a mount); unmount it, then lock it with `{shown}`"
            )
            return
    log.info("locking %s (%s)", disk.name, why)
    said: list[str] = []
    try:
        result = runner.run(stop, step="lock", check=False, timeout=LOCK_TIMEOUT, on_stdout=said.append)
    except CommandError as error:
        warn(f"locking {disk.name} failed: {error.message}; it may still be unlocked: lock it with `{shown}`")
        return
    gone = _wait_until(lambda: not _mapped_exists(disk), SETTLE_TIME)
    if result.kind == "error" and not gone:
        warn(
            f"locking {disk.name} failed ({result.meaning}){_tail(result, said)}; it is still unlocked "
            f"({disk.mapped_device} exists): lock it with `{shown}`"
        )
    elif not gone:
        warn(
            f"locking {disk.name} reported success but {disk.mapped_device} still exists: "
            f"it is still unlocked; lock it with `{shown}`"
        )
    elif result.kind == "error":
        warn(f"locking {disk.name} reported a failure ({result.meaning}){_tail(result, said)}, but {disk.mapped_device} is gone")


@contextlib.contextmanager
def unlocked(
    disk: Disk, settings: Settings, runner: Runner, warn: Callable[[str], None], keep: Callable[[], bool] | None = None
) -> Iterator[bool]:
    """The disk unlocked for the body; yields whether this run unlocked it (and so locks it again).

    ``keep``: asked when the body ends without an error; True leaves the disk
    unlocked (``open`` leaves it so for browsing, agent.browse).

    Found unlocked (the mapped device exists): nothing is done now or later.
    Otherwise the crypttab line and its key file are checked first, the
    unlock method's start command runs, and the mapped device must then
    exist. On exit, what this run unlocked is locked again, unless the mapped
    device is still mounted somewhere (then it is left unlocked, with a warning).
    """
    if _mapped_exists(disk):
        mapped_rdev(disk, step="unlock")  # a block device, or a clear error
        log.info("%s is already unlocked (%s exists): it stays so", disk.name, disk.mapped_device)
        yield False
        return
    entry = _crypttab_entry(disk, settings)
    _check_key_file(disk, entry, settings)
    commands = settings.commands
    method = unlock_method(disk, os.access(commands.cryptdisks_start, os.X_OK), os.access(commands.systemctl, os.X_OK))
    start, stop = unlock_argv(disk, method, commands)
    if entry.key_file is None and method == "cryptdisks":
        # cryptdisks_start would wait for a passphrase on a console nobody
        # watches (the cycle runs it without a terminal, often from a timer).
        raise DiskError(
            f"{settings.crypttab} gives no key file for {disk.name} (it is unlocked with a passphrase), and "
            f"backup-agent cannot type one: unlock it yourself first (sudo cryptdisks_start {disk.name}; it then stays "
            'unlocked), add a key file (see crypttab-examples/), or use unlock = "systemd" with a password agent',
            step="unlock",
        )
    if runner.dry_run:
        raise DiskError(
            f"disk {disk.name} is locked and a dry run changes nothing: it would run `{shlex.join(start)}`; "
            "unlock and mount it first to preview a backup",
            step="unlock",
        )
    hint = " (after editing /etc/crypttab, run systemctl daemon-reload)" if method == "systemd" else ""
    failure: Result | CommandError | None = None
    said: list[str] = []  # cryptdisks_start reports on stdout, cryptsetup on stderr
    try:
        result = runner.run(start, step="unlock", check=False, timeout=UNLOCK_TIMEOUT, on_stdout=said.append)
        if result.kind == "error":
            failure = result
    except CommandError as error:
        failure = error
    appeared = _wait_until(lambda: _mapped_exists(disk), 0 if failure is not None else SETTLE_TIME)
    if failure is not None or not appeared:
        if appeared or failure is None:
            # Half done (mapped, then failed) or not visible where expected:
            # stop it, so the disk is left as found.
            _lock(disk, stop, None, runner, warn, why="undoing a failed unlock")
        if isinstance(failure, CommandError):
            raise DiskError(f"unlocking {disk.name} failed: {failure.message}{hint}; nothing was unlocked", step="unlock")
        if failure is not None:
            raise DiskError(
                f"unlocking {disk.name} with `{shlex.join(start)}` failed ({failure.meaning}){_tail(failure, said)}{hint}; "
                "nothing was unlocked",
                step="unlock",
            )
        raise DiskError(
            f"unlocking {disk.name} reported success but {disk.mapped_device} does not exist: "
            "check mapped_device in the config and the name in crypttab",
            step="unlock",
        )
    try:
        device = mapped_rdev(disk, step="unlock")
    except DiskError:
        _lock(disk, stop, None, runner, warn, why="undoing an unlock that gave no block device")
        raise
    log.info("unlocked %s as %s (%s)", disk.name, disk.mapped_device, device)
    try:
        yield True
    except BaseException:
        _lock(disk, stop, device, runner, warn, why="this run unlocked it")
        raise
    if keep is None or not keep():
        _lock(disk, stop, device, runner, warn, why="this run unlocked it")


# --------------------------------------------------------------------------
# Mounting and unmounting


def _is_mounted_from(entries: Iterable[MountEntry], mount_point: str, device: str) -> bool:
    entry = top_mount(entries, mount_point)
    return entry is not None and entry.device == device


def _check_fstab_line(disk: Disk, settings: Settings, device: str) -> None:
    """In fstab mode the line for the mount point must exist (and name the mapped device, when it names a path)."""
    try:
        with open(settings.fstab, encoding="utf-8", errors="replace") as handle:
            entries = parse_fstab(handle.read())
    except FileNotFoundError:
        entries = []
    except OSError as error:
        raise DiskError(f"cannot read {settings.fstab}: {error.strerror}", step="mount") from None
    entry = fstab_entry_for(entries, disk.mount_point)
    if entry is None:
        raise DiskError(
            f"{settings.fstab} has no line for {disk.mount_point}: add one such as "
            f"`{disk.mapped_device} {disk.mount_point} ext4 noauto,nofail 0 2` (noauto: boot never waits for the disk), "
            f"or set filesystem for disk {disk.name} in the config; nothing was mounted",
            step="mount",
        )
    if entry.device.startswith("/"):
        try:
            named = device_number(os.stat(entry.device).st_rdev)
        except OSError:
            named = None
        if named != device:
            raise DiskError(
                f"{settings.fstab} mounts {entry.device} on {disk.mount_point}, not the backup disk's "
                f"{disk.mapped_device}: correct that line; nothing was mounted",
                step="mount",
            )


def _unmount(
    disk: Disk,
    mount_point: str,
    device: str,
    settings: Settings,
    runner: Runner,
    warn: Callable[[str], None],
    *,
    failing: bool,
) -> None:
    """sync, then unmount what this run mounted, retrying while busy; never lazily.

    Still busy: DiskBusyError naming the holders (or, while another error is
    already on its way out, the same message as a warning).
    """
    entries = read_mountinfo()
    if not _is_mounted_from(entries, mount_point, device):
        if _mounts_of((entry for entry in entries if _normalize(entry.mount_point) == mount_point), device):
            warn(f"something else was mounted over the backup disk on {mount_point}: leaving both mounted")
        else:
            log.info("%s was already unmounted", mount_point)
        return
    try:
        runner.run((settings.commands.sync, "-f", mount_point), step="unmount", check=False)
    except CommandError as error:
        warn(f"sync before unmounting failed: {error.message}")
    argv = umount_argv(disk, settings)
    last: Result | CommandError | None = None
    for delay in (0.0, *UMOUNT_RETRY_DELAYS):
        time.sleep(delay)
        try:
            last = runner.run(argv, step="unmount", check=False, timeout=UMOUNT_TIMEOUT)
        except CommandError as error:
            last = error
        if not _is_mounted_from(read_mountinfo(), mount_point, device):
            log.info("unmounted %s", mount_point)
            return
    busy_by = holders(mount_point)
    tail = last.stderr_tail if last is not None else ()
    below = [entry.mount_point for entry in read_mountinfo() if _normalize(entry.mount_point).startswith(mount_point.rstrip("/") + "/")]
    commands = settings.commands
    try:
        method = unlock_method(disk, os.access(commands.cryptdisks_start, os.X_OK), os.access(commands.systemctl, os.X_OK))
    except DiskError:
        method = "cryptdisks"
    _start, stop = unlock_argv(disk, method, commands)
    finish = f"then run `{shlex.join(argv)}` and, to lock it, `{shlex.join(stop)}`"
    problem: DiskError | DiskBusyError
    if busy_by or below or any("busy" in line for line in tail):
        who = [f"pid {pid} ({command})" for pid, command in busy_by]
        who += [f"a filesystem mounted on {point}" for point in below]
        held = "; held by " + ", ".join(who) if who else ""
        problem = DiskBusyError(
            f"cannot unmount {mount_point}: it is busy{held}; the disk is left mounted and unlocked so pending "
            f"writes are safe: close those programs, {finish}",
            step="unmount",
        )
    else:
        detail = f": {tail[-1]}" if tail else ""
        problem = DiskError(
            f"unmounting {mount_point} failed{detail}; the disk is left mounted and unlocked: {finish}",
            step="unmount",
        )
    if failing:
        warn(problem.message)
        return
    raise problem


@contextlib.contextmanager
def mounted(
    disk: Disk, settings: Settings, runner: Runner, warn: Callable[[str], None], keep: Callable[[], bool] | None = None
) -> Iterator[bool]:
    """The mapped device mounted on the disk's mount point; yields whether this run mounted it.

    ``keep``: as for :func:`unlocked`, True leaves it mounted.

    Found mounted from the mapped device: nothing is done now or later.
    Something else mounted there: WrongDiskError, and it is left alone.
    Otherwise mount (directly, or through the fstab line), and check
    mountinfo. On exit, what this run mounted is synced and unmounted; see
    :func:`_unmount` for a busy filesystem.
    """
    mount_point = os.path.realpath(disk.mount_point)
    device = mapped_rdev(disk)
    top = top_mount(read_mountinfo(), mount_point)
    if top is not None and top.device == device:
        log.info("%s is already mounted on %s: it stays so", disk.mapped_device, mount_point)
        yield False
        return
    if top is not None:
        raise WrongDiskError(
            f"{mount_point} is already mounted from {top.source} ({top.fstype}, device {top.device}), not from "
            f"the backup disk {disk.name} ({disk.mapped_device}, device {device}): left it alone and wrote nothing; "
            "unmount it first, or fix mount_point in the config",
            step="mount",
        )
    argv = mount_argv(disk, settings)
    if runner.dry_run:
        raise DiskError(
            f"the backup disk {disk.name} is not mounted and a dry run changes nothing: it would run "
            f"`{shlex.join(argv)}`; mount it first to preview a backup",
            step="mount",
        )
    if not os.path.isdir(mount_point):
        raise DiskError(
            f"the mount point {mount_point} is not a directory: create it (mkdir -p {mount_point}); nothing was mounted",
            step="mount",
        )
    if disk.filesystem is None:
        _check_fstab_line(disk, settings, device)
    failure: Result | CommandError | None = None
    try:
        result = runner.run(argv, step="mount", check=False, timeout=MOUNT_TIMEOUT)
        if result.kind == "error":
            failure = result
    except CommandError as error:
        failure = error
    top = top_mount(read_mountinfo(), mount_point)
    if failure is not None or top is None or top.device != device:
        if top is not None:
            # Nothing was mounted here before: whatever is there now, this run mounted it.
            _unmount(disk, mount_point, top.device, settings, runner, warn, failing=True)
        if isinstance(failure, CommandError):
            raise DiskError(f"mounting {disk.mapped_device} on {mount_point} failed: {failure.message}", step="mount")
        if failure is not None:
            raise DiskError(
                f"mounting {disk.mapped_device} on {mount_point} failed ({failure.meaning}){_tail(failure)}",
                step="mount",
            )
        if top is None:
            raise DiskError(f"mounting reported success but nothing is mounted on {mount_point}", step="mount")
        raise WrongDiskError(
            f"mounting put {top.source} ({top.fstype}, device {top.device}) on {mount_point}, not the backup disk's "
            f"{disk.mapped_device} (device {device}): unmounted it again; correct the mount's configuration",
            step="mount",
        )
    log.info("mounted %s on %s (%s)", disk.mapped_device, mount_point, top.fstype)
    try:
        yield True
    except BaseException:
        _unmount(disk, mount_point, device, settings, runner, warn, failing=True)
        raise
    if keep is None or not keep():
        _unmount(disk, mount_point, device, settings, runner, warn, failing=False)


def verify_mount(disk: Disk) -> MountEntry:
    """check_mount on this system: the live mountinfo, the mapped device, the root filesystem."""
    mount_point = os.path.realpath(disk.mount_point)
    root = device_number(os.stat("/").st_dev)
    mapped = mapped_rdev(disk, step="verify")
    return check_mount(dataclasses.replace(disk, mount_point=mount_point), read_mountinfo(), mapped, root)


def verify_identity(disk: Disk, settings: Settings) -> Marker | None:
    """Prove the opened disk is this one, before anything reads or writes it; returns the marker it checked.

    The mount's source first (:func:`verify_mount`), then the repository's
    marker against the id this machine recorded (:func:`check_marker`).
    """
    verify_mount(disk)
    marker = Repository.open(disk.repository).marker if classify(disk.repository) == "repository" else None
    check_marker(disk, marker, recorded_id(settings, disk), socket.gethostname())
    return marker
