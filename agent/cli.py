"""Command-line front end: each subcommand is a thin call into the layers below.

Errors the user can act on (:class:`BackupAgentError`) print one line and exit
with their own status; anything else is a bug and gets a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
from types import FrameType
from typing import Any, Callable, Sequence

from . import __version__
from .commands import IONICE_CLASSES, Runner
from . import disk as disks
from . import install as installer
from . import lock
from .config import SYSTEM_CONFIG, Disk, Settings, effective_excludes, load_settings, running_through_sudo
from .cycle import STEPS, Cycle, Request, check_platform, human_size
from .errors import (
    EXIT_OK,
    EXIT_PARTIAL,
    BackupAgentError,
    DiskMissingError,
    Interrupted,
    NotAvailableError,
    RepositoryError,
    UsageError,
)
from .eject import Eject
from .events import Emitter
from .repository import Repository, classify
from .rotation import FREQUENCIES, Count, Plan, Scheme

log = logging.getLogger("agent")


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of exiting, so errors stay one line."""

    def error(self, message: str) -> Any:
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def _count(text: str) -> Count:
    if text.strip().lower() == "always":
        return "always"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a count: give a whole number or "always"') from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative: give a whole number of 0 or more, or \"always\"")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="backup-agent", description="Hard-linked rsync snapshots on a backup disk.")
    parser.add_argument("--version", action="version", version=f"backup-agent {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")

    common = _Parser(add_help=False)
    common.add_argument("--config", metavar="FILE", help="read this config instead of /etc/backup-agent/config.toml")
    common.add_argument("-v", "--verbose", action="store_true", help="say more (every command run, rsync's output)")
    common.add_argument("-q", "--quiet", action="store_true", help="say only warnings and errors")

    backup = sub.add_parser("backup", parents=[common], help="run a backup cycle", description="Run a backup cycle.")
    backup.add_argument("-b", "--backup", action="store_true", help="transfer into a new <name>.in-progress")
    backup.add_argument("-s", "--snapshot", action="store_true", help="complete the finished transfer as a snapshot")
    backup.add_argument("-r", "--rotate", action="store_true", help="rotate old snapshots (none of -b/-s/-r: all three)")
    backup.add_argument("-m", "--mount", metavar="DIRECTORY", help="mount the backup filesystem first")
    backup.add_argument("-c", "--crypto", metavar="NAME", help="unlock the encrypted backup disk first")
    backup.add_argument("-t", "--tunnel", metavar="TUNNEL_SPEC", help="reach an rsync daemon over SSH")
    backup.add_argument("--disk", metavar="NAME", help="back up to this configured disk")
    backup.add_argument("-i", "--ionice", metavar="CLASS", choices=sorted((*IONICE_CLASSES, "none")), help="I/O class for rsync and rm")
    backup.add_argument("-u", "--no-sudo", action="store_true", help="run as the current user (no root needed)")
    backup.add_argument("-n", "--dry-run", action="store_true", help="write nothing anywhere; say what would happen")
    backup.add_argument("--multi-fs", action="store_true", help="cross filesystem boundaries")
    backup.add_argument("-x", "--exclude", metavar="PATTERN", action="append", default=[], help="rsync exclude pattern (repeatable)")
    backup.add_argument("-f", "--force", action="store_true", help="run on a system other than Linux")
    backup.add_argument("--disable-notifications", action="store_true", help="no desktop notifications for this run")
    backup.add_argument("--json", action="store_true", help="write events as JSON lines on stdout")
    backup.add_argument("source", nargs="?", metavar="SOURCE", help="directory to back up (default: config, else /)")
    backup.add_argument("destination", nargs="?", metavar="DESTINATION", help="the repository directory")

    init = sub.add_parser("init", parents=[common], help="create the repository on a new backup disk")
    init.add_argument("--disk", metavar="NAME", required=True, help="the configured disk to initialise")
    init.add_argument("-y", "--yes", action="store_true", help="do it without asking")

    listing = sub.add_parser("list", parents=[common], help="list the snapshots of a repository")
    listing.add_argument("--json", action="store_true", help="one JSON array of snapshots")
    listing.add_argument("repository", nargs="?", metavar="REPOSITORY")

    rotate = sub.add_parser("rotate", parents=[common], help="rotate old snapshots now")
    rotate.add_argument("-n", "--dry-run", action="store_true", help="show the plan; delete nothing")
    rotate.add_argument("--json", action="store_true", help='print {"keep": {...}, "delete": [...]}')
    for frequency in FREQUENCIES:
        rotate.add_argument(f"--{frequency}", type=_count, metavar="N", help=f'{frequency} snapshots to keep (or "always")')
    rotate.add_argument("--prefer-recent", action="store_true", default=None, help="keep the newest of each period")
    rotate.add_argument("--relaxed", action="store_true", help="count periods, not time since the newest")
    rotate.add_argument("repository", nargs="?", metavar="REPOSITORY")

    eject = sub.add_parser(
        "eject",
        parents=[common],
        help="unmount and lock a backup disk now, so it is safe to unplug (run it with sudo)",
        description=(
            "Close a backup disk left open (mounted or unlocked by hand, or kept busy during a backup): take the "
            "machine lock, sync, unmount its mount point, lock it. Refused while a backup runs."
        ),
    )
    eject.add_argument("--disk", metavar="NAME", required=True, help="the configured disk to eject")
    eject.add_argument("--json", action="store_true", help="write events as JSON lines on stdout")

    loud = _Parser(add_help=False)
    loud.add_argument("-v", "--verbose", action="store_true", help="say more (every command run)")
    loud.add_argument("-q", "--quiet", action="store_true", help="say only warnings and errors")
    install = sub.add_parser(
        "install",
        parents=[loud],
        help="put the sudo rule, the udev rule and the user unit in place (run it with sudo)",
        description=(
            f"Write {installer.DROP_IN}: USER may run this backup-agent as root, without a password, only as "
            "`backup --json`, and `backup --json --disk NAME` and `eject --json --disk NAME` for each configured disk; "
            f"{installer.RULES_FILE}: marks each configured disk and hides it from desktop automounters; "
            f"{installer.UNIT_FILE}: the user unit that runs `backup-agent run` in the graphical session."
        ),
    )
    install.add_argument("--user", metavar="USER", help="the desktop user (default: the user who ran sudo)")
    install.add_argument(
        "-n", "--dry-run", action="store_true", help="show the three files (the sudo rule checked with visudo); write nothing"
    )
    uninstall = sub.add_parser("uninstall", parents=[loud], help="remove what install wrote (run it with sudo)")
    uninstall.add_argument("-n", "--dry-run", action="store_true", help="say what would be removed")

    run = sub.add_parser("run", parents=[common], help="the desktop agent: back up when the disk is plugged in, and hourly")
    run.add_argument("--no-sudo", action="store_true", help="start the cycle without sudo (as this user, or as root)")
    sub.add_parser("now", parents=[loud], help="ask the running agent to back up now (D-Bus)")
    sub.add_parser("stop", parents=[loud], help="ask the running agent to stop the running backup (D-Bus)")
    status = sub.add_parser("status", parents=[loud], help="the agent's status (its last saved state when it does not run)")
    status.add_argument("--json", action="store_true", help="one JSON object: agent, saved, state_file, status")
    return parser


