#!/usr/bin/env bash
# The real Kubeflow training operator (TFJob scheme only) beside the test cluster's control plane.
#
#   scripts/ensure-tfjob-operator.sh [up]   build it once from its Go module (cached), apply the TFJob CRD
#                                          from the same module, start it (idempotent)
#   scripts/ensure-tfjob-operator.sh down   stop it (the CRD stays; `make cluster-down` stops it too)
#   scripts/ensure-tfjob-operator.sh status
#
# Built with the Go module proxy only: github.com/kubeflow/training-operator@$TRAINING_OPERATOR_VERSION,
# binary cmd/training-operator.v1, into $CACHE/go/bin/training-operator-<version> (about 4.5 minutes the
# first time on 2 cores). Runs as a process (like kube-scheduler), KUBECONFIG the cluster's admin one,
# metrics and health bound to 127.0.0.1. Log: $STATE/logs/training-operator.log.
set -euo pipefail
umask 022
me="ensure-tfjob-operator"
STATE="${MLFLOWCTL_CLUSTER_DIR:-/var/lib/mlflowctl/cluster}"
CACHE="${MLFLOWCTL_CACHE_DIR:-/var/cache/mlflowctl}"
VERSION="${TRAINING_OPERATOR_VERSION:-v1.7.0}"
MODULE=github.com/kubeflow/training-operator
KUBECONFIG_ADMIN="$STATE/admin.kubeconfig"
BINARY="$CACHE/go/bin/training-operator-$VERSION"
PIDFILE="$STATE/run/training-operator.pid"
LOG="$STATE/logs/training-operator.log"
export PATH="$PATH:/usr/local/go/bin"
# shellcheck source=lib-beside.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib-beside.sh"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

build() {
  [ -x "$BINARY" ] && return 0
  command -v go >/dev/null || die "go not found (apt-get install golang-go, or /usr/local/go)"
  local gobin; gobin="$(mktemp -d "$CACHE/go/.bin-XXXXXX")"
  say "building $MODULE/cmd/training-operator.v1@$VERSION (cached in $BINARY)"
  GOBIN="$gobin" GOMODCACHE="$CACHE/go/mod" GOCACHE="$CACHE/go/build" GOFLAGS=-mod=mod GOTOOLCHAIN=local \
    go install "$MODULE/cmd/training-operator.v1@$VERSION" || { rm -rf "$gobin"; die "go install failed (above)"; }
  mv "$gobin/training-operator.v1" "$BINARY"
  rm -rf "$gobin"
}

up() {
  [ -r "$KUBECONFIG_ADMIN" ] || die "no test cluster ($KUBECONFIG_ADMIN missing): make cluster"
  mkdir -p "$CACHE/go/bin" "$STATE/run" "$STATE/logs"
  exec 9>"$STATE/.tfjob-operator.lock"
  flock -w 900 9 || die "timed out waiting for another $me"
  build
  local crd="$CACHE/go/mod/$MODULE@$VERSION/manifests/base/crds/kubeflow.org_tfjobs.yaml"
  [ -r "$crd" ] || die "$crd missing from the module cache"
  kubectl_ apply --server-side -f "$crd" >/dev/null
  wait_established tfjobs.kubeflow.org
  local i
  if ! running; then
    "$(dirname "${BASH_SOURCE[0]}")/detached" nohup "$BINARY" --kubeconfig "$KUBECONFIG_ADMIN" --enable-scheme=tfjob \
      --metrics-bind-address "127.0.0.1:$(free_port)" --health-probe-bind-address "127.0.0.1:$(free_port)" \
      >>"$LOG" 2>&1 </dev/null 9>&- &
    echo $! >"$PIDFILE"
    for ((i = 0; i < 60; i++)); do  # it is up when it has started its TFJob controller
      running || { tail -n 15 "$LOG" >&2; die "the operator exited (log: $LOG)"; }
      grep -q 'Starting workers.*tfjob' "$LOG" 2>/dev/null && break
      sleep 0.5
    done
  fi
  say "ready: TFJob CRD applied, operator pid $(cat "$PIDFILE") (log: $LOG)"
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  status) if running; then echo "training-operator: running (pid $(cat "$PIDFILE"))"; else echo "training-operator: stopped"; fi ;;
  *) die "usage: $0 [up|down|status]" ;;
esac
