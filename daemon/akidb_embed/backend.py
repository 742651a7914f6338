"""ONNX Runtime backend: one session per loaded model and the execution-provider chain.

The chain comes from config or manifest (TensorRT → CUDA → CPU by default). A provider this
onnxruntime build lacks, or whose CUDA/TensorRT libraries are missing (gpuprobe.py), is skipped
before ONNX Runtime tries it; a session that fails on a GPU provider is retried on the next
ones, and a provider ORT silently dropped is noticed. Each skip and fallback is logged once per
process with its reason, and ONNX Runtime's own error dumps of a GPU attempt are kept quiet.

No arena keeps a batch's memory for good: on the CPU there is none (ONNX Runtime's would hold
the largest batch it has seen forever; freed activations go to the heap, which the daemon
trims), and on CUDA the arena grows only by what is asked, is capped at the model's charge and
shrinks after each run. On a Jetson, GPU memory is the system's memory, so this is what keeps
a model inside its charge there.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Protocol

import numpy as np

from . import gpuprobe
from .tokenize import Padded

if TYPE_CHECKING:
    import onnxruntime as ort

log = logging.getLogger(__name__)

ORT_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
FEEDABLE_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
# Fusions whose CPU kernel is slower than the ops they replace: MiniLM bulk with Add + LayerNormalization
# instead of SkipLayerNormalization ran 5 % (fp32) and 15 % (int8) faster.
CPU_SLOWER_FUSIONS = ["SkipLayerNormFusion"]
# ONNX Runtime's logger severities: warnings and up, errors only (as each session logs), fatal only (silent).
ORT_WARNINGS, ORT_ERRORS, ORT_SILENT = 2, 3, 4

Probe = Callable[[str], str | None]  # why a provider (tensorrt, cuda) cannot start here, or None


class BackendError(RuntimeError):
    """A model that cannot run; the message names the cause."""


class Backend(Protocol):
    """What a model's batcher runs its batches on: ``OnnxBackend``, or a fake in tests."""

    providers: list[str]  # the execution providers in use, the first one running the model

    def run(self, batch: Padded) -> np.ndarray:
        """Token states [rows, seq, hidden] for one padded batch."""
        ...

    def close(self) -> None: ...


# Providers this process saw fail to start; later loads skip them instead of failing (noisily) again.
_failed_to_start: set[str] = set()
# Skips already logged: a model load repeats them, the log says each once per process.
_said: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class DeviceMemory:
    """The bytes a GPU provider may use for this model: all of it, and the working part."""

    limit: int  # the model's charge: weights + working budget
    work: int


def provider_chain(
    requested: Sequence[str],
    available: Sequence[str],
    engine_cache: Path,
    memory: DeviceMemory,
    probe: Probe = gpuprobe.why_not_here,
) -> list[tuple[str, dict[str, str]]]:
    """ORT providers with their options for the requested chain; CPU always ends it."""
    chain = []
    for name in requested:
        ort_name = ORT_NAMES[name]
        if ort_name not in available:
            _skip(name, "this onnxruntime build does not have it; install onnxruntime-gpu (on a Jetson, NVIDIA's build "
                  "for your JetPack) or drop it from providers")  # fmt: skip
            continue
        if ort_name in _failed_to_start:
            _skip(name, "it failed to start earlier")
            continue
        if (reason := probe(name)) is not None:
            _skip(name, reason)
            continue
        chain.append((ort_name, provider_options(name, engine_cache, memory)))
    if not any(ort_name == ORT_NAMES["cpu"] for ort_name, _ in chain):
        chain.append((ORT_NAMES["cpu"], {}))
    return chain


def _skip(name: str, reason: str) -> None:
    """Say why a provider is skipped, once per process: every model load would repeat it.

    Info, not a warning: on a machine without a GPU the default chain skips them by design.
    """
    level = logging.DEBUG if (name, reason) in _said else logging.INFO
    _said.add((name, reason))
    log.log(level, "execution provider %s skipped: %s", name, reason)


def provider_options(name: str, engine_cache: Path, memory: DeviceMemory) -> dict[str, str]:
    """ORT options of one provider: memory bounded by the model's charge; TensorRT engines kept on disk."""
    if name == "cuda":
        # kSameAsRequested: the arena grows by each allocation, not by doubling past the cap.
        return {"arena_extend_strategy": "kSameAsRequested", "gpu_mem_limit": str(memory.limit)}
    if name != "tensorrt":
        return {}
    options = {
        "trt_fp16_enable": "True",
        "trt_max_workspace_size": str(memory.work),  # TensorRT's scratch memory is the working budget
    }
    try:
        engine_cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # an unusable cache_dir (said at start) costs the cache, not the provider
        log.warning("TensorRT engine cache %s cannot be made (%s): engines are built again at this load", engine_cache, exc)
        return options
    return {
        **options,
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(engine_cache),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(engine_cache),
    }


def run_options(active: Sequence[str]) -> ort.RunOptions:
    """Per-run options: on CUDA, hand the arena's free chunks back after every run."""
    import onnxruntime as ort

    options = ort.RunOptions()
    if ORT_NAMES["cuda"] in active:
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "gpu:0")
    return options


def feeds(batch: Padded, inputs: Sequence[str]) -> dict[str, np.ndarray]:
    """The graph's ``inputs`` for one padded batch: ids, mask, and token types and positions if it takes them."""
    values = {"input_ids": batch.ids, "attention_mask": batch.mask}
    if "token_type_ids" in inputs:
        values["token_type_ids"] = np.zeros_like(batch.ids)
    if "position_ids" in inputs:
        # Left-padded rows must count positions from their first real token.
        values["position_ids"] = np.clip(np.cumsum(batch.mask, axis=1) - 1, 0, None)
    return {name: value for name, value in values.items() if name in inputs}


