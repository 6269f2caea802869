"""The processor's task contracts and validation limits, from settings or from the simulated suite.

``consumers`` may not import ``producers``, so the shape of a simulated step (4-d action, 39-d MetaWorld
state, the actor's cameras at the actor's image size) reaches the processor from here::

    contracts, skew = processor_validation(load_settings(), load_actor_settings())
    # -> consumers.validation.validate_record(name, record, key=..., contracts=contracts, now_us=..., skew=skew)

``SOP_PROCESSOR_TASK_CONTRACTS`` replaces the simulated suite's contracts entirely (a real site's robots).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from consumers.validation import (
    DEFAULT_ENCODINGS,
    Contracts,
    SkewWindow,
    TaskContract,
    UnknownTasks,
    parse_task_contracts,
)
from sim.tasks import TASKS
from sop.settings import Settings

if TYPE_CHECKING:
    from sop.actor_settings import ActorSettings

# The simulated Sawyer's shapes; sim.metaworld_robot holds them too but imports MuJoCo
# (tests/unit/sop/test_contracts.py keeps the two equal).
SIM_ACTION_DIM = 4
SIM_PROPRIO_DIM = 39


def sim_contracts(image_size: int | tuple[int, int], cameras: Sequence[str], *,
                  tasks: Iterable[str] | None = None,
                  encodings: Iterable[str] = DEFAULT_ENCODINGS) -> dict[str, TaskContract]:
    """Contracts of the simulated tasks (every task of the sim table unless ``tasks``): what the actors publish.

    ``image_size`` is the actor's setting: a square side, or ``(height, width)`` as ``MetaWorldRobotConfig`` takes it.

    >>> sim_contracts(64, ("corner",))["pick-place-v3"].cameras
    mappingproxy({'corner': (64, 64)})
    """
    if isinstance(image_size, int):
        height = width = image_size
    else:
        height, width = image_size
    names = list(TASKS) if tasks is None else list(tasks)
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise ValueError(f"sim_contracts: unknown tasks {unknown}; known: {sorted(TASKS)}")
    if len(set(cameras)) != len(cameras):
        raise ValueError(f"sim_contracts: a camera is listed twice: {list(cameras)}")
    sizes = {camera: (int(width), int(height)) for camera in cameras}
    return {t: TaskContract(action_dim=SIM_ACTION_DIM, proprio_dim=SIM_PROPRIO_DIM, cameras=sizes,
                            encodings=frozenset(encodings)) for t in names}


def processor_contracts(settings: Settings, *, image_size: int | tuple[int, int] = 64,
                        cameras: Sequence[str] = ("corner",)) -> Contracts:
    """The processor's :class:`Contracts`: ``SOP_PROCESSOR_TASK_CONTRACTS`` when set, else the simulated suite's
    with the actors' ``image_size`` and ``cameras``; limits and policies from the ``SOP_PROCESSOR_…`` settings."""
    if settings.processor_task_contracts:
        tasks = parse_task_contracts(settings.processor_task_contracts)
    else:
        tasks = sim_contracts(image_size, cameras)
    return Contracts(tasks=tasks, unknown_tasks=UnknownTasks(settings.processor_unknown_tasks),
                     max_steps=settings.processor_max_steps, full_image_decode=settings.processor_full_image_decode)


def processor_skew(settings: Settings) -> SkewWindow:
    """The accepted event-time window; ``SOP_PROCESSOR_CLOCK_SKEW_PAST_S=0`` lifts the past bound (replays)."""
    return SkewWindow.from_seconds(future_s=settings.processor_clock_skew_future_s,
                                   past_s=settings.processor_clock_skew_past_s or None)


def processor_validation(settings: Settings, actor_settings: ActorSettings | None = None) -> tuple[Contracts, SkewWindow]:
    """Both, with the simulated suite's image size and cameras taken from ``actor_settings`` (``sop.actor_settings``)
    when given."""
    if actor_settings is None:
        contracts = processor_contracts(settings)
    else:
        contracts = processor_contracts(settings, image_size=actor_settings.actor_image_size,
                                        cameras=actor_settings.cameras)
    return contracts, processor_skew(settings)
