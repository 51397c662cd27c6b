# syntax=docker/dockerfile:1
# The catalog-bridge image: the release binary on distroless (glibc, CA certificates, no shell),
# running as the non-root user 65532.
#
#   docker build -t <registry>/catalog-bridge:0.1.0 .
#
# Without Docker, `make image` writes an equivalent image as a docker-archive.
#   helm install catalog-bridge charts/catalog-bridge --set image.repository=<registry>/catalog-bridge

ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
# protoc and its well-known types: etcd-client compiles etcd's protobuf definitions at build time.
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler libprotobuf-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# The whole workspace (tests/localenv is a member; benches and examples are declared targets),
# minus what .dockerignore leaves out.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin catalog-bridge \
 && cp target/release/catalog-bridge /catalog-bridge \
 && /catalog-bridge version

# cc: glibc and libgcc for a Rust binary built on Debian bookworm; nonroot: uid/gid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="catalog-bridge" \
      org.opencontainers.image.description="Keeps Consul, etcd and ZooKeeper service catalogs in sync with Kubernetes, both ways" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /catalog-bridge /catalog-bridge
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/catalog-bridge"]
CMD ["run"]
