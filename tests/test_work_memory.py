"""Memory the cache can trust, through real daemons and real models: the worst batch the limits
allow stays inside the charged footprint, working memory goes back when idle, two models serving
at once are each charged their own, a budget too small for one text is refused at load, and
growth beyond a charge is logged with the model's id and booked to it.

The tiny attention encoder has real [batch, heads, length, length] score tensors (max_length
2048, ~130 MiB per row at full length), so a token budget alone would let one batch of 8 rows
take over 2 GiB; MiniLM is the real model.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import tinymodels
from akidb_embed.manifest import fingerprint, load_manifest
from akidb_embed.workmem import CostModel, ModelShape, PeakMeter, fit, read_shape
from akidb_embed_client import errors
from daemon_process import SEEDED_TUNING, Daemon, run_daemon, wait_for
from fortunes import fortune_sentences

MB = 1 << 20
BOUND = 1.1  # RSS above the idle daemon may exceed the loaded models' charges by this factor at most


def rss(daemon: Daemon) -> int:
    """The daemon's resident memory in bytes, from /proc."""
    for line in Path(f"/proc/{daemon.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def model_info(daemon: Daemon, model_id: str) -> dict:
    with daemon.client() as client:
        return next(m for m in client.models() if m["id"] == model_id)


def long_texts(count: int, min_chars: int) -> list[str]:
    """``count`` distinct real texts of at least ``min_chars`` characters (fortunes joined)."""
    pool = fortune_sentences(count + 200)
    texts = []
    for i in range(count):
        text, j = "", i
        while len(text) < min_chars:
            text += pool[j % len(pool)] + " "
            j += 7
        texts.append(text)
    return texts


@pytest.fixture(scope="module")
def attention_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("attention") / "encoder"
    tinymodels.build_attention_encoder(folder)
    return folder


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny encoder at hidden size 1024: ~16 MB of weights, no attention."""
    folder = tmp_path_factory.mktemp("big") / "encoder"
    tinymodels.build_encoder(folder, hidden=1024)
    return folder


def seed_understated(tmp_path: Path, catalog: Path, model_ids: tuple[str, ...]) -> Path:
    """A state dir remembering, for each id, a measurement that badly under-states the attention
    model (1 MiB of weights, 64 MiB of work, a cost model that lets any batch in), as a stale one would."""
    wrong = {"weights": MB, "work": 64 * MB, "peak": 0, "token_bytes": 1.0, "pair_bytes": 1.0, "work_mb": 0,
             "tuning": SEEDED_TUNING}
    digest = fingerprint(load_manifest(catalog / f"{model_ids[0]}.toml"))
    records = {m: {"fingerprint": digest, "footprint": 65 * MB, "memory": wrong} for m in model_ids}
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "state.json").write_text(json.dumps({"models": records, "warm": []}))
    return state_dir


def serving(daemon: Daemon, model_ids: tuple[str, ...], texts: list[str], sends: int) -> list[threading.Thread]:
    """One client thread per model, started, each sending ``texts`` ``sends`` times."""

    def serve(model_id: str) -> None:
        with daemon.client(timeout=120) as client:
            for _ in range(sends):
                client.embed(texts, model=model_id)

    threads = [threading.Thread(target=serve, args=(m,)) for m in model_ids]
    for thread in threads:
        thread.start()
    return threads


def attention_catalog(root: Path, model: Path, **fields: object) -> Path:
    catalog = root / "models.d"
    tinymodels.write_manifest(catalog, "attn", model, **{**tinymodels.ATTENTION_FIELDS, **fields})
    return catalog


def test_the_worst_batch_of_a_long_context_model_stays_within_its_charge(tmp_path: Path, attention_model: Path) -> None:
    """1. max_length 2048, limits that let 8 rows of 2048 tokens into one batch by tokens alone
    2. requests of 16 texts of 2048 tokens, twice  3. RSS above idle <= 1.1 x the charge
    4. idle again: the working memory goes back."""
    catalog = attention_catalog(tmp_path, attention_model)
    texts = long_texts(16, 12_000)  # well over 2048 tokens each: truncated to max_length
    with run_daemon(catalog, limits={"max_texts": 16}) as daemon, daemon.client(timeout=120) as client:
        idle = rss(daemon)
        for _ in range(2):
            vectors = client.embed(texts)
            assert vectors.tokens == [2048] * 16
        after_worst = rss(daemon)
        info = model_info(daemon, "attn")
        charge = info["memory_mb"] * MB
        assert info["work_mb"] * MB < CostModel(0, 8 * 4).batch_bytes(8, 2048) / 3  # 8 rows: 1 GiB of fp32 scores, 8 heads
        assert after_worst - idle <= BOUND * charge, (after_worst - idle) / MB
        assert info["peak_mb"] <= info["work_mb"] * BOUND  # the cost model held: no batch outgrew the budget
        wait_for(lambda: rss(daemon) - idle <= info["weights_mb"] * MB + 16 * MB, timeout=5)


def test_minilm_worst_request_stays_within_its_charge(minilm_catalog: Path) -> None:
    """1. all-MiniLM-L6-v2 fp32, default limits  2. the worst request: 256 texts over max_length, 3 times
    3. RSS above idle <= 1.1 x the charge, and the charge <= 220 MiB  4. idle: back to about the weights."""
    texts = long_texts(256, 2_000)
    with run_daemon(minilm_catalog) as daemon, daemon.client(timeout=300) as client:
        idle = rss(daemon)
        client.embed("short text")
        info = model_info(daemon, "all-minilm-l6-v2")
        for _ in range(3):
            assert max(client.embed(texts).tokens) == 256
        grown = rss(daemon) - idle
        info = model_info(daemon, "all-minilm-l6-v2")
        assert info["memory_mb"] <= 220
        assert info["memory_mb"] == pytest.approx(info["weights_mb"] + max(info["work_mb"], info["peak_mb"]), abs=0.2)
        assert grown <= BOUND * info["memory_mb"] * MB, grown / MB
        wait_for(lambda: rss(daemon) - idle <= info["weights_mb"] * MB + 16 * MB, timeout=5)


def test_two_models_serving_at_once_are_each_charged_their_own(
    tmp_path: Path, attention_model: Path, big_model: Path
) -> None:
    """1. each model loaded alone: its weights and budget  2. a fresh daemon loads and serves both at once
    3. each is charged what it was charged alone (its load is measured in a process of its own)."""
    catalog = attention_catalog(tmp_path, attention_model)
    tinymodels.write_manifest(catalog, "big", big_model, **{**tinymodels.BGE_FIELDS, "dimension": 1024})
    alone = {}
    for model_id in ("attn", "big"):
        with run_daemon(catalog, limits={"max_texts": 16}) as daemon, daemon.client(timeout=120) as client:
            client.embed("x", model=model_id)
            alone[model_id] = model_info(daemon, model_id)
    with run_daemon(catalog, limits={"max_texts": 16}) as daemon:
        idle = rss(daemon)
        for thread in serving(daemon, ("attn", "big"), long_texts(16, 12_000), sends=3):
            thread.join()
        together = {m: model_info(daemon, m) for m in ("attn", "big")}
        grown = rss(daemon) - idle
    for model_id, info in together.items():
        assert info["weights_mb"] == pytest.approx(alone[model_id]["weights_mb"], abs=4)
        assert info["work_mb"] == pytest.approx(alone[model_id]["work_mb"], rel=0.1)  # automatic: measured each time
    assert together["big"]["weights_mb"] > together["attn"]["weights_mb"] + 4  # ~7 MB of weights vs 0.7
    assert grown <= BOUND * sum(info["memory_mb"] for info in together.values()) * MB


def test_a_budget_too_small_for_one_text_is_refused_at_load(tmp_path: Path, attention_model: Path) -> None:
    """1. work_mb = 16 for a model whose one 2048-token text needs over 100 MiB  2. a request is refused
    with the needed and configured MiB  3. the daemon and other requests carry on."""
    catalog = attention_catalog(tmp_path, attention_model, work_mb=16)
    with run_daemon(catalog) as daemon, daemon.client(timeout=60) as client:
        with pytest.raises(errors.ModelUnavailable) as caught:
            client.embed("x", model="attn")
        message = caught.value.message
        needed = int(message.split("needs ~")[1].split(" MiB")[0])
        assert needed > 100 and "work_mb is 16" in message and "max_length 2048" in message
        assert model_info(daemon, "attn")["state"] == "failed"
        assert client.ping()["pong"] is True


def test_growth_beyond_a_charge_is_logged_with_the_model_and_booked_to_it(
    tmp_path: Path, attention_model: Path
) -> None:
    """1. a remembered measurement that badly under-states the model (as a stale one would)
    2. long texts: batches outgrow the budget  3. the log names the model, its peak and charge grow."""
    catalog = attention_catalog(tmp_path, attention_model)
    state_dir = seed_understated(tmp_path, catalog, ("attn",))
    with run_daemon(catalog, state_dir=str(state_dir), limits={"max_texts": 16}) as daemon:
        with daemon.client(timeout=120) as client:
            client.embed(long_texts(4, 12_000), model="attn")
        info = model_info(daemon, "attn")
        assert info["peak_mb"] > 64 and info["memory_mb"] == pytest.approx(1 + info["peak_mb"], abs=0.2)
        assert "model attn: a batch of" in daemon.log() and "over its budget of 64 MiB" in daemon.log()


def test_growth_no_batch_can_be_blamed_for_counts_as_pressure(tmp_path: Path, attention_model: Path) -> None:
    """1. two ids on the attention model, both remembered with a measurement far too small
    2. both serve long texts at once, so no batch runs alone to be measured
    3. upkeep sees the daemon over its charges: it says so, names both, and status shows it."""
    catalog = attention_catalog(tmp_path, attention_model)
    tinymodels.write_manifest(catalog, "attn2", attention_model, **tinymodels.ATTENTION_FIELDS)
    state_dir = seed_understated(tmp_path, catalog, ("attn", "attn2"))
    seen = []
    with run_daemon(catalog, state_dir=str(state_dir), limits={"max_texts": 16}, memory={"check_seconds": 0.1}) as daemon:
        threads = serving(daemon, ("attn", "attn2"), long_texts(8, 12_000), sends=4)
        with daemon.client() as client:
            while any(thread.is_alive() for thread in threads):
                seen.append(client.status()["budget"]["unaccounted_mb"])
        for thread in threads:
            thread.join()
        log = daemon.log()
    assert max(seen) > 100
    assert "beyond its models' charges" in log and "attn, attn2" in log and "counted as memory pressure" in log


def test_the_prior_comes_from_config_json(tmp_path: Path) -> None:
    """MiniLM's shape: attention memory per row grows with 12 heads x length², the rest with hidden and FFN width."""
    assert read_shape(tmp_path) is None
    config = {"hidden_size": 384, "num_attention_heads": 12, "intermediate_size": 1536, "num_hidden_layers": 6}
    (tmp_path / "config.json").write_text(json.dumps(config))
    shape = read_shape(tmp_path)
    assert shape == ModelShape(hidden=384, heads=12, intermediate=1536)
    prior = CostModel.from_shape(shape)
    assert prior.pair_bytes == 12 * 4 * 3 and prior.token_bytes == 4 * (7 * 384 + 2 * 1536)
    assert prior.max_rows(512, prior.batch_bytes(8, 64)) == 0 < prior.max_rows(64, prior.batch_bytes(8, 64)) == 8


def test_fit_never_under_predicts_a_measurement() -> None:
    truth = CostModel(token_bytes=30_000, pair_bytes=1_200)
    samples = [(r, n, int(truth.batch_bytes(r, n) * noise)) for (r, n), noise in
               zip([(1, 256), (2, 128), (64, 16)], (1.05, 0.97, 1.02))]  # fmt: skip
    model = fit(samples)
    assert all(model.batch_bytes(r, n) >= peak for r, n, peak in samples)
    assert model.pair_bytes == pytest.approx(1_200, rel=0.15) and model.token_bytes == pytest.approx(30_000, rel=0.15)


def test_fit_of_a_model_without_a_length_squared_term() -> None:
    """A fused attention keeps no scores tensor: the fit keeps only the per-token term."""
    samples = [(r, n, r * n * 20_000) for r, n in [(1, 512), (2, 256), (64, 16)]]
    model = fit(samples)
    assert model.pair_bytes == pytest.approx(0, abs=1e-6) and model.token_bytes == pytest.approx(20_000)


def test_peak_meter_measures_lone_work_and_never_shared_work() -> None:
    meter = PeakMeter()
    if not meter.enabled:
        pytest.skip("this kernel or sandbox does not let a process reset its peak RSS")
    with meter.measure() as alone:
        block = np.ones(64 * MB // 8)  # 64 MiB, touched
    del block
    assert alone.peak is not None and alone.peak >= 60 * MB
    with meter.measure() as first:
        with meter.measure() as second:
            block = np.ones(16 * MB // 8)
        del block
    assert first.peak is None and second.peak is None
