"""Rectified-flow sampling as Open-Sora v1.2 does it, with On-device Sora's LPL and TDTM switches.

Upstream facts (hpcaitech/Open-Sora v1.2.0, ``opensora/schedulers/rf/``; config
``configs/opensora-v1-2/inference/sample.py``): 30 steps over ``t_i = (1 - i/N) * 1000``, each passed through
``timestep_transform`` (resolution and frame-count scaling); classifier-free guidance at scale 7.0 on a
batch of 2B (the prompt and the model's null caption, both with the prompt's text mask); the model output's
first half of channels is the velocity; Euler update ``z += v * (t_i - t_{i+1}) / 1000``, the last step
going to 0.

LPL (Linear Proportional Leap, On-device Sora): at step k the velocity just computed carries ``z`` over all
the remaining time in one Euler step (``dt = t_k / 1000``), so the denoiser runs k+1 times. The dynamic
variant follows On-device Sora's ``RFLOW.compute_cosine_simularity``: from step ``min_steps`` (0-based) on,
the cosine similarity of consecutive guided velocities must beat the best so far by ``tolerance``; after
``patience`` steps without that, the current step leaps. Their similarity is that of sample 0, channel 0,
latent frame 0: row-wise cosine along the width, averaged over rows (``lpl_cosine``).

TDTM: the first ``tdtm_steps`` denoiser calls are made with ``tdtm=True``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from cidl.runtime.models.piece import Piece, run_pieces


class Denoiser(Protocol):
    """One denoiser call on the CFG batch: x [2B,C,T,H,W], t [2B], y [2B,1,L,D], mask [2B,L] or None.

    Returns the model output [2B, C_out, T, H, W]; the sampler keeps the first C channels (the velocity).
    """

    def __call__(self, x: Tensor, t: Tensor, y: Tensor, mask: Tensor | None, *, tdtm: bool) -> Tensor: ...


class TimestepTransform(BaseModel):
    """Upstream ``timestep_transform``: shifts timesteps toward noise for larger videos."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    height: int = Field(gt=0, description="video height in pixels")
    width: int = Field(gt=0, description="video width in pixels")
    num_frames: int = Field(gt=0, description="video frames (not latent frames)")
    base_resolution: int = 512 * 512
    base_num_frames: int = 1
    scale: float = 1.0

    def __call__(self, t: float, num_timesteps: int = 1000) -> float:
        """``t`` in [0, num_timesteps] -> transformed t in the same range."""
        t = t / num_timesteps
        ratio_space = math.sqrt(self.height * self.width / self.base_resolution)
        # Upstream hard-codes the VAE's temporal reduction: 17 frames -> 5 latent frames.
        frames = 1 if self.num_frames == 1 else self.num_frames // 17 * 5
        ratio = ratio_space * math.sqrt(frames / self.base_num_frames) * self.scale
        return ratio * t / (1 + (ratio - 1) * t) * num_timesteps


