"""Datasets for training, evaluation and benchmarks: a `--data` spec -> examples fitted to a model.

The API (also what the fleet and firmware paths call):

    data = open_data(DataRequest("photos/", fit="resize", val_split=0.1), input_shape, classes)
    data.class_names                        # index -> name, fixed once
    data.fit.describe()                     # the transform to the model's input
    for x, y in data.batches("train"):      # streamed: uint8 pixels (or float32) fitted, int64
        ...
    x, y = data.arrays("test", preprocess)  # a whole split in memory, model inputs (float32)
    data.pack("train", path)                # the trainer's packed file, streamed, atomic

`DataRequest.spec` is a dataset name (MNIST, Fashion-MNIST, CIFAR-10, SVHN: `load_raw` /
`load_dataset` keep their historic array API) or a user path: a .npz (x, y, optional x_test, y_test,
class_names), an x.npy + y.npy pair, a CSV with a label column, or an image folder with one
subfolder per class (optionally train/ and test/). The readers are runtime/dataset_formats.py, the
split sources they become (read in chunks) runtime/data_sources.py, the fit to the model's input
(pad/resize, grey <-> RGB, NHWC -> NCHW) runtime/transforms.py, the u8 -> float map the model's
preprocessing (compiler/preprocess.py, `preprocess_pixels`). A test split comes from the data, from
a second source (`test`) or from a seeded hold-out (`val_split`).
`open_source(req)` gives the split sources before any model is involved (`bnnc data info`).

Named datasets live under a data root (`$BNNC_DATA`, else `~/.cache/bnnc/data`, or an explicit
directory) in one folder each (`mnist/`, `fashion-mnist/`, `cifar10/`, `svhn/`); a directory that
holds the files itself works too. runtime/fetch.py downloads MNIST and Fashion-MNIST into it;
CIFAR-10 and SVHN are on no reachable registry: the user supplies them.

Invariants: every check (shapes against the model, labels against its classes, CSV cells, array
dtypes and NaNs) happens in `open_data`, each failure a `DataError` naming the file and entry;
image folders decode lazily, so a damaged image is found when it is read, still naming the file,
and a packed file is only renamed into place when complete. Loading is deterministic (files in
sorted order, `limit` keeps the first samples, `val_split` a seeded permutation). Limits: named
datasets and .npz files are read into memory (CIFAR-10 train as uint8 is 150 MB); SVHN's `extra`
split and v7.3 (HDF5) .mat files are not supported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..compiler.c_literals import PIXEL_LUT
from ..compiler.errors import DataError
from ..compiler.preprocess import DEFAULT as DEFAULT_PREPROCESS
from ..compiler.preprocess import Preprocess, pixel_lut
from . import packed
from .data_sources import ArraySource, FolderSource, Source, Subset, prefix
from .dataset_formats import (Split, Splits, check_features, check_labels, cifar_splits,
                              csv_label_values, label_indices, list_image_folder, load_cifar_batch,
                              load_cifar_bin, read_arrays, read_csv, read_idx_splits, svhn_splits)
from .transforms import Fit, plan_fit

__all__ = ["DATASETS", "DatasetInfo", "Dataset", "data_root", "dataset_info", "load_dataset",
           "load_raw", "scale_pixels", "preprocess_pixels", "pad_to_cifar", "find_dataset_dir",
           "DataRequest", "ModelData", "open_data"]

_DIGITS = tuple(str(d) for d in range(10))


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    shape: tuple[int, int, int]        # (C, H, W) of one image
    class_names: tuple[str, ...]
    n_train: int                       # official split sizes, for `bnnc data list`
    n_test: int
    how_to_get: str                    # one sentence for error hints; see ROOT_HINT

    @property
    def classes(self) -> int:
        return len(self.class_names)


DATASETS: dict[str, DatasetInfo] = {d.name: d for d in (
    DatasetInfo("mnist", (1, 28, 28), _DIGITS, 60000, 10000,
                "run `bnnc data fetch mnist`"),
    DatasetInfo("fashion-mnist", (1, 28, 28),
                ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                 "Sneaker", "Bag", "Ankle boot"), 60000, 10000,
                "run `bnnc data fetch fashion-mnist`"),
    DatasetInfo("cifar10", (3, 32, 32),
                ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck"), 50000, 10000,
                "download cifar-10-python.tar.gz (or the binary version) from "
                "https://www.cs.toronto.edu/~kriz/cifar.html and unpack it into "
                "<data root>/cifar10/"),
    DatasetInfo("svhn", (3, 32, 32), _DIGITS, 73257, 26032,
                "download train_32x32.mat and test_32x32.mat (format 2) from "
                "http://ufldl.stanford.edu/housenumbers/ into <data root>/svhn/"),
)}

ROOT_HINT = "the data root is --data-dir DIR, else $BNNC_DATA, else ~/.cache/bnnc/data"
_ALIASES = {"fashion_mnist": "fashion-mnist", "fmnist": "fashion-mnist", "cifar-10": "cifar10",
            "cifar_10": "cifar10"}


@dataclass(frozen=True, eq=False)    # arrays have no truth value: compare datasets by identity
class Dataset:
    name: str
    x_train: np.ndarray      # (N, C, H, W): float32 in [-1, 1] (load_dataset) or uint8 (load_raw)
    y_train: np.ndarray      # (N,) int64 in 0..classes-1
    x_test: np.ndarray
    y_test: np.ndarray
    classes: int
    source: Path | None = None   # directory the files were read from

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, train {self.x_train.shape} {self.x_train.dtype}, "
                f"test {self.x_test.shape} {self.x_test.dtype}, classes={self.classes})")


def data_root() -> Path:
    """`$BNNC_DATA` if set and non-empty, else `~/.cache/bnnc/data`."""
    env = os.environ.get("BNNC_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "bnnc" / "data"


def dataset_info(name: str) -> DatasetInfo:
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return DATASETS[key]


# -------------------------------------------------------------------------------------------------
# pixels

# One rounding from the exact rational (2x - 255) / 255, so every caller (and the C side, which
# can copy this table) gets bit-identical inputs whatever float32 operation order it would use.


def scale_pixels(x: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 `2*x/255 - 1` in [-1, 1], same shape."""
    if x.dtype != np.uint8:
        raise DataError(f"scale_pixels expects uint8 pixels, got {x.dtype}; "
                        "scale raw data only once")
    return PIXEL_LUT[x]


