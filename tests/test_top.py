"""``akidb-embed top`` under a real pseudo-terminal (pexpect), its screen read back through a
terminal emulator (pyte), against a real daemon: real figures, live updates, q, a daemon that stops."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import pexpect
import pyte
from akidb_embed import top
from daemon_process import REPO, Daemon, run_daemon, with_ctrl_c

ROWS, COLUMNS = 30, 160


class Terminal:
    """``akidb-embed top`` in a pty, and the screen it has drawn so far."""

    def __init__(self, socket: str) -> None:
        self.screen = pyte.Screen(COLUMNS, ROWS)
        self.stream = pyte.ByteStream(self.screen)
        self.child = pexpect.spawn(sys.executable, ["-m", "akidb_embed", "top", "--socket", socket, "--interval", "0.3"],
                                   cwd=str(REPO), dimensions=(ROWS, COLUMNS), env={"TERM": "xterm", "PATH": "/usr/bin:/bin"},
                                   preexec_fn=with_ctrl_c)  # fmt: skip

    def text(self) -> str:
        try:
            while True:
                self.stream.feed(self.child.read_nonblocking(65536, timeout=0.05))
        except (pexpect.TIMEOUT, pexpect.EOF):
            pass
        return "\n".join(self.screen.display)

    def wait_for(self, condition: Callable[[str], bool], timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while not condition(screen := self.text()):
            assert time.monotonic() < deadline, f"the screen never showed it:\n{screen}"
        return screen


def row(screen: str, model_id: str) -> list[str]:
    return next(line.split() for line in screen.splitlines() if line.startswith(model_id + " "))


def test_top_shows_real_figures_updates_live_and_quits_on_q(daemon: Daemon) -> None:
    terminal = Terminal(str(daemon.socket))
    screen = terminal.wait_for(lambda s: "bge-tiny" in s and "qwen3-tiny" in s)
    assert "from meminfo" in screen and row(screen, "e5-tiny")[1] == "available"
    with daemon.client() as client:
        for i in range(3):
            client.embed([f"text {i}"] * 2, "e5-tiny")
        sent = next(m for m in client.models() if m["id"] == "e5-tiny")["stats"]["requests"]
    screen = terminal.wait_for(lambda s: row(s, "e5-tiny")[1] == "ready" and row(s, "e5-tiny")[-2] == str(sent))
    cells = row(screen, "e5-tiny")
    assert cells[-1] == "0" and cells[-3] == "67%"  # no errors; 2 hits of 3 (the first request loaded it)
    terminal.child.send("q")
    terminal.child.expect(pexpect.EOF, timeout=5)
    terminal.child.close()
    assert terminal.child.exitstatus == 0


def test_a_daemon_that_stops_is_shown_not_a_traceback(catalog) -> None:
    with run_daemon(catalog) as daemon:
        terminal = Terminal(str(daemon.socket))
        terminal.wait_for(lambda s: "bge-tiny" in s)
    screen = terminal.wait_for(lambda s: "daemon not answering" in s)
    assert "Traceback" not in screen and terminal.child.isalive()
    terminal.child.sendintr()  # Ctrl-C quits too
    terminal.child.expect(pexpect.EOF, timeout=5)


def test_render_tolerates_what_an_older_daemon_leaves_out() -> None:
    lines = top.render(({"version": "0.0.9"}, [{"id": "old", "state": "ready"}]), "/run/s.sock", 1.0)
    assert lines[1].startswith("daemon 0.0.9") and "from ?" in lines[2]
    assert row("\n".join(lines), "old") == ["old", "ready", "-", "-", "-", top.NEVER, "-", top.NEVER, "-", "-"]
