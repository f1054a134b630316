"""Command-line front end: each subcommand is a thin call into the layers below.

Errors the user can act on (:class:`BackupAgentError`) print one line and exit
with their own status; anything else is a bug and gets a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import os
import pwd
import signal
import socket
import sys
import time
from types import FrameType
from typing import Any, Callable, Sequence

from agent import __version__
from agent.disk import access, browse
from agent.engine import channels, history, reports, stale
from agent.core import when
from agent.engine import restore as restoring
from agent.engine import verify as verifier
from agent.engine.sysstate import packages as sysstate_packages
from agent.engine import offsite
from agent.core.commands import IONICE_CLASSES, Runner
from agent.disk.find import find_device, first_present, none_attached, select_disk
from agent.disk.identity import id_path, record_id, recorded_id, verify_mount
from agent.disk.mount import mounted
from agent.disk.passphrase import read_passphrase, wipe
from agent.disk.unlock import unlocked
from agent.system import install as installer
from agent.core import lock
from agent.config.load import SYSTEM_CONFIG, load_settings
from agent.config.model import Disk, Offsite, Settings, effective_excludes
from agent.config.trust import running_through_sudo
from agent.config.validate import check_exclude
from agent.engine.btrfs import detect_layout
from agent.engine.metered import NetworkManagerMetered
from agent.engine.cycle import STEPS, Cycle, Outcome, Request, check_platform, human_size
from agent.core.errors import (
    EXIT_DAMAGED,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_STALE,
    EXIT_UNVERIFIED,
    BackupAgentError,
    DiskMissingError,
    Interrupted,
    NotAvailableError,
    RepositoryError,
    StepError,
    UsageError,
)
from agent.disk.eject import Eject
from agent.core.events import Emitter, error
from agent.repository.store import Repository, classify
from agent.repository.remote import (
    Remote,
    RemoteRepository,
    as_configured,
    is_daemon_destination,
    opened_for_reading,
    parse_destination,
    rsync_shell,
)
from agent.repository.remote import named as remote_named
from agent.engine.remote import RemoteCycle, kind_finder, remote_request, remote_snapshots
from agent.engine import remote_read
from agent.repository.daemon import (
    Daemon,
    DaemonRepository,
    configured_daemon,
    daemon_as_configured,
    daemon_name,
    daemon_options,
    parse_daemon_destination,
    parse_tunnel,
)
from agent.policy.rotation import FREQUENCIES, Count, Plan, Scheme

log = logging.getLogger("agent")


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of exiting, so errors stay one line."""

    def error(self, message: str) -> Any:
        # The CLI prefixes every error line with "backup-agent: "; name the subcommand only.
        command = self.prog.removeprefix("backup-agent").strip()
        raise UsageError(f"{command + ': ' if command else ''}{message} (see {self.prog} --help)")


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


