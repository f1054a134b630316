"""systemd's notify protocol for the agent's user unit (``Type=notify``), without a dependency.

READY=1 once the agent watches udev, STATUS= with one line of what it does,
WATCHDOG=1 at half the interval systemd asks for. Everything is silent when
the agent does not run under systemd (no ``$NOTIFY_SOCKET``), and a socket
that does not take a message loses it: the agent never waits for systemd.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Mapping

log = logging.getLogger(__name__)


class Notifier:
    """``sd_notify`` on a datagram socket: READY=1, STATUS=..., WATCHDOG=1. Silent without $NOTIFY_SOCKET."""

    def __init__(self, address: str | None) -> None:
        self._address: str | None = None
        self._socket: socket.socket | None = None
        if not address or not (address.startswith("/") or address.startswith("@")):
            return
        self._address = "\0" + address[1:] if address.startswith("@") else address
        try:
            # Non-blocking: a reader that does not keep up loses a status
            # line, the agent never waits for it.
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        except OSError as exc:
            log.warning("cannot notify systemd: %s", exc)

    @classmethod
    def from_environ(cls) -> "Notifier":
        return cls(os.environ.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def send(self, message: str) -> None:
        if self._socket is None or self._address is None:
            return
        try:
            self._socket.sendto(message.encode("utf-8", "replace"), self._address)
        except OSError as exc:
            log.debug("systemd notification %r not sent: %s", message.split("\n", 1)[0], exc)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half systemd's timeout), or None when no watchdog is asked for."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) <= 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6
