"""The narrow door to root: what may run through sudo.

Two locks on one door. sudo itself lets the desktop user run only the exact
argument lists of the rule ``sudoers_rule`` writes (anything else: "a
password is required"); and should a broader rule ever let more through,
the CLI refuses, through sudo, every option and subcommand but the agent's
forms (``through_sudo_refusal``). The pure function is tested option by
option; then both locks for real: a temporary user, a drop-in checked by
visudo, and ``su USER -c 'sudo -n ...'``.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from agent import cli
from agent.config import load as config
from agent.cli import build_parser, main, sudo_door, through_sudo_refusal
from agent.core.commands import SAFE_PATH
from agent.core.errors import ConfigError, EXIT_USAGE
from agent.system.install import agent_argvs, sudoers_rule

REPO = Path(__file__).resolve().parent.parent
DOOR = sudo_door("backup")
# Allowed by the drop-in the real tests write; never a configured disk.
DISK = "bkatest-nodisk"


def refusal(argv: list[str]) -> str | None:
    return through_sudo_refusal(build_parser().parse_args(argv))


# -- the pure refusal ------------------------------------------------------------

REFUSED = [
    (["backup", "--json", "/tmp"], "the SOURCE/DESTINATION argument /tmp"),
    (["backup", "--json", "/tmp", "/tmp/x"], "the SOURCE/DESTINATION argument /tmp"),
    (["backup", "--json", "--config", "/tmp/evil.toml"], "--config"),
    (["backup", "--json", "--config=/etc/backup-agent/config.toml"], "--config"),
    (["--config", "/tmp/evil.toml", "backup", "--json"], "--config"),  # a global option before the subcommand
    (["backup", "--json", "-x", "/home"], "-x/--exclude"),
    (["backup", "--json", "--exclude=/home"], "-x/--exclude"),
    (["backup", "--json", "--exc", ""], "-x/--exclude"),  # an abbreviation is the option it abbreviates
    (["backup", "--json", "--multi-fs"], "--multi-fs"),
    (["backup", "--json", "-i", "realtime"], "-i/--ionice"),
    (["backup", "--json", "--ionice", "none"], "-i/--ionice"),
    (["backup", "--json", "-u"], "-u/--no-sudo"),
    (["backup", "--json", "--no-sudo"], "-u/--no-sudo"),
    (["backup", "--json", "-f"], "-f/--force"),
    (["backup", "--json", "-b"], "-b/--backup"),
    (["backup", "--json", "-s"], "-s/--snapshot"),
    (["backup", "--json", "-r"], "-r/--rotate"),
    (["backup", "--json", "-bsr"], "-b/--backup"),
    (["backup", "--json", "-t", "host::module"], "-t/--tunnel"),
]


@pytest.mark.parametrize(("argv", "named"), REFUSED, ids=[" ".join(argv) for argv, _ in REFUSED])
def test_every_other_backup_option_is_refused_by_name(argv: list[str], named: str) -> None:
    message = refusal(argv)
    assert message is not None
    assert message.startswith(f"{named} is not accepted through sudo")
    assert message.endswith(DOOR)
    assert "\n" not in message


def test_config_refusal_says_what_is_read_instead() -> None:
    assert refusal(["backup", "--json", "--config", "/tmp/evil.toml"]) == (
        f"--config is not accepted through sudo (the cycle reads only {config.SYSTEM_CONFIG}): {DOOR}"
    )


def _backup_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found: argparse.ArgumentParser = action.choices["backup"]
            return found
    raise AssertionError("no subcommands")


ALLOWED_OPTIONS = {
    "-h", "--help", "--json", "--disk", "--remote", "-c", "--crypto", "-m", "--mount", "-n", "--dry-run", "-q", "--quiet",
    "-v", "--verbose", "--disable-notifications", "--passphrase-stdin",
}


def test_every_option_of_the_parser_outside_the_agents_forms_is_refused() -> None:
    """Enumerated from the parser itself, so an option added later is covered (default deny)."""
    checked = []
    for action in _backup_parser()._actions:
        if not action.option_strings or set(action.option_strings) & ALLOWED_OPTIONS:
            continue
        option = action.option_strings[-1]
        value = [] if action.nargs == 0 else [sorted(action.choices)[0] if action.choices else "value"]
        message = refusal(["backup", "--json", option, *value])
        assert message is not None and message.startswith("/".join(action.option_strings)), option
        checked.append(option)
    expected = {"--config", "--backup", "--snapshot", "--rotate", "--tunnel", "--ionice", "--no-sudo", "--multi-fs", "--exclude", "--force"}
    assert expected <= set(checked), checked


ALLOWED = [
    ["backup", "--json"],
    ["backup", "--json", "--disk", "backup1"],
    ["backup", "--disk=backup1", "--json", "--dry-run"],
    ["backup", "--json", "-n", "-q", "--disable-notifications"],
    ["backup", "--json", "-v", "--disk", "backup1"],
    # an administrator's forms: they name a configured disk, nothing else
    ["backup", "--disk", "backup1"],
    ["backup", "-q"],
    ["backup", "-c", "backup1"],
    ["backup", "-m", "/mnt/backup1", "-n"],
    ["init", "--disk", "backup1", "--yes"],
    ["eject", "--json", "--disk", "backup1"],
    ["eject", "--disk", "backup1", "-q"],
    ["list"],
    ["list", "--json"],
    ["list", "--disk", "backup1"],
    ["rotate", "--dry-run", "--json"],
    ["rotate", "--discard-unfinished", "--disk", "backup1"],
    ["open", "--json", "--disk", "backup1"],
    ["-q", "open", "--disk", "backup1"],
    # reading a configured [[remote]] with root's key
    ["verify", "--remote", "nas", "--all"],
    ["versions", "--remote", "nas", "/etc/hosts"],
    ["diff", "--json", "--remote", "nas"],
    # a disk opened with a passphrase the agent asked for, on standard input
    ["backup", "--json", "--disk", "backup1", "--passphrase-stdin"],
    ["open", "--json", "--disk", "backup1", "--passphrase-stdin"],
]


@pytest.mark.parametrize("argv", ALLOWED, ids=[" ".join(argv) for argv in ALLOWED])
def test_the_agents_forms_pass(argv: list[str]) -> None:
    assert refusal(argv) is None


def test_every_form_the_sudo_rule_allows_passes_the_cli_door() -> None:
    for argv in agent_argvs(["backup1", "usb.2"]):
        assert refusal(list(argv)) is None, argv


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["list", "--json", "/repo"], "the REPOSITORY argument /repo"),
        (["list", "--config", "/tmp/evil.toml"], "--config"),
        (["rotate", "/repo"], "the REPOSITORY argument /repo"),
        (["rotate", "--hourly", "0"], "--hourly"),
        (["rotate", "--relaxed"], "--relaxed"),
        (["rotate", "--prefer-recent"], "--prefer-recent"),
        (["restore", "--remote", "nas", "/etc/hosts"], "--remote"),  # writes without a disk restore's caller checks
        (["init", "--disk", "backup1", "--config", "/tmp/evil.toml"], "--config"),
        (["eject", "--json", "--disk", "backup1", "--config", "/tmp/evil.toml"], "--config"),
    ],
)
def test_other_subcommands_take_only_options_that_change_nothing_read_or_written(argv: list[str], named: str) -> None:
    message = refusal(argv)
    assert message is not None and message.startswith(named) and message.endswith(sudo_door(argv[0])), message


def test_a_subcommand_without_a_sudo_form_is_refused() -> None:
    args = build_parser().parse_args(["list"])
    args.command = "run"
    assert through_sudo_refusal(args) == f"`run` is not accepted through sudo: {sudo_door('run')}"


@pytest.mark.parametrize("argv", [["install"], ["install", "--user", "alice", "-n"], ["uninstall"]])
def test_install_and_uninstall_are_run_with_sudo_by_an_administrator(argv: list[str]) -> None:
    assert refusal(argv) is None


def test_an_attribute_the_door_does_not_know_is_refused() -> None:
    args = build_parser().parse_args(["backup", "--json"])
    args.future_option = True
    assert through_sudo_refusal(args) == f"future_option is not accepted through sudo: {DOOR}"


def test_main_refuses_through_sudo_before_anything_is_read(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "running_through_sudo", lambda: True)

    def untouchable(*args: object, **kwargs: object) -> None:
        raise AssertionError("the refused command went on")

    monkeypatch.setattr(cli, "load_settings", untouchable)
    monkeypatch.setattr(cli, "Cycle", untouchable)
    for argv in (["backup", "--json", "/", "/tmp/x"], ["backup", "--json", "--config", "/tmp/evil.toml"], ["list", "/x"]):
        assert main(argv) == EXIT_USAGE
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("backup-agent: ") and "through sudo" in err


def test_help_and_version_answer_through_sudo(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli, "running_through_sudo", lambda: True)
    for argv in (["--version"], ["backup", "--help"], ["list", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
    assert "usage: backup-agent list" in capsys.readouterr().out


# -- a config others can write, through sudo -------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the trusted directory must be root's")
@pytest.mark.parametrize("where", ["file", "directory"])
def test_a_system_config_others_can_write_is_refused_through_sudo(
    trusted_dir: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """The real /etc/backup-agent/config.toml is left alone: SYSTEM_CONFIG points into a root-owned tree."""
    directory = trusted_dir / "etc"
    directory.mkdir(mode=0o755)
    path = directory / "config.toml"
    path.write_text("[backup]\nnice = 5\n")
    path.chmod(0o644)
    monkeypatch.setattr(config, "SYSTEM_CONFIG", str(path))
    assert config.load_settings(through_sudo=True).nice == 5
    (path if where == "file" else directory).chmod(0o666 if where == "file" else 0o777)
    with pytest.raises(ConfigError) as caught:
        config.load_settings(through_sudo=True)
    assert "refusing an unsafe config" in caught.value.message
    assert "writable by group or others" in caught.value.message


# -- for real: a user, sudo, and the CLI as root ---------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (useradd, /etc/sudoers.d): run the suite as root")


def _missing_tools() -> list[str]:
    return [tool for tool in ("sudo", "visudo", "useradd", "userdel", "su") if shutil.which(tool, path=SAFE_PATH) is None]


def _run(argv: list[str], *, check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd="/", check=check)


@pytest.fixture
def real_sudo() -> None:
    if os.geteuid() != 0:
        pytest.skip(reason="needs root (useradd, /etc/sudoers.d): run the suite as root")
    missing = _missing_tools()
    if missing:
        pytest.skip(reason=f"{', '.join(missing)} missing: apt-get install -y sudo passwd")


@pytest.fixture
def test_user(real_sudo: None) -> Iterator[str]:
    """A user made for this test with useradd (no home), removed with userdel afterwards."""
    name = f"bkatest{secrets.randbelow(10**6):06d}"
    _run(["useradd", "-M", "-s", "/bin/sh", name], check=True)
    try:
        yield name
    finally:
        deadline = time.monotonic() + 10
        while True:  # su's session may take a moment to end ("currently used by process")
            result = _run(["userdel", name])
            if result.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if result.returncode != 0:
            _run(["userdel", "-f", name])


@pytest.fixture
def wrapper(trusted_dir: Path) -> Path:
    """A root-owned stand-in for the installed backup-agent: the checkout's CLI, saying who runs it and with what environment."""
    path = trusted_dir / "backup-agent"
    path.write_text(
        "#!/bin/sh\n"
        'echo "wrapper: uid $(id -u)" >&2\n'
        'echo "wrapper: PATH=$PATH" >&2\n'
        'echo "wrapper: env $(env | cut -d= -f1 | sort | tr "\\n" " ")" >&2\n'
        f"cd {REPO} || exit 97\n"
        f'exec {sys.executable} -m agent.cli "$@"\n'
    )
    path.chmod(0o755)
    return path


