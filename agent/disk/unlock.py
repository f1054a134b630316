"""Unlocking and locking the LUKS container, and checking its crypttab line and key file first.

The pure rules (whether a key file is safe, which unlock method and argv,
systemd's unit-name escaping) come first, then :func:`unlocked`, the context
manager that unlocks only what was locked and locks again only what it
unlocked: never under a mount. Every program runs through
:class:`~agent.core.commands.Runner`, and the mapped device must then exist (or
be gone) on the system itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import stat
import time
from typing import Callable, Final, Iterable, Iterator

from agent.core.commands import Result, Runner
from agent.config.model import Commands, Disk, Settings
from agent.core.errors import CommandError, DiskError, UnsafeKeyFileError, UsageError, WrongPassphraseError
from agent.core.mounts import read_mountinfo
from agent.disk.devices import device_number, mapped_rdev, mounts_of, normalize
from agent.disk.find import find_device
from agent.disk.passphrase import CRYPTSETUP_WRONG_KEY, close_argv, open_argv, wipe
from agent.disk.tables import CrypttabEntry, parse_crypttab

log = logging.getLogger(__name__)

UNLOCK_METHODS: Final = ("auto", "cryptdisks", "systemd")
# Seconds. A passphrase typed into a systemd password agent needs time.
UNLOCK_TIMEOUT: Final = 300.0
LOCK_TIMEOUT: Final = 120.0
# How long a device node may take to appear or vanish after the command returned.
SETTLE_TIME: Final = 2.0
_UNIT_SAFE: Final = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:_.")


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


def _is_within(path: str, directory: str) -> bool:
    """``path`` is ``directory`` or lies below it (both normalized)."""
    return path == directory or path.startswith(directory.rstrip("/") + "/")


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


def passphrase_entry(disk: Disk, settings: Settings) -> CrypttabEntry | None:
    """The disk's crypttab line when it has no key file (opened with a passphrase, closed with cryptsetup), else None.

    For closing only: a crypttab that cannot be read, or has no line for the
    disk, gives None (the unlock method's own stop command is used then).
    """
    try:
        entry = _crypttab_entry(disk, settings)
    except DiskError:
        return None
    return entry if entry.key_file is None else None


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
    mount_points = {normalize(disk.mount_point), os.path.realpath(disk.mount_point)}
    on_disk = any(_is_within(path, point) for path in (normalize(key_file), real) for point in mount_points)
    if not on_disk:
        try:
            entries = read_mountinfo()
        except OSError:
            entries = []
        devices = {entry.device for entry in entries if normalize(entry.mount_point) in mount_points}
        if _mapped_exists(disk):
            with contextlib.suppress(OSError):
                devices.add(device_number(os.stat(disk.mapped_device).st_rdev))
        on_disk = device_number(info.st_dev) in devices
    problem = key_file_problem(key_file, info, on_backup_disk=on_disk)
    if problem is not None:
        raise UnsafeKeyFileError(f"refusing to unlock {disk.name}: {problem}; nothing was unlocked", step="unlock")


def _luks_device(disk: Disk, settings: Settings, runner: Runner) -> str:
    """The LUKS partition to open: found by its UUID (the one the crypttab line was checked against)."""
    device = find_device(disk, settings, runner)
    if device is None:
        raise DiskError(
            f"backup disk {disk.name} is not attached (no LUKS partition with UUID {disk.luks_uuid}); nothing was unlocked",
            step="unlock",
        )
    return device


def said_last(result_or_error: Result | CommandError, stdout: Iterable[str] = ()) -> str:
    """": <what the program said last>": its last stderr line, else its last stdout line."""
    said = [*result_or_error.stderr_tail] or [line for line in stdout if line.strip()]
    return f": {said[-1].strip()}" if said else ""


def lock_disk(
    disk: Disk, stop: tuple[str, ...], device: str | None, runner: Runner, warn: Callable[[str], None], *, why: str
) -> None:
    """Run the stop argv and check the mapped device is gone; problems are warnings (nothing to undo)."""
    shown = shlex.join(stop)
    if device is not None:
        try:
            in_use = mounts_of(read_mountinfo(), device)
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
            f"locking {disk.name} failed ({result.meaning}){said_last(result, said)}; it is still unlocked "
            f"({disk.mapped_device} exists): lock it with `{shown}`"
        )
    elif not gone:
        warn(
            f"locking {disk.name} reported success but {disk.mapped_device} still exists: "
            f"it is still unlocked; lock it with `{shown}`"
        )
    elif result.kind == "error":
        warn(f"locking {disk.name} reported a failure ({result.meaning}){said_last(result, said)}, but {disk.mapped_device} is gone")


@contextlib.contextmanager
def unlocked(
    disk: Disk,
    settings: Settings,
    runner: Runner,
    warn: Callable[[str], None],
    keep: Callable[[], bool] | None = None,
    *,
    passphrase: bytearray | None = None,
) -> Iterator[bool]:
    """The disk unlocked for the body; yields whether this run unlocked it (and so locks it again).

    ``keep``: asked when the body ends without an error; True leaves the disk
    unlocked (``open`` leaves it so for browsing, agent.disk.browse).

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
    if passphrase is not None:
        if entry.key_file is not None:
            raise UsageError(
                f"{settings.crypttab} opens {disk.name} with the key file {entry.key_file}: a passphrase on standard "
                "input is only for a disk whose crypttab line has none; nothing was unlocked",
                step="unlock",
            )
        method = "cryptsetup"
        start, stop = open_argv(entry, _luks_device(disk, settings, runner), commands), close_argv(entry, commands)
    else:
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
        result = runner.run(
            start, step="unlock", check=False, timeout=UNLOCK_TIMEOUT, on_stdout=said.append, stdin=passphrase
        )
        if result.kind == "error":
            failure = result
    except CommandError as error:
        failure = error
    finally:
        if passphrase is not None:
            wipe(passphrase)
    appeared = _wait_until(lambda: _mapped_exists(disk), 0 if failure is not None else SETTLE_TIME)
    if failure is not None or not appeared:
        if appeared or failure is None:
            # Half done (mapped, then failed) or not visible where expected:
            # stop it, so the disk is left as found.
            lock_disk(disk, stop, None, runner, warn, why="undoing a failed unlock")
        if method == "cryptsetup" and isinstance(failure, Result) and failure.returncode == CRYPTSETUP_WRONG_KEY:
            raise WrongPassphraseError(
                f"the passphrase does not open {disk.name} (no key slot takes it); nothing was unlocked", step="unlock"
            )
        if isinstance(failure, CommandError):
            raise DiskError(f"unlocking {disk.name} failed: {failure.message}{hint}; nothing was unlocked", step="unlock")
        if failure is not None:
            raise DiskError(
                f"unlocking {disk.name} with `{shlex.join(start)}` failed ({failure.meaning}){said_last(failure, said)}{hint}; "
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
        lock_disk(disk, stop, None, runner, warn, why="undoing an unlock that gave no block device")
        raise
    log.info("unlocked %s as %s (%s)", disk.name, disk.mapped_device, device)
    try:
        yield True
    except BaseException:
        lock_disk(disk, stop, device, runner, warn, why="this run unlocked it")
        raise
    if keep is None or not keep():
        lock_disk(disk, stop, device, runner, warn, why="this run unlocked it")
