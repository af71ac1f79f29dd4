"""The paper's memory spreadsheet (ALGORITHM.md §4): `spreadsheet(graph_or_dims, batch, algorithm,
optimizer) -> dict` of MiB per class and total, for the comparison columns of `bnnc memory`.

Input: an `ir.Graph` or `SheetDims` (the weight layers' sizes written by hand). Output: exact floats
in MiB (bits / 8 / 2^20); round for display only.

The model, summed over weight layers l with N_W weights, C output channels and per-sample input size
A:
    model      = sum N_W * p_w + sum C * p_c
    optimizer  = sum N_W * p_dw + sum N_W * p_m  (+ sum N_W * p_m for Adam's second moment)
    activation = B * (sum A + classes) * p_a + B * A_max * (p_g1 + p_g2)
with A_max the largest of the A and `classes`; standard: every p = 32; proposed: p_w = p_c = p_m =
16, p_dw = 1, p_a = 1, p_g1 = 16, p_g2 = 5. These reproduce the authors' published values (MLP 7.40
/ 2.56, CNV 105.05 / 24.61, BinaryNet 425.31 / 118.21 MiB at B = 100 with Adam).

Optimizers the spreadsheet does not spell out -- decisions, stated so the columns can be read:
- sgd (with momentum): one moment, i.e. Adam without the second moment.
- bop: no latent weights, so the model stores the weights as 1 bit (p_w = 1) and the optimizer holds
  one momentum per weight (p_m), the weight gradient being accumulated straight into it (no dW
  buffer). This reproduces the spreadsheet's cheapest variant, proposed + Bop on MLP = 1.03 MiB at B
  = 100.

Limits (the spreadsheet's own, kept on purpose): it counts every weight layer as binary, assumes
every layer's input is live at once plus exactly two gradient buffers of the largest size, and
ignores STE masks, BN sign bits, pool masks, Psi/mu/running statistics and the real first-layer
input. The liveness plan (`bnnc inspect`) is the honest number; `bnnc memory` prints both.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError
from .ir import WEIGHT_KINDS, Graph

MIB = float(1 << 20)
CLASSES = ("model", "optimizer", "activation")


@dataclass(frozen=True)
class SheetLayer:
    n_weights: int     # N_W
    channels: int      # C, output channels (one beta per channel)
    in_elems: int      # A per sample: H*W*C of the layer's input


@dataclass(frozen=True)
class SheetDims:
    layers: tuple[SheetLayer, ...]
    num_classes: int


# bit widths (p_w, p_c, p_dw, p_m, p_a, p_g1, p_g2) per algorithm
PRECISIONS: dict[str, dict[str, int]] = {
    "standard": dict(w=32, c=32, dw=32, m=32, a=32, g1=32, g2=32),
    "proposed": dict(w=16, c=16, dw=1, m=16, a=1, g1=16, g2=5),
}
MOMENTS = {"adam": 2, "sgd": 1, "bop": 1}


def dims_from_graph(graph: Graph) -> SheetDims:
    """The spreadsheet's view of a graph: each DENSE/CONV layer's weight count, output channels and
    per-sample input size."""
    layers = []
    for lay in graph.layers:
        if lay.kind not in WEIGHT_KINDS:
            continue
        w = lay.params["W"]
        channels = w.shape[0] if w.ndim == 4 else w.shape[1]
        in_elems = 1
        for d in graph.shape_of(lay.inputs[0]):
            in_elems *= d
        layers.append(SheetLayer(int(w.size), int(channels), in_elems))
    if not layers:
        raise ConfigError(f"model '{graph.name}' has no dense or conv layer; the paper's memory "
                          f"model counts weight layers only")
    return SheetDims(tuple(layers), graph.num_classes)


def spreadsheet(graph_or_dims: Graph | SheetDims, batch: int, algorithm: str = "proposed",
                optimizer: str = "adam") -> dict[str, float]:
    """MiB per class ("model", "optimizer", "activation") and "total", as the authors' sheet."""
    if algorithm not in PRECISIONS:
        raise ConfigError(f"unknown algorithm {algorithm!r}; choose standard or proposed")
    if optimizer not in MOMENTS:
        raise ConfigError(f"unknown optimizer {optimizer!r}; choose one of: {', '.join(MOMENTS)}")
    if not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"batch size must be a positive integer, got {batch!r}")
    dims = graph_or_dims if isinstance(graph_or_dims, SheetDims) else dims_from_graph(graph_or_dims)
    p = PRECISIONS[algorithm]
    n_w = sum(lay.n_weights for lay in dims.layers)
    n_c = sum(lay.channels for lay in dims.layers)
    acts = [lay.in_elems for lay in dims.layers] + [dims.num_classes]

    p_w, p_dw = (1, 0) if optimizer == "bop" else (p["w"], p["dw"])
    bits = {
        "model": n_w * p_w + n_c * p["c"],
        "optimizer": n_w * p_dw + MOMENTS[optimizer] * n_w * p["m"],
        "activation": batch * (sum(acts) * p["a"] + max(acts) * (p["g1"] + p["g2"])),
    }
    out = {k: v / 8 / MIB for k, v in bits.items()}
    out["total"] = sum(bits.values()) / 8 / MIB
    return out
