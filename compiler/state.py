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
- Partial training (`cfg.frozen`, compiler/config.py): a frozen parameter is kind "frozen", has no
  optimizer and no moments, and a binary layer's frozen W is stored as its sign bits ("bit", 1 bit
  per weight, the XNOR kernels' packed layout, as Bop's W). Frozen tensors come last in the state
  order, so they form one contiguous tail of the state region (bare-metal targets read it from the
  start-state blob in flash instead of copying it to RAM; compiler/codegen.py). A frozen batch norm
  keeps its running statistics (kind "bn_stat"): in a training step it still normalizes with the
  batch's statistics and updates them (they are statistics, not parameters).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .config import TrainConfig
from .ir import WEIGHT_KINDS, Graph, LayerKind, tname


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

    def add(layer, field, kind, dtype, shape, optimizer=None, stochastic=False):
        if f"{layer}.{field}" in cfg.frozen:
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
