"""The text-to-video pipeline, stage by stage, over a backend that runs each stage call.

The glue is written once and runs over two backends:

* :class:`ExecutorBackend` hands every call to the :class:`~cidl.runtime.executor.Executor` (blocks from the
  store, loads and execs as the Schedule says);
* :class:`ReferenceBackend` calls the unpartitioned models (the reference a partitioned run must equal).

Stages: T5 once (prompt tokens -> text embeddings); the rectified-flow sampler (CFG, LPL, TDTM) calling
STDiT once per step -- each step is one call of the ``stdit-tdtm`` or ``stdit`` stage; the temporal VAE
decoder once per 17-frame chunk, then the 2D decoder once per 4 frames.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from cidl.runtime.executor import Executor
from cidl.runtime.models.piece import Carry
from cidl.runtime.models.sampler import Denoiser, TimestepTransform, sample_rflow
from cidl.scheduler.workload import Workload

CFG_SCALE = 7.0
Progress = Callable[[str, int, int], None]  # (stage name, calls done, calls of the stage)


@dataclass(frozen=True)
class GenerateSettings:
    """What to generate: preset, video size, sampler knobs, the seed of prompt tokens and initial noise."""

    preset: str
    height: int
    width: int
    frames: int
    steps: int
    lpl_leap: int | None = None
    tdtm_steps: int = 0
    seed: int = 0
    cfg_scale: float = CFG_SCALE


@dataclass(frozen=True)
class GenerateResult:
    latents: Tensor  # [1, 4, T, H/8, W/8], the denoised latent
    video: Tensor  # [1, 3, frames, H, W] in about [-1, 1]
    denoiser_calls: int


class StageBackend(Protocol):
    def encode_text(self, carry: Carry) -> Carry: ...

    def denoiser(self) -> Denoiser: ...

    def vae_temporal(self, index: int, carry: Carry) -> Carry: ...

    def vae_spatial(self, index: int, carry: Carry) -> Carry: ...


# ----------------------------------------------------------------------------------------------- inputs


def text_len(preset: str) -> int:
    from cidl.runtime.models.stdit3 import STDIT3_PRESETS

    return STDIT3_PRESETS[preset].text_len


def prompt_tokens(s: GenerateSettings) -> Carry:
    """Seeded prompt tokens (no tokenizer is shipped; the weights are random anyway)."""
    from cidl.runtime.models.t5 import t5_config, t5_inputs

    return t5_inputs(t5_config(s.preset), batch=1, tokens=text_len(s.preset), seed=s.seed)


def initial_noise(s: GenerateSettings) -> Tensor:
    from cidl.runtime.models.vae import LATENT_CHANNELS, vae_latent_frames

    gen = torch.Generator().manual_seed(s.seed + 1)
    shape = (1, LATENT_CHANNELS, vae_latent_frames(s.frames), s.height // 8, s.width // 8)
    return torch.randn(shape, generator=gen)


# ---------------------------------------------------------------------------------------------- the glue


def generate(backend: StageBackend, s: GenerateSettings, y_null: Tensor, progress: Progress | None = None
             ) -> GenerateResult:
    """T5 -> sampler over STDiT -> VAE decode, each stage call through ``backend``."""
    from cidl.runtime.models.vae import decode_video, vae_call_counts

    tick = progress or (lambda stage, done, total: None)
    text = backend.encode_text(prompt_tokens(s))
    tick("t5", 1, 1)
    y, mask = text["text"][:, None], text["mask"]
    z = initial_noise(s)
    transform = TimestepTransform(height=s.height, width=s.width, num_frames=s.frames)
    runs = s.steps if s.lpl_leap is None else s.lpl_leap + 1
    done = {"n": 0}

    def on_step(call: Any, _: Tensor) -> None:
        done["n"] += 1
        tick("stdit", done["n"], runs)

    result = sample_rflow(backend.denoiser(), z, y, y_null.to(y.dtype), mask, num_steps=s.steps,
                          cfg_scale=s.cfg_scale, transform=transform, lpl_leap=s.lpl_leap,
                          tdtm_steps=s.tdtm_steps, step_callback=on_step)
    latents = result.latents
    counts = {"t": 0, "s": 0}
    n_temporal, n_spatial = vae_call_counts(s.frames)

    def temporal(carry: Carry) -> Carry:
        out = backend.vae_temporal(counts["t"], carry)
        counts["t"] += 1
        tick("vae-temporal", counts["t"], n_temporal)
        return out

    def spatial(carry: Carry) -> Carry:
        out = backend.vae_spatial(counts["s"], carry)
        counts["s"] += 1
        tick("vae-2d", counts["s"], n_spatial)
        return out

    video = decode_video(latents, s.frames, temporal, spatial)
    return GenerateResult(latents=latents, video=video, denoiser_calls=result.num_calls)


# ---------------------------------------------------------------------------------------------- backends

_STDIT_BATCH_KEYS = ("x", "timestep", "y", "mask", "fps", "t", "t_mlp", "y_mask", "out")


class BatchSplitter:
    """STDiT's CFG batch halves: tensors under the batch keys are cut along dim 0, the rest shared."""

    def __init__(self, keys: tuple[str, ...] = _STDIT_BATCH_KEYS) -> None:
        self.keys = keys

    def split(self, carry: Carry, parts: int) -> list[Carry]:
        n = self._batch(carry)
        if n % parts:
            raise ValueError(f"batch of {n} cannot be split into {parts} parts")
        out: list[Carry] = [dict(carry) for _ in range(parts)]
        for key in self.keys:
            v = carry.get(key)
            if isinstance(v, Tensor) and v.dim() and v.shape[0] == n:
                for i, chunk in enumerate(v.chunk(parts, dim=0)):
                    out[i][key] = chunk
        return out

    def merge(self, carries: list[Carry]) -> Carry:
        out = dict(carries[0])
        for key in self.keys:
            vs = [c.get(key) for c in carries]
            if all(isinstance(v, Tensor) and v.dim() for v in vs) and len({id(v) for v in vs}) == len(vs):
                out[key] = torch.cat(vs, dim=0)  # type: ignore[arg-type]
        return out

    def _batch(self, carry: Carry) -> int:
        for key in ("x", "out"):
            v = carry.get(key)
            if isinstance(v, Tensor):
                return int(v.shape[0])
        raise ValueError("carry has no batch tensor ('x' or 'out') to split")


