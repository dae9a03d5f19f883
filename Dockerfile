# The fleet image: the `worker` binary (every role: `worker run --role <role>`) and the `dlq` CLI.
# Multi-stage: a full Rust toolchain builds, a distroless image (no shell, no package manager) runs.
#
#   docker build -t order-fleet:$(git rev-parse --short HEAD) .
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin worker --bin dlq \
 && mkdir -p /out && cp target/release/worker target/release/dlq /out/

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/worker /out/dlq /usr/local/bin/
COPY config/production.toml /etc/fleet/production.toml
COPY config/catalog.json /etc/fleet/catalog.json
ENV FLEET_CONFIG=/etc/fleet/production.toml
# A numeric non-root uid (no shell or passwd entry needed); the task definitions run as the same uid.
USER 10001:10001
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 CMD ["/usr/local/bin/worker", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/worker"]
CMD ["run", "--role", "all"]
