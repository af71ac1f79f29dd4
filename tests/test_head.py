"""`--classes K` (compiler/head.py): the head is re-initialised for K classes with the seeded
initialiser, every other layer keeps its trained values, OUT/model.onnx and the export have K
outputs; a model without a dense/conv head is refused with one error line."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from bnnc.cli import main
from bnnc.compiler.errors import ConfigError
from bnnc.compiler.export import export_onnx, load_state_npz
from bnnc.compiler.frontend import load_model
from bnnc.compiler.head import new_head
from bnnc.runtime.outdir import read_compiled
from test_trained_state import _Onnx, cnn, mlp


def test_compile_classes_keeps_the_body_and_has_k_outputs(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(mlp(negative=0.3), src)
    out = tmp_path / "out"
    assert main(["compile", str(src), "--classes", "4", "--seed", "3", "--batch", "8",
                 "--algorithm", "standard", "-o", str(out)]) == 0
    manifest, graph, cfg = read_compiled(out)
    assert graph.num_classes == 4 and manifest.classes == 4
    before = load_model(src)
    state = load_state_npz(out / "init_state.npz", graph, cfg)
    # the body: trained values kept (standard: the file's values as they are)
    for lay in ("fc1", "fc2", "bn1", "bn2"):
        for f, v in before.layer(lay).params.items():
            field = {"mean": "running_mean", "var": "running_var"}.get(f, f)
            np.testing.assert_array_equal(state[f"{lay}.{field}"], v)
    # the head: N(0, 1/fan_in) from default_rng(--seed), its BN reset
    w = np.random.default_rng(3).standard_normal((32, 4), dtype=np.float32) \
        * np.float32(1 / math.sqrt(32))
    np.testing.assert_array_equal(state["fc3.W"], w)
    np.testing.assert_array_equal(state["bn3.gamma"], np.ones(4, np.float32))
    np.testing.assert_array_equal(state["bn3.running_var"], np.ones(4, np.float32))
    # export has K outputs and runs
    model = export_onnx(graph, cfg, state)
    x = np.random.default_rng(0).uniform(-1, 1, (5, 1, 8, 8)).astype(np.float32)
    probs = ort.InferenceSession(model.SerializeToString(),
                                 providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert probs.shape == (5, 4)


def test_conv_head_and_determinism():
    graph = load_model(cnn())
    a, b = new_head(graph, 3, seed=1), new_head(graph, 3, seed=1)
    assert a.num_classes == 3
    np.testing.assert_array_equal(a.layer("fc1").params["W"], b.layer("fc1").params["W"])
    assert not np.array_equal(a.layer("fc1").params["W"],
                              new_head(graph, 3, seed=2).layer("fc1").params["W"])
    np.testing.assert_array_equal(a.layer("conv2").params["W"], graph.layer("conv2").params["W"])


def _ends_in_add():
    m = _Onnx(0)
    x = m.node("Flatten", ["x"], axis=1)
    y = m.node("Add", [m.node("MatMul", [x, m.weight((64, 10))]),
                       m.node("MatMul", [x, m.weight((64, 10))])])
    return m.model((1, 8, 8), m.node("Softmax", [y], axis=1), 10)


def test_a_model_without_a_dense_conv_head_is_refused(tmp_path, capsys):
    src = tmp_path / "add.onnx"
    onnx.save(_ends_in_add(), src)
    with pytest.raises(ConfigError, match="does not end in a dense/conv head"):
        new_head(load_model(src), 3)
    assert main(["compile", str(src), "--classes", "3", "--algorithm", "standard",
                 "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "add1" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
