"""A bnnc fleet on real Flower: the simulation runtime (Ray) and a real flower-superlink with two
flower-supernodes on loopback, on the host target with a tiny model. The deployed run is done in
two `flwr run`s (1 round, then resumed to 2) and must end in exactly the simulation's global
state; a supernode killed mid-round must leave a finished run with a valid global state."""

from __future__ import annotations

import socket
import subprocess
import time

import numpy as np
import pytest

from bnnc.cli import main
from bnnc.runtime import fleet as fl
from bnnc.runtime import fleet_flower as ff   # flwr is a pinned test dependency: never skipped
from bnnc.runtime import fleet_run as fr
from bnnc.runtime import fleet_store as fstore
from bnnc.runtime.outdir import load_init_state, read_compiled
from bnnc.runtime.state_blob import read_state_blob
from mnist_like import write_mnist_like


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fleet_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleetflwr")
    out = root / "tfc"
    assert main(["compile", "tfc", "--width", "0.25", "--batch", "10", "-o", str(out)]) == 0
    write_mnist_like(root / "data", 300, 60, seed=3)
    return root, out


def _settings(root, out, name, **kw):
    return ff.FleetSettings(out=str(out), fleet_dir=str(root / name), devices=2,
                            partition="dirichlet", alpha=1.0, seed=5, data="mnist",
                            data_dir=str(root / "data"), **{"rounds": 2, "round_timeout": 120.0,
                                                            **kw})


@pytest.fixture(scope="module")
def federation(fleet_env):
    """One SuperLink and two SuperNodes, shared by the deployment tests."""
    root, out = fleet_env
    port = _free_port()
    fed = fr.LocalFederation(root / "deploy", port=port)
    fed.start_superlink()
    for pid in range(2):
        fed.start_supernode(pid, 2, port=_free_port(), out=str(out),
                            workdir=str(root / "nodes" / f"device-{pid}"),
                            **{"data-dir": str(root / "data")})
    yield fed
    fed.stop()


def test_simulation_equals_deployment_and_resumes(fleet_env, federation):
    root, out = fleet_env
    manifest, graph, cfg = read_compiled(out)
    sim = fr.simulate(_settings(root, out, "sim"))
    assert sim.round == 2 and [r["devices"] for r in sim.history[1:]] == [[0, 1], [0, 1]]
    sim_blob = (sim.fleet_dir / sim.blob).read_bytes()

    dep = _settings(root, out, "dep")
    app = fr.write_app(root / "app", dep)
    first = federation.run(app, timeout=240, run_config="rounds=1")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert fstore.FleetCheckpoint.load(root / "dep").round == 1
    second = federation.run(app, timeout=240)            # the same app, 2 rounds: resumes
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    ck = fstore.FleetCheckpoint.load(root / "dep")
    assert ck.round == 2 and [r["round"] for r in ck.history] == [0, 1, 2]

    blob = read_state_blob(root / "dep" / ck.blob, manifest)        # magic, hash, size, CRC-32
    init = load_init_state(out, graph, cfg)
    changed = [ft.name for ft in fl.fleet_tensors(manifest)
               if not np.array_equal(blob.tensors[ft.name], init[ft.name])]
    assert len(changed) >= len(fl.fleet_tensors(manifest)) // 2
    assert (root / "dep" / ck.blob).read_bytes() == sim_blob      # same seed, same partition
    for pid in range(2):                                        # devices wrote only their state
        (fleet_dir,) = (root / "nodes" / f"device-{pid}").iterdir()
        assert fleet_dir.name.startswith("fleet-")
        assert sorted(p.name for p in fleet_dir.iterdir()) == ["state-r00001.bin",
                                                               "state-r00002.bin"]


def test_kill_a_supernode_mid_round(fleet_env, federation):
    root, out = fleet_env
    manifest, _, _ = read_compiled(out)
    s = _settings(root, out, "killed", round_timeout=45.0, min_devices=1)
    app = fr.write_app(root / "app-kill", s)
    seen = federation.log_text("supernode-1").count("Receiving: train message")
    argv = [fr.flower_executable("flwr"), "run", str(app), "bnnc-local", "--stream"]
    run = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env=federation.env, cwd=federation.work, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while federation.log_text("supernode-1").count("Receiving: train message") < seen + 2:
        assert time.monotonic() < deadline and run.poll() is None, "round 2 never reached device 1"
        time.sleep(0.05)
    federation.kill("supernode-1")                      # round 2 is running on it
    output, _ = run.communicate(timeout=240)
    assert run.returncode == 0, output[-3000:]
    ck = fstore.FleetCheckpoint.load(root / "killed")
    assert ck.round == 2
    assert ck.history[1]["devices"] == [0, 1] and ck.history[2]["devices"] == [0]
    blob = ck.global_blob(manifest)                     # sha256, then magic, hash, CRC-32
    assert all(np.all(np.isfinite(v)) for v in blob.tensors.values())
    assert main(["fleet", "status", str(root / "killed"), str(out)]) == 0
