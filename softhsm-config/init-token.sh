#!/usr/bin/env bash
# Initialise a SoftHSMv2 token in a project-local directory and print the
# SOFTHSM2_CONF to export. Idempotent: an existing token of that label is kept.
#
#   softhsm-config/init-token.sh DIR [LABEL] [USER_PIN] [SO_PIN]
#
# Never touches /var/lib/softhsm: SOFTHSM2_CONF points SoftHSM at DIR/tokens.
set -euo pipefail
dir=${1:?usage: init-token.sh DIR [LABEL] [USER_PIN] [SO_PIN]}
label=${2:-tm-demo}
pin=${3:-123456}
so_pin=${4:-12345678}
here=$(cd "$(dirname "$0")" && pwd)

mkdir -p "$dir/tokens"
chmod 700 "$dir" "$dir/tokens"
dir=$(cd "$dir" && pwd)
sed "s#@TOKENDIR@#$dir/tokens#" "$here/softhsm2.conf.in" > "$dir/softhsm2.conf"
export SOFTHSM2_CONF="$dir/softhsm2.conf"

if softhsm2-util --show-slots 2>/dev/null | grep -Eq "^[[:space:]]*Label:[[:space:]]+$label[[:space:]]*$"; then
  echo "token '$label' already initialised in $dir/tokens" >&2
else
  out=$(softhsm2-util --init-token --free --label "$label" --pin "$pin" --so-pin "$so_pin" 2>&1) \
    || { echo "$out" >&2; exit 1; }
  echo "initialised SoftHSMv2 token '$label' in $dir/tokens" >&2
fi
echo "$SOFTHSM2_CONF"
