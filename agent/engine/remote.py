"""Backups into a repository on another machine over SSH: the remote layout and the cycle that uses it.

The same cycle as for a local repository (agent.engine.cycle: the machine
lock, hooks, events, the transfer with its progress, the error rules), with
the repository's steps carried out on the server by
:class:`agent.repository.remote.RemoteRepository`: ``prepare`` opens it (the
marker proves it is ours) and takes its lock there, ``transfer`` runs rsync
over ssh into ``snapshots/<name>.in-progress`` with ``--link-dest=../<latest>``,
``snapshot`` writes the metadata and has the server sync, rename and move
``latest``, ``rotate`` moves what the plan deletes into ``.trash`` and
``empty-trash`` removes it after the result was reported
(docs/ARCHITECTURE.md, "Remote repositories").

A remote snapshot over ssh gets a manifest as a local one does, its new
files hashed on the server (agent.engine.remote_read); on an rsync daemon,
which runs no command for its client, its metadata says there is none.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import posixpath
import socket
import time
from typing import Any, Callable, Sequence

from agent.config.model import Settings
from agent.core.errors import BackupAgentError, ConfigError, StepError
from agent.core.events import Emitter
from agent.core.commands import Runner
from agent.disk.mount import disk_full
from agent.engine import remote_read, rsync
from agent.engine.cycle import Cycle, Request, rotation_plan
from agent.engine.layouts import Begun
from agent.engine.history import Snapshot
from agent.engine.source_set import Part
from agent.engine.sources import Source, Tree
from agent.policy.rotation import parse_snapshot_name
from agent.repository.daemon import DaemonRepository, daemon_failure, daemon_options
from agent.repository.remote import Remote, RemoteRepository, connection_failure, free_name, rsync_shell
from agent.core.files import write_atomic
from agent.repository.store import IN_PROGRESS, Marker

log = logging.getLogger(__name__)

# The source excludes the repository when it lies inside it; a remote one never does.
NOT_LOCAL = "/nonexistent/remote-repository"


class RemoteLayout:
    """Hard-linked snapshots on a server: the local layout's steps, each carried out there (agent.engine.layouts)."""

    def __init__(self, repository: RemoteRepository, warn: Callable[[str], None]) -> None:
        self.repository = repository
        self.warn = warn

    def begin(self, start: dt.datetime, *, dry_run: bool) -> Begun:
        """Reserve ``<name>.in-progress`` on the server; link to ``../<latest>`` and the unfinished transfers left.

        A dry run reserves nothing and compares with the latest snapshot itself.
        """
        repo = self.repository
        remote = repo.remote
        latest = repo.latest_name()
        leftovers = repo.in_progress_names()
        if dry_run:
            probe = repo.probe_result
            name = free_name(start, {*probe.directories, *probe.others})
            if latest is not None:
                return Begun(name, remote.at("snapshots", latest), (), latest, ())
            return Begun(name, remote.at("snapshots", name + IN_PROGRESS), (), None, ())
        name = repo.reserve(start)
        resumed = tuple(n for n in reversed(leftovers) if n != name)[: rsync.MAX_LINK_DESTS - 1]
        link_dests = ((f"../{latest}",) if latest is not None else ()) + tuple(f"../{n}{IN_PROGRESS}" for n in resumed)
        return Begun(name, remote.at("snapshots", name + IN_PROGRESS), link_dests, latest, resumed)

    def end_transfer(self, begun: Begun, *, whole: bool) -> None:
        """Whole: the unfinished transfers it resumed from are not needed any more. Not whole: all are kept to resume from."""
        if whole and begun.resumed_from:
            self.delete([n + IN_PROGRESS for n in begun.resumed_from], step="transfer")

    def finished_transfer(self) -> str:
        repo = self.repository
        for candidate in reversed(repo.in_progress_names()):
            if (repo.read_metadata(candidate) or {}).get("state") == "transferred":
                return candidate
        raise StepError(f"{repo.root} has no finished transfer to complete: run backup-agent backup --backup first", step="snapshot")

    def transfer_path(self, name: str) -> str:
        return self.repository.remote.at("snapshots", name + IN_PROGRESS)

    def complete(self, name: str) -> tuple[str, ...]:
        """On the server: sync, rename, ``latest``, sync; then the other unfinished transfers go."""
        return self.complete_with(name, self.repository.read_metadata(name) or {})

    def complete_with(self, name: str, metadata: dict[str, Any]) -> tuple[str, ...]:
        """:meth:`complete`, writing ``metadata`` in the same call to the server."""
        repo = self.repository
        repo.complete(name, metadata)
        leftovers = tuple(n + IN_PROGRESS for n in repo.in_progress_names() if n != name)
        self.delete(leftovers, step="snapshot")
        return leftovers

    def delete(self, entries: Sequence[str], *, step: str) -> None:
        self.repository.discard(entries, step=step)

    def empty_trash(self, *, step: str) -> tuple[str, ...]:
        self.repository.empty_trash(step=step)
        return ()


