"""A repository that is an rsync daemon's module: what the client reads and asks, what the server completes.

An rsync daemon runs no command for its clients, so the server's part is the
module's ``post-xfer exec`` script, shipped as ``rsyncd/backup-agent-complete``
(POSIX sh) with its module stanza (README, "Backing up to an rsync daemon").
The client uploads requests into ``metadata/`` and the script, which runs
after every transfer into the module, carries them out:

- ``metadata/.complete-<name>.json`` (the snapshot's complete metadata):
  sync, ``snapshots/<name>.in-progress`` renamed ``<name>``, the metadata
  put in place, ``latest`` moved, sync;
- ``metadata/.delete-<entry>``: the entry moved into ``.trash`` and its
  metadata removed; ``.trash`` is then emptied.

A snapshot is complete only when the server says so: the client lists the
module until ``snapshots/<name>`` is there. The module is the repository
itself (its ``path`` in rsyncd.conf); there is no repository lock on a
daemon (the machine lock keeps one run per client, and a repository belongs
to one client). Listing is ``rsync --list-only``; metadata and the marker
are read by copying them with rsync.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
import os
import posixpath
import re
import shutil
import socket
import stat
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from agent.config.model import Settings
from agent.core.commands import Runner
from agent.core.errors import (
    BackupAgentError,
    CommandError,
    ConnectionLostError,
    RefusedError,
    RepositoryError,
    UnreachableError,
    UsageError,
)
from agent.repository.remote import (
    Probe,
    Remote,
    RemoteRepository,
    check_key,
    connection_failure,
    free_name,
    matching_line,
    ssh_argv,
)
from agent.repository.store import FORMAT_VERSION, IN_PROGRESS, MARKER, MAX_MARKER_BYTES, Marker, parse_marker, read_bounded

log = logging.getLogger(__name__)

DEFAULT_PORT = 873
# Seconds the server has to complete a snapshot after the request reached it.
COMPLETE_WAIT = 30.0

_USER = r"[A-Za-z0-9._][A-Za-z0-9._-]*"
_HOST = r"[A-Za-z0-9_][A-Za-z0-9._-]*|\[[0-9A-Fa-f:.]+\]"
_MODULE = r"[A-Za-z0-9_][A-Za-z0-9._-]*"
_URL = re.compile(rf"^rsync://(?:(?P<user>{_USER})@)?(?P<host>{_HOST})(?::(?P<port>\d{{1,5}}))?/(?P<module>{_MODULE})(?P<rest>/.*)?$")
_DOUBLE = re.compile(rf"^(?:(?P<user>{_USER})@)?(?P<host>{_HOST})::(?P<module>{_MODULE})(?P<rest>/.*)?$")


@dataclass(frozen=True)
class Daemon:
    """An rsync daemon's module holding a repository, and how to reach it.

    ``password_file``: root's, readable by root only (rsync's
    ``--password-file``).
    """

    host: str
    module: str
    user: str | None = None
    port: int | None = None
    password_file: str | None = None
    connect_timeout: int = 10

    def url(self, *parts: str) -> str:
        """``rsync://[user@]host[:port]/module/parts...`` (pure)."""
        login = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port not in (None, DEFAULT_PORT) else ""
        tail = "/".join(p.strip("/") for p in parts if p.strip("/"))
        return f"rsync://{login}{self.host}{port}/{self.module}/{tail}"

    @property
    def shown(self) -> str:
        return self.url().rstrip("/")


def parse_daemon_destination(text: str) -> Daemon | None:
    """``rsync://[user@]host[:port]/module`` or ``[user@]host::module``; None when it is neither (pure).

    The repository is the module itself: a path below it is refused, since
    the completion script works on the module's path.
    """
    match = _URL.match(text) or _DOUBLE.match(text)
    if match is None:
        if text.startswith("rsync://") or "::" in text.split("/", 1)[0]:
            raise UsageError(f"{text!r} is not rsync://[user@]host[:port]/module nor [user@]host::module: check the names")
        return None
    rest = (match["rest"] or "").strip("/")
    if rest:
        raise UsageError(
            f"{text!r}: the repository is the module itself (its path in rsyncd.conf), not a directory in it: "
            f"give {text[: len(text) - len(match['rest'] or '')]} and a module of its own for this machine"
        )
    groups = match.groupdict()
    port = int(groups["port"]) if groups.get("port") else None
    if port is not None and not 1 <= port <= 65535:
        raise UsageError(f"{text!r}: the port must be from 1 to 65535")
    return Daemon(host=match["host"], module=match["module"], user=match["user"], port=port)


