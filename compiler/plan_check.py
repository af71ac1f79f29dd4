"""The independent verifier of memory plans: `check_plan(liveness, plan)` and
`check_liveness(schedule, liveness)`, both raising `PlanError` on the first violation found.

Input: the planner's input and output (and, for `check_liveness`, the schedule the liveness came
from). Output: None, or a PlanError naming the buffers/tensors, steps and byte ranges involved.

What `check_plan` guarantees when it returns:
- the alignment is a power of two and every offset is a non-negative multiple of it;
- every arena buffer has exactly one offset and lies inside [0, arena_nbytes); same for the state
  region;
- no two arena buffers live at a common step share a byte (state buffers never share a byte);
- the stated lower bound is the real maximum of aligned live bytes over the steps, and <=
  arena_nbytes;
- every tensor the liveness places has a location, equal to its buffer's region and offset;
- buffers left in the caller's memory (liveness io="caller") hold the batch only, at ("caller", 0).

`check_liveness` re-derives from the schedule when each tensor is written and read, and checks that
every access falls inside its buffer's interval and that two storage-owning tensors of one buffer
are never live at the same step except at a step that declares them an in-place pair.

This module deliberately shares no code with planner.py or liveness.py (it reads only their record
fields): a bug in a planner helper must not hide itself. Overlap is found by a per-step sweep over
buffers sorted by offset, not by the planner's gap search.
"""

from __future__ import annotations

from .errors import PlanError
from .schedule_ir import Role


