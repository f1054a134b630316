"""`backup-agent install` / `uninstall`: the sudoers drop-in, its checks, and removing only our own file.

The rule's text is a pure function (``sudoers_rule``), checked here against
the real ``visudo -csf`` (strict). The refusals run the CLI as a console script, as
pip installs it: a root-owned stand-in in a trusted directory, or copies in
places others can write. The file work is tested on a drop-in path in a
root-owned temporary directory; one round trip uses the real
/etc/sudoers.d/backup-agent, only when none is installed there.
"""

from __future__ import annotations

import contextlib
import io
import os
import pwd
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, TypedDict

import pytest

from agent.system import install as installer
from agent.core.commands import SAFE_PATH
from agent.config.trust import untrusted_program
from agent.core.errors import EXIT_USAGE, CommandError, UsageError
from agent.config.model import Disk
from tests import test_udev
from tests.test_udev import loops, luks_image  # noqa: F401 (fixtures)

from agent.system.install import (
    LAUNCHER_MARKER,
    MARKER,
    RULES_MARKER,
    UNIT_MARKER,
    Program,
    agent_argvs,
    console_script,
    sudoers_rule,
    trust_problem,
    launcher_entry,
    udev_rules,
    user_unit,
)

REPO = Path(__file__).resolve().parent.parent
EXE = "/usr/local/sbin/backup-agent"
VISUDO = shutil.which("visudo", path=SAFE_PATH)
needs_visudo = pytest.mark.skipif(VISUDO is None, reason="visudo missing: apt-get install -y sudo")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (root-owned trees, chown): run the suite as root")

EXAMPLE = f"""{MARKER}
# alice may start the root backup cycle, eject a backup disk and open it read-only, and nothing else:
# sudo compares the arguments word for word, so any other option or subcommand asks for
# a password. The caller's environment is not kept (no LD_*, PYTHON*, PATH): only sudo's
# minimal one reaches backup-agent.
Defaults!{EXE} env_reset, !env_keep, !env_check, !setenv, secure_path="{SAFE_PATH}"
alice ALL = (root) NOPASSWD: {EXE} backup --json, \\
    {EXE} backup --json --disk backup1, \\
    {EXE} backup --json --disk usb.2-B_x, \\
    {EXE} eject --json --disk backup1, \\
    {EXE} eject --json --disk usb.2-B_x, \\
    {EXE} open --json --disk backup1, \\
    {EXE} open --json --disk usb.2-B_x, \\
    {EXE} backup --json --disk backup1 --passphrase-stdin, \\
    {EXE} open --json --disk backup1 --passphrase-stdin, \\
    {EXE} backup --json --disk usb.2-B_x --passphrase-stdin, \\
    {EXE} open --json --disk usb.2-B_x --passphrase-stdin
"""


