"""`bnnc check`: train the emitted C and the numpy reference side by side and compare every tensor.

Input: an `ir.Graph`, a `TrainConfig`, a number of steps. Output: a `CheckReport` with one row per
compared tensor and step (max abs / max rel error, elements out of tolerance, pass/fail).

Procedure: emit the C (compiler.codegen) into a work directory, build it with -DBNNC_DEBUG_DUMP
(every step keeps a copy of its outputs, so in-place reuse hides nothing) through runtime/host.py
and load the reference's initial state (`reference.init_state`) into it. The C then trains on its
own for K steps on seeded random batches (inputs on the 1/128 grid of [-1, 1), like 8-bit pixels
scaled by 2x/255 - 1 but dyadic, so binary layers' sums are exact in any order; uniform labels).
Each step is recomputed by `reference.train_step` from the C's pre-step state (read back exactly)
and the same batch, and compared: every tensor both sides name (forward outputs, BN saved values,
sign bits and masks, gradients, PO2 codes, binary dW), the loss, the accuracy and every state tensor
after the update.

Layer by layer (default, `forcing`): the reference's forward of each layer reads the C's outputs of
its input layers and its backward starts from the C's `d_out`, so every layer is checked on exactly
the C's inputs. Without it a 1-ulp difference upstream can flip a sign() or a PO2 threshold and then
every later bit-exact comparison differs for a reason that is not a defect; `forcing=False` ("free")
runs the reference on its own values (all-f32 configurations stay within tolerance there).

Tolerances (per element; r = reference, c = C; floor = e * max|r| over the tensor):
- exact: BIT (sign bits, masks, binary dW decoded as +-1/sqrt(N_W) * 1[|W| <= 1] with the step's
  pre-update W), PO2 codes (compared as decoded values with each side's bias), I32/U8: no mismatch.
- f32 tensors: |c - r| <= 1e-5 |r| + floor, and for sums of products (matmul, conv, dW, dX, BN's
  dbeta/dgamma, bias gradients, BN means) + 1e-5 * (the sum of |terms| behind the element, from the
  C's operands): summation order may change a cancelling sum by that much, not by 1e-5 of the
  result.
- 16-bit tensors (bf16/f16 storage): |c - r| <= 1 ulp of the format at max(|c|, |r|) + floor.
- e = 1e-5 unless the tensor is computed from 16-bit values in this step (l1 BN's dbeta sums the
  f16 gradient), then e = 2^-10 (f16) or 2^-7 (bf16). A 16-bit sum of 16-bit terms (a fan-out's
  gradient, a residual add) also gets one ulp of each term (cancellation).
- parameters and optimizer moments after the update: compared with the reference's update rule
  (`reference.update_params`, stored with the same stochastic-rounding bits) applied to the C's
  pre-step state and gradient, which passed its own comparison; near g ~ eps Adam amplifies any gradient
  rounding by lr/eps, so an independent update would test that amplifier, not the C. BN running
  statistics are compared with the reference's directly.

Storage the schedule chose on purpose (compiler/schedule.py) is emulated on the reference side:
where a layer's incoming gradient `d_out` is f16, its reference backward gets it rounded to f16 and
the contributions it passes on are rounded before a fan-out sum, as the C stores them
(`reference.FORWARD`/`BACKWARD` are wrapped for the duration of one step, then restored). The
reference's own input checks (e.g. "a binary layer's input is +-1") then also check the C's
values.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..compiler.config import TrainConfig
from ..compiler.ir import Graph
from ..compiler.pipeline import compile_to_c
from ..compiler.schedule_ir import DType, Schedule
from ..compiler.state import state_tensors
from ..compiler.target import Target, load_target, parse_size
from ..compiler import numerics as nx
from . import reference
from .host import HostProgram
from .trace import RecordedProgram

F32_RTOL = 1e-5
_FMT_EPS = {DType.F32: F32_RTOL, DType.F16: 2.0 ** -10, DType.BF16: 2.0 ** -7}
_EXACT = (DType.BIT, DType.PO2, DType.I32, DType.U8)


@dataclass(frozen=True)
class Row:
    step: int
    name: str
    dtype: str
    rule: str            # "exact" | "f32" | "f16" | "bf16"
    floor_eps: float
    max_abs: float
    max_rel: float
    mismatches: int      # elements outside tolerance
    size: int

    @property
    def ok(self) -> bool:
        return self.mismatches == 0


@dataclass
class CheckReport:
    model: str
    config: TrainConfig
    steps: int
    forcing: bool
    rows: list[Row] = field(default_factory=list)
    losses: list[tuple[float, float]] = field(default_factory=list)     # (C, reference)
    not_compared: list[str] = field(default_factory=list)                # C-only tensors
    out_dir: Path | None = None

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    @property
    def failures(self) -> list[Row]:
        return [r for r in self.rows if not r.ok]


def sample_batch(graph: Graph, batch: int, rng: np.random.Generator,
                 cfg: TrainConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Inputs on the 1/128 grid of [-1, 1) (under `--input u8`: uniform u8 pixels) and uniform
    labels."""
    if cfg is not None and cfg.input == "u8":
        x = rng.integers(0, 256, (batch,) + graph.input_shape, dtype=np.uint8)
    else:
        x = (rng.integers(-128, 128, (batch,) + graph.input_shape) / 128.0).astype(np.float32)
    y = rng.integers(0, graph.num_classes, batch).astype(np.int32)
    return x, y


