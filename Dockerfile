# pullcache container image: a Rust build stage and a small Debian runtime that runs as a
# non-root user.
#
#   docker build -t pullcache .
#   docker run -d --name pullcache -p 3128:3128 -v pullcache-cache:/cache -v pullcache-certs:/certs pullcache
#
# The CA is generated into /certs on first start; keep that volume (clients trust that CA)
# and never bake it into an image. The admin API listens on 127.0.0.1:3129 *inside* the
# container, so only `docker exec pullcache pullcache stats` reaches it; to publish it, run
# with `--admin-listen 0.0.0.0:3129` and set PULLCACHE_ADMIN_TOKEN (required off loopback).
# See docs/setup.md ("Running pullcache in a container").
#
# The base images are build arguments so that the build can be checked offline with locally
# imported images (see docs/setup.md).
ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
WORKDIR /src
# Keep symbol names (readable panics), drop the debug info Cargo.toml asks for: a smaller binary.
ENV CARGO_PROFILE_RELEASE_STRIP=debuginfo
# Dependencies first, in their own layer: a source change does not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
    && echo 'fn main() {}' >src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked --bin pullcache \
    && rm -rf src target/release/.fingerprint/pullcache-* target/release/deps/pullcache-* \
        target/release/deps/libpullcache-* target/release/pullcache*
COPY src ./src
# Embedded into the setup recipes (include_str!).
COPY scripts/install-ca.sh ./scripts/install-ca.sh
RUN cargo build --release --locked --bin pullcache \
    && install -D -m 0755 target/release/pullcache /out/pullcache

FROM ${RUNTIME_IMAGE}
# Roots for upstream TLS (registries, CDNs) from the build stage: no package manager run here.
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /out/pullcache /usr/local/bin/pullcache
RUN useradd --system --uid 10001 --user-group --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin pullcache \
    && mkdir -p /cache /certs \
    && chown pullcache:pullcache /cache /certs \
    && chmod 0700 /certs
USER pullcache
VOLUME ["/cache", "/certs"]
# 3128: the proxy (HTTPS_PROXY=http://HOST:3128, GET /ca.crt, GET /setup/<target>).
# 3129: the admin API, only reachable from outside with --admin-listen 0.0.0.0:3129 and a token.
EXPOSE 3128 3129
ENTRYPOINT ["pullcache"]
CMD ["serve", "--listen", "0.0.0.0:3128", "--admin-listen", "127.0.0.1:3129", "--ca-dir", "/certs", "--cache-dir", "/cache"]
