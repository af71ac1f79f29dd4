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

import bisect

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
    for b in liveness.buffers:
        if not 0 <= b.first <= b.last < steps:
            raise PlanError(f"arena buffer '{b.name}' has interval [{b.first}, {b.last}] outside "
                            f"the {liveness.num_steps} steps of the schedule")
    _check_disjoint(liveness.buffers, plan.offsets)
    # aligned live bytes per step from a difference array: O(buffers + steps)
    delta = [0] * (steps + 1)
    for b in liveness.buffers:
        n = -(-b.nbytes // align) * align
        delta[b.first] += n
        delta[b.last + 1] -= n
    worst = acc = 0
    for d in delta[:steps]:
        acc += d
        worst = max(worst, acc)
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


def _check_disjoint(buffers, offsets) -> None:
    """No two buffers live at a common step share a byte. A sweep over the steps keeps the live
    buffers ordered by offset (a valid plan keeps them disjoint, so each newcomer only needs
    comparing with its two neighbours): O(n log n) comparisons, O(n) memory."""
    starts = sorted(buffers, key=lambda b: (b.first, b.name))
    ends = sorted(buffers, key=lambda b: (b.last, b.name))
    live_keys: list[tuple[int, str]] = []            # (offset, name), sorted
    live_buf: dict[str, object] = {}
    e = 0
    for b in starts:
        while e < len(ends) and ends[e].last < b.first:
            gone = ends[e]
            e += 1
            k = bisect.bisect_left(live_keys, (offsets[gone.name], gone.name))
            del live_keys[k]
            del live_buf[gone.name]
        off = offsets[b.name]
        key = (off, b.name)
        k = bisect.bisect_left(live_keys, key)
        for j in (k - 1, k):
            if 0 <= j < len(live_keys):
                other = live_buf[live_keys[j][1]]
                o_off = live_keys[j][0]
                if o_off < off + b.nbytes and off < o_off + other.nbytes:
                    lo, hi = sorted(((o_off, other), (off, b)), key=lambda x: (x[0], x[1].name))
                    step = max(b.first, other.first)
                    raise PlanError(
                        f"arena buffers '{lo[1].name}' (steps {lo[1].first}-{lo[1].last}, bytes "
                        f"[{lo[0]}, {lo[0] + lo[1].nbytes})) and '{hi[1].name}' (steps "
                        f"{hi[1].first}-{hi[1].last}, bytes [{hi[0]}, {hi[0] + hi[1].nbytes})) "
                        f"overlap at step {step}")
        live_keys.insert(k, key)
        live_buf[b.name] = b


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
    state_names = {b.name for b in liveness.state}
    for t, steps in accesses.items():
        if t not in liveness.buffer_of:
            raise PlanError(f"tensor '{t}' is used by step {steps[0]} but has no buffer")
        b = buffers[liveness.buffer_of[t]]
        if not b.first <= min(steps) <= max(steps) <= b.last:
            raise PlanError(f"tensor '{t}' is used at steps {min(steps)}-{max(steps)} but its "
                            f"buffer '{b.name}' lives only at {b.first}-{b.last}")
        role = tensors[tensors[t].alias_of or t].role
        if role.persistent != (b.name in state_names):
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
    # (out, in) in-place pairs by step: an output and an input of one buffer may both be live at
    # the single step that declares the pair
    inplace_at: dict[str, set[int]] = {}
    for st in schedule.steps:
        for out, inp in st.inplace:
            inplace_at.setdefault(out, set()).add(st.index)
            inplace_at.setdefault(inp, set()).add(st.index)
    for b in liveness.buffers:
        owners = sorted((t for t in b.tensors if tensors[t].alias_of is None and t in span),
                        key=lambda t: (span[t][0], span[t][1], t))
        # sweep in order of first use; `active` holds the owners still live, which a valid buffer
        # keeps to the one or two around an in-place step, so the check is O(k log k)
        active: list[str] = []
        members = set(b.tensors) if len(owners) > 1 else set()
        for c in owners:
            lo_c = span[c][0]
            active = [a for a in active if span[a][1] >= lo_c]
            for a in active:
                lo = max(span[a][0], lo_c)
                hi = min(span[a][1], span[c][1])
                declared = any(lo in inplace_at.get(x, ()) and _paired(schedule, x, members, lo)
                               for x in (a, c))
                if lo != hi or not declared:
                    raise PlanError(f"tensors '{a}' and '{c}' share buffer '{b.name}' but are both "
                                    f"live at steps {lo}-{hi} without an in-place declaration")
            active.append(c)


def _paired(schedule, x: str, members, step: int) -> bool:
    """Whether step `step` declares `x` the in-place output of one of `members` (the rule the
    liveness applies)."""
    return any(out == x and inp in members for out, inp in schedule.steps[step].inplace)