def visudo_accepts(text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    assert VISUDO is not None
    path = tmp_path / "rule"
    path.write_text(text)
    return subprocess.run([VISUDO, "-c", "-s", "-f", str(path)], capture_output=True, text=True, timeout=30)


# -- the rule (pure) -------------------------------------------------------------


def test_the_rule_allows_exactly_the_agents_forms() -> None:
    assert sudoers_rule("alice", EXE, ["backup1", "usb.2-B_x", "backup1"]) == EXAMPLE
    assert agent_argvs(["backup1"]) == (
        ("backup", "--json"), ("backup", "--json", "--disk", "backup1"), ("eject", "--json", "--disk", "backup1"),
        ("open", "--json", "--disk", "backup1"),
        ("backup", "--json", "--disk", "backup1", "--passphrase-stdin"),
        ("open", "--json", "--disk", "backup1", "--passphrase-stdin"),
    )


def test_without_disks_the_rule_allows_backup_json_only() -> None:
    rule = sudoers_rule("bob", "/opt/backup-agent/bin/backup-agent", [])
    assert rule.splitlines()[-1] == "bob ALL = (root) NOPASSWD: /opt/backup-agent/bin/backup-agent backup --json"


@needs_visudo
def test_visudo_accepts_the_rule(tmp_path: Path) -> None:
    for text in (EXAMPLE, sudoers_rule("_svc.user-1", "/opt/x+y/.venv/bin/backup-agent", ["ALL", "a"])):
        checked = visudo_accepts(text, tmp_path)
        assert checked.returncode == 0, checked.stderr


@needs_visudo
def test_the_visudo_check_can_fail(tmp_path: Path) -> None:
    """visudo is a real check: a rule with a syntax error, or an undefined alias (strict), is refused."""
    assert visudo_accepts(EXAMPLE.replace("(root)", "(root"), tmp_path).returncode != 0
    assert visudo_accepts(MARKER + "\nalice ALL = NOPASSWD\n", tmp_path).returncode != 0


@pytest.mark.parametrize(
    "user",
    ["", "ALL", "Alice", "root", "%sudo", "#0", "+net", "a b", "a,b", "a:b", "a=b", "a\\b", "a!", "a#", "1abc",
     "a\nb", "alice\n", "a*", "x" * 33, "é"],
)
def test_user_names_sudoers_would_not_take_literally_are_refused(user: str) -> None:
    with pytest.raises(UsageError, match="user name|root needs no sudo rule"):
        sudoers_rule(user, EXE, [])


@pytest.mark.parametrize(
    "name", ["", "a b", "*", "a*", "a?", "[a]", "a,b", "a:b", "a=b", "a\\b", "-x", ".x", "a\n", "a#b", 'a"b', "x" * 65]
)
def test_disk_names_sudoers_would_not_take_literally_are_refused(name: str) -> None:
    with pytest.raises(UsageError, match="disk name"):
        sudoers_rule("alice", EXE, ["ok", name])


@pytest.mark.parametrize(
    "executable",
    ["backup-agent", "./backup-agent", "/usr/local/sbin/", "/a b/backup-agent", "/a//backup-agent",
     "/a/./backup-agent", "/a/../backup-agent", "/a/*", "/a,b/x", "/a:b/x", "/a=b/x", "/a\\b", "/a\nb", "/" + "a" * 1100],
)
def test_executables_sudoers_would_not_take_literally_are_refused(executable: str) -> None:
    with pytest.raises(UsageError, match="executable path"):
        sudoers_rule("alice", executable, [])


# -- which program, and whether root alone controls it ----------------------------


@pytest.fixture
def trusted_python(request: pytest.FixtureRequest) -> str:
    """The real interpreter behind this venv, when root alone controls it.

    A checkout (and so its .venv) may lie anywhere, /tmp included; the
    interpreter the venv links to is what an installation would use.
    """
    python = os.path.realpath(sys.executable)
    problem = untrusted_program(python)
    if problem is not None:
        request.applymarker(pytest.mark.may_skip)
        pytest.skip(reason=f"the Python running the tests, {python}, is not root's alone ({problem}): no trusted install to test")
    return python


@pytest.fixture
def trusted_agent(trusted_dir: Path) -> str:
    """A copy of this checkout's agent package where root alone may change it; the stand-in line that uses it."""
    lib = trusted_dir / "lib"
    shutil.copytree(REPO / "agent", lib / "agent", ignore=shutil.ignore_patterns("__pycache__"))
    for directory, _dirs, files in os.walk(lib):
        os.chmod(directory, 0o755)
        for name in files:
            os.chmod(os.path.join(directory, name), 0o644)
    return f"sys.path.insert(0, {str(lib)!r})\n"


def trusted_only(trusted_python: str, trusted_dir: Path) -> Callable[..., str | None]:
    """install's trust check, looking at the trusted copy instead of this test process's checkout."""
    real = installer.trust_problem

    def check(program: Program, **_ignored: object) -> str | None:
        return real(program, python=trusted_python, search_path=[str(trusted_dir / "lib")], code=[])

    return check


def stand_in(directory: Path, interpreter: str = sys.executable, *, extra: str = "") -> Path:
    """A console script as pip writes it, running this checkout's CLI (``extra``: lines before the import)."""
    path = directory / "backup-agent"
    path.write_text(
        f"#!{interpreter}\n# -*- coding: utf-8 -*-\nimport re\nimport sys\n{extra}from agent.cli import main\n"
        "if __name__ == '__main__':\n    sys.exit(main())\n"
    )
    path.chmod(0o755)
    return path


def test_console_script_names_the_file_and_its_interpreter(tmp_path: Path) -> None:
    script = stand_in(tmp_path)
    assert console_script(str(script)) == Program(str(script), sys.executable)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("import sys\nfrom agent.cli import main\n", "not backup-agent's console script"),
        ("#!/bin/sh\necho hello\n", "not backup-agent's console script"),
        ("#!/usr/bin/env python3\nfrom agent.cli import main\n", "named by absolute path"),
        ("#!python3\nfrom agent.cli import main\n", "named by absolute path"),
        ("#!/nonexistent/python3\nfrom agent.cli import main\n", "does not exist"),
    ],
)
def test_console_script_refuses_what_is_not_one(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "backup-agent"
    path.write_text(text)
    with pytest.raises(UsageError, match=problem):
        console_script(str(path))


def test_python_m_is_not_the_installed_command() -> None:
    with pytest.raises(UsageError, match="not backup-agent's console script"):
        console_script(str(REPO / "agent" / "__main__.py"))


@needs_root
def test_a_root_owned_program_in_root_owned_directories_is_trusted(trusted_dir: Path, trusted_python: str) -> None:
    script = stand_in(trusted_dir, trusted_python)
    program = console_script(str(script))
    assert trust_problem(program, python=trusted_python, search_path=[str(trusted_dir)], code=[str(script)]) is None


@needs_root
def test_trust_problem_names_each_part_others_could_change(trusted_dir: Path, tmp_path: Path, trusted_python: str) -> None:
    script = stand_in(trusted_dir, trusted_python)
    good = console_script(str(script))

    def problem(**changes: object) -> str | None:
        arguments: dict[str, object] = {"python": trusted_python, "search_path": [str(trusted_dir)], "code": []}
        arguments.update(changes)
        program = arguments.pop("program", good)
        return trust_problem(program, **arguments)  # type: ignore[arg-type]

    assert problem() is None
    copy = stand_in(tmp_path)  # under /tmp: anyone may write there
    assert (problem(program=Program(str(copy), sys.executable)) or "").startswith(f"the executable {copy} is not root's alone")
    assert (problem(program=Program(str(script), str(copy))) or "").startswith("its Python interpreter")
    assert (problem(python=str(copy)) or "").startswith("the running Python")
    assert (problem(search_path=[str(trusted_dir), str(tmp_path)]) or "").startswith(f"Python's module directory {tmp_path}")
    assert (problem(code=[str(copy)]) or "").startswith("backup-agent's code")
    owned = trusted_dir / "owned"
    owned.mkdir()
    os.chown(owned, 54321, 54321)  # a directory another user owns
    assert "owned by uid 54321" in (problem(search_path=[str(owned)]) or "")
    group = trusted_dir / "group"
    group.mkdir()
    group.chmod(0o775)
    assert "writable by group or others" in (problem(search_path=[str(group)]) or "")


# -- the CLI ----------------------------------------------------------------------


def run(argv: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SUDO_")}
    environment.update(env)
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd="/", env=environment)


def sections(stdout: str) -> dict[str, tuple[str, str]]:
    """install --dry-run's output: path -> (what its header says after the path, the file's text)."""
    shown: dict[str, tuple[str, str]] = {}
    path = ""
    for line in stdout.splitlines(keepends=True):
        if line.startswith("would write "):
            path, _, rest = line[len("would write "):].partition(" ")
            assert rest.endswith(":\n"), line
            shown[path] = (rest[:-2], "")
        else:
            assert path, f"text before the first header: {line!r}"
            shown[path] = (shown[path][0], shown[path][1] + line)
    return shown


def some_user() -> str:
    """An existing user other than root whose name sudoers takes as it is."""
    for entry in pwd.getpwall():
        if entry.pw_uid != 0 and installer.USER_RE.fullmatch(entry.pw_name):
            return entry.pw_name
    pytest.fail("no user other than root on this system")


@pytest.mark.integration
@needs_visudo
@needs_root
def test_install_dry_run_shows_a_rule_visudo_accepts_and_writes_nothing(
    trusted_dir: Path, tmp_path: Path, trusted_python: str, trusted_agent: str
) -> None:
    script = stand_in(trusted_dir, trusted_python, extra=trusted_agent)
    before = sorted(os.listdir("/etc/sudoers.d"))
    others = [os.path.lexists(path) for path in (installer.RULES_FILE, installer.UNIT_FILE, installer.LAUNCHER_FILE)]
    user = some_user()
    result = run([str(script), "install", "--dry-run", "--user", user])
    assert result.returncode == 0, result.stderr
    shown = sections(result.stdout)
    assert [(path, header) for path, (header, _) in shown.items()] == [
        (installer.DROP_IN, "(mode 0440, owner root:root), which visudo -csf accepts"),
        (installer.RULES_FILE, "(mode 0644, owner root:root), then run udevadm control --reload"),
        (installer.UNIT_FILE, "(mode 0644, owner root:root)"),
        (installer.LAUNCHER_FILE, "(mode 0644, owner root:root)"),
    ]
    text = shown[installer.DROP_IN][1]
    assert text.startswith(MARKER + "\n")
    assert shown[installer.RULES_FILE][1].startswith(RULES_MARKER + "\n")
    assert shown[installer.UNIT_FILE][1] == user_unit(str(script))
    assert shown[installer.LAUNCHER_FILE][1] == launcher_entry(str(script))
    assert f"{user} ALL = (root) NOPASSWD: {script} backup --json" in text
    assert visudo_accepts(text, tmp_path).returncode == 0
    assert sorted(os.listdir("/etc/sudoers.d")) == before
    assert [os.path.lexists(path) for path in (installer.RULES_FILE, installer.UNIT_FILE, installer.LAUNCHER_FILE)] == others
    # Through sudo (SUDO_USER set by sudo), the user who ran sudo is the default.
    through = run([str(script), "install", "-n"], SUDO_UID="4242", SUDO_USER=user)
    assert through.returncode == 0, through.stderr
    assert through.stdout == result.stdout


@pytest.mark.integration
@needs_root
def test_install_refuses_a_copy_in_a_directory_others_can_write(tmp_path: Path) -> None:
    script = stand_in(tmp_path)  # under /tmp, as a copy in ~/.local would be the user's
    result = run([str(script), "install", "--dry-run", "--user", some_user()])
    assert result.returncode == EXIT_USAGE
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"backup-agent: refusing to install a sudo rule for {script}: the executable {script}")
    assert "~/.local" in result.stderr and "README" in result.stderr


