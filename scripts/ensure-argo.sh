#!/usr/bin/env bash
# The Argo Workflows controller beside the test cluster's control plane, and its executor image.
#
#   scripts/ensure-argo.sh [up]    build once (cached) from the Go module, apply the CRDs from the same
#                                  module, build the executor image and load it into the node, start the
#                                  controller (idempotent)
#   scripts/ensure-argo.sh down    stop the controller (CRDs and image stay; `make cluster-down` stops it too)
#   scripts/ensure-argo.sh status
#   scripts/ensure-argo.sh crd     print the path of the Workflow CRD with the full schema (for validation)
#
# Built with the Go module proxy only: github.com/argoproj/argo-workflows/v3@$ARGO_VERSION (3.6.x: 4.x is
# flagged for security problems). `go install module@version` does not work here (the proxy refuses the
# module's version list, which go install reads for deprecations), so the module's source is taken from the
# module cache (`go mod download`) and built in place: cmd/workflow-controller and cmd/argoexec
# (about 10 minutes each, cold, on 2 cores). argoexec carries kubectl inside (resource templates use it as
# a library), so the executor image is the base image (scripts/ensure-base-image.sh) plus that one binary:
# mlflowctl/argoexec:<version>, loaded into the node (scripts/ensure-cluster.sh load-image), never pulled.
# The controller runs as a process with the cluster's admin kubeconfig, watching every namespace; its
# configuration (ConfigMap workflow-controller-configmap in namespace argo) turns its metrics servers off.
# It always serves /healthz on :6060 (hard-coded upstream). Log: $STATE/logs/argo-controller.log.
set -euo pipefail
umask 022
me="ensure-argo"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${MLFLOWCTL_CLUSTER_DIR:-/var/lib/mlflowctl/cluster}"
CACHE="${MLFLOWCTL_CACHE_DIR:-/var/cache/mlflowctl}"
VERSION="${ARGO_VERSION:-v3.6.18}"
MODULE=github.com/argoproj/argo-workflows/v3
BASE_IMAGE="${BASE_IMAGE:-python:3.11-slim}"
EXECUTOR_IMAGE="mlflowctl/argoexec:$VERSION"
NAMESPACE=argo
KUBECONFIG_ADMIN="$STATE/admin.kubeconfig"
SRC="$CACHE/go/src/argo-workflows-$VERSION"
CONTROLLER="$CACHE/go/bin/workflow-controller-$VERSION"
ARGOEXEC="$CACHE/go/bin/argoexec-$VERSION"
PIDFILE="$STATE/run/argo-controller.pid"
LOG="$STATE/logs/argo-controller.log"
export PATH="$PATH:/usr/local/go/bin"
# shellcheck source=lib-beside.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib-beside.sh"
export GOMODCACHE="$CACHE/go/mod" GOCACHE="$CACHE/go/build" GOFLAGS=-mod=mod GOTOOLCHAIN=local CGO_ENABLED=0

source_dir() {  # the module's source, writable, from the module cache
  [ -d "$SRC" ] && return 0
  command -v go >/dev/null || die "go not found (install Go >= 1.24, e.g. /usr/local/go)"
  mkdir -p "$CACHE/go/src"
  local dir
  dir="$(cd /tmp && go mod download -json "$MODULE@$VERSION" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d.get("Dir") or ""); sys.exit(1 if d.get("Error") else 0)')" \
    || die "go mod download $MODULE@$VERSION failed"
  rm -rf "$SRC.tmp"
  cp -r "$dir" "$SRC.tmp"
  chmod -R u+w "$SRC.tmp"
  # upstream's workflow/executor/os-specific/signal_linux.go is a symlink to signal_darwin.go, and module zips
  # carry no symlinks: without it argoexec does not build for linux (undefined: Setpgid). Put the file back.
  local os_specific="$SRC.tmp/workflow/executor/os-specific"
  [ -f "$os_specific/signal_linux.go" ] || cp "$os_specific/signal_darwin.go" "$os_specific/signal_linux.go"
  mv "$SRC.tmp" "$SRC"
}

build_one() {  # build_one CMD OUT
  [ -x "$2" ] && return 0
  say "building $MODULE/cmd/$1@$VERSION (cached in $2; log $STATE/logs/argo-build.log)"
  (cd "$SRC" && go build -trimpath -ldflags "-s -w -X github.com/argoproj/argo-workflows/v3.version=$VERSION" \
      -o "$2.tmp" "./cmd/$1") >>"$STATE/logs/argo-build.log" 2>&1 \
    || { tail -n 20 "$STATE/logs/argo-build.log" >&2; die "go build ./cmd/$1 failed"; }
  mv "$2.tmp" "$2"
}

