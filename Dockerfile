# streamgate as a static binary in an empty image.
#
#   docker build -t streamgate .
#   docker run --rm -p 8443:8443 streamgate demo
#   docker run --rm -p 8443:8443 \
#     -v "$PWD/streamgate.toml:/etc/streamgate/streamgate.toml:ro" \
#     -v "$PWD/certs:/etc/streamgate/certs:ro" streamgate
#
# The working directory is /etc/streamgate, so the certificate paths in a config
# ("certs/example.pem") resolve under /etc/streamgate/certs.

FROM rust:1.95-bookworm AS build

# musl-gcc compiles ring's and aws-lc's C and assembly for the static target (aws-lc gives rustls
# the post-quantum X25519MLKEM768 key exchange). Not pinned: the version is
# whatever bookworm ships, and a pin would break the build at Debian's next point release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends musl-tools \
    && rm -rf /var/lib/apt/lists/*
RUN rustup target add x86_64-unknown-linux-musl

WORKDIR /src

# Dependencies first, against stub sources, so that changing src/ does not rebuild them.
# bench/ is a workspace member (the benchmark); only its manifest is needed, with a stub main,
# for cargo to load the workspace: the image builds the gateway alone.
COPY Cargo.toml Cargo.lock ./
COPY bench/Cargo.toml bench/
RUN mkdir src bench/src \
    && echo 'fn main() {}' > src/main.rs \
    && echo 'fn main() {}' > bench/src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked --target x86_64-unknown-linux-musl \
    && rm -rf src

COPY build.rs ./
COPY src ./src
# COPY keeps the files' old modification times; touch them so cargo rebuilds over the stub.
# Symbols are stripped here rather than in Cargo.toml, so local release builds keep them.
RUN touch src/main.rs src/lib.rs build.rs \
    && CARGO_PROFILE_RELEASE_STRIP=symbols \
       cargo build --release --locked --target x86_64-unknown-linux-musl

# Nothing but the binary: no shell, no libc, no package manager. Backends are plain HTTP, so
# no CA bundle is needed either.
FROM scratch

COPY --from=build /src/target/x86_64-unknown-linux-musl/release/streamgate /usr/local/bin/streamgate

WORKDIR /etc/streamgate
ENV STREAMGATE_CONFIG=/etc/streamgate/streamgate.toml

# An unprivileged numeric user (the "nonroot" id of distroless images); 8443 needs no
# privilege to bind.
USER 65532:65532
EXPOSE 8443

# No shell in the image, so the check is the binary itself: GET /healthz on the admin listener
# when the config sets one, else a connect to the TLS port (which is what the demo has).
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/streamgate", "health"]

ENTRYPOINT ["/usr/local/bin/streamgate"]
