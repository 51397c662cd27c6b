#!/usr/bin/env bash
# Builds external-dns, the peer `make bench` measures the etcd `coredns` layout against, once per
# version into the cache outside the repository (beside the other peers), and prints the path of
# the binary on its last line. Only the external-dns bench needs it: `make test` never runs this.
#
# external-dns v0.23.0 needs Go >= 1.27 (GO_TOOLCHAIN below, fetched by the go command for this
# build alone) and two of its exact requirements are not served by the module proxy: the wrapper
# module beside this file replaces them (see its go.mod). A third one,
# github.com/openshift/client-go's, is served as a module but its version metadata is refused,
# so `go mod download` of the whole graph fails: `go build` fetches what it compiles instead. About 5 minutes on 2 cores the first
# time; a 160 MB binary.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# The version is the one the wrapper module pins.
version=$(awk '$1 == "sigs.k8s.io/external-dns" { print $2 }' "$here/external-dns/go.mod")
[ -n "$version" ] || { echo "external-dns: no version pinned in $here/external-dns/go.mod" >&2; exit 1; }
dir=$(GO_TOOLCHAIN=go1.27.3 GO_SKIP_DOWNLOAD=1 LDFLAGS="-X sigs.k8s.io/external-dns/pkg/apis/externaldns.Version=$version" \
  "$here/build-go.sh" "$here/external-dns" external-dns=sigs.k8s.io/external-dns | tail -n 1)
echo "$dir/external-dns"
