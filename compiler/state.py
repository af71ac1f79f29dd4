"""The persistent training state of a (graph, config): every parameter, optimizer moment and BN statistic.

This is the one list the schedule, the numpy reference, codegen and checkpoints agree on: names, dtypes,
shapes and the integer `tensor_id` that keys the reproducible stochastic rounding (ALGORITHM.md §2a).
Order = graph layer order, then the field order below; ids are positions in that order.

Decisions (documented in compiler/README.md):
- l1 BN has no gamma and no eps: an imported gamma is not used under `--bn l1`; its running statistics
  are (running_mean, running_psi), initialised (mean, sqrt(var + eps)) from the file.
- Bop trains binary weights only (latent-free, stored as bits); every other trainable tensor
  (BN beta/gamma, real layers' W and b) uses Adam, as Larq pairs Bop with Adam.
- Trainable tensors and optimizer moments are stored in `cfg.state_dtype` with stochastic rounding;
  BN running statistics in the same dtype with round-to-nearest-even (they are not updated by gradients).
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import TrainConfig
from .ir import WEIGHT_KINDS, Graph, LayerKind, tname


@dataclass(frozen=True)
class StateTensor:
    name: str               # "fc1.W", "fc1.W.m", "bn1.running_mean"
    layer: str
    field: str              # "W", "b", "gamma", "beta", "running_mean", "running_var", "running_psi"
    kind: str               # "param" | "opt" | "bn_stat"
    dtype: str              # "f32" | "bf16" | "f16" | "bit"
    shape: tuple[int, ...]
    tensor_id: int
    optimizer: str | None   # for params: "adam" | "sgd" | "bop"; None otherwise
    stochastic: bool        # stores use stochastic rounding (16-bit dtypes only)


def state_tensors(graph: Graph, cfg: TrainConfig) -> list[StateTensor]:
    sd, is16 = cfg.state_dtype, cfg.state_dtype != "f32"
    out: list[StateTensor] = []

    def add(layer, field, kind, dtype, shape, optimizer=None, stochastic=False):
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
    return out


MOMENTS = {"adam": ("m", "v"), "sgd": ("m",), "bop": ("m",)}   # optimizer -> moment fields


def _moments(optimizer: str) -> tuple[str, ...]:
    return MOMENTS[optimizer]
