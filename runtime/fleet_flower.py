"""The Flower apps of a bnnc fleet (Flower's Message API: `ClientApp`, `ServerApp`, a `FedAvg`
strategy) and the two ways to run them: `simulate` (Flower's simulation runtime,
`flwr.simulation.run_simulation`, one virtual SuperNode per device) and `LocalFederation` (a real
`flower-superlink`, one `flower-supernode` per device and `flwr run`, on this machine), both in
runtime/fleet_run.py. The
federation logic itself -- what is sent, aggregation, partitions (runtime/fleet.py), checkpoints
(runtime/fleet_store.py), a device's training (runtime/fleet_local.py) -- is not here; this
module only moves it through Flower.

Server (`make_server_app`): reads OUT/ (the compiled program), resumes FLEET_DIR's checkpoint or
starts from OUT/init_state.npz, then runs Flower's `FedAvg.start` for the remaining rounds with
`BnncFedAvg`, whose `aggregate_train` checks every reply (`check_reply`) and aggregates; with
bn_stats="calibrate" (the default) Flower's evaluate phase then sends the new global model to the
devices whose update was taken, and `aggregate_evaluate` pools their BN statistics
(`check_calibration`); the round's global state is then committed atomically and scored on the
test split (the emitted C's predict). Replies
that never come (a dead device) are left out when the round's `round_timeout` expires; failed or
refused replies are logged and recorded in fleet.json. The first round waits until every device
is connected; later ones start with `min_devices` (default: all), so a fleet that lost a device
goes on without it once Flower stops listing it (its heartbeat expires).

Device (`make_client_app`): its settings come from the SuperNode's node config (`partition-id`,
`num-partitions`, `out`, `workdir`, `data-dir`, `emulate`, `device`; in a simulation from the
`DeviceDefaults` given to `simulate`), the round's from the message's config. It trains its
partition of the dataset for the configured local epochs -- host OUT/: the emitted C in-process
(cffi); rpi4/rpi3/cortex-m OUT/: the standalone trainer through runtime/run.py in a private copy of
OUT/ under its workdir -- and replies with its fleet tensors (fleet.py: `encode_update`), its
number of examples and its model's sha256. Its evaluate handler is the calibration
(`device_calibrate`).

Telemetry: Flower's is switched off (FLWR_TELEMETRY_ENABLED=0) before flwr is imported, here and in
every process fleet_run.LocalFederation starts.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import numpy as np  # noqa: E402
from flwr.app import (Array, ArrayRecord, ConfigRecord, Context, Message,  # noqa: E402
                      MetricRecord, RecordDict)
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402

from ..compiler.errors import ConfigError, DataError  # noqa: E402
from . import fleet as fl  # noqa: E402
from . import fleet_local as flocal  # noqa: E402
from . import fleet_store as fstore  # noqa: E402
from .datasets import training_data  # noqa: E402
from .host import HostProgram  # noqa: E402
from .outdir import load_init_state, read_compiled  # noqa: E402

log = logging.getLogger("bnnc.fleet")

FLOWER_VERSION = "1.42.0"
APP_MODULE = "bnnc_fleet_app"


@dataclass(frozen=True)
class FleetSettings:
    """One fleet run, as the server sees it (the `[tool.flwr.app.config]` of a deployment)."""
    out: str                       # the compiled OUT/ (on the server's machine)
    fleet_dir: str                 # the global checkpoint lives here
    rounds: int = 20               # total rounds (a resumed run does the remaining ones)
    devices: int = 10
    partition: str = "dirichlet"
    alpha: float = 0.5
    seed: int = 0
    local_epochs: int = 1
    bn_stats: str = "calibrate"    # "mean": averaged from training; "local": FedBN
    calibration_batches: int = 20  # per device and round, bn_stats="calibrate"
    uplink: str = "full"           # "sign": 1-bit uplink
    error_feedback: bool = True    # 1-bit uplink: each device keeps what its signs left out
    server_lr: float = 1.0         # the server's step on the averaged update (1 = FedAvg)
    share_moments: bool = False    # also average Adam/SGD moments (else they stay on devices)
    data: str = "mnist"
    data_dir: str = ""             # "" = the default data root
    limit: int = 0                 # 0 = every training example
    round_timeout: float = 600.0   # seconds to wait for the replies of one round
    min_devices: int = 0           # a round after the first starts with this many connected
                                   # devices (0 = all); the first waits for every device

    def check(self) -> None:
        if self.partition not in fl.PARTITIONS:
            raise ConfigError(f"--partition {self.partition!r}: use {', '.join(fl.PARTITIONS)}")
        if self.bn_stats not in fl.BN_STATS:
            raise ConfigError(f"--bn-stats {self.bn_stats!r}: use {', '.join(fl.BN_STATS)}")
        if self.uplink not in fl.UPLINKS:
            raise ConfigError(f"--uplink {self.uplink!r}: use {', '.join(fl.UPLINKS)}")
        for name in ("rounds", "devices", "local_epochs", "calibration_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if not 0 <= self.min_devices <= self.devices:
            raise ConfigError(f"--min-devices must be in [0, {self.devices}]")
        if not self.server_lr > 0:
            raise ConfigError("--server-lr must be > 0")
        if not self.round_timeout > 0:
            raise ConfigError("--round-timeout must be > 0")

    def federation(self) -> dict:
        """What decides the global model (a resumed run must match it)."""
        doc = asdict(self)
        for k in ("out", "fleet_dir", "rounds", "round_timeout", "data_dir", "min_devices"):
            doc.pop(k)
        return doc

    def fleet_id(self, model_sha256: str) -> str:
        """Names a device's state directory for this run: two fleet runs never share one."""
        doc = dict(self.federation(), model_sha256=model_sha256,
                   fleet_dir=str(Path(self.fleet_dir).resolve()))
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]

    def run_config(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    @classmethod
    def from_run_config(cls, rc: Mapping[str, Any]) -> FleetSettings:
        kw = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key in rc:
                kw[f.name] = {"int": int, "float": float, "str": str, "bool": bool}[f.type](rc[key])
        return cls(**kw)


@dataclass(frozen=True)
class DeviceDefaults:
    """A device's settings where its SuperNode's node config says nothing (simulation)."""
    out: str = ""                  # "" = the server's OUT/ (same machine)
    workdir_root: str = ""         # "" = FLEET_DIR/devices
    data_dir: str = ""
    emulate: bool = False
    device: str = ""               # user@host[:dir]: train on an ssh device


# --------------------------------------------------------------------------------------------------
# server

def _arrays(d: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in d.items()})


