#!/usr/bin/env bash
# Builds the Go programs of one wrapper module under tests/peers/ into a cache directory
# outside the repository, keyed by the module's go.mod/go.sum and the Go version, so a second
# run finds them and returns at once.
#
#   tests/peers/build-go.sh <module-dir> <binary>=<package> [<binary>=<package> ...]
#
# Prints the directory that holds the binaries on its last line of standard output.
# Extra linker flags can be passed through LDFLAGS; a module that needs a newer Go than the
# machine's names the toolchain in GO_TOOLCHAIN (fetched by the go command from the module proxy).
# GO_SKIP_DOWNLOAD=1 leaves the downloads to `go build`, which fetches only the modules it
# compiles (for a module graph holding a version whose metadata the proxy refuses).
set -euo pipefail

module_dir=$1
shift
name=$(basename "$module_dir")
cache_root=${CATALOG_BRIDGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/catalog-bridge}
export GOTOOLCHAIN=${GO_TOOLCHAIN:-local}
export CGO_ENABLED=0
export GOFLAGS="-buildvcs=false -mod=readonly"

# The key covers the pins, the wrapper's own Go sources (e.g. etcd's naming-reader), the Go
# version, what is built and the linker flags.
key=$( (cat "$module_dir/go.mod" "$module_dir/go.sum"; find "$module_dir" -name '*.go' -type f | LC_ALL=C sort | xargs -r cat; go version; echo "$*"; echo "${LDFLAGS:-}") | sha256sum | cut -c1-16)
out="$cache_root/peers/$name-$key"

have_all() {
  local spec
  for spec in "$@"; do
    [ -x "$out/${spec%%=*}" ] || return 1
  done
}

if have_all "$@"; then
  echo "$name: cached in $out" >&2
  echo "$out"
  exit 0
fi

mkdir -p "$cache_root/peers"
tmp=$(mktemp -d "$cache_root/peers/.$name-XXXXXX")
chmod 755 "$tmp"
log="$tmp/build.log"
trap 'kill "${ticker:-}" 2>/dev/null || true; rm -rf "$tmp"' EXIT

echo "$name: building $* (first run on this machine; later runs reuse $out)" >&2
start=$(date +%s)
(
  while sleep 30; do
    n=$(grep -c . "$log" 2>/dev/null || true)
    echo "$name: still building after $(( $(date +%s) - start ))s, ${n:-0} packages compiled so far" >&2
  done
) &
ticker=$!

cd "$module_dir"
if [ -z "${GO_SKIP_DOWNLOAD:-}" ]; then
  go mod download -x >/dev/null 2>>"$log.download" || { cat "$log.download" >&2; exit 1; }
fi
for spec in "$@"; do
  bin=${spec%%=*}
  pkg=${spec#*=}
  echo "$name: go build $pkg -> $bin" >&2
  if ! go build -v -trimpath -ldflags "-s -w ${LDFLAGS:-}" -o "$tmp/$bin" "$pkg" 2>>"$log"; then
    echo "$name: build of $pkg failed; last lines of the log:" >&2
    tail -n 40 "$log" >&2
    exit 1
  fi
done
kill "$ticker" 2>/dev/null || true

rm -f "$log" "$log.download"
rm -rf "$out"
mv "$tmp" "$out"
trap - EXIT
echo "$name: built in $(( $(date +%s) - start ))s" >&2
echo "$out"
