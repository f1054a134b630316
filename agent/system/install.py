"""``backup-agent install`` / ``uninstall``: the sudo rule, the udev rule, the user unit and the launcher.

``install`` puts four files in place, each atomically, each starting with
its own marker line, and never over a file it did not write:

* ``/etc/sudoers.d/backup-agent`` (0440): the one sudo rule the desktop agent
  reaches root through (below);
* ``/etc/udev/rules.d/70-backup-agent.rules`` (0644): marks each configured
  disk (``BACKUP_AGENT_DISK``) and hides it from desktop automounters
  (``UDISKS_IGNORE``), never ``RUN+=`` (:func:`udev_rules`);
* ``/etc/systemd/user/backup-agent.service`` (0644): the user unit that runs
  ``backup-agent run`` in every user's graphical session (:func:`user_unit`);
* ``/usr/local/share/applications/backup-agent.desktop`` (0644): the desktop
  entry docks match the agent's progress bar to (:func:`launcher_entry`).

``uninstall`` removes those of the four that carry our marker.

The desktop agent runs as the user and starts the root backup cycle with
``sudo -n backup-agent backup --json [--disk NAME]``, and the tray's Eject
with ``sudo -n backup-agent eject --json --disk NAME``, and Browse backups
with ``sudo -n backup-agent open --json --disk NAME``; for a disk opened
with a passphrase, the backup and open forms end in ``--passphrase-stdin``
(the passphrase on standard input). The drop-in written
here lets exactly one user run exactly those argument lists (sudo compares a
rule's arguments word for word when the rule gives any), without a password,
with none of the caller's environment. Everything else through sudo asks for
a password, and the CLI refuses it too (:func:`agent.cli.through_sudo_refusal`).

Such a rule is only as safe as the program it names: if anyone but root
could change the executable, the Python that runs it, or the code that
Python loads, the rule would hand root to that someone. So before writing,
every one of them, and every directory above them, must be root's alone
(:func:`agent.config.trust.untrusted_program`, which follows only root-owned
symbolic links).

:func:`sudoers_rule` is pure and tested directly; :func:`install` and
:func:`uninstall` do the checks and the file work.
"""

from __future__ import annotations

import logging
import os
import pwd
import re
import stat
import sys
import tempfile
from dataclasses import dataclass
from typing import Final, Iterable, Sequence, TextIO

from agent.core.commands import SAFE_PATH, Runner
from agent.config.load import SYSTEM_CONFIG, load_settings
from agent.config.model import Disk
from agent.config.trust import running_through_sudo, untrusted_program
from agent.config.validate import DISK_NAME_RE
from agent.core.errors import CommandError, NotAvailableError, UsageError
from agent.core.files import fsync_directory, write_atomic

log = logging.getLogger(__name__)

DROP_IN: Final = "/etc/sudoers.d/backup-agent"
SUDOERS: Final = "/etc/sudoers"
VISUDO: Final = "/usr/sbin/visudo"
DROP_IN_MODE: Final = 0o440
# The first line of every drop-in install writes: uninstall removes only a file that starts with it.
MARKER: Final = "# backup-agent sudo rule: written by `backup-agent install`, removed by `backup-agent uninstall`"

# Characters sudoers takes literally in each place, so nothing needs escaping:
# no space, no , : = \ " ! # ( ) and no wildcard (* ? [ ]), which sudo
# would match against the caller's arguments. A user name starts with a
# lower-case letter or "_" so it can be neither an alias (upper case, ALL),
# a uid (#1000), a group (%sudo) nor a netgroup (+name).
USER_RE: Final = re.compile(r"[a-z_][a-z0-9_.-]{0,31}", re.ASCII)
# Disk names are config.DISK_NAME_RE: [A-Za-z0-9][A-Za-z0-9_.-]{0,63}, all literal in sudoers.
_EXECUTABLE_COMPONENT_RE: Final = re.compile(r"[A-Za-z0-9_.+-]+", re.ASCII)
_MAX_EXECUTABLE: Final = 1024
_ROOT_ONLY: Final = (
    "root runs it for the user through sudo, so the program, the Python that runs it, the code it loads "
    "and every directory above them must be writable by root only: a copy installed by a user (e.g. with "
    "pip install --user into ~/.local, or in a virtualenv the user owns) would hand root to any program that "
    'user runs; install system-wide as the README shows ("Install for real"), then run sudo backup-agent install'
)
_PROBE: Final = ".backup-agent-trust-probe"

