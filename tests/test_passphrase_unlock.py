"""A disk whose crypttab line has no key file, opened with a passphrase on standard input (issue 17, point 1).

Pure: the cryptsetup argv from the crypttab line's options, reading the
passphrase from a pipe, wiping. Then real parts: a real LUKS2 header on a
loop device with a passphrase key slot (tests/test_disk.py's rig), the real
CLI (``backup --json --disk NAME --passphrase-stdin``) and the real
``cryptsetup`` checking the passphrase. This kernel has no device-mapper, so
ONLY the mapping is a stand-in (tests/helpers/fake_cryptsetup.py): it hands
the key it got on stdin to the real ``cryptsetup open --test-passphrase
--key-file=-`` and exposes a plain image as the mapped device.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from agent.config.model import Commands
from agent.core.commands import Runner
from agent.core.errors import DiskError, UsageError, WrongPassphraseError
from agent.disk.passphrase import MAX_PASSPHRASE, close_argv, open_argv, read_passphrase, wipe
from agent.disk.tables import CrypttabEntry
from agent.disk.unlock import unlocked
from tests.helpers import fake_cryptsetup
from tests.test_disk import Rig, _run, rig  # noqa: F401  (rig is the fixture these tests use)
from tests.test_disk_cycle import Bench, bench  # noqa: F401  (bench is the fixture these tests use)

PASSPHRASE = b"correct horse battery staple \xc3\xa9"
EXIT_USAGE, EXIT_WRONG_PASSPHRASE = 2, 15
COMMANDS = Commands(cryptsetup="/sbin/cryptsetup")


# -- pure ----------------------------------------------------------------------------------


def test_open_argv_keeps_the_key_off_the_command_line_and_honours_the_options() -> None:
    options = ("luks", "discard", "noauto", "nofail", "readonly", "header=/etc/h.img", "keyslot=1", "x-systemd.device-timeout=10", "tries=3")
    entry = CrypttabEntry("backup1", "UUID=x", None, options)
    assert open_argv(entry, "/dev/sdb1", COMMANDS) == (
        "/sbin/cryptsetup", "open", "--type", "luks", "--key-file=-", "--allow-discards", "--readonly",
        "--header", "/etc/h.img", "--key-slot", "1", "/dev/sdb1", "backup1",
    )
    assert open_argv(CrypttabEntry("b", "UUID=x", None, ()), "/dev/sdc", COMMANDS)[-3:] == ("--key-file=-", "/dev/sdc", "b")
    assert close_argv(entry, COMMANDS) == ("/sbin/cryptsetup", "close", "backup1")


@pytest.mark.parametrize("option", ["plain", "tcrypt", "keyscript=/bin/sh", "swap", "header=relative", "keyslot=x", "bitlk"])
def test_open_argv_refuses_what_it_cannot_honour_by_name(option: str) -> None:
    with pytest.raises(DiskError, match=f"the option '{option}'|{option}") as raised:
        open_argv(CrypttabEntry("backup1", "UUID=x", None, ("luks", option)), "/dev/sdb1", COMMANDS)
    assert "nothing was unlocked" in raised.value.message


def _pipe_with(data: bytes) -> int:
    read, write = os.pipe()
    os.write(write, data)
    os.close(write)
    return read


def test_read_passphrase_takes_the_whole_pipe_and_refuses_empty_or_too_long() -> None:
    fd = _pipe_with(PASSPHRASE)
    try:
        got = read_passphrase(fd)
    finally:
        os.close(fd)
    assert isinstance(got, bytearray) and got == PASSPHRASE
    for data, message in ((b"", "held no passphrase"), (b"x" * (MAX_PASSPHRASE + 1), "longer than")):
        fd = _pipe_with(data)
        try:
            with pytest.raises(UsageError, match=message):
                read_passphrase(fd)
        finally:
            os.close(fd)


def test_wipe_overwrites_in_place() -> None:
    secret = bytearray(PASSPHRASE)
    view = memoryview(secret)  # the same memory the caller holds
    wipe(secret)
    assert bytes(view) == bytes(len(PASSPHRASE))


def test_the_runner_hands_stdin_to_the_command_and_logs_no_byte_of_it(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG", logger="agent")
    said: list[str] = []
    Runner().run(("/bin/sh", "-c", "cat | wc -c"), step="unlock", stdin=bytearray(b"s3cret"), on_stdout=said.append)
    assert said == ["6"]  # all of it, and no newline added
    assert "s3cret" not in caplog.text


# -- real parts ------------------------------------------------------------------------------


class PassphraseRig:
    """The rig's LUKS2 header with a second key slot holding PASSPHRASE, and the stand-in cryptsetup."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        phrase = rig.tmp / "phrase"
        phrase.write_bytes(PASSPHRASE)
        _run("cryptsetup", "luksAddKey", "--batch-mode", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
             "--key-file", str(rig.key), str(rig.luks_device), str(phrase))
        phrase.unlink()
        self.log = rig.tmp / "cryptsetup.log"
        self.program = rig.bin / "cryptsetup"
        config = {
            "cryptsetup": shutil.which("cryptsetup"),
            "mapper_dir": str(rig.mapper),
            "targets": {rig.name: rig.plain_device},
            "log": str(self.log),
        }
        self.program.write_text(fake_cryptsetup.render(config))
        self.program.chmod(0o755)

    def no_key_file(self, options: str = "luks,noauto") -> None:
        self.rig.crypttab.write_text(f"{self.rig.name} UUID={self.rig.luks_uuid} none {options}\n")

    def calls(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []


@pytest.fixture
def phrase_rig(rig: Rig) -> Iterator[PassphraseRig]:  # noqa: F811
    yield PassphraseRig(rig)


@pytest.mark.integration
def test_the_passphrase_opens_the_real_header_and_the_disk_is_locked_again(phrase_rig: PassphraseRig) -> None:
    rig = phrase_rig.rig
    phrase_rig.no_key_file("luks,discard,noauto")
    disk, settings = rig.setup()
    settings = dataclasses.replace(settings, commands=dataclasses.replace(settings.commands, cryptsetup=str(phrase_rig.program)))
    secret = bytearray(PASSPHRASE)
    with unlocked(disk, settings, Runner(), rig.warnings.append, passphrase=secret) as unlocked_now:
        assert unlocked_now and rig.is_unlocked()
        assert secret == bytes(len(PASSPHRASE))  # wiped as soon as cryptsetup had it
    assert not rig.is_unlocked()
    opened, closed = phrase_rig.calls()
    assert opened["argv"] == ["open", "--type", "luks", "--key-file=-", "--allow-discards", rig.luks_device, rig.name]
    assert opened["exit"] == 0 and opened["stdin_bytes"] == len(PASSPHRASE)
    assert closed == {"argv": ["close", rig.name], "exit": 0, "stdin_bytes": 0}
    assert rig.calls() == []  # cryptdisks_start never ran


@pytest.mark.integration
def test_a_wrong_passphrase_is_told_apart_and_nothing_is_unlocked(phrase_rig: PassphraseRig) -> None:
    rig = phrase_rig.rig
    phrase_rig.no_key_file()
    disk, settings = rig.setup()
    settings = dataclasses.replace(settings, commands=dataclasses.replace(settings.commands, cryptsetup=str(phrase_rig.program)))
    secret = bytearray(b"not it")
    with pytest.raises(WrongPassphraseError, match="the passphrase does not open"):
        with unlocked(disk, settings, Runner(), rig.warnings.append, passphrase=secret):
            pass
    assert secret == bytes(6) and not rig.is_unlocked()
    assert [call["exit"] for call in phrase_rig.calls()] == [2]  # the real cryptsetup's "no key available"


@pytest.mark.integration
def test_a_passphrase_for_a_line_with_a_key_file_is_refused(phrase_rig: PassphraseRig) -> None:
    rig = phrase_rig.rig
    disk, settings = rig.setup()  # the rig's crypttab names its key file
    with pytest.raises(UsageError, match="only for a disk whose crypttab line has none"):
        with unlocked(disk, settings, Runner(), rig.warnings.append, passphrase=bytearray(PASSPHRASE)):
            pass
    assert not rig.is_unlocked() and phrase_rig.calls() == []


@pytest.mark.integration
def test_the_cli_backs_up_with_the_passphrase_on_stdin_and_refuses_a_wrong_one(bench: Bench) -> None:  # noqa: F811
    phrase_rig = PassphraseRig(bench.rig)
    bench.init()  # made with the key file; from now on the line has none
    phrase_rig.no_key_file()
    text = bench.config.read_text().replace("[commands]\n", f"[commands]\ncryptsetup = {json.dumps(str(phrase_rig.program))}\n")
    bench.config.write_text(text)
    without = bench.backup()
    assert without.returncode == 5 and "gives no key file" in without.stderr
    wrong = bench.backup("--passphrase-stdin", stdin=_pipe_with(b"wrong"))
    assert wrong.returncode == EXIT_WRONG_PASSPHRASE, str(wrong)
    assert wrong.the("error")["step"] == "unlock" and "does not open" in wrong.the("error")["message"]
    assert not bench.rig.is_unlocked()
    run = bench.backup("--passphrase-stdin", stdin=_pipe_with(PASSPHRASE))
    assert run.returncode == 0, str(run)
    assert run.the("complete")["snapshot"]
    assert not bench.rig.is_unlocked() and bench.rig.top() is None
    assert all(PASSPHRASE.decode() not in " ".join(call["argv"]) for call in phrase_rig.calls())
    assert PASSPHRASE.decode() not in run.stdout + run.stderr + wrong.stdout + wrong.stderr


def test_passphrase_stdin_needs_a_disk(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[backup]\nsource = "/tmp"\n')
    done = subprocess.run(
        [sys.executable, "-m", "agent.cli", "backup", "--no-sudo", "--config", str(config), "--passphrase-stdin", str(tmp_path / "r")],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent, stdin=subprocess.DEVNULL, timeout=30,
    )
    assert done.returncode == EXIT_USAGE and "give --disk NAME" in done.stderr, done.stderr
