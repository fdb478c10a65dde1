#!/usr/bin/env bash
# build-seaweedfs.sh - build SeaweedFS's `weed` from its Go module (through the Go module proxy).
#
# Its S3 gateway (`weed mini`) is the tests' second S3 implementation beside
# moto: the store contract suite runs on both (tests/conftest.py,
# seaweedfs_server). Optional on a workstation: without Go, or if the build
# fails, this says so and exits 0, and those tests are skipped. Under CI (CI
# set) either is a failure (exit 1): nothing may be skipped there. Idempotent:
# the binary is built once per version into the machine's cache
# ($MLFLOWCTL_CACHE_DIR, default /var/cache/mlflowctl, with Go's caches beside
# the other Go builds) and linked as .cache/seaweedfs/weed for the tests.
#
# Environment:
#   SEAWEEDFS_VERSION   module version (default: the one the tests were written against)
#   SEAWEEDFS_OUT       where the tests find the binary (default .cache/seaweedfs/weed)
set -euo pipefail

me="seaweedfs"
version="${SEAWEEDFS_VERSION:-v0.0.0-20261109003541-7506e5f91cd6}"
out="$(realpath -m -s "${SEAWEEDFS_OUT:-.cache/seaweedfs/weed}")"  # -s: the link itself, not the binary
cache="${MLFLOWCTL_CACHE_DIR:-/var/cache/mlflowctl}"
built="$cache/seaweedfs/$version/weed"
export GOMODCACHE="$cache/go/mod" GOCACHE="$cache/go/build"

give_up() {  # a workstation skips the SeaweedFS tests; CI must not
  echo "$me: NOTE: $1; the SeaweedFS contract tests will be skipped" >&2
  [ -z "${CI:-}" ] || { echo "$me: under CI that is a failure (the tests must not skip)" >&2; exit 1; }
  exit 0
}

link() { mkdir -p "$(dirname "$out")"; ln -sfn "$built" "$out"; }

if [ -x "$built" ]; then
  link
  echo "$me: $built present (linked as $out)"
  exit 0
fi
command -v go >/dev/null 2>&1 || give_up "no Go toolchain on PATH"
mkdir -p "$(dirname "$built")" || give_up "cannot create $(dirname "$built") (run as root or set MLFLOWCTL_CACHE_DIR)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "$me: building github.com/seaweedfs/seaweedfs@$version (a few minutes the first time)"
src="$(go mod download -json "github.com/seaweedfs/seaweedfs@$version" 2>"$work/err" \
       | python3 -c 'import json, sys; print(json.load(sys.stdin)["Dir"])')" \
  || give_up "could not download the module ($(tail -n 1 "$work/err"))"
# its go.mod has replace directives, so it must be built as the main module, from a copy
cp -r "$src/." "$work/src"
chmod -R u+w "$work/src"
if (cd "$work/src" && nice -n 10 go build -o "$built.tmp" ./weed) >"$work/build.log" 2>&1; then
  mv "$built.tmp" "$built"
  link
  echo "$me: built $built ($("$built" version 2>/dev/null | head -n 1)), linked as $out"
else
  rm -f "$built.tmp"
  tail -n 5 "$work/build.log" >&2
  give_up "the build failed"
fi
