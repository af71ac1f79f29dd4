"""Reference inference (`runtime.infer`): shipped reference outputs, hand-computed layer values, an
independent loop-based convolution, and input-shape errors."""

from __future__ import annotations

import glob
import os
import re

import numpy as np
import pytest

from bnnc.compiler import ir
from bnnc.compiler.errors import DataError
from bnnc.compiler.frontend import load_model
from bnnc.compiler.ir import INPUT, LayerKind
from bnnc.runtime.infer import forward_layer, infer

MODELS = sorted(glob.glob("/work/shared/models/*/*.onnx"))


def reference_io(path: str) -> dict[str, np.ndarray]:
    """models/README.md: one `<stem>.io.npz` serves every variant file of its model."""
    base = os.path.basename(path)
    stem = re.match(r"(tfc_1w1a|sfc_1w1a|cnv_1w1a_small|torchbnn_[a-z]+)_", base).group(1)
    return dict(np.load(os.path.join(os.path.dirname(path), f"{stem}.io.npz")))


@pytest.mark.parametrize("path", MODELS, ids=os.path.basename)
def test_shipped_models_reproduce_reference_output(path):
    io = reference_io(path)
    g = load_model(path)
    y = infer(g, io["input"])
    assert y.shape == io["output"].shape and y.dtype == np.float32
    np.testing.assert_allclose(y, io["output"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path", [p for p in MODELS if "clean.onnx" in p or "torchbnn_fn" in p],
                         ids=os.path.basename)
def test_batch_rows_are_independent(path):
    io = reference_io(path)
    g = load_model(path)
    rng = np.random.default_rng(0)
    extra = rng.uniform(0, 1, (3,) + io["input"].shape[1:]).astype(np.float32)
    y = infer(g, np.concatenate([extra[:1], io["input"], extra[1:]]))
    n = len(io["input"])
    np.testing.assert_allclose(y[1:1 + n], io["output"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(y[0], infer(g, extra[:1])[0], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# single layers against hand-computed values


def L(kind, shape, inputs=(INPUT,), attrs=None, **params) -> ir.Layer:
    return ir.Layer(f"{kind.value}1".replace("_", ""), kind, tuple(inputs), shape, attrs or {},
                    {k: np.asarray(v, np.float32) for k, v in params.items()})


def test_sign_is_plus_one_at_zero():
    x = np.array([[0.0, -0.0, 1e-30, -1e-30, -3.0]], np.float32)
    np.testing.assert_array_equal(forward_layer(L(LayerKind.SIGN, (5,)), x), [[1, 1, 1, -1, -1]])


def test_binary_dense_uses_sign_of_latent_weights():
    lay = L(LayerKind.DENSE, (2,), attrs={"binary": True}, W=[[0.0, -0.5], [0.3, 0.0]])
    np.testing.assert_array_equal(forward_layer(lay, np.array([[1.0, 2.0]], np.float32)), [[3, 1]])
    real = L(LayerKind.DENSE, (2,), attrs={"binary": False}, W=[[0.0, -0.5], [0.3, 0.0]], b=[1, 2])
    np.testing.assert_allclose(forward_layer(real, np.array([[1.0, 2.0]], np.float32)),
                               [[1.6, 1.5]], rtol=1e-6)


@pytest.mark.parametrize("attrs,x,expected", [
    # scale 0.5, 3-bit signed [-4, 3]: x/s = .5, 1.5, -.5, 2.5, 10, -10 -> 0, 2, 0, 2, 3, -4
    # (clipped, then rounded half to even)
    ({"scale": 0.5, "zero_point": 0.0, "bits": 3, "signed": True, "narrow": False},
     [0.25, 0.75, -0.25, 1.25, 5.0, -5.0], [0.0, 1.0, 0.0, 1.0, 1.5, -2.0]),
    # 2-bit unsigned narrow [0, 2]
    ({"scale": 0.5, "zero_point": 0.0, "bits": 2, "signed": False, "narrow": True},
     [-1.0, 0.74, 0.76, 3.0], [0.0, 0.5, 1.0, 1.0]),
    # zero point 1, 8-bit signed narrow [-127, 127]: x/s + 1 = 3.5 -> 4 -> (4-1)*s
    ({"scale": 0.25, "zero_point": 1.0, "bits": 8, "signed": True, "narrow": True},
     [0.625, 100.0, -100.0], [0.75, 31.5, -32.0]),
])
def test_input_quant_matches_hand_values(attrs, x, expected):
    lay = L(LayerKind.INPUT_QUANT, (len(x),), attrs=attrs)
    np.testing.assert_array_equal(forward_layer(lay, np.array([x], np.float32)), [expected])


def test_pools_hand_values():
    x = np.array([[[[1.0, 2.0], [3.0, 4.0]]]], np.float32)
    geo = {"kernel": (2, 2), "strides": (1, 1), "pads": (1, 1, 0, 0)}
    excl = L(LayerKind.AVGPOOL, (1, 2, 2), attrs={**geo, "count_include_pad": False})
    incl = L(LayerKind.AVGPOOL, (1, 2, 2), attrs={**geo, "count_include_pad": True})
    np.testing.assert_allclose(forward_layer(excl, x), [[[[1.0, 1.5], [2.0, 2.5]]]])
    np.testing.assert_allclose(forward_layer(incl, x), [[[[0.25, 0.75], [1.0, 2.5]]]])
    mp = L(LayerKind.MAXPOOL, (1, 2, 2), attrs=geo)     # padding never wins a max
    np.testing.assert_array_equal(forward_layer(mp, -x), [[[[-1, -1], [-1, -1]]]])
    gap = L(LayerKind.GLOBAL_AVGPOOL, (1, 1, 1))
    np.testing.assert_allclose(forward_layer(gap, x), [[[[2.5]]]])


def test_batchnorm_affine_softmax_hand_values():
    x = np.array([[1.0, 4.0], [-2.0, 0.0]], np.float32)
    bn = L(LayerKind.BATCHNORM, (2,), attrs={"eps": 1.0, "momentum": 0.9},
           gamma=[2.0, 1.0], beta=[1.0, 0.0], mean=[1.0, 0.0], var=[3.0, 15.0])
    np.testing.assert_allclose(forward_layer(bn, x), [[1.0, 1.0], [-2.0, 0.0]], rtol=1e-6)
    aff = L(LayerKind.AFFINE, (2,), scale=[2.0, -1.0], bias=[0.5])
    np.testing.assert_allclose(forward_layer(aff, x), [[2.5, -3.5], [-3.5, 0.5]])
    sm = forward_layer(L(LayerKind.SOFTMAX, (2,)), np.array([[0.0, np.log(3.0)]], np.float32))
    np.testing.assert_allclose(sm, [[0.25, 0.75]], rtol=1e-6)
    img = np.ones((1, 2, 1, 1), np.float32)
    aff4 = L(LayerKind.AFFINE, (2, 1, 1), scale=[2.0, 3.0], bias=[1.0, -1.0])
    np.testing.assert_allclose(forward_layer(aff4, img).ravel(), [3.0, 2.0])


def naive_conv(x, w, b, strides, pads):
    """Direct 7-loop correlation, the definition, for checking the im2col path."""
    t, l, bo, r = pads
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (t, bo), (l, r)))
    n, c, h, wd = xp.shape
    co, _, kh, kw = w.shape
    ho, wo = (h - kh) // strides[0] + 1, (wd - kw) // strides[1] + 1
    y = np.zeros((n, co, ho, wo))
    for i in range(n):
        for o in range(co):
            for p in range(ho):
                for q in range(wo):
                    for ci in range(c):
                        for u in range(kh):
                            for v in range(kw):
                                y[i, o, p, q] += (xp[i, ci, p * strides[0] + u, q * strides[1] + v]
                                                  * w[o, ci, u, v])
            y[i, o] += 0 if b is None else b[o]
    return y


@pytest.mark.parametrize("strides,pads,binary,bias", [((1, 1), (0, 0, 0, 0), True, False),
                                                       ((2, 1), (1, 0, 2, 1), False, True),
                                                       ((2, 2), (1, 1, 1, 1), True, False)])
def test_conv_matches_naive_loops(strides, pads, binary, bias):
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (2, 3, 6, 5)).astype(np.float32)
    w = rng.normal(0, 1, (4, 3, 3, 2)).astype(np.float32)
    b = rng.normal(0, 1, 4).astype(np.float32) if bias else None
    wb = np.where(w >= 0, 1.0, -1.0) if binary else w
    ref = naive_conv(x, wb, b, strides, pads)
    params = {"W": w} if b is None else {"W": w, "b": b}
    lay = L(LayerKind.CONV, ref.shape[1:], attrs={"binary": binary, "strides": strides,
                                                  "pads": pads}, **params)
    np.testing.assert_allclose(forward_layer(lay, x), ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# whole graphs: layouts and input errors


def _tiny_graph(layout: str) -> ir.Graph:
    rng = np.random.default_rng(2)
    conv = ir.Layer("conv1", LayerKind.CONV, (INPUT,), (2, 3, 2),
                    {"binary": False, "strides": (1, 1), "pads": (0, 0, 0, 0)},
                    {"W": rng.normal(0, 1, (2, 3, 2, 2)).astype(np.float32)})
    flat = ir.Layer("flatten1", LayerKind.FLATTEN, ("conv1",), (12,))
    return ir.Graph("tiny", (3, 4, 3), (conv, flat), layout)


def test_nhwc_graph_takes_nhwc_input():
    x = np.random.default_rng(3).normal(0, 1, (2, 3, 4, 3)).astype(np.float32)
    nchw = infer(_tiny_graph("NCHW"), x)
    nhwc = infer(_tiny_graph("NHWC"), x.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(nchw, nhwc)


@pytest.mark.parametrize("layout,shape", [("NCHW", (2, 36)), ("NCHW", (3, 4, 3)),
                                          ("NCHW", (2, 4, 3, 3)), ("NHWC", (2, 3, 4, 3)),
                                          ("NCHW", (0, 3, 4, 3))])
def test_wrong_input_shape_is_a_data_error(layout, shape):
    with pytest.raises(DataError) as e:
        infer(_tiny_graph(layout), np.zeros(shape, np.float32))
    assert str(list(shape)) in e.value.message and "tiny" in e.value.message
    want = "[N, 3, 4, 3]" if layout == "NCHW" else "[N, 4, 3, 3]"
    assert want in e.value.message and layout in e.value.message
