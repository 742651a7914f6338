"""int8 (quantize.py): a scale per token where tokens carry outliers, fp32 where channels do, and the parity gate
refusing what int8 cannot keep. Tiny real models built here (a BERT with transformers, a graph with onnx); no mocks.

The damages keep the fp32 function (parity against sentence-transformers stays exact) and break only int8:
- outlier channels: each layer's value projection scales channel 0 up 1000x and the attention output projection
  scales its input row 0 down as much, so the attention output MatMul reads one channel 1000x the rest;
- an outlier row (1000x) in the word-embedding table, on [MASK], which no sentence uses: the table's one int8 scale
  then rounds every other word to zero.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tinymodels
from onnx import TensorProto, helper, numpy_helper

from akidb_embed.convert import ConversionError, convert
from akidb_embed.manifest import load_manifest
from akidb_embed.parity import DEFAULT_SENTENCES, GATES
from akidb_embed.pooling import l2_normalize, pool
from akidb_embed.quantize import quantize_int8
from akidb_embed.tokenize import TextEncoder

TEXTS = list(DEFAULT_SENTENCES)


def _tiny_bert(folder: Path, damage: Callable[[object], None]) -> Path:
    """A sentence-transformers-style folder of a 2-layer BERT, ``damage`` applied."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return tinymodels.build_bert_source(folder, damage)


def _outlier_channels(model: object) -> None:
    for layer in model.encoder.layer:
        layer.attention.self.value.weight[0] *= 1000
        layer.attention.self.value.bias[0] *= 1000
        layer.attention.output.dense.weight[:, 0] /= 1000


def _outlier_word(model: object) -> None:
    mask_id = tinymodels.build_encoder_tokenizer().token_to_id("[MASK]")
    model.embeddings.word_embeddings.weight[mask_id] *= 1000


def _embed(model: Path, encoder: TextEncoder, texts: list[str] = TEXTS) -> np.ndarray:
    """Mean-pooled, normalized vectors of ``texts`` from ``model``, in batches of 8 as the parity gate runs them."""
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    vectors = []
    for start in range(0, len(texts), 8):
        batch = encoder.pad(encoder.encode(texts[start : start + 8]))
        feeds = {"input_ids": batch.ids, "attention_mask": batch.mask, "token_type_ids": np.zeros_like(batch.ids)}
        states = session.run(None, {k: v for k, v in feeds.items() if k in names})[0]
        vectors.append(pool(states, batch.mask, "mean"))
    return l2_normalize(np.concatenate(vectors))


