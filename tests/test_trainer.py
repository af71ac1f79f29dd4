"""The standalone trainer (templates/trainer.c.j2) and `bnnc run` on it: packed data, JSON lines,
crash-safe checkpoints (kill -9 and resume == uninterrupted), refusal of corrupt/foreign
checkpoints, target descriptions and their errors."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest

from mnist_like import pack_bands
from bnnc.cli import main
from bnnc.compiler.c_literals import PIXEL_LUT
from bnnc.compiler.errors import DataError, TargetError
from bnnc.compiler.target import load_target, parse_size
from bnnc.runtime import packed
from bnnc.runtime.datasets import scale_pixels
from bnnc.runtime.state_blob import read_state_blob
from bnnc.compiler.contract import read_manifest
from bnnc.runtime.programs import LocalRunner, build_trainer

BATCH = 10


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("trainer") / "mlp"
    assert main(["compile", "mlp", "--width", "0.125", "--batch", str(BATCH), "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """Learnable data in the MNIST shape: class k lights up row band k."""
    return pack_bands(tmp_path_factory.mktemp("data") / "train.bnnd")


def _run(exe, *args, check=True):
    res = LocalRunner(load_target("host")).run(exe, [str(a) for a in args], timeout=300)
    if check:
        assert res.returncode == 0, (res.events, res.stderr)
    return res


def test_pixel_table_is_the_loaders(tmp_path):
    # the trainer's u8 -> float table must be exactly what the Python loader produces
    assert np.array_equal(PIXEL_LUT, scale_pixels(np.arange(256, dtype=np.uint8)))


def test_pack_roundtrip_and_float_fallback(tmp_path):
    rng = np.random.default_rng(0)
    px = rng.integers(0, 256, (7, 1, 4, 4)).astype(np.uint8)
    y = np.arange(7) % 3
    p = tmp_path / "a.bnnd"
    assert packed.pack(p, scale_pixels(px), y, 3) == packed.U8
    got = packed.read(p)
    assert got.shape == (1, 4, 4) and got.count == 7
    assert np.array_equal(got.x, scale_pixels(px).reshape(7, -1)) and np.array_equal(got.y, y)
    raw = p.read_bytes()
    assert raw[:4] == b"BNND" and struct.unpack_from("<I", raw, 20)[0] == 0
    assert len(raw) == 64 + 8 + 7 * 16
    xf = rng.normal(size=(5, 6)).astype(np.float32)        # not pixels: stored as float32
    assert packed.pack(p, xf, np.zeros(5, int), 2) == packed.F32
    assert np.array_equal(packed.read(p).x, xf)
    p.write_bytes(p.read_bytes()[:-1])
    with pytest.raises(DataError, match="truncated"):
        packed.read(p)


def test_trainer_learns_and_reports_json(compiled, data_file, tmp_path):
    exe = build_trainer(compiled)
    ckpt = tmp_path / "ck.bin"
    res = _run(exe, "--train", data_file, "--test", data_file, "--epochs", 4, "--checkpoint", ckpt)
    kinds = [e["event"] for e in res.events]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("epoch") == 4
    start = res.events[0]
    m = read_manifest(compiled)
    assert start["steps_per_epoch"] == 12 and start["arena_bytes"] == m.arena_nbytes
    epochs = [e for e in res.events if e["event"] == "epoch"]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert epochs[-1]["test_acc"] > 0.3            # chance is 0.1
    blob = read_state_blob(ckpt, m)
    assert blob.step == 48


def test_kill9_and_resume_equals_uninterrupted(compiled, data_file, tmp_path):
    """kill -9 the trainer at several points (also while it checkpoints every step), resume with
    the same command each time: the final state equals an uninterrupted run's, byte for byte."""
    exe = build_trainer(compiled)
    ref = tmp_path / "ref.bin"
    _run(exe, "--train", data_file, "--steps", 40, "--checkpoint", ref)
    ck = tmp_path / "ck.bin"
    cmd = [str(exe), "--train", str(data_file), "--steps", "40", "--checkpoint", str(ck),
           "--every", "1", "--log-every", "1"]
    kills = 0
    for kill_after in (3, 7, 5, 9, 4):
        args = cmd + (["--resume"] if ck.exists() else [])
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        seen = 0
        for line in proc.stdout:
            if json.loads(line)["event"] == "step":
                seen += 1
                if seen == kill_after:
                    os.kill(proc.pid, signal.SIGKILL)
                    kills += 1
                    break
        proc.wait()
        proc.stdout.close()
        assert read_state_blob(ck, read_manifest(compiled)).step >= 1   # always a valid file
    assert kills == 5
    _run(exe, *cmd[1:], "--resume")
    assert read_state_blob(ck, read_manifest(compiled)).step == 40
    assert ck.read_bytes() == ref.read_bytes()


