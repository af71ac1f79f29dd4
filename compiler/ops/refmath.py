"""numpy helpers shared by several families' reference functions: the reproducible matmul, channel
broadcasting, 1-bit storage emulation, window views for conv and pooling, and the weight layers'
(dense, conv) saved input and parameter gradients.

Exact float32 conventions (runtime/reference.py's module docstring has the whole list): products
accumulate in float64 and are rounded once (`matmul`); scalar coefficients are computed in double
and rounded once to float32 (`np.float32(1 / sqrt(N_W))`).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from .. import numerics as nx
from ..config import is_frozen
from ..errors import ConfigError
from ..ir import Layer, LayerKind
from .refctx import RefRun

_MATMUL_ROWS = 1 << 14     # rows of `a` widened to float64 at a time (bounds the temporary)


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b for 2-D b, accumulated in float64 and rounded once to a's dtype.

    BLAS float32 sums depend on the library's blocking and thread count, so the reference would
    not be reproducible across machines; a float64 sum rounded once is (but for values within
    ~1e-16 of a float32 rounding boundary) the correctly rounded result, whatever the order.
    """
    if a.dtype == np.float64:
        return a @ b
    b64 = b.astype(np.float64)
    a2 = a.reshape(-1, a.shape[-1])
    out = np.empty((a2.shape[0], b.shape[-1]), a.dtype)
    for i in range(0, a2.shape[0], _MATMUL_ROWS):
        out[i:i + _MATMUL_ROWS] = a2[i:i + _MATMUL_ROWS].astype(np.float64) @ b64
    return out.reshape(a.shape[:-1] + (b.shape[-1],))


def chan(p: np.ndarray, ndim: int) -> np.ndarray:
    """Per-channel vector [C] (or [1]) broadcast against (B, C, ...) activations."""
    return p.reshape((1, -1) + (1,) * (ndim - 2))


def stat_axes(x: np.ndarray) -> tuple[int, ...]:
    """The axes a per-channel statistic reduces over: batch, and the spatial ones of an image."""
    return (0,) if x.ndim == 2 else (0,) + tuple(range(2, x.ndim))


def bits_roundtrip(a: np.ndarray, *, pm1: bool) -> np.ndarray:
    """Pack one sample per row and unpack again: what the C keeps for a 1-bit saved tensor."""
    flat = a.reshape(len(a), -1)
    back = nx.unpack_bits(nx.pack_bits(flat), flat.shape[1], pm1=pm1)
    return back.reshape(a.shape)


def mask_store(run: RefRun, m: np.ndarray) -> np.ndarray:
    """A 0/1 mask as the C keeps it: int8, through 1-bit packing under cfg.save_bits."""
    m = m.astype(np.int8)
    return bits_roundtrip(m, pm1=False) if run.cfg.save_bits else m


def no_grad(run: RefRun, lay: Layer, g: np.ndarray, need) -> list:
    """Backward of a layer nothing differentiates through."""
    return [None] * len(lay.inputs)


# ---- windows (conv / pools) ----------------------------------------------------------------------

def pad(x: np.ndarray, pads, value=0.0) -> np.ndarray:
    t, l, b, r = (int(p) for p in pads)
    return np.pad(x, ((0, 0), (0, 0), (t, b), (l, r)), constant_values=value)


def windows(xp: np.ndarray, kh: int, kw: int, sh: int, sw: int) -> np.ndarray:
    """(B, C, Hp, Wp) -> view (B, C, Ho, Wo, kh, kw) of the stride-(sh, sw) windows."""
    v = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(2, 3))
    return v[:, :, ::sh, ::sw]


def unwindow(dwin: np.ndarray, padded_shape, sh: int, sw: int) -> np.ndarray:
    """Adjoint of `windows`: scatter-add (B, C, Ho, Wo, kh, kw) window gradients into the padded
    input."""
    out = np.zeros(padded_shape, dwin.dtype)
    _, _, ho, wo, kh, kw = dwin.shape
    for i in range(kh):
        for j in range(kw):
            out[:, :, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw] += dwin[..., i, j]
    return out


def abs_windows(xa: np.ndarray, a: dict) -> np.ndarray:
    """(B, C, H, W) -> (B, C, OH, OW, kh, kw) windows of the zero-padded input (a conv step's
    attrs `a` give the geometry)."""
    t, l, b, r = a["pads"]
    xp = np.pad(xa, ((0, 0), (0, 0), (t, b), (l, r)))
    v = np.lib.stride_tricks.sliding_window_view(xp, (a["kh"], a["kw"]), axis=(2, 3))
    sh, sw = a["strides"]
    return v[:, :, ::sh, ::sw][:, :, :a["oh"], :a["ow"]]


