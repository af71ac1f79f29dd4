"""User datasets (--data PATH), the transforms that fit them to a model, the preprocessing contract
and `bnnc eval` (issues 14.2, 14.3, 15).

Expected values come from independent constructions: hand-written padding, pillow's own convert /
resize, exact rationals (fractions) for the pixel tables, the numpy reference for the compiled
program's predictions."""

from __future__ import annotations

import json
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from bnnc.cli import main
from bnnc.compiler.contract import Manifest, read_manifest
from bnnc.compiler.errors import ConfigError, DataError
from bnnc.compiler.preprocess import (DEFAULT, Preprocess, from_model, parse_preprocess,
                                      pixel_affine, pixel_lut)
from bnnc.compiler.zoo import build_zoo_model
from bnnc.runtime import packed
from bnnc.runtime.datasets import DataRequest, open_data, pad_to_cifar, preprocess_pixels
from bnnc.runtime.transforms import plan_fit

from mnist_like import write_mnist_like


def _cli(args, capsys):
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# -------------------------------------------------------------------------------------------------
# preprocessing

def test_pixel_tables_are_one_rounding_of_the_exact_value():
    for pre, exact in ((DEFAULT, lambda u: Fraction(2 * u - 255, 255)),
                       (Preprocess("unit"), lambda u: Fraction(u, 255))):
        lut = pixel_lut(pre, 1)[0]
        want = np.array([float(exact(u)) for u in range(256)], np.float64).astype(np.float32)
        np.testing.assert_array_equal(lut, want)
    pre = parse_preprocess("norm:0.5,0.25,0.125/0.5,0.25,2")
    lut = pixel_lut(pre, 3)
    for c, (m, s) in enumerate(((0.5, 0.5), (0.25, 0.25), (0.125, 2.0))):
        want = ((np.arange(256) / 255 - m) / s).astype(np.float32)
        np.testing.assert_allclose(lut[c], want, rtol=0, atol=2e-7)
    a, b = pixel_affine(pre, 3)
    assert a[2] == 1 / (255 * 2.0) and b[2] == -0.125 / 2.0


def test_bad_preprocess_specs_are_config_errors():
    for spec in ("minus1", "norm:0.5", "norm:0.5/0", "norm:a/1", "norm:0.1,0.2/0.3"):
        with pytest.raises(ConfigError):
            parse_preprocess(spec)
    with pytest.raises(ConfigError, match="3 channel values but the model input has 1"):
        pixel_affine(parse_preprocess("norm:0.1,0.2,0.3/1,1,1"), 1)


def test_zoo_models_record_their_preprocessing():
    assert from_model(build_zoo_model("tfc")) == DEFAULT


def test_manifest_records_preprocessing_and_the_trainer_applies_it(tmp_path, capsys):
    """--preprocess unit: manifest, trainer table and `bnnc eval` (the trainer) agree with the
    numpy reference fed u/255."""
    root = write_mnist_like(tmp_path / "d", 200, 100, seed=3)
    out = tmp_path / "o"
    rc, so, err = _cli(["compile", "tfc", "--batch", "20", "--algorithm", "standard",
                        "--preprocess", "unit", "-o", out], capsys)
    assert rc == 0, err
    m = read_manifest(out)
    assert m.preprocess == Preprocess("unit")
    assert Manifest.from_json(m.to_json()) == m
    assert json.loads(m.to_json())["input_affine"] == {"scale": [1 / 255], "offset": [0.0]}
    assert "(float)0.003921568859368563" in (out / "trainer.c").read_text()   # float32(1/255)
    rc, so, err = _cli(["eval", out, "--data", "mnist", "--data-dir", root, "--state", "init"],
                       capsys)
    assert rc == 0, err
    acc_c = float(so.split("accuracy ")[1].split(" %")[0])
    loss_c = float(so.split("mean loss ")[1].split()[0])
    rc, so2, err = _cli(["eval", "tfc", "--data", "mnist", "--data-dir", root, "--batch", "20",
                         "--algorithm", "standard", "--preprocess", "unit"], capsys)
    assert rc == 0, err
    assert f"accuracy {acc_c:.2f} %" in so2
    assert abs(float(so2.split("mean loss ")[1].split()[0]) - loss_c) < 1e-3 * max(1, loss_c)
    # the confusion matrices agree row by row
    rows = lambda s: [ln for ln in s.splitlines() if ln[:1].isdigit()]  # noqa: E731
    assert rows(so) == rows(so2)
    # the default convention scores differently on the same weights: the table is really used
    rc, so3, _ = _cli(["eval", "tfc", "--data", "mnist", "--data-dir", root, "--batch", "20",
                       "--algorithm", "standard"], capsys)
    assert so3.split("mean loss ")[1].split()[0] != so2.split("mean loss ")[1].split()[0]


