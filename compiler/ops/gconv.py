"""Grouped and depthwise 2-D convolution (ONNX Conv with group > 1), binary and real.

Layer: `LayerKind.GROUP_CONV`, attrs `group`, `strides` (sh, sw), `pads` (top, left, bottom,
right), `binary`; params W [Cout, Cin/group, kh, kw] and, for real layers, an optional b [Cout].
Output channel k reads the input channels of its group, [gi * Cin/group, (gi + 1) * Cin/group) with
gi = k // (Cout/group); depthwise is group = Cin. Everything else is conv's semantics (correlation,
zero padding, floor output size, sign(W) with sign(0) = +1 for binary layers).

Training (ALGORITHM.md, the same policy as a group-1 conv): the forward multiplies a real (f32)
input -- a grouped layer's input is never bit-packed (its `LayerSpec.bits` is `Bits.NONE`, so the
schedule's packing analysis keeps the activation f32; per-group channel counts are small, 1 for
depthwise, and an XNOR kernel would waste most of every word). What the layer keeps for dW:
under `save_bits`, a binary layer's +-1 input (a SIGN output, maybe through max pooling) is packed
to 1 bit (`<layer>.x_saved`, rows layout, by `sign_fwd_pack`), a real layer's input (or a binary
layer's real input with a gradient upstream) is rounded to f16, a first binary layer's real input
is kept as given; without `save_bits` the f32 input is kept. Backward: conv's weight-layer rule
with this family's kernels: [bias_grad], [po2_quantize], dW (f32, from PO2 codes, or 1-bit under
`binary_dw`), dX, the update (Adam/SGD, Bop on packed weights).

Kernels (templates/kernels/gconv.c.j2): portable C loops, any stride and padding, no scratch:
`gconv_fwd`, `gconv_dw_f32`/`_po2`/`_bin`, `gconv_dx_f32`/`_po2`; every index is computed in
size_t from in-bounds loop variables. The 1-bit dW from packed +-1 input and PO2 codes sums exactly
in int64 (its sign is the reference's); float sums elsewhere, one fixed order per output. Bop's
packed weights use the conv layout at Cin/group channels: (cout, kh, kw) rows of
ceil(Cin/group / 64) words.

Reference: per group, the conv reference's im2col products (float64 sums rounded once); dX sums
each tap's float32 partial in tap order, like the C.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..ir import Layer, LayerKind, tname
from ..lower import Call, LowerCtx, bias_operand, geom_decl, instance, words64
from ..schedule_ir import DType, Role, Step
from . import weights
from .activation import SIGN_FWD_PACK
from .base import (BIT, F16, F32, GRADS, I32, PO2, SAVED_X, STATE, WEIGHTS, KernelFamily,
                   LayerSpec, OpFamily, Phase, kernel, out_hw, pads4, pair, prod)
from .exportctx import Emitter
from .refctx import RefRun, pm1_output
from .refmath import (abs_conv_dx, abs_windows, crop, matmul, pad, save_weight_input, unwindow,
                      weight_grads, windows)
from .weights import CAST_F16, WeightKernels

if TYPE_CHECKING:
    from ..schedule import ScheduleBuilder

GK = KernelFamily.GCONV


# ---- ONNX import ------------------------------------------------------------------------------

def group_layer(imp, node, x, W, group: int) -> tuple[LayerKind, dict]:
    """The ONNX Conv handler (conv family) asks here when group > 1: -> the layer kind and the
    attrs to add to the ones it builds for group 1, after checking W [Cout, Cin/group, kh, kw]
    against the input activation `x` (C, H, W)."""
    cin = x.shape[0]
    if W.ndim != 4 or cin % group or W.shape[0] % group or W.shape[1] * group != cin:
        imp._fail(node, f"weight shape {list(W.shape)} with group={group} does not fit "
                  f"{cin} input channels",
                  hint="ONNX Conv: W is [Cout, Cin/group, kh, kw], Cin and Cout divisible by group")
    return LayerKind.GROUP_CONV, {"group": int(group)}


# ---- kernels: contract (dtypes, in-place) + C lowering -----------------------------------------

def _decl(a: dict) -> list[str]:
    (sh, sw), (pt, pl) = a["strides"], a["pads"][:2]
    return [geom_decl(a["batch"], a["cin"], a["h"], a["w"], a["cout"], a["kh"], a["kw"], sh, sw,
                      pt, pl, a["oh"], a["ow"], words64(a["cin"] // a["group"]))]


def _lower_fwd(step: Step, ctx: LowerCtx) -> Call:
    a = step.attrs
    x, w = step.inputs[0], step.inputs[1]
    ops, bptr = bias_operand(step, ctx, 2)
    inst = instance(step, ctx, operands={"w": w, **ops}, bias=bool(ops), binary=bool(a["binary"]))
    return Call(inst, [ctx.ptr(x), ctx.ptr(w), bptr, ctx.ptr(step.outputs[0]), "&g",
                       a["group"]], _decl(a))


def _lower_dw(step: Step, ctx: LowerCtx) -> Call:
    a = step.attrs
    x, dw = step.inputs[0], step.outputs[0]
    xk = "bits" if ctx.t(x).dtype is DType.BIT else "real"
    ops: dict[str, str] = {} if xk == "bits" else {"x": x}
    tail = [ctx.ptr(dw), "&g", a["group"]]
    if step.kernel.name == "gconv_dw_bin":
        g = step.inputs[1]
        po2 = ctx.t(g).dtype is DType.PO2
        ops |= {} if po2 else {"g": g}
        inst = instance(step, ctx, operands=ops, x=xk, po2=po2)
        return Call(inst, [ctx.ptr(x), ctx.ptr(g)] + tail, _decl(a))
    po2 = step.kernel.name == "gconv_dw_po2"
    grads = step.inputs[1:3] if po2 else step.inputs[1:2]
    w = step.inputs[len(grads) + 1] if len(step.inputs) > len(grads) + 1 else None
    ops |= ({} if po2 else {"dy": grads[0]}) | ({"w": w} if w else {})
    inst = instance(step, ctx, "gconv_dw", ops, x=xk, grad="po2" if po2 else "f32",
                    mask=w is not None)
    return Call(inst, [ctx.ptr(x)] + [ctx.ptr(t) for t in grads]
                + [ctx.ptr(w) if w else "0"] + tail, _decl(a))


def _lower_dx(step: Step, ctx: LowerCtx) -> Call:
    *grads, w = step.inputs
    dx = step.outputs[0]
    po2 = step.kernel.name == "gconv_dx_po2"
    ops = ({} if po2 else {"dy": grads[0]}) | {"w": w, "dx": dx}
    inst = instance(step, ctx, "gconv_dx", ops, grad="po2" if po2 else "f32",
                    binary=bool(step.attrs["binary"]))
    return Call(inst, [ctx.ptr(t) for t in grads] + [ctx.ptr(w), ctx.ptr(dx), "&g",
                                                           step.attrs["group"]], _decl(step.attrs))


def _magnitude(kind: str):
    """Sum of |terms| behind each output of the grouped forward ("fwd"), dW ("dw") or dX ("dx"):
    the conv family's measure, group by group (runtime/check.py's tolerance)."""
    def magnitude(step: Step, name: str, mag) -> np.ndarray:
        a, ins, g = step.attrs, step.inputs, int(step.attrs["group"])
        cg, kg = a["cin"] // g, a["cout"] // g
        if kind == "dx":
            dy, w = mag.value(ins[0]), mag.weight(ins[-1])
            parts = [abs_conv_dx(dy[:, i * kg:(i + 1) * kg], w[i * kg:(i + 1) * kg], a)
                     for i in range(g)]
            return np.concatenate(parts, axis=1)
        win = abs_windows(mag.value(ins[0]), a)
        if kind == "fwd":
            w = mag.weight(ins[1])
            return np.concatenate([np.einsum("bcyxij,kcij->bkyx", win[:, i * cg:(i + 1) * cg],
                                             w[i * kg:(i + 1) * kg]) for i in range(g)], axis=1)
        dy = mag.value(ins[1])
        return np.concatenate([np.einsum("bcyxij,bkyx->kcij", win[:, i * cg:(i + 1) * cg],
                                         dy[:, i * kg:(i + 1) * kg]) for i in range(g)], axis=0)
    return magnitude


_B = Phase.BACKWARD
GCONV_FWD = kernel(
    "gconv_fwd", Phase.FORWARD, GK, "grouped Y = X * W (sign(W) for binary layers; + b), real X",
    [("x", F32), ("w", WEIGHTS), ("b?", STATE)], [("y", F32)], lower=_lower_fwd,
    magnitude=_magnitude("fwd"))
GCONV_DW = {
    "f32": kernel("gconv_dw_f32", _B, GK, "grouped dW = correlation of X and dY (* 1[|W| <= 1])",
                  [("x", SAVED_X), ("dy", GRADS), ("w?", STATE)], [("dw", F32)], lower=_lower_dw,
                  magnitude=_magnitude("dw")),
    "po2": kernel("gconv_dw_po2", _B, GK, "grouped dW = correlation of X and PO2 Q (* 1[|W| <= 1])",
                  [("x", SAVED_X), ("q", PO2), ("bias", I32), ("w?", STATE)], [("dw", F32)],
                  lower=_lower_dw, magnitude=_magnitude("dw")),
    "bin": kernel("gconv_dw_bin", _B, GK,
                  "sign bits of the grouped X/G correlation; scale and mask applied by the update",
                  [("x", SAVED_X), ("g", GRADS + (PO2,))], [("dw", BIT)], lower=_lower_dw),
}
GCONV_DX = {
    "f32": kernel("gconv_dx_f32", _B, GK, "grouped dX = full correlation of dY with rotated W",
                  [("dy", GRADS), ("w", WEIGHTS)], [("dx", GRADS)], lower=_lower_dx,
                  magnitude=_magnitude("dx")),
    "po2": kernel("gconv_dx_po2", _B, GK, "grouped dX = full correlation of PO2 Q, rotated sign(W)",
                  [("q", PO2), ("bias", I32), ("w", WEIGHTS)], [("dx", GRADS)], lower=_lower_dx,
                  magnitude=_magnitude("dx")),
}
KERNELS = (GCONV_FWD, *GCONV_DW.values(), *GCONV_DX.values())


# ---- training schedule ------------------------------------------------------------------------

def _check_shapes(lay: Layer, ins) -> str | None:
    w, g = lay.params["W"].shape, int(lay.attrs["group"])
    if len(ins[0]) != 3 or len(w) != 4 or g < 1 or w[0] % g or w[1] * g != ins[0][0]:
        return f"W {list(w)} with group {g} does not fit input {ins[0]}"
    exp = (w[0],) + out_hw(ins[0], w[2:], lay.attrs["strides"], lay.attrs["pads"])
    return weights.bias_shape(lay) or (None if exp == lay.shape else
                                       f"output {lay.shape}, expected {exp}")


def _packed_weights(b: ScheduleBuilder, lay: Layer) -> tuple[int, str]:
    """Bop's packed W: (cout, kh, kw) rows of words over the group's Cin/group channels."""
    cout, cig, kh, kw = lay.params["W"].shape
    rows, words = cout * kh * kw, words64(cig)
    return rows * words * 8, f"bits: {rows} rows (cout, kh, kw) x {words} words64 over cin/group"


def _geometry(b: ScheduleBuilder, lay: Layer) -> dict:
    """conv's step attrs plus `group`."""
    cin, h, wd = b.g.shape_of(lay.inputs[0])
    cout, _, kh, kw = lay.params["W"].shape
    return dict(group=int(lay.attrs["group"]), cin=cin, h=h, w=wd, cout=cout, kh=kh, kw=kw,
                strides=pair(lay.attrs["strides"]), pads=pads4(lay.attrs["pads"]),
                oh=lay.shape[1], ow=lay.shape[2])


