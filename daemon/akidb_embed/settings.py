"""Daemon settings: a frozen ``Settings`` read once from the TOML config, then CLI and env.

Precedence for each value: command line, then ``AKIDB_EMBED_SOCKET`` (socket only), then the
config file, then the defaults below. A missing config file at the default path is fine (the
defaults apply); a missing file named explicitly, or a bad value, is a ``SettingsError``.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from akidb_embed_client.protocol import events_socket_path

from .manifest import PROVIDERS
from .tomlcompat import tomllib

DEFAULT_CONFIG = Path("/etc/akidb-embed/akidb-embed.toml")
DEFAULT_SOCKET = Path("/run/akidb-embed/embed.sock")
SOCKET_ENV = "AKIDB_EMBED_SOCKET"
# Where the files manifests name may live (confine.py); the catalog directory is always one more.
DEFAULT_MODEL_ROOTS = (Path("/var/lib/akidb-embed/models"), Path("/usr/share/akidb-embed/models"))
MAIN_TENANT = "main"  # the main socket's tenant: every model, every op, no quotas
CACHE_OPS = ("load", "unload", "pin")  # what a tenant may be allowed; pin covers unpin
_TENANT_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")  # a file name, a metric label and a group name alike


class SettingsError(ValueError):
    """A config that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class Limits:
    max_texts: int = 256  # texts in one request
    max_request_bytes: int = 4 << 20  # one request frame
    queue_texts: int = 4096  # texts waiting per model before `overloaded`
    batch_tokens: int = 16384  # padded length x count of one inference batch
    max_batch: int = 128  # texts in one inference batch
    work_mb: int = 0  # working memory of one inference batch, MiB; 0: automatic (see footprint.py)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            least = 0 if f.name == "work_mb" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise SettingsError(f"limits.{f.name} must be an integer >= {least}, not {value!r}")


@dataclass(frozen=True)
class MemorySettings:
    model_memory_mb: int = 0  # cap on the loaded models' footprints together; 0: none but the system's
    max_loaded_models: int = 0  # 0: no cap
    high_watermark: float = 0.90  # system memory in use above which idle models are evicted...
    low_watermark: float = 0.80  # ...until it is back below this
    reserve_mb: int = 256  # headroom a load must leave for the rest of the system
    check_seconds: float = 2.0  # how often pressure and keep_alive are checked
    keep_alive: float = 300.0  # idle seconds before a model unloads; negative: never
    tegrastats: str = "auto"  # "auto" (on PATH), "off", or the program's path
    tegrastats_interval_ms: int = 1000

    def __post_init__(self) -> None:
        for name in ("model_memory_mb", "max_loaded_models", "reserve_mb"):
            if getattr(self, name) < 0:
                raise SettingsError(f"memory.{name} must be 0 or positive")
        if not 0 < self.low_watermark < self.high_watermark <= 1:
            raise SettingsError("memory watermarks need 0 < low_watermark < high_watermark <= 1")
        if self.check_seconds <= 0 or self.tegrastats_interval_ms <= 0:
            raise SettingsError("memory.check_seconds and tegrastats_interval_ms must be positive")


@dataclass(frozen=True)
class MetricsSettings:
    textfile: str = "auto"  # node_exporter textfile; "auto": <state_dir>/metrics/akidb-embed.prom; "": none
    interval_seconds: float = 5.0
    http: str = ""  # also serve /metrics at this loopback host:port, e.g. "127.0.0.1:9464"; "": no TCP port

    def __post_init__(self) -> None:
        if isinstance(self.interval_seconds, bool) or not isinstance(self.interval_seconds, (int, float)) or (
                self.interval_seconds <= 0):
            raise SettingsError(f"metrics.interval_seconds must be a positive number, not {self.interval_seconds!r}")
        for name in ("textfile", "http"):
            if not isinstance(getattr(self, name), str):
                raise SettingsError(f"metrics.{name} must be a string, not {getattr(self, name)!r}")
        if self.http:
            self.http_address  # noqa: B018 - validates it

    @property
    def http_address(self) -> tuple[str, int]:
        """The HTTP endpoint's (host, port); only loopback, so the metrics never leave the device."""
        host, _, port = self.http.rpartition(":")
        host = host.strip("[]")
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
            number = int(port)
        except ValueError:
            loopback, number = False, 0
        if not loopback or not 0 < number < 65536:
            raise SettingsError(
                f"metrics.http {self.http!r} must be a loopback host:port such as 127.0.0.1:9464 or [::1]:9464: "
                "the daemon serves no other address (use a reverse proxy or node_exporter's textfile to go further)"
            )
        return host, number


@dataclass(frozen=True)
class CircuitSettings:
    failures: int = 3  # inferences failing in a row that open a model's circuit (one failed load opens it)
    backoff_seconds: float = 30.0  # open this long before one trial is let through; doubled after each failed trial
    max_backoff_seconds: float = 600.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise SettingsError(f"circuit.{f.name} must be a positive number, not {value!r}")
        if isinstance(self.failures, float) or self.max_backoff_seconds < self.backoff_seconds:
            raise SettingsError("circuit.failures must be an integer and max_backoff_seconds >= backoff_seconds")


