"""The Open-Sora v1.2 text-to-video pipeline as a Workload, built from the shipped cost model (no torch).

T5 runs once; STDiT once per denoising step at batch 2 (classifier-free guidance), LPL cutting the step
count to ``lpl_leap + 1`` and TDTM making the first ``tdtm_steps`` calls a cheaper variant; the temporal VAE
decoder once per 17-frame chunk (5 latent frames) and the 2D decoder once per 4 frames.
"""

from __future__ import annotations

import math

from cidl.device_profiles.profile import WeightDType

from .costmodel import CostModel, ModelName, Variant, load_cost_model
from .workload import Block, Stage, Workload

FRAMES_PER_CHUNK = 17  # pixel frames decoded per temporal-VAE call
LATENT_PER_CHUNK = 5  # latent frames per 17-frame chunk
FRAMES_PER_2D_CALL = 4  # Open-Sora's micro-batch for the 2D decoder
CFG_BATCH = 2
# The phone's formats (On-device Sora): T5 int8, everything else fp32.
PHONE_DTYPES: dict[ModelName, WeightDType] = {
    "t5": "int8",
    "stdit": "fp32",
    "vae_temporal": "fp32",
    "vae_2d": "fp32",
}


def latent_frames(frames: int) -> int:
    """Latent frames T for a pixel frame count: 5 per 17-frame chunk, a remainder of r frames -> ceil(r/4)."""
    full, rest = divmod(frames, FRAMES_PER_CHUNK)
    return full * LATENT_PER_CHUNK + math.ceil(rest / 4)


def merged_frames(t: int) -> int:
    """Latent frames after TDTM merges consecutive pairs (an odd last frame stays alone)."""
    return math.ceil(t / 2)


def _check(name: str, value: int, ok: bool, expected: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value}: expected {expected}")


def open_sora_workload(
    resolution: int | tuple[int, int] = 256,
    frames: int = 68,
    steps: int = 30,
    *,
    lpl_leap: int | None = None,
    tdtm_steps: int = 0,
    preset: str = "full",
    dtypes: dict[ModelName, WeightDType] | None = None,
    kernel_dtype: WeightDType | None = None,
    cost_model: CostModel | None = None,
) -> Workload:
    """Build the pipeline. ``kernel_dtype``: the dtype kernels run in when it differs from the stored format
    (a host runtime dequantizes int8 and widens fp16 to fp32): blocks are then resident, and priced, in it."""
    h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
    for name, v in (("resolution", h), ("resolution", w)):
        _check(name, v, v > 0 and v % 16 == 0, "a positive multiple of 16")
    _check("frames", frames, frames >= 1, "a positive frame count (e.g. 51, 68, 102)")
    _check("steps", steps, steps >= 1, "at least 1 denoising step")
    if lpl_leap is not None:
        _check("lpl_leap", lpl_leap, 0 <= lpl_leap < steps, f"0 <= K < steps ({steps})")
    runs = steps if lpl_leap is None else lpl_leap + 1
    _check("tdtm_steps", tdtm_steps, 0 <= tdtm_steps <= runs, f"0 <= M <= STDiT runs ({runs})")

    cm = cost_model or load_cost_model(preset)
    dt = {**PHONE_DTYPES, **(dtypes or {})}
    t = latent_frames(frames)
    text_len = cm.models["t5"].dims.get("text_len", 300)
    s_tokens, p_pixels = (h // 16) * (w // 16), (h // 8) * (w // 8)

    def stage(
        name: str,
        model: ModelName,
        calls: int,
        shape: dict[str, int],
        variant: Variant = "default",
        split: int = 1,
    ) -> Stage:
        blocks = []
        for bc in cm.models[model].blocks:
            cost = bc.exec[variant]
            fmt = dt[model]
            kernel = kernel_dtype if kernel_dtype not in (None, fmt) else None
            resident = bc.weight_bytes[kernel or fmt]
            blocks.append(
                Block(
                    id=f"{model}.{bc.name}",
                    model=model,
                    index=bc.index,
                    weight_bytes=bc.weight_bytes,
                    dtype=fmt,
                    compute_dtype=kernel,
                    resident_bytes=resident,
                    flops=cost.flops(shape),
                    working_bytes=cost.working_bytes(shape),
                    unit=bc.unit,
                )
            )
        return Stage(
            name=name,
            model=model,
            variant=variant,
            calls=calls,
            shape=shape,
            batch_splittable=split,
            blocks=blocks,
        )

    stages = [stage("t5", "t5", 1, {"B": 1, "L": text_len})]
    stdit_shape = {"B": CFG_BATCH, "L": text_len, "S": s_tokens, "T": t, "M": merged_frames(t)}
    if tdtm_steps:
        stages.append(stage("stdit-tdtm", "stdit", tdtm_steps, stdit_shape, "tdtm", split=CFG_BATCH))
    if runs - tdtm_steps:
        stages.append(stage("stdit", "stdit", runs - tdtm_steps, stdit_shape, split=CFG_BATCH))
    chunks, rest = divmod(frames, FRAMES_PER_CHUNK)
    if chunks:
        stages.append(
            stage(
                "vae-temporal",
                "vae_temporal",
                chunks,
                {"B": 1, "P": p_pixels, "F": LATENT_PER_CHUNK, "H": h // 8, "W": w // 8},
            )
        )
    if rest:
        stages.append(
            stage(
                "vae-temporal-tail",
                "vae_temporal",
                1,
                {"B": 1, "P": p_pixels, "F": math.ceil(rest / 4), "H": h // 8, "W": w // 8},
            )
        )
    full2d, rest2d = divmod(frames, FRAMES_PER_2D_CALL)
    if full2d:
        stages.append(stage("vae-2d", "vae_2d", full2d, {"B": FRAMES_PER_2D_CALL, "P": p_pixels}))
    if rest2d:
        stages.append(stage("vae-2d-tail", "vae_2d", 1, {"B": rest2d, "P": p_pixels}))

    d_model = cm.models["t5"].dims.get("d_model", 4096)
    channels = cm.models["stdit"].dims.get("latent_channels", 4)
    text = CFG_BATCH * text_len * d_model * 4
    latents = 3 * channels * t * p_pixels * 4  # latent, velocity, and the CFG-doubled input's share
    video = frames * 3 * h * w * 4
    name = f"open-sora-{h}" if h == w else f"open-sora-{h}x{w}"
    return Workload(
        name=name,
        preset=preset,
        resolution=(h, w),
        frames=frames,
        steps=steps,
        lpl_leap=lpl_leap,
        tdtm_steps=tdtm_steps,
        persistent_bytes=text + latents + video,
        stages=stages,
    )


def parse_workload_name(name: str) -> int:
    """``open-sora-256`` -> 256. Raises ValueError naming the expected form."""
    prefix = "open-sora-"
    if not name.startswith(prefix) or not name[len(prefix) :].isdigit():
        raise ValueError(f"unknown workload {name!r} (expected open-sora-<resolution>, e.g. open-sora-256)")
    res = int(name[len(prefix) :])
    _check("resolution", res, res > 0 and res % 16 == 0, "a positive multiple of 16")
    return res
