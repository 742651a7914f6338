"""docs/operating.md, checked mechanically: each command of its ``sh`` blocks is run, here or by the system test.

1. The guide's ```sh blocks are split into commands (``\\`` continuations joined, comments dropped). Blocks fenced
   ```sh jetson need a Jetson and are skipped by that marker; each starts with the comment saying so.
2. A command of ``SYSTEMD_TOOLS`` (systemctl, journalctl, apt, dpkg...) must be run by tests/system/in_guest.sh: its
   words in order on one line of the script, whose constant variables are expanded (``$UNIT``...); a placeholder
   (``<model>``) matches any word; quotes, ``.service`` and a leading ``sudo`` are ignored.
3. Every other command runs here with bash, in the guide's order, against a real daemon serving the tiny models:
   ``akidb-embed`` is this checkout's CLI, the package's paths map to the daemon's temporary folders, and ``<model>``
   is the model the guide's own ``convert`` line makes from a tiny BERT. Each must exit 0 and meet its ``EXPECT``.
4. Every ```toml block loads as a config (```toml manifest: manifest fields only), every wire error code has its
   row in the troubleshooting table, and every metric the guide names is in the daemon's metrics textfile.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import hfmodels
import pytest
from daemon_process import REPO, Daemon, run_daemon

from akidb_embed.manifest import Manifest
from akidb_embed.settings import SettingsError, load_settings
from akidb_embed_client.errors import ERROR_CLASSES

GUIDE = REPO / "docs" / "operating.md"
IN_GUEST = REPO / "tests" / "system" / "in_guest.sh"
FENCE = re.compile(r"^```(\w*)[ \t]*(\S*)[ \t]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
COMMENT = re.compile(r"\s+#\s.*$")
PLACEHOLDER = re.compile(r"<[a-z]+>")
SYSTEMD_TOOLS = {"systemctl", "journalctl", "apt", "apt-get", "dpkg", "dpkg-query", "adduser", "groupadd"}
JETSON_NOTE = "# Jetson only: not run in CI\n"  # what a reader sees of the marker
MODEL = "guide-bert"  # what the guide's convert line calls <model> here
COMMAND_SECONDS = 120  # the slowest command, convert of the tiny BERT, takes about 15 s

# What each locally run command must print (a regex, <model> substituted) or leave behind (a check of the folders).
Check = Callable[["Setting"], bool]
EXPECT: dict[str, str | Check] = {
    "akidb-embed convert <source> --id <model> --out <model>": r"parity \(fp32, 24 sentences\): min cosine 1\.0",
    "cp -r <model> /var/lib/akidb-embed/models/": lambda s: (s.models / MODEL / "model.onnx").is_file(),
    "chmod -R a+rX /var/lib/akidb-embed/models/<model>": lambda s: (s.models / MODEL / "golden.npz").stat().st_mode & 0o4,
    "sed -i -E 's#^(model|tokenizer|file) = \"#&/var/lib/akidb-embed/models/<model>/#' "
    "/var/lib/akidb-embed/models/<model>/<model>.toml":
        lambda s: f'model = "{s.models / MODEL / "model.onnx"}"' in (s.models / MODEL / f"{MODEL}.toml").read_text(),
    "cp /var/lib/akidb-embed/models/<model>/<model>.toml /etc/akidb-embed/models.d/.<model>.toml.new":
        lambda s: (s.daemon.catalog / f".{MODEL}.toml.new").is_file(),
    "mv /etc/akidb-embed/models.d/.<model>.toml.new /etc/akidb-embed/models.d/<model>.toml":
        lambda s: (s.daemon.catalog / f"{MODEL}.toml").is_file(),
    "akidb-embed models": r"<model>\s+(available|ready)\s",  # the watcher lists it within a second: retried
    'akidb-embed embed --model <model> "a first sentence"': r"a first sentence\s+<model>\s+32\s",
    "akidb-embed load <model> --timeout 1800": r"<model>: ready",
    "akidb-embed models --wide": r"weights/work/peak[\s\S]*<model>\s+ready\s+yes\s",  # verified by its golden vectors
    "akidb-embed pin <model>": r"<model>: ready, pinned",
    "akidb-embed unpin <model>": r"<model>: ready, not pinned",
    "akidb-embed load <model> --keep-alive 10m": r"keep-alive 600s",
    "akidb-embed unload <model>": r"<model>: available",
    "akidb-embed status": r"budget\.loaded_memory_mb",
    "akidb-embed top --once": r"model\s+state\s+memory\s+qps[\s\S]*<model>",
    "grep akidb_embed_requests_total /var/lib/akidb-embed/metrics/akidb-embed.prom":
        r'akidb_embed_requests_total\{code="ok",model="<model>"\} [1-9]',
    "curl -s http://127.0.0.1:9464/metrics": r"(?m)^akidb_embed_info\{version=",
}
RETRIED = {"akidb-embed models"}  # read-only, and racing the catalog watcher


@dataclasses.dataclass
class Setting:
    """The daemon the local commands reach, and what the package's paths and the placeholders stand for here."""

    daemon: Daemon
    workdir: Path  # the operator's working folder: where convert writes
    state: Path
    source: Path  # <source>: the tiny BERT's folder
    port: int  # the metrics HTTP port instead of 9464, which another test may hold

    @property
    def models(self) -> Path:
        return self.state / "models"

    def local(self, command: str) -> str:
        """The command as run here: placeholders filled in, the package's paths and port mapped."""
        mapping = {"/var/lib/akidb-embed": str(self.state), "/etc/akidb-embed/models.d": str(self.daemon.catalog),
                   "127.0.0.1:9464": f"127.0.0.1:{self.port}", "<model>": MODEL, "<source>": str(self.source)}
        for old, new in mapping.items():
            command = command.replace(old, new)
        return command


