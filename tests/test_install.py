"""`backup-agent install` / `uninstall`: the sudoers drop-in, its checks, and removing only our own file.

The rule's text is a pure function (``sudoers_rule``), checked here against
the real ``visudo -csf`` (strict). The refusals run the CLI as a console script, as
pip installs it: a root-owned stand-in in a trusted directory, or copies in
places others can write. The file work is tested on a drop-in path in a
root-owned temporary directory; one round trip uses the real
/etc/sudoers.d/backup-agent, only when none is installed there.
"""

from __future__ import annotations

import io
import os
import pwd
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from agent import install as installer
from agent.commands import SAFE_PATH, Runner
from agent.config import untrusted_program
from agent.errors import EXIT_USAGE, CommandError, UsageError
from agent.install import MARKER, Program, agent_argvs, console_script, sudoers_rule, trust_problem

REPO = Path(__file__).resolve().parent.parent
EXE = "/usr/local/sbin/backup-agent"
VISUDO = shutil.which("visudo", path=SAFE_PATH)
needs_visudo = pytest.mark.skipif(VISUDO is None, reason="visudo missing: apt-get install -y sudo")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (root-owned trees, chown): run the suite as root")

EXAMPLE = f"""{MARKER}
# alice may start the root backup cycle, and nothing else: sudo compares the arguments
# word for word, so any other option or subcommand asks for a password. The caller's
# environment is not kept (no LD_*, PYTHON*, PATH): only sudo's minimal one reaches the cycle.
Defaults!{EXE} env_reset, !env_keep, !env_check, !setenv, secure_path="{SAFE_PATH}"
alice ALL = (root) NOPASSWD: {EXE} backup --json, \\
    {EXE} backup --json --disk backup1, \\
    {EXE} backup --json --disk usb.2-B_x
"""


