"""The benchmark suite: bnnc's emitted C against PyTorch, every row measured in one run, one table.

    python benchmarks/bench.py                  # full run -> benchmarks/results/latest.{md,json}
    python benchmarks/bench.py --quick          # smoke test, small models -> results/quick.*
    python benchmarks/bench.py --only host,rss --models mlp:100   # -> results/partial.{md,json}

Input: zoo models as cases `NAME:BATCH` (`NAME@WIDTH:BATCH` for a width-scaled variant, a trailing
`?` makes a case optional: measured only if one step takes < --probe-limit seconds). Output: one
Markdown table on stdout (progress goes to stderr), written with the machine it ran on as
`<stem>.md` and `<stem>.json`; the Markdown is rendered from the JSON document alone, so the two
always carry the same rows and numbers.

Parts (`--only`, comma separated; default all five):
- host: milliseconds of thread CPU time per training step (median of --steps steps after --warmup
  warm-up steps; the wall-clock medians are in the detail) of the
  emitted C, standard and proposed, built with the host target's flags and driven in-process through
  runtime/host.py `HostProgram` (cffi), and of the same network trained by PyTorch on one thread
  (the standard BNN: sign with straight-through gradient, L2 batch norm, Adam, float32), with the
  ratio PyTorch / bnnc per bnnc row. Default cases mlp:100, mlp:200, cnv:100 and binarynet:40?
  (the paper's Raspberry Pi setting; skipped with the probe's time when a step is too slow).
  The proposed row's detail also gives bnnc proposed / bnnc standard and its input: the proposed
  step keeps the batch as 8-bit pixels (`--input u8`) where the model allows it (an MLP, whose
  first binary dense layer then multiplies them exactly in int32: the data is 8-bit), else f32;
  the standard step and PyTorch take the same pixels as float32.
- kernels: where bnnc's step spends its time: per case and algorithm one row per kernel, its
  median ms per step in the -DBNNC_PROFILE host build (runtime/profile.py, the same table as
  `bnnc profile OUT`), its share, the bytes it reads and writes, and for the weight-layer
  products (dense/conv forward, dX, dW) the multiply-accumulates, their class (bit / int / float)
  and the rate in GMAC/s as a fraction of this core's measured peak for that class
  (runtime/peak.py); then per case one row: the step's MACs per class, its bytes moved, and the
  time its products would take at peak as a percentage of the time they took.
- rss: peak resident set size of the standalone host trainer (runtime/programs.py `build_trainer`,
  OUT/trainer.c) training --rss-steps steps from a packed dataset (runtime/packed.py), against a
  Python process doing the same steps with PyTorch on the same file (and, in the detail, a Python
  process that only imports numpy and torch), plus bnnc's planned bytes (arena + state, from the
  manifest). Peaks are the children's ru_maxrss as GNU time reports it (see `run_rss`).
- qemu: instructions per training step of the rpi4 trainer (NEON kernels) under `qemu-aarch64
  -cpu cortex-a72`, counted by benchmarks/insns_a72.py `insns_per_step` (runtime/insncount.py,
  bnnc's TCG plugin; one method for both tables), started from the model's own initial state:
  (count of --insn-steps steps - count of 0 steps) / --insn-steps, which cancels start-up; a step
  includes reading its batch from the packed file. Counts are exact and repeatable, so one step is
  the default.
- m7, m33, m55: the same for TFC B=100 on Cortex-M7 (qemu-system-arm mps2-an500), Cortex-M33
  (mps2-an505) and Cortex-M55 (mps3-an547) through runtime/baremetal.py `count_step_instructions`.
  Neither algorithm's plan fits a part's SRAM at B=100, so the RAM budget is the board's (the
  count does not depend on it); the detail says so.
A missing toolchain turns its rows into "not measured: <what to install>"; a part that fails
becomes a "failed" row and exit status 1, and everything measured before it is still written.

Method, and why:
- OMP/OPENBLAS/MKL_NUM_THREADS=1 are set before numpy or torch is imported (their thread pools size
  themselves at import) and torch.set_num_threads(1) before every torch measurement: the issue
  compares single-threaded code on a 2-core machine shared with other work.
- CPU time, not wall time: each step is timed with the calling thread's CPU clock
  (time.thread_time; PyTorch on one thread computes in the calling thread, so both sides are
  measured alike). On this shared 2-core machine the wall clock also counts the time the step
  waits for a core, which made wall-clock medians swing 3-5x between runs at a load average of
  10-17; thread CPU time stayed within a few percent. Wall medians stay in the detail column.
- Interleaving: each repetition runs one step of every contender (C standard, C proposed, PyTorch),
  rotating who goes first, so a burst of load from another process hits all of them alike; the
  median of the timed repetitions is the number. The garbage collector is off while timing.
- The PyTorch network is built from the same bnnc graph (compiler/ir.py) with the same initial
  parameters, so shapes match exactly; it is tests/torch_oracle.py's `TorchNet` in float32: binary
  layers use sign(W) (sign(0) = +1) with the STE mask 1[|W| <= 1], activations sign with
  1[|x| <= 1], `F.batch_norm` in training mode (each model's eps; momentum 0.1, which is bnnc's 0.9
  in Keras' convention), cross-entropy on the logits and `torch.optim.Adam` with bnnc's lr, betas
  and eps, all with PyTorch's defaults otherwise. The
  first step of C-standard and PyTorch sees the same batch from the same parameters; both losses go
  into the table: equal losses show that the two train the same network.
- Inputs are random pixels scaled like the datasets (`2p/255 - 1`, so they pack as u8) and random
  labels; step time does not depend on the values. Host steps cycle through 8 batches.
- The result file stem is `latest` only for a full run (no --quick, --only or --models); others
  write `quick` or `partial` so a smoke test never replaces the tracked table (`--output` chooses).

Limits: timings come from a shared machine, so read the inter-quartile ranges in the detail column
before trusting a small difference; no number is asserted anywhere (tests/test_bench.py checks the
structure only). PyTorch has no instruction-count rows (it does not run under qemu-user here).
"""