def test_per_channel_tables_in_the_trainer(tmp_path, capsys):
    """norm with three channels: three tables in the trainer, PIXEL(k, u) picks channel k / plane;
    the compiled program's eval equals the numpy reference's on RGB data."""
    rng = np.random.default_rng(4)
    x = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", x=x, y=np.arange(12) % 10)
    spec = "norm:0.49,0.48,0.45/0.25,0.24,0.26"
    out = tmp_path / "cnv"
    rc, _, err = _cli(["compile", "cnv", "--width", "0.125", "--batch", "4", "--algorithm",
                       "standard", "--preprocess", spec, "-o", out], capsys)
    assert rc == 0, err
    src = (out / "trainer.c").read_text()
    assert "#define PIXEL_TABLES 3u" in src and "pixel_lut[(k) / PIXEL_PLANE][u]" in src
    common = ["--data", tmp_path / "rgb.npz", "--val-split", "0.5"]
    rc, so_c, err = _cli(["eval", out, *common, "--state", "init"], capsys)
    assert rc == 0, err
    rc, so_r, err = _cli(["eval", "cnv", "--width", "0.125", "--batch", "4", "--algorithm",
                          "standard", "--preprocess", spec, *common], capsys)
    assert rc == 0, err
    rows = lambda s: [ln for ln in s.splitlines() if ln[:1].isdigit()]  # noqa: E731
    assert rows(so_c) == rows(so_r)
    loss = [float(s.split("mean loss ")[1].split()[0]) for s in (so_c, so_r)]
    assert abs(loss[0] - loss[1]) <= 1e-4 * max(1.0, loss[1])


def test_a_file_without_a_convention_gets_the_default_and_one_notice(tmp_path, capsys):
    model = build_zoo_model("tfc")
    del model.metadata_props[:]
    f = tmp_path / "bare.onnx"
    f.write_bytes(model.SerializeToString())
    rc, so, err = _cli(["compile", f, "--batch", "10", "-o", tmp_path / "o"], capsys)
    assert rc == 0
    notes = [ln for ln in err.splitlines() if "preprocessing" in ln]
    assert len(notes) == 1 and "symmetric" in notes[0], err
    assert read_manifest(tmp_path / "o").preprocess == DEFAULT


# -------------------------------------------------------------------------------------------------
# transforms

def test_mnist_fits_cnv_like_pad_to_cifar(tmp_path):
    root = write_mnist_like(tmp_path, 30, 10, seed=1)
    d = open_data(DataRequest("mnist", root), (3, 32, 32), 10)
    x, y = d.arrays("train", None)
    raw = open_data(DataRequest("mnist", root), (1, 28, 28), 10).arrays("train", None)[0]
    np.testing.assert_array_equal(x, pad_to_cifar(raw))
    assert d.fit.describe() == "grey->rgb, pad to 32x32"
    np.testing.assert_array_equal(preprocess_pixels(x), pad_to_cifar(preprocess_pixels(raw)))


