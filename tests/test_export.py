"""compiler/export.py (`bnnc export`): trained state -> inference ONNX.

onnxruntime runs the plain form and is compared with `runtime.reference.predict` (an independent
numpy implementation) after a few real training steps; the QONNX form (and the plain one where the
frontend reads it) goes back through `frontend.load_model` + `runtime.infer`. The sign(0), l1 batch
norm and input-quantizer semantics are checked against hand-computed values; state files and their
errors, determinism and the CLI last.
"""

from __future__ import annotations

import functools
import math
import zipfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import graphs
from bnnc.cli import main
from bnnc.compiler.config import make_config
from bnnc.compiler.errors import ConfigError, DataError
from bnnc.compiler.export import (check_state, export_onnx, load_state_npz, save_state_npz)
from bnnc.compiler.frontend import load_model
from bnnc.compiler.ir import INPUT, Graph, Layer, LayerKind as K
from bnnc.compiler.state import state_tensors
from bnnc.compiler.zoo import build_zoo_model
from bnnc.runtime import reference as ref
from bnnc.runtime.infer import forward_layer, infer

CNV_SMALL = "/work/shared/models/brevitas/cnv_1w1a_small_qonnx_ts_clean.onnx"
TOL = 1e-5
CONFIGS = {"standard-adam": ("standard", "adam"), "proposed-adam": ("proposed", "adam"),
           "proposed-bop": ("proposed", "bop"), "standard-bop": ("standard", "bop")}


@functools.cache
def _graph(model: str) -> Graph:
    if model == "mlp":
        return load_model(build_zoo_model("mlp", width=0.25))
    if model == "cnv":
        return load_model(build_zoo_model("cnv", width=0.125))
    if model == "cnv_small":
        return load_model(CNV_SMALL)
    return graphs.FACTORIES[model]()


@functools.cache
def _trained(model: str, algorithm: str, optimizer: str, state_dtype: str | None = None):
    """(graph, cfg, state after 3 reference steps on batches of 8)."""
    g = _graph(model)
    # Bop threshold 1: 3 steps flip weights (the default 32 flips none before step 33)
    cfg = make_config(algorithm, optimizer=optimizer, batch=8, state_dtype=state_dtype,
                      bop_threshold=1.0 if optimizer == "bop" else None)
    init = ref.init_state(g, cfg)
    st = init
    for i in range(3):
        x, y = graphs.sample_batch(g, cfg.batch, seed=i)
        st, _ = ref.train_step(g, cfg, st, x, y)
    # a vacuous export of the initial state would pass everything below
    changed = [n for n in init.tensors if not np.array_equal(init.tensors[n], st.tensors[n])]
    assert any(n.endswith(".W") for n in changed) and any("running" in n for n in changed)
    return g, cfg, st


def _ort(model: onnx.ModelProto, x: np.ndarray, outputs=None) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    return sess.run(outputs, {"input": x})


def _assert_same_predictions(p: np.ndarray, want: np.ndarray) -> None:
    assert p.shape == want.shape
    np.testing.assert_array_equal(p.argmax(axis=1), want.argmax(axis=1))
    np.testing.assert_allclose(p, want, rtol=0, atol=TOL)


def _nhwc(g: Graph, x: np.ndarray) -> np.ndarray:
    return x.transpose(0, 2, 3, 1).copy() if g.input_layout == "NHWC" else x


# ---- onnxruntime and re-import after real training -----------------------------------------------

@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("model", ["mlp", "cnv", "residual"])
def test_trained_model_matches_reference(model, config):
    g, cfg, st = _trained(model, *CONFIGS[config])
    x, _ = graphs.sample_batch(g, 24, seed=100)
    want = ref.predict(g, cfg, st, x)

    plain = export_onnx(g, cfg, st.tensors)
    onnx.checker.check_model(plain, full_check=True)
    ops = {n.op_type for n in plain.graph.node}
    assert "Sign" not in ops and "Where" in ops
    (p,) = _ort(plain, x)
    _assert_same_predictions(p, want)
    _assert_same_predictions(infer(load_model(plain), x), want)

    q = export_onnx(g, cfg, st.tensors, fmt="qonnx")
    assert {o.domain for o in q.opset_import} == {"", "qonnx.custom_op.general"}
    assert sum(n.op_type == "BipolarQuant" for n in q.graph.node) > 0
    g2 = load_model(q)
    assert [lay.binary for lay in g2.layers] == [lay.binary for lay in g.layers]
    _assert_same_predictions(infer(g2, x), want)