@pytest.mark.integration
@needs_root
def test_install_refuses_an_interpreter_in_a_directory_another_user_owns(trusted_dir: Path) -> None:
    userbin = trusted_dir / "userbin"
    userbin.mkdir()
    os.symlink(os.path.realpath(sys.executable), userbin / "python3")
    os.chown(userbin, 54321, 54321)
    # Not a venv any more: the stand-in finds the checkout itself.
    script = stand_in(trusted_dir, str(userbin / "python3"), extra=f"sys.path.insert(0, {str(REPO)!r})\n")
    result = run([str(script), "install", "--dry-run", "--user", some_user()])
    assert result.returncode == EXIT_USAGE, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert f"its Python interpreter {userbin / 'python3'} is not root's alone: {userbin} is owned by uid 54321" in result.stderr


@pytest.mark.integration
@needs_root
def test_install_needs_a_user_and_root(trusted_dir: Path, trusted_python: str, trusted_agent: str) -> None:
    script = stand_in(trusted_dir, trusted_python, extra=trusted_agent)
    missing = run([str(script), "install", "--dry-run"])
    assert missing.returncode == EXIT_USAGE
    assert "give --user NAME" in missing.stderr
    for user, problem in (("root", "root needs no sudo rule"), ("bkatest-nosuchuser", "no such user")):
        result = run([str(script), "install", "-n", "--user", user])
        assert result.returncode == EXIT_USAGE and problem in result.stderr, result.stderr


