"""The .deb under a real systemd: install, serve, tenants, reload, watchdog, stop, upgrade, remove, purge.

Scenario (one guest boot; each step below is reported as its own test):
 1. the packages are built (scripts/build-deb.sh, or ./dist reused when its inputs did not
    change), a Debian 12 rootfs is made once and cached (/var/tmp/akidb-rootfs/<hash>), and
    all-MiniLM-L6-v2 is converted on the host (the session's ``minilm_catalog``), all at once;
 2. a second .deb, version 0.1.0-2, is repacked from the first for the upgrade step;
 3. the guest boots (systemd-nspawn, no network) and tests/system/in_guest.sh walks the
    package through install, verify, measure, hot-load, clients, tenants, reload, watchdog,
    stop, upgrade, remove and purge; its results.jsonl gives each step's outcome.

Opt-in: set AKIDB_SYSTEM_TESTS=1 (needs root, PyPI for the build, and a Debian mirror for the
rootfs). Artefacts of the last run (console.log, journal.txt, results.jsonl, bench.txt, the
guest's output) are kept in build/system-test/.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DIST = REPO / "dist"
OUT = REPO / "build" / "system-test"
ROOTFS_CACHE = Path(os.environ.get("AKIDB_ROOTFS_CACHE", "/var/tmp/akidb-rootfs"))
# python3-cffi-backend: debootstrap does not resolve the virtual packages python3-zmq needs
ROOTFS_PACKAGES = ["adduser", "python3-zmq", "python3-cffi-backend", "python3-msgpack", "python3-numpy"]
UPGRADE_VERSION = "0.1.0-2"
BENCH_SECONDS = os.environ.get("AKIDB_BENCH_SECONDS", "10")
GUEST_TIMEOUT = 900
# the guest's steps, as in_guest.sh numbers them
STEPS = [
    (1, "install"), (2, "verify"), (3, "measure"), (4, "hot-load"), (5, "clients"), (6, "tenants"),
    (7, "reload"), (8, "watchdog"), (9, "stop"), (10, "upgrade"), (11, "remove"), (12, "purge"),
]
# files whose content goes into the .deb: a change to any of them means ./dist is stale
DEB_INPUT_EXCLUDE = ("tests/", "docs/", ".ci/", "scripts/dev.sh", "scripts/test.sh", "scripts/bench", "scripts/setup.sh")

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(
        os.environ.get("AKIDB_SYSTEM_TESTS") != "1",
        reason="system test of the .deb under systemd: set AKIDB_SYSTEM_TESTS=1 to run it (root; 3-4 min, most of it the .deb build)",
    ),
]


class Progress:
    """Progress lines on the terminal even while pytest captures output."""

    def __init__(self, config: pytest.Config) -> None:
        self.reporter = config.pluginmanager.getplugin("terminalreporter")
        self.capture = config.pluginmanager.getplugin("capturemanager")
        self.start = time.monotonic()

    def __call__(self, message: str) -> None:
        line = f"[system {time.monotonic() - self.start:5.0f}s] {message}"
        if self.reporter is None or self.capture is None:
            print(line, file=sys.stderr, flush=True)
            return
        with self.capture.global_and_fixture_disabled():
            self.reporter.write_line(line)
            self.reporter.flush()


def run(cmd: list[str], what: str, **kwargs: Any) -> subprocess.CompletedProcess:
    """Run a command; on failure, fail the test with its output's tail."""
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False, **kwargs)
    if done.returncode != 0:
        pytest.fail(f"{what} failed (exit {done.returncode}): {' '.join(cmd)}\n{_tail(done.stdout, 40)}")
    return done


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


# ---- inputs: the packages, the rootfs, the model ----------------------------------------------

