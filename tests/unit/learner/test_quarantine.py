"""The learner's defences, one at a time: row checks, the quarantine counter, ring-buffer removal, the running
normaliser, non-finite steps and non-finite registrations."""

import io
import logging
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import torch
from conftest import HashEmbedder, jpeg, make_episode
from mlflow.tracking import MlflowClient
from PIL import Image

from learner import quarantine as q
from learner import registry
from learner.algorithms import HGDagger
from learner.batch import BatchBuilder, prepare_episode
from learner.config import EncoderConfig, ModelConfig, SamplerConfig, TrainConfig
from learner.model import RunningNorm, VLAPolicy
from learner.online import LearnConfig, _Publishing
from learner.sampler import AdaptiveSampler, RingBuffer
from learner.trainer import Learner

ENC = EncoderConfig(image_size=32, proprio_dim=8, cnn_channels=(16, 32))
MODEL = ModelConfig(encoder=ENC, action_dim=4, hidden=(32,))
SPEC = q.RowSpec.for_policy(MODEL)


def healthy(rng: np.random.Generator) -> dict[str, Any]:
    row = make_episode("reach-v3", 1, rng, demo=True)[0]
    row.update(reward=-1.0, mc_return=-0.5, value=-0.4, advantage=0.1)
    return row


@pytest.mark.parametrize(("change", "reason"), [
    ({"task": None}, q.MISSING_FIELD),
    ({"images": []}, q.MISSING_CAMERA),
    ({"images": None}, q.MISSING_CAMERA),
    ({"images": [{"camera": "corner", "encoding": "jpeg", "data": b"garbage"}]}, q.IMAGE_UNDECODABLE),
    ({"images": [{"camera": "corner", "encoding": "jpeg", "data": b""}]}, q.IMAGE_UNDECODABLE),
    ({"images": [{"camera": "corner", "encoding": "jpeg", "width": 32, "height": 32,
                  "data": jpeg(np.zeros((16, 32, 3), np.uint8))}]}, q.IMAGE_SIZE),  # not the size it declares
    ({"images": [{"camera": "corner", "data": np.zeros((32, 32, 4), np.uint8)}]}, q.IMAGE_SIZE),
    ({"proprio": [0.0] * 7}, q.PROPRIO_LENGTH),
    ({"proprio": None}, q.PROPRIO_LENGTH),
    ({"proprio": [[0.0] * 8]}, q.PROPRIO_LENGTH),
    ({"proprio": ["a"] * 8}, q.PROPRIO_LENGTH),
    ({"proprio": [0.0] * 7 + [float("nan")]}, q.PROPRIO_NON_FINITE),
    ({"action": [0.0] * 5}, q.ACTION_LENGTH),
    ({"action": [0.0, float("-inf"), 0.0, 0.0]}, q.ACTION_NON_FINITE),
    ({"policy_action": [0.0] * 3}, q.POLICY_ACTION_LENGTH),
    ({"policy_action": [float("nan")] * 4}, q.POLICY_ACTION_NON_FINITE),
    ({"reward": float("nan")}, q.REWARD_NON_FINITE),
    ({"mc_return": float("inf")}, q.RETURN_NON_FINITE),
    ({"value": float("nan")}, q.VALUE_NON_FINITE),
    ({"advantage": float("inf")}, q.ADVANTAGE_NON_FINITE),
])
def test_row_problem_names_the_reason(rng: np.random.Generator, change: dict[str, Any], reason: str) -> None:
    row = healthy(rng)
    assert q.row_problem(row, SPEC) is None
    row.update(change)
    problem = q.row_problem(row, SPEC)
    assert problem is not None and problem[0] == reason
    assert reason in q.REASONS


def test_unknown_values_are_not_problems(rng: np.random.Generator) -> None:
    row = healthy(rng)
    row.update(policy_action=None, reward=None, value=None, advantage=None, mc_return=None)
    assert q.row_problem(row, SPEC) is None
    value_spec = q.RowSpec.for_encoder(ENC)  # the value model takes any action length
    assert q.row_problem({**row, "action": [0.0] * 7}, value_spec) is None


