#!/usr/bin/env bash
# ensure-cluster.sh - a real single-node Kubernetes for the tests, built from upstream's Go modules.
#
#   scripts/ensure-cluster.sh [up]        build once (cached), start, wait until ready (idempotent)
#   scripts/ensure-cluster.sh down        stop everything; no process, mount, link, rule or sysctl left
#   scripts/ensure-cluster.sh status      one line per component
#   scripts/ensure-cluster.sh load-image IMAGE...   copy images from the Docker engine to the node
#   scripts/ensure-cluster.sh kubeconfig  print the admin kubeconfig path
#
# What runs (each its own process of ONE binary, tests/cluster/kube-all, built from k8s.io/kubernetes):
# etcd (loopback only), kube-apiserver (127.0.0.1:6443), kube-controller-manager, kube-scheduler,
# kubelet (node IP = this machine's own interface address; kubelet refuses loopback), kube-proxy
# (iptables mode: Services route). The runtime is a SECOND containerd from Debian with its own root,
# state and socket (Docker's stays untouched), runc, and the CNI bridge plugins from Debian: pods get
# 10.244.0.0/24 on the bridge mlflowctl0, no masquerade, and a FORWARD rule drops anything they send
# beyond that subnet (they reach this machine and each other, nothing else). Cluster DNS: CoreDNS
# (built from its Go module, github.com/coredns/coredns@$COREDNS_VERSION) runs as a process on the
# bridge's gateway address 10.244.0.1:53, serving cluster.local from the API server (as user system:coredns,
# list/watch only, as upstream's ClusterRole; Services, headless
# Services' pods: what a TFJob's TF_CONFIG names) and answering NXDOMAIN for every other name: it
# forwards nothing outside. kubelet's clusterDNS points at it. In-cluster API clients (Argo's executor) reach
# the API server, which listens on loopback only, through the kubernetes Service: 10.96.0.1:443 from the pod
# subnet is DNATed to 127.0.0.1:6443 (route_localnet on the bridge). The pause image is made here from Debian's catatonit;
# project images are imported from the Docker engine (`load-image`), never pulled.
#
# Caches (reused by CI on this machine): /var/cache/mlflowctl/go/{mod,build} (Go's module and build
# caches), /var/cache/mlflowctl/k8s/<digest>/kube-all, keyed by the digest of tests/cluster's
# go.mod, go.sum, main.go and the Go version, and /var/cache/mlflowctl/go/bin/coredns-<version>.
#
# Environment:
#   MLFLOWCTL_CLUSTER_DIR  state folder (default /var/lib/mlflowctl/cluster): certs, kubeconfig, logs
#   MLFLOWCTL_CACHE_DIR    cache folder (default /var/cache/mlflowctl)
#   CLUSTER_WAIT           seconds to wait for readiness (default 180)
set -euo pipefail
umask 022

