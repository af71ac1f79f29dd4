"""End to end on the host: `bnnc compile` -> `bnnc run` (emitted C trains on an MNIST-format data
set) -> `bnnc export OUT/` -> onnxruntime agrees with the C's own `predict`; `--resume` continues
from the state blob exactly as an uninterrupted run does."""

from __future__ import annotations

import struct

import numpy as np
import onnxruntime as ort
import pytest

from bnnc.cli import main
from bnnc.compiler.errors import OutDirError
from bnnc.runtime.host import HostProgram
from mnist_like import write_mnist_like

BATCH = 20


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_mnist_like(tmp_path_factory.mktemp("data"), 200, 60, seed=0)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "mlp"
    assert main(["compile", "mlp", "--width", "0.25", "--batch", str(BATCH), "-o", str(out)]) == 0
    for f in ("mlp.c", "mlp.h", "model.onnx", "init_state.npz", "plan.json"):
        assert (out / f).is_file(), f
    return out


def test_run_trains_and_export_matches_c_predict(compiled, data_root, tmp_path, capsys):
    rc = main(["run", str(compiled), "--data", "mnist", "--data-dir", str(data_root),
               "--epochs", "3"])
    assert rc == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("epoch")]
    assert len(lines) == 3
    first, last = (float(ln.split("train loss ")[1].split()[0]) for ln in (lines[0], lines[-1]))
    assert last < first, lines            # the emitted C learns

    onnx_path = tmp_path / "trained.onnx"
    assert main(["export", str(compiled), "-o", str(onnx_path)]) == 0

    prog = HostProgram(compiled, debug=False)
    prog.set_state((compiled / "state.bin").read_bytes())
    x = np.random.default_rng(5).uniform(-1, 1, (BATCH, 1, 28, 28)).astype(np.float32)
    want = prog.predict(x)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    assert np.array_equal(got.argmax(1), want.argmax(1))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_resume_equals_uninterrupted_run(compiled, data_root, tmp_path):
    common = ["--data", "mnist", "--data-dir", str(data_root)]
    # 10 batches per epoch: the resumed part crosses an epoch boundary
    assert main(["run", str(compiled), *common, "--steps", "13"]) == 0
    whole = (compiled / "state.bin").read_bytes()
    # interrupted at step 5 of the 13-step run: its lr schedule still decays to step 13
    assert main(["run", str(compiled), *common, "--steps", "5", "--lr-horizon", "13"]) == 0
    part = tmp_path / "part.bin"
    part.write_bytes((compiled / "state.bin").read_bytes())
    assert whole != part.read_bytes()
    # the resumed run must see the batches steps 6..13 would have seen: same seed, skip 5
    assert main(["run", str(compiled), *common, "--steps", "8", "--resume", str(part)]) == 0
    assert (compiled / "state.bin").read_bytes() == whole


def test_run_refuses_a_non_compiled_directory(tmp_path, capsys):
    assert main(["run", str(tmp_path), "--data", "mnist"]) == 2
    err = capsys.readouterr().err
    assert "no bnnc_manifest.json" in err and "Traceback" not in err


def test_a_failed_checkpoint_write_leaves_the_old_one(tmp_path, monkeypatch):
    from bnnc.runtime import outdir

    target = tmp_path / "final_state.npz"
    outdir.save_state_atomic(target, {"a.W": np.ones(3, np.float32)})
    old = target.read_bytes()

    def dies_halfway(path, state, **_):
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 torn")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outdir, "save_state_npz", dies_halfway)
    with pytest.raises(OutDirError, match="No space left"):
        outdir.save_state_atomic(target, {"a.W": np.zeros(3, np.float32)})
    assert target.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["final_state.npz"]     # no temp file left
