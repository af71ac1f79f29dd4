"""Batch normalization (ONNX BatchNormalization and folded affine idioms): l2 and l1 BN, training statistics."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .. import numerics as nx
from ..errors import DataError
from ..ir import Layer, LayerKind, tname
from ..c_literals import c_float
from ..lower import Call, LowerCtx, Split, bit_rows_unit, instance, words64
from ..onnx_values import Act, node_attrs, node_label
from ..schedule_ir import Role, Step
from .base import (BIT, F32, GRADS, STATE, KernelFamily, LayerSpec, OnnxOp, OpFamily,
                   Phase, kernel, prod)
from .exportctx import Emitter
from .refctx import RefRun
from .refmath import bits_roundtrip, chan, stat_axes

if TYPE_CHECKING:
    from ..schedule import ScheduleBuilder


# ---- ONNX import ------------------------------------------------------------------------------

def _op_batchnormalization(imp, node, vals):
    a = imp._act(vals[0], node)
    at = node_attrs(node)
    if at.get("training_mode", 0) or any(imp.consumers.get(o) for o in node.output[1:]):
        imp._fail(node, "is in training mode", hint="export the model in eval() mode")
    gamma, beta, mean, var = (np.asarray(imp._const(v, node, w), np.float64) for v, w in
                              zip(vals[1:5], ("scale", "B", "input_mean", "input_var")))
    C = a.onnx_shape[0] if a.view is not None else a.shape[0]
    if any(p.shape != (C,) for p in (gamma, beta, mean, var)):
        shapes = [list(p.shape) for p in (gamma, beta, mean, var)]
        imp._fail(node, f"parameters of shapes {shapes} do not match {C} channels")
    # per-sample views (size-1 axes after the channels) and (H, W, C)-order flattens are fine
    gamma, beta, mean, var = imp.channel_params(a, node, [gamma, beta, mean, var])
    if a.aff is not None and not a.nhwc and np.all(a.aff.scale == 1):
        # a constant bias right before BN shifts the running mean (and cancels in training)
        mean = mean - np.broadcast_to(a.aff.bias, (a.shape[0],))
        x = Act(a.layer, a.shape, view=a.view, perm=a.perm)
    else:
        x = imp._nchw(a, node, keep=("view", "perm"))
    eps = float(np.float32(at.get("epsilon", 1e-5)))
    momentum = float(np.float32(at.get("momentum", 0.9)))
    if not (np.isfinite(eps) and eps >= 0 and 0 <= momentum <= 1):
        imp._fail(node, f"epsilon {eps:g} / momentum {momentum:g} out of range",
                  hint="epsilon must be finite and >= 0, momentum in [0, 1]")
    name = imp._add(LayerKind.BATCHNORM, [x.layer], x.shape, node_label(node),
                    attrs={"eps": eps, "momentum": momentum},
                    params={"gamma": imp._param(gamma, node, "scale"),
                            "beta": imp._param(beta, node, "B"),
                            "mean": imp._param(mean, node, "input_mean"),
                            "var": imp._param(var, node, "input_var")})
    if np.any(imp.specs[name].params["var"] + eps <= 0):
        imp._fail(node, "input_var + epsilon is not positive")
    return Act(name, x.shape, view=x.view, perm=x.perm)


ONNX = {
    "BatchNormalization": OnnxOp(_op_batchnormalization, (5, 5)),
}


# ---- training schedule ------------------------------------------------------------------------

def _bn_attrs(b: ScheduleBuilder, lay: Layer) -> dict:
    shape = b.g.shape_of(lay.inputs[0])
    attrs = dict(batch=b.B, channels=shape[0], spatial=prod(shape[1:]),
                 momentum=b.cfg.bn_momentum)
    if b.cfg.bn == "l2":
        attrs["eps"] = float(lay.attrs["eps"])
    return attrs


def _fwd_bn(b: ScheduleBuilder, lay: Layer) -> None:
    x = b.act[lay.inputs[0]]
    c = (lay.shape[0],)
    y = b.out_f32(lay)
    n = lay.name
    rm = tname(n, "running_mean")
    if n in b.eval_bns:
        # frozen, nothing trainable upstream (ops.eval_mode_bns): inference mode, a pure function
        # of the input and the constant running statistics; no backward, nothing saved
        stat = tname(n, "running_var" if b.cfg.bn == "l2" else "running_psi")
        gamma = (tname(n, "gamma"),) if b.cfg.bn == "l2" else ()
        b.emit(BN_L2_EVAL if b.cfg.bn == "l2" else BN_L1_EVAL, n,
               (x,) + gamma + (tname(n, "beta"), rm, stat), (y,), **_bn_attrs(b, lay))
        b.bn_saved[n] = ()
        return
    train = n in b.has_dout
    if b.cfg.bn == "l2":
        rv = tname(n, "running_var")
        saved = ()
        if train:
            saved = (b.new_act(tname(n, "xh"), F32, b.tensors[x].shape, Role.SCRATCH),
                     b.new(tname(n, "inv_std"), F32, c, Role.SCRATCH))
        b.emit(BN_L2_FWD, n, (x, tname(n, "gamma"), tname(n, "beta"), rm, rv),
               (y, rm, rv) + saved, **_bn_attrs(b, lay))
    else:
        rp = tname(n, "running_psi")
        mu = b.new(tname(n, "mu"), F32, c, Role.SCRATCH)
        psi = b.new(tname(n, "psi"), F32, c, Role.SCRATCH)
        s = (b.bits(tname(n, "s"), b.tensors[x].shape, Role.SCRATCH, "flat"),) \
            if train else ()
        b.emit(BN_L1_FWD, n, (x, tname(n, "beta"), rm, rp),
               (y, rm, rp, mu, psi) + s, **_bn_attrs(b, lay))
        saved = s + (psi,) if train else ()
    b.bn_saved[n] = saved


def _bwd_bn(b: ScheduleBuilder, lay: Layer) -> None:
    n, p = lay.name, lay.inputs[0]
    d = tname(n, "d_out")
    shape = lay.params["beta"].shape
    dbeta = b.new(tname(n, "dbeta"), F32, shape, Role.GRAD)
    t = (b.target(p, n),) if b.ng[p] else ()
    if b.cfg.bn == "l2":
        dgamma = b.new(tname(n, "dgamma"), F32, shape, Role.GRAD)
        b.emit(BN_L2_BWD, n, (d,) + b.bn_saved[n] + (tname(n, "gamma"),),
               (dgamma, dbeta) + t, **_bn_attrs(b, lay))
    else:
        b.emit(BN_L1_BWD, n, (d,) + b.bn_saved[n], (dbeta,) + t,
               **_bn_attrs(b, lay))
    if t:
        b.contribute(p, t[0], n)
    if b.cfg.bn == "l2":
        b.update(lay, "gamma", dgamma)
    b.update(lay, "beta", dbeta)


def _check_shapes(lay: Layer, ins) -> str | None:
    if lay.params["beta"].shape != (ins[0][0],) or ins[0] != lay.shape:
        return f"{lay.params['beta'].shape[0]} channels for input {ins[0]}"
    return None


FORWARD = {LayerKind.BATCHNORM: _fwd_bn}
BACKWARD = {LayerKind.BATCHNORM: _bwd_bn}
LAYER_SPECS = (LayerSpec(LayerKind.BATCHNORM, "bn", attrs=("eps", "momentum"),
                         params=("gamma", "beta", "mean", "var"), check_shapes=_check_shapes,
                         trainable=True, output=True),)


# ---- kernels: contract (dtypes, in-place) + C lowering -----------------------------------------

def _lower_bn_fwd(step: Step, ctx: LowerCtx) -> Call:
    a = step.attrs
    b, c, sp = a["batch"], a["channels"], a["spatial"]
    m = a["momentum"]
    if step.kernel is BN_L2_FWD:
        x, gamma, beta, rm, rv = step.inputs
        outs = step.outputs
        y = outs[0]
        xh = outs[3] if len(outs) > 3 else None
        inv = outs[4] if len(outs) > 4 else None
        ops = {"gamma": gamma, "beta": beta, "rm": rm}
        inst = instance(step, ctx, operands=ops, saved=xh is not None, rows=sp == 1)
        return Call(inst, [ctx.ptr(x), ctx.ptr(gamma), ctx.ptr(beta),
                           ctx.ptr(rm), ctx.ptr(rv), ctx.ptr(y), ctx.ptr(xh) if xh else "0",
                           ctx.ptr(inv) if inv else "0", b, c, sp, c_float(a["eps"]), c_float(m),
                           c_float(1 - m), 0, c], split=_channel_split(c, sp))
    x, beta, rm, rp = step.inputs
    outs = step.outputs
    y, mu, psi = outs[0], outs[3], outs[4]
    s = outs[5] if len(outs) > 5 else None
    ops = {"beta": beta, "rm": rm}
    inst = instance(step, ctx, operands=ops, signs=s is not None, rows=sp == 1)
    return Call(inst, [ctx.ptr(x), ctx.ptr(beta), ctx.ptr(rm), ctx.ptr(rp), ctx.ptr(y),
                       ctx.ptr(mu), ctx.ptr(psi), ctx.ptr(s) if s else "0", b, c, sp,
                       words64(c * sp), c_float(m), c_float(1 - m), 0, c],
                split=_channel_split(c, sp, bit_rows_unit(sp) if s else 1))


def _channel_split(c: int, sp: int, unit: int = 1) -> Split:
    """BN statistics sum over the batch: threads take channels (blocks of 64 for vectors, whose
    loops run 64 channels at a time; `unit` keeps packed outputs word-aligned)."""
    return Split(c, 64 if sp == 1 else unit, ranged=True)


def _lower_bn_bwd(step: Step, ctx: LowerCtx) -> Call:
    a = step.attrs
    b, c, sp = a["batch"], a["channels"], a["spatial"]
    if step.kernel is BN_L2_BWD:
        g, xh, inv, gamma = step.inputs
        dgamma, dbeta = step.outputs[:2]
        d_in = step.outputs[2] if len(step.outputs) > 2 else None
        ops = {"g": g, "gamma": gamma} | ({"dx": d_in} if d_in else {})
        inst = instance(step, ctx, operands=ops, dx=d_in is not None, rows=sp == 1)
        return Call(inst, [ctx.ptr(g), ctx.ptr(xh), ctx.ptr(inv),
                           ctx.ptr(gamma), ctx.ptr(dgamma), ctx.ptr(dbeta),
                           ctx.ptr(d_in) if d_in else "0", b, c, sp, 0, c],
                    split=_channel_split(c, sp))
    g, s, psi = step.inputs
    dbeta = step.outputs[0]
    d_in = step.outputs[1] if len(step.outputs) > 1 else None
    ops = {"g": g} | ({"dx": d_in} if d_in else {})
    inst = instance(step, ctx, operands=ops, dx=d_in is not None, rows=sp == 1)
    return Call(inst, [ctx.ptr(g), ctx.ptr(s), ctx.ptr(psi), ctx.ptr(dbeta),
                       ctx.ptr(d_in) if d_in else "0", b, c, sp, words64(c * sp), 0, c],
                split=_channel_split(c, sp))


def _lower_bn_infer(step: Step, ctx: LowerCtx) -> Call:
    """Inference mode (running statistics, nothing written but y): the predict entry's call for
    every BN forward step, and the training step's for a BN in inference mode (`BN_*_EVAL`)."""
    a = step.attrs
    b, c, sp = a["batch"], a["channels"], a["spatial"]
    x, y = step.inputs[0], step.outputs[0]
    if step.kernel in (BN_L2_FWD, BN_L2_EVAL):
        gamma, beta, rm, rv = step.inputs[1:5]
        inst = instance(step, ctx, "bn_l2_infer", {"gamma": gamma, "beta": beta, "rm": rm})
        return Call(inst, [ctx.ptr(x), ctx.ptr(gamma), ctx.ptr(beta), ctx.ptr(rm), ctx.ptr(rv),
                           ctx.ptr(y), b, c, sp, c_float(a["eps"])])
    beta, rm, rp = step.inputs[1:4]
    inst = instance(step, ctx, "bn_l1_infer", {"beta": beta, "rm": rm})
    return Call(inst, [ctx.ptr(x), ctx.ptr(beta), ctx.ptr(rm), ctx.ptr(rp), ctx.ptr(y), b, c, sp])