def deb_inputs_hash() -> str | None:
    """A hash of every file that goes into the .deb (git's view of the working tree), or None."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO, check=True, stdout=subprocess.PIPE,
        ).stdout.split(b"\0")
    except (OSError, subprocess.CalledProcessError):
        return None
    digest = hashlib.sha256()
    for name in sorted(n.decode() for n in listed if n):
        path = REPO / name
        if name.startswith(DEB_INPUT_EXCLUDE) or not path.is_file():
            continue
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def debian_version() -> str:
    return run(["dpkg-parsechangelog", "-S", "Version"], "reading debian/changelog", cwd=REPO).stdout.strip()


def expected_debs(version: str) -> tuple[Path, Path]:
    arch = run(["dpkg", "--print-architecture"], "dpkg --print-architecture").stdout.strip()
    return DIST / f"akidb-embed_{version}_{arch}.deb", DIST / f"python3-akidb-embed-client_{version}_all.deb"


def rootfs_dir() -> Path:
    """The cached rootfs for this make-root.sh and package list."""
    key = hashlib.sha256((HERE / "make-root.sh").read_bytes() + " ".join(ROOTFS_PACKAGES).encode()).hexdigest()[:16]
    return ROOTFS_CACHE / key


def start_rootfs(progress: Progress) -> tuple[subprocess.Popen | None, Path, Path]:
    """Start make-root.sh in the background unless the cached rootfs exists; (process, tmp, final)."""
    final = rootfs_dir()
    if (final / "etc" / "sysd-harness-rootfs").is_file():
        progress(f"rootfs: cached {final}")
        return None, final, final
    ROOTFS_CACHE.mkdir(parents=True, exist_ok=True)
    for stale in ROOTFS_CACHE.iterdir():  # other hashes: an older make-root.sh or package list
        if stale.is_dir() and stale != final:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = ROOTFS_CACHE / f".{final.name}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    progress(f"rootfs: making {final} (about 1 min)")
    with open(OUT / "make-root.log", "w") as log:  # the child keeps its own descriptor
        process = subprocess.Popen(
            [str(HERE / "make-root.sh"), str(tmp), *ROOTFS_PACKAGES], stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return process, tmp, final


def finish_rootfs(job: tuple[subprocess.Popen | None, Path, Path], progress: Progress) -> Path:
    process, tmp, final = job
    if process is None:
        return final
    if process.wait() != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        pytest.fail(f"make-root.sh failed:\n{_tail((OUT / 'make-root.log').read_text(), 30)}")
    promote(tmp, final)
    progress(f"rootfs: ready ({_tail((OUT / 'make-root.log').read_text(), 1)})")
    return final


def promote(tmp: Path, final: Path) -> None:
    """Move a finished rootfs into the cache (unless another run put one there meanwhile)."""
    if not tmp.is_dir():
        return
    if (final / "etc" / "sysd-harness-rootfs").is_file():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)


def start_build(progress: Progress) -> tuple[subprocess.Popen | None, str | None]:
    """Start scripts/build-deb.sh in the background unless ./dist holds packages of these inputs."""
    inputs = deb_inputs_hash()
    stamp = DIST / ".system-test-inputs"
    deb, client = expected_debs(debian_version())
    if inputs and deb.is_file() and client.is_file() and stamp.is_file() and stamp.read_text().strip() == inputs:
        progress(f"packages: reusing {deb.name} and {client.name} (inputs unchanged)")
        return None, inputs
    progress("packages: scripts/build-deb.sh (2-4 min)")
    with open(OUT / "build-deb.log", "w") as log:
        process = subprocess.Popen(
            [str(REPO / "scripts" / "build-deb.sh")], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return process, inputs


def finish_build(job: tuple[subprocess.Popen | None, str | None], progress: Progress) -> tuple[Path, Path]:
    process, inputs = job
    if process is not None:
        if process.wait() != 0:
            pytest.fail(f"scripts/build-deb.sh failed:\n{_tail((OUT / 'build-deb.log').read_text(), 40)}")
        if inputs:
            (DIST / ".system-test-inputs").write_text(inputs + "\n")
        for line in (OUT / "build-deb.log").read_text().splitlines():
            if line.startswith("[build-deb") and ("] built " in line or "] lintian:" in line):
                progress(line)
    deb, client = expected_debs(debian_version())
    for path in (deb, client):
        if not path.is_file():
            pytest.fail(f"{path} was not built")
    return deb, client


def repack(deb: Path, version: str, into: Path) -> Path:
    """The same package with another version: what the upgrade step installs over the first."""
    tree = into / "tree"
    shutil.rmtree(tree, ignore_errors=True)
    run(["dpkg-deb", "-R", str(deb), str(tree)], "unpacking the .deb")
    control = tree / "DEBIAN" / "control"
    old = next(line for line in control.read_text().splitlines() if line.startswith("Version:"))
    control.write_text(control.read_text().replace(old, f"Version: {version}"))
    out = into / deb.name.replace(old.split()[1], version)
    run(["dpkg-deb", "--build", "-Zgzip", "-z1", str(tree), str(out)], "repacking the .deb")
    shutil.rmtree(tree)
    return out


def stage_model(catalog: Path, into: Path) -> Path:
    """The converted model's files and its manifest in one folder, as a user would carry them over."""
    manifest = catalog / "all-minilm-l6-v2.toml"
    model_line = next(line for line in manifest.read_text().splitlines() if line.startswith("model ="))
    source = Path(model_line.split("=", 1)[1].strip().strip('"')).parent
    into.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file():
            shutil.copy2(path, into / path.name)
    shutil.copy2(manifest, into / manifest.name)
    return into


