"""One Kafka client configuration for every client: librdkafka-style keys (``SOP_KAFKA_CLIENT_CONFIG``) as
confluent-kafka takes them (publisher, admin, status, replay), and the same settings mapped to aiokafka's
arguments, which faust uses (the stream processor)::

    cfg = {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "sop",
           "sasl.password": "…", "ssl.ca.location": "/etc/kafka/ca.pem"}
    check_client_config(cfg)            # ClientConfigError naming a key aiokafka cannot honour
    kwargs = aiokafka_settings(cfg)     # security_protocol, sasl_mechanism, sasl_plain_*, ssl_context, client_id

Only keys with an exact counterpart on both sides are accepted: a setting one client honours and another
silently drops would let the processor connect differently from the robots (or not at all). Everything else is
refused with the key named, so the fix is obvious at start rather than a failed connection later.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")

# key -> what it does on the aiokafka side (shown when a key is refused)
SUPPORTED: Mapping[str, str] = {
    "security.protocol": "security_protocol (PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL)",
    "sasl.mechanism": f"sasl_mechanism ({', '.join(MECHANISMS)})",
    "sasl.mechanisms": "the same as sasl.mechanism (librdkafka's older name)",
    "sasl.username": "sasl_plain_username",
    "sasl.password": "sasl_plain_password",
    "ssl.ca.location": "the CA file (or directory) of the TLS context",
    "ssl.ca.pem": "the CA certificates (PEM text) of the TLS context",
    "ssl.certificate.location": "the client certificate (PEM file) of the TLS context",
    "ssl.key.location": "the client key (PEM file) of the TLS context",
    "ssl.key.password": "the password of that key",
    "ssl.endpoint.identification.algorithm": "'https' (default: check the broker's host name) or 'none'",
    "enable.ssl.certificate.verification": "'true' (default) or 'false' (no verification at all: tests only)",
    "ssl.cipher.suites": "OpenSSL cipher list of the TLS context",
    "client.id": "client_id",
}

# Refused with a specific reason (the generic message covers the rest).
WHY_NOT: Mapping[str, str] = {
    "bootstrap.servers": "set SOP_KAFKA_BOOTSTRAP instead",
    "sasl.oauthbearer.method": "OAUTHBEARER needs a token provider in code; aiokafka has no OIDC client",
    "sasl.oauthbearer.config": "OAUTHBEARER needs a token provider in code; aiokafka has no OIDC client",
    "sasl.kerberos.service.name": "GSSAPI is not supported (librdkafka runs kinit itself, aiokafka does not)",
    "sasl.kerberos.keytab": "GSSAPI is not supported (librdkafka runs kinit itself, aiokafka does not)",
    "sasl.kerberos.principal": "GSSAPI is not supported (librdkafka runs kinit itself, aiokafka does not)",
    "ssl.keystore.location": "PKCS#12 keystores are not supported by Python's ssl: give ssl.certificate.location "
                             "and ssl.key.location (PEM)",
    "ssl.certificate.pem": "give the certificate as a file: ssl.certificate.location",
    "ssl.key.pem": "give the key as a file: ssl.key.location",
}


class ClientConfigError(ValueError):
    """A Kafka client setting that not every client can honour; the message names the key."""


def _truthy(key: str, value: str) -> bool:
    v = str(value).strip().lower()
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no"):
        return False
    raise ClientConfigError(f"{key}: expected true or false, got {value!r}")


def check_client_config(config: Mapping[str, Any]) -> None:
    """Raise :class:`ClientConfigError` unless every key maps onto aiokafka (and the values make sense)."""
    aiokafka_settings(config)


def aiokafka_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The librdkafka-style ``config`` as aiokafka client arguments (``security_protocol``, ``sasl_mechanism``,
    ``sasl_plain_username``, ``sasl_plain_password``, ``ssl_context``, ``client_id``)."""
    for key in config:
        if key in WHY_NOT:
            raise ClientConfigError(f"SOP_KAFKA_CLIENT_CONFIG key {key!r} is not supported: {WHY_NOT[key]}")
        if key not in SUPPORTED:
            raise ClientConfigError(
                f"SOP_KAFKA_CLIENT_CONFIG key {key!r} has no equivalent in aiokafka (the stream processor's Kafka "
                f"client), so not every SOP client would honour it; supported keys: {', '.join(SUPPORTED)}")
    cfg = {k: str(v) for k, v in config.items()}
    protocol = cfg.get("security.protocol", "PLAINTEXT").upper()
    if protocol not in PROTOCOLS:
        raise ClientConfigError(f"security.protocol: {cfg['security.protocol']!r} is not one of {', '.join(PROTOCOLS)}")
    if "sasl.mechanism" in cfg and "sasl.mechanisms" in cfg and cfg["sasl.mechanism"] != cfg["sasl.mechanisms"]:
        raise ClientConfigError("sasl.mechanism and sasl.mechanisms disagree: give one of them")
    mechanism = (cfg.get("sasl.mechanism") or cfg.get("sasl.mechanisms") or "").upper()
    sasl = protocol.startswith("SASL_")
    tls = protocol in ("SSL", "SASL_SSL")
    out: dict[str, Any] = {"security_protocol": protocol}
    if sasl:
        mechanism = mechanism or "GSSAPI"  # librdkafka's default, refused below with the reason
        if mechanism not in MECHANISMS:
            raise ClientConfigError(
                f"sasl.mechanism {mechanism!r} is not supported by every SOP client (use one of {', '.join(MECHANISMS)}); "
                + ("GSSAPI needs kinit, which librdkafka runs itself and aiokafka does not" if mechanism == "GSSAPI"
                   else "OAUTHBEARER needs a token provider in code" if mechanism == "OAUTHBEARER" else ""))
        for key in ("sasl.username", "sasl.password"):
            if not cfg.get(key):
                raise ClientConfigError(f"security.protocol {protocol} with {mechanism} needs {key}")
        out.update(sasl_mechanism=mechanism, sasl_plain_username=cfg["sasl.username"],
                   sasl_plain_password=cfg["sasl.password"])
    else:
        for key in ("sasl.mechanism", "sasl.mechanisms", "sasl.username", "sasl.password"):
            if key in cfg:
                raise ClientConfigError(f"{key} is set but security.protocol is {protocol}: use SASL_PLAINTEXT or "
                                        "SASL_SSL, or remove it")
    ssl_keys = [k for k in cfg if k.startswith("ssl.") or k == "enable.ssl.certificate.verification"]
    if tls:
        out["ssl_context"] = _ssl_context(cfg)
    elif ssl_keys:
        raise ClientConfigError(f"{ssl_keys[0]} is set but security.protocol is {protocol}: use SSL or SASL_SSL, "
                                "or remove it")
    if "client.id" in cfg:
        out["client_id"] = cfg["client.id"]
    return out


