"""Fully connected layers (ONNX MatMul/Gemm): XNOR-popcount, sign-select and f32 forward; PO2/f32/1-bit dW and dX."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..ir import Layer, LayerKind
from ..c_literals import c_float
from ..config import u8_input_layer
from ..lower import (Call, LowerCtx, Split, bias_operand, bit_rows_unit, instance, lcm_unit,
                     pm1_input, words64)
from ..onnx_values import Act, node_attrs, node_label
from ..schedule_ir import DType, Schedule, Step
from . import weights
from .base import (BIT, F32, GRADS, I32, PO2, SAVED_X, STATE, U8, WEIGHTS, Bits, KernelFamily,
                   LayerSpec, OnnxOp, OpFamily, Phase, kernel, prod)
from .exportctx import Emitter
from .refctx import RefRun
from .refmath import matmul, save_weight_input, weight_grads
from .weights import WeightKernels

if TYPE_CHECKING:
    from ..schedule import ScheduleBuilder


# ---- ONNX import ------------------------------------------------------------------------------

def _dense(imp, node, x, w, *, trans_b=False, alpha=1.0, bias=None):
    x = imp._nchw(imp._act(x, node), node, keep=("perm",))
    if len(x.shape) != 1:
        imp._fail(node, f"reads an activation of per-sample shape {list(x.shape)}",
                  hint="flatten before MatMul/Gemm")
    W, binary, scale = weights.weight(imp, w, node, x)
    if W.ndim != 2:
        imp._fail(node, f"weight has shape {list(W.shape)}; expected 2-D")
    if trans_b:
        W = W.T
        scale = None if scale is None else scale.T
    if W.shape[0] != x.shape[0]:
        imp._fail(node, f"weight shape {list(W.shape)} does not match the input's "
                  f"{x.shape[0]} features")
    if x.perm is not None:
        # the input is an NHWC map flattened in (H, W, C) order (tf2onnx / keras2onnx); bnnc
        # flattens NCHW, so the weight's rows move instead: row perm[j] of bnnc's is the file's j
        W, scale = (None if a is None else imp.channel_params(x, node, [a])[0]
                    for a in (W, scale))
    out = W.shape[1]
    sc = weights.out_scale(imp, scale, node, 1)
    params = {}
    if binary:
        params["W"] = imp._param(W, node, "the weight")
        sc = alpha * (np.ones(1) if sc is None else sc)
    else:
        params["W"] = imp._param(np.asarray(W, np.float64) * alpha, node, "the weight")
        if bias is not None:
            params["b"] = imp._param(imp._bcast(bias, (out,), node, "the bias"), node,
                                     "the bias")
            bias = None
    name = imp._add(LayerKind.DENSE, [x.layer], (out,), node_label(node),
                    attrs={"binary": binary}, params=params)
    y = Act(name, (out,))
    return weights.layer_affine(imp, y, node, sc, bias)


def _op_matmul(imp, node, vals):
    return _dense(imp, node, vals[0], vals[1])


def _op_gemm(imp, node, vals):
    at = node_attrs(node)
    if at.get("transA", 0):
        imp._fail(node, "transA=1 is not supported", hint="export x @ W with transA=0")
    alpha, beta = float(at.get("alpha", 1.0)), float(at.get("beta", 1.0))
    bias = None
    if len(vals) > 2 and vals[2] is not None:
        bias = np.asarray(imp._const(vals[2], node, "the bias C"), np.float64) * beta
        if bias.ndim == 2:
            if bias.shape[0] != 1:
                imp._fail(node, f"bias C of shape {list(bias.shape)} varies over the batch")
            bias = bias[0]
    return _dense(imp, node, vals[0], vals[1], trans_b=bool(at.get("transB", 0)),
                  alpha=alpha, bias=bias)


ONNX = {
    "MatMul": OnnxOp(_op_matmul, (2, 2)),
    "Gemm": OnnxOp(_op_gemm, (2, 3)),
}


# ---- training schedule ------------------------------------------------------------------------

def _geometry(b: ScheduleBuilder, lay: Layer) -> dict:
    w = lay.params["W"].shape
    geom = dict(in_features=w[0], out_features=w[1])
    chw = b.packed.get(lay.inputs[0])
    if chw:
        geom["x_chw"] = chw
    return geom


def _packed_weights(b: ScheduleBuilder, lay: Layer) -> tuple[int, str]:
    """Rows of W^T in the input's bit order (pixel-major NHWC behind a packed image)."""
    w = lay.params["W"].shape
    chw = b.packed.get(lay.inputs[0])
    words = chw[1] * chw[2] * words64(chw[0]) if chw else words64(w[0])
    order = "pixel-major NHWC" if chw else "feature"
    return w[1] * words * 8, f"bits W^T: {w[1]} rows x {words} words64 in {order} bit order"


