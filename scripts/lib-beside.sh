# shellcheck shell=bash
# Shared by the scripts that run one process beside the test cluster's control plane
# (ensure-tfjob-operator.sh, ensure-argo.sh). Source it after setting: me, PIDFILE, KUBECONFIG_ADMIN.

say() { printf '%s: %s\n' "$me" "$*"; }
die() { printf '%s: ERROR: %s\n' "$me" "$*" >&2; exit 1; }
running() {  # a live process (a killed one can linger as a zombie until init reaps it: that is not running)
  local p st; p="$(cat "$PIDFILE" 2>/dev/null)" || return 1
  [ -n "$p" ] && kill -0 "$p" 2>/dev/null || return 1
  st="$(awk '{print $3}' "/proc/$p/stat" 2>/dev/null)" || return 1
  [ "$st" != "Z" ] && [ "$st" != "X" ]
}
kubectl_() { kubectl --kubeconfig "$KUBECONFIG_ADMIN" --request-timeout=30s "$@"; }
wait_established() {  # wait_established CRD: until the API server serves it (at most a minute)
  local i
  for ((i = 0; i < 120; i++)); do
    kubectl_ get crd "$1" -o jsonpath='{.status.conditions[?(@.type=="Established")].status}' 2>/dev/null \
      | grep -qx True && return 0
    sleep 0.5
  done
}
down() {  # stop the process (TERM, then KILL after 5 s)
  running || { rm -f "$PIDFILE"; return 0; }
  local p; p="$(cat "$PIDFILE")"
  kill "$p" 2>/dev/null || true
  for _ in $(seq 1 20); do kill -0 "$p" 2>/dev/null || break; sleep 0.25; done
  kill -9 "$p" 2>/dev/null || true
  rm -f "$PIDFILE"
  say "stopped"
}
