"""The systemd system units in systemd-system/: an hourly backup and a daily stale check.

``systemd-analyze verify`` reads them as systemd would (unknown keys, bad
values, a missing program). It needs the program in ExecStart to exist, so
the test verifies copies whose ExecStart names a stand-in script.
"""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "systemd-system"
INSTALLED = "/usr/local/sbin/backup-agent"


def _sections(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text())
    return parser


def test_the_timers_start_the_backup_hourly_and_the_stale_check_daily() -> None:
    assert sorted(p.name for p in UNITS.iterdir()) == [
        "backup-agent-check-stale.service",
        "backup-agent-check-stale.timer",
        "backup-agent.service",
        "backup-agent.timer",
    ]
    assert _sections(UNITS / "backup-agent.timer")["Timer"]["OnCalendar"] == "hourly"
    assert _sections(UNITS / "backup-agent-check-stale.timer")["Timer"]["OnCalendar"] == "daily"
    assert _sections(UNITS / "backup-agent.service")["Service"]["ExecStart"] == f"{INSTALLED} backup --quiet"
    assert _sections(UNITS / "backup-agent-check-stale.service")["Service"]["ExecStart"] == f"{INSTALLED} check-stale --quiet"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing (apt-get install systemd)")
def test_systemd_analyze_verify_accepts_the_system_units(tmp_path: Path) -> None:
    """verify exits 0 even for a key it ignores, so any message counts as a failure; a broken copy shows the check can fail."""
    program = tmp_path / "backup-agent"
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o755)
    units = tmp_path / "units"
    units.mkdir()
    for unit in UNITS.iterdir():
        (units / unit.name).write_text(unit.read_text().replace(INSTALLED, str(program)))

    def verify() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["systemd-analyze", "verify", *sorted(str(p) for p in units.iterdir())], capture_output=True, text=True, timeout=60
        )

    good = verify()
    if "Failed to initialize manager" in good.stderr:
        pytest.skip(reason=f"systemd-analyze verify cannot run here: {good.stderr.strip()}")
    assert good.returncode == 0 and good.stderr == "", good.stderr
    timer = units / "backup-agent.timer"
    timer.write_text(timer.read_text().replace("OnCalendar=", "OnCalender="))
    assert "OnCalender" in verify().stderr
