"""Grouped and depthwise convolution (ONNX Conv, group > 1): the op added the new way (issue 13).

Small ONNX files built here with onnx.helper: input 4x8x8 -> Conv(group ga, real W, bias) -> Sign
-> Conv(group gb, stride 2, +-1 W: binary; or real W) -> BN -> Sign -> Flatten -> MatMul(+-1 W) ->
BN -> Softmax, with ga/gb in {2 (grouped), 4/8 (depthwise)}, plus `binfirst`, an IR graph with
binary grouped layers on every kind of input. Checked: the import (layer kinds, attrs, shapes, the
bias fold), onnxruntime against bnnc's inference, the numpy reference against the PyTorch oracle
(F.conv2d(groups=...) forward and autograd gradients, one standard-algorithm step), the packing
rule (a grouped layer's input stays f32), `bnnc check` (emitted C against the reference) under
standard, proposed, proposed + Bop and PO2 + SGD + f16 state, on the host and rpi4 (QEMU), the
trainer under ASan/UBSan with guard canaries, and the export round trip (ONNX and QONNX).
"""

from __future__ import annotations

import functools
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphs
import test_sanitize as sanitize
from test_oracle_torch import _Pair

from bnnc.compiler.config import make_config
from bnnc.compiler.errors import ModelError
from bnnc.compiler.export import export_onnx
from bnnc.compiler.frontend import load_model
from bnnc.compiler.ir import Graph, LayerKind
from bnnc.compiler.pipeline import compile_to_c
from bnnc.compiler.planner import DEFAULT_GUARD_BYTES
from bnnc.compiler.schedule import build_schedule
from bnnc.compiler.schedule_ir import DType
from bnnc.compiler.target import load_target
from bnnc.runtime import reference as ref
from bnnc.runtime.check import format_report, run_check
from bnnc.runtime.infer import infer
from bnnc.runtime.programs import LocalRunner, build_trainer

CIN, HW, MID, CLASSES = 4, 8, 8, 10


def _bn(name: str, x: str, c: int, rng) -> tuple[onnx.NodeProto, list]:
    vals = [rng.uniform(0.5, 1.5, c), rng.normal(0, 0.1, c), rng.normal(0, 0.1, c),
            rng.uniform(0.5, 1.5, c)]
    names = [f"{name}.{f}" for f in ("scale", "bias", "mean", "var")]
    inits = [numpy_helper.from_array(v.astype(np.float32), n) for v, n in zip(vals, names)]
    return helper.make_node("BatchNormalization", [x] + names, [name], name=name,
                            epsilon=1e-4), inits


