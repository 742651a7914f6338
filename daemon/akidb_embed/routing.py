"""Choosing a model for ``model = "auto"``: the request's constraints against each model's manifest and profile.

Pure: ``parse_constraints`` checks the request's map (``bad_request`` naming the field), and
``rank`` judges every catalog entry as the registry describes it (``Candidate``). A model must be
enabled, not failed, and verified (it passed its self-test, or has golden vectors to take it at
load), and meet every constraint. Among those that do, loaded models come first (a cold load
counts against ``max_latency_ms`` anyway), then the ``prefer`` order, then the id, so the same
request on the same device always chooses the same model. A model never profiled is judged on
its manifest alone: no latency figure excludes it, and the choice says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from akidb_embed_client.errors import BadRequest, NoModelFits
from akidb_embed_client.protocol import brief

from .manifest import Manifest

PREFERENCES = ("quality", "speed", "memory")
TASKS = ("query", "passage", "symmetric")
_NUMBER = (int, float)
CONSTRAINT_TYPES: dict[str, tuple[type, ...]] = {
    "max_latency_ms": _NUMBER, "languages": (list,), "dimension": (int,), "max_memory_mb": _NUMBER,
    "task": (str,), "prefer": (str,),
}  # fmt: skip


@dataclass(frozen=True)
class Constraints:
    """What an ``auto`` request asks of its model."""

    max_latency_ms: float | None = None  # single-text p95 from the profile, plus the cold load if not loaded
    languages: tuple[str, ...] = ()  # every one covered
    dimension: int | None = None  # exactly, natively or through Matryoshka
    max_memory_mb: float | None = None
    task: str | None = None  # query, passage or symmetric: picks the prompt
    prefer: str = "quality"  # among models that fit: quality (largest), speed (lowest latency) or memory (smallest)


@dataclass(frozen=True)
class Candidate:
    """A catalog entry as routing sees it."""

    id: str
    manifest: Manifest | None  # the version serving, else the newest valid one
    state: str  # ready, loading, available, failed, disabled, invalid
    verification: str  # passed, pending, unverified, failed
    memory_mb: float  # the charge it holds or will take
    profile: dict[str, Any] | None  # measured figures of this version (bench op), None if never profiled
    error: str | None = None
    circuit: str = "closed"  # open or half_open: failing, left alone (circuit.py)
    # Why it cannot be loaded now, None if it can: asked last, of the candidates that meet the rest (it reads memory).
    no_room: Callable[[], str | None] = lambda: None

    @property
    def loaded(self) -> bool:
        return self.state == "ready"

    def latency_ms(self) -> float | None:
        """The single-text p95 a request would see now, a cold load included; None without a profile."""
        if self.profile is None:
            return None
        return self.profile["p95_ms"] + (0.0 if self.loaded else self.profile["cold_load_ms"])


@dataclass(frozen=True)
class Choice:
    """The model chosen and how to call it."""

    model: str
    prompt: str | None  # the manifest's prompt for the task, if any
    dimensions: int | None  # Matryoshka truncation, if the dimension asked for is not the native one
    judged_on: str  # "profile" or "manifest" (never profiled)

    def describe(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "dimensions": self.dimensions, "judged_on": self.judged_on}


def parse_constraints(raw: dict[str, Any]) -> Constraints:
    """The request's ``constraints`` map, checked; BadRequest names the field and what it must be."""
    for key, value in raw.items():
        types = CONSTRAINT_TYPES.get(key) if isinstance(key, str) else None
        if types is None:
            raise BadRequest(f"constraints has no key {brief(key)}; known keys: {', '.join(CONSTRAINT_TYPES)}")
        if isinstance(value, bool) or not isinstance(value, types):
            kind = "number" if types is _NUMBER else types[0].__name__
            raise BadRequest(f"constraints.{key} must be a {kind}, not {type(value).__name__}")
    for key in ("max_latency_ms", "max_memory_mb", "dimension"):
        if key in raw and not (raw[key] > 0 and math.isfinite(raw[key])):
            raise BadRequest(f"constraints.{key} must be positive, not {raw[key]}")
    languages = raw.get("languages", [])
    if not all(isinstance(language, str) and language for language in languages):
        raise BadRequest("constraints.languages must be a list of language codes such as [\"de\", \"en\"]")
    for key, allowed in (("task", TASKS), ("prefer", PREFERENCES)):
        if key in raw and raw[key] not in allowed:
            raise BadRequest(f"constraints.{key} must be one of {', '.join(allowed)}, not {brief(raw[key])}")
    return Constraints(**{**raw, "languages": tuple(language.lower() for language in languages)})