class RemoteCycle(Cycle):
    """The backup cycle into a repository on a server reached over ssh."""

    def __init__(
        self,
        request: Request,
        emitter: Emitter,
        runner: Runner,
        remote: Remote,
        *,
        source: Source | None = None,
        ssh: str = "/usr/bin/ssh",
        repository: RemoteRepository | None = None,
    ) -> None:
        super().__init__(request, emitter, runner, source=source)
        self.remote = remote
        self.ssh = ssh
        # Over ssh, or an rsync daemon's module (agent.repository.daemon), which has the same operations.
        self.remote_repository = repository or RemoteRepository(remote, runner, ssh=ssh, rsync=request.settings.commands.rsync)
        self.remote_layout = RemoteLayout(self.remote_repository, self._warn)

    # -- prepare -------------------------------------------------------------

    def _prepare(self, stack: contextlib.ExitStack) -> None:
        request = self.request
        repo = self.remote_repository
        with self._step("prepare", repository=request.repository) as done:
            if "backup" in request.steps:
                self.source.check(NOT_LOCAL)
            recorded = self.settings_recorded_id()
            repo.expected_id = recorded
            stack.enter_context(repo.connected())
            self.remote = repo.remote
            stack.callback(repo.close)
            # After the lock below is released and while the connection is still open (before after_backup).
            stack.callback(self._empty_remote_trash)
            if request.dry_run:
                probe = repo.probe()
                if probe.state != "repository":
                    if probe.state == "foreign" or not ("backup" in request.steps or "snapshot" in request.steps):
                        stack.enter_context(repo.opened(create=False, lock=False, ours=self._not_ours))  # raises the refusal
                    log.info("would create the repository %s", repo.root)
                    self.layout = self.remote_layout
                    done["created"] = True
                    return
            creating = "backup" in request.steps and not request.dry_run
            marker = stack.enter_context(repo.opened(create=creating, lock=not request.dry_run, ours=self._not_ours))
            repo.fetch_metadata()
            self.layout = self.remote_layout
            done["id"] = marker.id
            if recorded is None and not request.dry_run:
                self._record_id(marker.id)

    def _not_ours(self, marker: Marker) -> str | None:
        """Why the repository is not ours: another id than this machine recorded, or another host's marker; None if ours."""
        recorded = self.remote_repository.expected_id
        root = self.remote_repository.root
        if recorded is not None and recorded != marker.id:
            return (
                f"{root} holds the repository {marker.id} (host {marker.host}), not {recorded} that this machine "
                "recorded for it: it is not ours, nothing was written; if it was replaced on purpose, remove "
                f"{self.recorded_id_path()}"
            )
        if recorded is None and marker.host != self.hostname():
            return (
                f"{root} holds the repository of {marker.host} (id {marker.id}), not this machine's: it is not ours, "
                "nothing was written; give another path for this machine"
            )
        return None

    def _record_id(self, repository_id: str) -> None:
        """Remember a [[remote]]'s repository id, so a repository put in its place later is refused (a warning if it cannot)."""
        path = self.recorded_id_path()
        if path is None:
            return
        try:
            write_atomic(path, (repository_id + "\n").encode())
        except OSError as exc:
            self._warn(f"the id of {self.remote_repository.root} could not be recorded in {path} ({exc.strerror})")

    def settings_recorded_id(self) -> str | None:
        """The repository id this machine recorded for the configured remote (None: not recorded yet)."""
        path = self.recorded_id_path()
        if path is None:
            return None
        try:
            with open(path, encoding="utf-8") as handle:
                return handle.read(200).strip() or None
        except FileNotFoundError:
            return None

    def recorded_id_path(self) -> str | None:
        name = self.remote.name
        return None if name is None else os.path.join(self.settings.state_dir, f"remote-{name}.id")

    @staticmethod
    def hostname() -> str:
        return socket.gethostname()

    # -- transfer ------------------------------------------------------------

    def _excluded_repository(self) -> str:
        return NOT_LOCAL

    def _transfer_argv(self, begun: Begun, tree: Tree, part: Part, link_dests: Sequence[str]) -> tuple[str, ...]:
        """One source over ssh or to the daemon; the link targets are the server's (``begun``), not the local ones."""
        if part.directory:
            raise ConfigError(
                self.settings.path or "the configuration",
                "source",
                f"several [[source]] go to a local repository only; {self.remote.shown} takes one source: "
                "back the others up in a backup of their own"
            )
        settings = self.settings
        local = rsync.build_argv(
            rsync=settings.commands.rsync,
            source=tree.root,
            target=begun.target,
            link_dests=(),
            one_file_system=tree.one_file_system,
            excludes=tree.excludes,
            filter_rules=tree.filter_rules,
            io_timeout=settings.io_timeout,
            dry_run=self.request.dry_run,
            priority_prefix=(*tree.command_prefix, *self._priority()),
        )
        # build_argv's --itemize-changes gives one line per file rsync wrote (rsync.Written): none at all lets the
        # manifest be the previous one (_remote_manifest). Given twice it would itemize every file.
        repo = self.remote_repository
        if isinstance(repo, DaemonRepository):
            url = repo.daemon.url(begun.target) + "/"
            return rsync.to_daemon(local, url=url, options=daemon_options(repo.daemon), link_dests=begun.link_dests)
        return rsync.over_ssh(local, shell=rsync_shell(self.remote, self.ssh), host=self.remote.host, link_dests=begun.link_dests)

    def _lists_written(self) -> bool:
        return True

    def _transfer_failure(self, returncode: int, stderr: tuple[str, ...]) -> BackupAgentError | None:
        if returncode == 0 or disk_full(stderr):
            return None
        if returncode in (5, 10, 12, 30, 35, 255) or returncode < 0:
            repo = self.remote_repository
            if isinstance(repo, DaemonRepository):
                return daemon_failure(repo.daemon, stderr, step="transfer", during=True)
            return connection_failure(self.remote, stderr, step="transfer", during=True)
        return None

    def _write_transfer_metadata(self, name: str, metadata: dict[str, Any]) -> None:
        self.remote_repository.write_metadata(name, metadata, step="transfer")

    def _system_state(self, begun: Begun) -> dict[str, Any]:
        """Command sources and package lists are written into a local snapshot only: said, not silently dropped."""
        if self.settings.command_sources or self.settings.packages.enabled:
            self._warn(
                f"command sources and package lists are stored in local repositories only: {self.remote.shown} "
                "gets the files without them"
            )
        return {}

    def _disk_full_message(self) -> str:
        kept = self.remote_repository.in_progress_names()
        held = f"; the unfinished transfer {kept[-1]} is kept so the next run resumes from it" if kept else ""
        return (
            f"the disk of {self.remote_repository.root} is full: no snapshot was completed{held}; delete old snapshots with "
            f"backup-agent rotate {self.remote_repository.root} (after lowering the counts in [rotation]), or free space on the server"
        )

    # -- snapshot ------------------------------------------------------------

    def _snapshot(self, name: str | None) -> str | None:
        repo = self.remote_repository
        with self._step("snapshot", snapshot=name) as done:
            if self.request.dry_run or repo.marker is None:
                log.info("would complete snapshot %s", name)
                done["snapshot"] = name
                return name
            layout = self.remote_layout
            if name is None:
                name = layout.finished_transfer()
            metadata = repo.read_metadata(name) or {}
            if metadata.get("state") != "transferred":
                raise StepError(f"the transfer into {name} did not finish: run the backup again", step="snapshot")
            previous = repo.latest_name()
            self.outcome.flagged = self._remote_shrink_check(previous, metadata)
            end = dt.datetime.now().astimezone()
            start = dt.datetime.fromisoformat(metadata["start"])
            metadata.update(
                state="complete",
                end=end.isoformat(timespec="milliseconds"),
                duration=round((end - start).total_seconds(), 3),
                flagged=self.outcome.flagged,
                previous=previous,
                manifest=self._remote_manifest(name, previous, metadata),
                warnings=sorted(set(metadata.get("warnings", [])) | set(self.outcome.warnings)),
            )
            self.outcome.partial = bool(metadata.get("partial"))
            self.outcome.statistics = metadata.get("statistics", {})
            discarded = layout.complete_with(name, metadata)
            done.update(snapshot=name, partial=self.outcome.partial, flagged=self.outcome.flagged, discarded=list(discarded))
        self.outcome.snapshot = name
        return name

    def _remote_manifest(self, name: str, previous: str | None, metadata: dict[str, Any]) -> dict[str, Any]:
        """The snapshot's manifest, hashed on the server and uploaded before the rename (agent.engine.remote_read).

        When rsync wrote no file and the snapshot holds as many as the previous manifest lists, it is the
        previous snapshot's files themselves (hard links): the server copies that manifest (one call).
        A failure is a warning, as locally: the snapshot completes without one and verify says so.
        """
        repo = self.remote_repository
        if isinstance(repo, DaemonRepository):
            return {"error": "not recorded: an rsync daemon runs no command for its client"}
        try:
            warned = [*metadata.get("warnings", []), *self.outcome.warnings]
            before = repo.read_metadata(previous) if previous is not None else None
            copied = remote_read.unchanged_manifest(previous, self._written.get(name), metadata, before, warned)
            started = time.monotonic()
            if previous is not None and copied is not None and remote_read.copy_manifest(repo, previous, name):
                return {**copied, "duration": round(time.monotonic() - started, 3)}
            recorded = remote_read.record_manifest(repo, name, previous)
        except BackupAgentError as exc:
            self._warn(f"snapshot {name} is completed without a manifest ({exc.message}): verify cannot check it")
            return {"error": exc.message}
        log.info(
            "manifest of %s: %d files, %d hashed on the server, %d reused from %s, in %.2f s",
            name, recorded["entries"], recorded["hashed_files"], recorded["reused_files"], previous, recorded["duration"],
        )  # fmt: skip
        return recorded

    def _remote_shrink_check(self, previous: str | None, metadata: dict[str, Any]) -> str | None:
        if previous is None:
            return None
        before = ((self.remote_repository.read_metadata(previous) or {}).get("statistics") or {}).get("files")
        after = (metadata.get("statistics") or {}).get("files")
        if not isinstance(before, int) or not isinstance(after, int) or before <= 0:
            return None
        if after < before * 0.5:
            message = (
                f"file count dropped from {before} to {after} since {previous}: the snapshot is kept but flagged, "
                "and old snapshots are not rotated; check the source, then run backup-agent rotate"
            )
            self._warn(message)
            return message
        return None

    # -- rotate --------------------------------------------------------------

    def _rotate(self, made: str | None) -> None:
        request = self.request
        repo = self.remote_repository
        with self._step("rotate") as done:
            if self.outcome.flagged:
                self._warn("rotation skipped: the new snapshot is flagged")
                done["skipped"] = "flagged"
                return
            names = repo.snapshot_names() if repo.marker is not None else []
            if request.dry_run and made is not None and made not in names:
                names.append(made)
            protected: dict[str, str] = {}
            for name in names:
                metadata = repo.read_metadata(name) or {}
                if metadata.get("partial"):
                    protected[name] = "partial"
                elif metadata.get("flagged"):
                    protected[name] = "flagged"
            foreign = repo.foreign_names()
            names += foreign
            for odd in foreign:
                protected[odd] = "not a snapshot"
                if parse_snapshot_name(odd) is not None:
                    self._warn(f"snapshots/{odd} is not a directory: it is no snapshot, and nothing uses or deletes it")
            transfers = [n + IN_PROGRESS for n in repo.in_progress_names()]
            names += transfers
            if not request.discard_unfinished:
                protected.update((n, "unfinished transfer") for n in transfers)
            if not names:
                done["keep"], done["delete"] = {}, []
                return
            plan = rotation_plan(names, self.settings.rotation, protected, made=made, discard_unfinished=request.discard_unfinished)
            self.outcome.plan = plan
            done["keep"] = {k: list(v) for k, v in plan.keep.items()}
            done["delete"] = list(plan.delete)
            if request.dry_run:
                for victim in plan.delete:
                    log.info("would delete snapshot %s", victim)
                return
            self.remote_layout.delete(plan.delete, step="rotate")
            self.outcome.deleted += plan.delete

    def _empty_trash(self) -> None:
        """Nothing here: the remote trash is emptied while the shared connection is still open (_empty_remote_trash)."""

    def _empty_remote_trash(self) -> None:
        """After the result: remove .trash on the server under the repository's lock, taken again; a failure is a warning."""
        repo = self.remote_repository
        if not self._completed or self.request.dry_run or repo.marker is None or not repo.probe_result.trash:
            return
        started = time.monotonic()
        try:
            with (
                self._step("empty-trash", entries=repo.probe_result.trash) as done,
                repo.opened(create=False, lock=True, ours=self._not_ours, step="empty-trash"),
            ):
                repo.empty_trash(step="empty-trash")
                done["seconds"] = round(time.monotonic() - started, 3)
        except BackupAgentError as exc:
            self._warn(
                f"old snapshots moved to .trash on {self.remote.host} were not all removed ({exc.message}): they are no longer "
                "listed, and the next backup or rotate removes them"
            )


