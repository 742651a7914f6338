#!/bin/bash
# (The project's own copy of shared/tools/systemd-harness/boot-and-run.sh, unchanged otherwise.)
# boot-and-run.sh ROOTFS SCRIPT [ARG...]
#
# Boot ROOTFS (made by make-root.sh) with a real systemd as PID 1 in a
# systemd-nspawn container, wait until it is up (`is-system-running`:
# running/degraded), run SCRIPT inside it as root (via nsenter), power the
# guest off, and exit with SCRIPT's exit status.  SCRIPT's stdout/stderr are
# passed through; harness messages go to stderr, prefixed "[sysd]".
#
# Inside the guest:  SCRIPT is /harness/in/script (its own copy), cwd and
#   $HARNESS_OUT are /harness/out (writable, = $SYSD_OUT on the host if set).
#
# env (all optional):
#   SYSD_BIND="HOST[:GUEST] ..."     extra read-only bind mounts (e.g. a dir of .debs)
#   SYSD_BIND_RW="HOST[:GUEST] ..."  extra read-write bind mounts
#   SYSD_OUT=DIR        host dir bound at /harness/out; also receives console.log
#                       (guest console) and journal.txt (journalctl -b) afterwards
#   SYSD_ENV="K=V ..."  extra environment for SCRIPT
#   SYSD_PERSIST=1      write changes into ROOTFS (default: --volatile=overlay, i.e.
#                       every run starts from the pristine ROOTFS; changes go to tmpfs)
#   SYSD_PRIVATE_NETWORK=1  give the guest its own (empty) network namespace
#                       (default: host network, so apt-get works inside)
#   SYSD_CGROUP=unified|auto  cgroup layout the guest sees (default unified =
#                       pure cgroup v2, as on a stock Debian 12 host; "auto" lets nspawn
#                       mirror the host: hybrid v1+v2 on some hosts, which taints the
#                       guest's systemd with "cgroupsv1")
#   SYSD_BOOT_TIMEOUT=60  SYSD_RUN_TIMEOUT=1800  (seconds)
#
# exit status: SCRIPT's; 124 if SCRIPT ran past SYSD_RUN_TIMEOUT;
#              125 if the harness itself failed (no boot, bad arguments, ...).
set -uo pipefail

say() { echo "[sysd] $*" >&2; }
usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 125; }

[ $# -ge 2 ] || usage
ROOTFS=$(readlink -f "$1"); SCRIPT=$2; shift 2
[ "$(id -u)" = 0 ] || { say "must run as root"; exit 125; }
[ -f "$SCRIPT" ] || { say "no such script: $SCRIPT"; exit 125; }
[ -x "$ROOTFS/usr/lib/systemd/systemd" ] || { say "$ROOTFS has no /usr/lib/systemd/systemd (make-root.sh?)"; exit 125; }
command -v systemd-nspawn >/dev/null || { say "systemd-nspawn missing: apt-get install systemd-container"; exit 125; }

BOOT_TIMEOUT=${SYSD_BOOT_TIMEOUT:-60}
RUN_TIMEOUT=${SYSD_RUN_TIMEOUT:-1800}
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
secs() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", (b-a)/1000}'; }
t_start=$(now_ms)

name=sysd-$$
work=$(mktemp -d /tmp/sysd-run.XXXXXX)
mkdir -p "$work/in"
install -m 0755 "$SCRIPT" "$work/in/script"
out=${SYSD_OUT:-$work/out}
mkdir -p "$out"; out=$(readlink -f "$out")
nspawn_pid= leader= cgdirs=()

cleanup() {
    if [ -n "$nspawn_pid" ] && kill -0 "$nspawn_pid" 2>/dev/null; then
        kill -TERM "$nspawn_pid" 2>/dev/null            # nspawn -> SIGRTMIN+3 -> guest halts
        for _ in $(seq 1 100); do kill -0 "$nspawn_pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$nspawn_pid" 2>/dev/null; then
            say "guest did not halt in 10 s; SIGKILL to nspawn $nspawn_pid and guest init $leader"
            [ -n "$leader" ] && kill -KILL "$leader" 2>/dev/null   # kills the whole guest pid namespace
            kill -KILL "$nspawn_pid" 2>/dev/null
        fi
    fi
    [ -n "$nspawn_pid" ] && wait "$nspawn_pid" 2>/dev/null
    local d
    for d in "${cgdirs[@]}"; do                       # our per-run cgroups (+ nspawn's payload/supervisor)
        [ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null
    done
    rm -rf "/run/systemd/nspawn/propagate/$name" 2>/dev/null   # nspawn refuses to rm_rf it when /run is not tmpfs
    rm -rf "$work"
}
trap 'say "interrupted: tearing the guest down"; cleanup; exit 125' INT TERM HUP
{ exec 3<&0; } 2>/dev/null || exec 3</dev/null   # SCRIPT's stdin (a background job would otherwise get /dev/null)

# ---- cgroups -------------------------------------------------------------
# On a host whose PID 1 is systemd, nspawn puts the guest into its own scope.
# Where PID 1 is not systemd, so we use --register=no --keep-unit and must give
# each run its own cgroup, or nspawn would put every guest into <our cgroup>/payload.
host_systemd=0
[ -d /run/systemd/system ] && [ "$(cat /proc/1/comm)" = systemd ] && host_systemd=1
if [ $host_systemd = 0 ]; then
    v2mnt=$(awk '$3=="cgroup2"{print $2; exit}' /proc/self/mounts)
    v1mnt=$(awk '$3=="cgroup" && $4 ~ /(^|,)name=systemd(,|$)/ {print $2; exit}' /proc/self/mounts)
    if [ -n "$v2mnt" ]; then
        p=$(sed -n 's/^0:://p' /proc/self/cgroup); cgdirs+=("$v2mnt${p%/}/sysd-harness-$$")
    fi
    if [ -n "$v1mnt" ]; then
        p=$(sed -n 's/^[0-9]*:name=systemd://p' /proc/self/cgroup); cgdirs+=("$v1mnt${p%/}/sysd-harness-$$")
    fi
    for d in "${cgdirs[@]}"; do mkdir -p "$d" || { say "cannot create cgroup $d"; cleanup; exit 125; }; done
fi

# ---- boot ------------------------------------------------------------------
args=(--boot --directory="$ROOTFS" --machine="$name" --console=read-only
      --bind-ro="$work/in:/harness/in" --bind="$out:/harness/out")
[ $host_systemd = 0 ] && args+=(--register=no --keep-unit)
[ "${SYSD_PERSIST:-0}" = 1 ] || args+=(--volatile=overlay)
[ "${SYSD_PRIVATE_NETWORK:-0}" = 1 ] && args+=(--private-network)
for b in ${SYSD_BIND:-};    do args+=(--bind-ro="$b"); done
for b in ${SYSD_BIND_RW:-}; do args+=(--bind="$b"); done

case "${SYSD_CGROUP:-unified}" in
    unified) export SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 ;;
    auto)    unset SYSTEMD_NSPAWN_UNIFIED_HIERARCHY UNIFIED_CGROUP_HIERARCHY ;;
    *) say "SYSD_CGROUP must be unified or auto"; cleanup; exit 125 ;;