@pytest.fixture
def drop_in(test_user: str, wrapper: Path) -> Iterator[Path]:
    """The rule sudoers_rule writes for test_user, in /etc/sudoers.d under a name of its own, after visudo -csf."""
    # As if an administrator kept these for this user: the rule's own Defaults must still drop them.
    careless = f'Defaults:{test_user} env_keep += "PYTHONPATH PYTHONINSPECT LD_LIBRARY_PATH BACKUP_AGENT_RUNTIME_DIR"\n'
    text = careless + sudoers_rule(test_user, str(wrapper), [DISK])
    target = Path("/etc/sudoers.d") / test_user  # no "." or "~": sudo reads it
    fd, temporary = tempfile.mkstemp(prefix=".bkatest.", dir="/etc/sudoers.d")  # a ".": sudo skips it
    try:
        with os.fdopen(fd, "w") as stream:
            stream.write(text)
        os.chmod(temporary, 0o440)
        checked = _run(["visudo", "-c", "-s", "-f", temporary])
        assert checked.returncode == 0, checked.stdout + checked.stderr
        os.rename(temporary, target)
        yield target
    finally:
        for path in (temporary, str(target)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def as_user(user: str, command: list[str], environment: str = "") -> subprocess.CompletedProcess[str]:
    line = " ".join(["sudo", "-n", *command])
    return _run(["su", user, "-c", f"{environment} {line}".strip()])


@pytest.mark.integration
def test_sudo_lets_the_user_run_the_agents_form_as_root_with_none_of_their_environment(
    test_user: str, wrapper: Path, drop_in: Path
) -> None:
    poison = "LD_LIBRARY_PATH=/tmp/evil PYTHONPATH=/tmp/evil PYTHONINSPECT=1 BACKUP_AGENT_RUNTIME_DIR=/tmp/evil PATH=/tmp/evil:$PATH"
    result = as_user(test_user, [str(wrapper), "backup", "--json", "--disk", DISK], environment=poison)
    assert "a password is required" not in result.stderr
    assert "wrapper: uid 0\n" in result.stderr, result.stderr
    assert f"wrapper: PATH={SAFE_PATH}\n" in result.stderr
    names = next(line for line in result.stderr.splitlines() if line.startswith("wrapper: env ")).split()[2:]
    assert not [n for n in names if n.startswith(("LD_", "PYTHON", "BACKUP_AGENT"))], names
    assert "SUDO_UID" in names
    # It ran backup-agent, as root through sudo, past the door: no such disk is configured.
    last = result.stderr.splitlines()[-1]
    assert last.startswith("backup-agent: ") and DISK in last, result.stderr
    assert result.returncode == EXIT_USAGE


@pytest.mark.integration
def test_sudo_lets_the_user_eject_a_configured_disk_as_root(test_user: str, wrapper: Path, drop_in: Path) -> None:
    """The tray's form, ``eject --json --disk NAME``, reaches backup-agent as root and passes the door."""
    result = as_user(test_user, [str(wrapper), "eject", "--json", "--disk", DISK])
    assert "a password is required" not in result.stderr
    assert "wrapper: uid 0\n" in result.stderr, result.stderr
    # Past sudo and the door, as root: no such disk is configured in the system config.
    last = result.stderr.splitlines()[-1]
    assert last.startswith(f"backup-agent: --disk {DISK}: no ") and "configured" in last, result.stderr
    assert result.returncode == EXIT_USAGE


@pytest.mark.integration
@pytest.mark.parametrize("command", ["backup", "open"])
def test_sudo_lets_the_user_hand_a_passphrase_on_stdin(test_user: str, wrapper: Path, drop_in: Path, command: str) -> None:
    """The passphrase forms (``--passphrase-stdin`` last) reach backup-agent as root and pass the door; stdin goes along."""
    result = as_user(test_user, [str(wrapper), command, "--json", "--disk", DISK, "--passphrase-stdin"])
    assert "a password is required" not in result.stderr
    assert "wrapper: uid 0\n" in result.stderr, result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith(f"backup-agent: --disk {DISK}: no ") and "configured" in last, result.stderr
    assert result.returncode == EXIT_USAGE


@pytest.mark.integration
@pytest.mark.parametrize(
    "arguments",
    [
        ["backup", "--json", "--passphrase-stdin", "--disk", DISK],
        ["backup", "--json", "--passphrase-stdin"],
        ["open", "--json", "--disk", "another", "--passphrase-stdin"],
        ["eject", "--json", "--disk", DISK, "--passphrase-stdin"],
        ["backup", "--json", "/tmp", "/tmp/x"],
        ["eject", "--disk", DISK],
        ["eject", "--json", "--disk", DISK, "--config", "/tmp/evil.toml"],
        ["eject", "--json", "--disk", "another"],
        ["backup", "--json", "--config", "/tmp/evil.toml"],
        ["backup", "--json", "--disk", DISK, "-x", "/home"],
        ["backup", "--json", "--disk", "another"],
        ["backup", "--disk", DISK],
        ["list"],
        ["install", "--user", "root"],
    ],
)
def test_sudo_itself_refuses_every_other_argument_list(
    test_user: str, wrapper: Path, drop_in: Path, arguments: list[str]
) -> None:
    result = as_user(test_user, [str(wrapper), *arguments])
    assert "a password is required" in result.stderr
    assert "wrapper:" not in result.stderr  # the program never started
    assert result.returncode == 1


@pytest.mark.integration
@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        (["backup", "--json", "{tmp}", "{tmp}/x"], "the SOURCE/DESTINATION argument"),
        (["backup", "--json", "--config", "{tmp}/evil.toml"], "--config"),
        (["backup", "--json", "-x", "/home"], "-x/--exclude"),
        (["backup", "--json", "--no-sudo", "{tmp}/x"], "-u/--no-sudo"),
        (["backup", "--json", "--multi-fs"], "--multi-fs"),
        (["list", "{tmp}/x"], "the REPOSITORY argument"),
        (["rotate", "--hourly", "0", "{tmp}/x"], "--hourly"),
    ],
)
def test_the_cli_as_root_with_sudo_uid_refuses_with_one_line_and_touches_nothing(
    real_sudo: None, cli_argv: list[str], tmp_path: Path, arguments: list[str], named: str
) -> None:
    """Root with SUDO_UID set, as sudo leaves it: what a broader rule than ours would let through."""
    (tmp_path / "evil.toml").write_text('[commands]\nrsync = "/tmp/evil"\n')
    before = sorted(os.listdir(tmp_path))
    argv = [part.format(tmp=tmp_path) for part in arguments]
    result = subprocess.run(
        [*cli_argv, *argv], capture_output=True, text=True, timeout=60, cwd=REPO, env={**os.environ, "SUDO_UID": "4242"}
    )
    assert result.returncode == EXIT_USAGE, result.stderr
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"backup-agent: {named}")
    assert result.stderr.rstrip("\n").endswith(sudo_door(argv[0]))
    assert sorted(os.listdir(tmp_path)) == before


def test_the_drop_in_fixture_leaves_nothing(real_sudo: None) -> None:
    """After the tests above (and their finally blocks), no drop-in or user of theirs remains."""
    leftovers = [name for name in os.listdir("/etc/sudoers.d") if name.startswith(("bkatest", ".bkatest"))]
    assert leftovers == []
    with open("/etc/passwd") as passwd:
        assert not [line for line in passwd if line.startswith("bkatest")]
    assert stat.S_IMODE(os.stat("/etc/sudoers.d").st_mode) & 0o022 == 0
