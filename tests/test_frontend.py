"""The ONNX/QONNX importer: shipped third-party files, every synthetic form, every rejection path.

Numbers are checked against independent executors: onnxruntime for standard ONNX graphs, onnx's
ReferenceEvaluator with test-local QONNX op implementations (written from the QONNX definitions) for
custom-domain graphs. bnnc's own inference (`runtime.infer`) is under test, never the oracle.
"""

from __future__ import annotations

import glob
import hashlib
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from bnnc.compiler import ir
from bnnc.cli import main
from bnnc.compiler.errors import BnncWarning, ConfigError, ModelError, UnsupportedModelError
from bnnc.compiler.frontend import QUANT_DOMAINS, load_model, sanitize_name
from bnnc.compiler.ir import LayerKind
from bnnc.runtime.infer import infer

MODELS = sorted(glob.glob("/work/shared/models/*/*.onnx"))
F = TensorProto.FLOAT
N = helper.make_node
QONNX = "qonnx.custom_op.general"


# ---------------------------------------------------------------------------------------------
# helpers


def build(nodes, inits, in_shape, *, in_name="x", out="y", opsets=(("", 17),), inputs=None,
          outputs=None) -> onnx.ModelProto:
    g = helper.make_graph(
        nodes, "test", inputs or [helper.make_tensor_value_info(in_name, F, in_shape)],
        outputs or [helper.make_tensor_value_info(out, F, None)],
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    m.ir_version = 9
    return m


def run_ort(m: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def check_ort(m: onnx.ModelProto, x: np.ndarray, tol=1e-4) -> ir.Graph:
    g = load_model(m)
    np.testing.assert_allclose(infer(g, x), run_ort(m, x), rtol=tol, atol=tol)
    return g


def _qonnx_ops(domain: str) -> list[type]:
    """QONNX op semantics (qonnx.custom_op.general), for onnx's reference evaluator."""

    def bipolar(self, x, scale):
        return (np.where(x >= 0, 1.0, -1.0).astype(np.float32) * scale,)

    def quant(self, x, scale, zp, bits, signed=None, narrow=None, rounding_mode=None):
        y = x / scale + zp
        if int(bits) == 1:
            y = np.where(y >= 0, 1.0, -1.0)
        else:
            b = int(bits)
            lo = (-(2 ** (b - 1)) + int(narrow)) if signed else 0
            hi = (2 ** (b - 1) - 1) if signed else (2 ** b - 1 - int(narrow))
            y = np.round(np.clip(y, lo, hi))   # numpy rounds half to even, like qonnx
        return (((y - zp) * scale).astype(np.float32),)

    def multithreshold(self, x, thr, out_dtype=None, out_scale=None, out_bias=None,
                       data_layout=None):
        xm = np.moveaxis(x, 1, -1)[..., None]
        t = thr if thr.shape[0] > 1 else np.broadcast_to(thr, (xm.shape[-2], thr.shape[1]))
        cnt = (xm >= t).sum(axis=-1)
        return ((np.moveaxis(cnt, -1, 1) * out_scale + out_bias).astype(np.float32),)

    return [type(name, (OpRun,), {"op_domain": domain, "_run": fn})
            for name, fn in (("BipolarQuant", bipolar), ("Quant", quant),
                             ("MultiThreshold", multithreshold))]


def run_reference(m: onnx.ModelProto, x: np.ndarray, domain: str = QONNX) -> np.ndarray:
    m2 = onnx.ModelProto()
    m2.CopyFrom(m)
    if all(o.domain != domain for o in m2.opset_import):
        m2.opset_import.append(helper.make_opsetid(domain, 1))
    return ReferenceEvaluator(m2, new_ops=_qonnx_ops(domain)).run(None, {"x": x})[0]


def randn(rng, *shape, scale=1.0) -> np.ndarray:
    return rng.normal(0, scale, shape).astype(np.float32)


def const(name: str, value) -> onnx.NodeProto:
    return N("Constant", [], [name], value=numpy_helper.from_array(np.array(value, np.float32)))


def kinds(g: ir.Graph) -> list[str]:
    return [lay.kind.value for lay in g.layers]


def bn_inits(prefix: str, c: int, rng) -> dict[str, np.ndarray]:
    return {f"{prefix}_g": rng.uniform(0.5, 1.5, c).astype(np.float32),
            f"{prefix}_b": rng.normal(0, 0.3, c).astype(np.float32),
            f"{prefix}_m": rng.normal(0, 1.0, c).astype(np.float32),
            f"{prefix}_v": rng.uniform(0.5, 2.0, c).astype(np.float32)}


def bn_node(prefix: str, x: str, y: str, eps=1e-4) -> onnx.NodeProto:
    return N("BatchNormalization", [x, f"{prefix}_g", f"{prefix}_b", f"{prefix}_m", f"{prefix}_v"],
             [y], name=f"/{prefix}/BatchNormalization", epsilon=eps)


# ---------------------------------------------------------------------------------------------
# shipped files


@pytest.mark.parametrize("path", MODELS, ids=os.path.basename)
def test_shipped_model_imports(path):
    g = load_model(path)
    g.verify()
    with open(path, "rb") as f:
        assert g.source_sha256 == hashlib.sha256(f.read()).hexdigest()
    assert g.name == os.path.basename(path)[:-5]
    assert g.num_classes == 10 and g.input_layout == "NCHW"
    weight_layers = [lay for lay in g.layers if lay.kind in (LayerKind.DENSE, LayerKind.CONV)]
    assert weight_layers and all(lay.binary for lay in weight_layers)
    assert all(set(np.unique(np.sign(lay.params["W"]))) <= {-1.0, 1.0} for lay in weight_layers)
    assert len({lay.onnx_name for lay in weight_layers}) == len(weight_layers)
    if "cnv" in path:
        assert kinds(g)[:3] == ["affine", "input_quant", "conv"]
        q = g.layers[1].attrs
        assert (q["bits"], q["signed"], q["narrow"], q["scale"]) == (8, True, False, 1 / 128)
        assert kinds(g).count("conv") == 6 and kinds(g).count("maxpool") == 2
    if "fc_1w1a" in path:
        assert kinds(g)[:3] == ["flatten", "affine", "sign"]
        # TensorNorm (Sub/Div/Mul/Add, or Sub/Pow/Div/Mul/Add raw) is ONE affine layer
        assert kinds(g)[-1] == "affine" and kinds(g).count("affine") == 2


def test_shipped_weights_keep_latent_values_and_bnnc_layout():
    raw = onnx.load(MODELS[[os.path.basename(p) for p in MODELS].index(
        "torchbnn_detach_ts_fold.onnx")])
    w = numpy_helper.to_array(next(t for t in raw.graph.initializer if t.name == "fc1.weight"))
    g = load_model(raw)
    np.testing.assert_array_equal(g.layer("fc1").params["W"], w.T)   # [in, out], latent floats
    assert not np.all(np.abs(g.layer("fc1").params["W"]) == 1)


def test_foldquant_gives_pm1_latent_weights_marked_binary():
    path = next(p for p in MODELS if p.endswith("cnv_1w1a_small_qonnx_ts_clean_foldquant.onnx"))
    g = load_model(path)
    conv1 = g.layer("conv1")    # reads the 8-bit input quantizer, not a sign: binary by file kind
    assert conv1.binary and np.all(np.abs(conv1.params["W"]) == 1)


# ---------------------------------------------------------------------------------------------
# binarizer idioms (plain ONNX, checked against onnxruntime)


def binarizer(form: str, x: str, p: str) -> tuple[list, str]:
    """Nodes that binarize tensor `x` the way an exporter writes `form`; returns (nodes, output)."""
    if form == "sign":
        return [N("Sign", [x], [f"{p}_s"], name=f"{p}/Sign")], f"{p}_s"
    if form == "detach":
        return [N("Sign", [x], [f"{p}_s"], name=f"{p}/Sign"),
                N("Sub", [f"{p}_s", x], [f"{p}_d"], name=f"{p}/Sub"),
                N("Add", [x, f"{p}_d"], [f"{p}_o"], name=f"{p}/Add")], f"{p}_o"
    if form == "where":
        return [const(f"{p}_z", 0.0),
                N("GreaterOrEqual", [x, f"{p}_z"], [f"{p}_ge"], name=f"{p}/GreaterOrEqual"),
                N("Shape", [x], [f"{p}_sh"], name=f"{p}/Shape"),
                N("ConstantOfShape", [f"{p}_sh"], [f"{p}_one"],
                  value=numpy_helper.from_array(np.array([1], np.float32))),
                N("Neg", [f"{p}_one"], [f"{p}_neg"], name=f"{p}/Neg"),
                N("Where", [f"{p}_ge", f"{p}_one", f"{p}_neg"], [f"{p}_w"], name=f"{p}/Where"),
                N("Sub", [f"{p}_w", x], [f"{p}_d"], name=f"{p}/Sub"),
                N("Add", [x, f"{p}_d"], [f"{p}_o"], name=f"{p}/Add")], f"{p}_o"
    if form == "where_lt":
        return [const(f"{p}_z", 0.0), const(f"{p}_p", 1.0), const(f"{p}_n", -1.0),
                N("Less", [x, f"{p}_z"], [f"{p}_lt"], name=f"{p}/Less"),
                N("Where", [f"{p}_lt", f"{p}_n", f"{p}_p"], [f"{p}_o"], name=f"{p}/Where")], \
            f"{p}_o"
    if form == "larq":
        return [N("Sign", [x], [f"{p}_s"], name=f"{p}/Sign"),
                const(f"{p}_c", 0.1),
                N("Add", [f"{p}_s", f"{p}_c"], [f"{p}_a"], name=f"{p}/Add"),
                N("Sign", [f"{p}_a"], [f"{p}_o"], name=f"{p}/Sign2")], f"{p}_o"
    raise AssertionError(form)


@pytest.mark.parametrize("form", ["sign", "detach", "where", "where_lt", "larq"])
def test_binarizer_idioms_map_to_sign_and_binary_weights(form):
    rng = np.random.default_rng(1)
    w1 = rng.normal(0, 1, (16, 12)).astype(np.float32)       # torch layout [out, in]
    w2 = rng.normal(0, 1, (16, 5)).astype(np.float32)        # [in, out]
    if form in ("where", "where_lt", "larq"):
        w1[3, 4] = w2[0, 0] = 0.0    # these idioms mean sign(0) = +1, like bnnc
    nodes, w1b = binarizer(form, "w1", "/fc1/wq")
    n2, w2b = binarizer(form, "w2", "/fc2/wq")
    na, ab = binarizer(form, "h1", "/act1")
    nodes += [N("Transpose", [w1b], ["w1t"], name="/fc1/Transpose", perm=[1, 0]),
              N("MatMul", ["x", "w1t"], ["m1"], name="/fc1/MatMul"), bn_node("bn1", "m1", "h1"),
              *na, *n2, N("MatMul", [ab, w2b], ["m2"], name="/fc2/MatMul"),
              bn_node("bn2", "m2", "y")]
    inits = {"w1": w1, "w2": w2, **bn_inits("bn1", 16, rng), **bn_inits("bn2", 5, rng)}
    m = build(nodes, inits, ["N", 12])
    x = rng.normal(0, 1, (4, 12)).astype(np.float32)
    g = check_ort(m, x)
    assert kinds(g) == ["dense", "batchnorm", "sign", "dense", "batchnorm"]
    assert [lay.name for lay in g.layers] == ["fc1", "bn1", "sign1", "fc2", "bn2"]
    assert g.layer("fc1").binary and g.layer("fc2").binary
    np.testing.assert_array_equal(g.layer("fc1").params["W"], w1.T)
    np.testing.assert_array_equal(g.layer("fc2").params["W"], w2)
    assert g.layer("fc1").onnx_name == "/fc1/MatMul"


def test_plain_sign_maps_zero_to_plus_one():
    # the documented difference: ONNX Sign(0) = 0, bnnc's SIGN(0) = +1
    m = build([N("Sign", ["x"], ["s"], name="act"), N("MatMul", ["s", "w"], ["y"], name="mm")],
              {"w": np.eye(3, dtype=np.float32) * 2}, [None, 3])
    x = np.array([[0.0, -2.0, 3.0]], np.float32)
    np.testing.assert_array_equal(run_ort(m, x), [[0, -2, 2]])
    np.testing.assert_array_equal(infer(load_model(m), x), [[2, -2, 2]])


# ---------------------------------------------------------------------------------------------
# QONNX / FINN forms (checked against onnx's reference evaluator with QONNX op semantics)


def _qonnx_mlp(domain: str, op: str, rng):
    def q(x, y, scale="one"):
        if op == "Quant":
            return N("Quant", [x, scale, "zero", "bw1"], [y], domain=domain, name=f"Q_{y}",
                     signed=1, narrow=0, rounding_mode="ROUND")
        return N("BipolarQuant", [x, scale], [y], domain=domain, name=f"BQ_{y}")

    nodes = [N("Mul", ["x", "two"], ["xs"], name="Mul_0"),
             N("Sub", ["xs", "one"], ["xc"], name="Sub_0"), q("xc", "a0"), q("w1", "w1b"),
             N("MatMul", ["a0", "w1b"], ["m1"], name="MatMul_0"),
             bn_node("bn1", "m1", "h1"), q("h1", "a1"), q("w2", "w2b"),
             N("MatMul", ["a1", "w2b"], ["m2"], name="MatMul_1"),
             N("Sub", ["m2", "tn_m"], ["t1"], name="Sub_1"),
             N("Div", ["t1", "tn_s"], ["t2"], name="Div_0"),
             N("Mul", ["t2", "tn_g"], ["t3"], name="Mul_1"),
             N("Add", ["t3", "tn_b"], ["y"], name="Add_0")]
    inits = {"two": np.array(2, np.float32), "one": np.array([1], np.float32),
             "zero": np.array(0, np.float32), "bw1": np.array(1, np.float32),
             "w1": rng.normal(0, 1, (10, 8)).astype(np.float32),
             "w2": rng.normal(0, 1, (8, 4)).astype(np.float32), **bn_inits("bn1", 8, rng),
             "tn_m": np.array([0.3], np.float32), "tn_s": np.array([1.7], np.float32),
             "tn_g": np.array([0.8], np.float32), "tn_b": np.array([-0.2], np.float32)}
    return nodes, inits


@pytest.mark.parametrize("domain", QUANT_DOMAINS)
@pytest.mark.parametrize("op", ["BipolarQuant", "Quant"])
def test_qonnx_binarizers_without_custom_opset_import(domain, op):
    rng = np.random.default_rng(2)
    nodes, inits = _qonnx_mlp(domain, op, rng)
    m = build(nodes, inits, [1, 10])     # no opset import for the custom domain
    g = load_model(m)
    assert kinds(g) == ["affine", "sign", "dense", "batchnorm", "sign", "dense", "affine"]
    assert g.layer("fc1").binary and g.layer("fc2").binary
    np.testing.assert_array_equal(g.layer("fc1").params["W"], inits["w1"])
    x = rng.uniform(0, 1, (5, 10)).astype(np.float32)
    np.testing.assert_allclose(infer(g, x), run_reference(m, x, domain), rtol=1e-5, atol=1e-5)


def test_scaled_bipolar_quant_becomes_affine_after_the_layer():
    rng = np.random.default_rng(17)
    nodes = [N("BipolarQuant", ["x", "two"], ["a0"], domain=QONNX, name="BQ_in"),
             N("BipolarQuant", ["w1", "s1"], ["w1b"], domain=QONNX, name="BQ_w1"),
             N("MatMul", ["a0", "w1b"], ["m1"], name="MatMul_0"), bn_node("bn1", "m1", "y")]
    inits = {"two": np.array([2.0], np.float32),
             "s1": rng.uniform(0.1, 1, (1, 5)).astype(np.float32),
             "w1": randn(rng, 6, 5), **bn_inits("bn1", 5, rng)}
    m = build(nodes, inits, [1, 6])
    g = load_model(m)
    # sign -> (x2) -> dense -> (per-output scale) -> bn: the two scales compose into one affine
    assert kinds(g) == ["sign", "affine", "dense", "affine", "batchnorm"]
    np.testing.assert_allclose(g.layer("affine2").params["scale"], inits["s1"].ravel(), rtol=1e-6)
    x = rng.normal(0, 1, (3, 6)).astype(np.float32)
    np.testing.assert_allclose(infer(g, x), run_reference(m, x), rtol=1e-5, atol=1e-5)


def test_finn_multithreshold_sign_and_folded_pm1_weights():
    rng = np.random.default_rng(3)
    w1 = np.where(rng.normal(size=(6, 7)) >= 0, 1.0, -1.0).astype(np.float32)
    w2 = np.where(rng.normal(size=(7, 3)) >= 0, 1.0, -1.0).astype(np.float32)
    mt = dict(domain=QONNX, out_dtype="BIPOLAR", out_scale=2.0, out_bias=-1.0)
    nodes = [N("MultiThreshold", ["x", "thr"], ["a0"], **mt),
             N("MatMul", ["a0", "w1"], ["m1"], name="MatMul_0"), bn_node("bn1", "m1", "h1"),
             N("MultiThreshold", ["h1", "thr"], ["a1"], **mt),
             N("MatMul", ["a1", "w2"], ["y"], name="MatMul_1")]
    m = build(nodes, {"thr": np.zeros((1, 1), np.float32), "w1": w1, "w2": w2,
                      **bn_inits("bn1", 7, rng)}, [1, 6])
    g = load_model(m)
    assert kinds(g) == ["sign", "dense", "batchnorm", "sign", "dense"]
    assert g.layer("sign1").onnx_name == "a0"      # unnamed node: recorded by its output tensor
    assert g.layer("fc1").binary and g.layer("fc2").binary
    x = rng.normal(0, 1, (4, 6)).astype(np.float32)
    x[0, 0] = 0.0     # MultiThreshold counts x >= 0: sign(0) = +1
    np.testing.assert_allclose(infer(g, x), run_reference(m, x), rtol=1e-5, atol=1e-5)


def test_input_quant_8bit_on_network_input_rounds_half_to_even():
    rng = np.random.default_rng(4)
    nodes = [N("Mul", ["x", "two"], ["xs"], name="Mul_0"),
             N("Sub", ["xs", "one"], ["xc"], name="Sub_0"),
             N("Quant", ["xc", "qs", "zero", "bw8"], ["xq"], domain=QONNX, name="Quant_0",
               signed=1, narrow=0, rounding_mode="ROUND"),
             N("BipolarQuant", ["w1", "one"], ["w1b"], domain=QONNX, name="BQ_w1"),
             N("Conv", ["xq", "w1b"], ["c1"], name="Conv_0", kernel_shape=[3, 3],
               pads=[1, 1, 1, 1]),
             bn_node("bn1", "c1", "h1"),
             N("BipolarQuant", ["h1", "one"], ["a1"], domain=QONNX, name="BQ_a1"),
             N("Reshape", ["a1", "shape"], ["f"], name="Reshape_0"),
             N("MatMul", ["f", "w2"], ["y"], name="MatMul_0")]
    inits = {"two": np.array(2, np.float32), "one": np.array([1], np.float32),
             "zero": np.array(0, np.float32), "bw8": np.array(8, np.float32),
             "qs": np.array(1 / 128, np.float32), "shape": np.array([1, -1], np.int64),
             "w1": rng.normal(0, 1, (4, 3, 3, 3)).astype(np.float32),
             "w2": rng.normal(0, 1, (4 * 5 * 5, 3)).astype(np.float32), **bn_inits("bn1", 4, rng)}
    m = build(nodes, inits, [1, 3, 5, 5])
    g = load_model(m)
    assert kinds(g) == ["affine", "input_quant", "conv", "batchnorm", "sign", "flatten", "dense"]
    q = g.layer("quant1").attrs
    assert (q["scale"], q["zero_point"], q["bits"], q["signed"], q["narrow"]) == \
        (1 / 128, 0.0, 8, True, False)
    assert g.layer("conv1").binary and not g.layer("fc1").binary
    x = rng.uniform(0, 1, (1, 3, 5, 5)).astype(np.float32)
    # exact ties after 2x-1 and /scale: (2k+1)/256 -> k + 0.5, which must round to even
    x.ravel()[:6] = ((np.array([0, 1, 2, -3, 126, -129]) + 0.5) / 128 + 1) / 2
    np.testing.assert_allclose(infer(g, x), run_reference(m, x), rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# weight layers


def test_folded_pm1_weights_binary_only_after_a_binary_activation_in_plain_onnx():
    rng = np.random.default_rng(5)
    w = np.where(rng.normal(size=(6, 6)) >= 0, 1.0, -1.0).astype(np.float32)
    nodes = [N("MatMul", ["x", "w"], ["m1"], name="real_in"), N("Sign", ["m1"], ["s1"], name="sg"),
             N("MatMul", ["s1", "w"], ["y"], name="after_sign")]
    g = load_model(build(nodes, {"w": w}, [1, 6]))
    assert not g.layer("fc1").binary and g.layer("fc2").binary


@pytest.mark.parametrize("trans_b,alpha,beta,bias", [(0, 1.0, 1.0, None), (1, 1.0, 1.0, "vec"),
                                                      (1, 0.5, 2.0, "row"), (0, 2.0, 0.5, "vec")])
def test_gemm_real(trans_b, alpha, beta, bias):
    rng = np.random.default_rng(6)
    w = rng.normal(0, 1, (5, 7) if trans_b else (7, 5)).astype(np.float32)
    inits = {"w": w}
    ins = ["x", "w"]
    if bias:
        inits["c"] = rng.normal(0, 1, (5,) if bias == "vec" else (1, 5)).astype(np.float32)
        ins.append("c")
    m = build([N("Gemm", ins, ["y"], name="gemm", transB=trans_b, alpha=alpha, beta=beta)],
              inits, ["N", 7])
    g = check_ort(m, rng.normal(0, 1, (3, 7)).astype(np.float32))
    assert kinds(g) == ["dense"] and not g.layer("fc1").binary
    assert ("b" in g.layer("fc1").params) == bool(bias)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_gemm_binary_bias_goes_into_following_bn(alpha):
    rng = np.random.default_rng(7)
    nodes = [N("Sign", ["w"], ["wb"], name="wsign"),
             N("Gemm", ["x", "wb", "c"], ["g1"], name="gemm", transB=1, alpha=alpha),
             bn_node("bn1", "g1", "y")]
    inits = {"w": rng.normal(0, 1, (4, 6)).astype(np.float32),
             "c": rng.normal(0, 1, 4).astype(np.float32), **bn_inits("bn1", 4, rng)}
    g = check_ort(build(nodes, inits, ["N", 6]), rng.normal(0, 1, (3, 6)).astype(np.float32))
    # a bias before BN folds into its running mean; a scale != 1 stays an AFFINE (BN's eps)
    assert kinds(g) == (["dense", "batchnorm"] if alpha == 1 else ["dense", "affine", "batchnorm"])
    assert g.layer("fc1").binary and "b" not in g.layer("fc1").params


@pytest.mark.parametrize("pads,strides,auto_pad,bias,binary", [
    ([0, 0, 0, 0], [1, 1], None, False, True), ([1, 1, 1, 1], [1, 1], None, True, False),
    ([1, 0, 2, 1], [2, 1], None, True, True), (None, [2, 2], "SAME_UPPER", False, False),
    (None, [2, 2], "SAME_LOWER", True, False), (None, [1, 2], "VALID", False, True)])
def test_conv_geometry(pads, strides, auto_pad, bias, binary):
    rng = np.random.default_rng(8)
    kw = {"strides": strides}
    kw.update({"pads": pads} if pads else {"auto_pad": auto_pad})
    ins = ["x", "wb" if binary else "w"] + (["b"] if bias else [])
    nodes = ([N("Sign", ["w"], ["wb"], name="wsign")] if binary else []) + \
        [N("Conv", ins, ["c"], name="conv", **kw), N("Relu", ["c"], ["r"], name="relu"),
         N("Flatten", ["r"], ["y"], name="flat")]
    inits = {"w": rng.normal(0, 1, (4, 3, 3, 2)).astype(np.float32)}
    if bias:
        inits["b"] = rng.normal(0, 1, 4).astype(np.float32)
    m = build(nodes, inits, ["N", 3, 8, 7])     # SAME_* pads are asymmetric here
    g = check_ort(m, rng.normal(0, 1, (2, 3, 8, 7)).astype(np.float32))
    assert g.layer("conv1").binary == binary
    assert kinds(g)[0] == "conv" and kinds(g)[-1] == "flatten"


def test_folded_bn_mul_add_after_dense_and_conv_becomes_batchnorm():
    rng = np.random.default_rng(9)
    nodes = [N("Sign", ["w1"], ["w1b"], name="s_w1"),
             N("Conv", ["x", "w1b"], ["c1"], name="conv", kernel_shape=[3, 3]),
             N("Mul", ["c1", "g1"], ["c2"], name="bnmul1"),
             N("Add", ["c2", "b1"], ["c3"], name="bnadd1"),
             N("Sign", ["c3"], ["a1"], name="sign_a1"), N("Flatten", ["a1"], ["f"], name="flat"),
             N("Sign", ["w2"], ["w2b"], name="s_w2"), N("MatMul", ["f", "w2b"], ["m2"], name="mm"),
             N("Mul", ["m2", "g2"], ["m3"], name="bnmul2"),
             N("Add", ["m3", "b2"], ["y"], name="bnadd2")]
    inits = {"w1": rng.normal(0, 1, (3, 2, 3, 3)).astype(np.float32),
             "g1": rng.uniform(0.5, 2, (1, 3, 1, 1)).astype(np.float32),
             "b1": rng.normal(0, 1, (1, 3, 1, 1)).astype(np.float32),
             "w2": rng.normal(0, 1, (3 * 4 * 4, 5)).astype(np.float32),
             "g2": rng.uniform(0.5, 2, 5).astype(np.float32), "b2": randn(rng, 5)}
    g = check_ort(build(nodes, inits, ["N", 2, 6, 6]), randn(rng, 3, 2, 6, 6))
    assert kinds(g) == ["conv", "batchnorm", "sign", "flatten", "dense", "batchnorm"]
    bn1, bn2 = g.layer("bn1"), g.layer("bn2")
    np.testing.assert_allclose(bn1.params["gamma"], inits["g1"].ravel())
    np.testing.assert_allclose(bn2.params["beta"], inits["b2"])
    for bn in (bn1, bn2):
        assert bn.attrs["eps"] == 1e-4 and np.all(bn.params["mean"] == 0)
        np.testing.assert_allclose(bn.params["var"] + bn.attrs["eps"], 1.0, rtol=1e-6)
    assert bn2.onnx_name == "bnmul2+bnadd2"


@pytest.mark.parametrize("raw_pow", [False, True])
def test_tensornorm_scalar_chain_is_one_affine(raw_pow):
    rng = np.random.default_rng(10)
    div_by = ["t1", "sd"]
    nodes = [N("Sign", ["w"], ["wb"], name="s_w"), N("MatMul", ["x", "wb"], ["m"], name="mm"),
             N("Sub", ["m", "mu"], ["t1"], name="tn/Sub")]
    if raw_pow:
        nodes.append(N("Pow", ["var", "half"], ["sd"], name="tn/Pow"))
    nodes += [N("Div", div_by, ["t2"], name="tn/Div"),
              N("Mul", ["t2", "gm"], ["t3"], name="tn/Mul"),
              N("Add", ["t3", "bt"], ["y"], name="tn/Add")]
    inits = {"w": rng.normal(0, 1, (6, 4)).astype(np.float32), "mu": np.array([0.4], np.float32),
             "gm": np.array([0.7], np.float32), "bt": np.array([-0.3], np.float32)}
    inits.update({"var": np.array([2.25], np.float32), "half": np.array(0.5, np.float32)}
                 if raw_pow else {"sd": np.array([1.5], np.float32)})
    g = check_ort(build(nodes, inits, ["N", 6]), rng.normal(0, 1, (3, 6)).astype(np.float32))
    assert kinds(g) == ["dense", "affine"]
    aff = g.layer("affine1")
    np.testing.assert_allclose(aff.params["scale"], [0.7 / 1.5], rtol=1e-6)
    np.testing.assert_allclose(aff.params["bias"], [-0.4 * 0.7 / 1.5 - 0.3], rtol=1e-6)


@pytest.mark.parametrize("zero", [False, True])
def test_real_matmul_plus_bias_add_folds_into_b(zero):
    # an untrained export has an all-zero bias: still a trainable parameter, never dropped
    rng = np.random.default_rng(11)
    nodes = [N("MatMul", ["x", "w"], ["m"], name="mm"), N("Add", ["b", "m"], ["h"], name="badd"),
             N("Relu", ["h"], ["r"], name="relu"), N("MatMul", ["r", "w2"], ["y"], name="mm2")]
    inits = {"w": randn(rng, 5, 4), "b": randn(rng, 4) * (0 if zero else 1), "w2": randn(rng, 4, 3)}
    g = check_ort(build(nodes, inits, ["N", 5]), rng.normal(0, 1, (3, 5)).astype(np.float32))
    assert kinds(g) == ["dense", "relu", "dense"]
    np.testing.assert_array_equal(g.layer("fc1").params["b"], inits["b"])


def test_bias_not_folded_when_the_layer_has_another_reader():
    # MatMul -> Identity -> Add(bias) while a Relu also reads the MatMul output: b must stay 0
    rng = np.random.default_rng(16)
    nodes = [N("MatMul", ["x", "w"], ["m"], name="mm"), N("Identity", ["m"], ["i"], name="id"),
             N("Add", ["i", "b"], ["a"], name="badd"), N("Relu", ["m"], ["r"], name="relu"),
             N("Add", ["a", "r"], ["s"], name="res"), N("MatMul", ["s", "w2"], ["y"], name="mm2")]
    inits = {"w": randn(rng, 5, 4), "b": randn(rng, 4), "w2": randn(rng, 4, 2)}
    g = check_ort(build(nodes, inits, ["N", 5]), rng.normal(0, 1, (3, 5)).astype(np.float32))
    assert kinds(g) == ["dense", "relu", "affine", "add", "dense"]   # affines materialize late
    assert "b" not in g.layer("fc1").params


# ---------------------------------------------------------------------------------------------
# pooling, residuals, softmax, pass-through ops, layouts, reshapes


def test_pools_residual_relu_softmax_dropout_identity():
    rng = np.random.default_rng(12)
    nodes = [N("Conv", ["x", "w1"], ["c1"], name="stem", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             N("Relu", ["c1"], ["r1"], name="relu1"),
             N("MaxPool", ["r1"], ["p1"], name="mp", kernel_shape=[3, 3], strides=[2, 2],
               pads=[1, 1, 1, 1]),
             N("Conv", ["p1", "w2"], ["c2"], name="conv2", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             N("Add", ["c2", "p1"], ["res"], name="residual"),
             N("Dropout", ["res", "ratio"], ["d"], name="drop"),
             N("AveragePool", ["d"], ["ap0"], name="ap_excl", kernel_shape=[2, 2],
               pads=[1, 1, 0, 0]),
             N("AveragePool", ["ap0"], ["ap1"], name="ap_incl", kernel_shape=[3, 3], strides=[1, 2],
               pads=[1, 1, 1, 1], count_include_pad=1),
             N("GlobalAveragePool", ["ap1"], ["gap"], name="gap"),
             N("Flatten", ["gap"], ["f"], name="flatten"),
             N("Identity", ["f"], ["fi"], name="ident"),
             N("Gemm", ["fi", "w3", "b3"], ["z"], name="fc", transB=1),
             N("Softmax", ["z"], ["y"], name="softmax", axis=-1)]
    inits = {"w1": rng.normal(0, 1, (4, 3, 3, 3)).astype(np.float32),
             "w2": rng.normal(0, 1, (4, 4, 3, 3)).astype(np.float32),
             "w3": randn(rng, 6, 4), "b3": randn(rng, 6), "ratio": np.array(0.3, np.float32)}
    g = check_ort(build(nodes, inits, ["N", 3, 9, 9]), randn(rng, 2, 3, 9, 9))
    assert kinds(g) == ["conv", "relu", "maxpool", "conv", "add", "avgpool", "avgpool",
                        "global_avgpool", "flatten", "dense", "softmax"]
    assert g.layer("add1").inputs == ("conv2", "pool1")
    assert g.layer("avgpool1").attrs["count_include_pad"] is False
    assert g.layer("avgpool2").attrs["count_include_pad"] is True
    assert g.layer("pool1").attrs["pads"] == (1, 1, 1, 1) and g.layer("pool1").shape == (4, 5, 5)
    assert g.layer("gap1").shape == (4, 1, 1)


def test_nhwc_input_transpose_is_absorbed():
    rng = np.random.default_rng(13)
    nodes = [N("Mul", ["x", "s"], ["xs"], name="scale"),      # per-channel, channel-last constant
             N("Transpose", ["xs"], ["xt"], name="to_nchw", perm=[0, 3, 1, 2]),
             N("Conv", ["xt", "w"], ["c"], name="conv", kernel_shape=[3, 3]),
             N("Flatten", ["c"], ["y"], name="flat")]
    inits = {"s": np.array([1.0, 2.0, -0.5], np.float32),
             "w": rng.normal(0, 1, (2, 3, 3, 3)).astype(np.float32)}
    g = check_ort(build(nodes, inits, ["N", 6, 5, 3]), randn(rng, 2, 6, 5, 3))
    assert g.input_layout == "NHWC" and g.input_shape == (3, 6, 5)
    assert kinds(g) == ["affine", "conv", "flatten"]
    np.testing.assert_array_equal(g.layer("affine1").params["scale"], inits["s"])


@pytest.mark.parametrize("target_as", ["initializer", "constant"])
def test_nhwc_one_channel_input_reshaped_to_nchw_imports(target_as):
    """tf2onnx writes the NHWC -> NCHW change of a one-channel input (a Larq CNN on MNIST) as
    Reshape [N, 28, 28, 1] -> [-1, 1, 28, 28]: a layout no-op that must import like Transpose."""
    rng = np.random.default_rng(21)
    shape = np.array([-1, 1, 6, 5], np.int64)
    nodes = [N("Reshape", ["x", "shape"], ["xt"],
               name="sequential_1/quant_conv2d/QuantConv2D__13"),
             N("Conv", ["xt", "w"], ["c"], name="conv", kernel_shape=[3, 3]),
             N("Flatten", ["c"], ["y"], name="flat")]
    inits = {"w": rng.normal(0, 1, (2, 1, 3, 3)).astype(np.float32)}
    if target_as == "initializer":
        inits["shape"] = shape
    else:
        nodes.insert(0, N("Constant", [], ["shape"], name="shape_const",
                          value=numpy_helper.from_array(shape)))
    g = check_ort(build(nodes, inits, ["N", 6, 5, 1]), randn(rng, 2, 6, 5, 1))
    assert g.input_layout == "NHWC" and g.input_shape == (1, 6, 5)
    assert kinds(g) == ["conv", "flatten"]


def test_reshape_moving_a_non_unit_axis_is_still_refused():
    rng = np.random.default_rng(22)
    nodes = [N("Reshape", ["x", "shape"], ["xt"], name="/bad/Reshape"),
             N("Conv", ["xt", "w"], ["c"], name="conv", kernel_shape=[3, 3]),
             N("Flatten", ["c"], ["y"], name="flat")]
    inits = {"shape": np.array([-1, 2, 6, 5], np.int64),
             "w": rng.normal(0, 1, (2, 2, 3, 3)).astype(np.float32)}
    with pytest.raises(UnsupportedModelError, match=r"'/bad/Reshape'.*not a flatten"):
        load_model(build(nodes, inits, ["N", 6, 5, 2]))


def test_a_dropped_node_is_named_in_one_warning_line(tmp_path, capsys):
    """A node nothing on the way to the output reads (here an LSTM branch) is dropped, and the user
    is told: a BnncWarning from load_model, one `warning:` line from the CLI."""
    rng = np.random.default_rng(23)
    nodes = [N("MatMul", ["x", "w"], ["y"], name="mm"),
             N("LSTM", ["x3", "lw", "lr"], ["lstm_y"], name="unused_lstm", hidden_size=2),
             N("Unsqueeze", ["x", "ax"], ["x3"], name="to_seq")]
    inits = {"w": randn(rng, 4, 3), "lw": randn(rng, 1, 8, 4), "lr": randn(rng, 1, 8, 2),
             "ax": np.array([0], np.int64)}
    m = build(nodes, inits, ["N", 4])
    with pytest.warns(BnncWarning) as rec:
        g = load_model(m)
    assert kinds(g) == ["dense"]
    msgs = [str(r.message) for r in rec]           # in file order
    assert msgs == [f"model 'test': node {n} is on no path to the output 'y'; it is dropped"
                    for n in ("'unused_lstm' (LSTM)", "'to_seq' (Unsqueeze)")]
    path = tmp_path / "m.onnx"
    path.write_bytes(m.SerializeToString())
    assert main(["info", str(path)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert [ln for ln in err if ln.startswith("warning: ")] == [
        f"warning: {x}".replace("model 'test'", path.name) for x in msgs]


def test_zero_sized_input_dimension_is_named():
    m = build([N("MatMul", ["x", "w"], ["y"], name="mm")],
              {"w": np.ones((4, 4), np.float32)}, ["N", 0])
    with pytest.raises(UnsupportedModelError, match=r"dimension 1 is 0"):
        load_model(m)


@pytest.mark.parametrize("file_batch,target", [(4, [4, -1]), ("N", [0, -1]), ("N", [-1, 18]),
                                               (2, [1, 18])])
def test_reshape_flatten_targets_run_at_batch_3(file_batch, target):
    rng = np.random.default_rng(18)
    w = rng.normal(0, 1, (18, 4)).astype(np.float32)
    nodes = [N("Reshape", ["x", "shape"], ["f"], name="/Reshape"),
             N("MatMul", ["f", "w"], ["y"], name="mm")]
    inits = {"shape": np.array(target, np.int64), "w": w}
    g = load_model(build(nodes, inits, [file_batch, 2, 3, 3]))
    assert kinds(g) == ["flatten", "dense"]
    x = rng.normal(0, 1, (3, 2, 3, 3)).astype(np.float32)
    np.testing.assert_allclose(infer(g, x), x.reshape(3, -1) @ w, rtol=1e-5, atol=1e-5)


def test_hardcoded_reshape_1_minus1_is_flatten_for_any_batch():
    rng = np.random.default_rng(14)
    nodes = [N("Reshape", ["x", "shape"], ["f"], name="/Reshape"),
             N("MatMul", ["f", "w"], ["y"], name="mm")]
    m = build(nodes, {"shape": np.array([1, -1], np.int64),
                      "w": rng.normal(0, 1, (2 * 3 * 3, 4)).astype(np.float32)}, [1, 2, 3, 3])
    g = load_model(m)
    assert kinds(g) == ["flatten", "dense"]
    x = rng.normal(0, 1, (3, 2, 3, 3)).astype(np.float32)
    per_sample = np.concatenate([run_ort(m, x[i:i + 1]) for i in range(3)])
    np.testing.assert_allclose(infer(g, x), per_sample, rtol=1e-5, atol=1e-5)


def test_dynamic_view_reshape_and_symbolic_batch():
    # torch's x.view(x.size(0), -1) without constant folding: Shape -> Gather -> Unsqueeze -> Concat
    rng = np.random.default_rng(15)
    nodes = [N("Shape", ["x"], ["sh"], name="shape"),
             N("Gather", ["sh", "i0"], ["n"], name="gather", axis=0),
             N("Unsqueeze", ["n", "ax0"], ["n1"], name="unsq"),
             N("Concat", ["n1", "m1"], ["tgt"], name="concat", axis=0),
             N("Reshape", ["x", "tgt"], ["f"], name="view"),
             N("MatMul", ["f", "w"], ["y"], name="mm")]
    inits = {"i0": np.array(0, np.int64), "ax0": np.array([0], np.int64),
             "m1": np.array([-1], np.int64), "w": rng.normal(0, 1, (12, 3)).astype(np.float32)}
    g = check_ort(build(nodes, inits, ["batch", 3, 2, 2]), randn(rng, 5, 3, 2, 2))
    assert kinds(g) == ["flatten", "dense"] and g.input_shape == (3, 2, 2)


@pytest.mark.parametrize("binary", [False, True])
def test_shared_initializer_gives_independent_parameters(binary):
    w = np.arange(16, dtype=np.float32).reshape(4, 4) / 10 - 0.75
    if binary:
        nodes = [N("Sign", ["w"], ["wb1"], name="s1"), N("Sign", ["w"], ["wb2"], name="s2"),
                 N("MatMul", ["x", "wb1"], ["h"], name="mm1"), N("Sign", ["h"], ["r"], name="a"),
                 N("MatMul", ["r", "wb2"], ["y"], name="mm2")]
    else:
        nodes = [N("MatMul", ["x", "w"], ["h"], name="mm1"), N("Relu", ["h"], ["r"], name="relu"),
                 N("MatMul", ["r", "w"], ["y"], name="mm2")]
    g = load_model(build(nodes, {"w": w}, [1, 4]))
    assert g.layer("fc1").binary == g.layer("fc2").binary == binary
    w1, w2 = g.layer("fc1").params["W"], g.layer("fc2").params["W"]
    np.testing.assert_array_equal(w1, w2)
    assert not np.shares_memory(w1, w2)
    w1[0, 0] = 99.0
    assert w2[0, 0] == w[0, 0]


def test_name_defaults_and_override(tmp_path):
    m = build([N("MatMul", ["x", "w"], ["y"], name="mm")], {"w": np.ones((2, 2), np.float32)},
              [1, 2])
    path = tmp_path / "My-Model.v2.onnx"
    onnx.save(m, path)
    assert load_model(path).name == "my_model_v2"
    assert load_model(str(path), name="custom_1").name == "custom_1"
    assert sanitize_name("9lives") == "model_9lives"
    with pytest.raises(ConfigError, match="Bad-Name"):
        load_model(path, name="Bad-Name")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")   # the TorchScript exporter, on purpose
def test_torch_export_of_residual_binary_cnn(tmp_path):
    """A ResNetE-style net (real stem, binary 3x3 convs with the detach STE, real AvgPool + 1x1
    shortcut, residual adds, real classifier) through torch.onnx.export; torch is the oracle."""
    torch = pytest.importorskip("torch")
    nn = torch.nn

    def bsign(x):
        return x + (torch.where(x >= 0, 1.0, -1.0) - x).detach()

    class BConv(nn.Conv2d):
        def forward(self, x):
            return nn.functional.conv2d(bsign(x), bsign(self.weight), None, self.stride,
                                        self.padding)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
            self.c1, self.bn1 = BConv(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
            self.c2 = BConv(8, 16, 3, stride=2, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(16)
            self.down = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(8, 16, 1, bias=False),
                                      nn.BatchNorm2d(16))
            self.fc = nn.Linear(16, 10)

        def forward(self, x):
            x = torch.relu(self.bn0(self.stem(x)))
            x = x + self.bn1(self.c1(x))
            x = self.down(x) + self.bn2(self.c2(x))
            return self.fc(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))

    torch.manual_seed(0)
    net = Net().eval()
    for mod in net.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    x = torch.randn(3, 3, 16, 16)
    path = tmp_path / "resnet_tiny.onnx"
    torch.onnx.export(net, x, str(path), dynamo=False, opset_version=17, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    g = load_model(path)
    assert kinds(g) == ["conv", "relu", "sign", "conv", "batchnorm", "add", "avgpool", "conv",
                        "sign", "conv", "batchnorm", "add", "global_avgpool", "flatten", "dense"]
    assert [lay.binary for lay in g.layers if lay.kind is LayerKind.CONV] == \
        [False, True, False, True]
    np.testing.assert_array_equal(g.layer("conv2").params["W"], net.c1.weight.detach().numpy())
    with torch.no_grad():
        ref = net(x).numpy()
    np.testing.assert_allclose(infer(g, x.numpy()), ref, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# rejections: each message names the node and its op type


def _simple(nodes, inits, in_shape=(1, 4), **kw):
    return build(nodes, inits, list(in_shape), **kw)


W44 = {"w": np.ones((4, 4), np.float32) * 0.5}


def _reject_unsupported_op():
    return _simple([N("Tanh", ["x"], ["t"], name="/act/Tanh"),
                    N("MatMul", ["t", "w"], ["y"], name="mm")], W44), \
        ["'/act/Tanh'", "Tanh", "unsupported op"]


def _reject_2bit_act():
    return _simple([N("MatMul", ["x", "w"], ["m"], name="mm"),
                    N("Quant", ["m", "s", "z", "b"], ["q"], domain=QONNX, name="/act/Quant2",
                      signed=1, narrow=0),
                    N("MatMul", ["q", "w"], ["y"], name="mm2")],
                   {**W44, "s": np.array(0.5, np.float32), "z": np.array(0, np.float32),
                    "b": np.array(2, np.float32)}), ["'/act/Quant2'", "Quant", "bit width 2"]


def _reject_8bit_not_on_input():
    return _simple([N("MatMul", ["x", "w"], ["m"], name="mm"),
                    N("Quant", ["m", "s", "z", "b"], ["q"], domain=QONNX, name="/mid/Quant8",
                      signed=1, narrow=0),
                    N("MatMul", ["q", "w"], ["y"], name="mm2")],
                   {**W44, "s": np.array(0.5, np.float32), "z": np.array(0, np.float32),
                    "b": np.array(8, np.float32)}), ["'/mid/Quant8'", "Quant", "bit width 8",
                                                      "on an activation"]


def _reject_dynamic_shape():
    return _simple([N("MatMul", ["x", "w"], ["y"], name="mm")], W44, ("N", "F")), \
        ["graph input 'x'", "'F'", "symbolic"]


def _reject_cycle():
    return _simple([N("Add", ["x", "b"], ["a"], name="/loop/A"),
                    N("Relu", ["a"], ["b"], name="/loop/B"),
                    N("MatMul", ["b", "w"], ["y"], name="mm")], W44), ["cycle", "/loop/A", "Add"]


def _reject_dangling():
    return _simple([N("MatMul", ["x", "w_missing"], ["y"], name="/fc1/MatMul")], {}), \
        ["'/fc1/MatMul'", "MatMul", "'w_missing'"]


def _reject_two_inputs():
    inputs = [helper.make_tensor_value_info(n, F, [1, 4]) for n in ("x", "x2")]
    return _simple([N("Add", ["x", "x2"], ["y"], name="add")], {}, inputs=inputs), \
        ["2 inputs", "'x'", "'x2'"]


def _reject_two_outputs():
    outs = [helper.make_tensor_value_info(n, F, None) for n in ("y", "m")]
    return _simple([N("MatMul", ["x", "w"], ["m"], name="mm"), N("Relu", ["m"], ["y"], name="r")],
                   W44, outputs=outs), ["2 outputs", "'y'", "'m'"]


def _reject_group_conv():
    return _simple([N("Conv", ["x", "w"], ["c"], name="/dw/Conv", group=3, kernel_shape=[1, 1]),
                    N("Flatten", ["c"], ["y"], name="f")],
                   {"w": np.ones((4, 1, 1, 1), np.float32)}, (1, 2, 3, 3)), ["'/dw/Conv'", "Conv",
                                                                              "group=3"]


def _reject_nan_weight():
    w = np.ones((4, 4), np.float32)
    w[1, 2] = np.nan
    return _simple([N("MatMul", ["x", "w"], ["y"], name="/fc/MatMul")], {"w": w}), \
        ["'/fc/MatMul'", "MatMul", "NaN or Inf"]


def _reject_transpose_activation():
    # ([0, 2, 3, 1] before a Flatten is tf2onnx's NHWC flatten: tests/test_layout_idioms.py)
    return _simple([N("Transpose", ["x"], ["t"], name="/odd/Transpose", perm=[0, 1, 3, 2]),
                    N("Flatten", ["t"], ["y"], name="f")], {}, (1, 2, 3, 3)), \
        ["'/odd/Transpose'", "Transpose", "perm [0, 1, 3, 2]"]


def _reject_bad_reshape():
    return _simple([N("Reshape", ["x", "s"], ["r"], name="/bad/Reshape"),
                    N("Flatten", ["r"], ["y"], name="f")], {"s": np.array([1, 3, 2, 2], np.int64)},
                   (1, 2, 3, 2)), ["'/bad/Reshape'", "Reshape", "not a flatten"]


def _reject_softmax_not_last():
    return _simple([N("Softmax", ["x"], ["s"], name="/sm/Softmax"),
                    N("MatMul", ["s", "w"], ["y"], name="mm")], W44), \
        ["'/sm/Softmax'", "Softmax", "not the last layer"]


def _reject_wide_threshold():
    return _simple([N("MultiThreshold", ["x", "t"], ["a"], domain=QONNX, name="/mt/MT",
                      out_scale=1.0, out_bias=0.0, out_dtype="UINT2"),
                    N("MatMul", ["a", "w"], ["y"], name="mm")],
                   {**W44, "t": np.array([[-1.0, 0.0, 1.0]], np.float32)}), \
        ["'/mt/MT'", "MultiThreshold", "not a single threshold at 0"]


def _reject_ceil_mode():
    return _simple([N("MaxPool", ["x"], ["p"], name="/pool/MaxPool", kernel_shape=[2, 2],
                      strides=[2, 2], ceil_mode=1), N("Flatten", ["p"], ["y"], name="f")], {},
                   (1, 2, 5, 5)), ["'/pool/MaxPool'", "MaxPool", "ceil_mode"]


REJECTIONS = [_reject_ceil_mode, _reject_unsupported_op, _reject_2bit_act,
              _reject_8bit_not_on_input, _reject_dynamic_shape, _reject_cycle, _reject_dangling,
              _reject_two_inputs, _reject_two_outputs, _reject_group_conv, _reject_nan_weight,
              _reject_transpose_activation, _reject_bad_reshape, _reject_softmax_not_last,
              _reject_wide_threshold]


@pytest.mark.parametrize("case", REJECTIONS, ids=lambda f: f.__name__[8:])
def test_rejections_name_node_and_reason(case, tmp_path):
    m, expected = case()
    path = tmp_path / "bad_model.onnx"
    onnx.save(m, path)
    with pytest.raises(ModelError) as e:
        load_model(path)
    for text in expected:
        assert text in e.value.message, (text, e.value.message)
    assert "bad_model.onnx" in e.value.message
    assert e.value.hint is None or e.value.hint.strip()


def test_unsupported_errors_are_unsupported_model_errors():
    m, _ = _reject_unsupported_op()
    with pytest.raises(UnsupportedModelError):
        load_model(m)


@pytest.mark.parametrize("content", [b"", b"not an onnx file at all \x00\x01\x02",
                                     "truncated"])
def test_non_onnx_and_truncated_files(tmp_path, content):
    if content == "truncated":
        with open(MODELS[0], "rb") as f:
            content = f.read()[:5000]
    path = tmp_path / "broken.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelError, match="broken.onnx"):
        load_model(path)


def test_missing_file():
    with pytest.raises(ModelError, match="nope.onnx"):
        load_model("/nonexistent/nope.onnx")