def check_plan(liveness, plan) -> None:
    """Raise PlanError unless `plan` is a valid placement of `liveness` (see module docstring)."""
    align = plan.align
    if not isinstance(align, int) or align < 1 or (align & (align - 1)) != 0:
        raise PlanError(f"plan alignment {align!r} is not a power of two")
    _check_region("arena", liveness.buffers, plan.offsets, plan.arena_nbytes, align)
    _check_region("state", liveness.state, plan.state_offsets, plan.state_nbytes, align)
    frozen = [b for b in liveness.state if b.role is Role.FROZEN]
    tail = min((plan.state_offsets[b.name] for b in frozen), default=plan.state_nbytes)
    if plan.state_nbytes - tail != plan.frozen_nbytes or any(
            plan.state_offsets[b.name] >= tail for b in liveness.state if b.role is not Role.FROZEN):
        raise PlanError(f"the frozen parameters are not the state's tail of {plan.frozen_nbytes} "
                        f"bytes")

    steps = max(liveness.num_steps, 1)
    live: list[list] = [[] for _ in range(steps)]
    for b in liveness.buffers:
        if not 0 <= b.first <= b.last < steps:
            raise PlanError(f"arena buffer '{b.name}' has interval [{b.first}, {b.last}] outside "
                            f"the {liveness.num_steps} steps of the schedule")
        for s in range(b.first, b.last + 1):
            live[s].append(b)
    worst = 0
    for s, bufs in enumerate(live):
        bufs = sorted(bufs, key=lambda b: (plan.offsets[b.name], b.name))
        end, owner = 0, None
        for b in bufs:
            off = plan.offsets[b.name]
            if owner is not None and off < end:
                raise PlanError(
                    f"arena buffers '{owner.name}' (steps {owner.first}-{owner.last}, bytes "
                    f"[{plan.offsets[owner.name]}, {end})) and '{b.name}' (steps "
                    f"{b.first}-{b.last}, bytes [{off}, {off + b.nbytes})) overlap at step {s}")
            if off + b.nbytes > end:
                end, owner = off + b.nbytes, b
        worst = max(worst, sum(-(-b.nbytes // align) * align for b in bufs))
    if plan.lower_bound != worst:
        raise PlanError(f"plan states a lower bound of {plan.lower_bound} bytes but the live bytes "
                        f"peak at {worst}")
    if plan.arena_nbytes < worst:
        raise PlanError(f"arena of {plan.arena_nbytes} bytes is below the lower bound {worst}")

    for b in liveness.io:
        if b.role not in (Role.INPUT, Role.LABEL):
            raise PlanError(f"caller buffer '{b.name}' holds a {b.role.value}; only the batch "
                            f"(input, labels) may live outside the arena")
    state_names = {b.name for b in liveness.state}
    io_names = {b.name for b in liveness.io}
    for tensor, buf in liveness.buffer_of.items():
        if tensor not in plan.tensor_offsets:
            raise PlanError(f"tensor '{tensor}' (buffer '{buf}') has no location in the plan")
        region, off = plan.tensor_offsets[tensor]
        if buf in state_names:
            want = ("state", plan.state_offsets[buf])
        elif buf in io_names:
            want = ("caller", 0)
        else:
            want = ("arena", plan.offsets[buf])
        if (region, off) != want:
            raise PlanError(f"tensor '{tensor}' is placed at {region}+{off} but its buffer "
                            f"'{buf}' is at {want[0]}+{want[1]}")
    extra = sorted(set(plan.tensor_offsets) - set(liveness.buffer_of))
    if extra:
        raise PlanError(f"plan places tensor(s) the liveness does not know: {', '.join(extra[:5])}")


def _check_region(region: str, buffers, offsets, size: int, align: int) -> None:
    names = [b.name for b in buffers]
    missing = [n for n in names if n not in offsets]
    if missing:
        raise PlanError(f"{region} buffer(s) without an offset: {', '.join(missing[:5])}")
    extra = sorted(set(offsets) - set(names))
    if extra:
        raise PlanError(f"{region} offsets for unknown buffer(s): {', '.join(extra[:5])}")
    for b in buffers:
        off = offsets[b.name]
        if not isinstance(off, int) or off < 0:
            raise PlanError(f"{region} buffer '{b.name}' has offset {off!r}; offsets are byte "
                            f"counts >= 0")
        if off % align:
            raise PlanError(f"{region} buffer '{b.name}' at offset {off} is not {align}-byte "
                            f"aligned")
        if off + b.nbytes > size:
            raise PlanError(f"{region} buffer '{b.name}' (bytes [{off}, {off + b.nbytes})) does "
                            f"not fit the {region} of {size} bytes")
    if region == "state":
        prev_end, prev = 0, None
        for b in sorted(buffers, key=lambda b: (offsets[b.name], b.name)):
            if prev is not None and offsets[b.name] < prev_end:
                raise PlanError(f"state buffers '{prev}' and '{b.name}' overlap at byte "
                                f"{offsets[b.name]}")
            if offsets[b.name] + b.nbytes > prev_end:
                prev_end, prev = offsets[b.name] + b.nbytes, b.name


def check_liveness(schedule, liveness) -> None:
    """Raise PlanError unless `liveness` covers every access of `schedule` and only merges tensors
    that are never live together (except at a declared in-place step)."""
    tensors = schedule.tensors
    accesses: dict[str, list[int]] = {}
    for step in schedule.steps:
        for t in step.inputs + step.outputs:
            accesses.setdefault(t, []).append(step.index)
    buffers = {b.name: b for b in liveness.buffers + liveness.state + liveness.io}
    io_names = {b.name for b in liveness.io}
    for t, steps in accesses.items():
        if t not in liveness.buffer_of:
            raise PlanError(f"tensor '{t}' is used by step {steps[0]} but has no buffer")
        b = buffers[liveness.buffer_of[t]]
        if not b.first <= min(steps) <= max(steps) <= b.last:
            raise PlanError(f"tensor '{t}' is used at steps {min(steps)}-{max(steps)} but its "
                            f"buffer '{b.name}' lives only at {b.first}-{b.last}")
        role = tensors[tensors[t].alias_of or t].role
        if role.persistent != (b.name in {s.name for s in liveness.state}):
            raise PlanError(f"tensor '{t}' ({role.value}) is in the wrong region")
        if b.name in io_names and role not in (Role.INPUT, Role.LABEL):
            raise PlanError(f"tensor '{t}' ({role.value}) would be written into the caller's "
                            f"batch buffer '{b.name}'")

    # a storage owner lives from its write (0 for the batch copied in by the entry) to its last use,
    # extended by the uses of its views
    span: dict[str, list[int]] = {}
    for t, steps in accesses.items():
        owner = tensors[t].alias_of or t
        lo, hi = min(steps), max(steps)
        if tensors[owner].role in (Role.INPUT, Role.LABEL):
            lo = 0
        cur = span.setdefault(owner, [lo, hi])
        cur[0], cur[1] = min(cur[0], lo), max(cur[1], hi)
    inplace_at = {(out, inp): st.index for st in schedule.steps for out, inp in st.inplace}
    for b in liveness.buffers:
        owners = [t for t in b.tensors if tensors[t].alias_of is None and t in span]
        for i, a in enumerate(owners):
            for c in owners[i + 1:]:
                lo = max(span[a][0], span[c][0])
                hi = min(span[a][1], span[c][1])
                if lo > hi:
                    continue
                declared = any(inplace_at.get((x, y)) == lo for x in (a, c) for y in b.tensors)
                if lo != hi or not declared:
                    raise PlanError(f"tensors '{a}' and '{c}' share buffer '{b.name}' but are both "
                                    f"live at steps {lo}-{hi} without an in-place declaration")
