"""Optimizers: one update kernel per parameter tensor (Adam, SGD, Bop) with 16-bit stochastic-rounding stores."""

from __future__ import annotations

import numpy as np

from .. import numerics as nx
from ..config import TrainConfig
from ..c_literals import c_float
from ..lower import Call, LowerCtx, Split, instance, words64
from ..schedule_ir import DType, Step
from .base import BIT, F32, SAVED_X, STATE, KernelFamily, OpFamily, Phase, kernel
from .dense import packed_w_geometry


# ---- ONNX import ------------------------------------------------------------------------------

ONNX: dict = {}


# ---- training schedule ------------------------------------------------------------------------

FORWARD: dict = {}
BACKWARD: dict = {}


# ---- kernels: contract (dtypes, in-place) + C lowering -----------------------------------------

def _lr(step: Step) -> str:
    """The lr operand: the constant, or the schedule's value for the step being taken
    (`BNNC_LR()`, templates/model.c.j2; numerics.lr_at)."""
    a = step.attrs
    return c_float(a["lr"]) if a.get("lr_schedule", "constant") == "constant" else "BNNC_LR()"


def _update_common(step: Step, ctx: LowerCtx) -> tuple[dict, list]:
    a = step.attrs
    p, g = step.inputs[0], step.inputs[1]
    gt = ctx.t(g)
    ops = {"p": p}
    if gt.dtype is not DType.BIT:
        ops["g"] = g
    gbits = [c_float(a.get("g_scale", 1.0)), int(bool(a.get("ste_mask", False)))]
    return ops, gbits


def _lower_adam(step: Step, ctx: LowerCtx) -> Call:
    a = step.attrs
    p, g, m, v = step.inputs
    ops, gbits = _update_common(step, ctx)
    ops.update(m=m, v=v)
    inst = instance(step, ctx, operands=ops, gbit=ctx.t(g).dtype is DType.BIT)
    mid, vid = a["moment_ids"]
    b1, b2 = a["beta1"], a["beta2"]
    return Call(inst, [ctx.ptr(p), ctx.ptr(g), ctx.ptr(m), ctx.ptr(v), a["size"]] + gbits + [
        _lr(step), c_float(b1), c_float(b2), c_float(1 - b1), c_float(1 - b2),
        f"bnnc_one_minus_pow({c_float(b1)}, t)", f"bnnc_one_minus_pow({c_float(b2)}, t)",
        c_float(a["eps"]), f"bnnc_sr_key(seed, t, {a['tensor_id']}u)",
        f"bnnc_sr_key(seed, t, {mid}u)", f"bnnc_sr_key(seed, t, {vid}u)", 0, a["size"]],
        split=_element_split(a["size"]))


def _lower_sgd(step: Step, ctx: LowerCtx) -> Call:
    a = step.attrs
    p, g, m = step.inputs
    ops, gbits = _update_common(step, ctx)
    ops.update(m=m)
    inst = instance(step, ctx, operands=ops, gbit=ctx.t(g).dtype is DType.BIT)
    (mid,) = a["moment_ids"]
    return Call(inst, [ctx.ptr(p), ctx.ptr(g), ctx.ptr(m), a["size"]] + gbits + [
        _lr(step), c_float(a["momentum"]), f"bnnc_sr_key(seed, t, {a['tensor_id']}u)",
        f"bnnc_sr_key(seed, t, {mid}u)", 0, a["size"]], split=_element_split(a["size"]))


def _element_split(size: int) -> Split:
    """An update is element-wise: threads take blocks of 64 elements (whole words of a 1-bit
    gradient), each keyed by its own index as before."""
    return Split(size, 64, ranged=True)


def bop_geometry(ctx: LowerCtx, p: str) -> list:
    """Where element i (row-major W) of a Bop weight lives in its packed rows (wbit_pos args)."""
    pt = ctx.t(p)
    if len(pt.shape) == 4:
        co, ci, kh, kw = pt.shape
        return [1, ci, kh * kw, words64(ci), 1, 0]
    k, n = pt.shape
    hw, wc = packed_w_geometry(ctx.s, p)
    return [0, k, n, hw * wc if wc else words64(k), hw, wc]


