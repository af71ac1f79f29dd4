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

Division of labour: every offset, size, stride and constant is computed here, in Python, and passed
as a literal argument; the templates in templates/ only loop and substitute. Float constants are
printed as the double `repr` of the value the numpy reference uses, then cast to float in C, so C
and numpy round the same double to float32 (`_f32(...)` in runtime/reference.py).

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
_CONV_SCRATCH_BYTES: sign patterns, tables, partial sums); bare-metal targets keep the portable
loops. Limits: the batch must live in the arena (liveness io="arena").
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import jinja2
import numpy as np

from .. import __version__
from .errors import PlanError, TargetError
from .schedule_ir import DType, Schedule, Step, Tensor
from .target import TARGETS, Target, load_target  # noqa: F401  (re-exported)

_ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = _ROOT / "templates"
MANIFEST = "bnnc_manifest.json"
STATE_BLOB_HEADER_BYTES = 40      # magic, version, model hash, step, seed, CRC-32, state bytes
STATE_BLOB_MAGIC = 0x534E4E42     # "BNNS" little-endian
STATE_BLOB_VERSION = 2            # 2: the CRC-32 field (was reserved, 0)
TRAINER_SOURCE = "trainer.c"      # the standalone trainer of host/linux targets
# u8 pixel -> 2*x/255 - 1, one rounding of the exact rational (runtime/datasets.py scale_pixels)
PIXEL_LUT = ((2.0 * np.arange(256) - 255.0) / 255.0).astype(np.float32)
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# dtype -> (C element type, load fn, RNE store fn, stochastic store fn)
_CTYPES: dict[DType, tuple[str, str, str, str]] = {
    DType.F32: ("float", "bnnc_ld_f32", "bnnc_st_f32", "bnnc_sr_f32"),
    DType.BF16: ("uint16_t", "bnnc_ld_bf16", "bnnc_st_bf16", "bnnc_sr_bf16"),
    DType.F16: ("uint16_t", "bnnc_ld_f16", "bnnc_st_f16", "bnnc_sr_f16"),
    DType.BIT: ("uint64_t", "", "", ""),
    DType.PO2: ("uint8_t", "", "", ""),
    DType.U8: ("uint8_t", "", "", ""),
    DType.I32: ("int32_t", "", "", ""),
}
# the dtype codes of the C tensor table (and the manifest)
DTYPE_CODES = {d: i for i, d in enumerate((DType.F32, DType.F16, DType.BF16, DType.BIT, DType.PO2,
                                            DType.U8, DType.I32))}
REGION_CODES = {"arena": 0, "state": 1}
# returned by the generated API; the C enum and its string table are generated from this one list
STATUSES = (("OK", "ok"),
            ("ERR_LABEL", "a label is outside [0, classes)"),
            ("ERR_SIZE", "buffer size does not match the model"),
            ("ERR_BLOB", "state blob has a wrong magic, version or model hash"),
            ("ERR_CRC", "state blob is corrupted (CRC-32 mismatch)"),
            ("ERR_NONFINITE", "loss is not finite (training diverged)"))


# --------------------------------------------------------------------------------------------------
# targets

# --------------------------------------------------------------------------------------------------
# C literals

def c_float(v: float) -> str:
    """A float32 constant as C: the double's repr cast to float (what np.float32(v) rounds).

    >>> c_float(0.9)
    '(float)0.9'
    >>> c_float(1e-07)
    '(float)1e-07'
    >>> c_float(2.0)
    '(float)2.0'
    """
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"non-finite constant {v}")
    return f"(float){v!r}"


def c_comment(text: str) -> str:
    """Text made safe inside a /* */ comment (no comment terminators, printable ASCII).

    >>> c_comment("a */ b\\n")
    'a * / b '
    """
    s = "".join(ch if 32 <= ord(ch) < 127 else " " for ch in str(text))
    return s.replace("*/", "* /").replace("/*", "/ *")


def c_string(text: str) -> str:
    """A C string literal for `text` (ASCII; anything else escaped).

    >>> c_string('fc1.W')
    '"fc1.W"'
    >>> c_string('a"b')
    '"a\\"b"'
    """
    out = []
    for ch in str(text):
        if ch in '"\\':
            out.append("\\" + ch)
        elif 32 <= ord(ch) < 127 and ch != "?":
            out.append(ch)
        else:
            out.append(f"\\{ord(ch) & 0xFF:03o}")
    return '"' + "".join(out) + '"'


def c_ident(text: str) -> str:
    """Check that `text` is a C identifier (bnnc chooses them; this guards against a bug).

    >>> c_ident("fc1")
    'fc1'
    """
    if not _IDENT.match(text):
        raise AssertionError(f"{text!r} is not a C identifier")
    return text


# --------------------------------------------------------------------------------------------------
# kernel instances and calls

@dataclass(frozen=True)
class DT:
    """What a template needs to touch one operand: C element type, load/store function names."""
    dtype: str
    ctype: str
    ld: str
    st: str
    sr: str


def _dt(d: DType) -> DT:
    c, ld, st, sr = _CTYPES[d]
    return DT(d.value, c, ld, st, sr)


@dataclass(frozen=True)
class Instance:
    family: str        # templates/kernels/<family>.c.j2
    macro: str         # macro in that file
    fn: str            # C function name
    types: tuple[tuple[str, DT], ...]
    flags: tuple[tuple[str, Any], ...] = ()


@dataclass
class Call:
    inst: Instance
    args: list
    decls: list[str] = field(default_factory=list)    # step-local constants the call refers to


class _Ctx:
    """Offsets and dtypes of a schedule's tensors as C pointer expressions."""

    def __init__(self, schedule: Schedule, plan):
        self.s = schedule
        self.plan = plan

    def t(self, name: str) -> Tensor:
        return self.s.tensors[name]

    def ptr(self, name: str, const: bool = False) -> str:
        region, off = self.plan.tensor_offsets[name]
        if region not in REGION_CODES:
            raise PlanError(f"tensor {name} lives in region {region!r}; codegen needs the batch "
                            "in the arena", hint="plan with io='arena' (the default)")
        base = "BNNC_A" if region == "arena" else "BNNC_S"
        ct = _CTYPES[self.t(name).dtype][0]
        return f"(({'const ' if const else ''}{ct} *)({base} + {off}u))"


def _family(kernel: str) -> str:
    for prefix, fam in (("dense_", "dense"), ("conv_", "conv"), ("pack_sign_w", "dense"),
                        ("bn_", "bn"), ("maxpool_", "pool"), ("avgpool_", "pool"), ("gap_", "pool"),
                        ("softmax", "loss"), ("po2_", "po2"), ("bias_grad", "po2"),
                        ("adam_", "optim"), ("sgd_", "optim"), ("bop_", "optim")):
        if kernel.startswith(prefix):
            return fam
    return "act"


def _instance(step: Step, ctx: _Ctx, macro: str | None = None,
              operands: dict[str, str] | None = None, **flags) -> Instance:
    """The kernel function for this step's operand dtypes: `k_<macro>[_<dtype>...]`."""
    macro = macro or step.kernel
    ops = operands or {}
    types = tuple((k, _dt(ctx.t(v).dtype)) for k, v in ops.items())
    suffix = "".join(f"_{dt.dtype}" for _, dt in types)
    fsuffix = "".join(f"_{k}{int(v) if isinstance(v, bool) else v}"
                      for k, v in sorted(flags.items()))
    family = "conv" if macro == "pack_sign_w_conv" else _family(step.kernel)
    return Instance(family, macro, c_ident(f"k_{macro}{suffix}{fsuffix}"), types,
                    tuple(sorted(flags.items())))


def _bits_nhwc(t: Tensor) -> bool:
    return t.layout.startswith("bits NHWC")


