"""Kafka security of the local stack (``SOP_KAFKA_SECURITY=scram-tls``): a CA of its own, the brokers' certificate,
SCRAM-SHA-512 principals, ACLs for the standard KRaft authorizer, and the robots' signing keys.

    sec = LocalSecurity(run_dir / "security")
    sec.ensure()                                   # CA + broker certificate + service passwords (once)
    broker = LocalKafka(KafkaBrokerConfig(data_dir=..., **sec.broker_settings()))
    bootstrap = broker.start()
    admin = AdminClient({"bootstrap.servers": broker.internal_address, **sec.internal_client_config()})
    sec.provision_services(admin, topics=topics, group="sop-processor", prefix="sop.")   # users + ACLs
    robot = sec.add_robot(admin, "robot-17", topics=topics)                               # user + ACLs + key

What each listener is:

- ``CLIENT`` (every SOP process, robots included): SASL_SSL, SCRAM-SHA-512 only. A client without TLS, without
  credentials, or with wrong ones is refused at the handshake.
- ``INTERNAL`` (inter-broker replication) and ``CONTROLLER`` (the KRaft quorum): TLS with client certificates
  (``ssl.client.auth=required``): only a holder of a certificate from this CA gets in, as ``User:CN=sop-broker``
  (a super user). Nothing runs in plaintext.

Who may do what (ACLs; ``allow.everyone.if.no.acl.found=false``, so anything not granted is refused):

- ``sop-admin``: super user (topics, users, ACLs: `sop up`, `sop robot add/revoke`).
- ``sop-processor``: read the three input topics, write the dead-letter topic, its own internal topics (prefixed
  by its group id: changelogs, the control topic, faust's assignor topic: read, write, create), its group.
- ``sop-tools`` (operators' read-only tools: `sop status`, `sop kafka tail`): read and describe every topic of the
  prefix, describe every group, use groups prefixed ``sop-tools``.
- a robot: write (idempotently) and describe the three input topics — nothing else: no read, no create or delete,
  no dead-letter, changelog or group access.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import os
import re
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import KafkaException
from confluent_kafka.admin import (
    AclBinding,
    AclBindingFilter,
    AclOperation,
    AclPermissionType,
    AdminClient,
    ResourcePatternType,
    ResourceType,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialDeletion,
    UserScramCredentialUpsertion,
)

from infra.kafka import StackError

MODES = ("off", "scram-tls")
ADMIN, PROCESSOR, TOOLS = "sop-admin", "sop-processor", "sop-tools"
SERVICES = (ADMIN, PROCESSOR, TOOLS)
BROKER_CN = "sop-broker"
BROKER_PRINCIPAL = f"User:CN={BROKER_CN}"  # the brokers' certificate on INTERNAL/CONTROLLER (ssl.principal DEFAULT)
MECHANISM = "SCRAM-SHA-512"
SCRAM_ITERATIONS = 8192
CLUSTER = "kafka-cluster"  # the name of the cluster resource in ACLs
ROBOT_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


class SecurityError(StackError):
    """Security material or principals could not be set up; the message says what to fix."""


def check_robot_name(name: str) -> str:
    """A robot principal's name: lower-case letters, digits, '.', '_', '-'; not one of the ``sop-`` service names."""
    if not ROBOT_NAME.match(name):
        raise SecurityError(f"robot name {name!r}: use 1-63 lower-case letters, digits, '.', '_' or '-' "
                            "(starting with a letter or digit)")
    if name.startswith("sop-"):
        raise SecurityError(f"robot name {name!r}: names starting with 'sop-' are the stack's own principals")
    return name


