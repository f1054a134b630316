"""The settings the configuration decides: plain frozen dataclasses, and pure helpers over them.

Everything else in the package produces or checks these values
(:mod:`agent.config.validate`, :mod:`agent.config.load`); the rest of the
program only reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Union

from agent.policy.conditions import DEFAULT_BATTERY_BELOW, DEFAULT_SKIP_METERED, QuietHours
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
    # A disk opened with a passphrase the agent asked for (crypttab: no key file).
    cryptsetup: str = "/sbin/cryptsetup"
    systemctl: str = "/bin/systemctl"
    mount: str = "/bin/mount"
    umount: str = "/bin/umount"
    sync: str = "/bin/sync"
    btrfs: str = "/bin/btrfs"  # a frozen source's read-only snapshot (freeze), the btrfs layout, method = "send"
    unshare: str = "/usr/bin/unshare"  # the private mount namespace a frozen source is read in
    ssh: str = "/usr/bin/ssh"  # remote repositories (agent.repository.remote)
    # The off-site copy (docs/ARCHITECTURE.md, "The off-site copy"); it also runs in unshare's namespace.
    restic: str = "/usr/bin/restic"
    find: str = "/usr/bin/find"  # the btrfs layout: hard links to split before rsync --inplace


@dataclass(frozen=True)
class RemoteRepository:
    """One [[remote]]: a repository on a server reached over ssh (agent.repository.remote).

    ``identity_file`` and ``known_hosts`` are files on this machine; None
    leaves them to ssh (the running user's ~/.ssh). ``interval`` is the
    agent's seconds between backups to it while it is reachable.
    """

    name: str
    host: str
    path: str
    user: str | None = None
    port: int | None = None
    identity_file: str | None = None
    known_hosts: str | None = None
    connect_timeout: int = 10
    # An rsync daemon's module instead of a path over ssh (agent.repository.daemon), and its password file.
    module: str | None = None
    password_file: str | None = None
    # The desktop agent backs up to it on a metered connection too (docs/ARCHITECTURE.md, "Remote destinations").
    metered: bool = False
    interval: int | None = None  # the agent's seconds between backups to it; None: [agent] interval


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
class CommandSource:
    """A ``[[command_source]]``: a command whose output every snapshot stores (a database dump).

    Run as root after the transfer, its stdout streamed into the snapshot's
    ``.backup-agent/commands/<file>`` (README, "Command sources").
    """

    name: str
    command: tuple[str, ...]  # argv; the program an absolute path root owns
    file: str  # a plain file name; with compress = "gzip" it ends in .gz
    compress: str = "none"  # "none" | "gzip"
    timeout: int = DEFAULT_HOOK_TIMEOUT  # seconds
    critical: bool = True  # a failed critical command fails the backup; otherwise a warning


@dataclass(frozen=True)
class Packages:
    """``[packages]``: the installed packages and the package database stored with every snapshot."""

    # None: when the backup is of the whole system (the source is /), whose packages they are.
    enabled: bool | None = None


def packages_wanted(settings: "Settings", source: str) -> bool:
    """Whether this backup stores the system's packages: as configured, else when it backs up /."""
    if settings.packages.enabled is not None:
        return settings.packages.enabled
    return source == "/"


@dataclass(frozen=True)
class KeepFree:
    """Free space to make before a transfer by deleting the oldest snapshots (opt-in)."""

    bytes: int | None = None
    percent: float | None = None
    min_snapshots: int = DEFAULT_MIN_SNAPSHOTS  # never delete below this many complete snapshots


#: How a source that is a btrfs subvolume is read ([[source]] freeze, [backup] freeze).
FREEZE_CHOICES: Final[tuple[str, ...]] = ("auto", "always", "never")


@dataclass(frozen=True)
class SourceSpec:
    """One ``[[source]]``: a live path stored under its own directory of a snapshot of several sources.

    ``directory`` is the name of that directory (``name`` in the file, else
    derived from the path: :func:`agent.config.source_names.directory_for`);
    ``None`` for ``one_file_system`` and ``skip_cachedir_tagged`` follows
    ``[backup]``; ``exclude`` ``None`` means the defaults (the system's for ``/``).
    """

    path: str
    directory: str
    exclude: tuple[str, ...] | None = None
    one_file_system: bool | None = None
    skip_cachedir_tagged: bool | None = None
    freeze: str = "auto"


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

#: [[offsite]] defaults: a copy a day, pruning a month apart, a check a week reading 1/12 of the data.
DEFAULT_OFFSITE_INTERVAL: Final = 86400
DEFAULT_PRUNE_INTERVAL: Final = 30 * 86400
DEFAULT_CHECK_INTERVAL: Final = 7 * 86400
# restic 0.14 can stop making progress for good after a backend error while still printing its
# status (docs/ARCHITECTURE.md, "The off-site copy"): half an hour without any is taken for that.
DEFAULT_OFFSITE_STALL: Final = 30 * 60
DEFAULT_CHECK_PARTS: Final = 12


@dataclass(frozen=True)
class Offsite:
    """One ``[[offsite]]``: a restic repository that receives a copy of the newest local snapshot.

    Exactly one of ``repository``/``repository_file`` and one of
    ``password_file``/``password_command``; every file is root's alone and
    is handed to restic by name or through its environment, never on a
    command line (docs/ARCHITECTURE.md, "The off-site copy").
    """

    name: str
    repository: str | None = None  # "/path", "sftp:host:/path", "rest:https://...", "s3:..."
    repository_file: str | None = None
    password_file: str | None = None
    password_command: tuple[str, ...] | None = None  # argv; its stdout is the password
    environment_file: str | None = None  # KEY=VALUE lines for the backend (AWS_*, B2_*, ...), root's alone
    host: str | None = None  # the --host of each off-site snapshot; default this machine's name
    interval: int = DEFAULT_OFFSITE_INTERVAL  # seconds: at most one copy this often
    metered: bool = False  # also copy over a metered connection
    remind_after: int = 7  # days without an off-site copy before a reminder; 0: never
    rotation: Scheme = DEFAULT_SCHEME  # [offsite.rotation]; default: the local [rotation]
    keep_last: int = 1  # [offsite.rotation] last: restic forget --keep-last, the newest N kept whatever their period
    append_only: bool = False  # the server refuses deletion: forget and prune are the server owner's
    prune_interval: int = DEFAULT_PRUNE_INTERVAL
    check_interval: int = DEFAULT_CHECK_INTERVAL
    stall_timeout: int = DEFAULT_OFFSITE_STALL  # seconds restic's backup may report no progress before it is stopped
    check_parts: int = DEFAULT_CHECK_PARTS  # N of --read-data-subset=k/N; 0: no reading of data
    pack_size: int | None = None  # MiB (restic --pack-size)
    limit_upload: int | None = None  # KiB/s (restic --limit-upload)
    options: tuple[str, ...] = ()  # restic -o key=value (sftp.command, s3.storage-class, ...); on its command line: no secrets


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
    remotes: tuple[RemoteRepository, ...] = ()  # [[remote]]: repositories on servers over ssh
    hooks: tuple[Hook, ...] = ()
    reports: tuple[Report, ...] = ()  # [[report]]: who hears the root cycle's result besides the desktop
    command_sources: tuple[CommandSource, ...] = ()  # [[command_source]]: dumps stored in every snapshot
    packages: Packages = Packages()  # [packages]: the package lists and database with every snapshot
    offsite: tuple[Offsite, ...] = ()  # [[offsite]]: restic repositories that get a copy of each snapshot
    keep_free: KeepFree | None = None
    freeze: str = "auto"  # [backup]: the single source's, when it is a btrfs subvolume
    sources: tuple[SourceSpec, ...] = ()  # [[source]]: several sources in one snapshot (replaces [backup] source)
    interval: int = DEFAULT_INTERVAL  # [agent]: seconds between backups while the disk stays attached
    on_plug: str = DEFAULT_ON_PLUG  # [agent]: one of agent.policy.schedule.ON_PLUG_CHOICES
    # [conditions]: moments not to back up (agent.policy.conditions)
    battery_below: int = DEFAULT_BATTERY_BELOW  # percent of charge; 0: the battery never holds a backup
    skip_metered: bool = DEFAULT_SKIP_METERED  # a remote destination waits while the connection is metered
    quiet_hours: QuietHours | None = None  # local time; None: none
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
