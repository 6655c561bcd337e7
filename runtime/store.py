"""The block store: one safetensors file per block plus a manifest with each file's size and sha256.

Layout of a store directory::

    manifest.json                         written last, atomically: the store is complete iff it exists
    manifest.partial.json                 the blocks finished so far while ``prepare_store`` runs
    <block_id>.<dtype>.safetensors        one per block, keys = the parent model's state-dict keys

``prepare_store`` streams: the models are built on ``meta`` and each block's tensors are drawn one tensor at
a time straight into its file (``cidl.runtime.pipeline_models`` defines the seeded values), so even ``full``
(T5 XXL: 19 GB fp32) never holds more than one tensor of one block. Every file is written to a temporary name,
fsynced, then renamed; an interrupted run is completed by the next one, which reuses only files whose size
and sha256 match the manifest (partial or complete) and rewrites the rest.

int8 stores hold each quantised weight ``key`` as int8 plus ``key.scale`` (fp32, one per output channel),
everything else fp32 (``cidl.runtime.quant``); fp16 stores hold every tensor as fp16.

``BlockStore.read_block`` reads a file into fresh memory with plain ``read`` calls (no mmap shared with the
page cache), checks size, sha256 and the safetensors header, and returns tensors viewing that one buffer.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import Tensor

from cidl.device_profiles.profile import WeightDType
from cidl.runtime.blockfile import (
    TMP_MARK,
    BlockFileError,
    TensorSpec,
    fsync_dir,
    parse_safetensors,
    read_verified,
    verify_file,
    write_atomic,
    write_safetensors,
)
from cidl.runtime.quant import SCALE_SUFFIX, is_quantized, quantize_int8, quantized_bytes

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
PARTIAL_MANIFEST = "manifest.partial.json"
WEIGHTS_KIND = "seeded-per-key-v1"  # pipeline_models.seeded_tensor; bump if its rules change
TORCH_DTYPES: dict[WeightDType, torch.dtype] = {
    "fp32": torch.float32, "fp16": torch.float16, "int8": torch.int8,
}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


# ------------------------------------------------------------------------------------------------ manifest


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BlockEntry(_Frozen):
    """One block file. ``keys``: the model state-dict keys it holds, in state-dict order; ``quantized``: those
    stored as int8 (+ ``key.scale``); ``aliases``: tied keys not stored twice (``{alias: stored key}``)."""

    id: str = Field(min_length=3)
    file: str = Field(pattern=r"^[A-Za-z0-9_.-]+\.safetensors$")
    bytes: int = Field(gt=0, description="File size.")
    tensor_bytes: int = Field(ge=0, description="Bytes of tensor data (file size less the header).")
    sha256: str = Field(pattern=_SHA256.pattern)
    dtype: WeightDType
    keys: list[str] = Field(min_length=1)
    quantized: list[str] = Field(default_factory=list)
    aliases: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> BlockEntry:
        if len(set(self.keys)) != len(self.keys):
            raise ValueError("keys: duplicate key")
        if not set(self.quantized) <= set(self.keys):
            raise ValueError(f"quantized: {sorted(set(self.quantized) - set(self.keys))[:3]} are not in keys")
        if self.quantized and self.dtype != "int8":
            raise ValueError(f"quantized: only int8 blocks quantise, this block is {self.dtype}")
        if not set(self.aliases.values()) <= set(self.keys):
            raise ValueError("aliases: every alias must point to a stored key")
        return self

    @property
    def file_keys(self) -> list[str]:
        """The tensor names in the file: every key, plus ``key.scale`` for each quantised one."""
        return self.keys + [k + SCALE_SUFFIX for k in self.quantized]


class StoreManifest(_Frozen):
    schema_version: Literal[1] = SCHEMA_VERSION
    preset: str = Field(min_length=1)
    dtype: WeightDType
    seed: int
    weights: str = Field(WEIGHTS_KIND, description="How the weights were made (see pipeline_models).")
    blocks: list[BlockEntry]

    @model_validator(mode="after")
    def _unique(self) -> StoreManifest:
        for field in ("id", "file"):
            values = [getattr(b, field) for b in self.blocks]
            dup = {v for v in values if values.count(v) > 1}
            if dup:
                raise ValueError(f"blocks: duplicate {field} {sorted(dup)[0]!r}")
        wrong = [b.id for b in self.blocks if b.dtype != self.dtype]
        if wrong:
            raise ValueError(f"blocks: block {wrong[0]!r} has a dtype other than the store's {self.dtype}")
        return self


def read_manifest(path: Path) -> StoreManifest:
    """Read and validate a manifest; errors are one line naming the file and the field."""
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no manifest (run `cidl prepare` to write the store)") from None
    try:
        return StoreManifest.model_validate_json(text)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        raise ValueError(f"{path}: field {loc}: {err['msg']}") from None


def write_manifest(path: Path, manifest: StoreManifest) -> None:
    write_atomic(path, (json.dumps(manifest.model_dump(mode="json"), indent=1) + "\n").encode())


class BlockStore:
    """A prepared store, opened read-only. Thread-safe: reads share nothing but the manifest."""

    def __init__(self, directory: Path, manifest: StoreManifest) -> None:
        self.directory = Path(directory)
        self.manifest = manifest
        self._entries = {b.id: b for b in manifest.blocks}

    @classmethod
    def open(cls, directory: str | Path) -> BlockStore:
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"{directory}: no such store directory (run `cidl prepare`)")
        return cls(directory, read_manifest(directory / MANIFEST))

    @property
    def block_ids(self) -> list[str]:
        return [b.id for b in self.manifest.blocks]

    @property
    def dtype(self) -> WeightDType:
        return self.manifest.dtype

    def __contains__(self, block_id: object) -> bool:
        return block_id in self._entries

    def entry(self, block_id: str) -> BlockEntry:
        try:
            return self._entries[block_id]
        except KeyError:
            raise KeyError(f"{self.directory / MANIFEST}: no block {block_id!r}") from None

    def path(self, block_id: str) -> Path:
        return self.directory / self.entry(block_id).file

    def read_block(self, block_id: str, *, cold: bool = False) -> dict[str, Tensor]:
        """The block file's tensors as stored (int8 blocks: int8 weights plus ``key.scale``), in fresh memory.

        Raises :class:`BlockFileError` for a missing file or a failed size, sha256, header or key check.
        ``cold=True`` first drops the file from the page cache, so the read is a real storage read.
        """
        entry = self.entry(block_id)
        path = self.directory / entry.file
        buf = read_verified(path, entry.bytes, entry.sha256, cold=cold)
        tensors = parse_safetensors(buf, path)
        if set(tensors) != set(entry.file_keys):
            want = set(entry.file_keys)
            extra, missing = sorted(set(tensors) - want), sorted(want - set(tensors))
            raise BlockFileError(path, "keys", f"missing {missing[:3]}, unexpected {extra[:3]}")
        return tensors

    def verify(self, block_id: str | None = None) -> None:
        """Check size and sha256 of one block file, or of all; raises BlockFileError on the first failure."""
        for bid in [block_id] if block_id else self.block_ids:
            entry = self.entry(bid)
            verify_file(self.directory / entry.file, entry.bytes, entry.sha256)


# ------------------------------------------------------------------------------------------------ writing


@dataclass(frozen=True)
class PrepareProgress:
    """A progress report: ``advance`` bytes were just written (or verified, ``reused=True``) for ``block_id``;
    ``done``/``total`` count the whole store's tensor bytes."""

    block_id: str
    advance: int
    done: int
    total: int
    reused: bool


