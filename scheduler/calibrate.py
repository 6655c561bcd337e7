"""Fit a DeviceProfile's physical parameters to measured figures with the simulator in the loop.

A *figure* is a latency the device was seen to reach: a policy, a workload, the stages measured, seconds.
The fit moves a few physical parameters (load rates per weight format, compute efficiency per dtype,
contention) in log space with ``scipy.optimize.least_squares``; the residuals are the relative errors of
the simulated figures, plus a weak pull of each parameter toward its starting (spec-sheet) value so that
an under-determined fit stays physical instead of wandering along a valley. Nothing per model is fitted:
the same rates and efficiencies then predict other resolutions, frame counts, LPL, TDTM and budgets.

Reproduce the shipped iPhone 15 Pro profile::

    python -m cidl.scheduler.calibrate            # refits device_profiles/profiles/iphone-15-pro.json
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cidl.device_profiles import Calibration, DeviceProfile, load_profile, profile_path, save_profile

from .pipeline import open_sora_workload
from .sim import simulate
from .workload import Workload


@dataclass(frozen=True)
class Figure:
    """``seconds`` for ``stages`` (stage-name prefixes, summed) of ``workload`` under ``policy``.

    With ``minus`` set, the figure is the difference ``minus``'s latency - this one's (a saving)."""

    name: str
    policy: str
    stages: tuple[str, ...]
    seconds: float
    weight: float = 1.0
    minus: str | None = None


@dataclass(frozen=True)
class Param:
    """A dotted path into the profile JSON, e.g. ``loading.bytes_per_s.fp32``; fitted in log space."""

    path: str
    lower: float
    upper: float

    def get(self, data: dict[str, Any]) -> float:
        node: Any = data
        for key in self.path.split("."):
            node = node[key]
        return float(node)

    def set(self, data: dict[str, Any], value: float) -> None:
        keys = self.path.split(".")
        node: Any = data
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value


@dataclass
class FitResult:
    profile: DeviceProfile
    predicted: dict[str, float]
    residuals: dict[str, float] = field(default_factory=dict)


# On-device Sora on the iPhone 15 Pro, Open-Sora 256x256, 68 frames, STDiT at 30 steps (DESIGN.md).
PAPER_FIGURES: tuple[Figure, ...] = (
    Figure("t5-sequential", "sequential", ("t5",), 164.0),
    Figure("t5-concurrent", "concurrent", ("t5",), 137.0),
    Figure("stdit-sequential", "sequential", ("stdit",), 1000.0),
    Figure("stdit-concurrent", "concurrent", ("stdit",), 750.0),
    # Dynamic Loading saves ~17 s on average: a small difference, so weighted by its own scale below.
    Figure("stdit-dynamic-loading-saving", "cidl", ("stdit",), 17.0, weight=0.5, minus="stdit-concurrent"),
)

IPHONE_PARAMS: tuple[Param, ...] = (
    Param("loading.bytes_per_s.fp32", 5e7, 2e9),
    Param("loading.bytes_per_s.int8", 5e6, 2e9),
    Param("units.gpu.efficiency.fp32", 0.02, 1.0),
    Param("units.gpu.efficiency.int8", 0.005, 1.0),
    Param("contention.load_slowdown", 1.0, 4.0),
    Param("contention.compute_slowdown", 1.0, 4.0),
)
PRIOR_WEIGHT = 0.02  # relative pull toward the starting value per e-fold; small: the figures dominate


def _workload_for(figures: Sequence[Figure]) -> Workload:
    """The paper's configuration, restricted to the stages the figures measure (VAE not reported)."""
    w = open_sora_workload(256, 68, 30)
    prefixes = {p for f in figures for p in f.stages}
    stages = [s for s in w.stages if any(s.name.startswith(p) for p in prefixes)]
    return w.model_copy(update={"stages": stages})


