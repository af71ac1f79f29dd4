"""What float16 storage does to the PO2 codes of each binary layer's dY, with and without the loss
scale (compiler/README.md, "Loss scale of the f16 gradient path").

One training step of the numpy reference (runtime/reference.py) at the initial state, on the
first B training examples, proposed algorithm. For every binary dense/conv layer: the median and
largest |dY| without the scale, the share of entries below f16's smallest subnormal (2^-24), and
the share of PO2 codes (ALGORITHM.md §2) that differ between quantizing the float32 dY and
quantizing it after a float16 store (what the emitted C keeps under l1 BN), with no loss scale and
with bnnc's 2^s.

    python benchmarks/grad_f16.py [--model cnv] [--data fashion-mnist] [--batch 100]
"""

from __future__ import annotations

import argparse

import numpy as np

from bnnc.compiler import numerics as nx
from bnnc.compiler.config import grad_scale_log2, make_config
from bnnc.compiler.ir import WEIGHT_KINDS
from bnnc.compiler.zoo import build_zoo_model
from bnnc.compiler.frontend import load_model
from bnnc.runtime import reference as ref
from bnnc.runtime.datasets import training_data


def differing_codes(dy: np.ndarray, scale: float, bias: int) -> float:
    c32, _ = nx.po2_quantize(dy * np.float32(scale), bias)
    c16, _ = nx.po2_quantize(nx.to_f16_rne(dy * np.float32(scale)), bias)
    return float(np.mean(c32 != c16))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cnv", help="zoo model name")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--batch", type=int, default=100)
    args = ap.parse_args()
    graph = load_model(build_zoo_model(args.model))
    cfg = make_config("proposed", batch=args.batch)
    _, x, y, _, _ = training_data(graph, args.data, limit=args.batch)
    s = grad_scale_log2(cfg)
    out = ref.forward_backward(graph, cfg, ref.init_state(graph, cfg).tensors,
                               x[:args.batch].astype(np.float32), y[:args.batch])
    print(f"{args.model}, B={args.batch}, {args.data}, step 1, proposed (PO2 bias "
          f"{cfg.po2_bias}); loss scale 2^{s}")
    print("| layer | median abs(dY) | max abs(dY) | below 2^-24 | codes differ, no scale "
          f"| codes differ, 2^{s} |")
    print("|---|---|---|---|---|---|")
    for lay in graph.layers:
        if lay.kind not in WEIGHT_KINDS or not lay.binary:
            continue
        dy = np.asarray(out[f"{lay.name}.d_out"], np.float32) / np.float32(2.0 ** s)  # exact
        a = np.abs(dy)
        print(f"| {lay.name} | {np.median(a):.2e} | {a.max():.2e} | "
              f"{np.mean(a < 2.0 ** -24):.1%} | {differing_codes(dy, 1.0, cfg.po2_bias):.1%} | "
              f"{differing_codes(dy, 2.0 ** s, cfg.po2_bias):.1%} |")


if __name__ == "__main__":
    main()
