"""Deep chains plan in O(n log n) (issue 17, D8): the sweep fit gives exactly the conflict-graph
fit's offsets, deep chains never build the quadratic conflict graph, and the rewritten verifier
still catches every overlap. (Times are a benchmark: `python benchmarks/plan_scale.py`.)"""

from __future__ import annotations

import dataclasses
import random
import sys
from pathlib import Path

import pytest

from bnnc.compiler import planner
from bnnc.compiler.config import make_config
from bnnc.compiler.errors import PlanError
from bnnc.compiler.frontend import load_model
from bnnc.compiler.liveness import compute_liveness
from bnnc.compiler.plan_check import check_liveness, check_plan
from bnnc.compiler.planner import (Item, _conflicts, _fit, _order_lifetime, _sweep_fit,
                                   conflict_pairs, plan_arena)
from bnnc.compiler.schedule import build_schedule

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from plan_scale import chain_model  # noqa: E402


def _random_items(seed: int) -> list[Item]:
    rng = random.Random(seed)
    steps = rng.randint(1, 30)
    items = []
    for k in range(rng.randint(0, 40)):
        f = rng.randrange(steps)
        last = rng.randint(f, min(steps - 1, f + rng.choice([0, 1, 3, 30])))
        items.append(Item(f"b{k}", 16 * rng.randint(1, 8), f, last))
    return items


def test_sweep_fit_equals_the_conflict_graph_fit():
    for seed in range(600):
        items = _random_items(seed)
        adj = _conflicts(items)
        assert conflict_pairs(items) == sum(map(len, adj)) // 2
        order = _order_lifetime(items, adj)
        for best in (False, True):
            assert _sweep_fit(items, order, best) == _fit(items, order, adj, best), (seed, best)


def _deep(depth: int, kind: str = "relu"):
    sched = build_schedule(load_model(chain_model(depth, kind)), make_config("proposed", batch=4))
    return sched, compute_liveness(sched)


def test_deep_chain_plans_without_the_conflict_graph(monkeypatch):
    sched, live = _deep(600)
    check_liveness(sched, live)

    def quadratic(*_a, **_k):
        raise AssertionError("the O(n^2) conflict graph was built for a deep chain")
    monkeypatch.setattr(planner, "_conflicts", quadratic)
    plan = plan_arena(live)            # checked by check_plan inside
    assert plan.heuristic.startswith("lifetime_")
    assert plan.efficiency > 0.9


def test_verifier_sweep_still_catches_overlaps_in_a_deep_plan():
    sched, live = _deep(120, "binary")
    plan = plan_arena(live)
    check_plan(live, plan)
    rng = random.Random(1)
    caught = 0
    for _ in range(30):
        a, b = rng.sample(list(live.buffers), 2)
        if a.last < b.first or b.last < a.first:
            continue
        offsets = dict(plan.offsets)
        offsets[b.name] = offsets[a.name]          # two time-overlapping buffers on one byte
        with pytest.raises(PlanError, match="overlap"):
            check_plan(live, dataclasses.replace(plan, offsets=offsets))
        caught += 1
    assert caught > 5


def test_zoo_sized_plans_still_try_every_heuristic():
    sched, live = _deep(20)
    assert len(plan_arena(live).tried) >= 1
    items = [Item(b.name, b.nbytes, b.first, b.last) for b in live.buffers]
    assert conflict_pairs(items) < planner.MAX_CONFLICT_PAIRS