me="ensure-cluster"
T0=$SECONDS
say() { printf '%s: [%4ss] %s\n' "$me" "$((SECONDS - T0))" "$*"; }
die() { printf '%s: ERROR: %s\n' "$me" "$*" >&2; exit 1; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODULE="$ROOT/tests/cluster"
STATE="${MLFLOWCTL_CLUSTER_DIR:-/var/lib/mlflowctl/cluster}"
CACHE="${MLFLOWCTL_CACHE_DIR:-/var/cache/mlflowctl}"
WAIT="${CLUSTER_WAIT:-180}"
K8S_VERSION=v1.34.4
NODE=mlflowctl-node
POD_CIDR=10.244.0.0/24
SERVICE_CIDR=10.96.0.0/24
BRIDGE=mlflowctl0
CTRD_SOCK=/run/mlflowctl-containerd/containerd.sock
CTRD_ROOT=/var/lib/mlflowctl/containerd
CTRD_STATE=/run/mlflowctl-containerd
KUBELET_ROOT=/var/lib/mlflowctl/kubelet
CGROUP_ROOT=/mlflowctl
PAUSE_IMAGE=registry.k8s.io/pause:3.10
FW_CHAIN=MLFLOWCTL-PODS
# Kernel settings kubelet and kube-proxy may change: saved at `up`, restored at `down`.
SYSCTLS="vm.overcommit_memory kernel.panic kernel.panic_on_oops kernel.keys.root_maxkeys kernel.keys.root_maxbytes
net.ipv4.conf.all.route_localnet net.netfilter.nf_conntrack_max net.netfilter.nf_conntrack_tcp_timeout_established
net.netfilter.nf_conntrack_tcp_timeout_close_wait fs.inotify.max_user_instances net.bridge.bridge-nf-call-iptables
net.ipv4.ip_forward"
COMPONENTS="etcd kube-apiserver kube-controller-manager kube-scheduler coredns containerd kubelet kube-proxy"
COREDNS_VERSION="${COREDNS_VERSION:-v1.12.4}"
DNS_IP=10.244.0.1          # the bridge's gateway address (the CNI bridge plugin's default gateway of $POD_CIDR)
CLUSTER_DOMAIN=cluster.local
API_DNAT="-s $POD_CIDR -d 10.96.0.1 -p tcp --dport 443 -m comment --comment mlflowctl-api -j DNAT --to-destination 127.0.0.1:6443"

export PATH="$PATH:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/usr/local/go/bin"
export DEBIAN_FRONTEND=noninteractive
KUBECONFIG_ADMIN="$STATE/admin.kubeconfig"

[ "$(id -u)" -eq 0 ] || die "needs root (it starts kubelet and a containerd); run as root"

# ------------------------------------------------------------------------------------- helpers
pidfile() { echo "$STATE/run/$1.pid"; }
running() {  # a live process (a killed one can linger as a zombie until init reaps it: that is not running)
  local p st; p="$(cat "$(pidfile "$1")" 2>/dev/null)" || return 1
  [ -n "$p" ] && kill -0 "$p" 2>/dev/null || return 1
  st="$(awk '{print $3}' "/proc/$p/stat" 2>/dev/null)" || return 1
  [ "$st" != "Z" ] && [ "$st" != "X" ]
}
kubectl_() { kubectl --kubeconfig "$KUBECONFIG_ADMIN" --request-timeout=10s "$@"; }

node_ip() {
  # the address of the interface that holds the default route (kubelet refuses loopback)
  local dev ip
  dev="$(ip -4 route show default 2>/dev/null | awk '{for(i=1;i<NF;i++) if($i=="dev"){print $(i+1); exit}}')"
  [ -n "$dev" ] && ip="$(ip -4 -o addr show dev "$dev" | awk '{split($4,a,"/"); print a[1]; exit}')"
  [ -n "${ip:-}" ] || ip="$(ip -4 -o addr show scope global | awk '$2 !~ /^(docker|mlflowctl|cni|veth)/ {split($4,a,"/"); print a[1]; exit}')"
  [ -n "${ip:-}" ] || die "no non-loopback IPv4 address for the node (kubelet refuses loopback)"
  echo "$ip"
}

# start NAME LOGFILE CMD...: a detached process (own session), its pid recorded
start() {
  local name="$1"; shift
  if running "$name"; then return 0; fi
  mkdir -p "$STATE/run" "$STATE/logs"
  "$ROOT/scripts/detached" nohup "$@" >>"$STATE/logs/$name.log" 2>&1 < /dev/null &   # holding no lock of ours
  echo $! > "$(pidfile "$name")"
}

wait_for() {  # wait_for WHAT SECONDS COMPONENT CMD...: until CMD succeeds; fail early if COMPONENT died
  local what="$1" secs="$2" comp="$3" i; shift 3
  for ((i = 0; i < secs * 2; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    if [ -n "$comp" ] && ! running "$comp"; then
      tail -n 15 "$STATE/logs/$comp.log" >&2 || true
      die "$comp exited while waiting for $what (log: $STATE/logs/$comp.log)"
    fi
    sleep 0.5
  done
  [ -n "$comp" ] && tail -n 15 "$STATE/logs/$comp.log" >&2
  die "timed out after ${secs}s waiting for $what${comp:+ (log: $STATE/logs/$comp.log)}"
}

# ------------------------------------------------------------------------------------- 1. packages
ensure_packages() {
  local missing=()
  command -v containerd >/dev/null || missing+=(containerd)
  command -v runc >/dev/null || missing+=(runc)
  [ -x /usr/lib/cni/bridge ] || missing+=(containernetworking-plugins)
  command -v catatonit >/dev/null || missing+=(catatonit)
  command -v iptables >/dev/null || missing+=(iptables)
  command -v conntrack >/dev/null || missing+=(conntrack)
  command -v openssl >/dev/null || missing+=(openssl)
  command -v go >/dev/null || die "Go is not installed (needed to build tests/cluster); install Go >= 1.24"
  command -v kubectl >/dev/null || missing+=(kubernetes-client)
  command -v docker-registry >/dev/null || missing+=(docker-registry)   # the tests' local registry (push/pull)
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]} with apt-get"
    if ! apt-get -y -q -o DPkg::Lock::Timeout=300 install --no-install-recommends "${missing[@]}" >"$STATE/logs/apt.log" 2>&1; then
      apt-get -q -o DPkg::Lock::Timeout=300 update >>"$STATE/logs/apt.log" 2>&1 || true
      apt-get -y -q -o DPkg::Lock::Timeout=300 install --no-install-recommends "${missing[@]}" >>"$STATE/logs/apt.log" 2>&1 \
        || { tail -n 15 "$STATE/logs/apt.log" >&2; die "apt-get install ${missing[*]} failed"; }
    fi
  fi
}

# ------------------------------------------------------------------------------------- 2. the binary
binary_key() {
  { cat "$MODULE/go.mod" "$MODULE/go.sum" "$MODULE/main.go"; go env GOVERSION; } | sha256sum | cut -c1-16
}

ensure_binary() {
  local key dir
  key="$(binary_key)"
  dir="$CACHE/k8s/$key"
  BIN="$dir/kube-all"
  if [ -x "$BIN" ]; then
    say "kube-all $K8S_VERSION cached ($BIN)"
    return
  fi
  mkdir -p "$dir" "$CACHE/go/mod" "$CACHE/go/build"
  exec 8>"$CACHE/k8s/.build.lock"
  flock -w 3600 8 || die "timed out waiting for another build (lock $CACHE/k8s/.build.lock)"
  if [ -x "$BIN" ]; then exec 8>&-; return; fi
  say "building kube-all $K8S_VERSION from k8s.io/kubernetes (cold on 2 cores: ~20-30 min; log $STATE/logs/build.log)"
  local t=$SECONDS
  (
    cd "$MODULE"
    export GOMODCACHE="$CACHE/go/mod" GOCACHE="$CACHE/go/build" GOFLAGS=-mod=mod GOTOOLCHAIN=local CGO_ENABLED=0
    go build -trimpath -o "$BIN.tmp" -ldflags "-s -w \
      -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 \
      -X k8s.io/component-base/version.gitMinor=34 -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION \
      -X k8s.io/component-base/version.gitTreeState=clean" .
  ) >"$STATE/logs/build.log" 2>&1 || { tail -n 20 "$STATE/logs/build.log" >&2; die "go build failed (log $STATE/logs/build.log)"; }
  mv "$BIN.tmp" "$BIN"
  echo "$((SECONDS - t))" > "$dir/build-seconds"
  exec 8>&-
  say "built kube-all in $((SECONDS - t)) s ($(du -h "$BIN" | cut -f1))"
}

ensure_coredns_binary() {  # CoreDNS from its Go module, once (about 10 minutes cold on 2 cores)
  COREDNS_BIN="$CACHE/go/bin/coredns-$COREDNS_VERSION"
  [ -x "$COREDNS_BIN" ] && return 0
  mkdir -p "$CACHE/go/bin" "$CACHE/go/mod" "$CACHE/go/build"
  exec 8>"$CACHE/go/.coredns-build.lock"
  flock -w 3600 8 || die "timed out waiting for another CoreDNS build"
  if [ -x "$COREDNS_BIN" ]; then exec 8>&-; return 0; fi
  say "building github.com/coredns/coredns@$COREDNS_VERSION (log $STATE/logs/coredns-build.log)"
  local gobin; gobin="$(mktemp -d "$CACHE/go/.bin-XXXXXX")"
  GOBIN="$gobin" GOMODCACHE="$CACHE/go/mod" GOCACHE="$CACHE/go/build" GOFLAGS=-mod=mod GOTOOLCHAIN=local CGO_ENABLED=0 \
    go install "github.com/coredns/coredns@$COREDNS_VERSION" >"$STATE/logs/coredns-build.log" 2>&1 \
    || { rm -rf "$gobin"; tail -n 20 "$STATE/logs/coredns-build.log" >&2; die "go install coredns failed"; }
  mv "$gobin/coredns" "$COREDNS_BIN"
  rm -rf "$gobin"
  exec 8>&-
}

# ------------------------------------------------------------------------------------- 3. certificates
cert() {  # cert NAME CN ORG SANS: a client/server certificate signed by the cluster CA
  local name="$1" cn="$2" org="$3" sans="$4" pki="$STATE/pki"
  [ -f "$pki/$name.crt" ] && return
  local subj="/CN=$cn"; [ -n "$org" ] && subj="/O=$org$subj"
  openssl req -new -newkey rsa:2048 -nodes -keyout "$pki/$name.key" -subj "$subj" -out "$pki/$name.csr" 2>/dev/null
  {
    echo "basicConstraints=CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=serverAuth,clientAuth"
    [ -n "$sans" ] && echo "subjectAltName=$sans"
  } > "$pki/$name.ext"
  openssl x509 -req -in "$pki/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 3650 -sha256 -extfile "$pki/$name.ext" -out "$pki/$name.crt" 2>/dev/null
  rm -f "$pki/$name.csr" "$pki/$name.ext"
}

kubeconfig() {  # kubeconfig NAME CERT: a kubeconfig for the API server with that client certificate
  local file="$STATE/$1.kubeconfig" pki="$STATE/pki"
  [ -f "$file" ] && return
  cat > "$file" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: mlflowctl-test
  cluster:
    server: https://127.0.0.1:6443
    certificate-authority: $pki/ca.crt
users:
- name: $1
  user:
    client-certificate: $pki/$2.crt
    client-key: $pki/$2.key
contexts:
- name: mlflowctl-test
  context: {cluster: mlflowctl-test, user: $1}
current-context: mlflowctl-test
EOF
}

ensure_pki() {
  local pki="$STATE/pki" ip="$1"
  mkdir -p "$pki"
  if [ ! -f "$pki/ca.crt" ]; then
    openssl req -x509 -new -newkey rsa:2048 -nodes -keyout "$pki/ca.key" -subj "/CN=mlflowctl-test-ca" \
      -days 3650 -sha256 -out "$pki/ca.crt" 2>/dev/null
  fi
  [ -f "$pki/sa.key" ] || { openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null; openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null; }
  cert apiserver kube-apiserver "" "IP:127.0.0.1,IP:$ip,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  cert apiserver-kubelet-client kube-apiserver-kubelet-client system:masters ""
  cert admin mlflowctl-admin system:masters ""
  cert controller-manager system:kube-controller-manager "" ""
  cert scheduler system:kube-scheduler "" ""
  cert kube-proxy system:kube-proxy "" ""
  cert coredns system:coredns "" ""
  cert node "system:node:$NODE" system:nodes ""
  cert kubelet-serving "$NODE" "" "IP:$ip,DNS:$NODE,IP:127.0.0.1"
  kubeconfig admin admin
  kubeconfig controller-manager controller-manager
  kubeconfig scheduler scheduler
  kubeconfig kube-proxy kube-proxy
  kubeconfig coredns coredns
  kubeconfig kubelet node
}

# ------------------------------------------------------------------------------------- 4. node set-up
save_sysctls() {
  [ -f "$STATE/sysctl.saved" ] && return
  local k v
  for k in $SYSCTLS; do
    v="$(sysctl -n "$k" 2>/dev/null)" && printf '%s=%s\n' "$k" "$v"
  done > "$STATE/sysctl.saved"
}

ensure_firewall() {  # pods reach each other and this machine; nothing they send is forwarded beyond
  iptables -w -N "$FW_CHAIN" 2>/dev/null || true
  iptables -w -F "$FW_CHAIN"
  iptables -w -A "$FW_CHAIN" -s "$POD_CIDR" -d "$POD_CIDR" -j ACCEPT
  iptables -w -A "$FW_CHAIN" -s "$POD_CIDR" -j DROP
  iptables -w -A "$FW_CHAIN" -d "$POD_CIDR" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
  iptables -w -C FORWARD -j "$FW_CHAIN" 2>/dev/null || iptables -w -I FORWARD 1 -j "$FW_CHAIN"
}

api_dnat_first() {  # pods reach the API server through the kubernetes Service (in-cluster clients: Argo's
  # executor). The API server listens on loopback only, so that one address is DNATed to 127.0.0.1:6443
  # (route_localnet on the bridge, ensure_bridge, lets the kernel deliver it). DNAT ends the chain, so the rule
  # must come BEFORE kube-proxy's "kubernetes service portals" jump, which kube-proxy prepends whenever it
  # finds it missing (every start after a teardown): called once kube-proxy has synced, it moves the rule first.
  [ "$(iptables -w -t nat -S PREROUTING | sed -n 2p)" = "-A PREROUTING $(api_dnat_rule)" ] && return 0
  while iptables -w -t nat -D PREROUTING $API_DNAT 2>/dev/null; do :; done
  iptables -w -t nat -I PREROUTING 1 $API_DNAT
}

api_dnat_rule() {  # the rule as `iptables -S` prints it
  echo "-s $POD_CIDR -d 10.96.0.1/32 -p tcp -m tcp --dport 443 -m comment --comment mlflowctl-api -j DNAT --to-destination 127.0.0.1:6443"
}

kube_proxy_synced() { iptables -w -t nat -S PREROUTING | grep -q -- '-j KUBE-SERVICES'; }

ensure_node_files() {
  local ip="$1"
  mkdir -p "$STATE/cni/net.d" "$STATE/containerd" "$STATE/certs.d" "$CTRD_ROOT" "$CTRD_STATE" "$KUBELET_ROOT"
  cat > "$STATE/cni/net.d/10-mlflowctl.conflist" <<EOF
{"cniVersion": "1.0.0", "name": "mlflowctl", "plugins": [
  {"type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "$POD_CIDR"}]], "routes": [{"dst": "0.0.0.0/0"}],
            "dataDir": "$STATE/cni/ipam"}},
  {"type": "portmap", "capabilities": {"portMappings": true}}
]}
EOF
  cat > "$STATE/containerd/config.toml" <<EOF
version = 2
root = "$CTRD_ROOT"
state = "$CTRD_STATE"
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "$CTRD_SOCK"
[ttrpc]
  address = "$CTRD_SOCK.ttrpc"
[debug]
  address = "$CTRD_SOCK.debug"
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  enable_selinux = false
  # this sandbox lacks CAP_SYS_RESOURCE: never ask runc for an oom_score_adj below containerd's own
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "$STATE/certs.d"   # hosts.toml per registry (the tests' local registry speaks plain HTTP)
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$STATE/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$CTRD_STATE/runc"
EOF
  echo "nameserver 127.0.0.1" > "$STATE/resolv.conf"   # dnsPolicy Default pods resolve nothing outside
  mkdir -p "$STATE/coredns"
  cat > "$STATE/coredns/Corefile" <<EOF
# cluster names from the API server; nothing else is answered, nothing forwarded
$CLUSTER_DOMAIN:53 in-addr.arpa:53 {
    bind $DNS_IP
    kubernetes $CLUSTER_DOMAIN in-addr.arpa {
        kubeconfig $STATE/coredns.kubeconfig mlflowctl-test
        pods insecure
        ttl 5
    }
    errors
}
.:53 {
    bind $DNS_IP
    template ANY ANY {
        rcode NXDOMAIN
    }
}
EOF
  local kubelet_old=""; [ -f "$STATE/kubelet.yaml" ] && kubelet_old="$(cat "$STATE/kubelet.yaml")"
  cat > "$STATE/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $ip
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: $STATE/pki/ca.crt}
authorization: {mode: AlwaysAllow}
tlsCertFile: $STATE/pki/kubelet-serving.crt
tlsPrivateKeyFile: $STATE/pki/kubelet-serving.key
cgroupDriver: cgroupfs
cgroupRoot: $CGROUP_ROOT
containerRuntimeEndpoint: unix://$CTRD_SOCK
failSwapOn: false
resolvConf: $STATE/resolv.conf
clusterDomain: $CLUSTER_DOMAIN
clusterDNS: [$DNS_IP]
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
maxPods: 110
rotateCertificates: false
serverTLSBootstrap: false
protectKernelDefaults: false
EOF
  KUBELET_CONFIG_CHANGED=""
  [ "$kubelet_old" = "$(cat "$STATE/kubelet.yaml")" ] || KUBELET_CONFIG_CHANGED=1
}

