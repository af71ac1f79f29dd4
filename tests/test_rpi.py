"""Raspberry Pi targets end to end on this machine: compile for rpi4/rpi3, train under QEMU
(`bnnc run --emulate`), check the ARM build against the numpy reference (`bnnc check --target`),
count instructions per step, and run over ssh against a local sshd (the `--device` path)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time

import numpy as np
import pytest

from bnnc.cli import main
from bnnc.runtime.state_blob import read_state_blob
from bnnc.compiler.contract import read_manifest
from mnist_like import write_mnist_like

BATCH = 10


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_mnist_like(tmp_path_factory.mktemp("data"), 300, 40, seed=1)


def _losses(text: str) -> list[float]:
    return [float(v) for v in re.findall(r"step \d+  loss ([0-9.]+)", text)]


@pytest.mark.parametrize("algorithm", ["proposed", "standard"])
def test_rpi4_emulated_training_learns(algorithm, data_root, tmp_path, capsys):
    out = tmp_path / "pi"
    assert main(["compile", "mlp", "--width", "0.25", "--batch", str(BATCH), "--target", "rpi4",
                 "--algorithm", algorithm, "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["run", str(out), "--emulate", "--data", "mnist", "--data-dir", str(data_root),
                 "--steps", "50", "--log-every", "10"]) == 0
    text = capsys.readouterr().out
    assert "qemu-aarch64 -cpu cortex-a72" in text
    losses = _losses(text)
    assert len(losses) == 5 and losses[-1] < losses[0], text
    assert read_state_blob(out / "state.bin", read_manifest(out)).step == 50
    assert (out / "final_state.npz").is_file()


@pytest.mark.parametrize("target", ["rpi4", "rpi3"])
@pytest.mark.parametrize("model,width,algorithm", [("mlp", "0.25", "proposed"),
                                                   ("mlp", "0.25", "standard"),
                                                   ("cnv", "0.125", "proposed"),
                                                   ("cnv", "0.125", "standard")])
def test_check_on_arm_targets(target, model, width, algorithm, capsys):
    rc = main(["check", model, "--width", width, "--batch", "4", "--target", target,
               "--algorithm", algorithm, "--steps", "2"])
    text = capsys.readouterr().out
    assert rc == 0, text[-3000:]
    assert text.rstrip().endswith("PASS")


def test_check_on_arm_fails_when_a_kernel_is_wrong(tmp_path, monkeypatch):
    """The cross check is not vacuous: a corrupted kernel in the ARM build is caught."""
    from bnnc.compiler.config import make_config
    from bnnc.compiler.zoo import build_zoo_model
    from bnnc.compiler.frontend import load_model
    from bnnc.compiler.target import load_target
    from bnnc.runtime import programs
    from bnnc.runtime.check import run_check

    graph = load_model(build_zoo_model("mlp", width=0.25))
    cfg = make_config("proposed", batch=4)
    tgt = load_target("rpi4")
    real = programs.build_trainer

    def corrupt(out_dir, target=None, *, debug=False, extra_cflags=(), cache=None):
        return real(out_dir, target, debug=debug, cache=cache,
                    extra_cflags=[*extra_cflags, "-DBNNC_PERTURB_PO2_QUANTIZE"])

    monkeypatch.setattr("bnnc.runtime.trace.build_trainer", corrupt)
    rep = run_check(graph, cfg, steps=1, target=tgt, work_dir=tmp_path)
    assert not rep.ok
    assert any("d_" in r.name or "po2" in r.name.lower() for r in rep.failures)


def test_count_instructions_per_step_is_deterministic(data_root, tmp_path, capsys):
    out = tmp_path / "pi"
    assert main(["compile", "mlp", "--width", "0.25", "--batch", str(BATCH), "--target", "rpi4",
                 "-o", str(out)]) == 0
    counts = []
    for _ in range(2):
        capsys.readouterr()
        assert main(["run", str(out), "--emulate", "--count", "--data", "mnist", "--data-dir",
                     str(data_root), "--steps", "2"]) == 0
        m = re.search(r"-> ([0-9,]+) instructions per training step", capsys.readouterr().out)
        counts.append(int(m.group(1).replace(",", "")))
    assert counts[0] == counts[1] and counts[0] > 10_000


# ---- ssh: a real sshd on loopback serving the host target ----

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    if shutil.which("/usr/sbin/sshd") is None or os.geteuid() != 0:
        pytest.skip("needs root and openssh-server (scripts/setup.sh installs it)")
    d = tmp_path_factory.mktemp("sshd")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "hostkey")],
                   check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "client")],
                   check=True)
    (d / "authorized_keys").write_text((d / "client.pub").read_text())
    port = _free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'hostkey'}\n"
        f"PidFile {d / 'sshd.pid'}\nAuthorizedKeysFile {d / 'authorized_keys'}\nStrictModes no\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        "PermitRootLogin prohibit-password\nSubsystem sftp /usr/lib/openssh/sftp-server\n")
    os.makedirs("/run/sshd", exist_ok=True)
    proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(d / "sshd_config")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    opts = ["--port", str(port), "--identity", str(d / "client"),
            "--ssh-option", f"UserKnownHostsFile={d / 'known_hosts'}"]
    yield port, opts, d
    proc.terminate()
    proc.wait(10)


def test_device_run_over_ssh(sshd, data_root, tmp_path, capsys):
    port, opts, d = sshd
    out = tmp_path / "host"
    assert main(["compile", "mlp", "--width", "0.25", "--batch", str(BATCH), "-o", str(out)]) == 0
    remote = tmp_path / "remote dir"          # a space: the remote command must be quoted
    capsys.readouterr()
    rc = main(["run", str(out), "--device", f"root@127.0.0.1:{remote}", *opts, "--data", "mnist",
               "--data-dir", str(data_root), "--epochs", "2"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "ssh root@127.0.0.1" in text and text.count("epoch ") == 2
    assert sorted(p.name for p in remote.iterdir()) == ["init_state.f32", "state.bin", "test.bnnd",
                                                         "train.bnnd", "trainer"]
    local = read_state_blob(out / "state.bin", read_manifest(out))
    assert local.step == 60
    assert (remote / "state.bin").read_bytes() == (out / "state.bin").read_bytes()
    # resume on the device continues from the fetched checkpoint
    assert main(["run", str(out), "--device", f"root@127.0.0.1:{remote}", *opts, "--data", "mnist",
                 "--data-dir", str(data_root), "--steps", "5",
                 "--resume", str(out / "state.bin")]) == 0
    assert read_state_blob(out / "state.bin", read_manifest(out)).step == 65
    # `bnnc eval` on the device scores exactly as the native program does
    capsys.readouterr()
    assert main(["eval", str(out), "--device", f"root@127.0.0.1:{remote}", *opts, "--data",
                 "mnist", "--data-dir", str(data_root)]) == 0
    dev = capsys.readouterr().out
    assert main(["eval", str(out), "--data", "mnist", "--data-dir", str(data_root)]) == 0
    nat = capsys.readouterr().out
    assert "on ssh root@127.0.0.1" in dev and dev.splitlines()[1:] == nat.splitlines()[1:]


def test_device_errors(sshd, data_root, tmp_path, capsys):
    port, opts, d = sshd
    out = tmp_path / "pi"
    assert main(["compile", "mlp", "--width", "0.25", "--batch", str(BATCH), "--target", "rpi4",
                 "-o", str(out)]) == 0
    capsys.readouterr()
    # an x86-64 "device" for an aarch64 target: refused before anything is copied
    assert main(["run", str(out), "--device", f"root@127.0.0.1:{tmp_path / 'r'}", *opts,
                 "--data", "mnist", "--data-dir", str(data_root), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "is 'x86_64', target 'rpi4' builds for 'aarch64'" in err.replace("\n", " ")
    assert not (tmp_path / "r").exists()
    # nobody listening: a clear ssh error, no traceback
    bad = opts.copy()
    bad[1] = str(_free_port())
    assert main(["run", str(out), "--device", "root@127.0.0.1", *bad, "--data", "mnist",
                 "--data-dir", str(data_root), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "ssh on root@127.0.0.1 failed" in err and "Traceback" not in err
