"""Regenerates every generated file from its source: ``make generate``.

- ``proto/auditrelay/v1/relay.proto`` -> Python stubs in ``sidecar/auditrelay/v1/`` (grpc_tools,
  pinned in pyproject.toml) and Go stubs in ``fluent-bit/internal/relaypb/`` (protoc-gen-go and
  protoc-gen-go-grpc, pinned in the Makefile).
- ``config.PROPERTIES`` and ``config.ServerSettings`` -> the plugin's property list
  ``fluent-bit/internal/properties/properties_gen.go`` and ``docs/configuration.md``
  (``settings_docs``).
- ``stream.COLUMNS`` -> ``deploy/azure/auditrelay.json`` (table, data collection rule, role), its
  copy in the package data that the emulator reads, and the column table of ``docs/azure.md``
  (``dcr_template``).
- ``detections/*.yaml`` and ``stream.COLUMNS`` -> the workspace function and the alert-rule
  templates in ``deploy/azure/`` (``detection_templates``).
- ``helm/auditrelay/values.yaml`` -> ``values.schema.json`` (``helm_schema``).

``python -m tools.generate --out DIR`` writes the same files below DIR instead of the
repository, which is how the staleness test (tests/unit/test_codegen.py) compares them with what
is checked in; ``--check`` lists the stale ones.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from auditrelay.detections import load_rules

from tools import dcr_template, detection_templates, helm_schema, settings_docs

REPO_ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = REPO_ROOT / "proto"
PROTO_FILES = ("auditrelay/v1/relay.proto",)
GO_MODULE = "github.com/auditrelay/auditrelay/fluent-bit"
PYTHON_STUB_DIR = Path("sidecar/auditrelay/v1")
GO_STUB_DIR = Path("fluent-bit/internal/relaypb")
DETECTIONS_DIR = REPO_ROOT / "detections"

STUB_FILES = (
    PYTHON_STUB_DIR / "__init__.py",
    PYTHON_STUB_DIR / "relay_pb2.py",
    PYTHON_STUB_DIR / "relay_pb2.pyi",
    PYTHON_STUB_DIR / "relay_pb2_grpc.py",
    GO_STUB_DIR / "relay.pb.go",
    GO_STUB_DIR / "relay_grpc.pb.go",
)


def _read(relative: Path) -> str:
    return (REPO_ROOT / relative).read_text(encoding="utf-8")


def _renderers() -> dict[Path, Callable[[], str]]:
    """Every generated text file (but the protobuf stubs) and the function that makes it."""
    rules = load_rules(DETECTIONS_DIR)
    return {
        settings_docs.GO_PROPERTIES_FILE: settings_docs.render_go_properties,
        settings_docs.CONFIGURATION_DOC: settings_docs.render_configuration_doc,
        dcr_template.TEMPLATE_FILE: dcr_template.render_template,
        dcr_template.PACKAGED_TEMPLATE_FILE: dcr_template.render_template,
        dcr_template.AZURE_DOC: lambda: dcr_template.render_azure_doc(
            _read(dcr_template.AZURE_DOC)
        ),
        detection_templates.FUNCTION_FILE: detection_templates.render_function_template,
        detection_templates.LOG_ALERTS_FILE: lambda: detection_templates.render_log_alerts_template(
            rules
        ),
        detection_templates.SENTINEL_FILE: lambda: detection_templates.render_sentinel_template(
            rules
        ),
        helm_schema.SCHEMA_FILE: lambda: helm_schema.render_values_schema(
            _read(helm_schema.VALUES_FILE)
        ),
    }


def _tool_path() -> str:
    """PATH with Go's install directory, where `make install` puts the protoc plugins."""
    gopath = subprocess.run(
        ["go", "env", "GOPATH"], check=True, capture_output=True, text=True
    ).stdout.strip()
    return os.pathsep.join([str(Path(gopath) / "bin"), os.environ.get("PATH", "")])


def _run_protoc(out_root: Path) -> None:
    python_out = out_root / "sidecar"
    go_out = out_root / "fluent-bit"
    python_out.mkdir(parents=True, exist_ok=True)
    go_out.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={python_out}",
        f"--pyi_out={python_out}",
        f"--grpc_python_out={python_out}",
        f"--go_out={go_out}",
        f"--go_opt=module={GO_MODULE}",
        f"--go-grpc_out={go_out}",
        f"--go-grpc_opt=module={GO_MODULE}",
        *PROTO_FILES,
    ]
    subprocess.run(command, check=True, cwd=PROTO_ROOT, env={**os.environ, "PATH": _tool_path()})
    (out_root / PYTHON_STUB_DIR / "__init__.py").write_text(
        '"""Generated gRPC stubs of proto/auditrelay/v1 (make generate). Never edit by hand."""\n'
    )


def generate_paths() -> list[Path]:
    """Every file `make generate` writes, relative to the repository root."""
    return [*STUB_FILES, *_renderers()]


def generate(out_root: Path) -> list[Path]:
    """Writes every generated file below out_root; returns their paths relative to it."""
    _run_protoc(out_root)
    renderers = _renderers()
    for relative, render in renderers.items():
        target = out_root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(render(), encoding="utf-8")
    gofmt = shutil.which("gofmt")
    if gofmt:
        subprocess.run([gofmt, "-w", str(out_root / settings_docs.GO_PROPERTIES_FILE)], check=True)
    return [*STUB_FILES, *renderers]


def stale_files() -> list[Path]:
    """The checked-in generated files that differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        return [
            relative
            for relative in generate(root)
            if not (REPO_ROOT / relative).is_file()
            or (REPO_ROOT / relative).read_bytes() != (root / relative).read_bytes()
        ]


def main(argv: list[str] | None = None) -> int:
    """Regenerates into the repository (or --out DIR); --check only lists stale files."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="root to write below")
    parser.add_argument("--check", action="store_true", help="only list stale files; exit 1 if any")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for path in stale:
            print(f"stale: {path}")
        return 1 if stale else 0
    for path in generate(args.out):
        print(f"generated {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
