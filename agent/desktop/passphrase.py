"""Getting the passphrase of a disk whose crypttab line has no key file: the keyring first, then the user.

The agent calls :meth:`Passphrases.ask` before it starts the cycle of such a
disk, and hands what it got to the cycle on its standard input
(``--passphrase-stdin``). A passphrase remembered in the Secret Service
(agent.desktop.dbus.secrets) is used without asking; otherwise pinentry
(agent.desktop.pinentry) asks, and offers to remember it. It is stored only
once it opened the disk (:meth:`Passphrases.opened`, when the cycle's
``unlock`` step is done), and a remembered one that no longer opens it is
forgotten (:meth:`Passphrases.forget`). The decisions of the daemon (three
tries, a cancel skips the backup) are in agent.desktop.daemon; the words are
here and pure (docs/ARCHITECTURE.md, "A passphrase disk").
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from typing import Any, Coroutine, Final, Literal, Mapping, Protocol

from agent.config.model import Disk, Settings
from agent.disk.passphrase import wipe
from agent.disk.tables import parse_crypttab
from agent.desktop.pinentry import Prompt, PromptUnavailable

log = logging.getLogger(__name__)

#: Typed passphrases tried before the backup is given up (with a notification).
TRIES: Final = 3

Purpose = Literal["backup", "browse"]


class Keyring(Protocol):
    """The Secret Service as used here (agent.desktop.dbus.secrets.SecretService)."""

    async def lookup(self, wanted: Mapping[str, str]) -> bytearray | None: ...

    async def store(self, wanted: Mapping[str, str], secret: bytearray, title: str) -> str: ...

    async def forget(self, wanted: Mapping[str, str]) -> int: ...


class Prompter(Protocol):
    """A pinentry (agent.desktop.pinentry.Pinentry)."""

    async def get_pin(self, prompt: Prompt, confirm: Prompt | None = None) -> tuple[bytearray | None, bool]: ...


@dataclass
class Given:
    """A passphrase for one try: ``remembered`` (read from the keyring), ``remember`` (store it once it opened the disk)."""

    secret: bytearray
    remembered: bool = False
    remember: bool = False

    def wipe(self) -> None:
        wipe(self.secret)


# -- the words (pure) --------------------------------------------------------------------------


def prompt_for(disk: str, purpose: Purpose, *, wrong: int = 0, forgotten: bool = False) -> Prompt:
    """The dialog that asks for ``disk``'s passphrase: after ``wrong`` wrong tries, or a forgotten remembered one (pure)."""
    why = "back up to it now" if purpose == "backup" else "open its backups"
    description = f"The backup disk {disk} is locked with a passphrase.\nType it to {why}."
    if forgotten:
        description = (
            f"The passphrase remembered in your keyring no longer opens the backup disk {disk}, "
            f"so it was forgotten.\nType the passphrase to {why}."
        )
    error = f"Wrong passphrase (try {wrong + 1} of {TRIES})" if wrong else None
    return Prompt(title=f"Backup disk {disk}", description=description, prompt="Passphrase:", error=error)


def remember_question(disk: str) -> Prompt:
    """The yes/no question asked once a passphrase was typed (pure)."""
    return Prompt(
        title=f"Backup disk {disk}",
        description=(
            f"Remember the passphrase of {disk} in your keyring?\n"
            "Backups then start without asking. It is kept only if it opens the disk."
        ),
        ok="Remember",
        cancel="Not now",
    )


def too_many_tries(disk: str, purpose: Purpose = "backup") -> str:
    """The failure told after the last wrong try (pure)."""
    if purpose == "browse":
        return f"the passphrase typed for {disk} was wrong {TRIES} times: the disk stays locked; choose Browse backups to try again"
    return (
        f"the passphrase typed for {disk} was wrong {TRIES} times: the disk stays locked and nothing was backed up; "
        "back up again to type it once more"
    )


# -- asking ---------------------------------------------------------------------------------


