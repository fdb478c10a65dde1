#!/usr/bin/env bash
# build-seaweedfs.sh - build SeaweedFS's `weed` from its Go module (through the Go module proxy).
#
# Its S3 gateway (`weed mini`) is the tests' second S3 implementation beside
# moto: the store contract suite runs on both (tests/conftest.py,
# seaweedfs_server). Optional: without Go, or if the build fails, this says so
# and exits 0, and those tests are skipped. Idempotent: nothing to do when the
# binary exists.
#
# Environment:
#   SEAWEEDFS_VERSION   module version (default: the one the tests were written against)
#   SEAWEEDFS_OUT       where the binary goes (default .cache/seaweedfs/weed)
set -euo pipefail

me="seaweedfs"
version="${SEAWEEDFS_VERSION:-v0.0.0-20261109003541-7506e5f91cd6}"
out="$(realpath -m "${SEAWEEDFS_OUT:-.cache/seaweedfs/weed}")"

if [ -x "$out" ]; then
  echo "$me: $out present"
  exit 0
fi
if ! command -v go >/dev/null 2>&1; then
  echo "$me: NOTE: no Go toolchain on PATH; the SeaweedFS contract tests will be skipped"
  exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "$me: building github.com/seaweedfs/seaweedfs@$version (a few minutes the first time)"
if ! src="$(go mod download -json "github.com/seaweedfs/seaweedfs@$version" 2>"$work/err" \
            | python3 -c 'import json, sys; print(json.load(sys.stdin)["Dir"])')"; then
  echo "$me: NOTE: could not download the module ($(tail -n 1 "$work/err")); SeaweedFS tests will be skipped" >&2
  exit 0
fi
# its go.mod has replace directives, so it must be built as the main module, from a copy
cp -r "$src/." "$work/src"
chmod -R u+w "$work/src"
mkdir -p "$(dirname "$out")"
if (cd "$work/src" && nice -n 10 go build -o "$out.tmp" ./weed) >"$work/build.log" 2>&1; then
  mv "$out.tmp" "$out"
  echo "$me: built $out ($("$out" version 2>/dev/null | head -n 1))"
else
  rm -f "$out.tmp"
  tail -n 5 "$work/build.log" >&2
  echo "$me: NOTE: the build failed; the SeaweedFS contract tests will be skipped" >&2
fi
