"""The Secret Service client (agent/desktop/dbus/secrets.py) against a real gnome-keyring-daemon.

Each test starts its own dbus-daemon (tests/test_dbus_control.py's private
bus: no service activation) and, on it, ``gnome-keyring-daemon --foreground
--components=secrets --unlock`` with a login keyring of its own under a
temporary HOME, unlocked with a password given on its stdin. Both are
stopped by their pids afterwards. ``secret-tool`` (libsecret, what desktop
programs use) checks from the outside what the client stored.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
from dbus_fast.aio import MessageBus

from agent.desktop.dbus.secrets import SecretService
from tests.test_dbus_control import DBUS_DAEMON, _stop, private_bus

WANTED = {"application": "backup-agent", "disk": "backup1", "luks-uuid": "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"}


@dataclass
class Keyring:
    address: str
    environ: dict[str, str]

    def secret_tool(self, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["secret-tool", *args], input=stdin, capture_output=True, env=self.environ, timeout=10)


@pytest.fixture
def keyring() -> Iterator[Keyring]:
    program = shutil.which("gnome-keyring-daemon")
    if DBUS_DAEMON is None or program is None or shutil.which("secret-tool") is None:
        pytest.skip(reason="gnome-keyring, libsecret-tools or dbus-daemon missing (apt-get install -y gnome-keyring libsecret-tools)")
    home = Path(tempfile.mkdtemp(prefix="ba-keyring-"))
    with private_bus("session") as bus:
        environ = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "XDG_DATA_HOME": str(home / "data"),
            "XDG_CONFIG_HOME": str(home / "config"),
            "XDG_CACHE_HOME": str(home / "cache"),
            "XDG_RUNTIME_DIR": str(home),
            "DBUS_SESSION_BUS_ADDRESS": bus.address,
        }
        daemon = subprocess.Popen(
            [program, "--foreground", "--components=secrets", "--unlock"],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environ,
        )
        try:
            assert daemon.stdin is not None
            daemon.stdin.write(b"login password")  # the login keyring, created and unlocked with it
            daemon.stdin.close()
            deadline = time.monotonic() + 10
            while subprocess.run(
                ["dbus-send", f"--bus={bus.address}", "--print-reply", "--dest=org.freedesktop.DBus", "/org/freedesktop/DBus",
                 "org.freedesktop.DBus.NameHasOwner", "string:org.freedesktop.secrets"],
                capture_output=True, text=True,
            ).stdout.split()[-1] != "true":
                assert daemon.poll() is None and time.monotonic() < deadline, "gnome-keyring-daemon did not take its name"
                time.sleep(0.05)
            yield Keyring(bus.address, environ)
        finally:
            _stop(daemon.pid)
            daemon.wait(5)
            shutil.rmtree(home, ignore_errors=True)


async def _service(keyring: Keyring) -> tuple[MessageBus, SecretService]:
    bus = await MessageBus(bus_address=keyring.address).connect()
    return bus, SecretService(bus)


@pytest.mark.integration
def test_store_look_up_and_forget_through_a_real_keyring(keyring: Keyring) -> None:
    async def run() -> None:
        bus, service = await _service(keyring)
        try:
            assert await service.lookup(WANTED) is None
            secret = bytearray("pass wörd".encode())
            item = await service.store(WANTED, secret, "Passphrase of the backup disk backup1 (backup-agent)")
            assert item.startswith("/org/freedesktop/secrets/collection/")
            assert secret == bytearray("pass wörd".encode())  # the caller's to wipe
            # What desktop programs see, through libsecret:
            seen = keyring.secret_tool("lookup", "application", "backup-agent", "disk", "backup1")
            assert seen.stdout == "pass wörd".encode(), seen.stderr
            assert await service.lookup(WANTED) == bytearray("pass wörd".encode())
            assert await service.lookup({**WANTED, "disk": "other"}) is None
            # Storing again replaces the one item.
            await service.store(WANTED, bytearray(b"second"), "again")
            assert await service.lookup(WANTED) == bytearray(b"second")
            assert await service.forget(WANTED) == 1
            assert await service.lookup(WANTED) is None
            assert keyring.secret_tool("lookup", "disk", "backup1").returncode != 0
            assert await service.forget(WANTED) == 0
        finally:
            bus.disconnect()

    asyncio.run(asyncio.wait_for(run(), 30))


@pytest.mark.integration
def test_an_item_stored_by_another_program_is_found_by_its_attributes(keyring: Keyring) -> None:
    stored = keyring.secret_tool("store", "--label=by hand", *[part for pair in WANTED.items() for part in pair], stdin=b"typed")
    assert stored.returncode == 0, stored.stderr

    async def run() -> bytearray | None:
        bus, service = await _service(keyring)
        try:
            return await service.lookup(WANTED)
        finally:
            bus.disconnect()

    assert asyncio.run(asyncio.wait_for(run(), 30)) == bytearray(b"typed")