def ensure_host_tools(progress: Progress) -> None:
    """debootstrap and systemd-nspawn before anything runs in parallel (one apt-get at a time)."""
    if shutil.which("debootstrap") and shutil.which("systemd-nspawn"):
        return
    progress("host: apt-get install debootstrap systemd-container")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(["apt-get", "update", "-qq"], "apt-get update", env=env)
    run(["apt-get", "install", "-y", "-qq", "debootstrap", "systemd-container"], "installing host tools", env=env)


# ---- the guest run ----------------------------------------------------------------------------

def prepare(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, progress: Progress) -> dict[str, Path]:
    """Packages, upgrade package, staged model and rootfs: the slow parts, side by side."""
    ensure_host_tools(progress)
    rootfs_job = start_rootfs(progress)
    build_job = start_build(progress)
    try:
        progress("model: converting all-MiniLM-L6-v2 on the host (session fixture)")
        catalog = request.getfixturevalue("minilm_catalog")
        work = tmp_path_factory.mktemp("system")
        model = stage_model(catalog, work / "model")
        deb, client = finish_build(build_job, progress)
        upgrade_dir = work / "upgrade"
        upgrade_dir.mkdir()
        upgrade = repack(deb, UPGRADE_VERSION, upgrade_dir)
        progress(f"packages: {deb.name}, {client.name}; upgrade {upgrade.name}")
        rootfs = finish_rootfs(rootfs_job, progress)
    finally:  # on a failure or an interrupt, end what still runs (each in its own process group)
        if rootfs_job[0] is not None and rootfs_job[0].poll() == 0:
            promote(*rootfs_job[1:])  # finished in time: cached for the next run
        for process in (rootfs_job[0], build_job[0]):
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
    return {"deb": deb, "client": client, "upgrade": upgrade, "upgrade_dir": upgrade_dir, "model": model, "rootfs": rootfs}