# -- the narrow door: what may run through sudo --------------------------------

# The forms the desktop agent runs through sudo; the sudoers rule install
# writes allows a subset of them (agent.install.agent_argvs).
# Through sudo the caller may be anyone the sudoers rule lets in, so only the
# options that cannot change what is read, written or run pass: the system
# configuration decides those. The agent's rule allows fewer still
# (agent.install.agent_argvs); an administrator may run these forms.
SUDO_FORMS: dict[str, str] = {
    "backup": "backup [--json] [--disk NAME | -c NAME | -m DIR] [-n] [-q|-v] [--disable-notifications]",
    "init": "init --disk NAME [--yes] [-q|-v]",
    "eject": "eject --disk NAME [--json] [-q|-v]",
    "list": "list [--json] [-q|-v]",
    "rotate": "rotate [-n] [--json] [-q|-v]",
}
_SUDO_DESTS: dict[str, frozenset[str]] = {
    "backup": frozenset({"json", "disk", "crypto", "mount", "dry_run", "quiet", "verbose", "disable_notifications"}),
    "init": frozenset({"disk", "yes", "quiet", "verbose"}),
    "eject": frozenset({"disk", "json", "quiet", "verbose"}),
    "list": frozenset({"json", "quiet", "verbose"}),
    "rotate": frozenset({"json", "dry_run", "quiet", "verbose"}),
}
# Run by an administrator with sudo (they check for root themselves), or
# harmless: they only talk to the user's agent.
_SUDO_ADMIN_COMMANDS = frozenset({"install", "uninstall", "now", "stop", "status"})