def test_a_cut_jpeg_passes_the_cheap_check_and_fails_the_decode(rng: np.random.Generator) -> None:
    data = jpeg(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    cut = {"camera": "corner", "data": data[:-40]}
    assert q.image_header_problem(cut, 32) is None
    with pytest.raises(q.RowRejected) as err:
        q.decode_row_image(cut, 32)
    assert err.value.reason == q.IMAGE_UNDECODABLE
    assert q.decode_row_image({"data": data}, 32).shape == (32, 32, 3)


def test_the_batch_builder_names_every_undecodable_row(rng: np.random.Generator) -> None:
    rows = prepare_episode(make_episode("reach-v3", 4, rng), source="online", chunk=1)
    rows[1]["images"] = [{"camera": "corner", "data": b"\xff\xd8 not a jpeg"}]
    rows[3]["images"] = [{"camera": "wrist", "data": rows[0]["images"][0]["data"]}]
    with pytest.raises(q.RejectedRows) as err:
        BatchBuilder(ENC, HashEmbedder(), chunk=1, action_dim=4)(rows, [True] * 4)
    assert [(i, r) for i, r, _ in err.value.rejected] == [(1, q.IMAGE_UNDECODABLE), (3, q.MISSING_CAMERA)]


def test_the_sampler_drops_rows_that_fail_to_decode_and_samples_again(rng: np.random.Generator) -> None:
    sampler = AdaptiveSampler(SamplerConfig(batch_size=16), BatchBuilder(ENC, HashEmbedder(), chunk=1, action_dim=4),
                              spec=SPEC)
    rows = make_episode("reach-v3", 3, rng, demo=True)
    rows[1]["images"] = [{**rows[1]["images"][0], "data": rows[1]["images"][0]["data"][:-40]}]
    assert sampler.add_episode(rows, source="offline") == 3  # the header looks fine
    batch = sampler.next_batch()
    assert batch.size == 16
    assert sampler.sizes()["reach-v3"]["offline"] == 2
    assert sampler.quarantine.counts() == {q.IMAGE_UNDECODABLE: 1}


def test_quarantine_logs_the_first_rows_then_a_summary_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    quarantine = q.Quarantine(log_first=2, log_every_s=60.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="sop.learner.quarantine"):
        for i in range(1000):
            quarantine.record({"episode_id": "e", "step_index": i}, q.PROPRIO_NON_FINITE, "nan")
            now[0] += 0.1  # 100 s in all
        quarantine.record({"episode_id": "f", "step_index": 0}, q.IMAGE_SIZE, "64x64")
    messages = [r.getMessage() for r in caplog.records]
    assert "episode e step 0: proprio_non_finite" in messages[0]
    assert len(messages) == 2 + 2 + 1  # first two, a summary at once and one 60 s later; a new reason
    assert quarantine.counts() == {q.PROPRIO_NON_FINITE: 1000, q.IMAGE_SIZE: 1}
    assert quarantine.metrics() == {"quarantined": 1001.0, "quarantined/proprio_non_finite": 1000.0,
                                    "quarantined/image_size": 1.0}


def test_ring_buffer_remove_keeps_the_fifo_order() -> None:
    buf: RingBuffer[list[int]] = RingBuffer(4)
    items = [[i] for i in range(6)]  # 0 and 1 have fallen out; the order is 2 3 4 5, next to go is 2
    buf.extend(items)
    assert buf.remove([items[3], [99]]) == 1
    assert buf.items() == [[2], [4], [5]]
    buf.extend([[6], [7]])  # full again: 6 fills the gap, then 7 evicts the oldest (2)
    assert sorted(buf.items()) == [[4], [5], [6], [7]]
    buf.append([8])
    assert sorted(buf.items()) == [[5], [6], [7], [8]]


def test_chunks_stop_at_a_missing_step(rng: np.random.Generator) -> None:
    rows = make_episode("reach-v3", 5, rng)
    del rows[2]  # e.g. quarantined
    prepared = prepare_episode(rows, source="online", chunk=3)
    assert [p["_label_mask"].tolist() for p in prepared] == [
        [True, True, False], [True, False, False], [True, True, False], [True, False, False]]


def test_running_norm_ignores_non_finite_rows() -> None:
    norm = RunningNorm(3, clip=5.0)
    x = torch.tensor([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0], [float("nan"), 0.0, 0.0], [0.0, float("inf"), 0.0]])
    norm.update(x)
    assert float(norm.count) == 2
    assert norm.mean.tolist() == [2.0, 3.0, 4.0] and norm.var.tolist() == [1.0, 1.0, 1.0]
    norm.update(torch.full((4, 3), float("nan")))
    assert float(norm.count) == 2 and bool(torch.isfinite(norm.mean).all())


class Fixed:
    def __init__(self, batch: Any) -> None:
        self.batch = batch

    def next_batch(self) -> Any:
        return self.batch


