#!/usr/bin/env bash
# The main job, end to end, on the embedded default (SoftHSMv2 + the local sandbox):
# a P-256 key generated on a PKCS#11 token, its public key registered, an ES256
# challenge signed on the token, a token minted, verified against JWKS, printed.
# Everything lives under .demo/ in the checkout; everything started is stopped.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
demo="$root/.demo"
tm="$root/.venv/bin/tm-hsm-agent"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

mkdir -p "$demo"
chmod 700 "$demo"
export SOFTHSM2_CONF
SOFTHSM2_CONF=$("$root/softhsm-config/init-token.sh" "$demo/softhsm" tm-demo 123456 12345678)
export XDG_STATE_HOME="$demo/state" XDG_CONFIG_HOME="$demo/config" XDG_RUNTIME_DIR="$demo/run"
export TM_TOKEN_LABEL=tm-demo TM_KEY_LABEL=tm-api-key TM_PIN_FILE="$demo/pin"
(umask 077; printf '123456\n' > "$TM_PIN_FILE")

step "1. P-256 key on the token (SoftHSMv2 at $demo/softhsm)"
if "$tm" pubkey >/dev/null 2>&1; then
  echo "key 'tm-api-key' already on the token: reusing it"
else
  "$tm" keygen
fi
pkcs11-tool --module "$("$root/.venv/bin/python" -c 'from tm_hsm_agent.config import default_module; print(default_module())')" \
  --token-label tm-demo --login --pin 123456 --list-objects --type privkey 2>/dev/null | sed 's/^/    /'

step "2. Public key to register (SubjectPublicKeyInfo PEM)"
"$tm" pubkey --format pem | tee "$demo/public.pem"

step "3. Local sandbox of the Auth API"
rm -f "$demo/port"
"$tm" sandbox serve --port 0 --port-file "$demo/port" 2>"$demo/sandbox.log" &
sandbox_pid=$!
cleanup() { kill "$sandbox_pid" 2>/dev/null || true; wait "$sandbox_pid" 2>/dev/null || true; }
trap cleanup EXIT
for _ in $(seq 100); do [ -s "$demo/port" ] && break; sleep 0.1; done
[ -s "$demo/port" ] || { echo "sandbox did not start:"; cat "$demo/sandbox.log"; exit 1; }
port=$(cat "$demo/port")
export TM_AUTH_URL="http://127.0.0.1:$port/v1/auth"
echo "sandbox listening at $TM_AUTH_URL"

step "4. Register the public key (what the API Keys page does)"
TM_KEY_ID=$("$tm" sandbox register --url "http://127.0.0.1:$port" "$demo/public.pem")
export TM_KEY_ID
echo "key_id: $TM_KEY_ID"

step "5. Sign {key_id}.{timestamp} on the token and mint"
"$tm" mint --json > "$demo/mint.json"
"$root/.venv/bin/python" - "$demo/mint.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print(json.dumps({**d, "refresh_token": d["refresh_token"][:16] + "…"}, indent=2, ensure_ascii=False))
PY

step "6. Verify the access token against the sandbox JWKS"
"$root/.venv/bin/python" -c 'import json,sys; print(json.load(open(sys.argv[1]))["access_token"])' "$demo/mint.json" \
  | "$tm" verify -

step "Done: the JWT above verified. Audit log: $XDG_STATE_HOME/tm-hsm-agent/audit.log"
