"""Bop (issue 21): the scaled-momentum update is the same bits in the C on every target (host,
rpi4, Cortex-M7 and -M4) as in the numpy reference, weights do flip in those checks, and the
defaults are the ones `--help` states."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest

from bnnc.cli import main
from bnnc.compiler.config import TrainConfig, make_config
from bnnc.compiler.frontend import load_model
from bnnc.compiler.zoo import build_zoo_model
from bnnc.runtime import reference as ref

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc) installed")

_NEEDS = {"rpi4": ("aarch64-linux-gnu-gcc", "qemu-aarch64"),
          "cortex-m7": ("arm-none-eabi-gcc", "qemu-system-arm"),
          "cortex-m4": ("arm-none-eabi-gcc", "qemu-system-arm")}
# threshold 1: the first step only builds momentum (|m| = 1), later steps flip
_CHECK = ["--width", "0.25", "--batch", "8", "--optimizer", "bop", "--bop-threshold", "1",
          "--steps", "3", "--verbose"]


def _target(name: str):
    missing = [t for t in _NEEDS.get(name, ()) if shutil.which(t) is None]
    return pytest.param(name, marks=pytest.mark.skipif(bool(missing),
                                                       reason=f"needs {', '.join(missing)}"))


def _rows(text: str) -> dict[str, tuple[float, int]]:
    """tensor -> (max abs difference, bad elements) of every `--verbose` row of the last step."""
    rows = {}
    for m in re.finditer(r"^(\S+)\s+\S+\s+\S+\s+(\S+)\s+\S+\s+(\d+)\s+\d+\s+ok$", text, re.M):
        rows[m.group(1)] = (float(m.group(2)), int(m.group(3)))
    return rows


def _reference_flips(opts: list[str]) -> int:
    """Weights the reference flips over the check's 3 steps (random batches), so the checks below
    compare real flips, not only momentum."""
    kw = dict(state_dtype="f16", binary_dw=False) if "--no-binary-dw" in opts else {}
    graph = load_model(build_zoo_model("mlp", width=0.25))
    cfg = make_config("proposed", batch=8, optimizer="bop", bop_threshold=1.0, **kw)
    st = ref.init_state(graph, cfg)
    w0 = {k: v.copy() for k, v in st.tensors.items() if v.dtype == np.int8}
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = rng.uniform(-1, 1, (8, 784)).astype(np.float32)
        st, _ = ref.train_step(graph, cfg, st, x, rng.integers(0, 10, 8))
    return sum(int((st.tensors[k] != v).sum()) for k, v in w0.items())


@pytest.mark.parametrize("target", [_target(t) for t in ("host", "rpi4", "cortex-m7", "cortex-m4")])
@pytest.mark.parametrize("extra", [[], ["--state-dtype", "f16", "--no-binary-dw"]])
def test_bop_check_is_bit_exact(target, extra, capsys):
    rc = main(["check", "mlp", "--target", target, *_CHECK, *extra])
    text = capsys.readouterr().out
    assert rc == 0 and text.rstrip().endswith("PASS"), text[-3000:]
    rows = _rows(text)
    bop = [n for n in rows if re.fullmatch(r"fc\d\.W(\.m)?|bn\d\.running_mean", n)]
    assert len(bop) == 15, sorted(rows)     # the running means: shifted with the flips, same bits
    assert all(rows[n] == (0.0, 0) for n in bop), {n: rows[n] for n in bop}
    assert _reference_flips(extra) > 0


def _x_in(out: dict, graph, lay: str, x: np.ndarray) -> np.ndarray:
    src = graph.layer(lay).inputs[0]
    return (x if src == "input" else out[f"{src}.out"]).reshape(len(x), -1).astype(np.float64)


def test_flip_shifts_the_running_mean_by_the_batch_mean_change():
    """The flip-compensated running mean, against an independent computation: after each step the
    shifted running mean of bn_i differs from the unshifted one by exactly what the step's flips
    do to the batch mean of fc_i's output, mean_b(x W_new) - mean_b(x W_old), computed here as two
    float64 products (fc1: real pixels; fc2-fc5: +-1 inputs). Training is unchanged by it."""
    graph = load_model(build_zoo_model("mlp", width=0.25))
    on = make_config("proposed", batch=8, optimizer="bop", bop_threshold=1.0, state_dtype="f32")
    off = make_config("proposed", batch=8, optimizer="bop", bop_threshold=1.0, state_dtype="f32",
                      bop_bn_shift=False)
    st = ref.init_state(graph, on)
    rng = np.random.default_rng(3)
    shifted = 0
    for _ in range(3):
        x = rng.uniform(-1, 1, (8, 784)).astype(np.float32)
        y = rng.integers(0, 10, 8)
        new_on, out = ref.train_step(graph, on, st, x, y)
        new_off, _ = ref.train_step(graph, off, st, x, y)
        for i in range(1, 6):
            w0, w1 = (s.tensors[f"fc{i}.W"].astype(np.float64) for s in (st, new_on))
            assert np.array_equal(w1, new_off.tensors[f"fc{i}.W"])
            xi = _x_in(out, graph, f"fc{i}", x)
            want = (xi @ w1).mean(0) - (xi @ w0).mean(0)
            got = (new_on.tensors[f"bn{i}.running_mean"].astype(np.float64)
                   - new_off.tensors[f"bn{i}.running_mean"])
            scale = np.abs(new_off.tensors[f"bn{i}.running_mean"]) + np.abs(xi).mean(0).sum()
            assert np.all(np.abs(got - want) <= 1e-5 * scale), (i, got, want)
            shifted += int(np.count_nonzero(want))
            for n in (f"bn{i}.running_psi", f"bn{i}.beta"):
                assert np.array_equal(new_on.tensors[n], new_off.tensors[n]), n
        st = new_on
    assert shifted > 50


def test_defaults_are_what_help_says(capsys):
    d = TrainConfig()
    assert (d.bop_gamma, d.bop_threshold, d.bn_momentum, d.lr) == (1e-4, 32.0, 0.9, 1e-3)
    for cmd in ("compile", "check", "train"):
        assert main([cmd, "--help"]) == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "--bop-gamma FLOAT Bop: momentum rate gamma [default: 0.0001]" in text, cmd
        assert re.search(r"--bop-threshold FLOAT .*\[default: 32\]", text), cmd
        assert re.search(r"--bn-momentum FLOAT .*\[default: 0.9\]", text), cmd
        assert re.search(r"--bop-bn-shift / --no-bop-bn-shift .*\[default: on\]", text), cmd
        assert re.search(r"--lr FLOAT .*\[default: 0.001; bop: 0.03\]", text), cmd
    # the optimizer's defaults, the same for every target: the flags are the only way to change them
    for alg in ("proposed", "standard"):
        cfg = make_config(alg, optimizer="bop")
        want = (1e-4, 32.0, 0.9, 3e-2)
        assert (cfg.bop_gamma, cfg.bop_threshold, cfg.bn_momentum, cfg.lr) == want
        assert make_config(alg).lr == make_config(alg, optimizer="sgd").lr == 1e-3
    assert make_config("proposed", optimizer="bop", lr=0.5).lr == 0.5


def test_flags_reach_the_compiled_config(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["compile", "tfc", "--batch", "8", "--optimizer", "bop", "--bop-gamma", "0.001",
                 "--bop-threshold", "3", "--bn-momentum", "0.8", "-o", str(out)]) == 0
    text = (out / "tfc.c").read_text()
    assert re.search(r"\(float\)0\.999,\s+\(float\)3\.0", text)   # 1 - gamma, the threshold
    # the flip-compensated running mean: each dense layer's update reads its input and the next BN
    assert re.search(r"k_bop_update_\w*shift1\(S_fc1_W,.*T_flatten1_out,\s*S_bn1_running_mean, 8,\s*0, \d+\)",
                     text, re.S)
    assert text.count("shift1(S_fc") == 4
    assert main(["compile", "tfc", "--batch", "8", "--optimizer", "bop", "--no-bop-bn-shift",
                 "-o", str(out)]) == 0
    text = (out / "tfc.c").read_text()
    assert "shift1" not in text
    # no --lr: the betas' Adam starts at Bop's default lr (compiler/README.md, "Bop", fourth pass)
    assert "const float lr = (float)0.03;" in text
    for bad, msg in ((["--bop-gamma", "0"], "--bop-gamma must lie in"),
                     (["--bop-threshold", "-1"], "--bop-threshold must be >= 0"),
                     (["--bn-momentum", "1"], "--bn-momentum must lie in")):
        capsys.readouterr()
        assert main(["compile", "tfc", "--optimizer", "bop", *bad, "-o", str(tmp_path / "x")]) == 2
        assert msg in capsys.readouterr().err
