"""Hand-built `ir.Graph` factories for tests: tiny MLP, MLP, CNV, BinaryNet, residual block.

seed -> a verified `ir.Graph` with float32 parameters (no ONNX file, no frontend). Shared by tests;
depends on numpy and `bnnc.compiler.ir` only.

Invariants of every factory:
- layer names follow bnnc's scheme (`fc1`, `conv2`, `bn2`, `sign2`, `pool2`, ...); verify() passes;
- latent weights are `N(0, 1/fan_in)` (ALGORITHM.md §1) except ~5 % of entries pushed to magnitudes
  in [1.05, 1.5], so the weight STE mask `1[|W| <= 1]` has zeros to get wrong (real layers get them
  too: their gradient must *not* be masked);
- BN parameters are randomized (gamma in [0.5, 1.5], beta in [-0.5, 0.5], running stats near
  (0, 1)), so gamma matters in the backward pass and the STE mask `1[|Z| <= 1]` cuts a fair share;
- BN eps 1e-4 and momentum 0.9 (Keras convention), as in the zoo;
- no bias on a layer that feeds a BN (its gradient would be a structural zero, i.e. rounding noise
  that Adam's m/(sqrt(v)+eps) turns into an arbitrary-sign step); real biases only where they count.

`sample_batch` draws inputs on a 1/128 grid in [-1, 1) (8-bit pixels, as `2x/255 - 1` scaling gives,
but dyadic): with ±1 weights every binary layer's pre-activation is then exactly representable in
float32, so two implementations agree bit for bit on it whatever their summation order, and max-pool
ties are real ties in both.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from bnnc.compiler.ir import INPUT, Graph, Layer, LayerKind

BN_EPS = 1e-4
BN_MOMENTUM = 0.9
_BIG_W_FRACTION = 0.05


class _Builder:
    """Appends layers to a chain, tracking the per-sample shape; `src` overrides the chain input."""

    def __init__(self, name: str, input_shape: tuple[int, ...], seed: int):
        self.name = name
        self.input_shape = tuple(input_shape)
        self.rng = np.random.default_rng(seed)
        self.layers: list[Layer] = []
        self.last = INPUT

    def shape(self, name: str) -> tuple[int, ...]:
        if name == INPUT:
            return self.input_shape
        return next(lay.shape for lay in self.layers if lay.name == name)

    def _add(self, name, kind, shape, inputs=None, attrs=None, params=None) -> str:
        inputs = tuple(inputs) if inputs is not None else (self.last,)
        shape = tuple(int(d) for d in shape)
        self.layers.append(Layer(name, kind, inputs, shape, dict(attrs or {}), dict(params or {})))
        self.last = name
        return name

    def _weights(self, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        w = self.rng.standard_normal(shape) / np.sqrt(fan_in)
        big = self.rng.random(shape) < _BIG_W_FRACTION
        mag = self.rng.uniform(1.05, 1.5, shape)
        w = np.where(big, np.where(w >= 0, mag, -mag), w)
        return w.astype(np.float32)

    def dense(self, name, out, *, binary=True, bias=False, src=None) -> str:
        src = src or self.last
        (fan_in,) = self.shape(src)
        params = {"W": self._weights((fan_in, out), fan_in)}
        if bias:
            params["b"] = self.rng.uniform(-0.5, 0.5, out).astype(np.float32)
        return self._add(name, LayerKind.DENSE, (out,), (src,), {"binary": binary}, params)

    def conv(self, name, cout, k=3, *, binary=True, stride=1, pad=0, bias=False, src=None) -> str:
        src = src or self.last
        cin, h, w = self.shape(src)
        params = {"W": self._weights((cout, cin, k, k), cin * k * k)}
        if bias:
            params["b"] = self.rng.uniform(-0.5, 0.5, cout).astype(np.float32)
        oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
        attrs = {"binary": binary, "strides": (stride, stride), "pads": (pad, pad, pad, pad)}
        return self._add(name, LayerKind.CONV, (cout, oh, ow), (src,), attrs, params)

    def bn(self, name, *, src=None) -> str:
        src = src or self.last
        shape = self.shape(src)
        c = shape[0]
        params = {"gamma": self.rng.uniform(0.5, 1.5, c), "beta": self.rng.uniform(-0.5, 0.5, c),
                  "mean": self.rng.normal(0.0, 0.1, c), "var": self.rng.uniform(0.5, 2.0, c)}
        params = {k: v.astype(np.float32) for k, v in params.items()}
        attrs = {"eps": BN_EPS, "momentum": BN_MOMENTUM}
        return self._add(name, LayerKind.BATCHNORM, shape, (src,), attrs, params)

    def unary(self, name, kind: LayerKind, *, src=None) -> str:
        src = src or self.last
        return self._add(name, kind, self.shape(src), (src,))

    def pool(self, name, kind: LayerKind = LayerKind.MAXPOOL, k=2, *, src=None) -> str:
        src = src or self.last
        c, h, w = self.shape(src)
        attrs = {"kernel": (k, k), "strides": (k, k), "pads": (0, 0, 0, 0)}
        return self._add(name, kind, (c, (h - k) // k + 1, (w - k) // k + 1), (src,), attrs)

    def global_avgpool(self, name, *, src=None) -> str:
        src = src or self.last
        return self._add(name, LayerKind.GLOBAL_AVGPOOL, (self.shape(src)[0], 1, 1), (src,))

    def flatten(self, name, *, src=None) -> str:
        src = src or self.last
        return self._add(name, LayerKind.FLATTEN, (int(np.prod(self.shape(src))),), (src,))

    def affine(self, name, scale, bias, *, src=None) -> str:
        src = src or self.last
        params = {"scale": np.asarray(scale, np.float32), "bias": np.asarray(bias, np.float32)}
        return self._add(name, LayerKind.AFFINE, self.shape(src), (src,), {}, params)

    def add(self, name, a: str, b: str) -> str:
        assert self.shape(a) == self.shape(b), (a, b)
        return self._add(name, LayerKind.ADD, self.shape(a), (a, b))

    def build(self) -> Graph:
        g = Graph(self.name, self.input_shape, tuple(self.layers))
        g.verify()
        return g


def _binary_block(b: _Builder, i: int, last: bool) -> None:
    """bn{i} -> sign{i}, or bn{i} -> softmax for the last layer (the BNN layer tail of §1)."""
    b.bn(f"bn{i}")
    if last:
        b.unary("softmax", LayerKind.SOFTMAX)
    else:
        b.unary(f"sign{i}", LayerKind.SIGN)


def mlp(hidden: tuple[int, ...] = (256, 256, 256, 256), *, input_shape=(1, 28, 28), classes=10,
        seed: int = 0) -> Graph:
    """ALGORITHM.md §5 MLP (default: the full 784-256x4-10, 399,872 weights), flatten first."""
    b = _Builder("mlp", input_shape, seed)
    b.flatten("flatten0")
    widths = tuple(hidden) + (classes,)
    for i, width in enumerate(widths, start=1):
        b.dense(f"fc{i}", width)
        _binary_block(b, i, last=i == len(widths))
    return b.build()


def tiny_mlp(seed: int = 0) -> Graph:
    """TFC-like 64-32-32-10 with a Brevitas-style ending: input scaling and a per-class AFFINE after
    the last BN, no SOFTMAX (the loss then reads the last layer's output)."""
    b = _Builder("tiny_mlp", (64,), seed)
    b.affine("affine0", [2.0], [-0.5])
    for i, width in enumerate((32, 32, 10), start=1):
        b.dense(f"fc{i}", width)
        b.bn(f"bn{i}")
        if i < 3:
            b.unary(f"sign{i}", LayerKind.SIGN)
    b.affine("affine4", b.rng.uniform(0.5, 2.0, 10), b.rng.uniform(-0.5, 0.5, 10))
    return b.build()


def cnv(width_div: int = 8, *, seed: int = 0) -> Graph:
    """FINN CNV (ALGORITHM.md §5) with every width divided by `width_div`: 'valid' 3x3 convs,
    max-pool after sign, per-channel input scaling. width_div=1 is the full 1,542,848-weight CNV."""
    b = _Builder("cnv", (3, 32, 32), seed)
    b.affine("affine0", [1.0, 0.5, 2.0], [0.0, 0.25, -0.5])
    convs = [64, 64, 128, 128, 256, 256]
    for i, c in enumerate(convs, start=1):
        b.conv(f"conv{i}", c // width_div)
        _binary_block(b, i, last=False)
        if i in (2, 4):
            b.pool(f"pool{i}")
    b.flatten("flatten6")
    dense = [512 // width_div, 512 // width_div, 10]
    for i, width in enumerate(dense, start=len(convs) + 1):
        b.dense(f"fc{i}", width)
        _binary_block(b, i, last=i == len(convs) + len(dense))
    return b.build()


def binarynet(width_div: int = 16, *, seed: int = 0) -> Graph:
    """BinaryNet (ALGORITHM.md §5) with widths / `width_div`: 'same' 3x3 convs, max-pool between
    conv and BN. width_div=1 is the full 14,022,016-weight network."""
    b = _Builder("binarynet", (3, 32, 32), seed)
    convs = [128, 128, 256, 256, 512, 512]
    for i, c in enumerate(convs, start=1):
        b.conv(f"conv{i}", c // width_div, pad=1)
        if i % 2 == 0:
            b.pool(f"pool{i}")
        _binary_block(b, i, last=False)
    b.flatten("flatten6")
    dense = [1024 // width_div, 1024 // width_div, 10]
    for i, width in enumerate(dense, start=len(convs) + 1):
        b.dense(f"fc{i}", width)
        _binary_block(b, i, last=i == len(convs) + len(dense))
    return b.build()


def residual(seed: int = 0) -> Graph:
    """A mixed real/binary net in the ResNetE style: real stem, a block whose binary 3x3 path
    (sign -> bconv -> BN) is added to a real 1x1 conv + BN shortcut, a downsampling block (stride-2
    binary path, AvgPool 2x2 + real 1x1 conv + BN shortcut), ReLU, global average pool, real dense
    with bias, softmax. ReLU sits after the last add only (a sign of a ReLU output is all +1)."""
    b = _Builder("residual", (3, 8, 8), seed)
    b.conv("conv0", 8, binary=False, pad=1)
    stem = b.bn("bn0")
    b.unary("sign1", LayerKind.SIGN, src=stem)
    b.conv("conv1", 16, pad=1)
    path = b.bn("bn1")
    b.conv("conv1s", 16, k=1, binary=False, src=stem)
    block1 = b.add("add1", path, b.bn("bn1s"))
    b.unary("sign2", LayerKind.SIGN, src=block1)
    b.conv("conv2", 16, stride=2, pad=1)
    path = b.bn("bn2")
    b.pool("pool2s", LayerKind.AVGPOOL, src=block1)
    b.conv("conv2s", 16, k=1, binary=False)
    b.add("add2", path, b.bn("bn2s"))
    b.unary("relu2", LayerKind.RELU)
    b.global_avgpool("gap3")
    b.flatten("flatten3")
    b.dense("fc3", 10, binary=False, bias=True)
    b.unary("softmax", LayerKind.SOFTMAX)
    return b.build()


FACTORIES: dict[str, Callable[[], Graph]] = {
    "tiny_mlp": tiny_mlp,
    "mlp": mlp,
    "cnv": cnv,
    "binarynet": binarynet,
    "residual": residual,
}


def sample_batch(graph: Graph, batch: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(x float32 [batch, *input_shape] on a 1/128 grid in [-1, 1), labels int32 [batch])."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 128, (batch,) + graph.input_shape).astype(np.float32) / 128
    labels = rng.integers(0, graph.num_classes, batch).astype(np.int32)
    return x, labels
