"""The stages chained: (graph, config, target) -> C sources in a directory.

The one place that runs schedule -> liveness + plan (verified) -> codegen in order, for `bnnc
compile`, `bnnc check`, `bnnc train --backend c` and the benchmarks. Each stage stays its own module
with its own entry point; this only calls them in sequence and keeps their outputs together.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .budget import check_budget
from .codegen import Emitted, check_threads, emit_c
from .config import TrainConfig, check_config_for_graph
from .ir import Graph
from .liveness import Liveness
from .planner import ArenaPlan, plan_schedule
from .preprocess import DEFAULT as DEFAULT_PREPROCESS
from .preprocess import Preprocess
from .report import dump_plan_json, plan_to_json
from .schedule import build_schedule
from .schedule_ir import Schedule
from .target import Target


@dataclass(frozen=True)
class Compiled:
    schedule: Schedule
    liveness: Liveness
    plan: ArenaPlan
    plan_doc: dict[str, Any]     # the report document, also written as OUT/plan.json
    emitted: Emitted


def compile_to_c(graph: Graph, cfg: TrainConfig, target: Target, out_dir: str | Path, *,
                 command: str = "", guard_bytes: int = 0, emit: str = "program",
                 preprocess: Preprocess = DEFAULT_PREPROCESS, threads: int = 1) -> Compiled:
    """`guard_bytes` > 0: canaries around every arena buffer, checked after every kernel (a debug
    build; planner.py and templates/model.c.j2 say how). `emit`: "program" (the C and the
    target's trainer) or "library" (compiler/library.py: a firmware library layout).
    `preprocess`: the u8 pixel -> input map of the trainers (compiler/preprocess.py), recorded
    in the manifest. `threads`: the POSIX threads each training step's heavy kernels split their
    output over (Linux targets; codegen.check_threads)."""
    check_config_for_graph(graph, cfg)
    check_threads(threads, target)
    schedule = build_schedule(graph, cfg)
    live, plan = plan_schedule(schedule, align=target.align, guard_bytes=guard_bytes)
    if target.kind == "baremetal":
        check_budget(schedule, plan, target, graph=graph, liveness=live, emit=emit)
    doc = plan_to_json(schedule, live, plan)
    emitted = emit_c(schedule, plan, target, Path(out_dir), command=command,
                     model_sha256=graph.source_sha256, plan_json=dump_plan_json(doc),
                     onnx_names={lay.name: lay.onnx_name for lay in graph.layers}, emit=emit,
                     preprocess=preprocess, threads=threads)
    return Compiled(schedule, live, plan, doc, emitted)
