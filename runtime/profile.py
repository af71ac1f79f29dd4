"""`bnnc profile OUT`: where a host training step spends its time, kernel by kernel.

Input: a `bnnc compile` output directory of a host-runnable target (its C built for the host with
-DBNNC_PROFILE, which wraps every schedule step of `<prefix>_train_step` in a monotonic-clock
timer on the calling thread's CPU clock: `<prefix>_profile_ns`). Output: a `Profile` -- per
schedule step its kernel, layer, phase
C function, median wall time over the timed steps and, for the products of weight layers, the
multiply-accumulates (`step_macs`), and per kernel the sums.

Method: `warmup` untimed steps, then `steps` timed ones on random batches (pixels scaled like the
datasets, `2p/255 - 1`, uniform labels; time does not depend on the values). Times are the
thread's CPU time (CLOCK_THREAD_CPUTIME_ID), not wall time: on a shared machine the wall clock
also counts the time the thread waits for a core, which swung single kernels by 10x here under
a load average of 14, while CPU time stays within a few percent; the median per step then drops
what remains (cache pollution by a neighbour). The timer costs two clock reads per step (well
under a microsecond), far below the kernels that matter. `step_ms` is the whole call, same clock.
A --threads build (or `wall=True`) is timed on the wall clock instead (CLOCK_MONOTONIC in the C,
-DBNNC_PROFILE_WALL): the thread CPU clock would miss the other threads' share of a kernel.
Limits: a busy machine still slows a kernel through shared caches (and, on the wall clock, by
the time a thread waits for a core).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..compiler.contract import read_manifest
from ..compiler.errors import DataError
from .host import HostProgram


@dataclass(frozen=True)
class StepTime:
    index: int
    kernel: str
    layer: str
    fn: str            # the C kernel function
    ms: float          # median over the timed steps
    macs: int          # multiply-accumulates of a weight layer's product (fwd, dX, dW), else 0


@dataclass(frozen=True)
class Profile:
    model: str
    algorithm: str
    batch: int
    steps: tuple[StepTime, ...]
    step_ms: float     # median of the whole train_step call
    threads: int = 1   # the build's (bnnc compile --threads): > 1 is timed on the wall clock

    def by_kernel(self) -> list[tuple[str, int, float, int]]:
        """(kernel, number of schedule steps, total ms, total MACs), largest time first."""
        acc: dict[str, list] = {}
        for s in self.steps:
            e = acc.setdefault(s.kernel, [0, 0.0, 0])
            e[0] += 1
            e[1] += s.ms
            e[2] += s.macs
        return sorted(((k, n, ms, mac) for k, (n, ms, mac) in acc.items()), key=lambda r: -r[2])


def step_macs(m, kernel: str, layer: str) -> int:
    """Multiply-accumulates of one weight-layer product step (forward, dX or dW of a dense, conv
    or grouped conv layer: every one is numel(out) x fan_in), from the manifest alone; 0 for
    every other kernel (element-wise work, packing, updates)."""
    if not kernel.startswith(("dense_fwd", "dense_dx", "dense_dw", "conv_fwd", "conv_dx",
                              "conv_dw", "gconv_fwd", "gconv_dx", "gconv_dw")):
        return 0
    w = next((st for st in m.state if st.name == f"{layer}.W"), None)
    out = m.tensor_by_name.get(f"{layer}.out")
    if w is None or out is None:
        return 0
    return int(np.prod(out.shape)) * int(w.fan_in)


def profile(out_dir: str | Path, *, steps: int = 10, warmup: int = 2, seed: int = 0,
            extra_cflags: tuple[str, ...] = (), wall: bool = False) -> Profile:
    """Time every schedule step of OUT_DIR's training step on the host (see the module doc)."""
    m = read_manifest(Path(out_dir))
    wall = wall or m.threads > 1
    clock = time.perf_counter if wall else time.thread_time
    if m.target_kind == "baremetal":
        raise DataError(f"{out_dir} was compiled for {m.target}, a bare-metal target",
                        hint="bnnc profile times host builds: compile with --target host "
                             "(or a Linux target)")
    prog = HostProgram(out_dir, debug=False, extra_cflags=("-DBNNC_PROFILE",) + extra_cflags
                       + (("-DBNNC_PROFILE_WALL",) if wall else ()))
    prog.init(seed)
    rng = np.random.default_rng(seed)
    nbat = 4
    xs = [prog.pixel_batch(rng.integers(0, 256, size=m.input_shape, dtype=np.uint8))
          for _ in range(nbat)]
    ys = [rng.integers(0, m.classes, size=m.batch, dtype=np.int32) for _ in range(nbat)]
    n = len(m.steps)
    buf = prog.ffi.new("uint64_t[]", max(n, 1))
    fn = getattr(prog.lib, f"{m.prefix}_profile_ns")
    per = np.zeros((steps, n))
    whole = []
    for i in range(warmup + steps):
        fn(buf, n)
        t0 = clock()
        prog.train_step(xs[i % nbat], ys[i % nbat])
        dt = clock() - t0
        got = fn(buf, n)
        if got != n:
            raise DataError(f"{out_dir}: the program reports {got} timed steps, its manifest "
                            f"lists {n}", hint="recompile OUT with this bnnc")
        if i >= warmup:
            per[i - warmup] = [buf[k] for k in range(n)]
            whole.append(dt)
    prog.close()
    med = np.median(per, axis=0) / 1e6
    rows = tuple(StepTime(s.index, s.kernel, s.layer, s.fn, float(med[k]),
                          step_macs(m, s.kernel, s.layer))
                 for k, s in enumerate(m.steps))
    return Profile(m.model, str(m.config.get("algorithm", "")), m.batch, rows,
                   float(np.median(whole) * 1e3), m.threads)
