"""runtime/run.py, the one run entry of `bnnc run`: the absolute step a run trains to, the events it
emits, and a bare-metal run resuming from its checkpoint like a Linux one."""

from __future__ import annotations

import shutil

import pytest

from bnnc.cli import main
from bnnc.compiler.contract import read_manifest
from bnnc.compiler.errors import ConfigError
from bnnc.runtime.state_blob import read_state_blob
from bnnc.runtime.run import Counted, RunOptions, Saved, Started, TrainerEvent, run_compiled, \
    until_step
from mnist_like import write_mnist_like

arm = pytest.mark.skipif(not (shutil.which("arm-none-eabi-gcc")
                              and shutil.which("qemu-system-arm")),
                         reason="needs gcc-arm-none-eabi, libnewlib-arm-none-eabi, qemu-system-arm")


def test_until_step_counts_from_the_start():
    assert until_step(0, 6, None, None) == 6              # one epoch by default
    assert until_step(4, 6, 2, None) == 12                # the partial epoch counts as the first
    assert until_step(4, 6, None, 5) == 9
    with pytest.raises(ConfigError, match="not both"):
        until_step(0, 6, 1, 1)


def test_host_run_events(tmp_path):
    write_mnist_like(tmp_path / "data", 48, 16, seed=2)
    out = tmp_path / "mlp"
    assert main(["compile", "mlp", "--batch", "16", "--width", "0.25", "-o", str(out)]) == 0
    events = []
    run_compiled(out, RunOptions("mnist", tmp_path / "data", steps=4, log_every=2), events.append)
    assert isinstance(events[0], Started) and events[0].where == "native" and events[0].elf is None
    assert events[0].epochs == 2 and events[0].data == "mnist"
    kinds = [e.kind for e in events if isinstance(e, TrainerEvent)]
    assert kinds[0] == "start" and kinds.count("step") == 2 and kinds.count("epoch") == 2
    assert isinstance(events[-1], Saved) and events[-1].step == 4
    assert not any(isinstance(e, Counted) for e in events)


@arm
def test_baremetal_run_resumes_its_checkpoint(tmp_path, capsys):
    write_mnist_like(tmp_path / "data", 64, 16, seed=1)
    out = tmp_path / "m7"
    assert main(["compile", "tfc", "--width", "0.25", "--target", "cortex-m7", "--ram", "128K",
                 "--batch", "16", "--optimizer", "bop", "-o", str(out)]) == 0
    data = ["--data", "mnist", "--data-dir", str(tmp_path / "data")]
    assert main(["run", str(out), "--emulate", *data, "--steps", "3"]) == 0
    capsys.readouterr()
    assert main(["run", str(out), "--emulate", *data, "--steps", "2", "--every", "1",
                 "--resume", str(out / "state.bin")]) == 0
    assert "step 3 -> 5" in capsys.readouterr().out
    assert read_state_blob(out / "state.bin", read_manifest(out)).step == 5