def test_real_qonnx_model_with_input_quant_and_tensornorm():
    """Brevitas CNV: 8-bit input Quant, Mul/Sub scaling, TensorNorm (AFFINE) after the last
    layer."""
    g, cfg, st = _trained("cnv_small", "standard", "adam")
    kinds = {lay.kind for lay in g.layers}
    assert K.INPUT_QUANT in kinds and K.AFFINE in kinds and g.output.kind is K.AFFINE
    x, _ = graphs.sample_batch(g, 16, seed=100)
    want = ref.predict(g, cfg, st, x)
    plain = export_onnx(g, cfg, st.tensors)
    onnx.checker.check_model(plain, full_check=True)
    _assert_same_predictions(_ort(plain, x)[0], want)
    q = export_onnx(g, cfg, st.tensors, fmt="qonnx")
    g2 = load_model(q)
    assert [lay.kind for lay in g2.layers] == [lay.kind for lay in g.layers] + [K.SOFTMAX]
    assert dict(g2.layer("quant1").attrs) == dict(g.layer("quant1").attrs)
    _assert_same_predictions(infer(g2, x), want)


def test_graph_ending_in_logits_gets_a_softmax():
    g, cfg, st = _trained("tiny_mlp", "standard", "adam")
    assert g.output.kind is K.AFFINE
    m = export_onnx(g, cfg, st.tensors)
    assert m.graph.node[-1].op_type == "Softmax" and m.graph.output[0].name == "probs"
    x, _ = graphs.sample_batch(g, 16, seed=5)
    (p,) = _ort(m, x)
    np.testing.assert_allclose(p.sum(axis=1), 1, atol=1e-6)
    _assert_same_predictions(p, ref.predict(g, cfg, st, x))


@pytest.mark.parametrize("model,config,state_dtype", [
    ("mlp", "standard-adam", None), ("mlp", "proposed-adam", None), ("cnv", "proposed-bop", None),
    ("mlp", "proposed-adam", "f32")])
def test_qonnx_reimport_restores_the_trained_state(model, config, state_dtype):
    """Training can continue from the QONNX export: the frontend's initial state of the re-imported
    model is the trained state (l1: running_psi = sqrt(var + eps) within 2 float32 ulps)."""
    g, cfg, st = _trained(model, *CONFIGS[config], state_dtype)
    g2 = load_model(export_onnx(g, cfg, st.tensors, fmt="qonnx"))
    assert [(lay.name, lay.kind, lay.binary) for lay in g2.layers] == \
        [(lay.name, lay.kind, lay.binary) for lay in g.layers]
    again = ref.init_state(g2, cfg).tensors
    for t in state_tensors(g, cfg):
        if t.kind == "opt":
            continue
        if t.field == "running_psi" and cfg.state_dtype == "f32":
            np.testing.assert_allclose(again[t.name], st.tensors[t.name], rtol=2.5e-7, atol=0,
                                       err_msg=t.name)
        else:
            np.testing.assert_array_equal(again[t.name], st.tensors[t.name], err_msg=t.name)


# ---- semantics against hand-computed values ------------------------------------------------------

def _state_for(g: Graph, cfg, values=None) -> dict[str, np.ndarray]:
    """The initial state of g with some tensors replaced."""
    st = dict(ref.init_state(g, cfg).tensors)
    st.update({k: np.asarray(v, np.float32) for k, v in (values or {}).items()})
    return st


