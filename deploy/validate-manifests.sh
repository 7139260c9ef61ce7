#!/usr/bin/env bash
# Validates deploy/kubernetes against the Kubernetes schemas (kubernetes-validate, strict), and
# the gateway config inside the ConfigMap with `streamgate check` (certificates made here).
set -euo pipefail
cd "$(dirname "$0")/.."

# A venv of its own (under target/, which git ignores): nothing touches the system Python.
venv=target/ci-venv
[ -x "$venv/bin/kubernetes-validate" ] || {
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check kubernetes-validate pyyaml
}
"$venv/bin/kubernetes-validate" --strict \
  deploy/kubernetes/{configmap,secret,deployment,service,pdb,backend-headless-service}.yaml

dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
mkdir -p "$dir/certs"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=localhost \
  -addext subjectAltName=DNS:localhost -keyout "$dir/certs/tls.key" -out "$dir/certs/tls.crt" 2>/dev/null
"$venv/bin/python" - "$dir" <<'PY'
import sys, yaml
out = sys.argv[1]
with open("deploy/kubernetes/configmap.yaml") as f:
    toml = yaml.safe_load(f)["data"]["streamgate.toml"]
toml = toml.replace("/etc/streamgate/certs/", out + "/certs/")
# `streamgate check` looks discovered names up, and CI must not send DNS queries for cluster
# names to the machine's resolver: the headless Service's name becomes localhost.
toml = toml.replace("chat-backend.default.svc.cluster.local", "localhost")
with open(out + "/streamgate.toml", "w") as f:
    f.write(toml)
PY
cargo run --quiet --locked -- check --config "$dir/streamgate.toml"
