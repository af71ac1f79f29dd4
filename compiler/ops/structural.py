"""Flatten/Reshape/(Un)Squeeze views, layout idioms, residual Add, constant affine, the input quantizer, fan-out gradient sums."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import onnx

from ..errors import TargetError
from ..ir import Layer, LayerKind, tname
from ..c_literals import c_float
from ..lower import Call, LowerCtx, const_array, instance
from ..onnx_fold import np_reshape
from ..onnx_values import BATCH, Act, Bin, Const, SteRes, node_attrs, node_label, printable, short
from ..schedule_ir import Step
from ..zoo import QONNX_DOMAIN
from .base import (F32, GRADS, Bits, KernelFamily, LayerSpec, OnnxOp, OpFamily, Phase,
                   elementwise_shapes, kernel, prod, same_size_shapes)
from .exportctx import Emitter
from .refctx import RefRun
from .refmath import chan, no_grad

if TYPE_CHECKING:
    from ..schedule import ScheduleBuilder


# ---- ONNX import ------------------------------------------------------------------------------

def _op_add(imp, node, vals):
    a, b = vals
    for x_name, y in ((node.input[0], b), (node.input[1], a)):
        if isinstance(y, SteRes) and y.src == x_name:
            return y.s      # x + (B(x) - x) == B(x): the straight-through-estimator idiom
    for x, y in ((a, b), (b, a)):
        if isinstance(x, Bin) and isinstance(y, Const):
            shift = imp._bcast(y.arr, x.latent.shape, node, "the constant")
            return Bin(x.latent, x.scale, x.src,
                       shift if x.shift is None else x.shift + shift)
        if isinstance(x, Act) and isinstance(y, Const):
            c, _ = imp._chan(x, y.arr, node)
            return imp._affine(x, node, add=c)
    if isinstance(a, Act) and isinstance(b, Act):
        xa, xb = imp._nchw(a, node), imp._nchw(b, node)
        if xa.shape != xb.shape:
            imp._fail(node, f"adds activations of shapes {list(xa.shape)} and "
                      f"{list(xb.shape)}", hint="residual adds need equal shapes")
        name = imp._add(LayerKind.ADD, [xa.layer, xb.layer], xa.shape, node_label(node))
        return Act(name, xa.shape)
    imp._fail(node, "unsupported operands for Add")


def _op_sub(imp, node, vals):
    a, b = vals
    if isinstance(a, (Act, Bin)) and a.src is not None and a.src == node.input[1]:
        return SteRes(a, a.src)
    if isinstance(a, Bin) and isinstance(b, Const):
        shift = -imp._bcast(b.arr, a.latent.shape, node, "the constant")
        return Bin(a.latent, a.scale, a.src, shift if a.shift is None else a.shift + shift)
    if isinstance(a, Act) and isinstance(b, Const):
        c, _ = imp._chan(a, b.arr, node)
        return imp._affine(a, node, add=-c)
    if isinstance(a, Const) and isinstance(b, Act):
        c, _ = imp._chan(b, a.arr, node)
        return imp._affine(b, node, mul=np.array([-1.0]), add=c)
    imp._fail(node, "unsupported operands for Sub",
              hint="bnnc folds Sub with a constant, and the STE idiom x + (sign(x) - x)")


def _op_mul(imp, node, vals):
    a, b = vals
    for x, y in ((a, b), (b, a)):
        if isinstance(x, Bin) and isinstance(y, Const):
            m = imp._bcast(y.arr, x.latent.shape, node, "the constant")
            return Bin(x.latent, x.scale * m, x.src, None if x.shift is None else x.shift * m)
        if isinstance(x, Act) and isinstance(y, Const):
            c, pc = imp._chan(x, y.arr, node)
            return imp._affine(x, node, mul=c, mul_pc=pc)
    imp._fail(node, "unsupported operands for Mul", hint="bnnc folds Mul by a constant only")


def _op_div(imp, node, vals):
    a, b = vals
    if isinstance(a, Act) and isinstance(b, Const):
        c, pc = imp._chan(a, b.arr, node)
        if np.any(c == 0):
            imp._fail(node, "divides by zero")
        return imp._affine(a, node, mul=1.0 / c, mul_pc=pc)
    imp._fail(node, "unsupported operands for Div", hint="bnnc folds Div by a constant only")


def _op_neg(imp, node, vals):
    x = imp._act(vals[0], node)
    return imp._affine(x, node, mul=np.array([-1.0]))


def _op_identity(imp, node, vals):
    return vals[0]


def _op_dropout(imp, node, vals):
    if len(vals) > 2 and vals[2] is not None:
        mode = vals[2]
        if not isinstance(mode, Const) or mode.arr.size != 1 or bool(mode.arr.ravel()[0]):
            imp._fail(node, "runs in training mode", hint="export in inference mode")
    return vals[0]


def _op_cast(imp, node, vals):
    x = vals[0]
    if isinstance(x, Act) and node_attrs(node).get("to") == onnx.TensorProto.FLOAT:
        return x
    imp._fail(node, "casts an activation to a non-float32 type")


def _op_transpose(imp, node, vals):
    x = vals[0]
    perm = list(node_attrs(node).get("perm", []))
    if isinstance(x, Bin):
        perm = perm or list(range(x.latent.ndim))[::-1]
        if sorted(perm) != list(range(x.latent.ndim)):
            imp._fail(node, f"perm {short(perm)} is not a permutation of the "
                      f"{x.latent.ndim} axes of the weight")
        return Bin(np.transpose(x.latent, perm), np.transpose(x.scale, perm), x.src,
                   None if x.shift is None else np.transpose(x.shift, perm))
    x = imp._act(x, node)
    rank = len(x.onnx_shape) + 1
    if perm == list(range(rank)):
        return x
    plain = not x.nhwc and x.view is None and x.perm is None
    if x.nhwc and perm == [0, 3, 1, 2]:
        m = imp._mat(x)
        return Act(m.layer, m.shape)
    if plain and len(x.shape) == 3 and perm == [0, 2, 3, 1]:
        # tf2onnx / keras2onnx: back to NHWC before Keras' Flatten; the flatten absorbs it
        return dataclasses.replace(x, nhwc=True, mat=None)
    src = x.onnx_shape
    if perm[:1] == [0] and sorted(perm) == list(range(rank)):
        moved = [p for p in perm[1:] if src[p - 1] != 1]
        if moved == sorted(moved):
            # only size-1 axes move: the same bytes in the same order, a view
            return _unit_view(imp, node, x, tuple(src[p - 1] for p in perm[1:]))
    imp._fail(node, f"transposes an activation with perm {short(perm)}",
              hint="bnnc keeps activations NCHW; it absorbs Transpose(perm=[0,3,1,2]) of an "
              "NHWC input or map and Transpose(perm=[0,2,3,1]) before a Flatten")


def _op_shape(imp, node, vals):
    x = imp._act(vals[0], node)
    at = node_attrs(node)
    full = np.array([BATCH, *x.onnx_shape], dtype=np.int64)
    return Const(full[at.get("start", 0):at.get("end", None)])


def _flatten(imp, node, x: Act) -> Act:
    """ONNX's flatten of `x`: bnnc's FLATTEN (a view) of its NCHW layer. A map transposed to NHWC
    flattens in (H, W, C) order: the result carries that order (`Act.perm`) for its readers; a
    view (size-1 axes) flattens in the layer's own order."""
    if x.perm is not None:
        return x
    perm = None
    if x.nhwc:
        c, h, w = x.shape
        perm = np.arange(c * h * w).reshape(c, h, w).transpose(1, 2, 0).ravel()
        if np.array_equal(perm, np.arange(perm.size)):
            perm = None
        x = dataclasses.replace(imp._mat(x), nhwc=False, mat=None)
    x = imp._nchw(dataclasses.replace(x, view=None), node)
    if len(x.shape) == 1:
        return x
    shape = (int(np.prod(x.shape)),)
    return Act(imp._add(LayerKind.FLATTEN, [x.layer], shape, node_label(node)),
               shape, perm=perm)


