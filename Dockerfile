# syntax=docker/dockerfile:1
# ringrouter: release build on the official Rust image (Debian bookworm), run on distroless.
#
#   docker build -t ringrouter .
#   docker run --rm -p 30000:30000 --security-opt seccomp=deploy/seccomp-io-uring.json \
#       ringrouter --host 0.0.0.0 --worker-urls http://10.0.0.1:8000
#
# Without that seccomp profile Docker's default one refuses io_uring_setup/enter/register
# and the router runs on epoll (it logs driver="epoll" per shard).
#
# tools/docker-build-check.sh reads RUSTFLAGS' default and the `cargo build` line below and
# runs the same build without Docker (CI runs it): keep both on one line each.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS builder
# sonic-rs takes its SIMD paths only when AVX2 and PCLMULQDQ are on at compile time.
# x86-64-v3 (Haswell / Zen 1 and later) gives AVX2 and lets the compiler use the rest of
# that level; PCLMULQDQ is in no x86-64 level, so it is named. The result runs on any
# x86-64-v3 CPU, not only the build host (unlike target-cpu=native). Setting RUSTFLAGS
# replaces .cargo/config.toml's flags. For aarch64: --build-arg RUSTFLAGS="".
ARG RUSTFLAGS="-C target-cpu=x86-64-v3 -C target-feature=+pclmulqdq"
ENV RUSTFLAGS=${RUSTFLAGS}
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY .cargo .cargo
COPY src src
COPY shards shards
COPY frontend frontend
COPY grpc-proto grpc-proto
COPY tools tools
COPY benches benches
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin ringrouter \
    && install -D -m 0755 target/release/ringrouter /out/ringrouter

# glibc, libgcc and CA certificates (the Kubernetes API client's TLS), no shell; runs as
# uid/gid 65532 ("nonroot").
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /out/ringrouter /usr/local/bin/ringrouter
USER 65532:65532
# 30000: requests (and /health, /readiness, /liveness); 29000: Prometheus metrics.
EXPOSE 30000 29000
ENTRYPOINT ["ringrouter"]
CMD ["--help"]
