"""What the daemon remembers across restarts, in ``state_dir/state.json``.

Per model: its measured footprint (the charge, and the measurement behind it), load time, last
use and whether it is pinned; which models were warm, most recently used first, to reload
them after a restart; and the measured profiles, by fingerprint and provider. Written atomically
(temporary file, fsync, then rename: a power cut leaves the old file or the new one, not half of
one). Bad state is never fatal: a damaged file is set aside and the daemon starts afresh; a write
that fails (full disk, read-only folder) is said once and tried again by ``retry`` until it works.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
# Far above any real state (a few KiB per model): a bigger file is damage, not read into memory.
MAX_STATE_BYTES = 16 << 20
# What starting without the state costs, said in every line about it.
WITHOUT = "measured footprints, pins and warm models"


@dataclass
class ModelRecord:
    fingerprint: str = ""
    footprint: int = 0  # bytes: the charge
    memory: dict = field(default_factory=dict)  # the measured ``footprint.Footprint`` of ``fingerprint``
    load_ms: float = 0.0
    last_used: float = 0.0
    pinned: bool = False


@dataclass
class State:
    models: dict[str, ModelRecord] = field(default_factory=dict)
    warm: list[str] = field(default_factory=list)  # most recently used first
    profiles: dict[str, dict] = field(default_factory=dict)  # ``profile.Profile`` data by fingerprint/provider


class StateStore:
    """Reads the state once at start; writes it whenever it changes, and again until a failed write succeeds."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "state.json"
        self.state = self._read()
        self.unsaved = False  # the last write failed: ``retry`` tries again

    def record(self, model_id: str) -> ModelRecord:
        """The model's record, to update (created if there is none)."""
        return self.state.models.setdefault(model_id, ModelRecord())

    def recorded(self, model_id: str) -> ModelRecord:
        """The model's record, to read (an empty one, not stored, if there is none)."""
        return self.state.models.get(model_id) or ModelRecord()

    def save(self, warm: list[str]) -> None:
        """Write the state with ``warm`` as the loaded models, most recently used first."""
        self.state.warm = warm
        self.write()

    def retry(self) -> None:
        """Write the state again if the last write failed (called every upkeep round)."""
        if self.unsaved:
            self.write()

    def stop(self) -> None:
        """At the daemon's stop: say what a write that never succeeded loses."""
        if self.unsaved:
            log.warning("stopping without having written the state file %s: the %s of this run are lost", self.path, WITHOUT)

    def write(self) -> None:
        """Write the state as it is; a failure is said once, and ``retry`` tries again."""
        data = {"models": {k: asdict(v) for k, v in self.state.models.items()}, "warm": self.state.warm,
                "profiles": self.state.profiles}  # fmt: skip
        try:
            _write_atomically(self.path, json.dumps(data, indent=1).encode())
        except OSError as exc:
            if not self.unsaved:  # once: a full disk should not flood the journal
                log.warning(
                    "cannot write the state file %s (%s): %s are kept in memory and written again every upkeep "
                    "round; they are lost if the daemon stops first. Fix: free space on that filesystem, or make "
                    "state_dir a folder the daemon's user can write", self.path, exc, WITHOUT,
                )  # fmt: skip
            self.unsaved = True
            return
        if self.unsaved:
            log.info("state file %s saved at last", self.path)
        self.unsaved = False

    def _read(self) -> State:
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size > MAX_STATE_BYTES:
                    return self._damaged(f"{size} bytes, more than any state file holds")
                raw = f.read()
        except FileNotFoundError:
            return State()
        except OSError as exc:
            log.warning("cannot read the state file %s (%s): starting without %s. Fix: make state_dir a folder "
                        "the daemon's user can read and write", self.path, exc, WITHOUT)  # fmt: skip
            return State()
        try:
            return _parse(json.loads(raw))
        except (ValueError, TypeError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            return self._damaged(str(exc))

    def _damaged(self, cause: str) -> State:
        """A fresh state; the damaged file moved aside (for a look) so that it is not read again."""
        aside = self.path.with_name(self.path.name + ".damaged")
        try:
            os.replace(self.path, aside)
            kept = f"moved to {aside}"
        except OSError as exc:
            kept = f"left in place: {exc}"
        log.warning("the state file %s is damaged (%s); starting without %s, which are measured and saved again "
                    "(the damaged file is %s; nothing to fix)", self.path, cause, WITHOUT, kept)  # fmt: skip
        return State()


def _parse(data: Any) -> State:
    """A state from the JSON's value; TypeError naming the first thing not of the right shape."""
    if not isinstance(data, dict):
        raise TypeError(f"a JSON {type(data).__name__}, not an object")
    models, warm, profiles = data.get("models", {}), data.get("warm", []), data.get("profiles", {})
    if not isinstance(models, dict) or not isinstance(warm, list) or not isinstance(profiles, dict):
        raise TypeError("models, warm or profiles is not of the right type")
    return State(
        {model_id: _record(model_id, value) for model_id, value in models.items()},
        [w for w in warm if isinstance(w, str)],
        {k: v for k, v in profiles.items() if isinstance(v, dict)},
    )


# Each record field's JSON type, from its annotation (a string here): a field added later is checked too.
_RECORD_TYPES = {f.name: {"str": str, "int": int, "float": (int, float), "bool": bool, "dict": dict}[f.type]
                 for f in fields(ModelRecord)}  # fmt: skip


def _record(model_id: str, value: Any) -> ModelRecord:
    if not isinstance(value, dict) or set(value) - set(_RECORD_TYPES):
        raise TypeError(f"the record of {model_id!r} is not an object of {', '.join(_RECORD_TYPES)}")
    for name, kind in _RECORD_TYPES.items():
        if name in value and (not isinstance(value[name], kind) or (kind is not bool and isinstance(value[name], bool))):
            raise TypeError(f"{name} of {model_id!r} is {value[name]!r}")
    return ModelRecord(**value)


def _write_atomically(path: Path, data: bytes) -> None:
    """``data`` in ``path``, whole or not at all; a temporary file that could not be finished is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # before the rename: after a power cut the new name has the new content
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