RULES_FILE: Final = "/etc/udev/rules.d/70-backup-agent.rules"
RULES_MODE: Final = 0o644
RULES_MARKER: Final = "# backup-agent udev rule: written by `backup-agent install`, removed by `backup-agent uninstall`"
UNIT_FILE: Final = "/etc/systemd/user/backup-agent.service"
UNIT_MODE: Final = 0o644
UNIT_MARKER: Final = "# backup-agent user unit: written by `backup-agent install`, removed by `backup-agent uninstall`"
LAUNCHER_FILE: Final = "/usr/local/share/applications/backup-agent.desktop"
LAUNCHER_MODE: Final = 0o644
LAUNCHER_MARKER: Final = "# backup-agent launcher: written by `backup-agent install`, removed by `backup-agent uninstall`"
UDEVADM: Final = "udevadm"
_UUID_RE: Final = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}", re.ASCII)


def agent_argvs(disk_names: Sequence[str], remote_names: Sequence[str] = ()) -> tuple[tuple[str, ...], ...]:
    """The argument lists the desktop agent passes to ``sudo -n backup-agent`` (pure).

    A ``[[remote]]`` (a repository on a server) gets its backup form only:
    there is nothing to eject or open.
    """
    backups = tuple(("backup", "--json", "--disk", name) for name in disk_names)
    ejects = tuple(("eject", "--json", "--disk", name) for name in disk_names)
    opens = tuple(("open", "--json", "--disk", name) for name in disk_names)
    # A disk whose crypttab line has no key file: the passphrase the agent
    # asked for comes on standard input (README, "A disk with a passphrase").
    unlocking = tuple(
        (command, "--json", "--disk", name, "--passphrase-stdin") for name in disk_names for command in ("backup", "open")
    )
    remotes = tuple(("backup", "--json", "--remote", name) for name in remote_names)
    return (("backup", "--json"),) + backups + ejects + opens + unlocking + remotes


def sudoers_rule(user: str, executable: str, disk_names: Sequence[str], remote_names: Sequence[str] = ()) -> str:
    """The drop-in's text: ``user`` may run ``executable`` as root only in the agent's forms (pure).

    Raises :class:`UsageError` for a user name, executable path or disk name
    that sudoers would not take literally.
    """
    if not isinstance(user, str) or not USER_RE.fullmatch(user):
        raise UsageError(
            f"user name {user!r} cannot go in a sudo rule as it is: expected a lower-case letter or _ "
            "followed by up to 31 lower-case letters, digits, _, . or -"
        )
    if user == "root":
        raise UsageError("root needs no sudo rule: give --user NAME, the user whose desktop agent starts backups")
    _check_executable(executable)
    names = _rule_names(disk_names, "disk")
    remotes = _rule_names(remote_names, "remote")
    commands = [f"{executable} {' '.join(argv)}" for argv in agent_argvs(names, remotes)]
    return "\n".join(
        [
            MARKER,
            f"# {user} may start the root backup cycle, eject a backup disk and open it read-only, and nothing else:",
            "# sudo compares the arguments word for word, so any other option or subcommand asks for",
            "# a password. The caller's environment is not kept (no LD_*, PYTHON*, PATH): only sudo's",
            "# minimal one reaches backup-agent.",
            f'Defaults!{executable} env_reset, !env_keep, !env_check, !setenv, secure_path="{SAFE_PATH}"',
            f"{user} ALL = (root) NOPASSWD: " + ", \\\n    ".join(commands),
            "",
        ]
    )


def _rule_names(given: Sequence[str], what: str) -> list[str]:
    """The names in the order given, once each; a UsageError for one sudoers would not take literally."""
    names: list[str] = []
    for name in given:
        if not isinstance(name, str) or not DISK_NAME_RE.fullmatch(name):
            raise UsageError(
                f"{what} name {name!r} cannot go in a sudo rule as it is: expected a letter or digit followed by "
                "up to 63 letters, digits, _, . or -"
            )
        if name not in names:
            names.append(name)
    return names