def test_install_and_uninstall_refuse_without_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(UsageError, match="needs root: run it with sudo"):
        installer.install(user="alice", dry_run=False, argv0=str(stand_in(tmp_path)))
    with pytest.raises(UsageError, match="needs root: run it with sudo"):
        installer.uninstall(dry_run=False, drop_in=str(tmp_path / "backup-agent"))


# -- writing and removing the three files ---------------------------------------


@pytest.fixture
def sudoers_dir(trusted_dir: Path) -> Path:
    directory = trusted_dir / "etc" / "sudoers.d"
    directory.mkdir(mode=0o755, parents=True)
    return directory


class Targets(TypedDict):
    drop_in: str
    rules: str
    unit: str
    launcher: str


@pytest.fixture
def targets(sudoers_dir: Path) -> Targets:
    """install's four paths under a root-owned temporary etc (the other directories not made yet)."""
    etc = sudoers_dir.parent
    return Targets(
        drop_in=str(sudoers_dir / "backup-agent"),
        rules=str(etc / "udev" / "rules.d" / "70-backup-agent.rules"),
        unit=str(etc / "systemd" / "user" / "backup-agent.service"),
        launcher=str(etc / "applications" / "backup-agent.desktop"),
    )


def written(targets: Targets) -> list[str]:
    """Every file under the temporary etc (relative), temporary files included."""
    etc = Path(targets["drop_in"]).parent.parent
    return sorted(str(path.relative_to(etc)) for path in etc.rglob("*") if not path.is_dir())


ALL_FOUR = ["applications/backup-agent.desktop", "sudoers.d/backup-agent", "systemd/user/backup-agent.service",
            "udev/rules.d/70-backup-agent.rules"]


