"""A real sshd for the tests: on 127.0.0.1, a free port, its own host key, authorized_keys and client key.

Nothing global is read or written except sshd's privilege separation
directory (/run/sshd, which sshd needs and Debian's package creates at boot).
Every command the server runs goes through a wrapper (sshd's ForceCommand)
that records the pid of the transfer's receiving rsync, so a test can cut
the connection mid-transfer by killing it. The sessions skip root's
~/.bashrc (a plain shell, as on a NAS), which here runs pyenv for 0.2 s.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

SSHD = "/usr/sbin/sshd"

WRAPPER = """#!/bin/sh
case $SSH_ORIGINAL_COMMAND in
  *'rsync --server'*'--sender'*) ;;
  *'rsync --server'*) echo $$ > "{pidfile}" ;;
esac
exec /bin/sh -c "$SSH_ORIGINAL_COMMAND"
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def keygen(path: Path, kind: str = "ed25519") -> str:
    """A new key pair at ``path``; the public key line."""
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(path)], check=True)
    return (path.parent / (path.name + ".pub")).read_text().strip()


@dataclass
class SshServer:
    """A running sshd and what a client needs to reach it."""

    port: int
    directory: Path
    identity: Path
    known_hosts: Path
    process: "subprocess.Popen[bytes]"
    host_key_line: str

    @property
    def rsync_pidfile(self) -> Path:
        return self.directory / "rsync.pid"

    def config(self, path: str, *, name: str = "nas", known_hosts: Path | None = None, identity: Path | None = None) -> str:
        """A [[remote]] section for this server."""
        return (
            f'[[remote]]\nname = "{name}"\nhost = "127.0.0.1"\nport = {self.port}\npath = "{path}"\n'
            f'identity_file = "{identity or self.identity}"\nknown_hosts = "{known_hosts or self.known_hosts}"\nconnect_timeout = "5s"\n'
        )


def sshd_available() -> str | None:
    if os.geteuid() != 0:
        return "needs root: sshd logs in as root here"
    for program in (SSHD, shutil.which("ssh"), shutil.which("ssh-keygen")):
        if program is None or not os.path.exists(program):
            return "openssh-server and openssh-client are missing: run scripts/test, which installs them"
    return None


requires_sshd = pytest.mark.skipif(sshd_available() is not None, reason=sshd_available() or "")


@contextlib.contextmanager
def running_sshd(directory: Path) -> Iterator[SshServer]:
    """Start sshd on 127.0.0.1 with its own keys; stop it whatever happens."""
    directory.mkdir(parents=True, exist_ok=True)
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    host_key = directory / "host_key"
    host_public = keygen(host_key)
    identity = directory / "client_key"
    client_public = keygen(identity)
    authorized = directory / "authorized_keys"
    authorized.write_text(client_public + "\n")
    wrapper = directory / "wrapper.sh"
    wrapper.write_text(WRAPPER.format(pidfile=directory / "rsync.pid"))
    wrapper.chmod(0o755)
    port = free_port()
    known_hosts = directory / "known_hosts"
    kind, key = host_public.split()[:2]
    known_hosts.write_text(f"[127.0.0.1]:{port} {kind} {key}\n")
    argv = [
        SSHD, "-D", "-e", "-f", "/dev/null",
        "-o", f"Port={port}", "-o", "ListenAddress=127.0.0.1",
        "-o", f"HostKey={host_key}", "-o", f"AuthorizedKeysFile={authorized}",
        "-o", f"PidFile={directory / 'sshd.pid'}", "-o", "StrictModes=no", "-o", "UsePAM=no",
        "-o", "PasswordAuthentication=no", "-o", "KbdInteractiveAuthentication=no",
        "-o", "PermitRootLogin=prohibit-password", "-o", "PrintMotd=no", "-o", "MaxStartups=100",
        "-o", f"ForceCommand={wrapper}", "-o", "LogLevel=ERROR",
        # A plain shell, as on a NAS: bash run by sshd skips ~/.bashrc at SHLVL 1 (this machine's runs pyenv).
        "-o", "SetEnv=SHLVL=1",
    ]  # fmt: skip
    log = open(directory / "sshd.log", "wb")
    process = subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"sshd did not start: {(directory / 'sshd.log').read_text()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("sshd did not listen within 10 s")
            time.sleep(0.02)
        yield SshServer(port, directory, identity, known_hosts, process, f"[127.0.0.1]:{port} {kind} {key}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()
