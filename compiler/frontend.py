"""The frontend: an ONNX / QONNX file -> the layer IR (`ir.Graph`), with latent float parameters.

`load_model(path_or_modelproto, *, name=None) -> ir.Graph`.

Invariants of the result: `Graph.verify()` holds; layer names are bnnc's (`fc1`, `conv1`, `bn1`,
`sign1`, `pool1`, `avgpool1`, `gap1`, `flatten1`, `add1`, `affine1`, `quant1`, `relu1`, `softmax1`:
one counter per kind, in graph order, no gaps); the ONNX node name is kept in `Layer.onnx_name`
only; every parameter is a private float32 copy (exporters de-duplicate equal initializers, so one
initializer may feed several unrelated layers: that must not tie their parameters); shapes are per
sample and NCHW; the batch size is never read from the file.

Algorithm. The nodes the single graph output depends on are sorted topologically (ties by file
position) and interpreted once, in order, over abstract values: a constant (folded with numpy:
Constant, ConstantOfShape, Shape, Neg, Pow, Transpose, Gather, Concat, ... so constant subgraphs of
any exporter collapse; `Shape` of an activation folds with a batch placeholder); a binarized weight
(latent array + scale, from a binarizer applied to a constant); an activation (a layer output that
may carry a *pending* per-channel affine `x*s + t` composed from constant Mul/Add/Sub/Div/Neg); and
two markers for the STE idioms (`x >= 0`, `B(x) - x`). Layers appear when a value is consumed:
- Binarizers: ONNX `Sign`; QONNX `BipolarQuant` and 1-bit `Quant` (domains qonnx.custom_op.general,
  finn.custom_op.general, onnx.brevitas; a missing opset import is fine: `onnx.checker` is never
  run); FINN `MultiThreshold` with one threshold at 0 and out_scale = -2*out_bias;
  `Where(x >= 0, c, -c)` / `Where(x < 0, -c, c)`; the detach trick `x + (B(x) - x)`; Larq's
  `Sign(Sign(x) + 0.1)` (any `B(s*B(x) + t)` with s > 0, |t| < s is `B(x)`). On an activation they
  become one SIGN layer; on a constant they set `binary=True` on the DENSE/CONV that consumes it,
  whose W is the latent initializer (in bnnc's layout: dense [in, out], conv [Cout, Cin, kh, kw]).
  A scale c != 1 becomes a pending affine after the SIGN / the layer.
- sign(0): bnnc's SIGN is +1 at 0. Every form above except ONNX `Sign` means that already. ONNX
  `Sign(0) = 0` is mapped to bnnc's SIGN as well, so for a plain-`Sign` file bnnc differs from
  onnxruntime exactly where a pre-activation or a latent weight is exactly 0 (then +1, not 0).
- Folded weights (decision): a MatMul/Gemm/Conv weight whose entries are all exactly +-1 is binary,
  with latent W = those +-1 values, when the layer reads a binary activation (SIGN, possibly through
  FLATTEN/MAXPOOL) or the file contains QONNX/FINN quantization ops (a `foldquant` export lost its
  weight BipolarQuant nodes, and its first layer reads the 8-bit input quantizer, not a sign).
- A pending affine becomes: a BATCHNORM (gamma=scale, beta=bias, mean 0, var 1-eps, eps 1e-4,
  momentum 0.9) when it multiplies per channel and adds right after a DENSE/CONV (the folded-BN
  form); a shift of the running mean when a BatchNormalization reads a scale-1 chain (a bias before
  BN: exact, and it cancels in training); the `b` of a real DENSE/CONV whose only reader it is
  (scale 1); else ONE AFFINE layer (input scaling, Brevitas TensorNorm incl. its raw `Pow(var, 0.5)`
  form). A binary layer's bias or weight scale (Gemm C/alpha, Conv B, BipolarQuant scale) is such a
  pending affine, so it folds into a following BN or stays a constant AFFINE.
- A 2..8-bit QONNX `Quant` is allowed only on the network input (through AFFINE/FLATTEN layers):
  INPUT_QUANT with QONNX semantics `(round(clip(x/scale + zp)) - zp) * scale`, ROUND = half to
  even.
- `Reshape` to `[1,-1]`, `[N,-1]`, `[0,-1]`, `[-1,F]`, `[1,F]` (or the Shape/Gather/Concat form of
  `x.view(x.size(0), -1)`) is FLATTEN for any batch; one keeping the per-sample shape is dropped;
  any other reshape is rejected.
- A 4-D input read by `Transpose(perm=[0,3,1,2])` (after elementwise ops only) is NHWC (tf2onnx):
  the transpose is absorbed, `input_layout="NHWC"`, `input_shape` is (C, H, W). Any other Transpose
  of an activation is rejected.
Limits: one graph input (initializers listed as inputs are constants), one output, float32 input,
Conv group 1 and dilation 1, pooling whose ceil_mode does not change the size, no control flow.
Every rejection is a `ModelError` / `UnsupportedModelError` naming the file, the node, its op type
and the reason, with a hint.

Hostile files (tests/test_fuzz.py, scripts/fuzz.py): an initializer is decoded only when a live
node reads it, after its type (numeric only), rank (<= 8), dims (>= 0) and element count
(<= 2^27) are checked from the header; a constant fold is sized from shapes first and refused past
max(2^24, its largest operand); attributes the importer reads must have their ONNX type; node
arity, conv/pool geometry, per-sample sizes (<= 2^31 - 1 elements) and duplicate or shadowed
tensor names are checked. ONNX names enter messages only through `printable` (escaped, cut), so
every message is one line. Any other exception escaping the importer is re-raised as a ModelError
ending in INTERNAL_ERROR, so the CLI shows one line, and the fuzzer counts it as a crash.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import ir
from .errors import BnncError, ConfigError, ModelError, UnsupportedModelError
from .ir import INPUT, LayerKind

INTERNAL_ERROR = "this is a bnnc bug"     # ends the message of an unexpected exception
QUANT_DOMAINS = ("qonnx.custom_op.general", "finn.custom_op.general", "onnx.brevitas")
_QUANT_OPS = ("BipolarQuant", "Quant", "MultiThreshold")
_BATCH = -987654321          # stands for the batch dim in folded Shape() values; never a legal dim
# Size limits, checked before anything is allocated. An initializer beyond 2^27 elements (512 MiB
# as float32) is no edge model's; constant folding may not grow a value past 2^24 elements or its
# largest operand (a broadcast or ConstantOfShape "bomb" of a few bytes in the file); per-sample
# activations must be indexable with the int32 loop counters of the generated C.
_MAX_CONST_ELEMENTS = 2**27
_MAX_FOLD_ELEMENTS = 2**24
_MAX_ACT_ELEMENTS = 2**31 - 1
_MAX_RANK = 8
_NUMERIC = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16,
            TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64,
            TensorProto.UINT8, TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64,
            TensorProto.BOOL}
_FOLDED_BN_EPS = 1e-4
_FOLDED_BN_MOMENTUM = 0.9
# Graph.verify() accepts these as the last layer; checked here first to give the user a message
_OUTPUT_KINDS = (LayerKind.SOFTMAX, LayerKind.BATCHNORM, LayerKind.DENSE, LayerKind.AFFINE,
                 LayerKind.GLOBAL_AVGPOOL, LayerKind.FLATTEN)
_PREFIX = {LayerKind.DENSE: "fc", LayerKind.CONV: "conv", LayerKind.BATCHNORM: "bn",
           LayerKind.SIGN: "sign", LayerKind.RELU: "relu", LayerKind.MAXPOOL: "pool",
           LayerKind.AVGPOOL: "avgpool", LayerKind.GLOBAL_AVGPOOL: "gap",
           LayerKind.FLATTEN: "flatten", LayerKind.ADD: "add", LayerKind.AFFINE: "affine",
           LayerKind.INPUT_QUANT: "quant", LayerKind.SOFTMAX: "softmax"}
_HINT_OPS = ("supported: MatMul, Gemm, Conv, BatchNormalization, Sign/BipolarQuant/Quant/"
             "MultiThreshold binarizers, MaxPool, AveragePool, GlobalAveragePool, Flatten, "
             "Reshape, Relu, Add, Softmax, constant Mul/Add/Sub/Div, Identity, Dropout")


# ---------------------------------------------------------------------------------------------
# abstract values


@dataclass(eq=False)
class _Const:
    arr: np.ndarray


@dataclass(eq=False)
class _Bin:
    """scale * sign(latent) + shift, a binarized constant (weights). scale/shift are full-shaped."""
    latent: np.ndarray
    scale: np.ndarray
    src: str                              # ONNX tensor holding the latent values (STE idiom)
    shift: np.ndarray | None = None


@dataclass(eq=False)
class _Aff:
    """A pending per-channel affine y = x*scale + bias (float64 [C] or [1]) on an activation."""
    scale: np.ndarray
    bias: np.ndarray
    nodes: list[str]
    pc_mul: bool = False                  # some Mul/Div had a per-channel constant
    add: bool = False                     # some Add/Sub had a constant


@dataclass(eq=False)
class _Act:
    layer: str                            # INPUT or a bnnc layer name
    shape: tuple[int, ...]                # per sample, NCHW
    nhwc: bool = False                    # ONNX holds this tensor as (H, W, C)
    aff: _Aff | None = None
    src: str | None = None                # for a SIGN output: the ONNX tensor it binarized
    mat: "_Act | None" = None             # cache of the materialized pending affine

    @property
    def onnx_shape(self) -> tuple[int, ...]:
        if self.nhwc:
            c, h, w = self.shape
            return (h, w, c)
        return self.shape


@dataclass(eq=False)
class _Cmp:
    """`x >= 0` (op 'ge') or `x < 0` (op 'lt'), kept symbolic for the Where binarizer idiom."""
    x: Any
    src: str
    op: str

    def value(self) -> np.ndarray:
        a = self.x.arr
        return a >= 0 if self.op == "ge" else a < 0


@dataclass(eq=False)
class _SteRes:
    """`B(x) - x` for a binarizer output B(x): the detach trick adds x back."""
    s: Any
    src: str


@dataclass
class _Spec:
    """A layer under construction (ir.Layer is frozen; folds edit b / mean in place)."""
    name: str
    kind: LayerKind
    inputs: tuple[str, ...]
    shape: tuple[int, ...]
    attrs: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    onnx_name: str = ""


def _text(v) -> str:
    """A protobuf string field as str: fields that are not valid UTF-8 come back as bytes."""
    return v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v)


def printable(name: str, limit: int = 80) -> str:
    """An ONNX name as it may appear in a one-line message: control and other unprintable
    characters escaped (a name may hold newlines, NUL, terminal escapes), long names cut."""
    s = "".join(c if c.isprintable() else repr(c)[1:-1] for c in _text(name))
    return s if len(s) <= limit else f"{s[:limit - 3]}..."


def _short(arr) -> str:
    """An array's values for a message, elided past a few entries."""
    a = np.asarray(arr).ravel()
    vals = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in a[:6].tolist())
    return f"[{vals}{', ...' if a.size > 6 else ''}]"


