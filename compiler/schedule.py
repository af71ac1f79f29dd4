"""The training schedule: `build_schedule(graph, cfg) -> Schedule`, one training step as calls.

Input: a verified layer IR (`ir.Graph`) and a `TrainConfig`. Output: a `schedule_ir.Schedule` whose
steps run forward, loss (softmax cross-entropy), backward and optimizer updates in one straight
line, over tensors that each carry a dtype, a full shape (batch first) and their exact storage size.
Kernels are entries of `compiler.kernels.KERNELS`; every step is checked against its kernel's
operand dtypes.

Invariants: `Schedule.verify()` holds; the persistent tensors are exactly `state.state_tensors`
(same names, dtypes, shapes); an in-place pair joins tensors of equal element count whose output is
no larger than its input, and never overwrites the caller's batch/labels or state; the same (graph,
cfg) gives an identical schedule (layer order, a fixed order per layer, no set iteration).

Storage (exact `nbytes`):
- F32 4, F16/BF16 2, I32 4, U8 1 bytes per element. PO2 codes are one u8 per element (bit 4 sign,
  bits 0-3 exponent + 8) with an I32 per-tensor bias `<layer>.po2_bias`; they are written in place
  over the gradient they quantize, so packing them tighter would save nothing.
- BIT tensors are packed into little-endian 64-bit words, pad bits 0, in one of three layouts
  (`Tensor.layout` says which):
  * rows: a packed vector activation, one row of `ceil(F/64)` words per sample;
  * NHWC: a packed (C, H, W) activation, `ceil(C/64)` words of channels per pixel of every sample --
    what an XNOR-popcount conv reads per kernel tap. A flatten of it stays a view (same bytes,
    pixel-major bit order); the dense layer reading it packs its weights in that order. C < 64
    wastes the rest of each pixel's word (real BNNs have C >= 64);
  * flat: masks and sign bits (STE masks, l1 BN's s, max-pool argmax, ReLU masks) and binary dW, the
    elements in row-major (NCHW) order, `ceil(n/64)` words per sample (dW: per tensor).
  Packed binary weights (the scratch `<layer>.Wb` of pack_sign_w, Bop's `<layer>.W`) are rows of W^T
  in the input's bit order for dense layers, and (cout, kh, kw) rows of `ceil(Cin/64)` words for
  convs.

Policy (each technique of cfg switches on its own; `standard` has them all off):
- activations are F32, except SIGN outputs under `save_bits` whose consumers all take bits (binary
  dense/conv, or max-pool/flatten chains leading only to them): those are packed, and a binary layer
  reading bits runs the XNOR kernel.
- the activation-gradient dtype is F16 under `bn == "l1"` (l1 BN reads fp16(G) anyway, and in a BNN
  every op between a binary layer's dX and the next BN -- STE mask, pool routing, views -- commutes
  with that rounding), F32 otherwise. BN backward writes dY in place over G and `po2` quantizes dY
  in place into its codes: the entering gradient, dY and Q share one buffer.
- saved for backward: a weight layer keeps its input tensor itself (F32 in standard, the packed bits
  of a binary layer's +-1 input, a binary first layer's real input as given -- never copied); under
  `save_bits` a real layer (or a binary layer with an unpacked input that has a gradient) saves an
  F16 copy `<layer>.x_saved`. l2 BN saves xh and inv_std (F32); l1 BN its sign bits s and psi (F32
  per channel; mu is emitted for checking only). SIGN saves a 1-bit STE mask under `save_bits`, else
  its backward reads the F32 pre-activation; ReLU likewise a 1-bit mask, else its F32 output.
  MAXPOOL: a 1-bit argmax mask of the input under `save_bits` when windows do not overlap, a U8
  in-window index when they do, an I32 in-window index without `save_bits`.
- weight gradients: `binary_dw` gives BIT sign bits of X^T Q; the update kernel decodes them as
  +-1/sqrt(N_W) and applies the |W| <= 1 mask (it reads W anyway; Bop's +-1 weights need no mask).
  An F32 dW of a binary layer is masked by its dW kernel, which then reads W. Real layers: no mask.
- no dX for a layer whose input has nothing trainable upstream (the first weight layer); INPUT_QUANT
  stops gradients (a trainable layer before one is rejected).

Order: forward in layer order (a weight layer may be preceded by `pack_sign_w` and followed by
`cast_f16`), the loss, then the backward in reverse layer order. A weight layer's backward is
[bias_grad], [po2_quantize], dW, [dX], update W, [update b]: dW dies at the update right after its
layer instead of living through the whole backward (only dX needs the pre-update W, and it comes
first). BN parameters are updated right after the BN backward. A tensor read by several layers gets
its gradient contributions as `<consumer>.d_in` and sums them eagerly (`grad_add`, into
`<layer>.d_out_acc<k>` and finally `<layer>.d_out`); identity contributions (ADD, FLATTEN) are
views.

Names beyond compiler/README.md: `<layer>.Wb` (packed sign(W), scratch), `<layer>.x_saved` (F16
saved input), `<consumer>.d_in` and `<layer>.d_out_acc<k>` (gradient partials), `probs` (the
probabilities when the graph has no SOFTMAX, else `<softmax>.out`). The Adam / stochastic-rounding
step counter is a program global, not a tensor.

Differences from the numpy reference (runtime/reference.py) due to storage alone: under `bn == "l1"`
dY is stored F16 before PO2 (the reference quantizes the F32 dY, so a code can differ where |dY| is
within 2^-11 of a rounding threshold), and in mixed real/binary graphs ADD sums, AFFINE and pool
scaling and real layers' dX are stored F16. Binary dW is stored as sign bits: decode it with the
pre-update W before comparing.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from .config import TrainConfig, validate
from .errors import ModelError, UnsupportedModelError
from .ir import INPUT, Graph, Layer, LayerKind, tname
from .kernels import KERNELS, check_step
from .schedule_ir import DType, Role, Schedule, Step, Tensor
from .state import state_tensors

F32, F16, BF16, BIT = DType.F32, DType.F16, DType.BF16, DType.BIT
PO2, U8, I32 = DType.PO2, DType.U8, DType.I32
_ITEMSIZE = {F32: 4, F16: 2, BF16: 2, I32: 4, U8: 1, PO2: 1}
_STATE_DTYPE = {"f32": F32, "bf16": BF16, "f16": F16, "bit": BIT}
_STATE_ROLE = {"param": Role.PARAM, "opt": Role.OPT_STATE, "bn_stat": Role.BN_STAT}
_TRAINABLE = (LayerKind.DENSE, LayerKind.CONV, LayerKind.BATCHNORM)
_WEIGHT = (LayerKind.DENSE, LayerKind.CONV)
_BIT_PASS = (LayerKind.MAXPOOL, LayerKind.FLATTEN)   # pass packed activations through
_MOMENTS = {"adam": ("m", "v"), "sgd": ("m",), "bop": ("m",)}
_MAX_TENSOR_NBYTES = 2**31 - 1    # int32 byte offsets/indices in the generated C


def build_schedule(graph: Graph, cfg: TrainConfig) -> Schedule:
    """Lower one training step of `graph` under `cfg`; raises ModelError/UnsupportedModelError for
    graphs the schedule cannot train (see the module docstring for every decision)."""
    validate(cfg)
    graph.verify()
    sched = _Lowering(graph, cfg).run()
    sched.verify()
    return sched


def schedule_table(schedule: Schedule) -> str:
    """One line per step: index, phase, kernel, layer, inputs -> outputs [in-place pairs]."""
    cfg = schedule.config
    lines = [f"# {schedule.graph_name}: {cfg.algorithm}, batch {cfg.batch}, {cfg.optimizer}; "
             f"{len(schedule.steps)} steps, {len(schedule.tensors)} tensors"]
    for s in schedule.steps:
        line = (f"{s.index:4d}  {s.phase:<8}  {s.kernel:<17}  {s.layer or '-':<10}  "
                f"{', '.join(s.inputs)} -> {', '.join(s.outputs)}")
        if s.inplace:
            line += "  [" + ", ".join(f"{o}<-{i}" for o, i in s.inplace) + "]"
        lines.append(line)
    return "\n".join(lines) + "\n"


def _words64(nbits: int) -> int:
    return -(-nbits // 64)


def _prod(shape) -> int:
    return math.prod(int(d) for d in shape)     # exact: np.prod wraps around past 2^63


def _pair(v) -> tuple[int, int]:
    if isinstance(v, (int, np.integer)):
        return int(v), int(v)
    t = tuple(int(x) for x in v)
    return (t[0], t[0]) if len(t) == 1 else (t[0], t[1])


def _pads(v) -> tuple[int, int, int, int]:
    if isinstance(v, (int, np.integer)):
        return (int(v),) * 4
    t = tuple(int(x) for x in v)
    return t if len(t) == 4 else (t[0], t[1], t[0], t[1])


def _plain(v):
    """numpy scalars/arrays -> Python floats/ints/tuples, so steps compare and print stably."""
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, (tuple, list)):
        return tuple(_plain(x) for x in v)
    a = np.asarray(v)
    if a.dtype.kind in "iub":
        return int(a) if a.ndim == 0 else tuple(int(x) for x in a.ravel())
    if a.dtype.kind == "f":
        return float(a) if a.ndim == 0 else tuple(float(x) for x in a.ravel())
    return v


def _err_where(lay: Layer) -> str:
    onnx_name = repr(lay.onnx_name)[1:-1][:80]    # untrusted: no newline/control chars in messages
    return f"layer '{lay.name}'" + (f" (ONNX node '{onnx_name}')" if onnx_name else "")


class _Lowering:
    """One use: analyse the graph (gradient needs, packed activations, fan-out), then emit the
    forward, the loss and the backward into `tensors`/`steps` (see the module docstring)."""

    def __init__(self, graph: Graph, cfg: TrainConfig):
        self.g, self.cfg, self.B = graph, cfg, cfg.batch
        self.gd = F16 if cfg.bn == "l1" else F32
        self.tensors: dict[str, Tensor] = {}
        self.steps: list[Step] = []
        self.act: dict[str, str] = {INPUT: INPUT}    # layer -> tensor holding its forward output
        self.saved_x: dict[str, str] = {}            # weight layer -> its input as kept for dW
        self.mask: dict[str, str] = {}               # SIGN/RELU/MAXPOOL -> mask or argmax tensor
        self.bn_saved: dict[str, tuple[str, ...]] = {}
        self.count: dict[str, int] = {}              # gradient contributions received so far
        self.partial: dict[str, str] = {}
        self.state = {st.name: st for st in state_tensors(graph, cfg)}
        self._analyse()

    # ---------------------------------------------------------------- graph analysis
    def _analyse(self) -> None:
        g = self.g
        for lay in g.layers:
            if lay.kind is LayerKind.SOFTMAX and lay is not g.output:
                raise UnsupportedModelError(
                    f"{_err_where(lay)}: softmax is only supported as the last layer",
                    hint="the loss fuses the final softmax; remove inner ones")
            self._check_shapes(lay)
        ng = {INPUT: False}
        for lay in g.layers:
            up = any(ng[i] for i in lay.inputs)
            if lay.kind is LayerKind.INPUT_QUANT and up:
                raise UnsupportedModelError(
                    f"{_err_where(lay)}: an input quantizer after trainable layers has no gradient",
                    hint="bnnc quantizes the network input only")
            ng[lay.name] = lay.kind in _TRAINABLE or (lay.kind is not LayerKind.INPUT_QUANT and up)
        self.ng = ng
        out = g.output
        self.logits = out.inputs[0] if out.kind is LayerKind.SOFTMAX else out.name
        if not ng[self.logits]:
            raise ModelError(f"model '{g.name}' has no trainable layer (dense, conv or batch norm) "
                             "before its output; there is nothing to train")
        live = {self.logits}
        for lay in reversed(g.layers):
            if lay.name in live:
                live.update(i for i in lay.inputs if i != INPUT)
        self.has_dout = {lay.name for lay in g.layers if lay.name in live and ng[lay.name]}
        self.expected: dict[str, int] = {self.logits: 1}     # the loss's edge
        for lay in g.layers:
            if lay.name in self.has_dout:
                for i in lay.inputs:
                    if ng[i]:
                        self.expected[i] = self.expected.get(i, 0) + 1

        # which activations are bit-packed: SIGN outputs whose every consumer accepts bits
        consumers: dict[str, list[Layer]] = {}
        for lay in g.layers:
            for i in lay.inputs:
                consumers.setdefault(i, []).append(lay)
        bit_ok: dict[str, bool] = {}
        for lay in reversed(g.layers):
            cs = consumers.get(lay.name, [])
            bit_ok[lay.name] = self.cfg.save_bits and bool(cs) and all(
                (c.kind in _WEIGHT and c.binary) or (c.kind in _BIT_PASS and bit_ok[c.name])
                for c in cs)
        self.packed: dict[str, tuple[int, ...] | None] = {}  # layer -> packed (C,H,W), None = rows
        for lay in g.layers:
            if lay.kind is LayerKind.SIGN and bit_ok[lay.name]:
                self.packed[lay.name] = lay.shape if len(lay.shape) == 3 else None
            elif lay.kind in _BIT_PASS and lay.inputs[0] in self.packed:
                self.packed[lay.name] = (lay.shape if lay.kind is LayerKind.MAXPOOL
                                         else self.packed[lay.inputs[0]])

    def _check_shapes(self, lay: Layer) -> None:
        g, k = self.g, lay.kind
        ins = [g.shape_of(i) for i in lay.inputs]
        bad = None
        if k is LayerKind.DENSE:
            kin, nout = lay.params["W"].shape if lay.params["W"].ndim == 2 else (-1, -1)
            if (kin, (nout,)) != (_prod(ins[0]), lay.shape):
                bad = f"W {list(lay.params['W'].shape)} does not map {ins[0]} to {lay.shape}"
        elif k is LayerKind.CONV:
            w = lay.params["W"].shape
            if len(ins[0]) != 3 or len(w) != 4 or w[1] != ins[0][0]:
                bad = f"W {list(w)} does not fit input {ins[0]}"
            else:
                exp = (w[0],) + self._out_hw(ins[0], w[2:], lay.attrs["strides"], lay.attrs["pads"])
                bad = None if exp == lay.shape else f"output {lay.shape}, expected {exp}"
        elif k in (LayerKind.MAXPOOL, LayerKind.AVGPOOL):
            if len(ins[0]) != 3:
                bad = f"input {ins[0]} is not (C, H, W)"
            else:
                exp = (ins[0][0],) + self._out_hw(ins[0], _pair(lay.attrs["kernel"]),
                                                  lay.attrs["strides"], lay.attrs["pads"])
                bad = None if exp == lay.shape else f"output {lay.shape}, expected {exp}"
            kh, kw = _pair(lay.attrs["kernel"])
            if k is LayerKind.MAXPOOL and kh * kw > 256:
                bad = f"a {kh}x{kw} max-pool window does not fit the u8 argmax index"
        elif k is LayerKind.GLOBAL_AVGPOOL:
            if len(ins[0]) != 3 or _prod(lay.shape) != ins[0][0]:
                bad = f"input {ins[0]} -> {lay.shape} is not a global average pool"
        elif k is LayerKind.ADD:
            if ins[0] != ins[1] or ins[0] != lay.shape:
                bad = f"adds {ins[0]} and {ins[1]} into {lay.shape}"
        elif k is LayerKind.FLATTEN or k is LayerKind.SOFTMAX:
            if _prod(ins[0]) != _prod(lay.shape):
                bad = f"{ins[0]} -> {lay.shape} changes the element count"
        elif k is LayerKind.AFFINE and not {lay.params["scale"].size, lay.params["bias"].size} <= {
                1, lay.shape[0]}:
            sizes = f"{lay.params['scale'].size}/{lay.params['bias'].size}"
            bad = f"scale/bias of {sizes} values for {lay.shape[0]} channels"
        elif k is LayerKind.BATCHNORM:
            if lay.params["beta"].shape != (ins[0][0],) or ins[0] != lay.shape:
                bad = f"{lay.params['beta'].shape[0]} channels for input {ins[0]}"
        elif ins[0] != lay.shape:
            bad = f"input {ins[0]} -> output {lay.shape} for an element-wise layer"
        if k in _WEIGHT and "b" in lay.params and lay.params["b"].shape != lay.shape[:1]:
            bad = f"b {list(lay.params['b'].shape)} for {lay.shape[0]} output channels"
        if bad:
            raise ModelError(f"{_err_where(lay)}: inconsistent shapes: {bad}",
                             hint="the layer IR is inconsistent; re-import the model")

    @staticmethod
    def _out_hw(chw, khw, strides, pads) -> tuple[int, int]:
        (kh, kw), (sh, sw), (t, l, b, r) = _pair(khw), _pair(strides), _pads(pads)
        return (chw[1] + t + b - kh) // sh + 1, (chw[2] + l + r - kw) // sw + 1

    # ---------------------------------------------------------------- tensors and steps
    def _new(self, name: str, dtype: DType, shape, role: Role, *, layout: str = "",
             nbytes: int | None = None) -> str:
        assert name not in self.tensors, f"tensor {name} created twice"
        shape = tuple(int(d) for d in shape)
        if nbytes is None:
            assert dtype is not BIT, name
            nbytes = _prod(shape) * _ITEMSIZE[dtype]
        if nbytes > _MAX_TENSOR_NBYTES:
            raise ModelError(f"model '{self.g.name}': tensor '{name}' of shape {list(shape)} needs "
                             f"{nbytes:,} bytes at batch {self.B}; the generated C indexes a "
                             f"tensor's bytes with 32-bit ints (at most {_MAX_TENSOR_NBYTES:,})",
                             hint="use a smaller batch or a smaller model input")
        self.tensors[name] = Tensor(name, dtype, shape, role, int(nbytes), layout)
        return name

    def _act(self, name: str, dtype: DType, shape, role: Role) -> str:
        """An unpacked activation or activation gradient (batch first)."""
        return self._new(name, dtype, shape, role, layout="NCHW" if len(shape) == 4 else "")

    def _view(self, name: str, base: str, shape) -> str:
        root = self.tensors[base].alias_of or base
        bt = self.tensors[root]
        shape = tuple(int(d) for d in shape)
        assert _prod(shape) == bt.size or bt.dtype is BIT, (name, base)
        layout = f"view of {root}" + (f" ({bt.layout})" if bt.layout else "")
        self.tensors[name] = Tensor(name, bt.dtype, shape, bt.role, bt.nbytes, layout,
                                    alias_of=root)
        return name

    def _bits(self, name: str, shape, role: Role, packed: tuple[int, ...] | None | str) -> str:
        """A BIT activation tensor: packed = (C, H, W) for NHWC, None for rows, "flat" for masks."""
        b = self.B
        if packed == "flat" or packed is None:
            w = _words64(_prod(shape[1:]))
            what = "element i of a sample (row-major NCHW)" if packed == "flat" else "feature i"
            layout = f"bits rows: {b} x {w} words64, {what} -> bit i%64 of word i//64, pad bits 0"
            return self._new(name, BIT, shape, role, layout=layout, nbytes=b * w * 8)
        c, h, w_ = packed
        w = _words64(c)
        layout = (f"bits NHWC: {b * h * w_} pixels x {w} words64, channel c -> bit c%64 of word "
                  f"c//64, pad bits 0")
        return self._new(name, BIT, shape, role, layout=layout, nbytes=b * h * w_ * w * 8)

    def _wbits(self, lay: Layer) -> tuple[int, str]:
        """(nbytes, layout) of `lay`'s weights packed for the XNOR kernel."""
        w = lay.params["W"].shape
        if lay.kind is LayerKind.CONV:
            rows, words = w[0] * w[2] * w[3], _words64(w[1])
            return rows * words * 8, f"bits: {rows} rows (cout, kh, kw) x {words} words64 over cin"
        chw = self.packed.get(lay.inputs[0])
        words = chw[1] * chw[2] * _words64(chw[0]) if chw else _words64(w[0])
        order = "pixel-major NHWC" if chw else "feature"
        return w[1] * words * 8, f"bits W^T: {w[1]} rows x {words} words64 in {order} bit order"

    def _emit(self, kernel: str, layer: str, phase: str, ins, outs, /, **attrs) -> None:
        ins, outs = tuple(ins), tuple(outs)
        spec = KERNELS[kernel]
        assert spec.phase == phase, (kernel, phase)
        check_step(kernel, tuple(self.tensors[t].dtype for t in ins),
                   tuple(self.tensors[t].dtype for t in outs))
        pairs: list[tuple[str, str]] = []
        for oi, ii in spec.inplace:
            if oi >= len(outs) or ii >= len(ins) or outs[oi] == ins[ii]:
                continue
            to, ti = self.tensors[outs[oi]], self.tensors[ins[ii]]
            base = self.tensors[ti.alias_of or ti.name]
            # the caller's batch and labels are not ours to overwrite; state is updated by name
            if base.role.persistent or base.role in (Role.INPUT, Role.LABEL):
                continue
            assert to.size == ti.size and to.nbytes <= ti.nbytes, (kernel, to, ti)
            if (to.name, ti.name) not in pairs:
                pairs.append((to.name, ti.name))
        self.steps.append(Step(len(self.steps), kernel, layer, phase, ins, outs,
                               {k: _plain(v) for k, v in attrs.items()}, tuple(pairs)))

    # ---------------------------------------------------------------- driver
    def run(self) -> Schedule:
        g, b = self.g, self.B
        self._act(INPUT, F32, (b,) + g.input_shape, Role.INPUT)
        self._new("labels", I32, (b,), Role.LABEL)
        for st in self.state.values():
            dt = _STATE_DTYPE[st.dtype]
            if dt is BIT:
                nbytes, layout = self._wbits(g.layer(st.layer))
                self._new(st.name, BIT, st.shape, _STATE_ROLE[st.kind], layout=layout,
                          nbytes=nbytes)
            else:
                self._new(st.name, dt, st.shape, _STATE_ROLE[st.kind])
        for lay in g.layers:
            _FORWARD[lay.kind](self, lay)
        self._loss()
        for lay in reversed(g.layers):
            if lay.name in self.has_dout:
                assert self.count.get(lay.name, 0) == self.expected[lay.name], lay.name
                _BACKWARD[lay.kind](self, lay)
        # forward tensors read by the backward are what the step saves
        saved = {t for s in self.steps if s.phase in ("backward", "update") for t in s.inputs}
        saved |= {self.tensors[t].alias_of for t in saved if self.tensors[t].alias_of}
        tensors = {n: (replace(t, role=Role.SAVED) if t.role is Role.SCRATCH and n in saved else t)
                   for n, t in self.tensors.items()}
        tensors = {n: (replace(t, role=tensors[t.alias_of].role) if t.alias_of else t)
                   for n, t in tensors.items()}
        return Schedule(g.name, self.cfg, tensors, tuple(self.steps))

    def _full(self, name: str) -> tuple[int, ...]:
        return (self.B,) + self.g.shape_of(name)

    def _out_f32(self, lay: Layer) -> str:
        self.act[lay.name] = self._act(tname(lay.name, "out"), F32, self._full(lay.name),
                                       Role.SCRATCH)
        return self.act[lay.name]

    # ---------------------------------------------------------------- forward
    def _geom(self, lay: Layer) -> dict:
        x = self.act[lay.inputs[0]]
        xt = self.tensors[x]
        chw = self.packed.get(lay.inputs[0])
        x_layout = ("bits_nhwc" if chw else "bits_rows") if xt.dtype is BIT else "dense"
        w = lay.params["W"].shape
        geom = dict(batch=self.B, binary=lay.binary, x_layout=x_layout)
        if lay.kind is LayerKind.DENSE:
            geom.update(in_features=w[0], out_features=w[1])
            if chw:
                geom["x_chw"] = chw
        else:
            cin, h, wd = self.g.shape_of(lay.inputs[0])
            geom.update(cin=cin, h=h, w=wd, cout=w[0], kh=w[2], kw=w[3],
                        strides=_pair(lay.attrs["strides"]), pads=_pads(lay.attrs["pads"]),
                        oh=lay.shape[1], ow=lay.shape[2])
        return geom

    def _fwd_weight(self, lay: Layer) -> None:
        x = self.act[lay.inputs[0]]
        xt = self.tensors[x]
        fam = "conv" if lay.kind is LayerKind.CONV else "dense"
        geom = self._geom(lay)
        w = tname(lay.name, "W")
        bias = (tname(lay.name, "b"),) if "b" in lay.params else ()
        y = self._out_f32(lay)
        if xt.dtype is BIT:
            wb = w
            if self.tensors[w].dtype is not BIT:
                nbytes, layout = self._wbits(lay)
                wb = self._new(tname(lay.name, "Wb"), BIT, lay.params["W"].shape, Role.SCRATCH,
                               layout=layout, nbytes=nbytes)
                self._emit("pack_sign_w", lay.name, "forward", (w,), (wb,), **geom)
            self._emit(f"{fam}_fwd_xnor", lay.name, "forward", (x, wb) + bias, (y,), **geom)
        else:
            kind = "signw" if lay.binary else "f32"
            self._emit(f"{fam}_fwd_{kind}", lay.name, "forward", (x, w) + bias, (y,), **geom)
        if lay.name not in self.has_dout:
            return
        as_given = (xt.dtype is BIT or not self.cfg.save_bits
                    or (lay.binary and not self.ng[lay.inputs[0]]))
        if as_given:
            self.saved_x[lay.name] = x
        else:
            xs = self._act(tname(lay.name, "x_saved"), F16, xt.shape, Role.SAVED)
            self._emit("cast_f16", lay.name, "forward", (x,), (xs,))
            self.saved_x[lay.name] = xs

    def _bn_attrs(self, lay: Layer) -> dict:
        shape = self.g.shape_of(lay.inputs[0])
        attrs = dict(batch=self.B, channels=shape[0], spatial=_prod(shape[1:]),
                     momentum=self.cfg.bn_momentum)
        if self.cfg.bn == "l2":
            attrs["eps"] = float(lay.attrs["eps"])
        return attrs

    def _fwd_bn(self, lay: Layer) -> None:
        x = self.act[lay.inputs[0]]
        c = (lay.shape[0],)
        y = self._out_f32(lay)
        n = lay.name
        rm = tname(n, "running_mean")
        train = n in self.has_dout
        if self.cfg.bn == "l2":
            rv = tname(n, "running_var")
            saved = ()
            if train:
                saved = (self._act(tname(n, "xh"), F32, self.tensors[x].shape, Role.SCRATCH),
                         self._new(tname(n, "inv_std"), F32, c, Role.SCRATCH))
            self._emit("bn_l2_fwd", n, "forward", (x, tname(n, "gamma"), tname(n, "beta"), rm, rv),
                       (y, rm, rv) + saved, **self._bn_attrs(lay))
        else:
            rp = tname(n, "running_psi")
            mu = self._new(tname(n, "mu"), F32, c, Role.SCRATCH)
            psi = self._new(tname(n, "psi"), F32, c, Role.SCRATCH)
            s = (self._bits(tname(n, "s"), self.tensors[x].shape, Role.SCRATCH, "flat"),) \
                if train else ()
            self._emit("bn_l1_fwd", n, "forward", (x, tname(n, "beta"), rm, rp),
                       (y, rm, rp, mu, psi) + s, **self._bn_attrs(lay))
            saved = s + (psi,) if train else ()
        self.bn_saved[n] = saved

    def _fwd_sign(self, lay: Layer) -> None:
        x = self.act[lay.inputs[0]]
        full = self._full(lay.name)
        if lay.name in self.packed:
            y = self._bits(tname(lay.name, "out"), full, Role.SCRATCH, self.packed[lay.name])
            self.act[lay.name] = y
            kernel = "sign_fwd_pack"
        else:
            y = self._out_f32(lay)
            kernel = "sign_fwd_f32"
        outs = (y,)
        if lay.name in self.has_dout and self.cfg.save_bits:
            self.mask[lay.name] = self._bits(tname(lay.name, "mask"), full, Role.SCRATCH, "flat")
            outs += (self.mask[lay.name],)
        self._emit(kernel, lay.name, "forward", (x,), outs, batch=self.B, size=_prod(lay.shape))

    def _fwd_relu(self, lay: Layer) -> None:
        x = self.act[lay.inputs[0]]
        outs = (self._out_f32(lay),)
        if lay.name in self.has_dout and self.cfg.save_bits:
            self.mask[lay.name] = self._bits(tname(lay.name, "mask"), self._full(lay.name),
                                             Role.SCRATCH, "flat")
            outs += (self.mask[lay.name],)
        self._emit("relu_fwd", lay.name, "forward", (x,), outs, batch=self.B, size=_prod(lay.shape))

    def _pool_attrs(self, lay: Layer) -> dict:
        c, h, w = self.g.shape_of(lay.inputs[0])
        attrs = dict(batch=self.B, channels=c, h=h, w=w, oh=lay.shape[1], ow=lay.shape[2],
                     kernel=_pair(lay.attrs["kernel"]), strides=_pair(lay.attrs["strides"]),
                     pads=_pads(lay.attrs["pads"]))
        if lay.kind is LayerKind.AVGPOOL:
            attrs["count_include_pad"] = int(bool(lay.attrs.get("count_include_pad", 0)))
        return attrs

    def _fwd_maxpool(self, lay: Layer) -> None:
        x = self.act[lay.inputs[0]]
        attrs = self._pool_attrs(lay)
        (kh, kw), (sh, sw) = attrs["kernel"], attrs["strides"]
        full = self._full(lay.name)
        if lay.name in self.packed:
            y = self._bits(tname(lay.name, "out"), full, Role.SCRATCH, self.packed[lay.name])
            self.act[lay.name] = y
        else:
            y = self._out_f32(lay)
        kernel, outs = "maxpool_fwd_widx", (y,)
        if lay.name in self.has_dout:
            am = tname(lay.name, "argmax")
            if self.cfg.save_bits and kh <= sh and kw <= sw:
                kernel = "maxpool_fwd_mask"
                am = self._bits(am, self.tensors[x].shape, Role.SCRATCH, "flat")
            else:
                am = self._new(am, U8 if self.cfg.save_bits else I32, full, Role.SCRATCH,
                               layout="in-window index, row-major over (kh, kw)")
            self.mask[lay.name] = am
            outs += (am,)
        self._emit(kernel, lay.name, "forward", (x,), outs, **attrs)

    def _fwd_avgpool(self, lay: Layer) -> None:
        x = self.act[lay.inputs[0]]
        self._emit("avgpool_fwd", lay.name, "forward", (x,), (self._out_f32(lay),),
                   **self._pool_attrs(lay))

    def _fwd_gap(self, lay: Layer) -> None:
        c, h, w = self.g.shape_of(lay.inputs[0])
        self._emit("gap_fwd", lay.name, "forward", (self.act[lay.inputs[0]],),
                   (self._out_f32(lay),), batch=self.B, channels=c, spatial=h * w)

    def _fwd_add(self, lay: Layer) -> None:
        ins = tuple(self.act[i] for i in lay.inputs)
        self._emit("add_fwd", lay.name, "forward", ins, (self._out_f32(lay),),
                   batch=self.B, size=_prod(lay.shape))

    def _affine_attrs(self, lay: Layer) -> dict:
        return dict(batch=self.B, channels=lay.shape[0], spatial=_prod(lay.shape[1:]),
                    scale=lay.params["scale"].ravel(), bias=lay.params["bias"].ravel())

    def _fwd_affine(self, lay: Layer) -> None:
        self._emit("affine_fwd", lay.name, "forward", (self.act[lay.inputs[0]],),
                   (self._out_f32(lay),), **self._affine_attrs(lay))

    def _fwd_input_quant(self, lay: Layer) -> None:
        attrs = {k: lay.attrs[k] for k in ("scale", "zero_point", "bits", "signed", "narrow")}
        self._emit("input_quant_fwd", lay.name, "forward", (self.act[lay.inputs[0]],),
                   (self._out_f32(lay),), batch=self.B, size=_prod(lay.shape), **attrs)

    def _fwd_flatten(self, lay: Layer) -> None:
        self.act[lay.name] = self._view(tname(lay.name, "out"), self.act[lay.inputs[0]],
                                        self._full(lay.name))

    def _fwd_softmax(self, lay: Layer) -> None:
        pass    # fused into the loss

    # ---------------------------------------------------------------- loss
    def _loss(self) -> None:
        out = self.g.output
        logits = self.act[self.logits]
        classes = _prod(self.g.shape_of(self.logits))
        probs_name = tname(out.name, "out") if out.kind is LayerKind.SOFTMAX else "probs"
        probs = self._new(probs_name, F32, (self.B, classes), Role.SCRATCH)
        loss = self._new("loss", F32, (1,), Role.SCRATCH)
        d = self._target(self.logits, "loss")
        self._emit("softmax_xent", "", "loss", (logits, "labels"), (loss, probs, d),
                   batch=self.B, classes=classes)
        self._contribute(self.logits, d, "loss")

    # ---------------------------------------------------------------- gradient plumbing
    def _target(self, p: str, consumer: str) -> str:
        """A new tensor for `consumer`'s kernel to write its contribution to p's gradient into."""
        name = tname(p, "d_out") if self.expected[p] == 1 else tname(consumer, "d_in")
        return self._act(name, self.gd, self._full(p), Role.GRAD)

    def _contribute(self, p: str, t: str, consumer: str) -> None:
        """Register `t` as one contribution to p.d_out; sum as soon as two are there."""
        n = self.count[p] = self.count.get(p, 0) + 1
        d_out = tname(p, "d_out")
        if self.expected[p] == 1:
            if t != d_out:
                self._view(d_out, t, self._full(p))     # identity (ADD, FLATTEN): no copy
            return
        if self.tensors[t].shape != self._full(p):
            t = self._view(tname(consumer, "d_in"), t, self._full(p))
        if n == 1:
            self.partial[p] = t
            return
        name = d_out if n == self.expected[p] else tname(p, f"d_out_acc{n}")
        acc = self._act(name, self.gd, self._full(p), Role.GRAD)
        self._emit("grad_add", p, "backward", (self.partial[p], t), (acc,), batch=self.B,
                   size=_prod(self.g.shape_of(p)))
        self.partial[p] = acc

    # ---------------------------------------------------------------- backward
    def _bwd_weight(self, lay: Layer) -> None:
        n, cfg = lay.name, self.cfg
        fam = "conv" if lay.kind is LayerKind.CONV else "dense"
        geom = self._geom(lay)
        dy, x, w = tname(n, "d_out"), self.saved_x[n], tname(n, "W")
        wt = self.tensors[w]
        if "b" in lay.params:
            db = self._new(tname(n, "db"), F32, lay.params["b"].shape, Role.GRAD)
            self._emit("bias_grad", n, "backward", (dy,), (db,), **geom)
        grad: tuple[str, ...] = (dy,)
        if lay.binary and cfg.po2:
            q = self._new(tname(n, "d_out_q"), PO2, self.tensors[dy].shape, Role.GRAD,
                          layout=f"u8 codes: bit 4 sign (1 = negative), bits 0-3 e+8; value "
                                 f"+-2^(e - bias), bias in {tname(n, 'po2_bias')}")
            bias = self._new(tname(n, "po2_bias"), I32, (1,), Role.GRAD)
            self._emit("po2_quantize", n, "backward", (dy,), (q, bias), batch=self.B,
                       size=_prod(lay.shape), po2_bias=cfg.po2_bias,
                       zero_to_min=cfg.po2_zero_to_min)
            grad = (q, bias)
        mask_w = (w,) if lay.binary and wt.dtype is not BIT else ()
        nw = _prod(lay.params["W"].shape)
        if lay.binary and cfg.binary_dw:
            words = _words64(nw)
            value = f"+-{float(np.float32(1 / math.sqrt(nw))):.9g}"
            value += " * 1[|W| <= 1]" if mask_w else ""
            dw = self._new(tname(n, "dW"), BIT, lay.params["W"].shape, Role.GRAD,
                           layout=f"bits flat: {words} words64, element i of W (row-major) -> bit "
                                  f"i%64 of word i//64 (1 = +); value {value}", nbytes=words * 8)
            self._emit(f"{fam}_dw_bin", n, "backward", (x, grad[0]), (dw,), **geom)
        else:
            dw = self._new(tname(n, "dW"), F32, lay.params["W"].shape, Role.GRAD)
            kind = "po2" if len(grad) == 2 else "f32"
            self._emit(f"{fam}_dw_{kind}", n, "backward", (x,) + grad + mask_w, (dw,), **geom)
        p = lay.inputs[0]
        if self.ng[p]:
            t = self._target(p, n)
            kind = "po2" if len(grad) == 2 else "f32"
            self._emit(f"{fam}_dx_{kind}", n, "backward", grad + (w,), (t,), **geom)
            self._contribute(p, t, n)
        self._update(lay, "W", dw)
        if "b" in lay.params:
            self._update(lay, "b", db)

    def _bwd_bn(self, lay: Layer) -> None:
        n, p = lay.name, lay.inputs[0]
        d = tname(n, "d_out")
        shape = lay.params["beta"].shape
        dbeta = self._new(tname(n, "dbeta"), F32, shape, Role.GRAD)
        t = (self._target(p, n),) if self.ng[p] else ()
        if self.cfg.bn == "l2":
            dgamma = self._new(tname(n, "dgamma"), F32, shape, Role.GRAD)
            self._emit("bn_l2_bwd", n, "backward", (d,) + self.bn_saved[n] + (tname(n, "gamma"),),
                       (dgamma, dbeta) + t, **self._bn_attrs(lay))
        else:
            self._emit("bn_l1_bwd", n, "backward", (d,) + self.bn_saved[n], (dbeta,) + t,
                       **self._bn_attrs(lay))
        if t:
            self._contribute(p, t[0], n)
        if self.cfg.bn == "l2":
            self._update(lay, "gamma", dgamma)
        self._update(lay, "beta", dbeta)

    def _bwd_unary(self, lay: Layer, kernel: str, extra: tuple[str, ...], /, **attrs) -> None:
        p = lay.inputs[0]
        t = self._target(p, lay.name)
        self._emit(kernel, lay.name, "backward", (tname(lay.name, "d_out"),) + extra, (t,), **attrs)
        self._contribute(p, t, lay.name)

    def _bwd_sign(self, lay: Layer) -> None:
        size = dict(batch=self.B, size=_prod(lay.shape))
        if lay.name in self.mask:
            self._bwd_unary(lay, "sign_bwd_mask", (self.mask[lay.name],), **size)
        else:
            self._bwd_unary(lay, "sign_bwd_ste", (self.act[lay.inputs[0]],), **size)

    def _bwd_relu(self, lay: Layer) -> None:
        size = dict(batch=self.B, size=_prod(lay.shape))
        if lay.name in self.mask:
            self._bwd_unary(lay, "relu_bwd_mask", (self.mask[lay.name],), **size)
        else:
            self._bwd_unary(lay, "relu_bwd_out", (self.act[lay.name],), **size)

    def _bwd_maxpool(self, lay: Layer) -> None:
        am = self.mask[lay.name]
        kernel = "maxpool_bwd_mask" if self.tensors[am].dtype is BIT else "maxpool_bwd_widx"
        self._bwd_unary(lay, kernel, (am,), **self._pool_attrs(lay))

    def _bwd_avgpool(self, lay: Layer) -> None:
        self._bwd_unary(lay, "avgpool_bwd", (), **self._pool_attrs(lay))

    def _bwd_gap(self, lay: Layer) -> None:
        c, h, w = self.g.shape_of(lay.inputs[0])
        self._bwd_unary(lay, "gap_bwd", (), batch=self.B, channels=c, spatial=h * w)

    def _bwd_affine(self, lay: Layer) -> None:
        self._bwd_unary(lay, "affine_bwd", (), **self._affine_attrs(lay))

    def _bwd_identity(self, lay: Layer) -> None:
        """ADD and FLATTEN pass d_out through unchanged (as a view) to every input that needs it."""
        for p in lay.inputs:
            if self.ng[p]:
                self._contribute(p, tname(lay.name, "d_out"), lay.name)

    # ---------------------------------------------------------------- optimizer
    def _update(self, lay: Layer, fieldname: str, grad: str) -> None:
        cfg = self.cfg
        st = self.state[tname(lay.name, fieldname)]
        moms = tuple(f"{st.name}.{m}" for m in _MOMENTS[st.optimizer])
        attrs: dict = dict(size=_prod(st.shape), tensor_id=st.tensor_id, seed=cfg.seed,
                           stochastic=st.stochastic,
                           moment_ids=tuple(self.state[m].tensor_id for m in moms))
        if self.tensors[grad].dtype is BIT:
            attrs.update(g_scale=float(np.float32(1 / math.sqrt(_prod(st.shape)))),
                         ste_mask=st.dtype != "bit")
        if st.optimizer == "adam":
            attrs.update(lr=cfg.lr, beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.adam_eps)
        elif st.optimizer == "sgd":
            attrs.update(lr=cfg.lr, momentum=cfg.sgd_momentum)
        else:
            attrs.update(gamma=cfg.bop_gamma, threshold=cfg.bop_threshold)
        self._emit(f"{st.optimizer}_update", lay.name, "update", (st.name, grad) + moms,
                   (st.name,) + moms, **attrs)


