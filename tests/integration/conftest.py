"""What the integration tests share: a short working directory, the plugin built from this
checkout, and that plugin loaded as Fluent Bit v5.1.1 loads it."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from auditrelay.devtools.flbproxy import FLUENT_BIT_5_1_1, GoProxy, build_plugin


@pytest.fixture(scope="session")
def plugin_path() -> Path:
    """The plugin built from this checkout (``make plugin``, a no-op when up to date)."""
    return build_plugin()


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A short directory: a Unix socket path must stay under 108 bytes."""
    with tempfile.TemporaryDirectory(prefix="ar-") as directory:
        yield Path(directory)


@pytest.fixture
def proxy(plugin_path: Path) -> Iterator[GoProxy]:
    """The plugin registered as Fluent Bit v5.1.1 does; shut down after the test."""
    loaded = GoProxy(plugin_path, FLUENT_BIT_5_1_1)
    loaded.register()
    yield loaded
    if loaded.registration is not None:
        loaded.shutdown()
