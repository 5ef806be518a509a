# syntax=docker/dockerfile:1
#
# walcast container image.
#
#   docker build -t walcast:local .
#   docker run --rm walcast:local --version
#
# Build stage: the official Rust image (Debian bookworm). protoc is not needed:
# build.rs compiles proto/ with protox (pure Rust).
FROM rust:1-bookworm AS build
WORKDIR /src

# Only what `cargo build` reads (see .dockerignore): the manifest and lock file,
# the build script and the .proto files it compiles, the sources, the
# migrations, which src/migrate.rs embeds with include_str!, and the patched
# crates in vendor/.
COPY Cargo.toml Cargo.lock ./
COPY proto ./proto
# Workspace members: cargo loads every member's manifest, and the daemon
# uses the client crate's generated event types.
COPY clients/rust ./clients/rust
COPY examples/ws-gateway ./examples/ws-gateway
COPY migrations ./migrations
COPY src ./src
# Crates patched in-tree ([patch.crates-io], vendor/README.md).
COPY vendor ./vendor

# --locked: build exactly the dependency versions in Cargo.lock.
# The cache mounts keep the registry and target/ between builds (BuildKit), so
# the binary is copied out of target/ in the same step. The release profile
# keeps debug info (for profiling); the image does not need it: stripping it
# takes the binary from ~95 MB to ~16 MB and keeps the symbols, so backtraces
# still name functions.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin walcast \
    && objcopy --strip-debug target/release/walcast /usr/local/bin/walcast

# Runtime stage: distroless "cc" (glibc, libgcc, CA certificates; same Debian 12
# as the builder) with no shell and no package manager. walcast is PID 1 and
# handles SIGTERM itself (drain, checkpoint, exit 0), so no init is needed.
FROM gcr.io/distroless/cc-debian12:nonroot

LABEL org.opencontainers.image.title="walcast" \
      org.opencontainers.image.description="PostgreSQL logical replication to per-tenant protobuf events on NATS JetStream" \
      org.opencontainers.image.licenses="Apache-2.0"

COPY --from=build /usr/local/bin/walcast /usr/local/bin/walcast

# The distroless "nonroot" user, by number: Kubernetes' runAsNonRoot can only
# verify a numeric USER.
USER 65532:65532

# /metrics, /healthz, /readyz. The daemon listens on 127.0.0.1:9187 unless told
# otherwise; in a container set WALCAST_HTTP_ADDR=0.0.0.0:9187 (or http_addr in
# the config file) so probes and Prometheus can reach it. It is deliberately
# not set here, because an ENV in the image would override the config file.
EXPOSE 9187

# No HEALTHCHECK: the image has no shell or curl. Kubernetes probes GET /healthz
# (liveness) and GET /readyz (readiness) on port 9187 instead; with Compose,
# check http://127.0.0.1:9187/readyz from the host.

ENTRYPOINT ["walcast"]
CMD ["run"]
