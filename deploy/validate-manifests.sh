#!/usr/bin/env bash
# Validates deploy/kubernetes as `kubectl apply -k` would apply it: the kustomization rendered
# by kubectl, plus the certificate Secret created the way the README says (kubectl create
# secret tls, client-side), against the Kubernetes schemas (kubernetes-validate, strict); checks
# that the Deployment mounts that Secret and that no Secret comes from the kustomization; and
# runs `streamgate check` on the config inside the ConfigMap (certificates made here).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v kubectl >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends kubernetes-client >/dev/null
fi
# A venv of its own (under target/, which git ignores): nothing touches the system Python.
venv=target/ci-venv
[ -x "$venv/bin/kubernetes-validate" ] || {
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check kubernetes-validate pyyaml
}

dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
mkdir -p "$dir/certs" "$dir/rendered"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=localhost \
  -addext subjectAltName=DNS:localhost -keyout "$dir/certs/tls.key" -out "$dir/certs/tls.crt" 2>/dev/null

# The README's command, client-side: what the cluster would hold.
secret_cmd=$(grep -oE 'kubectl create secret tls streamgate-tls [^`]*' README.md | head -1)
[ -n "$secret_cmd" ] || { echo "README does not say how to create the Secret"; exit 1; }
echo "README: $secret_cmd"
kubectl create secret tls streamgate-tls --cert="$dir/certs/tls.crt" --key="$dir/certs/tls.key" \
  --dry-run=client -o yaml > "$dir/rendered/secret.yaml"
kubectl kustomize deploy/kubernetes > "$dir/rendered/kustomized.yaml"

"$venv/bin/python" - "$dir" <<'PY'
import sys, yaml
out = sys.argv[1]
docs = [d for d in yaml.safe_load_all(open(out + "/rendered/kustomized.yaml")) if d]
kinds = [d["kind"] for d in docs]
print("kustomization renders:", ", ".join(kinds))
assert "Secret" not in kinds, "the kustomization must not carry a Secret: it would overwrite the real one"
deploy = next(d for d in docs if d["kind"] == "Deployment")
spec = deploy["spec"]["template"]["spec"]
secrets = [v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v]
assert secrets == ["streamgate-tls"], f"the Deployment mounts {secrets}, not the README's Secret"
mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
cfg, certs = mounts["config"], mounts["certs"]
assert not certs.startswith(cfg.rstrip("/") + "/") and not cfg.startswith(certs.rstrip("/") + "/"), \
    f"mounts nest: config {cfg}, certs {certs}"
# One document per file for the validator.
for i, d in enumerate(docs):
    with open(f"{out}/rendered/{i:02d}-{d['kind'].lower()}.yaml", "w") as f:
        yaml.safe_dump(d, f)
cm = next(d for d in docs if d["kind"] == "ConfigMap")
toml = cm["data"]["streamgate.toml"]
toml = toml.replace("/etc/streamgate/certs/", out + "/certs/")
# `streamgate check` looks discovered names up, and CI must not send DNS queries for cluster
# names to the machine's resolver: the headless Service's name becomes localhost.
toml = toml.replace("chat-backend.default.svc.cluster.local", "localhost")
with open(out + "/streamgate.toml", "w") as f:
    f.write(toml)
PY
rm "$dir/rendered/kustomized.yaml"
"$venv/bin/kubernetes-validate" --strict "$dir"/rendered/*.yaml
cargo run --quiet --locked -- check --config "$dir/streamgate.toml"
