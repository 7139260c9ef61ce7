#!/usr/bin/env bash
# Checks the operator dashboard (GET / on the admin listener) in a real browser: runs the gateway
# in front of two python backends, sends requests through it, opens the page in headless
# Chromium until it has received snapshots from /events, and asserts what the DOM shows. Leaves
# the DOM and two screenshots (1200 px and phone width) in a temp dir for a human.
#
#   bash deploy/dashboard-check.sh [gateway binary]    (default target/debug/streamgate)
#
# It builds nothing: run `cargo build` first. Needs python3, openssl, curl; installs Debian's
# chromium when it is missing (root).
#
# Why not `chromium --headless --dump-dom`: it dumps at the load event (before the first
# snapshot) with or without --timeout, and --virtual-time-budget never ends, because virtual
# time stands still while a fetch is pending and an EventSource is a fetch that never ends. So a
# small stdlib-only python driver speaks the DevTools protocol over --remote-debugging-pipe and
# waits for the page's own signal (body[data-updates]) under a deadline.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() {
  printf '\ndashboard check FAILED: %s\n' "$*" >&2
  if [ -n "${dir:-}" ] && [ -s "$dir/gateway.log" ]; then
    printf -- '--- last lines of %s\n' "$dir/gateway.log" >&2
    tail -n 20 "$dir/gateway.log" >&2
  fi
  [ -n "${dir:-}" ] && printf 'files: %s\n' "$dir" >&2
  exit 1
}
log() { printf '\n== %s\n' "$*"; }

bin=${1:-target/debug/streamgate}
[ -x "$bin" ] || fail "no gateway binary at $bin (run cargo build first, or pass its path)"
bin=$(realpath "$bin")

log "tools"
for tool in python3 openssl curl; do
  command -v "$tool" >/dev/null || fail "$tool is not installed"
done
if ! command -v chromium >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
chromium --version 2>/dev/null # (the Debian launcher's stderr is noise)

# Everything this script starts, by PID; ended on exit: TERM, then KILL after 5 s.
pids=()
profile=""
cleanup() {
  local pid
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  [ -z "$profile" ] || rm -rf "$profile"
}
trap cleanup EXIT

dir=$(mktemp -d -t streamgate-dashboard.XXXXXX)
profile=$(mktemp -d -t streamgate-chromium.XXXXXX)

log "certificate, backends and config in $dir"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=localhost \
  -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
  -keyout "$dir/key.pem" -out "$dir/cert.pem" 2>/dev/null
# Four free loopback ports, held together while the kernel picks them so they differ.
read -r p1 p2 https admin < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')
for p in "$p1" "$p2"; do
  mkdir -p "$dir/www-$p"
  echo "backend $p" >"$dir/www-$p/index.html"
  python3 -m http.server --bind 127.0.0.1 --directory "$dir/www-$p" "$p" >"$dir/backend-$p.log" 2>&1 &
  pids+=($!)
done
for p in "$p1" "$p2"; do
  for _ in $(seq 40); do curl -sf --max-time 1 "http://127.0.0.1:$p/" >/dev/null && break; sleep 0.25; done
  curl -sf --max-time 2 "http://127.0.0.1:$p/" >/dev/null || fail "the backend on port $p does not answer (see $dir/backend-$p.log)"
done
cat >"$dir/streamgate.toml" <<EOF
[listen]
https = "127.0.0.1:$https"
admin = "127.0.0.1:$admin"

[shutdown]
grace = "2s"

[[cert]]
cert = "$dir/cert.pem"
key = "$dir/key.pem"

[[route]]
path = "/"
backends = ["http://127.0.0.1:$p1", "http://127.0.0.1:$p2"]
EOF

log "gateway: $bin --config $dir/streamgate.toml"
RUST_LOG=info "$bin" --log-format json --config "$dir/streamgate.toml" >"$dir/gateway.log" 2>&1 &
gateway=$!
pids+=("$gateway")
up=""
for _ in $(seq 60); do
  kill -0 "$gateway" 2>/dev/null || fail "the gateway exited at start-up"
  if curl -sf --max-time 1 "http://127.0.0.1:$admin/healthz" >/dev/null; then up=1; break; fi
  sleep 0.5
