"""Layout idioms converters emit (issue 18): tf2onnx/keras2onnx's Transpose back to NHWC before a
Flatten, Unsqueeze/Squeeze pairs (onnx2torch, torch dynamo), Identity chains, and Reshapes that
only insert or remove size-1 axes. Every model is built here with onnx.helper; bnnc's forward must
equal onnxruntime's on it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from bnnc.compiler.errors import UnsupportedModelError
from bnnc.compiler.frontend import load_model
from bnnc.compiler.ir import LayerKind
from bnnc.runtime.infer import infer

from test_frontend import N, build, check_ort, kinds, randn, run_ort


def _bn(prefix: str, c: int, rng) -> dict[str, np.ndarray]:
    return {f"{prefix}_g": rng.uniform(0.5, 1.5, c).astype(np.float32),
            f"{prefix}_b": rng.normal(0, 0.3, c).astype(np.float32),
            f"{prefix}_m": rng.normal(0, 1.0, c).astype(np.float32),
            f"{prefix}_v": rng.uniform(0.5, 2.0, c).astype(np.float32)}


def _bn_node(prefix: str, x: str, y: str) -> onnx.NodeProto:
    return N("BatchNormalization", [x] + [f"{prefix}_{k}" for k in "gbmv"], [y],
             name=f"{prefix}/BatchNormalization", epsilon=1e-3)


def _i64(*v) -> np.ndarray:
    return np.array(v, np.int64)


# ---- tf2onnx / keras2onnx: Transpose back to NHWC before the Flatten --------------------------

def _keras_cnn(flatten: str, per_feature: str, rng):
    """A Larq-style CNN as tf2onnx writes it: NHWC input -> Transpose to NCHW -> conv -> BN ->
    sign -> max-pool -> Transpose back to NHWC -> Flatten (Keras' order) -> [per-feature op] ->
    sign -> binary MatMul (the kernel binarized with Sign) -> y."""
    C, H, W = 3, 4, 4
    n = C * (H // 2) * (W // 2)
    nodes = [N("Transpose", ["x"], ["xt"], name="model/conv2d__6", perm=[0, 3, 1, 2]),
             N("Conv", ["xt", "k"], ["c"], name="model/conv2d", kernel_shape=[3, 3],
               pads=[1, 1, 1, 1]),
             _bn_node("bn1", "c", "cb"),
             N("Sign", ["cb"], ["cs"], name="model/act1"),
             N("MaxPool", ["cs"], ["p"], name="model/pool", kernel_shape=[2, 2], strides=[2, 2]),
             N("Transpose", ["p"], ["pt"], name="model/pool__20", perm=[0, 2, 3, 1])]
    inits = {"k": randn(rng, C, 2, 3, 3), **_bn("bn1", C, rng),
             "wd": randn(rng, n, 5)}
    if flatten == "Flatten":
        nodes.append(N("Flatten", ["pt"], ["f"], name="model/flatten/Flatten"))
    else:
        inits["shape"] = _i64(-1, n)
        nodes.append(N("Reshape", ["pt", "shape"], ["f"], name="model/flatten/Reshape"))
    last = "f"
    if per_feature == "mul_add":
        inits.update(s=rng.uniform(0.5, 2, n).astype(np.float32), t=randn(rng, n))
        nodes += [N("Mul", ["f", "s"], ["fm"], name="scale"), N("Add", ["fm", "t"], ["fa"],
                                                                  name="shift")]
        last = "fa"
    elif per_feature == "bn":
        inits.update(_bn("bn2", n, rng))
        nodes.append(_bn_node("bn2", "f", "fb"))
        last = "fb"
    nodes += [N("Sign", [last], ["fs"], name="model/dense/input_quantizer"),
              N("Sign", ["wd"], ["wb"], name="model/dense/kernel_quantizer"),
              N("MatMul", ["fs", "wb"], ["y"], name="model/dense/MatMul")]
    return build(nodes, inits, ["N", H, W, 2]), inits


@pytest.mark.parametrize("flatten", ["Flatten", "Reshape"])
@pytest.mark.parametrize("per_feature", ["none", "mul_add", "bn"])
def test_transpose_back_to_nhwc_before_flatten(flatten, per_feature):
    """The flatten then runs in (H, W, C) order: bnnc flattens NCHW and permutes the rows of the
    dense weight (and any per-feature constant) instead, so the forward is the file's."""
    rng = np.random.default_rng(31)
    m, inits = _keras_cnn(flatten, per_feature, rng)
    x = randn(rng, 3, 4, 4, 2)
    g = check_ort(m, x)
    assert g.input_layout == "NHWC"
    dense = [lay for lay in g.layers if lay.kind is LayerKind.DENSE]
    assert len(dense) == 1 and dense[0].attrs["binary"]
    # the rows really moved: bnnc's row r is the file's row perm[r]
    perm = np.arange(12).reshape(2, 2, 3).transpose(2, 0, 1).ravel()
    np.testing.assert_array_equal(dense[0].params["W"], inits["wd"][perm])


def test_nhwc_flatten_of_a_one_pixel_map_is_no_permutation():
    """[N, C, 1, 1] -> NHWC -> Flatten: the order is the same, no layer changes."""
    rng = np.random.default_rng(32)
    nodes = [N("Conv", ["x", "k"], ["c"], name="conv", kernel_shape=[3, 3]),
             N("GlobalAveragePool", ["c"], ["p"], name="gap"),
             N("Transpose", ["p"], ["pt"], name="to_nhwc", perm=[0, 2, 3, 1]),
             N("Flatten", ["pt"], ["f"], name="flat"),
             N("MatMul", ["f", "w"], ["y"], name="fc")]
    inits = {"k": randn(rng, 4, 2, 3, 3), "w": randn(rng, 4, 3)}
    g = check_ort(build(nodes, inits, ["N", 2, 5, 5]), randn(rng, 2, 2, 5, 5))
    assert kinds(g) == ["conv", "global_avgpool", "flatten", "dense"]
    np.testing.assert_array_equal(g.layer("fc1").params["W"], inits["w"])


def test_transpose_pair_and_unit_axis_transpose_are_views():
    """A Transpose to NHWC and straight back (tf2onnx with its optimizer off), and a Transpose
    that only moves size-1 axes ([N, C, 1, 1] -> [N, 1, 1, C]), change no byte."""
    rng = np.random.default_rng(36)
    nodes = [N("Conv", ["x", "k"], ["c"], name="conv", kernel_shape=[3, 3]),
             N("Transpose", ["c"], ["ct"], name="to_nhwc", perm=[0, 2, 3, 1]),
             N("Transpose", ["ct"], ["cb"], name="to_nchw", perm=[0, 3, 1, 2]),
             N("MaxPool", ["cb"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             N("GlobalAveragePool", ["p"], ["g"], name="gap"),
             N("Transpose", ["g"], ["gt"], name="unit_axes", perm=[0, 2, 1, 3]),
             N("Flatten", ["gt"], ["f"], name="flat"),
             N("MatMul", ["f", "w"], ["y"], name="fc")]
    inits = {"k": randn(rng, 4, 2, 3, 3), "w": randn(rng, 4, 3)}
    g = check_ort(build(nodes, inits, ["N", 2, 6, 6]), randn(rng, 2, 2, 6, 6))
    assert kinds(g) == ["conv", "maxpool", "global_avgpool", "flatten", "dense"]


def test_nhwc_activation_read_by_an_nchw_op_is_one_clear_error():
    rng = np.random.default_rng(33)
    nodes = [N("Conv", ["x", "k"], ["c"], name="conv", kernel_shape=[3, 3]),
             N("Transpose", ["c"], ["ct"], name="to_nhwc", perm=[0, 2, 3, 1]),
             N("MaxPool", ["ct"], ["p"], name="/pool/MaxPool", kernel_shape=[2, 2]),
             N("Flatten", ["p"], ["y"], name="flat")]
    inits = {"k": randn(rng, 4, 2, 3, 3)}
    with pytest.raises(UnsupportedModelError, match=r"'/pool/MaxPool'.*NHWC"):
        load_model(build(nodes, inits, ["N", 2, 6, 6]))


def test_nhwc_flatten_as_the_graph_output_is_one_clear_error():
    rng = np.random.default_rng(34)
    nodes = [N("Conv", ["x", "k"], ["c"], name="conv", kernel_shape=[3, 3]),
             N("Transpose", ["c"], ["ct"], name="to_nhwc", perm=[0, 2, 3, 1]),
             N("Flatten", ["ct"], ["y"], name="flat")]
    with pytest.raises(UnsupportedModelError, match=r"output 'y'.*\(H, W, C\) order"):
        load_model(build(nodes, {"k": randn(rng, 4, 2, 3, 3)}, ["N", 2, 6, 6]))


def test_other_activation_transposes_are_refused():
    rng = np.random.default_rng(35)
    nodes = [N("Conv", ["x", "k"], ["c"], name="conv", kernel_shape=[3, 3]),
             N("Transpose", ["c"], ["ct"], name="/swap_hw", perm=[0, 1, 3, 2]),
             N("Flatten", ["ct"], ["y"], name="flat")]
    with pytest.raises(UnsupportedModelError, match=r"'/swap_hw'.*perm \[0, 1, 3, 2\]"):
        load_model(build(nodes, {"k": randn(rng, 4, 2, 3, 3)}, ["N", 2, 6, 6]))


# ---- Unsqueeze / Squeeze pairs ----------------------------------------------------------------

def _unsq(x, y, axes, opset, name, op="Unsqueeze"):
    """(nodes, inits): axes as an attribute before opset 13, as an input from 13 on."""
    if opset < 13:
        return [N(op, [x], [y], name=name, axes=list(axes))], {}
    return [N(op, [x, f"{name}_axes"], [y], name=name)], {f"{name}_axes": _i64(*axes)}


@pytest.mark.parametrize("opset", [11, 17])
def test_unsqueeze_batchnorm_squeeze_pair(opset):
    """BatchNorm1d on [N, F] written as Unsqueeze -> BatchNormalization -> Squeeze."""
    rng = np.random.default_rng(41)
    nodes, inits = [N("MatMul", ["x", "w1"], ["h"], name="fc1")], {"w1": randn(rng, 8, 6)}
    for nd, it in (_unsq("h", "hu", [2], opset, "/bn/Unsqueeze"),
                   ([_bn_node("bn", "hu", "hb")], _bn("bn", 6, rng)),
                   _unsq("hb", "hs", [2], opset, "/bn/Squeeze", op="Squeeze")):
        nodes += nd
        inits.update(it)
    nodes += [N("Sign", ["hs"], ["s"], name="sign"), N("MatMul", ["s", "w2"], ["y"], name="fc2")]
    inits["w2"] = np.sign(randn(rng, 6, 4)) + 0
    g = check_ort(build(nodes, inits, ["N", 8], opsets=(("", opset),)), randn(rng, 3, 8))
    assert kinds(g) == ["dense", "batchnorm", "sign", "dense"]
    assert g.layer("bn1").shape == (6,)


@pytest.mark.parametrize("opset", [11, 17])
def test_squeeze_after_global_pool_is_the_flatten(opset):
    """torch's x.squeeze(-1).squeeze(-1) / dynamo's Squeeze of a [N, C, 1, 1] map before Gemm."""
    rng = np.random.default_rng(42)
    nodes = [N("Conv", ["x", "k"], ["c"], name="conv", kernel_shape=[3, 3]),
             N("GlobalAveragePool", ["c"], ["p"], name="gap")]
    sq, inits = _unsq("p", "f", [3, 2] if opset < 13 else [-1, -2], opset, "/Squeeze",
                      op="Squeeze")
    nodes += sq + [N("Gemm", ["f", "w", "b"], ["y"], name="fc", transB=1)]
    inits.update(k=randn(rng, 4, 2, 3, 3), w=randn(rng, 3, 4), b=randn(rng, 3))
    g = check_ort(build(nodes, inits, ["N", 2, 5, 5], opsets=(("", opset),)),
                  randn(rng, 2, 2, 5, 5))
    assert kinds(g) == ["conv", "global_avgpool", "flatten", "dense"]


def test_squeeze_without_axes_drops_every_unit_axis():
    rng = np.random.default_rng(43)
    nodes = [N("Conv", ["x", "k"], ["c"], name="conv", kernel_shape=[3, 3]),
             N("GlobalAveragePool", ["c"], ["p"], name="gap"),
             N("Squeeze", ["p"], ["f"], name="squeeze"),
             N("MatMul", ["f", "w"], ["y"], name="fc")]
    inits = {"k": randn(rng, 4, 2, 3, 3), "w": randn(rng, 4, 3)}
    check_ort(build(nodes, inits, ["N", 2, 5, 5]), randn(rng, 2, 2, 5, 5))


def test_unsqueeze_read_by_a_conv_is_one_clear_error():
    rng = np.random.default_rng(44)
    nodes = [N("MatMul", ["x", "w"], ["h"], name="fc"),
             N("Unsqueeze", ["h", "axes"], ["hu"], name="/Unsqueeze"),
             N("Conv", ["hu", "k"], ["c"], name="/conv/Conv", kernel_shape=[1, 1]),
             N("Flatten", ["c"], ["y"], name="flat")]
    inits = {"w": randn(rng, 8, 6), "axes": _i64(2, 3), "k": randn(rng, 2, 6, 1, 1)}
    with pytest.raises(UnsupportedModelError, match=r"'/conv/Conv'.*\[6, 1, 1\].*\[6\]"):
        load_model(build(nodes, inits, ["N", 8]))


def test_squeeze_of_a_non_unit_axis_is_refused():
    rng = np.random.default_rng(45)
    nodes = [N("MatMul", ["x", "w"], ["h"], name="fc"),
             N("Squeeze", ["h", "axes"], ["y"], name="/bad/Squeeze")]
    inits = {"w": randn(rng, 8, 6), "axes": _i64(1)}
    with pytest.raises(UnsupportedModelError, match=r"'/bad/Squeeze'.*axis 1.*size 6"):
        load_model(build(nodes, inits, ["N", 8], opsets=(("", 17),)))


# ---- Reshape that only inserts / removes size-1 axes ------------------------------------------

def test_reshape_inserting_and_removing_unit_axes():
    """[N, F] -> [N, F, 1, 1] -> BN -> sign -> [N, F] (a Reshape form of the Unsqueeze pair), and
    a 5-D [N, C, H, W, 1] detour of a conv map that comes back before its pool."""
    rng = np.random.default_rng(51)
    nodes = [N("Conv", ["x", "k"], ["c"], name="conv", kernel_shape=[3, 3]),
             N("Reshape", ["c", "s5"], ["c5"], name="/to5d"),
             N("Relu", ["c5"], ["r5"], name="relu"),
             N("Reshape", ["r5", "s4"], ["r"], name="/to4d"),
             N("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             N("Flatten", ["p"], ["f"], name="flat"),
             N("MatMul", ["f", "w"], ["h"], name="fc1"),
             N("Reshape", ["h", "s_up"], ["hu"], name="/up"),
             _bn_node("bn", "hu", "hb"),
             N("Sign", ["hb"], ["hs"], name="sign"),
             N("Reshape", ["hs", "s_down"], ["hd"], name="/down"),
             N("MatMul", ["hd", "w2"], ["y"], name="fc2")]
    inits = {"k": randn(rng, 4, 2, 3, 3), "s5": _i64(0, 4, 4, 4, 1), "s4": _i64(-1, 4, 4, 4),
             "w": randn(rng, 16, 6), "s_up": _i64(-1, 6, 1, 1), **_bn("bn", 6, rng),
             "s_down": _i64(0, -1), "w2": randn(rng, 6, 3)}
    g = check_ort(build(nodes, inits, ["N", 2, 6, 6]), randn(rng, 2, 2, 6, 6))
    assert kinds(g) == ["conv", "relu", "maxpool", "flatten", "dense", "batchnorm", "sign",
                        "dense"]


def test_unit_axis_before_the_channels_is_not_a_channel_view():
    """[N, F] -> [N, 1, F] puts the features on ONNX's spatial axis: a BatchNormalization there
    normalizes one channel, which bnnc cannot express: one clear error."""
    rng = np.random.default_rng(52)
    nodes = [N("MatMul", ["x", "w"], ["h"], name="fc"),
             N("Reshape", ["h", "s"], ["hu"], name="/up"),
             _bn_node("bn", "hu", "hb"),
             N("Flatten", ["hb"], ["y"], name="flat")]
    inits = {"w": randn(rng, 8, 6), "s": _i64(-1, 1, 6), **_bn("bn", 1, rng)}
    with pytest.raises(UnsupportedModelError, match=r"'bn/BatchNormalization'.*\[1, 6\]"):
        load_model(build(nodes, inits, ["N", 8]))


def test_sign_on_a_leading_unit_axis_view_is_fine():
    """Elementwise ops do not care where the size-1 axis is."""
    rng = np.random.default_rng(53)
    nodes = [N("MatMul", ["x", "w"], ["h"], name="fc"),
             N("Reshape", ["h", "s"], ["hu"], name="/up"),
             N("Sign", ["hu"], ["hs"], name="sign"),
             N("Mul", ["hs", "half"], ["hm"], name="half"),
             N("Reshape", ["hm", "s2"], ["hd"], name="/down"),
             N("MatMul", ["hd", "w2"], ["y"], name="fc2")]
    inits = {"w": randn(rng, 8, 6), "s": _i64(-1, 1, 6), "half": np.float32(0.5),
             "s2": _i64(-1, 6), "w2": randn(rng, 6, 3)}
    check_ort(build(nodes, inits, ["N", 8]), randn(rng, 2, 8))


@pytest.mark.parametrize("form", ["reshape", "reshape_transpose", "unsqueeze"])
def test_two_dim_input_reshaped_to_one_channel_maps(form):
    """Keras' Reshape((28, 28, 1)) of a [N, 28, 28] input, as tf2onnx writes it (one Reshape to
    [N, 1, H, W] after its optimizer, or Reshape to [N, H, W, 1] + Transpose) and torch's
    x.unsqueeze(1): the input takes the one-channel shape, the same bytes."""
    rng = np.random.default_rng(54)
    if form == "reshape":
        nodes, inits = [N("Reshape", ["x", "s"], ["xm"], name="reshape")], {"s": _i64(-1, 1, 6, 5)}
    elif form == "reshape_transpose":
        nodes = [N("Reshape", ["x", "s"], ["xr"], name="reshape"),
                 N("Transpose", ["xr"], ["xm"], name="reshape__5", perm=[0, 3, 1, 2])]
        inits = {"s": _i64(-1, 6, 5, 1)}
    else:
        nodes, inits = [N("Unsqueeze", ["x", "ax"], ["xm"], name="unsqueeze")], {"ax": _i64(1)}
    nodes = [N("Mul", ["x", "scale"], ["xs"], name="rescaling")] + nodes
    nodes[1].input[0] = "xs"
    nodes += [N("Conv", ["xm", "k"], ["c"], name="conv", kernel_shape=[3, 3]),
              N("Flatten", ["c"], ["y"], name="flat")]
    inits.update(k=randn(rng, 2, 1, 3, 3), scale=np.float32(1 / 255))
    m = build(nodes, inits, ["N", 6, 5])
    g = load_model(m)
    assert g.input_shape == (1, 6, 5) and g.input_layout == "NCHW"
    assert kinds(g) == ["affine", "conv", "flatten"]
    x = randn(rng, 3, 6, 5, scale=100)      # the same bytes, in the input's new shape for bnnc
    np.testing.assert_allclose(infer(g, x.reshape(3, 1, 6, 5)), run_ort(m, x), rtol=1e-4,
                               atol=1e-4)


def test_input_read_in_two_shapes_is_one_clear_error():
    rng = np.random.default_rng(55)
    nodes = [N("Flatten", ["x"], ["f"], name="flat_in"),
             N("MatMul", ["f", "w"], ["h"], name="fc"),
             N("Unsqueeze", ["x", "ax"], ["xm"], name="unsqueeze"),
             N("Conv", ["xm", "k"], ["c"], name="/conv/Conv", kernel_shape=[6, 5]),
             N("Flatten", ["c"], ["cf"], name="flat"),
             N("Add", ["h", "cf"], ["y"], name="add")]
    inits = {"w": randn(rng, 30, 2), "ax": _i64(1), "k": randn(rng, 2, 1, 6, 5)}
    with pytest.raises(UnsupportedModelError,
                       match=r"'/conv/Conv'.*network input as per-sample \[1, 6, 5\].*\[6, 5\]"):
        load_model(build(nodes, inits, ["N", 6, 5]))


# ---- Identity chains --------------------------------------------------------------------------

def test_identity_chains_on_input_weights_activations_and_output():
    """torch/onnx2torch write Identity for shared or renamed tensors: on the input, on a weight
    before its binarizer, between layers and as the graph output."""
    rng = np.random.default_rng(61)
    nodes = [N("Identity", ["x"], ["x1"], name="id_in"),
             N("Identity", ["x1"], ["x2"], name="id_in2"),
             N("Identity", ["w"], ["w1"], name="id_w"),
             N("Identity", ["w1"], ["w2"], name="id_w2"),
             N("Sign", ["w2"], ["wb"], name="wq"),
             N("MatMul", ["x2", "wb"], ["h"], name="fc1"),
             N("Identity", ["h"], ["h1"], name="id_h"),
             _bn_node("bn", "h1", "hb"),
             N("Identity", ["hb"], ["hb1"], name="id_hb"),
             N("Sign", ["hb1"], ["s"], name="sign"),
             N("Identity", ["s"], ["s1"], name="id_s"),
             N("MatMul", ["s1", "w3"], ["o"], name="fc2"),
             N("Identity", ["o"], ["o1"], name="id_o"),
             N("Identity", ["o1"], ["y"], name="id_out")]
    inits = {"w": randn(rng, 8, 6), **_bn("bn", 6, rng), "w3": randn(rng, 6, 3)}
    g = check_ort(build(nodes, inits, ["N", 8]), randn(rng, 3, 8))
    assert kinds(g) == ["dense", "batchnorm", "sign", "dense"]
    assert g.layer("fc1").attrs["binary"]
