"""`cidl profile host`: measure this machine into a DeviceProfile, through the runtime's own code paths.

What is measured, and how each profile field comes from it:

* **Loading** -- block files of several sizes (a stack of 1-layer Linear blocks) are written with the block
  store's writer and loaded with :class:`~cidl.runtime.blocks.ManagedBlock` exactly as ``cidl run`` loads them
  (read into fresh memory, sha256, header check, dequantise/convert, assign), cold (the file dropped from the
  page cache with ``posix_fadvise(DONTNEED)`` before each read) and warm. Per stored format, seconds vs
  stored bytes is fitted (relative least squares, ``scipy.optimize.lsq_linear``): ``bytes_per_s[fmt]`` =
  1/slope of the cold fit (so int8 includes dequantisation to fp32, fp16 its conversion to fp32),
  ``per_load_overhead_s`` = the fp32 cold intercept (>= 0). ``max_total_bytes_per_s``: two loader threads
  load two files at once (their aggregate rate, never below one thread's); ``loader_threads`` is 2 when
  that aggregate beats one thread by 15 %.
* **Compute** (``cpu`` unit) -- ``F.linear`` of an n x n activation by an n x n weight, as the blocks run:
  fp32; fp16 and int8 weights as the host runtime holds them (converted / dequantised to fp32 at load, so
  an fp32 kernel); bf16 native is measured too and reported in ``calibration.fitted_to`` only, since the
  runtime computes in fp32. ``peak_flops`` is an estimate: cores torch uses x clock (``/proc/cpuinfo`` or
  psutil) x FLOP/cycle/core from the vector ISA (2 FMA pipes: AVX-512 64, AVX2+FMA 32, AVX 16, NEON 32,
  else 8), raised to the best measured rate if that is higher, so efficiency stays in (0, 1].
  ``dispatch_overhead_s``: the median round trip of a tiny op through a worker thread's queue, the
  executor's way of handing an exec to a compute queue.
* **gpu** -- with CUDA or MPS the same matmuls run on that device (peak = its best measured rate). On a
  CPU-only host ``gpu`` is the CPU's unit again (the runtime's host kernels serve every queue), so the
  shipped policies that prefer ``gpu`` run here; the profile's description says so.
* **Contention** -- a loader thread loads cold in a loop while the main thread runs matmuls; each side's
  median time over its time alone, at least 1.
* **Memory** -- psutil: ``total_bytes`` = physical RAM, ``app_budget_bytes`` = available now.
"""

from __future__ import annotations

import platform
import queue
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import torch
import torch.nn.functional as F
from scipy import optimize
from torch import nn

from cidl.device_profiles.profile import (
    Calibration,
    ComputeUnit,
    Contention,
    DeviceProfile,
    LoadingSpec,
    MemorySpec,
    WeightDType,
)
from cidl.device_profiles.units import format_size
from cidl.runtime.blocks import ManagedBlock
from cidl.runtime.models.piece import Piece
from cidl.runtime.quant import dequantize_int8, quantize_int8
from cidl.runtime.store import BlockSource, BlockStore, prepare_blocks

Progress = Callable[[str, int, int], None]  # (step description, steps done, steps in all)
FORMATS: tuple[WeightDType, ...] = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class ProfileSettings:
    """How much to measure. ``sizes``: fp32 bytes of the test blocks."""

    sizes: tuple[int, ...]
    repeats: int
    layer_width: int
    matmul_n: int
    matmul_repeats: int
    dispatch_calls: int
    contention_s: float


FULL = ProfileSettings(sizes=(4 << 20, 16 << 20, 64 << 20, 256 << 20), repeats=3, layer_width=1024,
                       matmul_n=1024, matmul_repeats=10, dispatch_calls=300, contention_s=3.0)
QUICK = ProfileSettings(sizes=(1 << 20, 2 << 20, 4 << 20), repeats=2, layer_width=256,
                        matmul_n=192, matmul_repeats=4, dispatch_calls=50, contention_s=0.2)


_FORMAT_NOTE = {"int8": " incl. dequantisation to fp32", "fp16": " incl. conversion to fp32"}


@dataclass(frozen=True)
class LoadFit:
    fmt: WeightDType
    cold: bool
    bytes_per_s: float
    overhead_s: float
    points: tuple[tuple[int, float], ...]  # (stored bytes, median seconds) per size

    def residuals(self) -> dict[str, float]:
        """Relative error of the fit at each size (predicted / measured - 1)."""
        kind = "cold" if self.cold else "warm"
        return {f"load.{self.fmt}.{kind}.{format_size(b).replace(' ', '')}":
                (self.overhead_s + b / self.bytes_per_s) / t - 1 for b, t in self.points}

    def describe(self) -> str:
        lo, hi = format_size(self.points[0][0]), format_size(self.points[-1][0])
        kind = "cold" if self.cold else "warm"
        extra = _FORMAT_NOTE.get(self.fmt, "")
        return (f"load {self.fmt} {kind}{extra}: {len(self.points)} sizes {lo}..{hi}: "
                f"{format_size(self.bytes_per_s)}/s + {self.overhead_s * 1e3:.2f} ms per load")


