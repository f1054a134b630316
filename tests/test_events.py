"""The JSON-lines events (agent/core/events.py): the wire as the README documents it, and the one boundary that reads it."""

from __future__ import annotations

import json

import pytest

from agent.core import events


def _without_time(line: str) -> str:
    value = json.loads(line)
    assert isinstance(value.pop("time"), str)
    return json.dumps(value, separators=(",", ":"))


def test_the_wire_is_the_readme_s() -> None:
    """Field names and order as the README's example: typed values change nothing on the wire."""
    line = events.encode(events.progress(42, 1048576, 12, 350000.0, 4))
    assert _without_time(line) == '{"version":1,"event":"progress","percent":42,"bytes":1048576,"files":12,"rate":350000.0,"eta":4}'
    done = events.complete("S", partial=False, flagged=None, statistics={"files": 3}, warnings=0, deleted=[],
                           duration=9.2, dry_run=False, skipped=None)
    assert _without_time(events.encode(done)) == (
        '{"version":1,"event":"complete","snapshot":"S","partial":false,"flagged":null,"statistics":{"files":3},'
        '"warnings":0,"deleted":[],"duration":9.2,"dry_run":false,"skipped":null}'
    )
    step = events.step("transfer", "start", snapshot="S", link_dest=None, resumed_from=[])
    assert _without_time(events.encode(step)) == (
        '{"version":1,"event":"step","step":"transfer","state":"start","snapshot":"S","link_dest":null,"resumed_from":[]}'
    )
    failed = events.error("mount", "it broke", 4, True)
    assert _without_time(events.encode(failed)) == (
        '{"version":1,"event":"error","step":"mount","message":"it broke","exit_code":4,"snapshots_untouched":true}'
    )


@pytest.mark.parametrize("event", [
    events.step("unlock", "done", unlocked_now=True),
    events.progress(None, 0, 0, None, None),
    events.warning("transfer", "some files vanished", code=24, errors=["a"]),
    events.complete(None, disk="backup1", snapshots="/mnt/b/snapshots", already_open=True, read_only=True),
    events.error(None, "no disk", 3, True),
])
def test_what_is_encoded_decodes_to_the_same_typed_value(event: events.Event) -> None:
    assert events.decode(events.encode(event)) == event


def test_decoding_gives_typed_values() -> None:
    done = events.decode('{"version":1,"time":"t","event":"complete","snapshot":"S","partial":true,"flagged":"fewer",'
                         '"statistics":{"transferred_files":2,"note":"x"},"duration":3}')
    assert isinstance(done, events.CompleteEvent)
    assert (done.partial, done.flagged, done.duration, done.statistics, done.skipped) == (True, "fewer", 3.0,
                                                                                        {"transferred_files": 2}, None)


def test_a_newer_protocol_is_refused_saying_what_to_do_and_an_older_one_is_read() -> None:
    with pytest.raises(events.ProtocolVersionError) as refused:
        events.decode('{"version":2,"time":"t","event":"error","step":null,"message":"m","exit_code":1,'
                      '"snapshots_untouched":true}')
    assert "version 2" in str(refused.value) and "restart the agent" in str(refused.value)
    old = events.decode('{"time":"t","event":"error","step":null,"message":"m","exit_code":1,"snapshots_untouched":true}')
    assert old == events.error(None, "m", 1, True)


@pytest.mark.parametrize("line", [
    '[1]',
    '{"version":1,"event":"nonsense"}',
    '{"version":"1","event":"progress","percent":1,"bytes":1,"files":1,"rate":null,"eta":null}',
    '{"version":1,"event":"progress","percent":1,"bytes":true,"files":1,"rate":null,"eta":null}',
    '{"version":1,"event":"progress","percent":1,"bytes":1,"files":1,"rate":null}',
    '{"version":1,"event":"error","step":null,"message":"m","exit_code":"4","snapshots_untouched":true}',
    '{"version":1,"event":"complete","snapshot":"S","partial":"no"}',
    '{"version":1,"event":"step","step":"lock"}',
])
def test_a_line_that_is_not_an_event_of_this_protocol_is_refused(line: str) -> None:
    with pytest.raises(ValueError):
        events.decode(line)


def test_a_null_field_may_be_left_out() -> None:
    done = events.decode('{"event":"complete","snapshots":"/mnt/b/snapshots","already_open":true}')
    assert done == events.complete(None, snapshots="/mnt/b/snapshots", already_open=True)
    failed = events.decode('{"event":"error","message":"a backup is running","exit_code":4}')
    assert failed == events.error(None, "a backup is running", 4, False)
