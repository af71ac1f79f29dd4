"""The packed dataset file the standalone trainer reads (`bnnc data pack`), and its reader.

Format (little-endian), version 1:

    offset  size  field
    0       4     magic "BNND"
    4       4     u32 version = 1
    8       4     u32 count          examples
    12      4     u32 elems          float inputs per example (the model's input without the batch)
    16      4     u32 classes
    20      4     u32 format         0 = u8 pixels (the trainer maps them through the model's
                                     preprocessing, compiler/preprocess.py); 1 = float32 inputs
    24      16    u32 c, h, w, 0     the input shape (informational; 1, 1, elems for flat inputs)
    40      24    zero
    64      count u8 labels, zero-padded to a multiple of 8 bytes
    ...     count * elems * (1 or 4)  inputs, example after example, in the model's layout (NCHW)

Examples are read one by one with a seek, so the trainer never holds the set in memory. Packing is
deterministic (same data, same bytes). `pack_stream` (runtime/datasets.py `ModelData.pack`) writes
uint8 pixels as u8 and float data as f32, chunk by chunk into a temporary file renamed into place.
`pack` takes uint8 pixels, or float32 inputs and stores them as u8 whenever every input is exactly
a pixel scaled by the default preprocessing (2p/255 - 1), f32 otherwise.
"""

from __future__ import annotations

import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from ..compiler.c_literals import PIXEL_LUT
from ..compiler.errors import DataError
from ..compiler.preprocess import DEFAULT as DEFAULT_PREPROCESS
from ..compiler.preprocess import Preprocess, pixel_lut

MAGIC = b"BNND"
# the packed splits' names where a trainer runs (OUT/data/, a device's directory, QEMU's working
# directory of the bare-metal trainer)
TRAIN_FILE, TEST_FILE = "train.bnnd", "test.bnnd"
VERSION = 1
HEADER = 64
U8, F32 = 0, 1
_LUT = PIXEL_LUT      # the default preprocessing's table (2p/255 - 1)


def _as_pixels(x: np.ndarray) -> np.ndarray | None:
    """uint8 p with _LUT[p] == x exactly, or None."""
    idx = np.clip(np.searchsorted(_LUT, x), 0, 255).astype(np.uint8)
    return idx if np.array_equal(_LUT[idx], x) else None


def pack(path: str | Path, x: np.ndarray, y: np.ndarray, classes: int) -> int:
    """Write examples `x` (uint8 pixels, or float32 inputs; (N, ...) in the model's input layout)
    with labels `y`; returns the format used (U8 or F32)."""
    data = packed_bytes(x, y, classes)
    Path(path).write_bytes(data)
    return struct.unpack_from("<I", data, 20)[0]


def packed_bytes(x: np.ndarray, y: np.ndarray, classes: int) -> bytes:
    """The packed file of `pack` as bytes (the caller writes it, e.g. atomically)."""
    x = np.asarray(x)
    if x.dtype != np.uint8:
        x = np.ascontiguousarray(x, np.float32)
    y = np.asarray(y)
    n = len(x)
    if n == 0 or len(y) != n:
        raise DataError(f"cannot pack {n} examples with {len(y)} labels")
    if not 1 < classes <= 256 or y.min() < 0 or y.max() >= classes:
        raise DataError(f"labels must lie in [0, {classes}) and classes <= 256")
    shape = x.shape[1:]
    pixels = x if x.dtype == np.uint8 else _as_pixels(x)
    fmt = U8 if pixels is not None else F32
    head = _header(n, shape, classes, fmt)
    labels = y.astype(np.uint8).tobytes()
    labels += bytes(-len(labels) % 8)
    body = pixels.tobytes() if fmt == U8 else x.astype("<f4").tobytes()
    return head + labels + body


def _header(n: int, shape: tuple[int, ...], classes: int, fmt: int) -> bytes:
    elems = int(np.prod(shape))
    chw = list(shape) if len(shape) == 3 else [1, 1, elems]
    head = struct.pack("<4sIIIII4I", MAGIC, VERSION, n, elems, classes, fmt, *chw, 0)
    return head + bytes(HEADER - len(head))


def pack_stream(path: str | Path, count: int, shape: tuple[int, ...], labels: np.ndarray,
                classes: int, chunks: Iterable[np.ndarray], *, float_data: bool) -> int:
    """Write `count` examples of per-sample `shape` arriving in `chunks` (uint8 pixels, or floats
    when `float_data`) with `labels`; a temporary file is renamed over `path` only when complete,
    so a failure (a damaged image halfway) leaves nothing behind. Returns the format."""
    path = Path(path)
    y = np.asarray(labels)
    if count == 0 or len(y) != count:
        raise DataError(f"cannot pack {count} examples with {len(y)} labels")
    if not 1 < classes <= 256 or y.min() < 0 or y.max() >= classes:
        raise DataError(f"labels must lie in [0, {classes}) and classes <= 256")
    fmt = F32 if float_data else U8
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_header(count, tuple(shape), classes, fmt))
            lab = y.astype(np.uint8).tobytes()
            f.write(lab + bytes(-len(lab) % 8))
            done = 0
            for x in chunks:
                if tuple(x.shape[1:]) != tuple(shape):
                    raise AssertionError((x.shape, shape))
                f.write(np.ascontiguousarray(x, np.uint8 if fmt == U8 else "<f4").tobytes())
                done += len(x)
            if done != count:
                raise AssertionError((done, count))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return fmt


@dataclass(frozen=True)
class Packed:
    count: int
    elems: int
    classes: int
    format: int
    shape: tuple[int, int, int]
    x: np.ndarray      # float32 (count, elems)
    y: np.ndarray      # int64 (count,)


def read(path: str | Path, preprocess: Preprocess = DEFAULT_PREPROCESS) -> Packed:
    """The whole file decoded, u8 pixels through `preprocess` (compiler/preprocess.py) as the
    trainer of a program compiled with it maps them (tests and tools; the trainer streams)."""
    raw = Path(path).read_bytes()
    if len(raw) < HEADER or raw[:4] != MAGIC:
        raise DataError(f"{path} is not a packed bnnc dataset (bnnc data pack)")
    _, version, n, elems, classes, fmt, c, h, w, _ = struct.unpack_from("<4sIIIII4I", raw)
    if version != VERSION:
        raise DataError(f"{path}: dataset format version {version}, this bnnc reads {VERSION}")
    at = HEADER + -(-n // 8) * 8
    size = n * elems * (1 if fmt == U8 else 4)
    if len(raw) != at + size:
        raise DataError(f"{path}: {len(raw)} bytes, expected {at + size} (truncated?)")
    y = np.frombuffer(raw, np.uint8, n, HEADER).astype(np.int64)
    body = np.frombuffer(raw, np.uint8 if fmt == U8 else "<f4", n * elems, at)
    if fmt == U8:
        lut = pixel_lut(preprocess, c if c > 1 else 1)
        x = np.stack([lut[ch][plane] for ch, plane in
                      enumerate(body.reshape(n, lut.shape[0], -1).transpose(1, 0, 2))], axis=1)
        x = x.reshape(n, elems)
    else:
        x = body.astype(np.float32).reshape(n, elems)
    return Packed(n, elems, classes, fmt, (c, h, w), x, y)
