"""Small stand-ins for the desktop's services, for tests on private buses (at the process boundary).

UPower and NetworkManager (system bus) and KDE's job progress service
(session bus) are not on this machine; each stand-in here speaks the part
of the real interface the agent uses, with dbus-fast, so the agent under
test talks to them over a real dbus-daemon exactly as it talks to the real
ones. They record what they are told and change their properties with a
real ``PropertiesChanged``.
"""

from __future__ import annotations

from typing import Annotated, Any

from dbus_fast import Message, MessageType, NameFlag, RequestNameReply, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusBool, DBusDouble, DBusObjectPath, DBusStr, DBusUInt32
from dbus_fast.annotations import DBusSignature
from dbus_fast.constants import PropertyAccess
from dbus_fast.service import ServiceInterface, dbus_method, dbus_property, dbus_signal


async def own(bus: MessageBus, name: str) -> None:
    reply = await bus.request_name(name, NameFlag.DO_NOT_QUEUE)
    if reply is not RequestNameReply.PRIMARY_OWNER:
        raise RuntimeError(f"{name} is taken on the test's bus")


# -- UPower -------------------------------------------------------------------------------


class UPower(ServiceInterface):
    def __init__(self, on_battery: bool) -> None:
        super().__init__("org.freedesktop.UPower")
        self.on_battery = on_battery

    @dbus_property(access=PropertyAccess.READ, name="OnBattery")
    def _on_battery(self) -> DBusBool:
        return self.on_battery

    def set_on_battery(self, value: bool) -> None:
        self.on_battery = value
        self.emit_properties_changed({"OnBattery": value})


class DisplayDevice(ServiceInterface):
    def __init__(self, percent: float) -> None:
        super().__init__("org.freedesktop.UPower.Device")
        self.percent = percent

    @dbus_property(access=PropertyAccess.READ, name="Percentage")
    def _percentage(self) -> DBusDouble:
        return self.percent

    def set_percent(self, value: float) -> None:
        self.percent = value
        self.emit_properties_changed({"Percentage": value})


async def serve_upower(address: str, *, on_battery: bool, percent: float) -> tuple[MessageBus, UPower, DisplayDevice]:
    bus = await MessageBus(bus_address=address).connect()
    power, display = UPower(on_battery), DisplayDevice(percent)
    bus.export("/org/freedesktop/UPower", power)
    bus.export("/org/freedesktop/UPower/devices/DisplayDevice", display)
    await own(bus, "org.freedesktop.UPower")
    return bus, power, display


# -- NetworkManager -----------------------------------------------------------------------


class NetworkManager(ServiceInterface):
    def __init__(self, metered: int, connectivity: int) -> None:
        super().__init__("org.freedesktop.NetworkManager")
        self.metered = metered
        self.connectivity = connectivity

    @dbus_property(access=PropertyAccess.READ, name="Metered")
    def _metered(self) -> DBusUInt32:
        return self.metered

    @dbus_property(access=PropertyAccess.READ, name="Connectivity")
    def _connectivity(self) -> DBusUInt32:
        return self.connectivity

    def set_metered(self, value: int) -> None:
        self.metered = value
        self.emit_properties_changed({"Metered": value})

    def set_connectivity(self, value: int) -> None:
        """NMConnectivityState: 1 none, 2 portal, 3 limited, 4 full."""
        self.connectivity = value
        self.emit_properties_changed({"Connectivity": value})


async def serve_networkmanager(address: str, *, metered: int, connectivity: int = 4) -> tuple[MessageBus, NetworkManager]:
    bus = await MessageBus(bus_address=address).connect()
    manager = NetworkManager(metered, connectivity)
    bus.export("/org/freedesktop/NetworkManager", manager)
    await own(bus, "org.freedesktop.NetworkManager")
    return bus, manager


# -- KDE's job progress service ----------------------------------------------------------------


class JobView(ServiceInterface):
    """One job (org.kde.JobViewV2): records every call, in order."""

    def __init__(self, server: "JobViewServer", path: str) -> None:
        super().__init__("org.kde.JobViewV2")
        self.server = server
        self.path = path
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def _add(self, member: str, *args: Any) -> None:
        self.calls.append((member, args))

    @dbus_method(name="setPercent")
    def _set_percent(self, percent: DBusUInt32):  # type: ignore[no-untyped-def]  # dbus-fast: no reply value
        self._add("setPercent", percent)

    @dbus_method(name="setSpeed")
    def _set_speed(self, speed: Annotated[int, DBusSignature("t")]):  # type: ignore[no-untyped-def]
        self._add("setSpeed", speed)

    @dbus_method(name="setProcessedAmount")
    def _set_processed(self, amount: Annotated[int, DBusSignature("t")], unit: DBusStr):  # type: ignore[no-untyped-def]
        self._add("setProcessedAmount", amount, unit)

    @dbus_method(name="setInfoMessage")
    def _set_info(self, message: DBusStr):  # type: ignore[no-untyped-def]
        self._add("setInfoMessage", message)

    @dbus_method(name="setDescriptionField")
    def _set_field(self, number: DBusUInt32, name: DBusStr, value: DBusStr) -> DBusBool:
        self._add("setDescriptionField", number, name, value)
        return True

    @dbus_method(name="terminate")
    def _terminate(self, message: DBusStr):  # type: ignore[no-untyped-def]
        self._add("terminate", message)

    @dbus_signal(name="cancelRequested")
    def cancel_requested(self) -> None:
        return None