class ExecutorBackend:
    """Every stage call through ``executor.run_call``, naming stages as the workload does."""

    def __init__(self, executor: Executor, workload: Workload, s: GenerateSettings) -> None:
        self.ex = executor
        self.s = s
        self.calls = {st.name: st.calls for st in workload.stages}
        self._stdit_calls = {"stdit": 0, "stdit-tdtm": 0}

    def encode_text(self, carry: Carry) -> Carry:
        return self.ex.run_call("t5", 0, carry)

    def denoiser(self) -> Denoiser:
        h, w = float(self.s.height), float(self.s.width)

        def denoise(x: Tensor, t: Tensor, y: Tensor, mask: Tensor | None, *, tdtm: bool) -> Tensor:
            stage = "stdit-tdtm" if tdtm else "stdit"
            call = self._stdit_calls[stage]
            self._stdit_calls[stage] += 1
            carry = {"x": x, "timestep": t, "y": y, "mask": mask, "fps": None, "height": h, "width": w,
                     "tdtm": tdtm}
            return self.ex.run_call(stage, call, carry)["out"]

        return denoise

    def vae_temporal(self, index: int, carry: Carry) -> Carry:
        return self.ex.run_call(*self._where("vae-temporal", index), carry)

    def vae_spatial(self, index: int, carry: Carry) -> Carry:
        return self.ex.run_call(*self._where("vae-2d", index), carry)

    def _where(self, stage: str, index: int) -> tuple[str, int]:
        """Call ``index`` of a VAE decoder -> (stage, call): full calls first, then the tail stage."""
        full = self.calls.get(stage, 0)
        if index < full:
            return stage, index
        if f"{stage}-tail" in self.calls and index == full:
            return f"{stage}-tail", 0
        raise ValueError(f"{stage} call {index}: the workload has {full} full calls and "
                         f"{'a' if f'{stage}-tail' in self.calls else 'no'} tail call")


class ReferenceBackend:
    """The unpartitioned models (``cidl.runtime.blocks.load_reference_models``)."""

    def __init__(self, models: dict[str, torch.nn.Module], s: GenerateSettings) -> None:
        self.models = models
        self.s = s

    def encode_text(self, carry: Carry) -> Carry:
        with torch.no_grad():
            out = self.models["t5"](input_ids=carry["input_ids"], attention_mask=carry["attention_mask"])
        return {"text": out.last_hidden_state, "mask": carry["attention_mask"]}

    def denoiser(self) -> Denoiser:
        from cidl.runtime.models.sampler import model_denoiser

        inner = model_denoiser(self.models["stdit"], height=float(self.s.height), width=float(self.s.width))

        def denoise(x: Tensor, t: Tensor, y: Tensor, mask: Tensor | None, *, tdtm: bool) -> Tensor:
            with torch.no_grad():
                return inner(x, t, y, mask, tdtm=tdtm)

        return denoise

    def vae_temporal(self, index: int, carry: Carry) -> Carry:
        with torch.no_grad():
            return self.models["vae"].temporal_call(carry)  # type: ignore[operator]

    def vae_spatial(self, index: int, carry: Carry) -> Carry:
        with torch.no_grad():
            return self.models["vae"].spatial_call(carry)  # type: ignore[operator]


def reference_generate(store_dir: str | Path, s: GenerateSettings) -> GenerateResult:
    """The same generation with the unpartitioned models, every block of the store loaded at once."""
    from cidl.runtime.blocks import load_reference_models
    from cidl.runtime.store import BlockStore

    store = BlockStore.open(store_dir)
    models = load_reference_models(store)
    y_null = models["stdit"].null_caption(1)  # type: ignore[operator]
    return generate(ReferenceBackend(models, s), s, y_null.detach().clone())


def null_caption_from_store(store: Any) -> Tensor:
    """STDiT's learned null caption [1, 1, L, C] read from its ``part1`` block file (CFG needs it before
    ``part1`` is ever loaded; it is part of the run's persistent text tensors)."""
    tensors = store.read_block("stdit.part1")
    value = tensors["y_embedder.y_embedding"].to(torch.float32).clone()
    return value[None, None]


# -------------------------------------------------------------------------------------------- outputs


def write_frames(video: Tensor, out_dir: Path) -> list[Path]:
    """Frames of ``video`` [1, 3, F, H, W] (about [-1, 1]) as ``frame_0000.png``..; atomic per file."""
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    frames = ((video[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    paths = []
    for i, frame in enumerate(frames):
        path = out_dir / f"frame_{i:04d}.png"
        tmp = path.with_name(f".{path.name}.tmp")
        Image.fromarray(frame).save(tmp, format="PNG")
        tmp.replace(path)
        paths.append(path)
    return paths


def write_latents(latents: Tensor, path: Path, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    save_file({"latents": latents.contiguous()}, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path
