"""What the weight layers (dense, conv and, for the backward, gconv) share: the kernels both schedule (packing sign(W), the
f16 copy of a real layer's input, PO2 gradient quantization, the bias gradient) with their C
lowerings, and the training-schedule rules of a weight layer, parametrized by the family's own
kernels and geometry (`WeightKernels`).

Not an op family of its own: the dense family lists these kernels (`compiler/ops/dense.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from ..config import TrainConfig, is_frozen, u8_input_layer
from ..ir import WEIGHT_KINDS, Graph, Layer, LayerKind, tname
from ..lower import Call, LowerCtx, Split, Threaded, call_lines, instance, words64
from ..onnx_values import Act, Bin, Const, Spec
from ..schedule_ir import Role, Step
from .base import (BIT, F16, F32, GRADS, I32, PO2, STATE, U8, KernelFamily, KernelSpec, Phase,
                   kernel, prod)

if TYPE_CHECKING:
    from ..schedule import ScheduleBuilder


@dataclass(frozen=True)
class WeightKernels:
    """A weight-layer family's kernels, by role: the forward by input kind (packed bits, real
    input of a binary layer, real layer) and dW/dX by gradient kind (f32, PO2 codes, 1-bit dW)."""
    fwd_xnor: KernelSpec
    fwd_signw: KernelSpec
    fwd_f32: KernelSpec
    dw_f32: KernelSpec
    dw_po2: KernelSpec
    dw_bin: KernelSpec
    dx_f32: KernelSpec
    dx_po2: KernelSpec
    # the family's own step attrs (dense: in/out features; conv: the window geometry)
    geometry: Callable[[ScheduleBuilder, Layer], dict]
    # (nbytes, layout) of the layer's weights packed for the XNOR kernel (also LayerSpec's)
    packed_weights: Callable[[ScheduleBuilder, Layer], tuple[int, str]]
    # the integer first layer on a u8 input (`--input u8`; dense only) and its step attrs
    fwd_u8: KernelSpec | None = None
    u8_attrs: Callable[[ScheduleBuilder, Layer], dict] | None = None

    @property
    def all(self) -> tuple[KernelSpec, ...]:
        return (self.fwd_xnor, self.fwd_signw, self.fwd_f32, self.dw_f32, self.dw_po2,
                self.dw_bin, self.dx_f32, self.dx_po2) + ((self.fwd_u8,) if self.fwd_u8 else ())


# ---- ONNX import: what MatMul/Gemm and Conv share ---------------------------------------------

def weight(imp, w, node, x: Act):
    """-> (W array as stored in ONNX, binary, full scale array or None)."""
    if isinstance(w, Bin):
        if w.shift is not None and np.any(w.shift != 0):
            imp._fail(node, "its binarized weight has a constant offset")
        return w.latent, True, w.scale
    if isinstance(w, Const):
        arr = w.arr
        if not np.issubdtype(arr.dtype, np.floating):
            imp._fail(node, f"weight has type {arr.dtype}")
        binary = bool(arr.size and np.all(np.abs(arr) == 1)) and (
            imp.quant_file or binary_act(imp, x.layer))
        return arr, binary, None
    imp._fail(node, "its weight is not a constant initializer",
              hint="bnnc trains weights stored as initializers")


def binary_act(imp, layer: str) -> bool:
    while layer in imp.specs:
        spec = imp.specs[layer]
        if spec.kind is LayerKind.SIGN:
            return True
        if spec.kind not in (LayerKind.FLATTEN, LayerKind.MAXPOOL):
            return False
        layer = spec.inputs[0]
    return False


def out_scale(imp, scale, node, out_axis: int) -> np.ndarray | None:
    """A binarized weight's full scale array -> one factor per output channel (or None)."""
    if scale is None or np.all(scale == 1):
        return None
    moved = np.moveaxis(scale, out_axis, 0).reshape(scale.shape[out_axis], -1)
    if np.any(moved != moved[:, :1]):
        imp._fail(node, "its binarized weight's scale varies inside an output channel")
    col = moved[:, 0]
    return col[:1] if np.all(col == col[0]) else col