def _offsite_options(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--offsite", action="store_true", help=what)
    parser.add_argument("--offsite-name", metavar="NAME", help="which [[offsite]] (default: the first)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="backup-agent", description="Hard-linked rsync snapshots on a backup disk.")
    parser.add_argument("--version", action="version", version=f"backup-agent {__version__}")
    # The global options are accepted before the subcommand as well as after
    # it. After it they default to SUPPRESS, so a subcommand that does not
    # repeat them keeps what was given before it.
    parser.add_argument("--config", metavar="FILE", help="read this config instead of /etc/backup-agent/config.toml")
    parser.add_argument("-v", "--verbose", action="store_true", help="say more (every command run, rsync's output)")
    parser.add_argument("-q", "--quiet", action="store_true", help="say only warnings and errors")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")

    common = _Parser(add_help=False)
    common.add_argument(
        "--config", metavar="FILE", default=argparse.SUPPRESS, help="read this config instead of /etc/backup-agent/config.toml"
    )
    common.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="say more (every command run, rsync's output)"
    )
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="say only warnings and errors")

    backup = sub.add_parser("backup", parents=[common], help="run a backup cycle", description="Run a backup cycle.")
    backup.add_argument("-b", "--backup", action="store_true", help="transfer into a new <name>.in-progress")
    backup.add_argument("-s", "--snapshot", action="store_true", help="complete the finished transfer as a snapshot")
    backup.add_argument("-r", "--rotate", action="store_true", help="rotate old snapshots (none of -b/-s/-r: all three)")
    backup.add_argument("-m", "--mount", metavar="DIRECTORY", help="mount the backup filesystem first")
    backup.add_argument("-c", "--crypto", metavar="NAME", help="unlock the encrypted backup disk first")
    backup.add_argument("-t", "--tunnel", metavar="TUNNEL_SPEC", help="reach an rsync daemon over SSH")
    backup.add_argument("--disk", metavar="NAME", help="back up to this configured disk")
    backup.add_argument("--remote", metavar="NAME", help="back up to this configured [[remote]] over ssh")
    backup.add_argument("-i", "--ionice", metavar="CLASS", choices=sorted((*IONICE_CLASSES, "none")), help="I/O class for rsync and rm")
    backup.add_argument("-u", "--no-sudo", action="store_true", help="run as the current user (no root needed)")
    backup.add_argument("-n", "--dry-run", action="store_true", help="write nothing anywhere; say what would happen")
    backup.add_argument("--multi-fs", action="store_true", help="cross filesystem boundaries")
    backup.add_argument("-x", "--exclude", metavar="PATTERN", action="append", default=[], help="rsync exclude pattern (repeatable)")
    backup.add_argument("-f", "--force", action="store_true", help="run on a system other than Linux")
    backup.add_argument("--disable-notifications", action="store_true", help="no desktop notifications for this run")
    backup.add_argument("--json", action="store_true", help="write events as JSON lines on stdout")
    backup.add_argument(
        "--passphrase-stdin", action="store_true", help="unlock the disk with the passphrase on standard input (crypttab gives no key file)"
    )
    backup.add_argument("source", nargs="?", metavar="SOURCE", help="directory to back up (default: config, else /)")
    backup.add_argument("destination", nargs="?", metavar="DESTINATION", help="the repository directory")

    init = sub.add_parser("init", parents=[common], help="create the repository on a new backup disk")
    init_what = init.add_mutually_exclusive_group(required=True)
    init_what.add_argument("--disk", metavar="NAME", help="the configured disk to initialise")
    init_what.add_argument("--offsite", metavar="NAME", help="create (or adopt) the restic repository of this [[offsite]]")
    init.add_argument("-y", "--yes", action="store_true", help="do it without asking")

    listing = sub.add_parser("list", parents=[common], help="list the snapshots of a repository")
    listing.add_argument("--json", action="store_true", help="one JSON array of snapshots")
    listing.add_argument("--disk", metavar="NAME", help="list this configured disk (default: the one attached)")
    listing.add_argument("--remote", metavar="NAME", help="list this configured [[remote]] over ssh")
    listing.add_argument("repository", nargs="?", metavar="REPOSITORY")
    _offsite_options(listing, "list the snapshots of the off-site repository (no disk needed)")

    rotate = sub.add_parser("rotate", parents=[common], help="rotate old snapshots now")
    rotate.add_argument("-n", "--dry-run", action="store_true", help="show the plan; delete nothing")
    rotate.add_argument("--json", action="store_true", help='print {"keep": {...}, "delete": [...]}')
    for frequency in FREQUENCIES:
        rotate.add_argument(f"--{frequency}", type=_count, metavar="N", help=f'{frequency} snapshots to keep (or "always")')
    rotate.add_argument("--prefer-recent", action="store_true", default=None, help="keep the newest of each period")
    rotate.add_argument("--relaxed", action="store_true", help="count periods, not time since the newest")
    rotate.add_argument(
        "--discard-unfinished", action="store_true", help="delete the unfinished transfer too (else kept to resume from)"
    )
    rotate.add_argument("--disk", metavar="NAME", help="rotate this configured disk (default: the one attached)")
    rotate.add_argument("--remote", metavar="NAME", help="rotate this configured [[remote]] over ssh")
    rotate.add_argument("repository", nargs="?", metavar="REPOSITORY")

    reading = _Parser(add_help=False)
    reading.add_argument("--repository", metavar="DIR", help="read the repository at DIR (no disk is opened)")
    reading.add_argument("--disk", metavar="NAME", help="read this configured disk (default: the one attached)")

    versions = sub.add_parser(
        "versions", parents=[common, reading], help="every version of a file or directory across the snapshots"
    )
    versions.add_argument("--json", action="store_true", help="one JSON object: path, versions")
    versions.add_argument("path", metavar="PATH", help="as it is (or was) on this machine; relative to here")
    versions.add_argument("--remote", metavar="NAME", help="read this configured [[remote]] over ssh")
    _offsite_options(versions, "look in the off-site repository (no disk needed)")

    differ = sub.add_parser("diff", parents=[common, reading], help="what changed between two snapshots")
    differ.add_argument("--json", action="store_true", help="one JSON object: a, b, source, changes")
    differ.add_argument("a", nargs="?", metavar="A", help="the older snapshot (default: the one before the newest)")
    differ.add_argument("b", nargs="?", metavar="B", help="the newer snapshot (default: the newest)")
    differ.add_argument("--remote", metavar="NAME", help="read this configured [[remote]] over ssh")

    restore = sub.add_parser(
        "restore", parents=[common, reading], help="copy files or trees back out of a snapshot, every attribute kept"
    )
    when = restore.add_mutually_exclusive_group()
    when.add_argument("--snapshot", metavar="NAME", help="from this snapshot (default: the newest that holds the path)")
    when.add_argument("--at", metavar="TIME", help='as it was at TIME: "yesterday 14:00", "2 days ago", "2026-11-20"')
    where = restore.add_mutually_exclusive_group()
    where.add_argument("--to", metavar="DIR", help="into DIR (default: a new restored-<snapshot> beside the original)")
    where.add_argument("--in-place", action="store_true", help="back where it was; what is there now is moved aside")
    restore.add_argument("-n", "--dry-run", action="store_true", help="say what would be restored where; change nothing")
    restore.add_argument("paths", nargs="+", metavar="PATH", help="as it is (or was) on this machine; relative to here")
    restore.add_argument("--remote", metavar="NAME", help="restore from this configured [[remote]] (ssh or an rsync daemon)")
    _offsite_options(restore, "restore from the off-site repository (no disk needed)")

    packaged = sub.add_parser(
        "packages",
        parents=[common, reading],
        help="the packages a snapshot recorded as installed, what changed between two, and how to reinstall them",
        description=(
            "Read the package lists stored with each snapshot (.backup-agent/packages/): the packages installed "
            "then, those installed on purpose and the commands that install them again on a fresh system; with "
            "--diff, what was added, removed and upgraded between two snapshots."
        ),
    )
    packaged_which = packaged.add_mutually_exclusive_group()
    packaged_which.add_argument("--snapshot", metavar="NAME", help="this snapshot (default: the newest)")
    packaged_which.add_argument("--diff", nargs=2, metavar=("A", "B"), help="what changed from snapshot A to snapshot B")
    packaged.add_argument("--json", action="store_true", help="one JSON object")

    verify = sub.add_parser(
        "verify",
        parents=[common, reading],
        help="read snapshots back and check them against their manifests",
        description="Read snapshots back and report every file whose content no longer matches its manifest.",
    )
    verify.add_argument("snapshot", nargs="?", metavar="SNAPSHOT", help="the snapshot to check (default: the latest)")
    verify.add_argument("--all", action="store_true", help="check every snapshot")
    verify.add_argument("--json", action="store_true", help="one JSON object for scripts")
    verify.add_argument("--remote", metavar="NAME", help="verify this configured [[remote]] over ssh (hashed on the server)")

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

    opening = sub.add_parser(
        "open",
        parents=[common],
        help="unlock and mount a backup disk read-only for browsing (run it with sudo)",
        description=(
            "Unlock a backup disk and mount it read-only, nosuid, nodev, noexec, and leave it so: its snapshots "
            "can then be read with a file manager, and versions, diff and restore --repository run without root. "
            "Eject closes it again."
        ),
    )
    opening.add_argument("--disk", metavar="NAME", required=True, help="the configured disk to open")
    opening.add_argument("--json", action="store_true", help="write events as JSON lines on stdout")
    opening.add_argument(
        "--passphrase-stdin", action="store_true", help="unlock the disk with the passphrase on standard input (crypttab gives no key file)"
    )

    loud = _Parser(add_help=False)
    loud.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="say more (every command run)")
    loud.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="say only warnings and errors")
    install = sub.add_parser(
        "install",
        parents=[loud],
        help="put the sudo rule, the udev rule and the user unit in place (run it with sudo)",
        description=(
            f"Write {installer.DROP_IN}: USER may run this backup-agent as root, without a password, only as "
            "`backup --json`, and `backup --json --disk NAME`, `eject --json --disk NAME` and `open --json --disk NAME` "
            "for each configured disk; "
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
    run.add_argument("--disable-notifications", action="store_true", help="no desktop notifications (whatever the config says)")
    now = sub.add_parser("now", parents=[loud], help="ask the running agent to back up now (D-Bus)")
    now.add_argument("--disk", metavar="NAME", help="this configured disk (default: the first one attached)")
    stopping = sub.add_parser("stop", parents=[loud], help="ask the running agent to stop the running backup (D-Bus)")
    for told in (now, stopping):  # the launcher (backup-agent.desktop) runs them where no terminal shows the answer
        told.add_argument("--notify", action="store_true", help="also show the answer as a desktop notification")
    sub.add_parser(
        "check-stale",
        parents=[common],
        help="report through [[report]] when no backup succeeded for remind_after days (for a system timer)",
        description="Report through the [[report]] channels when no backup succeeded for [notifications] remind_after days.",
    )
    status = sub.add_parser("status", parents=[loud], help="the agent's status (its last saved state when it does not run)")
    status.add_argument("--json", action="store_true", help="one JSON object: agent, saved, state_file, status")
    return parser


# -- the narrow door: what may run through sudo --------------------------------

# The forms the desktop agent runs through sudo; the sudoers rule install
# writes allows a subset of them (agent.system.install.agent_argvs).
# Through sudo the caller may be anyone the sudoers rule lets in, so only the
# options that cannot change what is read, written or run pass: the system
# configuration decides those. The agent's rule allows fewer still
# (agent.system.install.agent_argvs); an administrator may run these forms.
SUDO_FORMS: dict[str, str] = {
    "backup": "backup [--json] [--disk NAME [--passphrase-stdin] | --remote NAME | -c NAME | -m DIR] [-n] [-q|-v] [--disable-notifications]",
    "init": "init --disk NAME | --offsite NAME [--yes] [-q|-v]",
    "eject": "eject --disk NAME [--json] [-q|-v]",
    "open": "open --disk NAME [--json] [--passphrase-stdin] [-q|-v]",
    "list": "list [--json] [--disk NAME | --remote NAME | --offsite [--offsite-name NAME]] [-q|-v]",
    "rotate": "rotate [-n] [--json] [--disk NAME | --remote NAME] [--discard-unfinished] [-q|-v]",
    "versions": "versions [--json] [--disk NAME | --remote NAME | --offsite [--offsite-name NAME]] PATH [-q|-v]",
    "diff": "diff [--json] [--disk NAME | --remote NAME] [A] [B] [-q|-v]",
    "restore": "restore [--disk NAME] [--snapshot NAME | --at TIME] [-n] PATH... [-q|-v] (into a new restored-<snapshot> directory)",
    "verify": "verify [SNAPSHOT | --all] [--disk NAME | --remote NAME] [--json] [-q|-v]",
    "packages": "packages [--snapshot NAME | --diff A B] [--disk NAME] [--json] [-q|-v]",
}
_SUDO_DESTS: dict[str, frozenset[str]] = {
    # --passphrase-stdin: the passphrase only ever reaches `cryptsetup open` of
    # the configured disk's LUKS partition (README, "A disk with a passphrase").
    "backup": frozenset(
        {"json", "disk", "remote", "crypto", "mount", "dry_run", "quiet", "verbose", "disable_notifications", "passphrase_stdin"}
    ),
    "init": frozenset({"disk", "offsite", "yes", "quiet", "verbose"}),
    "eject": frozenset({"disk", "json", "quiet", "verbose"}),
    "open": frozenset({"disk", "json", "quiet", "verbose", "passphrase_stdin"}),
    "list": frozenset({"json", "disk", "remote", "offsite", "offsite_name", "quiet", "verbose"}),
    "rotate": frozenset({"json", "dry_run", "disk", "remote", "discard_unfinished", "quiet", "verbose"}),
    # Reading only, and restoring only into a new directory beside the
    # original (restore itself checks the caller owns that directory and
    # could reach the path): --repository, --to and --in-place choose what is
    # read or written, so they need a root shell.
    # --offsite reads the configured [[offsite]] repository only; restore --offsite writes, so it needs a root shell.
    # --remote reads the configured [[remote]] only, with root's key (as list does); restore --remote writes
    # without the caller checks a disk's restore makes, so it needs a root shell.
    "versions": frozenset({"json", "disk", "remote", "offsite", "offsite_name", "path", "quiet", "verbose"}),
    "diff": frozenset({"json", "disk", "remote", "a", "b", "quiet", "verbose"}),
    "restore": frozenset({"disk", "snapshot", "at", "dry_run", "paths", "quiet", "verbose"}),
    # Read-only; SNAPSHOT must be one of the repository's snapshot names.
    # --repository is refused: root would read and report on any directory.
    "verify": frozenset({"snapshot", "all", "disk", "remote", "json", "quiet", "verbose"}),
    # Read-only; the names must be the repository's snapshots.
    "packages": frozenset({"snapshot", "diff", "disk", "json", "quiet", "verbose"}),
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
    parser = parser or build_parser()
    sub = _subparser(parser, command)
    known = {"command", "help"}
    for action in sub._actions:
        known.add(action.dest)
        if action.dest in allowed or action.dest == "help":
            continue
        # A global option (SUPPRESS after the subcommand) has its default on the main parser.
        default = parser.get_default(action.dest) if action.default == argparse.SUPPRESS else action.default
        value = getattr(args, action.dest, default)
        if value == default:
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


def _setup_logging(verbose: bool, quiet: bool) -> logging.Handler:
    """The one handler of the "agent" logger for this command (main removes it when the command ends)."""
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
    return handler


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


def cmd_backup(args: argparse.Namespace) -> int:
    if running_through_sudo():
        refusal = through_sudo_refusal(args)  # main() checked already; this keeps cmd_backup safe on its own
        if refusal is not None:
            raise UsageError(refusal)
    given = args.destination if args.destination is not None else args.source
    if args.tunnel and (given is None or not is_daemon_destination(given)):
        raise UsageError(
            "--tunnel reaches an rsync daemon through ssh: give DESTINATION as rsync://host/module or host::module"
        )
    check_platform(args.force)
    if os.geteuid() != 0 and not args.no_sudo:
        raise UsageError(
            "backing up needs root to read every file and keep owners: run it with sudo, "
            "or pass --no-sudo to back up as this user"
        )
    settings = _load(args)
    source, destination = args.source, args.destination
    if source is not None and destination is None and not args.remote:  # with --remote, one path alone is the SOURCE
        source, destination = None, source
    overrides: dict[str, Any] = {}
    if source is not None:
        overrides["source"] = os.path.abspath(source)
        overrides["sources"] = ()  # a SOURCE given here replaces the configured [[source]] list
    elif args.exclude and settings.sources:
        raise UsageError("--exclude: the configuration lists [[source]] tables; give each its exclude there")
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
            try:
                check_exclude(pattern)
            except ValueError as error:
                raise UsageError(f"--exclude: {error}") from None
        overrides["exclude"] = effective_excludes(settings) + tuple(args.exclude)
    settings = dataclasses.replace(settings, **overrides)
    steps = frozenset(s for s in STEPS if getattr(args, s)) or frozenset(STEPS)
    daemon = parse_daemon_destination(destination) if destination is not None else None
    if daemon is None and args.remote is not None:
        daemon = configured_daemon(settings, args.remote)
    if daemon is not None:
        return _backup_daemon(args, settings, daemon, steps)
    remote = _remote_of(settings, args.remote, destination)
    if remote is not None:
        return _backup_remote(args, settings, remote, steps)
    disk = select_disk(settings, name=args.disk, crypto=args.crypto, mount=args.mount)
    if disk is not None and destination is not None:
        raise UsageError(f"give either DESTINATION or a disk ({disk.name}), not both: the disk's repository is {disk.repository}")
    if disk is None and destination is None and settings.repository is None and settings.disks:
        disk = first_present(settings, Runner())
        if disk is None:
            return _no_disk(settings, interactive=sys.stdin.isatty())
    if args.passphrase_stdin and disk is None:
        raise UsageError("--passphrase-stdin unlocks a configured disk: give --disk NAME too")
    passphrase = _passphrase(args)
    request = Request(
        settings=settings,
        source=settings.source,
        repository=disk.repository if disk is not None else _repository_path(destination, settings),
        steps=steps,
        dry_run=args.dry_run,
        disk=disk,
        interactive=sys.stdin.isatty() if passphrase is None else False,
        passphrase=passphrase,
    )
    # [[report]] channels hear a run that writes; a dry run reports nothing beyond its own output.
    chosen = channels.backup_channels(
        sys.stdout if args.json else None,
        None if args.dry_run else settings,
        host=socket.gethostname(),
        repository=request.repository,
    )
    try:
        with channels.reporting(chosen) as emitter:
            runner = Runner(dry_run=args.dry_run)  # busctl only reads: it runs in a dry run too
            outcome = Cycle(request, emitter, runner, metered=NetworkManagerMetered(runner)).run()
    finally:
        if passphrase is not None:
            wipe(passphrase)
    # From a timer (no terminal), "nothing to do" is the one log line already written.
    if not args.json and not args.quiet and (outcome.skipped is None or request.interactive):
        print(_summary(outcome, request))
    return EXIT_PARTIAL if outcome.partial else EXIT_OK


def _passphrase(args: argparse.Namespace) -> bytearray | None:
    """With --passphrase-stdin, the passphrase from standard input (a pipe: a terminal would show it)."""
    if not args.passphrase_stdin:
        return None
    if sys.stdin.isatty():
        raise UsageError("--passphrase-stdin reads the passphrase from a pipe, not a terminal: pipe it in")
    return read_passphrase(sys.stdin.fileno())


def _daemon_of(settings: Settings, name: str | None, given: str | None) -> Daemon | None:
    """The rsync daemon module ``--remote NAME`` or an ``rsync://`` REPOSITORY names, as configured; None otherwise."""
    if name is not None:
        return configured_daemon(settings, name)
    daemon = parse_daemon_destination(given) if given is not None else None
    return daemon_as_configured(settings, daemon) if daemon is not None else None


def _remote_of(settings: Settings, name: str | None, given: str | None) -> Remote | None:
    """The remote repository ``--remote NAME`` or a ``[user@]host:/path`` names; None for a local one."""
    if name is not None:
        if given is not None:
            raise UsageError(f"give either --remote {name} or a repository ({given}), not both")
        return remote_named(settings, name)
    remote = parse_destination(given) if given is not None else None
    return as_configured(settings, remote) if remote is not None else None


def _backup_daemon(args: argparse.Namespace, settings: Settings, daemon: Daemon, steps: frozenset[str]) -> int:
    """A backup into an rsync daemon's module (agent.repository.daemon), through an ssh tunnel with --tunnel."""
    if args.disk or args.crypto or args.mount:
        raise UsageError(f"{daemon.shown} is an rsync daemon: --disk, --crypto and --mount name a local disk; give one or the other")
    daemon = daemon_as_configured(settings, daemon)
    tunnel = as_configured(settings, parse_tunnel(args.tunnel), any_path=True) if args.tunnel else None
    runner = Runner(dry_run=args.dry_run)
    repository = DaemonRepository(daemon, runner, ssh=settings.commands.ssh, rsync=settings.commands.rsync, tunnel=tunnel)
    remote = dataclasses.replace(repository.remote, name=daemon_name(settings, daemon))
    request = dataclasses.replace(
        remote_request(settings, remote, steps=steps, dry_run=args.dry_run, interactive=sys.stdin.isatty()), repository=daemon.shown
    )
    chosen = channels.backup_channels(
        sys.stdout if args.json else None, None if args.dry_run else settings, host=socket.gethostname(), repository=daemon.shown
    )
    with channels.reporting(chosen) as emitter:
        outcome = RemoteCycle(request, emitter, runner, remote, ssh=settings.commands.ssh, repository=repository).run()
    if not args.json and not args.quiet:
        print(_summary(outcome, request))
    return EXIT_PARTIAL if outcome.partial else EXIT_OK


def _backup_remote(args: argparse.Namespace, settings: Settings, remote: Remote, steps: frozenset[str]) -> int:
    """A backup into a repository on a server over ssh (agent.engine.remote)."""
    if args.disk or args.crypto or args.mount:
        raise UsageError(f"{remote.shown} is a remote repository: --disk, --crypto and --mount name a local disk; give one or the other")
    request = remote_request(settings, remote, steps=steps, dry_run=args.dry_run, interactive=sys.stdin.isatty())
    chosen = channels.backup_channels(
        sys.stdout if args.json else None,
        None if args.dry_run else settings,
        host=socket.gethostname(),
        repository=request.repository,
    )
    with channels.reporting(chosen) as emitter:
        outcome = RemoteCycle(request, emitter, Runner(dry_run=args.dry_run), remote, ssh=settings.commands.ssh).run()
    if not args.json and not args.quiet:
        print(_summary(outcome, request))
    return EXIT_PARTIAL if outcome.partial else EXIT_OK


def _no_disk(settings: Settings, *, interactive: bool) -> int:
    message = none_attached(settings)
    if interactive:
        raise DiskMissingError(message + "; plug one in (`blkid` lists the UUIDs of attached disks)")
    log.info("%s", message)
    return EXIT_OK


def _summary(outcome: Outcome, request: Request) -> str:
    stats = outcome.statistics or {}
    prefix = "dry run: would make" if request.dry_run else "made"
    parts = []
    if outcome.skipped:
        return f"nothing done: {outcome.skipped}"
    if outcome.snapshot and "backup" in request.steps and "files" not in stats and not request.dry_run:
        parts.append(f"{prefix} snapshot {outcome.snapshot} (btrfs send: no per-file statistics)")
    elif outcome.snapshot and "backup" in request.steps:
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
    for copied in outcome.offsite:  # engine/offsite's Copied: said apart, an off-site failure is not the backup's
        if copied.state == "done":
            parts.append(f"copied off-site to {copied.name}")
        elif copied.state == "failed":
            parts.append(f"NOT copied off-site to {copied.name}: {copied.message}")
    return "; ".join(parts)


def cmd_list(args: argparse.Namespace) -> int:
    settings = _load(args)
    if args.offsite:
        return _list_offsite(args, settings)
    daemon = _daemon_of(settings, args.remote, args.repository)
    remote = _remote_of(settings, args.remote, args.repository) if daemon is None else None
    opened: contextlib.AbstractContextManager[Repository | RemoteRepository]
    if daemon is not None:
        opened = opened_for_reading(
            DaemonRepository(daemon, Runner(), ssh=settings.commands.ssh, rsync=settings.commands.rsync)
        )
    elif remote is not None:
        opened = opened_for_reading(RemoteRepository(remote, Runner(), ssh=settings.commands.ssh, rsync=settings.commands.rsync))
    else:
        opened = access.open_repository(
            settings, Runner(), repository=args.repository, disk=args.disk, warn=log.warning, command="list"
        )
    with opened as repo:
        rows = []
        for name in repo.snapshot_names():
            metadata = repo.read_metadata(name) or {}
            rows.append({"name": name, "path": repo.snapshot_path(name), **{k: v for k, v in metadata.items() if k != "name"}})
        latest = repo.latest_name()
        in_progress = repo.in_progress_names()
        root = repo.root
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return EXIT_OK
    if not rows:
        print(f"{root}: no snapshots yet")
        return EXIT_OK
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
    if in_progress:
        print(
            f"unfinished transfer (resumed by the next backup; rotate --discard-unfinished deletes it): {', '.join(in_progress)}"
        )
    return EXIT_OK


def _root_disk(args: argparse.Namespace, does: str) -> tuple[Settings, Disk]:
    """The settings and the disk named by --disk, for a command that opens or closes it as root."""
    if os.geteuid() != 0:
        raise UsageError(f"{args.command} {does} and needs root: run it with sudo")
    settings = _load(args)
    disk = select_disk(settings, name=args.disk, crypto=None, mount=None)
    if disk is None:  # --disk is required, so this is only for the type checker
        raise UsageError(f"{args.command} needs --disk NAME")
    return settings, disk


def cmd_init(args: argparse.Namespace) -> int:
    """Create the repository and its marker on a disk, and record its id for this machine."""
    if args.offsite:
        return _init_offsite(args)
    settings, disk = _root_disk(args, "unlocks and mounts the disk")
    if not args.yes and not sys.stdin.isatty():
        # Refused before anything is touched: asking needs a terminal.
        raise UsageError("init asks before writing to a disk: pass --yes to confirm when there is no terminal; nothing was touched")
    runner = Runner()
    device = find_device(disk, settings, runner)
    if device is None:
        raise DiskMissingError(
            f"backup disk {disk.name} is not attached (looked for the LUKS partition with UUID {disk.luks_uuid}): plug it in"
        )
    recorded = recorded_id(settings, disk)
    with contextlib.ExitStack() as stack:
        stack.enter_context(lock.hold(lock.machine_lock_path(), {"pid": os.getpid(), "command": "init"}))
        stack.enter_context(unlocked(disk, settings, runner, log.warning))
        stack.enter_context(mounted(disk, settings, runner, log.warning))
        verify_mount(disk)
        state = classify(disk.repository)
        if state == "repository":
            marker = Repository.open(disk.repository).marker
            if marker.id == recorded:
                print(f"{disk.repository} is already this machine's repository on {disk.name} (id {marker.id}): nothing to do")
                return EXIT_OK
            raise RepositoryError(
                f"{disk.repository} already holds a repository (id {marker.id}, host {marker.host}) that this machine "
                f"has not recorded for {disk.name}: nothing was written; if it is yours, "
                f"record it with: echo {marker.id} > {id_path(settings, disk)}"
            )
        if state == "foreign":
            raise RepositoryError(
                f"{disk.repository} exists and is not empty: nothing was written; give [[disk]] repository another path"
            )
        print(f"backup disk {disk.name}: {device}, unlocked as {disk.mapped_device}, mounted on {disk.mount_point}")
        # The layout is decided (and a forced btrfs on another filesystem refused) before anything is written.
        kind = detect_layout(disk.repository, disk.layout or settings.layout)
        print(
            f"will create the repository {disk.repository} (snapshots/, metadata/, and a marker with a new random id), "
            f"layout {kind}" + (" (read-only btrfs subvolume snapshots)" if kind == "btrfs" else " (hard links)")
        )
        print(f"and record its id in {id_path(settings, disk)}" + (f", replacing {recorded}" if recorded else ""))
        if not args.yes:
            if input("proceed? [y/N] ").strip().lower() not in ("y", "yes"):
                print("nothing written")
                return EXIT_OK
        repo = Repository.create(disk.repository, layout=kind)
        record_id(settings, disk, repo.marker.id)
        print(f"initialised {disk.repository} (id {repo.marker.id}); back up with: backup-agent backup --disk {disk.name}")
    return EXIT_OK


def cmd_eject(args: argparse.Namespace) -> int:
    """Unmount and lock a configured disk now, whoever opened it (the tray's Eject)."""
    settings, disk = _root_disk(args, "unmounts and locks the disk")
    emitter = Emitter(sys.stdout if args.json else None)
    closed_now = Eject(disk, settings, emitter, Runner()).run()
    if not args.json and not args.quiet:
        if closed_now:
            print(f"{disk.name} is unmounted and locked: safe to unplug")
        else:
            print(f"{disk.name} is locked and not mounted: already safe to unplug")
    return EXIT_OK


def cmd_open(args: argparse.Namespace) -> int:
    """Unlock and mount a configured disk read-only for browsing, and leave it so (the tray's Browse backups)."""
    settings, disk = _root_disk(args, "unlocks and mounts the disk")
    emitter = Emitter(sys.stdout if args.json else None)
    passphrase: bytearray | None = None
    try:
        passphrase = _passphrase(args)
        opened = browse.open_for_browsing(disk, settings, Runner(), emitter, log.warning, passphrase=passphrase)
    except BackupAgentError as exc:
        # Open never writes to a repository: every snapshot is untouched.
        emitter.emit(error(exc.step, exc.message, exc.exit_code, True))
        raise
    finally:
        if passphrase is not None:
            wipe(passphrase)
    if not args.json and not args.quiet:
        state = "opened" if opened else "already open"
        print(f"{disk.name} is {state}: its snapshots are in {os.path.join(disk.repository, 'snapshots')}")
        print(f"read them as yourself: backup-agent versions --repository {disk.repository} PATH; close it with eject")
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
    daemon = _daemon_of(settings, args.remote, args.repository)
    if daemon is not None:
        runner = Runner(dry_run=args.dry_run)
        repository = DaemonRepository(daemon, runner, ssh=settings.commands.ssh, rsync=settings.commands.rsync)
        module = dataclasses.replace(repository.remote, name=daemon_name(settings, daemon))
        request = dataclasses.replace(
            remote_request(settings, module, steps=frozenset({"rotate"}), dry_run=args.dry_run, discard_unfinished=args.discard_unfinished),
            repository=daemon.shown,
        )
        outcome = RemoteCycle(request, Emitter(None), runner, module, ssh=settings.commands.ssh, repository=repository).run()
        return _print_rotation(outcome, args)
    remote = _remote_of(settings, args.remote, args.repository)
    if remote is not None:
        request = remote_request(
            settings, remote, steps=frozenset({"rotate"}), dry_run=args.dry_run, discard_unfinished=args.discard_unfinished
        )
        outcome = RemoteCycle(request, Emitter(None), Runner(dry_run=args.dry_run), remote, ssh=settings.commands.ssh).run()
        return _print_rotation(outcome, args)
    # The configured disk, opened as a backup opens it (read-write), unless a repository is named.
    disk = select_disk(settings, name=args.disk, crypto=None, mount=None)
    if disk is not None and args.repository is not None:
        raise UsageError(f"give either REPOSITORY or --disk {disk.name}, not both")
    if disk is None and args.repository is None and settings.repository is None and settings.disks:
        if os.geteuid() != 0:
            raise UsageError("rotating the backup disk needs root (it is unlocked and mounted for it): run it with sudo")
        disk = first_present(settings, Runner())
        if disk is None:
            raise DiskMissingError(none_attached(settings) + "; plug one in, or give REPOSITORY")
    request = Request(
        settings=settings,
        source=settings.source,
        repository=disk.repository if disk is not None else _repository_path(args.repository, settings),
        steps=frozenset({"rotate"}),
        dry_run=args.dry_run,
        disk=disk,
        discard_unfinished=args.discard_unfinished,
    )
    outcome = Cycle(request, Emitter(None), Runner(dry_run=args.dry_run)).run()
    return _print_rotation(outcome, args)


def _print_rotation(outcome: Outcome, args: argparse.Namespace) -> int:
    if outcome.skipped and not args.json:
        print(f"nothing done: {outcome.skipped}")
        return EXIT_OK
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


def _not_on_a_server(args: argparse.Namespace) -> None:
    """What reads snapshots as local trees only: an rsync daemon (versions, diff, verify: it runs no command for
    us) and any server (packages) are refused by name (exit 8)."""
    given = args.repository
    if given and args.command in ("versions", "diff", "verify") and is_daemon_destination(given):
        raise NotAvailableError(
            f"{args.command} does not read an rsync daemon ({given}): it runs no command for its client; restore the path "
            f"with backup-agent restore --repository {given} --to DIR, and look there"
        )
    if given and args.command == "packages" and (is_daemon_destination(given) or parse_destination(given) is not None):
        raise NotAvailableError(
            f"{args.command} does not read a repository on a server in this version ({given}): "
            f"restore the path from it with backup-agent restore --repository {given} --to DIR, and look there"
        )


def _remote_reader(args: argparse.Namespace, settings: Settings) -> RemoteRepository | None:
    """versions, diff, verify: the repository on a server over ssh that --remote NAME or [user@]host:/path names; None otherwise."""
    name = getattr(args, "remote", None)
    if name is not None and configured_daemon(settings, name) is not None:
        raise NotAvailableError(
            f"{args.command} does not read an rsync daemon ([[remote]] {name}): it runs no command for its client; restore the "
            f"path with backup-agent restore --remote {name} --to DIR, and look there"
        )
    if args.repository and is_daemon_destination(args.repository):
        return None  # refused by _not_on_a_server
    remote = _remote_of(settings, name, args.repository)
    if remote is None:
        return None
    return RemoteRepository(remote, Runner(), ssh=settings.commands.ssh, rsync=settings.commands.rsync)


def _reading(args: argparse.Namespace, settings: Settings) -> "contextlib.AbstractContextManager[Repository]":
    _not_on_a_server(args)
    return access.open_repository(
        settings, Runner(), repository=args.repository, disk=args.disk, warn=log.warning, command=args.command
    )


def _partial(snapshot: str, partial: Sequence[str]) -> str:
    return f"{snapshot} (partial)" if snapshot in partial else snapshot


def cmd_versions(args: argparse.Namespace) -> int:
    settings = _load(args)
    path = history.live_path(args.path, os.getcwd())
    if args.offsite:
        return _versions_offsite(args, settings, path)
    on_server = _remote_reader(args, settings)
    if on_server is not None:  # asked of the server (agent.engine.remote_read)
        with opened_for_reading(on_server) as remote_repo:
            snaps = remote_snapshots(remote_repo)
            found = remote_read.versions(remote_repo, snaps, path)
            if not found:
                raise remote_read.not_held(remote_repo, snaps, path)
    else:
        with _reading(args, settings) as repo:
            snaps = history.snapshots(repo)
            found = history.versions(snaps, path)
            if not found:
                raise history.not_held(snaps, path)
    if args.json:
        print(json.dumps({"path": path, "versions": [v.as_dict() for v in found]}, indent=2, ensure_ascii=False))
        return EXIT_OK
    print(f"{path}: {len(found)} version{'s' if len(found) != 1 else ''} in {len(snaps)} snapshots")
    print(f"{'FIRST':<26} {'LAST':<26} {'SIZE':>10}  {'MODIFIED':<25} NOTES")
    for version in found:
        notes = [] if version.kind == "file" else [version.kind]
        if version.kind == "symlink":
            notes.append(f"-> {version.target}")
        if version.kind == "directory":
            notes.append(f"{version.entries} entries")
            notes += [f"{sign}{len(names)}" for sign, names in (("+", version.added), ("-", version.removed), ("~", version.replaced)) if names]
        if version.partial:
            notes.append("partial: " + ", ".join(version.partial))
        print(
            f"{version.first:<26} {version.last:<26} {human_size(version.size or 0):>10}  "
            f"{history.iso_time(version.mtime_ns):<25} {' '.join(notes)}"
        )
    return EXIT_OK


def cmd_diff(args: argparse.Namespace) -> int:
    settings = _load(args)
    on_server = _remote_reader(args, settings)
    if on_server is not None:  # listed and compared on the server (agent.engine.remote_read)
        with opened_for_reading(on_server) as remote_repo:
            snaps = remote_snapshots(remote_repo)
            a, b = history.pick_pair(snaps, args.a, args.b)
            changes = [(b.source, change) for change in remote_read.diff(remote_repo, a, b)]
    else:
        with _reading(args, settings) as repo:
            snaps = history.snapshots(repo)
            a, b = history.pick_pair(snaps, args.a, args.b)
            # Several sources: each compared with itself, its changes named by their live paths.
            changes = [(source, change) for source, in_a, in_b in history.part_pairs(a, b) for change in history.diff(in_a, in_b)]
    if args.json:
        body = {
            "a": a.name,
            "b": b.name,
            "source": b.source if not b.parts else None,
            "sources": list(b.sources),
            "partial": [s.name for s in (a, b) if s.partial],
            "changes": [c.as_dict(source) for source, c in changes],
        }
        print(json.dumps(body, indent=2, ensure_ascii=False))
        return EXIT_OK
    print(f"{_partial(a.name, [s.name for s in (a, b) if s.partial])} -> {_partial(b.name, [b.name] if b.partial else [])}")
    signs = {"added": "+", "removed": "-", "changed": "~"}
    counts = {"added": 0, "removed": 0, "changed": 0}
    for source, change in changes:
        counts[change.change] += 1
        shown = os.path.join(source, change.path) + ("/" if change.kind == "directory" else "")
        if change.change == "changed":
            sizes = "" if change.kind == "directory" else f"{human_size(change.size_before or 0)} -> {human_size(change.size_after or 0)}, "
            print(f"{signs[change.change]} {shown}  ({sizes}{change.what})")
        else:
            size = change.size_after if change.change == "added" else change.size_before
            print(f"{signs[change.change]} {shown}" + ("" if size is None else f"  ({human_size(size)})"))
    print(", ".join(f"{count} {name}" for name, count in counts.items()))
    return EXIT_OK


def cmd_packages(args: argparse.Namespace) -> int:
    """Reads .backup-agent/packages/ of one snapshot, or compares two (engine/sysstate/packages)."""
    settings = _load(args)
    with _reading(args, settings) as repo:
        snaps = history.snapshots(repo)
        if not snaps:
            raise UsageError(f"{repo.root} holds no snapshot yet")
        if args.diff:
            a, b = history.pick_pair(snaps, args.diff[0], args.diff[1])
            before, after = sysstate_packages.read_inventories(a.path), sysstate_packages.read_inventories(b.path)
            chosen = [a, b]
        else:
            a = b = history.pick_pair(snaps, args.snapshot, None)[0] if args.snapshot else snaps[-1]
            before = after = sysstate_packages.read_inventories(b.path)
            chosen = [b]
        for snap, held in ((a, before), (b, after)):
            if not held:
                raise UsageError(
                    f"snapshot {snap.name} holds no package lists (made with [packages] off, of a source other than /, "
                    "or before backup-agent stored them)"
                )
    if args.diff:
        differences = sysstate_packages.compare(before, after)
        if args.json:
            print(json.dumps({"a": a.name, "b": b.name, "managers": [sysstate_packages.as_json(d) for d in differences]}, indent=2))
        else:
            print("\n".join(sysstate_packages.render_differences(a.name, b.name, differences)))
        return EXIT_OK
    if args.json:
        print(json.dumps({"snapshot": chosen[0].name, "managers": [sysstate_packages.as_json(i) for i in after]}, indent=2))
    else:
        print("\n".join(sysstate_packages.render_inventories(b.name, after)))
    return EXIT_OK


def cmd_restore(args: argparse.Namespace) -> int:
    settings = _load(args)
    now = dt.datetime.now().astimezone()
    at = when.parse_when(args.at, now, when.local_zone()) if args.at else None
    cwd = os.getcwd()
    paths = [history.live_path(path, cwd) for path in args.paths]
    to = history.live_path(args.to, cwd) if args.to else None
    if args.offsite:
        return _restore_offsite(args, settings, paths, at, to)
    # What the live system alone decides is refused before the disk is opened: --to, and through sudo the caller's directories.
    restoring.plan_restore([], to=to, in_place=args.in_place, now=now, exists=os.path.lexists, is_dir=os.path.isdir)
    caller = int(os.environ["SUDO_UID"]) if running_through_sudo() else None
    if caller is not None:
        early = restoring.early_refusal(paths, caller, os.path.lexists, lambda path: os.lstat(path).st_uid)
        if early is not None:
            raise UsageError(early + "; nothing was opened or restored")
    daemon = _daemon_of(settings, args.remote, args.repository)
    if daemon is not None:
        return _restore_daemon(args, settings, daemon, paths, to=to, now=now, at=at)
    remote = _remote_of(settings, args.remote, args.repository) if args.repository or args.remote else None
    if remote is not None:
        return _restore_remote(args, settings, remote, paths, to=to, now=now, at=at)
    with _reading(args, settings) as repo:
        snaps = history.snapshots(repo)
        targets = []
        for path in paths:
            try:
                targets.append(restoring.choose(snaps, path, snapshot=args.snapshot, at=at))
            except LookupError:
                raise history.not_held(snaps, path) from None
        plan = restoring.plan_restore(
            targets, to=to, in_place=args.in_place, now=now, exists=os.path.lexists, is_dir=os.path.isdir
        )
        if caller is not None:
            refusal = restoring.caller_refusal(plan, targets, caller, _groups(caller))
            if refusal is not None:
                raise UsageError(refusal)
        verb = "would restore" if args.dry_run else "restoring"
        for item in plan.items:
            moved = f" (the current one moved aside to {item.aside})" if item.aside and args.dry_run else ""
            print(f"{verb} {item.path} from {_partial(item.snapshot, [item.snapshot] if item.partial else [])} to {item.result}{moved}")
        if not args.dry_run:
            restoring.execute(plan, Runner(), settings.commands.rsync, say=print, caller=caller)
            print(f"restored {len(plan.items)} path{'s' if len(plan.items) != 1 else ''}")
    return EXIT_OK


def _restore_remote(
    args: argparse.Namespace, settings: Settings, remote: Remote, paths: list[str], *, to: str | None, now: dt.datetime, at: dt.datetime | None
) -> int:
    """restore --repository [user@]host:/path: chosen and planned as locally, rsync reading from the server over ssh."""
    runner = Runner()
    commands = settings.commands
    with opened_for_reading(RemoteRepository(remote, runner, ssh=commands.ssh, rsync=commands.rsync)) as repo:
        shared = (rsync_shell(repo.remote, commands.ssh), remote.host)
        return _restore_planned(
            args, repo, paths, to=to, now=now, at=at, shown=f"{remote.login}:", not_held=history.not_held,
            execute=lambda plan: restoring.execute(plan, runner, commands.rsync, say=print, remote=shared),
        )


def _restore_daemon(
    args: argparse.Namespace, settings: Settings, daemon: Daemon, paths: list[str], *, to: str | None, now: dt.datetime, at: dt.datetime | None
) -> int:
    """restore from an rsync daemon's module: chosen and planned as locally, rsync reading from the module
    (with the module's password file, root's only, as the backup uses)."""
    runner = Runner()
    commands = settings.commands
    daemon = daemon_as_configured(settings, daemon)
    module_repo = DaemonRepository(daemon, runner, ssh=commands.ssh, rsync=commands.rsync)
    with opened_for_reading(module_repo) as repo:
        module = (daemon_options(module_repo.daemon), module_repo.daemon.url().rstrip("/"))
        return _restore_planned(
            args, repo, paths, to=to, now=now, at=at, shown=f"{daemon.shown}: ",
            not_held=lambda snaps, path: remote_read.not_held(repo, snaps, path),
            execute=lambda plan: restoring.execute(plan, runner, commands.rsync, say=print, daemon=module),
        )


def _restore_planned(
    args: argparse.Namespace,
    repo: RemoteRepository,
    paths: list[str],
    *,
    to: str | None,
    now: dt.datetime,
    at: dt.datetime | None,
    shown: str,
    not_held: Callable[[list[history.Snapshot], str], UsageError],
    execute: Callable[[restoring.Plan], None],
) -> int:
    """A restore from a server, the same over ssh and from a daemon: each path's snapshot chosen as locally,
    the plan printed (``shown`` names the server), then ``execute`` runs rsync reading from it."""
    snaps = remote_snapshots(repo)
    kind_in = kind_finder(repo)
    targets = []
    for path in paths:
        try:
            targets.append(restoring.choose(snaps, path, snapshot=args.snapshot, at=at, kind_in=kind_in))
        except LookupError:
            raise not_held(snaps, path) from None
    plan = restoring.plan_restore(targets, to=to, in_place=args.in_place, now=now, exists=os.path.lexists, is_dir=os.path.isdir)
    verb = "would restore" if args.dry_run else "restoring"
    for item in plan.items:
        print(f"{verb} {item.path} from {shown}{_partial(item.snapshot, [item.snapshot] if item.partial else [])} to {item.result}")
    if not args.dry_run:
        execute(plan)
        print(f"restored {len(plan.items)} path{'s' if len(plan.items) != 1 else ''}")
    return EXIT_OK


def _groups(uid: int) -> list[int]:
    """The groups of the user sudo was called by."""
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return []
    return os.getgrouplist(entry.pw_name, entry.pw_gid)


class _ProgressLine:
    """A progress line on a terminal's stderr, at most twice a second."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.last = 0.0
        self.shown = False

    def __call__(self, progress: verifier.Progress) -> None:
        now = time.monotonic()
        if now - self.last < 0.5:
            return
        self.last = now
        rate = progress.bytes / max(now - self.started, 1e-6)
        sys.stderr.write(
            f"\r\033[Kverifying {progress.snapshot} ({progress.index}/{progress.snapshots}): {progress.files} files, "
            f"{human_size(progress.bytes)} of {human_size(progress.bytes_total)}, {human_size(rate)}/s"
        )
        sys.stderr.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def cmd_verify(args: argparse.Namespace) -> int:
    settings = _load(args)
    runner = Runner()
    progress = _ProgressLine() if sys.stderr.isatty() and not args.quiet else None
    on_server = _remote_reader(args, settings)
    if on_server is not None:  # every file hashed again on the server (agent.engine.remote_read)
        with opened_for_reading(on_server) as remote_repo:
            names = verifier.choose(remote_repo.snapshot_names(), args.snapshot, args.all)
            if not names:
                empty = verifier.Report(remote_repo.root)
                print(json.dumps(empty.as_json(), indent=2) if args.json else f"{remote_repo.root}: no snapshots yet, nothing to verify")
                return EXIT_OK
            report = remote_read.verify(remote_repo, names)
        return _verify_report(args, report)
    _not_on_a_server(args)
    with access.open_repository(
        settings, runner, repository=args.repository, disk=args.disk, warn=log.warning, command="verify"
    ) as repo:
        names = verifier.choose(repo.snapshot_names(), args.snapshot, args.all)
        if not names:
            print(json.dumps(verifier.Report(repo.root).as_json(), indent=2) if args.json else f"{repo.root}: no snapshots yet, nothing to verify")
            return EXIT_OK
        verifier.read_gently(settings.commands.ionice, settings.nice, runner)
        try:
            report = verifier.verify(repo, names, on_progress=progress)
        finally:
            if progress is not None:
                progress.clear()
    return _verify_report(args, report)


def _verify_report(args: argparse.Namespace, report: verifier.Report) -> int:
    """The report as the user asked for it, and its exit status (the same for a local and a remote repository)."""
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
    else:
        print(verifier.summary(report))
        for problem in report.problems:
            print(verifier.describe(problem))
    if report.intact:
        return EXIT_OK
    return EXIT_UNVERIFIED if report.unverified else EXIT_DAMAGED


def cmd_check_stale(args: argparse.Namespace) -> int:
    """Exit 0 when a backup succeeded within remind_after days, 14 (reported) when not; see the README."""
    settings = _load(args)
    where = settings.path or SYSTEM_CONFIG
    if not settings.reports:
        raise UsageError(
            f"{where} lists no [[report]] channel: check-stale reports through them, and the backup records its "
            'successes only for them; add one, such as [[report]] type = "mail" ... on = ["failure", "stale"]'
        )
    now = dt.datetime.now().astimezone()
    try:
        record = stale.read_record(settings.state_dir)
    except ValueError as exc:
        raise StepError(str(exc), step="check-stale") from None
    if record is None:
        try:
            stale.write_record(settings.state_dir, stale.Record(now))
        except OSError as exc:
            raise StepError(f"{stale.record_path(settings.state_dir)}: {exc.strerror}; run check-stale as root", step="check-stale") from None
        log.info("no backup has succeeded since this machine began recording; watching from now")
        return EXIT_OK
    found = stale.stale_verdict(record, now, settings.remind_after, socket.gethostname())
    if found is None:
        if settings.remind_after == 0:
            log.info("[notifications] remind_after = 0: no backup is ever stale")
        elif record.snapshot is None:
            log.info("no backup has succeeded yet; watching since %s", record.time.isoformat(timespec="minutes"))
        else:
            log.info("the last backup succeeded at %s (snapshot %s)", record.time.isoformat(timespec="minutes"), record.snapshot)
        return EXIT_OK
    log.warning("%s", found.text.splitlines()[0])
    for report in settings.reports:
        reports.deliver(report, found)
    return EXIT_STALE


def cmd_install(args: argparse.Namespace) -> int:
    # sys.argv[0]: the file this process was started as, not a PATH lookup.
    return installer.install(user=args.user, dry_run=args.dry_run, argv0=sys.argv[0])


def cmd_uninstall(args: argparse.Namespace) -> int:
    return installer.uninstall(dry_run=args.dry_run)


def cmd_run(args: argparse.Namespace) -> int:
    from agent.desktop import daemon  # pyudev and asyncio only for this command

    return daemon.main(
        config=args.config, no_sudo=args.no_sudo, argv0=sys.argv[0], notifications=not args.disable_notifications
    )


def cmd_now(args: argparse.Namespace) -> int:
    from agent.desktop.dbus import client  # dbus_fast only for these commands

    return client.run_now(args.disk, notify=args.notify)


def cmd_stop(args: argparse.Namespace) -> int:
    from agent.desktop.dbus import client

    return client.run_stop(notify=args.notify)


def cmd_status(args: argparse.Namespace) -> int:
    from agent.desktop.dbus import client

    return client.run_status(args.json)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "backup": cmd_backup,
    "init": cmd_init,
    "eject": cmd_eject,
    "open": cmd_open,
    "list": cmd_list,
    "rotate": cmd_rotate,
    "versions": cmd_versions,
    "diff": cmd_diff,
    "restore": cmd_restore,
    "verify": cmd_verify,
    "packages": cmd_packages,
    "install": cmd_install,
    "uninstall": cmd_uninstall,
    "run": cmd_run,
    "now": cmd_now,
    "stop": cmd_stop,
    "status": cmd_status,
    "check-stale": cmd_check_stale,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    signals = _Signals()
    restore = signals.install()
    handler: logging.Handler | None = None
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        if args.config is not None and _subparser(parser, args.command).get_default("config") is None:
            raise UsageError(f"{args.command} reads no config: leave out --config {args.config}")
        if running_through_sudo():
            refusal = through_sudo_refusal(args, parser)
            if refusal is not None:
                raise UsageError(refusal)
        handler = _setup_logging(args.verbose, args.quiet)
        return COMMANDS[args.command](args)
    except BackupAgentError as exc:
        print(("<3>" if os.environ.get("JOURNAL_STREAM") else "") + _error_line(exc), file=sys.stderr)
        return exc.exit_code
    finally:
        restore()
        if handler is not None:
            # Its stream was this command's stderr: a later caller in the same
            # process (the tests run many commands) may have another.
            logging.getLogger("agent").removeHandler(handler)


def _error_line(exc: BackupAgentError) -> str:
    line = f"backup-agent: {exc.message}"
    if exc.step and exc.step not in ("config",):
        line = f"backup-agent: {exc.step} failed: {exc.message}"
    if exc.snapshots_untouched:
        line += " (earlier snapshots are untouched)"
    return line


if __name__ == "__main__":
    sys.exit(main())


# -- the off-site repository (agent/engine/offsite) ------------------------------------


def _chosen_offsite(args: argparse.Namespace, settings: Settings) -> Offsite:
    if os.geteuid() != 0 and not settings.offsite:
        raise UsageError("no [[offsite]] is configured: see the README's [[offsite]]")
    if args.offsite_name:
        return offsite.find(settings, args.offsite_name)
    if not settings.offsite:
        raise UsageError(f"no [[offsite]] is configured in {settings.path}: see the README's [[offsite]]")
    return settings.offsite[0]


def _init_offsite(args: argparse.Namespace) -> int:
    settings = _load(args)
    chosen = offsite.find(settings, args.offsite)
    found, created = offsite.initialise(settings, chosen, Runner())
    verb = "created" if created else "adopted (checked)"
    print(f"off-site {chosen.name}: {verb} the restic repository {found[:12]}; recorded in {offsite.state_path(settings, chosen)}")
    return EXIT_OK


def _list_offsite(args: argparse.Namespace, settings: Settings) -> int:
    chosen = _chosen_offsite(args, settings)
    found = offsite.listing(settings, chosen, Runner())
    rows = [{"id": s.id, "short_id": s.short_id, "time": s.time.isoformat(), "snapshot": s.local_name, "host": s.host} for s in found]
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return EXIT_OK
    if not rows:
        print(f"off-site {chosen.name}: no snapshots of this machine yet")
        return EXIT_OK
    print(f"{'SNAPSHOT':<26} {'OFF-SITE ID':<12} TIME")
    for row in rows:
        print(f"{row['snapshot'] or '?':<26} {row['short_id']:<12} {row['time']}")
    return EXIT_OK


def _versions_offsite(args: argparse.Namespace, settings: Settings, path: str) -> int:
    chosen = _chosen_offsite(args, settings)
    found = offsite.versions(settings, chosen, Runner(), path)
    if not found:
        raise UsageError(f"{path} is in no off-site snapshot of {chosen.name}")
    rows: list[dict[str, Any]] = [
        {
            "snapshot": snap.local_name, "id": snap.short_id, "time": snap.time.isoformat(),
            "kind": match.kind, "size": match.size, "mtime": match.mtime,
        }
        for snap, match in found
    ]
    if args.json:
        print(json.dumps({"path": path, "offsite": chosen.name, "versions": rows}, indent=2, ensure_ascii=False))
        return EXIT_OK
    print(f"{path}: in {len(rows)} off-site snapshot{'s' if len(rows) != 1 else ''} of {chosen.name}")
    for row in rows:
        print(f"{row['snapshot'] or row['id']:<26} {human_size(row['size'] or 0):>10}  {row['mtime']}  {row['kind']}")
    return EXIT_OK


def _restore_offsite(args: argparse.Namespace, settings: Settings, paths: Sequence[str], at: dt.datetime | None, to: str | None) -> int:
    if args.in_place or args.dry_run:
        raise UsageError("restore --offsite restores into a new directory only: leave out --in-place and --dry-run")
    chosen = _chosen_offsite(args, settings)
    for path in paths:
        target, snap = offsite.restore(settings, chosen, Runner(), path, name=args.snapshot, at=at, to=to)
        print(f"restored {path} from the off-site snapshot {snap.local_name or snap.short_id} ({chosen.name}) to {target}")
    return EXIT_OK