def _check_executable(executable: str) -> None:
    problem = None
    if not isinstance(executable, str) or not executable.startswith("/") or len(executable) > _MAX_EXECUTABLE:
        problem = "expected an absolute path"
    else:
        parts = executable.split("/")[1:]
        if not all(_EXECUTABLE_COMPONENT_RE.fullmatch(part) and part not in (".", "..") for part in parts):
            problem = (
                "expected an absolute path without //, . or .. components, made of letters, digits, "
                "_, ., + and - (install it under a path such as /opt/backup-agent)"
            )
    if problem is not None:
        raise UsageError(f"executable path {executable!r} cannot go in a sudo rule as it is: {problem}")


# -- the udev rule and the user unit (pure) ---------------------------------------

_UDEV_HEAD: Final = """\
# Marks each configured backup disk and keeps desktop automounters away from it.
# The LUKS partition, recognised by its UUID, gets BACKUP_AGENT_DISK=<disk name> and
# UDISKS_IGNORE=1 (so GNOME or KDE show no passphrase dialog); the unlocked device
# /dev/mapper/<name> gets UDISKS_IGNORE=1 too. Nothing is run from here (no RUN+=):
# the desktop agent (backup-agent run) watches udev and starts the backup itself.
"""


def udev_rules(disks: Sequence[Disk]) -> str:
    """The rules file's text: one line per configured disk, one per unlocked device (pure).

    Raises :class:`UsageError` for a disk name or LUKS UUID that cannot go in
    a udev rule as it is (both are checked by the config already).
    """
    lines = [RULES_MARKER, _UDEV_HEAD.rstrip("\n"), 'SUBSYSTEM!="block", GOTO="backup_agent_end"']
    for disk in disks:
        name, uuid = disk.name, disk.luks_uuid
        if not isinstance(name, str) or not DISK_NAME_RE.fullmatch(name):
            raise UsageError(f"disk name {name!r} cannot go in a udev rule as it is")
        if not isinstance(uuid, str) or not _UUID_RE.fullmatch(uuid):
            raise UsageError(f"LUKS UUID {uuid!r} of disk {name} cannot go in a udev rule as it is")
        # udev compares case-sensitively: accept the header's UUID in either case.
        forms = "|".join(dict.fromkeys((uuid.lower(), uuid.upper())))
        lines.append(f"# disk {name}")
        lines.append(
            f'ENV{{ID_FS_TYPE}}=="crypto_LUKS", ENV{{ID_FS_UUID}}=="{forms}", '
            f'ENV{{BACKUP_AGENT_DISK}}="{name}", ENV{{UDISKS_IGNORE}}="1"'
        )
        if disk.mapped_device == f"/dev/mapper/{name}":
            lines.append(f'ENV{{DM_NAME}}=="{name}", ENV{{UDISKS_IGNORE}}="1"')
    lines += ['LABEL="backup_agent_end"', ""]
    return "\n".join(lines)


_UNIT: Final = """\
# The desktop agent: backs up the configured disk when it is plugged in, and
# every interval while it stays attached. Installed in /etc/systemd/user for
# every user; ExecStart names the backup-agent command that ran install.
# Enable it for every user with: sudo systemctl --global enable backup-agent.service
# (or for yourself: systemctl --user enable --now backup-agent.service).

[Unit]
Description=backup-agent: back up when the backup disk is plugged in, and hourly
PartOf=graphical-session.target
After=graphical-session.target

[Service]
# Ready (READY=1) once the udev monitor runs; STATUS= lines say what it does.
Type=notify
NotifyAccess=main
ExecStart={executable} run
Restart=on-failure
RestartSec=10
# The agent pings (WATCHDOG=1) from its event loop every half of this.
WatchdogSec=60
# Stopping or restarting the agent stops only the agent: a running backup
# cycle (sudo backup-agent backup) finishes on its own, and the restarted
# agent finds it through the lock and shows it.
KillMode=process
SyslogIdentifier=backup-agent

[Install]
# Desktops that start graphical-session.target (GNOME, KDE Plasma) start it with
# the session; elsewhere, use WantedBy=default.target in a copy of this unit.
WantedBy=graphical-session.target
"""


