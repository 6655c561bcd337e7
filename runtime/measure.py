"""Measure every piece of a partitioned model at one shape: FLOPs, live bytes op by op, weight bytes.

Runs on any device; on ``meta`` nothing is allocated, so the full-size models are measured for free.

**FLOPs** are ``torch.utils.flop_counter.FlopCounterMode``'s count (matmuls, convolutions, attention; its
per-op formulas, applied in the dispatch mode that tracks live bytes, and checked against FlopCounterMode
itself), per piece, with the pieces run in sequence from the example carry (each piece's output carry
feeds the next).

**Working bytes** of a piece = the peak, over the ops its forward dispatches, of the bytes of the storages
*allocated by this piece* that are alive just after the op (an op's outputs count the moment it returns;
a storage stops counting when Python drops its last tensor). Storages that existed before the piece
started -- its weights and the input carry -- are not counted; the piece's output carry is (it is
allocated while the piece runs). Views share their base's storage and count once (dedupe by storage).
This is the quantity ``cidl.runtime.memtrack.LiveBytes`` measures on real data, and what the runtime
reserves while a block runs.

CPU branches: a few composite ops decompose differently per device. On ``meta``,
``scaled_dot_product_attention`` takes the math path (it materialises the attention matrix) while CPU runs
the fused ``_scaled_dot_product_flash_attention_for_cpu`` kernel; ``group_norm`` copies a channels-last input
to the default layout on meta but not on CPU. Measurements take the CPU's branch (``cpu_attention=True``,
the default), so the meta op sequence and live bytes are the CPU's (a test checks them op for op on every
tiny model); FlopCounterMode gets the fused kernel's formula (the count of the math path's two matmuls).

Not counted: scratch that a kernel allocates and frees inside one op (invisible to dispatch and absent on
meta). Matmuls and the fused attention allocate none worth counting (STDiT and T5 pieces are within ~1% of
the CPU allocator's peak), but CPU convolutions do: oneDNN reorders inputs, weights and outputs, and
``slow_conv3d`` (small 3D convolutions) unfolds its input 27x -- so the VAE pieces' allocator peak on this
CPU is up to ~2x their ``working_bytes`` at realistic sizes, more at tiny ones. That scratch depends on the
backend, the ISA and the shape; the phone's Core ML has its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch._prims_common import suggest_memory_format
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry, sdpa_flop_count, shape_wrapper

from cidl.runtime.memtrack import LiveBytes
from cidl.runtime.models.piece import Carry, Piece
from cidl.runtime.quant import is_quantized, quantized_bytes

_CPU_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


@dataclass(frozen=True)
class PieceMeasure:
    """One piece at one shape: FLOPs, peak live bytes, and the op sequence with live bytes after each op."""

    name: str
    flops: int
    working_bytes: int
    ops: tuple[str, ...]
    live: tuple[int, ...]


def _cpu_flash_flop(q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return sdpa_flop_count(q, k, v)


# FlopCounterMode's formulas (what it counts, per op), plus the fused CPU attention kernel.
_FLOP_FORMULAS = {**flop_registry, _CPU_FLASH: shape_wrapper(_cpu_flash_flop)}


def _sdpa_as_cpu(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """What ``F.scaled_dot_product_attention`` dispatches on CPU for 4-D fp32 inputs: a boolean mask becomes
    an additive one (two scalars and a ``where``, as ATen's ``convert_boolean_attn_mask``), then the fused
    kernel."""
    if enable_gqa:
        raise NotImplementedError("measure: grouped-query attention is not emulated")
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        zero = torch.scalar_tensor(0.0, dtype=query.dtype, device=query.device)
        ninf = torch.scalar_tensor(-math.inf, dtype=query.dtype, device=query.device)
        attn_mask = torch.where(attn_mask, zero, ninf)
    return _CPU_FLASH(query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]


def _group_norm_as_cpu(
    input: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """ATen's ``group_norm`` on CPU: the input is made contiguous *in its suggested memory format* (a
    channels-last input is not copied); other devices, meta included, copy it to the default format."""
    n, c = input.shape[:2]
    x = input.contiguous(memory_format=suggest_memory_format(input))
    gamma = weight.contiguous() if weight is not None else None
    beta = bias.contiguous() if bias is not None else None
    hxw = math.prod(input.shape[2:])
    return torch.ops.aten.native_group_norm(x, gamma, beta, n, c, hxw, num_groups, eps)[0]


class _AsOnCpu(TorchFunctionMode):
    """Composite ops whose decomposition depends on the device take the CPU's branch (see the module
    docstring): scaled-dot-product attention and group norm."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return _sdpa_as_cpu(*args, **kwargs)
        if func is F.group_norm:
            return _group_norm_as_cpu(*args, **kwargs)
        return func(*args, **kwargs)