ensure_bridge() {  # the pods' bridge with its gateway address up front: CoreDNS listens there before any pod
  ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
  ip -4 addr show dev "$BRIDGE" | grep -q " $DNS_IP/" || ip addr add "$DNS_IP/${POD_CIDR#*/}" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  sysctl -qw "net.ipv4.conf.$BRIDGE.route_localnet=1"
}

ensure_coredns_role() {  # CoreDNS reads as user system:coredns what upstream's ClusterRole of that name grants
  kubectl_ apply -f - >/dev/null <<'EOF'
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "system:coredns"}
rules:
- {apiGroups: [""], resources: [endpoints, services, pods, namespaces], verbs: [list, watch]}
- {apiGroups: [discovery.k8s.io], resources: [endpointslices], verbs: [list, watch]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "system:coredns"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:coredns"}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: "system:coredns"}
EOF
}

dns_answers() {  # the API server's own Service resolves through CoreDNS
  python3 - "$DNS_IP" "kubernetes.default.svc.$CLUSTER_DOMAIN" <<'PY'
import random, socket, struct, sys
server, name = sys.argv[1], sys.argv[2]
qid = random.randrange(65536)
q = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + b"".join(
    bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack(">HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
s.sendto(q, (server, 53)); r = s.recv(512)
sys.exit(0 if struct.unpack(">H", r[:2])[0] == qid and r[3] & 0xF == 0 and struct.unpack(">H", r[6:8])[0] > 0 else 1)
PY
}

ensure_cgroup_root() {  # kubelet's --cgroup-root must exist in every v1 hierarchy it uses
  local c
  for c in /sys/fs/cgroup/*/; do
    case "$c" in */unified/) continue ;; esac
    [ -d "$c" ] && mkdir -p "$c${CGROUP_ROOT#/}" 2>/dev/null || true
  done
}

ensure_pause_image() {
  if ctr --address "$CTRD_SOCK" -n k8s.io images ls -q 2>/dev/null | grep -qx "$PAUSE_IMAGE"; then return; fi
  say "making the pause image $PAUSE_IMAGE from Debian's catatonit"
  local tmp; tmp="$(mktemp -d)"
  mkdir -p "$tmp/root"
  cp "$(command -v catatonit)" "$tmp/root/pause"
  # a one-layer OCI archive for ctr import, built without Docker
  python3 - "$tmp" "$PAUSE_IMAGE" <<'EOF'
import hashlib, io, json, os, sys, tarfile
tmp, ref = sys.argv[1], sys.argv[2]
layer = io.BytesIO()
with tarfile.open(fileobj=layer, mode="w") as tf:
    tf.add(os.path.join(tmp, "root", "pause"), arcname="pause")
layer = layer.getvalue()
def blob(data):
    d = hashlib.sha256(data).hexdigest()
    return "sha256:" + d, data
ld, _ = blob(layer)
config = json.dumps({"architecture": "amd64", "os": "linux",
                     "config": {"Entrypoint": ["/pause", "-P"]},
                     "rootfs": {"type": "layers", "diff_ids": [ld]}}).encode()
cd, _ = blob(config)
manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": len(config)},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ld, "size": len(layer)}]}).encode()
md, _ = blob(manifest)
index = json.dumps({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
    "digest": md, "size": len(manifest), "annotations": {"io.containerd.image.name": ref,
    "org.opencontainers.image.ref.name": ref.rsplit(":", 1)[1]}}]}).encode()