def _write_private(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    tmp.replace(path)


# -- ACLs (pure: what each role is granted) ----------------------------------------------------------------------


@dataclass(frozen=True)
class Grant:
    """One ALLOW ACL: ``principal`` may ``operation`` on the resource (``pattern`` LITERAL or PREFIXED)."""

    resource: str  # TOPIC, GROUP, CLUSTER
    name: str
    pattern: str
    operation: str

    def binding(self, principal: str) -> AclBinding:
        restype = ResourceType.BROKER if self.resource == "CLUSTER" else ResourceType[self.resource]  # BROKER: librdkafka's name for CLUSTER
        return AclBinding(restype, self.name, ResourcePatternType[self.pattern], principal, "*",
                          AclOperation[self.operation], AclPermissionType.ALLOW)


def _topics(names: Iterable[str], *ops: str) -> list[Grant]:
    return [Grant("TOPIC", t, "LITERAL", op) for t in names for op in ops]


def robot_grants(topics: Mapping[str, str]) -> list[Grant]:
    """A robot: idempotent writes to the three input topics, and describing them (metadata) — nothing else."""
    inputs = [topics[k] for k in ("Step", "EpisodeEvent", "InterventionEvent")]
    return [*_topics(inputs, "WRITE", "DESCRIBE"), Grant("CLUSTER", CLUSTER, "LITERAL", "IDEMPOTENT_WRITE")]


def processor_grants(topics: Mapping[str, str], group: str) -> list[Grant]:
    """The stream processor: read the inputs, write dead letters, own its internal topics and group."""
    inputs = [topics[k] for k in ("Step", "EpisodeEvent", "InterventionEvent")]
    internal = [Grant("TOPIC", f"{group}-", "PREFIXED", op)
                for op in ("READ", "WRITE", "CREATE", "DESCRIBE", "DESCRIBE_CONFIGS")]
    return [*_topics(inputs, "READ", "DESCRIBE"), *_topics([topics["deadletter"]], "WRITE", "DESCRIBE"), *internal,
            Grant("GROUP", group, "LITERAL", "READ"), Grant("GROUP", group, "LITERAL", "DESCRIBE"),
            Grant("CLUSTER", CLUSTER, "LITERAL", "IDEMPOTENT_WRITE")]


def tools_grants(prefix: str) -> list[Grant]:
    """Operators' read-only tools: read every topic of the deployment, describe every group (lag)."""
    return [Grant("TOPIC", prefix, "PREFIXED", "READ"), Grant("TOPIC", prefix, "PREFIXED", "DESCRIBE"),
            Grant("GROUP", "*", "LITERAL", "DESCRIBE"), Grant("GROUP", "sop-tools", "PREFIXED", "READ")]


# -- admin calls (thin) ------------------------------------------------------------------------------------------


def _wait(futures: Mapping, what: str) -> None:
    for item, fut in futures.items():
        try:
            fut.result()
        except KafkaException as exc:
            raise SecurityError(f"{what} failed for {item}: {exc}") from exc


def upsert_user(admin: AdminClient, user: str, password: str) -> None:
    """Create or reset the SCRAM-SHA-512 credential of ``user``."""
    info = ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, SCRAM_ITERATIONS)
    _wait(admin.alter_user_scram_credentials([UserScramCredentialUpsertion(user, info, password.encode())]),
          "creating the SCRAM user")


def delete_user(admin: AdminClient, user: str) -> bool:
    """Remove ``user``'s SCRAM credential; False if it had none."""
    futures = admin.alter_user_scram_credentials([UserScramCredentialDeletion(user, ScramMechanism.SCRAM_SHA_512)])
    try:
        for fut in futures.values():
            fut.result()
    except KafkaException as exc:
        if "RESOURCE_NOT_FOUND" in str(exc) or "not found" in str(exc).lower():
            return False
        raise SecurityError(f"deleting the SCRAM user {user} failed: {exc}") from exc
    return True


def grant(admin: AdminClient, principal: str, grants: Iterable[Grant]) -> None:
    bindings = [g.binding(principal) for g in grants]
    if bindings:
        _wait(admin.create_acls(bindings), "creating ACLs")


def revoke_all(admin: AdminClient, principal: str) -> int:
    """Delete every ACL of ``principal``; return how many there were."""
    flt = AclBindingFilter(ResourceType.ANY, None, ResourcePatternType.ANY, principal, None, AclOperation.ANY,
                           AclPermissionType.ANY)
    deleted = 0
    for fut in admin.delete_acls([flt]).values():
        try:
            deleted += len(fut.result())
        except KafkaException as exc:
            raise SecurityError(f"deleting the ACLs of {principal} failed: {exc}") from exc
    return deleted


def wait_for_login(bootstrap: str, client_config: dict[str, str], *, topics: Iterable[str] = (),
                   timeout_s: float = 30.0) -> None:
    """Block until ``client_config`` authenticates and sees ``topics`` (a new SCRAM credential and new ACLs reach
    every broker through the metadata log shortly after the controller accepted them: a robot started before
    that would have its first events refused)."""
    deadline = time.monotonic() + timeout_s
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0, **client_config})
    want = set(topics)
    last: object = None
    while time.monotonic() < deadline:
        try:
            visible = set(admin.list_topics(timeout=3).topics)
            if want <= visible:
                return
            last = f"sees {sorted(visible)}, not yet {sorted(want - visible)}"
        except KafkaException as exc:
            last = exc
        time.sleep(0.2)
    raise SecurityError(f"the new credentials or ACLs of {client_config.get('sasl.username')} did not take effect "
                        f"within {timeout_s:.0f}s: {last}")


