"""Loading and unloading one model: session, tokenizer, batcher, warm-up, self-test, and what it costs.

``load_model`` runs on the loader thread. A model's memory (``footprint``) is measured once
per fingerprint and working budget, in a child process, and remembered; the load itself then
builds the session with GPU memory capped at the charge and the batcher cut to the budget, and
checks it against its golden vectors (selftest.py) before the registry may mark it ready.
``LoadedModel.close`` hands the memory back to the system and measures what that released.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from . import confine
from .backend import ORT_NAMES, Backend, BackendError, DeviceMemory, OnnxBackend
from .batcher import Batcher, Job
from .footprint import Footprint, Request, measure_in_child
from .manifest import Manifest, ManifestError, fingerprint
from .memory import MIB, process_rss, release_memory
from .selftest import SelfTest, run_self_test
from .settings import Settings
from .tokenize import TextEncoder
from .workmem import METER

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model ready to serve: its session, its batcher, its use counters and its footprint."""

    manifest: Manifest
    fingerprint: str
    backend: Backend
    batcher: Batcher
    load_seconds: float
    footprint: Footprint
    keep_alive: float  # idle seconds before it unloads; negative: never
    selftest: SelfTest | None = None  # None: no golden vectors, unverified
    measure_seconds: float = 0.0  # of load_seconds, the footprint measurement of a version's first load
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    in_flight: int = 0
    requests: int = 0
    served: int = 0  # texts
    retired: bool = False

    @property
    def peak(self) -> int:
        """The largest working memory seen: at the first load's worst batches, or since, serving."""
        return max(self.footprint.peak, self.batcher.peak_seen)

    @property
    def charge(self) -> int:
        """Bytes the cache books for it: weights + the working budget, or the peak if that was larger."""
        return self.footprint.weights + max(self.footprint.work, self.peak)

    @property
    def queued_texts(self) -> int:
        return self.batcher.queued_texts

    @property
    def batches_run(self) -> int:
        return self.batcher.batches_run

    def submit(self, job: Job) -> None:
        """Queue a request on the model's batcher (Overloaded when its queue is full)."""
        self.batcher.submit(job)

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


def work_setting(manifest: Manifest, settings: Settings) -> int:
    """The model's working-memory budget setting in MiB: its manifest's, else the config's (0: automatic)."""
    return manifest.work_mb if manifest.work_mb is not None else settings.limits.work_mb


def load_model(
    manifest: Manifest,
    settings: Settings,
    loop: asyncio.AbstractEventLoop,
    keep_alive: float,
    known: Mapping[str, Footprint],
) -> LoadedModel:
    """Build and check a model (loader thread); a fingerprint not in ``known`` for this budget is measured first."""
    started = time.perf_counter()
    _confine(manifest, settings)
    encoder = _text_encoder(manifest)  # first: it refuses an absurd tokenizer.json before the hash reads it
    digest = _fingerprint(manifest)
    footprint = known.get(digest)
    measure_seconds = 0.0
    if footprint is None or (footprint.work_mb, footprint.tuning.threads_setting) != (
        work_setting(manifest, settings), settings.intra_op_threads):
        footprint = _measure(manifest, settings, digest)
        measure_seconds = time.perf_counter() - started
    with METER.measure():  # a load blurs the peak of any batch running meanwhile
        backend = OnnxBackend(
            manifest.model,
            manifest.providers or settings.providers,
            _engine_cache(settings, digest),
            DeviceMemory(footprint.charge, footprint.work),
            footprint.tuning.threads,
        )
        _check_precision(manifest, backend)
        selftest = _verify(manifest, encoder, backend)
        release_memory()  # what parsing the model file left on the heap
    batcher = Batcher(manifest.id, encoder, backend, manifest.pooling, manifest.dimension, settings.limits, footprint, loop)
    seconds = time.perf_counter() - started
    log.info(
        "model %s: loaded in %.0f ms on %s; weights %.0f MiB, working budget %.0f MiB, worst batch %.0f MiB; "
        "%d threads, run cost %d tokens, batches up to %d tokens; %s (fingerprint %s)",
        manifest.id, seconds * 1e3, backend.providers[0], footprint.weights / MIB, footprint.work / MIB,
        footprint.peak / MIB, footprint.tuning.threads, footprint.tuning.run_cost_tokens, batcher.rule.max_tokens,
        _verdict(selftest), digest,
    )  # fmt: skip
    return LoadedModel(manifest, digest, backend, batcher, seconds, footprint, keep_alive, selftest, measure_seconds)


