"""Dataset files on disk -> uint8 image arrays and integer labels, one reader per format.

Input: the paths of one dataset copy in its layout's order (runtime/datasets.py finds them).
Output: a (train, test) pair of `Split`s: NCHW uint8 images, labels, and the files a later
shape/count/range error should name.

Formats: IDX (raw or .gz, any IDX element type; MNIST-like datasets), CIFAR-10 python pickles (read
with an unpickler that only admits numpy arrays, so a foreign pickle cannot run code) or binary
batches, and SVHN "format 2" .mat files (scipy, an optional dependency). Every malformed file is a
`DataError` naming it.

User formats (`--data PATH`, runtime/datasets.py `open_data`): `read_arrays` (a .npz with `x`, `y`
and optionally `x_test`, `y_test`, `class_names`; or an `x.npy`/`y.npy` pair, memory-mapped),
`read_csv` (feature columns plus a named label column), `list_image_folder` (one subfolder per
class, optionally under `train/` and `test/`) and `decode_image` (one PNG/JPEG/BMP file with
pillow). `label_indices` maps label values to class indices once: non-negative integers are their
own index (classes "0".."max"), anything else is a class name, indexed in sorted order. Errors
name the file and the entry (array index, CSV row as numbered by a text editor, image file).
"""

from __future__ import annotations

import codecs
import csv
import gzip
import math
import os
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

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


# -------------------------------------------------------------------------------------------------
# user formats

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def label_indices(values: np.ndarray, where: str, names: tuple[str, ...] | None = None
                  ) -> tuple[np.ndarray, tuple[str, ...]]:
    """Label values -> (int64 class indices, class names) (module docstring); `names` given: the
    values must be integer indices into it."""
    v = np.asarray(values)
    if v.ndim != 1:
        raise DataError(f"{where}: labels must be one value per example, got shape {v.shape}")
    if v.dtype.kind in "iub" or (v.dtype.kind == "f" and np.all(np.isfinite(v))
                                 and np.all(v == np.round(v))):
        y = v.astype(np.int64)
        bad = np.flatnonzero(y < 0)
        if bad.size:
            raise DataError(f"{where}: label {y[bad[0]]} at entry {bad[0]} is negative",
                            hint="labels are class indices 0, 1, ... or class names")
        if names is not None:
            bad = np.flatnonzero(y >= len(names))
            if bad.size:
                raise DataError(f"{where}: label {y[bad[0]]} at entry {bad[0]} has no class name "
                                f"({len(names)} names given)")
            return y, tuple(names)
        return y, tuple(str(k) for k in range(int(y.max(initial=0)) + 1))
    if v.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(v) | (v != np.round(v)))
        raise DataError(f"{where}: label {v[bad[0]]!r} at entry {bad[0]} is not a class index",
                        hint="labels are class indices 0, 1, ... or class names")
    if v.dtype.kind not in "US":
        raise DataError(f"{where}: labels of type {v.dtype} are neither integers nor names")
    text = v.astype(str)
    uniq = tuple(sorted(set(text.tolist())))
    if names is not None:
        raise DataError(f"{where}: labels are names, so no separate class_names may be given")
    lookup = {n: i for i, n in enumerate(uniq)}
    return np.array([lookup[t] for t in text.tolist()], np.int64), uniq


