#!/usr/bin/env bash
# SoftHSM2 (Debian's `softhsm2` package): tests/keys run the pkcs11 key backend against a
# real software token (softhsm2-util initialises a fresh one per test session).
set -euo pipefail
if command -v softhsm2-util >/dev/null \
  && { [ -e /usr/lib/softhsm/libsofthsm2.so ] || [ -e /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so ]; }; then
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends softhsm2 >/dev/null