def test_nhwc_rgb_to_grey_and_resize_match_pillow(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (4, 20, 24, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(4))
    got, _ = open_data(DataRequest(str(tmp_path / "d.npz")), (1, 20, 24), 4).arrays("train", None)
    want = np.stack([np.asarray(Image.fromarray(im, "RGB").convert("L")) for im in x])[:, None]
    np.testing.assert_array_equal(got, want)
    req = DataRequest(str(tmp_path / "d.npz"), fit="resize")
    got, _ = open_data(req, (3, 16, 16), 4).arrays("train", None)
    want = np.stack([[np.asarray(Image.fromarray(np.ascontiguousarray(im[..., c]), "L")
                                 .resize((16, 16), Image.Resampling.BILINEAR)) for c in range(3)]
                     for im in x])
    np.testing.assert_array_equal(got, want)


def test_fit_refuses_what_needs_an_option():
    with pytest.raises(DataError, match="larger than the model's 28x28 input"):
        plan_fit((32, 32, 3), (3, 28, 28))
    with pytest.raises(DataError, match="--fit none"):
        plan_fit((1, 20, 20), (1, 28, 28), "none")
    with pytest.raises(DataError, match="2 channel"):  # noqa: PT011
        plan_fit((2, 28, 28), (3, 28, 28))
    assert plan_fit((28, 28, 1), (1, 28, 28)).layout == "NHWC"
    assert plan_fit((1, 28, 28), (784,)).describe() == "flatten to 784"


# -------------------------------------------------------------------------------------------------
# sources

def _png_folder(root: Path, per_class: dict[str, int], size=(12, 10), seed=0) -> dict:
    rng = np.random.default_rng(seed)
    images = {}
    for name, n in per_class.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            im = rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8)
            Image.fromarray(im, "L").save(root / name / f"{i:03d}.png")
            images[(name, i)] = im
    return images


def test_image_folder_train_test_and_class_map(tmp_path):
    tr = _png_folder(tmp_path / "f" / "train", {"cat": 3, "dog": 2, "emu": 2})
    te = _png_folder(tmp_path / "f" / "test", {"dog": 2, "emu": 1}, seed=1)
    d = open_data(DataRequest(str(tmp_path / "f")), (1, 12, 12), 4)
    assert d.class_names == ("cat", "dog", "emu")
    x, y = d.arrays("train", None)
    assert y.tolist() == [0, 0, 0, 1, 1, 2, 2]
    np.testing.assert_array_equal(x[3, 0, 1:11], tr[("dog", 0)])     # padded 10 -> 12 rows
    assert (x[:, :, 0] == 0).all() and (x[:, :, 11] == 0).all()
    xt, yt = d.arrays("test", None)
    assert yt.tolist() == [1, 1, 2]                                   # mapped by class name
    np.testing.assert_array_equal(xt[2, 0, 1:11], te[("emu", 0)])


def test_val_split_is_seeded_disjoint_and_complete(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.arange(50, dtype=np.uint8).reshape(50, 1, 1, 1)
             .repeat(4, 2).repeat(4, 3), y=np.arange(50) % 3)
    req = DataRequest(str(tmp_path / "d.npz"), val_split=0.2, split_seed=7)
    d = open_data(req, (1, 4, 4), 3)
    tr, te = d.arrays("train", None)[0][:, 0, 0, 0], d.arrays("test", None)[0][:, 0, 0, 0]
    assert len(te) == 10 and sorted(tr.tolist() + te.tolist()) == list(range(50))
    again = open_data(req, (1, 4, 4), 3).arrays("test", None)[0][:, 0, 0, 0]
    np.testing.assert_array_equal(te, again)
    other = open_data(DataRequest(str(tmp_path / "d.npz"), val_split=0.2, split_seed=8),
                      (1, 4, 4), 3).arrays("test", None)[0][:, 0, 0, 0]
    assert te.tolist() != other.tolist()


