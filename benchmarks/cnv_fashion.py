"""The zoo CNV trained on Fashion-MNIST padded to 3x32x32 (issue 15): `bnnc run` of the emitted C on
the host, standard and proposed, test accuracy after every epoch, side by side.

For each algorithm: `bnnc compile cnv --batch 100` (Adam) into a temporary directory, then
`bnnc run OUT --data fashion-mnist --epochs E` (the standalone trainer; the data go through
`--fit auto`: grey -> RGB, pad 28x28 -> 32x32, the symmetric preprocessing the zoo model records),
collecting the trainer's epoch lines. One algorithm at a time.

    nice -n 10 python benchmarks/cnv_fashion.py [--epochs 15] [--algorithms standard,proposed]
        [--width 1] [--limit N] [--log-every 50] [--ablate "--bn l2" --ablate "--no-po2" ...]

`--ablate FLAGS` adds a column: the proposed algorithm compiled with FLAGS (one technique switched,
e.g. `--bn l2`, `--no-po2`, `--no-binary-dw`, `--state-dtype f32`, `--po2-bias 6`).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run(cmd: list[str]) -> list[str]:
    """Run a bnnc command, echo its lines as they come, return them."""
    lines = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as p:
        for line in p.stdout:
            print("   ", line.rstrip(), flush=True)
            lines.append(line)
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--algorithms", default="standard,proposed")
    ap.add_argument("--width", type=float, default=None, help="zoo --width (1 = the paper's CNV)")
    ap.add_argument("--limit", type=int, default=None, help="first N training examples")
    ap.add_argument("--log-every", type=int, default=50, help="print the loss every K steps")
    ap.add_argument("--ablate", action="append", default=[], metavar="FLAGS",
                    help="also run the proposed algorithm compiled with these bnnc compile flags")
    args = ap.parse_args()
    bnnc = ["bnnc"]
    results: dict[str, list[float]] = {}
    seconds: dict[str, float] = {}
    runs = [(algo, algo, []) for algo in args.algorithms.split(",") if algo]
    runs += [(f"proposed {flags}", "proposed", flags.split()) for flags in args.ablate]
    for name, algo, flags in runs:
        with tempfile.TemporaryDirectory(prefix=f"bnnc-cnv-{algo}-") as out:
            comp = [*bnnc, "compile", "cnv", "--batch", "100", "--algorithm", algo, *flags,
                    "-o", out]
            comp += ["--width", str(args.width)] if args.width else []
            run(comp)
            cmd = [*bnnc, "run", out, "--data", "fashion-mnist", "--epochs", str(args.epochs)]
            cmd += ["--limit", str(args.limit)] if args.limit else []
            cmd += ["--log-every", str(args.log_every)] if args.log_every else []
            t0 = time.time()
            lines = run(cmd)
            seconds[name] = time.time() - t0
            results[name] = [float(line.split("test acc")[1].split("%")[0])
                             for line in lines if line.startswith("epoch ")]
    print()
    print(f"CNV{'' if not args.width else f' width {args.width:g}'} on Fashion-MNIST 3x32x32, "
          f"B=100, Adam, emitted C on the host ({cpu()}, {os.cpu_count()} CPUs; "
          f"load {os.getloadavg()[0]:.1f})")
    algos = list(results)
    print("| epoch | " + " | ".join(algos) + " |")
    print("|---|" + "---|" * len(algos))
    for e in range(max(len(v) for v in results.values())):
        row = [f"{results[a][e]:.2f} %" if e < len(results[a]) else "" for a in algos]
        print(f"| {e + 1} | " + " | ".join(row) + " |")
    print("| wall time | " + " | ".join(f"{seconds[a] / 60:.1f} min" for a in algos) + " |")
    if "standard" in results and "proposed" in results:
        a, b = results["standard"][-1], results["proposed"][-1]
        print(f"gap after epoch {len(results['standard'])}: {a - b:+.2f} pp "
              f"(standard - proposed)")


if __name__ == "__main__":
    main()
