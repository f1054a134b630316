"""The shared D-Bus plumbing (agent/desktop/dbus/bus.py): match rules built, not written by hand."""

from __future__ import annotations

from agent.desktop.dbus.bus import match_rule
from agent.desktop.dbus.logind import PREPARE_FOR_SLEEP_RULE


def test_a_match_rule_is_the_one_the_specification_spells() -> None:
    assert PREPARE_FOR_SLEEP_RULE == (
        "type='signal',sender='org.freedesktop.login1',path='/org/freedesktop/login1',"
        "interface='org.freedesktop.login1.Manager',member='PrepareForSleep'"
    )


def test_a_quote_in_a_value_is_escaped_as_the_specification_says() -> None:
    assert match_rule(arg0="it's") == "type='signal',arg0='it'\\''s'"
