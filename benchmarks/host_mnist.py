"""MLP on MNIST trained by the emitted C on the host: standard vs proposed, side by side in one run.

For each algorithm: compile the zoo MLP (B=100, Adam), train E epochs with the C (cffi, the same loop
as `bnnc run`), print test accuracy per epoch and the median ms/step; then build the same C into a
plain C process (a 30-line driver: static input buffers, init, a few train steps) and measure its
peak RSS with /usr/bin/time next to the planned bytes (arena + state) -- the number a device needs.

    python benchmarks/host_mnist.py [--epochs 3] [--batch 100] [--limit N]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bnnc.compiler.target import load_target
from bnnc.compiler.config import make_config
from bnnc.compiler.contract import Manifest
from bnnc.compiler.frontend import load_model
from bnnc.compiler.pipeline import compile_to_c
from bnnc.compiler.zoo import build_zoo_model
from bnnc.runtime import reference as ref
from bnnc.runtime.datasets import load_dataset
from bnnc.runtime.host import HostProgram
from bnnc.runtime.train_loop import HostBackend, fit

DRIVER = r"""
#include <stdio.h>
#include "{h}"
static float x[{P}_INPUT_ELEMS];   /* the whole batch */
static int32_t y[{P}_BATCH];
int main(int argc, char **argv)
{{
    int s, i, steps = argc > 1 ? atoi(argv[1]) : 3;
    uint32_t r = 1u;
    float loss = 0.0f, acc = 0.0f;
    for (i = 0; i < {P}_INPUT_ELEMS; i++) {{
        r = r * 1664525u + 1013904223u;
        x[i] = (float)(r >> 8) / 8388608.0f - 1.0f;
    }}
    for (i = 0; i < {P}_BATCH; i++) y[i] = i % {P}_CLASSES;
    {p}_init(1u);
    for (s = 0; s < steps; s++)
        if ({p}_train_step(x, y, &loss, &acc) != 0) return 1;
    printf("loss %f\n", (double)loss);
    return 0;
}}
"""


def peak_rss_kib(exe: Path, *args: str) -> int:
    res = subprocess.run(["/usr/bin/time", "-v", str(exe), *args], capture_output=True, text=True,
                         check=True)
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr).group(1))


def c_process_rss(out: Path, manifest: Manifest) -> tuple[int, int]:
    """(peak RSS KiB of the trainer process, of an empty C program built the same way)."""
    prefix, model = manifest.prefix, manifest.model
    src = out / "driver.c"
    src.write_text("#include <stdlib.h>\n" + DRIVER.format(h=f"{model}.h", p=prefix,
                                                            P=prefix.upper()))
    tgt = load_target("host")
    exe = out / "driver"
    flags = [f for f in tgt.cflags if f not in ("-pedantic", "-Werror")]
    subprocess.run([tgt.cc, *flags, "-I", str(out), str(src), str(out / f"{model}.c"), "-o",
                    str(exe), "-lm"], check=True)
    empty = out / "empty"
    (out / "empty.c").write_text("int main(void) { return 0; }\n")
    subprocess.run([tgt.cc, *flags, str(out / "empty.c"), "-o", str(empty)], check=True)
    return peak_rss_kib(exe, "3"), peak_rss_kib(empty)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--limit", type=int, default=None, help="training examples (default: all)")
    args = ap.parse_args()
    data = load_dataset("mnist")
    x_tr, y_tr = data.x_train, data.y_train
    if args.limit:
        x_tr, y_tr = x_tr[:args.limit], y_tr[:args.limit]
    model = build_zoo_model("mlp")
    graph = load_model(model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for algo in ("standard", "proposed"):
            cfg = make_config(algo, batch=args.batch)
            out = Path(tmp) / algo
            plan = compile_to_c(graph, cfg, load_target("host"), out,
                                command=f"benchmarks/host_mnist.py {algo}").plan
            prog = HostProgram(out, debug=False)
            backend = HostBackend(prog, ref.init_state(graph, cfg).tensors, seed=cfg.seed)
            print(f"== {algo}: arena {plan.arena_nbytes:,} B + state {plan.state_nbytes:,} B",
                  flush=True)
            t0 = time.perf_counter()
            res = fit(backend, x_tr, y_tr, data.x_test, data.y_test, epochs=args.epochs,
                      steps=None, seed=0)
            wall = time.perf_counter() - t0
            rss, rss0 = c_process_rss(out, prog.manifest)
            rows.append((algo, res, plan, rss, rss0, wall))
    print(f"\nMLP / MNIST, emitted C on the host, batch {args.batch}, Adam 1e-3, {args.epochs} "
          f"epoch(s), {len(x_tr)} training examples")
    print("\n| algorithm | test acc per epoch | best | ms/step (median epoch) | planned arena+state "
          "| C trainer peak RSS | empty C program | input batch buffer |")
    print("|---|---|---|---|---|---|---|---|")
    for algo, res, plan, rss, rss0, wall in rows:
        accs = " / ".join(f"{100 * r.test_acc:.2f}" for r in res)
        ms = float(np.median([r.ms_per_step for r in res]))
        print(f"| {algo} | {accs} % | {100 * max(r.test_acc for r in res):.2f} % | {ms:.1f} | "
              f"{plan.total_nbytes / 2**20:.2f} MiB | {rss / 1024:.2f} MiB | {rss0 / 1024:.2f} MiB | "
              f"{args.batch * 784 * 4 / 2**20:.2f} MiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
