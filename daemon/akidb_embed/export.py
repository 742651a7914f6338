"""Convert's graph step: the transformer exported to ONNX, fused for ONNX Runtime, checked, then int8 or fp16.

Two exporters. The fused path traces the model with the TorchScript exporter (opset 17) under eager attention,
because that is the graph ONNX Runtime's transformer optimizer knows how to fuse: on all-MiniLM-L6-v2 it fuses
Attention, EmbedLayerNormalization, BiasGelu and SkipLayerNormalization, where in the dynamo exporter's graph it
finds SkipLayerNorm/BiasGelu only. The plain path is the dynamo exporter (opset 18), for ``--no-fuse`` and as the
fallback when tracing or fusing fails, or the fused graph misses parity. Both export ``last_hidden_state`` with
dynamic batch and sequence axes. The fp32 graph passes the fp32 gate before an int8 or fp16 graph is made from it.

torch and onnxruntime's tools are imported inside functions only: the daemon imports this package and must never
pull torch in.
"""

from __future__ import annotations

import contextlib
import inspect
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .modelfolder import ConversionError
from .parity import Yardstick

FUSED_OPSET = 17  # the TorchScript exporter's patterns that ORT's optimizer was written for
PLAIN_OPSET = 18  # LayerNormalization is a single op from 17 on
EXTERNAL_DATA_BYTES = 1_500_000_000  # protobuf caps one file at 2 GiB: switch to external data well before that
_OPTIMIZER_TYPES = {"qwen3": "qwen3"}  # config.model_type -> ORT optimizer model_type; any other: "bert"
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class Graph:
    """A checked graph ready to publish: its folder (model.onnx, perhaps with external data), what was fused in it,
    its cosines against sentence-transformers, and notes on how it was made."""

    folder: Path
    fusions: dict[str, int]  # empty: not fused
    cosines: np.ndarray
    notes: list[str] = field(default_factory=list)


def build(model: Any, staging: Path, fuse: bool, precision: str, yardstick: Yardstick,
          progress: Callable[[str], None]) -> Graph:
    """The checked graph of ``model`` at ``precision`` (fp32, int8 or fp16), built in ``staging``."""
    import torch

    params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        graph = _fp32_graph(torch, model, staging, params * 4 > EXTERNAL_DATA_BYTES, fuse, yardstick, progress)
    graph.notes.append(f"fused: {describe(graph.fusions)}" if fuse else "not fused (--no-fuse)")
    if precision == "fp32":
        return graph
    out = staging / precision / "model.onnx"
    out.parent.mkdir()
    if precision == "fp16":
        progress("casting weights and activations to fp16 (inputs and output stay as they are)")
        to_fp16(graph.folder / "model.onnx", out, params * 2 > EXTERNAL_DATA_BYTES)
        graph.notes.append("fp16: weights and activations, float32 output")
    else:
        from .quantize import quantize_int8
        from .tokenize import TextEncoder

        encoder = TextEncoder(yardstick.tokenizer, yardstick.max_length, yardstick.padding_side)
        graph.notes.append(quantize_int8(graph.folder / "model.onnx", out, encoder, yardstick.texts,
                                         params * 4 > EXTERNAL_DATA_BYTES, progress))
    cosines, miss = yardstick.check(out, precision)
    if miss:
        raise ConversionError(f"parity check failed against sentence-transformers: {miss}. Nothing was written. "
                              "The fp32 graph passed: convert without --quantize/--precision")
    return Graph(out.parent, graph.fusions, cosines, graph.notes)


def input_names(model: Any, padding_side: str) -> list[str]:
    """The inputs to export: those ``model`` takes of input_ids, attention_mask, token_type_ids, plus position_ids for
    a left-padded rotary model (Qwen3): the daemon feeds positions counted from each row's first real token, so a
    padded row computes exactly what the text alone does. Rotary positions are relative, so this keeps parity with
    sentence-transformers' own batches; an absolute position table (BERT) would not, so it keeps its own positions."""
    accepted = inspect.signature(model.forward).parameters
    names = [name for name in _INPUTS if name in accepted]
    rotary = getattr(model, "rotary_emb", None) is not None  # the transformers convention for RoPE models
    return names + ["position_ids"] if padding_side == "left" and rotary and "position_ids" in accepted else names


def export_plain(torch: Any, model: Any, names: list[str], padding_side: str, path: Path, external: bool) -> None:
    """Export with torch's dynamo exporter: the graph as torch.export sees it, unfused."""
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # axis-renaming and deprecation warnings: noise between the progress lines
        # dynamic_shapes nests one level: forward's single *tensors parameter holds all the inputs
        torch.onnx.export(_last_hidden_state(torch, model, names), _sample(torch, names, padding_side), str(path),
                          dynamo=True, external_data=external, verbose=False, input_names=names,
                          output_names=["last_hidden_state"], opset_version=PLAIN_OPSET,
                          dynamic_shapes=((dims,) * len(names),))


