#!/usr/bin/env bash
# The images' base for machines that reach no container registry: Debian bookworm's python3 (3.11) from
# Debian's own packages, bootstrapped with debootstrap and imported into podman (or docker). It stands in
# for `python:3.11-slim-bookworm`, the Dockerfile's default base:
#
#   deploy/scripts/debian-base.sh                      # -> localhost/aevae-python:3.11-bookworm
#   podman build --build-arg PYTHON_IMAGE=localhost/aevae-python:3.11-bookworm ...   (make images does this)
#
# Needs root, debootstrap and a Debian mirror (MIRROR, default deb.debian.org). Takes about a minute.
# The rootfs carries python3, its venv module (with ensurepip) and the CA certificates; apt's lists and
# caches, docs, man pages and locales are removed.
set -euo pipefail

IMAGE="${1:-${AEVAE_BASE_IMAGE:-localhost/aevae-python:3.11-bookworm}}"
SUITE="${SUITE:-bookworm}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
ENGINE="${ENGINE:-$(command -v podman || command -v docker)}"

[ "$(id -u)" = 0 ] || { echo "debian-base.sh: debootstrap needs root" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "debian-base.sh: apt-get install debootstrap" >&2; exit 1; }

rootfs="$(mktemp -d /var/tmp/aevae-rootfs.XXXXXX)"
trap 'rm -rf "$rootfs"' EXIT
start=$(date +%s)
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  "$SUITE" "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1 || { tail -20 "$rootfs.log" >&2; exit 1; }
rm -f "$rootfs.log"
# What a container never needs: package caches and lists, documentation, locales other than C.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
       "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
       "$rootfs"/usr/share/locale/* "$rootfs"/var/log/*.log "$rootfs"/var/cache/debconf/*-old

quiet=(); [[ "$ENGINE" == *podman ]] && quiet=(--quiet)
tar --numeric-owner -C "$rootfs" -c . | "$ENGINE" import "${quiet[@]}" \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["python3"]' \
  --message "debootstrap --variant=minbase $SUITE + python3 python3-venv ca-certificates" \
  - "$IMAGE" >/dev/null
echo "debian-base.sh: $IMAGE from debootstrap $SUITE in $(( $(date +%s) - start )) s," \
     "$("$ENGINE" image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"
