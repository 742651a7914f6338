"""``akidb-embed convert`` on the real all-MiniLM-L6-v2: files, manifest, fusions, parity, golden vectors, int8,
refusals. No mocks."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from minilm import find_minilm_source

from akidb_embed.convert import DEFAULT_SENTENCES, ConversionError, ConversionReport, _toml, add_parser, convert
from akidb_embed.manifest import Conversion, Golden, load_manifest
from akidb_embed.parity import GOLDEN_MARGIN, GOLDEN_TEXTS
from akidb_embed.tomlcompat import tomllib

DAEMON_DIR = Path(__file__).resolve().parents[1] / "daemon"
# What ONNX Runtime's transformer optimizer fuses in the traced all-MiniLM-L6-v2 (6 layers).
MINILM_FUSIONS = {"EmbedLayerNormalization": 1, "Attention": 6, "BiasGelu": 6, "LayerNormalization": 12}


@dataclass
class Converted:
    """One finished conversion and what it said along the way."""

    manifest: Path
    report: ConversionReport
    out_dir: Path
    messages: list[str]


def _convert(out_dir: Path, manifest_dir: Path | None = None, **options: object) -> Converted:
    pytest.importorskip("torch")
    messages: list[str] = []
    path, report = convert(find_minilm_source(), out_dir.name, out_dir, manifest_dir, progress=messages.append, **options)
    return Converted(path, report, out_dir, messages)


@pytest.fixture(scope="session")
def fp32(tmp_path_factory: pytest.TempPathFactory) -> Converted:
    """fp32 conversion, manifest in a separate catalog folder (so its paths are absolute)."""
    root = tmp_path_factory.mktemp("convert-fp32")
    return _convert(root / "models" / "all-minilm-l6-v2", root / "models.d")


@pytest.fixture(scope="session")
def int8(tmp_path_factory: pytest.TempPathFactory) -> Converted:
    """int8 conversion, manifest next to the model (so its paths are relative)."""
    return _convert(tmp_path_factory.mktemp("convert-int8") / "minilm-int8", quantize="int8")


def test_fp32_writes_model_tokenizer_and_a_loadable_manifest(fp32: Converted) -> None:
    """1. out dir holds exactly model.onnx, tokenizer.json, config.json, golden.npz  2. no temp folder left  3. manifest loads
    with the facts, memory_mb measured: the weights and a working budget, within the 220 MiB MiniLM is allowed."""
    assert sorted(p.name for p in fp32.out_dir.iterdir()) == ["config.json", "golden.npz", "model.onnx", "tokenizer.json"]
    assert [p.name for p in fp32.out_dir.parent.iterdir()] == [fp32.out_dir.name]
    assert fp32.manifest == fp32.out_dir.parent.parent / "models.d" / "all-minilm-l6-v2.toml"
    m = load_manifest(fp32.manifest)
    assert (m.pooling, m.dimension, m.max_length, m.normalize) == ("mean", 384, 256, True)
    assert (m.id, m.name, m.family, m.license, m.languages) == (
        "all-minilm-l6-v2", "all-MiniLM-L6-v2", "minilm", "apache-2.0", ("en",))
    assert m.model == fp32.out_dir / "model.onnx" and m.tokenizer == fp32.out_dir / "tokenizer.json"
    assert 22_000_000 < m.params < 23_000_000 and m.padding_side == "right"
    assert m.memory_mb is not None and (fp32.out_dir / "model.onnx").stat().st_size + 64 * 2**20 < m.memory_mb * 2**20
    assert m.memory_mb <= 220
    assert m.precision == "fp32" and m.conversion == Conversion(find_minilm_source().resolve(), fuse=True)
    first_line = fp32.manifest.read_text().splitlines()[0]
    assert "fp32 parity: min cosine" in first_line
    assert "fused: EmbedLayerNormalization x1, Attention x6, BiasGelu x6, LayerNormalization x12" in first_line
    assert (fp32.out_dir / "tokenizer.json").read_bytes() == (find_minilm_source() / "tokenizer.json").read_bytes()
    assert 'model = "/' in fp32.manifest.read_text()  # outside the manifest folder: absolute


def test_fp32_parity_and_progress(fp32: Converted) -> None:
    """1. every default sentence ≥ 0.9999 (incl. the one cut at 256 tokens)  2. progress named each step, the fusion
    ones included, and no fallback was needed."""
    report = fp32.report
    print(f"\nfp32: min {report.min_cosine:.8f} mean {report.mean_cosine:.8f} in {report.seconds:.1f}s, "
          f"{(fp32.out_dir / 'model.onnx').stat().st_size / 1e6:.1f} MB")
    assert len(report.cosines) == len(DEFAULT_SENTENCES) and report.precision == "fp32"
    assert report.min_cosine >= 0.9999 and report.min_cosine == min(report.cosines) and report.seconds > 0
    assert report.fusions == MINILM_FUSIONS
    assert fp32.messages[0].startswith("loading") and fp32.messages[-1] == "writing manifest"
    assert any(m.startswith("exporting") for m in fp32.messages)
    assert any(m.startswith("fusing operators") for m in fp32.messages)
    assert "fused: EmbedLayerNormalization x1, Attention x6, BiasGelu x6, LayerNormalization x12" in fp32.messages
    assert not any("falling back" in m for m in fp32.messages)
    assert f"checking parity 8/{len(DEFAULT_SENTENCES)}" in fp32.messages


def test_onnx_graph_is_dynamic_fused_and_matches_torch(fp32: Converted) -> None:
    """1. inputs/outputs named, batch and sequence dynamic, opset 17 + ORT's fused ops  2. equals torch from 1 token to
    256, batch 1..8, with a padded row (EmbedLayerNormalization's mask index keeps pads out of attention)."""
    onnx = pytest.importorskip("onnx")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    graph = onnx.load(str(fp32.out_dir / "model.onnx"), load_external_data=False)
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) == 17
    ops = [n.op_type for n in graph.graph.node]
    assert {op: ops.count(op) for op in MINILM_FUSIONS} == MINILM_FUSIONS
    # Softmax inside Attention; SkipLayerNormalization left out: Add + LayerNormalization is faster on a CPU
    assert not {"Softmax", "SkipLayerNormalization"} & set(ops)
    session = ort.InferenceSession(str(fp32.out_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    assert all(isinstance(d, str) for i in session.get_inputs() for d in i.shape)
    (output,) = session.get_outputs()
    assert output.name == "last_hidden_state" and isinstance(output.shape[0], str) and output.shape[2] == 384
    model = transformers.AutoModel.from_pretrained(str(find_minilm_source())).eval()
    rng = np.random.default_rng(7)
    for batch, seq in [(1, 1), (1, 2), (3, 7), (8, 33), (2, 256), (5, 100)]:
        ids = rng.integers(1000, 29000, (batch, seq))
        mask = np.ones_like(ids)
        mask[0, max(1, seq // 2) :] = 0  # a padded row where there is room for one
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        got = session.run(None, feeds)[0]
        with torch.no_grad():
            want = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()
        assert got.shape == (batch, seq, 384)
        np.testing.assert_allclose(got, want, atol=2e-4, err_msg=f"batch {batch} seq {seq}")


def test_int8_meets_its_gate_and_is_smaller(int8: Converted, fp32: Converted) -> None:
    """1. mean cosine ≥ 0.99 and every one ≥ 0.97, quantized from the fused graph  2. model.onnx is the quantized,
    much smaller file  3. manifest paths are relative, precision int8."""
    report = int8.report
    size, fp32_size = (int8.out_dir / "model.onnx").stat().st_size, (fp32.out_dir / "model.onnx").stat().st_size
    print(f"\nint8: min {report.min_cosine:.6f} mean {report.mean_cosine:.6f} in {report.seconds:.1f}s, "
          f"{size / 1e6:.1f} MB vs fp32 {fp32_size / 1e6:.1f} MB")
    assert report.precision == "int8" and report.mean_cosine >= 0.99 and report.min_cosine >= 0.97
    assert report.fusions == MINILM_FUSIONS and "quantizing weights to int8" in int8.messages
    assert size < fp32_size / 3
    assert sorted(p.name for p in int8.out_dir.iterdir()) == [
        "config.json", "golden.npz", "minilm-int8.toml", "model.onnx", "tokenizer.json"]
    data = tomllib.loads(int8.manifest.read_text())
    assert (data["model"], data["tokenizer"]) == ("model.onnx", "tokenizer.json")
    m = load_manifest(int8.manifest)
    assert m.model == int8.out_dir / "model.onnx" and m.memory_mb is not None and m.precision == "int8"
    assert f"int8 parity: min cosine {report.min_cosine:.6f}" in int8.manifest.read_text()
    # ~64 MiB less of weights and the same activations; the worst burst's peak is measured afresh by each
    # conversion and varies by up to 20 MiB from run to run (fp32 68-89, int8 57-85 measured).
    assert m.memory_mb < load_manifest(fp32.manifest).memory_mb - 64 + 20


def test_golden_vectors_cover_languages_and_truncation(fp32: Converted, int8: Converted) -> None:
    """1. golden.npz holds every golden text (5+ languages) and one cut at max_length, sentence-transformers' unit
    vectors and the token counts  2. [golden]: fp32 needs 0.999, int8 what convert measured less the margin."""
    with np.load(fp32.out_dir / "golden.npz", allow_pickle=False) as data:
        texts, vectors, tokens = list(data["texts"]), data["vectors"], data["tokens"]
    assert set(texts) >= {text for _, text in GOLDEN_TEXTS} and {"en", "de", "es", "ru", "zh"} <= {
        language for language, _ in GOLDEN_TEXTS}
    assert vectors.shape == (len(texts), 384) and vectors.dtype == np.float32 and tokens.dtype == np.int32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    assert tokens.max() == 256 and tokens.min() >= 3 and len(texts) <= 32  # one text is cut at max_length
    assert load_manifest(fp32.manifest).golden == Golden(fp32.out_dir / "golden.npz", 0.999)
    golden = load_manifest(int8.manifest).golden
    (line,) = [m for m in int8.messages if m.startswith("golden vectors:")]
    measured = float(line.split("min cosine ")[1].split(";")[0])
    print(f"\nint8 golden: {line}")
    assert golden is not None and golden.path == int8.out_dir / "golden.npz"
    assert measured - GOLDEN_MARGIN - 1e-4 <= golden.min_cosine <= measured - GOLDEN_MARGIN < 0.999
    assert 'file = "golden.npz"' in int8.manifest.read_text()  # relative, like model and tokenizer


def test_parity_failure_names_the_figures_and_writes_nothing(tmp_path: Path) -> None:
    """1. cls pooling on a mean-pooled model fails parity, fused and then unfused  2. the error has min/mean/worst
    3. nothing is left behind."""
    out_dir, manifest_dir = tmp_path / "models" / "wrong", tmp_path / "models.d"
    with pytest.raises(ConversionError) as caught:
        _convert(out_dir, manifest_dir, pooling="cls")
    message = str(caught.value)
    assert "parity check failed" in message and "min cosine" in message and "mean" in message
    assert "worst sentence" in message and "Nothing was written" in message and "need min cosine >= 0.9999" in message
    assert not out_dir.exists() and not manifest_dir.exists()
    assert list((tmp_path / "models").iterdir()) == []  # the staging folder is gone too


def test_bad_arguments_fail_before_loading_anything(tmp_path: Path) -> None:
    """A bad id, a bad quantize, or a folder without config.json: ConversionError naming the problem."""
    with pytest.raises(ConversionError, match="bad arguments"):
        convert(find_minilm_source(), "no spaces allowed", tmp_path / "x")
    with pytest.raises(ConversionError, match="bad arguments"):
        convert(find_minilm_source(), "ok", tmp_path / "x", quantize="int4")
    with pytest.raises(ConversionError, match="precision 'bf16'"):
        convert(find_minilm_source(), "ok", tmp_path / "x", precision="bf16")
    with pytest.raises(ConversionError, match="exclude each other"):
        convert(find_minilm_source(), "ok", tmp_path / "x", quantize="int8", precision="fp16")
    with pytest.raises(ConversionError, match="config.json"):
        convert(tmp_path, "ok", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_cli_parses_flags_and_reports_failure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """1. `convert` takes SRC --id --out --manifest-dir --quantize --precision --no-fuse --max-length, or --again
    2. a failure prints why, exit 1: a folder without config.json, missing arguments, --again with SRC, a manifest
    convert did not write."""
    parser = argparse.ArgumentParser(prog="akidb-embed")
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["convert", str(tmp_path), "--id", "m", "--out", str(tmp_path / "o"),
                              "--manifest-dir", str(tmp_path / "d"), "--quantize", "int8", "--max-length", "128"])
    assert (args.id, args.out, args.manifest_dir, args.quantize, args.max_length, args.fuse, args.precision) == (
        "m", tmp_path / "o", tmp_path / "d", "int8", 128, None, None)
    assert args.func(args) == 1  # tmp_path has no config.json
    assert "config.json" in capsys.readouterr().err
    args = parser.parse_args(["convert", "--again", str(tmp_path / "m.toml"), "--precision", "fp16", "--no-fuse"])
    assert (args.again, args.precision, args.fuse, args.src) == (tmp_path / "m.toml", "fp16", False, None)
    assert args.func(args) == 1 and "cannot read it" in capsys.readouterr().err  # no such manifest
    (tmp_path / "m.toml").write_text('id = "m"\nmodel = "model.onnx"\ntokenizer = "t.json"\ndimension = 8\n'
                                     'max_length = 16\npooling = "mean"\n')
    assert args.func(args) == 1 and "no [conversion] table" in capsys.readouterr().err
    for argv, error in ((["convert", "--id", "m"], "SRC, --id and --out are required"),
                        (["convert", str(tmp_path), "--again", str(tmp_path / "m.toml")], "drop SRC")):
        args = parser.parse_args(argv)
        assert args.func(args) == 1 and error in capsys.readouterr().err


def test_importing_convert_does_not_import_torch() -> None:
    """The daemon imports akidb_embed modules: convert must keep torch & co. out of sys.modules."""
    code = "import sys, akidb_embed.convert; sys.exit(bool({'torch', 'transformers', 'sentence_transformers'} & set(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(DAEMON_DIR), os.environ.get("PYTHONPATH", "")])}
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=60).returncode == 0


def test_toml_values_round_trip() -> None:
    """Hand-formatted TOML: quotes, backslashes, newlines, DEL, non-ASCII, bools, ints, floats and lists parse back."""
    value = 'a "quoted" \\ path\nline\ttab\x7f é 中文 😀'
    text = (f"s = {_toml(value)}\nb = {_toml(True)}\nn = {_toml(42)}\nf = {_toml(0.5)}\ng = {_toml(1e-07)}\n"
            f"l = {_toml(['en', 'de'])}\n")
    assert tomllib.loads(text) == {"s": value, "b": True, "n": 42, "f": 0.5, "g": 1e-07, "l": ["en", "de"]}
