"""Memory budget of a bare-metal program: `check_budget(schedule, plan, target, *, data_bytes=0)
-> BudgetReport`, raising BudgetError before any C is written when the program cannot fit.

Input: a verified `Schedule` and its `ArenaPlan`, a `Target` with RAM/flash/stack budgets (kind
"baremetal"), and the bytes of training data a program would embed in flash (0 for bnnc's trainer,
which streams them through semihosting). Optionally the `Graph` (then the message computes the ways
out with real plans) and the `Liveness` (else recomputed).

Output: a frozen `BudgetReport`: every RAM and flash contributor with its bytes, largest first.
- RAM, as the emitted C declares it: the arena (uint64 words: the plan's bytes rounded down to 8,
  plus 8), the training state (a 16-byte step/seed header plus its words), the bare-metal trainer's
  buffers (labels, probabilities, one pixel row, the output line and the command line: sizes of
  templates/trainer/skeleton.c.j2 and baremetal/trainer.c.j2), the C library's data (newlib-nano's reentrancy struct) and the
  stack reserve. The arena is itemized by role as it stands at its peak step (what is live there),
  plus the planner's padding above that lower bound; the state by role. Frozen parameters
  (partial training) are not in RAM: the program reads them in place from the start-state blob
  in flash (compiler/codegen.py), so RAM holds the state without its frozen tail.
- Flash: the vector table, code and constants (estimated: see CODE_*), the tensor table, the .data
  image, the start-state blob reserve (exact: a state blob, rounded up to BLOB_ALIGN) and embedded
  data.
Invariant: `fits` is exactly "RAM total <= target.ram and flash total <= target.flash"; check_budget
raises iff not `fits`. The linker script enforces the same budgets on the real sections afterwards
(templates/baremetal/link.ld.j2), and runtime/baremetal.py checks the stack reserve against the
compiler's call graph.

Limits: the code estimate is a linear model fitted to arm-none-eabi-gcc 12 -O2 builds of the zoo
models for Cortex-M7/M4 (from -10 % to +35 % there; a test compares it with a real build); the
RAM side is exact up to the C library's few bytes and the linker's alignment padding.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from .baremetal import blob_reserve, board
from .firmware_api import fw_static_nbytes
from .library import checkpoint_slot_nbytes
from .config import (TrainConfig, check_config_for_graph, make_config, resolve_frozen,
                     trained_fields)
from .errors import BudgetError, ConfigError
from .liveness import Liveness, compute_liveness
from .ops.base import Phase
from .planner import ArenaPlan, align_up, plan_schedule
from .report import peak_breakdown
from .schedule import build_schedule
from .schedule_ir import Role, Schedule
from .ir import WEIGHT_KINDS
from .target import Target

# arm-none-eabi-gcc -O2 -ffunction-sections + --gc-sections: startup, trainer, semihosting, number
# formatting and the libm/libgcc routines the kernels call, then each kernel instance, each step
# function (call + dump hooks) and each state tensor (three unrolled init/load/read loops)
CODE_BASE_NBYTES = 8192
CODE_PER_KERNEL_NBYTES = 1280
CODE_PER_STEP_NBYTES = 96
CODE_PER_STATE_NBYTES = 160
TABLE_ENTRY_NBYTES = 40           # one tensor table row on a 32-bit target (name pointer + 9 words)
CONST_NBYTES = 2048 + 256         # CRC-32 table, pixel LUT, status strings
LIBC_RAM_NBYTES = 128             # newlib-nano's impure data (.data), rounded up
TRAINER_LINE_NBYTES = 512 + 512 + 16   # output line, command line, a few scalars
_ROLE_WORDS = {Role.INPUT: "input batch", Role.LABEL: "labels", Role.SAVED: "saved activations",
               Role.GRAD: "gradients", Role.SCRATCH: "scratch", Role.PARAM: "parameters",
               Role.OPT_STATE: "optimizer state", Role.BN_STAT: "BN statistics",
               Role.FROZEN: "frozen parameters"}


@dataclass(frozen=True)
class Contributor:
    what: str         # "optimizer state (state)", "stack reserve", "code (estimate)", ...
    nbytes: int


@dataclass(frozen=True)
class BudgetReport:
    model: str
    target: str
    ram_budget: int
    flash_budget: int
    ram: tuple[Contributor, ...]      # largest first
    flash: tuple[Contributor, ...]    # largest first

    @property
    def ram_nbytes(self) -> int:
        return sum(c.nbytes for c in self.ram)

    @property
    def flash_nbytes(self) -> int:
        return sum(c.nbytes for c in self.flash)

    @property
    def fits(self) -> bool:
        return self.ram_nbytes <= self.ram_budget and self.flash_nbytes <= self.flash_budget

    def format(self) -> str:
        """Both memories as text tables (what `bnnc compile` can print for a bare-metal target)."""
        lines = []
        for name, items, total, budget in (("RAM", self.ram, self.ram_nbytes, self.ram_budget),
                                           ("flash", self.flash, self.flash_nbytes,
                                            self.flash_budget)):
            lines.append(f"{name}: {total:,} of {budget:,} B ({100 * total / budget:.1f} %)")
            lines += [f"  {c.what:<34} {c.nbytes:>12,}" for c in items]
        return "\n".join(lines)


def _words(nbytes: int) -> int:
    """Bytes of `uint64_t x[nbytes / 8 + 1]` (how model.c.j2 declares the arena and state)."""
    return (nbytes // 8 + 1) * 8


def trainer_buffers_nbytes(schedule: Schedule) -> int:
    """Static buffers of the bare-metal trainer (templates/trainer/skeleton.c.j2 and
    templates/baremetal/trainer.c.j2) besides the arena and the state."""
    batch = schedule.config.batch
    x = schedule.tensors["input"]
    elems = x.size // batch
    classes = next(s.attrs["classes"] for s in schedule.steps if s.phase is Phase.LOSS)
    return 5 * batch + 4 * batch * classes + align_up(elems, 4) + TRAINER_LINE_NBYTES


def code_estimate_nbytes(schedule: Schedule) -> int:
    """Estimated code + read-only data of the bare-metal program (module docstring)."""
    kernels = {(s.kernel.name, tuple(schedule.tensors[t].dtype for t in (*s.inputs, *s.outputs)))
               for s in schedule.steps}
    state = sum(1 for t in schedule.tensors.values() if t.role.persistent)
    return (CODE_BASE_NBYTES + CODE_PER_KERNEL_NBYTES * len(kernels)
            + CODE_PER_STEP_NBYTES * len(schedule.steps) + CODE_PER_STATE_NBYTES * state)


def budget_report(schedule: Schedule, plan: ArenaPlan, target: Target, *, data_bytes: int = 0,
                  liveness: Liveness | None = None, emit: str = "program") -> BudgetReport:
    """Every RAM and flash contributor of the bare-metal program of `schedule` (see the module
    docstring). emit "library" (`--emit library`): the firmware API's buffers instead of the
    trainer's, and the two checkpoint slots (compiler/library.py) instead of the start-state
    blob."""
    live = liveness if liveness is not None else compute_liveness(schedule)
    ram: list[Contributor] = []
    peak = peak_breakdown(live, plan)
    roles = {r.value: r for r in Role}
    for role, nbytes in peak["by_role"].items():
        ram.append(Contributor(f"{_ROLE_WORDS[roles[role]]} (arena, at its peak)", nbytes))
    pad = _words(plan.arena_nbytes) - peak["nbytes"]
    if pad:
        ram.append(Contributor("arena padding (plan above its lower bound)", pad))
    by_role: dict[Role, int] = {}
    for b in live.state:
        if b.role is not Role.FROZEN:       # read in place from the blob in flash
            by_role[b.role] = by_role.get(b.role, 0) + align_up(b.nbytes, plan.align)
    for role, nbytes in by_role.items():
        ram.append(Contributor(f"{_ROLE_WORDS[role]} (state)", nbytes))
    state_pad = 16 + _words(plan.frozen_offset) - sum(by_role.values())
    ram.append(Contributor("state header and padding", state_pad))
    if emit == "library":
        classes = next(s.attrs["classes"] for s in schedule.steps if s.phase is Phase.LOSS)
        ram.append(Contributor("firmware API buffers (probabilities of predict_one)",
                               fw_static_nbytes(schedule.config.batch, classes)))
    else:
        ram.append(Contributor("trainer buffers (labels, probabilities, I/O)",
                               trainer_buffers_nbytes(schedule)))
    ram.append(Contributor("C library data", LIBC_RAM_NBYTES))
    ram.append(Contributor("stack reserve", target.stack))

    n_tensors = sum(1 for t in schedule.tensors.values() if t.name in plan.tensor_offsets)
    names = sum(len(t.name) + 1 for t in schedule.tensors.values() if t.name in plan.tensor_offsets)
    blob = 40 + max(plan.state_nbytes, 16)
    flash = [Contributor("code (estimate)", code_estimate_nbytes(schedule)),
             Contributor("tensor table", n_tensors * TABLE_ENTRY_NBYTES + align_up(names, 4)),
             Contributor("constants (CRC table, pixel LUT, strings)", CONST_NBYTES),
             Contributor(".data load image", LIBC_RAM_NBYTES),
             *((Contributor("checkpoint slots (2, CRC'd, in the last flash sectors)",
                            2 * checkpoint_slot_nbytes(target, blob)),) if emit == "library"
               else (Contributor("start-state blob (reserved)",
                                 blob_reserve(blob) - plan.frozen_nbytes),)),
             Contributor("frozen parameters (in the start-state blob, read in place)",
                         plan.frozen_nbytes)]
    if data_bytes:
        flash.append(Contributor("training data (embedded)", data_bytes))

    def order(items: list[Contributor]) -> tuple[Contributor, ...]:
        return tuple(sorted((c for c in items if c.nbytes > 0), key=lambda c: (-c.nbytes, c.what)))

    return BudgetReport(schedule.graph_name, target.name, target.ram, target.flash, order(ram),
                        order(flash))


def _alternatives(graph, schedule: Schedule, target: Target,
                  fits_with: Callable[[Schedule, ArenaPlan], BudgetReport]) -> list[str]:
    """The ways out, each with the RAM/flash it would need (real plans of the changed config)."""
    cfg = schedule.config
    out: list[str] = []
    cache: dict = {}

    def report(c) -> BudgetReport | None:
        key = tuple(sorted(c.as_dict().items()))
        if key not in cache:
            try:
                check_config_for_graph(graph, c)
                s = build_schedule(graph, c)
                cache[key] = fits_with(s, plan_schedule(s, align=target.align)[1])
            except ConfigError:
                cache[key] = None
        return cache[key]

    def say(flag: str, c) -> None:
        r = report(c)
        if r is not None:
            out.append(f"{flag}: RAM {r.ram_nbytes:,} B, flash {r.flash_nbytes:,} B"
                       + (" (fits)" if r.fits else " (does not fit either)"))

    if cfg.algorithm == "standard":
        keep = {k: getattr(cfg, k) for k in ("batch", "optimizer", "lr", "seed")}
        say("--algorithm proposed", make_config("proposed", **keep))
        if cfg.optimizer != "bop":
            say("--algorithm proposed --optimizer bop",
                make_config("proposed", **{**keep, "optimizer": "bop"}))
    if cfg.optimizer != "bop":
        say("--optimizer bop", replace(cfg, optimizer="bop"))
    if cfg.state_dtype == "f32":
        say("--state-dtype f16", replace(cfg, state_dtype="f16"))
    best = largest_fitting_batch(report, cfg, cfg.batch - 1)
    if best is not None:
        say(f"--batch {best} (the largest that fits)", replace(cfg, batch=best))
    return out


def largest_fitting_batch(report: Callable[[TrainConfig], "BudgetReport | None"],
                          cfg: TrainConfig, hi: int) -> int | None:
    """The largest batch in 1..hi whose plan fits (`report(config)`: a real plan's budget, None
    when the config is invalid), by bisection: a plan's RAM grows with the batch."""
    lo, best = 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        r = report(replace(cfg, batch=mid))
        if r is not None and r.fits:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


