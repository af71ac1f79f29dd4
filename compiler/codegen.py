"""Codegen: `emit_c(schedule, plan, target, out_dir) -> Emitted`, a static C99 training program.

Input: a verified `Schedule`, its `ArenaPlan` (offsets of every arena buffer and state tensor) and a
`Target` (targets/<name>.toml). Output, in `out_dir`: `<model>.h` (public API, sizes), `<model>.c`
(kernels, one `static` function per schedule step, the API), `Makefile` and `bnnc_manifest.json`
(what runtime/host.py needs to drive and read the program: tensor table, state layout, sizes).

Invariants of the generated C:
- C99 with <stdint.h>, <stddef.h>, <string.h>, <math.h> only; no malloc; globals are exactly one
  static arena and one static state object (plus, under -DBNNC_DEBUG_DUMP only, a dump buffer);
- every schedule step is one `static void step_NNN_<kernel>_<layer>(void)` called straight-line by
  the train step at the plan's fixed offsets; only the kernels the schedule uses are emitted, one C
  function per (kernel, operand dtypes, variant);
- identifiers come from bnnc (layer names are already C identifiers); ONNX names never appear;
- deterministic: the same (schedule, plan, target, command, hash) gives byte-identical files.

Division of labour: every offset, size, stride and constant is computed in Python and passed as a
literal argument -- per step by its kernel's lowering (`KernelSpec.lower`, in the op family that
owns the kernel, compiler/ops/; shared helpers in compiler/lower.py), which this module calls;
the templates in templates/ only loop and substitute. Float constants are printed as the double
`repr` of the value the numpy reference uses, then cast to float in C, so C and numpy round the
same double to float32 (`c_literals.c_float`; the op families' reference sections use
`np.float32(v)` of the same double).

Numerics the C must share with runtime/reference.py (tests compare them): sign(0) = +1 everywhere;
stochastic rounding keyed by (seed, step, tensor id, element) via `numerics.sr_bits`; BN statistics
and moments stored with RNE/SR as `compiler.state` says; PO2 codes exactly as
`numerics.po2_quantize`.

Kernels: portable C (64-bit XNOR-popcount for binary forward passes, sign-select add/sub for binary
backward passes, PO2 gradients as exact integer sums) with SIMD variants chosen by the target (NEON
when its toml lists `simd = ["neon"]`) or at run time (AVX2 on x86-64), each adding every output's
terms in the same order, so every variant is bit-identical to the portable build (-DBNNC_NO_SIMD
selects it). Stride-1 binary convs on host/Linux targets add by table lookup (the 256 sums of 8
values' sign patterns, "Four Russians") and keep fixed-size stack scratch per call (at most
`lower.CONV_SCRATCH_BYTES`: sign patterns, tables, partial sums); bare-metal targets keep the
portable loops. Limits: the batch must live in the arena (liveness io="arena").

Partial training (`cfg.frozen`): the frozen parameters are the state region's tail
(`plan.frozen_nbytes` from `plan.frozen_offset`); their `S_` macros point at `BNNC_F`, that tail.
On bare-metal targets the Cortex-M release build keeps only the trained part of the state in RAM
and `set_state` points `BNNC_F` into the start-state blob in flash (`<MODEL>_FROZEN_IN_FLASH` in
the header), so frozen weights are `const` flash; `get_state` and the bare-metal checkpoint stream
both parts. Every other build (host, Linux, the debug build) keeps the tail in RAM. A program
without frozen parameters is emitted exactly as before.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import jinja2
import numpy as np

from .. import __version__
from .baremetal import emit_baremetal
from .firmware_api import fw_context
from .library import emit_library
from . import numerics as nx
from .c_literals import c_comment, c_float, c_ident, c_label, c_string, pixel_lut_c
from .contract import (DTYPE_CODES, MANIFEST, REGION_CODES, STATE_BLOB_HEADER_BYTES,
                       STATE_BLOB_MAGIC, STATE_BLOB_VERSION, STATUSES, TRAINER_SOURCE, Manifest,
                       StateEntry, StepEntry, TensorEntry)
from .errors import PlanError, TargetError
from .lower import CTYPES, Call, Instance, LowerCtx, call_lines, part_args
from .ops.base import Phase
from .ops.dense import packed_w_geometry
from .ops.loss import SOFTMAX_ROWS
from .ops.optim import bop_geometry
from .preprocess import DEFAULT as DEFAULT_PREPROCESS
from .preprocess import Preprocess, input_channels, resolved
from .schedule_ir import DType, Schedule, Step
from .target import Target, load_target
from .templating import render_kernels, target_env


@dataclass(frozen=True)
class Emitted:
    out_dir: Path
    model: str
    prefix: str
    header: Path
    source: Path
    makefile: Path
    manifest: Path
    files: tuple[Path, ...]
    kernels: tuple[str, ...]          # C kernel function names used
    doc: Manifest | None = field(default=None, repr=False)


def _state_entries(schedule: Schedule, plan) -> list[StateEntry]:
    out = []
    for tid, t in enumerate(x for x in schedule.tensors.values()
                            if x.role.persistent and x.alias_of is None):
        region, off = plan.tensor_offsets.get(t.name, ("state", None))
        assert region == "state" and off is not None, f"state tensor {t.name} has no state offset"
        fieldname = t.name.split(".", 1)[1]
        if fieldname == "W":
            fan_in = t.shape[0] if len(t.shape) == 2 else int(np.prod(t.shape[1:]))
            init = "normal"
        elif fieldname in ("gamma", "running_var", "running_psi"):
            init, fan_in = "one", 0
        else:
            init, fan_in = "zero", 0
        out.append(StateEntry(t.name, t.dtype.value, t.shape, off, t.nbytes, t.role.value, tid,
                              t.layout, init, fan_in))
    return out


def _model_hash(schedule: Schedule, plan, model_sha256: str) -> int:
    """64 bits that change whenever the state layout or the training step changes."""
    h = hashlib.sha256()
    h.update(model_sha256.encode())
    h.update(json.dumps(schedule.config.as_dict(), sort_keys=True).encode())
    for t in schedule.tensors.values():
        h.update(f"{t.name}|{t.dtype.value}|{t.shape}|{t.nbytes}|{t.layout}|{t.alias_of}\n"
                 .encode())
    for s in schedule.steps:
        h.update(f"{s.kernel.name}|{s.inputs}|{s.outputs}\n".encode())
    h.update(json.dumps(sorted(plan.tensor_offsets.items())).encode())
    return int.from_bytes(h.digest()[:8], "little")


def _crc_table() -> list[int]:
    """The CRC-32 (IEEE 802.3, reflected 0xEDB88320) byte table, as zlib uses."""
    out = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ (0xEDB88320 if c & 1 else 0)
        out.append(c)
    return out


def _guard_context(schedule: Schedule, plan) -> dict:
    """What templates/model.c.j2 needs for a guarded plan (planner guard_bytes > 0): the canary
    ranges, and per step the arena bytes just past / just before its first output's buffer (the
    -DBNNC_OOB_STEP test write). Empty for an unguarded plan, which emits no guard code at all."""
    guards = []
    for g in getattr(plan, "guards", ()):
        # the C reports these names in a JSON line without escaping them
        assert all(re.fullmatch(r"[A-Za-z0-9_.]+", t) for t in g.tensors), g.tensors
        guards.append(dict(lo=g.lo, offset=g.offset, end=g.end, hi=g.hi, first=g.first,
                           last=g.last, name=c_string(", ".join(g.tensors))))
    oob = {}
    for s in schedule.steps if guards else ():
        region, off = plan.tensor_offsets.get(s.outputs[0], ("", 0)) if s.outputs else ("", 0)
        hit = [g for g in plan.guards if region == "arena" and g.offset == off
               and g.first <= s.index <= g.last]
        if hit:
            oob[s.index] = (hit[0].offset - 1, hit[0].end)
    return dict(guards=guards, guard_oob=oob, guard_bytes=getattr(plan, "guard_bytes", 0))


def _perturb_line(step: Step, ctx: LowerCtx) -> tuple[str, str]:
    """(macro name, C statement) that corrupts element 0 of the step's first output by "one"."""
    out = step.outputs[0]
    dt = ctx.t(out).dtype
    p = ctx.ptr(out)
    stmt = {
        DType.F32: f"{p}[0] += 1.0f;",
        DType.F16: f"{p}[0] = bnnc_f32_to_f16_rne(bnnc_f16_to_f32({p}[0]) + 1.0f);",
        DType.BF16: f"{p}[0] = bnnc_f32_to_bf16_rne(bnnc_bf16_to_f32({p}[0]) + 1.0f);",
        DType.BIT: f"{p}[0] ^= 1u;",
        DType.PO2: f"{p}[0] ^= 1u;",
        DType.U8: f"{p}[0] ^= 1u;",
        DType.I32: f"{p}[0] += 1;",
    }[dt]
    return f"BNNC_PERTURB_{step.kernel.name.upper()}", stmt


