"""A repository on another machine, reached over SSH: what runs on the server, what the client computes.

The server needs only sshd, rsync and POSIX tools (a NAS has no Python), so
every operation on it is one ``ssh`` call running a fixed ``sh`` script of
this module with its values as positional arguments: ssh joins its argv into
one line that the server's shell parses again, so that line is built here
from ``sh -c SCRIPT sh ARG...``, each word quoted with :func:`shlex.quote`,
and any name survives (docs/ARCHITECTURE.md, "Remote repositories").

The repository's format is the local one (agent.repository.store): the
marker, ``snapshots/<name>.in-progress`` until complete, ``metadata/``,
``latest``, ``.trash/``; the lock is a directory ``.remote-lock`` made with
``mkdir`` (atomic on any POSIX filesystem) holding who took it. The client
computes every decision (names, what to delete, metadata) and the server
carries out plain ``mkdir``, ``mv``, ``ln -sfn``, ``rm``, ``sync``.

Argv builders and parsers are pure and tested directly; :class:`RemoteRepository`
runs them through the one runner.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
import os
import re
import shlex
import shutil
import socket
import stat
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

from agent.config.model import RemoteRepository as RemoteSettings
from agent.config.model import Settings
from agent.core.commands import Runner
from agent.core.errors import (
    BackupAgentError,
    BusyError,
    CommandError,
    ConnectionLostError,
    HostKeyError,
    RefusedError,
    RepositoryError,
    UnreachableError,
    UsageError,
)
from agent.policy.rotation import format_snapshot_name, parse_snapshot_name
from agent.repository.store import (
    FORMAT_VERSION,
    IN_PROGRESS,
    MARKER,
    MAX_MARKER_BYTES,
    MAX_METADATA_BYTES,
    Marker,
    parse_json,
    parse_marker,
    read_bounded,
    snapshot_sort_key,
)

log = logging.getLogger(__name__)

LOCK_DIR = ".remote-lock"
# Seconds ssh waits for the TCP connection: an unreachable server fails in this time, not the kernel's minutes.
DEFAULT_CONNECT_TIMEOUT = 10
# Seconds the shared connection outlives its last use when nothing stops it (a run killed outright).
CONTROL_PERSIST = 30
# A connection silent this long (interval x count) is dead: the transfer stops instead of hanging.
SERVER_ALIVE = ("15", "4")

_USER = r"[A-Za-z0-9._][A-Za-z0-9._-]*"
_HOST = r"[A-Za-z0-9_][A-Za-z0-9._-]*|\[[0-9A-Fa-f:.]+\]"
_DESTINATION = re.compile(rf"^(?:(?P<user>{_USER})@)?(?P<host>{_HOST}):(?P<path>.*)$", re.DOTALL)


@dataclass(frozen=True)
class Remote:
    """Where a remote repository is and how ssh reaches it.

    ``identity_file`` and ``known_hosts`` are files on this machine (root's,
    checked where the configuration is read); None uses ssh's defaults
    (the caller's ~/.ssh). ``name`` is the ``[[remote]]`` name, if any.
    """

    host: str
    path: str
    user: str | None = None
    port: int | None = None
    identity_file: str | None = None
    known_hosts: str | None = None
    connect_timeout: int = DEFAULT_CONNECT_TIMEOUT
    name: str | None = None
    # One connection shared by every ssh call of a run (ssh's ControlMaster); see multiplexed().
    control_path: str | None = None

    @property
    def login(self) -> str:
        """``[user@]host`` as rsync's remote path prefix takes it."""
        return f"{self.user}@{self.host}" if self.user else self.host

    @property
    def shown(self) -> str:
        """How messages name it: ``user@host:/path`` (with ``port N`` when not 22)."""
        port = f" (port {self.port})" if self.port not in (None, 22) else ""
        return f"{self.login}:{self.path}{port}"

    def at(self, *parts: str) -> str:
        """A path on the server below the repository (pure)."""
        return "/".join([self.path.rstrip("/") or "/", *parts]).replace("//", "/")


def is_daemon_destination(text: str) -> bool:
    """``rsync://host/module/path`` or ``host::module``: an rsync daemon, not SSH."""
    return text.startswith("rsync://") or bool(re.match(rf"^(?:{_USER}@)?(?:{_HOST})::", text))


def parse_destination(text: str) -> Remote | None:
    """``[user@]host:/path`` as a Remote; None for a local path (pure).

    A local path is one that starts with ``/`` or ``.`` or has no colon
    before its first slash, as rsync decides. A remote path must be
    absolute: a relative one depends on the server's home directory.
    """
    if text.startswith(("/", ".")) or is_daemon_destination(text):
        return None
    head = text.split("/", 1)[0]
    if ":" not in head:
        return None
    match = _DESTINATION.match(text)
    if match is None:
        raise UsageError(f"{text!r} is neither a local path nor [user@]host:/path: check the host and user names")
    path = match["path"]
    if not path.startswith("/") or "\n" in path or "\0" in path:
        raise UsageError(f"{text!r}: give the remote repository as an absolute path, e.g. {match['host']}:/srv/backup/{socket.gethostname()}")
    return Remote(host=match["host"], path=path.rstrip("/") or "/", user=match["user"])


def from_settings(configured: RemoteSettings) -> Remote:
    """The Remote a ``[[remote]]`` section describes."""
    return Remote(
        host=configured.host, path=configured.path, user=configured.user, port=configured.port,
        identity_file=configured.identity_file, known_hosts=configured.known_hosts,
        connect_timeout=configured.connect_timeout, name=configured.name,
    )  # fmt: skip


def named(settings: Settings, name: str) -> Remote:
    """The ``[[remote]]`` called ``name``; a UsageError naming the configured ones otherwise."""
    for configured in settings.remotes:
        if configured.name == name:
            if configured.module is not None:
                raise UsageError(f"[[remote]] {name} is an rsync daemon's module: back up to it as rsync://{configured.host}/{configured.module}")
            return from_settings(configured)
    known = ", ".join(r.name for r in settings.remotes) or "none"
    raise UsageError(f"no [[remote]] named {name!r} in {settings.path or 'the configuration'} (configured: {known})")


def as_configured(settings: Settings, remote: Remote, *, any_path: bool = False) -> Remote:
    """A ``host:/path`` given on the command line that a ``[[remote]]`` describes takes its key, known_hosts and port.

    ``any_path``: the host alone decides (an ssh tunnel's server, -t).
    """
    for configured in settings.remotes:
        same_path = any_path or configured.path == remote.path
        same_user = remote.user is None or configured.user in (None, remote.user)
        if configured.host == remote.host and same_path and same_user and configured.module is None:
            found = from_settings(configured)
            found = dataclasses.replace(found, user=remote.user or found.user)
            return dataclasses.replace(found, path=remote.path, port=remote.port or found.port) if any_path else found
    return remote


def key_problem(path: str, info: os.stat_result, *, as_root: bool) -> str | None:
    """Why an identity file must not be used (others may read it, or it is not root's), or None (pure)."""
    if not stat.S_ISREG(info.st_mode):
        return f"the identity file {path} is not a regular file"
    if stat.S_IMODE(info.st_mode) & 0o077:
        return f"the identity file {path} can be read by others (mode {info.st_mode & 0o777:o}): chmod 600 {path}"
    if as_root and info.st_uid != 0:
        return f"the identity file {path} belongs to uid {info.st_uid}, not root: chown root: {path}"
    return None


def known_hosts_problem(path: str, info: os.stat_result, *, as_root: bool) -> str | None:
    """Why a known_hosts file must not be trusted (others could add a key for a server in the middle), or None (pure)."""
    if not stat.S_ISREG(info.st_mode):
        return f"the known_hosts file {path} is not a regular file"
    if stat.S_IMODE(info.st_mode) & 0o022:
        return f"the known_hosts file {path} can be changed by others: chmod go-w {path}"
    if as_root and info.st_uid != 0:
        return f"the known_hosts file {path} belongs to uid {info.st_uid}, not root: chown root: {path}"
    return None


def check_key(remote: Remote) -> None:
    """Refuse an identity file others could read or change, or a known_hosts others could change, before ssh is started (a UsageError)."""
    if remote.known_hosts is not None:
        try:
            listed = os.lstat(remote.known_hosts)
        except OSError as exc:
            raise UsageError(f"the known_hosts file {remote.known_hosts} cannot be read: {exc.strerror}", step="prepare") from None
        trouble = known_hosts_problem(remote.known_hosts, listed, as_root=os.geteuid() == 0)
        if trouble is not None:
            raise UsageError(trouble + "; nothing was sent", step="prepare")
    if remote.identity_file is None:
        return
    try:
        info = os.lstat(remote.identity_file)
    except OSError as exc:
        raise UsageError(f"the identity file {remote.identity_file} cannot be read: {exc.strerror}", step="prepare") from None
    problem = key_problem(remote.identity_file, info, as_root=os.geteuid() == 0)
    if problem is not None:
        raise UsageError(problem + "; nothing was sent", step="prepare")


# -- argv (pure) -----------------------------------------------------------------


def ssh_argv(remote: Remote, ssh: str = "/usr/bin/ssh") -> tuple[str, ...]:
    """ssh with its options, without the host: never prompts, checks the host key strictly, gives up quickly.

    ``-F none``: no configuration file decides anything (root's ~/.ssh/config
    included). BatchMode: no password or passphrase prompt, no question
    about a host key. StrictHostKeyChecking: an unknown or changed key is a
    refusal, never accepted. ConnectTimeout: an unreachable server fails
    in seconds. ServerAlive: a silent connection is declared dead.
    """
    argv = [
        ssh, "-F", "none",
        "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=yes",
        "-o", f"ConnectTimeout={remote.connect_timeout}",
        "-o", f"ServerAliveInterval={SERVER_ALIVE[0]}",
        "-o", f"ServerAliveCountMax={SERVER_ALIVE[1]}",
        "-o", "LogLevel=ERROR",
    ]  # fmt: skip
    if remote.known_hosts is not None:
        argv += ["-o", f"UserKnownHostsFile={remote.known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null"]
    if remote.identity_file is not None:
        argv += ["-o", "IdentitiesOnly=yes", "-i", remote.identity_file]
    if remote.control_path is not None:
        argv += ["-o", "ControlMaster=auto", "-o", f"ControlPath={remote.control_path}", "-o", f"ControlPersist={CONTROL_PERSIST}"]
    if remote.port is not None:
        argv += ["-p", str(remote.port)]
    if remote.user is not None:
        argv += ["-l", remote.user]
    return tuple(argv)


def control_exit_argv(remote: Remote, ssh: str = "/usr/bin/ssh") -> tuple[str, ...]:
    """ssh telling the shared connection's master to stop (pure)."""
    host = remote.host[1:-1] if remote.host.startswith("[") else remote.host
    return (*ssh_argv(remote, ssh), "-O", "exit", host)


@contextlib.contextmanager
def multiplexed(remote: Remote, runner: Runner, ssh: str = "/usr/bin/ssh") -> Iterator[Remote]:
    """The remote with one shared ssh connection for the block (each ssh call then costs no new handshake).

    The first call opens the master (in the background, stdio on /dev/null);
    the block's end stops it and removes its private directory, whatever
    happened; a process killed outright leaves it for CONTROL_PERSIST seconds.
    """
    directory = tempfile.mkdtemp(prefix="backup-agent-ssh-")
    shared = dataclasses.replace(remote, control_path=os.path.join(directory, "master"))
    try:
        yield shared
    finally:
        try:
            if os.path.exists(shared.control_path or ""):
                runner.run(control_exit_argv(shared, ssh), step="close", check=False, mutating=False)
        finally:
            shutil.rmtree(directory, ignore_errors=True)


def remote_line(argv: Sequence[str]) -> str:
    """The one command line ssh hands the server's shell: every word quoted, so it arrives as ``argv``."""
    return " ".join(shlex.quote(word) for word in argv)


def script_argv(remote: Remote, script: str, *args: str, ssh: str = "/usr/bin/ssh") -> tuple[str, ...]:
    """ssh running ``sh -c SCRIPT sh ARGS...`` on the server; the script reads its values as $1, $2... (pure)."""
    host = remote.host[1:-1] if remote.host.startswith("[") else remote.host
    return (*ssh_argv(remote, ssh), host, remote_line(("sh", "-c", script, "sh", *args)))


def rsync_shell(remote: Remote, ssh: str = "/usr/bin/ssh") -> str:
    """The ``-e`` value for rsync: the same ssh, as one string rsync splits again (its quoting is shlex's single quotes)."""
    return " ".join(shlex.quote(word) for word in ssh_argv(remote, ssh))


def rsync_remote_path(remote: Remote, *parts: str) -> str:
    """``host:/path/...`` as rsync takes a remote path (the user goes to ssh's ``-l``)."""
    return f"{remote.host}:{remote.at(*parts)}"


# -- what runs on the server -------------------------------------------------------

# Every script is fixed text; values arrive as positional parameters only.
# Entries whose name holds a newline or carriage return are never reported
# by name (they could forge a line); they are not ours and nothing uses them.
_NEWLINES = """nl='
'
cr=$(printf '\\r')
"""

# $1 root; to take the lock as well: $2 the holder (one line), $3 "take" to take one
# this machine left, $4 the marker's line that proves it ours (no lock is taken otherwise).
PROBE = _NEWLINES + r"""r=$1
if [ ! -e "$r" ] && [ ! -L "$r" ]; then echo 'state missing'; exit 0; fi
if [ -L "$r" ] || [ ! -d "$r" ]; then echo 'state foreign'; exit 0; fi
cd -- "$r" || exit 3
if [ -L .backup-agent.toml ] || [ ! -f .backup-agent.toml ]; then
  for f in * .[!.]* ..?*; do
    [ -e "$f" ] || [ -L "$f" ] || continue
    case $f in lost+found|.backup-agent.toml.tmp-*) continue;; esac
    echo 'state foreign'; exit 0
  done
  echo 'state empty'; exit 0
fi
echo 'state repository'
dd if=.backup-agent.toml bs=65536 count=1 2>/dev/null | sed 's/^/marker /'
echo
if [ -n "$2" ]; then
  if ! grep -qxF -- "$4" .backup-agent.toml; then echo 'lock not-ours'
  elif mkdir .remote-lock 2>/dev/null || { [ "$3" = take ] && [ -d .remote-lock ] && [ ! -L .remote-lock ]; }; then
    if printf '%s\n' "$2" > .remote-lock/holder.new && mv -f -- .remote-lock/holder.new .remote-lock/holder; then
      echo 'lock taken'
    else
      echo 'lock failed'
    fi
  else
    printf 'lock held '; dd if=.remote-lock/holder bs=4096 count=1 2>/dev/null | tr -d '\n\r'; echo
  fi
fi
for d in snapshots metadata .trash; do
  if [ -d "$d" ] && [ ! -L "$d" ]; then echo "has $d"; elif [ -e "$d" ] || [ -L "$d" ]; then echo "bad $d"; fi
done
if [ -d snapshots ] && [ ! -L snapshots ]; then
  for d in snapshots/* snapshots/.[!.]* snapshots/..?*; do
    [ -e "$d" ] || [ -L "$d" ] || continue
    n=${d#snapshots/}
    case $n in *"$nl"*|*"$cr"*) echo 'unnamed'; continue;; esac
    if [ -d "$d" ] && [ ! -L "$d" ]; then echo "dir $n"; else echo "other $n"; fi
  done
fi
if [ -d .trash ] && [ ! -L .trash ]; then
  for d in .trash/* .trash/.[!.]* .trash/..?*; do
    [ -e "$d" ] || [ -L "$d" ] || continue
    echo 'trash'
  done
fi
if [ -L latest ]; then
  t=$(readlink latest)
  case $t in *"$nl"*|*"$cr"*) ;; *) echo "latest $t";; esac
fi
"""

# $1 root, $2 the marker's text. Refuses a directory that is not empty.
CREATE = r"""mkdir -p -- "$1" && cd -- "$1" || exit 3
for f in * .[!.]* ..?*; do
  [ -e "$f" ] || [ -L "$f" ] || continue
  case $f in lost+found|.backup-agent.toml.tmp-*) continue;; esac
  echo "$1 is not empty" >&2; exit 4
done
mkdir -p snapshots metadata .trash || exit 3
t=.backup-agent.toml.tmp-$$
printf '%s' "$2" > "$t" && mv -f -- "$t" .backup-agent.toml && sync
"""

# $1 root, $2 the holder: released only when it is still ours.
UNLOCK = r"""cd -- "$1" || exit 3
[ -d .remote-lock ] && [ ! -L .remote-lock ] || exit 0
h=$(dd if=.remote-lock/holder bs=4096 count=1 2>/dev/null)
if [ "$h" != "$2" ]; then echo 'the lock is no longer ours' >&2; exit 0; fi
rm -f -- .remote-lock/holder && rmdir -- .remote-lock
"""

# $1 root, $2 name, $3 the metadata (JSON). Written beside, then renamed.
WRITE_METADATA = r"""cd -- "$1/metadata" || exit 3
printf '%s\n' "$3" > ".$2.json.tmp" && mv -f -- ".$2.json.tmp" "$2.json"
"""

# $1 root, $2 name, $3 its metadata (complete). Durable before visible: metadata, sync, rename, latest, sync. ``sync -f``
# (coreutils, busybox) syncs the repository's filesystem alone; plain sync elsewhere.
COMPLETE = r"""cd -- "$1/metadata" || exit 3
n=$2
printf '%s\n' "$3" > ".$n.json.tmp" && mv -f -- ".$n.json.tmp" "$n.json" || exit 3
cd ../snapshots || exit 3
if [ ! -d "$n.in-progress" ] || [ -L "$n.in-progress" ]; then echo "snapshots/$n.in-progress is gone" >&2; exit 4; fi
if [ -e "$n" ] || [ -L "$n" ]; then echo "snapshots/$n exists already" >&2; exit 4; fi
sync -f . 2>/dev/null || sync
mv -- "$n.in-progress" "$n" || exit 5
cd .. && ln -sfn -- "snapshots/$n" latest && { sync -f . 2>/dev/null || sync; }
"""

# $1 root, then entries of snapshots/: each out of the listing into .trash, its metadata removed.
DISCARD = r"""cd -- "$1" || exit 3
shift
s=0
for n in "$@"; do
  d="snapshots/$n"
  if [ -d "$d" ] && [ ! -L "$d" ]; then
    t=".trash/$n"
    while [ -e "$t" ] || [ -L "$t" ]; do t="$t~"; done
    mv -- "$d" "$t" || { s=5; continue; }
  fi
  b=${n%.in-progress}
  rm -f -- "metadata/$b.json" "metadata/$b.manifest" || s=5
done
exit $s
"""

# $1 root: remove what .trash holds, at idle I/O priority where ionice exists.
EMPTY_TRASH = r"""cd -- "$1/.trash" || exit 0
ionice -c 3 -p $$ >/dev/null 2>&1 || :
s=0
for f in * .[!.]* ..?*; do
  [ -e "$f" ] || [ -L "$f" ] || continue
  rm -rf -- "$f" || s=5
done
exit $s
"""


# A loop body's first lines, for snapshot $n and the path $rel below it: $p the path, reached
# without following a symbolic link on the way (like the local lstat_in), else the next $n.
# Shared by HOLDS and remote_read's VERSIONS; $IFS is restored whatever the path holds.
WALK_WITHOUT_LINKS = r"""  p=$n; ok=1; saved=$IFS; IFS=/
  for c in $rel; do
    IFS=$saved
    [ -n "$c" ] || continue
    if [ -L "$p" ] || [ ! -d "$p" ]; then ok=0; break; fi
    p="$p/$c"
  done
  IFS=$saved
  [ $ok = 1 ] || continue
"""

# $1 root, $2 a path relative to a snapshot, then snapshot names: what each holds there
# (f, d, l, o), following no link below the snapshot, like the local lstat_in.
HOLDS = r"""set -f
cd -- "$1/snapshots" || exit 3
rel=$2
shift 2
for n in "$@"; do
""" + WALK_WITHOUT_LINKS + r"""  if [ -L "$p" ]; then echo "l $n"; elif [ -d "$p" ]; then echo "d $n"; elif [ -f "$p" ]; then echo "f $n"
  elif [ -e "$p" ]; then echo "o $n"; fi
done
"""

KINDS = {"f": "file", "d": "directory", "l": "symlink", "o": "other"}


# -- reading the answers (pure) ----------------------------------------------------


@dataclass
class Probe:
    """What the server says about the repository directory (PROBE's answer)."""

    state: str = "missing"
    marker_text: str = ""
    has: set[str] = field(default_factory=set)
    bad: list[str] = field(default_factory=list)
    directories: list[str] = field(default_factory=list)
    others: list[str] = field(default_factory=list)
    unnamed: int = 0
    trash: int = 0
    latest: str | None = None
    lock: str | None = None

    @property
    def snapshot_names(self) -> list[str]:
        return sorted((n for n in self.directories if parse_snapshot_name(n) is not None), key=snapshot_sort_key)

    @property
    def in_progress_names(self) -> list[str]:
        names = [n[: -len(IN_PROGRESS)] for n in self.directories if n.endswith(IN_PROGRESS)]
        return sorted((n for n in names if parse_snapshot_name(n) is not None), key=snapshot_sort_key)

    @property
    def foreign_names(self) -> list[str]:
        """Entries of snapshots/ that are neither snapshots nor unfinished transfers (kept, never used)."""
        ours = set(self.snapshot_names) | {n + IN_PROGRESS for n in self.in_progress_names}
        return sorted(n for n in (*self.directories, *self.others) if n not in ours)

    def latest_name(self) -> str | None:
        """``latest`` when it names a listed snapshot, else the newest by name (it is only a pointer)."""
        names = self.snapshot_names
        target = (self.latest or "").rstrip("/")
        name = target[len("snapshots/") :] if target.startswith("snapshots/") else ""
        if name in names:
            return name
        return names[-1] if names else None


def parse_probe(lines: Sequence[str]) -> Probe:
    """PROBE's output as a :class:`Probe` (pure)."""
    probe = Probe()
    marker: list[str] = []
    for line in lines:
        word, _, rest = line.partition(" ")
        if word == "state":
            probe.state = rest
        elif word == "marker":
            marker.append(rest)
        elif word == "has":
            probe.has.add(rest)
        elif word == "bad":
            probe.bad.append(rest)
        elif word == "dir":
            probe.directories.append(rest)
        elif word == "other":
            probe.others.append(rest)
        elif word == "unnamed":
            probe.unnamed += 1
        elif word == "trash":
            probe.trash += 1
        elif word == "latest":
            probe.latest = rest
        elif word == "lock":
            probe.lock = rest
    probe.marker_text = "\n".join(marker)[:MAX_MARKER_BYTES]
    return probe


def free_name(start: dt.datetime, taken: set[str]) -> str:
    """The snapshot name for ``start``, a second later while it clashes with ``taken`` (pure)."""
    moment = start.replace(microsecond=0)
    for _ in range(120):
        name = format_snapshot_name(moment)
        if name not in taken and name + IN_PROGRESS not in taken:
            return name
        moment += dt.timedelta(seconds=1)
    raise RepositoryError(f"no free snapshot name near {format_snapshot_name(start)}", step="transfer")


_HOST_KEY_CHANGED = re.compile(r"REMOTE HOST IDENTIFICATION HAS CHANGED|Host key for .* has changed")
_HOST_KEY = re.compile(r"Host key verification failed|No \S+ host key is known|host key for .* is not known")
_REFUSED = re.compile(r"Permission denied \(|Too many authentication failures|no matching host key type|Authentication failed")
_UNREACHABLE = re.compile(
    r"Connection refused|Connection timed out|Operation timed out|No route to host|Network is unreachable|"
    r"Could not resolve hostname|Name or service not known|Temporary failure in name resolution|"
    r"connect to host .* port \d+:"
)
_LOST = re.compile(
    r"Connection closed by|Connection reset|Broken pipe|connection unexpectedly closed|Timeout, server .* not responding|"
    r"client_loop: send disconnect|error in rsync protocol data stream|unexpected end of file"
)


def connection_failure(remote: Remote, stderr: Sequence[str], *, step: str | None, during: bool) -> BackupAgentError | None:
    """What ssh's (or rsync's) error output says went wrong with the connection, as the error to raise; None if nothing (pure).

    ``during``: the failure came during a transfer, whose unfinished part is
    kept on the server to resume from.
    """
    text = "\n".join(stderr)
    where = remote.shown
    known = f" ({remote.known_hosts})" if remote.known_hosts else ""
    if _HOST_KEY_CHANGED.search(text):
        return HostKeyError(
            f"the host key of {remote.host} has CHANGED since it was recorded in known_hosts{known}: nothing was sent; "
            "if the server was reinstalled, check its new key with its administrator and replace the line in known_hosts",
            step=step,
        )
    if _HOST_KEY.search(text):
        return HostKeyError(
            f"the host key of {remote.host} is not in known_hosts{known}: nothing was sent; add the server's key "
            f"(ssh-keyscan -p {remote.port or 22} {remote.host}, checked against the server's own fingerprint) to that file",
            step=step,
        )
    if _REFUSED.search(text):
        key = f" {remote.identity_file}" if remote.identity_file else ""
        return RefusedError(
            f"{remote.login} refused the key{key} (ssh: {matching_line(text, _REFUSED)}): nothing was sent; add the public key to "
            f"{remote.user or 'the user'}'s ~/.ssh/authorized_keys on {remote.host}",
            step=step,
        )
    if _UNREACHABLE.search(text) and not during:
        return UnreachableError(
            f"{remote.host} cannot be reached ({matching_line(text, _UNREACHABLE)}): nothing was sent; the earlier snapshots on "
            f"{where} are untouched, and the next run tries again",
            step=step,
        )
    if _LOST.search(text) or (during and _UNREACHABLE.search(text)):
        kept = "; the unfinished transfer is kept on the server and the next run resumes from it" if during else ""
        return ConnectionLostError(
            f"the connection to {remote.host} broke off ({matching_line(text, _LOST) or matching_line(text, _UNREACHABLE)}){kept}",
            step=step,
        )
    return None


def matching_line(text: str, pattern: re.Pattern[str]) -> str:
    """The line of ``text`` where ``pattern`` first matches, stripped and cut to 200 characters ("": none)."""
    match = pattern.search(text)
    if match is None:
        return ""
    start = text.rfind("\n", 0, match.start()) + 1
    end = text.find("\n", match.end())
    return text[start : end if end >= 0 else len(text)].strip()[:200]


def marker_line(repository: "RemoteRepository", marker: Marker | None = None) -> str:
    """The marker line the lock requires: the recorded id when there is one, else this host's name."""
    if repository.expected_id is not None:
        return f'id = "{repository.expected_id}"'
    if marker is not None:
        return f'id = "{marker.id}"'
    return Marker(FORMAT_VERSION, "", socket.gethostname(), "").render().splitlines()[3]


def holder_line(repository: str) -> str:
    """What the lock says about its holder: one JSON line (this host, pid, start)."""
    return json.dumps(
        {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "repository": repository,
            "id": uuid.uuid4().hex[:12],
        },
        sort_keys=True,
        ensure_ascii=True,
    )


def parse_holder(text: str) -> dict[str, Any]:
    """The holder a lock names; {} when unreadable (pure)."""
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


# -- the repository on the server ---------------------------------------------------

class RemoteRepository:
    """A repository on a server: listing, metadata, lock, completion and deletion, each one ssh call.

    The metadata of every snapshot is fetched once with rsync into a private
    local directory (``metadata_cache``), read from there with the local
    bounds, and written through to the server.
    """

    def __init__(self, remote: Remote, runner: Runner, *, ssh: str = "/usr/bin/ssh", rsync: str = "/usr/bin/rsync") -> None:
        self.remote = remote
        self.runner = runner
        self.ssh = ssh
        self.rsync = rsync
        self.probe_result = Probe()
        self.marker: Marker | None = None
        self._cache: str | None = None
        # The repository id this machine recorded for it (a [[remote]] backed up before), if any.
        self.expected_id: str | None = None

    @property
    def root(self) -> str:
        return self.remote.shown

    # -- running -------------------------------------------------------------

    def run_script(self, script: str, *args: str, step: str, mutating: bool = True) -> list[str]:
        """Run one server script; its stdout lines. A connection failure is its own error; any other a CommandError."""
        argv = script_argv(self.remote, script, *args, ssh=self.ssh)
        out: list[str] = []
        result = self.runner.run(argv, step=step, on_stdout=out.append, mutating=mutating, check=False)
        if result.returncode != 0:
            failure = connection_failure(self.remote, result.stderr_tail, step=step, during=False) if result.returncode == 255 else None
            if failure is not None:
                raise failure
            raise CommandError(
                f"on {self.remote.host}: {' | '.join(result.stderr_tail[-2:]) or f'status {result.returncode}'}",
                argv=result.argv,
                returncode=result.returncode,
                stderr_tail=result.stderr_tail,
                step=step,
            )
        return out

    # -- reading -------------------------------------------------------------

    def probe(self, *, step: str = "prepare", holder: str = "", take: bool = False, ours: str = "") -> Probe:
        """What the repository directory holds now (one ssh call); with ``holder``, the lock is taken in the same call.

        ``ours`` is the marker line that proves the repository ours: without
        it in the marker no lock is taken (a repository that is not ours is
        not touched).
        """
        lines = self.run_script(PROBE, self.remote.path, holder, "take" if take else "", ours, step=step, mutating=bool(holder))
        self.probe_result = parse_probe(lines)
        probe = self.probe_result
        if probe.state == "repository":
            self.marker = parse_marker(probe.marker_text, f"{self.root}/{MARKER}")
            if probe.bad:
                raise RepositoryError(
                    f"{self.root}: {', '.join(probe.bad)} is not a directory: the repository was changed by something else; "
                    "nothing was written",
                    step=step,
                )
        return probe

    @contextlib.contextmanager
    def opened(self, *, create: bool, lock: bool, ours: Callable[[Marker], str | None], step: str = "prepare") -> Iterator[Marker]:
        """The repository's marker, its lock held for the block when ``lock`` (one ssh call in the common case).

        With ``create``, a missing or empty directory becomes a repository
        first; a directory holding anything else is refused (not ours).
        ``ours(marker)`` says why a repository is not ours (None: it is); the
        lock is never taken on one that is not. The machine lock is held
        around every cycle, so a lock this host left (a run killed or cut
        off) is stale and taken over with a warning; one held by another host
        is a BusyError naming it.
        """
        holder = holder_line(self.remote.path) if lock else ""
        proof = marker_line(self)
        probe = self.probe(step=step, holder=holder, ours=proof)
        if probe.state == "foreign":
            raise RepositoryError(
                f"{self.root} exists and is not a backup-agent repository (no {MARKER}): it is not ours, nothing was "
                "written; give an empty or new directory",
                step=step,
            )
        if probe.state in ("missing", "empty"):
            if not create:
                raise RepositoryError(f"{self.root} holds no repository yet: back up to it first", step=step)
            marker = Marker(
                FORMAT_VERSION, uuid.uuid4().hex, socket.gethostname(), dt.datetime.now().astimezone().isoformat(timespec="seconds")
            )
            self.run_script(CREATE, self.remote.path, marker.render(), step=step)
            log.info("created the repository %s (id %s)", self.root, marker.id)
            probe = self.probe(step=step, holder=holder, ours=marker_line(self, marker))
        found = self.marker
        if found is None:
            raise RepositoryError(f"{self.root}: the repository marker could not be read", step=step)
        refusal = ours(found)
        if refusal is not None:
            if probe.lock == "taken":
                self.run_script(UNLOCK, self.remote.path, holder, step=step)
            raise RepositoryError(refusal, step=step)
        if lock:
            if probe.lock is not None and probe.lock.startswith("held"):
                other = parse_holder(probe.lock[5:])
                if other.get("host") != socket.gethostname():
                    raise BusyError(
                        f"{self.root} is locked by {other.get('host', 'an unknown host')} (pid {other.get('pid', '?')}, since "
                        f"{other.get('started', '?')}): another machine is writing to it; try again later, or if that run is "
                        f"gone remove {LOCK_DIR} in the repository on {self.remote.host}",
                        step=step,
                        holder=other,
                    )
                log.warning("taking over the lock a stopped run of this machine left on %s (pid %s)", self.root, other.get("pid"))
                probe = self.probe(step=step, holder=holder, take=True, ours=proof)
            if probe.lock != "taken":
                raise CommandError(f"the lock of {self.root} could not be taken ({probe.lock or 'no answer'})", step=step)
        try:
            yield found
        finally:
            if lock:
                self._unlock(holder, step=step)

    def _unlock(self, holder: str, *, step: str) -> None:
        """Release the lock; when the server cannot be told (the connection is gone), say so and go on:
        the failure that ended the run is the one to report, and this machine's next run takes the lock over."""
        try:
            self.run_script(UNLOCK, self.remote.path, holder, step=step)
        except BackupAgentError as exc:
            log.warning("the lock of %s could not be released (%s): the next run of this machine takes it over", self.root, exc.message)

    @contextlib.contextmanager
    def connected(self) -> Iterator[None]:
        """The connection every call of the block shares: one ssh master (multiplexed), the key checked first."""
        check_key(self.remote)
        with multiplexed(self.remote, self.runner, self.ssh) as shared:
            self.remote = shared
            yield

    def snapshot_names(self) -> list[str]:
        return self.probe_result.snapshot_names

    def snapshot_path(self, name: str) -> str:
        """Where a snapshot is, as rsync and scp name it: ``host:/path/snapshots/<name>``."""
        return rsync_remote_path(self.remote, "snapshots", name)

    def in_progress_names(self) -> list[str]:
        return self.probe_result.in_progress_names

    def foreign_names(self) -> list[str]:
        return self.probe_result.foreign_names

    def latest_name(self) -> str | None:
        return self.probe_result.latest_name()

    def fetch_metadata(self, *, step: str = "prepare") -> None:
        """Copy metadata/*.json into a private local directory (one rsync), so reading them costs nothing more."""
        if self._cache is None:
            self._cache = tempfile.mkdtemp(prefix="backup-agent-remote-")
        if "metadata" not in self.probe_result.has:
            return
        argv = (
            self.rsync, "--recursive", "--times", "--delete", "--max-size=4m",
            "--include=*.json", "--exclude=*", "-e", rsync_shell(self.remote, self.ssh),
            rsync_remote_path(self.remote, "metadata") + "/", self._cache + "/",
        )  # fmt: skip
        result = self.runner.run(argv, step=step, mutating=False, check=False)
        if result.returncode != 0:
            raise connection_failure(self.remote, result.stderr_tail, step=step, during=False) or CommandError(
                f"the metadata of {self.root} could not be read: {' | '.join(result.stderr_tail[-2:])}",
                argv=result.argv, returncode=result.returncode, stderr_tail=result.stderr_tail, step=step,
            )  # fmt: skip

    def read_metadata(self, name: str) -> dict[str, Any] | None:
        """A snapshot's metadata from the fetched copy; None when missing or unreadable (logged)."""
        if self._cache is None:
            return None
        try:
            data = parse_json(read_bounded(self._cache, name + ".json", MAX_METADATA_BYTES), "metadata")
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("unreadable metadata %s of %s: %s", name, self.root, exc)
            return None
        return data if isinstance(data, dict) else None

    def close(self) -> None:
        """Remove the local copy of the metadata."""
        if self._cache is not None:
            shutil.rmtree(self._cache, ignore_errors=True)
            self._cache = None

    # -- writing -------------------------------------------------------------

    def reserve(self, start: dt.datetime) -> str:
        """The new snapshot's name, free in the listing taken under the lock; rsync makes ``<name>.in-progress`` itself."""
        probe = self.probe_result
        name = free_name(start, {*probe.directories, *probe.others})
        probe.directories.append(name + IN_PROGRESS)
        return name

    def write_metadata(self, name: str, data: dict[str, Any], *, step: str) -> None:
        """Write ``metadata/<name>.json`` on the server (beside, then renamed) and in the local copy."""
        text = json.dumps(data, indent=2, ensure_ascii=True)
        self.run_script(WRITE_METADATA, self.remote.path, name, text, step=step)
        self._cache_metadata(name, text)

    def _cache_metadata(self, name: str, text: str) -> None:
        if self._cache is not None:
            with open(os.path.join(self._cache, name + ".json"), "w", encoding="utf-8") as handle:
                handle.write(text + "\n")

    def complete(self, name: str, metadata: dict[str, Any], *, step: str = "snapshot") -> None:
        """On the server, in one call: the metadata written, sync, ``<name>.in-progress`` renamed ``<name>``, ``latest``, sync."""
        text = json.dumps(metadata, indent=2, ensure_ascii=True)
        self.run_script(COMPLETE, self.remote.path, name, text, step=step)
        self._cache_metadata(name, text)
        probe = self.probe_result
        probe.directories = [d for d in probe.directories if d != name + IN_PROGRESS] + [name]
        probe.latest = f"snapshots/{name}"

    def discard(self, entries: Sequence[str], *, step: str) -> None:
        """Snapshots or unfinished transfers out of the listing at once (into .trash), their metadata removed."""
        if not entries:
            return
        self.run_script(DISCARD, self.remote.path, *entries, step=step)
        probe = self.probe_result
        gone = set(entries)
        probe.directories = [d for d in probe.directories if d not in gone]
        probe.trash += len(entries)
        for entry in entries:
            if self._cache is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self._cache, entry.removesuffix(IN_PROGRESS) + ".json"))

    def kinds_at(self, rel: str, names: Sequence[str], *, step: str = "restore") -> dict[str, str]:
        """What each of the snapshots ``names`` holds at ``rel`` (file, directory, symlink, other); absent ones left out."""
        found: dict[str, str] = {}
        for line in self.run_script(HOLDS, self.remote.path, rel, *names, step=step, mutating=False):
            kind, _, name = line.partition(" ")
            if kind in KINDS and name in names:
                found[name] = KINDS[kind]
        return found

    def empty_trash(self, *, step: str) -> None:
        """Remove what .trash holds on the server (rm -rf, at idle I/O priority where ionice exists)."""
        self.run_script(EMPTY_TRASH, self.remote.path, step=step)
        self.probe_result.trash = 0


@contextlib.contextmanager
def opened_for_reading(repo: RemoteRepository) -> Iterator[RemoteRepository]:
    """The remote repository, listed and its metadata fetched, over its connection (list, restore)."""
    with repo.connected():
        try:
            with repo.opened(create=False, lock=False, ours=lambda marker: None):
                repo.fetch_metadata()
                yield repo
        finally:
            repo.close()
