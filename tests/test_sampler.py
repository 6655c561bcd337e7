"""Rectified-flow sampler: timesteps, CFG, Euler bookkeeping, LPL (fixed and dynamic), TDTM switching."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from cidl.runtime.models.sampler import (
    DenoiserCall,
    DynamicLPL,
    TimestepTransform,
    model_denoiser,
    pieces_denoiser,
    sample_rflow,
    sampling_timesteps,
)
from cidl.runtime.models.stdit3 import build_stdit3, split_stdit3, stdit3_inputs

SHAPE = (1, 4, 3, 4, 4)


class Oracle:
    """Knows the clean latent x0: returns the true rectified-flow velocity (x0 - z) / t; counts calls."""

    def __init__(self, x0: Tensor) -> None:
        self.x0 = x0
        self.tdtm: list[bool] = []

    def __call__(self, x: Tensor, t: Tensor, y: Tensor, mask: Tensor | None, *, tdtm: bool) -> Tensor:
        self.tdtm.append(tdtm)
        assert x.shape[0] == y.shape[0] == t.shape[0] == 2 * self.x0.shape[0]
        v = (self.x0.repeat(2, 1, 1, 1, 1) - x) / (t / 1000).view(-1, 1, 1, 1, 1)
        return torch.cat([v, torch.zeros_like(v)], dim=1)  # 8 channels like STDiT3; sampler keeps 4


def _text(batch: int = 1) -> tuple[Tensor, Tensor]:
    return torch.randn(batch, 1, 6, 8), torch.zeros(1, 1, 6, 8)


def test_timestep_transform_matches_upstream_formula() -> None:
    tf = TimestepTransform(height=256, width=256, num_frames=68)
    ratio = math.sqrt(256 * 256 / (512 * 512)) * math.sqrt(68 // 17 * 5)
    ts = sampling_timesteps(30, transform=tf)
    assert len(ts) == 30 and ts[0] == pytest.approx(1000.0)
    t = 1 - 10 / 30
    assert ts[10] == pytest.approx(1000 * ratio * t / (1 + (ratio - 1) * t))
    assert all(a > b for a, b in zip(ts, ts[1:], strict=False))
    assert sampling_timesteps(4) == [1000.0, 750.0, 500.0, 250.0]
    assert TimestepTransform(height=512, width=512, num_frames=1)(300.0) == pytest.approx(300.0)


@pytest.mark.parametrize("leap", [None, 0, 5, 29])
def test_euler_steps_and_leap_reach_x0(leap: int | None) -> None:
    x0 = torch.randn(SHAPE, dtype=torch.float64)
    oracle = Oracle(x0)
    y, y_null = _text()
    res = sample_rflow(oracle, torch.randn(SHAPE, dtype=torch.float64), y, y_null, lpl_leap=leap,
                       transform=TimestepTransform(height=256, width=256, num_frames=68))
    expected_calls = 30 if leap is None else leap + 1
    assert res.num_calls == len(oracle.tdtm) == expected_calls
    assert sum(c.dt for c in res.calls) == pytest.approx(1.0)
    torch.testing.assert_close(res.latents, x0)
    assert res.leap_step == leap and res.calls[-1].leap == (leap is not None)


def test_cfg_combines_cond_and_uncond() -> None:
    def denoise(x: Tensor, t: Tensor, y: Tensor, mask: Tensor | None, *, tdtm: bool) -> Tensor:
        assert torch.equal(mask[0], mask[1])  # the null caption keeps the prompt's text mask
        out = torch.zeros(x.shape[0], 8, *x.shape[2:])
        out[0, :4], out[1, :4], out[:, 4:] = 2.0, 0.5, 99.0  # cond, uncond, ignored sigma channels
        return out

    y, y_null = _text()
    z = torch.zeros(SHAPE)
    res = sample_rflow(denoise, z, y, y_null, torch.ones(1, 6), num_steps=4, cfg_scale=7.0, lpl_leap=0)
    # v = 0.5 + 7 * (2 - 0.5) = 11, applied over the whole flow in one leap
    torch.testing.assert_close(res.latents, torch.full(SHAPE, 11.0))


def test_tdtm_steps_merge_first_calls_and_callback_sees_every_update() -> None:
    oracle = Oracle(torch.randn(SHAPE))
    seen: list[DenoiserCall] = []
    y, y_null = _text()
    res = sample_rflow(oracle, torch.randn(SHAPE), y, y_null, num_steps=10, tdtm_steps=4, lpl_leap=6,
                       step_callback=lambda call, z: seen.append(call))
    assert oracle.tdtm == [True] * 4 + [False] * 3
    assert [c.tdtm for c in res.calls] == oracle.tdtm and res.merged_calls == 4
    assert seen == list(res.calls)


def _angle_denoiser(angles: list[float]):
    """Velocity of call i: every row of (sample 0, channel 0, frame 0) is the unit vector at angles[i]."""
    calls: list[int] = []

    def denoise(x: Tensor, t: Tensor, y: Tensor, mask: Tensor | None, *, tdtm: bool) -> Tensor:
        a = angles[len(calls)]
        calls.append(len(calls))
        out = torch.zeros(x.shape[0], 4, 3, 4, 4)
        out[:, 0, 0, :, 0], out[:, 0, 0, :, 1] = math.cos(a), math.sin(a)
        return out

    return denoise, calls


def _angles(deltas: list[float]) -> list[float]:
    """Cumulative angles so that cos(angle_i - angle_{i-1}) = cos(deltas[i-1])."""
    out = [0.0]
    for d in deltas:
        out.append(out[-1] + d)
    return out


def test_dynamic_lpl_leaps_when_similarity_stops_improving() -> None:
    # Steps 1..13 get worse and worse (ignored: before min_steps); 14..16 improve; 17.. plateau.
    deltas = [0.1 * i for i in range(1, 14)] + [0.5, 0.3, 0.1] + [0.1] * 13
    denoise, calls = _angle_denoiser(_angles(deltas))
    y, y_null = _text()
    res = sample_rflow(denoise, torch.zeros(SHAPE), y, y_null, cfg_scale=1.0, lpl_dynamic=DynamicLPL())
    # cos at 14, 15, 16 improves (best = cos 0.1); 17, 18, 19 do not beat it by 1e-3 -> leap at 19.
    assert res.leap_step == 19 and len(calls) == res.num_calls == 20
    assert [c.cosine is not None for c in res.calls] == [False] * 14 + [True] * 6
    assert res.calls[16].cosine == pytest.approx(math.cos(0.1))
    assert res.calls[-1].leap and res.calls[-1].dt == pytest.approx(res.calls[-1].timestep / 1000)


def test_dynamic_lpl_never_leaps_while_improving() -> None:
    deltas = [1.0] * 13 + [1.0 / (i + 2) for i in range(16)]
    denoise, calls = _angle_denoiser(_angles(deltas))
    y, y_null = _text()
    res = sample_rflow(denoise, torch.zeros(SHAPE), y, y_null, lpl_dynamic=DynamicLPL())
    assert res.leap_step is None and len(calls) == 30


def test_bad_arguments() -> None:
    y, y_null = _text()
    oracle, z = Oracle(torch.ones(SHAPE)), torch.ones(SHAPE)
    with pytest.raises(ValueError, match="at most one"):
        sample_rflow(oracle, z, y, y_null, lpl_leap=3, lpl_dynamic=DynamicLPL())
    with pytest.raises(ValueError, match="lpl_leap"):
        sample_rflow(oracle, z, y, y_null, lpl_leap=30)


def test_stdit3_pieces_drive_the_sampler_like_the_model() -> None:
    model = build_stdit3("tiny", seed=3)
    carry = stdit3_inputs("tiny", batch=1, frames_latent=3, height_latent=4, width_latent=4, seed=4)
    null = model.null_caption(1)
    runs = []
    for denoise in (model_denoiser(model, height=32, width=32), pieces_denoiser(split_stdit3(model, 2))):
        calls: list[bool] = []

        def counted(x, t, y, mask, *, tdtm, _d=denoise, _c=calls):
            _c.append(tdtm)
            return _d(x, t, y, mask, tdtm=tdtm)

        res = sample_rflow(counted, carry["x"], carry["y"], null, carry["mask"], num_steps=8, lpl_leap=3,
                           tdtm_steps=2, transform=TimestepTransform(height=32, width=32, num_frames=17))
        assert calls == [True, True, False, False] and res.num_calls == 4
        assert torch.isfinite(res.latents).all()
        runs.append(res.latents)
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=1e-5)
    assert not torch.allclose(runs[0], carry["x"])
