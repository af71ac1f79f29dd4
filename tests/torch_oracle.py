"""PyTorch oracle for bnnc's standard algorithm (ALGORITHM.md §1): ir.Graph -> torch training steps.

`TorchNet(graph, cfg)` is the graph as a torch network (parameters, BN buffers, one forward rule
per LayerKind, `torch.optim.Adam`); benchmarks/bench.py times it in float32 as its PyTorch
contender, so the network the benchmark measures is the one the numpy reference is tested against.
`TorchOracle(graph, cfg)` loads the graph's parameters into torch tensors; `step(x, labels)` runs
the forward pass, `F.cross_entropy` + autograd backward and one `torch.optim.Adam` update, and
returns every tensor under the names `runtime/reference.py` uses (compiler/README.md): `loss`,
`<layer>.out`, `<layer>.d_out`, `<layer>.dW/db/dgamma/dbeta`, and after the update every state
tensor (`fc1.W`, `fc1.W.m`, `fc1.W.v`, `bn1.running_mean`, `bn1.running_var`, ...).

Only torch decides the numbers: binarization is `torch.where(x >= 0, 1, -1)` with the
straight-through gradient `g * 1[|x| <= 1]` as a custom autograd Function (activations and binary
weights use the same rule in the standard algorithm); BN is `F.batch_norm(training=True)`; pooling,
convolution, softmax cross-entropy and Adam are torch's own. The oracle computes in float64 by
default (float32 inputs and parameters widen exactly), so a float32 implementation compared with it
shows its own rounding error only: torch's float32 CPU conv weight gradient alone is off by up to
~9e-6 of its largest entry on the test CNV, ten times the numpy reference's error.

Where torch's conventions differ from bnnc's, the oracle converts:
- BN momentum: bnnc's `cfg.bn_momentum` m is Keras-style (`r = m r + (1-m) batch`); torch's is 1-m.
- running_var: torch accumulates the *unbiased* batch variance, bnnc (Keras) the biased one. Before
  each step the torch buffer holds bnnc's value r; torch writes r' = m r + (1-m) var_unb, and with
  var_b = var_unb (N-1)/N the bnnc value is r' - (r' - m r)/N (in float64). N = elements per
  channel: B (dense) or B*H*W (conv).
- Max-pool ties: torch's CPU kernel keeps the *first* maximum in row-major window order
  (`val > maxval`) and its backward routes the gradient to that index only, for NCHW and
  channels-last tensors alike (test_oracle_torch.py::test_maxpool_tie_goes_to_first).
- Adam: `torch.optim.Adam(lr, betas, eps)` = bias-corrected m_hat/(sqrt(v_hat) + eps); bnnc's
  `W.m`/`W.v` are torch's `exp_avg`/`exp_avg_sq`.

Limits: INPUT_QUANT is not handled (the standard algorithm never trains through it). The loss is
computed from the SOFTMAX layer's input (or the last layer's output when the graph has no SOFTMAX),
so the SOFTMAX layer itself has no `d_out`; nor do tensors upstream of every parameter (an input
AFFINE or FLATTEN): nothing needs them.
`margin_violations` lists elements whose discrete outcome (sign, STE mask, ReLU mask, max-pool
winner) two correct float32 implementations could decide differently; comparisons are exact only
without them.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from bnnc.compiler.config import TrainConfig
from bnnc.compiler.ir import INPUT, Graph, Layer, LayerKind, tname

_GRAD_FIELDS = {"W": "dW", "b": "db", "gamma": "dgamma", "beta": "dbeta"}


class SignSTE(torch.autograd.Function):
    """sign with sign(0) = +1; backward g * 1[|x| <= 1] (BinaryNet's hard-tanh STE)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x.abs() <= 1).to(g.dtype)


# The standard algorithm's weight binarizer: Wb = sign(W), dW masked by 1[|W| <= 1]: the same rule
binarize_weight = SignSTE.apply
sign_ste = SignSTE.apply


def _pad4(pads) -> tuple[int, int, int, int]:
    """IR pads (top, left, bottom, right) -> F.pad order (left, right, top, bottom)."""
    top, left, bottom, right = (int(p) for p in pads)
    return left, right, top, bottom


def _symmetric(pads, kernel=None) -> int | None:
    """IR pads -> one torch `padding` int when all four are equal (and, for a pool of `kernel`,
    at most half of it, torch's limit), else None: pad explicitly with F.pad."""
    top, left, bottom, right = (int(p) for p in pads)
    if not top == left == bottom == right:
        return None
    return top if kernel is None or top <= min(int(k) for k in kernel) // 2 else None


def _channel_view(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-channel [C] or per-tensor [1] constant shaped to broadcast over x [B, C, ...]."""
    return v.reshape((1, -1) + (1,) * (x.dim() - 2)) if v.numel() > 1 else v.reshape(())


class TorchNet:
    """A torch copy of `graph`'s trainable state plus the forward rules of each LayerKind, and
    `torch.optim.Adam` over its parameters.

    `init` optionally overrides the graph's parameters / running statistics by bnnc state name
    (e.g. a reference `TrainState.tensors`); Adam starts from zero moments either way."""

    def __init__(self, graph: Graph, cfg: TrainConfig,
                 init: Mapping[str, np.ndarray] | None = None, *,
                 dtype: torch.dtype = torch.float64):
        self.graph = graph
        self.cfg = cfg
        self.dtype = dtype
        init = dict(init or {})
        self.params: dict[str, torch.Tensor] = {}     # "fc1.W" -> leaf tensor
        self.running: dict[str, torch.Tensor] = {}    # "bn1.running_mean" -> buffer
        self.consts: dict[str, torch.Tensor] = {}     # AFFINE scale/bias
        for lay in graph.layers:
            if lay.kind in (LayerKind.DENSE, LayerKind.CONV, LayerKind.GROUP_CONV,
                            LayerKind.BATCHNORM):
                for f in ("W", "b", "gamma", "beta"):
                    if f in lay.params:
                        value = init.get(tname(lay.name, f), lay.params[f])
                        self.params[tname(lay.name, f)] = self._tensor(value).requires_grad_()
            if lay.kind is LayerKind.BATCHNORM:
                for f, p in (("running_mean", "mean"), ("running_var", "var")):
                    value = init.get(tname(lay.name, f), lay.params[p])
                    self.running[tname(lay.name, f)] = self._tensor(value)
            elif lay.kind is LayerKind.AFFINE:
                for f in ("scale", "bias"):
                    self.consts[tname(lay.name, f)] = self._tensor(lay.params[f])
            elif lay.kind is LayerKind.INPUT_QUANT:
                raise NotImplementedError(f"{lay.name}: the torch oracle has no INPUT_QUANT")
        # torch refuses an empty parameter list; a parameter-free graph can still run forward()
        self.opt = torch.optim.Adam(list(self.params.values()), lr=cfg.lr,
                                    betas=(cfg.beta1, cfg.beta2),
                                    eps=cfg.adam_eps) if self.params else None

    def _tensor(self, value) -> torch.Tensor:
        """float32 values (the graph's, the reference's) widened exactly to the oracle's dtype."""
        return torch.from_numpy(np.array(value, np.float32)).to(self.dtype)

    # -- forward ---------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Layer outputs by name (batch-first, shape (B,) + layer.shape) and the logits."""
        outs: dict[str, torch.Tensor] = {INPUT: x}
        for lay in self.graph.layers:
            y = self._layer(lay, *(outs[i] for i in lay.inputs))
            outs[lay.name] = y.reshape((x.shape[0],) + lay.shape)
        del outs[INPUT]
        last = self.graph.output
        logits = outs[last.inputs[0]] if last.kind is LayerKind.SOFTMAX else outs[last.name]
        return outs, logits.reshape(x.shape[0], -1)

    def _layer(self, lay: Layer, x: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        k, p, a = lay.kind, lambda f: self.params[tname(lay.name, f)], lay.attrs
        if k is LayerKind.DENSE:
            w = binarize_weight(p("W")) if lay.binary else p("W")
            y = x.reshape(x.shape[0], -1) @ w
            return y + p("b") if "b" in lay.params else y
        if k in (LayerKind.CONV, LayerKind.GROUP_CONV):
            w = binarize_weight(p("W")) if lay.binary else p("W")
            b = p("b") if "b" in lay.params else None
            pad = _symmetric(a["pads"])
            if pad is None:
                x, pad = F.pad(x, _pad4(a["pads"])), 0
            return F.conv2d(x, w, b, stride=tuple(a["strides"]), padding=pad,
                            groups=int(a.get("group", 1)))
        if k is LayerKind.BATCHNORM:
            return F.batch_norm(x, self.running[tname(lay.name, "running_mean")],
                                self.running[tname(lay.name, "running_var")], p("gamma"), p("beta"),
                                training=True, momentum=1.0 - self.cfg.bn_momentum,
                                eps=float(a["eps"]))
        if k is LayerKind.SIGN:
            return sign_ste(x)
        if k is LayerKind.RELU:
            return F.relu(x)
        if k is LayerKind.MAXPOOL:
            pad = _symmetric(a["pads"], a["kernel"])      # torch pads a max-pool with -inf too
            if pad is None:
                x, pad = F.pad(x, _pad4(a["pads"]), value=-float("inf")), 0
            return F.max_pool2d(x, tuple(a["kernel"]), tuple(a["strides"]), pad)
        if k is LayerKind.AVGPOOL:
            return self._avgpool(x, a)
        if k is LayerKind.GLOBAL_AVGPOOL:
            return x.mean(dim=(2, 3))
        if k is LayerKind.FLATTEN:
            return x.reshape(x.shape[0], -1)
        if k is LayerKind.ADD:
            return x + rest[0]
        if k is LayerKind.AFFINE:
            scale = _channel_view(self.consts[tname(lay.name, "scale")], x)
            return x * scale + _channel_view(self.consts[tname(lay.name, "bias")], x)
        if k is LayerKind.SOFTMAX:
            return torch.softmax(x.reshape(x.shape[0], -1), dim=1)
        raise NotImplementedError(f"{lay.name}: no torch rule for {k.value}")

    @staticmethod
    def _avgpool(x: torch.Tensor, a: Mapping) -> torch.Tensor:
        kernel, strides = tuple(a["kernel"]), tuple(a["strides"])
        pad = _symmetric(a["pads"], kernel)
        if pad == 0 or (pad is not None and a.get("count_include_pad", 0)):
            return F.avg_pool2d(x, kernel, strides, pad)      # torch counts the padding
        xp = F.pad(x, _pad4(a["pads"]))
        if a.get("count_include_pad", 0):
            return F.avg_pool2d(xp, kernel, strides)
        # ONNX AveragePool default (count_include_pad=0): divide by the number of real elements
        ones = F.pad(torch.ones_like(x[:1, :1]), _pad4(a["pads"]))
        return F.avg_pool2d(xp, kernel, strides) / F.avg_pool2d(ones, kernel, strides)



class TorchOracle(TorchNet):
    """The oracle: `TorchNet` (float64 by default) whose step returns every tensor by bnnc name."""

    def __init__(self, graph: Graph, cfg: TrainConfig,
                 init: Mapping[str, np.ndarray] | None = None, *,
                 dtype: torch.dtype = torch.float64):
        assert cfg.algorithm == "standard" and cfg.optimizer == "adam" and cfg.bn == "l2", cfg
        super().__init__(graph, cfg, init, dtype=dtype)

    def step(self, x: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
        """Forward, backward and one Adam update: every tensor by its bnnc name, as numpy arrays
        of the oracle's dtype."""
        assert self.opt is not None, "a graph without parameters has no training step"
        xt = self._tensor(x)
        old_var = {n: r.double().clone() for n, r in self.running.items()
                   if n.endswith("running_var")}
        self.opt.zero_grad(set_to_none=True)
        outs, logits = self.forward(xt)
        for t in outs.values():
            if t.requires_grad:
                t.retain_grad()
        loss = F.cross_entropy(logits, torch.from_numpy(np.asarray(labels, np.int64)))
        loss.backward()
        # only now: autograd version-checks the running buffers F.batch_norm saved for backward
        self._to_biased_running_var(old_var, outs)

        res: dict[str, np.ndarray] = {"loss": loss.detach().numpy().copy()}
        for name, t in outs.items():
            res[tname(name, "out")] = t.detach().numpy().copy()
            if t.grad is not None:
                res[tname(name, "d_out")] = t.grad.numpy().copy()
        for name, prm in self.params.items():
            layer, f = name.rsplit(".", 1)
            res[tname(layer, _GRAD_FIELDS[f])] = prm.grad.numpy().copy()
        self.opt.step()
        for name, prm in self.params.items():
            res[name] = prm.detach().numpy().copy()
            st = self.opt.state[prm]
            res[name + ".m"] = st["exp_avg"].numpy().copy()
            res[name + ".v"] = st["exp_avg_sq"].numpy().copy()
        for name, r in self.running.items():
            res[name] = r.numpy().copy()
        return res

    def adopt(self, name: str, values: Mapping[str, np.ndarray], where: np.ndarray) -> None:
        """Overwrite parameter `name` and its Adam moments with `values[name]`, `values[name+".m"]`,
        `values[name+".v"]` where `where` is true: the comparison test's way to resync elements
        whose update is decided by rounding noise (see test_oracle_torch.py)."""
        prm = self.params[name]
        mask = torch.from_numpy(np.asarray(where, bool))
        with torch.no_grad():
            prm[mask] = self._tensor(values[name])[mask]
            st = self.opt.state[prm]
            for f, key in ((".m", "exp_avg"), (".v", "exp_avg_sq")):
                st[key][mask] = self._tensor(values[name + f])[mask]

    def _to_biased_running_var(self, old_var: dict[str, torch.Tensor],
                               outs: dict[str, torch.Tensor]) -> None:
        m = self.cfg.bn_momentum
        for name, old in old_var.items():
            layer = name.rsplit(".", 1)[0]
            y = outs[layer]
            n = y.numel() // y.shape[1]
            buf = self.running[name]
            new = buf.double()
            buf.copy_((new - (new - m * old) / n).to(buf.dtype))


def margin_violations(graph: Graph, outs: Mapping[str, np.ndarray], margin: float) -> list[str]:
    """Elements whose discrete outcome float32 rounding could flip: a SIGN input within `margin` of
    0 (sign) or of +-1 (STE mask), a RELU input within `margin` of 0, a max-pool window whose best
    two values differ by less than `margin` without being equal (exact ties are decided by the same
    first-max rule everywhere, and the test inputs make them exact). `outs` maps layer -> output."""
    bad = []
    for lay in graph.layers:
        if lay.kind not in (LayerKind.SIGN, LayerKind.RELU, LayerKind.MAXPOOL):
            continue
        x = np.asarray(outs[lay.inputs[0]], np.float64)
        if lay.kind is LayerKind.SIGN:
            n = int(np.sum((np.abs(x) < margin) | (np.abs(np.abs(x) - 1) < margin)))
        elif lay.kind is LayerKind.RELU:
            n = int(np.sum(np.abs(x) < margin))
        else:
            a = lay.attrs
            xt = F.pad(torch.from_numpy(x), _pad4(a["pads"]), value=-np.inf)
            win = F.unfold(xt.reshape((-1, 1) + xt.shape[2:]), tuple(a["kernel"]),
                           stride=tuple(a["strides"]))
            top2 = torch.topk(win, 2, dim=1).values
            gap = (top2[:, 0] - top2[:, 1]).numpy()
            n = int(np.sum((gap > 0) & (gap < margin)))
        if n:
            bad.append(f"{lay.name}: {n} element(s) within {margin:g} of a decision boundary")
    return bad
