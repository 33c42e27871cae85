"""No secret leaks: recognizable fake client secrets, a certificate's private key and bearer
tokens go through the delivery and reliability scenarios, and none of them may appear in any
log line, in /metrics, in /readyz, in a dead-letter file, in a file name under the state
directory, or in an error the sidecar returns over gRPC.

The scenarios, all through out_auditrelay.so driven as Fluent Bit does, ``auditrelay serve``
as a subprocess (logging at debug level) and the emulator in this process: a client-secret
pipeline delivering chunks that carry bad records (dead letters); an outage (503) with a
backlog, during which the secret expires (tokens revoked, the old secret refused: 401 on
/readyz) and is rotated by a Fluent Bit restart; a certificate credential; workload identity
with a federated token; a pipeline whose secret is wrong from the start; and Configure calls
the sidecar refuses. The access tokens are the emulator's real ones, recorded as it issues them.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from auditrelay.devtools.flbproxy import GoProxy, InitError
from auditrelay.emulator import DEFAULT_DCR_ID, Emulator, EmulatorSettings, Fault, FaultKind
from auditrelay.emulator import running_in_thread as emulator_in_thread
from auditrelay.emulator.tokens import FEDERATED_AUDIENCE
from fixtures.certs import app_registration_certificate
from fixtures.chunks import event_time, log_record, v2_event
from harness.fluentbit import Chunks, FluentBit, http_get, missing, wait_for
from harness.sidecar import Sidecar

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]  # sidecars start slowly under load

TENANT = "72f988bf-0000-0000-0000-00000000abcd"
CLIENT = "0a1b2c3d-0000-0000-0000-00000000abcd"
FIRST_SECRET = "CANARY-client-secret-first-Zq7Wn3"
ROTATED_SECRET = "CANARY-client-secret-rotated-Hx4Pk9"
WRONG_SECRET = "CANARY-client-secret-wrong-Lm2Vb8"
REFUSED_SECRET = "CANARY-client-secret-refused-Tg6Yc1"


@pytest.fixture
def issued_tokens() -> list[str]:
    return []


@pytest.fixture
def emulator(workdir: Path, issued_tokens: list[str]) -> Iterator[Emulator]:
    settings = EmulatorSettings(
        state_dir=workdir / "emulator", client_secrets={CLIENT: FIRST_SECRET}
    )
    with emulator_in_thread(settings) as running:
        issue = running.tokens.issue

        def recording_issue(**claims: Any) -> tuple[str, int]:
            token, lifetime = issue(**claims)
            issued_tokens.append(token)
            return token, lifetime

        running.tokens.issue = recording_issue  # type: ignore[method-assign]
        yield running


def federated_token(path: Path) -> str:
    """A projected service-account token as the kubelet writes it (a JWT for Entra)."""
    now = int(time.time())
    claims = {
        "iss": "https://oidc.example.test/CANARY-issuer",
        "sub": "system:serviceaccount:logging:CANARY-federated-subject",
        "aud": FEDERATED_AUDIENCE,
        "iat": now,
        "exp": now + 3600,
    }
    token = jwt.encode(claims, "CANARY-federated-signing-key-Wd5Rf2" * 2, algorithm="HS256")
    path.write_text(token)
    return token


def key_fragments(pem_file: Path) -> list[str]:
    """Pieces of the private key a leak would show: each base64 line of its PEM body, and the
    raw key bytes' base64 in one piece."""
    text = pem_file.read_text()
    body = text.split("-----BEGIN PRIVATE KEY-----")[1].split("-----END PRIVATE KEY-----")[0]
    lines = [line for line in body.split() if len(line) >= 32]
    return [*lines, "".join(body.split()), base64.b64decode("".join(body.split())).hex()[:64]]


def section(sidecar: Sidecar, emulator: Emulator, **properties: str) -> dict[str, str]:
    return {
        "sidecar_address": sidecar.address,
        "sidecar_wait": "20s",
        "endpoint": emulator.endpoint,
        "endpoint_ca": str(emulator.ca_file),
        "dcr_id": DEFAULT_DCR_ID,
        "authority_host": emulator.authority_host,
        "tenant_id": TENANT,
        "client_id": CLIENT,
        "batch_interval": "50ms",
        "request_timeout": "10s",
        **properties,
    }


def bad_records() -> list[bytes]:
    """Records that become dead letters: a line that is not JSON, an event without auditID."""
    stamp = event_time(int(time.time()))
    return [
        v2_event(stamp, log_record(b"E1202 kube-apiserver: not json")),
        v2_event(stamp, log_record(b'{"kind":"Event","apiVersion":"audit.k8s.io/v1"}')),
    ]


