"""Suite-wide hooks: the closing line that names every real-Fluent-Bit test a run skipped."""

from __future__ import annotations

import pytest
from harness.real_fluent_bit import MARKER

pytest_plugins = ["pytester"]  # tests/unit/test_skipped_fluent_bit_line.py runs pytest itself


def pytest_unconfigure(config: pytest.Config) -> None:
    """One loud last line, after pytest's own summary, when tests that run the real fluent-bit
    binary were skipped: a green run without Fluent Bit has not tested the plugin inside it."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if not isinstance(reporter, pytest.TerminalReporter):
        return
    skipped = [
        report.nodeid for report in reporter.stats.get("skipped", []) if MARKER in report.keywords
    ]
    if skipped:
        reporter.write_line(
            f"NOT RUN AGAINST A REAL FLUENT BIT: {len(skipped)} test(s) skipped "
            f"(make test-fluent-bit FLUENT_BIT=/path/to/fluent-bit): {', '.join(skipped)}",
            red=True,
            bold=True,
        )
