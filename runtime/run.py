"""``run_pipeline``: the whole text-to-video pipeline from the block store, through the executor.

T5 -> STDiT denoising -> VAE decode with real threads, real block files and real kernels under a hard byte
budget, following the Schedules a policy plans at DESIGN.md's re-plan points (or, with ``ladder``, the
Schedules precomputed for a ladder of budgets, as the phone agent does). Writes ``trace.json``,
``gantt.png``, ``summary.json``, ``latents.safetensors`` and ``frames/frame_NNNN.png``.

Modes: ``real`` -- kernels and loads at host speed, accounted as the host holds them (int8 dequantised to
fp32); ``emulate`` -- the same kernels for correct outputs, each load and exec padded to what a DeviceProfile
predicts (``cidl.runtime.pacing``), accounted as that device holds them (int8 stays int8), with every
predicted duration stretched by ``time_scale`` when the host is slower than the device.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from cidl.device_profiles.profile import DeviceProfile, WeightDType
from cidl.device_profiles.units import parse_size
from cidl.runtime.executor import Executor
from cidl.runtime.host_pipeline import (
    BatchSplitter,
    ExecutorBackend,
    GenerateSettings,
    Progress,
    generate,
    null_caption_from_store,
    write_frames,
    write_latents,
)
from cidl.scheduler.schedule import Schedule
from cidl.scheduler.workload import Workload
from cidl.traces.model import Trace

Mode = Literal["real", "emulate"]
DEFAULTS: dict[str, tuple[int, int, int]] = {"tiny": (64, 17, 4), "small": (64, 17, 4), "full": (256, 68, 30)}
MODELS = ("t5", "stdit", "vae_temporal", "vae_2d")


@dataclass(frozen=True)
class BudgetDrop:
    """A budget change during the run: at ``at_s`` seconds, or exactly at call ``call`` of ``stage``."""

    nbytes: int
    at_s: float | None = None
    stage: str | None = None
    call: int = 0


def parse_budget_drop(text: str) -> BudgetDrop:
    """``AT:SIZE`` with AT = seconds (``2.5`` or ``2.5s``) or ``STAGE@CALL`` (``stdit@2``)."""
    at, sep, size = text.rpartition(":")
    if not sep or not at:
        raise ValueError(f"--budget-drop {text!r}: expected AT:SIZE, e.g. 2.5s:1.5GB or stdit@2:1.5GB")
    nbytes = parse_size(size)
    if "@" in at:
        stage, _, call = at.partition("@")
        if not stage or not call.isdigit():
            raise ValueError(f"--budget-drop {text!r}: expected STAGE@CALL before ':', e.g. stdit@2")
        return BudgetDrop(nbytes, stage=stage, call=int(call))
    try:
        seconds = float(at.removesuffix("s"))
    except ValueError:
        raise ValueError(f"--budget-drop {text!r}: {at!r} is neither seconds nor STAGE@CALL") from None
    if seconds < 0:
        raise ValueError(f"--budget-drop {text!r}: time must be >= 0")
    return BudgetDrop(nbytes, at_s=seconds)


@dataclass(frozen=True)
class StageRow:
    stage: str
    calls: int
    seconds: float
    load_s: float
    exec_s: float


@dataclass
class RunResult:
    trace: Trace
    latents: Tensor | None
    video: Tensor | None
    out_dir: Path
    rows: list[StageRow]
    workload: Workload
    schedules: list[Schedule]  # every segment, in the order they were put in force
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def latency_s(self) -> float:
        return self.trace.makespan


def default_store(preset: str, dtype: str) -> Path:
    return Path("cidl-store") / f"{preset}-{dtype}"


def host_workload(settings: GenerateSettings, dtype: WeightDType, mode: Mode) -> Workload:
    """The workload as this run accounts it: the store's format on the host, resident and computed as fp32
    (int8 dequantized, fp16 widened: the host kernels run fp32), or the phone's formats in ``emulate``."""
    from cidl.scheduler.pipeline import open_sora_workload

    common = dict(lpl_leap=settings.lpl_leap, tdtm_steps=settings.tdtm_steps, preset=settings.preset)
    res = (settings.height, settings.width)
    if mode == "emulate":
        return open_sora_workload(res, settings.frames, settings.steps, **common)  # type: ignore[arg-type]
    return open_sora_workload(res, settings.frames, settings.steps, dtypes=dict.fromkeys(MODELS, dtype),
                              kernel_dtype="fp32", **common)  # type: ignore[arg-type]


