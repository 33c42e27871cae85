"""The Fluent Bit configurations we show operators (fluent-bit/conf/, README) are valid for the plugin."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from auditrelay.config import PROPERTY_BY_NAME, PipelineSettings
from auditrelay.fluentbit_conf import Section, parse_classic, parse_yaml, plugin_properties

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "fluent-bit" / "conf"
README = REPO_ROOT / "README.md"


def auditrelay_outputs(sections: list[Section]) -> list[dict[str, str]]:
    """The [OUTPUT] sections named auditrelay, keys as Fluent Bit reads them."""
    return [
        keys for name, keys in sections if name == "OUTPUT" and keys.get("name") == "auditrelay"
    ]


def readme_blocks(language: str) -> list[str]:
    """The README's fenced code blocks of one language."""
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.DOTALL)


def all_examples() -> list[tuple[str, dict[str, str]]]:
    """Every auditrelay output section we show, with where it is shown."""
    examples = [
        (f"conf/fluent-bit.conf #{i}", section)
        for i, section in enumerate(
            auditrelay_outputs(parse_classic((CONF_DIR / "fluent-bit.conf").read_text()))
        )
    ]
    examples += [
        (f"conf/fluent-bit.yaml #{i}", section)
        for i, section in enumerate(
            auditrelay_outputs(parse_yaml((CONF_DIR / "fluent-bit.yaml").read_text()))
        )
    ]
    for block in readme_blocks("ini"):
        examples += [
            ("README ini", section) for section in auditrelay_outputs(parse_classic(block))
        ]
    for block in readme_blocks("yaml"):
        examples += [("README yaml", section) for section in auditrelay_outputs(parse_yaml(block))]
    return examples


def test_every_format_is_shown() -> None:
    """The README and fluent-bit/conf/ each show the output in both the classic and YAML formats."""
    assert ["README ini", "README yaml", "conf/fluent-bit.conf #0", "conf/fluent-bit.yaml #0"] == (
        sorted(where for where, _ in all_examples())
    )


@pytest.mark.parametrize(("where", "section"), all_examples(), ids=lambda x: str(x)[:24])
def test_example_output_is_valid(where: str, section: dict[str, str]) -> None:
    """Every key is Fluent Bit's or a known property, the sidecar accepts the pipeline properties,
    and flushes run on workers with unlimited retries."""
    properties = plugin_properties(section)
    assert [] == sorted(set(properties) - set(PROPERTY_BY_NAME)), where
    PipelineSettings.from_properties(properties, "auditrelay.0")
    assert int(section["workers"]) >= 1, where
    assert "no_limits" == section["retry_limit"], where


def test_classic_and_yaml_examples_agree() -> None:
    """The classic and YAML example files configure the same output."""
    classic = auditrelay_outputs(parse_classic((CONF_DIR / "fluent-bit.conf").read_text()))
    in_yaml = auditrelay_outputs(parse_yaml((CONF_DIR / "fluent-bit.yaml").read_text()))
    assert classic == in_yaml


def test_plugin_files_are_not_taken_for_c_plugins() -> None:
    """The plugin is loaded as out_auditrelay.so: a file named flb-* would be taken for C."""
    plugins = parse_classic((CONF_DIR / "plugins.conf").read_text())
    in_yaml = yaml.safe_load((CONF_DIR / "fluent-bit.yaml").read_text())["plugins"]
    paths = [keys["path"] for name, keys in plugins if name == "PLUGINS"] + in_yaml
    assert ["out_auditrelay.so", "out_auditrelay.so"] == [Path(path).name for path in paths]


def test_shipped_configurations_serve_fluent_bits_api_on_loopback_only() -> None:
    """Fluent Bit's HTTP server (health, metrics, /api/v2/reload) is not open to the network in the
    shipped examples: both formats set HTTP_Listen to 127.0.0.1."""
    [(_, service)] = [
        section
        for section in parse_classic((CONF_DIR / "fluent-bit.conf").read_text())
        if section[0] == "SERVICE"
    ]
    in_yaml = yaml.safe_load((CONF_DIR / "fluent-bit.yaml").read_text())["service"]
    assert ("on", "127.0.0.1") == (service["http_server"].lower(), service["http_listen"])
    assert (True, "127.0.0.1") == (in_yaml["http_server"], in_yaml["http_listen"])


@pytest.mark.parametrize(("where", "section"), all_examples(), ids=lambda x: str(x)[:24])
def test_removing_only_endpoint_selects_the_emulator(where: str, section: dict[str, str]) -> None:
    """As README says: without endpoint the pipeline delivers to the bundled emulator, and the
    dcr_id left behind is accepted and named as ignored rather than refused."""
    properties = plugin_properties(section)
    del properties["endpoint"]
    settings = PipelineSettings.from_properties(properties, "auditrelay.0")
    assert settings.uses_emulator, where
    assert ["dcr_id"] == settings.ignored_by_emulator, where
