#!/usr/bin/env bash
# buf (npm `@bufbuild/buf`): `make check-contract` runs `buf lint` and `buf breaking` on
# protos/. The npm package carries the binary itself (optional dependency per platform,
# e.g. @bufbuild/buf-linux-x64), so this downloads nothing but npm packages. Installed in
# the git-ignored .tools/ of the checkout, pinned here so every machine lints alike.
set -euo pipefail
cd "$(dirname "$0")/../.."
BUF_VERSION=1.75.0
prefix=.tools/buf
if [ -x "$prefix/node_modules/.bin/buf" ] &&
   [ "$("$prefix/node_modules/.bin/buf" --version 2>/dev/null)" = "$BUF_VERSION" ]; then
  exit 0
fi
if ! command -v npm >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
mkdir -p "$prefix"
npm install --silent --no-audit --no-fund --no-save --prefix "$prefix" "@bufbuild/buf@$BUF_VERSION"
"$prefix/node_modules/.bin/buf" --version >/dev/null
