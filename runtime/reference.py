"""The numpy reference trainer ("host emulation"): one training step computed from the math of
ALGORITHM.md.

Input -> output: (ir.Graph, TrainConfig, TrainState, batch, labels) -> (new TrainState, every
intermediate tensor of the step under its compiler/README.md name). This module is the ground truth
the emitted C is compared against, so it is written from the spec, not from the lowered schedule,
and kept simple: one forward and one backward function per LayerKind, a loss, and one update rule
per optimizer. The per-kind functions live with their op family (the `# ---- numpy reference`
section of `compiler/ops/<family>.py`, run context `compiler/ops/refctx.py`); this module is the
driver that walks the graph with them (`FORWARD`, `BACKWARD`, `UPDATE`: copies of the registry's
views `ops.REFERENCE_*`, which runtime/check.py wraps for one step). `runtime/infer.py` runs the same forward in inference mode.

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
- loss: mean softmax cross-entropy, G = (p - onehot) / B * 2^s on the logits, 2^s the loss scale
  of an f16 gradient path (`config.grad_scale_log2`: 0 unless l1 BN); the update multiplies every
  real-valued gradient by 2^-s (exact), a 1-bit dW is a sign and needs nothing.
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
  compiler/ops/optim.py. Adam's and SGD's lr is `numerics.lr_at(cfg.lr, cfg.lr_schedule, t,
  state.horizon)`, the C's `<prefix>_lr_at` bit for bit. Under Bop a flip of a dense W also
  shifts the running mean of the BN it feeds (`bop_bn_shift`, after the statistics are stored,
  as the C's Bop update does it).
- partial training (cfg.frozen): frozen parameters keep their values (a frozen binary W is its
  sign, int8 +-1), get no dW/db, and layers keep nothing for a dW they do not compute; gradients
  flow only where `ops.needs_grad(graph, cfg)` says, so the backward stops at the first trainable
  layer. A frozen BN still computes its dbeta (the fused BN backward's by-product) but is not
  updated. A frozen BN with nothing trainable upstream (`ops.eval_mode_bns`) normalizes with its
  running statistics in the training step, as in inference, and leaves them unchanged (they are
  "frozen" state tensors).

Exact float32 conventions the C side must copy: scalar coefficients are computed in double and
rounded once to float32 (`np.float32(1 - m)`, `np.float32(1/sqrt(N_W))`; 1 - beta^t in float32,
`numerics.one_minus_pow`); BN normalizes by multiplying with a float32 reciprocal (inv_std =
1/sqrt(var + eps), inv_psi = 1/Psi; a channel with Psi == 0 gets inv_psi = 0, i.e. Xh = 0 and no
gradient through Y). Dense/conv products accumulate in float64 and are rounded once
(`compiler/ops/refmath.matmul`), so the reference does not depend on BLAS blocking or thread
count; the C accumulates in float32, so only exactly representable sums (+-1 products, PO2 sums)
compare bit for bit, the rest within float32 rounding. Means and other reductions are numpy's
(pairwise, deterministic).

Besides compiler/README.md's names the step also exposes the schedule's extra tensors (`<layer>.Wb`
int8 sign(W), `<layer>.x_saved`, `<consumer>.d_in` for one gradient contribution of several,
`<relu>.mask`, `probs` when the graph has no SOFTMAX), so every schedule tensor has a reference
value.

Limits: 2-D convs without dilation (grouped ones: compiler/ops/gconv.py); floor-mode pooling;
AVGPOOL honours attrs["count_include_pad"] (ONNX default 0: padding is not counted); INPUT_QUANT has
no gradient.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from ..compiler import numerics as nx
from ..compiler import ops
from ..compiler.config import TrainConfig, grad_scale_log2, make_config
from ..compiler.errors import BnncWarning, DataError
from ..compiler.ir import INPUT, Graph, LayerKind, tname
from ..compiler.ops.loss import softmax
from ..compiler.ops.optim import ref_bop_bn_shift
from ..compiler.ops.weights import bop_shift_bn
from ..compiler.ops.refctx import RefRun
from ..compiler.preprocess import affine_lut, to_pixels
from ..compiler.schedule import build_schedule
from ..compiler.state import StateTensor, initial_values, state_tensors

__all__ = ["TrainState", "init_state", "train_step", "forward", "forward_backward", "predict",
           "evaluate", "FORWARD", "BACKWARD", "UPDATE"]

_GRAD_FIELD = {"W": "dW", "b": "db", "gamma": "dgamma", "beta": "dbeta"}

# the per-kind rules the driver calls, from the op registry; runtime/check.py wraps entries of
# these tables for the duration of one step
FORWARD: dict[LayerKind, Callable[..., np.ndarray]] = dict(ops.REFERENCE_FORWARD)
BACKWARD: dict[LayerKind, Callable[..., list]] = dict(ops.REFERENCE_BACKWARD)
UPDATE: dict[str, Callable] = dict(ops.REFERENCE_UPDATE)


@dataclass
class TrainState:
    # every compiler.state.StateTensor by name: float32 arrays holding values exactly representable
    # in the tensor's dtype; "bit" tensors are int8 +-1
    tensors: dict[str, np.ndarray]
    step: int = 0                    # optimizer steps taken
    # the run's length the lr schedule decays over (numerics.lr_at; 0 = none known: the base lr);
    # a setting of the run, like the C's set_lr_horizon, not saved with the state
    horizon: int = 0

    def copy(self) -> "TrainState":
        return TrainState({k: v.copy() for k, v in self.tensors.items()}, self.step, self.horizon)


# --------------------------------------------------------------------------------------------------
# state

def init_state(graph: Graph, cfg: TrainConfig) -> TrainState:
    """The file's trained state under `cfg` (`compiler.state.initial_values`: l2 batch norms
    converted to l1 where the config asks for it, 16-bit thresholds fitted) stored in the state
    dtypes with RNE, moments 0, step 0. When a batch norm has no exact l1 equivalent, one BnncWarning names it and gives the
    measured difference of the step-0 predictions from the file's (`conversion_gap`)."""
    conv = initial_values(graph, cfg)
    tensors: dict[str, np.ndarray] = {}
    for st in state_tensors(graph, cfg):
        v = np.zeros(st.shape, np.float32) if st.kind == "opt" else conv.values[st.name]
        tensors[st.name] = nx.store(np.asarray(v, np.float32).reshape(st.shape), st.dtype)
    state = TrainState(tensors, 0)
    if conv.inexact:
        differ, dmax, n = conversion_gap(graph, cfg, state)
        warnings.warn(BnncWarning(
            f"model {graph.name!r}: --bn l1 cannot keep the file's batch norm exactly "
            f"({'; '.join(conv.inexact)}); on {n} random inputs in [-1, 1] the step-0 predictions "
            f"differ from the file's for {100 * differ:.1f} % (max |probability difference| "
            f"{dmax:.3g}); --bn l2 keeps it exactly"))
    return state