def sudo_door(command: str) -> str:
    """The second half of every through-sudo refusal: what is accepted instead."""
    forms = SUDO_FORMS.get(command)
    accepted = forms if forms is not None else "; ".join(SUDO_FORMS.values())
    return (
        f"through sudo only the forms that cannot change what is read, written or run are accepted ({accepted}); "
        "run as root directly for anything else"
    )


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found: argparse.ArgumentParser = action.choices[name]
            return found
    raise LookupError(name)


def through_sudo_refusal(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> str | None:
    """Why this command line must not run through sudo, in one line, or None (pure).

    Default deny: any option given with a value other than its default is
    refused by name unless :data:`_SUDO_DESTS` allows it, so an option added
    later is refused until someone decides it is safe.
    """
    command = args.command
    if command in _SUDO_ADMIN_COMMANDS:
        return None
    door = sudo_door(command)
    allowed = _SUDO_DESTS.get(command)
    if allowed is None:
        return f"`{command}` is not accepted through sudo: {door}"
    sub = _subparser(parser or build_parser(), command)
    known = {"command", "help"}
    for action in sub._actions:
        known.add(action.dest)
        if action.dest in allowed or action.dest == "help":
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        if action.option_strings:
            what = "/".join(action.option_strings)
        elif command == "backup":  # SOURCE and DESTINATION: one given alone is the DESTINATION
            what = f"the SOURCE/DESTINATION argument {value}"
        else:
            what = f"the {action.metavar or action.dest} argument {value}"
        if action.dest == "config":
            return f"{what} is not accepted through sudo (the cycle reads only {SYSTEM_CONFIG}): {door}"
        return f"{what} is not accepted through sudo: {door}"
    for dest in vars(args):
        if dest not in known and dest not in allowed:
            return f"{dest} is not accepted through sudo: {door}"
    return None


# -- helpers -------------------------------------------------------------------


class JournalFormatter(logging.Formatter):
    """Prefixes each line with its syslog priority (``<4>``), which journald
    reads from a service's stderr, so the journal keeps the levels."""

    PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def format(self, record: logging.LogRecord) -> str:
        priority = self.PRIORITIES.get(record.levelno, 6)
        return f"<{priority}>{record.getMessage()}"


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    # systemd sets JOURNAL_STREAM when stderr is the journal (the user unit).
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter("backup-agent: %(message)s"))
    root = logging.getLogger("agent")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _load(args: argparse.Namespace) -> Settings:
    return load_settings(args.config, through_sudo=running_through_sudo())


def _repository_path(given: str | None, settings: Settings) -> str:
    path = given or settings.repository
    if not path:
        raise UsageError("no repository: give DESTINATION (or REPOSITORY), or set [backup] repository in the config")
    return os.path.abspath(path)


@dataclasses.dataclass
class _Signals:
    """Turns the first SIGINT/SIGTERM into an exception; later ones are logged."""

    received: int | None = None

    def install(self) -> Callable[[], None]:
        previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

        def restore() -> None:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        return restore

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            log.warning("received %s again; still cleaning up", signal.Signals(signum).name)
            return
        self.received = signum
        raise Interrupted(signum)


# -- subcommands -----------------------------------------------------------------


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