esac
(
    for d in "${cgdirs[@]}"; do echo "$BASHPID" > "$d/cgroup.procs" || exit 125; done
    exec systemd-nspawn "${args[@]}"
) </dev/null >"$work/console.log" 2>&1 &
nspawn_pid=$!

host_pidns=$(readlink /proc/self/ns/pid)
deadline=$(( $(now_ms) + BOOT_TIMEOUT * 1000 ))
boot_fail() {
    say "boot failed: $*"; say "---- guest console (tail) ----"
    tail -40 "$work/console.log" | sed 's/\x1b\[[0-9;]*m//g' >&2
    cp "$work/console.log" "$out/console.log" 2>/dev/null
    cleanup; exit 125
}
while [ -z "$leader" ]; do                       # the guest's PID 1, as seen from the host
    kill -0 "$nspawn_pid" 2>/dev/null || boot_fail "systemd-nspawn exited early"
    for c in $(cat /proc/"$nspawn_pid"/task/*/children 2>/dev/null); do
        [ "$(readlink /proc/"$c"/ns/pid 2>/dev/null)" != "$host_pidns" ] || continue
        case "$(cat /proc/"$c"/comm 2>/dev/null)" in systemd|init) leader=$c ;; esac
    done
    [ "$(now_ms)" -lt "$deadline" ] || boot_fail "no guest init after ${BOOT_TIMEOUT}s"
    [ -n "$leader" ] || sleep 0.05
done

guest_env=(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
           LANG=C.UTF-8 TERM=dumb SYSTEMD_COLORS=0 SYSTEMD_PAGER=cat
           HARNESS_OUT=/harness/out HARNESS_IN=/harness/in)
for e in ${SYSD_ENV:-}; do guest_env+=("$e"); done
in_guest() { nsenter --target "$leader" --all env -i "${guest_env[@]}" "$@"; }

state=
while :; do
    state=$(in_guest timeout 10 systemctl is-system-running --wait 2>/dev/null)
    case "$state" in running|degraded) break ;; esac
    kill -0 "$nspawn_pid" 2>/dev/null || boot_fail "systemd-nspawn exited during boot"
    [ "$(now_ms)" -lt "$deadline" ] || boot_fail "guest not up after ${BOOT_TIMEOUT}s (state: ${state:-?})"
    sleep 0.1
done
t_booted=$(now_ms)
say "guest $name booted: $state in $(secs "$t_start" "$t_booted")s (nspawn pid $nspawn_pid, guest init pid $leader)"
if [ "$state" = degraded ]; then
    say "degraded, failed units:"; in_guest systemctl --failed --no-legend >&2
fi

# ---- run -------------------------------------------------------------------
# run in the background + wait, so that a SIGTERM/SIGINT to the harness is acted on at once
# (the trap tears the guest down, which kills everything in its pid namespace)
in_guest timeout --kill-after=10 "$RUN_TIMEOUT" /bin/sh -c 'cd /harness/out && exec /harness/in/script "$@"' script "$@" <&3 &
wait $!
rc=$?
t_ran=$(now_ms)
[ $rc = 124 ] && say "script timed out after ${RUN_TIMEOUT}s"
in_guest journalctl -b --no-pager -o short-precise > "$out/journal.txt" 2>&1 || true

# ---- power off ---------------------------------------------------------------
in_guest systemctl poweroff --no-block >/dev/null 2>&1 || kill -TERM "$nspawn_pid"
for _ in $(seq 1 300); do kill -0 "$nspawn_pid" 2>/dev/null || break; sleep 0.1; done
kill -0 "$nspawn_pid" 2>/dev/null && say "guest still up 30s after poweroff; forcing"
cp "$work/console.log" "$out/console.log" 2>/dev/null
[ -n "${SYSD_OUT:-}" ] || rm -f "$out/journal.txt" "$out/console.log"
cleanup
t_end=$(now_ms)
say "script exit $rc; boot $(secs "$t_start" "$t_booted")s, script $(secs "$t_booted" "$t_ran")s, shutdown $(secs "$t_ran" "$t_end")s, total $(secs "$t_start" "$t_end")s"
exit $rc