MAX_C_TENSOR_NBYTES = 2**31 - 1     # the kernels index a tensor's elements/bytes with int


def _check_emittable(schedule: Schedule, plan, target: Target) -> None:
    """PlanError when the schedule is broken or the plan's alignment is below the target's."""
    schedule.verify()
    if plan.align % 8 or plan.align < target.align:
        raise PlanError(f"plan alignment {plan.align} is below target {target.name}'s "
                        f"{target.align}", hint=f"plan with --align {target.align}")
    # Planning, `bnnc inspect` and `bnnc memory` take any size (Python ints); only the C has
    # limits: its kernels index a tensor's elements with `int`, and the arena and state must be
    # addressable with the target's size_t.
    big = max(schedule.tensors.values(), key=lambda t: t.nbytes, default=None)
    if big is not None and big.nbytes > MAX_C_TENSOR_NBYTES:
        raise PlanError(f"model '{schedule.graph_name}': tensor '{big.name}' of shape "
                        f"{list(big.shape)} needs {big.nbytes:,} bytes at batch "
                        f"{schedule.config.batch}; the generated C indexes a tensor with 32-bit "
                        f"ints (at most {MAX_C_TENSOR_NBYTES:,} bytes)",
                        hint="use a smaller batch or a smaller model input (`bnnc inspect` and "
                             "`bnnc memory` plan any size)")
    size_t_max = 2**(8 * target.pointer_bytes) - 1
    if plan.arena_nbytes + plan.state_nbytes > size_t_max:
        raise PlanError(f"arena + state need {plan.arena_nbytes + plan.state_nbytes:,} bytes, "
                        f"more than target {target.name}'s {8 * target.pointer_bytes}-bit address "
                        "space", hint="use a smaller batch")


