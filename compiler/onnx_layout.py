"""The frontend's layout idioms: how converters' NHWC tensors and size-1-axis views are read into
bnnc's NCHW layers without costing a layer (the importer: compiler/frontend.py).

- A 4-D input read by `Transpose(perm=[0,3,1,2])` (after elementwise ops only) is NHWC (tf2onnx):
  the transpose is absorbed, `input_layout="NHWC"`, `input_shape` is (C, H, W).
- Layout marks on an activation (`Act.nhwc` / `view` / `perm`), so converters' layout idioms cost
  no layer: `Transpose(perm=[0,2,3,1])` of a map (tf2onnx/keras2onnx, back to NHWC before Keras'
  Flatten) marks it NHWC; its Flatten is bnnc's NCHW FLATTEN carrying the (H, W, C) order as a
  permutation, which the reading MatMul/Gemm applies to its weight rows (and BatchNormalization /
  per-feature constants in between to their values). Unsqueeze, Squeeze and Reshapes that only
  insert or remove size-1 axes give a view of the same bytes: to one dim it is FLATTEN, back to the
  layer's shape the plain value, else elementwise ops, BatchNormalization (channel axis kept) and
  Flatten read the view; a Transpose that moves only size-1 axes is a view too. A view of the
  network input read by a layer that needs its shape (Keras' Reshape((28, 28, 1)) of a [N, 28, 28]
  input) becomes the input's shape, if no layer read the input before. Every other reader of a
  marked value (`_nchw`), any other Transpose of an activation and a marked graph output are
  rejected with the node named.

The handlers that set the marks (Transpose, Flatten, Reshape, Squeeze, Unsqueeze) are
compiler/ops/structural.py's; the marks are fields of `onnx_values.Act`. This module holds what
reads them: `nhwc_input` (the NHWC network input, found before the import starts) and
`LayoutMarks`, the importer's methods that resolve a marked value for a handler (`_nchw`,
`channel_params`) or for a constant folded into a pending affine (`_unview_const`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx

from .ir import INPUT
from .onnx_values import Act, node_attrs, tensor_array


def _reshape_target(node: onnx.NodeProto, order, inits) -> list[int] | None:
    """The constant target shape of a Reshape (an initializer or a Constant node), if any."""
    name = node.input[1] if len(node.input) > 1 else ""
    proto = inits[name] if name in inits else next(
        (node_attrs(n).get("value") for n in order if n.op_type == "Constant" and name in n.output),
        None)
    try:
        return None if proto is None else [int(v) for v in tensor_array(proto).reshape(-1)]
    except (ValueError, TypeError):
        return None


def nhwc_input(input_name: str, per: tuple[int, ...], order, inits) -> bool:
    """tf2onnx's NHWC input: its first layout-sensitive use (after elementwise ops only) is
    Transpose(perm=[0,3,1,2]), or, with one channel, a Reshape to [N, 1, H, W]."""
    elementwise = {"Mul", "Add", "Sub", "Div", "Identity", "Dropout", "Cast", "Quant",
                   "BipolarQuant", "Sign", "Relu", "MultiThreshold"}
    frontier = {input_name}
    for n in order:
        if not any(i in frontier for i in n.input):
            continue
        if n.op_type == "Transpose":
            if list(node_attrs(n).get("perm", [])) == [0, 3, 1, 2]:
                return True
            continue
        if n.op_type == "Reshape" and per[2] == 1:
            tgt = _reshape_target(n, order, inits)
            if tgt is not None and len(tgt) == 4 and tgt[1:] == [1, per[0], per[1]]:
                return True
            continue
        if n.op_type in elementwise:
            frontier.update(n.output)
    return False


class LayoutMarks:
    """The frontend importer's methods that read layout marks (module docstring); mixed into
    `frontend._Importer`, whose `_fail`, `_mat`, `input_shape` and `specs` they use. Op handlers
    call them on the importer (`imp._nchw(...)`, `imp.channel_params(...)`)."""

    def _nchw(self, act: Act, node, keep: tuple[str, ...] = ()) -> Act:
        """`act` materialized, for a handler that reads bnnc's NCHW layout; `keep` names the
        layout marks the handler handles itself ("view": size-1 axes inserted/removed, "perm": an
        (H, W, C)-order flatten, "nhwc": a map transposed to NHWC); any other mark is one clear
        error."""
        if act.nhwc and act.layer == INPUT:
            self._fail(node, "reads the NHWC network input before its Transpose(perm=[0,3,1,2])",
                       hint="only elementwise ops may come before the NCHW transpose")
        if act.nhwc and "nhwc" not in keep:
            self._fail(node, f"reads an activation transposed to NHWC (per-sample "
                       f"{list(act.onnx_shape)}); bnnc's layers are NCHW",
                       hint="only a Flatten (then MatMul/Gemm), elementwise ops or a Transpose "
                       "back to NCHW may read a map transposed to NHWC")
        if act.layer == INPUT and act.view is not None and "view" not in keep:
            if not self._reshape_input(act):
                self._fail(node, f"reads the network input as per-sample {list(act.view)} after "
                           f"another node read it as {list(self.input_shape)}",
                           hint="read the input in one shape (one Reshape/Unsqueeze right after "
                           "it)")
            act = dataclasses.replace(act, shape=act.view, view=None, mat=None)
        if act.layer == INPUT and act.shape != self.input_shape:
            self._fail(node, f"reads the network input as per-sample {list(act.shape)} after "
                       f"another node read it as {list(self.input_shape)}",
                       hint="read the input in one shape (one Reshape/Unsqueeze right after it)")
        if act.view is not None and "view" not in keep:
            self._fail(node, f"reads per-sample shape {list(act.view)}, a layer's "
                       f"{list(act.shape)} with size-1 axes inserted or removed, and needs its "
                       f"own shape", hint="Squeeze/Reshape back to the layer's shape first; "
                       "only elementwise ops, BatchNormalization and Flatten read such a view")
        if act.perm is not None and "perm" not in keep:
            self._fail(node, "reads a flatten in (H, W, C) order (a Transpose to NHWC before the "
                       "Flatten)", hint="bnnc absorbs that order where MatMul/Gemm, "
                       "BatchNormalization, per-feature constants or elementwise ops read it")
        return self._mat(act)

    def _reshape_input(self, act: Act) -> bool:
        """A view of the network input with size-1 axes inserted or removed, read by a layer that
        needs that shape (Keras' Reshape((28, 28, 1)) of a [N, 28, 28] input, written by tf2onnx
        as a Reshape to [N, 1, 28, 28], or Reshape + Transpose): the input takes the view's shape
        (the same bytes), provided no layer has read it yet."""
        if act.nhwc or any(INPUT in s.inputs for s in self.specs.values()):
            return False
        self.input_shape = act.view
        return True

    def channel_params(self, act: Act, node, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Per-channel parameters given in ONNX's channel order (axis 1 of `act`'s ONNX shape),
        in bnnc's: a view must keep the channel axis; an (H, W, C)-order flatten reorders them."""
        if act.view is not None and act.view[0] != act.shape[0]:
            self._fail(node, f"normalizes per-sample shape {list(act.view)} over its axis 1, "
                       f"which is not the channel axis of the layer's {list(act.shape)}",
                       hint="insert size-1 axes after the channels ([N, C] -> [N, C, 1])")
        if act.perm is None:
            return arrays
        out = []
        for a in arrays:
            b = np.empty_like(a)
            b[act.perm] = a
            out.append(b)
        return out

    def _unview_const(self, act: Act, a: np.ndarray, node, arr) -> np.ndarray:
        """A per-sample constant `a` broadcastable to `act`'s ONNX view, shaped for bnnc's shape:
        the view's size-1 axes dropped and the layer's inserted (the non-1 axes are the same, in
        order); an (H, W, C)-order flatten's per-feature values put in bnnc's order."""
        vs = act.onnx_shape
        if any(d not in (1, s) for d, s in zip(a.shape, vs)):
            self._fail(node, f"constant of shape {list(np.asarray(arr).shape)} does not broadcast "
                       f"to the activation {['N', *vs]}")
        if act.perm is not None:
            if a.shape[0] == 1:
                return a
            return self.channel_params(act, node, [a])[0]
        core = [d for d, s in zip(a.shape, vs) if s != 1]
        it = iter(core)
        return a.reshape(tuple(1 if s == 1 else next(it) for s in act.shape))