@dataclass(frozen=True)
class BlockSource:
    """What ``prepare_blocks`` writes for one block: its id, model name (the seed namespace), model, piece."""

    block_id: str
    model_name: str
    model: torch.nn.Module
    piece: object  # cidl.runtime.models.piece.Piece


_Plan = tuple[list[str], list[str], dict[str, str], list[tuple[str, tuple[int, ...]]]]


def _block_plan(src: BlockSource, dtype: WeightDType) -> _Plan:
    """(keys, quantized keys, aliases, [(key, shape)]) of one block."""
    from cidl.runtime.pipeline_models import block_entries

    stored, aliases = block_entries(src.model, src.piece)  # type: ignore[arg-type]
    keys, quantized, shapes = [], [], []
    for key, t in stored.items():
        if not t.dtype.is_floating_point:
            raise ValueError(f"{src.block_id}: entry {key} is {t.dtype}; the store only seeds float tensors")
        keys.append(key)
        shape = tuple(t.shape)
        shapes.append((key, shape))
        if dtype == "int8" and is_quantized(src.model, key, shape):
            quantized.append(key)
    return keys, quantized, aliases, shapes


class _QuantPair:
    """Produces a weight's int8 data and its scales from one draw. The writer lays out scales (fp32) before
    int8 data, so the int8 half waits in memory until its turn: at most one block's int8 bytes."""

    def __init__(self, value: Callable[[], Tensor]) -> None:
        self._value = value
        self._q: Tensor | None = None

    def scale(self) -> Tensor:
        self._q, scale = quantize_int8(self._value())
        return scale

    def weight(self) -> Tensor:
        q, self._q = self._q, None
        return q if q is not None else quantize_int8(self._value())[0]