def test_corrupt_or_foreign_checkpoint_refused_and_kept(compiled, data_file, tmp_path):
    exe = build_trainer(compiled)
    ck = tmp_path / "ck.bin"
    _run(exe, "--train", data_file, "--steps", 3, "--checkpoint", ck)
    good = ck.read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0x10
    ck.write_bytes(bytes(bad))
    res = _run(exe, "--train", data_file, "--steps", 6, "--checkpoint", ck, "--resume", check=False)
    assert res.returncode == 1 and "CRC" in res.error()
    assert ck.read_bytes() == bytes(bad)               # untouched: the user can still inspect it
    with pytest.raises(DataError, match="CRC-32"):
        read_state_blob(ck, read_manifest(compiled))
    foreign = bytearray(good)
    foreign[8] ^= 1                                    # another model's hash
    foreign[28:32] = struct.pack("<I", zlib.crc32(bytes(foreign[32:]),
                                                  zlib.crc32(bytes(foreign[:28]))))
    ck.write_bytes(bytes(foreign))
    res = _run(exe, "--train", data_file, "--steps", 6, "--checkpoint", ck, "--resume", check=False)
    assert res.returncode == 1 and "model hash" in res.error()
    with pytest.raises(DataError, match="another compiled model"):
        read_state_blob(ck, read_manifest(compiled))
    assert main(["run", str(compiled), "--data", "mnist", "--resume", str(ck), "--steps", "1"]) == 2


def test_trainer_usage_and_data_errors(compiled, tmp_path):
    exe = build_trainer(compiled)
    res = _run(exe, "--bogus", "1", check=False)
    assert res.returncode == 2 and res.error().startswith("usage")
    (tmp_path / "junk.bnnd").write_bytes(b"x" * 100)
    res = _run(exe, "--train", tmp_path / "junk.bnnd", check=False)
    assert res.returncode == 1 and "not a bnnc dataset" in res.error()
    p = tmp_path / "wrong.bnnd"
    packed.pack(p, np.zeros((20, 100), np.float32), np.zeros(20, int), 10)
    res = _run(exe, "--train", p, check=False)
    assert res.returncode == 1 and "does not match the model" in res.error()


def test_target_files_and_errors(tmp_path):
    for name in ("host", "rpi4", "rpi3"):
        t = load_target(name)
        assert "-ffp-contract=off" in t.cflags
    assert load_target("rpi4").emulator == ("qemu-aarch64", "-cpu", "cortex-a72")
    assert load_target("rpi3").emulator == ("qemu-aarch64", "-cpu", "cortex-a53")
    assert load_target("rpi4").simd == ("neon",) and load_target("host").simd == ()
    assert parse_size("256K", "x") == 262144 and parse_size("2M", "x") == 2 << 20
    with pytest.raises(TargetError, match="not a size"):
        parse_size("lots", "ram")
    bad = tmp_path / "bad.toml"
    bad.write_text('cc = "cc"\ncflags = []\nalign = 16\nkind = "fpga"\n')
    with pytest.raises(TargetError, match="kind"):
        load_target(str(bad))
    bad.write_text('cc = "cc"\ncflags = []\nalign = 16\nsimd = ["avx9"]\n')
    with pytest.raises(TargetError, match="avx9"):
        load_target(str(bad))


def test_missing_cross_compiler_and_emulator_name_packages(compiled, tmp_path):
    t = tmp_path / "ghost.toml"
    t.write_text('kind = "linux"\narch = "aarch64"\ncc = "ghost-linux-gnu-gcc"\ncflags = []\n'
                 'align = 16\npackages = ["gcc-ghost-linux-gnu", "qemu-user"]\n'
                 '[emulator]\ncmd = "qemu-ghost"\n')
    with pytest.raises(TargetError, match="'ghost-linux-gnu-gcc'.*not installed") as e:
        build_trainer(compiled, load_target(str(t)))
    assert e.value.hint == "apt-get install --no-install-recommends gcc-ghost-linux-gnu qemu-user"
    with pytest.raises(TargetError, match="qemu-ghost"):
        LocalRunner(load_target(str(t)))


def test_run_cli_refuses_wrong_modes(compiled, tmp_path):
    assert main(["run", str(compiled), "--data", "mnist", "--emulate"]) == 2
    assert main(["run", str(compiled), "--data", "mnist", "--count"]) == 2
    assert main(["run", str(compiled), "--data", "mnist", "--device", "-oProxyCommand=x"]) == 2