def _magnitude_fwd(step: Step, name: str, mag) -> np.ndarray | None:
    """The batch mean's terms (runtime/check.py's tolerance of `mu` and `running_mean`)."""
    if not name.endswith((".mu", ".running_mean")):
        return None
    a = step.attrs
    return mag.value(step.inputs[0]).reshape(a["batch"], a["channels"], -1).mean(axis=(0, 2))


def _magnitude_bwd(step: Step, name: str, mag) -> np.ndarray | None:
    """The terms of the dbeta (sum G) and dgamma (sum G xh) sums."""
    if not name.endswith((".dbeta", ".dgamma")):
        return None
    a = step.attrs
    g = mag.value(step.inputs[0]).reshape(a["batch"], a["channels"], -1)
    if name.endswith(".dgamma"):
        g = g * mag.value(step.inputs[1]).reshape(g.shape)
    return g.sum(axis=(0, 2))


# forward: training statistics; running statistics updated in the same pass
BN_L2_FWD = kernel(
    "bn_l2_fwd", Phase.FORWARD, KernelFamily.BN,
    "l2 BN: xh = (y - mu) * inv_std, out = gamma xh + beta; running mean/var updated",
    [("x", F32), ("gamma", STATE), ("beta", STATE), ("running_mean", STATE),
     ("running_var", STATE)],
    [("y", F32), ("running_mean", STATE), ("running_var", STATE), ("xh?", F32),
     ("inv_std?", F32)], [(0, 0)], lower=_lower_bn_fwd, lower_infer=_lower_bn_infer,
    magnitude=_magnitude_fwd)
