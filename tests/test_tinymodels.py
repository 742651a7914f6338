"""The tiny test models are sound: padding-safe when driven correctly, visibly wrong when not."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from tokenizers import Tokenizer

import tinymodels as tm
from akidb_embed.manifest import load_manifest
from akidb_embed.tomlcompat import tomllib

TEXTS = [
    "hi",
    "What is the capital of France?",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.",
    "cheap hotel",
    "Where is the café in Paris?",
]
# Below this cosine two vectors count as clearly different: a correct run gives >= 0.9999 (50x closer).
DIFFERENT = 0.995


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One build of each model shape, shared by the module."""
    root = tmp_path_factory.mktemp("tiny")
    tm.build_encoder(root / "encoder")
    tm.build_encoder(root / "encoder-no-types", with_token_type_ids=False)
    tm.build_decoder(root / "decoder")
    return {"encoder": root / "encoder", "encoder-no-types": root / "encoder-no-types", "decoder": root / "decoder"}


def _session(model_dir: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(model_dir / tm.MODEL_FILE), providers=["CPUExecutionProvider"])


def run_padded(
    model_dir: Path, texts: list[str], side: str, *, model_mask: bool = True, positions: str = "cumsum"
) -> tuple[np.ndarray, np.ndarray]:
    """Hidden states and attention mask for a padded batch; the keywords inject daemon-style mistakes."""
    tok = Tokenizer.from_file(str(model_dir / tm.TOKENIZER_FILE))
    pad_token = tm.ENCODER_PAD if tok.token_to_id(tm.ENCODER_PAD) is not None else tm.DECODER_EOS
    tok.enable_padding(direction=side, pad_id=tok.token_to_id(pad_token), pad_token=pad_token)
    tok.enable_truncation(512)
    encodings = tok.encode_batch(texts)
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
    if positions == "cumsum":
        position_ids = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    else:  # "arange": the classic mistake under left padding
        position_ids = np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()
    session = _session(model_dir)
    available = {
        "input_ids": ids,
        "attention_mask": mask if model_mask else np.ones_like(mask),
        "token_type_ids": np.zeros_like(ids),
        "position_ids": position_ids,
    }
    hidden = session.run(None, {i.name: available[i.name] for i in session.get_inputs()})[0]
    return hidden.astype(np.float64), mask


def pool(hidden: np.ndarray, mask: np.ndarray, pooling: str) -> np.ndarray:
    """Correct pooling on a padded batch (either side), L2-normalized."""
    m = mask[:, :, None].astype(np.float64)
    if pooling == "mean":
        vectors = (hidden * m).sum(axis=1) / m.sum(axis=1)
    elif pooling == "cls":
        first = mask.argmax(axis=1)
        vectors = hidden[np.arange(len(hidden)), first]
    else:
        last = mask.shape[1] - 1 - mask[:, ::-1].argmax(axis=1)
        vectors = hidden[np.arange(len(hidden)), last]
    return unit(vectors)


