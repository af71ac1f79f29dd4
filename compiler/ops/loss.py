"""Softmax (last layer only) fused with cross-entropy into the loss."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..ir import Layer, LayerKind
from ..c_literals import c_float
from ..lower import Call, Instance, LowerCtx, instance
from ..onnx_values import Act, node_attrs, node_label
from ..schedule_ir import Step
from .base import (F32, GRADS, I32, KernelFamily, LayerSpec, OnnxOp, OpFamily, Phase, kernel,
                   same_size_shapes)
from .exportctx import Emitter
from .refctx import RefRun
from .refmath import no_grad

if TYPE_CHECKING:
    from ..schedule import ScheduleBuilder


# ---- ONNX import ------------------------------------------------------------------------------

def _op_softmax(imp, node, vals):
    x = imp._nchw(imp._act(vals[0], node), node)
    axis = node_attrs(node).get("axis", -1)
    if len(x.shape) != 1 or axis not in (-1, 1):
        imp._fail(node, f"softmax over axis {axis} of shape {['N', *x.shape]}",
                  hint="bnnc supports softmax over the class axis of (N, classes)")
    if node.output[0] != imp.output_name:
        imp._fail(node, "Softmax is not the last layer",
                  hint="bnnc supports Softmax only as the network output")
    return Act(imp._add(LayerKind.SOFTMAX, [x.layer], x.shape, node_label(node)),
               x.shape)


ONNX = {
    "Softmax": OnnxOp(_op_softmax, (1, 1)),
}


# ---- training schedule ------------------------------------------------------------------------

def _fwd_softmax(b: ScheduleBuilder, lay: Layer) -> None:
    pass    # fused into the loss


FORWARD = {LayerKind.SOFTMAX: _fwd_softmax}
BACKWARD: dict = {}     # the loss kernel writes the softmax input's gradient
LAYER_SPECS = (LayerSpec(LayerKind.SOFTMAX, "softmax", check_shapes=same_size_shapes, loss=True,
                         output=True),)


# ---- kernels: contract (dtypes, in-place) + C lowering -----------------------------------------

def _lower_softmax_xent(step: Step, ctx: LowerCtx) -> Call:
    a = step.attrs
    logits, labels = step.inputs
    loss, probs, d = step.outputs
    inst = instance(step, ctx, operands={"d": d})
    return Call(inst, [ctx.ptr(logits), ctx.ptr(labels), ctx.ptr(loss), ctx.ptr(probs),
                       ctx.ptr(d), "accuracy", a["batch"], a["classes"], c_float(a["scale"])])
# softmax_xent's step also hands the loss to the train-step entry: the arena slot of `loss` is dead
# (and may be reused) once the step is over


# the predict entry's softmax of the logits into the probabilities (codegen adds it to every program)
SOFTMAX_ROWS = Instance(KernelFamily.LOSS.value, "softmax_rows", "k_softmax_rows", ())
SOFTMAX_XENT = kernel(
    "softmax_xent", Phase.LOSS, KernelFamily.LOSS,
    "probabilities, mean softmax cross-entropy, and G = (p - onehot(labels)) / B * 2^s (2^s: the "
    "loss scale)",
    [("logits", F32), ("labels", I32)], [("loss", F32), ("probs", F32), ("d_logits", GRADS)],
    [(2, 0)], lower=_lower_softmax_xent)

KERNELS = (SOFTMAX_XENT,)


# ---- numpy reference --------------------------------------------------------------------------

def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (B, classes) logits."""
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _ref_forward(run: RefRun, lay: Layer, x: np.ndarray) -> np.ndarray:
    return softmax(x.reshape(len(x), -1)).reshape((len(x),) + lay.shape)


REFERENCE_FORWARD: dict = {LayerKind.SOFTMAX: _ref_forward}
# never reached: the loss differentiates through the softmax (runtime/reference.py)
REFERENCE_BACKWARD: dict = {LayerKind.SOFTMAX: no_grad}


# ---- export -----------------------------------------------------------------------------------

def _export(em: Emitter, lay: Layer, xs: list[str], out: str) -> None:
    # ONNX Softmax normalizes one axis; the reference normalizes over the whole sample
    em.node("Softmax", [em.flat(xs[0], lay.inputs[0], out)], out, axis=-1)


EXPORT: dict = {LayerKind.SOFTMAX: _export}


FAMILY = OpFamily(
    name="loss", doc=__doc__, layers=LAYER_SPECS, onnx=ONNX, kernels=KERNELS, forward=FORWARD,
    backward=BACKWARD, reference_forward=REFERENCE_FORWARD, reference_backward=REFERENCE_BACKWARD,
    export=EXPORT)