done
[ -n "$up" ] || fail "no answer from http://127.0.0.1:$admin/healthz within 30 s"

log "traffic through https://127.0.0.1:$https/"
sent=20
for _ in $(seq "$sent"); do
  body=$(curl -sk --max-time 5 "https://127.0.0.1:$https/") || fail "a request through the gateway failed"
  case "$body" in "backend $p1" | "backend $p2") ;; *) fail "unexpected answer through the gateway: $body" ;; esac
done
echo "$sent requests answered"
# Keep requests flowing while the page watches, so its requests/s has something to show.
(while :; do curl -sk --max-time 2 -o /dev/null "https://127.0.0.1:$https/" || true; sleep 0.1; done) &
pids+=($!)

log "dashboard in headless chromium: http://127.0.0.1:$admin/"
page=$(curl -s --max-time 5 "http://127.0.0.1:$admin/") || fail "GET http://127.0.0.1:$admin/ failed"
grep -q 'data-updates=' <<<"$page" || fail "GET http://127.0.0.1:$admin/ did not serve the dashboard: ${page:0:200}"
# Wait for two snapshots and a requests/s on the page; 30 s at most. The driver writes
# dom.html, exceptions.txt, dashboard.png and dashboard-phone.png into $dir.
wait_for='+document.body.dataset.updates >= 2 &&
  [...document.querySelectorAll(".route")].some((r) => +r.dataset.rps > 0)'
python3 - "http://127.0.0.1:$admin/" "$dir" "$profile" "$wait_for" 30 <<'PY' || fail "the browser driver failed (see $dir/chromium.log)"
# Drives headless Chromium over the DevTools protocol on a pipe (--remote-debugging-pipe:
# commands on fd 3, replies on fd 4, each one JSON text ended by NUL).
import base64, json, os, signal, subprocess, sys, time

url, out, profile, wait_for, deadline = sys.argv[1:6]
signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so `finally` ends the browser

cmd_r, cmd_w = os.pipe()
reply_r, reply_w = os.pipe()

def pipes_on_3_and_4():
    os.dup2(cmd_r, 3)
    os.dup2(reply_w, 4)

flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--remote-debugging-pipe",
         "--user-data-dir=" + profile, "about:blank"]
with open(os.path.join(out, "chromium.log"), "wb") as log:
    browser = subprocess.Popen(["chromium", *flags], stdin=subprocess.DEVNULL, stdout=log,
                               stderr=log, preexec_fn=pipes_on_3_and_4, pass_fds=(3, 4),
                               start_new_session=True)
os.close(cmd_r)
os.close(reply_w)
replies, commands = os.fdopen(reply_r, "rb"), os.fdopen(cmd_w, "wb")
pending, last_id, exceptions = b"", 0, []

def call(method, session=None, **params):
    global pending, last_id
    last_id += 1
    msg = {"id": last_id, "method": method, "params": params}
    if session:
        msg["sessionId"] = session
    commands.write(json.dumps(msg).encode() + b"\0")
    commands.flush()
    while True:
        while b"\0" not in pending:
            chunk = replies.read1(65536)
            if not chunk:
                sys.exit("chromium closed the DevTools pipe")
            pending += chunk
        raw, pending = pending.split(b"\0", 1)
        reply = json.loads(raw)
        if reply.get("method") == "Runtime.exceptionThrown":
            d = reply["params"]["exceptionDetails"]
            exceptions.append(d.get("exception", {}).get("description") or d.get("text", "?"))
        if reply.get("id") == last_id:
            if "error" in reply:
                sys.exit("%s: %s" % (method, reply["error"].get("message")))
            return reply.get("result", {})

def evaluate(session, expr):
    return call("Runtime.evaluate", session, expression=expr, returnByValue=True)["result"].get("value")

