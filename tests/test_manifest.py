"""manifest.py and settings.py on real files: shipped examples, validation errors, prompts, fingerprints, settings."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from akidb_embed import settings as settings_module
from akidb_embed.manifest import (
    Conversion, Golden, Manifest, ManifestError, fingerprint, load_manifest, model_files as files_of, version_files,
)
from akidb_embed.settings import DEFAULT_SOCKET, SOCKET_ENV, Limits, Settings, SettingsError, load_settings

REPO = Path(__file__).resolve().parents[1]
EXAMPLES_DIR = REPO / "etc" / "akidb-embed" / "models.d"
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.toml"))
SHIPPED_CONFIG = REPO / "etc" / "akidb-embed" / "akidb-embed.toml"

# The smallest valid manifest; files/ sits next to the catalog folder, so the paths are relative.
VALID: dict[str, Any] = {
    "id": "mini",
    "model": "../files/model.onnx",
    "tokenizer": "../files/tokenizer.json",
    "dimension": 8,
    "max_length": 32,
    "pooling": "mean",
}
REQUIRED = ("id", "model", "tokenizer", "dimension", "max_length", "pooling")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(type(value).__name__)


def write_toml(path: Path, data: dict[str, Any]) -> Path:
    """Top-level keys first, then one [table] per dict value."""
    lines = [f"{k} = {toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for table, values in data.items():
        if isinstance(values, dict):
            lines += [f"[{table}]", *(f"{json.dumps(k)} = {toml_value(v)}" for k, v in values.items())]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_manifest(tmp_path: Path, file: str = "mini.toml", **changes: Any) -> Path:
    """VALID with ``changes`` (a value of None removes the field) as tmp_path/catalog/<file>."""
    data = {**VALID, **changes}
    return write_toml(tmp_path / "catalog" / file, {k: v for k, v in data.items() if v is not None})


def model_files(folder: Path, onnx: bytes = b"onnx graph v1", tokenizer: bytes = b'{"model": "wordpiece"}') -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(onnx)
    (folder / "tokenizer.json").write_bytes(tokenizer)
    return folder


# --- the shipped files ---------------------------------------------------------------------------


def test_the_documented_examples_ship() -> None:
    names = {p.stem for p in EXAMPLES}
    assert {"all-minilm-l6-v2", "bge-small-en-v1.5", "e5-small-v2", "qwen3-embedding-0.6b"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_shipped_example_manifest_loads_disabled(path: Path) -> None:
    manifest = load_manifest(path)
    assert manifest.id == path.stem
    assert manifest.enabled is False
    assert manifest.model == Path(f"/var/lib/akidb-embed/models/{manifest.id}/model.onnx")
    assert manifest.tokenizer == Path(f"/var/lib/akidb-embed/models/{manifest.id}/tokenizer.json")
    assert manifest.default_prompt is None or manifest.default_prompt in manifest.prompts


def test_shipped_config_is_all_comments_and_equals_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SOCKET_ENV, raising=False)
    code = [line for line in SHIPPED_CONFIG.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert code == ["[limits]", "[memory]", "[metrics]", "[circuit]"]
    assert load_settings(SHIPPED_CONFIG) == Settings()


def test_shipped_config_shows_the_default_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Uncommenting every `#key = value` line gives the defaults; default_model is an example, not a default, and
    events_socket spells out the path the default derives from the socket."""
    monkeypatch.delenv(SOCKET_ENV, raising=False)
    text = re.sub(r"(?m)^#(\w+ = )", r"\1", SHIPPED_CONFIG.read_text())
    uncommented = tmp_path / "akidb-embed.toml"
    uncommented.write_text(text)
    settings = load_settings(uncommented)
    assert settings == replace(Settings(), default_model="all-minilm-l6-v2", events_socket=Settings().events_path)


# --- a valid manifest ----------------------------------------------------------------------------