def test_no_secret_appears_in_logs_metrics_readyz_files_or_errors(
    workdir: Path, emulator: Emulator, proxy: GoProxy, issued_tokens: list[str]
) -> None:
    """Every canary stays out of every place an operator (or an attacker with read access to
    logs, metrics or the state directory) can see."""
    sidecar = Sidecar.on_socket(workdir / "relay.sock", workdir / "relay")
    sidecar.start()
    readyz_texts: list[str] = []
    chunks = Chunks("secret")
    certificate = app_registration_certificate(workdir / "app.pem")
    federated = federated_token(workdir / "token")
    try:
        # A client-secret pipeline; chunks with bad records; an outage with a backlog in which
        # the secret expires (the old one refused, 401 on /readyz), then the rotation through
        # a Fluent Bit restart.
        flb = FluentBit(
            proxy, section(sidecar, emulator, auth="client_secret", client_secret=FIRST_SECRET)
        )
        flb.send(chunks.make(extra_records=bad_records()))
        wait_for(lambda: not missing(emulator, chunks.sent), 60, "the first rows")
        emulator.add_fault(Fault(FaultKind.STATUS, status=503))
        flb.send(chunks.make(extra_records=bad_records()))
        wait_for(lambda: 503 in [r.status for r in emulator.store.requests()], 60, "a 503")
        emulator.tokens.client_secrets = {CLIENT: ROTATED_SECRET}
        emulator.revoke_tokens()
        emulator.clear_faults()
        wait_for(lambda: "401" in http_get(sidecar, "/readyz")[1], 120, "the refused token")
        readyz_texts.append(http_get(sidecar, "/readyz")[1])
        flb.restart(client_secret=ROTATED_SECRET)
        wait_for(lambda: not missing(emulator, chunks.sent), 120, "the backlog")

        # A certificate credential, and workload identity with a federated token.
        for properties in (
            {"auth": "client_certificate", "client_certificate": str(certificate)},
            {"auth": "workload_identity", "federated_token_file": str(workdir / "token")},
        ):
            other = FluentBit(proxy, section(sidecar, emulator, **properties))
            other.send(chunks.make(extra_records=bad_records()))
            wait_for(lambda: not missing(emulator, chunks.sent), 120, f"rows via {properties}")

        # A secret the authority refuses from the start: delivery fails, /readyz says why.
        failing = FluentBit(
            proxy, section(sidecar, emulator, auth="client_secret", client_secret=WRONG_SECRET)
        )
        failing.send(chunks.make(events=5))
        wait_for(lambda: "7000215" in http_get(sidecar, "/readyz")[1], 120, "the refused secret")
        readyz_texts.append(http_get(sidecar, "/readyz")[1])

        # Configure refused by the sidecar, with a secret among the properties.
        with pytest.raises(InitError) as refused:
            proxy.init(
                section(
                    sidecar,
                    emulator,
                    auth="client_secret",
                    client_secret=REFUSED_SECRET,
                    tenant_id="",
                    compression_level="99",
                )
            )
        grpc_errors = "\n".join(line.text for line in refused.value.log)
        assert "compression_level" in grpc_errors  # the error did come back over gRPC

        metrics = http_get(sidecar, "/metrics")[1]
    finally:
        sidecar.stop()

    canaries = {
        "first secret": FIRST_SECRET,
        "rotated secret": ROTATED_SECRET,
        "wrong secret": WRONG_SECRET,
        "refused secret": REFUSED_SECRET,
        "federated token": federated,
        "federated token signature": federated.rsplit(".", 1)[1],
        **{f"key fragment {n}": piece for n, piece in enumerate(key_fragments(certificate))},
        **{f"access token {n}": token for n, token in enumerate(issued_tokens)},
        **{f"access token {n} signature": t.rsplit(".", 1)[1] for n, t in enumerate(issued_tokens)},
    }
    assert len(issued_tokens) >= 3  # secret, rotated secret, certificate, federated
    state = sidecar.state_dir
    letters = sorted((state / "deadletter").rglob("*.jsonl"))
    assert letters, "the scenarios wrote no dead letters: the check would prove nothing"
    places = {
        "sidecar log": sidecar.log_text(),
        "plugin log": "\n".join(proxy.lines()),
        "gRPC errors": grpc_errors,
        "/metrics": metrics,
        "/readyz": "\n".join(readyz_texts),
        "dead letters": "\n".join(path.read_text(errors="replace") for path in letters),
        "file names": "\n".join(str(path.relative_to(state)) for path in state.rglob("*")),
        "spool records": "\n".join(
            path.read_text(errors="replace") for path in (state / "spool").rglob("*.json")
        ),
    }
    assert "AADSTS7000215" in places["/readyz"]  # the failures were there to be seen
    leaks = [
        f"{what} in {where}"
        for what, canary in canaries.items()
        for where, text in places.items()
        if canary in text
    ]
    assert [] == leaks
