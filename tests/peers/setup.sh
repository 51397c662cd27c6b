#!/usr/bin/env bash
# Sets up every peer the tests, `make env` and `make demo` run, on a fresh machine or a warm one:
#   - Debian packages: protobuf-compiler and libprotobuf-dev (etcd-client's build), ZooKeeper 3.8,
#     Java (JDK and Maven for the Curator client), openssl;
#   - Go programs built from the pinned wrapper modules beside this file, once per version, into
#     a cache outside the repository: kube-apiserver, kube-controller-manager, kubectl (v1.36),
#     etcd + etcdctl (v3.6) and a reader of the gRPC resolver's layout, Consul (v1.14), helm (v3.22);
#   - the node (make test-node, make env NODE=1): Debian's containerd, runc, CNI plugins, iptables,
#     conntrack, iproute2 and gcc; kubelet, kube-proxy and kube-scheduler (v1.36); Kubernetes' pause
#     program (build/pause/linux/pause.c) built static, for the sandbox image;
#   - Curator's ServiceDiscovery, to read and register in the curator layout (Maven, cached);
#   - a Python virtualenv with the real catalog clients (kazoo, py-consul), also cached.
# Writes the paths to tests/peers/.env, which the test harness (tests/localenv) reads.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache_root=${CATALOG_BRIDGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/catalog-bridge}
export CATALOG_BRIDGE_CACHE=$cache_root
mkdir -p "$cache_root"

step() { echo "==> $*" >&2; }

# --- Debian packages -------------------------------------------------------------------------
need_pkgs=()
command -v protoc >/dev/null 2>&1 || need_pkgs+=(protobuf-compiler)
# protoc's well-known types (google/protobuf/*.proto), which etcd's definitions import.
[ -f /usr/include/google/protobuf/descriptor.proto ] || need_pkgs+=(libprotobuf-dev)
[ -f /usr/share/java/zookeeper.jar ] || need_pkgs+=(zookeeper)
command -v java >/dev/null 2>&1 || need_pkgs+=(default-jre-headless)
command -v openssl >/dev/null 2>&1 || need_pkgs+=(openssl)
command -v javac >/dev/null 2>&1 || need_pkgs+=(default-jdk-headless)
command -v mvn >/dev/null 2>&1 || need_pkgs+=(maven)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_pkgs+=(python3-venv)
# The node: the container runtime Debian ships (containerd 1.6 speaks CRI v1 to kubelet 1.36),
# runc (crun refuses hybrid cgroups), the CNI bridge and host-local plugins, kube-proxy's tools.
command -v containerd >/dev/null 2>&1 || need_pkgs+=(containerd)
command -v runc >/dev/null 2>&1 || need_pkgs+=(runc)
[ -x /usr/lib/cni/bridge ] || need_pkgs+=(containernetworking-plugins)
command -v iptables >/dev/null 2>&1 || need_pkgs+=(iptables)
command -v conntrack >/dev/null 2>&1 || need_pkgs+=(conntrack)
command -v ip >/dev/null 2>&1 || need_pkgs+=(iproute2)
command -v gcc >/dev/null 2>&1 || need_pkgs+=(gcc libc6-dev)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  step "installing Debian packages: ${need_pkgs[*]}"
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi
[ -f /usr/share/java/zookeeper.jar ] || { echo "ZooKeeper's jar is missing after install" >&2; exit 1; }

# --- Go programs -----------------------------------------------------------------------------
command -v go >/dev/null 2>&1 || { echo "go is required to build the test peers" >&2; exit 1; }
kube_version=v1.36.3
kube_ldflags="-X k8s.io/component-base/version.gitVersion=$kube_version"
kube_ldflags+=" -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=36"
kube_ldflags+=" -X k8s.io/component-base/version.gitTreeState=clean"
kube_ldflags+=" -X k8s.io/component-base/version.buildDate=2026-01-01T00:00:00Z"

step "Go peers (cache: $cache_root/peers)"
etcd_dir=$("$here/build-go.sh" "$here/etcd" etcd=go.etcd.io/etcd/server/v3 etcdctl=go.etcd.io/etcd/etcdctl/v3 \
  etcd-naming-reader=./naming-reader | tail -n 1)
consul_dir=$("$here/build-go.sh" "$here/consul" consul=github.com/hashicorp/consul | tail -n 1)
helm_dir=$("$here/build-go.sh" "$here/helm" helm=helm.sh/helm/v3/cmd/helm | tail -n 1)
kube_dir=$(LDFLAGS="$kube_ldflags" "$here/build-go.sh" "$here/kube" \
  kube-apiserver=k8s.io/kubernetes/cmd/kube-apiserver \
  kube-controller-manager=k8s.io/kubernetes/cmd/kube-controller-manager \
  kubectl=k8s.io/kubernetes/cmd/kubectl | tail -n 1)
