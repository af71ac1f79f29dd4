"""A model trained outside bnnc: a tiny binary MLP trained with Brevitas (scripts/brevitas_mnist.py,
a few hundred steps on an MNIST look-alike) and exported with `brevitas.export.export_qonnx`.

- bnnc imports it, and the emitted C's step-0 predictions equal onnxruntime's on the exported file
  under the standard and the proposed (default) algorithm.
- README "Fine-tune a pretrained model", end to end through the CLI as a user types it: the file
  records its input convention ([0, 1]) so no flag is needed; `bnnc eval` at step 0 equals
  onnxruntime on the source file; fine-tuning on the host, on rpi4 under qemu-aarch64 and on a
  cortex-m4 under qemu-system-arm (a RAM-fitted trainable suffix); the exported file scored by
  onnxruntime equals `bnnc eval` of the same state.

Expected values come from onnxruntime on pixels scaled here by hand (x / 255), not from bnnc's
preprocessing table; the rpi4 program must compute bit-identical floats to the host's
(`-ffp-contract=off`, README "Raspberry Pi"), the cortex-m4 the host's losses to float rounding
(tests/test_freeze.py, the same freeze set and batch)."""

from __future__ import annotations

import sys
from pathlib import Path

import brevitas  # noqa: F401  (a pinned test dependency: a broken install fails, not skips)
import numpy as np
import onnx
import onnxscript  # noqa: F401  (torch.onnx's exporter, which Brevitas' QONNX export uses)
import pytest

from bnnc.cli import main
from bnnc.compiler.config import make_config
from bnnc.compiler.contract import read_manifest
from bnnc.compiler.frontend import load_model
from bnnc.compiler.pipeline import compile_to_c
from bnnc.compiler.preprocess import Preprocess, from_model
from bnnc.compiler.target import load_target
from bnnc.runtime import reference as ref
from bnnc.runtime.datasets import load_raw
from bnnc.runtime.host import HostProgram
from mnist_like import write_mnist_like

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))  # not a package
import brevitas_mnist as bm  # noqa: E402

B = 50


@pytest.fixture(scope="module")
def brevitas_model(tmp_path_factory):
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


# --------------------------------------------------------------------------------------------------
# README "Fine-tune a pretrained model", end to end

