"""Fair batching: a single query is not served behind all of a bulk stream, and owners share by weight.

At the batcher level, a fake backend (the ``backend.Backend`` protocol) records which owner's texts
each batch held and holds its first batch until the test has queued the rest, so the order is the
batcher's choice alone, not the machine's speed. At the daemon level, a real daemon and tiny model:
a single query sent after a bulk stream is answered before most of it.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter

import msgpack
import numpy as np
import zmq
from akidb_embed.batcher import Batcher, Job
from akidb_embed.footprint import Footprint
from akidb_embed.settings import Limits
from akidb_embed.tokenize import Padded, TextEncoder
from akidb_embed.tuning import Tuning
from akidb_embed_client.protocol import encode_request
from daemon_process import Daemon, run_daemon
from test_batcher_queue import DIMENSION, FakeBackend, encoder, expected  # noqa: F401 - encoder is a fixture

RUN_COST = 2  # tokens: the fair slice (FAIR_SLICE_RUNS of these) falls to its floor, FAIR_SLICE_MIN_TOKENS
MAX_BATCH = 32
OWNERS = {"bulk": "apple", "query": "zebra", "heavy": "cherry"}  # owner -> the word its texts start with


class GatedBackend(FakeBackend):
    """Holds its first batch until ``gate`` opens; records each batch's rows by their first word's token."""

    def __init__(self) -> None:
        super().__init__(poison_id=-1)
        self.running, self.gate = threading.Event(), threading.Event()
        self.first_tokens: list[list[int]] = []

    def run(self, batch: Padded) -> np.ndarray:
        self.first_tokens.append(batch.ids[:, 1].tolist())
        self.running.set()
        assert self.gate.wait(30)
        return super().run(batch)


def owner_of(encoder: TextEncoder) -> dict[int, str]:
    return {int(encoder.encode([word])[0].ids[1]): owner for owner, word in OWNERS.items()}


async def serve(encoder: TextEncoder, first: list[tuple[str, float, list[str]]], then: list[tuple[str, float, list[str]]]):
    """Queue ``first`` (owner, weight, texts) jobs; once the first batch runs, queue ``then``; open the gate.

    The jobs' outcomes in submission order, the owners of each batch's rows, each batch's (rows, padded length),
    and the batcher's fair slice in tokens.
    """
    loop = asyncio.get_running_loop()
    backend = GatedBackend()
    footprint = Footprint(0, 1 << 30, 0, 1.0, 0.0, 0, Tuning(0, RUN_COST, 1024, 0))
    batcher = Batcher("fake", encoder, backend, "mean", DIMENSION, Limits(max_batch=MAX_BATCH, batch_tokens=1024),
                      footprint, loop)  # fmt: skip
    jobs = []
    try:
        for group in (first, then):
            for owner, weight, texts in group:
                jobs.append(Job(texts, loop.create_future(), normalize=False, owner=owner, weight=weight))
                batcher.submit(jobs[-1])
            await loop.run_in_executor(None, backend.running.wait, 30)
        backend.gate.set()
        outcomes = await asyncio.gather(*(j.future for j in jobs))
    finally:
        backend.gate.set()
        batcher.close()
    owners = owner_of(encoder)
    return outcomes, [[owners[t] for t in batch] for batch in backend.first_tokens], backend.shapes, batcher.slice_tokens


def texts_of(owner: str, count: int) -> list[str]:
    return [f"{OWNERS[owner]} {'the cat sleeps' if i % 2 else 'warm sun'} {i}" for i in range(count)]


def test_a_single_query_runs_right_after_the_batch_in_progress(encoder: TextEncoder) -> None:
    """Four 32-text bulk jobs are queued, the first batch runs, a one-text query arrives: it runs once the texts
    taken with that batch (one max_batch window) have run, in a batch within the fair slice."""
    bulk = [("bulk", 1.0, texts_of("bulk", 32)) for _ in range(4)]
    query = [("query", 1.0, [OWNERS["query"] + " where is the station"])]
    outcomes, batches, shapes, slice_tokens = asyncio.run(serve(encoder, bulk, query))
    with_query = next(i for i, batch in enumerate(batches) if "query" in batch)
    ahead = sum(len(b) for b in batches[:with_query])
    # The window in progress, and at most the shorter bulk texts of its own slice (each text has >= 4 tokens):
    # first-in first-out would have run all 128 bulk texts first.
    assert MAX_BATCH <= ahead <= MAX_BATCH + slice_tokens // 4
    rows, longest = shapes[with_query]
    assert rows == 1 or rows * longest <= slice_tokens  # a slice-sized batch, not a full one
    for (_, _, texts), embedded in zip(bulk + query, outcomes):  # every job whole, in input order
        np.testing.assert_allclose(embedded.vectors, [expected(encoder, t) for t in texts], rtol=1e-6)


def test_owners_share_batches_by_weight(encoder: TextEncoder) -> None:
    """A weight-3 owner gets three tokens of compute for each one of a weight-1 owner while both wait."""
    hold = [("query", 1.0, [OWNERS["query"] + " hold"])]
    texts = {owner: [OWNERS[owner] + " the cat sleeps"] * 96 for owner in ("bulk", "heavy")}
    _, batches, _, _ = asyncio.run(serve(encoder, hold, [("bulk", 1.0, texts["bulk"]), ("heavy", 3.0, texts["heavy"])]))
    rows = [owner for batch in batches[1:] for owner in batch]
    heavy_done = max(i for i, owner in enumerate(rows) if owner == "heavy")
    served = Counter(rows[: heavy_done + 1])  # while both had texts waiting
    tokens = {owner: served[owner] * len(encoder.encode(texts[owner][:1])[0].ids) for owner in texts}
    assert served["heavy"] == 96
    assert 2.5 <= tokens["heavy"] / tokens["bulk"] <= 3.5  # first-in first-out: all of bulk's first


def test_bulk_alone_fills_batches_to_the_budget(encoder: TextEncoder) -> None:
    """With no one else waiting, the fair slice does not apply: batches take max_batch texts."""
    _, batches, shapes, slice_tokens = asyncio.run(serve(encoder, [("bulk", 1.0, texts_of("bulk", 64))], []))
    assert sum(len(b) for b in batches) == 64
    assert max(rows * longest for rows, longest in shapes) > slice_tokens  # the slice would have cut them


def test_a_single_query_is_answered_before_a_bulk_stream_queued_ahead_of_it(daemon: Daemon) -> None:
    """A real daemon: 32 requests of 16 texts from one client, then one text from another; first-in first-out
    would answer the query last."""
    with daemon.client() as warm:
        warm.embed("load the model first")
    context = zmq.Context.instance()
    bulk, query = context.socket(zmq.DEALER), context.socket(zmq.DEALER)
    poller = zmq.Poller()
    for socket in (bulk, query):
        socket.connect(f"ipc://{daemon.socket}")
        poller.register(socket, zmq.POLLIN)
    order = []
    try:
        for i in range(32):
            bulk.send_multipart([b"", encode_request("embed", i, texts=texts_of("bulk", 16))])
        query.send_multipart([b"", encode_request("embed", "q", texts=["where is the station"])])
        while len(order) < 33:
            ready = dict(poller.poll(30_000))
            assert ready, f"not answered: {33 - len(order)} requests"
            for socket in (bulk, query):
                if socket in ready:
                    header = msgpack.unpackb(socket.recv_multipart()[1])
                    assert header["ok"], header
                    order.append(header["id"])
    finally:
        bulk.close(linger=0)
        query.close(linger=0)
    assert order.index("q") <= 16, order  # measured: after 1; first-in first-out: after all 32


def test_many_owners_of_single_texts_share_one_full_batch(encoder: TextEncoder) -> None:
    """24 clients each wait with one short text (no one has more than a slice waiting): they run in one
    batch bigger than the fair slice, not cut into slices, which would only cost throughput."""
    hold = [("bulk", 1.0, [OWNERS["bulk"] + " hold"])]
    singles = [(f"client-{i}", 1.0, [OWNERS["query"] + " where is the station"]) for i in range(24)]
    outcomes, batches, shapes, slice_tokens = asyncio.run(serve(encoder, hold, singles))
    assert batches[1:] == [["query"] * 24]
    rows, longest = shapes[1]
    assert rows * longest > slice_tokens  # the slice would have cut this batch
    for (_, _, texts), embedded in zip(hold + singles, outcomes):
        np.testing.assert_allclose(embedded.vectors, [expected(encoder, t) for t in texts], rtol=1e-6)