def _check_shapes(lay: Layer, ins) -> str | None:
    w = lay.params["W"]
    kin, nout = w.shape if w.ndim == 2 else (-1, -1)
    bad = None
    if (kin, (nout,)) != (prod(ins[0]), lay.shape):
        bad = f"W {list(w.shape)} does not map {ins[0]} to {lay.shape}"
    return weights.bias_shape(lay) or bad


INT32_MAX = 2**31 - 1
U8_DW_SHIFT = 15        # a PO2 code's exponent field: Q = +-2^(c & 15) in the kernels' integer unit


def u8_bounds(batch: int, in_features: int, channels: int) -> dict:
    """The integer first layer's int32 proof (`--input u8`), per layer at compile time: the
    largest |sum| each kernel accumulates, and whether it needs int64 accumulators instead.
    forward: the int32 sums S+ = sum of u over sign(W) = +1 and sum u of one channel, combined
    as 2 S+ - sum u, |.| <= 2 * 255 * plane; dW: sum over the batch of u * (+-2^(c & 15)),
    |.| <= B * 255 * 2^15."""
    plane = in_features // channels
    fwd, dw = 2 * 255 * plane, batch * 255 * 2**U8_DW_SHIFT
    return dict(u8_plane=plane, int_bound_fwd=fwd, int_bound_dw=dw,
                acc64_fwd=fwd > INT32_MAX, acc64_dw=dw > INT32_MAX)


def _u8_attrs(b: ScheduleBuilder, lay: Layer) -> dict:
    """The pixel map (float32 a_c, b_c per input channel) and the int32 bounds of the integer
    first layer."""
    a, off = b.cfg.input_affine
    attrs = dict(u8_scale=tuple(float(np.float32(v)) for v in a),
                 u8_offset=tuple(float(np.float32(v)) for v in off))
    attrs.update(u8_bounds(b.B, lay.params["W"].shape[0], len(a)))
    return attrs


def _forward(b: ScheduleBuilder, lay: Layer) -> None:
    weights.forward(b, lay, WEIGHT_KERNELS)


def _backward(b: ScheduleBuilder, lay: Layer) -> None:
    weights.backward(b, lay, WEIGHT_KERNELS)


FORWARD = {LayerKind.DENSE: _forward}
BACKWARD = {LayerKind.DENSE: _backward}
LAYER_SPECS = (LayerSpec(LayerKind.DENSE, "fc", attrs=("binary",), params=("W",),
                         optional_params=("b",), check_shapes=_check_shapes, trainable=True,
                         bits=Bits.READ, output=True, packed_weights=_packed_weights),)


# ---- kernels: contract (dtypes, in-place) + C lowering -----------------------------------------

