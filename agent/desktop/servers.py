"""Is a server there: one short TCP connect to its port, on the agent's loop, before the root cycle starts.

The root cycle would find out too, but only after sudo, the configuration,
the machine lock and ssh's own ``ConnectTimeout`` (10 s by default), and it
would end as a failure. A connect with a timeout of a second or two
(:data:`agent.policy.reach.PROBE_TIMEOUT`), awaited on the loop so nothing
blocks, tells "not here" cheaply and without a failure card; the agent then
shows "waiting for nas" and looks again later (:mod:`agent.policy.reach`).
The connection is closed at once: nothing is sent, so sshd or the rsync
daemon sees a client that changed its mind. See ``docs/ARCHITECTURE.md``,
"Remote destinations".
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os

from agent.config.model import RemoteRepository

SSH_PORT = 22
RSYNC_DAEMON_PORT = 873


def address(remote: RemoteRepository) -> tuple[str, int]:
    """Where a ``[[remote]]`` listens: its host, and its port (ssh's 22, an rsync daemon's 873, unless configured) (pure)."""
    host = remote.host[1:-1] if remote.host.startswith("[") and remote.host.endswith("]") else remote.host
    default = RSYNC_DAEMON_PORT if remote.module is not None else SSH_PORT
    return host, remote.port if remote.port is not None else default


def _words(exc: OSError) -> str:
    if exc.errno == errno.ECONNREFUSED:
        return "the connection was refused"
    if exc.errno is not None:
        return os.strerror(exc.errno).lower()
    return str(exc) or type(exc).__name__


async def unreachable(host: str, port: int, timeout: float) -> str | None:
    """Why ``host:port`` cannot be reached now (one line), or None when it accepted a connection."""
    where = f"{host}:{port}"
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except asyncio.TimeoutError:
        return f"no answer from {where} within {timeout:g} s"
    except OSError as exc:  # refused, no route, name not known (socket.gaierror is one)
        return f"{where}: {_words(exc)}"
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return None


__all__ = ["RSYNC_DAEMON_PORT", "SSH_PORT", "address", "unreachable"]
