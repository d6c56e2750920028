#!/usr/bin/env bash
# promtool and prometheus (Debian's `prometheus` package): tests/repo/test_alerts.py runs
# `promtool test rules` and an end-to-end scrape of a running tokensvc.
set -euo pipefail
if command -v promtool >/dev/null && command -v prometheus >/dev/null; then
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends prometheus >/dev/null
# the package starts a system prometheus on :9090; the tests run their own
if command -v systemctl >/dev/null; then systemctl stop prometheus 2>/dev/null || true; fi
service prometheus stop >/dev/null 2>&1 || true