def _load_npy(path: Path, what: str) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: cannot read {what} as a .npy array ({e})",
                        hint="save it with numpy.save") from e


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a .npz file, or of an `x.npy` + `y.npy` pair (`path` is the x file or the
    folder holding both; also `x_test.npy`/`y_test.npy`). Keys: x, y [, x_test, y_test,
    class_names]; DataError naming the file when something is missing or unreadable."""
    path = Path(path)
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                out = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: cannot read as a .npz archive ({e})",
                            hint="save it with numpy.savez(path, x=..., y=...)") from e
        missing = [k for k in ("x", "y") if k not in out]
        if missing:
            raise DataError(f"{path}: no array named {' or '.join(map(repr, missing))} (it holds "
                            f"{', '.join(map(repr, sorted(out))) or 'nothing'})",
                            hint="save it with numpy.savez(path, x=images, y=labels)")
        return out
    folder = path if path.is_dir() else path.parent
    stem = "" if path.is_dir() else path.name[:-len("x.npy")] if path.name.endswith("x.npy") \
        else None
    if stem is None:
        raise DataError(f"{path}: an array file must be a .npz, or the x of an x.npy + y.npy pair",
                        hint="name the pair NAMEx.npy / NAMEy.npy (e.g. x.npy and y.npy)")
    out = {}
    for key in ("x", "y", "x_test", "y_test"):
        f = folder / f"{stem}{key}.npy"
        if f.is_file():
            out[key] = _load_npy(f, key)
        elif key in ("x", "y"):
            raise DataError(f"{f} not found: an .npy pair needs {stem}x.npy and {stem}y.npy in "
                            f"{folder}")
    if ("x_test" in out) != ("y_test" in out):
        raise DataError(f"{folder}: {stem}x_test.npy and {stem}y_test.npy go together")
    return out


def check_features(x: np.ndarray, where: str) -> np.ndarray:
    """uint8 pixels as they are, floats as float32 (finite); DataError naming the entry."""
    if x.ndim < 2 or x.shape[0] == 0:
        raise DataError(f"{where}: expected examples along the first axis, got shape {x.shape}")
    if x.dtype == np.uint8:
        return x
    if x.dtype.kind != "f":
        raise DataError(f"{where}: inputs must be uint8 pixels or floats, got {x.dtype}",
                        hint="convert with x.astype(numpy.uint8) (pixels 0..255) or float32")
    x = np.asarray(x, np.float32)
    bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if bad.any():
        raise DataError(f"{where}: entry {int(np.flatnonzero(bad)[0])} holds a NaN or infinity")
    return x


def read_csv(path: Path, label_column: str | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A CSV with a header row: (float32 features (N, F), raw label strings (N,), feature names).
    Every cell of a feature column must be a number; rows are numbered as in a text editor."""
    path = Path(path)
    if label_column is None:
        raise DataError(f"{path}: a CSV dataset needs --label-column NAME (the column holding the "
                        "class of each row)")
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read as CSV ({e})") from e
    if not rows or not rows[0]:
        raise DataError(f"{path}: empty CSV file (expected a header row naming the columns)")
    header = [h.strip() for h in rows[0]]
    if label_column not in header:
        raise DataError(f"{path}: no column {label_column!r} (columns: {', '.join(header)})",
                        hint="pass --label-column with one of the header's names")
    li = header.index(label_column)
    feats = [i for i in range(len(header)) if i != li]
    if not feats:
        raise DataError(f"{path}: no feature column besides the label column {label_column!r}")
    body = [(n, r) for n, r in enumerate(rows[1:], start=2) if any(c.strip() for c in r)]
    if not body:
        raise DataError(f"{path}: no data rows after the header")
    x = np.empty((len(body), len(feats)), np.float32)
    labels = []
    for k, (n, r) in enumerate(body):
        if len(r) != len(header):
            raise DataError(f"{path}: row {n} has {len(r)} fields, the header has {len(header)}",
                            hint="every row needs one value per column")
        for j, i in enumerate(feats):
            cell = r[i].strip()
            if not cell:
                raise DataError(f"{path}: row {n}, column {header[i]!r} is empty",
                                hint="fill in or drop the row")
            try:
                v = float(cell)
            except ValueError:
                raise DataError(f"{path}: row {n}, column {header[i]!r}: {cell!r} is not a number"
                                ) from None
            if not np.isfinite(v):
                raise DataError(f"{path}: row {n}, column {header[i]!r}: {cell!r} is not finite")
            x[k, j] = v
        lab = r[li].strip()
        if not lab:
            raise DataError(f"{path}: row {n}, label column {label_column!r} is empty")
        labels.append(lab)
    return x, np.array(labels), [header[i] for i in feats]


def csv_label_values(labels: np.ndarray) -> np.ndarray:
    """CSV label strings as integers when every one is a non-negative integer, else as names."""
    try:
        ints = np.array([int(t) for t in labels.tolist()], np.int64)
    except ValueError:
        return labels
    return ints if (ints >= 0).all() else labels


def list_image_folder(root: Path) -> tuple[tuple[str, ...], list[tuple[Path, int]]]:
    """(class names, [(image file, class index)]) of a one-subfolder-per-class folder, classes in
    sorted order, files sorted by name; DataError for a folder without classes or an empty class."""
    root = Path(root)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class subfolders (expected {root}/<class name>/<images>)",
                        hint="put each class's images in a subfolder named after the class")
    files = []
    for k, name in enumerate(classes):
        imgs = sorted(p for p in (root / name).iterdir()
                      if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not imgs:
            raise DataError(f"{root / name}: empty class folder (no {'/'.join(IMAGE_SUFFIXES)} "
                            "files)", hint="add images or remove the folder")
        files += [(p, k) for p in imgs]
    return tuple(classes), files


def decode_image(path: Path, mode: str | None) -> np.ndarray:
    """One image file -> uint8 (H, W) (mode "L") or (H, W, 3) ("RGB"); `mode` None: "L" for
    grey images, else "RGB". DataError naming the file when it is damaged or no image."""
    try:
        with Image.open(path) as img:
            img.load()
            m = mode or ("L" if img.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB")
            return np.asarray(img.convert(m))
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError,
            Image.DecompressionBombError) as e:
        raise DataError(f"{path}: not a readable image ({e})",
                        hint="replace or remove the file (corrupt or truncated?)") from e
