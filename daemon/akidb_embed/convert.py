"""``akidb-embed convert``: a sentence-transformers / HF model folder → model.onnx + tokenizer.json + manifest.

The steps: read the folder's settings (modelfolder.py), run sentence-transformers for the reference vectors, build
and check the graph (export.py: fused for ONNX Runtime unless ``--no-fuse``, then int8 or fp16 if asked; each
checked by parity.py), store the golden vectors of the daemon's load self-test (selftest.py), measure its memory,
then publish the files and the manifest. The manifest records how it
was made (its ``[conversion]`` table), so ``convert --again MANIFEST`` redoes it in one command.

torch & co. are imported inside functions only: the daemon imports this package and must never pull torch in.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import export
from .footprint import Request, measure_in_child
from .manifest import ID_PATTERN, POOLINGS, ManifestError, load_manifest, parse_manifest
from .memory import MIB
from .modelfolder import ConversionError, read_settings
from .parity import DEFAULT_SENTENCES, GATES, Yardstick, write_golden_vectors
from .selftest import GOLDEN_FILE
from .settings import Limits
from .tomlcompat import tomllib

__all__ = ["DEFAULT_SENTENCES", "GATES", "ConversionError", "ConversionReport", "add_parser", "convert",
           "convert_again", "run"]

logger = logging.getLogger(__name__)

PRECISION_CHOICES = ("fp32", "fp16")  # --precision; int8 is --quantize int8
# The manifest fields convert derives; convert --again keeps a manifest's other fields (default, pinned, ...).
_DERIVED_FIELDS = frozenset({"id", "name", "family", "params", "model", "tokenizer", "dimension", "precision",
                             "max_length", "pooling", "normalize", "padding_side", "license", "languages",
                             "multilingual", "prompts", "memory_mb", "conversion", "golden"})


@dataclass(frozen=True)
class ConversionReport:
    """Parity of the published model against sentence-transformers, what was fused, and the conversion's duration."""
    cosines: list[float]
    min_cosine: float
    mean_cosine: float
    precision: str  # fp32, int8 or fp16
    fusions: dict[str, int]  # empty: the graph is not fused
    seconds: float


