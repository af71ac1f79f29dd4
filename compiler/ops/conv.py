"""2-D convolution (ONNX Conv): packed XNOR, sign-select and f32 forward; PO2/f32/1-bit dW and dX."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..ir import Layer, LayerKind
from ..lower import (CONV_SCRATCH_BYTES, Call, LowerCtx, Split, bias_operand, bit_rows_unit,
                     conv_batch_split, conv_dw_direct_plan, conv_dw_plan, conv_dx_plan, lcm_unit,
                     conv_fwd_plan, conv_geom, instance, pm1_input, words64)
from ..onnx_values import Act, node_attrs, node_label, printable, short
from ..schedule_ir import DType, Step
from . import gconv, weights
from .base import (BIT, F32, GRADS, I32, PO2, SAVED_X, STATE, WEIGHTS, Bits, KernelFamily,
                   LayerSpec, OnnxOp, OpFamily, Phase, kernel, out_hw, pads4, pair)
from .exportctx import Emitter
from .refctx import RefRun
from .refmath import (chan, conv_magnitude, crop, matmul, pad, save_weight_input, unwindow,
                      weight_grads, windows)
from .weights import WeightKernels

if TYPE_CHECKING:
    from ..schedule import ScheduleBuilder


# ---- ONNX import ------------------------------------------------------------------------------

def _op_conv(imp, node, vals):
    x = imp._nchw(imp._act(vals[0], node), node)
    at = node_attrs(node)
    group = int(at.get("group", 1))        # > 1: grouped/depthwise (compiler/ops/gconv.py)
    if any(d != 1 for d in at.get("dilations", [1, 1])):
        imp._fail(node, f"dilations {short(at['dilations'])} are not supported")
    if len(x.shape) != 3:
        imp._fail(node, f"reads an activation of per-sample shape {list(x.shape)}; "
                  "expected (C, H, W)")
    if group < 1:
        imp._fail(node, f"group={group} is not supported (group must be a positive integer)")
    W, binary, scale = weights.weight(imp, vals[1], node, x)
    kind, extra = (LayerKind.CONV, {}) if group == 1 else \
        gconv.group_layer(imp, node, x, W, group)
    if W.ndim != 4 or W.shape[1] * group != x.shape[0]:
        imp._fail(node, f"weight shape {list(W.shape)} does not fit input channels "
                  f"{x.shape[0]}", hint="ONNX Conv: W is [Cout, Cin/group, kh, kw]")
    k = W.shape[2:]
    if "kernel_shape" in at and tuple(at["kernel_shape"]) != tuple(k):
        imp._fail(node, f"kernel_shape {short(at['kernel_shape'])} != weight shape "
                  f"{list(k)}")
    strides, pads, hw = window_geometry(imp, node, x.shape[1:], k, pool=False)
    bias = None
    if len(vals) > 2 and vals[2] is not None:
        bias = np.asarray(imp._const(vals[2], node, "the bias"), np.float64).ravel()
        if bias.size != W.shape[0]:
            imp._fail(node, f"bias of {bias.size} values does not match {W.shape[0]} "
                      f"output channels", hint="ONNX Conv takes one bias per output channel")
    params = {"W": imp._param(W, node, "the weight")}
    if bias is not None and not binary:
        params["b"] = imp._param(bias, node, "the bias")
        bias = None
    name = imp._add(kind, [x.layer], (W.shape[0], *hw), node_label(node),
                    attrs={"binary": binary, "strides": strides, "pads": pads, **extra},
                    params=params)
    y = Act(name, (W.shape[0], *hw))
    return weights.layer_affine(imp, y, node, weights.out_scale(imp, scale, node, 0), bias)


def window_geometry(imp, node, hw, k, *, pool: bool):
    at = node_attrs(node)
    strides = tuple(int(s) for s in at.get("strides", [1, 1]))
    auto = str(at.get("auto_pad", "NOTSET"))
    if len(k) != 2 or len(strides) != 2:
        imp._fail(node, "only 2-D kernels are supported")
    if min(k) < 1 or min(strides) < 1:
        imp._fail(node, f"kernel {short(k)} / strides {short(strides)} must be positive",
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
            imp._fail(node, f"pads {short(pads)} are not 4 non-negative numbers",
                      hint="bnnc reads 2-D pads (top, left, bottom, right)")
    else:
        imp._fail(node, f"auto_pad {printable(auto, 20)} is not supported")
    if pool and any(pads[i] >= k[i % 2] for i in range(4)):
        # a window of padding only has no max / an empty average (onnxruntime refuses it too)
        imp._fail(node, f"pads {list(pads)} are not smaller than the kernel {list(k)}")
    out = []
    for i in range(2):
        span = hw[i] + pads[i] + pads[i + 2] - k[i]
        if span < 0:
            imp._fail(node, f"kernel {list(k)} is larger than the padded input {list(hw)}")
        o = span // strides[i] + 1
        if pool and at.get("ceil_mode", 0) and span % strides[i]:
            imp._fail(node, "ceil_mode=1 changes the output size here",
                      hint="bnnc pools with floor rounding; pad the input instead")
        out.append(o)
    return strides, pads, tuple(out)


ONNX = {
    "Conv": OnnxOp(_op_conv, (2, 3)),
}


# ---- training schedule ------------------------------------------------------------------------

def _geometry(b: ScheduleBuilder, lay: Layer) -> dict:
    w = lay.params["W"].shape
    cin, h, wd = b.g.shape_of(lay.inputs[0])
    return dict(cin=cin, h=h, w=wd, cout=w[0], kh=w[2], kw=w[3],
                strides=pair(lay.attrs["strides"]), pads=pads4(lay.attrs["pads"]),
                oh=lay.shape[1], ow=lay.shape[2])


def _packed_weights(b: ScheduleBuilder, lay: Layer) -> tuple[int, str]:
    """(cout, kh, kw) rows of ceil(Cin/64) words."""
    w = lay.params["W"].shape
    rows, words = w[0] * w[2] * w[3], words64(w[1])
    return rows * words * 8, f"bits: {rows} rows (cout, kh, kw) x {words} words64 over cin"


def _check_shapes(lay: Layer, ins) -> str | None:
    w = lay.params["W"].shape
    if len(ins[0]) != 3 or len(w) != 4 or w[1] != ins[0][0]:
        bad = f"W {list(w)} does not fit input {ins[0]}"
    else:
        exp = (w[0],) + out_hw(ins[0], w[2:], lay.attrs["strides"], lay.attrs["pads"])
        bad = None if exp == lay.shape else f"output {lay.shape}, expected {exp}"
    return weights.bias_shape(lay) or bad


def _forward(b: ScheduleBuilder, lay: Layer) -> None:
    weights.forward(b, lay, WEIGHT_KERNELS)


def _backward(b: ScheduleBuilder, lay: Layer) -> None:
    weights.backward(b, lay, WEIGHT_KERNELS)


FORWARD = {LayerKind.CONV: _forward}
BACKWARD = {LayerKind.CONV: _backward}
LAYER_SPECS = (LayerSpec(LayerKind.CONV, "conv", attrs=("binary", "strides", "pads"),
                         params=("W",), optional_params=("b",), check_shapes=_check_shapes,
                         trainable=True, bits=Bits.READ, packed_weights=_packed_weights),)


# ---- kernels: contract (dtypes, in-place) + C lowering -----------------------------------------

def _fwd_plan(a: dict, kind: str) -> dict | None:
    """lower.conv_fwd_plan; a real-input strided conv (a ResNet stem) takes the direct rows too,
    without the unrolled interior rows (stride 1 only): `strided` reads input column ox * sw."""
    if kind in ("signw", "f32") and tuple(a["strides"]) != (1, 1):
        plan = conv_fwd_plan(dict(a, strides=(1, 1)), kind)
        return dict(wn=plan["wn"], ow=a["ow"], unroll=False, strided=True) if plan else None
    return conv_fwd_plan(a, kind)


def _lower_conv_fwd(step: Step, ctx: LowerCtx) -> Call:
    x, w = step.inputs[0], step.inputs[1]
    ops, bptr = bias_operand(step, ctx, 2)
    y = step.outputs[0]
    wops = {} if step.kernel is CONV_FWD_XNOR else {"w": w}
    latent = ctx.t(w).dtype is not DType.BIT
    kind = {CONV_FWD_XNOR: "bits", CONV_FWD_F32: "f32"}.get(step.kernel, "signw")
    if kind == "signw" and latent and pm1_input(ctx, x):
        kind = "pm1"      # +-1 input: XNOR-popcount, the same exact integer sums
    plan = _fwd_plan(step.attrs, kind) if latent or kind == "bits" else None
    macro = f"conv_fwd_fast_{kind}" if plan else None
    inst = instance(step, ctx, macro, operands={**wops, **ops}, bias=bool(ops), **(plan or {}))
    return Call(inst, [ctx.ptr(x), ctx.ptr(w), bptr, ctx.ptr(y), "&g"],
                [conv_geom(step.attrs)],
                conv_batch_split(step.attrs, {0: "bits" if ctx.t(x).dtype is DType.BIT else "in",
                                               3: "out"}))


def _fr_split(a: dict, plan: dict, out_bits: bool) -> Split:
    """A table-lookup dW kernel's threads take whole blocks of its output channels (and, for packed
    binary dW, no 64-bit word of another thread's channels)."""
    unit = lcm_unit(plan["kb"], bit_rows_unit(a["cin"] * a["kh"] * a["kw"]) if out_bits else 1)
    return Split(a["cout"], unit, ranged=True)


