"""Fluent Bit's Go output proxy, in ctypes: loads a plugin .so and drives it the way Fluent Bit does.

Used by ``auditrelay demo``, the plugin tests and the benchmarks to run out_auditrelay.so
without a Fluent Bit binary.

What Fluent Bit does (fluent/fluent-bit ``src/flb_plugin_proxy.c``, ``src/proxy/go/go.c``,
``src/flb_output.c``), and this module after it:

1. ``dlopen`` the .so; allocate the plugin definition with the C allocator: 48 zeroed bytes
   since v5.1.1 (``config_map`` at offset 40), 40 in v4.2.3-v5.1.0 (``event_type`` at 32),
   32 bytes from plain ``malloc`` up to v4.2.2;
2. ``FLBPluginPreRegister(hot_reloading)`` if exported, then ``FLBPluginRegister(def)``; the
   plugin must set ``type`` 2 (output) and ``proxy`` 11 (Go);
3. build ``struct flb_api`` (``output_get_property`` at offset 0, ``log_print`` at 32,
   ``output_log_check`` at 48) and one ``struct flbgo_output_plugin`` (72 bytes) for the .so;
4. per ``[OUTPUT]`` instance: a zeroed 16-byte ``flb_plugin_proxy_context``; on v5.1.1+ with a
   declared config map, reject unknown properties the way ``flb_config_map_properties_check``
   does; point the shared plugin struct at this instance and call ``FLBPluginInit`` (> 0 is
   success), then ``FLBPluginOutputPreRun`` if exported;
5. per flush: ``FLBPluginFlushCtx(remote_context, data, size, tag)`` with the tag copied into a
   fresh NUL-terminated buffer; 1 is OK, 2 RETRY, anything else ERROR;
6. per instance at exit: ``FLBPluginOutputPreExit(shutdown_by_hot_reloading)`` if exported,
   then ``FLBPluginExitCtx(remote_context)``; once per plugin: ``FLBPluginUnregister(def)``.

Not reproduced: calls from libco coroutine stacks and from Fluent Bit's engine thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import enum
import itertools
import subprocess
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

FLB_PROXY_OUTPUT_PLUGIN: Final = 2
FLB_PROXY_GOLANG: Final = 11
FLB_CONFIG_MAP_STR: Final = 0


class Level(enum.IntEnum):
    """Fluent Bit's log levels (flb_log.h)."""

    OFF = 0
    ERROR = 1
    WARN = 2
    INFO = 3
    DEBUG = 4
    TRACE = 5


class Result(enum.IntEnum):
    """What Fluent Bit makes of a flush's return value."""

    ERROR = 0
    OK = 1
    RETRY = 2


@dataclass(frozen=True)
class FluentBitVersion:
    """A Fluent Bit release line, by the layout of its plugin definition."""

    name: str
    def_size: int
    zeroed: bool = True  # calloc since v4.2.3, malloc before

    @property
    def has_config_map(self) -> bool:
        """Whether this Fluent Bit reads def->config_map (v5.1.1+)."""
        return self.def_size >= 48


FLUENT_BIT_5_1_1: Final = FluentBitVersion("5.1.1", 48)
FLUENT_BIT_4_2_8: Final = FluentBitVersion("4.2.8", 40)
FLUENT_BIT_4_2_2: Final = FluentBitVersion("4.2.2", 32, zeroed=False)


# --- the C structures (LP64) ------------------------------------------------------------------


class ProxyDef(ctypes.Structure):
    """struct flb_plugin_proxy_def of v5.1.1; fields past the allocated size are never read."""

    _fields_ = (
        ("type", ctypes.c_int),
        ("proxy", ctypes.c_int),
        ("flags", ctypes.c_int),
        ("name", ctypes.c_char_p),
        ("description", ctypes.c_char_p),
        ("event_type", ctypes.c_int),
        ("config_map", ctypes.c_void_p),
    )


class ConfigMapEntry(ctypes.Structure):
    """struct flb_config_map: the head plugins fill, then Fluent Bit's value and list link."""

    _fields_ = (
        ("type", ctypes.c_int),
        ("name", ctypes.c_char_p),
        ("def_value", ctypes.c_char_p),
        ("flags", ctypes.c_int),
        ("set_property", ctypes.c_int),
        ("offset", ctypes.c_size_t),
        ("desc", ctypes.c_char_p),
        ("value", ctypes.c_ubyte * 40),
        ("head", ctypes.c_ubyte * 16),
    )


GET_PROPERTY = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p)
# log_print is variadic in C; the plugin calls it as log_print(level, NULL, 0, "%s", line),
# which on LP64 passes its arguments exactly like this fixed signature.
LOG_PRINT = ctypes.CFUNCTYPE(
    None, ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p
)
LOG_CHECK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int)