def _c_activation(hp: HostProgram, schedule: Schedule, name: str, like: np.ndarray) -> np.ndarray:
    """The C's value of tensor `name` as the reference holds it: +-1 floats for packed bits, f32."""
    v = hp.tensor(name)
    if schedule.tensors[name].dtype is DType.BIT:
        v = np.where(v > 0, 1.0, -1.0)
    return np.asarray(v, like.dtype).reshape(like.shape)


@contextmanager
def _reference_hooks(schedule: Schedule, hp: HostProgram, forcing: bool) -> Iterator[None]:
    """Wrap reference.FORWARD / BACKWARD for one step (restored afterwards; module docstring).

    forcing: every layer's forward reads the C's outputs of its input layers, and every layer's
    backward starts from the C's `d_out`, so each layer is checked on the C's own inputs.
    f16 storage: where the schedule keeps a gradient in f16, the layer's incoming gradient and the
    contributions it passes on (before fan-out sums) are rounded to f16, as the C stores them."""
    f16 = {name.rsplit(".", 1)[0] for name, t in schedule.tensors.items()
           if name.endswith(".d_out") and t.dtype is DType.F16}
    fwd, bwd = dict(reference.FORWARD), dict(reference.BACKWARD)

    def f16_round(v):
        return v if v is None else nx.to_f16_rne(v).astype(v.dtype)

    def forward(fn):
        def run(run_, lay, *xs):
            if forcing:
                xs = tuple(_c_activation(hp, schedule, f"{i}.out", x)
                           if f"{i}.out" in hp.tensors else x for i, x in zip(lay.inputs, xs))
            return fn(run_, lay, *xs)
        return run

    def backward(fn):
        def run(run_, lay, g, need):
            if forcing and f"{lay.name}.d_out" in hp.tensors:
                g = _c_activation(hp, schedule, f"{lay.name}.d_out", g)
            elif lay.name in f16:
                g = f16_round(g)
            outs = fn(run_, lay, g, need)
            return [f16_round(v) if i in f16 else v for i, v in zip(lay.inputs, outs)]
        return run

    for kind, fn in fwd.items():
        reference.FORWARD[kind] = forward(fn)
    for kind, fn in bwd.items():
        reference.BACKWARD[kind] = backward(fn)
    try:
        yield
    finally:
        reference.FORWARD.update(fwd)
        reference.BACKWARD.update(bwd)


def _chain_eps(schedule: Schedule) -> dict[str, float]:
    """Per tensor: the coarsest 16-bit rounding among the non-state values it is computed from."""
    chain: dict[str, float] = {}

    def ceps(name: str) -> float:
        t = schedule.tensors[name]
        base = schedule.tensors[t.alias_of or name]
        if base.role.persistent or base.name in ("input", "labels") or base.dtype in _EXACT:
            return 0.0
        return max(chain.get(base.name, 0.0), _FMT_EPS[base.dtype])

    for s in schedule.steps:
        e = max((ceps(i) for i in s.inputs), default=0.0)
        for o in s.outputs:
            chain[o] = max(chain.get(o, 0.0), e) if schedule.tensors[o].role.persistent else e
    return chain


