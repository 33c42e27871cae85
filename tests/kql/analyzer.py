"""Microsoft's Kusto parser and semantic analyzer (npm ``@kusto/language-service-next``) under Node.

``make install`` installs the package here (``npm ci`` in tests/kql); ``check.js`` loads it and
analyzes queries against a database whose table is built from ``stream.COLUMNS``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from auditrelay.stream import COLUMNS, TABLE_NAME

HERE = Path(__file__).resolve().parent
CHECKER = HERE / "check.js"
PACKAGE = HERE / "node_modules" / "@kusto" / "language-service-next"


def table_schema() -> str:
    """The auditrelay table as Kusto.Language reads a schema: ``(['name']:type, ...)``.

    Names are bracket-quoted: bare, ``kind`` would end the column list early.
    """
    return "(" + ", ".join(f"['{column.name}']:{column.type}" for column in COLUMNS) + ")"


def analyze(
    queries: Mapping[str, str], extra_tables: Mapping[str, str] | None = None
) -> dict[str, dict[str, Any]]:
    """Each query's ``diagnostics`` (errors and warnings: severity, message, start, length) and
    result ``columns`` (``[name, type]``), by the query's name."""
    node = shutil.which("node")
    if node is None:
        raise AssertionError("node is not on PATH: the Kusto analyzer runs under Node")
    if not PACKAGE.is_dir():
        raise AssertionError(f"{PACKAGE} is missing: run `make install` (npm ci in tests/kql)")
    tables = [{"name": TABLE_NAME, "schema": table_schema()}]
    tables += [{"name": name, "schema": schema} for name, schema in (extra_tables or {}).items()]
    request = {
        "database": "workspace",
        "tables": tables,
        "queries": [{"name": name, "text": text} for name, text in queries.items()],
    }
    done = subprocess.run(
        [node, str(CHECKER)],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise AssertionError(f"check.js failed ({done.returncode}): {done.stderr}")
    result: dict[str, dict[str, Any]] = json.loads(done.stdout)
    return result
