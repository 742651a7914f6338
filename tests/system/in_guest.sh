#!/bin/bash
# in_guest.sh DEB CLIENT_DEB UPGRADE_DEB MODEL_DIR
#
# Runs as root inside a booted Debian 12 guest (boot-and-run.sh) with a real systemd, and
# walks akidb-embed's package through its life, one numbered step after another:
#    1 install      apt-get install of both .debs: the service is enabled, active, shows a STATUS,
#                   runs in group video (the Jetson GPU's)
#    2 verify       systemd-analyze verify of the installed unit; systemd-analyze security's
#                   exposure at or below EXPOSURE_BOUND; @system-service calls and AF_UNIX only;
#                   [metrics] http refused (logged) until the documented drop-in allows AF_INET
#    3 measure      bench_service.sh: start-to-READY, idle RSS and CPU (no model loaded)
#    4 hot-load     a real model copied in and its manifest renamed into models.d: served
#                   without a restart (same MainPID), verified by its golden vectors, and
#                   counted in the metrics textfile; manifests naming /etc/shadow (directly and
#                   through a symlink in a model root) listed invalid and never opened; the
#                   journal names the provider (CPU: the build has no TensorRT)
#    5 clients      system Python client as a member of group akidb-embed gets a (1, 384)
#                   vector; a user outside the group cannot open the socket
#    6 tenants      two apps as real users, set up as README.Debian says (a group each, the
#                   drop-in, two [[tenants]], a restart): each connects only to its own socket
#                   and sees only its models; kiosk's max_in_flight and max_queued_texts answer
#                   overloaded naming it, its cache ops not_allowed; robot's cache ops done.
#                   Then undone: no tenants, the unit as shipped
#    7 reload       `systemctl reload` keeps serving: same PID, same fingerprint and vectors
#    8 watchdog     a hung event loop (test-only SIGUSR2) is killed by the watchdog and
#                   restarted, while a client with retries still gets its answer
#    9 stop         `systemctl stop` with requests in flight: each gets a reply; no SIGSYS
#                   (SystemCallFilter=) in the whole run's journal
#   10 upgrade      a newer version installed over it (apt install ./FILE.deb, as
#                   docs/operating.md says) restarts the service, keeps the state and the catalog
#   11 remove       service stopped and gone, conffiles and models kept
#   12 purge        nothing of ours left
# Commands of docs/operating.md that need systemd are run here (tests/test_operating_guide.py
# checks that each is). A step that fails prints "FAILED step N (name): why", the unit's status and journal, and
# ends the run (the later steps depend on it). Each step's outcome is appended as a JSON line
# to $HARNESS_OUT/results.jsonl; bench_service.sh's figures go to $HARNESS_OUT/bench.txt.
#
# MODEL_DIR holds a converted model (model.onnx, tokenizer.json, ...) and its manifest
# <id>.toml, as `akidb-embed convert` wrote them on another machine.
# env: AKIDB_BENCH_SECONDS (idle window of step 3, default 10); AKIDB_BENCH (bench_service.sh
#      in the guest, default /akidb/tests/bench_service.sh: test_deb.py binds tests/system there)
set -uo pipefail

DEB=${1:?usage: in_guest.sh DEB CLIENT_DEB UPGRADE_DEB MODEL_DIR}
CLIENT_DEB=${2:?client .deb}
UPGRADE_DEB=${3:?upgrade .deb}
MODEL_SRC=${4:?model dir}
BENCH=${AKIDB_BENCH:-/akidb/tests/bench_service.sh}
OUT=${HARNESS_OUT:-/tmp}
RESULTS=$OUT/results.jsonl
UNIT=akidb-embed.service
MODEL_ID=all-minilm-l6-v2
MODELS=/var/lib/akidb-embed/models
CATALOG=/etc/akidb-embed/models.d
CONFIG=/etc/akidb-embed/akidb-embed.toml
SOCKET=/run/akidb-embed/embed.sock
WORK=/tmp/akidb-st        # scratch shared with the unprivileged test users
EXPOSURE_BOUND=3.9         # systemd-analyze security of the unit before this bound was set
: >"$RESULTS"
export DEBIAN_FRONTEND=noninteractive

# ---- step bookkeeping ----------------------------------------------------------------------
STEP=0 NAME=setup T0=$(date +%s%N)
elapsed() { awk -v a="$T0" -v b="$(date +%s%N)" 'BEGIN {printf "%.1f", (b - a) / 1e9}'; }
record() {   # record OK MESSAGE
    python3 - "$STEP" "$NAME" "$1" "$(elapsed)" "$2" >>"$RESULTS" <<'PY'
import json, sys
step, name, ok, seconds, message = sys.argv[1:]
print(json.dumps({"step": int(step), "name": name, "ok": ok == "true", "seconds": float(seconds), "message": message}))
PY
}
begin() { STEP=$1 NAME=$2 T0=$(date +%s%N); echo; echo "=== step $STEP ($NAME)"; }
pass() { record true "${1:-}"; echo "--- step $STEP ($NAME) ok in $(elapsed) s${1:+: $1}"; }
fail() {
    record false "$*"
    echo "!!! FAILED step $STEP ($NAME): $*"
    echo "---- systemctl status $UNIT"
    systemctl status "$UNIT" --no-pager -l 2>&1 | head -n 25
    echo "---- journalctl -u $UNIT (last 40 lines)"
    journalctl -u "$UNIT" --no-pager -o short-precise 2>&1 | tail -n 40
    exit 1
}
note() { echo "    $*"; }
# wait_until SECONDS COMMAND...: true as soon as COMMAND succeeds, false after SECONDS
wait_until() {
    local end=$(( $(date +%s%N) + $1 * 1000000000 )); shift
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s%N)" -lt "$end" ] || return 1
        sleep 0.2
    done
}
prop() { systemctl show -P "$1" "$UNIT"; }
main_pid() { prop MainPID; }
is_active() { [ "$(systemctl is-active "$UNIT")" = active ]; }
# a systemd time span ("10s", "1min 30s", "100ms") in seconds
span_s() {
    python3 -c '
import re, sys
units = {"us": 1e-6, "ms": 1e-3, "s": 1, "min": 60, "h": 3600}
print(sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)(us|ms|min|s|h)", sys.argv[1])))' "$1"
}
json_get() { python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print(eval(sys.argv[2], {}, {"d": d}))' "$1" "$2"; }

mkdir -p "$WORK" && chmod 1777 "$WORK"
# embed.py TIMEOUT RETRIES TEXT: one embed through the system Python's client, a JSON line out
cat >"$WORK/embed.py" <<'PY'
import json, sys
import akidb_embed_client
from akidb_embed_client import Client, EmbedError
timeout, retries, text = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
try:
    with Client(timeout=timeout, retries=retries) as client:
        v = client.embed([text])
except EmbedError as exc:
    print(json.dumps({"error": type(exc).__name__, "code": exc.code, "message": exc.message}))
    sys.exit(1)
print(json.dumps({"shape": list(v.shape), "dtype": str(v.dtype), "model": v.model, "fingerprint": v.fingerprint,
                  "head": [float(x) for x in v[0][:16]], "module": akidb_embed_client.__file__}))
PY
# inflight.py N TEXTS MARKER [SOCKET [MODEL]]: N requests sent at once on N sockets (default: the
# main socket, the default model); MARKER written once they are all out; then every reply is
# collected (60 s at most) with its arrival time, and an error's message
cat >"$WORK/inflight.py" <<'PY'
import json, random, sys, time
import zmq
from akidb_embed_client import protocol, EmbedError
n, per, marker = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
path = sys.argv[4] if len(sys.argv) > 4 else "/run/akidb-embed/embed.sock"
model = sys.argv[5] if len(sys.argv) > 5 else None
words = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches "
         "under pale moonlight and distant thunder rolls across empty northern hills").split()
