"""Reading a released checkpoint and loading it strictly: the one loader every model uses.

Each model only maps keys (T5's tied embedding, the VAE's unused encoders); reading the file, unwrapping
training-time nesting, and turning every mismatch into one line that names the file happen here.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A ``.safetensors`` file, or a torch pickle that may nest the weights under ``state_dict``/``model``/
    ``module`` and prefix keys with ``module.`` (DDP)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    elif path.suffix in SUFFIXES:
        state = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model", "module"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    else:
        raise ValueError(f"{path}: expected a {'/'.join(SUFFIXES)} checkpoint, got {path.suffix!r}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_strict(model: nn.Module, state: dict[str, Tensor], path: str | Path, what: str) -> None:
    """``load_state_dict(strict=True)``, assigning tensors when the model is on ``meta``; missing or unexpected
    keys and shape mismatches raise one ValueError naming ``path``."""
    where = f"{path}: not a {what} checkpoint"
    expected = set(model.state_dict().keys())
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"{where}: missing keys {missing[:5]} ({len(missing)}), "
                         f"unexpected keys {unexpected[:5]} ({len(unexpected)})")
    on_meta = any(p.is_meta for p in model.parameters())
    try:
        model.load_state_dict(state, strict=True, assign=on_meta)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"{where}: {' '.join(str(err).split())}") from err