PROBES = 64           # random inputs `conversion_gap` measures on


def conversion_gap(graph: Graph, cfg: TrainConfig, state: TrainState) -> tuple[float, float, int]:
    """(share of differing top-1 predictions, max |probability difference|, inputs) of `state`
    under `cfg` against the file's own inference semantics (l2 BN, float32), on PROBES uniform
    random inputs in [-1, 1] (numpy default_rng(0))."""
    x = np.random.default_rng(0).uniform(-1, 1, (PROBES,) + graph.input_shape).astype(np.float32)
    ours = predict(graph, cfg, state, x)
    run = RefRun(graph, make_config("standard", bn="l2"), {}, np.dtype(np.float32), training=False)
    forward(run, x)
    last = run.acts[graph.output.name].reshape(PROBES, -1)
    theirs = last if graph.output.kind is LayerKind.SOFTMAX else softmax(last)
    return (float(np.mean(ours.argmax(1) != theirs.argmax(1))),
            float(np.abs(ours - theirs).max()), PROBES)


# --------------------------------------------------------------------------------------------------
# storing and entry points

def _store(cfg: TrainConfig, st: StateTensor, v: np.ndarray, t: int) -> np.ndarray:
    if st.dtype == "bit":
        return np.asarray(v, np.int8).copy()
    bits = nx.sr_bits(cfg.seed, t, st.tensor_id, int(np.prod(st.shape))) if st.stochastic else None
    return nx.store(np.asarray(v, np.float32).reshape(st.shape), st.dtype, bits)


def update_params(graph: Graph, cfg: TrainConfig, t: int, pre: Mapping[str, np.ndarray],
                  grads: Mapping[str, np.ndarray], horizon: int = 0) -> dict[str, np.ndarray]:
    """Step t's optimizer update of every parameter and its moments, stored in their dtypes: the
    update rules (`UPDATE`) applied to `grads` (`fc1.dW`, ...) from the pre-step state `pre`, at
    the learning rate of step t of a run of `horizon` steps (`numerics.lr_at`)."""
    lr = nx.lr_at(cfg.lr, cfg.lr_schedule, t, horizon)
    sts = state_tensors(graph, cfg)
    by_name = {st.name: st for st in sts}
    unscale = np.float32(2.0 ** -grad_scale_log2(cfg))
    new: dict[str, np.ndarray] = {}
    for st in sts:
        if st.kind != "param":
            continue
        grad = np.asarray(grads[tname(st.layer, _GRAD_FIELD[st.field])], np.float32)
        if st.optimizer != "bop" and not _binary_dw(graph, cfg, st):
            grad = grad * unscale            # undo the loss scale (a 1-bit dW is a sign)
        moms = {n.split(".")[-1]: pre[n].astype(np.float32)
                for n in by_name if n.startswith(st.name + ".")}
        value = pre[st.name].astype(np.int8 if st.dtype == "bit" else np.float32)
        w, moms = UPDATE[st.optimizer](cfg, t, value, grad.reshape(st.shape), moms, lr)
        new[st.name] = _store(cfg, st, w, t)
        for mname, mv in moms.items():
            new[f"{st.name}.{mname}"] = _store(cfg, by_name[f"{st.name}.{mname}"], mv, t)
    return new


