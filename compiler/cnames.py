"""C names of a program's tensors: one pointer macro per tensor of the arena plan.

`T_<name>` points into the arena, `S_<name>` into the training state, with the tensor's C element
type: `fc1.out` -> `T_fc1_out`, `fc1.W.m` -> `S_fc1_W_m`. Every character of the tensor name that
is not a letter or digit becomes `_`; should two tensors map to the same name, the later one (in
schedule order) gets the first free suffix `_2`, `_3`, ..., so the mapping is deterministic and
collision-free. Tensor names are bnnc's (`ir.tname`), never ONNX text.
"""

from __future__ import annotations

import re
from typing import Iterable

from .schedule_ir import Schedule

_NOT_IDENT = re.compile(r"[^A-Za-z0-9]")
REGION_PREFIX = {"arena": "T_", "state": "S_"}


def tensor_macros(placed: Iterable[tuple[str, str]]) -> dict[str, str]:
    """(tensor name, region) pairs in schedule order -> tensor name -> macro name.

    >>> tensor_macros([("fc1.out", "arena"), ("fc1.W.m", "state"), ("fc1_out", "arena")])
    {'fc1.out': 'T_fc1_out', 'fc1.W.m': 'S_fc1_W_m', 'fc1_out': 'T_fc1_out_2'}
    """
    out: dict[str, str] = {}
    taken: set[str] = set()
    for name, region in placed:
        base = REGION_PREFIX[region] + _NOT_IDENT.sub("_", name)
        macro, k = base, 1
        while macro in taken:
            k += 1
            macro = f"{base}_{k}"
        taken.add(macro)
        out[name] = macro
    return out


def placed_tensors(schedule: Schedule, plan) -> list[tuple[str, str]]:
    """(name, region) of every schedule tensor the plan places in the arena or the state, in
    schedule order: what `tensor_macros` names."""
    return [(name, plan.tensor_offsets[name][0]) for name in schedule.tensors
            if plan.tensor_offsets.get(name, ("",))[0] in REGION_PREFIX]
