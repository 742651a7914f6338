"""Tenants: apps on sockets of their own, each seeing its models, held to its quotas and cache ops.

Scenario (one daemon, the tiny catalog, two tenants beside the main socket):
1. kiosk sees the bge models only, may queue 8 texts and have 2 requests in flight, may not touch the cache;
   its socket belongs to the test user's group, mode 0660.
2. robot sees e5-tiny and the qwen3 models, may load and unload (not pin), weighs 2; socket mode 0600.
3. The main socket sees everything and may do everything, as without tenants.
"""

from __future__ import annotations

import grp
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import zmq
from akidb_embed.settings import SettingsError, Tenant, load_settings
from akidb_embed_client import Client, NotAllowed, Overloaded, UnknownModel
from akidb_embed_client.protocol import encode_request
from daemon_process import Daemon, run_daemon, wait_for, write_config

GROUP = grp.getgrgid(os.getgid()).gr_name  # a group the daemon (this user) may give its socket to
TENANTS = [
    {"name": "kiosk", "group": GROUP, "mode": 0o660, "models": ["bge-*"], "max_in_flight": 2, "max_queued_texts": 8},
    {"name": "robot", "mode": 0o600, "models": ["e5-tiny", "qwen3-*"], "cache_ops": ["load", "unload"], "weight": 2},
]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]) -> Iterator[Daemon]:
    import tinymodels

    catalog = tmp_path_factory.mktemp("tenants") / "models.d"
    tinymodels.write_manifest(catalog, "bge-tiny", tiny_models["encoder"], **tinymodels.BGE_FIELDS, default=True)
    tinymodels.write_manifest(catalog, "e5-tiny", tiny_models["encoder"], **tinymodels.E5_FIELDS)
    tinymodels.write_manifest(catalog, "qwen3-tiny", tiny_models["decoder"], **tinymodels.QWEN3_FIELDS)
    with run_daemon(catalog, tenants=TENANTS, limits={"max_texts": 16}) as daemon:
        yield daemon


def tenant_client(daemon: Daemon, name: str) -> Client:
    return Client(daemon.socket.parent / f"{name}.sock", timeout=30, retries=1)


def test_each_tenant_sees_only_its_models(shared: Daemon) -> None:
    with tenant_client(shared, "kiosk") as kiosk, tenant_client(shared, "robot") as robot, shared.client() as main:
        assert [m["id"] for m in kiosk.models()] == ["bge-tiny"]
        assert sorted(m["id"] for m in robot.models()) == ["e5-tiny", "qwen3-tiny"]
        assert sorted(m["id"] for m in main.models()) == ["bge-tiny", "e5-tiny", "qwen3-tiny"]
        assert kiosk.embed("hello", model="bge-tiny").shape[0] == 1
        assert kiosk.embed("hello").shape[0] == 1  # the default model is one of kiosk's
        with pytest.raises(UnknownModel) as refused:
            kiosk.embed("hello", model="e5-tiny")
        assert "kiosk" in refused.value.message and "bge-tiny" in refused.value.message
        assert "qwen3" not in refused.value.message  # the other tenants' models stay invisible
        with pytest.raises(UnknownModel) as no_default:
            robot.embed("hello")  # the default model is not robot's: as if there were none
        assert "bge" not in no_default.value.message
        assert robot.status()["default_model"] is None
        fitting = robot.fits({})["fitting"]
        assert {c["id"] for c in fitting} <= {"e5-tiny", "qwen3-tiny"}
        assert set(robot.status()["stats"]) == {"e5-tiny", "qwen3-tiny"}


def test_socket_files_get_the_tenants_group_and_mode(shared: Daemon) -> None:
    kiosk = (shared.socket.parent / "kiosk.sock").stat()
    robot = (shared.socket.parent / "robot.sock").stat()
    assert stat.S_IMODE(kiosk.st_mode) == 0o660 and kiosk.st_gid == grp.getgrnam(GROUP).gr_gid
    assert stat.S_IMODE(robot.st_mode) == 0o600
    assert stat.S_IMODE(shared.socket.stat().st_mode) == 0o660


def test_cache_ops_are_refused_where_not_allowed(shared: Daemon) -> None:
    with tenant_client(shared, "kiosk") as kiosk, tenant_client(shared, "robot") as robot, shared.client() as main:
        for op in (kiosk.load, kiosk.unload, kiosk.pin, kiosk.unpin, kiosk.tune):
            with pytest.raises(NotAllowed) as refused:
                op("bge-tiny")
            assert "kiosk" in refused.value.message and "cache_ops" in refused.value.message
        assert robot.load("e5-tiny")["state"] == "ready"
        assert robot.unload("e5-tiny")["state"] == "available"
        with pytest.raises(NotAllowed):
            robot.pin("e5-tiny")
        with pytest.raises(UnknownModel):
            robot.load("bge-tiny")  # allowed op, invisible model
        assert main.pin("bge-tiny")["pinned"] is True
        assert main.unpin("bge-tiny")["pinned"] is False
        figures = main.status()["tenants"]
        assert figures["kiosk"]["refused"]["cache_ops"] >= 5 and figures["robot"]["refused"]["cache_ops"] >= 1
        assert set(kiosk.status()["tenants"]) == {"kiosk"}  # a tenant sees its own figures only