def test_minimal_manifest_round_trips_with_paths_relative_to_its_folder(tmp_path: Path) -> None:
    path = write_manifest(tmp_path)
    manifest = load_manifest(path)
    assert manifest == Manifest(
        id="mini",
        path=path,
        model=(tmp_path / "files" / "model.onnx").resolve(),
        tokenizer=(tmp_path / "files" / "tokenizer.json").resolve(),
        dimension=8,
        max_length=32,
        pooling="mean",
    )
    assert (manifest.normalize, manifest.padding_side, manifest.enabled, manifest.default) == (True, "right", True, False)
    assert manifest.providers is None
    assert (manifest.precision, manifest.conversion) == ("fp32", None)
    assert load_manifest(path) == manifest  # the registry compares manifests to notice changes


def test_full_manifest_round_trips(tmp_path: Path) -> None:
    fields = {
        "model": "/models/x/model.onnx",  # absolute paths stay as written
        "tokenizer": "tok/tokenizer.json",
        "normalize": False,
        "name": "org/Mini-Model",
        "family": "minilm",
        "params": 22713216,
        "padding_side": "left",
        "pooling": "last_token",
        "prompts": {"query": "query: ", "passage": "passage: "},
        "default_prompt": "passage",
        "matryoshka_dimensions": [2, 4],
        "memory_mb": 220,
        "languages": ["en", "de"],
        "multilingual": True,
        "license": "apache-2.0",
        "default": True,
        "enabled": False,
        "providers": ["cuda", "cpu"],
        "precision": "fp16",
        "conversion": {"source": "../src/mini", "fuse": False},  # relative: from the manifest's folder
        "golden": {"file": "../files/golden.npz", "min_cosine": 0.985},  # relative too
        "fallback": ["mini-int8", "other"],
    }
    path = write_manifest(tmp_path, **fields)
    manifest = load_manifest(path)
    assert manifest.model == Path("/models/x/model.onnx")
    assert manifest.tokenizer == (tmp_path / "catalog" / "tok" / "tokenizer.json").resolve()
    assert manifest.matryoshka_dimensions == (2, 4)
    assert manifest.languages == ("en", "de")
    assert manifest.providers == ("cuda", "cpu")
    assert manifest.prompts == {"query": "query: ", "passage": "passage: "}
    assert manifest.conversion == Conversion((tmp_path / "src" / "mini").resolve(), fuse=False)
    assert manifest.golden == Golden((tmp_path / "files" / "golden.npz").resolve(), 0.985)
    assert manifest.describe() == {
        "id": "mini", "name": "org/Mini-Model", "family": "minilm", "params": 22713216, "dimension": 8,
        "max_length": 32, "pooling": "last_token", "normalize": False, "prompts": ["passage", "query"],
        "matryoshka_dimensions": [2, 4], "memory_mb": 220, "languages": ["en", "de"], "multilingual": True,
        "license": "apache-2.0", "default": True, "enabled": False, "precision": "fp16",
        "fallback": ["mini-int8", "other"],
    }


# --- one case per error ----------------------------------------------------------------------------


