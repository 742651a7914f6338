"""Model manifests: one TOML file per model in the catalog, parsed and validated here.

Pure apart from reading the file: ``load_manifest`` returns a frozen ``Manifest`` or raises
``ManifestError`` whose message names the file, the field and what is allowed. A manifest is
data only: TOML has no includes, and no field names another manifest or config; its paths name
model files, which ``confine.py`` keeps under the model roots.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .filesize import MAX_MANIFEST_BYTES, FileRefused, read_bounded
from .tomlcompat import tomllib

POOLINGS = ("mean", "cls", "last_token")
PADDING_SIDES = ("right", "left")
PROVIDERS = ("tensorrt", "cuda", "cpu")
PRECISIONS = ("fp32", "int8", "fp16")
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Files written on the way to the real one, whose final rename or write is what counts:
# editor swap and backup files, downloads in progress, dpkg/ucf/rpm side copies, vim's probe.
_TEMP_SUFFIXES = ("~", ".swp", ".swx", ".tmp", ".part", ".partial", ".rpmnew", ".rpmsave")
_TEMP_INFIXES = (".dpkg-", ".ucf-")
_VIM_PROBE = "4913"


class ManifestError(ValueError):
    """A manifest that cannot be used; the message says why and how to fix it."""


@dataclass(frozen=True)
class Conversion:
    """How ``akidb-embed convert`` made the model (the ``[conversion]`` table), so that ``convert --again`` redoes it.

    The other settings it needs (precision, max_length, pooling) are the manifest's own fields.
    """

    source: Path  # the sentence-transformers / HF model folder
    fuse: bool = True


@dataclass(frozen=True)
class Golden:
    """Reference texts with their sentence-transformers vectors (the ``[golden]`` table), for the load's self-test."""

    path: Path  # golden.npz, written by convert next to the model
    min_cosine: float  # every text's cosine to its reference must reach it


@dataclass(frozen=True)
class Manifest:
    id: str
    path: Path
    model: Path
    tokenizer: Path
    dimension: int
    max_length: int
    pooling: str
    normalize: bool = True
    name: str = ""
    family: str = ""
    params: int | None = None
    padding_side: str = "right"
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt: str | None = None
    matryoshka_dimensions: tuple[int, ...] = ()
    memory_mb: int | None = None  # charge estimate before the first load measures it
    work_mb: int | None = None  # working-memory budget of one batch; None: limits.work_mb
    languages: tuple[str, ...] = ()
    multilingual: bool = False
    license: str = ""
    default: bool = False
    enabled: bool = True
    providers: tuple[str, ...] | None = None
    pinned: bool = False  # loaded at start and never evicted
    keep_alive: float | None = None  # idle seconds before unloading; None: the daemon's default
    precision: str = "fp32"  # of the weights: fp16 graphs are for GPU providers only
    conversion: Conversion | None = None
    golden: Golden | None = None  # None: served, but unverified
    fallback: tuple[str, ...] = ()  # model ids that may serve its requests when it cannot, if a request consents

    def resolve_prompt(self, prompt: str | None) -> str:
        """The text prefixed to each input: a named prompt, a literal prefix, or the default."""
        if prompt is None:
            return self.prompts.get(self.default_prompt, "") if self.default_prompt else ""
        return self.prompts.get(prompt, prompt)

    def describe(self) -> dict[str, Any]:
        """The manifest as plain data for the ``models`` reply."""
        return {
            "id": self.id,
            "name": self.name,
            "family": self.family,
            "params": self.params,
            "dimension": self.dimension,
            "max_length": self.max_length,
            "pooling": self.pooling,
            "normalize": self.normalize,
            "prompts": sorted(self.prompts),
            "matryoshka_dimensions": list(self.matryoshka_dimensions),
            "memory_mb": self.memory_mb,
            "languages": list(self.languages),
            "multilingual": self.multilingual,
            "license": self.license,
            "default": self.default,
            "enabled": self.enabled,
            "precision": self.precision,
            "fallback": list(self.fallback),
        }