def daemon_options(daemon: Daemon) -> tuple[str, ...]:
    """The options every rsync call to the daemon takes (pure)."""
    options = [f"--contimeout={daemon.connect_timeout}"]
    if daemon.password_file is not None:
        options.append(f"--password-file={daemon.password_file}")
    return tuple(options)


_LIST = re.compile(r"^(?P<type>[-dlcbps])[-rwxsStT]{9}[+.]?\s+[\d,.]+\s+\S+\s+\S+\s(?P<name>.+)$")
_ESCAPE = re.compile(r"\\#([0-7]{3})")


# parse_list's types as restore names them (agent.repository.remote.KINDS' values).
LISTED_KINDS = {"-": "file", "d": "directory", "l": "symlink"}


def parse_list(lines: Sequence[str]) -> list[tuple[str, str]]:
    """``rsync --list-only`` lines as (type, name): ``d`` for a directory, ``l`` a link, ``-`` a file (pure).

    rsync writes a name's unprintable bytes as ``\\#ooo``; such names are not
    ours and are left out.
    """
    found = []
    for line in lines:
        match = _LIST.match(line)
        if match is None:
            continue
        name = match["name"]
        if match["type"] == "l":
            name = name.split(" -> ", 1)[0]
        if _ESCAPE.search(name) or name in (".", "..") or "/" in name:
            continue
        found.append((match["type"], name))
    return found


_AUTH = re.compile(r"@ERROR: auth failed|password file must not be other-accessible|@ERROR: access denied")
_MODULE_REFUSED = re.compile(r"@ERROR: Unknown module|@ERROR: chroot|@ERROR: chdir failed|@ERROR: module .* is read only")
_UNREACHABLE = re.compile(
    r"failed to connect to|Connection refused|Connection timed out|No route to host|Name or service not known|getaddrinfo|"
    r"timed out waiting for"
)
_LOST = re.compile(
    r"connection unexpectedly closed|Connection reset by peer|Broken pipe|error in rsync protocol data stream|read error"
)


def daemon_failure(daemon: Daemon, stderr: Sequence[str], *, step: str | None, during: bool) -> BackupAgentError | None:
    """What rsync's error output says went wrong with the daemon, as the error to raise; None if nothing (pure)."""
    text = "\n".join(stderr)
    if _AUTH.search(text):
        how = f"the password in {daemon.password_file}" if daemon.password_file else "no password (set password_file)"
        return RefusedError(
            f"the rsync daemon on {daemon.host} refused {daemon.user or 'the user'} with {how} for the module {daemon.module}: "
            "nothing was sent; check auth users and the secrets file on the server",
            step=step,
        )
    if _MODULE_REFUSED.search(text):
        return RefusedError(
            f"the rsync daemon on {daemon.host} refused the module {daemon.module} ({matching_line(text, _MODULE_REFUSED)}): "
            "nothing was sent; install the module stanza the README gives",
            step=step,
        )
    if _UNREACHABLE.search(text) and not during:
        return UnreachableError(
            f"the rsync daemon on {daemon.host} cannot be reached ({matching_line(text, _UNREACHABLE)}): nothing was sent; the next run "
            "tries again",
            step=step,
        )
    if _LOST.search(text) or (during and _UNREACHABLE.search(text)):
        kept = "; the unfinished transfer is kept on the server and the next run resumes from it" if during else ""
        return ConnectionLostError(f"the connection to the rsync daemon on {daemon.host} broke off{kept}", step=step)
    return None


