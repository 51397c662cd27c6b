# catalog-bridge — everything a fresh machine needs goes through these targets.
SHELL := /bin/bash
CACHE ?= $(or $(CATALOG_BRIDGE_CACHE),$(HOME)/.cache/catalog-bridge)
export CATALOG_BRIDGE_CACHE := $(CACHE)
# Rust build products live outside the checkout too, so a fresh clone builds incrementally.
export CARGO_TARGET_DIR ?= $(CACHE)/cargo-target
export GOTOOLCHAIN := local
CARGO ?= cargo

.PHONY: help peers build crds lint test test-node bench env demo image clean-cache

help:
	@echo "make demo   - the scenario on loopback: api_x in Consul, memcache in etcd, mysql_x imported from ZooKeeper"
	@echo "make test   - set up the peers, check formatting and lints, run every test"
	@echo "make test-node - the chart as Pods on a real kubelet node (root): install, rolling update, leader Pod deleted, uninstall"
	@echo "make bench  - convergence, propagation and import benchmarks against real Consul, etcd and ZooKeeper, and external-dns side by side (BENCH=export or BENCH=external_dns: one of them)"
	@echo "make env    - start the real API server and catalogs on loopback until Ctrl-C (NODE=1: and a node with the image)"
	@echo "make peers  - build/install the real peers (cached outside the repo)"
	@echo "make image  - the container image without Docker: a docker-archive of the release binary (IMAGE=path)"

peers:
	@tests/peers/setup.sh

build:
	$(CARGO) build --workspace --all-targets

# crds/ (and the chart's copy) is generated from the Rust types; tests fail when they drift.
crds:
	$(CARGO) run -q -- crds > crds/crds.yaml
	cp crds/crds.yaml charts/catalog-bridge/crds/crds.yaml

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$$(grep ^CB_HELM= tests/peers/.env | cut -d= -f2) lint --strict charts/catalog-bridge

test: peers lint
	timeout --foreground 60m $(CARGO) test --workspace --no-fail-fast

# The chart on a real node: kubelet, containerd and runc run two replicas as Pods through
# helm install, a rolling update, a leader Pod deleted and helm uninstall (tests/node.rs; needs
# root: the node runs in a network namespace of its own).
test-node: peers
	timeout --foreground 20m $(CARGO) test --test node -- --ignored --nocapture

# Benchmarks against the real servers, each reported as a ratio to a floor run in the same process.
# SCALE=100k: 10,000 Services x 10 endpoints (100,000 instances) instead of 1,000 x 10.
# BENCH_CATALOGS=etcd,zookeeper: only those catalogs (consul, etcd, zookeeper, import).
# BENCH=external_dns: only the side by side with external-dns (BENCH=export: only the export one).
# external-dns is built by tests/peers/external-dns.sh on the first run (cached outside the repo).
BENCH ?= export external_dns
bench: peers
	$(if $(filter external_dns,$(BENCH)),xdns=$$(tests/peers/external-dns.sh) && export CB_EXTERNAL_DNS=$$xdns && ,)\
	SCALE=$(SCALE) BENCH_CATALOGS=$(BENCH_CATALOGS) $(CARGO) bench $(foreach b,$(BENCH),--bench $(b))

# NODE=1: also a node (kubelet, containerd, kube-proxy, kube-scheduler) with the image of
# `make image` loaded, everything in a network namespace of its own (needs root).
env: peers $(if $(NODE),image)
	$(CARGO) run -q -p localenv -- $(if $(NODE),--node --image $(IMAGE))

# The scenario on loopback: real API server and catalogs, the controller, example Services.
demo: peers
	@echo "==> building catalog-bridge and the demo (the first build takes a few minutes)"
	$(CARGO) build --bin catalog-bridge --example demo
	CATALOG_BRIDGE_BIN=$(CARGO_TARGET_DIR)/debug/catalog-bridge $(CARGO_TARGET_DIR)/debug/examples/demo

# The container image without Docker: the release binary, the shared libraries it loads, the CA
# bundle and the non-root user 65532, as a docker-archive tagged catalog-bridge:<version> (the
# chart's default image). Load it with `docker load -i` or `ctr -n k8s.io images import`.
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
IMAGE ?= $(CACHE)/image/catalog-bridge-$(VERSION).tar
image:
	$(CARGO) build --release --locked --bin catalog-bridge
	mkdir -p $(dir $(IMAGE))
	$(CARGO) run -q -p localenv --bin image -- --binary $(CARGO_TARGET_DIR)/release/catalog-bridge --tag catalog-bridge:$(VERSION) --out $(IMAGE)

clean-cache:
	rm -rf "$(CACHE)"