def _payload_nbytes(rec: ArrayRecord) -> int:
    """Bytes of the arrays as Flower serializes them (numpy .npy bytes, header included)."""
    return int(sum(len(a.data) for a in rec.values()))


def _reply_parts(msg: Message, *, sha256: str, devices: int) -> tuple[int, int, dict, ArrayRecord]:
    """(partition id, examples, arrays, the ArrayRecord) of a device's reply, checked (the model's
    sha256, the partition id, a positive example count): RefusedUpdate saying what is wrong."""
    if msg.has_error():
        raise fl.RefusedUpdate(f"the device failed: {msg.error.reason}")
    c = msg.content
    if "arrays" not in c.array_records or "metrics" not in c.metric_records \
            or "device" not in c.config_records:
        raise fl.RefusedUpdate("the reply lacks its arrays, metrics or device record")
    dev = c.config_records["device"]
    if dev.get("model-sha256") != sha256:
        theirs = str(dev.get("model-sha256"))[:16]
        raise fl.RefusedUpdate(f"update from another model (sha256 {theirs}..., this fleet "
                               f"trains {sha256[:16]}...)")
    m = c.metric_records["metrics"]
    pid, n = m.get("partition-id"), m.get("num-examples")
    if not isinstance(pid, int) or not 0 <= pid < devices:
        raise fl.RefusedUpdate(f"partition id {pid!r} outside [0, {devices})")
    if not isinstance(n, int) or n < 1:
        raise fl.RefusedUpdate(f"example count {n!r} is not a positive integer")
    rec = c.array_records["arrays"]
    try:
        arrays = {k: a.numpy() for k, a in rec.items()}
    except Exception as err:      # a malformed array from the wire: refuse, never crash the round
        raise fl.RefusedUpdate(f"unreadable array ({err})") from err
    return pid, n, arrays, rec