@pytest.fixture(scope="module")
def guest(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Build, boot, run in_guest.sh once; its per-step results, figures and log."""
    if os.geteuid() != 0:
        pytest.skip("the system test needs root (debootstrap, systemd-nspawn, apt-get)")
    progress = Progress(request.config)
    started = time.monotonic()
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    DIST.mkdir(exist_ok=True)
    try:
        parts = prepare(request, tmp_path_factory, progress)
    except pytest.fail.Exception as exc:  # reported once, by the first step, not by every test
        yield {"setup_error": str(exc), "rc": None, "steps": {}, "bench": {}, "log": []}
        return
    deb, client, upgrade, upgrade_dir = parts["deb"], parts["client"], parts["upgrade"], parts["upgrade_dir"]
    model, rootfs = parts["model"], parts["rootfs"]

    env = dict(
        os.environ,
        SYSD_OUT=str(OUT),
        SYSD_BIND=f"{DIST}:/akidb/deb {upgrade_dir}:/akidb/upgrade {model}:/akidb/model {HERE}:/akidb/tests",
        SYSD_ENV=f"AKIDB_BENCH_SECONDS={BENCH_SECONDS}",
        SYSD_PRIVATE_NETWORK="1",
        SYSD_RUN_TIMEOUT=str(GUEST_TIMEOUT),
    )
    args = [f"/akidb/deb/{deb.name}", f"/akidb/deb/{client.name}", f"/akidb/upgrade/{upgrade.name}", "/akidb/model"]
    progress(f"guest: booting {rootfs.name} and running in_guest.sh")
    lines: list[str] = []
    with subprocess.Popen(
        [str(HERE / "boot-and-run.sh"), str(rootfs), str(HERE / "in_guest.sh"), *args],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    ) as guest_run:
        assert guest_run.stdout is not None
        for line in guest_run.stdout:
            line = line.rstrip("\n")
            lines.append(line)
            if line.startswith(("===", "---", "!!!", "[sysd]", "in_guest.sh:")):
                progress(line)
        rc = guest_run.wait()
    (OUT / "guest.log").write_text("\n".join(lines) + "\n")

    steps: dict[int, dict[str, Any]] = {}
    results = OUT / "results.jsonl"
    if results.is_file():
        for line in results.read_text().splitlines():
            record = json.loads(line)
            steps[record["step"]] = record
    bench = {}
    if (OUT / "bench.txt").is_file():
        bench = dict(line.split("=", 1) for line in (OUT / "bench.txt").read_text().split() if "=" in line)
    if bench:
        progress(
            f"figures: READY {bench.get('ready_ms')} ms after systemctl start (exec->READY {bench.get('exec_to_ready_ms')} ms), "
            f"idle RSS {int(bench.get('idle_rss_kib', 0)) / 1024:.0f} MiB, idle CPU {bench.get('idle_cpu_pct')} % of a core "
            f"over {bench.get('idle_window_s')} s"
        )
    progress(f"done in {time.monotonic() - started:.0f} s (guest exit {rc}); artefacts in {OUT}")
    yield {"rc": rc, "steps": steps, "bench": bench, "log": lines}


def _journal_tail(lines: int = 40) -> str:
    journal = OUT / "journal.txt"
    if not journal.is_file():
        return "(no journal.txt)"
    ours = [line for line in journal.read_text(errors="replace").splitlines() if "akidb-embed" in line]
    return "\n".join(ours[-lines:])


@pytest.mark.parametrize("number,name", STEPS, ids=[f"{n:02d}-{name}" for n, name in STEPS])
def test_guest_step(guest: dict[str, Any], number: int, name: str) -> None:
    """Each step of in_guest.sh passed (a step after a failed one is skipped, not failed)."""
    if guest.get("setup_error"):
        if number == 1:
            pytest.fail(f"preparing the guest run failed: {guest['setup_error']}")
        pytest.skip("not reached: preparing the guest run failed (see step 1)")
    record = guest["steps"].get(number)
    failed = [r for r in guest["steps"].values() if not r["ok"]]
    if record is None:
        if failed:
            pytest.skip(f"not reached: step {failed[0]['step']} ({failed[0]['name']}) failed")
        pytest.fail(
            f"step {number} ({name}) never ran; the guest run ended with exit {guest['rc']} "
            f"(124: timed out, 125: boot or harness failure)\n{_tail(chr(10).join(guest['log']), 40)}\n"
            f"console and journal: {OUT}"
        )
    if not record["ok"]:
        pytest.fail(
            f"step {number} ({name}) failed after {record['seconds']} s: {record['message']}\n"
            f"---- guest output (tail)\n{_tail(chr(10).join(guest['log']), 30)}\n"
            f"---- akidb-embed in the journal (tail)\n{_journal_tail()}\n"
            f"full console.log, journal.txt and guest.log in {OUT}"
        )


def test_guest_figures(guest: dict[str, Any]) -> None:
    """The measurement step produced its figures: READY time, idle RSS and CPU."""
    if not guest["steps"].get(3, {}).get("ok"):
        pytest.skip("the measure step did not pass")
    bench = guest["bench"]
    for key in ("ready_ms", "exec_to_ready_ms", "idle_rss_kib", "idle_cpu_pct"):
        assert key in bench, f"bench.txt lacks {key}: {bench}"
    assert int(bench["models_loaded"]) == 0, f"a model was loaded during the idle measurement: {bench}"
