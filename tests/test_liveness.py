"""Liveness on hand-built schedules: exact intervals, in-place merges, views, the state region, and
the independent `check_liveness` catching a liveness that merges tensors which are live together."""

from __future__ import annotations

import dataclasses

import pytest

from bnnc.compiler.config import make_config
from bnnc.compiler.errors import PlanError
from bnnc.compiler.liveness import Buffer, compute_liveness
from bnnc.compiler.ops import KERNELS
from bnnc.compiler.plan_check import check_liveness
from bnnc.compiler.schedule_ir import DType, Role, Schedule, Step, Tensor

F32 = DType.F32


def _schedule(tensors: list[Tensor], steps: list[tuple]) -> Schedule:
    """steps: (kernel, inputs, outputs[, inplace]). Liveness reads no kernel, so a label that is no
    registry kernel name ("f", "use") stands for any kernel (affine_fwd)."""
    sts = tuple(Step(i, KERNELS.get(s[0], KERNELS["affine_fwd"]), "", tuple(s[1]), tuple(s[2]), {},
                     tuple(s[3]) if len(s) > 3 else ()) for i, s in enumerate(steps))
    return Schedule("tiny", make_config("standard"), {t.name: t for t in tensors}, sts)


def tiny() -> Schedule:
    """One dense layer + BN + softmax CE, trained with Adam; sizes are small and all distinct."""
    T = Tensor
    tensors = [
        T("input", F32, (4, 8), Role.INPUT, 128),
        T("labels", DType.I32, (4,), Role.LABEL, 16),
        T("fc1.W", F32, (8, 4), Role.PARAM, 128),
        T("fc1.W.m", F32, (8, 4), Role.OPT_STATE, 128),
        T("fc1.W.v", F32, (8, 4), Role.OPT_STATE, 128),
        T("bn1.running_mean", F32, (4,), Role.BN_STAT, 16),
        T("fc1.out", F32, (4, 4), Role.SCRATCH, 64),
        T("bn1.out", F32, (4, 4), Role.SAVED, 64),
        T("flat.out", F32, (4, 4), Role.SAVED, 64, alias_of="bn1.out"),
        T("sm.out", F32, (4, 4), Role.SCRATCH, 64),
        T("loss", F32, (), Role.SCRATCH, 4),
        T("bn1.d_out", F32, (4, 4), Role.GRAD, 64),
        T("fc1.d_out", F32, (4, 4), Role.GRAD, 48),
        T("fc1.dW", F32, (8, 4), Role.GRAD, 128),
        T("never.used", F32, (3,), Role.SCRATCH, 12),
    ]
    steps = [
        ("dense_fwd_f32", ["input", "fc1.W"], ["fc1.out"]),                                  # 0
        ("bn_l2_fwd", ["fc1.out", "bn1.running_mean"], ["bn1.out", "bn1.running_mean"],
         [("bn1.out", "fc1.out")]),                                                           # 1
        ("softmax_xent", ["flat.out", "labels"], ["sm.out", "loss"]),                         # 2
        ("affine_bwd", ["sm.out", "labels"], ["bn1.d_out"], [("bn1.d_out", "sm.out")]),       # 3
        ("bn_l2_bwd", ["bn1.d_out", "bn1.out"], ["fc1.d_out"], [("fc1.d_out", "bn1.d_out")]),  # 4
        ("dense_dw_f32", ["input", "fc1.d_out"], ["fc1.dW"]),                                 # 5
        ("adam_update", ["fc1.W", "fc1.dW", "fc1.W.m", "fc1.W.v"],
         ["fc1.W", "fc1.W.m", "fc1.W.v"]),                                                    # 6
    ]
    return _schedule(tensors, steps)


def test_tiny_intervals_buffers_and_state():
    live = compute_liveness(tiny())
    assert live.num_steps == 7
    assert live.intervals == {
        "fc1.W": (0, 6), "fc1.W.m": (0, 6), "fc1.W.v": (0, 6), "bn1.running_mean": (0, 6),
        "input": (0, 5),          # copied in by the entry before step 0, last read by dense_dw_f32
        "labels": (0, 3),
        "fc1.out": (0, 1),
        "bn1.out": (1, 4),        # read by bn_l2_bwd
        "flat.out": (1, 2),       # a view: born with its base, read by softmax_xent
        "sm.out": (2, 3), "loss": (2, 2),
        "bn1.d_out": (3, 4), "fc1.d_out": (4, 5), "fc1.dW": (5, 6),
    }
    assert live.unused == ("never.used",)
    S = Role.SCRATCH
    assert live.buffers == (
        Buffer("fc1.out", 64, 0, 4, ("fc1.out", "bn1.out", "flat.out"), Role.SAVED),
        Buffer("input", 128, 0, 5, ("input",), Role.INPUT),
        Buffer("labels", 16, 0, 3, ("labels",), Role.LABEL),
        Buffer("loss", 4, 2, 2, ("loss",), S),
        # sm.out dies where bn1.d_out is born, bn1.d_out where fc1.d_out is: one buffer, 64 B
        Buffer("sm.out", 64, 2, 5, ("sm.out", "bn1.d_out", "fc1.d_out"), S),
        Buffer("fc1.dW", 128, 5, 6, ("fc1.dW",), Role.GRAD),
    )
    # ties in role-holding length (sm.out 2-3, bn1.d_out 3-4, fc1.d_out 4-5) go to the earliest
    assert [b.name for b in live.state] == ["fc1.W", "fc1.W.m", "fc1.W.v", "bn1.running_mean"]
    assert all((b.first, b.last) == (0, 6) for b in live.state)
    assert live.buffer_of["flat.out"] == "fc1.out" and live.buffer_of["fc1.d_out"] == "sm.out"
    assert [b.name for b in live.live_at(5)] == ["input", "sm.out", "fc1.dW"]
    check_liveness(tiny(), live)