def check_reply(msg: Message, *, sha256: str, specs, glob, uplink: str,
                devices: int) -> tuple[fl.Update, int]:
    """A device's training reply as an `fl.Update` (and its payload bytes), or RefusedUpdate."""
    pid, n, arrays, rec = _reply_parts(msg, sha256=sha256, devices=devices)
    tensors = fl.decode_update(arrays, glob, specs, uplink)
    return fl.Update(pid, n, tensors), _payload_nbytes(rec)


def check_calibration(msg: Message, *, sha256: str, specs,
                      devices: int) -> tuple[fl.Calibration, int]:
    """A device's calibration reply (BN statistics of the global model), or RefusedUpdate."""
    pid, n, arrays, rec = _reply_parts(msg, sha256=sha256, devices=devices)
    return fl.Calibration(pid, n, fl.decode_calibration(arrays, specs)), _payload_nbytes(rec)


class FleetServer:
    """The server side of one fleet run: OUT/, the checkpoint, the test split, the C program."""

    def __init__(self, s: FleetSettings, on_round: Callable[[dict], None] | None):
        s.check()
        self.s, self.on_round = s, on_round
        self.out = Path(s.out)
        self.manifest, self.graph, self.cfg = read_compiled(self.out)
        self.specs = fl.fleet_tensors(self.manifest, s.bn_stats, moments=s.share_moments)
        self.cal_specs = fl.bn_stat_tensors(self.manifest)
        self.pending: dict | None = None       # a round trained, waiting for its calibration
        self.program = HostProgram(self.out, target="host", debug=False)
        fleet_dir = Path(s.fleet_dir)
        fleet_dir.mkdir(parents=True, exist_ok=True)
        ck = fstore.FleetCheckpoint.load(fleet_dir)
        fed = dict(s.federation(), model_sha256=self.manifest.model_sha256)
        if ck is None:
            ck = fstore.FleetCheckpoint(fleet_dir, settings=fed)
            self.full = dict(load_init_state(self.out, self.graph, self.cfg))
            ck.commit(0, self._blob(), {"round": 0})
        else:
            if ck.settings != fed:
                diff = sorted(k for k in set(fed) | set(ck.settings)
                              if fed.get(k) != ck.settings.get(k))
                raise ConfigError(f"{fleet_dir} holds a fleet run with other settings "
                                  f"({', '.join(diff)})",
                                  hint="use the same options to resume, or a new --fleet-dir")
            self.full = dict(ck.global_blob(self.manifest).tensors)
        self.ck = ck
        _, _, _, self.x_test, self.y_test = training_data(
            self.graph, s.data, s.data_dir or None, None, self.manifest.preprocess)
        self.f32_nbytes = fl.float32_model_nbytes(self.manifest)

    def _blob(self) -> bytes:
        return flocal.state_blob_of(self.program, self.full, step=0, seed=self.cfg.seed)

    def glob(self) -> dict[str, np.ndarray]:
        return {ft.name: self.full[ft.name] for ft in self.specs}

    def aggregate(self, server_round: int, replies) -> tuple[ArrayRecord, set[int]]:
        """A training round's replies -> the new global parameters (and the Flower node ids
        whose update was taken). Committed here, or after the calibration (`calibrate`)."""
        r = self.ck.round + 1
        glob = self.glob()
        down = _arrays(fl.encode_global(glob, self.specs))
        updates, uplink_bytes, refused, device_acc, nodes = [], {}, [], {}, set()
        for msg in replies:
            try:
                up, nbytes = check_reply(msg, sha256=self.manifest.model_sha256, specs=self.specs,
                                         glob=glob, uplink=self.s.uplink, devices=self.s.devices)
            except fl.RefusedUpdate as err:
                who = _reply_device(msg)
                log.warning("round %d: update of device %s refused: %s", r, who, err)
                refused.append({"device": who, "reason": str(err)})
                continue
            if up.device in uplink_bytes:
                log.warning("round %d: second update of device %d refused", r, up.device)
                refused.append({"device": up.device, "reason": "duplicate partition id"})
                continue
            if self.s.bn_stats == "local":
                acc = msg.content.metric_records["metrics"].get("test-acc")
                if not isinstance(acc, float) or not 0 <= acc <= 1:
                    log.warning("round %d: device %d sent no test accuracy", r, up.device)
                    refused.append({"device": up.device, "reason": "no test accuracy (FedBN)"})
                    continue
                device_acc[up.device] = acc
            updates.append(up)
            uplink_bytes[up.device] = nbytes
            nodes.add(msg.metadata.src_node_id)
        new = fl.aggregate(glob, updates, self.specs, server_lr=self.s.server_lr)
        self.full.update(new)
        record = {"round": r, "devices": sorted(u.device for u in updates), "refused": refused,
                  "examples": int(sum(u.examples for u in updates)),
                  "test_acc_of": "devices" if self.s.bn_stats == "local" else "global",
                  "downlink_bytes_per_device": _payload_nbytes(down),
                  "uplink_bytes_per_device": (int(np.mean(list(uplink_bytes.values())))
                                              if uplink_bytes else 0),
                  "float32_model_bytes": self.f32_nbytes}
        arrays = _arrays(fl.encode_global(self.glob(), self.specs))
        if self.s.bn_stats == "calibrate":
            record["calibration_downlink_bytes_per_device"] = _payload_nbytes(arrays)
            self.pending = record
        elif self.s.bn_stats == "local":
            # FedBN: the global state has no statistics of its own; the score is the devices'
            # test accuracy with their own statistics, weighted by their examples
            n = sum(u.examples for u in updates)
            acc = float(sum(u.examples * device_acc[u.device] for u in updates) / n) if n else 0.0
            self._commit(record, acc)
        else:
            self._commit(record, self._score())
        return arrays, nodes

    def calibrate(self, replies) -> None:
        """The calibration replies of the round `aggregate` left pending: the global model's BN
        statistics pooled from them (fleet.py: `pool_bn_stats`), then scored and committed. No
        usable reply keeps the previous round's statistics (logged)."""
        record, self.pending = self.pending, None
        if record is None:
            return
        r = record["round"]
        cals, nbytes = [], []
        for msg in replies:
            try:
                cal, n = check_calibration(msg, sha256=self.manifest.model_sha256,
                                           specs=self.cal_specs, devices=self.s.devices)
            except fl.RefusedUpdate as err:
                who = _reply_device(msg)
                log.warning("round %d: calibration of device %s refused: %s", r, who, err)
                record["refused"].append({"device": who, "reason": f"calibration: {err}"})
                continue
            if any(c.device == cal.device for c in cals):
                record["refused"].append({"device": cal.device,
                                          "reason": "calibration: duplicate partition id"})
                continue
            cals.append(cal)
            nbytes.append(n)
        pooled = fl.pool_bn_stats(cals, self.cal_specs)
        if pooled is None:
            log.warning("round %d: no device calibrated the global model; its BN statistics "
                        "are the previous round's", r)
        else:
            self.full.update(pooled)
        record["calibrated_by"] = sorted(c.device for c in cals)
        record["calibration_uplink_bytes_per_device"] = int(np.mean(nbytes)) if nbytes else 0
        self._commit(record, self._score())

    def _score(self) -> float:
        return flocal.evaluate(self.program, self.full, self.x_test, self.y_test,
                               seed=self.cfg.seed)

    def _commit(self, record: dict, acc: float) -> None:
        record["test_acc"] = acc
        self.ck.commit(record["round"], self._blob(), record)
        if self.on_round:
            self.on_round(record)
        log.info("round %d: %d devices, test acc %.4f", record["round"], len(record["devices"]),
                 acc)

    def train_config(self) -> ConfigRecord:
        s = self.s
        return ConfigRecord({"round-offset": self.ck.round,
                             "fleet-id": s.fleet_id(self.manifest.model_sha256), "model-sha256":
                             self.manifest.model_sha256, "local-epochs": s.local_epochs,
                             "uplink": s.uplink, "bn-stats": s.bn_stats, "seed": s.seed,
                             "calibration-batches": s.calibration_batches,
                             "error-feedback": s.error_feedback,
                             "share-moments": s.share_moments,
                             "partition": s.partition, "alpha": float(s.alpha), "data": s.data,
                             "limit": s.limit})


