"""Max, average and global average pooling (ONNX MaxPool/AveragePool/GlobalAveragePool)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..ir import Layer, LayerKind, tname
from ..lower import (Call, LowerCtx, Split, Threaded, call_lines, instance, part_args, pool_geom,
                     words64)
from ..onnx_values import Act, node_attrs, node_label, short
from ..schedule_ir import DType, Role, Step, Tensor
from .base import (ACT, BIT, F32, GRADS, I32, STATE, U8, WEIGHTS, Bits, KernelFamily, LayerSpec,
                   OnnxOp, OpFamily, Phase, kernel, out_hw, pads4, pair, prod)
from .conv import CONV_FWD_F32, CONV_FWD_SIGNW, CONV_FWD_XNOR, window_geometry
from .exportctx import Emitter
from .refctx import RefRun
from .refmath import crop, mask_store, pad, unwindow, windows

if TYPE_CHECKING:
    from ..schedule import ScheduleBuilder


# ---- ONNX import ------------------------------------------------------------------------------

def _pool(imp, node, vals, kind):
    x = imp._nchw(imp._act(vals[0], node), node)
    if len(node.output) > 1 and imp.consumers.get(node.output[1]):
        imp._fail(node, "its Indices output is used")
    at = node_attrs(node)
    if len(x.shape) != 3:
        imp._fail(node, f"pools an activation of per-sample shape {list(x.shape)}")
    if any(d != 1 for d in at.get("dilations", [1, 1])):
        imp._fail(node, f"dilations {short(at['dilations'])} are not supported")
    if "kernel_shape" not in at:
        imp._fail(node, "has no kernel_shape attribute",
                  hint="the file does not follow the ONNX operator spec; re-export it")
    k = tuple(int(v) for v in at["kernel_shape"])
    strides, pads, hw = window_geometry(imp, node, x.shape[1:], k, pool=True)
    attrs = {"kernel": k, "strides": strides, "pads": pads}
    if kind is LayerKind.AVGPOOL:
        attrs["count_include_pad"] = bool(at.get("count_include_pad", 0))
    name = imp._add(kind, [x.layer], (x.shape[0], *hw), node_label(node),
                    attrs=attrs)
    return Act(name, (x.shape[0], *hw))


def _op_maxpool(imp, node, vals):
    return _pool(imp, node, vals, LayerKind.MAXPOOL)


def _op_averagepool(imp, node, vals):
    return _pool(imp, node, vals, LayerKind.AVGPOOL)


def _op_globalaveragepool(imp, node, vals):
    x = imp._nchw(imp._act(vals[0], node), node)
    if len(x.shape) != 3:
        imp._fail(node, f"pools an activation of per-sample shape {list(x.shape)}")
    shape = (x.shape[0], 1, 1)
    return Act(imp._add(LayerKind.GLOBAL_AVGPOOL, [x.layer], shape, node_label(node)),
               shape)


ONNX = {
    "MaxPool": OnnxOp(_op_maxpool, (1, 1)),
    "AveragePool": OnnxOp(_op_averagepool, (1, 1)),
    "GlobalAveragePool": OnnxOp(_op_globalaveragepool, (1, 1)),
}


# ---- training schedule ------------------------------------------------------------------------

def _pool_attrs(b: ScheduleBuilder, lay: Layer) -> dict:
    c, h, w = b.g.shape_of(lay.inputs[0])
    attrs = dict(batch=b.B, channels=c, h=h, w=w, oh=lay.shape[1], ow=lay.shape[2],
                 kernel=pair(lay.attrs["kernel"]), strides=pair(lay.attrs["strides"]),
                 pads=pads4(lay.attrs["pads"]))
    if lay.kind is LayerKind.AVGPOOL:
        attrs["count_include_pad"] = int(bool(lay.attrs.get("count_include_pad", 0)))
    return attrs


def _fwd_maxpool(b: ScheduleBuilder, lay: Layer) -> None:
    x = b.act[lay.inputs[0]]
    attrs = _pool_attrs(b, lay)
    (kh, kw), (sh, sw) = attrs["kernel"], attrs["strides"]
    full = b.full(lay.name)
    if lay.name in b.packed:
        y = b.bits(tname(lay.name, "out"), full, Role.SCRATCH, b.packed[lay.name])
        b.act[lay.name] = y
    else:
        y = b.out_f32(lay)
    kernel, outs = MAXPOOL_FWD_WIDX, (y,)
    if lay.name in b.has_dout:
        am = tname(lay.name, "argmax")
        if b.cfg.save_bits and kh <= sh and kw <= sw:
            kernel = MAXPOOL_FWD_MASK
            am = b.bits(am, b.tensors[x].shape, Role.SCRATCH, "flat")
        else:
            am = b.new(am, U8 if b.cfg.save_bits else I32, full, Role.SCRATCH,
                       layout="in-window index, row-major over (kh, kw)")
        b.mask[lay.name] = am
        outs += (am,)
    if b.cfg.fuse and kernel is MAXPOOL_FWD_MASK and b.tensors[x].dtype is F32 \
            and [c.name for c in b.g.consumers(lay.inputs[0])] == [lay.name]:
        conv = b.take_producer(x, tuple(CONV_FWD.values()))
        if conv is not None:
            _fwd_conv_pool(b, conv, attrs, outs)
            return
    b.emit(kernel, lay.name, (x,), outs, **attrs)


# the conv forward kernels conv_pool_fwd runs on a chunk of the batch
CONV_FWD = {k.name: k for k in (CONV_FWD_XNOR, CONV_FWD_SIGNW, CONV_FWD_F32)}


def _fwd_conv_pool(b: ScheduleBuilder, conv: Step, attrs: dict, outs: tuple[str, ...]) -> None:
    """conv -> max pool with a 1-bit argmax (the proposed algorithm's 1-bit saves) as one step
    over chunks of ceil(B / (kh * kw)) samples: the conv output of one chunk (`<conv>.chunk`, about
    the size of the pooled output) is the only pre-pool tensor; the full one never exists."""
    (kh, kw), a = attrs["kernel"], conv.attrs
    chunk = -(-b.B // (kh * kw))
    scr = b.new_act(tname(conv.layer, "chunk"), F32, (chunk, a["cout"], a["oh"], a["ow"]),
                    Role.SCRATCH)
    b.emit(CONV_POOL_FWD, conv.layer, conv.inputs, (outs[0], scr) + outs[1:],
           conv_kernel=conv.kernel.name, chunk=chunk, conv=tuple(sorted(a.items())),
           pool=tuple(sorted(attrs.items())))


def _fwd_avgpool(b: ScheduleBuilder, lay: Layer) -> None:
    x = b.act[lay.inputs[0]]
    b.emit(AVGPOOL_FWD, lay.name, (x,), (b.out_f32(lay),),
           **_pool_attrs(b, lay))


def _fwd_gap(b: ScheduleBuilder, lay: Layer) -> None:
    c, h, w = b.g.shape_of(lay.inputs[0])
    b.emit(GAP_FWD, lay.name, (b.act[lay.inputs[0]],),
           (b.out_f32(lay),), batch=b.B, channels=c, spatial=h * w)


def _bwd_maxpool(b: ScheduleBuilder, lay: Layer) -> None:
    am = b.mask[lay.name]
    kernel = MAXPOOL_BWD_MASK if b.tensors[am].dtype is BIT else MAXPOOL_BWD_WIDX
    b.unary_backward(lay, kernel, (am,), **_pool_attrs(b, lay))


def _bwd_avgpool(b: ScheduleBuilder, lay: Layer) -> None:
    b.unary_backward(lay, AVGPOOL_BWD, (), **_pool_attrs(b, lay))


def _bwd_gap(b: ScheduleBuilder, lay: Layer) -> None:
    c, h, w = b.g.shape_of(lay.inputs[0])
    b.unary_backward(lay, GAP_BWD, (), batch=b.B, channels=c, spatial=h * w)


def _check_window(lay: Layer, ins) -> str | None:
    if len(ins[0]) != 3:
        bad = f"input {ins[0]} is not (C, H, W)"
    else:
        exp = (ins[0][0],) + out_hw(ins[0], pair(lay.attrs["kernel"]), lay.attrs["strides"],
                                    lay.attrs["pads"])
        bad = None if exp == lay.shape else f"output {lay.shape}, expected {exp}"
    kh, kw = pair(lay.attrs["kernel"])
    if lay.kind is LayerKind.MAXPOOL and kh * kw > 256:
        bad = f"a {kh}x{kw} max-pool window does not fit the u8 argmax index"
    return bad


def _check_gap(lay: Layer, ins) -> str | None:
    if len(ins[0]) != 3 or prod(lay.shape) != ins[0][0]:
        return f"input {ins[0]} -> {lay.shape} is not a global average pool"
    return None


FORWARD = {LayerKind.MAXPOOL: _fwd_maxpool, LayerKind.AVGPOOL: _fwd_avgpool,
           LayerKind.GLOBAL_AVGPOOL: _fwd_gap}
BACKWARD = {LayerKind.MAXPOOL: _bwd_maxpool, LayerKind.AVGPOOL: _bwd_avgpool,
            LayerKind.GLOBAL_AVGPOOL: _bwd_gap}
_WINDOW = ("kernel", "strides", "pads")
LAYER_SPECS = (
    LayerSpec(LayerKind.MAXPOOL, "pool", attrs=_WINDOW, check_shapes=_check_window,
              bits=Bits.PASS),
    LayerSpec(LayerKind.AVGPOOL, "avgpool", attrs=_WINDOW, check_shapes=_check_window),
    LayerSpec(LayerKind.GLOBAL_AVGPOOL, "gap", check_shapes=_check_gap, output=True),
)


# ---- kernels: contract (dtypes, in-place) + C lowering -----------------------------------------

def _pool_p22(a: dict) -> bool:
    """2x2 windows, stride 2, no padding: the geometry of the row-at-a-time pool kernels."""
    return (tuple(a["kernel"]) == (2, 2) and tuple(a["strides"]) == (2, 2)
            and not any(a["pads"]))


def _pool_split(a: dict, ctx: LowerCtx, args: dict[int, str]) -> Split:
    """A pool call split over samples (its `&g` geometry gets the part's batch): every pool kernel
    works sample by sample. `args`: argument index -> the tensor it points to (None: no pointer);
    each advances by one sample of that tensor (elements, or 64-bit words of packed bits and
    1-bit masks, which hold whole samples)."""
    def per(t: Tensor) -> int:       # (the fused step's pool runs on a chunk of t's samples)
        n = t.nbytes // 8 if t.dtype is DType.BIT else t.size
        assert t.shape[0] >= a["batch"] and n % t.shape[0] == 0, (t.name, t.shape, n)
        return n // t.shape[0]

    offs = tuple((i, per(ctx.t(t))) for i, t in sorted(args.items()) if t)
    return Split(a["batch"], 1, offs, geom=True)


def _lower_maxpool_fwd(step: Step, ctx: LowerCtx) -> Call:
    x, y = step.inputs[0], step.outputs[0]
    am = step.outputs[1] if len(step.outputs) > 1 else None
    a = step.attrs
    kind = "mask" if step.kernel is MAXPOOL_FWD_MASK else "widx"
    ops = {"am": am} if am and kind == "widx" else {}
    bits = ctx.t(x).dtype is DType.BIT
    # packed input: a window row's argmax bits are assembled in one word per channel
    fast = _pool_p22(a) and (not bits or a["w"] <= 64)
    inst = instance(step, ctx, f"maxpool_p22_fwd_{kind}" if fast else None, operands=ops,
                    bits=bits, argmax=am is not None, **({"ow": a["ow"]} if fast else {}))
    return Call(inst, [ctx.ptr(x), ctx.ptr(y), ctx.ptr(am) if am else "0", "&g"],
                [pool_geom(a)], _pool_split(a, ctx, {0: x, 1: y, 2: am}))


def _lower_conv_pool_fwd(step: Step, ctx: LowerCtx) -> Call:
    """A loop over batch chunks calling the conv's and the pool's own instances (lowered as for a
    chunk-sized batch): the same C functions, hence the same values, as the two unfused steps."""
    a = step.attrs
    chunk, ca, pa = a["chunk"], dict(a["conv"]), dict(a["pool"])
    x, w, *bias = step.inputs
    y, scr, *am = step.outputs
    ck = CONV_FWD[a["conv_kernel"]]
    cc = ck.lower(Step(step.index, ck, step.layer, step.inputs, (scr,), dict(ca, batch=chunk)),
                  ctx)
    pc = _lower_maxpool_fwd(Step(step.index, MAXPOOL_FWD_MASK, step.layer, (scr,), (y, *am),
                                 dict(pa, batch=chunk)), ctx)
    assert cc.args[-1] == "&g" and pc.args[-1] == "&g" and cc.args[0] == ctx.ptr(x), cc.args
    x_per = (ca["h"] * ca["w"] * words64(ca["cin"]) if ctx.t(x).dtype is DType.BIT
             else ca["cin"] * ca["h"] * ca["w"])
    # elements (words for bits) per sample of the conv's input and the pool's output and argmax
    c = pa["channels"]
    y_per, am_per = c * pa["oh"] * pa["ow"], words64(c * pa["h"] * pa["w"])

    def call(k: Call, g: str, offs: dict[int, int]) -> list[str]:
        """`k` on chunk [lo, lo + chunk): pointer arguments `offs` advance by their per-sample
        size, the geometry is `g` (batch = the chunk's)."""
        args = [f"{arg} + (size_t)lo * {offs[i]}u" if i in offs and arg != "0" else str(arg)
                for i, arg in enumerate(k.args[:-1])] + [g]
        return call_lines(k.inst.fn, args, indent=8)

    decls = [d.replace("bnnc_geom_t g =", "bnnc_geom_t gc =") for d in cc.decls] + \
        [d.replace("bnnc_geom_t g =", "bnnc_geom_t gq =") for d in pc.decls]
    assert len(decls) == 2 and all("bnnc_geom_t g" in d for d in decls), decls
    body = ["    int32_t lo;",
            f"    for (lo = 0; lo < {ca['batch']}; lo += {chunk}) {{",
            "        bnnc_geom_t gc1 = gc, gq1 = gq;",
            f"        gc1.B = gq1.B = {ca['batch']} - lo < {chunk} ? {ca['batch']} - lo : {chunk};",
            *call(cc, "&gc1", {0: x_per}), *call(pc, "&gq1", {1: y_per, 2: am_per}), "    }"]
    return Call(cc.inst, [], decls, body=body, uses=(pc.inst,),
                threaded=_conv_pool_threaded(cc, pc, ca["batch"], chunk))


def _conv_pool_threaded(cc: Call, pc: Call, batch: int, chunk: int) -> Threaded:
    """The fused step under --threads: per chunk, the conv's split (samples of the chunk) and
    then the pool's, each a static split of the chunk's samples (the scratch holds the chunk, so
    the pool waits for the whole conv); `{step}_c0` is the chunk's first sample."""
    assert cc.split is not None and cc.split.geom and pc.split is not None and pc.split.geom
    c0 = "{step}_c0"

    def part(k: Call, start: dict[int, str]) -> list[str]:
        return [f"    {d}" for d in k.decls] + ["    bnnc_geom_t gp = g;", "    gp.B = hi - lo;",
                                                 *call_lines(k.inst.fn, part_args(k, start))]

    return Threaded(
        body=["    int32_t lo;",
              f"    for (lo = 0; lo < {batch}; lo += {chunk}) {{",
              f"        {c0} = lo;",
              f"        bnnc_par({{step}}_conv, {batch} - lo < {chunk} ? {batch} - lo : {chunk}, "
              f"{cc.split.unit});",
              f"        bnnc_par({{step}}_pool, {batch} - lo < {chunk} ? {batch} - lo : {chunk}, "
              f"{pc.split.unit});",
              "    }"],
        parts={"conv": part(cc, {0: c0}), "pool": part(pc, {1: c0, 2: c0})},
        statics=[f"static int32_t {c0};   /* the first sample of the chunk the parts run on */"],
        uses=(cc.inst, pc.inst))


def _lower_pool_bwd(step: Step, ctx: LowerCtx) -> Call:
    g, d = step.inputs[0], step.outputs[0]
    a = step.attrs
    decl = [pool_geom(a)]
    fast = {"w": a["w"]} if _pool_p22(a) else {}
    if step.kernel is MAXPOOL_BWD_WIDX:
        # (the portable scatter of one value per window is already cheap here)
        am = step.inputs[1]
        inst = instance(step, ctx, operands={"g": g, "am": am, "d": d})
        return Call(inst, [ctx.ptr(g), ctx.ptr(am), ctx.ptr(d), "&g"], decl,
                    _pool_split(a, ctx, {0: g, 1: am, 2: d}))
    if step.kernel is MAXPOOL_BWD_MASK:
        inst = instance(step, ctx, "maxpool_p22_bwd_mask" if fast else None,
                        operands={"g": g, "d": d}, **fast)
        return Call(inst, [ctx.ptr(g), ctx.ptr(step.inputs[1]), ctx.ptr(d), "&g"], decl,
                    _pool_split(a, ctx, {0: g, 1: step.inputs[1], 2: d}))
    inst = instance(step, ctx, operands={"g": g, "d": d})
    return Call(inst, [ctx.ptr(g), ctx.ptr(d), step.attrs["count_include_pad"], "&g"], decl,
                _pool_split(a, ctx, {0: g, 1: d}))


def _lower_avgpool_fwd(step: Step, ctx: LowerCtx) -> Call:
    x, y = step.inputs[0], step.outputs[0]
    return Call(instance(step, ctx), [ctx.ptr(x), ctx.ptr(y), step.attrs["count_include_pad"],
                                      "&g"],
                [pool_geom(step.attrs)], _pool_split(step.attrs, ctx, {0: x, 1: y}))


def _lower_gap(step: Step, ctx: LowerCtx) -> Call:
    a = step.attrs
    i, o = step.inputs[0], step.outputs[0]
    ops = {} if step.kernel is GAP_FWD else {"g": i, "d": o}
    # values per sample: C * S on the image side, one per channel on the pooled side
    image, pooled = a["channels"] * a["spatial"], a["channels"]
    per_i, per_o = (image, pooled) if step.kernel is GAP_FWD else (pooled, image)
    return Call(instance(step, ctx, operands=ops), [ctx.ptr(i), ctx.ptr(o), a["batch"],
                                                    a["channels"], a["spatial"]],
                split=Split(a["batch"], 1, ((0, per_i), (1, per_o)), count=2))


MAXPOOL_FWD_WIDX = kernel(
    "maxpool_fwd_widx", Phase.FORWARD, KernelFamily.POOL,
    "max pool (first max wins); optional argmax as the in-window index (row-major kh*kw)",
    [("x", ACT)], [("y", ACT), ("argmax?", (I32, U8))], lower=_lower_maxpool_fwd, pm1_keep=True)
MAXPOOL_FWD_MASK = kernel(
    "maxpool_fwd_mask", Phase.FORWARD, KernelFamily.POOL,
    "max pool of non-overlapping windows (first max wins); optional 1-bit argmax mask (input)",
    [("x", ACT)], [("y", ACT), ("argmax?", BIT)], lower=_lower_maxpool_fwd, pm1_keep=True)
CONV_POOL_FWD = kernel(
    "conv_pool_fwd", Phase.FORWARD, KernelFamily.POOL,
    "conv (any conv forward kernel) then max pool with a 1-bit argmax, chunk by chunk of the "
    "batch: only one chunk of the conv output exists",
    [("x", (F32, BIT)), ("w", WEIGHTS), ("b?", STATE)], [("y", F32), ("chunk", F32),
                                                        ("argmax?", BIT)],
    lower=_lower_conv_pool_fwd)
AVGPOOL_FWD = kernel(
    "avgpool_fwd", Phase.FORWARD, KernelFamily.POOL,
    "average pool (count_include_pad as the layer says)", [("x", F32)], [("y", F32)],
    lower=_lower_avgpool_fwd)
GAP_FWD = kernel(
    "gap_fwd", Phase.FORWARD, KernelFamily.POOL, "global average pool over H*W", [("x", F32)],
    [("y", F32)], lower=_lower_gap)
MAXPOOL_BWD_WIDX = kernel(
    "maxpool_bwd_widx", Phase.BACKWARD, KernelFamily.POOL,
    "scatter-add d_out to each window's argmax (in-window idx)",
    [("d_out", GRADS), ("argmax", (I32, U8))], [("d_in", GRADS)], lower=_lower_pool_bwd)
MAXPOOL_BWD_MASK = kernel(
    "maxpool_bwd_mask", Phase.BACKWARD, KernelFamily.POOL,
    "d_in = upsampled d_out * 1-bit argmax mask",
    [("d_out", GRADS), ("argmax", BIT)], [("d_in", GRADS)], lower=_lower_pool_bwd)
AVGPOOL_BWD = kernel(
    "avgpool_bwd", Phase.BACKWARD, KernelFamily.POOL, "spread d_out over each window / its count",
    [("d_out", GRADS)], [("d_in", GRADS)], lower=_lower_pool_bwd)
GAP_BWD = kernel(
    "gap_bwd", Phase.BACKWARD, KernelFamily.POOL, "d_in = d_out / (H*W) broadcast",
    [("d_out", GRADS)], [("d_in", GRADS)], lower=_lower_gap)

KERNELS = (MAXPOOL_FWD_WIDX, MAXPOOL_FWD_MASK, CONV_POOL_FWD, AVGPOOL_FWD, GAP_FWD,
           MAXPOOL_BWD_WIDX, MAXPOOL_BWD_MASK, AVGPOOL_BWD, GAP_BWD)


# ---- numpy reference --------------------------------------------------------------------------

def _pool_geom(lay: Layer) -> tuple[int, int, int, int, tuple[int, ...]]:
    """(kh, kw, sh, sw, pads) of a MAXPOOL/AVGPOOL layer."""
    kh, kw = (int(k) for k in lay.attrs["kernel"])
    sh, sw = (int(s) for s in lay.attrs["strides"])
    return kh, kw, sh, sw, tuple(int(p) for p in lay.attrs["pads"])


def _ref_maxpool_forward(run: RefRun, lay: Layer, x: np.ndarray) -> np.ndarray:
    kh, kw, sh, sw, pads = _pool_geom(lay)
    xp = pad(x, pads, -np.inf)
    win = windows(xp, kh, kw, sh, sw)
    flat = win.reshape(win.shape[:4] + (kh * kw,))
    idx = flat.argmax(axis=-1)                       # numpy: the first maximum wins ties
    y = np.take_along_axis(flat, idx[..., None], -1)[..., 0]
    if run.training:
        one_bit = run.cfg.save_bits and sh >= kh and sw >= kw
        if one_bit:
            # non-overlapping windows: each input element is in at most one window, so a 1-bit
            # "is the argmax" mask over the input routes the gradient unambiguously
            mask = np.zeros(xp.shape, np.int8)
            b, c, oh, ow = np.indices(idx.shape)
            mask[b, c, oh * sh + idx // kw, ow * sw + idx % kw] = 1
            mask = mask_store(run, crop(mask, pads))
            run.saved[lay.name] = {"mask": mask, "xshape": x.shape}
            run.emit(lay, "argmax", mask)
        else:
            run.saved[lay.name] = {"idx": idx, "xshape": x.shape}
            run.emit(lay, "argmax", idx)
    return np.ascontiguousarray(y)


def _ref_maxpool_backward(run: RefRun, lay: Layer, g: np.ndarray, need) -> list:
    kh, kw, sh, sw, pads = _pool_geom(lay)
    sv = run.saved[lay.name]
    xshape = sv["xshape"]
    if "mask" in sv:
        # each input element (h, w) lies in window ((h+t)//sh, (w+l)//sw) if inside its kernel span
        hp = np.arange(xshape[2]) + pads[0]
        wp = np.arange(xshape[3]) + pads[1]
        oh = np.minimum(hp // sh, g.shape[2] - 1)
        ow = np.minimum(wp // sw, g.shape[3] - 1)
        up = g[:, :, oh][:, :, :, ow]
        return [up * sv["mask"].astype(g.dtype)]
    idx = sv["idx"]
    hpad = xshape[2] + pads[0] + pads[2]
    wpad = xshape[3] + pads[1] + pads[3]
    b, c, oh, ow = np.indices(idx.shape)
    dx = np.zeros((xshape[0], xshape[1], hpad, wpad), g.dtype)
    np.add.at(dx, (b, c, oh * sh + idx // kw, ow * sw + idx % kw), g)
    return [crop(dx, pads)]


def _avg_counts(lay: Layer, x: np.ndarray) -> np.ndarray:
    """The divisor of each average: kh*kw, or (ONNX default) the unpadded elements of the window."""
    kh, kw, sh, sw, pads = _pool_geom(lay)
    if int(lay.attrs.get("count_include_pad", 0)):
        return np.asarray(kh * kw, x.dtype)
    ones = pad(np.ones((1, 1) + x.shape[2:], x.dtype), pads)
    return windows(ones, kh, kw, sh, sw).sum(axis=(-2, -1))


def _ref_avgpool_forward(run: RefRun, lay: Layer, x: np.ndarray) -> np.ndarray:
    kh, kw, sh, sw, pads = _pool_geom(lay)
    win = windows(pad(x, pads), kh, kw, sh, sw)
    if run.training:
        run.saved[lay.name] = {"xshape": x.shape}
    return win.sum(axis=(-2, -1)) / _avg_counts(lay, x)


def _ref_avgpool_backward(run: RefRun, lay: Layer, g: np.ndarray, need) -> list:
    kh, kw, sh, sw, pads = _pool_geom(lay)
    xshape = run.saved[lay.name]["xshape"]
    gc = g / _avg_counts(lay, np.empty(xshape, g.dtype))
    dwin = np.broadcast_to(gc[..., None, None], gc.shape + (kh, kw))
    padded = (xshape[0], xshape[1], xshape[2] + pads[0] + pads[2], xshape[3] + pads[1] + pads[3])
    return [crop(unwindow(dwin, padded, sh, sw), pads)]


def _ref_gap_forward(run: RefRun, lay: Layer, x: np.ndarray) -> np.ndarray:
    if run.training:
        run.saved[lay.name] = {"xshape": x.shape}
    return x.mean(axis=(2, 3)).reshape((len(x),) + lay.shape)


def _ref_gap_backward(run: RefRun, lay: Layer, g: np.ndarray, need) -> list:
    xshape = run.saved[lay.name]["xshape"]
    g2 = g.reshape(xshape[:2] + (1, 1)) / (xshape[2] * xshape[3])
    return [np.broadcast_to(g2, xshape).copy()]


REFERENCE_FORWARD: dict = {LayerKind.MAXPOOL: _ref_maxpool_forward,
                           LayerKind.AVGPOOL: _ref_avgpool_forward,
                           LayerKind.GLOBAL_AVGPOOL: _ref_gap_forward}
REFERENCE_BACKWARD: dict = {LayerKind.MAXPOOL: _ref_maxpool_backward,
                            LayerKind.AVGPOOL: _ref_avgpool_backward,
                            LayerKind.GLOBAL_AVGPOOL: _ref_gap_backward}


# ---- export -----------------------------------------------------------------------------------

def _export_maxpool(em: Emitter, lay: Layer, xs: list[str], out: str) -> None:
    a = lay.attrs
    em.node("MaxPool", [xs[0]], out, kernel_shape=list(a["kernel"]), strides=list(a["strides"]),
            pads=list(a["pads"]))


def _export_avgpool(em: Emitter, lay: Layer, xs: list[str], out: str) -> None:
    a = lay.attrs
    em.node("AveragePool", [xs[0]], out, kernel_shape=list(a["kernel"]),
            strides=list(a["strides"]), pads=list(a["pads"]),
            count_include_pad=int(bool(a.get("count_include_pad", False))))


def _export_gap(em: Emitter, lay: Layer, xs: list[str], out: str) -> None:
    em.node("GlobalAveragePool", list(xs), out)


EXPORT: dict = {LayerKind.MAXPOOL: _export_maxpool, LayerKind.AVGPOOL: _export_avgpool,
                LayerKind.GLOBAL_AVGPOOL: _export_gap}


FAMILY = OpFamily(
    name="pool", doc=__doc__, layers=LAYER_SPECS, onnx=ONNX, kernels=KERNELS, forward=FORWARD,
    backward=BACKWARD, reference_forward=REFERENCE_FORWARD, reference_backward=REFERENCE_BACKWARD,
    export=EXPORT)
