"""The types of the op registry: what one op family declares for every stage of the pipeline.

An op family (`compiler/ops/<family>.py`) owns some IR layer kinds and some ONNX op types, and
exports one `OpFamily` record, `FAMILY`, that carries everything each stage needs to know about it:

| field | stage that reads it | signature |
|---|---|---|
| `layers` | graph check, frontend naming, schedule analysis | `LayerSpec` per owned `LayerKind` |
| `onnx` | frontend (`compiler/frontend.py`) | `OnnxOp(handle(importer, node, vals), arity)` |
| `forward`, `backward` | training schedule (`compiler/schedule.py`) | `rule(builder, layer) -> None` |
| `kernels` | schedule (dtype/in-place contract), codegen (template + lowering) | `KernelSpec` |
| `reference_forward` | numpy reference, inference, benchmarks' float model | `fn(run, layer, *xs) -> y` |
| `reference_backward` | numpy reference | `fn(run, layer, d_out, need) -> [d_in, ...]` |
| `reference_update` | numpy reference (optimizer families) | `fn(cfg, t, w, g, moments) -> (w, moments)` |
| `export` | ONNX/QONNX export (`compiler/export.py`) | `fn(emitter, layer, xs, out) -> None` |

`compiler/ops/__init__.py` collects the families into the registry; every table a stage used to keep
by hand (`KERNELS`, the ONNX dispatch, the schedule's forward/backward tables, the reference's
tables, export's table) is a view of it, and `check_registry()` proves the registry complete.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Mapping

import numpy as np

from ..ir import LayerKind
from ..schedule_ir import DType

F32, F16, BF16, BIT = DType.F32, DType.F16, DType.BF16, DType.BIT
PO2, U8, I32 = DType.PO2, DType.U8, DType.I32
STATE = (F32, BF16, F16)            # real-valued trainable / optimizer / BN-statistic storage
WEIGHTS = STATE + (BIT,)            # + Bop's packed binary weights
GRADS = (F32, F16)                  # activation-gradient path
SAVED_X = (F32, F16, BIT)           # a weight layer's input as kept for its dW
ACT = (F32, BIT)                    # activations that may be packed (sign outputs and their pools)


class Phase(Enum):
    """Where a kernel call sits in one training step."""
    FORWARD = "forward"
    LOSS = "loss"
    BACKWARD = "backward"
    UPDATE = "update"


class KernelFamily(Enum):
    """The template file a kernel's C lives in: `templates/kernels/<value>.c.j2`."""
    DENSE = "dense"
    CONV = "conv"
    BN = "bn"
    ACT = "act"
    POOL = "pool"
    LOSS = "loss"
    PO2 = "po2"
    OPTIM = "optim"
    GCONV = "gconv"

    @property
    def template(self) -> str:
        return f"kernels/{self.value}.c.j2"


@dataclass(frozen=True)
class Operand:
    name: str
    dtypes: tuple[DType, ...]
    optional: bool = False


@dataclass(frozen=True)
class KernelSpec:
    """One kernel: a C function per operand-dtype specialization.

    `inplace` pairs `(output index, input index)` are declared here, never guessed downstream (see
    `compiler/ops/__init__.py`). `lower(step, ctx) -> Call` turns a scheduled call into the C
    function instance and its argument expressions (codegen, `compiler/lower.py`);
    `lower_infer(step, ctx) -> Call`, where given, is the call the inference entry (predict) makes
    instead of the training step's (BN with running statistics). `pm1_out`: output 0 holds only
    +-1.0 (sign); `pm1_keep`: it does when input 0 does (max pool) -- a layer reading such an f32
    tensor may multiply by XNOR-popcount. For `bnnc check`'s tolerance (runtime/check.py):
    `magnitude(step, name, mag) -> array | None` is, for a float32 reduction, the sum of |terms|
    behind each element of output `name` (`mag.value(t)`: |t| as float64 in t's shape,
    `mag.weight(t)`: |W|, ones for a binary layer) -- the scale its rounding is relative to when
    terms cancel; `sums_stored`: the output adds 16-bit stored terms (one ulp of each is slack)."""
    name: str
    phase: Phase
    family: KernelFamily
    description: str
    inputs: tuple[Operand, ...]
    outputs: tuple[Operand, ...]
    inplace: tuple[tuple[int, int], ...] = ()
    lower: Callable[..., Any] | None = field(default=None, compare=False, repr=False)
    lower_infer: Callable[..., Any] | None = field(default=None, compare=False, repr=False)
    pm1_out: bool = False
    pm1_keep: bool = False
    magnitude: Callable[..., Any] | None = field(default=None, compare=False, repr=False)
    sums_stored: bool = False

    def __str__(self) -> str:
        return self.name

    def __reduce__(self):
        # a spec is one registry entry: pickled (and copied) by name
        return (_registered, (self.name,))


