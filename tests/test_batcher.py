"""Batch cuts: padded size (longest x rows) within the token budget, working memory within the
model's budget (long texts get fewer rows), rows within max_batch, and no batch padded where
another run would cost less than the padding."""

from __future__ import annotations

import random

import pytest
from akidb_embed.batcher import cut_batches
from akidb_embed.workmem import CostModel


def slices(lengths: list[int], budget: int = 10_000, max_batch: int = 100, cost: int = 10_000) -> list[list[int]]:
    def fits(rows: int, length: int) -> bool:
        return rows <= max_batch and rows * length <= budget

    return [lengths[a:b] for a, b in cut_batches(lengths, fits, cost)]


def test_long_texts_get_fewer_rows_than_the_token_budget_alone_allows() -> None:
    """Attention memory grows with length²: at 512 tokens only 2 rows fit where 16 of 64 tokens do."""
    model = CostModel(token_bytes=1000, pair_bytes=100)
    work = model.batch_bytes(2, 512)

    def fits(rows: int, length: int) -> bool:
        return model.batch_bytes(rows, length) <= work

    lengths = [64] * 40 + [512] * 5
    batches = [lengths[a:b] for a, b in cut_batches(lengths, fits, 10_000)]
    assert [len(b) for b in batches] == [40, 2, 2, 1]  # 40 x 64 tokens fit; 3 x 512 would not
    assert all(model.batch_bytes(len(b), max(b)) <= work for b in batches)
    assert model.batch_bytes(40, 64) < work < model.batch_bytes(3, 512)


def test_short_rows_share_a_batch_until_the_budget() -> None:
    assert slices([2, 2, 3, 3, 10, 10], budget=20) == [[2, 2, 3, 3], [10, 10]]


def test_max_batch_caps_rows() -> None:
    assert slices([1] * 7, max_batch=3) == [[1, 1, 1], [1, 1, 1], [1]]


def test_a_row_over_the_budget_runs_alone() -> None:
    assert slices([5, 600, 700], budget=512) == [[5], [600], [700]]


def test_padding_that_costs_more_than_a_batch_cuts() -> None:
    lengths = [10, 10, 10, 12, 40, 41]
    assert slices(lengths, cost=16) == [[10, 10, 10, 12], [40, 41]]  # 3 rows x 2 pads = 6 ≤ 16; 4 x 28 > 16
    assert slices(lengths, cost=1000) == [lengths]  # on a GPU the padding is cheaper than another run


def test_nothing_in_nothing_out() -> None:
    assert slices([]) == []


@pytest.mark.parametrize("seed", range(5))
def test_every_row_once_in_order_within_budget_and_padding(seed: int) -> None:
    rng = random.Random(seed)
    lengths = sorted(rng.randint(1, 300) for _ in range(500))
    batches = slices(lengths, budget=2048, max_batch=32, cost=64)
    assert [n for batch in batches for n in batch] == lengths
    for batch in batches:
        assert len(batch) <= 32
        assert len(batch) == 1 or max(batch) * len(batch) <= 2048
        assert sum(max(batch) - n for n in batch) <= 64 * len(batch)  # each cut kept its padding step ≤ cost
