"""Fuzz target ``emulator``: what the emulator parses of a request: the ingestion body (gzip,
JSON, the row checks), the Authorization header, the token request's form, fault documents. Only
the emulator's documented refusals may come out."""

from __future__ import annotations

import gzip
import tempfile
import time
from pathlib import Path
from typing import Final

import atheris
import orjson
from auditrelay.emulator import Emulator, EmulatorSettings, StoreMode
from auditrelay.emulator.bodies import Attempt
from auditrelay.emulator.faults import Fault, FaultError, parse_fault
from auditrelay.emulator.responses import RefusedError
from auditrelay.emulator.tokens import GrantRefusedError, TokenIssuer, TokenRejectedError
from auditrelay.stream import COLUMN_TYPES, STREAM_NAME

from fuzz.targets.values import value


class _EmulatorParts:
    """An emulator (not started: nothing listens, nothing is written) and a token issuer."""

    def __init__(self) -> None:
        self.directory = tempfile.TemporaryDirectory(prefix="fuzz-emulator-")
        state = Path(self.directory.name)
        self.emulators = {
            mode: Emulator(EmulatorSettings(state_dir=state, store_mode=mode))
            for mode in (StoreMode.FULL, StoreMode.IDS)
        }
        self.issuer = TokenIssuer(
            b"k" * 32,
            audience="https://monitor.azure.com",
            lifetime=3600,
            client_secrets={"client": "the-secret"},
        )
        self.good_token, _ = self.issuer.issue(
            tenant="t", client_id="client", audience="https://monitor.azure.com", issuer="i"
        )


_PARTS: _EmulatorParts | None = None
_COLUMNS: Final = list(COLUMN_TYPES)


def _emulator_parts() -> _EmulatorParts:
    global _PARTS
    if _PARTS is None:
        _PARTS = _EmulatorParts()
    return _PARTS


def _body_bytes(fdp: atheris.FuzzedDataProvider) -> tuple[bytes, str | None]:
    """A request body: rows the fuzzer shaped, or any bytes; gzipped or not."""
    if fdp.ConsumeBool():
        rows = [value(fdp) for _ in range(fdp.ConsumeIntInRange(0, 3))]
        if fdp.ConsumeBool():  # a row of the shipped stream's columns, values fuzzed
            rows.append(
                {column: value(fdp, 2) for column in _COLUMNS[: fdp.ConsumeIntInRange(0, 8)]}
            )
        raw = orjson.dumps(rows)
    else:
        raw = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 2000))
    choice = fdp.ConsumeIntInRange(0, 3)
    if choice == 0:
        return gzip.compress(raw, compresslevel=1), "gzip"
    if choice == 1:  # a gzip body cut short, or with bytes after it
        packed = gzip.compress(raw, compresslevel=1)
        return packed[: fdp.ConsumeIntInRange(0, len(packed))] + fdp.ConsumeBytes(8), "gzip"
    if choice == 2:
        return raw, None
    return raw, fdp.ConsumeUnicodeNoSurrogates(10)


def _fuzz_body(fdp: atheris.FuzzedDataProvider, parts: _EmulatorParts) -> None:
    emulator = parts.emulators[fdp.PickValueInList([StoreMode.FULL, StoreMode.IDS])]
    body, encoding = _body_bytes(fdp)
    attempt = Attempt(
        received=time.time(),
        dcr=emulator.dcr_id,
        stream=STREAM_NAME,
        client_request_id=None,
        wire_bytes=len(body),
        content_encoding=encoding,
    )
    try:
        answer, rows, errors = emulator.ingestion.bodies.read(attempt, body)
    except RefusedError as refused:
        assert 400 <= refused.status < 500 and refused.code
        return
    assert answer.status == 204
    assert len(errors) <= 101
    if emulator.store.mode is StoreMode.FULL:
        for audit_id, _when, row in rows:
            assert row is not None and (audit_id is None or isinstance(audit_id, str))


def _fuzz_authorization(fdp: atheris.FuzzedDataProvider, parts: _EmulatorParts) -> None:
    header = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 200))
    if fdp.ConsumeBool():  # a real token, damaged where the fuzzer says
        token = bytearray(parts.good_token.encode())
        for _ in range(fdp.ConsumeIntInRange(0, 3)):
            token[fdp.ConsumeIntInRange(0, len(token) - 1)] = fdp.ConsumeIntInRange(32, 126)
        header = "Bearer " + token.decode()
    try:
        claims = parts.issuer.verify(header or None)
    except TokenRejectedError as rejected:
        assert rejected.code and rejected.message
        return
    assert claims["appid"] == "client"


def _fuzz_grant(fdp: atheris.FuzzedDataProvider, parts: _EmulatorParts) -> None:
    keys = ["grant_type", "client_id", "scope", "client_secret", "client_assertion",
            "client_assertion_type", "x"]  # fmt: skip
    form = {
        fdp.PickValueInList(keys): fdp.ConsumeUnicodeNoSurrogates(40)
        for _ in range(fdp.ConsumeIntInRange(0, 7))
    }
    if fdp.ConsumeBool():
        form.update(grant_type="client_credentials", scope="https://monitor.azure.com/.default")
    try:
        grant = parts.issuer.check_grant("t", form, "https://127.0.0.1:1/t/oauth2/v2.0/token")
    except GrantRefusedError as refused:
        assert 400 <= refused.status < 500 and refused.body()["error"]
        return
    assert grant.client_id == form["client_id"]


def _fuzz_fault(fdp: atheris.FuzzedDataProvider) -> None:
    try:
        if fdp.ConsumeBool():
            parse_fault(fdp.ConsumeUnicodeNoSurrogates(60))
        else:
            document = orjson.loads(fdp.ConsumeBytes(200))
            Fault.from_json(document)
    except (FaultError, orjson.JSONDecodeError):
        return


def fuzz(data: bytes) -> None:
    """What the emulator parses of a request; only its documented refusals."""
    fdp = atheris.FuzzedDataProvider(data)
    parts = _emulator_parts()
    choice = fdp.ConsumeIntInRange(0, 3)
    if choice == 0:
        _fuzz_body(fdp, parts)
    elif choice == 1:
        _fuzz_authorization(fdp, parts)
    elif choice == 2:
        _fuzz_grant(fdp, parts)
    else:
        _fuzz_fault(fdp)
