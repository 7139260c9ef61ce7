#!/usr/bin/env bash
# Checks the container image for real, without a Docker engine: builds the static binary with
# the exact command the Dockerfile's build stage runs, builds the Dockerfile's final stage
# around it with buildah, then runs the image with podman: `check` must exit 0 on a mounted
# config, and `demo` must answer over TLS. Prints the image's size.
#
# Base images cannot be pulled here, which is why the build stage's command runs on the host
# (same toolchain, same target, same flags) and only the final stage (FROM scratch) is built.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*"; }

log "tools"
missing=()
command -v buildah >/dev/null || missing+=(buildah)
command -v podman >/dev/null || missing+=(podman)
command -v runc >/dev/null || missing+=(runc)
command -v musl-gcc >/dev/null || missing+=(musl-tools)
command -v openssl >/dev/null || missing+=(openssl)
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
rustup target add x86_64-unknown-linux-musl >/dev/null

log "static binary, built by the Dockerfile's own command"
# The last `cargo build` line of the build stage, with its environment prefix.
build_cmd=$(grep -A3 'RUN touch src/main.rs' Dockerfile | grep -o 'CARGO_PROFILE_RELEASE_STRIP=symbols' | head -1)
cargo_cmd=$(grep -o 'cargo build --release --locked --target x86_64-unknown-linux-musl' Dockerfile | tail -1)
[ -n "$cargo_cmd" ] || { echo "Dockerfile has no musl cargo build line"; exit 1; }
env ${build_cmd:+"$build_cmd"} $cargo_cmd
bin=target/x86_64-unknown-linux-musl/release/streamgate
file "$bin" 2>/dev/null || true
if ldd "$bin" 2>&1 | grep -q '=>'; then echo "binary is dynamically linked"; exit 1; fi

log "image from the Dockerfile's final stage"
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/bin"
cp "$bin" "$ctx/bin/streamgate"
# Everything from the last FROM on, with the COPY from the build stage pointed at the context.
awk '/^FROM /{stage=""} {stage = stage $0 "\n"} END {printf "%s", stage}' Dockerfile \
  | sed -E 's#^COPY --from=build [^ ]+ #COPY bin/streamgate #' > "$ctx/Containerfile"
grep -q '^FROM scratch' "$ctx/Containerfile" || { echo "final stage is not FROM scratch"; exit 1; }
cat "$ctx/Containerfile"
store=(--storage-driver vfs)
# Docker format: OCI images have no HEALTHCHECK.
buildah "${store[@]}" bud --isolation chroot --format docker -f "$ctx/Containerfile" -t localhost/streamgate:ci "$ctx"
# podman's default ulimits (1M files, 32k processes) are above what this sandbox lets runc set;
# explicit, lower limits work everywhere.
limits=(--ulimit nofile=16384:16384 --ulimit nproc=4096:4096)
podman_run=(podman "${store[@]}" --runtime runc --cgroup-manager cgroupfs run --rm --network host "${limits[@]}")

log "check on a mounted config"
cfg=$(mktemp -d)
trap 'rm -rf "$ctx" "$cfg"' EXIT
mkdir -p "$cfg/certs"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=localhost \
  -addext subjectAltName=DNS:localhost -keyout "$cfg/certs/example.key" -out "$cfg/certs/example.pem" 2>/dev/null
cp config/streamgate.toml "$cfg/streamgate.toml"
chmod -R a+rX "$cfg"
"${podman_run[@]}" -v "$cfg:/etc/streamgate:ro" localhost/streamgate:ci check

log "demo answers over TLS"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cid=$(podman "${store[@]}" --runtime runc --cgroup-manager cgroupfs run -d --network host "${limits[@]}" \
  localhost/streamgate:ci demo --listen "127.0.0.1:$port")
cleanup() { podman "${store[@]}" --runtime runc --cgroup-manager cgroupfs rm -f "$cid" >/dev/null 2>&1 || true; rm -rf "$ctx" "$cfg"; }
trap cleanup EXIT
ok=""
for _ in $(seq 1 50); do
  if curl -sfk --max-time 2 "https://127.0.0.1:$port/" | grep -q 'streamgate demo'; then ok=1; break; fi
  sleep 0.2
done
if [ -z "$ok" ]; then
  podman "${store[@]}" --runtime runc --cgroup-manager cgroupfs logs "$cid" || true
  echo "demo did not answer"; exit 1
fi
echo "demo answered over TLS on port $port"
podman "${store[@]}" --runtime runc --cgroup-manager cgroupfs exec "$cid" \
  /usr/local/bin/streamgate health --addr "127.0.0.1:$port"
echo "the HEALTHCHECK command passes inside the image"

log "HEALTHCHECK in the image"
podman "${store[@]}" image inspect localhost/streamgate:ci --format '{{json .HealthCheck}}' | tee /dev/stderr \
  | grep -q '"/usr/local/bin/streamgate","health"' || { echo "image has no HEALTHCHECK"; exit 1; }

log "image size"
podman "${store[@]}" image inspect localhost/streamgate:ci --format '{{.Size}}' \
  | awk '{printf "localhost/streamgate:ci is %.1f MiB\n", $1/1048576}'