def pad_to_cifar(x: np.ndarray, *, fill: float | None = None) -> np.ndarray:
    """(N, 28, 28) or (N, 1, 28, 28) -> (N, 3, 32, 32): pad 2 pixels each side, repeat the channel.

    This lets the CIFAR-shaped CNNs (CNV, BinaryNet) run unchanged on MNIST/Fashion-MNIST
    (DATASETS.md). The border is raw pixel 0 (black, as the digits' background): `fill` defaults
    to 0 for uint8 input and to -1.0 (the scaled value of pixel 0) for float input, so padding
    commutes with `scale_pixels`.
    """
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 3 or x.shape[1:] != (28, 28):
        raise DataError(f"pad_to_cifar expects (N, 28, 28) or (N, 1, 28, 28) images, got {x.shape}")
    if fill is None:
        fill = 0 if x.dtype == np.uint8 else -1.0
    padded = np.pad(x, ((0, 0), (2, 2), (2, 2)), constant_values=fill)
    return np.repeat(padded[:, None], 3, axis=1)


# -------------------------------------------------------------------------------------------------
# layouts: which files make up a dataset on disk, in reading order

@dataclass(frozen=True)
class _Layout:
    files: tuple[tuple[str, ...], ...]   # per needed file: accepted names, preferred first
    read: Callable[[list[Path]], Splits]


def _idx_layout() -> _Layout:
    stems = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")
    return _Layout(tuple((s, s + ".gz") for s in stems), read_idx_splits)