def _unit_view(imp, node, x: Act, new: tuple[int, ...]) -> Act:
    """`x` seen with per-sample ONNX shape `new`, which only inserts or removes size-1 axes: the
    same bytes in the same order. To one dim it is bnnc's FLATTEN; back to the layer's own shape
    the plain value; else a view (`Act.view`) that elementwise ops, BN and Flatten read."""
    if new == x.onnx_shape:
        return x
    if x.nhwc or x.perm is not None:
        imp._fail(node, f"reshapes {list(x.onnx_shape)}, a map transposed to NHWC or its "
                  f"(H, W, C)-order flatten, to {list(new)}",
                  hint="bnnc absorbs only a Flatten of a map transposed to NHWC")
    if len(new) == 1 and len(x.shape) > 1:
        return _flatten(imp, node, x)
    return dataclasses.replace(x, view=None if new == x.shape else new, mat=None)


def _axes_arg(imp, node, vals) -> list[int] | None:
    """Squeeze/Unsqueeze axes: the `axes` input (opset 13 on) or attribute (before), or None."""
    if len(vals) > 1 and vals[1] is not None:
        return imp._int_list(vals[1], node, "the axes")
    at = node_attrs(node)
    return [int(a) for a in at["axes"]] if "axes" in at else None


def _per_sample_axes(imp, node, axes: list[int], rank: int) -> list[int]:
    """ONNX axes of a tensor of full rank `rank` (batch included) -> sorted per-sample axes."""
    if any(not -rank <= a < rank for a in axes) or len({a % rank for a in axes}) != len(axes):
        imp._fail(node, f"axes {short(axes)} are out of range or repeated for rank {rank}")
    axes = sorted(a % rank for a in axes)
    if 0 in axes:
        imp._fail(node, "squeezes or unsqueezes the batch axis",
                  hint="bnnc keeps the batch as axis 0")
    return [a - 1 for a in axes]


