"""Benchmark: milliseconds per training step of the emitted C vs the numpy reference (and PyTorch).

Input: the zoo MLP (784-256x4-10, all layers binary) at B=100 and B=200, both algorithms. Output: a
markdown table, one row per (algorithm, batch), with the median ms/step of

- the emitted C, compiled with the host target's flags and loaded with `HostProgram(debug=False)`;
- the numpy reference trainer (`runtime/reference.py`) on the same batches;
- (standard rows only, unless --no-torch) a PyTorch BNN MLP of the same shape (latent real weights,
  sign forward with straight-through gradients, BN, Adam) on one thread, as an outside yardstick.

    python benchmarks/step_time.py --steps 20

Every timing is the median of `--steps` steps after `--warmup` untimed steps, so one scheduling
hiccup on a shared machine does not move the number. Inputs are random on the 1/128 grid; step time
does not depend on the values (no data-dependent branches on the hot paths that matter).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from bnnc.compiler.target import load_target
from bnnc.compiler.config import make_config
from bnnc.compiler.frontend import load_model
from bnnc.compiler.pipeline import compile_to_c
from bnnc.compiler.zoo import build_zoo_model
from bnnc.runtime import reference as ref
from bnnc.runtime.host import HostProgram


def _median_ms(fn, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000.0 * float(np.median(times))


def _batches(graph, batch: int, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    xs = (rng.integers(-128, 128, (n, batch) + graph.input_shape) / 128.0).astype(np.float32)
    ys = rng.integers(0, graph.num_classes, (n, batch)).astype(np.int32)
    return xs, ys


def time_c(graph, cfg, work: Path, steps: int, warmup: int) -> float:
    tgt = load_target("host")
    compile_to_c(graph, cfg, tgt, work, command="benchmarks/step_time.py")
    hp = HostProgram(work, target=tgt, debug=False, cache=work / "cache")
    hp.load_state(ref.init_state(graph, cfg).tensors, step=0, seed=cfg.seed)
    xs, ys = _batches(graph, cfg.batch, 8)
    it = iter(range(1 << 30))

    def step():
        i = next(it) % 8          # one index per step: batch i with its own labels
        hp.train_step(xs[i], ys[i])

    return _median_ms(step, steps, warmup)


def time_numpy(graph, cfg, steps: int, warmup: int) -> float:
    box = [ref.init_state(graph, cfg)]
    xs, ys = _batches(graph, cfg.batch, 8)
    it = iter(range(1 << 30))

    def step():
        i = next(it) % 8
        box[0], _ = ref.train_step(graph, cfg, box[0], xs[i], ys[i])
    return _median_ms(step, steps, warmup)


def time_torch(graph, batch: int, steps: int, warmup: int) -> float | None:
    """Standard BNN MLP in PyTorch: the same layer sizes, one CPU thread."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(1)
    torch.manual_seed(0)

    class SignSTE(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return torch.where(x >= 0, 1.0, -1.0)

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * (x.abs() <= 1).to(g.dtype)

    class BinLinear(torch.nn.Linear):
        def forward(self, x):
            return torch.nn.functional.linear(x, SignSTE.apply(self.weight))

    dims = [int(np.prod(graph.input_shape))] + [256] * 4 + [graph.num_classes]
    layers: list[torch.nn.Module] = []
    for i in range(len(dims) - 1):
        layers += [BinLinear(dims[i], dims[i + 1], bias=False), torch.nn.BatchNorm1d(dims[i + 1])]
    model = torch.nn.Sequential(*layers)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    xs, ys = _batches(graph, batch, 8)
    tx = torch.from_numpy(xs.reshape(8, batch, -1))
    ty = torch.from_numpy(ys.astype(np.int64))
    it = iter(range(1 << 30))

    def step():
        i = next(it) % 8
        h = tx[i]
        for m in model:
            h = m(h)
            if isinstance(m, torch.nn.BatchNorm1d) and h.shape[1] != graph.num_classes:
                h = SignSTE.apply(h)
        loss = torch.nn.functional.cross_entropy(h, ty[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return _median_ms(step, steps, warmup)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="timed steps per cell (median)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, nargs="+", default=[100, 200])
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be >= 1")

    graph = load_model(build_zoo_model("mlp"))
    print(f"MLP 784-256x4-10, median of {args.steps} steps after {args.warmup} warm-up, ms/step\n")
    print("| algorithm | batch | emitted C | numpy reference | PyTorch (1 thread) | numpy / C |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="bnnc-bench-") as tmp:
        for algorithm in ("standard", "proposed"):
            for batch in args.batch:
                cfg = make_config(algorithm, batch=batch, seed=0)
                c_ms = time_c(graph, cfg, Path(tmp) / f"{algorithm}-{batch}", args.steps,
                              args.warmup)
                np_ms = time_numpy(graph, cfg, args.steps, args.warmup)
                t_ms = (time_torch(graph, batch, args.steps, args.warmup)
                        if algorithm == "standard" and not args.no_torch else None)
                t_txt = f"{t_ms:.2f}" if t_ms is not None else "-"
                print(f"| {algorithm} | {batch} | {c_ms:.2f} | {np_ms:.2f} | {t_txt} | "
                      f"{np_ms / c_ms:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
