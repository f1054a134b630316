"""Shared fixtures, and the rule that CI must not skip integration tests.

CI (``.ci/run``) sets ``BACKUP_AGENT_NO_SKIP=1``: there the machine has every
part (root, rsync, loop devices, udev), so a skipped test means a part went
missing, and that fails the run. A test that may legitimately skip even there
(e.g. one that needs device-mapper, which this kernel lacks) says so with
``@pytest.mark.may_skip``.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any, Generator

import pytest

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "may_skip: this test may skip even in CI, for the reason it gives")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if (
        report.skipped
        and os.environ.get("BACKUP_AGENT_NO_SKIP") == "1"
        and item.get_closest_marker("may_skip") is None
        and not hasattr(report, "wasxfail")
    ):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped where every part should exist (BACKUP_AGENT_NO_SKIP=1): {reason}"


@pytest.fixture(autouse=True, scope="session")
def private_runtime_dir(tmp_path_factory: pytest.TempPathFactory) -> Generator[Path, None, None]:
    """Tests take their machine lock in a directory of their own, never /run's."""
    path = tmp_path_factory.mktemp("runtime")
    previous = os.environ.get("BACKUP_AGENT_RUNTIME_DIR")
    os.environ["BACKUP_AGENT_RUNTIME_DIR"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("BACKUP_AGENT_RUNTIME_DIR", None)
    else:
        os.environ["BACKUP_AGENT_RUNTIME_DIR"] = previous


@pytest.fixture
def rsync_path() -> str:
    path = shutil.which("rsync")
    if path is None:
        pytest.skip("rsync is not installed: run scripts/test, which installs it")
    return path


@pytest.fixture
def cli_argv() -> list[str]:
    """argv prefix that runs this checkout's CLI in a subprocess."""
    return [sys.executable, "-m", "agent.cli"]


requires_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, other owners); run the suite as root")
