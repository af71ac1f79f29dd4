"""Lowering support: what a kernel's `lower(step, ctx) -> Call` needs to turn one scheduled call
into a C function instance and its argument expressions.

The lowerings themselves live with their op family (`compiler/ops/<family>.py`, `KernelSpec.lower`);
codegen (`compiler/codegen.py`) calls them and renders the instances' template macros. Here: the
operand dtype table, `Instance`/`Call`, `LowerCtx` (pointer expressions of a
planned schedule's tensors), `instance` (the C function of a step's operand dtypes), and the
lowering helpers of the families (bit-packing words, +-1 inputs, geometry constants, the fast conv
kernels' scratch plans); C literals come from c_literals.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .c_literals import c_float, c_ident
from .cnames import placed_tensors, tensor_macros
from .schedule_ir import DType, Schedule, Step, Tensor

if TYPE_CHECKING:
    from .ops.base import KernelFamily

# dtype -> (C element type, load fn, RNE store fn, stochastic store fn)
CTYPES: dict[DType, tuple[str, str, str, str]] = {
    DType.F32: ("float", "bnnc_ld_f32", "bnnc_st_f32", "bnnc_sr_f32"),
    DType.BF16: ("uint16_t", "bnnc_ld_bf16", "bnnc_st_bf16", "bnnc_sr_bf16"),
    DType.F16: ("uint16_t", "bnnc_ld_f16", "bnnc_st_f16", "bnnc_sr_f16"),
    DType.BIT: ("uint64_t", "", "", ""),
    DType.PO2: ("uint8_t", "", "", ""),
    DType.U8: ("uint8_t", "", "", ""),
    DType.I32: ("int32_t", "", "", ""),
}


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
    c, ld, st, sr = CTYPES[d]
    return DT(d.value, c, ld, st, sr)


@dataclass(frozen=True)
class Instance:
    family: str        # templates/kernels/<family>.c.j2 (a KernelFamily's value)
    macro: str         # macro in that file
    fn: str            # C function name
    types: tuple[tuple[str, DT], ...]
    flags: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class Split:
    """How `bnnc compile --threads N` divides one call's output between N threads (codegen renders
    it; every output element is computed by exactly one thread, with the sum of the one-thread
    call). The split dimension has `extent` units; thread p of N takes units
    [p * U / N, (p + 1) * U / N) of U = extent / `unit` (rounded up), times `unit`.

    - batch-like splits (samples, rows): the kernel runs on a slice. `offsets` = (argument index,
      elements its pointer advances per unit); `count` = index of the argument holding the extent
      (replaced by the part's size); `geom`: the call's `g` geometry gets B = the part's size.
    - `ranged`: the kernel itself takes the range of its split dimension as its last two
      arguments (lo, hi), lowered as (0, extent); used where the sum runs over the batch (dW:
      split over output channels / weight rows)."""
    extent: int
    unit: int = 1
    offsets: tuple[tuple[int, int], ...] = ()
    count: int | None = None
    geom: bool = False
    ranged: bool = False


@dataclass
class Threaded:
    """A step's C under `--threads N` (N > 1) where one split call (Split) does not say it: a
    kernel in phases (po2_quantize: block maxima, then codes) or a loop of split calls (the fused
    conv -> max-pool step). `parts`: suffix -> the C statements of a part function on the range
    [lo, hi) of its split, rendered as `static void {step}_<suffix>(int32_t lo, int32_t hi)`;
    `body`: the step function's statements, which run a part with
    `bnnc_par({step}_<suffix>, extent, unit)` (every split static, as Split's) and may run serial
    code between; `statics`: file-scope declarations they share; `uses`: the kernel instances they
    call beyond the one-thread call's (rendered only in threaded builds). `{step}` stands for the
    step function's name throughout."""
    body: list[str]
    parts: dict[str, list[str]]
    statics: list[str] = field(default_factory=list)
    uses: tuple[Instance, ...] = ()


@dataclass
class Call:
    """One step's C: `inst(args)` after its `decls`; or, for a fused step that runs other kernels'
    instances in a loop (`ops/pool.py` conv_pool_fwd), the C statements `body` calling `inst` and
    the instances in `uses`."""
    inst: Instance
    args: list
    decls: list[str] = field(default_factory=list)    # step-local constants the call refers to
    split: Split | None = None                         # how threads divide it (None: one thread)
    body: list[str] | None = None                      # statements instead of `inst(args);`
    uses: tuple[Instance, ...] = ()                    # further instances `body` calls
    threaded: Threaded | None = None                   # the step's C under threads, where not `split`


def part_args(call: Call, start: dict[int, str] | None = None, geom: str = "&gp") -> list[str]:
    """The arguments of `call` on a thread's range [lo, hi) of its split (Split): pointers advance
    to unit `lo` (or, for argument i in `start`, to unit `start[i]` + lo), the count becomes
    hi - lo, a `&g` geometry becomes `geom` (its B the part's), a ranged kernel gets lo, hi."""
    sp = call.split
    assert sp is not None
    args = [str(a) for a in call.args]
    for i, per in sp.offsets:
        at = f"({start[i]} + lo)" if start and i in start else "lo"
        args[i] = f"({args[i]} + (size_t){at} * {per}u)"
    if sp.count is not None:
        args[sp.count] = "hi - lo"
    if sp.geom:
        args = [geom if a == "&g" else a for a in args]
    if sp.ranged:
        args[-2:] = ["lo", "hi"]
    return args


def call_lines(fn: str, args, indent: int = 4) -> list[str]:
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


class LowerCtx:
    """A schedule's tensors as C: dtypes, and pointers named by the tensor macros of model.c."""

    def __init__(self, schedule: Schedule, plan):
        self.s = schedule
        self.plan = plan
        self.macros = tensor_macros(placed_tensors(schedule, plan))

    def t(self, name: str) -> Tensor:
        return self.s.tensors[name]

    def ptr(self, name: str) -> str:
        """`T_fc1_out` / `S_fc1_W`: the pointer macro of a tensor the plan places in the arena or
        the state (a pointer of the tensor's C type; it converts to a kernel's const parameter)."""
        return self.macros[name]


def instance(step: Step, ctx: LowerCtx, macro: str | None = None,
             operands: dict[str, str] | None = None, *, family: KernelFamily | None = None,
             **flags) -> Instance:
    """The kernel function for this step's operand dtypes: `k_<macro>[_<dtype>...]`, in the
    template of `family` (default: the step's kernel's)."""
    macro = macro or step.kernel.name
    ops = operands or {}
    types = tuple((k, _dt(ctx.t(v).dtype)) for k, v in ops.items())
    suffix = "".join(f"_{dt.dtype}" for _, dt in types)
    fsuffix = "".join(f"_{k}{int(v) if isinstance(v, bool) else v}"
                      for k, v in sorted(flags.items()))
    return Instance((family or step.kernel.family).value, macro,
                    c_ident(f"k_{macro}{suffix}{fsuffix}"), types, tuple(sorted(flags.items())))


def bits_nhwc(t: Tensor) -> bool:
    return t.layout.startswith("bits NHWC")


def words64(n: int) -> int:
    return -(-n // 64)


def bias_operand(step: Step, ctx: LowerCtx, idx: int) -> tuple[dict[str, str], str]:
    if len(step.inputs) > idx:
        return {"b": step.inputs[idx]}, ctx.ptr(step.inputs[idx])
    return {}, "0"


def pm1_input(ctx: LowerCtx, name: str) -> bool:
    """Whether f32 tensor `name` holds only +-1.0: a SIGN layer's f32 output, seen directly, through
    views (flatten) or through max pooling (a max of +-1 values is +-1)."""
    t = ctx.t(name)
    base = t.alias_of or name
    prod = ctx.s.producer(base)
    if t.dtype is not DType.F32 or prod is None:
        return False
    if prod.kernel.pm1_out:
        return True
    return prod.kernel.pm1_keep and pm1_input(ctx, prod.inputs[0])


def geom_decl(B, C, H, W, K, kh, kw, sh, sw, pt, pl, OH, OW, wc) -> str:
    vals = ", ".join(str(int(v)) for v in (B, C, H, W, K, kh, kw, sh, sw, pt, pl, OH, OW, wc))
    return f"static const bnnc_geom_t g = {{ {vals} }};"


def conv_geom(a: dict) -> str:
    (sh, sw), (pt, pl) = a["strides"], a["pads"][:2]
    return geom_decl(a["batch"], a["cin"], a["h"], a["w"], a["cout"], a["kh"], a["kw"], sh, sw, pt,
                     pl, a["oh"], a["ow"], words64(a["cin"]))


def conv_batch_split(a: dict, args: dict[int, str], unit: int = 1) -> Split:
    """A conv/pool call split over samples (its `&g` geometry gets the part's batch); `args`:
    argument index -> what it points to per sample: "bits" the input as NHWC bits, "in" the
    input's values [C, H, W] (or its gradient), "out" the output's [K, OH, OW]."""
    per = {"bits": a["h"] * a["w"] * words64(a["cin"]), "in": a["cin"] * a["h"] * a["w"],
           "out": a["cout"] * a["oh"] * a["ow"]}
    return Split(a["batch"], unit, tuple((i, per[k]) for i, k in sorted(args.items())), geom=True)


def lcm_unit(*units: int) -> int:
    out = 1
    for u in units:
        out = out * u // math.gcd(out, u)
    return out


def bit_rows_unit(row_bits: int) -> int:
    """Rows of `row_bits` bits each that a thread's range must be a multiple of, so that no 64-bit
    word of a packed output holds bits of two threads' rows."""
    return 64 // math.gcd(row_bits, 64)


def pool_geom(a: dict) -> str:
    (kh, kw), (sh, sw), (pt, pl) = a["kernel"], a["strides"], a["pads"][:2]
    c = a["channels"]
    return geom_decl(a["batch"], c, a["h"], a["w"], c, kh, kw, sh, sw, pt, pl, a["oh"], a["ow"],
                     words64(c))


# stack scratch a fast conv kernel may declare (sign patterns, tables, partial sums) on host and
# Linux targets; bare-metal targets keep the portable loops, which need none
CONV_SCRATCH_BYTES = 160 * 1024


def conv_fwd_plan(a: dict, kind: str) -> dict | None:
    """Scratch sizes of the stride-1 forward kernels (conv_fwd_fast), or None (portable loops).

    kind "bits"/"pm1": XNOR-popcount rows; one sample's packed input ([row][word][column]) and, for
    "pm1" (f32 +-1 input, latent W), sign(W) packed for the largest block of output channels that
    fits; a kernel row's words (kw * wc) must fit the 31 per-byte SWAR sums. "signw"/"f32": direct
    rows over a real input, one sign mask (or weight) per (c, i, j) of an output channel."""
    if tuple(a["strides"]) != (1, 1):
        return None
    c, k, kh, kw, h, w, ow = a["cin"], a["cout"], a["kh"], a["kw"], a["h"], a["w"], a["ow"]
    taps, wc = kh * kw, words64(c)
    if kind in ("signw", "f32"):
        if 4 * (c * taps + 2 * ow) > CONV_SCRATCH_BYTES:
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
    kb = k if kind == "bits" else (CONV_SCRATCH_BYTES - base) // (8 * taps * wc)
    if base > CONV_SCRATCH_BYTES or kb < 1:
        return None
    kb = min(k, kb)
    # the words of every tap written out per column (<= 31: the per-byte counts fold once)
    unroll = taps * wc <= 31
    return dict(xbn=h * wc * w, wbn=kb * taps * wc, kb=kb, ow=ow, unroll=unroll,
                **(dict(kh=kh, kw=kw, wc=wc, w=w, **csa_plan(taps * wc)) if unroll else {}))


def csa_plan(words: int) -> dict:
    """A carry-save adder tree for the popcount of `words` words (u0 .. u{words-1}): while some
    weight has three words a, b, c, replace them by a ^ b ^ c (same weight) and their majority
    (twice the weight). Returns csa = a, b, c, sum, carry of each step in order (new words
    numbered from `words`) and pops = word, weight of each word left to count (popcount = sum of
    weight * pop), as "x"-joined integers: they become part of the kernel's name, and the
    template splits them.

    >>> csa_plan(3)
    {'csa': '0x1x2x3x4', 'pops': '3x1x4x2'}
    >>> csa_plan(2)
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


def conv_dw_direct_plan(a: dict) -> dict | None:
    """Scratch of the real-input dW kernel (conv_dw_direct): all Cin*kh*kw x Cout sums and one
    output row of G transposed; None past CONV_SCRATCH_BYTES or for strides > 1."""
    if tuple(a["strides"]) != (1, 1):
        return None
    accn, gtn = a["cin"] * a["kh"] * a["kw"] * a["cout"], a["ow"] * a["cout"]
    return (dict(accn=accn, gtn=gtn, k=a["cout"]) if 4 * (accn + gtn) <= CONV_SCRATCH_BYTES
            else None)


def conv_dw_plan(a: dict, exact: bool) -> dict | None:
    """Block sizes of the table-lookup dW kernel (conv_dw_fr), or None when it does not apply
    (stride > 1) or does not fit CONV_SCRATCH_BYTES even for 8 input channels at a time.

    Positions go 8 at a time in padded-row order (mode "ox", x from a bit string of the padded
    input per channel, built from one word per input row: rows up to 64 wide) when rows are at
    least 8 wide, else 8 samples at one position (mode "img", x from a byte per 8 samples, pixel
    and channel, built for the whole batch). The largest output-channel
    block (16, 8 or 4: the vector lanes) that fits with all input channels wins; `exact` (integer
    PO2 sums) doubles the sums for the carried high halves."""
    if tuple(a["strides"]) != (1, 1):
        return None
    c, kh, kw, oh, ow, b = a["cin"], a["kh"], a["kw"], a["oh"], a["ow"], a["batch"]
    hp, wp, taps = oh + kh - 1, ow + kw - 1, kh * kw
    mode = "ox" if ow >= 8 and a["w"] <= 64 else "img"
    fw = -(-(hp * wp) // 64) + 1          # words per channel of the padded bit string (+1 to read)
    sums = 2 if exact else 1
    for cb in sorted({c} | {d for d in (256, 128, 64, 32, 16, 8) if d < c}, reverse=True):
        xrn = fw * cb if mode == "ox" else -(-b // 8) * hp * wp * cb
        xr_bytes = 8 * (xrn + fw + cb) if mode == "ox" else xrn
        for kb in (16, 8, 4):
            total = 4 * (sums * (cb * taps + taps) * kb + 256 * kb + 8 * kb) + xr_bytes
            if total <= CONV_SCRATCH_BYTES:
                return dict(mode=mode, cb=cb, kb=kb, kh=kh, kw=kw, taps=taps, hp=hp,
                            accn=cb * taps * kb, xrn=xrn, fw=fw)
    return None



def conv_dx_plan(a: dict) -> dict | None:
    """Block sizes of the table-lookup dX kernel (conv_dx_fr) for this geometry, or None when it
    does not apply (stride > 1) or its scratch would not fit even for 8 channels at a time.

    Lanes are output columns (mode "ox", segments of 8..32 that divide the row) when the row has
    such a divisor, else 4 samples (mode "img"); the channel block is the largest whose sign
    patterns (one byte per 8 output channels per tap) and partial sums fit CONV_SCRATCH_BYTES
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
    cb = min(c, (CONV_SCRATCH_BYTES - table) // (wt_per_c + 4 * acc_per_c))
    if cb < min(c, 8):
        return None
    return dict(mode=mode, seg=seg, np=lanes, ws=ws, w=a["w"], cb=cb, kh=kh, kw=kw,
                wtb=wt_per_c * cb, accn=acc_per_c * cb)


def const_array(name: str, values) -> str:
    vals = ", ".join(c_float(v) for v in values)
    return f"static const float {name}[{len(values)}] = {{ {vals} }};"

