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

The channels: :class:`~agent.core.events.JsonLines`, one JSON object per
line on stdout (``backup --json``), which the desktop agent reads (its
listeners, notifications, the tray, D-Bus, live in the agent's process, not
here); and, from the ``[[report]]`` list of the configuration, mail over SMTP
and HTTP pings in the Healthchecks convention (:mod:`agent.engine.reports`),
for machines nobody watches, with the record of the last success that
``check-stale`` reads (:mod:`agent.engine.stale`).

A channel that also has ``finish(problem, tail)`` (:class:`Finishing`) is
told when the run has ended, inside :func:`reporting`: the exception that
ended it, if any, and the last lines logged meanwhile.
"""

from __future__ import annotations

import logging
import contextlib
from typing import IO, Callable, Iterable, Iterator, Protocol, Sequence, runtime_checkable

from agent.config.model import Settings
from agent.core.events import Emitter, Event, JsonLines
from agent.engine import reports, stale

log = logging.getLogger(__name__)

__all__ = ["Channel", "Finishing", "JsonLines", "backup_channels", "emitter_for", "reporting"]


class Channel(Protocol):
    """Hears every event of one run (this module's docstring says who calls it)."""

    def send(self, event: Event) -> None:
        """Hear one event; raising is logged by the caller and costs the backup nothing."""
        ...


@runtime_checkable
class Finishing(Protocol):
    """A channel that acts once the run has ended (a mail with the result, the final ping)."""

    def send(self, event: Event) -> None: ...

    def finish(self, problem: BaseException | None, tail: Sequence[str]) -> None:
        """The run ended (``problem``: the exception that ended it); ``tail``: the lines logged meanwhile."""
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


def backup_channels(
    json_stream: IO[str] | None, settings: Settings | None = None, *, host: str = "", repository: str | None = None
) -> tuple[Channel, ...]:
    """The channels a backup reports through.

    The JSON-lines stream when asked for (``--json``); then, when the
    configuration lists ``[[report]]`` channels and the run writes
    (``repository``, not a dry run), the record of the last success under
    ``[system] state_dir`` that ``check-stale`` reads, and the channels
    themselves, in the file's order.
    """
    found: list[Channel] = [JsonLines(json_stream)] if json_stream is not None else []
    if settings is not None and settings.reports:
        if repository is not None:
            found.append(stale.SuccessRecord(settings.state_dir, repository))
        found.extend(reports.channels_for(settings.reports, host))
    return tuple(found)


@contextlib.contextmanager
def reporting(channels: Sequence[Channel]) -> Iterator[Emitter]:
    """The run's Emitter; when the run ends, however, each :class:`Finishing` channel is told, guarded.

    The lines the program logs meanwhile are kept (:class:`~agent.engine.reports.LogTail`)
    for the reports. The exception that ended the run goes on after the channels heard of it.
    """
    tail = reports.LogTail()
    logger = logging.getLogger("agent")
    logger.addHandler(tail)
    problem: BaseException | None = None
    emitter = emitter_for(channels)
    emitter.subscribe(tail.note)
    try:
        yield emitter
    except BaseException as exc:
        problem = exc
        raise
    finally:
        logger.removeHandler(tail)
        for channel in channels:
            if isinstance(channel, Finishing):
                try:
                    channel.finish(problem, tail.lines())
                except Exception:
                    log.exception("the report channel %s failed at the end of the run; the backup is not affected", type(channel).__name__)
