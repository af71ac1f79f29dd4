"""`bnnc profile OUT`: where a host training step spends its time, kernel by kernel.

Input: a `bnnc compile` output directory of a host-runnable target (its C built for the host with
-DBNNC_PROFILE, which wraps every schedule step of `<prefix>_train_step` in a monotonic-clock
timer on the calling thread's CPU clock: `<prefix>_profile_ns`). Output: a `Profile` -- per
schedule step its kernel, layer, phase
C function, median wall time over the timed steps, the bytes it reads and writes (`step_nbytes`)
and, for the products of weight layers, the multiply-accumulates (`step_macs`) and their class
(`product_class`: 1-bit, integer or float factors), and per kernel the sums. Against this core's
measured peak rate of each class (runtime/peak.py) a kernel's rate is a fraction of peak, and
`Profile.ms_at_peak` is the time the step's products would take at peak.

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
    cls: str = ""      # the product's class, "bit" / "int" / "float" (`product_class`), else ""
    nbytes: int = 0    # bytes the step reads and writes: its operands' and results' sizes


@dataclass(frozen=True)
class KernelRow:
    """One kernel's sums over the step's schedule steps (`Profile.kernels`)."""
    kernel: str
    steps: int
    ms: float
    macs: int
    macs_by_class: dict[str, int]  # the MACs split by product class (a kernel may do both)
    nbytes: int

    @property
    def cls(self) -> str:
        """The class of most of the kernel's MACs ("" when it has none)."""
        return max(self.macs_by_class, key=self.macs_by_class.get, default="")


@dataclass(frozen=True)
class Profile:
    model: str
    algorithm: str
    batch: int
    steps: tuple[StepTime, ...]
    step_ms: float     # median of the whole train_step call
    threads: int = 1   # the build's (bnnc compile --threads): > 1 is timed on the wall clock

    def kernels(self) -> list[KernelRow]:
        """One row per kernel, largest time first."""
        acc: dict[str, list] = {}
        for s in self.steps:
            e = acc.setdefault(s.kernel, [0, 0.0, 0, {}, 0])
            e[0] += 1
            e[1] += s.ms
            e[2] += s.macs
            if s.macs:
                e[3][s.cls] = e[3].get(s.cls, 0) + s.macs
            e[4] += s.nbytes
        rows = [KernelRow(k, *e) for k, e in acc.items()]
        return sorted(rows, key=lambda r: -r.ms)

    def by_kernel(self) -> list[tuple[str, int, float, int]]:
        """(kernel, number of schedule steps, total ms, total MACs), largest time first."""
        return [(r.kernel, r.steps, r.ms, r.macs) for r in self.kernels()]

    def macs_by_class(self) -> dict[str, int]:
        """The step's multiply-accumulates per product class."""
        out = {"bit": 0, "int": 0, "float": 0}
        for s in self.steps:
            if s.macs:
                out[s.cls] += s.macs
        return out

    def ms_at_peak(self, peaks) -> float:
        """How long the step's products would take at `peaks` (runtime/peak.py), this core's
        measured rate of each product class: the step's fraction of peak is this over the
        kernels' time."""
        return sum(1e3 * n / peaks.mac_per_s[c] for c, n in self.macs_by_class().items())


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


_REAL = ("f32", "f16", "bf16")


def product_class(m, step) -> str:
    """The class of a weight-layer product step's multiply-accumulates, from its operands' types
    in the manifest: "bit" when both factors are 1-bit (XNOR-popcount), "float" when a factor is
    real-valued (f32/f16/bf16 activations or gradients), else "int" (u8 pixels or PO2 codes times
    a sign). A weight read from the state counts as 1 bit: a binary layer's products use its
    sign (the proposed step keeps W in 16 bits and reads the sign on the fly), a dW kernel reads
    it only for the |W| <= 1 mask, and a real layer's other factor is real (its class is float
    either way). int32 operands (the PO2 scale's bias) are not factors."""
    states = {st.name for st in m.state}
    kinds = []
    for name in step.reads:
        t = m.tensor_by_name.get(name)
        if name in states:
            kinds.append("bit")
        elif t is not None and t.dtype != "i32":
            kinds.append(t.dtype)
    if any(k in _REAL for k in kinds):
        return "float"
    return "bit" if kinds and all(k == "bit" for k in kinds) else "int"


def step_nbytes(m, step) -> int:
    """Bytes one schedule step moves: the sizes of what it reads plus what it writes (each
    operand once; a kernel that re-reads a tile from cache moves it only once here)."""
    states = {st.name: st.nbytes for st in m.state}
    total = 0
    for name in (*step.reads, *step.writes):
        t = m.tensor_by_name.get(name)
        total += t.nbytes if t is not None else states.get(name, 0)
    return total


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
    rows = []
    for k, s in enumerate(m.steps):
        macs = step_macs(m, s.kernel, s.layer)
        if macs and not s.reads:
            raise DataError(f"{out_dir}: step {s.index} ({s.kernel}) lists no operands in the "
                            "manifest (a build of an older bnnc)", hint="recompile OUT with this "
                                                                         "bnnc")
        rows.append(StepTime(s.index, s.kernel, s.layer, s.fn, float(med[k]), macs,
                             product_class(m, s) if macs else "", step_nbytes(m, s)))
    rows = tuple(rows)
    return Profile(m.model, str(m.config.get("algorithm", "")), m.batch, rows,
                   float(np.median(whole) * 1e3), m.threads)