BN_L1_FWD = kernel(
    "bn_l1_fwd", Phase.FORWARD, KernelFamily.BN,
    "l1 BN: psi = mean|y - mu|, out = (y - mu)/psi + beta; sign bits of xh; running stats",
    [("x", F32), ("beta", STATE), ("running_mean", STATE), ("running_psi", STATE)],
    [("y", F32), ("running_mean", STATE), ("running_psi", STATE), ("mu", F32), ("psi", F32),
     ("s?", BIT)], [(0, 0)], lower=_lower_bn_fwd, lower_infer=_lower_bn_infer,
    magnitude=_magnitude_fwd)
BN_L2_BWD = kernel(
    "bn_l2_bwd", Phase.BACKWARD, KernelFamily.BN,
    "dgamma = sum G xh, dbeta = sum G, dY = inv_std (gG - mean(gG) - xh mean(gG xh)), g = gamma",
    [("d_out", GRADS), ("xh", F32), ("inv_std", F32), ("gamma", STATE)],
    [("dgamma", F32), ("dbeta", F32), ("d_in?", GRADS)], [(2, 0)], lower=_lower_bn_bwd,
    magnitude=_magnitude_bwd)
BN_L1_BWD = kernel(
    "bn_l1_bwd", Phase.BACKWARD, KernelFamily.BN,
    "dbeta = sum G; H = f16(G)/psi; dY = H - mean(H) - s mean(H s)",
    [("d_out", GRADS), ("s", BIT), ("psi", F32)], [("dbeta", F32), ("d_in?", GRADS)], [(1, 0)],
    lower=_lower_bn_bwd, magnitude=_magnitude_bwd)