def cmd_backup(args: argparse.Namespace) -> int:
    if running_through_sudo():
        refusal = through_sudo_refusal(args)  # main() checked already; this keeps cmd_backup safe on its own
        if refusal is not None:
            raise UsageError(refusal)
    if args.tunnel:
        raise NotAvailableError(
            "--tunnel (an rsync daemon over SSH) is not available in this version: "
            "back up to a local disk or a mounted directory instead"
        )
    check_platform(args.force)
    if os.geteuid() != 0 and not args.no_sudo:
        raise UsageError(
            "backing up needs root to read every file and keep owners: run it with sudo, "
            "or pass --no-sudo to back up as this user"
        )
    settings = _load(args)
    source, destination = args.source, args.destination
    if source is not None and destination is None:
        source, destination = None, source
    overrides: dict[str, Any] = {}
    if source is not None:
        overrides["source"] = os.path.abspath(source)
    if args.ionice:
        overrides["ionice"] = args.ionice
    if args.multi_fs:
        overrides["one_file_system"] = False
    if args.disable_notifications:
        overrides["notifications"] = False
    if args.exclude:
        for pattern in args.exclude:
            if not pattern or "\n" in pattern or "\0" in pattern:
                raise UsageError(f"--exclude {pattern!r}: give a non-empty rsync pattern on one line")
        overrides["exclude"] = effective_excludes(settings) + tuple(args.exclude)
    settings = dataclasses.replace(settings, **overrides)
    steps = frozenset(s for s in STEPS if getattr(args, s)) or frozenset(STEPS)
    disk = select_disk(settings, name=args.disk, crypto=args.crypto, mount=args.mount)
    if disk is not None and destination is not None:
        raise UsageError(f"give either DESTINATION or a disk ({disk.name}), not both: the disk's repository is {disk.repository}")
    if disk is None and destination is None and settings.repository is None and settings.disks:
        disk = _present_disk(settings, quiet=args.quiet)
        if disk is None:
            return _no_disk(settings, interactive=sys.stdin.isatty())
    request = Request(
        settings=settings,
        source=settings.source,
        repository=disk.repository if disk is not None else _repository_path(destination, settings),
        steps=steps,
        dry_run=args.dry_run,
        disk=disk,
        interactive=sys.stdin.isatty(),
    )
    emitter = Emitter(sys.stdout if args.json else None)
    outcome = Cycle(request, emitter, Runner(dry_run=args.dry_run)).run()
    # From a timer (no terminal), "nothing to do" is the one log line already written.
    if not args.json and not args.quiet and (outcome.skipped is None or request.interactive):
        print(_summary(outcome, request))
    return EXIT_PARTIAL if outcome.partial else EXIT_OK


def _present_disk(settings: Settings, *, quiet: bool) -> Disk | None:
    """Without --disk: the first configured disk that is attached."""
    present = disks.present_disks(settings, Runner())
    if present and len(present) > 1 and not quiet:
        log.info("several backup disks are attached; using %s", present[0][0].name)
    return present[0][0] if present else None


def _no_disk(settings: Settings, *, interactive: bool) -> int:
    described = "; ".join(f"{d.name} (LUKS UUID {d.luks_uuid})" for d in settings.disks)
    message = f"no configured backup disk is attached: looked for {described}"
    if interactive:
        raise DiskMissingError(message + "; plug one in (`blkid` lists the UUIDs of attached disks)")
    log.info("%s", message)
    return EXIT_OK


def _summary(outcome: Any, request: Request) -> str:
    stats = outcome.statistics or {}
    prefix = "dry run: would make" if request.dry_run else "made"
    parts = []
    if outcome.skipped:
        return f"nothing done: {outcome.skipped}"
    if outcome.snapshot and "backup" in request.steps:
        parts.append(
            f"{prefix} snapshot {outcome.snapshot}: {stats.get('files', 0)} files, "
            f"{stats.get('transferred_files', 0)} changed ({human_size(stats.get('transferred_size', 0))})"
        )
    elif outcome.snapshot:
        parts.append(f"completed snapshot {outcome.snapshot}")
    if outcome.partial:
        parts.append("PARTIAL: some files could not be read (see warnings)")
    if outcome.flagged:
        parts.append("FLAGGED: " + outcome.flagged)
    if outcome.plan is not None:
        verb = "would delete" if request.dry_run else "deleted"
        parts.append(f"rotation kept {len(outcome.plan.keep)}, {verb} {len(outcome.plan.delete)}")
    parts.append(f"in {outcome.duration:.1f} s")
    return "; ".join(parts)