# field name -> (accepted types, required)
_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "id": ((str,), True),
    "model": ((str,), True),
    "tokenizer": ((str,), True),
    "dimension": ((int,), True),
    "max_length": ((int,), True),
    "pooling": ((str,), True),
    "normalize": ((bool,), False),
    "name": ((str,), False),
    "family": ((str,), False),
    "params": ((int,), False),
    "padding_side": ((str,), False),
    "prompts": ((dict,), False),
    "default_prompt": ((str,), False),
    "matryoshka_dimensions": ((list,), False),
    "memory_mb": ((int,), False),
    "work_mb": ((int,), False),
    "languages": ((list,), False),
    "multilingual": ((bool,), False),
    "license": ((str,), False),
    "default": ((bool,), False),
    "enabled": ((bool,), False),
    "providers": ((list,), False),
    "pinned": ((bool,), False),
    "keep_alive": ((int, float), False),
    "precision": ((str,), False),
    "conversion": ((dict,), False),
    "golden": ((dict,), False),
    "fallback": ((list,), False),
}
_TABLES = ("conversion", "golden")
# [table] key -> accepted types
_CONVERSION_FIELDS: dict[str, tuple[type, ...]] = {"source": (str,), "fuse": (bool,)}
_GOLDEN_FIELDS: dict[str, tuple[type, ...]] = {"file": (str,), "min_cosine": (float, int)}


def load_manifest(path: Path) -> Manifest:
    """Read and validate one manifest file."""
    try:
        data = tomllib.loads(read_bounded(path, MAX_MANIFEST_BYTES, "manifest").decode("utf-8"))
    except FileRefused as exc:
        raise ManifestError(str(exc)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: cannot read it: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"{path}: not valid TOML: {exc}") from None
    return parse_manifest(data, path)


def parse_manifest(data: dict[str, Any], path: Path) -> Manifest:
    """Validate manifest data read from ``path`` (relative file paths resolve against its folder)."""
    _check_types(data, path)
    manifest = Manifest(
        **{k: v for k, v in data.items() if k not in ("model", "tokenizer", *_TABLES)},
        path=path,
        model=_resolve(path, data["model"]),
        tokenizer=_resolve(path, data["tokenizer"]),
        conversion=_conversion(data["conversion"], path) if "conversion" in data else None,
        golden=_golden(data["golden"], path) if "golden" in data else None,
    )
    manifest = _normalize_sequences(manifest)
    _check_values(manifest)
    return manifest


def _check_types(data: dict[str, Any], path: Path) -> None:
    for name in data:
        if name not in _FIELDS:
            raise ManifestError(f"{path}: unknown field {name!r}; known fields: {', '.join(_FIELDS)}")
    for name, (types, required) in _FIELDS.items():
        if name not in data:
            if required:
                raise ManifestError(f"{path}: missing required field {name!r}")
            continue
        value = data[name]
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            raise ManifestError(f"{path}: field {name!r} must be a {types[0].__name__}, not {type(value).__name__}")


def _check_table(table: dict[str, Any], name: str, fields: dict[str, tuple[type, ...]], path: Path) -> None:
    """Every key of the [name] table known and of an accepted type."""
    for key, value in table.items():
        wanted = fields.get(key)
        if wanted is None:
            raise ManifestError(f"{path}: unknown key {key!r} in [{name}]; known keys: {', '.join(fields)}")
        if isinstance(value, bool) and bool not in wanted or not isinstance(value, wanted):
            raise ManifestError(f"{path}: [{name}] {key} must be a {wanted[0].__name__}, not {type(value).__name__}")


def _conversion(table: dict[str, Any], path: Path) -> Conversion:
    """The [conversion] table: ``source`` (required) and ``fuse``."""
    _check_table(table, "conversion", _CONVERSION_FIELDS, path)
    if "source" not in table:
        raise ManifestError(f"{path}: [conversion] needs `source`, the model folder it was converted from")
    return Conversion(_resolve(path, table["source"]), table.get("fuse", True))


def _golden(table: dict[str, Any], path: Path) -> Golden:
    """The [golden] table: ``file`` and ``min_cosine``, both required."""
    _check_table(table, "golden", _GOLDEN_FIELDS, path)
    for key in _GOLDEN_FIELDS:
        if key not in table:
            raise ManifestError(f"{path}: [golden] needs `{key}`; akidb-embed convert --again {path} writes the table")
    if not 0 < table["min_cosine"] <= 1:
        raise ManifestError(f"{path}: [golden] min_cosine must be in (0, 1], not {table['min_cosine']}")
    return Golden(_resolve(path, table["file"]), float(table["min_cosine"]))


