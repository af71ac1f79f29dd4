"""A file's trained state survives every algorithm and BN switch (compiler/README.md, "Trained state
under l1 batch norm"): the emitted C's step-0 predictions (host, cffi) equal onnxruntime's on the
source file, for models whose batch norms have non-trivial and negative gamma; where no exact l1
conversion exists, one BnncWarning gives the measured difference."""

from __future__ import annotations

import glob
import os
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnnc.compiler import numerics as nx
from bnnc.compiler.config import make_config
from bnnc.compiler.errors import BnncWarning
from bnnc.compiler.frontend import load_model
from bnnc.compiler.pipeline import compile_to_c
from bnnc.compiler.target import load_target
from bnnc.runtime import reference as ref
from bnnc.runtime.check import run_check
from bnnc.runtime.host import HostProgram

B = 32


class _Onnx:
    """A small plain-ONNX BNN written node by node (binarizers as Where(x >= 0, 1, -1))."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.k = [], [], 0
        self.const("zero", 0.0), self.const("one", 1.0), self.const("minus_one", -1.0)

    def const(self, name, v):
        self.inits.append(numpy_helper.from_array(np.asarray(v, np.float32), name))
        return name

    def node(self, op, ins, **attrs):
        self.k += 1
        out = f"t{self.k}"
        self.nodes.append(helper.make_node(op, ins, [out], name=f"{op}_{self.k}", **attrs))
        return out

    def sign(self, x):
        return self.node("Where", [self.node("GreaterOrEqual", [x, "zero"]), "one", "minus_one"])

    def weight(self, shape):
        self.k += 1
        return self.sign(self.const(f"w{self.k}", self.rng.standard_normal(shape)))

    def bn(self, x, c, negative, near_ties=False):
        """BN with gamma of magnitude 0.3..2 (a share of it negative), beta, mean, var random;
        `near_ties`: half the channels get beta 0 and a mean 0.004 above an even integer in
        [16, 32), a threshold 16-bit round to nearest moves onto that integer."""
        g = self.rng.uniform(0.3, 2.0, c) * np.where(self.rng.random(c) < negative, -1, 1)
        params = [g, self.rng.uniform(-1, 1, c), self.rng.normal(0, 2, c),
                  self.rng.uniform(2, 30, c)]
        if near_ties:
            half = np.arange(c) % 2 == 0
            params[1] = np.where(half, 0.0, params[1])
            params[2] = np.where(half, 2 * self.rng.integers(8, 16, c) + 0.004, params[2])
        self.k += 1
        names = [self.const(f"bn{self.k}.{f}", v) for f, v in zip("gbmv", params)]
        return self.node("BatchNormalization", [x] + names, epsilon=1e-4)

    def model(self, x_shape, out, classes):
        g = helper.make_graph(
            self.nodes, "m",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *x_shape])],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", classes])], self.inits)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def mlp(seed=0, *, binary_input=False, negative=0.4, near_ties=False):
    """64 inputs [-> sign] -> 48 -> BN -> sign -> 32 -> BN -> sign -> 10 -> BN -> softmax."""
    m = _Onnx(seed)
    x = m.node("Flatten", ["x"], axis=1)
    if binary_input:
        x = m.sign(x)
    for n_in, n_out in ((64, 48), (48, 32)):
        x = m.sign(m.bn(m.node("MatMul", [x, m.weight((n_in, n_out))]), n_out, negative,
                        near_ties))
    x = m.bn(m.node("MatMul", [x, m.weight((32, 10))]), 10, negative)
    return m.model((1, 8, 8), m.node("Softmax", [x], axis=1), 10)


def cnn(seed=0, *, pool_before_bn=False, negative=0.4):
    """conv 3x3 (pads 1) -> BN -> maxpool -> sign -> conv 3x3 -> BN -> sign -> maxpool -> dense ->
    BN -> softmax; `pool_before_bn` moves the first max-pool between the conv and its BN."""
    m = _Onnx(seed)
    x = m.node("Conv", ["x", m.weight((6, 1, 3, 3))], pads=[1, 1, 1, 1], kernel_shape=[3, 3])
    pool = lambda t: m.node("MaxPool", [t], kernel_shape=[2, 2], strides=[2, 2])  # noqa: E731
    x = m.bn(pool(x), 6, negative) if pool_before_bn else pool(m.bn(x, 6, negative))
    x = m.sign(x)
    x = m.sign(m.bn(m.node("Conv", [x, m.weight((8, 6, 3, 3))], kernel_shape=[3, 3]), 8, negative))
    x = m.node("Flatten", [pool(x)], axis=1)
    x = m.bn(m.node("MatMul", [x, m.weight((8, 10))]), 10, negative)
    return m.model((1, 8, 8), m.node("Softmax", [x], axis=1), 10)


def inputs(seed=1, n=B):
    """Inputs on a 1/128 grid in [-1, 1) (8-bit pixels)."""
    return (np.random.default_rng(seed).integers(-128, 128, (n, 1, 8, 8)) / 128).astype(np.float32)


def onnxruntime_probs(model, x):
    return ort.InferenceSession(model.SerializeToString(),
                                providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def c_step0_probs(model, cfg, x, tmp_path):
    graph = load_model(model)
    compile_to_c(graph, cfg, load_target("host"), tmp_path, command="test_trained_state")
    prog = HostProgram(tmp_path, debug=False)
    prog.load_state(ref.init_state(graph, cfg).tensors, step=0, seed=cfg.seed)
    return prog.predict(x)


EXACT = {   # float32 state: every conversion is exact up to float rounding (proposed with l1 and
    # f32 state: the conv test below; with 16-bit state: the 16-bit test)
    "standard": make_config("standard", batch=B),
    "standard --bn l1": make_config("standard", batch=B, bn="l1"),
    "proposed f32 --bn l2": make_config("proposed", batch=B, state_dtype="f32", bn="l2"),
    "proposed f32 bop": make_config("proposed", batch=B, state_dtype="f32", optimizer="bop"),
}


@pytest.mark.parametrize("name", list(EXACT))
def test_step0_of_the_c_equals_onnxruntime_under_every_algorithm(name, tmp_path):
    model, x = mlp(), inputs()
    want = onnxruntime_probs(model, x)
    got = c_step0_probs(model, EXACT[name], x, tmp_path)
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert (got.argmax(1) == want.argmax(1)).all()


# proposed with 1-bit saves (the default): this small CNN (8 channels, 2x2 maps) once made GCC 12.2
# -O3 drop every store of the packed sign's kernel (templates/kernels/act.c.j2), which
# test_small_cnn_passes_bnnc_check below pins
def test_conv_bn_with_negative_gamma_before_a_maxpool(tmp_path):
    # the sign of gamma goes into the conv's output channels, so max-pool still picks the same
    model, x = cnn(), inputs()
    cfg = make_config("proposed", batch=B, state_dtype="f32")
    np.testing.assert_allclose(c_step0_probs(model, cfg, x, tmp_path),
                               onnxruntime_probs(model, x), atol=2e-5)


@pytest.mark.parametrize("dtype,bn", [("bf16", "l1"), ("bf16", "l2")])
def test_16bit_state_keeps_every_sign_decision_over_integer_inputs(dtype, bn, tmp_path):
    # bf16/f16 BN statistics: thresholds fitted so the hidden signs are exact (the input is
    # binarized, so every BN reads integers; half the hidden thresholds sit 0.004 above an
    # attainable integer); only the last BN's logits carry 16-bit rounding
    model, x = mlp(binary_input=True, near_ties=True), inputs(n=B)
    cfg = make_config("proposed", batch=B, state_dtype=dtype, bn=bn)
    want = onnxruntime_probs(model, x)
    got = c_step0_probs(model, cfg, x, tmp_path)
    assert (got.argmax(1) == want.argmax(1)).all()
    np.testing.assert_allclose(got, want, atol=2e-2)
    # every SIGN output equals the float32 state's; with round to nearest alone it would not
    graph = load_model(model)
    f32 = make_config("proposed", batch=B, state_dtype="f32", bn=bn)
    rne = {k: (v if k.endswith((".m", ".v")) else nx.store(v, dtype))
           for k, v in ref.init_state(graph, f32).tensors.items()}
    acts = []
    for c, tensors in ((cfg, ref.init_state(graph, cfg).tensors),
                       (f32, ref.init_state(graph, f32).tensors), (cfg, rne)):
        run = ref.RefRun(graph, c, tensors, np.dtype(np.float32), training=False)
        ref.forward(run, x)
        acts.append(run.acts)
    signs = [lay.name for lay in graph.layers if lay.kind.value == "sign"]
    assert len(signs) == 3
    for name in signs:
        np.testing.assert_array_equal(acts[0][name], acts[1][name])
    assert any(not np.array_equal(acts[2][name], acts[1][name]) for name in signs)


def test_negative_gamma_without_a_producer_of_its_own_warns_with_the_difference():
    graph = load_model(cnn(pool_before_bn=True, negative=0.5))
    with pytest.warns(BnncWarning) as rec:
        ref.init_state(graph, make_config("proposed", batch=B))
    (w,) = [r for r in rec if issubclass(r.category, BnncWarning)]
    msg = str(w.message)
    assert "gamma < 0" in msg and "bn1" in msg and "differ from the file's for" in msg
    assert "\n" not in msg
    # --bn l2 keeps it: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", BnncWarning)
        ref.init_state(graph, make_config("proposed", batch=B, bn="l2"))


def test_a_file_with_positive_gamma_converts_without_a_warning():
    graph = load_model(mlp(negative=0.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", BnncWarning)
        ref.init_state(graph, make_config("proposed", batch=B))


def test_conversion_moves_the_sign_into_the_weights():
    graph = load_model(mlp())
    cfg = make_config("proposed", batch=B, state_dtype="f32")
    st = ref.init_state(graph, cfg).tensors
    gamma = graph.layer("bn1").params["gamma"]
    w = graph.layer("fc1").params["W"]
    neg = gamma < 0
    assert neg.any() and (~neg).any()
    np.testing.assert_array_equal(np.sign(st["fc1.W"][:, neg]), -np.sign(w[:, neg]))
    np.testing.assert_array_equal(st["fc1.W"][:, ~neg], w[:, ~neg])
    np.testing.assert_array_equal(st["bn1.running_mean"][neg],
                                  -graph.layer("bn1").params["mean"][neg])


SHARED = "/work/shared/models"
SHARED_FILES = sorted(glob.glob(f"{SHARED}/*/*.onnx"))


def _reference_output(path):
    d = os.path.dirname(path)
    stem = os.path.basename(path).split("_qonnx")[0].split("_ts_fold")[0].split("_finn")[0]
    io = np.load(os.path.join(d, stem + ".io.npz"))
    return io["input"], io["output"].reshape(len(io["input"]), -1)


@pytest.mark.parametrize("path", SHARED_FILES, ids=os.path.basename)
@pytest.mark.parametrize("dtype", ["f32", "bf16", "f16"])
def test_third_party_files_at_step0_under_proposed(path, dtype):
    # the numpy reference (which `bnnc check` holds the C to) at step 0 under l1 BN, against the
    # source framework's output: the Brevitas files' hidden BNs read +-1 or 8-bit-quantized inputs
    # (thresholds fitted even in 16 bits) and end in a constant TensorNorm, so they are exact; the
    # PyTorch files' first layer reads real pixels and their last BN feeds the softmax, so 16-bit
    # state rounds those (top-1 kept)
    x, want = _reference_output(path)
    graph = load_model(path)
    cfg = make_config("proposed", batch=len(x), state_dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BnncWarning)
        got = ref.predict(graph, cfg, ref.init_state(graph, cfg), x)
    want = np.exp(want - want.max(1, keepdims=True))
    want /= want.sum(1, keepdims=True)
    assert (got.argmax(1) == want.argmax(1)).all()
    if dtype == "f32" or "brevitas" in path:
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_small_cnn_passes_bnnc_check(tmp_path):
    # a sign feeding a max-pool over 8-channel 2x2 maps: every tensor of the C equals the reference
    report = run_check(load_model(cnn()), make_config("proposed", batch=B), steps=1,
                       work_dir=tmp_path)
    assert report.ok, [r.name for r in report.failures]