class _Abs:
    """|values| of the C's own operands of one step, for a kernel's `magnitude` (ops/base.py):
    `value(t)` as float64 in t's shape; `weight(t)`: |W| before the step's update, ones for a
    binary layer (its +-1 signs)."""

    def __init__(self, schedule: Schedule, step, val, pre: dict):
        self.schedule, self.binary, self.val, self.pre = schedule, bool(step.attrs.get("binary")), \
            val, pre

    def value(self, t: str) -> np.ndarray:
        return np.abs(np.asarray(self.val(t), np.float64)).reshape(self.schedule.tensors[t].shape)

    def weight(self, t: str) -> np.ndarray:
        shape = self.schedule.tensors[t].shape
        w = np.abs(np.asarray(self.pre[t], np.float64)).reshape(shape) if t in self.pre \
            else self.value(t)
        return np.ones_like(w) if self.binary else w


def _sum_slack(schedule: Schedule, hp: HostProgram, name: str) -> np.ndarray | None:
    """For a 16-bit sum (a fan-out's gradient, a residual add): one ulp of each stored term, since
    cancellation can make a term's rounding large next to the result."""
    t = schedule.tensors[name]
    step = schedule.producer(t.alias_of or name)
    if t.dtype not in (DType.F16, DType.BF16) or step is None or \
            not step.kernel.sums_stored:
        return None
    return sum(_ulp(hp.tensor(i).reshape(-1), schedule.tensors[i].dtype) for i in step.inputs
               if schedule.tensors[i].dtype in (DType.F16, DType.BF16))


def _slack(schedule: Schedule, hp: HostProgram, name: str, t, pre: dict) -> np.ndarray | None:
    step = schedule.producer(t.alias_of or name)
    if step is None:
        return None
    extra = _sum_slack(schedule, hp, name)
    if t.dtype is DType.F32 or name.endswith(".running_mean"):

        def val(n):
            v = hp.tensor(n)
            if schedule.tensors[n].dtype is DType.PO2:
                layer = n.split(".")[0]
                v = nx.po2_decode(v, int(hp.tensor(f"{layer}.po2_bias").reshape(-1)[0]))
            if schedule.tensors[n].dtype is DType.BIT:
                v = np.where(v > 0, 1.0, -1.0)
            return v
        k = step.kernel
        mag = k.magnitude(step, t.alias_of or name, _Abs(schedule, step, val, pre)) \
            if k.magnitude is not None else None
        if mag is not None:
            return F32_RTOL * mag.reshape(-1)
    return extra


def _ulp(v: np.ndarray, dtype: DType) -> np.ndarray:
    """One unit in the last place of `dtype` at |v| (subnormal spacing at the bottom)."""
    a = np.abs(v).astype(np.float64)
    if dtype is DType.F16:
        return np.spacing(a.astype(np.float16)).astype(np.float64)
    if dtype is DType.BF16:
        e = np.floor(np.log2(np.maximum(a, 2.0 ** -133)))
        return 2.0 ** (np.maximum(e, -126) - 7)
    return np.spacing(a.astype(np.float32)).astype(np.float64)


def compare(step: int, name: str, dtype: DType, c: np.ndarray, r: np.ndarray,
            chain: float, extra: np.ndarray | None = None) -> Row:
    """One tensor of one step under the rules of the module docstring (`extra`: per-element slack
    added to the tolerance, for sums of rounded terms)."""
    c = np.asarray(c, np.float64).reshape(-1)
    r = np.asarray(r, np.float64).reshape(-1)
    assert c.shape == r.shape, (name, c.shape, r.shape)
    diff = np.abs(c - r)
    scale = float(np.abs(r).max()) if r.size else 0.0
    max_abs = float(diff.max()) if r.size else 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(np.abs(r) > 0, diff / np.abs(r), np.where(diff > 0, np.inf, 0.0))
    max_rel = float(rel.max()) if r.size else 0.0
    if dtype in _EXACT:
        bad = int(np.count_nonzero(c != r))
        return Row(step, name, dtype.value, "exact", 0.0, max_abs, max_rel, bad, r.size)
    floor_eps = max(F32_RTOL, chain)
    floor = floor_eps * scale
    if extra is not None:
        floor = floor + np.asarray(extra, np.float64).reshape(-1)
    if dtype is DType.F32:
        tol = F32_RTOL * np.abs(r) + floor
        rule = "f32"
    else:
        tol = _ulp(np.maximum(np.abs(c), np.abs(r)), dtype) + floor
        rule = dtype.value
    bad = int(np.count_nonzero(~(diff <= tol)))
    return Row(step, name, dtype.value, rule, floor_eps, max_abs, max_rel, bad, r.size)


