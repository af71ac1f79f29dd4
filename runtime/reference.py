"""The numpy reference trainer ("host emulation"): one training step computed from the math of
ALGORITHM.md.

Input -> output: (ir.Graph, TrainConfig, TrainState, batch, labels) -> (new TrainState, every
intermediate tensor of the step under its compiler/README.md name). This module is the ground truth
the emitted C is compared against, so it is written from the spec, not from the lowered schedule,
and kept simple: one forward and one backward function per LayerKind (`FORWARD`, `BACKWARD`), a
loss, and one update rule per optimizer (`UPDATE`).

Invariants:
- `train_step` never mutates its input state; the same (state, batch, config) gives bit-identical
  output (stochastic rounding draws from `numerics.sr_bits(cfg.seed, t, tensor_id, n)`, no global
  RNG);
- every state tensor is stored back in its dtype after each step: SR for `stochastic` tensors, RNE
  for BN statistics, exact for f32; "bit" tensors are int8 +-1;
- the forward/backward (`forward_backward`) keep the dtype of the input batch, so tests can run them
  in float64 against finite differences; `train_step` runs them in float32.

Algorithm (ALGORITHM.md §1-3; cfg switches each technique of the proposed algorithm separately):
- forward: binary dense/conv use sign(W) (sign(0) = +1); BN uses batch statistics (l2: gamma, eps
  from the layer; l1: no gamma, Psi = mean|Y - mu|) and updates running stats r = m r + (1 - m)
  batch (biased var); SIGN saves the STE mask 1[|x| <= 1]; the logits are the SOFTMAX's input, or
  the last layer's output.
- loss: mean softmax cross-entropy, G = (p - onehot) / B on the logits.
- backward in reverse layer order; a layer's input gradient is computed only if something upstream
  is trainable (so never for the first weight layer). Binary weight layers: Q = PO2(dY) when cfg.po2
  feeds both dX = Q Wb^T and dW = X^T Q; cfg.binary_dw makes dW = sign(X^T Q)/sqrt(N_W); binary dW
  is masked by 1[|W| <= 1]. l1 BN: H = f16(G)/Psi, dY = H - mean(H) - s mean(H s), s = sign(Xh).
- saved tensors emulate the C storage when cfg.save_bits: +-1 inputs of binary layers, STE and ReLU
  masks, l1 sign bits and 1-bit max-pool routing go through pack_bits/unpack_bits (lossless by
  construction, exercised on purpose); real (non-binary) weight layers' inputs are rounded to f16
  (`<layer>.x_saved`), and so is a binary layer's real input when something upstream is trainable;
  the first layer's real input is kept as given.
- update: Adam / SGD-momentum / Bop (binary W only; every other tensor Adam), all float32; see
  `UPDATE`.

Exact float32 conventions the C side must copy: scalar coefficients are computed in double and
rounded once to float32 (`_f32(1 - m)`, `_f32(1 - beta1**t)`, `_f32(1/sqrt(N_W))`); BN normalizes by
multiplying with a float32 reciprocal (inv_std = 1/sqrt(var + eps), inv_psi = 1/Psi; a channel with
Psi == 0 gets inv_psi = 0, i.e. Xh = 0 and no gradient through Y). Dense/conv products accumulate
in float64 and are rounded once (`_matmul`), so the reference does not depend on BLAS blocking or
thread count; the C accumulates in float32, so only exactly representable sums (+-1 products, PO2
sums) compare bit for bit, the rest within float32 rounding. Means and other reductions are numpy's
(pairwise, deterministic).

Besides compiler/README.md's names the step also exposes the schedule's extra tensors (`<layer>.Wb`
int8 sign(W), `<layer>.x_saved`, `<consumer>.d_in` for one gradient contribution of several,
`<relu>.mask`, `probs` when the graph has no SOFTMAX), so every schedule tensor has a reference
value.

Limits: group-1 2-D convs without dilation; floor-mode pooling; AVGPOOL honours
attrs["count_include_pad"] (ONNX default 0: padding is not counted); INPUT_QUANT has no gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..compiler.config import TrainConfig
from ..compiler.errors import ConfigError, DataError
from ..compiler.ir import INPUT, Graph, Layer, LayerKind, tname
from ..compiler.state import StateTensor, state_tensors
from ..compiler import numerics as nx

__all__ = ["TrainState", "init_state", "train_step", "forward_backward", "predict", "evaluate",
           "FORWARD", "BACKWARD", "UPDATE"]

_TRAINABLE_KINDS = (LayerKind.DENSE, LayerKind.CONV, LayerKind.BATCHNORM)
_GRAD_FIELD = {"W": "dW", "b": "db", "gamma": "dgamma", "beta": "dbeta"}


def _f32(v: float) -> np.float32:
    return np.float32(v)


@dataclass
class TrainState:
    # every compiler.state.StateTensor by name: float32 arrays holding values exactly representable
    # in the tensor's dtype; "bit" tensors are int8 +-1
    tensors: dict[str, np.ndarray]
    step: int = 0                    # optimizer steps taken

    def copy(self) -> "TrainState":
        return TrainState({k: v.copy() for k, v in self.tensors.items()}, self.step)


# --------------------------------------------------------------------------------------------------
# state

def init_state(graph: Graph, cfg: TrainConfig) -> TrainState:
    """Parameters from the graph stored in their state dtype with RNE, moments 0, BN statistics
    from the file (l1: running_psi = sqrt(var + eps)), step 0."""
    tensors: dict[str, np.ndarray] = {}
    for st in state_tensors(graph, cfg):
        lay = graph.layer(st.layer)
        if st.kind == "opt":
            v = np.zeros(st.shape, np.float32)
        elif st.field == "running_mean":
            v = lay.params["mean"]
        elif st.field == "running_var":
            v = lay.params["var"]
        elif st.field == "running_psi":
            v = np.sqrt(lay.params["var"].astype(np.float32) + _f32(float(lay.attrs["eps"])))
        else:
            v = lay.params[st.field]
        tensors[st.name] = nx.store(np.asarray(v, np.float32).reshape(st.shape), st.dtype)
    return TrainState(tensors, 0)


# --------------------------------------------------------------------------------------------------
# one run (forward, optionally backward) of the graph

@dataclass
class _Run:
    graph: Graph
    cfg: TrainConfig
    tensors: dict[str, np.ndarray]
    dtype: np.dtype
    training: bool
    out: dict[str, np.ndarray] = field(default_factory=dict)     # named intermediates (public)
    saved: dict[str, dict] = field(default_factory=dict)         # per layer, private backward state
    acts: dict[str, np.ndarray] = field(default_factory=dict)    # forward outputs by layer name
    needs_grad: dict[str, bool] = field(default_factory=dict)    # see _needs_grad

    def __post_init__(self) -> None:
        self.needs_grad = _needs_grad(self.graph)

    def param(self, lay: Layer, f: str) -> np.ndarray:
        """A parameter as the step sees it: the state tensor if there is one, else the constant."""
        v = self.tensors.get(tname(lay.name, f))
        if v is None:
            v = lay.params[f]
        return np.asarray(v).astype(self.dtype, copy=False)

    def weight(self, lay: Layer) -> np.ndarray:
        """W as used by the forward: sign(W) (sign(0) = +1) for binary layers."""
        w = self.param(lay, "W")
        if not lay.binary:
            return w
        wb = np.where(w >= 0, 1, -1).astype(np.int8)
        self.emit(lay, "Wb", wb)
        return wb.astype(self.dtype)

    def emit(self, lay: Layer, f: str, v) -> None:
        self.out[tname(lay.name, f)] = v

    def pm1_input(self, name: str) -> bool:
        """True when `name`'s output is +-1 by construction (a SIGN, maybe via flatten/max-pool)."""
        if name == INPUT:
            return False
        lay = self.graph.layer(name)
        if lay.kind is LayerKind.SIGN:
            return True
        return lay.kind in (LayerKind.FLATTEN, LayerKind.MAXPOOL) and self.pm1_input(lay.inputs[0])