def fit_load(fmt: WeightDType, cold: bool, samples: list[tuple[int, float]]) -> LoadFit:
    """seconds = overhead + bytes / rate, fitted to the median seconds per size of ``samples`` (bytes, s).

    Least squares on *relative* errors (every size counts alike, not just the largest file), with the
    overhead and 1/rate bounded to >= 0: ``scipy.optimize.lsq_linear``.
    """
    by_size: dict[int, list[float]] = {}
    for b, t in samples:
        by_size.setdefault(b, []).append(t)
    points = tuple(sorted((b, statistics.median(ts)) for b, ts in by_size.items()))
    xs = np.array([p[0] for p in points], dtype=float) / 1e6  # MB: keeps both unknowns near 1e-3
    ys = np.array([p[1] for p in points], dtype=float)
    a = np.stack([1.0 / ys, xs / ys], axis=1)
    fit = optimize.lsq_linear(a, np.ones_like(ys), bounds=(0.0, np.inf))
    overhead, s_per_mb = (float(v) for v in fit.x)
    if len(points) < 2 or not s_per_mb > 0:  # cannot separate the two: all time is transfer
        return LoadFit(fmt, cold, float(xs.sum() * 1e6 / ys.sum()), 0.0, points)
    return LoadFit(fmt, cold, 1e6 / s_per_mb, overhead, points)


# ------------------------------------------------------------------------------------------------ loading


class _Stack(nn.Module):
    def __init__(self, width: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(layers))


Blocks = dict[str, ManagedBlock]


