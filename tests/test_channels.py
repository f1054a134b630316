"""The report channel seam (agent.engine.channels): who hears a backup's events.

A real cycle (real rsync, real files) reports through composed channels: the
JSON-lines stream the desktop agent reads, a channel that fails on every
event, and one that records. The failing one is logged and costs neither the
backup nor any other channel an event; a reader that went away (a real
closed pipe) is dropped without stopping anything.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.engine import channels
from agent.core.commands import Runner
from agent.config.load import load_settings
from agent.engine.cycle import Cycle, Request
from agent.core.events import CompleteEvent, Event, StepEvent, decode, step

FAST = '[backup]\nionice = "none"\nnice = 0\n[rotation]\nhourly = "always"\n'


@dataclass
class Recorder:
    events: list[Event] = field(default_factory=list)

    def send(self, event: Event) -> None:
        self.events.append(event)


class Broken:
    """A channel whose every send fails, as an SMTP server that refuses would."""

    def send(self, event: Event) -> None:
        raise ConnectionRefusedError("no mail server here")


def test_no_json_no_channel() -> None:
    assert channels.backup_channels(None) == ()
    (only,) = channels.backup_channels(io.StringIO())
    assert isinstance(only, channels.JsonLines)


@pytest.mark.integration
def test_a_failing_channel_costs_neither_the_backup_nor_the_others(
    tmp_path: Path, rsync_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "file").write_text("data\n")
    config = tmp_path / "config.toml"
    config.write_text(FAST + f'[commands]\nrsync = "{rsync_path}"\n')
    settings = load_settings(str(config))
    request = Request(settings=settings, source=str(source), repository=str(tmp_path / "repo"))
    stream = io.StringIO()
    after = Recorder()
    emitter = channels.emitter_for([*channels.backup_channels(stream), Broken(), after])
    with caplog.at_level(logging.ERROR, logger="agent.engine.channels"):
        outcome = Cycle(request, emitter, Runner()).run()
    assert outcome.snapshot is not None and os.path.isdir(tmp_path / "repo" / "snapshots" / outcome.snapshot)
    lines = [decode(line) for line in stream.getvalue().splitlines()]
    # Every event reached the stream and the channel after the broken one, in the same order.
    assert lines == after.events
    assert isinstance(lines[-1], CompleteEvent) and lines[-1].snapshot == outcome.snapshot
    assert ("transfer", "done") in [(e.step, e.state) for e in after.events if isinstance(e, StepEvent)]
    failures = [r for r in caplog.records if "Broken failed" in r.getMessage()]
    assert len(failures) == len(after.events) and failures[0].exc_info is not None


def test_a_reader_that_went_away_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    read, write = os.pipe()
    os.close(read)
    stream = os.fdopen(write, "w")
    after = Recorder()
    emitter = channels.emitter_for([channels.JsonLines(stream), after])
    with caplog.at_level(logging.WARNING, logger="agent.engine.channels"):
        emitter.emit(step("lock", "start"))
        emitter.emit(step("lock", "done"))
    assert [e.state for e in after.events if isinstance(e, StepEvent)] == ["start", "done"]
    gone = [r for r in caplog.records if "event reader went away" in r.getMessage()]
    assert len(gone) == 1  # said once, then the stream is no longer written to
    with pytest.raises(BrokenPipeError):
        stream.close()  # what was buffered still cannot go anywhere
