"""The fused conv -> l1 BN -> sign step of the proposed algorithm (issue 18): a conv whose f32
output only an l1 batch norm reads, and whose BN output only a packed sign reads, runs as one step
over chunks of the batch, so only one chunk of the pre-BN tensor exists (compiler/README.md,
"Fused conv -> l1 BN -> sign"; `--no-fuse` turns it off).

`fuse_conv_bn_sign` rewrites the finished schedule (compiler/schedule.py calls it); the kernel's
C is the `bn` family's template (kernels/bn.c.j2, the macros at its end) and calls the conv's, the
BN's and the sign's own instances, so the values are bit-identical to the unfused steps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..c_literals import c_float
from ..ir import tname
from ..lower import Call, LowerCtx, Threaded, call_lines, instance, lcm_unit, part_args, words64
from ..schedule_ir import Role, Step
from .activation import SIGN_FWD_PACK
from .base import BIT, F16, F32, STATE, WEIGHTS, KernelFamily, OpFamily, Phase, kernel
from .batchnorm import BN_L1_FWD
from .conv import CONV_FWD_F32, CONV_FWD_SIGNW, CONV_FWD_XNOR

if TYPE_CHECKING:
    from ..schedule import ScheduleBuilder

# the conv forward kernels conv_bn_sign_fwd runs on a chunk of the batch
_CONV_FWD = {k.name: k for k in (CONV_FWD_XNOR, CONV_FWD_SIGNW, CONV_FWD_F32)}
CHUNK_DIV = 32     # chunk = ceil(B / 32) samples: the f32 chunk is the size of one 1-bit tensor


def fuse_conv_bn_sign(b: ScheduleBuilder) -> None:
    """Replace each conv forward -> l1 BN forward (training, with its sign bits) -> packed sign
    (with its STE mask) triple of consecutive steps by one `conv_bn_sign_fwd` step, where the
    conv's f32 output and the BN's f32 output are read by no other step and the output is an
    image (spatial > 1): then only one chunk of ceil(B / 32) samples of the pre-BN tensor exists
    (`<bn>.chunk`), with the per-channel lane sums `<bn>.lanes` (C x 64 f32) of the statistics.
    Runs on the whole schedule (backward included), so "no other reader" is checked, not assumed.
    Nothing is fused under `--no-fuse` (cfg.fuse False)."""
    if not b.cfg.fuse:
        return
    k = 0
    while k + 2 < len(b.steps):
        conv, bn, sign = b.steps[k:k + 3]
        if _fusable(b, conv, bn, sign):
            yc, yb = conv.outputs[0], bn.outputs[0]
            chunk = -(-b.B // CHUNK_DIV)
            c, sp = bn.attrs["channels"], bn.attrs["spatial"]
            scr = b.new_act(tname(bn.layer, "chunk"), F32, (chunk, c) + b.tensors[yc].shape[2:],
                            Role.SCRATCH)
            lanes = b.new(tname(bn.layer, "lanes"), F32, (c, 64), Role.SCRATCH,
                          layout="lane sums: channel c, lane l = s mod 64")
            ins = bn.inputs[1:] + conv.inputs
            outs = (sign.outputs[0],) + bn.outputs[1:] + (sign.outputs[1], scr, lanes)
            if _exact_f16(conv):
                outs += (b.new_act(tname(bn.layer, "x16"), F16, b.tensors[yc].shape,
                                   Role.SCRATCH),)
            b.replace_steps(k, k + 3, CONV_BN_SIGN_FWD, bn.layer, ins, outs, (yc, yb),
                            conv_kernel=conv.kernel.name, chunk=chunk, spatial=sp,
                            conv=tuple(sorted(conv.attrs.items())),
                            bn=tuple(sorted(bn.attrs.items())),
                            sign=tuple(sorted(sign.attrs.items())))
        k += 1


def _exact_f16(conv: Step) -> bool:
    """Whether f16 holds every output of `conv` exactly: an XNOR conv without bias sums
    cin * (taps inside the image) terms +-1, an integer of that count's parity, so |v| <= 2048,
    or an even cin (even sums) and |v| <= 4096."""
    a = conv.attrs
    k = a["cin"] * a["kh"] * a["kw"]
    return conv.kernel is CONV_FWD_XNOR and len(conv.inputs) == 2 and (
        k <= 2048 or (a["cin"] % 2 == 0 and k <= 4096))


def _fusable(b: ScheduleBuilder, conv: Step, bn: Step, sign: Step) -> bool:
    yc = conv.outputs[0] if len(conv.outputs) == 1 else None
    if conv.kernel.name not in _CONV_FWD or yc is None or b.tensors[yc].dtype is not F32 \
            or bn.kernel is not BN_L1_FWD or bn.inputs[0] != yc or len(bn.outputs) != 6 \
            or bn.attrs["spatial"] < 2 or sign.kernel is not SIGN_FWD_PACK \
            or sign.inputs != (bn.outputs[0],) or len(sign.outputs) != 2:
        return False
    mine = {id(conv), id(bn), id(sign)}
    return not any(t in s.inputs or t in s.outputs for s in b.steps if id(s) not in mine
                   for t in (yc, bn.outputs[0]))


def _fused_parts(step: Step, ctx: LowerCtx) -> tuple[Call, Call, list[str], list[str],
                                                   list[str]]:
    """The conv's and the sign's own lowerings for a chunk-sized batch (the conv writes the chunk,
    the sign reads it), their C calls on the chunk [lo, lo + n) (pointers advanced by the
    per-sample sizes of their own thread splits) and the conv's geometry `gc`."""
    a = step.attrs
    chunk, cins = a["chunk"], step.inputs[3:]
    y, mask, scr = step.outputs[0], step.outputs[6], step.outputs[7]
    ck = _CONV_FWD[a["conv_kernel"]]
    cc = ck.lower(Step(step.index, ck, step.layer, tuple(cins), (scr,),
                       dict(a["conv"], batch=chunk)), ctx)
    sc = SIGN_FWD_PACK.lower(Step(step.index, SIGN_FWD_PACK, step.layer, (scr,), (y, mask),
                                  dict(a["sign"], batch=chunk)), ctx)
    assert cc.args[-1] == "&g" and cc.split and cc.split.geom and sc.split, (cc, sc)
    so = dict(sc.split.offsets)
    conv = _chunk_call(cc, {0: dict(cc.split.offsets)[0]}, {len(cc.args) - 1: "&gc1"})
    sign = _chunk_call(sc, {1: so[1], 2: so[2]}, {sc.split.count: "n"})
    decls = [d.replace("bnnc_geom_t g =", "bnnc_geom_t gc =") for d in cc.decls]
    assert len(decls) == 1 and "bnnc_geom_t gc =" in decls[0], decls
    return cc, sc, conv, sign, decls