def assert_refused(path: Path, *fragments: str) -> None:
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    message = str(caught.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_not_toml(tmp_path: Path) -> None:
    path = tmp_path / "mini.toml"
    path.write_text('id = "mini"\ndimension = \n')
    assert_refused(path, "not valid TOML")


def test_unreadable_file(tmp_path: Path) -> None:
    assert_refused(tmp_path / "absent.toml", "cannot read it")
    not_utf8 = tmp_path / "latin1.toml"
    not_utf8.write_bytes(b'name = "caf\xe9"\n')
    assert_refused(not_utf8, "cannot read it")


@pytest.mark.parametrize("field", REQUIRED)
def test_missing_required_field(tmp_path: Path, field: str) -> None:
    assert_refused(write_manifest(tmp_path, **{field: None}), f"missing required field {field!r}")


def test_unknown_field(tmp_path: Path) -> None:
    assert_refused(write_manifest(tmp_path, colour="red"), "unknown field 'colour'", "known fields")


@pytest.mark.parametrize(
    ("field", "value", "got"),
    [
        ("dimension", "384", "str"),
        ("dimension", True, "bool"),  # TOML booleans are Python bools, which are ints
        ("max_length", 1.5, "float"),
        ("params", False, "bool"),
        ("memory_mb", True, "bool"),
        ("normalize", "yes", "str"),
        ("enabled", 1, "int"),
        ("model", 5, "int"),
        ("prompts", "query: ", "str"),
        ("matryoshka_dimensions", 64, "int"),
        ("providers", "cpu", "str"),
        ("precision", 16, "int"),
        ("conversion", "/models/src", "str"),
    ],
)
def test_wrong_type(tmp_path: Path, field: str, value: Any, got: str) -> None:
    assert_refused(write_manifest(tmp_path, **{field: value}), f"field {field!r} must be", f"not {got}")


def test_bad_pooling(tmp_path: Path) -> None:
    assert_refused(write_manifest(tmp_path, pooling="max"), "pooling 'max'", "mean, cls, last_token")


def test_bad_padding_side(tmp_path: Path) -> None:
    assert_refused(write_manifest(tmp_path, padding_side="center"), "padding_side 'center'", "right, left")


def test_id_must_match_the_file_stem(tmp_path: Path) -> None:
    assert_refused(write_manifest(tmp_path, file="other.toml"), "id 'mini' does not match the file name", "mini.toml")


@pytest.mark.parametrize("bad_id", ["has space", "-leading-dash", "a/b", "..", "", "x" * 129, "naïve"])
def test_id_with_bad_characters(tmp_path: Path, bad_id: str) -> None:
    assert_refused(write_manifest(tmp_path, file="bad.toml", id=bad_id), f"id {bad_id!r} must be letters")


@pytest.mark.parametrize(("field", "value"), [("dimension", 0), ("max_length", -1), ("memory_mb", 0), ("params", -5)])
def test_non_positive_number(tmp_path: Path, field: str, value: int) -> None:
    assert_refused(write_manifest(tmp_path, **{field: value}), f"{field} must be positive, not {value}")


@pytest.mark.parametrize("dims", [[4, 16], [0], [4, "2"], [True]])
def test_matryoshka_dimension_outside_1_to_dimension(tmp_path: Path, dims: list[Any]) -> None:
    assert_refused(write_manifest(tmp_path, matryoshka_dimensions=dims), "matryoshka_dimensions", "1..8")


def test_matryoshka_may_list_the_full_dimension(tmp_path: Path) -> None:
    assert load_manifest(write_manifest(tmp_path, matryoshka_dimensions=[4, 8])).matryoshka_dimensions == (4, 8)


def test_default_prompt_not_among_prompts(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, prompts={"query": "query: "}, default_prompt="passage")
    assert_refused(path, "default_prompt 'passage' is not one of the prompts")
    assert_refused(write_manifest(tmp_path, default_prompt="query"), "default_prompt 'query'")


def test_prompt_text_must_be_a_string(tmp_path: Path) -> None:
    assert_refused(write_manifest(tmp_path, prompts={"query": 1}), "prompt 'query' must be a string")


def test_languages_must_be_strings(tmp_path: Path) -> None:
    assert_refused(write_manifest(tmp_path, languages=["en", 2]), "languages must be strings")


def test_unknown_provider(tmp_path: Path) -> None:
    assert_refused(write_manifest(tmp_path, providers=["cuda", "rocm"]), "provider 'rocm'", "tensorrt, cuda, cpu")


@pytest.mark.parametrize("fallback", [["mini"], ["../x"], [3]])
def test_fallback_names_other_models(tmp_path: Path, fallback: list) -> None:
    """A model cannot fall back on itself, on a path or on a number."""
    assert_refused(write_manifest(tmp_path, fallback=fallback), "fallback must list other models' ids")


def test_unknown_precision(tmp_path: Path) -> None:
    assert_refused(write_manifest(tmp_path, precision="bf16"), "precision 'bf16'", "fp32, int8, fp16")


@pytest.mark.parametrize(
    ("conversion", "fragments"),
    [
        ({"fuse": True}, ("[conversion] needs `source`",)),
        ({"source": "/m", "quantize": "int8"}, ("unknown key 'quantize' in [conversion]", "source, fuse")),
        ({"source": "/m", "fuse": "yes"}, ("[conversion] fuse must be a bool, not str",)),
        ({"source": 5}, ("[conversion] source must be a str, not int",)),
    ],
)
def test_bad_conversion_table(tmp_path: Path, conversion: dict, fragments: tuple[str, ...]) -> None:
    assert_refused(write_manifest(tmp_path, conversion=conversion), *fragments)


@pytest.mark.parametrize(
    ("golden", "fragments"),
    [
        ({"min_cosine": 0.999}, ("[golden] needs `file`", "convert --again")),
        ({"file": "golden.npz"}, ("[golden] needs `min_cosine`",)),
        ({"file": "golden.npz", "min_cosine": 0.999, "tolerance": 0.1}, ("unknown key 'tolerance' in [golden]",
                                                                         "file, min_cosine")),
        ({"file": 3, "min_cosine": 0.999}, ("[golden] file must be a str, not int",)),
        ({"file": "golden.npz", "min_cosine": "0.999"}, ("[golden] min_cosine must be a float, not str",)),
        ({"file": "golden.npz", "min_cosine": True}, ("[golden] min_cosine must be a float, not bool",)),
        ({"file": "golden.npz", "min_cosine": 0.0}, ("[golden] min_cosine must be in (0, 1], not 0.0",)),
        ({"file": "golden.npz", "min_cosine": 1.5}, ("[golden] min_cosine must be in (0, 1], not 1.5",)),
        ({"file": "golden.npz", "min_cosine": -0.5}, ("min_cosine must be in (0, 1]",)),
    ],
)
def test_bad_golden_table(tmp_path: Path, golden: dict, fragments: tuple[str, ...]) -> None:
    assert_refused(write_manifest(tmp_path, golden=golden), "mini.toml", *fragments)


def test_golden_is_optional_and_min_cosine_may_be_one(tmp_path: Path) -> None:
    assert load_manifest(write_manifest(tmp_path)).golden is None
    golden = load_manifest(write_manifest(tmp_path, golden={"file": "/g/golden.npz", "min_cosine": 1})).golden
    assert golden == Golden(Path("/g/golden.npz"), 1.0) and isinstance(golden.min_cosine, float)


# --- prompts -----------------------------------------------------------------------------------------

PROMPTS = {"query": "query: ", "passage": "passage: "}


def test_resolve_named_prompt(tmp_path: Path) -> None:
    manifest = load_manifest(write_manifest(tmp_path, prompts=PROMPTS, default_prompt="passage"))
    assert manifest.resolve_prompt("query") == "query: "  # a named prompt beats the default


def test_resolve_literal_prefix(tmp_path: Path) -> None:
    manifest = load_manifest(write_manifest(tmp_path, prompts=PROMPTS))
    assert manifest.resolve_prompt("Represent this: ") == "Represent this: "
    assert manifest.resolve_prompt("Query") == "Query"  # names are case-sensitive: this is a literal


def test_resolve_default_prompt(tmp_path: Path) -> None:
    manifest = load_manifest(write_manifest(tmp_path, prompts=PROMPTS, default_prompt="passage"))
    assert manifest.resolve_prompt(None) == "passage: "


def test_resolve_no_prompt(tmp_path: Path) -> None:
    assert load_manifest(write_manifest(tmp_path, prompts=PROMPTS)).resolve_prompt(None) == ""
    assert load_manifest(write_manifest(tmp_path)).resolve_prompt(None) == ""


# --- fingerprint ---------------------------------------------------------------------------------------


@pytest.fixture
def fingerprinted(tmp_path: Path) -> tuple[Path, str]:
    """A manifest over real files, and its fingerprint."""
    model_files(tmp_path / "files")
    path = write_manifest(tmp_path)
    return path, fingerprint(load_manifest(path))


def test_fingerprint_is_16_hex_and_stable(fingerprinted: tuple[Path, str], tmp_path: Path) -> None:
    path, first = fingerprinted
    assert re.fullmatch(r"[0-9a-f]{16}", first)
    assert fingerprint(load_manifest(path)) == first
    # Same bytes elsewhere, and descriptive fields changed: same fingerprint.
    shutil.copytree(tmp_path / "files", tmp_path / "copy")
    moved = write_manifest(
        tmp_path, model="../copy/model.onnx", tokenizer="../copy/tokenizer.json",
        name="renamed", family="other", license="mit", memory_mb=999, enabled=False, default=True,
    )
    assert fingerprint(load_manifest(moved)) == first


def test_fingerprint_changes_with_the_onnx_bytes(fingerprinted: tuple[Path, str], tmp_path: Path) -> None:
    path, first = fingerprinted
    (tmp_path / "files" / "model.onnx").write_bytes(b"onnx graph v2")  # same length, one byte differs
    assert fingerprint(load_manifest(path)) != first


def test_fingerprint_changes_with_the_tokenizer_bytes(fingerprinted: tuple[Path, str], tmp_path: Path) -> None:
    path, first = fingerprinted
    (tmp_path / "files" / "tokenizer.json").write_bytes(b'{"model": "wordpiecf"}')
    assert fingerprint(load_manifest(path)) != first


@pytest.mark.parametrize(
    "change", [{"pooling": "cls"}, {"normalize": False}, {"max_length": 33}, {"padding_side": "left"}]
)
def test_fingerprint_changes_with_pooling_settings(fingerprinted: tuple[Path, str], tmp_path: Path, change: dict) -> None:
    _, first = fingerprinted
    assert fingerprint(load_manifest(write_manifest(tmp_path, **change))) != first


def test_golden_vectors_are_a_version_file_but_not_content(fingerprinted: tuple[Path, str], tmp_path: Path) -> None:
    """New golden vectors reload the model (version_files) but compute nothing differently (same fingerprint)."""
    path, first = fingerprinted
    without = load_manifest(path)
    assert version_files(without) == files_of(without)
    with_golden = load_manifest(write_manifest(tmp_path, golden={"file": "../files/golden.npz", "min_cosine": 0.99}))
    assert fingerprint(with_golden) == first
    assert version_files(with_golden) == [*files_of(with_golden), tmp_path / "files" / "golden.npz"]


def test_fingerprint_changes_with_external_onnx_data(fingerprinted: tuple[Path, str], tmp_path: Path) -> None:
    path, _ = fingerprinted
    data = tmp_path / "files" / "model.onnx.data"
    data.write_bytes(b"weights v1")
    before = fingerprint(load_manifest(path))
    data.write_bytes(b"weights v2")
    assert fingerprint(load_manifest(path)) != before


def test_temporaries_beside_the_graph_are_not_its_data(fingerprinted: tuple[Path, str], tmp_path: Path) -> None:
    path, first = fingerprinted
    for name in ("model.onnx.part", "model.onnx~", "model.onnx.dpkg-new", "model.onnx.data.tmp"):
        (tmp_path / "files" / name).write_bytes(b"half a download")
    assert fingerprint(load_manifest(path)) == first


# --- settings --------------------------------------------------------------------------------------------


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv(SOCKET_ENV, raising=False)
    return monkeypatch


def test_socket_precedence(tmp_path: Path, no_env: pytest.MonkeyPatch) -> None:
    config = write_toml(tmp_path / "akidb-embed.toml", {"socket": "/cfg/embed.sock"})
    no_env.setattr(settings_module, "DEFAULT_CONFIG", tmp_path / "absent.toml")
    assert load_settings().socket == DEFAULT_SOCKET
    assert load_settings(config).socket == Path("/cfg/embed.sock")
    assert load_settings(config, socket=None).socket == Path("/cfg/embed.sock")  # None overrides are ignored
    no_env.setenv(SOCKET_ENV, "")
    assert load_settings(config).socket == Path("/cfg/embed.sock")  # an empty variable is ignored
    no_env.setenv(SOCKET_ENV, "/env/embed.sock")
    assert load_settings(config).socket == Path("/env/embed.sock")
    assert load_settings(config, socket=Path("/cli/embed.sock")).socket == Path("/cli/embed.sock")


def test_config_beats_defaults_and_cli_beats_config(tmp_path: Path, no_env: pytest.MonkeyPatch) -> None:
    config = write_toml(
        tmp_path / "akidb-embed.toml",
        {"catalog": "/cfg/models.d", "log_level": "debug", "providers": ["cpu"], "limits": {"max_texts": 8}},
    )
    loaded = load_settings(config, catalog=Path("/cli/models.d"))
    assert loaded.catalog == Path("/cli/models.d")
    assert loaded.log_level == "debug"
    assert loaded.providers == ("cpu",)
    assert loaded.limits == Limits(max_texts=8)
    assert loaded.state_dir == Settings().state_dir


@pytest.mark.parametrize(("data", "named"), [({"sockt": "/x"}, "sockt"), ({"limits": {"max_textz": 3}}, "max_textz")])
def test_unknown_setting(tmp_path: Path, no_env: pytest.MonkeyPatch, data: dict, named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        load_settings(write_toml(tmp_path / "akidb-embed.toml", data))


@pytest.mark.parametrize(
    ("name", "value"),
    [("max_texts", 0), ("queue_texts", -1), ("batch_tokens", True), ("max_batch", "8"), ("max_request_bytes", 1.5)],
)
def test_bad_limit(tmp_path: Path, no_env: pytest.MonkeyPatch, name: str, value: Any) -> None:
    with pytest.raises(SettingsError, match=f"limits.{name} must be an integer >= 1"):
        load_settings(write_toml(tmp_path / "akidb-embed.toml", {"limits": {name: value}}))


def test_limits_must_be_a_table(tmp_path: Path, no_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(SettingsError, match=r"\[limits\] must be a table"):
        load_settings(write_toml(tmp_path / "akidb-embed.toml", {"limits": 5}))


@pytest.mark.parametrize(
    ("data", "named"),
    [
        ({"providers": ["cuda", "rocm"]}, "providers"),
        ({"providers": []}, "providers"),
        ({"intra_op_threads": -1}, "intra_op_threads"),
        ({"log_level": "verbose"}, "log_level"),
    ],
)
def test_bad_value(tmp_path: Path, no_env: pytest.MonkeyPatch, data: dict, named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        load_settings(write_toml(tmp_path / "akidb-embed.toml", data))


@pytest.mark.parametrize(
    ("name", "value"),
    [("log_level", 5), ("socket", 5), ("catalog", True), ("drain_seconds", "x"), ("intra_op_threads", "4"),
     ("default_model", 5)],
)
def test_wrong_type_of_setting(tmp_path: Path, no_env: pytest.MonkeyPatch, name: str, value: Any) -> None:
    with pytest.raises(SettingsError, match=name):
        load_settings(write_toml(tmp_path / "akidb-embed.toml", {name: value}))


def test_explicit_config_that_is_missing(tmp_path: Path, no_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(SettingsError, match="cannot read config"):
        load_settings(tmp_path / "absent.toml")


def test_config_that_is_not_toml(tmp_path: Path, no_env: pytest.MonkeyPatch) -> None:
    config = tmp_path / "akidb-embed.toml"
    config.write_text("socket = \n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(config)


def test_missing_default_config_gives_the_defaults(tmp_path: Path, no_env: pytest.MonkeyPatch) -> None:
    # Point the default path at a real, absent file: the machine's own /etc must not matter.
    no_env.setattr(settings_module, "DEFAULT_CONFIG", tmp_path / "absent.toml")
    assert load_settings() == Settings()
