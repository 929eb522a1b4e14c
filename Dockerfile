# The ambit agent image: `docker build -t ambit .` from the repository root.
#
# Without a registry (`cargo xtask image`): the `prebuilt` stage takes a binary built on the
# host and a locally made base image, e.g.
#   podman build --target prebuilt --build-arg RUNTIME_BASE=localhost/ambit-base:bookworm -f Dockerfile DIR
# where DIR holds only `ambit`.
ARG RUNTIME_BASE=debian:bookworm-slim

# Build stage: the same setup as `cargo xtask setup` (LLVM 22 for bpf-linker, rust-src), then a
# release build of the agent with its eBPF programs embedded.
FROM rust:1.95-bookworm AS build
RUN echo "deb http://deb.debian.org/debian-security bookworm-security main" > /etc/apt/sources.list.d/security.list \
 && apt-get update -q \
 && apt-get install -y -q --no-install-recommends llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev libxml2-dev \
 && rm -rf /var/lib/apt/lists/*
RUN rustup component add rust-src \
 && LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --version 0.13.0 --locked --no-default-features --features llvm-22
WORKDIR /src
COPY . .
RUN cargo build --release --package ambit --bin ambit

# The same run stage from a binary built on the host (`cargo xtask image`).
FROM ${RUNTIME_BASE} AS prebuilt
COPY ambit /usr/local/bin/ambit
ENTRYPOINT ["/usr/local/bin/ambit"]
CMD ["agent"]

# Run stage (the default target): the binary and nothing else it does not need.
FROM ${RUNTIME_BASE}
COPY --from=build /src/target/release/ambit /usr/local/bin/ambit
ENTRYPOINT ["/usr/local/bin/ambit"]
CMD ["agent"]
