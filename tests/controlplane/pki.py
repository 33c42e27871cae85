"""Certificates, keys and kubeconfigs for the test control plane, made with ``cryptography``.

One CA (``fixtures.certs.CertificateAuthority``, the tests' one certificate helper) signs
everything: the serving certificates (etcd, kube-apiserver, kube-controller-manager,
kube-scheduler, all for 127.0.0.1 only) and the client certificates whose subject is the
Kubernetes identity (CN = user, O = groups), the way kubeadm lays out a cluster.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from auditrelay.emulator.tls import private_key_pem, write_private
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fixtures.certs import CertificateAuthority, Pem

__all__ = ["CertificateAuthority", "KeyPair", "write_kubeconfig", "write_signing_key"]

KeyPair = Pem  # a certificate (or public key) and its private key, as PEM files


def write_signing_key(directory: Path, name: str) -> KeyPair:
    """A service-account token signing key: ``cert`` holds the public key, ``key`` the private."""
    key = ec.generate_private_key(ec.SECP256R1())
    pair = KeyPair(directory / f"{name}.pub", directory / f"{name}.key")
    pair.cert.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    write_private(pair.key, private_key_pem(key))
    return pair


def write_kubeconfig(
    path: Path, *, server: str, ca: Path, client: KeyPair | None, user: str
) -> Path:
    """A kubeconfig for one identity; without a client pair the requests are anonymous."""
    user_entry: dict[str, str] = {}
    if client is not None:
        user_entry = {"client-certificate": str(client.cert), "client-key": str(client.key)}
    document = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "controlplane",
                "cluster": {"server": server, "certificate-authority": str(ca)},
            }
        ],
        "users": [{"name": user, "user": user_entry}],
        "contexts": [{"name": user, "context": {"cluster": "controlplane", "user": user}}],
        "current-context": user,
    }
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    path.chmod(0o600)
    return path
