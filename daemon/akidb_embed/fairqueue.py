"""Weighted fair queuing of a model's texts across their owners (tenant and client).

Start-time fair queuing: each owner's items wait in its own FIFO; the next item taken is the head
of the owner whose start tag, max(its last finish tag, the virtual clock), is lowest, and taking
it advances that owner's finish tag by cost / weight. So owners share the model in proportion to
their weights whatever they queue: a client with one short text waits behind at most about one
item of each other owner, not behind a 256-text request queued before it. An owner whose queue
empties is forgotten, so idling banks no credit. Used by the batcher's worker thread only.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class _Flow(Generic[T]):
    weight: float
    items: deque[tuple[float, T]] = field(default_factory=deque)  # (cost, item), in the order served
    finish: float = 0.0  # virtual finish tag of its last item taken
    backlog: float = 0.0  # the cost of its items waiting


class FairQueue(Generic[T]):
    """Items by owner, taken in weighted fair order."""

    def __init__(self) -> None:
        self._flows: dict[Hashable, _Flow[T]] = {}  # in order of arrival: the tie-break
        self._clock = 0.0  # the start tag of the last item taken
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, owner: Hashable, weight: float, items: list[tuple[float, T]]) -> None:
        """Queue ``(cost, item)`` pairs of one owner, to be served in this order after its earlier ones."""
        flow = self._flows.setdefault(owner, _Flow(weight))
        flow.weight = weight
        flow.items.extend(items)
        flow.backlog += sum(cost for cost, _ in items)
        self._count += len(items)

    def take(self, accept: Callable[[T], bool]) -> list[T]:
        """Items in fair order while ``accept(item)`` holds for the next one (the first is taken whatever it says)."""
        taken: list[T] = []
        while self._flows:
            owner, flow = min(self._flows.items(), key=lambda pair: max(pair[1].finish, self._clock))
            cost, item = flow.items[0]
            if not accept(item) and taken:  # asked of the first too, so it can count it
                break
            flow.items.popleft()
            flow.backlog -= cost
            self._count -= 1
            self._clock = max(flow.finish, self._clock)
            flow.finish = self._clock + cost / flow.weight
            if not flow.items:
                del self._flows[owner]
            taken.append(item)
        return taken

    def owners(self) -> set[Hashable]:
        """Owners with items waiting."""
        return set(self._flows)

    def largest_backlog(self) -> float:
        """The cost waiting for the owner with the most; 0 when none wait."""
        return max((flow.backlog for flow in self._flows.values()), default=0.0)