class JobViewServer(ServiceInterface):
    """org.kde.JobViewServer at /JobViewServer: requestView gives a new JobView."""

    def __init__(self, bus: MessageBus) -> None:
        super().__init__("org.kde.JobViewServer")
        self.bus = bus
        self.requests: list[tuple[str, str, int]] = []
        self.views: list[JobView] = []

    @dbus_method(name="requestView")
    def _request_view(self, app_name: DBusStr, icon: DBusStr, capabilities: Annotated[int, DBusSignature("i")]) -> DBusObjectPath:
        self.requests.append((app_name, icon, capabilities))
        path = f"/JobViewServer/JobView_{len(self.views) + 1}"
        view = JobView(self, path)
        self.bus.export(path, view)
        self.views.append(view)
        return path


async def serve_jobviews(address: str) -> tuple[MessageBus, JobViewServer]:
    bus = await MessageBus(bus_address=address).connect()
    server = JobViewServer(bus)
    bus.export("/JobViewServer", server)
    await own(bus, "org.kde.JobViewServer")
    return bus, server


class JobViewV3(ServiceInterface):
    """One job of the newer form (org.kde.JobViewV3): every update's values, and how it ended."""

    def __init__(self) -> None:
        super().__init__("org.kde.JobViewV3")
        self.updates: list[dict[str, Any]] = []
        self.terminated: tuple[int, str, dict[str, Any]] | None = None

    @dbus_method(name="update")
    def _update(self, values: Annotated[dict[str, Variant], DBusSignature("a{sv}")]):  # type: ignore[no-untyped-def]
        self.updates.append({key: value.value for key, value in values.items()})

    @dbus_method(name="terminate")
    def _terminate(self, code: DBusUInt32, message: DBusStr,  # type: ignore[no-untyped-def]
                   hints: Annotated[dict[str, Variant], DBusSignature("a{sv}")]):
        self.terminated = (code, message, {key: value.value for key, value in hints.items()})

    @dbus_signal(name="cancelRequested")
    def cancel_requested(self) -> None:
        return None


class JobViewServerV2Only(ServiceInterface):
    """A server that offers only org.kde.JobViewServerV2 (requestView with a desktop entry and hints)."""

    def __init__(self, bus: MessageBus) -> None:
        super().__init__("org.kde.JobViewServerV2")
        self.bus = bus
        self.requests: list[tuple[str, int, dict[str, Any]]] = []
        self.views: list[JobViewV3] = []

    @dbus_method(name="requestView")
    def _request_view(self, entry: DBusStr, capabilities: Annotated[int, DBusSignature("i")],
                      hints: Annotated[dict[str, Variant], DBusSignature("a{sv}")]) -> DBusObjectPath:
        self.requests.append((entry, capabilities, {key: value.value for key, value in hints.items()}))
        path = f"/org/kde/notificationmanager/jobs/JobView_{len(self.views) + 1}"
        view = JobViewV3()
        self.bus.export(path, view)
        self.views.append(view)
        return path


async def serve_jobviews_v2_only(address: str) -> tuple[MessageBus, JobViewServerV2Only]:
    bus = await MessageBus(bus_address=address).connect()
    server = JobViewServerV2Only(bus)
    bus.export("/JobViewServer", server)
    await own(bus, "org.kde.JobViewServer")
    return bus, server


# -- a dock: what it hears of the launcher entry ------------------------------------------------------


async def listen_to_launcher(address: str) -> tuple[MessageBus, list[tuple[str, dict[str, Any]]]]:
    """A connection that hears every com.canonical.Unity.LauncherEntry.Update broadcast, as a dock does."""
    bus = await MessageBus(bus_address=address).connect()
    heard: list[tuple[str, dict[str, Any]]] = []

    def handle(message: Message) -> None:
        if message.message_type is MessageType.SIGNAL and message.interface == "com.canonical.Unity.LauncherEntry":
            uri, properties = message.body
            heard.append((uri, {key: value.value if isinstance(value, Variant) else value
                                for key, value in properties.items()}))

    bus.add_message_handler(handle)
    rule = "type='signal',interface='com.canonical.Unity.LauncherEntry',member='Update'"
    await bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                           interface="org.freedesktop.DBus", member="AddMatch", signature="s", body=[rule]))
    return bus, heard
