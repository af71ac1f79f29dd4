"""A new task head: `new_head(graph, classes, seed) -> ir.Graph` (`--classes K`).

Transfer to a new label set keeps everything a model learned except its classifier: the last weight
layer (the head, a dense or a group-1 conv) is re-initialised for K outputs with the seeded
initialiser of the zoo and of the C's `init` (`W ~ N(0, 1/fan_in)` in float32 from
`numpy.random.default_rng(seed)`, bias 0), and the per-class layers after it are reset: batch norm
to gamma 1, beta 0, running mean 0, running var 1; a per-channel AFFINE to scale 1, bias 0 (a
per-tensor one is kept). Every layer before the head keeps its trained values.

Only per-class layers may follow the head: BATCHNORM, AFFINE, GLOBAL_AVGPOOL, FLATTEN, SOFTMAX.
Anything else there (a sign, a residual add, another weight layer), a grouped conv head, or no
weight layer at all raises ConfigError naming the layer: such a model has no dense/conv head to
replace.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from . import ops
from .errors import ConfigError
from .ir import WEIGHT_KINDS, Graph, Layer, LayerKind

_AFTER_HEAD = (LayerKind.BATCHNORM, LayerKind.AFFINE, LayerKind.GLOBAL_AVGPOOL, LayerKind.FLATTEN,
               LayerKind.SOFTMAX)
MAX_CLASSES = 1 << 16


def head_layer(graph: Graph) -> Layer:
    """The model's head: its last weight layer, when only per-class layers follow it in a chain;
    ConfigError otherwise."""
    idx = [i for i, lay in enumerate(graph.layers) if lay.kind in WEIGHT_KINDS]
    if not idx:
        raise ConfigError(f"--classes: model {graph.name!r} has no dense/conv layer to use as its "
                          f"head")
    head = graph.layers[idx[-1]]
    if head.kind not in (LayerKind.DENSE, LayerKind.CONV):
        raise ConfigError(f"--classes: the last weight layer of model {graph.name!r}, "
                          f"{head.name!r}, is a {head.kind.value}, not a dense/conv head")
    prev = head.name
    for lay in graph.layers[idx[-1] + 1:]:
        if lay.kind not in _AFTER_HEAD or lay.inputs != (prev,) or len(graph.consumers(prev)) != 1:
            raise ConfigError(
                f"--classes: model {graph.name!r} does not end in a dense/conv head: {lay.name!r} "
                f"({lay.kind.value}) follows its last weight layer {head.name!r}",
                hint="only batch norm, a constant scale, global average pooling, flatten and "
                     "softmax may follow the head")
        prev = lay.name
    return head


def new_head(graph: Graph, classes: int, seed: int = 0) -> Graph:
    """`graph` with its head re-initialised for `classes` outputs (module docstring)."""
    if not isinstance(classes, int) or not 2 <= classes <= MAX_CLASSES:
        raise ConfigError(f"--classes must be an integer in [2, {MAX_CLASSES}], got {classes!r}")
    head = head_layer(graph)
    rng = np.random.default_rng(int(seed))
    w = head.params["W"]
    if head.kind is LayerKind.DENSE:
        shape, fan_in = (w.shape[0], classes), int(w.shape[0])
        out_shape = (classes,)
    else:
        shape, fan_in = (classes,) + w.shape[1:], int(np.prod(w.shape[1:]))
        out_shape = (classes,) + head.shape[1:]
    new_w = rng.standard_normal(shape, dtype=np.float32) * np.float32(1.0 / math.sqrt(fan_in))
    params = {"W": new_w.astype(np.float32)}
    if "b" in head.params:
        params["b"] = np.zeros(classes, np.float32)
    layers = list(graph.layers)
    start = layers.index(head)
    layers[start] = dataclasses.replace(head, shape=out_shape, params=params)
    shape_now = out_shape
    for i in range(start + 1, len(layers)):
        lay = layers[i]
        if lay.kind is LayerKind.GLOBAL_AVGPOOL:
            shape_now = (classes, 1, 1)
        elif lay.kind is LayerKind.FLATTEN:
            shape_now = (int(np.prod(shape_now)),)
        p = dict(lay.params)
        if lay.kind is LayerKind.BATCHNORM:
            p = {"gamma": np.ones(classes, np.float32), "beta": np.zeros(classes, np.float32),
                 "mean": np.zeros(classes, np.float32), "var": np.ones(classes, np.float32)}
        elif lay.kind is LayerKind.AFFINE and (lay.params["scale"].size > 1
                                               or lay.params["bias"].size > 1):
            p = {"scale": np.ones(classes, np.float32), "bias": np.zeros(classes, np.float32)}
        layers[i] = dataclasses.replace(lay, shape=shape_now, params=p)
    out = dataclasses.replace(graph, layers=tuple(layers))
    ops.check_graph(out)
    return out