def test_csv_and_npy_pair_and_float_data_pack_as_f32(tmp_path):
    rows = ["a,b,label", "1,2.5,walk", "3,-1,run", "", "0,0,walk"]
    (tmp_path / "s.csv").write_text("\n".join(rows) + "\n")
    d = open_data(DataRequest(str(tmp_path / "s.csv"), label_column="label"), (2,), 2)
    x, y = d.arrays("train")
    assert d.class_names == ("run", "walk") and y.tolist() == [1, 0, 1]
    np.testing.assert_array_equal(x, np.array([[1, 2.5], [3, -1], [0, 0]], np.float32))
    assert d.pack("train", tmp_path / "s.bnnd") == packed.F32
    np.testing.assert_array_equal(packed.read(tmp_path / "s.bnnd").x, x)
    np.save(tmp_path / "x.npy", np.ones((6, 28, 28), np.uint8))
    np.save(tmp_path / "y.npy", np.arange(6) % 2)
    d = open_data(DataRequest(str(tmp_path / "x.npy")), (1, 28, 28), 10)
    assert d.train.count == 6 and d.pack("train", tmp_path / "p.bnnd") == packed.U8


# -------------------------------------------------------------------------------------------------
# bad input: one error line naming the file and entry, nothing written

def _pack_error(capsys, tmp_path, data, *extra, model="tfc"):
    out = tmp_path / "out.bnnd"
    rc, _, err = _cli(["data", "pack", data, "--model", model, "-o", out, *extra], capsys)
    assert rc == 2, err
    assert not out.exists() and not list(tmp_path.glob(".out.bnnd*"))
    return _error_line(err)


def test_bad_image_folders(tmp_path, capsys):
    f = tmp_path / "f"
    _png_folder(f, {"a": 2, "b": 2}, size=(28, 28))
    (f / "b" / "001.png").write_bytes((f / "b" / "001.png").read_bytes()[:60])    # truncated
    assert "001.png: not a readable image" in _pack_error(capsys, tmp_path, f)
    (f / "b" / "001.png").write_bytes(b"not a png at all")
    assert str(f / "b" / "001.png") in _pack_error(capsys, tmp_path, f)
    Image.fromarray(np.zeros((20, 28), np.uint8)).save(f / "b" / "001.png")       # mixed sizes
    assert "001.png: image is 28x20 but 000.png is 28x28" in _pack_error(capsys, tmp_path, f)
    rc, so, err = _cli(["data", "pack", f, "--model", "tfc", "--fit", "resize",
                        "-o", tmp_path / "ok.bnnd"], capsys)
    assert rc == 0, err
    (f / "c").mkdir()
    assert f"{f / 'c'}: empty class folder" in _pack_error(capsys, tmp_path, f)


def test_bad_labels_and_shapes(tmp_path, capsys):
    np.savez(tmp_path / "l.npz", x=np.zeros((5, 28, 28), np.uint8), y=np.array([0, 1, 12, 3, 4]))
    line = _pack_error(capsys, tmp_path, tmp_path / "l.npz")
    assert "l.npz entry 2: label 12 is outside the model's classes 0..9" in line
    np.savez(tmp_path / "s.npz", x=np.zeros((5, 30, 30, 5), np.uint8), y=np.zeros(5, int))
    assert "shape (30, 30, 5) read as NCHW have 30 channel(s)" in _pack_error(
        capsys, tmp_path, tmp_path / "s.npz")
    np.savez(tmp_path / "n.npz", x=np.full((3, 28, 28), np.nan, np.float32), y=np.zeros(3, int))
    assert "entry 0 holds a NaN" in _pack_error(capsys, tmp_path, tmp_path / "n.npz")
    np.savez(tmp_path / "k.npz", images=np.zeros((3, 28, 28), np.uint8))
    assert "no array named 'x' or 'y'" in _pack_error(capsys, tmp_path, tmp_path / "k.npz")
    (tmp_path / "big.csv").write_text("a,label\n" + "1,0\n" * 3)
    line = _pack_error(capsys, tmp_path, tmp_path / "big.csv", "--label-column", "label")
    assert "feature vectors of 1 values do not fit the model's input (1, 28, 28) (784" in line


