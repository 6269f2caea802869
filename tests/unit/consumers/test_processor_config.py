"""The processor's Kafka settings: the broker list, the client config as faust credentials, internal topic configs."""

from __future__ import annotations

SASL = {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "sop",
        "sasl.password": "pw"}


def test_the_processor_turns_it_into_faust_credentials() -> None:
    import faust

    from consumers.processor import ProcessorConfig

    topics = {"Step": "s", "EpisodeEvent": "e", "InterventionEvent": "i", "deadletter": "d"}
    config = ProcessorConfig(bootstrap="h1:1, h2:2", topics=topics, partitions=2, lake_root="/tmp/l",
                             client_config=SASL, replication_factor=3, min_insync_replicas=2)
    assert config.brokers == ["kafka://h1:1", "kafka://h2:2"]
    assert config.internal_topic_config() == {"min.insync.replicas": "2"}
    creds = config.broker_settings()["broker_credentials"]
    assert isinstance(creds, faust.SASLCredentials) and creds.mechanism.value == "SCRAM-SHA-512"
    assert creds.username == "sop" and creds.ssl_context is not None and creds.protocol.value == "SASL_SSL"
    tls = ProcessorConfig(bootstrap="h:1", topics=topics, partitions=2, lake_root="/tmp/l",
                          client_config={"security.protocol": "SSL"}).broker_settings()["broker_credentials"]
    assert isinstance(tls, faust.SSLCredentials)
    assert ProcessorConfig(bootstrap="h:1", topics=topics, partitions=2, lake_root="/tmp/l").broker_settings() == {}