def _chunk_call(k: Call, offsets: dict[int, int], subst: dict[int, str]) -> list[str]:
    """`k` on the chunk [lo, lo + n): pointer arguments in `offsets` advance by their per-sample
    size, `subst` replaces arguments (geometry, count)."""
    args = [subst[i] if i in subst else
            f"{arg} + (size_t)lo * {offsets[i]}u" if i in offsets else str(arg)
            for i, arg in enumerate(k.args)]
    return call_lines(k.inst.fn, args, indent=12)


def _lower_conv_bn_sign(step: Step, ctx: LowerCtx) -> Call:
    """Three passes over the batch in chunks, each computing the conv's chunk with the conv's own
    instance (or, for exact integers, pass 0 does and keeps an f16 copy that passes 1 and 2
    read): lane sums of x (-> mu), of |x - mu| (-> psi, running statistics), then the BN in place
    on the chunk (sign bits s) and the sign's own instance (packed output, STE mask)."""
    a = step.attrs
    cc, sc, conv, sign, decls = _fused_parts(step, ctx)
    beta, rm, rp = step.inputs[:3]
    mu, psi, s, _, scr, lanes = step.outputs[3:9]
    ba = dict(a["bn"])
    B, C, S = ba["batch"], ba["channels"], a["spatial"]
    m = ba["momentum"]
    lane = instance(step, ctx, "bn_l1_lanes")
    stat = instance(step, ctx, "bn_l1_stat", {"rm": rm})
    apply = instance(step, ctx, "bn_l1_apply", {"beta": beta})
    sw = words64(C * S)
    uses: tuple = ()
    if len(step.outputs) > 9:
        # exact integers kept in f16: the conv runs once, passes 1 and 2 read its f16 copy
        x16, per = ctx.ptr(step.outputs[9]), C * S
        store = instance(step, ctx, "bn_f16_store")
        load = instance(step, ctx, "bn_f16_load")
        uses = (store, load)
        at = f"{x16} + (size_t)lo * {per}u"
        conv = ["            if (pass == 0) {", *(f"    {ln}" for ln in conv),
                *call_lines(store.fn, [ctx.ptr(scr), at, f"(size_t)n * {per}u"], indent=16),
                "            } else",
                *call_lines(load.fn, [at, ctx.ptr(scr), f"(size_t)n * {per}u"], indent=16)]
    body = [f"    float *lanes = {ctx.ptr(lanes)};",
            "    int32_t lo, pass;",
            "    bnnc_geom_t gc1 = gc;",
            f"    memset(lanes, 0, {C * 64 * 4}u);",
            "    for (pass = 0; pass < 3; pass++) {",
            f"        for (lo = 0; lo < {B}; lo += {a['chunk']}) {{",
            f"            const int32_t n = {B} - lo < {a['chunk']} ? {B} - lo : {a['chunk']};",
            "            gc1.B = n;",
            *conv,
            "            if (pass < 2) {",
            *call_lines(lane.fn, [ctx.ptr(scr), ctx.ptr(mu), "lanes", "n", C, S, "pass"],
                        indent=16),
            "                continue;",
            "            }",
            *call_lines(apply.fn, [ctx.ptr(scr), ctx.ptr(beta), ctx.ptr(mu), ctx.ptr(psi),
                                   f"{ctx.ptr(s)} + (size_t)lo * {sw}u", "n", C, S, sw],
                        indent=12),
            *sign,
            "        }",
            "        if (pass < 2)",
            *call_lines(stat.fn, ["lanes", ctx.ptr(rm), ctx.ptr(rp), ctx.ptr(mu), ctx.ptr(psi),
                                  B, C, S, c_float(m), c_float(1 - m), "pass"], indent=12),
            "    }"]
    th = _conv_bn_sign_threaded(step, ctx, cc, sc, stat, x16=len(step.outputs) > 9)
    return Call(lane, [], decls, body=body, uses=(stat, apply, cc.inst, sc.inst) + uses,
                threaded=th)