def choose(candidates: list[Candidate], constraints: Constraints) -> Choice:
    """The model an ``auto`` request gets, or NoModelFits listing each candidate with the constraint it failed."""
    fitting, rejected = rank(candidates, constraints)
    if not fitting:
        reasons = "; ".join(f"{r['id']}: {r['reason']}" for r in rejected) or "the catalog is empty"
        raise NoModelFits(f"no model meets the constraints ({reasons}); relax them or add a model", candidates=rejected)
    return fitting[0]


def rank(candidates: list[Candidate], constraints: Constraints) -> tuple[list[Choice], list[dict[str, str]]]:
    """Models that meet the constraints, best first, and the others with the first constraint each failed."""
    fitting: list[tuple[tuple, Choice]] = []
    rejected = []
    for candidate in sorted(candidates, key=lambda c: c.id):
        reason = _failed_constraint(candidate, constraints)
        if reason:
            rejected.append({"id": candidate.id, "reason": reason})
        else:
            fitting.append((_order(candidate, constraints.prefer), _choice(candidate, constraints)))
    return [choice for _, choice in sorted(fitting, key=lambda pair: pair[0])], rejected


def _failed_constraint(candidate: Candidate, constraints: Constraints) -> str | None:
    """Why the candidate cannot serve the request, or None."""
    m = candidate.manifest
    if m is None or candidate.state in ("invalid", "disabled", "failed"):
        return f"{candidate.state}" + (f": {candidate.error}" if candidate.error else "")
    if candidate.circuit != "closed":
        return f"circuit {candidate.circuit}" + (f": {candidate.error}" if candidate.error else "")
    if candidate.verification not in ("passed", "pending"):
        return f"verification {candidate.verification} (no golden vectors passed: akidb-embed convert --again)"
    missing = [lang for lang in constraints.languages if not m.multilingual and lang not in m.languages]
    if missing:
        return f"languages: covers {', '.join(m.languages) or 'none listed'}, not {', '.join(missing)}"
    if constraints.dimension is not None and constraints.dimension not in (m.dimension, *m.matryoshka_dimensions):
        dims = ", ".join(map(str, sorted({m.dimension, *m.matryoshka_dimensions})))
        return f"dimension: gives {dims}, not {constraints.dimension}"
    if constraints.max_memory_mb is not None and candidate.memory_mb > constraints.max_memory_mb:
        return f"max_memory_mb: takes {candidate.memory_mb:g} MB, over {constraints.max_memory_mb:g}"
    latency = candidate.latency_ms()
    if constraints.max_latency_ms is not None and latency is not None and latency > constraints.max_latency_ms:
        cold = "" if candidate.loaded else f" with its cold load of {candidate.profile['cold_load_ms']:g} ms"
        return f"max_latency_ms: p95 {latency:.1f} ms{cold}, over {constraints.max_latency_ms:g}"
    if not candidate.loaded and (room := candidate.no_room()):
        return f"memory: {room}"
    return None


def _order(candidate: Candidate, prefer: str) -> tuple:
    """Sort key: loaded first, then the preference (unknown figures last), then the id."""
    m = candidate.manifest
    latency = candidate.latency_ms()
    by = {
        "quality": (-(m.params or 0), -m.dimension, -((candidate.profile or {}).get("min_cosine") or 0)),
        "speed": (latency is None, latency or 0.0),
        "memory": (candidate.memory_mb,),
    }[prefer]
    return (not candidate.loaded, *by, candidate.id)


def _choice(candidate: Candidate, constraints: Constraints) -> Choice:
    m = candidate.manifest
    dimensions = constraints.dimension if constraints.dimension not in (None, m.dimension) else None
    return Choice(candidate.id, task_prompt(m, constraints.task), dimensions,
                  "profile" if candidate.profile else "manifest")  # fmt: skip


def task_prompt(manifest: Manifest, task: str | None) -> str | None:
    """The manifest's prompt for a task: one named after it; for symmetric tasks E5's ``query`` (a model that
    prefixes both sides); else none (BGE and Qwen3 embed passages bare)."""
    if task is None:
        return None
    if task in manifest.prompts:
        return task
    if task == "symmetric" and {"query", "passage"} <= manifest.prompts.keys():
        return "query"
    return None
