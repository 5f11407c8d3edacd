#!/usr/bin/env bash
# Builds a Debian bookworm base image locally (debootstrap + docker import), for machines that reach
# Debian's mirror but no image registry. Usage: deploy/base_image.sh [TAG] [ARCH]
# The tag is passed to `docker build --build-arg BASE=TAG`. Does nothing if TAG already exists.
set -euo pipefail
TAG=${1:-geomoe-base:bookworm}
ARCH=${2:-amd64}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
if docker image inspect "$TAG" >/dev/null 2>&1; then
  echo "$TAG already present"
  exit 0
fi
ROOT=$(mktemp -d)
trap 'rm -rf "$ROOT"' EXIT
debootstrap --variant=minbase --arch="$ARCH" --include=ca-certificates,python3,python3-venv bookworm "$ROOT" "$MIRROR" >/dev/null
# The base trusts the same local CAs as this machine (a site proxy's, say), so apt and pip inside a
# build reach what the host reaches. Kept in usr/local/share so update-ca-certificates keeps them.
for cert in /usr/local/share/ca-certificates/*.crt; do
  [ -f "$cert" ] || continue
  cp "$cert" "$ROOT/usr/local/share/ca-certificates/"
  cat "$cert" >> "$ROOT/etc/ssl/certs/ca-certificates.crt"
done
tar -C "$ROOT" -c . | docker import --platform "linux/$ARCH" - "$TAG" >/dev/null
echo "built $TAG"
