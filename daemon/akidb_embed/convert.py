"""``akidb-embed convert``: a sentence-transformers / HF model folder → model.onnx + tokenizer.json + manifest.

torch, transformers and sentence-transformers are imported inside functions only: the daemon imports this
package and must never pull torch in. The manifest is written only after the exported model, run the way the
daemon runs it (its tokenizer wrapper, onnxruntime, its numpy pooling), matches sentence-transformers.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
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

from .manifest import ID_PATTERN, POOLINGS, load_manifest
from .pooling import l2_normalize, pool
from .tokenize import TextEncoder

logger = logging.getLogger(__name__)

FP32_MIN_COSINE = 0.9999
INT8_MEAN_COSINE = 0.99
OPSET = 18
EXTERNAL_DATA_BYTES = 1_500_000_000  # protobuf caps one file at 2 GiB: switch to external data well before that
# Resident memory ≈ the weights once, ORT's optimized/prepacked copies of the big matrices, and activations of a
# batch at max_length: 2.5 × the ONNX file is a rough figure on the safe side for encoders of this size.
MEMORY_FACTOR = 2.5
_POOLING_NAMES = {"mean": "mean", "mean_tokens": "mean", "cls": "cls", "cls_token": "cls", "lasttoken": "last_token"}
_MODULES = ("Transformer", "Pooling", "Normalize")
_FAMILIES = (("minilm", "minilm"), ("bge", "bge"), (r"(?<![a-z0-9])e5(?![a-z0-9])", "e5"), ("qwen3.*embed", "qwen3-embedding"))
_GENERIC_DIR = re.compile(r"^(model|models|snapshot|[0-9a-f]{40})$")
_INSTALL = "pip install 'akidb-embed[convert]' (on this machine install torch==2.13.0 first)"

_BASE_SENTENCES = (
    "Hello!", "Yes.", "The cat sat on the mat.", "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "How do I reset my password if I no longer have access to my email?",
    "Rinse the rice, add two cups of water, bring it to a boil, then simmer for 18 minutes.",
    "The meeting was moved from 9:30 a.m. to 2:15 p.m. on Friday, March 14th.",
    "Revenue grew 12.5% year over year to $4.2 billion, beating analyst estimates.",
    "Don't forget: the library closes early (at 5 pm) on public holidays!",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The patient reported mild chest pain, shortness of breath, and fatigue after exercise.",
    "Embedding models map text to vectors so that similar meanings end up close together.",
    "She didn't say he stole the money; she said he borrowed it, which is a different claim.",
    "Error 404: the requested page could not be found on this server.",
    "In 1969, Apollo 11 landed on the Moon and Neil Armstrong took the first steps on its surface.",
    "Is it safe to run a lithium battery at -20 °C, or will the capacity drop permanently?",
    "The train to Berlin departs from platform 7 at 06:45 and arrives at 11:02.",
    "Quantum computers use qubits, which can exist in a superposition of states.",
    "Terms and conditions apply; see www.example.com/terms for details.",
    "Our daemon serves several ONNX models over a ZeroMQ socket on a small ARM board.",
    "The quick brown fox jumps over the lazy dog.",
)
# All of them joined make one real text of ~350 tokens, which exercises truncation at max_length.
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


def convert(
    src: Path,
    model_id: str,
    out_dir: Path,
    manifest_dir: Path | None = None,
    quantize: str | None = None,
    sentences: Sequence[str] | None = None,
    progress: Callable[[str], None] = logger.info,
    *,
    max_length: int | None = None,
    pooling: str | None = None,
) -> tuple[Path, ConversionReport]:
    """Convert ``src`` into ``out_dir``, check parity, write ``<model_id>.toml``; return its path and the figures."""
    started = time.monotonic()
    src, out_dir = Path(src).resolve(), Path(out_dir).resolve()
    manifest_dir = Path(manifest_dir).resolve() if manifest_dir else out_dir
    _check_args(src, model_id, quantize, pooling, max_length)
    info = _inspect(src, max_length, pooling)
    texts = list(sentences or DEFAULT_SENTENCES)
    torch, sentence_transformer = _require()
    progress(f"loading {src}")
    try:
        st = sentence_transformer(str(src), device="cpu", local_files_only=True, model_kwargs={"dtype": torch.float32})
    except (OSError, ValueError) as exc:
        raise ConversionError(f"sentence-transformers cannot load {src} ({exc}); is it a complete model folder?") from None
    st.max_seq_length = info["max_length"]  # so an overridden max_length truncates the reference too
    reference = st.encode(texts, batch_size=8, convert_to_numpy=True)
    model = st[0].auto_model.eval()  # the very AutoModel sentence-transformers just ran: same weights and config
    params = sum(p.numel() for p in model.parameters())
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Everything is built and checked in a sibling temp folder, then renamed in: failures leave nothing behind.
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.converting-", dir=out_dir.parent))
    try:
        final, external = staging / "out", params * 4 > EXTERNAL_DATA_BYTES
        exported = (staging / "fp32" if quantize else final) / "model.onnx"
        exported.parent.mkdir(exist_ok=True)
        final.mkdir(exist_ok=True)
        progress(f"exporting {type(model).__name__} ({params / 1e6:.1f}M parameters) to ONNX")
        with torch.no_grad():
            _export(torch, model, exported, external, progress)
        if quantize:
            progress("quantizing weights to int8")
            _quantize(exported, final / "model.onnx", external)
        shutil.copyfile(src / "tokenizer.json", final / "tokenizer.json")
        prefix = info["prompts"].get(info["default_prompt"], "")  # sentence-transformers' encode() prepends it
        got = _embed_onnx(final / "model.onnx", final / "tokenizer.json", [prefix + t for t in texts], info, progress)
        cosines = _parity(reference, got, texts, quantize is not None)
        size = sum(f.stat().st_size for f in final.glob("model.onnx*"))
        out_dir.mkdir(exist_ok=True)
        for item in final.iterdir():  # same filesystem, so each move is an atomic rename
            os.replace(item, out_dir / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    low, mean = min(cosines), sum(cosines) / len(cosines)
    progress("writing manifest")
    fields = {
        "id": model_id, "name": info["name"], "family": _guess_family(f"{info['name']} {model_id}", info["model_type"]),
        "params": params, "model": _relative(out_dir / "model.onnx", manifest_dir),
        "tokenizer": _relative(out_dir / "tokenizer.json", manifest_dir),
        "dimension": int(reference.shape[1]),  # the width the model really emits (hidden size; Dense heads refused)
        "max_length": info["max_length"], "pooling": info["pooling"], "normalize": info["normalize"],
        "padding_side": info["padding_side"], "memory_mb": math.ceil(size / 2**20 * MEMORY_FACTOR),
        "license": info["license"], "languages": info["languages"],
        "multilingual": len(info["languages"]) > 1 or None, "default_prompt": info["default_prompt"],
    }
    note = f"from {src}; {'int8' if quantize else 'fp32'} parity: min cosine {low:.6f}, mean {mean:.6f}"
    path = _write_manifest(manifest_dir, model_id, fields, info["prompts"], note)
    load_manifest(path)  # what we wrote must be what the daemon accepts
    return path, ConversionReport(cosines, low, mean, quantize is not None, time.monotonic() - started)


def _check_args(src: Path, model_id: str, quantize: str | None, pooling: str | None, max_length: int | None) -> None:
    """Refuse bad arguments before the slow part starts."""
    problems = [
        (not ID_PATTERN.match(model_id), f"id {model_id!r} must be letters, digits, '.', '_' or '-' (at most 128)"),
        (quantize not in (None, "int8"), f"quantize {quantize!r} is not supported; use int8 or leave it out"),
        (pooling not in (None, *POOLINGS), f"pooling {pooling!r} is not one of {', '.join(POOLINGS)}"),
        (max_length is not None and max_length <= 0, f"max_length must be positive, not {max_length}"),
        *((not (src / name).is_file(), f"{src / name} is missing; SRC must be a saved sentence-transformers/HF model "
           "folder with a fast tokenizer (AutoTokenizer.from_pretrained(...).save_pretrained(SRC))")
          for name in ("config.json", "tokenizer.json")),
    ]
    for failed, message in problems:
        if failed:
            raise ConversionError(message)


def _require() -> tuple[Any, Any]:
    """torch and SentenceTransformer, or a ConversionError saying what to install."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # conversion reads local folders only; never reach for the Hub
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it: fail here with the fix, not mid-export)
        import torch
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise ConversionError(f"conversion needs torch, transformers, sentence-transformers, onnxscript ({exc}); {_INSTALL}")
    return torch, SentenceTransformer


