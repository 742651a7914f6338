"""model "auto" with constraints, expect_fingerprint and fallbacks, through a real daemon, tiny real models with
golden vectors and real profiles from the bench op."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tinymodels
from akidb_embed.manifest import Manifest
from akidb_embed.routing import Candidate, parse_constraints, rank
from akidb_embed_client import AUTO_MODEL, BadRequest, ModelChanged, ModelUnavailable, NoModelFits
from daemon_process import Daemon, run_daemon, wait_for

ENCODER_FIELDS = {**tinymodels.BGE_FIELDS, "languages": ["en"], "params": 20_000}
E5_FIELDS = {**tinymodels.E5_FIELDS, "languages": ["en", "de"], "params": 20_000}
QWEN3_FIELDS = {**tinymodels.QWEN3_FIELDS, "multilingual": True, "params": 90_000}


@pytest.fixture(scope="module")
def golden(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Golden vectors of the tiny encoder (CLS and mean pooling) and decoder, so that the models count as verified."""
    root = tmp_path_factory.mktemp("golden")
    return {
        "cls": tinymodels.write_golden(root / "cls.npz", tiny_models["encoder"], "cls"),
        "mean": tinymodels.write_golden(root / "mean.npz", tiny_models["encoder"], "mean"),
        "last_token": tinymodels.write_golden(root / "last.npz", tiny_models["decoder"], "last_token"),
    }


@pytest.fixture
def routed(tmp_path: Path, tiny_models: dict[str, Path], golden: dict[str, Path]) -> Iterator[Daemon]:
    """en-tiny (CLS, English), e5-tiny (mean, English and German, query/passage prompts), qwen3-tiny (multilingual,
    48 dimensions, Matryoshka 16/32, the largest), plain-tiny (no golden vectors: unverified)."""
    catalog = tmp_path / "models.d"
    encoder, decoder = tiny_models["encoder"], tiny_models["decoder"]
    tinymodels.write_manifest(catalog, "en-tiny", encoder, golden["cls"], **ENCODER_FIELDS)
    tinymodels.write_manifest(catalog, "e5-tiny", encoder, golden["mean"], **E5_FIELDS)
    tinymodels.write_manifest(catalog, "qwen3-tiny", decoder, golden["last_token"], **QWEN3_FIELDS)
    tinymodels.write_manifest(catalog, "plain-tiny", encoder, **{**ENCODER_FIELDS, "languages": ["en", "fr"]})
    with run_daemon(catalog, memory={"keep_alive": -1}) as running:
        yield running


def auto(daemon: Daemon, **constraints: object) -> object:
    with daemon.client() as client:
        return client.embed(["Der Zug fährt um sechs."], AUTO_MODEL, constraints=constraints)


def test_auto_picks_by_languages_dimension_memory_and_task(routed: Daemon) -> None:
    """1. German: e5-tiny and qwen3-tiny fit; by quality the larger qwen3-tiny first, by memory the smaller charge
    2. the choice serves, judged on the manifest (no profile yet)  3. 16 dimensions: only qwen3-tiny, cut to 16
    4. task query within e5-tiny's memory: e5-tiny with its query prompt, the same vector as asking for it by name."""
    with routed.client() as client:
        memory = {m["id"]: m["memory_mb"] for m in client.models()}
        by_quality = [c["id"] for c in client.fits({"languages": ["de"]})["fitting"]]
        by_memory = [c["id"] for c in client.fits({"languages": ["de"], "prefer": "memory"})["fitting"]]
    assert by_quality == ["qwen3-tiny", "e5-tiny"]
    assert by_memory == sorted(by_quality, key=lambda model: (memory[model], model))
    chosen = auto(routed, languages=["de"])
    assert (chosen.model, chosen.auto["judged_on"]) == ("qwen3-tiny", "manifest")
    short = auto(routed, dimension=16)
    assert (short.model, short.shape, short.auto["dimensions"]) == ("qwen3-tiny", (1, 16), 16)
    with routed.client() as client:
        memory = {m["id"]: m["memory_mb"] for m in client.models()}
    assert memory["e5-tiny"] < memory["qwen3-tiny"]  # measured when loaded, estimated from the file before
    query = auto(routed, languages=["de"], max_memory_mb=memory["e5-tiny"], task="query")
    with routed.client() as client:
        named = client.embed(["Der Zug fährt um sechs."], "e5-tiny", prompt="query")
    assert (query.model, query.auto["prompt"]) == ("e5-tiny", "query")
    np.testing.assert_allclose(np.asarray(query), np.asarray(named), atol=1e-6)


