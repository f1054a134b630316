"""The tray's D-Bus objects: an ``org.kde.StatusNotifierItem`` and its ``com.canonical.dbusmenu`` menu.

They only answer the panel (the tray host): every value they give, and
every click they receive, goes to a :class:`Shows` (the
:class:`agent.desktop.dbus.tray.Tray`), which follows the agent and decides
what is shown (:mod:`agent.desktop.dbus.traylook`). Registering with the
StatusNotifierWatcher is the Tray's.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Protocol

from dbus_fast import DBusError, ErrorType, Variant
from dbus_fast.annotations import (
    DBusBool,
    DBusInt32,
    DBusObjectPath,
    DBusSignature,
    DBusStr,
    DBusUInt32,
    DBusVariant,
)
from dbus_fast.constants import PropertyAccess
from dbus_fast.service import ServiceInterface, dbus_method, dbus_property, dbus_signal

from agent.desktop.dbus.notify import APP_NAME
from agent.desktop.dbus.traylook import ICONS, Item

ITEM_PATH: Final = "/StatusNotifierItem"
MENU_PATH: Final = "/MenuBar"
ITEM_INTERFACE: Final = "org.kde.StatusNotifierItem"
MENU_INTERFACE: Final = "com.canonical.dbusmenu"
WATCHER_NAME: Final = "org.kde.StatusNotifierWatcher"
WATCHER_PATH: Final = "/StatusNotifierWatcher"
WATCHER_INTERFACE: Final = "org.kde.StatusNotifierWatcher"
ITEM_ID: Final = "backup-agent"


class Shows(Protocol):
    """What the D-Bus objects read and where they send clicks (agent.desktop.dbus.tray.Tray is one)."""

    @property
    def icon_name(self) -> str: ...

    @property
    def item_status(self) -> str: ...

    @property
    def tooltip(self) -> tuple[str, str]: ...

    @property
    def items(self) -> tuple[Item, ...]: ...

    @property
    def revision(self) -> int: ...

    def menu_event(self, ident: int, event: str) -> None: ...

    async def about_to_show(self) -> bool: ...


_Nothing = Annotated[None, DBusSignature("")]  # a method or signal without a value
_ToolTip = Annotated[tuple[str, list[Any], str, str], DBusSignature("(sa(iiay)ss)")]
_Pixmaps = Annotated[list[Any], DBusSignature("a(iiay)")]
_Layout = Annotated[tuple[int, list[Any]], DBusSignature("u(ia{sv}av)")]
_Group = Annotated[list[Any], DBusSignature("a(ia{sv})")]


class ItemService(ServiceInterface):
    """org.kde.StatusNotifierItem: what the panel shows; the values come from the Tray."""

    def __init__(self, tray: Shows) -> None:
        super().__init__(ITEM_INTERFACE)
        self._tray = tray

    @dbus_property(access=PropertyAccess.READ, name="Category")
    def _category(self) -> DBusStr:
        return "ApplicationStatus"

    @dbus_property(access=PropertyAccess.READ, name="Id")
    def _id(self) -> DBusStr:
        return ITEM_ID

    @dbus_property(access=PropertyAccess.READ, name="Title")
    def _title(self) -> DBusStr:
        return APP_NAME

    @dbus_property(access=PropertyAccess.READ, name="Status")
    def _status(self) -> DBusStr:
        return self._tray.item_status

    @dbus_property(access=PropertyAccess.READ, name="WindowId")
    def _window_id(self) -> DBusInt32:
        return 0

    @dbus_property(access=PropertyAccess.READ, name="IconName")
    def _icon_name(self) -> DBusStr:
        return self._tray.icon_name

    @dbus_property(access=PropertyAccess.READ, name="IconPixmap")
    def _icon_pixmap(self) -> _Pixmaps:
        return []

    @dbus_property(access=PropertyAccess.READ, name="OverlayIconName")
    def _overlay_icon_name(self) -> DBusStr:
        return ""

    @dbus_property(access=PropertyAccess.READ, name="OverlayIconPixmap")
    def _overlay_icon_pixmap(self) -> _Pixmaps:
        return []

    @dbus_property(access=PropertyAccess.READ, name="AttentionIconName")
    def _attention_icon_name(self) -> DBusStr:
        return ICONS["failed"]

    @dbus_property(access=PropertyAccess.READ, name="AttentionIconPixmap")
    def _attention_icon_pixmap(self) -> _Pixmaps:
        return []

    @dbus_property(access=PropertyAccess.READ, name="AttentionMovieName")
    def _attention_movie_name(self) -> DBusStr:
        return ""

    @dbus_property(access=PropertyAccess.READ, name="IconThemePath")
    def _icon_theme_path(self) -> DBusStr:
        return ""

    @dbus_property(access=PropertyAccess.READ, name="ToolTip")
    def _tooltip(self) -> _ToolTip:
        title, text = self._tray.tooltip
        return (self._tray.icon_name, [], title, text)

    @dbus_property(access=PropertyAccess.READ, name="ItemIsMenu")
    def _item_is_menu(self) -> DBusBool:
        return True

    @dbus_property(access=PropertyAccess.READ, name="Menu")
    def _menu(self) -> DBusObjectPath:
        return MENU_PATH

    # A click shows the menu (ItemIsMenu); these exist for hosts that call them anyway.

    @dbus_method(name="Activate")
    def _activate(self, x: DBusInt32, y: DBusInt32) -> _Nothing:
        return None

    @dbus_method(name="SecondaryActivate")
    def _secondary_activate(self, x: DBusInt32, y: DBusInt32) -> _Nothing:
        return None

    @dbus_method(name="ContextMenu")
    def _context_menu(self, x: DBusInt32, y: DBusInt32) -> _Nothing:
        return None

    @dbus_method(name="Scroll")
    def _scroll(self, delta: DBusInt32, orientation: DBusStr) -> _Nothing:
        return None

    @dbus_signal(name="NewIcon")
    def new_icon(self) -> _Nothing:
        return None

    @dbus_signal(name="NewAttentionIcon")
    def new_attention_icon(self) -> _Nothing:
        return None

    @dbus_signal(name="NewToolTip")
    def new_tooltip(self) -> _Nothing:
        return None

    @dbus_signal(name="NewTitle")
    def new_title(self) -> _Nothing:
        return None

    @dbus_signal(name="NewStatus")
    def new_status(self, status: str) -> DBusStr:
        return status


class MenuService(ServiceInterface):
    """com.canonical.dbusmenu (version 3): one flat menu below the root item 0."""

    def __init__(self, tray: Shows) -> None:
        super().__init__(MENU_INTERFACE)
        self._tray = tray

    @dbus_property(access=PropertyAccess.READ, name="Version")
    def _version(self) -> DBusUInt32:
        return 3

    @dbus_property(access=PropertyAccess.READ, name="TextDirection")
    def _text_direction(self) -> DBusStr:
        return "ltr"

    @dbus_property(access=PropertyAccess.READ, name="Status")
    def _status(self) -> DBusStr:
        return "notice" if self._tray.item_status == "NeedsAttention" else "normal"

    @dbus_property(access=PropertyAccess.READ, name="IconThemePath")
    def _icon_theme_path(self) -> Annotated[list[str], DBusSignature("as")]:
        return []

    @dbus_method(name="GetLayout")
    def _get_layout(
        self, parent_id: DBusInt32, recursion_depth: DBusInt32, property_names: Annotated[list[str], DBusSignature("as")]
    ) -> _Layout:
        items = self._tray.items
        names = set(property_names)

        def pick(values: dict[str, Variant]) -> dict[str, Variant]:
            return {key: value for key, value in values.items() if not names or key in names}

        if parent_id == 0:
            children = (
                [Variant("(ia{sv}av)", [item.id, pick(item.properties()), []]) for item in items]
                if recursion_depth != 0
                else []
            )
            return self._tray.revision, [0, pick(self._root_properties()), children]
        item = self._find(parent_id)
        return self._tray.revision, [item.id, pick(item.properties()), []]

    @dbus_method(name="GetGroupProperties")
    def _get_group_properties(
        self, ids: Annotated[list[int], DBusSignature("ai")], property_names: Annotated[list[str], DBusSignature("as")]
    ) -> _Group:
        # The dbusmenu spec: an empty list asks for every item, the root (0)
        # included; a host (libdbusmenu-glib) asks for the root's properties too.
        names = set(property_names)
        wanted = set(ids)
        every = [(0, self._root_properties())] + [(item.id, item.properties()) for item in self._tray.items]
        return [
            [ident, {key: value for key, value in values.items() if not names or key in names}]
            for ident, values in every
            if not wanted or ident in wanted
        ]

    @staticmethod
    def _root_properties() -> dict[str, Variant]:
        """The root item 0: the menu itself, whose children show as a submenu."""
        return {"children-display": Variant("s", "submenu")}

    @dbus_method(name="GetProperty")
    def _get_property(self, ident: DBusInt32, name: DBusStr) -> DBusVariant:
        values = self._root_properties() if ident == 0 else self._find(ident).properties()
        if name not in values:
            raise DBusError(ErrorType.INVALID_ARGS, f"menu item {ident} has no property {name!r}")
        return values[name]

    @dbus_method(name="Event")
    def _event(self, ident: DBusInt32, event_id: DBusStr, data: DBusVariant, timestamp: DBusUInt32) -> _Nothing:
        self._find(ident)
        self._tray.menu_event(ident, event_id)

    @dbus_method(name="EventGroup")
    def _event_group(self, events: Annotated[list[Any], DBusSignature("a(isvu)")]) -> Annotated[list[int], DBusSignature("ai")]:
        known = {item.id for item in self._tray.items}
        errors = [int(event[0]) for event in events if int(event[0]) not in known]
        for event in events:
            if int(event[0]) in known:
                self._tray.menu_event(int(event[0]), str(event[1]))
        return errors

    @dbus_method(name="AboutToShow")
    async def _about_to_show(self, ident: DBusInt32) -> DBusBool:
        return await self._tray.about_to_show()

    @dbus_method(name="AboutToShowGroup")
    async def _about_to_show_group(
        self, ids: Annotated[list[int], DBusSignature("ai")]
    ) -> Annotated[tuple[list[int], list[int]], DBusSignature("aiai")]:
        known = {0} | {item.id for item in self._tray.items}
        changed = await self._tray.about_to_show()
        return ([0] if changed else []), [ident for ident in ids if ident not in known]

    @dbus_signal(name="ItemsPropertiesUpdated")
    def items_properties_updated(
        self, updated: list[Any], removed: list[Any]
    ) -> Annotated[tuple[list[Any], list[Any]], DBusSignature("a(ia{sv})a(ias)")]:
        return updated, removed

    @dbus_signal(name="LayoutUpdated")
    def layout_updated(self, revision: int, parent: int) -> Annotated[tuple[int, int], DBusSignature("ui")]:
        return revision, parent

    def _find(self, ident: int) -> Item:
        for item in self._tray.items:
            if item.id == ident:
                return item
        raise DBusError(ErrorType.INVALID_ARGS, f"no menu item {ident}")



__all__ = [
    "ITEM_ID",
    "ITEM_INTERFACE",
    "ITEM_PATH",
    "ItemService",
    "MENU_INTERFACE",
    "MENU_PATH",
    "MenuService",
    "Shows",
    "WATCHER_INTERFACE",
    "WATCHER_NAME",
    "WATCHER_PATH",
]