from __future__ import annotations

import os

if __name__ == "__main__":
    # before numpy and torch are imported: both size their thread pools at import time
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = "1"

import argparse
import gc
import importlib.util
import json
import pickle
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from bnnc import __version__
from bnnc.compiler.config import TrainConfig, make_config
from bnnc.compiler.errors import BnncError, ConfigError, TargetError
from bnnc.compiler.ir import Graph, LayerKind
from bnnc.runtime import packed

# The compiler, cffi loader and program builders (onnx, jinja2, cffi) are imported inside the
# functions that use them: the PyTorch child process imports this file, and its peak RSS should be
# PyTorch's, not bnnc's.

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
MIB = float(1 << 20)
TIME = "/usr/bin/time"
ALGORITHMS = ("standard", "proposed")
PARTS = ("host", "kernels", "rss", "qemu", "m7", "m33", "m55")
DEFAULT_CASES = "mlp:100,mlp:200,cnv:100,binarynet:40?"
QUICK_CASES = "tfc:100,cnv@0.125:10"
COLUMNS = ("metric", "model", "batch", "algorithm", "bnnc", "PyTorch (standard)",
           "PyTorch / bnnc", "detail")
STEP_MS = "step time (ms)"
PEAK_RSS = "peak RSS (MiB)"
PLANNED = "planned arena+state (MiB)"
INSNS_A72 = "instructions/step, Cortex-A72 (QEMU)"
INSNS_M7 = "instructions/step, Cortex-M7 (QEMU)"
INSNS_M33 = "instructions/step, Cortex-M33 (QEMU)"
INSNS_M55 = "instructions/step, Cortex-M55 (QEMU)"
# part -> (target, metric): the bare-metal instruction counts
MCU_PARTS = {"m7": ("cortex-m7", INSNS_M7), "m33": ("cortex-m33", INSNS_M33),
             "m55": ("cortex-m55", INSNS_M55)}
KERNEL_MS = "kernel time (ms/step)"
PRODUCTS_PEAK = "products: % of this core's peak"