def _op_unsqueeze(imp, node, vals):
    x = imp._act(vals[0], node)
    per = list(x.onnx_shape)
    axes = _axes_arg(imp, node, vals)
    if not axes:
        imp._fail(node, "has no axes", hint="Unsqueeze needs its axes input (attribute before "
                  "opset 13)")
    for a in _per_sample_axes(imp, node, axes, len(per) + 1 + len(axes)):
        per.insert(a, 1)
    return _unit_view(imp, node, x, tuple(per))


def _op_squeeze(imp, node, vals):
    x = imp._act(vals[0], node)
    per = x.onnx_shape
    axes = _axes_arg(imp, node, vals)
    axes = ([i for i, d in enumerate(per) if d == 1] if axes is None
            else _per_sample_axes(imp, node, axes, len(per) + 1))
    for a in axes:
        if per[a] != 1:
            imp._fail(node, f"squeezes axis {a + 1} of size {per[a]}",
                      hint="Squeeze removes size-1 axes only")
    return _unit_view(imp, node, x, tuple(d for i, d in enumerate(per) if i not in axes))


def _op_flatten(imp, node, vals):
    x = imp._act(vals[0], node)
    axis = node_attrs(node).get("axis", 1)
    if axis % (len(x.shape) + 1) != 1:
        imp._fail(node, f"flattens from axis {axis}", hint="bnnc flattens from axis 1")
    return _flatten(imp, node, x)


def _per_sample(dims: list[int], per: tuple[int, ...], total: int) -> tuple[int, ...] | None:
    """A Reshape target's per-sample dims with ONNX's 0 (copy the input's dim at that index) and
    one -1 (the rest) resolved; None when they do not resolve."""
    out = [per[i] if d == 0 and i < len(per) else d for i, d in enumerate(dims)]
    if out.count(-1) > 1 or any(d == 0 or d < -1 for d in out):
        return None
    known = int(np.prod([d for d in out if d != -1]))
    if -1 in out:
        if known == 0 or total % known:
            return None
        out[out.index(-1)] = total // known
    return tuple(out) if int(np.prod(out)) == total else None


