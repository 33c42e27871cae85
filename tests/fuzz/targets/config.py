"""Fuzz target ``config``: a Configure request's properties; only ConfigError, and never the
client secret in its message."""

from __future__ import annotations

from typing import Final

import atheris
from auditrelay.config import PROPERTIES, PipelineSettings
from auditrelay.errors import ConfigError

SECRET_MARK: Final = "zz-fuzz-secret-"
_PROPERTY_NAMES: Final = [prop.name for prop in PROPERTIES]


def fuzz(data: bytes) -> None:
    """A Configure request's properties; only ConfigError, never the secret in its message."""
    fdp = atheris.FuzzedDataProvider(data)
    properties: dict[str, str] = {}
    for _ in range(fdp.ConsumeIntInRange(0, 10)):
        name = fdp.PickValueInList([*_PROPERTY_NAMES, "Endpoint", "no_such_property"])
        properties[name] = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 60))
    secret = SECRET_MARK + fdp.ConsumeUnicodeNoSurrogates(20)
    if fdp.ConsumeBool():
        properties["client_secret"] = secret
    try:
        settings = PipelineSettings.from_properties(properties, instance_name="auditrelay.0")
    except ConfigError as error:
        assert error.problems
        others = [value for key, value in properties.items() if key != "client_secret"]
        if not any(SECRET_MARK in value for value in others):
            assert SECRET_MARK not in str(error), "a client secret shown in an error"
        return
    assert settings.max_concurrency >= 1 and settings.spool_limit > 0
    assert settings.batch_interval > 0 and settings.request_timeout > 0
    if "client_secret" in properties:  # an empty value is no value
        assert settings.client_secret == (properties["client_secret"].strip() or None)