def test_auto_prefers_a_loaded_model_and_chooses_the_same_each_time(routed: Daemon) -> None:
    """1. English, by quality: qwen3-tiny, again and again  2. with en-tiny loaded, en-tiny (a cold load avoided)."""
    assert {auto(routed, languages=["en"]).model for _ in range(5)} == {"qwen3-tiny"}
    with routed.client() as client:
        client.unload("qwen3-tiny")
        client.load("en-tiny")
    assert {auto(routed, languages=["en"]).model for _ in range(5)} == {"en-tiny"}


def test_no_model_fits_names_every_models_reason(routed: Daemon) -> None:
    """Swahili at 20 dimensions: every model excluded, each with the constraint it failed; unverified plain-tiny too."""
    with pytest.raises(NoModelFits) as caught:
        auto(routed, languages=["sw"], dimension=20)
    reasons = {c["id"]: c["reason"] for c in caught.value.candidates}
    assert reasons.keys() == {"en-tiny", "e5-tiny", "qwen3-tiny", "plain-tiny"}
    assert reasons["en-tiny"].startswith("languages: covers en, not sw")
    assert reasons["qwen3-tiny"].startswith("dimension: gives 16, 32, 48, not 20")
    assert reasons["plain-tiny"].startswith("verification unverified")
    assert "en-tiny: languages" in caught.value.message


def test_latency_comes_from_profiles_and_a_cold_load_counts(routed: Daemon) -> None:
    """1. bench en-tiny and e5-tiny (real profiles)  2. a latency bound between their p95 and a cold load: the loaded
    one fits, the unloaded one fails on its cold load  3. a bound below every p95: only the never-profiled qwen3-tiny
    is left, judged on its manifest."""
    with routed.client(timeout=120) as client:
        profiles = {model: client.bench(model, texts=20) for model in ("en-tiny", "e5-tiny")}
        client.unload("e5-tiny")
        bound = max(p["p95_ms"] for p in profiles.values()) + 1.0
        assert profiles["e5-tiny"]["cold_load_ms"] > 1.0  # so the bound leaves the cold load out
        fits = client.fits({"languages": ["en"], "max_latency_ms": bound})
    assert fits["fitting"][0]["id"] == "en-tiny" and fits["fitting"][0]["judged_on"] == "profile"
    rejected = {r["id"]: r["reason"] for r in fits["rejected"]}
    assert "cold load" in rejected["e5-tiny"] and rejected["e5-tiny"].startswith("max_latency_ms")
    fastest = min(p["p95_ms"] for p in profiles.values()) / 2
    chosen = auto(routed, languages=["en"], max_latency_ms=fastest)
    assert (chosen.model, chosen.auto["judged_on"]) == ("qwen3-tiny", "manifest")


@pytest.mark.parametrize(("constraints", "named"), [
    ({"fastest": True}, "constraints has no key 'fastest'"),
    ({"max_latency_ms": -5}, "constraints.max_latency_ms must be positive"),
    ({"max_latency_ms": "5"}, "constraints.max_latency_ms must be a number"),
    ({"languages": "de"}, "constraints.languages must be a list"),
    ({"languages": [3]}, "constraints.languages must be a list of language codes"),
    ({"dimension": 0}, "constraints.dimension must be positive"),
    ({"task": "rerank"}, "constraints.task must be one of query, passage, symmetric"),
    ({"prefer": "price"}, "constraints.prefer must be one of quality, speed, memory"),
])
def test_bad_constraints_are_bad_requests_naming_the_field(routed: Daemon, constraints: dict, named: str) -> None:
    with pytest.raises(BadRequest, match=named):
        auto(routed, **constraints)
    with routed.client() as client, pytest.raises(BadRequest, match='model "auto"'):
        client._call("embed", texts=["x"], model="en-tiny", constraints={"languages": ["en"]})
    assert routed.alive()


def test_expect_fingerprint_fails_after_a_hot_swap(routed: Daemon, tmp_path: Path) -> None:
    """1. en-tiny's fingerprint pins a client  2. its model file is replaced: a hot swap  3. the pinned call gets
    model_changed with both fingerprints; an unpinned one gets the new model."""
    folder = tmp_path / "swapping"
    tinymodels.build_encoder(folder)
    tinymodels.write_manifest(routed.catalog, "swapping", folder, **ENCODER_FIELDS)
    with routed.client() as client:
        wait_for(lambda: any(m["id"] == "swapping" for m in client.models()))
        old = client.embed("before", "swapping").fingerprint
        assert client.embed("still", "swapping", expect_fingerprint=old).fingerprint == old
        tinymodels.build_encoder(tmp_path / "new", seed=7)
        os.replace(tmp_path / "new" / tinymodels.MODEL_FILE, folder / tinymodels.MODEL_FILE)
        wait_for(lambda: client.embed("after", "swapping").fingerprint != old)
        new = client.embed("after", "swapping").fingerprint
    with routed.client() as client:
        pinned = type(client)(routed.socket, timeout=10, retries=1, expect_fingerprint=old)
        with pinned, pytest.raises(ModelChanged) as caught:
            pinned.embed("pinned", "swapping")
    assert (caught.value.expected, caught.value.fingerprint) == (old, new)
    assert old in caught.value.message and new in caught.value.message


