#!/usr/bin/env bash
# Headless Chromium and its driver from Debian, for the browser tests of the web helper
# (tests/web/test_browser.py). Quick exit when both are present.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