def layer_affine(imp, y: Act, node, scale, bias) -> Act:
    """A binary layer's weight scale / bias, as a pending affine on its output."""
    if scale is not None and not np.all(scale == 1):
        y = imp._affine(y, node, mul=scale, explicit=False)
    if bias is not None:
        b = np.asarray(bias, np.float64).ravel()
        if b.size not in (1, y.shape[0]):
            imp._fail(node, f"bias of shape {list(np.shape(bias))} does not match "
                      f"{y.shape[0]} output channels")
        y = imp._affine(y, node, add=b, explicit=False)
    return y


def fold_biases(imp, specs: list[Spec]) -> list[Spec]:
    """A scale-1 AFFINE that is the only reader of a real DENSE/CONV becomes that layer's `b`
    (a MatMul + Add bias export). Done on the final layer list: reader counts are exact."""
    readers: dict[str, int] = {}
    for s in specs:
        for i in s.inputs:
            readers[i] = readers.get(i, 0) + 1
    alias: dict[str, str] = {}
    kept = []
    for s in specs:
        s.inputs = tuple(alias.get(i, i) for i in s.inputs)
        base = imp.specs.get(s.inputs[0])
        if (s.kind is LayerKind.AFFINE and base is not None and readers[base.name] == 1
                and base.kind in WEIGHT_KINDS
                and not base.attrs["binary"] and np.all(s.params["scale"] == 1)):
            C = base.shape[0]
            b = base.params.get("b", np.zeros(C, np.float32)).astype(np.float64)
            base.params["b"] = (b + np.broadcast_to(s.params["bias"], (C,))).astype(np.float32)
            base.onnx_name = f"{base.onnx_name}+{s.onnx_name}"
            alias[s.name] = base.name
            continue
        kept.append(s)
    return kept


# ---- kernels: contract (dtypes, in-place) + C lowering -----------------------------------------

def _lower_pack_sign_w(step: Step, ctx: LowerCtx) -> Call:
    a = step.attrs
    w, wb = step.inputs[0], step.outputs[0]
    if "cout" in a:
        inst = instance(step, ctx, "pack_sign_w_conv", {"w": w}, family=KernelFamily.CONV)
        taps, wc = a["kh"] * a["kw"], words64(a["cin"])
        args = [ctx.ptr(w), ctx.ptr(wb), a["cout"], a["cin"], taps, wc]
        # threads take output channels: W's rows of Cin * taps values, Wb's of taps * wc words
        return Call(inst, args, split=Split(a["cout"], 1, ((0, a["cin"] * taps), (1, taps * wc)),
                                            count=2))
    else:
        chw = a.get("x_chw")
        k, n = a["in_features"], a["out_features"]
        c, hw = (chw[0], chw[1] * chw[2]) if chw else (k, 1)
        words = hw * words64(c) if chw else words64(k)
        inst = instance(step, ctx, "pack_sign_w_dense", {"w": w})
        args = [ctx.ptr(w), ctx.ptr(wb), k, n, words, hw, words64(c) if chw else 0]
    return Call(inst, args)


def _lower_cast_f16(step: Step, ctx: LowerCtx) -> Call:
    n = ctx.t(step.inputs[0]).size
    return Call(instance(step, ctx), [ctx.ptr(step.inputs[0]), ctx.ptr(step.outputs[0]), n])


# po2_quantize under --threads: at most this many blocks of whole 64-element chunks
PO2_BLOCKS = 256


