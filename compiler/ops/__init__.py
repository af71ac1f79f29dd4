"""The op registry: one module per op family, each exporting one `OpFamily` record (`base.py`).

Every per-op table of the pipeline is a view derived here from `FAMILIES`; nothing else keeps a
table keyed by layer kind, ONNX op type or kernel name. Adding an op = adding (or extending) one
family module and listing it in `FAMILIES` (compiler/README.md walks through an example).

Kernels (`KERNELS: dict[str, KernelSpec]`) are read by the schedule (which kernel to call, which
dtypes are legal, which outputs may overwrite which inputs) and by codegen (a kernel's template
family and its lowering; a kernel is the granularity of one C function, specialized per operand
dtype where one admits more). Invariants (checked by `check_registry()` at import and by
`check_step()` for every scheduled step):
- operands are positional; optional operands only trail the required ones, so a step lists its
  required operands first and may omit any suffix of the optional ones;
- `inplace` pairs `(output index, input index)` are DECLARED per kernel, never guessed
  downstream: a pair means the kernel streams element-wise (or row-wise after per-channel reductions
  that finish before the first write) in ascending element order, and the output has as many
  elements as the input with an element size no larger than the input's. Writing output element i
  then never clobbers an input element still to be read, so the output may start at the input's
  address when the input dies at that step (the liveness pass decides that).

Operand dtype conventions (compiler/schedule.py documents the storage layouts):
- activations are F32; the activation-gradient path is F32 or F16 (`GRADS`); PO2 codes are one u8
  per element with an I32 per-tensor bias; BIT tensors are packed into 64-bit words;
- weights are stored in the state dtype (`STATE`: F32/BF16/F16), or as BIT for Bop's latent-free
  binary weights (`WEIGHTS`);
- every kernel accumulates in float32 (or exactly in integers for XNOR-popcount and PO2 sums).
"""

from __future__ import annotations

import numpy as np

from ..config import TrainConfig, trained_fields
from ..ir import INPUT, WEIGHT_KINDS, Graph, LayerKind
from . import (activation, batchnorm, conv, conv_bn_sign, dense, gconv, loss, optim, pool,
               structural)
from .base import Bits, KernelSpec, LayerSpec, OpFamily, check_kernel, check_step  # noqa: F401

FAMILIES: tuple[OpFamily, ...] = tuple(m.FAMILY for m in (
    dense, conv, gconv, batchnorm, conv_bn_sign, activation, pool, structural, loss, optim))


def _merge(field: str) -> dict:
    out: dict = {}
    for fam in FAMILIES:
        for key, value in getattr(fam, field).items():
            assert key not in out, f"{field}: {key} is owned by two op families"
            out[key] = value
    return out


KERNELS: dict[str, KernelSpec] = {k.name: k for fam in FAMILIES for k in fam.kernels}
LAYERS: dict[LayerKind, LayerSpec] = {s.kind: s for fam in FAMILIES for s in fam.layers}
ONNX_HANDLERS = _merge("onnx")
SCHEDULE_FORWARD = _merge("forward")
SCHEDULE_BACKWARD = _merge("backward")
REFERENCE_FORWARD = _merge("reference_forward")
REFERENCE_BACKWARD = _merge("reference_backward")
REFERENCE_UPDATE = _merge("reference_update")
EXPORT = _merge("export")