def stage_rows(trace: Trace, workload: Workload) -> list[StageRow]:
    """Per stage: seconds from the previous stage's last exec to this one's (so rows add up to the total),
    and the busy seconds of its loads and execs."""
    rows: list[StageRow] = []
    prev_end = 0.0
    for st in workload.stages:
        execs = [e for e in trace.events if e.cat == "exec" and e.stage == st.name]
        end = max((e.ts + e.dur for e in execs), default=prev_end)
        ids = {b.id for b in st.blocks}
        loads = [e for e in trace.events if e.cat == "load" and e.block in ids and prev_end <= e.ts < end]
        rows.append(StageRow(st.name, st.calls, end - prev_end, sum(e.dur for e in loads),
                             sum(e.dur for e in execs)))
        prev_end = end
    return rows


def run_pipeline(
    preset: str = "small",
    *,
    out_dir: str | Path,
    store: str | Path | None = None,
    policy: str = "cidl",
    budget: int | str = "3.3GB",
    mode: Mode = "real",
    profile: DeviceProfile | None = None,
    host_profile: DeviceProfile | None = None,
    cold: bool = False,
    resolution: int | tuple[int, int] | None = None,
    frames: int | None = None,
    steps: int | None = None,
    lpl_leap: int | None = None,
    tdtm_steps: int = 0,
    loader_threads: int | None = None,
    budget_drops: list[BudgetDrop] | tuple[BudgetDrop, ...] = (),
    ladder: bool = False,
    ladder_rungs: int = 8,
    time_scale: float | Literal["auto"] = "auto",
    dtype: WeightDType = "fp32",
    seed: int = 0,
    progress: Progress | None = None,
    write_outputs: bool = True,
    on_trace: Callable[[Trace], None] | None = None,
) -> RunResult:
    """Run the pipeline; see the module docstring. Raises ``ExecutorError`` (after writing the trace so far)
    when the run stops early. ``profile``: in ``real`` mode the profile the policy plans with (default: the
    host profile); in ``emulate`` mode the device to emulate (required)."""
    from cidl.runtime.blocks import StoreBlocks
    from cidl.runtime.planning import make_planner, resolve_time_scale
    from cidl.runtime.store import prepare_store

    if mode not in ("real", "emulate"):
        raise ValueError(f"mode: expected real or emulate, got {mode!r}")
    if mode == "emulate" and profile is None:
        raise ValueError("--mode emulate needs --profile (the device to emulate)")
    res, n_frames, n_steps = DEFAULTS.get(preset, DEFAULTS["full"])
    h, w = (resolution, resolution) if isinstance(resolution, int) else (resolution or (res, res))
    settings = GenerateSettings(preset=preset, height=h, width=w, frames=frames or n_frames,
                                steps=steps or n_steps, lpl_leap=lpl_leap, tdtm_steps=tdtm_steps, seed=seed)
    budget_bytes = parse_size(budget)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    store_dir = Path(store) if store is not None else default_store(preset, dtype)
    if store is None and not (store_dir / "manifest.json").exists():
        prepare_store(preset, store_dir, dtype=dtype, seed=seed)
    blocks = StoreBlocks.open(str(store_dir), preset)
    store_dtype = blocks.store.dtype
    workload = host_workload(settings, store_dtype, mode)

    needs_host = profile is None if mode == "real" else time_scale == "auto"
    if host_profile is None and needs_host:
        from cidl.runtime.hostprofile import profile_host

        host_profile = profile_host(quick=True)
    plan_profile = profile if profile is not None else host_profile
    assert plan_profile is not None
    planner = make_planner(policy, workload, plan_profile, budget_bytes, loader_threads, ladder=ladder,
                           rungs=ladder_rungs)

    pacer = None
    scale_note: dict[str, Any] = {}
    if mode == "emulate":
        from cidl.runtime.pacing import ProfilePacer

        host_wl = host_workload(settings, store_dtype, "real")
        scale, scale_note = resolve_time_scale(time_scale, workload, profile, host_wl, host_profile)
        pacer = ProfilePacer(profile, scale, clock=lambda: 0.0)  # the executor's clock, set below
    labels = _queue_labels(mode, profile)
    extra = {"mode": mode, "preset": preset, "store": str(store_dir), "store_dtype": store_dtype,
             "loader_threads_flag": loader_threads, "ladder": ladder, "plan_profile": plan_profile.name,
             "settings": settings.__dict__, **scale_note}
    call_drops = [(d.stage, d.call, d.nbytes) for d in budget_drops if d.stage is not None]
    calls = {st.name: st.calls for st in workload.stages}
    for stage_name, call, _ in call_drops:
        if call >= calls.get(stage_name, 0):
            known = ", ".join(f"{n} (calls 0..{c - 1})" for n, c in calls.items())
            raise ValueError(f"--budget-drop {stage_name}@{call}: no such call; stages: {known}")
    ex = Executor(workload, blocks, planner, budget_bytes, policy=policy, cold=cold,
                  splitters={"stdit": BatchSplitter()}, pacer=pacer, queue_labels=labels, meta_extra=extra,
                  budget_drops=call_drops, measure_first_calls=not ladder)
    if pacer is not None:
        pacer.clock = ex.now
    timers = [threading.Timer(d.at_s * ex.time_scale, ex.set_budget, args=(d.nbytes,))
              for d in budget_drops if d.at_s is not None]

    result: Any = None
    error: BaseException | None = None
    try:
        y_null = null_caption_from_store(blocks.store)
        ex.start()
        for t in timers:
            t.daemon = True
            t.start()
        result = generate(ExecutorBackend(ex, workload, settings), settings, y_null, progress)
        ex.finish()
    except BaseException as e:
        error = e
    finally:
        for t in timers:
            t.cancel()
        trace = _finish_meta(ex.close(error), workload, plan_profile, budget_bytes, budget_drops,
                             pacer.stats() if pacer is not None else None)
        files = _write_trace_files(trace, workload, out) if write_outputs else {}
        if on_trace:
            on_trace(trace)
    if error is not None:
        raise error
    rows = stage_rows(trace, workload)
    if write_outputs:
        tags = {"preset": preset, "policy": policy, "trace_id": trace.meta.trace_id}
        files["latents"] = write_latents(result.latents, out / "latents.safetensors", tags)
        frames_dir = out / "frames"
        write_frames(result.video, frames_dir)
        files["frames"] = frames_dir
        files["summary"] = _write_json(out / "summary.json", summary_dict(trace, rows))
    return RunResult(trace=trace, latents=result.latents, video=result.video, out_dir=out, rows=rows,
                     workload=workload, schedules=ex.segments, files=files)


