"""Container entry point: `supernode`, `superlink`, `serverapp`, `expert-server` or `runtime`, configured by
environment (GEOMOE_LAT, GEOMOE_LON, GEOMOE_SUPERLINK, GEOMOE_TLS, GEOMOE_APPIO_PORT, GEOMOE_DATA, GEOMOE_MODEL: a
runtime's model, default /data/model.ts, GEOMOE_THREADS: its threads, default one per core) and the /data volume,
where `geomoe deploy up` puts the fleet's certificates (/data/certs) when TLS is on.

A SuperNode trains on the labelled images at GEOMOE_DATA (the fleet mounts the device's folder there). For a
trial without real images, GEOMOE_DEMO_DATA=1 first writes the synthetic world's images of the device's
location into that folder (`geomoe data export --format folders --at LAT,LON`), once."""

from __future__ import annotations

import os
import subprocess
import sys

CERTS = "/data/certs"
DEFAULT_SUPERLINK = "127.0.0.1:8000"  # flower-superlink's own default (one HTTP port for all its APIs)


def command(role: str, env: dict[str, str]) -> list[str]:
    tls = env.get("GEOMOE_TLS", "0") == "1"
    superlink = env.get("GEOMOE_SUPERLINK", DEFAULT_SUPERLINK)
    if role == "supernode":
        security = (
            ["--root-certificates", f"{CERTS}/ca.pem", "--auth-supernode-private-key", f"{CERTS}/device.auth"]
            if tls
            else ["--insecure"]
        )
        # The ClientApp API stays on loopback; its port differs only where several SuperNodes share a host.
        port = ["--port", env["GEOMOE_APPIO_PORT"]] if "GEOMOE_APPIO_PORT" in env else []
        node_config = f"lat={env['GEOMOE_LAT']} lon={env['GEOMOE_LON']}"
        if "GEOMOE_DATA" in env:
            node_config += f' data="{env["GEOMOE_DATA"]}"'
        return ["flower-supernode", *security, "--superlink", superlink, *port, "--node-config", node_config]
    if role == "superlink":
        security = (
            [
                "--ssl-ca-certfile",
                f"{CERTS}/ca.pem",
                "--ssl-certfile",
                f"{CERTS}/server.pem",
                "--ssl-keyfile",
                f"{CERTS}/server.key",
                "--enable-supernode-auth",
            ]
            if tls
            else ["--insecure"]
        )
        # It listens on the address the fleet's SuperNodes dial; ServerApps run in the `serverapp` container.
        host, _, port = superlink.rpartition(":")
        return [
            "flower-superlink",
            *security,
            "--isolation",
            "process",
            "--host",
            host.strip("[]"),
            "--port",
            port,
            "--database",
            "/data/superlink.db",
            "--disable-runtime-dependency-installation",
        ]
    if role == "serverapp":
        # Runs each submitted run's ServerApp (geomoe's, installed here) against the SuperLink's runtime API.
        security = ["--root-certificates", f"{CERTS}/ca.pem"] if tls else ["--insecure"]
        return ["flower-superexec", "--plugin-type", "serverapp", "--runtime-api-address", superlink, *security]
    if role == "expert-server":
        # Peers on the field LAN call it with the fleet's token; with TLS it presents its own server certificate.
        security = ["--token-file", f"{CERTS}/expert.token"]
        security += ["--cert", f"{CERTS}/server.pem", "--key", f"{CERTS}/server.key"] if tls else []
        serve = ["geomoe", "expert-server", "serve", "--model", "/data/model.pt", "--address", "0.0.0.0:50051"]
        return [*serve, "--name", env.get("GEOMOE_DEVICE", "expert-server"), *security]
    if role == "runtime":
        # `geomoe device run` as a module: the runtime-only image has the device commands and nothing they do not
        # import (no torch, no Flower), so not the whole `geomoe` command line.
        model = env.get("GEOMOE_MODEL", "/data/model.ts")
        files = ["--watch", "/data/images", "--model", model, "--results", "/data/results.jsonl"]
        threads = ["--threads", env["GEOMOE_THREADS"]] if "GEOMOE_THREADS" in env else []
        return [sys.executable, "-m", "geomoe.cli.device", "run", *files, *threads]
    raise SystemExit(f"unknown role {role!r}: use supernode, superlink, serverapp, expert-server or runtime")


def demo_data(env: dict[str, str]) -> None:
    """Write the synthetic images of this device's location into GEOMOE_DATA, unless already there."""
    folder = env["GEOMOE_DATA"]
    if os.path.isdir(folder) and os.listdir(folder):
        return
    staging = folder.rstrip("/") + ".export"
    at = f"{env['GEOMOE_LAT']},{env['GEOMOE_LON']}"
    subprocess.run(["geomoe", "data", "export", "--format", "folders", "--out", staging, "--at", at], check=True)
    (device,) = [d for d in os.listdir(staging) if os.path.isdir(os.path.join(staging, d))]
    os.replace(os.path.join(staging, device), folder)


def main() -> None:
    args = sys.argv[1:] or ["supernode"]
    if args[0] == "supernode" and os.environ.get("GEOMOE_DEMO_DATA") == "1" and "GEOMOE_DATA" in os.environ:
        demo_data(dict(os.environ))
    argv = command(args[0], dict(os.environ)) + args[1:]
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main()
