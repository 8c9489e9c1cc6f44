# One image for every paxos-commit process: the coordinator replica, the participant agent
# and txctl. The build stage compiles the release binaries; the runtime stage carries only
# them (they need only glibc) and runs as an unprivileged user.
#
#   podman build -t paxos-commit:latest .        (or docker build)
#
# Configuration comes from a TOML file (--config), PAXOS_COMMIT_* / PAXOS_AGENT_* variables
# and mounted certificates; health is the gRPC health service on the main port (see
# docs/DEPLOY.md and deploy/).

ARG RUST_IMAGE=docker.io/library/rust:1-bookworm
ARG RUNTIME_IMAGE=docker.io/library/debian:bookworm-slim
# Where the binaries come from: the build stage below, or (where no Rust image can be
# pulled, as in CI) an image holding binaries built outside, at /usr/local/bin.
ARG BINARIES=build

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY proto proto
COPY coordinator coordinator
COPY participant-agent participant-agent
COPY migrations migrations
COPY integration integration
# Only the three shipped binaries; the integration crate is in the workspace but not built.
RUN cargo build --release --locked -p paxos-commit-coordinator -p paxos-commit-agent --bins \
    && install -m 0755 target/release/coordinator target/release/participant-agent \
        target/release/txctl /usr/local/bin/

FROM ${BINARIES} AS binaries

# No packages are added: the processes trust only the deployment's own CA, given as a file.
FROM ${RUNTIME_IMAGE}
RUN groupadd --system --gid 10001 paxos-commit \
    && useradd --system --uid 10001 --gid paxos-commit --home-dir /var/lib/paxos-commit \
        --shell /usr/sbin/nologin paxos-commit \
    && install -d -o paxos-commit -g paxos-commit -m 0700 /var/lib/paxos-commit
COPY --from=binaries /usr/local/bin/coordinator /usr/local/bin/participant-agent \
    /usr/local/bin/txctl /usr/local/bin/
USER 10001:10001
WORKDIR /var/lib/paxos-commit
# 7400: a replica's gRPC (clients, peers, agents); 7500: an agent's gRPC.
EXPOSE 7400 7500
ENTRYPOINT ["/usr/local/bin/coordinator"]
