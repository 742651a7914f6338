"""int8 for ``convert --quantize int8``: dynamic per-channel weights, and a scale per token where one per batch fails.

ONNX Runtime's dynamic int8 gives each MatMul input one scale for the whole batch. In BERT-like encoders a few
tokens ([CLS], punctuation: the attention sinks) carry 5-15x larger activations than the rest at the feed-forward
inputs, so that shared scale leaves every other token a few of the 256 levels: plain ``quantize_dynamic`` gave
all-MiniLM-L6-v2 mean cosine 0.991, min 0.976 against sentence-transformers (1,200 Debian fortunes). So each
MatMul's and Attention's int8 error is first measured on calibration sentences, emulating the int8 arithmetic in
numpy, and then
- where a scale per token at least halves a MatMul's error, its input is divided by each token's largest magnitude
  before the quantized MatMul and the output multiplied back (a ReduceMax, a ReduceMin and two Muls around it);
- a node whose error stays above 10% either way (outlier *channels*, which no per-token scale fixes) stays fp32;
- the rest is plain dynamic int8. Embedding tables are quantized unchecked: the parity gate judges the whole.
On all-MiniLM-L6-v2: 9 of 18 MatMuls scaled per token, none kept fp32; mean 0.9967, min 0.9895 on the fortunes,
1.5-1.7x the fused fp32 graph's bulk speed on an AVX512-VNNI/AMX Xeon (1 or 2 threads; plain: 1.65-1.9x), 23 MB.
Keeping nodes fp32 instead bought less for more (the 6 FFN output projections: mean 0.9953 at 1.4x); static QDQ
ranges (MinMax, Percentile, Entropy) scored mean 0.80-0.92: a clipped or shared range cannot hold the sink tokens.

The calibration only picks which nodes get which treatment (no ranges are baked in), so a few dozen sentences do:
convert passes its own built-in ones. onnx and onnxruntime's quantization tools are imported inside functions.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .backend import feeds
from .tokenize import TextEncoder

ROW_GAIN = 2.0  # scale per token where that at least halves the emulated error (the 9 FFN inputs of MiniLM: 2.1-3.1)
KEEP_FP32_ERROR = 0.10  # relative output error above which a node stays fp32 (MiniLM's worst int8 node: 0.029)
CALIBRATION_TOKENS = 4096  # real tokens emulated at most; more sentences than that add time, not precision
_BATCH = 8
_EPS = 1e-6  # an all-zero row keeps a finite scale


@dataclass
class _Site:
    """A node whose weight int8 would quantize: a MatMul with a constant 2-D B, or a contrib Attention."""

    node: Any  # onnx.NodeProto
    weight: Any  # onnx.TensorProto, read when emulating
    per_token: bool  # a MatMul can take a scale per token; Attention's bias is inside the op, so it cannot
    sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # squared error: per batch, per token; |y|^2

    def errors(self) -> tuple[float, float]:
        """Relative output error with one scale per batch, and with one per token (inf where not possible)."""
        norm = max(self.sums[2], 1e-30)
        return float(np.sqrt(self.sums[0] / norm)), float(np.sqrt(self.sums[1] / norm)) if self.per_token else np.inf


def quantize_int8(fp32_model: Path, out_model: Path, encoder: TextEncoder, texts: list[str], external: bool,
                  progress: Callable[[str], None]) -> str:
    """Quantize ``fp32_model`` into ``out_model``, calibrated on ``texts``; how, in one line for the manifest."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Without the weights: they stay where they are (external data beside the model) until a node needs them.
    model = onnx.load(str(fp32_model), load_external_data=False)
    sites = _sites(model.graph)
    if sites:
        _calibrate(model, sites, fp32_model.parent, encoder, texts, progress)
    keep = [s for s in sites if min(s.errors()) > KEEP_FP32_ERROR]
    scaled = [s for s in sites if s not in keep and s.errors()[0] >= ROW_GAIN * s.errors()[1]]
    _scale_per_token(model, scaled)
    progress("quantizing weights to int8")
    # The rewritten graph sits beside the fp32 one, so that its external data references still resolve.
    fd, staged = tempfile.mkstemp(prefix=".per-token-", suffix=".onnx", dir=fp32_model.parent)
    os.close(fd)
    try:
        onnx.save(model, staged)
        # ONNX shape inference does not know the fused contrib ops: tensors of unknown type are float.
        quantize_dynamic(staged, str(out_model), weight_type=QuantType.QInt8, per_channel=True,
                         nodes_to_exclude=[s.node.name for s in keep], use_external_data_format=external,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    finally:
        os.remove(staged)
    matmuls = sum(s.per_token for s in sites)
    ops = [s.node.op_type for s in keep]
    kept = ", ".join(f"{op} x{ops.count(op)}" for op in dict.fromkeys(ops)) or "none"
    return (f"int8: dynamic, per-channel weights; a scale per token at {len(scaled)} of {matmuls} MatMul inputs; "
            f"kept fp32: {kept}")


def _sites(graph: Any) -> list[_Site]:
    """The MatMul and Attention nodes quantize_dynamic turns into int8, each with a name (exclusion is by name)."""
    initializers = {t.name: t for t in graph.initializer}
    sites = []
    for number, node in enumerate(graph.node):
        weight = initializers.get(node.input[1]) if len(node.input) > 1 else None
        if weight is None or len(weight.dims) != 2 or node.input[0] in initializers:
            continue
        matmul = node.op_type == "MatMul" and node.domain in ("", "ai.onnx")
        if matmul or (node.op_type == "Attention" and node.domain == "com.microsoft"):
            node.name = node.name or f"int8_site_{number}"
            sites.append(_Site(node, weight, per_token=matmul))
    return sites


def _calibrate(model: Any, sites: list[_Site], folder: Path, encoder: TextEncoder, texts: list[str],
               progress: Callable[[str], None]) -> None:
    """Run the fp32 graph on ``texts`` with every site's input as an extra output, and emulate each site's int8."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    outputs = len(model.graph.output)
    wanted = list(dict.fromkeys(s.node.input[0] for s in sites))
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                              for name in wanted if name not in known)
    fd, probe = tempfile.mkstemp(prefix=".calibration-", suffix=".onnx", dir=folder)
    os.close(fd)
    try:
        onnx.save(model, probe)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(probe, options, providers=["CPUExecutionProvider"])
    finally:
        os.remove(probe)
        del model.graph.output[outputs:]
    inputs = [i.name for i in session.get_inputs()]
    weights = [numpy_helper.to_array(s.weight, base_dir=str(folder)).astype(np.float32) for s in sites]
    tokens = encoder.encode(texts)
    seen = 0
    for start in range(0, len(tokens), _BATCH):
        if seen >= CALIBRATION_TOKENS:
            break
        batch = encoder.pad(tokens[start : start + _BATCH])
        seen += int(batch.mask.sum())
        values = dict(zip(wanted, session.run(wanted, feeds(batch, inputs))))
        real = batch.mask.astype(bool)
        for site, weight in zip(sites, weights):
            x = values[site.node.input[0]]
            rows = x[real] if x.shape[:2] == real.shape else x.reshape(-1, x.shape[-1])
            _emulate(site, rows.astype(np.float32), weight)
        progress(f"measuring int8 error per node {min(start + _BATCH, len(tokens))}/{len(tokens)} sentences")


def _emulate(site: _Site, x: np.ndarray, weight: np.ndarray) -> None:
    """Add one batch's squared int8 errors to ``site``: ORT's dynamic uint8 activations over the batch, symmetric
    int8 weights per output column, with the input as it is and (for a MatMul) divided by each row's magnitude."""
    exact = x @ weight
    scale = np.abs(weight).max(axis=0, keepdims=True) / 127
    scale[scale == 0] = 1
    weight_q = np.clip(np.round(weight / scale), -127, 127) * scale
    site.sums[0] += float(np.sum((_fake_uint8(x) @ weight_q - exact) ** 2))
    if site.per_token:
        rows = np.maximum(np.abs(x).max(axis=1, keepdims=True), _EPS)
        site.sums[1] += float(np.sum((_fake_uint8(x / rows) @ weight_q * rows - exact) ** 2))
    site.sums[2] += float(np.sum(exact**2))


def _fake_uint8(x: np.ndarray) -> np.ndarray:
    """``x`` through DynamicQuantizeLinear and back: one asymmetric uint8 scale over the whole tensor."""
    low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (high - low) / 255 or 1.0
    zero = np.round(-low / scale)
    return (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale


def _scale_per_token(model: Any, sites: list[_Site]) -> None:
    """Rewrite each site's MatMul as (x / r) @ W * r, r = each row's largest magnitude: the dynamic quantization of
    x / r then gets the resolution of a scale per token. MatMuls reading one tensor share its r."""
    from onnx import helper, numpy_helper

    if not sites:
        return
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    graph.initializer.append(numpy_helper.from_array(np.array(_EPS, np.float32), "int8_token_scale_eps"))
    if opset >= 18:  # the reduction axes moved from an attribute to an input in opset 18
        graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), "int8_token_scale_axes"))

    def reduce(op: str, x: str, out: str) -> Any:
        name = out.replace("/high", "/ReduceMax").replace("/low", "/ReduceMin")
        if opset >= 18:
            return helper.make_node(op, [x, "int8_token_scale_axes"], [out], name=name, keepdims=1)
        return helper.make_node(op, [x], [out], name=name, axes=[-1], keepdims=1)

    prefixes: dict[str, str] = {}  # input tensor -> the name prefix of its scaling nodes
    chosen = {id(s.node) for s in sites}
    nodes = []
    for node in graph.node:
        if id(node) not in chosen:
            nodes.append(node)
            continue
        x = node.input[0]
        if x not in prefixes:  # |x| per row as max(max x, -min x): two reads, no |x| tensor written
            p = prefixes[x] = f"int8_token_scale_{len(prefixes)}"
            nodes += [reduce("ReduceMax", x, f"{p}/high"), reduce("ReduceMin", x, f"{p}/low"),
                      helper.make_node("Neg", [f"{p}/low"], [f"{p}/neg_low"], name=f"{p}/Neg"),
                      helper.make_node("Max", [f"{p}/high", f"{p}/neg_low", "int8_token_scale_eps"], [f"{p}/r"],
                                       name=f"{p}/Max"),
                      helper.make_node("Reciprocal", [f"{p}/r"], [f"{p}/inverse"], name=f"{p}/Reciprocal"),
                      helper.make_node("Mul", [x, f"{p}/inverse"], [f"{p}/x"], name=f"{p}/Divide")]
        p, output = prefixes[x], node.output[0]
        node.input[0], node.output[0] = f"{p}/x", f"{node.name}/per_token"
        nodes += [node, helper.make_node("Mul", [node.output[0], f"{p}/r"], [output], name=f"{node.name}/Rescale")]
    del graph.node[:]
    graph.node.extend(nodes)