def password_problem(path: str, info: os.stat_result, *, as_root: bool) -> str | None:
    """Why a password file must not be used (pure)."""
    if not stat.S_ISREG(info.st_mode):
        return f"the password file {path} is not a regular file"
    if stat.S_IMODE(info.st_mode) & 0o077:
        return f"the password file {path} can be read by others: chmod 600 {path}"
    if as_root and info.st_uid != 0:
        return f"the password file {path} belongs to uid {info.st_uid}, not root: chown root: {path}"
    return None


class DaemonRepository(RemoteRepository):
    """A repository that is an rsync daemon's module: the remote repository's operations through rsync alone."""

    def __init__(
        self, daemon: Daemon, runner: Runner, *, ssh: str = "/usr/bin/ssh", rsync: str = "/usr/bin/rsync", tunnel: Remote | None = None
    ) -> None:
        super().__init__(Remote(host=daemon.host, path="/", port=daemon.port, user=daemon.user), runner, ssh=ssh, rsync=rsync)
        self.daemon = daemon
        # -t: the ssh server the daemon is reached through (its port forward lives as long as connected()).
        self.tunnel = tunnel

    @property
    def root(self) -> str:
        return self.daemon.shown

    def snapshot_path(self, name: str) -> str:
        return self.daemon.url("snapshots", name)

    @contextlib.contextmanager
    def connected(self) -> Iterator[None]:
        """The password file checked; with a tunnel, the ssh port forward for the block, torn down whatever happens."""
        with contextlib.ExitStack() as stack:
            self._check_password()
            if self.tunnel is not None:
                port = stack.enter_context(tunnelled(self.tunnel, self.daemon, self.runner, self.ssh))
                self.daemon = with_tunnel_port(self.daemon, port)
            yield

    def _check_password(self) -> None:
        if self.daemon.password_file is not None:
            try:
                info = os.lstat(self.daemon.password_file)
            except OSError as exc:
                raise UsageError(f"the password file {self.daemon.password_file} cannot be read: {exc.strerror}", step="prepare") from None
            problem = password_problem(self.daemon.password_file, info, as_root=os.geteuid() == 0)
            if problem is not None:
                raise UsageError(problem + "; nothing was sent", step="prepare")

    # -- running -------------------------------------------------------------

    def _rsync(self, argv: Sequence[str], *, step: str, mutating: bool, lines: list[str] | None = None) -> None:
        full = (self.rsync, *daemon_options(self.daemon), *argv)
        result = self.runner.run(full, step=step, mutating=mutating, check=False, on_stdout=None if lines is None else lines.append)
        if result.returncode != 0:
            raise daemon_failure(self.daemon, result.stderr_tail, step=step, during=False) or CommandError(
                f"rsync to {self.root} failed ({result.meaning}): {' | '.join(result.stderr_tail[-2:])}",
                argv=result.argv, returncode=result.returncode, stderr_tail=result.stderr_tail, step=step,
            )  # fmt: skip

    def _list(self, *parts: str, step: str) -> list[tuple[str, str]] | None:
        """The entries of a directory of the module; None when it does not exist."""
        lines: list[str] = []
        full = (self.rsync, *daemon_options(self.daemon), "--list-only", self.daemon.url(*parts).rstrip("/") + "/")
        result = self.runner.run(full, step=step, mutating=False, check=False, on_stdout=lines.append)
        if result.returncode == 23 and any("No such file or directory" in line for line in result.stderr_tail):
            return None
        if result.returncode != 0:
            raise daemon_failure(self.daemon, result.stderr_tail, step=step, during=False) or CommandError(
                f"the listing of {self.root} failed ({result.meaning})", argv=result.argv, step=step
            )
        return [(kind, name) for kind, name in parse_list(lines) if name != "."]

    def _upload(self, files: dict[str, bytes], where: str, *, step: str) -> None:
        """Write ``files`` (name: content) into the module's ``where`` directory, each atomically (rsync's own rename)."""
        staging = tempfile.mkdtemp(prefix="backup-agent-daemon-")
        try:
            for name, content in files.items():
                with open(os.path.join(staging, name), "wb") as handle:
                    handle.write(content)
            self._rsync(("--recursive", staging + "/", self.daemon.url(where) + "/"), step=step, mutating=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    # -- reading -------------------------------------------------------------

    def probe(self, *, step: str = "prepare", holder: str = "", take: bool = False, ours: str = "") -> Probe:
        top = self._list(step=step)
        probe = Probe()
        if top is None:
            raise RepositoryError(f"the module {self.daemon.module} on {self.daemon.host} has no directory", step=step)
        names = {name: kind for kind, name in top}
        if MARKER not in names:
            mine = {n for n in names if n not in ("lost+found",)}
            probe.state = "foreign" if mine else "empty"
            self.probe_result = probe
            return probe
        probe.state = "repository"
        for sub in ("snapshots", "metadata", ".trash"):
            if sub in names:
                (probe.has.add(sub) if names[sub] == "d" else probe.bad.append(sub))
        if names.get("latest") == "l":
            probe.latest = self._latest_target(top)
        staging = tempfile.mkdtemp(prefix="backup-agent-daemon-")
        try:
            self._rsync(("--max-size=64k", self.daemon.url(MARKER), staging + "/"), step=step, mutating=False)
            text = read_bounded(staging, MARKER, MAX_MARKER_BYTES).decode("utf-8", "replace")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        probe.marker_text = text
        self.marker = parse_marker(text, f"{self.root}/{MARKER}")
        if "snapshots" in probe.has:
            for kind, name in self._list("snapshots/", step=step) or []:
                (probe.directories if kind == "d" else probe.others).append(name)
        if ".trash" in probe.has:
            probe.trash = len(self._list(".trash/", step=step) or [])
        if probe.bad:
            raise RepositoryError(f"{self.root}: {', '.join(probe.bad)} is not a directory: nothing was written", step=step)
        self.probe_result = probe
        return probe

    def _latest_target(self, top: list[tuple[str, str]]) -> str | None:
        lines: list[str] = []
        full = (self.rsync, *daemon_options(self.daemon), "--list-only", "--no-recursive", self.daemon.url("latest"))
        result = self.runner.run(full, step="prepare", mutating=False, check=False, on_stdout=lines.append)
        for line in lines:
            if " -> " in line:
                return line.split(" -> ", 1)[1].strip()
        return None if result.returncode else None

    @contextlib.contextmanager
    def opened(self, *, create: bool, lock: bool, ours: Callable[[Marker], str | None], step: str = "prepare") -> Iterator[Marker]:
        """The module's marker (created in an empty module with ``create``); refused when not ours. No lock on a daemon."""
        probe = self.probe(step=step)
        if probe.state == "foreign":
            raise RepositoryError(
                f"the module {self.daemon.module} on {self.daemon.host} holds files and no {MARKER}: it is not ours, nothing was "
                "written; give the module an empty directory of its own",
                step=step,
            )
        if probe.state == "empty":
            if not create:
                raise RepositoryError(f"{self.root} holds no repository yet: back up to it first", step=step)
            marker = Marker(
                FORMAT_VERSION, uuid.uuid4().hex, socket.gethostname(), dt.datetime.now().astimezone().isoformat(timespec="seconds")
            )
            staging = tempfile.mkdtemp(prefix="backup-agent-daemon-")
            try:
                for sub in ("snapshots", "metadata", ".trash"):
                    os.mkdir(os.path.join(staging, sub))
                with open(os.path.join(staging, MARKER), "w", encoding="utf-8") as handle:
                    handle.write(marker.render())
                self._rsync(("--recursive", staging + "/", self.daemon.url() ), step=step, mutating=True)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            log.info("created the repository %s (id %s)", self.root, marker.id)
            self.probe(step=step)
        found = self.marker
        if found is None:
            raise RepositoryError(f"{self.root}: the repository marker could not be read", step=step)
        refusal = ours(found)
        if refusal is not None:
            raise RepositoryError(refusal, step=step)
        yield found

    def fetch_metadata(self, *, step: str = "prepare") -> None:
        if self._cache is None:
            self._cache = tempfile.mkdtemp(prefix="backup-agent-remote-")
        if "metadata" not in self.probe_result.has:
            return
        self._rsync(
            ("--recursive", "--times", "--delete", "--max-size=4m", "--include=*.json", "--exclude=*",
             self.daemon.url("metadata") + "/", self._cache + "/"),
            step=step, mutating=False,
        )  # fmt: skip

    def kinds_at(self, rel: str, names: Sequence[str], *, step: str = "restore") -> dict[str, str]:
        """What each snapshot of ``names`` holds at ``rel``: the entry itself as ``--list-only --dirs`` lists it (one call each)."""
        found: dict[str, str] = {}
        wanted = posixpath.basename(rel.rstrip("/"))
        for name in names:
            lines: list[str] = []
            url = self.daemon.url("snapshots", name, rel).rstrip("/")
            full = (self.rsync, *daemon_options(self.daemon), "--list-only", "--dirs", url)
            result = self.runner.run(full, step=step, mutating=False, check=False, on_stdout=lines.append)
            if result.returncode == 23 and any("No such file or directory" in line for line in result.stderr_tail):
                continue
            if result.returncode != 0:
                raise daemon_failure(self.daemon, result.stderr_tail, step=step, during=False) or CommandError(
                    f"the listing of {self.root} failed ({result.meaning})", argv=result.argv, step=step
                )
            for kind, entry in parse_list(lines):
                if entry == (wanted or name):
                    found[name] = LISTED_KINDS.get(kind, "other")
        return found

    # -- writing -------------------------------------------------------------

    def write_metadata(self, name: str, data: dict[str, object], *, step: str) -> None:
        text = json.dumps(data, indent=2, ensure_ascii=True)
        self._upload({name + ".json": (text + "\n").encode()}, "metadata", step=step)
        self._cache_metadata(name, text)

    def complete(self, name: str, metadata: dict[str, object], *, step: str = "snapshot") -> None:
        """Ask the server to complete ``name`` (the request is its metadata), then wait until the listing shows it."""
        text = json.dumps(metadata, indent=2, ensure_ascii=True)
        self._upload({f".complete-{name}.json": (text + "\n").encode()}, "metadata", step=step)
        deadline = time.monotonic() + COMPLETE_WAIT
        while True:
            entries = self._list("snapshots/", step=step) or []
            if ("d", name) in entries:
                break
            if time.monotonic() > deadline:
                raise RepositoryError(
                    f"the rsync daemon on {self.daemon.host} did not complete {name} within {COMPLETE_WAIT:.0f} s: is the "
                    "post-xfer exec script of the README installed for the module? The transfer is kept; run the backup "
                    "again once it is",
                    step=step,
                )
            time.sleep(0.2)
        self._cache_metadata(name, text)
        probe = self.probe_result
        probe.directories = [d for d in probe.directories if d != name + IN_PROGRESS] + [name]
        probe.latest = f"snapshots/{name}"

    def discard(self, entries: Sequence[str], *, step: str) -> None:
        """Ask the server to take the entries out of the listing; the script does it after this upload."""
        if not entries:
            return
        self._upload({f".delete-{entry}": b"" for entry in entries}, "metadata", step=step)
        gone = set(entries)
        deadline = time.monotonic() + COMPLETE_WAIT
        while gone & {name for _kind, name in self._list("snapshots/", step=step) or []}:
            if time.monotonic() > deadline:
                raise RepositoryError(
                    f"the rsync daemon on {self.daemon.host} did not delete {', '.join(sorted(gone))} within {COMPLETE_WAIT:.0f} s: "
                    "is the post-xfer exec script of the README installed for the module?",
                    step=step,
                )
            time.sleep(0.2)
        probe = self.probe_result
        probe.directories = [d for d in probe.directories if d not in gone]
        for entry in entries:
            if self._cache is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self._cache, entry.removesuffix(IN_PROGRESS) + ".json"))

    def empty_trash(self, *, step: str) -> None:
        """Nothing to ask: the server's script empties .trash after each transfer into the module."""
        self.probe_result.trash = 0

    def reserve(self, start: dt.datetime) -> str:
        probe = self.probe_result
        name = free_name(start, {*probe.directories, *probe.others})
        probe.directories.append(name + IN_PROGRESS)
        return name


