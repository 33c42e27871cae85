"""values.schema.json is generated from values.yaml's comments and defaults (tools/helm_schema.py)."""

from __future__ import annotations

import pytest

from tools.helm_schema import ValuesDocError, generate

VALUES = """\
# A header comment, apart from the values by a blank line.

# The image of the thing.
image:
  # Registry and repository of the image.
  repository: example.org/thing
  # How many copies run.
  # @schema {"minimum": 1}
  replicas: 2
# CPU and memory, free-form as in Kubernetes.
# @schema {"additionalProperties": true}
resources:
  limits:
    memory: 1Gi
# Arguments of the container.
args:
  - --one
# Turn the thing on.
enabled: false
# A script, kept whole.
script: |
  looks: like a key
"""


def test_groups_are_strict_and_free_form_mappings_are_open() -> None:
    """A mapping of commented values becomes an object without additional properties; one marked
    free-form keeps its keys open and is not looked into."""
    schema = generate(VALUES)
    assert schema["additionalProperties"] is False
    image = schema["properties"]["image"]
    assert (False, ["repository", "replicas"]) == (
        image["additionalProperties"],
        list(image["properties"]),
    )
    assert {
        "description": "CPU and memory, free-form as in Kubernetes.",
        "type": "object",
        "additionalProperties": True,
    } == schema["properties"]["resources"]


def test_types_come_from_defaults_and_keywords_from_schema_lines() -> None:
    """Each value's type is its default's, its description the comment, and a @schema line adds
    keywords."""
    properties = generate(VALUES)["properties"]
    expected = {"description": "How many copies run.", "type": "integer", "minimum": 1}
    assert expected == properties["image"]["properties"]["replicas"]
    assert ("array", "boolean", "string") == (
        properties["args"]["type"],
        properties["enabled"]["type"],
        properties["script"]["type"],
    )


def test_a_value_without_a_comment_is_refused() -> None:
    """A value with no comment above it stops the generator, naming the value and its line."""
    text = VALUES.replace("  # How many copies run.\n", "")
    with pytest.raises(ValuesDocError, match=r"line \d+: image\.replicas: expected a comment"):
        generate(text)


def test_a_comment_that_is_not_a_sentence_is_refused() -> None:
    """A description must be a full sentence: a capital first and a full stop at the end."""
    text = VALUES.replace("# Turn the thing on.", "# turn on")
    with pytest.raises(
        ValuesDocError, match="enabled: expected a comment above the value, a full sentence"
    ):
        generate(text)
