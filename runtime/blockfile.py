"""One block file: a safetensors file written tensor by tensor and read back into fresh, verified memory.

The writer lays tensors out by decreasing item size, then name (as the safetensors library does), pads the
JSON header to 8 bytes, and hashes while writing; files open with ``safetensors.torch.load_file``. The
reader checks size (before reading), sha256 (while reading) and every header field, and returns tensors
that view one buffer filled by plain ``read`` calls -- not a mmap shared with the page cache -- so the bytes
are resident the moment ``read`` returns and are freed when the last tensor goes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

TMP_MARK = ".tmp-"  # temporary files are <name>.tmp-<pid>
_CHUNK = 8 << 20  # read/hash granularity: big enough for throughput, small enough to stay in cache
_MAX_HEADER = 100 << 20
_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


class BlockFileError(ValueError):
    """A block file failed a check: ``check`` is ``missing``, ``size``, ``sha256``, ``header`` or ``keys``."""

    def __init__(self, path: Path, check: str, detail: str) -> None:
        self.path, self.check = Path(path), check
        super().__init__(f"{path}: {check} check failed: {detail}")


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary name, fsync, rename: never half-written."""
    tmp = path.with_name(path.name + TMP_MARK + str(os.getpid()))
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to write: its name, stored dtype and shape, and a function producing its value (called once,
    while the file is written, so only one tensor exists at a time)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], Tensor]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


def write_safetensors(
    path: Path,
    specs: list[TensorSpec],
    metadata: dict[str, str],
    on_bytes: Callable[[int], None] | None = None,
) -> tuple[int, str, int]:
    """Write a safetensors file atomically (temp name, fsync, rename), tensor by tensor, hashing as it goes.

    Tensors are laid out by decreasing item size, then name (as safetensors does), so every tensor is aligned
    to its item size. Returns ``(file bytes, sha256, tensor bytes)``.
    """
    order = sorted(specs, key=lambda s: (-s.dtype.itemsize, s.name))
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for s in order:
        header[s.name] = {
            "dtype": _ST_NAMES[s.dtype], "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes],
        }
        offset += s.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(len(text) + 8) % 8)  # pad so the data starts 8-byte aligned
    head = struct.pack("<Q", len(text)) + text
    digest = hashlib.sha256(head)
    tmp = path.with_name(path.name + TMP_MARK + str(os.getpid()))
    try:
        with open(tmp, "wb") as f:
            f.write(head)
            for s in order:
                value = s.produce().detach().to("cpu", s.dtype).contiguous()
                if tuple(value.shape) != s.shape:
                    raise ValueError(f"{path}: {s.name} has shape {tuple(value.shape)}, expected {s.shape}")
                data = memoryview(value.view(torch.uint8).numpy()) if value.numel() else memoryview(b"")
                digest.update(data)
                f.write(data)
                del value, data
                if on_bytes:
                    on_bytes(s.nbytes)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return len(head) + offset, digest.hexdigest(), offset


def parse_safetensors(buf: bytearray, path: Path) -> dict[str, Tensor]:
    """Tensors viewing ``buf`` (a whole safetensors file); an inconsistency is a ``header`` BlockFileError."""

    def bad(detail: str) -> BlockFileError:
        return BlockFileError(path, "header", detail)

    if len(buf) < 8:
        raise bad(f"file of {len(buf)} bytes is shorter than the 8-byte header length")
    (n,) = struct.unpack_from("<Q", buf, 0)
    if n > min(_MAX_HEADER, len(buf) - 8):
        raise bad(f"header length {n} exceeds the file ({len(buf)} bytes)")
    try:
        header = json.loads(bytes(buf[8 : 8 + n]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    header.pop("__metadata__", None)
    start, data_len = 8 + n, len(buf) - 8 - n
    spans: list[tuple[int, int, str]] = []
    out: dict[str, Tensor] = {}
    for name, info in header.items():
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            b, e = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {name!r}: expected dtype, shape and data_offsets") from None
        numel = 1
        for d in shape:
            if d < 0:
                raise bad(f"tensor {name!r}: negative dimension in shape {list(shape)}")
            numel *= d
        if not 0 <= b <= e <= data_len or e - b != numel * dtype.itemsize:
            raise bad(f"tensor {name!r}: data_offsets [{b}, {e}] do not fit shape {list(shape)} "
                      f"in {data_len} data bytes")
        spans.append((b, e, name))
        if numel == 0:
            out[name] = torch.empty(shape, dtype=dtype)
        elif (start + b) % dtype.itemsize:  # misaligned (not written by us): copy rather than view
            out[name] = torch.frombuffer(bytearray(buf[start + b : start + e]), dtype=dtype).reshape(shape)
        else:
            out[name] = torch.frombuffer(buf, dtype=dtype, count=numel, offset=start + b).reshape(shape)
    pos = 0
    for b, e, name in sorted(spans):
        if b != pos:
            raise bad(f"tensor {name!r} starts at {b}, expected {pos} (holes or overlaps in the data)")
        pos = e
    if pos != data_len:
        raise bad(f"tensors cover {pos} of {data_len} data bytes")
    return out


def drop_cache(path: Path) -> None:
    """Evict a file's pages from the page cache, so its next read comes from storage (no-op off Linux)."""
    if not hasattr(os, "posix_fadvise"):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_verified(path: Path, size: int, sha256: str, *, cold: bool = False) -> bytearray:
    """The whole file in a fresh buffer, its size checked before reading and its sha256 while reading."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise BlockFileError(path, "missing", "no such file") from None
    try:
        actual = os.fstat(fd).st_size
        if actual != size:
            raise BlockFileError(path, "size", f"{actual} bytes, the manifest says {size}")
        if cold and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        buf = bytearray(size)
        view = memoryview(buf)
        digest = hashlib.sha256()
        pos = 0
        while pos < size:
            got = os.readv(fd, [view[pos : pos + _CHUNK]])
            if got == 0:
                raise BlockFileError(path, "size", f"file ended after {pos} of {size} bytes")
            digest.update(view[pos : pos + got])
            pos += got
        view.release()
    finally:
        os.close(fd)
    if digest.hexdigest() != sha256:
        raise BlockFileError(path, "sha256", f"content hash {digest.hexdigest()[:16]}... does not match "
                             f"the manifest's {sha256[:16]}...")
    return buf


def verify_file(path: Path, size: int, sha256: str) -> None:
    """Check a file's size, then its sha256 (streamed through the page cache, not kept in memory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise BlockFileError(path, "missing", "no such file") from None
    with os.fdopen(fd, "rb") as f:
        actual = os.fstat(fd).st_size
        if actual != size:
            raise BlockFileError(path, "size", f"{actual} bytes, the manifest says {size}")
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if digest != sha256:
        raise BlockFileError(path, "sha256", f"content hash {digest[:16]}... is not {sha256[:16]}...")
