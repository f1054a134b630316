"""The AppArmor profile in apparmor/: the real apparmor_parser reads it, and it lets the cycle run what it runs.

``apparmor_parser -Q`` parses and compiles the profile without loading it
(this machine's kernel need not have AppArmor): a syntax error, an unknown
variable or a bad rule fails here. What the profile allows is checked
against the code's own defaults, so a program added to ``[commands]`` or a
moved state directory fails this test until the profile follows.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from agent.config.model import Commands, Settings
from agent.desktop.daemon import ROOT_CYCLE_LOCK

APPARMOR = Path(__file__).resolve().parent.parent / "apparmor"
PROFILE = APPARMOR / "backup-agent"
PARSER = shutil.which("apparmor_parser") or next(
    (p for p in ("/usr/sbin/apparmor_parser", "/sbin/apparmor_parser") if Path(p).exists()), None
)
needs_parser = pytest.mark.skipif(PARSER is None, reason="apparmor_parser is missing: apt-get install apparmor (scripts/test does)")


def parse(profile: Path) -> subprocess.CompletedProcess[str]:
    """apparmor_parser -Q (parse and compile, load nothing), with apparmor/ for the tunables and local includes."""
    return subprocess.run(
        [str(PARSER), "-Q", "-K", "-I", str(APPARMOR), str(profile)], capture_output=True, text=True, timeout=60
    )


@needs_parser
def test_the_parser_accepts_the_profile() -> None:
    result = parse(PROFILE)
    assert result.returncode == 0, result.stderr


@needs_parser
def test_the_parser_refuses_a_profile_with_an_undeclared_path_variable(tmp_path: Path) -> None:
    """The check can fail: a path variable the tunables do not declare is an error."""
    broken = tmp_path / "backup-agent"
    broken.write_text(PROFILE.read_text().replace("@{backup_agent_state}/ rw,", "@{backup_agent_stat}/ rw,"))
    result = parse(broken)
    assert result.returncode != 0
    assert "backup_agent_stat" in result.stderr


def rules() -> list[str]:
    """The profile's rules, one per line, comments left out."""
    return [line.split("#", 1)[0].strip() for line in PROFILE.read_text().splitlines() if line.split("#", 1)[0].strip()]


def expand(pattern: str) -> list[str]:
    """AppArmor's {a,b} alternatives spelled out (the exec rules here nest none)."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    return [
        expanded
        for choice in match.group(1).split(",")
        for expanded in expand(pattern[: match.start()] + choice + pattern[match.end() :])
    ]


def may_run(path: str) -> bool:
    """Whether an ``ix`` (inherit: confined as the cycle) rule of the profile names ``path`` (``*`` stays within one directory)."""
    for rule in rules():
        target, _, mode = rule.rstrip(",").rpartition(" ")
        if "ix" in mode:
            for pattern in expand(target):
                if re.fullmatch("[^/]*".join(map(re.escape, pattern.split("*"))), path):
                    return True
    return False


def test_every_default_program_of_commands_may_run_under_the_profile() -> None:
    for program in dataclasses.asdict(Commands()).values():
        # /bin and /sbin are links into /usr on merged systems: the kernel sees the /usr name.
        for seen in (program, program if program.startswith("/usr/") else "/usr" + program):
            assert may_run(seen), f"{seen} may not run under the profile"
    assert may_run("/usr/bin/python3.11")
    assert not may_run("/usr/bin/curl") and not may_run("/tmp/rm")
    assert may_run("/usr/bin/ssh")  # restic's sftp: backend


def test_the_profile_writes_the_state_directory_and_the_machine_lock() -> None:
    tunables = (APPARMOR / "tunables" / "backup-agent").read_text()
    assert f"@{{backup_agent_state}}={Settings(path=None).state_dir}\n" in tunables
    assert f"{ROOT_CYCLE_LOCK} rwk," in rules()
