"""A small learnable MNIST look-alike on disk (class k lights up row band k), in the idx format the
real MNIST files use, for tests that train through `bnnc run --data mnist --data-dir ROOT`."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np


def idx_bytes(arr: np.ndarray) -> bytes:
    head = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + b"".join(struct.pack(">I", d)
                                                                 for d in arr.shape)
    return head + arr.astype(np.uint8).tobytes()


def write_mnist_like(root: Path, n_train: int, n_test: int, seed: int) -> Path:
    """ROOT/mnist/{train,t10k}-{images,labels}-... ; returns ROOT."""
    d = Path(root) / "mnist"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        y = rng.integers(0, 10, n)
        x = rng.integers(0, 60, (n, 28, 28))
        for i, k in enumerate(y):
            x[i, 2 * k + 4: 2 * k + 7, 4:24] = 255
        (d / f"{prefix}-images-idx3-ubyte").write_bytes(idx_bytes(x))
        (d / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes(y))
    return Path(root)


def pack_bands(path: Path, n: int = 120, seed: int = 3) -> Path:
    """n learnable examples in the MNIST shape (class k lights up row band k over noise) as a
    packed u8 dataset (`bnnc data pack`'s format), for tests that run a trainer directly."""
    from bnnc.runtime import packed
    from bnnc.runtime.datasets import scale_pixels
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    px = rng.integers(0, 60, (n, 784)).astype(np.uint8)
    for i, k in enumerate(y):
        px[i].reshape(28, 28)[2 * k + 4: 2 * k + 7, 4:24] = 255
    assert packed.pack(path, scale_pixels(px), y, 10) == packed.U8
    return path
