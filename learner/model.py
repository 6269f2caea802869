"""The VLA policy: image encoder (CNN or small ViT) + instruction embedding + proprio -> action (chunk).

RECAP conditions the policy on an advantage indicator (positive / negative / dropped); HG-DAgger trains
and acts with the indicator "dropped" throughout, so one architecture serves both algorithms.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import nn

from learner.batch import Batch, ObservationLike, images_to_tensor, observation_images
from learner.config import EncoderConfig, ModelConfig
from learner.text import TextEmbedder
from rewards.recap import DROPPED, POSITIVE

Condition = Literal["positive", "unconditioned"]


def random_shift(images: torch.Tensor, pad: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Shift each image by an integer offset in [-pad, pad] (edge-replicated): DrQ's augmentation.

    One gather with clamped indices (clamping an index is replicate padding), any dtype, no Python loop; the
    result keeps the input's memory format (channels-last in, channels-last out)."""
    b, c, h, w = images.shape
    dy = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator) - pad
    dx = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator) - pad
    rows = (dy + torch.arange(h)).clamp_(0, h - 1)  # [b, h]
    cols = (dx + torch.arange(w)).clamp_(0, w - 1)  # [b, w]
    if images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous():
        flat = images.permute(0, 2, 3, 1).reshape(b, h * w, c)  # a view: NHWC is the storage order
        index = (rows[:, :, None] * w + cols[:, None, :]).reshape(b, h * w, 1).expand(b, h * w, c)
        return flat.gather(1, index).reshape(b, h, w, c).permute(0, 3, 1, 2)
    index = (rows[:, :, None] * w + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
    return images.reshape(b, c, h * w).gather(2, index).reshape(b, c, h, w)


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """``[N, 3, H, W]`` uint8 -> float32 in [-0.5, 0.5], channels-last (what oneDNN's convolutions run fastest on):
    one conversion pass and two in-place ones."""
    return images.to(dtype=torch.float32, memory_format=torch.channels_last).div_(255.0).sub_(0.5)


class ConvEncoder(nn.Module):
    """3x3 stride-2 convolutions, then a linear projection with layer norm."""

    def __init__(self, channels: Sequence[int], image_size: int, out_features: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c in channels:
            layers += [nn.Conv2d(c_in, c, kernel_size=3, stride=2, padding=1), nn.ReLU()]
            c_in = c
        # channels-last weights and activations: oneDNN then runs forward and backward without reordering them
        # (the state_dict is saved contiguous, and loading copies into these layouts)
        self.conv = nn.Sequential(*layers).to(memory_format=torch.channels_last)
        with torch.no_grad():
            flat = self.conv(torch.zeros(1, 3, image_size, image_size)).numel()
        self.proj = nn.Sequential(nn.Flatten(), nn.Linear(flat, out_features), nn.LayerNorm(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.conv(x.contiguous(memory_format=torch.channels_last)))


class ViTEncoder(nn.Module):
    """A small pre-norm vision transformer; the class token's output is the image feature."""

    def __init__(self, *, image_size: int, patch: int, dim: int, depth: int, heads: int, out_features: int) -> None:
        super().__init__()
        self.patchify = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        tokens = (image_size // patch) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patchify(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(len(tokens), -1, -1), tokens], dim=1) + self.pos
        return self.proj(self.norm(self.blocks(tokens)[:, 0]))


class RunningNorm(nn.Module):
    """Input normalisation with running mean/variance kept in buffers, so they travel in the state_dict."""

    def __init__(self, dim: int, *, clip: float, min_std: float = 1e-2) -> None:
        super().__init__()
        self.clip = clip
        self.min_std = min_std
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("var", torch.ones(dim, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Fold a batch into the statistics (Chan et al.'s parallel mean/variance); rows holding a NaN or an
        Inf are left out, as one of them would make the statistics, and every later output, NaN for good."""
        x = x.detach().to(torch.float64).reshape(-1, self.mean.shape[0])
        x = x[torch.isfinite(x).all(dim=1)]
        n = x.shape[0]
        if n == 0:
            return
        batch_mean = x.mean(0)
        batch_var = x.var(0, unbiased=False)
        total = self.count + n
        delta = batch_mean - self.mean
        if self.count == 0:
            self.mean.copy_(batch_mean)
            self.var.copy_(batch_var)
        else:
            m2 = self.var * self.count + batch_var * n + delta.pow(2) * self.count * n / total
            self.mean.add_(delta * n / total)
            self.var.copy_(m2 / total)
        self.count.copy_(total)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        std = self.var.sqrt().clamp_min(self.min_std)
        return ((x - self.mean.to(x.dtype)) / std.to(x.dtype)).clamp(-self.clip, self.clip)


def mlp(sizes: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class ObservationEncoder(nn.Module):
    """Images (per camera, shared weights) + instruction embedding + normalised proprio -> one vector."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        if config.image_encoder == "cnn":
            self.image = ConvEncoder(config.cnn_channels, config.image_size, config.image_features)
        else:
            self.image = ViTEncoder(image_size=config.image_size, patch=config.vit_patch, dim=config.vit_dim,
                                    depth=config.vit_depth, heads=config.vit_heads,
                                    out_features=config.image_features)
        self.text = nn.Sequential(nn.Linear(config.text_dim, config.text_features), nn.LayerNorm(config.text_features))
        self.proprio_norm = RunningNorm(config.proprio_dim, clip=config.proprio_clip)
        self.proprio = nn.Sequential(mlp([config.proprio_dim, config.proprio_features, config.proprio_features]),
                                     nn.ReLU())
        self.out_features = (len(config.cameras) * config.image_features + config.text_features
                             + config.proprio_features)

    def forward(self, images: torch.Tensor, proprio: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        c = self.config
        if images.shape[1:] != (len(c.cameras), 3, c.image_size, c.image_size) or proprio.shape[-1] != c.proprio_dim:
            raise ValueError(f"the encoder expects images [B, {len(c.cameras)}, 3, {c.image_size}, {c.image_size}] and "
                             f"proprio [B, {c.proprio_dim}]; got {tuple(images.shape)} and {tuple(proprio.shape)}")
        b, cams = images.shape[:2]
        x = images.reshape(b * cams, *images.shape[2:])
        if self.training and self.config.augment_shift > 0:
            x = random_shift(x, self.config.augment_shift)  # on the uint8 pixels: a quarter of the bytes to move
        feats = self.image(to_model_input(x) if x.dtype == torch.uint8 else x.float().div(255.0).sub_(0.5))
        feats = feats.reshape(b, -1)
        return torch.cat([feats, self.text(text), self.proprio(self.proprio_norm(proprio))], dim=-1)


class VLAPolicy(nn.Module):
    """``forward(images, proprio, text, indicator) -> [B, chunk, action_dim]`` actions in [-1, 1]."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = ObservationEncoder(config.encoder)
        self.indicator = nn.Embedding(3, config.indicator_features)  # NEGATIVE, POSITIVE, DROPPED
        self.head = mlp([self.encoder.out_features + config.indicator_features, *config.hidden,
                         config.chunk * config.action_dim])

    def forward(self, images: torch.Tensor, proprio: torch.Tensor, text: torch.Tensor,
                indicator: torch.Tensor | None = None) -> torch.Tensor:
        if indicator is None:
            indicator = torch.full((images.shape[0],), DROPPED, dtype=torch.long, device=images.device)
        z = torch.cat([self.encoder(images, proprio, text), self.indicator(indicator)], dim=-1)
        out = torch.tanh(self.head(z))
        return out.reshape(-1, self.config.chunk, self.config.action_dim)

    def forward_batch(self, batch: Batch, indicator: torch.Tensor | None = None) -> torch.Tensor:
        return self(batch.images, batch.proprio, batch.text, indicator)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def observation_tensors(observations: Sequence[ObservationLike], encoder: EncoderConfig,
                        text: TextEmbedder) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images = images_to_tensor(np.stack([observation_images(o, encoder) for o in observations]))
    proprio = torch.from_numpy(np.stack([np.asarray(o.proprio, dtype=np.float32) for o in observations]))
    return images, proprio, torch.from_numpy(text.embed([o.instruction for o in observations]))


class PolicyRuntime:
    """A loaded policy version ready to act: what the actors call (``producers.interfaces.Policy``).

    ``condition="positive"`` asks a RECAP policy for its better-than-usual behaviour; with ``cfg_beta > 1``
    the action is extrapolated away from the unconditioned one (classifier-free guidance).
    The chunk's first action is executed and the policy is queried again at every step.
    """

    def __init__(self, model: VLAPolicy, text: TextEmbedder, *, version: str,
                 condition: Condition = "unconditioned", cfg_beta: float = 1.0) -> None:
        if condition not in ("positive", "unconditioned"):
            raise ValueError(f"condition must be 'positive' or 'unconditioned'; got {condition!r}")
        if cfg_beta < 1.0:
            raise ValueError(f"cfg_beta must be >= 1; got {cfg_beta}")
        self.model = model.eval()
        self.text = text
        self.version = version
        self.condition = condition
        self.cfg_beta = cfg_beta

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def act(self, observation: ObservationLike) -> np.ndarray:
        return self.act_chunk(observation)[0]

    def act_chunk(self, observation: ObservationLike) -> np.ndarray:
        return self.act_batch([observation])[0]

    @torch.inference_mode()
    def act_batch(self, observations: Sequence[ObservationLike]) -> np.ndarray:
        """``[B, chunk, action_dim]`` float32."""
        images, proprio, text = (t.to(self.device) for t in
                                 observation_tensors(observations, self.model.config.encoder, self.text))
        b = images.shape[0]
        if self.condition == "unconditioned":
            return self.model(images, proprio, text).cpu().numpy()
        positive = torch.full((b,), POSITIVE, dtype=torch.long, device=self.device)
        if self.cfg_beta == 1.0:
            return self.model(images, proprio, text, positive).cpu().numpy()
        dropped = torch.full((b,), DROPPED, dtype=torch.long, device=self.device)
        both = self.model(images.repeat(2, 1, 1, 1, 1), proprio.repeat(2, 1), text.repeat(2, 1),
                          torch.cat([positive, dropped]))
        a_pos, a_uncond = both[:b], both[b:]
        return (a_uncond + self.cfg_beta * (a_pos - a_uncond)).clamp(-1.0, 1.0).cpu().numpy()