def _op_reshape(imp, node, vals):
    x = vals[0]
    if isinstance(x, Bin):
        tgt = imp._int_list(vals[1], node, "the shape")
        try:
            return Bin(np_reshape(node, x.latent, tgt), np_reshape(node, x.scale, tgt),
                       x.src, None if x.shift is None else np_reshape(node, x.shift, tgt))
        except (ValueError, IndexError) as e:
            imp._fail(node, f"cannot reshape the weight of shape {list(x.latent.shape)} to "
                      f"{short(tgt)} ({printable(e, 100)})")
    x = imp._act(x, node)
    tgt = imp._int_list(vals[1], node, "the target shape")
    per = x.onnx_shape
    total = int(np.prod(per))
    batch_dims = (1, 0, -1, BATCH, imp._file_batch())
    if len(tgt) == 2 and tgt[0] in batch_dims and (tgt[1] in (-1, total)) \
            and not (tgt[0] == -1 and tgt[1] == -1):
        return _flatten(imp, node, x)
    if len(tgt) == len(per) + 1 and tgt[0] in batch_dims and tgt.count(-1) <= 1 and \
            all(d in (s, 0, -1) for d, s in zip(tgt[1:], per)):
        return x      # keeps the per-sample shape
    if x.nhwc and x.shape[0] == 1 and tgt[0] in batch_dims and \
            _per_sample(tgt[1:], per, total) == x.shape:
        # (H, W, 1) -> (1, H, W) moves only a size-1 axis: the bytes are already in NCHW order
        # (how tf2onnx writes the NHWC -> NCHW change of a one-channel input, instead of a
        # Transpose)
        m = imp._mat(x)
        return Act(m.layer, m.shape)
    new = _per_sample(tgt[1:], per, total) if tgt and tgt[0] in batch_dims else None
    if new is not None and [d for d in new if d != 1] == [d for d in per if d != 1]:
        return _unit_view(imp, node, x, new)      # inserts / removes size-1 axes only
    imp._fail(node, f"reshapes per-sample shape {list(per)} to {short(tgt)}, which is not a "
              "flatten", hint="bnnc supports Reshape as flatten ([N,-1]), identity, inserting or "
              "removing size-1 axes, or the [N,H,W,1] -> [N,1,H,W] layout change of a "
              "one-channel NHWC input")


ONNX = {
    "Add": OnnxOp(_op_add, (2, 2)),
    "Sub": OnnxOp(_op_sub, (2, 2)),
    "Mul": OnnxOp(_op_mul, (2, 2)),
    "Div": OnnxOp(_op_div, (2, 2)),
    "Neg": OnnxOp(_op_neg, (1, 1)),
    "Identity": OnnxOp(_op_identity, (1, 1)),
    "Dropout": OnnxOp(_op_dropout, (1, 3)),
    "Cast": OnnxOp(_op_cast, (1, 1)),
    "Transpose": OnnxOp(_op_transpose, (1, 1)),
    "Shape": OnnxOp(_op_shape, (1, 1)),
    "Flatten": OnnxOp(_op_flatten, (1, 1)),
    "Reshape": OnnxOp(_op_reshape, (2, 2)),
    "Squeeze": OnnxOp(_op_squeeze, (1, 2)),
    "Unsqueeze": OnnxOp(_op_unsqueeze, (1, 2)),
}


# ---- training schedule ------------------------------------------------------------------------

def _fwd_add(b: ScheduleBuilder, lay: Layer) -> None:
    ins = tuple(b.act[i] for i in lay.inputs)
    b.emit(ADD_FWD, lay.name, ins, (b.out_f32(lay),),
           batch=b.B, size=prod(lay.shape))


def _affine_attrs(b: ScheduleBuilder, lay: Layer) -> dict:
    return dict(batch=b.B, channels=lay.shape[0], spatial=prod(lay.shape[1:]),
                scale=lay.params["scale"].ravel(), bias=lay.params["bias"].ravel())


def _fwd_affine(b: ScheduleBuilder, lay: Layer) -> None:
    b.emit(AFFINE_FWD, lay.name, (b.act[lay.inputs[0]],),
           (b.out_f32(lay),), **_affine_attrs(b, lay))


def _fwd_input_quant(b: ScheduleBuilder, lay: Layer) -> None:
    attrs = {k: lay.attrs[k] for k in ("scale", "zero_point", "bits", "signed", "narrow")}
    b.emit(INPUT_QUANT_FWD, lay.name, (b.act[lay.inputs[0]],),
           (b.out_f32(lay),), batch=b.B, size=prod(lay.shape), **attrs)