_FORWARD = {
    LayerKind.DENSE: _Lowering._fwd_weight, LayerKind.CONV: _Lowering._fwd_weight,
    LayerKind.BATCHNORM: _Lowering._fwd_bn, LayerKind.SIGN: _Lowering._fwd_sign,
    LayerKind.RELU: _Lowering._fwd_relu, LayerKind.MAXPOOL: _Lowering._fwd_maxpool,
    LayerKind.AVGPOOL: _Lowering._fwd_avgpool, LayerKind.GLOBAL_AVGPOOL: _Lowering._fwd_gap,
    LayerKind.FLATTEN: _Lowering._fwd_flatten, LayerKind.ADD: _Lowering._fwd_add,
    LayerKind.AFFINE: _Lowering._fwd_affine, LayerKind.INPUT_QUANT: _Lowering._fwd_input_quant,
    LayerKind.SOFTMAX: _Lowering._fwd_softmax,
}
_BACKWARD = {
    LayerKind.DENSE: _Lowering._bwd_weight, LayerKind.CONV: _Lowering._bwd_weight,
    LayerKind.BATCHNORM: _Lowering._bwd_bn, LayerKind.SIGN: _Lowering._bwd_sign,
    LayerKind.RELU: _Lowering._bwd_relu, LayerKind.MAXPOOL: _Lowering._bwd_maxpool,
    LayerKind.AVGPOOL: _Lowering._bwd_avgpool, LayerKind.GLOBAL_AVGPOOL: _Lowering._bwd_gap,
    LayerKind.FLATTEN: _Lowering._bwd_identity, LayerKind.ADD: _Lowering._bwd_identity,
    LayerKind.AFFINE: _Lowering._bwd_affine,
    # INPUT_QUANT never has a gradient (rejected in _analyse); SOFTMAX is the loss
}
assert set(_FORWARD) == set(LayerKind)
