"""Inference over the layer IR as the graph file defines it: `infer(graph, x) -> np.ndarray`.

Input: an `ir.Graph` and a batch `x` of any size in the ONNX input layout ((N, H, W, C) when
`graph.input_layout == "NHWC"`, else (N, *graph.input_shape)). Output: the last layer's output,
(N, *graph.output.shape), float32. Semantics: BATCHNORM uses the file's statistics as l2 batch norm
(gamma, running mean and variance, the layer's eps), SIGN is +1 at 0 (bnnc's sign, ALGORITHM.md),
binary DENSE/CONV use sign(W) of the latent W.

The math is the numpy reference's forward (`runtime/reference.py` `forward`, the families'
reference functions) run in inference mode over the graph's own parameters; this module adds only
the input-layout handling. `forward_layer(layer, *xs)` evaluates one layer alone.
"""

from __future__ import annotations

import numpy as np

from ..compiler import ir, ops
from ..compiler.config import TrainConfig, make_config
from ..compiler.errors import DataError
from ..compiler.ops.refctx import RefRun
from . import reference

# what inference reads of a config: l2 batch norm (the file's mean/var, gamma and eps)
_FILE_SEMANTICS: TrainConfig = make_config("standard", bn="l2")
_F32 = np.dtype(np.float32)


def forward_layer(layer: ir.Layer, *xs: np.ndarray) -> np.ndarray:
    """One layer's inference output for batched NCHW float32 inputs."""
    run = RefRun(None, _FILE_SEMANTICS, {}, _F32, training=False)
    return np.asarray(ops.REFERENCE_FORWARD[layer.kind](run, layer, *xs), dtype=np.float32)


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
    run = RefRun(graph, _FILE_SEMANTICS, {}, _F32, training=False)
    reference.forward(run, x)
    return np.asarray(run.acts[graph.output.name], dtype=np.float32)
