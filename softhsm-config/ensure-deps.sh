#!/usr/bin/env bash
# Make sure the system packages the demo and tests need are present.
# As root: one `apt-get update`, then `apt-get install` of what is missing.
# Otherwise: print the exact command to run, and fail.
#   ensure-deps.sh [COMMAND:PACKAGE ...]   also require these (e.g. ssh-agent:openssh-client)
set -euo pipefail

need=()
command -v softhsm2-util >/dev/null 2>&1 || need+=(softhsm2)
command -v pkcs11-tool   >/dev/null 2>&1 || need+=(opensc)
command -v certtool      >/dev/null 2>&1 || need+=(gnutls-bin)
command -v p11-kit       >/dev/null 2>&1 || need+=(p11-kit)
have_client=no
for f in /usr/lib/*/pkcs11/p11-kit-client.so /usr/lib/pkcs11/p11-kit-client.so; do
  [ -e "$f" ] && have_client=yes
done
[ "$have_client" = yes ] || need+=(p11-kit-modules)
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || need+=(python3)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need+=(python3-venv)
for extra in "$@"; do
  command -v "${extra%%:*}" >/dev/null 2>&1 || need+=("${extra#*:}")
done

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing system packages: ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
  exit 0
fi
echo "missing system packages: ${need[*]}" >&2
echo "run:  sudo apt-get update && sudo apt-get install -y ${need[*]}" >&2
exit 1
