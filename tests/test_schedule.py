"""Tests of compiler/schedule.py (the lowered training step) and the kernel registry (compiler/ops).

Graphs are built by hand here (module-local factories), so every expected size below is derived from
the layer dims in this file, not from the schedule. Zoo/frontend models are exercised when present.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from bnnc.compiler.config import make_config
from bnnc.compiler.errors import ModelError, UnsupportedModelError
from bnnc.compiler.ir import INPUT, WEIGHT_KINDS, Graph, Layer, LayerKind
from bnnc.compiler.ops import KERNELS, check_registry, check_step
from bnnc.compiler.ops.base import Phase
from bnnc.compiler.schedule import build_schedule, schedule_table
from bnnc.compiler.schedule_ir import DType, Role
from bnnc.compiler.state import state_tensors

B = 4
K = LayerKind


# ---------------------------------------------------------------------------------- graphs
class _G:
    """A tiny graph builder: shapes are given explicitly (and checked by the schedule)."""

    def __init__(self, name, input_shape, seed=0):
        self.name, self.input_shape = name, tuple(input_shape)
        self.rng = np.random.default_rng(seed)
        self.layers: list[Layer] = []
        self.shapes = {INPUT: self.input_shape}

    def add(self, name, kind, inputs, shape, attrs=None, params=None):
        inputs = (inputs,) if isinstance(inputs, str) else tuple(inputs)
        self.layers.append(Layer(name, kind, inputs, tuple(shape), dict(attrs or {}),
                                 {k: np.asarray(v, np.float32) for k, v in (params or {}).items()}))
        self.shapes[name] = tuple(shape)
        return name

    def dense(self, name, src, n, binary=True, bias=False):
        (k,) = self.shapes[src] if len(self.shapes[src]) == 1 else (int(np.prod(self.shapes[src])),)
        p = {"W": self.rng.standard_normal((k, n)) / np.sqrt(k)}
        if bias:
            p["b"] = self.rng.uniform(-0.5, 0.5, n)
        return self.add(name, K.DENSE, src, (n,), {"binary": binary}, p)

    def conv(self, name, src, cout, k=3, stride=1, pad=0, binary=True):
        cin, h, w = self.shapes[src]
        p = {"W": self.rng.standard_normal((cout, cin, k, k)) / np.sqrt(cin * k * k)}
        oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
        return self.add(name, K.CONV, src, (cout, oh, ow),
                        {"binary": binary, "strides": (stride, stride), "pads": (pad,) * 4}, p)

    def bn(self, name, src):
        c = self.shapes[src][0]
        p = {"gamma": np.ones(c), "beta": np.zeros(c), "mean": np.zeros(c), "var": np.ones(c)}
        return self.add(name, K.BATCHNORM, src, self.shapes[src], {"eps": 1e-4, "momentum": 0.9}, p)

    def pool(self, name, src, kind=K.MAXPOOL, k=2, stride=2, pad=0):
        c, h, w = self.shapes[src]
        oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
        return self.add(name, kind, src, (c, oh, ow),
                        {"kernel": (k, k), "strides": (stride, stride), "pads": (pad,) * 4})

    def unary(self, name, kind, src):
        return self.add(name, kind, src, self.shapes[src])

    def flatten(self, name, src):
        return self.add(name, K.FLATTEN, src, (int(np.prod(self.shapes[src])),))

    def build(self) -> Graph:
        g = Graph(self.name, self.input_shape, tuple(self.layers))
        g.verify()
        return g


def mlp(hidden=256) -> Graph:
    """flatten -> fc1 (784->h) -> bn -> sign -> fc2 (h->h) -> bn -> sign -> fc3 (h->10) -> bn ->
    softmax"""
    g = _G("mlp", (1, 28, 28))
    x = g.flatten("flatten0", INPUT)
    for i, n in enumerate((hidden, hidden, 10), start=1):
        x = g.bn(f"bn{i}", g.dense(f"fc{i}", x, n))
        x = g.unary(f"sign{i}" if n != 10 else "softmax", K.SIGN if n != 10 else K.SOFTMAX, x)
    return g.build()


def convnet() -> Graph:
    """Input quantizer + affine scaling, binary first conv (pad 1), 64-channel conv, 2x2 pool after
    sign, a stride-2 padded conv, an overlapping 3x3/2 max-pool between conv and BN, flatten,
    dense."""
    g = _G("convnet", (3, 12, 12))
    x = g.add("quant0", K.INPUT_QUANT, INPUT, (3, 12, 12),
              {"scale": np.float32(1 / 128), "zero_point": 0.0, "bits": 8, "signed": True,
               "narrow": False})
    x = g.add("affine0", K.AFFINE, x, (3, 12, 12), params={"scale": [1.0, 0.5, 2.0],
                                                           "bias": [0.0, 0.25, -0.5]})
    x = g.unary("sign1", K.SIGN, g.bn("bn1", g.conv("conv1", x, 16, pad=1)))       # 16x12x12
    x = g.unary("sign2", K.SIGN, g.bn("bn2", g.conv("conv2", x, 64)))               # 64x10x10
    x = g.pool("pool2", x)                                                           # 64x5x5
    x = g.conv("conv3", x, 72, stride=2, pad=1)                                      # 72x3x3
    x = g.pool("pool3", x, k=3, stride=2, pad=1)                                     # 72x2x2
    x = g.unary("sign3", K.SIGN, g.bn("bn3", x))
    x = g.flatten("flatten3", x)                                                     # 288
    x = g.bn("bn4", g.dense("fc4", x, 10))
    g.unary("softmax", K.SOFTMAX, x)
    return g.build()


def residual() -> Graph:
    """ResNetE-like: real stem conv + BN + ReLU; a downsampling block (sign -> binary 3x3/2 conv ->
    BN) + (AvgPool 2x2 -> real 1x1 conv -> BN); an identity block (Bi-Real); GAP, real dense + b."""
    g = _G("residual", (3, 8, 8))
    stem = g.unary("relu0", K.RELU, g.bn("bn0", g.conv("conv0", INPUT, 8, pad=1, binary=False)))
    path = g.bn("bn1", g.conv("conv1", g.unary("sign1", K.SIGN, stem), 16, stride=2, pad=1))
    short = g.bn("bn1s", g.conv("conv1s", g.pool("pool1s", stem, K.AVGPOOL), 16, k=1,
                                binary=False))
    x = g.add("add1", K.ADD, (path, short), (16, 4, 4))
    path = g.bn("bn2", g.conv("conv2", g.unary("sign2", K.SIGN, x), 16, pad=1))
    x = g.add("add2", K.ADD, (path, x), (16, 4, 4))
    x = g.add("gap3", K.GLOBAL_AVGPOOL, x, (16, 1, 1))
    x = g.dense("fc3", g.flatten("flatten3", x), 10, binary=False, bias=True)
    g.unary("softmax", K.SOFTMAX, x)
    return g.build()


def bireal() -> Graph:
    """Bi-Real-like: real stem conv -> BN -> overlapping 3x3/2 max-pool, two identity-shortcut
    blocks (sign -> binary conv -> BN, + x), GAP, flatten, real dense with bias, softmax."""
    g = _G("bireal", (3, 16, 16))
    x = g.pool("pool0", g.bn("bn0", g.conv("conv0", INPUT, 64, pad=1, binary=False)), k=3,
               stride=2, pad=1)                                                      # 64x8x8
    for i in (1, 2):
        path = g.bn(f"bn{i}", g.conv(f"conv{i}", g.unary(f"sign{i}", K.SIGN, x), 64, pad=1))
        x = g.add(f"add{i}", K.ADD, (path, x), (64, 8, 8))
    x = g.flatten("flatten3", g.add("gap3", K.GLOBAL_AVGPOOL, x, (64, 1, 1)))
    g.unary("softmax", K.SOFTMAX, g.dense("fc3", x, 10, binary=False, bias=True))
    return g.build()


def brevitas_like() -> Graph:
    """TFC-like, no softmax: affine input scaling, sign on the input, binary dense layers, a
    per-class AFFINE (TensorNorm) as the output: the loss reads its output as logits."""
    g = _G("brev", (64,))
    x = g.unary("sign0", K.SIGN, g.add("affine0", K.AFFINE, INPUT, (64,),
                                       params={"scale": [2.0], "bias": [-1.0]}))
    x = g.unary("sign1", K.SIGN, g.bn("bn1", g.dense("fc1", x, 32)))
    x = g.bn("bn2", g.dense("fc2", x, 10))
    g.add("affine3", K.AFFINE, x, (10,), params={"scale": np.linspace(0.5, 2, 10),
                                                 "bias": np.zeros(10)})
    return g.build()


def grouped() -> Graph:
    """Grouped convs (compiler/ops/gconv.py): a real group-2 first layer with a bias, then sign ->
    max-pool -> a binary depthwise conv, whose input is never packed."""
    g = _G("grouped", (4, 8, 8))
    w1, w2 = g.rng.standard_normal((8, 2, 3, 3)) / 4, g.rng.standard_normal((8, 1, 3, 3)) / 3
    x = g.add("gconv1", K.GROUP_CONV, INPUT, (8, 8, 8), {"binary": False, "group": 2,
              "strides": (1, 1), "pads": (1,) * 4}, {"W": w1, "b": np.zeros(8)})
    x = g.pool("pool1", g.unary("sign1", K.SIGN, g.bn("bn1", x)))                     # 8x4x4
    x = g.add("gconv2", K.GROUP_CONV, x, (8, 2, 2), {"binary": True, "group": 8,
              "strides": (2, 2), "pads": (1, 1, 0, 0)}, {"W": w2})
    x = g.bn("bn3", g.dense("fc3", g.flatten("flatten2", g.unary("sign2", K.SIGN,
                                                                g.bn("bn2", x))), 10))
    g.unary("softmax", K.SOFTMAX, x)
    return g.build()


def pooled() -> Graph:
    """BinaryNet-like: conv (pad 1) -> 2x2 max-pool -> BN -> sign, twice (a first layer on the real
    input, then a binary one on packed bits), flatten, dense, BN, softmax."""
    g = _G("pooled", (3, 8, 8))
    x = g.pool("pool1", g.conv("conv1", INPUT, 8, pad=1))                          # 8x4x4
    x = g.unary("sign1", K.SIGN, g.bn("bn1", x))
    x = g.pool("pool2", g.conv("conv2", x, 16, pad=1))                             # 16x2x2
    x = g.unary("sign2", K.SIGN, g.bn("bn2", x))
    x = g.bn("bn3", g.dense("fc3", g.flatten("flatten2", x), 10))
    g.unary("softmax", K.SOFTMAX, x)
    return g.build()


GRAPHS = {"mlp": mlp, "convnet": convnet, "residual": residual, "bireal": bireal,
          "brevitas_like": brevitas_like, "grouped": grouped, "pooled": pooled}
ALGOS = ("standard", "proposed")
OPTS = ("adam", "sgd", "bop")
_ITEM = {DType.F32: 4, DType.F16: 2, DType.BF16: 2, DType.I32: 4, DType.U8: 1, DType.PO2: 1}


def _sched(graph, algorithm="proposed", **kw):
    return build_schedule(graph, make_config(algorithm, batch=B, **kw))


def _steps(s, kernel=None, layer=None, phase=None):
    return [t for t in s.steps if (kernel is None or t.kernel.name == kernel)
            and (layer is None or t.layer == layer) and (phase is None or t.phase.value == phase)]


def _dw_step(s, layer):
    (st,) = [t for t in s.steps if t.layer == layer and "_dw_" in t.kernel.name]
    return st


# ---------------------------------------------------------------------------------- invariants
def _check_invariants(s, graph, cfg):
    s.verify()
    t, b = s.tensors, cfg.batch
    assert (t[INPUT].dtype, t[INPUT].shape, t[INPUT].role) == (DType.F32, (b,) + graph.input_shape,
                                                               Role.INPUT)
    assert (t["labels"].dtype, t["labels"].shape, t["labels"].role) == (DType.I32, (b,), Role.LABEL)
    # kernels exist, phases agree, operand dtypes follow the registry
    for st in s.steps:
        assert KERNELS[st.kernel.name] is st.kernel and st.kernel.phase is st.phase
        check_step(st.kernel, tuple(t[n].dtype for n in st.inputs),
                   tuple(t[n].dtype for n in st.outputs))
    # the persistent tensors are exactly compiler.state's
    roles = {"param": Role.PARAM, "opt": Role.OPT_STATE, "bn_stat": Role.BN_STAT,
             "frozen": Role.FROZEN}
    sts = state_tensors(graph, cfg)
    assert {n for n, x in t.items() if x.role.persistent} == {st.name for st in sts}
    for st in sts:
        x = t[st.name]
        assert (x.dtype.value, x.shape, x.role) == (st.dtype, st.shape, roles[st.kind]), st.name
    # exact bytes of every byte-addressed tensor; views share their base's bytes
    for x in t.values():
        if x.alias_of is None and x.dtype is not DType.BIT:
            assert x.nbytes == x.size * _ITEM[x.dtype], x
    # in-place: same element count, output no larger, never the labels or the state (the
    # batch input only as the arena's copy: liveness never joins the caller's, io="caller")
    for st in s.steps:
        for o, i in st.inplace:
            to, ti = t[o], t[i]
            base = t[ti.alias_of or i]
            assert to.size == ti.size and to.nbytes <= ti.nbytes, (st.kernel, o, i)
            assert not base.role.persistent and base.role is not Role.LABEL
            assert o != i
    # every parameter is updated once, after its gradient, and nothing reads it after its update
    updates = {}
    for st in s.steps:
        if st.phase is Phase.UPDATE:
            p = st.inputs[0]
            assert p not in updates, f"{p} updated twice"
            updates[p] = st
            grad = s.producer(st.inputs[1])
            assert grad is not None and grad.index < st.index
    assert set(updates) == {st.name for st in sts if st.kind == "param"}
    for p, up in updates.items():
        readers = [x.index for x in s.consumers(p) if x is not up]
        assert all(i < up.index for i in readers), f"{p} read after its update"
    # no tensor is created without being used (directly or through a view)
    used = {n for st in s.steps for n in st.inputs + st.outputs}
    used |= {t[n].alias_of for n in used if t[n].alias_of}
    assert set(t) == used, set(t) - used
    # roles: SAVED tensors cross from forward to backward, GRAD tensors live in loss/backward
    for x in t.values():
        if x.alias_of is not None:
            continue
        prod = s.producer(x.name)
        if x.role is Role.SAVED:
            views = [x.name] + [v.name for v in t.values() if v.alias_of == x.name]
            assert prod.phase is Phase.FORWARD
            assert any(c.phase is Phase.BACKWARD for v in views for c in s.consumers(v)), x.name
        if x.role is Role.GRAD:
            assert prod.phase in (Phase.LOSS, Phase.BACKWARD), x.name


@pytest.mark.parametrize("opt", OPTS)
@pytest.mark.parametrize("algorithm", ALGOS)
@pytest.mark.parametrize("gname", sorted(GRAPHS))
def test_invariants_every_graph_algorithm_optimizer(gname, algorithm, opt):
    graph = GRAPHS[gname]()
    cfg = make_config(algorithm, batch=B, optimizer=opt)
    _check_invariants(build_schedule(graph, cfg), graph, cfg)


def test_graphs_cover_every_layer_kind():
    kinds = {lay.kind for f in GRAPHS.values() for lay in f().layers}
    assert kinds == set(LayerKind)


def test_registry_is_consistent():
    check_registry()
    for k in KERNELS.values():
        assert k.description and k.name.replace("_", "").isalnum()
        for oi, ii in k.inplace:    # element-wise pairs: never a packed (BIT) operand
            assert DType.BIT not in k.outputs[oi].dtypes or k.phase is Phase.UPDATE
            assert DType.BIT not in k.inputs[ii].dtypes or k.phase is Phase.UPDATE
    with pytest.raises(AssertionError):
        check_step(KERNELS["dense_fwd_xnor"], (DType.F32, DType.BIT), (DType.F32,))
    with pytest.raises(AssertionError):
        check_step(KERNELS["po2_quantize"], (DType.F16,), (DType.PO2,))   # bias output missing


# ---------------------------------------------------------------------------------- policies
def test_mlp_saved_input_bytes_proposed_vs_standard():
    s = _sched(mlp(), "proposed")
    x = s.tensors[_dw_step(s, "fc2").inputs[0]]
    assert x.name == "sign1.out" and x.dtype is DType.BIT and x.nbytes == B * 4 * 8
    assert x.role is Role.SAVED
    s = _sched(mlp(), "standard")
    x = s.tensors[_dw_step(s, "fc2").inputs[0]]
    assert x.name == "sign1.out" and x.dtype is DType.F32 and x.nbytes == B * 256 * 4


def test_proposed_mlp_dtypes_and_the_one_gradient_buffer():
    s = _sched(mlp(), "proposed")
    t = s.tensors
    assert t["fc2.W"].dtype is DType.BF16 and t["fc2.W.v"].dtype is DType.BF16
    assert t["bn2.d_out"].dtype is DType.F16 and t["fc2.d_out"].dtype is DType.F16
    assert t["fc2.d_out_q"].dtype is DType.PO2 and t["fc2.d_out_q"].nbytes == B * 256
    assert t["fc2.po2_bias"].dtype is DType.I32 and t["fc2.po2_bias"].nbytes == 4
    assert t["fc2.dW"].dtype is DType.BIT and t["fc2.dW"].nbytes == 256 * 256 // 8
    assert t["sign1.mask"].dtype is DType.BIT and t["sign1.mask"].nbytes == B * 4 * 8
    assert t["bn2.s"].dtype is DType.BIT and t["bn2.psi"].dtype is DType.F32
    assert "bn2.xh" not in t and "bn2.gamma" not in t
    # G -> dY in place: the gradient entering BN and dY share a buffer; the PO2 codes get their
    # own (1 byte per element), so the f16 dY dies at the quantization
    (bn,) = _steps(s, "bn_l1_bwd", "bn2")
    (po2,) = _steps(s, "po2_quantize", "fc2")
    assert ("fc2.d_out", "bn2.d_out") in bn.inplace and po2.inplace == ()
    # the first layer reads the real input (a view of "input"), never a copy
    assert _dw_step(s, "fc1").inputs[0] == "flatten0.out"
    assert t["flatten0.out"].alias_of == INPUT
    # the 1/sqrt(N_W) scale travels to the update; Adam's W is latent, so the mask applies
    (up,) = _steps(s, "adam_update", "fc2")
    assert up.attrs["g_scale"] == 1 / 256 and up.attrs["ste_mask"] is True


def test_standard_is_all_f32():
    for gname, f in GRAPHS.items():
        s = _sched(f(), "standard")
        for x in s.tensors.values():
            assert x.dtype in (DType.F32, DType.I32), (gname, x)
            if x.dtype is DType.I32:
                assert x.name == "labels" or x.name.endswith(".argmax"), x.name
        assert not _steps(s, "po2_quantize") and not _steps(s, "pack_sign_w")
        assert _steps(s, "sign_bwd_ste") and not _steps(s, "sign_bwd_mask")


def test_no_dx_for_the_first_weight_layer():
    for f in GRAPHS.values():
        g = f()
        first = next(lay.name for lay in g.layers if lay.kind in WEIGHT_KINDS)
        for algorithm in ALGOS:
            s = _sched(g, algorithm)
            assert _dw_step(s, first)
            assert not [st for st in s.steps if st.layer == first and "_dx_" in st.kernel.name]
            # and no gradient at all for the layers before it
            assert not [n for n in s.tensors if n.startswith(("quant0.", "affine0.", "sign0."))
                        and ".d_" in n]


def _diff(a, b):
    """(names only in a, names only in b, names in both whose Tensor records differ)."""
    ta, tb = a.tensors, b.tensors
    return (set(ta) - set(tb), set(tb) - set(ta), {n for n in set(ta) & set(tb) if ta[n] != tb[n]})


def test_switch_no_po2_removes_exactly_the_po2_steps():
    g = mlp()
    base, var = _sched(g), _sched(g, po2=False)
    only_base, only_var, changed = _diff(base, var)
    binary = ("fc1", "fc2", "fc3")
    assert only_base == {f"{n}.{f}" for n in binary for f in ("d_out_q", "po2_bias")}
    assert only_var == set() and changed == set()
    assert len(_steps(base, "po2_quantize")) == 3 and not _steps(var, "po2_quantize")
    assert {st.kernel.name for st in var.steps if "_dx_" in st.kernel.name} == {"dense_dx_f32"}
    assert _dw_step(var, "fc2").inputs == ("sign1.out", "fc2.d_out")
    assert len(var.steps) == len(base.steps) - 3


def test_switch_bn_l2_brings_xh_inv_std_and_f32_gradients():
    g = mlp()
    base, var = _sched(g), _sched(g, bn="l2")
    only_base, only_var, changed = _diff(base, var)
    bns = ("bn1", "bn2", "bn3")
    assert only_base == {f"{n}.{f}" for n in bns for f in ("s", "psi", "mu", "running_psi")}
    assert only_var == {f"{n}.{f}" for n in bns for f in ("xh", "inv_std", "gamma", "gamma.m",
                                                         "gamma.v", "running_var", "dgamma")}
    assert var.tensors["bn2.xh"].dtype is DType.F32 and var.tensors["bn2.xh"].shape == (B, 256)
    assert var.tensors["bn2.inv_std"].shape == (256,)
    assert var.tensors["bn2.xh"].role is Role.SAVED
    # the activation-gradient path is f32 under l2 (only l1 reads fp16(G)); nothing else changes
    for n in changed:
        a, b = base.tensors[n], var.tensors[n]
        assert a.role is Role.GRAD and (a.dtype, b.dtype) == (DType.F16, DType.F32), n
        assert b.nbytes == 2 * a.nbytes
    assert {"bn2.d_out", "fc2.d_out", "sign1.d_out"} <= changed


def test_switch_state_f32_changes_only_state_dtypes():
    g = convnet()
    base, var = _sched(g), _sched(g, state_dtype="f32")
    only_base, only_var, changed = _diff(base, var)
    assert not only_base and not only_var
    assert changed == {n for n, x in base.tensors.items() if x.role.persistent}
    for n in changed:
        assert base.tensors[n].dtype is DType.BF16 and var.tensors[n].dtype is DType.F32
    assert [(s.kernel, s.inputs, s.outputs, s.inplace) for s in base.steps] == \
        [(s.kernel, s.inputs, s.outputs, s.inplace) for s in var.steps]
    f16 = _sched(g, state_dtype="f16")
    assert f16.tensors["conv2.W"].dtype is DType.F16 and f16.tensors["conv2.W"].nbytes == \
        64 * 16 * 9 * 2


def test_switch_no_binary_dw_gives_masked_f32_dw():
    g = mlp()
    base, var = _sched(g), _sched(g, binary_dw=False)
    only_base, only_var, changed = _diff(base, var)
    assert not only_base and not only_var
    assert changed == {"fc1.dW", "fc2.dW", "fc3.dW"}
    dw = var.tensors["fc2.dW"]
    assert dw.dtype is DType.F32 and dw.nbytes == 256 * 256 * 4
    st = _dw_step(var, "fc2")
    assert st.kernel.name == "dense_dw_po2" and st.inputs == ("sign1.out", "fc2.d_out_q",
                                                         "fc2.po2_bias", "fc2.W")
    (up,) = _steps(var, "adam_update", "fc2")
    # a real-valued dW: the update undoes the loss scale of the f16 gradient path (l1 BN)
    assert up.attrs["g_scale"] == 2.0 ** -(8 + math.floor(math.log2(B)))


def test_switch_no_save_bits_unpacks_activations():
    g = convnet()
    base, var = _sched(g), _sched(g, save_bits=False)
    assert not _steps(var, "conv_fwd_xnor") and not _steps(var, "pack_sign_w")
    assert _steps(base, "conv_fwd_xnor") and _steps(base, "dense_fwd_xnor")
    assert var.tensors["sign2.out"].dtype is DType.F32
    assert not [n for n in var.tensors if n.endswith(".mask")]
    assert var.tensors["pool2.argmax"].dtype is DType.I32
    bits = {n for n, x in var.tensors.items() if x.dtype is DType.BIT}
    # what stays 1-bit belongs to other techniques: l1 BN's sign bits and binary dW
    assert bits == {n for n in bits if n.endswith((".s", ".dW"))}


def test_bop_stores_binary_weights_packed_and_updates_them_with_bop():
    s = _sched(mlp(), optimizer="bop")
    w = s.tensors["fc2.W"]
    assert w.dtype is DType.BIT and w.nbytes == 256 * 4 * 8      # 256 rows of W^T x 4 words
    assert s.tensors["fc1.W"].nbytes == 256 * 13 * 8              # 784 bits -> 13 words per row
    assert "fc2.W.v" not in s.tensors and s.tensors["fc2.W.m"].dtype is DType.BF16
    (up,) = _steps(s, "bop_update", "fc2")
    # W, dW, m; then the flip-compensated running mean's saved input and BN running mean
    assert up.inputs == ("fc2.W", "fc2.dW", "fc2.W.m", "sign1.out", "bn2.running_mean")
    (plain,) = _steps(_sched(mlp(), optimizer="bop", bop_bn_shift=False), "bop_update", "fc2")
    assert plain.inputs == ("fc2.W", "fc2.dW", "fc2.W.m")
    assert "g_scale" not in up.attrs and "ste_mask" not in up.attrs   # Bop reads the signs only
    assert not _steps(s, "pack_sign_w")                            # the XNOR kernel reads W
    (fwd,) = _steps(s, "dense_fwd_xnor", "fc2")
    assert fwd.inputs == ("sign1.out", "fc2.W")
    assert _steps(s, "adam_update", "bn2")                        # BN beta stays on Adam


def test_conv_bit_layouts():
    s = _sched(convnet())
    t = s.tensors
    # NHWC packing: ceil(C/64) words per pixel
    assert t["sign1.out"].nbytes == B * 12 * 12 * 1 * 8           # 16 channels -> 1 word
    assert t["sign2.out"].nbytes == B * 10 * 10 * 1 * 8           # 64 channels -> 1 word
    assert t["sign3.out"].nbytes == B * 2 * 2 * 2 * 8             # 72 channels -> 2 words
    # flat masks: ceil(C*H*W/64) words per sample
    assert t["sign2.mask"].nbytes == B * (64 * 100 // 64) * 8
    assert t["pool2.argmax"].dtype is DType.BIT and t["pool2.argmax"].shape == (B, 64, 10, 10)
    assert t["pool2.argmax"].nbytes == B * 100 * 8
    assert t["pool2.out"].dtype is DType.BIT and t["pool2.out"].nbytes == B * 25 * 8
    # the overlapping 3x3/2 pool keeps a u8 in-window index per output
    assert t["pool3.argmax"].dtype is DType.U8 and t["pool3.argmax"].shape == (B, 72, 2, 2)
    (fwd,) = _steps(s, "maxpool_fwd_widx", "pool3")
    assert fwd.attrs["kernel"] == (3, 3) and fwd.attrs["pads"] == (1, 1, 1, 1)
    # flatten of NHWC bits is a view; the dense layer packs its weights pixel-major to match
    assert t["flatten3.out"].alias_of == "sign3.out" and t["flatten3.out"].nbytes == B * 4 * 2 * 8
    assert t["fc4.Wb"].nbytes == 10 * (4 * 2) * 8
    assert t["conv2.Wb"].nbytes == 64 * 9 * 1 * 8 and t["conv3.Wb"].nbytes == 72 * 9 * 1 * 8
    (fc4,) = _steps(s, "dense_fwd_xnor", "fc4")
    assert fc4.attrs["x_layout"] == "bits_nhwc" and fc4.attrs["x_chw"] == (72, 2, 2)
    # the binary first layer reads the affine output as given (f32, no copy)
    assert _dw_step(s, "conv1").inputs[0] == "affine0.out"
    assert t["affine0.out"].dtype is DType.F32 and t["affine0.out"].role is Role.SAVED
    # the input quantizer and the affine have no backward
    assert not [st for st in s.steps
                if st.layer in ("quant0", "affine0") and st.phase is not Phase.FORWARD]
    # conv geometry reaches the kernels
    (c3,) = _steps(s, "conv_fwd_xnor", "conv3")
    assert (c3.attrs["strides"], c3.attrs["pads"], c3.attrs["oh"]) == ((2, 2), (1, 1, 1, 1), 3)


def test_mixed_graph_real_layers_save_f16_and_gradients_fan_out():
    s = _sched(residual())
    t = s.tensors
    # real layers save an f16 copy under save_bits; binary layers keep their packed input
    assert _dw_step(s, "conv0").inputs[0] == "conv0.x_saved"
    assert t["conv0.x_saved"].dtype is DType.F16 and t["conv0.x_saved"].nbytes == B * 3 * 64 * 2
    assert _dw_step(s, "conv1s").inputs[0] == "conv1s.x_saved"
    assert _dw_step(s, "fc3").inputs[0] == "fc3.x_saved"
    assert _dw_step(s, "conv1").inputs[0] == "sign1.out" and t["sign1.out"].dtype is DType.BIT
    assert t["fc3.dW"].dtype is DType.F32 and t["fc3.db"].dtype is DType.F32
    (dw,) = _steps(s, "dense_dw_f32", "fc3")
    assert dw.inputs == ("fc3.x_saved", "fc3.d_out")              # no STE mask on a real layer
    # relu0.out feeds sign1 and pool1s: its gradient is the sum of two contributions
    (acc,) = [st for st in s.steps if st.outputs == ("relu0.d_out",)]
    assert acc.kernel.name == "grad_add" and set(acc.inputs) == {"sign1.d_in", "pool1s.d_in"}
    # add2 = bn2 + add1: identity contributions are views, add1 sums its two
    assert t["bn2.d_out"].alias_of == "add2.d_out"
    (acc,) = [st for st in s.steps if st.outputs == ("add1.d_out",)]
    assert set(acc.inputs) == {"add2.d_out", "sign2.d_in"}
    assert t["bn1.d_out"].alias_of == "add1.d_out" and t["bn1s.d_out"].alias_of == "add1.d_out"
    assert t["relu0.mask"].dtype is DType.BIT
    std = _sched(residual(), "standard")
    (rb,) = _steps(std, "relu_bwd_out")
    assert rb.inputs == ("relu0.d_out", "relu0.out")
    assert _dw_step(std, "conv0").inputs[0] == INPUT


def test_three_way_fanout_accumulates_eagerly():
    g = _G("fan3", (8,))
    x = g.bn("bn0", g.dense("fc0", INPUT, 16, binary=False))
    a = g.dense("fa", x, 16, binary=False)
    b = g.dense("fb", x, 16, binary=False)
    c = g.dense("fc", x, 16, binary=False)
    y = g.add("add1", K.ADD, (a, b), (16,))
    y = g.add("add2", K.ADD, (y, c), (16,))
    g.unary("softmax", K.SOFTMAX, y)
    s = _sched(g.build())
    adds = [st for st in s.steps if st.kernel.name == "grad_add"]
    assert [st.outputs for st in adds] == [("bn0.d_out_acc2",), ("bn0.d_out",)]
    assert adds[0].inputs == ("fc.d_in", "fb.d_in") and adds[1].inputs == ("bn0.d_out_acc2",
                                                                           "fa.d_in")
    # add2 holds the logits' gradient; add1's and the dense layers' are views of it
    assert s.tensors["fa.d_out"].alias_of == "add2.d_out" == s.tensors["fc.d_out"].alias_of


def test_weight_gradients_die_at_the_update_right_after_their_layer():
    for algorithm in ALGOS:
        s = _sched(convnet(), algorithm)
        for name, x in s.tensors.items():
            if name.endswith((".dW", ".db", ".dbeta", ".dgamma")):
                prod = s.producer(name)
                (cons,) = s.consumers(name)
                assert cons.phase is Phase.UPDATE and cons.layer == prod.layer
                assert cons.index - prod.index <= 3, (name, prod.index, cons.index)


def test_dx_reads_pre_update_weights_and_update_follows():
    s = _sched(mlp())
    (dx,) = _steps(s, "dense_dx_po2", "fc2")
    (up,) = _steps(s, "adam_update", "fc2")
    (dw,) = _steps(s, "dense_dw_bin", "fc2")
    (po2,) = _steps(s, "po2_quantize", "fc2")
    assert po2.index < dw.index < dx.index < up.index == dx.index + 1
    assert dx.inputs == ("fc2.d_out_q", "fc2.po2_bias", "fc2.W") and dx.outputs == ("sign1.d_out",)


def test_loss_step_and_logits_without_softmax():
    s = _sched(brevitas_like())
    (loss,) = _steps(s, "softmax_xent")
    assert loss.phase is Phase.LOSS and loss.inputs == ("affine3.out", "labels")
    assert loss.outputs == ("loss", "probs", "affine3.d_out")
    assert s.tensors["probs"].shape == (B, 10) and s.tensors["loss"].nbytes == 4
    (ab,) = _steps(s, "affine_bwd")
    assert ab.outputs == ("bn2.d_out",) and ab.attrs["scale"][-1] == 2.0
    # sign0 acts on the input: it packs bits for fc1 but has neither mask nor backward
    assert s.tensors["sign0.out"].dtype is DType.BIT and "sign0.mask" not in s.tensors
    s = _sched(mlp())
    (loss,) = _steps(s, "softmax_xent")
    assert loss.outputs == ("loss", "softmax.out", "bn3.d_out") and loss.attrs["classes"] == 10
    # the loss scale 2^(8 + floor(log2 B)) of the f16 gradient path (l1 BN); none in f32
    assert loss.attrs["scale"] == 2.0 ** (8 + math.floor(math.log2(B)))
    assert _steps(_sched(mlp(), algorithm="standard"), "softmax_xent")[0].attrs["scale"] == 1.0
    (up,) = _steps(_sched(mlp(), algorithm="standard"), "adam_update", "fc2")
    assert up.attrs["g_scale"] == 1.0


def test_update_attrs_carry_hyperparameters_and_state_ids():
    g = mlp()
    cfg = make_config("proposed", batch=B, optimizer="sgd", lr=0.01)
    s = build_schedule(g, cfg)
    ids = {st.name: st.tensor_id for st in state_tensors(g, cfg)}
    (up,) = _steps(s, "sgd_update", "bn2")
    assert up.inputs == ("bn2.beta", "bn2.dbeta", "bn2.beta.m")
    assert up.attrs["lr"] == 0.01 and up.attrs["momentum"] == 0.9
    assert up.attrs["tensor_id"] == ids["bn2.beta"]
    assert up.attrs["moment_ids"] == (ids["bn2.beta.m"],)
    assert up.attrs["stochastic"] is True
    (bn,) = _steps(_sched(g, bn="l2"), "bn_l2_fwd", "bn1")
    assert bn.attrs["eps"] == pytest.approx(1e-4) and bn.attrs["momentum"] == 0.9


def test_table_is_deterministic_across_builds_and_processes():
    g = residual()
    a, b = _sched(g), _sched(residual())
    assert a == b and schedule_table(a) == schedule_table(b)
    table = schedule_table(a)
    lines = table.splitlines()
    assert len(lines) == len(a.steps) + 1
    assert lines[1].split()[:4] == ["0", "forward", "conv_fwd_f32", "conv0"]
    code = ("import sys; sys.path.insert(0, %r); import test_schedule as t; "
            "from bnnc.compiler.schedule import schedule_table; "
            "print(schedule_table(t._sched(t.residual())), end='')" % os.path.dirname(__file__))
    outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, env={**os.environ, "PYTHONHASHSEED": seed}).stdout
            for seed in ("1", "2")]
    assert outs[0] == outs[1] == table


# ---------------------------------------------------------------------------------- errors
def test_softmax_inside_the_graph_is_rejected():
    g = _G("bad", (8,))
    x = g.unary("softmax1", K.SOFTMAX, g.dense("fc1", INPUT, 8))
    g.dense("fc2", x, 4)
    with pytest.raises(UnsupportedModelError, match="softmax1"):
        _sched(g.build())


def test_input_quant_after_trainable_layers_is_rejected():
    g = _G("bad", (8,))
    x = g.dense("fc1", INPUT, 8, binary=False)
    x = g.add("quant1", K.INPUT_QUANT, x, (8,), {"scale": 1.0, "zero_point": 0.0, "bits": 8,
                                                 "signed": True, "narrow": False})
    g.unary("softmax", K.SOFTMAX, x)
    with pytest.raises(UnsupportedModelError, match="quant1"):
        _sched(g.build())


def test_inconsistent_shapes_name_the_layer():
    g = _G("bad", (3, 8, 8))
    g.add("conv1", K.CONV, INPUT, (4, 8, 8), {"binary": True, "strides": (1, 1), "pads": (0,) * 4},
          {"W": np.ones((4, 3, 3, 3))})                 # 'valid' 3x3 gives 6x6, not 8x8
    g.add("gap1", K.GLOBAL_AVGPOOL, "conv1", (4, 1, 1))
    with pytest.raises(ModelError, match="conv1.*6, 6"):
        _sched(g.build())


def test_nothing_to_train_is_rejected():
    g = _G("bad", (8,))
    g.unary("softmax", K.SOFTMAX, g.unary("relu1", K.RELU, INPUT))
    with pytest.raises(ModelError, match="nothing to train"):
        _sched(g.build())


# ---------------------------------------------------------------------------------- zoo models
def test_zoo_and_shared_models_lower():
    zoo = pytest.importorskip("bnnc.compiler.zoo")
    frontend = pytest.importorskip("bnnc.compiler.frontend")
    small = {"resnete18": dict(width=0.125, image_size=32), "birealnet18": dict(width=0.125,
                                                                              image_size=32)}
    for name in ("mlp", "tfc", "cnv", "binarynet", "resnete18", "birealnet18"):
        g = frontend.load_model(zoo.build_zoo_model(name, **small.get(name, dict(width=0.25))))
        for algorithm in ALGOS:
            cfg = make_config(algorithm, batch=2)
            _check_invariants(build_schedule(g, cfg), g, cfg)


def test_full_size_mlp_bytes_match_the_paper_dims():
    # ALGORITHM.md §5 MLP at B=100: the proposed step keeps 1-bit inputs of fc2..fc5 (256 bits per
    # sample = 4 words) and 5-bit-in-a-byte PO2 codes of the 256-wide gradients
    g = _G("mlp", (784,))
    x = INPUT
    for i, n in enumerate((256, 256, 256, 256, 10), start=1):
        x = g.bn(f"bn{i}", g.dense(f"fc{i}", x, n))
        if n != 10:
            x = g.unary(f"sign{i}", K.SIGN, x)
    g.unary("softmax", K.SOFTMAX, x)
    graph = g.build()
    assert sum(lay.params["W"].size for lay in graph.layers if "W" in lay.params) == 399_872
    s = build_schedule(graph, make_config("proposed", batch=100))
    for i in (2, 3, 4, 5):
        x = s.tensors[_dw_step(s, f"fc{i}").inputs[0]]
        assert x.dtype is DType.BIT and x.nbytes == 100 * 4 * 8
    assert s.tensors["fc3.d_out_q"].nbytes == 100 * 256
    wbytes = sum(x.nbytes for x in s.tensors.values() if x.name.endswith(".W"))
    assert wbytes == 399_872 * 2                                   # bf16 latent weights


def test_replace_config_batch_scales_activation_bytes():
    g = mlp()
    s1 = _sched(g)
    s2 = build_schedule(g, replace(make_config("proposed", batch=B), batch=2 * B))
    for n, x in s1.tensors.items():
        y = s2.tensors[n]
        if x.role in (Role.SAVED, Role.SCRATCH, Role.GRAD, Role.INPUT, Role.LABEL) and \
                x.shape[0] == B:
            assert y.nbytes == 2 * x.nbytes, n
        elif x.role.persistent:
            assert y == x


def test_proposed_plans_smaller_than_standard():
    planner = pytest.importorskip("bnnc.compiler.planner")
    for name, f in GRAPHS.items():
        totals = {}
        for algorithm in ALGOS:
            live, plan = planner.plan_schedule(_sched(f(), algorithm))
            totals[algorithm] = plan.arena_nbytes + plan.state_nbytes
        assert totals["proposed"] < totals["standard"], (name, totals)


@pytest.mark.parametrize("batch", [4, 5, 9])
def test_proposed_fuses_conv_and_max_pool_over_batch_chunks(batch):
    """conv -> 2x2 max-pool with a 1-bit argmax is one conv_pool_fwd step over chunks of
    ceil(B / 4) samples: the conv's full output never exists, only one chunk of it."""
    s = build_schedule(pooled(), make_config("proposed", batch=batch))
    chunk = -(-batch // 4)
    for conv, pool, src, shape in (("conv1", "pool1", INPUT, (8, 8, 8)),
                                   ("conv2", "pool2", "sign1.out", (16, 4, 4))):
        (st,) = _steps(s, "conv_pool_fwd", conv)
        assert st.inputs[0] == src
        assert st.outputs == (f"{pool}.out", f"{conv}.chunk", f"{pool}.argmax")
        assert s.tensors[f"{conv}.chunk"].shape == (chunk,) + shape
        assert s.tensors[f"{conv}.chunk"].nbytes == chunk * math.prod(shape) * 4
        assert f"{conv}.out" not in s.tensors
        assert not _steps(s, layer=pool, phase="forward")
        assert not [t for t in _steps(s, layer=conv) if t.kernel.name.startswith("conv_fwd")]
    assert [t.index for t in s.steps] == list(range(len(s.steps)))
    s.verify()


def test_standard_and_unfusable_pools_keep_separate_steps():
    """The standard algorithm (index argmax), an overlapping pool and a conv output read twice
    keep the conv's full output and a pool step of their own."""
    std = build_schedule(pooled(), make_config("standard", batch=B))
    assert not _steps(std, "conv_pool_fwd") and "conv1.out" in std.tensors
    assert [t.layer for t in _steps(std, "maxpool_fwd_widx")] == ["pool1", "pool2"]
    conv = _sched(convnet())                # conv3 -> 3x3/2 pool: overlapping windows
    assert not _steps(conv, "conv_pool_fwd") and _steps(conv, "maxpool_fwd_widx", "pool3")
    g = _G("twice", (3, 8, 8))
    c = g.conv("conv1", INPUT, 8, pad=1)
    x = g.add("add1", K.ADD, (g.pool("pool1", c), g.pool("avg1", c, K.AVGPOOL)), (8, 4, 4))
    x = g.bn("bn3", g.dense("fc3", g.flatten("flatten1", g.unary("sign2", K.SIGN, x)), 10))
    g.unary("softmax", K.SOFTMAX, x)
    assert not _steps(_sched(g.build()), "conv_pool_fwd")


def bnsign() -> Graph:
    """conv -> BN -> sign twice (a real first layer, then a binary one on packed bits, 'same'
    padding), then a conv whose output is 1x1 (spatial 1), flatten, dense, BN, softmax."""
    g = _G("bnsign", (3, 8, 8))
    x = g.unary("sign1", K.SIGN, g.bn("bn1", g.conv("conv1", INPUT, 8, pad=1)))     # 8x8x8
    x = g.unary("sign2", K.SIGN, g.bn("bn2", g.conv("conv2", x, 16, pad=1)))        # 16x8x8
    x = g.pool("pool2", x, k=4, stride=4)                                           # 16x2x2
    x = g.unary("sign3", K.SIGN, g.bn("bn3", g.conv("conv3", x, 32, k=2)))          # 32x1x1
    x = g.bn("bn4", g.dense("fc4", g.flatten("flatten3", x), 10))
    g.unary("softmax", K.SOFTMAX, x)
    return g.build()


@pytest.mark.parametrize("batch", [4, 33, 100])
def test_proposed_fuses_conv_bn_sign_over_batch_chunks(batch):
    """conv -> l1 BN -> packed sign is one conv_bn_sign_fwd step over chunks of ceil(B / 32)
    samples: neither the conv's nor the BN's full f32 output exists, only one chunk and the
    per-channel lane sums (C x 64 f32), and for an XNOR conv its exact integer outputs in f16."""
    s = build_schedule(bnsign(), make_config("proposed", batch=batch))
    chunk = -(-batch // 32)
    for conv, bn, sign, src, (c, h, w) in (("conv1", "bn1", "sign1", INPUT, (8, 8, 8)),
                                           ("conv2", "bn2", "sign2", "sign1.out", (16, 8, 8))):
        (st,) = _steps(s, "conv_bn_sign_fwd", bn)
        w_in = f"{conv}.W" if src == INPUT else f"{conv}.Wb"
        assert st.inputs == (f"{bn}.beta", f"{bn}.running_mean", f"{bn}.running_psi", src, w_in)
        assert st.outputs == (f"{sign}.out", f"{bn}.running_mean", f"{bn}.running_psi",
                              f"{bn}.mu", f"{bn}.psi", f"{bn}.s", f"{sign}.mask", f"{bn}.chunk",
                              f"{bn}.lanes") + ((f"{bn}.x16",) if bn == "bn2" else ())
        assert s.tensors[f"{bn}.chunk"].shape == (chunk, c, h, w)
        assert s.tensors[f"{bn}.chunk"].nbytes == chunk * c * h * w * 4
        assert s.tensors[f"{bn}.lanes"].nbytes == c * 64 * 4
        # the saved outputs keep their sizes: 1 bit per element (rows of 64-bit words per sample)
        assert s.tensors[f"{bn}.s"].nbytes == batch * math.ceil(c * h * w / 64) * 8
        assert s.tensors[f"{sign}.out"].nbytes == batch * h * w * math.ceil(c / 64) * 8
        assert f"{conv}.out" not in s.tensors and f"{bn}.out" not in s.tensors
        assert not _steps(s, layer=sign, phase="forward") and not _steps(s, "bn_l1_fwd", bn)
        assert st.attrs["chunk"] == chunk and st.attrs["spatial"] == h * w
        if conv == "conv2":
            # an XNOR conv of 8 * 9 = 72 terms: exact integers, kept once in f16 (2 bytes each)
            assert st.outputs[-1] == "bn2.x16" and s.tensors["bn2.x16"].dtype is DType.F16
            assert s.tensors["bn2.x16"].nbytes == batch * c * h * w * 2
        else:
            # a real first layer's outputs are not integers: the conv runs in each pass
            assert st.outputs[-1] == "bn1.lanes" and "bn1.x16" not in s.tensors
    # the backward reads what the unfused steps saved
    assert _steps(s, "bn_l1_bwd", "bn2")[0].inputs[1:] == ("bn2.s", "bn2.psi")
    assert _steps(s, "sign_bwd_mask", "sign2")[0].inputs[1] == "sign2.mask"
    # a 1x1 conv output (spatial 1: the BN's vector loops) keeps its three steps
    assert not _steps(s, "conv_bn_sign_fwd", "bn3") and "conv3.out" in s.tensors
    assert [t.index for t in s.steps] == list(range(len(s.steps)))
    s.verify()


def test_standard_and_unfusable_bns_keep_separate_steps():
    """The standard algorithm (l2 BN), l1 BN without packed sign bits (--no-save-bits), a BN
    between a pool and a sign (BinaryNet: the pool is fused with its conv instead) and a conv or
    BN output with another reader keep the separate steps and the full f32 outputs."""
    std = build_schedule(bnsign(), make_config("standard", batch=B))
    assert not _steps(std, "conv_bn_sign_fwd") and "conv1.out" in std.tensors
    unpacked = _sched(bnsign(), save_bits=False)
    assert not _steps(unpacked, "conv_bn_sign_fwd") and "conv1.out" in unpacked.tensors
    pool = _sched(pooled())
    assert not _steps(pool, "conv_bn_sign_fwd") and _steps(pool, "bn_l1_fwd", "bn1")
    # the conv's f32 output read again (a residual add), then the BN's: sign1 is still packed
    # (conv2 reads it), so only the second reader stops the fusion
    for again in ("conv1", "bn1"):
        g = _G("again", (3, 8, 8))
        c = g.conv("conv1", INPUT, 8, pad=1)
        b1 = g.bn("bn1", c)
        x2 = g.conv("conv2", g.unary("sign1", K.SIGN, b1), 8, pad=1)
        x = g.add("add2", K.ADD, (x2, c if again == "conv1" else b1), (8, 8, 8))
        x = g.unary("sign2", K.SIGN, g.bn("bn2", x))
        x = g.bn("bn3", g.dense("fc3", g.flatten("flatten2", x), 10))
        g.unary("softmax", K.SOFTMAX, x)
        s = _sched(g.build())
        assert s.tensors["sign1.out"].dtype is DType.BIT
        assert not _steps(s, "conv_bn_sign_fwd") and f"{again}.out" in s.tensors


def test_no_fuse_keeps_every_step_and_the_full_tensors():
    """`--no-fuse` (cfg.fuse False): neither fusion applies, the conv outputs exist whole, and
    the config names the switch only when it is off (a default build's manifest and state hash
    are what they were before the switch existed)."""
    for graph, fused in ((pooled(), "conv_pool_fwd"), (bnsign(), "conv_bn_sign_fwd")):
        on, off = _sched(graph), _sched(graph, fuse=False)
        assert _steps(on, fused) and not _steps(off, fused)
        assert "conv1.out" not in on.tensors and "conv1.out" in off.tensors
        assert [t.kernel.name for t in _steps(off, layer="conv1", phase="forward")] == [
            "conv_fwd_signw"]
        off.verify()
    assert "fuse" not in make_config("proposed").as_dict()
    assert make_config("proposed", fuse=False).as_dict()["fuse"] is False
