"""A real rsync daemon for the tests: on 127.0.0.1, a free port, one module with a password and the completion script.

The module's ``post-xfer exec`` is the project's own rsyncd/backup-agent-complete,
as the README tells to install it. The daemon runs as root here, with
``uid = root`` in the module so that owners are kept.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tests.sshserver import free_port

COMPLETE = Path(__file__).resolve().parent.parent / "rsyncd" / "backup-agent-complete"


@dataclass
class RsyncDaemon:
    port: int
    module_path: Path
    password_file: Path

    def config(self, *, name: str = "daemon", password_file: Path | None = None) -> str:
        """A [[remote]] section for the module."""
        return (
            f'[[remote]]\nname = "{name}"\nhost = "127.0.0.1"\nport = {self.port}\nmodule = "repo"\nuser = "backup"\n'
            f'password_file = "{password_file or self.password_file}"\nconnect_timeout = "5s"\n'
        )


@contextlib.contextmanager
def running_rsyncd(directory: Path, *, complete: bool = True) -> Iterator[RsyncDaemon]:
    """Start ``rsync --daemon`` with its own config; stop it whatever happens."""
    directory.mkdir(parents=True, exist_ok=True)
    module = directory / "module"
    module.mkdir()
    secrets = directory / "secrets"
    secrets.write_text("backup:s3cret\n")
    secrets.chmod(0o600)
    password = directory / "password"
    password.write_text("s3cret\n")
    password.chmod(0o600)
    port = free_port()
    config = directory / "rsyncd.conf"
    config.write_text(
        f"address = 127.0.0.1\nport = {port}\npid file = {directory / 'rsyncd.pid'}\nuse chroot = no\n"
        f"[repo]\npath = {module}\nread only = no\nuid = root\ngid = root\nnumeric ids = yes\n"
        f"auth users = backup\nsecrets file = {secrets}\n" + (f"post-xfer exec = {COMPLETE}\n" if complete else "")
    )
    log = open(directory / "rsyncd.log", "wb")
    process = subprocess.Popen(
        ["rsync", "--daemon", "--no-detach", f"--config={config}", f"--log-file={directory / 'rsyncd.events'}"],
        stdout=log, stderr=log, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"rsync --daemon did not start: {(directory / 'rsyncd.log').read_text()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("rsync --daemon did not listen within 10 s")
            time.sleep(0.02)
        yield RsyncDaemon(port, module, password)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()