def _reply_device(msg: Message) -> Any:
    try:
        return msg.content.metric_records["metrics"]["partition-id"]
    except Exception:        # an error reply or a malformed one: name the node instead
        return f"node {msg.metadata.src_node_id}"


class BnncFedAvg(FedAvg):
    """FedAvg whose aggregation is bnnc's (fleet.py) and whose round ends in a checkpoint. With
    bn_stats="calibrate" Flower's evaluate phase of each round is the calibration: the new global
    model goes to the devices whose update was taken, they reply with its BN statistics on their
    data, and the round is committed after they are pooled."""

    def __init__(self, server: FleetServer):
        n = server.s.devices
        cal = server.s.bn_stats == "calibrate"
        super().__init__(fraction_train=1.0, fraction_evaluate=1.0 if cal else 0.0,
                         min_train_nodes=n, min_evaluate_nodes=n, min_available_nodes=n)
        self.server = server
        self._first = True
        self._trained: set[int] = set()

    def configure_train(self, server_round, arrays, config, grid):
        s = self.server.s
        need = s.devices if self._first or not s.min_devices else s.min_devices
        self._first = False
        self.min_available_nodes = self.min_train_nodes = self.min_evaluate_nodes = need
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        arrays, self._trained = self.server.aggregate(server_round, list(replies))
        return arrays, MetricRecord({})

    def configure_evaluate(self, server_round, arrays, config, grid):
        # only the devices that trained this round: a dead one would hold the round for its timeout
        return [m for m in super().configure_evaluate(server_round, arrays, config, grid)
                if m.metadata.dst_node_id in self._trained]

    def aggregate_evaluate(self, server_round, replies):
        self.server.calibrate(list(replies))
        return MetricRecord({})


