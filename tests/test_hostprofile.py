"""`cidl profile host --quick`: a valid, calibrated DeviceProfile of this machine; the load-time fit."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cidl.device_profiles.profile import DeviceProfile
from cidl.runtime.hostprofile import estimate_cpu_peak, fit_load, profile_host


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> tuple[DeviceProfile, Path, list[str]]:
    workdir = tmp_path_factory.mktemp("profile")
    steps: list[str] = []
    profile = profile_host(quick=True, workdir=workdir, progress=lambda s, i, n: steps.append(s))
    return profile, workdir, steps


def test_quick_profile_validates(measured: tuple[DeviceProfile, Path, list[str]]) -> None:
    profile, workdir, steps = measured
    assert DeviceProfile.model_validate_json(profile.model_dump_json()) == profile
    assert not list(workdir.iterdir())  # test block files removed
    assert steps[0] == "write test blocks" and steps[-1] == "done"
    load = profile.loading
    assert set(load.bytes_per_s) == {"fp32", "fp16", "int8"} and all(r > 0 for r in load.bytes_per_s.values())
    assert load.per_load_overhead_s >= 0 and load.max_total_bytes_per_s >= load.bytes_per_s["fp32"]
    assert load.loader_threads in (1, 2)
    assert profile.contention.load_slowdown >= 1 and profile.contention.compute_slowdown >= 1
    cpu = profile.units["cpu"]
    assert set(cpu.efficiency) == {"fp32", "fp16", "int8"}
    assert all(0 < e <= 1 for e in cpu.efficiency.values()) and cpu.dispatch_overhead_s > 0
    assert cpu.peak_flops >= estimate_cpu_peak()[0]
    assert "gpu" in profile.units
    if profile.units["gpu"] == cpu:
        assert "gpu unit is the CPU's torch kernels" in profile.description
    mem = profile.memory
    assert 0 < mem.app_budget_bytes <= mem.total_bytes
    cal = profile.calibration
    assert cal.calibrated and "lsq_linear" in cal.method
    for fmt in ("fp32", "fp16", "int8"):
        assert any(f.startswith(f"load {fmt} cold") for f in cal.fitted_to)
        assert sum(k.startswith(f"load.{fmt}.cold.") for k in cal.residuals) == 3  # one per quick size
    assert any(f.startswith("matmul bf16") for f in cal.fitted_to)


def test_fit_recovers_rate_and_overhead() -> None:
    samples = [(b, 0.002 + b / 5e8) for b in (1 << 20, 4 << 20, 16 << 20) for _ in range(3)]
    fit = fit_load("fp32", True, samples)
    assert fit.bytes_per_s == pytest.approx(5e8, rel=1e-9)
    assert fit.overhead_s == pytest.approx(0.002, rel=1e-6)
    assert all(abs(r) < 1e-9 for r in fit.residuals().values()) and len(fit.residuals()) == 3
    # Noise that would give a negative intercept: the overhead is bounded at 0, the rate stays in range.
    fit = fit_load("int8", True, [(1000, 0.9e-6), (2000, 2.1e-6)])
    assert fit.overhead_s == pytest.approx(0, abs=1e-12) and 2000 / 2.1e-6 < fit.bytes_per_s < 1000 / 0.9e-6
    # A lone size cannot separate overhead from transfer: all of it is transfer.
    fit = fit_load("fp16", False, [(1000, 2e-6), (1000, 4e-6), (1000, 3e-6)])
    assert fit.overhead_s == 0 and fit.bytes_per_s == pytest.approx(1000 / 3e-6)


def test_cli_writes_the_profile(tmp_path: Path) -> None:
    from cidl.cli.main import app

    out = tmp_path / "p" / "host.json"
    result = CliRunner().invoke(app, ["profile", "host", "--quick", "--out", str(out), "--dir", str(tmp_path),
                                      "--name", "my-laptop"])
    assert result.exit_code == 0, result.output
    profile = DeviceProfile.model_validate_json(out.read_text())
    assert profile.name == "my-laptop" and f"wrote {out}" in result.output
    bad = CliRunner().invoke(app, ["profile", "host", "--quick", "--dir", str(tmp_path / "nope")])
    assert bad.exit_code == 2 and "--dir must be an existing directory" in bad.output