def _lower_dense_fwd(step: Step, ctx: LowerCtx) -> Call:
    a = step.attrs
    x, w = step.inputs[0], step.inputs[1]
    ops, bptr = bias_operand(step, ctx, 2)
    y = step.outputs[0]
    k, n, b = a["in_features"], a["out_features"], a["batch"]
    if step.kernel is DENSE_FWD_XNOR:
        chw = a.get("x_chw")
        words = chw[1] * chw[2] * words64(chw[0]) if chw else words64(k)
        inst = instance(step, ctx, operands=ops, bias=bool(ops))
        return Call(inst, [ctx.ptr(x), ctx.ptr(w), bptr, ctx.ptr(y), b, n, words, k],
                    split=Split(b, 1, ((0, words), (3, n)), count=4))
    # a +-1 input (the standard algorithm keeps sign outputs as f32) multiplies by XNOR-popcount:
    # the sums are exact integers, the same bits as the sign-select float sum
    macro = ("dense_fwd_pm1" if step.kernel is DENSE_FWD_SIGNW and pm1_input(ctx, x)
             and ctx.t(w).dtype is not DType.BIT else None)
    inst = instance(step, ctx, macro, operands={"w": w, **ops}, bias=bool(ops))
    # threads take samples (dense_fwd_pm1 packs them 64 at a time: whole packs)
    return Call(inst, [ctx.ptr(x), ctx.ptr(w), bptr, ctx.ptr(y), b, k, n, words64(k)],
                split=Split(b, 64 if macro else 4, ((0, k), (3, n)), count=4))


def _dw_split(a: dict, bits: bool) -> Split:
    """dW sums over the batch: threads take its rows (input features), whole 4-row tiles (and no
    64-bit word of another thread's rows where dW is packed bits)."""
    k, n = a["in_features"], a["out_features"]
    return Split(k, lcm_unit(4, bit_rows_unit(n)) if bits else 4, ranged=True)


def _u8_decls(a: dict) -> tuple[list[str], list[str]]:
    """Step-local constants of the pixel map (float32 a_c, b_c) and the call's args naming them."""
    c = len(a["u8_scale"])
    decls = [f"static const float u8_scale[{c}] = {{{', '.join(map(c_float, a['u8_scale']))}}};",
             f"static const float u8_offset[{c}] = {{{', '.join(map(c_float, a['u8_offset']))}}};"]
    return decls, ["u8_scale", "u8_offset", c, a["u8_plane"]]


def _lower_dense_fwd_u8(step: Step, ctx: LowerCtx) -> Call:
    a = step.attrs
    x, w = step.inputs[0], step.inputs[1]
    ops, bptr = bias_operand(step, ctx, 2)
    k, n, b = a["in_features"], a["out_features"], a["batch"]
    decls, args = _u8_decls(a)
    inst = instance(step, ctx, operands={"w": w, **ops}, bias=bool(ops), acc64=a["acc64_fwd"])
    return Call(inst, [ctx.ptr(x), ctx.ptr(w), bptr, ctx.ptr(step.outputs[0]), b, k, n,
                       words64(k)] + args, decls)


def _x_operand(step: Step, ctx: LowerCtx, x: str, a: dict) -> tuple[str, list]:
    """How a dense kernel reads its saved input: macro suffix and (words/row, HW, wc) args."""
    xt = ctx.t(x)
    k = a["in_features"]
    if xt.dtype is DType.U8:
        return "u8", [0, 1, 0]
    if xt.dtype is DType.BIT:
        chw = a.get("x_chw")
        if chw:
            wc = words64(chw[0])
            return "bits", [chw[1] * chw[2] * wc, chw[1] * chw[2], wc]
        return "bits", [words64(k), 1, 0]
    return "real", [0, 1, 0]


def _lower_dense_dw(step: Step, ctx: LowerCtx) -> Call:
    a = step.attrs
    x = step.inputs[0]
    kind, xargs = _x_operand(step, ctx, x, a)
    b, k, n = a["batch"], a["in_features"], a["out_features"]
    dw = step.outputs[0]
    ops: dict[str, str] = {} if kind == "bits" else {"x": x}
    if step.kernel is DENSE_DW_BIN and kind == "u8":
        decls, args = _u8_decls(a)
        inst = instance(step, ctx, "dense_dw_bin_u8", acc64=a["acc64_dw"])
        return Call(inst, [ctx.ptr(x), ctx.ptr(step.inputs[1]), ctx.ptr(dw), b, k, n] + args,
                    decls)
    if step.kernel is DENSE_DW_BIN:
        g = step.inputs[1]
        po2 = ctx.t(g).dtype is DType.PO2
        if not po2:
            ops["g"] = g
        inst = instance(step, ctx, f"dense_dw_bin_{kind}", ops, po2=po2)
        return Call(inst, [ctx.ptr(x), ctx.ptr(g), ctx.ptr(dw), b, k, n] + xargs + [0, k],
                    split=_dw_split(a, True))
    if step.kernel is DENSE_DW_PO2:
        q, bias = step.inputs[1], step.inputs[2]
        w = step.inputs[3] if len(step.inputs) > 3 else None
        if w:
            ops["w"] = w
        inst = instance(step, ctx, f"dense_dw_po2_{kind}", ops, mask=w is not None)
        return Call(inst, [ctx.ptr(x), ctx.ptr(q), ctx.ptr(bias),
                           ctx.ptr(w) if w else "0", ctx.ptr(dw), b, k, n] + xargs + [0, k],
                    split=_dw_split(a, False))
    dy = step.inputs[1]
    w = step.inputs[2] if len(step.inputs) > 2 else None
    ops["dy"] = dy
    if w:
        ops["w"] = w
    inst = instance(step, ctx, f"dense_dw_f32_{kind}", ops, mask=w is not None)
    return Call(inst, [ctx.ptr(x), ctx.ptr(dy), ctx.ptr(w) if w else "0",
                       ctx.ptr(dw), b, k, n] + xargs + [0, k], split=_dw_split(a, False))


