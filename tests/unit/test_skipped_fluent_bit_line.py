"""A run without Fluent Bit ends with one line naming every real-binary test it skipped."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]


def run_without_fluent_bit(pytester: pytest.Pytester) -> pytest.RunResult:
    """Runs the suite's own conftest on a test file with a real-binary test and a plain one,
    with no FLUENT_BIT and no fluent-bit on PATH."""
    pytester.makeconftest((TESTS / "conftest.py").read_text())
    pytester.makepyfile(
        test_sample="""
        from harness.real_fluent_bit import needs_fluent_bit

        @needs_fluent_bit
        def test_in_real_fluent_bit():
            pass

        def test_elsewhere():
            pass
        """
    )
    env = {"PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent / "sidecar")])}
    env["PATH"] = str(pytester.path)
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("FLUENT_BIT", raising=False)
        for name, value in env.items():
            patch.setenv(name, value)
        return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-o", "markers=fluent_bit")


def test_last_line_names_the_skipped_real_binary_tests(pytester: pytest.Pytester) -> None:
    """The closing line is the last one, loud, and names the skipped test, not the one that ran."""
    result = run_without_fluent_bit(pytester)

    result.assert_outcomes(passed=1, skipped=1)
    last = result.outlines[-1]
    assert last.startswith("NOT RUN AGAINST A REAL FLUENT BIT: 1 test(s) skipped")
    assert last.endswith("test_sample.py::test_in_real_fluent_bit")
