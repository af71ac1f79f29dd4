"""The model zoo (compiler/zoo.py, `bnnc zoo`): weight counts, determinism, validity, semantics.

Semantics are checked against references that do not share code with the zoo: hand-counted weights
(ALGORITHM.md §5, Larq Zoo's published parameter counts), the Brevitas CNV/TFC/SFC exports in
/work/shared/models, onnxruntime, and a PyTorch re-implementation of each architecture written
from the spec in this file. The importer round trip runs once compiler/frontend.py and
runtime/infer.py exist.
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from bnnc.compiler.errors import BnncError, ConfigError
from bnnc.compiler.zoo import QONNX_DOMAIN, ZOO, build_zoo_model, zoo_weight_count

SHARED = Path("/work/shared/models/brevitas")

# Hand counts (conv Cin*Cout*9, dense in*out):
#   mlp  784*256 + 3*256*256 + 256*10                                            =    399,872
#   tfc  784*64 + 2*64*64 + 64*10                                                =     59,008
#   sfc  784*256 + 2*256*256 + 256*10                                            =    334,336
#   lfc  784*1024 + 2*1024*1024 + 1024*10                                        =  2,910,208
#   cnv  9*(3*64 + 64*64 + 64*128 + 128*128 + 128*256 + 256*256) + 256*512 + 512*512 + 512*10
#                                                                                =  1,542,848
#   binarynet 9*(3*128 + 128*128 + 128*256 + 256*256 + 256*512 + 512*512)
#             + 8192*1024 + 1024*1024 + 1024*10                                  = 14,022,016
#   resnet18 (E and Bi-Real): stem 3*64*49 = 9,408; 16 binary 3x3 convs
#             9*(4*64*64 + 64*128 + 3*128*128 + 128*256 + 3*256*256 + 256*512 + 3*512*512)
#             = 11,157,504;
#             shortcuts 64*128 + 128*256 + 256*512 = 172,032; dense 512*1000 + 1000 = 513,000
#                                                                                = 11,679,912
WEIGHTS = {"mlp": 399_872, "tfc": 59_008, "sfc": 334_336, "lfc": 2_910_208, "cnv": 1_542_848,
           "binarynet": 14_022_016, "resnete18": 11_679_912, "birealnet18": 11_679_912}
# Larq Zoo docs (resnet_e.py / birealnet.py "Parameters"): Keras counts BN gamma, beta, mean, var
LARQ_PARAMS = {"resnete18": 11_699_368, "birealnet18": 11_699_112}

# small variants that onnxruntime / torch / the importer run quickly
SMALL = {"mlp": {}, "tfc": {}, "cnv": {"width": 0.25}, "binarynet": {"width": 0.125},
         "resnete18": {"width": 0.125, "image_size": 32},
         "birealnet18": {"width": 0.125, "image_size": 32}}


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _bn_param_names(model: onnx.ModelProto) -> list[str]:
    return [n for node in model.graph.node if node.op_type == "BatchNormalization"
            for n in node.input[1:]]


def _weight_count(model: onnx.ModelProto) -> int:
    """Every non-scalar initializer that is not a BN parameter: conv/dense weights, dense bias."""
    bn = set(_bn_param_names(model))
    return sum(a.size for n, a in _inits(model).items() if n not in bn and a.ndim > 0)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _input_shape(model: onnx.ModelProto, batch: int) -> list[int]:
    return [batch] + [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]


def _randomize_bn(model: onnx.ModelProto, seed: int) -> onnx.ModelProto:
    """A copy whose BN parameters are random (the zoo's identity BN would hide a misplaced BN)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    rng = np.random.default_rng(seed)
    bn = set(_bn_param_names(out))
    for init in out.graph.initializer:
        if init.name in bn:
            n = numpy_helper.to_array(init).shape
            field = init.name.rsplit(".", 1)[1]
            # negative gammas too: with gamma > 0, sign(BN(.)) is monotone and commutes with
            # max-pool, so a pool on the wrong side of BN + sign would go unnoticed
            gamma = rng.uniform(0.2, 0.6, n) * rng.choice([-1.0, 1.0], n)
            val = {"weight": gamma, "bias": rng.normal(0, 0.3, n),
                   "running_mean": rng.normal(0, 2.0, n),
                   "running_var": rng.uniform(0.5, 4.0, n)}[field]
            init.CopyFrom(numpy_helper.from_array(val.astype(np.float32), init.name))
    return out


def _ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


def _x(model: onnx.ModelProto, batch: int = 3, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, _input_shape(model, batch)).astype(np.float32)


# ---- weight counts -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(WEIGHTS))
def test_weight_counts(name):
    kw = {"image_size": 32} if ZOO[name].imagenet else {}   # counts do not depend on the image size
    model = build_zoo_model(name, **kw)
    assert _weight_count(model) == WEIGHTS[name]
    assert zoo_weight_count(name) == WEIGHTS[name]
    if name in LARQ_PARAMS:
        bn_params = sum(_inits(model)[n].size for n in _bn_param_names(model))
        assert _weight_count(model) + bn_params == LARQ_PARAMS[name]


def test_width_and_classes_scale_counts():
    # FINN CNV small = every CNV width / 4: 9*(3*16 + 16*16 + 16*32 + 32*32 + 32*64 + 64*64)
    #                                      + 64*128 + 128*128 + 128*10
    assert zoo_weight_count("cnv", width=0.25) == 97_712
    assert zoo_weight_count("mlp", num_classes=2) == 784 * 256 + 3 * 256 * 256 + 256 * 2
    assert zoo_weight_count("tfc", width=0.001) == 784 + 1 + 1 + 10   # widths floor at 1


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared Brevitas exports not present")
@pytest.mark.parametrize("name,kw,ref,binary_input", [
    ("cnv", {"width": 0.25}, "cnv_1w1a_small_qonnx_ts_clean.onnx", False),
    ("tfc", {}, "tfc_1w1a_qonnx_ts_clean.onnx", True),
    ("sfc", {}, "sfc_1w1a_qonnx_ts_clean.onnx", True)])
def test_topology_matches_brevitas_export(name, kw, ref, binary_input):
    """Same weight shapes and conv/dense -> BN -> sign (-> pool) order as FINN's own models."""
    theirs, ours = onnx.load(str(SHARED / ref)), build_zoo_model(name, fmt="qonnx", **kw)

    def weight_shapes(m):
        inits = _inits(m)
        quant_src = {n.output[0]: n.input[0] for n in m.graph.node if n.op_type == "BipolarQuant"}
        return [inits[quant_src[n.input[1]]].shape for n in m.graph.node
                if n.op_type in ("Conv", "MatMul")]

    def main_path(m):
        inits = {i.name for i in m.graph.initializer}
        keep = ("Conv", "MatMul", "BatchNormalization", "BipolarQuant", "MaxPool")
        return [n.op_type for n in m.graph.node if n.op_type in keep and n.input[0] not in inits]

    assert weight_shapes(ours) == weight_shapes(theirs)
    # Brevitas ends in a "TensorNorm" (Sub/Div/Mul/Add) where the paper's nets have a last BN
    theirs_path = main_path(theirs)
    if binary_input:
        # Brevitas' TFC/SFC binarize the network input; the paper's first layer sees it real
        assert theirs_path[0] == "BipolarQuant"
        theirs_path = theirs_path[1:]
    assert main_path(ours) == theirs_path + ["BatchNormalization"]


# ---- determinism ---------------------------------------------------------------------------------

def test_deterministic_bytes_and_seed():
    a = build_zoo_model("cnv", width=0.25).SerializeToString()
    assert a == build_zoo_model("cnv", width=0.25).SerializeToString()
    q = build_zoo_model("resnete18", fmt="qonnx", width=0.125, image_size=32, seed=3)
    assert q.SerializeToString() == build_zoo_model("resnete18", fmt="qonnx", width=0.125,
                                                    image_size=32, seed=3).SerializeToString()
    m0, m1 = build_zoo_model("mlp", seed=0), build_zoo_model("mlp", seed=1)
    assert m0.graph.node == m1.graph.node
    w0, w1 = _inits(m0), _inits(m1)
    for n in ("fc1.weight", "fc5.weight"):
        assert w0[n].shape == w1[n].shape and not np.array_equal(w0[n], w1[n])
    assert np.array_equal(w0["bn1.running_var"], w1["bn1.running_var"])
    assert m0.producer_name == "bnnc-zoo"


def test_weight_init_and_bn_init():
    m = build_zoo_model("lfc")
    w = _inits(m)
    fc2 = w["fc2.weight"]
    assert fc2.dtype == np.float32 and fc2.shape == (1024, 1024)
    # N(0, 1/fan_in): std 1/32; the estimate from 1M samples has a relative sd of ~0.07 %
    assert abs(fc2.std() * 32 - 1) < 5e-3 and abs(fc2.mean()) < 2e-4
    assert abs(w["fc1.weight"].std() * 28 - 1) < 5e-3   # fan_in 784
    for node in (n for n in m.graph.node if n.op_type == "BatchNormalization"):
        g, b, mu, var = (w[i] for i in node.input[1:])
        assert (g == 1).all() and (b == 0).all() and (mu == 0).all() and (var == 1).all()
        assert _attrs(node)["epsilon"] == pytest.approx(1e-4) and \
            _attrs(node)["momentum"] == pytest.approx(0.9)


# ---- every model, both formats -------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["onnx", "qonnx"])
@pytest.mark.parametrize("name", list(ZOO))
def test_serializes_and_checks(name, fmt):
    model = build_zoo_model(name, fmt=fmt)
    data = model.SerializeToString()
    assert onnx.load_from_string(data).graph.output[0].name == "probs"
    ops = Counter(n.op_type for n in model.graph.node)
    assert "Sign" not in ops   # ONNX Sign(0) = 0 would disagree with bnnc's sign
    inits = {i.name for i in model.graph.initializer}
    binary = [n for n in model.graph.node if n.op_type in ("Conv", "MatMul")
              and n.input[1] not in inits]
    if fmt == "onnx":
        onnx.checker.check_model(model)
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        dims = inferred.graph.output[0].type.tensor_type.shape.dim
        assert [d.dim_param or d.dim_value for d in dims] == ["N", ZOO[name].num_classes]
        assert "BipolarQuant" not in ops and ops["Where"] == ops["GreaterOrEqual"]
    else:
        assert {(o.domain, o.version) for o in model.opset_import} == {("", 17), (QONNX_DOMAIN, 1)}
        quants = [n for n in model.graph.node if n.op_type == "BipolarQuant"]
        assert quants and all(n.domain == QONNX_DOMAIN for n in quants)
        assert "Where" not in ops and "GreaterOrEqual" not in ops
    # the network input is never binarized; every binary weight comes from a float initializer
    assert all(n.input[0] != "input" for n in model.graph.node
               if n.op_type in ("Where", "GreaterOrEqual", "BipolarQuant"))
    producers = {n.output[0]: n for n in model.graph.node}
    for n in binary:
        src = producers[n.input[1]]
        root = src.input[0] if fmt == "qonnx" else producers[src.input[0]].input[0]
        assert root in inits and root.endswith(".weight")
    n_real = {"resnete18": 4, "birealnet18": 4}.get(name, 0)  # stem + 3 shortcuts (+ dense below)
    real = [n for n in model.graph.node if n.op_type in ("Conv", "MatMul") and n.input[1] in inits]
    assert len(real) == (n_real + 1 if n_real else 0)


def test_imagenet_structure():
    r = build_zoo_model("resnete18", image_size=224)
    b = build_zoo_model("birealnet18", image_size=224)
    rops, bops = Counter(n.op_type for n in r.graph.node), Counter(n.op_type for n in b.graph.node)
    assert rops["Add"] == bops["Add"] == 16 + 1            # 16 residual adds + the dense bias
    assert rops["Relu"] == 2 and bops["Relu"] == 0          # Larq: ResNetE stem + final ReLU only
    assert rops["BatchNormalization"] == bops["BatchNormalization"] + 1 == 2 + 16 + 3
    assert rops["AveragePool"] == bops["AveragePool"] == 3
    stem = next(n for n in r.graph.node if n.op_type == "Conv")
    assert _attrs(stem)["pads"] == [2, 2, 3, 3] and _attrs(stem)["strides"] == [2, 2]  # TF 'same'
    bn_eps = {round(_attrs(n)["epsilon"], 8) for n in b.graph.node
              if n.op_type == "BatchNormalization"}
    assert bn_eps == {1e-3}
    assert [d.dim_value for d in r.graph.input[0].type.tensor_type.shape.dim[1:]] == [3, 224, 224]


def test_bad_options():
    with pytest.raises(ConfigError, match="choose one of: mlp, tfc"):
        build_zoo_model("resnet50")
    for kw, msg in [({"fmt": "tflite"}, "format"), ({"width": 0}, "width"),
                    ({"image_size": 64}, "image-size"), ({"num_classes": 1}, "classes"),
                    ({"seed": -1}, "seed")]:
        with pytest.raises(ConfigError, match=msg):
            build_zoo_model("mlp", **kw)
    with pytest.raises(ConfigError, match="image-size"):
        build_zoo_model("resnete18", image_size=0)


# ---- semantics: onnxruntime and an independent torch re-implementation ---------------------------

def _torch_reference(name: str, model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The architecture written from ALGORITHM.md §5 / Larq Zoo, reading weights by their names."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    t = {k: torch.from_numpy(v.copy()) for k, v in _inits(model).items()}
    n = Counter()
    eps = {"resnete18": 1e-5, "birealnet18": 1e-3}.get(name, 1e-4)

    def nxt(kind):
        n[kind] += 1
        return f"{kind}{n[kind]}"

    def sgn(v):
        return torch.where(v >= 0, 1.0, -1.0)

    def bn(v):
        s = nxt("bn")
        return F.batch_norm(v, t[f"{s}.running_mean"], t[f"{s}.running_var"], t[f"{s}.weight"],
                            t[f"{s}.bias"], False, 0.0, eps)

    def conv(v, binary, stride=1, pad=(0, 0, 0, 0)):   # pad: torch order (left, right, top, bottom)
        w = t[f"{nxt('conv')}.weight"]
        return F.conv2d(F.pad(v, pad), sgn(w) if binary else w, stride=stride)

    def fc(v, binary, bias=False):
        s = nxt("fc")
        y = v @ (sgn(t[f"{s}.weight"]) if binary else t[f"{s}.weight"])
        return y + t[f"{s}.bias"] if bias else y

    def head(v, hidden):
        v = v.flatten(1)
        for _ in range(hidden):
            v = sgn(bn(fc(v, True)))
        return torch.softmax(bn(fc(v, True)), dim=1)

    v = torch.from_numpy(x)
    with torch.no_grad():
        if name in ("mlp", "tfc", "sfc", "lfc"):
            return head(v, 4 if name == "mlp" else 3).numpy()
        if name == "cnv":   # valid convs, pool after sign
            for pool in (False, True, False, True, False, False):
                v = sgn(bn(conv(v, True)))
                v = F.max_pool2d(v, 2) if pool else v
            return head(v, 2).numpy()
        if name == "binarynet":   # same convs, pool between conv and BN
            for pool in (False, True, False, True, False, True):
                y = conv(v, True, pad=(1, 1, 1, 1))
                v = sgn(bn(F.max_pool2d(y, 2) if pool else y))
            return head(v, 2).numpy()
        # ResNetE-18 / Bi-Real-18 at image size 32 (even sizes: TF 'same' pads hand-derived below)
        e = name == "resnete18"
        v = bn(conv(v, False, stride=2, pad=(2, 3, 2, 3)))          # 32 -> 16: total pad 5
        v = F.relu(v) if e else v
        v = F.max_pool2d(F.pad(v, (0, 1, 0, 1), value=float("-inf")), 3, 2)   # 16 -> 8: pad 1
        v = bn(v) if e else v
        for stage in range(4):
            for j in range(4):
                down = stage > 0 and j == 0
                r = bn(conv(F.avg_pool2d(v, 2), False)) if down else v
                y = conv(sgn(v), True, stride=2 if down else 1,
                         pad=(0, 1, 0, 1) if down else (1, 1, 1, 1))
                v = bn(y) + r
        v = F.relu(v) if e else v
        return torch.softmax(fc(v.mean(dim=(2, 3)), False, bias=True), dim=1).numpy()


@pytest.mark.parametrize("name", list(SMALL))
def test_onnxruntime_matches_torch_reference(name):
    model = _randomize_bn(build_zoo_model(name, **SMALL[name]), seed=11)
    x = _x(model, batch=4)
    p = _ort(model, x)
    assert p.shape == (4, ZOO[name].num_classes) and np.isfinite(p).all()
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(p, _torch_reference(name, model, x), atol=1e-5, rtol=0)
    # as written (identity BN) it also runs and gives probabilities
    plain = build_zoo_model(name, **SMALL[name])
    q = _ort(plain, x)
    assert np.isfinite(q).all() and np.allclose(q.sum(axis=1), 1.0, atol=1e-5)


# ---- CLI -----------------------------------------------------------------------------------------

def test_cli_writes_the_model(tmp_path, capsys):
    from bnnc.cli import main
    out = tmp_path / "cnv.onnx"
    assert main(["zoo", "cnv", "--width", "0.25", "--format", "qonnx", "--seed", "5",
                 "-o", str(out)]) == 0
    assert out.read_bytes() == build_zoo_model("cnv", fmt="qonnx", seed=5,
                                               width=0.25).SerializeToString()
    assert "97,712 weights" in capsys.readouterr().out
    out2 = tmp_path / "r.onnx"
    assert main(["zoo", "birealnet18", "--image-size", "32", "--width", "0.125", "--classes", "7",
                 "-o", str(out2)]) == 0
    m = onnx.load(str(out2))
    assert [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim[1:]] == [3, 32, 32]
    assert m.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 7


def test_cli_list_and_errors(tmp_path, capsys):
    from bnnc.cli import main
    for argv in (["zoo", "--list"], ["zoo", "list"]):
        assert main(argv) == 0
        text = capsys.readouterr().out
        assert all(name in text for name in ZOO)
        assert "399,872" in text and "14,022,016" in text and "11,679,912" in text
    assert main(["zoo", "nosuchnet", "-o", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert "nosuchnet" in err
    assert "mlp, tfc, sfc, lfc, cnv, binarynet, resnete18, birealnet18" in err
    assert "Traceback" not in err and not (tmp_path / "x.onnx").exists()
    assert main(["zoo", "mlp", "-o", str(tmp_path / "missing" / "x.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["zoo", "tfc", "--image-size", "32", "-o", str(tmp_path / "t.onnx")]) == 2
    assert "resnete18, birealnet18" in capsys.readouterr().err


# ---- round trip through the importer -------------------------------------------------------------

def _importer(*, with_infer: bool):
    # skip only while a module is absent; once written, an import error in it is a failure
    mods = ["bnnc.compiler.frontend"] + (["bnnc.runtime.infer"] if with_infer else [])
    missing = [m for m in mods if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not written yet")
    from bnnc.compiler.frontend import load_model
    if not with_infer:
        return load_model, None
    from bnnc.runtime.infer import infer
    return load_model, infer


def _binary_layer_count(model: onnx.ModelProto) -> int:
    inits = {i.name for i in model.graph.initializer}
    return sum(1 for n in model.graph.node
               if n.op_type in ("Conv", "MatMul") and n.input[1] not in inits)


@pytest.mark.parametrize("fmt", ["onnx", "qonnx"])
@pytest.mark.parametrize("name", list(SMALL))
def test_importer_keeps_every_parameter(name, fmt):
    load_model = _importer(with_infer=False)[0]
    model = build_zoo_model(name, fmt=fmt, **SMALL[name])
    graph = load_model(model)
    graph.verify()
    # every W, the classifier bias (0 at init, still trainable) and the BN params, nothing more
    bn_params = sum(_inits(model)[n].size for n in _bn_param_names(model))
    dense_b = {lay.name: "b" in lay.params for lay in graph.layers if lay.kind.value == "dense"}
    assert graph.param_count() == _weight_count(model) + bn_params, \
        f"parameters lost or added by the importer; dense layers with a bias: {dense_b}"
    assert sum(lay.binary for lay in graph.layers) == _binary_layer_count(model)
    assert graph.input_shape == tuple(_input_shape(model, 1)[1:])


@pytest.mark.parametrize("name", list(SMALL))
def test_round_trip_through_importer(name):
    load_model, infer = _importer(with_infer=True)
    plain = _randomize_bn(build_zoo_model(name, **SMALL[name]), seed=5)
    qonnx = _randomize_bn(build_zoo_model(name, fmt="qonnx", **SMALL[name]), seed=5)
    x = _x(plain, batch=3, seed=2)
    ours = infer(load_model(plain), x)
    np.testing.assert_allclose(ours, _ort(plain, x), atol=1e-4, rtol=0)
    np.testing.assert_allclose(infer(load_model(qonnx), x), ours, atol=1e-6, rtol=0)