ctx = zmq.Context()
sockets = []
for i in range(n):
    rnd = random.Random(i)
    texts = [" ".join(rnd.choice(words) for _ in range(48)) for _ in range(per)]
    s = ctx.socket(zmq.REQ)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"ipc://{path}")
    s.send(protocol.encode_request("embed", f"inflight-{i}", texts=texts, model=model, timeout_ms=120000))
    sockets.append(s)
time.sleep(0.3)  # on a local ipc socket the requests are in the daemon's queue by now
sent = time.time()
open(marker, "w").write(f"{sent}\n")
poller = zmq.Poller()
for s in sockets:
    poller.register(s, zmq.POLLIN)
replies, deadline = {}, time.monotonic() + 60
while len(replies) < n and time.monotonic() < deadline:
    for s, _ in poller.poll(200):
        i = sockets.index(s)
        message = None
        try:
            reply = protocol.decode_reply(s.recv_multipart())
            outcome = "ok" if reply.vectors is not None and reply.vectors.shape == (per, 384) else "bad-shape"
        except EmbedError as exc:
            outcome, message = exc.code, exc.message
        replies[i] = {"outcome": outcome, "at": time.time(), "message": message}
        poller.unregister(s)
print(json.dumps({"sent": sent, "replies": replies, "missing": [i for i in range(n) if i not in replies]}))
PY
chmod 0644 "$WORK"/*.py
# Output is searched with grep -q <<<"$(COMMAND)", never COMMAND | grep -q: grep stops at the first
# match, COMMAND's next write then gets SIGPIPE, and pipefail fails the check that matched.
# as_user USER COMMAND...: run as USER with the groups it has now
as_user() { runuser -u "$1" -- "${@:2}"; }
embed_as() { as_user "$1" python3 "$WORK/embed.py" "${@:2}"; }
# connect_as USER PATH: connect(2) to the socket file as USER; "connected", or "denied: <errno text>"
connect_as() {
    as_user "$1" python3 -c '
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except PermissionError as exc:
    print("denied:", exc)
else:
    print("connected")' "$2" 2>&1
}

# =============================================================================================
begin 1 install
for f in "$DEB" "$CLIENT_DEB" "$UPGRADE_DEB"; do [ -f "$f" ] || fail "no package file $f"; done
# the guest has no package lists: every Depends must already be installed (the rootfs has them)
apt-get install -y --no-install-recommends "$DEB" "$CLIENT_DEB" </dev/null >"$OUT/install.log" 2>&1 \
    || fail "apt-get install failed: $(tail -n 15 "$OUT/install.log")"
note "installed $(dpkg-query -W -f='${Package} ${Version}, ' akidb-embed python3-akidb-embed-client) in $(elapsed) s"
wait_until 5 is_active || fail "akidb-embed is $(systemctl is-active "$UNIT") 5 s after install, not active"
[ "$(systemctl is-enabled "$UNIT")" = enabled ] || fail "the unit is $(systemctl is-enabled "$UNIT") after install, not enabled"
status_text=$(prop StatusText)
[ -n "$status_text" ] || fail "the daemon sent no STATUS= line (systemctl show -P StatusText is empty)"
grep -q "Status: \"" <<<"$(systemctl status "$UNIT" --no-pager 2>&1)" \
    || fail "systemctl status shows no Status: line: $(systemctl status "$UNIT" --no-pager 2>&1 | head -n 8)"
note "status: $status_text"
[ "$(prop Type)" = notify ] || fail "Type=$(prop Type), expected notify"
# the GPU's device files are group video on a Jetson: the command docs/operating.md gives to check it
groups=$(systemctl show -P SupplementaryGroups akidb-embed)
[[ " $groups " == *" video "* ]] || fail "SupplementaryGroups='$groups' lacks video (the Jetson GPU's group)"
pid=$(main_pid)
[ "$(ps -o user= -p "$pid")" = akidb-embed ] || fail "the daemon runs as $(ps -o user= -p "$pid"), not akidb-embed"
getent group akidb-embed >/dev/null || fail "no group akidb-embed"
sock=$(stat -c '%a %U %G' "$SOCKET" 2>&1) || fail "no socket at $SOCKET: $sock"
[ "$sock" = "660 akidb-embed akidb-embed" ] || fail "socket $SOCKET is '$sock', expected '660 akidb-embed akidb-embed'"
[ "$(readlink -f /usr/bin/akidb-embed)" = /opt/venvs/akidb-embed/bin/akidb-embed ] \
    || fail "/usr/bin/akidb-embed resolves to $(readlink -f /usr/bin/akidb-embed), not the virtualenv's script"
owner=$(stat -c '%U:%G' "$MODELS" 2>&1)
[ "$owner" = akidb-embed:akidb-embed ] || fail "$MODELS is owned by '$owner', not akidb-embed:akidb-embed"
conffiles=$(dpkg-query -W -f='${Conffiles}\n' akidb-embed)
for f in /etc/akidb-embed/akidb-embed.toml "$CATALOG/$MODEL_ID.toml"; do
    grep -q " $f " <<<"$conffiles" || fail "$f is not a conffile; dpkg lists: $conffiles"
done
if /opt/venvs/akidb-embed/bin/python -c 'import torch' 2>/dev/null; then fail "torch is importable in the virtualenv"; fi
/opt/venvs/akidb-embed/bin/python -c 'import onnxruntime' || fail "onnxruntime does not import in the virtualenv"
pass "active, enabled, STATUS '$status_text'"

# =============================================================================================
begin 2 verify
unit_file=$(prop FragmentPath)
note "unit file: $unit_file"
out=$(systemd-analyze verify "$unit_file" 2>&1); rc=$?
[ -z "$out" ] || echo "$out" | sed 's/^/    verify: /'
[ $rc -eq 0 ] || fail "systemd-analyze verify $unit_file exited $rc: $out"
ours=$(grep -F "$(basename "$unit_file")" <<<"$out")
[ -z "$ours" ] || fail "systemd-analyze verify warns about the unit: $ours"
# the exposure score may not grow: 3.9 was the unit's score before RestrictAddressFamilies= and
# SystemCallFilter= (systemd 252, Debian 12)
systemd-analyze security "$UNIT" --no-pager >"$OUT/security.txt" 2>&1 \
    || fail "systemd-analyze security failed: $(tail -n 5 "$OUT/security.txt")"
exposure=$(sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p' "$OUT/security.txt")
[ -n "$exposure" ] || fail "no exposure level in systemd-analyze security: $(tail -n 3 "$OUT/security.txt")"
python3 -c "import sys; sys.exit(not $exposure <= $EXPOSURE_BOUND)" \
    || fail "exposure $exposure is above the bound $EXPOSURE_BOUND: $(grep '✗' "$OUT/security.txt" | head -n 20)"
note "systemd-analyze security: exposure $exposure (bound $EXPOSURE_BOUND; table in security.txt)"
[ "$(prop RestrictAddressFamilies)" = AF_UNIX ] || fail "RestrictAddressFamilies=$(prop RestrictAddressFamilies), expected AF_UNIX"
# the system call filter as systemd applies it: what ONNX Runtime needs in, what no daemon needs out
filter=" $(prop SystemCallFilter) "
for call in openat mmap sched_setaffinity futex; do
    [[ $filter == *" $call "* ]] || fail "SystemCallFilter= leaves out $call, which the daemon needs"
done
for call in mount reboot init_module ptrace; do
    [[ $filter == *" $call "* ]] && fail "SystemCallFilter= allows $call"
done
# [metrics] http needs AF_INET: refused (logged, embeddings still served) until the documented
# drop-in re-allows it
cp -p "$CONFIG" "$WORK/config.orig"
sed -i 's/^#http = ""/http = "127.0.0.1:9464"/' "$CONFIG"
grep -q '^http = "127.0.0.1:9464"' "$CONFIG" || fail "could not set [metrics] http in $CONFIG"
scrape() { python3 -c 'import urllib.request; print(urllib.request.urlopen("http://127.0.0.1:9464/metrics", timeout=2).read().decode())'; }
since=$(date '+%Y-%m-%d %H:%M:%S')
systemctl restart "$UNIT" && wait_until 5 is_active || fail "restart with [metrics] http failed"
refused() { grep -q "metrics: cannot serve HTTP.*RestrictAddressFamilies" <<<"$(journalctl -u "$UNIT" --since "$since" --no-pager)"; }
wait_until 10 refused || fail "no 'metrics: cannot serve HTTP ... RestrictAddressFamilies' line: $(journalctl -u "$UNIT" --since "$since" --no-pager | tail -n 5)"
akidb-embed status >/dev/null || fail "the daemon does not answer with the HTTP endpoint refused"
scrape >/dev/null 2>&1 && fail "/metrics answered over TCP although the unit allows only AF_UNIX"
note "without the drop-in: $(journalctl -u "$UNIT" --since "$since" --no-pager -o cat | grep -m1 'metrics: cannot serve HTTP')"
dropin=/etc/systemd/system/$UNIT.d/metrics-http.conf
mkdir -p "$(dirname "$dropin")"
printf '[Service]\nRestrictAddressFamilies=AF_INET AF_INET6\n' >"$dropin"
systemctl daemon-reload && systemctl restart "$UNIT" && wait_until 5 is_active || fail "restart with the metrics-http drop-in failed"
wait_until 10 scrape || fail "/metrics does not answer with the drop-in (RestrictAddressFamilies=$(prop RestrictAddressFamilies))"
page=$(scrape) || fail "/metrics stopped answering with the drop-in"
grep -q '^akidb_embed_info' <<<"$page" || fail "/metrics answered without akidb_embed_info: $(head -c 600 <<<"$page")"
note "with the drop-in (RestrictAddressFamilies=$(prop RestrictAddressFamilies)): /metrics served on 127.0.0.1:9464"
rm -f "$dropin"; rmdir "$(dirname "$dropin")" 2>/dev/null
cp -p "$WORK/config.orig" "$CONFIG"
systemctl daemon-reload && systemctl restart "$UNIT" && wait_until 5 is_active || fail "restart without the drop-in failed"
pass "clean; exposure $exposure (bound $EXPOSURE_BOUND), @system-service calls and AF_UNIX only; metrics http only with the drop-in"

# =============================================================================================
begin 3 measure
bench=$("$BENCH" "${AKIDB_BENCH_SECONDS:-10}" 2>&1) || fail "bench_service.sh failed: $bench"
echo "$bench" | sed 's/^/    /'
is_active || fail "the service is not active after bench_service.sh"
pass "$(tr '\n' ' ' <<<"$bench")"

# =============================================================================================
begin 4 hot-load
pid=$(main_pid)
manifest=$(ls "$MODEL_SRC"/*.toml 2>/dev/null | head -n 1)
[ -n "$manifest" ] || fail "no manifest (*.toml) in $MODEL_SRC"
dest=$MODELS/$MODEL_ID
mkdir -p "$dest"
find "$MODEL_SRC" -maxdepth 1 -type f ! -name '*.toml' -exec cp {} "$dest/" \;
chmod -R a+rX "$dest"
# the manifest names its files by absolute path on the machine that converted them: point them
# here, write it beside the catalog under a name the daemon ignores, then rename it in (atomic)
sed -E "s#^(model|tokenizer|file)( *)= *\".*/([^/\"]+)\"#\\1\\2= \"$dest/\\3\"#" "$manifest" \
    >"$CATALOG/$MODEL_ID.toml.new"
grep -E '^(model|tokenizer) *=' "$CATALOG/$MODEL_ID.toml.new" | sed 's/^/    manifest: /'
mv -f "$CATALOG/$MODEL_ID.toml.new" "$CATALOG/$MODEL_ID.toml"
model_state() {
    akidb-embed models --json 2>/dev/null | python3 -c '
import json, sys
print(next((m.get("state", "?") for m in json.load(sys.stdin) if m.get("id") == sys.argv[1]), "absent"))' "$MODEL_ID"
}
served() { case "$(model_state)" in available|ready|loading) return 0 ;; *) return 1 ;; esac; }
wait_until 15 served || fail "15 s after the manifest appeared, $MODEL_ID is '$(model_state)': $(akidb-embed models 2>&1)"
[ "$(main_pid)" = "$pid" ] || fail "the daemon restarted (MainPID $pid -> $(main_pid)); the model must load without one"
# the first load measures the model first: seconds on an idle machine, a minute on a busy one
out=$(akidb-embed embed --timeout 120 --json "a first sentence for the new model" 2>&1) || fail "akidb-embed embed failed: $out"
dim=$(json_get "$out" 'd["dimension"]')
[ "$dim" = 384 ] || fail "the embedding has dimension $dim, expected 384"
# the journal says which provider serves it (docs/operating.md reads these lines): the CPU build has no TensorRT
journal_loaded() {
    loaded=$(journalctl -u "$UNIT" --no-pager | grep 'loaded in')
    [[ $loaded == *"model $MODEL_ID: loaded in "*" on CPUExecutionProvider;"* ]]
}
wait_until 10 journal_loaded || fail "no 'model $MODEL_ID: loaded in ... on CPUExecutionProvider' in the journal: $(journalctl -u "$UNIT" --no-pager | tail -n 5)"
grep -q "execution provider tensorrt skipped: this onnxruntime build does not have it" <<<"$(journalctl -u "$UNIT" --no-pager)" \
    || fail "the journal does not say the CPU build has no TensorRT provider: $(journalctl -u "$UNIT" --no-pager | grep -i provider | tail -n 3)"
