"""Sign (every binarizer idiom: Sign, BipolarQuant, Quant, Where(x>=0,1,-1), MultiThreshold) and ReLU, with their STE backward."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from ..ir import INPUT, Layer, LayerKind, tname
from ..lower import Call, LowerCtx, Split, bits_nhwc, instance, words64
from ..onnx_fold import FOLD
from ..onnx_values import Act, Bin, Cmp, Const, node_attrs, node_label, printable, short
from ..schedule_ir import DType, Role, Step
from .base import (BIT, F32, GRADS, Bits, KernelFamily, LayerSpec, OnnxOp, OpFamily, Phase,
                   elementwise_shapes, kernel, prod)
from .exportctx import Emitter
from .refctx import RefRun
from .refmath import mask_store

if TYPE_CHECKING:
    from ..schedule import ScheduleBuilder


# ---- ONNX import ------------------------------------------------------------------------------

# Binarizers: ONNX `Sign`; QONNX `BipolarQuant` and 1-bit `Quant` (domains qonnx.custom_op.general,
# finn.custom_op.general, onnx.brevitas; a missing opset import is fine: `onnx.checker` is never
# run); FINN `MultiThreshold` with one threshold at 0 and out_scale = -2*out_bias;
# `Where(x >= 0, c, -c)` / `Where(x < 0, -c, c)`; the detach trick `x + (B(x) - x)` (structural's
# Add/Sub); Larq's `Sign(Sign(x) + 0.1)` (any `B(s*B(x) + t)` with s > 0, |t| < s is `B(x)`). On an
# activation they become one SIGN layer; on a constant a `Bin` that the consuming DENSE/CONV reads
# as binary latent weights. A scale c != 1 becomes a pending affine after the SIGN / the layer.
# sign(0): bnnc's SIGN is +1 at 0. Every form above except ONNX `Sign` means that already. ONNX
# `Sign(0) = 0` is mapped to bnnc's SIGN as well, so for a plain-`Sign` file bnnc differs from
# onnxruntime exactly where a pre-activation or a latent weight is exactly 0 (then +1, not 0).

def _binarize(imp, x, scale, node, src: str):
    if isinstance(x, Const):
        if not np.issubdtype(x.arr.dtype, np.floating):
            imp._fail(node, f"binarizes a {x.arr.dtype} constant")
        sc = imp._bcast(np.asarray(scale, np.float64), x.arr.shape, node, "the scale").copy()
        if np.any(sc <= 0):
            imp._fail(node, "binarizer scale is not positive")
        return Bin(x.arr, sc, src)
    if isinstance(x, Bin):
        _check_idempotent(imp, x.scale, x.shift, node)
        sc = imp._bcast(np.asarray(scale, np.float64), x.latent.shape, node,
                        "the scale").copy()
        return Bin(x.latent, sc, x.src)
    x = imp._act(x, node)
    if x.aff is not None and _is_sign(imp, x.layer):
        # Larq's Sign(Sign(x) + 0.1): B(s*B(x) + t) == B(x) for s > 0, |t| < s
        ok = np.all(x.aff.scale > 0) and np.all(np.abs(x.aff.bias) < x.aff.scale)
        base = dataclasses.replace(x, aff=None, mat=None, src=None) if ok else imp._mat(x)
    else:
        base = imp._mat(x)
    if _is_sign(imp, base.layer) and base.aff is None:
        name = base.layer
    else:
        name = imp._add(LayerKind.SIGN, [base.layer], base.shape, node_label(node))
    out = Act(name, base.shape, base.nhwc, src=src, view=base.view, perm=base.perm)
    sc, _ = imp._chan(out, scale, node)
    if np.any(sc <= 0):
        imp._fail(node, f"binarizer scale {short(sc)} is not positive")
    if not np.all(sc == 1):
        out = imp._affine(out, node, mul=sc, explicit=False)
        out.src = src
    return out


def _check_idempotent(imp, scale, shift, node):
    if np.any(scale <= 0) or (shift is not None and np.any(np.abs(shift) >= scale)):
        imp._fail(node, "binarizes a binarized weight whose scale/shift change its signs")


def _is_sign(imp, layer: str) -> bool:
    return layer in imp.specs and imp.specs[layer].kind is LayerKind.SIGN


def _op_sign(imp, node, vals):
    return _binarize(imp, vals[0], 1.0, node, node.input[0])


def _op_bipolarquant(imp, node, vals):
    scale = imp._const(vals[1], node, "the scale")
    return _binarize(imp, vals[0], scale, node, node.input[0])


def _op_quant(imp, node, vals):
    if len(vals) != 4:
        imp._fail(node, f"has {len(vals)} inputs; QONNX Quant takes x, scale, zero_point, "
                  "bit_width")
    scale, zp, bits = (imp._const(v, node, w) for v, w in
                       zip(vals[1:], ("the scale", "the zero point", "the bit width")))
    at = node_attrs(node)
    signed, narrow = bool(at.get("signed", 1)), bool(at.get("narrow", 0))
    if bits.size != 1 or not np.isfinite(float(bits.ravel()[0])) or \
            float(bits.ravel()[0]) != int(bits.ravel()[0]):
        imp._fail(node, f"bit width {short(bits)} is not one integer")
    nbits = int(bits.ravel()[0])
    if nbits == 1:
        if not signed or np.any(zp != 0):
            imp._fail(node, "1-bit Quant with signed=0 or a zero point is {0,1}-valued, not "
                      "bipolar", hint="bnnc binarizes to +-1 (signed, zero_point 0)")
        return _binarize(imp, vals[0], scale, node, node.input[0])
    x = vals[0]
    supported = ("bnnc handles 1-bit weights and activations, plus one 2..8-bit Quant on the "
                 "network input")
    if not isinstance(x, Act):
        imp._fail(node, f"unsupported Quant bit width {nbits} on a weight", hint=supported)
    x = imp._mat(x)      # elementwise: fine on the NHWC input before its transpose
    if not _on_input(imp, x.layer) or not 2 <= nbits <= 8:
        where = "on the network input" if _on_input(imp, x.layer) else "on an activation"
        imp._fail(node, f"unsupported Quant bit width {nbits} {where}", hint=supported)
    if scale.size != 1 or zp.size != 1:
        imp._fail(node, "per-channel input quantization is not supported",
                  hint="use a per-tensor scale and zero point")
    mode = str(at.get("rounding_mode", "ROUND")).upper()
    if mode != "ROUND":
        imp._fail(node, f"rounding_mode {mode} is not supported", hint="use ROUND")
    s, z = float(np.float32(scale.ravel()[0])), float(np.float32(zp.ravel()[0]))
    if not (np.isfinite(s) and s > 0 and np.isfinite(z)):
        imp._fail(node, f"scale {s} / zero point {z} must be finite, scale > 0")
    name = imp._add(LayerKind.INPUT_QUANT, [x.layer], x.shape, node_label(node),
                    attrs={"scale": s, "zero_point": z, "bits": nbits, "signed": signed,
                           "narrow": narrow, "rounding_mode": "ROUND"})
    return Act(name, x.shape, x.nhwc, view=x.view)


def _on_input(imp, layer: str) -> bool:
    while layer != INPUT:
        spec = imp.specs[layer]
        if spec.kind not in (LayerKind.AFFINE, LayerKind.FLATTEN):
            return False
        layer = spec.inputs[0]
    return True


def _op_multithreshold(imp, node, vals):
    thr = imp._const(vals[1], node, "the thresholds")
    at = node_attrs(node)
    out_scale, out_bias = float(at.get("out_scale", 1.0)), float(at.get("out_bias", 0.0))
    if thr.ndim != 2 or thr.shape[1] != 1 or np.any(thr != 0):
        imp._fail(node, f"thresholds of shape {list(thr.shape)} are not a single threshold "
                  "at 0", hint="bnnc reads MultiThreshold only as a bipolar sign "
                  "(thresholds [[0]], out_scale 2, out_bias -1)")
    if not (out_bias < 0 and out_scale == -2 * out_bias):
        imp._fail(node, f"out_scale {out_scale} / out_bias {out_bias} do not give +-c",
                  hint="bnnc reads MultiThreshold only as a bipolar sign "
                  "(out_scale 2, out_bias -1)")
    return _binarize(imp, vals[0], -out_bias, node, node.input[0])


def _cmp(imp, node, vals, op):
    x, zero = vals
    if isinstance(zero, Const) and zero.arr.size == 1 and float(zero.arr.ravel()[0]) == 0 \
            and isinstance(x, (Act, Const, Bin)) \
            and not (isinstance(x, Const) and not np.issubdtype(x.arr.dtype, np.floating)):
        return Cmp(x, node.input[0], op)
    if all(isinstance(v, Const) for v in vals):
        imp._check_fold(node, node.op_type, [vals[0].arr, vals[1].arr])
        try:
            return Const(FOLD[node.op_type](node, vals[0].arr, vals[1].arr))
        except (ValueError, TypeError) as e:
            imp._fail(node, f"cannot compare the constants ({printable(e, 200)})")
    imp._fail(node, "only `x >= 0` / `x < 0` comparisons (the Where binarizer) are supported")


def _op_greaterorequal(imp, node, vals):
    return _cmp(imp, node, vals, "ge")


def _op_less(imp, node, vals):
    return _cmp(imp, node, vals, "lt")


def _op_where(imp, node, vals):
    cond, a, b = vals
    if isinstance(cond, Cmp) and isinstance(a, Const) and isinstance(b, Const):
        av, bv = a.arr.astype(np.float64).ravel(), b.arr.astype(np.float64).ravel()
        hi, lo = (av, bv) if cond.op == "ge" else (bv, av)
        if hi.size and lo.size and np.all(hi == hi[0]) and np.all(lo == -hi[0]) and hi[0] > 0:
            return _binarize(imp, cond.x, hi[0], node, cond.src)
    if isinstance(cond, Cmp) and isinstance(cond.x, Const) and all(
            isinstance(v, Const) for v in (a, b)):
        imp._check_fold(node, "Where", [cond.x.arr, a.arr, b.arr])
        try:
            return Const(np.where(cond.value(), a.arr, b.arr))
        except (ValueError, TypeError) as e:
            imp._fail(node, f"cannot select between the constants ({printable(e, 200)})")
    imp._fail(node, "Where is supported only as the binarizer Where(x >= 0, c, -c)",
              hint="bnnc maps Where(x >= 0, 1, -1) to sign with sign(0) = +1")


def _op_relu(imp, node, vals):
    x = imp._nchw(imp._act(vals[0], node), node, keep=("view", "perm", "nhwc"))   # elementwise
    return dataclasses.replace(x, layer=imp._add(LayerKind.RELU, [x.layer], x.shape,
                                                 node_label(node)))


ONNX = {
    "Sign": OnnxOp(_op_sign, (1, 1)),
    "BipolarQuant": OnnxOp(_op_bipolarquant, (2, 2)),
    "Quant": OnnxOp(_op_quant, (4, 4)),
    "MultiThreshold": OnnxOp(_op_multithreshold, (2, 2)),
    "GreaterOrEqual": OnnxOp(_op_greaterorequal, (2, 2)),
    "Less": OnnxOp(_op_less, (2, 2)),
    "Where": OnnxOp(_op_where, (3, 3)),
    "Relu": OnnxOp(_op_relu, (1, 1)),
}


# ---- training schedule ------------------------------------------------------------------------

def _fwd_sign(b: ScheduleBuilder, lay: Layer) -> None:
    x = b.act[lay.inputs[0]]
    full = b.full(lay.name)
    if lay.name in b.packed:
        y = b.bits(tname(lay.name, "out"), full, Role.SCRATCH, b.packed[lay.name])
        b.act[lay.name] = y
        kernel = SIGN_FWD_PACK
    else:
        y = b.out_f32(lay)
        kernel = SIGN_FWD_F32
    outs = (y,)
    if lay.name in b.has_dout and b.cfg.save_bits:
        b.mask[lay.name] = b.bits(tname(lay.name, "mask"), full, Role.SCRATCH, "flat")
        outs += (b.mask[lay.name],)
    b.emit(kernel, lay.name, (x,), outs, batch=b.B, size=prod(lay.shape))


def _fwd_relu(b: ScheduleBuilder, lay: Layer) -> None:
    x = b.act[lay.inputs[0]]
    outs = (b.out_f32(lay),)
    if lay.name in b.has_dout and b.cfg.save_bits:
        b.mask[lay.name] = b.bits(tname(lay.name, "mask"), b.full(lay.name),
                                  Role.SCRATCH, "flat")
        outs += (b.mask[lay.name],)
    b.emit(RELU_FWD, lay.name, (x,), outs, batch=b.B, size=prod(lay.shape))


def _bwd_sign(b: ScheduleBuilder, lay: Layer) -> None:
    size = dict(batch=b.B, size=prod(lay.shape))
    if lay.name in b.mask:
        b.unary_backward(lay, SIGN_BWD_MASK, (b.mask[lay.name],), **size)
    else:
        b.unary_backward(lay, SIGN_BWD_STE, (b.act[lay.inputs[0]],), **size)


def _bwd_relu(b: ScheduleBuilder, lay: Layer) -> None:
    size = dict(batch=b.B, size=prod(lay.shape))
    if lay.name in b.mask:
        b.unary_backward(lay, RELU_BWD_MASK, (b.mask[lay.name],), **size)
    else:
        b.unary_backward(lay, RELU_BWD_OUT, (b.act[lay.name],), **size)


FORWARD = {LayerKind.SIGN: _fwd_sign, LayerKind.RELU: _fwd_relu}
BACKWARD = {LayerKind.SIGN: _bwd_sign, LayerKind.RELU: _bwd_relu}
LAYER_SPECS = (
    LayerSpec(LayerKind.SIGN, "sign", check_shapes=elementwise_shapes, bits=Bits.MAKE),
    LayerSpec(LayerKind.RELU, "relu", check_shapes=elementwise_shapes),
)


# ---- kernels: contract (dtypes, in-place) + C lowering -----------------------------------------

def _lower_sign_fwd(step: Step, ctx: LowerCtx) -> Call:
    a = step.attrs
    x, y = step.inputs[0], step.outputs[0]
    mask = step.outputs[1] if len(step.outputs) > 1 else None
    b, size = a["batch"], a["size"]
    if step.kernel is SIGN_FWD_F32:
        inst = instance(step, ctx, mask=mask is not None)
        return Call(inst, [ctx.ptr(x), ctx.ptr(y), ctx.ptr(mask) if mask else "0", b, size,
                           words64(size)], split=_sample_split(b, size, size, mask, size))
    yt = ctx.t(y)
    if bits_nhwc(yt):
        _, c, h, w = yt.shape
        inst = instance(step, ctx, "sign_fwd_pack_nhwc", mask=mask is not None)
        return Call(inst, [ctx.ptr(x), ctx.ptr(y), ctx.ptr(mask) if mask else "0", b, c,
                           h * w, words64(c), words64(size)],
                    split=_sample_split(b, size, h * w * words64(c), mask, size))
    inst = instance(step, ctx, "sign_fwd_pack_rows", mask=mask is not None)
    return Call(inst, [ctx.ptr(x), ctx.ptr(y), ctx.ptr(mask) if mask else "0", b, size,
                       words64(size)], split=_sample_split(b, size, words64(size), mask, size))


def _sample_split(batch: int, per_in: int, per_out: int, mask: str | None, size: int) -> Split:
    """An element-wise activation over [B, size] split over samples: arguments 0 (input), 1
    (output) and 2 (the per-sample rows of a 1-bit mask, when there is one) advance by a sample
    each; argument 3 is the batch."""
    offsets = ((0, per_in), (1, per_out)) + (((2, words64(size)),) if mask else ())
    return Split(batch, 1, offsets, count=3)


def _lower_unary_bwd(step: Step, ctx: LowerCtx) -> Call:
    """sign_bwd_ste / sign_bwd_mask / relu_bwd_out / relu_bwd_mask: d_in = d_out * keep."""
    a = step.attrs
    g, keep = step.inputs
    d = step.outputs[0]
    inst = instance(step, ctx, operands={"g": g, "d": d})
    size = a["size"]
    per_keep = words64(size) if ctx.t(keep).dtype is DType.BIT else size
    return Call(inst, [ctx.ptr(g), ctx.ptr(keep), ctx.ptr(d), a["batch"], size, words64(size)],
                split=Split(a["batch"], 1, ((0, size), (1, per_keep), (2, size)), count=3))


def _lower_relu_fwd(step: Step, ctx: LowerCtx) -> Call:
    a = step.attrs
    mask = step.outputs[1] if len(step.outputs) > 1 else None
    inst = instance(step, ctx, mask=mask is not None)
    return Call(inst, [ctx.ptr(step.inputs[0]), ctx.ptr(step.outputs[0]),
                       ctx.ptr(mask) if mask else "0", a["batch"], a["size"], words64(a["size"])])


SIGN_FWD_F32 = kernel(
    "sign_fwd_f32", Phase.FORWARD, KernelFamily.ACT,
    "y = sign(x) (sign(0) = +1) as f32; optional 1-bit mask |x| <= 1",
    [("x", F32)], [("y", F32), ("mask?", BIT)], [(0, 0)], lower=_lower_sign_fwd, pm1_out=True)
SIGN_FWD_PACK = kernel(
    "sign_fwd_pack", Phase.FORWARD, KernelFamily.ACT,
    "y = sign(x) packed to bits; optional 1-bit STE mask |x| <= 1",
    [("x", F32)], [("y", BIT), ("mask?", BIT)], lower=_lower_sign_fwd)
RELU_FWD = kernel(
    "relu_fwd", Phase.FORWARD, KernelFamily.ACT, "y = max(x, 0); optional 1-bit mask x > 0",
    [("x", F32)], [("y", F32), ("mask?", BIT)], [(0, 0)], lower=_lower_relu_fwd)
SIGN_BWD_STE = kernel(
    "sign_bwd_ste", Phase.BACKWARD, KernelFamily.ACT,
    "d_in = d_out 1[|x| <= 1], reading the saved pre-activation x",
    [("d_out", GRADS), ("x", F32)], [("d_in", GRADS)], [(0, 0)], lower=_lower_unary_bwd)
SIGN_BWD_MASK = kernel(
    "sign_bwd_mask", Phase.BACKWARD, KernelFamily.ACT, "d_in = d_out * mask (1-bit STE mask)",
    [("d_out", GRADS), ("mask", BIT)], [("d_in", GRADS)], [(0, 0)], lower=_lower_unary_bwd)
RELU_BWD_OUT = kernel(
    "relu_bwd_out", Phase.BACKWARD, KernelFamily.ACT,
    "d_in = d_out 1[y > 0], reading the saved output y",
    [("d_out", GRADS), ("y", F32)], [("d_in", GRADS)], [(0, 0)], lower=_lower_unary_bwd)
RELU_BWD_MASK = kernel(
    "relu_bwd_mask", Phase.BACKWARD, KernelFamily.ACT, "d_in = d_out * mask (1-bit x > 0)",
    [("d_out", GRADS), ("mask", BIT)], [("d_in", GRADS)], [(0, 0)], lower=_lower_unary_bwd)

KERNELS = (SIGN_FWD_F32, SIGN_FWD_PACK, RELU_FWD, SIGN_BWD_STE, SIGN_BWD_MASK, RELU_BWD_OUT,
           RELU_BWD_MASK)


# ---- numpy reference --------------------------------------------------------------------------

def _ref_sign_forward(run: RefRun, lay: Layer, x: np.ndarray) -> np.ndarray:
    if run.training:
        mask = mask_store(run, np.abs(x) <= 1)
        run.saved[lay.name] = {"mask": mask}
        run.emit(lay, "mask", mask)
    return np.where(x >= 0, 1, -1).astype(x.dtype)


def _ref_sign_backward(run: RefRun, lay: Layer, g: np.ndarray, need) -> list:
    return [g * run.saved[lay.name]["mask"].astype(g.dtype)]


def _ref_relu_forward(run: RefRun, lay: Layer, x: np.ndarray) -> np.ndarray:
    if run.training:
        run.saved[lay.name] = {"pos": mask_store(run, x > 0)}
        run.emit(lay, "mask", run.saved[lay.name]["pos"])
    return np.maximum(x, 0)


def _ref_relu_backward(run: RefRun, lay: Layer, g: np.ndarray, need) -> list:
    return [g * run.saved[lay.name]["pos"]]


REFERENCE_FORWARD: dict = {LayerKind.SIGN: _ref_sign_forward, LayerKind.RELU: _ref_relu_forward}
REFERENCE_BACKWARD: dict = {LayerKind.SIGN: _ref_sign_backward,
                            LayerKind.RELU: _ref_relu_backward}


# ---- export -----------------------------------------------------------------------------------

def _export_sign(em: Emitter, lay: Layer, xs: list[str], out: str) -> None:
    em.binarize(xs[0], out)


def _export_relu(em: Emitter, lay: Layer, xs: list[str], out: str) -> None:
    em.node("Relu", list(xs), out)


EXPORT: dict = {LayerKind.SIGN: _export_sign, LayerKind.RELU: _export_relu}


FAMILY = OpFamily(
    name="activation", doc=__doc__, layers=LAYER_SPECS, onnx=ONNX, kernels=KERNELS, forward=FORWARD,
    backward=BACKWARD, reference_forward=REFERENCE_FORWARD, reference_backward=REFERENCE_BACKWARD,
    export=EXPORT)
