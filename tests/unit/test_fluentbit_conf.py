"""Reading Fluent Bit configurations (classic and YAML): what replay takes its properties from
and what the tests of the shipped and rendered configurations read."""

from __future__ import annotations

from pathlib import Path

import pytest
from auditrelay.errors import ConfigError
from auditrelay.fluentbit_conf import (
    output_sections,
    parse_classic,
    parse_yaml,
    read_sections,
    select_output,
)


def test_classic_config_with_include_and_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """@INCLUDE files are followed, ${VAR} comes from @SET or the environment, keys are matched
    case-insensitively, and Fluent Bit's own keys are not pipeline properties."""
    monkeypatch.setenv("AUDIT_SECRET", "from-env")
    (tmp_path / "outputs.conf").write_text(
        "[OUTPUT]\n    Name  auditrelay\n    Alias audit\n    Match kube.*\n"
        "    Workers 1\n    tls.verify on\n    net.keepalive off\n"
        "    Stream  Custom-${table}\n    client_secret ${AUDIT_SECRET}\n"
    )
    config = tmp_path / "fluent-bit.conf"
    config.write_text(
        "@SET table=Audit_CL\n# comment\n[SERVICE]\n    Flush 1\n@INCLUDE outputs.conf\n"
    )

    [section] = output_sections(config)

    assert ("auditrelay.0", "audit") == (section.instance_name, section.alias)
    assert {"stream": "Custom-Audit_CL", "client_secret": "from-env"} == section.properties()


def test_yaml_config_with_env(tmp_path: Path) -> None:
    """The YAML form: pipeline.outputs entries, env: variables, booleans as on/off."""
    config = tmp_path / "fluent-bit.yaml"
    config.write_text(
        "env:\n  cluster: prod\n"
        "pipeline:\n  outputs:\n    - name: stdout\n      match: '*'\n"
        "    - name: auditrelay\n      match: kube.*\n      cluster_name: ${cluster}\n"
        "      spool_sync: interval\n      storage.total_limit_size: 2G\n"
    )
    [section] = output_sections(config)
    assert {"cluster_name": "prod", "spool_sync": "interval"} == section.properties()


def test_two_auditrelay_outputs_need_a_choice(tmp_path: Path) -> None:
    """Two auditrelay outputs: the file alone is ambiguous; the flag picks one by Alias or by
    instance name, and a name that is none of them is refused, naming the ones there are."""
    config = tmp_path / "fluent-bit.yaml"
    config.write_text(
        "pipeline:\n  outputs:\n"
        "    - name: auditrelay\n      alias: east\n      stream: Custom-East_CL\n"
        "    - name: auditrelay\n      alias: west\n      stream: Custom-West_CL\n"
    )
    with pytest.raises(ConfigError) as ambiguous:
        select_output(config, None, "--fluent-bit-output")
    with pytest.raises(ConfigError) as unknown:
        select_output(config, "north", "--fluent-bit-output")

    assert "or --fluent-bit-output (found 2: east, west)" in str(ambiguous.value)
    assert (
        "--fluent-bit-output: got 'north', expected one of the auditrelay outputs: east, west"
        in (str(unknown.value))
    )
    assert {"alias": "west", "name": "auditrelay", "stream": "Custom-West_CL"} == (
        select_output(config, "west", "--fluent-bit-output").keys
    )
    assert {"stream": "Custom-West_CL"} == (
        select_output(config, "auditrelay.1", "--fluent-bit-output").properties()
    )


def test_text_is_read_as_written() -> None:
    """Text without a file (a rendered ConfigMap, a README block) keeps ${VAR} as written and
    every section in order, names upper-cased, keys lower-cased, tabs as separators."""
    text = "[SERVICE]\n    Flush 1\n[OUTPUT]\n\tName\tauditrelay\n    client_secret ${SECRET}\n"

    assert [
        ("SERVICE", {"flush": "1"}),
        ("OUTPUT", {"name": "auditrelay", "client_secret": "${SECRET}"}),
    ] == (parse_classic(text))


def test_yaml_sections_in_order() -> None:
    """service, then inputs, filters and outputs, each an upper-cased section as in classic."""
    text = (
        "service:\n  http_server: on\n"
        "pipeline:\n  inputs:\n    - name: tail\n  outputs:\n    - name: auditrelay\n"
        "  filters:\n    - name: grep\n"
    )
    assert ["SERVICE", "INPUT", "FILTER", "OUTPUT"] == [name for name, _ in parse_yaml(text)]
    assert {"http_server": "on"} == parse_yaml(text)[0][1]


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("fluent-bit.conf", "Flush 1\n", "a [SECTION] before line 1, got 'Flush 1'"),
        ("fluent-bit.conf", "[OUTPUT\n", "a [SECTION] header on line 1, got '[OUTPUT'"),
        ("fluent-bit.conf", "@INCLUDE missing.conf\n", "a readable Fluent Bit configuration"),
        ("fluent-bit.yaml", "- a list\n", "a YAML mapping with pipeline: outputs:"),
        ("fluent-bit.yaml", "pipeline: [\n", "a YAML Fluent Bit configuration"),
    ],
    ids=["key-outside-a-section", "unclosed-header", "missing-include", "yaml-list", "bad-yaml"],
)
def test_bad_files_name_the_file_and_what_was_expected(
    tmp_path: Path, name: str, text: str, expected: str
) -> None:
    """A file Fluent Bit could not read either is refused with the file and what was expected."""
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as raised:
        read_sections(path)
    assert "--config: got '" in str(raised.value)
    assert expected in str(raised.value)
