"""The frontend's vocabulary: the abstract values an ONNX tensor has while the importer
(`compiler/frontend.py`) interprets a graph, the layer under construction, and the helpers every
ONNX handler (`compiler/ops/<family>.py`, ONNX import section) uses to read nodes and name them
in messages.

Values: `Const` (a folded constant), `Bin` (a binarized constant: weights), `Act` (a layer output,
maybe with a pending per-channel affine `Aff`), and the two STE markers `Cmp` (`x >= 0` / `x < 0`)
and `SteRes` (`B(x) - x`); an `Act`'s layout marks (`nhwc`, `view`, `perm`) are read by
compiler/onnx_layout.py. ONNX names enter messages only through `printable` (escaped, cut), so
every message is one line; helpers that do not know the file raise `NodeError`, which the
importer turns into a ModelError naming the file and the node.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import ModelError
from .ir import LayerKind

BATCH = -987654321           # stands for the batch dim in folded Shape() values; never a legal dim
# an initializer beyond 2^27 elements (512 MiB as float32) is no edge model's
_MAX_CONST_ELEMENTS = 2**27
MAX_RANK = 8
_NUMERIC = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16,
            TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64,
            TensorProto.UINT8, TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64,
            TensorProto.BOOL}


# ---------------------------------------------------------------------------------------------
# abstract values

@dataclass(eq=False)
class Const:
    arr: np.ndarray


@dataclass(eq=False)
class Bin:
    """scale * sign(latent) + shift, a binarized constant (weights). scale/shift are full-shaped."""
    latent: np.ndarray
    scale: np.ndarray
    src: str                              # ONNX tensor holding the latent values (STE idiom)
    shift: np.ndarray | None = None


@dataclass(eq=False)
class Aff:
    """A pending per-channel affine y = x*scale + bias (float64 [C] or [1]) on an activation."""
    scale: np.ndarray
    bias: np.ndarray
    nodes: list[str]
    pc_mul: bool = False                  # some Mul/Div had a per-channel constant
    add: bool = False                     # some Add/Sub had a constant


@dataclass(eq=False)
class Act:
    layer: str                            # INPUT or a bnnc layer name
    shape: tuple[int, ...]                # per sample, NCHW
    nhwc: bool = False                    # ONNX holds this tensor as (H, W, C)
    aff: Aff | None = None
    src: str | None = None                # for a SIGN output: the ONNX tensor it binarized
    mat: "Act | None" = None             # cache of the materialized pending affine
    # ONNX's per-sample shape when it is `shape` with size-1 axes inserted or removed (Unsqueeze,
    # Squeeze, Reshape): the same bytes in the same order
    view: tuple[int, ...] | None = None
    # 1-D only: ONNX's element j is bnnc's element perm[j] (an NHWC map flattened in (H, W, C)
    # order, kept as bnnc's NCHW flatten; its readers reorder their per-feature constants)
    perm: np.ndarray | None = None

    @property
    def onnx_shape(self) -> tuple[int, ...]:
        if self.view is not None:
            return self.view
        if self.nhwc:
            c, h, w = self.shape
            return (h, w, c)
        return self.shape


@dataclass(eq=False)
class Cmp:
    """`x >= 0` (op 'ge') or `x < 0` (op 'lt'), kept symbolic for the Where binarizer idiom."""
    x: Any
    src: str
    op: str

    def value(self) -> np.ndarray:
        a = self.x.arr
        return a >= 0 if self.op == "ge" else a < 0


@dataclass(eq=False)
class SteRes:
    """`B(x) - x` for a binarizer output B(x): the detach trick adds x back."""
    s: Any
    src: str


@dataclass
class Spec:
    """A layer under construction (ir.Layer is frozen; folds edit b / mean in place)."""
    name: str
    kind: LayerKind
    inputs: tuple[str, ...]
    shape: tuple[int, ...]
    attrs: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    onnx_name: str = ""


class Named:
    """Stands in for a NodeProto in messages about composed chains."""

    def __init__(self, name: str, output: str = ""):
        self.name, self.op_type, self.output, self.input = name, "chain", [output or name], []


# ---------------------------------------------------------------------------------------------
# reading nodes, naming them in messages

def proto_text(v) -> str:
    """A protobuf string field as str: fields that are not valid UTF-8 come back as bytes."""
    return v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v)


def printable(name: str, limit: int = 80) -> str:
    """An ONNX name as it may appear in a one-line message: control and other unprintable
    characters escaped (a name may hold newlines, NUL, terminal escapes), long names cut."""
    s = "".join(c if c.isprintable() else repr(c)[1:-1] for c in proto_text(name))
    return s if len(s) <= limit else f"{s[:limit - 3]}..."


def short(arr) -> str:
    """An array's values for a message, elided past a few entries."""
    a = np.asarray(arr).ravel()
    vals = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in a[:6].tolist())
    return f"[{vals}{', ...' if a.size > 6 else ''}]"