def test_a_fallback_serves_only_by_consent_and_never_across_dimensions(routed: Daemon, tmp_path: Path) -> None:
    """1. broken (garbage ONNX, 32 dims) falls back on en-tiny (32) and qwen3-tiny (48)  2. without consent its error
    stands  3. with allow_fallback en-tiny serves and the reply says why  4. broken-wide's only fallback is 48-wide:
    refused, unless the request asks for 32 dimensions, which both give."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / tinymodels.MODEL_FILE).write_bytes(b"not an onnx graph")
    (bad / tinymodels.TOKENIZER_FILE).write_text(tinymodels.build_encoder_tokenizer().to_str())
    tinymodels.write_manifest(routed.catalog, "broken", bad, **ENCODER_FIELDS, fallback=["qwen3-tiny", "en-tiny"])
    tinymodels.write_manifest(routed.catalog, "broken-wide", bad, **ENCODER_FIELDS, fallback=["qwen3-tiny"])
    with routed.client() as client:
        wait_for(lambda: {"broken", "broken-wide"} <= {m["id"] for m in client.models()})
        with pytest.raises(ModelUnavailable):
            client.embed("no consent", "broken")
        served = client.embed("consent", "broken", allow_fallback=True)
        assert served.model == "en-tiny" and served.shape == (1, 32)
        assert (served.fallback["requested"], served.fallback["reason"]) == ("broken", "model_unavailable")
        with pytest.raises(ModelUnavailable):
            client.embed("too wide", "broken-wide", allow_fallback=True)
        narrowed = client.embed("narrowed", "broken-wide", allow_fallback=True, dimensions=32)
        assert (narrowed.model, narrowed.shape) == ("qwen3-tiny", (1, 32))


def test_the_cli_chooses_as_the_protocol_does(routed: Daemon) -> None:
    """``embed --auto --languages de`` and ``models --fits`` show the same choice as the client."""
    expected = auto(routed, languages=["de"]).model
    common = [sys.executable, "-m", "akidb_embed"]
    embed = subprocess.run([*common, "embed", "--socket", str(routed.socket), "--auto", "--languages", "de", "Hallo"],
                           capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    assert f"auto: {expected}" in embed.stdout
    fits = subprocess.run([*common, "models", "--socket", str(routed.socket), "--fits", "--languages", "de,en"],
                          capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    lines = fits.stdout.splitlines()
    assert expected in lines[2] and "en-tiny" in fits.stdout.split("does not fit")[1]


def candidate(model_id: str, **changes: object) -> Candidate:
    """A verified, loaded 32-dimension English model as routing sees it, with ``changes``."""
    manifest = Manifest(model_id, Path(f"{model_id}.toml"), Path("model.onnx"), Path("tokenizer.json"), 32, 512,
                        "mean", languages=("en",), params=changes.pop("params", 1000))  # fmt: skip
    fields = {"state": "ready", "verification": "passed", "memory_mb": 50.0, "profile": None, **changes}
    return Candidate(model_id, manifest, **fields)


def test_rank_orders_loaded_then_preference_then_id_and_skips_open_circuits() -> None:
    """1. an open circuit and a failed self-test exclude  2. loaded before not loaded, whatever the preference
    3. ties go to the smaller id  4. speed: the lowest p95, a cold load added, unprofiled last."""
    profile = {"p95_ms": 2.0, "cold_load_ms": 100.0, "min_cosine": 0.9999}
    pool = [
        candidate("b", params=5000), candidate("a", params=5000), candidate("big", state="available", params=9000),
        candidate("tripped", circuit="open", error="inference failed"), candidate("bad", verification="failed"),
        candidate("fast", state="available", profile=profile), candidate("slow", profile={**profile, "p95_ms": 9.0}),
    ]
    fitting, rejected = rank(pool, parse_constraints({}))
    assert [c.model for c in fitting] == ["a", "b", "slow", "big", "fast"]
    assert {r["id"]: r["reason"] for r in rejected} == {
        "tripped": "circuit open: inference failed",
        "bad": "verification failed (no golden vectors passed: akidb-embed convert --again)"}
    by_speed = [c.model for c in rank(pool, parse_constraints({"prefer": "speed"}))[0]]
    assert by_speed == ["slow", "a", "b", "fast", "big"]  # slow 9 ms loaded; fast 2 + 100 ms cold
    rejected = {r["id"]: r["reason"] for r in rank(pool, parse_constraints({"max_latency_ms": 50}))[1]}
    assert rejected["fast"] == "max_latency_ms: p95 102.0 ms with its cold load of 100 ms, over 50"
    assert "slow" not in rejected  # 9 ms, loaded
