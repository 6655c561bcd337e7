"""The pipeline's models as one ordered block list, and the seeded weights the block store writes.

``pipeline_blocks(preset, device)`` builds T5, STDiT3 and the VAE decoders and returns
``{block_id: (model, piece)}`` in pipeline order, with ``block_id = f"{model}.{piece.name}"`` and model one
of ``t5``, ``stdit``, ``vae_temporal``, ``vae_2d`` (as in ``cidl.scheduler.pipeline``). Both VAE block lists
belong to one ``OpenSoraVAE`` instance.

Seeded weights (what ``cidl prepare`` writes): every state-dict entry gets values drawn from its own
generator, seeded from ``sha256(f"{seed}/{model}/{key}")``, so a block is written without materialising
anything else and the values do not depend on how the models are cut. This is deliberately *not* what
``build_*(preset, seed)`` gives (those draw the whole model from one stream, which needs the whole model in
memory: 19 GB for T5 XXL); an unpartitioned reference model is assembled from the store instead
(``cidl.runtime.blocks.load_reference_models``).
Rules, by entry: constants the architecture fixes (RoPE frequencies, the VAE's latent shift/scale) get their
exact values; Linear/Conv/Embedding weights N(0, 1/fan_in), STDiT's residual output projections further
scaled by 1/sqrt(2*depth) (as its own init does, so the residual stream stays O(1)); 1-D weights (norms)
1 + N(0, 0.02^2); biases N(0, 0.02^2); any other float entry (adaLN tables, the null caption)
N(0, 1/last_dim).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from cidl.runtime.models.piece import Piece

MODELS: tuple[str, ...] = ("t5", "stdit", "vae_temporal", "vae_2d")
Blocks = dict[str, tuple[nn.Module, Piece]]
# Blocks per model as the cost model cuts them (cidl.runtime.inventory builds the same cut).
T5_LAYERS_PER_BLOCK = 1
STDIT_LAYERS_PER_BLOCK = 1
_STDIT_RESIDUAL_OUT = ("attn.proj.weight", "cross_attn.proj.weight", "mlp.fc2.weight")


def pipeline_blocks(preset: str, device: str | torch.device = "meta", *, seed: int = 0) -> Blocks:
    """Every block of ``preset``'s pipeline in order: ``{block_id: (model, piece)}``.

    On ``meta`` (the default) nothing is allocated: the block store and managed blocks fill the weights in.
    On another device the models carry ``build_*``'s own seeded weights (``seed``), which differ from the
    store's.
    """
    from cidl.runtime.models.stdit3 import build_stdit3, split_stdit3
    from cidl.runtime.models.t5 import build_t5, split_t5
    from cidl.runtime.models.vae import build_vae, split_vae_2d, split_vae_temporal

    t5 = build_t5(preset, seed=seed, device=device)
    stdit = build_stdit3(preset, seed=seed, device=device)
    vae = build_vae(preset, seed=seed, device=device)
    for m in (t5, stdit, vae):
        m.eval().requires_grad_(False)
    out: Blocks = {}
    for name, model, pieces in (
        ("t5", t5, split_t5(t5, T5_LAYERS_PER_BLOCK)),
        ("stdit", stdit, split_stdit3(stdit, STDIT_LAYERS_PER_BLOCK)),
        ("vae_temporal", vae, split_vae_temporal(vae)),
        ("vae_2d", vae, split_vae_2d(vae)),
    ):
        for piece in pieces:
            out[f"{name}.{piece.name}"] = (model, piece)
    return out


def model_of(block_id: str) -> str:
    """``"stdit.block03"`` -> ``"stdit"``; raises ValueError for an id outside the pipeline's models."""
    model = block_id.partition(".")[0]
    if model not in MODELS or "." not in block_id:
        raise ValueError(f"block id {block_id!r}: expected '<model>.<piece>', model in {', '.join(MODELS)}")
    return model


def block_entries(model: nn.Module, piece: Piece) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The block's state-dict entries (on whatever device the model is) without tied duplicates, and the
    aliases: ``{alias_key: stored_key}`` for entries that share a tensor with an earlier one (T5's
    ``encoder.embed_tokens.weight`` is ``shared.weight``)."""
    sd = model.state_dict(keep_vars=True)
    stored: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[int, str] = {}
    for key in piece.param_names(model):
        tensor = sd[key]
        first = seen.get(id(tensor))
        if first is not None:
            aliases[key] = first
            continue
        seen[id(tensor)] = key
        stored[key] = tensor
    return stored, aliases


def _key_seed(seed: int, model: str, key: str) -> int:
    digest = hashlib.sha256(f"{seed}/{model}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _fixed_values(model_name: str, model: nn.Module) -> dict[str, Callable[[], Tensor]]:
    """Entries whose values the architecture fixes (not learned from a random start)."""
    if model_name == "stdit":
        from cidl.runtime.models.stdit3 import rope_frequencies

        return {"rope.freqs": lambda: rope_frequencies(model.config.head_dim)}
    if model_name in ("vae_temporal", "vae_2d"):
        from cidl.runtime.models.vae import SCALE, SHIFT

        return {
            "scale": lambda: torch.tensor(SCALE)[None, :, None, None, None],
            "shift": lambda: torch.tensor(SHIFT)[None, :, None, None, None],
        }
    return {}


def seeded_tensor(model_name: str, model: nn.Module, key: str, shape: tuple[int, ...], seed: int) -> Tensor:
    """The store's fp32 value of ``model``'s entry ``key`` (see the module docstring), on CPU."""
    fixed = _fixed_values(model_name, model).get(key)
    if fixed is not None:
        value = fixed().to(torch.float32)
        if tuple(value.shape) != shape:
            raise ValueError(f"{model_name}: fixed {key} has shape {tuple(value.shape)}, expected {shape}")
        return value
    gen = torch.Generator().manual_seed(_key_seed(seed, model_name, key))
    noise = torch.randn(shape, generator=gen, dtype=torch.float32)
    leaf = key.rpartition(".")[2]
    if leaf == "bias":
        return noise.mul_(0.02)
    if leaf == "weight" and len(shape) == 1:
        return noise.mul_(0.02).add_(1.0)
    if leaf == "weight":
        std = math.prod(shape[1:]) ** -0.5
        if model_name == "stdit" and key.endswith(_STDIT_RESIDUAL_OUT):
            std *= (2 * model.config.depth) ** -0.5
        return noise.mul_(std)
    return noise.mul_(shape[-1] ** -0.5 if shape else 1.0)