_CIFAR_PY = tuple((f"data_batch_{i}",) for i in range(1, 6)) + (("test_batch",),)
_LAYOUTS: dict[str, tuple[_Layout, ...]] = {
    "mnist": (_idx_layout(),),
    "fashion-mnist": (_idx_layout(),),
    "cifar10": (_Layout(_CIFAR_PY, cifar_splits(load_cifar_batch)),
                _Layout(tuple((n[0] + ".bin",) for n in _CIFAR_PY),
                        cifar_splits(load_cifar_bin))),
    "svhn": (_Layout((("train_32x32.mat",), ("test_32x32.mat",)), svhn_splits),),
}
# folder names the official archives unpack to, looked for inside the dataset folder or the root
_ARCHIVE_DIRS = {"cifar10": ("cifar-10-batches-py", "cifar-10-batches-bin")}


def _candidate_dirs(name: str, root: Path) -> list[Path]:
    bases = [root / name, root]
    subs = _ARCHIVE_DIRS.get(name, ())
    return [b / s for b in bases for s in subs] + bases


def _match(layout: _Layout, d: Path) -> tuple[list[Path], list[str]]:
    """(found paths, names of missing files) of `layout` in directory `d`."""
    found, missing = [], []
    for names in layout.files:
        hit = next((d / n for n in names if (d / n).is_file()), None)
        if hit is None:
            missing.append(names[0])
        else:
            found.append(hit)
    return found, missing


def _resolve_root(root: str | os.PathLike | None) -> Path:
    r = Path(root).expanduser() if root is not None else data_root()
    if not r.is_dir():
        raise DataError(f"data directory {r} does not exist",
                        hint="pass --data-dir DIR or set $BNNC_DATA to the folder holding "
                             "the datasets")
    return r


def find_dataset_dir(name: str, root: str | os.PathLike | None = None) -> Path:
    """The directory under `root` (default `data_root()`) that holds a complete copy of `name`."""
    return _locate(dataset_info(name), _resolve_root(root))[0]


def _locate(info: DatasetInfo, root: Path) -> tuple[Path, list[Path], _Layout]:
    best: tuple[int, Path, list[str]] | None = None
    for d in _candidate_dirs(info.name, root):
        if not d.is_dir():
            continue
        for layout in _LAYOUTS[info.name]:
            found, missing = _match(layout, d)
            if not missing:
                return d, found, layout
            if found and (best is None or len(found) > best[0]):
                best = (len(found), d, missing)
    if best is not None:     # a partial copy: name exactly what it lacks
        _, d, missing = best
        raise DataError(f"{d / missing[0]} not found ({info.name} in {d} lacks "
                        f"{', '.join(missing)})", hint=f"{info.how_to_get}; {ROOT_HINT}")
    first = _LAYOUTS[info.name][0].files[0][0]
    raise DataError(f"{root / info.name / first} not found: no {info.name} data under {root}",
                    hint=f"{info.how_to_get}; {ROOT_HINT}")


def _checked_labels(info: DatasetInfo, split: Split) -> np.ndarray:
    x, y = split.x, split.y
    if x.shape[1:] != info.shape:
        raise DataError(f"{split.x_file}: {info.name} images must be {info.shape}, "
                        f"got {x.shape[1:]}")
    if y.shape[0] != x.shape[0]:
        raise DataError(f"{split.y_file}: {y.shape[0]} labels for the {x.shape[0]} images of "
                        f"{split.x_file.name}")
    check_labels(y, info.classes, split.y_file)
    return y.astype(np.int64)


def load_raw(name: str, root: str | os.PathLike | None = None, *,
             limit: int | None = None) -> Dataset:
    """Like `load_dataset` but with the uint8 pixels as stored (NCHW)."""
    info = dataset_info(name)
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit must be a positive number of samples, got {limit!r}")
    d, paths, layout = _locate(info, _resolve_root(root))
    train, test = layout.read(paths)
    y_tr, y_te = _checked_labels(info, train), _checked_labels(info, test)
    n = limit if limit is not None else max(len(y_tr), len(y_te))
    return Dataset(info.name, train.x[:n], y_tr[:n], test.x[:n], y_te[:n], info.classes, d)