def cmd_list(args: argparse.Namespace) -> int:
    settings = _load(args)
    repo = Repository.open(_repository_path(args.repository, settings))
    rows = []
    for name in repo.snapshot_names():
        metadata = repo.read_metadata(name) or {}
        rows.append({"name": name, "path": repo.snapshot_path(name), **{k: v for k, v in metadata.items() if k != "name"}})
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return EXIT_OK
    if not rows:
        print(f"{repo.root}: no snapshots yet")
        return EXIT_OK
    latest = repo.latest_name()
    print(f"{'SNAPSHOT':<26} {'FILES':>9} {'CHANGED':>9} {'SIZE':>10} {'TOOK':>7}  NOTES")
    for row in rows:
        stats = row.get("statistics") or {}
        notes = [n for n, on in (("latest", row["name"] == latest), ("partial", row.get("partial")), ("flagged", row.get("flagged"))) if on]
        if not row.get("state"):
            notes.append("no metadata")
        took = f"{row['duration']:.0f}s" if isinstance(row.get("duration"), (int, float)) else "?"
        print(
            f"{row['name']:<26} {stats.get('files', '?'):>9} {stats.get('transferred_files', '?'):>9} "
            f"{human_size(stats.get('total_size', 0)):>10} {took:>7}  {', '.join(notes)}"
        )
    in_progress = repo.in_progress_names()
    if in_progress:
        print(f"unfinished transfers (resumed by the next backup): {', '.join(in_progress)}")
    return EXIT_OK


def cmd_init(args: argparse.Namespace) -> int:
    """Create the repository and its marker on a disk, and record its id for this machine."""
    if os.geteuid() != 0:
        raise UsageError("init unlocks and mounts the disk and needs root: run it with sudo")
    settings = _load(args)
    disk = select_disk(settings, name=args.disk, crypto=None, mount=None)
    if disk is None:  # --disk is required, so this is only for the type checker
        raise UsageError("init needs --disk NAME")
    runner = Runner()
    device = disks.find_device(disk, settings, runner)
    if device is None:
        raise DiskMissingError(
            f"backup disk {disk.name} is not attached (looked for the LUKS partition with UUID {disk.luks_uuid}): plug it in"
        )
    recorded = disks.recorded_id(settings, disk)
    with contextlib.ExitStack() as stack:
        stack.enter_context(lock.hold(lock.machine_lock_path(), {"pid": os.getpid(), "command": "init"}))
        stack.enter_context(disks.unlocked(disk, settings, runner, log.warning))
        stack.enter_context(disks.mounted(disk, settings, runner, log.warning))
        disks.verify_mount(disk)
        state = classify(disk.repository)
        if state == "repository":
            marker = Repository.open(disk.repository).marker
            if marker.id == recorded:
                print(f"{disk.repository} is already this machine's repository on {disk.name} (id {marker.id}): nothing to do")
                return EXIT_OK
            raise RepositoryError(
                f"{disk.repository} already holds a repository (id {marker.id}, host {marker.host}) that this machine "
                f"has not recorded for {disk.name}: nothing was written; if it is yours, "
                f"record it with: echo {marker.id} > {disks.id_path(settings, disk)}"
            )
        if state == "foreign":
            raise RepositoryError(
                f"{disk.repository} exists and is not empty: nothing was written; give [[disk]] repository another path"
            )
        print(f"backup disk {disk.name}: {device}, unlocked as {disk.mapped_device}, mounted on {disk.mount_point}")
        print(f"will create the repository {disk.repository} (snapshots/, metadata/, and a marker with a new random id)")
        print(f"and record its id in {disks.id_path(settings, disk)}" + (f", replacing {recorded}" if recorded else ""))
        if not args.yes:
            if not sys.stdin.isatty():
                raise UsageError("init asks before writing to a disk: pass --yes to confirm when there is no terminal")
            if input("proceed? [y/N] ").strip().lower() not in ("y", "yes"):
                print("nothing written")
                return EXIT_OK
        repo = Repository.create(disk.repository)
        disks.record_id(settings, disk, repo.marker.id)
        print(f"initialised {disk.repository} (id {repo.marker.id}); back up with: backup-agent backup --disk {disk.name}")
    return EXIT_OK


