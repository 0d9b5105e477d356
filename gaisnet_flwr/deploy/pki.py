"""A throwaway certificate authority for a lab on one machine (loopback bring-up and tests).

Real deployments use certificates from their own CA; this only saves a lab the `openssl`
incantations when everything runs on 127.0.0.1. One CA signs one server certificate that is
valid for the given host names and IPs (for serving and, since a peer calls the next one with
it, for client authentication); every process (SuperLink, peers) presents it, and a SuperNode
or peer verifies against the CA. The CA also signs a client certificate that a cluster's start
point (the SuperNode's ClientApp) presents to peers started with `--require-client-cert`
(mutual TLS).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class LabPki:
    ca_certfile: Path
    certfile: Path
    keyfile: Path
    client_certfile: Path  # the start point's certificate for mutual TLS with peers
    client_keyfile: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_lab_pki(directory: Path, hosts: tuple[str, ...] = ("localhost", "127.0.0.1")) -> LabPki:
    """Write ca.pem, server.pem and server.key (valid 30 days for `hosts`), and client.pem and
    client.key (client authentication only) into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("gaisnet lab CA"))
        .issuer_name(_name("gaisnet lab CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = (
        x509.CertificateBuilder()
        .subject_name(_name("gaisnet lab start point"))
        .issuer_name(ca.subject)
        .public_key(client_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pki = LabPki(
        directory / "ca.pem",
        directory / "server.pem",
        directory / "server.key",
        directory / "client.pem",
        directory / "client.key",
    )
    pki.ca_certfile.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pki.certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pki.client_certfile.write_bytes(client.public_bytes(serialization.Encoding.PEM))
    for path, private in ((pki.keyfile, key), (pki.client_keyfile, client_key)):
        path.write_bytes(_key_pem(private))
        path.chmod(0o600)
    return pki


def make_supernode_key(path: Path) -> Path:
    """An EC P-384 key pair for Flower's SuperNode authentication (what `ssh-keygen -t ecdsa
    -b 384` makes): the private key at `path` (OpenSSH format, for `flower-supernode
    --auth-supernode-private-key`) and its public key at `path`.pub (for `flwr supernode
    register`). Returns the public key's path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    public = path.with_name(path.name + ".pub")
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + b"\n"
    )
    return public
