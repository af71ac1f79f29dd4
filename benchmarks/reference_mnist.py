"""Benchmark: the paper's MLP on MNIST with the numpy reference trainer, standard vs proposed.

Input: MNIST under the data root (`bnnc data fetch mnist`); the zoo MLP (784-256x4-10, all layers
binary) imported through the frontend. Output: a table of test accuracy per epoch for both
algorithms (B=100, Adam lr 1e-3, the authors' settings) plus the wall time and mean step time of
each run.

    python benchmarks/reference_mnist.py --epochs 3

Both runs start from the same weights (zoo seed 0) and see the same batch order (numpy
default_rng(seed), one permutation per epoch), so the difference between the columns is the
algorithm alone.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bnnc.compiler.config import make_config
from bnnc.compiler.frontend import load_model
from bnnc.compiler.zoo import build_zoo_model
from bnnc.runtime import reference as ref
from bnnc.runtime.datasets import load_dataset


def run(graph, cfg, data, epochs: int) -> tuple[list[float], float, float]:
    """Train `epochs`; returns (test accuracy after each epoch, wall seconds, mean ms per step)."""
    x_train = data.x_train.reshape((len(data.x_train),) + graph.input_shape)
    x_test = data.x_test.reshape((len(data.x_test),) + graph.input_shape)
    state = ref.init_state(graph, cfg)
    rng = np.random.default_rng(cfg.seed)
    accs, step_s, t0 = [], [], time.perf_counter()
    for epoch in range(epochs):
        order = rng.permutation(len(x_train))
        for i in range(len(x_train) // cfg.batch):
            idx = order[i * cfg.batch:(i + 1) * cfg.batch]
            ts = time.perf_counter()
            state, _ = ref.train_step(graph, cfg, state, x_train[idx], data.y_train[idx])
            step_s.append(time.perf_counter() - ts)
        accs.append(ref.evaluate(graph, cfg, state, x_test, data.y_test))
        print(f"  {cfg.algorithm:<9} epoch {epoch + 1}: test acc {100 * accs[-1]:.2f} %",
              flush=True)
    return accs, time.perf_counter() - t0, 1000 * float(np.mean(step_s))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--limit", type=int, default=None, help="first N train/test examples only")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    graph = load_model(build_zoo_model("mlp"))
    data = load_dataset("mnist", args.data_dir, limit=args.limit)
    print(f"MLP ({graph.param_count():,} params) on MNIST: {len(data.x_train)} train / "
          f"{len(data.x_test)} test, B=100, Adam lr 1e-3, {args.epochs} epochs")
    results = {}
    for algorithm in ("standard", "proposed"):
        cfg = make_config(algorithm, batch=100, seed=args.seed)
        results[algorithm] = run(graph, cfg, data, args.epochs)

    print("\n| epoch | standard test acc | proposed test acc |\n|---|---|---|")
    for e in range(args.epochs):
        print(f"| {e + 1} | {100 * results['standard'][0][e]:.2f} % | "
              f"{100 * results['proposed'][0][e]:.2f} % |")
    for algorithm, (_, wall, ms) in results.items():
        print(f"{algorithm}: {wall:.1f} s wall, {ms:.1f} ms per step (mean)")


if __name__ == "__main__":
    main()