def test_sign_of_zero_is_plus_one_for_weights_and_activations():
    # x = [0, -0.5, 2] -> sign [1, -1, 1]; sign(W) columns [1, 1, 1] and [-1, 1, 1] -> y = [1, -1]
    # (with ONNX Sign, 0 -> 0 twice: y = [0, 0] and probabilities 0.5 each)
    w = np.array([[0, -1], [0.5, 0], [2, 0]], np.float32)
    g = Graph("signs", (3,), (Layer("sign1", K.SIGN, (INPUT,), (3,)),
                              Layer("fc1", K.DENSE, ("sign1",), (2,), {"binary": True}, {"W": w})))
    g.verify()
    cfg = make_config("standard")
    st = _state_for(g, cfg)
    m = export_onnx(g, cfg, st)
    init = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    np.testing.assert_array_equal(init["fc1.Wb"], [[1, -1], [1, 1], [1, 1]])
    (p,) = _ort(m, np.array([[0, -0.5, 2]], np.float32))
    p0 = 1 / (1 + math.exp(-2))
    np.testing.assert_allclose(p, [[p0, 1 - p0]], rtol=1e-6)


@pytest.mark.parametrize("psi3,eps_out", [(0.25, np.float32(1e-4)), (0.005, 0.0)])
def test_l1_batchnorm_hand_values(psi3, eps_out):
    """l1 inference z = (y - running_mean) / running_psi + beta (no gamma, no eps); a channel with
    psi^2 < eps switches the layer to epsilon 0."""
    eye = np.eye(3, dtype=np.float32)
    bn = Layer("bn1", K.BATCHNORM, ("fc1",), (3,), {"eps": 1e-4, "momentum": 0.9},
               {k: np.ones(3, np.float32) for k in ("gamma", "beta", "mean", "var")})
    g = Graph("l1net", (3,), (Layer("fc1", K.DENSE, (INPUT,), (3,), {"binary": False}, {"W": eye}),
                              bn))
    g.verify()
    cfg = make_config("proposed", state_dtype="f32", po2=False, binary_dw=False)
    psi = np.array([2, 0.5, psi3], np.float32)
    st = _state_for(g, cfg, {"bn1.running_mean": [1, -2, 0], "bn1.running_psi": psi,
                             "bn1.beta": [0.5, 0.25, 0]})
    m = export_onnx(g, cfg, st)
    (bn_node,) = [n for n in m.graph.node if n.op_type == "BatchNormalization"]
    attrs = {a.name: helper.get_attribute_value(a) for a in bn_node.attribute}
    assert attrs["epsilon"] == eps_out
    x = np.array([[3, -1, 0.01], [1, -2, 0]], np.float32)
    z = np.array([[(3 - 1) / 2 + 0.5, (-1 + 2) / 0.5 + 0.25, 0.01 / float(psi3)],
                  [0.5, 0.25, 0]])
    want = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    (p,) = _ort(m, x)
    np.testing.assert_allclose(p, want, rtol=1e-6)
    psi_back = ref.init_state(load_model(m), cfg).tensors["bn1.running_psi"]
    np.testing.assert_allclose(psi_back, psi, rtol=2.5e-7)


@pytest.mark.parametrize("bits,signed,narrow,zp,want", [
    # x / 0.25 = [0.5, 1.5, -0.5, 20, -20, 1.2]: clip to [-4, 3], round half to even
    (3, True, False, 0.0, [0, 0.5, 0, 0.75, -1, 0.25]),
    # unsigned narrow 2-bit, zero point 2: [2.5, 3.5, 1.5, 22, -18, 3.2] clipped to [0, 2],
    # rounded (1.5 -> 2), minus 2: [0, 0, 0, 0, -2, 0]
    (2, False, True, 2.0, [0, 0, 0, 0, -0.5, 0]),
])
def test_input_quant_hand_values(bits, signed, narrow, zp, want):
    q = Layer("quant1", K.INPUT_QUANT, (INPUT,), (6,),
              {"scale": 0.25, "zero_point": zp, "bits": bits, "signed": signed, "narrow": narrow})
    g = Graph("quantnet", (6,), (q, Layer("fc1", K.DENSE, ("quant1",), (2,), {"binary": False},
                                          {"W": np.ones((6, 2), np.float32)})))
    g.verify()
    cfg = make_config("standard")
    st = _state_for(g, cfg)
    x = np.array([[0.125, 0.375, -0.125, 5.0, -5.0, 0.3]], np.float32)
    plain = export_onnx(g, cfg, st)
    onnx.checker.check_model(plain, full_check=True)
    plain.graph.output.append(helper.make_tensor_value_info("quant1", TensorProto.FLOAT, None))
    probs, quant = _ort(plain, x)
    np.testing.assert_array_equal(quant, [want])
    np.testing.assert_allclose(probs, [[0.5, 0.5]])
    g2 = load_model(export_onnx(g, cfg, st, fmt="qonnx"))
    assert g2.layers[0].kind is K.INPUT_QUANT
    np.testing.assert_array_equal(forward_layer(g2.layers[0], x), [want])
    np.testing.assert_allclose(infer(g2, x), probs, rtol=0, atol=TOL)