def _direct_split(a: dict, out_bits: bool) -> Split:
    """conv_dw_direct under --threads: output channels [k0, k1) per thread (each sum over the
    batch keeps its order, so any N gives the same bits); for the binary dW, whole 64-bit words
    of dW's bits per thread."""
    return Split(a["cout"], bit_rows_unit(a["cin"] * a["kh"] * a["kw"]) if out_bits else 1,
                 ranged=True)


def _dw_direct_plan(a: dict) -> dict | None:
    """conv_dw_direct's scratch (lower.conv_dw_direct_plan); the kernel reads its input at
    oy * sh - pt + i, so it serves every stride (a ResNet's 7x7 stride-2 stem too)."""
    return conv_dw_direct_plan(dict(a, strides=(1, 1)))


def _lower_conv_dw(step: Step, ctx: LowerCtx) -> Call:
    x = step.inputs[0]
    a = step.attrs
    kind = "bits" if ctx.t(x).dtype is DType.BIT else "real"
    ops: dict[str, str] = {} if kind == "bits" else {"x": x}
    dw = step.outputs[0]
    decl = [conv_geom(a)]
    # the table-lookup kernel needs x = +-1: packed bits, or an f32 tensor of sign outputs
    xk = "bits" if kind == "bits" else ("pm1" if pm1_input(ctx, x) else None)
    if step.kernel is CONV_DW_BIN:
        g = step.inputs[1]
        po2 = ctx.t(g).dtype is DType.PO2
        if not po2:
            ops["g"] = g
        grad = "int" if po2 else "f32"
        plan = conv_dw_plan(a, exact=po2) if xk else _dw_direct_plan(a)
        macro = ((f"conv_dw_fr_{grad}_{xk}" if xk else "conv_dw_direct_bin") if plan
                 else f"conv_dw_bin_{kind}")
        # packed X and PO2 G where the table-lookup kernel does not apply: the bit-plane path
        bp = dw_bitplane_plan(a) if not plan and po2 and kind == "bits" else {}
        inst = instance(step, ctx, macro, ops, po2=po2,
                        **(dict(plan, out="bin") if plan else bp))
        if plan and xk:
            return Call(inst, [ctx.ptr(x), ctx.ptr(g), ctx.ptr(dw), "&g", 0, a["cout"]], decl,
                        _fr_split(a, plan, True))
        if plan:
            return Call(inst, [ctx.ptr(x), ctx.ptr(g), ctx.ptr(dw), "&g", 0, a["cout"]], decl,
                        _direct_split(a, True))
        return Call(inst, [ctx.ptr(x), ctx.ptr(g), ctx.ptr(dw), "&g"], decl)
    if step.kernel is CONV_DW_PO2:
        q, bias = step.inputs[1], step.inputs[2]
        w = step.inputs[3] if len(step.inputs) > 3 else None
        ops |= {"w": w} if w else {}
        plan = conv_dw_plan(a, exact=False) if xk else _dw_direct_plan(a)
        macro = ((f"conv_dw_fr_po2_{xk}" if xk else "conv_dw_direct_po2") if plan
                 else f"conv_dw_po2_{kind}")
        inst = instance(step, ctx, macro, ops, mask=w is not None,
                        **(dict(plan, out="f32") if plan else {}))
        args = [ctx.ptr(x), ctx.ptr(q), ctx.ptr(bias), ctx.ptr(w) if w else "0", ctx.ptr(dw), "&g"]
        if plan:
            return Call(inst, args + [0, a["cout"]], decl,
                        _fr_split(a, plan, False) if xk else _direct_split(a, False))
        return Call(inst, args, decl)
    dy = step.inputs[1]
    w = step.inputs[2] if len(step.inputs) > 2 else None
    ops["dy"] = dy
    ops |= {"w": w} if w else {}
    plan = conv_dw_plan(a, exact=False) if xk else _dw_direct_plan(a)
    macro = ((f"conv_dw_fr_f32_{xk}" if xk else "conv_dw_direct_f32") if plan
             else f"conv_dw_f32_{kind}")
    inst = instance(step, ctx, macro, ops, mask=w is not None,
                    **(dict(plan, out="f32") if plan else {}))
    args = [ctx.ptr(x), ctx.ptr(dy), ctx.ptr(w) if w else "0", ctx.ptr(dw), "&g"]
    if plan:
        return Call(inst, args + [0, a["cout"]], decl,
                    _fr_split(a, plan, False) if xk else _direct_split(a, False))
    return Call(inst, args, decl)


