"""The fuzz targets in CI: every committed seed and finding replayed, and a short coverage-guided
run of each target under atheris. The long runs are ``make fuzz`` (docs/operations.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fuzz.run import TARGET_NAMES, regressions_dir, seeds_dir
from fuzz.targets import NAMES, load

SMOKE_RUNS = 300


def _inputs(target: str) -> list[Path]:
    return sorted(
        path
        for directory in (seeds_dir(target), regressions_dir(target))
        if directory.is_dir()
        for path in directory.iterdir()
        if path.is_file()
    )


def test_the_runner_knows_every_target() -> None:
    assert TARGET_NAMES == NAMES


@pytest.mark.parametrize("target", NAMES)
def test_seeds_and_findings_pass(target: str) -> None:
    """Each committed input (seeds, and every finding of earlier runs) passes its target."""
    inputs = _inputs(target)
    assert inputs, f"no seeds for {target} in {seeds_dir(target)}"
    fuzz = load(target)
    for path in inputs:
        try:
            fuzz(path.read_bytes())
        except BaseException as error:
            raise AssertionError(f"{target}: {path.name} fails: {error!r}") from error


@pytest.mark.slow
@pytest.mark.parametrize("target", NAMES)
def test_a_short_coverage_guided_run_finds_nothing(target: str) -> None:
    done = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("run.py")), target, f"--runs={SMOKE_RUNS}"],
        capture_output=True,
        text=True,
        check=False,
        timeout=110,
    )
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert 0 == done.returncode, done.stdout[-3000:] + done.stderr[-3000:]
    assert summary["runs"] >= SMOKE_RUNS  # the corpus learned earlier runs first, and counts