def _conv_bn_sign_threaded(step: Step, ctx: LowerCtx, cc: Call, sc: Call, stat,
                           x16: bool) -> Threaded:
    """The fused step under --threads, with the one-thread bits: the same chunks, each chunk's
    work split by `bnnc_par`s that wait for each other (the chunk is shared scratch). The conv
    over the chunk's samples (its own split); the lane sums over channels (every channel's lanes
    are its own and keep the one-thread order: samples 0, 1, ... of the batch); the BN apply and
    the sign over the chunk's samples (each sample's rows of sign bits, packed output and mask are
    whole words of its own). The statistics (C x 64 adds) stay serial between the passes.
    Without an f16 copy, the three passes of the one-thread step: per chunk the conv, then the
    lane sums (passes 0, 1); in pass 2 the conv, apply and sign of each part's samples at once.
    With one (`<bn>.x16`, the conv's exact values): the conv runs once over the chunks, storing
    its samples' f16 values; each lane-sum pass is then one split over channels reading the whole
    f16 copy; pass 2 loads, applies and signs each chunk's samples in one split.
    `{step}_c0`/`_n`/`_pass`: the chunk's first sample and size, and the pass, as the parts see
    them."""
    a = step.attrs
    beta, rm, rp = step.inputs[:3]
    mu, psi, s, _, scr, lanes = step.outputs[3:9]
    ba = dict(a["bn"])
    B, C, S, chunk = ba["batch"], ba["channels"], a["spatial"], a["chunk"]
    m, sw, per = ba["momentum"], words64(C * S), C * S
    assert cc.split is not None and cc.split.geom and sc.split is not None, (cc, sc)
    apply = instance(step, ctx, "bn_l1_apply", {"beta": beta})
    c0, n, pas = "{step}_c0", "{step}_n", "{step}_pass"
    mine = f"{ctx.ptr(scr)} + (size_t)lo * {per}u"
    conv = [*(f"    {d}" for d in cc.decls), "    bnnc_geom_t gp = g;", "    gp.B = hi - lo;",
            *call_lines(cc.inst.fn, part_args(cc, {0: c0}))]
    out = [*call_lines(apply.fn, [mine, ctx.ptr(beta), ctx.ptr(mu), ctx.ptr(psi),
                                  f"{ctx.ptr(s)} + (size_t)({c0} + lo) * {sw}u", "hi - lo", C,
                                  S, sw]),
           *call_lines(sc.inst.fn, part_args(sc, {1: c0, 2: c0}))]
    stat_line = call_lines(stat.fn, [ctx.ptr(lanes), ctx.ptr(rm), ctx.ptr(rp), ctx.ptr(mu),
                                     ctx.ptr(psi), B, C, S, c_float(m), c_float(1 - m), "pass"],
                           indent=8)

    def chunks(part: str, unit: int) -> list[str]:
        """Every chunk of the batch, in order: `part` split over the chunk's samples."""
        return [f"    for (lo = 0; lo < {B}; lo += {chunk}) {{",
                f"        {c0} = lo;",
                f"        {n} = {B} - lo < {chunk} ? {B} - lo : {chunk};",
                f"        bnnc_par({{step}}_{part}, {n}, {unit});",
                "    }"]

    head = ["    int32_t lo, pass;", f"    memset({ctx.ptr(lanes)}, 0, {C * 64 * 4}u);"]
    statics = [f"static int32_t {c0}, {n}, {pas};   /* the parts' chunk (first sample, size) "
               "and pass */"]
    if x16:
        lane = instance(step, ctx, "bn_l1_lanes", ranged=True, f16=True)
        store = instance(step, ctx, "bn_f16_store")
        load = instance(step, ctx, "bn_f16_load")
        at = f"{ctx.ptr(step.outputs[9])} + (size_t)({c0} + lo) * {per}u"
        size = f"(size_t)(hi - lo) * {per}u"
        body = [*head, *chunks("conv", cc.split.unit),
                "    for (pass = 0; pass < 2; pass++) {",
                f"        {pas} = pass;",
                f"        bnnc_par({{step}}_lanes, {C}, 1);",
                *stat_line,
                "    }",
                *chunks("out", sc.split.unit)]
        return Threaded(
            body=body,
            parts={"conv": [*conv, *call_lines(store.fn, [mine, at, size])],
                   "lanes": call_lines(lane.fn, [ctx.ptr(step.outputs[9]), ctx.ptr(mu),
                                                 ctx.ptr(lanes), B, C, S, pas, "lo", "hi"]),
                   "out": [*call_lines(load.fn, [at, mine, size]), *out]},
            statics=statics, uses=(cc.inst, sc.inst, lane, stat, apply, store, load))
    lane = instance(step, ctx, "bn_l1_lanes", ranged=True)
    both = lcm_unit(cc.split.unit, sc.split.unit)
    body = [*head,
            "    for (pass = 0; pass < 3; pass++) {",
            f"        {pas} = pass;",
            f"        for (lo = 0; lo < {B}; lo += {chunk}) {{",
            f"            {c0} = lo;",
            f"            {n} = {B} - lo < {chunk} ? {B} - lo : {chunk};",
            "            if (pass < 2) {",
            f"                bnnc_par({{step}}_conv, {n}, {cc.split.unit});",
            f"                bnnc_par({{step}}_lanes, {C}, 1);",
            "            } else",
            f"                bnnc_par({{step}}_out, {n}, {both});",
            "        }",
            "        if (pass < 2)",
            *(f"    {ln}" for ln in stat_line),
            "    }"]
    return Threaded(
        body=body,
        parts={"conv": conv,
               "lanes": call_lines(lane.fn, [ctx.ptr(scr), ctx.ptr(mu), ctx.ptr(lanes), n, C,
                                             S, pas, "lo", "hi"]),
               "out": [*conv, *out]},
        statics=statics, uses=(cc.inst, sc.inst, lane, stat, apply))