def _bits_roundtrip(a: np.ndarray, *, pm1: bool) -> np.ndarray:
    """Pack one sample per row and unpack again: what the C keeps for a 1-bit saved tensor."""
    flat = a.reshape(len(a), -1)
    back = nx.unpack_bits(nx.pack_bits(flat), flat.shape[1], pm1=pm1)
    return back.reshape(a.shape)


def _mask_store(run: _Run, m: np.ndarray) -> np.ndarray:
    m = m.astype(np.int8)
    return _bits_roundtrip(m, pm1=False) if run.cfg.save_bits else m


def _save_weight_input(run: _Run, lay: Layer, x: np.ndarray) -> np.ndarray:
    """What a dense/conv layer keeps of its input for dW (see the module docstring)."""
    src = lay.inputs[0]
    if lay.binary and run.pm1_input(src):
        assert np.all(np.abs(x) == 1), f"{lay.name}: input expected to be +-1"
        return _bits_roundtrip(x, pm1=True).astype(run.dtype) if run.cfg.save_bits else x
    # a binary layer's real input is kept as given only when nothing upstream is trainable (the
    # first layer: the C reads it from the caller's batch); otherwise it is a live activation the C
    # cannot keep in f32 under save_bits
    if run.cfg.save_bits and (not lay.binary or run.needs_grad[src]):
        xs = nx.to_f16_rne(x).astype(run.dtype)
        run.emit(lay, "x_saved", xs)
        return xs
    return x


_MATMUL_ROWS = 1 << 14     # rows of `a` widened to float64 at a time (bounds the temporary)


def _matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
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


