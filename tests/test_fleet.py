"""runtime/fleet.py, fleet_store.py and fleet_local.py without Flower's processes: which tensors a
fleet shares, the wire format, the aggregation rules with hand-computed expectations, the 1-bit
uplink, partitions, the atomic global checkpoint and a device's own state; check_reply on real
Flower messages; the CLI's errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bnnc.cli import main
from bnnc.compiler.contract import read_manifest
from bnnc.compiler.errors import DataError
from bnnc.runtime import fleet as fl
from bnnc.runtime import fleet_local as flocal
from bnnc.runtime import fleet_store as fstore
from bnnc.runtime.host import HostProgram
from bnnc.runtime.outdir import load_init_state, read_compiled
from bnnc.runtime.state_blob import read_state_blob


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
    names = {ft.name: ft for ft in fl.fleet_tensors(m, "mean")}
    params = [s.name for s in m.state if s.role == "parameter"]
    stats = [s.name for s in m.state if s.role == "bn state"]
    assert params and stats
    assert set(names) == set(params) | set(stats)                # Adam's m, v stay local
    # the default, calibrate: statistics travel in the calibration only
    assert {ft.name for ft in fl.fleet_tensors(m)} == set(params)
    assert [ft.name for ft in fl.bn_stat_tensors(m)] == stats
    assert all(ft.rule == "mean" and ft.dtype == "bf16" for ft in names.values())
    assert {ft.name for ft in fl.fleet_tensors(m, "local")} == set(params)      # FedBN
    moments = [s.name for s in m.state if s.role == "optimizer state"]
    assert {ft.name for ft in fl.fleet_tensors(m, "mean", moments=True)} == \
        set(names) | set(moments)

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


def _normal_abs_dev(mu, psi, about):
    """E|x - about| for x ~ N(mu, s^2) with E|x - mu| = psi, by quadrature (not the closed form
    pool_bn_stats uses)."""
    s = psi * np.sqrt(np.pi / 2)
    z = np.linspace(-12, 12, 400001)
    dens = np.exp(-z * z / 2) / np.sqrt(2 * np.pi)
    return float(np.sum(np.abs(mu + s * z - about) * dens) * (z[1] - z[0]))


def test_pool_bn_stats_l1_and_l2():
    specs = (fl.FleetTensor("bn.running_mean", "f32", (2,), "mean", "bn_stat"),
             fl.FleetTensor("bn.running_psi", "f32", (2,), "mean", "bn_stat"))
    cal = [fl.Calibration(3, 300, {"bn.running_mean": np.array([0.0, 1.0], np.float32),
                                   "bn.running_psi": np.array([1.0, 0.5], np.float32)}),
           fl.Calibration(0, 100, {"bn.running_mean": np.array([4.0, 1.0], np.float32),
                                   "bn.running_psi": np.array([2.0, 0.0], np.float32)})]
    got = fl.pool_bn_stats(cal, specs)
    assert got["bn.running_mean"].tolist() == [1.0, 1.0]         # (300*0 + 100*4) / 400
    # channel 0: the devices' means differ, so E|x - 1| exceeds the mean of the psi (1.25)
    want = 0.75 * _normal_abs_dev(0, 1, 1) + 0.25 * _normal_abs_dev(4, 2, 1)
    assert abs(got["bn.running_psi"][0] - want) < 1e-5 and want > 1.4
    assert got["bn.running_psi"][1] == np.float32(0.375)         # same means: 0.75 * 0.5 + 0
    assert fl.pool_bn_stats([], specs) is None
    again = fl.pool_bn_stats(cal[::-1], specs)
    assert all(np.array_equal(got[k], again[k]) for k in got)
    # l2: the pooled variance equals the variance of the union of the devices' samples
    rng = np.random.default_rng(2)
    a, b = rng.normal(0, 1, (600, 3)), rng.normal(3, 2, (200, 3))
    l2 = (fl.FleetTensor("c.running_mean", "f32", (3,), "mean", "bn_stat"),
          fl.FleetTensor("c.running_var", "f32", (3,), "mean", "bn_stat"))
    got = fl.pool_bn_stats([fl.Calibration(i, len(v), {"c.running_mean": v.mean(0),
                                                       "c.running_var": v.var(0)})
                            for i, v in enumerate((a, b))], l2)
    both = np.concatenate([a, b])
    assert np.allclose(got["c.running_mean"], both.mean(0), rtol=1e-6)
    assert np.allclose(got["c.running_var"], both.var(0), rtol=1e-6)


def test_calibration_stats_are_the_batch_statistics(outs):
    """The emitted C's BN statistics at fixed weights (calibration_stats), against numpy's batch
    mean and mean |y - mu| of bn1's input x @ sign(W1), averaged over the same batches."""
    out = outs["adam"]
    manifest, graph, cfg = read_compiled(out)
    prog = HostProgram(out, debug=False)
    t = dict(load_init_state(out, graph, cfg))
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (30, *manifest.input_shape[1:])).astype(np.float32)
    y = rng.integers(0, 10, 30)
    specs = fl.bn_stat_tensors(manifest)
    got, used = flocal.calibration_stats(prog, t, x, y, specs, batches=5,
                                         momentum=cfg.bn_momentum, order_key=(1,))
    assert used == 24 and set(got) == {ft.name for ft in specs}    # 3 whole batches of 8
    perm = np.random.default_rng([1]).permutation(30)
    w = np.where(t["fc1.W"] >= 0, 1.0, -1.0)
    mus, psis = [], []
    for k in range(3):
        z = x[perm[8 * k:8 * (k + 1)]].reshape(8, -1).astype(np.float64) @ w
        mus.append(z.mean(0))
        psis.append(np.abs(z - z.mean(0)).mean(0))
    assert np.allclose(got["bn1.running_mean"], np.mean(mus, 0), rtol=1e-2, atol=1e-2)
    assert np.allclose(got["bn1.running_psi"], np.mean(psis, 0), rtol=1e-2)
    assert not np.allclose(got["bn1.running_psi"], t["bn1.running_psi"], rtol=0.1)


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
    # error feedback: the residual is what 1 + 0.5 * sign did not carry of (0.5, -0.5, 1, 0)
    res = fl.feedback_residual(local, glob, specs, wire, None)
    assert set(res) == {"a"} and res["a"].tolist() == [0, 0, 0.5, -0.5]
    # no further change on the device: the next update is the residual alone
    nxt = fl.encode_update(glob, glob, specs, "sign", residual=res)
    assert nxt[fl.SCALES].tolist() == [0.25]
    assert fl.decode_update(nxt, glob, specs, "sign")["a"].tolist() == [1.25, 1.25, 1.25, 0.75]
    assert fl.feedback_residual(glob, glob, specs, nxt, res)["a"].tolist() == [
        -0.25, -0.25, 0.25, -0.25]


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
    ck = fstore.FleetCheckpoint(tmp_path, settings={"seed": 0})
    ck.commit(0, flocal.state_blob_of(prog, state, step=0, seed=0), {"round": 0})
    name = next(iter(state))
    state[name] = state[name] * 2                                # exact in bf16
    ck.commit(1, flocal.state_blob_of(prog, state, step=0, seed=0), {"round": 1, "test_acc": 0.5})
    ck.commit(2, flocal.state_blob_of(prog, state, step=0, seed=0), {"round": 2})
    assert sorted(p.name for p in tmp_path.glob("global-r*.bin")) == ["global-r00001.bin",
                                                                       "global-r00002.bin"]
    # a blob written by a round that crashed before its commit is ignored
    (tmp_path / "global-r00003.bin").write_bytes(b"torn")
    back = fstore.FleetCheckpoint.load(tmp_path)
    assert back.round == 2 and back.settings == {"seed": 0} and len(back.history) == 3
    blob = back.global_blob(manifest)
    assert np.array_equal(blob.tensors[name], state[name])
    assert read_state_blob(tmp_path / back.blob, manifest).tensors.keys() == blob.tensors.keys()
    raw = bytearray((tmp_path / back.blob).read_bytes())
    raw[-1] ^= 1
    (tmp_path / back.blob).write_bytes(bytes(raw))
    with pytest.raises(DataError, match="sha256"):
        back.global_blob(manifest)
    doc = json.loads((tmp_path / fstore.CHECKPOINT_JSON).read_text())
    doc["blob_sha256"] = __import__("hashlib").sha256(bytes(raw)).hexdigest()
    (tmp_path / fstore.CHECKPOINT_JSON).write_text(json.dumps(doc))
    with pytest.raises(DataError, match="CRC"):
        fstore.FleetCheckpoint.load(tmp_path).global_blob(manifest)


