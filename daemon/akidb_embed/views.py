"""What the registry shows: copies of its entries for ``status``, ``models`` and ``auto`` routing.

Read-only and on the event loop: ``snapshot`` describes every entry with the memory sample and the
cache's figures, ``describe`` one entry as the ``models`` reply lists it, ``candidate`` one entry
as routing judges it. Changing what they return changes nothing in the registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import selftest
from .catalog import Entry
from .manifest import Manifest
from .memory import MIB
from .profile import profile_key
from .routing import Candidate
from .settings import Settings

if TYPE_CHECKING:
    from .registry import Registry


@dataclass(frozen=True)
class Snapshot:
    """The registry as ``status`` and ``models`` report it."""

    models: list[dict[str, Any]]
    default: str | None
    memory: dict[str, Any]  # the memory source's latest sample
    unaccounted: int  # bytes the daemon holds beyond its models' charges
    evictions: int


def snapshot(registry: Registry) -> Snapshot:
    """Every entry described, the memory sample and the cache's figures."""
    return Snapshot(
        [describe(registry, entry) for entry in registry.entries.values()], registry.default_id(),
        registry.ledger.memory_sample().as_dict(), registry.ledger.unaccounted, registry.evictions,
    )  # fmt: skip


def candidate(registry: Registry, entry: Entry) -> Candidate:
    """The entry as ``auto`` routing judges it; whether it fits in memory is asked only if routing gets that far."""
    serving = entry.model.manifest if entry.model else entry.manifest
    if serving is None:
        return Candidate(entry.id, None, entry.state, "unverified", 0.0, None, error=entry.error)
    memory = registry.ledger.footprint(entry) if entry.model else registry.ledger.estimate(entry.id, serving)[0]
    return Candidate(entry.id, serving, entry.state, _verification(entry, serving), _mb(memory),
                     profile(registry, entry), entry.error or entry.circuit.last_error, entry.circuit.state,
                     lambda: registry.ledger.no_room(entry, serving))  # fmt: skip


def describe(registry: Registry, entry: Entry) -> dict[str, Any]:
    """One catalog entry as the ``models`` reply lists it."""
    serving = entry.model.manifest if entry.model else entry.manifest
    info = serving.describe() if serving else {"id": entry.id}
    estimate, source = registry.ledger.estimate(entry.id, serving) if serving else (0, "unknown")
    info.update(
        state=entry.state, error=entry.error, update_error=entry.update_error, path=str(entry.path),
        default=entry.id == registry.default_id(),
        pinned=entry.pinned, memory_mb=_mb(estimate), memory_source=source,
        keep_alive=default_keep_alive(serving, registry.settings) if serving else None,
        last_used=registry.store.recorded(entry.id).last_used or None, stats=entry.stats.describe(),
        verification=_verification(entry, serving), selftest=None,
        profile=profile(registry, entry), circuit=entry.circuit.describe(),
    )  # fmt: skip
    model = entry.model
    if model is not None:
        info.update(
            fingerprint=model.fingerprint, provider=model.backend.providers[0], loaded_at=model.loaded_at,
            last_used=model.last_used, in_flight=model.in_flight, requests=model.requests, served=model.served,
            load_ms=round(model.load_seconds * 1e3, 1), queued_texts=model.queued_texts,
            batches=model.batches_run, keep_alive=model.keep_alive,
            memory_mb=_mb(registry.ledger.footprint(entry)), memory_source="measured",
            weights_mb=_mb(model.footprint.weights), work_mb=_mb(model.footprint.work), peak_mb=_mb(model.peak),
            threads=model.footprint.tuning.threads, run_cost_tokens=model.footprint.tuning.run_cost_tokens,
            batch_tokens=model.batcher.rule.max_tokens,
            selftest=model.selftest.as_dict() if model.selftest else None,
        )  # fmt: skip
    return info


def profile(registry: Registry, entry: Entry) -> dict[str, Any] | None:
    """The profile of the version loaded, else of the one last loaded (on the provider it last ran on)."""
    profiles = registry.store.state.profiles
    if entry.model is not None:
        return profiles.get(profile_key(entry.model.fingerprint, entry.model.backend.providers[0]))
    digest = registry.store.recorded(entry.id).fingerprint
    measured = [p for key, p in profiles.items() if digest and key.startswith(profile_key(digest, ""))]
    return max(measured, key=lambda p: p.get("measured_at", 0), default=None)


def default_keep_alive(manifest: Manifest, settings: Settings) -> float:
    """A model's keep_alive: its manifest's, else the daemon's default."""
    return manifest.keep_alive if manifest.keep_alive is not None else settings.memory.keep_alive


def _verification(entry: Entry, serving: Manifest | None) -> str:
    """Loaded: it passed its self-test, or had none. Not loaded: it failed its self-test, will take one, or has none."""
    if entry.model is not None:
        return "passed" if entry.model.selftest else "unverified"
    if serving is None or serving.golden is None:
        return "unverified"
    return "failed" if (entry.error or "").startswith(selftest.FAILED) else "pending"


def _mb(count: int) -> float:
    return round(count / MIB, 1)