@functools.cache
def net(ga: int, gb: int, binary: bool = True, seed: int = 0) -> onnx.ModelProto:
    """The test net: a real grouped first conv (group ga, bias, pads 1) and a second conv of group
    gb (stride 2, pads 1), binary (+-1 W reading a Sign) or real."""
    rng = np.random.default_rng(seed)
    wa = rng.normal(0, 0.5, (MID, CIN // ga, 3, 3))
    ba = rng.normal(0, 0.1, MID)
    wb = rng.normal(0, 0.5, (MID, MID // gb, 3, 3))
    wb = np.where(wb >= 0, 1.0, -1.0) if binary else wb
    wd = np.where(rng.normal(size=(MID * 4 * 4, CLASSES)) >= 0, 1.0, -1.0)
    inits = [numpy_helper.from_array(v.astype(np.float32), n)
             for n, v in (("wa", wa), ("ba", ba), ("wb", wb), ("wd", wd))]
    nodes = [helper.make_node("Conv", ["input", "wa", "ba"], ["ya"], name="conv_a", group=ga,
                              kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             # no BN between the biased conv and its sign: the bias gets a gradient
             helper.make_node("Sign", ["ya"], ["s1"], name="sign1"),
             helper.make_node("Conv", ["s1", "wb"], ["yb"], name="conv_b", group=gb,
                              kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])]
    for i, (x, c) in enumerate((("yb", MID), ("yd", CLASSES)), start=1):
        node, bn_inits = _bn(f"bn{i}", x, c, rng)
        nodes.append(node)
        inits += bn_inits
        if i == 1:
            nodes += [helper.make_node("Sign", ["bn1"], ["s2"], name="sign2"),
                      helper.make_node("Flatten", ["s2"], ["f"], name="flat"),
                      helper.make_node("MatMul", ["f", "wd"], ["yd"], name="fc")]
    nodes.append(helper.make_node("Softmax", ["bn2"], ["output"], name="softmax", axis=-1))
    g = helper.make_graph(nodes, f"gconv_{ga}_{gb}_{int(binary)}", [
        helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", CIN, HW, HW])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", CLASSES])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model, full_check=True)
    return model


NETS = {"grouped": (2, 2, True), "depthwise": (4, MID, True), "real": (2, MID, False)}


def _gconv(b: graphs._Builder, name: str, cout: int, group: int, *, stride=1, pads=(1, 1, 1, 1),
           binary=True) -> str:
    cin, h, w = b.shape(b.last)
    W = b._weights((cout, cin // group, 3, 3), cin // group * 9)
    oh, ow = (h + pads[0] + pads[2] - 3) // stride + 1, (w + pads[1] + pads[3] - 3) // stride + 1
    return b._add(name, LayerKind.GROUP_CONV, (cout, oh, ow), None,
                  {"binary": binary, "group": group, "strides": (stride, stride), "pads": pads},
                  {"W": W})


def binfirst() -> Graph:
    """Binary grouped layers on every kind of input: the real network input (gconv1, group 2),
    max-pooled signs (gconv2, depthwise) and a ReLU output with a gradient upstream (gconv3,
    group 4, stride 2, asymmetric pads)."""
    b = graphs._Builder("gconv_binfirst", (CIN, 10, 10), seed=5)
    _gconv(b, "gconv1", MID, 2)
    b.bn("bn1")
    b.unary("sign1", LayerKind.SIGN)
    b.pool("pool1")
    _gconv(b, "gconv2", MID, MID)
    b.bn("bn2")
    b.unary("relu1", LayerKind.RELU)
    _gconv(b, "gconv3", MID, 4, stride=2, pads=(0, 1, 1, 0))
    b.bn("bn3")
    b.unary("sign3", LayerKind.SIGN)
    b.flatten("flatten1")
    b.dense("fc1", CLASSES)
    b.bn("bn4")
    b.unary("softmax", LayerKind.SOFTMAX)
    return b.build()


@functools.cache
def graph(name: str) -> Graph:
    return binfirst() if name == "binfirst" else load_model(net(*NETS[name]))


def _ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


def _batch(g, n: int, seed: int):
    return graphs.sample_batch(g, n, seed=seed)


# ---- import and inference ------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(NETS))
def test_import(name):
    ga, gb, binary = NETS[name]
    g = graph(name)
    convs = [lay for lay in g.layers if lay.kind is LayerKind.GROUP_CONV]
    assert [lay.name for lay in convs] == ["gconv1", "gconv2"]
    a, b = convs
    assert (a.attrs["group"], a.binary, a.params["W"].shape, a.shape) == \
        (ga, False, (MID, CIN // ga, 3, 3), (MID, HW, HW))
    assert "b" in a.params
    assert (b.attrs["group"], b.binary, b.params["W"].shape, b.shape) == \
        (gb, binary, (MID, MID // gb, 3, 3), (MID, HW // 2, HW // 2))
    assert tuple(b.attrs["strides"]) == (2, 2) and tuple(b.attrs["pads"]) == (1, 1, 1, 1)


def test_group_must_divide_the_channels():
    m = net(2, 2)
    bad = onnx.ModelProto()
    bad.CopyFrom(m)
    for node in bad.graph.node:
        if node.name == "conv_b":
            node.attribute[[a.name for a in node.attribute].index("group")].i = 3
    with pytest.raises(ModelError, match="group=3"):
        load_model(bad)


def test_bias_add_after_a_grouped_conv_becomes_its_b():
    """Conv(group) + Add(per-channel constant), as exporters write a bias: the real layer's `b`,
    as for group 1 (not a frozen AFFINE)."""
    m = onnx.ModelProto()
    m.CopyFrom(net(2, 2))
    conv = next(n for n in m.graph.node if n.name == "conv_a")
    del conv.input[2]
    conv.output[0] = "ya0"
    m.graph.node.insert(1, helper.make_node("Add", ["ya0", "ba4"], ["ya"], name="bias_add"))
    ba = next(numpy_helper.to_array(t) for t in m.graph.initializer if t.name == "ba")
    m.graph.initializer.append(numpy_helper.from_array(ba.reshape(1, MID, 1, 1), "ba4"))
    g = load_model(m)
    assert [lay.kind for lay in g.layers] == [lay.kind for lay in graph("grouped").layers]
    np.testing.assert_array_equal(g.layer("gconv1").params["b"], ba)


@pytest.mark.parametrize("name", list(NETS))
def test_onnxruntime_agrees_with_bnnc_inference(name):
    g = graph(name)
    x, _ = _batch(g, 16, seed=3)
    want = _ort(net(*NETS[name]), x)
    got = infer(g, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# ---- the numpy reference against torch -----------------------------------------------------------

@pytest.mark.parametrize("name", list(NETS) + ["binfirst"])
def test_reference_step_matches_torch(name):
    g = graph(name)
    pair = _Pair(ref, g, make_config("standard", batch=8))
    pair.step(*_batch(g, 8, seed=1), name)


# ---- schedule -----------------------------------------------------------------------------------

def test_grouped_input_is_never_packed():
    g = graph("grouped")
    s = build_schedule(g, make_config("proposed", batch=4))
    # sign1 feeds the binary gconv2: its output stays f32, the layer saves it as bits
    assert s.tensors["sign1.out"].dtype is DType.F32
    assert s.tensors["gconv2.x_saved"].dtype is DType.BIT
    kernels = [str(st.kernel) for st in s.steps if st.layer == "gconv2"]
    assert "gconv_fwd" in kernels and "gconv_dw_bin" in kernels and "gconv_dx_po2" in kernels
    # the first (real) layer reads the caller's batch and keeps an f16 copy for its dW
    assert s.tensors["gconv1.x_saved"].dtype is DType.F16 or "gconv1.x_saved" not in s.tensors


# ---- the emitted C against the reference (bnnc check) --------------------------------------------

CHECKS = {
    "standard": dict(algorithm="standard"),
    "proposed": dict(algorithm="proposed"),
    "proposed_bop": dict(algorithm="proposed", optimizer="bop"),
    # f32 dW from PO2 codes (masked), SGD, f16 state
    "po2_sgd_f16": dict(algorithm="standard", optimizer="sgd", state_dtype="f16", save_bits=True,
                        po2=True),
    # 1-bit dW from f32/f16 gradients: a sign of a float sum that BN's backward makes cancel to
    # ~0 is rounding noise (fc1.dW too), so this one only runs under the sanitizers below
    "binary_dw": dict(algorithm="standard", binary_dw=True, save_bits=True),
}
# every config on the net with binary grouped layers on every kind of input; two on the others
CASES = [("binfirst", c) for c in CHECKS if c != "binary_dw"] + [
    ("grouped", "standard"), ("grouped", "proposed"), ("depthwise", "proposed_bop"),
    ("depthwise", "standard"), ("real", "standard"), ("real", "po2_sgd_f16")]


def _cfg(config: str, batch: int = 4):
    kw = dict(CHECKS[config])
    return make_config(kw.pop("algorithm"), batch=batch, **kw)


@pytest.mark.parametrize("name,config", CASES)
def test_bnnc_check(name, config, tmp_path):
    report = run_check(graph(name), _cfg(config), steps=2, work_dir=tmp_path)
    assert report.ok, format_report(report)


@pytest.mark.skipif(shutil.which("qemu-aarch64") is None, reason="no qemu-aarch64")
def test_bnnc_check_on_rpi4(tmp_path):
    report = run_check(graph("binfirst"), _cfg("proposed_bop"), steps=2, target="rpi4",
                       work_dir=tmp_path)
    assert report.ok, format_report(report)


@pytest.mark.skipif(shutil.which("cc") is None, reason="no host C compiler")
@pytest.mark.parametrize("name,config", [("binfirst", "proposed_bop"), ("grouped", "standard"),
                                         ("binfirst", "binary_dw")])
def test_trainer_is_clean_under_sanitizers(name, config, tmp_path, monkeypatch):
    """The standalone trainer with guard canaries under ASan/UBSan (tests/test_sanitize.py)."""
    monkeypatch.setenv("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0:exitcode=86")
    monkeypatch.setenv("UBSAN_OPTIONS", "print_stacktrace=1:exitcode=87")
    host = load_target("host")
    c = compile_to_c(graph(name), _cfg(config, batch=2), host, tmp_path / "o",
                     guard_bytes=DEFAULT_GUARD_BYTES)
    data = sanitize._dataset(tmp_path / "d.bnnd", c.schedule.tensors["input"].shape[1:], seed=1)
    exe = build_trainer(tmp_path / "o", host, extra_cflags=sanitize.SANITIZE)
    res = LocalRunner(host).run(exe, ["--train", str(data), "--test", str(data), "--steps", "3"],
                                timeout=300)
    sanitize._assert_clean(res, f"{name} {config}")


# ---- export -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(NETS))
def test_export_round_trip(name):
    g = graph(name)
    cfg = make_config("proposed", batch=8)
    st = ref.init_state(g, cfg)
    for seed in range(2):
        st, _ = ref.train_step(g, cfg, st, *_batch(g, 8, seed=seed))
    x, _ = _batch(g, 16, seed=9)
    want = ref.predict(g, cfg, st, x)
    for fmt in ("onnx", "qonnx"):
        m = export_onnx(g, cfg, st.tensors, fmt=fmt)
        convs = [n for n in m.graph.node if n.op_type == "Conv"]
        assert [next(a.i for a in n.attribute if a.name == "group") for n in convs] == \
            [NETS[name][0], NETS[name][1]]
        g2 = load_model(m)
        assert [lay.kind for lay in g2.layers] == [lay.kind for lay in g.layers]
        np.testing.assert_allclose(infer(g2, x), want, rtol=1e-4, atol=1e-5)
        if fmt == "onnx":
            np.testing.assert_allclose(_ort(m, x), want, rtol=1e-4, atol=1e-5)