_DEFINED: dict[str, KernelSpec] = {}     # every spec `kernel()` made, by name (unpickling)


def _registered(name: str) -> KernelSpec:
    return _DEFINED[name]


def operands(*specs) -> tuple[Operand, ...]:
    """`("x", F32)`, `("w", WEIGHTS)`, `("b?", STATE)` (trailing `?` = optional) -> Operands."""
    out = []
    for name, dt in specs:
        dts = dt if isinstance(dt, tuple) else (dt,)
        out.append(Operand(name.rstrip("?"), dts, name.endswith("?")))
    return tuple(out)


def kernel(name: str, phase: Phase, family: KernelFamily, description: str, inputs, outputs,
           inplace=(), *, lower=None, lower_infer=None, pm1_out: bool = False,
           pm1_keep: bool = False, magnitude=None, sums_stored: bool = False) -> KernelSpec:
    spec = KernelSpec(name, phase, family, description, operands(*inputs), operands(*outputs),
                      tuple(inplace), lower, lower_infer, pm1_out, pm1_keep, magnitude,
                      sums_stored)
    assert name not in _DEFINED, f"kernel {name} is defined twice"
    _DEFINED[name] = spec
    return spec


def _arity(ops: tuple[Operand, ...]) -> tuple[int, int]:
    return sum(not o.optional for o in ops), len(ops)


def check_kernel(k: KernelSpec) -> None:
    """Raise AssertionError if a spec breaks the registry's invariants (a bnnc bug): optional
    operands only trail the required ones, in-place pairs name existing operands, a C lowering."""
    assert isinstance(k.phase, Phase) and isinstance(k.family, KernelFamily), k.name
    assert callable(k.lower), f"{k.name}: no C lowering"
    for ops in (k.inputs, k.outputs):
        opt = [o.optional for o in ops]
        assert opt == sorted(opt), f"{k.name}: optional operands must trail"
    for oi, ii in k.inplace:
        assert 0 <= oi < len(k.outputs) and 0 <= ii < len(k.inputs), f"{k.name}: {oi, ii}"


def check_step(spec: KernelSpec, in_dtypes: tuple[DType, ...],
               out_dtypes: tuple[DType, ...]) -> None:
    """Raise AssertionError if a call of `spec` with these operand dtypes breaks its contract."""
    for what, ops, dts in (("input", spec.inputs, in_dtypes), ("output", spec.outputs, out_dtypes)):
        lo, hi = _arity(ops)
        assert lo <= len(dts) <= hi, f"{spec.name}: {len(dts)} {what}s, expected {lo}..{hi}"
        for op, dt in zip(ops, dts):
            assert dt in op.dtypes, f"{spec.name}: {what} {op.name} is {dt.value}, expected " \
                                    f"{'/'.join(d.value for d in op.dtypes)}"


class Bits(Enum):
    """How a layer kind takes part in bit-packed activations (schedule `save_bits`)."""
    NONE = "none"        # reads and writes f32 only
    MAKE = "make"        # its f32 output may be stored packed (sign: +-1 values)
    READ = "read"        # a binary layer of this kind reads packed input (XNOR-popcount)
    PASS = "pass"        # packed input -> a packed output of its own shape (max pool)
    VIEW = "view"        # a view of its input: packed when the input is, in the input's layout


# ---- shape helpers the families share ---------------------------------------------------------

def prod(shape) -> int:
    return math.prod(int(d) for d in shape)     # exact: np.prod wraps around past 2^63