def _lower_bop(step: Step, ctx: LowerCtx) -> Call:
    a = step.attrs
    p, g, m = step.inputs[:3]
    shift = step.inputs[3:]           # (saved input, running mean): flip-compensated running mean
    gt = ctx.t(g)
    ops = {"m": m} | ({} if gt.dtype is DType.BIT else {"g": g})
    ops |= dict(zip(("x", "rm"), shift))
    inst = instance(step, ctx, operands=ops, gbit=gt.dtype is DType.BIT, shift=bool(shift))
    (mid,) = a["moment_ids"]
    geo = bop_geometry(ctx, p)
    return Call(inst, [ctx.ptr(p), ctx.ptr(g), ctx.ptr(m), a["size"], c_float(1 - a["gamma"]),
                       c_float(a["threshold"]), f"bnnc_sr_key(seed, t, {mid}u)"] + geo
                + ([ctx.ptr(shift[0]), ctx.ptr(shift[1]), a["batch"]] if shift else [])
                + [0, a["size"]], split=None if shift else _bop_split(a["size"], geo))


def _bop_split(size: int, geo: list) -> Split:
    """Bop flips bits of packed rows: a thread's elements must fill whole 64-bit words. Conv W
    (kind 1): whole output channels (their rows hold no other channel's bits); dense W [K, N]
    (kind 0): whole groups of 64 input features per word, i.e. 64 rows of W, or with a
    channel-major input (wc) 64 channels at every position: 64 * hw rows. (With the running-mean
    compensation every element writes the means of all outputs: no split, `_lower_bop`.)"""
    kind, a, b, _, hw, wc = geo
    return Split(size, a * b if kind == 1 else 64 * b * (hw if wc else 1), ranged=True)


# one kernel call per parameter tensor; state stored back with stochastic rounding for 16-bit
# dtypes, keyed by (seed, step, tensor id, element)
ADAM_UPDATE = kernel(
    "adam_update", Phase.UPDATE, KernelFamily.OPTIM,
    "Adam with bias correction; a BIT gradient is decoded as +-scale * 1[|W| <= 1]",
    [("p", STATE), ("g", (F32, BIT)), ("m", STATE), ("v", STATE)],
    [("p", STATE), ("m", STATE), ("v", STATE)], [(0, 0), (1, 2), (2, 3)], lower=_lower_adam)
SGD_UPDATE = kernel(
    "sgd_update", Phase.UPDATE, KernelFamily.OPTIM, "SGD with momentum: m = mu m + g; p -= lr m",
    [("p", STATE), ("g", (F32, BIT)), ("m", STATE)], [("p", STATE), ("m", STATE)],
    [(0, 0), (1, 2)], lower=_lower_sgd)
BOP_UPDATE = kernel(
    "bop_update", Phase.UPDATE, KernelFamily.OPTIM,
    "Bop, scaled momentum: m = (1-gamma) m + g / mean|g|; flip w where |m| > threshold and "
    "sign(m) == sign(w); with x and rm, each flip of w_kj also sets rm_j -= 2 w_kj mean_b(x_bk)",
    [("p", BIT), ("g", (F32, BIT)), ("m", STATE), ("x?", SAVED_X), ("rm?", STATE)],
    [("p", BIT), ("m", STATE), ("rm?", STATE)], [(0, 0), (1, 2), (2, 4)], lower=_lower_bop)

KERNELS = (ADAM_UPDATE, SGD_UPDATE, BOP_UPDATE)
UPDATE_KERNELS = {"adam": ADAM_UPDATE, "sgd": SGD_UPDATE, "bop": BOP_UPDATE}   # by cfg.optimizer


# ---- numpy reference --------------------------------------------------------------------------

# (cfg, t, value, grad, moments, lr) -> (new value, new moments), all float32, before storing;
# lr: the float32 learning rate of step t (numerics.lr_at: cfg.lr under the run's schedule)


def _ref_adam(cfg: TrainConfig, t: int, w: np.ndarray, g: np.ndarray,
              mom: dict[str, np.ndarray], lr: np.float32) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """PyTorch's Adam formula: m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
    W = W - (lr * (m / bc1)) / (sqrt(v / bc2) + eps), bc1 = 1 - b1^t, bc2 = 1 - b2^t (t after
    increment; 1 - b^t in float32, numerics.one_minus_pow).
    The W update reads the float32 m, v of this step (before they are rounded for storage)."""
    b1, b2 = np.float32(cfg.beta1), np.float32(cfg.beta2)
    c1, c2 = np.float32(1 - cfg.beta1), np.float32(1 - cfg.beta2)
    # float32 binary powering, as the C does it (no doubles on an FPU-less-for-double MCU)
    bc1, bc2 = nx.one_minus_pow(cfg.beta1, t), nx.one_minus_pow(cfg.beta2, t)
    m = b1 * mom["m"] + c1 * g
    v = b2 * mom["v"] + c2 * (g * g)
    w = w - (np.float32(lr) * (m / bc1)) / (np.sqrt(v / bc2) + np.float32(cfg.adam_eps))
    return w, {"m": m, "v": v}


