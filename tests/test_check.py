"""`bnnc check`: the emitted C against the numpy reference, tensor by tensor, over several steps --
and proof that the comparison fails, at the right layer, when a C kernel is off by one
(-DBNNC_PERTURB_<KERNEL>)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from graphs import binarynet, cnv, residual
from bnnc.cli import main
from bnnc.compiler.config import make_config
from bnnc.compiler.frontend import load_model
from bnnc.compiler.ops.base import Phase
from bnnc.compiler.schedule import build_schedule
from bnnc.compiler.schedule_ir import DType
from bnnc.compiler.zoo import build_zoo_model
from bnnc.runtime.check import compare, format_report, run_check

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc) installed")


@pytest.fixture(scope="module")
def mlp():
    return load_model(build_zoo_model("mlp", width=0.25, seed=1))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("so-cache")


@pytest.mark.parametrize("algorithm,optimizer,batch", [
    ("proposed", "adam", 16), ("proposed", "bop", 32), ("standard", "adam", 8),
    ("standard", "bop", 16)])
def test_mlp_passes_check(mlp, cache, tmp_path, algorithm, optimizer, batch):
    cfg = make_config(algorithm, batch=batch, optimizer=optimizer)
    rep = run_check(mlp, cfg, steps=3, work_dir=tmp_path, cache=cache)
    assert rep.ok, format_report(rep)
    names = {r.name for r in rep.rows}
    # every gradient and every updated parameter was compared, and the loss
    for i in range(1, 6):
        assert {f"fc{i}.dW", f"fc{i}.W", f"bn{i}.dbeta", f"bn{i}.beta"} <= names
    assert "loss" in names and len(rep.losses) == 3
    exact = [r for r in rep.rows if r.rule == "exact"]
    assert exact and all(r.mismatches == 0 for r in exact)
    if algorithm == "proposed":
        assert {"fc2.d_out_q", "fc2.po2_bias", "sign1.mask", "bn1.s"} <= names
    for c, r in rep.losses:
        assert abs(c - r) <= 1e-5 * abs(r)


def test_standard_mlp_also_passes_free_running(mlp, cache, tmp_path):
    """Without layer-by-layer forcing the reference runs on its own values from the C's state."""
    rep = run_check(mlp, make_config("standard", batch=8), steps=2, work_dir=tmp_path, cache=cache,
                    forcing=False)
    assert rep.ok and not rep.forcing, format_report(rep)


def _zoo_cnv():
    from bnnc.compiler.frontend import load_model
    from bnnc.compiler.zoo import build_zoo_model
    return load_model(build_zoo_model("cnv", width=0.125))


@pytest.mark.parametrize("make,algorithm,optimizer,batch", [
    (lambda: cnv(16), "proposed", "adam", 4), (lambda: binarynet(32), "standard", "bop", 4),
    # conv -> max-pool fused over chunks of 2 samples, the last one short (conv_pool_fwd)
    (lambda: binarynet(32), "proposed", "adam", 5),
    (residual, "proposed", "bop", 4), (residual, "standard", "sgd", 4),
    # 6272 terms per channel in bn1's statistics: a plain float sum drifted past tolerance here
    (_zoo_cnv, "standard", "adam", 8)])
def test_conv_nets_pass_check(cache, tmp_path, make, algorithm, optimizer, batch):
    g = make()
    rep = run_check(g, make_config(algorithm, batch=batch, optimizer=optimizer), steps=2,
                    work_dir=tmp_path, cache=cache)
    assert rep.ok, format_report(rep)
    kernels = {s.kernel.name for s in build_schedule(g, rep.config).steps}
    assert any(k.startswith("conv_") for k in kernels)


def _layers_of(schedule, kernel):
    return {s.layer for s in schedule.steps if s.kernel.name == kernel}


@pytest.mark.parametrize("algorithm,kernel", [
    ("proposed", "dense_fwd_xnor"), ("proposed", "po2_quantize"), ("proposed", "dense_dw_bin"),
    ("proposed", "adam_update"), ("standard", "dense_dw_f32"), ("standard", "bn_l2_fwd")])
def test_check_fails_on_a_perturbed_kernel(mlp, cache, tmp_path, algorithm, kernel):
    cfg = make_config(algorithm, batch=16)
    rep = run_check(mlp, cfg, steps=1, work_dir=tmp_path, cache=cache,
                    extra_cflags=[f"-DBNNC_PERTURB_{kernel.upper()}"])
    assert not rep.ok and "FAIL" in format_report(rep)
    # layer by layer, the failures stay with the layers that run the perturbed kernel
    schedule = build_schedule(mlp, cfg)
    layers = _layers_of(schedule, kernel)
    loss_step = next(s for s in schedule.steps if s.phase is Phase.LOSS)
    logits_layer = schedule.producer(loss_step.inputs[0]).layer
    for r in rep.failures:
        if r.name in ("loss", "accuracy") or r.name in loss_step.outputs:
            assert logits_layer in layers, r.name      # the loss reads the perturbed logits
            continue
        t = schedule.tensors.get(r.name)
        assert t is not None, r.name
        assert schedule.producer(t.alias_of or r.name).layer in layers, (r.name, layers)


