"""A model trained outside bnnc: a tiny binary MLP trained with Brevitas (scripts/brevitas_mnist.py,
a few hundred steps on an MNIST look-alike) and exported with `brevitas.export.export_qonnx`. bnnc
imports it, and the emitted C's step-0 predictions equal onnxruntime's on the exported file under
the standard and the proposed (default) algorithm. The model reads pixels in [0, 1]; this test feeds
both sides x/255."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from bnnc.compiler.config import make_config
from bnnc.compiler.frontend import load_model
from bnnc.compiler.pipeline import compile_to_c
from bnnc.compiler.target import load_target
from bnnc.runtime import reference as ref
from bnnc.runtime.host import HostProgram
from mnist_like import write_mnist_like

pytest.importorskip("brevitas")
pytest.importorskip("onnxscript")      # torch.onnx's exporter, which Brevitas' QONNX export uses

ROOT = Path(__file__).resolve().parents[1]
B = 50


def _script():
    spec = importlib.util.spec_from_file_location("brevitas_mnist",
                                                  ROOT / "scripts" / "brevitas_mnist.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def brevitas_model(tmp_path_factory):
    bm = _script()
    root = write_mnist_like(tmp_path_factory.mktemp("data"), 2000, 200, seed=0)
    path = tmp_path_factory.mktemp("brevitas") / "tiny.onnx"
    r = bm.train_and_export(path, arch="tiny", steps=200, batch=50, seed=0, root=root,
                            log=lambda *_: None)
    assert r["steps"] == 200
    assert r["ort_acc"] == r["torch_acc"]           # the export is the trained model
    assert r["ort_acc"] > 0.5                       # it learned something to keep
    return bm, path, root


@pytest.mark.parametrize("algorithm", ["standard", "proposed"])
def test_step0_of_a_brevitas_model_equals_onnxruntime(brevitas_model, algorithm, tmp_path):
    bm, path, root = brevitas_model
    _, _, x, y = bm.mnist01(None, root)
    want = bm.ort_logits(path, x).argmax(1)
    graph = load_model(path)
    cfg = make_config(algorithm, batch=B)
    compile_to_c(graph, cfg, load_target("host"), tmp_path, command="test_pretrained")
    prog = HostProgram(tmp_path, debug=False)
    prog.load_state(ref.init_state(graph, cfg).tensors, step=0, seed=cfg.seed)
    got = np.concatenate([prog.predict(x[i:i + B]).argmax(1) for i in range(0, len(x), B)])
    np.testing.assert_array_equal(got, want)
    assert np.mean(got == y) == np.mean(want == y)
