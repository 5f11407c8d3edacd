"""Container entry point: `supernode`, `superlink`, `serverapp`, `expert-server` or `runtime`, configured by
environment (GEOMOE_LAT, GEOMOE_LON, GEOMOE_SUPERLINK, GEOMOE_TLS, GEOMOE_APPIO_PORT) and the /data
volume, where `geomoe deploy up` puts the fleet's certificates (/data/certs) when TLS is on."""

from __future__ import annotations

import os
import sys

CERTS = "/data/certs"
DEFAULT_SUPERLINK = "127.0.0.1:8000"  # flower-superlink's own default (one HTTP port for all its APIs)

COMMANDS = {
    "runtime": [
        "geomoe",
        "device",
        "run",
        "--watch",
        "/data/images",
        "--model",
        "/data/model.ts",
        "--results",
        "/data/results.jsonl",
    ],
}


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
        return [
            "flower-supernode",
            *security,
            "--superlink",
            superlink,
            *port,
            "--node-config",
            f"lat={env['GEOMOE_LAT']} lon={env['GEOMOE_LON']}",
        ]
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
        # Peers on the field LAN call it; with TLS it presents the fleet CA's server certificate.
        security = ["--cert", f"{CERTS}/server.pem", "--key", f"{CERTS}/server.key"] if tls else []
        serve = ["geomoe", "expert-server", "serve", "--model", "/data/model.pt", "--address", "0.0.0.0:50051"]
        return [*serve, "--name", env.get("GEOMOE_DEVICE", "expert-server"), *security]
    if role in COMMANDS:
        return COMMANDS[role]
    raise SystemExit(f"unknown role {role!r}: use supernode, superlink, serverapp, expert-server or runtime")


def main() -> None:
    args = sys.argv[1:] or ["supernode"]
    argv = command(args[0], dict(os.environ)) + args[1:]
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main()
