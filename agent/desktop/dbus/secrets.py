"""The desktop's Secret Service (org.freedesktop.secrets): a disk's passphrase, remembered when the user asks.

GNOME Keyring, KWallet and KeePassXC all serve this interface on the
session bus. Four things are used: open a session, search items by
attributes (then read the secret), create an item in the default
collection, delete items (docs/ARCHITECTURE.md, "A passphrase disk").

The session uses the "plain" algorithm: the secret crosses the session bus
unencrypted. That bus is a socket only this user (and root) can connect to,
and the keyring hands its secrets to any process of the user that asks; an
eavesdropper on it could ask the keyring directly, so encrypting the
transport (dh-ietf1024-sha256-aes128-cbc-pkcs7, which keyrings prefer)
would keep nothing from anyone who could read it, and would need an AES
implementation Python's standard library does not have. The README's
security section says the same.

The secret arrives from dbus_fast as ``bytes`` (immutable: Python cannot
wipe it); it is copied once into a bytearray that the caller wipes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Final, Mapping

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from agent.desktop.dbus.bus import CALL_TIMEOUT, BusCallError, call, checked, match_rule, send

log = logging.getLogger(__name__)

NAME: Final = "org.freedesktop.secrets"
PATH: Final = "/org/freedesktop/secrets"
SERVICE: Final = "org.freedesktop.Secret.Service"
COLLECTION: Final = "org.freedesktop.Secret.Collection"
ITEM: Final = "org.freedesktop.Secret.Item"
PROMPT: Final = "org.freedesktop.Secret.Prompt"
SESSION: Final = "org.freedesktop.Secret.Session"
DEFAULT_COLLECTION: Final = "/org/freedesktop/secrets/aliases/default"
#: Seconds a keyring's own prompt (unlock the keyring, allow deleting) may wait for the user.
PROMPT_TIMEOUT: Final = 120.0


class KeyringRefused(RuntimeError):
    """The user dismissed the keyring's own prompt (unlocking it, creating an item)."""


class SecretService:
    """The Secret Service on ``bus``; every method raises BusCallError, KeyringRefused or asyncio.TimeoutError when it fails."""

    def __init__(self, bus: MessageBus, *, timeout: float = CALL_TIMEOUT) -> None:
        self.bus = bus
        self.timeout = timeout

    async def _call(self, path: str, interface: str, member: str, signature: str = "", body: list[Any] | None = None) -> list[Any]:
        reply = await call(self.bus, NAME, path, interface, member, signature, body, timeout=self.timeout)
        return list(checked(reply, member).body)

    async def _open_session(self) -> str:
        _output, session = await self._call(PATH, SERVICE, "OpenSession", "sv", ["plain", Variant("s", "")])
        return str(session)

    async def _close_session(self, session: str) -> None:
        try:
            await self._call(session, SESSION, "Close")
        except (BusCallError, asyncio.TimeoutError) as exc:
            log.debug("closing the secret session failed: %s", exc)

    async def _search(self, wanted: Mapping[str, str]) -> tuple[list[str], list[str]]:
        unlocked, locked = await self._call(PATH, SERVICE, "SearchItems", "a{ss}", [dict(wanted)])
        return [str(path) for path in unlocked], [str(path) for path in locked]

    async def _prompt(self, prompt: str) -> tuple[bool, Any]:
        """Show the keyring's own prompt and wait for it: (dismissed, result)."""
        if prompt == "/":
            return False, None
        done: asyncio.Future[tuple[bool, Any]] = asyncio.get_running_loop().create_future()

        def on_message(message: Message) -> None:
            if (
                message.message_type is MessageType.SIGNAL
                and message.path == prompt
                and message.member == "Completed"
                and not done.done()
            ):
                dismissed, result = message.body
                done.set_result((bool(dismissed), result.value if isinstance(result, Variant) else result))

        rule = match_rule(interface=PROMPT, member="Completed", path=prompt)
        self.bus.add_message_handler(on_message)
        try:
            await send(self.bus, Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                                         interface="org.freedesktop.DBus", member="AddMatch", signature="s", body=[rule]))
            await self._call(prompt, PROMPT, "Prompt", "s", [""])
            return await asyncio.wait_for(done, PROMPT_TIMEOUT)
        finally:
            self.bus.remove_message_handler(on_message)

    async def _unlocked(self, paths: list[str]) -> list[str]:
        if not paths:
            return []
        unlocked, prompt = await self._call(PATH, SERVICE, "Unlock", "ao", [paths])
        if prompt != "/":
            dismissed, result = await self._prompt(str(prompt))
            unlocked = [] if dismissed else list(result or [])
        return [str(path) for path in unlocked]

    async def lookup(self, wanted: Mapping[str, str]) -> bytearray | None:
        """The secret of the first item with these attributes (its keyring unlocked if need be), or None."""
        unlocked, locked = await self._search(wanted)
        items = unlocked or await self._unlocked(locked)
        if not items:
            return None
        session = await self._open_session()
        try:
            (secrets,) = await self._call(PATH, SERVICE, "GetSecrets", "aoo", [items[:1], session])
        finally:
            await self._close_session(session)
        found = secrets.get(items[0])
        if found is None:
            return None
        value = bytearray(found[2])
        del found, secrets  # the immutable copies dbus_fast made: gone from here at once
        return value

    async def store(self, wanted: Mapping[str, str], secret: bytearray, title: str) -> str:
        """Create (or replace) the item in the default collection; its object path."""
        session = await self._open_session()
        try:
            properties = {
                f"{ITEM}.Label": Variant("s", title),
                f"{ITEM}.Attributes": Variant("a{ss}", dict(wanted)),
            }
            await self._unlocked([DEFAULT_COLLECTION])
            item, prompt = await self._call(
                DEFAULT_COLLECTION, COLLECTION, "CreateItem", "a{sv}(oayays)b",
                [properties, [session, b"", bytes(secret), "text/plain"], True],
            )
        finally:
            await self._close_session(session)
        if item == "/":
            dismissed, result = await self._prompt(str(prompt))
            if dismissed:
                raise KeyringRefused("the keyring's prompt was dismissed: the passphrase was not remembered")
            item = result
        return str(item)

    async def forget(self, wanted: Mapping[str, str]) -> int:
        """Delete every item with these attributes; how many were deleted."""
        unlocked, locked = await self._search(wanted)
        deleted = 0
        for item in unlocked + locked:
            (prompt,) = await self._call(item, ITEM, "Delete")
            dismissed, _ = await self._prompt(str(prompt))
            deleted += 0 if dismissed else 1
        return deleted


__all__ = ["KeyringRefused", "SecretService"]
