"""TLS and node-authentication material for a federation, made with ``cryptography``.

``fedcare certs init`` writes a certificate authority and the SuperLink's TLS
certificate (its host names and IP addresses as subject alternative names);
``fedcare certs site SITE_ID`` writes a site's node key pair in the format Flower's
SuperNode authentication expects: an OpenSSH-format NIST P-384 EC private key (given to
``flower-supernode --auth-supernode-private-key``) and its ``ecdsa-sha2-nistp384``
public key (registered with ``flwr supernode register``).

Private keys are written 0600; nothing is overwritten unless ``force`` is set.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import FedcareError

CA_CERT, CA_KEY = "ca.pem", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
CURVE = ec.SECP384R1  # Flower's node auth: a NIST curve; P-384 as in Flower's docs


class CertificateError(FedcareError):
    """Certificates or keys are missing, unreadable or do not belong together."""


@dataclass(frozen=True)
class ServerMaterial:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class SiteKeys:
    private_key: Path
    public_key: Path


# ---------------------------------------------------------------------------- writing
def _write(path: Path, data: bytes, private: bool, force: bool) -> None:
    if path.exists() and not force:
        raise CertificateError(f"{path} already exists; pass --force to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600 if private else 0o644)  # the umask may have narrowed it


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedcare"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(hosts: list[str], ips: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = [x509.DNSName(h) for h in hosts]
    for ip in ips:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError:
            raise CertificateError(f"--ip expects an IP address, got '{ip}'") from None
    if not names:
        raise CertificateError("give the SuperLink at least one --host NAME or --ip ADDRESS")
    return x509.SubjectAlternativeName(names)


def init_server(out: Path, hosts: list[str], ips: list[str], *, days: int = 825,
                force: bool = False) -> ServerMaterial:
    """Write a CA and a SuperLink TLS certificate signed by it into ``out``."""
    out = Path(out)
    paths = ServerMaterial(out / CA_CERT, out / CA_KEY, out / SERVER_CERT, out / SERVER_KEY)
    san = _san(list(hosts), list(ips))  # validate before writing anything
    if not force:
        for p in (paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key):
            if p.exists():
                raise CertificateError(f"{p} already exists; pass --force to overwrite it")
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    until = now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(CURVE())
    ca_name = _name("fedcare federation CA")
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(CURVE())
    common = hosts[0] if hosts else ips[0]
    server_cert = (
        x509.CertificateBuilder().subject_name(_name(common)).issuer_name(ca_name)
        .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(until)
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    pem = serialization.Encoding.PEM
    _write(paths.ca_key, _pem_key(ca_key), private=True, force=force)
    _write(paths.ca_cert, ca_cert.public_bytes(pem), private=False, force=force)
    _write(paths.server_key, _pem_key(server_key), private=True, force=force)
    _write(paths.server_cert, server_cert.public_bytes(pem), private=False, force=force)
    return paths


def create_site_keys(site_id: str, out: Path, *, force: bool = False) -> SiteKeys:
    """Write ``<out>/<site_id>`` (OpenSSH private key, 0600) and ``<site_id>.pub``."""
    if not site_id or "/" in site_id or site_id.startswith("."):
        raise CertificateError(f"site id '{site_id}' cannot be used as a file name")
    out = Path(out)
    keys = SiteKeys(out / site_id, out / f"{site_id}.pub")
    for p in (keys.private_key, keys.public_key):
        if p.exists() and not force:
            raise CertificateError(f"{p} already exists; pass --force to overwrite it")
    key = ec.generate_private_key(CURVE())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    _write(keys.private_key, private, private=True, force=force)
    _write(keys.public_key, public + f" {site_id}\n".encode(), private=False, force=force)
    return keys


# ---------------------------------------------------------------------------- checking
def _read(path: Path, what: str) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise CertificateError(f"{what} {path} does not exist")
    try:
        return path.read_bytes()
    except OSError as err:
        raise CertificateError(f"{what} {path} cannot be read: {err.strerror}") from None


def load_certificate(path: Path, what: str = "certificate") -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(_read(path, what))
    except ValueError:
        raise CertificateError(f"{what} {path} is not a PEM certificate") from None


def check_server_material(ca_cert: Path, server_cert: Path, server_key: Path) -> None:
    """Raise ``CertificateError`` naming the file unless the server certificate is
    signed by the CA, currently valid, and belongs to the private key."""
    ca = load_certificate(ca_cert, "CA certificate")
    cert = load_certificate(server_cert, "server certificate")
    try:
        key = serialization.load_pem_private_key(_read(server_key, "server key"), None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise CertificateError(f"server key {server_key} is not an unencrypted PEM private key") from None
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise CertificateError(f"server certificate {server_cert} is not signed by the CA {ca_cert}") from None
    if cert.public_key().public_numbers() != key.public_key().public_numbers():
        raise CertificateError(f"server key {server_key} does not belong to the certificate {server_cert}")
    now = dt.datetime.now(dt.timezone.utc)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise CertificateError(f"server certificate {server_cert} is expired or not yet valid")


def check_root_certificate(path: Path) -> None:
    cert = load_certificate(path, "root certificate")
    try:
        ok = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        ok = False
    if not ok:
        raise CertificateError(f"root certificate {path} is not a CA certificate")


def load_node_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The site's node key as Flower's SuperNode will read it."""
    try:
        key = serialization.load_ssh_private_key(_read(path, "node key"), None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise CertificateError(f"node key {path} is not an unencrypted OpenSSH private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"node key {path} is not an EC key (make one with `fedcare certs site`)")
    return key


def load_node_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_ssh_public_key(_read(path, "public key"))
    except (ValueError, UnsupportedAlgorithm):
        raise CertificateError(f"public key {path} is not an OpenSSH public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise CertificateError(f"public key {path} is not an EC key (make one with `fedcare certs site`)")
    return key


# ---------------------------------------------------------------------------- CLI
certs_app = typer.Typer(help="Create the federation's CA, SuperLink certificate and site keys.",
                        no_args_is_help=True)


@certs_app.command("init")
def init_cmd(
    out: Annotated[Path, typer.Option("--out", help="folder for ca.pem, ca.key, server.pem, server.key")],
    host: Annotated[list[str], typer.Option("--host", help="SuperLink host name (repeatable)")] = [],
    ip: Annotated[list[str], typer.Option("--ip", help="SuperLink IP address (repeatable)")] = [],
    days: Annotated[int, typer.Option(help="validity in days")] = 825,
    force: Annotated[bool, typer.Option("--force", help="overwrite existing files")] = False,
) -> None:
    """Create a CA and the SuperLink's TLS certificate."""
    m = init_server(out, host, ip, days=days, force=force)
    typer.echo(f"CA certificate:     {m.ca_cert}  (give this to every site)")
    typer.echo(f"CA key:             {m.ca_key}  (keep offline)")
    typer.echo(f"SuperLink cert/key: {m.server_cert}, {m.server_key}")


@certs_app.command("site")
def site_cmd(
    site_id: Annotated[str, typer.Argument(help="the site's id, e.g. hospital-a")],
    out: Annotated[Path, typer.Option("--out", help="folder for SITE_ID and SITE_ID.pub")],
    force: Annotated[bool, typer.Option("--force", help="overwrite existing files")] = False,
) -> None:
    """Create a site's node key pair for SuperNode authentication."""
    keys = create_site_keys(site_id, out, force=force)
    typer.echo(f"private key: {keys.private_key}  (stays at the site, 0600)")
    typer.echo(f"public key:  {keys.public_key}  (send to the coordinator)")