def test_device_store_and_start(outs, tmp_path):
    out = outs["adam"]
    manifest, graph, cfg = read_compiled(out)
    prog = HostProgram(out, debug=False)
    init = dict(load_init_state(out, graph, cfg))
    store = fstore.DeviceStore(tmp_path / "dev")
    specs = fl.fleet_tensors(manifest)
    glob = {ft.name: np.full(ft.shape, 0.25, np.float32) for ft in specs}
    t, step, seed = fstore.device_start(store, 1, out, manifest, glob)
    assert step == 0 and seed == cfg.seed
    moment = next(s.name for s in manifest.state if s.role == "optimizer state")
    assert np.array_equal(t[moment], init[moment]) and np.all(t[specs[0].name] == 0.25)
    mine = dict(init, **{moment: np.full_like(init[moment], 0.5)})
    store.save(1, flocal.state_blob_of(prog, mine, step=7, seed=3))
    store.save(2, flocal.state_blob_of(prog, init, step=9, seed=3))
    t, step, _ = fstore.device_start(store, 2, out, manifest, glob)   # round 2 starts from round 1
    assert step == 7 and np.all(t[moment] == 0.5)
    (tmp_path / "dev" / "state-r00002.bin").write_bytes(b"x" * 10)
    assert fstore.device_start(store, 3, out, manifest, glob)[1] == 7   # damaged file skipped


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

    from bnnc.runtime.fleet_flower import check_calibration
    cal = fl.bn_stat_tensors(manifest)
    stats = {ft.name: np.full(ft.size, 0.5, np.float32) for ft in cal}
    ckw = dict(sha256=manifest.model_sha256, specs=cal, devices=2)
    c, _ = check_calibration(reply(stats), **ckw)
    assert c.device == 1 and c.examples == 40 and c.stats[cal[0].name].shape == cal[0].shape
    psi = next(ft for ft in cal if ft.name.endswith("running_psi"))
    for bad, why in ((np.full(psi.size, -1, np.float32), "negative"),
                     (np.full(psi.size, np.inf, np.float32), "NaN or Inf"),
                     (np.zeros(psi.size, np.float64), "expected float32")):
        with pytest.raises(fl.RefusedUpdate, match=why):
            check_calibration(reply(dict(stats, **{psi.name: bad})), **ckw)
    with pytest.raises(fl.RefusedUpdate, match="wrong statistics"):
        check_calibration(reply({psi.name: stats[psi.name]}), **ckw)
    with pytest.raises(fl.RefusedUpdate, match="another model"):
        check_calibration(reply(stats, sha="1" * 64), **ckw)


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
              "partition": "iid", "alpha": 0.5, "data": "mnist", "limit": 0,
              "calibration-batches": 2, "error-feedback": True}
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
    # the 1-bit uplink's error feedback: the residual is kept next to the device's state and
    # read back for its next round
    manifest = read_manifest(out)
    kept = sorted(p.name for p in (tmp_path / "wd0" / "fleet-t").iterdir())
    assert kept == ["residual-r00001.npz", "state-r00001.bin"]
    res = fstore.DeviceStore(tmp_path / "wd0" / "fleet-t").residual_before(2, manifest, specs)
    assert set(res) == {ft.name for ft in specs} and any(np.any(v != 0) for v in res.values())

    # calibration (the default bn_stats): the global model's statistics on the device's data
    from bnnc.runtime.fleet_flower import device_calibrate
    specs, init, arrays, config = _round_inputs(out, bn_stats="calibrate")
    node = {"partition-id": 1, "num-partitions": 2, "out": str(out),
            "workdir": str(tmp_path / "wdc"), "data-dir": str(tmp_path / "data")}
    stats, metrics, _ = device_calibrate(node, config, arrays, 1)
    assert metrics["num-examples"] == 32 and metrics["calibration-examples"] == 16
    assert set(stats) == {ft.name for ft in fl.bn_stat_tensors(manifest)}
    assert all(v.dtype == np.float32 and v.ndim == 1 for v in stats.values())
    again, _, _ = device_calibrate(node, config, arrays, 1)
    assert all(np.array_equal(stats[k], again[k]) for k in stats)
    assert not (tmp_path / "wdc").exists()                  # a calibration writes nothing


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
