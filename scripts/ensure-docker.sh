#!/usr/bin/env bash
# ensure-docker.sh - make sure a Docker engine answers `docker info`.
#
# Idempotent and unattended. If the daemon already answers, this is a no-op.
# Otherwise it installs Debian's docker.io (for `dockerd`; a `docker` client in
# /usr/local/bin is fine too), starts `dockerd` detached (setsid + nohup, so it
# outlives make / CI) and waits for it to come up.
#
# Storage driver: overlay2 is probed first by really mounting an overlay
# under /var/lib/docker (that is where the engine needs it). On this kind of
# sandbox (Debian bookworm VM, kernel 6.x, ext4 root) overlay2 works; where it
# does not (e.g. nested inside an overlay root or without the overlay module)
# we fall back to --storage-driver=vfs (slow and disk-hungry, but works
# everywhere). Override with DOCKERD_STORAGE_DRIVER=overlay2|vfs|...
#
# Environment:
#   DOCKERD_STORAGE_DRIVER  force a storage driver (default: probe)
#   DOCKERD_EXTRA_ARGS      extra arguments for dockerd (word-split)
#   DOCKERD_LOG             log file (default /var/log/mlflowctl-dockerd.log, or a
#                           fresh mktemp file if not writable)
#
# No fixed /tmp names (this runs as root): logs of apt are fresh mktemp files, the
# lock lives in a state folder only its owner can write (/run/mlflowctl as root).
#   DOCKER_WAIT             seconds to wait for the daemon (default 60)
set -euo pipefail

me="ensure-docker"
say() { echo "$me: $*"; }
die() { echo "$me: ERROR: $*" >&2; exit 1; }

DOCKER_WAIT="${DOCKER_WAIT:-60}"
export DEBIAN_FRONTEND=noninteractive
export PATH="$PATH:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Privilege helper: root runs commands as is; others use `sudo -n` if present.
if [ "$(id -u)" -eq 0 ]; then
  SUDO=()
elif command -v sudo >/dev/null 2>&1; then
  SUDO=(sudo -n)
else
  SUDO=(__no_root__)
fi
need_root() {
  if [ "${SUDO[0]:-}" = "__no_root__" ]; then
    die "$1 needs root and sudo is not available; run as root or start the Docker daemon yourself"
  fi
}

docker_ok() { command -v docker >/dev/null 2>&1 && timeout 20 docker info >/dev/null 2>&1; }

if docker_ok; then
  say "Docker daemon is up ($(docker version --format '{{.Server.Version}}' 2>/dev/null || echo '?'))"
  exit 0
fi

apt_install() {
  need_root "installing $*"
  command -v apt-get >/dev/null 2>&1 || die "cannot install $* (no apt-get); install Docker (dockerd + docker client) by hand"
  local apt=("${SUDO[@]}" apt-get -y -q -o DPkg::Lock::Timeout=300)
  say "installing $* with apt-get"
  # With Recommends (as a plain `apt-get install docker.io`): git, xz-utils,
  # apparmor, cgroupfs-mount... which `docker build` and the daemon may want.
  local log; log="$(mktemp -t mlflowctl-apt.XXXXXX)"
  if ! "${apt[@]}" install "$@" >"$log" 2>&1; then
    say "apt-get install failed, running apt-get update and retrying"
    "${apt[@]}" update >>"$log" 2>&1 || true
    "${apt[@]}" install "$@" >>"$log" 2>&1 \
      || { tail -n 15 "$log" >&2; die "apt-get install $* failed (log: $log)"; }
  fi
  rm -f "$log"
}

# 1. Binaries: dockerd (daemon) and docker (client). docker.io provides both.
if ! command -v dockerd >/dev/null 2>&1 || ! command -v docker >/dev/null 2>&1; then
  apt_install docker.io
  command -v dockerd >/dev/null 2>&1 || die "dockerd still missing after installing docker.io"
fi