# the weight-layer roles (compiler/ops/weights.py): one forward kernel whatever the input, as a
# grouped layer never reads packed bits
WEIGHT_KERNELS = WeightKernels(
    fwd_xnor=GCONV_FWD, fwd_signw=GCONV_FWD, fwd_f32=GCONV_FWD, dw_f32=GCONV_DW["f32"],
    dw_po2=GCONV_DW["po2"], dw_bin=GCONV_DW["bin"], dx_f32=GCONV_DX["f32"],
    dx_po2=GCONV_DX["po2"], geometry=_geometry, packed_weights=_packed_weights)


def _forward(b: ScheduleBuilder, lay: Layer) -> None:
    """Y = gconv_fwd(X, W[, b]); then what the backward keeps of X: 1 bit of a binary layer's +-1
    input under save_bits (ALGORITHM.md), else as a group-1 conv keeps it."""
    n, src = lay.name, lay.inputs[0]
    x = b.act[src]
    bias = (tname(n, "b"),) if "b" in lay.params else ()
    b.emit(GCONV_FWD, n, (x, tname(n, "W")) + bias, (b.out_f32(lay),),
           **weights.geometry(b, lay, WEIGHT_KERNELS))
    if n not in b.has_dout or not b.trains(lay, "W"):
        return      # no dW: nothing of the input is kept
    shape = b.tensors[x].shape
    if lay.binary and b.cfg.save_bits and pm1_output(b.g, src):
        xs = b.bits(tname(n, "x_saved"), shape, Role.SCRATCH, "flat")
        b.emit(SIGN_FWD_PACK, n, (x,), (xs,), batch=b.B, size=prod(shape[1:]))
    elif b.cfg.save_bits and (not lay.binary or b.ng[src]):
        xs = b.new_act(tname(n, "x_saved"), F16, shape, Role.SAVED)
        b.emit(CAST_F16, n, (x,), (xs,))
    else:
        xs = x
    b.saved_x[n] = xs