def guide_blocks(language: str) -> list[tuple[str, str]]:
    """(marker, text) of each fenced block of ``language`` in the guide, in order."""
    return [(marker, body) for lang, marker, body in FENCE.findall(GUIDE.read_text()) if lang == language]


def commands(body: str) -> list[str]:
    """The command lines of a shell block: continuations joined, comments and a leading sudo dropped."""
    joined = re.sub(r"\\\n\s*", " ", body)
    lines = (COMMENT.sub("", line).strip() for line in joined.splitlines())
    return [line.removeprefix("sudo ") for line in lines if line and not line.startswith("#")]


def guide_commands() -> tuple[list[str], list[str]]:
    """The guide's commands that need systemd, and those that run here; Jetson-only blocks left out."""
    systemd, local = [], []
    for marker, body in guide_blocks("sh"):
        if marker == "jetson":
            assert body.startswith(JETSON_NOTE), f"a ```sh jetson block that does not start with {JETSON_NOTE!r}"
            continue
        assert marker == "", f"a ```sh block marked {marker!r}: only ```sh jetson is known"
        for command in commands(body):
            (systemd if command.split()[0] in SYSTEMD_TOOLS else local).append(command)
    return systemd, local


def words(line: str) -> list[str]:
    """A shell line's words for matching: quotes, a unit's .service and command substitution marks ignored."""
    line = re.sub(r"[\"']", "", line).replace("akidb-embed.service", "akidb-embed")
    return [word for word in re.split(r"\s+|\$\(|[()|;]|&&|<<<", line) if word]


def script_lines() -> list[list[str]]:
    """in_guest.sh's lines as words, its constant variables (UNIT=akidb-embed.service...) expanded."""
    text = IN_GUEST.read_text()
    constants = dict(re.findall(r"^([A-Z_]+)=([^\s$\"'`]+)", text, re.MULTILINE))
    for name, value in constants.items():
        text = re.sub(r"\$\{?" + name + r"\}?(?![A-Za-z0-9_])", value, text)
    return [words(line) for line in text.splitlines()]


def run_in(lines: list[list[str]], command: str) -> bool:
    """Whether one line holds the command's words in order (a placeholder matching any word)."""
    patterns = [re.compile(PLACEHOLDER.sub(r"\\S+", re.escape(word))) for word in words(command)]
    for line in lines:
        remaining = iter(line)
        if all(any(p.fullmatch(word) for word in remaining) for p in patterns):
            return True
    return False


def test_commands_needing_systemd_are_run_by_the_system_test() -> None:
    """1. every systemd/apt/dpkg command of the guide  2. each is found, words in order, on a line of in_guest.sh."""
    systemd, _ = guide_commands()
    assert len(systemd) >= 5, f"the guide's systemd commands were not found: {systemd}"
    lines = script_lines()
    missing = [command for command in systemd if not run_in(lines, command)]
    assert not missing, f"guide commands the system test does not run (add them to {IN_GUEST.name}): {missing}"


