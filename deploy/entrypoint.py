"""Container entry point: `supernode`, `expert-server`, `runtime` or `superlink`, configured by
environment (GEOMOE_LAT, GEOMOE_LON, GEOMOE_SUPERLINK, GEOMOE_TLS) and the /data volume."""

from __future__ import annotations

import os
import sys

COMMANDS = {
    "expert-server": ["geomoe", "expert-server", "serve", "--model", "/data/model.pt", "--address", "0.0.0.0:50051"],
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
    if role == "supernode":
        security = (
            ["--root-certificates", "/data/certs/ca.pem", "--auth-supernode-private-key", "/data/certs/device.key"]
            if tls
            else ["--insecure"]
        )
        return [
            "flower-supernode",
            *security,
            "--superlink",
            env.get("GEOMOE_SUPERLINK", "127.0.0.1:9092"),
            "--node-config",
            f"lat={env['GEOMOE_LAT']} lon={env['GEOMOE_LON']}",
        ]
    if role == "superlink":
        security = (
            [
                "--ssl-ca-certfile",
                "/data/certs/ca.pem",
                "--ssl-certfile",
                "/data/certs/server.pem",
                "--ssl-keyfile",
                "/data/certs/server.key",
                "--enable-supernode-auth",
            ]
            if tls
            else ["--insecure"]
        )
        return ["flower-superlink", *security, "--disable-runtime-dependency-installation"]
    if role in COMMANDS:
        return COMMANDS[role]
    raise SystemExit(f"unknown role {role!r}: use supernode, superlink, expert-server or runtime")


def main() -> None:
    args = sys.argv[1:] or ["supernode"]
    argv = command(args[0], dict(os.environ)) + args[1:]
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main()
