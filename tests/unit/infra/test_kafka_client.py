"""The librdkafka-style client config mapped onto aiokafka (the processor's client): what maps, what is refused."""

from __future__ import annotations

import ssl

import pytest

from infra.kafka_client import ClientConfigError, aiokafka_settings

SASL = {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "sop",
        "sasl.password": "pw"}


def test_plaintext_by_default() -> None:
    assert aiokafka_settings({}) == {"security_protocol": "PLAINTEXT"}


def test_sasl_ssl_maps_mechanism_credentials_and_a_verifying_tls_context() -> None:
    out = aiokafka_settings({**SASL, "client.id": "fleet-7"})
    assert (out["security_protocol"], out["sasl_mechanism"]) == ("SASL_SSL", "SCRAM-SHA-512")
    assert (out["sasl_plain_username"], out["sasl_plain_password"], out["client_id"]) == ("sop", "pw", "fleet-7")
    context = out["ssl_context"]
    assert isinstance(context, ssl.SSLContext) and context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED


def test_sasl_plaintext_has_no_tls_and_the_old_key_name_works() -> None:
    out = aiokafka_settings({"security.protocol": "sasl_plaintext", "sasl.mechanisms": "PLAIN",
                             "sasl.username": "u", "sasl.password": "p"})
    assert out["security_protocol"] == "SASL_PLAINTEXT" and out["sasl_mechanism"] == "PLAIN"
    assert "ssl_context" not in out


def test_verification_switches() -> None:
    no_host = aiokafka_settings({"security.protocol": "SSL", "ssl.endpoint.identification.algorithm": "none"})
    assert not no_host["ssl_context"].check_hostname and no_host["ssl_context"].verify_mode == ssl.CERT_REQUIRED
    off = aiokafka_settings({"security.protocol": "SSL", "enable.ssl.certificate.verification": "false"})
    assert off["ssl_context"].verify_mode == ssl.CERT_NONE


@pytest.mark.parametrize(("config", "named"), [
    ({"socket.keepalive.enable": "true"}, "socket.keepalive.enable"),
    ({"bootstrap.servers": "x:9092"}, "SOP_KAFKA_BOOTSTRAP"),
    ({"security.protocol": "SASL_SSL", "sasl.mechanism": "GSSAPI"}, "GSSAPI"),
    ({"security.protocol": "SASL_SSL", "sasl.mechanism": "OAUTHBEARER"}, "OAUTHBEARER"),
    ({"security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN", "sasl.username": "u"}, "sasl.password"),
    ({"sasl.username": "u"}, "sasl.username"),
    ({"ssl.ca.location": "/etc/ssl/certs"}, "ssl.ca.location"),
    ({"security.protocol": "SSL", "ssl.ca.location": "/no/such/ca.pem"}, "no such file"),
    ({"security.protocol": "SSL", "ssl.keystore.location": "/k.p12"}, "PKCS#12"),
    ({"security.protocol": "TLS"}, "security.protocol"),
])
def test_what_cannot_be_honoured_everywhere_is_refused_by_name(config: dict[str, str], named: str) -> None:
    with pytest.raises(ClientConfigError, match=named.replace(".", r"\.").replace("#", "#")):
        aiokafka_settings(config)
