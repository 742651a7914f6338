"""The ``status`` reply: uptime, models by state, queues, memory, the budget and the tenants' figures, as the
caller's tenant sees them (its models only; memory, budget and evictions daemon-wide)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from . import __version__
from .memory import MIB
from .views import Snapshot
from .settings import Settings, Tenant
from .tenancy import visible


@dataclass(frozen=True)
class Seen:
    """A registry snapshot with the models a tenant sees, and the default model if it is one of them."""

    snapshot: Snapshot
    models: list[dict[str, Any]]
    default: str | None


def seen(snapshot: Snapshot, tenant: Tenant) -> Seen:
    models = visible(tenant, snapshot.models, lambda info: info["id"])
    return Seen(snapshot, models, snapshot.default if snapshot.default in {info["id"] for info in models} else None)


def reply(settings: Settings, started: float, seen: Seen, tenant: Tenant, tenants: dict[str, Any]) -> dict[str, Any]:
    """The status reply for a caller of ``tenant``; ``tenants`` are the tenants' figures it may see."""
    described = seen.models
    states: dict[str, int] = {}
    for info in described:
        states[info["state"]] = states.get(info["state"], 0) + 1
    memory = settings.memory
    loaded = [info for info in described if info["state"] == "ready"]
    return {
        "version": __version__,
        "pid": os.getpid(),
        "uptime_s": round(time.time() - started, 1),
        "socket": str(tenant.socket),
        "tenant": tenant.name,
        "catalog": str(settings.catalog),
        "default_model": seen.default,
        "models": states,
        "queued_texts": sum(info.get("queued_texts", 0) for info in described),
        "in_flight": sum(info.get("in_flight", 0) for info in described),
        "memory": seen.snapshot.memory,
        "budget": {
            "model_memory_mb": memory.model_memory_mb,
            "max_loaded_models": memory.max_loaded_models,
            "loaded_models": len(loaded),
            "loaded_memory_mb": round(float(sum(info["memory_mb"] for info in loaded)), 1),
            "unaccounted_mb": round(seen.snapshot.unaccounted / MIB, 1),
            "high_watermark": memory.high_watermark,
            "low_watermark": memory.low_watermark,
        },
        "evictions": seen.snapshot.evictions,
        "stats": {info["id"]: _traffic(info["stats"]) for info in described},
        "tenants": tenants,
    }


def _traffic(stats: dict[str, Any]) -> dict[str, Any]:
    """A model's live figures in brief, for ``status``: the counters and rates, and the p95 end to end."""
    brief = {key: stats[key] for key in ("requests", "texts", "qps", "texts_per_s", "hit_rate")}
    return {**brief, "errors": sum(stats["errors"].values()), "p95_ms": stats["latency_ms"]["total"]["p95"]}
