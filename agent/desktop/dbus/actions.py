"""What a click does that is the same from a notification and from the tray: show a snapshot's folder.

"Open backups" on a finished backup's notification and "Open latest
backup" / "Browse backups" in the tray all hand a folder to ``xdg-open``
(argv, no shell), in the user's session and environment: the file manager is
the user's. Where no desktop handles it, xdg-open runs the file manager
itself and returns only when that is closed, so still running after
:data:`SHOW_WAIT` seconds counts as shown.
"""

from __future__ import annotations

import logging
import shutil
from typing import Final

from agent.desktop.process import start_and_wait

log = logging.getLogger(__name__)

SHOW_WAIT: Final = 5.0  # seconds xdg-open may take before the folder counts as shown


async def show_folder(path: str, *, wait: float = SHOW_WAIT) -> str | None:
    """Show ``path`` in the file manager; None, or one sentence saying why it was not shown."""
    program = shutil.which("xdg-open")
    if program is None:
        return "xdg-open is not installed (package xdg-utils)."
    try:
        status = await start_and_wait((program, path), wait)
    except OSError as exc:
        return f"xdg-open could not be started ({exc.strerror or exc})."
    if status is not None and status != 0:
        log.warning("xdg-open %s exited with status %s", path, status)
        return f"xdg-open exited with status {status}."
    return None
