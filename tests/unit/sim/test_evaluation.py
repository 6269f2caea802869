"""evaluate_policy: seeded held-out episodes in the simulator, operator off, nothing published."""

import numpy as np
import pytest

from sim.evaluation import evaluate_policy, evaluate_policy_detailed
from sim.expert import ExpertPolicy

pytestmark = pytest.mark.filterwarnings("ignore:Constant")


class StillPolicy:
    version = "still"

    def act(self, observation: object) -> np.ndarray:
        return np.zeros(4, dtype=np.float32)


def test_the_expert_succeeds_and_a_still_arm_does_not() -> None:
    assert evaluate_policy(ExpertPolicy(), ["drawer-open-v3"], 2, image_size=16) == {"drawer-open-v3": 1.0}
    seen: list[str] = []
    result = evaluate_policy_detailed(StillPolicy(), ["drawer-open-v3"], 2, paraphrase=0, max_steps=5, image_size=16,
                                      on_episode=lambda stats: seen.append(stats.episode_id))
    assert result["drawer-open-v3"].success_rate == 0.0 and result["drawer-open-v3"].mean_steps == 5
    assert seen == ["eval:drawer-open-v3:1000000", "eval:drawer-open-v3:1000001"]  # EVAL_SEEDS, in order


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="seeds"):
        evaluate_policy(StillPolicy(), ["drawer-open-v3"], 3, seeds=[1, 2])