_GEOMETRY: list = [None, {}]     # (the schedule, its geometries): one scan per schedule, not per W


def packed_w_geometry(schedule: Schedule, w: str) -> tuple[int, int]:
    """(hw, wc) of the NHWC input bit order a packed dense weight uses; (1, 0) for feature order."""
    if _GEOMETRY[0] is not schedule:
        geom = {}
        for s in schedule.steps:
            if s.kernel is DENSE_FWD_XNOR and s.attrs.get("x_chw"):
                c, h, wd = s.attrs["x_chw"]
                geom.setdefault(s.inputs[1], (h * wd, words64(c)))
        _GEOMETRY[:] = [schedule, geom]
    return _GEOMETRY[1].get(w, (1, 0))


def _w_sign_args(ctx: LowerCtx, w: str, k: int) -> list:
    """Bop's packed W^T rows: words per row and the bit order; zeros for a W read element-wise."""
    if ctx.t(w).dtype is not DType.BIT:
        return [0, 1, 0]
    hw, wc = packed_w_geometry(ctx.s, w)
    return [hw * wc if wc else words64(k), hw, wc]


def _lower_dense_dx(step: Step, ctx: LowerCtx) -> Call:
    a = step.attrs
    b, k, n = a["batch"], a["in_features"], a["out_features"]
    dx = step.outputs[0]
    if step.kernel is DENSE_DX_PO2:
        q, bias, w = step.inputs
        inst = instance(step, ctx, operands={"w": w, "dx": dx})
        return Call(inst, [ctx.ptr(q), ctx.ptr(bias), ctx.ptr(w), ctx.ptr(dx),
                           b, k, n] + _w_sign_args(ctx, w, k),
                    split=Split(b, 4, ((0, n), (3, k)), count=4))
    dy, w = step.inputs
    inst = instance(step, ctx, operands={"dy": dy, "w": w, "dx": dx}, binary=bool(a["binary"]))
    return Call(inst, [ctx.ptr(dy), ctx.ptr(w), ctx.ptr(dx), b, k, n]
                + _w_sign_args(ctx, w, k), split=Split(b, 4, ((0, n), (2, k)), count=3))


def _magnitude_fwd(step: Step, name: str, mag) -> np.ndarray:
    return mag.value(step.inputs[0]).reshape(step.attrs["batch"], -1) @ mag.weight(step.inputs[1])


def _magnitude_dw(step: Step, name: str, mag) -> np.ndarray:
    b = step.attrs["batch"]
    return mag.value(step.inputs[0]).reshape(b, -1).T @ mag.value(step.inputs[1]).reshape(b, -1)


def _magnitude_dx(step: Step, name: str, mag) -> np.ndarray:
    b = step.attrs["batch"]
    return mag.value(step.inputs[0]).reshape(b, -1) @ mag.weight(step.inputs[-1]).T


