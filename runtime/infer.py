"""Reference inference over the layer IR: `infer(graph, x) -> np.ndarray` (numpy, float32).

Input: an `ir.Graph` and a batch `x` of any size in the ONNX input layout ((N, H, W, C) when
`graph.input_layout == "NHWC"`, else (N, *graph.input_shape)). Output: the last layer's output,
(N, *graph.output.shape), float32. Inference semantics: BATCHNORM uses its running statistics,
SIGN is +1 at 0 (bnnc's sign, ALGORITHM.md), binary DENSE/CONV use sign(W) of the latent W.

One pure function per layer kind (`_OPS`), each `(layer, *inputs) -> output` on batched NCHW arrays,
so the training reference and tests can reuse `forward_layer(layer, *xs)`. Conv and pooling use a
strided window view (im2col without copies until the matmul); fine for 32x32 inputs at small batch.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..compiler import ir
from ..compiler.errors import DataError
from ..compiler.ir import INPUT, LayerKind


def sign(x: np.ndarray) -> np.ndarray:
    """bnnc's sign: +1 where x >= 0, else -1 (float32)."""
    return np.where(x >= 0, np.float32(1), np.float32(-1))


def _chan(v: np.ndarray, ndim: int) -> np.ndarray:
    """A per-channel [C] (or per-tensor [1]) vector shaped to broadcast over (N, C, ...)."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def _windows(x: np.ndarray, kernel, strides, pads, fill: float) -> np.ndarray:
    """(N, C, H, W) -> (N, C, Ho, Wo, kh, kw) windows of the padded input."""
    t, l, b, r = pads
    if any(pads):
        x = np.pad(x, ((0, 0), (0, 0), (t, b), (l, r)), constant_values=fill)
    win = sliding_window_view(x, tuple(kernel), axis=(2, 3))
    return win[:, :, ::strides[0], ::strides[1]]


def dense(layer: ir.Layer, x: np.ndarray) -> np.ndarray:
    W = layer.params["W"]
    y = x @ (sign(W) if layer.binary else W)
    return y + layer.params["b"] if "b" in layer.params else y


def conv(layer: ir.Layer, x: np.ndarray) -> np.ndarray:
    W = layer.params["W"]
    W = sign(W) if layer.binary else W
    cout, cin, kh, kw = W.shape
    win = _windows(x, (kh, kw), layer.attrs["strides"], layer.attrs["pads"], 0.0)
    n, _, ho, wo = win.shape[:4]
    cols = win.transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, cin * kh * kw)
    y = (cols @ W.reshape(cout, -1).T).reshape(n, ho, wo, cout).transpose(0, 3, 1, 2)
    if "b" in layer.params:
        y = y + _chan(layer.params["b"], 4)
    return np.ascontiguousarray(y)


def batchnorm(layer: ir.Layer, x: np.ndarray) -> np.ndarray:
    p, nd = layer.params, x.ndim
    inv = np.float32(1) / np.sqrt(p["var"] + np.float32(layer.attrs["eps"]))
    return (x - _chan(p["mean"], nd)) * _chan(inv * p["gamma"], nd) + _chan(p["beta"], nd)


def affine(layer: ir.Layer, x: np.ndarray) -> np.ndarray:
    return x * _chan(layer.params["scale"], x.ndim) + _chan(layer.params["bias"], x.ndim)


def input_quant(layer: ir.Layer, x: np.ndarray) -> np.ndarray:
    """QONNX Quant: clamp(round(x/scale + zp)) - zp, times scale; ROUND = half to even."""
    a = layer.attrs
    bits, signed, narrow = a["bits"], a["signed"], a["narrow"]
    lo = -(2 ** (bits - 1)) + (1 if narrow else 0) if signed else 0
    hi = 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1 - (1 if narrow else 0)
    scale, zp = np.float32(a["scale"]), np.float32(a["zero_point"])
    q = np.clip(x / scale + zp, np.float32(lo), np.float32(hi))
    return ((np.round(q) - zp) * scale).astype(np.float32)


def maxpool(layer: ir.Layer, x: np.ndarray) -> np.ndarray:
    a = layer.attrs
    return _windows(x, a["kernel"], a["strides"], a["pads"], -np.inf).max(axis=(4, 5))


def avgpool(layer: ir.Layer, x: np.ndarray) -> np.ndarray:
    a = layer.attrs
    total = _windows(x, a["kernel"], a["strides"], a["pads"], 0.0).sum(axis=(4, 5))
    if a.get("count_include_pad", False):
        return total / np.float32(a["kernel"][0] * a["kernel"][1])
    # ONNX default: padded positions are not counted in the divisor
    ones = np.ones((1, 1) + x.shape[2:], np.float32)
    count = _windows(ones, a["kernel"], a["strides"], a["pads"], 0.0).sum(axis=(4, 5))
    return total / count


def global_avgpool(layer: ir.Layer, x: np.ndarray) -> np.ndarray:
    return x.mean(axis=(2, 3), keepdims=True, dtype=np.float32)


def softmax(layer: ir.Layer, x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


_OPS: dict[LayerKind, Callable[..., np.ndarray]] = {
    LayerKind.DENSE: dense,
    LayerKind.CONV: conv,
    LayerKind.BATCHNORM: batchnorm,
    LayerKind.SIGN: lambda layer, x: sign(x),
    LayerKind.RELU: lambda layer, x: np.maximum(x, np.float32(0)),
    LayerKind.MAXPOOL: maxpool,
    LayerKind.AVGPOOL: avgpool,
    LayerKind.GLOBAL_AVGPOOL: global_avgpool,
    LayerKind.FLATTEN: lambda layer, x: x.reshape(x.shape[0], -1),
    LayerKind.ADD: lambda layer, a, b: a + b,
    LayerKind.AFFINE: affine,
    LayerKind.INPUT_QUANT: input_quant,
    LayerKind.SOFTMAX: softmax,
}
assert set(_OPS) == set(LayerKind), "every layer kind needs an inference function"


def forward_layer(layer: ir.Layer, *xs: np.ndarray) -> np.ndarray:
    """One layer's inference output for batched NCHW float32 inputs."""
    return np.asarray(_OPS[layer.kind](layer, *xs), dtype=np.float32)


def onnx_input_shape(graph: ir.Graph) -> tuple[int, ...]:
    """The per-sample input shape in the ONNX file's layout."""
    if graph.input_layout == "NHWC":
        c, h, w = graph.input_shape
        return (h, w, c)
    return graph.input_shape


def infer(graph: ir.Graph, x: np.ndarray) -> np.ndarray:
    """Run the whole graph on a batch; raises DataError when `x` has the wrong shape."""
    x = np.asarray(x)
    want = onnx_input_shape(graph)
    if x.ndim != len(want) + 1 or tuple(x.shape[1:]) != want or x.shape[0] < 1:
        raise DataError(f"input of shape {list(x.shape)} does not fit model '{graph.name}': "
                        f"expected [N, {', '.join(map(str, want))}] ({graph.input_layout})",
                        hint="pass a batch in the layout of the ONNX input")
    x = x.astype(np.float32)
    if graph.input_layout == "NHWC":
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    values = {INPUT: x}
    for layer in graph.layers:
        values[layer.name] = forward_layer(layer, *(values[i] for i in layer.inputs))
    return values[graph.output.name]