def node_where(node: onnx.NodeProto) -> str:
    op = printable(node.op_type, 40)
    if node.name:
        return f"node '{printable(node.name)}' ({op})"
    out = printable(node.output[0]) if node.output else "?"
    return f"node <unnamed, output '{out}'> ({op})"


class NodeError(Exception):
    """Raised by module-level helpers that do not know the file; `_Importer.run` adds it."""

    def __init__(self, node, why: str, hint: str | None = None,
                 cls: type[ModelError] = ModelError):
        super().__init__(why)
        self.node, self.why, self.hint, self.cls = node, why, hint, cls


def node_label(node) -> str:
    """What Layer.onnx_name records: the node name, or its output tensor for unnamed nodes."""
    return proto_text(node.name or (node.output[0] if node.output else node.op_type))


_A = onnx.AttributeProto
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


def node_attrs(node: onnx.NodeProto) -> dict[str, Any]:
    out = {}
    for a in node.attribute:
        want = _ATTR_TYPES.get(a.name)
        if want is not None and a.type != want:
            raise NodeError(node, f"attribute '{printable(a.name)}' has type "
                             f"{_type_name(a.type)}, expected {_type_name(want)}",
                             hint="the file does not follow the ONNX operator spec; re-export it")
        try:
            v = helper.get_attribute_value(a)
        except Exception as e:  # an attribute with no value of its declared type
            raise NodeError(node, f"attribute '{printable(a.name)}' cannot be read "
                             f"({printable(e, 200)})") from None
        out[a.name] = v.decode(errors="replace") if isinstance(v, bytes) else v
    return out


def dtype_name(t: int) -> str:
    return TensorProto.DataType.Name(t) if t in TensorProto.DataType.values() else str(t)


def tensor_array(t: TensorProto) -> np.ndarray:
    """A TensorProto's value; ValueError (the reason) for a type, shape or payload bnnc refuses,
    decided from the header before any array of the declared size exists."""
    if t.data_type not in _NUMERIC:
        raise ValueError(f"has type {dtype_name(t.data_type)}; bnnc reads numeric tensors only")
    if t.data_location == TensorProto.EXTERNAL:
        raise ValueError("keeps its data in an external file that was not loaded")
    dims = list(t.dims)
    if len(dims) > MAX_RANK or any(d < 0 for d in dims):
        raise ValueError(f"has dims {short(dims)}: negative or more than {MAX_RANK} of them")
    n = math.prod(dims)
    if n > _MAX_CONST_ELEMENTS:
        raise ValueError(f"has {n:,} elements (dims {short(dims)}); bnnc reads constants of up "
                         f"to {_MAX_CONST_ELEMENTS:,} elements")
    try:
        arr = numpy_helper.to_array(t)
    except Exception as e:  # payload length or encoding does not match the header
        raise ValueError(f"has dims {short(dims)} but its data does not match them "
                         f"({type(e).__name__})") from None
    if arr.shape != tuple(dims):
        raise ValueError(f"has dims {short(dims)} but decodes to shape {list(arr.shape)}")
    return arr


def sanitize_name(text: str) -> str:
    """A C identifier `[a-z][a-z0-9_]*` from a file stem.

    >>> sanitize_name("TFC-1w1a.v2"), sanitize_name("9lives")
    ('tfc_1w1a_v2', 'model_9lives')
    """
    s = re.sub(r"[^a-z0-9_]", "_", text.lower()).strip("_") or "model"
    s = re.sub(r"_+", "_", s)
    return s if s[0].isalpha() else f"model_{s}"