def _finish_meta(trace: Trace, workload: Workload, profile: DeviceProfile, budget_bytes: int,
                 drops: list[BudgetDrop] | tuple[BudgetDrop, ...], pacing: dict[str, float] | None) -> Trace:
    """Add what the executor does not know: the profile, the lower bound, per-stage latency, pacing."""
    from cidl.scheduler.bounds import lower_bound

    timed = [(d.at_s, d.nbytes) for d in drops if d.at_s is not None]
    threads = max(profile.loading.loader_threads, trace.meta.extra.get("loader_threads") or 1)
    try:
        lb: float | None = lower_bound(workload, profile, budget_bytes, loader_threads=threads,
                                       budget_drops=timed).seconds
    except ValueError:
        lb = None  # e.g. a budget the workload cannot run under
    extra = {**trace.meta.extra, "stage_latency_s": {r.stage: r.seconds for r in stage_rows(trace, workload)}}
    if pacing is not None:
        extra["pacing"] = pacing
    meta = trace.meta.model_copy(update={"profile": profile.model_dump(mode="json"), "lower_bound_s": lb,
                                         "extra": extra})
    return trace.model_copy(update={"meta": meta})


def summary_dict(trace: Trace, rows: list[StageRow]) -> dict[str, Any]:
    extra = trace.meta.extra
    return {
        "policy": trace.meta.policy,
        "mode": extra.get("mode"),
        "budget_bytes": trace.meta.budget_bytes,
        "latency_s": trace.makespan,
        "lower_bound_s": trace.meta.lower_bound_s,
        "stages": [r.__dict__ for r in rows],
        "peak_accounted_bytes": trace.peak("total"),
        "peak_rss_growth_bytes": extra.get("rss_peak_growth_bytes"),
        "schedule_hashes": trace.meta.schedule_hashes,
        "time_scale": extra.get("time_scale"),
        "error": trace.meta.error,
    }


def _queue_labels(mode: Mode, profile: DeviceProfile | None) -> dict[str, str]:
    """What really runs each queue: the store's blocks run torch CPU kernels whatever the queue (see
    ``StoreBlocks.run``), so the labels say so even where CUDA or MPS exists."""
    accel = "cuda" if torch.cuda.is_available() else (
        "mps" if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available() else "")
    cpu = f"host CPU (torch, {torch.get_num_threads()} threads)"
    note = f"; {accel} present but unused" if accel else ""
    labels = {q: cpu + (note if q == "gpu" else "") for q in ("gpu", "ane", "cpu")}
    if mode == "emulate" and profile is not None:
        labels = {q: f"{v}, paced as {profile.name} {q}" for q, v in labels.items()}
    return labels


def _write_json(path: Path, data: dict[str, Any]) -> Path:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    tmp.replace(path)
    return path


def _write_trace_files(trace: Trace, workload: Workload, out: Path) -> dict[str, Path]:
    from cidl.traces.chrome import write_trace

    files = {"trace": out / "trace.json"}
    write_trace(trace, files["trace"])
    try:
        from cidl.traces.gantt import plot_gantt

        plot_gantt(trace, out / "gantt.png")
        files["gantt"] = out / "gantt.png"
    except Exception as e:  # noqa: BLE001 - a plot must never hide the run's own result or error
        files["gantt_error"] = Path(f"{type(e).__name__}: {e}")
    return files