def _binary_dw(graph: Graph, cfg: TrainConfig, st: StateTensor) -> bool:
    """Is the gradient of `st` a 1-bit dW (emitted as +-1/sqrt(N_W), no loss scale in it)?"""
    return cfg.binary_dw and st.field == "W" and bool(graph.layer(st.layer).binary)


def _as_batch(graph: Graph, x, cfg: TrainConfig | None = None) -> np.ndarray:
    a = np.asarray(x)
    if cfg is not None and cfg.input == "u8" and a.dtype == np.uint8:
        # a u8 program's batch as pixels: the float inputs are their pixel values
        lut = affine_lut(*cfg.input_affine)
        c = lut.shape[0]
        a = lut[np.arange(c).reshape((1, c, 1)), a.reshape(len(a), c, -1)].reshape(a.shape)
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


def _set_pixels(run: RefRun, graph: Graph, x: np.ndarray) -> None:
    """Under `--input u8` the first layer multiplies the stored pixels (compiler/README.md "The u8
    input"): the batch's floats mapped back to them, DataError if they are not pixel values."""
    if run.cfg.input != "u8":
        return
    try:
        run.pixels = to_pixels(x, run.cfg.input_affine, graph.input_shape)
    except ValueError as err:
        raise DataError(f"model {graph.name!r} was compiled with --input u8: {err}",
                        hint="float features (CSV, float arrays) need --input f32") from None


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


def forward(run: RefRun, x: np.ndarray) -> None:
    """Every layer's output of batch `x` (NCHW, the run's dtype) into run.acts and run.out, in the
    run's mode (training: batch statistics, saved values for the backward)."""
    run.acts[INPUT] = x
    for lay in run.graph.layers:
        y = FORWARD[lay.kind](run, lay, *(run.acts[i] for i in lay.inputs))
        assert y.shape[1:] == lay.shape, f"{lay.name}: computed {y.shape[1:]}, IR says {lay.shape}"
        run.acts[lay.name] = y
        run.emit(lay, "out", y)


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
    x = _as_batch(graph, x, cfg)
    y = _check_labels(graph, labels, len(x))
    run = RefRun(graph, cfg, tensors, x.dtype, training=True,
                 needs_grad=ops.needs_grad(graph, cfg), eval_bns=ops.eval_mode_bns(graph, cfg))
    _set_pixels(run, graph, x)
    forward(run, x)
    logits_name = _logits_layer(graph)
    z = run.acts[logits_name].reshape(len(x), -1)
    zmax = z.max(axis=1, keepdims=True)
    lse = zmax[:, 0] + np.log(np.exp(z - zmax).sum(axis=1))
    rows = np.arange(len(x))
    run.out["loss"] = np.asarray((lse - z[rows, y]).mean(), x.dtype)
    run.out["accuracy"] = np.asarray((z.argmax(axis=1) == y).mean(), x.dtype)
    if graph.output.kind is not LayerKind.SOFTMAX:
        run.out["probs"] = softmax(z)
    onehot = np.zeros_like(z)
    onehot[rows, y] = 1
    scale = x.dtype.type(2.0 ** grad_scale_log2(cfg))       # the loss scale: exact
    grads = {logits_name: ((softmax(z) - onehot) / len(x) * scale).reshape(
        run.acts[logits_name].shape)}
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
    x = _as_batch(graph, x, cfg).astype(np.float32, copy=False)
    out = forward_backward(graph, cfg, state.tensors, x, labels)
    t = state.step + 1
    sts = state_tensors(graph, cfg)
    new = update_params(graph, cfg, t, state.tensors, out, state.horizon)
    for st in sts:
        if st.kind == "bn_stat":
            new[st.name] = _store(cfg, st, out[st.name], t)
        elif st.kind == "frozen":
            new[st.name] = state.tensors[st.name].copy()
    bop_bn_shift(graph, cfg, x, out, state.tensors, new)
    conv_pool_chunks(graph, cfg, out)
    assert new.keys() == {st.name for st in sts}
    out.update(new)
    return TrainState({st.name: new[st.name] for st in sts}, t, state.horizon), out