def user_unit(executable: str) -> str:
    """The user unit's text, running ``executable run`` (pure; same path checks as the sudo rule)."""
    _check_executable(executable)
    return UNIT_MARKER + "\n" + _UNIT.replace("{executable}", executable)


_LAUNCHER: Final = """\
# The desktop entry docks match the backup's progress bar to: the desktop agent
# broadcasts it as com.canonical.Unity.LauncherEntry for
# application://backup-agent.desktop. Pin "Backups" to the dock to see the bar on
# its icon. Opening it asks the running agent to back up now, as the tray's
# "Back up now" does; its one action stops the running backup; --notify shows
# an answer other than "started" (no disk, no agent) as a notification, since
# no terminal shows it. Exec names the backup-agent command that ran install.
[Desktop Entry]
Type=Application
Version=1.4
Name=Backups
GenericName=Backup
Comment=Back up to the attached backup disk now
Icon=drive-harddisk
Exec={executable} now --notify
Terminal=false
StartupNotify=false
Categories=Utility;Archiving;
Keywords=backup;snapshot;restore;backup-agent;
X-GNOME-UsesNotifications=true
Actions=stop;

[Desktop Action stop]
Name=Stop the Backup
Exec={executable} stop --notify
"""


def launcher_entry(executable: str) -> str:
    """The desktop entry's text, opening ``executable now --notify`` (pure; same path checks as the sudo rule,
    which leave nothing the Exec key would need to quote)."""
    _check_executable(executable)
    return LAUNCHER_MARKER + "\n" + _LAUNCHER.replace("{executable}", executable)


# -- what the rule would hand root to -------------------------------------------


@dataclass(frozen=True)
class Program:
    """The installed console script and the interpreter its first line names."""

    executable: str
    interpreter: str


def console_script(argv0: str) -> Program:
    """The ``backup-agent`` console script this process was started as (from ``sys.argv[0]``).

    Not a PATH lookup: the file that was executed is the one the rule must
    name. It must be pip's console script for ``agent.cli:main`` whose first
    line names its Python by absolute path.
    """
    run_as = "run it as the installed command, e.g. sudo /usr/local/sbin/backup-agent install"
    path = os.path.normpath(os.path.abspath(argv0))
    try:
        with open(path, "rb") as stream:
            head = stream.read(4096)
    except OSError as error:
        raise UsageError(f"cannot read the running program {path} ({error.strerror}): {run_as}") from None
    first, _, rest = head.partition(b"\n")
    if not first.startswith(b"#!") or b"from agent.cli import main" not in rest:
        raise UsageError(f"{path} is not backup-agent's console script (as pip installs it): {run_as}, not python -m")
    words = first[2:].decode("utf-8", "replace").split()
    interpreter = words[0] if words else ""
    if not interpreter.startswith("/") or os.path.basename(interpreter) == "env":
        raise UsageError(
            f"{path} starts {first.decode('utf-8', 'replace')!r}: expected its Python named by absolute path "
            "on the first line (as pip writes it), so no PATH lookup picks the interpreter root runs"
        )
    if not os.path.isfile(interpreter):
        raise UsageError(f"{path} names the interpreter {interpreter}, which does not exist: reinstall backup-agent")
    return Program(executable=path, interpreter=interpreter)


def _package_files() -> list[str]:
    directory = os.path.dirname(os.path.abspath(__file__))
    return sorted(os.path.join(directory, name) for name in os.listdir(directory) if name.endswith(".py"))