def with_tunnel_port(daemon: Daemon, port: int) -> Daemon:
    """The daemon as reached through a local port forward (pure)."""
    return dataclasses.replace(daemon, host="127.0.0.1", port=port)


def parse_tunnel(text: str) -> Remote:
    """``-t [user@]host[:port]``: the ssh server a daemon is reached through (pure)."""
    match = re.match(rf"^(?:(?P<user>{_USER})@)?(?P<host>{_HOST})(?::(?P<port>\d{{1,5}}))?$", text)
    if match is None or not 1 <= int(match["port"] or 22) <= 65535:
        raise UsageError(f"--tunnel {text!r}: give [user@]host[:port] of an ssh server")
    return Remote(host=match["host"], path="/", user=match["user"], port=int(match["port"]) if match["port"] else None)


def tunnel_argv(tunnel: Remote, daemon: Daemon, local_port: int, control: str, ssh: str = "/usr/bin/ssh") -> tuple[str, ...]:
    """ssh holding the port forward to the daemon in the background, until ``-O exit`` on ``control`` (pure).

    ``ExitOnForwardFailure``: ssh goes to the background only once the
    forward is listening; the daemon's host is resolved on the ssh server.
    """
    host = tunnel.host[1:-1] if tunnel.host.startswith("[") else tunnel.host
    target = daemon.host[1:-1] if daemon.host.startswith("[") else daemon.host
    return (
        *ssh_argv(tunnel, ssh), "-o", "ExitOnForwardFailure=yes", "-M", "-S", control, "-f", "-N",
        "-L", f"127.0.0.1:{local_port}:{target}:{daemon.port or DEFAULT_PORT}", host,
    )  # fmt: skip