verification=$(akidb-embed models --json 2>/dev/null | python3 -c '
import json, sys
print(next((m.get("verification") for m in json.load(sys.stdin) if m.get("id") == sys.argv[1]), "absent"))' "$MODEL_ID")
[ "$verification" = passed ] || fail "$MODEL_ID is '$verification', not verified by its golden vectors: $(akidb-embed models 2>&1)"
PROM=/var/lib/akidb-embed/metrics/akidb-embed.prom
counted() { grep -q "^akidb_embed_requests_total{code=\"ok\",model=\"$MODEL_ID\"} [1-9]" "$PROM" 2>/dev/null; }
wait_until 15 counted || fail "the metrics textfile $PROM does not count the embed: $(ls -l "$PROM" 2>&1)"
runuser -u nobody -- cat "$PROM" >/dev/null \
    || fail "node_exporter's user could not read $PROM: $(ls -ld "$(dirname "$PROM")" "$PROM" 2>&1)"
# Manifests naming a file the daemon's user cannot read, outside the model roots: /etc/shadow itself,
# and through a symlink planted in a root. Refused from the paths alone: had the daemon opened the
# file as akidb-embed, the error would be "Permission denied", not the roots.
mkdir -p "$MODELS/escape" && ln -sfn /etc/shadow "$MODELS/escape/model.onnx"
for id in escape-abs escape-link; do
    model=/etc/shadow; [ "$id" = escape-link ] && model=$MODELS/escape/model.onnx
    printf 'id = "%s"\nmodel = "%s"\ntokenizer = "%s"\ndimension = 384\nmax_length = 256\npooling = "mean"\n' \
        "$id" "$model" "$dest/tokenizer.json" >"$CATALOG/.$id.toml.new"
    mv -f "$CATALOG/.$id.toml.new" "$CATALOG/$id.toml"
done
escape_errors() {
    akidb-embed models --json 2>/dev/null | python3 -c '
import json, sys
models = {m["id"]: m for m in json.load(sys.stdin)}
for i in ("escape-abs", "escape-link"):
    m = models.get(i, {})
    assert m.get("state") == "invalid" and "outside the model roots" in (m.get("error") or ""), m
    print(m["error"])'
}
wait_until 15 escape_errors || fail "manifests naming /etc/shadow are not refused: $(akidb-embed models 2>&1)"
escape_errors | sed 's/^/    refused: /'
out=$(akidb-embed load escape-link 2>&1) && fail "akidb-embed load escape-link succeeded: $out"
case "$out" in *"outside the model roots"*) ;; *) fail "load escape-link: not refused for its root: $out" ;; esac
case "$out" in *"ermission denied"*) fail "the daemon tried to open /etc/shadow: $out" ;; esac
rm -f "$CATALOG/escape-abs.toml" "$CATALOG/escape-link.toml" && rm -rf "$MODELS/escape"
pass "state $(model_state), same MainPID $pid, 384-dim vector from the CLI, self-test passed, counted in $PROM (readable by other users); /etc/shadow refused, directly and by symlink"