@pytest.mark.integration
@needs_visudo
@needs_root
def test_install_writes_the_four_files_atomically_and_replaces_only_its_own(
    trusted_dir: Path,
    targets: Targets,
    trusted_python: str,
    trusted_agent: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # In this process the checkout is what Python imports from: the trust
    # check looks at a trusted copy instead (it is tested on its own above).
    monkeypatch.setattr(installer, "trust_problem", trusted_only(trusted_python, trusted_dir))
    script = stand_in(trusted_dir, trusted_python, extra=trusted_agent)
    out = io.StringIO()
    user = some_user()
    assert installer.install(user=user, dry_run=False, argv0=str(script), out=out, **targets) == 0
    assert written(targets) == ALL_FOUR  # no temporary file left
    expected = {
        "drop_in": (sudoers_rule(user, str(script), []), 0o440),
        "rules": (udev_rules([]), 0o644),
        "unit": (user_unit(str(script)), 0o644),
        "launcher": (launcher_entry(str(script)), 0o644),
    }
    paths: dict[str, str] = dict(targets)
    for key, (text, mode) in expected.items():
        info = os.lstat(paths[key])
        assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == mode, key
        assert (info.st_uid, info.st_gid) == (0, 0)
        assert Path(paths[key]).read_text() == text
    lines = out.getvalue().splitlines()
    assert lines[0].startswith(f"wrote {targets['drop_in']}: {user} may now run as root")
    assert lines[1].startswith(f"wrote {targets['rules']}: udev marks no disk")
    assert lines[2].startswith(f"wrote {targets['unit']}: the desktop agent for every user")
    assert lines[3].startswith(f"wrote {targets['launcher']}: \"Backups\" for the menus and the dock")
    # Run again: ours, so replaced.
    assert installer.install(user=user, dry_run=False, argv0=str(script), out=io.StringIO(), **targets) == 0
    assert written(targets) == ALL_FOUR
    # Someone else's file of any of the four names is never overwritten, and then nothing is written.
    for key in paths:
        for other in paths.values():
            if os.path.lexists(other):
                os.unlink(other)
        Path(paths[key]).write_text("foreign\n")
        with pytest.raises(UsageError, match="was not written by backup-agent install"):
            installer.install(user=user, dry_run=False, argv0=str(script), out=io.StringIO(), **targets)
        assert Path(paths[key]).read_text() == "foreign\n"
        assert [path for path in paths.values() if os.path.lexists(path)] == [paths[key]]


@pytest.mark.integration
@needs_visudo
@needs_root
def test_install_dry_run_into_a_root_shows_four_files_and_writes_nothing(
    trusted_dir: Path, targets: Targets, trusted_python: str, trusted_agent: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(installer, "trust_problem", trusted_only(trusted_python, trusted_dir))
    script = stand_in(trusted_dir, trusted_python, extra=trusted_agent)
    out = io.StringIO()
    user = some_user()
    assert installer.install(user=user, dry_run=True, argv0=str(script), out=out, **targets) == 0
    assert sections(out.getvalue()) == {
        targets["drop_in"]: ("(mode 0440, owner root:root), which visudo -csf accepts", sudoers_rule(user, str(script), [])),
        targets["rules"]: ("(mode 0644, owner root:root), then run udevadm control --reload", udev_rules([])),
        targets["unit"]: ("(mode 0644, owner root:root)", user_unit(str(script))),
        targets["launcher"]: ("(mode 0644, owner root:root)", launcher_entry(str(script))),
    }
    assert written(targets) == []


@pytest.mark.integration
@needs_visudo
@needs_root
def test_a_rule_visudo_refuses_is_never_put_in_place(
    trusted_dir: Path, targets: Targets, monkeypatch: pytest.MonkeyPatch, trusted_python: str, trusted_agent: str
) -> None:
    monkeypatch.setattr(installer, "trust_problem", trusted_only(trusted_python, trusted_dir))
    monkeypatch.setattr(installer, "sudoers_rule", lambda *args: MARKER + "\nalice ALL = NOPASSWD\n")
    script = stand_in(trusted_dir, trusted_python, extra=trusted_agent)
    with pytest.raises(CommandError, match="visudo -csf refused the sudo rule, so nothing was installed"):
        installer.install(user=some_user(), dry_run=False, argv0=str(script), **targets)
    assert written(targets) == []


def test_uninstall_removes_only_our_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    paths = {key: tmp_path / name for key, name in (("drop_in", "sudo"), ("rules", "rules"), ("unit", "unit"),
                                                    ("launcher", "launcher"))}
    targets = Targets(drop_in=str(paths["drop_in"]), rules=str(paths["rules"]), unit=str(paths["unit"]),
                      launcher=str(paths["launcher"]))
    markers = {"drop_in": MARKER, "rules": RULES_MARKER, "unit": UNIT_MARKER, "launcher": LAUNCHER_MARKER}
    out = io.StringIO()
    assert installer.uninstall(dry_run=False, out=out, **targets) == 0
    assert out.getvalue() == "".join(f"nothing to remove: {path} does not exist\n" for path in targets.values())
    for key, target in paths.items():
        marker = markers[key]
        others = [m for m in markers.values() if m != marker]
        for foreign in ("alice ALL = (ALL) ALL\n", "# backup-agent\n" + marker + "\n", marker + " (edited)\n", "",
                        others[0] + "\n"):
            target.write_text(foreign)
            with pytest.raises(UsageError, match="was not written by backup-agent install.*left in place"):
                installer.uninstall(dry_run=False, out=io.StringIO(), **targets)
            assert target.read_text() == foreign
        target.unlink()
        ours = tmp_path / f"ours-{key}"
        ours.write_text(marker + "\nsome text\n")
        target.symlink_to(ours)  # a link to a file of ours is not the file install wrote
        with pytest.raises(UsageError, match="left in place"):
            installer.uninstall(dry_run=False, out=io.StringIO(), **targets)
        assert target.is_symlink()
        target.unlink()
    for key, target in paths.items():
        os.rename(tmp_path / f"ours-{key}", target)
    # All four ours: dry run names them, then they go.
    out = io.StringIO()
    assert installer.uninstall(dry_run=True, out=out, **targets) == 0
    assert out.getvalue() == "".join(f"would remove {path}\n" for path in targets.values())
    assert all(path.exists() for path in paths.values())
    out = io.StringIO()
    assert installer.uninstall(dry_run=False, out=out, **targets) == 0
    assert [line.partition(":")[0] for line in out.getvalue().splitlines()] == [f"removed {p}" for p in targets.values()]
    assert not any(path.exists() for path in paths.values())
    # One foreign file: the others are still removed, and the foreign one is named.
    paths["rules"].write_text("foreign\n")
    for key in ("drop_in", "unit", "launcher"):
        paths[key].write_text(markers[key] + "\n")
    with pytest.raises(UsageError, match=f"{paths['rules']} was not written"):
        installer.uninstall(dry_run=False, out=io.StringIO(), **targets)
    assert [path.name for path in tmp_path.iterdir()] == ["rules"]


@pytest.mark.integration
@needs_visudo
@needs_root
def test_install_and_uninstall_for_real_in_etc(
    trusted_dir: Path, request: pytest.FixtureRequest, trusted_python: str, trusted_agent: str
) -> None:
    real = (installer.DROP_IN, installer.RULES_FILE, installer.UNIT_FILE, installer.LAUNCHER_FILE)
    present = [path for path in real if os.path.lexists(path)]
    if present:
        request.applymarker(pytest.mark.may_skip)
        pytest.skip(reason=f"{', '.join(present)} exists (backup-agent is installed here): left alone")
    script = stand_in(trusted_dir, trusted_python, extra=trusted_agent)
    user = some_user()
    try:
        dry = run([str(script), "install", "-n", "--user", user])
        assert dry.returncode == 0, dry.stderr
        result = run([str(script), "install", "--user", user])
        assert result.returncode == 0, result.stderr
        shown = sections(dry.stdout)
        assert list(shown) == list(real)
        for path in real:
            assert Path(path).read_text() == shown[path][1]
        info = os.lstat(installer.DROP_IN)
        assert stat.S_IMODE(info.st_mode) == 0o440 and (info.st_uid, info.st_gid) == (0, 0)
        assert [stat.S_IMODE(os.lstat(path).st_mode) for path in real[1:]] == [0o644, 0o644, 0o644]
        assert not [name for name in os.listdir("/etc/sudoers.d") if name.startswith(".backup-agent")]
        whole = subprocess.run([VISUDO or "visudo", "-c"], capture_output=True, text=True, timeout=30)
        assert whole.returncode == 0, whole.stdout + whole.stderr
        listed = subprocess.run(["sudo", "-l", "-U", user], capture_output=True, text=True, timeout=30)
        assert f"(root) NOPASSWD: {script} backup --json" in listed.stdout
        dry_uninstall = run([str(script), "uninstall", "--dry-run"])
        assert dry_uninstall.stdout == "".join(f"would remove {path}\n" for path in real)
        assert all(os.path.exists(path) for path in real)
        removed = run([str(script), "uninstall"])
        assert removed.returncode == 0 and removed.stdout.startswith(f"removed {installer.DROP_IN}")
        assert not any(os.path.lexists(path) for path in real)
    finally:
        for path, marker in zip(real, (MARKER, RULES_MARKER, UNIT_MARKER, LAUNCHER_MARKER)):
            if os.path.lexists(path) and installer._is_ours(path, marker):
                os.unlink(path)


# -- the udev rule and the user unit ------------------------------------------------

UUID = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"


def disk(name: str = "backup1", uuid: str = UUID, mapped: str | None = None) -> Disk:
    return Disk(
        name=name,
        luks_uuid=uuid,
        mount_point="/mnt/backup",
        mapped_device=mapped or f"/dev/mapper/{name}",
        repository="/mnt/backup/host",
    )


def test_the_udev_rule_marks_each_disk_and_hides_it_and_runs_nothing() -> None:
    text = udev_rules([disk(), disk("usb.2-B_x", UUID.upper().replace("0F1E", "aaaa"), "/dev/mapper/other")])
    lines = text.splitlines()
    assert lines[0] == RULES_MARKER
    assert 'SUBSYSTEM!="block", GOTO="backup_agent_end"' in lines and lines[-1] == 'LABEL="backup_agent_end"'
    assert (
        f'ENV{{ID_FS_TYPE}}=="crypto_LUKS", ENV{{ID_FS_UUID}}=="{UUID}|{UUID.upper()}", '
        'ENV{BACKUP_AGENT_DISK}="backup1", ENV{UDISKS_IGNORE}="1"'
    ) in lines
    assert 'ENV{DM_NAME}=="backup1", ENV{UDISKS_IGNORE}="1"' in lines
    assert any('ENV{BACKUP_AGENT_DISK}="usb.2-B_x"' in line for line in lines)
    assert not any("DM_NAME" in line and "usb.2-B_x" in line for line in lines)  # its mapped device is another name
    rules = [line for line in lines if line and not line.startswith("#")]
    assert not any("RUN" in line or "PROGRAM" in line or "IMPORT" in line for line in rules)
    assert udev_rules([]).count("\n") == len(udev_rules([]).splitlines())


@pytest.mark.parametrize(
    ("name", "uuid"),
    [('a"b', UUID), ("a b", UUID), ("", UUID), ("ok", 'x", RUN+="/bin/sh'), ("ok", UUID + "0"), ("ok", "")],
)
def test_the_udev_rule_refuses_what_it_cannot_quote(name: str, uuid: str) -> None:
    with pytest.raises(UsageError, match="cannot go in a udev rule"):
        udev_rules([disk(name, uuid, "/dev/mapper/x")])


def test_the_user_unit_runs_the_installed_command_and_survives_its_cycle() -> None:
    text = user_unit(EXE)
    assert text.startswith(UNIT_MARKER + "\n")
    for line in (
        "Type=notify", "NotifyAccess=main", f"ExecStart={EXE} run", "Restart=on-failure", "WatchdogSec=60",
        "KillMode=process", "PartOf=graphical-session.target", "After=graphical-session.target",
        "WantedBy=graphical-session.target",
    ):
        assert line in text.splitlines(), line
    with pytest.raises(UsageError):
        user_unit("/opt/with space/backup-agent")
    with pytest.raises(UsageError):
        user_unit("/opt/100%/backup-agent")  # % is a systemd specifier


def test_the_files_in_the_checkout_are_what_install_writes() -> None:
    unit = (REPO / "systemd-user" / "backup-agent.service").read_text()
    assert UNIT_MARKER + "\n" + unit == user_unit("/usr/local/sbin/backup-agent")
    entry = (REPO / "applications" / "backup-agent.desktop").read_text()
    assert LAUNCHER_MARKER + "\n" + entry == launcher_entry("/usr/local/sbin/backup-agent")
    example = (REPO / "udev" / "70-backup-agent.rules").read_text()
    assert RULES_MARKER + "\n" + example == udev_rules([disk()])


def _ini(text: str) -> dict[str, dict[str, str]]:
    """A systemd unit as sections of keys (each key once, no continuation lines)."""
    sections: dict[str, dict[str, str]] = {}
    current = None
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            assert line.endswith("]") and line[1:-1] not in sections, line
            current = sections.setdefault(line[1:-1], {})
            continue
        key, equals, value = line.partition("=")
        assert current is not None and equals and key.isalnum() and key not in current, line
        current[key] = value
    return sections


def test_the_user_unit_parses_as_a_unit() -> None:
    sections = _ini(user_unit(EXE))
    assert list(sections) == ["Unit", "Service", "Install"]
    assert sections["Service"]["Type"] == "notify" and sections["Service"]["KillMode"] == "process"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing (apt-get install systemd)")
def test_systemd_analyze_verify_accepts_the_user_unit(tmp_path: Path) -> None:
    """``systemd-analyze verify --user``, with a private runtime directory (no user manager needed).

    verify exits 0 even for a key it ignores, so any message counts as a failure.
    """
    program = tmp_path / "bin" / "backup-agent"
    program.parent.mkdir()
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o755)
    unit = tmp_path / "units" / "backup-agent.service"
    unit.parent.mkdir()
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}

    def verify(text: str) -> subprocess.CompletedProcess[str]:
        unit.write_text(text)
        return subprocess.run(
            ["systemd-analyze", "verify", "--user", str(unit)], capture_output=True, text=True, timeout=60, env=env
        )

    good = verify(user_unit(str(program)))
    if "Failed to initialize manager" in good.stderr:
        pytest.skip(reason=f"systemd-analyze verify --user cannot run here: {good.stderr.strip()}")
    assert good.returncode == 0 and good.stderr == "", good.stderr
    bad = verify(user_unit(str(program)).replace("KillMode=process", "KillMode=proces"))
    assert "kill mode" in bad.stderr  # the check can fail


