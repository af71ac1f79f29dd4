"""`bnnc info`: the layer table, hand-counted totals, and the error policy (one line, exit 2)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnnc.cli import main

TFC = "/work/shared/models/brevitas/tfc_1w1a_qonnx_ts_clean.onnx"
CNV = "/work/shared/models/brevitas/cnv_1w1a_small_qonnx_ts_clean.onnx"


def bnnc(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("bnnc")
    cmd = [exe, *args] if exe else [sys.executable, "-c", "from bnnc.cli import run; run()", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_info_table_and_totals(capsys):
    assert main(["info", TFC]) == 0
    out = capsys.readouterr().out
    for name in ("flatten1", "affine1", "sign1", "fc1", "bn3", "sign4", "fc4", "affine2"):
        assert name in out
    assert "MatMul_0" in out and "BatchNormalization_2" in out and "[784]" in out
    # TFC 784-64-64-64-10: binary weights 784*64 + 2*64*64 + 64*10; BN 3 layers * 4 params * 64
    binary = 784 * 64 + 2 * 64 * 64 + 64 * 10
    real = 3 * 4 * 64
    assert f"binary weights: {binary:,}" in out
    assert f"real parameters: {real:,}" in out
    assert f"parameters: {binary + real:,}" in out
    assert out.count("binary") >= 4 + 1


def test_info_batch_option_shows_batched_shapes(capsys):
    assert main(["info", CNV, "--batch", "7"]) == 0
    out = capsys.readouterr().out
    assert "[7, 3, 32, 32]" in out and "[7, 16, 30, 30]" in out and "[7, 10]" in out
    assert "input_quant" in out


def _bad_model(tmp_path):
    nodes = [helper.make_node("Tanh", ["x"], ["t"], name="/act/Tanh"),
             helper.make_node("MatMul", ["t", "w"], ["y"], name="mm")]
    g = helper.make_graph(nodes, "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          initializer=[numpy_helper.from_array(np.ones((4, 2), np.float32), "w")])
    path = tmp_path / "tanh_net.onnx"
    onnx.save(helper.make_model(g), path)
    return path


@pytest.mark.parametrize("case", ["missing", "truncated", "unsupported"])
def test_info_errors_are_one_line_exit_2(case, tmp_path):
    if case == "missing":
        path, must = tmp_path / "nope.onnx", ["nope.onnx"]
    elif case == "truncated":
        path = tmp_path / "cut.onnx"
        with open(TFC, "rb") as f:
            path.write_bytes(f.read()[:3000])
        must = ["cut.onnx"]
    else:
        path, must = _bad_model(tmp_path), ["tanh_net.onnx", "'/act/Tanh'", "Tanh"]
    r = bnnc("info", str(path))
    assert r.returncode == 2, r
    assert "Traceback" not in r.stderr + r.stdout
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and all(m in lines[0] for m in must)
    assert len(lines) <= 2 and all(ln.startswith(("error: ", "hint: ")) for ln in lines)
