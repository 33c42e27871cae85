"""The real ``fluent-bit`` binary for the tests that run one (``make test-fluent-bit``).

The binary is FLUENT_BIT, or ``fluent-bit`` on PATH. Every test that runs it carries the
``fluent_bit`` marker (``needs_fluent_bit``): without a binary it is skipped, and the suite's last
line names every skipped one (tests/conftest.py), so a run without Fluent Bit cannot pass for one
with it. A FLUENT_BIT that is set but not an executable file fails those tests instead of
skipping them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable
from functools import cache
from typing import Final, TypeVar

import pytest

MARKER: Final = "fluent_bit"
Test = TypeVar("Test", bound=Callable[..., object])
_GIVEN: Final = os.environ.get("FLUENT_BIT", "")
FLUENT_BIT: Final = _GIVEN or shutil.which("fluent-bit") or ""

# pytestmark of a module whose every test runs the binary; needs_fluent_bit for a single test.
FLUENT_BIT_MARKS: Final = [
    pytest.mark.fluent_bit,
    pytest.mark.skipif(
        not FLUENT_BIT,
        reason="no fluent-bit binary (make test-fluent-bit FLUENT_BIT=/path/to/fluent-bit)",
    ),
]


def needs_fluent_bit(test: Test) -> Test:
    """Marks one test as running the real binary."""
    for mark in FLUENT_BIT_MARKS:
        test = mark(test)
    return test


def fluent_bit_binary() -> str:
    """The binary to run; a FLUENT_BIT that names no executable fails the test, never skips it."""
    if not (os.path.isfile(FLUENT_BIT) and os.access(FLUENT_BIT, os.X_OK)):
        pytest.fail(f"FLUENT_BIT={FLUENT_BIT!r} is not an executable file")
    return FLUENT_BIT


@cache
def fluent_bit_version() -> tuple[int, int, int]:
    """The version of the binary, e.g. (5, 1, 1)."""
    output = subprocess.run(
        [fluent_bit_binary(), "--version"], capture_output=True, text=True, check=False
    ).stdout
    found = re.search(r"Fluent Bit v(\d+)\.(\d+)\.(\d+)", output)
    assert found is not None, f"{FLUENT_BIT} --version printed no version:\n{output}"
    major, minor, patch = (int(part) for part in found.groups())
    return major, minor, patch
