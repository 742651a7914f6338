"""Token-budget batching: padded size (longest x rows) within the budget, rows within max_batch."""

from __future__ import annotations

import random

import pytest
from akidb_embed.batcher import cut_batches


def slices(lengths: list[int], budget: int, max_batch: int) -> list[list[int]]:
    return [lengths[a:b] for a, b in cut_batches(lengths, budget, max_batch)]


def test_short_rows_share_a_batch_until_the_budget() -> None:
    assert slices([2, 2, 3, 3, 10, 10], budget=20, max_batch=100) == [[2, 2, 3, 3], [10, 10]]


def test_max_batch_caps_rows() -> None:
    assert slices([1] * 7, budget=1000, max_batch=3) == [[1, 1, 1], [1, 1, 1], [1]]


def test_a_row_over_the_budget_runs_alone() -> None:
    assert slices([5, 600, 700], budget=512, max_batch=8) == [[5], [600], [700]]


def test_nothing_in_nothing_out() -> None:
    assert slices([], budget=10, max_batch=10) == []


@pytest.mark.parametrize("seed", range(5))
def test_every_row_once_in_order_and_within_budget(seed: int) -> None:
    rng = random.Random(seed)
    lengths = sorted(rng.randint(1, 300) for _ in range(500))
    batches = slices(lengths, budget=2048, max_batch=32)
    assert [n for batch in batches for n in batch] == lengths
    for batch in batches:
        assert len(batch) <= 32
        assert len(batch) == 1 or max(batch) * len(batch) <= 2048