def _ssl_context(cfg: Mapping[str, str]) -> ssl.SSLContext:
    ca = cfg.get("ssl.ca.location")
    try:
        if ca is not None and Path(ca).is_dir():
            context = ssl.create_default_context(capath=ca)
        elif ca is not None:
            if not Path(ca).is_file():
                raise ClientConfigError(f"ssl.ca.location: no such file {ca!r}")
            context = ssl.create_default_context(cafile=ca)
        else:
            context = ssl.create_default_context()
        if "ssl.ca.pem" in cfg:
            context.load_verify_locations(cadata=cfg["ssl.ca.pem"])
        cert, key = cfg.get("ssl.certificate.location"), cfg.get("ssl.key.location")
        if key is not None and cert is None:
            raise ClientConfigError("ssl.key.location is set without ssl.certificate.location")
        if cert is not None:
            for name, path in (("ssl.certificate.location", cert), ("ssl.key.location", key)):
                if path is not None and not Path(path).is_file():
                    raise ClientConfigError(f"{name}: no such file {path!r}")
            context.load_cert_chain(cert, keyfile=key, password=cfg.get("ssl.key.password"))
        if "ssl.cipher.suites" in cfg:
            context.set_ciphers(cfg["ssl.cipher.suites"])
    except ssl.SSLError as exc:
        raise ClientConfigError(f"the TLS settings of SOP_KAFKA_CLIENT_CONFIG do not load: {exc}") from exc
    identification = cfg.get("ssl.endpoint.identification.algorithm", "https").strip().lower()
    if identification not in ("https", "none", ""):
        raise ClientConfigError(f"ssl.endpoint.identification.algorithm: expected 'https' or 'none', got {identification!r}")
    verify = _truthy("enable.ssl.certificate.verification", cfg.get("enable.ssl.certificate.verification", "true"))
    context.check_hostname = verify and identification == "https"
    if not verify:
        context.verify_mode = ssl.CERT_NONE
    return context