def _fwd_flatten(b: ScheduleBuilder, lay: Layer) -> None:
    b.act[lay.name] = b.view(tname(lay.name, "out"), b.act[lay.inputs[0]],
                             b.full(lay.name))


def _bwd_affine(b: ScheduleBuilder, lay: Layer) -> None:
    b.unary_backward(lay, AFFINE_BWD, (), **_affine_attrs(b, lay))


def _bwd_identity(b: ScheduleBuilder, lay: Layer) -> None:
    b.identity_backward(lay)


def _check_add(lay: Layer, ins) -> str | None:
    if ins[0] != ins[1] or ins[0] != lay.shape:
        return f"adds {ins[0]} and {ins[1]} into {lay.shape}"
    return None


def _check_affine(lay: Layer, ins) -> str | None:
    if not {lay.params["scale"].size, lay.params["bias"].size} <= {1, lay.shape[0]}:
        sizes = f"{lay.params['scale'].size}/{lay.params['bias'].size}"
        return f"scale/bias of {sizes} values for {lay.shape[0]} channels"
    return elementwise_shapes(lay, ins)


FORWARD = {LayerKind.FLATTEN: _fwd_flatten, LayerKind.ADD: _fwd_add,
           LayerKind.AFFINE: _fwd_affine, LayerKind.INPUT_QUANT: _fwd_input_quant}
# INPUT_QUANT never has a gradient (the schedule rejects a trainable layer before one)
BACKWARD = {LayerKind.FLATTEN: _bwd_identity, LayerKind.ADD: _bwd_identity,
            LayerKind.AFFINE: _bwd_affine}
LAYER_SPECS = (
    LayerSpec(LayerKind.FLATTEN, "flatten", check_shapes=same_size_shapes, bits=Bits.VIEW,
              output=True),
    LayerSpec(LayerKind.ADD, "add", arity=2, check_shapes=_check_add),
    LayerSpec(LayerKind.AFFINE, "affine", params=("scale", "bias"), check_shapes=_check_affine,
              output=True),
    LayerSpec(LayerKind.INPUT_QUANT, "quant",
              attrs=("scale", "zero_point", "bits", "signed", "narrow"),
              check_shapes=elementwise_shapes, stops_gradient=True),
)


# ---- kernels: contract (dtypes, in-place) + C lowering -----------------------------------------

def _lower_binary_ew(step: Step, ctx: LowerCtx) -> Call:
    """add_fwd / grad_add: y = a + b over the whole tensor."""
    a, b = step.inputs
    y = step.outputs[0]
    inst = instance(step, ctx, "ew_add", {"a": a, "b": b, "y": y})
    return Call(inst, [ctx.ptr(a), ctx.ptr(b), ctx.ptr(y), ctx.t(y).size])


def _lower_affine(step: Step, ctx: LowerCtx) -> Call:
    a = step.attrs
    i, o = step.inputs[0], step.outputs[0]
    scale, bias = tuple(a["scale"]), tuple(a["bias"])
    if len(scale) not in (1, a["channels"]) or len(bias) != len(scale):
        raise TargetError(f"layer {step.layer}: affine constants of {len(scale)}/{len(bias)} "
                          f"values for {a['channels']} channels; codegen takes one per channel "
                          "or one")
    dims = [len(scale), a["batch"], a["channels"], a["spatial"]]
    if step.kernel is AFFINE_FWD:
        return Call(instance(step, ctx), [ctx.ptr(i), ctx.ptr(o), "scale", "bias"] + dims,
                    [const_array("scale", scale), const_array("bias", bias)])
    inst = instance(step, ctx, operands={"g": i, "d": o})
    return Call(inst, [ctx.ptr(i), ctx.ptr(o), "scale"] + dims,
                [const_array("scale", scale)])


