# streamgate as a static binary in an empty image, for amd64 or arm64.
#
#   docker build -t streamgate .
#   docker run --rm -p 8443:8443 streamgate demo
#
# With your config and certificates (README, "Docker"): config/ and certs/ are mounted as
# directories at /etc/streamgate/config and /etc/streamgate/certs.

FROM rust:1.95-bookworm AS build

# Set by BuildKit to the image's architecture (docker buildx build --platform linux/arm64);
# plain `docker build` leaves it empty, and the build machine's own architecture is used.
ARG TARGETARCH
# The commit for `streamgate --version` (there is no .git in the build context):
#   docker build --build-arg STREAMGATE_COMMIT="$(git rev-parse --short=12 HEAD)" .
ARG STREAMGATE_COMMIT=unknown

# musl-gcc compiles ring's and aws-lc's C and assembly for the static target (aws-lc gives rustls
# the post-quantum X25519MLKEM768 key exchange). Not pinned: the version is
# whatever bookworm ships, and a pin would break the build at Debian's next point release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends musl-tools \
    && rm -rf /var/lib/apt/lists/*

# The Rust target for the image's architecture, kept in /rust-target for the steps below.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN arch="${TARGETARCH:-$(dpkg --print-architecture)}"; \
    case "$arch" in \
      amd64) target=x86_64-unknown-linux-musl ;; \
      arm64) target=aarch64-unknown-linux-musl ;; \
      *) echo "streamgate images are built for amd64 and arm64, not $arch" >&2; exit 1 ;; \
    esac; \
    echo "$target" > /rust-target \
    && rustup target add "$target"

WORKDIR /src

# One profile for the dependency build and the real one: any difference (a CARGO_PROFILE_*
# variable set on one RUN only) changes every crate's fingerprint and rebuilds them all.
# Symbols are stripped here rather than in Cargo.toml, so local release builds keep them.
ENV CARGO_PROFILE_RELEASE_STRIP=symbols

# Dependencies first, against stub sources, so that changing src/ does not rebuild them.
# bench/ is a workspace member (the benchmark); only its manifest is needed, with a stub main,
# for cargo to load the workspace: the image builds the gateway alone.
COPY Cargo.toml Cargo.lock ./
COPY bench/Cargo.toml bench/
RUN mkdir src bench/src \
    && echo 'fn main() {}' > src/main.rs \
    && echo 'fn main() {}' > bench/src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked --target "$(cat /rust-target)" \
    && rm -rf src

COPY build.rs ./
COPY src ./src
# COPY keeps the files' old modification times; touch them so cargo rebuilds over the stub.
RUN touch src/main.rs src/lib.rs build.rs \
    && cargo build --release --locked --target "$(cat /rust-target)" \
    && cp "target/$(cat /rust-target)/release/streamgate" /streamgate \
    && mkdir -p /rootfs/tmp && chmod 1777 /rootfs/tmp

# Nothing but the binary: no shell, no libc, no package manager. Backends are plain HTTP, so
# no CA bundle is needed either.
FROM scratch

COPY --from=build /streamgate /usr/local/bin/streamgate
# /tmp (mode 1777, kept by COPY): where the gateway opens its control socket
# (/tmp/streamgate-65532.sock), which `streamgate health` asks.
COPY --from=build /rootfs/ /

# Config and certificates are separate directories under the working directory, each its own
# mount (directories, not files: see the README's Docker section), and the certificate paths
# in a config ("certs/example.pem") resolve under /etc/streamgate.
WORKDIR /etc/streamgate
ENV STREAMGATE_CONFIG=/etc/streamgate/config/streamgate.toml

# An unprivileged numeric user (the "nonroot" id of distroless images); 8443 needs no
# privilege to bind.
USER 65532:65532
EXPOSE 8443

# No shell in the image, so the check is the binary itself: GET /healthz on the running
# gateway's control socket (the demo opens one too). It never reads the config file.
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/streamgate", "health"]

ENTRYPOINT ["/usr/local/bin/streamgate"]