def _ref_sgd(cfg: TrainConfig, t: int, w: np.ndarray, g: np.ndarray,
             mom: dict[str, np.ndarray], lr: np.float32) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """SGD with momentum (PyTorch, no dampening): m = mu m + g; W = W - lr m."""
    m = np.float32(cfg.sgd_momentum) * mom["m"] + g
    return w - np.float32(lr) * m, {"m": m}


def _bop_unit_gradient(cfg: TrainConfig, g: np.ndarray) -> np.ndarray:
    """g / mean|g|: exactly +-1 for a 1-bit gradient (all of magnitude 1/sqrt(N_W)); a float one
    times count / sum|g|, the float32 sum taken in element order as the C loop does (cumsum is
    sequential), 0 for an all-zero gradient."""
    if cfg.binary_dw:
        return np.where(g >= 0, 1, -1).astype(np.float32)
    total = np.cumsum(np.abs(g).ravel(), dtype=np.float32)[-1]
    inv = np.float32(g.size) / total if total > 0 else np.float32(0)
    return g * inv


def _ref_bop(cfg: TrainConfig, t: int, w: np.ndarray, g: np.ndarray, mom: dict[str, np.ndarray],
             lr: np.float32 | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Bop (Helwegen et al. 2019) on +-1 weights with a scaled momentum (compiler/README.md,
    "Bop"): m = (1-gamma) m + u, u = the gradient in units of its mean magnitude
    (`_bop_unit_gradient`), which is Larq's momentum divided by gamma mean|g|; w = -w where
    |m| > threshold and sign(m) == sign(w) (the gradient agrees with the weight, so flipping lowers
    the loss). No learning rate: the schedule acts on the Adam-trained real tensors only."""
    m = np.float32(1 - cfg.bop_gamma) * mom["m"] + _bop_unit_gradient(cfg, g)
    flip = (np.abs(m) > np.float32(cfg.bop_threshold)) & ((m >= 0) == (w > 0))
    return np.where(flip, -w, w).astype(np.int8), {"m": m}


def bop_input_means(x: np.ndarray, k: int) -> np.float32:
    """mean_b(x[b, k]) as the Bop update's shift computes it: a float32 sum in batch order
    divided by the batch (for +-1 inputs the sum is an exact count)."""
    col = np.asarray(x, np.float32)[:, k]
    return np.cumsum(col, dtype=np.float32)[-1] / np.float32(len(col))


def ref_bop_bn_shift(w_old: np.ndarray, w_new: np.ndarray, x: np.ndarray, rm: np.ndarray,
                     dtype: str) -> np.ndarray:
    """The flip-compensated running mean (compiler/README.md, "Bop"): `rm` (stored, [N]) after
    the flips w_old -> w_new of a dense W [K, N] whose saved input is `x` [B, K]: flip by flip in
    row-major order of W, rm_j = store(rm_j - 2 w_old_kj mean_b(x_bk)), RNE in the statistics'
    dtype, as the C's Bop update does it."""
    rm = np.asarray(rm, np.float32).copy()
    n = w_old.shape[1]
    for i in np.flatnonzero(np.asarray(w_old).ravel() != np.asarray(w_new).ravel()):
        k, j = divmod(int(i), n)
        two_xbar = np.float32(2) * bop_input_means(x, k)
        r = rm[j] - two_xbar if w_old.flat[i] > 0 else rm[j] + two_xbar
        rm[j] = nx.store(np.float32(r).reshape(1), dtype)[0]
    return rm


REFERENCE_FORWARD: dict = {}
REFERENCE_BACKWARD: dict = {}
REFERENCE_UPDATE: dict = {"adam": _ref_adam, "sgd": _ref_sgd, "bop": _ref_bop}


# ---- export -----------------------------------------------------------------------------------
EXPORT: dict = {}

FAMILY = OpFamily(
    name="optim", doc=__doc__, layers=(), onnx=ONNX, kernels=KERNELS, forward=FORWARD,
    backward=BACKWARD, reference_forward=REFERENCE_FORWARD, reference_backward=REFERENCE_BACKWARD,
    reference_update=REFERENCE_UPDATE, export=EXPORT)