# reduction words of the bit-plane popcount products at most (BNNC_BP_MAXW, kernels/vector.c.j2)
BP_MAXW = 64


def dx_bitplane_plan(a: dict) -> dict:
    """Scratch (64-bit words) of the PO2 dX's bit-plane path (conv.c.j2 `dx_bitplane`), as kernel
    flags, or {} where it does not apply: the reduction over (tap, output channel) takes more than
    BP_MAXW words, or the scratch would pass CONV_SCRATCH_BYTES. bpt: sign(W) as bit rows (input
    channels in blocks of 64, taps x ceil(Cout / 64) words each); bpr: the planes of kh output rows
    (17 planes of ceil(Cout / 64) words per output pixel); bpa: their per-pixel sums."""
    wk, taps = words64(a["cout"]), a["kh"] * a["kw"]
    words = taps * wk
    bpt, bpr, bpa = words64(a["cin"]) * words * 64, a["kh"] * a["ow"] * 17 * wk, a["kh"] * a["ow"]
    scratch = 8 * (bpt + bpr + 17 * BP_MAXW + 64) + 12 * bpa
    if words > BP_MAXW or scratch > CONV_SCRATCH_BYTES:
        return {}
    return dict(bpt=bpt, bpr=bpr, bpa=bpa)


def dw_bitplane_plan(a: dict) -> dict:
    """The binary dW's bit-plane path (conv.c.j2 `dw_bitplane`) as kernel flags, or {} where its
    stack scratch would pass CONV_SCRATCH_BYTES: planes of 64 output channels over 512 positions
    (64 x 17 x 8 words), 64 bit rows over them, 64 x 64 int64 sums and one int64 correction per
    output channel and tap (bptaps: the taps)."""
    taps = a["kh"] * a["kw"]
    scratch = 8 * (64 * 17 * 8 + 8 * 64 + 64 * 64 + 64 * taps + 2 * 64) + 4 * 64
    return {"bptaps": taps} if scratch <= CONV_SCRATCH_BYTES else {}