def unit(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1."""
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity."""
    return (unit(a) * unit(b)).sum(axis=-1)


def references(model_dir: Path, pooling: str, dimensions: int | None = None) -> np.ndarray:
    """reference_embed for every text, stacked."""
    return np.stack([tm.reference_embed(model_dir, t, pooling, dimensions=dimensions) for t in TEXTS])


def padded_rows(mask: np.ndarray) -> np.ndarray:
    """Indices of the texts that got padding in this batch."""
    return np.flatnonzero(mask.sum(axis=1) < mask.shape[1])


def test_models_load_with_expected_inputs_and_output(models: dict[str, Path]) -> None:
    expected = {
        "encoder": (["input_ids", "attention_mask", "token_type_ids"], 32),
        "encoder-no-types": (["input_ids", "attention_mask"], 32),
        "decoder": (["input_ids", "attention_mask", "position_ids"], 48),
    }
    for name, (inputs, hidden) in expected.items():
        session = _session(models[name])
        assert [i.name for i in session.get_inputs()] == inputs
        assert all(i.type == "tensor(int64)" for i in session.get_inputs())
        assert session.get_outputs()[0].name == "last_hidden_state"
        states, mask = run_padded(models[name], TEXTS, "right")
        assert states.shape == (*mask.shape, hidden)


def test_encoder_tokenizer_is_bert_style(models: dict[str, Path]) -> None:
    tok = Tokenizer.from_file(str(models["encoder"] / tm.TOKENIZER_FILE))
    encoding = tok.encode("What is the capital of France?")
    assert encoding.tokens[0] == "[CLS]" and encoding.tokens[-1] == "[SEP]"
    assert "[UNK]" not in encoding.tokens
    assert tok.padding is not None and tok.padding["pad_token"] == tm.ENCODER_PAD
    assert "[UNK]" not in tok.encode("Xylophone quizzes 42").tokens  # unseen words split, not unknown


def test_decoder_tokenizer_is_qwen3_style(models: dict[str, Path]) -> None:
    tok = Tokenizer.from_file(str(models["decoder"] / tm.TOKENIZER_FILE))
    encoding = tok.encode("How do I cook rice?")
    assert encoding.tokens[-1] == tm.DECODER_EOS
    assert tm.DECODER_EOS not in encoding.tokens[:-1]
    assert tok.padding is None
    assert tok.token_to_id(tm.DECODER_EOS) is not None
    assert tok.decode(tok.encode("Zebras, émigrés!").ids) == "Zebras, émigrés!"  # byte-level: nothing lost


@pytest.mark.parametrize("build", [tm.build_encoder, tm.build_decoder])
def test_builds_are_byte_stable_and_seeded(tmp_path: Path, build: Callable[..., None]) -> None:
    # Byte-stable files keep manifest fingerprints stable across rebuilds of the same model.
    for name in ("a", "b"):
        build(tmp_path / name, seed=3)
    build(tmp_path / "c", seed=4)
    for file in (tm.MODEL_FILE, tm.TOKENIZER_FILE):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()
    assert (tmp_path / "a" / tm.MODEL_FILE).read_bytes() != (tmp_path / "c" / tm.MODEL_FILE).read_bytes()


@pytest.mark.parametrize(
    ("model", "fields"),
    [
        ("encoder", tm.BGE_FIELDS),
        ("encoder", tm.E5_FIELDS),
        ("encoder-no-types", tm.BGE_FIELDS),
        ("decoder", tm.QWEN3_FIELDS),
    ],
)
def test_padded_batch_matches_reference(models: dict[str, Path], model: str, fields: Mapping[str, Any]) -> None:
    hidden, mask = run_padded(models[model], TEXTS, fields["padding_side"])
    assert len(padded_rows(mask)) >= 3
    batched = pool(hidden, mask, fields["pooling"])
    assert cosines(batched, references(models[model], fields["pooling"])).min() >= 0.9999
    for dim in fields.get("matryoshka_dimensions", ()):
        cut = references(models[model], fields["pooling"], dimensions=dim)
        assert cosines(unit(batched[:, :dim]), cut).min() >= 0.9999


def test_prompts_change_the_vector(models: dict[str, Path]) -> None:
    query = tm.QWEN3_FIELDS["prompts"]["query"]
    plain = tm.reference_embed(models["decoder"], "cheap hotel", "last_token")
    prompted = tm.reference_embed(models["decoder"], query + "cheap hotel", "last_token")
    assert float(plain @ prompted) < DIFFERENT


def assert_wrong(wrong: np.ndarray, right: np.ndarray, rows: np.ndarray) -> None:
    """Every padded text's vector must move clearly away from the correct one."""
    assert len(rows) >= 3
    assert cosines(wrong[rows], right[rows]).max() < DIFFERENT


def test_mean_pooling_that_ignores_the_mask_is_visible(models: dict[str, Path]) -> None:
    hidden, mask = run_padded(models["encoder"], TEXTS, "right")
    assert_wrong(unit(hidden.mean(axis=1)), references(models["encoder"], "mean"), padded_rows(mask))


def test_unmasked_encoder_is_visible(models: dict[str, Path]) -> None:
    hidden, mask = run_padded(models["encoder"], TEXTS, "right", model_mask=False)
    assert_wrong(pool(hidden, mask, "cls"), references(models["encoder"], "cls"), padded_rows(mask))


def test_left_padding_an_encoder_is_visible(models: dict[str, Path]) -> None:
    hidden, mask = run_padded(models["encoder"], TEXTS, "left")
    assert_wrong(pool(hidden, mask, "cls"), references(models["encoder"], "cls"), padded_rows(mask))


def test_last_position_under_right_padding_is_visible(models: dict[str, Path]) -> None:
    hidden, mask = run_padded(models["decoder"], TEXTS, "right")
    assert_wrong(unit(hidden[:, -1]), references(models["decoder"], "last_token"), padded_rows(mask))
    # Right padding itself is fine when the last real token is found from the mask.
    right = pool(hidden, mask, "last_token")
    assert cosines(right, references(models["decoder"], "last_token")).min() >= 0.9999


def test_decoder_position_and_mask_mistakes_are_visible(models: dict[str, Path]) -> None:
    expected = references(models["decoder"], "last_token")
    hidden, mask = run_padded(models["decoder"], TEXTS, "left", positions="arange")
    assert_wrong(pool(hidden, mask, "last_token"), expected, padded_rows(mask))
    hidden, mask = run_padded(models["decoder"], TEXTS, "left", model_mask=False)
    assert_wrong(pool(hidden, mask, "last_token"), expected, padded_rows(mask))


def test_reference_embed_normalizes_cuts_and_truncates(models: dict[str, Path]) -> None:
    full = tm.reference_embed(models["decoder"], TEXTS[2], "last_token")
    cut = tm.reference_embed(models["decoder"], TEXTS[2], "last_token", dimensions=16)
    assert np.isclose(np.linalg.norm(full), 1.0) and np.isclose(np.linalg.norm(cut), 1.0)
    assert np.allclose(cut, unit(full[:16]), atol=1e-6)
    raw = tm.reference_embed(models["encoder"], TEXTS[2], "mean", normalize=False)
    assert not np.isclose(np.linalg.norm(raw), 1.0)
    short = tm.reference_embed(models["encoder"], TEXTS[2], "mean", max_length=6)
    assert float(short @ unit(raw)) < DIFFERENT


@pytest.mark.parametrize("fields", [tm.BGE_FIELDS, tm.E5_FIELDS, tm.QWEN3_FIELDS])
def test_presets_write_loadable_manifests(tmp_path: Path, models: dict[str, Path], fields: Mapping[str, Any]) -> None:
    model_dir = models["decoder" if fields["pooling"] == "last_token" else "encoder"]
    path = tm.write_manifest(tmp_path / "catalog", f"tiny-{fields['family']}", model_dir, **fields)
    assert path == tmp_path / "catalog" / f"tiny-{fields['family']}.toml"
    manifest = load_manifest(path)
    assert manifest.model == (model_dir / tm.MODEL_FILE).resolve() and manifest.model.is_file()
    assert manifest.tokenizer == (model_dir / tm.TOKENIZER_FILE).resolve() and manifest.tokenizer.is_file()
    assert manifest.prompts == dict(fields.get("prompts", {}))
    assert manifest.matryoshka_dimensions == tuple(fields.get("matryoshka_dimensions", ()))
    assert (manifest.pooling, manifest.padding_side, manifest.dimension) == (
        fields["pooling"], fields["padding_side"], fields["dimension"]
    )


def test_write_manifest_escapes_strings(tmp_path: Path, models: dict[str, Path]) -> None:
    nasty = 'say "hi"\\ then\n\ttab \x01 café ✓'
    fields = {**tm.BGE_FIELDS, "name": nasty, "params": None, "languages": ["en", "fr"]}
    prompts = {"query": nasty, "with space": "x: "}
    path = tm.write_manifest(tmp_path, "odd", models["encoder"], **fields, prompts=prompts, default_prompt="with space")
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    assert data["name"] == nasty and data["prompts"] == prompts
    assert "params" not in data and data["languages"] == ["en", "fr"]
    assert load_manifest(path).resolve_prompt(None) == "x: "
    with pytest.raises(TypeError):
        tm.write_manifest(tmp_path, "bad", models["encoder"], **{**tm.BGE_FIELDS, "memory_mb": b"1.5"})