# The node's programs, from the same pins (a cache entry of their own).
node_dir=$(LDFLAGS="$kube_ldflags" "$here/build-go.sh" "$here/kube" \
  kubelet=k8s.io/kubernetes/cmd/kubelet \
  kube-proxy=k8s.io/kubernetes/cmd/kube-proxy \
  kube-scheduler=k8s.io/kubernetes/cmd/kube-scheduler | tail -n 1)
# The sandbox (pause) program, Kubernetes' own source from the pinned module, linked static.
pause_src=$(cd "$here/kube" && GOFLAGS=-mod=readonly go mod download -json k8s.io/kubernetes \
  | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')/build/pause/linux/pause.c
[ -f "$pause_src" ] || { echo "pause.c not found in the k8s.io/kubernetes module ($pause_src)" >&2; exit 1; }
pause_key=$( (cat "$pause_src"; gcc --version | head -n 1) | sha256sum | cut -c1-16)
pause_bin="$cache_root/peers/pause-$pause_key/pause"
if [ ! -x "$pause_bin" ]; then
  step "building the pause program into $(dirname "$pause_bin")"
  mkdir -p "$(dirname "$pause_bin")"
  gcc -Os -Wall -Werror -static -DVERSION=catalog-bridge-node -o "$pause_bin.tmp" "$pause_src"
  mv "$pause_bin.tmp" "$pause_bin"
fi

# --- Curator's own client (Java, Maven Central) ---------------------------------------------
cr_src="$here/curator-client"
cr_key=$( (cat "$cr_src/pom.xml" "$cr_src"/src/main/java/io/catalogbridge/peers/*.java; java -version 2>&1) | sha256sum | cut -c1-16)
cr_dir="$cache_root/peers/curator-client-$cr_key"
if [ -f "$cr_dir/curator-client-1.jar" ]; then
  echo "curator-client: cached in $cr_dir" >&2
else
  step "building the Curator client (curator-x-discovery from Maven Central) into $cr_dir"
  cr_tmp=$(mktemp -d "$cache_root/peers/.curator-client-XXXXXX")
  cp -r "$cr_src/." "$cr_tmp/src-copy"
  (cd "$cr_tmp/src-copy" && mvn -q -B package dependency:copy-dependencies -DincludeScope=runtime) \
    >"$cr_tmp/mvn.log" 2>&1 \
    || { cat "$cr_tmp/mvn.log" >&2; echo "curator-client: the Maven build failed" >&2; rm -rf "$cr_tmp"; exit 1; }
  mkdir -p "$cr_tmp/out"
  cp "$cr_tmp"/src-copy/target/curator-client-1.jar "$cr_tmp"/src-copy/target/dependency/*.jar "$cr_tmp/out/"
  rm -rf "$cr_dir"
  mv "$cr_tmp/out" "$cr_dir"
  rm -rf "$cr_tmp"
fi

# --- Python clients --------------------------------------------------------------------------
req="$here/requirements.txt"
venv="$cache_root/venv-$( (cat "$req"; python3 --version) | sha256sum | cut -c1-16)"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import kazoo, consul' >/dev/null 2>&1; then
  step "Python clients into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -r "$req"
fi

# --- Paths for the harness -------------------------------------------------------------------
cat > "$here/.env" <<EOF
CB_KUBE_APISERVER=$kube_dir/kube-apiserver
CB_KUBE_CONTROLLER_MANAGER=$kube_dir/kube-controller-manager
CB_KUBECTL=$kube_dir/kubectl
CB_ETCD=$etcd_dir/etcd
CB_ETCDCTL=$etcd_dir/etcdctl
CB_ETCD_NAMING_READER=$etcd_dir/etcd-naming-reader
CB_CONSUL=$consul_dir/consul
CB_HELM=$helm_dir/helm
CB_KUBELET=$node_dir/kubelet
CB_KUBE_PROXY=$node_dir/kube-proxy
CB_KUBE_SCHEDULER=$node_dir/kube-scheduler
CB_PAUSE=$pause_bin
CB_CONTAINERD=$(command -v containerd)
CB_CTR=$(command -v ctr)
CB_RUNC=$(command -v runc)
CB_CNI_BIN=/usr/lib/cni
CB_JAVA=$(readlink -f "$(command -v java)")
CB_ZOOKEEPER_CLASSPATH=/usr/share/java/*:/usr/share/zookeeper/*
CB_PYTHON=$venv/bin/python
CB_CURATOR_CLASSPATH=$cr_dir/*
EOF
step "peers ready (paths in $here/.env)"
