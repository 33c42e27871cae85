"""Runs one fuzz target under atheris (libFuzzer, coverage-guided).

    python3 tests/fuzz/run.py decode --runs 1000000

The committed seeds (``tests/fuzz/corpus/<target>/``) and findings
(``tests/fuzz/regressions/<target>/``) start the run; inputs that reach new code go to
``tests/fuzz/.work/<target>/`` (not committed), and a crash is written there as
``crash-<sha1>``: copy it into ``regressions/<target>/`` and fix the code. Each input has
``--timeout`` seconds (a hang is a finding) and the process ``--rss-limit-mb``. The exit code is
0 when every run passed, 1 on a finding, 2 on bad arguments. The last line printed is a JSON
summary (target, runs, seconds, exit code).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Final

FUZZ_DIR: Final = Path(__file__).resolve().parent
REPO_ROOT: Final = FUZZ_DIR.parents[1]
TARGET_NAMES: Final = ("decode", "filter", "policy", "config", "emulator")
# The YAML parser is pure Python: shorter policies keep the rate of inputs up.
MAX_LEN: Final = {"policy": 1024}


def seeds_dir(target: str) -> Path:
    return FUZZ_DIR / "corpus" / target


def regressions_dir(target: str) -> Path:
    return FUZZ_DIR / "regressions" / target


def work_dir(target: str) -> Path:
    return FUZZ_DIR / ".work" / target


def _fuzz_in_this_process(target: str, libfuzzer_args: list[str]) -> None:
    """Instruments our modules, then hands control to libFuzzer (which exits the process)."""
    sys.path[:0] = [str(REPO_ROOT / "sidecar"), str(REPO_ROOT / "tests")]
    import atheris

    from fuzz.targets import INSTRUMENTED, load

    with atheris.instrument_imports(include=INSTRUMENTED[target]):
        fuzz = load(target)
    atheris.Setup([sys.argv[0], *libfuzzer_args], fuzz)
    atheris.Fuzz()


def _libfuzzer_args(args: argparse.Namespace) -> list[str]:
    work = work_dir(args.target)
    work.mkdir(parents=True, exist_ok=True)
    corpora = [work, seeds_dir(args.target), regressions_dir(args.target)]
    return [
        *[str(path) for path in corpora if path.is_dir()],
        f"-runs={args.runs}",
        f"-timeout={args.timeout}",
        f"-rss_limit_mb={args.rss_limit_mb}",
        f"-max_len={args.max_len or MAX_LEN.get(args.target, 4096)}",
        f"-max_total_time={args.max_seconds}",
        f"-seed={args.seed}",
        f"-artifact_prefix={work}/",
        "-print_final_stats=1",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run one fuzz target under atheris.")
    parser.add_argument("target", choices=TARGET_NAMES)
    parser.add_argument("--runs", type=int, default=10_000, help="inputs to run")
    parser.add_argument(
        "--max-seconds", type=int, default=0, help="stop after this long (0: no limit)"
    )
    parser.add_argument("--timeout", type=int, default=10, help="seconds one input may take")
    parser.add_argument("--rss-limit-mb", type=int, default=2048)
    parser.add_argument(
        "--max-len", type=int, default=0, help="longest input (default: 1024 for policy, else 4096)"
    )
    parser.add_argument("--seed", type=int, default=1, help="libFuzzer's random seed")
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.in_process:
        _fuzz_in_this_process(args.target, _libfuzzer_args(args))
        return 2  # not reached: libFuzzer exits
    # libFuzzer ends the process itself; a child keeps the summary (and its exit code) ours.
    started = time.monotonic()
    child = subprocess.run(
        [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--in-process"],
        stderr=subprocess.PIPE,
        text=True,
        check=False,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    sys.stderr.write(child.stderr)
    runs = re.findall(r"stat::number_of_executed_units: (\d+)", child.stderr)
    summary = {
        "target": args.target,
        "runs": int(runs[-1]) if runs else 0,
        "seconds": round(time.monotonic() - started, 1),
        "exit_code": 0 if child.returncode == 0 else 1,
    }
    print(json.dumps(summary))
    return int(summary["exit_code"])


if __name__ == "__main__":
    sys.exit(main())