def run_server(grid: Grid, s: FleetSettings, on_round: Callable[[dict], None] | None = None,
               server: FleetServer | None = None) -> None:
    server = server or FleetServer(s, on_round)
    left = s.rounds - server.ck.round
    if left <= 0:
        log.info("%s already finished %d rounds", s.fleet_dir, server.ck.round)
        return
    BnncFedAvg(server).start(grid=grid, initial_arrays=_arrays(fl.encode_global(
        server.glob(), server.specs)), num_rounds=left, timeout=s.round_timeout,
        train_config=server.train_config(), evaluate_config=server.train_config())


def make_server_app(settings: FleetSettings | None = None,
                    on_round: Callable[[dict], None] | None = None) -> ServerApp:
    """The ServerApp: `settings` given (simulation) or read from the run config (deployment)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        s = settings or FleetSettings.from_run_config(context.run_config)
        run_server(grid, s, on_round)

    return app


# --------------------------------------------------------------------------------------------------
# device

@functools.lru_cache(maxsize=4)
def _device_data(out: str, data: str, data_dir: str, limit: int, devices: int, scheme: str,
                 alpha: float, seed: int, batch: int, pid: int):
    """(indices, x, y) of device `pid`'s training partition, and the test split (x, y)."""
    manifest, graph, _ = read_compiled(Path(out))
    _, x, y, x_test, y_test = training_data(graph, data, data_dir or None, limit or None,
                                            manifest.preprocess)
    parts = fl.partition(y, devices, scheme, alpha=alpha, seed=seed, min_examples=batch)
    idx = parts[pid]
    return idx, x[idx], y[idx], x_test, y_test


@functools.lru_cache(maxsize=2)
def _host_program(out: str) -> HostProgram:
    return HostProgram(Path(out), target="host", debug=False)


