"""Liveness: `compute_liveness(schedule, *, io="arena") -> Liveness`, the live interval of every
tensor of one training step, grouped into the storage *buffers* the planner places.

Input: a verified `schedule_ir.Schedule`. Output: frozen records. Step indices are the schedule's;
an interval `[first, last]` is inclusive at both ends.

Rules:
- A tensor lives from the step that writes it to the last step that reads it (`[w, w]` when nothing
  reads it, e.g. the loss). A step reads its inputs while it writes its outputs, so a tensor that
  dies at step s and one born at step s are both live at s and never share bytes -- unless the step
  declares them in-place.
- INPUT and LABEL tensors (the batch) live from step 0. With `io="arena"` (the default) the
  train-step entry copies the caller's batch into the arena before the first kernel runs, so it
  counts against the arena like any activation and the caller's pointers are not retained (a
  step may write in place over that copy where it dies, e.g. an input scaling). With
  `io="caller"` the kernels read the caller's buffers in place: the batch forms the `io` region
  (one buffer per tensor plus its views, never planned, never written: no in-place over it), which
  is how the paper's spreadsheet counts the real first-layer input ("kept as given").
- Persistent roles (PARAM, OPT_STATE, BN_STAT) live for the whole program. They form the separate
  `state` region, one buffer per tensor, in schedule order; the arena never holds them.
- A view (`Tensor.alias_of`) has no storage: it joins its base's buffer and extends the buffer's
  life to its own last read.
- In-place: for each `(out, in)` pair a step declares (`Step.inplace`), `out` joins `in`'s buffer
  when that buffer dies at this step: every tensor already in it is written before the step and read
  for the last time at the latest by it. Pairs are taken in step order and, within a step, in
  declared order, so when two outputs claim the same input the first one wins and the second gets
  its own buffer. A buffer's size is the largest of its members'.
- Tensors no step touches are not placed; they are listed in `Liveness.unused`.

Invariants (`Liveness.verify()`): buffer names are unique and equal to one of their tensors (the
member that owns the storage first); every placed tensor is in exactly one buffer; a buffer's
interval covers its members' intervals; arena buffers are sorted by (first, name).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from .errors import PlanError
from .schedule_ir import Role, Schedule

IO_MODES = ("arena", "caller")   # where the batch (INPUT and LABEL tensors) lives


@dataclass(frozen=True)
class Buffer:
    name: str                 # the member that owns the storage first: "fc1.out"
    nbytes: int               # exact (unaligned) storage bytes: the largest member's
    first: int                # step index, inclusive
    last: int                 # step index, inclusive
    tensors: tuple[str, ...]  # members in order of first use (views and in-place outputs included)
    role: Role                # role of the member that holds the storage for the most steps

    @property
    def steps(self) -> int:
        return self.last - self.first + 1


@dataclass(frozen=True)
class Liveness:
    num_steps: int
    buffers: tuple[Buffer, ...]                  # arena, sorted by (first, name)
    state: tuple[Buffer, ...]                    # persistent tensors, schedule order, whole program
    # (io, the caller's batch buffers under io="caller", comes last so records build positionally)
    intervals: Mapping[str, tuple[int, int]] = field(default_factory=dict)  # every placed tensor
    buffer_of: Mapping[str, str] = field(default_factory=dict)  # tensor -> arena/state buffer name
    unused: tuple[str, ...] = ()
    io: tuple[Buffer, ...] = ()                  # the caller's batch (io="caller"), schedule order

    def live_at(self, step: int) -> list[Buffer]:
        """Arena buffers live at `step`, in buffer order."""
        return [b for b in self.buffers if b.first <= step <= b.last]

    def verify(self) -> None:
        """Raise AssertionError on a broken invariant (a bnnc bug, not a user error)."""
        names = [b.name for b in self.buffers + self.state + self.io]
        assert len(names) == len(set(names)), "duplicate buffer names"
        members: set[str] = set()
        for b in self.buffers + self.state + self.io:
            assert b.nbytes > 0 and 0 <= b.first <= b.last < max(self.num_steps, 1), b
            assert b.name == b.tensors[0], f"buffer {b.name} is not named after its first member"
            for t in b.tensors:
                assert t not in members, f"{t} is in two buffers"
                members.add(t)
                assert self.buffer_of[t] == b.name, t
                lo, hi = self.intervals[t]
                assert b.first <= lo <= hi <= b.last, f"{t} [{lo}, {hi}] outside buffer {b}"
        assert members == set(self.buffer_of) == set(self.intervals), "tensor maps disagree"
        keys = [(b.first, b.name) for b in self.buffers]
        assert keys == sorted(keys), "arena buffers are not sorted by (first, name)"


def compute_liveness(schedule: Schedule, *, io: str = "arena") -> Liveness:
    """The live interval of every tensor of `schedule` and the buffers the planner must place;
    `io` says where the batch lives ("arena": copied in by the entry; "caller": read in place)."""
    if io not in IO_MODES:
        raise PlanError(f"unknown batch placement io={io!r}; choose one of: {', '.join(IO_MODES)}")
    schedule.verify()
    tensors = schedule.tensors
    n = len(schedule.steps)
    last_step = max(n - 1, 0)

    written: dict[str, int] = {}
    read_last: dict[str, int] = {}
    for s in schedule.steps:
        for t in s.outputs:
            written.setdefault(t, s.index)
        for t in s.inputs:
            read_last[t] = s.index

    order = {name: i for i, name in enumerate(tensors)}
    touched = set(written) | set(read_last)
    # storage is used when the tensor or any view of it is touched
    stored = {tensors[t].alias_of or t for t in touched}
    state_names = [t.name for t in tensors.values()
                   if t.role.persistent and t.alias_of is None and t.name in stored]
    state_set = set(state_names)

    # born = the step that writes the storage; the entry fills INPUT/LABEL before step 0
    born: dict[str, int] = {}
    intervals: dict[str, tuple[int, int]] = {}
    unused: list[str] = []
    for t in tensors.values():
        base = t.alias_of or t.name
        if t.name not in stored and (t.alias_of is None or t.name not in touched):
            unused.append(t.name)
            continue
        role = tensors[base].role
        if base in state_set:
            born[t.name] = -1
            intervals[t.name] = (0, last_step)
            continue
        born[t.name] = -1 if role in (Role.INPUT, Role.LABEL) else written[base]
        first = max(born[t.name], 0)
        intervals[t.name] = (first, max(first, read_last.get(t.name, first)))

    # union-find over storage: a view joins its base, an in-place output joins its input's buffer
    parent: dict[str, str] = {name: name for name in intervals}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    group: dict[str, list[str]] = {name: [name] for name in parent}
    io_set = ({name for name in parent if tensors[name].alias_of is None
               and tensors[name].role in (Role.INPUT, Role.LABEL)} if io == "caller" else set())
    # per root: (earliest birth, latest birth, latest last read) of its members, kept up to date by
    # union, so the in-place test below is O(1) instead of a walk over a growing group
    agg: dict[str, tuple[int, int, int]] = {
        name: (born[name], born[name], intervals[name][1]) for name in parent}

    def union(keep: str, absorb: str) -> None:
        parent[absorb] = keep
        # the smaller member list moves: a long in-place chain stays linear
        if len(group[keep]) < len(group[absorb]):
            group[keep], group[absorb] = group[absorb], group[keep]
        group[keep] += group.pop(absorb)
        a, b = agg[keep], agg.pop(absorb)
        agg[keep] = (min(a[0], b[0]), max(a[1], b[1]), max(a[2], b[2]))

    for name in list(parent):
        base = tensors[name].alias_of
        if base is not None:
            assert base in parent, f"view {name} of unplaced tensor {base}"
            ra, rb = find(base), find(name)
            if ra != rb:
                union(ra, rb)

    fixed = state_set | io_set
    for s in schedule.steps:
        for out, inp in s.inplace:
            r_in, r_out = find(inp), find(out)
            if r_in == r_out or r_in in fixed or r_out in fixed:
                # persistent tensors are updated in place by their kernel, not planned; the
                # caller's batch is read-only
                continue
            _, born_max, last_max = agg[r_in]
            dies_here = born_max < s.index and last_max <= s.index
            fresh = agg[r_out][0] == agg[r_out][1] == s.index
            if dies_here and fresh:
                union(r_in, r_out)

    arena: list[Buffer] = []
    state: list[Buffer] = []
    io_bufs: list[Buffer] = []
    buffer_of: dict[str, str] = {}
    for root, members in group.items():
        # the owner of the storage comes first; its views follow it
        members = sorted(members,
                         key=lambda m: (born[m], tensors[m].alias_of is not None, order[m]))
        owners = [m for m in members if tensors[m].alias_of is None]
        holder = max(owners, key=lambda m: (intervals[m][1] - intervals[m][0], -born[m], -order[m]))
        buf = Buffer(
            name=members[0],
            nbytes=max(tensors[m].nbytes for m in members),
            first=min(intervals[m][0] for m in members),
            last=max(intervals[m][1] for m in members),
            tensors=tuple(members),
            role=tensors[holder].role)
        (state if root in state_set else io_bufs if root in io_set else arena).append(buf)
        for m in members:
            buffer_of[m] = buf.name
    arena.sort(key=lambda b: (b.first, b.name))
    state.sort(key=lambda b: order[b.name])
    io_bufs.sort(key=lambda b: order[b.name])
    live = Liveness(n, tuple(arena), tuple(state), intervals, buffer_of, tuple(unused),
                    tuple(io_bufs))
    live.verify()
    return live
