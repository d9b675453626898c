"""Certificates and node keys: formats Flower accepts, permissions, no silent overwrite."""
import ssl
import stat
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

from fedcare.certs import (CertificateError, certs_app, check_root_certificate, check_server_material,
                           create_site_keys, init_server, load_certificate, load_node_private_key,
                           load_node_public_key)


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_server_material_has_sans_chain_and_private_keys_0600(tmp_path):
    m = init_server(tmp_path, ["superlink.hospital.org", "localhost"], ["127.0.0.1", "10.0.0.5"])
    cert = load_certificate(m.server_cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["superlink.hospital.org", "localhost"]
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "10.0.0.5"]
    assert mode(m.ca_key) == 0o600 and mode(m.server_key) == 0o600
    assert mode(m.ca_cert) == 0o644
    check_server_material(m.ca_cert, m.server_cert, m.server_key)
    check_root_certificate(m.ca_cert)
    # Python's TLS stack (uvicorn, Flower's HTTP clients) accepts the pair and the CA
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(m.server_cert, m.server_key)
    client = ssl.create_default_context(cafile=str(m.ca_cert))
    assert client.cert_store_stats()["x509_ca"] == 1


def test_mismatched_material_is_named(tmp_path):
    a = init_server(tmp_path / "a", ["localhost"], [])
    b = init_server(tmp_path / "b", ["localhost"], [])
    with pytest.raises(CertificateError, match="not signed by the CA"):
        check_server_material(b.ca_cert, a.server_cert, a.server_key)
    with pytest.raises(CertificateError, match="does not belong"):
        check_server_material(a.ca_cert, a.server_cert, b.server_key)
    with pytest.raises(CertificateError, match="does not exist"):
        check_server_material(a.ca_cert, tmp_path / "nope.pem", a.server_key)
    with pytest.raises(CertificateError, match="not a CA"):
        check_root_certificate(a.server_cert)
    with pytest.raises(CertificateError, match="IP address"):
        init_server(tmp_path / "c", [], ["not-an-ip"])
    assert not (tmp_path / "c").exists()


def test_site_keys_are_openssh_p384_as_flower_reads_them(tmp_path):
    keys = create_site_keys("hospital-a", tmp_path)
    assert mode(keys.private_key) == 0o600
    pub_text = keys.public_key.read_text()
    assert pub_text.startswith("ecdsa-sha2-nistp384 ")
    priv = load_node_private_key(keys.private_key)
    assert isinstance(priv.curve, ec.SECP384R1)
    assert load_node_public_key(keys.public_key).public_numbers() == priv.public_key().public_numbers()
    # exactly the loaders Flower uses: `flwr supernode register` and flower-supernode
    code = (
        "import sys; from pathlib import Path\n"
        "from flwr.cli.supernode.register import try_load_public_key\n"
        "from cryptography.hazmat.primitives.serialization import load_ssh_private_key\n"
        "assert try_load_public_key(Path(sys.argv[1]))\n"
        "load_ssh_private_key(Path(sys.argv[2]).read_bytes(), None)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(keys.public_key), str(keys.private_key)], check=True)


def test_nothing_is_overwritten_without_force(tmp_path):
    keys = create_site_keys("s1", tmp_path)
    before = keys.private_key.read_bytes()
    with pytest.raises(CertificateError, match="--force"):
        create_site_keys("s1", tmp_path)
    assert keys.private_key.read_bytes() == before
    again = create_site_keys("s1", tmp_path, force=True)
    assert again.private_key.read_bytes() != before and mode(again.private_key) == 0o600
    m = init_server(tmp_path / "tls", ["localhost"], [])
    ca = m.ca_cert.read_bytes()
    with pytest.raises(CertificateError, match="already exists"):
        init_server(tmp_path / "tls", ["localhost"], [])
    assert m.ca_cert.read_bytes() == ca
    with pytest.raises(CertificateError):
        create_site_keys("../evil", tmp_path)


def test_cli(tmp_path):
    runner = CliRunner()
    r = runner.invoke(certs_app, ["init", "--out", str(tmp_path), "--host", "localhost", "--ip", "127.0.0.1"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "ca.pem").exists() and (tmp_path / "server.key").exists()
    r = runner.invoke(certs_app, ["site", "hospital-b", "--out", str(tmp_path / "keys")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(certs_app, ["site", "hospital-b", "--out", str(tmp_path / "keys")])
    assert r.exit_code != 0 and isinstance(r.exception, CertificateError)
