#!/usr/bin/env bash
# Installs the system tools the tests use when they are missing (promtool, chromium, buf, ...).
# Each .ci/tools.d/*.sh checks for its own tool and installs it only when absent, so this is
# cheap on a machine that has them. Needs root for apt-get (CI and these machines run as root).
set -euo pipefail
cd "$(dirname "$0")/.."
for script in .ci/tools.d/*.sh; do
  [ -e "$script" ] || continue
  bash "$script"
done