DENSE_FWD_XNOR = kernel(
    "dense_fwd_xnor", Phase.FORWARD, KernelFamily.DENSE,
    "Y = X Wb by XNOR-popcount over packed rows (+ b)",
    [("x", BIT), ("wb", BIT), ("b?", STATE)], [("y", F32)], lower=_lower_dense_fwd)
DENSE_FWD_SIGNW = kernel(
    "dense_fwd_signw", Phase.FORWARD, KernelFamily.DENSE,
    "Y = X sign(W), real X, signs read from W on the fly (+ b)",
    [("x", F32), ("w", WEIGHTS), ("b?", STATE)], [("y", F32)], lower=_lower_dense_fwd,
    magnitude=_magnitude_fwd)
DENSE_FWD_U8 = kernel(
    "dense_fwd_u8", Phase.FORWARD, KernelFamily.DENSE,
    "integer first layer: Y = sum_c a_c (U_c sign(W_c)) + b_c colsum(sign(W_c)) (+ b), U u8 "
    "pixels, each channel's dot product exact in int32",
    [("x", (U8,)), ("w", WEIGHTS), ("b?", STATE)], [("y", F32)], lower=_lower_dense_fwd_u8)
DENSE_FWD_F32 = kernel(
    "dense_fwd_f32", Phase.FORWARD, KernelFamily.DENSE, "Y = X W (+ b), real layer",
    [("x", F32), ("w", STATE), ("b?", STATE)], [("y", F32)], lower=_lower_dense_fwd,
    magnitude=_magnitude_fwd)
DENSE_DW_F32 = kernel(
    "dense_dw_f32", Phase.BACKWARD, KernelFamily.DENSE,
    "dW = X^T dY (times 1[|W| <= 1] when W is given: binary STE)",
    [("x", SAVED_X), ("dy", GRADS), ("w?", STATE)], [("dw", F32)], lower=_lower_dense_dw,
    magnitude=_magnitude_dw)
DENSE_DW_PO2 = kernel(
    "dense_dw_po2", Phase.BACKWARD, KernelFamily.DENSE,
    "dW = X^T Q with PO2 Q (times 1[|W| <= 1] when W is given)",
    [("x", SAVED_X), ("q", PO2), ("bias", I32), ("w?", STATE)], [("dw", F32)],
    lower=_lower_dense_dw, magnitude=_magnitude_dw)
DENSE_DW_BIN = kernel(
    "dense_dw_bin", Phase.BACKWARD, KernelFamily.DENSE,
    "sign bits of X^T G (sign(0) = +1); the update applies scale 1/sqrt(N_W) and mask |W| <= 1",
    [("x", SAVED_X + (U8,)), ("g", GRADS + (PO2,))], [("dw", BIT)], lower=_lower_dense_dw)
DENSE_DX_F32 = kernel(
    "dense_dx_f32", Phase.BACKWARD, KernelFamily.DENSE,
    "dX = dY W^T (sign(W) for binary layers)",
    [("dy", GRADS), ("w", WEIGHTS)], [("dx", GRADS)], lower=_lower_dense_dx,
    magnitude=_magnitude_dx)
DENSE_DX_PO2 = kernel(
    "dense_dx_po2", Phase.BACKWARD, KernelFamily.DENSE,
    "dX = Q sign(W)^T with PO2 Q: sums of signed powers of two",
    [("q", PO2), ("bias", I32), ("w", WEIGHTS)], [("dx", GRADS)], lower=_lower_dense_dx,
    magnitude=_magnitude_dx)

WEIGHT_KERNELS = WeightKernels(
    fwd_xnor=DENSE_FWD_XNOR, fwd_signw=DENSE_FWD_SIGNW, fwd_f32=DENSE_FWD_F32,
    dw_f32=DENSE_DW_F32, dw_po2=DENSE_DW_PO2, dw_bin=DENSE_DW_BIN, dx_f32=DENSE_DX_F32,
    dx_po2=DENSE_DX_PO2, geometry=_geometry, packed_weights=_packed_weights,
    fwd_u8=DENSE_FWD_U8, u8_attrs=_u8_attrs)
KERNELS = WEIGHT_KERNELS.all + weights.KERNELS     # + the weight-layer kernels conv shares


# ---- numpy reference --------------------------------------------------------------------------

