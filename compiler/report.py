"""The memory report: a plan as a JSON document, a text table and a self-contained HTML picture.

    plan_to_json(schedule, liveness, plan) -> dict     the document (schema below); json.dumps-able
    dump_plan_json(doc) -> str                         the document as JSON text
    load_plan_json(path) -> dict                       read it back (a file, or an OUT/ directory)
    plan_from_json(doc) -> (Liveness, ArenaPlan)       the records again, e.g. to re-run check_plan
    peak_breakdown(liveness, plan) -> dict             the buffers live at the peak step
    format_report(doc, *, tensors=True) -> str         text tables for the terminal
    format_timeline(doc, *, columns=64) -> str         the arena as text, one line per step
    plan_to_html(docs) -> str                          arena pictures side by side, one byte scale

Every renderer reads only the document, so `bnnc inspect OUT/` shows a compiled plan.json exactly as
it showed the plan at compile time. Output is deterministic: same inputs, same bytes.

JSON schema, `schema == "bnnc-plan"`, `schema_version == 1` (a reader must reject other versions;
new optional keys may be added without a version bump, renamed or retyped keys bump it):
    bnnc_version   str
    model          str                 graph name
    config         {TrainConfig field: value}
    num_steps      int
    steps          [{index, kernel, layer, phase}]
    arena          {nbytes, lower_bound, efficiency, align, heuristic, tried: {heuristic: nbytes},
                    live_bytes: [aligned bytes live at each step]}
    state          {nbytes, frozen_nbytes}  frozen_nbytes: the tail of the state holding frozen
                                       parameters and the running statistics of the BNs in
                                       inference mode (partial training; 0 when every one trains)
    frozen         [parameter name, ...]  config.frozen: what the step does not train
    io             {mode: "arena" | "caller", nbytes}  where the batch (input, labels) lives;
                                       "caller": read in place from the caller's buffers, whose
                                       nbytes are not in the arena nor the total
    total_nbytes   int                 arena + state
    by_role        {role: {region, tensors, nbytes}}  sum of tensor sizes (views excluded; an
                                       in-place output and the input it overwrites count apart)
    peak           {step, nbytes, by_role: {role: nbytes}, buffers: [name, ...] largest first}
    buffers        [{name, region, offset, nbytes, first, last, role, tensors: [name, ...]}]
                   arena buffers in (first, name) order, then state buffers in state order,
                   then (io "caller") the batch buffers, region "caller", offset 0
    tensors        [{name, role, dtype, shape, nbytes, region, buffer, offset, first, last,
                     alias_of}]
                   schedule order; `region` "arena" | "state" | "caller"; `alias_of` null unless
                   a view
    unused         [tensor name, ...]  tensors no step touches (not placed)
Roles are `schedule_ir.Role` values ("parameter", "frozen parameter", "optimizer state", "bn
state", "input", "label", "saved activation", "gradient", "scratch"); byte counts are exact storage bytes, offsets are from
the start of the region.

HTML: one inline SVG per plan, address upwards (y) against schedule step (x); one <rect class="buf">
per arena buffer coloured by the buffer's role, with a <title> tooltip listing its tensors (name,
role, dtype, shape, bytes, interval); the state region as a stacked column at the same byte scale; a
legend. No script, no external resource. Buffers thinner than a pixel are drawn one pixel high so
they stay hoverable.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence
from xml.sax.saxutils import escape

from .. import __version__
from .errors import PlanError
from .liveness import Buffer, Liveness
from .planner import ArenaPlan
from .schedule_ir import Role, Schedule

SCHEMA = "bnnc-plan"
SCHEMA_VERSION = 1
MIB = float(1 << 20)
ROLE_ORDER = (Role.PARAM, Role.FROZEN, Role.OPT_STATE, Role.BN_STAT, Role.INPUT, Role.LABEL, Role.SAVED,
              Role.GRAD, Role.SCRATCH)
# Tableau 10: distinguishable, and still readable for common colour-vision deficiencies
ROLE_COLOURS = {
    "parameter": "#4e79a7", "frozen parameter": "#bab0ac", "optimizer state": "#f28e2b", "bn state": "#edc948", "input": "#76b7b2",
    "label": "#59a14f", "saved activation": "#e15759", "gradient": "#b07aa1", "scratch": "#9c755f",
}
_REQUIRED = ("model", "config", "num_steps", "steps", "arena", "state", "total_nbytes", "by_role",
             "peak", "buffers", "tensors")


def _aligned(n: int, align: int) -> int:
    return -(-n // align) * align


def _live_bytes(liveness: Liveness, align: int, steps: int) -> list[int]:
    """Aligned arena bytes live at each step (a difference array: O(buffers + steps))."""
    delta = [0] * (steps + 1)
    for b in liveness.buffers:
        delta[b.first] += _aligned(b.nbytes, align)
        delta[b.last + 1] -= _aligned(b.nbytes, align)
    out, acc = [], 0
    for d in delta[:steps]:
        acc += d
        out.append(acc)
    return out


def peak_breakdown(liveness: Liveness, plan: ArenaPlan) -> dict[str, Any]:
    """The step with the most aligned live bytes (earliest on ties) and what is live there, the
    largest buffer first: {step, nbytes, by_role: {role: bytes}, buffers: [{name, role, nbytes,
    offset, first, last, tensors}]}."""
    live = _live_bytes(liveness, plan.align, max(liveness.num_steps, 1))
    step = max(range(len(live)), key=lambda s: (live[s], -s))
    bufs = sorted(liveness.live_at(step), key=lambda b: (-b.nbytes, b.name))
    by_role: dict[str, int] = {}
    for r in ROLE_ORDER:
        total = sum(_aligned(b.nbytes, plan.align) for b in bufs if b.role is r)
        if total:
            by_role[r.value] = total
    return {
        "step": step, "nbytes": live[step], "by_role": by_role,
        "buffers": [{"name": b.name, "role": b.role.value, "nbytes": b.nbytes,
                     "offset": plan.offsets[b.name], "first": b.first, "last": b.last,
                     "tensors": list(b.tensors)} for b in bufs],
    }


def plan_to_json(schedule: Schedule, liveness: Liveness, plan: ArenaPlan) -> dict[str, Any]:
    """The plan as a JSON-ready document (schema in the module docstring)."""
    live = _live_bytes(liveness, plan.align, liveness.num_steps)
    by_role: dict[str, dict[str, Any]] = {}
    for r in ROLE_ORDER:
        ts = [t for t in schedule.tensors.values()
              if t.role is r and t.alias_of is None and t.name in liveness.buffer_of]
        if ts:
            by_role[r.value] = {"region": plan.tensor_offsets[ts[0].name][0], "tensors": len(ts),
                                "nbytes": sum(t.nbytes for t in ts)}
    peak = peak_breakdown(liveness, plan)

    buffers = []
    for b in liveness.buffers + liveness.state + liveness.io:
        region, offset = plan.tensor_offsets[b.name]
        buffers.append({"name": b.name, "region": region, "offset": offset, "nbytes": b.nbytes,
                        "first": b.first, "last": b.last, "role": b.role.value,
                        "tensors": list(b.tensors)})
    tensors = []
    for t in schedule.tensors.values():
        if t.name not in liveness.buffer_of:
            continue
        region, offset = plan.tensor_offsets[t.name]
        first, last = liveness.intervals[t.name]
        tensors.append({"name": t.name, "role": t.role.value, "dtype": t.dtype.value,
                        "shape": list(t.shape), "nbytes": t.nbytes, "region": region,
                        "buffer": liveness.buffer_of[t.name], "offset": offset, "first": first,
                        "last": last, "alias_of": t.alias_of})
    return {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "bnnc_version": __version__,
        "model": schedule.graph_name, "config": schedule.config.as_dict(),
        "num_steps": liveness.num_steps,
        "steps": [{"index": s.index, "kernel": s.kernel.name, "layer": s.layer,
                   "phase": s.phase.value}
                  for s in schedule.steps],
        "arena": {"nbytes": plan.arena_nbytes, "lower_bound": plan.lower_bound,
                  "efficiency": plan.efficiency, "align": plan.align, "heuristic": plan.heuristic,
                  "tried": dict(plan.tried), "live_bytes": live},
        "state": {"nbytes": plan.state_nbytes, "frozen_nbytes": plan.frozen_nbytes},
        "frozen": list(schedule.config.frozen),
        "io": {"mode": "caller" if liveness.io else "arena",
               "nbytes": sum(b.nbytes for b in liveness.io)},
        "total_nbytes": plan.total_nbytes,
        "by_role": by_role,
        "peak": {"step": peak["step"], "nbytes": peak["nbytes"], "by_role": peak["by_role"],
                 "buffers": [b["name"] for b in peak["buffers"]]},
        "buffers": buffers,
        "tensors": tensors,
        "unused": list(liveness.unused),
    }


def dump_plan_json(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=1) + "\n"


def load_plan_json(path: str | Path) -> dict[str, Any]:
    """Read a document written by `dump_plan_json` (a file, or a directory holding plan.json)."""
    p = Path(path)
    if p.is_dir():
        p = p / "plan.json"
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        raise PlanError(f"{p}: no such file; `bnnc compile` writes plan.json into its output "
                        f"directory") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PlanError(f"{p}: not a readable JSON plan ({e})") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise PlanError(f"{p}: not a bnnc plan (expected \"schema\": \"{SCHEMA}\")")
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise PlanError(f"{p}: plan schema version {doc.get('schema_version')!r}; this bnnc reads "
                        f"version {SCHEMA_VERSION}", hint="recompile the model with this bnnc")
    missing = [k for k in _REQUIRED if k not in doc]
    if missing:
        raise PlanError(f"{p}: plan lacks field(s) {', '.join(missing)}")
    return doc


def plan_from_json(doc: dict[str, Any]) -> tuple[Liveness, ArenaPlan]:
    """The Liveness and ArenaPlan records a document describes (so check_plan can re-verify it)."""
    try:
        roles = {r.value: r for r in Role}
        regions: dict[str, list] = {"arena": [], "state": [], "caller": []}
        for b in doc["buffers"]:
            buf = Buffer(b["name"], b["nbytes"], b["first"], b["last"], tuple(b["tensors"]),
                         roles[b["role"]])
            regions[b["region"]].append((buf, b["offset"]))
        arena, state = regions["arena"], regions["state"]
        live = Liveness(
            num_steps=doc["num_steps"], buffers=tuple(b for b, _ in arena),
            state=tuple(b for b, _ in state),
            intervals={t["name"]: (t["first"], t["last"]) for t in doc["tensors"]},
            buffer_of={t["name"]: t["buffer"] for t in doc["tensors"]},
            unused=tuple(doc.get("unused", ())), io=tuple(b for b, _ in regions["caller"]))
        a = doc["arena"]
        plan = ArenaPlan(
            align=a["align"], arena_nbytes=a["nbytes"], lower_bound=a["lower_bound"],
            heuristic=a["heuristic"], offsets={b.name: off for b, off in arena},
            state_nbytes=doc["state"]["nbytes"], state_offsets={b.name: off for b, off in state},
            tensor_offsets={t["name"]: (t["region"], t["offset"]) for t in doc["tensors"]},
            tried=dict(a.get("tried", {})),
            frozen_nbytes=doc["state"].get("frozen_nbytes", 0))
    except (KeyError, TypeError, ValueError) as e:
        raise PlanError(f"plan document is malformed ({type(e).__name__}: {e})") from None
    return live, plan


# --- text ---------------------------------------------------------------------------------------

def describe_config(cfg: dict[str, Any]) -> str:
    """One line: "proposed, batch 100, adam, bf16 state, l1 BN, binary dW, PO2 dY (bias 8), ..."."""
    parts = [cfg.get("algorithm", "?"), f"batch {cfg.get('batch', '?')}", cfg.get("optimizer", "?"),
             f"{cfg.get('state_dtype', '?')} state", f"{cfg.get('bn', '?')} BN"]
    if cfg.get("binary_dw"):
        parts.append("binary dW")
    if cfg.get("po2"):
        parts.append(f"PO2 dY (bias {cfg.get('po2_bias')})")
    if cfg.get("save_bits"):
        parts.append("1-bit saves")
    if cfg.get("frozen"):
        parts.append(f"{len(cfg['frozen'])} parameters frozen")
    return ", ".join(str(p) for p in parts)


def _mib(n: int) -> str:
    return f"{n / MIB:.3f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]],
           right: Sequence[bool]) -> list[str]:
    cells = [list(map(str, header))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    out = []
    for k, r in enumerate(cells):
        out.append("  ".join(c.rjust(w) if right[i] else c.ljust(w)
                             for i, (c, w) in enumerate(zip(r, widths))).rstrip())
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


def format_report(doc: dict[str, Any], *, tensors: bool = True) -> str:
    """The plan as text tables: regions, bytes by role, the peak step's buffers, and (optionally)
    every tensor with its offset and live interval."""
    a, steps = doc["arena"], doc["steps"]
    lines = [f"bnnc memory plan: {doc['model']} -- {describe_config(doc['config'])}",
             f"{doc['num_steps']} steps, alignment {a['align']} B, heuristic {a['heuristic']}", ""]
    lines += _table(
        ("region", "bytes", "MiB", "note"),
        [("arena", f"{a['nbytes']:,}", _mib(a["nbytes"]),
          f"lower bound {a['lower_bound']:,} B, efficiency {a['efficiency']:.4f}"),
         ("state", f"{doc['state']['nbytes']:,}", _mib(doc["state"]["nbytes"]),
          "parameters, optimizer moments, BN statistics"
          + (f"; its last {doc['state']['frozen_nbytes']:,} B: frozen parameters and "
             f"statistics (read only; flash on bare-metal targets)"
             if doc["state"].get("frozen_nbytes") else "")),
         ("total", f"{doc['total_nbytes']:,}", _mib(doc["total_nbytes"]), "")]
        + ([("caller", f"{doc['io']['nbytes']:,}", _mib(doc["io"]["nbytes"]),
             "the batch, read in place from the caller's buffers (not in the total)")]
           if doc.get("io", {}).get("mode") == "caller" else []),
        (False, True, True, False))
    peak = doc["peak"]
    if doc.get("frozen"):
        lines += ["", f"frozen (not trained): {', '.join(doc['frozen'])}"]
        evals = [st["layer"] for st in steps if st["kernel"].endswith("_eval")]
        if evals:
            lines.append(f"batch norms in inference mode (running statistics, constant): "
                         f"{', '.join(evals)}")
    lines += ["", "bytes by role (sum of tensor sizes; 'at peak' = aligned bytes live at the peak "
                  "step)"]
    lines += _table(
        ("role", "region", "tensors", "bytes", "MiB", "at peak"),
        [(r, v["region"], v["tensors"], f"{v['nbytes']:,}", _mib(v["nbytes"]),
          f"{peak['by_role'].get(r, 0):,}" if v["region"] == "arena" else "")
         for r, v in doc["by_role"].items()],
        (False, False, True, True, True, True))
    st = steps[peak["step"]] if peak["step"] < len(steps) else None
    where = f" ({st['phase']} {st['kernel']} of {st['layer'] or 'the loss'})" if st else ""
    lines += ["", f"peak at step {peak['step']}{where}: {peak['nbytes']:,} B live "
                  f"({len(peak['buffers'])} buffers)"]
    bufs = {b["name"]: b for b in doc["buffers"]}
    lines += _table(
        ("buffer", "role", "bytes", "offset", "steps", "tensors"),
        [(n, bufs[n]["role"], f"{bufs[n]['nbytes']:,}", bufs[n]["offset"],
          f"{bufs[n]['first']}-{bufs[n]['last']}", ", ".join(bufs[n]["tensors"]))
         for n in peak["buffers"]],
        (False, False, True, True, True, False))
    if tensors:
        lines += ["", "tensors"]
        lines += _table(
            ("name", "role", "dtype", "shape", "bytes", "region", "offset", "steps", "buffer"),
            [(t["name"], t["role"], t["dtype"], "x".join(map(str, t["shape"])) or "scalar",
              f"{t['nbytes']:,}", t["region"], t["offset"], f"{t['first']}-{t['last']}",
              "" if t["buffer"] == t["name"] else t["buffer"])
             for t in doc["tensors"]],
            (False, False, False, False, True, False, True, True, False))
    return "\n".join(lines) + "\n"


TIMELINE_CHARS = {"input": "i", "label": "l", "saved activation": "S", "gradient": "G",
                  "scratch": "x"}


def format_timeline(doc: dict[str, Any], *, columns: int = 64) -> str:
    """The arena as text (TFLM's PrintMemoryPlan): one line per step, address left to right in
    `columns` cells, each marked by the role of the buffer that covers most of it ('.' free)."""
    a = doc["arena"]
    size = max(a["nbytes"], 1)
    arena = [b for b in doc["buffers"] if b["region"] == "arena"]
    legend = ", ".join(f"{c} {r}" for r, c in TIMELINE_CHARS.items())
    lines = [f"arena {a['nbytes']:,} B in {columns} cells of {size / columns:,.0f} B ({legend}, "
             f". free)"]
    width = len(str(max(doc["num_steps"] - 1, 0)))
    for s in range(doc["num_steps"]):
        cover = [0.0] * columns
        cells = ["."] * columns
        for b in arena:
            if not b["first"] <= s <= b["last"]:
                continue
            lo, hi = b["offset"] * columns / size, (b["offset"] + b["nbytes"]) * columns / size
            for c in range(int(lo), min(columns, int(-(-hi // 1)))):
                share = min(hi, c + 1) - max(lo, c)
                if share > cover[c]:
                    cover[c], cells[c] = share, TIMELINE_CHARS.get(b["role"], "?")
        step = doc["steps"][s] if s < len(doc["steps"]) else {"kernel": ""}
        lines.append(f"{s:>{width}} |{''.join(cells)}| {a['live_bytes'][s]:>12,}  {step['kernel']}")
    return "\n".join(lines) + "\n"


# --- HTML ---------------------------------------------------------------------------------------

_CSS = """
body { font: 13px/1.4 system-ui, sans-serif; margin: 16px; color: #222; background: #fff; }
h1 { font-size: 18px; margin: 0 0 8px 0; }
h2 { font-size: 15px; margin: 0 0 4px 0; }
.plans { display: flex; flex-wrap: wrap; gap: 24px; align-items: flex-end; }
.plan { max-width: 540px; }
.plan p { margin: 2px 0; }
.legend { margin: 0 0 12px 0; }
.legend span { display: inline-block; margin-right: 14px; }
.legend i { display: inline-block; width: 12px; height: 12px; margin-right: 4px; }
rect.buf, rect.state { stroke: #fff; stroke-width: 0.4; }
rect.buf:hover, rect.state:hover { stroke: #000; stroke-width: 1.5; }
text { font: 10px system-ui, sans-serif; fill: #444; }
"""
_PLOT_W = 400          # px for the schedule axis of every plan
_PLOT_H = 460          # px for the largest region of all plans (the shared byte scale)
_STATE_W = 44
_MARGIN_L, _MARGIN_T, _MARGIN_B, _GAP = 64, 14, 34, 20


def _tooltip(buf: dict[str, Any], tensors: dict[str, dict[str, Any]]) -> str:
    lines = [f"buffer {buf['name']} ({buf['role']}): {buf['nbytes']:,} B at {buf['region']}+"
             f"{buf['offset']}, steps {buf['first']}-{buf['last']}"]
    for name in buf["tensors"]:
        t = tensors.get(name)
        if t is None:
            continue
        shape = "x".join(map(str, t["shape"])) or "scalar"
        view = f", view of {t['alias_of']}" if t["alias_of"] else ""
        lines.append(f"{t['name']}: {t['role']}, {t['dtype']} [{shape}], {t['nbytes']:,} B, "
                     f"steps {t['first']}-{t['last']}{view}")
    return "\n".join(lines)


def _ticks(top: float) -> tuple[str, int, list[float]]:
    """A unit (B, KiB or MiB) and about five round tick values in [0, top bytes], in that unit."""
    name, size = next((n, z) for n, z in (("MiB", 1 << 20), ("KiB", 1 << 10), ("B", 1))
                      if top >= 2 * z or z == 1)
    top_u = top / size
    if top_u <= 0:
        return name, size, [0.0]
    raw = top_u / 5
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    return name, size, [i * step for i in range(int(top_u // step + 1e-9) + 1)]


def _svg(doc: dict[str, Any], byte_scale: float) -> str:
    steps = max(doc["num_steps"], 1)
    sx = _PLOT_W / steps
    arena_h = doc["arena"]["nbytes"] * byte_scale
    state_h = doc["state"]["nbytes"] * byte_scale
    plot_h = _PLOT_H
    x0 = _MARGIN_L + _STATE_W + _GAP
    width = x0 + _PLOT_W + 10
    height = _MARGIN_T + plot_h + _MARGIN_B
    base_y = _MARGIN_T + plot_h          # address 0
    tensors = {t["name"]: t for t in doc["tensors"]}
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img">']
    out.append(f'<rect x="{x0}" y="{base_y - arena_h:.2f}" width="{_PLOT_W}" '
               f'height="{arena_h:.2f}" fill="#f4f4f4" class="arena-bg"/>')
    # byte axis (shared scale, so equal heights mean equal bytes across plans)
    top_bytes = plot_h / byte_scale if byte_scale else 0
    unit, unit_size, ticks = _ticks(top_bytes)
    for v in ticks:
        y = base_y - v * unit_size * byte_scale
        out.append(f'<line x1="{_MARGIN_L - 4}" y1="{y:.2f}" x2="{_MARGIN_L}" y2="{y:.2f}" '
                   f'stroke="#888"/>')
        out.append(f'<text x="{_MARGIN_L - 6}" y="{y + 3:.2f}" text-anchor="end">'
                   f'{v:g} {unit}</text>')
    out.append(f'<line x1="{_MARGIN_L}" y1="{_MARGIN_T}" x2="{_MARGIN_L}" y2="{base_y}" '
               f'stroke="#888"/>')
    # state region: stacked, sequential offsets
    for b in doc["buffers"]:
        if b["region"] != "state":
            continue
        h = max(b["nbytes"] * byte_scale, 1.0)
        y = base_y - b["offset"] * byte_scale - h
        out.append(f'<rect class="state" x="{_MARGIN_L + 4}" y="{y:.2f}" width="{_STATE_W - 8}" '
                   f'height="{h:.2f}" fill="{ROLE_COLOURS.get(b["role"], "#999")}">'
                   f'<title>{escape(_tooltip(b, tensors))}</title></rect>')
    out.append(f'<text x="{_MARGIN_L + _STATE_W / 2}" y="{base_y + 14}" text-anchor="middle">state'
               f'</text>')
    # arena buffers: x = live interval, y = address
    for b in doc["buffers"]:
        if b["region"] != "arena":
            continue
        h = max(b["nbytes"] * byte_scale, 1.0)
        y = base_y - b["offset"] * byte_scale - h
        x = x0 + b["first"] * sx
        w = (b["last"] - b["first"] + 1) * sx
        out.append(f'<rect class="buf" x="{x:.2f}" y="{y:.2f}" width="{w:.2f}" height="{h:.2f}" '
                   f'fill="{ROLE_COLOURS.get(b["role"], "#999")}">'
                   f'<title>{escape(_tooltip(b, tensors))}</title></rect>')
    # the arena's top and the peak step
    peak_x = x0 + (doc["peak"]["step"] + 0.5) * sx
    out.append(f'<line x1="{x0}" y1="{base_y - arena_h:.2f}" x2="{x0 + _PLOT_W}" '
               f'y2="{base_y - arena_h:.2f}" stroke="#000" stroke-dasharray="4 3"/>')
    out.append(f'<line x1="{peak_x:.2f}" y1="{_MARGIN_T}" x2="{peak_x:.2f}" y2="{base_y}" '
               f'stroke="#000" stroke-width="0.6" stroke-dasharray="2 2"><title>peak: step '
               f'{doc["peak"]["step"]}, {doc["peak"]["nbytes"]:,} B live</title></line>')
    # step axis
    out.append(f'<line x1="{x0}" y1="{base_y}" x2="{x0 + _PLOT_W}" y2="{base_y}" stroke="#888"/>')
    tick = max(1, round(steps / 8))
    for s in range(0, steps, tick):
        x = x0 + (s + 0.5) * sx
        out.append(f'<text x="{x:.2f}" y="{base_y + 14}" text-anchor="middle">{s}</text>')
    out.append(f'<text x="{x0 + _PLOT_W / 2}" y="{base_y + 28}" text-anchor="middle">schedule step '
               f'(forward, loss, backward, update)</text>')
    assert state_h <= plot_h + 0.5 and arena_h <= plot_h + 0.5, "byte scale does not fit the plot"
    out.append("</svg>")
    return "\n".join(out)


def plan_to_html(plans: Sequence[dict[str, Any]], *, title: str = "bnnc memory plan") -> str:
    """A self-contained HTML page drawing each plan document, side by side at one byte scale."""
    if not plans:
        raise PlanError("no plan to draw")
    biggest = max(max(d["arena"]["nbytes"], d["state"]["nbytes"]) for d in plans)
    byte_scale = _PLOT_H / biggest if biggest else 0.0
    used = {b["role"] for d in plans for b in d["buffers"]}
    legend = "".join(f'<span><i style="background:{ROLE_COLOURS[r.value]}"></i>'
                     f'{escape(r.value)}</span>' for r in ROLE_ORDER if r.value in used)
    parts = ['<!DOCTYPE html>', '<html xmlns="http://www.w3.org/1999/xhtml" lang="en">',
             f'<head><meta charset="utf-8"/><title>{escape(title)}</title>',
             f'<style>{_CSS}</style></head>', '<body>', f'<h1>{escape(title)}</h1>',
             '<p>Address (up) against schedule step (right); each rectangle is one arena buffer, '
             'coloured by role; hover for its tensors. The state column holds parameters, '
             'optimizer moments and BN statistics for the whole program (frozen parameters of a '
             'partially trained model on top). All plans share one byte '
             'scale.</p>',
             f'<div class="legend">{legend}</div>', '<div class="plans">']
    for d in plans:
        a = d["arena"]
        parts += ['<div class="plan">',
                  f'<h2>{escape(d["model"])}: {escape(str(d["config"].get("algorithm", "")))}</h2>',
                  f'<p>{escape(describe_config(d["config"]))}</p>',
                  f'<p>arena {a["nbytes"]:,} B ({_mib(a["nbytes"])} MiB), lower bound '
                  f'{a["lower_bound"]:,} B, efficiency {a["efficiency"]:.4f} '
                  f'({escape(a["heuristic"])}); state {d["state"]["nbytes"]:,} B; total '
                  f'{_mib(d["total_nbytes"])} MiB</p>',
                  _svg(d, byte_scale), '</div>']
    parts += ['</div>', '</body>', '</html>']
    return "\n".join(parts) + "\n"
