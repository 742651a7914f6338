"""The LangChain adapter against a real daemon: LangChain's standard embeddings suites, prompts, batching, errors.

The daemon (``adapter_daemon``) serves the real all-MiniLM-L6-v2 (no prompts) as its default model,
the tiny E5 ("query"/"passage" prompts) and the tiny Qwen3 (a "query" prompt only, Matryoshka cuts).
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys

import pytest
from akidb_embed_client import BadRequest, ModelChanged, UnknownModel
from akidb_embed_client.langchain import AkidbEmbeddings
from daemon_process import Daemon, wait_for
from langchain_tests.integration_tests import EmbeddingsIntegrationTests
from langchain_tests.unit_tests import EmbeddingsUnitTests
from minilm import MINILM_ID

TEXTS = ["A bug in the code is worth two in the documentation.", "A grammarian's life is always in tense.", ""]


class TestAkidbEmbeddingsUnit(EmbeddingsUnitTests):
    """Construction alone: the socket does not exist, so any connection attempt would fail."""

    @property
    def embeddings_class(self) -> type[AkidbEmbeddings]:
        return AkidbEmbeddings

    @property
    def embedding_model_params(self) -> dict[str, str]:
        return {"model": MINILM_ID, "socket": "/nonexistent/akidb-embed/embed.sock"}

    @property
    def init_from_env_params(self) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
        path = "/run/elsewhere/embed.sock"
        return {"AKIDB_EMBED_SOCKET": path}, {"model": MINILM_ID}, {"socket": path}


# Its async tests each run on a new event loop; the mark reaches its sync tests too, harmlessly.
@pytest.mark.asyncio
@pytest.mark.filterwarnings("ignore:The test <Function .* is marked with '@pytest.mark.asyncio'")
class TestAkidbEmbeddingsIntegration(EmbeddingsIntegrationTests):
    @pytest.fixture(autouse=True)
    def _daemon(self, adapter_daemon: Daemon) -> None:
        self.socket = str(adapter_daemon.socket)

    @property
    def embeddings_class(self) -> type[AkidbEmbeddings]:
        return AkidbEmbeddings

    @property
    def embedding_model_params(self) -> dict[str, str]:
        return {"model": MINILM_ID, "socket": self.socket}


def test_vectors_are_the_clients_as_plain_floats(adapter_daemon: Daemon) -> None:
    """1. MiniLM has no prompts: queries and documents both go bare, as the client sends them  2. rows are lists
    of Python floats in input order, sync and async alike  3. an empty list makes no request."""
    embeddings = AkidbEmbeddings(socket=str(adapter_daemon.socket))  # the daemon's default model
    with adapter_daemon.client() as client:
        want = client.embed(TEXTS).tolist()
    documents = embeddings.embed_documents(TEXTS)
    assert documents == want and type(documents[0][0]) is float
    assert embeddings.embed_query(TEXTS[1]) == want[1]
    assert asyncio.run(embeddings.aembed_documents(TEXTS)) == want
    assert asyncio.run(embeddings.aembed_query(TEXTS[1])) == want[1]
    assert embeddings.embed_documents([]) == [] and asyncio.run(embeddings.aembed_documents([])) == []


def test_e5_gets_its_query_and_passage_prompts(adapter_daemon: Daemon) -> None:
    """1. E5: queries with its "query" prompt, documents with "passage", by default  2. None sends no prompt
    3. another declared name is used as set."""
    with adapter_daemon.client() as client:
        query, passage, bare = (client.embed(TEXTS[0], "e5-tiny", prompt=p).tolist()[0] for p in ("query", "passage", None))
    assert len({tuple(query), tuple(passage), tuple(bare)}) == 3, "the prompts should change the vectors"
    e5 = AkidbEmbeddings(model="e5-tiny", socket=str(adapter_daemon.socket))
    assert e5.embed_query(TEXTS[0]) == query and e5.embed_documents(TEXTS[:1]) == [passage]
    assert asyncio.run(e5.aembed_query(TEXTS[0])) == query and asyncio.run(e5.aembed_documents(TEXTS[:1])) == [passage]
    plain = AkidbEmbeddings(model="e5-tiny", socket=str(adapter_daemon.socket), query_prompt=None,
                            document_prompt="query")
    assert plain.embed_query(TEXTS[0]) == bare and plain.embed_documents(TEXTS[:1]) == [query]


def test_qwen3_query_prompt_only_and_dimensions(adapter_daemon: Daemon) -> None:
    """1. Qwen3 declares "query" but no "passage": documents go bare  2. ``dimensions`` cuts every vector."""
    with adapter_daemon.client() as client:
        query = client.embed(TEXTS[:1], "qwen3-tiny", prompt="query", dimensions=16).tolist()[0]
        bare = client.embed(TEXTS[:1], "qwen3-tiny", dimensions=16).tolist()[0]
    qwen3 = AkidbEmbeddings(model="qwen3-tiny", socket=str(adapter_daemon.socket), dimensions=16)
    assert qwen3.embed_query(TEXTS[0]) == query and qwen3.embed_documents(TEXTS[:1]) == [bare] and len(bare) == 16


def test_an_undeclared_prompt_name_is_refused(adapter_daemon: Daemon) -> None:
    """A name the model lacks (a typo) fails naming the model's prompts and the fix, sync and async."""
    typo = AkidbEmbeddings(model="e5-tiny", socket=str(adapter_daemon.socket), query_prompt="qeury")
    message = "model 'e5-tiny' has no prompt 'qeury' (its prompts: passage, query); set query_prompt to one of them"
    with pytest.raises(BadRequest, match=message.replace("(", r"\(").replace(")", r"\)")):
        typo.embed_query("x")
    with pytest.raises(BadRequest, match="no prompt 'qeury'"):
        asyncio.run(typo.aembed_query("x"))
    assert typo.embed_documents(["x"]), "documents use the default prompt, which is fine"