def create_session(
    model: Path, chain: list[tuple[str, dict[str, str]]], options: ort.SessionOptions
) -> ort.InferenceSession:
    """A session on the first provider of the chain that works, logging each fallback."""
    import onnxruntime as ort

    for start in range(len(chain)):
        tried = chain[start:]
        on_cpu = tried[0][0] == ORT_NAMES["cpu"]
        try:
            with contextlib.nullcontext() if on_cpu else _ort_quiet(ort):
                # enable_fallback=0: this loop falls back, keeping each provider's options and saying why;
                # ORT's own fallback retries without them and prints an "EP Error" block to stdout.
                session = ort.InferenceSession(
                    str(model), sess_options=options, providers=[p for p, _ in tried], provider_options=[o for _, o in tried],
                    disabled_optimizers=CPU_SLOWER_FUSIONS if on_cpu else None, enable_fallback=0,
                )
        except Exception as exc:
            if on_cpu:
                raise BackendError(f"onnxruntime cannot load {model}: {exc}") from None
            log.warning("%s: %s failed (%s); falling back", model.name, tried[0][0], _first_line(exc))
            continue
        session.enable_fallback()  # at run time ORT's fallback stays as it was (a TensorRT engine failing at its first run)
        _log_dropped(model, [p for p, _ in tried], session.get_providers())
        return session
    raise BackendError(f"no execution provider could load {model}")


@contextlib.contextmanager
def _ort_quiet(ort: ModuleType) -> Iterator[None]:
    """Silence ONNX Runtime's process-wide logger while a GPU provider starts: a provider that cannot
    start prints a red multi-line dump there, and the fallback is logged here in one line anyway.
    At log level debug it speaks (warnings and up), for whoever digs into why a GPU did not start."""
    ort.set_default_logger_severity(ORT_WARNINGS if log.isEnabledFor(logging.DEBUG) else ORT_SILENT)
    try:
        yield
    finally:
        ort.set_default_logger_severity(ORT_ERRORS)


def _log_dropped(model: Path, wanted: list[str], active: list[str]) -> None:
    """ORT drops a provider it cannot initialise (no device, missing CUDA libraries) with no error."""
    for provider in wanted:
        if provider not in active:
            _failed_to_start.add(provider)
            log.warning(
                "%s: %s could not start (no GPU device, or a driver that does not match its CUDA libraries; "
                'log_level = "debug" shows ONNX Runtime\'s own messages); running on %s',
                model.name,
                provider,
                active[0],
            )


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


class OnnxBackend:
    """One ONNX Runtime session: the loader thread builds, warms and closes it; in between only
    the model's batcher thread runs it."""

    def __init__(
        self,
        model: Path,
        providers: Sequence[str],
        engine_cache: Path,
        memory: DeviceMemory,
        intra_op_threads: int = 0,
        probe: Probe = gpuprobe.why_not_here,
    ) -> None:
        if not model.is_file():
            raise BackendError(f"the ONNX file {model} does not exist; fix `model` in the manifest or convert the model")
        # Imported here, not with the module: modules that only name the backend (the batcher,
        # the converter's helpers) stay light. The daemon itself imports it at start (app.py).
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = intra_op_threads
        options.log_severity_level = ORT_ERRORS  # errors only: ORT's warnings are noise in the journal
        # No CPU arena: it would keep the largest batch's memory for good. The working budget
        # bounds each batch instead, and the freed heap goes back to the system when idle.
        options.enable_cpu_mem_arena = False
        # The memory pattern is planned per input shape, and almost every batch has a shape of its
        # own: its first run took up to 1.7x the memory of a run without it (int8 MiniLM, 4 x 256
        # tokens: 287 vs 168-180 MiB), at no gain in speed.
        options.enable_mem_pattern = False
        # No spinning pool threads: on an idle 2-core VM a 200 µs spin took 0.4 ms off a single text
        # (int8 MiniLM p50 4.9 -> 4.5 ms) for +1.9 ms of CPU per request, and with other work on the
        # cores (the apps a Jetson runs beside us) the same p50 rose from 8.9 to 13.3 ms.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        chain = provider_chain(providers, ort.get_available_providers(), engine_cache, memory, probe)
        self.session = create_session(model, chain, options)
        self.providers = self.session.get_providers()
        self.run_options = run_options(self.providers)
        self.inputs = [i.name for i in self.session.get_inputs()]
        unknown = [name for name in self.inputs if name not in FEEDABLE_INPUTS]
        if unknown or "input_ids" not in self.inputs:
            raise BackendError(
                f"{model} has inputs {self.inputs}; the daemon feeds {', '.join(FEEDABLE_INPUTS)} "
                "(input_ids required): re-export the model with those inputs"
            )
        self.output = self.session.get_outputs()[0].name

    def run(self, batch: Padded) -> np.ndarray:
        """Token states [rows, seq, hidden] for one padded batch."""
        (states,) = self.session.run([self.output], feeds(batch, self.inputs), self.run_options)
        if states.ndim != 3:
            raise BackendError(f"output {self.output!r} has shape {states.shape}; token states [batch, seq, hidden] expected")
        return states

    def close(self) -> None:
        """Release the session and its memory arenas."""
        del self.session