@dataclass(frozen=True)
class Tenant:
    """An app sharing the daemon: its own socket (the kernel checks who connects), models and quotas."""

    name: str
    socket: Path | None = None  # None: <name>.sock beside the main socket (Settings fills it in)
    group: str | None = None  # the socket file's group; None: the daemon's
    mode: int = 0o660  # the socket file's mode
    models: tuple[str, ...] = ("*",)  # ids or fnmatch globs it may use (and see)
    max_in_flight: int = 0  # requests waiting at once (embed, load...); 0: no limit
    max_queued_texts: int = 0  # texts of its embed requests not yet answered; 0: no limit
    cache_ops: tuple[str, ...] = ()  # of CACHE_OPS
    weight: float = 1.0  # its share of each model's batches, against the other tenants'

    def __post_init__(self) -> None:
        key = f"tenants.{self.name}" if isinstance(self.name, str) else "tenants"
        if not isinstance(self.name, str) or not _TENANT_NAME.fullmatch(self.name):
            raise SettingsError(f"{key}: name must be 1-32 of a-z, 0-9, _ and - starting with a letter, not {self.name!r}")
        if self.group is not None and (not isinstance(self.group, str) or not self.group):
            raise SettingsError(f"{key}.group must be a group name, not {self.group!r}")
        if isinstance(self.mode, bool) or not isinstance(self.mode, int) or not 0 <= self.mode <= 0o777 or self.mode & 0o600 != 0o600:
            raise SettingsError(f"{key}.mode must be a file mode such as 0o660 that lets the daemon read and write, "
                                f"not {self.mode!r}")  # fmt: skip
        if not self.models or not all(isinstance(m, str) and m for m in self.models):
            raise SettingsError(f"{key}.models must be a non-empty list of model ids or globs such as \"bge-*\"")
        for name in ("max_in_flight", "max_queued_texts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SettingsError(f"{key}.{name} must be an integer >= 0 (0: no limit), not {value!r}")
        unknown = [op for op in self.cache_ops if op not in CACHE_OPS]
        if unknown:
            raise SettingsError(f"{key}.cache_ops {unknown} are not among {', '.join(CACHE_OPS)}")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not 0 < self.weight < 1e6:
            raise SettingsError(f"{key}.weight must be a positive number, not {self.weight!r}")


@dataclass(frozen=True)
class Settings:
    socket: Path = DEFAULT_SOCKET
    catalog: Path = Path("/etc/akidb-embed/models.d")
    state_dir: Path = Path("/var/lib/akidb-embed")
    cache_dir: Path = Path("/var/cache/akidb-embed")
    model_roots: tuple[Path, ...] = DEFAULT_MODEL_ROOTS
    default_model: str | None = None  # overrides the manifest marked default = true
    providers: tuple[str, ...] = ("tensorrt", "cuda", "cpu")
    intra_op_threads: int = 0  # 0: measured per model at its first load (tuning.py)
    drain_seconds: float = 10.0  # on stop, how long requests in flight may take to finish
    log_level: str = "info"
    limits: Limits = field(default_factory=Limits)
    memory: MemorySettings = field(default_factory=MemorySettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    circuit: CircuitSettings = field(default_factory=CircuitSettings)
    events_socket: Path | None = None  # the PUB socket of lifecycle events; None: beside the socket (events_path)
    tenants: tuple[Tenant, ...] = ()  # apps on sockets of their own, besides the main socket's tenant

    def __post_init__(self) -> None:
        object.__setattr__(self, "tenants", tuple(
            t if t.socket else replace(t, socket=self.socket.parent / f"{t.name}.sock") for t in self.tenants))
        _check_unique(self)
        unknown = [p for p in self.providers if p not in PROVIDERS]
        if unknown or not self.providers:
            raise SettingsError(f"providers must be a non-empty list of {', '.join(PROVIDERS)}, not {list(self.providers)}")
        if self.intra_op_threads < 0:
            raise SettingsError("intra_op_threads must be 0 (automatic) or positive")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise SettingsError(f"log_level {self.log_level!r} is not one of debug, info, warning, error")
        relative = [str(root) for root in self.model_roots if not root.is_absolute()]
        if relative:
            raise SettingsError(f"model_roots must be absolute paths, not {', '.join(relative)}")

    @property
    def all_model_roots(self) -> tuple[Path, ...]:
        """The folders the files manifests name must resolve under: model_roots and the catalog directory."""
        return (*self.model_roots, self.catalog)

    @property
    def main_tenant(self) -> Tenant:
        """The main socket's tenant: every model, every op, weight 1, no quotas (the daemon without tenants)."""
        return Tenant(MAIN_TENANT, self.socket, cache_ops=CACHE_OPS)

    @property
    def events_path(self) -> Path:
        """The events socket: configured, else ``<socket stem>.events.sock`` in the request socket's folder."""
        return self.events_socket or events_socket_path(self.socket)

    @property
    def metrics_textfile(self) -> Path | None:
        """Where the metrics textfile goes, if anywhere."""
        textfile = self.metrics.textfile
        if textfile == "auto":
            return self.state_dir / "metrics" / "akidb-embed.prom"
        return Path(textfile) if textfile else None


def _check_unique(settings: Settings) -> None:
    """Tenant names and sockets unique, none the main socket's or the events socket's."""
    names = [MAIN_TENANT]
    paths = [settings.socket, settings.events_path]
    for tenant in settings.tenants:
        if tenant.name in names:
            raise SettingsError(f"tenants.{tenant.name}: the name is taken ({MAIN_TENANT!r} is the main socket's); "
                                "give each tenant a name of its own")  # fmt: skip
        if tenant.socket in paths:
            raise SettingsError(f"tenants.{tenant.name}.socket {tenant.socket} is already the main, events or another "
                                "tenant's socket; give each tenant a socket of its own")  # fmt: skip
        names.append(tenant.name)
        paths.append(tenant.socket)


_PATH_KEYS = ("socket", "events_socket", "catalog", "state_dir", "cache_dir")
# What each key may be in the TOML file (or on the command line, where paths are Paths already).
_TYPES: dict[str, tuple[type, ...]] = {
    **{key: (str, Path) for key in _PATH_KEYS},
    "model_roots": (list, tuple),
    "default_model": (str,),
    "providers": (list, tuple),
    "intra_op_threads": (int,),
    "drain_seconds": (int, float),
    "log_level": (str,),
}


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """Settings from ``config`` (or the default path if it exists), env, then ``overrides``.

    Overrides that are None are ignored, so argparse results can be passed straight in.
    """
    data = _read_config(config)
    tables = {name: data.pop(name, {}) for name in ("limits", "memory", "metrics", "circuit")}
    tenants = _tenants(data.pop("tenants", []))
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise SettingsError(f"[{name}] must be a table")
    if os.environ.get(SOCKET_ENV):
        data["socket"] = os.environ[SOCKET_ENV]
    data.update({k: v for k, v in overrides.items() if v is not None})
    unknown = set(data) - set(_TYPES)
    if unknown:
        raise SettingsError(f"unknown setting(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(_TYPES))}")
    for key, value in data.items():
        if isinstance(value, bool) or not isinstance(value, _TYPES[key]):
            raise SettingsError(f"setting {key} must be a {_TYPES[key][0].__name__}, not {value!r}")
    for key in _PATH_KEYS:
        if key in data:
            data[key] = Path(data[key])
    if "providers" in data:
        data["providers"] = tuple(data["providers"])
    if "model_roots" in data:
        data["model_roots"] = _paths("model_roots", data["model_roots"])
    try:
        return Settings(**data, limits=Limits(**tables["limits"]), memory=MemorySettings(**tables["memory"]),
                        metrics=MetricsSettings(**tables["metrics"]), circuit=CircuitSettings(**tables["circuit"]),
                        tenants=tenants)
    except TypeError as exc:
        raise SettingsError(f"bad setting: {exc}") from None


def _paths(key: str, values: list | tuple) -> tuple[Path, ...]:
    """A list setting of paths, each a string (or a Path, from the command line)."""
    wrong = [v for v in values if not isinstance(v, (str, Path))]
    if wrong:
        raise SettingsError(f"{key} must be a list of paths (strings), not {wrong[0]!r}")
    return tuple(Path(v) for v in values)
def _tenants(tables: Any) -> tuple[Tenant, ...]:
    """The ``[[tenants]]`` tables as Tenants; a key that is not a Tenant field is named with the tenant."""
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise SettingsError("tenants must be an array of tables: [[tenants]] followed by name = \"...\" and its keys")
    known = {f.name for f in fields(Tenant)}
    tenants = []
    for table in tables:
        key = f"tenants.{table.get('name', '?')}"
        unknown = set(table) - known
        if unknown or "name" not in table:
            raise SettingsError(f"{key}: unknown key(s) {', '.join(sorted(unknown)) or 'none'}, or no name; "
                                f"known: {', '.join(sorted(known))}")  # fmt: skip
        for name in ("models", "cache_ops"):
            if name in table and not isinstance(table[name], list):
                raise SettingsError(f"{key}.{name} must be a list of strings, not {table[name]!r}")
            if name in table:
                table = {**table, name: tuple(table[name])}
        if "socket" in table:
            if not isinstance(table["socket"], str) or not table["socket"]:
                raise SettingsError(f"{key}.socket must be a path, not {table['socket']!r}")
            table = {**table, "socket": Path(table["socket"])}
        tenants.append(Tenant(**table))
    return tuple(tenants)


def _read_config(config: Path | None) -> dict[str, Any]:
    path = config or DEFAULT_CONFIG
    if config is None and not path.exists():
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SettingsError(f"cannot read config {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config {path} is not valid TOML: {exc}") from None