def check_registry() -> None:
    """Raise AssertionError if the registry is incomplete or inconsistent (a bnnc bug): every
    layer kind has exactly one LayerSpec and a schedule forward rule, a backward rule exactly
    where a gradient flows through it (not the input quantizer, not the loss-fused softmax);
    every ONNX op type has one handler; kernel names are unique and every kernel is well formed
    (a C lowering, in-place indices in range, optional operands trailing)."""
    specs = [s for fam in FAMILIES for s in fam.layers]
    assert len(LAYERS) == len(specs), "a layer kind has two LayerSpecs"
    assert set(LAYERS) == set(LayerKind), f"no LayerSpec for {set(LayerKind) - set(LAYERS)}"
    assert set(SCHEDULE_FORWARD) == set(LayerKind), \
        f"no schedule forward rule for {set(LayerKind) - set(SCHEDULE_FORWARD)}"
    for kind, spec in LAYERS.items():
        has_grad = not (spec.stops_gradient or spec.loss)
        assert (kind in SCHEDULE_BACKWARD) == has_grad, f"{kind}: backward rule iff a gradient"
        assert not spec.trainable or has_grad, kind
        assert spec.bits is not Bits.READ or spec.packed_weights is not None, kind
        # ir.WEIGHT_KINDS (read where the registry cannot be imported) agrees with the specs
        assert (kind in WEIGHT_KINDS) == ("W" in spec.params), f"{kind}: WEIGHT_KINDS"
    owners = [op for fam in FAMILIES for op in fam.onnx]
    assert len(owners) == len(ONNX_HANDLERS), "an ONNX op type has two handlers"
    kernels = [k for fam in FAMILIES for k in fam.kernels]
    assert len(KERNELS) == len(kernels), "a kernel name is declared twice"
    for k in kernels:
        check_kernel(k)


def needs_grad(graph: Graph, cfg: TrainConfig | None = None) -> dict[str, bool]:
    """Per layer (and INPUT): is the gradient of its output needed? Iff the layer trains (its
    LayerSpec is trainable and, under `cfg`, not every one of its parameters is frozen), or a
    gradient flows through it (its LayerSpec does not stop one) from a layer that needs one --
    the one rule the schedule and the numpy reference share. So the backward of a partially
    trained model stops at its first trainable layer: a frozen prefix gets no gradient."""
    ng = {INPUT: False}
    for lay in graph.layers:
        spec = LAYERS[lay.kind]
        trains = spec.trainable and (cfg is None or bool(trained_fields(lay, cfg)))
        ng[lay.name] = trains or (not spec.stops_gradient and any(ng[i] for i in lay.inputs))
    return ng


def eval_mode_bns(graph: Graph, cfg: TrainConfig) -> frozenset[str]:
    """The batch norms that run in inference mode inside a training step: frozen (no parameter
    trains) with nothing trainable upstream, i.e. no gradient through their output
    (`needs_grad` False). They normalize with their running statistics and never update them, so
    a frozen prefix is a pure inference function (compiler/README.md, partial training). Under
    full training the set is empty (every BN trains), and under `cfg.frozen_bn == "batch"` too
    (frozen BNs keep batch statistics, AdaBN-style)."""
    if cfg.frozen_bn == "batch":
        return frozenset()
    ng = needs_grad(graph, cfg)
    return frozenset(lay.name for lay in graph.layers
                     if lay.kind is LayerKind.BATCHNORM and not ng[lay.name])


def check_graph(graph: Graph) -> None:
    """`graph.verify()` (structure) plus what each layer's kind requires (LayerSpec): its number
    of inputs, attrs and params (float32, finite), and that the output layer may end a graph.
    Raises AssertionError on a broken invariant (a bnnc bug, not a user error)."""
    graph.verify()
    for lay in graph.layers:
        spec = LAYERS[lay.kind]
        assert len(lay.inputs) == spec.arity, lay
        for a in spec.attrs:
            assert a in lay.attrs, f"{lay.name} lacks attr {a}"
        allowed = spec.params + spec.optional_params
        for p in spec.params:
            assert p in lay.params, f"{lay.name} lacks param {p}"
        for p, v in lay.params.items():
            assert p in allowed, f"{lay.name} has unexpected param {p}"
            assert isinstance(v, np.ndarray) and v.dtype == np.float32, f"{lay.name}.{p}"
            assert np.all(np.isfinite(v)), f"{lay.name}.{p} is not finite"
    assert LAYERS[graph.output.kind].output, \
        f"output layer {graph.output.name} is a {graph.output.kind.value}"


check_registry()