def po2_block(count: int) -> int:
    """Elements per block of a threaded po2_quantize (a function of the tensor's size only, so
    every thread count cuts the same blocks): whole 64-element chunks, at most PO2_BLOCKS blocks."""
    return 64 * -(-count // (64 * PO2_BLOCKS))


def _lower_po2_quantize(step: Step, ctx: LowerCtx) -> Call:
    """One call; under threads (`Threaded`), two phases split by blocks of whole 64-element
    chunks: each block's largest magnitude, then every block's codes from their maximum, written
    at their final place in q. The schedule puts the codes apart from g (schedule.py: the f16
    gradient dies at its quantization); a q placed over g (the kernel's declared in-place pair,
    which no schedule takes now) would let a part's codes overwrite elements another part still
    reads, so it runs whole."""
    a = step.attrs
    g = step.inputs[0]
    q, bias = step.outputs
    inst = instance(step, ctx, operands={"g": g})
    n, zero = ctx.t(g).size, int(bool(a["zero_to_min"]))
    call = Call(inst, [ctx.ptr(g), ctx.ptr(q), ctx.ptr(bias), n, a["po2_bias"], zero])
    block = po2_block(n)
    blocks = -(-n // block)
    if blocks < 2 or _overlap(ctx, g, q):
        return call
    ops = {"g": g}
    absmax = instance(step, ctx, "po2_absmax", ops, block=block)
    codes = instance(step, ctx, "po2_codes", ops, block=block)
    ut = "uint32_t" if ctx.t(g).dtype.value == "f32" else "uint16_t"
    tops = "{step}_tops"
    call.threaded = Threaded(
        body=[f"    bnnc_par({{step}}_max, {blocks}, 1);",
              f"    bnnc_par({{step}}_codes, {blocks}, 1);"],
        parts={"max": call_lines(absmax.fn, [ctx.ptr(g), tops, n, "lo", "hi"]),
               "codes": call_lines(codes.fn, [ctx.ptr(g), ctx.ptr(q), tops, blocks,
                                              ctx.ptr(bias), n, a["po2_bias"], zero, "lo",
                                              "hi"])},
        statics=[f"static {ut} {tops}[{blocks}];   /* each block's largest magnitude */"],
        uses=(absmax, codes))
    return call


def _overlap(ctx: LowerCtx, a: str, b: str) -> bool:
    """Whether the plan's bytes of tensors `a` and `b` intersect."""
    (ra, oa), (rb, ob) = ctx.plan.tensor_offsets[a], ctx.plan.tensor_offsets[b]
    return ra == rb and oa < ob + ctx.t(b).nbytes and ob < oa + ctx.t(a).nbytes


def _lower_bias_grad(step: Step, ctx: LowerCtx) -> Call:
    a = step.attrs
    dy, db = step.inputs[0], step.outputs[0]
    if "cout" in a:
        rows, ch, sp = a["batch"], a["cout"], a["oh"] * a["ow"]
    else:
        rows, ch, sp = a["batch"], a["out_features"], 1
    return Call(instance(step, ctx, operands={"dy": dy}), [ctx.ptr(dy), ctx.ptr(db), rows,
                                                           ch, sp])


def _magnitude_bias(step: Step, name: str, mag) -> np.ndarray:
    """The terms of db: dY summed over the batch (and positions)."""
    a = step.attrs
    c = a.get("cout", a.get("out_features"))
    return mag.value(step.inputs[0]).reshape(a["batch"], c, -1).sum(axis=(0, 2))


PACK_SIGN_W = kernel(
    "pack_sign_w", Phase.FORWARD, KernelFamily.DENSE,
    "sign(W) of latent weights packed in the XNOR kernel's bit layout",
    [("w", STATE)], [("wb", BIT)], lower=_lower_pack_sign_w)
CAST_F16 = kernel(
    "cast_f16", Phase.FORWARD, KernelFamily.ACT,
    "round a real weight layer's input to f16 (RNE) for its backward",
    [("x", F32)], [("y", F16)], [(0, 0)], lower=_lower_cast_f16)
PO2_QUANTIZE = kernel(
    "po2_quantize", Phase.BACKWARD, KernelFamily.PO2,
    "per-tensor 5-bit power-of-two quantization: u8 codes (bit 4 sign, bits 0-3 e+8) + int bias",
    [("g", GRADS)], [("q", PO2), ("bias", I32)], [(0, 0)], lower=_lower_po2_quantize)
BIAS_GRAD = kernel(
    "bias_grad", Phase.BACKWARD, KernelFamily.PO2, "db = sum of dY over batch (and positions)",
    [("dy", GRADS)], [("db", F32)], lower=_lower_bias_grad, magnitude=_magnitude_bias)

# listed by the dense family (compiler/ops/dense.py); conv schedules them too
KERNELS = (PACK_SIGN_W, CAST_F16, PO2_QUANTIZE, BIAS_GRAD)


# ---- training schedule: the rules of a weight layer, given its family's kernels ----------------

def bop_shift_bn(graph: Graph, cfg: TrainConfig, lay: Layer) -> Layer | None:
    """The batch norm whose running mean follows the flips of `lay`'s Bop-trained W (compiler/
    README.md, "Bop", flip-compensated running mean): a trained binary dense layer whose output
    feeds exactly one layer, a BATCHNORM, under `--optimizer bop` with `bop_bn_shift` on.
    Convolutions are not shifted (their input's mean per weight is a mean over shifted windows),
    nor is the first layer under `--input u8` (its input is kept as u8 pixels, not the values the
    shift averages; not built)."""
    if not (cfg.optimizer == "bop" and cfg.bop_bn_shift and lay.kind is LayerKind.DENSE
            and lay.binary and not is_frozen(cfg, lay.name, "W")):
        return None
    if cfg.input == "u8" and u8_input_layer(graph).name == lay.name:
        return None
    users = graph.consumers(lay.name)
    if len(users) != 1 or users[0].kind is not LayerKind.BATCHNORM:
        return None
    return users[0]


def geometry(b: ScheduleBuilder, lay: Layer, k: WeightKernels) -> dict:
    """The step attrs every kernel of a weight layer reads: batch, binary, how its input is
    stored, then the family's own geometry (`WeightKernels.geometry`)."""
    x = b.act[lay.inputs[0]]
    xt = b.tensors[x]
    chw = b.packed.get(lay.inputs[0])
    x_layout = ("bits_nhwc" if chw else "bits_rows") if xt.dtype is BIT else "dense"
    geom = dict(batch=b.B, binary=lay.binary, x_layout=x_layout)
    geom.update(k.geometry(b, lay))
    if xt.dtype is U8:
        assert k.u8_attrs is not None, lay.name     # config.u8_input_layer admits dense only
        geom.update(k.u8_attrs(b, lay))
    return geom


def forward(b: ScheduleBuilder, lay: Layer, k: WeightKernels) -> None:
    """[pack_sign_w], the forward kernel by input kind, [cast_f16 of the input kept for dW]."""
    x = b.act[lay.inputs[0]]
    xt = b.tensors[x]
    geom = geometry(b, lay, k)
    w = tname(lay.name, "W")
    bias = (tname(lay.name, "b"),) if "b" in lay.params else ()
    y = b.out_f32(lay)
    if xt.dtype is BIT:
        wb = w
        if b.tensors[w].dtype is not BIT:
            nbytes, layout = k.packed_weights(b, lay)
            wb = b.new(tname(lay.name, "Wb"), BIT, lay.params["W"].shape, Role.SCRATCH,
                       layout=layout, nbytes=nbytes)
            b.emit(PACK_SIGN_W, lay.name, (w,), (wb,), **geom)
        b.emit(k.fwd_xnor, lay.name, (x, wb) + bias, (y,), **geom)
    elif xt.dtype is U8:
        b.emit(k.fwd_u8, lay.name, (x, w) + bias, (y,), **geom)
    else:
        b.emit(k.fwd_signw if lay.binary else k.fwd_f32, lay.name, (x, w) + bias, (y,), **geom)
    if lay.name not in b.has_dout or not b.trains(lay, "W"):
        return      # no dW: nothing of the input is kept (dX reads W and dY only)
    as_given = (xt.dtype is BIT or not b.cfg.save_bits
                or (lay.binary and not b.ng[lay.inputs[0]]))
    if as_given:
        b.saved_x[lay.name] = x
    else:
        xs = b.new_act(tname(lay.name, "x_saved"), F16, xt.shape, Role.SAVED)
        b.emit(CAST_F16, lay.name, (x,), (xs,))
        b.saved_x[lay.name] = xs


def backward(b: ScheduleBuilder, lay: Layer, k: WeightKernels) -> None:
    """[bias_grad], [po2_quantize], [dW], [dX], [update W], [update b] (schedule.py's
    docstring); a frozen W gets no dW and no update, a frozen b no db."""
    n, cfg = lay.name, b.cfg
    geom = geometry(b, lay, k)
    dy, x, w = tname(n, "d_out"), b.saved_x.get(n), tname(n, "W")
    wt = b.tensors[w]
    train_w, p = b.trains(lay, "W"), lay.inputs[0]
    if "b" in lay.params and b.trains(lay, "b"):
        db = b.new(tname(n, "db"), F32, lay.params["b"].shape, Role.GRAD)
        b.emit(BIAS_GRAD, n, (dy,), (db,), **geom)
    grad: tuple[str, ...] = (dy,)
    if lay.binary and cfg.po2 and (train_w or b.ng[p]):
        q = b.new(tname(n, "d_out_q"), PO2, b.tensors[dy].shape, Role.GRAD,
                  layout=f"u8 codes: bit 4 sign (1 = negative), bits 0-3 e+8; value "
                         f"+-2^(e - bias), bias in {tname(n, 'po2_bias')}")
        bias = b.new(tname(n, "po2_bias"), I32, (1,), Role.GRAD)
        b.emit(PO2_QUANTIZE, n, (dy,), (q, bias), batch=b.B, size=prod(lay.shape),
               po2_bias=cfg.po2_bias, zero_to_min=cfg.po2_zero_to_min)
        grad = (q, bias)
    mask_w = (w,) if lay.binary and wt.dtype is not BIT else ()
    nw = prod(lay.params["W"].shape)
    if not train_w:
        dw = ""
    elif lay.binary and cfg.binary_dw:
        words = words64(nw)
        value = f"+-{float(np.float32(1 / math.sqrt(nw))):.9g}"
        value += " * 1[|W| <= 1]" if mask_w else ""
        dw = b.new(tname(n, "dW"), BIT, lay.params["W"].shape, Role.GRAD,
                   layout=f"bits flat: {words} words64, element i of W (row-major) -> bit "
                          f"i%64 of word i//64 (1 = +); value {value}", nbytes=words * 8)
        b.emit(k.dw_bin, n, (x, grad[0]), (dw,), **geom)
    else:
        dw = b.new(tname(n, "dW"), F32, lay.params["W"].shape, Role.GRAD)
        b.emit(k.dw_po2 if len(grad) == 2 else k.dw_f32, n, (x,) + grad + mask_w, (dw,), **geom)
    if b.ng[p]:
        t = b.target(p, n)
        b.emit(k.dx_po2 if len(grad) == 2 else k.dx_f32, n, grad + (w,), (t,), **geom)
        b.contribute(p, t, n)
    if train_w:
        bn = bop_shift_bn(b.g, cfg, lay)
        b.update(lay, "W", dw, shift=(x, tname(bn.name, "running_mean")) if bn else ())
    if "b" in lay.params and b.trains(lay, "b"):
        b.update(lay, "b", db)


def bias_shape(lay: Layer) -> str | None:
    """What is wrong with a weight layer's bias shape (None: nothing, or no bias)."""
    if "b" in lay.params and lay.params["b"].shape != lay.shape[:1]:
        return f"b {list(lay.params['b'].shape)} for {lay.shape[0]} output channels"
    return None