def check_budget(schedule: Schedule, plan: ArenaPlan, target: Target, *, data_bytes: int = 0,
                 graph=None, liveness: Liveness | None = None,
                 emit: str = "program") -> BudgetReport:
    """The budget report of the bare-metal program; BudgetError when it does not fit, listing the
    largest contributors and the ways out (computed with real plans when `graph` is given)."""
    rep = budget_report(schedule, plan, target, data_bytes=data_bytes, liveness=liveness,
                        emit=emit)
    if rep.fits:
        return rep
    cfg = schedule.config
    what = (f"{schedule.graph_name} ({cfg.algorithm} algorithm, {cfg.optimizer}, batch "
            f"{cfg.batch}) does not fit {target.name}")
    parts = []
    if rep.ram_nbytes > rep.ram_budget:
        parts.append(f"RAM: needs {rep.ram_nbytes:,} B, the budget is {rep.ram_budget:,} B "
                     f"(--ram); largest: "
                     + ", ".join(f"{c.what} {c.nbytes:,} B" for c in rep.ram[:4]))
    if rep.flash_nbytes > rep.flash_budget:
        parts.append(f"flash: needs {rep.flash_nbytes:,} B, the budget is {rep.flash_budget:,} B "
                     f"(--flash); largest: "
                     + ", ".join(f"{c.what} {c.nbytes:,} B" for c in rep.flash[:3]))
    ways = []
    if graph is not None:
        ways = _alternatives(graph, schedule, target, lambda s, p: budget_report(
            s, p, target, data_bytes=data_bytes, emit=emit))
    else:
        ways = [w for w, on in (
            ("--algorithm proposed (1-bit saved activations, 16-bit state)",
             cfg.algorithm == "standard"),
            ("--optimizer bop (binary weights, one 16-bit momentum)", cfg.optimizer != "bop"),
            ("--state-dtype f16", cfg.state_dtype == "f32"),
            ("a smaller --batch", cfg.batch > 1)) if on]
    if not cfg.frozen:
        ways.append("--fit (fine-tuning: train only the deepest suffix of the model that fits)")
    b = board(target)
    where = (f"QEMU's {target.name} board has" if target.emulator
             else f"the {target.name} part's memory map has")
    ways.append(f"a part with more memory: --ram / --flash ({where} "
                f"{b.ram_nbytes // 1024}K RAM, {b.flash_nbytes // 1024}K flash)")
    raise BudgetError(f"{what}. " + "; ".join(parts),
                      hint="ways out: " + "; ".join(ways))


