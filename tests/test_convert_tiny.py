"""``akidb-embed convert`` on tiny HF models built here: fusion on and off, padding, fp16, int8 figures, --again.

A tiny BERT (2 layers, hidden 32) and a tiny Qwen3 (2 layers, GQA, left padding, last-token pooling) are real
transformers models with random weights, saved as sentence-transformers folders with the tokenizers of
tests/tinymodels.py; each conversion takes a few seconds. No mocks: real exports, real ONNX Runtime, a real daemon.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import tinymodels
from daemon_process import run_daemon

from akidb_embed.backend import DeviceMemory, OnnxBackend
from akidb_embed.convert import ConversionReport, add_parser, convert
from akidb_embed.manifest import fingerprint, load_manifest
from akidb_embed.parity import DEFAULT_SENTENCES, GOLDEN_PROMPTED, GOLDEN_TEXTS, Yardstick
from akidb_embed.tokenize import Padded, TextEncoder
from akidb_embed_client import errors

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

BERT_FUSIONS = {"EmbedLayerNormalization": 1, "Attention": 2, "BiasGelu": 2, "LayerNormalization": 4}
# 2 layers x (input, post-attention, q, k norms) + the final norm; the residual adds fold into 4 of them.
QWEN3_FUSIONS = {"SimplifiedLayerNormalization": 5, "SkipSimplifiedLayerNormalization": 4}
QWEN3_PROMPTS = {"query": "Instruct: Given a web search query, retrieve relevant passages\nQuery:", "short": "q: "}
PADDED_TEXTS = ["hi", "what is the capital of france", "the cat sat on the mat while the weather was cold and rainy"]


@dataclass
class Converted:
    manifest: Path
    report: ConversionReport
    messages: list[str]

    @property
    def model(self) -> Path:
        return load_manifest(self.manifest).model


def _save_tokenizer(tokenizer: object, folder: Path, **special: str) -> None:
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=128, **special)
    fast.save_pretrained(folder)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BERT folder as sentence-transformers saves a plain HF model (mean pooling by default)."""
    return tinymodels.build_bert_source(tmp_path_factory.mktemp("tiny-bert-src"))


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Qwen3 embedding folder: left padding, last-token pooling, normalized, as Qwen3-Embedding ships."""
    folder = tmp_path_factory.mktemp("tiny-qwen3-src")
    tokenizer = tinymodels.build_decoder_tokenizer()
    torch.manual_seed(0)
    config = transformers.Qwen3Config(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      max_position_embeddings=128, initializer_range=0.2)
    transformers.Qwen3Model(config).save_pretrained(folder)
    _save_tokenizer(tokenizer, folder, pad_token=tinymodels.DECODER_EOS, eos_token=tinymodels.DECODER_EOS,
                    padding_side="left")
    modules = [("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Normalize", "Normalize")]
    (folder / "modules.json").write_text(json.dumps([
        {"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{kind}"}
        for i, (path, kind) in enumerate(modules)]))
    (folder / "1_Pooling").mkdir()
    pooling = {"word_embedding_dimension": 32, "pooling_mode": "lasttoken"}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    (folder / "config_sentence_transformers.json").write_text(json.dumps({"prompts": QWEN3_PROMPTS}))
    return folder


def _convert(src: Path, out: Path, **options: object) -> Converted:
    messages: list[str] = []
    path, report = convert(src, out.name, out, progress=messages.append, **options)
    return Converted(path, report, messages)


@pytest.fixture(scope="module")
def bert_pair(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Converted, Converted]:
    root = tmp_path_factory.mktemp("tiny-bert")
    return _convert(tiny_bert, root / "fused"), _convert(tiny_bert, root / "unfused", fuse=False)


@pytest.fixture(scope="module")
def qwen3_pair(tiny_qwen3: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Converted, Converted]:
    root = tmp_path_factory.mktemp("tiny-qwen3")
    return _convert(tiny_qwen3, root / "fused"), _convert(tiny_qwen3, root / "unfused", fuse=False)


def _ops(model: Path) -> list[str]:
    return [node.op_type for node in onnx.load(str(model)).graph.node]


def _embed(manifest: Path, texts: list[str]) -> np.ndarray:
    """The daemon's vectors for ``texts`` from a converted model (its tokenizer, backend and pooling, on the CPU)."""
    m = load_manifest(manifest)
    return Yardstick(np.empty(0), texts, m.tokenizer, m.max_length, m.padding_side, m.pooling, m.normalize,
                     print).embed(m.model)