def _with_steps(sched: Schedule, steps: list[Step]) -> Schedule:
    return dataclasses.replace(sched, steps=tuple(steps))


def test_inplace_refused_when_input_is_read_later():
    s = tiny()
    steps = list(s.steps)
    # bn_l2_bwd also reads fc1.out, so bn1.out may not overwrite it at step 1
    steps[4] = dataclasses.replace(steps[4], inputs=("bn1.d_out", "bn1.out", "fc1.out"))
    live = compute_liveness(_with_steps(s, steps))
    assert live.buffer_of["bn1.out"] == "bn1.out" and live.buffer_of["fc1.out"] == "fc1.out"
    assert live.intervals["fc1.out"] == (0, 4)
    check_liveness(_with_steps(s, steps), live)


def test_inplace_two_claims_first_wins():
    T = Tensor
    tensors = [T("x", F32, (4,), Role.INPUT, 16), T("a", F32, (4,), Role.SCRATCH, 16),
               T("b", F32, (4,), Role.SCRATCH, 16), T("c", F32, (4,), Role.SCRATCH, 16)]
    sched = _schedule(tensors, [("f", ["x"], ["a"]),
                                ("g", ["a"], ["b", "c"], [("b", "a"), ("c", "a")]),
                                ("h", ["b", "c"], [])])
    live = compute_liveness(sched)
    assert live.buffer_of == {"x": "x", "a": "a", "b": "a", "c": "c"}
    assert {b.name: (b.first, b.last) for b in live.buffers} == {"x": (0, 0), "a": (0, 2),
                                                                  "c": (1, 2)}
    check_liveness(sched, live)


def test_inplace_over_input_at_step_zero_and_larger_output():
    T = Tensor
    tensors = [T("x", F32, (4,), Role.INPUT, 16), T("y", F32, (8,), Role.SCRATCH, 32)]
    sched = _schedule(tensors, [("scale", ["x"], ["y"], [("y", "x")]), ("use", ["y"], [])])
    live = compute_liveness(sched)
    # the batch is in the arena before step 0, so step 0 may overwrite it; size = largest member;
    # y holds the storage longer (steps 0-1 against 0-0), so the buffer is coloured as scratch
    assert live.buffers == (Buffer("x", 32, 0, 1, ("x", "y"), Role.SCRATCH),)


def test_check_liveness_catches_bad_merge():
    s = tiny()
    live = compute_liveness(s)
    # pretend fc1.dW shares input's buffer although both are live at step 5
    bufs = [b for b in live.buffers if b.name not in ("input", "fc1.dW")]
    bufs.append(Buffer("input", 128, 0, 6, ("input", "fc1.dW"), Role.INPUT))
    bad = dataclasses.replace(live, buffers=tuple(sorted(bufs, key=lambda b: (b.first, b.name))),
                              buffer_of={**live.buffer_of, "fc1.dW": "input"})
    with pytest.raises(PlanError, match="'input' and 'fc1.dW' share buffer 'input'"):
        check_liveness(s, bad)


def test_check_liveness_catches_short_interval():
    s = tiny()
    live = compute_liveness(s)
    bufs = tuple(dataclasses.replace(b, last=3) if b.name == "input" else b for b in live.buffers)
    with pytest.raises(PlanError, match="'input' is used at steps 0-5 but its buffer 'input' lives "
                                        "only at 0-3"):
        check_liveness(s, dataclasses.replace(live, buffers=bufs))


def test_batch_read_from_the_caller():
    live = compute_liveness(tiny(), io="caller")
    assert [b.name for b in live.io] == ["input", "labels"]
    assert "input" not in {b.name for b in live.buffers}
    assert live.io[0] == Buffer("input", 128, 0, 5, ("input",), Role.INPUT)
    check_liveness(tiny(), live)
    # the caller's batch is read-only: no output may take its bytes, even where it dies
    T = Tensor
    sched = _schedule([T("x", F32, (4,), Role.INPUT, 16), T("y", F32, (4,), Role.SCRATCH, 16)],
                      [("scale", ["x"], ["y"], [("y", "x")]), ("use", ["y"], [])])
    live = compute_liveness(sched, io="caller")
    assert live.buffer_of == {"x": "x", "y": "y"} and [b.name for b in live.buffers] == ["y"]
    with pytest.raises(PlanError, match="unknown batch placement io='disk'"):
        compute_liveness(sched, io="disk")
