#!/bin/bash
# bench_service.sh [SECONDS] — run as root on a machine (or guest) where the akidb-embed
# package is installed. Measures, for the benchmark note:
#   ready_ms         wall time of `systemctl start akidb-embed` (Type=notify: it returns at READY=1)
#   exec_to_ready_ms from the daemon's exec to READY=1, as systemd recorded them
#   idle_rss_kib     the daemon's VmRSS once started, no model loaded (none is warm or pinned)
#   idle_cpu_pct     the daemon's CPU (utime+stime of all its threads, /proc/PID/stat) over
#                    SECONDS (default 60) of idleness, as a percentage of one core
# Restarts the service (stop, then a timed start). Prints "key=value" lines on stdout and, if
# $HARNESS_OUT is set, also writes them to $HARNESS_OUT/bench.txt.
set -euo pipefail
WINDOW=${1:-60}
UNIT=akidb-embed.service
SETTLE=2   # seconds after READY before sampling: warm start and the first memory check run

now_ns() { date +%s%N; }
mono_us() { systemctl show -P "$1" "$UNIT"; }
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }   # utime + stime, in clock ticks

systemctl stop "$UNIT"
t0=$(now_ns)
systemctl start "$UNIT"
t1=$(now_ns)
ready_ms=$(( (t1 - t0) / 1000000 ))
exec_to_ready_ms=$(( ($(mono_us ActiveEnterTimestampMonotonic) - $(mono_us ExecMainStartTimestampMonotonic)) / 1000 ))
pid=$(systemctl show -P MainPID "$UNIT")
[ "$pid" -gt 0 ] || { echo "bench_service: $UNIT has no main process after start" >&2; exit 1; }

sleep "$SETTLE"
loaded=$(/usr/bin/akidb-embed models --json 2>/dev/null | python3 -c \
    'import json,sys; print(sum(m.get("state") in ("ready", "loading") for m in json.load(sys.stdin)))' || echo "?")
rss_kib=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status")
hz=$(getconf CLK_TCK)
c0=$(ticks "$pid"); w0=$(now_ns)
sleep "$WINDOW"
c1=$(ticks "$pid"); w1=$(now_ns)
[ "$(systemctl show -P MainPID "$UNIT")" = "$pid" ] || { echo "bench_service: the daemon restarted during the window" >&2; exit 1; }
cpu_pct=$(awk -v c=$((c1 - c0)) -v hz="$hz" -v ns=$((w1 - w0)) 'BEGIN {printf "%.3f", 100 * (c / hz) / (ns / 1e9)}')
threads=$(awk '/^Threads:/ {print $2}' "/proc/$pid/status")

{
    echo "ready_ms=$ready_ms"
    echo "exec_to_ready_ms=$exec_to_ready_ms"
    echo "idle_rss_kib=$rss_kib"
    echo "idle_cpu_pct=$cpu_pct"
    echo "idle_cpu_ticks=$((c1 - c0))"
    echo "idle_window_s=$WINDOW"
    echo "threads=$threads"
    echo "models_loaded=$loaded"
    echo "cpus=$(nproc)"
} | tee ${HARNESS_OUT:+"$HARNESS_OUT/bench.txt"}