def wait_until_refused(bootstrap: str, client_config: dict[str, str], *, timeout_s: float = 30.0) -> None:
    """Block until ``client_config`` no longer authenticates."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0, **client_config})
        try:
            admin.list_topics(timeout=3)
        except KafkaException:
            return
        time.sleep(0.3)
    raise SecurityError(f"{client_config.get('sasl.username')} still authenticates {timeout_s:.0f}s after its revocation")


def acls_of(admin: AdminClient, principal: str) -> list[AclBinding]:
    flt = AclBindingFilter(ResourceType.ANY, None, ResourcePatternType.ANY, principal, None, AclOperation.ANY,
                           AclPermissionType.ANY)
    return list(admin.describe_acls(flt).result())


# -- the material on disk ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RobotCredentials:
    """What `sop robot add` hands to one robot: its Kafka client settings and its signing identity."""

    name: str
    client_config: dict[str, str]
    client_file: Path
    identity_file: Path


class LocalSecurity:
    """The security material of one run directory (``<run_dir>/security``, files readable by the owner only)::

        ca.pem, ca-key.pem          the local CA (the site's CA replaces it on a real deployment)
        broker.pem                  the brokers' key + certificate chain (a PEM keystore), CN=sop-broker
        broker-key.pem, broker-cert.pem   the same, apart (clients of the INTERNAL listener: the set-up)
        services.json               SCRAM passwords of sop-admin, sop-processor, sop-tools
        clients/<principal>.json    each principal's Kafka client settings (SOP_KAFKA_CLIENT_CONFIG)
        identities/<robot>.json     a robot's signing identity (SOP_PUBLISH_IDENTITY_FILE)
        robots.json                 every robot's signing key and actor ids: the processor's keyring
    """

    def __init__(self, directory: Path, *, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> None:
        self.directory = directory
        self.hosts = hosts

    # paths
    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def keyring_file(self) -> Path:
        return self.directory / "robots.json"

    def client_file(self, principal: str) -> Path:
        return self.directory / "clients" / f"{principal}.json"

    def identity_file(self, robot: str) -> Path:
        return self.directory / "identities" / f"{robot}.json"

    @property
    def ready(self) -> bool:
        return all((self.directory / f).exists() for f in ("ca.pem", "broker.pem", "services.json"))

    # -- set-up -------------------------------------------------------------------------------------------------
    def ensure(self, *, days: int = 825) -> None:
        """Create what is missing: the CA, the brokers' certificate (again when it expires within a week) and
        the services' passwords. Harmless to call twice."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        self.directory.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o700)
        now = dt.datetime.now(dt.UTC)
        pem = serialization.Encoding.PEM
        ca_key_file = self.directory / "ca-key.pem"
        if not (self.ca_file.exists() and ca_key_file.exists()):
            ca_key = ec.generate_private_key(ec.SECP256R1())
            name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "SOP local CA"),
                              x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SOP")])
            ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(ca_key.public_key())
                  .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
                  .not_valid_after(now + dt.timedelta(days=3650))
                  .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                  .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                               content_commitment=False, key_encipherment=False,
                                               data_encipherment=False, key_agreement=False, encipher_only=False,
                                               decipher_only=False), critical=True)
                  .sign(ca_key, hashes.SHA256()))
            _write_private(ca_key_file, ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption()))
            _write_private(self.ca_file, ca.public_bytes(pem))
            (self.directory / "broker.pem").unlink(missing_ok=True)  # issued by an older CA
        ca = x509.load_pem_x509_certificate(self.ca_file.read_bytes())
        ca_key = serialization.load_pem_private_key(ca_key_file.read_bytes(), password=None)
        keystore = self.directory / "broker.pem"
        if keystore.exists():
            cert = x509.load_pem_x509_certificate((self.directory / "broker-cert.pem").read_bytes())
            if cert.not_valid_after_utc < now + dt.timedelta(days=7):
                keystore.unlink()
        if not keystore.exists():
            key = ec.generate_private_key(ec.SECP256R1())
            sans: list[x509.GeneralName] = []
            for host in self.hosts:
                try:
                    sans.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    sans.append(x509.DNSName(host))
            cert = (x509.CertificateBuilder()
                    .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, BROKER_CN)]))
                    .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
                    .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
                    .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                    .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                          ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                    .sign(ca_key, hashes.SHA256()))
            key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
            _write_private(self.directory / "broker-key.pem", key_pem)
            _write_private(self.directory / "broker-cert.pem", cert.public_bytes(pem))
            _write_private(keystore, key_pem + cert.public_bytes(pem) + ca.public_bytes(pem))
        services = self.directory / "services.json"
        try:
            passwords = json.loads(services.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            passwords = {}
        if set(SERVICES) - set(passwords):
            passwords = {s: passwords.get(s) or secrets.token_urlsafe(24) for s in SERVICES}
            _write_private(services, json.dumps(passwords, indent=2))

    def _passwords(self) -> dict[str, str]:
        try:
            return json.loads((self.directory / "services.json").read_text())
        except FileNotFoundError:
            raise SecurityError(f"no security material under {self.directory}: run `sop up` with "
                                "SOP_KAFKA_SECURITY=scram-tls first") from None

    def broker_settings(self) -> dict:
        """The fields of KafkaBrokerConfig / KafkaClusterConfig that make a node secure."""
        d = self.directory
        props = {
            "sasl.enabled.mechanisms": MECHANISM,
            "listener.name.client.sasl.enabled.mechanisms": MECHANISM,
            "listener.name.client.scram-sha-512.sasl.jaas.config":
                "org.apache.kafka.common.security.scram.ScramLoginModule required;",
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(d / "broker.pem"),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(self.ca_file),
            "ssl.endpoint.identification.algorithm": "https",
            "listener.name.internal.ssl.client.auth": "required",
            "listener.name.controller.ssl.client.auth": "required",
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "allow.everyone.if.no.acl.found": "false",
            "super.users": f"{BROKER_PRINCIPAL};User:{ADMIN}",
        }
        return {"client_protocol": "SASL_SSL", "internal_protocol": "SSL", "controller_protocol": "SSL",
                "extra_properties": props, "internal_client_config": self.internal_client_config()}

    def internal_client_config(self) -> dict[str, str]:
        """mTLS as the brokers themselves (``User:CN=sop-broker``), for the INTERNAL listener."""
        d = self.directory
        return {"security.protocol": "SSL", "ssl.ca.location": str(self.ca_file),
                "ssl.certificate.location": str(d / "broker-cert.pem"), "ssl.key.location": str(d / "broker-key.pem")}

    def client_config(self, user: str, password: str) -> dict[str, str]:
        return {"security.protocol": "SASL_SSL", "sasl.mechanism": MECHANISM, "sasl.username": user,
                "sasl.password": password, "ssl.ca.location": str(self.ca_file)}

    def service_config(self, principal: str) -> dict[str, str]:
        return self.client_config(principal, self._passwords()[principal])

    def provision_services(self, admin: AdminClient, *, topics: Mapping[str, str], group: str, prefix: str) -> None:
        """Create (or reset) the services' SCRAM users and ACLs and write their client files."""
        passwords = self._passwords()
        for principal in SERVICES:
            upsert_user(admin, principal, passwords[principal])
            _write_private(self.client_file(principal), json.dumps(self.client_config(principal, passwords[principal]),
                                                                   indent=2))
        grant(admin, f"User:{PROCESSOR}", processor_grants(topics, group))
        grant(admin, f"User:{TOOLS}", tools_grants(prefix))

    # -- robots -------------------------------------------------------------------------------------------------
    def keyring(self) -> dict[str, dict]:
        """robots.json: robot -> {"key": base64, "actors": [...]} (empty when no robot was added)."""
        try:
            return json.loads(self.keyring_file.read_text())["robots"]
        except FileNotFoundError:
            return {}
        except (json.JSONDecodeError, KeyError) as exc:
            raise SecurityError(f"{self.keyring_file} is damaged ({exc}): restore it or re-add the robots") from None

    def _save_keyring(self, robots: Mapping[str, dict]) -> None:
        _write_private(self.keyring_file, json.dumps({"version": 1, "robots": dict(robots)}, indent=2, sort_keys=True))

    def add_robot(self, admin: AdminClient, name: str, *, topics: Mapping[str, str],
                  actors: tuple[str, ...] = ()) -> RobotCredentials:
        """Create the robot's SCRAM user (a fresh password), its ACLs and signing key (kept if it has one), and
        write its client settings and identity files. ``actors``: the actor ids it may claim (default: its name)."""
        check_robot_name(name)
        password = secrets.token_urlsafe(24)
        upsert_user(admin, name, password)
        grant(admin, f"User:{name}", robot_grants(topics))
        robots = self.keyring()
        entry = robots.get(name) or {"key": base64.b64encode(secrets.token_bytes(32)).decode()}
        entry["actors"] = list(actors or entry.get("actors") or (name,))
        entry.setdefault("added_at", dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
        robots[name] = entry
        self._save_keyring(robots)
        config = self.client_config(name, password)
        _write_private(self.client_file(name), json.dumps(config, indent=2))
        _write_private(self.identity_file(name), json.dumps({"principal": name, "key": entry["key"]}, indent=2))
        return RobotCredentials(name=name, client_config=config, client_file=self.client_file(name),
                                identity_file=self.identity_file(name))

    def revoke_robot(self, admin: AdminClient, name: str) -> dict[str, object]:
        """Remove the robot's SCRAM user, every ACL of it, its signing key from the keyring and its files."""
        check_robot_name(name)
        acls = revoke_all(admin, f"User:{name}")
        had_user = delete_user(admin, name)
        robots = self.keyring()
        had_key = robots.pop(name, None) is not None
        self._save_keyring(robots)
        self.client_file(name).unlink(missing_ok=True)
        self.identity_file(name).unlink(missing_ok=True)
        return {"acls_deleted": acls, "user_deleted": had_user, "key_removed": had_key}

