"""Re-registering first-format versions (a pickled MLflow pyfunc beside its data files) as data, once.

    new = convert_legacy("sop-policy", "7", tracking_uri=uri)      # "12": same weights, config, embeddings

The old version's ``weights.pt`` is read with ``torch.load(weights_only=True)`` and its ``config.json`` and
``instructions.npz`` as data; ``python_model.pkl`` is never opened. The new version carries the lineage tag
``converted_from`` and every alias that pointed at the old version is moved to it, so actors (which refuse the
old one) follow the converted copy. ``sop registry convert`` runs it.
"""

from __future__ import annotations

from infra.model_versions import FORMAT, TAG_FORMAT
from infra.registry import registry_client
from learner.loading import load_version
from learner.model import PolicyRuntime
from learner.publishing import DEFAULT_EXPERIMENT, register_policy, register_value


def convert_legacy(name: str, version: str, *, tracking_uri: str | None, experiment: str = DEFAULT_EXPERIMENT,
                   move_aliases: bool = True) -> str | None:
    """The new version holding ``version``'s model as data; None when ``version`` is already data."""
    client = registry_client(tracking_uri)
    if client.get_model_version(name, version).tags.get(TAG_FORMAT) == FORMAT:
        return None  # already data: nothing to convert
    old = load_version(name, version, tracking_uri=tracking_uri, allow_legacy=True)
    runtime = old.runtime
    embeddings = runtime.text.as_dict()  # the instruction embeddings it shipped with
    lineage = {**old.lineage, "converted_from": version}
    aliases = [a for a, v in client.get_registered_model(name).aliases.items()
               if str(v) == version] if move_aliases else []
    if isinstance(runtime, PolicyRuntime):
        new = register_policy(runtime.model, name=name, alias=None, metrics=old.metrics, lineage=lineage,
                              tracking_uri=tracking_uri, embeddings=embeddings, condition=runtime.condition,
                              cfg_beta=runtime.cfg_beta, experiment=experiment)
    else:
        new = register_value(runtime.model, name=name, alias=None, metrics=old.metrics, lineage=lineage,
                             tracking_uri=tracking_uri, embeddings=embeddings, experiment=experiment)
    for alias in aliases:
        client.set_registered_model_alias(name, alias, new)
    return new
