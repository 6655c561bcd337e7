"""Managed blocks: one block's weights behind a small load/unload protocol (Apple's ``ResourceManaging``).

A :class:`ManagedBlock` owns its lock and its loaded state. ``load`` reads the block file through the
:class:`~cidl.runtime.store.BlockStore`, turns it into the tensors the kernel uses (int8 dequantised, any
stored dtype converted to the dtype the model was built with) and assigns them into the submodules the
block's :class:`~cidl.runtime.models.piece.Piece` owns in a model built on ``meta``; ``unload`` puts those
entries back on ``meta``, so the memory is really returned. Callers run a block only inside
``with block.use() as piece:``; forwards may share a block, and an unload waits until none is running.

Nothing here decides *when* to load or unload: the executor's ``MemoryBudget`` does.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from cidl.runtime.allocator import configure_allocator
from cidl.runtime.models.piece import Piece
from cidl.runtime.quant import dequantize_state
from cidl.runtime.store import BlockEntry, BlockFileError, BlockStore

Carry = dict[str, Any]


class ResourceManaging(Protocol):
    """The protocol: load, unload, and prewarm (load then unload, e.g. to fault the file in)."""

    def load(self, cold: bool = False) -> int: ...

    def unload(self) -> int: ...

    def prewarm(self) -> None: ...


class BlockNotLoadedError(RuntimeError):
    """``use()`` of a block that is not loaded: the caller's schedule forgot a load."""


