"""The types of the op registry: what one op family declares for every stage of the pipeline.

An op family (`compiler/ops/<family>.py`) owns some IR layer kinds and some ONNX op types, and
exports one `OpFamily` record, `FAMILY`, that carries everything each stage needs to know about it:

| field | stage that reads it | signature |
|---|---|---|
| `layers` | ir verification, frontend naming | `LayerSpec` per owned `LayerKind` |
| `onnx` | frontend (`compiler/frontend.py`) | `handler(importer, node, vals) -> None` |
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

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Mapping

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
    function instance and its argument expressions (codegen)."""
    name: str
    phase: Phase
    family: KernelFamily
    description: str
    inputs: tuple[Operand, ...]
    outputs: tuple[Operand, ...]
    inplace: tuple[tuple[int, int], ...] = ()
    lower: Callable[..., Any] | None = field(default=None, compare=False, repr=False)


def operands(*specs) -> tuple[Operand, ...]:
    """`("x", F32)`, `("w", WEIGHTS)`, `("b?", STATE)` (trailing `?` = optional) -> Operands."""
    out = []
    for name, dt in specs:
        dts = dt if isinstance(dt, tuple) else (dt,)
        out.append(Operand(name.rstrip("?"), dts, name.endswith("?")))
    return tuple(out)


def kernel(name: str, phase: Phase, family: KernelFamily, description: str, inputs, outputs,
           inplace=(), *, lower=None) -> KernelSpec:
    return KernelSpec(name, phase, family, description, operands(*inputs), operands(*outputs),
                      tuple(inplace), lower)


@dataclass(frozen=True)
class LayerSpec:
    """What an IR layer of this kind must carry (checked by `ops.check_graph`), and the prefix the
    frontend names its layers with (`fc1`, `conv2`, ...)."""
    kind: LayerKind
    prefix: str
    attrs: tuple[str, ...] = ()            # required attrs
    params: tuple[str, ...] = ()           # required params
    optional_params: tuple[str, ...] = ()
    arity: int = 1                         # number of layer inputs


@dataclass(frozen=True)
class OpFamily:
    name: str
    doc: str
    layers: tuple[LayerSpec, ...] = ()
    onnx: Mapping[str, Callable[..., Any]] = field(default_factory=dict)
    kernels: tuple[KernelSpec, ...] = ()
    forward: Mapping[LayerKind, Callable[..., Any]] = field(default_factory=dict)
    backward: Mapping[LayerKind, Callable[..., Any]] = field(default_factory=dict)
    reference_forward: Mapping[LayerKind, Callable[..., Any]] = field(default_factory=dict)
    reference_backward: Mapping[LayerKind, Callable[..., Any]] = field(default_factory=dict)
    reference_update: Mapping[str, Callable[..., Any]] = field(default_factory=dict)
    export: Mapping[LayerKind, Callable[..., Any]] = field(default_factory=dict)
