"""The context of ONNX export: what a family's `export` function (`fn(em, layer, xs, out)`, see
`base.py`) writes the exported graph through.

`Emitter` accumulates the nodes and initializers of the model `compiler/export.py` builds; it
names everything from bnnc's layer names (export.py's docstring has the naming rules) and takes
parameters from the validated trained state.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..config import TrainConfig
from ..ir import Graph, Layer, tname
from ..zoo import QONNX_DOMAIN


class Emitter:
    """Accumulates the nodes and initializers of the exported graph."""

    def __init__(self, graph: Graph, cfg: TrainConfig, state: dict[str, np.ndarray], fmt: str):
        self.graph, self.cfg, self.state, self.fmt = graph, cfg, state, fmt
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.consts: dict[str, str] = {}

    def node(self, op: str, inputs: list[str], out: str, *, name: str | None = None,
             domain: str = "", **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [out], name=name or out, domain=domain,
                                           **attrs))
        return out

    def init(self, name: str, value) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def const(self, value: float) -> str:
        """A shared float32 scalar initializer."""
        tag = {0.0: "zero", 1.0: "one", -1.0: "minus_one"}[value]
        if tag not in self.consts:
            self.consts[tag] = self.init(f"const.{tag}", np.float32(value))
        return self.consts[tag]

    def value(self, lay: Layer, f: str) -> np.ndarray:
        """A parameter as the trained network uses it: the state tensor, else the constant."""
        v = self.state.get(tname(lay.name, f))
        return np.asarray(lay.params[f] if v is None else v, np.float32)

    def binarize(self, x: str, out: str) -> str:
        """bnnc's sign (+1 at 0) of tensor x."""
        if self.fmt == "qonnx":
            return self.node("BipolarQuant", [x, self.const(1.0)], out, domain=QONNX_DOMAIN)
        ge = self.node("GreaterOrEqual", [x, self.const(0.0)], f"{out}.ge")
        return self.node("Where", [ge, self.const(1.0), self.const(-1.0)], out)

    def weight(self, lay: Layer) -> str:
        """The tensor a dense/conv layer multiplies with: W, sign(W) folded, or BipolarQuant(W)."""
        w = self.value(lay, "W")
        if not lay.binary:
            return self.init(tname(lay.name, "W"), w)
        if self.fmt == "qonnx":
            return self.binarize(self.init(tname(lay.name, "W"), w), tname(lay.name, "Wb"))
        return self.init(tname(lay.name, "Wb"), np.where(w >= 0, 1, -1))

    def bias(self, lay: Layer) -> list[str]:
        return [self.init(tname(lay.name, "b"), self.value(lay, "b"))] if "b" in lay.params else []

    def flat(self, x: str, input_name: str, out: str) -> str:
        """x flattened to [N, features] when layer input `input_name` is not already a vector (Gemm
        and a whole-sample Softmax are 2-D)."""
        if len(self.graph.shape_of(input_name)) != 1:
            return self.node("Flatten", [x], f"{out}.flatten", axis=1)
        return x