def _read_json(path: Path) -> Any:
    """A JSON file's contents, or {} when it does not exist."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{path}: cannot read it ({exc}); fix or remove the file") from None


def _inspect(src: Path, max_length: int | None, pooling: str | None) -> dict[str, Any]:
    """Manifest settings read from the model folder's config files (no torch)."""
    config, tok_config = _read_json(src / "config.json"), _read_json(src / "tokenizer_config.json")
    st_config = _read_json(src / "config_sentence_transformers.json")
    kinds = {m.get("type", "").rsplit(".", 1)[-1]: m.get("path", "") for m in _read_json(src / "modules.json") or []}
    if unknown := [kind for kind in kinds if kind not in _MODULES]:
        raise ConversionError(f"{src / 'modules.json'} has {', '.join(unknown)}: only {', '.join(_MODULES)} can be "
                              "served (the daemon pools token states itself); convert a model without those modules")
    readme = (src / "README.md").read_text(encoding="utf-8", errors="replace") if (src / "README.md").is_file() else ""
    front = _front_matter(readme)
    prompts = {k: v for k, v in (st_config.get("prompts") or {}).items() if v}
    default_prompt = st_config.get("default_prompt_name")
    return {
        "pooling": pooling or _pooling(src / (kinds.get("Pooling") or "1_Pooling") / "config.json"),
        "normalize": "Normalize" in kinds,
        "max_length": max_length or _max_length(src, config, tok_config),
        "padding_side": tok_config.get("padding_side", "right"),
        "name": _guess_name(src, config, readme),
        "model_type": str(config.get("model_type", "")),
        "license": (front.get("license") or [""])[0],
        "languages": front.get("language", []),
        "prompts": prompts,
        "default_prompt": default_prompt if default_prompt in prompts else None,
    }


