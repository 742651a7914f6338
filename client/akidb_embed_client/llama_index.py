"""LlamaIndex embeddings served by the akidb-embed daemon: ``AkidbEmbedding``.

Needs the ``llama-index`` extra: ``pip install 'akidb-embed-client[llama-index]'``.
"""

from __future__ import annotations

from typing import Any

try:
    from llama_index.core.base.embeddings.base import BaseEmbedding
except ImportError as error:
    raise ImportError(
        "akidb_embed_client.llama_index needs llama-index-core: pip install 'akidb-embed-client[llama-index]'"
    ) from error

from .adapters import AkidbOptions

EMBED_BATCH_SIZE = 128


class AkidbEmbedding(AkidbOptions, BaseEmbedding):
    """A LlamaIndex ``BaseEmbedding`` on the daemon; it connects per call, not at construction.

    Options as ``AkidbOptions``; each batch of ``embed_batch_size`` texts (default 128) is one request.
    Daemon errors raise the client's exceptions (``UnknownModel``, ``ModelChanged``, ...).
    """

    def __init__(self, **options: Any) -> None:
        # LlamaIndex reports model_name in its events and traces.
        options.setdefault("model_name", options.get("model") or "akidb-embed default")
        # LlamaIndex's default of 10 texts per request wastes the daemon's batching.
        options.setdefault("embed_batch_size", EMBED_BATCH_SIZE)
        super().__init__(**options)

    @classmethod
    def class_name(cls) -> str:
        return "AkidbEmbedding"

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._embed_texts([query], "query")[0]

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._embed_texts([text], "document")[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return self._embed_texts(texts, "document")

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return (await self._aembed_texts([query], "query"))[0]

    async def _aget_text_embedding(self, text: str) -> list[float]:
        return (await self._aembed_texts([text], "document"))[0]

    async def _aget_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return await self._aembed_texts(texts, "document")