def conv_pool_chunks(graph: Graph, cfg: TrainConfig, out: dict[str, np.ndarray]) -> None:
    """The scratch tensors of the fused steps as the C leaves them, from the reference's own values
    (only which steps are fused and their chunk size come from the schedule):
    - conv -> max-pool (`ops/pool.py`, conv_pool_fwd): `<conv>.chunk`, the conv output rows of the
      last batch chunk, and past a short last chunk the rows the chunk before it wrote;
    - conv -> l1 BN -> sign (`ops/conv_bn_sign.py`, conv_bn_sign_fwd): `<bn>.chunk`, the same rows of
      the BN output (the last pass normalizes the chunk in place), `<bn>.lanes`, the lane sums
      (lane l = s mod 64) of |conv output - mu| per channel, and `<bn>.x16`, the conv output (its
      exact integers in f16) where the step keeps one."""
    for step in _fused_steps(graph, cfg):
        bn = step.kernel.name == "conv_bn_sign_fwd"
        y = out[tname(graph.layer(step.layer).inputs[0] if bn else step.layer, "out")]
        chunk, b = step.attrs["chunk"], len(y)
        lo = (b - 1) // chunk * chunk
        rows = [lo + r if lo + r < b else lo - chunk + r for r in range(chunk)]
        if not bn:
            out[tname(step.layer, "chunk")] = y[rows]
            continue
        out[tname(step.layer, "chunk")] = out[tname(step.layer, "out")][rows]
        if len(step.outputs) > 9:                # the conv output's exact f16 copy
            out[tname(step.layer, "x16")] = y
        dev = np.abs(y.astype(np.float64) - out[tname(step.layer, "mu")].reshape(1, -1, 1, 1))
        dev = dev.reshape(b, dev.shape[1], -1)
        s = dev.shape[2]
        dev = np.pad(dev, ((0, 0), (0, 0), (0, -s % 64)))
        out[tname(step.layer, "lanes")] = dev.reshape(b, dev.shape[1], -1, 64).sum(
            axis=(0, 2)).astype(np.float32)


@functools.lru_cache(maxsize=32)
def _fused_steps(graph: Graph, cfg: TrainConfig) -> tuple:
    return tuple(s for s in build_schedule(graph, cfg).steps
                 if s.kernel.name in ("conv_pool_fwd", "conv_bn_sign_fwd"))


def bop_bn_shift(graph: Graph, cfg: TrainConfig, x: np.ndarray, out: Mapping[str, np.ndarray],
                 pre: Mapping[str, np.ndarray], new: dict[str, np.ndarray]) -> None:
    """Bop's flip-compensated running means (`ops.weights.bop_shift_bn`), applied in `new` (the
    stored state after step t's update and statistics) from the flips pre -> new of each such
    dense W and the input it kept for its dW (`x_saved`, else its input as given)."""
    for lay in graph.layers:
        bn = bop_shift_bn(graph, cfg, lay)
        if bn is None:
            continue
        xs = out.get(tname(lay.name, "x_saved"))
        if xs is None:
            src = lay.inputs[0]
            xs = x if src == INPUT else out[tname(src, "out")]
        w, rm = tname(lay.name, "W"), tname(bn.name, "running_mean")
        new[rm] = ref_bop_bn_shift(pre[w], new[w], np.asarray(xs).reshape(len(x), -1), new[rm],
                                   cfg.state_dtype)


def predict(graph: Graph, cfg: TrainConfig, state: TrainState, x) -> np.ndarray:
    """Class probabilities (B, classes) in inference mode (BN uses the running statistics)."""
    x = _as_batch(graph, x, cfg).astype(np.float32, copy=False)
    run = RefRun(graph, cfg, state.tensors, x.dtype, training=False)
    _set_pixels(run, graph, x)
    forward(run, x)
    last = run.acts[graph.output.name].reshape(len(x), -1)
    return last if graph.output.kind is LayerKind.SOFTMAX else softmax(last)


def evaluate(graph: Graph, cfg: TrainConfig, state: TrainState, x, labels, *,
             batch: int = 1000) -> float:
    """Top-1 accuracy of `predict` over (x, labels), in chunks of `batch` samples."""
    y = np.asarray(labels)
    hits = 0
    for i in range(0, len(y), batch):
        p = predict(graph, cfg, state, x[i:i + batch])
        hits += int((p.argmax(axis=1) == y[i:i + batch]).sum())
    return hits / max(1, len(y))
