"""The static arena planner: `plan_arena(liveness, *, align=16) -> ArenaPlan`, a byte offset for
every buffer so that no two buffers live at the same step share a byte.

Input: `Liveness` (only each buffer's name, size and [first, last] interval matter; the planner
never sees ONNX or the schedule). Output: a frozen `ArenaPlan` that `plan_check.check_plan` has
verified. `plan_schedule(schedule, *, align=16, io="arena")` runs liveness, its check and the
planner in one call.

Invariants of the result:
- every arena buffer has an offset that is a multiple of `align`, and offset + size <= arena_nbytes;
- buffers whose intervals overlap have disjoint byte ranges (sizes rounded up to `align`);
- `lower_bound <= arena_nbytes`, where lower_bound = max over steps of the aligned bytes live at
  that step (no plan of these intervals can be smaller), and efficiency = lower_bound /
  arena_nbytes;
- persistent state gets its own region, laid out sequentially in state order (each aligned), the
  frozen parameters of a partially trained model last: they form the region's tail of
  `frozen_nbytes` bytes (bare-metal programs read that tail in place from the start-state blob in
  flash, compiler/codegen.py);
- the caller's batch buffers (liveness io="caller") are not placed: their tensors are located at
  ("caller", 0), i.e. at the start of the pointer the train-step entry receives;
- the same liveness gives the same plan, byte for byte: every order breaks ties by buffer name;
- with `guard_bytes` G > 0 (debug builds, `bnnc compile --guard`) every arena buffer is placed as
  [G canary bytes | its bytes rounded up to `align` | G canary bytes]; `ArenaPlan.guards` lists the
  canary ranges, and no buffer live at a common step touches another's canaries. The lower bound
  stays the unguarded one, so the reported efficiency shows the cost of the guards.

Algorithm: placement is NP-hard in general (dynamic storage allocation), so several greedy
heuristics run and the smallest arena wins (glow's `memAllocStrategies`). Each heuristic is an
*order* plus a *fit*. Orders: "size" (largest first: TFLM's GreedyMemoryPlanner, TVM USMP
greedy_by_size), "conflicts" (most time-overlapping buffers first: TVM USMP greedy_by_conflicts),
"lifetime" (earliest first, largest first within a step: a linear-scan allocator), "duration"
(longest-lived first, so saved activations stack at the bottom and transients above them), "area"
(largest bytes x steps first), "pressure" (glow: repeatedly the largest unplaced buffer live at the
step with the most unplaced bytes) and "pressure_duration" (the same, longest-lived first; together
with "duration" it closes the gaps "size" leaves on MLP-like schedules). Fits: "first" (lowest
offset whose gap is large enough; with the size order this is exactly TFLM's planner) and "best"
(the smallest gap that fits, else the top). The heuristics run in name order and stop at the first
one that reaches the lower bound; ties keep the earlier name. Cost: the lifetime heuristics use a
sweep over the steps that keeps the free holes between live blocks (`_sweep_fit`: the same offsets
as the conflict-graph fit, O(n log n + n h) for h holes); the others walk the conflict graph, which
grows as the square of the depth of a chain, so above MAX_CONFLICT_PAIRS overlapping pairs
(counted in O(n log n), `conflict_pairs`) only the sweep heuristics run: planning stays
O(n log n)-ish in time and O(n) in memory (`benchmarks/plan_scale.py`). Greedy placement can miss
the optimum when the peak-step buffers cannot be stacked the same way at neighbouring steps (CNV
with its fused conv -> BN -> sign steps: several steps within a few % of the peak): where the best
heuristic stays below REFINE_BELOW efficiency, `_refine` runs a bounded local search on the
heuristics' orders (move one buffer to the front, keep the move when the arena shrinks; at most
REFINE_FITS placements, plans of at most REFINE_MAX_ITEMS buffers; CNV width 0.25, B = 100:
0.942 -> 1.000). The report states the efficiency reached and the heuristic (`refined_<name>`).
"""

from __future__ import annotations

import bisect
import heapq
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from .errors import PlanError
from .liveness import Liveness, compute_liveness
from .plan_check import check_liveness, check_plan
from .schedule_ir import Role, Schedule