def _pooling(path: Path) -> str:
    """The manifest pooling named by a sentence-transformers Pooling config (mean when there is none)."""
    cfg = _read_json(path)
    if isinstance(cfg.get("pooling_mode"), str):  # sentence-transformers >= 5 writes a single string
        modes = [cfg["pooling_mode"]]
    else:
        modes = [k.removeprefix("pooling_mode_") for k, v in cfg.items() if k.startswith("pooling_mode_") and v is True]
    if not modes:
        return "mean"  # what sentence-transformers itself does for a plain HF model
    if len(modes) != 1 or modes[0] not in _POOLING_NAMES:
        raise ConversionError(f"{path}: pooling {'+'.join(modes)} is not supported; the daemon pools mean, cls or "
                              "last token (pass --pooling only if the model was trained with one of those)")
    return _POOLING_NAMES[modes[0]]


def _max_length(src: Path, config: dict[str, Any], tok_config: dict[str, Any]) -> int:
    """sentence-transformers' max_seq_length, else the tokenizer's limit capped by the position table."""
    declared = _read_json(src / "sentence_bert_config.json").get("max_seq_length")
    if isinstance(declared, int) and declared > 0:
        return declared
    limit = int(config.get("max_position_embeddings") or 512)
    tok_limit = tok_config.get("model_max_length")
    # tokenizers without a real limit say 1e30; 8192 bounds the daemon's worst-case batch memory
    return int(min(tok_limit if isinstance(tok_limit, (int, float)) and tok_limit > 0 else limit, limit, 8192))


def _front_matter(readme: str) -> dict[str, list[str]]:
    """Top-level scalar and list fields of the card's YAML front matter (simple forms; no YAML dependency)."""
    match = re.match(r"---\s*\n(.*?)\n---", readme, re.S)
    fields: dict[str, list[str]] = {}
    key = None
    for line in match.group(1).splitlines() if match else []:
        if (item := re.match(r"\s*-\s+(.+)", line)) and key:
            fields[key].append(item.group(1).strip().strip("'\""))
        elif pair := re.match(r"([A-Za-z_]+):\s*(.*)", line):
            key = pair.group(1)
            fields[key] = [v.strip().strip("'\"") for v in pair.group(2).strip("[] ").split(",") if v.strip()]
        else:
            key = None
    return fields


