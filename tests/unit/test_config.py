"""Configuration errors name the setting, the value and what was expected; flags beat env vars."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from auditrelay.cli import build_parser
from auditrelay.cli.serve import settings_from
from auditrelay.config import PROPERTIES, LogFormat, Owner, PipelineSettings, ServerSettings
from auditrelay.errors import ConfigError


def problems_of(properties: dict[str, str]) -> list[tuple[str, str, str]]:
    with pytest.raises(ConfigError) as caught:
        PipelineSettings.from_properties(properties)
    return [(p.property, p.value, p.expected) for p in caught.value.problems]


class TestPipelineProperties:
    """The bad-input cases of a Configure request."""

    @pytest.mark.parametrize(
        ("name", "value", "expected"),
        [
            ("compression_level", "12", "an integer from 1 to 9"),
            ("batch_interval", "soon", "a duration such as 500ms, 5s, 2m or 1h"),
            ("spool_limit", "lots", "a size such as 512k, 64M or 2G"),
            ("stream", "KubeAudit", "a custom stream name"),
            ("auth", "kerberos", "one of: workload_identity, managed_identity"),
            ("max_request_raw_bytes", "1k", "a size from 64K to 32M, such as 1M"),
            ("max_request_raw_bytes", "1G", "a size from 64K to 32M, such as 1M"),
            ("max_request_raw_bytes", "big", "a size from 64K to 32M, such as 1M"),
        ],
    )
    def test_wrong_value_names_property_value_and_expectation(
        self, name: str, value: str, expected: str
    ) -> None:
        """A property with a wrong value: the error says which, what was given, what is allowed."""
        ((prop, given, wanted),) = problems_of({name: value})

        assert (name, value) == (prop, given)
        assert wanted.startswith(expected)

    def test_required_property_missing_is_named(self) -> None:
        """endpoint without dcr_id: dcr_id is named as missing, with why it is required."""
        assert [("dcr_id", "", "a value when endpoint is set")] == problems_of(
            {"endpoint": "https://dce.westeurope-1.ingest.monitor.azure.com"}
        )

    def test_endpoint_alone_selects_the_emulator(self) -> None:
        """dcr_id and identity properties without endpoint: the emulator, with them named as
        ignored; with endpoint they are used and nothing is ignored."""
        dcr_id = "dcr-" + "0" * 32
        local = PipelineSettings.from_properties(
            {"dcr_id": dcr_id, "auth": "client_secret", "tenant_id": "t", "client_id": "c"}
        )
        azure = PipelineSettings.from_properties(
            {"dcr_id": dcr_id, "endpoint": "https://dce.westeurope-1.ingest.monitor.azure.com"}
        )

        assert (True, ["dcr_id", "tenant_id", "client_id"]) == (
            local.uses_emulator,
            local.ignored_by_emulator,
        )
        assert (False, []) == (azure.uses_emulator, azure.ignored_by_emulator)

    def test_every_problem_is_reported_at_once(self) -> None:
        """Several mistakes come back together, not one per attempt."""
        names = [name for name, _, _ in problems_of({"compression_level": "0", "cloud": "mars"})]

        assert ["cloud", "compression_level"] == sorted(names)

    def test_secret_value_is_not_in_the_error(self) -> None:
        """A rejected secret is named but its value is never repeated."""
        ((prop, value, _),) = problems_of({"client_secret": "   "})

        assert ("client_secret", "") == (prop, value)

    def test_unknown_property_is_named(self) -> None:
        """A misspelled key is reported as unknown."""
        ((prop, _, expected),) = problems_of({"compresion_level": "3"})

        assert "compresion_level" == prop
        assert expected.startswith("a known property")

    def test_the_uncompressed_bound_defaults_to_todays_and_takes_sizes(self) -> None:
        """max_request_raw_bytes: 32 MiB unless set (bodies bounded by wire size alone in
        practice); 1M is the 1,048,576 bytes of the service's limit."""
        default = PipelineSettings.from_properties({})
        capped = PipelineSettings.from_properties({"max_request_raw_bytes": "1M"})

        assert (32 << 20, 1_048_576) == (
            default.max_request_raw_bytes,
            capped.max_request_raw_bytes,
        )

    def test_plugin_properties_are_left_to_the_plugin(self) -> None:
        """The plugin's own file paths live in Fluent Bit's container; the sidecar does not check them."""
        settings = PipelineSettings.from_properties({"sidecar_tls_ca": "/nonexistent/ca.pem"})

        assert "Custom-KubeAudit_CL" == settings.stream

    def test_each_pipeline_property_is_a_settings_field(self) -> None:
        """A property declared in PROPERTIES reaches the pipeline under its own name; the only
        other fields are the instance and what the cloud implies."""
        declared = {prop.name for prop in PROPERTIES if prop.owner is Owner.PIPELINE}
        fields = {field.name for field in dataclasses.fields(PipelineSettings)}

        assert {"instance_name", "audience"} == fields - declared
        assert set() == declared - fields