def _batch(rng: np.random.Generator) -> Any:
    build = BatchBuilder(ENC, HashEmbedder(), chunk=1, action_dim=4)
    rows = prepare_episode(make_episode("reach-v3", 8, rng, demo=True), source="offline", chunk=1)
    return build(rows, [False] * 8)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_a_non_finite_step_leaves_weights_and_ema_unchanged(rng: np.random.Generator, poison: str) -> None:
    batch = _batch(rng)
    model = VLAPolicy(MODEL)
    learner = Learner(model, HGDagger(), Fixed(batch), TrainConfig(ema_decay=0.9, proprio_stats_steps=0))
    learner.step()  # a healthy step first, so the optimizer has state
    before, ema_before = _state(model), _state(learner.ema)  # type: ignore[arg-type]
    if poison == "loss":
        batch.actions[0, 0, 0] = float("nan")
    else:
        hook = model.head[0].weight.register_hook(lambda g: g * float("inf"))
    metrics = learner.step()
    assert learner.skipped_steps == 1 and metrics["skipped_steps"] == 1.0
    assert (not np.isfinite(metrics["loss"])) == (poison == "loss")
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    for name, value in learner.ema.state_dict().items():  # type: ignore[union-attr]
        assert torch.equal(value, ema_before[name]), name
    if poison == "loss":
        batch.actions[0, 0, 0] = 0.0
    else:
        hook.remove()
    learner.step()  # and training goes on
    assert learner.skipped_steps == 1
    assert not torch.equal(model.head[0].weight, before["head.0.weight"])


def _poisoned_model() -> VLAPolicy:
    model = VLAPolicy(MODEL)
    with torch.no_grad():
        model.head[0].weight[0, 0] = float("nan")
    return model


def test_non_finite_tensors_names_weights_and_buffers() -> None:
    model = VLAPolicy(MODEL)
    assert registry.non_finite_tensors(model) == []
    model.encoder.proprio_norm.mean[0] = float("inf")
    assert registry.non_finite_tensors(model) == ["encoder.proprio_norm.mean"]
    assert registry.non_finite_tensors(_poisoned_model()) == ["head.0.weight"]


def test_registration_refuses_non_finite_weights_and_the_alias_stays(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    MlflowClient(uri).create_experiment("sop", artifact_location=str(tmp_path / "art"))
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        with pytest.raises(registry.NonFiniteWeights, match=r"head\.0\.weight"):
            registry.register_policy(_poisoned_model(), tracking_uri=uri, experiment="sop")
        assert MlflowClient(uri).search_model_versions("name='sop-policy'") == []

        assert registry.register_policy(VLAPolicy(MODEL), tracking_uri=uri, experiment="sop") == "1"
        publishing = _Publishing(config=LearnConfig(model=MODEL), tracking_uri=uri, text=HashEmbedder(),
                                 lineage=dict, condition="unconditioned", cfg_beta=1.0, run_id=None, gate=None,
                                 parent="1")
        assert publishing(_poisoned_model(), 25, {"loss": 0.1}) is None
        assert publishing.refused_non_finite == 1 and publishing.failures == 0
        client = MlflowClient(uri)
        assert len(client.search_model_versions("name='sop-policy'")) == 1
        assert str(client.get_model_version_by_alias("sop-policy", "champion").version) == "1"
        assert publishing(VLAPolicy(MODEL), 50, {"loss": 0.1}) == "2"  # a healthy one still goes through
    finally:
        mlflow.set_tracking_uri(previous)


@pytest.mark.parametrize(("fmt", "options"), [("JPEG", {"quality": 90}), ("JPEG", {"progressive": True}),
                                              ("PNG", {}), ("GIF", {})])
@pytest.mark.parametrize(("h", "w"), [(32, 32), (24, 40), (100, 7)])
def test_image_dimensions_agree_with_pil(fmt: str, options: dict[str, Any], h: int, w: int) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(h * w).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
        buf, format=fmt, **options)
    data = buf.getvalue()
    expected = None if fmt == "GIF" else (w, h)  # other formats are left to PIL
    assert q.image_dimensions(data) == expected
    assert q.image_header_problem({"data": data, "width": 32, "height": 32}, 32) == (None if (w, h) == (32, 32) else (
        q.IMAGE_SIZE, f"{w}x{h} image, declared 32x32"))
    assert q.image_header_problem({"data": data}, 32) is None  # another size than the model's is resized
    assert q.image_dimensions(data[:10]) is None