def test_bad_csv_rows(tmp_path, capsys):
    f = tmp_path / "s.csv"
    f.write_text("a,b,y\n1,2,0\n3,,1\n")
    assert f"{f}: row 3, column 'b' is empty" in _pack_error(capsys, tmp_path, f,
                                                             "--label-column", "y")
    f.write_text("a,b,y\n1,2,0\n3,x4,1\n")
    assert "row 3, column 'b': 'x4' is not a number" in _pack_error(capsys, tmp_path, f,
                                                                    "--label-column", "y")
    f.write_text("a,b,y\n1,2,0\n3,4\n")
    assert "row 3 has 2 fields" in _pack_error(capsys, tmp_path, f, "--label-column", "y")
    assert "no column 'z'" in _pack_error(capsys, tmp_path, f, "--label-column", "z")
    assert "needs --label-column" in _pack_error(capsys, tmp_path, f)


# -------------------------------------------------------------------------------------------------
# run + eval + export: the class map and the convention travel with OUT

def test_run_eval_export_on_an_image_folder(tmp_path, capsys):
    f = tmp_path / "digits"
    rng = np.random.default_rng(5)
    for k, name in enumerate(("zero", "one", "two")):
        (f / name).mkdir(parents=True)
        for i in range(40):
            im = rng.integers(0, 40, (24, 24), dtype=np.uint8)
            im[6 * k + 2: 6 * k + 6, 2:22] = 250
            img = Image.fromarray(im)
            img = img.resize((30, 30)) if i % 5 == 3 else img          # mixed sizes
            img.convert("RGB" if i % 7 == 0 else "L").save(f / name / f"{i}.png")
    out = tmp_path / "o"
    assert _cli(["compile", "tfc", "--batch", "10", "-o", out], capsys)[0] == 0
    rc, _, err = _cli(["run", out, "--data", f, "--val-split", "0.25", "--steps", "1"], capsys)
    assert rc == 2 and ".png: image is 30x30 but 0.png is 24x24" in _error_line(err)
    rc, so, err = _cli(["run", out, "--data", f, "--val-split", "0.25", "--epochs", "3",
                        "--fit", "resize"], capsys)
    assert rc == 0, err
    rec = json.loads((out / "data.json").read_text())
    assert rec["class_names"] == ["one", "two", "zero"] and rec["test_count"] == 30
    assert rec["transform"]["describe"] == "resize to 28x28" and rec["fit"] == "resize"
    test_acc = float(so.split("test acc ")[-1].split(" %")[0])
    # eval fits the data as the run did (--fit resize recorded in OUT/data.json)
    rc, so, err = _cli(["eval", out, "--data", f, "--val-split", "0.25", "--png",
                        tmp_path / "c.png"], capsys)
    assert rc == 0, err
    assert f"accuracy {test_acc:.2f} %" in so and "0 one" in so
    assert Image.open(tmp_path / "c.png").size[0] > 100
    assert _cli(["export", out, "-o", tmp_path / "e.onnx"], capsys)[0] == 0
    meta = {p.key: p.value for p in onnx.load(tmp_path / "e.onnx").metadata_props}
    assert json.loads(meta["bnnc.classes"]) == ["one", "two", "zero"]
    assert meta["bnnc.preprocess"] == "symmetric"
    # the exported file, scored by the numpy reference, gives the compiled program's accuracy
    rc, so, err = _cli(["eval", tmp_path / "e.onnx", "--data", f, "--val-split", "0.25",
                        "--fit", "resize", "--batch", "10"], capsys)
    assert rc == 0, err
    assert f"accuracy {test_acc:.2f} %" in so and "0 one" in so
    # data whose class order differs from the trained one is refused, not silently mis-scored
    (f / "one").rename(f / "uno")
    rc, _, err = _cli(["eval", out, "--data", f], capsys)
    assert rc == 2 and "class 0 is 'two' but" in _error_line(err)


