"""``akidb-embed convert``: a sentence-transformers / HF model folder → model.onnx + tokenizer.json + manifest.

torch & co. are imported inside functions only: the daemon imports this package and must never pull torch in.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .footprint import Request, measure_in_child
from .manifest import ID_PATTERN, POOLINGS, load_manifest
from .memory import MIB
from .pooling import l2_normalize, pool
from .settings import Limits
from .tokenize import TextEncoder

logger = logging.getLogger(__name__)

FP32_MIN_COSINE = 0.9999
INT8_MEAN_COSINE = 0.99
OPSET = 18  # LayerNormalization is a single op from 17 on
EXTERNAL_DATA_BYTES = 1_500_000_000  # protobuf caps one file at 2 GiB: switch to external data well before that
_POOLING_NAMES = {"mean": "mean", "mean_tokens": "mean", "cls": "cls", "cls_token": "cls", "lasttoken": "last_token"}
_MODULES = ("Transformer", "Pooling", "Normalize")
_FAMILIES = (("minilm", "minilm"), ("bge", "bge"), (r"\be5\b", "e5"), ("qwen3.*embed", "qwen3-embedding"))
_GENERIC_DIR = re.compile(r"^(model|models|snapshot|[0-9a-f]{40})$")  # folder names that don't name the model
_BASE_SENTENCES = (
    "Hello!", "Yes.", "Good morning, everyone.", "The cat sat on the mat.", "What is the capital of France?",
    "Paris is the capital and largest city of France.", "How do I reset my password without my email?",
    "Rinse the rice, add two cups of water, then simmer for 18 minutes.", "Error 404: page not found.",
    "The meeting moved from 9:30 a.m. to 2:15 p.m. on Friday, March 14th.", "I can't believe it's already 2025!",
    "Revenue grew 12.5% year over year to $4.2 billion.", "Don't forget: the library closes early (5 pm) today!",
    "Photosynthesis turns light into chemical energy.", "She said he borrowed it; he didn't steal it.",
    "The patient reported chest pain, shortness of breath, and fatigue.", "Apollo 11 landed on the Moon in 1969.",
    "Is it safe to charge a lithium battery at -20 °C?", "The train to Berlin leaves from platform 7 at 06:45.",
    "Quantum computers use qubits that can be in a superposition of states.", "See www.example.com/terms for details.",
    "Embedding models map text to vectors so that similar meanings end up close together.",
    "Our daemon serves ONNX models over a ZeroMQ socket on a small ARM board, without any network connection.",
)
# All of them joined make one real text of over 300 tokens, which exercises truncation at max_length.
DEFAULT_SENTENCES: tuple[str, ...] = (*_BASE_SENTENCES, " ".join(_BASE_SENTENCES))


class ConversionError(Exception):
    """A conversion that cannot proceed or failed its parity check; the message names cause and fix."""


@dataclass(frozen=True)
class ConversionReport:
    """Parity of the exported model against sentence-transformers, and the conversion's duration."""
    cosines: list[float]
    min_cosine: float
    mean_cosine: float
    quantized: bool
    seconds: float


