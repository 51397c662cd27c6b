# catalog-bridge — everything a fresh machine needs goes through these targets.
SHELL := /bin/bash
CACHE ?= $(or $(CATALOG_BRIDGE_CACHE),$(HOME)/.cache/catalog-bridge)
export CATALOG_BRIDGE_CACHE := $(CACHE)
# Rust build products live outside the checkout too, so a fresh clone builds incrementally.
export CARGO_TARGET_DIR ?= $(CACHE)/cargo-target
export GOTOOLCHAIN := local
CARGO ?= cargo

.PHONY: help peers build crds lint test env demo clean-cache

help:
	@echo "make demo   - the local environment with the controller and the example scenario"
	@echo "make test   - set up the peers, check formatting and lints, run every test"
	@echo "make env    - start the real API server and catalogs on loopback until Ctrl-C"
	@echo "make peers  - build/install the real peers (cached outside the repo)"

peers:
	@tests/peers/setup.sh

build:
	$(CARGO) build --workspace --all-targets

# crds/ is generated from the Rust types; tests/crds.rs fails when it drifts.
crds:
	$(CARGO) run -q -- crds > crds/crds.yaml

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

test: peers lint
	timeout --foreground 60m $(CARGO) test --workspace --no-fail-fast

env: peers
	$(CARGO) run -q -p localenv

# Until the controller runs in the demo, the demo is the environment itself.
demo: env

clean-cache:
	rm -rf "$(CACHE)"
