"""The scripted expert as a registered policy version, so it can stand in as ``sop-policy`` before the learner
registers a learned one::

    version = register_expert_policy(tracking_uri, noise_sigma=0.2, artifact_location=root)  # "1", @champion
    policy = build_expert(local)        # the builder of architecture "scripted-expert" (sop actor knows it)

The version is data like any other (``infra.model_versions``): a ``config.json`` declaring the architecture
``scripted-expert`` with its noise and seed, no weights; the actor instantiates :class:`~sim.expert.ExpertPolicy`
from it with its own code.
"""

from __future__ import annotations

from infra.model_versions import LocalVersion, VersionRefused
from producers.policies import DEFAULT_ALIAS, DEFAULT_EXPERIMENT, DEFAULT_MODEL_NAME, register_policy_config

ARCHITECTURE = "scripted-expert"


def build_expert(local: LocalVersion):  # noqa: ANN201 - sim.expert.ExpertPolicy (imports MetaWorld)
    """A verified ``scripted-expert`` version -> the (noisy) expert acting as that version."""
    from sim.expert import ExpertPolicy

    noise, seed = local.config.get("noise_sigma", 0.0), local.config.get("seed")
    if not isinstance(noise, int | float) or noise < 0 or not (seed is None or isinstance(seed, int)):
        raise VersionRefused(f"{local.name} v{local.version}: scripted-expert needs noise_sigma >= 0 and an "
                             f"integer or null seed, got {noise!r} and {seed!r}")
    return ExpertPolicy(noise_sigma=float(noise), seed=seed, version=local.version)


def register_expert_policy(
    tracking_uri: str,
    *,
    noise_sigma: float = 0.2,
    seed: int | None = None,
    model_name: str = DEFAULT_MODEL_NAME,
    alias: str | None = DEFAULT_ALIAS,
    experiment: str = DEFAULT_EXPERIMENT,
    artifact_location: str | None = None,
) -> str:
    """Register the noisy scripted expert as a version of ``model_name`` (a stand-in policy)."""
    if noise_sigma < 0:
        raise ValueError(f"noise_sigma must be >= 0, got {noise_sigma}")
    return register_policy_config(
        ARCHITECTURE, {"noise_sigma": noise_sigma, "seed": seed}, tracking_uri, model_name=model_name,
        alias=alias, experiment=experiment, artifact_location=artifact_location,
        tags={"sop.policy": "scripted-expert", "sop.noise_sigma": str(noise_sigma)},
    )
