"""Before/after of the emitted C: ms per training step of several compiled output directories,
stepped in turn in one process, timed on the thread's CPU clock.

    python benchmarks/ab_step.py OLD_OUT NEW_OUT [MORE_OUT ...] [--steps 20] [--warmup 2]

Input: `bnnc compile` output directories of host builds with the same input shape and batch
(e.g. one compiled by an older checkout of bnnc, one by this one). Output: one line per directory,
min and median ms of thread CPU time per `train_step`, and each median's ratio to the first; then
whether each program's state tensors after the run (every program took the same steps on the same
batches) are byte-identical to the first's, as they must be when only the kernels or the memory
plan changed.

Method: each directory's C is built as a shared library (runtime/host.py) and initialized from
seed 0; every repetition runs one step of each program, rotating who goes first, on the same
batch (random pixels scaled like the datasets, uniform labels; four batches cycled). Thread CPU
time (time.thread_time), not wall time: on a shared machine the wall clock also counts the time
the step waits for a core. Limits: noise from neighbours remains through shared caches; read the
min next to the median.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from bnnc.runtime.host import HostProgram


def step_times(progs: list[HostProgram], steps: int, warmup: int,
               clock=time.thread_time) -> list[list[float]]:
    """ms of each timed training step of each program (stepped in turn, rotating who goes first,
    all from seed 0 on the same four cycled batches), on `clock`."""
    m = progs[0].manifest
    for p in progs:
        p.init(0)
    rng = np.random.default_rng(0)
    us = [rng.integers(0, 256, m.input_shape, dtype=np.uint8) for _ in range(4)]
    ys = [rng.integers(0, m.classes, m.batch).astype(np.int32) for _ in range(4)]
    # each program gets the batch as it takes it: u8 pixels under --input u8, else their floats
    xs = [[p.pixel_batch(u) for u in us] for p in progs]
    times: list[list[float]] = [[] for _ in progs]
    for rep in range(warmup + steps):
        for j in range(len(progs)):
            k = (j + rep) % len(progs)
            t0 = clock()
            progs[k].train_step(xs[k][rep % 4], ys[rep % 4])
            dt = clock() - t0
            if rep >= warmup:
                times[k].append(1000.0 * dt)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", type=Path, help="compiled output directories")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args(argv)
    progs = [HostProgram(d, debug=False) for d in args.dirs]
    m = progs[0].manifest
    if any((p.manifest.input_shape, p.manifest.batch) != (m.input_shape, m.batch) for p in progs):
        ap.error("the directories must share input shape and batch")
    times = step_times(progs, args.steps, args.warmup)
    base = float(np.median(times[0]))
    for d, t in zip(args.dirs, times):
        med = float(np.median(t))
        print(f"{str(d):40s} min {min(t):9.2f} ms  median {med:9.2f} ms  "
              f"first / this {base / med:5.2f}x")
    # the state tensors, not the blob: its header holds the model hash, which covers the memory
    # plan, so two programs whose plans differ (a fusion) differ there with identical values
    ref = progs[0].read_state()
    for d, p in zip(args.dirs[1:], progs[1:]):
        st = p.read_state()
        same = st.keys() == ref.keys() and all(
            st[n].dtype == ref[n].dtype and st[n].tobytes() == ref[n].tobytes() for n in ref)
        print(f"{str(d):40s} final state {'byte-identical to' if same else 'DIFFERS from'} "
              f"{args.dirs[0]}'s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
