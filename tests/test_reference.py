"""runtime/reference.py: hand examples, formulas computed independently in the test, and central
finite differences in float64 for the standard algorithm's gradients."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bnnc.compiler.config import check_config_for_graph, make_config
from bnnc.compiler.errors import ConfigError, DataError
from bnnc.compiler.ir import INPUT, Graph, Layer, LayerKind as K
from bnnc.compiler.state import state_tensors
from bnnc.runtime import reference as ref

BN_ATTRS = {"eps": 1e-4, "momentum": 0.9}


def _bn(name, src, c, rng=None, shape=None):
    """BN over c channels; `shape` is the per-sample shape when it is not (c,)."""
    if rng is None:
        p = {"gamma": np.ones(c), "beta": np.zeros(c), "mean": np.zeros(c), "var": np.ones(c)}
    else:
        p = {"gamma": rng.uniform(0.5, 1.5, c), "beta": rng.uniform(-0.5, 0.5, c),
             "mean": rng.uniform(-0.1, 0.1, c), "var": rng.uniform(0.8, 1.2, c)}
    return Layer(name, K.BATCHNORM, (src,), shape or (c,), BN_ATTRS,
                 {k: np.asarray(v, np.float32) for k, v in p.items()})


def _dense(name, src, n_in, n_out, rng, *, binary, bias=False):
    params = {"W": (rng.standard_normal((n_in, n_out)) / math.sqrt(n_in)).astype(np.float32)}
    if bias:
        params["b"] = rng.uniform(-0.2, 0.2, n_out).astype(np.float32)
    return Layer(name, K.DENSE, (src,), (n_out,), {"binary": binary}, params)


def _graph(name, input_shape, layers) -> Graph:
    g = Graph(name, tuple(input_shape), tuple(layers))
    g.verify()
    return g


def small_mlp(seed=0, sizes=(12, 16, 16, 5)) -> Graph:
    """Binary MLP in the paper's pattern: (dense -> BN -> sign)* -> dense -> BN -> softmax."""
    rng = np.random.default_rng(seed)
    layers, src = [], INPUT
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]), 1):
        w = _dense(f"fc{i}", src, a, b, rng, binary=True)
        w.params["W"][0, :2] = [1.5, -1.25]           # outside the STE window: their dW must be 0
        layers += [w, _bn(f"bn{i}", f"fc{i}", b)]
        src = f"bn{i}"
        if i < len(sizes) - 1:
            layers.append(Layer(f"sign{i}", K.SIGN, (src,), (b,)))
            src = f"sign{i}"
    layers.append(Layer("softmax", K.SOFTMAX, (src,), (sizes[-1],)))
    return _graph("small_mlp", (sizes[0],), layers)


def _batch(graph, b, seed):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (b,) + graph.input_shape).astype(np.float32)
    return x, rng.integers(0, graph.num_classes, b)


# ---- l1 batch norm -------------------------------------------------------------------------------

_BN_X = np.array([[1, 0.5], [2, 0.5], [3, -0.5], [6, -0.5]], np.float32)


def _identity_bn_graph():
    eye = np.eye(2, dtype=np.float32)
    layers = [Layer("fc1", K.DENSE, (INPUT,), (2,), {"binary": False}, {"W": eye}),
              _bn("bn1", "fc1", 2),
              Layer("softmax", K.SOFTMAX, ("bn1",), (2,))]
    return _graph("bnnet", (2,), layers)


