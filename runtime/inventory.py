"""Build the shipped cost model: every block of the real models measured on ``meta``, fitted exactly.

``python -m cidl.runtime.inventory`` regenerates ``scheduler/inventories/{tiny,small,full}.json``;
``python -m cidl.runtime.inventory check`` regenerates in memory and fails if a shipped file differs.

For each model (and STDiT's TDTM variant) the pieces run on the meta device
(:func:`cidl.runtime.measure.measure_pieces`) at a few small shapes, chosen so they identify the model's
monomial basis (``BASES``), plus held-out ones that include the realistic shape (STDiT at 256x256, 68 frames;
T5 at 300 tokens; the VAE at 256x256). :mod:`cidl.runtime.specfit` fits FLOPs per piece and live bytes after
every op as integer polynomials, takes the working bytes as the max of the per-op polynomials that peak
somewhere (``MaxPoly``), and verifies everything with integer equality on every measured shape.

The fits are exact where a model's op sequence does not change (``DOMAINS``): a size-1 dimension turns a few
copies into views. The workload stays inside (STDiT at the CFG batch 2, T5 at batch 1, ...); outside, FLOPs
stay exact and working bytes over-estimate by the copies that became views.

TDTM: odd T merges into ceil(T/2) frames with one extra op (the last frame on its own), so even and odd T
run different op sequences. Each parity is fitted in (B, S, M, L) with T = 2M - parity substituted, and the
two are joined as ``p_even + (2M - T) * (p_odd - p_even)``: exact for both parities.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import torch

from cidl.device_profiles.profile import Unit
from cidl.runtime.measure import (
    PieceMeasure,
    measure_pieces,
    params_by_module,
    piece_params,
    piece_weight_bytes,
)
from cidl.runtime.models.piece import Piece
from cidl.runtime.polyfit import IPoly, Mono, Shape, mono
from cidl.runtime.specfit import FittedExec, Group, Runner, Spec, choose_shapes, fit_spec
from cidl.scheduler.costmodel import (
    PRESETS,
    BlockCost,
    CostModel,
    ExecCost,
    ModelCost,
    ModelName,
    Variant,
    dump_cost_model,
    inventory_path,
)
from cidl.traces.io import atomic_write_bytes

MODEL_NAMES: tuple[ModelName, ...] = ("t5", "stdit", "vae_temporal", "vae_2d")
# Preferred compute unit per model (On-device Sora ran T5 and STDiT on .cpuAndGPU; the VAE mostly .cpuOnly,
# kept on "gpu" here so every shipped profile can run it -- change in one place if a profile wants "cpu").
UNITS: dict[ModelName, Unit] = {"t5": "gpu", "stdit": "gpu", "vae_temporal": "gpu", "vae_2d": "gpu"}


def _basis(*terms: str) -> tuple[Mono, ...]:
    return tuple(mono(t) for t in terms)


# Linear layers scale with tokens (B*S*T, B*L), spatial attention with B*T*S^2, temporal with B*S*T^2,
# cross-attention with B*S*T*L; tables (pos-embed S, RoPE T, text L) are batch-free. The VAE convolutions
# scale with latent pixels x frames; the temporal VAE pads every frame explicitly, so its live bytes also
# hold (H+2)(W+2) = P + 2H + 2W + 4 terms.
_STDIT = ("1", "S", "T", "L", "B", "B*L", "B*S", "B*T", "B*S*T", "B*S^2*T", "B*S*T^2", "B*S*T*L")
BASES: dict[str, tuple[Mono, ...]] = {
    "t5": _basis("1", "L", "L^2"),  # batch 1 only (see DOMAINS)
    "stdit": _basis(*_STDIT),
    "stdit-tdtm": _basis(*(t.replace("T", "M") for t in _STDIT)),  # one T parity: T = 2M - parity
    "vae_temporal": _basis("1", "B", "B*F", "B*P", "B*P*F", "B*H", "B*W", "B*H*F", "B*W*F"),
    "vae_2d": _basis("1", "B", "P", "B*P", "B*P^2"),
}
# Where each model's op sequence is the same at every shape, so the fits are exact: a size-1 dimension turns
# some copies into views (fewer live bytes; FLOPs unchanged). T5 runs at batch 1 only (one prompt; the CFG
# null caption is STDiT's learned one), so its polynomials have no B.
DOMAINS: dict[str, str] = {
    "t5": "B = 1, L >= 2",
    "stdit": "B >= 2, latent H, W >= 4, T >= 2 (TDTM: M >= 2)",
    "vae_temporal": "F >= 2",
    "vae_2d": "B >= 2",
}
_TDTM_SELECTOR: IPoly = {mono("M"): 2, mono("T"): -1}  # 2M - T: 0 for even T, 1 for odd T

# Realistic shapes the peak candidates are chosen on: Open-Sora's resolutions (and non-square ones) and frame
# counts. A candidate is kept if it is the largest at some such shape or at a measured one.
_RESOLUTIONS = ((128, 128), (192, 192), (256, 256), (256, 448), (448, 256), (384, 384), (512, 512),
                (512, 768), (720, 1280), (1024, 1024))
_LATENT_FRAMES = (1, 2, 3, 4, 5, 10, 15, 20, 30, 40, 60)


def stdit_shape(b: int, h: int, w: int, t: int, text_len: int) -> dict[str, int]:
    """Shape variables of one STDiT call on a latent of ``h`` x ``w`` (even) and ``t`` frames."""
    return {"B": b, "H": h, "W": w, "S": (h // 2) * (w // 2), "P": h * w, "T": t, "M": math.ceil(t / 2),
            "L": text_len}


def _vae_shape(b: int, h: int, w: int, f: int = 0) -> dict[str, int]:
    return {"B": b, "H": h, "W": w, "P": h * w, "F": f}


# ------------------------------------------------------------------------------------------------ models


@dataclass
class PresetModels:
    """The preset's models on ``meta`` (no memory) and their pieces; ``run`` measures one call."""

    preset: str
    t5_layers_per_block: int = 1
    stdit_layers_per_block: int = 1

    @cached_property
    def t5(self) -> Any:
        from cidl.runtime.models.t5 import build_t5

        return build_t5(self.preset, device="meta")

    @cached_property
    def stdit(self) -> Any:
        from cidl.runtime.models.stdit3 import build_stdit3

        return build_stdit3(self.preset, device="meta")

    @cached_property
    def vae(self) -> Any:
        from cidl.runtime.models.vae import build_vae

        return build_vae(self.preset, device="meta")

    @cached_property
    def text_len(self) -> int:
        """Text tokens the pipeline pads prompts to: STDiT's ``text_len`` (upstream's model_max_length)."""
        return self.stdit.config.text_len

    def model(self, name: ModelName) -> torch.nn.Module:
        return {"t5": self.t5, "stdit": self.stdit, "vae_temporal": self.vae, "vae_2d": self.vae}[name]

    def pieces(self, name: ModelName) -> list[Piece]:
        return self._pieces[name]

    @cached_property
    def _pieces(self) -> dict[str, list[Piece]]:
        from cidl.runtime.models.stdit3 import split_stdit3
        from cidl.runtime.models.t5 import split_t5
        from cidl.runtime.models.vae import split_vae_2d, split_vae_temporal

        return {
            "t5": split_t5(self.t5, self.t5_layers_per_block),
            "stdit": split_stdit3(self.stdit, self.stdit_layers_per_block),
            "vae_temporal": split_vae_temporal(self.vae),
            "vae_2d": split_vae_2d(self.vae),
        }

    def carry(self, name: ModelName, shape: Shape, variant: Variant = "default") -> dict[str, Any]:
        """The first piece's input carry on ``meta`` at ``shape``."""
        b = shape["B"]
        if name == "t5":
            from cidl.runtime.models.t5 import t5_inputs

            return t5_inputs(self.t5.config, batch=b, tokens=shape["L"], device="meta")
        if name == "stdit":
            from cidl.runtime.models.stdit3 import stdit3_inputs

            cfg = self.stdit.config
            carry = stdit3_inputs(cfg, batch=b, frames_latent=shape["T"], height_latent=shape["H"],
                                  width_latent=shape["W"], device="meta", tdtm=variant == "tdtm")
            text = shape["L"]  # any text length: the caption and its mask follow L, not the config's
            carry["y"] = torch.empty(b, 1, text, cfg.caption_channels, device="meta")
            keep = torch.tensor([max(1, text - i * text // 4) for i in range(b)])
            carry["mask"] = (torch.arange(text)[None, :] < keep[:, None]).to(torch.int64).to("meta")
            return carry
        from cidl.runtime.models.vae import vae_2d_inputs, vae_temporal_inputs

        h, w = 8 * shape["H"], 8 * shape["W"]
        if name == "vae_temporal":
            # 4F - 3 video frames have F latent frames (17 -> 5); the crop of the causal padding is a view.
            return vae_temporal_inputs(batch=b, height=h, width=w, num_frames=4 * shape["F"] - 3,
                                       device="meta")
        return vae_2d_inputs(frames=b, height=h, width=w, device="meta")

    def run(self, name: ModelName, shape: Shape, variant: Variant = "default") -> list[PieceMeasure]:
        return measure_pieces(self.pieces(name), self.carry(name, shape, variant))


# ------------------------------------------------------------------------------------------------ specs


def _specs(text_len: int) -> list[Spec]:
    specs: list[Spec] = []
    t5_grid = [{"B": 1, "L": n} for n in sorted({16, 77, 120, 300, 512, text_len})]
    specs.append(Spec("t5", "default", [Group(
        "all", BASES["t5"],
        *choose_shapes(BASES["t5"], lambda r: {"B": 1, "L": r.randint(2, 16)}, {"B": 1, "L": text_len},
                       seed=5),
        grid=t5_grid,
    )]))

    def stdit_grid(parity: int | None) -> list[dict[str, int]]:
        return [stdit_shape(b, rh // 8, rw // 8, t, n) for b in (2, 3) for rh, rw in _RESOLUTIONS
                for t in _LATENT_FRAMES for n in sorted({77, text_len})
                if t >= 2 and (parity is None or t % 2 == parity)]

    def stdit_draw(parity: int | None) -> Callable[[random.Random], dict[str, int]]:
        def draw(r: random.Random) -> dict[str, int]:
            t = r.randint(2, 6) if parity is None else 2 * r.randint(2, 5) - parity
            return stdit_shape(r.randint(2, 3), 2 * r.randint(2, 4), 2 * r.randint(2, 4), t, r.randint(2, 9))

        return draw

    specs.append(Spec("stdit", "default", [Group(
        "all", BASES["stdit"],
        *choose_shapes(BASES["stdit"], stdit_draw(None), stdit_shape(2, 32, 32, 20, text_len), seed=1),
        grid=stdit_grid(None),
    )]))
    specs.append(Spec("stdit", "tdtm", [
        Group("even-T", BASES["stdit-tdtm"],
              *choose_shapes(BASES["stdit-tdtm"], stdit_draw(0), stdit_shape(2, 32, 32, 20, text_len), 2),
              grid=stdit_grid(0)),
        Group("odd-T", BASES["stdit-tdtm"],
              *choose_shapes(BASES["stdit-tdtm"], stdit_draw(1), stdit_shape(2, 24, 24, 15, text_len), 3),
              grid=stdit_grid(1)),
    ], selector=_TDTM_SELECTOR))
    specs.append(Spec("vae_temporal", "default", [Group(
        "all", BASES["vae_temporal"],
        *choose_shapes(BASES["vae_temporal"],
                       lambda r: _vae_shape(r.randint(1, 2), r.randint(2, 6), r.randint(2, 6),
                                            r.randint(2, 5)),
                       _vae_shape(1, 32, 32, 5), seed=4),
        grid=[_vae_shape(1, rh // 8, rw // 8, f) for rh, rw in _RESOLUTIONS for f in range(2, 6)],
    )]))
    specs.append(Spec("vae_2d", "default", [Group(
        "all", BASES["vae_2d"],
        *choose_shapes(BASES["vae_2d"],
                       lambda r: _vae_shape(r.randint(2, 4), r.randint(2, 6), r.randint(2, 6)),
                       _vae_shape(4, 32, 32), seed=6),
        grid=[_vae_shape(b, rh // 8, rw // 8) for rh, rw in _RESOLUTIONS for b in range(2, 5)],
    )]))
    return specs


# ------------------------------------------------------------------------------------------------ cost model


def build_cost_model(preset: str, *, layers_per_block: int = 1,
                     log: Callable[[str], None] | None = None) -> CostModel:
    """Measure and fit every block of ``preset`` (``tiny``, ``small``, ``full``) on meta; verified exactly.

    ``layers_per_block`` groups T5 encoder layers and STDiT spatial+temporal pairs per block (1 = the cut the
    shipped inventories and the block store use)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r} (expected one of {', '.join(PRESETS)})")
    if layers_per_block < 1:
        raise ValueError(f"layers_per_block={layers_per_block}: expected >= 1")
    models = PresetModels(preset, layers_per_block, layers_per_block)
    text_len = models.text_len
    execs: dict[tuple[str, str], list[FittedExec]] = {}
    verified = 0
    for spec in _specs(text_len):
        t0 = time.perf_counter()
        run: Runner = partial(models.run, spec.model, variant=spec.variant)
        execs[(spec.model, spec.variant)], n = fit_spec(run, spec, preset)
        verified += n
        if log:
            log(f"{preset} {spec.model} ({spec.variant}): {len(execs[(spec.model, spec.variant)])} blocks, "
                f"{n} held-out shapes exact, {time.perf_counter() - t0:.1f} s")
    cfg_t5, cfg_st = models.t5.config, models.stdit.config
    dims: dict[ModelName, dict[str, int]] = {
        "t5": {"d_model": cfg_t5.d_model, "text_len": text_len, "layers": cfg_t5.num_layers},
        "stdit": {"d_model": cfg_st.hidden_size, "text_len": text_len, "latent_channels": cfg_st.in_channels,
                  "caption_channels": cfg_st.caption_channels, "depth": cfg_st.depth},
        "vae_temporal": {"latent_channels": 4, "frames_per_call": 17, "latent_frames_per_call": 5},
        "vae_2d": {"latent_channels": 4, "frames_per_call": 4},
    }
    lpb: dict[ModelName, int] = {"t5": layers_per_block, "stdit": layers_per_block, "vae_temporal": 1,
                                 "vae_2d": 1}
    out: dict[ModelName, ModelCost] = {}
    for name in MODEL_NAMES:
        module = models.model(name)
        blocks = []
        for i, piece in enumerate(models.pieces(name)):
            variants: dict[Variant, ExecCost] = {"default": execs[(name, "default")][i].cost()}
            if (name, "tdtm") in execs:
                variants["tdtm"] = execs[(name, "tdtm")][i].cost()
            blocks.append(BlockCost(
                name=piece.name, index=i, params=piece_params(module, piece),
                weight_bytes=piece_weight_bytes(module, piece),  # type: ignore[arg-type]
                unit=UNITS[name], exec=variants,
            ))
        by_module = params_by_module(module, models.pieces(name), MODULE_ROOTS[name])
        out[name] = ModelCost(model=name, params=sum(b.params for b in blocks), layers_per_block=lpb[name],
                              dims=dims[name], params_by_module=by_module, blocks=blocks)
    return CostModel(preset=preset, models=out, verified_shapes=verified,
                     generated_by=f"cidl.runtime.inventory (torch {torch.__version__.split('+')[0]})")


# Where each model's upstream modules start in its state dict (the VAE pipeline nests both decoders).
MODULE_ROOTS: dict[ModelName, str] = {"t5": "", "stdit": "", "vae_temporal": "temporal_vae.",
                                      "vae_2d": "spatial_vae.module."}


def write_atomic(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def stale_presets(presets: Sequence[str], log: Callable[[str], None] | None = None) -> list[str]:
    """Regenerate in memory; the presets whose shipped file is missing or differs."""
    stale = []
    for preset in presets:
        path = inventory_path(preset)
        fresh = dump_cost_model(build_cost_model(preset, log=log))
        if not path.exists() or path.read_text() != fresh:
            stale.append(preset)
    return stale


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cidl.runtime.inventory",
                                     description=(__doc__ or "").split("\n")[0])
    parser.add_argument("mode", nargs="?", choices=("build", "check"), default="build",
                        help="build: (re)write the shipped inventories; check: fail if one is stale")
    parser.add_argument("--preset", action="append", choices=PRESETS, help="default: all three")
    args = parser.parse_args(argv)
    presets = args.preset or list(PRESETS)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if args.mode == "check":
        stale = stale_presets(presets, log)
        for preset in stale:
            print(f"{inventory_path(preset)}: stale; regenerate with `python -m cidl.runtime.inventory`")
        return 1 if stale else 0
    for preset in presets:
        t0 = time.perf_counter()
        model = build_cost_model(preset, log=log)
        write_atomic(inventory_path(preset), dump_cost_model(model))
        log(f"wrote {inventory_path(preset)} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
