"""The run context of the numpy reference: what a family's reference forward/backward reads and
writes while the driver (`runtime/reference.py`, `runtime/infer.py`) walks a graph.

`RefRun` holds the graph, the config, the state tensors and the run's mode; the per-kind functions
(`OpFamily.reference_forward`/`reference_backward`, signatures in `base.py`) read parameters through
it (`param`, `weight`), publish intermediates under their compiler/README.md names (`emit`) and keep
their private backward state in `saved[layer]`. Training mode uses batch statistics and saves what
the backward needs; inference mode (training=False) uses the running statistics and saves nothing,
and so does a training run's BN without a gradient through it (`ops.eval_mode_bns`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from ..config import TrainConfig
from ..ir import INPUT, Graph, Layer, LayerKind, tname

def initial_value(lay: Layer, f: str) -> np.ndarray:
    """A tensor's value as the file defines it, for reads that have no state tensor (inference
    with the file's own semantics, `runtime/infer.py`): BN running statistics from the file's
    mean/var (running_psi = sqrt(var + eps) in float32), anything else the layer's parameter. The
    step-0 state of a training config is `compiler.state.initial_values` (l1: gamma converted)."""
    if f == "running_mean":
        return lay.params["mean"]
    if f == "running_var":
        return lay.params["var"]
    if f == "running_psi":
        return np.sqrt(lay.params["var"].astype(np.float32) + np.float32(float(lay.attrs["eps"])))
    return lay.params[f]


@dataclass
class RefRun:
    """One run (forward, optionally backward) of the reference over `graph`.

    `graph` is None only for a single layer evaluated on its own in inference mode
    (`runtime.infer.forward_layer`)."""
    graph: Graph | None
    cfg: TrainConfig
    tensors: Mapping[str, np.ndarray]
    dtype: np.dtype
    training: bool
    out: dict[str, np.ndarray] = field(default_factory=dict)     # named intermediates (public)
    saved: dict[str, dict] = field(default_factory=dict)         # per layer, private backward state
    acts: dict[str, np.ndarray] = field(default_factory=dict)    # forward outputs by layer name
    needs_grad: dict[str, bool] = field(default_factory=dict)    # ops.needs_grad (training runs)
    pixels: np.ndarray | None = None    # the batch as u8 pixels (cfg.input == "u8")
    eval_bns: frozenset = frozenset()        # ops.eval_mode_bns: BNs in inference mode (training)

    def param(self, lay: Layer, f: str) -> np.ndarray:
        """A parameter as the step sees it: the state tensor if there is one, else its value in
        the graph (`initial_value`)."""
        v = self.tensors.get(tname(lay.name, f))
        if v is None:
            v = initial_value(lay, f)
        return np.asarray(v).astype(self.dtype, copy=False)

    def weight(self, lay: Layer) -> np.ndarray:
        """W as used by the forward: sign(W) (sign(0) = +1) for binary layers."""
        w = self.param(lay, "W")
        if not lay.binary:
            return w
        wb = np.where(w >= 0, 1, -1).astype(np.int8)
        self.emit(lay, "Wb", wb)
        return wb.astype(self.dtype)

    def emit(self, lay: Layer, f: str, v) -> None:
        self.out[tname(lay.name, f)] = v

    def pm1_input(self, name: str) -> bool:
        """True when `name`'s output is +-1 by construction (a SIGN, maybe via flatten/max-pool)."""
        return pm1_output(self.graph, name)


def pm1_output(graph: Graph, name: str) -> bool:
    """True when `name`'s output is +-1 by construction (a SIGN, maybe via flatten/max-pool); the
    reference's rule, which schedule rules deciding a 1-bit saved input share."""
    if name == INPUT:
        return False
    lay = graph.layer(name)
    if lay.kind is LayerKind.SIGN:
        return True
    return lay.kind in (LayerKind.FLATTEN, LayerKind.MAXPOOL) and pm1_output(graph, lay.inputs[0])