def _load_module(path: Path, name: str):
    """A .py file as a module (benchmarks/ and tests/ are not packages)."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod        # dataclasses look their module up while decorating
    spec.loader.exec_module(mod)
    return mod


# the PyTorch contender is the oracle's network (tests/torch_oracle.py imports torch and bnnc's IR
# and config only, never bnnc's numpy math), so the benchmark times what the oracle tests check
torch_net = _load_module(REPO / "tests" / "torch_oracle.py", "bnnc_bench_torch_oracle")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- cases ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    model: str              # zoo name
    batch: int
    width: float = 1.0
    optional: bool = False  # measured only if one step takes < the probe limit

    @property
    def label(self) -> str:
        return self.model if self.width == 1.0 else f"{self.model}@{self.width:g}"

    @property
    def key(self) -> str:
        return f"{self.label}-b{self.batch}"


_CASE = re.compile(r"^([a-z][a-z0-9]*)(?:@([0-9.]+))?:([0-9]+)(\?)?$")


def parse_cases(text: str) -> list[Case]:
    """`mlp:100,cnv@0.125:20,binarynet:40?` -> cases; ConfigError naming the bad item."""
    from bnnc.compiler.zoo import ZOO

    cases = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        m = _CASE.match(item)
        if m is None:
            raise ConfigError(f"--models item {item!r} is not NAME[@WIDTH]:BATCH[?]",
                              hint="e.g. --models mlp:100,cnv@0.25:32,binarynet:40?")
        name, width, batch, opt = m.groups()
        if name not in ZOO:
            raise ConfigError(f"--models item {item!r}: no zoo model {name!r}",
                              hint=f"choose from {', '.join(ZOO)}")
        if int(batch) < 2 or (width is not None and not 0 < float(width) <= 1):
            raise ConfigError(f"--models item {item!r}: batch must be >= 2 and width in (0, 1]")
        cases.append(Case(name, int(batch), float(width) if width else 1.0, bool(opt)))
    if not cases:
        raise ConfigError("--models names no case")
    return cases


class Workspace:
    """Graphs and compiled output directories of one run, each made once."""

    def __init__(self, root: Path):
        self.root = root
        self._graphs: dict[tuple[str, float], Graph] = {}
        self._outs: dict[tuple[str, str, str], Path] = {}

    def graph(self, case: Case) -> Graph:
        from bnnc.compiler.frontend import load_model
        from bnnc.compiler.zoo import build_zoo_model

        k = (case.model, case.width)
        if k not in self._graphs:
            self._graphs[k] = load_model(build_zoo_model(case.model, width=case.width))
        return self._graphs[k]

    def config(self, case: Case, algorithm: str) -> TrainConfig:
        """The case's TrainConfig; the proposed step keeps its batch as 8-bit pixels (`--input
        u8`: the data is 8-bit, and its first binary dense layer multiplies them exactly in int32)
        where the model allows it (an MLP: one binary dense layer reads the input), else f32."""
        from bnnc.compiler.config import with_input
        from bnnc.compiler.preprocess import DEFAULT, pixel_affine

        cfg = make_config(algorithm, batch=case.batch, seed=0)
        if algorithm != "proposed":
            return cfg
        graph = self.graph(case)
        try:
            return with_input(cfg, graph, "u8", pixel_affine(DEFAULT, graph.input_shape[0]))
        except ConfigError:
            return cfg

    def compiled(self, case: Case, algorithm: str, target: str | Any = "host") -> Path:
        """`bnnc compile` of the case for a target (a name or a Target): the C, the manifest and
        the run inputs (model.onnx, init_state.npz) that the runners read."""
        from bnnc.compiler.target import load_target
        from bnnc.compiler.pipeline import compile_to_c
        from bnnc.runtime.model_source import model_bytes
        from bnnc.runtime.outdir import write_run_inputs

        tgt = load_target(target) if isinstance(target, str) else target
        k = (case.key, algorithm, tgt.name)
        if k not in self._outs:
            out = self.root / f"{case.key}-{algorithm}-{tgt.name}"
            cfg = self.config(case, algorithm)
            compile_to_c(self.graph(case), cfg, tgt, out,
                         command=f"benchmarks/bench.py {case.label}:{case.batch} {algorithm}")
            write_run_inputs(out, self.graph(case), cfg, model_bytes(case.model, width=case.width))
            self._outs[k] = out
        return self._outs[k]


def random_pixels(graph: Graph, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n examples of random 8-bit pixels and random labels."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (n,) + graph.input_shape, dtype=np.uint8)
    return pixels, rng.integers(0, graph.num_classes, n).astype(np.int32)


def random_data(graph: Graph, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n examples of random pixels scaled like the datasets, and random labels."""
    from bnnc.runtime.datasets import scale_pixels

    pixels, labels = random_pixels(graph, n, seed)
    return scale_pixels(pixels), labels


# ---- the PyTorch network -------------------------------------------------------------------------

class TorchBNN(torch_net.TorchNet):
    """The standard BNN of `graph` in PyTorch, float32, trained by `step(x, y)` -> loss: the torch
    network of tests/torch_oracle.py (`TorchNet`), which the oracle tests train in float64.

    Every layer kind of the zoo models; INPUT_QUANT is a ConfigError."""

    def __init__(self, graph: Graph, cfg: TrainConfig):
        for lay in graph.layers:
            if lay.kind is LayerKind.INPUT_QUANT:
                raise ConfigError(f"model {graph.name!r}: layer {lay.name} (input_quant) has no "
                                  "PyTorch counterpart in the benchmark; use a zoo model")
        super().__init__(graph, cfg, dtype=torch.float32)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.forward(x)[1], y)
        loss.backward()
        self.opt.step()
        return float(loss.detach())


# ---- child processes and peak RSS ----------------------------------------------------------------

def run_rss(argv: list[str], *, timeout: float, env: dict | None = None) -> tuple[int, str]:
    """Run argv as a child; (its peak RSS in bytes, its stdout). Raises RuntimeError when it fails:
    a benchmark child that fails is a bnnc bug, not a user error.

    The peak comes from GNU time (`%M`, the child's ru_maxrss), not from this process's own wait4:
    Python starts children with vfork, and Linux charges the parent's resident pages (PyTorch's
    hundreds of MiB) to the child's peak when it execs."""
    if not Path(TIME).is_file():
        raise TargetError(f"{TIME} is missing; the peak-RSS rows need GNU time",
                          hint="apt-get install --no-install-recommends time")
    with tempfile.TemporaryDirectory(prefix="bnnc-rss-") as tmp:
        out, err, peak = (Path(tmp) / n for n in ("out", "err", "peak"))
        cmd = [TIME, "-f", "%M", "-o", str(peak), *argv]
        with open(out, "w") as fo, open(err, "w") as fe:
            # own session: a timeout kills the measured program too, not only GNU time
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fo, stderr=fe, env=env,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise RuntimeError(f"{shlex.join(argv)} did not finish in {timeout:.0f} s")
        text = out.read_text()
        if rc != 0:
            raise RuntimeError(f"{shlex.join(argv)} failed (exit {rc}): "
                               f"{(text + err.read_text()).strip()[-2000:]}")
        kib = int(peak.read_text().split()[-1])
    return kib * 1024, text


def torch_child(graph_pickle: str, data_path: str, steps: int) -> int:
    """The PyTorch process of the rss part: train `steps` batches of the packed file."""
    torch.set_num_threads(1)
    with open(graph_pickle, "rb") as f:
        graph, cfg = pickle.load(f)
    data = packed.read(data_path)
    net = TorchBNN(graph, cfg)
    b = cfg.batch
    loss = 0.0
    for i in range(steps):
        x = torch.from_numpy(data.x[i * b:(i + 1) * b].reshape((b,) + graph.input_shape))
        loss = net.step(x, torch.from_numpy(data.y[i * b:(i + 1) * b]))
    print(json.dumps({"loss": loss}))
    return 0


# ---- parts ---------------------------------------------------------------------------------------

@dataclass
class Row:
    metric: str
    model: str
    batch: int
    algorithm: str
    bnnc: float | None
    pytorch: float | None = None
    detail: str = ""

    @property
    def ratio(self) -> float | None:
        if self.bnnc is None or self.pytorch is None or self.bnnc <= 0:
            return None
        return self.pytorch / self.bnnc

    def as_json(self) -> dict[str, Any]:
        return {"metric": self.metric, "model": self.model, "batch": self.batch,
                "algorithm": self.algorithm, "bnnc": self.bnnc, "pytorch": self.pytorch,
                "ratio": self.ratio, "detail": self.detail}


def _quartiles(xs: list[float]) -> str:
    return "-".join(f"{q:,.0f}" if q >= 1000 else f"{q:.3g}" for q in np.percentile(xs, [25, 75]))


def probe_step_seconds(ws: Workspace, case: Case, algorithm: str, limit: float) -> float | None:
    """Seconds of one step of the standalone host trainer, or None if it runs past the limit."""
    from bnnc.runtime.programs import build_trainer

    out = ws.compiled(case, algorithm)
    exe = build_trainer(out)
    data = ws.root / f"{case.key}-probe.bnnd"
    if not data.exists():
        packed.pack(data, *random_data(ws.graph(case), case.batch, 1), ws.graph(case).num_classes)
    try:
        res = subprocess.run([str(exe), "--train", str(data), "--steps", "1"], capture_output=True,
                             text=True, timeout=limit + 10.0, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return None
    if res.returncode != 0:
        raise RuntimeError(f"probe of {case.label} {algorithm} failed: {res.stdout}{res.stderr}")
    ms = [json.loads(ln)["ms_per_step"] for ln in res.stdout.splitlines()
          if ln.startswith("{") and '"epoch"' in ln]
    assert ms, res.stdout
    return ms[-1] / 1000.0


def probe_optional(ws: Workspace, cases: list[Case], limit: float) -> dict[str, str]:
    """Case key -> why it is skipped, for each optional case whose step is too slow."""
    skipped = {}
    for case in cases:
        if not case.optional:
            continue
        slow = []
        for a in ALGORITHMS:
            secs = probe_step_seconds(ws, case, a, limit)
            if secs is None:
                slow.append(f"{a} > {limit + 10:.0f} s (stopped)")
            elif secs > limit:
                slow.append(f"{a} {secs:.1f} s")
        if slow:
            skipped[case.key] = (f"skipped: one step of the C takes {', '.join(slow)} (probe "
                                 f"with the standalone trainer), over the {limit:g} s limit")
            log(f"{case.label}:{case.batch}: {skipped[case.key]}")
    return skipped


def part_host(ws: Workspace, cases: list[Case], args) -> Iterator[Row]:
    torch.set_num_threads(1)
    for case in cases:
        yield from host_case(ws, case, args)


def host_case(ws: Workspace, case: Case, args) -> list[Row]:
    """Both C programs and the PyTorch network of one case, stepped in turn (module docstring)."""
    from bnnc.runtime import reference as ref
    from bnnc.runtime.host import HostProgram

    graph = ws.graph(case)
    progs = {}
    for a in ALGORITHMS:
        hp = HostProgram(ws.compiled(case, a), debug=False)
        cfg = ws.config(case, a)
        hp.load_state(ref.init_state(graph, cfg).tensors, step=0, seed=cfg.seed)
        progs[a] = hp
    net = TorchBNN(graph, ws.config(case, "standard"))
    from bnnc.runtime.datasets import scale_pixels

    us, ys = random_pixels(graph, 8 * case.batch, 0)
    us = us.reshape((8, case.batch) + graph.input_shape)
    xs = scale_pixels(us)
    ys = ys.reshape(8, case.batch)
    txs, tys = torch.from_numpy(xs), torch.from_numpy(ys.astype(np.int64))
    first_loss: dict[str, float] = {}
    # a --input u8 program takes the pixels themselves (the same values as xs)
    inputs = {a: us if ws.config(case, a).input == "u8" else xs for a in ALGORITHMS}

    def c_step(a: str) -> Callable[[int], float]:
        return lambda i: progs[a].train_step(inputs[a][i % 8], ys[i % 8])[0]

    contenders: dict[str, Callable[[int], float]] = {a: c_step(a) for a in ALGORITHMS}
    contenders["torch"] = lambda i: net.step(txs[i % 8], tys[i % 8])
    names = list(contenders)
    times: dict[str, list[float]] = {k: [] for k in names}
    walls: dict[str, list[float]] = {k: [] for k in names}
    reps = args.warmup + args.steps
    gc.collect()
    gc.disable()
    try:
        for rep in range(reps):
            for j in range(len(names)):
                who = names[(rep + j) % len(names)]
                w0, t0 = time.perf_counter(), time.thread_time()
                loss = contenders[who](rep)
                dt, dw = time.thread_time() - t0, time.perf_counter() - w0
                if rep == 0:
                    first_loss[who] = loss
                if rep >= args.warmup:
                    times[who].append(1000.0 * dt)
                    walls[who].append(1000.0 * dw)
    finally:
        gc.enable()
        for hp in progs.values():
            hp.unload()
    med = {k: float(np.median(v)) for k, v in times.items()}
    log(f"host {case.label}:{case.batch}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in med.items()))
    rows = []
    for a in ALGORITHMS:
        detail = (f"IQR C {_quartiles(times[a])}, PyTorch {_quartiles(times['torch'])}; wall "
                  f"median C {np.median(walls[a]):.3g}, PyTorch {np.median(walls['torch']):.3g}")
        if a == "standard":
            detail += (f"; first-step loss C {first_loss['standard']:.5f}, PyTorch "
                       f"{first_loss['torch']:.5f}")
        else:
            detail += (f"; proposed / standard {med['proposed'] / med['standard']:.2f}; input "
                       f"{ws.config(case, a).input}")
        rows.append(Row(STEP_MS, case.label, case.batch, a, med[a], med["torch"], detail))
    return rows


def part_kernels(ws: Workspace, cases: list[Case], args) -> Iterator[Row]:
    """Per case and algorithm, one row per kernel (largest first): its median ms per training step
    over --steps steps of the -DBNNC_PROFILE host build (runtime/profile.py, `bnnc profile`), its
    share of the kernels' sum and, for weight-layer products, MACs and the MAC rate."""
    from bnnc.runtime.peak import measure_peaks
    from bnnc.runtime.profile import profile

    peaks = measure_peaks()
    log(peaks.describe())
    for case in cases:
        for a in ALGORITHMS:
            prof = profile(ws.compiled(case, a), steps=args.steps, warmup=args.warmup)
            total = sum(s.ms for s in prof.steps)
            log(f"kernels {case.label}:{case.batch} {a}: {total:.2f} ms in kernels")
            for r in prof.kernels():
                detail = (f"{r.kernel}: {r.steps} step(s), {100 * r.ms / total:.1f} % of "
                          f"{total:.2f} ms, {r.nbytes / 1e6:.2f} MB moved")
                if r.macs:
                    at_peak = sum(1e3 * n / peaks.mac_per_s[c]
                                  for c, n in r.macs_by_class.items())
                    detail += (f", {r.macs / 1e6:.1f} MMAC ({r.cls}), "
                               f"{r.macs / r.ms / 1e6:.1f} GMAC/s, "
                               f"{100 * at_peak / r.ms:.1f} % of peak")
                yield Row(KERNEL_MS, case.label, case.batch, a, r.ms, detail=detail)
            by = prof.macs_by_class()
            prod_ms = sum(s.ms for s in prof.steps if s.macs)
            yield Row(PRODUCTS_PEAK, case.label, case.batch, a,
                      100 * prof.ms_at_peak(peaks) / prod_ms if prod_ms > 0 else None,
                      detail=(f"MACs: {by['bit'] / 1e6:.1f} M bit, {by['int'] / 1e6:.1f} M int, "
                              f"{by['float'] / 1e6:.1f} M float; products {prod_ms:.2f} ms, at "
                              f"peak {prof.ms_at_peak(peaks):.2f} ms; "
                              f"{sum(s.nbytes for s in prof.steps) / 1e6:.1f} MB read and "
                              f"written by the step; {peaks.describe()}"))


def part_rss(ws: Workspace, cases: list[Case], args) -> Iterator[Row]:
    from bnnc.compiler.contract import read_manifest
    from bnnc.runtime.programs import build_trainer

    torch_env = {**os.environ, **{v: "1" for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                    "MKL_NUM_THREADS")}}
    base, _ = run_rss([sys.executable, "-c", "import numpy, torch"], timeout=300, env=torch_env)
    for case in cases:
        graph = ws.graph(case)
        data = ws.root / f"{case.key}-rss.bnnd"
        packed.pack(data, *random_data(graph, case.batch * args.rss_steps, 2), graph.num_classes)
        gpath = ws.root / f"{case.key}.pkl"
        gpath.write_bytes(pickle.dumps((graph, ws.config(case, "standard"))))
        t_rss, _ = run_rss([sys.executable, str(Path(__file__).resolve()), "--torch-child",
                            str(gpath), str(data), str(args.rss_steps)], timeout=3600,
                           env=torch_env)
        for a in ALGORITHMS:
            out = ws.compiled(case, a)
            m = read_manifest(out)
            exe = build_trainer(out)
            c_rss, _ = run_rss([str(exe), "--train", str(data), "--steps", str(args.rss_steps)],
                               timeout=36000)
            planned = m.arena_nbytes + m.state_nbytes
            log(f"rss {case.label}:{case.batch} {a}: C {c_rss / MIB:.2f} MiB, PyTorch "
                f"{t_rss / MIB:.2f} MiB, planned {planned / MIB:.2f} MiB")
            yield Row(PEAK_RSS, case.label, case.batch, a, c_rss / MIB, t_rss / MIB,
                      f"{args.rss_steps} steps from a packed file; python + import torch alone "
                      f"{base / MIB:.1f} MiB")
            yield Row(PLANNED, case.label, case.batch, a, planned / MIB, None,
                      f"arena {m.arena_nbytes:,} B + state {m.state_nbytes:,} B")


def _sibling(name: str):
    """benchmarks/<name>.py as a module."""
    return _load_module(Path(__file__).resolve().with_name(f"{name}.py"), f"bnnc_bench_{name}")


def _count_a72(ws: Workspace, case: Case, algorithm: str, steps: int) -> tuple[int, str]:
    """Instructions per step of the rpi4 trainer under qemu-aarch64 -cpu cortex-a72, counted by
    benchmarks/insns_a72.py (the NEON work's measurement), so the two tables count alike."""
    from bnnc.compiler.target import load_target
    from bnnc.runtime import reference as ref
    from bnnc.runtime.state_blob import state_values_f32
    from bnnc.compiler.contract import read_manifest

    tgt = load_target("rpi4")
    out = ws.compiled(case, algorithm, tgt)
    graph = ws.graph(case)
    data = ws.root / f"{case.key}-qemu.bnnd"
    if not data.exists():
        packed.pack(data, *random_data(graph, case.batch, 3), graph.num_classes)
    init = out / "bench_init.f32"
    init.write_bytes(state_values_f32(read_manifest(out),
                                      ref.init_state(graph, ws.config(case, algorithm)).tensors))
    n = _sibling("insns_a72").insns_per_step(out, tgt, data, init, steps)
    return n, " ".join(tgt.emulator)


def _how(n: int) -> str:
    return f"(count of {n} step{'s' if n != 1 else ''} - count of 0) / {n}"


def part_qemu(ws: Workspace, cases: list[Case], args) -> Iterator[Row]:
    from bnnc.compiler.target import load_target
    from bnnc.runtime.insncount import build_plugin
    from bnnc.runtime.programs import emulator_argv

    tgt = load_target("rpi4")
    try:    # a missing toolchain is a row that says so; a failing build or run is a bug: raise
        tgt.require()
        emulator_argv(tgt)
        build_plugin()
    except TargetError as err:
        why = f"not measured: {err}" + (f" ({err.hint})" if err.hint else "")
        yield from (Row(INSNS_A72, c.label, c.batch, a, None, detail=why)
                    for c in cases for a in ALGORITHMS)
        return
    for case in cases:
        for a in ALGORITHMS:
            n, emu = _count_a72(ws, case, a, args.insn_steps)
            log(f"qemu {case.label}:{case.batch} {a}: {n:,} instructions/step")
            yield Row(INSNS_A72, case.label, case.batch, a, float(n),
                      detail=f"`{emu}`, NEON build; includes reading the batch from the file")


def part_mcu(ws: Workspace, args, part: str) -> Iterator[Row]:
    """TFC on a bare-metal target (MCU_PARTS: Cortex-M7, M33, M55 under QEMU system mode)
    through runtime/baremetal.py."""
    import dataclasses

    from bnnc.compiler import baremetal as bm
    from bnnc.compiler.target import load_target
    from bnnc.compiler.contract import read_manifest
    from bnnc.runtime import baremetal

    name, metric = MCU_PARTS[part]
    case = Case("tfc", 100)
    tgt = load_target(name)
    try:
        tgt.require(tgt.cc, *tgt.emulator[:1])
    except TargetError as err:
        why = f"not measured: {err}" + (f" ({err.hint})" if err.hint else "")
        yield from (Row(metric, case.label, case.batch, a, None, detail=why)
                    for a in ALGORITHMS)
        return
    # B = 100 as on the other rows; neither plan fits the part's RAM budget, so the budget becomes
    # the emulated board's RAM (the instruction count does not depend on it)
    board = bm.board(tgt)
    tgt = dataclasses.replace(tgt, ram=board.ram_nbytes)
    graph = ws.graph(case)
    data = ws.root / f"{case.key}-{part}.bnnd"
    packed.pack(data, *random_data(graph, case.batch, 3), graph.num_classes)
    machine = tgt.emulator[tgt.emulator.index("-M") + 1]
    for a in ALGORITHMS:
        out = ws.compiled(case, a, tgt)
        blob = baremetal.start_state_blob(out)
        n = baremetal.count_step_instructions(out, tgt, train=data, steps=args.insn_steps,
                                              start_blob=blob, timeout=36000).per_step
        m = read_manifest(out)
        planned = m.arena_nbytes + m.state_nbytes
        log(f"{part} {case.label}:{case.batch} {a}: {n:,.0f} instructions/step")
        yield Row(metric, case.label, case.batch, a, float(n),
                  detail=f"`qemu-system-arm -M {machine}`; includes reading the batch "
                         f"(semihosting); plan {planned / MIB:.2f} MiB > "
                         f"{load_target(name).ram // 1024} KiB of SRAM, so the RAM budget "
                         f"is the board's {tgt.ram // 1024} KiB")


# ---- machine facts and rendering -----------------------------------------------------------------

def _first_line(argv: list[str]) -> str | None:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (res.stdout or res.stderr).strip().splitlines()
    return lines[0].strip() if res.returncode == 0 and lines else None


def machine_facts() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    mem = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    except OSError:
        pass
    commit = _first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    if commit:
        status = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"],
                                capture_output=True, text=True).stdout
        commit += "+uncommitted" if status.strip() else ""
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_bytes": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "torch_threads": 1,
        "cc": _first_line(["cc", "--version"]),
        "aarch64_gcc": _first_line(["aarch64-linux-gnu-gcc", "--version"]),
        "qemu": _first_line(["qemu-aarch64", "--version"]),
        "bnnc": __version__,
        "commit": commit,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


def fmt_value(metric: str, v: float | None) -> str:
    if v is None:
        return "–"
    if metric in (INSNS_A72, INSNS_M7, INSNS_M33, INSNS_M55):
        return f"{v:,.0f}"
    if v >= 1000:
        return f"{v:,.0f}"
    return f"{v:.1f}" if v >= 100 else f"{v:.2f}"


def fmt_ratio(r: float | None) -> str:
    return "–" if r is None else f"{r:.2f}×"


def render_markdown(doc: dict[str, Any]) -> str:
    """The Markdown file, from the JSON document only."""
    m, s = doc["machine"], doc["settings"]
    lines = ["# bnnc benchmark", "",
             f"{m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable), "
             f"{(m['memory_bytes'] or 0) / 2**30:.1f} GiB, Linux {m['kernel']}; Python "
             f"{m['python']}, numpy {m['numpy']}, PyTorch {m['torch']} ({m['torch_threads']} "
             f"thread); {m['cc'] or 'no cc'}; {m['qemu'] or 'no qemu-aarch64'}; bnnc "
             f"{m['bnnc']} at {m['commit'] or '?'}; {m['date']}; load average "
             f"{' / '.join(map(str, m['loadavg_start']))} at start, "
             f"{' / '.join(map(str, m['loadavg_end']))} at end.", "",
             " ".join(said for part, said in (
                 ("host", f"Step times: thread CPU time, median of {s['steps']} after "
                          f"{s['warmup']} warm-up, C and PyTorch interleaved."),
                 ("kernels", "Kernel times: -DBNNC_PROFILE host build, median per kernel "
                             "(`bnnc profile`)."),
                 ("rss", f"Peak RSS: {s['rss_steps']} training steps per process."),
                 ("qemu", f"Instructions: {_how(s['insn_steps'])}."))
                 if part in s["parts"]) + f" Command: `{doc['command']}`.", "",
             "| " + " | ".join(COLUMNS) + " |",
             "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for r in doc["rows"]:
        cells = [r["metric"], r["model"], str(r["batch"]), r["algorithm"],
                 fmt_value(r["metric"], r["bnnc"]), fmt_value(r["metric"], r["pytorch"]),
                 fmt_ratio(r["ratio"]), r["detail"].replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def output_stem(args) -> Path:
    if args.output:
        return Path(args.output)
    name = "quick" if args.quick else "partial" if (args.only or args.models) else "latest"
    return RESULTS / name


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks/bench.py", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See the module docstring for the method.")
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke test: cases {QUICK_CASES}, 5 steps after 1 warm-up")
    ap.add_argument("--only", help=f"comma-separated parts among {','.join(PARTS)}")
    ap.add_argument("--models", help=f"cases NAME[@WIDTH]:BATCH[?] (default {DEFAULT_CASES})")
    ap.add_argument("--steps", type=int, help="timed steps per contender (default 20, quick 5)")
    ap.add_argument("--warmup", type=int, help="untimed steps first (default 3, quick 1)")
    ap.add_argument("--rss-steps", type=int, help="steps of the RSS runs (default 3, quick 2)")
    ap.add_argument("--insn-steps", type=int, help="steps of the counted runs (default 1)")
    ap.add_argument("--probe-limit", type=float, default=5.0,
                    help="seconds per step above which an optional case (`?`) is skipped")
    ap.add_argument("--output", help="file stem for .md/.json (default results/latest, "
                                     "results/quick or results/partial)")
    ap.add_argument("--torch-child", nargs=3, metavar=("GRAPH", "DATA", "STEPS"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.torch_child:
        g, d, n = args.torch_child
        return torch_child(g, d, int(n))
    if args.probe_limit <= 0:
        ap.error("--probe-limit must be positive")
    q = args.quick
    for name, full, quick in (("steps", 20, 5), ("warmup", 3, 1), ("rss_steps", 3, 2),
                              ("insn_steps", 1, 1)):
        if getattr(args, name) is None:
            setattr(args, name, quick if q else full)
        lowest = 0 if name == "warmup" else 1
        if getattr(args, name) < lowest:
            ap.error(f"--{name.replace('_', '-')} must be >= {lowest}")
    try:
        parts = [p.strip() for p in (args.only or ",".join(PARTS)).split(",") if p.strip()]
        bad = [p for p in parts if p not in PARTS]
        if bad or not parts:
            raise ConfigError(f"--only {args.only!r}: unknown part(s) {', '.join(bad) or '(none)'}",
                              hint=f"choose among {', '.join(PARTS)}")
        cases = parse_cases(args.models or (QUICK_CASES if q else DEFAULT_CASES))
        command = ["python", "benchmarks/bench.py", *(sys.argv[1:] if argv is None else argv)]
        return run(args, parts, cases, shlex.join(command))
    except BnncError as err:
        print(f"error: {err}" + (f"\n  hint: {err.hint}" if err.hint else ""), file=sys.stderr)
        return 2


def run(args, parts: list[str], cases: list[Case], command: str) -> int:
    machine = machine_facts()
    rows: list[Row] = []
    status = 0
    with tempfile.TemporaryDirectory(prefix="bnnc-bench-") as tmp:
        ws = Workspace(Path(tmp))
        kept = [c for c in cases if not c.optional]     # optional ones join once probed

        def probe() -> Iterator[Row]:
            skipped = probe_optional(ws, cases, args.probe_limit)
            kept[:] = [c for c in cases if c.key not in skipped]
            yield from (Row("(all parts)", c.label, c.batch, "both", None, detail=skipped[c.key])
                        for c in cases if c.key in skipped)

        makers = {"probe": probe, "host": lambda: part_host(ws, kept, args),
                  "kernels": lambda: part_kernels(ws, kept, args),
                  "rss": lambda: part_rss(ws, kept, args),
                  "qemu": lambda: part_qemu(ws, kept, args),
                  **{p: (lambda p=p: part_mcu(ws, args, p)) for p in MCU_PARTS}}
        steps = (["probe"] if set(parts) & {"host", "kernels", "rss", "qemu"} else []) + parts
        for part in steps:
            # a long run keeps what it measured when a later part breaks (a kernel being edited,
            # a toolchain missing): the failure becomes a row and the exit status
            t0 = time.monotonic()
            try:
                for row in makers[part]():
                    rows.append(row)
                log(f"{part} part: {time.monotonic() - t0:.0f} s")
            except (BnncError, RuntimeError) as err:
                first = str(err).strip().splitlines()[0][:300]
                log(f"{part} part failed: {err}")
                rows.append(Row(f"({part} part)", "–", 0, "–", None, detail=f"failed: {first}"))
                status = 1
    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    doc = {
        "schema": "bnnc-bench",
        "version": 1,
        "command": command,
        "machine": machine,
        "settings": {"parts": parts, "cases": [f"{c.label}:{c.batch}{'?' if c.optional else ''}"
                                               for c in cases],
                     "steps": args.steps, "warmup": args.warmup, "rss_steps": args.rss_steps,
                     "insn_steps": args.insn_steps, "probe_limit_s": args.probe_limit,
                     "quick": bool(args.quick)},
        "columns": list(COLUMNS),
        "rows": [r.as_json() for r in rows],
    }
    md = render_markdown(doc)
    stem = output_stem(args)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    stem.with_suffix(".md").write_text(md)
    print(md)
    log(f"wrote {stem.with_suffix('.md')} and {stem.with_suffix('.json')}")
    return status


if __name__ == "__main__":
    sys.exit(main())
