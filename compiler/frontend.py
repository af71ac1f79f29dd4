"""The frontend: an ONNX / QONNX file -> the layer IR (`ir.Graph`), with latent float parameters.

`load_model(path_or_modelproto, *, name=None) -> ir.Graph`.

Invariants of the result: `ops.check_graph` holds; layer names are bnnc's (`fc1`, `conv1`, `bn1`,
`sign1`, `pool1`, `avgpool1`, `gap1`, `flatten1`, `add1`, `affine1`, `quant1`, `relu1`, `softmax1`:
one counter per kind, in graph order, no gaps); the ONNX node name is kept in `Layer.onnx_name`
only; every parameter is a private float32 copy (exporters de-duplicate equal initializers, so one
initializer may feed several unrelated layers: that must not tie their parameters); shapes are per
sample and NCHW; the batch size is never read from the file.

Algorithm. The nodes the single graph output depends on are sorted topologically (ties by file
position) and interpreted once, in order, over abstract values (`compiler/onnx_values.py`): a
constant (folded with numpy, `compiler/onnx_fold.py`, so constant subgraphs of any exporter
collapse; `Shape` of an activation folds with a batch placeholder); a binarized weight (latent
array + scale, from a binarizer applied to a constant); an activation (a layer output that may
carry a *pending* per-channel affine `x*s + t` composed from constant Mul/Add/Sub/Div/Neg); and two
markers for the STE idioms (`x >= 0`, `B(x) - x`). Each op type's handler lives with its op family
(`compiler/ops/<family>.py`, ONNX import section; `ops.ONNX_HANDLERS`); this module keeps the
dispatch and what every handler shares. Layers appear when a value is consumed:
- Binarizers (every idiom: compiler/ops/activation.py, ONNX import) become one SIGN layer on an
  activation; on a constant they set `binary=True` on the weight layer (DENSE/CONV/GROUP_CONV)
  that consumes it, whose W is
  the latent initializer (dense [in, out], conv [Cout, Cin, kh, kw]). sign(0) = +1, also for ONNX
  `Sign` (whose Sign(0) is 0: a plain-`Sign` file differs from onnxruntime exactly there).
- Folded weights (decision): a MatMul/Gemm/Conv weight whose entries are all exactly +-1 is binary,
  with latent W = those +-1 values, when the layer reads a binary activation (SIGN, possibly through
  FLATTEN/MAXPOOL) or the file contains QONNX/FINN quantization ops (a `foldquant` export lost its
  weight BipolarQuant nodes, and its first layer reads the 8-bit input quantizer, not a sign).
- A pending affine becomes: a BATCHNORM (gamma=scale, beta=bias, mean 0, var 1-eps, eps 1e-4,
  momentum 0.9) when it multiplies per channel and adds right after a DENSE/CONV (the folded-BN
  form); a shift of the running mean when a BatchNormalization reads a scale-1 chain (a bias before
  BN: exact, and it cancels in training); the `b` of a real DENSE/CONV whose only reader it is
  (scale 1); else ONE AFFINE layer (input scaling, Brevitas TensorNorm incl. its raw `Pow(var, 0.5)`
  form). A binary layer's bias or weight scale (Gemm C/alpha, Conv B, BipolarQuant scale) is such a
  pending affine, so it folds into a following BN or stays a constant AFFINE.
- A 2..8-bit QONNX `Quant` is allowed only on the network input (through AFFINE/FLATTEN layers):
  INPUT_QUANT with QONNX semantics `(round(clip(x/scale + zp)) - zp) * scale`, ROUND = half to
  even.
- `Reshape` to `[1,-1]`, `[N,-1]`, `[0,-1]`, `[-1,F]`, `[1,F]` (or the Shape/Gather/Concat form of
  `x.view(x.size(0), -1)`) is FLATTEN for any batch; one keeping the per-sample shape is dropped;
  one inserting or removing size-1 axes is a view (next item); any other reshape is rejected.
- Converters' layout idioms (an NHWC network input, a Transpose to NHWC before Flatten, views
  that insert or remove size-1 axes) cost no layer: compiler/onnx_layout.py.
Limits: one graph input (initializers listed as inputs are constants), one output, float32 input,
Conv dilation 1 (group > 1 becomes a GROUP_CONV layer), pooling whose ceil_mode does not change the size, no control flow.
Every rejection is a `ModelError` / `UnsupportedModelError` naming the file, the node, its op type
and the reason, with a hint.

Hostile files (tests/test_fuzz.py, scripts/fuzz.py): an initializer is decoded only when a live
node reads it, after its type (numeric only), rank (<= 8), dims (>= 0) and element count
(<= 2^27) are checked from the header; a constant fold is sized from shapes first and refused past
max(2^24, its largest operand); attributes the importer reads must have their ONNX type; node
arity, conv/pool geometry, per-sample sizes (<= 2^31 - 1 elements) and duplicate or shadowed
tensor names are checked. ONNX names enter messages only through `printable` (escaped, cut), so
every message is one line. Any other exception escaping the importer is re-raised as a ModelError
ending in INTERNAL_ERROR, so the CLI shows one line, and the fuzzer counts it as a crash.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from . import ir
from .errors import BnncError, BnncWarning, ConfigError, ModelError, UnsupportedModelError
from .ir import INPUT, WEIGHT_KINDS, LayerKind
from .onnx_fold import FOLD, FOLD_ARITY, MAX_FOLD_ELEMENTS, constant_attr, fold_elements
from .onnx_layout import LayoutMarks, nhwc_input
from .onnx_values import (MAX_RANK, Act, Aff, Bin, Cmp, Const, Named, NodeError, Spec, SteRes,
                          dtype_name, node_label, node_where, printable, proto_text, sanitize_name,
                          short, tensor_array)
from .ops import LAYERS, ONNX_HANDLERS, check_graph, weights

INTERNAL_ERROR = "this is a bnnc bug"     # ends the message of an unexpected exception
QUANT_DOMAINS = ("qonnx.custom_op.general", "finn.custom_op.general", "onnx.brevitas")
_QUANT_OPS = ("BipolarQuant", "Quant", "MultiThreshold")
# per-sample activations must be indexable with the int32 loop counters of the generated C
_MAX_ACT_ELEMENTS = 2**31 - 1
_FOLDED_BN_EPS = 1e-4
_FOLDED_BN_MOMENTUM = 0.9
# the op handlers, by lower-cased op type (an op type matches its handler case-insensitively), and
# the (min, max) inputs of every op the importer reads: the registry's handlers, then folding's
_HANDLERS = {op.lower(): h for op, h in ONNX_HANDLERS.items()}
_ARITY = {**FOLD_ARITY, **{op: h.arity for op, h in ONNX_HANDLERS.items()}}
_HINT_OPS = "supported: " + ", ".join(sorted(ONNX_HANDLERS)) + " (and constant subgraphs)"


# ---------------------------------------------------------------------------------------------
# the importer


class _Importer(LayoutMarks):
    """Interprets one ONNX graph over abstract values (module docstring); the op handlers
    (`compiler/ops`, `OnnxOp.handle(importer, node, vals)`) call its generic methods."""

    def __init__(self, model: onnx.ModelProto, name: str, sha: str, label: str):
        self.model = model
        self.g = model.graph
        self.name = name
        self.sha = sha
        self.label = label
        self.specs: dict[str, Spec] = {}
        self.count: dict[LayerKind, int] = {}
        self.env: dict[str, Any] = {}
        self.inits: dict[str, TensorProto] = {}           # decoded into env when first read
        self.current: onnx.NodeProto | None = None        # the node being imported, for messages
        self.consumers: dict[str, int] = {}
        self.quant_file = False
        self.nhwc = False
        self.dropped: list[str] = []       # nodes on no path to the output (warned on success)
        self.input_name = ""
        self.output_name = ""
        self.input_shape: tuple[int, ...] = ()

    # -- graph structure -----------------------------------------------------------------------

    def run(self) -> ir.Graph:
        try:
            # inf/NaN arising in constant arithmetic is caught where it lands (_param, verify)
            with np.errstate(all="ignore"):
                return self._run()
        except NodeError as e:
            raise e.cls(f"{self.label}: {node_where(e.node)}: {e.why}", hint=e.hint) from None

    def _run(self) -> ir.Graph:
        g = self.g
        inits = self.inits
        for t in g.initializer:
            if t.name in inits:
                raise ModelError(f"{self.label}: two initializers are named '{printable(t.name)}'",
                                 hint="the file is corrupt; re-export it")
            inits[t.name] = t
        inputs = [i for i in g.input if i.name not in inits]
        if len(inputs) != 1:
            names = ", ".join(f"'{printable(i.name)}'" for i in inputs[:5]) or "none"
            raise UnsupportedModelError(
                f"{self.label}: the graph has {len(inputs)} inputs ({names}); bnnc needs exactly "
                f"one",
                hint="export the model with a single image/feature input")
        if len(g.output) != 1:
            names = ", ".join(f"'{printable(o.name)}'" for o in g.output[:5])
            raise UnsupportedModelError(
                f"{self.label}: the graph has {len(g.output)} outputs ({names}); bnnc needs one",
                hint="export only the logits (or probabilities) as the graph output")
        self.input_name, self.output_name = inputs[0].name, g.output[0].name
        order = self._live_nodes(inits)
        self.quant_file = any(n.domain in QUANT_DOMAINS for n in g.node)
        self.input_shape = self._input(inputs[0], order)
        for n in order:
            self._node(n)
        out = self.env.get(self.output_name)
        if not isinstance(out, Act) or (out.layer == INPUT and out.aff is None):
            raise UnsupportedModelError(
                f"{self.label}: the graph output '{printable(self.output_name)}' is not computed "
                f"from the input by any layer",
                hint="the output must be the network's logits or probabilities")
        out = self._mat(out)
        if out.perm is not None or (out.nhwc and out.layer != INPUT):
            order = "a flatten in (H, W, C) order" if out.perm is not None else "an NHWC map"
            raise UnsupportedModelError(
                f"{self.label}: the graph output '{printable(self.output_name)}' is {order} "
                f"(a Transpose to NHWC before it), which bnnc's NCHW layers cannot produce",
                hint="end the network in MatMul/Gemm after the Flatten, or drop the Transpose")
        specs = weights.fold_biases(self, self._reachable(out.layer))
        last = specs[-1]
        if not LAYERS[last.kind].output:
            raise UnsupportedModelError(
                f"{self.label}: the network ends in a {last.kind.value} layer "
                f"(ONNX node '{printable(last.onnx_name)}'); bnnc trains networks whose output is "
                f"logits",
                hint="end the network in MatMul/Gemm (+ BatchNormalization / scaling) or Softmax")
        # final names count only the layers the output depends on, so numbering has no gaps
        rename, counts = {INPUT: INPUT}, {}
        for s in specs:
            counts[s.kind] = counts.get(s.kind, 0) + 1
            rename[s.name] = f"{LAYERS[s.kind].prefix}{counts[s.kind]}"
        layers = tuple(ir.Layer(rename[s.name], s.kind, tuple(rename[i] for i in s.inputs),
                                s.shape, s.attrs, s.params, s.onnx_name) for s in specs)
        graph = ir.Graph(self.name, self.input_shape, layers, "NHWC" if self.nhwc else "NCHW",
                         self.sha)
        check_graph(graph)
        for n in self.dropped:
            warnings.warn(BnncWarning(f"{self.label}: {n} is on no path to the output "
                                      f"'{printable(self.output_name)}'; it is dropped"),
                          stacklevel=3)
        return graph

    def _live_nodes(self, inits) -> list[onnx.NodeProto]:
        nodes = list(self.g.node)
        producer: dict[str, int] = {}
        for i, n in enumerate(nodes):
            for o in n.output:
                if o in producer:
                    raise ModelError(f"{self.label}: tensor '{printable(o)}' is produced by two "
                                     f"nodes ({node_where(nodes[producer[o]])} and {node_where(n)})")
                if o and (o in inits or o == self.input_name):
                    what = "an initializer" if o in inits else "the graph input"
                    raise ModelError(f"{self.label}: {node_where(n)} writes '{printable(o)}', which is "
                                     f"{what}", hint="the file is corrupt; re-export it")
                if o:
                    producer[o] = i
        known = set(inits) | {self.input_name}
        live, stack = set(), [self.output_name]
        while stack:
            t = stack.pop()
            if t in known or t == "":
                continue
            if t not in producer:
                raise ModelError(f"{self.label}: graph output '{printable(t)}' is produced by no "
                                 f"node",
                                 hint="the file is incomplete; re-export it")
            i = producer[t]
            if i in live:
                continue
            live.add(i)
            for s in nodes[i].input:
                if s and s not in known and s not in producer:
                    raise ModelError(
                        f"{self.label}: {node_where(nodes[i])} reads '{printable(s)}', which no node, "
                        f"initializer or graph input produces", hint="a dangling input: the file "
                        "is incomplete or was cut from a larger graph; re-export it")
                stack.append(s)
        # Kahn's algorithm over live nodes, ties broken by file position: deterministic layer names
        deps = {i: {producer[s] for s in nodes[i].input if s in producer and producer[s] in live}
                for i in live}
        users: dict[int, list[int]] = {i: [] for i in live}
        for i, ds in deps.items():
            for d in ds:
                users[d].append(i)
        indeg = {i: len(ds) for i, ds in deps.items()}
        ready = sorted(i for i in live if indeg[i] == 0)
        order: list[int] = []
        while ready:
            i = ready.pop(0)
            order.append(i)
            for u in users[i]:
                indeg[u] -= 1
                if indeg[u] == 0:
                    ready.append(u)
            ready.sort()
        if len(order) != len(live):
            stuck = min(i for i in live if indeg[i] > 0)
            raise ModelError(f"{self.label}: the graph has a cycle through {node_where(nodes[stuck])}",
                             hint="ONNX graphs must be acyclic; re-export the model")
        for i in order:
            for s in nodes[i].input:
                if s:
                    self.consumers[s] = self.consumers.get(s, 0) + 1
        self.consumers[self.output_name] = self.consumers.get(self.output_name, 0) + 1
        self.dropped = [node_where(n) for i, n in enumerate(nodes) if i not in live]
        return [nodes[i] for i in order]

    def _input(self, vi: onnx.ValueInfoProto, order) -> tuple[int, ...]:
        tt = vi.type.tensor_type
        where = f"{self.label}: graph input '{printable(vi.name)}'"
        if not vi.type.HasField("tensor_type") or tt.elem_type != onnx.TensorProto.FLOAT:
            et = dtype_name(tt.elem_type) if tt.elem_type else "non-tensor"
            raise UnsupportedModelError(f"{where} has type {et}",
                                        hint="bnnc expects a float32 input tensor")
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        if not tt.HasField("shape") or not 2 <= len(dims) <= MAX_RANK:
            raise UnsupportedModelError(
                f"{where} has rank {len(dims)}; bnnc needs a batch dimension plus a known "
                f"per-sample shape", hint="export with an input shape like [N, C, H, W] or [N, F]")
        per = dims[1:]
        if any(d is None or d <= 0 for d in per):
            shown = ", ".join(str(d.dim_value) if d.HasField("dim_value") else
                              f"'{printable(d.dim_param, 20)}'" if d.dim_param else "?"
                              for d in tt.shape.dim)
            zero = [i for i, d in enumerate(dims) if i and d == 0]
            why = (f"dimension {zero[0]} is 0; every per-sample dimension needs a positive size"
                   if zero else "only the batch (first) dimension may be symbolic")
            raise UnsupportedModelError(
                f"{where} has shape [{shown}]; {why}",
                hint="export with fixed per-sample dimensions (e.g. 1x28x28 or 3x32x32)")
        per = tuple(int(d) for d in per)
        if math.prod(per) > _MAX_ACT_ELEMENTS:
            raise UnsupportedModelError(
                f"{where} has {math.prod(per):,} elements per sample (shape {list(per)}); the "
                f"generated C indexes tensors with 32-bit ints",
                hint="bnnc targets small inputs (e.g. 1x28x28 or 3x32x32)")
        # tf2onnx: an NHWC input whose first layout-sensitive use is Transpose(perm=[0,3,1,2]),
        # or, with one channel, a Reshape to [N, 1, H, W]
        if len(per) == 3 and nhwc_input(self.input_name, per, order, self.inits):
            self.nhwc = True
            per = (per[2], per[0], per[1])
        self.env[self.input_name] = Act(INPUT, per, nhwc=self.nhwc)
        return per

    def _reachable(self, out: str) -> list[Spec]:
        need, stack = set(), [out]
        while stack:
            s = stack.pop()
            if s != INPUT and s not in need:
                need.add(s)
                stack.extend(self.specs[s].inputs)
        return [s for s in self.specs.values() if s.name in need]

    # -- layer creation ------------------------------------------------------------------------

    def _add(self, kind: LayerKind, inputs, shape, node_names, *, attrs=None, params=None) -> str:
        shape = tuple(int(d) for d in shape)
        if any(d < 1 for d in shape) or math.prod(shape) > _MAX_ACT_ELEMENTS:
            node = self.current if self.current is not None else Named(node_names)
            self._fail(node, f"its {kind.value} output would have per-sample shape {list(shape)}; "
                       f"bnnc needs 1 to {_MAX_ACT_ELEMENTS:,} elements",
                       hint="check the layer's weight shape, strides and pads")
        k = self.count.get(kind, 0) + 1
        self.count[kind] = k
        name = f"{LAYERS[kind].prefix}{k}"
        self.specs[name] = Spec(name, kind, tuple(inputs), tuple(int(d) for d in shape),
                                 dict(attrs or {}), dict(params or {}), node_names)
        return name

    def _param(self, arr, node, what: str) -> np.ndarray:
        a = np.array(arr, dtype=np.float32, copy=True)
        if not np.all(np.isfinite(a)):
            raise ModelError(f"{self.label}: {what} of {node_where(node)} contains NaN or Inf",
                             hint="the exported weights are broken; re-export a healthy checkpoint")
        return a

    def _get(self, name: str, node):
        if name not in self.env and name in self.inits:
            try:
                self.env[name] = Const(tensor_array(self.inits[name]))
            except ValueError as e:
                raise ModelError(f"{self.label}: initializer '{printable(name)}' (read by "
                                 f"{node_where(node)}) {e}",
                                 hint="the file is corrupt or uses a type bnnc does not read; "
                                      "re-export it") from None
        if name not in self.env:
            raise ModelError(f"{self.label}: {node_where(node)} reads '{printable(name)}', which no "
                             f"node, initializer or graph input produces")
        return self.env[name]

    # -- node dispatch -------------------------------------------------------------------------

    def _node(self, node: onnx.NodeProto) -> None:
        op = node.op_type
        self.current = node
        if node.domain in QUANT_DOMAINS:
            if op not in _QUANT_OPS:
                self._unsupported(node)
        elif node.domain not in ("", "ai.onnx"):
            self._unsupported(node, f"custom domain '{printable(node.domain)}'")
        lo, hi = _ARITY.get(op, (0, 1 << 16))
        if not lo <= len(node.input) <= hi or not all(node.input[:lo]):
            n_in = sum(1 for i in node.input if i)
            want = f"{lo}" if lo == hi else f"{lo} to {hi}"
            raise ModelError(f"{self.label}: {node_where(node)} has {n_in} inputs; "
                             f"{printable(op, 40)} takes {want}",
                             hint="the file does not follow the ONNX operator spec; re-export it")
        if op == "Constant":
            try:
                self.env[node.output[0]] = Const(constant_attr(node))
            except UnsupportedModelError as e:
                raise UnsupportedModelError(f"{self.label}: {e.message}", hint=e.hint) from None
            return
        vals = [self._get(i, node) if i else None for i in node.input]
        vals = [Const(v.value()) if isinstance(v, Cmp) and isinstance(v.x, Const)
                and op != "Where" else v for v in vals]
        present = [v for v in vals if v is not None]
        handler = _HANDLERS.get(op.lower())
        all_const = present and all(isinstance(v, Const) for v in present)
        if all_const and op in FOLD and op not in ("GreaterOrEqual", "Less"):
            arrays = [v.arr if v is not None else None for v in vals]
            self._check_fold(node, op, arrays)
            try:
                with np.errstate(all="ignore"):   # inf/NaN constants are reported where used
                    outs = FOLD[op](node, *arrays)
            except (ValueError, IndexError, TypeError, KeyError, ZeroDivisionError,
                    OverflowError) as e:
                raise ModelError(f"{self.label}: cannot evaluate constant {node_where(node)}: "
                                 f"{printable(e, 200)}") from None
            self.env[node.output[0]] = Const(np.asarray(outs))
            return
        if handler is None:
            self._unsupported(node)
        result = handler.handle(self, node, vals)
        if op == "Dropout" and len(node.output) > 1 and self.consumers.get(node.output[1]):
            raise UnsupportedModelError(f"{self.label}: the mask output of {node_where(node)} is used",
                                        hint="export the model in inference mode")
        self.env[node.output[0]] = result

    def _check_fold(self, node, op: str, arrays) -> None:
        arrays = [a for a in arrays if a is not None]
        n = fold_elements(op, node, arrays)
        limit = max([MAX_FOLD_ELEMENTS] + [np.asarray(a).size for a in arrays])
        if n > limit:
            self._fail(node, f"folding this constant would produce {n:,} elements, more than "
                       f"its inputs and than {MAX_FOLD_ELEMENTS:,}",
                       hint="the constant subgraph is far larger than any weight; check the file")

    def _unsupported(self, node, why: str | None = None):
        raise UnsupportedModelError(
            f"{self.label}: unsupported op {printable(node.op_type, 40)} at {node_where(node)}"
            + (f" ({why})" if why else ""), hint=_HINT_OPS)

    def _fail(self, node, why: str, hint: str | None = None):
        raise UnsupportedModelError(f"{self.label}: {node_where(node)}: {why}", hint=hint)

    def _bcast(self, arr, shape, node, what: str) -> np.ndarray:
        """np.broadcast_to with a message naming the node (a read-only view, no copy)."""
        try:
            return np.broadcast_to(arr, shape)
        except ValueError:
            self._fail(node, f"{what} of shape {list(np.shape(arr))} does not broadcast to "
                       f"{list(shape)}")

    def _const(self, v, node, what: str) -> np.ndarray:
        if isinstance(v, Const):
            return v.arr
        self._fail(node, f"{what} must be a constant (initializer or constant subgraph)")

    def _int_list(self, v, node, what: str) -> list[int]:
        """A constant of whole numbers (a shape) as ints; ONNX types shapes int64, so a float one
        is accepted only when every value is a finite integer (NaN would reach int())."""
        arr = np.asarray(self._const(v, node, what)).ravel()
        if arr.dtype.kind not in "iu" and not (arr.dtype.kind == "f" and np.all(np.isfinite(arr))
                                               and np.all(arr == np.round(arr))):
            self._fail(node, f"{what} {short(arr)} is not a list of integers")
        return [int(d) for d in arr]

    def _act(self, v, node, what="its data input") -> Act:
        if isinstance(v, Act):
            return v
        kind = {Const: "a constant", Bin: "a binarized constant", Cmp: "a comparison",
                SteRes: "a partial STE expression", type(None): "missing"}.get(type(v), "?")
        self._fail(node, f"{what} is {kind}, expected an activation")

    # -- pending affine --------------------------------------------------------------------------

    def _chan(self, act: Act, arr, node) -> tuple[np.ndarray, bool]:
        """An ONNX constant broadcast against `act` -> (float64 [C] or [1], per_channel)."""
        ps = act.onnx_shape
        a = np.asarray(arr, dtype=np.float64)
        if a.ndim > len(ps) + 1:
            self._fail(node, f"constant of shape {list(a.shape)} has more dims than the "
                       f"activation {['N', *ps]}")
        a = a.reshape((1,) * (len(ps) + 1 - a.ndim) + a.shape)
        if a.shape[0] != 1:
            self._fail(node, f"constant of shape {list(np.asarray(arr).shape)} varies over the "
                       f"batch dimension")
        a = a[0]
        if act.view is not None or act.perm is not None:
            a, ps = self._unview_const(act, a, node, arr), act.shape
        cax = len(ps) - 1 if act.nhwc else 0
        for ax, (d, s) in enumerate(zip(a.shape, ps)):
            if d != 1 and (d != s or ax != cax):
                self._fail(node, f"constant of shape {list(np.asarray(arr).shape)} is not per "
                           f"channel or per tensor for an activation of shape {['N', *ps]}",
                           hint="bnnc folds scalar and per-channel constants only")
        if a.shape[cax] == 1:
            return a.reshape(1), False
        return a.reshape(-1), True

    def _affine(self, x: Act, node, mul=None, add=None, *, mul_pc=False,
                explicit=True) -> Act:
        """x*mul + add on top of x's pending affine (arrays already per channel). `explicit`:
        the constants come from ONNX Mul/Add nodes (not a layer's weight scale or bias)."""
        aff = x.aff or Aff(np.ones(1), np.zeros(1), [])
        s, t = aff.scale, aff.bias
        if mul is not None:
            s, t = s * mul, t * mul
        if add is not None:
            t = t + add
        nodes = aff.nodes if aff.nodes and aff.nodes[-1] == node_label(node) else \
            aff.nodes + [node_label(node)]
        new = Aff(s, t, nodes,
                   aff.pc_mul or (mul is not None and mul_pc and explicit),
                   aff.add or (add is not None and explicit))
        return dataclasses.replace(x, aff=new, mat=None, src=None)

    def _mat(self, x: Act) -> Act:
        """Materialize a pending affine (once per value)."""
        if x.aff is None:
            return x
        if x.mat is not None:
            return x.mat
        aff, C = x.aff, x.shape[0]
        base = self.specs.get(x.layer)
        scale, bias = aff.scale, aff.bias
        onnx_name = "+".join(aff.nodes)
        real_base = (base is not None and base.kind in WEIGHT_KINDS
                     and not base.attrs["binary"])
        # an identity chain vanishes, except a bias Add on a real layer: a trainable `b` even
        # when it is all zeros (an untrained export); weights.fold_biases turns it into that `b`
        if np.all(scale == 1) and np.all(bias == 0) and not (real_base and aff.add):
            res = dataclasses.replace(x, aff=None, mat=None, src=None)
        elif (base is not None and base.kind in WEIGHT_KINDS and aff.pc_mul
              and aff.add and not x.nhwc):
            nm = Named(onnx_name)
            name = self._add(LayerKind.BATCHNORM, [x.layer], x.shape, onnx_name,
                             attrs={"eps": _FOLDED_BN_EPS, "momentum": _FOLDED_BN_MOMENTUM},
                             params={"gamma": self._param(np.broadcast_to(scale, (C,)), nm,
                                                          "scale"),
                                     "beta": self._param(np.broadcast_to(bias, (C,)), nm,
                                                         "bias"),
                                     "mean": np.zeros(C, np.float32),
                                     "var": np.full(C, 1 - _FOLDED_BN_EPS, np.float32)})
            res = dataclasses.replace(x, layer=name, aff=None, mat=None, src=None)
        else:
            nm = Named(onnx_name)
            n = C if (scale.size > 1 or bias.size > 1) else 1
            name = self._add(LayerKind.AFFINE, [x.layer], x.shape, onnx_name,
                             params={"scale": self._param(np.broadcast_to(scale, (n,)), nm,
                                                          "scale"),
                                     "bias": self._param(np.broadcast_to(bias, (n,)), nm,
                                                         "bias")})
            res = dataclasses.replace(x, layer=name, aff=None, mat=None, src=None)
        x.mat = res
        return res

    # -- what handlers ask about the file ----------------------------------------------------------

    def _file_batch(self) -> int:
        for vi in self.g.input:
            if vi.name == self.input_name:
                d = vi.type.tensor_type.shape.dim[0]
                return d.dim_value if d.HasField("dim_value") else 1
        return 1


# ---------------------------------------------------------------------------------------------


def load_model(path: str | os.PathLike | onnx.ModelProto, *, name: str | None = None) -> ir.Graph:
    """Read an ONNX/QONNX file (or an in-memory ModelProto) and map it to the layer IR.

    `name` (a C identifier) defaults to the sanitized file stem (a ModelProto: its graph name).
    Raises ModelError / UnsupportedModelError (naming the node) for anything bnnc cannot train.
    """
    if isinstance(path, onnx.ModelProto):
        model = path
        data = model.SerializeToString(deterministic=True)
        label = f"model '{printable(model.graph.name or 'model')}'"
        default = sanitize_name(proto_text(model.graph.name) or "model")
    else:
        p = Path(path)
        label = p.name
        try:
            data = p.read_bytes()
        except OSError as e:
            raise ModelError(f"cannot read model file {p}: {e.strerror or e}") from None
        try:
            model = onnx.load_model_from_string(data)
        except Exception as e:  # protobuf raises DecodeError and friends; all mean "not ONNX"
            raise ModelError(f"{p}: not a readable ONNX model ({type(e).__name__}: "
                             f"{printable(e, 200)})",
                             hint="the file is truncated or not an .onnx file") from None
        if not model.HasField("graph") or not model.graph.node:
            raise ModelError(f"{p}: not an ONNX model (no graph nodes)",
                             hint="the file is truncated or not an .onnx file")
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
            try:
                onnx.load_external_data_for_model(model, str(p.parent))
            except Exception as e:
                raise ModelError(f"{p}: cannot load external tensor data ({printable(e, 200)})",
                                 hint="keep the .data file next to the .onnx file") from None
        default = sanitize_name(p.stem)
    gname = default if name is None else name
    if not re.match(r"^[a-z][a-z0-9_]*$", gname):
        raise ConfigError(f"model name {gname!r} is not a C identifier [a-z][a-z0-9_]*",
                          hint=f"try --name {sanitize_name(gname)}")
    sha = hashlib.sha256(data).hexdigest()
    imp = _Importer(model, gname, sha, label)
    try:
        return imp.run()
    except BnncError:
        raise
    except Exception as e:
        # every rejection above is deliberate; anything else is a bug, reported without a
        # traceback but marked as one (the fuzzer counts these as crashes)
        where = f" at {node_where(imp.current)}" if imp.current is not None else ""
        raise ModelError(f"{label}: internal error while importing{where} "
                         f"({type(e).__name__}: {printable(e, 200)}); {INTERNAL_ERROR}",
                         hint="please report it with the model file") from e