def _lower_conv_dx(step: Step, ctx: LowerCtx) -> Call:
    dx = step.outputs[0]
    a = step.attrs
    decl = [conv_geom(a)]
    plan = conv_dx_plan(a) if a["binary"] else None
    grad = "po2" if step.kernel is CONV_DX_PO2 else "f32"
    macro = f"conv_dx_fr_{grad}" if plan else None
    # threads take whole samples (groups of 4 where the lookup's lanes are 4 samples)
    split = conv_batch_split(a, {0: "out", 3 if grad == "po2" else 2: "in"},
                             unit=4 if plan and plan["mode"] == "img" else 1)
    if step.kernel is CONV_DX_PO2:
        q, bias, w = step.inputs
        # the bit-plane popcount path where the table-lookup kernel does not apply (strides > 1,
        # or its scratch too large); on stride 1 the table lookup measured faster (README,
        # "Bit-plane PO2 products")
        inst = instance(step, ctx, macro, operands={"w": w, "dx": dx}, binary=True,
                        **(plan or dx_bitplane_plan(a)))
        return Call(inst, [ctx.ptr(q), ctx.ptr(bias), ctx.ptr(w), ctx.ptr(dx),
                           "&g"], decl, split)
    dy, w = step.inputs
    inst = instance(step, ctx, macro, operands={"dy": dy, "w": w, "dx": dx},
                    binary=bool(a["binary"]), **(plan or {}))
    return Call(inst, [ctx.ptr(dy), ctx.ptr(w), ctx.ptr(dx), "&g"], decl, split)


