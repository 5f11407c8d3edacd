#!/usr/bin/env bash
# Builds a Debian bookworm base image locally (debootstrap + docker load), for machines that reach
# Debian's mirror but no image registry. Usage: deploy/base_image.sh [TAG] [ARCH]
# The tag is passed to `docker build --build-arg BASE=TAG`. Does nothing if TAG already exists.
# DEBIAN_MIRROR names a mirror; without it debootstrap uses its own default.
set -euo pipefail
TAG=${1:-geomoe-base:bookworm}
ARCH=${2:-amd64}
MIRROR=(${DEBIAN_MIRROR:+"$DEBIAN_MIRROR"})
if docker image inspect "$TAG" >/dev/null 2>&1; then
  echo "$TAG already present"
  exit 0
fi
ROOT=$(mktemp -d)
trap 'rm -rf "$ROOT"' EXIT
debootstrap --variant=minbase --arch="$ARCH" --include=ca-certificates,python3,python3-venv bookworm "$ROOT" "${MIRROR[@]}" >/dev/null
# What Debian's own slim images leave out: apt's package cache and lists (a build runs apt-get update
# anyway), and documentation and translations, now and in every package installed later. Halves the base.
rm -rf "$ROOT"/var/cache/apt/* "$ROOT"/var/lib/apt/lists/* "$ROOT"/usr/share/doc/* "$ROOT"/usr/share/man/* \
  "$ROOT"/usr/share/info/*
find "$ROOT"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
cat >"$ROOT/etc/dpkg/dpkg.cfg.d/geomoe-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
# The base trusts the same local CAs as this machine (a site proxy's, say), so apt and pip inside a
# build reach what the host reaches. Kept in usr/local/share so update-ca-certificates keeps them.
for cert in /usr/local/share/ca-certificates/*.crt; do
  [ -f "$cert" ] || continue
  cp "$cert" "$ROOT/usr/local/share/ca-certificates/"
  cat "$cert" >> "$ROOT/etc/ssl/certs/ca-certificates.crt"
done
# `docker load` of a one-layer image archive rather than `docker import`, which (in Debian's
# docker.io 20.10) records the host's architecture whatever --platform says; an arm64 base must say
# arm64, or builds for linux/arm64 refuse it.
ARCHIVE=$(mktemp -d)
trap 'rm -rf "$ROOT" "$ARCHIVE"' EXIT
tar -C "$ROOT" --numeric-owner -cf "$ARCHIVE/layer.tar" .
LAYER=$(sha256sum "$ARCHIVE/layer.tar" | cut -d' ' -f1)
printf '{"architecture":"%s","os":"linux","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["/bin/bash"]},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
  "$ARCH" "$LAYER" >"$ARCHIVE/config.json"
CONFIG=$(sha256sum "$ARCHIVE/config.json" | cut -d' ' -f1)
mv "$ARCHIVE/config.json" "$ARCHIVE/$CONFIG.json"
printf '[{"Config":"%s.json","RepoTags":["%s"],"Layers":["layer.tar"]}]' "$CONFIG" "$TAG" >"$ARCHIVE/manifest.json"
tar -C "$ARCHIVE" -cf - manifest.json "$CONFIG.json" layer.tar | docker load >/dev/null
echo "built $TAG"