class FlbApi(ctypes.Structure):
    """struct flb_api (v4.0.3+): nine function pointers."""

    _fields_ = (
        ("output_get_property", GET_PROPERTY),
        ("input_get_property", ctypes.c_void_p),
        ("output_get_cmt_instance", ctypes.c_void_p),
        ("input_get_cmt_instance", ctypes.c_void_p),
        ("log_print", LOG_PRINT),
        ("input_log_check", ctypes.c_void_p),
        ("output_log_check", LOG_CHECK),
        ("custom_get_property", ctypes.c_void_p),
        ("custom_log_check", ctypes.c_void_p),
    )


class ProxyContext(ctypes.Structure):
    """struct flb_plugin_proxy_context: the plugin writes remote_context in its init."""

    _fields_ = (("remote_context", ctypes.c_void_p), ("proxy", ctypes.c_void_p))


class GoOutputPlugin(ctypes.Structure):
    """struct flbgo_output_plugin (src/proxy/go/go.h): one per .so, shared by its instances."""

    _fields_ = (
        ("name", ctypes.c_char_p),
        ("api", ctypes.POINTER(FlbApi)),
        ("o_ins", ctypes.c_void_p),
        ("context", ctypes.POINTER(ProxyContext)),
        ("cb_init", ctypes.c_void_p),
        ("cb_flush", ctypes.c_void_p),
        ("cb_flush_ctx", ctypes.c_void_p),
        ("cb_exit", ctypes.c_void_p),
        ("cb_exit_ctx", ctypes.c_void_p),
    )


assert ctypes.sizeof(ProxyDef) == 48
assert ctypes.sizeof(ConfigMapEntry) == 104
assert ctypes.sizeof(FlbApi) == 72
assert ctypes.sizeof(ProxyContext) == 16
assert ctypes.sizeof(GoOutputPlugin) == 72

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.calloc.restype = ctypes.c_void_p
_libc.calloc.argtypes = (ctypes.c_size_t, ctypes.c_size_t)
_libc.malloc.restype = ctypes.c_void_p
_libc.malloc.argtypes = (ctypes.c_size_t,)
_libc.memset.restype = ctypes.c_void_p
_libc.memset.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t)
_libc.free.restype = None
_libc.free.argtypes = (ctypes.c_void_p,)


# --- errors and records -----------------------------------------------------------------------


class RegistrationError(AssertionError):
    """The plugin's registration is not what Fluent Bit accepts."""


class InitError(RuntimeError):
    """FLBPluginInit failed, or Fluent Bit refused the properties before calling it."""

    def __init__(self, message: str, log: list[LogLine]) -> None:
        super().__init__(message)
        self.log = log


@dataclass(frozen=True)
class LogLine:
    """One line the plugin printed through log_print."""

    level: Level
    text: str


@dataclass(frozen=True)
class ConfigMapItem:
    """One entry of the config map the plugin declared."""

    name: str
    default: str | None
    description: str
    type: int
    flags: int
    set_property: int


@dataclass
class Registration:
    """What FLBPluginRegister wrote into the definition."""

    name: str
    description: str
    type: int
    proxy: int
    flags: int
    config_map: list[ConfigMapItem] | None


@dataclass
class Instance:
    """One [OUTPUT] instance of the plugin."""

    number: int
    properties: dict[str, str]
    log_level: Level
    context: ProxyContext = field(default_factory=ProxyContext)

    @property
    def o_ins(self) -> int:
        """The token the plugin passes back as the instance (Fluent Bit's flb_output_instance*)."""
        return 0x1000 + self.number

    @property
    def remote_context(self) -> int:
        """The handle the plugin stored in its init."""
        return self.context.remote_context or 0


# --- the proxy --------------------------------------------------------------------------------


