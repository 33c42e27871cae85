"""Developer tooling: the generators of every checked-in generated file (``make generate``).

Not part of the runtime package: the wheel ships ``sidecar/auditrelay`` only. Run from the
repository root with the package importable (``make generate`` sets that up).
"""
