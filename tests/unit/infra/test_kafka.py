from __future__ import annotations

import uuid

from infra import kafka


def test_cluster_ids_never_start_with_a_dash(monkeypatch) -> None:
    """kafka-storage would read such an id as an option; base64url starts with '-' for a first byte 0xF8-0xFB."""
    drawn = iter([uuid.UUID(bytes=bytes([0xF8]) + bytes(15)), uuid.UUID(bytes=bytes([0x12]) + bytes(15))])
    monkeypatch.setattr(kafka.uuid, "uuid4", lambda: next(drawn))
    cluster_id = kafka.new_cluster_id()
    assert not cluster_id.startswith("-")
    assert cluster_id.startswith("E")  # the second draw
    assert len(cluster_id) == 22


def test_topic_specs_carry_replication_and_refuse_an_impossible_min_isr() -> None:
    import pytest

    spec = kafka.TopicSpec(name="t", replication_factor=3, min_insync_replicas=2, retention_ms=1000)
    assert spec.config()["min.insync.replicas"] == "2" and spec.config()["retention.ms"] == "1000"
    assert "min.insync.replicas" not in kafka.TopicSpec(name="t").config()
    with pytest.raises(kafka.StackError, match="min.insync.replicas"):
        kafka.TopicSpec(name="t", replication_factor=1, min_insync_replicas=2)


def test_cluster_nodes_share_one_quorum_and_replicate_internal_topics(tmp_path) -> None:
    cluster = kafka.KafkaCluster(kafka.KafkaClusterConfig(data_dir=tmp_path, nodes=3, first_port=19092))
    nodes = [cluster.node(i) for i in cluster.node_ids]
    assert cluster.bootstrap_servers == "127.0.0.1:19092,127.0.0.1:19093,127.0.0.1:19094"
    assert len({n.config.voters for n in nodes}) == 1 and nodes[0].config.voters.count("@") == 3
    assert len({n.config.cluster_id for n in nodes}) == 1
    props = kafka._server_properties(nodes[1].config, {"port": 19093, "controller_port": 29093}, tmp_path / "log")
    for line in ("node.id=2", "default.replication.factor=3", "min.insync.replicas=2",
                 "offsets.topic.replication.factor=3", "transaction.state.log.min.isr=2",
                 f"controller.quorum.voters={nodes[0].config.voters}"):
        assert line in props.splitlines(), line
    again = kafka.KafkaCluster(kafka.KafkaClusterConfig(data_dir=tmp_path, nodes=3, first_port=19092))
    assert again.node(3).config.controller_port == nodes[2].config.controller_port  # the layout is kept


def test_free_ports_are_distinct_even_when_the_kernel_repeats_one(monkeypatch) -> None:
    """CI once saw a broker's INTERNAL and CONTROLLER listeners get the same port: bind(0) may hand a port out
    again once its probe socket is closed, before the server binds it."""
    drawn = iter([41001, 41001, 41001, 41002])

    class Probe:
        def __init__(self, *_args: object) -> None:
            self.port = next(drawn)

        def __enter__(self) -> Probe:
            return self

        def __exit__(self, *_exc: object) -> None:
            return None

        def bind(self, _addr: tuple[str, int]) -> None:
            return None

        def getsockname(self) -> tuple[str, int]:
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(kafka, "_handed_out", set())
    monkeypatch.setattr(kafka.socket, "socket", Probe)
    assert [kafka.free_port(), kafka.free_port()] == [41001, 41002]