def _pool_net(count_include_pad: bool, layout: str = "NCHW") -> Graph:
    """Real conv (pads) -> BN -> sign -> binary conv with bias -> max-pool and avg-pool with pads
    -> add -> flatten -> binary dense with bias."""
    rng = np.random.default_rng(3)
    pool = {"kernel": (3, 3), "strides": (2, 2), "pads": (1, 1, 1, 1)}
    bn = {k: np.abs(rng.normal(1, 0.2, 4)).astype(np.float32) for k in ("gamma", "var")}
    bn |= {k: rng.normal(0, 0.2, 4).astype(np.float32) for k in ("beta", "mean")}
    layers = (
        Layer("conv1", K.CONV, (INPUT,), (4, 6, 5), {"binary": False, "strides": (1, 1),
              "pads": (1, 1, 1, 1)}, {"W": rng.normal(0, 0.5, (4, 2, 3, 3)).astype(np.float32),
                                      "b": rng.normal(0, 0.2, 4).astype(np.float32)}),
        Layer("bn1", K.BATCHNORM, ("conv1",), (4, 6, 5), {"eps": 1e-4, "momentum": 0.9}, bn),
        Layer("sign1", K.SIGN, ("bn1",), (4, 6, 5)),
        Layer("conv2", K.CONV, ("sign1",), (4, 6, 5), {"binary": True, "strides": (1, 1),
              "pads": (1, 1, 1, 1)}, {"W": rng.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32),
                                      "b": rng.normal(0, 0.5, 4).astype(np.float32)}),
        Layer("pool1", K.MAXPOOL, ("conv2",), (4, 3, 3), pool),
        Layer("avgpool1", K.AVGPOOL, ("conv2",), (4, 3, 3),
              pool | {"count_include_pad": count_include_pad}),
        Layer("add1", K.ADD, ("pool1", "avgpool1"), (4, 3, 3)),
        Layer("sign2", K.SIGN, ("add1",), (4, 3, 3)),
        Layer("flatten1", K.FLATTEN, ("sign2",), (36,)),
        Layer("fc1", K.DENSE, ("flatten1",), (5,), {"binary": True},
              {"W": rng.normal(0, 0.3, (36, 5)).astype(np.float32),
               "b": rng.normal(0, 1, 5).astype(np.float32)}),
        Layer("softmax1", K.SOFTMAX, ("fc1",), (5,)))
    g = Graph("poolnet", (2, 6, 5), layers, input_layout=layout)
    g.verify()
    return g


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_pools_biases_and_layout(layout):
    x = np.random.default_rng(0).uniform(-1, 1, (12, 2, 6, 5)).astype(np.float32)
    probs = {}
    for cip in (False, True):
        g = _pool_net(cip, layout)
        cfg = make_config("standard")
        st = ref.init_state(g, cfg)
        want = ref.predict(g, cfg, st, x)
        m = export_onnx(g, cfg, st.tensors)
        onnx.checker.check_model(m, full_check=True)
        dims = [d.dim_param or d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
        assert dims == (["N", 6, 5, 2] if layout == "NHWC" else ["N", 2, 6, 5])
        (probs[cip],) = _ort(m, _nhwc(g, x))
        _assert_same_predictions(probs[cip], want)
        for fmt in ("onnx", "qonnx"):
            g2 = load_model(export_onnx(g, cfg, st.tensors, fmt=fmt))
            assert g2.input_layout == layout
            _assert_same_predictions(infer(g2, _nhwc(g, x)), want)
    # the attribute is exported: with pads, counting the padding changes the border averages
    assert np.abs(probs[False] - probs[True]).max() > 1e-3


def test_dense_reading_an_image_flattens_it():
    """The IR lets DENSE read a (C, H, W) output directly (the reference flattens); Gemm is 2-D."""
    rng = np.random.default_rng(1)
    g = Graph("imgdense", (2, 3, 3), (
        Layer("sign1", K.SIGN, (INPUT,), (2, 3, 3)),
        Layer("fc1", K.DENSE, ("sign1",), (4,), {"binary": True},
              {"W": rng.normal(0, 1, (18, 4)).astype(np.float32)})))
    g.verify()
    cfg = make_config("standard")
    st = ref.init_state(g, cfg)
    x = rng.uniform(-1, 1, (6, 2, 3, 3)).astype(np.float32)
    m = export_onnx(g, cfg, st.tensors)
    onnx.checker.check_model(m, full_check=True)
    _assert_same_predictions(_ort(m, x)[0], ref.predict(g, cfg, st, x))


# ---- determinism, state files and errors ---------------------------------------------------------

def test_exports_and_state_files_are_byte_identical(tmp_path):
    g, cfg, st = _trained("residual", "proposed", "adam")
    for fmt in ("onnx", "qonnx"):
        a = export_onnx(g, cfg, st.tensors, fmt=fmt).SerializeToString()
        b = export_onnx(g, cfg, {k: v.copy() for k, v in st.tensors.items()},
                        fmt=fmt).SerializeToString()
        assert a == b
    save_state_npz(tmp_path / "a.npz", st.tensors)
    save_state_npz(tmp_path / "b.npz", st.tensors)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    back = load_state_npz(tmp_path / "a.npz", g, cfg)
    assert list(back) == [t.name for t in state_tensors(g, cfg)]
    for k, v in st.tensors.items():
        np.testing.assert_array_equal(back[k], v)
        assert back[k].dtype == v.dtype


def test_np_savez_files_and_bop_bits_load(tmp_path):
    g, cfg, st = _trained("mlp", "proposed", "bop")
    np.savez(tmp_path / "s.npz", **st.tensors)
    back = load_state_npz(tmp_path / "s.npz", g, cfg)
    assert back["fc2.W"].dtype == np.int8
    # Bop's weights as float +-1 are accepted too and export the same model
    as_float = {k: v.astype(np.float32) for k, v in st.tensors.items()}
    assert export_onnx(g, cfg, as_float).SerializeToString() == \
        export_onnx(g, cfg, st.tensors).SerializeToString()


def _expect(exc, match, fn, *args, **kw):
    with pytest.raises(exc, match=match) as info:
        fn(*args, **kw)
    return info.value


def test_state_errors_name_the_tensor(tmp_path):
    g, cfg, st = _trained("mlp", "standard", "adam")
    s = dict(st.tensors)
    proposed = make_config("proposed", batch=8)
    e = _expect(DataError, r"'bn1\.running_psi' .* is missing", check_state, g, proposed, s)
    assert "--bn l2" in e.hint and "--optimizer adam" in e.hint and "--state-dtype f32" in e.hint
    e = _expect(DataError, r"unexpected state tensor 'fc9\.W'", check_state, g, cfg,
                s | {"fc9.W": np.zeros(2, np.float32)})
    assert "fc9" in e.hint and "another model" in e.hint
    _expect(DataError, r"'fc2\.W' has shape \[64, 63\]", check_state, g, cfg,
            s | {"fc2.W": s["fc2.W"][:, :63]})
    bad = s["bn3.running_var"].copy()
    bad[1] = np.nan
    _expect(DataError, r"'bn3\.running_var' holds NaN", check_state, g, cfg,
            s | {"bn3.running_var": bad})
    _expect(DataError, r"'fc1\.W' holds values that are not bf16",
            check_state, g, make_config("standard", state_dtype="bf16"), s)
    _expect(DataError, r"'fc1\.W' has dtype int64", check_state, g, cfg,
            s | {"fc1.W": s["fc1.W"].astype(np.int64)})
    gb, cb, sb = _trained("mlp", "proposed", "bop")
    w = sb.tensors["fc1.W"].copy()
    w[0, 0] = 0
    _expect(DataError, r"'fc1\.W' is a Bop binary weight", check_state, gb, cb,
            dict(sb.tensors) | {"fc1.W": w})
    neg = s["bn2.running_var"].copy()
    neg[0] = -1
    _expect(DataError, r"'bn2\.running_var' has entries <= -eps", export_onnx, g, cfg,
            s | {"bn2.running_var": neg})
    gp, cp, sp = _trained("mlp", "proposed", "adam")
    tiny = sp.tensors["bn3.running_psi"].copy()
    tiny[2] = 2.0 ** -80          # a bf16 number whose square underflows float32
    _expect(DataError, r"'bn3\.running_psi' has entries that are <= 0 or so small", export_onnx,
            gp, cp, dict(sp.tensors) | {"bn3.running_psi": tiny})
    _expect(ConfigError, "unknown export format", export_onnx, g, cfg, s, fmt="tflite")
    _expect(ConfigError, "not a C identifier", export_onnx, g, cfg, s, name="My Net")


def test_state_file_errors(tmp_path):
    g, cfg, st = _trained("mlp", "standard", "adam")
    _expect(DataError, "does not exist", load_state_npz, tmp_path / "none.npz", g, cfg)
    (tmp_path / "x.npz").write_bytes(b"not a zip archive")
    _expect(DataError, r"x\.npz is not an \.npz archive", load_state_npz, tmp_path / "x.npz", g,
            cfg)
    with zipfile.ZipFile(tmp_path / "y.npz", "w") as zf:
        zf.writestr("fc1.W.npy", b"garbage")
    _expect(DataError, r"cannot read state file .*y\.npz", load_state_npz, tmp_path / "y.npz", g,
            cfg)
    save_state_npz(tmp_path / "z.npz", {k: v for k, v in st.tensors.items() if k != "bn4.beta"})
    _expect(DataError, r"z\.npz: state tensor 'bn4\.beta' .* is missing \(1 of",
            load_state_npz, tmp_path / "z.npz", g, cfg)


# ---- CLI -----------------------------------------------------------------------------------------

def test_cli_export(tmp_path, capsys):
    g, cfg, st = _trained("cnv", "proposed", "bop")
    model = tmp_path / "cnv.onnx"
    model.write_bytes(build_zoo_model("cnv", width=0.125).SerializeToString())
    save_state_npz(tmp_path / "state.npz", st.tensors)
    out = tmp_path / "trained.onnx"
    assert main(["export", str(model), "--state", str(tmp_path / "state.npz"), "-o", str(out),
                 "--optimizer", "bop"]) == 0
    assert "wrote" in capsys.readouterr().out
    x, _ = graphs.sample_batch(g, 8, seed=7)
    _assert_same_predictions(_ort(onnx.load(out), x)[0], ref.predict(g, cfg, st, x))
    # the zoo name works as MODEL too, and the file is the same bytes
    again = tmp_path / "again.onnx"
    assert main(["export", "cnv", "--width", "0.125", "--state", str(tmp_path / "state.npz"),
                 "-o", str(again), "--optimizer", "bop"]) == 0
    assert again.read_bytes() == out.read_bytes()
    q = tmp_path / "q.onnx"
    assert main(["export", str(model), "--state", str(tmp_path / "state.npz"), "-o", str(q),
                 "--optimizer", "bop", "--format", "qonnx"]) == 0
    assert any(n.op_type == "BipolarQuant" for n in onnx.load(q).graph.node)
    capsys.readouterr()
    assert main(["export", str(model), "--state", str(tmp_path / "state.npz"), "-o",
                 str(tmp_path / "bad.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "'conv1.W.v'" in err and "--optimizer bop" in err
    assert "Traceback" not in err and not (tmp_path / "bad.onnx").exists()
