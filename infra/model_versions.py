"""Registered model versions as data, never code: files plus a declared architecture, each file hashed.

A version of ``sop-policy`` or ``sop-value`` is a folder of plain files in the version's MLflow logged model:

- ``config.json``: ``{"format": "sop-model/2", "kind": "policy"|"value", "architecture": NAME, ...}``, the
  architecture's own settings beside it (layer sizes, conditioning, the expert's noise);
- the architecture's data files, e.g. ``weights.safetensors`` (tensors only) and ``instructions.npz``;

and its MLflow version tags say ``sop.format`` and, for every file, ``sop.sha256.<file>`` (the weights' hash is
``sop.sha256.weights.safetensors``). The tags live in the registry's database, which only the learner (and an
admin) may write; the files live in the artifact store. :func:`fetch_version` downloads a version and
:func:`verify_version` refuses it unless every file is listed in the tags with the hash it has now and no file is
missing or extra — before any byte of it is parsed. Then :func:`build` hands it to the *receiver's own* code for
its declared architecture (``architectures``: name -> builder, given by whoever runs the actor or processor);
an architecture the receiver does not know is refused. Nothing is unpickled, nothing from the version is run.

    tags = publish_version(client, name="sop-policy", experiment_id=exp, directory=files, tags={...})
    local = fetch_version(client, "sop-policy", "3", dst=Path(tmp))        # TamperedVersion, LegacyPickledVersion
    policy = build(local, {"sop-vla": policy_from_version})

Versions registered before this format (a pickled MLflow pyfunc, ``python_model.pkl``) are refused with
:class:`LegacyPickledVersion`; ``sop registry convert`` re-registers their weights as a new version.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

FORMAT = "sop-model/2"
CONFIG_FILE = "config.json"
TAG_FORMAT = "sop.format"
TAG_KIND = "sop.kind"
TAG_ARCHITECTURE = "sop.architecture"
TAG_SHA256 = "sop.sha256."  # + file name
WEIGHTS_FILE = "weights.safetensors"
TAG_WEIGHTS_SHA256 = TAG_SHA256 + WEIGHTS_FILE
KINDS = ("policy", "value")
_LEGACY_MARKERS = ("python_model.pkl", "MLmodel")


class VersionRefused(ValueError):
    """A registered version that must not be loaded; the message says why."""


class LegacyPickledVersion(VersionRefused):
    """A version registered as a pickled MLflow pyfunc (before versions became data)."""


class TamperedVersion(VersionRefused):
    """A version whose files are not the ones the registry recorded (hash mismatch, missing or extra file)."""


class UnknownArchitecture(VersionRefused):
    """A version declaring an architecture the receiving process has no code for."""


@dataclass(frozen=True, kw_only=True)
class LocalVersion:
    """A downloaded and verified version: its declared config and the paths of its (hash-checked) files."""

    name: str
    version: str
    directory: Path
    config: dict[str, Any]
    files: dict[str, Path]
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return str(self.config["kind"])

    @property
    def architecture(self) -> str:
        return str(self.config["architecture"])

    def file(self, name: str) -> Path:
        try:
            return self.files[name]
        except KeyError:
            raise VersionRefused(f"{self.name} v{self.version} ({self.architecture}) has no file {name!r}; "
                                 f"it has {sorted(self.files)}") from None


Builder = Callable[[LocalVersion], Any]  # a verified version -> the object that acts (or computes values)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_config(directory: Path, *, kind: str, architecture: str, **settings: Any) -> Path:
    """``config.json`` of a version: the format, kind and architecture, and the architecture's settings."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not architecture:
        raise ValueError("architecture must be a non-empty name")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CONFIG_FILE
    body = {**settings, "format": FORMAT, "kind": kind, "architecture": architecture}
    path.write_text(json.dumps(body, indent=2, sort_keys=True))
    return path