def _chan(p: np.ndarray, ndim: int) -> np.ndarray:
    """Per-channel vector [C] (or [1]) broadcast against (B, C, ...) activations."""
    return p.reshape((1, -1) + (1,) * (ndim - 2))


def _stat_axes(x: np.ndarray) -> tuple[int, ...]:
    return (0,) if x.ndim == 2 else (0,) + tuple(range(2, x.ndim))


# ---- windows (conv / pools) ----------------------------------------------------------------------

def _pad(x: np.ndarray, pads, value=0.0) -> np.ndarray:
    t, l, b, r = (int(p) for p in pads)
    return np.pad(x, ((0, 0), (0, 0), (t, b), (l, r)), constant_values=value)


def _windows(xp: np.ndarray, kh: int, kw: int, sh: int, sw: int) -> np.ndarray:
    """(B, C, Hp, Wp) -> view (B, C, Ho, Wo, kh, kw) of the stride-(sh, sw) windows."""
    v = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(2, 3))
    return v[:, :, ::sh, ::sw]


def _unwindow(dwin: np.ndarray, padded_shape, sh: int, sw: int) -> np.ndarray:
    """Adjoint of `_windows`: scatter-add (B, C, Ho, Wo, kh, kw) window gradients into the padded
    input."""
    out = np.zeros(padded_shape, dwin.dtype)
    _, _, ho, wo, kh, kw = dwin.shape
    for i in range(kh):
        for j in range(kw):
            out[:, :, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw] += dwin[..., i, j]
    return out


def _crop(xp: np.ndarray, pads) -> np.ndarray:
    t, l, b, r = (int(p) for p in pads)
    return xp[:, :, t:xp.shape[2] - b, l:xp.shape[3] - r]


def _pool_geom(lay: Layer):
    kh, kw = (int(k) for k in lay.attrs["kernel"])
    sh, sw = (int(s) for s in lay.attrs["strides"])
    return kh, kw, sh, sw, tuple(int(p) for p in lay.attrs["pads"])


# --------------------------------------------------------------------------------------------------
# forward, one function per kind: (run, layer, inputs) -> output; saved state in run.saved[layer]

def _dense_fwd(run: _Run, lay: Layer, x: np.ndarray) -> np.ndarray:
    x2 = x.reshape(len(x), -1)
    y = _matmul(x2, run.weight(lay))
    if "b" in lay.params:
        y = y + run.param(lay, "b")
    if run.training:
        run.saved[lay.name] = {"x": _save_weight_input(run, lay, x2)}
    return y


def _im2col(run: _Run, lay: Layer, x: np.ndarray) -> np.ndarray:
    """(B, Cin, H, W) -> (B, Ho, Wo, Cin*kh*kw) patches of the zero-padded input."""
    kh, kw = lay.params["W"].shape[2:]
    sh, sw = (int(s) for s in lay.attrs["strides"])
    win = _windows(_pad(x, lay.attrs["pads"]), kh, kw, sh, sw)      # (B, Cin, Ho, Wo, kh, kw)
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(win.shape[0], win.shape[2], win.shape[3], -1)


def _conv_fwd(run: _Run, lay: Layer, x: np.ndarray) -> np.ndarray:
    w = run.weight(lay)
    cols = _im2col(run, lay, x)
    y = _matmul(cols, w.reshape(w.shape[0], -1).T).transpose(0, 3, 1, 2)
    if "b" in lay.params:
        y = y + _chan(run.param(lay, "b"), 4)
    if run.training:
        run.saved[lay.name] = {"x": _save_weight_input(run, lay, x)}
    return np.ascontiguousarray(y)


def _bn_fwd(run: _Run, lay: Layer, y: np.ndarray) -> np.ndarray:
    cfg, ax, nd = run.cfg, _stat_axes(y), y.ndim
    eps = float(lay.attrs["eps"])
    beta = _chan(run.param(lay, "beta"), nd)
    if not run.training:
        mean = _chan(run.param(lay, "running_mean"), nd)
        if cfg.bn == "l2":
            inv = 1 / np.sqrt(_chan(run.param(lay, "running_var"), nd) + eps)
            return _chan(run.param(lay, "gamma"), nd) * ((y - mean) * inv) + beta
        rp = _chan(run.param(lay, "running_psi"), nd)
        return (y - mean) * (1 / rp) + beta
    m, one_m = _f32(cfg.bn_momentum).astype(run.dtype), _f32(1 - cfg.bn_momentum).astype(run.dtype)
    mu = y.mean(axis=ax, keepdims=True)
    yc = y - mu
    run.emit(lay, "mu", mu.reshape(-1))
    rm = m * run.param(lay, "running_mean") + one_m * mu.reshape(-1)
    if cfg.bn == "l2":
        var = (yc * yc).mean(axis=ax, keepdims=True)
        inv = 1 / np.sqrt(var + y.dtype.type(eps))
        xh = yc * inv
        z = _chan(run.param(lay, "gamma"), nd) * xh + beta
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
            s = _bits_roundtrip(s, pm1=True)
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


