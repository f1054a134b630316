"""One backup cycle: lock → prepare → transfer → snapshot → rotate.

The cycle keeps the rules of docs/ARCHITECTURE.md: it writes only into a fresh
``<name>.in-progress`` (never into a completed snapshot), completes a snapshot
by an atomic rename, deletes old snapshots only after a new one completed,
runs one at a time, and with ``dry_run`` writes nothing at all. Every step is
announced as an event; each resource is released by the ``ExitStack`` that
took it, also when a step fails, so later steps (unlock, mount, hooks) slot in
as more context managers.

The cycle composes three seams (docs/ARCHITECTURE.md, "Seams for what
comes next"): it reads from a :class:`~agent.engine.sources.Source` (given, or the
configured path), makes and deletes snapshots through the repository's
:class:`~agent.engine.layouts.Layout` (:func:`agent.engine.layouts.for_repository`), and
reports through the :class:`~agent.core.events.Emitter` its caller composed from
report channels (:mod:`agent.engine.channels`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import logging
import os
import platform
import socket
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Sequence

from agent import __version__
from agent.core import lock
from agent.engine import rsync
from agent.disk import browse
from agent.disk.devices import top_mount
from agent.disk.find import find_device, not_attached
from agent.disk.identity import verify_identity
from agent.disk.mount import disk_full, mounted
from agent.disk.unlock import unlocked
from agent.engine import hooks
from agent.engine import layouts
from agent.engine import sysstate
from agent.engine import offsite
from agent.engine import send as sending
from agent.engine.btrfs import BtrfsLayout, detect_layout, split_hard_links
from agent.repository import manifest as manifests
from agent.repository import manifest_stream
from agent.repository import unfinished
from agent.core.commands import Result, Runner, priority_prefix
from agent.config.model import Disk, Settings, effective_excludes
from agent.core.errors import (
    BackupAgentError,
    CommandError,
    CorruptManifestError,
    DiskFullError,
    DiskMissingError,
    Interrupted,
    RepositoryError,
    StepError,
    UsageError,
)
from agent.core.events import Emitter, complete, error, progress, step, warning
from agent.engine.hooks import HookContext
from agent.engine.layouts import Begun, Layout
from agent.core.mounts import read_mountinfo
from agent.repository.store import IN_PROGRESS, Repository, classify, free_space, reserve_name
from agent.policy.rotation import Plan, Scheme, parse_snapshot_name, plan_rotation
from agent.engine import source_set
from agent.engine.sources import Source, Tree

log = logging.getLogger(__name__)

STEPS = ("backup", "snapshot", "rotate")
# A snapshot with fewer than this share of the previous one's files is flagged.
SHRINK_ALARM = 0.5
# Progress events at most this often (seconds).
PROGRESS_INTERVAL = 0.5


@dataclass(frozen=True)
class Request:
    """What the caller asked for, after the config and the command line merged.

    With ``disk``, the cycle unlocks and mounts it, proves it is the right
    disk, and ``repository`` is the disk's; without, ``repository`` is a
    directory the caller gave.
    """

    settings: Settings
    source: str
    repository: str
    steps: frozenset[str] = frozenset(STEPS)
    dry_run: bool = False
    disk: Disk | None = None
    # Run from a terminal: a missing disk is an error to explain, not a
    # quiet "nothing to do" as from a timer.
    interactive: bool = True
    # rotate --discard-unfinished: delete unfinished transfers too (otherwise kept to resume from).
    discard_unfinished: bool = False
    # --passphrase-stdin: opens a disk whose crypttab line has no key file (agent.disk.passphrase); wiped once used.
    passphrase: bytearray | None = None


@dataclass
class Outcome:
    """What the cycle did; the CLI turns it into an exit status and a summary."""

    snapshot: str | None = None
    partial: bool = False
    flagged: str | None = None
    warnings: list[str] = field(default_factory=list)
    statistics: dict[str, Any] = field(default_factory=dict)
    plan: Plan | None = None
    deleted: tuple[str, ...] = ()
    duration: float = 0.0
    skipped: str | None = None  # why nothing was done (the disk is not attached)
    offsite: list[Any] = field(default_factory=list)  # engine/offsite's Copied, one per [[offsite]]


def transfer_progress(update: rsync.Progress, elapsed: float, *, copies_all: bool = False) -> tuple[int, int | None]:
    """Percent done and seconds left: by bytes when every file is copied, else by files checked.

    ``copies_all``: there is nothing to link to (the first snapshot, no
    unfinished one to resume from), so every file is sent and rsync's own
    percent, bytes sent of the total size of the files listed, is the
    share of the work done. Otherwise most files are hard-linked, not sent,
    and count for nothing in rsync's bytes: its percent would sit near 0 to
    the end, and the bytes still to send are known only once rsync has
    compared every file. Then the share of files checked (linked or copied)
    is what moves steadily; it runs ahead while a few large new files copy.
    Both may step back while rsync is still scanning and the total grows.
    """
    percent = update.percent
    if not copies_all and update.total and update.checked is not None:
        percent = max(0, min(100, (100 * update.checked) // update.total))
    eta = None
    if 0 < percent < 100 and not update.scanning:
        eta = int(elapsed * (100 - percent) / percent)
    elif percent >= 100:
        eta = 0
    return percent, eta



def rotation_plan(
    names: Sequence[str], scheme: Scheme, protected: dict[str, str], *, made: str | None, discard_unfinished: bool
) -> Plan:
    """The planner's plan for a repository's entries, with what a cycle adds to it (pure).

    ``--discard-unfinished`` deletes the unfinished transfers too. The
    snapshot just made always stays: names sort by wall-clock time, and in
    the hour repeated when clocks go back it may sort before an older one,
    though it is the newest in fact. Local and remote cycles share it.
    """
    plan = plan_rotation(names, scheme, protected)
    if discard_unfinished:
        gone = tuple(n for n in names if n.endswith(IN_PROGRESS))
        plan = Plan(keep={k: v for k, v in plan.keep.items() if k not in gone}, delete=(*plan.delete, *gone))
    if made is not None and made in plan.delete:
        plan = Plan(keep={**plan.keep, made: ("just made",)}, delete=tuple(n for n in plan.delete if n != made))
    return plan

class Cycle:
    """Runs one request; emits events; raises BackupAgentError on failure."""

    def __init__(
        self,
        request: Request,
        emitter: Emitter,
        runner: Runner,
        *,
        source: Source | None = None,
        metered: offsite.Metered = offsite.not_known,
    ) -> None:
        self.request = request
        # Whether the connection is metered now, for [[offsite]] metered (the conditions decide; unknown by default).
        self.metered = metered
        self.settings = request.settings
        self.emitter = emitter
        self.runner = runner
        # What is read: by default the configured sources, or the one path (the command line may have replaced it).
        self.parts = (
            (source_set.Part("", source),)
            if source is not None
            else source_set.parts_from_settings(request.settings, request.source, runner, self._warn)
        )
        self.source: Source = self.parts[0].source
        self.outcome = Outcome()
        self.current_step: str | None = None
        self.repository: Repository | None = None
        # How snapshots are made and deleted there; set once the repository is opened (or known missing).
        self.layout: Layout | None = None
        self.hook_context = HookContext(
            disk=request.disk.name if request.disk else None, repository=request.repository
        )
        self._started = time.monotonic()
        self._failed_step: str | None = None
        self._completed = False  # the complete event was sent: what is left is emptying the trash and closing
        # The previous snapshot's manifest, read while rsync runs (_preload_manifest): its name and the reading.
        self._preloaded: tuple[str, concurrent.futures.Future[manifests.Known]] | None = None
        # name -> (the snapshot its clone was made of, the files rsync wrote into it): the manifest's
        # reuse without a stat per file, in the btrfs layout (agent.repository.manifest._Writer._reuse).
        self._written: dict[str, tuple[str | None, frozenset[bytes]]] = {}
        # name -> (its parent, what the send stream changed): the manifest from the parent's (_manifest_from_stream).
        self._streamed: dict[str, tuple[str, manifest_stream.StreamChanges]] = {}

    # -- helpers ------------------------------------------------------------

    @contextlib.contextmanager
    def _step(self, name: str, **detail: Any) -> Iterator[dict[str, Any]]:
        """Announce a step; the block may add detail to its ``done`` event."""
        self.current_step = name
        self.emitter.emit(step(name, "start", **detail))
        done: dict[str, Any] = {}
        yield done
        self.emitter.emit(step(name, "done", **done))

    def _warn(self, message: str, **detail: Any) -> None:
        log.warning("%s", message)
        self.outcome.warnings.append(message)
        self.emitter.emit(warning(self.current_step or "cycle", message, **detail))

    def _priority(self, ionice_class: str | None = None) -> tuple[str, ...]:
        commands = self.settings.commands
        return priority_prefix(
            commands.ionice, commands.nice, ionice_class or self.settings.ionice, self.settings.nice
        )

    def _holder(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "started": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "repository": self.request.repository,
        }

    # -- the cycle -----------------------------------------------------------

    def run(self) -> Outcome:
        request = self.request
        settings = self.settings
        try:
            with contextlib.ExitStack() as stack, self._remembering_failure():
                self._lock_machine(stack)
                if request.disk is not None and not self._open_disk(stack, request.disk):
                    self._emit_complete()
                    return self.outcome
                # After the trash is emptied, while the disk is open: the off-site copy.
                stack.callback(self._offsite)
                # After success is reported and after_backup ran, before the
                # disk is unmounted and locked: the ExitStack unwinds in reverse.
                stack.callback(self._empty_trash)
                # Whatever fails, a manifest still being read holds a file open on the disk: wait before unmounting.
                stack.callback(self._forget_preloaded)
                if "backup" in request.steps:
                    self.current_step = "before_backup"
                    stack.enter_context(
                        hooks.around("backup", settings.hooks, self.runner, self.hook_context, self._warn, dry_run=request.dry_run)
                    )
                self._prepare(stack)
                self._close_manifests()
                name: str | None = None
                if "backup" in request.steps:
                    self._make_room()
                    self.current_step = "before_snapshot"
                    with hooks.around(
                        "snapshot", settings.hooks, self.runner, self.hook_context, self._warn, dry_run=request.dry_run
                    ):
                        name = self._transfer()
                if "snapshot" in request.steps:
                    name = self._snapshot(name)
                if "rotate" in request.steps:
                    self._rotate(name)
                self._emit_complete()
                self._completed = True
        except (OSError, BackupAgentError) as exc:
            failure = exc if isinstance(exc, BackupAgentError) else self._filesystem_failure(exc)
            failure.step = failure.step or self._failed_step or self.current_step
            failure.snapshots_untouched = not self.outcome.deleted
            self.emitter.emit(error(failure.step, failure.message, failure.exit_code, failure.snapshots_untouched))
            if failure is exc:
                raise
            raise failure from exc
        return self.outcome

    @contextlib.contextmanager
    def _remembering_failure(self) -> Iterator[None]:
        """Note the step a failure happened in, before the undo steps (which
        rename current_step as they run) unwind."""
        try:
            yield
        except BaseException:
            self._failed_step = self.current_step
            raise

    def _filesystem_failure(self, exc: OSError) -> StepError:
        """The filesystem said no (disk full, read-only, permission): the user
        can act on that, so it is an error message, not a bug."""
        what = f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc)
        if (self._failed_step or self.current_step) in ("transfer", "system-state", "snapshot"):
            what += "; the unfinished transfer is kept and the next run resumes from it"
        return StepError(what, step=self._failed_step or self.current_step)

    def _emit_complete(self) -> None:
        """The cycle's result; emitted before the disk is closed, which reports its own steps."""
        self.outcome.duration = round(time.monotonic() - self._started, 3)
        self.emitter.emit(
            complete(
                self.outcome.snapshot,
                partial=self.outcome.partial,
                flagged=self.outcome.flagged,
                statistics=self.outcome.statistics,
                warnings=len(self.outcome.warnings),
                deleted=list(self.outcome.deleted),
                duration=self.outcome.duration,
                dry_run=self.request.dry_run,
                skipped=self.outcome.skipped,
            )
        )

    # -- the disk ------------------------------------------------------------

    def _open_disk(self, stack: contextlib.ExitStack, disk: Disk) -> bool:
        """Find, unlock, mount and verify the disk; False when there is nothing to do."""
        settings = self.settings
        with self._step("disk", disk=disk.name) as done:
            device = find_device(disk, settings, self.runner)
            done["present"] = device is not None
            done["device"] = device
        if device is None:
            message = not_attached(disk)
            if self.request.interactive:
                raise DiskMissingError(message, step="disk")
            log.info("%s", message)
            self.outcome.skipped = "disk not attached"
            return False
        if self.request.dry_run and not self._disk_is_open(disk):
            log.info("would unlock %s, mount it on %s and back up into %s", disk.name, disk.mount_point, disk.repository)
            self.outcome.skipped = "dry run: the disk is not unlocked and mounted, so nothing more can be checked"
            return False
        # ExitStack unwinds in reverse: for each undo, first name the step
        # (so its warnings carry it), then the undo, then report what is true
        # afterwards.
        unlocked_now: list[bool] = []
        stack.callback(self._report_closed, "lock-disk", unlocked_now, lambda: os.path.exists(disk.mapped_device))
        with self._step("unlock", disk=disk.name) as done:
            unlocked_now.append(
                stack.enter_context(unlocked(disk, settings, self.runner, self._warn, passphrase=self.request.passphrase))
            )
            done["unlocked_now"] = unlocked_now[0]
        stack.callback(self._set_step, "lock-disk")
        mounted_now: list[bool] = []
        stack.callback(self._report_closed, "unmount", mounted_now, lambda: self._disk_is_mounted(disk))
        with self._step("mount", mount_point=disk.mount_point) as done:
            mounted_now.append(stack.enter_context(mounted(disk, settings, self.runner, self._warn)))
            done["mounted_now"] = mounted_now[0]
        stack.callback(self._set_step, "unmount")
        with self._step("verify", repository=disk.repository) as done:
            marker = verify_identity(disk, settings)
            done["id"] = marker.id if marker else None
        if not self.request.dry_run:
            # Opened for browsing (read-only): writable for this cycle, read-only again after (agent.disk.browse).
            self.current_step = "mount"
            stack.enter_context(browse.writable(disk, settings, self.runner, self._warn))
        return True

    @classmethod
    def _disk_is_open(cls, disk: Disk) -> bool:
        return os.path.exists(disk.mapped_device) and cls._disk_is_mounted(disk)

    @staticmethod
    def _disk_is_mounted(disk: Disk) -> bool:
        return top_mount(read_mountinfo(), os.path.realpath(disk.mount_point)) is not None

    def _set_step(self, name: str) -> None:
        self.current_step = name

    def _report_closed(self, name: str, opened_now: list[bool], still_open: Callable[[], bool]) -> None:
        """Say what is true after an undo: closed by us, left as found, or still open."""
        if not opened_now or not opened_now[0]:
            state = "left-as-found"
        elif still_open():
            state = "failed"
        else:
            state = "done"
        self.emitter.emit(step(name, state))

    def _make_room(self) -> None:
        """Opt-in: delete the oldest snapshots beyond the scheme until keep_free is free."""
        keep_free = self.settings.keep_free
        repo = self.repository
        if keep_free is None or repo is None:
            return
        with self._step("make-room") as done:
            deleted: list[str] = []
            while True:
                free, total = free_space(repo.root)
                wanted = keep_free.bytes if keep_free.bytes is not None else int(total * (keep_free.percent or 0) / 100)
                if free >= wanted:
                    break
                names = repo.snapshot_names()
                protected = self.protected(repo, names)
                candidates = [n for n in names[:-1] if n not in protected]
                if len(names) - 1 < keep_free.min_snapshots or not candidates:
                    self._warn(
                        f"only {human_size(free)} free of the {human_size(wanted)} keep_free asks for, and no snapshot may be "
                        f"deleted (min_snapshots = {keep_free.min_snapshots}, the newest is always kept)"
                    )
                    break
                victim = candidates[0]
                if self.request.dry_run:
                    log.info("would delete %s to make room", victim)
                    deleted.append(victim)
                    break
                # The space is wanted now, before the transfer: removed at once.
                self._layout().delete([victim], step="make-room")
                self._layout().empty_trash(step="make-room")
                deleted.append(victim)
            if deleted:
                self._warn(f"deleted {len(deleted)} old snapshots to keep {human_size(wanted)} free: {', '.join(deleted)}")
                self.outcome.deleted += tuple(deleted)
            done["deleted"] = deleted

    def _lock_machine(self, stack: contextlib.ExitStack) -> None:
        with self._step("lock"):
            path = lock.machine_lock_path()
            if self.request.dry_run:
                lock.probe(path)
            else:
                stack.enter_context(lock.hold(path, self._holder()))

    def _prepare(self, stack: contextlib.ExitStack) -> None:
        request = self.request
        with self._step("prepare", repository=request.repository) as done:
            if "backup" in request.steps:
                for part in self.parts:
                    part.source.check(request.repository)
            state = classify(request.repository)
            needs_repository = "backup" in request.steps or "snapshot" in request.steps
            if state in ("missing", "empty") and not needs_repository:
                raise RepositoryError(f"{request.repository} holds no repository yet: nothing to rotate", step="prepare")
            if request.dry_run:
                if state == "foreign":
                    Repository.create(request.repository)  # raises the same refusal, creating nothing
                if state == "repository":
                    self.repository = Repository.open(request.repository)
                    lock.probe(self.repository.lock_path)
                else:
                    log.info("would create the repository %s", request.repository)
                self._open_layout()
                done["created"] = state != "repository"
                return
            if request.disk is not None:
                # The cycle never creates a repository on a disk by itself (init does).
                self.repository = Repository.open(request.repository)
            else:
                kind = detect_layout(request.repository, self._wanted_layout()) if state != "repository" else "links"
                self.repository = Repository.create(request.repository, layout=kind)
            stack.enter_context(lock.hold(self.repository.lock_path, self._holder()))
            self.repository.remove_leftovers()
            self._open_layout()
            done["created"] = state != "repository"
            done["id"] = self.repository.marker.id

    def _close_manifests(self) -> None:
        """Manifests root's alone, also those an older version left readable (agent.disk.browse.private_manifests)."""
        if self.repository is None or self.request.dry_run:
            return
        try:
            changed = browse.private_manifests(self.repository.metadata_dir)
        except OSError as exc:
            self._warn(f"the manifests in {self.repository.metadata_dir} could not be made private: {exc.strerror}")
            return
        if changed:
            log.info("made %d manifests readable by root only", len(changed))

    def _layout(self) -> Layout:
        if self.layout is None:
            raise RepositoryError(f"{self.request.repository} is not open", step=self.current_step)
        return self.layout

    def _open_layout(self) -> None:
        self.layout = layouts.for_repository(
            self.request.repository,
            self.repository,
            runner=self.runner,
            rm_argv=self._rm_argv(),
            warn=self._warn,
            btrfs=self.settings.commands.btrfs,
            wanted=self._wanted_layout(),
        )

    def _wanted_layout(self) -> str:
        """The configured layout: the disk's own, else [backup] layout."""
        disk = self.request.disk
        return disk.layout if disk is not None and disk.layout is not None else self.settings.layout

    # -- transfer ------------------------------------------------------------

    def _transfer(self) -> str:
        """The transfer, leaving at most one unfinished transfer behind, whatever happens (agent.repository.unfinished)."""
        layout = self._layout()
        start = dt.datetime.now().astimezone()
        if self.settings.method == "send" and not self.request.dry_run:
            sent = self._send(start)
            if sent is not None:
                return sent
        begun = layout.begin(start, dry_run=self.request.dry_run)
        try:
            name = self._transfer_into(begun, start)
        except BaseException as exc:
            if not self.request.dry_run:
                layout.end_transfer(begun, whole=False)
                if isinstance(exc, DiskFullError):
                    exc.message = self._disk_full_message()
            raise
        if not self.request.dry_run:
            layout.end_transfer(begun, whole=True)
        return name

    def _send(self, start: dt.datetime) -> str | None:
        """``method = "send"`` (agent.engine.send): the snapshot's name, or None when rsync must make it (warned)."""
        repo = self.repository
        why = sending.refusal(self.layout, self.source.path) if repo is not None else "there is no repository yet"
        if len(self.parts) > 1:
            why = "several [[source]] are sent by rsync, each into its directory"
        if why is not None or repo is None or not isinstance(self.layout, BtrfsLayout):
            self._warn(f'method = "send" is not used: {why}; rsync makes this snapshot')
            return None
        if effective_excludes(self.settings):
            self._warn(f'method = "send": exclude does not apply inside the subvolume {self.source.path}; all of it is sent')
        name = reserve_name(repo.snapshots_dir, start, create=False)
        self.hook_context.snapshot = name
        with self._step("transfer", snapshot=name, method="send") as done:
            try:
                sent = sending.send(
                    repo, self.layout, self.source.path, name,
                    runner=self.runner, btrfs=self.settings.commands.btrfs, warn=self._warn,
                )
            except Interrupted:
                raise  # a stop is a stop, not a reason to try rsync
            except (OSError, BackupAgentError) as exc:
                what = exc.message if isinstance(exc, BackupAgentError) else str(exc)
                self._warn(f"btrfs send | receive failed ({what}): rsync makes this snapshot instead")
                done["fallback"] = "rsync"
                return None
            self.outcome.statistics = {}
            if self.settings.command_sources or self.settings.packages.enabled:
                self._warn('method = "send" stores no command sources or package lists: a received snapshot is read-only')
            if sent.written is not None:
                self._written[name] = (sent.parent, sent.written)
            if sent.changes is not None and sent.parent is not None:
                self._streamed[name] = (sent.parent, sent.changes)
            repo.write_metadata(name, sending.metadata(sent, start, self.source.path, __version__, self.outcome.warnings))
            done.update(snapshot=name, statistics={}, method="send", parent=sent.parent)
        self.outcome.snapshot = name
        return name

    def _transfer_into(self, begun: Begun, start: dt.datetime) -> str:
        """Open every source (frozen ones are snapshotted then, close together), then one rsync per source."""
        request = self.request
        name, latest, leftovers = begun.name, begun.previous, list(begun.resumed_from)
        self.hook_context.snapshot = name
        with (
            self._step("transfer", snapshot=name, link_dest=latest, resumed_from=leftovers) as done,
            contextlib.ExitStack() as trees,
        ):
            opened = [(part, trees.enter_context(part.source.opened(self._excluded_repository()))) for part in self.parts]
            errors = rsync.ErrorCollector()
            if self.repository is not None and latest is not None and not request.dry_run and "snapshot" in request.steps:
                self._preload_manifest(self.repository, latest)  # read while rsync runs (docs/ARCHITECTURE.md, "One backup")
            partial_codes: list[int] = []
            each: list[dict[str, Any]] = []
            written = rsync.Written() if begun.inplace or self._lists_written() else None  # the files rsync wrote, over every source
            for index, (part, tree) in enumerate(opened):
                result, stats = self._transfer_part(part, tree, begun, errors, (index, len(opened)), written)
                if result.kind == "partial":
                    partial_codes.append(result.returncode)
                each.append(stats)
            self.outcome.statistics = each[0] if len(each) == 1 else source_set.sum_statistics(each)
            if written is not None and written.exact and not begun.resumed_from and not request.dry_run:
                # The clone was latest itself: what rsync wrote is all that differs from it (agent.engine.btrfs).
                self._written[name] = (begun.previous, frozenset(written.files))
            if partial_codes:
                self.outcome.partial = True
                self._warn(
                    f"snapshot {name} is partial: {errors.count} files could not be transferred",
                    code=partial_codes[-1],
                    errors=list(errors.first),
                )
            sources = [
                {"path": part.source.path, "directory": part.directory, **tree.record, "statistics": stats}
                for (part, tree), stats in zip(opened, each)
            ]
            metadata = {
                "format": 1,
                "name": name,
                "state": "transferred",
                "host": socket.gethostname(),
                "tool_version": __version__,
                "start": start.isoformat(timespec="milliseconds"),
                "transfer_end": dt.datetime.now().astimezone().isoformat(timespec="milliseconds"),
                "link_dest": latest,
                "resumed_from": leftovers,
                "statistics": self.outcome.statistics,
                "partial": self.outcome.partial,
                "errors": {"count": errors.count, "first": list(errors.first)},
                "vanished": errors.vanished,
                "warnings": list(self.outcome.warnings),
                "sources": sources,
            }
            if len(opened) == 1:
                # One source: the snapshot is its tree, and the metadata reads as it always did.
                metadata.update(source=self.parts[0].source.path, **opened[0][1].record)
            skipped = [point for _part, tree in opened for point in tree.skipped_mounts]
            done.update(snapshot=name, statistics=self.outcome.statistics, skipped_mounts=skipped)
        metadata.update(self._system_state(begun))
        if not request.dry_run:
            self._write_transfer_metadata(name, metadata)
        self.outcome.snapshot = name
        return name

    def _transfer_part(
        self,
        part: source_set.Part,
        tree: Tree,
        begun: Begun,
        errors: rsync.ErrorCollector,
        position: tuple[int, int],
        written: rsync.Written | None = None,
    ) -> tuple[Result, dict[str, Any]]:
        """One source's rsync into its directory of the snapshot; its result and statistics.

        ``written`` (a clone updated in place, the btrfs layout) gathers the files rsync wrote, as paths
        in the snapshot.
        """
        request = self.request
        if begun.inplace and not request.dry_run:
            # A clone updated in place keeps the previous tree's hard links (agent.engine.btrfs).
            target = os.path.join(begun.target, part.directory) if part.directory else begun.target
            split_hard_links(target, tree.root, runner=self.runner, find=self.settings.commands.find, step="transfer")
        part_written = rsync.Written() if written is not None else None
        link_dests = source_set.part_link_dests(begun.link_dests, part.directory, part.source.path, self._metadata_of)
        copies_all = begun.copies_all or not link_dests
        index, count = position
        argv = self._transfer_argv(begun, tree, part, link_dests)
        parser = rsync.ProgressParser()
        other_lines: list[str] = []
        last_emit = 0.0
        transfer_started = time.monotonic()
        unsent: list[rsync.Progress] = []  # the last record, when it was not sent (too soon)

        def emit(update: rsync.Progress, now: float) -> None:
            percent, eta = transfer_progress(update, now - transfer_started, copies_all=copies_all)
            if count > 1:  # each source its share of the bar, in order
                percent, eta = (100 * index + percent) // count, None
            current = None  # the file being copied: its name is read back only here, at most twice a second
            if update.current is not None:
                current = os.path.join(part.source.path, rsync.readable_name(update.current))
            self.emitter.emit(progress(percent, update.bytes, update.files, update.rate, eta, current=current))

        def on_stdout(line: str) -> None:
            nonlocal last_emit
            if parser.item(line):  # one line per file copied: the current file, the files written (btrfs)
                if part_written is not None:
                    part_written.feed(line)
                return
            update = parser.feed(line)
            if update is None:
                other_lines.append(line)
                return
            now = time.monotonic()
            unsent[:] = [update]
            if now - last_emit >= PROGRESS_INTERVAL or update.percent >= 100:
                last_emit = now
                unsent.clear()
                emit(update, now)

        before = errors.count
        result = self.runner.run(
            argv,
            step="transfer",
            exit_table=rsync.EXIT_TABLE,
            on_stdout=on_stdout,
            on_stderr=errors.feed,
            mutating=False if request.dry_run else True,
            check=False,
        )
        if unsent and result.kind != "error":
            emit(unsent[0], time.monotonic())  # where the transfer ended: a first snapshot's bytes may end below 100%
        if (lost := self._transfer_failure(result.returncode, result.stderr_tail)) is not None:
            raise lost
        if disk_full([*errors.first, *result.stderr_tail]) and result.kind in ("error", "partial"):
            raise DiskFullError(self._disk_full_message(), step="transfer")
        if result.kind == "error":
            which = f" reading {part.source.path}" if count > 1 else ""
            raise CommandError(
                f"rsync failed{which} ({result.meaning}): {' | '.join(result.stderr_tail[-3:]) or 'no error output'}; "
                "the unfinished transfer is kept and the next run resumes from it",
                argv=result.argv,
                returncode=result.returncode,
                stderr_tail=result.stderr_tail,
                step="transfer",
            )
        if written is not None and part_written is not None:
            prefix = os.fsencode(part.directory) + b"/" if part.directory else b""
            written.files.update(prefix + path for path in part_written.files)
            written.exact = written.exact and part_written.exact
        stats = rsync.parse_stats(other_lines).as_dict()
        if result.kind == "warning":
            self._warn(f"rsync: {result.meaning} ({errors.vanished} files)", code=result.returncode)
        if result.kind == "partial" and count > 1:
            log.warning("%d files of %s could not be transferred", errors.count - before, part.source.path)
        return result, stats

    # What a layout elsewhere than this machine changes (agent.engine.remote overrides these).

    def _transfer_argv(self, begun: Begun, tree: Tree, part: source_set.Part, link_dests: Sequence[str]) -> tuple[str, ...]:
        """rsync's argv for one source's transfer into ``begun`` (its directory there, with several)."""
        settings = self.settings
        request = self.request
        return rsync.build_argv(
            rsync=settings.commands.rsync,
            source=tree.root,
            target=os.path.join(begun.target, part.directory) if part.directory else begun.target,
            link_dests=link_dests,
            one_file_system=tree.one_file_system,
            excludes=tree.excludes,
            filter_rules=(*part.filter_rules, *tree.filter_rules, *self._state_rules(part)),
            io_timeout=settings.io_timeout,
            dry_run=request.dry_run,
            priority_prefix=(*tree.command_prefix, *self._priority()),
            inplace=begun.inplace,
        )

    def _lists_written(self) -> bool:
        """Whether the transfer's itemized files are gathered without a clone updated in place (a remote
        manifest's shortcut when rsync wrote nothing, agent.engine.remote_read)."""
        return False

    def _excluded_repository(self) -> str:
        """The local path the sources leave out (the repository, when it lies inside a source)."""
        return self.request.repository

    def _transfer_failure(self, returncode: int, stderr: tuple[str, ...]) -> BackupAgentError | None:
        """A failure of the transfer with a meaning of its own (a lost connection); None: rsync's status says it."""
        return None

    def _write_transfer_metadata(self, name: str, metadata: dict[str, Any]) -> None:
        if self.repository is not None:
            self.repository.write_metadata(name, metadata)

    def _metadata_of(self, link_dest: str) -> dict[str, Any]:
        """What a snapshot the transfer links to says of itself (unfinished ones by their reserved name)."""
        name = os.path.basename(link_dest)
        if name.endswith(IN_PROGRESS):
            name = name[: -len(IN_PROGRESS)]
        return (self.repository.read_metadata(name) if self.repository is not None else None) or {}

    def _system_source(self) -> str:
        """The source the system state belongs with: ``/`` when any source is, else the first."""
        paths = [part.source.path for part in self.parts]
        return "/" if "/" in paths else paths[0]

    def _state_rules(self, part: source_set.Part) -> tuple[str, ...]:
        """Keep a live /.backup-agent out of the snapshot's top (engine/sysstate); a source stored in a directory
        of its own never reaches the top, and no source's directory may be named so (config/source_names)."""
        if part.directory or not sysstate.wanted(self.settings, self._system_source()):
            return ()
        return (sysstate.EXCLUDE_RULE,)

    def _system_state(self, begun: Begun) -> dict[str, Any]:
        """Command sources' output and the packages, into the snapshot being made, before its metadata says
        transferred (docs/ARCHITECTURE.md, "System state"); what the metadata records of them."""
        if not sysstate.wanted(self.settings, self._system_source()):
            return {}
        repo = self.repository
        with self._step("system-state", snapshot=begun.name) as done:
            if repo is None or self.request.dry_run:
                for command_source in self.settings.command_sources:
                    log.info("would run command source %r into %s", command_source.name, command_source.file)
                return {}
            previous = repo.snapshot_path(begun.previous) if begun.previous is not None else None
            record = sysstate.capture(self.settings, self._system_source(), self.runner, begun.target, previous, self._warn)
            done.update(record)
        return {"system_state": record}

    def _disk_full_message(self) -> str:
        """What really takes the space (the unfinished transfer included) and the commands that free it."""
        repo = self.repository
        free, _total = free_space(repo.root if repo else self.request.repository)
        disk = f" --disk {self.request.disk.name}" if self.request.disk is not None else ""
        held = ""
        if repo is not None:
            kept = repo.in_progress_names()
            sizes = [unfinished.own_bytes(repo.in_progress_path(n)) for n in kept]
            if kept:
                what = f"the unfinished transfer {kept[0]}" if len(kept) == 1 else f"{len(kept)} unfinished transfers"
                held = (
                    f"; {what} holds {human_size(sum(sizes))} of its own (kept so the next run resumes from it; "
                    f"free it with: sudo backup-agent rotate --discard-unfinished{disk})"
                )
            if (latest := repo.latest_name()) is not None:
                stats = (repo.read_metadata(latest) or {}).get("statistics") or {}
                if isinstance(stats.get("transferred_size"), int):
                    held += f"; the last snapshot ({latest}) added {human_size(stats['transferred_size'])}"
        return (
            f"the backup disk is full ({human_size(free)} free): no snapshot was completed{held}; delete old snapshots "
            f"with: sudo backup-agent rotate{disk} (after lowering the counts in [rotation]), set keep_free in "
            "[rotation], or use a bigger disk"
        )

    # -- snapshot ------------------------------------------------------------

    def _snapshot(self, name: str | None) -> str | None:
        repo = self.repository
        with self._step("snapshot", snapshot=name) as done:
            if repo is None or self.request.dry_run:
                if name is None and repo is not None:
                    name = self._layout().finished_transfer()
                log.info("would complete snapshot %s", name)
                done["snapshot"] = name
                return name
            layout = self._layout()
            if name is None:
                name = layout.finished_transfer()
            metadata = repo.read_metadata(name) or {}
            if metadata.get("state") != "transferred":
                raise StepError(f"the transfer into {name} did not finish: run the backup again", step="snapshot")
            previous = repo.latest_name()
            self.outcome.flagged = self._shrink_check(repo, previous, metadata)
            recorded = self._record_manifest(repo, name, previous)
            end = dt.datetime.now().astimezone()
            start = dt.datetime.fromisoformat(metadata["start"])
            metadata.update(
                state="complete",
                end=end.isoformat(timespec="milliseconds"),
                duration=round((end - start).total_seconds(), 3),
                flagged=self.outcome.flagged,
                previous=previous,
                manifest=recorded,
                warnings=sorted(set(metadata.get("warnings", [])) | set(self.outcome.warnings)),
            )
            self.outcome.partial = bool(metadata.get("partial"))
            self.outcome.statistics = metadata.get("statistics", {})
            repo.write_metadata(name, metadata)
            # Complete and durable; earlier unfinished transfers, which served as --link-dest, are deleted.
            discarded = layout.complete(name)
            done.update(
                snapshot=name,
                partial=self.outcome.partial,
                flagged=self.outcome.flagged,
                discarded=list(discarded),
                manifest=recorded,
            )
        self.outcome.snapshot = name
        return name

    def _preload_manifest(self, repo: Repository, previous: str) -> None:
        """Start reading ``previous``'s manifest for reuse (manifests.reusable) beside the transfer.

        rsync keeps about one core busy and waits on the disk; reading and
        indexing the manifest (a tenth of a second for 50,000 files) then
        costs the backup no time. _record_manifest takes the result, or
        the error, as if it had read the manifest itself.
        """
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="manifest")
        self._preloaded = (previous, pool.submit(manifests.reusable, repo.manifest_path(previous)))
        pool.shutdown(wait=False)  # the one task still runs; its thread ends with it

    def _forget_preloaded(self) -> None:
        """Wait until a manifest read beside a transfer that failed has ended, and drop it.

        Its thread holds the file open: unmounting the disk under it would
        fail and leave the disk mounted. Nothing is waited for after a
        success, where the snapshot step took the result.
        """
        preloaded, self._preloaded = self._preloaded, None
        if preloaded is not None:
            concurrent.futures.wait([preloaded[1]])

    def _reusable(self, repo: Repository, previous: str) -> manifests.Known:
        """``previous``'s manifest for reuse: the one read during the transfer, else read now."""
        preloaded, self._preloaded = self._preloaded, None
        if preloaded is not None and preloaded[0] == previous:
            return preloaded[1].result()
        return manifests.reusable(repo.manifest_path(previous))

    def _record_manifest(self, repo: Repository, name: str, previous: str | None) -> dict[str, Any]:
        """Checksums of the snapshot's files, reusing the previous manifest's for shared inodes.

        A failure is a warning: the snapshot is completed without a manifest
        (its metadata says why), since losing a good snapshot over its
        checksums would be worse; the next snapshot then hashes every file.
        """
        if (streamed := self._manifest_from_stream(repo, name, previous)) is not None:
            return streamed
        started = time.monotonic()  # the step's cost includes reading the previous manifest
        known = manifests.Known()
        if previous is not None:
            try:
                known = self._reusable(repo, previous)
            except FileNotFoundError:
                log.info("snapshot %s has no manifest: every file of %s is hashed", previous, name)
            except (OSError, CorruptManifestError) as exc:
                log.warning("the manifest of %s is not used (%s): every file of %s is hashed", previous, exc, name)
        target = repo.manifest_path(name)
        try:
            clone_of, written = self._written.get(name, (None, None))
            recorded = manifests.record(
                self._layout().transfer_path(name),
                target,
                known,
                previous=repo.snapshot_path(previous) if known.lines and previous is not None else None,
                written=written if clone_of == previous else None,
            )
            recorded = replace(recorded, seconds=time.monotonic() - started)
        except OSError as exc:
            what = f"{os.fsdecode(exc.filename)}: {exc.strerror}" if exc.filename else str(exc)
            if os.path.isfile(target):
                os.unlink(target)  # never leave an older attempt's manifest beside this snapshot
            self._warn(
                f"snapshot {name} is completed without a manifest ({what}): verify cannot check it, "
                "and the next backup hashes every file again"
            )
            return {"error": what}
        log.info(
            "manifest of %s: %d files, %d hashed (%s), %d reused from %s, in %.2f s",
            name, recorded.entries, recorded.hashed_files, human_size(recorded.hashed_bytes),
            recorded.reused_files, previous if known.lines else "none", recorded.seconds,
        )
        return recorded.as_metadata(previous if known.lines else None)

    def _manifest_from_stream(self, repo: Repository, name: str, previous: str | None) -> dict[str, Any] | None:
        """A received snapshot's manifest from its parent's and the stream (agent.repository.manifest_stream).

        None when it cannot be made so (the parent is not the latest, its
        manifest is missing or damaged, the change is large): the caller walks.
        """
        parent, changes = self._streamed.get(name, (None, None))
        if parent is None or changes is None or parent != previous:
            return None
        try:
            recorded = manifest_stream.record_from_stream(
                self._layout().transfer_path(name), repo.snapshot_path(parent), repo.manifest_path(parent),
                repo.manifest_path(name), changes,
            )
        except (OSError, CorruptManifestError) as exc:
            log.warning("the manifest of %s is not made from %s's and the stream (%s): it is walked", name, parent, exc)
            return None
        if recorded is None:
            return None
        log.info(
            "manifest of %s from %s's and the stream: %d files, %d hashed (%s), in %.2f s",
            name, parent, recorded.entries, recorded.hashed_files, human_size(recorded.hashed_bytes), recorded.seconds,
        )
        return {**recorded.as_metadata(parent), "from_stream": "clone" if changes.empty else "changes"}

    def _shrink_check(self, repo: Repository, previous: str | None, metadata: dict[str, Any]) -> str | None:
        if previous is None:
            return None
        before = ((repo.read_metadata(previous) or {}).get("statistics") or {}).get("files")
        after = (metadata.get("statistics") or {}).get("files")
        if not isinstance(before, int) or not isinstance(after, int) or before <= 0:
            return None
        if after < before * SHRINK_ALARM:
            message = (
                f"file count dropped from {before} to {after} since {previous}: the snapshot is kept but flagged, "
                "and old snapshots are not rotated; check the source, then run backup-agent rotate"
            )
            self._warn(message)
            return message
        return None

    def _rm_argv(self) -> tuple[str, ...]:
        return (*self._priority("idle"), self.settings.commands.rm)

    # -- rotate --------------------------------------------------------------

    def _rotate(self, made: str | None) -> None:
        request = self.request
        repo = self.repository
        with self._step("rotate") as done:
            if self.outcome.flagged:
                self._warn("rotation skipped: the new snapshot is flagged")
                done["skipped"] = "flagged"
                return
            names = repo.snapshot_names() if repo is not None else []
            if request.dry_run and made is not None and made not in names:
                names.append(made)
            protected = self.protected(repo, names) if repo is not None else {}
            if repo is not None:
                # Everything else in snapshots/ is shown as kept, with why.
                foreign = repo.foreign_names()
                names += foreign
                for odd in (n for n in foreign if parse_snapshot_name(n) is not None):
                    protected[odd] = "not a directory"
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
            if request.dry_run or repo is None:
                for victim in plan.delete:
                    log.info("would delete snapshot %s", victim)
                return
            # Out of the listing only: the files are removed by the
            # empty-trash step, after the complete event (_empty_trash).
            self._layout().delete(plan.delete, step="rotate")
            self.outcome.deleted += plan.delete

    def _offsite(self) -> None:
        """Copy the newest snapshot off-site (engine/offsite): only after a complete, never a dry run.

        Its failures are its own steps and warnings, never the cycle's error
        (docs/ARCHITECTURE.md, "The off-site copy").
        """
        request = self.request
        if not (self._completed and self.settings.offsite and "backup" in request.steps and self.outcome.snapshot is not None):
            return
        self.current_step = "offsite"
        copier = offsite.OffsiteCopy(self.settings, self.emitter, self.runner, metered=self.metered)
        if request.dry_run:
            copier.dry_run(self.outcome.snapshot)
        elif self.repository is not None:
            self.outcome.offsite = copier.run(self.repository)

    def _empty_trash(self) -> None:
        """Remove what this run (or an interrupted one) moved into .trash, after the cycle reported success.

        Deleting hard-link trees is the slowest part of a run on a large
        tree, and the snapshots are gone from the listing already, so the
        result does not wait for it (docs/ARCHITECTURE.md, "One backup").
        rm runs at idle I/O priority under the repository's lock, taken
        again (after_backup ran without it); the disk is closed after it.
        A failure or a stop leaves the rest in .trash, which the next
        backup or rotate removes: a warning, since the backup succeeded.
        """
        repo = self.repository
        if not self._completed or repo is None or self.request.dry_run or self.layout is None:
            return
        try:
            pending = repo.trash_names()
            if not pending:
                return
            with self._step("empty-trash", entries=len(pending)) as done, lock.hold(repo.lock_path, self._holder()):
                done["emptied"] = list(self.layout.empty_trash(step="empty-trash"))
        except (OSError, BackupAgentError) as exc:
            what = exc.message if isinstance(exc, BackupAgentError) else str(exc)
            self._warn(
                f"old snapshots moved to {repo.trash_dir} were not all removed ({what}): they are no longer listed, "
                "and the next backup or backup-agent rotate removes them"
            )
            self.emitter.emit(step("empty-trash", "failed"))

    @staticmethod
    def protected(repo: Repository, names: list[str]) -> dict[str, str]:
        """Snapshots rotation must leave alone: partial and flagged ones."""
        reasons: dict[str, str] = {}
        for name in names:
            metadata = repo.read_metadata(name) or {}
            if metadata.get("partial"):
                reasons[name] = "partial"
            elif metadata.get("flagged"):
                reasons[name] = "flagged"
        return reasons


def human_size(count: float) -> str:
    """Bytes for people: 1.5 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def check_platform(force: bool) -> None:
    """backup-agent is built for Linux; --force runs it elsewhere at the user's risk."""
    if platform.system() != "Linux" and not force:
        raise UsageError(f"backup-agent runs on Linux, not {platform.system()}: pass --force to try anyway")
