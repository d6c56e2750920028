#!/usr/bin/env bash
# Node and the packages of examples/node (@grpc/grpc-js, @grpc/proto-loader, from the npm
# registry as its package-lock.json pins them): tests/repo/test_example_node.py runs the example.
# node_modules/ stays in examples/node, git-ignored; a stamp skips `npm ci` when the lock
# file has not changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/../../examples/node"
stamp=node_modules/.installed-lock.json
if command -v node >/dev/null && cmp -s package-lock.json "$stamp" 2>/dev/null; then
  exit 0
fi
if ! command -v npm >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
npm ci --silent --no-audit --no-fund
cp package-lock.json "$stamp"