# =============================================================================================
begin 5 clients
adduser --disabled-password --gecos "" --quiet app && adduser --quiet app akidb-embed || fail "could not create user app"
adduser --disabled-password --gecos "" --quiet outsider || fail "could not create user outsider"
out=$(embed_as app 10 3 "hello from an application") || fail "embed as app (group akidb-embed) failed: $out"
[ "$(json_get "$out" 'd["shape"]')" = "[1, 384]" ] || fail "app got shape $(json_get "$out" 'd["shape"]'), expected [1, 384]"
module=$(json_get "$out" 'd["module"]')
[[ $module == /usr/lib/python3/dist-packages/akidb_embed_client/* ]] \
    || fail "the client came from $module, not python3-akidb-embed-client in /usr/lib/python3/dist-packages"
note "app: shape (1, 384), model $(json_get "$out" 'd["model"]'), client from $module"
out=$(embed_as outsider 1 2 "not allowed"); rc=$?
[ $rc -ne 0 ] && [ "$(json_get "$out" 'd["error"]')" = Unavailable ] \
    || fail "a user outside group akidb-embed was not refused (rc $rc): $out"
raw=$(connect_as outsider "$SOCKET")
[[ $raw == denied:* ]] || fail "outsider opening $SOCKET directly: $raw (expected permission denied)"
note "outsider: client raised Unavailable; connect(2): ${raw#denied: }"
pass "member served, outsider refused"

# =============================================================================================
begin 6 tenants
# Two apps share the daemon, set up as README.Debian tells an operator: a group and a user each; a
# drop-in making the daemon's user a member of both groups and letting the apps' users through
# /run/akidb-embed; two [[tenants]]; a restart. robot sees step 4's MiniLM and may load, unload
# and pin it; kiosk sees a second manifest of the same files, with 1 request in flight and 64
# queued texts at most, and no cache ops. Undone at the end: later steps see the daemon as before.
KIOSK_MODEL=kiosk-minilm
tenant_sock() { echo "/run/akidb-embed/$1.sock"; }
# cli_as USER TENANT ARGS...: the akidb-embed command as USER on TENANT's socket
cli_as() { as_user "$1" akidb-embed "${@:3}" --socket "$(tenant_sock "$2")"; }
# refuses USER TENANT CODE PATTERN ARGS...: the command fails with "error [CODE]: " and a message
# matching the glob PATTERN
refuses() {
    local out
    out=$(cli_as "$1" "$2" "${@:5}" 2>&1) && fail "$1 on the $2 socket: akidb-embed ${*:5} succeeded: $out"
    [[ $out == *"error [$3]: "$4 ]] || fail "$1 on the $2 socket: akidb-embed ${*:5} did not fail with [$3] '$4': $out"
    note "$1 ($2): akidb-embed ${*:5:2}...: $out"
}
# model_ids USER TENANT: the ids `akidb-embed models` lists to USER on TENANT's socket
model_ids() {
    cli_as "$1" "$2" models --json | python3 -c 'import json, sys; print(" ".join(sorted(m["id"] for m in json.load(sys.stdin))))'
}
# outcomes FILE: inflight.py's replies counted by outcome, and the distinct error messages
outcomes() {
    python3 - "$1" <<'PY'
import collections, json, sys
data = json.load(open(sys.argv[1]))
replies = data["replies"].values()
print(json.dumps({"counts": collections.Counter(r["outcome"] for r in replies), "missing": data["missing"],
                  "messages": sorted({r["message"] for r in replies if r["message"]})}))
PY
}
for t in robot kiosk; do
    { groupadd --system "$t" && adduser --disabled-password --gecos "" --quiet "$t-app" && adduser --quiet "$t-app" "$t"; } \
        || fail "could not create group $t and its user $t-app"
done
sed "s/^id = \"$MODEL_ID\"/id = \"$KIOSK_MODEL\"/" "$CATALOG/$MODEL_ID.toml" >"$CATALOG/.$KIOSK_MODEL.toml.new"
mv -f "$CATALOG/.$KIOSK_MODEL.toml.new" "$CATALOG/$KIOSK_MODEL.toml"
cp -p "$CONFIG" "$WORK/config.before-tenants"
cat >>"$CONFIG" <<EOF

[[tenants]]
name = "robot"
group = "robot"
models = ["$MODEL_ID"]
cache_ops = ["load", "unload", "pin"]

[[tenants]]
name = "kiosk"
group = "kiosk"
models = ["kiosk-*"]
max_in_flight = 1
max_queued_texts = 64
EOF
dropin=/etc/systemd/system/$UNIT.d/tenants.conf
mkdir -p "$(dirname "$dropin")"
printf '[Service]\nSupplementaryGroups=robot kiosk\nRuntimeDirectoryMode=0751\n' >"$dropin"
systemctl daemon-reload && systemctl restart "$UNIT" && wait_until 5 is_active || fail "restart with two tenants failed"
groups=" $(prop SupplementaryGroups) "
for g in video robot kiosk; do [[ $groups == *" $g "* ]] || fail "SupplementaryGroups=$groups lacks $g"; done
for t in robot kiosk; do
    sock=$(stat -c '%a %U %G' "$(tenant_sock $t)" 2>&1) || fail "no socket for tenant $t: $sock"
    [ "$sock" = "660 akidb-embed $t" ] || fail "$(tenant_sock $t) is '$sock', expected '660 akidb-embed $t'"
done
note "daemon groups $(ps -o supgrp= -p "$(main_pid)"); /run/akidb-embed $(stat -c '%a %U:%G' /run/akidb-embed)"
# the kernel decides who connects: each app its own socket only, the main one its group's members only
for case in robot-app:robot:connected robot-app:kiosk:denied robot-app:embed:denied \
            kiosk-app:kiosk:connected kiosk-app:robot:denied kiosk-app:embed:denied app:embed:connected app:kiosk:denied; do
    IFS=: read -r user sock want <<<"$case"
    got=$(connect_as "$user" "$(tenant_sock "$sock")")
    [[ $got == "$want"* ]] || fail "$user connecting to $(tenant_sock "$sock"): $got (expected $want)"
done
note "connect(2): robot-app and kiosk-app each reach only their own socket; app (group akidb-embed) only the main one"
# each sees only its models; the other's is unknown_model, even by name
ids=$(model_ids robot-app robot) && [ "$ids" = "$MODEL_ID" ] || fail "robot-app's socket lists '$ids', expected only $MODEL_ID"
ids=$(model_ids kiosk-app kiosk) && [ "$ids" = "$KIOSK_MODEL" ] || fail "kiosk-app's socket lists '$ids', expected only $KIOSK_MODEL"
all=" $(akidb-embed models --json | python3 -c 'import json, sys; print(" ".join(m["id"] for m in json.load(sys.stdin)))') "
[[ $all == *" $MODEL_ID "* && $all == *" $KIOSK_MODEL "* ]] || fail "the main socket lists '$all', not both models"
for who in robot:"$MODEL_ID" kiosk:"$KIOSK_MODEL"; do   # the first use loads (and measures) the model
    t=${who%%:*}
    out=$(cli_as "$t-app" "$t" embed --timeout 120 --json --model "${who#*:}" "a query of $t" 2>&1) \
        || fail "$t-app embedding with ${who#*:} on its socket failed: $out"
    [ "$(json_get "$out" 'd["dimension"]')" = 384 ] || fail "$t-app got dimension $(json_get "$out" 'd["dimension"]')"
done
refuses kiosk-app kiosk unknown_model "no model '$MODEL_ID' for tenant kiosk; name one of its models: $KIOSK_MODEL" \
    embed --model "$MODEL_ID" "not mine"
refuses robot-app robot unknown_model "no model '$KIOSK_MODEL' for tenant robot; name one of its models: $MODEL_ID" \
    embed --model "$KIOSK_MODEL" "not mine"
# quotas: of 4 requests sent at once, kiosk (max_in_flight 1) gets 1 served and 3 overloaded;
# robot (no quotas) gets all 4 served; 65 texts in one request exceed kiosk's max_queued_texts (64)
for who in kiosk:"$KIOSK_MODEL" robot:"$MODEL_ID"; do
    t=${who%%:*}
    rm -f "$WORK/$t-sent"
    as_user "$t-app" python3 "$WORK/inflight.py" 4 64 "$WORK/$t-sent" "$(tenant_sock "$t")" "${who#*:}" \
        >"$WORK/$t-inflight.json" 2>"$WORK/$t-inflight.err" || fail "$t-app's concurrent requests failed: $(cat "$WORK/$t-inflight.err")"
done
kiosk=$(outcomes "$WORK/kiosk-inflight.json"); robot=$(outcomes "$WORK/robot-inflight.json")
note "4 requests at once: kiosk $kiosk; robot $robot"
[ "$(json_get "$kiosk" 'd["counts"] == {"ok": 1, "overloaded": 3} and not d["missing"]')" = True ] \
    || fail "kiosk (max_in_flight 1) sent 4 requests at once: $kiosk; expected 1 ok and 3 overloaded"
[ "$(json_get "$kiosk" 'all("tenant kiosk" in m and "max_in_flight 1" in m for m in d["messages"])')" = True ] \
    || fail "kiosk's overloaded replies do not name the tenant and the quota: $kiosk"
[ "$(json_get "$robot" 'd["counts"] == {"ok": 4} and not d["missing"]')" = True ] \
    || fail "robot (no quotas) sent 4 requests at once: $robot; expected 4 ok"
refuses kiosk-app kiosk overloaded "tenant kiosk has 0 texts queued and this request adds 65 (max_queued_texts 64)*" \
    embed --model "$KIOSK_MODEL" $(seq 65)
# cache ops: not_allowed for kiosk; robot may, on its own model only
for op in load unload pin unpin; do
    refuses kiosk-app kiosk not_allowed "tenant kiosk may not $op models (its cache_ops: none)*" "$op" "$KIOSK_MODEL"
done
for check in 'pin:d["pinned"] and d["state"] == "ready"' 'unpin:not d["pinned"]' 'unload:d["state"] == "available"' \
             'load:d["state"] == "ready"'; do
    op=${check%%:*}
    out=$(cli_as robot-app robot "$op" --json "$MODEL_ID" 2>&1) || fail "robot-app: akidb-embed $op $MODEL_ID failed: $out"
    [ "$(json_get "$out" "${check#*:}")" = True ] || fail "robot-app: after $op, $MODEL_ID is not as expected (${check#*:}): $out"
done
note "robot-app: pin, unpin, unload, load of $MODEL_ID done on its socket"
refuses robot-app robot unknown_model "no model '$KIOSK_MODEL' for tenant robot*" load "$KIOSK_MODEL"
# the figures: every tenant's on the main socket, its own only on a tenant's, and in the metrics
figures=$(akidb-embed status --json) || fail "akidb-embed status failed: $figures"
want='{"max_in_flight": 3, "max_queued_texts": 1, "cache_ops": 4}'
[ "$(json_get "$figures" "d['tenants']['kiosk']['refused'] == $want")" = True ] \
    || fail "status shows kiosk's refusals as $(json_get "$figures" 'd["tenants"]["kiosk"]["refused"]'), expected $want"
[ "$(json_get "$figures" 'sum(d["tenants"]["robot"]["refused"].values())')" = 0 ] \
    || fail "status shows refusals for robot: $(json_get "$figures" 'd["tenants"]["robot"]')"
own=$(cli_as kiosk-app kiosk status --json 2>&1) && [ "$(json_get "$own" 'sorted(d["tenants"])')" = "['kiosk']" ] \
    || fail "kiosk's status shows other tenants' figures: $own"
metric='akidb_embed_tenant_refused_total{quota="max_in_flight",tenant="kiosk"} 3'
wait_until 15 grep -qF "$metric" "$PROM" || fail "$PROM lacks '$metric': $(grep tenant_refused "$PROM")"
# back to the daemon of the later steps: no tenants, no second model, the unit as shipped
cp -p "$WORK/config.before-tenants" "$CONFIG"
rm -f "$CATALOG/$KIOSK_MODEL.toml" "$dropin"; rmdir "$(dirname "$dropin")" 2>/dev/null
systemctl daemon-reload && systemctl restart "$UNIT" && wait_until 5 is_active || fail "restart without the tenants failed"
for t in robot kiosk; do [ ! -e "$(tenant_sock $t)" ] || fail "$(tenant_sock $t) is still there without tenants"; done
[ "$(stat -c %a /run/akidb-embed)" = 750 ] || fail "/run/akidb-embed is $(stat -c %a /run/akidb-embed) after the drop-in went, not 750"
out=$(embed_as app 60 2 "after the tenants") || fail "embed as app after removing the tenants failed: $out"
pass "own socket only (kernel), own models only, kiosk 1 of 4 at once served and 65 texts refused, its cache ops not_allowed, robot's done; figures in status and metrics"

# =============================================================================================
begin 7 reload
pid=$(main_pid)
before=$(embed_as app 10 3 "the same sentence twice") || fail "embed before reload failed: $before"
systemctl reload "$UNIT" || fail "systemctl reload exited $?"
wait_until 5 is_active || fail "the service is $(systemctl is-active "$UNIT") after reload"
[ "$(main_pid)" = "$pid" ] || fail "reload replaced the process (MainPID $pid -> $(main_pid))"
after=$(embed_as app 10 3 "the same sentence twice") || fail "embed after reload failed: $after"
cmp=$(python3 - "$before" "$after" <<'PY'
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
diff = max(abs(x - y) for x, y in zip(a["head"], b["head"]))
same = a["fingerprint"] == b["fingerprint"] and diff < 1e-5
print("same" if same else "differ: fingerprint %s vs %s, max diff %g" % (a["fingerprint"], b["fingerprint"], diff))
PY
)
[ "$cmp" = same ] || fail "the answers before and after reload $cmp"
pass "same MainPID $pid, fingerprint $(json_get "$after" 'd["fingerprint"]')"

# =============================================================================================
begin 8 watchdog
dropin=/etc/systemd/system/$UNIT.d/test-hang.conf
mkdir -p "$(dirname "$dropin")"
printf '[Service]\nEnvironment=AKIDB_EMBED_TEST_HANG_SIGNAL=1\n' >"$dropin"
systemctl daemon-reload && systemctl restart "$UNIT" || fail "restart with the test drop-in failed"
wd=$(span_s "$(prop WatchdogUSec)"); rs=$(span_s "$(prop RestartUSec)")
python3 -c "import sys; sys.exit(not $wd > 0)" || fail "the unit sets no WatchdogSec= (WatchdogUSec=$(prop WatchdogUSec))"
pid=$(main_pid); restarts=$(prop NRestarts)
embed_as app 1 1 "warm up" >/dev/null || true   # the model is loaded before the hang
since=$(date '+%Y-%m-%d %H:%M:%S')
t_sig=$(date +%s%N)
kill -USR2 "$pid" || fail "could not signal MainPID $pid"
sleep 0.5
embed_as app 4 12 "answered despite a hung daemon" >"$WORK/watchdog-client.json" &
client=$!
limit=$(python3 -c "import math; print(math.ceil($wd + $rs + 20))")
restarted() { local p; p=$(main_pid); [ "$p" != 0 ] && [ "$p" != "$pid" ] && is_active; }
wait_until "$limit" restarted \
    || fail "no new main process within ${limit} s (WatchdogSec ${wd} s + RestartSec ${rs} s + 20): MainPID $(main_pid), $(systemctl is-active "$UNIT")"
took=$(awk -v a="$t_sig" -v b="$(date +%s%N)" 'BEGIN {printf "%.1f", (b - a) / 1e9}')
grep -qi "watchdog timeout" <<<"$(journalctl -u "$UNIT" --since "$since" --no-pager)" \
    || fail "the process was replaced, but not by the watchdog (no 'Watchdog timeout' in the journal; did SIGUSR2 kill it instead of hanging the loop?)"
restarts_after=$(prop NRestarts)
[ "$restarts_after" -gt "$restarts" ] || fail "NRestarts did not grow ($restarts -> $restarts_after)"
wait "$client"; rc=$?
out=$(cat "$WORK/watchdog-client.json")
[ $rc -eq 0 ] && [ "$(json_get "$out" 'd["shape"]')" = "[1, 384]" ] \
    || fail "the client with retries did not get its answer across the restart (rc $rc): $out"
rm -f "$dropin"; rmdir "$(dirname "$dropin")" 2>/dev/null
systemctl daemon-reload && systemctl restart "$UNIT" && wait_until 5 is_active || fail "restart without the drop-in failed"
pass "killed by the watchdog and restarted in ${took} s (MainPID $pid -> new, NRestarts $restarts -> $restarts_after); the client got (1, 384)"

# =============================================================================================
begin 9 stop
embed_as app 10 3 "warm up" >/dev/null || fail "the daemon does not answer before the stop test"
rm -f "$WORK/sent"
as_user app python3 "$WORK/inflight.py" 12 96 "$WORK/sent" >"$WORK/inflight.json" 2>"$WORK/inflight.err" &
batch=$!
wait_until 30 test -s "$WORK/sent" || fail "the client batch did not send its requests: $(cat "$WORK/inflight.err")"
t_stop=$(date +%s.%N)
systemctl stop "$UNIT"; rc=$?
stop_s=$(awk -v a="$t_stop" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}')
wait "$batch" || fail "the client batch failed: $(cat "$WORK/inflight.err")"
[ $rc -eq 0 ] || fail "systemctl stop exited $rc"
summary=$(python3 - "$WORK/inflight.json" "$t_stop" <<'PY'
import collections, json, sys
data, stop = json.load(open(sys.argv[1])), float(sys.argv[2])
replies = data["replies"].values()
counts = collections.Counter(r["outcome"] for r in replies)
after = sum(r["at"] >= stop for r in replies)
bad = {k: v for k, v in counts.items() if k not in ("ok", "shutting_down")}
print(json.dumps({"counts": counts, "answered_after_stop": after, "missing": data["missing"], "bad": bad}))
PY
)
note "replies: $summary; stop took ${stop_s} s"
[ "$(json_get "$summary" 'd["missing"]')" = "[]" ] || fail "requests in flight got no reply at all: $summary"
[ "$(json_get "$summary" 'd["bad"]')" = "{}" ] || fail "requests in flight got other replies than ok/shutting_down: $summary"
[ "$(json_get "$summary" 'd["answered_after_stop"]')" -gt 0 ] \
    || fail "every reply came before the stop began, so nothing was in flight; make the batch bigger: $summary"
[ "$(prop Result)" = success ] || fail "the service ended with Result=$(prop Result), exit status $(prop ExecMainStatus)"
sigsys=$(journalctl -u "$UNIT" --no-pager | grep -E 'status=31/SYS|SIGSYS')
[ -z "$sigsys" ] || fail "SystemCallFilter= killed the daemon: $sigsys"
is_active && fail "the service is still active after systemctl stop"
pass "$(json_get "$summary" 'dict(d["counts"])'), $(json_get "$summary" 'd["answered_after_stop"]') answered after the stop began; stopped in ${stop_s} s"

# =============================================================================================
begin 10 upgrade
systemctl start "$UNIT" || fail "systemctl start failed"
embed_as app 10 3 "before the upgrade" >"$WORK/before-upgrade.json" || fail "embed before upgrade failed"
pid=$(main_pid)
snapshot() {   # the files we keep across an upgrade, with their checksums (state files: names only)
    { find "$MODELS" "$CATALOG" -type f -exec md5sum {} +
      find /var/lib/akidb-embed -path "$MODELS" -prune -o -type f -print; } | sort
}
keep=$(snapshot)
new_version=$(dpkg-deb -f "$UPGRADE_DEB" Version)
arch=$(dpkg --print-architecture)
(cd "$(dirname "$UPGRADE_DEB")" && apt install -y ./akidb-embed_"$new_version"_"$arch".deb) </dev/null >"$OUT/upgrade.log" 2>&1 \
    || fail "apt install of $new_version failed: $(tail -n 15 "$OUT/upgrade.log")"
[ "$(dpkg-query -W -f='${Version}' akidb-embed)" = "$new_version" ] || fail "akidb-embed is $(dpkg-query -W -f='${Version}' akidb-embed) after the upgrade, not $new_version"
wait_until 5 is_active || fail "the service is $(systemctl is-active "$UNIT") after the upgrade"
[ "$(main_pid)" != "$pid" ] || fail "the upgrade did not restart the service (MainPID still $pid)"
lost=$(comm -23 <(echo "$keep") <(snapshot))
[ -z "$lost" ] || fail "the upgrade lost or changed: $lost"
out=$(embed_as app 10 3 "after the upgrade") || fail "embed after upgrade failed: $out"
[ "$(json_get "$out" 'd["fingerprint"]')" = "$(json_get "$(cat "$WORK/before-upgrade.json")" 'd["fingerprint"]')" ] \
    || fail "the model's fingerprint changed across the upgrade"
pass "$new_version running (MainPID $pid -> $(main_pid)); models, catalog and state kept"

# =============================================================================================
begin 11 remove
apt-get remove -y akidb-embed </dev/null >"$OUT/remove.log" 2>&1 || fail "apt-get remove failed: $(tail -n 15 "$OUT/remove.log")"
[ "$(dpkg-query -W -f='${db:Status-Abbrev}' akidb-embed 2>/dev/null)" = "rc " ] \
    || fail "dpkg status after remove is '$(dpkg-query -W -f='${db:Status-Abbrev}' akidb-embed 2>&1)', expected 'rc' (config-files)"
left=$(pgrep -u akidb-embed -a)
[ -z "$left" ] || fail "processes of akidb-embed still run after remove: $left"
systemctl is-active --quiet "$UNIT" && fail "the service is still active after remove"
for gone in /lib/systemd/system/$UNIT /usr/lib/systemd/system/$UNIT /opt/venvs/akidb-embed /usr/bin/akidb-embed /run/akidb-embed; do
    [ ! -e "$gone" ] || fail "$gone is still there after remove"
done
for kept in /etc/akidb-embed/akidb-embed.toml "$CATALOG/$MODEL_ID.toml" "$MODELS/$MODEL_ID/model.onnx"; do
    [ -e "$kept" ] || fail "$kept is gone after remove (only purge may delete it)"
done
pass "stopped, unit and virtualenv gone; conffiles, catalog and models kept"

# =============================================================================================
begin 12 purge
apt-get purge -y akidb-embed python3-akidb-embed-client </dev/null >"$OUT/purge.log" 2>&1 \
    || fail "apt-get purge failed: $(tail -n 15 "$OUT/purge.log")"
for p in akidb-embed python3-akidb-embed-client; do
    st=$(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null)
    [ -z "$st" ] || [ "$st" = "un " ] || [ "$st" = "pn " ] || fail "$p is '$st' in dpkg after purge"
done
left=$(find /etc /var /opt /usr /run /srv /home /root -xdev -iname '*akidb*' 2>/dev/null | grep -v "^$WORK")
[ -z "$left" ] || fail "left behind after purge: $(echo $left)"
python3 -c 'import akidb_embed_client' 2>/dev/null && fail "akidb_embed_client still imports after purge"
getent passwd akidb-embed >/dev/null && note "the system user akidb-embed stays (Debian practice; README.Debian)"
pass "no file of ours left"

echo
echo "in_guest.sh: all $STEP steps passed"