def _c_value(hp: HostProgram, schedule: Schedule, name: str, pre_w: dict[str, np.ndarray],
             outs: dict[str, np.ndarray]) -> np.ndarray | None:
    """A C tensor in the reference's representation (None: the reference has no counterpart)."""
    t = schedule.tensors[name]
    c = hp.tensor(name)
    if t.dtype is DType.PO2:
        layer = name.split(".")[0]
        return nx.po2_decode(c, int(hp.tensor(f"{layer}.po2_bias").reshape(-1)[0]))
    if t.dtype is DType.BIT and name.endswith(".dW"):
        layer = name.split(".")[0]
        w = pre_w[f"{layer}.W"].reshape(t.shape)
        scale = np.float32(1 / math.sqrt(int(np.prod(t.shape))))
        mask = np.ones_like(w) if schedule.tensors[f"{layer}.W"].dtype is DType.BIT \
            else (np.abs(w) <= 1).astype(np.float32)
        return (np.where(c > 0, 1.0, -1.0) * scale * mask).astype(np.float32)
    return c


def _r_value(name: str, t_dtype: DType, r: np.ndarray) -> np.ndarray:
    r = np.asarray(r)
    if t_dtype is DType.BIT and not name.endswith(".dW"):
        return (r > 0).astype(np.int8)          # +-1 values and 0/1 masks alike
    return r


def debug_target(target: Target, *, ram: bool, flash: bool) -> Target:
    """The target a check builds for: a bare-metal debug build runs on the emulated board, which has
    more memory than the part, so its RAM/flash budget is the board's unless --ram / --flash (`ram`,
    `flash`) set it."""
    if target.kind != "baremetal":
        return target
    board = target.extra
    return dataclasses.replace(
        target, ram=target.ram if ram else parse_size(board.get("board_ram", target.ram), "ram"),
        flash=target.flash if flash else parse_size(board.get("board_flash", target.flash),
                                                    "flash"))


