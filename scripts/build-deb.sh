#!/usr/bin/env bash
# Builds the Debian packages akidb-embed_<version>_<arch>.deb (the daemon in a virtualenv at
# /opt/venvs/akidb-embed, with its systemd unit) and python3-akidb-embed-client_<version>_all.deb
# (the client for the system Python) on Debian 12, then checks them with lintian.
#
# usage: scripts/build-deb.sh [--out DIR] [--version V] [--ort cpu|gpu] [--no-lintian]
#   --out DIR      where the .debs go (default: dist/)
#   --version V    Debian version to build instead of debian/changelog's (e.g. 0.1.0-2)
#   --ort gpu      onnxruntime-gpu in the virtualenv instead of onnxruntime (see debian/README.Debian)
#   --no-lintian   skip lintian
#
# Installs the build dependencies (debian/control's Build-Depends, plus lintian) with apt-get
# when missing; needs root for that (or sudo). The build runs on a copy of the working tree
# (tracked and untracked, not ignored files) in build/deb/, so the checkout gets no build
# products and the uncommitted state is what is built. Needs PyPI: pip fills the virtualenv.
# About 2-4 minutes on 2 cores, most of it pip downloads and xz.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

OUT=dist VERSION= ORT=${AKIDB_EMBED_ORT:-cpu} LINT=1
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=${2:?--out needs a directory}; shift 2 ;;
    --version) VERSION=${2:?--version needs a version}; shift 2 ;;
    --ort) ORT=${2:?--ort needs cpu or gpu}; shift 2 ;;
    --no-lintian) LINT=0; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-deb: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$ORT" in cpu|gpu) ;; *) echo "build-deb: --ort must be cpu or gpu" >&2; exit 2 ;; esac

# Debian's own tools and interpreter only: a pyenv/conda python3 first on PATH would end up
# in pybuild's and pip's hands.
export PATH=/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin
unset PYTHONPATH PYTHONHOME VIRTUAL_ENV
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8

start=$(date +%s)
step() { printf '[build-deb %3ds] %s\n' "$(( $(date +%s) - start ))" "$*" >&2; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# ---- build dependencies --------------------------------------------------------------------
tools=(build-essential dpkg-dev fakeroot)
[ "$LINT" = 1 ] && tools+=(lintian)
missing=()
for pkg in "${tools[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ] || ! dpkg-checkbuilddeps debian/control >/dev/null 2>&1; then
  step "installing build dependencies (apt-get)"
  as_root apt-get update -qq
  [ ${#missing[@]} -gt 0 ] && as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  as_root apt-get build-dep -y -qq "$ROOT" >/dev/null
  dpkg-checkbuilddeps debian/control
fi

# ---- a copy of the working tree --------------------------------------------------------------
[ -e debian/akidb-embed.service ] || {
  echo "build-deb: debian/akidb-embed.service -> $(readlink debian/akidb-embed.service) is missing" >&2; exit 1; }
WORK=$ROOT/build/deb
SRC=$WORK/akidb-embed
step "copying the working tree to ${SRC#"$ROOT"/}"
rm -rf "$WORK"
mkdir -p "$SRC"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git ls-files -z --cached --others --exclude-standard | tar --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -xf - -C "$SRC"
else
  tar --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./dist --exclude=./.dev \
      --exclude='*.egg-info' --exclude=__pycache__ -cf - . | tar -xf - -C "$SRC"
fi
if [ -n "$VERSION" ]; then
  step "building version $VERSION instead of $(dpkg-parsechangelog -S Version)"
  sed -i "1s/(.*)/($VERSION)/" "$SRC/debian/changelog"
fi

# ---- build ---------------------------------------------------------------------------------
step "dpkg-buildpackage -us -uc -b (ONNX Runtime: $ORT; log: ${WORK#"$ROOT"/}/build.log)"
(
  cd "$SRC"
  AKIDB_EMBED_ORT=$ORT dpkg-buildpackage -us -uc -b
) >"$WORK/build.log" 2>&1 &
build=$!
# progress: the last dh_* step or pip line, every 15 s, until the build ends
while kill -0 "$build" 2>/dev/null; do
  for _ in $(seq 1 30); do kill -0 "$build" 2>/dev/null || break; sleep 0.5; done
  kill -0 "$build" 2>/dev/null || break
  last=$(grep -E '^\s*(dh_|dh [a-z]|debian/rules|dpkg-deb|Collecting|Building|Installing|Successfully)' "$WORK/build.log" | tail -n1 | cut -c1-110)
  step "... ${last:-starting}"
done
if ! wait "$build"; then
  tail -n 40 "$WORK/build.log" >&2
  echo "build-deb: dpkg-buildpackage failed; full log in $WORK/build.log" >&2
  exit 1
fi

mkdir -p "$OUT"
debs=()
for deb in "$WORK"/*.deb; do
  mv -f "$deb" "$OUT/"
  debs+=("$OUT/$(basename "$deb")")
done
for deb in "${debs[@]}"; do
  step "built $deb ($(du -h "$deb" | cut -f1), installed $(dpkg-deb -f "$deb" Installed-Size) KiB)"
done

# ---- lintian -------------------------------------------------------------------------------
if [ "$LINT" = 1 ]; then
  step "lintian"
  status=0
  lintian --fail-on error --tag-display-limit 0 "${debs[@]}" >"$WORK/lintian.txt" 2>&1 || status=$?
  { grep -v '^running with root privileges' "$WORK/lintian.txt" || true; } | sed 's/^/    /' >&2
  count() { grep -c "^$1: " "$WORK/lintian.txt" || true; }
  step "lintian: $(count E) errors, $(count W) warnings (overrides, each with its reason: debian/*.lintian-overrides)"
  [ "$status" -eq 0 ] || { echo "build-deb: lintian reports errors" >&2; exit 1; }
fi
step "done: ${debs[*]}"