def _where(node: onnx.NodeProto) -> str:
    op = printable(node.op_type, 40)
    if node.name:
        return f"node '{printable(node.name)}' ({op})"
    out = printable(node.output[0]) if node.output else "?"
    return f"node <unnamed, output '{out}'> ({op})"


class _NodeError(Exception):
    """Raised by module-level helpers that do not know the file; `_Importer.run` adds it."""

    def __init__(self, node, why: str, hint: str | None = None,
                 cls: type[ModelError] = ModelError):
        super().__init__(why)
        self.node, self.why, self.hint, self.cls = node, why, hint, cls


def _label(node) -> str:
    """What Layer.onnx_name records: the node name, or its output tensor for unnamed nodes."""
    return _text(node.name or (node.output[0] if node.output else node.op_type))


_A = onnx.AttributeProto
# the type of every attribute the importer reads (by name: no supported op reuses a name with
# another type); others are not looked at, so they are not checked
_ATTR_TYPES = {
    **dict.fromkeys(("allowzero", "start", "end", "to", "axis", "transA", "transB", "group",
                     "ceil_mode", "count_include_pad", "training_mode", "signed", "narrow",
                     "value_int"), _A.INT),
    **dict.fromkeys(("axes", "perm", "strides", "pads", "kernel_shape", "dilations",
                     "value_ints"), _A.INTS),
    **dict.fromkeys(("alpha", "beta", "epsilon", "momentum", "out_scale", "out_bias",
                     "value_float"), _A.FLOAT),
    **dict.fromkeys(("auto_pad", "rounding_mode"), _A.STRING),
    "value_floats": _A.FLOATS, "value": _A.TENSOR,
}


def _type_name(t: int) -> str:
    return _A.AttributeType.Name(t) if t in _A.AttributeType.values() else str(t)


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    out = {}
    for a in node.attribute:
        want = _ATTR_TYPES.get(a.name)
        if want is not None and a.type != want:
            raise _NodeError(node, f"attribute '{printable(a.name)}' has type "
                             f"{_type_name(a.type)}, expected {_type_name(want)}",
                             hint="the file does not follow the ONNX operator spec; re-export it")
        try:
            v = helper.get_attribute_value(a)
        except Exception as e:  # an attribute with no value of its declared type
            raise _NodeError(node, f"attribute '{printable(a.name)}' cannot be read "
                             f"({printable(e, 200)})") from None
        out[a.name] = v.decode(errors="replace") if isinstance(v, bytes) else v
    return out


def _dtype_name(t: int) -> str:
    return TensorProto.DataType.Name(t) if t in TensorProto.DataType.values() else str(t)


def _tensor_array(t: TensorProto) -> np.ndarray:
    """A TensorProto's value; ValueError (the reason) for a type, shape or payload bnnc refuses,
    decided from the header before any array of the declared size exists."""
    if t.data_type not in _NUMERIC:
        raise ValueError(f"has type {_dtype_name(t.data_type)}; bnnc reads numeric tensors only")
    if t.data_location == TensorProto.EXTERNAL:
        raise ValueError("keeps its data in an external file that was not loaded")
    dims = list(t.dims)
    if len(dims) > _MAX_RANK or any(d < 0 for d in dims):
        raise ValueError(f"has dims {_short(dims)}: negative or more than {_MAX_RANK} of them")
    n = math.prod(dims)
    if n > _MAX_CONST_ELEMENTS:
        raise ValueError(f"has {n:,} elements (dims {_short(dims)}); bnnc reads constants of up "
                         f"to {_MAX_CONST_ELEMENTS:,} elements")
    try:
        arr = numpy_helper.to_array(t)
    except Exception as e:  # payload length or encoding does not match the header
        raise ValueError(f"has dims {_short(dims)} but its data does not match them "
                         f"({type(e).__name__})") from None
    if arr.shape != tuple(dims):
        raise ValueError(f"has dims {_short(dims)} but decodes to shape {list(arr.shape)}")
    return arr


def sanitize_name(text: str) -> str:
    """A C identifier `[a-z][a-z0-9_]*` from a file stem.

    >>> sanitize_name("TFC-1w1a.v2"), sanitize_name("9lives")
    ('tfc_1w1a_v2', 'model_9lives')
    """
    s = re.sub(r"[^a-z0-9_]", "_", text.lower()).strip("_") or "model"
    s = re.sub(r"_+", "_", s)
    return s if s[0].isalpha() else f"model_{s}"


# ---------------------------------------------------------------------------------------------
# constant folding: one numpy function per op (ONNX semantics for the cases exporters emit)