def test_the_matching_tells_a_run_command_from_another() -> None:
    """The matcher itself: a placeholder matches a word, but words must all be there and in order."""
    lines = [words('apt install -y ./akidb-embed_"$v"_"$arch".deb </dev/null'), words("systemctl status akidb-embed")]
    assert run_in(lines, "apt install ./akidb-embed_<version>_<arch>.deb")
    assert not run_in(lines, "apt remove ./akidb-embed_<version>_<arch>.deb")
    assert not run_in(lines, "systemctl akidb-embed status")


def test_config_fragments_are_real_settings(tmp_path: Path) -> None:
    """1. each ```toml block loads as a daemon config (unknown keys and bad values are refused)  2. a ```toml
    manifest block names only manifest fields."""
    blocks = guide_blocks("toml")
    assert blocks, "the guide has no toml blocks"
    fields = {f.name for f in dataclasses.fields(Manifest)}
    for number, (marker, body) in enumerate(blocks):
        if marker == "manifest":
            keys = set(re.findall(r"^([a-z_]+)\s*=", body, re.MULTILINE))
            assert keys and keys <= fields, f"manifest keys the daemon does not know: {keys - fields}"
            continue
        config = tmp_path / f"fragment-{number}.toml"
        config.write_text(body)
        try:
            load_settings(config)
        except SettingsError as exc:
            pytest.fail(f"the guide's config block {number} is refused: {exc}\n{body}")


def test_every_error_code_has_its_row() -> None:
    """The troubleshooting table covers the whole closed set of wire codes."""
    text = GUIDE.read_text()
    missing = [code for code in ERROR_CLASSES if f"\n| `{code}` |" not in text]
    assert not missing, f"error codes without a row in the guide's troubleshooting table: {missing}"


@pytest.fixture
def setting(catalog: Path, tmp_path: Path) -> Iterator[Setting]:
    """A daemon on the tiny catalog with the metrics textfile and HTTP endpoint on, and a tiny BERT to convert."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    source = hfmodels.build_bert(tmp_path / "bert-source")
    workdir = tmp_path / "work"
    workdir.mkdir()
    with run_daemon(catalog, metrics={"interval_seconds": 0.2, "http": f"127.0.0.1:{port}"}) as daemon:
        state = daemon.socket.parent / "state"
        (state / "models").mkdir(parents=True)  # as the package's postinst makes it
        yield Setting(daemon, workdir, state, source, port)


def test_local_commands_run_against_a_real_daemon(setting: Setting, tmp_path: Path) -> None:
    """1. the guide's commands that need no systemd, in its order: convert a tiny BERT, copy it in, serve it, pin,
    load, unload, status, top, metrics  2. each exits 0 and prints (or leaves) what EXPECT says  3. the metrics
    the guide names are all in the textfile the daemon wrote."""
    _, local = guide_commands()
    unknown = sorted({command for command in local if command not in EXPECT})
    assert not unknown, f"guide commands this test neither runs nor expects anything of (add to EXPECT): {unknown}"
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "akidb-embed").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m akidb_embed "$@"\n')
    (shim / "akidb-embed").chmod(0o755)
    path = os.pathsep.join([str(REPO / "daemon"), str(REPO / "client"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PATH": f"{shim}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": path,
           "AKIDB_EMBED_SOCKET": str(setting.daemon.socket)}
    for command in local:
        _run(setting, command, env)
    textfile = (setting.state / "metrics" / "akidb-embed.prom").read_text()
    named = set(re.findall(r"akidb_embed_[a-z_]+", GUIDE.read_text()))
    assert named and not {name for name in named if name not in textfile}, (
        f"metrics the guide names that the daemon does not write: {sorted(n for n in named if n not in textfile)}")


def _run(setting: Setting, command: str, env: dict[str, str]) -> None:
    """Run one guide command with bash; retried for a few seconds if it is read-only and racing the watcher."""
    expected = EXPECT[command]
    for attempt in range(25 if command in RETRIED else 1):
        done = subprocess.run(["bash", "-o", "pipefail", "-c", setting.local(command)], cwd=setting.workdir, env=env,
                              capture_output=True, text=True, timeout=COMMAND_SECONDS)
        output = done.stdout + done.stderr
        if isinstance(expected, str):
            met = re.search(expected.replace("<model>", re.escape(MODEL)), output) is not None
        else:
            met = bool(expected(setting))
        if done.returncode == 0 and met:
            return
        if attempt + 1 < 25 and command in RETRIED:
            time.sleep(0.2)
    pytest.fail(f"guide command {command!r} (run as {setting.local(command)!r}) exited {done.returncode}, "
                f"expectation met: {met}:\n{output[-3000:]}\ndaemon log:\n{setting.daemon.log()[-2000:]}")
