"""Convert's first step: what a sentence-transformers / HF model folder says about the manifest to write.

Read from its config files and model card, before anything slow runs: a folder that cannot be served is refused
here with the reason and the fix.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

_POOLING_NAMES = {"mean": "mean", "mean_tokens": "mean", "cls": "cls", "cls_token": "cls", "lasttoken": "last_token"}
_MODULES = ("Transformer", "Pooling", "Normalize")
_FAMILIES = (("minilm", "minilm"), ("bge", "bge"), (r"\be5\b", "e5"), ("qwen3.*embed", "qwen3-embedding"))
_GENERIC_DIR = re.compile(r"^(model|models|snapshot|[0-9a-f]{40})$")  # folder names that don't name the model


class ConversionError(Exception):
    """A conversion that cannot proceed or failed its parity check; the message names cause and fix.

    Every step of ``akidb-embed convert`` raises it; it lives here, with the first step, for all of them to share.
    """


def read_settings(src: Path, model_id: str, max_length: int | None, pooling: str | None) -> dict[str, Any]:
    """The manifest settings the folder's config files imply (name, family, max_length, pooling, normalize, padding
    side, license, languages, prompts); ``max_length`` and ``pooling`` override theirs when given."""
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


def _read_json(path: Path) -> Any:
    """A JSON file's contents, or {} when it does not exist."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