def _flat_files(directory: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for path in sorted(directory.rglob("*")):
        if path.is_dir():
            continue
        files[path.relative_to(directory).as_posix()] = path
    return files


def manifest_tags(directory: Path) -> dict[str, str]:
    """The tags that pin the files of ``directory``: format, kind, architecture and a SHA-256 per file."""
    files = _flat_files(directory)
    if CONFIG_FILE not in files:
        raise ValueError(f"{directory} has no {CONFIG_FILE}: write it with write_config(...)")
    config = json.loads(files[CONFIG_FILE].read_text())
    tags = {TAG_FORMAT: FORMAT, TAG_KIND: str(config["kind"]), TAG_ARCHITECTURE: str(config["architecture"])}
    tags.update({TAG_SHA256 + name: sha256_file(path) for name, path in files.items()})
    return tags


def verify_version(directory: Path, tags: Mapping[str, str], *, name: str, version: str) -> LocalVersion:
    """The version in ``directory`` if its files are exactly those ``tags`` pin (see the module doc)."""
    label = f"{name} v{version}"
    files = _flat_files(directory)
    if tags.get(TAG_FORMAT) != FORMAT:
        if any(m in files or any(p.endswith("/" + m) for p in files) for m in _LEGACY_MARKERS):
            raise LegacyPickledVersion(
                f"{label} is a pickled MLflow pyfunc (registered before versions became weights plus a declared "
                f"architecture); SOP never unpickles a model. Re-register it as data with "
                f"`sop registry convert --name {name} --version {version}` (its weights are read without "
                f"unpickling) or register a new version")
        raise VersionRefused(f"{label} is not a SOP model version: tag {TAG_FORMAT} is "
                             f"{tags.get(TAG_FORMAT)!r}, expected {FORMAT!r}")
    pinned = {k.removeprefix(TAG_SHA256): v for k, v in tags.items() if k.startswith(TAG_SHA256)}
    extra = sorted(set(files) - set(pinned))
    missing = sorted(set(pinned) - set(files))
    if extra or missing:
        raise TamperedVersion(f"{label}: the files are not the ones registered "
                              f"(unregistered: {extra or 'none'}; missing: {missing or 'none'})")
    for file, expected in pinned.items():
        actual = sha256_file(files[file])
        if actual != expected:
            raise TamperedVersion(f"{label}: {file} has SHA-256 {actual[:16]}…, the registry recorded "
                                  f"{expected[:16]}…: refused (tampered or corrupted in the artifact store)")
    try:
        config = json.loads(files[CONFIG_FILE].read_text())
    except (KeyError, json.JSONDecodeError) as exc:
        raise VersionRefused(f"{label}: {CONFIG_FILE} is missing or not JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT or config.get("kind") not in KINDS \
            or not isinstance(config.get("architecture"), str):
        raise VersionRefused(f"{label}: {CONFIG_FILE} must declare format {FORMAT!r}, a kind in {KINDS} and an "
                             f"architecture name")
    if tags.get(TAG_ARCHITECTURE) not in (None, config["architecture"]):
        raise TamperedVersion(f"{label}: the config declares architecture {config['architecture']!r}, the registry "
                              f"recorded {tags.get(TAG_ARCHITECTURE)!r}")
    return LocalVersion(name=name, version=version, directory=directory, config=config, files=files, tags=dict(tags))


def build(local: LocalVersion, architectures: Mapping[str, Builder], *, kind: str | None = None) -> Any:
    """Instantiate ``local`` with the receiver's own builder for its declared architecture."""
    if kind is not None and local.kind != kind:
        raise VersionRefused(f"{local.name} v{local.version} is a {local.kind!r} model, expected a {kind!r}")
    builder = architectures.get(local.architecture)
    if builder is None:
        raise UnknownArchitecture(f"{local.name} v{local.version} declares architecture {local.architecture!r}, "
                                  f"which this process has no code for (it knows: "
                                  f"{', '.join(sorted(architectures)) or 'none'})")
    return builder(local)


def version_source(client: MlflowClient, name: str, version: str) -> str:
    """Where a version's files are (an artifact URI: file://, s3://, mlflow-artifacts:/ …)."""
    source = client.get_model_version_download_uri(name, version)
    if source.startswith("models:/m-"):
        source = client.get_logged_model(source.removeprefix("models:/")).artifact_location
    return source


def fetch_version(client: MlflowClient, name: str, version: str, *, dst: Path) -> LocalVersion:
    """Download version ``version`` of ``name`` into ``dst`` and verify it (:func:`verify_version`)."""
    import mlflow

    tags = dict(client.get_model_version(name, version).tags)
    dst.mkdir(parents=True, exist_ok=True)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=version_source(client, name, version),
                                                     dst_path=str(dst), tracking_uri=client.tracking_uri))
    return verify_version(local, tags, name=name, version=version)


def publish_version(client: MlflowClient, *, name: str, experiment_id: str, directory: Path,
                    tags: Mapping[str, str] | None = None, run_id: str | None = None,
                    alias: str | None = None) -> str:
    """Register the files of ``directory`` (a ``config.json`` and its data files) as a new version of ``name``
    (which must exist), with their hashes in the version's tags; point ``alias`` at it (None: leave aliases
    alone) and return the version number.

    The files are uploaded to a logged model first and the version is created only once they are complete, so
    no version ever points at half-written files."""
    from mlflow.entities import LoggedModelStatus

    pinned = manifest_tags(directory)
    tag_map = {**dict(tags or {}), **pinned}
    logged = client.create_logged_model(experiment_id=experiment_id, name=name, source_run_id=run_id,
                                        tags=dict(tags or {}))
    try:
        client.log_model_artifacts(logged.model_id, str(directory))
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    except BaseException:
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    # The artifact location rather than "models:/<model_id>", and the model id only along with a run id:
    # MLflow 3.17's SQL registry resolves either through the process-wide tracking URI, not this client's.
    # A tracking server resolves them itself, and refuses an mlflow-artifacts:/ source that neither a run id nor
    # a model id vouches for.
    server = (client.tracking_uri or "").startswith(("http://", "https://"))
    created = client.create_model_version(name, source=logged.artifact_location, run_id=run_id, tags=tag_map,
                                          model_id=logged.model_id if run_id is not None or server else None)
    version = str(created.version)
    if alias is not None:
        client.set_registered_model_alias(name, alias, version)
    return version


def publish_files(client: MlflowClient, *, name: str, experiment_id: str, write: Callable[[Path], None],
                  tags: Mapping[str, str] | None = None, run_id: str | None = None,
                  alias: str | None = None) -> str:
    """:func:`publish_version` of the files ``write(directory)`` puts into a fresh temporary directory."""
    tmp = Path(tempfile.mkdtemp(prefix="sop-register-"))
    try:
        files = tmp / "files"
        files.mkdir()
        write(files)
        return publish_version(client, name=name, experiment_id=experiment_id, directory=files, tags=tags,
                               run_id=run_id, alias=alias)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