@pytest.mark.skipif(not all(shutil.which(t) for t in ("arm-none-eabi-gcc", "qemu-system-arm")),
                    reason="needs arm-none-eabi-gcc and qemu-system-arm (scripts/setup.sh)")
def test_eval_under_qemu_matches_the_host(tmp_path, capsys):
    """A cortex-m4 program (qemu-system-arm) scores a trained state exactly as the host program of
    the same model and options does (rpi4 under qemu-aarch64 runs the Linux trainer through the
    runner `bnnc run --emulate` uses; the device test in test_rpi.py covers the ssh path)."""
    x = np.random.default_rng(2).integers(0, 256, (24, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(24) % 10, x_test=x[:20],
             y_test=np.arange(20) % 7)
    outs = {}
    for target in ("host", "cortex-m4"):
        out = tmp_path / target
        assert _cli(["compile", "tfc", "--batch", "4", "--optimizer", "bop", "--target", target,
                     "-o", out], capsys)[0] == 0
        outs[target] = out
    # a trained (step 6) state from the host, scored everywhere
    assert _cli(["run", outs["host"], "--data", tmp_path / "d.npz", "--steps", "6"], capsys)[0] == 0
    results = {}
    for target, out in outs.items():
        args = ["eval", out, "--data", tmp_path / "d.npz", "--state",
                outs["host"] / "final_state.npz"]
        rc, so, err = _cli(args + (["--emulate"] if target != "host" else []), capsys)
        assert rc == 0, err
        results[target] = so.splitlines()[1:]
    assert results["host"] == results["cortex-m4"]


def test_eval_png_draws_the_matrix_and_predictions_are_saved(tmp_path, capsys):
    """The PNG holds the confusion matrix cell by cell (a diagonal cell's green and an off-diagonal
    cell's blue deepen with the share of the true class; an empty cell is white), and
    `--predictions` saves exactly the classes the numpy reference predicts for a model file."""
    from bnnc.compiler.config import make_config
    from bnnc.runtime import reference as ref
    from bnnc.runtime.eval import EvalResult, confusion_png
    r = EvalResult("m", "here", "init", "d", "test", ("a", "b"),
                   np.array([[3, 1], [0, 4]]), 0.0, np.zeros(8, np.int64))
    confusion_png(r, tmp_path / "c.png")
    img = Image.open(tmp_path / "c.png").convert("RGB")
    cell, margin = 40, 8 + 7 * 1                  # confusion_png's layout: names of 1 character

    def corner(i, j):                             # a cell's pixel away from its count's text
        return img.getpixel((margin + j * cell + cell - 4, margin + i * cell + cell - 4))
    assert corner(0, 0) == (63, 255, 63)          # 3 of 4: 255 * (1 - 3/4) = 63, green
    assert corner(0, 1) == (191, 191, 255)        # 1 of 4, blue
    assert corner(1, 0) == (255, 255, 255)        # none
    assert corner(1, 1) == (0, 255, 0)            # all of class b
    # --predictions of a model file: the reference's argmax, in the split's order
    x = np.random.default_rng(3).integers(0, 256, (30, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(30) % 10)
    rc, so, err = _cli(["eval", "tfc", "--data", tmp_path / "d.npz", "--split", "train",
                        "--batch", "8", "--predictions", tmp_path / "p.npy"], capsys)
    assert rc == 0, err
    from bnnc.runtime.model_source import load_graph
    g, cfg = load_graph("tfc"), make_config("proposed", batch=30)
    want = ref.predict(g, cfg, ref.init_state(g, cfg), preprocess_pixels(x[:, None], DEFAULT))
    got = np.load(tmp_path / "p.npy")
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, want.argmax(1))