def test_l1_batchnorm_forward_backward_by_hand():
    g = _identity_bn_graph()
    cfg = make_config("proposed", batch=4, po2=False, binary_dw=False, save_bits=False,
                      state_dtype="f32")
    # channel 0: Y = 1, 2, 3, 6 -> mu 3, |Y - mu| = 2, 1, 0, 3 -> Psi 1.5, Xh = -4/3, -2/3, 0, 2
    x = _BN_X
    labels = np.array([0, 1, 1, 0])
    st = ref.init_state(g, cfg)
    st.tensors["bn1.beta"][:] = [0.25, -0.5]
    out = ref.forward_backward(g, cfg, st.tensors, x, labels)
    assert out["bn1.mu"].tolist() == [3.0, 0.0]
    assert out["bn1.psi"].tolist() == [1.5, 0.5]
    np.testing.assert_allclose(out["bn1.xh"][:, 0], [-4 / 3, -2 / 3, 0, 2], rtol=1e-6)
    assert out["bn1.xh"][:, 1].tolist() == [1, 1, -1, -1]
    assert out["bn1.s"].tolist() == [[-1, 1], [-1, 1], [1, -1], [1, -1]]   # sign(0) = +1
    np.testing.assert_allclose(out["bn1.out"], out["bn1.xh"] + [0.25, -0.5], rtol=1e-6)
    # running stats: 0.9 * init + 0.1 * batch; init psi = sqrt(var + eps)
    np.testing.assert_allclose(out["bn1.running_mean"], [0.3, 0.0], rtol=1e-6)
    np.testing.assert_allclose(out["bn1.running_psi"],
                               0.9 * math.sqrt(1 + 1e-4) + 0.1 * np.array([1.5, 0.5]), rtol=1e-6)
    # backward: G = (softmax(Z) - onehot) / B * 2^s, H = f16(G) / Psi,
    # dY = H - mean H - s mean(H s); the loss scale 2^s = 2^(8 + floor(log2 B)) = 2^10 under l1 BN
    # (f16 gradient path)
    z = out["bn1.out"].astype(np.float64)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    G = (p - np.eye(2)[labels]) / 4 * 1024
    np.testing.assert_allclose(out["bn1.d_out"], G, rtol=1e-5)
    H = G.astype(np.float16).astype(np.float64) / [1.5, 0.5]
    s = np.where(out["bn1.xh"] >= 0, 1.0, -1.0)
    dY = H - H.mean(0) - s * (H * s).mean(0)
    np.testing.assert_allclose(out["fc1.d_out"], dY, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(out["bn1.dbeta"], G.sum(0), rtol=1e-5, atol=1e-8)
    assert "bn1.dgamma" not in out                      # l1 BN has no gamma


def test_l1_batchnorm_constant_channel_is_dead_not_nan():
    g = _identity_bn_graph()
    cfg = make_config("proposed", batch=3, po2=False, binary_dw=False)
    x = np.array([[1, 2], [1, 3], [1, 4]], np.float32)       # channel 0 constant: Psi = 0
    new, out = ref.train_step(g, cfg, ref.init_state(g, cfg), x, np.array([0, 1, 0]))
    assert out["bn1.psi"][0] == 0 and np.all(out["bn1.xh"][:, 0] == 0)
    assert np.all(out["fc1.d_out"][:, 0] == 0)
    assert all(np.all(np.isfinite(v)) for v in new.tensors.values())


# ---- binary layers under the proposed algorithm --------------------------------------------------

def test_binary_dw_sign_scale_mask_and_po2_feed():
    g = small_mlp()
    cfg = make_config("proposed", batch=8)
    x, labels = _batch(g, 8, 1)
    st = ref.init_state(g, cfg)
    out = ref.forward_backward(g, cfg, st.tensors, x, labels)
    from bnnc.compiler import numerics as nx
    for i, n_in in ((1, 12), (2, 16), (3, 16)):
        dy = out[f"fc{i}.d_out"]
        codes, b = nx.po2_quantize(dy)
        q = out[f"fc{i}.d_out_q"]
        assert np.array_equal(q, nx.po2_decode(codes, b)) and int(out[f"fc{i}.po2_bias"]) == b
        assert np.all(np.abs(np.log2(np.abs(q)) % 1) == 0)           # every entry a power of two
        xin = x if i == 1 else out[f"sign{i - 1}.out"]
        w = st.tensors[f"fc{i}.W"]
        want = np.where(xin.T.astype(np.float64) @ q >= 0, 1.0, -1.0) / math.sqrt(w.size)
        want = want * (np.abs(w) <= 1)
        np.testing.assert_allclose(out[f"fc{i}.dW"], want, rtol=1e-7)
        assert out[f"fc{i}.dW"][0, 0] == 0 and out[f"fc{i}.dW"][0, 1] == 0   # |W| > 1 masked
        assert np.all(np.abs(out[f"fc{i}.dW"][1:]) == np.float32(1 / math.sqrt(w.size)))
    # dX of a binary layer = Q Wb^T, with Wb = sign(W) (sign(0) = +1)
    wb = np.where(st.tensors["fc3.W"] >= 0, 1.0, -1.0)
    want = (out["fc3.d_out_q"].astype(np.float64) @ wb.T) * out["sign2.mask"]
    np.testing.assert_allclose(out["bn2.d_out"], want, rtol=1e-6, atol=1e-12)
    assert "fc1.d_in" not in out and not any(k.startswith("input.") for k in out)


def test_sign_ste_mask_and_real_layer_saved_input_in_f16():
    rng = np.random.default_rng(3)
    layers = [_dense("fc1", INPUT, 6, 4, rng, binary=False, bias=True), _bn("bn1", "fc1", 4),
              Layer("sign1", K.SIGN, ("bn1",), (4,)),
              _dense("fc2", "sign1", 4, 3, rng, binary=True), _bn("bn2", "fc2", 3),
              Layer("softmax", K.SOFTMAX, ("bn2",), (3,))]
    g = _graph("realfirst", (6,), layers)
    x, labels = _batch(g, 10, 4)
    x[0, 0] = 0.1                                           # not a binary16 value
    for save_bits in (True, False):
        cfg = make_config("proposed", batch=10, save_bits=save_bits)
        out = ref.forward_backward(g, cfg, ref.init_state(g, cfg).tensors, x, labels)
        z = out["bn1.out"]
        assert np.array_equal(out["sign1.mask"], (np.abs(z) <= 1).astype(np.int8))
        assert np.array_equal(out["sign1.out"], np.where(z >= 0, 1, -1))
        np.testing.assert_array_equal(out["bn1.d_out"], out["sign1.d_out"] * out["sign1.mask"])
        xs = x.astype(np.float16).astype(np.float64) if save_bits else x.astype(np.float64)
        # a real layer: no STE mask, no PO2, no binarization of dW
        np.testing.assert_allclose(out["fc1.dW"], xs.T @ out["fc1.d_out"], rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(out["fc1.db"], out["fc1.d_out"].sum(0), rtol=1e-5, atol=1e-9)
        assert "fc1.d_out_q" not in out and "fc2.d_out_q" in out


# ---- updates and storage -------------------------------------------------------------------------

@pytest.mark.parametrize("state_dtype", ["bf16", "f16"])
def test_16bit_adam_three_steps_change_every_layer(state_dtype):
    g = small_mlp(sizes=(64, 256, 256, 10))     # N_W = 65536 hidden layer: (1-b2) g^2 ~ 1.5e-8
    cfg = make_config("proposed", batch=16, state_dtype=state_dtype)
    st = ref.init_state(g, cfg)
    first = st
    for step in range(3):
        st, out = ref.train_step(g, cfg, st, *_batch(g, 16, 10 + step))
    assert st.step == 3
    specs = state_tensors(g, cfg)
    for spec in specs:
        v = st.tensors[spec.name]
        assert v.dtype == np.float32 and v.shape == spec.shape and np.all(np.isfinite(v)), spec.name
        cast = v.astype(np.float16).astype(np.float32) if state_dtype == "f16" else \
            (v.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
        assert np.array_equal(cast, v), f"{spec.name} holds values outside {state_dtype}"
        if spec.kind == "param":
            assert not np.array_equal(v, first.tensors[spec.name]), f"{spec.name} never changed"
    for name in ("fc1.W", "fc2.W", "fc3.W"):
        changed = np.mean(st.tensors[name] != first.tensors[name])
        assert changed > 0.5, f"{name}: only {changed:.0%} of the weights moved"
    if state_dtype == "bf16":
        # bf16 does not underflow (1-b2) g^2 ~ 1.5e-8 (f16 would); masked weights get g = 0
        live = np.abs(first.tensors["fc2.W"]) <= 1
        assert np.all(st.tensors["fc2.W.v"][live] > 0) and not st.tensors["fc2.W.v"][~live].any()


def test_adam_update_formula_f32():
    g = _identity_bn_graph()
    cfg = make_config("standard", batch=4)
    st = ref.init_state(g, cfg)
    x, labels = _BN_X, np.array([0, 1, 1, 0])
    s1, o1 = ref.train_step(g, cfg, st, x, labels)
    s2, o2 = ref.train_step(g, cfg, s1, x, labels)
    gr1, gr2 = o1["fc1.dW"].astype(np.float64), o2["fc1.dW"].astype(np.float64)
    # PyTorch's Adam recomputed step by step in float64 from the reported gradients. bnnc computes
    # the bias corrections 1 - b^t in float32 from b rounded to float32 (no doubles on an M4):
    # 1 - f32(0.999) = 0.00099998713, 1.3e-5 below 0.001, which moves the step by up to 6.6e-6
    # relative; a formula error (eps placement, a missing correction) would be orders larger.
    m1, v1 = 0.1 * gr1, 0.001 * gr1**2
    w1 = st.tensors["fc1.W"] - 1e-3 * (m1 / 0.1) / (np.sqrt(v1 / 0.001) + 1e-7)
    np.testing.assert_allclose(s1.tensors["fc1.W"], w1, rtol=1e-5, atol=1e-9)
    m2, v2 = 0.9 * m1 + 0.1 * gr2, 0.999 * v1 + 0.001 * gr2**2
    w2 = w1 - 1e-3 * (m2 / 0.19) / (np.sqrt(v2 / (1 - 0.999**2)) + 1e-7)
    np.testing.assert_allclose(s2.tensors["fc1.W"], w2, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(s2.tensors["fc1.W.m"], m2, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(s2.tensors["fc1.W.v"], v2, rtol=1e-5, atol=1e-15)


def test_sgd_momentum_formula():
    g = _identity_bn_graph()
    cfg = make_config("standard", batch=4, optimizer="sgd", lr=0.1)
    st = ref.init_state(g, cfg)
    x, labels = _BN_X, np.array([0, 1, 1, 0])
    s1, o1 = ref.train_step(g, cfg, st, x, labels)
    s2, o2 = ref.train_step(g, cfg, s1, x, labels)
    m2 = 0.9 * o1["fc1.dW"].astype(np.float64) + o2["fc1.dW"]
    np.testing.assert_allclose(s2.tensors["fc1.W.m"], m2, rtol=1e-6)
    w2 = st.tensors["fc1.W"] - 0.1 * o1["fc1.dW"] - 0.1 * m2
    np.testing.assert_allclose(s2.tensors["fc1.W"], w2, rtol=1e-5, atol=1e-9)


def test_stochastic_rounding_is_reproducible():
    g = small_mlp()
    batches = [_batch(g, 8, 20 + i) for i in range(2)]

    def run(seed):
        cfg = make_config("proposed", batch=8, seed=seed)
        st = ref.init_state(g, cfg)
        for x, y in batches:
            st, _ = ref.train_step(g, cfg, st, x, y)
        return st

    a, b, c = run(0), run(0), run(1)
    assert all(np.array_equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert any(not np.array_equal(a.tensors[k], c.tensors[k]) for k in a.tensors)


def test_bop_flip_rule_by_hand():
    """Scaled momentum: a 1-bit gradient adds exactly +-1; flips need |m| > threshold."""
    cfg = make_config("proposed", optimizer="bop", bop_threshold=1.5)      # gamma 1e-4
    s = np.float32(1 / np.sqrt(5))
    w = np.array([1, 1, -1, -1, 1], np.int8)
    g = s * np.array([1, -1, -1, 1, 1], np.float32)
    m0 = np.array([1, 0, -1, 0.9, 0], np.float32)
    # m = 0.9999 m0 + [1, -1, -1, 1, 1] = [1.9999, -1, -1.9999, 1.89991, 1]; |m| > 1.5 for
    # elements 0, 2, 3; flip where sign(m) == sign(w): elements 0 and 2
    new_w, mom = ref.UPDATE["bop"](cfg, 1, w, g, {"m": m0})
    assert new_w.tolist() == [-1, 1, 1, -1, 1] and new_w.dtype == np.int8
    want = np.float32(0.9999) * m0 + np.array([1, -1, -1, 1, 1], np.float32)
    assert np.array_equal(mom["m"], want)


def test_bop_float_gradients_are_scaled_by_their_mean_magnitude():
    cfg = make_config("proposed", optimizer="bop", binary_dw=False, bop_threshold=0.75)
    w = np.array([1, -1, -1, 1], np.int8)
    g = np.array([0.5, -0.25, 0.25, -0.5], np.float32)       # mean |g| = 0.375
    new_w, mom = ref.UPDATE["bop"](cfg, 1, w, g, {"m": np.zeros(4, np.float32)})
    np.testing.assert_allclose(mom["m"], g / 0.375, rtol=1e-6)
    assert new_w.tolist() == [-1, -1, -1, 1]                 # only |m| = 4/3 with sign(m) == w
    _, zero = ref.UPDATE["bop"](cfg, 1, w, 0 * g, {"m": np.ones(4, np.float32)})
    assert np.array_equal(zero["m"], np.full(4, 0.9999, np.float32))      # no NaN from 0 / 0


def test_bop_scaled_momentum_is_larqs_bop():
    """With 1-bit gradients (+-s, s = 1/sqrt(N_W)), m = Larq's momentum / (gamma s) and
    threshold = tau / (gamma s): the same flips step by step (float64 Larq form vs the float32
    reference)."""
    gamma, thr = 0.05, 2.5
    cfg = make_config("proposed", optimizer="bop", bop_gamma=gamma, bop_threshold=thr)
    rng = np.random.default_rng(0)
    n = 400
    s = np.float32(1 / np.sqrt(n))
    w = np.where(rng.standard_normal(n) >= 0, 1, -1).astype(np.int8)
    w_larq, m_larq, mom = w.astype(np.float64), np.zeros(n), {"m": np.zeros(n, np.float32)}
    flips = 0
    for t in range(1, 60):
        g = s * np.where(rng.standard_normal(n) + 0.3 * w_larq >= 0, 1, -1).astype(np.float32)
        m_larq = (1 - gamma) * m_larq + gamma * g.astype(np.float64)
        flip = (np.abs(m_larq) > thr * gamma * float(s)) & (np.sign(m_larq) == w_larq)
        w_larq = np.where(flip, -w_larq, w_larq)
        w, mom = ref.UPDATE["bop"](cfg, t, w, g, mom)
        flips += int(flip.sum())
        assert np.array_equal(w, w_larq), t
    assert flips > 50


def test_bop_training_step_keeps_bits_and_applies_rule():
    g = small_mlp()
    cfg = make_config("proposed", batch=8, optimizer="bop", bop_threshold=0.0)
    st = ref.init_state(g, cfg)
    assert st.tensors["fc2.W"].dtype == np.int8
    assert np.array_equal(st.tensors["fc2.W"], np.where(g.layer("fc2").params["W"] >= 0, 1, -1))
    new, out = ref.train_step(g, cfg, st, *_batch(g, 8, 5))
    w0, w1 = st.tensors["fc2.W"], new.tensors["fc2.W"]
    assert w1.dtype == np.int8 and set(np.unique(w1).tolist()) <= {-1, 1}
    m = np.where(out["fc2.dW"] >= 0, 1, -1)                    # one step from 0: m = +-1
    assert np.array_equal(new.tensors["fc2.W.m"], m)
    flip = m == w0
    assert flip.any() and np.array_equal(w1, np.where(flip, -w0, w0))
    assert "fc2.W.v" not in new.tensors and "bn2.beta.v" in new.tensors   # BN params stay on Adam


# ---- max-pool routing ----------------------------------------------------------------------------

def _pool_graph(kernel=2, stride=2):
    one = np.ones((1, 1, 1, 1), np.float32)
    ho = (4 - kernel) // stride + 1
    rng = np.random.default_rng(0)
    layers = [Layer("conv1", K.CONV, (INPUT,), (1, 4, 4), {"binary": False, "strides": (1, 1),
                                                          "pads": (0, 0, 0, 0)}, {"W": one}),
              Layer("pool1", K.MAXPOOL, ("conv1",), (1, ho, ho),
                    {"kernel": (kernel, kernel), "strides": (stride, stride),
                     "pads": (0, 0, 0, 0)}),
              Layer("flatten1", K.FLATTEN, ("pool1",), (ho * ho,)),
              _dense("fc2", "flatten1", ho * ho, 3, rng, binary=False),
              Layer("softmax", K.SOFTMAX, ("fc2",), (3,))]
    return _graph("poolnet", (1, 4, 4), layers)


def test_maxpool_one_bit_routing_first_max_wins():
    g = _pool_graph()
    x = np.array([[[[1, 1, 0, 2],
                    [0, 1, 2, 0],
                    [-1, -2, 5, 5],
                    [-3, -1, 5, 5]]]], np.float32)          # ties in windows 0 and 3
    x = np.concatenate([x, -x])
    labels = np.array([0, 2])
    bit_cfg = make_config("standard", batch=2, save_bits=True)
    idx_cfg = make_config("standard", batch=2)
    st = ref.init_state(g, idx_cfg)
    o_bit = ref.forward_backward(g, bit_cfg, st.tensors, x, labels)
    o_idx = ref.forward_backward(g, idx_cfg, st.tensors, x, labels)
    mask = o_bit["pool1.argmax"]
    assert mask.shape == x.shape and mask.dtype == np.int8
    assert mask[0, 0].tolist() == [[1, 0, 0, 1], [0, 0, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    assert mask[1, 0].tolist() == [[0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0]]
    assert o_bit["pool1.out"][0, 0].tolist() == [[1, 2], [-1, 5]]
    assert o_idx["pool1.argmax"].shape == (2, 1, 2, 2)          # window index form
    d = o_bit["pool1.d_out"]
    want = np.zeros_like(x)
    for b in range(2):
        for i in range(2):
            for j in range(2):
                k = int(o_idx["pool1.argmax"][b, 0, i, j])
                want[b, 0, 2 * i + k // 2, 2 * j + k % 2] = d[b, 0, i, j]
    assert np.array_equal(o_bit["conv1.d_out"], want)
    assert np.array_equal(o_idx["conv1.d_out"], want)


def test_overlapping_maxpool_accumulates_routes():
    g = _pool_graph(kernel=3, stride=1)
    x = np.zeros((1, 1, 4, 4), np.float32)
    x[0, 0, 1, 1] = 9                                       # the max of all four 3x3 windows
    st = ref.init_state(g, make_config("standard", batch=1, save_bits=True))
    o = ref.forward_backward(g, make_config("standard", batch=1, save_bits=True), st.tensors, x,
                             np.array([1]))
    assert o["pool1.argmax"].shape == (1, 1, 2, 2)          # overlapping: index form even with bits
    want = np.zeros_like(x)
    want[0, 0, 1, 1] = o["pool1.d_out"].sum()
    np.testing.assert_allclose(o["conv1.d_out"], want, rtol=1e-6)


# ---- finite differences (standard algorithm, float64) --------------------------------------------

def _fd_graph() -> Graph:
    rng = np.random.default_rng(7)

    def w(*shape):
        fan = int(np.prod(shape[1:]))
        return (rng.standard_normal(shape) / math.sqrt(fan)).astype(np.float32)

    conv = lambda name, src, shape, cout, wshape, strides, pads, bias: Layer(  # noqa: E731
        name, K.CONV, (src,), shape, {"binary": False, "strides": strides, "pads": pads},
        {"W": w(*wshape), **({"b": rng.uniform(-.2, .2, cout).astype(np.float32)} if bias else {})})
    layers = [
        conv("conv1", INPUT, (3, 6, 6), 3, (3, 2, 3, 3), (1, 1), (1, 1, 1, 1), True),
        _bn("bn1", "conv1", 3, rng, shape=(3, 6, 6)),
        Layer("pool1", K.AVGPOOL, ("bn1",), (3, 3, 3),
              {"kernel": (3, 3), "strides": (2, 2), "pads": (1, 1, 1, 1)}),
        conv("conv2", "pool1", (3, 3, 3), 3, (3, 3, 3, 3), (1, 1), (1, 1, 1, 1), True),
        Layer("add1", K.ADD, ("pool1", "conv2"), (3, 3, 3)),
        Layer("aff1", K.AFFINE, ("add1",), (3, 3, 3), {},
              {"scale": np.array([0.5, -1.5, 2.0], np.float32),
               "bias": np.array([0.1, 0.0, -0.3], np.float32)}),
        conv("conv3", "aff1", (4, 2, 2), 4, (4, 3, 2, 2), (2, 2), (0, 0, 1, 1), False),
        Layer("flatten1", K.FLATTEN, ("conv3",), (16,)),
        Layer("fc1", K.DENSE, ("flatten1",), (5,), {"binary": False},
              {"W": w(5, 16).T.copy(), "b": rng.uniform(-.2, .2, 5).astype(np.float32)}),
        _bn("bn2", "fc1", 5, rng),
        Layer("softmax", K.SOFTMAX, ("bn2",), (5,)),
    ]
    return _graph("fdnet", (2, 6, 6), layers)


def test_standard_gradients_match_central_differences():
    g = _fd_graph()
    cfg = make_config("standard", batch=4)
    rng = np.random.default_rng(8)
    x = rng.standard_normal((4, 2, 6, 6))
    labels = np.array([0, 3, 4, 1])
    base = {k: v.astype(np.float64) for k, v in ref.init_state(g, cfg).tensors.items()}
    out = ref.forward_backward(g, cfg, base, x, labels)
    assert out["loss"].dtype == np.float64
    grad_of = {"W": "dW", "b": "db", "gamma": "dgamma", "beta": "dbeta"}
    h = 1e-6
    checked = 0
    for spec in state_tensors(g, cfg):
        if spec.kind != "param":
            continue
        analytic = out[f"{spec.layer}.{grad_of[spec.field]}"]
        numeric = np.zeros(spec.shape)
        for i in np.ndindex(spec.shape):
            t = dict(base)
            for sgn in (1, -1):
                t[spec.name] = base[spec.name].copy()
                t[spec.name][i] += sgn * h
                numeric[i] += sgn * float(ref.forward_backward(g, cfg, t, x, labels)["loss"])
        numeric /= 2 * h
        np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-8, err_msg=spec.name)
        checked += numeric.size
    assert checked > 250


# ---- input validation ----------------------------------------------------------------------------

def test_labels_out_of_range_are_data_errors():
    g = small_mlp()
    cfg = make_config("proposed", batch=4)
    st = ref.init_state(g, cfg)
    x, _ = _batch(g, 4, 0)
    for bad in ([0, 1, 5, 2], [0, -1, 2, 3], [0.0, 1.0, 2.0, 3.0], [0, 1, 2]):
        with pytest.raises(DataError):
            ref.train_step(g, cfg, st, x, np.array(bad))
    with pytest.raises(DataError, match="label 5 is outside"):
        ref.train_step(g, cfg, st, x, np.array([0, 1, 5, 2]))
    with pytest.raises(DataError):
        ref.train_step(g, cfg, st, np.zeros((4, 13), np.float32), np.array([0, 1, 2, 3]))


def test_flat_input_is_reshaped_and_predict_is_a_distribution():
    g = _pool_graph()
    cfg = make_config("standard", batch=3)
    st = ref.init_state(g, cfg)
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    p = ref.predict(g, cfg, st, x)
    assert p.shape == (3, 3)
    np.testing.assert_allclose(p.sum(1), 1, rtol=1e-6)
    np.testing.assert_allclose(p, ref.predict(g, cfg, st, x.reshape(3, 1, 4, 4)), rtol=0)


def test_predict_uses_running_statistics():
    g = _identity_bn_graph()
    cfg = make_config("standard", batch=2)
    st = ref.init_state(g, cfg)
    st.tensors["bn1.running_mean"][:] = [1.0, -1.0]
    st.tensors["bn1.running_var"][:] = [4.0 - 1e-4, 1.0 - 1e-4]
    st.tensors["bn1.gamma"][:] = [2.0, 1.0]
    x = np.array([[3.0, 0.0]], np.float32)
    z = np.array([2 * (3 - 1) / 2, (0 + 1) / 1])            # gamma (x - mean) / sqrt(var + eps)
    want = np.exp(z) / np.exp(z).sum()
    np.testing.assert_allclose(ref.predict(g, cfg, st, x)[0], want, rtol=1e-5)


def test_check_config_for_graph():
    rng = np.random.default_rng(0)
    real = _graph("realnet", (4,), [_dense("fc1", INPUT, 4, 3, rng, binary=False),
                                    _bn("bn1", "fc1", 3),
                                    Layer("softmax", K.SOFTMAX, ("bn1",), (3,))])
    with pytest.raises(ConfigError, match="no binary dense/conv"):
        check_config_for_graph(real, make_config("proposed"))
    with pytest.raises(ConfigError, match="bop"):
        check_config_for_graph(real, make_config("standard", optimizer="bop"))
    check_config_for_graph(real, make_config("proposed", po2=False, binary_dw=False))
    check_config_for_graph(small_mlp(), make_config("proposed", optimizer="bop"))
    with pytest.raises(ConfigError, match="batch 1"):
        check_config_for_graph(small_mlp(), make_config("proposed", batch=1))


# ---- real third-party exports: the inference path reproduces the exporting framework -------------

# shared/ sits beside the repository (CI clones elsewhere and copies shared/ next to the clone)
_MODELS = next((d for d in (Path(__file__).resolve().parents[2] / "shared" / "models",
                            Path("/work/shared/models")) if d.is_dir()), Path("/nonexistent"))


def _shared_models():
    return sorted(_MODELS.glob("*/*.onnx")) if _MODELS.is_dir() else []


@pytest.mark.skipif(not _shared_models(), reason="shared/models is not present")
@pytest.mark.parametrize("path", _shared_models(), ids=lambda p: p.stem)
def test_predict_reproduces_exported_model_outputs(path):
    from bnnc.compiler.frontend import load_model
    stem = path.name.split("_qonnx")[0].split("_finn")[0].replace("_ts_fold.onnx", "")
    io = np.load(path.parent / f"{stem}.io.npz")
    g = load_model(path)
    cfg = make_config("standard")               # l2 BN with the file's statistics, f32 state
    p = ref.predict(g, cfg, ref.init_state(g, cfg), io["input"])
    z = io["output"].reshape(len(p), -1).astype(np.float64)
    if g.output.kind is not K.SOFTMAX:          # Brevitas files end in TensorNorm: logits
        z = z - z.max(1, keepdims=True)
        z = z - np.log(np.exp(z).sum(1, keepdims=True))
    else:
        z = np.log(z)
    np.testing.assert_allclose(np.log(p), z, atol=2e-4)


# ---- the CLI -------------------------------------------------------------------------------------

def _idx(arr: np.ndarray) -> bytes:
    head = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return head + arr.astype(np.uint8).tobytes()


def _synthetic_mnist(root: Path, n_train=600, n_test=200) -> None:
    """An easy 10-class problem in MNIST's file format: class k lights up rows 2k..2k+4."""
    rng = np.random.default_rng(0)
    d = root / "mnist"
    d.mkdir(parents=True)
    for stem, n in (("train", n_train), ("t10k", n_test)):
        y = rng.integers(0, 10, n)
        x = rng.integers(0, 60, (n, 28, 28))
        for i, k in enumerate(y):
            x[i, 2 * k + 4:2 * k + 9, 4:24] += 180
        (d / f"{stem}-images-idx3-ubyte").write_bytes(_idx(x))
        (d / f"{stem}-labels-idx1-ubyte").write_bytes(_idx(y))


def _zoo_mlp(tmp_path: Path) -> Path:
    from bnnc.compiler.zoo import build_zoo_model
    import onnx
    p = tmp_path / "mlp.onnx"
    onnx.save(build_zoo_model("mlp", width=0.25), p)
    return p


def test_cli_train_reference_learns(tmp_path, capsys):
    from bnnc.cli import main
    _synthetic_mnist(tmp_path / "data")
    model = _zoo_mlp(tmp_path)
    rc = main(["train", str(model), "--data", "mnist", "--data-dir", str(tmp_path / "data"),
               "--epochs", "3", "--batch", "50", "--lr", "0.01"])
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = [ln for ln in out.splitlines() if ln.startswith("epoch ")]
    assert [ln.split()[1] for ln in lines] == ["1/3", "2/3", "3/3"] and "steps 36" in lines[-1]
    acc = float(lines[-1].split("test acc ")[1].split()[0])
    assert acc >= 85, out               # chance is 10 %
    rc = main(["train", str(model), "--data", "mnist", "--data-dir", str(tmp_path / "data"),
               "--steps", "3", "--batch", "50", "--algorithm", "standard", "--optimizer", "sgd"])
    out = capsys.readouterr().out
    assert rc == 0 and "steps 3 " in out and "standard" in out, out


def test_cli_train_c_backend_learns_like_the_reference(tmp_path, capsys):
    """`--backend c` trains the emitted C through the same loop and learns as the reference does.
    (Per kernel the C is proven by `bnnc check`; whole trajectories drift apart once a rounding
    difference flips a sign, so the two runs are compared by what they learn, not bit for bit.)"""
    from bnnc.cli import main
    _synthetic_mnist(tmp_path / "data")
    model = _zoo_mlp(tmp_path)
    accs = {}
    for backend in ("c", "reference"):
        rc = main(["train", str(model), "--backend", backend, "--data", "mnist", "--data-dir",
                   str(tmp_path / "data"), "--epochs", "3", "--batch", "50", "--lr", "0.01"])
        out = capsys.readouterr().out
        assert rc == 0, out
        last = [ln for ln in out.splitlines() if ln.startswith("epoch ")][-1]
        accs[backend] = float(last.split("test acc ")[1].split()[0])
    assert accs["c"] >= 85 and accs["reference"] >= 85, accs     # chance is 10 %


@pytest.mark.parametrize("args, message", [
    (["--algorithm", "standard", "--no-po2"], "no effect with --algorithm standard"),
    (["--batch", "1"], "batch 1"),
    (["--limit", "10", "--batch", "50"], "do not fill one batch"),
    (["--data", "cifar10"], "cifar"),
])
def test_cli_train_errors_are_one_line(tmp_path, capsys, args, message):
    from bnnc.cli import main
    _synthetic_mnist(tmp_path / "data", n_train=60, n_test=20)
    model = _zoo_mlp(tmp_path)
    argv = ["train", str(model), "--data-dir", str(tmp_path / "data")]
    argv += args if "--data" in args else ["--data", "mnist"] + args
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err.lower() and "Traceback" not in err, err


# ---- names shared with the lowered schedule (what `bnnc check` compares) -------------------------

@pytest.mark.parametrize("algorithm", ["standard", "proposed"])
@pytest.mark.parametrize("which", ["small_mlp", "fdnet", "poolnet"])
def test_every_schedule_tensor_has_a_reference_value(which, algorithm):
    schedule = pytest.importorskip("bnnc.compiler.schedule")
    g = {"small_mlp": small_mlp, "fdnet": _fd_graph, "poolnet": _pool_graph}[which]()
    cfg = make_config(algorithm, batch=4, **({} if which == "small_mlp" else
                                             {"po2": False, "binary_dw": False}))
    x = np.random.default_rng(0).uniform(-1, 1, (4,) + g.input_shape).astype(np.float32)
    _, out = ref.train_step(g, cfg, ref.init_state(g, cfg), x, np.arange(4) % g.num_classes)
    sched = schedule.build_schedule(g, cfg)
    missing = [n for n in sched.tensors if n not in out and n not in ("input", "labels")]
    assert not missing, f"schedule tensors the reference does not expose: {missing}"
    wrong = [n for n, t in sched.tensors.items() if n in out and np.asarray(out[n]).size != t.size]
    assert not wrong, f"element counts differ from the schedule: {wrong}"


def test_state_is_independent_of_blas_threads():
    """The reference is the ground truth: its bits must not depend on OpenBLAS's thread count."""
    script = (
        "import sys, hashlib, numpy as np; sys.path.insert(0, sys.argv[1]);"
        "import test_reference as T; from bnnc.runtime import reference as ref;"
        "from bnnc.compiler.config import make_config;"
        "g = T.small_mlp(sizes=(300, 256, 10)); cfg = make_config('proposed', batch=64);"
        "st = ref.init_state(g, cfg)\n"
        "for i in range(3): st, _ = ref.train_step(g, cfg, st, *T._batch(g, 64, i))\n"
        "print(hashlib.sha256(b''.join(st.tensors[k].tobytes() for k in sorted(st.tensors)))"
        ".hexdigest())")
    digests = set()
    for threads in ("1", "2"):
        env = {**os.environ, "OPENBLAS_NUM_THREADS": threads, "OMP_NUM_THREADS": threads}
        run = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent)], env=env,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        digests.add(run.stdout.strip())
    assert len(digests) == 1


def test_input_quant_follows_qonnx_order_at_ties():
    """QONNX rounds after adding the zero point and clipping: with zp = 1, x/scale = 0.5 gives
    round(1.5) - 1 = 1 (the other order, round(0.5) + 1 - 1, gives 0)."""
    from bnnc.runtime.infer import infer

    q = Layer("quant1", K.INPUT_QUANT, ("input",), (4,),
              attrs={"scale": 0.25, "zero_point": 1.0, "bits": 8, "signed": True, "narrow": False,
                     "rounding_mode": "ROUND"})
    fc = Layer("fc1", K.DENSE, ("quant1",), (4,), attrs={"binary": False},
               params={"W": np.eye(4, dtype=np.float32), "b": np.zeros(4, np.float32)})
    g = Graph("tieq", (4,), (q, fc))
    g.verify()
    cfg = make_config("standard", batch=2)
    x = np.array([[0.125, 0.375, -0.125, 0.6], [1.0, -1.0, 0.0, 0.625]], np.float32)
    want = np.array([[0.25, 0.25, -0.25, 0.5], [1.0, -1.0, 0.0, 0.75]], np.float32)
    _, t = ref.train_step(g, cfg, ref.init_state(g, cfg), x, np.array([0, 1]))
    np.testing.assert_array_equal(t["quant1.out"], want)
    np.testing.assert_array_equal(infer(g, x), want)       # the importer's inference agrees
    p = ref.predict(g, cfg, ref.init_state(g, cfg), x)
    e = np.exp(want - want.max(1, keepdims=True))
    np.testing.assert_allclose(p, e / e.sum(1, keepdims=True), rtol=1e-6)


def test_loss_scale_is_undone_by_the_update():
    """Under l1 BN the loss gradient is scaled by 2^s (f16 gradient path); the update must see the
    unscaled gradient: one SGD step on beta moves it by lr * sum((p - onehot) / B), computed here
    from the probabilities by hand."""
    g = _identity_bn_graph()
    cfg = make_config("proposed", batch=4, po2=False, binary_dw=False, save_bits=False,
                      state_dtype="f32", optimizer="sgd", lr=0.5)
    labels = np.array([0, 1, 1, 0])
    st = ref.init_state(g, cfg)
    new, out = ref.train_step(g, cfg, st, _BN_X, labels)
    z = out["bn1.out"].astype(np.float64)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    dbeta = ((p - np.eye(2)[labels]) / 4).sum(0)
    assert np.abs(out["bn1.dbeta"]).max() > 100 * np.abs(dbeta).max()    # the scaled gradient
    np.testing.assert_allclose(new.tensors["bn1.beta"], st.tensors["bn1.beta"] - 0.5 * dbeta,
                               rtol=1e-5, atol=1e-7)