def _lower_conv_bn_sign_infer(step: Step, ctx: LowerCtx) -> Call:
    """The predict entry's: the same chunks, BN in inference mode (running statistics)."""
    a = step.attrs
    cc, sc, conv, sign, decls = _fused_parts(step, ctx)
    beta, rm, rp = step.inputs[:3]
    scr = step.outputs[7]
    B, C, S = dict(a["bn"])["batch"], dict(a["bn"])["channels"], a["spatial"]
    inf = instance(step, ctx, "bn_l1_infer", {"beta": beta, "rm": rm})
    body = ["    int32_t lo;",
            "    bnnc_geom_t gc1 = gc;",
            f"    for (lo = 0; lo < {B}; lo += {a['chunk']}) {{",
            f"        const int32_t n = {B} - lo < {a['chunk']} ? {B} - lo : {a['chunk']};",
            "        gc1.B = n;",
            *[ln[4:] for ln in conv],
            *call_lines(inf.fn, [ctx.ptr(scr), ctx.ptr(beta), ctx.ptr(rm), ctx.ptr(rp),
                                 ctx.ptr(scr), "n", C, S], indent=8),
            *[ln[4:] for ln in sign],
            "    }"]
    return Call(inf, [], decls, body=body, uses=(cc.inst, sc.inst))


