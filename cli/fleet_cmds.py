"""`bnnc fleet ...`: federated training of a compiled OUT/ on Flower -- `simulate` (N devices on
this machine, Flower's simulation runtime), `deploy` (a real flower-superlink and one
flower-supernode per device on loopback), `app` (the Flower App for `flwr run` against your own
SuperLink, e.g. Raspberry Pis) and `status` (a fleet directory's rounds, its global state checked).

This module parses options and prints rounds; runtime/fleet.py, fleet_store.py, fleet_flower.py
and fleet_run.py do the work (Flower is imported only when a command needs it).
"""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

from ..compiler.errors import ConfigError, DataError
from ..runtime import fleet as fl
from ..runtime import fleet_store as fstore
from ..runtime.outdir import read_compiled
from .app import cli


@cli.group("fleet")
def fleet() -> None:
    """Train a compiled OUT/ across a fleet of devices with Flower (federated learning).

    \b
    Only model updates travel: the latent 16-bit weights and BN betas (FedAvg weighted by
    examples), Bop's 1-bit weights (majority vote) and momenta; the global model's BN running
    statistics are calibrated on the devices each round (--bn-stats). The global state is a
    bnnc state blob, checkpointed atomically every round in --fleet-dir; the same command
    resumes an interrupted run.
    \b
      bnnc compile mlp -o out/mlp
      bnnc fleet simulate out/mlp --devices 10 --alpha 0.5 --rounds 20 --data mnist
      bnnc export out/mlp --state fleet/final_state.npz -o mlp_fleet.onnx
    """