# forward of a frozen BN with nothing trainable upstream (ops.eval_mode_bns): inference mode
BN_L2_EVAL = kernel(
    "bn_l2_eval", Phase.FORWARD, KernelFamily.BN,
    "l2 BN in inference mode: out = gamma (y - running_mean) / sqrt(running_var + eps) + beta",
    [("x", F32), ("gamma", STATE), ("beta", STATE), ("running_mean", STATE),
     ("running_var", STATE)], [("y", F32)], [(0, 0)], lower=_lower_bn_infer,
    lower_infer=_lower_bn_infer)
BN_L1_EVAL = kernel(
    "bn_l1_eval", Phase.FORWARD, KernelFamily.BN,
    "l1 BN in inference mode: out = (y - running_mean) (1 / running_psi) + beta",
    [("x", F32), ("beta", STATE), ("running_mean", STATE), ("running_psi", STATE)],
    [("y", F32)], [(0, 0)], lower=_lower_bn_infer, lower_infer=_lower_bn_infer)



KERNELS = (BN_L2_FWD, BN_L1_FWD, BN_L2_BWD, BN_L1_BWD, BN_L2_EVAL, BN_L1_EVAL)


# ---- numpy reference --------------------------------------------------------------------------

def _ref_forward(run: RefRun, lay: Layer, y: np.ndarray) -> np.ndarray:
    cfg, ax, nd = run.cfg, stat_axes(y), y.ndim
    eps = float(lay.attrs["eps"])
    beta = chan(run.param(lay, "beta"), nd)
    if not run.training or lay.name in run.eval_bns:
        # inference, or a frozen BN with nothing trainable upstream in a training step
        # (ops.eval_mode_bns): running statistics, nothing emitted, saved or updated
        mean = chan(run.param(lay, "running_mean"), nd)
        if cfg.bn == "l2":
            inv = 1 / np.sqrt(chan(run.param(lay, "running_var"), nd) + eps)
            return chan(run.param(lay, "gamma"), nd) * ((y - mean) * inv) + beta
        rp = chan(run.param(lay, "running_psi"), nd)
        return (y - mean) * (1 / rp) + beta
    m = np.float32(cfg.bn_momentum).astype(run.dtype)
    one_m = np.float32(1 - cfg.bn_momentum).astype(run.dtype)
    mu = y.mean(axis=ax, keepdims=True)
    yc = y - mu
    run.emit(lay, "mu", mu.reshape(-1))
    rm = m * run.param(lay, "running_mean") + one_m * mu.reshape(-1)
    if cfg.bn == "l2":
        var = (yc * yc).mean(axis=ax, keepdims=True)
        inv = 1 / np.sqrt(var + y.dtype.type(eps))
        xh = yc * inv
        z = chan(run.param(lay, "gamma"), nd) * xh + beta
        run.saved[lay.name] = {"xh": xh, "inv": inv}
        run.emit(lay, "inv_std", inv.reshape(-1))
        run.emit(lay, "var", var.reshape(-1))
        stats = {"running_mean": rm,
                 "running_var": m * run.param(lay, "running_var") + one_m * var.reshape(-1)}
    else:
        psi = np.abs(yc).mean(axis=ax, keepdims=True)
        with np.errstate(divide="ignore"):
            inv = np.where(psi > 0, 1 / psi, 0).astype(y.dtype)
        xh = yc * inv
        z = xh + beta
        s = np.where(xh >= 0, 1, -1).astype(np.int8)
        if cfg.save_bits:
            s = bits_roundtrip(s, pm1=True)
        run.saved[lay.name] = {"s": s, "inv": inv}
        run.emit(lay, "psi", psi.reshape(-1))
        run.emit(lay, "s", s)
        stats = {"running_mean": rm,
                 "running_psi": m * run.param(lay, "running_psi") + one_m * psi.reshape(-1)}
    run.emit(lay, "xh", xh)
    for f, v in stats.items():
        run.emit(lay, f, v)          # pre-store value; train_step replaces it with the stored one
    run.saved[lay.name]["stats"] = stats
    return z