def _backward(b: ScheduleBuilder, lay: Layer) -> None:
    weights.backward(b, lay, WEIGHT_KERNELS)


# ---- numpy reference --------------------------------------------------------------------------

def _group_cols(lay: Layer, x: np.ndarray) -> np.ndarray:
    """(B, Cin, H, W) -> (G, B*Ho*Wo, Cin/G*kh*kw): each group's im2col rows (n, y, x)."""
    g = int(lay.attrs["group"])
    kh, kw = lay.params["W"].shape[2:]
    sh, sw = (int(s) for s in lay.attrs["strides"])
    win = windows(pad(x, lay.attrs["pads"]), kh, kw, sh, sw)     # (B, Cin, Ho, Wo, kh, kw)
    bsz, cin, ho, wo = win.shape[:4]
    win = win.reshape(bsz, g, cin // g, ho, wo, kh, kw).transpose(1, 0, 3, 4, 2, 5, 6)
    return win.reshape(g, bsz * ho * wo, -1)


def _ref_forward(run: RefRun, lay: Layer, x: np.ndarray) -> np.ndarray:
    w = run.weight(lay)
    g = int(lay.attrs["group"])
    cog = w.shape[0] // g
    cols = _group_cols(lay, x)
    y = np.concatenate([matmul(cols[i], w[i * cog:(i + 1) * cog].reshape(cog, -1).T)
                        for i in range(g)], axis=1)                 # (B*Ho*Wo, Cout)
    if "b" in lay.params:
        y = y + run.param(lay, "b")                                 # one per column
    if run.training:
        run.saved[lay.name] = {"x": save_weight_input(run, lay, x)}
    y = y.reshape((len(x),) + lay.shape[1:] + (w.shape[0],)).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(y)


def _ref_backward(run: RefRun, lay: Layer, dy: np.ndarray, need) -> list:
    x = run.saved[lay.name]["x"]
    w = run.weight(lay)
    cout, cig, kh, kw = w.shape
    g = int(lay.attrs["group"])
    cog = cout // g
    cols = _group_cols(lay, x)
    parts = [slice(i * cog, (i + 1) * cog) for i in range(g)]

    def dw_of(q: np.ndarray) -> np.ndarray:
        return np.concatenate([matmul(cols[i].T, q[:, s]).T for i, s in enumerate(parts)]
                              ).reshape(w.shape)

    q = weight_grads(run, lay, dy.transpose(0, 2, 3, 1).reshape(-1, cout), None, dw_of=dw_of)
    if not need[0]:
        return [None]
    bsz, ho, wo = dy.shape[0], dy.shape[2], dy.shape[3]
    dcols = np.concatenate([matmul(q[:, s], w[s].reshape(cog, -1)).reshape(
        bsz, ho, wo, cig, kh, kw) for s in parts], axis=3).transpose(0, 3, 1, 2, 4, 5)
    pads = lay.attrs["pads"]
    padded = pad(np.zeros((1, 1) + x.shape[2:], x.dtype), pads).shape[2:]
    sh, sw = (int(s) for s in lay.attrs["strides"])
    return [crop(unwindow(dcols, (bsz, cig * g) + padded, sh, sw), pads)]


# ---- export -----------------------------------------------------------------------------------

def _export(em: Emitter, lay: Layer, xs: list[str], out: str) -> None:
    em.node("Conv", [xs[0], em.weight(lay)] + em.bias(lay), out,
            kernel_shape=list(lay.params["W"].shape[2:]), strides=list(lay.attrs["strides"]),
            pads=list(lay.attrs["pads"]), group=int(lay.attrs["group"]))


FAMILY = OpFamily(
    name="gconv", doc=__doc__,
    layers=(LayerSpec(LayerKind.GROUP_CONV, "gconv", attrs=("binary", "group", "strides", "pads"),
                      params=("W",), optional_params=("b",), check_shapes=_check_shapes,
                      trainable=True, packed_weights=_packed_weights),),
    kernels=KERNELS, forward={LayerKind.GROUP_CONV: _forward},
    backward={LayerKind.GROUP_CONV: _backward},
    reference_forward={LayerKind.GROUP_CONV: _ref_forward},
    reference_backward={LayerKind.GROUP_CONV: _ref_backward},
    export={LayerKind.GROUP_CONV: _export})
