"""The LlamaIndex adapter against a real daemon: a VectorStoreIndex round trip on real fortunes, batching, async,
prompts and errors. The option and prompt rules it shares with the LangChain adapter are tested in test_langchain.py.

The daemon (``adapter_daemon``) serves the real all-MiniLM-L6-v2 as its default model and the tiny E5.
"""

from __future__ import annotations

import asyncio
import importlib
import socket
import sys

import pytest
from akidb_embed_client import UnknownModel
from akidb_embed_client.llama_index import AkidbEmbedding
from daemon_process import Daemon
from fortunes import fortune_sentences
from llama_index.core import VectorStoreIndex
from llama_index.core.schema import TextNode

FORTUNES = 40
BATCH = 16


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any network connection (LlamaIndex can fetch tokenizer files or call OpenAI by default): the adapter
    must need none. Only the connect is replaced; the daemon's ZeroMQ ipc socket is not a Python socket."""
    connect = socket.socket.connect

    def local_only(self: socket.socket, address: object) -> None:
        assert self.family == socket.AF_UNIX, f"a network connection to {address}"
        connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", local_only)


def test_vector_index_finds_the_paraphrased_fortune(adapter_daemon: Daemon, offline: None) -> None:
    """1. Index 40 real fortunes (English, German, Spanish) as TextNodes: one request per batch of 16
    2. a paraphrase retrieves its fortune first, sync  3. and another through the async path (aretrieve)."""
    texts = fortune_sentences(FORTUNES, max_chars=160)
    embed_model = AkidbEmbedding(socket=str(adapter_daemon.socket), embed_batch_size=BATCH)
    before = adapter_daemon.requests_served()
    nodes = [TextNode(text=text, id_=str(n)) for n, text in enumerate(texts)]
    index = VectorStoreIndex(nodes, embed_model=embed_model)
    assert adapter_daemon.requests_served() == before + -(-FORTUNES // BATCH)
    retriever = index.as_retriever(similarity_top_k=3)
    hits = retriever.retrieve("Everybody admires the great old books, but nobody actually reads them")
    assert hits[0].node.get_content().startswith("A classic is something that everyone wants to have read"), hits
    hits = asyncio.run(retriever.aretrieve("Punctuation jokes about verb tenses"))
    assert hits[0].node.get_content() == "A grammarian's life is always in tense.", hits


def test_a_batch_is_one_request_and_async_matches_sync(adapter_daemon: Daemon) -> None:
    """1. A batch of 100 texts is one request, sync and async (LlamaIndex's own default would make 10)
    2. the async methods give the sync vectors  3. they are plain float lists, those of the client."""
    texts = [f"sentence number {n}" for n in range(100)]
    embed_model = AkidbEmbedding(socket=str(adapter_daemon.socket))
    with adapter_daemon.client() as client:
        want = client.embed(texts).tolist()
    before = adapter_daemon.requests_served()
    got = embed_model.get_text_embedding_batch(texts)
    assert got == want and type(got[0][0]) is float
    assert asyncio.run(embed_model.aget_text_embedding_batch(texts)) == want
    assert adapter_daemon.requests_served() == before + 2
    assert embed_model.get_query_embedding(texts[3]) == asyncio.run(embed_model.aget_query_embedding(texts[3])) == want[3]
    assert embed_model.get_text_embedding(texts[4]) == asyncio.run(embed_model.aget_text_embedding(texts[4])) == want[4]


def test_e5_gets_its_query_and_passage_prompts(adapter_daemon: Daemon) -> None:
    """Queries carry E5's "query" prompt and texts its "passage" prompt, sync and async."""
    with adapter_daemon.client() as client:
        query, passage = (client.embed(["a tiny text"], "e5-tiny", prompt=p).tolist()[0] for p in ("query", "passage"))
    e5 = AkidbEmbedding(model="e5-tiny", socket=str(adapter_daemon.socket))
    assert e5.get_query_embedding("a tiny text") == query and e5.get_text_embedding("a tiny text") == passage != query
    assert asyncio.run(e5.aget_query_embedding("a tiny text")) == query
    assert e5.to_payload()["model_name"] == "e5-tiny"


def test_an_unknown_model_raises_the_clients_error(adapter_daemon: Daemon) -> None:
    missing = AkidbEmbedding(model="no-such-model", socket=str(adapter_daemon.socket))
    with pytest.raises(UnknownModel, match="no-such-model"):
        missing.get_text_embedding_batch(["x", "y"])
    with pytest.raises(UnknownModel, match="no-such-model"):
        asyncio.run(missing.aget_query_embedding("x"))


def test_missing_extra_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without llama-index-core the import fails naming the extra to install."""
    monkeypatch.setitem(sys.modules, "llama_index.core.base.embeddings.base", None)  # None: "not installed"
    monkeypatch.delitem(sys.modules, "akidb_embed_client.llama_index")
    with pytest.raises(ImportError, match=r"pip install 'akidb-embed-client\[llama-index\]'"):
        importlib.import_module("akidb_embed_client.llama_index")

