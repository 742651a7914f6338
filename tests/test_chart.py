"""``akidb-embed bench --plot``: real daemons, real benches, real PNG and SVG files read back.

The SVG is written with its text as text, and the chart module tags the marker collection ``profiles`` and
each bar ``throughput-<row>``, so the tests count what was drawn rather than trusting a message.
"""

from __future__ import annotations

import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import hfmodels
import tinymodels
from daemon_process import REPO, run_daemon

matplotlib_image = pytest.importorskip("matplotlib.image")

SVG = "{http://www.w3.org/2000/svg}"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FAST = "5"  # single-text requests timed: the charts need a p95, not a precise one


def bench(socket: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "akidb_embed", "bench", "--texts", FAST, "--socket", str(socket), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO, env=env)


def markers(svg: Path) -> int:
    """How many markers the scatter of profiles (SVG group ``profiles``) holds."""
    group = next(e for e in ET.parse(svg).iter(f"{SVG}g") if e.get("id") == "profiles")
    return len(list(group.iter(f"{SVG}path")))


def bars(svg: Path) -> int:
    """How many bars the throughput chart holds (SVG groups ``throughput-<row>``)."""
    return sum(1 for e in ET.parse(svg).iter(f"{SVG}g") if (e.get("id") or "").startswith("throughput-"))


def texts(svg: Path) -> str:
    return "\n".join("".join(e.itertext()) for e in ET.parse(svg).iter(f"{SVG}text"))


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    height, width, channels = matplotlib_image.imread(path).shape
    assert width >= 600 and height >= 200 and channels in (3, 4)


def test_the_chart_shows_every_profiled_model_with_a_quality(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    """1. bge-tiny and e5-tiny have golden vectors, qwen3-tiny none. 2. Bench qwen3-tiny and bge-tiny with a PNG
    chart: one point (qwen3-tiny has no quality and is named as left off). 3. Bench only e5-tiny with an SVG
    chart: two points, bge-tiny's from the daemon's stored profile. 4. The throughput charts have a bar per
    profiled model; with no conversion source, no sentence-transformers bar, and stderr says why."""
    catalog, encoder = tmp_path / "models.d", tiny_models["encoder"]
    for model_id, fields, pooling in (("bge-tiny", tinymodels.BGE_FIELDS, "cls"),
                                      ("e5-tiny", tinymodels.E5_FIELDS, "mean")):  # fmt: skip
        golden = tinymodels.write_golden(tmp_path / f"{model_id}.npz", encoder, pooling)
        tinymodels.write_manifest(catalog, model_id, encoder, golden, **fields)
    tinymodels.write_manifest(catalog, "qwen3-tiny", tiny_models["decoder"], **tinymodels.QWEN3_FIELDS)
    with run_daemon(catalog) as daemon:
        first = bench(daemon.socket, "qwen3-tiny", "bge-tiny", "--plot", str(tmp_path / "chart.png"))
        assert first.returncode == 0, first.stderr
        assert "qwen3-tiny: no quality figure (no golden vectors)" in first.stderr
        assert f"wrote {tmp_path / 'chart.png'}: 1 model(s)" in first.stderr
        assert_png(tmp_path / "chart.png")
        assert_png(tmp_path / "chart-throughput.png")
        second = bench(daemon.socket, "e5-tiny", "--plot", str(tmp_path / "chart.svg"))
    assert second.returncode == 0, second.stderr
    assert len(second.stdout.splitlines()) == 3  # the table lists only what this run measured...
    chart = tmp_path / "chart.svg"
    assert markers(chart) == 2  # ...the chart every profiled model with a quality figure
    labels = texts(chart)
    assert "bge-tiny (fp32)" in labels and "e5-tiny (fp32)" in labels and "qwen3-tiny (fp32)" not in labels
    assert "qwen3-tiny" in labels  # named in the footnote
    assert bars(tmp_path / "chart-throughput.svg") == 3
    assert "bge-tiny: no sentence-transformers figure" in second.stderr and "has no [conversion] source" in second.stderr
    assert "sentence-transformers (" not in texts(tmp_path / "chart-throughput.svg")


def test_sentence_transformers_runs_each_source_once_beside_its_models(tmp_path: Path) -> None:
    """1. Convert a tiny BERT; a second manifest serves the same conversion under another id (one source, two
    models). 2. Bench both with an SVG chart. 3. Two points; the throughput chart has both models and one
    sentence-transformers bar for their shared source, measured in the command's process, and each model's
    speed-up over it."""
    pytest.importorskip("sentence_transformers")
    from akidb_embed.convert import convert

    source = hfmodels.build_bert(tmp_path / "bert")
    catalog = tmp_path / "models.d"
    manifest, _ = convert(source, "bert-tiny", tmp_path / "models" / "bert-tiny", catalog, progress=lambda _: None)
    text = manifest.read_text(encoding="utf-8").replace('id = "bert-tiny"', 'id = "bert-alias"')
    (catalog / "bert-alias.toml").write_text(text, encoding="utf-8")
    with run_daemon(catalog) as daemon:
        done = bench(daemon.socket, "--plot", str(tmp_path / "chart.svg"))
    assert done.returncode == 0, done.stderr
    assert markers(tmp_path / "chart.svg") == 2
    labels = texts(tmp_path / "chart.svg")
    assert "bert-tiny (fp32)" in labels and "bert-alias (fp32)" in labels
    assert done.stderr.count("sentence-transformers: timing") == 1
    throughput = tmp_path / "chart-throughput.svg"
    assert bars(throughput) == 3
    assert "sentence-transformers (bert)" in texts(throughput)  # the manifests' name of the source
    assert len(re.findall(r"\(\d+\.\d×\)", texts(throughput))) == 2  # each model against it


def test_without_matplotlib_it_says_what_to_install_before_benchmarking(tmp_path: Path) -> None:
    """A sitecustomize makes ``import matplotlib`` fail; the command stops at its arguments, socket untouched."""
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['matplotlib'] = None\n")
    env = {"PYTHONPATH": f"{tmp_path}:{REPO / 'daemon'}:{REPO / 'client'}", "PATH": "/usr/bin:/bin"}
    done = bench(tmp_path / "no.sock", "--plot", str(tmp_path / "chart.png"), env=env)
    assert done.returncode == 2
    assert "pip install 'akidb-embed[plot]'" in done.stderr and "unavailable" not in done.stderr
    assert not (tmp_path / "chart.png").exists()
    wrong = bench(tmp_path / "no.sock", "--plot", str(tmp_path / "chart.jpg"))
    assert wrong.returncode == 2 and "name the file .png or .svg" in wrong.stderr
