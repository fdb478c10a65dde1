#!/usr/bin/env bash
# ensure-base-image.sh - make sure the Docker base image (default python:3.11-slim)
# exists locally, without Docker Hub.
#
# This machine reaches PyPI and Debian's archive but no container registry, so
# `FROM python:3.11-slim` cannot be pulled. Instead we debootstrap a minimal
# Debian bookworm (whose python3 is 3.11) and `docker import` it under that tag,
# made to behave like the official image for an ordinary Dockerfile:
#   - `python` / `pip` on PATH (symlinks in /usr/local/bin to python3 / pip3)
#   - EXTERNALLY-MANAGED removed, so `pip install -r requirements.txt` works
#   - the host's CA bundle and local CAs (a TLS-intercepting egress proxy may
#     need them) and the host /etc/pip.conf (points pip at that bundle), so
#     pip reaches PyPI from inside containers and builds
#   - apt sources for bookworm, -updates and -security; apt lists/caches cleaned
#   - label mlflowctl.base=1
#
# Idempotent: does nothing if the tag exists. The rootfs tarball is cached in
# $MLFLOWCTL_CACHE_DIR (default /var/cache/mlflowctl) so a lost image is
# re-imported in seconds instead of re-debootstrapped (~1-2 min).
#
# Environment:
#   BASE_IMAGE            tag to provide (default python:3.11-slim)
#   BASE_SUITE            Debian suite (default bookworm -> Python 3.11)
#   DEBIAN_MIRROR         mirror (default: first URI in the host's apt sources,
#                         else http://deb.debian.org/debian)
#   MLFLOWCTL_CACHE_DIR   rootfs tarball cache (default /var/cache/mlflowctl)
#   BASE_IMAGE_REBUILD=1  ignore the cached tarball and re-debootstrap
set -euo pipefail

me="ensure-base-image"
say() { echo "$me: $*"; }
die() { echo "$me: ERROR: $*" >&2; exit 1; }

# Bump when the recipe below changes, so cached tarballs are not reused.
RECIPE=1
BASE_IMAGE="${BASE_IMAGE:-python:3.11-slim}"
SUITE="${BASE_SUITE:-bookworm}"
CACHE_DIR="${MLFLOWCTL_CACHE_DIR:-/var/cache/mlflowctl}"
INCLUDE="python3,python3-pip,python3-venv,ca-certificates"
IMAGE_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
HOST_BUNDLE=/etc/ssl/certs/ca-certificates.crt
export DEBIAN_FRONTEND=noninteractive
export PATH="$PATH:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

command -v docker >/dev/null 2>&1 || die "docker client not found; run scripts/ensure-docker.sh first"
timeout 20 docker info >/dev/null 2>&1 || die "Docker daemon not reachable; run scripts/ensure-docker.sh first"

have_image() { docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; }
if have_image; then
  say "$BASE_IMAGE present"
  exit 0
fi

[ "$(id -u)" -eq 0 ] || die "building $BASE_IMAGE needs root (debootstrap); run as root, e.g. sudo $0"

mkdir -p "$CACHE_DIR"
exec 9>"$CACHE_DIR/.lock"
flock -w 1800 9 || die "timed out waiting for another $me run (lock $CACHE_DIR/.lock)"
if have_image; then say "$BASE_IMAGE present (built by a concurrent run)"; exit 0; fi

start=$SECONDS
tarball="$CACHE_DIR/rootfs-$SUITE-python3-r$RECIPE.tar"

import_tarball() {
  say "importing $tarball as $BASE_IMAGE"
  docker import \
    --change "ENV PATH=$IMAGE_PATH" \
    --change 'ENV LANG=C.UTF-8' \
    --change "ENV SSL_CERT_FILE=$HOST_BUNDLE" \
    --change "ENV REQUESTS_CA_BUNDLE=$HOST_BUNDLE" \
    --change 'LABEL mlflowctl.base=1' \
    --change "LABEL mlflowctl.base.suite=$SUITE" \
    --change 'CMD ["python3"]' \
    --message "mlflowctl: debootstrap $SUITE minbase + python3 (scripts/ensure-base-image.sh)" \
    - "$BASE_IMAGE" <"$tarball" >/dev/null
}

if [ -s "$tarball" ] && [ "${BASE_IMAGE_REBUILD:-0}" != 1 ]; then
  import_tarball