def _np_reshape(node, a, shape):
    allowzero = _attrs(node).get("allowzero", 0)
    shape = [int(d) for d in shape]
    if not allowzero:
        shape = [a.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return a.reshape(shape)


def _axes(node, given, default=None):
    if given is not None:
        return [int(v) for v in np.asarray(given).ravel()]
    return list(_attrs(node).get("axes", default or []))


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
    at = _attrs(node)
    return np.array(a.shape, dtype=np.int64)[at.get("start", 0):at.get("end", None)]


def _np_constant_of_shape(node, shape):
    v = _attrs(node).get("value")
    fill = _const_tensor(node, v).ravel() if v is not None else np.zeros(1, np.float32)
    if fill.size != 1:
        raise _NodeError(node, f"value holds {fill.size} elements; ONNX requires one")
    # a Shape() of an activation carries the batch sentinel: a size-1 axis broadcasts the same way
    dims = [1 if int(d) == _BATCH else int(d) for d in np.asarray(shape).ravel()]
    return np.full(dims, fill[0], dtype=fill.dtype)


def _np_div(node, a, b):
    if np.issubdtype(np.result_type(a, b), np.integer):
        return np.trunc(a / b).astype(np.result_type(a, b))
    return a / b


def _np_cast(node, a):
    return a.astype(helper.tensor_dtype_to_np_dtype(_attrs(node)["to"]))


def _np_slice(node, a, starts, ends, axes=None, steps=None):
    axes = list(range(len(starts))) if axes is None else [int(x) for x in axes]
    steps = [1] * len(starts) if steps is None else [int(x) for x in steps]
    idx = [slice(None)] * a.ndim
    for s, e, ax, st in zip(starts, ends, axes, steps):
        idx[ax] = slice(int(s), int(e), st)
    return a[tuple(idx)]


_FOLD = {
    "Add": lambda n, a, b: a + b, "Sub": lambda n, a, b: a - b, "Mul": lambda n, a, b: a * b,
    "Div": _np_div, "Pow": lambda n, a, b: np.power(a, b).astype(a.dtype),
    "Neg": lambda n, a: -a, "Sqrt": lambda n, a: np.sqrt(a), "Abs": lambda n, a: np.abs(a),
    "Reciprocal": lambda n, a: (1 / a).astype(a.dtype), "Exp": lambda n, a: np.exp(a),
    "Identity": lambda n, a: a, "Cast": _np_cast,
    "Transpose": lambda n, a: np.transpose(a, _attrs(n).get("perm")),
    "Reshape": _np_reshape, "Unsqueeze": _np_unsqueeze, "Squeeze": _np_squeeze,
    "Flatten": lambda n, a: a.reshape(int(np.prod(a.shape[:_attrs(n).get("axis", 1)])), -1),
    "Concat": lambda n, *xs: np.concatenate(xs, axis=_attrs(n)["axis"]),
    "Gather": lambda n, a, i: np.take(a, i.astype(np.int64), axis=_attrs(n).get("axis", 0)),
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

# (min, max) inputs of every op the importer reads; ONNX optional inputs may be "" in between
_ARITY = {
    **dict.fromkeys(("Sign", "MaxPool", "AveragePool", "GlobalAveragePool", "Flatten", "Relu",
                     "Neg", "Softmax", "Identity", "Cast", "Transpose", "Shape",
                     "ConstantOfShape", "Sqrt", "Abs", "Reciprocal", "Exp", "Not"), (1, 1)),
    **dict.fromkeys(("MatMul", "BipolarQuant", "MultiThreshold", "Reshape", "Add", "Sub", "Mul",
                     "Div", "GreaterOrEqual", "Less", "Gather", "Expand", "Equal", "Greater",
                     "LessOrEqual", "Pow"), (2, 2)),
    **dict.fromkeys(("Gemm", "Conv"), (2, 3)),
    **dict.fromkeys(("Squeeze", "Unsqueeze"), (1, 2)),
    **dict.fromkeys(("Concat", "Min", "Max"), (1, 1 << 16)),
    "BatchNormalization": (5, 5), "Quant": (4, 4), "Dropout": (1, 3), "Where": (3, 3),
    "Slice": (3, 5), "Constant": (0, 0),
}


def _fold_elements(op: str, node, arrays) -> int:
    """The element count a constant fold of `op` would produce, computed from shapes alone (0
    when the inputs are inconsistent: the fold itself then reports the error)."""
    try:
        if op in _BROADCAST:
            return math.prod(np.broadcast_shapes(*(a.shape for a in arrays)))
        # the batch placeholder of a folded Shape() stands for a size-1 axis
        if op == "ConstantOfShape":
            return math.prod(1 if int(d) == _BATCH else abs(int(d))
                             for d in np.asarray(arrays[0]).ravel())
        if op == "Expand":
            return math.prod(np.broadcast_shapes(arrays[0].shape, tuple(
                1 if int(d) == _BATCH else abs(int(d)) for d in np.asarray(arrays[1]).ravel())))
        if op == "Gather":
            a, i = arrays
            shape = list(a.shape)
            del shape[int(_attrs(node).get("axis", 0)) % a.ndim]
            return math.prod(shape) * np.asarray(i).size
        if op == "Concat":
            return sum(a.size for a in arrays)
    except (ValueError, TypeError, IndexError, ZeroDivisionError, OverflowError):
        return 0
    return max((np.asarray(a).size for a in arrays), default=0)


def _const_tensor(node, t: TensorProto) -> np.ndarray:
    try:
        return _tensor_array(t)
    except ValueError as e:
        raise _NodeError(node, f"value tensor {e}") from None


def _constant_attr(node: onnx.NodeProto) -> np.ndarray:
    at = _attrs(node)
    if "value" in at:
        return _const_tensor(node, at["value"])
    for key, dt in (("value_float", np.float32), ("value_floats", np.float32),
                    ("value_int", np.int64), ("value_ints", np.int64)):
        if key in at:
            return np.array(at[key], dtype=dt)
    raise UnsupportedModelError(f"{_where(node)} holds a {', '.join(at) or 'missing'} value",
                                hint="bnnc reads dense tensor / float / int Constant values only")


# ---------------------------------------------------------------------------------------------
# the importer


class _Importer:
    def __init__(self, model: onnx.ModelProto, name: str, sha: str, label: str):
        self.model = model
        self.g = model.graph
        self.name = name
        self.sha = sha
        self.label = label
        self.specs: dict[str, _Spec] = {}
        self.count: dict[LayerKind, int] = {}
        self.env: dict[str, Any] = {}
        self.inits: dict[str, TensorProto] = {}           # decoded into env when first read
        self.current: onnx.NodeProto | None = None        # the node being imported, for messages
        self.consumers: dict[str, int] = {}
        self.quant_file = False
        self.nhwc = False
        self.input_name = ""
        self.output_name = ""

    # -- graph structure -----------------------------------------------------------------------

    def run(self) -> ir.Graph:
        try:
            # inf/NaN arising in constant arithmetic is caught where it lands (_param, verify)
            with np.errstate(all="ignore"):
                return self._run()
        except _NodeError as e:
            raise e.cls(f"{self.label}: {_where(e.node)}: {e.why}", hint=e.hint) from None

    def _run(self) -> ir.Graph:
        g = self.g
        inits = self.inits
        for t in g.initializer:
            if t.name in inits:
                raise ModelError(f"{self.label}: two initializers are named '{printable(t.name)}'",
                                 hint="the file is corrupt; re-export it")
            inits[t.name] = t
        inputs = [i for i in g.input if i.name not in inits]
        if len(inputs) != 1:
            names = ", ".join(f"'{printable(i.name)}'" for i in inputs[:5]) or "none"
            raise UnsupportedModelError(
                f"{self.label}: the graph has {len(inputs)} inputs ({names}); bnnc needs exactly "
                f"one",
                hint="export the model with a single image/feature input")
        if len(g.output) != 1:
            names = ", ".join(f"'{printable(o.name)}'" for o in g.output[:5])
            raise UnsupportedModelError(
                f"{self.label}: the graph has {len(g.output)} outputs ({names}); bnnc needs one",
                hint="export only the logits (or probabilities) as the graph output")
        self.input_name, self.output_name = inputs[0].name, g.output[0].name
        order = self._live_nodes(inits)
        self.quant_file = any(n.domain in QUANT_DOMAINS for n in g.node)
        input_shape = self._input(inputs[0], order)
        for n in order:
            self._node(n)
        out = self.env.get(self.output_name)
        if not isinstance(out, _Act) or (out.layer == INPUT and out.aff is None):
            raise UnsupportedModelError(
                f"{self.label}: the graph output '{printable(self.output_name)}' is not computed "
                f"from the input by any layer",
                hint="the output must be the network's logits or probabilities")
        out = self._mat(out)
        specs = self._fold_biases(self._reachable(out.layer))
        last = specs[-1]
        if last.kind not in _OUTPUT_KINDS:
            raise UnsupportedModelError(
                f"{self.label}: the network ends in a {last.kind.value} layer "
                f"(ONNX node '{printable(last.onnx_name)}'); bnnc trains networks whose output is "
                f"logits",
                hint="end the network in MatMul/Gemm (+ BatchNormalization / scaling) or Softmax")
        # final names count only the layers the output depends on, so numbering has no gaps
        rename, counts = {INPUT: INPUT}, {}
        for s in specs:
            counts[s.kind] = counts.get(s.kind, 0) + 1
            rename[s.name] = f"{_PREFIX[s.kind]}{counts[s.kind]}"
        layers = tuple(ir.Layer(rename[s.name], s.kind, tuple(rename[i] for i in s.inputs),
                                s.shape, s.attrs, s.params, s.onnx_name) for s in specs)
        graph = ir.Graph(self.name, input_shape, layers, "NHWC" if self.nhwc else "NCHW", self.sha)
        graph.verify()
        return graph

    def _live_nodes(self, inits) -> list[onnx.NodeProto]:
        nodes = list(self.g.node)
        producer: dict[str, int] = {}
        for i, n in enumerate(nodes):
            for o in n.output:
                if o in producer:
                    raise ModelError(f"{self.label}: tensor '{printable(o)}' is produced by two "
                                     f"nodes ({_where(nodes[producer[o]])} and {_where(n)})")
                if o and (o in inits or o == self.input_name):
                    what = "an initializer" if o in inits else "the graph input"
                    raise ModelError(f"{self.label}: {_where(n)} writes '{printable(o)}', which is "
                                     f"{what}", hint="the file is corrupt; re-export it")
                if o:
                    producer[o] = i
        known = set(inits) | {self.input_name}
        live, stack = set(), [self.output_name]
        while stack:
            t = stack.pop()
            if t in known or t == "":
                continue
            if t not in producer:
                raise ModelError(f"{self.label}: graph output '{printable(t)}' is produced by no "
                                 f"node",
                                 hint="the file is incomplete; re-export it")
            i = producer[t]
            if i in live:
                continue
            live.add(i)
            for s in nodes[i].input:
                if s and s not in known and s not in producer:
                    raise ModelError(
                        f"{self.label}: {_where(nodes[i])} reads '{printable(s)}', which no node, "
                        f"initializer or graph input produces", hint="a dangling input: the file "
                        "is incomplete or was cut from a larger graph; re-export it")
                stack.append(s)
        # Kahn's algorithm over live nodes, ties broken by file position: deterministic layer names
        deps = {i: {producer[s] for s in nodes[i].input if s in producer and producer[s] in live}
                for i in live}
        users: dict[int, list[int]] = {i: [] for i in live}
        for i, ds in deps.items():
            for d in ds:
                users[d].append(i)
        indeg = {i: len(ds) for i, ds in deps.items()}
        ready = sorted(i for i in live if indeg[i] == 0)
        order: list[int] = []
        while ready:
            i = ready.pop(0)
            order.append(i)
            for u in users[i]:
                indeg[u] -= 1
                if indeg[u] == 0:
                    ready.append(u)
            ready.sort()
        if len(order) != len(live):
            stuck = min(i for i in live if indeg[i] > 0)
            raise ModelError(f"{self.label}: the graph has a cycle through {_where(nodes[stuck])}",
                             hint="ONNX graphs must be acyclic; re-export the model")
        for i in order:
            for s in nodes[i].input:
                if s:
                    self.consumers[s] = self.consumers.get(s, 0) + 1
        self.consumers[self.output_name] = self.consumers.get(self.output_name, 0) + 1
        return [nodes[i] for i in order]

    def _input(self, vi: onnx.ValueInfoProto, order) -> tuple[int, ...]:
        tt = vi.type.tensor_type
        where = f"{self.label}: graph input '{printable(vi.name)}'"
        if not vi.type.HasField("tensor_type") or tt.elem_type != onnx.TensorProto.FLOAT:
            et = _dtype_name(tt.elem_type) if tt.elem_type else "non-tensor"
            raise UnsupportedModelError(f"{where} has type {et}",
                                        hint="bnnc expects a float32 input tensor")
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        if not tt.HasField("shape") or not 2 <= len(dims) <= _MAX_RANK:
            raise UnsupportedModelError(
                f"{where} has rank {len(dims)}; bnnc needs a batch dimension plus a known "
                f"per-sample shape", hint="export with an input shape like [N, C, H, W] or [N, F]")
        per = dims[1:]
        if any(d is None or d <= 0 for d in per):
            shown = ", ".join(str(d.dim_value) if d.HasField("dim_value") else
                              f"'{printable(d.dim_param, 20)}'" if d.dim_param else "?"
                              for d in tt.shape.dim)
            raise UnsupportedModelError(
                f"{where} has shape [{shown}]; only the batch (first) dimension may be symbolic",
                hint="export with fixed per-sample dimensions (e.g. 1x28x28 or 3x32x32)")
        per = tuple(int(d) for d in per)
        if math.prod(per) > _MAX_ACT_ELEMENTS:
            raise UnsupportedModelError(
                f"{where} has {math.prod(per):,} elements per sample (shape {list(per)}); the "
                f"generated C indexes tensors with 32-bit ints",
                hint="bnnc targets small inputs (e.g. 1x28x28 or 3x32x32)")
        # tf2onnx: an NHWC input whose first layout-sensitive use is Transpose(perm=[0,3,1,2])
        if len(per) == 3 and self._first_transpose_is_nchw(order):
            self.nhwc = True
            per = (per[2], per[0], per[1])
        self.env[self.input_name] = _Act(INPUT, per, nhwc=self.nhwc)
        return per

    def _first_transpose_is_nchw(self, order) -> bool:
        elementwise = {"Mul", "Add", "Sub", "Div", "Identity", "Dropout", "Cast", "Quant",
                       "BipolarQuant", "Sign", "Relu", "MultiThreshold"}
        frontier = {self.input_name}
        for n in order:
            if not any(i in frontier for i in n.input):
                continue
            if n.op_type == "Transpose":
                if list(_attrs(n).get("perm", [])) == [0, 3, 1, 2]:
                    return True
                continue
            if n.op_type in elementwise:
                frontier.update(n.output)
        return False

    def _fold_biases(self, specs: list[_Spec]) -> list[_Spec]:
        """A scale-1 AFFINE that is the only reader of a real DENSE/CONV becomes that layer's `b`
        (a MatMul + Add bias export). Done on the final layer list: reader counts are exact."""
        readers: dict[str, int] = {}
        for s in specs:
            for i in s.inputs:
                readers[i] = readers.get(i, 0) + 1
        alias: dict[str, str] = {}
        kept = []
        for s in specs:
            s.inputs = tuple(alias.get(i, i) for i in s.inputs)
            base = self.specs.get(s.inputs[0])
            if (s.kind is LayerKind.AFFINE and base is not None and readers[base.name] == 1
                    and base.kind in (LayerKind.DENSE, LayerKind.CONV)
                    and not base.attrs["binary"] and np.all(s.params["scale"] == 1)):
                C = base.shape[0]
                b = base.params.get("b", np.zeros(C, np.float32)).astype(np.float64)
                base.params["b"] = (b + np.broadcast_to(s.params["bias"], (C,))).astype(np.float32)
                base.onnx_name = f"{base.onnx_name}+{s.onnx_name}"
                alias[s.name] = base.name
                continue
            kept.append(s)
        return kept

    def _reachable(self, out: str) -> list[_Spec]:
        need, stack = set(), [out]
        while stack:
            s = stack.pop()
            if s != INPUT and s not in need:
                need.add(s)
                stack.extend(self.specs[s].inputs)
        return [s for s in self.specs.values() if s.name in need]

    # -- layer creation ------------------------------------------------------------------------

    def _add(self, kind: LayerKind, inputs, shape, node_names, *, attrs=None, params=None) -> str:
        shape = tuple(int(d) for d in shape)
        if any(d < 1 for d in shape) or math.prod(shape) > _MAX_ACT_ELEMENTS:
            node = self.current if self.current is not None else _Named(node_names)
            self._fail(node, f"its {kind.value} output would have per-sample shape {list(shape)}; "
                       f"bnnc needs 1 to {_MAX_ACT_ELEMENTS:,} elements",
                       hint="check the layer's weight shape, strides and pads")
        k = self.count.get(kind, 0) + 1
        self.count[kind] = k
        name = f"{_PREFIX[kind]}{k}"
        self.specs[name] = _Spec(name, kind, tuple(inputs), tuple(int(d) for d in shape),
                                 dict(attrs or {}), dict(params or {}), node_names)
        return name

    def _param(self, arr, node, what: str) -> np.ndarray:
        a = np.array(arr, dtype=np.float32, copy=True)
        if not np.all(np.isfinite(a)):
            raise ModelError(f"{self.label}: {what} of {_where(node)} contains NaN or Inf",
                             hint="the exported weights are broken; re-export a healthy checkpoint")
        return a

    def _get(self, name: str, node):
        if name not in self.env and name in self.inits:
            try:
                self.env[name] = _Const(_tensor_array(self.inits[name]))
            except ValueError as e:
                raise ModelError(f"{self.label}: initializer '{printable(name)}' (read by "
                                 f"{_where(node)}) {e}",
                                 hint="the file is corrupt or uses a type bnnc does not read; "
                                      "re-export it") from None
        if name not in self.env:
            raise ModelError(f"{self.label}: {_where(node)} reads '{printable(name)}', which no "
                             f"node, initializer or graph input produces")
        return self.env[name]

    # -- node dispatch -------------------------------------------------------------------------

    def _node(self, node: onnx.NodeProto) -> None:
        op = node.op_type
        self.current = node
        if node.domain in QUANT_DOMAINS:
            if op not in _QUANT_OPS:
                self._unsupported(node)
        elif node.domain not in ("", "ai.onnx"):
            self._unsupported(node, f"custom domain '{printable(node.domain)}'")
        lo, hi = _ARITY.get(op, (0, 1 << 16))
        if not lo <= len(node.input) <= hi or not all(node.input[:lo]):
            n_in = sum(1 for i in node.input if i)
            want = f"{lo}" if lo == hi else f"{lo} to {hi}"
            raise ModelError(f"{self.label}: {_where(node)} has {n_in} inputs; "
                             f"{printable(op, 40)} takes {want}",
                             hint="the file does not follow the ONNX operator spec; re-export it")
        if op == "Constant":
            try:
                self.env[node.output[0]] = _Const(_constant_attr(node))
            except UnsupportedModelError as e:
                raise UnsupportedModelError(f"{self.label}: {e.message}", hint=e.hint) from None
            return
        vals = [self._get(i, node) if i else None for i in node.input]
        vals = [_Const(v.value()) if isinstance(v, _Cmp) and isinstance(v.x, _Const)
                and op != "Where" else v for v in vals]
        present = [v for v in vals if v is not None]
        handler = getattr(self, f"_op_{op.lower()}", None)
        all_const = present and all(isinstance(v, _Const) for v in present)
        if all_const and op in _FOLD and op not in ("GreaterOrEqual", "Less"):
            arrays = [v.arr if v is not None else None for v in vals]
            self._check_fold(node, op, arrays)
            try:
                with np.errstate(all="ignore"):   # inf/NaN constants are reported where used
                    outs = _FOLD[op](node, *arrays)
            except (ValueError, IndexError, TypeError, KeyError, ZeroDivisionError,
                    OverflowError) as e:
                raise ModelError(f"{self.label}: cannot evaluate constant {_where(node)}: "
                                 f"{printable(e, 200)}") from None
            self.env[node.output[0]] = _Const(np.asarray(outs))
            return
        if handler is None:
            self._unsupported(node)
        result = handler(node, vals)
        if op == "Dropout" and len(node.output) > 1 and self.consumers.get(node.output[1]):
            raise UnsupportedModelError(f"{self.label}: the mask output of {_where(node)} is used",
                                        hint="export the model in inference mode")
        self.env[node.output[0]] = result

    def _check_fold(self, node, op: str, arrays) -> None:
        arrays = [a for a in arrays if a is not None]
        n = _fold_elements(op, node, arrays)
        limit = max([_MAX_FOLD_ELEMENTS] + [np.asarray(a).size for a in arrays])
        if n > limit:
            self._fail(node, f"folding this constant would produce {n:,} elements, more than "
                       f"its inputs and than {_MAX_FOLD_ELEMENTS:,}",
                       hint="the constant subgraph is far larger than any weight; check the file")

    def _unsupported(self, node, why: str | None = None):
        raise UnsupportedModelError(
            f"{self.label}: unsupported op {printable(node.op_type, 40)} at {_where(node)}"
            + (f" ({why})" if why else ""), hint=_HINT_OPS)

    def _fail(self, node, why: str, hint: str | None = None):
        raise UnsupportedModelError(f"{self.label}: {_where(node)}: {why}", hint=hint)

    def _bcast(self, arr, shape, node, what: str) -> np.ndarray:
        """np.broadcast_to with a message naming the node (a read-only view, no copy)."""
        try:
            return np.broadcast_to(arr, shape)
        except ValueError:
            self._fail(node, f"{what} of shape {list(np.shape(arr))} does not broadcast to "
                       f"{list(shape)}")

    def _const(self, v, node, what: str) -> np.ndarray:
        if isinstance(v, _Const):
            return v.arr
        self._fail(node, f"{what} must be a constant (initializer or constant subgraph)")

    def _int_list(self, v, node, what: str) -> list[int]:
        """A constant of whole numbers (a shape) as ints; ONNX types shapes int64, so a float one
        is accepted only when every value is a finite integer (NaN would reach int())."""
        arr = np.asarray(self._const(v, node, what)).ravel()
        if arr.dtype.kind not in "iu" and not (arr.dtype.kind == "f" and np.all(np.isfinite(arr))
                                               and np.all(arr == np.round(arr))):
            self._fail(node, f"{what} {_short(arr)} is not a list of integers")
        return [int(d) for d in arr]

    def _act(self, v, node, what="its data input") -> _Act:
        if isinstance(v, _Act):
            return v
        kind = {_Const: "a constant", _Bin: "a binarized constant", _Cmp: "a comparison",
                _SteRes: "a partial STE expression", type(None): "missing"}.get(type(v), "?")
        self._fail(node, f"{what} is {kind}, expected an activation")

    def _nchw(self, act: _Act, node) -> _Act:
        if act.nhwc:
            self._fail(node, "reads the NHWC network input before its Transpose(perm=[0,3,1,2])",
                       hint="only elementwise ops may come before the NCHW transpose")
        return self._mat(act)

    # -- pending affine --------------------------------------------------------------------------

    def _chan(self, act: _Act, arr, node) -> tuple[np.ndarray, bool]:
        """An ONNX constant broadcast against `act` -> (float64 [C] or [1], per_channel)."""
        ps = act.onnx_shape
        a = np.asarray(arr, dtype=np.float64)
        if a.ndim > len(ps) + 1:
            self._fail(node, f"constant of shape {list(a.shape)} has more dims than the "
                       f"activation {['N', *ps]}")
        a = a.reshape((1,) * (len(ps) + 1 - a.ndim) + a.shape)
        if a.shape[0] != 1:
            self._fail(node, f"constant of shape {list(np.asarray(arr).shape)} varies over the "
                       f"batch dimension")
        a = a[0]
        cax = len(ps) - 1 if act.nhwc else 0
        for ax, (d, s) in enumerate(zip(a.shape, ps)):
            if d != 1 and (d != s or ax != cax):
                self._fail(node, f"constant of shape {list(np.asarray(arr).shape)} is not per "
                           f"channel or per tensor for an activation of shape {['N', *ps]}",
                           hint="bnnc folds scalar and per-channel constants only")
        if a.shape[cax] == 1:
            return a.reshape(1), False
        return a.reshape(-1), True

    def _affine(self, x: _Act, node, mul=None, add=None, *, mul_pc=False,
                explicit=True) -> _Act:
        """x*mul + add on top of x's pending affine (arrays already per channel). `explicit`:
        the constants come from ONNX Mul/Add nodes (not a layer's weight scale or bias)."""
        aff = x.aff or _Aff(np.ones(1), np.zeros(1), [])
        s, t = aff.scale, aff.bias
        if mul is not None:
            s, t = s * mul, t * mul
        if add is not None:
            t = t + add
        nodes = aff.nodes if aff.nodes and aff.nodes[-1] == _label(node) else \
            aff.nodes + [_label(node)]
        new = _Aff(s, t, nodes,
                   aff.pc_mul or (mul is not None and mul_pc and explicit),
                   aff.add or (add is not None and explicit))
        return _Act(x.layer, x.shape, x.nhwc, new)

    def _mat(self, x: _Act) -> _Act:
        """Materialize a pending affine (once per value)."""
        if x.aff is None:
            return x
        if x.mat is not None:
            return x.mat
        aff, C = x.aff, x.shape[0]
        base = self.specs.get(x.layer)
        scale, bias = aff.scale, aff.bias
        onnx_name = "+".join(aff.nodes)
        real_base = (base is not None and base.kind in (LayerKind.DENSE, LayerKind.CONV)
                     and not base.attrs["binary"])
        # an identity chain vanishes, except a bias Add on a real layer: a trainable `b` even
        # when it is all zeros (an untrained export); _fold_biases turns it into that `b`
        if np.all(scale == 1) and np.all(bias == 0) and not (real_base and aff.add):
            res = _Act(x.layer, x.shape, x.nhwc)
        elif (base is not None and base.kind in (LayerKind.DENSE, LayerKind.CONV) and aff.pc_mul
              and aff.add and not x.nhwc):
            nm = _Named(onnx_name)
            name = self._add(LayerKind.BATCHNORM, [x.layer], x.shape, onnx_name,
                             attrs={"eps": _FOLDED_BN_EPS, "momentum": _FOLDED_BN_MOMENTUM},
                             params={"gamma": self._param(np.broadcast_to(scale, (C,)), nm,
                                                          "scale"),
                                     "beta": self._param(np.broadcast_to(bias, (C,)), nm,
                                                         "bias"),
                                     "mean": np.zeros(C, np.float32),
                                     "var": np.full(C, 1 - _FOLDED_BN_EPS, np.float32)})
            res = _Act(name, x.shape)
        else:
            nm = _Named(onnx_name)
            n = C if (scale.size > 1 or bias.size > 1) else 1
            name = self._add(LayerKind.AFFINE, [x.layer], x.shape, onnx_name,
                             params={"scale": self._param(np.broadcast_to(scale, (n,)), nm,
                                                          "scale"),
                                     "bias": self._param(np.broadcast_to(bias, (n,)), nm,
                                                         "bias")})
            res = _Act(name, x.shape, x.nhwc)
        x.mat = res
        return res

    # -- binarizers ------------------------------------------------------------------------------

    def _binarize(self, x, scale, node, src: str):
        if isinstance(x, _Const):
            if not np.issubdtype(x.arr.dtype, np.floating):
                self._fail(node, f"binarizes a {x.arr.dtype} constant")
            sc = self._bcast(np.asarray(scale, np.float64), x.arr.shape, node, "the scale").copy()
            if np.any(sc <= 0):
                self._fail(node, "binarizer scale is not positive")
            return _Bin(x.arr, sc, src)
        if isinstance(x, _Bin):
            self._check_idempotent(x.scale, x.shift, node)
            sc = self._bcast(np.asarray(scale, np.float64), x.latent.shape, node,
                             "the scale").copy()
            return _Bin(x.latent, sc, x.src)
        x = self._act(x, node)
        if x.aff is not None and self._is_sign(x.layer):
            # Larq's Sign(Sign(x) + 0.1): B(s*B(x) + t) == B(x) for s > 0, |t| < s
            ok = np.all(x.aff.scale > 0) and np.all(np.abs(x.aff.bias) < x.aff.scale)
            base = _Act(x.layer, x.shape, x.nhwc) if ok else self._mat(x)
        else:
            base = self._mat(x)
        if self._is_sign(base.layer) and base.aff is None:
            name = base.layer
        else:
            name = self._add(LayerKind.SIGN, [base.layer], base.shape, _label(node))
        out = _Act(name, base.shape, base.nhwc, src=src)
        sc, _ = self._chan(out, scale, node)
        if np.any(sc <= 0):
            self._fail(node, f"binarizer scale {_short(sc)} is not positive")
        if not np.all(sc == 1):
            out = self._affine(out, node, mul=sc, explicit=False)
            out.src = src
        return out

    def _check_idempotent(self, scale, shift, node):
        if np.any(scale <= 0) or (shift is not None and np.any(np.abs(shift) >= scale)):
            self._fail(node, "binarizes a binarized weight whose scale/shift change its signs")

    def _is_sign(self, layer: str) -> bool:
        return layer in self.specs and self.specs[layer].kind is LayerKind.SIGN

    def _op_sign(self, node, vals):
        return self._binarize(vals[0], 1.0, node, node.input[0])

    def _op_bipolarquant(self, node, vals):
        scale = self._const(vals[1], node, "the scale")
        return self._binarize(vals[0], scale, node, node.input[0])

    def _op_quant(self, node, vals):
        if len(vals) != 4:
            self._fail(node, f"has {len(vals)} inputs; QONNX Quant takes x, scale, zero_point, "
                       "bit_width")
        scale, zp, bits = (self._const(v, node, w) for v, w in
                           zip(vals[1:], ("the scale", "the zero point", "the bit width")))
        at = _attrs(node)
        signed, narrow = bool(at.get("signed", 1)), bool(at.get("narrow", 0))
        if bits.size != 1 or not np.isfinite(float(bits.ravel()[0])) or \
                float(bits.ravel()[0]) != int(bits.ravel()[0]):
            self._fail(node, f"bit width {_short(bits)} is not one integer")
        nbits = int(bits.ravel()[0])
        if nbits == 1:
            if not signed or np.any(zp != 0):
                self._fail(node, "1-bit Quant with signed=0 or a zero point is {0,1}-valued, not "
                           "bipolar", hint="bnnc binarizes to +-1 (signed, zero_point 0)")
            return self._binarize(vals[0], scale, node, node.input[0])
        x = vals[0]
        supported = ("bnnc handles 1-bit weights and activations, plus one 2..8-bit Quant on the "
                     "network input")
        if not isinstance(x, _Act):
            self._fail(node, f"unsupported Quant bit width {nbits} on a weight", hint=supported)
        x = self._mat(x)      # elementwise: fine on the NHWC input before its transpose
        if not self._on_input(x.layer) or not 2 <= nbits <= 8:
            where = "on the network input" if self._on_input(x.layer) else "on an activation"
            self._fail(node, f"unsupported Quant bit width {nbits} {where}", hint=supported)
        if scale.size != 1 or zp.size != 1:
            self._fail(node, "per-channel input quantization is not supported",
                       hint="use a per-tensor scale and zero point")
        mode = str(at.get("rounding_mode", "ROUND")).upper()
        if mode != "ROUND":
            self._fail(node, f"rounding_mode {mode} is not supported", hint="use ROUND")
        s, z = float(np.float32(scale.ravel()[0])), float(np.float32(zp.ravel()[0]))
        if not (np.isfinite(s) and s > 0 and np.isfinite(z)):
            self._fail(node, f"scale {s} / zero point {z} must be finite, scale > 0")
        name = self._add(LayerKind.INPUT_QUANT, [x.layer], x.shape, _label(node),
                         attrs={"scale": s, "zero_point": z, "bits": nbits, "signed": signed,
                                "narrow": narrow, "rounding_mode": "ROUND"})
        return _Act(name, x.shape, x.nhwc)

    def _on_input(self, layer: str) -> bool:
        while layer != INPUT:
            spec = self.specs[layer]
            if spec.kind not in (LayerKind.AFFINE, LayerKind.FLATTEN):
                return False
            layer = spec.inputs[0]
        return True

    def _op_multithreshold(self, node, vals):
        thr = self._const(vals[1], node, "the thresholds")
        at = _attrs(node)
        out_scale, out_bias = float(at.get("out_scale", 1.0)), float(at.get("out_bias", 0.0))
        if thr.ndim != 2 or thr.shape[1] != 1 or np.any(thr != 0):
            self._fail(node, f"thresholds of shape {list(thr.shape)} are not a single threshold "
                       "at 0", hint="bnnc reads MultiThreshold only as a bipolar sign "
                       "(thresholds [[0]], out_scale 2, out_bias -1)")
        if not (out_bias < 0 and out_scale == -2 * out_bias):
            self._fail(node, f"out_scale {out_scale} / out_bias {out_bias} do not give +-c",
                       hint="bnnc reads MultiThreshold only as a bipolar sign "
                       "(out_scale 2, out_bias -1)")
        return self._binarize(vals[0], -out_bias, node, node.input[0])

    def _cmp(self, node, vals, op):
        x, zero = vals
        if isinstance(zero, _Const) and zero.arr.size == 1 and float(zero.arr.ravel()[0]) == 0 \
                and isinstance(x, (_Act, _Const, _Bin)) \
                and not (isinstance(x, _Const) and not np.issubdtype(x.arr.dtype, np.floating)):
            return _Cmp(x, node.input[0], op)
        if all(isinstance(v, _Const) for v in vals):
            self._check_fold(node, node.op_type, [vals[0].arr, vals[1].arr])
            try:
                return _Const(_FOLD[node.op_type](node, vals[0].arr, vals[1].arr))
            except (ValueError, TypeError) as e:
                self._fail(node, f"cannot compare the constants ({printable(e, 200)})")
        self._fail(node, "only `x >= 0` / `x < 0` comparisons (the Where binarizer) are supported")

    def _op_greaterorequal(self, node, vals):
        return self._cmp(node, vals, "ge")

    def _op_less(self, node, vals):
        return self._cmp(node, vals, "lt")

    def _op_where(self, node, vals):
        cond, a, b = vals
        if isinstance(cond, _Cmp) and isinstance(a, _Const) and isinstance(b, _Const):
            av, bv = a.arr.astype(np.float64).ravel(), b.arr.astype(np.float64).ravel()
            hi, lo = (av, bv) if cond.op == "ge" else (bv, av)
            if hi.size and lo.size and np.all(hi == hi[0]) and np.all(lo == -hi[0]) and hi[0] > 0:
                return self._binarize(cond.x, hi[0], node, cond.src)
        if isinstance(cond, _Cmp) and isinstance(cond.x, _Const) and all(
                isinstance(v, _Const) for v in (a, b)):
            self._check_fold(node, "Where", [cond.x.arr, a.arr, b.arr])
            try:
                return _Const(np.where(cond.value(), a.arr, b.arr))
            except (ValueError, TypeError) as e:
                self._fail(node, f"cannot select between the constants ({printable(e, 200)})")
        self._fail(node, "Where is supported only as the binarizer Where(x >= 0, c, -c)",
                   hint="bnnc maps Where(x >= 0, 1, -1) to sign with sign(0) = +1")

    # -- elementwise arithmetic ------------------------------------------------------------------

    def _op_add(self, node, vals):
        a, b = vals
        for x_name, y in ((node.input[0], b), (node.input[1], a)):
            if isinstance(y, _SteRes) and y.src == x_name:
                return y.s      # x + (B(x) - x) == B(x): the straight-through-estimator idiom
        for x, y in ((a, b), (b, a)):
            if isinstance(x, _Bin) and isinstance(y, _Const):
                shift = self._bcast(y.arr, x.latent.shape, node, "the constant")
                return _Bin(x.latent, x.scale, x.src,
                            shift if x.shift is None else x.shift + shift)
            if isinstance(x, _Act) and isinstance(y, _Const):
                c, _ = self._chan(x, y.arr, node)
                return self._affine(x, node, add=c)
        if isinstance(a, _Act) and isinstance(b, _Act):
            xa, xb = self._nchw(a, node), self._nchw(b, node)
            if xa.shape != xb.shape:
                self._fail(node, f"adds activations of shapes {list(xa.shape)} and "
                           f"{list(xb.shape)}", hint="residual adds need equal shapes")
            name = self._add(LayerKind.ADD, [xa.layer, xb.layer], xa.shape, _label(node))
            return _Act(name, xa.shape)
        self._fail(node, "unsupported operands for Add")

    def _op_sub(self, node, vals):
        a, b = vals
        if isinstance(a, (_Act, _Bin)) and a.src is not None and a.src == node.input[1]:
            return _SteRes(a, a.src)
        if isinstance(a, _Bin) and isinstance(b, _Const):
            shift = -self._bcast(b.arr, a.latent.shape, node, "the constant")
            return _Bin(a.latent, a.scale, a.src, shift if a.shift is None else a.shift + shift)
        if isinstance(a, _Act) and isinstance(b, _Const):
            c, _ = self._chan(a, b.arr, node)
            return self._affine(a, node, add=-c)
        if isinstance(a, _Const) and isinstance(b, _Act):
            c, _ = self._chan(b, a.arr, node)
            return self._affine(b, node, mul=np.array([-1.0]), add=c)
        self._fail(node, "unsupported operands for Sub",
                   hint="bnnc folds Sub with a constant, and the STE idiom x + (sign(x) - x)")

    def _op_mul(self, node, vals):
        a, b = vals
        for x, y in ((a, b), (b, a)):
            if isinstance(x, _Bin) and isinstance(y, _Const):
                m = self._bcast(y.arr, x.latent.shape, node, "the constant")
                return _Bin(x.latent, x.scale * m, x.src, None if x.shift is None else x.shift * m)
            if isinstance(x, _Act) and isinstance(y, _Const):
                c, pc = self._chan(x, y.arr, node)
                return self._affine(x, node, mul=c, mul_pc=pc)
        self._fail(node, "unsupported operands for Mul", hint="bnnc folds Mul by a constant only")

    def _op_div(self, node, vals):
        a, b = vals
        if isinstance(a, _Act) and isinstance(b, _Const):
            c, pc = self._chan(a, b.arr, node)
            if np.any(c == 0):
                self._fail(node, "divides by zero")
            return self._affine(a, node, mul=1.0 / c, mul_pc=pc)
        self._fail(node, "unsupported operands for Div", hint="bnnc folds Div by a constant only")

    def _op_neg(self, node, vals):
        x = self._act(vals[0], node)
        return self._affine(x, node, mul=np.array([-1.0]))

    # -- pass-through ----------------------------------------------------------------------------

    def _op_identity(self, node, vals):
        return vals[0]

    def _op_dropout(self, node, vals):
        if len(vals) > 2 and vals[2] is not None:
            mode = vals[2]
            if not isinstance(mode, _Const) or mode.arr.size != 1 or bool(mode.arr.ravel()[0]):
                self._fail(node, "runs in training mode", hint="export in inference mode")
        return vals[0]

    def _op_cast(self, node, vals):
        x = vals[0]
        if isinstance(x, _Act) and _attrs(node).get("to") == onnx.TensorProto.FLOAT:
            return x
        self._fail(node, "casts an activation to a non-float32 type")

    def _op_transpose(self, node, vals):
        x = vals[0]
        perm = list(_attrs(node).get("perm", []))
        if isinstance(x, _Bin):
            perm = perm or list(range(x.latent.ndim))[::-1]
            if sorted(perm) != list(range(x.latent.ndim)):
                self._fail(node, f"perm {_short(perm)} is not a permutation of the "
                           f"{x.latent.ndim} axes of the weight")
            return _Bin(np.transpose(x.latent, perm), np.transpose(x.scale, perm), x.src,
                        None if x.shift is None else np.transpose(x.shift, perm))
        x = self._act(x, node)
        if x.nhwc and perm == [0, 3, 1, 2]:
            m = self._mat(x)
            return _Act(m.layer, m.shape)
        self._fail(node, f"transposes an activation with perm {_short(perm)}",
                   hint="bnnc keeps activations NCHW; only an NHWC network input followed by "
                   "Transpose(perm=[0,3,1,2]) is absorbed")

    # -- layers ----------------------------------------------------------------------------------

    def _weight(self, w, node, x: _Act):
        """-> (W array as stored in ONNX, binary, full scale array or None)."""
        if isinstance(w, _Bin):
            if w.shift is not None and np.any(w.shift != 0):
                self._fail(node, "its binarized weight has a constant offset")
            return w.latent, True, w.scale
        if isinstance(w, _Const):
            arr = w.arr
            if not np.issubdtype(arr.dtype, np.floating):
                self._fail(node, f"weight has type {arr.dtype}")
            binary = bool(arr.size and np.all(np.abs(arr) == 1)) and (
                self.quant_file or self._binary_act(x.layer))
            return arr, binary, None
        self._fail(node, "its weight is not a constant initializer",
                   hint="bnnc trains weights stored as initializers")

    def _binary_act(self, layer: str) -> bool:
        while layer in self.specs:
            spec = self.specs[layer]
            if spec.kind is LayerKind.SIGN:
                return True
            if spec.kind not in (LayerKind.FLATTEN, LayerKind.MAXPOOL):
                return False
            layer = spec.inputs[0]
        return False

    def _out_scale(self, scale, node, out_axis: int) -> np.ndarray | None:
        """A binarized weight's full scale array -> one factor per output channel (or None)."""
        if scale is None or np.all(scale == 1):
            return None
        moved = np.moveaxis(scale, out_axis, 0).reshape(scale.shape[out_axis], -1)
        if np.any(moved != moved[:, :1]):
            self._fail(node, "its binarized weight's scale varies inside an output channel")
        col = moved[:, 0]
        return col[:1] if np.all(col == col[0]) else col

    def _dense(self, node, x, w, *, trans_b=False, alpha=1.0, bias=None):
        x = self._nchw(self._act(x, node), node)
        if len(x.shape) != 1:
            self._fail(node, f"reads an activation of per-sample shape {list(x.shape)}",
                       hint="flatten before MatMul/Gemm")
        W, binary, scale = self._weight(w, node, x)
        if W.ndim != 2:
            self._fail(node, f"weight has shape {list(W.shape)}; expected 2-D")
        if trans_b:
            W = W.T
            scale = None if scale is None else scale.T
        if W.shape[0] != x.shape[0]:
            self._fail(node, f"weight shape {list(W.shape)} does not match the input's "
                       f"{x.shape[0]} features")
        out = W.shape[1]
        sc = self._out_scale(scale, node, 1)
        params = {}
        if binary:
            params["W"] = self._param(W, node, "the weight")
            sc = alpha * (np.ones(1) if sc is None else sc)
        else:
            params["W"] = self._param(np.asarray(W, np.float64) * alpha, node, "the weight")
            if bias is not None:
                params["b"] = self._param(self._bcast(bias, (out,), node, "the bias"), node,
                                          "the bias")
                bias = None
        name = self._add(LayerKind.DENSE, [x.layer], (out,), _label(node),
                         attrs={"binary": binary}, params=params)
        y = _Act(name, (out,))
        return self._layer_affine(y, node, sc, bias)

    def _layer_affine(self, y: _Act, node, scale, bias) -> _Act:
        """A binary layer's weight scale / bias, as a pending affine on its output."""
        if scale is not None and not np.all(scale == 1):
            y = self._affine(y, node, mul=scale, explicit=False)
        if bias is not None:
            b = np.asarray(bias, np.float64).ravel()
            if b.size not in (1, y.shape[0]):
                self._fail(node, f"bias of shape {list(np.shape(bias))} does not match "
                           f"{y.shape[0]} output channels")
            y = self._affine(y, node, add=b, explicit=False)
        return y

    def _op_matmul(self, node, vals):
        return self._dense(node, vals[0], vals[1])

    def _op_gemm(self, node, vals):
        at = _attrs(node)
        if at.get("transA", 0):
            self._fail(node, "transA=1 is not supported", hint="export x @ W with transA=0")
        alpha, beta = float(at.get("alpha", 1.0)), float(at.get("beta", 1.0))
        bias = None
        if len(vals) > 2 and vals[2] is not None:
            bias = np.asarray(self._const(vals[2], node, "the bias C"), np.float64) * beta
            if bias.ndim == 2:
                if bias.shape[0] != 1:
                    self._fail(node, f"bias C of shape {list(bias.shape)} varies over the batch")
                bias = bias[0]
        return self._dense(node, vals[0], vals[1], trans_b=bool(at.get("transB", 0)),
                           alpha=alpha, bias=bias)

    def _op_conv(self, node, vals):
        x = self._nchw(self._act(vals[0], node), node)
        at = _attrs(node)
        if at.get("group", 1) != 1:
            self._fail(node, f"group={at['group']} is not supported",
                       hint="bnnc handles dense convolutions (group 1) only")
        if any(d != 1 for d in at.get("dilations", [1, 1])):
            self._fail(node, f"dilations {_short(at['dilations'])} are not supported")
        if len(x.shape) != 3:
            self._fail(node, f"reads an activation of per-sample shape {list(x.shape)}; "
                       "expected (C, H, W)")
        W, binary, scale = self._weight(vals[1], node, x)
        if W.ndim != 4 or W.shape[1] != x.shape[0]:
            self._fail(node, f"weight shape {list(W.shape)} does not fit input channels "
                       f"{x.shape[0]}", hint="bnnc handles 2-D convolutions, group 1")
        k = W.shape[2:]
        if "kernel_shape" in at and tuple(at["kernel_shape"]) != tuple(k):
            self._fail(node, f"kernel_shape {_short(at['kernel_shape'])} != weight shape "
                       f"{list(k)}")
        strides, pads, hw = self._geometry(node, x.shape[1:], k, pool=False)
        bias = None
        if len(vals) > 2 and vals[2] is not None:
            bias = np.asarray(self._const(vals[2], node, "the bias"), np.float64).ravel()
            if bias.size != W.shape[0]:
                self._fail(node, f"bias of {bias.size} values does not match {W.shape[0]} "
                           f"output channels", hint="ONNX Conv takes one bias per output channel")
        params = {"W": self._param(W, node, "the weight")}
        if bias is not None and not binary:
            params["b"] = self._param(bias, node, "the bias")
            bias = None
        name = self._add(LayerKind.CONV, [x.layer], (W.shape[0], *hw), _label(node),
                         attrs={"binary": binary, "strides": strides, "pads": pads},
                         params=params)
        y = _Act(name, (W.shape[0], *hw))
        return self._layer_affine(y, node, self._out_scale(scale, node, 0), bias)

    def _geometry(self, node, hw, k, *, pool: bool):
        at = _attrs(node)
        strides = tuple(int(s) for s in at.get("strides", [1, 1]))
        auto = str(at.get("auto_pad", "NOTSET"))
        if len(k) != 2 or len(strides) != 2:
            self._fail(node, "only 2-D kernels are supported")
        if min(k) < 1 or min(strides) < 1:
            self._fail(node, f"kernel {_short(k)} / strides {_short(strides)} must be positive",
                       hint="the file does not follow the ONNX operator spec; re-export it")
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            pads = [0, 0, 0, 0]
            for i in range(2):
                out = -(-hw[i] // strides[i])
                total = max((out - 1) * strides[i] + k[i] - hw[i], 0)
                small = total // 2
                pads[i], pads[i + 2] = ((small, total - small) if auto == "SAME_UPPER"
                                        else (total - small, small))
            pads = tuple(pads)
        elif auto == "VALID":
            pads = (0, 0, 0, 0)
        elif auto == "NOTSET":
            pads = tuple(int(p) for p in at.get("pads", [0, 0, 0, 0]))
            if len(pads) != 4 or min(pads) < 0:
                self._fail(node, f"pads {_short(pads)} are not 4 non-negative numbers",
                           hint="bnnc reads 2-D pads (top, left, bottom, right)")
        else:
            self._fail(node, f"auto_pad {printable(auto, 20)} is not supported")
        if pool and any(pads[i] >= k[i % 2] for i in range(4)):
            # a window of padding only has no max / an empty average (onnxruntime refuses it too)
            self._fail(node, f"pads {list(pads)} are not smaller than the kernel {list(k)}")
        out = []
        for i in range(2):
            span = hw[i] + pads[i] + pads[i + 2] - k[i]
            if span < 0:
                self._fail(node, f"kernel {list(k)} is larger than the padded input {list(hw)}")
            o = span // strides[i] + 1
            if pool and at.get("ceil_mode", 0) and span % strides[i]:
                self._fail(node, "ceil_mode=1 changes the output size here",
                           hint="bnnc pools with floor rounding; pad the input instead")
            out.append(o)
        return strides, pads, tuple(out)

    def _pool(self, node, vals, kind):
        x = self._nchw(self._act(vals[0], node), node)
        if len(node.output) > 1 and self.consumers.get(node.output[1]):
            self._fail(node, "its Indices output is used")
        at = _attrs(node)
        if len(x.shape) != 3:
            self._fail(node, f"pools an activation of per-sample shape {list(x.shape)}")
        if any(d != 1 for d in at.get("dilations", [1, 1])):
            self._fail(node, f"dilations {_short(at['dilations'])} are not supported")
        if "kernel_shape" not in at:
            self._fail(node, "has no kernel_shape attribute",
                       hint="the file does not follow the ONNX operator spec; re-export it")
        k = tuple(int(v) for v in at["kernel_shape"])
        strides, pads, hw = self._geometry(node, x.shape[1:], k, pool=True)
        attrs = {"kernel": k, "strides": strides, "pads": pads}
        if kind is LayerKind.AVGPOOL:
            attrs["count_include_pad"] = bool(at.get("count_include_pad", 0))
        name = self._add(kind, [x.layer], (x.shape[0], *hw), _label(node),
                         attrs=attrs)
        return _Act(name, (x.shape[0], *hw))

    def _op_maxpool(self, node, vals):
        return self._pool(node, vals, LayerKind.MAXPOOL)

    def _op_averagepool(self, node, vals):
        return self._pool(node, vals, LayerKind.AVGPOOL)

    def _op_globalaveragepool(self, node, vals):
        x = self._nchw(self._act(vals[0], node), node)
        if len(x.shape) != 3:
            self._fail(node, f"pools an activation of per-sample shape {list(x.shape)}")
        shape = (x.shape[0], 1, 1)
        return _Act(self._add(LayerKind.GLOBAL_AVGPOOL, [x.layer], shape, _label(node)),
                    shape)

    def _op_batchnormalization(self, node, vals):
        a = self._act(vals[0], node)
        at = _attrs(node)
        if at.get("training_mode", 0) or any(self.consumers.get(o) for o in node.output[1:]):
            self._fail(node, "is in training mode", hint="export the model in eval() mode")
        gamma, beta, mean, var = (np.asarray(self._const(v, node, w), np.float64) for v, w in
                                  zip(vals[1:5], ("scale", "B", "input_mean", "input_var")))
        C = a.shape[0]
        if any(p.shape != (C,) for p in (gamma, beta, mean, var)):
            shapes = [list(p.shape) for p in (gamma, beta, mean, var)]
            self._fail(node, f"parameters of shapes {shapes} do not match {C} channels")
        if a.aff is not None and not a.nhwc and np.all(a.aff.scale == 1):
            # a constant bias right before BN shifts the running mean (and cancels in training)
            mean = mean - np.broadcast_to(a.aff.bias, (C,))
            x = _Act(a.layer, a.shape)
        else:
            x = self._nchw(a, node)
        eps = float(np.float32(at.get("epsilon", 1e-5)))
        momentum = float(np.float32(at.get("momentum", 0.9)))
        if not (np.isfinite(eps) and eps >= 0 and 0 <= momentum <= 1):
            self._fail(node, f"epsilon {eps:g} / momentum {momentum:g} out of range",
                       hint="epsilon must be finite and >= 0, momentum in [0, 1]")
        name = self._add(LayerKind.BATCHNORM, [x.layer], x.shape, _label(node),
                         attrs={"eps": eps, "momentum": momentum},
                         params={"gamma": self._param(gamma, node, "scale"),
                                 "beta": self._param(beta, node, "B"),
                                 "mean": self._param(mean, node, "input_mean"),
                                 "var": self._param(var, node, "input_var")})
        if np.any(self.specs[name].params["var"] + eps <= 0):
            self._fail(node, "input_var + epsilon is not positive")
        return _Act(name, x.shape)

    def _op_shape(self, node, vals):
        x = self._act(vals[0], node)
        at = _attrs(node)
        full = np.array([_BATCH, *x.onnx_shape], dtype=np.int64)
        return _Const(full[at.get("start", 0):at.get("end", None)])

    def _op_relu(self, node, vals):
        x = self._nchw(self._act(vals[0], node), node)
        return _Act(self._add(LayerKind.RELU, [x.layer], x.shape, _label(node)), x.shape)

    def _op_softmax(self, node, vals):
        x = self._nchw(self._act(vals[0], node), node)
        axis = _attrs(node).get("axis", -1)
        if len(x.shape) != 1 or axis not in (-1, 1):
            self._fail(node, f"softmax over axis {axis} of shape {['N', *x.shape]}",
                       hint="bnnc supports softmax over the class axis of (N, classes)")
        if node.output[0] != self.output_name:
            self._fail(node, "Softmax is not the last layer",
                       hint="bnnc supports Softmax only as the network output")
        return _Act(self._add(LayerKind.SOFTMAX, [x.layer], x.shape, _label(node)),
                    x.shape)

    def _flatten(self, node, x: _Act) -> _Act:
        x = self._nchw(x, node)
        if len(x.shape) == 1:
            return x
        shape = (int(np.prod(x.shape)),)
        return _Act(self._add(LayerKind.FLATTEN, [x.layer], shape, _label(node)),
                    shape)

    def _op_flatten(self, node, vals):
        x = self._act(vals[0], node)
        axis = _attrs(node).get("axis", 1)
        if axis % (len(x.shape) + 1) != 1:
            self._fail(node, f"flattens from axis {axis}", hint="bnnc flattens from axis 1")
        return self._flatten(node, x)

    def _op_reshape(self, node, vals):
        x = vals[0]
        if isinstance(x, _Bin):
            tgt = self._int_list(vals[1], node, "the shape")
            try:
                return _Bin(_np_reshape(node, x.latent, tgt), _np_reshape(node, x.scale, tgt),
                            x.src, None if x.shift is None else _np_reshape(node, x.shift, tgt))
            except (ValueError, IndexError) as e:
                self._fail(node, f"cannot reshape the weight of shape {list(x.latent.shape)} to "
                           f"{_short(tgt)} ({printable(e, 100)})")
        x = self._act(x, node)
        tgt = self._int_list(vals[1], node, "the target shape")
        per = x.onnx_shape
        total = int(np.prod(per))
        batch_dims = (1, 0, -1, _BATCH, self._file_batch())
        if len(tgt) == 2 and tgt[0] in batch_dims and (tgt[1] in (-1, total)) \
                and not (tgt[0] == -1 and tgt[1] == -1):
            return self._flatten(node, x)
        if len(tgt) == len(per) + 1 and tgt[0] in batch_dims and tgt.count(-1) <= 1 and \
                all(d in (s, 0, -1) for d, s in zip(tgt[1:], per)):
            return x      # keeps the per-sample shape
        self._fail(node, f"reshapes per-sample shape {list(per)} to {_short(tgt)}, which is not a "
                   "flatten", hint="bnnc supports Reshape only as flatten ([N,-1]) or identity")

    def _file_batch(self) -> int:
        for vi in self.g.input:
            if vi.name == self.input_name:
                d = vi.type.tensor_type.shape.dim[0]
                return d.dim_value if d.HasField("dim_value") else 1
        return 1


class _Named:
    """Stands in for a NodeProto in messages about composed chains."""

    def __init__(self, name: str, output: str = ""):
        self.name, self.op_type, self.output, self.input = name, "chain", [output or name], []


# ---------------------------------------------------------------------------------------------


def load_model(path: str | os.PathLike | onnx.ModelProto, *, name: str | None = None) -> ir.Graph:
    """Read an ONNX/QONNX file (or an in-memory ModelProto) and map it to the layer IR.

    `name` (a C identifier) defaults to the sanitized file stem (a ModelProto: its graph name).
    Raises ModelError / UnsupportedModelError (naming the node) for anything bnnc cannot train.
    """
    if isinstance(path, onnx.ModelProto):
        model = path
        data = model.SerializeToString(deterministic=True)
        label = f"model '{printable(model.graph.name or 'model')}'"
        default = sanitize_name(_text(model.graph.name) or "model")
    else:
        p = Path(path)
        label = p.name
        try:
            data = p.read_bytes()
        except OSError as e:
            raise ModelError(f"cannot read model file {p}: {e.strerror or e}") from None
        try:
            model = onnx.load_model_from_string(data)
        except Exception as e:  # protobuf raises DecodeError and friends; all mean "not ONNX"
            raise ModelError(f"{p}: not a readable ONNX model ({type(e).__name__}: "
                             f"{printable(e, 200)})",
                             hint="the file is truncated or not an .onnx file") from None
        if not model.HasField("graph") or not model.graph.node:
            raise ModelError(f"{p}: not an ONNX model (no graph nodes)",
                             hint="the file is truncated or not an .onnx file")
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
            try:
                onnx.load_external_data_for_model(model, str(p.parent))
            except Exception as e:
                raise ModelError(f"{p}: cannot load external tensor data ({printable(e, 200)})",
                                 hint="keep the .data file next to the .onnx file") from None
        default = sanitize_name(p.stem)
    gname = default if name is None else name
    if not re.match(r"^[a-z][a-z0-9_]*$", gname):
        raise ConfigError(f"model name {gname!r} is not a C identifier [a-z][a-z0-9_]*",
                          hint=f"try --name {sanitize_name(gname)}")
    sha = hashlib.sha256(data).hexdigest()
    imp = _Importer(model, gname, sha, label)
    try:
        return imp.run()
    except BnncError:
        raise
    except Exception as e:
        # every rejection above is deliberate; anything else is a bug, reported without a
        # traceback but marked as one (the fuzzer counts these as crashes)
        where = f" at {_where(imp.current)}" if imp.current is not None else ""
        raise ModelError(f"{label}: internal error while importing{where} "
                         f"({type(e).__name__}: {printable(e, 200)}); {INTERNAL_ERROR}",
                         hint="please report it with the model file") from e