def _federation_options(f):
    opts = [
        click.option("--fleet-dir", type=click.Path(file_okay=False, path_type=Path),
                     required=True, help="the global checkpoint (fleet.json, global-rN.bin); "
                                         "an existing one is resumed"),
        click.option("--devices", type=click.IntRange(min=1), default=10, show_default=True),
        click.option("--rounds", type=click.IntRange(min=1), default=20, show_default=True,
                     help="total rounds (a resumed run does the remaining ones)"),
        click.option("--local-epochs", type=click.IntRange(min=1), default=1, show_default=True),
        click.option("--data", default="mnist", show_default=True,
                     help="dataset the devices' partitions come from"),
        click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
                     default=None, help="data root [default: $BNNC_DATA, else ~/.cache/bnnc/data]"),
        click.option("--limit", type=click.IntRange(min=1), default=None,
                     help="use only the first N training examples"),
        click.option("--partition", type=click.Choice(fl.PARTITIONS), default="dirichlet",
                     show_default=True, help="iid, or non-IID by label with Dirichlet(alpha)"),
        click.option("--alpha", type=click.FloatRange(min=0, min_open=True), default=0.5,
                     show_default=True, help="Dirichlet concentration (small = fewer classes "
                                             "per device)"),
        click.option("--bn-stats", type=click.Choice(fl.BN_STATS), default="calibrate",
                     show_default=True,
                     help="the global model's BN running statistics: calibrate = measured at the "
                          "new global weights on every device's data each round and pooled; "
                          "mean = averaged from the devices' training; local = kept on each "
                          "device (FedBN)"),
        click.option("--calibration-batches", type=click.IntRange(min=1), default=20,
                     show_default=True,
                     help="batches per device and round for --bn-stats calibrate"),
        click.option("--uplink", type=click.Choice(fl.UPLINKS), default="full",
                     show_default=True, help="sign: 1-bit updates (sign + per-tensor scale)"),
        click.option("--error-feedback/--no-error-feedback", default=True, show_default=True,
                     help="--uplink sign: each device adds what its last 1-bit updates left "
                          "out to the next (EF-signSGD)"),
        click.option("--server-lr", type=click.FloatRange(min=0, min_open=True), default=1.0,
                     show_default=True, help="server step on the averaged parameter update "
                                             "(1 = FedAvg)"),
        click.option("--share-moments", is_flag=True,
                     help="also average Adam/SGD moments (3x the bytes; default: they stay on "
                          "each device)"),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="partition and batch order"),
        click.option("--round-timeout", type=click.FloatRange(min=0, min_open=True),
                     default=600.0, show_default=True,
                     help="seconds a round waits for its devices; the missing are left out"),
        click.option("--min-devices", type=click.IntRange(min=0), default=0, show_default=True,
                     help="devices a round after the first needs connected (0 = all)"),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _device_options(f):
    opts = [
        click.option("--emulate", is_flag=True,
                     help="rpi4/rpi3/cortex-m OUT/: every device trains under QEMU"),
        click.option("--device", "ssh_device", default=None, metavar="USER@HOST[:DIR]",
                     help="every device trains on this ssh device (one at a time)"),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _settings(out_dir: Path, o: dict):
    from ..runtime.fleet_flower import FleetSettings  # local: Flower loads for fleet commands only
    return FleetSettings(out=str(out_dir.resolve()), fleet_dir=str(o["fleet_dir"].resolve()),
                         rounds=o["rounds"], devices=o["devices"], partition=o["partition"],
                         alpha=o["alpha"], seed=o["seed"], local_epochs=o["local_epochs"],
                         bn_stats=o["bn_stats"], calibration_batches=o["calibration_batches"],
                         uplink=o["uplink"], error_feedback=o["error_feedback"],
                         server_lr=o["server_lr"],
                         share_moments=o["share_moments"],
                         data=o["data"],
                         data_dir=str(o["data_dir"].resolve()) if o["data_dir"] else "",
                         limit=o["limit"] or 0, round_timeout=o["round_timeout"],
                         min_devices=o["min_devices"])


def _flower():
    """runtime/fleet_flower.py (the apps, their settings) and runtime/fleet_run.py (simulate,
    deploy, the App directory), imported here: Flower loads for fleet commands only."""
    try:
        from ..runtime import fleet_flower, fleet_run  # local: Flower loads for fleet commands only
    except ModuleNotFoundError as err:
        raise ConfigError(f"Flower is not installed ({err})",
                          hint="pip install 'flwr[simulation]==1.42.0' (or bnnc's [fleet] extra)"
                          ) from err
    return fleet_flower, fleet_run


def _calibration(r: dict) -> str:
    """The round's calibration exchange (--bn-stats calibrate), if it had one."""
    if "calibrated_by" not in r:
        return ""
    return (f"; BN statistics calibrated by {len(r['calibrated_by'])} devices, "
            f"{r['calibration_downlink_bytes_per_device']:,} B down, "
            f"{r['calibration_uplink_bytes_per_device']:,} B up")


def _round_printer(console: Console):
    def show(r: dict) -> None:
        refused = f", {len(r['refused'])} refused" if r["refused"] else ""
        whose = " (devices, own BN statistics)" if r.get("test_acc_of") == "devices" else ""
        console.print(f"round {r['round']}: {len(r['devices'])} devices{refused}, "
                      f"{r['examples']:,} examples, test acc {100 * r['test_acc']:.2f} %{whose}; "
                      f"per device {r['downlink_bytes_per_device']:,} B down, "
                      f"{r['uplink_bytes_per_device']:,} B up{_calibration(r)} (float32 model "
                      f"{r['float32_model_bytes']:,} B)")
    return show


def _finish(console: Console, ck, out_dir: Path) -> None:
    final = fstore.export_final(ck.fleet_dir, out_dir)
    console.print(f"wrote {ck.fleet_dir / ck.blob} (round {ck.round}), "
                  f"{ck.fleet_dir / fstore.CHECKPOINT_JSON} and {final}")


@fleet.command("simulate")
@click.argument("out_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@_federation_options
@_device_options
@click.option("--cpus-per-device", type=click.FloatRange(min=0, min_open=True), default=1.0,
              show_default=True, help="Ray resources per simulated device (devices run "
                                      "concurrently: CPUs / this)")
@click.option("--verbose", is_flag=True, help="show Flower's and Ray's log")
def simulate_cmd(out_dir: Path, emulate: bool, ssh_device: str | None, cpus_per_device: float,
                 verbose: bool, **o) -> None:
    """Simulate a fleet of --devices devices on this machine (Flower's simulation runtime).

    \b
    Each device trains its partition of --data (IID, or non-IID by label) with the program in
    OUT_DIR: host OUT/ in-process (cffi), rpi4/rpi3/cortex-m OUT/ with its standalone trainer
    under QEMU (--emulate). After each round the server scores the global model on the test split.
    \b
    Example:
      bnnc fleet simulate out/mlp --fleet-dir fleet --devices 10 --alpha 0.5 --rounds 20
      bnnc fleet simulate out/mlp --fleet-dir fleet1 --uplink sign       # 1-bit updates
    """
    ff, fr = _flower()
    console = Console(highlight=False, soft_wrap=True)
    s = _settings(out_dir, o)
    ck = fr.simulate(s, ff.DeviceDefaults(emulate=emulate, device=ssh_device or ""),
                     _round_printer(console), cpus_per_device=cpus_per_device, verbose=verbose)
    _finish(console, ck, out_dir)


@fleet.command("deploy")
@click.argument("out_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@_federation_options
@_device_options
@click.option("--port", type=click.IntRange(1024, 65000), default=19090, show_default=True,
              help="the SuperLink's port; SuperNode i listens on PORT+10+i")
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="logs and the Flower App [default: FLEET_DIR/deploy]")
@click.option("--timeout", type=float, default=24 * 3600.0, show_default=True,
              help="give up on the whole run after this many seconds")
def deploy_cmd(out_dir: Path, emulate: bool, ssh_device: str | None, port: int,
               work: Path | None, timeout: float, **o) -> None:
    """Run the fleet on a real Flower deployment on this machine: a flower-superlink, one
    flower-supernode per device (loopback), `flwr run`. Real devices: see `bnnc fleet app`.
    """
    ff, fr = _flower()
    console = Console(highlight=False, soft_wrap=True)
    s = _settings(out_dir, o)
    work = work or Path(s.fleet_dir) / "deploy"
    console.print(f"SuperLink 127.0.0.1:{port}, {s.devices} SuperNodes; logs in {work}")
    ck = fr.deploy_local(s, work, port=port, timeout=timeout,
                         device=ff.DeviceDefaults(emulate=emulate, device=ssh_device or ""))
    for r in ck.history[1:]:
        _round_printer(console)(r)
    _finish(console, ck, out_dir)


@fleet.command("app")
@click.argument("out_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@_federation_options
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="the Flower App directory to write")
def app_cmd(out_dir: Path, output: Path, **o) -> None:
    """Write the Flower App (pyproject.toml + bnnc_fleet_app.py) for `flwr run` against your own
    SuperLink; OUT_DIR and --fleet-dir are paths on the SuperLink's machine.

    \b
    Each device runs `flower-supernode --superlink HOST:PORT --node-config
    'partition-id=I num-partitions=N out="/path/to/OUT" workdir="/var/lib/bnnc-fleet"'`
    (README, "Train a fleet").
    """
    ff, fr = _flower()
    app = fr.write_app(output, _settings(out_dir, o))
    click.echo(f"wrote {app / 'pyproject.toml'} and {app / (ff.APP_MODULE + '.py')}; "
               f"run it with: flwr run {app} <superlink-connection> --stream")


@fleet.command("status")
@click.argument("fleet_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
def status_cmd(fleet_dir: Path, out_dir: Path) -> None:
    """The rounds a fleet directory holds, its global state checked against OUT_DIR (sha256,
    model hash, CRC-32)."""
    ck = fstore.FleetCheckpoint.load(fleet_dir)
    if ck is None:
        raise DataError(f"{fleet_dir} holds no fleet run (no {fstore.CHECKPOINT_JSON})")
    manifest, _, _ = read_compiled(out_dir)
    blob = ck.global_blob(manifest)
    console = Console(highlight=False, soft_wrap=True)
    for r in ck.history[1:]:
        _round_printer(console)(r)
    console.print(f"round {ck.round}: {fleet_dir / str(ck.blob)} valid ({len(blob.tensors)} "
                  f"tensors, CRC-32 ok)")
