"""`--input u8`: the batch kept as 8-bit pixels and the integer first layer (compiler/README.md
"The u8 input"). The C's integer first layer is checked against an independent integer numpy
computation, the whole step against the reference by `bnnc check` (host, rpi4, cortex-m4), and
float inputs keep working."""

from __future__ import annotations

import numpy as np
import pytest

from graphs import cnv, mlp
from bnnc.cli import main
from bnnc.compiler.config import make_config, with_input
from bnnc.compiler.errors import ConfigError, DataError
from bnnc.compiler.ops.dense import u8_bounds
from bnnc.compiler.pipeline import compile_to_c
from bnnc.compiler.preprocess import DEFAULT, parse_preprocess, pixel_affine, pixel_lut
from bnnc.compiler.schedule import build_schedule
from bnnc.compiler.schedule_ir import DType
from bnnc.compiler.target import load_target
from bnnc.runtime import reference
from bnnc.runtime.check import run_check
from bnnc.runtime.host import HostProgram


def _u8(graph, pre=DEFAULT, **kw):
    cfg = make_config("proposed", **{"batch": 16, **kw})
    c = 1 if len(graph.input_shape) == 1 else graph.input_shape[0]
    return with_input(cfg, graph, "u8", pixel_affine(pre, c))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("so-cache")


def test_schedule_keeps_the_input_as_u8_and_saves_it_for_dw():
    g = mlp((64, 32))
    s = build_schedule(g, _u8(g))
    assert s.tensors["input"].dtype is DType.U8
    assert s.tensors["input"].nbytes == 16 * 784          # a quarter of the f32 batch
    first = [st for st in s.steps if st.layer == "fc1"]
    assert [st.kernel.name for st in first][:1] == ["dense_fwd_u8"]
    dw = next(st for st in first if st.kernel.name == "dense_dw_bin")
    assert dw.inputs[0] == "flatten0.out" and s.tensors[dw.inputs[0]].alias_of == "input"
    assert not any(n.startswith("fc1.x_saved") for n in s.tensors)


def test_int32_bounds_are_proved_per_layer_and_widen():
    assert u8_bounds(100, 784, 1) == dict(u8_plane=784, int_bound_fwd=2 * 255 * 784,
                                          int_bound_dw=100 * 255 * 2**15, acc64_fwd=False,
                                          acc64_dw=False)
    assert u8_bounds(257, 784, 1)["acc64_dw"] is False     # 257 * 255 * 2^15 < 2^31
    assert u8_bounds(258, 784, 1)["acc64_dw"] is True
    assert u8_bounds(1, 2**23, 1)["acc64_fwd"] is True      # 510 * 2^23 > 2^31 - 1
    assert u8_bounds(1, 2**22, 1)["acc64_fwd"] is False     # 510 * 2^22 < 2^31 - 1


@pytest.fixture(scope="module")
def u8_prog(tmp_path_factory, cache):
    g = mlp((48, 32))
    cfg = _u8(g, batch=12)
    out = tmp_path_factory.mktemp("u8mlp")
    compile_to_c(g, cfg, load_target("host"), out)
    return g, cfg, HostProgram(out, cache=cache)


def test_integer_first_layer_equals_an_independent_integer_computation(u8_prog):
    g, cfg, hp = u8_prog
    init = reference.init_state(g, cfg)
    hp.load_state(init.tensors)
    rng = np.random.default_rng(3)
    u = rng.integers(0, 256, (12, 1, 28, 28), dtype=np.uint8)
    u[:, :, :6] = 0                                    # MNIST-like zero rows
    hp.train_step(u, rng.integers(0, 10, 12))
    s = np.where(np.asarray(init.tensors["fc1.W"], np.float64) >= 0, 1, -1).astype(np.int64)
    ui = u.reshape(12, -1).astype(np.int64)
    # symmetric: x = (2u - 255) / 255, so 255 * (x . s) is the integer 2 (u . s) - 255 sum(s);
    # the C's float32 result is within far less than 1/510 of it
    exact = 2 * (ui @ s) - 255 * s.sum(axis=0)
    y = hp.tensor("fc1.out").reshape(12, -1).astype(np.float64)
    assert np.array_equal(np.rint(y * 255).astype(np.int64), exact)
    # dW: sign bits of X^T Q, Q from the C's own PO2 codes, in exact integers
    codes = np.frombuffer(hp.raw("fc1.d_out_q"), np.uint8)[:12 * 48].reshape(12, 48).astype(np.int64)
    q = np.where(codes == 0x20, 0, np.where(codes & 16, -1, 1) << (codes & 15))
    v = 2 * (ui.T @ q) - 255 * q.sum(axis=0)
    bits = hp.tensor("fc1.dW").reshape(784, 48)
    clear = np.abs(v) > 1e-5 * (2 * (np.abs(ui.T) @ np.abs(q)) + 255 * np.abs(q).sum(axis=0))
    assert clear.mean() > 0.99
    assert np.array_equal((bits > 0)[clear], (v >= 0)[clear])


