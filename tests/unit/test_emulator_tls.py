"""The emulator's CA and localhost certificate: created once, private keys private, trusted."""

from __future__ import annotations

import asyncio
import ssl
import stat
from pathlib import Path

import pytest
from auditrelay.emulator.tls import ensure_certificates
from cryptography import x509


def test_certificates_are_created_once_and_reused(tmp_path: Path) -> None:
    """A second call finds the same files; the server key is readable by the owner only."""
    first = ensure_certificates(tmp_path / "tls")
    ca_pem = first.ca_file.read_bytes()
    second = ensure_certificates(tmp_path / "tls")

    assert first == second
    assert ca_pem == second.ca_file.read_bytes()
    assert 0o600 == stat.S_IMODE(first.key_file.stat().st_mode)


def test_server_certificate_names_localhost_and_loopback_addresses(tmp_path: Path) -> None:
    """The server certificate covers localhost, 127.0.0.1 and ::1, for server auth only."""
    files = ensure_certificates(tmp_path)
    certificate = x509.load_pem_x509_certificate(files.cert_file.read_bytes())
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value

    assert ["localhost"] == names.get_values_for_type(x509.DNSName)
    assert ["127.0.0.1", "::1"] == [str(a) for a in names.get_values_for_type(x509.IPAddress)]


@pytest.mark.parametrize("server_name", ["localhost", "127.0.0.1"])
async def test_clients_trusting_the_ca_complete_a_tls_handshake(
    tmp_path: Path, server_name: str
) -> None:
    """A client that trusts only ca.pem verifies the server by name and by address."""
    files = ensure_certificates(tmp_path)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readexactly(5))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=files.server_context())
    port = server.sockets[0].getsockname()[1]
    async with server:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=files.client_context(), server_hostname=server_name
        )
        writer.write(b"hello")
        echoed = await reader.readexactly(5)
        writer.close()
        await writer.wait_closed()

    assert b"hello" == echoed


async def test_clients_with_the_system_trust_store_refuse_the_emulator(tmp_path: Path) -> None:
    """Without the emulator's CA the certificate is not trusted: nothing is silently accepted."""
    files = ensure_certificates(tmp_path)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=files.server_context())
    port = server.sockets[0].getsockname()[1]
    async with server:
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.open_connection(
                "127.0.0.1", port, ssl=ssl.create_default_context(), server_hostname="localhost"
            )
