#!/usr/bin/env bash
# Builds aevae's images with podman or docker, whichever works here (podman first), from the repository root:
#
#   deploy/scripts/images.sh                  # the lean targets: encoder decoder ui
#   deploy/scripts/images.sh trainer ray      # the torch targets (large; CPU torch from TORCH_INDEX)
#
# Each image is tagged aevae-<target>:<version from pyproject.toml>. The base is python:3.11-slim-bookworm
# when the engine has it or can pull it; otherwise (no registry reachable) a Debian bookworm base built by
# deploy/scripts/debian-base.sh (once; root and debootstrap needed). PYTHON_IMAGE=... picks a base outright.
# pip inside the build trusts the CA bundle pip trusts here (PIP_CERT, REQUESTS_CA_BUNDLE, SSL_CERT_FILE
# or Debian's bundle), passed as the build secret `pip-ca`, never stored in a layer.
# Prints one line per image: its size and how long its build took.
set -euo pipefail
cd "$(dirname "$0")/../.."

engine() {
  if command -v podman >/dev/null 2>&1; then echo podman
  elif command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then echo docker
  else echo "images.sh: neither podman nor a running docker engine found (apt-get install podman buildah runc)" >&2
       return 1
  fi
}
ENGINE="${ENGINE:-$(engine)}"
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(encoder decoder ui)
VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)"
DEFAULT_BASE=python:3.11-slim-bookworm
DEBIAN_BASE=localhost/aevae-python:3.11-bookworm

base_image() {
  if [ -n "${PYTHON_IMAGE:-}" ]; then echo "$PYTHON_IMAGE"; return; fi
  if "$ENGINE" image inspect "$DEFAULT_BASE" >/dev/null 2>&1 \
     || timeout 120 "$ENGINE" pull -q "$DEFAULT_BASE" >/dev/null 2>&1; then
    echo "$DEFAULT_BASE"; return
  fi
  if ! "$ENGINE" image inspect "$DEBIAN_BASE" >/dev/null 2>&1; then
    echo "images.sh: $DEFAULT_BASE cannot be pulled; building $DEBIAN_BASE from Debian's packages" >"$NOTE"
    ENGINE="$ENGINE" deploy/scripts/debian-base.sh "$DEBIAN_BASE" >>"$NOTE"
  fi
  echo "$DEBIAN_BASE"
}
NOTE="$(mktemp)"
trap 'rm -f "$NOTE"' EXIT
BASE="$(base_image)" || { cat "$NOTE" >&2; exit 1; }
cat "$NOTE"

ca_bundle() {
  for f in "${PIP_CA:-}" "${PIP_CERT:-}" "${REQUESTS_CA_BUNDLE:-}" "${SSL_CERT_FILE:-}" /etc/ssl/certs/ca-certificates.crt; do
    if [ -n "$f" ] && [ -s "$f" ]; then echo "$f"; return; fi
  done
}
REVISION="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
SOURCE_URL="$(git remote get-url origin 2>/dev/null || echo unknown)"
args=(--file deploy/docker/Dockerfile
      --build-arg "PYTHON_IMAGE=$BASE"
      --build-arg "VERSION=$VERSION"
      --build-arg "REVISION=$REVISION"
      --build-arg "CREATED=$CREATED"
      --build-arg "SOURCE_URL=$SOURCE_URL")
# podman (buildah 1.28) keys its layer cache by each step's text before the ARGs are substituted, and ignores
# --label when it finds one: an image built from cached steps kept the labels of the build that filled the cache
# (another checkout's revision, a date hours old). So when a built image's `created` is not this build's, the
# labels the Dockerfile takes from these ARGs are set again on top of it (buildah config + commit: no rebuild).
LABELS=(--label "org.opencontainers.image.version=$VERSION" --label "org.opencontainers.image.revision=$REVISION"
        --label "org.opencontainers.image.created=$CREATED" --label "org.opencontainers.image.source=$SOURCE_URL")
relabel() {
  local image="$1" created ctr
  created="$("$ENGINE" image inspect --format '{{index .Config.Labels "org.opencontainers.image.created"}}' "$image")"
  [ "$created" != "$CREATED" ] || return 0
  command -v buildah >/dev/null 2>&1 || {
    echo "images.sh: $image carries the labels of an earlier build (created $created): apt-get install buildah" >&2
    return 0; }
  ctr="$(buildah from --pull-never "$image")"
  buildah config "${LABELS[@]}" "$ctr"
  buildah commit --quiet --format docker --rm "$ctr" "$image" >/dev/null
}
[ -z "${TORCH_INDEX:-}" ] || args+=(--build-arg "TORCH_INDEX=$TORCH_INDEX")
ca="$(ca_bundle)"
[ -z "$ca" ] || args+=(--secret "id=pip-ca,src=$ca")
[ "$ENGINE" != docker ] || export DOCKER_BUILDKIT=1  # RUN --mount=type=secret
if [ "$ENGINE" = podman ]; then
  # chroot isolation: no nested runtime needed; docker format: keeps HEALTHCHECK (OCI drops it)
  args+=(--isolation chroot --format docker --ignorefile deploy/docker/Dockerfile.dockerignore)
fi

echo "images.sh: $ENGINE, base $BASE, targets ${TARGETS[*]}"
summary=()
for target in "${TARGETS[@]}"; do
  start=$(date +%s)
  log="$(mktemp /tmp/aevae-build-$target.XXXXXX.log)"
  if ! "$ENGINE" build "${args[@]}" --target "$target" --tag "aevae-$target:$VERSION" . >"$log" 2>&1; then
    tail -40 "$log" >&2
    echo "images.sh: building $target failed; the whole log: $log" >&2
    exit 1
  fi
  rm -f "$log"
  [ "$ENGINE" != podman ] || relabel "aevae-$target:$VERSION"
  seconds=$(( $(date +%s) - start ))
  size=$("$ENGINE" image inspect --format '{{.Size}}' "aevae-$target:$VERSION" | awk '{printf "%.0f MB", $1/1e6}')
  summary+=("$(printf 'aevae-%s:%s  %s  built in %d s' "$target" "$VERSION" "$size" "$seconds")")
  echo "${summary[-1]}"
done
