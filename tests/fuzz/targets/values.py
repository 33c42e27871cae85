"""Values the fuzzer shapes: JSON-like scalars, lists and maps."""

from __future__ import annotations

from typing import Any

import atheris


def value(fdp: atheris.FuzzedDataProvider, depth: int = 0) -> Any:
    """A JSON-like value the fuzzer chooses: scalars, and lists and maps up to depth 3."""
    kind = fdp.ConsumeIntInRange(0, 8 if depth < 3 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return fdp.ConsumeBool()
    if kind == 2:
        return fdp.ConsumeInt(8)
    if kind == 3:
        return fdp.ConsumeRegularFloat()
    if kind in (4, 5):
        return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 40))
    if kind == 6:
        return [value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 4))]
    return {
        fdp.ConsumeUnicodeNoSurrogates(8): value(fdp, depth + 1)
        for _ in range(fdp.ConsumeIntInRange(0, 4))
    }


def some_bytes(fdp: atheris.FuzzedDataProvider, most: int) -> bytes:
    """Up to ``most`` bytes, as many as the fuzzer says."""
    data: bytes = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, most))
    return data
