"""The generated files (protobuf stubs, the plugin's property list) match their sources."""

from auditrelay import codegen
from auditrelay.config import PROPERTIES


def test_checked_in_generated_files_are_fresh() -> None:
    """A change to relay.proto or config.PROPERTIES without `make generate` fails the gate."""
    assert [] == codegen.stale_files()


def test_go_property_list_names_every_property_once() -> None:
    """The plugin reads exactly the keys the sidecar understands, each once."""
    source = codegen.render_go_properties()
    for prop in PROPERTIES:
        assert 1 == source.count(f'Name: "{prop.name}"')
