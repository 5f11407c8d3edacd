"""A small certificate authority for a camera-trap fleet: one CA, a server certificate for the
SuperLink / expert servers, and one certificate per device. Everything on loopback or the fleet's
own names; keys never leave the folder they are written to (mode 0600)."""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass
class Issued:
    """PEM bytes of a certificate and its private key."""

    certificate: bytes
    private_key: bytes


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_ca(name: str = "geomoe fleet CA", days: int = 3650) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return Issued(certificate.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def issue(ca: Issued, name: str, hosts: list[str], server: bool = True, days: int = 825) -> Issued:
    """A certificate for `name`, valid for `hosts` (DNS names or IP addresses), signed by `ca`."""
    ca_cert = x509.load_pem_x509_certificate(ca.certificate)
    ca_key = serialization.load_pem_private_key(ca.private_key, password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    alt_names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt_names.append(x509.DNSName(host))
    now = datetime.datetime.now(datetime.UTC)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return Issued(certificate.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def write_private(path: Path, data: bytes) -> None:
    """`data` into `path`, readable by its owner only whatever the file was before (a stale 0644 key file keeps its
    mode through `touch(mode=...)` and `write_bytes`): written to a new 0600 file, then renamed over it."""
    partial = path.with_name(f".{path.name}.partial")
    partial.unlink(missing_ok=True)
    handle = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(handle, "wb") as out:
        os.fchmod(out.fileno(), 0o600)  # whatever the umask
        out.write(data)
    os.replace(partial, path)


def write(issued: Issued, folder: Path, stem: str) -> tuple[Path, Path]:
    """`stem.pem` and `stem.key` (0600) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / f"{stem}.pem", folder / f"{stem}.key"
    cert_path.write_bytes(issued.certificate)
    write_private(key_path, issued.private_key)
    return cert_path, key_path


def make_auth_key() -> Issued:
    """A SuperNode authentication key pair: OpenSSH private key and public line (NIST P-384), the
    formats `flower-supernode --auth-supernode-private-key` and `flwr supernode register` read.
    `certificate` holds the public line: it is what the SuperLink registers."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return Issued(public + b"\n", private)


def device_auth_key(certs: Path, name: str) -> tuple[Path, Path]:
    """Where a device's SuperNode key pair lives in a fleet's certs folder: private, public."""
    return certs / "devices" / f"{name}.auth", certs / "devices" / f"{name}.auth.pub"


def write_auth_key(pair: Issued, certs: Path, name: str) -> None:
    """The device's key pair at `device_auth_key` (private 0600)."""
    private_path, public_path = device_auth_key(certs, name)
    private_path.parent.mkdir(parents=True, exist_ok=True)
    write_private(private_path, pair.private_key)
    public_path.write_bytes(pair.certificate)


def read(folder: Path, stem: str) -> Issued:
    return Issued((folder / f"{stem}.pem").read_bytes(), (folder / f"{stem}.key").read_bytes())


DEVICE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")  # names become file, container and volume names
RESERVED_NAMES = frozenset({"localhost", "superlink", "serverapp", "geomoe-server", "link", "server", "ca"})
EXPERT_TOKEN = "expert.token"  # the fleet's shared token for expert servers (callers send it, servers check it)


def check_device_name(name: str) -> str:
    """`name` if it is safe as a file, container and volume name (lowercase letters, digits, '-') and as the name
    in a certificate every SuperNode trusts: not `localhost`, not a name of the link (`superlink`, `serverapp`,
    `geomoe-server`), not all digits and dashes (an address to some resolvers); else an error."""
    if not DEVICE_NAME.match(name):
        raise ValueError(f"device name {name!r} must be 1-63 lowercase letters, digits or '-', starting with one "
                         "of the first two")  # fmt: skip
    if name in RESERVED_NAMES or name.startswith("localhost") or not re.search(r"[a-z]", name):
        raise ValueError(f"device name {name!r} is reserved: a certificate for it would pass for the link machine or "
                         "this host; choose another")  # fmt: skip
    return name


def device_server_pair(certs: Path, name: str) -> tuple[Path, Path]:
    """Where a device's own server certificate and key live (expert servers present these, never the SuperLink's)."""
    return certs / "devices" / f"{name}-server.pem", certs / "devices" / f"{name}-server.key"


def ensure_fleet_certs(out: Path, server_hosts: list[str], devices: list[str]) -> list[str]:
    """The fleet's CA, the SuperLink's server certificate and the expert-server token (made once, never
    replaced: devices trust them) and, for each device not yet issued, a client certificate, its own server
    certificate (for the name it is dialled by) and a SuperNode authentication key pair. Rerunning with a new
    device name adds that device only. Returns what was written."""
    for name in devices:
        check_device_name(name)
    written = []
    if (out / "ca.pem").exists():
        ca = read(out, "ca")
    else:
        ca = make_ca()
        write(ca, out, "ca")
        write(issue(ca, "geomoe-server", server_hosts), out, "server")
        written.append(f"CA and server certificate for {', '.join(server_hosts)}")
    token = out / EXPERT_TOKEN
    if not token.exists():
        write_private(token, (secrets.token_urlsafe(32) + "\n").encode())
        written.append("expert-server token")
    for name in devices:
        if device_auth_key(out, name)[0].exists():
            continue
        write(issue(ca, name, [name], server=False), out / "devices", name)
        write(issue(ca, name, [name], server=True), out / "devices", f"{name}-server")
        write_auth_key(make_auth_key(), out, name)
        written.append(f"device {name}: client and server certificates, SuperNode key")
    return written
