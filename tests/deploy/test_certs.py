"""The fleet CA and device keys: formats Flower and gRPC read, added devices keep the CA."""

import stat
import tomllib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from geomoe.deploy.certs import ensure_fleet_certs, issue, make_ca, write
from geomoe.deploy.fleet import registration_config
from geomoe.deploy.fleet_file import Fleet


def test_fleet_certs_once_then_devices_added(tmp_path):
    out = tmp_path / "certs"
    written = ensure_fleet_certs(out, ["127.0.0.1", "link.local"], ["cam-07"])
    assert len(written) == 3  # CA + SuperLink pair, the expert-server token, the device
    assert stat.S_IMODE((out / "expert.token").stat().st_mode) == 0o600 and len((out / "expert.token").read_text()) > 40
    ca = (out / "ca.pem").read_bytes()
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "link.local" in names.get_values_for_type(x509.DNSName)

    assert ensure_fleet_certs(out, ["127.0.0.1"], ["cam-07", "cam-08"]) == [
        "device cam-08: client and server certificates, SuperNode key"
    ]
    assert (out / "ca.pem").read_bytes() == ca  # devices that trust the CA keep trusting it
    device = x509.load_pem_x509_certificate((out / "devices" / "cam-08.pem").read_bytes())
    assert device.issuer == x509.load_pem_x509_certificate(ca).subject
    own_server = x509.load_pem_x509_certificate((out / "devices" / "cam-08-server.pem").read_bytes())
    assert own_server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName
    ) == ["cam-08"]  # an expert server presents its own certificate: no device carries the SuperLink's key
    assert (out / "devices" / "cam-08-server.key").read_bytes() != (out / "server.key").read_bytes()


def test_device_names_that_would_escape_the_folder_are_refused(tmp_path):
    with pytest.raises(ValueError, match="device name '../evil' must be"):
        ensure_fleet_certs(tmp_path, ["127.0.0.1"], ["../evil"])
    assert not (tmp_path / "ca.pem").exists()


def test_supernode_key_is_what_flower_reads(tmp_path):
    ensure_fleet_certs(tmp_path, ["127.0.0.1"], ["cam-07"])
    private_path = tmp_path / "devices" / "cam-07.auth"
    private = load_ssh_private_key(private_path.read_bytes(), None)  # flower-supernode --auth-supernode-private-key
    public = load_ssh_public_key((tmp_path / "devices" / "cam-07.auth.pub").read_bytes())  # flwr supernode register
    assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP384R1)
    assert public.public_numbers() == private.public_key().public_numbers()
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "devices" / "cam-07.key").stat().st_mode) == 0o600


def test_a_stale_world_readable_key_file_is_rewritten_owner_only(tmp_path):
    ca = make_ca()
    stale = tmp_path / "server.key"
    stale.write_bytes(b"old key")
    stale.chmod(0o644)
    write(issue(ca, "geomoe-server", ["127.0.0.1"]), tmp_path, "server")
    assert stat.S_IMODE(stale.stat().st_mode) == 0o600
    assert stale.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["server.key", "server.pem"]  # no partial file left


def test_the_registration_config_holds_only_the_fleets_superlink_whatever_its_values(tmp_path):
    fleet = Fleet("geomoe:latest", '127.0.0.1:9092"\ninsecure = true\n#', [], True, tmp_path)
    parsed = tomllib.loads(registration_config(fleet))
    assert parsed["superlink"]["fleet"] == {
        "address": '127.0.0.1:9092"\ninsecure = true\n#',  # a value, never a key
        "root-certificates": str((tmp_path / "ca.pem").resolve()),
    }
