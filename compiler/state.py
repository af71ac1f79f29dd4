"""The persistent training state of a (graph, config): every parameter, optimizer moment and BN statistic.

This is the one list the schedule, the numpy reference, codegen and checkpoints agree on: names, dtypes,
shapes and the integer `tensor_id` that keys the reproducible stochastic rounding (ALGORITHM.md §2a).
Order = graph layer order, then the field order below; ids are positions in that order.

`initial_values(graph, cfg)` gives every state tensor's step-0 value: the file's trained state,
converted where the config's batch norm has no place for it (below).

Decisions (documented in compiler/README.md):
- l1 BN has no gamma and no eps; its running statistics are (running_mean, running_psi). The file's
  l2 BN (gamma, beta, mean, var, eps) is converted so inference at step 0 equals the file's
  (`_l1_from_l2`): sign(gamma) goes into the producing weight layer's output channel (W column /
  row and bias negated, running_mean negated), |gamma| into running_psi and beta. Where no exact
  conversion exists the channel is listed in `Conversion.inexact`.
- Bop trains binary weights only (latent-free, stored as bits); every other trainable tensor
  (BN beta/gamma, real layers' W and b) uses Adam, as Larq pairs Bop with Adam.
- Trainable tensors and optimizer moments are stored in `cfg.state_dtype` with stochastic rounding;
  BN running statistics in the same dtype with round-to-nearest-even (they are not updated by gradients).
- Partial training (`cfg.frozen`, compiler/config.py): a frozen parameter is kind "frozen", has no
  optimizer and no moments, and a binary layer's frozen W is stored as its sign bits ("bit", 1 bit
  per weight, the XNOR kernels' packed layout, as Bop's W). Frozen tensors come last in the state
  order, so they form one contiguous tail of the state region (bare-metal targets read it from the
  start-state blob in flash instead of copying it to RAM; compiler/codegen.py). A frozen batch norm
  with nothing trainable upstream (`ops.eval_mode_bns`) runs in inference mode in the training
  step: its running statistics are constants, kind "frozen" too (stored like "bn_stat", RNE), so
  they join the frozen tail. A frozen batch norm downstream of a trainable layer, and every frozen
  one under `cfg.frozen_bn == "batch"`, keeps normalizing with batch statistics and updating its
  running statistics (kind "bn_stat").
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from . import numerics as nx
from .config import TrainConfig
from .ir import INPUT, WEIGHT_KINDS, Graph, Layer, LayerKind, tname
from .ops import eval_mode_bns


@dataclass(frozen=True)
class StateTensor:
    name: str               # "fc1.W", "fc1.W.m", "bn1.running_mean"
    layer: str
    field: str              # "W", "b", "gamma", "beta", "running_mean", "running_var", "running_psi"
    kind: str               # "param" | "opt" | "bn_stat" | "frozen"
    dtype: str              # "f32" | "bf16" | "f16" | "bit"
    shape: tuple[int, ...]
    tensor_id: int
    optimizer: str | None   # for params: "adam" | "sgd" | "bop"; None otherwise (frozen too)
    stochastic: bool        # stores use stochastic rounding (16-bit dtypes only)


def state_tensors(graph: Graph, cfg: TrainConfig) -> list[StateTensor]:
    sd, is16 = cfg.state_dtype, cfg.state_dtype != "f32"
    out: list[StateTensor] = []
    frozen: list[StateTensor] = []
    constant_stats = eval_mode_bns(graph, cfg)

    def add(layer, field, kind, dtype, shape, optimizer=None, stochastic=False):
        if f"{layer}.{field}" in cfg.frozen or (kind == "bn_stat" and layer in constant_stats):
            binary_w = field == "W" and graph.layer(layer).binary
            frozen.append(StateTensor(tname(layer, field), layer, field, "frozen",
                                      "bit" if binary_w else sd, tuple(shape), 0, None, False))
            return
        if kind == "opt" and tname(layer, field).rsplit(".", 1)[0] in cfg.frozen:
            return
        out.append(StateTensor(tname(layer, field), layer, field, kind, dtype, tuple(shape), len(out),
                               optimizer, stochastic and dtype in ("bf16", "f16")))

    for lay in graph.layers:
        if lay.kind in WEIGHT_KINDS:
            for f in ("W", "b"):
                if f not in lay.params:
                    continue
                shape = lay.params[f].shape
                bop = cfg.optimizer == "bop" and f == "W" and lay.binary
                opt = "bop" if bop else ("adam" if cfg.optimizer == "bop" else cfg.optimizer)
                add(lay.name, f, "param", "bit" if bop else sd, shape, opt, stochastic=is16)
                for mom in _moments(opt):
                    add(lay.name, f"{f}.{mom}", "opt", sd, shape, stochastic=is16)
        elif lay.kind is LayerKind.BATCHNORM:
            c = lay.params["beta"].shape
            opt = "adam" if cfg.optimizer == "bop" else cfg.optimizer
            for f in (("gamma", "beta") if cfg.bn == "l2" else ("beta",)):
                add(lay.name, f, "param", sd, c, opt, stochastic=is16)
                for mom in _moments(opt):
                    add(lay.name, f"{f}.{mom}", "opt", sd, c, stochastic=is16)
            stats = ("running_mean", "running_var") if cfg.bn == "l2" else ("running_mean", "running_psi")
            for f in stats:
                add(lay.name, f, "bn_stat", sd, c)
    return out + [replace(st, tensor_id=len(out) + i) for i, st in enumerate(frozen)]


MOMENTS = {"adam": ("m", "v"), "sgd": ("m",), "bop": ("m",)}   # optimizer -> moment fields


def _moments(optimizer: str) -> tuple[str, ...]:
    return MOMENTS[optimizer]


# --------------------------------------------------------------------------------------------------
# step-0 values: the file's trained state under the config (compiler/README.md, "Trained state")

# layers through which a positive per-channel scale of their input reaches the output unchanged in
# sign (positively homogeneous, channel-preserving or pooling within a channel)
_SCALE_PASS = (LayerKind.MAXPOOL, LayerKind.AVGPOOL, LayerKind.GLOBAL_AVGPOOL, LayerKind.FLATTEN,
               LayerKind.RELU)
# the smallest magnitude a binary layer's latent weight keeps, so its sign survives 16-bit storage
# (f16's smallest normal; bf16 and f32 hold it exactly)
LATENT_FLOOR = np.float32(2.0 ** -14)


@dataclass
class Conversion:
    """The step-0 value of every parameter / BN statistic state tensor (float32, before storage in
    the tensor's dtype) and what could not be converted exactly."""
    values: dict[str, np.ndarray] = field(default_factory=dict)
    inexact: list[str] = field(default_factory=list)     # one phrase per BN layer, names channels


def sign_only(graph: Graph, name: str) -> bool:
    """True when only the sign of `name`'s output matters downstream (with a positive per-channel
    scale): every path from it reaches a SIGN through `_SCALE_PASS` layers only."""
    cons = graph.consumers(name)
    if not cons or name == graph.output.name:
        return False
    return all(c.kind is LayerKind.SIGN or (c.kind in _SCALE_PASS and sign_only(graph, c.name))
               for c in cons)


def _flippable(graph: Graph, bn: Layer) -> Layer | None:
    """The weight layer whose output channels feed `bn` one to one and nothing else."""
    src = bn.inputs[0]
    if src == INPUT:
        return None
    lay = graph.layer(src)
    if lay.kind not in WEIGHT_KINDS or len(graph.consumers(src)) != 1:
        return None
    return lay


def _negate_channels(lay: Layer, w: np.ndarray, b: np.ndarray | None, neg: np.ndarray):
    """`lay`'s W and b with output channels `neg` negated (binary layers: sign(W) negated exactly,
    a latent 0 -- sign +1 -- becomes -LATENT_FLOOR)."""
    w = w.copy()
    view = w if lay.kind is not LayerKind.DENSE else w.T          # output channel first
    col = -view[neg]
    if lay.binary:
        col = np.where(col == 0, -LATENT_FLOOR, col)
    view[neg] = col
    if b is not None:
        b = b.copy()
        b[neg] = -b[neg]
    return w, b


def _l1_from_l2(graph: Graph, bn: Layer, vals: dict[str, np.ndarray], inexact: list[str]) -> None:
    """l1 BN state (running_mean, running_psi, beta) from the file's l2 BN, with sign(gamma) moved
    into the producing layer's `vals` entries.

    File: z = gamma (y - m) / s + beta, s = sqrt(var + eps). l1 inference: (y - m') / psi + beta'.
    - gamma > 0 after the sign is moved: with psi = s / |gamma|, beta' = beta the output is z
      itself; when only the sign of z matters downstream (`sign_only`), psi = s and
      beta' = beta / |gamma| give z / |gamma|, the same signs, and keep the threshold in beta, the
      one thing l1 training (batch statistics) carries over;
    - gamma < 0: y' = -y by negating the producer's output channel (`_flippable`), m' = -m;
      without such a producer the channel stays mirrored (inexact);
    - gamma == 0 (z = beta, constant): no l1 equivalent; psi = s, beta' = beta (inexact).
    """
    f32 = np.float32
    gamma = bn.params["gamma"].astype(np.float64)
    beta = bn.params["beta"].astype(np.float64)
    mean = bn.params["mean"].astype(np.float64)
    s = np.sqrt(bn.params["var"].astype(f32) + f32(float(bn.attrs["eps"]))).astype(np.float64)
    neg = gamma < 0
    prod = _flippable(graph, bn) if neg.any() else None
    if prod is not None:
        wn, bn_ = tname(prod.name, "W"), tname(prod.name, "b")
        vals[wn], b = _negate_channels(prod, vals[wn], vals.get(bn_), neg)
        if b is not None:
            vals[bn_] = b
        mean = np.where(neg, -mean, mean)
    elif neg.any():
        inexact.append(f"{int(neg.sum())} channel(s) with gamma < 0 and no weight layer of its own "
                       f"before it to take the sign")
    zero = gamma == 0
    if zero.any():
        inexact.append(f"{int(zero.sum())} channel(s) with gamma == 0 (a constant output)")
    mag = np.where(zero, 1.0, np.abs(gamma))
    if sign_only(graph, bn.name):
        psi, beta = s, beta / mag
    else:
        psi = s / mag
    vals[tname(bn.name, "running_mean")] = mean.astype(f32)
    vals[tname(bn.name, "running_psi")] = psi.astype(f32)
    vals[tname(bn.name, "beta")] = beta.astype(f32)


def initial_values(graph: Graph, cfg: TrainConfig) -> Conversion:
    """The step-0 value of every "param" and "bn_stat" state tensor of (graph, cfg): the file's
    values, its l2 batch norms converted under `--bn l1` (`_l1_from_l2`) with 16-bit thresholds
    fitted (`_fit_thresholds`); under f16 state binary latent weights are kept at
    |W| >= LATENT_FLOOR so their signs survive the storage. Optimizer moments start at 0 and are
    not listed."""
    vals: dict[str, np.ndarray] = {}
    for lay in graph.layers:
        for f, v in lay.params.items():
            vals[tname(lay.name, f)] = np.asarray(v, np.float32)
        if lay.kind in WEIGHT_KINDS and lay.binary and cfg.state_dtype == "f16":
            w = vals[tname(lay.name, "W")]
            vals[tname(lay.name, "W")] = np.where(
                np.abs(w) < LATENT_FLOOR, np.where(w < 0, -LATENT_FLOOR, LATENT_FLOOR),
                w).astype(np.float32)
    conv = Conversion()
    for lay in graph.layers:
        if lay.kind is not LayerKind.BATCHNORM:
            continue
        if cfg.bn == "l2":
            vals[tname(lay.name, "running_mean")] = vals[tname(lay.name, "mean")]
            vals[tname(lay.name, "running_var")] = vals[tname(lay.name, "var")]
        else:
            notes: list[str] = []
            _l1_from_l2(graph, lay, vals, notes)
            conv.inexact += [f"{lay.name} ({lay.onnx_name or 'BatchNormalization'}): {n}"
                             for n in notes]
        if cfg.state_dtype != "f32":
            _fit_thresholds(graph, lay, vals, cfg)
    names = {st.name for st in state_tensors(graph, cfg) if st.kind != "opt"}
    conv.values = {k: v for k, v in vals.items() if k in names}
    return conv


# --------------------------------------------------------------------------------------------------
# 16-bit state: the sign decisions of an l1 BN over integer inputs, kept exactly

_NUDGE = 8            # ulps `_fit_thresholds` tries in each direction, for running_mean and beta


def _input_grid(graph: Graph, bn: Layer) -> tuple[float, float] | None:
    """(q, bound) when `bn` reads a binary weight layer without bias whose inputs lie on a grid:
    +-1 (a SIGN, maybe via flatten/max-pool: q = 1) or a per-tensor input quantizer with an integer
    zero point (q = its scale). The layer's outputs are then multiples of q with |y| <= bound
    (zero padding only removes terms)."""
    from .ops.refctx import pm1_output
    src = bn.inputs[0]
    if src == INPUT:
        return None
    lay = graph.layer(src)
    if lay.kind not in WEIGHT_KINDS or not lay.binary or "b" in lay.params:
        return None
    w = lay.params["W"]
    fan_in = int(w.shape[0]) if lay.kind is LayerKind.DENSE else int(np.prod(w.shape[1:]))
    if pm1_output(graph, lay.inputs[0]):
        return 1.0, float(fan_in)
    if lay.inputs[0] == INPUT:
        return None
    quant = graph.layer(lay.inputs[0])
    if quant.kind is not LayerKind.INPUT_QUANT:
        return None
    scale, zp = (np.asarray(quant.attrs[k], np.float64).reshape(-1)
                 for k in ("scale", "zero_point"))
    if scale.size != 1 or zp.size != 1 or zp[0] != np.round(zp[0]) or not scale[0] > 0:
        return None
    return float(scale[0]), float(fan_in * scale[0] * 2.0 ** int(quant.attrs["bits"]))


def _z(x: float, rm: np.ndarray, inv: np.ndarray, beta: np.ndarray,
       gamma: np.float32 | None) -> tuple[np.ndarray, np.ndarray]:
    """The inference output at input x as the C computes it in float32 -- l1: `(x - rm) * inv +
    beta`, l2: `gamma * ((x - rm) * inv) + beta` -- and with the last multiply-add fused (what a
    compiler contracting to FMA computes)."""
    f32, f64 = np.float32, np.float64
    d = ((f32(x) - rm).astype(f32) * inv).astype(f32)
    if gamma is not None:
        prod64 = f64(gamma) * d.astype(f64)
        d = (gamma * d).astype(f32)
    else:
        prod64 = d.astype(f64)
    plain = (d + beta).astype(f32)
    fused = (prod64 + beta.astype(f64)).astype(f32)
    return plain, fused


def _fit_thresholds(graph: Graph, bn: Layer, vals: dict[str, np.ndarray],
                    cfg: TrainConfig) -> None:
    """Where `bn` feeds only signs and reads values on a grid (`_input_grid`: integers, or
    multiples of an input quantizer's scale), choose its 16-bit running_mean and beta among the few
    nearest representable values so the stored state decides sign(z) for every grid input as the
    unrounded values do.

    z is monotone in the input x (also in float arithmetic) and changes sign at one threshold t
    (l1: running_mean - beta * running_psi; l2: running_mean - beta * s / gamma), so only the two
    grid points around t matter. Round to nearest keeps their decisions unless t lies within a
    rounding error of one of them; then running_mean and beta move by up to _NUDGE ulps each (the
    smallest total move that decides both points as the float64 value of the unrounded state
    does, plain and fused multiply-add alike). A channel none fits keeps round to nearest; gamma
    and running_psi / running_var keep round to nearest."""
    grid = _input_grid(graph, bn)
    if grid is None or not sign_only(graph, bn.name):
        return
    q, n = grid
    dtype, l2 = cfg.state_dtype, cfg.bn == "l2"
    rm_n, sc_n, be_n = (tname(bn.name, f) for f in
                        ("running_mean", "running_var" if l2 else "running_psi", "beta"))
    rm, sc, beta = (vals[k].astype(np.float64) for k in (rm_n, sc_n, be_n))
    store = lambda v: nx.store(np.asarray(v, np.float32), dtype)    # noqa: E731
    rm16, sc16, be16 = store(rm), store(sc), store(beta)
    if l2:
        eps = np.float32(float(bn.attrs["eps"]))
        gamma = vals[tname(bn.name, "gamma")].astype(np.float64)
        g16 = store(gamma)
        inv = (np.float32(1) / np.sqrt(sc16 + eps)).astype(np.float32)
        s = np.sqrt(sc.astype(np.float32) + eps).astype(np.float64)

        def true_z(x, c):
            return gamma[c] * (x - rm[c]) / s[c] + beta[c]
        with np.errstate(divide="ignore", invalid="ignore"):
            t = rm - beta * s / gamma
    else:
        g16 = None
        inv = (np.float32(1) / sc16).astype(np.float32)

        def true_z(x, c):
            return (x - rm[c]) / sc[c] + beta[c]
        t = rm - beta * sc
    lo = np.floor(t / q) * q
    ks = np.arange(-_NUDGE, _NUDGE + 1)
    order = np.argsort(np.abs(ks)[:, None] + np.abs(ks)[None, :], axis=None, kind="stable")
    mant = 7 if dtype == "bf16" else 10
    for c in range(len(rm)):
        if not (np.isfinite(t[c]) and np.isfinite(inv[c]) and inv[c] > 0):
            continue
        points = [x for x in (lo[c], lo[c] + q) if -n <= x <= n]
        cand_rm = store(rm16[c] + ks * _ulp(rm16[c], mant))
        cand_be = store(be16[c] + ks * _ulp(be16[c], mant))
        r = np.repeat(cand_rm, len(ks))
        b = np.tile(cand_be, len(ks))
        ok = np.ones(r.shape, bool)
        for x in points:
            want = true_z(x, c) >= 0
            for z in _z(x, r, inv[c], b, None if g16 is None else g16[c]):
                ok &= (z >= 0) == want
        good = [i for i in order if ok[i]]
        if good:
            rm16[c], be16[c] = r[good[0]], b[good[0]]
    vals[rm_n], vals[sc_n], vals[be_n] = rm16, sc16, be16
    if l2:
        vals[tname(bn.name, "gamma")] = g16


def _ulp(v: np.float32, mant: int) -> np.float32:
    """The spacing of a binary float with `mant` explicit mantissa bits at v (v = 0: the smallest
    normal's spacing is not needed; 2^-(mant + 14) is fine for both 16-bit formats)."""
    if v == 0 or not np.isfinite(v):
        return np.float32(2.0 ** -(mant + 14))
    return np.float32(2.0 ** (np.floor(np.log2(abs(float(v)))) - mant))