def _magnitude(kind: str):
    def magnitude(step: Step, name: str, mag) -> np.ndarray:
        return conv_magnitude(kind, step, mag)
    return magnitude


CONV_FWD_XNOR = kernel(
    "conv_fwd_xnor", Phase.FORWARD, KernelFamily.CONV,
    "Y = X * Wb: XNOR-popcount over NHWC-packed channels per tap, padded taps add 0 (+ b)",
    [("x", BIT), ("wb", BIT), ("b?", STATE)], [("y", F32)], lower=_lower_conv_fwd)
CONV_FWD_SIGNW = kernel(
    "conv_fwd_signw", Phase.FORWARD, KernelFamily.CONV,
    "Y = X * sign(W), real NCHW X, signs read from W (+ b)",
    [("x", F32), ("w", WEIGHTS), ("b?", STATE)], [("y", F32)], lower=_lower_conv_fwd,
    magnitude=_magnitude("fwd"))
CONV_FWD_F32 = kernel(
    "conv_fwd_f32", Phase.FORWARD, KernelFamily.CONV, "Y = X * W (+ b), real layer, NCHW",
    [("x", F32), ("w", STATE), ("b?", STATE)], [("y", F32)], lower=_lower_conv_fwd,
    magnitude=_magnitude("fwd"))
CONV_DW_F32 = kernel(
    "conv_dw_f32", Phase.BACKWARD, KernelFamily.CONV,
    "dW = correlation of X and dY over n,h,w (* 1[|W| <= 1] if W)",
    [("x", SAVED_X), ("dy", GRADS), ("w?", STATE)], [("dw", F32)], lower=_lower_conv_dw,
    magnitude=_magnitude("dw"))
CONV_DW_PO2 = kernel(
    "conv_dw_po2", Phase.BACKWARD, KernelFamily.CONV,
    "dW = correlation of X and PO2 Q over n,h,w (* 1[|W| <= 1] if W)",
    [("x", SAVED_X), ("q", PO2), ("bias", I32), ("w?", STATE)], [("dw", F32)],
    lower=_lower_conv_dw, magnitude=_magnitude("dw"))
CONV_DW_BIN = kernel(
    "conv_dw_bin", Phase.BACKWARD, KernelFamily.CONV,
    "sign bits of the X/G correlation (sign(0) = +1); scale and mask applied by the update",
    [("x", SAVED_X), ("g", GRADS + (PO2,))], [("dw", BIT)], lower=_lower_conv_dw)
CONV_DX_F32 = kernel(
    "conv_dx_f32", Phase.BACKWARD, KernelFamily.CONV,
    "dX = full correlation of dY with rotated W (sign(W) if binary)",
    [("dy", GRADS), ("w", WEIGHTS)], [("dx", GRADS)], lower=_lower_conv_dx,
    magnitude=_magnitude("dx"))