def _measure(manifest: Manifest, settings: Settings, digest: str) -> Footprint:
    limits = settings.limits
    request = Request(
        str(manifest.model), str(manifest.tokenizer), manifest.max_length, manifest.padding_side, manifest.dimension,
        work_setting(manifest, settings), limits.max_batch, limits.batch_tokens, settings.intra_op_threads,
        tuple(manifest.providers or settings.providers), str(_engine_cache(settings, digest)),
    )  # fmt: skip
    log.info("model %s: measuring its memory and speed settings (first load of this version)", manifest.id)
    return measure_in_child(request)


def _engine_cache(settings: Settings, digest: str) -> Path:
    """Where TensorRT keeps this model version's engines and timing cache."""
    return settings.cache_dir / "tensorrt" / digest


def _confine(manifest: Manifest, settings: Settings) -> None:
    """Check the model roots again before opening anything: a file may have become a symlink since the scan."""
    try:
        confine.check(manifest, settings.all_model_roots)
    except ManifestError as exc:
        raise BackendError(str(exc)) from None


def _fingerprint(manifest: Manifest) -> str:
    try:
        return fingerprint(manifest)
    except OSError as exc:
        raise BackendError(f"cannot read {exc.filename}: {exc.strerror}; fix the path in {manifest.path}") from None


def _check_precision(manifest: Manifest, backend: OnnxBackend) -> None:
    """Refuse an fp16 graph on the CPU: made for GPUs, it is no faster than fp32 there (MiniLM: 5% slower) and less
    exact, and serving it would hide that the GPU provider did not start."""
    if manifest.precision == "fp16" and backend.providers[0] == ORT_NAMES["cpu"]:
        backend.close()
        raise BackendError(
            f"model {manifest.id} is fp16, made for GPU providers (tensorrt/cuda), but runs on {backend.providers[0]} "
            "here: convert it again without --precision fp16 "
            f"(akidb-embed convert --again {manifest.path} --precision fp32)"
        )


def _text_encoder(manifest: Manifest) -> TextEncoder:
    try:
        return TextEncoder(manifest.tokenizer, manifest.max_length, manifest.padding_side)
    except Exception as exc:  # tokenizers raises a bare Exception for a corrupt file
        raise BackendError(f"tokenizer {manifest.tokenizer} cannot be read: {exc}") from None


def _verify(manifest: Manifest, encoder: TextEncoder, backend: OnnxBackend) -> SelfTest | None:
    """Warm up and self-test; a model that fails gives its session back at once rather than when collected."""
    try:
        _warm_up(manifest, encoder, backend)
        return run_self_test(manifest, encoder, backend)
    except BackendError:
        backend.close()
        raise


def _verdict(selftest: SelfTest | None) -> str:
    if selftest is None:
        return "unverified: no golden vectors"
    return f"self-test min cosine {selftest.min_cosine:.6f} on {selftest.texts} texts in {selftest.seconds * 1e3:.0f} ms"


def _warm_up(manifest: Manifest, encoder: TextEncoder, backend: OnnxBackend) -> None:
    """Run a small batch so a wrong model fails at load, not on a user's request."""
    states = backend.run(encoder.pad(encoder.encode(["warm up", "a second, longer warm-up text"])))
    if states.shape[-1] != manifest.dimension:
        raise BackendError(
            f"{manifest.model} produces {states.shape[-1]}-dimensional states but the manifest says "
            f"dimension = {manifest.dimension}; fix the manifest"
        )