crd_path() { echo "$SRC/manifests/base/crds/full/argoproj.io_workflows.yaml"; }

executor_image() {
  if docker image inspect "$EXECUTOR_IMAGE" >/dev/null 2>&1; then return 0; fi
  docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 || "$ROOT/scripts/ensure-base-image.sh"
  local ctx; ctx="$(mktemp -d)"
  cp "$ARGOEXEC" "$ctx/argoexec"
  printf 'FROM %s\nCOPY argoexec /bin/argoexec\nENTRYPOINT ["argoexec"]\n' "$BASE_IMAGE" > "$ctx/Dockerfile"
  docker build -q -t "$EXECUTOR_IMAGE" "$ctx" >>"$STATE/logs/argo-build.log" 2>&1 \
    || { rm -rf "$ctx"; tail -n 5 "$STATE/logs/argo-build.log" >&2; die "docker build of $EXECUTOR_IMAGE failed"; }
  rm -rf "$ctx"
  say "built $EXECUTOR_IMAGE"
}

node_has_image() {
  ctr --address /run/mlflowctl-containerd/containerd.sock -n k8s.io images ls -q 2>/dev/null | grep -qx "docker.io/$EXECUTOR_IMAGE"
}

up() {
  [ -r "$KUBECONFIG_ADMIN" ] || die "no test cluster ($KUBECONFIG_ADMIN missing): make cluster"
  mkdir -p "$CACHE/go/bin" "$STATE/run" "$STATE/logs"
  exec 9>"$STATE/.argo.lock"
  flock -w 1800 9 || die "timed out waiting for another $me"
  source_dir
  build_one argoexec "$ARGOEXEC"
  build_one workflow-controller "$CONTROLLER"
  executor_image
  node_has_image || "$ROOT/scripts/ensure-cluster.sh" load-image "$EXECUTOR_IMAGE" 9>&- >/dev/null
  # the CRDs the cluster stores are the module's minimal ones (the full Workflow CRD is over etcd's size limit)
  local crd
  for crd in "$SRC"/manifests/base/crds/minimal/argoproj.io_*.yaml; do
    kubectl_ apply --server-side --force-conflicts -f "$crd" >/dev/null
  done
  kubectl_ get namespace "$NAMESPACE" >/dev/null 2>&1 || kubectl_ create namespace "$NAMESPACE" >/dev/null
  kubectl_ apply --server-side --force-conflicts -f - >/dev/null <<EOF
apiVersion: v1
kind: ConfigMap
metadata: {name: workflow-controller-configmap, namespace: $NAMESPACE}
data:
  metricsConfig: |
    enabled: false
  telemetryConfig: |
    enabled: false
EOF
  wait_established workflows.argoproj.io
  local i
  if ! running; then
    ARGO_NAMESPACE="$NAMESPACE" LEADER_ELECTION_DISABLE=true "$ROOT/scripts/detached" nohup "$CONTROLLER" \
      --kubeconfig "$KUBECONFIG_ADMIN" --namespace "$NAMESPACE" --configmap workflow-controller-configmap \
      --executor-image "$EXECUTOR_IMAGE" --executor-image-pull-policy Never --workflow-workers 4 \
      >>"$LOG" 2>&1 </dev/null 9>&- &
    echo $! >"$PIDFILE"
    for ((i = 0; i < 120; i++)); do
      running || { tail -n 15 "$LOG" >&2; die "the controller exited (log: $LOG)"; }
      grep -q 'Starting CronWorkflow controller' "$LOG" 2>/dev/null && break
      sleep 0.5
    done
  fi
  say "ready: Argo $VERSION controller pid $(cat "$PIDFILE"), executor $EXECUTOR_IMAGE (log: $LOG)"
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  status) if running; then echo "argo-controller: running (pid $(cat "$PIDFILE"))"; else echo "argo-controller: stopped"; fi ;;
  crd) source_dir >&2; crd_path ;;
  build) mkdir -p "$STATE/logs"; source_dir; build_one argoexec "$ARGOEXEC"; build_one workflow-controller "$CONTROLLER" ;;
  *) die "usage: $0 [up|down|status|crd|build]" ;;
esac
