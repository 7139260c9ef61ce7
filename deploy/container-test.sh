#!/usr/bin/env bash
# Checks the container image for real, without a Docker engine: builds the static binary with
# the commands the Dockerfile's build stage runs for this machine's architecture, builds the
# Dockerfile's final stage around it with buildah, then runs the image with podman: `check` on
# mounted directories, the README's own `docker run` line on certificates made by
# certs/README.md's own commands, and `demo` answering over TLS. Prints the image's size.
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

log "static binary, built by the Dockerfile's own commands for this machine's architecture"
# The Rust target the Dockerfile's TARGETARCH mapping gives for this architecture, the
# CARGO_* settings its build stage sets with ENV, and its cargo build line.
arch=$(dpkg --print-architecture)
target=$(grep -oP "^\s*${arch}\) target=\K[a-z0-9_-]+" Dockerfile | head -1)
[ -n "$target" ] || { echo "the Dockerfile maps no Rust target for $arch"; exit 1; }
mapfile -t envs < <(grep -oP '^ENV \KCARGO_[A-Z_]+=\S+' Dockerfile)
grep -q 'cargo build --release --locked --target "$(cat /rust-target)"' Dockerfile \
  || { echo "Dockerfile has no cargo build line for /rust-target"; exit 1; }
echo "$arch -> $target, ${envs[*]:-no CARGO_ settings}"
rustup target add "$target" >/dev/null
env "${envs[@]}" cargo build --release --locked --target "$target"
bin=target/$target/release/streamgate
file "$bin" 2>/dev/null || true
if ldd "$bin" 2>&1 | grep -q '=>'; then echo "binary is dynamically linked"; exit 1; fi

log "image from the Dockerfile's final stage"
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/bin" "$ctx/rootfs/tmp"
cp "$bin" "$ctx/bin/streamgate"
# What the build stage puts in /rootfs for the final one: /tmp, mode 1777.
grep -q 'mkdir -p /rootfs/tmp && chmod 1777 /rootfs/tmp' Dockerfile || { echo "Dockerfile makes no /rootfs/tmp"; exit 1; }
chmod 1777 "$ctx/rootfs/tmp"
# Everything from the last FROM on, with the COPYs from the build stage pointed at the context.
awk '/^FROM /{stage=""} {stage = stage $0 "\n"} END {printf "%s", stage}' Dockerfile \
  | sed -E 's#^COPY --from=build /streamgate #COPY bin/streamgate #; s#^COPY --from=build /rootfs/ #COPY rootfs/ #' \
  > "$ctx/Containerfile"
if grep -q '^COPY --from=build' "$ctx/Containerfile"; then echo "a COPY from the build stage this script does not know"; exit 1; fi
grep -q '^FROM scratch' "$ctx/Containerfile" || { echo "final stage is not FROM scratch"; exit 1; }
cat "$ctx/Containerfile"
store=(--storage-driver vfs)
# Docker format: OCI images have no HEALTHCHECK.
buildah "${store[@]}" bud --isolation chroot --format docker -f "$ctx/Containerfile" -t localhost/streamgate:ci "$ctx"
# podman's default ulimits (1M files, 32k processes) are above what this sandbox lets runc set;
# explicit, lower limits work everywhere.
limits=(--ulimit nofile=16384:16384 --ulimit nproc=4096:4096)
podman_run=(podman "${store[@]}" --runtime runc --cgroup-manager cgroupfs run --rm --network host "${limits[@]}")

log "check on mounted config/ and certs/ directories, as the image's own user"
cfg=$(mktemp -d)
trap 'rm -rf "$ctx" "$cfg"' EXIT
mkdir -p "$cfg/certs" "$cfg/config"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=localhost \
  -addext subjectAltName=DNS:localhost -keyout "$cfg/certs/example.key" -out "$cfg/certs/example.pem" 2>/dev/null