def serve_args(*argv: str) -> ServerSettings:
    return settings_from(build_parser().parse_args(["serve", *argv]), {})


class TestServerSettings:
    """`auditrelay serve` flags and AUDITRELAY_* variables, derived from ServerSettings."""

    def test_every_field_has_a_flag(self) -> None:
        """Each ServerSettings field is settable by a flag of the same name."""
        parser = build_parser()

        for field in dataclasses.fields(ServerSettings):
            args = parser.parse_args(["serve", "--" + field.name.replace("_", "-"), "1"])
            assert "1" == getattr(args, field.name)

    def test_help_shows_each_settings_declared_help_default_and_variable(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """`serve --help` is made from the declarations: each flag's help text, default and
        environment variable, as config.ServerSettings declares them."""
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", "--help"])
        shown = " ".join(capsys.readouterr().out.split())

        for name in ServerSettings.field_names():
            assert ServerSettings.flag(name) in shown
            assert " ".join(ServerSettings.help_text(name).split()) in shown
            assert ServerSettings.env_name(name) in shown
        assert "default: /var/lib/auditrelay" in shown

    def test_defaults_without_flags_or_env(self) -> None:
        """No flag, no variable: the dataclass defaults."""
        assert ServerSettings() == serve_args()

    def test_env_overrides_default_and_flag_overrides_env(self) -> None:
        """Flag > AUDITRELAY_<FIELD> > default, field by field."""
        args = build_parser().parse_args(["serve", "--log-level", "debug"])
        environ = {
            "AUDITRELAY_LOG_LEVEL": "warning",
            "AUDITRELAY_STATE_DIR": "/srv/auditrelay",
            "AUDITRELAY_MAX_CHUNK_BYTES": "8M",
        }

        settings = settings_from(args, environ)

        assert ("debug", Path("/srv/auditrelay"), 8 << 20) == (
            settings.log_level,
            settings.state_dir,
            settings.max_chunk_bytes,
        )

    def test_typed_fields_are_parsed(self) -> None:
        """Paths, enums, sizes and durations become their types."""
        settings = serve_args(
            "--tls-cert", "/etc/tls/tls.crt", "--log-format", "json", "--orphan-after", "2m"
        )

        assert (Path("/etc/tls/tls.crt"), LogFormat.JSON, 120.0) == (
            settings.tls_cert,
            settings.log_format,
            settings.orphan_after,
        )

    def test_a_bad_duration_names_what_was_expected(self) -> None:
        """--orphan-after takes a duration."""
        with pytest.raises(ConfigError) as caught:
            serve_args("--orphan-after", "soon")

        assert [("--orphan-after", "soon", "a duration such as 500ms, 5s, 2m or 1h")] == [
            (p.property, p.value, p.expected) for p in caught.value.problems
        ]

    def test_bad_values_name_the_flag_or_variable(self) -> None:
        """A wrong flag or env value names where it came from and what was expected."""
        args = build_parser().parse_args(["serve", "--log-format", "xml"])

        with pytest.raises(ConfigError) as caught:
            settings_from(args, {"AUDITRELAY_MAX_CHUNK_BYTES": "huge"})

        assert [
            ("--log-format", "xml", "one of: auto, json, console"),
            ("AUDITRELAY_MAX_CHUNK_BYTES", "huge", "a size in bytes such as 1048576, 512k or 64M"),
        ] == [(p.property, p.value, p.expected) for p in caught.value.problems]
