# syntax=docker/dockerfile:1
#
# bosun container image.
#
#   docker build -t bosun .
#   docker run --rm -v "$PWD/config/bosun.toml:/etc/bosun/bosun.toml:ro" -p 9090:9090 bosun
#
# The image runs `bosun run --config /etc/bosun/bosun.toml` as an unprivileged user. The HTTP
# listener (/metrics, /healthz, /readyz) is moved to 0.0.0.0:9090 by BOSUN__HTTP__LISTEN so it
# is reachable from outside the container, whatever the mounted file says.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

# --- build --------------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
# cmake: the TLS stack (aws-lc) falls back to it where its plain C build is not supported.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src

# Dependencies first, against placeholder sources: this layer is rebuilt only when
# Cargo.toml or Cargo.lock change, not on every source edit. Cargo reads every target the
# manifest declares, so each [[bench]] in Cargo.toml needs its placeholder here
# (tests/artifacts.rs replays these steps and fails when one is missing).
COPY Cargo.toml Cargo.lock ./
COPY vendor vendor
RUN mkdir -p src benches \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && for bench in harness reliability; do echo 'fn main() {}' > "benches/$bench.rs"; done \
 && cargo build --release --locked \
 && rm -rf src benches

# The real sources. Without a database at build time, sqlx's compile-time checked queries
# (if any) use the prepared metadata in .sqlx/.
ENV SQLX_OFFLINE=true
COPY . .
# Make the real sources newer than the placeholder build so cargo rebuilds the crate.
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked \
 && install -m 0755 target/release/bosun /usr/local/bin/bosun \
 && /usr/local/bin/bosun version

# --- runtime ------------------------------------------------------------------------------
FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# ca-certificates: amqps://, rediss://, https:// webhooks and TLS to PostgreSQL.
# tini: reaps the children of exec handlers and forwards signals; bosun is its only child.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates tini \
 && rm -rf /var/lib/apt/lists/*

# A fixed uid/gid so volume permissions and Kubernetes' runAsUser can name it.
ARG BOSUN_UID=10001
RUN groupadd --system --gid ${BOSUN_UID} bosun \
 && useradd --system --uid ${BOSUN_UID} --gid bosun --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin bosun \
 && install -d -o root -g bosun -m 0750 /etc/bosun

COPY --from=build /usr/local/bin/bosun /usr/local/bin/bosun
COPY config/bosun.toml /etc/bosun/bosun.toml

ENV BOSUN_CONFIG=/etc/bosun/bosun.toml \
    BOSUN__HTTP__LISTEN=0.0.0.0:9090 \
    BOSUN_PROBE_URL=http://127.0.0.1:9090/healthz
USER bosun:bosun
EXPOSE 9090

# /healthz answers 200 while the supervisor loop turns. The image has no curl: `bosun probe`
# is the client.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
  CMD ["/usr/local/bin/bosun", "probe", "--timeout", "4s"]

# SIGTERM drains in-flight work for up to [service].shutdown_timeout (30s by default): give
# `docker stop` more than that (docker stop -t 45, or stop_grace_period in compose).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/bosun"]
CMD ["run"]