def predict(profile: DeviceProfile, figures: Sequence[Figure], workload: Workload | None = None,
            budget_bytes: int | None = None) -> dict[str, float]:
    """Simulated value of every figure (one simulation per policy)."""
    w = workload or _workload_for(figures)
    budget = budget_bytes or profile.memory.app_budget_bytes
    runs = {p: simulate(w, profile, p, budget) for p in sorted({f.policy for f in figures})}
    out: dict[str, float] = {}
    for f in figures:  # in order, so a saving can refer to a figure listed before it
        r = runs[f.policy]
        value = sum(v for k, v in r.stage_latency_s.items() if any(k.startswith(p) for p in f.stages))
        out[f.name] = out[f.minus] - value if f.minus else value
    return out


def fit_profile(profile: DeviceProfile, figures: Sequence[Figure], params: Sequence[Param], *,
                max_nfev: int = 200, workload: Workload | None = None) -> FitResult:
    """Fit ``params`` of ``profile`` so the simulator reproduces ``figures`` (on ``workload``, default: the
    paper's configuration restricted to the measured stages)."""
    from scipy.optimize import least_squares  # scipy only when fitting

    base = profile.model_dump(mode="json")
    x0 = [math.log(p.get(base)) for p in params]
    lo = [math.log(p.lower) for p in params]
    hi = [math.log(p.upper) for p in params]
    w = workload or _workload_for(figures)

    def build(x: Sequence[float]) -> DeviceProfile:
        data = profile.model_dump(mode="json")
        for p, v in zip(params, x, strict=True):
            p.set(data, math.exp(v))
        return DeviceProfile.model_validate(data)

    def residuals(x: Sequence[float]) -> list[float]:
        pred = predict(build(x), figures, w)
        res = [f.weight * (pred[f.name] - f.seconds) / f.seconds for f in figures]
        return res + [PRIOR_WEIGHT * (xi - x0i) for xi, x0i in zip(x, x0, strict=True)]

    x_start = [min(max(v, a + 1e-9), b - 1e-9) for v, a, b in zip(x0, lo, hi, strict=True)]
    sol = least_squares(residuals, x_start, bounds=(lo, hi), diff_step=1e-3, xtol=1e-6, ftol=1e-6,
                        max_nfev=max_nfev)
    fitted = build(sol.x)
    pred = predict(fitted, figures, w)
    rel = {f.name: (pred[f.name] - f.seconds) / f.seconds for f in figures}
    calib = Calibration(
        calibrated=True,
        fitted_to=[f"{f.name}: {f.seconds:g} s ({f.policy})" for f in figures],
        method=(
            "scipy.optimize.least_squares in log space over "
            + ", ".join(p.path for p in params)
            + f"; residuals are relative errors of simulated figures ({w.name}, {w.frames} frames, "
            f"{w.steps} steps, budget {fitted.memory.app_budget_bytes} B) plus a {PRIOR_WEIGHT} pull per "
            "e-fold toward the spec-sheet starting values; reproduce: `python -m cidl.scheduler.calibrate`"
        ),
        residuals={k: round(v, 5) for k, v in rel.items()},
        source=profile.calibration.source,
    )
    return FitResult(profile=fitted.model_copy(update={"calibration": calib}), predicted=pred, residuals=rel)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="iphone-15-pro")
    ap.add_argument("--out", default=None, help="Where to write the fitted profile (default: in place).")
    args = ap.parse_args(argv)
    start = load_profile(args.profile)
    result = fit_profile(start, PAPER_FIGURES, IPHONE_PARAMS)
    for f in PAPER_FIGURES:
        print(f"{f.name:32s} target {f.seconds:8.1f} s  simulated {result.predicted[f.name]:8.1f} s  "
              f"error {100 * result.residuals[f.name]:+.2f}%")
    data = result.profile.model_dump(mode="json")
    for p in IPHONE_PARAMS:
        print(f"{p.path:32s} {p.get(start.model_dump(mode='json')):.4g} -> {p.get(data):.4g}")
    save_profile(result.profile, args.out or profile_path(args.profile))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