def cmd_eject(args: argparse.Namespace) -> int:
    """Unmount and lock a configured disk now, whoever opened it (the tray's Eject)."""
    if os.geteuid() != 0:
        raise UsageError("eject unmounts and locks the disk and needs root: run it with sudo")
    settings = _load(args)
    disk = select_disk(settings, name=args.disk, crypto=None, mount=None)
    if disk is None:  # --disk is required, so this is only for the type checker
        raise UsageError("eject needs --disk NAME")
    emitter = Emitter(sys.stdout if args.json else None)
    closed_now = Eject(disk, settings, emitter, Runner()).run()
    if not args.json and not args.quiet:
        if closed_now:
            print(f"{disk.name} is unmounted and locked: safe to unplug")
        else:
            print(f"{disk.name} is locked and not mounted: already safe to unplug")
    return EXIT_OK


def _plan_json(plan: Plan) -> str:
    return json.dumps({"keep": {k: list(v) for k, v in plan.keep.items()}, "delete": list(plan.delete)}, indent=2)


def cmd_rotate(args: argparse.Namespace) -> int:
    settings = _load(args)
    given = {f: getattr(args, f) for f in FREQUENCIES if getattr(args, f) is not None}
    scheme = settings.rotation
    if given:
        counts = {f: c for f, c in given.items() if c != 0}
        if not counts:
            raise UsageError("every count is 0: that scheme would delete every snapshot but the newest; give a count of 1 or more")
        scheme = Scheme(counts=counts, prefer_recent=scheme.prefer_recent, strict=scheme.strict)
    if args.prefer_recent:
        scheme = dataclasses.replace(scheme, prefer_recent=True)
    if args.relaxed:
        scheme = dataclasses.replace(scheme, strict=False)
    settings = dataclasses.replace(settings, rotation=scheme)
    request = Request(
        settings=settings,
        source=settings.source,
        repository=_repository_path(args.repository, settings),
        steps=frozenset({"rotate"}),
        dry_run=args.dry_run,
    )
    outcome = Cycle(request, Emitter(None), Runner(dry_run=args.dry_run)).run()
    plan = outcome.plan or Plan(keep={}, delete=())
    if args.json:
        print(_plan_json(plan))
        return EXIT_OK
    for name, reasons in plan.keep.items():
        print(f"keep    {name}  ({', '.join(reasons)})")
    verb = "would delete" if args.dry_run else "deleted"
    for name in plan.delete:
        print(f"{verb:<7} {name}")
    return EXIT_OK


def cmd_install(args: argparse.Namespace) -> int:
    # sys.argv[0]: the file this process was started as, not a PATH lookup.
    return installer.install(user=args.user, dry_run=args.dry_run, argv0=sys.argv[0])


def cmd_uninstall(args: argparse.Namespace) -> int:
    return installer.uninstall(dry_run=args.dry_run)


def cmd_run(args: argparse.Namespace) -> int:
    from . import daemon  # pyudev and asyncio only for this command

    return daemon.main(config=args.config, no_sudo=args.no_sudo, argv0=sys.argv[0])


def cmd_now(args: argparse.Namespace) -> int:
    from .dbus import client  # dbus_fast only for these commands

    return client.run_now()


def cmd_stop(args: argparse.Namespace) -> int:
    from .dbus import client

    return client.run_stop()


def cmd_status(args: argparse.Namespace) -> int:
    from .dbus import client

    return client.run_status(args.json)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "backup": cmd_backup,
    "init": cmd_init,
    "eject": cmd_eject,
    "list": cmd_list,
    "rotate": cmd_rotate,
    "install": cmd_install,
    "uninstall": cmd_uninstall,
    "run": cmd_run,
    "now": cmd_now,
    "stop": cmd_stop,
    "status": cmd_status,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    signals = _Signals()
    restore = signals.install()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        if running_through_sudo():
            refusal = through_sudo_refusal(args, parser)
            if refusal is not None:
                raise UsageError(refusal)
        _setup_logging(args.verbose, args.quiet)
        return COMMANDS[args.command](args)
    except BackupAgentError as exc:
        print(("<3>" if os.environ.get("JOURNAL_STREAM") else "") + _error_line(exc), file=sys.stderr)
        return exc.exit_code
    finally:
        restore()


def _error_line(exc: BackupAgentError) -> str:
    line = f"backup-agent: {exc.message}"
    if exc.step and exc.step not in ("config",):
        line = f"backup-agent: {exc.step} failed: {exc.message}"
    if exc.snapshots_untouched:
        line += " (earlier snapshots are untouched)"
    return line


if __name__ == "__main__":
    sys.exit(main())