def _block_specs(src: BlockSource, dtype: WeightDType, seed: int) -> tuple[BlockEntry, list[TensorSpec]]:
    """The block's tensor specs and a manifest entry still missing size/sha256 (placeholder values)."""
    from cidl.runtime.pipeline_models import seeded_tensor

    keys, quantized, aliases, shapes = _block_plan(src, dtype)
    qset = set(quantized)
    store_dtype = torch.float16 if dtype == "fp16" else torch.float32
    specs: list[TensorSpec] = []
    for key, shape in shapes:
        def value(key: str = key, shape: tuple[int, ...] = shape) -> Tensor:
            return seeded_tensor(src.model_name, src.model, key, shape, seed)

        if key in qset:
            pair = _QuantPair(value)
            specs.append(TensorSpec(key, torch.int8, shape, pair.weight))
            specs.append(TensorSpec(key + SCALE_SUFFIX, torch.float32, (shape[0],), pair.scale))
        else:
            specs.append(TensorSpec(key, store_dtype, shape, value))
    entry = BlockEntry.model_construct(
        id=src.block_id, file=f"{src.block_id}.{dtype}.safetensors", bytes=1, tensor_bytes=0, sha256="0" * 64,
        dtype=dtype, keys=keys, quantized=quantized, aliases=aliases,
    )
    return entry, specs


def expected_tensor_bytes(src: BlockSource, dtype: WeightDType) -> int:
    """Tensor bytes of a block's file in ``dtype`` (int8: quantised weights + scales, the rest fp32)."""
    keys, quantized, _, shapes = _block_plan(src, dtype)
    qset = set(quantized)
    item = {"fp32": 4, "fp16": 2, "int8": 4}[dtype]
    total = 0
    for key, shape in shapes:
        numel = 1
        for d in shape:
            numel *= d
        total += quantized_bytes(shape) if key in qset else numel * item
    return total


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    with open(directory / ".lock", "a+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"{directory}: another `cidl prepare` is writing this store") from None
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _known_entries(directory: Path, preset: str, dtype: WeightDType, seed: int) -> dict[str, BlockEntry]:
    """Entries of an earlier (complete or partial) run with the same parameters; a store of different
    parameters is refused rather than overwritten."""
    for name in (MANIFEST, PARTIAL_MANIFEST):
        path = directory / name
        if not path.exists():
            continue
        try:
            old = read_manifest(path)
        except ValueError:
            continue  # unreadable: nothing in it is trusted
        mine = (preset, dtype, seed, WEIGHTS_KIND)
        theirs = (old.preset, old.dtype, old.seed, old.weights)
        if theirs != mine:
            raise ValueError(f"{path}: holds a store of preset={old.preset} dtype={old.dtype} "
                             f"seed={old.seed} weights={old.weights}; choose another --out for "
                             f"preset={preset} dtype={dtype} seed={seed}")
        return {b.id: b for b in old.blocks}
    return {}


def prepare_blocks(
    sources: list[BlockSource],
    out_dir: str | Path,
    *,
    preset: str,
    dtype: WeightDType = "fp32",
    seed: int = 0,
    progress: Callable[[PrepareProgress], None] | None = None,
) -> Path:
    """Write (or complete, or just verify) a store of ``sources``; see ``prepare_store``."""
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"dtype: expected one of fp32, fp16, int8, got {dtype!r}")
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    with _locked(directory):
        for stale in directory.glob(f"*{TMP_MARK}*"):
            stale.unlink()
        known = _known_entries(directory, preset, dtype, seed)
        plans = [(src, *_block_specs(src, dtype, seed)) for src in sources]
        total = sum(sum(s.nbytes for s in specs) for _, _, specs in plans)
        done = 0
        entries: list[BlockEntry] = []

        def report(block_id: str, n: int, reused: bool) -> None:
            nonlocal done
            done += n
            if progress:
                progress(PrepareProgress(block_id, n, done, total, reused))

        def save_partial(next_index: int) -> None:
            # Finished blocks plus what an earlier run recorded for the rest (verified before any reuse).
            later = [known[p.block_id] for p, _, _ in plans[next_index:] if p.block_id in known]
            partial = StoreManifest(preset=preset, dtype=dtype, seed=seed, blocks=entries + later)
            write_manifest(directory / PARTIAL_MANIFEST, partial)

        for i, (src, planned, specs) in enumerate(plans):
            old = known.get(src.block_id)
            if old is not None and _same_layout(old, planned):
                try:
                    verify_file(directory / old.file, old.bytes, old.sha256)
                    entries.append(old)
                    report(src.block_id, old.tensor_bytes, True)
                    continue
                except BlockFileError:
                    pass  # rewrite it
            if (directory / MANIFEST).exists():
                # The store stops being complete: record what it had, then retire the complete manifest.
                save_partial(i)
                (directory / MANIFEST).unlink()
            meta = {"format": "pt", "cidl.block": src.block_id, "cidl.dtype": dtype, "cidl.seed": str(seed)}
            size, digest, tensor_bytes = write_safetensors(
                directory / planned.file, specs, meta, lambda n, b=src.block_id: report(b, n, False)
            )
            entries.append(BlockEntry(**{**planned.model_dump(), "bytes": size, "sha256": digest,
                                         "tensor_bytes": tensor_bytes}))
            save_partial(i + 1)
        manifest = StoreManifest(preset=preset, dtype=dtype, seed=seed, blocks=entries)
        if not (directory / MANIFEST).exists() or read_manifest(directory / MANIFEST) != manifest:
            write_manifest(directory / MANIFEST, manifest)
        with contextlib.suppress(FileNotFoundError):
            (directory / PARTIAL_MANIFEST).unlink()
        fsync_dir(directory)
    return directory