def _states(manifest: Path, texts: list[str], attend_to_pads: bool = False) -> list[np.ndarray]:
    """Each text's real-token states from one padded batch, fed as the daemon's backend feeds the graph;
    ``attend_to_pads`` marks the pads as real tokens in the mask, which a correct graph must notice."""
    m = load_manifest(manifest)
    encoder = TextEncoder(m.tokenizer, m.max_length, m.padding_side)
    batch = encoder.pad(encoder.encode(texts))
    backend = OnnxBackend(m.model, ("cpu",), m.model.parent, DeviceMemory(0, 0))
    try:
        states = backend.run(Padded(batch.ids, np.ones_like(batch.mask)) if attend_to_pads else batch)
    finally:
        backend.close()
    return [row[mask.astype(bool)] for row, mask in zip(states, batch.mask)]


def _assert_padding_stays_out(manifest: Path) -> None:
    """Every row of one padded batch equals its text run alone; pads counted as real tokens would change it."""
    together = _states(manifest, PADDED_TEXTS)
    alone = [_states(manifest, [text])[0] for text in PADDED_TEXTS]
    assert len({len(states) for states in alone}) == len(PADDED_TEXTS)  # different lengths: the short ones are padded
    for got, want in zip(together, alone):
        np.testing.assert_allclose(got, want, atol=1e-4)
    leaked = _states(manifest, PADDED_TEXTS, attend_to_pads=True)[0]  # the shortest text: the most pads
    assert np.abs(leaked - alone[0]).max() > 1e-2


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_bert_fusion_applies_and_keeps_the_vectors(bert_pair: tuple[Converted, Converted]) -> None:
    """1. fused: Attention, EmbedLayerNormalization, BiasGelu (and LayerNormalization) in the graph and the manifest's
    first line, with their progress steps  2. --no-fuse: none of them  3. both pass the fp32 gate and agree with
    each other  4. the same interface."""
    fused, unfused = bert_pair
    assert fused.report.fusions == BERT_FUSIONS and unfused.report.fusions == {}
    fused_ops, unfused_ops = _ops(fused.model), _ops(unfused.model)
    assert {op: fused_ops.count(op) for op in BERT_FUSIONS} == BERT_FUSIONS and "Softmax" not in fused_ops
    assert not {"EmbedLayerNormalization", "Attention", "BiasGelu"} & set(unfused_ops) and "Softmax" in unfused_ops
    first_line = fused.manifest.read_text().splitlines()[0]
    assert "fused: EmbedLayerNormalization x1, Attention x2, BiasGelu x2, LayerNormalization x4" in first_line
    assert "not fused (--no-fuse)" in unfused.manifest.read_text().splitlines()[0]
    assert [load_manifest(c.manifest).conversion.fuse for c in bert_pair] == [True, False]
    assert "fusing operators with ONNX Runtime's transformer optimizer" in fused.messages
    assert "exporting with torch's dynamo exporter (unfused)" in unfused.messages
    assert not any(m.startswith(("tracing", "fusing")) for m in unfused.messages)
    assert min(fused.report.min_cosine, unfused.report.min_cosine) >= 0.9999
    texts = list(DEFAULT_SENTENCES)
    assert _cosines(_embed(fused.manifest, texts), _embed(unfused.manifest, texts)).min() >= 0.9999
    for converted in bert_pair:
        graph = onnx.load(str(converted.model))
        assert [i.name for i in graph.graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
        assert [o.name for o in graph.graph.output] == ["last_hidden_state"]


def test_bert_fused_graph_keeps_padding_out(bert_pair: tuple[Converted, Converted]) -> None:
    """EmbedLayerNormalization turns the mask into sequence lengths for Attention: right-padded rows stay exact."""
    _assert_padding_stays_out(bert_pair[0].manifest)


def test_qwen3_fusion_applies_and_left_padding_stays_correct(qwen3_pair: tuple[Converted, Converted]) -> None:
    """1. fused: the RMSNorms (SimplifiedLayerNormalization, with the residual adds as Skip...)  2. --no-fuse: none
    3. both take position_ids, pad left, pool the last token, and agree  4. left-padded rows equal their texts alone."""
    fused, unfused = qwen3_pair
    assert fused.report.fusions == QWEN3_FUSIONS and unfused.report.fusions == {}
    assert not set(QWEN3_FUSIONS) & set(_ops(unfused.model))
    for converted in qwen3_pair:
        m = load_manifest(converted.manifest)
        assert (m.padding_side, m.pooling, m.normalize, m.family) == ("left", "last_token", True, "qwen3")
        assert [i.name for i in onnx.load(str(m.model)).graph.input] == ["input_ids", "attention_mask", "position_ids"]
        assert converted.report.min_cosine >= 0.9999
        _assert_padding_stays_out(converted.manifest)
    texts = list(DEFAULT_SENTENCES)
    assert _cosines(_embed(fused.manifest, texts), _embed(unfused.manifest, texts)).min() >= 0.9999


def test_golden_vectors_hold_each_prompt_and_pass_the_daemons_self_test(qwen3_pair: tuple[Converted, Converted]) -> None:
    """1. golden.npz holds the golden texts, one over max_length, and each named prompt on two texts, with
    sentence-transformers' token counts  2. a daemon loads the model verified: passed, min cosine >= 0.999."""
    converted = qwen3_pair[0]
    m = load_manifest(converted.manifest)
    assert m.prompts == QWEN3_PROMPTS and m.golden is not None and m.golden.min_cosine == 0.999
    with np.load(m.golden.path, allow_pickle=False) as data:
        texts, tokens = list(data["texts"]), data["tokens"]
    assert [t for t in texts if t.startswith(tuple(QWEN3_PROMPTS.values()))] == [
        prefix + text for prefix in QWEN3_PROMPTS.values() for text in GOLDEN_PROMPTED]
    assert set(texts) >= {text for _, text in GOLDEN_TEXTS} and tokens.max() == m.max_length
    with run_daemon(converted.manifest.parent) as daemon, daemon.client() as client:
        assert client.embed(["hello"], model=m.id).model == m.id
        (info,) = client.models()
    assert info["verification"] == "passed" and info["selftest"]["min_cosine"] >= 0.999
    assert info["selftest"]["texts"] == len(texts)


def test_int8_gate_needs_the_minimum_as_well_as_the_mean(bert_pair: tuple[Converted, Converted]) -> None:
    """One sentence at cosine 0.96 among 24 perfect ones: the mean (0.998) passes, the int8 gate still refuses."""
    m = load_manifest(bert_pair[0].manifest)
    texts = list(DEFAULT_SENTENCES)
    exact = _embed(bert_pair[0].manifest, texts)
    unit = exact[3] / np.linalg.norm(exact[3])
    other = np.roll(unit, 1) - (np.roll(unit, 1) @ unit) * unit  # orthogonal to sentence 3's vector
    reference = exact.copy()
    reference[3] = 0.96 * unit + np.sqrt(1 - 0.96**2) * other / np.linalg.norm(other)
    stick = Yardstick(reference, texts, m.tokenizer, m.max_length, m.padding_side, m.pooling, m.normalize, print)
    cosines, miss = stick.check(m.model, "int8")
    assert cosines.mean() >= 0.99 and abs(cosines.min() - 0.96) < 1e-4
    assert miss is not None and "min cosine 0.96" in miss and "need min cosine >= 0.97, mean >= 0.99" in miss
    assert "worst sentence #3" in miss
    assert Yardstick(exact, texts, m.tokenizer, m.max_length, m.padding_side, m.pooling, m.normalize,
                     print).check(m.model, "int8")[1] is None


def test_fp16_passes_its_gate_and_the_daemon_refuses_it_on_the_cpu(tiny_bert: Path, tmp_path: Path) -> None:
    """1. --precision fp16: fp16 weights, float32 output, its own gate (min cosine >= 0.999), precision = "fp16"
    2. a daemon on the CPU refuses to load it, naming the cause and the fix, and lists it as failed."""
    messages: list[str] = []
    path, report = convert(tiny_bert, "tiny-fp16", tmp_path / "models" / "tiny-fp16", tmp_path / "models.d",
                           precision="fp16", progress=messages.append)
    assert report.precision == "fp16" and report.min_cosine >= 0.999 and report.fusions == BERT_FUSIONS
    assert any(message.startswith("casting weights and activations to fp16") for message in messages)
    m = load_manifest(path)
    graph = onnx.load(str(m.model))
    assert {t.data_type for t in graph.graph.initializer if t.dims} >= {onnx.TensorProto.FLOAT16}
    assert graph.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert m.precision == "fp16" and "fp16 parity: min cosine" in path.read_text().splitlines()[0]
    with run_daemon(path.parent) as daemon, daemon.client() as client:
        with pytest.raises(errors.ModelUnavailable) as caught:
            client.embed(["hello"], model="tiny-fp16")
        for fragment in ("tiny-fp16 is fp16, made for GPU providers", "CPUExecutionProvider",
                         "without --precision fp16"):
            assert fragment in str(caught.value)
        (listed,) = client.models()
        assert listed["state"] == "failed" and "is fp16" in listed["error"] and listed["precision"] == "fp16"


def test_again_redoes_the_recorded_conversion(
    tiny_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """1. convert with --max-length 64, then hand-set default, keep_alive and matryoshka_dimensions
    2. `convert --again M`: same files (fingerprint), settings and hand-set fields
    3. `--again M --quantize int8`: int8 with its figures on stdout, max_length still 64, fields still there
    4. an --again that fails parity (--pooling cls) replaces nothing."""
    parser = argparse.ArgumentParser(prog="akidb-embed")
    add_parser(parser.add_subparsers())

    def cli(*argv: str) -> tuple[int, str, str]:
        args = parser.parse_args(["convert", *argv])
        status = args.func(args)
        return status, *capsys.readouterr()

    out, catalog = tmp_path / "models" / "tiny", tmp_path / "models.d"
    assert cli(str(tiny_bert), "--id", "tiny", "--out", str(out), "--manifest-dir", str(catalog),
               "--max-length", "64")[0] == 0
    manifest = catalog / "tiny.toml"
    hand_set = 'default = true\nkeep_alive = 30.5\nmatryoshka_dimensions = [16]\n'  # top-level: before the tables
    manifest.write_text(manifest.read_text().replace('precision = "fp32"\n', f'precision = "fp32"\n{hand_set}'))
    before, fingerprint_before = load_manifest(manifest), fingerprint(load_manifest(manifest))
    status, stdout, _ = cli("--again", str(manifest))
    after, fingerprint_after = load_manifest(manifest), fingerprint(load_manifest(manifest))
    assert status == 0 and "parity (fp32, 24 sentences): min cosine" in stdout
    assert fingerprint_after == fingerprint_before  # the same graph bytes, tokenizer and pooling settings
    settings = ("max_length", "pooling", "normalize", "padding_side", "precision", "dimension", "model", "conversion")
    assert [getattr(after, k) for k in settings] == [getattr(before, k) for k in settings] and after.max_length == 64
    assert (after.default, after.keep_alive, after.matryoshka_dimensions) == (True, 30.5, (16,))

    status, stdout, _ = cli("--again", str(manifest), "--quantize", "int8")
    int8 = load_manifest(manifest)
    assert status == 0 and "parity (int8, 24 sentences): min cosine" in stdout
    assert "(gate: min cosine >= 0.97, mean >= 0.99)" in stdout
    assert (int8.precision, int8.max_length, int8.default, int8.matryoshka_dimensions) == ("int8", 64, True, (16,))
    assert fingerprint(int8) != fingerprint_after

    files = {p: p.read_bytes() for p in [manifest, *out.iterdir()]}
    status, _, stderr = cli("--again", str(manifest), "--pooling", "cls")
    assert status == 1 and "parity check failed" in stderr and "falling back to the unfused export" in stderr
    assert {p: p.read_bytes() for p in [manifest, *out.iterdir()]} == files
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]  # no staging folder left behind
