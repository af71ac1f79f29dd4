"""runtime/fleet.py without Flower's processes: which tensors a fleet shares, the wire format, the
aggregation rules with hand-computed expectations, the 1-bit uplink, partitions, the atomic global
checkpoint and a device's own state; check_reply on real Flower messages; the CLI's errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bnnc.cli import main
from bnnc.compiler.contract import read_manifest
from bnnc.compiler.errors import DataError
from bnnc.runtime import fleet as fl
from bnnc.runtime.host import HostProgram
from bnnc.runtime.outdir import load_init_state, read_compiled, read_state_blob


@pytest.fixture(scope="module")
def outs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet")
    made = {}
    for name, extra in (("adam", []), ("bop", ["--optimizer", "bop"]),
                        ("frozen", ["--optimizer", "bop", "--train-from", "fc2"])):
        out = root / name
        assert main(["compile", "tfc", "--width", "0.25", "--batch", "8", *extra,
                     "-o", str(out)]) == 0
        made[name] = out
    return made


def test_fleet_tensors_adam_bop_fedbn_frozen(outs):
    m = read_manifest(outs["adam"])
    names = {ft.name: ft for ft in fl.fleet_tensors(m)}
    params = [s.name for s in m.state if s.role == "parameter"]
    stats = [s.name for s in m.state if s.role == "bn state"]
    assert params and stats
    assert set(names) == set(params) | set(stats)                # Adam's m, v stay local
    assert all(ft.rule == "mean" and ft.dtype == "bf16" for ft in names.values())
    assert {ft.name for ft in fl.fleet_tensors(m, "local")} == set(params)      # FedBN
    moments = [s.name for s in m.state if s.role == "optimizer state"]
    assert {ft.name for ft in fl.fleet_tensors(m, moments=True)} == set(names) | set(moments)

    b = read_manifest(outs["bop"])
    bop = {ft.name: ft for ft in fl.fleet_tensors(b)}
    bits = [s.name for s in b.state if s.role == "parameter" and s.dtype == "bit"]
    assert bits and all(bop[w].rule == "vote" for w in bits)
    assert all(f"{w}.m" in bop for w in bits)                    # Bop momenta travel
    assert not any(n.endswith(".v") for n in bop)                # the betas' Adam moments do not

    # partial training (--train-from fc2): fc1's weights and bn1's beta never travel
    f = read_manifest(outs["frozen"])
    assert set(f.frozen) == {"fc1.W", "bn1.beta"}
    left = {ft.name for ft in fl.fleet_tensors(f)}
    assert not left & {"fc1.W", "fc1.W.m", "bn1.beta", "bn1.beta.m", "bn1.beta.v"}
    assert {"fc2.W", "fc2.W.m", "bn2.beta"} <= left


def test_wire_round_trip_and_refusals():
    ft = fl.FleetTensor("x", "bf16", (2, 3), "mean")
    v = np.array([[1.0, -2.5, 0.0078125], [3.0, 1e-3, -7.0]], np.float32)
    w = fl.to_wire(v, "bf16")
    assert w.dtype == np.uint16 and w.nbytes == 12
    got = fl.from_wire(w, ft)
    assert got[0, 1] == -2.5 and got[1, 2] == -7.0 and abs(got[1, 1] - 1e-3) < 1e-5
    bit = fl.FleetTensor("w", "bit", (3, 5), "vote")
    s = np.where(np.arange(15).reshape(3, 5) % 3 == 0, 1, -1).astype(np.float32)
    assert fl.to_wire(s, "bit").nbytes == 2
    assert np.array_equal(fl.from_wire(fl.to_wire(s, "bit"), bit), s)
    f16 = fl.FleetTensor("h", "f16", (2,), "mean")
    assert np.array_equal(fl.from_wire(fl.to_wire([0.5, -3], "f16"), f16), [0.5, -3])
    with pytest.raises(fl.RefusedUpdate, match="NaN or Inf"):
        fl.from_wire(fl.to_wire(np.array([[np.nan, 0, 0], [0, 0, 0]]), "bf16"), ft)
    with pytest.raises(fl.RefusedUpdate, match="NaN or Inf"):
        fl.from_wire(np.array([np.inf, 1], np.float16), f16)
    with pytest.raises(fl.RefusedUpdate, match="expected"):
        fl.from_wire(np.zeros(5, np.uint16), ft)                 # wrong length
    with pytest.raises(fl.RefusedUpdate, match="expected"):
        fl.from_wire(np.zeros(6, np.float32), ft)                # wrong dtype


def test_aggregate_weighted_mean_vote_and_order():
    specs = (fl.FleetTensor("a", "bf16", (3,), "mean"), fl.FleetTensor("w", "bit", (4,), "vote"))
    glob = {"a": np.zeros(3, np.float32), "w": np.array([1, -1, 1, -1], np.float32)}
    ups = [fl.Update(0, 1, {"a": np.array([0, 8, 1], np.float32),
                            "w": np.array([-1, -1, 1, 1], np.float32)}),
           fl.Update(1, 3, {"a": np.array([4, 0, 1], np.float32),
                            "w": np.array([1, 1, 1, -1], np.float32)}),
           fl.Update(2, 1, {"a": np.array([4, 0, 3], np.float32),
                            "w": np.array([1, -1, -1, 1], np.float32)})]
    new = fl.aggregate(glob, ups, specs)
    # (1*0 + 3*4 + 1*4) / 5 = 3.2 -> bf16 3.203125; (8 + 0 + 0) / 5 = 1.6 -> 1.6015625; 7/5 = 1.4
    assert new["a"].tolist() == [3.203125, 1.6015625, 1.3984375]
    # votes 1*-1 + 3*1 + 1*1 = 3 > 0; -1 + 3 - 1 = 1; 1 + 3 - 1 = 3; 1 - 3 + 1 = -1
    assert new["w"].tolist() == [1, 1, 1, -1]
    tie = fl.aggregate(glob, ups[:1] + [fl.Update(5, 1, {"a": ups[0].tensors["a"],
                                                          "w": -ups[0].tensors["w"]})], specs)
    assert tie["w"].tolist() == glob["w"].tolist()               # a tie keeps the global bit
    again = fl.aggregate(glob, [ups[2], ups[0], ups[1]], specs)
    assert all(np.array_equal(new[k], again[k]) for k in new)
    assert fl.aggregate(glob, [], specs)["a"].tolist() == [0, 0, 0]
    # server step 2 on parameters: 0 + 2 * (3.2 - 0) = 6.4 -> bf16 6.40625; statistics: plain mean
    stat = specs + (fl.FleetTensor("s", "bf16", (3,), "mean", "bn_stat"),)
    for u in ups:
        u.tensors["s"] = u.tensors["a"]
    two = fl.aggregate(dict(glob, s=glob["a"]), ups, stat, server_lr=2.0)
    assert two["a"].tolist()[0] == 6.40625 and two["s"].tolist() == new["a"].tolist()
    assert two["w"].tolist() == new["w"].tolist()


def test_sign_uplink_reconstruction_and_bytes():
    specs = (fl.FleetTensor("a", "bf16", (4,), "mean"), fl.FleetTensor("w", "bit", (9,), "vote"))
    glob = {"a": np.array([1, 1, 1, 1], np.float32), "w": np.ones(9, np.float32)}
    local = {"a": np.array([1.5, 0.5, 2.0, 1.0], np.float32),
             "w": np.where(np.arange(9) < 4, -1, 1).astype(np.float32)}
    wire = fl.encode_update(local, glob, specs, "sign")
    assert wire[fl.SCALES].tolist() == [0.5]                     # mean |(0.5, -0.5, 1, 0)|
    assert fl.wire_nbytes(wire) == 1 + 2 + 4                     # 4 signs, 9 bits, one scale
    full = fl.encode_update(local, glob, specs, "full")
    assert fl.wire_nbytes(full) == 8 + 2
    got = fl.decode_update(wire, glob, specs, "sign")
    assert got["a"].tolist() == [1.5, 0.5, 1.5, 1.5]             # sign(0) = + in the uplink
    assert np.array_equal(got["w"], local["w"])
    bad = dict(wire)
    bad[fl.SCALES] = np.array([np.nan], np.float32)
    with pytest.raises(fl.RefusedUpdate, match="scale"):
        fl.decode_update(bad, glob, specs, "sign")
    with pytest.raises(fl.RefusedUpdate, match="tensor set"):
        fl.decode_update({"a": wire["a"]}, glob, specs, "sign")


def test_partitions():
    y = np.repeat(np.arange(10), 100)
    iid = fl.partition(y, 4, "iid", seed=1)
    assert sorted(np.concatenate(iid).tolist()) == list(range(1000))
    assert [len(p) for p in iid] == [250] * 4
    d = fl.partition(y, 5, "dirichlet", alpha=0.3, seed=1, min_examples=20)
    assert sorted(np.concatenate(d).tolist()) == list(range(1000))
    assert min(len(p) for p in d) >= 20
    again = fl.partition(y, 5, "dirichlet", alpha=0.3, seed=1, min_examples=20)
    assert all(np.array_equal(a, b) for a, b in zip(d, again))
    assert not all(np.array_equal(a, b) for a, b in
                   zip(d, fl.partition(y, 5, "dirichlet", alpha=0.3, seed=2, min_examples=20)))

    def top_share(parts):      # share of each device's examples in its most frequent class
        return np.mean([np.bincount(y[p], minlength=10).max() / len(p) for p in parts])
    assert top_share(d) > 2 * top_share(fl.partition(y, 5, "iid", seed=1))
    with pytest.raises(DataError, match="Dirichlet"):
        fl.partition(y, 10, "dirichlet", alpha=0.01, seed=0, min_examples=99)


def test_checkpoint_commit_resume_and_tamper(outs, tmp_path):
    out = outs["adam"]
    manifest, graph, cfg = read_compiled(out)
    prog = HostProgram(out, debug=False)
    state = dict(load_init_state(out, graph, cfg))
    ck = fl.FleetCheckpoint(tmp_path, settings={"seed": 0})
    ck.commit(0, fl.state_blob_of(prog, state, step=0, seed=0), {"round": 0})
    name = next(iter(state))
    state[name] = state[name] * 2                                # exact in bf16
    ck.commit(1, fl.state_blob_of(prog, state, step=0, seed=0), {"round": 1, "test_acc": 0.5})
    ck.commit(2, fl.state_blob_of(prog, state, step=0, seed=0), {"round": 2})
    assert sorted(p.name for p in tmp_path.glob("global-r*.bin")) == ["global-r00001.bin",
                                                                       "global-r00002.bin"]
    # a blob written by a round that crashed before its commit is ignored
    (tmp_path / "global-r00003.bin").write_bytes(b"torn")
    back = fl.FleetCheckpoint.load(tmp_path)
    assert back.round == 2 and back.settings == {"seed": 0} and len(back.history) == 3
    blob = back.global_blob(manifest)
    assert np.array_equal(blob.tensors[name], state[name])
    assert read_state_blob(tmp_path / back.blob, manifest).tensors.keys() == blob.tensors.keys()
    raw = bytearray((tmp_path / back.blob).read_bytes())
    raw[-1] ^= 1
    (tmp_path / back.blob).write_bytes(bytes(raw))
    with pytest.raises(DataError, match="sha256"):
        back.global_blob(manifest)
    doc = json.loads((tmp_path / fl.CHECKPOINT_JSON).read_text())
    doc["blob_sha256"] = __import__("hashlib").sha256(bytes(raw)).hexdigest()
    (tmp_path / fl.CHECKPOINT_JSON).write_text(json.dumps(doc))
    with pytest.raises(DataError, match="CRC"):
        fl.FleetCheckpoint.load(tmp_path).global_blob(manifest)


def test_device_store_and_start(outs, tmp_path):
    out = outs["adam"]
    manifest, graph, cfg = read_compiled(out)
    prog = HostProgram(out, debug=False)
    init = dict(load_init_state(out, graph, cfg))
    store = fl.DeviceStore(tmp_path / "dev")
    specs = fl.fleet_tensors(manifest)
    glob = {ft.name: np.full(ft.shape, 0.25, np.float32) for ft in specs}
    t, step, seed = fl.device_start(store, 1, out, manifest, glob)
    assert step == 0 and seed == cfg.seed
    moment = next(s.name for s in manifest.state if s.role == "optimizer state")
    assert np.array_equal(t[moment], init[moment]) and np.all(t[specs[0].name] == 0.25)
    mine = dict(init, **{moment: np.full_like(init[moment], 0.5)})
    store.save(1, fl.state_blob_of(prog, mine, step=7, seed=3))
    store.save(2, fl.state_blob_of(prog, init, step=9, seed=3))
    t, step, _ = fl.device_start(store, 2, out, manifest, glob)   # round 2 starts from round 1
    assert step == 7 and np.all(t[moment] == 0.5)
    (tmp_path / "dev" / "state-r00002.bin").write_bytes(b"x" * 10)
    assert fl.device_start(store, 3, out, manifest, glob)[1] == 7   # damaged file skipped


def test_check_reply_refuses(outs, monkeypatch):
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity
    for attr in ("_run_id", "_node_id", "_task_id"):       # what a running ServerApp has set
        if hasattr(TaskIdentity, attr):
            monkeypatch.setattr(TaskIdentity, attr, 1)
    from bnnc.runtime.fleet_flower import check_reply
    manifest = read_manifest(outs["adam"])
    specs = fl.fleet_tensors(manifest)
    glob = {ft.name: np.zeros(ft.shape, np.float32) for ft in specs}
    good = fl.encode_update({k: v + 1 for k, v in glob.items()}, glob, specs, "full")

    def reply(arrays, sha=manifest.model_sha256, pid=1, n=40):
        return Message(RecordDict({
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "metrics": MetricRecord({"partition-id": pid, "num-examples": n}),
            "device": ConfigRecord({"model-sha256": sha})}), dst_node_id=1, message_type="train")
    kw = dict(sha256=manifest.model_sha256, specs=specs, glob=glob, uplink="full", devices=2)
    up, nbytes = check_reply(reply(good), **kw)
    assert up.device == 1 and up.examples == 40 and nbytes > fl.wire_nbytes(good)
    assert np.all(up.tensors[specs[0].name] == 1)
    with pytest.raises(fl.RefusedUpdate, match="another model"):
        check_reply(reply(good, sha="0" * 64), **kw)
    nan = dict(good)
    nan[specs[0].name] = fl.to_wire(np.full(specs[0].shape, np.nan), specs[0].dtype)
    with pytest.raises(fl.RefusedUpdate, match="NaN"):
        check_reply(reply(nan), **kw)
    with pytest.raises(fl.RefusedUpdate, match="partition id"):
        check_reply(reply(good, pid=7), **kw)
    with pytest.raises(fl.RefusedUpdate, match="example count"):
        check_reply(reply(good, n=0), **kw)


def test_cli_errors(outs, tmp_path, capsys):
    assert main(["fleet", "status", str(tmp_path), str(outs["adam"])]) == 2
    assert "no fleet run" in capsys.readouterr().err
    assert main(["fleet", "simulate", str(outs["adam"]), "--fleet-dir", str(tmp_path / "f"),
                 "--devices", "2", "--min-devices", "3"]) == 2
    assert "--min-devices" in capsys.readouterr().err
    assert main(["fleet", "app", str(outs["adam"]), "--fleet-dir", str(tmp_path / "f"),
                 "-o", str(tmp_path / "app")]) == 0
    text = (tmp_path / "app" / "pyproject.toml").read_text()
    assert "bnnc_fleet_app:server_app" in text and str(outs["adam"].resolve()) in text


def _round_inputs(out, *, bn_stats="mean", uplink="full"):
    manifest, graph, cfg = read_compiled(out)
    specs = fl.fleet_tensors(manifest, bn_stats)
    init = load_init_state(out, graph, cfg)
    arrays = fl.encode_global({ft.name: init[ft.name] for ft in specs}, specs)
    config = {"round-offset": 0, "fleet-id": "t", "model-sha256": manifest.model_sha256,
              "local-epochs": 1, "uplink": uplink, "bn-stats": bn_stats, "seed": 0,
              "partition": "iid", "alpha": 0.5, "data": "mnist", "limit": 0}
    return specs, init, arrays, config


def test_host_device_round_fedbn_and_determinism(outs, tmp_path):
    from bnnc.runtime.fleet_flower import device_train
    from mnist_like import write_mnist_like
    write_mnist_like(tmp_path / "data", 64, 40, seed=4)
    out = outs["adam"]
    specs, init, arrays, config = _round_inputs(out, bn_stats="local", uplink="sign")
    assert not any(ft.name.endswith("running_mean") for ft in specs)
    got = []
    for k in range(2):
        node = {"partition-id": 0, "num-partitions": 2, "out": str(out),
                "workdir": str(tmp_path / f"wd{k}"), "data-dir": str(tmp_path / "data")}
        reply, metrics, sha = device_train(node, config, arrays, 1)
        assert sha == read_manifest(out).model_sha256
        assert metrics["num-examples"] == 32 and metrics["steps"] == 4
        assert 0 <= metrics["test-acc"] <= 1                       # FedBN: the device scores
        assert set(reply) == {ft.name for ft in specs} | {fl.SCALES}
        got.append(reply)
    assert all(np.array_equal(got[0][k], got[1][k]) for k in got[0])   # same seed, same bits


_CROSS = {"rpi4": ("aarch64-linux-gnu-gcc", "qemu-aarch64"),
          "cortex-m7": ("arm-none-eabi-gcc", "qemu-system-arm")}


def test_standalone_devices_rpi4_and_cortex_m7_agree(tmp_path):
    """A fleet round on a Raspberry Pi (QEMU user) and a Cortex-M7 (QEMU system) device: the
    standalone trainer via runtime/run.py from a state blob; both send the same bits."""
    import shutil
    from bnnc.runtime.fleet_flower import device_train
    from mnist_like import write_mnist_like
    missing = [t for name in _CROSS for t in _CROSS[name] if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (scripts/setup.sh)")
    write_mnist_like(tmp_path / "data", 100, 20, seed=4)
    replies = {}
    for target in _CROSS:
        out = tmp_path / target
        assert main(["compile", "tfc", "--width", "0.25", "--batch", "10", "--target", target,
                     "-o", str(out)]) == 0
        specs, init, arrays, config = _round_inputs(out)
        node = {"partition-id": 1, "num-partitions": 2, "out": str(out), "emulate": True,
                "workdir": str(tmp_path / f"wd-{target}"), "data-dir": str(tmp_path / "data")}
        reply, metrics, _ = device_train(node, config, arrays, 1)
        assert metrics["num-examples"] == 50 and metrics["steps"] == 5
        changed = [ft.name for ft in specs if not np.array_equal(
            fl.from_wire(reply[ft.name], ft), init[ft.name])]
        assert changed
        replies[target] = reply
        kept = sorted(p.name for p in (tmp_path / f"wd-{target}" / "fleet-t").iterdir())
        assert kept == ["out", "state-r00001.bin"]         # its private OUT/ copy and its state
    a, b = replies.values()
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