class Passphrases:
    """Where a disk's passphrase comes from; keyring failures are logged and fall back to asking."""

    def __init__(self, settings: Settings, prompter: Prompter | None, keyring: Keyring | None) -> None:
        self._settings = settings
        self._disks = {disk.name: disk for disk in settings.disks}
        self.prompter = prompter
        self.keyring = keyring
        self._tasks: set[asyncio.Task[None]] = set()

    def needed(self, name: str) -> bool:
        """True when the disk's crypttab line has no key file and it is not unlocked already.

        The crypttab is read as the user (it is world-readable on the usual
        systems); one that cannot be read means no prompt: the cycle then
        says what is wrong.
        """
        disk = self._disks.get(name)
        if disk is None or os.path.exists(disk.mapped_device):
            return False
        try:
            with open(self._settings.crypttab, encoding="utf-8", errors="replace") as handle:
                entry = parse_crypttab(handle.read()).get(name)
        except OSError as exc:
            log.info("cannot read %s (%s): not asking for a passphrase for %s", self._settings.crypttab, exc.strerror, name)
            return False
        return entry is not None and entry.key_file is None

    async def ask(
        self, name: str, purpose: Purpose, *, wrong: int = 0, forgotten: bool = False, remember: bool | None = None
    ) -> Given | None:
        """The passphrase to try next, or None when the user cancelled (or let the prompt time out).

        The keyring is asked first, unless a try failed already (``wrong``,
        ``forgotten``). ``remember``: the user's earlier answer to "remember
        it?" (None: ask it with this prompt, when there is a keyring).
        Raises PromptUnavailable when nothing can ask.
        """
        disk = self._disks[name]
        wanted = _attributes(disk)
        if self.keyring is not None and not wrong and not forgotten:
            try:
                found = await self.keyring.lookup(wanted)
            except Exception as exc:  # a keyring that fails only means asking
                log.warning("could not read the remembered passphrase of %s from the keyring: %s", name, exc)
                found = None
            if found is not None:
                log.info("using the passphrase of %s remembered in the keyring", name)
                return Given(found, remembered=True)
        if self.prompter is None:
            raise PromptUnavailable(
                "no passphrase prompt fits this session: install pinentry-gnome3, pinentry-qt or pinentry-gtk2"
            )
        question = remember_question(name) if self.keyring is not None and remember is None else None
        secret, said_yes = await self.prompter.get_pin(prompt_for(name, purpose, wrong=wrong, forgotten=forgotten), question)
        if secret is None:
            log.info("the passphrase prompt for %s was cancelled", name)
            return None
        return Given(secret, remember=said_yes if remember is None else remember)

    def opened(self, name: str, given: Given) -> None:
        """The passphrase opened the disk: store it when the user asked to (in the background), then wipe it."""
        if not given.remember or given.remembered or self.keyring is None:
            given.wipe()
            return
        self._background(self._store(self._disks[name], given))

    def forget(self, name: str) -> None:
        """A remembered passphrase no longer opens the disk: delete it from the keyring (in the background)."""
        if self.keyring is not None:
            self._background(self._forget(self._disks[name]))

    async def settled(self) -> None:
        """Wait for what runs in the background (storing, forgetting): for a clean shutdown and for tests."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _store(self, disk: Disk, given: Given) -> None:
        keyring = self.keyring
        try:
            if keyring is not None:
                await keyring.store(_attributes(disk), given.secret, _title(disk))
                log.info("the passphrase of %s is remembered in the keyring", disk.name)
        except Exception as exc:
            log.warning("could not remember the passphrase of %s in the keyring: %s", disk.name, exc)
        finally:
            given.wipe()

    async def _forget(self, disk: Disk) -> None:
        keyring = self.keyring
        try:
            if keyring is not None:
                count = await keyring.forget(_attributes(disk))
                log.warning("the passphrase remembered for %s no longer opens it: forgotten (%d item(s))", disk.name, count)
        except Exception as exc:
            log.warning("could not forget the passphrase of %s in the keyring: %s", disk.name, exc)


def _attributes(disk: Disk) -> dict[str, str]:
    return {"application": "backup-agent", "disk": disk.name, "luks-uuid": disk.luks_uuid.lower()}


def _title(disk: Disk) -> str:
    return f"Passphrase of the backup disk {disk.name} (backup-agent)"
