#!/usr/bin/env bash
# HTTP/2 conformance of the gateway's TLS listener with h2spec (github.com/summerwind/h2spec).
#
#   bench/h2spec.sh                  all h2spec cases (generic, hpack, http2)
#   bench/h2spec.sh http2/6.5        only some sections; other h2spec flags pass through too
#                                    (e.g. -S for the strict cases, -v for verbose)
#
# What it does:
#   1. Uses `h2spec` from PATH, else target/h2spec/h2spec, else builds that one from source with
#      Debian's Go toolchain and Debian's packaged Go libraries (GOPATH mode, no module proxy):
#      the source comes from H2SPEC_SRC (a checkout or a bare git dir) or is cloned from
#      H2SPEC_GIT at H2SPEC_REV. Installs the Debian packages with apt-get when they are missing.
#   2. Builds the gateway (`cargo build --release --locked`; STREAMGATE_PROFILE=debug for
#      target/debug, or STREAMGATE_BIN=path to use a binary as it is). A failed release build
#      falls back to the debug build.
#   3. In a temp dir: a self-signed certificate, a config with one [[cert]] and one route "/",
#      and a plain-HTTP backend on loopback (python3) that answers 200 to every method and
#      reads request bodies.
#   4. Runs `h2spec -t -k -h 127.0.0.1 -p PORT` and prints its summary and failed cases. Exits
#      1 when a case fails (2 when the setup fails). The output and the gateway log are kept in
#      target/h2spec/last-run/.
#   5. Stops the gateway and the backend it started (by PID) and removes the temp dir.
#
# Environment: H2SPEC_TIMEOUT (h2spec -o, seconds, default 2), H2SPEC_GO_JOBS (go build -p,
# default 1), CARGO_BUILD_JOBS (cargo's own), RUST_LOG (gateway log level, default info).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
OUT_DIR=$ROOT/target/h2spec
H2SPEC_GIT=${H2SPEC_GIT:-https://github.com/summerwind/h2spec.git}
# v2.6.0 plus 5 commits (2022-06-25), the newest on master.
H2SPEC_REV=${H2SPEC_REV:-af83a65f0b6273ef38bf778d400d98892e7653d8}
H2SPEC_VERSION=2.6.0

die() { echo "h2spec.sh: $*" >&2; exit 2; }

# ---------------------------------------------------------------------------------------------
# 1. h2spec
# ---------------------------------------------------------------------------------------------
# Debian packages for h2spec's imports (go.mod): cobra (+ pflag, mousetrap), fatih/color (+
# go-colorable, go-isatty), golang.org/x/net (http2, hpack) (+ x/sys).
DEB_GO_PKGS=(
    golang-go
    golang-github-spf13-cobra-dev
    golang-github-spf13-pflag-dev
    golang-github-inconshreveable-mousetrap-dev
    golang-github-fatih-color-dev
    golang-github-mattn-go-colorable-dev
    golang-github-mattn-go-isatty-dev
    golang-golang-x-net-dev
    golang-golang-x-sys-dev
)

build_h2spec() {
    local missing=() p
    for p in "${DEB_GO_PKGS[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' \
            || missing+=("$p")
    done
    if ((${#missing[@]})); then
        echo "h2spec.sh: installing ${missing[*]}" >&2
        [[ $(id -u) == 0 ]] || die "need root for apt-get, or install: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >&2
    fi

    local gopath=$OUT_DIR/gopath
    local src=$gopath/src/github.com/summerwind/h2spec
    rm -rf "$src"
    mkdir -p "$src"
    if [[ -n ${H2SPEC_SRC:-} ]]; then
        if [[ -f $H2SPEC_SRC/go.mod ]]; then
            cp -r "$H2SPEC_SRC"/. "$src"/
        elif git --git-dir="$H2SPEC_SRC" rev-parse --verify -q "$H2SPEC_REV^{commit}" >/dev/null; then
            git --git-dir="$H2SPEC_SRC" archive "$H2SPEC_REV" | tar -x -C "$src"
        else
            git --git-dir="$H2SPEC_SRC" archive HEAD | tar -x -C "$src"
            H2SPEC_REV=$(git --git-dir="$H2SPEC_SRC" rev-parse HEAD)
        fi
    else
        local clone=$OUT_DIR/clone
        rm -rf "$clone"
        git clone -q "$H2SPEC_GIT" "$clone" || die "cannot clone $H2SPEC_GIT; set H2SPEC_SRC"
        git -C "$clone" archive "$H2SPEC_REV" | tar -x -C "$src"
        rm -rf "$clone"
    fi

    echo "h2spec.sh: building h2spec $H2SPEC_VERSION ($H2SPEC_REV)" >&2
    (
        cd "$src"
        # GOPATH mode: the h2spec tree in our GOPATH, its libraries from Debian's.
        GO111MODULE=off GOFLAGS= GOPATH="$gopath:/usr/share/gocode" \
            GOCACHE="$OUT_DIR/gocache" \
            go build -p "${H2SPEC_GO_JOBS:-1}" -o "$OUT_DIR/h2spec.tmp" \
            -ldflags "-X main.VERSION=$H2SPEC_VERSION -X main.COMMIT=$H2SPEC_REV" ./cmd/h2spec
    )
    mv "$OUT_DIR/h2spec.tmp" "$OUT_DIR/h2spec"
}

mkdir -p "$OUT_DIR"
if command -v h2spec >/dev/null 2>&1; then
    H2SPEC=$(command -v h2spec)
else
    H2SPEC=$OUT_DIR/h2spec
    [[ -x $H2SPEC ]] || build_h2spec
fi
echo "h2spec.sh: using $H2SPEC: $("$H2SPEC" --version)" >&2

# ---------------------------------------------------------------------------------------------
# 2. The gateway
# ---------------------------------------------------------------------------------------------
if [[ -n ${STREAMGATE_BIN:-} ]]; then
    GATEWAY=$STREAMGATE_BIN
elif [[ ${STREAMGATE_PROFILE:-release} == release ]] \
    && cargo build --release --locked --bin streamgate; then
    GATEWAY=$ROOT/target/release/streamgate
else
    [[ ${STREAMGATE_PROFILE:-release} == release ]] \
        && echo "h2spec.sh: release build failed, using the debug build" >&2
    cargo build --locked --bin streamgate
    GATEWAY=$ROOT/target/debug/streamgate
fi
[[ -x $GATEWAY ]] || die "no gateway binary at $GATEWAY"
echo "h2spec.sh: gateway $GATEWAY: $("$GATEWAY" --version 2>&1 | head -1)" >&2

# ---------------------------------------------------------------------------------------------
# 3. Certificate, config, backend
# ---------------------------------------------------------------------------------------------
TMP=$(mktemp -d -t streamgate-h2spec.XXXXXX)
GW_PID=
BE_PID=
cleanup() {
    local pid
    for pid in "$GW_PID" "$BE_PID"; do
        [[ -n $pid ]] || continue
        kill "$pid" 2>/dev/null || continue
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
GW_PORT=$(free_port)
BE_PORT=$(free_port)
while [[ $BE_PORT == "$GW_PORT" ]]; do BE_PORT=$(free_port); done

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    -keyout "$TMP/key.pem" -out "$TMP/cert.pem" 2>/dev/null \
    || die "openssl could not make a certificate"

cat >"$TMP/streamgate.toml" <<EOF
[listen]
https = "127.0.0.1:$GW_PORT"
control_socket = "off"

[[cert]]
cert = "$TMP/cert.pem"
key = "$TMP/key.pem"

[[route]]
path = "/"
backends = ["http://127.0.0.1:$BE_PORT"]
EOF

cat >"$TMP/backend.py" <<'EOF'
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _drain_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return
                self.rfile.read(size + 2)
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            self.rfile.read(n)

    def _answer(self):
        self._drain_body()
        # h2spec skips the negative-window case (6.9.2/2) when the body is under 5 bytes.
        body = b"streamgate h2spec backend\n" * 40
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = _answer

    def log_message(self, *args):
        pass


ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
EOF

python3 "$TMP/backend.py" "$BE_PORT" >"$TMP/backend.log" 2>&1 &
BE_PID=$!

# Refuse a config the gateway would not start with, with its own message.
"$GATEWAY" check --config "$TMP/streamgate.toml" >/dev/null || die "config refused"

RUST_LOG=${RUST_LOG:-info} "$GATEWAY" --config "$TMP/streamgate.toml" >"$TMP/gateway.log" 2>&1 &
GW_PID=$!

wait_port() { # port pid what
    for _ in $(seq 300); do
        kill -0 "$2" 2>/dev/null || { cat "$TMP/$3.log" >&2; die "$3 exited at start"; }
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    die "$3 does not listen on 127.0.0.1:$1 after 30 s"
}
wait_port "$BE_PORT" "$BE_PID" backend
wait_port "$GW_PORT" "$GW_PID" gateway

# ---------------------------------------------------------------------------------------------
# 4. h2spec
# ---------------------------------------------------------------------------------------------
echo "h2spec.sh: h2spec -t -k -h 127.0.0.1 -p $GW_PORT $*" >&2
set +e
"$H2SPEC" -t -k -h 127.0.0.1 -p "$GW_PORT" -o "${H2SPEC_TIMEOUT:-2}" "$@" | tee "$TMP/h2spec.out"
H2SPEC_RC=${PIPESTATUS[0]}
set -e

GATEWAY_ALIVE=yes
kill -0 "$GW_PID" 2>/dev/null || GATEWAY_ALIVE=no

mkdir -p "$OUT_DIR/last-run"
cp "$TMP/h2spec.out" "$TMP/gateway.log" "$TMP/streamgate.toml" "$OUT_DIR/last-run/"

SUMMARY=$(grep -E '^[0-9]+ tests, [0-9]+ passed, [0-9]+ skipped, [0-9]+ failed' "$TMP/h2spec.out" | tail -1 || true)
echo
echo "h2spec.sh: ${SUMMARY:-no summary from h2spec (exit $H2SPEC_RC)}"
if [[ $GATEWAY_ALIVE == no ]]; then
    echo "h2spec.sh: the gateway exited during the run; its log:" >&2
    tail -n 30 "$TMP/gateway.log" >&2
    exit 2
fi
if [[ $H2SPEC_RC != 0 || -z $SUMMARY || $SUMMARY != *" 0 failed" ]]; then
    # h2spec prints the failed cases (id, title, requirement, expected, actual) under
    # "Failures:" above; repeat them as the last thing on screen.
    if grep -q '^Failures:' "$TMP/h2spec.out"; then
        echo "h2spec.sh: failed cases:"
        sed -n '/^Failures:/,/^[0-9]\+ tests, /p' "$TMP/h2spec.out" | sed '1d;$d'
    fi
    echo "h2spec.sh: output and gateway log in target/h2spec/last-run/" >&2
    exit 1
fi
echo "h2spec.sh: all cases passed"
