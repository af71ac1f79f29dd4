"""The tiled dense kernels (templates/kernels/dense.c.j2) at sizes that leave a partial tile in
every loop: hidden width 77 (not a multiple of the 4-row blocks, 16-column micro-kernels or 64-wide
tiles), 784 inputs (a partial 64-bit word when packing sign(W), 13 reduction panels of 64), batch 67
(a partial row block; two reduction panels in dW) and 131 (two row groups of 128). Each
configuration selects a different kernel variant; the emitted C must pass `bnnc check` against the
numpy reference over two steps."""

from __future__ import annotations

import shutil

import pytest

from bnnc.compiler.config import make_config
from bnnc.compiler.frontend import load_model
from bnnc.compiler.ir import LayerKind
from bnnc.compiler.zoo import build_zoo_model
from bnnc.runtime.check import format_report, run_check

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc) installed")


@pytest.fixture(scope="module")
def mlp77():
    graph = load_model(build_zoo_model("mlp", width=0.3, seed=2))
    shapes = [lay.params["W"].shape for lay in graph.layers if lay.kind == LayerKind.DENSE]
    assert shapes == [(784, 77), (77, 77), (77, 77), (77, 77), (77, 10)], shapes
    return graph


@pytest.mark.parametrize("algorithm,overrides", [
    # xnor forward, PO2 dX, binary dW from packed X (int32 partial sums) and from real X (fc1)
    ("proposed", {}),
    # sign-select forward/dX on f32, dW = X^T dY with 8-sample row passes
    ("standard", {}),
    # dW = X^T Q with PO2 codes and packed X (the sign-mask variant of the row passes)
    ("proposed", {"binary_dw": False}),
    # binary dW from float G, dX from float dY
    ("proposed", {"po2": False}),
    # dW = X^T dY as floats with packed X (sign-select)
    ("proposed", {"po2": False, "binary_dw": False}),
    # batch 131: two row groups of 128 samples in the forward and dX tiles (per-row sums of PO2
    # codes are gathered per group)
    ("proposed", {"batch": 131}),
])
def test_partial_tiles_match_reference(mlp77, tmp_path, algorithm, overrides):
    overrides = {"batch": 67, **overrides}
    cfg = make_config(algorithm, **overrides)
    rep = run_check(mlp77, cfg, steps=2, work_dir=tmp_path / "c", cache=tmp_path / "so")
    assert rep.ok, format_report(rep)
