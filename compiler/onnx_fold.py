"""Constant folding for the frontend: one numpy function per ONNX op (ONNX semantics for the
cases exporters emit), so the constant subgraphs of any exporter collapse to `Const` values.

`FOLD[op](node, *arrays)` evaluates a node whose inputs are all constants; `fold_elements` sizes
the result from shapes first (the importer refuses a fold past max(2^24, its largest operand): a
broadcast or ConstantOfShape "bomb" of a few bytes in a file); `FOLD_ARITY` is the number of inputs
of the ops only folding reads (the ops with a layer handler declare theirs with it,
`compiler/ops`); `constant_attr` decodes a Constant node.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper

from .errors import UnsupportedModelError
from .onnx_values import BATCH, NodeError, node_attrs, node_where, tensor_array

# constant folding may not grow a value past 2^24 elements or its largest operand
MAX_FOLD_ELEMENTS = 2**24


def np_reshape(node, a, shape):
    allowzero = node_attrs(node).get("allowzero", 0)
    shape = [int(d) for d in shape]
    if not allowzero:
        shape = [a.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return a.reshape(shape)


def _axes(node, given, default=None):
    if given is not None:
        return [int(v) for v in np.asarray(given).ravel()]
    return list(node_attrs(node).get("axes", default or []))


def _np_unsqueeze(node, a, axes=None):
    out = a
    axes = _axes(node, axes)
    rank = a.ndim + len(axes)
    for ax in sorted(x % rank for x in axes):
        out = np.expand_dims(out, ax)
    return out


def _np_squeeze(node, a, axes=None):
    axes = _axes(node, axes)
    return np.squeeze(a, axis=tuple(axes)) if axes else np.squeeze(a)


def _np_shape(node, a):
    at = node_attrs(node)
    return np.array(a.shape, dtype=np.int64)[at.get("start", 0):at.get("end", None)]


def _np_constant_of_shape(node, shape):
    v = node_attrs(node).get("value")
    fill = _const_tensor(node, v).ravel() if v is not None else np.zeros(1, np.float32)
    if fill.size != 1:
        raise NodeError(node, f"value holds {fill.size} elements; ONNX requires one")
    # a Shape() of an activation carries the batch sentinel: a size-1 axis broadcasts the same way
    dims = [1 if int(d) == BATCH else int(d) for d in np.asarray(shape).ravel()]
    return np.full(dims, fill[0], dtype=fill.dtype)


def _np_div(node, a, b):
    if np.issubdtype(np.result_type(a, b), np.integer):
        return np.trunc(a / b).astype(np.result_type(a, b))
    return a / b


def _np_cast(node, a):
    return a.astype(helper.tensor_dtype_to_np_dtype(node_attrs(node)["to"]))


def _np_slice(node, a, starts, ends, axes=None, steps=None):
    axes = list(range(len(starts))) if axes is None else [int(x) for x in axes]
    steps = [1] * len(starts) if steps is None else [int(x) for x in steps]
    idx = [slice(None)] * a.ndim
    for s, e, ax, st in zip(starts, ends, axes, steps):
        idx[ax] = slice(int(s), int(e), st)
    return a[tuple(idx)]


FOLD = {
    "Add": lambda n, a, b: a + b, "Sub": lambda n, a, b: a - b, "Mul": lambda n, a, b: a * b,
    "Div": _np_div, "Pow": lambda n, a, b: np.power(a, b).astype(a.dtype),
    "Neg": lambda n, a: -a, "Sqrt": lambda n, a: np.sqrt(a), "Abs": lambda n, a: np.abs(a),
    "Reciprocal": lambda n, a: (1 / a).astype(a.dtype), "Exp": lambda n, a: np.exp(a),
    "Identity": lambda n, a: a, "Cast": _np_cast,
    "Transpose": lambda n, a: np.transpose(a, node_attrs(n).get("perm")),
    "Reshape": np_reshape, "Unsqueeze": _np_unsqueeze, "Squeeze": _np_squeeze,
    "Flatten": lambda n, a: a.reshape(int(np.prod(a.shape[:node_attrs(n).get("axis", 1)])), -1),
    "Concat": lambda n, *xs: np.concatenate(xs, axis=node_attrs(n)["axis"]),
    "Gather": lambda n, a, i: np.take(a, i.astype(np.int64), axis=node_attrs(n).get("axis", 0)),
    "Slice": _np_slice, "Shape": _np_shape, "ConstantOfShape": _np_constant_of_shape,
    "Expand": lambda n, a, s: a * np.ones([int(d) for d in s], dtype=a.dtype),
    "Equal": lambda n, a, b: np.equal(a, b), "Greater": lambda n, a, b: np.greater(a, b),
    "GreaterOrEqual": lambda n, a, b: np.greater_equal(a, b), "Less": lambda n, a, b: a < b,
    "LessOrEqual": lambda n, a, b: a <= b, "Not": lambda n, a: np.logical_not(a),
    "Where": lambda n, c, a, b: np.where(c, a, b), "Min": lambda n, *xs: np.minimum.reduce(xs),
    "Max": lambda n, *xs: np.maximum.reduce(xs),
    "Dropout": lambda n, a, *rest: a,
}
_BROADCAST = ("Add", "Sub", "Mul", "Div", "Pow", "Equal", "Greater", "GreaterOrEqual", "Less",
              "LessOrEqual", "Where", "Min", "Max")

# (min, max) inputs of the ops only constant folding reads (the ops with a handler declare
# theirs with it: `compiler/ops`, `OnnxOp.arity`)
FOLD_ARITY = {
    **dict.fromkeys(("ConstantOfShape", "Sqrt", "Abs", "Reciprocal", "Exp", "Not"), (1, 1)),
    **dict.fromkeys(("Gather", "Expand", "Equal", "Greater", "LessOrEqual", "Pow"), (2, 2)),
    **dict.fromkeys(("Concat", "Min", "Max"), (1, 1 << 16)),
    "Slice": (3, 5), "Constant": (0, 0),
}


def fold_elements(op: str, node, arrays) -> int:
    """The element count a constant fold of `op` would produce, computed from shapes alone (0
    when the inputs are inconsistent: the fold itself then reports the error)."""
    try:
        if op in _BROADCAST:
            return math.prod(np.broadcast_shapes(*(a.shape for a in arrays)))
        # the batch placeholder of a folded Shape() stands for a size-1 axis
        if op == "ConstantOfShape":
            return math.prod(1 if int(d) == BATCH else abs(int(d))
                             for d in np.asarray(arrays[0]).ravel())
        if op == "Expand":
            return math.prod(np.broadcast_shapes(arrays[0].shape, tuple(
                1 if int(d) == BATCH else abs(int(d)) for d in np.asarray(arrays[1]).ravel())))
        if op == "Gather":
            a, i = arrays
            shape = list(a.shape)
            del shape[int(node_attrs(node).get("axis", 0)) % a.ndim]
            return math.prod(shape) * np.asarray(i).size
        if op == "Concat":
            return sum(a.size for a in arrays)
    except (ValueError, TypeError, IndexError, ZeroDivisionError, OverflowError):
        return 0
    return max((np.asarray(a).size for a in arrays), default=0)


def _const_tensor(node, t: TensorProto) -> np.ndarray:
    try:
        return tensor_array(t)
    except ValueError as e:
        raise NodeError(node, f"value tensor {e}") from None


def constant_attr(node: onnx.NodeProto) -> np.ndarray:
    at = node_attrs(node)
    if "value" in at:
        return _const_tensor(node, at["value"])
    for key, dt in (("value_float", np.float32), ("value_floats", np.float32),
                    ("value_int", np.int64), ("value_ints", np.int64)):
        if key in at:
            return np.array(at[key], dtype=dt)
    raise UnsupportedModelError(f"{node_where(node)} holds a {', '.join(at) or 'missing'} value",
                                hint="bnnc reads dense tensor / float / int Constant values only")