def _cli(args, capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _losses(text: str) -> list[str]:
    return [ln.split("loss ")[1].split()[0] for ln in text.splitlines()
            if ln.lstrip().startswith("step ") and "loss " in ln]


def _npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def test_readme_story_end_to_end(brevitas_model, tmp_path, capsys):
    bm, path, root = brevitas_model
    assert from_model(onnx.load(path)) == Preprocess("unit")     # recorded as bnnc reads it
    raw = load_raw("mnist", root)
    x01, y = raw.x_test.astype(np.float32) / 255, raw.y_test      # the convention, by hand
    data = ["--data", "mnist", "--data-dir", root]
    steps = ["--steps", "6", "--log-every", "1"]

    # step 0 on the host equals onnxruntime on the source file, example by example
    host = tmp_path / "host"
    rc, so, err = _cli(["compile", path, "--batch", "50", "-o", host], capsys)
    assert rc == 0, err
    assert "input u/255, range [0, 1]" in so and "preprocessing" not in err    # no flag, no notice
    rc, so, err = _cli(["eval", host, *data, "--state", "init", "--predictions",
                        tmp_path / "step0.npy"], capsys)
    assert rc == 0, err
    src = bm.ort_logits(path, x01).argmax(1)
    np.testing.assert_array_equal(np.load(tmp_path / "step0.npy"), src)
    assert f"accuracy {100 * np.mean(src == y):.2f} %" in so
    assert np.mean(src == y) > 0.5                     # a trained start, not chance

    # fine-tune on the host; eval again; export; onnxruntime on the export equals bnnc eval
    rc, so, err = _cli(["run", host, *data, *steps], capsys)
    assert rc == 0, err
    host_losses = _losses(so)
    assert len(host_losses) == 6
    init, final = _npz(host / "init_state.npz"), _npz(host / "final_state.npz")
    assert any(not np.array_equal(init[k], final[k]) for k in init if k.endswith(".W"))
    rc, so, err = _cli(["eval", host, *data, "--predictions", tmp_path / "host.npy"], capsys)
    assert rc == 0, err
    assert "state " + str(host / "final_state.npz") in so
    rc, so, err = _cli(["export", host, "-o", tmp_path / "host.onnx"], capsys)
    assert rc == 0, err
    assert from_model(onnx.load(tmp_path / "host.onnx")) == Preprocess("unit")
    host_pred = np.load(tmp_path / "host.npy")
    np.testing.assert_array_equal(bm.ort_logits(tmp_path / "host.onnx", x01).argmax(1), host_pred)

    # rpi4 under qemu-aarch64: the same program, bit-identical floats: the same losses, the same
    # trained state, the same predictions, scored where it runs
    pi = tmp_path / "pi"
    assert _cli(["compile", path, "--batch", "50", "--target", "rpi4", "-o", pi], capsys)[0] == 0
    rc, so, err = _cli(["run", pi, "--emulate", *data, *steps], capsys)
    assert rc == 0, err
    assert _losses(so) == host_losses
    pi_final = _npz(pi / "final_state.npz")
    assert pi_final.keys() == final.keys()
    for k in final:
        np.testing.assert_array_equal(pi_final[k], final[k], err_msg=k)
    rc, so, err = _cli(["eval", pi, "--emulate", *data, "--predictions", tmp_path / "pi.npy"],
                       capsys)
    assert rc == 0, err
    assert "qemu-aarch64" in so
    np.testing.assert_array_equal(np.load(tmp_path / "pi.npy"), host_pred)

    # cortex-m4 under qemu-system-arm in 64 KiB of RAM: --fit picks a trainable suffix and a batch
    m4 = tmp_path / "m4"
    rc, so, err = _cli(["compile", path, "--target", "cortex-m4", "--ram", "64K", "--batch", "50",
                        "--fit", "-o", m4], capsys)
    assert rc == 0, err
    chosen = so.split("chosen: ")[1].split("\n")[0]
    train_from, batch = chosen.split()[1], int(chosen.split()[3])
    man = read_manifest(m4)
    assert man.frozen and man.batch == batch and chosen.startswith("--train-from ")
    rc, so, err = _cli(["run", m4, "--emulate", *data, *steps], capsys)
    assert rc == 0, err
    m4_losses = _losses(so)
    assert len(m4_losses) == 6
    m4_init, m4_final = _npz(m4 / "init_state.npz"), _npz(m4 / "final_state.npz")
    for k in man.frozen:
        np.testing.assert_array_equal(m4_final[k], m4_init[k], err_msg=k)
    assert any(not np.array_equal(m4_init[k], m4_final[k]) for k in m4_init
               if k.endswith(".W") and k not in man.frozen)
    # the host program of the same freeze set and batch computes the same losses
    same = tmp_path / "same"
    assert _cli(["compile", path, "--batch", batch, "--train-from", train_from, "-o", same],
                capsys)[0] == 0
    rc, so, err = _cli(["run", same, *data, *steps], capsys)
    assert rc == 0, err
    # the trained states are the same bits (the printed losses come from two loss reductions, the
    # device's f32 and the host runner's, and may differ in the last printed digit)
    same_final = _npz(same / "final_state.npz")
    assert sorted(same_final) == sorted(m4_final)
    for k in m4_final:
        np.testing.assert_array_equal(m4_final[k], same_final[k], err_msg=k)
    np.testing.assert_allclose([float(v) for v in m4_losses], [float(v) for v in _losses(so)],
                               atol=2e-4)
    # eval under QEMU and the export of the M4's state, scored by onnxruntime: the same predictions
    rc, so, err = _cli(["eval", m4, "--emulate", *data, "--predictions", tmp_path / "m4.npy"],
                       capsys)
    assert rc == 0, err
    assert _cli(["export", m4, "-o", tmp_path / "m4.onnx"], capsys)[0] == 0
    np.testing.assert_array_equal(bm.ort_logits(tmp_path / "m4.onnx", x01).argmax(1),
                                  np.load(tmp_path / "m4.npy"))