def _private_out(out: Path, workdir: Path) -> Path:
    """WORKDIR/out: a copy of the compiled directory the standalone trainer may write into."""
    dest = workdir / "out"
    if not (dest / "bnnc_manifest.json").is_file() or \
            (dest / "bnnc_manifest.json").read_bytes() != (out / "bnnc_manifest.json").read_bytes():
        tmp = workdir / ".out.new"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(out, tmp, ignore=shutil.ignore_patterns("data", "state.bin",
                                                                "final_state.npz", "build"))
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    return dest


@dataclass(frozen=True)
class _DeviceRound:
    """What a device's two handlers share: its OUT/, round, fleet tensors and the global ones."""
    out: Path
    manifest: Any
    pid: int
    devices: int
    round: int
    specs: tuple
    glob: dict
    workdir: Path

    def data(self, node: Mapping[str, Any], cfg: Mapping[str, Any]):
        """(indices, x, y, x_test, y_test) of this device's partition."""
        return _device_data(str(self.out), str(cfg["data"]), str(node.get("data-dir", "")),
                            int(cfg["limit"]), self.devices, str(cfg["partition"]),
                            float(cfg["alpha"]), int(cfg["seed"]), self.manifest.batch, self.pid)

    def host_program(self) -> HostProgram:
        """The emitted C in-process: OUT/ itself (host), else its copy built for the host."""
        return _host_program(str(self.out) if self.manifest.target_kind == "host"
                             else str(_private_out(self.out, self.workdir)))


def _device_round(node: Mapping[str, Any], cfg: Mapping[str, Any],
                  arrays: Mapping[str, np.ndarray], server_round: int) -> _DeviceRound:
    out = Path(str(node["out"]))
    manifest, _, _ = read_compiled(out)
    if cfg["model-sha256"] != manifest.model_sha256:
        raise DataError(f"{out} is another model than the fleet's (sha256 "
                        f"{manifest.model_sha256[:16]}... vs {str(cfg['model-sha256'])[:16]}...)")
    specs = fl.fleet_tensors(manifest, str(cfg["bn-stats"]),
                             moments=bool(cfg.get("share-moments", False)))
    fleet_id = str(cfg["fleet-id"])
    if not fleet_id.isalnum():
        raise DataError(f"fleet id {fleet_id!r} is not a plain name")
    return _DeviceRound(out, manifest, int(node["partition-id"]), int(node["num-partitions"]),
                        int(cfg["round-offset"]) + server_round, specs,
                        fl.decode_global(arrays, specs),
                        Path(str(node["workdir"])) / f"fleet-{fleet_id}")


def device_train(node: Mapping[str, Any], cfg: Mapping[str, Any], arrays: Mapping[str, np.ndarray],
                 server_round: int) -> tuple[dict, dict, str]:
    """One round on one device: (reply arrays, metrics, model sha256)."""
    d = _device_round(node, cfg, arrays, server_round)
    store = fstore.DeviceStore(d.workdir)
    tensors, step, seed = fstore.device_start(store, d.round, d.out, d.manifest, d.glob)
    idx, x, y, x_test, y_test = d.data(node, cfg)
    epochs = int(cfg["local-epochs"])
    if d.manifest.target_kind == "host" and not node.get("device"):
        res = flocal.train_host(_host_program(str(d.out)), tensors, step, seed, x, y, epochs=epochs,
                                order_key=(int(cfg["seed"]), d.round, d.pid))
    else:
        res = flocal.train_standalone(_private_out(d.out, d.workdir), tensors, step, seed, idx,
                                      epochs=epochs, data_name=str(cfg["data"]),
                                      data_dir=Path(str(node["data-dir"])) if node.get("data-dir")
                                      else None, emulate=bool(node.get("emulate")),
                                      device=str(node["device"]) if node.get("device") else None)
    if cfg["bn-stats"] == "local":          # FedBN: only the device's own statistics score it
        res = dataclasses.replace(res, test_acc=flocal.evaluate(d.host_program(), res.tensors,
                                                                x_test, y_test, seed=seed))
    local = {ft.name: res.tensors[ft.name] for ft in d.specs}
    uplink = str(cfg["uplink"])
    ef = uplink == "sign" and bool(cfg.get("error-feedback", False))
    residual = store.residual_before(d.round, d.manifest, d.specs) if ef else None
    reply = fl.encode_update(local, d.glob, d.specs, uplink, residual=residual)
    store.save(d.round, res.blob,
               fl.feedback_residual(local, d.glob, d.specs, reply, residual) if ef else None)
    metrics = {"partition-id": d.pid, "num-examples": res.examples, "steps": res.steps,
               "train-loss": res.loss, "train-acc": res.acc}
    if res.test_acc is not None:
        metrics["test-acc"] = res.test_acc
    return reply, metrics, d.manifest.model_sha256