def pair(v) -> tuple[int, int]:
    if isinstance(v, (int, np.integer)):
        return int(v), int(v)
    t = tuple(int(x) for x in v)
    return (t[0], t[0]) if len(t) == 1 else (t[0], t[1])


def pads4(v) -> tuple[int, int, int, int]:
    if isinstance(v, (int, np.integer)):
        return (int(v),) * 4
    t = tuple(int(x) for x in v)
    return t if len(t) == 4 else (t[0], t[1], t[0], t[1])


def out_hw(chw, khw, strides, pads) -> tuple[int, int]:
    """(OH, OW) of a window op over (C, H, W) with kernel khw, strides and pads (t, l, b, r)."""
    (kh, kw), (sh, sw), (t, l, b, r) = pair(khw), pair(strides), pads4(pads)
    return (chw[1] + t + b - kh) // sh + 1, (chw[2] + l + r - kw) // sw + 1


def elementwise_shapes(lay, ins) -> str | None:
    """`check_shapes` of a layer whose output has its input's shape."""
    return None if ins[0] == lay.shape else \
        f"input {ins[0]} -> output {lay.shape} for an element-wise layer"


def same_size_shapes(lay, ins) -> str | None:
    """`check_shapes` of a layer that only reshapes (as many elements out as in)."""
    return None if prod(ins[0]) == prod(lay.shape) else \
        f"{ins[0]} -> {lay.shape} changes the element count"


@dataclass(frozen=True)
class LayerSpec:
    """What an IR layer of this kind must carry (checked by `ops.check_graph`), the prefix the
    frontend names its layers with (`fc1`, `conv2`, ...), and what the training schedule needs to
    know about the kind beyond its rules:

    - `check_shapes(layer, input_shapes) -> str | None`: what is inconsistent about the layer's
      shapes (None: nothing), checked before anything is scheduled;
    - `trainable`: the layer has parameters the optimizer updates (it needs a gradient);
    - `bits`: how the kind takes part in bit-packed activations (`Bits`);
    - `stops_gradient`: no gradient flows through the layer (the input quantizer);
    - `loss`: the layer is fused into the loss (softmax; last layer only, no rule of its own
      beyond a no-op forward);
    - `output`: the layer may end a graph;
    - `packed_weights(builder, layer) -> (nbytes, layout)`: storage of the layer's weights as
      packed sign bits (Bop's latent-free weights, the XNOR kernels' scratch)."""
    kind: LayerKind
    prefix: str
    attrs: tuple[str, ...] = ()            # required attrs
    params: tuple[str, ...] = ()           # required params
    optional_params: tuple[str, ...] = ()
    arity: int = 1                         # number of layer inputs
    check_shapes: Callable[..., str | None] | None = field(default=None, compare=False)
    trainable: bool = False
    bits: Bits = Bits.NONE
    stops_gradient: bool = False
    loss: bool = False
    output: bool = False
    packed_weights: Callable[..., tuple[int, str]] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class OnnxOp:
    """How the frontend imports one ONNX op type: `handle(importer, node, vals) -> value` (the
    abstract value of the node's first output, `compiler/onnx_values.py`) and the number of inputs
    the ONNX spec allows (checked before the handler runs; optional inputs may be "" in between)."""
    handle: Callable[..., Any]
    arity: tuple[int, int]


@dataclass(frozen=True)
class OpFamily:
    name: str
    doc: str
    layers: tuple[LayerSpec, ...] = ()
    onnx: Mapping[str, OnnxOp] = field(default_factory=dict)
    kernels: tuple[KernelSpec, ...] = ()
    forward: Mapping[LayerKind, Callable[..., Any]] = field(default_factory=dict)
    backward: Mapping[LayerKind, Callable[..., Any]] = field(default_factory=dict)
    reference_forward: Mapping[LayerKind, Callable[..., Any]] = field(default_factory=dict)
    reference_backward: Mapping[LayerKind, Callable[..., Any]] = field(default_factory=dict)
    reference_update: Mapping[str, Callable[..., Any]] = field(default_factory=dict)
    export: Mapping[LayerKind, Callable[..., Any]] = field(default_factory=dict)