@contextlib.contextmanager
def tunnelled(tunnel: Remote, daemon: Daemon, runner: Runner, ssh: str = "/usr/bin/ssh") -> Iterator[int]:
    """An ssh port forward to the daemon for the block; the local port. Torn down whatever happens in the block."""
    directory = tempfile.mkdtemp(prefix="backup-agent-tunnel-")
    control = os.path.join(directory, "master")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    try:
        check_key(tunnel)
        result = runner.run(tunnel_argv(tunnel, daemon, port, control, ssh), step="tunnel", check=False, mutating=False)
        if result.returncode != 0:
            raise connection_failure(tunnel, result.stderr_tail, step="tunnel", during=False) or CommandError(
                f"the ssh tunnel to {tunnel.host} could not be opened: {' | '.join(result.stderr_tail[-2:])}",
                argv=result.argv, returncode=result.returncode, stderr_tail=result.stderr_tail, step="tunnel",
            )  # fmt: skip
        try:
            yield port
        finally:
            host = tunnel.host[1:-1] if tunnel.host.startswith("[") else tunnel.host
            runner.run((*ssh_argv(tunnel, ssh), "-S", control, "-O", "exit", host), step="tunnel", check=False, mutating=False)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def daemon_as_configured(settings: Settings, daemon: Daemon) -> Daemon:
    """A daemon module a ``[[remote]]`` describes (host and module) takes its password file, user, port and timeout."""
    for configured in settings.remotes:
        if configured.module == daemon.module and configured.host == daemon.host:
            return dataclasses.replace(
                daemon,
                user=daemon.user or configured.user,
                port=daemon.port or configured.port,
                password_file=configured.password_file,
                connect_timeout=configured.connect_timeout,
            )
    return daemon


def daemon_name(settings: Settings, daemon: Daemon) -> str | None:
    """The ``[[remote]]`` name of a daemon module, under which its repository id is recorded."""
    for configured in settings.remotes:
        if configured.module == daemon.module and configured.host == daemon.host:
            return configured.name
    return None


def configured_daemon(settings: Settings, name: str) -> Daemon | None:
    """The daemon module of the ``[[remote]]`` called ``name``; None when that one is over ssh (or not configured)."""
    for configured in settings.remotes:
        if configured.name == name and configured.module is not None:
            return Daemon(
                host=configured.host, module=configured.module, user=configured.user, port=configured.port,
                password_file=configured.password_file, connect_timeout=configured.connect_timeout,
            )  # fmt: skip
    return None
