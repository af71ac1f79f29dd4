"""Planner scaling benchmark: deep chains through import, schedule, liveness (+ check), arena plan
(+ check) and C emission, seconds and peak memory per stage, as Markdown.

    python benchmarks/plan_scale.py [--depths 1000,2000,4000,10000] [--kind relu|binary] [--emit]

Models (made here, nothing downloaded): `relu` is Gemm 16->16, then N Relu layers, then Gemm
16->10 (the issue's 4,000-Relu chain); `binary` is N blocks of binary MatMul 16x16 + BatchNorm +
sign (the `Where(x >= 0, 1, -1)` idiom), then a real Gemm to 10 classes. Proposed algorithm,
Adam, batch 8, host target. Every number is measured in this run (time.perf_counter and
tracemalloc's peak per stage); the machine is shared, so treat them as a curve, not a constant.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bnnc.compiler.codegen import emit_c
from bnnc.compiler.config import make_config
from bnnc.compiler.frontend import load_model
from bnnc.compiler.liveness import compute_liveness
from bnnc.compiler.plan_check import check_liveness
from bnnc.compiler.planner import plan_arena
from bnnc.compiler.report import dump_plan_json, plan_to_json
from bnnc.compiler.schedule import build_schedule
from bnnc.compiler.target import load_target

WIDTH = 16


def chain_model(depth: int, kind: str = "relu", *, seed: int = 0) -> onnx.ModelProto:
    """The benchmark's chain of `depth` layers as an ONNX model (module docstring)."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def param(name, shape):
        inits.append(numpy_helper.from_array(
            (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32), name))
        return name

    x = "x"
    nodes.append(helper.make_node("Gemm", [x, param("w_in", (WIDTH, WIDTH))], ["h0"]))
    x = "h0"
    if kind == "binary":
        inits += [numpy_helper.from_array(np.array(v, np.float32), n)
                  for n, v in (("zero", 0.0), ("one", 1.0), ("minus", -1.0))]
    for i in range(depth):
        y = f"h{i + 1}"
        if kind == "relu":
            nodes.append(helper.make_node("Relu", [x], [y]))
        else:
            c = [param(f"bn{i}_{p}", (WIDTH,)) for p in ("g", "b", "m")]
            inits.append(numpy_helper.from_array(np.ones(WIDTH, np.float32), f"bn{i}_v"))
            nodes += [
                helper.make_node("GreaterOrEqual", [x, "zero"], [f"ge{i}"]),
                helper.make_node("Where", [f"ge{i}", "one", "minus"], [f"s{i}"]),
                helper.make_node("GreaterOrEqual", [param(f"w{i}", (WIDTH, WIDTH)), "zero"],
                                 [f"wge{i}"]),
                helper.make_node("Where", [f"wge{i}", "one", "minus"], [f"wb{i}"]),
                helper.make_node("MatMul", [f"s{i}", f"wb{i}"], [f"mm{i}"]),
                helper.make_node("BatchNormalization", [f"mm{i}", *c, f"bn{i}_v"], [y],
                                 epsilon=1e-4, momentum=0.9)]
        x = y
    nodes.append(helper.make_node("Gemm", [x, param("w_out", (WIDTH, 10))], ["logits"]))
    graph = helper.make_graph(
        nodes, f"chain_{kind}_{depth}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", WIDTH])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


_TRACE = False     # --memory: tracemalloc's peak per stage (slows every stage down several times)


def _stage(fn):
    if _TRACE:
        tracemalloc.start()
    t = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1] if _TRACE else 0
    if _TRACE:
        tracemalloc.stop()
    return out, dt, peak


def measure(depth: int, kind: str, emit: bool) -> dict:
    model = chain_model(depth, kind)
    graph, t_imp, m_imp = _stage(lambda: load_model(model))
    cfg = make_config("proposed", batch=8)
    sched, t_sch, m_sch = _stage(lambda: build_schedule(graph, cfg))
    live, t_live, m_live = _stage(lambda: (lambda lv: (check_liveness(sched, lv), lv)[1])(
        compute_liveness(sched)))
    plan, t_plan, m_plan = _stage(lambda: plan_arena(live, align=16))
    row = dict(depth=depth, kind=kind, tensors=len(sched.tensors), buffers=len(live.buffers),
               steps=len(sched.steps), t_import=t_imp, t_schedule=t_sch, t_liveness=t_live,
               t_plan=t_plan, peak_plan_mib=max(m_live, m_plan) / 2**20,
               efficiency=plan.efficiency, heuristic=plan.heuristic)
    if emit:
        tgt = load_target("host")
        with tempfile.TemporaryDirectory() as tmp:
            def go():
                doc = plan_to_json(sched, live, plan)
                return emit_c(sched, plan, tgt, Path(tmp), plan_json=dump_plan_json(doc),
                              onnx_names={lay.name: lay.onnx_name for lay in graph.layers})
            _, row["t_emit"], m = _stage(go)
            row["peak_emit_mib"] = m / 2**20
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depths", default="1000,2000,4000,10000")
    ap.add_argument("--kind", choices=("relu", "binary"), default="relu")
    ap.add_argument("--emit", action="store_true", help="also time C emission")
    ap.add_argument("--memory", action="store_true",
                    help="measure each stage's peak Python memory (tracemalloc; slower)")
    args = ap.parse_args(argv)
    global _TRACE
    _TRACE = args.memory
    rows = [measure(int(d), args.kind, args.emit) for d in args.depths.split(",")]
    head = ["depth", "tensors", "buffers", "import s", "schedule s", "liveness+check s",
            "plan+check s", "plan peak MiB", "efficiency"] + (["emit s", "emit peak MiB"]
                                                              if args.emit else [])
    mem = (lambda v: f"{v:.1f}") if args.memory else (lambda v: "-")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        cells = [r["depth"], r["tensors"], r["buffers"], f"{r['t_import']:.2f}",
                 f"{r['t_schedule']:.2f}", f"{r['t_liveness']:.2f}", f"{r['t_plan']:.2f}",
                 mem(r["peak_plan_mib"]), f"{r['efficiency']:.3f}"]
        if args.emit:
            cells += [f"{r['t_emit']:.2f}", mem(r["peak_emit_mib"])]
        print("| " + " | ".join(map(str, cells)) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