cp config/streamgate.toml config/jwks.example.json "$cfg/config/"
chmod -R a+rX "$cfg"
"${podman_run[@]}" -v "$cfg/config:/etc/streamgate/config:ro" -v "$cfg/certs:/etc/streamgate/certs:ro" \
  localhost/streamgate:ci check

log "the README's docker run line, on certificates made by certs/README.md's commands"
work=$(mktemp -d)
trap 'rm -rf "$ctx" "$cfg" "$work"' EXIT
cp -r config "$work/config"
mkdir -p "$work/bin" && cp "$bin" "$work/bin/streamgate"
# certs/README.md's local CA block, as written (its last line runs `streamgate check`).
awk '/^## A local CA for testing/{on=1} on && /^```sh/{grab=1; next} grab && /^```/{exit} grab' certs/README.md \
  > "$work/make-certs.sh"
(cd "$work" && PATH="$work/bin:$PATH" bash -euo pipefail make-certs.sh)
[ "$(stat -c %a "$work/certs/example.key")" = 600 ] || { echo "the key is not mode 0600"; exit 1; }
[ ! -e "$work/certs/ca.key" ] || { echo "the CA key is in the mounted folder"; exit 1; }
# The README's `docker run` for your own config: the block with --user in it.
awk '/^## Docker/{on=1} on && /^```sh/{grab=1; block=""; next} grab && /^```/{grab=0; if (block ~ /--user/) {printf "%s", block; exit}} grab {block = block $0 "\n"}' README.md \
  > "$work/run.sh"
cat "$work/run.sh"
grep -q -- '-v "$PWD/config:' "$work/run.sh" || { echo "README has no docker run line for a config"; exit 1; }
# docker -> podman (with this sandbox's flags, detached), the image -> the one just built.
sed -i -E "s#^docker run --rm#podman ${store[*]} --runtime runc --cgroup-manager cgroupfs run -d --name streamgate-ci --network host ${limits[*]}#; s#^( *)streamgate\$#\1localhost/streamgate:ci#" "$work/run.sh"
podman "${store[@]}" --runtime runc --cgroup-manager cgroupfs rm -f streamgate-ci >/dev/null 2>&1 || true
(cd "$work" && bash -euo pipefail run.sh)
readme_cleanup() { podman "${store[@]}" --runtime runc --cgroup-manager cgroupfs rm -f streamgate-ci >/dev/null 2>&1 || true; rm -rf "$ctx" "$cfg" "$work"; }
trap readme_cleanup EXIT
answered=""
for _ in $(seq 1 50); do
  # The example config's backends are not running here: any answer from the gateway itself
  # (a 502 naming the route) proves TLS with the mounted certificate and config.
  if out=$(curl -s --max-time 2 --cacert "$work/ca/ca.pem" https://localhost:8443/ 2>&1) \
     && grep -q 'streamgate' <<<"$out"; then answered=1; break; fi
  sleep 0.2
done
if [ -z "$answered" ]; then
  podman "${store[@]}" --runtime runc --cgroup-manager cgroupfs logs streamgate-ci || true
  echo "the README's docker run did not answer on https://localhost:8443/: $out"; exit 1
fi
echo "answered, verified against the local CA: $out"
# The image's HEALTHCHECK command asks the running gateway (its control socket in /tmp).
podman "${store[@]}" --runtime runc --cgroup-manager cgroupfs exec streamgate-ci /usr/local/bin/streamgate health
echo "streamgate health: the running gateway answers"
podman "${store[@]}" --runtime runc --cgroup-manager cgroupfs rm -f streamgate-ci >/dev/null

log "demo answers over TLS"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cid=$(podman "${store[@]}" --runtime runc --cgroup-manager cgroupfs run -d --network host "${limits[@]}" \
  localhost/streamgate:ci demo --listen "127.0.0.1:$port")
cleanup() { podman "${store[@]}" --runtime runc --cgroup-manager cgroupfs rm -f "$cid" >/dev/null 2>&1 || true; rm -rf "$ctx" "$cfg" "$work"; }
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