def _tensor_table(schedule: Schedule, plan) -> tuple[list[TensorEntry], dict[str, int], int]:
    """Every schedule tensor that has storage somewhere: the table rows, each stored tensor's
    offset in the -DBNNC_DEBUG_DUMP buffer (views share their base's) and that buffer's size."""
    dump_off: dict[str, int] = {}
    top = 0
    for t in schedule.tensors.values():
        if t.name in plan.tensor_offsets and t.alias_of is None:
            dump_off[t.name] = top
            top += -(-t.nbytes // 16) * 16
    tensors: list[TensorEntry] = []
    for t in schedule.tensors.values():
        if t.name not in plan.tensor_offsets:
            continue
        region, off = plan.tensor_offsets[t.name]
        if region not in REGION_CODES:
            raise PlanError(f"tensor {t.name} lives in region {region!r}; codegen needs the "
                            "batch in the arena", hint="plan with io='arena' (the default)")
        tensors.append(_with_geom(TensorEntry(
            len(tensors), t.name, t.dtype.value, t.shape, region, off, t.nbytes, t.layout,
            dump_off[t.alias_of or t.name], t.alias_of), schedule))
    if any(len(e.shape) > 4 for e in tensors):
        raise TargetError(f"model {schedule.graph_name!r} has a tensor of rank > 4; the C tensor "
                          "table holds 4 dims")
    return tensors, dump_off, max(top, 16)


def _use(instances: dict[str, Instance], inst: Instance) -> None:
    """Record a kernel instance the program calls (one C function per name)."""
    instances.setdefault(inst.fn, inst)
    assert instances[inst.fn] == inst, inst.fn


def _threaded(call: Call, name: str, threads: int) -> dict | None:
    """What a step function splits over `threads` threads: its part function (the call on a range
    of its output) and the `bnnc_par` call that runs the parts, or for a `lower.Threaded` step its
    part functions and statics (`text`) and its statements; None when it runs whole."""
    if threads > 1 and call.threaded is not None:
        th = call.threaded
        fns = []
        for suffix, lines in th.parts.items():
            fns += [f"static void {{step}}_{suffix}(int32_t lo, int32_t hi)", "{", *lines, "}", ""]
        return dict(fn="", geom=False, call=[],
                    text=[ln.replace("{step}", name) for ln in (*th.statics, "", *fns)],
                    run=[ln.replace("{step}", name) for ln in th.body])
    if threads < 2 or call.split is None or call.split.extent < 2 or call.body is not None:
        return None
    sp = call.split
    return dict(fn=f"{name}_part", geom=sp.geom, text=None,
                call=call_lines(call.inst.fn, part_args(call)),
                run=[f"    bnnc_par({name}_part, {sp.extent}, {sp.unit});"])


def _step_calls(schedule: Schedule, ctx: LowerCtx, dump_off: Mapping[str, int],
                instances: dict[str, Instance], onnx_names: Mapping[str, str],
                threads: int = 1) -> list[dict]:
    """One static step function per schedule step: its name, comment, kernel call, debug dumps
    and test hooks (what templates/model.c.j2 renders); with `threads` > 1, a split call's
    part function (`part`)."""
    steps = []
    for s in schedule.steps:
        call = s.kernel.lower(s, ctx)
        macro, stmt = _perturb_line(s, ctx)
        name = c_ident(f"step_{s.index:03d}_{s.kernel.name}"
                       + (f"_{s.layer}" if s.layer else ""))
        part = _threaded(call, name, threads)
        for inst in (call.threaded.uses if part and call.threaded else (call.inst, *call.uses)):
            _use(instances, inst)
        steps.append(dict(index=s.index, name=name, kernel=s.kernel.name, layer=s.layer,
                          phase=s.phase.value,
                          comment=c_comment(f"{', '.join(s.inputs)} -> {', '.join(s.outputs)}"),
                          onnx=c_label(onnx_names.get(s.layer, "")),
                          fn=call.inst.fn, reads=tuple(s.inputs), writes=tuple(s.outputs),
                          call=part["run"] if part else (
                              call.body or call_lines(call.inst.fn, call.args)),
                          decls=[] if part else call.decls, part=part, part_decls=call.decls,
                          dumps=[(dump_off[o], ctx.ptr(o), ctx.t(o).nbytes)
                                 for o in s.outputs],
                          perturb_macro=macro, perturb=stmt,
                          uses_t=s.phase is Phase.UPDATE, uses_acc=s.phase is Phase.LOSS,
                          loss_ptr=(ctx.ptr(s.outputs[0]) if s.phase is Phase.LOSS
                                    else "")))
    return steps


def _predict_calls(schedule: Schedule, ctx: LowerCtx, steps: list[dict],
                   instances: dict[str, Instance]) -> tuple[list[dict], dict]:
    """The predict entry: the forward steps with BN in inference mode, then a softmax of the
    logits into the probabilities."""
    infer = []
    for s in schedule.steps:
        if s.phase is not Phase.FORWARD:
            continue
        if s.kernel.lower_infer is not None:
            call = s.kernel.lower_infer(s, ctx)
            for inst in (call.inst, *call.uses):
                _use(instances, inst)
            # a fused step's loop (ops/conv_bn_sign.py conv_bn_sign_fwd): a block with its constants
            lines = (["    {", *(f"        {d}" for d in call.decls),
                      *(f"    {ln}" for ln in call.body), "    }"]
                     if call.body is not None else call_lines(call.inst.fn, call.args, indent=4))
            infer.append(dict(kind="call", call=lines))
        else:
            infer.append(dict(kind="step", name=steps[s.index]["name"], index=s.index))
    _use(instances, SOFTMAX_ROWS)
    loss_step = next(s for s in schedule.steps if s.phase is Phase.LOSS)
    logits, probs = loss_step.inputs[0], loss_step.outputs[1]
    return infer, dict(logits=ctx.ptr(logits), probs=ctx.ptr(probs),
                       probs_const=ctx.ptr(probs), classes=loss_step.attrs["classes"])


def _pixel_context(preprocess: Preprocess, sample_shape: tuple[int, ...]) -> dict:
    """The trainers' pixel tables: `pixel_lut` (one row per channel, or one shared row),
    `pixel_plane` (inputs per channel of an example, NCHW) and the convention for the comment."""
    channels = input_channels(tuple(sample_shape))
    luts = pixel_lut_c(preprocess, channels)
    return dict(pixel_lut=luts, pixel_plane=int(np.prod(sample_shape)) // channels,
                pixel_doc=c_comment(resolved(preprocess, channels).describe()))


def _tensor_macros(tensors: list[TensorEntry], ctx: LowerCtx, plan) -> list[dict]:
    """The `#define T_<tensor>` / `S_<tensor>` lines of model.c: a typed pointer into the arena or
    the state per table row; a frozen parameter's points into the state's frozen tail `BNNC_F`
    (in flash on bare-metal targets)."""
    def frozen(e: TensorEntry) -> bool:
        return e.region == "state" and plan.frozen_nbytes > 0 and e.offset >= plan.frozen_offset

    return [dict(name=ctx.ptr(e.name), ctype=CTYPES[DType(e.dtype)][0],
                 offset=e.offset - plan.frozen_offset if frozen(e) else e.offset,
                 base="BNNC_F" if frozen(e) else "BNNC_A" if e.region == "arena" else "BNNC_S",
                 comment=c_comment(f"{e.name} {list(e.shape)} {e.dtype}"))
            for e in tensors]


def _template_context(schedule: Schedule, plan, target: Target, ctx: LowerCtx, *, command: str,
                      model_sha256: str, onnx_names: Mapping[str, str],
                      preprocess: Preprocess, threads: int = 1) -> tuple[dict, list[str]]:
    """Everything the templates substitute (model.c/.h, trainer, Makefile, bare-metal files) and
    the names of the kernel functions the program uses."""
    cfg = schedule.config
    model = c_ident(schedule.graph_name)
    prefix = f"bnnc_{model}"
    tensors, dump_off, dump_nbytes = _tensor_table(schedule, plan)
    states = _state_entries(schedule, plan)
    instances: dict[str, Instance] = {}
    steps = _step_calls(schedule, ctx, dump_off, instances, onnx_names, threads)
    infer, predict = _predict_calls(schedule, ctx, steps, instances)
    input_t, labels_t = schedule.tensors["input"], schedule.tensors["labels"]
    mhash = _model_hash(schedule, plan, model_sha256)
    # bare-metal release builds read the frozen tail of the state from the blob in flash
    frozen_flash = target.kind == "baremetal" and plan.frozen_nbytes > 0
    common = dict(
        version=__version__, command=c_comment(command or "(emit_c called from Python)"),
        model=model, prefix=prefix, PREFIX=prefix.upper(), model_sha256=model_sha256 or "(unknown)",
        algorithm=cfg.algorithm, optimizer=cfg.optimizer, config=c_comment(
            ", ".join(f"{k}={v}" for k, v in cfg.as_dict().items())),
        arena_nbytes=max(plan.arena_nbytes, 16), lower_bound=plan.lower_bound,
        efficiency=f"{plan.efficiency:.3f}", align=plan.align, heuristic=plan.heuristic,
        state_nbytes=max(plan.state_nbytes, 16),
        state_elems=sum(int(np.prod(st.shape)) for st in states),
        blob_nbytes=STATE_BLOB_HEADER_BYTES + max(plan.state_nbytes, 16),
        blob_header=STATE_BLOB_HEADER_BYTES, blob_magic=f"0x{STATE_BLOB_MAGIC:08X}u",
        blob_version=STATE_BLOB_VERSION, model_hash=f"UINT64_C(0x{mhash:016X})", mhash=mhash,
        batch=cfg.batch, input_shape=list(input_t.shape), input_elems=input_t.size,
        input_ptr=ctx.ptr("input"), input_ctype=CTYPES[input_t.dtype][0],
        input_desc=("uint8 pixels (--input u8: the model's preprocessing is applied by its first "
                    "layer)" if input_t.dtype is DType.U8 else "float32"),
        labels_ptr=ctx.ptr("labels"), classes=predict["classes"],
        seed=cfg.seed, num_tensors=len(tensors), num_steps=len(steps), dump_nbytes=dump_nbytes,
        input_dump=dump_off["input"], labels_dump=dump_off["labels"],
        input_nbytes=input_t.nbytes, labels_nbytes=labels_t.nbytes,
        statuses=[(f"BNNC_{k}", v) for k, v in STATUSES],
        tensor_entries=tensors, state_entries=states,
        tensor_macros=_tensor_macros(tensors, ctx, plan),
        frozen_nbytes=plan.frozen_nbytes, frozen_offset=plan.frozen_offset,
        frozen_flash=frozen_flash,
        tensors=[dict(e.__dict__, dtype_code=DTYPE_CODES[DType(e.dtype)],
                      region_code=REGION_CODES[e.region], ndim=len(e.shape),
                      shape=list(e.shape) + [0] * (4 - len(e.shape)), comment=c_comment(e.name))
                 for e in tensors],
        states=[dict(s.__dict__, elems=int(np.prod(s.shape)), ctype=CTYPES[DType(s.dtype)][0],
                     ptr=ctx.ptr(s.name), dtype_code=DTYPE_CODES[DType(s.dtype)],
                     rows=_state_rows(s, ctx), comment=c_comment(s.name),
                     frozen_flash=frozen_flash and s.offset >= plan.frozen_offset)
                for s in states],
        steps=steps, infer=infer, predict=predict,
        dtype_codes=[(d.value.upper(), c) for d, c in DTYPE_CODES.items()],
        crc_table=[f"0x{v:08X}u" for v in _crc_table()], target=target.name,
        target_kind=target.kind, threads=threads, **_pixel_context(preprocess, input_t.shape[1:]),
        **_lr_context(schedule),
        **_guard_context(schedule, plan),
    )
    return common, sorted(instances.values(), key=lambda i: (i.family, i.fn))


def _lr_context(schedule: Schedule) -> dict:
    """The learning-rate schedule of templates/model.c.j2 (`<prefix>_lr_at`, the same float32
    operations as numerics.lr_at): "constant" when no update step reads an lr (Bop without
    real-valued tensors)."""
    cfg = schedule.config
    used = any(s.attrs.get("lr_schedule") for s in schedule.steps)
    return dict(lr_schedule=cfg.lr_schedule if used else "constant", lr_base=c_float(cfg.lr),
                lr_half_pi=c_float(nx.HALF_PI), lr_cos=[c_float(c) for c in nx.COS_TAYLOR],
                lr_sin=[c_float(c) for c in nx.SIN_TAYLOR])


def _render_program(env: jinja2.Environment, common: dict, kernels: list[str], target: Target,
                    out: Path, emit: str = "program") -> list[Path]:
    """Write <model>.h, <model>.c, the trainer of the target's platform and the Makefile (emit
    "library": <model>.h/.c in src/ and the library layout of compiler/library.py instead of the
    trainer; its CMakeLists.txt stands in the Makefile's place); returns them, header and source
    first."""
    model = common["model"]
    src = out / "src" if emit == "library" else out
    src.mkdir(parents=True, exist_ok=True)
    header, source, makefile = src / f"{model}.h", src / f"{model}.c", out / "Makefile"
    header.write_text(env.get_template("model.h.j2").render(**common))
    source.write_text(env.get_template("model.c.j2").render(**common, kernels=kernels))
    if emit == "library":
        extra = emit_library(env, common, target, out)
        cmake = out / "CMakeLists.txt"
        return [header, source, cmake, *(p for p in extra if p != cmake)]
    programs = target.kind in ("host", "linux")
    extra: list[Path] = []
    if programs:
        trainer = out / TRAINER_SOURCE
        trainer.write_text(env.get_template("trainer.c.j2").render(**common))
        extra.append(trainer)
    if target.kind == "baremetal":
        extra += emit_baremetal(env, common, target, out)
    makefile.write_text(env.get_template("Makefile.j2").render(
        **common, cc=target.cc, cflags=" ".join(target.cflags),
        ldflags=" ".join(target.ldflags), programs=programs))
    return [header, source, makefile, *extra]


EMITS = ("program", "library")
MAX_THREADS = 64


def check_threads(threads: int, target: Target) -> None:
    """TargetError unless `threads` is 1, or 2..MAX_THREADS on a Linux target (host or a Pi: POSIX
    threads; a bare-metal target has one core and no threads)."""
    if threads == 1:
        return
    if not 1 <= threads <= MAX_THREADS:
        raise TargetError(f"--threads {threads}: give 1 to {MAX_THREADS}")
    if target.kind not in ("host", "linux"):
        raise TargetError(f"--threads {threads}: target {target.name} is bare metal (one core, no "
                          "POSIX threads); only host, rpi4 and rpi3 builds take --threads > 1",
                          hint="leave out --threads (1, the default) for this target")


def emit_c(schedule: Schedule, plan, target: Target | str, out_dir: str | Path, *, command: str = "",
           model_sha256: str = "", plan_json: str | None = None,
           onnx_names: Mapping[str, str] | None = None, emit: str = "program",
           preprocess: Preprocess = DEFAULT_PREPROCESS, threads: int = 1) -> Emitted:
    """Write the C program of one training step of `schedule` placed by `plan` into `out_dir`
    (`target`: a Target or a targets/ name; `command`, `model_sha256`: front matter; `plan_json`:
    written as plan.json when given; `onnx_names`: layer -> ONNX node name, named (reduced to
    identifier characters, `c_literals.c_label`) in the comment above each step function and
    nowhere else; `preprocess`: the u8 pixel -> input map of the trainers' pixel tables, recorded
    in the manifest; `threads`: the threads a training step runs on, Linux targets only
    (`check_threads`), recorded in the manifest). Stages: check, template context (tensor
    table, state table, step calls, predict, guards), kernel sources, files."""
    if isinstance(target, str):
        target = load_target(target)
    if emit not in EMITS:
        raise TargetError(f"--emit {emit!r} is not one of {', '.join(EMITS)}")
    _check_emittable(schedule, plan, target)
    check_threads(threads, target)
    ctx = LowerCtx(schedule, plan)
    env = target_env(target)
    common, instances = _template_context(schedule, plan, target, ctx, command=command,
                                          model_sha256=model_sha256, onnx_names=onnx_names or {},
                                          preprocess=preprocess, threads=threads)
    common.update(fw_context(schedule, plan, common))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = _render_program(env, common, render_kernels(env, instances), target, out, emit)
    header, source, makefile = written[:3]
    manifest = out / MANIFEST
    tensors, states, steps = common["tensor_entries"], common["state_entries"], common["steps"]
    programs = target.kind in ("host", "linux") and emit == "program"
    cfg, mhash, model, prefix = schedule.config, common["mhash"], common["model"], common["prefix"]
    input_t = schedule.tensors["input"]
    classes, elems, dump_nbytes = common["classes"], common["state_elems"], common["dump_nbytes"]
    doc = Manifest(bnnc_version=__version__, model=model, prefix=prefix, model_hash=mhash,
                   model_sha256=model_sha256, target=target.name, target_kind=target.kind,
                   config=cfg.as_dict(), batch=cfg.batch, input_shape=tuple(input_t.shape),
                   classes=classes, seed=cfg.seed, arena_nbytes=plan.arena_nbytes,
                   state_nbytes=plan.state_nbytes, state_elems=elems, dump_nbytes=dump_nbytes,
                   header=header.relative_to(out).as_posix(),
                   source=source.relative_to(out).as_posix(),
                   trainer=TRAINER_SOURCE if programs else None, tensors=tuple(tensors),
                   state=tuple(states), steps=tuple(StepEntry(s["index"], s["kernel"], s["layer"], s["fn"],
                                                              s["reads"], s["writes"])
                                                    for s in steps),
                   frozen=tuple(cfg.frozen), frozen_nbytes=plan.frozen_nbytes,
                   preprocess=resolved(preprocess, input_channels(tuple(input_t.shape[1:]))),
                   threads=threads)
    manifest.write_text(doc.to_json())
    files = [header, source, makefile, manifest, *written[3:]]
    if plan_json is not None:
        pj = out / "plan.json"
        pj.write_text(plan_json)
        files.append(pj)
    return Emitted(out, model, prefix, header, source, makefile, manifest, tuple(files),
                   tuple(sorted(i.fn for i in instances)), doc)


def _with_geom(e: TensorEntry, schedule: Schedule) -> TensorEntry:
    """Attach the NHWC bit-order geometry to packed dense weights read by an XNOR kernel."""
    if e.dtype != "bit" or not e.layout.startswith("bits W^T"):
        return e
    hw, wc = packed_w_geometry(schedule, e.name)
    return TensorEntry(**{**e.__dict__, "geom": {"hw": hw, "wc": wc}}) if wc else e


def _state_rows(s: StateEntry, ctx: LowerCtx) -> dict:
    """Geometry of a packed (Bop) state weight for the element <-> bit mapping of init/load/read."""
    if s.dtype != "bit":
        return dict(kind=-1, a=0, b=0, words=0, hw=1, wc=0)
    kind, a, b, words, hw, wc = bop_geometry(ctx, s.name)
    return dict(kind=kind, a=a, b=b, words=words, hw=hw, wc=wc)


def header_cdef(header_text: str) -> str:
    """The part of a generated header that cffi's cdef reads: between the CDEF markers, without
    preprocessor lines (cffi gets constants from the manifest instead)."""
    m = re.search(r"/\* BEGIN CDEF \*/\n(.*?)/\* END CDEF \*/", header_text, re.S)
    if not m:
        raise TargetError("generated header has no CDEF section; regenerate it with this "
                          "bnnc version")
    return "\n".join(line for line in m.group(1).splitlines() if not line.lstrip().startswith("#"))