def _normalize_sequences(manifest: Manifest) -> Manifest:
    providers = tuple(manifest.providers) if manifest.providers is not None else None
    return replace(
        manifest,
        matryoshka_dimensions=tuple(manifest.matryoshka_dimensions),
        languages=tuple(manifest.languages),
        fallback=tuple(manifest.fallback),
        providers=providers,
    )


def _check_values(m: Manifest) -> None:
    where = f"{m.path}:"
    if not ID_PATTERN.match(m.id):
        raise ManifestError(f"{where} id {m.id!r} must be letters, digits, '.', '_' or '-' (at most 128)")
    if m.id == "auto":
        raise ManifestError(f"{where} id 'auto' is reserved (model = \"auto\" asks the daemon to choose); rename it")
    if m.path.suffix == ".toml" and m.path.stem != m.id:
        raise ManifestError(f"{where} id {m.id!r} does not match the file name; name the file {m.id}.toml")
    if m.pooling not in POOLINGS:
        raise ManifestError(f"{where} pooling {m.pooling!r} is not one of {', '.join(POOLINGS)}")
    if m.precision not in PRECISIONS:
        raise ManifestError(f"{where} precision {m.precision!r} is not one of {', '.join(PRECISIONS)}")
    if m.padding_side not in PADDING_SIDES:
        raise ManifestError(f"{where} padding_side {m.padding_side!r} is not one of {', '.join(PADDING_SIDES)}")
    for name in ("dimension", "max_length", "memory_mb", "work_mb", "params"):
        value = getattr(m, name)
        if value is not None and value <= 0:
            raise ManifestError(f"{where} {name} must be positive, not {value}")
    for dim in m.matryoshka_dimensions:
        if not isinstance(dim, int) or isinstance(dim, bool) or not 0 < dim <= m.dimension:
            raise ManifestError(f"{where} matryoshka_dimensions must be integers in 1..{m.dimension}, not {dim!r}")
    for name, text in m.prompts.items():
        if not isinstance(text, str):
            raise ManifestError(f"{where} prompt {name!r} must be a string")
    if m.default_prompt is not None and m.default_prompt not in m.prompts:
        raise ManifestError(f"{where} default_prompt {m.default_prompt!r} is not one of the prompts")
    if not all(isinstance(lang, str) for lang in m.languages):
        raise ManifestError(f"{where} languages must be strings")
    for other in m.fallback:
        if not isinstance(other, str) or not ID_PATTERN.match(other) or other == m.id:
            raise ManifestError(f"{where} fallback must list other models' ids, not {other!r}")
    for provider in m.providers or ():
        if provider not in PROVIDERS:
            raise ManifestError(f"{where} provider {provider!r} is not one of {', '.join(PROVIDERS)}")


def _resolve(manifest_path: Path, value: str) -> Path:
    path = Path(value)
    return path if path.is_absolute() else (manifest_path.parent / path).resolve()


def is_temporary(name: str) -> bool:
    """Whether a file name is a hidden, editor, download or package-manager temporary."""
    return (
        name.startswith(".")
        or name.endswith(_TEMP_SUFFIXES)
        or any(infix in name for infix in _TEMP_INFIXES)
        or name == _VIM_PROBE
    )


def model_files(manifest: Manifest) -> list[Path]:
    """Every file the model is made of: the graph, its external data, the tokenizer.

    Weights of models over 2 GiB live beside the graph in external-data files (model.onnx.data, ...).
    """
    # A half-copied or backup file beside the graph is not part of it (the watcher ignores the same names).
    beside = manifest.model.parent.glob(manifest.model.name + "?*")
    external = sorted(p for p in beside if p.is_file() and not is_temporary(p.name))
    return [manifest.model, *external, manifest.tokenizer]


def version_files(manifest: Manifest) -> list[Path]:
    """The model's files and its golden vectors: a change to any of them is a new version, loaded and tested again."""
    return [*model_files(manifest), *([manifest.golden.path] if manifest.golden else [])]


def fingerprint(manifest: Manifest) -> str:
    """Content hash over the ONNX file, the tokenizer and the pooling settings (hex, 16 chars).

    The golden vectors are left out: the fingerprint keys what depends on the computation only (measured
    footprints, TensorRT engines), and new golden vectors compute nothing differently.
    """
    digest = hashlib.sha256()
    for path in model_files(manifest):
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    digest.update(f"{manifest.pooling}|{manifest.normalize}|{manifest.max_length}|{manifest.padding_side}".encode())
    return digest.hexdigest()[:16]