def trust_problem(program: Program, *, python: str, search_path: Iterable[str], code: Iterable[str]) -> str | None:
    """Why root must not run ``program`` for another user, or None (one line, without the advice).

    Checked: the executable, the interpreter its first line names, the
    running Python (``python``), every directory Python imports from
    (``search_path``: a writable one could hold a ``.pth`` file or a module
    that shadows one) and backup-agent's own ``code`` files.
    """
    checks: list[tuple[str, str, bool]] = [
        ("the executable", program.executable, False),
        ("its Python interpreter", program.interpreter, False),
        ("the running Python", python, False),
    ]
    for entry in search_path:
        directory = os.path.abspath(entry or ".")
        if os.path.isdir(directory):
            checks.append(("Python's module directory", directory, True))
    checks.extend(("backup-agent's code", path, False) for path in code)
    for what, path, is_directory in checks:
        # A directory is examined through a name in it that does not exist:
        # untrusted_program then checks every directory down to it.
        problem = untrusted_program(os.path.join(path, _PROBE) if is_directory else path)
        if problem is not None:
            return f"{what} {path} is not root's alone: {problem}"
    return None


# -- install and uninstall ------------------------------------------------------


def _default_user(given: str | None) -> str:
    if given is not None:
        return given
    if running_through_sudo() and os.environ.get("SUDO_USER"):
        return os.environ["SUDO_USER"]
    raise UsageError(
        "give --user NAME, the user whose desktop agent starts backups "
        "(run through sudo, install takes the user who ran sudo)"
    )


def _check_user(user: str) -> None:
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise UsageError(f"--user {user}: no such user on this system") from None
    if entry.pw_uid == 0:
        raise UsageError(f"--user {user}: that is root, which needs no sudo rule; give the desktop user")


def _is_ours(path: str, marker: str = MARKER) -> bool:
    """True when ``path`` is a regular file whose first line is ``marker`` (OSError if it cannot be read)."""
    if not stat.S_ISREG(os.lstat(path).st_mode):
        return False
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as stream:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        first = stream.readline(len(marker) + 2)
    return first.rstrip(b"\n") == marker.encode()


def check_with_visudo(path: str, runner: Runner) -> None:
    """Raise unless ``visudo -c -s -f path`` accepts the file.

    ``-s`` (strict): an undefined alias is an error, not a warning; plain
    ``visudo -cf`` passes ``alice ALL = NOPASSWD`` (NOPASSWD read as an
    undefined Cmnd_Alias).
    """
    if not os.path.isfile(VISUDO):
        raise NotAvailableError(f"{VISUDO} is missing: install sudo first (apt-get install sudo)")
    result = runner.run((VISUDO, "-c", "-s", "-f", path), step="install", mutating=False, check=False)
    if result.returncode != 0:
        detail = "; ".join(result.stderr_tail) or result.meaning
        raise CommandError(
            f"visudo -csf refused the sudo rule, so nothing was installed: {detail}",
            argv=result.argv,
            returncode=result.returncode,
            stderr_tail=result.stderr_tail,
            step="install",
        )


def _includes_drop_ins(directory: str) -> bool | None:
    """Whether /etc/sudoers reads ``directory`` (None: cannot tell)."""
    try:
        with open(SUDOERS, encoding="utf-8", errors="replace") as stream:
            text = stream.read()
    except OSError:
        return None
    pattern = re.compile(rf"^\s*[@#]includedir\s+{re.escape(directory)}/?\s*$", re.MULTILINE)
    return bool(pattern.search(text))


def _write_checked(text: str, target: str, runner: Runner | None, mode: int = DROP_IN_MODE) -> None:
    """Write ``target`` (``mode``, root:root) atomically; with a ``runner``, after visudo accepted the very file.

    The temporary file is made beside the target with a name that starts
    with "." and ends in ".new": sudo skips it in an includedir (it contains
    a "."), udev reads only ``*.rules`` and systemd only unit suffixes, so a
    half-written file is never read.
    """
    directory = os.path.dirname(target)
    if runner is None:
        os.makedirs(directory, mode=0o755, exist_ok=True)
    check = None if runner is None else (lambda temporary: check_with_visudo(temporary, runner))
    write_atomic(target, text.encode(), mode=mode, owner=(0, 0), prefix=".backup-agent.", suffix=".new", check=check)