# -- the udev rule on a real device ----------------------------------------------------


@pytest.mark.integration
def test_udev_applies_the_rule_to_a_real_luks_device(luks_image: tuple[Path, str], loops: Any) -> None:
    """``udevadm test`` on a loop device holding a real LUKS header, with the rule in /run/udev/rules.d.

    The rule goes under a name of its own in /run (not /etc), removed after;
    ``udevadm test`` runs the rules without applying anything or running RUN.
    """
    missing = test_udev._missing_parts()
    if missing is not None:
        pytest.skip(reason=missing)
    image, uuid = luks_image
    device = loops.attach(image)
    directory = Path("/run/udev/rules.d")
    made = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    rule = directory / f"70-backup-agent-test-{os.getpid()}.rules"
    rule.write_text(udev_rules([disk("bkatest-disk", uuid)]))
    try:
        name = os.path.basename(device)
        result = subprocess.run(
            ["udevadm", "test", "--action=change", f"/sys/class/block/{name}"],
            capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        shown = result.stdout + result.stderr
        assert f"ID_FS_UUID={uuid}" in shown
        assert "BACKUP_AGENT_DISK=bkatest-disk" in shown and "UDISKS_IGNORE=1" in shown
        # Another disk's UUID leaves the device alone.
        rule.write_text(udev_rules([disk("bkatest-disk", UUID)]))
        other = subprocess.run(
            ["udevadm", "test", "--action=change", f"/sys/class/block/{name}"],
            capture_output=True, text=True, timeout=60,
        )
        assert "BACKUP_AGENT_DISK" not in other.stdout + other.stderr
    finally:
        rule.unlink()
        if made:
            with contextlib.suppress(OSError):
                directory.rmdir()


# -- the launcher -------------------------------------------------------------------


def _desktop_groups(text: str) -> dict[str, dict[str, str]]:
    groups: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("["):
            current = groups.setdefault(line[1:-1], {})
        elif line and not line.startswith("#"):
            key, _, value = line.partition("=")
            current[key] = value
    return groups


def test_the_launcher_is_a_valid_desktop_entry_named_as_the_dock_progress_says(tmp_path: Path) -> None:
    """desktop-file-validate (Debian's desktop-file-utils) accepts it without a word; the docks find it by its
    name, which the launcher entry's application:// URI and the KDE job's desktop entry both give."""
    from agent import cli
    from agent.desktop.dbus import jobview, launcher

    validate = shutil.which("desktop-file-validate")
    if validate is None:
        pytest.skip(reason="desktop-file-validate is not installed: apt-get install -y desktop-file-utils (scripts/test does)")
    name = os.path.basename(installer.LAUNCHER_FILE)
    assert launcher.APP_URI == f"application://{name}" and f"{jobview.DESKTOP_ENTRY}.desktop" == name
    text = launcher_entry(EXE)
    assert text.startswith(LAUNCHER_MARKER + "\n")
    (tmp_path / name).write_text(text)
    result = subprocess.run([validate, str(tmp_path / name)], capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    (tmp_path / "broken.desktop").write_text(text.replace("Type=Application\n", ""))  # the check can fail
    assert subprocess.run([validate, str(tmp_path / "broken.desktop")], capture_output=True, timeout=30).returncode != 0
    groups = _desktop_groups(text)
    entry, stop = groups["Desktop Entry"], groups["Desktop Action stop"]
    assert (entry["Exec"], stop["Exec"], entry["Icon"]) == (f"{EXE} now --notify", f"{EXE} stop --notify", jobview.APP_ICON)
    assert entry["Terminal"] == "false" and "NoDisplay" not in entry  # listed, so it can be pinned to a dock
    parser = cli.build_parser()
    for command in (entry["Exec"], stop["Exec"]):
        parser.parse_args(command.split()[1:])  # real subcommands, in a form the CLI takes
    with pytest.raises(UsageError):
        launcher_entry("/opt/with space/backup-agent")