def export_traced(torch: Any, model: Any, names: list[str], padding_side: str, path: Path) -> None:
    """Export with the TorchScript exporter under eager attention: the graph ORT's transformer optimizer can fuse
    (over 2 GB, torch writes the weights as external data by itself)."""
    axes = {name: {0: "batch", 1: "sequence"} for name in [*names, "last_hidden_state"]}
    with _eager_attention(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings: noise between the progress lines
        torch.onnx.export(_last_hidden_state(torch, model, names), _sample(torch, names, padding_side), str(path),
                          dynamo=False, input_names=names, output_names=["last_hidden_state"],
                          opset_version=FUSED_OPSET, dynamic_axes=axes)


def fuse(src: Path, out: Path, config: Any, padding_side: str, external: bool) -> dict[str, int]:
    """Apply ONNX Runtime's transformer fusions to ``src`` and save the result; the fused operators and their counts."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    kind = _OPTIMIZER_TYPES.get(config.model_type, "bert")
    options = FusionOptions(kind)
    if kind != "bert" or padding_side != "right":
        # ORT's default masks assume right padding (bert: sequence lengths) or none at all (qwen3): pass the real one.
        options.use_raw_attention_mask()
    # Its RotaryEmbedding caches 131072 positions (+64 MiB fp32 at head_dim 128); a mid-size Qwen3 ran no faster.
    options.enable_rotary_embeddings = False
    # ORT's CPU SkipLayerNormalization kernel is slower than Add + LayerNormalization (MiniLM bulk: fp32 5 %, int8
    # 15 % slower); a GPU session fuses it at load, where its kernel is the fast one (backend.py). Measured on BERT
    # only: decoders keep their SkipSimplifiedLayerNormalization.
    options.enable_skip_layer_norm = kind != "bert"
    # opt_level 0: Python fusions only; ORT's own graph optimizations run when the daemon loads the model.
    fused = optimize_model(str(src), model_type=kind, num_heads=config.num_attention_heads,
                           hidden_size=config.hidden_size, optimization_options=options, opt_level=0)
    fused.save_model_to_file(str(out), use_external_data_format=external)
    return {op: count for op, count in fused.get_fused_operator_statistics().items() if count}


def to_fp16(src: Path, out: Path, external: bool) -> None:
    """Cast the weights and activations of ``src`` to fp16; inputs and the output keep their types (float32 out)."""
    import onnx
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(onnx.load(str(src)))
    model.convert_float_to_float16(keep_io_types=True)
    model.save_model_to_file(str(out), use_external_data_format=external)


def describe(fusions: dict[str, int]) -> str:
    """'Attention x6, BiasGelu x6', or 'none'."""
    return ", ".join(f"{op} x{count}" for op, count in fusions.items()) or "none"


def _fp32_graph(torch: Any, model: Any, staging: Path, external: bool, fuse: bool, yardstick: Yardstick,
                progress: Callable[[str], None]) -> Graph:
    """The fused graph if asked and it keeps fp32 parity, else the plain export (a ConversionError if that misses)."""
    names = input_names(model, yardstick.padding_side)
    fused = _fused_graph(torch, model, names, staging, external, yardstick.padding_side, progress) if fuse else None
    if fused is not None:
        cosines, miss = yardstick.check(fused[0] / "model.onnx", "fp32")
        if miss is None:
            return Graph(fused[0], fused[1], cosines)
        progress(f"the fused graph misses parity ({miss}); falling back to the unfused export")
    path = staging / "plain" / "model.onnx"
    path.parent.mkdir()
    progress("exporting with torch's dynamo exporter (unfused)")
    try:
        export_plain(torch, model, names, yardstick.padding_side, path, external)
    except Exception as exc:  # torch's message is pages long: keep it chained, name the cause here
        raise ConversionError(f"torch.onnx.export failed ({type(exc).__name__}); this architecture needs another "
                              "torch/transformers version (the chained exception has the details)") from exc
    cosines, miss = yardstick.check(path, "fp32")
    if miss:
        raise ConversionError(f"parity check failed against sentence-transformers: {miss}. Nothing was written. "
                              "Check the pooling/normalize settings")
    return Graph(path.parent, {}, cosines)


def _fused_graph(torch: Any, model: Any, names: list[str], staging: Path, external: bool, padding_side: str,
                 progress: Callable[[str], None]) -> tuple[Path, dict[str, int]] | None:
    """The folder of the traced and fused graph, and its fusions; None, with a progress line saying why, when that
    path fails."""
    traced, fused = staging / "traced" / "model.onnx", staging / "fused" / "model.onnx"
    traced.parent.mkdir()
    fused.parent.mkdir()
    try:
        progress("tracing with the TorchScript exporter (eager attention), for fusion")
        export_traced(torch, model, names, padding_side, traced)
        progress("fusing operators with ONNX Runtime's transformer optimizer")
        fusions = fuse(traced, fused, model.config, padding_side, external)
    except Exception as exc:  # an architecture the tracer or the optimizer cannot take: the plain export may still
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else "no message"
        progress(f"the fused export failed ({type(exc).__name__}: {reason}); falling back to the unfused export")
        return None
    finally:
        shutil.rmtree(traced.parent, ignore_errors=True)  # a big model's trace is gigabytes
    progress(f"fused: {describe(fusions)}")
    return fused.parent, fusions


@contextlib.contextmanager
def _eager_attention(model: Any) -> Iterator[None]:
    """Attention as plain MatMul/Softmax ops for the tracer (SDPA traces to one op no fusion matches), then back."""
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def _sample(torch: Any, names: list[str], padding_side: str) -> tuple[Any, ...]:
    """Inputs to trace with: two rows, one padded on ``padding_side``, so no "no padding" shortcut is baked in."""
    ids = torch.full((2, 16), 100, dtype=torch.long)
    real = torch.arange(16) < torch.tensor([[16], [10]])
    mask = (real if padding_side == "right" else real.flip(1)).long()
    tensors = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
               "position_ids": (mask.cumsum(1) - 1).clamp(min=0)}
    return tuple(tensors[name] for name in names)


def _last_hidden_state(torch: Any, model: Any, names: list[str]) -> Any:
    """``model`` as a module of positional tensors returning last_hidden_state only (BertModel also returns a pooler
    output we don't serve; decoders run without a cache)."""
    extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}

    class Hidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *tensors: Any) -> Any:
            return self.model(**dict(zip(names, tensors)), **extra).last_hidden_state

    return Hidden().eval()
