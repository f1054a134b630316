"""Report channels: who hears a backup's events.

The seam (docs/ARCHITECTURE.md, "Seams for what comes next"). A :class:`Channel` must provide one
method, ``send(event)``, called for every event the cycle emits, in order:
``step``, ``progress``, ``warning``, then one ``complete`` or ``error``
(README, "JSON-lines protocol"). A channel that needs the whole run (a mail
with the result) keeps what it needs and acts on the last event.

Who calls it: the :class:`~agent.core.events.Emitter` that :func:`emitter_for`
builds, each channel subscribed through a guard: a channel that raises is
logged with its traceback and the backup goes on (a report must never cost a
snapshot). :func:`backup_channels` is the one place the backup command
composes its channels.

Today there is one channel, :class:`~agent.core.events.JsonLines`: one JSON object per line on
stdout (``backup --json``), which the desktop agent reads; its listeners
(notifications, the tray, D-Bus) live in the agent's process, not here. What
plugs in next, each a new class added in :func:`backup_channels` from the
configuration: mail over SMTP and HTTP pings in the Healthchecks convention,
for machines nobody watches.
"""

from __future__ import annotations

import logging
from typing import IO, Callable, Iterable, Protocol

from agent.core.events import Emitter, Event, JsonLines

log = logging.getLogger(__name__)

__all__ = ["Channel", "JsonLines", "backup_channels", "emitter_for"]


class Channel(Protocol):
    """Hears every event of one run (this module's docstring says who calls it)."""

    def send(self, event: Event) -> None:
        """Hear one event; raising is logged by the caller and costs the backup nothing."""
        ...


def _guarded(channel: Channel) -> Callable[[Event], None]:
    """``channel.send``, with a failure logged instead of raised."""

    def send(event: Event) -> None:
        try:
            channel.send(event)
        except Exception:
            log.exception("the report channel %s failed on a %s event; the backup goes on", type(channel).__name__, event.kind)

    return send


def emitter_for(channels: Iterable[Channel]) -> Emitter:
    """An Emitter that hands every event to each channel, in the order given."""
    emitter = Emitter()
    for channel in channels:
        emitter.subscribe(_guarded(channel))
    return emitter


def backup_channels(json_stream: IO[str] | None) -> tuple[Channel, ...]:
    """The channels a backup reports through: the JSON-lines stream when asked for (``--json``)."""
    return (JsonLines(json_stream),) if json_stream is not None else ()
