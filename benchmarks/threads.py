"""`bnnc compile --threads N`: steps per second of one thread and of N threads, side by side in one
run, and the per-kernel wall time of both builds (which kernels scale, which do not).

    python benchmarks/threads.py [--models cnv:100] [--algorithms proposed,standard] [--threads 2]
                                 [--steps 8] [--warmup 2] [--profile-steps 3] [--serial-steps 3]

Input: zoo models (name:batch). For each model and algorithm the same compile is made twice,
`--threads 1` and `--threads N` (host target, run-time kernel dispatch: AVX-512/AVX2 where the CPU
has them). Output, per case: median wall ms per training step and steps/s of each build, their
ratio, whether the two final states are byte-identical (they train on the same batches), the
load average before and after (this machine is shared: the N-thread build needs N free cores),
a per-kernel table of both builds' wall time (bnnc profile's timers, -DBNNC_PROFILE_WALL on
the one-thread build) with the ratio per kernel, and the serial fraction: the share of the
one-thread step's kernel time (bnnc profile, thread CPU time, which a busy machine barely moves)
spent in steps the N-thread build runs on one thread (step functions that never call bnnc_par
with more than one unit of work),
those steps by kernel, and Amdahl's bound for N threads, 1 / (f + (1 - f) / N).

Method: both builds are loaded in one process (runtime/host.py) and initialized from seed 0;
every repetition runs one step of each, alternating which goes first, on the same batch (random
pixels scaled like the datasets, uniform labels; four batches cycled). Wall time
(time.perf_counter), since the other threads' work is what is measured; a neighbour taking a
core slows the N-thread step, so read the load average next to the ratio.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bnnc.compiler.config import make_config
from bnnc.compiler.contract import read_manifest
from bnnc.compiler.pipeline import compile_to_c
from bnnc.compiler.target import load_target
from bnnc.compiler.zoo import build_zoo_model
from bnnc.compiler.frontend import load_model
from bnnc.runtime.host import HostProgram
from bnnc.runtime.profile import profile

from ab_step import step_times     # benchmarks/ (this script's directory) is on sys.path


def _load() -> str:
    return "/".join(f"{v:.1f}" for v in os.getloadavg())


def step_rates(dirs: list[Path], steps: int, warmup: int) -> tuple[list[list[float]], list[bytes]]:
    """Wall ms of each training step of each build (stepped in turn) and their final states."""
    progs = [HostProgram(d, debug=False) for d in dirs]
    times = step_times(progs, steps, warmup, clock=time.perf_counter)
    states = [p.get_state() for p in progs]
    for p in progs:
        p.close()
    return times, states


def split_steps(out_dir: Path) -> set[int]:
    """Indexes of the schedule steps whose step function in this build's C runs a split: calls
    bnnc_par(part, extent, unit) with more than one unit (a split of one unit, e.g. a binary dW
    whose ranges must be whole 64-bit words, runs on one thread)."""
    src = (out_dir / read_manifest(out_dir).source).read_text()
    fns = re.finditer(r"^static void step_(\d+)_\w+\((?:void|float \*accuracy, float \*loss)\)\n"
                      r"\{\n(.*?)^\}", src, re.S | re.M)

    def parallel(body: str) -> bool:
        for call in re.finditer(r"bnnc_par\(\w+, ([^,]+), ([^)]+)\)", body):
            extent, unit = call.group(1).strip(), call.group(2).strip()
            if not (extent.isdigit() and unit.isdigit()) or int(extent) > int(unit):
                return True
        return False
    return {int(m.group(1)) for m in fns if parallel(m.group(2))}


def serial_fraction(one: Path, many: Path, n: int, steps: int) -> None:
    """Print the serial fraction of the one-thread step (module docstring)."""
    prof = profile(one, steps=steps, warmup=1)
    split = split_steps(many)
    total = sum(st.ms for st in prof.steps)
    serial: dict[str, float] = {}
    for st in prof.steps:
        if st.index not in split:
            serial[st.kernel] = serial.get(st.kernel, 0.0) + st.ms
    f = sum(serial.values()) / total
    print(f"  serial fraction (1-thread kernel time, thread CPU, median of {steps}): "
          f"{sum(serial.values()):.2f} of {total:.2f} ms = {100 * f:.1f} % -> Amdahl bound for "
          f"{n} threads {1 / (f + (1 - f) / n):.2f}x")
    for k, ms in sorted(serial.items(), key=lambda kv: -kv[1]):
        print(f"    not split: {k:26s} {ms:8.2f} ms  {100 * ms / total:5.1f} %")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="cnv:100")
    ap.add_argument("--algorithms", default="proposed,standard")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--profile-steps", type=int, default=3,
                    help="timed steps of the per-kernel table (0: no table)")
    ap.add_argument("--serial-steps", type=int, default=3,
                    help="timed steps of the serial fraction's profile (0: none)")
    args = ap.parse_args(argv)
    n = args.threads
    print(f"CPU cores online: {os.cpu_count()}; load average (1/5/15 min) at start: {_load()}")
    with tempfile.TemporaryDirectory(prefix="bnnc-threads-") as tmp:
        for spec in args.models.split(","):
            name, batch = spec.split(":")
            graph = load_model(build_zoo_model(name))
            for alg in args.algorithms.split(","):
                cfg = make_config(alg, batch=int(batch))
                dirs = []
                for t in (1, n):
                    d = Path(tmp) / f"{name}-{alg}-{t}"
                    compile_to_c(graph, cfg, load_target("host"), d, threads=t,
                                 command="benchmarks/threads.py")
                    dirs.append(d)
                before = _load()
                times, states = step_rates(dirs, args.steps, args.warmup)
                after = _load()
                med = [float(np.median(t)) for t in times]
                print(f"\n{name} B={batch} {alg}: 1 thread {med[0]:.1f} ms/step "
                      f"({1000 / med[0]:.2f} steps/s) | {n} threads {med[1]:.1f} ms/step "
                      f"({1000 / med[1]:.2f} steps/s) | {n} threads / 1 thread "
                      f"{med[0] / med[1]:.2f}x | final states byte-identical: "
                      f"{'yes' if states[0] == states[1] else 'NO'} | load {before} -> {after}")
                if args.serial_steps:
                    serial_fraction(dirs[0], dirs[1], n, args.serial_steps)
                if args.profile_steps:
                    profs = [profile(d, steps=args.profile_steps, warmup=1, wall=True)
                             for d in dirs]
                    rows = {k: [ms] for k, _, ms, _ in profs[0].by_kernel()}
                    for k, _, ms, _ in profs[1].by_kernel():
                        rows.setdefault(k, [0.0]).append(ms)
                    print(f"  {'kernel':28s} {'1 thread ms':>12s} {f'{n} threads ms':>14s} "
                          f"{'ratio':>6s}")
                    for k, v in sorted(rows.items(), key=lambda kv: -kv[1][0]):
                        one, many = v[0], v[1] if len(v) > 1 else 0.0
                        ratio = f"{one / many:5.2f}x" if many > 0 else "  -"
                        print(f"  {k:28s} {one:12.2f} {many:14.2f} {ratio:>6s}")
    print(f"\nload average at the end: {_load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