def _check_temporary(text: str, runner: Runner) -> None:
    """visudo -csf on a private temporary copy (for --dry-run: nothing is written under /etc)."""
    fd, temporary = tempfile.mkstemp(prefix="backup-agent-sudoers.", suffix=".check")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as stream:
            stream.write(text)
        check_with_visudo(temporary, runner)
    finally:
        os.unlink(temporary)


@dataclass(frozen=True)
class _File:
    what: str
    path: str
    marker: str
    mode: int


def _files(drop_in: str, rules: str, unit: str, launcher: str) -> tuple[_File, _File, _File, _File]:
    return (
        _File("the sudo rule", drop_in, MARKER, DROP_IN_MODE),
        _File("the udev rule", rules, RULES_MARKER, RULES_MODE),
        _File("the user unit", unit, UNIT_MARKER, UNIT_MODE),
        _File("the launcher", launcher, LAUNCHER_MARKER, LAUNCHER_MODE),
    )


def _reload_udev(runner: Runner) -> None:
    """``udevadm control --reload``; a missing udevadm or a udevd that does not answer is only a warning."""
    try:
        result = runner.run((UDEVADM, "control", "--reload"), step="install", check=False, timeout=30)
    except CommandError as error:
        log.warning("could not reload the udev rules (%s): they apply after a reboot or udevadm control --reload", error)
        return
    if result.returncode != 0:
        detail = "; ".join(result.stderr_tail) or result.meaning
        log.warning("udevadm control --reload failed (%s): the rules apply after a reboot or a reload", detail)


def install(
    *,
    user: str | None,
    dry_run: bool,
    argv0: str,
    drop_in: str = DROP_IN,
    rules: str = RULES_FILE,
    unit: str = UNIT_FILE,
    launcher: str = LAUNCHER_FILE,
    out: TextIO | None = None,
    runner: Runner | None = None,
) -> int:
    """Put the sudo rule for ``user``, the udev rule, the user unit and the launcher in place (``dry_run``: show them)."""
    out = out if out is not None else sys.stdout
    runner = runner if runner is not None else Runner()
    files = _files(drop_in, rules, unit, launcher)
    if not dry_run and os.geteuid() != 0:
        raise UsageError(
            f"install writes {', '.join(f.path for f in files)} and needs root: run it with sudo "
            "(or see it first with --dry-run)"
        )
    program = console_script(argv0)
    problem = trust_problem(program, python=sys.executable, search_path=sys.path, code=_package_files())
    if problem is not None:
        raise UsageError(f"refusing to install a sudo rule for {program.executable}: {problem}; {_ROOT_ONLY}")
    name = _default_user(user)
    sudoers_rule(name, program.executable, ())  # refuses a name sudoers would not take literally, before lookup
    _check_user(name)
    settings = load_settings(None, through_sudo=True)  # the file the cycle will read through sudo
    disk_names = [disk.name for disk in settings.disks]
    remote_names = [remote.name for remote in settings.remotes]
    texts = (
        sudoers_rule(name, program.executable, disk_names, remote_names),
        udev_rules(settings.disks),
        user_unit(program.executable),
        launcher_entry(program.executable),
    )
    for file in files:
        if not os.path.lexists(file.path):
            continue
        try:
            ours = _is_ours(file.path, file.marker)
        except OSError as error:
            raise UsageError(f"cannot read the existing {file.path} ({error.strerror}): run it with sudo") from None
        if not ours:
            raise UsageError(
                f"{file.path} exists and was not written by backup-agent install (its first line is not our marker): "
                "nothing was written; move it away or merge it by hand"
            )
    if not disk_names:
        log.warning(
            "no [[disk]] is configured in %s: the rule allows only `backup --json` and the udev rule marks no disk; "
            "run install again after adding a disk",
            settings.path or SYSTEM_CONFIG,
        )
    if _includes_drop_ins(os.path.dirname(drop_in)) is False:
        log.warning("%s has no @includedir %s line: sudo will not read this rule", SUDOERS, os.path.dirname(drop_in))
    if dry_run:
        _check_temporary(texts[0], runner)
        notes = (", which visudo -csf accepts", f", then run {UDEVADM} control --reload", "", "")
        for file, text, note in zip(files, texts, notes):
            out.write(f"would write {file.path} (mode {file.mode:04o}, owner root:root){note}:\n")
            out.write(text)
        return 0
    _write_checked(texts[0], drop_in, runner)
    forms = "; ".join(f"{program.executable} {' '.join(argv)}" for argv in agent_argvs(disk_names, remote_names))
    out.write(f"wrote {drop_in}: {name} may now run as root, without a password, only: {forms}\n")
    _write_checked(texts[1], rules, None, RULES_MODE)
    _reload_udev(runner)
    marked = ", ".join(disk_names) or "no disk"
    out.write(f"wrote {rules}: udev marks {marked} and tells desktop automounters to leave it alone\n")
    _write_checked(texts[2], unit, None, UNIT_MODE)
    out.write(
        f"wrote {unit}: the desktop agent for every user; enable it with "
        "sudo systemctl --global enable backup-agent.service (all users) or "
        "systemctl --user daemon-reload && systemctl --user enable --now backup-agent.service (one user)\n"
    )
    _write_checked(texts[3], launcher, None, LAUNCHER_MODE)
    out.write(f"wrote {launcher}: \"Backups\" for the menus and the dock, where the backup's progress shows\n")
    return 0