# ---- fitting a trainable suffix to the budget (`bnnc compile --fit`) ---------------------------

@dataclass(frozen=True)
class FitRow:
    """One candidate of `fit_budget`: train from `train_from` on (None: everything)."""
    train_from: str | None
    trained: int                 # parameters (elements) the optimizer updates
    batch: int | None            # the largest batch <= the one asked that fits (None: none does)
    ram_nbytes: int              # at that batch (at batch 1 when none fits)
    flash_nbytes: int


@dataclass(frozen=True)
class Fit:
    config: TrainConfig | None   # the choice (None: nothing fits)
    chosen: int | None           # its row in `rows`
    rows: tuple[FitRow, ...]     # deepest suffix (everything) first

    def format(self) -> str:
        head = ("--train-from", "trained params", "batch", "RAM B", "flash B", "")
        cells = [(r.train_from or "(all)", f"{r.trained:,}",
                  str(r.batch) if r.batch else "-", f"{r.ram_nbytes:,}", f"{r.flash_nbytes:,}",
                  "<- chosen" if i == self.chosen else ("" if r.batch else "does not fit"))
                 for i, r in enumerate(self.rows)]
        widths = [max(len(c[k]) for c in [head] + cells) for k in range(len(head))]
        lines = ["  ".join(c[k].rjust(widths[k]) if 0 < k < 5 else c[k].ljust(widths[k])
                           for k in range(len(head))).rstrip() for c in [head] + cells]
        lines.insert(1, "  ".join("-" * w for w in widths[:5]))
        return "\n".join(lines)


