"""Command sources: a command's output stored in every snapshot, hard-linked when it did not change.

A database must be dumped rather than copied (its files change while rsync
reads them). A ``[[command_source]]`` runs as root after the transfer,
through the one runner (argv, a clean environment, its timeout); its stdout
is streamed into ``.backup-agent/commands/<file>`` of the snapshot being
made, gzip-compressed in-process when asked (``zlib`` with no time stamp,
so the same dump compresses to the same bytes).

While the output streams in, it is compared with the previous snapshot's
copy, byte for byte, and nothing is written as long as they agree: an
unchanged dump costs a read of the old copy and no write at all, and ends as
a hard link to it (the manifest then reuses its checksum too). At the first
byte that differs, the agreed prefix is copied from the old copy and the
rest written as it comes. Comparing the bytes themselves, rather than a
checksum recorded beside the old copy, trusts nothing the disk says
(docs/ARCHITECTURE.md, rule 9).

A failure is handled as a hook's: a critical command source fails the
backup (no snapshot is completed; the transfer is kept to resume from), a
non-critical one is a warning and its partial output is removed.
"""

from __future__ import annotations

import logging
import os
import time
import zlib
from typing import Any, Callable

from agent.config.model import CommandSource
from agent.core.commands import Runner
from agent.core.errors import CommandError, HookError
from agent.engine.sysstate import files

log = logging.getLogger(__name__)

STEP = "system-state"
# A dump holds the database's content: root's alone.
FILE_MODE = 0o600


class ComparingWriter:
    """Writes a stream into a new file unless it repeats ``previous`` (a descriptor) byte for byte.

    :meth:`finish` says whether it did: then nothing was written and the
    caller links the previous copy instead.
    """

    def __init__(self, out: int, previous: int | None) -> None:
        self.out = out
        self.previous = previous
        self.matched = 0  # bytes that agree with the previous copy, not written yet
        self.total = 0

    def write(self, data: bytes) -> None:
        self.total += len(data)
        if self.previous is not None:
            old = self._read_previous(len(data))
            if old == data:
                self.matched += len(data)
                return
            self._diverge()
        files.write_all(self.out, data)

    def _read_previous(self, size: int) -> bytes:
        if self.previous is None:
            return b""
        parts: list[bytes] = []
        while size > 0:
            part = os.read(self.previous, min(size, files.CHUNK))
            if not part:
                break
            parts.append(part)
            size -= len(part)
        return b"".join(parts)

    def _diverge(self) -> None:
        """From here on the output differs: write the agreed prefix, copied from the previous copy."""
        if self.previous is None:
            return
        offset = 0
        while offset < self.matched:
            part = os.pread(self.previous, min(files.CHUNK, self.matched - offset), offset)
            if not part:
                raise OSError("the previous copy shrank while it was read")
            files.write_all(self.out, part)
            offset += len(part)
        self.previous = None

    def finish(self) -> bool:
        """True when the stream was the previous copy exactly (nothing written)."""
        if self.previous is not None and not self._read_previous(1):
            return True
        self._diverge()
        return False


class _Gzip:
    """gzip in-process, streamed; no name and no time in the header, so equal input gives equal bytes."""

    def __init__(self, sink: Callable[[bytes], None]) -> None:
        self.sink = sink
        self.compressor = zlib.compressobj(6, zlib.DEFLATED, 31)

    def write(self, data: bytes) -> None:
        out = self.compressor.compress(data)
        if out:
            self.sink(out)

    def finish(self) -> None:
        self.sink(self.compressor.flush())


def capture(
    source: CommandSource,
    runner: Runner,
    target_fd: int,
    previous_fd: int | None,
    warn: Callable[[str], None],
) -> dict[str, Any]:
    """Run one command source into ``target_fd`` (this snapshot's commands/); what the metadata records of it.

    ``previous_fd``: the previous snapshot's commands/, or None. Raises
    HookError when a critical command fails.
    """
    started = time.monotonic()
    temporary = f".{source.file}.part"
    out = files.create(target_fd, temporary, FILE_MODE)
    previous = files.open_regular(previous_fd, source.file) if previous_fd is not None else None
    writer = ComparingWriter(out, previous)
    raw = 0
    try:
        compressor = _Gzip(writer.write) if source.compress == "gzip" else None

        def chunk(data: bytes) -> None:
            nonlocal raw
            raw += len(data)
            if compressor is not None:
                compressor.write(data)
            else:
                writer.write(data)

        log.info("running command source %r into %s", source.name, source.file)
        runner.run(source.command, step=STEP, on_stdout_data=chunk, timeout=source.timeout)
        if compressor is not None:
            compressor.finish()
        unchanged = writer.finish()
        os.fsync(out)  # the snapshot's syncfs covers it too; this makes a dump alone durable
    except CommandError as failure:
        os.unlink(temporary, dir_fd=target_fd)
        message = f"command source {source.name!r} failed: {failure.message}"
        if source.critical:
            raise HookError(f"{message}; no snapshot was completed", step=STEP) from failure
        warn(f"{message}; the snapshot is completed without {source.file} (not critical)")
        return {"file": source.file, "error": failure.message}
    except BaseException:
        os.unlink(temporary, dir_fd=target_fd)
        raise
    finally:
        os.close(out)
        if previous is not None:
            os.close(previous)
    if unchanged and previous_fd is not None:
        os.unlink(temporary, dir_fd=target_fd)
        files.link_from(previous_fd, source.file, target_fd)
    else:
        os.rename(temporary, source.file, src_dir_fd=target_fd, dst_dir_fd=target_fd)
    seconds = round(time.monotonic() - started, 3)
    log.info(
        "command source %r: %d bytes of output, %d stored, %s, in %.2f s",
        source.name, raw, writer.total, "unchanged (linked)" if unchanged else "stored", seconds,
    )
    return {"file": source.file, "bytes": writer.total, "output_bytes": raw, "linked": unchanged, "seconds": seconds}