def _lower_input_quant(step: Step, ctx: LowerCtx) -> Call:
    a = step.attrs
    x, y = step.inputs[0], step.outputs[0]
    shape = ctx.t(x).shape
    c = shape[1] if len(shape) > 1 else 1
    sp = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    scale = np.atleast_1d(np.asarray(a["scale"], np.float64)).ravel()
    zp = np.atleast_1d(np.asarray(a["zero_point"], np.float64)).ravel()
    nc = max(scale.size, zp.size)
    if nc not in (1, c):
        raise TargetError(f"layer {step.layer}: input quantizer with {nc} scales for {c} channels; "
                          "codegen takes one per channel or one")
    scale, zp = np.broadcast_to(scale, (nc,)), np.broadcast_to(zp, (nc,))
    bits, narrow = int(a["bits"]), int(bool(a["narrow"]))
    if a["signed"]:
        qmin, qmax = -(2 ** (bits - 1)) + narrow, 2 ** (bits - 1) - 1
    else:
        qmin, qmax = 0, 2 ** bits - 1 - narrow
    return Call(instance(step, ctx), [ctx.ptr(x), ctx.ptr(y), "scale", "zp", nc, a["batch"],
                                      c, sp, c_float(qmin), c_float(qmax)],
                [const_array("scale", [float(np.float32(v)) for v in scale]),
                 const_array("zp", [float(np.float32(v)) for v in zp])])


ADD_FWD = kernel(
    "add_fwd", Phase.FORWARD, KernelFamily.ACT, "y = a + b (residual)",
    [("a", F32), ("b", F32)], [("y", F32)], [(0, 0), (0, 1)], lower=_lower_binary_ew,
    sums_stored=True)
AFFINE_FWD = kernel(
    "affine_fwd", Phase.FORWARD, KernelFamily.ACT,
    "y = x * scale + bias, constants per channel or per tensor",
    [("x", F32)], [("y", F32)], [(0, 0)], lower=_lower_affine)
INPUT_QUANT_FWD = kernel(
    "input_quant_fwd", Phase.FORWARD, KernelFamily.ACT,
    "k-bit uniform quantizer on the network input (no gradient)",
    [("x", F32)], [("y", F32)], [(0, 0)], lower=_lower_input_quant)
AFFINE_BWD = kernel(
    "affine_bwd", Phase.BACKWARD, KernelFamily.ACT, "d_in = d_out * scale",
    [("d_out", GRADS)], [("d_in", GRADS)], [(0, 0)], lower=_lower_affine)
GRAD_ADD = kernel(
    "grad_add", Phase.BACKWARD, KernelFamily.ACT,
    "y = a + b: sums gradient contributions of a fanned-out tensor",
    [("a", GRADS), ("b", GRADS)], [("y", GRADS)], [(0, 0), (0, 1)], lower=_lower_binary_ew,
    sums_stored=True)

KERNELS = (ADD_FWD, AFFINE_FWD, INPUT_QUANT_FWD, AFFINE_BWD, GRAD_ADD)


# ---- numpy reference --------------------------------------------------------------------------

def _ref_flatten_forward(run: RefRun, lay: Layer, x: np.ndarray) -> np.ndarray:
    if run.training:
        run.saved[lay.name] = {"xshape": x.shape}
    return x.reshape((len(x),) + lay.shape)


def _ref_flatten_backward(run: RefRun, lay: Layer, g: np.ndarray, need) -> list:
    return [g.reshape(run.saved[lay.name]["xshape"])]