class DynamicLPL(BaseModel):
    """On-device Sora's dynamic leap rule (their Python sampler's constants are the defaults)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tolerance: float = Field(default=1e-3, ge=0)
    patience: int = Field(default=3, ge=1)
    min_steps: int = Field(default=14, ge=1)


@dataclass(frozen=True)
class DenoiserCall:
    """One denoiser call of a sampling run: its step, timestep, the dt its velocity was applied over."""

    step: int
    timestep: float
    dt: float
    tdtm: bool
    leap: bool
    cosine: float | None = None


@dataclass(frozen=True)
class SampleResult:
    latents: Tensor
    calls: tuple[DenoiserCall, ...]
    leap_step: int | None

    @property
    def num_calls(self) -> int:
        return len(self.calls)

    @property
    def merged_calls(self) -> int:
        return sum(c.tdtm for c in self.calls)


def sampling_timesteps(
    num_steps: int,
    num_timesteps: int = 1000,
    transform: TimestepTransform | None = None,
    discrete: bool = False,
) -> list[float]:
    """The N timesteps the model sees, from ``num_timesteps`` down (upstream's rounding, then transform)."""
    ts = [(1.0 - i / num_steps) * num_timesteps for i in range(num_steps)]
    if discrete:
        ts = [float(round(t)) for t in ts]
    if transform is not None:
        ts = [transform(t, num_timesteps) for t in ts]
    return ts


def lpl_cosine(v: Tensor, prev: Tensor) -> float:
    """On-device Sora's similarity: sample 0, channel 0, frame 0; cosine per row along W, mean over rows."""
    return float(F.cosine_similarity(v[0, 0, 0].float(), prev[0, 0, 0].float(), dim=1).mean())


class _DynamicLeap:
    """State of the dynamic rule across steps; ``update`` says whether this step leaps."""

    def __init__(self, rule: DynamicLPL) -> None:
        self.rule = rule
        self.prev: Tensor | None = None
        self.best = 0.0
        self.left = rule.patience

    def update(self, step: int, v: Tensor) -> tuple[bool, float | None]:
        cos = None
        if self.prev is not None and step >= self.rule.min_steps:
            cos = lpl_cosine(v, self.prev)
            if cos > self.best + self.rule.tolerance:
                self.best, self.left = cos, self.rule.patience
            else:
                self.left -= 1
        self.prev = v
        return self.left == 0, cos


def sample_rflow(
    denoise: Denoiser,
    z: Tensor,
    y: Tensor,
    y_null: Tensor,
    mask: Tensor | None = None,
    *,
    num_steps: int = 30,
    cfg_scale: float = 7.0,
    num_timesteps: int = 1000,
    transform: TimestepTransform | None = None,
    discrete_timesteps: bool = False,
    lpl_leap: int | None = None,
    lpl_dynamic: DynamicLPL | None = None,
    tdtm_steps: int = 0,
    step_callback: Callable[[DenoiserCall, Tensor], None] | None = None,
) -> SampleResult:
    """Denoise ``z`` [B,C,T,H,W] (initial noise) with CFG on ``y`` [B,1,L,D] against ``y_null``.

    ``transform`` is the timestep transform (Open-Sora v1.2 turns it on; pass ``TimestepTransform(...)``
    for the video's size). ``lpl_leap=k`` leaps at step k (k+1 calls); ``lpl_dynamic`` leaps by the dynamic
    rule; at most one of them. ``step_callback(call, z)`` runs after every update with the new latents.
    """
    if lpl_leap is not None and lpl_dynamic is not None:
        raise ValueError("lpl_leap and lpl_dynamic: give at most one")
    if lpl_leap is not None and not 0 <= lpl_leap < num_steps:
        raise ValueError(f"lpl_leap: expected 0 <= k < num_steps={num_steps}, got {lpl_leap}")
    if tdtm_steps < 0:
        raise ValueError(f"tdtm_steps: expected >= 0, got {tdtm_steps}")
    b, c = z.shape[:2]
    if y.shape[0] != b or y.shape[1:] != y_null.shape[1:]:
        raise ValueError(f"y {tuple(y.shape)} / y_null {tuple(y_null.shape)}: expected [{b}, 1, L, D] both")
    y_in = torch.cat([y, y_null.expand(b, *y_null.shape[1:])], dim=0)
    mask_in = None if mask is None else torch.cat([mask, mask], dim=0)  # uncond keeps the prompt's mask
    timesteps = sampling_timesteps(num_steps, num_timesteps, transform, discrete_timesteps)
    dynamic = _DynamicLeap(lpl_dynamic) if lpl_dynamic is not None else None

    calls: list[DenoiserCall] = []
    for i, t in enumerate(timesteps):
        tdtm = i < tdtm_steps
        t_in = torch.full((2 * b,), t, device=z.device, dtype=torch.float32)
        pred = denoise(torch.cat([z, z], dim=0), t_in, y_in, mask_in, tdtm=tdtm)[:, :c]
        cond, uncond = pred.chunk(2, dim=0)
        v = uncond + cfg_scale * (cond - uncond)

        leap, cos = (False, None) if dynamic is None else dynamic.update(i, v)
        leap = leap or i == lpl_leap
        dt = t if leap or i == num_steps - 1 else t - timesteps[i + 1]
        z = z + v * (dt / num_timesteps)
        call = DenoiserCall(step=i, timestep=t, dt=dt / num_timesteps, tdtm=tdtm, leap=leap, cosine=cos)
        calls.append(call)
        if step_callback is not None:
            step_callback(call, z)
        if leap:
            return SampleResult(latents=z, calls=tuple(calls), leap_step=i)
    return SampleResult(latents=z, calls=tuple(calls), leap_step=None)


def model_denoiser(
    model: nn.Module, *, fps: Tensor | None = None, height: float | None = None, width: float | None = None
) -> Denoiser:
    """Drive an unpartitioned STDiT3."""

    def denoise(x: Tensor, t: Tensor, y: Tensor, mask: Tensor | None, *, tdtm: bool) -> Tensor:
        return model(x, t, y, mask=mask, fps=fps, height=height, width=width, tdtm=tdtm)

    return denoise


def pieces_denoiser(
    pieces: list[Piece], *, fps: Tensor | None = None, height: float | None = None, width: float | None = None
) -> Denoiser:
    """Drive the partitioned STDiT3 (``split_stdit3``), all pieces in order."""

    def denoise(x: Tensor, t: Tensor, y: Tensor, mask: Tensor | None, *, tdtm: bool) -> Tensor:
        carry = {"x": x, "timestep": t, "y": y, "mask": mask, "fps": fps,
                 "height": height, "width": width, "tdtm": tdtm}
        return run_pieces(pieces, carry)["out"]

    return denoise