def _magnitude_fused(step: Step, name: str, mag) -> np.ndarray | None:
    """The batch mean's terms are bounded by mean|x| <= |mu| + psi (the C's own mu and psi): the
    full conv output they come from never exists."""
    if not name.endswith((".mu", ".running_mean")):
        return None
    return mag.value(step.outputs[3]) + mag.value(step.outputs[4])


CONV_BN_SIGN_FWD = kernel(
    "conv_bn_sign_fwd", Phase.FORWARD, KernelFamily.BN,
    "conv (any conv forward kernel) -> l1 BN (batch statistics, sign bits) -> packed sign with "
    "its STE mask, three passes over chunks of the batch: only one chunk of the conv output exists",
    [("beta", STATE), ("running_mean", STATE), ("running_psi", STATE), ("x", (F32, BIT)),
     ("w", WEIGHTS), ("b?", STATE)],
    [("y", BIT), ("running_mean", STATE), ("running_psi", STATE), ("mu", F32), ("psi", F32),
     ("s", BIT), ("mask", BIT), ("chunk", F32), ("lanes", F32), ("x16?", F16)],
    lower=_lower_conv_bn_sign, lower_infer=_lower_conv_bn_sign_infer, magnitude=_magnitude_fused)


FAMILY = OpFamily(name="conv_bn_sign", doc=__doc__, kernels=(CONV_BN_SIGN_FWD,))
