"""A node's key and self-signed certificate, and the mesh's join token."""

from __future__ import annotations

import datetime
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

TOKEN_PREFIX = "mp1-"
PROOF_CONTEXT = b"meshpipe-join/1"
# The server's answer proves the token too, so a client (a worker that found its gateway by
# mDNS, say) never takes work from a peer outside its mesh.
WELCOME_CONTEXT = b"meshpipe-welcome/1"


@dataclass(frozen=True)
class Identity:
    """Paths of a node's PEM certificate and private key."""

    certificate: Path
    private_key: Path

    def fingerprint(self) -> str:
        """SHA-256 of the certificate's DER bytes, hex."""
        certificate = x509.load_pem_x509_certificate(self.certificate.read_bytes())
        return certificate_fingerprint(certificate)


def certificate_fingerprint(certificate: x509.Certificate) -> str:
    return certificate.fingerprint(hashes.SHA256()).hex()


def load_or_create_identity(directory: Path, name: str) -> Identity:
    """The node's identity, made on first start (EC P-256, self-signed, 10 years)."""
    directory.mkdir(parents=True, exist_ok=True)
    identity = Identity(directory / f"{name}.crt", directory / f"{name}.key")
    if identity.certificate.exists() and identity.private_key.exists():
        return identity
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"meshpipe {name}")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_private(identity.private_key, key_pem)
    identity.certificate.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return identity


def _write_private(path: Path, data: bytes) -> None:
    temporary = path.with_suffix(".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    temporary.replace(path)


def new_join_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(24)


def load_or_create_join_token(directory: Path) -> str:
    """The mesh's join token, kept (0600) in the gateway's config dir."""
    path = directory / "join_token"
    if path.exists():
        return path.read_text().strip()
    token = new_join_token()
    _write_private(path, token.encode())
    return token


def join_proof(
    token: str, server_fingerprint: str, nonce: str, context: bytes = PROOF_CONTEXT
) -> str:
    """Proof of the token bound to the server's certificate, so it cannot be replayed elsewhere."""
    message = context + bytes.fromhex(server_fingerprint) + nonce.encode()
    return hmac.new(token.encode(), message, hashlib.sha256).hexdigest()


def check_proof(
    token: str, server_fingerprint: str, nonce: str, proof: str, context: bytes = PROOF_CONTEXT
) -> bool:
    expected = join_proof(token, server_fingerprint, nonce, context)
    return hmac.compare_digest(expected, proof)
