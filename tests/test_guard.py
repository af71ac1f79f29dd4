"""Guard canaries (`bnnc compile --guard`): the planner leaves canary bytes around every arena
buffer, and the emitted C checks them after every kernel of the training step.

Pure tests check the layout by hand and with an independent overlap sweep; the build tests inject
a one-byte out-of-bounds write right after a kernel (-DBNNC_OOB_STEP=k, the template's test hook)
and prove the trainer stops naming that step and buffer, that the same write goes unnoticed with
the checks compiled out (-DBNNC_NO_GUARD), and that a clean guarded build trains normally.
"""

from __future__ import annotations

import shutil
import signal

import numpy as np
import pytest

from bnnc.cli import main
from bnnc.compiler.config import make_config
from bnnc.compiler.errors import PlanError
from bnnc.compiler.frontend import load_model
from bnnc.compiler.liveness import Buffer, Liveness
from bnnc.compiler.planner import DEFAULT_GUARD_BYTES, plan_arena, plan_schedule
from bnnc.compiler.schedule import build_schedule
from bnnc.compiler.schedule_ir import Role
from bnnc.compiler.target import load_target
from bnnc.compiler.zoo import build_zoo_model
from bnnc.runtime import packed
from bnnc.compiler.contract import read_manifest
from bnnc.runtime.programs import LocalRunner, build_trainer

FAST = ["-O0"]      # these builds test logic, not speed: -O0 compiles several times faster


def _liveness(bufs: list[tuple[str, int, int, int]]) -> Liveness:
    buffers = tuple(sorted((Buffer(n, nb, f, la, (n,), Role.SCRATCH) for n, nb, f, la in bufs),
                           key=lambda b: (b.first, b.name)))
    steps = max(b.last for b in buffers) + 1
    return Liveness(steps, buffers, (), {b.name: (b.first, b.last) for b in buffers},
                    {b.name: b.name for b in buffers})


def test_guard_layout_by_hand():
    # a (20 B, steps 0-1), b (16 B, 1-2), c (8 B, 2): items are 16 + size rounded to 16 + 16
    live = _liveness([("a", 20, 0, 1), ("b", 16, 1, 2), ("c", 8, 2, 2)])
    plan = plan_arena(live, align=16, guard_bytes=16)
    # a's item [0, 64), b's [64, 112) (a and b meet at step 1), c's item reuses [0, 48)
    assert dict(plan.offsets) == {"a": 16, "b": 80, "c": 16}
    assert plan.arena_nbytes == 112 and plan.guard_bytes == 16
    assert plan.lower_bound == 48           # the unguarded bound: 32 + 16 at step 1
    g = {x.buffer: (x.lo, x.offset, x.end, x.hi, x.first, x.last) for x in plan.guards}
    # the back guard starts at the exact end, so a's 12 padding bytes (36..47) are guarded too
    assert g == {"a": (0, 16, 36, 64, 0, 1), "b": (64, 80, 96, 112, 1, 2),
                 "c": (0, 16, 24, 48, 2, 2)}


def test_no_guards_by_default_and_bad_sizes_refused():
    live = _liveness([("a", 20, 0, 1), ("b", 16, 1, 2)])
    plan = plan_arena(live, align=16)
    assert plan.guards == () and plan.guard_bytes == 0 and plan.arena_nbytes == 48
    assert plan_arena(live, align=16, guard_bytes=1).guard_bytes == 16     # rounded to align
    for bad in (-1, 2.5, "8", True):
        with pytest.raises(PlanError, match="guard size"):
            plan_arena(live, align=16, guard_bytes=bad)


def _check_guards_disjoint(live, plan) -> None:
    """Independent of the planner: at every step, the guarded spans [lo, hi) of the live buffers
    are pairwise disjoint and each holds its buffer's bytes."""
    by_name = {g.buffer: g for g in plan.guards}
    assert set(by_name) == {b.name for b in live.buffers}
    for b in live.buffers:
        g = by_name[b.name]
        assert g.offset == plan.offsets[b.name] and g.end == g.offset + b.nbytes
        assert g.offset - g.lo == plan.guard_bytes and g.hi - g.end >= plan.guard_bytes
        assert 0 <= g.lo and g.hi <= plan.arena_nbytes and (g.first, g.last) == (b.first, b.last)
    for s in range(live.num_steps):
        spans = sorted((by_name[b.name].lo, by_name[b.name].hi, b.name) for b in live.live_at(s))
        for (_, hi0, n0), (lo1, _, n1) in zip(spans, spans[1:]):
            assert hi0 <= lo1, f"step {s}: the guarded spans of {n0} and {n1} overlap"


@pytest.mark.parametrize("model,kw", [("tfc", {}), ("cnv", {}),
                                      ("resnete18", {"image_size": 16, "num_classes": 10})])
