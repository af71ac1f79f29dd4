"""The arena planner and its independent verifier, on hand-made buffers with offsets worked out by
hand (TFLM's TestGreedyMedium case among them), broken plans the verifier must reject, determinism,
and the efficiency target on zoo-sized schedules."""

from __future__ import annotations

import dataclasses
import json

import pytest

from bnnc.compiler.errors import PlanError
from bnnc.compiler.liveness import Buffer, Liveness, compute_liveness
from bnnc.compiler.plan_check import check_liveness, check_plan
from bnnc.compiler.planner import HEURISTICS, Item, _conflicts, plan_arena
from bnnc.compiler.schedule_ir import Role


def _liveness(spec: dict[str, tuple[int, int, int]]) -> Liveness:
    """spec: name -> (nbytes, first, last); one tensor per buffer."""
    bufs = sorted((Buffer(n, s, f, l, (n,), Role.SCRATCH) for n, (s, f, l) in spec.items()),
                  key=lambda b: (b.first, b.name))
    steps = max(b.last for b in bufs) + 1
    return Liveness(steps, tuple(bufs), (), {b.name: (b.first, b.last) for b in bufs},
                    {b.name: b.name for b in bufs})


def _run(name: str, live: Liveness, align: int = 1) -> dict[str, int]:
    items = [Item(b.name, -(-b.nbytes // align) * align, b.first, b.last) for b in live.buffers]
    return HEURISTICS[name](items, _conflicts(items))


# TFLM greedy_memory_planner_test.cc TestGreedyMedium: buffers 0..4
MEDIUM = {"b0": (10, 0, 1), "b1": (20, 1, 2), "b2": (30, 2, 3), "b3": (40, 3, 4), "b4": (50, 0, 1)}


def test_size_first_fit_is_tflm_greedy():
    # TFLM's expected offsets: 50, 70, 40, 0, 0 and an arena of 90
    assert _run("size_first_fit", _liveness(MEDIUM)) == {"b0": 50, "b1": 70, "b2": 40, "b3": 0,
                                                         "b4": 0}


def test_plan_arena_beats_tflm_on_medium_and_reaches_the_bound():
    live = _liveness(MEDIUM)
    plan = plan_arena(live, align=1)
    # step 1 holds b0 + b1 + b4 = 80 bytes: nothing smaller exists, and 80 is reachable
    # (b4 0, b0 50, b1 60, b2 0, b3 30), which a lifetime-ordered fit finds
    assert plan.lower_bound == 80 and plan.arena_nbytes == 80 and plan.efficiency == 1.0
    assert plan.heuristic == "lifetime_best_fit"
    assert plan.offsets == {"b0": 50, "b1": 60, "b2": 0, "b3": 30, "b4": 0}
    # heuristics run in name order and stop at the bound; on these buffers the area (bytes x steps)
    # and duration orders (all live 2 steps, then largest first) coincide with TFLM's size order
    assert plan.tried == {"area_best_fit": 90, "area_first_fit": 90, "conflicts_best_fit": 90,
                          "conflicts_first_fit": 90, "duration_best_fit": 90,
                          "duration_first_fit": 90, "lifetime_best_fit": 80}


# a case where the fits differ; the size order is G, K, H3, H2 (longer life first), H1, N
GAPS = {"G": (75, 6, 6), "K": (50, 4, 4), "H3": (25, 5, 6), "H2": (10, 4, 5), "H1": (10, 5, 5),
        "N": (8, 5, 5)}


def test_first_fit_and_best_fit_by_hand():
    live = _liveness(GAPS)
    # G [0,75); K [0,50); H3 above G: 75; H2 above K and below H3: 50.
    # first fit: H1 takes the lowest gap [0,50) -> 0; N sees H1 [0,10), H2 [50,60), H3 [75,100)
    #   and takes the lowest gap that fits: 10.
    assert _run("size_first_fit", live) == {"G": 0, "K": 0, "H3": 75, "H2": 50, "H1": 0, "N": 10}
    # best fit: H1 sees gaps [0,50) and [60,75) and takes the smaller: 60; N then sees gaps
    #   [0,50) and [70,75) (too small) and takes 0.
    assert _run("size_best_fit", live) == {"G": 0, "K": 0, "H3": 75, "H2": 50, "H1": 60, "N": 0}


def test_alignment_rounds_sizes_and_offsets():
    live = _liveness({"a": (10, 0, 1), "b": (20, 1, 2), "c": (1, 2, 2)})
    plan = plan_arena(live, align=16)
    # aligned sizes 16, 32, 16: step 1 holds a + b = 48, step 2 holds b + c = 48
    assert plan.lower_bound == 48 and plan.arena_nbytes == 48
    assert all(off % 16 == 0 for off in plan.offsets.values())
    assert plan.offsets["a"] != plan.offsets["b"] and plan.offsets["c"] != plan.offsets["b"]


def test_bad_alignment_and_unknown_heuristic():
    live = _liveness(MEDIUM)
    with pytest.raises(PlanError, match="alignment 12 is not a power of two"):
        plan_arena(live, align=12)
    with pytest.raises(PlanError, match="unknown planner heuristic.*nope"):
        plan_arena(live, heuristics=["nope"])


def test_state_region_is_sequential_and_aligned():
    live = _liveness(MEDIUM)
    state = (Buffer("W", 100, 0, 4, ("W",), Role.PARAM),
             Buffer("W.m", 3, 0, 4, ("W.m",), Role.OPT_STATE),
             Buffer("W.v", 3, 0, 4, ("W.v",), Role.OPT_STATE))
    live = dataclasses.replace(
        live, state=state, intervals={**live.intervals, "W": (0, 4), "W.m": (0, 4), "W.v": (0, 4)},
        buffer_of={**live.buffer_of, "W": "W", "W.m": "W.m", "W.v": "W.v"})
    plan = plan_arena(live, align=16)
    assert plan.state_offsets == {"W": 0, "W.m": 112, "W.v": 128} and plan.state_nbytes == 144
    assert plan.tensor_offsets["W.v"] == ("state", 128)
    assert plan.tensor_offsets["b3"] == ("arena", plan.offsets["b3"])


def _person_detection() -> Liveness:
    # TFLM TestPersonDetectionModel: sizes and intervals of the 250 KB MobileNet
    sizes = [9216, 3, 256, 2304, 2304, 2304, 1152, 4608, 4608, 4608, 4608, 4608, 4608, 4608, 4608,
             4608, 4608, 2304, 9216, 9216, 9216, 4608, 18432, 18432, 18432, 9216, 36864, 18432,
             18432]
    times = [(0, 29), (28, 29)] + [(t, t + 1) for t in range(27, -1, -1)]
    return _liveness({f"t{i:02d}": (s, *t) for i, (s, t) in enumerate(zip(sizes, times))})


def test_person_detection_case():
    live = _person_detection()
    plan = plan_arena(live, align=1)
    # brute-force bound, computed here independently of the planner
    bound = max(sum(b.nbytes for b in live.buffers if b.first <= s <= b.last) for s in range(30))
    assert plan.lower_bound == bound == 9216 + 36864 + 18432
    assert plan.arena_nbytes == bound   # TFLM's own greedy needs more than the sum-of-pairs bound


def test_determinism_ten_reruns():
    live = _person_detection()
    first = plan_arena(live, align=16)
    for _ in range(10):
        again = plan_arena(_person_detection(), align=16)
        assert json.dumps(dataclasses.asdict(again), sort_keys=True) == \
            json.dumps(dataclasses.asdict(first), sort_keys=True)


# --- the verifier rejects broken plans -----------------------------------------------------------

def _good():
    live = _liveness(MEDIUM)
    return live, plan_arena(live, align=1)


def test_verifier_accepts_the_planner_output():
    live, plan = _good()
    check_plan(live, plan)


def test_verifier_catches_overlap():
    live, plan = _good()
    # b1 (steps 1-2) moved onto b4 (steps 0-1, bytes [0, 50))
    bad = dataclasses.replace(plan, offsets={**plan.offsets, "b1": 40},
                              tensor_offsets={**plan.tensor_offsets, "b1": ("arena", 40)})
    with pytest.raises(PlanError, match=r"'b4' \(steps 0-1, bytes \[0, 50\)\) and 'b1' .* "
                                        r"overlap at step 1"):
        check_plan(live, bad)


def test_verifier_catches_out_of_bounds():
    live, plan = _good()
    bad = dataclasses.replace(plan, offsets={**plan.offsets, "b3": 50},
                              tensor_offsets={**plan.tensor_offsets, "b3": ("arena", 50)})
    with pytest.raises(PlanError, match=r"'b3' \(bytes \[50, 90\)\) does not fit the arena of 80"):
        check_plan(live, bad)


def test_verifier_catches_misalignment():
    live = _liveness(MEDIUM)
    plan = plan_arena(live, align=16)
    off = plan.offsets["b2"] + 8
    bad = dataclasses.replace(plan, offsets={**plan.offsets, "b2": off},
                              arena_nbytes=max(plan.arena_nbytes, off + 64),
                              tensor_offsets={**plan.tensor_offsets, "b2": ("arena", off)})
    with pytest.raises(PlanError, match=f"'b2' at offset {off} is not 16-byte aligned"):
        check_plan(live, bad)


def test_verifier_catches_missing_buffer_and_tensor():
    live, plan = _good()
    offsets = dict(plan.offsets)
    del offsets["b0"]
    with pytest.raises(PlanError, match="buffer.* without an offset: b0"):
        check_plan(live, dataclasses.replace(plan, offsets=offsets))
    tensors = dict(plan.tensor_offsets)
    del tensors["b2"]
    with pytest.raises(PlanError, match="tensor 'b2' .* has no location"):
        check_plan(live, dataclasses.replace(plan, tensor_offsets=tensors))


def test_verifier_catches_wrong_bound_and_tensor_offset():
    live, plan = _good()
    with pytest.raises(PlanError, match="lower bound of 70 bytes but the live bytes peak at 80"):
        check_plan(live, dataclasses.replace(plan, lower_bound=70))
    with pytest.raises(PlanError, match="tensor 'b2' is placed at arena\\+8"):
        check_plan(live, dataclasses.replace(
            plan, tensor_offsets={**plan.tensor_offsets, "b2": ("arena", 8)}))


def test_verifier_catches_state_overlap():
    live = dataclasses.replace(
        _liveness(MEDIUM), state=(Buffer("W", 32, 0, 4, ("W",), Role.PARAM),
                                  Buffer("m", 32, 0, 4, ("m",), Role.OPT_STATE)))
    live = dataclasses.replace(live, intervals={**live.intervals, "W": (0, 4), "m": (0, 4)},
                               buffer_of={**live.buffer_of, "W": "W", "m": "m"})
    plan = plan_arena(live, align=16)
    bad = dataclasses.replace(plan, state_offsets={"W": 0, "m": 16},
                              tensor_offsets={**plan.tensor_offsets, "m": ("state", 16)})
    with pytest.raises(PlanError, match="state buffers 'W' and 'm' overlap at byte 16"):
        check_plan(live, bad)


# --- zoo-sized schedules (small widths for speed; benchmarks/memory.py runs the full sizes) -------

ZOO_SMALL = [("mlp", {}), ("tfc", {}), ("lfc", {"width": 0.25}), ("cnv", {"width": 0.25}),
             ("binarynet", {"width": 0.125}), ("resnete18", {"width": 0.125, "image_size": 32}),
             ("birealnet18", {"width": 0.125, "image_size": 32})]


def _zoo_schedule(name, kw, algorithm, batch=100, optimizer="adam"):
    zoo = pytest.importorskip("bnnc.compiler.zoo")
    frontend = pytest.importorskip("bnnc.compiler.frontend")
    schedule = pytest.importorskip("bnnc.compiler.schedule")
    from bnnc.compiler.config import make_config
    graph = frontend.load_model(zoo.build_zoo_model(name, **kw))
    return schedule.build_schedule(graph, make_config(algorithm, batch=batch, optimizer=optimizer))


@pytest.mark.parametrize("name,kw", ZOO_SMALL, ids=[n for n, _ in ZOO_SMALL])
def test_zoo_plans_are_valid_and_efficient(name, kw):
    for algorithm in ("standard", "proposed"):
        for batch, optimizer, io in ((100, "adam", "arena"), (10, "bop", "caller")):
            sched = _zoo_schedule(name, kw, algorithm, batch, optimizer)
            live = compute_liveness(sched, io=io)
            check_liveness(sched, live)
            plan = plan_arena(live)
            check_plan(live, plan)
            where = f"{name} {algorithm} B={batch} {optimizer} io={io}"
            assert plan.efficiency >= 0.98, (where, plan.efficiency, plan.tried)
            # every tensor a step touches has a location; the batch lives where io says
            touched = {t for s in sched.steps for t in s.inputs + s.outputs}
            assert touched <= set(plan.tensor_offsets), where
            region = "caller" if io == "caller" else "arena"
            assert plan.tensor_offsets["input"][0] == region, where


def test_zoo_plan_is_deterministic():
    from bnnc.compiler.report import dump_plan_json, plan_to_json
    texts = set()
    for _ in range(10):
        sched = _zoo_schedule("cnv", {"width": 0.25}, "proposed")
        live = compute_liveness(sched)
        texts.add(dump_plan_json(plan_to_json(sched, live, plan_arena(live))))
    assert len(texts) == 1
