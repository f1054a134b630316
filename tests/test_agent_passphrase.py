"""The agent backs up a disk whose crypttab line has no key file (issue 17, point 1), with real parts.

The disk: tests/test_disk_cycle.py's bench (a real LUKS2 header on a loop
device, real mount, rsync, blkid, udev), with a second key slot holding a
passphrase and a crypttab line with no key file. The cycle is the real CLI
as root without sudo (``backup --json --disk NAME --passphrase-stdin``). This
kernel has no device-mapper, so ONLY the mapping is a stand-in
(tests/helpers/fake_cryptsetup.py): it checks what came on its stdin with the
REAL ``cryptsetup open --test-passphrase`` against the header.

The prompt is the real pinentry-tty in a pseudo-terminal that a typist
thread answers (tests/helpers/typist.py); the keyring is a real
gnome-keyring-daemon on a private session bus (tests/test_secrets.py's
fixture). The agent runs on this test's loop (tests/test_daemon.py's
``agent_on``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from typing import Iterator

import pytest
from dbus_fast.aio import MessageBus

from agent.config.load import load_settings
from agent.disk import browse
from agent.desktop.dbus.secrets import SecretService
from agent.desktop.passphrase import Passphrases
from agent.desktop.pinentry import Pinentry
from tests.helpers.typist import Typist
from tests.test_daemon import Recorder, agent_on, here, one_cycle, real, until  # noqa: F401  (here: fixture)
from tests.test_disk import NAME, rig  # noqa: F401  (rig: fixture)
from tests.test_disk_cycle import Bench, bench  # noqa: F401  (bench: fixture)
from tests.test_passphrase_unlock import PASSPHRASE, PassphraseRig
from tests.test_secrets import Keyring, keyring  # noqa: F401  (keyring: fixture)
from tests.test_udev import udevd  # noqa: F401  (fixture)

TYPED = PASSPHRASE.decode() + "\r"


@pytest.fixture
def phrase_bench(bench: Bench, here: None) -> Iterator[tuple[Bench, PassphraseRig]]:  # noqa: F811
    """The bench initialised with its key file; then its crypttab line has none, and the stand-in cryptsetup is named."""
    if shutil.which("pinentry-tty") is None:
        pytest.skip(reason="pinentry-tty is not installed (apt-get install -y pinentry-tty)")
    phrase = PassphraseRig(bench.rig)
    bench.init()
    phrase.no_key_file()
    text = bench.config.read_text().replace("[commands]\n", f'[commands]\ncryptsetup = "{phrase.program}"\n')
    bench.config.write_text(text)
    yield bench, phrase


@pytest.fixture
def typists() -> Iterator[list[Typist]]:
    made: list[Typist] = []
    yield made
    for typist in made:
        typist.close()


def _snapshots(bench: Bench) -> list[str]:
    return sorted(bench.fingerprint()["snapshots"])


async def _backup(bench: Bench, passphrases: Passphrases, *, ask: bool = False) -> Recorder:
    """The agent started with the passphrase disk attached: its due backup (``ask``: "Back up now"), to its end."""
    async with agent_on(bench, passphrases=passphrases) as (agent, recorder):
        if ask:  # "running": the plug-in seen at start began it already
            assert agent.backup_now(NAME) in ("started", "running")
        await until(lambda: agent.status().state != "running" and agent.cycle_pid is None, "the backup to end", 40)
        await passphrases.settled()
        return recorder


async def _keyring_client(keyring: Keyring) -> tuple[MessageBus, SecretService]:  # noqa: F811
    bus = await MessageBus(bus_address=keyring.address).connect()
    return bus, SecretService(bus)


WANTED_KEYS = ("application", "backup-agent", "disk", NAME)


@real
def test_a_wrong_try_is_asked_again_and_the_passphrase_is_remembered_once_it_opened_the_disk(
    phrase_bench: tuple[Bench, PassphraseRig], keyring: Keyring, typists: list[Typist]  # noqa: F811
) -> None:
    bench, phrase = phrase_bench
    before = _snapshots(bench)
    typist = Typist([(b"Passphrase:", b"wrong\r"), (b"[rn]?", b"r"), (b"Passphrase:", TYPED.encode())])
    typists.append(typist)

    async def run() -> Recorder:
        bus, service = await _keyring_client(keyring)
        try:
            settings = load_settings(str(bench.config))
            return await _backup(bench, Passphrases(settings, Pinentry("/usr/bin/pinentry-tty", tty=typist.tty), service))
        finally:
            bus.disconnect()

    recorder = asyncio.run(run())
    assert recorder.of("backup_failed") == [] and len(recorder.of("backup_completed")) == 1
    assert len(_snapshots(bench)) == len(before) + 1
    assert b"Wrong passphrase (try 2 of 3)" in typist.shown and typist.answered == 3
    # Two cycles ran: the first refused by the real header (2), the second opened it; both with the key on stdin only.
    opens = [call for call in phrase.calls() if call["argv"][0] == "open"]
    assert [call["exit"] for call in opens] == [2, 0] and [call["stdin_bytes"] for call in opens] == [5, len(PASSPHRASE)]
    # Remembered only now that it opened the disk: libsecret finds it.
    assert keyring.secret_tool("lookup", *WANTED_KEYS).stdout == PASSPHRASE
    bench.assert_locked_and_unmounted()


@real
def test_a_remembered_passphrase_is_used_without_asking_and_a_stale_one_is_forgotten(
    phrase_bench: tuple[Bench, PassphraseRig], keyring: Keyring, typists: list[Typist]  # noqa: F811
) -> None:
    bench, phrase = phrase_bench
    settings = load_settings(str(bench.config))
    nobody = Typist([])  # the prompt must not show up at all
    typists.append(nobody)
    stored = keyring.secret_tool("store", "--label=x", *WANTED_KEYS, "luks-uuid", bench.rig.luks_uuid.lower(), stdin=PASSPHRASE)
    assert stored.returncode == 0, stored.stderr

    async def run(pinentry: Pinentry, *, ask: bool = False) -> Recorder:
        bus, service = await _keyring_client(keyring)
        try:
            return await _backup(bench, Passphrases(settings, pinentry, service), ask=ask)
        finally:
            bus.disconnect()

    recorder = asyncio.run(run(Pinentry("/usr/bin/pinentry-tty", tty=nobody.tty)))
    assert len(recorder.of("backup_completed")) == 1 and nobody.shown == b""

    # The passphrase changed (by hand, with cryptsetup) since it was remembered.
    stale = keyring.secret_tool("store", "--label=x", *WANTED_KEYS, "luks-uuid", bench.rig.luks_uuid.lower(), stdin=b"old one")
    assert stale.returncode == 0
    typist = Typist([(b"Passphrase:", TYPED.encode()), (b"[rn]?", b"n")])
    typists.append(typist)
    recorder = asyncio.run(run(Pinentry("/usr/bin/pinentry-tty", tty=typist.tty), ask=True))
    assert len(recorder.of("backup_completed")) == 1 and recorder.of("backup_failed") == []
    assert b"no longer opens the backup disk" in typist.shown
    assert keyring.secret_tool("lookup", *WANTED_KEYS).returncode != 0  # forgotten, and "Not now": not stored again
    assert [call["exit"] for call in phrase.calls() if call["argv"][0] == "open"] == [0, 2, 0]


@real
def test_a_cancelled_prompt_skips_the_backup_without_a_card_and_three_wrong_tries_tell_it(
    phrase_bench: tuple[Bench, PassphraseRig], typists: list[Typist]
) -> None:
    bench, phrase = phrase_bench
    settings = load_settings(str(bench.config))
    before = bench.fingerprint()
    cancel = Typist([(b"Passphrase:", b"\x04")])
    typists.append(cancel)
    recorder = asyncio.run(_backup(bench, Passphrases(settings, Pinentry("/usr/bin/pinentry-tty", tty=cancel.tty), None)))
    assert recorder.of("backup_started") == [] and recorder.of("backup_failed") == []  # no card at all
    assert phrase.calls() == []  # the cycle never ran
    assert recorder.of("status_changed")[-1][0].last_result != "failure"

    wrong = Typist([(b"Passphrase:", b"a\r"), (b"Passphrase:", b"b\r"), (b"Passphrase:", b"c\r")])
    typists.append(wrong)
    passphrases = Passphrases(settings, Pinentry("/usr/bin/pinentry-tty", tty=wrong.tty), None)
    recorder = asyncio.run(_backup(bench, passphrases, ask=True))  # the skip put the next try an interval away
    (failed,) = recorder.of("backup_failed")
    assert "wrong 3 times" in failed[1]
    assert [call["exit"] for call in phrase.calls()] == [2, 2, 2]
    assert b"try 3 of 3" in wrong.shown and b"Remember" not in wrong.shown  # no keyring: nothing offered
    assert bench.fingerprint() == before
    bench.assert_locked_and_unmounted()


@real
def test_browsing_a_passphrase_disk_asks_too_and_opens_it_read_only(
    phrase_bench: tuple[Bench, PassphraseRig], typists: list[Typist]
) -> None:
    bench, phrase = phrase_bench
    settings = load_settings(str(bench.config))
    # The plug-in's backup is cancelled at its prompt; then Browse backups: a wrong try, then the passphrase.
    typist = Typist([(b"Passphrase:", b"\x04"), (b"open its backups", b""), (b"Passphrase:", b"nope\r"),
                     (b"Passphrase:", TYPED.encode())])
    typists.append(typist)
    open_argv = (sys.executable, "-m", "agent.cli", "open", "--json", "--config", str(bench.config))

    async def scenario() -> None:
        passphrases = Passphrases(settings, Pinentry("/usr/bin/pinentry-tty", tty=typist.tty), None)
        async with agent_on(bench, passphrases=passphrases, open_argv=open_argv, browse_idle=60) as (agent, recorder):
            await until(lambda: agent.status().state != "running", "the cancelled backup to be skipped")
            reply = await agent.browse(NAME)
            assert reply.result == "opened", reply
            assert browse.missing_flags(os.statvfs(bench.rig.mount_point).f_flag) == []
            assert (await agent.eject(NAME)).safe
            assert recorder.of("backup_failed") == []

    asyncio.run(asyncio.wait_for(scenario(), 120))
    assert b"Wrong passphrase (try 2 of 3)" in typist.shown
    assert [call["exit"] for call in phrase.calls() if call["argv"][0] == "open"] == [2, 0]
    # Eject closed it as the cycle would have: cryptsetup close, not the key-file disk's cryptdisks_stop.
    assert [call["argv"] for call in phrase.calls() if call["argv"][0] == "close"] == [["close", NAME]]
    bench.assert_locked_and_unmounted()


def _holding(tty: str) -> list[int]:
    """The processes that have ``tty`` open (read from /proc): the prompt, while it is up."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{entry}/fd/{fd}") == tty:
                    found.append(int(entry))
                    break
            except OSError:
                continue
    return [pid for pid in found if pid != os.getpid()]


@real
def test_stop_while_the_prompt_is_up_closes_it_and_skips_the_backup(
    phrase_bench: tuple[Bench, PassphraseRig], typists: list[Typist]
) -> None:
    bench, phrase = phrase_bench
    settings = load_settings(str(bench.config))
    nobody = Typist([])  # shown the prompt, answers nothing
    typists.append(nobody)

    async def scenario() -> None:
        passphrases = Passphrases(settings, Pinentry("/usr/bin/pinentry-tty", tty=nobody.tty), None)
        async with agent_on(bench, passphrases=passphrases) as (agent, recorder):
            await until(lambda: b"Passphrase:" in nobody.shown, "the prompt to show")
            assert _holding(nobody.tty) != []  # pinentry-tty has the terminal
            assert agent.stop() == "stopping"
            await until(lambda: agent.status().state != "running", "the backup to be given up")
            await until(lambda: _holding(nobody.tty) == [], "the prompt to close", 15)
            assert recorder.of("backup_started") == [] and recorder.of("backup_failed") == []

    asyncio.run(asyncio.wait_for(scenario(), 120))
    assert phrase.calls() == []
    bench.assert_locked_and_unmounted()