def _u8_channels(run: RefRun, lay: Layer):
    """(u int64 [B, K], float32 a_c and b_c per input, P) of the integer first layer."""
    a, b = (np.float32(np.asarray(v, np.float64)) for v in run.cfg.input_affine)
    u = run.pixels.reshape(len(run.pixels), -1).astype(np.int64)
    return u, a, b, u.shape[1] // len(a)


def _ref_forward_u8(run: RefRun, lay: Layer) -> np.ndarray:
    """The integer first layer exactly as dense_fwd_u8 computes it: per channel an exact integer
    dot product and column sum of sign(W), then float32 a_c * d + b_c * s summed over c in order."""
    u, a, b, p = _u8_channels(run, lay)
    s = np.where(run.param(lay, "W") >= 0, 1, -1).astype(np.int64)
    y = None
    for c in range(len(a)):
        d = u[:, c * p:(c + 1) * p] @ s[c * p:(c + 1) * p]
        cs = s[c * p:(c + 1) * p].sum(axis=0)
        t = a[c] * d.astype(np.float32) + b[c] * cs.astype(np.float32)
        y = t if y is None else y + t
    return y.astype(run.dtype)


def _dw_u8(run: RefRun, lay: Layer, q: np.ndarray) -> np.ndarray:
    """dense_dw_bin_u8's value (its sign is the bit): a_c * S1 + b_c * S0 in float32 with
    S1 = U^T Q and S0 = sum of Q over the batch, exact integers, Q = q * 2^(8 + bias)."""
    u, a, b, p = _u8_channels(run, lay)
    bias = int(run.out[f"{lay.name}.po2_bias"])
    qi = np.rint(np.asarray(q, np.float64) * 2.0 ** (8 + bias)).astype(np.int64)
    s1, s0 = u.T @ qi, qi.sum(axis=0)
    rows = np.arange(u.shape[1]) // p
    return a[rows, None] * s1.astype(np.float32) + b[rows, None] * s0.astype(np.float32)


def _ref_forward(run: RefRun, lay: Layer, x: np.ndarray) -> np.ndarray:
    x2 = x.reshape(len(x), -1)
    if run.pixels is not None and lay.name == u8_input_layer(run.graph).name:
        y = _ref_forward_u8(run, lay)
        if "b" in lay.params:
            y = y + run.param(lay, "b")
        if run.training:
            run.saved[lay.name] = {"x": None, "u8": True}
        return y
    y = matmul(x2, run.weight(lay))
    if "b" in lay.params:
        y = y + run.param(lay, "b")
    if run.training:
        run.saved[lay.name] = {"x": save_weight_input(run, lay, x2)}
    return y


def _ref_backward(run: RefRun, lay: Layer, dy: np.ndarray, need) -> list:
    x = run.saved[lay.name]["x"]
    u8 = run.saved[lay.name].get("u8")
    q = weight_grads(run, lay, dy, x, dw_of=(lambda q: _dw_u8(run, lay, q)) if u8 else None)
    if not need[0]:
        return [None]
    dx = matmul(q, run.weight(lay).T)
    return [dx.reshape((len(dy),) + run.graph.shape_of(lay.inputs[0]))]


REFERENCE_FORWARD: dict = {LayerKind.DENSE: _ref_forward}
REFERENCE_BACKWARD: dict = {LayerKind.DENSE: _ref_backward}


# ---- export -----------------------------------------------------------------------------------

def _export(em: Emitter, lay: Layer, xs: list[str], out: str) -> None:
    # the IR's dense flattens its input implicitly (reference: x.reshape(B, -1)); Gemm is 2-D
    x = em.flat(xs[0], lay.inputs[0], out)
    em.node("Gemm", [x, em.weight(lay)] + em.bias(lay), out)


EXPORT: dict = {LayerKind.DENSE: _export}


FAMILY = OpFamily(
    name="dense", doc=__doc__, layers=LAYER_SPECS, onnx=ONNX, kernels=KERNELS, forward=FORWARD,
    backward=BACKWARD, reference_forward=REFERENCE_FORWARD, reference_backward=REFERENCE_BACKWARD,
    export=EXPORT)
