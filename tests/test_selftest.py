"""The golden-vector self-test at load: a real daemon, real ONNX sessions and real golden files. No mocks.

One daemon serves a catalog of tiny models, each with its own fault: golden vectors made with mean pooling under a
manifest saying cls, a corrupted weight tensor, a swapped tokenizer, a garbage golden file, none at all. Each
faulty model fails its self-test with the figures and the likely cause, and serves nothing; the sound ones serve.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import tinymodels
from akidb_embed_client import Client, errors
from daemon_process import Daemon, run_daemon
from onnx import numpy_helper
from tokenizers import processors

from akidb_embed.manifest import load_manifest


def _corrupt_weights(model_dir: Path, out: Path) -> None:
    """A copy of the model whose output projection (one initializer) is scrambled."""
    shutil.copytree(model_dir, out)
    graph = onnx.load(str(out / tinymodels.MODEL_FILE))
    (proj,) = [init for init in graph.graph.initializer if init.name == "proj"]
    values = numpy_helper.to_array(proj)
    proj.CopyFrom(numpy_helper.from_array(np.random.default_rng(1).permutation(values.ravel()).reshape(values.shape),
                                          "proj"))
    onnx.save(graph, str(out / tinymodels.MODEL_FILE))


def _swap_tokenizer(model_dir: Path, out: Path) -> None:
    """A copy of the model with a tokenizer that leaves out [CLS]: valid ids, different tokens."""
    shutil.copytree(model_dir, out)
    tok = tinymodels.build_encoder_tokenizer()
    tok.post_processor = processors.TemplateProcessing(single="$A [SEP]", special_tokens=[("[SEP]", tok.token_to_id("[SEP]"))])
    tok.save(str(out / tinymodels.TOKENIZER_FILE))


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Sound models (bge-tiny, qwen3-tiny verified; plain-tiny without golden vectors) and four faulty ones."""
    root = tmp_path_factory.mktemp("selftest")
    encoder, decoder, catalog = root / "encoder", root / "decoder", root / "models.d"
    tinymodels.build_encoder(encoder)
    tinymodels.build_decoder(decoder)
    cls_golden = tinymodels.write_golden(encoder / "golden.npz", encoder, "cls")
    bge = tinymodels.BGE_FIELDS
    tinymodels.write_manifest(catalog, "bge-tiny", encoder, golden=cls_golden, **bge, default=True)
    tinymodels.write_manifest(catalog, "qwen3-tiny", decoder, golden=tinymodels.write_golden(
        decoder / "golden.npz", decoder, "last_token"), **tinymodels.QWEN3_FIELDS)
    tinymodels.write_manifest(catalog, "plain-tiny", encoder, **bge)
    mean_golden = tinymodels.write_golden(root / "mean-golden.npz", encoder, "mean")
    tinymodels.write_manifest(catalog, "wrong-pooling", encoder, golden=mean_golden, **bge)  # cls on mean vectors
    _corrupt_weights(encoder, root / "corrupt")
    tinymodels.write_manifest(catalog, "corrupt-weights", root / "corrupt", golden=root / "corrupt" / "golden.npz", **bge)
    _swap_tokenizer(encoder, root / "swapped")
    tinymodels.write_manifest(catalog, "swapped-tokenizer", root / "swapped", golden=root / "swapped" / "golden.npz",
                              **bge)
    (root / "garbage.npz").write_bytes(b"PK\x03\x04 not a zip archive at all" * 8)
    tinymodels.write_manifest(catalog, "broken-golden", encoder, golden=root / "garbage.npz", **bge)
    return catalog


@pytest.fixture(scope="module")
def daemon(catalog: Path) -> Iterator[Daemon]:
    with run_daemon(catalog) as running:
        yield running


def _models(client: Client) -> dict[str, dict]:
    return {m["id"]: m for m in client.models()}


def _refused(client: Client, model_id: str) -> str:
    """The model_unavailable message an embed to ``model_id`` gets (it must get no vectors)."""
    with pytest.raises(errors.ModelUnavailable) as caught:
        client.embed(["What is the capital of France?"], model=model_id)
    return str(caught.value)


