#!/bin/bash
# (The project's own copy of shared/tools/systemd-harness/make-root.sh, unchanged otherwise.)
# make-root.sh ROOTFS [EXTRA_PACKAGE...]
#
# Build a minimal bootable Debian rootfs (systemd as init) in directory ROOTFS,
# for boot-and-run.sh (systemd-nspawn --boot).  Needs root and access to a
# Debian archive mirror; installs debootstrap + systemd-container on the host
# with apt-get when they are missing.
#
# env: SUITE   (default bookworm)
#      MIRROR  (default: the first Debian archive URI in the host's own apt sources)
#      PACKAGES  replaces the default package list below (comma separated)
#
# About 50-110 s and ~210 MB on a 2-core bookworm machine.
set -euo pipefail

ROOTFS=${1:?usage: make-root.sh ROOTFS [EXTRA_PACKAGE...]}
shift
SUITE=${SUITE:-bookworm}
# the archive this machine's apt already uses (deb822 .sources or one-line sources.list)
host_mirror() {
    { grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}'
      grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list | awk '{print $2}'
    } | grep -v -- '-security' | head -n 1 || true
}
MIRROR=${MIRROR:-$(host_mirror)}
[ -n "$MIRROR" ] || { echo "make-root.sh: no Debian archive in the host's apt sources; set MIRROR" >&2; exit 2; }
# systemd-sysv: /sbin/init;  dbus: `systemctl`/busctl via the system bus;
# procps: /bin/kill (ExecReload=/bin/kill -HUP $MAINPID needs it!);
# python3/python3-venv: for Python daemons;  init-system-helpers: deb-systemd-helper/-invoke.
PACKAGES=${PACKAGES:-systemd,systemd-sysv,dbus,procps,init-system-helpers,python3,python3-venv,ca-certificates}
for p in "$@"; do PACKAGES="$PACKAGES,$p"; done

[ "$(id -u)" = 0 ] || { echo "make-root.sh: must run as root" >&2; exit 2; }
if [ -e "$ROOTFS/usr/lib/systemd/systemd" ]; then
    echo "make-root.sh: $ROOTFS already holds a systemd rootfs; remove it first" >&2
    exit 2
fi

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
secs() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.1f", (b-a)/1000}'; }
t0=$(now_ms)
need=()
command -v debootstrap    >/dev/null || need+=(debootstrap)
command -v systemd-nspawn >/dev/null || need+=(systemd-container)
if [ ${#need[@]} -gt 0 ]; then
    echo "make-root.sh: installing on the host: ${need[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
t1=$(now_ms)

mkdir -p "$ROOTFS"
log=$(mktemp /tmp/sysd-debootstrap.XXXXXX.log)
if ! debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOTFS" "$MIRROR" >"$log" 2>&1; then
    tail -30 "$log" >&2
    echo "make-root.sh: debootstrap failed (full log: $log)" >&2
    exit 1
fi
rm -f "$log"
t2=$(now_ms)

# ---- configuration for a quiet, deterministic test guest ----
echo sysd-guest > "$ROOTFS/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tsysd-guest\n::1\tlocalhost ip6-localhost ip6-loopback\n' > "$ROOTFS/etc/hosts"
# the guest uses the same archives as the host
rm -f "$ROOTFS/etc/apt/sources.list"
mkdir -p "$ROOTFS/etc/apt/sources.list.d"
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] && cp "$f" "$ROOTFS$f"
done
# root without password: lets `systemd-nspawn -b -D ROOTFS` (interactive) log in on the console
chroot "$ROOTFS" passwd -d root >/dev/null
# nothing should run apt or fs scrubs behind a test's back
for u in apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer e2scrub_reap.service; do
    ln -sf /dev/null "$ROOTFS/etc/systemd/system/$u"
done
# keep the journal in memory (faster, and nothing accumulates in ROOTFS)
mkdir -p "$ROOTFS/etc/systemd/journald.conf.d"
printf '[Journal]\nStorage=volatile\n' > "$ROOTFS/etc/systemd/journald.conf.d/sysd-harness.conf"
chroot "$ROOTFS" apt-get clean
rm -rf "$ROOTFS"/var/lib/apt/lists/*_Packages "$ROOTFS"/var/cache/apt/*.bin
{
    echo "built=$(date -u +%FT%TZ) suite=$SUITE mirror=$MIRROR"
    echo "packages=$PACKAGES"
    chroot "$ROOTFS" dpkg-query -W -f='${Package}=${Version}\n' systemd python3 2>/dev/null
} > "$ROOTFS/etc/sysd-harness-rootfs"
t3=$(now_ms)

size=$(du -sh "$ROOTFS" | cut -f1)
echo "make-root.sh: $ROOTFS ready: host tools $(secs $t0 $t1)s, debootstrap $(secs $t1 $t2)s," \
     "config $(secs $t2 $t3)s, total $(secs $t0 $t3)s, size $size" >&2
