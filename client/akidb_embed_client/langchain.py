"""LangChain embeddings served by the akidb-embed daemon: ``AkidbEmbeddings``.

Needs the ``langchain`` extra: ``pip install 'akidb-embed-client[langchain]'``.
"""

from __future__ import annotations

try:
    from langchain_core.embeddings import Embeddings
except ImportError as error:
    raise ImportError(
        "akidb_embed_client.langchain needs langchain-core: pip install 'akidb-embed-client[langchain]'"
    ) from error

from .adapters import AkidbOptions


class AkidbEmbeddings(AkidbOptions, Embeddings):
    """A LangChain ``Embeddings`` on the daemon; it connects per call, not at construction.

    ``AkidbEmbeddings(model="e5-small-v2")`` embeds queries with the model's "query" prompt and documents
    with its "passage" prompt where it declares them (see ``AkidbOptions`` for every option).
    Daemon errors raise the client's exceptions (``UnknownModel``, ``ModelChanged``, ...).
    """

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """Embed documents, with the document prompt."""
        return self._embed_texts(texts, "document")

    def embed_query(self, text: str) -> list[float]:
        """Embed one query, with the query prompt."""
        return self._embed_texts([text], "query")[0]

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        """``embed_documents`` on the running event loop."""
        return await self._aembed_texts(texts, "document")

    async def aembed_query(self, text: str) -> list[float]:
        """``embed_query`` on the running event loop."""
        return (await self._aembed_texts([text], "query"))[0]
