"""The golden-vector self-test: a model embeds its own reference texts at load, before it serves anything.

``akidb-embed convert`` stores ``golden.npz`` next to the model (named by the manifest's ``[golden]`` table): the
texts, prompt prefixes included, their sentence-transformers vectors, and their token counts after truncation.
``run_self_test`` embeds the texts as serving does, on the provider the load got, and compares cosines with the
manifest's ``min_cosine``. A model that misses it raises ``BackendError`` with the figures and the likely cause
(the tokenizer, the pooling, the provider or the weights), so the registry marks it ``failed``.
"""

from __future__ import annotations

import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .backend import ORT_NAMES, Backend, BackendError
from .manifest import Manifest
from .pooling import POOLERS, l2_normalize, pool
from .tokenize import TextEncoder, Tokens

GOLDEN_FILE = "golden.npz"
FAILED = "self-test failed"  # how a failure's message starts: the registry reports the verification from it
_BATCH = 4  # texts per run, sorted by length as the batcher does: rows of different lengths share a padded batch
_EXCERPT = 60  # characters of the worst text quoted in a failure


@dataclass(frozen=True)
class GoldenSet:
    """The contents of a golden file: final texts, their reference vectors [n, dim] and token counts [n]."""

    texts: list[str]
    vectors: np.ndarray
    tokens: np.ndarray


@dataclass(frozen=True)
class SelfTest:
    """The figures of a passed self-test."""

    min_cosine: float
    mean_cosine: float
    tolerance: float
    texts: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        """Rounded figures for the ``models`` reply."""
        return {"min_cosine": round(self.min_cosine, 6), "mean_cosine": round(self.mean_cosine, 6),
                "tolerance": self.tolerance, "texts": self.texts, "ms": round(self.seconds * 1e3, 1)}


def write_golden(path: Path, texts: list[str], vectors: np.ndarray, tokens: list[int]) -> None:
    """Save a golden file (plain arrays, no pickle)."""
    if not len(texts) == len(vectors) == len(tokens):
        raise ValueError(f"{len(texts)} texts, {len(vectors)} vectors and {len(tokens)} token counts: one each")
    with open(path, "wb") as f:  # a file object: np.savez would append .npz to any other name
        np.savez(f, texts=np.array(texts, dtype=np.str_), vectors=np.asarray(vectors, dtype=np.float32),
                 tokens=np.asarray(tokens, dtype=np.int32))


def read_golden(path: Path, manifest: Manifest) -> GoldenSet:
    """The golden file of ``manifest``, checked against its dimension; a BackendError naming the file and the fix."""
    fix = f"make it again with akidb-embed convert --again {manifest.path}, or drop [golden] from the manifest"
    if not path.is_file():
        raise BackendError(f"golden vectors {path} do not exist: {fix}")
    try:
        with np.load(path, allow_pickle=False) as data:
            golden = GoldenSet([str(t) for t in data["texts"]], data["vectors"], data["tokens"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise BackendError(f"golden vectors {path} cannot be read ({exc}): {fix}") from None
    n = len(golden.texts)
    if golden.vectors.shape != (n, manifest.dimension) or golden.tokens.shape != (n,) or not n:
        raise BackendError(f"golden vectors {path} hold {n} texts, vectors {golden.vectors.shape} and token counts "
                           f"{golden.tokens.shape}, not [n, dimension = {manifest.dimension}] and [n]: {fix}")
    return golden


def pooled(encoder: TextEncoder, backend: Backend, tokens: list[Tokens]) -> dict[str, np.ndarray]:
    """Each text's vector under every pooling mode (in the texts' order), from one run of the token states."""
    order = sorted(range(len(tokens)), key=lambda i: len(tokens[i].ids))
    parts: dict[str, list[np.ndarray]] = {mode: [] for mode in POOLERS}
    for start in range(0, len(order), _BATCH):
        batch = encoder.pad([tokens[i] for i in order[start : start + _BATCH]])
        states = backend.run(batch)
        for mode, vectors in parts.items():
            vectors.append(pool(states, batch.mask, mode))
    unsorted = np.argsort(order)
    return {mode: np.concatenate(vectors)[unsorted] for mode, vectors in parts.items()}


def cosines(reference: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity, in float64."""
    return np.sum(l2_normalize(reference.astype(np.float64)) * l2_normalize(got.astype(np.float64)), axis=1)


def run_self_test(manifest: Manifest, encoder: TextEncoder, backend: Backend) -> SelfTest | None:
    """Embed the golden texts and compare; None without golden vectors, a BackendError saying why on a miss."""
    if manifest.golden is None:
        return None
    started = time.perf_counter()
    golden = read_golden(manifest.golden.path, manifest)
    tokens = encoder.encode(golden.texts)
    vectors = pooled(encoder, backend, tokens)
    # Cosines do not depend on the vectors' length, so normalize = false models are compared the same way.
    cos = cosines(golden.vectors, vectors[manifest.pooling])
    tolerance = manifest.golden.min_cosine
    if not cos.min() >= tolerance:  # so that NaN vectors (a provider computing garbage) fail too
        worst = int(np.argmin(cos))
        cause = _diagnosis(manifest, golden, tokens, vectors, tolerance, backend)
        raise BackendError(
            f"{FAILED}: min cosine {cos.min():.6f}, mean {cos.mean():.6f} against the golden vectors of "
            f"{manifest.golden.path} (need >= {tolerance}); worst text #{worst} (cosine {cos[worst]:.6f}): "
            f"{golden.texts[worst][:_EXCERPT]!r}. Likely cause: {cause}"
        )
    return SelfTest(float(cos.min()), float(cos.mean()), tolerance, len(golden.texts), time.perf_counter() - started)


def _diagnosis(manifest: Manifest, golden: GoldenSet, tokens: list[Tokens], vectors: dict[str, np.ndarray],
               tolerance: float, backend: Backend) -> str:
    """The likeliest cause of a miss, from what the self-test already has: token counts, other poolings, provider."""
    counts = np.array([len(t.ids) for t in tokens])
    differ = np.flatnonzero(counts != golden.tokens)
    if differ.size:
        i = int(differ[0])
        return (f"the tokenizer differs from the one the vectors were made with ({differ.size} texts tokenize "
                f"differently, #{i}: {counts[i]} tokens, not {golden.tokens[i]}): check `tokenizer` and `max_length` "
                f"in {manifest.path}")
    for mode, got in vectors.items():
        if mode != manifest.pooling and cosines(golden.vectors, got).min() >= tolerance:
            return f"the manifest's pooling = {manifest.pooling!r} looks wrong: pooling = {mode!r} matches"
    if backend.providers[0] != ORT_NAMES["cpu"]:
        return (f"the provider {backend.providers[0]} may compute wrong values (e.g. a TensorRT fp16 overflow): "
                f'force the CPU with providers = ["cpu"] in {manifest.path} to check')
    return f"the weights do not match the golden vectors (corrupt or replaced model file {manifest.model})"
