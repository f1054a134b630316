"""The running backup's progress on a dock's icon: the Unity ``LauncherEntry`` convention.

Docks that draw a progress bar on an application's icon (Plank, Dash to
Dock, Latte, Plasma's task manager, elementary's) listen on the session bus
for the broadcast signal ``com.canonical.Unity.LauncherEntry.Update(s
app_uri, a{sv} properties)`` and ask ``Query()`` of a program they see
later. The properties used here are ``progress`` (a double from 0 to 1) and
``progress-visible``. ``app_uri`` is ``application://backup-agent.desktop``:
a dock draws it on the icon of that desktop entry, the launcher ``backup-agent
install`` writes (agent.system.install.LAUNCHER_FILE; a test keeps the two
names in step, as this layer does not import that one).

A broadcast that no dock listens to is dropped by the bus, so this listener
runs on every desktop; it costs one signal a second at most while a backup
copies. Its failure is logged and never stops a backup. See
``docs/ARCHITECTURE.md``, "Progress where each desktop shows it".
"""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Any, Callable

from dbus_fast import Variant
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusSignature
from dbus_fast.service import ServiceInterface, dbus_method, dbus_signal

from agent.core.events import CompleteEvent, ProgressEvent
from agent.desktop.state import AgentStatus, Listener

log = logging.getLogger(__name__)

LAUNCHER_INTERFACE = "com.canonical.Unity.LauncherEntry"
LAUNCHER_PATH = "/org/backupagent/LauncherEntry"
APP_URI = "application://backup-agent.desktop"
PROGRESS_INTERVAL = 1.0  # seconds between two updates, at least


def launcher_properties(progress: float | None) -> dict[str, Variant]:
    """The entry's properties (pure): a bar at ``progress`` (0..1), or none (None)."""
    if progress is None:
        return {"progress-visible": Variant("b", False)}
    return {"progress": Variant("d", min(1.0, max(0.0, progress))), "progress-visible": Variant("b", True)}


class LauncherEntry(ServiceInterface):
    """The exported entry (``Query``, the ``Update`` signal) and the agent's listener that drives it."""

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        super().__init__(LAUNCHER_INTERFACE)
        self._progress: float | None = None
        self._clock = clock or (lambda: asyncio.get_running_loop().time())
        self._last: float | None = None
        self._warned = False

    @dbus_method(name="Query")
    def _query(self) -> Annotated[tuple[str, dict[str, Variant]], DBusSignature("sa{sv}")]:
        return (APP_URI, launcher_properties(self._progress))

    @dbus_signal(name="Update")
    def _update(self) -> Annotated[tuple[str, dict[str, Variant]], DBusSignature("sa{sv}")]:
        return (APP_URI, launcher_properties(self._progress))

    def _show(self, progress: float | None) -> None:
        self._progress = progress
        try:
            self._update()
        except Exception as exc:
            if not self._warned:
                self._warned = True
                log.warning("cannot show the backup's progress on the dock (%s)", exc)

    # -- Listener --------------------------------------------------------------------------

    def status_changed(self, status: AgentStatus) -> None:
        if status.state != "running" and self._progress is not None:
            self._show(None)

    def disk_attached(self, disk: str) -> None:
        return None

    def disk_removed(self, disk: str, during_backup: bool) -> None:
        return None

    def disk_opened(self, disk: str) -> None:
        return None

    def backup_started(self, disk: str, reason: str) -> None:
        self._last = None
        self._show(0.0)

    def progress(self, event: ProgressEvent) -> None:
        if event.percent is None or self._progress is None:
            return
        now = self._clock()
        if self._last is not None and now - self._last < PROGRESS_INTERVAL:
            return
        self._last = now
        self._show(event.percent / 100.0)

    def backup_completed(self, event: CompleteEvent) -> None:
        if self._progress is not None:
            self._show(1.0)

    def backup_failed(self, step: str | None, message: str, exit_code: int | None = None) -> None:
        if self._progress is not None:
            self._show(None)


def _listener(entry: LauncherEntry) -> Listener:
    return entry  # mypy checks here that LauncherEntry is a Listener


class DockProgress:
    """The exported entry on a bus; :meth:`close` takes it off."""

    def __init__(self, bus: MessageBus, entry: LauncherEntry) -> None:
        self.bus = bus
        self.entry = entry

    def close(self) -> None:
        try:
            self.bus.unexport(LAUNCHER_PATH, self.entry)
        except Exception as exc:
            log.debug("the launcher entry was not unexported: %s", exc)


def start(bus: MessageBus | None, **options: Any) -> DockProgress | None:
    """Export the launcher entry on ``bus`` (the session bus); None without one or when it fails (logged)."""
    if bus is None:
        return None
    entry = LauncherEntry(**options)
    try:
        bus.export(LAUNCHER_PATH, entry)
    except Exception as exc:
        log.warning("no progress on the dock: %s", exc)
        return None
    return DockProgress(bus, entry)


__all__ = ["APP_URI", "DockProgress", "LAUNCHER_INTERFACE", "LAUNCHER_PATH", "LauncherEntry", "launcher_properties", "start"]