class GoProxy:
    """One Go output plugin .so loaded into this process, driven like Fluent Bit's Go proxy.

    A Go runtime cannot be unloaded: loading the same .so again returns the same library with
    its Go state, exactly as after a Fluent Bit hot reload.
    """

    def __init__(self, library: Path, version: FluentBitVersion = FLUENT_BIT_5_1_1) -> None:
        self.version = version
        self.lib = ctypes.CDLL(str(library))
        self._declare_symbols()
        self.log: list[LogLine] = []
        self._log_lock = threading.Lock()
        self._instances: dict[int, Instance] = {}
        self._numbers = itertools.count()
        self._values: dict[tuple[int, str], ctypes.Array[ctypes.c_char]] = {}
        self._def: int | None = None
        self.registration: Registration | None = None
        # Callbacks and structures must stay alive while the plugin may call them.
        self._api = FlbApi(
            output_get_property=GET_PROPERTY(self._get_property),
            log_print=LOG_PRINT(self._log_print),
            output_log_check=LOG_CHECK(self._log_check),
        )
        self._plugin = GoOutputPlugin()

    def _symbol(self, name: str) -> Any:
        try:
            function: Any = getattr(self.lib, name)
        except AttributeError:
            return None
        return function

    def _declare_symbols(self) -> None:
        signatures: dict[str, tuple[type | None, tuple[type, ...]]] = {
            "FLBPluginPreRegister": (ctypes.c_int, (ctypes.c_int,)),
            "FLBPluginRegister": (ctypes.c_int, (ctypes.c_void_p,)),
            "FLBPluginInit": (ctypes.c_int, (ctypes.c_void_p,)),
            "FLBPluginOutputPreRun": (ctypes.c_int, (ctypes.c_int,)),
            "FLBPluginFlushCtx": (
                ctypes.c_int,
                (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p),
            ),
            "FLBPluginOutputPreExit": (None, (ctypes.c_int,)),
            "FLBPluginExitCtx": (ctypes.c_int, (ctypes.c_void_p,)),
            "FLBPluginUnregister": (None, (ctypes.c_void_p,)),
        }
        for name, (restype, argtypes) in signatures.items():
            function = self._symbol(name)
            if function is not None:
                function.restype = restype
                function.argtypes = argtypes
        for required in ("FLBPluginRegister", "FLBPluginInit"):
            if self._symbol(required) is None:
                raise RegistrationError(f"{required} is not exported")

    # -- callbacks the plugin makes --

    def _get_property(self, key: bytes | None, o_ins: int | None) -> int | None:
        instance = self._instances.get(o_ins or 0)
        if instance is None or key is None:
            return None
        wanted = key.decode().lower()  # flb_kv lookups are case-insensitive
        for name, value in instance.properties.items():
            if name.lower() == wanted:
                buffer = self._values.setdefault(
                    (instance.number, name), ctypes.create_string_buffer(value.encode())
                )
                return ctypes.addressof(buffer)
        return None

    def _log_print(
        self, level: int, file: bytes | None, line: int, fmt: bytes | None, text: bytes | None
    ) -> None:
        if fmt != b"%s" or file is not None:
            raise AssertionError(f"log_print called with format {fmt!r}; plugins must pass %s")
        with self._log_lock:
            self.log.append(LogLine(Level(level), (text or b"").decode()))

    def _log_check(self, o_ins: int | None, level: int) -> int:
        instance = self._instances.get(o_ins or 0)
        return 1 if instance is not None and level <= instance.log_level else 0

    # -- registration --

    def register(self, *, hot_reloading: bool = False) -> Registration:
        """Allocates the definition like this Fluent Bit version and registers the plugin."""
        if self.version.zeroed:
            address = _libc.calloc(1, self.version.def_size)
        else:
            address = _libc.malloc(self.version.def_size)
            _libc.memset(address, 0xA5, self.version.def_size)  # what malloc may hand back
        if not address:
            raise MemoryError("calloc of the plugin definition failed")
        self._def = address
        definition = ProxyDef.from_address(address)
        definition.type = 0
        pre_register = self._symbol("FLBPluginPreRegister")
        if pre_register is not None and pre_register(int(hot_reloading)) == -1:
            raise RegistrationError("FLBPluginPreRegister refused the registration")
        if self.lib.FLBPluginRegister(address) == -1:
            raise RegistrationError("FLBPluginRegister returned -1")
        if definition.type != FLB_PROXY_OUTPUT_PLUGIN or definition.proxy != FLB_PROXY_GOLANG:
            raise RegistrationError(
                f"definition type={definition.type} proxy={definition.proxy}, want 2 and 11"
            )
        if not definition.name:
            raise RegistrationError("the definition has no name")
        config_map = None
        if self.version.has_config_map and definition.config_map:
            config_map = _read_config_map(definition.config_map)
        self.registration = Registration(
            name=definition.name.decode(),
            description=(definition.description or b"").decode(),
            type=definition.type,
            proxy=definition.proxy,
            flags=definition.flags,
            config_map=config_map,
        )
        self._plugin = GoOutputPlugin(
            name=definition.name,
            cb_init=ctypes.cast(self.lib.FLBPluginInit, ctypes.c_void_p),
            cb_flush_ctx=_address_or_none(self._symbol("FLBPluginFlushCtx")),
            cb_exit_ctx=_address_or_none(self._symbol("FLBPluginExitCtx")),
        )
        return self.registration

    def definition_bytes(self) -> bytes:
        """The bytes of the definition as allocated (only the allocated size is read)."""
        if self._def is None:
            raise RegistrationError("not registered")
        return ctypes.string_at(self._def, self.version.def_size)

    # -- instances --

    def init(self, properties: Mapping[str, str], *, log_level: Level = Level.INFO) -> Instance:
        """Creates one [OUTPUT] instance with these (non-core) properties and initialises it."""
        if self.registration is None:
            raise RegistrationError("init before register")
        instance = Instance(next(self._numbers), dict(properties), log_level)
        self._instances[instance.o_ins] = instance
        first_log_line = len(self.log)
        if self.registration.config_map is not None:
            self._check_properties(instance)
        self._plugin.api = ctypes.pointer(self._api)
        self._plugin.o_ins = instance.o_ins
        self._plugin.context = ctypes.pointer(instance.context)
        result = self.lib.FLBPluginInit(ctypes.addressof(self._plugin))
        if result <= 0:
            del self._instances[instance.o_ins]
            raise InitError(
                f"FLBPluginInit returned {result}: plugin '{self.registration.name}' "
                "failed to initialize",
                self.log[first_log_line:],
            )
        pre_run = self._symbol("FLBPluginOutputPreRun")
        if pre_run is not None:
            pre_run(0)
        return instance

    def _check_properties(self, instance: Instance) -> None:
        """flb_config_map_properties_check: every property must be in the declared map."""
        assert self.registration is not None
        assert self.registration.config_map is not None
        known = {item.name.lower() for item in self.registration.config_map}
        for name in instance.properties:
            if name.lower() not in known:
                del self._instances[instance.o_ins]
                raise InitError(
                    f"[config] {self.registration.name}: unknown configuration property '{name}'",
                    [],
                )

    def flush(self, instance: Instance, data: bytes, tag: str) -> Result:
        """One flush of a chunk: data and a freshly copied NUL-terminated tag."""
        flush_ctx = self._symbol("FLBPluginFlushCtx")
        if flush_ctx is None:
            raise RegistrationError("FLBPluginFlushCtx is not exported")
        buffer = ctypes.create_string_buffer(data, len(data))
        tag_buffer = ctypes.create_string_buffer(tag.encode())
        result = flush_ctx(instance.remote_context, buffer, len(data), tag_buffer)
        return Result(result) if result in (0, 1, 2) else Result.ERROR

    def exit(self, instance: Instance, *, hot_reload: bool = False) -> int:
        """flb_proxy_output_cb_exit for one instance."""
        pre_exit = self._symbol("FLBPluginOutputPreExit")
        if pre_exit is not None:
            pre_exit(int(hot_reload))
        exit_ctx = self._symbol("FLBPluginExitCtx")
        result = 0
        if exit_ctx is not None:
            result = exit_ctx(instance.remote_context)
        del self._instances[instance.o_ins]
        return int(result)

    def unregister(self) -> None:
        """flb_proxy_output_cb_destroy: FLBPluginUnregister, then the definition is freed."""
        unregister = self._symbol("FLBPluginUnregister")
        if unregister is not None and self._def is not None:
            unregister(self._def)
        if self._def is not None:
            _libc.free(self._def)
        self._def = None
        self.registration = None

    def shutdown(self) -> None:
        """Fluent Bit stopping: every remaining instance exits, then the plugin is destroyed."""
        for instance in list(self._instances.values()):
            self.exit(instance)
        self.unregister()

    def lines(self, level: Level | None = None) -> list[str]:
        """The logged lines, optionally of one level only."""
        with self._log_lock:
            return [line.text for line in self.log if level is None or line.level == level]