def device_calibrate(node: Mapping[str, Any], cfg: Mapping[str, Any],
                     arrays: Mapping[str, np.ndarray], server_round: int
                     ) -> tuple[dict, dict, str]:
    """One round's calibration on one device (bn_stats="calibrate"): the BN statistics of the new
    global model on this device's data (fleet_local.py: `calibration_stats`), computed by the
    emitted C on the SuperNode's machine (an rpi/Cortex-M OUT/: its copy built for the host). Writes
    nothing but that copy."""
    d = _device_round(node, cfg, arrays, server_round)
    _, graph, tcfg = read_compiled(d.out)
    tensors = dict(load_init_state(d.out, graph, tcfg))      # frozen parameters come from here
    tensors.update(d.glob)
    idx, x, y, _, _ = d.data(node, cfg)
    stats, used = flocal.calibration_stats(
        d.host_program(), tensors, x, y, fl.bn_stat_tensors(d.manifest),
        batches=int(cfg["calibration-batches"]), momentum=tcfg.bn_momentum,
        order_key=(int(cfg["seed"]), d.round, d.pid, 0xCA1))
    reply = {k: np.ascontiguousarray(v.reshape(-1), np.float32) for k, v in stats.items()}
    metrics = {"partition-id": d.pid, "num-examples": int(len(idx)),
               "calibration-examples": used}
    return reply, metrics, d.manifest.model_sha256


def _node_settings(context: Context, defaults: DeviceDefaults | None, fleet_dir: str) -> dict:
    nc = dict(context.node_config)
    d = defaults or DeviceDefaults()
    pid = int(nc["partition-id"])
    nc.setdefault("out", d.out)
    nc.setdefault("data-dir", d.data_dir)
    nc.setdefault("emulate", d.emulate)
    nc.setdefault("device", d.device)
    if "workdir" not in nc:
        root = Path(d.workdir_root) if d.workdir_root else Path(fleet_dir) / "devices"
        nc["workdir"] = str(root / f"device-{pid}")
    return nc


def make_client_app(defaults: DeviceDefaults | None = None,
                    server_out: str = "", fleet_dir: str = "") -> ClientApp:
    """The ClientApp (module docstring). `defaults` fill what the node config leaves out."""
    app = ClientApp()

    def handle(msg: Message, context: Context, work) -> Message:
        cfg = msg.content.config_records["config"]
        node = _node_settings(context, defaults, fleet_dir or
                              str(Path.home() / ".cache" / "bnnc" / "fleet"))
        if not node.get("out"):
            node["out"] = server_out
        if not node.get("out"):
            raise ConfigError("this SuperNode has no `out` in its --node-config",
                              hint="flower-supernode --node-config 'out=\"/path/to/OUT\" ...'")
        arrays = {k: a.numpy() for k, a in msg.content.array_records["arrays"].items()}
        reply, metrics, sha = work(node, cfg, arrays, int(cfg["server-round"]))
        content = RecordDict({"arrays": _arrays(reply), "metrics": MetricRecord(metrics),
                              "device": ConfigRecord({"model-sha256": sha})})
        return Message(content, reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle(msg, context, device_train)

    @app.evaluate()
    def calibrate(msg: Message, context: Context) -> Message:
        return handle(msg, context, device_calibrate)

    return app
