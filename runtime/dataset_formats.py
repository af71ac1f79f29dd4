"""Dataset files on disk -> uint8 image arrays and integer labels, one reader per format.

Input: the paths of one dataset copy in its layout's order (runtime/datasets.py finds them).
Output: a (train, test) pair of `Split`s: NCHW uint8 images, labels, and the files a later
shape/count/range error should name.

Formats: IDX (raw or .gz, any IDX element type; MNIST-like datasets), CIFAR-10 python pickles (read
with an unpickler that only admits numpy arrays, so a foreign pickle cannot run code) or binary
batches, and SVHN "format 2" .mat files (scipy, an optional dependency). Every malformed file is a
`DataError` naming it.
"""

from __future__ import annotations

import codecs
import gzip
import math
import os
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..compiler.errors import DataError

# -------------------------------------------------------------------------------------------------
# IDX

_IDX_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _read_bytes(path: Path) -> bytes:
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        # gzip reports truncation as EOFError and garbage as BadGzipFile (an OSError)
        raise DataError(f"{path}: cannot read ({e}); the file is damaged, "
                        "fetch or copy it again") from e


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (raw or .gz) -> array of its declared shape, native byte order, writable.

    Checks the magic number, the element type and that the file holds exactly the declared elements.
    """
    path = Path(path)
    buf = _read_bytes(path)
    if len(buf) < 4 or buf[0] != 0 or buf[1] != 0 or buf[2] not in _IDX_DTYPES or buf[3] == 0:
        raise DataError(f"{path}: not an IDX file (bad magic number {buf[:4].hex() or 'empty'}); "
                        "expected 0x0000 + type code + number of dimensions")
    dtype, ndim = _IDX_DTYPES[buf[2]], buf[3]
    header_bytes = 4 + 4 * ndim
    if len(buf) < header_bytes:
        raise DataError(f"{path}: truncated IDX header ({len(buf)} bytes, "
                        f"{ndim} dimensions declared)")
    dims = tuple(int.from_bytes(buf[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    # Python ints: a header claiming dims of 2^31-1 must not wrap around (issue 17)
    want = header_bytes + math.prod(dims) * dtype.itemsize
    if len(buf) != want:
        what = "truncated" if len(buf) < want else "has trailing bytes"
        raise DataError(f"{path}: IDX file {what}: shape {dims} needs {want:,} bytes, file has "
                        f"{len(buf):,}; fetch or copy it again")
    arr = np.frombuffer(buf, dtype=dtype, offset=header_bytes).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))      # copy: native order and writable


# -------------------------------------------------------------------------------------------------
# per-format readers: list of paths (in the layout's order) -> (train split, test split)


@dataclass(frozen=True, eq=False)
class Split:
    x: np.ndarray            # (N, C, H, W) uint8
    y: np.ndarray            # (N,) integers
    x_file: Path             # what a shape / count / range error names
    y_file: Path


Splits = tuple[Split, Split]


def read_idx_splits(paths: list[Path]) -> Splits:
    out = []
    for img_path, lab_path in ((paths[0], paths[1]), (paths[2], paths[3])):
        x, y = read_idx(img_path), read_idx(lab_path)
        if x.dtype != np.uint8 or x.ndim != 3:
            raise DataError(f"{img_path}: expected unsigned-byte images (N, H, W), "
                            f"got {x.dtype} {x.shape}")
        if y.ndim != 1 or y.dtype.kind not in "iu":
            raise DataError(f"{lab_path}: expected integer labels (N,), got {y.dtype} {y.shape}")
        out.append(Split(x[:, None], y, img_path, lab_path))
    return out[0], out[1]


_NUMPY_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    ("numpy.core.multiarray", "scalar"): np._core.multiarray.scalar,
    ("numpy._core.multiarray", "scalar"): np._core.multiarray.scalar,
    ("numpy._core.numeric", "_frombuffer"): np._core.numeric._frombuffer,
    ("numpy.core.numeric", "_frombuffer"): np._core.numeric._frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,     # how Python 3's protocol 2 spells bytes
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts/lists/bytes and numpy arrays only: a CIFAR batch needs nothing else, and any
    other global in a pickle from a user directory could run arbitrary code."""

    def find_class(self, module: str, name: str):
        try:
            return _NUMPY_PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def load_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            # encoding="bytes": the official batches are Python 2 pickles with byte-string keys
            batch = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError) as e:
        raise DataError(f"{path}: not a CIFAR-10 python batch ({e}); use the files from "
                        "cifar-10-python.tar.gz") from e
    if not isinstance(batch, dict):
        raise DataError(f"{path}: not a CIFAR-10 python batch "
                        f"(holds {type(batch).__name__}, not dict)")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise DataError(f"{path}: CIFAR-10 batch without 'data'/'labels' entries "
                        f"(has {sorted(map(str, batch))})")
    data, labels = np.asarray(batch["data"]), np.asarray(batch["labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: 'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(f"{path}: 'labels' must be a list of integers, got {labels.dtype} "
                        f"{labels.shape}")
    if labels.shape[0] != data.shape[0]:
        raise DataError(f"{path}: {data.shape[0]} images but {labels.shape[0]} labels")
    check_labels(labels, 10, path)
    # each row is the R plane, then G, then B, each 32x32 row-major: exactly NCHW
    return data.reshape(-1, 3, 32, 32), labels


_CIFAR_RECORD_BYTES = 1 + 3 * 32 * 32


def load_cifar_bin(path: Path) -> tuple[np.ndarray, np.ndarray]:
    buf = _read_bytes(path)
    if not buf or len(buf) % _CIFAR_RECORD_BYTES:
        raise DataError(f"{path}: {len(buf)} bytes is not a whole number of "
                        f"{_CIFAR_RECORD_BYTES}-byte CIFAR-10 records (1 label byte + 3072 "
                        "pixels); the file is damaged")
    rec = np.frombuffer(buf, np.uint8).reshape(-1, _CIFAR_RECORD_BYTES)
    check_labels(rec[:, 0], 10, path)
    return rec[:, 1:].reshape(-1, 3, 32, 32).copy(), rec[:, 0].copy()


def cifar_splits(loader: Callable[[Path], tuple[np.ndarray, np.ndarray]]):
    def read(paths: list[Path]) -> Splits:
        train = [loader(p) for p in paths[:5]]
        x_test, y_test = loader(paths[5])
        # each batch was checked on its own; the folder stands for all five train batches
        folder = paths[0].parent
        return (Split(np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]),
                       folder, folder),
                Split(x_test, y_test, paths[5], paths[5]))
    return read