def run_check(graph: Graph, cfg: TrainConfig, *, steps: int = 3, data_seed: int = 0,
              target: str | Target = "host", work_dir: str | Path | None = None,
              extra_cflags: Sequence[str] = (), cache: Path | None = None,
              command: str = "", forcing: bool = True, threads: int = 1) -> CheckReport:
    """Run `steps` training steps in C and in the reference and compare (module docstring);
    `threads`: the C's (bnnc compile --threads)."""
    tgt = target if isinstance(target, Target) else load_target(target)
    out = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="bnnc-check-"))
    schedule = compile_to_c(graph, cfg, tgt, out, threads=threads,
                            command=command or f"bnnc check ({graph.name})").schedule
    chain = _chain_eps(schedule)
    report = CheckReport(graph.name, cfg, steps, forcing, out_dir=out)
    rng = np.random.default_rng(data_seed)
    batches = [sample_batch(graph, cfg.batch, rng, cfg) for _ in range(steps)]
    init = reference.init_state(graph, cfg)
    if tgt.kind == "host":
        hp = HostProgram(out, target=tgt, debug=True, extra_cflags=extra_cflags, cache=cache)
    else:
        # a cross target runs all K steps in its debug build first (QEMU); the loop below then
        # replays the recording exactly as it drives the in-process host program
        hp = RecordedProgram(out, tgt, batches, init.tensors)
    hp.load_state(init.tensors, step=0, seed=cfg.seed)
    # the lr schedule decays over the K steps (the trace trainer sets the same horizon itself)
    if tgt.kind == "host":
        hp.set_lr_horizon(steps)
    sts = {st.name: st for st in state_tensors(graph, cfg)}
    state_dtypes = {n: t.dtype for n, t in schedule.tensors.items() if t.role.persistent}
    seen_c_only: set[str] = set()
    for k in range(steps):
        x, y = batches[k]
        # the reference takes this step from the C's own state: the C runs free, each step checked
        pre = hp.read_state()
        pre_state = reference.TrainState(
            {n: (v.astype(np.int8) if sts[n].dtype == "bit" else v.astype(np.float32))
             for n, v in pre.items()}, hp.step_count, steps)
        loss, acc = hp.train_step(x, y)
        try:
            with _reference_hooks(schedule, hp, forcing):
                state, outs = reference.train_step(graph, cfg, pre_state, x, y)
        except AssertionError as err:
            if not forcing:
                raise
            # the reference checks its inputs (e.g. a binary layer's input is +-1): handed the C's
            # values, such a failure is a defect of the C, reported like any other mismatch
            report.rows.append(Row(k, f"reference rejected a C value: {err}", "-", "exact", 0.0,
                                   float("nan"), float("nan"), 1, 1))
            break
        report.losses.append((loss, float(outs["loss"])))
        report.rows.append(compare(k, "loss", DType.F32, np.float32(loss), outs["loss"],
                                   chain.get("loss", 0.0)))
        report.rows.append(compare(k, "accuracy", DType.I32, np.float32(acc), outs["accuracy"],
                                   0.0))
        c_vals: dict[str, np.ndarray] = {}
        for name, t in schedule.tensors.items():
            if t.role.persistent or name in ("input", "labels", "loss") or name not in hp.tensors:
                continue
            if t.alias_of == "input" and t.dtype is DType.U8:
                continue    # a view of the u8 batch itself (the reference holds its floats)
            c_vals[name] = c = _c_value(hp, schedule, name, pre, outs)
            if name not in outs:
                seen_c_only.add(name)
                continue
            r = _r_value(name, t.dtype, outs[name])
            b, ch, h, w = (c.shape + (0, 0, 0, 0))[:4]
            if c.ndim == 4 and r.shape == (b * h * w, ch):
                # the reference keeps a conv's PO2 gradient as its im2col matrix (rows n, y, x)
                c = c.transpose(0, 2, 3, 1).reshape(r.shape)
            if c.size != r.size:
                raise AssertionError(f"{name}: C has {c.size} values, the reference {r.size}")
            report.rows.append(compare(k, name, t.dtype, c, r, chain.get(name, 0.0),
                                       _slack(schedule, hp, name, t, pre)))
        after = hp.read_state()
        expected = reference.update_params(graph, cfg, pre_state.step + 1, pre, c_vals, steps)
        for name, v in state.tensors.items():
            ref_v = expected.get(name, v)      # parameters and moments: update of the C gradient
            report.rows.append(compare(k, name, state_dtypes[name], after[name], ref_v,
                                       chain.get(name, 0.0) if name not in expected else 0.0,
                                       None if name in expected else
                                       _slack(schedule, hp, name, schedule.tensors[name], pre)))
    report.not_compared = sorted(seen_c_only)
    if isinstance(hp, HostProgram):
        hp.close()
    return report


def format_report(report: CheckReport, *, verbose: bool = False) -> str:
    """Text table: one line per tensor (worst step), failures always listed."""
    cfg = report.config
    lines = [f"bnnc check {report.model}: {cfg.algorithm}, {cfg.optimizer}, batch {cfg.batch}, "
             f"{report.steps} step(s), "
             f"{'layer by layer on the C inputs' if report.forcing else 'free running'}"]
    worst: dict[str, Row] = {}
    for r in report.rows:
        w = worst.get(r.name)
        if w is None or (r.mismatches, r.max_rel) > (w.mismatches, w.max_rel):
            worst[r.name] = r
    lines.append(f"{'tensor':<24} {'dtype':<5} {'rule':<5} {'max abs':>10} {'max rel':>10} "
                 f"{'bad':>6} {'of':>8}  result")
    for name, r in worst.items():
        if not verbose and r.ok and r.max_abs == 0 and name != "loss":
            continue      # bit-identical: counted in the summary line
        lines.append(f"{name:<24} {r.dtype:<5} {r.rule:<5} {r.max_abs:10.3g} {r.max_rel:10.3g} "
                     f"{r.mismatches:6d} {r.size:8d}  "
                     + ("ok" if r.ok else f"FAIL (step {r.step})"))
    exact_zero = sum(1 for r in worst.values() if r.ok and r.max_abs == 0)
    lines.append(f"{len(worst)} tensors compared over {report.steps} step(s): "
                 f"{exact_zero} bit-identical, {len({r.name for r in report.failures})} failing")
    for i, (c, r) in enumerate(report.losses):
        lines.append(f"step {i}: loss C {c:.7g}  reference {r:.7g}")
    if report.not_compared:
        lines.append("C-only tensors (no reference counterpart): " + ", ".join(report.not_compared))
    lines.append("PASS" if report.ok else "FAIL")
    return "\n".join(lines)