def test_more_texts_than_a_request_holds(adapter_daemon: Daemon) -> None:
    """1. ``batch_size`` 2 splits 5 texts into 3 requests  2. the rows still follow the input order."""
    texts = [f"text number {n}" for n in range(5)]
    embeddings = AkidbEmbeddings(socket=str(adapter_daemon.socket), batch_size=2)
    with adapter_daemon.client() as client:
        want = client.embed(texts).tolist()
    before = adapter_daemon.requests_served()
    assert embeddings.embed_documents(texts) == want and adapter_daemon.requests_served() == before + 3
    assert asyncio.run(embeddings.aembed_documents(texts)) == want and adapter_daemon.requests_served() == before + 6


def test_daemon_errors_are_the_clients(adapter_daemon: Daemon) -> None:
    """1. An unknown model raises UnknownModel, sync and async  2. another fingerprint raises ModelChanged."""
    missing = AkidbEmbeddings(model="no-such-model", socket=str(adapter_daemon.socket))
    with pytest.raises(UnknownModel, match="no-such-model"):
        missing.embed_documents(["x"])
    with pytest.raises(UnknownModel, match="no-such-model"):
        asyncio.run(missing.aembed_query("x"))
    pinned = AkidbEmbeddings(socket=str(adapter_daemon.socket), expect_fingerprint="0" * 16)
    with pytest.raises(ModelChanged):
        pinned.embed_query("x")


def test_calls_leave_no_sockets_open(adapter_daemon: Daemon) -> None:
    """Each call closes its client: 20 sync and 20 concurrent async calls leave the process's descriptors as they
    were (ZeroMQ closes a socket's descriptor on its own thread, a moment later)."""
    embeddings = AkidbEmbeddings(socket=str(adapter_daemon.socket))
    embeddings.embed_query("warm up")  # ZeroMQ's context and its threads open descriptors once
    asyncio.run(embeddings.aembed_query("warm up"))
    before = len(os.listdir("/proc/self/fd"))

    async def many() -> list[list[float]]:
        return await asyncio.gather(*(embeddings.aembed_query(f"query {n}") for n in range(20)))

    assert len({tuple(v) for v in [embeddings.embed_query(f"query {n}") for n in range(20)]}) == 20
    assert len(asyncio.run(many())) == 20
    wait_for(lambda: len(os.listdir("/proc/self/fd")) <= before, timeout=5)


def test_missing_extra_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without langchain-core the import fails naming the extra to install."""
    monkeypatch.setitem(sys.modules, "langchain_core.embeddings", None)  # None: "not installed" to the importer
    monkeypatch.delitem(sys.modules, "akidb_embed_client.langchain")
    with pytest.raises(ImportError, match=r"pip install 'akidb-embed-client\[langchain\]'"):
        importlib.import_module("akidb_embed_client.langchain")