def _plain_int8(fp32: Path, out: Path) -> Path:
    """What convert did before quantize.py: dynamic per-channel int8 of every node."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, per_channel=True,
                     extra_options={"DefaultTensorType": TensorProto.FLOAT})
    return out


def test_channel_outliers_keep_their_matmul_fp32(tmp_path: Path) -> None:
    """1. the fused fp32 graph of the damaged BERT passes its gate  2. quantize_int8 keeps the two attention output
    MatMuls (found by structure: they read Attention) fp32 with their weights, quantizes all the rest, and says so
    3. the result loads and stays near fp32 (mean cosine >= 0.99), where plain dynamic int8 falls far below."""
    src = _tiny_bert(tmp_path / "src", _outlier_channels)
    manifest, report = convert(src, "damaged", tmp_path / "fp32", progress=lambda message: None)
    assert report.precision == "fp32" and report.fusions.get("Attention") == 2
    fp32 = load_manifest(manifest).model
    encoder = TextEncoder(fp32.parent / "tokenizer.json", 128, "right")
    messages: list[str] = []
    description = quantize_int8(fp32, tmp_path / "int8.onnx", encoder, TEXTS, False, messages.append)
    assert "kept fp32: MatMul x2" in description and messages[-1] == "quantizing weights to int8"
    assert any(m.startswith("measuring int8 error per node") for m in messages)

    graph = onnx.load(str(tmp_path / "int8.onnx")).graph
    made_by = {output: node for node in graph.node for output in node.output}
    floats = {t.name for t in graph.initializer if t.data_type == TensorProto.FLOAT}
    matmuls = [node for node in graph.node if node.op_type == "MatMul"]
    assert len(matmuls) == 2
    for node in matmuls:
        assert made_by[node.input[0]].op_type in ("Attention", "QAttention") and node.input[1] in floats
    ops = [node.op_type for node in graph.node]
    assert ops.count("QAttention") == 2 and ops.count("MatMulInteger") == 4  # 2 layers x FFN in and out
    ort.InferenceSession(str(tmp_path / "int8.onnx"), providers=["CPUExecutionProvider"])

    exact = _embed(fp32, encoder)
    ours = np.sum(exact * _embed(tmp_path / "int8.onnx", encoder), axis=1)
    plain = np.sum(exact * _embed(_plain_int8(fp32, tmp_path / "plain.onnx"), encoder), axis=1)
    print(f"\nint8 with fp32 kept: mean {ours.mean():.5f} min {ours.min():.5f}; plain: mean {plain.mean():.5f}")
    assert ours.mean() >= 0.99 and plain.mean() < 0.9


def test_the_gate_refuses_int8_that_misses_and_writes_nothing(tmp_path: Path) -> None:
    """1. the BERT with an outlier embedding row passes fp32 parity but not int8's: a ConversionError naming min and
    mean cosine, the gate and the worst sentence  2. no model folder, manifest or staging folder is left."""
    src = _tiny_bert(tmp_path / "src", _outlier_word)
    out, catalog = tmp_path / "models" / "damaged", tmp_path / "models.d"
    with pytest.raises(ConversionError) as caught:
        convert(src, "damaged", out, catalog, quantize="int8", progress=lambda message: None)
    message = str(caught.value)
    print(f"\n{message}")
    assert "parity check failed" in message and f"need {GATES['int8']} for int8" in message
    assert "min cosine 0." in message and ", mean 0." in message and "worst sentence #" in message
    assert "Nothing was written" in message
    assert not out.exists() and not catalog.exists() and list(out.parent.iterdir()) == []


def _outlier_token_graph(path: Path, opset: int, external: bool) -> tuple[np.ndarray, np.ndarray]:
    """input_ids -> embedding -> x 30 on the first token -> MatMul: the [CLS] row of the MatMul's input is 30x the
    others, as BERT's attention sinks are. Returns the embedding table and the weight."""
    rng = np.random.default_rng(0)
    vocab = tinymodels.build_encoder_tokenizer().get_vocab_size()
    table, weight = rng.normal(size=(vocab, 64)).astype(np.float32), rng.normal(size=(64, 48)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["tokens"]),
        helper.make_node("Shape", ["input_ids"], ["length_1d"], start=1, end=2),
        helper.make_node("Squeeze", ["length_1d"], ["length"]),
        helper.make_node("Range", ["zero", "length", "one"], ["positions"]),
        helper.make_node("Equal", ["positions", "zero"], ["is_first"]),
        helper.make_node("Cast", ["is_first"], ["first"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["first", "twenty_nine"], ["boost"]),
        helper.make_node("Add", ["boost", "one_f"], ["factor_1d"]),
        helper.make_node("Unsqueeze", ["factor_1d", "axes"], ["factor"]),
        helper.make_node("Mul", ["tokens", "factor"], ["x"]),
        helper.make_node("MatMul", ["x", "weight"], ["last_hidden_state"], name="projection"),
    ]
    constants = {"table": table, "weight": weight, "zero": np.array(0, np.int64), "one": np.array(1, np.int64),
                 "twenty_nine": np.array(29, np.float32), "one_f": np.array(1, np.float32),
                 "axes": np.array([0, 2], np.int64)}
    graph = helper.make_graph(nodes, "outlier-token", [helper.make_tensor_value_info(
        "input_ids", TensorProto.INT64, ["batch", "sequence"])], [helper.make_tensor_value_info(
            "last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", 48])],
        [numpy_helper.from_array(v, k) for k, v in constants.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.save(model, str(path), save_as_external_data=external, location="model.onnx.data")
    return table, weight


@pytest.mark.parametrize(("opset", "external"), [(17, False), (18, True)])
def test_outlier_tokens_get_a_scale_per_token(tmp_path: Path, opset: int, external: bool) -> None:
    """1. the MatMul reading a 30x first token is rewritten as (x / r) @ W * r, the reduction in the opset's form,
    with external data when asked  2. on the other tokens its error is at least 3x lower than plain dynamic int8."""
    (tmp_path / "fp32").mkdir()
    fp32 = tmp_path / "fp32" / "model.onnx"
    _outlier_token_graph(fp32, opset, external)
    tokenizer = tmp_path / "tokenizer.json"
    tinymodels.build_encoder_tokenizer().save(str(tokenizer))
    encoder = TextEncoder(tokenizer, 128, "right")
    description = quantize_int8(fp32, tmp_path / "int8.onnx", encoder, TEXTS, external, lambda message: None)
    assert "a scale per token at 1 of 1 MatMul inputs; kept fp32: none" in description
    assert (tmp_path / "int8.onnx.data").is_file() == external and sorted(os.listdir(fp32.parent)) == (
        ["model.onnx", "model.onnx.data"] if external else ["model.onnx"])  # no temporary file left beside it

    graph = onnx.load(str(tmp_path / "int8.onnx")).graph
    made_by = {output: node for node in graph.node for output in node.output}
    (reduce_max,) = [node for node in graph.node if node.op_type == "ReduceMax"]
    assert reduce_max.input[0] == "x" and (len(reduce_max.input) == 2) == (opset >= 18)
    (rescale,) = [node for node in graph.node if node.output[0] == "last_hidden_state"]
    assert rescale.op_type == "Mul" and made_by[rescale.input[1]].op_type == "Max"
    assert "MatMul" not in [node.op_type for node in graph.node]

    batch = encoder.pad(encoder.encode(TEXTS[:8]))
    rest = batch.mask.astype(bool) & (np.arange(batch.mask.shape[1]) > 0)  # real tokens after the first

    def states(model: Path) -> np.ndarray:
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        return session.run(None, {"input_ids": batch.ids})[0][rest]

    exact = states(fp32)
    ours = np.linalg.norm(states(tmp_path / "int8.onnx") - exact) / np.linalg.norm(exact)
    plain = np.linalg.norm(states(_plain_int8(fp32, tmp_path / "plain.onnx")) - exact) / np.linalg.norm(exact)
    print(f"\nerror on the other tokens: per token {ours:.4f}, plain {plain:.4f}")
    assert ours * 3 <= plain