def _guess_name(src: Path, config: dict[str, Any], readme: str) -> str:
    """HF cache repo name, else the folder's name, else the card's title, else config's _name_or_path."""
    for part in src.parts:
        if part.startswith("models--"):  # ~/.cache/huggingface/hub/models--org--name/snapshots/<hash>
            return part.removeprefix("models--").replace("--", "/")
    if not _GENERIC_DIR.match(src.name):
        return src.name
    title = re.search(r"^# (\S+)\s*$", readme, re.M)  # sentence-transformers cards open with "# <model name>"
    return title.group(1) if title else str(config.get("_name_or_path") or src.name)


def _guess_family(text: str, model_type: str) -> str:
    """A family from well-known names, else the config's model_type ("bert" for BERT models)."""
    lowered = text.lower()
    return next((family for pattern, family in _FAMILIES if re.search(pattern, lowered)), model_type or "bert")


def _export(torch: Any, model: Any, path: Path, external: bool, progress: Callable[[str], None]) -> None:
    """Export last_hidden_state, batch and sequence dynamic: dynamo exporter, legacy tracer as a fallback."""
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
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0  # a padded row, so no "mask is all ones" shortcut can be traced in
    args = tuple({"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}[n] for n in names)
    common = {"input_names": names, "output_names": ["last_hidden_state"], "opset_version": OPSET}
    dim = {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")}
    try:  # dynamic_shapes nests one level: forward's single *tensors parameter holds all the inputs
        torch.onnx.export(Hidden().eval(), args, str(path), dynamo=True, external_data=external, verbose=False,
                          dynamic_shapes=((dim,) * len(names),), **common)
    except Exception as exc:  # the legacy tracer still handles some architectures torch.export rejects
        lines = [line for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        progress(f"dynamo export failed ({next((x for x in lines if x.startswith('<class')), lines[0])}); "
                 "retrying with the legacy exporter")
        for stale in path.parent.iterdir():
            stale.unlink()
        try:
            torch.onnx.export(Hidden().eval(), args, str(path), dynamo=False,
                              dynamic_axes={n: {0: "batch", 1: "sequence"} for n in [*names, "last_hidden_state"]}, **common)
        except Exception as again:
            raise ConversionError(f"torch.onnx.export failed with both exporters ({again}); this architecture "
                                  "needs another torch/transformers version") from exc


def _quantize(fp32: Path, int8: Path, external: bool) -> None:
    """Dynamic int8 quantization of the weights (activations stay float, so no calibration data is needed)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, use_external_data_format=external)


def _embed_onnx(model: Path, tokenizer: Path, texts: list[str], info: dict[str, Any],
                progress: Callable[[str], None]) -> np.ndarray:
    """Embed ``texts`` the way the daemon does: its tokenizer wrapper, onnxruntime on CPU, its numpy pooling."""
    import onnxruntime as ort

    encoder = TextEncoder(tokenizer, info["max_length"], info["padding_side"])
    try:
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ConversionError(f"onnxruntime cannot load the exported {model.name} ({exc}); try another torch") from None
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


def _relative(target: Path, manifest_dir: Path) -> str:
    """Relative to the manifest folder when inside it, else absolute (a ../.. path breaks silently on a move)."""
    return target.relative_to(manifest_dir).as_posix() if target.is_relative_to(manifest_dir) else str(target)


def _toml(value: Any) -> str:
    """One TOML value: a string, bool, int or list of those."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    # JSON's string escapes are all valid TOML basic-string escapes; TOML also forbids a raw DEL
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")


def _write_manifest(manifest_dir: Path, model_id: str, fields: dict[str, Any], prompts: dict[str, str],
                    note: str) -> Path:
    """Hand-format the manifest TOML and put it in place with an atomic rename."""
    lines = [f"# {model_id}: written by `akidb-embed convert` ({note}).", "# Relative paths are from this folder.", ""]
    lines += [f"{key} = {_toml(value)}" for key, value in fields.items() if value not in (None, "", [])]
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
    print(f"wrote {path}")
    print(f"parity ({'int8' if report.quantized else 'fp32'}, {len(report.cosines)} sentences): min cosine "
          f"{report.min_cosine:.6f}, mean {report.mean_cosine:.6f}; {report.seconds:.1f}s")
    return 0
