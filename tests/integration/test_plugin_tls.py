"""TLS on the TCP path between out_auditrelay.so and the sidecar, when it goes wrong.

An expired, a wrong-CA and a wrong-name server certificate, and a plugin without a client
certificate (or with one another CA signed) when the sidecar requires one (``--tls-client-ca``):
the plugin refuses to start (Fluent Bit would not start) with a message naming the cause, and
the sidecar's log says so too. The sidecar runs at its production log level (info) so that what an operator sees is what
is asserted. Certificates come from tests/fixtures/certs.py.
"""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from auditrelay.devtools.flbproxy import GoProxy, InitError
from fixtures.certs import Pem, Pki, make_pki
from harness.sidecar import Sidecar, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]  # sidecars start slowly under load


@pytest.fixture
def pki() -> Iterator[Pki]:
    with tempfile.TemporaryDirectory(prefix="ar-tls-") as directory:
        yield make_pki(Path(directory))


def tls_sidecar(pki: Pki, server: Pem, *, require_client: bool) -> Sidecar:
    """A sidecar on TCP with ``server``'s certificate, started and logging at info level."""
    flags = ["--tls-cert", str(server.cert), "--tls-key", str(server.key), "--log-level", "info"]
    if require_client:
        flags += ["--tls-client-ca", str(pki.ca)]
    credentials = grpc.ssl_channel_credentials(
        pki.ca.read_bytes(), pki.client.key.read_bytes(), pki.client.cert.read_bytes()
    )
    address = f"127.0.0.1:{free_port()}"
    sidecar = Sidecar(address, pki.ca.parent / f"state-{address.rsplit(':', 1)[1]}", flags)
    sidecar.credentials = credentials
    sidecar.start(health_check=server == pki.server)
    return sidecar


def refused_init(proxy: GoProxy, sidecar: Sidecar, **tls: str) -> str:
    """The plugin's error when its instance cannot start against the sidecar."""
    with pytest.raises(InitError) as raised:
        proxy.init({"sidecar_address": sidecar.address, "sidecar_wait": "10s", **tls})
    return "\n".join(line.text for line in raised.value.log)


def sidecar_says(sidecar: Sidecar, pattern: str, within: float = 60.0) -> None:
    """Waits until the sidecar's log (stdout and stderr) matches ``pattern``."""
    deadline = time.monotonic() + within
    while not re.search(pattern, sidecar.log_text()):
        assert time.monotonic() < deadline, f"no {pattern!r} in:\n{sidecar.log_text()}"
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("server", "trusted", "plugin_says", "sidecar_reason"),
    [
        (
            "expired_server",
            "ca",
            r"x509: certificate has expired or is not yet valid",
            r"Handshake failed .*(CERTIFICATE_EXPIRED|BAD_CERTIFICATE)",
        ),
        (
            "wrong_name_server",
            "ca",
            r"x509: cannot validate certificate for 127\.0\.0\.1 because it doesn't contain any IP SANs",
            r"Handshake failed .*(BAD_CERTIFICATE|CERTIFICATE_UNKNOWN)",
        ),
        (
            "server",
            "other_ca",
            r"x509: certificate signed by unknown authority",
            r"Handshake failed .*(BAD_CERTIFICATE|UNKNOWN_CA)",
        ),
    ],
    ids=["expired", "wrong-name", "wrong-ca"],
)
def test_a_server_certificate_the_plugin_cannot_trust_is_refused_on_both_sides(
    proxy: GoProxy,
    pki: Pki,
    server: str,
    trusted: str,
    plugin_says: str,
    sidecar_reason: str,
) -> None:
    """The plugin names what is wrong with the certificate; the sidecar's log shows the refused
    handshake, and at start the names and validity it serves (an expired one as an error)."""
    sidecar = tls_sidecar(pki, getattr(pki, server), require_client=False)
    try:
        plugin_error = refused_init(proxy, sidecar, sidecar_tls_ca=str(getattr(pki, trusted)))
        sidecar_says(sidecar, sidecar_reason)
    finally:
        sidecar.stop()

    assert re.search(r"the sidecar at 127\.0\.0\.1:\d+ did not answer", plugin_error)
    assert re.search(plugin_says, plugin_error), plugin_error
    [configured] = sidecar.events("tls_configured")
    assert configured["client_certificate_required"] is False
    if server == "wrong_name_server":
        assert ["sidecar.example.test"] == configured["valid_for"]
    expired = sidecar.events("tls_certificate_not_valid")
    assert (1 if server == "expired_server" else 0) == len(expired)


@pytest.mark.parametrize(
    ("client", "plugin_says", "sidecar_reason"),
    [
        (
            None,
            "because it requires a client certificate; set sidecar_tls_cert and sidecar_tls_key",
            r"Handshake failed .*PEER_DID_NOT_RETURN_A_CERTIFICATE",
        ),
        (
            "foreign_client",
            "because it did not accept the client certificate ",
            r"Handshake failed .*CERTIFICATE_VERIFY_FAILED",
        ),
    ],
    ids=["no-client-certificate", "client-certificate-of-another-ca"],
)
def test_a_client_the_sidecar_cannot_trust_is_refused_on_both_sides(
    proxy: GoProxy, pki: Pki, client: str | None, plugin_says: str, sidecar_reason: str
) -> None:
    """The sidecar requires a client certificate: a plugin with none, or with one another CA
    signed, is told so with the properties to set; the sidecar's log names the refusal."""
    sidecar = tls_sidecar(pki, pki.server, require_client=True)
    tls = {"sidecar_tls_ca": str(pki.ca)}
    if client is not None:
        pem: Pem = getattr(pki, client)
        tls |= {"sidecar_tls_cert": str(pem.cert), "sidecar_tls_key": str(pem.key)}
    try:
        plugin_error = refused_init(proxy, sidecar, **tls)
        sidecar_says(sidecar, sidecar_reason)
    finally:
        sidecar.stop()

    assert plugin_says in plugin_error, plugin_error
    [configured] = sidecar.events("tls_configured")
    assert configured["client_certificate_required"] is True
