"""The eviction policy: least recently used idle models go first; in-use and pinned ones never."""

from __future__ import annotations

import pytest
from akidb_embed.cache import Budget, Resident, evictions_for_pressure, evictions_to_fit
from akidb_embed_client.errors import InsufficientMemory

MB = 1 << 20


def resident(model_id: str, mb: int, last_used: float, evictable: bool = True) -> Resident:
    return Resident(model_id, mb * MB, last_used, evictable)


LOADED = [resident("a", 100, 3.0), resident("b", 100, 1.0), resident("c", 100, 2.0)]


def test_nothing_goes_when_it_fits() -> None:
    assert evictions_to_fit("new", 50 * MB, LOADED, Budget(0, 0, 1000 * MB)) == []


def test_count_cap_evicts_the_least_recently_used() -> None:
    assert evictions_to_fit("new", 10 * MB, LOADED, Budget(0, 3, 1000 * MB)) == ["b"]
    assert evictions_to_fit("new", 10 * MB, LOADED, Budget(0, 2, 1000 * MB)) == ["b", "c"]


def test_memory_cap_evicts_in_lru_order_until_it_fits() -> None:
    assert evictions_to_fit("new", 150 * MB, LOADED, Budget(400 * MB, 0, 1000 * MB)) == ["b"]
    assert evictions_to_fit("new", 250 * MB, LOADED, Budget(400 * MB, 0, 1000 * MB)) == ["b", "c"]


def test_system_headroom_counts_what_eviction_frees() -> None:
    assert evictions_to_fit("new", 150 * MB, LOADED, Budget(0, 0, 100 * MB)) == ["b"]


def test_in_use_and_pinned_models_are_never_chosen() -> None:
    loaded = [resident("busy", 100, 0.0, evictable=False), resident("idle", 100, 5.0)]
    assert evictions_to_fit("new", 10 * MB, loaded, Budget(0, 2, 1000 * MB)) == ["idle"]


def test_refusal_names_need_and_what_there_is() -> None:
    loaded = [resident("pinned", 300, 0.0, evictable=False)]
    with pytest.raises(InsufficientMemory, match=r"needs ~200 MiB .* hold 300 MiB of memory.model_memory_mb = 400"):
        evictions_to_fit("big", 200 * MB, loaded, Budget(400 * MB, 0, 1000 * MB))
    with pytest.raises(InsufficientMemory, match="needs ~900 MiB and the system has 400 MiB to spare"):
        evictions_to_fit("big", 900 * MB, loaded, Budget(0, 0, 400 * MB))
    with pytest.raises(InsufficientMemory, match="max_loaded_models = 1"):
        evictions_to_fit("big", 1 * MB, loaded, Budget(0, 1, 1000 * MB))


def test_pressure_evicts_lru_until_below_the_low_watermark() -> None:
    total = 1000 * MB
    assert evictions_for_pressure(LOADED, 950 * MB, total, 0.80) == ["b", "c"]
    assert evictions_for_pressure(LOADED, 750 * MB, total, 0.80) == []
    stuck = [resident("busy", 100, 0.0, evictable=False)]
    assert evictions_for_pressure(stuck, 990 * MB, total, 0.80) == []