def test_perturbed_conv_pool_kernel_fails(cache, tmp_path):
    g = binarynet(32)
    cfg = make_config("proposed", batch=4)
    assert {s.layer for s in build_schedule(g, cfg).steps
            if s.kernel.name == "conv_pool_fwd"} == {"conv2", "conv4", "conv6"}
    rep = run_check(g, cfg, steps=1, work_dir=tmp_path, cache=cache,
                    extra_cflags=["-DBNNC_PERTURB_CONV_POOL_FWD"])
    assert "pool2.out" in {r.name for r in rep.failures} and not rep.ok


def test_cnv_with_fused_conv_bn_sign_passes_check_with_a_short_last_chunk(cache, tmp_path):
    """conv -> l1 BN -> sign fused over chunks of ceil(33 / 32) = 2 samples, the last one short:
    every tensor of the fused steps (the chunk and the lane sums too) matches the reference, and
    a build whose fused step flips one output bit fails at that tensor."""
    g = cnv(16)
    cfg = make_config("proposed", batch=33)
    fused = [s for s in build_schedule(g, cfg).steps if s.kernel.name == "conv_bn_sign_fwd"]
    assert [s.layer for s in fused] == ["bn1", "bn2", "bn3", "bn4", "bn5"]
    assert {s.attrs["chunk"] for s in fused} == {2}
    rep = run_check(g, cfg, steps=2, work_dir=tmp_path / "ok", cache=cache)
    assert rep.ok, format_report(rep)
    names = {r.name for r in rep.rows}
    assert {"bn1.chunk", "bn1.lanes", "bn1.mu", "bn1.psi", "bn1.s", "sign1.out",
            "sign1.mask", "bn5.chunk", "bn2.x16", "bn5.x16"} <= names and not rep.not_compared
    bad = run_check(g, cfg, steps=1, work_dir=tmp_path / "bad", cache=cache,
                    extra_cflags=["-DBNNC_PERTURB_CONV_BN_SIGN_FWD"])
    assert not bad.ok and "sign1.out" in {r.name for r in bad.failures}


def test_perturbed_conv_kernel_fails(cache, tmp_path):
    g = cnv(16)
    rep = run_check(g, make_config("proposed", batch=4), steps=1, work_dir=tmp_path, cache=cache,
                    extra_cflags=["-DBNNC_PERTURB_CONV_DX_PO2"])
    assert {r.name for r in rep.failures} and not rep.ok


def test_compare_rules():
    r = np.array([1.0, -2.0, 0.0, 4.0], np.float32)
    assert compare(0, "t", DType.F32, r * (1 + 5e-6), r, 0.0).ok
    assert not compare(0, "t", DType.F32, r + np.float32(1e-3), r, 0.0).ok
    # a cancelling sum: slack from the magnitudes of its terms
    assert compare(0, "t", DType.F32, np.array([1e-3]), np.array([0.0]), 0.0,
                   extra=np.array([1e-5 * 200])).ok
    one = np.float32(1.0) + np.float32(2.0 ** -7)           # bf16: one ulp passes, two do not
    assert compare(0, "t", DType.BF16, np.array([one]), np.array([1.0]), 0.0).ok
    assert not compare(0, "t", DType.BF16, np.array([1.0 + 2 * 2.0 ** -7]), np.array([1.0]), 0.0).ok
    assert not compare(0, "t", DType.BIT, np.array([1, 0]), np.array([1, 1]), 0.0).ok


def test_cli_check_and_compile(tmp_path, capsys):
    rc = main(["check", "mlp", "--width", "0.25", "--batch", "8", "--steps", "2",
               "--optimizer", "bop", "--keep", str(tmp_path / "chk"), "--verbose"])
    out = capsys.readouterr().out
    assert rc == 0 and "PASS" in out and "fc1.dW" in out and (tmp_path / "chk" / "mlp.c").is_file()
    rc = main(["compile", "mlp", "--width", "0.25", "--batch", "8", "-o", str(tmp_path / "c")])
    out = capsys.readouterr().out
    assert rc == 0
    for f in ("mlp.c", "mlp.h", "Makefile", "plan.json", "report.txt", "bnnc_manifest.json"):
        assert (tmp_path / "c" / f).is_file() and f in out
    rc = main(["compile", "mlp", "--target", "nope", "-o", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown target 'nope'" in err and "Traceback" not in err