with tarfile.open(os.path.join(tmp, "pause.tar"), "w") as out:
    def add(name, data):
        info = tarfile.TarInfo(name); info.size = len(data); out.addfile(info, io.BytesIO(data))
    add("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
    add("index.json", index)
    for dg, data in ((ld, layer), (cd, config), (md, manifest)):
        add("blobs/sha256/" + dg.split(":")[1], data)
EOF
  ctr --address "$CTRD_SOCK" -n k8s.io images import --index-name "$PAUSE_IMAGE" "$tmp/pause.tar" >/dev/null
  rm -rf "$tmp"
}

load_images() {  # copy images from the Docker engine into the node's containerd (never pulled)
  running containerd || die "the cluster is not running (scripts/ensure-cluster.sh up)"
  local image
  for image in "$@"; do
    docker image inspect "$image" >/dev/null 2>&1 || die "image $image is not in the Docker engine (build it first)"
    docker save "$image" | ctr --address "$CTRD_SOCK" -n k8s.io images import --all-platforms - >/dev/null \
      || die "could not import $image into the node's containerd"
    say "loaded $image into the node"
  done
}

# ------------------------------------------------------------------------------------- up / down
up() {
  mkdir -p "$STATE/logs" "$STATE/run"
  exec 9>"$STATE/.lock"
  flock -w 1800 9 || die "timed out waiting for another $me (lock $STATE/.lock)"
  local ip; ip="$(node_ip)"
  if stale; then
    say "the cluster was killed, not stopped: cleaning up its leftovers first"
    teardown
  fi
  ensure_packages
  ensure_binary
  ensure_coredns_binary
  say "phase certificates (node $NODE at $ip)"
  ensure_pki "$ip"
  save_sysctls
  sysctl -qw fs.inotify.max_user_instances=512 net.ipv4.ip_forward=1 2>/dev/null || true
  sysctl -qw net.bridge.bridge-nf-call-iptables=1 2>/dev/null || true
  ensure_firewall
  ensure_node_files "$ip"
  ensure_bridge
  ensure_cgroup_root

  say "phase control plane"
  start etcd "$BIN" etcd --name default --data-dir "$STATE/etcd" \
    --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster default=http://127.0.0.1:2380 --listen-metrics-urls http://127.0.0.1:2381 \
    --unsafe-no-fsync --quota-backend-bytes 2147483648 --log-level warn
  wait_for "etcd" 60 etcd curl -fsS http://127.0.0.1:2381/health
  local pki="$STATE/pki"
  start kube-apiserver "$BIN" kube-apiserver --etcd-servers=http://127.0.0.1:2379 \
    --bind-address=127.0.0.1 --secure-port=6443 --advertise-address="$ip" \
    --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" --client-ca-file="$pki/ca.crt" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local --service-account-key-file="$pki/sa.pub" \
    --service-account-signing-key-file="$pki/sa.key" --service-cluster-ip-range="$SERVICE_CIDR" \
    --authorization-mode=Node,RBAC --allow-privileged=true --enable-admission-plugins=NodeRestriction \
    --kubelet-client-certificate="$pki/apiserver-kubelet-client.crt" --kubelet-client-key="$pki/apiserver-kubelet-client.key" \
    --kubelet-certificate-authority="$pki/ca.crt" --kubelet-preferred-address-types=InternalIP \
    --endpoint-reconciler-type=lease --profiling=false --v=1
  wait_for "kube-apiserver /readyz" 120 kube-apiserver kubectl_ get --raw /readyz
  start kube-controller-manager "$BIN" kube-controller-manager --kubeconfig="$STATE/controller-manager.kubeconfig" \
    --authentication-kubeconfig="$STATE/controller-manager.kubeconfig" --authorization-kubeconfig="$STATE/controller-manager.kubeconfig" \
    --service-account-private-key-file="$pki/sa.key" --root-ca-file="$pki/ca.crt" \
    --cluster-signing-cert-file="$pki/ca.crt" --cluster-signing-key-file="$pki/ca.key" \
    --use-service-account-credentials=true --leader-elect=false --bind-address=127.0.0.1 --secure-port=10257 \
    --service-cluster-ip-range="$SERVICE_CIDR" --controllers='*,-nodeipam,-cloud-node-lifecycle' --v=1
  start kube-scheduler "$BIN" kube-scheduler --kubeconfig="$STATE/scheduler.kubeconfig" \
    --authentication-kubeconfig="$STATE/scheduler.kubeconfig" --authorization-kubeconfig="$STATE/scheduler.kubeconfig" \
    --leader-elect=false --bind-address=127.0.0.1 --secure-port=10259 --v=1

  say "phase cluster DNS (CoreDNS $COREDNS_VERSION on $DNS_IP:53)"
  ensure_coredns_role
  start coredns "$COREDNS_BIN" -conf "$STATE/coredns/Corefile"
  wait_for "CoreDNS answering on $DNS_IP:53" 60 coredns dns_answers

  say "phase node (containerd, kubelet, kube-proxy)"
  start containerd containerd --config "$STATE/containerd/config.toml"
  wait_for "containerd" 60 containerd ctr --address "$CTRD_SOCK" version
  ensure_pause_image
  if [ -n "$KUBELET_CONFIG_CHANGED" ] && running kubelet; then   # e.g. clusterDNS added: running pods stay
    say "kubelet's configuration changed: restarting kubelet"
    stop_component kubelet
  fi
  start kubelet "$BIN" kubelet --config="$STATE/kubelet.yaml" --kubeconfig="$STATE/kubelet.kubeconfig" \
    --hostname-override="$NODE" --node-ip="$ip" --root-dir="$KUBELET_ROOT" --v=1
  start kube-proxy "$BIN" kube-proxy --kubeconfig="$STATE/kube-proxy.kubeconfig" --hostname-override="$NODE" \
    --proxy-mode=iptables --cluster-cidr="$POD_CIDR" --bind-address=127.0.0.1 --healthz-bind-address=127.0.0.1:10256 \
    --metrics-bind-address=127.0.0.1:10249 --conntrack-max-per-core=0 --conntrack-tcp-timeout-established=0 \
    --conntrack-tcp-timeout-close-wait=0 --v=1
  wait_for "kube-proxy's service rules" 60 kube-proxy kube_proxy_synced
  api_dnat_first
  wait_for "node $NODE Ready" "$WAIT" kubelet \
    bash -c "kubectl --kubeconfig '$KUBECONFIG_ADMIN' --request-timeout=5s get node '$NODE' -o jsonpath='{.status.conditions[?(@.type==\"Ready\")].status}' | grep -qx True"
  wait_for "the default service account" 60 kube-controller-manager kubectl_ -n default get serviceaccount default
  # the base image (the pvc:// store server's default image) when the Docker engine has it
  if command -v docker >/dev/null && docker image inspect python:3.11-slim >/dev/null 2>&1 \
     && ! ctr --address "$CTRD_SOCK" -n k8s.io images ls -q | grep -q 'python:3.11-slim$'; then
    load_images python:3.11-slim
  fi
  say "ready: KUBECONFIG=$KUBECONFIG_ADMIN (kube-all $K8S_VERSION; logs in $STATE/logs)"
}

