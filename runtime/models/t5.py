"""T5 v1.1 XXL encoder (Open-Sora's text encoder) as ``transformers.T5EncoderModel``, and its cut into blocks.

The architecture is transformers' own, built from a ``T5Config``; only the weights are ours (seeded, since the
released ``DeepFloyd/t5-v1_1-xxl`` weights cannot be downloaded here). ``load_checkpoint`` takes a released
state dict. The cut is On-device Sora's: ``embed``, one piece per encoder block (or ``layers_per_block``
blocks), and ``final_norm``. Only encoder block 0 holds the relative-attention-bias table, so the piece
holding block 0 computes the position bias, adds the padding mask to it, and carries it in ``position_bias``
to every later block — as On-device Sora's block 0 output did. Every piece runs on the ``meta`` device (no
``.item()``, no data-dependent branches).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import T5Config, T5EncoderModel

from cidl.runtime.models.checkpoint import load_strict, read_state_dict
from cidl.runtime.models.piece import Carry, Piece

# google/t5-v1_1-xxl config.json (the encoder DeepFloyd/t5-v1_1-xxl ships); small/tiny keep the structure and
# shrink widths/depth. d_model must equal STDiT's caption channels of the same preset (4096 / 512 / 256).
T5_PRESETS: dict[str, dict[str, Any]] = {
    "full": dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64),
    # ~32.4M parameters (~130 MB fp32): 8 blocks to schedule, a vocabulary cut to keep the store small.
    "small": dict(vocab_size=16384, d_model=512, d_kv=64, d_ff=1280, num_layers=8, num_heads=8),
    "tiny": dict(vocab_size=1024, d_model=256, d_kv=64, d_ff=640, num_layers=2, num_heads=4),
}

# Open-Sora pads/truncates prompts to 300 tokens for STDiT3 (model_max_length=300).
T5_TEXT_TOKENS = 300


def t5_config(preset: str) -> T5Config:
    """The ``T5Config`` of a preset (``full`` = T5 v1.1 XXL: gated-GELU, RMSNorm, no biases, 32 buckets)."""
    if preset not in T5_PRESETS:
        raise ValueError(f"t5 preset: expected one of {sorted(T5_PRESETS)}, got {preset!r}")
    return T5Config(
        **T5_PRESETS[preset],
        num_decoder_layers=T5_PRESETS[preset]["num_layers"],
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.1,
        layer_norm_epsilon=1e-6,
        initializer_factor=1.0,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        # Eager attention adds the carried bias explicitly, like the Core ML graphs On-device Sora exported.
        attn_implementation="eager",
    )


def build_t5(
    preset: str, *, seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> T5EncoderModel:
    """A T5 encoder of ``preset`` in eval mode with deterministic weights from ``seed``.

    On ``device="meta"`` nothing is allocated (use it to describe ``full``). The global RNG is left untouched.
    """
    config = t5_config(preset)
    if torch.device(device).type == "meta":
        with torch.device("meta"):
            model = T5EncoderModel(config)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = T5EncoderModel(config)
        model = model.to(device)
    return model.to(dtype).eval()


def load_checkpoint(model: T5EncoderModel, path: str | Path) -> None:
    """Load a released encoder state dict (``.safetensors`` or a torch pickle) strictly.

    The tied embedding may be stored under ``shared.weight``, ``encoder.embed_tokens.weight`` or both; a full
    T5 checkpoint's ``decoder.*`` / ``lm_head.*`` keys are dropped (as ``T5EncoderModel.from_pretrained``).
    """
    state = {k: v for k, v in read_state_dict(path).items() if not k.startswith(("decoder.", "lm_head."))}
    for a, b in (
        ("shared.weight", "encoder.embed_tokens.weight"),
        ("encoder.embed_tokens.weight", "shared.weight"),
    ):
        if a in state and b not in state:
            state[b] = state[a]
    load_strict(model, state, path, "T5 encoder")
    model.tie_weights()  # a load onto meta assigns both names separately: make them one Parameter again


def t5_inputs(
    config: T5Config,
    *,
    batch: int,
    tokens: int = T5_TEXT_TOKENS,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> Carry:
    """An example input carry: ``input_ids`` [B, L] (int64) and ``attention_mask`` [B, L] (int64, 1 = token).

    Row b keeps ``tokens - b * tokens // (2 * batch)`` tokens and pads the rest (id 0): masks differ per row.
    """
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, config.vocab_size, (batch, tokens), generator=gen)
    lengths = torch.tensor([tokens - b * tokens // (2 * batch) for b in range(batch)])
    mask = (torch.arange(tokens)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def _extended_bias(model: T5EncoderModel, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Block 0's relative position bias [1, H, L, L] + additive padding mask [B, 1, 1, L] -> [B, H, L, L]."""
    length = hidden.shape[1]
    attn = model.encoder.block[0].layer[0].SelfAttention
    bias = attn.compute_bias(length, length, device=hidden.device).to(hidden.dtype)
    keep = attention_mask[:, None, None, :].to(hidden.dtype)
    return bias + (1.0 - keep) * torch.finfo(hidden.dtype).min


def split_t5(model: T5EncoderModel, layers_per_block: int = 1) -> list[Piece]:
    """On-device Sora's cut: ``embed``, ``block00``.. (``layers_per_block`` encoder blocks each), then
    ``final_norm``.

    Carries: in ``{"input_ids": [B, L] int64, "attention_mask": [B, L]}``; between blocks
    ``{"hidden": [B, L, D], "position_bias": [B, H, L, L] (relative bias + padding mask), "attention_mask"}``;
    out ``{"text": [B, L, D], "mask": [B, L]}``.
    """
    n_layers = len(model.encoder.block)
    if layers_per_block < 1:
        raise ValueError(f"layers_per_block: expected >= 1, got {layers_per_block}")

    def embed(carry: Carry) -> Carry:
        hidden = model.encoder.dropout(model.shared(carry["input_ids"]))
        return {"hidden": hidden, "attention_mask": carry["attention_mask"]}

    def blocks(indices: range) -> Any:
        def forward(carry: Carry) -> Carry:
            hidden = carry["hidden"]
            # Only block 0 owns the bias table: it computes the bias once for all blocks after it.
            bias = _extended_bias(model, hidden, carry["attention_mask"]) if indices.start == 0 else None
            bias = carry["position_bias"] if bias is None else bias
            for i in indices:
                hidden = model.encoder.block[i](hidden, attention_mask=None, position_bias=bias)[0]
            return {"hidden": hidden, "position_bias": bias, "attention_mask": carry["attention_mask"]}

        return forward

    def final_norm(carry: Carry) -> Carry:
        text = model.encoder.dropout(model.encoder.final_layer_norm(carry["hidden"]))
        return {"text": text, "mask": carry["attention_mask"]}

    pieces = [Piece("embed", ("shared", "encoder.embed_tokens"), embed)]
    for n, start in enumerate(range(0, n_layers, layers_per_block)):
        idx = range(start, min(start + layers_per_block, n_layers))
        pieces.append(Piece(f"block{n:02d}", tuple(f"encoder.block.{i}" for i in idx), blocks(idx)))
    pieces.append(Piece("final_norm", ("encoder.final_layer_norm", "encoder.dropout"), final_norm))
    return pieces
