"""The settings the configuration decides: plain frozen dataclasses, and pure helpers over them.

Everything else in the package produces or checks these values
(:mod:`agent.config.validate`, :mod:`agent.config.load`); the rest of the
program only reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Union

from agent.policy.rotation import DEFAULT_SCHEME, Scheme
from agent.policy.schedule import DEFAULT_INTERVAL, DEFAULT_ON_PLUG

# Used when the whole system is backed up and the user did not list excludes:
# virtual and runtime filesystems, mount points of other disks, swap, and
# caches that are rebuilt on demand. Anchored at the transfer root ("/"), and
# "dir/*" keeps the (empty) directory itself so a restore recreates it.
#: Seconds a hook's before or after may run ([[hooks]] timeout).
DEFAULT_HOOK_TIMEOUT: Final = 600
#: keep_free never deletes below this many complete snapshots ([rotation] min_snapshots).
DEFAULT_MIN_SNAPSHOTS: Final = 3

DEFAULT_SYSTEM_EXCLUDES: Final[tuple[str, ...]] = (
    "/dev/*",
    "/proc/*",
    "/sys/*",
    "/run/*",
    "/tmp/*",
    "/var/tmp/*",
    "/mnt/*",
    "/media/*",
    "/lost+found",
    "/swapfile",
    "/swap.img",
    "/var/cache/apt/archives/*.deb",
    "/var/lib/systemd/coredump/*",
    "/home/*/.cache/*",
    "/home/*/.local/share/Trash/*",
    "/root/.cache/*",
    "/root/.local/share/Trash/*",
)


@dataclass(frozen=True)
class Commands:
    """Absolute paths of every external program the cycle runs.

    Absolute so that no PATH lookup decides what root executes.
    """

    rsync: str = "/usr/bin/rsync"
    ionice: str = "/usr/bin/ionice"
    nice: str = "/usr/bin/nice"
    rm: str = "/bin/rm"
    # /bin and /sbin: right with and without Debian's merged /usr.
    blkid: str = "/sbin/blkid"
    cryptdisks_start: str = "/sbin/cryptdisks_start"
    cryptdisks_stop: str = "/sbin/cryptdisks_stop"
    systemctl: str = "/bin/systemctl"
    mount: str = "/bin/mount"
    umount: str = "/bin/umount"
    sync: str = "/bin/sync"
    btrfs: str = "/bin/btrfs"  # the btrfs layout and method = "send" (btrfs-progs)
    find: str = "/usr/bin/find"  # the btrfs layout: hard links to split before rsync --inplace


@dataclass(frozen=True)
class Disk:
    """One encrypted backup disk: how to find, unlock and mount it, and its repository."""

    name: str  # the crypttab target name; the mapped device is /dev/mapper/<name>
    luks_uuid: str  # UUID of the LUKS partition (lower case, canonical form)
    mount_point: str
    mapped_device: str  # default /dev/mapper/<name>
    repository: str  # default <mount_point>/<hostname>; always strictly below mount_point
    unlock: str = "auto"  # auto | cryptdisks | systemd
    # When filesystem is set, the cycle mounts the mapped device itself
    # (mount -t FILESYSTEM -o OPTIONS); otherwise through the fstab entry.
    filesystem: str | None = None
    mount_options: tuple[str, ...] = ()
    # "links" | "btrfs" forces the repository's layout at init; None: [backup] layout.
    layout: str | None = None


@dataclass(frozen=True)
class Hook:
    """A command pair run around the whole cycle ("backup") or the transfer ("snapshot")."""

    name: str
    around: str  # "backup" | "snapshot"
    before: tuple[str, ...] | None = None  # argv; no shell unless the user writes sh -c
    after: tuple[str, ...] | None = None
    timeout: int = DEFAULT_HOOK_TIMEOUT  # seconds, for each of before and after
    critical: bool = True  # a failed critical before-hook stops the cycle before anything is written


@dataclass(frozen=True)
class KeepFree:
    """Free space to make before a transfer by deleting the oldest snapshots (opt-in)."""

    bytes: int | None = None
    percent: float | None = None
    min_snapshots: int = DEFAULT_MIN_SNAPSHOTS  # never delete below this many complete snapshots


REPORT_WHEN: Final[tuple[str, ...]] = ("failure", "success", "stale")


@dataclass(frozen=True)
class MailReport:
    """A ``[[report]]`` of ``type = "mail"``: a plain-text mail over SMTP when the run ends (docs: README, [[report]])."""

    host: str
    sender: str  # the file's "from"
    to: tuple[str, ...]
    port: int = 587
    security: str = "starttls"  # "starttls" | "tls" | "none"
    user: str | None = None
    password_file: str | None = None  # root's alone; read only when a mail is sent
    ca_file: str | None = None  # certificates to trust instead of the system's (a private CA)
    timeout: int = 30  # seconds, for each network operation
    # A mail an hour that all is well is noise: by default only what needs someone.
    on: tuple[str, ...] = ("failure", "stale")


@dataclass(frozen=True)
class PingReport:
    """A ``[[report]]`` of ``type = "ping"``: HTTP pings in the Healthchecks convention (``/start``, the URL, ``/fail``)."""

    url: str
    timeout: int = 10  # seconds; no retry, so the run waits at most this long for one ping
    # A heartbeat monitor notices silence only if it hears every success.
    on: tuple[str, ...] = REPORT_WHEN


Report = Union[MailReport, PingReport]


@dataclass(frozen=True)
class Settings:
    """Everything the configuration decides, validated; ``path`` is the file read."""

    path: str | None
    source: str = "/"
    repository: str | None = None
    exclude: tuple[str, ...] | None = None
    one_file_system: bool = True
    ionice: str = "idle"
    nice: int = 19
    skip_cachedir_tagged: bool = True
    io_timeout: int = 0
    # Destination layout (agent.engine.layouts): "auto" (btrfs on a btrfs filesystem, else links), "links", "btrfs".
    layout: str = "auto"
    # "rsync", or "send" (btrfs send | receive from a source subvolume into a btrfs repository).
    method: str = "rsync"
    rotation: Scheme = DEFAULT_SCHEME
    commands: Commands = Commands()
    notifications: bool = True
    tray: bool = True  # [tray]: the agent's status icon (StatusNotifierItem) where the desktop shows one
    remind_after: int = 7  # [notifications]: days without a successful backup before a reminder; 0: never
    disks: tuple[Disk, ...] = ()
    hooks: tuple[Hook, ...] = ()
    reports: tuple[Report, ...] = ()  # [[report]]: who hears the root cycle's result besides the desktop
    keep_free: KeepFree | None = None
    interval: int = DEFAULT_INTERVAL  # [agent]: seconds between backups while the disk stays attached
    on_plug: str = DEFAULT_ON_PLUG  # [agent]: one of agent.policy.schedule.ON_PLUG_CHOICES
    state_dir: str = "/var/lib/backup-agent"  # where init records each disk's repository id
    crypttab: str = "/etc/crypttab"
    fstab: str = "/etc/fstab"


def effective_excludes(settings: Settings) -> tuple[str, ...]:
    """The rsync exclude patterns to use: the user's list, else the defaults for "/"."""
    if settings.exclude is not None:
        return settings.exclude
    if settings.source == "/":
        return DEFAULT_SYSTEM_EXCLUDES
    return ()
