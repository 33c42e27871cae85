"""The README's prerequisites are what the build declares: go.mod files, pyproject.toml, cgo."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
PREREQUISITES = re.compile(r"^On a new machine \((?P<tools>[^)]*)\):$", re.MULTILINE)


def version(text: str) -> tuple[int, ...]:
    """A dotted version without trailing zeros: "1.26.0" and "1.26" are the same version."""
    parts = [int(part) for part in text.split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def prerequisites() -> dict[str, str]:
    """The README's list, e.g. {"Python": "3.11+", "Go": "1.26+", "gcc": ""}."""
    match = PREREQUISITES.search(README.read_text(encoding="utf-8"))
    assert match is not None, f"{README}: no line 'On a new machine (...):'"
    found = {}
    for tool in match["tools"].split(","):
        name, _, wanted = tool.strip().partition(" ")
        found[name] = wanted
    return found


def go_modules() -> list[Path]:
    """Every go.mod of the repository (build caches left out)."""
    return sorted(path for path in REPO.rglob("go.mod") if not {".cache", ".git"} & set(path.parts))


def go_directive(go_mod: Path) -> tuple[int, ...]:
    match = re.search(r"^go (\d+\.\d+(?:\.\d+)?)$", go_mod.read_text(encoding="utf-8"), re.M)
    assert match is not None, f"{go_mod}: no go directive"
    return version(match[1])


def test_go_version_is_the_highest_go_directive() -> None:
    """`make check` builds every Go module, so the README asks for the newest `go` line of them."""
    modules = go_modules()
    needed = max(go_directive(path) for path in modules)

    assert len(modules) >= 4, modules  # plugin, conformance, control plane, kubecheck
    assert f"{'.'.join(map(str, needed))}+" == prerequisites()["Go"]


def test_python_version_is_requires_python() -> None:
    """The README's Python is the lower bound pyproject.toml declares."""
    declared = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    match = re.fullmatch(r">=\s*(\d+\.\d+)", declared["project"]["requires-python"])
    assert match is not None, declared["project"]["requires-python"]

    assert f"{match[1]}+" == prerequisites()["Python"]


def test_a_c_compiler_is_listed_while_the_plugin_uses_cgo() -> None:
    """The plugin is built with cgo (`import "C"`), which needs gcc."""
    uses_cgo = any(
        'import "C"' in path.read_text(encoding="utf-8")
        for path in (REPO / "fluent-bit").rglob("*.go")
    )

    assert uses_cgo
    assert "gcc" in prerequisites()