def fit_budget(graph, cfg: TrainConfig, target: Target, *, data_bytes: int = 0,
               min_batch: int = 1) -> Fit:
    """The deepest trainable suffix of `graph` that fits `target` at a batch of at least
    `min_batch`, and the largest batch up to `cfg.batch` at which it fits. Suffixes start at a
    weight layer (`--train-from fc3`: fc3, its BN and everything after them; the first candidate
    is the whole model). Every candidate's bytes are real plans (`budget_report`, as
    `check_budget` computes them); `cfg.frozen` is replaced.

    [bnnc choice] depth before batch, as issue 14 asks, and suffixes from weight layers only.
    Measured (TFC pretrained on MNIST, fine-tuned 2000 steps on inverted digits, host C, the
    64 KiB Cortex-M4 candidates): --train-from fc3 at batch 5 reaches 81.6 % test accuracy,
    --train-from fc4 at batch 12 30.5 %, --train-from bn3 at batch 12 16.1 %; a suffix starting
    at a batch norm (its beta trained over a frozen layer's output) did worse at every batch
    tried (bn2 at 4: 22.2 %, bn3 at 5: 2.8 %). BN models still need a batch of 2 or more
    (`check_config_for_graph`)."""
    floor = min_batch
    starts = [None] + [lay.name for lay in graph.layers
                       if lay.kind in WEIGHT_KINDS][1:]
    cache: dict = {}

    def report(c: TrainConfig) -> BudgetReport | None:
        key = (c.frozen, c.batch)
        if key not in cache:
            try:
                check_config_for_graph(graph, c)
                s = build_schedule(graph, c)
                cache[key] = budget_report(s, plan_schedule(s, align=target.align)[1], target,
                                           data_bytes=data_bytes)
            except ConfigError:
                cache[key] = None
        return cache[key]

    def largest_batch(c: TrainConfig) -> int | None:
        return largest_fitting_batch(report, c, cfg.batch)

    cands = [replace(cfg, frozen=resolve_frozen(graph, train_from=s, bn=cfg.bn) if s else ())
             for s in starts]
    rows = []
    for s, c in zip(starts, cands):
        b = largest_batch(c)
        r = report(replace(c, batch=b or 1)) or report(replace(c, batch=max(2, b or 2)))
        trained = sum(int(lay.params[f].size) for lay in graph.layers
                      for f in trained_fields(lay, c) if f in lay.params)
        rows.append(FitRow(s, trained, b, r.ram_nbytes if r else 0, r.flash_nbytes if r else 0))
    chosen = next((i for i, r in enumerate(rows) if r.batch and r.batch >= floor), None)
    if chosen is None:
        return Fit(None, None, tuple(rows))
    return Fit(replace(cands[chosen], batch=rows[chosen].batch), chosen, tuple(rows))
