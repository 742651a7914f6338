#!/usr/bin/env bash
# The test command: sets up what is missing, then runs the whole suite.
# As root it includes the system test of the .deb under a booted systemd (tests/system:
# builds the package, boots a Debian guest with systemd-nspawn; a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if [ -z "${AKIDB_SYSTEM_TESTS:-}" ] && [ "$(id -u)" -eq 0 ]; then
  export AKIDB_SYSTEM_TESTS=1
fi
exec .venv/bin/python -m pytest "$@"