def load_dataset(name: str, root: str | os.PathLike | None = None, *,
                 limit: int | None = None) -> Dataset:
    """Dataset `name` from `root` (default `data_root()`): float32 NCHW images in [-1, 1], int64
    labels.

    `limit` keeps the first `limit` samples of each split (train and test).
    """
    raw = load_raw(name, root, limit=limit)
    return Dataset(raw.name, scale_pixels(raw.x_train), raw.y_train, scale_pixels(raw.x_test),
                   raw.y_test, raw.classes, raw.source)


def preprocess_pixels(x: np.ndarray, pre: Preprocess = DEFAULT_PREPROCESS) -> np.ndarray:
    """Model inputs of examples `x` shaped for the model ((N, C, H, W) or (N, F)): uint8 pixels
    through the per-channel table of `pre` (compiler/preprocess.py), floats unchanged (float32)."""
    if x.dtype != np.uint8:
        return np.asarray(x, np.float32)
    channels = x.shape[1] if x.ndim == 4 else 1
    lut = pixel_lut(pre, channels)
    if channels == 1:
        return lut[0][x]
    return np.stack([lut[c][x[:, c]] for c in range(channels)], axis=1)


# -------------------------------------------------------------------------------------------------
# --data SPEC -> a dataset fitted to a model

@dataclass(frozen=True)
class DataRequest:
    """What the user asked for with --data and its companions (`bnnc run/eval/train/data`)."""
    spec: str                              # a dataset name or a path (.npz, x.npy, .csv, folder)
    data_dir: Path | None = None           # root of the named datasets
    test: str | None = None                # --test-data: a second source for the test split
    val_split: float | None = None         # --val-split: hold out this fraction of train
    split_seed: int = 0                    # --split-seed
    label_column: str | None = None        # --label-column (CSV)
    fit: str | None = "auto"               # --fit (runtime/transforms.py); None = "auto"
    layout: str | None = None              # --layout nchw|nhwc for 3-d arrays
    limit: int | None = None               # --limit: the first N training examples