def remote_request(settings: Settings, remote: Remote, **fields: Any) -> Request:
    """The cycle's request for a remote repository (its ``repository`` is how messages name it)."""
    return Request(settings=settings, source=fields.pop("source", settings.source), repository=remote.shown, **fields)



def remote_snapshots(repo: RemoteRepository) -> list[Snapshot]:
    """The complete snapshots of a remote repository, oldest first, their paths on the server (as history.snapshots)."""
    found = []
    for name in repo.snapshot_names():
        metadata = repo.read_metadata(name) or {}
        source = metadata.get("source")
        found.append(
            Snapshot(
                name=name,
                path=repo.remote.at("snapshots", name),
                source=posixpath.normpath(source) if isinstance(source, str) and source.startswith("/") else "/",
                partial=bool(metadata.get("partial")),
            )
        )
    return found


def kind_finder(repo: RemoteRepository) -> Callable[[Snapshot, str], str | None]:
    """restore.choose's question "what does this snapshot hold at rel?", asked of the server (one ssh call per path)."""
    asked: dict[str, dict[str, str]] = {}

    def kind_in(snap: Snapshot, rel: str) -> str | None:
        if rel not in asked:
            asked[rel] = repo.kinds_at(rel, repo.snapshot_names())
        return asked[rel].get(snap.name)

    return kind_in