def _ref_add_forward(run: RefRun, lay: Layer, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a + b


def _ref_add_backward(run: RefRun, lay: Layer, g: np.ndarray, need) -> list:
    return [g if need[0] else None, g if need[1] else None]


def _ref_affine_forward(run: RefRun, lay: Layer, x: np.ndarray) -> np.ndarray:
    return x * chan(run.param(lay, "scale"), x.ndim) + chan(run.param(lay, "bias"), x.ndim)


def _ref_affine_backward(run: RefRun, lay: Layer, g: np.ndarray, need) -> list:
    return [g * chan(run.param(lay, "scale"), g.ndim)]


def _quant_range(a) -> tuple[int, int]:
    """[qmin, qmax] of a QONNX Quant's integer grid."""
    bits, narrow = int(a["bits"]), int(bool(a["narrow"]))
    if a["signed"]:
        return -(2 ** (bits - 1)) + narrow, 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1 - narrow


def _ref_input_quant_forward(run: RefRun, lay: Layer, x: np.ndarray) -> np.ndarray:
    a = lay.attrs
    qmin, qmax = _quant_range(a)
    scale = np.asarray(a["scale"], x.dtype)
    zp = np.asarray(a["zero_point"], x.dtype)
    if scale.ndim == 1 and scale.size > 1:
        scale = chan(scale, x.ndim)
    if zp.ndim == 1 and zp.size > 1:
        zp = chan(zp, x.ndim)
    q = np.round(np.clip(x / scale + zp, qmin, qmax))     # QONNX order; np.round: half to even
    return ((q - zp) * scale).astype(x.dtype)


REFERENCE_FORWARD: dict = {LayerKind.FLATTEN: _ref_flatten_forward,
                           LayerKind.ADD: _ref_add_forward,
                           LayerKind.AFFINE: _ref_affine_forward,
                           LayerKind.INPUT_QUANT: _ref_input_quant_forward}
REFERENCE_BACKWARD: dict = {LayerKind.FLATTEN: _ref_flatten_backward,
                            LayerKind.ADD: _ref_add_backward,
                            LayerKind.AFFINE: _ref_affine_backward,
                            LayerKind.INPUT_QUANT: no_grad}     # no gradient (the input's)


# ---- export -----------------------------------------------------------------------------------

def _export_flatten(em: Emitter, lay: Layer, xs: list[str], out: str) -> None:
    em.node("Flatten", list(xs), out, axis=1)


def _export_add(em: Emitter, lay: Layer, xs: list[str], out: str) -> None:
    em.node("Add", list(xs), out)


def _chan_shape(v: np.ndarray, ndim: int) -> np.ndarray:
    """A per-channel constant [C] shaped to broadcast over (N, C, ...) activations of `ndim`
    per-sample dims ([C] for vectors, [C, 1, 1] for images); a per-tensor [1] stays [1]."""
    return v.reshape((-1,) + (1,) * (ndim - 1)) if v.size > 1 else v.reshape(1)


def _export_affine(em: Emitter, lay: Layer, xs: list[str], out: str) -> None:
    nd = len(lay.shape)
    scale = em.init(f"{lay.name}.scale", _chan_shape(em.value(lay, "scale"), nd))
    bias = em.init(f"{lay.name}.bias", _chan_shape(em.value(lay, "bias"), nd))
    em.node("Add", [em.node("Mul", [xs[0], scale], f"{out}.mul"), bias], out)


def _export_input_quant(em: Emitter, lay: Layer, xs: list[str], out: str) -> None:
    a, n = lay.attrs, lay.name
    bits, signed, narrow = int(a["bits"]), bool(a["signed"]), bool(a["narrow"])
    scale = em.init(f"{n}.scale", np.float32(a["scale"]))
    zp = em.init(f"{n}.zero_point", np.float32(a["zero_point"]))
    if em.fmt == "qonnx":
        em.node("Quant", [xs[0], scale, zp, em.init(f"{n}.bit_width", np.float32(bits))], out,
                domain=QONNX_DOMAIN, signed=int(signed), narrow=int(narrow),
                rounding_mode="ROUND")
        return
    lo, hi = _quant_range(a)
    # QONNX Quant: (round(clip(x / scale + zp, lo, hi)) - zp) * scale, ROUND = half to even
    y = em.node("Div", [xs[0], scale], f"{out}.div")
    y = em.node("Add", [y, zp], f"{out}.add_zp")
    y = em.node("Clip", [y, em.init(f"{n}.qmin", np.float32(lo)),
                         em.init(f"{n}.qmax", np.float32(hi))], f"{out}.clip")
    y = em.node("Round", [y], f"{out}.round")
    y = em.node("Sub", [y, zp], f"{out}.sub_zp")
    em.node("Mul", [y, scale], out)


EXPORT: dict = {LayerKind.FLATTEN: _export_flatten, LayerKind.ADD: _export_add,
                LayerKind.AFFINE: _export_affine, LayerKind.INPUT_QUANT: _export_input_quant}


FAMILY = OpFamily(
    name="structural", doc=__doc__, layers=LAYER_SPECS, onnx=ONNX, kernels=KERNELS, forward=FORWARD,
    backward=BACKWARD, reference_forward=REFERENCE_FORWARD, reference_backward=REFERENCE_BACKWARD,
    export=EXPORT)
