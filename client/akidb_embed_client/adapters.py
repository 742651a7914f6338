"""What the LangChain and LlamaIndex adapters share: their options, the choice of prompts, and the embed calls.

Every call opens its own client and closes it after: a blocking ``Client`` in sync code, an
``AsyncClient`` on the running loop in async code. ZeroMQ sockets are neither thread-safe nor
shareable between event loops, and frameworks call an embedding model from any thread and any
loop; connecting to a Unix socket costs far less than one embedding.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from .aio import AsyncClient
from .client import Client, resolve_socket
from .errors import BadRequest

Role = Literal["query", "document"]
# Used when the model declares them, so that E5 gets its "query: "/"passage: " prefixes, BGE and
# Qwen3 their query instruction alone, and MiniLM nothing, without any setting.
DEFAULT_PROMPTS: dict[Role, str] = {"query": "query", "document": "passage"}


class AkidbOptions(BaseModel):
    """The adapters' options, as pydantic fields both frameworks can show and copy, and their embed calls.

    ``query_prompt`` and ``document_prompt`` name one of the model's prompts (its manifest's ``[prompts]``).
    The defaults apply only where the model declares them; a name you set must be declared. None: no prompt.
    """

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="the model id; None: the daemon's default model")
    socket: str = Field(default_factory=lambda: resolve_socket(None),  # read at construction, as Client does
                        description="the daemon's socket; default $AKIDB_EMBED_SOCKET or /run/akidb-embed/embed.sock")
    dimensions: int | None = Field(None, description="Matryoshka cut, one of the model's matryoshka_dimensions")
    expect_fingerprint: str | None = Field(None, description="fail with ModelChanged rather than mix model versions")
    query_prompt: str | None = Field(DEFAULT_PROMPTS["query"], description="prompt name for queries")
    document_prompt: str | None = Field(DEFAULT_PROMPTS["document"], description="prompt name for documents")
    # Long enough for a cold load with its first-time measurements (seconds on a CPU).
    timeout: float = Field(60.0, gt=0, description="seconds to wait for one reply")
    batch_size: int = Field(256, gt=0, description="texts per request, at most the daemon's limits.max_texts")

    _prompts: dict[str | None, frozenset[str]] = PrivateAttr(default_factory=dict)  # per model, once looked up

    def _embed_texts(self, texts: Sequence[str], role: Role) -> list[list[float]]:
        """Embed ``texts`` as queries or documents over a blocking client; plain float lists in input order."""
        if not texts:
            return []
        with Client(self.socket, timeout=self.timeout) as client:
            if self.model not in self._prompts:
                self._learn_prompts(client.models())
            fields = self._fields(role)
            return [row for chunk in chunks(texts, self.batch_size) for row in client.embed(chunk, **fields).tolist()]

    async def _aembed_texts(self, texts: Sequence[str], role: Role) -> list[list[float]]:
        """``_embed_texts`` on an ``AsyncClient``, its requests sent together."""
        if not texts:
            return []
        async with AsyncClient(self.socket, timeout=self.timeout) as client:
            if self.model not in self._prompts:
                self._learn_prompts(await client.models())
            fields = self._fields(role)
            replies = await asyncio.gather(*(client.embed(chunk, **fields) for chunk in chunks(texts, self.batch_size)))
        return [row for reply in replies for row in reply.tolist()]

    def _learn_prompts(self, models: list[dict[str, Any]]) -> None:
        """Remember the model's prompt names from a ``models`` reply."""
        found = declared_prompts(models, self.model)
        if found is not None:  # a model not in the catalog is left to the daemon, whose embed reply names it
            self._prompts[self.model] = found

    def _fields(self, role: Role) -> dict[str, Any]:
        """The keyword arguments of ``embed`` for this role."""
        return {"model": self.model, "prompt": self._prompt(role), "dimensions": self.dimensions,
                "expect_fingerprint": self.expect_fingerprint}

    def _prompt(self, role: Role) -> str | None:
        """The prompt name to send for ``role``, checked against the model's prompts."""
        name = self.query_prompt if role == "query" else self.document_prompt
        declared = self._prompts.get(self.model)
        if name is None or declared is None or name in declared:
            return name
        if name == DEFAULT_PROMPTS[role]:
            return None
        # The daemon would take an undeclared name as a literal prefix: a typo would pass unnoticed.
        listed = ", ".join(sorted(declared)) or "none"
        raise BadRequest(f"model {self.model or '(default)'!r} has no prompt {name!r} (its prompts: {listed}); "
                         f"set {role}_prompt to one of them, or to None for no prompt")


def declared_prompts(models: list[dict[str, Any]], model: str | None) -> frozenset[str] | None:
    """The prompt names of ``model`` (None: the default model) in a ``models`` reply; None if it is not there."""
    for entry in models:
        if (entry["id"] == model) if model is not None else entry.get("default"):
            return frozenset(entry.get("prompts") or ())
    return None


def chunks(texts: Sequence[str], size: int) -> Iterator[list[str]]:
    """``texts`` in consecutive lists of at most ``size``."""
    return (list(texts[start:start + size]) for start in range(0, len(texts), size))
