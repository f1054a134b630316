"""The file being copied: from rsync's itemized lines, through the cycle's progress events, to KDE's job view.

The cycle runs as users run it (``python -m agent.cli backup --no-sudo
--json``) with the real rsync. For the first snapshot it is the real rsync
with ``--bwlimit`` in front (a two-line script in a trusted directory), so
the copy lasts long enough for several progress events, each naming the
file rsync copies then. The KDE job server is a stand-in on a private
session bus (tests/helpers/desktop_services.py), at the process boundary:
Plasma cannot run here.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
from dbus_fast.aio import MessageBus

from agent.core import events
from agent.desktop.dbus import jobview
from tests.helpers.desktop_services import serve_jobviews
from tests.test_cycle_robustness import EXIT_OK, REAL_RSYNC, Cli, cli, write_config  # noqa: F401  (cli: fixture)
from tests.test_dbus_control import PrivateBus, run
from tests.test_notify import FakeClock, session_bus, until  # noqa: F401  (session_bus: fixture)

pytestmark = pytest.mark.integration

BIG = 32 * 1024
NAMES = ("a/one.bin", "a/two.bin", "b/café ünï.bin", "b/three.bin", "c d/four.bin", "c d/five.bin")


def slow_rsync(directory: Path) -> Path:
    """The real rsync at 128 KiB/s: the six files of 32 KiB take about 1.5 s."""
    script = directory / "rsync"
    script.write_text(f'#!/bin/sh\nexec {REAL_RSYNC} --bwlimit=128 "$@"\n')
    script.chmod(0o755)
    return script


def test_progress_names_the_file_being_copied_and_the_job_view_shows_it(
    cli: Cli, tmp_path: Path, trusted_dir: Path, session_bus: PrivateBus
) -> None:
    source, repo = tmp_path / "source", tmp_path / "repo"
    for index, name in enumerate(NAMES):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(bytes([index]) * BIG)
    (source / "a" / "small.txt").write_text("small\n")
    os.symlink("one.bin", source / "a" / "link")

    # the first snapshot, slowly: each event names a file of the tree that rsync was copying
    result = cli.run("backup", "--no-sudo", "--json", "--config", write_config(tmp_path / "slow.toml",
                     rsync=slow_rsync(trusted_dir)), source, repo)
    assert result.returncode == EXIT_OK, result.stderr
    first = [e for e in map(events.decode, result.stdout.splitlines()) if isinstance(e, events.ProgressEvent)]
    named = [e.current for e in first if e.current is not None]
    assert len(set(named)) >= 2, [(e.percent, e.current) for e in first]
    for current in named:
        assert stat.S_ISREG(os.lstat(current).st_mode) and Path(current).is_relative_to(source), current

    # the next: only the changed file is copied (the others are hard-linked, never named); then none
    real = write_config(tmp_path / "real.toml")
    (source / "b" / "café ünï.bin").write_bytes(b"changed" * 100)
    second = [e for e in map(events.decode, cli.run("backup", "--no-sudo", "--json", "--config", real, source, repo)
                             .stdout.splitlines()) if isinstance(e, events.ProgressEvent)]
    assert second and {e.current for e in second} <= {None, str(source / "b" / "café ünï.bin")}
    assert second[-1].current == str(source / "b" / "café ünï.bin")
    third = [e for e in map(events.decode, cli.run("backup", "--no-sudo", "--json", "--config", real, source, repo)
                            .stdout.splitlines()) if isinstance(e, events.ProgressEvent)]
    assert third and all(e.current is None for e in third)

    # the cycle's own events, as the agent decodes them, on KDE's job view: the File field
    async def scenario() -> list[tuple[str, tuple[Any, ...]]]:
        server_bus, server = await serve_jobviews(session_bus.address)
        bus = await MessageBus(bus_address=session_bus.address).connect()
        clock = FakeClock()
        views = jobview.JobViews(bus, clock=clock)
        views.backup_started("backup1", "asked")
        for event in first + second:
            clock.now += 2  # past the view's one update a second
            views.progress(event)
        await views.flush()
        await until(lambda: server.views and len(server.views[0].calls) >= 2 + 5 * len(first + second))
        calls = list(server.views[0].calls)
        views.close()
        bus.disconnect()
        server_bus.disconnect()
        return calls

    calls = run(scenario())
    fields = [args for member, args in calls if member == "setDescriptionField" and args[0] == 1]
    shown = [value for _, label, value in fields if label == "File"]
    assert shown == [e.current for e in first + second if e.current is not None]
    assert ("setDescriptionField", (1, "File", str(source / "b" / "café ünï.bin"))) in calls