# `bnnc compile --guard`: canary bytes on each side of every arena buffer. 64 catches a kernel that
# overruns by up to a few packed 64-bit words or a short float row.
DEFAULT_GUARD_BYTES = 64


@dataclass(frozen=True)
class Item:
    """What a heuristic sees of a buffer."""
    name: str
    nbytes: int      # already rounded up to the alignment
    first: int
    last: int


@dataclass(frozen=True)
class Guard:
    """Canary bytes around one arena buffer: arena bytes [lo, offset) and [end, hi), where
    end = offset + nbytes (the exact size, so the alignment padding is guarded too). They mean
    something only while the buffer lives (steps first..last): other buffers reuse them after."""
    buffer: str
    tensors: tuple[str, ...]
    lo: int
    offset: int
    end: int
    hi: int
    first: int
    last: int


@dataclass(frozen=True)
class ArenaPlan:
    align: int
    arena_nbytes: int
    lower_bound: int                              # max over steps of aligned live bytes
    heuristic: str                                # the heuristic whose plan was kept
    offsets: Mapping[str, int] = field(default_factory=dict)        # arena buffer -> byte offset
    state_nbytes: int = 0
    state_offsets: Mapping[str, int] = field(default_factory=dict)  # state buffer -> byte offset
    # tensor -> (region "arena" | "state" | "caller", byte offset): its buffer's location, so views
    # and in-place outputs share it
    tensor_offsets: Mapping[str, tuple[str, int]] = field(default_factory=dict)
    tried: Mapping[str, int] = field(default_factory=dict)          # heuristic -> arena bytes
    guard_bytes: int = 0                          # canary bytes on each side of an arena buffer
    guards: tuple[Guard, ...] = ()                # one per arena buffer when guard_bytes > 0
    frozen_nbytes: int = 0                        # the state's tail: frozen parameters (read only)

    @property
    def frozen_offset(self) -> int:
        """Where the frozen tail of the state region starts (state_nbytes when there is none)."""
        return self.state_nbytes - self.frozen_nbytes

    @property
    def efficiency(self) -> float:
        return 1.0 if self.arena_nbytes == 0 else self.lower_bound / self.arena_nbytes

    @property
    def total_nbytes(self) -> int:
        return self.arena_nbytes + self.state_nbytes


