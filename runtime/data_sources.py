"""Data sources: one split of examples (`Source`), read in chunks so that image folders decode only
what is asked for. `ArraySource` holds arrays in memory (named datasets, .npz, x.npy + y.npy, CSV),
`FolderSource` decodes an image folder one image at a time with pillow, `Subset` picks examples
of another source (a seeded --val-split part, a --limit prefix: `prefix`). runtime/datasets.py
opens a --data spec into these and fits them to a model (runtime/transforms.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..compiler.errors import DataError
from .dataset_formats import decode_image
from .transforms import Fit


class Source:
    """One split: `count` examples with int64 `labels` (known without decoding) and
    `class_names`; `examples(i, j)` gives the native arrays of examples i..j-1, `where(i)` names
    example i in messages. `shape` is the native shape of one example (the first one's for image
    folders), `dtype` uint8 (pixels) or float32 (features)."""
    name: str
    labels: np.ndarray
    class_names: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def count(self) -> int:
        return len(self.labels)

    def examples(self, i: int, j: int) -> np.ndarray:
        raise NotImplementedError

    def where(self, i: int) -> str:
        raise NotImplementedError

    def fitted(self, i: int, j: int, fit: Fit) -> np.ndarray:
        """Examples i..j-1 fitted to the model (runtime/transforms.py)."""
        return fit.apply(self.examples(i, j))


class ArraySource(Source):
    def __init__(self, name: str, x: np.ndarray, labels: np.ndarray,
                 class_names: tuple[str, ...], file: str):
        self.name, self.x, self.labels, self.class_names, self.file = name, x, labels, \
            tuple(class_names), file
        self.shape, self.dtype = tuple(x.shape[1:]), np.dtype(x.dtype)
        if len(x) != len(labels):
            raise DataError(f"{file}: {len(x)} examples but {len(labels)} labels")

    def examples(self, i: int, j: int) -> np.ndarray:
        return np.asarray(self.x[i:j])

    def where(self, i: int) -> str:
        return f"{self.file} entry {i}"


class FolderSource(Source):
    """Images decoded one by one with pillow (`dataset_formats.decode_image`): never the whole
    folder in memory."""

    def __init__(self, name: str, files: list[tuple[Path, int]], class_names: tuple[str, ...],
                 mode: str | None):
        self.name, self.files, self.class_names, self.mode = name, files, tuple(class_names), mode
        self.labels = np.array([k for _, k in files], np.int64)
        first = decode_image(files[0][0], mode)
        self.shape, self.dtype = tuple(first.shape), np.dtype(np.uint8)

    def examples(self, i: int, j: int) -> np.ndarray:
        out = [self._decode(k) for k in range(i, j)]
        for k, img in zip(range(i, j), out):
            if img.shape != self.shape:
                raise DataError(f"{self.files[k][0]}: image is {_size(img.shape)} but "
                                f"{self.files[0][0].name} is {_size(self.shape)}",
                                hint="pass --fit resize to scale every image to the model's size")
        return np.stack(out)

    def fitted(self, i: int, j: int, fit: Fit) -> np.ndarray:
        if fit.size != "resize":
            return fit.apply(self.examples(i, j))
        return np.concatenate([fit.apply(self._decode(k)[None]) for k in range(i, j)])

    def _decode(self, k: int) -> np.ndarray:
        img = decode_image(self.files[k][0], self.mode)
        if img.ndim != len(self.shape):      # mode None: grey and colour images mixed
            img = decode_image(self.files[k][0], "RGB" if len(self.shape) == 3 else "L")
        return img

    def where(self, i: int) -> str:
        return str(self.files[i][0])


def _size(shape: tuple[int, ...]) -> str:
    return f"{shape[1]}x{shape[0]}" + (f" with {shape[2]} channels" if len(shape) == 3 else "")


class Subset(Source):
    """The examples `index` (sorted) of `base`: a seeded --val-split part or a --limit prefix."""

    def __init__(self, base: Source, index: np.ndarray, name: str):
        self.base, self.index, self.name = base, np.asarray(index, np.int64), name
        self.labels = base.labels[self.index]
        self.class_names, self.shape, self.dtype = base.class_names, base.shape, base.dtype

    def examples(self, i: int, j: int) -> np.ndarray:
        return np.concatenate([self.base.examples(int(k), int(k) + 1) for k in self.index[i:j]])

    def fitted(self, i: int, j: int, fit: Fit) -> np.ndarray:
        return np.concatenate([self.base.fitted(int(k), int(k) + 1, fit)
                               for k in self.index[i:j]])

    def where(self, i: int) -> str:
        return self.base.where(int(self.index[i]))


def prefix(src: Source, n: int) -> Source:
    if n >= src.count:
        return src
    if isinstance(src, ArraySource):
        return ArraySource(src.name, src.x[:n], src.labels[:n], src.class_names, src.file)
    return Subset(src, np.arange(n), src.name)