def convert(src: Path, model_id: str, out_dir: Path, manifest_dir: Path | None = None, quantize: str | None = None,
            sentences: Sequence[str] | None = None, progress: Callable[[str], None] = logger.info, *,
            max_length: int | None = None, pooling: str | None = None, fuse: bool = True, precision: str = "fp32",
            extra_fields: Mapping[str, Any] | None = None) -> tuple[Path, ConversionReport]:
    """Convert ``src`` into ``out_dir``, check parity, write ``<model_id>.toml``; return its path and the figures.

    ``extra_fields`` go into the manifest as well (convert --again keeps a manifest's hand-set fields this way).
    """
    started = time.monotonic()
    src, out_dir = Path(src).resolve(), Path(out_dir).resolve()
    manifest_dir = Path(manifest_dir).resolve() if manifest_dir else out_dir
    _check_arguments(model_id, quantize, precision, max_length, pooling)
    info = read_settings(src, model_id, max_length, pooling)
    precision = "int8" if quantize else precision  # what the published graph is
    st, yardstick = _reference(src, info, list(sentences or DEFAULT_SENTENCES), progress)
    model = st[0].auto_model.eval()  # the very AutoModel sentence-transformers just ran: same weights and config
    params, dimension = sum(p.numel() for p in model.parameters()), int(yardstick.reference.shape[1])
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Everything is built and checked in a sibling temp folder, then renamed in: a failure leaves nothing behind.
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.converting-", dir=out_dir.parent))
    try:
        progress(f"exporting {type(model).__name__} ({params / 1e6:.1f}M parameters) to ONNX")
        graph = export.build(model, staging, fuse, precision, yardstick, progress)
        shutil.copyfile(src / "tokenizer.json", graph.folder / "tokenizer.json")
        shutil.copyfile(src / "config.json", graph.folder / "config.json")  # where the daemon's memory model starts
        golden = write_golden_vectors(st, yardstick, info.get("prompts") or {}, graph.folder, precision)
        progress("measuring memory: resident weights and the working memory of the worst batch")
        low, mean = float(graph.cosines.min()), float(graph.cosines.mean())
        paths = _paths(out_dir, manifest_dir)
        fields = {"id": model_id, "name": info["name"], "family": info["family"], "params": params,
                  "model": paths["model"], "tokenizer": paths["tokenizer"],
                  "dimension": dimension,  # what it emits (Dense heads are refused)
                  "precision": precision, **{k: v for k, v in info.items() if k not in ("name", "family")},
                  "memory_mb": _measured_memory_mb(graph.folder, info, dimension), **(extra_fields or {}),
                  "golden": {"file": paths["golden"], "min_cosine": golden},
                  "conversion": {"source": str(src), "fuse": fuse}}
        note = f"from {src}; {precision} parity: min cosine {low:.6f}, mean {mean:.6f}; {'; '.join(graph.notes)}"
        path, text = manifest_dir / f"{model_id}.toml", _manifest_text(fields, note)
        _validate(text, path)  # what we write must be what the daemon accepts: checked before anything is replaced
        _publish(graph.folder, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    progress("writing manifest")
    _write_atomically(path, text)
    return path, ConversionReport([float(c) for c in graph.cosines], low, mean, precision, graph.fusions,
                                  time.monotonic() - started)


def convert_again(manifest: Path, sentences: Sequence[str] | None = None,
                  progress: Callable[[str], None] = logger.info, **overrides: Any) -> tuple[Path, ConversionReport]:
    """Redo the conversion a manifest records: same source, id, folders and options, ``overrides`` replacing options
    (quantize, precision, fuse, max_length, pooling). Fields convert does not derive (default, pinned, ...) are kept."""
    try:
        recorded = load_manifest(Path(manifest))
    except ManifestError as exc:
        raise ConversionError(str(exc)) from None
    if recorded.conversion is None:
        raise ConversionError(f"{manifest} has no [conversion] table, so it does not say what it was converted from: "
                              "convert the model once with SRC --id --out (--manifest-dir), then --again works")
    int8 = recorded.precision == "int8"
    options: dict[str, Any] = {"quantize": "int8" if int8 else None,
                               "precision": "fp32" if int8 else recorded.precision, "fuse": recorded.conversion.fuse,
                               "max_length": recorded.max_length, "pooling": recorded.pooling}
    if {"quantize", "precision"} & overrides.keys():  # the precision options replace the recorded ones together
        options.update(quantize=None, precision="fp32")
    data = tomllib.loads(recorded.path.read_text(encoding="utf-8"))
    kept = {k: v for k, v in data.items() if k not in _DERIVED_FIELDS}
    return convert(recorded.conversion.source, recorded.id, recorded.model.parent, recorded.path.parent,
                   sentences=sentences, progress=progress, extra_fields=kept, **{**options, **overrides})


def _check_arguments(model_id: str, quantize: str | None, precision: str, max_length: int | None,
                     pooling: str | None) -> None:
    """A ConversionError naming what is wrong with the arguments (before anything slow runs)."""
    if not ID_PATTERN.match(model_id) or quantize not in (None, "int8") or precision not in PRECISION_CHOICES or (
            pooling not in (None, *POOLINGS)) or (max_length is not None and max_length <= 0):
        raise ConversionError(f"bad arguments: id {model_id!r} (letters, digits, '.', '_', '-'), quantize {quantize!r} "
                              f"(int8 or none), precision {precision!r} ({', '.join(PRECISION_CHOICES)}), pooling "
                              f"{pooling!r} ({', '.join(POOLINGS)} or none), max_length > 0")
    if quantize and precision != "fp32":
        raise ConversionError(f"--quantize {quantize} and --precision {precision} exclude each other (int8 is a "
                              "precision of its own): pick one")


def _reference(src: Path, info: dict[str, Any], texts: list[str],
               progress: Callable[[str], None]) -> tuple[Any, Yardstick]:
    """The SentenceTransformer, and the yardstick of its vectors for ``texts``."""
    torch, sentence_transformer = _require()
    progress(f"loading {src}")
    st = sentence_transformer(str(src), device="cpu", local_files_only=True, model_kwargs={"dtype": torch.float32})
    st.max_seq_length = info["max_length"]  # so an overridden max_length truncates the reference too
    reference = st.encode(texts, batch_size=8, convert_to_numpy=True)
    return st, Yardstick(reference, texts, src / "tokenizer.json", info["max_length"], info["padding_side"],
                            info["pooling"], info["normalize"], progress)


def _require() -> tuple[Any, Any]:
    """torch and SentenceTransformer, or a ConversionError saying what to install."""
    for flag in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # local folders only: never reach for the Hub
        os.environ.setdefault(flag, "1")
    # transformers' "Loading weights" bar for a local folder: a stray line between the progress lines.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it: fail here with the fix, not mid-export)
        import torch
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise ConversionError(f"conversion needs torch, transformers, sentence-transformers, onnxscript ({exc}): "
                              "pip install 'akidb-embed[convert]' (on this machine install torch==2.13.0 first)")
    return torch, SentenceTransformer


def _measured_memory_mb(folder: Path, info: dict[str, Any], dimension: int) -> int:
    """The charge the daemon will book at the default limits, measured as its first load does (on the CPU)."""
    limits = Limits()
    request = Request(str(folder / "model.onnx"), str(folder / "tokenizer.json"), info["max_length"],
                      info["padding_side"], dimension, limits.work_mb, limits.max_batch, limits.batch_tokens, 0)
    try:
        return -(-measure_in_child(request).charge // MIB)  # rounded up
    except Exception as exc:
        raise ConversionError(f"the converted model could not be measured: {exc}") from None


def _paths(out_dir: Path, manifest_dir: Path) -> dict[str, str]:
    """The manifest's model, tokenizer and golden file: relative inside the manifest folder, else absolute (a ../..
    path breaks silently when a folder moves)."""
    inside = out_dir.is_relative_to(manifest_dir)
    return {key: (out_dir / name).relative_to(manifest_dir).as_posix() if inside else str(out_dir / name)
            for key, name in (("model", "model.onnx"), ("tokenizer", "tokenizer.json"), ("golden", GOLDEN_FILE))}


def _publish(folder: Path, out_dir: Path) -> None:
    """Move the new files into ``out_dir``, then drop external-data files of an earlier graph that no longer belong."""
    out_dir.mkdir(exist_ok=True)
    new = {item.name for item in folder.iterdir()}
    for name in sorted(new):  # same filesystem, so each move is an atomic rename
        os.replace(folder / name, out_dir / name)
    for stale in out_dir.glob("model.onnx?*"):  # the daemon counts model.onnx* as the model's files
        if stale.name not in new:
            stale.unlink()


def _toml(value: Any) -> str:
    """One TOML value: a string, bool, int, float or list of those."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")  # JSON escapes are TOML escapes


def _toml_key(key: str) -> str:
    """A bare key when TOML allows one, else a quoted one (prompt names can be anything)."""
    return key if key and all(c.isascii() and (c.isalnum() or c in "_-") for c in key) else _toml(key)


def _manifest_text(fields: Mapping[str, Any], note: str) -> str:
    """The manifest TOML, hand-formatted: comments saying how it was made, the fields, then the tables."""
    lines = [f"# {fields['id']}: written by `akidb-embed convert` ({note}).", "# Relative paths are from this folder.",
             "# `akidb-embed convert --again <this file>` converts it again from [conversion] with the same settings.",
             ""]
    lines += [f"{key} = {_toml(value)}" for key, value in fields.items() if not isinstance(value, Mapping)]
    for table, values in fields.items():  # a table must come after all top-level keys
        if isinstance(values, Mapping):
            lines += ["", f"[{table}]", *(f"{_toml_key(k)} = {_toml(v)}" for k, v in values.items())]
    return "\n".join(lines) + "\n"


def _validate(text: str, path: Path) -> None:
    """A ConversionError unless the daemon would accept ``text`` as the manifest at ``path``."""
    try:
        parse_manifest(tomllib.loads(text), path)
    except ManifestError as exc:
        raise ConversionError(f"the manifest convert would write is not valid: {exc}. Nothing was written; fix or "
                              "remove that field in the manifest being converted again") from None


def _write_atomically(path: Path, text: str) -> None:
    """Write under a temporary name, then rename into place: the daemon never reads half a manifest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def add_parser(subparsers: Any) -> None:
    """Register ``convert`` on an argparse subparsers object."""
    parser = subparsers.add_parser("convert", help="convert a sentence-transformers model folder to ONNX + manifest")
    parser.add_argument("src", type=Path, nargs="?", help="model folder (config.json, *.safetensors, tokenizer.json)")
    parser.add_argument("--id", help="model id; the manifest is written as <id>.toml")
    parser.add_argument("--out", type=Path, help="folder for model.onnx and tokenizer.json")
    parser.add_argument("--manifest-dir", type=Path, help="folder for the manifest (default: --out)")
    parser.add_argument("--again", type=Path, metavar="MANIFEST",
                        help="convert again as MANIFEST records (source, id, folders, options); options given override")
    parser.add_argument("--quantize", choices=("int8",), help="dynamic int8 weight quantization")
    parser.add_argument("--precision", choices=PRECISION_CHOICES,
                        help="fp32 (default) or fp16, for GPU providers only: the daemon refuses fp16 on the CPU")
    parser.add_argument("--fuse", action=argparse.BooleanOptionalAction,
                        help="fuse attention, layer norms and GELUs for ONNX Runtime (default: on)")
    parser.add_argument("--max-length", type=int, help="token limit (default: the model's max_seq_length)")
    parser.add_argument("--pooling", choices=POOLINGS, help="override the pooling read from 1_Pooling/config.json")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """The ``convert`` command: progress on stderr, parity figures on stdout; 0 on success, 1 on failure."""
    given = {name: getattr(args, name) for name in ("quantize", "precision", "fuse", "max_length", "pooling")}
    options = {name: value for name, value in given.items() if value is not None}

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        if args.again and (args.src or args.id or args.out or args.manifest_dir):
            raise ConversionError("--again takes the source, id and folders from the manifest: drop SRC, --id, --out "
                                  "and --manifest-dir")
        if args.again:
            path, report = convert_again(args.again, progress=progress, **options)
        elif args.src and args.id and args.out:
            path, report = convert(args.src, args.id, args.out, args.manifest_dir, progress=progress, **options)
        else:
            raise ConversionError("SRC, --id and --out are required (or --again MANIFEST to convert a model again)")
    except ConversionError as exc:
        print(f"akidb-embed convert: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path}\nparity ({report.precision}, {len(report.cosines)} sentences): min cosine "
          f"{report.min_cosine:.6f}, mean {report.mean_cosine:.6f} (gate: {GATES[report.precision]}); "
          f"fused: {export.describe(report.fusions)}; {report.seconds:.1f}s")
    return 0
