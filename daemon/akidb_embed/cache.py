"""The eviction policy of the model cache: pure functions over what is loaded.

Only idle (no request in flight), unpinned, settled (not loading or being swapped) models may
go, least recently used first. ``evictions_to_fit`` chooses what a new load needs gone, or
raises ``InsufficientMemory`` with the figures; ``evictions_for_pressure`` chooses what brings
system memory back under the low watermark.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from akidb_embed_client.errors import InsufficientMemory

from .manifest import Manifest
from .memory import MIB

# Before a model's first load: resident memory per byte of ONNX file (weights, ORT's
# optimized copies, activations), the converter's rule too.
FILE_SIZE_FACTOR = 2.5


@dataclass(frozen=True)
class Resident:
    """A loaded (or loading) model as the budget sees it."""

    id: str
    footprint: int  # bytes
    last_used: float
    evictable: bool  # idle, unpinned and settled


@dataclass(frozen=True)
class Budget:
    """The limits one load must respect."""

    model_memory: int  # bytes for all models together; 0: no cap
    max_models: int  # 0: no cap
    headroom: int  # bytes the system can still give (available minus the reserve)


def estimate(remembered: int, manifest: Manifest) -> tuple[int, str]:
    """Bytes a load of ``manifest`` will take, and where the figure comes from."""
    if remembered:
        return remembered, "measured"
    if manifest.memory_mb:
        return manifest.memory_mb * MIB, "manifest"
    try:
        return int(manifest.model.stat().st_size * FILE_SIZE_FACTOR), "file size"
    except OSError:
        return 0, "unknown"


def evictions_to_fit(model_id: str, need: int, residents: Iterable[Resident], budget: Budget) -> list[str]:
    """Ids to evict, least recently used first, so that ``need`` more bytes fit the budget."""
    residents = list(residents)
    used = sum(r.footprint for r in residents)
    count = len(residents)
    headroom = budget.headroom
    chosen: list[str] = []

    def fits() -> bool:
        return (
            (not budget.max_models or count < budget.max_models)
            and (not budget.model_memory or used + need <= budget.model_memory)
            and need <= headroom
        )

    for resident in sorted((r for r in residents if r.evictable), key=lambda r: r.last_used):
        if fits():
            break
        chosen.append(resident.id)
        used -= resident.footprint
        count -= 1
        headroom += resident.footprint
    if not fits():
        raise InsufficientMemory(_refusal(model_id, need, used, count, headroom, budget))
    return chosen


def evictions_for_pressure(residents: Iterable[Resident], used: int, total: int, low_watermark: float) -> list[str]:
    """Ids to evict, least recently used first, until system use would drop below the low watermark."""
    target = low_watermark * total
    chosen = []
    for resident in sorted((r for r in residents if r.evictable), key=lambda r: r.last_used):
        if used <= target:
            break
        chosen.append(resident.id)
        used -= resident.footprint
    return chosen


def _refusal(model_id: str, need: int, used: int, count: int, headroom: int, budget: Budget) -> str:
    if budget.max_models and count >= budget.max_models:
        why = f"{count} models that cannot be evicted (in use or pinned) already fill memory.max_loaded_models = {budget.max_models}"
    elif budget.model_memory and used + need > budget.model_memory:
        why = (
            f"it needs ~{need / MIB:.0f} MiB and the models that cannot be evicted hold {used / MIB:.0f} MiB "
            f"of memory.model_memory_mb = {budget.model_memory / MIB:.0f}"
        )
    else:
        why = f"it needs ~{need / MIB:.0f} MiB and the system has {max(headroom, 0) / MIB:.0f} MiB to spare"
    return (
        f"model {model_id!r} cannot be loaded: {why}, even after evicting every idle model; "
        "free memory, unpin or unload models, or raise the limits in the [memory] config"
    )
