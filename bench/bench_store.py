"""Block store throughput on the ``small`` preset: prepare, then cold and warm reads, and managed loads.

Run::

    .venv/bin/pytest bench/bench_store.py --benchmark-enable -o python_files='bench_*.py' -s

Each benchmark's ``extra_info`` carries ``bytes`` and ``bytes_per_s`` (file bytes over the mean time).
Cold reads drop each file from the page cache first (``posix_fadvise(DONTNEED)``), so they measure the
storage; warm reads measure read + sha256 + header parsing from the page cache.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cidl.runtime.blocks import StoreBlocks
from cidl.runtime.store import BlockStore, prepare_store

PRESET = "small"


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bench-store")
    return {dt: prepare_store(PRESET, root / dt, dtype=dt) for dt in ("fp32", "int8")}


def _file_bytes(directory: Path) -> int:
    return sum(b.bytes for b in BlockStore.open(directory).manifest.blocks)


def _record(benchmark, nbytes: int) -> None:
    benchmark.extra_info["bytes"] = nbytes
    if benchmark.stats is not None:
        rate = nbytes / benchmark.stats.stats.mean
        benchmark.extra_info["bytes_per_s"] = rate
        print(f"\n{benchmark.name}: {nbytes / 1e6:.0f} MB at {rate / 1e6:.0f} MB/s")


def test_prepare_fp32(benchmark, tmp_path: Path, stores: dict[str, Path]) -> None:
    out = tmp_path / "fresh"

    def setup() -> None:
        shutil.rmtree(out, ignore_errors=True)

    benchmark.pedantic(prepare_store, args=(PRESET, out), kwargs={"dtype": "fp32"}, setup=setup, rounds=2)
    _record(benchmark, _file_bytes(out))


def test_verify_complete_store(benchmark, stores: dict[str, Path]) -> None:
    benchmark.pedantic(prepare_store, args=(PRESET, stores["fp32"]), kwargs={"dtype": "fp32"}, rounds=3)
    _record(benchmark, _file_bytes(stores["fp32"]))


@pytest.mark.parametrize("cold", [True, False], ids=["cold", "warm"])
def test_read_all_blocks(benchmark, stores: dict[str, Path], cold: bool) -> None:
    store = BlockStore.open(stores["fp32"])

    def read_all() -> None:
        for bid in store.block_ids:
            store.read_block(bid, cold=cold)

    read_all()
    benchmark.pedantic(read_all, rounds=5)
    _record(benchmark, _file_bytes(stores["fp32"]))


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_managed_load_cold(benchmark, stores: dict[str, Path], dtype: str) -> None:
    """Load + unload every block cold through ManagedBlock (int8: dequantised to fp32)."""
    blocks = StoreBlocks.open(str(stores[dtype]))

    def load_all() -> None:
        for bid in blocks.blocks:
            blocks.load(bid, cold=True)
            blocks.unload(bid)

    benchmark.pedantic(load_all, rounds=3)
    _record(benchmark, _file_bytes(stores[dtype]))