def _numel(shape: torch.Size | tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _locate(model: nn.Module, key: str) -> tuple[nn.Module, str, bool]:
    """(owning module, leaf name, is_parameter) of a state-dict key."""
    module_name, _, leaf = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if leaf in module._parameters:
        return module, leaf, True
    if leaf in module._buffers:
        return module, leaf, False
    raise KeyError(f"model has no parameter or buffer {key!r}")


class ManagedBlock:
    """One block of ``model`` (built on ``meta``): the entries ``piece`` owns, loaded from ``store``."""

    def __init__(self, block_id: str, model: nn.Module, piece: Piece, store: BlockStore) -> None:
        self.block_id = block_id
        self.model = model
        self.piece = piece
        self.store = store
        self.entry: BlockEntry = store.entry(block_id)
        # Shared use, exclusive load/unload: forwards count in ``_users``; an unload waits until it is 0.
        self._cond = threading.Condition(threading.Lock())
        self._users = 0
        self._loading = False
        self._loaded = False
        self._resident = 0
        sd = model.state_dict(keep_vars=True)
        missing = [k for k in [*self.entry.keys, *self.entry.aliases] if k not in sd]
        if missing:
            raise ValueError(f"{store.path(block_id)}: block {block_id} holds {missing[0]!r}, which the "
                             "model does not have (a store of another preset?)")
        expected = set(piece.param_names(model))
        have = set(self.entry.keys) | set(self.entry.aliases)
        if have != expected:
            raise ValueError(f"{store.path(block_id)}: block {block_id} keys do not match piece "
                             f"{piece.name!r}: missing {sorted(expected - have)[:3]}, "
                             f"unexpected {sorted(have - expected)[:3]}")
        # The form each entry takes when loaded: the model's own dtype and shape.
        self._targets = {k: (sd[k].dtype, tuple(sd[k].shape)) for k in self.entry.keys}
        self._quantized = set(self.entry.quantized)
        plain = torch.float16 if self.entry.dtype == "fp16" else torch.float32
        # Whether any entry's stored form differs from the model's (then nothing may view the file buffer).
        self._converts = bool(self._quantized) or any(dt != plain for dt, _ in self._targets.values())

    # ---------------------------------------------------------------------------------------- sizes

    @property
    def planned_resident_bytes(self) -> int:
        """What ``load`` returns: the entries' bytes in the model's dtypes (int8 counted as its fp32 copy)."""
        return sum(_numel(shape) * dtype.itemsize for dtype, shape in self._targets.values())

    @property
    def peak_load_bytes(self) -> int:
        """Most bytes held at once during ``load``: the file buffer, plus the converted copies when the
        stored form differs from the model's (int8, or fp16 into an fp32 model); the buffer is freed before
        ``load`` returns."""
        return self.entry.bytes + (self.planned_resident_bytes if self._converts else 0)

    @property
    def file_bytes(self) -> int:
        return self.entry.bytes

    @property
    def is_loaded(self) -> bool:
        return self._loaded

    @property
    def resident_bytes(self) -> int:
        """Bytes of the loaded tensors (0 when unloaded)."""
        return self._resident

    # ------------------------------------------------------------------------------------- protocol

    def load(self, cold: bool = False) -> int:
        """Read, verify and assign the block's tensors; returns the resident bytes (as the kernel uses them).

        Idempotent: a loaded block returns its resident bytes without reading again. Raises
        :class:`~cidl.runtime.store.BlockFileError` for a bad file (the block stays unloaded).
        """
        with self._cond:
            self._cond.wait_for(lambda: not self._loading)
            if self._loaded:
                return self._resident
            self._loading = True
        try:
            stored = self.store.read_block(self.block_id, cold=cold)
            state = self._kernel_form(stored)
            del stored
            with self._cond:  # nobody uses an unloaded block, so this cannot race a forward
                for key, tensor in state.items():
                    self._assign(key, tensor)
                self._resident = sum(t.numel() * t.element_size() for t in state.values())
                self._loaded = True
                return self._resident
        finally:
            with self._cond:
                self._loading = False
                self._cond.notify_all()

    def unload(self) -> int:
        """Put the block's entries back on ``meta`` once no forward uses them; returns the bytes released
        (0 if it was not loaded)."""
        with self._cond:
            self._cond.wait_for(lambda: not self._loading and not self._users)
            freed, self._resident, self._loaded = self._resident, 0, False
            for key, (dtype, shape) in self._targets.items():
                self._assign(key, torch.empty(shape, dtype=dtype, device="meta"))
            self._cond.notify_all()
            return freed

    def prewarm(self) -> None:
        """Load then unload, unless it was loaded already (a cold start's file faults paid up front)."""
        if not self.is_loaded:
            self.load()
            self.unload()

    @contextmanager
    def use(self) -> Iterator[Piece]:
        """Keep the block loaded while the caller runs ``piece``; several forwards may share it (e.g. the two
        CFG halves on two queues), an unload waits for all of them. Raises BlockNotLoadedError if the block
        is not loaded (waiting first for a load in progress)."""
        with self._cond:
            self._cond.wait_for(lambda: not self._loading)
            if not self._loaded:
                raise BlockNotLoadedError(f"block {self.block_id} is not loaded")
            self._users += 1
        try:
            yield self.piece
        finally:
            with self._cond:
                self._users -= 1
                self._cond.notify_all()

    def __repr__(self) -> str:
        state = f"loaded {self._resident} B" if self._loaded else "unloaded"
        return f"ManagedBlock({self.block_id!r}, {state})"

    # -------------------------------------------------------------------------------------- helpers

    def _kernel_form(self, stored: dict[str, Tensor]) -> dict[str, Tensor]:
        path = self.store.path(self.block_id)
        state = dequantize_state(stored, torch.float32) if self.entry.quantized else dict(stored)
        out: dict[str, Tensor] = {}
        for key, (dtype, shape) in self._targets.items():
            t = state[key]
            if tuple(t.shape) != shape:
                raise BlockFileError(path, "keys", f"{key} has shape {list(t.shape)}, model {list(shape)}")
            if t.dtype != dtype:
                t = t.to(dtype)
            elif self._converts and key not in self._quantized:
                # Other entries were converted: copy this view too, so the file buffer is freed on return.
                t = t.clone()
            out[key] = t
        return out

    def _assign(self, key: str, tensor: Tensor) -> None:
        module, leaf, is_param = _locate(self.model, key)
        value: Tensor = nn.Parameter(tensor, requires_grad=False) if is_param else tensor
        if is_param:
            module._parameters[leaf] = value  # type: ignore[assignment]
        else:
            module._buffers[leaf] = value
        for alias, target in self.entry.aliases.items():
            if target == key:
                amod, aleaf, aparam = _locate(self.model, alias)
                (amod._parameters if aparam else amod._buffers)[aleaf] = value  # type: ignore[index]


class StoreBlocks:
    """Every block of a store as ManagedBlocks, keyed by block id: the executor's ``BlockProvider``."""

    def __init__(self, store: BlockStore, blocks: Mapping[str, tuple[nn.Module, Piece]]) -> None:
        unknown = [b for b in blocks if b not in store]
        if unknown:
            raise KeyError(f"{store.directory}: the store has no block {unknown[0]!r}")
        configure_allocator()  # evicted blocks must give their memory back to the OS (see allocator.py)
        self.store = store
        self.blocks = {bid: ManagedBlock(bid, model, piece, store) for bid, (model, piece) in blocks.items()}

    @classmethod
    def open(cls, directory: str | Path, preset: str | None = None) -> StoreBlocks:
        """Open a store and build its preset's models on ``meta`` (``preset`` must match the store's)."""
        from cidl.runtime.pipeline_models import pipeline_blocks

        store = BlockStore.open(directory)
        if preset is not None and preset != store.manifest.preset:
            raise ValueError(f"{store.directory}: a store of preset {store.manifest.preset!r}, "
                             f"not {preset!r}")
        return cls(store, pipeline_blocks(store.manifest.preset, device="meta"))

    def __getitem__(self, block_id: str) -> ManagedBlock:
        try:
            return self.blocks[block_id]
        except KeyError:
            raise KeyError(f"no managed block {block_id!r}") from None

    def load(self, block_id: str, cold: bool = False) -> int:
        return self[block_id].load(cold)

    def unload(self, block_id: str) -> None:
        self[block_id].unload()

    def run(self, block_id: str, carry: Carry, queue: str = "cpu") -> Carry:
        """Run the block's piece on ``carry``. Host kernels only: every queue runs on torch's CPU device."""
        with self[block_id].use() as piece, torch.no_grad():
            return piece(carry)

    def unload_all(self) -> None:
        """Release everything (end of a run)."""
        for block in self.blocks.values():
            block.unload()


def load_reference_models(store: BlockStore) -> dict[str, nn.Module]:
    """The unpartitioned models with every block of ``store`` loaded: ``{"t5", "stdit", "vae"}`` (the VAE
    object holds both decoders). The reference a partitioned run is compared with."""
    from cidl.runtime.pipeline_models import model_of, pipeline_blocks

    blocks = pipeline_blocks(store.manifest.preset, device="meta")
    models: dict[str, nn.Module] = {}
    for bid, (model, piece) in blocks.items():
        ManagedBlock(bid, model, piece, store).load()
        name = model_of(bid)
        models["vae" if name.startswith("vae") else name] = model
    leftover = [n for name, m in models.items() for n, t in m.state_dict().items() if t.is_meta]
    if leftover:
        raise ValueError(f"{store.directory}: the store leaves {leftover[0]!r} unloaded")
    return models