def _test_blocks(root: Path, settings: ProfileSettings, fmt: WeightDType, extra: int) -> Blocks:
    """One block per size (plus ``extra`` more of the largest size) in a store of format ``fmt``."""
    layer_bytes = settings.layer_width**2 * 4
    sizes = list(settings.sizes) + [settings.sizes[-1]] * extra
    sources = []
    for i, size in enumerate(sizes):
        with torch.device("meta"):
            model = _Stack(settings.layer_width, max(1, size // layer_bytes))
        sources.append(BlockSource(f"host.b{i}", "host", model, Piece(f"b{i}", ("layers",), lambda c: c)))
    store = BlockStore.open(prepare_blocks(sources, root / fmt, preset="hostprofile", dtype=fmt))
    return {s.block_id: ManagedBlock(s.block_id, s.model, s.piece, store) for s in sources}  # type: ignore[arg-type]


def _timed_load(block: ManagedBlock, cold: bool) -> float:
    t0 = time.perf_counter()
    block.load(cold=cold)
    dt = time.perf_counter() - t0
    block.unload()
    return dt


def _measure_loads(blocks: Blocks, settings: ProfileSettings, cold: bool) -> list[tuple[int, float]]:
    ids = list(blocks)[: len(settings.sizes)]
    if not cold:
        for bid in ids:  # fault every file in once
            _timed_load(blocks[bid], cold=False)
    samples = []
    for _ in range(settings.repeats):
        for bid in ids:  # interleave sizes so drift spreads over all of them
            samples.append((blocks[bid].file_bytes, _timed_load(blocks[bid], cold)))
    return samples


def _concurrent_rate(blocks: list[ManagedBlock], overhead: float, repeats: int) -> float:
    """Aggregate bytes/s of len(blocks) threads each loading one block cold at the same time."""
    def work(b: ManagedBlock, barrier: threading.Barrier) -> None:
        barrier.wait()
        b.load(cold=True)

    rates = []
    for _ in range(repeats):
        barrier = threading.Barrier(len(blocks) + 1)
        threads = [threading.Thread(target=work, args=(b, barrier)) for b in blocks]
        for t in threads:
            t.start()
        barrier.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        for b in blocks:
            b.unload()
        rates.append(sum(b.file_bytes for b in blocks) / max(wall - overhead, 1e-9))
    return statistics.median(rates)


# ------------------------------------------------------------------------------------------------ compute


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _linear_seconds(x: torch.Tensor, w: torch.Tensor, repeats: int) -> list[float]:
    with torch.no_grad():
        for _ in range(2):
            F.linear(x, w)
        _sync(x.device)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            F.linear(x, w)
            _sync(x.device)
            times.append(time.perf_counter() - t0)
    return times


def matmul_rates(n: int, repeats: int, device: torch.device) -> dict[str, float]:
    """FLOP/s of an [n, n] x [n, n] linear: ``fp32``, ``fp16``/``int8`` weights as the host runtime holds them
    (fp32 after conversion / dequantisation), and ``bf16`` native."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, n, generator=gen)
    w = torch.randn(n, n, generator=gen) / n**0.5
    weights = {
        "fp32": w,
        "fp16": w.to(torch.float16).to(torch.float32),
        "int8": dequantize_int8(*quantize_int8(w)),
    }
    flops = 2 * n**3
    rates = {}
    for name, weight in weights.items():
        rates[name] = flops / statistics.median(_linear_seconds(x.to(device), weight.to(device), repeats))
    xb, wb = x.to(device, torch.bfloat16), w.to(device, torch.bfloat16)
    rates["bf16"] = flops / statistics.median(_linear_seconds(xb, wb, repeats))
    return rates


def dispatch_overhead_s(calls: int, device: torch.device) -> float:
    """Median round trip of a tiny linear through a worker thread's queue (the executor's hand-off)."""
    inbox: queue.Queue = queue.Queue()
    outbox: queue.Queue = queue.Queue()
    x, w = torch.ones(1, 8, device=device), torch.ones(8, 8, device=device)

    def worker() -> None:
        while (job := inbox.get()) is not None:
            y = F.linear(job, w)
            _sync(device)
            outbox.put(y)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        inbox.put(x)
        outbox.get()
        times.append(time.perf_counter() - t0)
    inbox.put(None)
    thread.join()
    return statistics.median(times)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def estimate_cpu_peak() -> tuple[float, str]:
    """(peak fp32 FLOP/s, how it was estimated): cores torch uses x clock x FLOP/cycle of the vector ISA."""
    cores = torch.get_num_threads()
    ghz = 0.0
    flags = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        mhz = [float(line.split(":")[1]) for line in text.splitlines() if line.startswith("cpu MHz")]
        ghz = max(mhz) / 1e3 if mhz else 0.0
        flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
    except OSError:
        pass
    freq = psutil.cpu_freq() if hasattr(psutil, "cpu_freq") else None
    if freq is not None:
        ghz = max(ghz, (freq.max or 0) / 1e3, (freq.current or 0) / 1e3)
    ghz = ghz or 3.0
    words = set(flags.split())
    if "avx512f" in words:
        per_cycle, isa = 64, "AVX-512"
    elif {"avx2", "fma"} <= words:
        per_cycle, isa = 32, "AVX2+FMA"
    elif "avx" in words:
        per_cycle, isa = 16, "AVX"
    elif platform.machine() in ("arm64", "aarch64"):
        per_cycle, isa = 32, "NEON"
    else:
        per_cycle, isa = 8, "SSE"
    peak = cores * ghz * 1e9 * per_cycle
    return peak, f"{cores} cores x {ghz:.2f} GHz x {per_cycle} FLOP/cycle ({isa})"


def _accelerator() -> torch.device | None:
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return None


# --------------------------------------------------------------------------------------------- contention


def _contention(
    blocks: list[ManagedBlock], settings: ProfileSettings, load_alone: float
) -> tuple[float, float]:
    """(load slowdown, compute slowdown) while a loader thread and matmuls run at the same time."""
    n = settings.matmul_n
    x, w = torch.randn(n, n), torch.randn(n, n)
    alone = statistics.median(_linear_seconds(x, w, settings.matmul_repeats))
    stop = threading.Event()
    loads: list[float] = []

    def loader() -> None:
        i = 0
        while not stop.is_set():
            loads.append(_timed_load(blocks[i % len(blocks)], cold=True))
            i += 1

    thread = threading.Thread(target=loader, daemon=True)
    thread.start()
    overlapped: list[float] = []
    t_end = time.perf_counter() + settings.contention_s
    while time.perf_counter() < t_end or (len(loads) < 2 and time.perf_counter() < t_end + 30):
        overlapped += _linear_seconds(x, w, 1)
    stop.set()
    thread.join()
    load_during = statistics.median(loads[:-1] or loads)  # the last load may have run alone
    return max(1.0, load_during / load_alone), max(1.0, statistics.median(overlapped) / alone)


# --------------------------------------------------------------------------------------------------- main


def profile_host(
    *,
    quick: bool = False,
    workdir: str | Path | None = None,
    name: str = "host",
    progress: Progress | None = None,
) -> DeviceProfile:
    """Measure this machine (see the module docstring). ``workdir``: where the test block files go -- the
    storage you will load from (default: a temporary directory); it is removed afterwards."""
    settings = QUICK if quick else FULL
    steps = ["write test blocks", "cold loads", "warm loads", "loads per format", "two loader threads",
             "matmul", "dispatch", "contention"]
    root = Path(tempfile.mkdtemp(prefix="cidl-profile-", dir=workdir))

    def step(i: int) -> None:
        if progress:
            progress(steps[i] if i < len(steps) else "done", i, len(steps))

    try:
        step(0)
        stores = {fmt: _test_blocks(root, settings, fmt, extra=2 if fmt == "fp32" else 0) for fmt in FORMATS}
        step(1)
        fits = {("fp32", True): fit_load("fp32", True, _measure_loads(stores["fp32"], settings, cold=True))}
        step(2)
        fits["fp32", False] = fit_load("fp32", False, _measure_loads(stores["fp32"], settings, cold=False))
        step(3)
        for fmt in ("fp16", "int8"):
            fits[fmt, True] = fit_load(fmt, True, _measure_loads(stores[fmt], settings, cold=True))
        cold32 = fits["fp32", True]
        step(4)
        pair = list(stores["fp32"].values())[-2:]
        aggregate = _concurrent_rate(pair, cold32.overhead_s, settings.repeats)
        max_total = max(aggregate, cold32.bytes_per_s)
        step(5)
        rates = matmul_rates(settings.matmul_n, settings.matmul_repeats, torch.device("cpu"))
        step(6)
        dispatch = dispatch_overhead_s(settings.dispatch_calls, torch.device("cpu"))
        step(7)
        largest = pair[0].file_bytes
        load_alone = statistics.median(
            t for b, t in _measure_loads({"x": pair[0]}, settings, cold=True) if b == largest)
        load_slow, compute_slow = _contention(pair, settings, load_alone)
        accel = _accelerator()
        accel_rates = matmul_rates(settings.matmul_n, settings.matmul_repeats, accel) if accel else None
        accel_dispatch = dispatch_overhead_s(settings.dispatch_calls, accel) if accel else None
        step(len(steps))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    est_peak, how = estimate_cpu_peak()
    used = ("fp32", "fp16", "int8")
    peak = max(est_peak, *(rates[k] for k in used))
    cpu = ComputeUnit(peak_flops=peak, efficiency={k: rates[k] / peak for k in used},
                      dispatch_overhead_s=dispatch)
    units = {"cpu": cpu}
    if accel is not None and accel_rates is not None and accel_dispatch is not None:
        apeak = max(accel_rates.values())
        units["gpu"] = ComputeUnit(peak_flops=apeak, efficiency={k: accel_rates[k] / apeak for k in used},
                                   dispatch_overhead_s=accel_dispatch)
        gpu_note = f"gpu = {accel.type} (peak = its best measured matmul rate)."
    else:
        units["gpu"] = cpu
        gpu_note = ("No CUDA/MPS: the gpu unit is the CPU's torch kernels again (the host runtime runs every "
                    "queue on the CPU), so policies that prefer gpu run here.")
    mem = psutil.virtual_memory()
    bytes_per_s = {fmt: fits[fmt, True].bytes_per_s for fmt in FORMATS}
    fitted_to = [fit.describe() for fit in fits.values()]
    fitted_to += [
        f"2 loader threads at once: {format_size(aggregate)}/s in all",
        *(f"matmul {k} n={settings.matmul_n}: {rates[k] / 1e9:.1f} GFLOP/s"
          + (" (native bf16; not used, the host runtime computes in fp32)" if k == "bf16" else "")
          for k in ("fp32", "fp16", "int8", "bf16")),
        f"cpu peak estimate {est_peak / 1e9:.1f} GFLOP/s = {how}",
        f"dispatch round trip through a worker thread: {dispatch * 1e6:.1f} us",
        f"contention: loads x{load_slow:.2f}, matmul x{compute_slow:.2f} while overlapped",
        f"memory: {format_size(mem.total)} total, {format_size(mem.available)} available",
    ]
    residuals: dict[str, float] = {}
    for fit in fits.values():
        residuals.update(fit.residuals())
    return DeviceProfile(
        name=name,
        description=(f"This host, measured by `cidl profile host{' --quick' if quick else ''}`: "
                     f"{_cpu_model()}, "
                     f"torch {torch.__version__} with {torch.get_num_threads()} threads. {gpu_note}"),
        memory=MemorySpec(total_bytes=mem.total, app_budget_bytes=min(mem.available, mem.total)),
        loading=LoadingSpec(
            per_load_overhead_s=cold32.overhead_s,
            bytes_per_s=bytes_per_s,
            max_total_bytes_per_s=max_total,
            loader_threads=2 if aggregate > 1.15 * cold32.bytes_per_s else 1,
        ),
        units=units,
        contention=Contention(load_slowdown=load_slow, compute_slowdown=compute_slow),
        calibration=Calibration(
            calibrated=True,
            fitted_to=fitted_to,
            method="measured on this host: linear fits (scipy.optimize.lsq_linear, relative errors) of "
                   "cold block-load seconds vs stored bytes per format; matmul timings; concurrent runs "
                   "for threads and contention",
            residuals=residuals,
            source=f"cidl profile host on {platform.node() or 'this host'}",
        ),
    )
