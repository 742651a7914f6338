"""What a connected client may do, and what each tenant used.

Each socket is a tenant (``settings.Tenant``): the main socket's sees every model and may do every
op; a declared tenant sees only the models its ``models`` globs match (any other is
``unknown_model``, as if it did not exist), may use only its ``cache_ops`` (else ``not_allowed``),
and is held to its quotas (``overloaded``, naming the tenant and the quota). The server tags each
request with its ``Caller``; its tenant and ZeroMQ identity are also the request's owner in the
model's fair queue (``fairqueue``). Everything here runs on the event loop.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, TypeVar

from akidb_embed_client.errors import NotAllowed, Overloaded, UnknownModel

from .settings import CACHE_OPS, Settings, Tenant

T = TypeVar("T")
# The cache op that allows each op: tune and bench may load the model, so they need "load"; pin covers unpin.
PERMISSION = {"load": "load", "tune": "load", "bench": "load", "unload": "unload", "pin": "pin", "unpin": "pin"}
QUOTAS = ("max_in_flight", "max_queued_texts", "cache_ops")  # the refusals counted per tenant


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the tenant of the socket it came on, and the client's ZeroMQ routing identity."""

    tenant: Tenant
    identity: bytes = b""

    @property
    def owner(self) -> tuple[str, bytes]:
        """The request's owner in a model's fair queue: each client of each tenant gets its own share."""
        return self.tenant.name, self.identity


@dataclass
class Usage:
    """One tenant's figures since start (``in_flight`` and ``queued_texts``: now)."""

    requests: Counter[str] = field(default_factory=Counter)  # embed requests by outcome: "ok" or the error code
    texts: int = 0  # texts embedded
    in_flight: int = 0  # requests that wait (embed, load, ...) now
    queued_texts: int = 0  # texts of its embed requests not yet answered
    refused: Counter[str] = field(default_factory=Counter)  # requests refused, by the quota of QUOTAS they hit

    def describe(self) -> dict[str, Any]:
        return {
            "requests": sum(self.requests.values()), "errors": {code: n for code, n in self.requests.items() if code != "ok"},
            "texts": self.texts, "in_flight": self.in_flight, "queued_texts": self.queued_texts,
            "refused": {quota: self.refused[quota] for quota in QUOTAS},
        }  # fmt: skip


def sees(tenant: Tenant, model_id: str) -> bool:
    """Whether the tenant may use (and see) the model."""
    return any(fnmatchcase(model_id, pattern) for pattern in tenant.models)


def visible(tenant: Tenant, items: Iterable[T], model_id: Callable[[T], str] = str) -> list[T]:
    """The items (models, candidates, ids) whose model the tenant sees; ``model_id`` finds an item's."""
    return [item for item in items if sees(tenant, model_id(item))]


class Tenants:
    """Every tenant with its usage; the permission and quota checks."""

    def __init__(self, settings: Settings) -> None:
        self.main = settings.main_tenant
        self.all = (self.main, *settings.tenants)
        self.usage = {tenant.name: Usage() for tenant in self.all}

    def check_model(self, caller: Caller, model_id: str, known: Iterable[str], named: bool = True) -> None:
        """unknown_model for a model the tenant may not see (``named``: asked for, not the default), listing only
        those it may."""
        if sees(caller.tenant, model_id):
            return
        listed = ", ".join(sorted(visible(caller.tenant, known))) or "none"
        what = f"no model {model_id!r}" if named else "no model given and no default model"
        raise UnknownModel(f"{what} for tenant {caller.tenant.name}; name one of its models: {listed}")

    def check_op(self, caller: Caller, op: str) -> None:
        """not_allowed for a cache op the tenant may not use."""
        needed = PERMISSION.get(op)
        if needed is None or needed in caller.tenant.cache_ops:
            return
        self.usage[caller.tenant.name].refused["cache_ops"] += 1
        allowed = ", ".join(caller.tenant.cache_ops) or "none"
        raise NotAllowed(
            f"tenant {caller.tenant.name} may not {op} models (its cache_ops: {allowed}); ask the operator to add "
            f"{needed!r} to tenants.{caller.tenant.name}.cache_ops (of {', '.join(CACHE_OPS)}), or use the main socket"
        )

    async def waiting(self, caller: Caller, outcome: Coroutine[Any, Any, T]) -> T:
        """``outcome`` awaited as one of the tenant's requests in flight; overloaded past its max_in_flight."""
        tenant, usage = caller.tenant, self.usage[caller.tenant.name]
        if tenant.max_in_flight and usage.in_flight >= tenant.max_in_flight:
            outcome.close()
            usage.refused["max_in_flight"] += 1
            raise Overloaded(
                f"tenant {tenant.name} has {usage.in_flight} requests in flight (max_in_flight {tenant.max_in_flight}); "
                f"wait for their replies before sending more, or raise tenants.{tenant.name}.max_in_flight"
            )
        usage.in_flight += 1
        try:
            return await outcome
        finally:
            usage.in_flight -= 1

    @contextmanager
    def queued(self, caller: Caller, texts: int) -> Iterator[None]:
        """Around an embed request's texts until it is answered; overloaded past the tenant's max_queued_texts."""
        tenant, usage = caller.tenant, self.usage[caller.tenant.name]
        if tenant.max_queued_texts and usage.queued_texts + texts > tenant.max_queued_texts:
            usage.refused["max_queued_texts"] += 1
            raise Overloaded(
                f"tenant {tenant.name} has {usage.queued_texts} texts queued and this request adds {texts} "
                f"(max_queued_texts {tenant.max_queued_texts}); retry once replies came, send fewer texts at once, "
                f"or raise tenants.{tenant.name}.max_queued_texts"
            )
        usage.queued_texts += texts
        try:
            yield
        finally:
            usage.queued_texts -= texts

    def answered(self, caller: Caller, code: str, texts: int) -> None:
        """Count an embed request's outcome: "ok" with its texts, or its error code."""
        usage = self.usage[caller.tenant.name]
        usage.requests[code] += 1
        usage.texts += texts if code == "ok" else 0

    def figures(self, caller: Caller) -> dict[str, Any]:
        """Per-tenant figures for ``status`` and ``models``: the caller's own; the main socket's caller sees all."""
        shown = self.all if caller.tenant.name == self.main.name else (caller.tenant,)
        return {tenant.name: {"weight": tenant.weight, **self.usage[tenant.name].describe()} for tenant in shown}