else
  # ---- build the rootfs with debootstrap ----
  if ! command -v debootstrap >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || die "debootstrap missing and no apt-get to install it"
    say "installing debootstrap"
    apt=(apt-get -y -q -o DPkg::Lock::Timeout=300)
    apt_log="$(mktemp -t mlflowctl-apt.XXXXXX)"  # never a fixed /tmp name: this runs as root
    "${apt[@]}" install --no-install-recommends debootstrap >"$apt_log" 2>&1 || {
      "${apt[@]}" update >>"$apt_log" 2>&1 || true
      "${apt[@]}" install --no-install-recommends debootstrap >>"$apt_log" 2>&1 \
        || { tail -n 15 "$apt_log" >&2; die "apt-get install debootstrap failed (log: $apt_log)"; }
    }
    rm -f "$apt_log"
  fi

  mirror="${DEBIAN_MIRROR:-}"
  if [ -z "$mirror" ]; then
    # Prefer the mirror the host's apt already uses (reachable by definition).
    mirror="$(grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null \
                | awk '{print $2}' | grep -E '/debian/?$' | head -n1 || true)"
    [ -n "$mirror" ] || mirror="$(grep -hsE '^deb ' /etc/apt/sources.list 2>/dev/null \
                | awk '{print $2}' | grep -E '/debian/?$' | head -n1 || true)"
    [ -n "$mirror" ] || mirror=http://deb.debian.org/debian
  fi

  rootfs="$(mktemp -d /var/tmp/mlflowctl-rootfs.XXXXXX)"
  cleanup() {
    local m
    # debootstrap may leave proc/sys/dev mounts behind when it fails.
    for m in dev/pts dev proc sys; do
      mountpoint -q "$rootfs/$m" 2>/dev/null && umount -l "$rootfs/$m" 2>/dev/null || true
    done
    rm -rf --one-file-system "$rootfs" "$tarball.partial"
  }
  trap cleanup EXIT

  say "debootstrap $SUITE (minbase + $INCLUDE) from $mirror into $rootfs"
  boot_log="$(mktemp -t mlflowctl-debootstrap.XXXXXX)"
  if ! debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$rootfs" "$mirror" \
        >"$boot_log" 2>&1; then
    tail -n 20 "$boot_log" >&2
    [ -f "$rootfs/debootstrap/debootstrap.log" ] && tail -n 20 "$rootfs/debootstrap/debootstrap.log" >&2
    die "debootstrap failed (log: $boot_log); check that $mirror is reachable"
  fi
  rm -f "$boot_log"
  say "debootstrap done after $((SECONDS - start))s; customising"

  # python / pip like the official image
  ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python"
  ln -sf /usr/bin/pip3 "$rootfs/usr/local/bin/pip"
  [ -x "$rootfs/usr/bin/python3-config" ] && ln -sf /usr/bin/python3-config "$rootfs/usr/local/bin/python-config"
  # PEP 668 marker: the official image has none, so plain `pip install` works.
  rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED

  # CA certificates: the host bundle (may include an egress proxy's CA), and the
  # host's local CAs so a later update-ca-certificates in a Dockerfile keeps them.
  if [ -s "$HOST_BUNDLE" ]; then
    cp "$HOST_BUNDLE" "$rootfs/etc/ssl/certs/ca-certificates.crt"
  fi
  if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
    mkdir -p "$rootfs/usr/local/share/ca-certificates"
    cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
  fi
  # pip config: keep only settings whose file paths exist inside the image
  # (the host's /etc/pip.conf sets `cert = <bundle>`; local find-links/index
  # directories of the host would not exist in a container).
  if [ -f /etc/pip.conf ]; then
    awk -v root="$rootfs" '
      /^[[:space:]]*[A-Za-z_-]+[[:space:]]*=/ {
        v = $0; sub(/^[^=]*=[[:space:]]*/, "", v); sub(/[[:space:]]+$/, "", v)
        if (v ~ /^\// && system("test -e \"" root v "\"") != 0) { print "# (dropped, path not in image) " $0; next }
        if (v ~ /^file:\/\//) { print "# (dropped, host-local) " $0; next }
      }
      { print }' /etc/pip.conf >"$rootfs/etc/pip.conf"
  else
    printf '[global]\ncert = %s\n' "$HOST_BUNDLE" >"$rootfs/etc/pip.conf"
  fi

  # apt sources like the official image (so `apt-get update && apt-get install`
  # in a Dockerfile works), with the mirror that worked here.
  cat >"$rootfs/etc/apt/sources.list" <<SRC
deb $mirror $SUITE main
deb $mirror $SUITE-updates main
deb ${mirror%/debian*}/debian-security $SUITE-security main
SRC

  # Smaller image: no package caches / lists, no docs, no host-specific files.
  rm -rf "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
         "$rootfs"/var/cache/apt/archives/partial/* "$rootfs"/var/lib/apt/lists/* \
         "$rootfs"/var/log/*.log "$rootfs"/var/log/apt/* "$rootfs"/debootstrap \
         "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/* \
         "$rootfs"/tmp/* "$rootfs"/root/.cache
  find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete 2>/dev/null || true
  find "$rootfs" -xdev -name __pycache__ -type d -prune -exec rm -rf {} + 2>/dev/null || true
  : >"$rootfs/etc/resolv.conf"
  : >"$rootfs/etc/hostname"

  say "packing rootfs into $tarball"
  tar --numeric-owner --xattrs -C "$rootfs" \
      --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' --exclude='./run/*' \
      -cf "$tarball.partial" .
  mv "$tarball.partial" "$tarball"
  cleanup
  trap - EXIT
  import_tarball
fi

# Quick offline sanity check of the result.
if ! out="$(docker run --rm --network none "$BASE_IMAGE" \
        python -c 'import sys, venv, ssl, pip; print(sys.version.split()[0], ssl.OPENSSL_VERSION)' 2>&1)"; then
  echo "$out" >&2
  docker image rm "$BASE_IMAGE" >/dev/null 2>&1 || true
  die "the imported $BASE_IMAGE does not run python; removed it (BASE_IMAGE_REBUILD=1 forces a fresh debootstrap)"
fi
say "$BASE_IMAGE ready after $((SECONDS - start))s (Python $out; $(docker image inspect -f '{{.Size}}' "$BASE_IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
