"""Remote destinations: when to look for a server again, and what to say while it cannot be reached (pure).

A server is not plugged in: the agent learns whether it can reach one only
by trying, and trying costs a TCP connect (or, without a network, a wait for
a timeout). So the agent asks NetworkManager first (no network: no try at
all), then connects to the server's port with a short timeout before it
starts the root cycle; a server that does not answer is *waiting*, never a
failure, and it is looked for again after a delay that doubles with each
miss, from :data:`RETRY_FIRST` up to :data:`RETRY_MAX` (and never later than
one interval): a laptop away from home looks for its NAS a few times an
hour, not every minute. A change of network starts the count again.

Values in, values out: no clock, no socket. See ``docs/ARCHITECTURE.md``,
"Remote destinations".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

#: Seconds from the first miss to the next look; doubles with each miss.
RETRY_FIRST: Final = 60.0
#: The longest wait between two looks for a server (or one interval, if that is shorter).
RETRY_MAX: Final = 900.0
#: Seconds the TCP connect of a look may take: a server on the local network answers in milliseconds.
PROBE_TIMEOUT: Final = 2.0


@dataclass(frozen=True)
class Waiting:
    """A remote destination that could not be reached: since when, how many looks in a row missed, and why."""

    since: float  # epoch seconds of the first miss in a row
    misses: int  # looks in a row that did not reach it (at least 1)
    why: str  # the last miss's words ("no answer from nas.home.arpa:22")
    retry_at: float  # epoch seconds of the next look


def retry_after(misses: int, interval: float) -> float:
    """Seconds from a miss to the next look after ``misses`` misses in a row."""
    if misses < 1:
        raise ValueError(f"retry_after needs at least one miss, got {misses}")
    delay = RETRY_FIRST
    for _ in range(misses - 1):  # doubling in a loop cannot overflow, whatever the count
        if delay >= RETRY_MAX:
            break
        delay *= 2
    return min(delay, RETRY_MAX, max(interval, RETRY_FIRST))


def missed(previous: Waiting | None, now: float, why: str, interval: float) -> Waiting:
    """The waiting record after one more miss at ``now``."""
    misses = 1 if previous is None else previous.misses + 1
    since = now if previous is None else previous.since
    return Waiting(since, misses, why, now + retry_after(misses, interval))


def waiting_text(name: str, waiting: Waiting) -> str:
    """The words ``status`` and the tray show for it: "waiting for nas (no answer from ...)"."""
    return f"waiting for {name} ({waiting.why})"


def offline_text(name: str) -> str:
    """What a remote destination shows while NetworkManager says there is no network."""
    return f"waiting for {name} (no network)"


__all__ = ["PROBE_TIMEOUT", "RETRY_FIRST", "RETRY_MAX", "Waiting", "missed", "offline_text", "retry_after", "waiting_text"]