def test_float_inputs_still_work_and_u8_programs_refuse_float_features(u8_prog):
    g, cfg, hp = u8_prog
    hp.load_state(reference.init_state(g, cfg).tensors)
    rng = np.random.default_rng(0)
    u = rng.integers(0, 256, (12, 1, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, 12)
    # the pixels' float values under the program's preprocessing are its pixels
    a = hp.predict(u)
    assert np.array_equal(hp.predict(pixel_lut(DEFAULT, 1)[0][u]), a)
    features = rng.normal(size=(12, 784)).astype(np.float32)     # e.g. CSV sensor data
    with pytest.raises(DataError, match="not a pixel value"):
        hp.train_step(features, y)
    with pytest.raises(DataError, match="compiled with --input u8"):
        reference.train_step(g, cfg, reference.init_state(g, cfg), features, y)
    # the same model with the default f32 input takes any float (the reference mirrors the C;
    # the rest of the suite checks the f32 C)
    f32 = make_config("proposed", batch=12)
    _, out = reference.train_step(g, f32, reference.init_state(g, f32), features, y)
    assert np.isfinite(out["loss"])


@pytest.mark.parametrize("pre,optimizer", [("norm:0.4,0.5,0.6/0.2,0.25,0.3", "bop")])
def test_check_passes_bit_exact_on_host(tmp_path, cache, pre, optimizer):
    # three input channels with their own maps: the per-channel sums of both kernels
    g = mlp((40, 24), input_shape=(3, 6, 6))
    rep = run_check(g, _u8(g, parse_preprocess(pre), batch=10, optimizer=optimizer), steps=2,
                    work_dir=tmp_path, cache=cache)
    assert rep.ok, rep.failures
    rows = {r.name: r for r in rep.rows}
    assert rows["fc1.out"].max_abs == 0 and rows["fc1.dW"].mismatches == 0


def test_wide_dw_accumulator_passes_check(tmp_path, cache):
    g = mlp((16, 10), input_shape=(1, 4, 4))
    cfg = _u8(g, batch=300)
    assert build_schedule(g, cfg).steps[0].attrs["acc64_dw"]
    rep = run_check(g, cfg, steps=1, work_dir=tmp_path, cache=cache)
    assert rep.ok, rep.failures


def test_check_on_rpi4(capsys):
    assert main(["check", "mlp", "--width", "0.125", "--batch", "8", "--steps", "1",
                 "--input", "u8", "--target", "rpi4"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "0 failing" in out


def test_check_on_cortex_m4(capsys):
    # the bare-metal trainer and the firmware API take u8 samples too (tests/test_firmware.py runs
    # the example firmware with --input u8 against the standalone trainer)
    assert main(["check", "tfc", "--width", "0.25", "--batch", "8", "--steps", "1",
                 "--input", "u8", "--target", "cortex-m4"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "0 failing" in out


def test_refusals_name_the_reader_and_the_techniques(capsys):
    g = cnv(8)
    with pytest.raises(ConfigError, match="read by affine0"):
        _u8(g)
    assert main(["compile", "mlp", "--input", "u8", "--algorithm", "standard", "-o",
                 "/nonexistent/never"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "--no-binary-dw" in err
