"""The training-step IR: one step of training as a linear list of kernel calls over typed tensors.

`compiler.schedule.build_schedule(graph, cfg)` produces a `Schedule`; liveness, the planner and codegen
read nothing else. Every tensor has a dtype, a full shape (batch included), a role, and its exact storage
size in bytes (`nbytes`, decided by the schedule because bit-packing pads rows to whole words).

Invariants (`Schedule.verify()`):
- every step input is a persistent tensor, the network input/labels, or written by an earlier step;
- every non-persistent tensor is written before it is read, and written by exactly one step
  (in-place outputs are separate tensors that a kernel may place over a dead input; see Step.inplace);
- a view (`alias_of`) has the same nbytes as its base and is never written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Mapping

from .config import TrainConfig

if TYPE_CHECKING:
    from .ops.base import KernelSpec, Phase


class DType(Enum):
    F32 = "f32"
    F16 = "f16"
    BF16 = "bf16"
    BIT = "bit"     # bit-packed +-1 values or 0/1 masks
    PO2 = "po2"     # 5-bit sign + exponent codes with a per-tensor integer bias
    U8 = "u8"
    I32 = "i32"


class Role(Enum):
    PARAM = "parameter"
    FROZEN = "frozen parameter"    # partial training: read only, never updated (cfg.frozen)
    OPT_STATE = "optimizer state"
    BN_STAT = "bn state"
    INPUT = "input"
    LABEL = "label"
    SAVED = "saved activation"     # written in forward, read in backward
    GRAD = "gradient"
    SCRATCH = "scratch"            # forward temporaries, loss, probabilities

    @property
    def persistent(self) -> bool:
        return self in (Role.PARAM, Role.OPT_STATE, Role.BN_STAT, Role.FROZEN)


@dataclass(frozen=True)
class Tensor:
    name: str                        # "fc1.dW" -- see ir.tname; unique in the schedule
    dtype: DType
    shape: tuple[int, ...]           # full shape, batch first for activations
    role: Role
    nbytes: int                      # exact storage bytes (packing padding included)
    layout: str = ""                 # e.g. "rows=100 words64=4" for packed bits; free text for the C side
    alias_of: str | None = None      # a view (flatten/reshape) of another tensor: no storage of its own

    @property
    def size(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Step:
    index: int
    kernel: KernelSpec               # an entry of the kernel registry (compiler.ops.KERNELS)
    layer: str                       # IR layer this step belongs to ("" for loss/global steps)
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: Mapping[str, Any] = field(default_factory=dict)
    # (output, input) pairs this kernel may write over (same offset) when the input dies here;
    # declared by the kernel registry, never guessed by the planner
    inplace: tuple[tuple[str, str], ...] = ()

    @property
    def phase(self) -> Phase:
        """Where the step sits in the training step: its kernel's phase."""
        return self.kernel.phase


@dataclass(frozen=True)
class Schedule:
    graph_name: str
    config: TrainConfig
    tensors: Mapping[str, Tensor]    # insertion order = creation order (deterministic)
    steps: tuple[Step, ...]

    def producer(self, name: str) -> Step | None:
        for s in self.steps:
            if name in s.outputs:
                return s
        return None

    def consumers(self, name: str) -> list[Step]:
        return [s for s in self.steps if name in s.inputs]

    def verify(self) -> None:
        written: set[str] = set()
        for i, s in enumerate(self.steps):
            assert s.index == i, f"step {i} ({s.kernel}) has index {s.index}"
            for t in s.inputs + s.outputs:
                assert t in self.tensors, f"step {i} ({s.kernel}) uses unknown tensor {t}"
            for t in s.inputs:
                base = self.tensors[t].alias_of or t
                ok = self.tensors[base].role.persistent or self.tensors[base].role in (Role.INPUT, Role.LABEL)
                assert ok or base in written, f"step {i} ({s.kernel}) reads {t} before it is written"
            for t in s.outputs:
                tt = self.tensors[t]
                assert tt.alias_of is None, f"step {i} writes view {t}"
                if not tt.role.persistent:
                    assert t not in written, f"{t} written twice (step {i})"
                written.add(t)
            for out, inp in s.inplace:
                assert out in s.outputs and inp in s.inputs, f"step {i}: bad inplace pair {out}<-{inp}"
        for t in self.tensors.values():
            if t.alias_of is not None:
                base = self.tensors[t.alias_of]
                assert base.alias_of is None and base.nbytes == t.nbytes, f"bad view {t.name}"
            assert t.nbytes > 0, f"{t.name} has no bytes"
