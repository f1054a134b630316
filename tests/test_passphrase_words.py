"""What the passphrase prompt says and when it is needed (agent/desktop/passphrase.py): pure, tested directly."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.config.model import Disk, Settings
from agent.desktop.passphrase import TRIES, Passphrases, prompt_for, remember_question, too_many_tries
from agent.desktop.pinentry import PromptUnavailable


def test_the_prompt_says_which_disk_why_and_after_a_wrong_try_which_try() -> None:
    first = prompt_for("backup1", "backup")
    assert first.title == "Backup disk backup1" and first.error is None
    assert "backup1 is locked with a passphrase" in first.description and "back up to it now" in first.description
    assert "open its backups" in prompt_for("backup1", "browse").description
    assert prompt_for("backup1", "backup", wrong=1).error == f"Wrong passphrase (try 2 of {TRIES})"
    assert prompt_for("backup1", "backup", wrong=2).error == f"Wrong passphrase (try 3 of {TRIES})"
    forgotten = prompt_for("backup1", "backup", forgotten=True)
    assert "no longer opens" in forgotten.description and "forgotten" in forgotten.description
    question = remember_question("backup1")
    assert (question.ok, question.cancel) == ("Remember", "Not now") and "only if it opens the disk" in question.description
    assert f"wrong {TRIES} times" in too_many_tries("backup1") and "nothing was backed up" in too_many_tries("backup1")
    assert "Browse backups" in too_many_tries("backup1", "browse")


def _settings(tmp_path: Path, crypttab: str | None) -> Settings:
    table = tmp_path / "crypttab"
    if crypttab is not None:
        table.write_text(crypttab)
    disk = Disk(name="backup1", luks_uuid="0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d", mount_point="/mnt/b",
                mapped_device=str(tmp_path / "mapper" / "backup1"), repository="/mnt/b/h")
    return Settings(path=None, disks=(disk,), crypttab=str(table))


def test_a_passphrase_is_needed_only_for_a_locked_disk_whose_line_has_no_key_file(tmp_path: Path) -> None:
    line = "backup1 UUID=0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d {key} luks,noauto\n"
    assert Passphrases(_settings(tmp_path, line.format(key="none")), None, None).needed("backup1")
    assert Passphrases(_settings(tmp_path, line.format(key="-")), None, None).needed("backup1")
    assert not Passphrases(_settings(tmp_path, line.format(key="/etc/keys/b.key")), None, None).needed("backup1")
    assert not Passphrases(_settings(tmp_path, "other UUID=x none luks\n"), None, None).needed("backup1")
    settings = _settings(tmp_path, line.format(key="none"))
    assert not Passphrases(settings, None, None).needed("unknown")
    (tmp_path / "mapper").mkdir()
    (tmp_path / "mapper" / "backup1").touch()  # unlocked already (by hand): used as found, nothing asked
    assert not Passphrases(settings, None, None).needed("backup1")


def test_an_unreadable_crypttab_asks_nothing(tmp_path: Path) -> None:
    assert not Passphrases(_settings(tmp_path, None), None, None).needed("backup1")


def test_without_a_prompt_and_nothing_remembered_it_says_what_to_install(tmp_path: Path) -> None:
    settings = _settings(tmp_path, "backup1 UUID=0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d none luks\n")
    with pytest.raises(PromptUnavailable, match="install pinentry-gnome3, pinentry-qt or pinentry-gtk2"):
        asyncio.run(Passphrases(settings, None, None).ask("backup1", "backup"))