def align_up(n: int, align: int) -> int:
    return -(-n // align) * align


def live_bytes(items: Sequence[Item], num_steps: int) -> list[int]:
    """Bytes live at each step (difference array over the intervals)."""
    delta = [0] * (num_steps + 1)
    for it in items:
        delta[it.first] += it.nbytes
        delta[it.last + 1] -= it.nbytes
    out, acc = [], 0
    for d in delta[:num_steps]:
        acc += d
        out.append(acc)
    return out


def _conflicts(items: Sequence[Item]) -> list[list[int]]:
    """For each item, the indices of the items whose intervals overlap its own (sweep by start)."""
    adj: list[list[int]] = [[] for _ in items]
    by_first = sorted(range(len(items)), key=lambda i: (items[i].first, items[i].name))
    for a, i in enumerate(by_first):
        for j in by_first[a + 1:]:
            if items[j].first > items[i].last:
                break
            adj[i].append(j)
            adj[j].append(i)
    return adj


def _fit(items: Sequence[Item], order: Sequence[int], adj: list[list[int]],
         best: bool) -> dict[str, int]:
    offset: dict[int, int] = {}
    for i in order:
        size = items[i].nbytes
        placed = sorted((offset[j], items[j].nbytes) for j in adj[i] if j in offset)
        chosen, chosen_gap, top = None, None, 0
        for off, sz in placed:
            gap = off - top
            if gap >= size and (chosen is None or (best and gap < chosen_gap)):
                chosen, chosen_gap = top, gap
                if not best:
                    break
            top = max(top, off + sz)
        offset[i] = top if chosen is None else chosen
    return {items[i].name: off for i, off in offset.items()}


def conflict_pairs(items: Sequence[Item]) -> int:
    """How many pairs of items overlap in time (the edges of the conflict graph `_conflicts`
    builds), counted without building it: O(n log n)."""
    srt = sorted(items, key=lambda it: it.first)
    firsts = [it.first for it in srt]
    return sum(bisect.bisect_right(firsts, it.last) - k - 1 for k, it in enumerate(srt))


def _sweep_fit(items: Sequence[Item], order: Sequence[int], best: bool) -> dict[str, int]:
    """`_fit` for an order by first step (the lifetime order), without the conflict graph.

    In that order the placed items overlapping item i in time are exactly those still live at
    i's first step, and those are pairwise disjoint in bytes; so the gaps `_fit` scans are the
    free holes between the live blocks. This keeps the holes (by start and by end) and the top
    of the live blocks, frees blocks as their last step passes (a heap by last step) and
    places at the lowest (first fit) or smallest (best fit, lowest on ties) hole that holds the
    item, else at the top: the same offsets as `_fit`, in O(n log n + n h) for h holes."""
    offset: dict[int, int] = {}
    hole_end: dict[int, int] = {}        # start -> end
    hole_at_end: dict[int, int] = {}     # end -> start
    starts: list[int] = []               # sorted hole starts
    top = 0
    ending: list[tuple[int, int]] = []   # (last step, item) of the placed items

    def drop_hole(st: int) -> int:
        en = hole_end.pop(st)
        del hole_at_end[en]
        del starts[bisect.bisect_left(starts, st)]
        return en

    def add_hole(st: int, en: int) -> None:
        hole_end[st] = en
        hole_at_end[en] = st
        bisect.insort(starts, st)

    for i in order:
        it = items[i]
        while ending and ending[0][0] < it.first:
            _, j = heapq.heappop(ending)
            a, b = offset[j], offset[j] + items[j].nbytes
            p = a
            if a in hole_at_end:
                p = hole_at_end[a]
                drop_hole(p)
            if b == top:
                top = p
            else:
                q = drop_hole(b) if b in hole_end else b
                add_hole(p, q)
        size, chosen, chosen_gap = it.nbytes, None, None
        for st in starts:
            gap = hole_end[st] - st
            if gap >= size and (chosen is None or (best and gap < chosen_gap)):
                chosen, chosen_gap = st, gap
                if not best:
                    break
        if chosen is None:
            offset[i] = top
            top += size
        else:
            en = drop_hole(chosen)
            if chosen + size < en:
                add_hole(chosen + size, en)
            offset[i] = chosen
        heapq.heappush(ending, (it.last, i))
    return {items[i].name: off for i, off in offset.items()}


def _order_size(items: Sequence[Item], adj: list[list[int]]) -> list[int]:
    return sorted(range(len(items)), key=lambda i: _by_size(items[i]))


def _by_size(it: Item) -> tuple:
    """Largest first, then longest-lived, then by name."""
    return (-it.nbytes, it.first - it.last, it.name)


def _order_conflicts(items: Sequence[Item], adj: list[list[int]]) -> list[int]:
    return sorted(range(len(items)), key=lambda i: (-len(adj[i]), -items[i].nbytes, items[i].name))


def _order_lifetime(items: Sequence[Item], adj: list[list[int]]) -> list[int]:
    return sorted(range(len(items)),
                  key=lambda i: (items[i].first, -items[i].nbytes, items[i].name))


def _by_duration(it: Item) -> tuple:
    """Longest-lived first, then largest, then by name."""
    return (it.first - it.last, -it.nbytes, it.name)


def _order_duration(items: Sequence[Item], adj: list[list[int]]) -> list[int]:
    return sorted(range(len(items)), key=lambda i: _by_duration(items[i]))


def _order_area(items: Sequence[Item], adj: list[list[int]]) -> list[int]:
    return sorted(range(len(items)), key=lambda i: (
        -(items[i].last - items[i].first + 1) * items[i].nbytes, items[i].name))


def _order_pressure(items: Sequence[Item], adj: list[list[int]]) -> list[int]:
    return _pressure(items, _by_size)


def _order_pressure_duration(items: Sequence[Item], adj: list[list[int]]) -> list[int]:
    return _pressure(items, _by_duration)


def _pressure(items: Sequence[Item], rank: Callable[[Item], tuple]) -> list[int]:
    """Repeatedly the first (by `rank`) unplaced buffer live at the step with the most unplaced
    bytes (glow's strategy: the busiest step decides the arena, so its buffers go first)."""
    num_steps = max((it.last for it in items), default=-1) + 1
    load = live_bytes(items, num_steps)
    left = sorted(range(len(items)), key=lambda i: rank(items[i]))
    order: list[int] = []
    while left:
        step = max(range(num_steps), key=lambda s: (load[s], -s))
        pick = next(i for i in left if items[i].first <= step <= items[i].last)
        left.remove(pick)
        order.append(pick)
        for s in range(items[pick].first, items[pick].last + 1):
            load[s] -= items[pick].nbytes
    return order


Heuristic = Callable[[Sequence[Item], list[list[int]]], dict[str, int]]
ORDERS = {"size": _order_size, "conflicts": _order_conflicts, "lifetime": _order_lifetime,
          "duration": _order_duration, "area": _order_area, "pressure": _order_pressure,
          "pressure_duration": _order_pressure_duration}


def _heuristic(order_name: str, best: bool) -> Heuristic:
    def run(items: Sequence[Item], adj: list[list[int]] | None) -> dict[str, int]:
        if order_name in SWEEP_ORDERS:
            return _sweep_fit(items, ORDERS[order_name](items, adj), best)
        return _fit(items, ORDERS[order_name](items, adj), adj, best)
    run.__name__ = f"{order_name}_{'best' if best else 'first'}_fit"
    return run


# orders by first step, placed by the O(n log n) sweep (no conflict graph needed)
SWEEP_ORDERS = ("lifetime",)
# Above this many overlapping buffer pairs (deep chains: the conflict graph grows as the square of
# the depth) only the sweep heuristics run, so planning stays O(n log n) in time and O(n) in
# memory. The zoo's largest plans (ResNetE-18 / Bi-Real-18, proposed) have ~11,000.
MAX_CONFLICT_PAIRS = 100_000

# name -> heuristic; plan_arena runs them in name order
HEURISTICS: dict[str, Heuristic] = {
    f"{o}_{fit}_fit": _heuristic(o, fit == "best") for o in ORDERS for fit in ("best", "first")}


# The refinement (`_refine`) runs where the heuristics stay below this efficiency, on plans of at
# most REFINE_MAX_ITEMS buffers, with at most REFINE_FITS placements in all.
REFINE_BELOW = 0.99
REFINE_MAX_ITEMS = 400
REFINE_FITS = 2000


def _refine(items: Sequence[Item], adj: list[list[int]], reachable: int,
            names: Sequence[str]) -> tuple[str, dict[str, int], int]:
    """A local search on the heuristics' orders, best first: move one buffer to the front of the
    order, keep the move when the arena shrinks; sweeps over the positions until none helps, the
    lower bound is reached or REFINE_FITS placements are spent. Deterministic (fixed orders).
    Returns (name "refined_<heuristic>", offsets, size) of the smallest arena found."""
    budget = REFINE_FITS
    best = ("", {}, -1)
    for name in names:
        order_name, fit = name.rsplit("_", 2)[0], name.rsplit("_", 2)[1] == "best"
        if order_name in SWEEP_ORDERS:
            continue
        order = list(ORDERS[order_name](items, adj))

        def place(o: list[int]) -> tuple[dict[str, int], int]:
            off = _fit(items, o, adj, fit)
            return off, max((off[it.name] + it.nbytes for it in items), default=0)

        offsets, size = place(order)
        budget -= 1
        improved = True
        while improved and size > reachable and budget > 0:
            improved = False
            for k in range(1, len(order)):
                if budget <= 0 or size == reachable:
                    break
                cand = [order[k]] + order[:k] + order[k + 1:]
                off, sz = place(cand)
                budget -= 1
                if sz < size:
                    order, offsets, size, improved = cand, off, sz, True
        if best[2] < 0 or size < best[2]:
            best = (f"refined_{name}", offsets, size)
        if size == reachable or budget <= 0:
            break
    return best


def plan_arena(liveness: Liveness, *, align: int = 16, heuristics: Sequence[str] | None = None,
               guard_bytes: int = 0) -> ArenaPlan:
    """Offsets for every buffer of `liveness` in one arena (the smallest the heuristics find) and
    in the state region; the result has passed `check_plan`. `guard_bytes` > 0 (rounded up to
    `align`) surrounds every arena buffer with that many canary bytes on each side."""
    if not isinstance(align, int) or isinstance(align, bool) or align < 1 or align & (align - 1):
        raise PlanError(f"alignment {align!r} is not a power of two; use e.g. --align 16")
    names = sorted(HEURISTICS) if heuristics is None else list(heuristics)
    unknown = [h for h in names if h not in HEURISTICS]
    if unknown or not names:
        raise PlanError(f"unknown planner heuristic(s) {', '.join(unknown) or '(none given)'}; "
                        f"choose from: {', '.join(sorted(HEURISTICS))}")

    if not isinstance(guard_bytes, int) or isinstance(guard_bytes, bool) or guard_bytes < 0:
        raise PlanError(f"guard size {guard_bytes!r} is not a byte count >= 0")
    guard = align_up(guard_bytes, align)
    bare = [Item(b.name, align_up(b.nbytes, align), b.first, b.last) for b in liveness.buffers]
    lower = max(live_bytes(bare, liveness.num_steps), default=0)
    items = [Item(it.name, it.nbytes + 2 * guard, it.first, it.last) for it in bare]
    reachable = max(live_bytes(items, liveness.num_steps), default=0)
    if heuristics is None and conflict_pairs(items) > MAX_CONFLICT_PAIRS:
        names = [h for h in names if h.split("_")[0] in SWEEP_ORDERS]
    adj = (None if all(h.split("_")[0] in SWEEP_ORDERS for h in names) else _conflicts(items))
    size_of = {it.name: it.nbytes for it in items}

    tried: dict[str, int] = {}
    best_name, best_offsets, best_size = "", {}, -1
    for name in names:
        offsets = HEURISTICS[name](items, adj)
        size = max((off + size_of[b] for b, off in offsets.items()), default=0)
        tried[name] = size
        if best_size < 0 or size < best_size:
            best_name, best_offsets, best_size = name, offsets, size
        if size == reachable:
            break
    if heuristics is None and adj is not None and reachable < REFINE_BELOW * best_size \
            and len(items) <= REFINE_MAX_ITEMS:
        name, offsets, size = _refine(items, adj, reachable, sorted(tried, key=tried.get))
        tried[name] = size
        if size < best_size:
            best_name, best_offsets, best_size = name, offsets, size

    state_offsets: dict[str, int] = {}
    top, frozen_start = 0, None
    for b in sorted(liveness.state, key=lambda b: b.role is Role.FROZEN):    # stable
        if b.role is Role.FROZEN and frozen_start is None:
            frozen_start = top
        state_offsets[b.name] = top
        top += align_up(b.nbytes, align)
    frozen = 0 if frozen_start is None else top - frozen_start

    # a heuristic placed each buffer's whole item; its bytes start after the front guard
    best_offsets = {b: off + guard for b, off in best_offsets.items()}
    guards = tuple(
        Guard(b.name, b.tensors, best_offsets[b.name] - guard, best_offsets[b.name],
              best_offsets[b.name] + b.nbytes,
              best_offsets[b.name] + align_up(b.nbytes, align) + guard, b.first, b.last)
        for b in liveness.buffers) if guard else ()

    tensor_offsets: dict[str, tuple[str, int]] = {}
    for tensor, buf in liveness.buffer_of.items():
        if buf in best_offsets:
            tensor_offsets[tensor] = ("arena", best_offsets[buf])
        elif buf in state_offsets:
            tensor_offsets[tensor] = ("state", state_offsets[buf])
        else:
            tensor_offsets[tensor] = ("caller", 0)

    plan = ArenaPlan(
        align=align, arena_nbytes=best_size, lower_bound=lower, heuristic=best_name,
        offsets={b.name: best_offsets[b.name] for b in liveness.buffers},
        state_nbytes=top, state_offsets=state_offsets, tensor_offsets=tensor_offsets, tried=tried,
        guard_bytes=guard, guards=guards, frozen_nbytes=frozen)
    check_plan(liveness, plan)
    return plan


def plan_schedule(schedule: Schedule, *, align: int = 16, io: str = "arena",
                  guard_bytes: int = 0) -> tuple[Liveness, ArenaPlan]:
    """Liveness and arena plan of a schedule, both verified (check_liveness, check_plan)."""
    live = compute_liveness(schedule, io=io)
    check_liveness(schedule, live)
    return live, plan_arena(live, align=align, guard_bytes=guard_bytes)
