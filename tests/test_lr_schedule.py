"""The learning-rate schedule (`--lr-schedule`, compiler/README.md "Learning-rate schedule"): its
values against the textbook formulas (not the code under test), the C's float32 lr equal to the
numpy reference's bit for bit, `bnnc check` with a decaying lr, a run interrupted mid-schedule and
resumed equal to an uninterrupted one, the manifest, and bad option values."""

from __future__ import annotations

import math
import shutil
import subprocess

import numpy as np
import pytest

from mnist_like import pack_bands
from bnnc.cli import main
from bnnc.compiler import numerics as nx
from bnnc.compiler.contract import read_manifest
from bnnc.runtime.host import HostProgram
from bnnc.runtime.programs import build_trainer

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc) installed")

BATCH = 10
HORIZONS = (1, 2, 7, 600, 100_003, 2**32 - 1)


def _steps(h: int) -> list[int]:
    return sorted(t for t in {1, 2, 3, h // 3 + 1, h // 2, h // 2 + 1, h - 1, h, h + 1, h + 50}
                  if t >= 1)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_values_follow_the_formula(schedule):
    lr = 3e-3
    for h in HORIZONS:
        for t in _steps(h):
            p = min(t - 1, h) / h
            want = lr * (1 - p) if schedule == "linear" else lr * (1 + math.cos(math.pi * p)) / 2
            got = float(nx.lr_at(lr, schedule, t, h))
            # float32: p rounded once (|dp| <= 6e-8), the polynomial and products a few ulps
            assert abs(got - want) <= 4e-7 * lr, (schedule, h, t, got, want)
        assert nx.lr_at(lr, schedule, 1, h) == np.float32(lr)          # the first step: lr
        assert nx.lr_at(lr, schedule, h + 1, h) == 0
        if h < 2**24:           # above, (h - 1) / h rounds to 1 in float32
            assert nx.lr_at(lr, schedule, h, h) > 0
    run = [nx.lr_at(lr, schedule, t, 600) for t in range(1, 602)]
    assert all(a >= b for a, b in zip(run, run[1:]))                   # never rises
    # half-way: linear exactly lr/2 (p = 1/2 is exact), cosine cos^2(pi/4) = 1/2 too
    assert abs(float(nx.lr_at(lr, schedule, 301, 600)) - lr / 2) <= 1e-7 * lr
    # no horizon (firmware library, fleet) and the constant schedule: the base lr at every step
    for t in (1, 7, 10**6):
        assert nx.lr_at(lr, schedule, t, 0) == np.float32(lr)
        assert nx.lr_at(lr, "constant", t, 600) == np.float32(lr)


@pytest.fixture(scope="module", params=["linear", "cosine"])
def program(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"lr-{request.param}") / "mlp"
    assert main(["compile", "mlp", "--width", "0.125", "--batch", str(BATCH), "--lr", "0.002",
                 "--lr-schedule", request.param, "-o", str(out)]) == 0
    return request.param, out


def test_c_lr_is_the_references_bit_for_bit(program):
    schedule, out = program
    assert read_manifest(out).config["lr_schedule"] == schedule      # recorded in OUT
    hp = HostProgram(out, debug=False)
    for h in (0,) + HORIZONS:
        hp.set_lr_horizon(h)
        ts = sorted(set(_steps(h)) | set(range(0, min(h, 700) + 2)))
        got = np.array([hp.lr_at(t) for t in ts], np.float32)
        want = np.array([nx.lr_at(0.002, schedule, t, h) for t in ts], np.float32)
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (schedule, h)
    # the horizon is a setting of the run: init and load_state keep it
    hp.set_lr_horizon(40)
    hp.init(3)
    assert hp.lr_at(21) == float(nx.lr_at(0.002, schedule, 21, 40))


def test_check_with_a_decaying_sgd_lr(capsys):
    """SGD's update reads the scheduled lr directly (Adam divides most of it away): the C's
    parameters after each step equal the reference's at the schedule's lr, every step."""
    assert main(["check", "mlp", "--width", "0.125", "--batch", str(BATCH), "--optimizer", "sgd",
                 "--lr", "0.05", "--lr-schedule", "linear", "--steps", "3"]) == 0
    assert "PASS" in capsys.readouterr().out


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return pack_bands(tmp_path_factory.mktemp("lr-data") / "train.bnnd", seed=5)


def _train(exe, data, ckpt, *args) -> bytes:
    res = subprocess.run([str(exe), "--train", str(data), "--checkpoint", str(ckpt),
                          *map(str, args)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    return ckpt.read_bytes()


def test_resume_mid_schedule_equals_uninterrupted(program, data_file, tmp_path):
    _, out = program
    exe = build_trainer(out)
    whole = _train(exe, data_file, tmp_path / "a.bin", "--steps", 20)
    # stopped at step 8 of a 20-step schedule, resumed by the same target: bit-identical
    _train(exe, data_file, tmp_path / "b.bin", "--steps", 8, "--lr-horizon", 20)
    assert _train(exe, data_file, tmp_path / "b.bin", "--steps", 20, "--resume") == whole
    # the schedule acts: an 8-step run decays over its own 8 steps, and a constant lr differs too
    _train(exe, data_file, tmp_path / "c.bin", "--steps", 8)
    assert _train(exe, data_file, tmp_path / "c.bin", "--steps", 20, "--resume") != whole
    assert _train(exe, data_file, tmp_path / "d.bin", "--steps", 20, "--lr-horizon", 0) != whole


def test_bad_values_are_one_error_line(program, tmp_path, capsys):
    _, out = program
    assert main(["compile", "mlp", "--lr-schedule", "cosin", "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown learning-rate schedule 'cosin'")
    assert "constant, linear, cosine" in err[0]
    assert main(["run", str(out), "--data", "mnist", "--lr-horizon", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error: --lr-horizon -1 is outside [0, 4294967295]")
    assert not (tmp_path / "x").exists()