def _sign_fwd(run: _Run, lay: Layer, x: np.ndarray) -> np.ndarray:
    if run.training:
        mask = _mask_store(run, np.abs(x) <= 1)
        run.saved[lay.name] = {"mask": mask}
        run.emit(lay, "mask", mask)
    return np.where(x >= 0, 1, -1).astype(x.dtype)


def _relu_fwd(run: _Run, lay: Layer, x: np.ndarray) -> np.ndarray:
    if run.training:
        run.saved[lay.name] = {"pos": _mask_store(run, x > 0)}
        run.emit(lay, "mask", run.saved[lay.name]["pos"])
    return np.maximum(x, 0)


def _maxpool_fwd(run: _Run, lay: Layer, x: np.ndarray) -> np.ndarray:
    kh, kw, sh, sw, pads = _pool_geom(lay)
    xp = _pad(x, pads, -np.inf)
    win = _windows(xp, kh, kw, sh, sw)
    flat = win.reshape(win.shape[:4] + (kh * kw,))
    idx = flat.argmax(axis=-1)                       # numpy: the first maximum wins ties
    y = np.take_along_axis(flat, idx[..., None], -1)[..., 0]
    if run.training:
        one_bit = run.cfg.save_bits and sh >= kh and sw >= kw
        if one_bit:
            # non-overlapping windows: each input element is in at most one window, so a 1-bit
            # "is the argmax" mask over the input routes the gradient unambiguously
            mask = np.zeros(xp.shape, np.int8)
            b, c, oh, ow = np.indices(idx.shape)
            mask[b, c, oh * sh + idx // kw, ow * sw + idx % kw] = 1
            mask = _mask_store(run, _crop(mask, pads))
            run.saved[lay.name] = {"mask": mask, "xshape": x.shape}
            run.emit(lay, "argmax", mask)
        else:
            run.saved[lay.name] = {"idx": idx, "xshape": x.shape}
            run.emit(lay, "argmax", idx)
    return np.ascontiguousarray(y)


def _avg_counts(lay: Layer, x: np.ndarray) -> np.ndarray:
    kh, kw, sh, sw, pads = _pool_geom(lay)
    if int(lay.attrs.get("count_include_pad", 0)):
        return np.asarray(kh * kw, x.dtype)
    ones = _pad(np.ones((1, 1) + x.shape[2:], x.dtype), pads)
    return _windows(ones, kh, kw, sh, sw).sum(axis=(-2, -1))


def _avgpool_fwd(run: _Run, lay: Layer, x: np.ndarray) -> np.ndarray:
    kh, kw, sh, sw, pads = _pool_geom(lay)
    win = _windows(_pad(x, pads), kh, kw, sh, sw)
    if run.training:
        run.saved[lay.name] = {"xshape": x.shape}
    return win.sum(axis=(-2, -1)) / _avg_counts(lay, x)


def _gap_fwd(run: _Run, lay: Layer, x: np.ndarray) -> np.ndarray:
    if run.training:
        run.saved[lay.name] = {"xshape": x.shape}
    return x.mean(axis=(2, 3)).reshape((len(x),) + lay.shape)


def _flatten_fwd(run: _Run, lay: Layer, x: np.ndarray) -> np.ndarray:
    if run.training:
        run.saved[lay.name] = {"xshape": x.shape}
    return x.reshape((len(x),) + lay.shape)


def _add_fwd(run: _Run, lay: Layer, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a + b


def _affine_fwd(run: _Run, lay: Layer, x: np.ndarray) -> np.ndarray:
    return x * _chan(run.param(lay, "scale"), x.ndim) + _chan(run.param(lay, "bias"), x.ndim)


def _input_quant_fwd(run: _Run, lay: Layer, x: np.ndarray) -> np.ndarray:
    a = lay.attrs
    bits, narrow = int(a["bits"]), int(bool(a["narrow"]))
    if a["signed"]:
        qmin, qmax = -(2 ** (bits - 1)) + narrow, 2 ** (bits - 1) - 1
    else:
        qmin, qmax = 0, 2 ** bits - 1 - narrow
    scale = np.asarray(a["scale"], x.dtype)
    zp = np.asarray(a["zero_point"], x.dtype)
    if scale.ndim == 1 and scale.size > 1:
        scale = _chan(scale, x.ndim)
    if zp.ndim == 1 and zp.size > 1:
        zp = _chan(zp, x.ndim)
    q = np.round(np.clip(x / scale + zp, qmin, qmax))     # QONNX order; np.round: half to even
    return ((q - zp) * scale).astype(x.dtype)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _softmax_fwd(run: _Run, lay: Layer, x: np.ndarray) -> np.ndarray:
    return _softmax(x.reshape(len(x), -1)).reshape((len(x),) + lay.shape)


FORWARD: dict[LayerKind, Callable[..., np.ndarray]] = {
    LayerKind.DENSE: _dense_fwd,
    LayerKind.CONV: _conv_fwd,
    LayerKind.BATCHNORM: _bn_fwd,
    LayerKind.SIGN: _sign_fwd,
    LayerKind.RELU: _relu_fwd,
    LayerKind.MAXPOOL: _maxpool_fwd,
    LayerKind.AVGPOOL: _avgpool_fwd,
    LayerKind.GLOBAL_AVGPOOL: _gap_fwd,
    LayerKind.FLATTEN: _flatten_fwd,
    LayerKind.ADD: _add_fwd,
    LayerKind.AFFINE: _affine_fwd,
    LayerKind.INPUT_QUANT: _input_quant_fwd,
    LayerKind.SOFTMAX: _softmax_fwd,
}


# --------------------------------------------------------------------------------------------------
# backward, one function per kind: (run, layer, d_out, need) -> input gradients (None where not
# needed); parameter gradients and saved values go to run.out

def _weight_grads(run: _Run, lay: Layer, dy: np.ndarray, x_mat: np.ndarray) -> np.ndarray:
    """dY (rows = samples/positions, cols = outputs) -> the dY that feeds dX (Q for PO2 binary
    layers).

    Emits dW (as x_mat^T @ Q, reshaped to W), masked/binarized per the config for binary layers.
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
    dw = _matmul(x_mat.T, q)                                   # (K, out)
    w_shape = lay.params["W"].shape
    if lay.kind is LayerKind.CONV:
        dw = dw.T.reshape(w_shape)
    if lay.binary:
        if cfg.binary_dw:
            dw = np.where(dw >= 0, 1, -1) * _f32(1 / math.sqrt(dw.size)).astype(run.dtype)
        dw = (dw * (np.abs(run.param(lay, "W")) <= 1)).astype(run.dtype)
    run.emit(lay, "dW", dw)
    if "b" in lay.params:
        run.emit(lay, "db", dy.sum(axis=0))
    return q


def _dense_bwd(run: _Run, lay: Layer, dy: np.ndarray, need):
    x = run.saved[lay.name]["x"]
    q = _weight_grads(run, lay, dy, x)
    if not need[0]:
        return [None]
    dx = _matmul(q, run.weight(lay).T)
    return [dx.reshape((len(dy),) + run.graph.shape_of(lay.inputs[0]))]


def _conv_bwd(run: _Run, lay: Layer, dy: np.ndarray, need):
    x = run.saved[lay.name]["x"]
    w = run.weight(lay)
    cout, cin, kh, kw = w.shape
    cols = _im2col(run, lay, x)                                 # (B, Ho, Wo, K)
    dy_mat = dy.transpose(0, 2, 3, 1).reshape(-1, cout)
    q = _weight_grads(run, lay, dy_mat, cols.reshape(-1, cols.shape[-1]))
    if not need[0]:
        return [None]
    b, ho, wo = dy.shape[0], dy.shape[2], dy.shape[3]
    dcols = _matmul(q, w.reshape(cout, -1)).reshape(b, ho, wo, cin, kh, kw)
    dcols = dcols.transpose(0, 3, 1, 2, 4, 5)
    pads = lay.attrs["pads"]
    padded = _pad(np.zeros((1, 1) + x.shape[2:], x.dtype), pads).shape[2:]
    sh, sw = (int(s) for s in lay.attrs["strides"])
    return [_crop(_unwindow(dcols, (b, cin) + padded, sh, sw), pads)]


def _bn_bwd(run: _Run, lay: Layer, g: np.ndarray, need):
    sv, ax, nd = run.saved[lay.name], _stat_axes(g), g.ndim
    run.emit(lay, "dbeta", g.sum(axis=ax))
    if run.cfg.bn == "l2":
        xh, inv = sv["xh"], sv["inv"]
        run.emit(lay, "dgamma", (g * xh).sum(axis=ax))
        dxh = _chan(run.param(lay, "gamma"), nd) * g
        dy = inv * (dxh - dxh.mean(axis=ax, keepdims=True)
                    - xh * (dxh * xh).mean(axis=ax, keepdims=True))
    else:
        s = sv["s"].astype(g.dtype)
        h = nx.to_f16_rne(g).astype(g.dtype) * sv["inv"]
        dy = h - h.mean(axis=ax, keepdims=True) - s * (h * s).mean(axis=ax, keepdims=True)
    return [dy if need[0] else None]


def _sign_bwd(run: _Run, lay: Layer, g: np.ndarray, need):
    return [g * run.saved[lay.name]["mask"].astype(g.dtype)]


def _relu_bwd(run: _Run, lay: Layer, g: np.ndarray, need):
    return [g * run.saved[lay.name]["pos"]]


def _maxpool_bwd(run: _Run, lay: Layer, g: np.ndarray, need):
    kh, kw, sh, sw, pads = _pool_geom(lay)
    sv = run.saved[lay.name]
    xshape = sv["xshape"]
    if "mask" in sv:
        # each input element (h, w) lies in window ((h+t)//sh, (w+l)//sw) if inside its kernel span
        hp = np.arange(xshape[2]) + pads[0]
        wp = np.arange(xshape[3]) + pads[1]
        oh = np.minimum(hp // sh, g.shape[2] - 1)
        ow = np.minimum(wp // sw, g.shape[3] - 1)
        up = g[:, :, oh][:, :, :, ow]
        return [up * sv["mask"].astype(g.dtype)]
    idx = sv["idx"]
    hpad = xshape[2] + pads[0] + pads[2]
    wpad = xshape[3] + pads[1] + pads[3]
    b, c, oh, ow = np.indices(idx.shape)
    dx = np.zeros((xshape[0], xshape[1], hpad, wpad), g.dtype)
    np.add.at(dx, (b, c, oh * sh + idx // kw, ow * sw + idx % kw), g)
    return [_crop(dx, pads)]


def _avgpool_bwd(run: _Run, lay: Layer, g: np.ndarray, need):
    kh, kw, sh, sw, pads = _pool_geom(lay)
    xshape = run.saved[lay.name]["xshape"]
    gc = g / _avg_counts(lay, np.empty(xshape, g.dtype))
    dwin = np.broadcast_to(gc[..., None, None], gc.shape + (kh, kw))
    padded = (xshape[0], xshape[1], xshape[2] + pads[0] + pads[2], xshape[3] + pads[1] + pads[3])
    return [_crop(_unwindow(dwin, padded, sh, sw), pads)]


def _gap_bwd(run: _Run, lay: Layer, g: np.ndarray, need):
    xshape = run.saved[lay.name]["xshape"]
    g2 = g.reshape(xshape[:2] + (1, 1)) / (xshape[2] * xshape[3])
    return [np.broadcast_to(g2, xshape).copy()]


def _flatten_bwd(run: _Run, lay: Layer, g: np.ndarray, need):
    return [g.reshape(run.saved[lay.name]["xshape"])]


def _add_bwd(run: _Run, lay: Layer, g: np.ndarray, need):
    return [g if need[0] else None, g if need[1] else None]


def _affine_bwd(run: _Run, lay: Layer, g: np.ndarray, need):
    return [g * _chan(run.param(lay, "scale"), g.ndim)]


def _no_grad_bwd(run: _Run, lay: Layer, g: np.ndarray, need):
    return [None] * len(lay.inputs)


BACKWARD: dict[LayerKind, Callable[..., list]] = {
    LayerKind.DENSE: _dense_bwd,
    LayerKind.CONV: _conv_bwd,
    LayerKind.BATCHNORM: _bn_bwd,
    LayerKind.SIGN: _sign_bwd,
    LayerKind.RELU: _relu_bwd,
    LayerKind.MAXPOOL: _maxpool_bwd,
    LayerKind.AVGPOOL: _avgpool_bwd,
    LayerKind.GLOBAL_AVGPOOL: _gap_bwd,
    LayerKind.FLATTEN: _flatten_bwd,
    LayerKind.ADD: _add_bwd,
    LayerKind.AFFINE: _affine_bwd,
    LayerKind.INPUT_QUANT: _no_grad_bwd,
    LayerKind.SOFTMAX: _no_grad_bwd,   # never reached: the loss differentiates through it
}


# --------------------------------------------------------------------------------------------------
# optimizers: (cfg, t, value, grad, moments) -> (new value, new moments), all float32, before
# storing

def _adam(cfg: TrainConfig, t: int, w: np.ndarray, g: np.ndarray, mom: dict[str, np.ndarray]):
    """PyTorch's Adam formula: m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
    W = W - (lr * (m / bc1)) / (sqrt(v / bc2) + eps), bc1 = 1 - b1^t, bc2 = 1 - b2^t (t after
    increment; 1 - b^t in float32, numerics.one_minus_pow).
    The W update reads the float32 m, v of this step (before they are rounded for storage)."""
    b1, b2, c1, c2 = _f32(cfg.beta1), _f32(cfg.beta2), _f32(1 - cfg.beta1), _f32(1 - cfg.beta2)
    # float32 binary powering, as the C does it (no doubles on an FPU-less-for-double MCU)
    bc1, bc2 = nx.one_minus_pow(cfg.beta1, t), nx.one_minus_pow(cfg.beta2, t)
    m = b1 * mom["m"] + c1 * g
    v = b2 * mom["v"] + c2 * (g * g)
    w = w - (_f32(cfg.lr) * (m / bc1)) / (np.sqrt(v / bc2) + _f32(cfg.adam_eps))
    return w, {"m": m, "v": v}


def _sgd(cfg: TrainConfig, t: int, w: np.ndarray, g: np.ndarray, mom: dict[str, np.ndarray]):
    """SGD with momentum (PyTorch, no dampening): m = mu m + g; W = W - lr m."""
    m = _f32(cfg.sgd_momentum) * mom["m"] + g
    return w - _f32(cfg.lr) * m, {"m": m}


def _bop_unit_gradient(cfg: TrainConfig, g: np.ndarray) -> np.ndarray:
    """g / mean|g|: exactly +-1 for a 1-bit gradient (all of magnitude 1/sqrt(N_W)); a float one
    times count / sum|g|, the float32 sum taken in element order as the C loop does (cumsum is
    sequential), 0 for an all-zero gradient."""
    if cfg.binary_dw:
        return np.where(g >= 0, 1, -1).astype(np.float32)
    total = np.cumsum(np.abs(g).ravel(), dtype=np.float32)[-1]
    inv = _f32(g.size) / total if total > 0 else _f32(0)
    return g * inv


def _bop(cfg: TrainConfig, t: int, w: np.ndarray, g: np.ndarray, mom: dict[str, np.ndarray]):
    """Bop (Helwegen et al. 2019) on +-1 weights with a scaled momentum (compiler/README.md,
    "Bop"): m = (1-gamma) m + u, u = the gradient in units of its mean magnitude
    (`_bop_unit_gradient`), which is Larq's momentum divided by gamma mean|g|; w = -w where
    |m| > threshold and sign(m) == sign(w) (the gradient agrees with the weight, so flipping lowers
    the loss)."""
    m = _f32(1 - cfg.bop_gamma) * mom["m"] + _bop_unit_gradient(cfg, g)
    flip = (np.abs(m) > _f32(cfg.bop_threshold)) & ((m >= 0) == (w > 0))
    return np.where(flip, -w, w).astype(np.int8), {"m": m}


UPDATE: dict[str, Callable] = {"adam": _adam, "sgd": _sgd, "bop": _bop}


def _store(cfg: TrainConfig, st: StateTensor, v: np.ndarray, t: int) -> np.ndarray:
    if st.dtype == "bit":
        return np.asarray(v, np.int8).copy()
    bits = nx.sr_bits(cfg.seed, t, st.tensor_id, int(np.prod(st.shape))) if st.stochastic else None
    return nx.store(np.asarray(v, np.float32).reshape(st.shape), st.dtype, bits)


# --------------------------------------------------------------------------------------------------
# entry points

def _as_batch(graph: Graph, x) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype.kind != "f":
        raise DataError(f"input batch for model {graph.name!r} must be floating point, "
                        f"got {a.dtype}")
    if a.ndim >= 1 and a.shape[1:] != graph.input_shape:
        if a.ndim >= 2 and int(np.prod(a.shape[1:])) == int(np.prod(graph.input_shape)):
            return a.reshape((len(a),) + graph.input_shape)
        raise DataError(f"input batch has per-sample shape {a.shape[1:]}, model {graph.name!r} "
                        f"expects {graph.input_shape}",
                        hint="pass (B, *input_shape) or (B, features)")
    return a


def _check_labels(graph: Graph, labels, batch: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.dtype.kind not in "iu" or y.shape != (batch,):
        raise DataError(f"labels must be {batch} integers (one per sample), "
                        f"got {y.dtype} {y.shape}")
    k = graph.num_classes
    bad = (y < 0) | (y >= k)
    if np.any(bad):
        raise DataError(f"label {int(y[bad][0])} is outside [0, {k}) for model {graph.name!r} "
                        f"({k} classes)",
                        hint="check that the dataset matches the model's class count")
    return y.astype(np.int64)


def _logits_layer(graph: Graph) -> str:
    last = graph.output
    return last.inputs[0] if last.kind is LayerKind.SOFTMAX else last.name


def _forward(run: _Run, x: np.ndarray) -> None:
    run.acts[INPUT] = x
    for lay in run.graph.layers:
        y = FORWARD[lay.kind](run, lay, *(run.acts[i] for i in lay.inputs))
        assert y.shape[1:] == lay.shape, f"{lay.name}: computed {y.shape[1:]}, IR says {lay.shape}"
        run.acts[lay.name] = y
        run.emit(lay, "out", y)


def _needs_grad(graph: Graph) -> dict[str, bool]:
    """A layer's output gradient is needed iff it or some layer upstream of it is trainable."""
    ng = {INPUT: False}
    for lay in graph.layers:
        ng[lay.name] = lay.kind in _TRAINABLE_KINDS or (
            lay.kind is not LayerKind.INPUT_QUANT and any(ng[i] for i in lay.inputs))
    return ng


def forward_backward(graph: Graph, cfg: TrainConfig, tensors: dict[str, np.ndarray], x,
                     labels) -> dict[str, np.ndarray]:
    """Forward in training mode, loss, backward; no update. Keeps the dtype of `x` (float32 or
    float64).

    Returns every intermediate by name: `<layer>.out`, `.d_out`, `.dW`/`.db`/`.dgamma`/`.dbeta`,
    `.d_out_q`/`.po2_bias` (PO2 binary layers), BN `.mu`, `.xh`, `.inv_std`/`.var` (l2) or
    `.psi`/`.s` (l1) and the updated-but-not-yet-stored running statistics, SIGN `.mask` (int8 0/1),
    MAXPOOL `.argmax` (int8 0/1 mask over the input when 1-bit, else the window index), `loss` and
    `accuracy`.
    """
    x = _as_batch(graph, x)
    y = _check_labels(graph, labels, len(x))
    run = _Run(graph, cfg, tensors, x.dtype, training=True)
    _forward(run, x)
    logits_name = _logits_layer(graph)
    z = run.acts[logits_name].reshape(len(x), -1)
    zmax = z.max(axis=1, keepdims=True)
    lse = zmax[:, 0] + np.log(np.exp(z - zmax).sum(axis=1))
    rows = np.arange(len(x))
    run.out["loss"] = np.asarray((lse - z[rows, y]).mean(), x.dtype)
    run.out["accuracy"] = np.asarray((z.argmax(axis=1) == y).mean(), x.dtype)
    if graph.output.kind is not LayerKind.SOFTMAX:
        run.out["probs"] = _softmax(z)
    onehot = np.zeros_like(z)
    onehot[rows, y] = 1
    grads = {logits_name: ((_softmax(z) - onehot) / len(x)).reshape(run.acts[logits_name].shape)}
    ng = run.needs_grad
    fan_out = {n: sum(lay.inputs.count(n) for lay in graph.layers) for n in ng}
    for lay in reversed(graph.layers):
        g = grads.pop(lay.name, None)
        if g is None:
            continue
        run.emit(lay, "d_out", g)
        need = [i != INPUT and ng[i] for i in lay.inputs]
        for name, gi, wanted in zip(lay.inputs, BACKWARD[lay.kind](run, lay, g, need), need):
            if not wanted:
                continue
            if fan_out[name] > 1 and len(lay.inputs) == 1:
                run.emit(lay, "d_in", gi)    # one contribution of several (schedule's name)
            # contributions are summed in reverse layer order as they arrive
            grads[name] = gi if name not in grads else grads[name] + gi
    return run.out


def train_step(graph: Graph, cfg: TrainConfig, state: TrainState, x,
               labels) -> tuple[TrainState, dict[str, np.ndarray]]:
    """One optimizer step on batch (x, labels). Returns (new state, intermediates); `state` is
    unchanged.

    The intermediates are those of `forward_backward` (float32) plus every state tensor after the
    update under its own name (`fc1.W`, `fc1.W.m`, `bn1.running_mean`, ...)."""
    x = _as_batch(graph, x).astype(np.float32, copy=False)
    out = forward_backward(graph, cfg, state.tensors, x, labels)
    t = state.step + 1
    sts = state_tensors(graph, cfg)
    by_name = {st.name: st for st in sts}
    new: dict[str, np.ndarray] = {}
    for st in sts:
        if st.kind == "param":
            grad = out[tname(st.layer, _GRAD_FIELD[st.field])].astype(np.float32)
            moms = {n.split(".")[-1]: state.tensors[n].astype(np.float32)
                    for n in by_name if n.startswith(st.name + ".")}
            value = state.tensors[st.name]
            value = value if st.dtype == "bit" else value.astype(np.float32)
            w, moms = UPDATE[st.optimizer](cfg, t, value, grad, moms)
            new[st.name] = _store(cfg, st, w, t)
            for mname, mv in moms.items():
                new[f"{st.name}.{mname}"] = _store(cfg, by_name[f"{st.name}.{mname}"], mv, t)
        elif st.kind == "bn_stat":
            new[st.name] = _store(cfg, st, out[st.name], t)
    assert new.keys() == by_name.keys()
    out.update(new)
    return TrainState({st.name: new[st.name] for st in sts}, t), out


def predict(graph: Graph, cfg: TrainConfig, state: TrainState, x) -> np.ndarray:
    """Class probabilities (B, classes) in inference mode (BN uses the running statistics)."""
    x = _as_batch(graph, x).astype(np.float32, copy=False)
    run = _Run(graph, cfg, state.tensors, x.dtype, training=False)
    _forward(run, x)
    last = run.acts[graph.output.name].reshape(len(x), -1)
    return last if graph.output.kind is LayerKind.SOFTMAX else _softmax(last)


def evaluate(graph: Graph, cfg: TrainConfig, state: TrainState, x, labels, *,
             batch: int = 1000) -> float:
    """Top-1 accuracy of `predict` over (x, labels), in chunks of `batch` samples."""
    y = np.asarray(labels)
    hits = 0
    for i in range(0, len(y), batch):
        p = predict(graph, cfg, state, x[i:i + batch])
        hits += int((p.argmax(axis=1) == y[i:i + batch]).sum())
    return hits / max(1, len(y))