def convert(src: Path, model_id: str, out_dir: Path, manifest_dir: Path | None = None, quantize: str | None = None,
            sentences: Sequence[str] | None = None, progress: Callable[[str], None] = logger.info, *,
            max_length: int | None = None, pooling: str | None = None) -> tuple[Path, ConversionReport]:
    """Convert ``src`` into ``out_dir``, check parity, write ``<model_id>.toml``; return its path and the figures."""
    started = time.monotonic()
    src, out_dir = Path(src).resolve(), Path(out_dir).resolve()
    manifest_dir = Path(manifest_dir).resolve() if manifest_dir else out_dir
    info = _inspect(src, model_id, quantize, max_length, pooling)
    texts = list(sentences or DEFAULT_SENTENCES)
    torch, sentence_transformer = _require()
    progress(f"loading {src}")
    st = sentence_transformer(str(src), device="cpu", local_files_only=True, model_kwargs={"dtype": torch.float32})
    st.max_seq_length = info["max_length"]  # so an overridden max_length truncates the reference too
    reference = st.encode(texts, batch_size=8, convert_to_numpy=True)
    model = st[0].auto_model.eval()  # the very AutoModel sentence-transformers just ran: same weights and config
    params = sum(p.numel() for p in model.parameters())
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Everything is built and checked in a sibling temp folder, then renamed in: a failure leaves nothing behind.
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.converting-", dir=out_dir.parent))
    try:
        final, external = staging / "out", params * 4 > EXTERNAL_DATA_BYTES
        exported = (staging if quantize else final) / "model.onnx"  # only final/ is published
        final.mkdir()
        progress(f"exporting {type(model).__name__} ({params / 1e6:.1f}M parameters) to ONNX")
        with torch.no_grad():
            _export(torch, model, exported, external)
        if quantize:  # per-channel weight scales: per-tensor int8 gave mean cosine 0.956 on all-MiniLM-L6-v2
            progress("quantizing weights to int8")
            from onnxruntime.quantization import QuantType, quantize_dynamic
            quantize_dynamic(str(exported), str(final / "model.onnx"), weight_type=QuantType.QInt8, per_channel=True,
                             use_external_data_format=external)
        shutil.copyfile(src / "tokenizer.json", final / "tokenizer.json")
        shutil.copyfile(src / "config.json", final / "config.json")  # the shape the daemon's memory model starts from
        cosines = _parity(reference, _embed_onnx(final, texts, info, progress), texts, quantize is not None)
        progress("measuring memory: resident weights and the working memory of the worst batch")
        memory_mb = _measured_memory_mb(final, info, int(reference.shape[1]))
        out_dir.mkdir(exist_ok=True)
        for item in final.iterdir():  # same filesystem, so each move is an atomic rename
            os.replace(item, out_dir / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    low, mean = min(cosines), sum(cosines) / len(cosines)
    progress("writing manifest")
    # Inside the manifest folder paths are relative; elsewhere absolute (a ../.. path breaks silently on a move).
    where = {k: (out_dir / f).relative_to(manifest_dir).as_posix() if out_dir.is_relative_to(manifest_dir)
             else str(out_dir / f) for k, f in (("model", "model.onnx"), ("tokenizer", "tokenizer.json"))}
    fields = {"id": model_id, "name": info.pop("name"), "family": info.pop("family"), "params": params, **where,
              "dimension": int(reference.shape[1]),  # the width the model really emits (Dense heads are refused)
              **info, "memory_mb": memory_mb}
    path = _write_manifest(manifest_dir, fields, f"from {src}; {'int8' if quantize else 'fp32'} parity: min cosine "
                           f"{low:.6f}, mean {mean:.6f}")
    load_manifest(path)  # what we wrote must be what the daemon accepts
    return path, ConversionReport(cosines, low, mean, quantize is not None, time.monotonic() - started)


def _measured_memory_mb(folder: Path, info: dict[str, Any], dimension: int) -> int:
    """The charge the daemon will book at the default limits, measured as its first load does."""
    limits = Limits()
    request = Request(str(folder / "model.onnx"), str(folder / "tokenizer.json"), info["max_length"],
                      info["padding_side"], dimension, limits.work_mb, limits.max_batch, limits.batch_tokens, 0)
    try:
        return -(-measure_in_child(request).charge // MIB)  # rounded up
    except Exception as exc:
        raise ConversionError(f"the converted model could not be measured: {exc}") from None


def _require() -> tuple[Any, Any]:
    """torch and SentenceTransformer, or a ConversionError saying what to install."""
    for flag in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # local folders only: never reach for the Hub
        os.environ.setdefault(flag, "1")
    try:
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it: fail here with the fix, not mid-export)
        import torch
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise ConversionError(f"conversion needs torch, transformers, sentence-transformers, onnxscript ({exc}): "
                              "pip install 'akidb-embed[convert]' (on this machine install torch==2.13.0 first)")
    return torch, SentenceTransformer


def _read_json(path: Path) -> Any:
    """A JSON file's contents, or {} when it does not exist."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _inspect(src: Path, model_id: str, quantize: str | None, max_length: int | None, pooling: str | None) -> dict:
    """Check the arguments, then read the manifest settings from the folder's config files (before the slow part)."""
    if not ID_PATTERN.match(model_id) or quantize not in (None, "int8") or pooling not in (None, *POOLINGS) or (
            max_length is not None and max_length <= 0):
        raise ConversionError(f"bad arguments: id {model_id!r} (letters, digits, '.', '_', '-'), quantize {quantize!r} "
                              f"(int8 or none), pooling {pooling!r} ({', '.join(POOLINGS)} or none), max_length > 0")
    if missing := [str(src / n) for n in ("config.json", "tokenizer.json") if not (src / n).is_file()]:
        raise ConversionError(f"{', '.join(missing)} missing; SRC must be a saved sentence-transformers/HF model "
                              "folder with a fast tokenizer (AutoTokenizer.from_pretrained(...).save_pretrained(SRC))")
    config, tok_config = _read_json(src / "config.json"), _read_json(src / "tokenizer_config.json")
    kinds = {m.get("type", "").rsplit(".", 1)[-1]: m.get("path", "") for m in _read_json(src / "modules.json") or []}
    if unknown := [kind for kind in kinds if kind not in _MODULES]:
        raise ConversionError(f"{src / 'modules.json'} has {', '.join(unknown)}: only {', '.join(_MODULES)} can be "
                              "served (the daemon pools token states itself); convert a model without those modules")
    readme = (src / "README.md").read_text(encoding="utf-8", errors="replace") if (src / "README.md").is_file() else ""
    license_, languages = _card(readme)
    title = re.search(r"^# (\S+)\s*$", readme, re.M)  # sentence-transformers cards open with "# <model name>"
    fallback = title.group(1) if title else str(config.get("_name_or_path") or src.name)
    name = fallback if _GENERIC_DIR.match(src.name) else src.name
    limit = int(config.get("max_position_embeddings") or 512)  # tokenizers without a real limit say 1e30: cap it
    max_length = max_length or _read_json(src / "sentence_bert_config.json").get("max_seq_length") or int(
        min(tok_config.get("model_max_length") or limit, limit, 8192))  # 8192 bounds the daemon's batch memory
    st_config = _read_json(src / "config_sentence_transformers.json")
    prompts = {k: v for k, v in (st_config.get("prompts") or {}).items() if v}  # sentence-transformers lists empty ones
    info = {"name": name, "family": next((f for p, f in _FAMILIES if re.search(p, f"{name} {model_id}".lower())),
                                         config.get("model_type") or "bert"),
            "max_length": max_length,
            "pooling": pooling or _pooling(src / (kinds.get("Pooling") or "1_Pooling") / "config.json"),
            "normalize": "Normalize" in kinds, "padding_side": tok_config.get("padding_side", "right"),
            "license": license_, "languages": languages or None, "multilingual": len(languages) > 1 or None,
            "prompts": prompts or None}
    return {k: v for k, v in info.items() if v is not None}


def _card(readme: str) -> tuple[str | None, list[str]]:
    """License and languages from the model card's YAML front matter (simple forms only; no YAML dependency)."""
    front = m.group(1) + "\n" if (m := re.match(r"---\s*\n(.*?)\n---", readme, re.S)) else ""
    license_ = re.search(r"^license:[ \t]*['\"]?([\w.+-]+)", front, re.M)
    language = re.search(r"^language:[ \t]*(.*)\n((?:[ \t]*-.*\n)*)", front, re.M)  # "en", "[en, de]" or "- en" lines
    items = re.split(r"[,\n]", "\n".join(language.groups())) if language else []
    return (license_.group(1) if license_ else None), [x.strip(" -'\"[]") for x in items if x.strip(" -'\"[]")]


def _pooling(path: Path) -> str:
    """The manifest pooling named by a sentence-transformers Pooling config (mean when there is none)."""
    cfg = _read_json(path)  # sentence-transformers >= 5 writes one "pooling_mode" string, older ones flags
    modes = [cfg["pooling_mode"]] if isinstance(cfg.get("pooling_mode"), str) else [
        k.removeprefix("pooling_mode_") for k, v in cfg.items() if k.startswith("pooling_mode_") and v is True]
    modes = modes or ["mean"]  # what sentence-transformers itself does for a plain HF model
    if len(modes) != 1 or modes[0] not in _POOLING_NAMES:
        raise ConversionError(f"{path}: pooling {'+'.join(modes)} is not supported; the daemon pools mean, cls or "
                              "last token (pass --pooling only if the model was trained with one of those)")
    return _POOLING_NAMES[modes[0]]


def _export(torch: Any, model: Any, path: Path, external: bool) -> None:
    """Export last_hidden_state with dynamic batch and sequence axes (torch.export-based dynamo exporter)."""
    accepted = inspect.signature(model.forward).parameters
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in accepted]
    extra = {"use_cache": False} if "use_cache" in accepted else {}

    class Hidden(torch.nn.Module):  # last_hidden_state only: BertModel also returns a pooler output we don't serve
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *tensors: Any) -> Any:
            return self.model(**dict(zip(names, tensors)), **extra).last_hidden_state

    ids = torch.full((2, 16), 100, dtype=torch.long)
    mask = (torch.arange(16) < torch.tensor([[16], [10]])).long()  # a padded row: no "all ones" shortcut baked in
    args = tuple({"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}[n] for n in names)
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")}
    try:  # dynamic_shapes nests one level: forward's single *tensors parameter holds all the inputs
        torch.onnx.export(Hidden().eval(), args, str(path), dynamo=True, external_data=external, verbose=False,
                          input_names=names, output_names=["last_hidden_state"], opset_version=OPSET,
                          dynamic_shapes=((dims,) * len(names),))
    except Exception as exc:  # torch's message is pages long: keep it chained, name the cause here
        raise ConversionError(f"torch.onnx.export failed ({type(exc).__name__}); this architecture needs another "
                              "torch/transformers version (the chained exception has the details)") from exc


def _embed_onnx(folder: Path, texts: list[str], info: dict[str, Any], progress: Callable[[str], None]) -> np.ndarray:
    """Embed ``texts`` the way the daemon does: its tokenizer wrapper, onnxruntime on CPU, its numpy pooling."""
    import onnxruntime as ort  # a daemon dependency, but only this step needs it here
    encoder = TextEncoder(folder / "tokenizer.json", info["max_length"], info["padding_side"])
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs, vectors = {i.name for i in session.get_inputs()}, []
    for start in range(0, len(texts), 8):
        batch = encoder.pad(encoder.encode(texts[start : start + 8]))
        feeds = {"input_ids": batch.ids, "attention_mask": batch.mask, "token_type_ids": np.zeros_like(batch.ids)}
        states = session.run(["last_hidden_state"], {k: v for k, v in feeds.items() if k in inputs})[0]
        vectors.append(pool(states, batch.mask, info["pooling"]))
        progress(f"checking parity {min(start + 8, len(texts))}/{len(texts)}")
    embeddings = np.concatenate(vectors)
    return l2_normalize(embeddings) if info["normalize"] else embeddings


def _parity(reference: np.ndarray, got: np.ndarray, texts: list[str], quantized: bool) -> list[float]:
    """Per-sentence cosines; a ConversionError with the figures when they miss the fp32 or int8 bar."""
    cos = np.sum(l2_normalize(reference.astype(np.float64)) * l2_normalize(got.astype(np.float64)), axis=1)
    low, mean, worst = float(cos.min()), float(cos.mean()), int(np.argmin(cos))
    if (mean >= INT8_MEAN_COSINE) if quantized else (low >= FP32_MIN_COSINE):
        return [float(c) for c in cos]
    need = f"mean >= {INT8_MEAN_COSINE} for int8" if quantized else f"every cosine >= {FP32_MIN_COSINE} for fp32"
    raise ConversionError(f"parity check failed against sentence-transformers: min cosine {low:.6f}, mean {mean:.6f} "
                          f"(need {need}); worst sentence #{worst} (cosine {cos[worst]:.6f}): {texts[worst][:80]!r}. "
                          "Nothing was written. Check the pooling/normalize settings, or convert without --quantize")


def _toml(value: Any) -> str:
    """One TOML value: a string, bool, int or list of those."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, (bool, int)):
        return str(value).lower()  # true / false / 42
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")  # JSON escapes are TOML escapes


def _write_manifest(manifest_dir: Path, fields: dict[str, Any], note: str) -> Path:
    """Hand-format the manifest TOML and put it in place with an atomic rename."""
    prompts, model_id = fields.pop("prompts", {}), fields["id"]
    lines = [f"# {model_id}: written by `akidb-embed convert` ({note}).", "# Relative paths are from this folder.", ""]
    lines += [f"{key} = {_toml(value)}" for key, value in fields.items()]
    if prompts:  # a table must come after all top-level keys
        lines += ["", "[prompts]", *(f"{_toml(k)} = {_toml(v)}" for k, v in prompts.items())]
    manifest_dir.mkdir(parents=True, exist_ok=True)
    path, tmp = manifest_dir / f"{model_id}.toml", manifest_dir / f".{model_id}.toml.tmp"
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def add_parser(subparsers: Any) -> None:
    """Register ``convert`` on an argparse subparsers object."""
    parser = subparsers.add_parser("convert", help="convert a sentence-transformers model folder to ONNX + manifest")
    parser.add_argument("src", type=Path, help="model folder (config.json, *.safetensors, tokenizer.json, ...)")
    parser.add_argument("--id", required=True, help="model id; the manifest is written as <id>.toml")
    parser.add_argument("--out", type=Path, required=True, help="folder for model.onnx and tokenizer.json")
    parser.add_argument("--manifest-dir", type=Path, help="folder for the manifest (default: --out)")
    parser.add_argument("--quantize", choices=("int8",), help="dynamic int8 weight quantization")
    parser.add_argument("--max-length", type=int, help="token limit (default: the model's max_seq_length)")
    parser.add_argument("--pooling", choices=POOLINGS, help="override the pooling read from 1_Pooling/config.json")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """The ``convert`` command: progress on stderr, parity figures on stdout; 0 on success, 1 on failure."""
    try:
        path, report = convert(args.src, args.id, args.out, args.manifest_dir, args.quantize,
                               progress=lambda message: print(message, file=sys.stderr, flush=True),
                               max_length=args.max_length, pooling=args.pooling)
    except ConversionError as exc:
        print(f"akidb-embed convert: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path}\nparity ({'int8' if report.quantized else 'fp32'}, {len(report.cosines)} sentences): "
          f"min cosine {report.min_cosine:.6f}, mean {report.mean_cosine:.6f}; {report.seconds:.1f}s")
    return 0