# 2. A daemon that is still starting (e.g. a concurrent run): wait for it
#    instead of starting a second one.
wait_for_daemon() {
  local secs="$1" pid="${2:-}" i
  for ((i = 0; i < secs; i++)); do
    docker_ok && return 0
    if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null && ! pgrep -x dockerd >/dev/null 2>&1; then
      return 1  # daemon died
    fi
    sleep 1
  done
  docker_ok
}

# Serialise concurrent starters.
if [ "$(id -u)" -eq 0 ]; then RUN_DIR=/run/mlflowctl; else RUN_DIR="${XDG_RUNTIME_DIR:-$HOME/.cache}/mlflowctl"; fi
mkdir -p -m 0755 "$RUN_DIR"
[ -d "$RUN_DIR" ] && [ ! -L "$RUN_DIR" ] && [ -O "$RUN_DIR" ] || die "$RUN_DIR is not a folder of ours; remove it and re-run"
LOCK="$RUN_DIR/dockerd.lock"
exec 9>>"$LOCK"
flock -w 120 9 || die "timed out waiting for another ensure-docker.sh (lock $LOCK)"

if docker_ok; then say "Docker daemon is up"; exit 0; fi
if pgrep -x dockerd >/dev/null 2>&1; then
  say "a dockerd process exists but does not answer yet; waiting up to ${DOCKER_WAIT}s"
  wait_for_daemon "$DOCKER_WAIT" && { say "Docker daemon is up"; exit 0; }
  die "a dockerd process is running (pid $(pgrep -x dockerd | tr '\n' ' ')) but 'docker info' fails; check its log or stop it and re-run"
fi

need_root "starting dockerd"

# 3. Storage driver: probe overlayfs where Docker keeps its data.
probe_overlay() {
  local base=/var/lib/docker/.mlflowctl-overlay-probe rc=1
  "${SUDO[@]}" mkdir -p "$base"/{lower,upper,work,merged} || return 1
  if "${SUDO[@]}" mount -t overlay overlay \
       -o "lowerdir=$base/lower,upperdir=$base/upper,workdir=$base/work" "$base/merged" 2>/dev/null; then
    rc=0
    "${SUDO[@]}" umount "$base/merged" || true
  fi
  "${SUDO[@]}" rm -rf "$base"
  return $rc
}
driver="${DOCKERD_STORAGE_DRIVER:-}"
if [ -z "$driver" ]; then
  if probe_overlay; then driver=overlay2; else driver=vfs; fi
fi

# 4. Log file.
LOG="${DOCKERD_LOG:-/var/log/mlflowctl-dockerd.log}"
if ! { "${SUDO[@]}" touch "$LOG"; } 2>/dev/null; then LOG="$(mktemp -t mlflowctl-dockerd.XXXXXX.log)"; fi

# 5. Start dockerd detached so it survives make/CI's shell.
args=(--storage-driver="$driver")
# shellcheck disable=SC2206
[ -n "${DOCKERD_EXTRA_ARGS:-}" ] && args+=(${DOCKERD_EXTRA_ARGS})
say "starting dockerd (storage driver $driver, log $LOG)"
start=$SECONDS
log_lines="$(wc -l <"$LOG" 2>/dev/null || echo 0)"
# shellcheck disable=SC2024
"${SUDO[@]}" "$(dirname "${BASH_SOURCE[0]}")/detached" nohup dockerd "${args[@]}" </dev/null >>"$LOG" 2>&1 9>&- &
pid=$!

if wait_for_daemon "$DOCKER_WAIT" "$pid"; then
  say "Docker daemon is up after $((SECONDS - start))s (storage driver $driver)"
  exit 0
fi

if pgrep -x dockerd >/dev/null 2>&1; then
  why="dockerd is running but did not answer 'docker info' within ${DOCKER_WAIT}s"
else
  why="dockerd exited during start-up"
fi
echo "$me: ---- last warnings/errors in $LOG ----" >&2
tail -n +"$((log_lines + 1))" "$LOG" | grep -vE 'level=(info|debug)' | tail -n 15 >&2 || true
die "$why (log $LOG); try DOCKERD_STORAGE_DRIVER=vfs or DOCKERD_EXTRA_ARGS='--iptables=false'"