stop_component() {
  local name="$1" p i
  p="$(cat "$(pidfile "$name")" 2>/dev/null)" || return 0
  if [ -n "$p" ] && kill -0 "$p" 2>/dev/null; then
    kill -TERM "$p" 2>/dev/null || true
    for ((i = 0; i < 40; i++)); do kill -0 "$p" 2>/dev/null || break; sleep 0.25; done
    kill -KILL "$p" 2>/dev/null || true
  fi
  rm -f "$(pidfile "$name")"
}

down() {
  mkdir -p "$STATE/run"
  exec 9>"$STATE/.lock"
  flock -w 600 9 || die "timed out waiting for another $me (lock $STATE/.lock)"
  teardown
}

stale() {  # pid files, but none of their processes: the cluster was killed, not stopped (a session's end)
  local c any=""
  for c in $COMPONENTS; do
    [ -f "$(pidfile "$c")" ] || continue
    any=1
    running "$c" && return 1
  done
  [ -n "$any" ]
}

teardown() {
  local c bin
  bin="$(ls -1t "$CACHE"/k8s/*/kube-all 2>/dev/null | head -n 1 || true)"
  "$(dirname "$0")/ensure-tfjob-operator.sh" down >/dev/null 2>&1 || true   # started beside the control plane
  "$(dirname "$0")/ensure-argo.sh" down >/dev/null 2>&1 || true
  say "stopping kubelet and kube-proxy"
  stop_component kubelet
  stop_component kube-proxy
  [ -n "$bin" ] && "$bin" kube-proxy --cleanup >/dev/null 2>&1 || true
  if [ -S "$CTRD_SOCK" ] && running containerd; then   # every pod sandbox and container of the node
    local ids
    ids="$(ctr --address "$CTRD_SOCK" -n k8s.io tasks ls -q 2>/dev/null || true)"
    for c in $ids; do ctr --address "$CTRD_SOCK" -n k8s.io tasks kill -s SIGKILL "$c" >/dev/null 2>&1 || true; done
    sleep 1
    for c in $ids; do ctr --address "$CTRD_SOCK" -n k8s.io tasks delete -f "$c" >/dev/null 2>&1 || true; done
    for c in $(ctr --address "$CTRD_SOCK" -n k8s.io containers ls -q 2>/dev/null); do
      ctr --address "$CTRD_SOCK" -n k8s.io containers delete "$c" >/dev/null 2>&1 || true
    done
  fi
  say "stopping containerd and the control plane"
  for c in containerd coredns kube-scheduler kube-controller-manager kube-apiserver etcd; do stop_component "$c"; done
  pkill -f "containerd-shim-runc-v2 -namespace k8s.io -address $CTRD_SOCK" 2>/dev/null || true
  # leftover shims of our containerd (they outlive it by design)
  for p in $(pgrep -f "containerd-shim-runc-v2.*$CTRD_SOCK" 2>/dev/null || true); do kill -KILL "$p" 2>/dev/null || true; done
  say "unmounting and removing node state"
  local m
  for m in $(awk -v a="$KUBELET_ROOT" -v b="$CTRD_ROOT" -v c="$CTRD_STATE" -v d="/run/netns/cni-" \
               '{ if (index($2,a)==1 || index($2,b)==1 || index($2,c)==1 || index($2,d)==1) print $2 }' /proc/mounts | sort -r); do
    umount -l "$m" 2>/dev/null || true
  done
  for m in /run/netns/cni-*; do [ -e "$m" ] && { ip netns delete "$(basename "$m")" 2>/dev/null || rm -f "$m"; }; done
  ip link delete "$BRIDGE" 2>/dev/null || true
  for c in $(ip -o link show type veth 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | grep '^veth' || true); do
    [ "$(cat /sys/class/net/$c/master/uevent 2>/dev/null | grep -c "INTERFACE=$BRIDGE")" -gt 0 ] && ip link delete "$c" 2>/dev/null || true
  done
  local ipt t r ch
  for ipt in iptables ip6tables; do   # what kube-proxy --cleanup leaves: kubelet's own KUBE-* chains
    command -v "$ipt" >/dev/null || continue
    for t in filter nat mangle; do
      "$ipt" -w -t "$t" -S 2>/dev/null | grep -E '^-A (INPUT|OUTPUT|FORWARD|PREROUTING|POSTROUTING) .*KUBE-' | sed 's/^-A /-D /' \
        | while read -r r; do eval "$ipt -w -t $t $r" 2>/dev/null || true; done || true
      ch="$("$ipt" -w -t "$t" -S 2>/dev/null | awk '/^-N KUBE-/ {print $2}' || true)"
      for r in $ch; do "$ipt" -w -t "$t" -F "$r" 2>/dev/null || true; done
      for r in $ch; do "$ipt" -w -t "$t" -X "$r" 2>/dev/null || true; done
    done
  done
  iptables -w -D FORWARD -j "$FW_CHAIN" 2>/dev/null || true
  iptables -w -t nat -D PREROUTING $API_DNAT 2>/dev/null || true
  iptables -w -F "$FW_CHAIN" 2>/dev/null || true
  iptables -w -X "$FW_CHAIN" 2>/dev/null || true
  for c in /sys/fs/cgroup/*/; do
    [ -d "$c${CGROUP_ROOT#/}" ] && find "$c${CGROUP_ROOT#/}" -depth -type d -exec rmdir {} + 2>/dev/null || true
  done
  rm -rf "$KUBELET_ROOT" "$CTRD_ROOT" "$CTRD_STATE" "$STATE/etcd" "$STATE/cni/ipam" "$STATE/run" "$STATE/volumes"
  if [ -f "$STATE/sysctl.saved" ]; then
    while IFS= read -r kv; do sysctl -qw "$kv" 2>/dev/null || true; done < "$STATE/sysctl.saved"
    rm -f "$STATE/sysctl.saved"
  fi
  say "down: no cluster process, mount, link, rule or changed sysctl left (certificates kept in $STATE/pki)"
}

status() {
  local c
  for c in $COMPONENTS; do
    if running "$c"; then echo "$c: running (pid $(cat "$(pidfile "$c")"))"; else echo "$c: stopped"; fi
  done
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  status) status ;;
  load-image) shift; [ $# -gt 0 ] || die "usage: $0 load-image IMAGE..."; load_images "$@" ;;
  kubeconfig) echo "$KUBECONFIG_ADMIN" ;;
  build) mkdir -p "$STATE/logs"; ensure_binary ;;
  *) die "usage: $0 [up|down|status|load-image IMAGE...|kubeconfig|build]" ;;
esac