def _complete(
    directory: Path,
    preset: str,
    dtype: WeightDType,
    seed: int,
    progress: Callable[[PrepareProgress], None] | None,
) -> bool:
    """Whether ``directory`` holds a complete store of these parameters whose every file verifies."""
    try:
        manifest = read_manifest(directory / MANIFEST)
    except (FileNotFoundError, ValueError):
        return False
    theirs = (manifest.preset, manifest.dtype, manifest.seed, manifest.weights)
    if theirs != (preset, dtype, seed, WEIGHTS_KIND):
        return False
    total, done = sum(b.tensor_bytes for b in manifest.blocks), 0
    for entry in manifest.blocks:
        try:
            verify_file(directory / entry.file, entry.bytes, entry.sha256)
        except BlockFileError:
            return False
        done += entry.tensor_bytes
        if progress:
            progress(PrepareProgress(entry.id, entry.tensor_bytes, done, total, True))
    return True


def _same_layout(old: BlockEntry, planned: BlockEntry) -> bool:
    return (old.file, old.dtype, old.keys, old.quantized, old.aliases) == (
        planned.file, planned.dtype, planned.keys, planned.quantized, planned.aliases)


def prepare_store(
    preset: str,
    out_dir: str | Path,
    *,
    dtype: WeightDType = "fp32",
    seed: int = 0,
    progress: Callable[[PrepareProgress], None] | None = None,
) -> Path:
    """Write every block of ``preset``'s pipeline (T5, STDiT, VAE temporal, VAE 2D) as its own file.

    Idempotent: a complete, verifying store is left as it is (each file is re-hashed); an interrupted one is
    completed, reusing only files whose size and sha256 match what the earlier run recorded. A directory that
    holds a store of another preset, dtype or seed is refused. Returns ``out_dir``.
    """
    from cidl.runtime.pipeline_models import model_of, pipeline_blocks

    if _complete(Path(out_dir), preset, dtype, seed, progress):
        return Path(out_dir)  # without building the models: a complete store is only re-hashed
    blocks = pipeline_blocks(preset, device="meta")
    sources = [BlockSource(bid, model_of(bid), model, piece) for bid, (model, piece) in blocks.items()]
    return prepare_blocks(sources, out_dir, preset=preset, dtype=dtype, seed=seed, progress=progress)