def test_verified_models_pass_and_show_their_figures(daemon: Daemon) -> None:
    """1. before a load, verification is pending (golden vectors) or unverified (none)  2. embeds serve  3. models
    says passed with min cosine >= 0.999 and the self-test's ms, inside load_ms  4. the load log line has them."""
    with daemon.client() as client:
        before = _models(client)
        assert [before[i]["verification"] for i in ("bge-tiny", "qwen3-tiny", "plain-tiny")] == [
            "pending", "pending", "unverified"]
        assert before["bge-tiny"]["selftest"] is None
        for model_id in ("bge-tiny", "qwen3-tiny"):
            assert client.embed(["hello there"], model=model_id).model == model_id
        after = _models(client)
    for model_id in ("bge-tiny", "qwen3-tiny"):
        info = after[model_id]
        selftest = info["selftest"]
        print(f"\n{model_id}: self-test {selftest}, load {info['load_ms']} ms")
        assert info["state"] == "ready" and info["verification"] == "passed"
        assert selftest["min_cosine"] >= 0.999 and selftest["mean_cosine"] >= selftest["min_cosine"]
        assert selftest["tolerance"] == 0.999 and selftest["texts"] == len(tinymodels.GOLDEN_TEXTS)
        assert 0 < selftest["ms"] < info["load_ms"]
    assert re.search(r"model bge-tiny: loaded in \d+ ms .*; self-test min cosine [01]\.\d{6} on 8 texts in \d+ ms",
                     daemon.log())


def test_a_model_without_golden_vectors_serves_unverified(daemon: Daemon) -> None:
    with daemon.client() as client:
        assert client.embed(["hello"], model="plain-tiny").model == "plain-tiny"
        info = _models(client)["plain-tiny"]
    assert (info["state"], info["verification"], info["selftest"]) == ("ready", "unverified", None)
    assert "model plain-tiny: loaded in" in daemon.log() and "unverified: no golden vectors" in daemon.log()


@pytest.mark.parametrize(("model_id", "cause"), [
    ("wrong-pooling", "the manifest's pooling = 'cls' looks wrong: pooling = 'mean' matches"),
    ("corrupt-weights", "the weights do not match the golden vectors (corrupt or replaced model file"),
    ("swapped-tokenizer", "the tokenizer differs from the one the vectors were made with"),
])
def test_a_model_failing_its_self_test_serves_nothing(daemon: Daemon, model_id: str, cause: str) -> None:
    """1. an embed gets model_unavailable naming the figures and the cause  2. models lists it failed with that
    error  3. asked again, it is still refused  4. the verified model serves meanwhile."""
    with daemon.client() as client:
        message = _refused(client, model_id)
        print(f"\n{model_id}: {message}")
        assert "self-test failed: min cosine" in message and ", mean " in message and "(need >= 0.999)" in message
        assert "worst text #" in message and cause in message
        info = _models(client)[model_id]
        assert info["state"] == "failed" and cause in info["error"] and info["verification"] == "failed"
        assert "min cosine" in _refused(client, model_id)
        assert client.embed(["still serving"], model="bge-tiny").model == "bge-tiny"
    assert daemon.alive()


def test_a_broken_golden_file_fails_the_load_with_the_fix(daemon: Daemon) -> None:
    with daemon.client() as client:
        message = _refused(client, "broken-golden")
        assert "garbage.npz cannot be read" in message and "akidb-embed convert --again" in message
        assert _models(client)["broken-golden"]["state"] == "failed"
        assert client.embed(["still serving"], model="bge-tiny").model == "bge-tiny"


def test_the_golden_file_counts_as_a_version_not_as_content(catalog: Path) -> None:
    """The golden file is among the files whose change is a new version, and outside the content fingerprint."""
    from akidb_embed.manifest import fingerprint, model_files, version_files

    manifest = load_manifest(catalog / "bge-tiny.toml")
    assert manifest.golden is not None and manifest.golden.path.name == "golden.npz"
    assert version_files(manifest) == [*model_files(manifest), manifest.golden.path]
    assert fingerprint(manifest) == fingerprint(load_manifest(catalog / "plain-tiny.toml"))