class LiveTracker(LiveBytes):
    """LiveBytes that also records each dispatched op's name and the bytes alive after it, and counts FLOPs
    with FlopCounterMode's formulas (one dispatch mode instead of two: measuring is faster)."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0
        self.ops: list[str] = []
        self.live: list[int] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = _FLOP_FORMULAS.get(func.overloadpacket)
        if formula is not None:
            self.flops += int(formula(*args, **kwargs, out_val=out))
        self._account(out, args, kwargs)
        self.ops.append(func.overloadpacket.__name__)
        self.live.append(self.current)
        return out


@contextmanager
def _measuring(cpu_attention: bool) -> Iterator[None]:
    with torch.no_grad(), (_AsOnCpu() if cpu_attention else nullcontext()):
        yield


def measure_pieces(pieces: list[Piece], carry: Carry, *, cpu_attention: bool = True) -> list[PieceMeasure]:
    """Run ``pieces`` in order from ``carry`` and measure each one (see the module docstring).

    The carry is consumed: each piece's input is dropped once the next piece has its output.
    """
    out: list[PieceMeasure] = []
    with _measuring(cpu_attention):
        for piece in pieces:
            tracker = LiveTracker()
            with tracker:
                carry = piece(carry)
            out.append(PieceMeasure(
                name=piece.name,
                flops=tracker.flops,
                working_bytes=max(tracker.live, default=0),
                ops=tuple(tracker.ops),
                live=tuple(tracker.live),
            ))
    return out


def count_flops(pieces: list[Piece], carry: Carry) -> list[int]:
    """Plain FlopCounterMode per piece (no kernel substitution): the reference the cost model is checked on.
    On meta, attention takes the math path, whose two matmuls FlopCounterMode counts."""
    flops = []
    with torch.no_grad():
        for piece in pieces:
            counter = FlopCounterMode(display=False)
            with counter:
                carry = piece(carry)
            flops.append(int(counter.get_total_flops()))
    return flops


# ------------------------------------------------------------------------------------------------ weights


def piece_tensors(model: nn.Module, piece: Piece) -> dict[str, torch.Tensor]:
    """The state-dict entries a piece stores (parameters and persistent buffers), tied duplicates once."""
    sd = model.state_dict(keep_vars=True)
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for key in piece.param_names(model):
        t = sd[key]
        if id(t) in seen:
            continue
        seen.add(id(t))
        out[key] = t
    return out


def piece_params(model: nn.Module, piece: Piece) -> int:
    """Parameters (``nn.Parameter`` entries only, not buffers) a piece owns, tied ones once."""
    return sum(t.numel() for t in piece_tensors(model, piece).values() if isinstance(t, nn.Parameter))


def params_by_module(model: nn.Module, pieces: Sequence[Piece], root: str = "") -> dict[str, int]:
    """Parameters of the pieces grouped by the first module name below ``root`` (tied ones once)."""
    out: dict[str, int] = {}
    for piece in pieces:
        for key, t in piece_tensors(model, piece).items():
            if isinstance(t, nn.Parameter):
                name = key[len(root):].split(".")[0] if key.startswith(root) else key.split(".")[0]
                out[name] = out.get(name, 0) + t.numel()
    return out


def piece_weight_bytes(model: nn.Module, piece: Piece) -> dict[str, int]:
    """Stored bytes of a piece per weight format: ``fp32`` 4 and ``fp16`` 2 bytes per element; ``int8`` as the
    block store writes it (``cidl.runtime.quant``): int8 + one fp32 scale per output channel for Linear/Conv
    weights of >= 2048 elements, every other entry fp32."""
    fp32 = fp16 = int8 = 0
    for key, t in piece_tensors(model, piece).items():
        n = t.numel()
        fp32 += 4 * n
        fp16 += 2 * n
        shape = tuple(t.shape)
        int8 += quantized_bytes(shape) if is_quantized(model, key, shape) else 4 * n
    return {"fp32": fp32, "fp16": fp16, "int8": int8}


# ------------------------------------------------------------------------------------------------ real CPU


def cpu_allocator_peak(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn`` on CPU and return ``(its result, peak bytes the CPU allocator held above its level at the
    start)``: every allocation and free torch's allocator reported to ``torch.profiler`` while ``fn`` ran,
    kernel-internal scratch included. The real-data reference the meta measurements are checked against."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if type(node.extra_fields).__name__ == "_ExtraFields_Allocation":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    current = peak = 0
    for _, size in sorted(events, key=lambda e: e[0]):
        current += size
        peak = max(peak, current)
    return out, peak