def uninstall(
    *,
    dry_run: bool,
    drop_in: str = DROP_IN,
    rules: str = RULES_FILE,
    unit: str = UNIT_FILE,
    launcher: str = LAUNCHER_FILE,
    out: TextIO | None = None,
    runner: Runner | None = None,
) -> int:
    """Remove the files install wrote (those starting with our marker), and nothing else.

    A file of one of those names that install did not write is left in
    place; the others are still removed, then :class:`UsageError` names it.
    """
    out = out if out is not None else sys.stdout
    runner = runner if runner is not None else Runner()
    files = _files(drop_in, rules, unit, launcher)
    if not dry_run and os.geteuid() != 0:
        raise UsageError(f"uninstall removes {', '.join(f.path for f in files)} and needs root: run it with sudo")
    ours: list[_File] = []
    foreign: list[str] = []
    for file in files:
        if not os.path.lexists(file.path):
            out.write(f"nothing to remove: {file.path} does not exist\n")
            continue
        try:
            mine = _is_ours(file.path, file.marker)
        except OSError as error:
            raise UsageError(f"cannot read {file.path} ({error.strerror}): run it with sudo") from None
        if mine:
            ours.append(file)
        else:
            foreign.append(file.path)
    for file in ours:
        if dry_run:
            out.write(f"would remove {file.path}\n")
            continue
        os.unlink(file.path)
        fsync_directory(os.path.dirname(file.path))
        if file.marker == MARKER:
            out.write(f"removed {file.path}: the desktop agent can no longer start backups through sudo\n")
        elif file.marker == RULES_MARKER:
            _reload_udev(runner)
            out.write(f"removed {file.path}: udev no longer marks the backup disks\n")
        elif file.marker == LAUNCHER_MARKER:
            out.write(f"removed {file.path}: Backups leaves the menus and the dock\n")
        else:
            out.write(f"removed {file.path}: running agents stop when their session ends\n")
            links = _enabled_links(file.path)
            if links:
                log.warning(
                    "%s still enable the removed unit: remove them with sudo systemctl --global disable "
                    "backup-agent.service (and each user's systemctl --user disable backup-agent.service)",
                    ", ".join(links),
                )
    if foreign:
        raise UsageError(
            f"{', '.join(foreign)} {'was' if len(foreign) == 1 else 'were'} not written by backup-agent install "
            "(the first line is not our marker): left in place; remove it yourself if it is no longer wanted"
        )
    return 0


def _enabled_links(unit: str) -> list[str]:
    """The ``*.wants/`` links beside ``unit`` that name it (``systemctl --global enable`` made them)."""
    directory, name = os.path.split(unit)
    found: list[str] = []
    try:
        entries = sorted(os.listdir(directory))
    except OSError:
        return found
    for entry in entries:
        link = os.path.join(directory, entry, name)
        if entry.endswith(".wants") and os.path.islink(link):
            found.append(link)
    return found