@dataclass(frozen=True, eq=False)
class ModelData:
    """A dataset fitted to one model: the train and test `Source`s, the class names (index ->
    name, fixed once), the `Fit` and the model's class count. `arrays`/`batches` give model-ready
    data, `pack` streams a split into the trainer's packed file, `record` is what OUT/data.json
    keeps."""
    name: str
    train: Source
    test: Source | None
    class_names: tuple[str, ...]
    fit: Fit
    classes: int
    request: DataRequest

    def split(self, which: str) -> Source:
        src = self.train if which == "train" else self.test
        if src is None:
            raise DataError(f"{self.name} has no test split",
                            hint="pass --test-data SPEC (a second source) or --val-split F")
        return src

    def batches(self, which: str, size: int = 256) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(x fitted to the model, uint8 pixels or float32, y int64) chunk by chunk, in order."""
        src = self.split(which)
        for i in range(0, src.count, size):
            j = min(src.count, i + size)
            yield src.fitted(i, j, self.fit), src.labels[i:j]

    def arrays(self, which: str, pre: Preprocess | None = DEFAULT_PREPROCESS
               ) -> tuple[np.ndarray, np.ndarray]:
        """The whole split in memory: (x, y); `pre` None keeps raw pixels."""
        xs, ys = zip(*self.batches(which, 1024))
        x = np.concatenate(xs)
        return (x if pre is None else preprocess_pixels(x, pre)), np.concatenate(ys)

    def pack(self, which: str, path: Path) -> int:
        """Stream a split into a packed dataset file (runtime/packed.py), written atomically;
        returns the format (packed.U8 or packed.F32)."""
        src = self.split(which)
        return packed.pack_stream(path, src.count, self.fit.dst, src.labels, self.classes,
                                  (x for x, _ in self.batches(which)),
                                  float_data=src.dtype != np.uint8)

    def record(self) -> dict:
        r = self.request
        return {"data": r.spec, "test_data": r.test, "val_split": r.val_split,
                "split_seed": r.split_seed, "label_column": r.label_column,
                "fit": r.fit or "auto", "layout": r.layout,
                "limit": r.limit, "name": self.name, "class_names": list(self.class_names),
                "transform": self.fit.to_dict(), "train_count": self.train.count,
                "test_count": None if self.test is None else self.test.count}


def open_data(req: DataRequest, input_shape: tuple[int, ...], classes: int, *,
              model_name: str = "the model") -> ModelData:
    """The dataset `req` fitted to a model with per-sample input `input_shape` and `classes`
    outputs; every check (shapes, labels against the model's classes, files) is done here, so
    later reads only meet damaged files (image folders decode lazily)."""
    mode = None if len(input_shape) != 3 else ("L" if input_shape[0] == 1 else "RGB")
    name, train, test, names = open_source(req, mode)
    for src in (train, test):
        if src is None:
            continue
        bad = np.flatnonzero((src.labels < 0) | (src.labels >= classes))
        if bad.size:
            raise DataError(f"{src.where(int(bad[0]))}: label {int(src.labels[bad[0]])} is "
                            f"outside the model's classes 0..{classes - 1}")
    if len(names) > classes:
        raise DataError(f"{req.spec}: {len(names)} classes ({', '.join(names[:12])}"
                        f"{', ...' if len(names) > 12 else ''}) but {model_name} outputs "
                        f"{classes}", hint="pick data with at most the model's classes")
    fit = plan_fit(train.shape, input_shape, req.fit or "auto", layout=req.layout, what=req.spec)
    if test is not None and test.shape != train.shape and fit.size != "resize":
        plan_fit(test.shape, input_shape, req.fit or "auto", layout=req.layout, what=test.name)
        raise DataError(f"{test.where(0)}: test examples are {test.shape}, training examples "
                        f"{train.shape}", hint="pass --fit resize, or use data of one shape")
    return ModelData(name, train, test, names, fit, classes, req)


def fit_pixels(graph, x: np.ndarray, what: str, pre: Preprocess = DEFAULT_PREPROCESS
               ) -> np.ndarray:
    """uint8 examples in their native layout -> model inputs of `graph`: fitted as `--fit auto`
    would (runtime/transforms.py) and mapped through `pre` (benchmarks that transform raw pixels
    first, e.g. inverted digits)."""
    fit = plan_fit(tuple(x.shape[1:]), graph.input_shape, "auto", what=what)
    return preprocess_pixels(fit.apply(x), pre)


def training_data(graph, spec: str, data_dir: str | os.PathLike | None = None,
                  limit: int | None = None, pre: Preprocess = DEFAULT_PREPROCESS
                  ) -> tuple[ModelData, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The in-memory form of `--data SPEC` for a model: (data, x_train, y_train, x_test, y_test)
    fitted to `graph`'s input and mapped through `pre` (the fleet's in-process devices and the
    benchmarks train on it; `bnnc run` streams the same data through `ModelData.pack`)."""
    data = open_data(DataRequest(spec, Path(data_dir) if data_dir else None, limit=limit),
                     graph.input_shape, graph.num_classes, model_name=repr(graph.name))
    x_train, y_train = data.arrays("train", pre)
    x_test, y_test = data.arrays("test", pre)
    return data, x_train, y_train, x_test, y_test


def open_source(req: DataRequest, mode: str | None = None
                ) -> tuple[str, Source, Source | None, tuple[str, ...]]:
    """(name, train, test or None, class names) of `req` before any model is involved: the
    --data source, its test split (own, --test-data, or --val-split) and --limit. `mode` is the
    pillow mode image folders decode to ("L", "RGB"; None: as the first image is)."""
    name, train, test, names = _open_spec(req.spec, req, mode)
    if req.test is not None:
        tname, ttrain, ttest, tnames = _open_spec(req.test, req, mode)
        # a named dataset gives its test split; a file or folder all of its (main) examples
        test = ttest if not Path(req.test).expanduser().exists() else ttrain
        test = _renamed(test, tnames, names, req.test)
    if req.val_split is not None:
        if req.test is not None:
            raise DataError("--val-split and --test-data exclude each other",
                            hint="keep one way of choosing the test split")
        if not 0 < req.val_split < 1:
            raise DataError(f"--val-split {req.val_split} must lie between 0 and 1")
        n_val = max(1, int(round(req.val_split * train.count)))
        if n_val >= train.count:
            raise DataError(f"--val-split {req.val_split} leaves no training examples of "
                            f"{train.count}")
        perm = np.random.default_rng(req.split_seed).permutation(train.count)
        test = Subset(train, np.sort(perm[:n_val]), f"{name} val")
        train = Subset(train, np.sort(perm[n_val:]), name)
    if req.limit is not None:
        train = prefix(train, req.limit)
    return name, train, test, names


def _renamed(src: Source | None, names: tuple[str, ...], want: tuple[str, ...],
             spec: str) -> Source | None:
    """A test source whose class names differ from the training set's: its labels mapped by name
    (an image folder lacking a class still lines up); DataError for a class the training set
    does not have."""
    if src is None or names == want[:len(names)]:
        return src
    index = {n: i for i, n in enumerate(want)}
    extra = [n for n in names if n not in index]
    if extra:
        raise DataError(f"{spec}: class {extra[0]!r} is not among the training classes "
                        f"({', '.join(want[:12])})")
    remap = np.array([index[n] for n in names], np.int64)
    src.labels = remap[src.labels]
    src.class_names = want
    return src


def _open_spec(spec: str, req: DataRequest, mode: str | None
               ) -> tuple[str, Source | None, Source | None, tuple[str, ...]]:
    """(name, train, test or None, class names) of one --data / --test-data value."""
    path = Path(spec).expanduser()
    if not path.exists():
        if spec.lower() in DATASETS or spec.lower() in _ALIASES:
            d = load_raw(spec, req.data_dir)
            info = dataset_info(spec)
            return (d.name, ArraySource(d.name, d.x_train, d.y_train, info.class_names,
                                        f"{d.name} train"),
                    ArraySource(f"{d.name} test", d.x_test, d.y_test, info.class_names,
                                f"{d.name} test"), info.class_names)
        raise DataError(f"--data {spec}: no such file or folder, and not a dataset name",
                        hint=f"datasets: {', '.join(DATASETS)}; or a .npz, x.npy, .csv or an "
                             "image folder")
    if path.is_dir() and not (path / "x.npy").is_file():
        return _open_folder(path, mode)
    if path.suffix.lower() == ".csv":
        x, labels, _ = read_csv(path, req.label_column)
        y, names = label_indices(csv_label_values(labels), str(path))
        return path.stem, ArraySource(path.stem, x, y, names, str(path)), None, names
    if req.label_column is not None:
        raise DataError(f"--label-column is for CSV files; {path} is not one")
    arrays = read_arrays(path)
    given = None
    if "class_names" in arrays:
        given = tuple(str(n) for n in np.asarray(arrays["class_names"]).tolist())
    x = check_features(arrays["x"], f"{path} 'x'")
    y, names = label_indices(arrays["y"], f"{path} 'y'", given)
    name = path.stem if path.suffix == ".npz" else \
        (path.name if path.is_dir() else path.parent.name)
    train = ArraySource(name, x, y, names, str(path))
    test = None
    if "x_test" in arrays:
        xt = check_features(arrays["x_test"], f"{path} 'x_test'")
        yt, tnames = label_indices(arrays["y_test"], f"{path} 'y_test'", given)
        if given is None and len(tnames) > len(names):
            names = tnames
            train.class_names = names
        test = ArraySource(f"{name} test", xt, yt, names, f"{path} (x_test)")
        if xt.shape[1:] != x.shape[1:]:
            raise DataError(f"{path}: 'x_test' examples are {xt.shape[1:]}, 'x' examples "
                            f"{x.shape[1:]}")
    return name, train, test, names


def _open_folder(root: Path, mode: str | None):
    subs = {d.name for d in root.iterdir() if d.is_dir()}
    if {"train", "test"} <= subs:
        names, files = list_image_folder(root / "train")
        tnames, tfiles = list_image_folder(root / "test")
        train = FolderSource(root.name, files, names, mode)
        test = _renamed(FolderSource(f"{root.name} test", tfiles, tnames, mode), tnames, names,
                        str(root / "test"))
        return root.name, train, test, names
    names, files = list_image_folder(root)
    return root.name, FolderSource(root.name, files, names, mode), None, names