def visudo_accepts(text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    assert VISUDO is not None
    path = tmp_path / "rule"
    path.write_text(text)
    return subprocess.run([VISUDO, "-c", "-s", "-f", str(path)], capture_output=True, text=True, timeout=30)


# -- the rule (pure) -------------------------------------------------------------


def test_the_rule_allows_exactly_the_agents_forms() -> None:
    assert sudoers_rule("alice", EXE, ["backup1", "usb.2-B_x", "backup1"]) == EXAMPLE
    assert agent_argvs(["backup1"]) == (("backup", "--json"), ("backup", "--json", "--disk", "backup1"))


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
        pytest.skip(f"the Python running the tests, {python}, is not root's alone ({problem}): no trusted install to test")
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
    user = some_user()
    result = run([str(script), "install", "--dry-run", "--user", user])
    assert result.returncode == 0, result.stderr
    header, _, text = result.stdout.partition("\n")
    assert header == "would write /etc/sudoers.d/backup-agent (mode 0440, owner root:root), which visudo -csf accepts:"
    assert text.startswith(MARKER + "\n")
    assert f"{user} ALL = (root) NOPASSWD: {script} backup --json" in text
    assert visudo_accepts(text, tmp_path).returncode == 0
    assert sorted(os.listdir("/etc/sudoers.d")) == before
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


# -- writing and removing the drop-in ---------------------------------------------


@pytest.fixture
def sudoers_dir(trusted_dir: Path) -> Path:
    directory = trusted_dir / "sudoers.d"
    directory.mkdir(mode=0o755)
    return directory


@pytest.mark.integration
@needs_visudo
@needs_root
def test_install_writes_0440_root_atomically_and_replaces_only_its_own(
    trusted_dir: Path, sudoers_dir: Path, trusted_python: str, trusted_agent: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # In this process the checkout is what Python imports from: the trust
    # check looks at a trusted copy instead (it is tested on its own above).
    monkeypatch.setattr(installer, "trust_problem", trusted_only(trusted_python, trusted_dir))
    script = stand_in(trusted_dir, trusted_python, extra=trusted_agent)
    target = sudoers_dir / "backup-agent"
    out = io.StringIO()
    user = some_user()
    assert installer.install(user=user, dry_run=False, argv0=str(script), drop_in=str(target), out=out) == 0
    info = os.lstat(target)
    assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o440 and (info.st_uid, info.st_gid) == (0, 0)
    assert target.read_text() == sudoers_rule(user, str(script), [])
    assert os.listdir(sudoers_dir) == ["backup-agent"]  # no temporary file left
    assert out.getvalue().startswith(f"wrote {target}: {user} may now run as root")
    # Run again: ours, so replaced.
    assert installer.install(user=user, dry_run=False, argv0=str(script), drop_in=str(target), out=io.StringIO()) == 0
    # Someone else's file of that name is never overwritten.
    target.unlink()
    target.write_text("alice ALL = (ALL) ALL\n")
    with pytest.raises(UsageError, match="was not written by backup-agent install"):
        installer.install(user=user, dry_run=False, argv0=str(script), drop_in=str(target), out=io.StringIO())
    assert target.read_text() == "alice ALL = (ALL) ALL\n"


@pytest.mark.integration
@needs_visudo
@needs_root
def test_a_rule_visudo_refuses_is_never_put_in_place(
    trusted_dir: Path, sudoers_dir: Path, monkeypatch: pytest.MonkeyPatch, trusted_python: str, trusted_agent: str
) -> None:
    monkeypatch.setattr(installer, "trust_problem", trusted_only(trusted_python, trusted_dir))
    monkeypatch.setattr(installer, "sudoers_rule", lambda *args: MARKER + "\nalice ALL = NOPASSWD\n")
    script = stand_in(trusted_dir, trusted_python, extra=trusted_agent)
    with pytest.raises(CommandError, match="visudo -csf refused the sudo rule, so nothing was installed"):
        installer.install(user=some_user(), dry_run=False, argv0=str(script), drop_in=str(sudoers_dir / "backup-agent"))
    assert os.listdir(sudoers_dir) == []


def test_uninstall_removes_only_our_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    target = tmp_path / "backup-agent"
    out = io.StringIO()
    assert installer.uninstall(dry_run=False, drop_in=str(target), out=out) == 0
    assert out.getvalue() == f"nothing to remove: {target} does not exist\n"
    for foreign in ("alice ALL = (ALL) ALL\n", "# backup-agent\n" + MARKER + "\n", MARKER + " (edited)\n", ""):
        target.write_text(foreign)
        with pytest.raises(UsageError, match="was not written by backup-agent install.*left in place"):
            installer.uninstall(dry_run=False, drop_in=str(target), out=io.StringIO())
        assert target.read_text() == foreign
    target.unlink()
    ours = tmp_path / "ours"
    ours.write_text(MARKER + "\nalice ALL = (root) NOPASSWD: /x backup --json\n")
    target.symlink_to(ours)  # a link to a file of ours is not the file install wrote
    with pytest.raises(UsageError, match="left in place"):
        installer.uninstall(dry_run=False, drop_in=str(target), out=io.StringIO())
    assert target.is_symlink()
    target.unlink()
    os.rename(ours, target)
    out = io.StringIO()
    assert installer.uninstall(dry_run=True, drop_in=str(target), out=out) == 0
    assert out.getvalue() == f"would remove {target}\n" and target.exists()
    assert installer.uninstall(dry_run=False, drop_in=str(target), out=io.StringIO()) == 0
    assert not target.exists()


@pytest.mark.integration
@needs_visudo
@needs_root
def test_install_and_uninstall_for_real_in_etc_sudoers_d(
    trusted_dir: Path, request: pytest.FixtureRequest, trusted_python: str, trusted_agent: str
) -> None:
    if os.path.lexists(installer.DROP_IN):
        request.applymarker(pytest.mark.may_skip)
        pytest.skip(f"{installer.DROP_IN} exists (backup-agent is installed here): left alone")
    script = stand_in(trusted_dir, trusted_python, extra=trusted_agent)
    user = some_user()
    try:
        dry = run([str(script), "install", "-n", "--user", user])
        result = run([str(script), "install", "--user", user])
        assert result.returncode == 0, result.stderr
        assert Path(installer.DROP_IN).read_text() == dry.stdout.partition("\n")[2]
        info = os.lstat(installer.DROP_IN)
        assert stat.S_IMODE(info.st_mode) == 0o440 and (info.st_uid, info.st_gid) == (0, 0)
        assert not [name for name in os.listdir("/etc/sudoers.d") if name.startswith(".backup-agent")]
        whole = subprocess.run([VISUDO or "visudo", "-c"], capture_output=True, text=True, timeout=30)
        assert whole.returncode == 0, whole.stdout + whole.stderr
        listed = subprocess.run(["sudo", "-l", "-U", user], capture_output=True, text=True, timeout=30)
        assert f"(root) NOPASSWD: {script} backup --json" in listed.stdout
        dry_uninstall = run([str(script), "uninstall", "--dry-run"])
        assert dry_uninstall.stdout == f"would remove {installer.DROP_IN}\n" and os.path.exists(installer.DROP_IN)
        removed = run([str(script), "uninstall"])
        assert removed.returncode == 0 and removed.stdout.startswith(f"removed {installer.DROP_IN}")
        assert not os.path.lexists(installer.DROP_IN)
    finally:
        if os.path.lexists(installer.DROP_IN) and installer._is_ours(installer.DROP_IN):
            os.unlink(installer.DROP_IN)
