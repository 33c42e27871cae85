"""The fuzz targets: one module per parser the sidecar exposes to input it does not control.

Each module's ``fuzz(data)`` takes the fuzzer's bytes, drives one public entry point, and checks
what a user relies on. Anything but the documented error is a finding; so is a broken invariant
(an AssertionError). The same functions replay the committed seeds and findings in pytest
(``tests/fuzz/test_fuzz.py``) and run under atheris, coverage-guided (``tests/fuzz/run.py``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Final

Target = Callable[[bytes], None]

# Per target: the modules whose branches guide the fuzzer (ours, and the parsers under them).
INSTRUMENTED: Final[dict[str, list[str]]] = {
    "decode": ["auditrelay.decode", "fixtures.chunks"],
    "filter": ["auditrelay.filter", "auditrelay.policy"],
    "policy": ["auditrelay.policy", "yaml"],
    "config": ["auditrelay.config"],
    "emulator": ["auditrelay.emulator", "jwt"],
}
NAMES: Final = tuple(INSTRUMENTED)


def load(name: str) -> Target:
    """The ``fuzz`` function of target ``name`` (its module imported now)."""
    target: Target = importlib.import_module(f"fuzz.targets.{name}").fuzz
    return target
