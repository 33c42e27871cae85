"""out_auditrelay.so registering with Fluent Bit's Go proxy, across Fluent Bit versions."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from auditrelay.config import PROPERTIES
from auditrelay.devtools.flbproxy import (
    FLB_CONFIG_MAP_STR,
    FLB_PROXY_GOLANG,
    FLB_PROXY_OUTPUT_PLUGIN,
    FLUENT_BIT_4_2_2,
    FLUENT_BIT_4_2_8,
    FLUENT_BIT_5_1_1,
    FluentBitVersion,
    GoProxy,
    InitError,
)

ProxyFactory = Callable[[FluentBitVersion], GoProxy]


@pytest.fixture
def proxy_for(plugin_path: Path) -> Iterator[ProxyFactory]:
    """Makes a GoProxy for a Fluent Bit version; every one is shut down after the test."""
    made: list[GoProxy] = []

    def make(version: FluentBitVersion) -> GoProxy:
        proxy = GoProxy(plugin_path, version)
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        if proxy.registration is not None:
            proxy.shutdown()


def test_registers_as_a_go_output_named_auditrelay(proxy_for: ProxyFactory) -> None:
    """Fluent Bit finds an output plugin of the Go proxy, named auditrelay (the [OUTPUT] Name)."""
    registration = proxy_for(FLUENT_BIT_5_1_1).register()
    assert (FLB_PROXY_OUTPUT_PLUGIN, FLB_PROXY_GOLANG, 0) == (
        registration.type,
        registration.proxy,
        registration.flags,
    )
    assert "auditrelay" == registration.name
    assert "" != registration.description


def test_declares_every_property_in_the_config_map_on_5_1_1(proxy_for: ProxyFactory) -> None:
    """On Fluent Bit 5.1.1+ the config map lists exactly config.PROPERTIES, as plain strings."""
    registration = proxy_for(FLUENT_BIT_5_1_1).register()
    assert registration.config_map is not None
    expected = [(p.name, p.default, p.description) for p in PROPERTIES]
    actual = [(item.name, item.default, item.description) for item in registration.config_map]
    assert expected == actual
    assert {(FLB_CONFIG_MAP_STR, 0, 0)} == {
        (item.type, item.flags, item.set_property) for item in registration.config_map
    }


@pytest.mark.parametrize("version", [FLUENT_BIT_4_2_8, FLUENT_BIT_4_2_2], ids=lambda v: v.name)
def test_writes_nothing_past_the_definition_of_older_versions(
    proxy_for: ProxyFactory, version: FluentBitVersion
) -> None:
    """Before 5.1.1 the definition is 40 or 32 bytes: the plugin writes only the fields every
    version has (type, proxy, flags, name, description), never event_type or config_map."""
    proxy = proxy_for(version)
    registration = proxy.register()
    assert registration.config_map is None
    assert bytes(version.def_size - 32) == proxy.definition_bytes()[32:]


def test_fluent_bit_5_1_1_rejects_a_misspelled_key(proxy_for: ProxyFactory) -> None:
    """With the config map declared, Fluent Bit itself refuses an unknown key before init."""
    proxy = proxy_for(FLUENT_BIT_5_1_1)
    proxy.register()
    with pytest.raises(InitError) as raised:
        proxy.init({"sidecar_adress": "unix:///run/auditrelay/relay.sock"})
    assert "[config] auditrelay: unknown configuration property 'sidecar_adress'" == str(
        raised.value
    )


def test_register_again_after_unregister_is_a_hot_reload(proxy_for: ProxyFactory) -> None:
    """A hot reload registers the plugin again in the same process: same name, same map."""
    proxy = proxy_for(FLUENT_BIT_5_1_1)
    first = proxy.register()
    proxy.unregister()
    second = proxy.register(hot_reloading=True)
    assert first == second