CONV_DX_PO2 = kernel(
    "conv_dx_po2", Phase.BACKWARD, KernelFamily.CONV,
    "dX = full correlation of PO2 Q with rotated sign(W)",
    [("q", PO2), ("bias", I32), ("w", WEIGHTS)], [("dx", GRADS)], lower=_lower_conv_dx,
    magnitude=_magnitude("dx"))

WEIGHT_KERNELS = WeightKernels(
    fwd_xnor=CONV_FWD_XNOR, fwd_signw=CONV_FWD_SIGNW, fwd_f32=CONV_FWD_F32, dw_f32=CONV_DW_F32,
    dw_po2=CONV_DW_PO2, dw_bin=CONV_DW_BIN, dx_f32=CONV_DX_F32, dx_po2=CONV_DX_PO2,
    geometry=_geometry, packed_weights=_packed_weights)
KERNELS = WEIGHT_KERNELS.all


# ---- numpy reference --------------------------------------------------------------------------

def im2col(lay: Layer, x: np.ndarray) -> np.ndarray:
    """(B, Cin, H, W) -> (B, Ho, Wo, Cin*kh*kw) patches of the zero-padded input."""
    kh, kw = lay.params["W"].shape[2:]
    sh, sw = (int(s) for s in lay.attrs["strides"])
    win = windows(pad(x, lay.attrs["pads"]), kh, kw, sh, sw)      # (B, Cin, Ho, Wo, kh, kw)
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(win.shape[0], win.shape[2], win.shape[3], -1)


def _ref_forward(run: RefRun, lay: Layer, x: np.ndarray) -> np.ndarray:
    w = run.weight(lay)
    cols = im2col(lay, x)
    y = matmul(cols, w.reshape(w.shape[0], -1).T).transpose(0, 3, 1, 2)
    if "b" in lay.params:
        y = y + chan(run.param(lay, "b"), 4)
    if run.training:
        run.saved[lay.name] = {"x": save_weight_input(run, lay, x)}
    return np.ascontiguousarray(y)


def _ref_backward(run: RefRun, lay: Layer, dy: np.ndarray, need) -> list:
    x = run.saved[lay.name]["x"]
    w = run.weight(lay)
    cout, cin, kh, kw = w.shape
    cols = im2col(lay, x)                                       # (B, Ho, Wo, K)
    dy_mat = dy.transpose(0, 2, 3, 1).reshape(-1, cout)
    q = weight_grads(run, lay, dy_mat, cols.reshape(-1, cols.shape[-1]))
    if not need[0]:
        return [None]
    b, ho, wo = dy.shape[0], dy.shape[2], dy.shape[3]
    dcols = matmul(q, w.reshape(cout, -1)).reshape(b, ho, wo, cin, kh, kw)
    dcols = dcols.transpose(0, 3, 1, 2, 4, 5)
    pads = lay.attrs["pads"]
    padded = pad(np.zeros((1, 1) + x.shape[2:], x.dtype), pads).shape[2:]
    sh, sw = (int(s) for s in lay.attrs["strides"])
    return [crop(unwindow(dcols, (b, cin) + padded, sh, sw), pads)]


REFERENCE_FORWARD: dict = {LayerKind.CONV: _ref_forward}
REFERENCE_BACKWARD: dict = {LayerKind.CONV: _ref_backward}


# ---- export -----------------------------------------------------------------------------------

def _export(em: Emitter, lay: Layer, xs: list[str], out: str) -> None:
    w = lay.params["W"]
    em.node("Conv", [xs[0], em.weight(lay)] + em.bias(lay), out,
            kernel_shape=list(w.shape[2:]), strides=list(lay.attrs["strides"]),
            pads=list(lay.attrs["pads"]))


EXPORT: dict = {LayerKind.CONV: _export}


FAMILY = OpFamily(
    name="conv", doc=__doc__, layers=LAYER_SPECS, onnx=ONNX, kernels=KERNELS, forward=FORWARD,
    backward=BACKWARD, reference_forward=REFERENCE_FORWARD, reference_backward=REFERENCE_BACKWARD,
    export=EXPORT)
