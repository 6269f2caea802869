"""The VLA policy, its runtime, and the distributional value model."""

import numpy as np
import pytest
import torch
from conftest import INSTRUCTIONS, HashEmbedder, Obs

from learner.config import EncoderConfig, ModelConfig, ValueConfig
from learner.model import PolicyRuntime, RunningNorm, VLAPolicy, random_shift
from learner.value import ValueModel, two_hot, value_loss
from rewards.recap import DROPPED, NEGATIVE, POSITIVE

CNN = EncoderConfig(image_size=32, proprio_dim=8, cameras=("corner", "wrist"))
VIT = EncoderConfig(image_size=32, proprio_dim=8, cameras=("corner", "wrist"), image_encoder="vit", vit_patch=8,
                    vit_dim=64, vit_depth=2, vit_heads=2)


def inputs(b: int, enc: EncoderConfig, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (b, len(enc.cameras), 3, enc.image_size, enc.image_size), dtype=torch.uint8,
                           generator=g)
    return images, torch.randn(b, enc.proprio_dim, generator=g), torch.randn(b, 384, generator=g)


@pytest.mark.parametrize("enc", [CNN, VIT], ids=["cnn", "vit"])
@pytest.mark.parametrize("chunk", [1, 3])
def test_policy_forward_backward_shapes(enc: EncoderConfig, chunk: int) -> None:
    model = VLAPolicy(ModelConfig(encoder=enc, action_dim=4, chunk=chunk)).train()
    images, proprio, text = inputs(5, enc)
    indicator = torch.tensor([POSITIVE, NEGATIVE, DROPPED, POSITIVE, NEGATIVE])
    out = model(images, proprio, text, indicator)
    assert out.shape == (5, chunk, 4)
    assert out.abs().max() <= 1.0
    out.pow(2).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient reached {missing}"


def test_default_model_is_the_prototype_size() -> None:
    model = VLAPolicy(ModelConfig())
    assert 0.3e6 < model.num_parameters() < 0.6e6  # environment-notes: ~0.4 M parameters


def test_indicator_changes_the_action() -> None:
    model = VLAPolicy(ModelConfig(encoder=CNN)).eval()
    images, proprio, text = inputs(3, CNN)
    pos = model(images, proprio, text, torch.full((3,), POSITIVE))
    neg = model(images, proprio, text, torch.full((3,), NEGATIVE))
    assert not torch.allclose(pos, neg)
    torch.testing.assert_close(model(images, proprio, text), model(images, proprio, text, torch.full((3,), DROPPED)))


def test_augmentation_only_in_training() -> None:
    model = VLAPolicy(ModelConfig(encoder=CNN))
    images, proprio, text = inputs(4, CNN)
    model.eval()
    torch.testing.assert_close(model(images, proprio, text), model(images, proprio, text))
    model.train()
    assert not torch.allclose(model(images, proprio, text), model(images, proprio, text))


def test_random_shift_is_a_translation_of_the_padded_image() -> None:
    pad = 4
    images = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).reshape(2, 3, 16, 16)
    shifted = random_shift(images, pad, generator=torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(images, (pad,) * 4, mode="replicate")
    for b in range(2):
        crops = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                 if torch.equal(padded[b, :, dy:dy + 16, dx:dx + 16], shifted[b])]
        assert len(crops) == 1


def test_running_norm_matches_numpy_and_travels_in_the_state_dict() -> None:
    norm = RunningNorm(3, clip=100.0)
    a, b = torch.randn(50, 3) * 4 + 2, torch.randn(70, 3) * 0.5 - 1
    norm.update(a)
    norm.update(b)
    both = torch.cat([a, b]).double().numpy()
    np.testing.assert_allclose(norm.mean.numpy(), both.mean(0), rtol=1e-6)
    np.testing.assert_allclose(norm.var.numpy(), both.var(0), rtol=1e-6)
    other = RunningNorm(3, clip=100.0)
    other.load_state_dict(norm.state_dict())
    torch.testing.assert_close(other(a), norm(a))
    assert norm(torch.cat([a, b])).mean(0).abs().max() < 1e-4


def test_runtime_acts_with_and_without_guidance() -> None:
    enc = EncoderConfig(image_size=32, proprio_dim=8)
    model = VLAPolicy(ModelConfig(encoder=enc, chunk=2))
    obs = Obs(images={"corner": np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)},
              proprio=np.linspace(-1, 1, 8, dtype=np.float32), instruction=INSTRUCTIONS["reach-v3"], task="reach-v3")
    text = HashEmbedder()
    plain = PolicyRuntime(model, text, version="7")
    assert plain.act(obs).shape == (4,) and plain.act_chunk(obs).shape == (2, 4) and plain.version == "7"
    pos = PolicyRuntime(model, text, version="7", condition="positive").act_chunk(obs)
    guided = PolicyRuntime(model, text, version="7", condition="positive", cfg_beta=2.0).act_chunk(obs)
    np.testing.assert_allclose(guided, np.clip(plain.act_chunk(obs) + 2.0 * (pos - plain.act_chunk(obs)), -1, 1),
                               atol=1e-6)
    with pytest.raises(KeyError, match="wrist"):
        PolicyRuntime(VLAPolicy(ModelConfig(encoder=CNN)), text, version="1").act(obs)


def test_value_bins_and_expectation() -> None:
    model = ValueModel(ValueConfig(encoder=CNN))
    assert model.support.shape == (201,)
    assert model.support[0] == -1.0 and model.support[-1] == 0.0
    logits = torch.full((2, 201), -1e4)
    logits[0, 40], logits[1, 200] = 0.0, 0.0
    torch.testing.assert_close(model.expected(logits), torch.stack([model.support[40], model.support[200]]))
    returns = torch.tensor([-1.0, -0.5, -0.123, -0.0011, 0.0, -1.7])
    target = two_hot(returns, model.support)
    torch.testing.assert_close(target.sum(-1), torch.ones(6))
    torch.testing.assert_close((target * model.support).sum(-1), returns.clamp(-1, 0))
    assert (target > 0).sum(-1).max() <= 2


def test_value_loss_skips_rows_without_a_return() -> None:
    from learner.batch import Batch

    model = ValueModel(ValueConfig(encoder=CNN))
    images, proprio, text = inputs(4, CNN)
    batch = Batch(images=images, proprio=proprio, text=text, actions=torch.zeros(4, 1, 4),
                  action_mask=torch.ones(4, 1, dtype=torch.bool), human=torch.zeros(4, dtype=torch.bool),
                  online=torch.ones(4, dtype=torch.bool), advantage=torch.full((4,), torch.nan),
                  indicator=torch.full((4,), -1), returns=torch.tensor([-0.2, torch.nan, -0.9, -0.5]), tasks=["t"] * 4)
    loss, per_sample, metrics = value_loss(model, batch)
    assert torch.isfinite(loss) and torch.isnan(per_sample[1]) and torch.isfinite(per_sample[[0, 2, 3]]).all()
    assert set(metrics) == {"value_loss", "value_abs_error"}