def load_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        from scipy.io import loadmat    # local: scipy is optional (SVHN only)
    except ImportError:
        raise DataError(f"{path}: reading SVHN .mat files needs scipy",
                        hint="pip install scipy") from None
    try:
        mat = loadmat(path, variable_names=("X", "y"))
    except (OSError, ValueError, NotImplementedError, TypeError) as e:
        # NotImplementedError: a v7.3 (HDF5) file, which SVHN's format 2 is not
        raise DataError(f"{path}: cannot read as a MATLAB v5 file ({e}); use SVHN's format 2 "
                        "train_32x32.mat / test_32x32.mat") from e
    if "X" not in mat or "y" not in mat:
        raise DataError(f"{path}: SVHN .mat file without 'X'/'y' variables")
    x, y = mat["X"], mat["y"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise DataError(f"{path}: 'X' must be uint8 (32, 32, 3, N), got {x.dtype} {x.shape}")
    y = y.reshape(-1)
    if y.shape[0] != x.shape[3] or not np.all(y == np.round(y)):
        raise DataError(f"{path}: 'y' must hold {x.shape[3]} integer labels, "
                        f"got {y.dtype} {y.shape}")
    y = y.astype(np.int64)
    bad = np.flatnonzero((y < 1) | (y > 10))
    if bad.size:
        raise DataError(f"{path}: label {y[bad[0]]} at index {bad[0]} is outside 1..10 "
                        "(SVHN format 2 writes digit 0 as 10)")
    # (H, W, C, N) -> (N, C, H, W); the copy makes it contiguous for fast batching
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), y % 10


def svhn_splits(paths: list[Path]) -> Splits:
    return tuple(Split(*load_svhn_mat(p), p, p) for p in paths)


def check_labels(y: np.ndarray, classes: int, where: Path) -> None:
    bad = np.flatnonzero((y < 0) | (y >= classes))
    if bad.size:
        raise DataError(f"{where}: label {int(y[bad[0]])} at index {int(bad[0])} is outside "
                        f"0..{classes - 1}")