def screenshot(session, width, height, mobile, name):
    call("Emulation.setDeviceMetricsOverride", session, width=width, height=height,
         deviceScaleFactor=1, mobile=mobile)
    time.sleep(0.3)  # a layout at the new width
    full = evaluate(session, "document.documentElement.scrollHeight") or height
    png = call("Page.captureScreenshot", session, format="png", captureBeyondViewport=True,
               clip={"x": 0, "y": 0, "width": width, "height": max(height, full), "scale": 1})
    with open(os.path.join(out, name), "wb") as f:
        f.write(base64.b64decode(png["data"]))

try:
    target = call("Target.createTarget", url="about:blank")["targetId"]
    session = call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
    call("Runtime.enable", session)
    call("Emulation.setDeviceMetricsOverride", session, width=1200, height=900,
         deviceScaleFactor=1, mobile=False)
    call("Page.navigate", session, url=url)
    end, ok = time.monotonic() + float(deadline), False
    while not ok and time.monotonic() < end:
        time.sleep(0.25)
        ok = bool(evaluate(session, "(() => { try { return %s } catch (e) { return false } })()" % wait_for))
    print("page ready" if ok else "page not ready after %s s: checking what it shows" % deadline)
    with open(os.path.join(out, "dom.html"), "w") as f:
        f.write(evaluate(session, "document.documentElement.outerHTML"))
    with open(os.path.join(out, "exceptions.txt"), "w") as f:
        f.write("".join(e + "\n" for e in exceptions))
    screenshot(session, 1200, 900, False, "dashboard.png")
    screenshot(session, 390, 844, True, "dashboard-phone.png")
    call("Browser.close")
finally:
    try:
        browser.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(browser.pid, signal.SIGKILL)  # its own session: only the browser we started
        browser.wait()
PY

log "what the page shows"
dom="$dir/dom.html"
[ -s "$dom" ] || fail "no DOM was written"
# The first value of attribute $1 in stdin, or nothing.
attr() { grep -o "$1=\"[^\"]*\"" | head -n 1 | cut -d'"' -f2 || true; }
updates=$(attr data-updates <"$dom")
[ "${updates:-0}" -ge 2 ] || fail "the page received ${updates:-0} snapshot(s) from /events, expected at least 2"
echo "snapshots received: $updates"
status=$(grep -o '<div id="status"[^>]*>' "$dom" | attr data-state)
[ "$status" = live ] || fail "the connection indicator says '$status', expected 'live'"
cards=$(grep -o '<section [^>]*data-route="[^"]*"[^>]*>' "$dom" || true)
[ "$(printf '%s\n' "$cards" | grep -c data-route)" -eq 1 ] || fail "expected 1 route card, found: $cards"
echo "route card: $(printf '%s' "$cards" | attr data-route)"
requests=$(printf '%s' "$cards" | attr data-requests)
[ "${requests:-0}" -ge "$sent" ] || fail "the route card counts '${requests}' requests, expected at least $sent"
rps=$(printf '%s' "$cards" | attr data-rps)
python3 -c 'import sys; sys.exit(not float(sys.argv[1] or 0) > 0)' "$rps" \
  || fail "the route card shows requests/s '$rps', expected more than 0"
echo "requests: $requests total, $rps/s"
for p in "$p1" "$p2"; do
  row=$(grep -o "<tr [^>]*data-address=\"127.0.0.1:$p\"[^>]*>" "$dom" || true)
  [ -n "$row" ] || fail "no backend row for 127.0.0.1:$p"
  state=$(printf '%s' "$row" | attr data-state)
  [ "$state" = healthy ] || fail "backend 127.0.0.1:$p is '$state', expected healthy"
  echo "backend 127.0.0.1:$p: $state"
done
[ "$(grep -o 'class="open[^"]*" data-open="[0-9][0-9]*"' "$dom" | wc -l)" -eq 2 ] \
  || fail "expected an open-connections cell on each of the 2 backend rows"
[ ! -s "$dir/exceptions.txt" ] || fail "the page threw: $(cat "$dir/exceptions.txt")"

log "dashboard check passed"
echo "screenshots: $dir/dashboard.png $dir/dashboard-phone.png"
