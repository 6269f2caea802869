"""The settings of RECAP's rewards, returns and advantage indicator: frozen, keyword-only, validated.

    cfg = RecapConfig(n_step=50, target_positive_share=0.3)
    cfg.max_steps("drawer-open-v3"), cfg.failure_penalty("drawer-open-v3")   # 150, 150.0

The learner, the simulated demonstrations writer and the settings layer build it; it imports nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A setting has a value the loop cannot work with; the message says what to change."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True, kw_only=True)
class RecapConfig:
    """Rewards, advantages and the advantage indicator of RECAP (see :mod:`rewards.recap` for the formulas)."""

    n_step: int = 50
    # Penalty at the last step of a failed episode; None = the task's max episode length, which puts every
    # success return in (-0.5, 0] and every failure return in [-1, -0.5] after normalisation.
    c_fail: float | None = None
    max_episode_length: int = 150
    task_max_episode_length: Mapping[str, int] = field(default_factory=dict)
    timeout_is_failure: bool = True
    target_positive_share: float = 0.3
    indicator_dropout: float = 0.3
    human_always_positive: bool = True
    # Offline demonstrations carry no advantage of their own; the expert's actions count as positive.
    demos_always_positive: bool = True
    cfg_beta: float = 1.0  # classifier-free guidance at inference; 1.0 = plain positive conditioning

    def __post_init__(self) -> None:
        _require(self.n_step >= 1, f"RecapConfig.n_step must be >= 1 (the paper uses 50); got {self.n_step}")
        _require(self.c_fail is None or self.c_fail >= 0,
                 f"RecapConfig.c_fail must be >= 0 or None (= max episode length); got {self.c_fail}")
        _require(self.max_episode_length >= 1,
                 f"RecapConfig.max_episode_length must be >= 1; got {self.max_episode_length}")
        bad = {t: n for t, n in self.task_max_episode_length.items() if not (isinstance(n, int) and n >= 1)}
        _require(not bad, f"RecapConfig.task_max_episode_length values must be integers >= 1; got {bad}")
        _require(0.0 < self.target_positive_share < 1.0,
                 f"RecapConfig.target_positive_share must be in (0, 1), e.g. 0.3; got {self.target_positive_share}")
        _require(0.0 <= self.indicator_dropout < 1.0,
                 f"RecapConfig.indicator_dropout must be in [0, 1), e.g. 0.3; got {self.indicator_dropout}")
        _require(self.cfg_beta >= 1.0,
                 f"RecapConfig.cfg_beta must be >= 1 (1 = no guidance, the paper uses 1.5-2.5); got {self.cfg_beta}")

    def max_steps(self, task: str) -> int:
        return int(self.task_max_episode_length.get(task, self.max_episode_length))

    def failure_penalty(self, task: str) -> float:
        return float(self.max_steps(task) if self.c_fail is None else self.c_fail)
