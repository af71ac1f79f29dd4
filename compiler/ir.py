"""The layer IR: what the frontend produces and every later stage reads.

A `Graph` is a topologically ordered tuple of `Layer`s. Shapes are *per sample* (no batch dimension):
the batch size is a compile parameter, never read from the model file. Activations are NCHW inside bnnc
(`(C, H, W)` for images, `(F,)` for vectors) whatever the layout of the ONNX input was.

Invariants (structure checked by `Graph.verify()`; what each kind requires -- its number of
inputs, attrs and params, whether it may end a graph -- by `compiler.ops.check_graph(graph)`, from
the kind's `LayerSpec` in the op registry):
- layer names are unique C identifiers (`[a-z][a-z0-9_]*`), assigned by bnnc, never taken from ONNX;
- every input of a layer is `INPUT` or the name of an earlier layer (so the graph is acyclic);
- every parameter array is float32, finite, and has the shape its kind requires;
- per-sample shapes are tuples of positive ints.

Parameter names per kind (the numpy reference, schedule and codegen all use these):
    DENSE       W [in, out]  (y = x @ W),  b [out] if it has a bias (real layers only)
    CONV        W [Cout, Cin, kh, kw],     b [Cout] if it has a bias (real layers only)
    BATCHNORM   gamma, beta, mean, var  [C]     (inference: gamma*(x-mean)/sqrt(var+eps)+beta)
    AFFINE      scale, bias             constants broadcast per channel ([C]) or per tensor ([1])
Tensor names of one training step are `<layer>.<field>` (see `tname`), e.g. `fc1.W`, `fc1.dW`, `bn1.d_out`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from enum import Enum
from typing import Any, Mapping

import numpy as np

INPUT = "input"  # the name a layer uses to read the network input
_IDENT = re.compile(r"^[a-z][a-z0-9_]*$")


class LayerKind(Enum):
    DENSE = "dense"            # x @ W (+ b); binary when W is binarized
    CONV = "conv"              # 2-D correlation, group 1
    GROUP_CONV = "group_conv"  # 2-D correlation, group > 1 (grouped / depthwise)
    BATCHNORM = "batchnorm"    # per-channel; training recomputes batch statistics
    SIGN = "sign"              # activation binarization, sign(0) = +1, STE in backward
    RELU = "relu"              # real-valued nets (ResNetE/Bi-Real stems)
    MAXPOOL = "maxpool"
    AVGPOOL = "avgpool"
    GLOBAL_AVGPOOL = "global_avgpool"
    FLATTEN = "flatten"        # (C, H, W) -> (C*H*W,), a view
    ADD = "add"                # residual add of two layers' outputs
    AFFINE = "affine"          # x * scale + bias with constants (input scaling, Brevitas TensorNorm)
    INPUT_QUANT = "input_quant"  # k-bit uniform quantizer on the network input (no gradient needed)
    SOFTMAX = "softmax"        # last layer only


# the weight layers: W [+ b] trained by the optimizer, binary when attrs["binary"]; the state, the
# reference, the memory model and the config checks read this one list
WEIGHT_KINDS = (LayerKind.DENSE, LayerKind.CONV, LayerKind.GROUP_CONV)

def tname(layer: str, fieldname: str) -> str:
    """The name of a training-step tensor: `tname("fc1", "dW") == "fc1.dW"`."""
    return f"{layer}.{fieldname}"


@dataclass(frozen=True, eq=False)
class Layer:
    name: str                          # C identifier chosen by bnnc: "fc1", "conv3", "bn2", "sign4"
    kind: LayerKind
    inputs: tuple[str, ...]            # INPUT or earlier layer names
    shape: tuple[int, ...]             # per-sample output shape
    attrs: Mapping[str, Any] = field(default_factory=dict)
    params: Mapping[str, np.ndarray] = field(default_factory=dict)
    onnx_name: str = ""                # original node name, for comments/messages only (never pasted raw)

    @property
    def binary(self) -> bool:
        return bool(self.attrs.get("binary", False))

    def __repr__(self) -> str:
        ps = ", ".join(f"{k}{list(v.shape)}" for k, v in self.params.items())
        return f"Layer({self.name}: {self.kind.value} {self.inputs} -> {self.shape} [{ps}])"


@dataclass(frozen=True, eq=False)
class Graph:
    name: str                          # C identifier for the model ("mlp", "tfc_1w1a_qonnx_ts_clean")
    input_shape: tuple[int, ...]       # per sample, NCHW order
    layers: tuple[Layer, ...]          # topological order; the last layer is the output
    input_layout: str = "NCHW"         # layout of the ONNX input ("NHWC" for tf2onnx exports)
    source_sha256: str = ""            # of the model file, for generated-code front matter

    @property
    def output(self) -> Layer:
        return self.layers[-1]

    @property
    def num_classes(self) -> int:
        return int(np.prod(self.output.shape))

    @cached_property
    def _by_name(self) -> dict[str, Layer]:
        return {lay.name: lay for lay in self.layers}

    @cached_property
    def _consumers(self) -> dict[str, list[Layer]]:
        out: dict[str, list[Layer]] = {}
        for lay in self.layers:
            for i in dict.fromkeys(lay.inputs):
                out.setdefault(i, []).append(lay)
        return out

    def layer(self, name: str) -> Layer:
        """The layer named `name` (an index built once: deep graphs stay linear)."""
        return self._by_name[name]

    def shape_of(self, name: str) -> tuple[int, ...]:
        return self.input_shape if name == INPUT else self.layer(name).shape

    def consumers(self, name: str) -> list[Layer]:
        return list(self._consumers.get(name, ()))

    def param_count(self) -> int:
        return sum(int(v.size) for lay in self.layers for k, v in lay.params.items()
                   if lay.kind is not LayerKind.AFFINE)

    def verify(self) -> None:
        """Raise AssertionError on a broken structural invariant (a bnnc bug, not a user error);
        `compiler.ops.check_graph` adds the per-kind checks."""
        assert _IDENT.match(self.name), f"graph name {self.name!r} is not a C identifier"
        assert self.layers, "empty graph"
        assert all(isinstance(d, int) and d > 0 for d in self.input_shape), self.input_shape
        seen = {INPUT}
        for lay in self.layers:
            assert _IDENT.match(lay.name) and lay.name != INPUT, f"bad layer name {lay.name!r}"
            assert lay.name not in seen, f"duplicate layer name {lay.name}"
            for i in lay.inputs:
                assert i in seen, f"{lay.name} reads {i!r} before it is produced"
            assert lay.inputs, lay
            assert all(isinstance(d, int) and d > 0 for d in lay.shape), lay
            seen.add(lay.name)