def _words(n: int) -> int:
    return -(-n // 64)


# ---- lowering: one function per kernel -> Call(instance, C argument expressions)

def _lower_pack_sign_w(step: Step, ctx: _Ctx) -> Call:
    a = step.attrs
    w, wb = step.inputs[0], step.outputs[0]
    if "cout" in a:
        inst = _instance(step, ctx, "pack_sign_w_conv", {"w": w})
        args = [ctx.ptr(w, True), ctx.ptr(wb), a["cout"], a["cin"], a["kh"] * a["kw"],
                _words(a["cin"])]
    else:
        chw = a.get("x_chw")
        k, n = a["in_features"], a["out_features"]
        c, hw = (chw[0], chw[1] * chw[2]) if chw else (k, 1)
        words = hw * _words(c) if chw else _words(k)
        inst = _instance(step, ctx, "pack_sign_w_dense", {"w": w})
        args = [ctx.ptr(w, True), ctx.ptr(wb), k, n, words, hw, _words(c) if chw else 0]
    return Call(inst, args)


def _bias(step: Step, ctx: _Ctx, idx: int) -> tuple[dict[str, str], str]:
    if len(step.inputs) > idx:
        return {"b": step.inputs[idx]}, ctx.ptr(step.inputs[idx], True)
    return {}, "0"


def _pm1_input(ctx: _Ctx, name: str) -> bool:
    """Whether f32 tensor `name` holds only +-1.0: a SIGN layer's f32 output, seen directly, through
    views (flatten) or through max pooling (a max of +-1 values is +-1)."""
    t = ctx.t(name)
    base = t.alias_of or name
    prod = ctx.s.producer(base)
    if t.dtype is not DType.F32 or prod is None:
        return False
    if prod.kernel == "sign_fwd_f32":
        return True
    return prod.kernel.startswith("maxpool_fwd") and _pm1_input(ctx, prod.inputs[0])


def _lower_dense_fwd(step: Step, ctx: _Ctx) -> Call:
    a = step.attrs
    x, w = step.inputs[0], step.inputs[1]
    ops, bptr = _bias(step, ctx, 2)
    y = step.outputs[0]
    k, n, b = a["in_features"], a["out_features"], a["batch"]
    if step.kernel == "dense_fwd_xnor":
        chw = a.get("x_chw")
        words = chw[1] * chw[2] * _words(chw[0]) if chw else _words(k)
        inst = _instance(step, ctx, operands=ops, bias=bool(ops))
        return Call(inst, [ctx.ptr(x, True), ctx.ptr(w, True), bptr, ctx.ptr(y), b, n, words, k])
    # a +-1 input (the standard algorithm keeps sign outputs as f32) multiplies by XNOR-popcount:
    # the sums are exact integers, the same bits as the sign-select float sum
    macro = ("dense_fwd_pm1" if step.kernel == "dense_fwd_signw" and _pm1_input(ctx, x)
             and ctx.t(w).dtype is not DType.BIT else None)
    inst = _instance(step, ctx, macro, operands={"w": w, **ops}, bias=bool(ops))
    return Call(inst, [ctx.ptr(x, True), ctx.ptr(w, True), bptr, ctx.ptr(y), b, k, n, _words(k)])


def _x_operand(step: Step, ctx: _Ctx, x: str, a: dict) -> tuple[str, list]:
    """How a dense kernel reads its saved input: macro suffix and (words/row, HW, wc) args."""
    xt = ctx.t(x)
    k = a["in_features"]
    if xt.dtype is DType.BIT:
        chw = a.get("x_chw")
        if chw:
            wc = _words(chw[0])
            return "bits", [chw[1] * chw[2] * wc, chw[1] * chw[2], wc]
        return "bits", [_words(k), 1, 0]
    return "real", [0, 1, 0]


def _lower_dense_dw(step: Step, ctx: _Ctx) -> Call:
    a = step.attrs
    x = step.inputs[0]
    kind, xargs = _x_operand(step, ctx, x, a)
    b, k, n = a["batch"], a["in_features"], a["out_features"]
    dw = step.outputs[0]
    ops: dict[str, str] = {} if kind == "bits" else {"x": x}
    if step.kernel == "dense_dw_bin":
        g = step.inputs[1]
        po2 = ctx.t(g).dtype is DType.PO2
        if not po2:
            ops["g"] = g
        inst = _instance(step, ctx, f"dense_dw_bin_{kind}", ops, po2=po2)
        return Call(inst, [ctx.ptr(x, True), ctx.ptr(g, True), ctx.ptr(dw), b, k, n] + xargs)
    if step.kernel == "dense_dw_po2":
        q, bias = step.inputs[1], step.inputs[2]
        w = step.inputs[3] if len(step.inputs) > 3 else None
        if w:
            ops["w"] = w
        inst = _instance(step, ctx, f"dense_dw_po2_{kind}", ops, mask=w is not None)
        return Call(inst, [ctx.ptr(x, True), ctx.ptr(q, True), ctx.ptr(bias, True),
                           ctx.ptr(w, True) if w else "0", ctx.ptr(dw), b, k, n] + xargs)
    dy = step.inputs[1]
    w = step.inputs[2] if len(step.inputs) > 2 else None
    ops["dy"] = dy
    if w:
        ops["w"] = w
    inst = _instance(step, ctx, f"dense_dw_f32_{kind}", ops, mask=w is not None)
    return Call(inst, [ctx.ptr(x, True), ctx.ptr(dy, True), ctx.ptr(w, True) if w else "0",
                       ctx.ptr(dw), b, k, n] + xargs)


def _dense_wgeom(ctx: _Ctx, w: str) -> tuple[int, int]:
    """(hw, wc) of the NHWC input bit order a packed dense weight uses; (1, 0) for feature order."""
    for s in ctx.s.steps:
        if s.kernel == "dense_fwd_xnor" and s.inputs[1] == w and s.attrs.get("x_chw"):
            c, h, wd = s.attrs["x_chw"]
            return h * wd, _words(c)
    return 1, 0


def _w_sign_args(ctx: _Ctx, w: str, k: int) -> list:
    """Bop's packed W^T rows: words per row and the bit order; zeros for a W read element-wise."""
    if ctx.t(w).dtype is not DType.BIT:
        return [0, 1, 0]
    hw, wc = _dense_wgeom(ctx, w)
    return [hw * wc if wc else _words(k), hw, wc]


def _lower_dense_dx(step: Step, ctx: _Ctx) -> Call:
    a = step.attrs
    b, k, n = a["batch"], a["in_features"], a["out_features"]
    dx = step.outputs[0]
    if step.kernel == "dense_dx_po2":
        q, bias, w = step.inputs
        inst = _instance(step, ctx, operands={"w": w, "dx": dx})
        return Call(inst, [ctx.ptr(q, True), ctx.ptr(bias, True), ctx.ptr(w, True), ctx.ptr(dx),
                           b, k, n] + _w_sign_args(ctx, w, k))
    dy, w = step.inputs
    inst = _instance(step, ctx, operands={"dy": dy, "w": w, "dx": dx}, binary=bool(a["binary"]))
    return Call(inst, [ctx.ptr(dy, True), ctx.ptr(w, True), ctx.ptr(dx), b, k, n]
                + _w_sign_args(ctx, w, k))


def _lower_bn_fwd(step: Step, ctx: _Ctx, infer: bool = False) -> Call:
    a = step.attrs
    b, c, sp = a["batch"], a["channels"], a["spatial"]
    m = a["momentum"]
    if step.kernel == "bn_l2_fwd":
        x, gamma, beta, rm, rv = step.inputs
        outs = step.outputs
        y = outs[0]
        xh = outs[3] if len(outs) > 3 else None
        inv = outs[4] if len(outs) > 4 else None
        ops = {"gamma": gamma, "beta": beta, "rm": rm}
        if infer:
            inst = _instance(step, ctx, "bn_l2_infer", ops)
            return Call(inst, [ctx.ptr(x, True), ctx.ptr(gamma, True), ctx.ptr(beta, True),
                               ctx.ptr(rm, True), ctx.ptr(rv, True), ctx.ptr(y), b, c, sp,
                               c_float(a["eps"])])
        inst = _instance(step, ctx, operands=ops, saved=xh is not None, rows=sp == 1)
        return Call(inst, [ctx.ptr(x, True), ctx.ptr(gamma, True), ctx.ptr(beta, True),
                           ctx.ptr(rm), ctx.ptr(rv), ctx.ptr(y), ctx.ptr(xh) if xh else "0",
                           ctx.ptr(inv) if inv else "0", b, c, sp, c_float(a["eps"]), c_float(m),
                           c_float(1 - m)])
    x, beta, rm, rp = step.inputs
    outs = step.outputs
    y, mu, psi = outs[0], outs[3], outs[4]
    s = outs[5] if len(outs) > 5 else None
    ops = {"beta": beta, "rm": rm}
    if infer:
        inst = _instance(step, ctx, "bn_l1_infer", ops)
        return Call(inst, [ctx.ptr(x, True), ctx.ptr(beta, True), ctx.ptr(rm, True),
                           ctx.ptr(rp, True), ctx.ptr(y), b, c, sp])
    inst = _instance(step, ctx, operands=ops, signs=s is not None, rows=sp == 1)
    return Call(inst, [ctx.ptr(x, True), ctx.ptr(beta, True), ctx.ptr(rm), ctx.ptr(rp), ctx.ptr(y),
                       ctx.ptr(mu), ctx.ptr(psi), ctx.ptr(s) if s else "0", b, c, sp,
                       _words(c * sp), c_float(m), c_float(1 - m)])


def _lower_bn_bwd(step: Step, ctx: _Ctx) -> Call:
    a = step.attrs
    b, c, sp = a["batch"], a["channels"], a["spatial"]
    if step.kernel == "bn_l2_bwd":
        g, xh, inv, gamma = step.inputs
        dgamma, dbeta = step.outputs[:2]
        d_in = step.outputs[2] if len(step.outputs) > 2 else None
        ops = {"g": g, "gamma": gamma} | ({"dx": d_in} if d_in else {})
        inst = _instance(step, ctx, operands=ops, dx=d_in is not None, rows=sp == 1)
        return Call(inst, [ctx.ptr(g, True), ctx.ptr(xh, True), ctx.ptr(inv, True),
                           ctx.ptr(gamma, True), ctx.ptr(dgamma), ctx.ptr(dbeta),
                           ctx.ptr(d_in) if d_in else "0", b, c, sp])
    g, s, psi = step.inputs
    dbeta = step.outputs[0]
    d_in = step.outputs[1] if len(step.outputs) > 1 else None
    ops = {"g": g} | ({"dx": d_in} if d_in else {})
    inst = _instance(step, ctx, operands=ops, dx=d_in is not None, rows=sp == 1)
    return Call(inst, [ctx.ptr(g, True), ctx.ptr(s, True), ctx.ptr(psi, True), ctx.ptr(dbeta),
                       ctx.ptr(d_in) if d_in else "0", b, c, sp, _words(c * sp)])


def _lower_sign_fwd(step: Step, ctx: _Ctx) -> Call:
    a = step.attrs
    x, y = step.inputs[0], step.outputs[0]
    mask = step.outputs[1] if len(step.outputs) > 1 else None
    b, size = a["batch"], a["size"]
    if step.kernel == "sign_fwd_f32":
        inst = _instance(step, ctx, mask=mask is not None)
        return Call(inst, [ctx.ptr(x, True), ctx.ptr(y), ctx.ptr(mask) if mask else "0", b, size,
                           _words(size)])
    yt = ctx.t(y)
    if _bits_nhwc(yt):
        _, c, h, w = yt.shape
        inst = _instance(step, ctx, "sign_fwd_pack_nhwc", mask=mask is not None)
        return Call(inst, [ctx.ptr(x, True), ctx.ptr(y), ctx.ptr(mask) if mask else "0", b, c,
                           h * w, _words(c), _words(size)])
    inst = _instance(step, ctx, "sign_fwd_pack_rows", mask=mask is not None)
    return Call(inst, [ctx.ptr(x, True), ctx.ptr(y), ctx.ptr(mask) if mask else "0", b, size,
                       _words(size)])


def _lower_unary_bwd(step: Step, ctx: _Ctx) -> Call:
    """sign_bwd_ste / sign_bwd_mask / relu_bwd_out / relu_bwd_mask: d_in = d_out * keep."""
    a = step.attrs
    g, keep = step.inputs
    d = step.outputs[0]
    inst = _instance(step, ctx, operands={"g": g, "d": d})
    return Call(inst, [ctx.ptr(g, True), ctx.ptr(keep, True), ctx.ptr(d), a["batch"], a["size"],
                       _words(a["size"])])


def _lower_relu_fwd(step: Step, ctx: _Ctx) -> Call:
    a = step.attrs
    mask = step.outputs[1] if len(step.outputs) > 1 else None
    inst = _instance(step, ctx, mask=mask is not None)
    return Call(inst, [ctx.ptr(step.inputs[0], True), ctx.ptr(step.outputs[0]),
                       ctx.ptr(mask) if mask else "0", a["batch"], a["size"], _words(a["size"])])


def _lower_cast_f16(step: Step, ctx: _Ctx) -> Call:
    n = ctx.t(step.inputs[0]).size
    return Call(_instance(step, ctx), [ctx.ptr(step.inputs[0], True), ctx.ptr(step.outputs[0]), n])


def _lower_binary_ew(step: Step, ctx: _Ctx) -> Call:
    """add_fwd / grad_add: y = a + b over the whole tensor."""
    a, b = step.inputs
    y = step.outputs[0]
    inst = _instance(step, ctx, "ew_add", {"a": a, "b": b, "y": y})
    return Call(inst, [ctx.ptr(a, True), ctx.ptr(b, True), ctx.ptr(y), ctx.t(y).size])


def _lower_softmax_xent(step: Step, ctx: _Ctx) -> Call:
    a = step.attrs
    logits, labels = step.inputs
    loss, probs, d = step.outputs
    inst = _instance(step, ctx, operands={"d": d})
    return Call(inst, [ctx.ptr(logits, True), ctx.ptr(labels, True), ctx.ptr(loss), ctx.ptr(probs),
                       ctx.ptr(d), "accuracy", a["batch"], a["classes"]])
# softmax_xent's step also hands the loss to the train-step entry: the arena slot of `loss` is dead
# (and may be reused) once the step is over


def _lower_po2_quantize(step: Step, ctx: _Ctx) -> Call:
    a = step.attrs
    g = step.inputs[0]
    q, bias = step.outputs
    inst = _instance(step, ctx, operands={"g": g})
    return Call(inst, [ctx.ptr(g, True), ctx.ptr(q), ctx.ptr(bias), ctx.t(g).size, a["po2_bias"],
                       int(bool(a["zero_to_min"]))])


def _lower_bias_grad(step: Step, ctx: _Ctx) -> Call:
    a = step.attrs
    dy, db = step.inputs[0], step.outputs[0]
    if "cout" in a:
        rows, ch, sp = a["batch"], a["cout"], a["oh"] * a["ow"]
    else:
        rows, ch, sp = a["batch"], a["out_features"], 1
    return Call(_instance(step, ctx, operands={"dy": dy}), [ctx.ptr(dy, True), ctx.ptr(db), rows,
                                                              ch, sp])


def _update_common(step: Step, ctx: _Ctx) -> tuple[dict, list]:
    a = step.attrs
    p, g = step.inputs[0], step.inputs[1]
    gt = ctx.t(g)
    ops = {"p": p}
    if gt.dtype is not DType.BIT:
        ops["g"] = g
    gbits = [c_float(a.get("g_scale", 1.0)), int(bool(a.get("ste_mask", False)))]
    return ops, gbits


def _lower_adam(step: Step, ctx: _Ctx) -> Call:
    a = step.attrs
    p, g, m, v = step.inputs
    ops, gbits = _update_common(step, ctx)
    ops.update(m=m, v=v)
    inst = _instance(step, ctx, operands=ops, gbit=ctx.t(g).dtype is DType.BIT)
    mid, vid = a["moment_ids"]
    b1, b2 = a["beta1"], a["beta2"]
    return Call(inst, [ctx.ptr(p), ctx.ptr(g, True), ctx.ptr(m), ctx.ptr(v), a["size"]] + gbits + [
        c_float(a["lr"]), c_float(b1), c_float(b2), c_float(1 - b1), c_float(1 - b2),
        f"bnnc_one_minus_pow({c_float(b1)}, t)", f"bnnc_one_minus_pow({c_float(b2)}, t)",
        c_float(a["eps"]), f"bnnc_sr_key(seed, t, {a['tensor_id']}u)",
        f"bnnc_sr_key(seed, t, {mid}u)", f"bnnc_sr_key(seed, t, {vid}u)"])


def _lower_sgd(step: Step, ctx: _Ctx) -> Call:
    a = step.attrs
    p, g, m = step.inputs
    ops, gbits = _update_common(step, ctx)
    ops.update(m=m)
    inst = _instance(step, ctx, operands=ops, gbit=ctx.t(g).dtype is DType.BIT)
    (mid,) = a["moment_ids"]
    return Call(inst, [ctx.ptr(p), ctx.ptr(g, True), ctx.ptr(m), a["size"]] + gbits + [
        c_float(a["lr"]), c_float(a["momentum"]), f"bnnc_sr_key(seed, t, {a['tensor_id']}u)",
        f"bnnc_sr_key(seed, t, {mid}u)"])


def _bop_geometry(ctx: _Ctx, p: str) -> list:
    """Where element i (row-major W) of a Bop weight lives in its packed rows (wbit_pos args)."""
    pt = ctx.t(p)
    if len(pt.shape) == 4:
        co, ci, kh, kw = pt.shape
        return [1, ci, kh * kw, _words(ci), 1, 0]
    k, n = pt.shape
    hw, wc = _dense_wgeom(ctx, p)
    return [0, k, n, hw * wc if wc else _words(k), hw, wc]


def _lower_bop(step: Step, ctx: _Ctx) -> Call:
    a = step.attrs
    p, g, m = step.inputs
    gt = ctx.t(g)
    ops = {"m": m} | ({} if gt.dtype is DType.BIT else {"g": g})
    inst = _instance(step, ctx, operands=ops, gbit=gt.dtype is DType.BIT)
    (mid,) = a["moment_ids"]
    return Call(inst, [ctx.ptr(p), ctx.ptr(g, True), ctx.ptr(m), a["size"], c_float(1 - a["gamma"]),
                       c_float(a["threshold"]),
                       f"bnnc_sr_key(seed, t, {mid}u)"] + _bop_geometry(ctx, p))


def _geom_decl(B, C, H, W, K, kh, kw, sh, sw, pt, pl, OH, OW, wc) -> str:
    vals = ", ".join(str(int(v)) for v in (B, C, H, W, K, kh, kw, sh, sw, pt, pl, OH, OW, wc))
    return f"static const bnnc_geom_t g = {{ {vals} }};"


def _conv_geom(a: dict) -> str:
    (sh, sw), (pt, pl) = a["strides"], a["pads"][:2]
    return _geom_decl(a["batch"], a["cin"], a["h"], a["w"], a["cout"], a["kh"], a["kw"], sh, sw, pt,
                      pl, a["oh"], a["ow"], _words(a["cin"]))


def _pool_geom(a: dict) -> str:
    (kh, kw), (sh, sw), (pt, pl) = a["kernel"], a["strides"], a["pads"][:2]
    c = a["channels"]
    return _geom_decl(a["batch"], c, a["h"], a["w"], c, kh, kw, sh, sw, pt, pl, a["oh"], a["ow"],
                      _words(c))


def _conv_fwd_plan(a: dict, kind: str) -> dict | None:
    """Scratch sizes of the stride-1 forward kernels (conv_fwd_fast), or None (portable loops).

    kind "bits"/"pm1": XNOR-popcount rows; one sample's packed input ([row][word][column]) and, for
    "pm1" (f32 +-1 input, latent W), sign(W) packed for the largest block of output channels that
    fits; a kernel row's words (kw * wc) must fit the 31 per-byte SWAR sums. "signw"/"f32": direct
    rows over a real input, one sign mask (or weight) per (c, i, j) of an output channel."""
    if tuple(a["strides"]) != (1, 1):
        return None
    c, k, kh, kw, h, w, ow = a["cin"], a["cout"], a["kh"], a["kw"], a["h"], a["w"], a["ow"]
    taps, wc = kh * kw, _words(c)
    if kind in ("signw", "f32"):
        if 4 * (c * taps + 2 * ow) > _CONV_SCRATCH_BYTES:
            return None
        # a first layer's few taps (3 x 3 x 3 = 27) are written out as one sum per column
        unroll = c * taps <= 64
        # interior columns (every tap inside the image): [pl, OW - pr)
        pl, pr = a["pads"][1], a["pads"][3]
        return dict(wn=c * taps, ow=ow, unroll=unroll,
                    **(dict(cin=c, kh=kh, kw=kw, h=h, w=w, ox0=pl, ox1=ow - pr) if unroll else {}))
    if kw * wc > 31:
        return None
    base = 8 * (h * wc * w) + 12 * ow
    kb = k if kind == "bits" else (_CONV_SCRATCH_BYTES - base) // (8 * taps * wc)
    if base > _CONV_SCRATCH_BYTES or kb < 1:
        return None
    kb = min(k, kb)
    # the words of every tap written out per column (<= 31: the per-byte counts fold once)
    unroll = taps * wc <= 31
    return dict(xbn=h * wc * w, wbn=kb * taps * wc, kb=kb, ow=ow, unroll=unroll,
                **(dict(kh=kh, kw=kw, wc=wc, w=w, **_csa_plan(taps * wc)) if unroll else {}))


def _csa_plan(words: int) -> dict:
    """A carry-save adder tree for the popcount of `words` words (u0 .. u{words-1}): while some
    weight has three words a, b, c, replace them by a ^ b ^ c (same weight) and their majority
    (twice the weight). Returns csa = a, b, c, sum, carry of each step in order (new words
    numbered from `words`) and pops = word, weight of each word left to count (popcount = sum of
    weight * pop), as "x"-joined integers: they become part of the kernel's name, and the
    template splits them.

    >>> _csa_plan(3)
    {'csa': '0x1x2x3x4', 'pops': '3x1x4x2'}
    >>> _csa_plan(2)
    {'csa': 'none', 'pops': '0x1x1x1'}
    """
    level: dict[int, list[int]] = {1: list(range(words))}
    csa, nxt = [], words
    weight = 1
    while weight in level:
        ws = level[weight]
        while len(ws) >= 3:
            a, b, c = ws.pop(0), ws.pop(0), ws.pop(0)
            csa.append((a, b, c, nxt, nxt + 1))
            ws.append(nxt)
            level.setdefault(2 * weight, []).append(nxt + 1)
            nxt += 2
        weight *= 2
    pops = [(u, wt) for wt in sorted(level) for u in level[wt]]
    return dict(csa="x".join(str(v) for op in csa for v in op) or "none",
                pops="x".join(str(v) for op in pops for v in op))


def _lower_conv_fwd(step: Step, ctx: _Ctx) -> Call:
    x, w = step.inputs[0], step.inputs[1]
    ops, bptr = _bias(step, ctx, 2)
    y = step.outputs[0]
    wops = {} if step.kernel == "conv_fwd_xnor" else {"w": w}
    latent = ctx.t(w).dtype is not DType.BIT
    kind = {"conv_fwd_xnor": "bits", "conv_fwd_f32": "f32"}.get(step.kernel, "signw")
    if kind == "signw" and latent and _pm1_input(ctx, x):
        kind = "pm1"      # +-1 input: XNOR-popcount, the same exact integer sums
    plan = _conv_fwd_plan(step.attrs, kind) if latent or kind == "bits" else None
    macro = f"conv_fwd_fast_{kind}" if plan else None
    inst = _instance(step, ctx, macro, operands={**wops, **ops}, bias=bool(ops), **(plan or {}))
    return Call(inst, [ctx.ptr(x, True), ctx.ptr(w, True), bptr, ctx.ptr(y), "&g"],
                [_conv_geom(step.attrs)])


def _conv_dw_direct_plan(a: dict) -> dict | None:
    """Scratch of the real-input dW kernel (conv_dw_direct): all Cin*kh*kw x Cout sums and one
    output row of G transposed; None past _CONV_SCRATCH_BYTES or for strides > 1."""
    if tuple(a["strides"]) != (1, 1):
        return None
    accn, gtn = a["cin"] * a["kh"] * a["kw"] * a["cout"], a["ow"] * a["cout"]
    return (dict(accn=accn, gtn=gtn, k=a["cout"]) if 4 * (accn + gtn) <= _CONV_SCRATCH_BYTES
            else None)


def _conv_dw_plan(a: dict, exact: bool) -> dict | None:
    """Block sizes of the table-lookup dW kernel (conv_dw_fr), or None when it does not apply
    (stride > 1) or does not fit _CONV_SCRATCH_BYTES even for 8 input channels at a time.

    Positions go 8 at a time in padded-row order (mode "ox", x from a bit string of the padded
    input per channel, built from one word per input row: rows up to 64 wide) when rows are at
    least 8 wide, else 8 samples at one position (mode "img", x from a byte per 8 samples, pixel
    and channel, built for the whole batch). The largest output-channel
    block (16, 8 or 4: the vector lanes) that fits with all input channels wins; `exact` (integer
    PO2 sums) doubles the sums for the carried high halves."""
    if tuple(a["strides"]) != (1, 1):
        return None
    c, k, kh, kw, oh, ow, b = a["cin"], a["cout"], a["kh"], a["kw"], a["oh"], a["ow"], a["batch"]
    hp, wp, taps = oh + kh - 1, ow + kw - 1, kh * kw
    mode = "ox" if ow >= 8 and a["w"] <= 64 else "img"
    fw = -(-(hp * wp) // 64) + 1          # words per channel of the padded bit string (+1 to read)
    sums = 2 if exact else 1
    for cb in sorted({c} | {d for d in (256, 128, 64, 32, 16, 8) if d < c}, reverse=True):
        xrn = fw * cb if mode == "ox" else -(-b // 8) * hp * wp * cb
        xr_bytes = 8 * (xrn + fw + cb) if mode == "ox" else xrn
        for kb in (16, 8, 4):
            total = 4 * (sums * (cb * taps + taps) * kb + 256 * kb + 8 * kb) + xr_bytes
            if total <= _CONV_SCRATCH_BYTES:
                return dict(mode=mode, cb=cb, kb=kb, kh=kh, kw=kw, taps=taps, hp=hp,
                            accn=cb * taps * kb, xrn=xrn, fw=fw)
    return None


def _lower_conv_dw(step: Step, ctx: _Ctx) -> Call:
    x = step.inputs[0]
    a = step.attrs
    kind = "bits" if ctx.t(x).dtype is DType.BIT else "real"
    ops: dict[str, str] = {} if kind == "bits" else {"x": x}
    dw = step.outputs[0]
    decl = [_conv_geom(a)]
    # the table-lookup kernel needs x = +-1: packed bits, or an f32 tensor of sign outputs
    xk = "bits" if kind == "bits" else ("pm1" if _pm1_input(ctx, x) else None)
    if step.kernel == "conv_dw_bin":
        g = step.inputs[1]
        po2 = ctx.t(g).dtype is DType.PO2
        if not po2:
            ops["g"] = g
        grad = "int" if po2 else "f32"
        plan = _conv_dw_plan(a, exact=po2) if xk else _conv_dw_direct_plan(a)
        macro = ((f"conv_dw_fr_{grad}_{xk}" if xk else "conv_dw_direct_bin") if plan
                 else f"conv_dw_bin_{kind}")
        inst = _instance(step, ctx, macro, ops, po2=po2, **(dict(plan, out="bin") if plan else {}))
        return Call(inst, [ctx.ptr(x, True), ctx.ptr(g, True), ctx.ptr(dw), "&g"], decl)
    if step.kernel == "conv_dw_po2":
        q, bias = step.inputs[1], step.inputs[2]
        w = step.inputs[3] if len(step.inputs) > 3 else None
        ops |= {"w": w} if w else {}
        plan = _conv_dw_plan(a, exact=False) if xk else _conv_dw_direct_plan(a)
        macro = ((f"conv_dw_fr_po2_{xk}" if xk else "conv_dw_direct_po2") if plan
                 else f"conv_dw_po2_{kind}")
        inst = _instance(step, ctx, macro, ops, mask=w is not None,
                         **(dict(plan, out="f32") if plan else {}))
        return Call(inst, [ctx.ptr(x, True), ctx.ptr(q, True), ctx.ptr(bias, True),
                           ctx.ptr(w, True) if w else "0", ctx.ptr(dw), "&g"], decl)
    dy = step.inputs[1]
    w = step.inputs[2] if len(step.inputs) > 2 else None
    ops["dy"] = dy
    ops |= {"w": w} if w else {}
    plan = _conv_dw_plan(a, exact=False) if xk else _conv_dw_direct_plan(a)
    macro = ((f"conv_dw_fr_f32_{xk}" if xk else "conv_dw_direct_f32") if plan
             else f"conv_dw_f32_{kind}")
    inst = _instance(step, ctx, macro, ops, mask=w is not None,
                     **(dict(plan, out="f32") if plan else {}))
    return Call(inst, [ctx.ptr(x, True), ctx.ptr(dy, True), ctx.ptr(w, True) if w else "0",
                       ctx.ptr(dw), "&g"], decl)


# stack scratch a fast conv kernel may declare (sign patterns, tables, partial sums) on host and
# Linux targets; bare-metal targets keep the portable loops, which need none
_CONV_SCRATCH_BYTES = 160 * 1024


def _conv_dx_plan(a: dict) -> dict | None:
    """Block sizes of the table-lookup dX kernel (conv_dx_fr) for this geometry, or None when it
    does not apply (stride > 1) or its scratch would not fit even for 8 channels at a time.

    Lanes are output columns (mode "ox", segments of 8..32 that divide the row) when the row has
    such a divisor, else 4 samples (mode "img"); the channel block is the largest whose sign
    patterns (one byte per 8 output channels per tap) and partial sums fit _CONV_SCRATCH_BYTES
    next to the 256-entry table."""
    if tuple(a["strides"]) != (1, 1):
        return None
    c, k, kh, kw, oh, ow = a["cin"], a["cout"], a["kh"], a["kw"], a["oh"], a["ow"]
    hp, wp, taps = oh + kh - 1, ow + kw - 1, kh * kw
    wt_per_c = -(-k // 8) * taps
    # ox lanes are whole segments of a row (a constant trip count), so a segment must divide OW;
    # a row pass covers seg + kw - 1 columns, rounded up to whole 4-float vectors (np), and the
    # largest segment whose 256-row table stays within 24 KiB wins (table and ring rows in L1)
    def lanes_of(d: int) -> int:
        return -(-(d + kw - 1) // 4) * 4

    segs = [d for d in range(min(ow, 32), 7, -1) if ow % d == 0]
    seg = next((d for d in segs if 256 * 4 * (lanes_of(d) + kw - 1) <= 24 * 1024),
               segs[-1] if segs else 0)
    # ring rows are ws floats apart so the last segment's extra lanes stay inside its row
    lanes = lanes_of(seg) if seg else 4
    ws = ow - seg + lanes
    if seg:
        mode, table, acc_per_c = "ox", 256 * (lanes + kw - 1) * 4 + 16 * seg * 4, kh * ws
    else:
        seg, mode, table, acc_per_c = 4, "img", 256 * 16 + 16 * 16, 4 * hp * wp
    cb = min(c, (_CONV_SCRATCH_BYTES - table) // (wt_per_c + 4 * acc_per_c))
    if cb < min(c, 8):
        return None
    return dict(mode=mode, seg=seg, np=lanes, ws=ws, w=a["w"], cb=cb, kh=kh, kw=kw,
                wtb=wt_per_c * cb, accn=acc_per_c * cb)


def _lower_conv_dx(step: Step, ctx: _Ctx) -> Call:
    dx = step.outputs[0]
    a = step.attrs
    decl = [_conv_geom(a)]
    plan = _conv_dx_plan(a) if a["binary"] else None
    grad = "po2" if step.kernel == "conv_dx_po2" else "f32"
    macro = f"conv_dx_fr_{grad}" if plan else None
    if step.kernel == "conv_dx_po2":
        q, bias, w = step.inputs
        inst = _instance(step, ctx, macro, operands={"w": w, "dx": dx}, binary=True,
                         **(plan or {}))
        return Call(inst, [ctx.ptr(q, True), ctx.ptr(bias, True), ctx.ptr(w, True), ctx.ptr(dx),
                           "&g"], decl)
    dy, w = step.inputs
    inst = _instance(step, ctx, macro, operands={"dy": dy, "w": w, "dx": dx},
                     binary=bool(a["binary"]), **(plan or {}))
    return Call(inst, [ctx.ptr(dy, True), ctx.ptr(w, True), ctx.ptr(dx), "&g"], decl)


def _pool_p22(a: dict) -> bool:
    """2x2 windows, stride 2, no padding: the geometry of the row-at-a-time pool kernels."""
    return (tuple(a["kernel"]) == (2, 2) and tuple(a["strides"]) == (2, 2)
            and not any(a["pads"]))


def _lower_maxpool_fwd(step: Step, ctx: _Ctx) -> Call:
    x, y = step.inputs[0], step.outputs[0]
    am = step.outputs[1] if len(step.outputs) > 1 else None
    a = step.attrs
    kind = "mask" if step.kernel == "maxpool_fwd_mask" else "widx"
    ops = {"am": am} if am and kind == "widx" else {}
    bits = ctx.t(x).dtype is DType.BIT
    # packed input: a window row's argmax bits are assembled in one word per channel
    fast = _pool_p22(a) and (not bits or a["w"] <= 64)
    inst = _instance(step, ctx, f"maxpool_p22_fwd_{kind}" if fast else None, operands=ops,
                     bits=bits, argmax=am is not None, **({"ow": a["ow"]} if fast else {}))
    return Call(inst, [ctx.ptr(x, True), ctx.ptr(y), ctx.ptr(am) if am else "0", "&g"],
                [_pool_geom(a)])


def _lower_pool_bwd(step: Step, ctx: _Ctx) -> Call:
    g, d = step.inputs[0], step.outputs[0]
    a = step.attrs
    decl = [_pool_geom(a)]
    fast = {"w": a["w"]} if _pool_p22(a) else {}
    if step.kernel == "maxpool_bwd_widx":
        # (the portable scatter of one value per window is already cheap here)
        am = step.inputs[1]
        inst = _instance(step, ctx, operands={"g": g, "am": am, "d": d})
        return Call(inst, [ctx.ptr(g, True), ctx.ptr(am, True), ctx.ptr(d), "&g"], decl)
    if step.kernel == "maxpool_bwd_mask":
        inst = _instance(step, ctx, "maxpool_p22_bwd_mask" if fast else None,
                         operands={"g": g, "d": d}, **fast)
        return Call(inst, [ctx.ptr(g, True), ctx.ptr(step.inputs[1], True), ctx.ptr(d), "&g"], decl)
    inst = _instance(step, ctx, operands={"g": g, "d": d})
    return Call(inst, [ctx.ptr(g, True), ctx.ptr(d), step.attrs["count_include_pad"], "&g"], decl)


def _lower_avgpool_fwd(step: Step, ctx: _Ctx) -> Call:
    return Call(_instance(step, ctx), [ctx.ptr(step.inputs[0], True), ctx.ptr(step.outputs[0]),
                                       step.attrs["count_include_pad"], "&g"],
                [_pool_geom(step.attrs)])


def _lower_gap(step: Step, ctx: _Ctx) -> Call:
    a = step.attrs
    i, o = step.inputs[0], step.outputs[0]
    ops = {} if step.kernel == "gap_fwd" else {"g": i, "d": o}
    return Call(_instance(step, ctx, operands=ops), [ctx.ptr(i, True), ctx.ptr(o), a["batch"],
                                                     a["channels"], a["spatial"]])


def _const_array(name: str, values) -> str:
    vals = ", ".join(c_float(v) for v in values)
    return f"static const float {name}[{len(values)}] = {{ {vals} }};"


def _lower_affine(step: Step, ctx: _Ctx) -> Call:
    a = step.attrs
    i, o = step.inputs[0], step.outputs[0]
    scale, bias = tuple(a["scale"]), tuple(a["bias"])
    if len(scale) not in (1, a["channels"]) or len(bias) != len(scale):
        raise TargetError(f"layer {step.layer}: affine constants of {len(scale)}/{len(bias)} "
                          f"values for {a['channels']} channels; codegen takes one per channel "
                          "or one")
    dims = [len(scale), a["batch"], a["channels"], a["spatial"]]
    if step.kernel == "affine_fwd":
        return Call(_instance(step, ctx), [ctx.ptr(i, True), ctx.ptr(o), "scale", "bias"] + dims,
                    [_const_array("scale", scale), _const_array("bias", bias)])
    inst = _instance(step, ctx, operands={"g": i, "d": o})
    return Call(inst, [ctx.ptr(i, True), ctx.ptr(o), "scale"] + dims,
                [_const_array("scale", scale)])


def _lower_input_quant(step: Step, ctx: _Ctx) -> Call:
    a = step.attrs
    x, y = step.inputs[0], step.outputs[0]
    shape = ctx.t(x).shape
    c = shape[1] if len(shape) > 1 else 1
    sp = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    scale = np.atleast_1d(np.asarray(a["scale"], np.float64)).ravel()
    zp = np.atleast_1d(np.asarray(a["zero_point"], np.float64)).ravel()
    nc = max(scale.size, zp.size)
    if nc not in (1, c):
        raise TargetError(f"layer {step.layer}: input quantizer with {nc} scales for {c} channels; "
                          "codegen takes one per channel or one")
    scale, zp = np.broadcast_to(scale, (nc,)), np.broadcast_to(zp, (nc,))
    bits, narrow = int(a["bits"]), int(bool(a["narrow"]))
    if a["signed"]:
        qmin, qmax = -(2 ** (bits - 1)) + narrow, 2 ** (bits - 1) - 1
    else:
        qmin, qmax = 0, 2 ** bits - 1 - narrow
    return Call(_instance(step, ctx), [ctx.ptr(x, True), ctx.ptr(y), "scale", "zp", nc, a["batch"],
                                       c, sp, c_float(qmin), c_float(qmax)],
                [_const_array("scale", [float(np.float32(v)) for v in scale]),
                 _const_array("zp", [float(np.float32(v)) for v in zp])])


LOWER: dict[str, Callable[[Step, _Ctx], Call]] = {
    "input_quant_fwd": _lower_input_quant,
    "conv_fwd_xnor": _lower_conv_fwd, "conv_fwd_signw": _lower_conv_fwd,
    "conv_fwd_f32": _lower_conv_fwd,
    "conv_dw_f32": _lower_conv_dw, "conv_dw_po2": _lower_conv_dw, "conv_dw_bin": _lower_conv_dw,
    "conv_dx_f32": _lower_conv_dx, "conv_dx_po2": _lower_conv_dx,
    "maxpool_fwd_widx": _lower_maxpool_fwd, "maxpool_fwd_mask": _lower_maxpool_fwd,
    "maxpool_bwd_widx": _lower_pool_bwd, "maxpool_bwd_mask": _lower_pool_bwd,
    "avgpool_fwd": _lower_avgpool_fwd, "avgpool_bwd": _lower_pool_bwd,
    "gap_fwd": _lower_gap, "gap_bwd": _lower_gap,
    "affine_fwd": _lower_affine, "affine_bwd": _lower_affine,
    "pack_sign_w": _lower_pack_sign_w,
    "dense_fwd_xnor": _lower_dense_fwd, "dense_fwd_signw": _lower_dense_fwd,
    "dense_fwd_f32": _lower_dense_fwd,
    "dense_dw_f32": _lower_dense_dw, "dense_dw_po2": _lower_dense_dw,
    "dense_dw_bin": _lower_dense_dw,
    "dense_dx_f32": _lower_dense_dx, "dense_dx_po2": _lower_dense_dx,
    "bn_l2_fwd": _lower_bn_fwd, "bn_l1_fwd": _lower_bn_fwd,
    "bn_l2_bwd": _lower_bn_bwd, "bn_l1_bwd": _lower_bn_bwd,
    "sign_fwd_f32": _lower_sign_fwd, "sign_fwd_pack": _lower_sign_fwd,
    "sign_bwd_ste": _lower_unary_bwd, "sign_bwd_mask": _lower_unary_bwd,
    "relu_fwd": _lower_relu_fwd, "relu_bwd_out": _lower_unary_bwd,
    "relu_bwd_mask": _lower_unary_bwd,
    "cast_f16": _lower_cast_f16,
    "add_fwd": _lower_binary_ew, "grad_add": _lower_binary_ew,
    "softmax_xent": _lower_softmax_xent,
    "po2_quantize": _lower_po2_quantize, "bias_grad": _lower_bias_grad,
    "adam_update": _lower_adam, "sgd_update": _lower_sgd, "bop_update": _lower_bop,
}


# --------------------------------------------------------------------------------------------------
# the emitted program

@dataclass(frozen=True)
class TensorEntry:
    """One row of the C tensor table / manifest."""
    index: int
    name: str
    dtype: str
    shape: tuple[int, ...]
    region: str         # "arena" | "state"
    offset: int
    nbytes: int
    layout: str
    dump_offset: int    # in the -DBNNC_DEBUG_DUMP buffer (views: their base's)
    alias_of: str | None
    geom: dict | None = None   # packed dense weights behind an NHWC input: {"hw", "wc"}


@dataclass(frozen=True)
class StateEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    role: str
    tensor_id: int
    layout: str
    init: str           # "normal" (W), "one" (gamma, running var/psi), "zero"
    fan_in: int


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
    doc: dict = field(default_factory=dict, repr=False)


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
        h.update(f"{s.kernel}|{s.inputs}|{s.outputs}\n".encode())
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


def _env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True, autoescape=False)
    env.filters["cstr"] = c_string
    return env


def target_env(target: Target) -> jinja2.Environment:
    """The template environment of one target: kernel templates read `simd` (the target's SIMD
    features, e.g. "neon") to pick an intrinsics variant; the portable C stays the fallback."""
    env = _env()
    env.globals["simd"] = tuple(target.simd)
    env.globals["target_kind"] = target.kind
    return env


def _call_lines(fn: str, args, indent: int = 4) -> list[str]:
    """`fn(a, b, ...);` wrapped at 100 columns, continuation lines indented 8 more."""
    lines, cur = [], " " * indent + f"{fn}("
    for i, a in enumerate(str(x) for x in args):
        piece = a + (", " if i < len(args) - 1 else ");")
        if len(cur) + len(piece.rstrip()) > 100 and cur.strip():
            lines.append(cur.rstrip())
            cur = " " * (indent + 8)
        cur += piece
    if not args:
        cur += ");"
    lines.append(cur.rstrip())
    return lines


def numerics_source() -> str:
    """The C numerics runtime every emitted program starts with (hash, stochastic rounding,
    f16/bf16, PO2 helpers), for tests that compile it alone against compiler/numerics.py."""
    return _env().get_template("kernels/numerics.c.j2").render()


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


def _perturb_line(step: Step, ctx: _Ctx) -> tuple[str, str]:
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
    return f"BNNC_PERTURB_{step.kernel.upper()}", stmt


def emit_c(schedule: Schedule, plan, target: Target | str, out_dir: str | Path, *, command: str = "",
           model_sha256: str = "", plan_json: str | None = None,
           onnx_names: Mapping[str, str] | None = None) -> Emitted:
    """Write the C program of one training step of `schedule` placed by `plan` into `out_dir`
    (`target`: a Target or a targets/ name; `command`, `model_sha256`: front matter; `plan_json`:
    written as plan.json when given; `onnx_names`: layer -> ONNX node name, quoted (escaped) in the
    comment above each step function and nowhere else)."""
    if isinstance(target, str):
        target = load_target(target)
    schedule.verify()
    if plan.align % 8 or plan.align < target.align:
        raise PlanError(f"plan alignment {plan.align} is below target {target.name}'s "
                        f"{target.align}", hint=f"plan with --align {target.align}")
    unsupported = sorted({s.kernel for s in schedule.steps if s.kernel not in LOWER})
    if unsupported:
        raise TargetError(f"codegen has no C kernel yet for: {', '.join(unsupported)} "
                          f"(model {schedule.graph_name!r})",
                          hint="these layers train in the numpy reference (bnnc train) only "
                               "for now")
    model = c_ident(schedule.graph_name)
    prefix = f"bnnc_{model}"
    ctx = _Ctx(schedule, plan)
    env = target_env(target)
    cfg = schedule.config

    # tensor table: every schedule tensor that has storage somewhere
    tensors: list[TensorEntry] = []
    dump_off: dict[str, int] = {}
    top = 0
    for t in schedule.tensors.values():
        if t.name not in plan.tensor_offsets or t.alias_of is not None:
            continue
        dump_off[t.name] = top
        top += -(-t.nbytes // 16) * 16
    dump_nbytes = max(top, 16)
    for t in schedule.tensors.values():
        if t.name not in plan.tensor_offsets:
            continue
        region, off = plan.tensor_offsets[t.name]
        if region not in REGION_CODES:
            raise PlanError(f"tensor {t.name} lives in region {region!r}; codegen needs the "
                            "batch in the arena", hint="plan with io='arena' (the default)")
        base = t.alias_of or t.name
        tensors.append(TensorEntry(len(tensors), t.name, t.dtype.value, t.shape, region, off,
                                   t.nbytes, t.layout, dump_off[base], t.alias_of))
    tensors = [_with_geom(e, schedule) for e in tensors]
    index_of = {e.name: e.index for e in tensors}
    states = _state_entries(schedule, plan)

    # kernels and steps
    instances: dict[str, Instance] = {}
    steps = []
    for s in schedule.steps:
        call = LOWER[s.kernel](s, ctx)
        instances.setdefault(call.inst.fn, call.inst)
        assert instances[call.inst.fn] == call.inst, call.inst.fn
        dumps = [(dump_off[o], ctx.ptr(o, True), ctx.t(o).nbytes) for o in s.outputs]
        macro, stmt = _perturb_line(s, ctx)
        name = c_ident(f"step_{s.index:03d}_{s.kernel}" + (f"_{s.layer}" if s.layer else ""))
        steps.append(dict(index=s.index, name=name, kernel=s.kernel, layer=s.layer, phase=s.phase,
                          comment=c_comment(f"{', '.join(s.inputs)} -> {', '.join(s.outputs)}"),
                          onnx=c_comment((onnx_names or {}).get(s.layer, "")),
                          fn=call.inst.fn, call=_call_lines(call.inst.fn, call.args),
                          decls=call.decls, dumps=dumps,
                          perturb_macro=macro, perturb=stmt,
                          uses_t=s.phase == "update", uses_acc=s.kernel == "softmax_xent",
                          loss_ptr=(ctx.ptr(s.outputs[0], True) if s.kernel == "softmax_xent"
                                    else "")))
    # predict: the forward steps with BN in inference mode, then a softmax into the probabilities
    loss_step = next(s for s in schedule.steps if s.kernel == "softmax_xent")
    infer = []
    for s in schedule.steps:
        if s.phase != "forward":
            continue
        if s.kernel in ("bn_l2_fwd", "bn_l1_fwd"):
            call = _lower_bn_fwd(s, ctx, infer=True)
            instances.setdefault(call.inst.fn, call.inst)
            infer.append(dict(kind="call", call=_call_lines(call.inst.fn, call.args, indent=4)))
        else:
            infer.append(dict(kind="step", name=steps[s.index]["name"], index=s.index))
    sm_inst = Instance("loss", "softmax_rows", "k_softmax_rows", ())
    instances.setdefault(sm_inst.fn, sm_inst)
    logits, _ = loss_step.inputs
    probs = loss_step.outputs[1]
    classes = loss_step.attrs["classes"]
    predict = dict(logits=ctx.ptr(logits, True), probs=ctx.ptr(probs),
                   probs_const=ctx.ptr(probs, True), classes=classes)

    # render kernels in a fixed order: family, then function name
    kernel_src = [numerics_source()]
    for inst in sorted(instances.values(), key=lambda i: (i.family, i.fn)):
        module = env.get_template(f"kernels/{inst.family}.c.j2").module
        macro = getattr(module, inst.macro, None)
        assert macro is not None, f"templates/kernels/{inst.family}.c.j2 lacks macro {inst.macro}"
        kernel_src.append(str(macro(inst.fn, dict(inst.types), dict(inst.flags))))

    input_t = schedule.tensors["input"]
    labels_t = schedule.tensors["labels"]
    mhash = _model_hash(schedule, plan, model_sha256)
    elems = sum(int(np.prod(st.shape)) for st in states)
    common = dict(
        version=__version__, command=c_comment(command or "(emit_c called from Python)"),
        model=model, prefix=prefix, PREFIX=prefix.upper(), model_sha256=model_sha256 or "(unknown)",
        algorithm=cfg.algorithm, optimizer=cfg.optimizer, config=c_comment(
            ", ".join(f"{k}={v}" for k, v in cfg.as_dict().items())),
        arena_nbytes=max(plan.arena_nbytes, 16), lower_bound=plan.lower_bound,
        efficiency=f"{plan.efficiency:.3f}", align=plan.align, heuristic=plan.heuristic,
        state_nbytes=max(plan.state_nbytes, 16), state_elems=elems,
        blob_nbytes=STATE_BLOB_HEADER_BYTES + max(plan.state_nbytes, 16),
        blob_header=STATE_BLOB_HEADER_BYTES, blob_magic=f"0x{STATE_BLOB_MAGIC:08X}u",
        blob_version=STATE_BLOB_VERSION, model_hash=f"UINT64_C(0x{mhash:016X})",
        batch=cfg.batch, input_shape=list(input_t.shape), input_elems=input_t.size,
        input_ptr=ctx.ptr("input"), labels_ptr=ctx.ptr("labels"), classes=classes,
        seed=cfg.seed, num_tensors=len(tensors), num_steps=len(steps), dump_nbytes=dump_nbytes,
        input_dump=dump_off["input"], labels_dump=dump_off["labels"],
        input_nbytes=input_t.nbytes, labels_nbytes=labels_t.nbytes,
        statuses=[(f"BNNC_{k}", v) for k, v in STATUSES],
        tensors=[dict(e.__dict__, dtype_code=DTYPE_CODES[DType(e.dtype)],
                      region_code=REGION_CODES[e.region], ndim=len(e.shape),
                      shape=list(e.shape) + [0] * (4 - len(e.shape)) if len(e.shape) <= 4 else None,
                      comment=c_comment(e.name)) for e in tensors],
        states=[dict(s.__dict__, elems=int(np.prod(s.shape)), ctype=_CTYPES[DType(s.dtype)][0],
                     ptr=ctx.ptr(s.name), dtype_code=DTYPE_CODES[DType(s.dtype)],
                     rows=_state_rows(s, ctx), comment=c_comment(s.name)) for s in states],
        steps=steps, infer=infer, predict=predict, kernels=kernel_src,
        dtype_codes=[(d.value.upper(), c) for d, c in DTYPE_CODES.items()],
        crc_table=[f"0x{v:08X}u" for v in _crc_table()], target=target.name,
        target_kind=target.kind, **_guard_context(schedule, plan),
    )
    if any(len(e.shape) > 4 for e in tensors):
        raise TargetError(f"model {model!r} has a tensor of rank > 4; the C tensor table holds "
                          "4 dims")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    header = out / f"{model}.h"
    source = out / f"{model}.c"
    makefile = out / "Makefile"
    manifest = out / MANIFEST
    header.write_text(env.get_template("model.h.j2").render(**common))
    source.write_text(env.get_template("model.c.j2").render(**common))
    programs = target.kind in ("host", "linux")
    extra_files = []
    if programs:
        trainer = out / TRAINER_SOURCE
        trainer.write_text(env.get_template("trainer.c.j2").render(**common, pixel_lut=[
            c_float(v) for v in PIXEL_LUT]))
        extra_files.append(trainer)
    if target.kind == "baremetal":
        from .baremetal import emit_baremetal
        extra_files += emit_baremetal(env, common, target, out, schedule, plan)
    makefile.write_text(env.get_template("Makefile.j2").render(
        **common, cc=target.cc, cflags=" ".join(target.cflags),
        ldflags=" ".join(target.ldflags), programs=programs))
    doc = dict(schema="bnnc-c-manifest", schema_version=1, bnnc_version=__version__, model=model,
               prefix=prefix, model_hash=mhash, model_sha256=model_sha256, target=target.name,
               config=cfg.as_dict(), batch=cfg.batch, input_shape=list(input_t.shape),
               classes=classes, arena_nbytes=plan.arena_nbytes, state_nbytes=plan.state_nbytes,
               state_elems=elems, dump_nbytes=dump_nbytes,
               blob_header_nbytes=STATE_BLOB_HEADER_BYTES,
               blob_magic=STATE_BLOB_MAGIC, blob_version=STATE_BLOB_VERSION,
               header=header.name, source=source.name, target_kind=target.kind,
               trainer=TRAINER_SOURCE if programs else None, seed=cfg.seed,
               tensors=[dict(e.__dict__, shape=list(e.shape)) for e in tensors],
               state=[dict(s.__dict__, shape=list(s.shape)) for s in states],
               steps=[dict(index=s["index"], kernel=s["kernel"], layer=s["layer"], fn=s["fn"])
                      for s in steps],
               tensor_index=index_of)
    manifest.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    files = [header, source, makefile, manifest, *extra_files]
    if plan_json is not None:
        pj = out / "plan.json"
        pj.write_text(plan_json)
        files.append(pj)
    return Emitted(out, model, prefix, header, source, makefile, manifest, tuple(files),
                   tuple(sorted(instances)), doc)


def _with_geom(e: TensorEntry, schedule: Schedule) -> TensorEntry:
    """Attach the NHWC bit-order geometry to packed dense weights read by an XNOR kernel."""
    if e.dtype != "bit" or not e.layout.startswith("bits W^T"):
        return e
    for s in schedule.steps:
        if s.kernel == "dense_fwd_xnor" and s.inputs[1] == e.name and s.attrs.get("x_chw"):
            c, h, w = s.attrs["x_chw"]
            return TensorEntry(**{**e.__dict__, "geom": {"hw": h * w, "wc": _words(c)}})
    return e


def _state_rows(s: StateEntry, ctx: _Ctx) -> dict:
    """Geometry of a packed (Bop) state weight for the element <-> bit mapping of init/load/read."""
    if s.dtype != "bit":
        return dict(kind=-1, a=0, b=0, words=0, hw=1, wc=0)
    kind, a, b, words, hw, wc = _bop_geometry(ctx, s.name)
    return dict(kind=kind, a=a, b=b, words=words, hw=hw, wc=wc)


def header_cdef(header_text: str) -> str:
    """The part of a generated header that cffi's cdef reads: between the CDEF markers, without
    preprocessor lines (cffi gets constants from the manifest instead)."""
    m = re.search(r"/\* BEGIN CDEF \*/\n(.*?)/\* END CDEF \*/", header_text, re.S)
    if not m:
        raise TargetError("generated header has no CDEF section; regenerate it with this "
                          "bnnc version")
    return "\n".join(line for line in m.group(1).splitlines() if not line.lstrip().startswith("#"))
