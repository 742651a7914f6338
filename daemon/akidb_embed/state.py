"""What the daemon remembers across restarts, in ``state_dir/state.json``.

Per model: its measured footprint (the charge, and the measurement behind it), load time, last
use and whether it is pinned; which models were warm, most recently used first, to reload
them after a restart; and the measured profiles, by fingerprint and provider. Written atomically
(temporary file, then rename); an unreadable or unwritable file is logged and never fatal.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


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
    """Reads the state once at start and writes it whenever it changes."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "state.json"
        self.state = self._read()
        self._warned = False

    def record(self, model_id: str) -> ModelRecord:
        """The model's record, to update (created if there is none)."""
        return self.state.models.setdefault(model_id, ModelRecord())

    def recorded(self, model_id: str) -> ModelRecord:
        """The model's record, to read (an empty one, not stored, if there is none)."""
        return self.state.models.get(model_id) or ModelRecord()

    def save(self, warm: list[str]) -> None:
        """Write the state with ``warm`` as the loaded models, most recently used first."""
        self.state.warm = warm
        data = {"models": {k: asdict(v) for k, v in self.state.models.items()}, "warm": warm,
                "profiles": self.state.profiles}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=self.path.parent, delete=False, suffix=".tmp") as tmp:
                json.dump(data, tmp, indent=1)
            os.replace(tmp.name, self.path)
        except OSError as exc:
            if not self._warned:  # once: a read-only state dir should not flood the journal
                log.warning("cannot write %s (%s); footprints and warm models will not survive a restart", self.path, exc)
                self._warned = True

    def _read(self) -> State:
        try:
            data = json.loads(self.path.read_text())
            models = {k: ModelRecord(**v) for k, v in data.get("models", {}).items()}
            profiles = {k: v for k, v in data.get("profiles", {}).items() if isinstance(v, dict)}
            return State(models, [w for w in data.get("warm", []) if isinstance(w, str)], profiles)
        except FileNotFoundError:
            return State()
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            log.warning("ignoring unreadable state file %s: %s", self.path, exc)
            return State()