def abs_conv_dx(dya: np.ndarray, wa: np.ndarray, a: dict) -> np.ndarray:
    """|dY| (B, K, OH, OW) through |W| (K, C, kh, kw) back to the input positions (B, C, H, W)."""
    t, l, b, r = a["pads"]
    sh, sw = a["strides"]
    out = np.zeros((dya.shape[0], wa.shape[1], a["h"] + t + b, a["w"] + l + r))
    for i in range(a["kh"]):
        for j in range(a["kw"]):
            out[:, :, i:i + sh * (a["oh"] - 1) + 1:sh, j:j + sw * (a["ow"] - 1) + 1:sw] += \
                np.einsum("bkyx,kc->bcyx", dya, wa[:, :, i, j])
    return out[:, :, t:t + a["h"], l:l + a["w"]]


def conv_magnitude(kind: str, step, mag) -> np.ndarray:
    """Sum of |terms| of a conv step's forward ("fwd"), dW ("dw") or dX ("dx") outputs."""
    a, ins = step.attrs, step.inputs
    if kind == "fwd":
        return np.einsum("bcyxij,kcij->bkyx", abs_windows(mag.value(ins[0]), a), mag.weight(ins[1]))
    if kind == "dw":
        return np.einsum("bcyxij,bkyx->kcij", abs_windows(mag.value(ins[0]), a), mag.value(ins[1]))
    return abs_conv_dx(mag.value(ins[0]), mag.weight(ins[-1]), a)


def crop(xp: np.ndarray, pads) -> np.ndarray:
    t, l, b, r = (int(p) for p in pads)
    return xp[:, :, t:xp.shape[2] - b, l:xp.shape[3] - r]


# ---- weight layers (dense, conv, gconv) -----------------------------------------------------------------

def save_weight_input(run: RefRun, lay: Layer, x: np.ndarray) -> np.ndarray:
    """What a dense/conv layer keeps of its input for dW (runtime/reference.py's docstring)."""
    src = lay.inputs[0]
    if is_frozen(run.cfg, lay.name, "W"):
        return x        # no dW to compute: nothing is kept (the schedule keeps nothing either)
    if lay.binary and run.pm1_input(src):
        assert np.all(np.abs(x) == 1), f"{lay.name}: input expected to be +-1"
        return bits_roundtrip(x, pm1=True).astype(run.dtype) if run.cfg.save_bits else x
    # a binary layer's real input is kept as given only when nothing upstream is trainable (the
    # first layer: the C reads it from the caller's batch); otherwise it is a live activation the C
    # cannot keep in f32 under save_bits
    if run.cfg.save_bits and (not lay.binary or run.needs_grad[src]):
        xs = nx.to_f16_rne(x).astype(run.dtype)
        run.emit(lay, "x_saved", xs)
        return xs
    return x


def weight_grads(run: RefRun, lay: Layer, dy: np.ndarray, x_mat: np.ndarray | None, *,
                 dw_of: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """dY (rows = samples/positions, cols = outputs) -> the dY that feeds dX (Q for PO2 binary
    layers).

    Emits dW (as x_mat^T @ Q, reshaped to W; or `dw_of(Q)`, already shaped like W, for a layer
    whose dW is not one product), masked/binarized per the config for binary layers; nothing for
    a frozen W (cfg.frozen), and db only for a trained bias.
    """
    cfg = run.cfg
    q = dy
    if lay.binary and cfg.po2:
        if not np.all(np.isfinite(dy)):
            raise ConfigError(f"training diverged: the gradient of layer {lay.name!r} is not "
                              "finite",
                              hint="lower --lr, or store state in bf16/f32 instead of f16")
        codes, b = nx.po2_quantize(dy, cfg.po2_bias, cfg.po2_zero_to_min)
        q = nx.po2_decode(codes, b).astype(run.dtype)
        run.emit(lay, "d_out_q", q)
        run.emit(lay, "po2_bias", np.asarray(b, np.int32))
    if "b" in lay.params and not is_frozen(cfg, lay.name, "b"):
        run.emit(lay, "db", dy.sum(axis=0))
    if is_frozen(cfg, lay.name, "W"):
        return q
    dw = matmul(x_mat.T, q) if dw_of is None else dw_of(q)    # (K, out)
    w_shape = lay.params["W"].shape
    if lay.kind is LayerKind.CONV:
        dw = dw.T.reshape(w_shape)
    if lay.binary:
        if cfg.binary_dw:
            dw = np.where(dw >= 0, 1, -1) * np.float32(1 / math.sqrt(dw.size)).astype(run.dtype)
        dw = (dw * (np.abs(run.param(lay, "W")) <= 1)).astype(run.dtype)
    run.emit(lay, "dW", dw)
    return q