def _address_or_none(function: Any) -> int | None:
    if function is None:
        return None
    return ctypes.cast(function, ctypes.c_void_p).value


def _read_config_map(address: int) -> list[ConfigMapItem]:
    """Walks a NULL-name-terminated array of struct flb_config_map, as flb_config_map_create does."""
    items: list[ConfigMapItem] = []
    for index in itertools.count():
        entry = ConfigMapEntry.from_address(address + index * ctypes.sizeof(ConfigMapEntry))
        if not entry.name:
            return items
        items.append(
            ConfigMapItem(
                name=entry.name.decode(),
                default=entry.def_value.decode() if entry.def_value else None,
                description=(entry.desc or b"").decode(),
                type=entry.type,
                flags=entry.flags,
                set_property=entry.set_property,
            )
        )
    raise AssertionError("unreachable")


# --- the plugin of this checkout ---------------------------------------------------------------

REPO_ROOT: Final = Path(__file__).resolve().parents[3]
PLUGIN_PATH: Final = REPO_ROOT / "fluent-bit" / "out_auditrelay.so"


def build_plugin() -> Path:
    """Builds out_auditrelay.so with `make plugin` (a no-op when it is up to date)."""
    subprocess.run(["make", "--silent", "plugin"], cwd=REPO_ROOT, check=True)
    return PLUGIN_PATH
