"""A person at a terminal, for tests: answers a terminal pinentry in a pseudo-terminal.

``Typist(script)`` opens a pseudo-terminal (its ``tty`` is what the prompt is
told to use with ``OPTION ttyname``) and, in a thread, reads what the
program shows there; each time the next expected text appears, it types the
given bytes. ``shown`` keeps everything shown, for the test to check.
"""

from __future__ import annotations

import os
import pty
import select
import threading
from typing import Sequence


class Typist:
    def __init__(self, script: Sequence[tuple[bytes, bytes]]) -> None:
        self.master, self.slave = pty.openpty()
        self.tty = os.ttyname(self.slave)
        self.script = list(script)
        self.shown = b""
        self.answered = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        seen_until = 0
        while not self._stop.is_set():
            ready, _, _ = select.select([self.master], [], [], 0.05)
            if not ready:
                continue
            try:
                data = os.read(self.master, 4096)
            except OSError:
                return
            self.shown += data
            while self.answered < len(self.script):  # several steps may be shown in one read
                expected, reply = self.script[self.answered]
                found = self.shown.find(expected, seen_until)
                if found < 0:
                    break
                seen_until = found + len(expected)
                self.answered += 1
                if reply:
                    os.write(self.master, reply)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        os.close(self.master)
        os.close(self.slave)
