"""Loading and unloading one model: session, tokenizer, batcher, warm-up, and what it costs.

``load_model`` runs on the loader thread. It measures the model's footprint as the change in
the daemon's resident memory across the load and a warm-up batch; ``LoadedModel.close`` hands
the memory back to the system and measures what that released.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import time
from collections.abc import Container
from dataclasses import dataclass, field

from .backend import BackendError, OnnxBackend
from .batcher import Batcher
from .manifest import Manifest, fingerprint
from .memory import MIB, process_rss
from .settings import Settings
from .tokenize import TextEncoder

log = logging.getLogger(__name__)
M_ARENA_MAX = -8  # glibc's mallopt parameter number


@dataclass
class LoadedModel:
    """A model ready to serve: its session, its batcher, its use counters and its footprint."""

    manifest: Manifest
    fingerprint: str
    backend: OnnxBackend
    batcher: Batcher
    load_seconds: float
    footprint: int  # bytes of resident memory the load added
    keep_alive: float  # idle seconds before it unloads; negative: never
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    in_flight: int = 0
    requests: int = 0
    served: int = 0  # texts
    retired: bool = False

    def idle_for(self, now: float) -> float:
        return now - self.last_used if self.in_flight == 0 else 0.0

    def close(self) -> int:
        """Stop the worker, drop the session and return its memory; the bytes released."""
        before = process_rss()
        self.batcher.close()
        self.backend.close()
        del self.backend, self.batcher
        release_memory()
        released = max(0, before - process_rss())
        log.info("model %s: unloaded, %.0f MiB released", self.manifest.id, released / MIB)
        return released


def load_model(
    manifest: Manifest,
    settings: Settings,
    loop: asyncio.AbstractEventLoop,
    keep_alive: float,
    measured: Container[str],
) -> LoadedModel:
    """Build and check a model (loader thread); one whose fingerprint is not ``measured`` yet
    gets the larger warm-up batch that measures its footprint."""
    started = time.perf_counter()
    rss_before = process_rss()
    digest = _fingerprint(manifest)
    measure = digest not in measured
    encoder = _text_encoder(manifest)
    backend = OnnxBackend(
        manifest.model,
        manifest.providers or settings.providers,
        settings.cache_dir / "tensorrt" / digest,
        settings.intra_op_threads,
    )
    _warm_up(manifest, encoder, backend, settings.memory.warmup_tokens if measure else 0)
    batcher = Batcher(manifest.id, encoder, backend, manifest.pooling, manifest.dimension, settings.limits, loop)
    seconds = time.perf_counter() - started
    footprint = max(0, process_rss() - rss_before)
    log.info(
        "model %s: loaded in %.0f ms on %s, %.0f MiB (fingerprint %s)",
        manifest.id, seconds * 1e3, backend.providers[0], footprint / MIB, digest,
    )  # fmt: skip
    return LoadedModel(manifest, digest, backend, batcher, seconds, footprint, keep_alive)


def release_memory() -> None:
    """Collect garbage and ask glibc to hand freed heap pages back, so RSS really falls."""
    gc.collect()
    if _libc is not None:
        _libc.malloc_trim(0)


def use_one_malloc_arena() -> None:
    """Keep glibc to one heap arena (call before threads start).

    Every model brings threads of its own; with an arena per thread, memory freed by an unload
    stays scattered over arenas and RSS creeps up over load/unload cycles (measured: +14 %
    after 25 cycles with the default, flat with one arena).
    """
    if _libc is not None:
        _libc.mallopt(M_ARENA_MAX, 1)


def _load_libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (musl): freed memory returns on its own schedule
        return None


_libc = _load_libc()


def _fingerprint(manifest: Manifest) -> str:
    try:
        return fingerprint(manifest)
    except OSError as exc:
        raise BackendError(f"cannot read {exc.filename}: {exc.strerror}; fix the path in {manifest.path}") from None


def _text_encoder(manifest: Manifest) -> TextEncoder:
    try:
        return TextEncoder(manifest.tokenizer, manifest.max_length, manifest.padding_side)
    except Exception as exc:  # tokenizers raises a bare Exception for a corrupt file
        raise BackendError(f"tokenizer {manifest.tokenizer} cannot be read: {exc}") from None


def _warm_up(manifest: Manifest, encoder: TextEncoder, backend: OnnxBackend, tokens: int) -> None:
    """Run a batch so a wrong model fails at load, not on a user's request.

    With ``tokens`` the batch is that large (rows of max_length), so the footprint measured
    includes ONNX Runtime's activation arena for real batches.
    """
    texts = ["warm up", "a second, longer warm-up text"]
    encodings = encoder.encode(texts)
    if tokens:
        long_text = " ".join(["warm"] * manifest.max_length)
        rows = max(2, tokens // manifest.max_length)
        encodings = encoder.encode([long_text] * rows)
    states = backend.run(encoder.pad(encodings))
    if states.shape[-1] != manifest.dimension:
        raise BackendError(
            f"{manifest.model} produces {states.shape[-1]}-dimensional states but the manifest says "
            f"dimension = {manifest.dimension}; fix the manifest"
        )
