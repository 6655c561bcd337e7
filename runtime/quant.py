"""int8 weights: symmetric per-output-channel quantisation, and its inverse for host kernels.

A weight ``w`` of shape ``[out, ...]`` is stored as ``q = round(w / s)`` clamped to [-127, 127] (int8, same
shape) plus one fp32 scale per output channel ``s = max|w[o]| / 127`` (a channel of zeros gets ``s = 1``).
Dequantisation is ``q * s`` broadcast over the output channel. Which tensors are quantised is decided by
:func:`is_quantized`; everything else is stored unquantised in fp32. A block file's tensor bytes under this
rule equal the cost model's ``weight_bytes["int8"]`` (``cidl.runtime.measure``), which a test checks.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

QUANT_MIN_ELEMENTS = 2048  # smaller tensors (norms, biases, tiny convs) stay fp32: no saving worth the error
SCALE_SUFFIX = ".scale"  # the scale of ``key`` is stored under ``key + SCALE_SUFFIX``
SCALE_DTYPE = torch.float32
_QUANTIZED_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_quantized(model: nn.Module, key: str, shape: tuple[int, ...]) -> bool:
    """Whether ``model``'s state-dict entry ``key`` is stored as int8: the ``weight`` of a Linear or Conv
    with at least ``QUANT_MIN_ELEMENTS`` elements. Works on a model built on ``meta``."""
    module_name, _, leaf = key.rpartition(".")
    if leaf != "weight" or len(shape) < 2:
        return False
    numel = 1
    for d in shape:
        numel *= d
    if numel < QUANT_MIN_ELEMENTS:
        return False
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return False
    return isinstance(module, _QUANTIZED_MODULES)


def quantized_bytes(shape: tuple[int, ...]) -> int:
    """Stored bytes of an int8-quantised tensor: a byte per element plus an fp32 scale per output channel."""
    numel = 1
    for d in shape:
        numel *= d
    return numel + shape[0] * SCALE_DTYPE.itemsize


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """``weight [out, ...]`` (any float dtype) -> ``(q int8 [out, ...], scale fp32 [out])``."""
    if weight.dim() < 2:
        raise ValueError(f"quantize_int8: expected a weight with >= 2 dims, got shape {tuple(weight.shape)}")
    w = weight.detach().to(torch.float32).flatten(1)
    # max|w| per channel without an |w| copy: full-size weights are hundreds of MB.
    amax = torch.maximum(w.amax(dim=1), w.amin(dim=1).neg())
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = (w / scale[:, None]).round_().clamp_(-127, 127).to(torch.int8).view(weight.shape)
    return q, scale.to(SCALE_DTYPE)


def dequantize_int8(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The inverse of :func:`quantize_int8` (up to rounding): ``q * scale`` in ``dtype``, a fresh tensor."""
    if q.dtype != torch.int8 or scale.dim() != 1 or scale.shape[0] != q.shape[0]:
        raise ValueError(
            f"dequantize_int8: expected int8 [out, ...] and a scale [out], got {q.dtype} {tuple(q.shape)} "
            f"and {tuple(scale.shape)}"
        )
    view = (-1,) + (1,) * (q.dim() - 1)
    out = q.to(dtype)
    out.mul_(scale.to(dtype).view(view))
    return out


def dequantize_state(tensors: dict[str, Tensor], dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """A block file's tensors -> model keys: every ``key`` with a ``key.scale`` beside it is dequantised to
    ``dtype``; the scale entries are dropped; other tensors are returned as they are."""
    out: dict[str, Tensor] = {}
    for key, value in tensors.items():
        if key.endswith(SCALE_SUFFIX) and key[: -len(SCALE_SUFFIX)] in tensors:
            continue
        scale = tensors.get(key + SCALE_SUFFIX)
        quantized = scale is not None and value.dtype == torch.int8
        out[key] = dequantize_int8(value, scale, dtype) if quantized else value
    return out
