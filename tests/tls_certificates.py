"""A throwaway certificate authority, so TLS tests run real handshakes against loopback
servers with verification on, and can show a certificate for the wrong name is refused.

    files = write_certificates(tmp_path, ["localhost"])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(files.servers["localhost"])
    monkeypatch.setenv("SSL_CERT_FILE", str(files.ca))
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CA_NAME = "test CA"
VALID_BEFORE_NOW = datetime.timedelta(hours=1)  # slack for a clock that differs a little
VALID_AFTER_NOW = datetime.timedelta(days=1)


@dataclass(frozen=True)
class TlsFiles:
    ca: Path  # the CA certificate, for the client to trust
    servers: dict[str, Path]  # per host name, its certificate and key in one PEM, for load_cert_chain


def _certificate(subject: str, key, issuer_key, ca: bool) -> x509.Certificate:
    """Signed by `issuer_key`; the CA and key-identifier extensions are there because
    strict verification (Python 3.13's default context) refuses certificates without them."""
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME)]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - VALID_BEFORE_NOW)
               .not_valid_after(now + VALID_AFTER_NOW)
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False,
            decipher_only=False), critical=True)
        builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                                        critical=False)
    else:  # the name only, no IP address: a test may connect by address to see it refused
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False)
        builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer_key.public_key()), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def write_certificates(folder: Path, names: list[str]) -> TlsFiles:
    """Writes `ca.pem` and `<name>.pem` per host name into `folder`."""
    pem = serialization.Encoding.PEM
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_path = folder / "ca.pem"
    ca_path.write_bytes(_certificate(CA_NAME, ca_key, ca_key, ca=True).public_bytes(pem))
    servers = {}
    for name in names:
        key = ec.generate_private_key(ec.SECP256R1())
        servers[name] = folder / f"{name}.pem"
        servers[name].write_bytes(_certificate(name, key, ca_key, ca=False).public_bytes(pem) + key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return TlsFiles(ca_path, servers)