@pytest.mark.parametrize("alg", ["standard", "proposed"])
def test_guarded_plans_of_zoo_models(model, kw, alg):
    g = load_model(build_zoo_model(model, width=0.0625, **kw))
    sched = build_schedule(g, make_config(alg, batch=2))
    live, plain = plan_schedule(sched)
    live, plan = plan_schedule(sched, guard_bytes=DEFAULT_GUARD_BYTES)
    _check_guards_disjoint(live, plan)
    assert plan.lower_bound == plain.lower_bound and plan.arena_nbytes > plain.arena_nbytes


# ---------------------------------------------------------------------------------------------
# the emitted C


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """tfc (proposed: packed bits, PO2 gradients, f16 state) compiled with `bnnc compile --guard`,
    a packed random data set, and the compiler's own records of the plan."""
    if shutil.which("cc") is None:
        pytest.skip("no host C compiler")
    root = tmp_path_factory.mktemp("guard")
    out = root / "out"
    args = ["tfc", "--width", "0.125", "--batch", "4", "--algorithm", "proposed"]
    assert main(["compile", *args, "--guard", "-o", str(out)]) == 0
    assert main(["compile", *args, "-o", str(root / "plain")]) == 0
    rng = np.random.default_rng(0)
    x = ((2 * rng.integers(0, 256, (12, 1, 28, 28)) - 255) / 255).astype(np.float32)
    packed.pack(root / "train.bnnd", x, rng.integers(0, 10, 12), 10)
    sched = build_schedule(load_model(build_zoo_model("tfc", width=0.125)),
                           make_config("proposed", batch=4))
    live, plan = plan_schedule(sched, guard_bytes=DEFAULT_GUARD_BYTES)
    return dict(out=out, plain=root / "plain", data=root / "train.bnnd", sched=sched, live=live,
                plan=plan)


def _run(g, *cflags):
    tgt = load_target("host")
    exe = build_trainer(g["out"], tgt, extra_cflags=[*FAST, *cflags])
    return LocalRunner(tgt).run(exe, ["--train", str(g["data"]), "--steps", "2"], timeout=120)


def test_guard_code_only_in_guarded_builds(guarded):
    src = (guarded["out"] / "tfc.c").read_text()
    plain = (guarded["plain"] / "tfc.c").read_text()
    assert "--guard" in src.splitlines()[1]
    steps = len(guarded["sched"].steps)
    assert src.count("    BNNC_GUARD_CHECK(") == steps and src.count("    BNNC_GUARD_ARM(") == steps
    assert "BNNC_GUARD" not in plain and "BNNC_OOB" not in plain
    assert read_manifest(guarded["out"]).arena_nbytes == guarded["plan"].arena_nbytes


def test_clean_guarded_build_trains(guarded):
    res = _run(guarded)
    assert res.returncode == 0, (res.events, res.stderr)
    assert res.events[-1] == {"event": "done", "step": 2} and "guard" not in res.stderr


def _oob_step(g, *, unaligned_end: bool, phase: str) -> tuple[int, object]:
    """The first step of `phase` whose first output lives in an arena buffer (optionally one that
    does not end on the alignment, so the byte past it is padding), and that buffer's guard."""
    guards = {x.buffer: x for x in g["plan"].guards}
    for s in g["sched"].steps:
        buf = g["live"].buffer_of.get(s.outputs[0]) if s.outputs else None
        if s.phase.value != phase or buf not in guards:
            continue
        if unaligned_end == bool(guards[buf].end % g["plan"].align):
            return s.index, guards[buf]
    raise AssertionError(f"no {phase} step with unaligned_end={unaligned_end}")


# loss (4 bytes) and dbeta (8 bytes) end inside their aligned slot: the padding is guarded too
@pytest.mark.parametrize("where,unaligned,phase", [("after", False, "forward"),
                                                   ("after", True, "loss"),
                                                   ("after", True, "backward"),
                                                   ("before", False, "backward")])
def test_out_of_bounds_write_is_caught(guarded, where, unaligned, phase):
    k, guard = _oob_step(guarded, unaligned_end=unaligned, phase=phase)
    flags = [f"-DBNNC_OOB_STEP={k}"] + (["-DBNNC_OOB_BEFORE"] if where == "before" else [])
    res = _run(guarded, *flags)
    assert res.returncode == -signal.SIGABRT, (res.returncode, res.events, res.stderr)
    step = guarded["sched"].steps[k]
    fn = f"step_{k:03d}_{step.kernel.name}" + (f"_{step.layer}" if step.layer else "")
    byte, side = ((guard.offset - 1, "before") if where == "before"
                  else (guard.end, "past the end of"))
    want = (f"guard: training step 1, schedule step {k} ({fn}) wrote arena byte {byte}, "
            f"1 byte(s) {side} the buffer of {', '.join(guard.tensors)}")
    assert res.error() == want
    assert f"bnnc {want}" in res.stderr
    # the protection removed: the same write goes unnoticed
    res = _run(guarded, *flags, "-DBNNC_NO_GUARD")
    assert res.returncode == 0 and res.events[-1]["event"] == "done", (res.events, res.stderr)