def _ref_backward(run: RefRun, lay: Layer, g: np.ndarray, need) -> list:
    sv, ax, nd = run.saved[lay.name], stat_axes(g), g.ndim
    run.emit(lay, "dbeta", g.sum(axis=ax))
    if run.cfg.bn == "l2":
        xh, inv = sv["xh"], sv["inv"]
        run.emit(lay, "dgamma", (g * xh).sum(axis=ax))
        dxh = chan(run.param(lay, "gamma"), nd) * g
        dy = inv * (dxh - dxh.mean(axis=ax, keepdims=True)
                    - xh * (dxh * xh).mean(axis=ax, keepdims=True))
    else:
        s = sv["s"].astype(g.dtype)
        h = nx.to_f16_rne(g).astype(g.dtype) * sv["inv"]
        dy = h - h.mean(axis=ax, keepdims=True) - s * (h * s).mean(axis=ax, keepdims=True)
    return [dy if need[0] else None]


REFERENCE_FORWARD: dict = {LayerKind.BATCHNORM: _ref_forward}
REFERENCE_BACKWARD: dict = {LayerKind.BATCHNORM: _ref_backward}


# ---- export -----------------------------------------------------------------------------------

def _export(em: Emitter, lay: Layer, xs: list[str], out: str) -> None:
    """l2 as is; l1 as scale 1 and running_var = running_psi^2 - eps (export.py docstring)."""
    eps = float(np.float32(lay.attrs["eps"]))
    n = lay.name
    beta = em.value(lay, "beta")
    mean = em.value(lay, "running_mean")
    if em.cfg.bn == "l2":
        gamma, var = em.value(lay, "gamma"), em.value(lay, "running_var")
        if np.any(var.astype(np.float64) + eps <= 0):
            raise DataError(f"state tensor '{tname(n, 'running_var')}' has entries <= -eps "
                            f"({eps:g}); batch norm {n!r} cannot be exported",
                            hint="the state is corrupt or the training run diverged")
    else:
        gamma, psi = np.ones_like(beta), em.value(lay, "running_psi")
        if np.any((psi <= 0) | (psi * psi == 0)):
            raise DataError(f"state tensor '{tname(n, 'running_psi')}' has entries that are <= 0 "
                            f"or so small their square underflows float32 (about 2.6e-23); l1 "
                            f"batch norm {n!r} divides by it, ONNX BatchNormalization by "
                            f"sqrt(var + eps)",
                            hint="the state is corrupt, or a channel never varied in training")
        var = (psi.astype(np.float64) ** 2 - eps).astype(np.float32)
        if np.any(var < 0):
            eps, var = 0.0, psi * psi
    em.node("BatchNormalization",
            [xs[0], em.init(f"{n}.gamma", gamma), em.init(f"{n}.beta", beta),
             em.init(f"{n}.running_mean", mean), em.init(f"{n}.running_var", var)], out,
            epsilon=eps, momentum=float(np.float32(lay.attrs["momentum"])))


EXPORT: dict = {LayerKind.BATCHNORM: _export}


FAMILY = OpFamily(
    name="batchnorm", doc=__doc__, layers=LAYER_SPECS, onnx=ONNX, kernels=KERNELS, forward=FORWARD,
    backward=BACKWARD, reference_forward=REFERENCE_FORWARD, reference_backward=REFERENCE_BACKWARD,
    export=EXPORT)