def test_max_queued_texts_is_enforced_with_the_tenant_named(shared: Daemon) -> None:
    with tenant_client(shared, "kiosk") as kiosk, tenant_client(shared, "robot") as robot:
        with pytest.raises(Overloaded) as refused:
            kiosk.embed(["a text"] * 9)
        assert "kiosk" in refused.value.message and "max_queued_texts" in refused.value.message
        assert kiosk.embed(["a text"] * 8).shape[0] == 8  # up to the quota is fine
        assert robot.embed(["a text"] * 16, model="e5-tiny").shape[0] == 16  # robot has no such quota
        assert kiosk.status()["tenants"]["kiosk"]["refused"]["max_queued_texts"] >= 1


def test_max_in_flight_is_enforced_and_the_rest_are_served(shared: Daemon) -> None:
    """Six requests at once while the model loads: two wait for it, four are refused at once."""
    with shared.client() as main:
        main.unload("bge-tiny")
    context = zmq.Context.instance()
    dealer = context.socket(zmq.DEALER)
    dealer.connect(f"ipc://{shared.socket.parent / 'kiosk.sock'}")
    try:
        for i in range(6):
            dealer.send_multipart([b"", encode_request("embed", i, texts=["one"], model="bge-tiny")])
        replies = {}
        while len(replies) < 6:
            assert dealer.poll(30_000), "a request was not answered"
            header = msgpack.unpackb(dealer.recv_multipart()[1])
            replies[header["id"]] = header
    finally:
        dealer.close(linger=0)
    refused = [r for r in replies.values() if not r["ok"]]
    assert sum(r["ok"] for r in replies.values()) >= 2
    assert refused and all(r["code"] == "overloaded" and "max_in_flight" in r["message"] for r in refused)
    assert "kiosk" in refused[0]["message"]


def test_metrics_carry_the_tenant(shared: Daemon) -> None:
    with tenant_client(shared, "robot") as robot:
        robot.embed("counted", model="e5-tiny")
    textfile = Path(shared.log_path.parent / "state" / "metrics" / "akidb-embed.prom")
    wait_for(lambda: 'akidb_embed_tenant_requests_total{code="ok",tenant="robot"}' in textfile.read_text(), 15)
    text = textfile.read_text()
    assert 'akidb_embed_tenant_refused_total{quota="max_in_flight",tenant="kiosk"}' in text
    assert 'akidb_embed_tenant_in_flight{tenant="main"} 0.0' in text


@pytest.mark.parametrize(
    "tenants, key",
    [
        ([{"name": "main"}], "tenants.main"),
        ([{"name": "a"}, {"name": "a"}], "tenants.a"),
        ([{"name": "a", "socket": "/tmp/x.sock"}, {"name": "b", "socket": "/tmp/x.sock"}], "tenants.b.socket"),
        ([{"name": "a", "weight": 0}], "tenants.a.weight"),
        ([{"name": "a", "models": []}], "tenants.a.models"),
        ([{"name": "a", "models": "bge-*"}], "tenants.a.models"),
        ([{"name": "a", "cache_ops": ["evict"]}], "tenants.a.cache_ops"),
        ([{"name": "a", "quota": 3}], "tenants.a: unknown key(s) quota"),
        ([{"name": "a", "mode": 0o400}], "tenants.a.mode"),
        ([{"name": "Bad Name"}], "tenants.Bad Name"),
    ],
)
def test_bad_tenants_are_refused_naming_the_key(tmp_path: Path, tenants: list, key: str) -> None:
    config = tmp_path / "akidb-embed.toml"
    write_config(config, {"socket": str(tmp_path / "embed.sock"), "tenants": tenants})
    with pytest.raises(SettingsError) as refused:
        load_settings(config)
    assert key in str(refused.value)


def test_tenant_defaults(tmp_path: Path) -> None:
    config = tmp_path / "akidb-embed.toml"
    write_config(config, {"socket": str(tmp_path / "embed.sock"), "tenants": [{"name": "kiosk"}]})
    settings = load_settings(config)
    assert settings.tenants == (Tenant("kiosk", tmp_path / "kiosk.sock"),)
    kiosk = settings.tenants[0]
    assert (kiosk.models, kiosk.cache_ops, kiosk.weight, kiosk.max_in_flight, kiosk.mode) == (("*",), (), 1.0, 0, 0o660)
    assert settings.main_tenant.cache_ops == ("load", "unload", "pin")
    assert load_settings(None, socket=tmp_path / "x.sock").tenants == ()


def test_a_group_that_does_not_exist_stops_the_daemon_with_the_key(catalog: Path) -> None:
    with pytest.raises(RuntimeError) as failed:
        with run_daemon(catalog, tenants=[{"name": "kiosk", "group": "no-such-group-akd"}], ready_timeout=15):
            pass
    assert "tenants.kiosk.group" in str(failed.value)
