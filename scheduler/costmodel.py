"""Per-block cost model, exact in the workload's shape, shipped as JSON so the scheduler needs no torch.

``cidl.runtime`` measures every block of the real models on the meta device (FLOPs with
FlopCounterMode, live activation bytes op by op) at many shapes and fits each quantity as a polynomial in
the shape variables, verified exactly on held-out shapes. The scheduler evaluates those polynomials for
any resolution, frame count, LPL and TDTM setting.

Shape variables:
- ``B`` batch (STDiT: 2 for classifier-free guidance; T5 and VAE: 1; the 2D VAE decoder: frames per call)
- ``L`` text tokens (300 for Open-Sora)
- ``S`` tokens per latent frame ((H/16)*(W/16)), ``T`` latent frames, ``M`` latent frames after TDTM merging
- ``P`` latent pixels per frame ((H/8)*(W/8)), ``F`` latent frames per temporal-VAE call
- ``H``, ``W`` latent height and width (pixels / 8): the temporal VAE pads every frame explicitly before its
  3D convolutions, so its live bytes hold (H+2)(W+2) = P + 2H + 2W + 4 terms, not a function of P alone
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cidl.device_profiles.profile import Unit, WeightDType

SCHEMA_VERSION = 1

ModelName = Literal["t5", "stdit", "vae_temporal", "vae_2d"]
Variant = Literal["default", "tdtm"]
ShapeVar = Literal["B", "L", "S", "T", "M", "P", "F", "H", "W"]
PRESETS = ("tiny", "small", "full")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Term(_Frozen):
    """``coef * prod(var ** exp)``; coefficients are integers because FLOPs and bytes are."""

    coef: int
    exps: dict[ShapeVar, int] = Field(default_factory=dict)

    def __call__(self, shape: dict[str, int]) -> int:
        value = self.coef
        for var, exp in self.exps.items():
            value *= shape[var] ** exp
        return value


class Poly(_Frozen):
    terms: list[Term] = Field(default_factory=list)

    def __call__(self, shape: dict[str, int]) -> int:
        return sum(t(shape) for t in self.terms)


class MaxPoly(_Frozen):
    """The max of several polynomials: peak live bytes, whose peak moves between ops as shapes change."""

    pieces: list[Poly] = Field(min_length=1)

    def __call__(self, shape: dict[str, int]) -> int:
        return max(p(shape) for p in self.pieces)


class ExecCost(_Frozen):
    flops: Poly
    working_bytes: MaxPoly


class BlockCost(_Frozen):
    """One block of one model: weights (shape independent) and per-call exec cost per variant."""

    name: str
    index: int
    params: int
    weight_bytes: dict[WeightDType, int]
    unit: Unit = "gpu"
    exec: dict[Variant, ExecCost]


class ModelCost(_Frozen):
    model: ModelName
    params: int = Field(description="Parameters of the whole model (sum over its blocks).")
    layers_per_block: int
    dims: dict[str, int] = Field(default_factory=dict, description="e.g. d_model, text_len, latent_channels.")
    params_by_module: dict[str, int] = Field(
        default_factory=dict,
        description="Parameters per top-level upstream module (e.g. the VAE's `decoder` and its 20-parameter "
        "`post_quant_conv`, which decoding also runs), so totals can be read against published counts.",
    )
    blocks: list[BlockCost]


class CostModel(_Frozen):
    schema_version: Literal[1] = SCHEMA_VERSION
    preset: str
    models: dict[ModelName, ModelCost]
    generated_by: str = ""
    verified_shapes: int = Field(0, description="Held-out shapes the fit was checked on, exactly.")


def inventory_path(preset: str) -> Path:
    return Path(str(resources.files("cidl.scheduler") / "inventories" / f"{preset}.json"))


@cache
def load_cost_model(preset: str) -> CostModel:
    """The shipped cost model of a model preset (``tiny``, ``small``, ``full``)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r} (expected one of {', '.join(PRESETS)})")
    path = inventory_path(preset)
    try:
        return CostModel.model_validate_json(path.read_bytes())
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: missing; regenerate with `python -m cidl.runtime.inventory`") from e
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise ValueError(f"{path}: field {loc}: {err['msg']}") from e


def dump_cost_model(model: CostModel) -> str:
    return json.dumps(model.model_dump(mode="json"), indent=1, sort_keys=False) + "\n"
