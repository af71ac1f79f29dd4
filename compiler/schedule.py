"""The training schedule: `build_schedule(graph, cfg) -> Schedule`, one training step as calls.

Input: a verified layer IR (`ir.Graph`) and a `TrainConfig`. Output: a `schedule_ir.Schedule` whose
steps run forward, loss (softmax cross-entropy), backward and optimizer updates in one straight
line, over tensors that each carry a dtype, a full shape (batch first) and their exact storage size.
Kernels are entries of the op registry (`compiler.ops.KERNELS`); every step is checked against its
kernel's operand dtypes. The per-kind rules live with their op family (`compiler/ops/<family>.py`,
`rule(builder, layer)`, collected in `ops.SCHEDULE_FORWARD` / `ops.SCHEDULE_BACKWARD`); this module
keeps the builder they call (tensors, steps, gradient plumbing, the optimizer update), the graph
analysis and the loss.

Invariants: `Schedule.verify()` holds; the persistent tensors are exactly `state.state_tensors`
(same names, dtypes, shapes); an in-place pair joins tensors of equal element count whose output is
no larger than its input, and never overwrites the labels or state (the batch input only as the
arena's copy of it: liveness keeps the caller's buffers under io="caller"); the same (graph,
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
- the activation-gradient dtype is F16 under `bn == "l1"` (`config.grads_f16`: l1 BN reads fp16(G)
  anyway, and in a BNN every op between a binary layer's dX and the next BN -- STE mask, pool
  routing, views -- commutes with that rounding), F32 otherwise. BN backward writes dY in place
  over G and `po2` quantizes dY into its codes: the entering gradient and dY share one buffer, the
  codes (1 byte per element) get their own, so the f16 dY dies at the quantization instead of
  living on under the codes through the layer's dW and dX (issue 18). On that F16 path the loss
  writes G scaled by 2^s (`config.grad_scale_log2`) and every
  update of a real-valued parameter multiplies its gradient by 2^-s (`g_scale`), so conv layers'
  tiny per-element gradients stay out of f16's subnormals (compiler/README.md, "Loss scale").
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
- partial training (`cfg.frozen`, compiler/README.md): "trainable upstream" is `ops.needs_grad(
  graph, cfg)`, so the backward stops at the first layer that trains; a frozen parameter is a
  `Role.FROZEN` state tensor (a binary W as packed bits, read by the XNOR kernels directly) with
  no gradient, no update and no saved input for it; a frozen BN still passes a gradient through
  (its fused backward writes the C-element dbeta, which nothing reads). A frozen BN with nothing
  trainable upstream (`ops.eval_mode_bns`: no gradient through it) runs in inference mode
  (`bn_l2_eval` / `bn_l1_eval`): running statistics, which are then FROZEN state too; no batch
  statistics, no saved tensors, no backward. A frozen BN downstream of a trainable layer keeps
  batch statistics and updates its running statistics.

Order: forward in layer order (a weight layer may be preceded by `pack_sign_w` and followed by
`cast_f16`), the loss, then the backward in reverse layer order. A weight layer's backward is
[bias_grad], [po2_quantize], dW, [dX], update W, [update b]: dW dies at the update right after its
layer instead of living through the whole backward (only dX needs the pre-update W, and it comes
first). BN parameters are updated right after the BN backward. A tensor read by several layers gets
its gradient contributions as `<consumer>.d_in` and sums them eagerly (`grad_add`, into
`<layer>.d_out_acc<k>` and finally `<layer>.d_out`); identity contributions (ADD, FLATTEN) are
views.

Fusions (issue 18; compiler/README.md): the MAXPOOL rule takes its conv's step into one
`conv_pool_fwd` (`take_producer`); once the whole step is built, `ops.conv_bn_sign.fuse_conv_bn_sign`
replaces each conv -> l1 BN -> packed sign triple whose f32 outputs nothing else reads by one
`conv_bn_sign_fwd` (`replace_steps`), so "nothing else reads" is checked on the backward too.

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

from .config import TrainConfig, grad_scale_log2, grads_f16, validate
from .errors import ModelError, UnsupportedModelError
from .ir import INPUT, Graph, Layer, tname
from .lower import words64
from .ops import (KERNELS, LAYERS, SCHEDULE_BACKWARD, SCHEDULE_FORWARD, check_graph, check_step,
                  eval_mode_bns, needs_grad)
from .ops.base import Bits, KernelSpec, Phase, prod
from .ops.conv_bn_sign import fuse_conv_bn_sign
from .ops.loss import SOFTMAX_XENT
from .ops.optim import UPDATE_KERNELS
from .ops.weights import PO2_QUANTIZE
from .ops.structural import GRAD_ADD
from .schedule_ir import DType, Role, Schedule, Step, Tensor
from .state import MOMENTS, state_tensors

F32, F16, BF16, BIT = DType.F32, DType.F16, DType.BF16, DType.BIT
PO2, U8, I32 = DType.PO2, DType.U8, DType.I32
_ITEMSIZE = {F32: 4, F16: 2, BF16: 2, I32: 4, U8: 1, PO2: 1}
_STATE_DTYPE = {"f32": F32, "bf16": BF16, "f16": F16, "bit": BIT}
_STATE_ROLE = {"param": Role.PARAM, "opt": Role.OPT_STATE, "bn_stat": Role.BN_STAT,
               "frozen": Role.FROZEN}


def build_schedule(graph: Graph, cfg: TrainConfig) -> Schedule:
    """Lower one training step of `graph` under `cfg`; raises ModelError/UnsupportedModelError for
    graphs the schedule cannot train (see the module docstring for every decision)."""
    validate(cfg)
    check_graph(graph)
    sched = ScheduleBuilder(graph, cfg).run()
    sched.verify()
    return sched


def schedule_table(schedule: Schedule) -> str:
    """One line per step: index, phase, kernel, layer, inputs -> outputs [in-place pairs]."""
    cfg = schedule.config
    lines = [f"# {schedule.graph_name}: {cfg.algorithm}, batch {cfg.batch}, {cfg.optimizer}; "
             f"{len(schedule.steps)} steps, {len(schedule.tensors)} tensors"]
    for s in schedule.steps:
        line = (f"{s.index:4d}  {s.phase.value:<8}  {s.kernel.name:<17}  {s.layer or '-':<10}  "
                f"{', '.join(s.inputs)} -> {', '.join(s.outputs)}")
        if s.inplace:
            line += "  [" + ", ".join(f"{o}<-{i}" for o, i in s.inplace) + "]"
        lines.append(line)
    return "\n".join(lines) + "\n"


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


class ScheduleBuilder:
    """One use: analyse the graph (gradient needs, packed activations, fan-out), then emit the
    forward, the loss and the backward into `tensors`/`steps` (see the module docstring).

    The per-kind rules (`compiler.ops.SCHEDULE_FORWARD` / `SCHEDULE_BACKWARD`, `rule(builder,
    layer)`) call the public methods here: `new`/`new_act`/`view`/`bits` create tensors, `emit`
    appends a kernel call, `target`/`contribute` route a gradient contribution to a layer's input,
    `update` schedules the optimizer step of one parameter."""

    def __init__(self, graph: Graph, cfg: TrainConfig):
        self.g, self.cfg, self.B = graph, cfg, cfg.batch
        self.gd = F16 if grads_f16(cfg) else F32
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
            if LAYERS[lay.kind].loss and lay is not g.output:
                raise UnsupportedModelError(
                    f"{_err_where(lay)}: {lay.kind.value} is only supported as the last layer",
                    hint=f"the loss fuses the final {lay.kind.value}; remove inner ones")
            self._check_shapes(lay)
        self.ng = ng = needs_grad(g, self.cfg)
        self.eval_bns = eval_mode_bns(g, self.cfg)     # BNs in inference mode (partial training)
        for lay in g.layers:
            if LAYERS[lay.kind].stops_gradient and any(ng[i] for i in lay.inputs):
                raise UnsupportedModelError(
                    f"{_err_where(lay)}: an input quantizer after trainable layers has no gradient",
                    hint="bnnc quantizes the network input only")
        out = g.output
        self.logits = out.inputs[0] if LAYERS[out.kind].loss else out.name
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

        # which activations are bit-packed: sign outputs whose every consumer accepts bits
        consumers: dict[str, list[Layer]] = {}
        for lay in g.layers:
            for i in lay.inputs:
                consumers.setdefault(i, []).append(lay)
        bit_ok: dict[str, bool] = {}
        for lay in reversed(g.layers):
            cs = consumers.get(lay.name, [])
            bit_ok[lay.name] = self.cfg.save_bits and bool(cs) and all(
                (LAYERS[c.kind].bits is Bits.READ and c.binary)
                or (LAYERS[c.kind].bits in (Bits.PASS, Bits.VIEW) and bit_ok[c.name]) for c in cs)
        self.packed: dict[str, tuple[int, ...] | None] = {}  # layer -> packed (C,H,W), None = rows
        for lay in g.layers:
            bits = LAYERS[lay.kind].bits
            if bits is Bits.MAKE and bit_ok[lay.name]:
                self.packed[lay.name] = lay.shape if len(lay.shape) == 3 else None
            elif bits in (Bits.PASS, Bits.VIEW) and lay.inputs[0] in self.packed:
                self.packed[lay.name] = (lay.shape if bits is Bits.PASS
                                         else self.packed[lay.inputs[0]])

    def _check_shapes(self, lay: Layer) -> None:
        check = LAYERS[lay.kind].check_shapes
        bad = check(lay, [self.g.shape_of(i) for i in lay.inputs]) if check else None
        if bad:
            raise ModelError(f"{_err_where(lay)}: inconsistent shapes: {bad}",
                             hint="the layer IR is inconsistent; re-import the model")

    # ---------------------------------------------------------------- tensors and steps
    def new(self, name: str, dtype: DType, shape, role: Role, *, layout: str = "",
            nbytes: int | None = None) -> str:
        assert name not in self.tensors, f"tensor {name} created twice"
        shape = tuple(int(d) for d in shape)
        if nbytes is None:
            assert dtype is not BIT, name
            nbytes = prod(shape) * _ITEMSIZE[dtype]
        self.tensors[name] = Tensor(name, dtype, shape, role, int(nbytes), layout)
        return name

    def new_act(self, name: str, dtype: DType, shape, role: Role) -> str:
        """An unpacked activation or activation gradient (batch first)."""
        return self.new(name, dtype, shape, role, layout="NCHW" if len(shape) == 4 else "")

    def view(self, name: str, base: str, shape) -> str:
        root = self.tensors[base].alias_of or base
        bt = self.tensors[root]
        shape = tuple(int(d) for d in shape)
        assert prod(shape) == bt.size or bt.dtype is BIT, (name, base)
        layout = f"view of {root}" + (f" ({bt.layout})" if bt.layout else "")
        self.tensors[name] = Tensor(name, bt.dtype, shape, bt.role, bt.nbytes, layout,
                                    alias_of=root)
        return name

    def bits(self, name: str, shape, role: Role, packed: tuple[int, ...] | None | str) -> str:
        """A BIT activation tensor: packed = (C, H, W) for NHWC, None for rows, "flat" for masks."""
        b = self.B
        if packed == "flat" or packed is None:
            w = words64(prod(shape[1:]))
            what = "element i of a sample (row-major NCHW)" if packed == "flat" else "feature i"
            layout = f"bits rows: {b} x {w} words64, {what} -> bit i%64 of word i//64, pad bits 0"
            return self.new(name, BIT, shape, role, layout=layout, nbytes=b * w * 8)
        c, h, w_ = packed
        w = words64(c)
        layout = (f"bits NHWC: {b * h * w_} pixels x {w} words64, channel c -> bit c%64 of word "
                  f"c//64, pad bits 0")
        return self.new(name, BIT, shape, role, layout=layout, nbytes=b * h * w_ * w * 8)

    def emit(self, kernel: KernelSpec, layer: str, ins, outs, /, **attrs) -> None:
        """Append a call of `kernel` (checked against its operand dtypes); its declared in-place
        pairs become the step's, except over the labels and state."""
        ins, outs = tuple(ins), tuple(outs)
        assert KERNELS.get(kernel.name) is kernel, f"{kernel.name} is not a registered kernel"
        check_step(kernel, tuple(self.tensors[t].dtype for t in ins),
                   tuple(self.tensors[t].dtype for t in outs))
        pairs: list[tuple[str, str]] = []
        for oi, ii in kernel.inplace:
            if oi >= len(outs) or ii >= len(ins) or outs[oi] == ins[ii]:
                continue
            to, ti = self.tensors[outs[oi]], self.tensors[ins[ii]]
            base = self.tensors[ti.alias_of or ti.name]
            # state is updated by name. The batch input may be overwritten where it dies: under
            # io="arena" it is the entry's copy (an input scaling then needs no second batch-
            # sized buffer), under io="caller" liveness never joins the caller's buffers
            if base.role.persistent or base.role is Role.LABEL:
                continue
            assert to.size == ti.size and to.nbytes <= ti.nbytes, (kernel.name, to, ti)
            if (to.name, ti.name) not in pairs:
                pairs.append((to.name, ti.name))
        self.steps.append(Step(len(self.steps), kernel, layer, ins, outs,
                               {k: _plain(v) for k, v in attrs.items()}, tuple(pairs)))

    def take_producer(self, name: str, kernels) -> Step | None:
        """Remove and return the step (one of `kernels`) that wrote tensor `name`, when no later
        step reads or writes it (later steps are renumbered), so that a fused kernel can compute
        it in its place; None when there is no such step. The tensor is dropped."""
        i = next((k for k in range(len(self.steps) - 1, -1, -1)
                  if name in self.steps[k].outputs), None)
        if i is None or self.steps[i].kernel not in kernels or self.steps[i].outputs != (name,) \
                or any(name in s.inputs or name in s.outputs for s in self.steps[i + 1:]):
            return None
        step = self.steps.pop(i)
        self.steps[i:] = [replace(s, index=k) for k, s in enumerate(self.steps[i:], i)]
        del self.tensors[name]
        return step

    def replace_steps(self, start: int, stop: int, kernel: KernelSpec, layer: str, ins, outs,
                      drop: tuple[str, ...], /, **attrs) -> None:
        """Replace steps [start, stop) by one call of `kernel` (a fusion, checked like `emit`);
        later steps are renumbered and the tensors `drop` (which only the replaced steps used)
        are removed."""
        tail = self.steps[stop:]
        del self.steps[start:]
        self.emit(kernel, layer, ins, outs, **attrs)
        self.steps += [replace(s, index=k) for k, s in enumerate(tail, start + 1)]
        for t in drop:
            assert not any(t in s.inputs or t in s.outputs for s in self.steps), t
            del self.tensors[t]

    # ---------------------------------------------------------------- driver
    def run(self) -> Schedule:
        g, b = self.g, self.B
        self.new_act(INPUT, U8 if self.cfg.input == "u8" else F32, (b,) + g.input_shape,
                     Role.INPUT)
        self.new("labels", I32, (b,), Role.LABEL)
        for st in self.state.values():
            dt = _STATE_DTYPE[st.dtype]
            if dt is BIT:
                lay = g.layer(st.layer)
                nbytes, layout = LAYERS[lay.kind].packed_weights(self, lay)
                self.new(st.name, BIT, st.shape, _STATE_ROLE[st.kind], layout=layout,
                         nbytes=nbytes)
            else:
                self.new(st.name, dt, st.shape, _STATE_ROLE[st.kind])
        for lay in g.layers:
            SCHEDULE_FORWARD[lay.kind](self, lay)
        self._loss()
        for lay in reversed(g.layers):
            if lay.name in self.has_dout:
                assert self.count.get(lay.name, 0) == self.expected[lay.name], lay.name
                SCHEDULE_BACKWARD[lay.kind](self, lay)
        fuse_conv_bn_sign(self)
        # PO2 codes out of place: the f16 dY dies at its quantization instead of living on
        # under the codes (1 byte per element) through the layer's dW and dX (issue 18)
        self.steps = [replace(s, inplace=()) if s.kernel is PO2_QUANTIZE else s
                      for s in self.steps]
        # forward tensors read by the backward are what the step saves
        saved = {t for s in self.steps if s.phase in (Phase.BACKWARD, Phase.UPDATE)
                 for t in s.inputs}
        saved |= {self.tensors[t].alias_of for t in saved if self.tensors[t].alias_of}
        tensors = {n: (replace(t, role=Role.SAVED) if t.role is Role.SCRATCH and n in saved else t)
                   for n, t in self.tensors.items()}
        tensors = {n: (replace(t, role=tensors[t.alias_of].role) if t.alias_of else t)
                   for n, t in tensors.items()}
        return Schedule(g.name, self.cfg, tensors, tuple(self.steps))

    def full(self, name: str) -> tuple[int, ...]:
        """The full (batch-first) shape of layer `name`'s output."""
        return (self.B,) + self.g.shape_of(name)

    def out_f32(self, lay: Layer) -> str:
        """`lay`'s forward output as an f32 tensor `<layer>.out`."""
        self.act[lay.name] = self.new_act(tname(lay.name, "out"), F32, self.full(lay.name),
                                          Role.SCRATCH)
        return self.act[lay.name]

    # ---------------------------------------------------------------- loss
    def _loss(self) -> None:
        out = self.g.output
        logits = self.act[self.logits]
        classes = prod(self.g.shape_of(self.logits))
        probs_name = tname(out.name, "out") if LAYERS[out.kind].loss else "probs"
        probs = self.new(probs_name, F32, (self.B, classes), Role.SCRATCH)
        loss = self.new("loss", F32, (1,), Role.SCRATCH)
        d = self.target(self.logits, "loss")
        self.emit(SOFTMAX_XENT, "", (logits, "labels"), (loss, probs, d),
                  batch=self.B, classes=classes, scale=2.0 ** grad_scale_log2(self.cfg))
        self.contribute(self.logits, d, "loss")

    # ---------------------------------------------------------------- gradient plumbing
    def target(self, p: str, consumer: str) -> str:
        """A new tensor for `consumer`'s kernel to write its contribution to p's gradient into."""
        name = tname(p, "d_out") if self.expected[p] == 1 else tname(consumer, "d_in")
        return self.new_act(name, self.gd, self.full(p), Role.GRAD)

    def contribute(self, p: str, t: str, consumer: str) -> None:
        """Register `t` as one contribution to p.d_out; sum as soon as two are there."""
        n = self.count[p] = self.count.get(p, 0) + 1
        d_out = tname(p, "d_out")
        if self.expected[p] == 1:
            if t != d_out:
                self.view(d_out, t, self.full(p))     # identity (ADD, FLATTEN): no copy
            return
        if self.tensors[t].shape != self.full(p):
            t = self.view(tname(consumer, "d_in"), t, self.full(p))
        if n == 1:
            self.partial[p] = t
            return
        name = d_out if n == self.expected[p] else tname(p, f"d_out_acc{n}")
        acc = self.new_act(name, self.gd, self.full(p), Role.GRAD)
        self.emit(GRAD_ADD, p, (self.partial[p], t), (acc,), batch=self.B,
                  size=prod(self.g.shape_of(p)))
        self.partial[p] = acc

    def unary_backward(self, lay: Layer, kernel: KernelSpec, extra: tuple[str, ...], /,
                       **attrs) -> None:
        """d_in of a one-input layer by one kernel call reading d_out (+ `extra` saved tensors)."""
        p = lay.inputs[0]
        t = self.target(p, lay.name)
        self.emit(kernel, lay.name, (tname(lay.name, "d_out"),) + extra, (t,), **attrs)
        self.contribute(p, t, lay.name)

    def identity_backward(self, lay: Layer) -> None:
        """Pass d_out through unchanged (as a view) to every input that needs it (ADD, FLATTEN)."""
        for p in lay.inputs:
            if self.ng[p]:
                self.contribute(p, tname(lay.name, "d_out"), lay.name)

    # ---------------------------------------------------------------- optimizer
    def trains(self, lay: Layer, fieldname: str) -> bool:
        """Does the optimizer update `<lay>.<fieldname>` (it is in the state and not frozen)?"""
        st = self.state.get(tname(lay.name, fieldname))
        return st is not None and st.kind == "param"

    def update(self, lay: Layer, fieldname: str, grad: str, shift: tuple[str, ...] = ()) -> None:
        """The optimizer step of parameter `<lay>.<fieldname>` from its gradient `grad` (none for a
        frozen parameter). `shift` = (the layer's saved input, the running mean it shifts): Bop's
        flip-compensated running mean (`ops.weights.bop_shift_bn`)."""
        cfg = self.cfg
        st = self.state[tname(lay.name, fieldname)]
        if st.kind != "param":
            return
        moms = tuple(f"{st.name}.{m}" for m in MOMENTS[st.optimizer])
        attrs: dict = dict(size=prod(st.shape), tensor_id=st.tensor_id, seed=cfg.seed,
                           stochastic=st.stochastic,
                           moment_ids=tuple(self.state[m].tensor_id for m in moms))
        if self.tensors[grad].dtype is BIT:
            if st.optimizer != "bop":                   # Bop reads the signs only
                attrs.update(g_scale=float(np.float32(1 / math.sqrt(prod(st.shape)))),
                             ste_mask=st.dtype != "bit")
        elif st.optimizer != "bop":     # Bop's g / mean|g| is scale-free
            attrs.update(g_scale=2.0 ** -grad_scale_log2(cfg))     # undo the loss scale
        if st.optimizer == "adam":
            attrs.update(lr=cfg.lr, lr_schedule=cfg.lr_schedule, beta1=cfg.beta1,
                         beta2=cfg.beta2, eps=cfg.adam_eps)
        elif st.optimizer == "sgd":
            attrs.update(lr=cfg.lr, lr_schedule=cfg.lr_schedule, momentum=cfg.sgd_momentum)
        else:
            attrs.update(gamma=cfg.bop_gamma, threshold=cfg.bop_threshold)
        if shift:
            assert st.optimizer == "bop", st.name
            attrs.update(batch=self.B)
        self.emit(UPDATE_KERNELS[st.optimizer], lay.name, (st.name, grad) + moms + shift,
                  (st.name,) + moms + shift[1:], **attrs)
