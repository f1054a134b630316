"""Opening a disk whose crypttab line has no key file, with a passphrase read from standard input.

The desktop agent asks the user (pinentry) and hands the passphrase to the
root cycle on its standard input (``--passphrase-stdin``); the cycle gives it
to ``cryptsetup open --key-file=-`` on cryptsetup's standard input. It is
never in an argv, the environment, a file or a log, and the one buffer that
holds it (a ``bytearray``) is overwritten with zeros when the disk is open
(docs/ARCHITECTURE.md, "A passphrase disk").

The pure part turns the crypttab line's options into cryptsetup's argv; a
line whose options cryptsetup cannot honour here is refused by name rather
than opened differently from what crypttab says.
"""

from __future__ import annotations

import os
from typing import Final

from agent.config.model import Commands
from agent.core.errors import DiskError, UsageError
from agent.disk.tables import CrypttabEntry

#: The longest passphrase read (cryptsetup's own limit for a typed one is 512 characters).
MAX_PASSPHRASE: Final = 4096
#: cryptsetup's exit status for "no key available with this passphrase".
CRYPTSETUP_WRONG_KEY: Final = 2

# Options that say when or where the line applies, not how to open it: the
# prompt's tries and timeout are the agent's.
_IGNORED: Final = frozenset({"luks", "noauto", "auto", "nofail", "_netdev", "noearly", "initramfs"})
_IGNORED_PREFIXES: Final = ("x-systemd.", "x-initrd.", "tries=", "timeout=", "keyfile-timeout=")
_FLAGS: Final = {
    "discard": "--allow-discards",
    "readonly": "--readonly",
    "read-only": "--readonly",
    "same-cpu-crypt": "--perf-same_cpu_crypt",
    "submit-from-crypt-cpus": "--perf-submit_from_crypt_cpus",
    "no-read-workqueue": "--perf-no_read_workqueue",
    "no-write-workqueue": "--perf-no_write_workqueue",
}
_VALUED: Final = {"header": "--header", "keyslot": "--key-slot", "key-slot": "--key-slot"}


def open_argv(entry: CrypttabEntry, device: str, commands: Commands) -> tuple[str, ...]:
    """``cryptsetup open`` of ``device`` as ``entry.name``, the key on stdin, crypttab's options honoured (pure).

    Raises DiskError naming an option that is not for a LUKS passphrase
    (plain, tcrypt, keyscript=, ...) or that is unknown.
    """
    argv: list[str] = [commands.cryptsetup, "open", "--type", "luks", "--key-file=-"]
    for option in entry.options:
        name, _, value = option.partition("=")
        if option in _IGNORED or option.startswith(_IGNORED_PREFIXES):
            continue
        if option in _FLAGS:
            if _FLAGS[option] not in argv:
                argv.append(_FLAGS[option])
            continue
        if name in _VALUED and value:
            if name == "header" and not value.startswith("/"):
                raise DiskError(
                    f"the crypttab line of {entry.name} gives header={value}, not an absolute path; nothing was unlocked",
                    step="unlock",
                )
            if name != "header" and not value.isdigit():
                raise DiskError(
                    f"the crypttab line of {entry.name} gives {option}: a key slot is a number; nothing was unlocked",
                    step="unlock",
                )
            argv += [_VALUED[name], value]
            continue
        raise DiskError(
            f"the crypttab line of {entry.name} has the option {option!r}, which backup-agent cannot honour when it "
            "opens the disk with a passphrase (a LUKS line with luks, discard, readonly, header=, keyslot= or the "
            "perf options is); nothing was unlocked",
            step="unlock",
        )
    return (*argv, device, entry.name)


def close_argv(entry: CrypttabEntry, commands: Commands) -> tuple[str, ...]:
    """``cryptsetup close NAME``: what locks a disk opened by :func:`open_argv` (pure)."""
    return (commands.cryptsetup, "close", entry.name)


def read_passphrase(fd: int, limit: int = MAX_PASSPHRASE) -> bytearray:
    """The passphrase on ``fd`` up to end-of-file, into one bytearray (no other copy is kept).

    Read straight into the buffer (``readv``), so no immutable ``bytes`` copy
    of it is left for the garbage collector. Refused (UsageError) when empty
    or longer than ``limit``; a trailing newline is part of the passphrase,
    as for ``cryptsetup --key-file=-``, so the sender writes none.
    """
    buffer = bytearray(limit + 1)
    length = 0
    with memoryview(buffer) as view:
        while length <= limit:
            count = os.readv(fd, [view[length:]])
            if count == 0:
                break
            length += count
    if length > limit:
        wipe(buffer)
        raise UsageError(f"--passphrase-stdin: the passphrase on standard input is longer than {limit} bytes; nothing was unlocked")
    if length == 0:
        raise UsageError("--passphrase-stdin: standard input held no passphrase; nothing was unlocked")
    # Shrinking in place keeps the same buffer (no copy of what stays).
    wipe(buffer, start=length)
    del buffer[length:]
    return buffer


def wipe(buffer: bytearray, start: int = 0) -> None:
    """Overwrite ``buffer`` from ``start`` with zeros, in place (as far as Python lets a secret be forgotten)."""
    buffer[start:] = bytes(len(buffer) - start)
