"""The two ways to run a bnnc fleet's Flower apps (runtime/fleet_flower.py): `simulate` (`bnnc
fleet simulate`: Flower's simulation runtime, one virtual SuperNode per device), and real Flower
processes -- the Flower App directory `flwr run` submits (`write_app`, `bnnc fleet app`) and
`LocalFederation` / `deploy_local` (`bnnc fleet deploy`): a `flower-superlink`, one
`flower-supernode` per device and `flwr run`, here on loopback; on Raspberry Pis by the README's
recipe.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")      # before flwr is imported

from flwr.app import Context  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402
import tomli_w  # noqa: E402

from ..compiler.errors import ConfigError, DataError  # noqa: E402
from . import fleet_store as fstore  # noqa: E402
from .fleet_flower import (APP_MODULE, FLOWER_VERSION, DeviceDefaults,  # noqa: E402
                           FleetServer, FleetSettings, make_client_app, run_server)


def simulate(s: FleetSettings, device: DeviceDefaults | None = None,
             on_round: Callable[[dict], None] | None = None, *, cpus_per_device: float = 1.0,
             verbose: bool = False) -> fstore.FleetCheckpoint:
    """Run the fleet with Flower's simulation runtime (Ray): `s.devices` virtual SuperNodes on
    this machine. Returns the committed checkpoint."""
    s.check()
    device = device or DeviceDefaults()
    if not device.out:
        device = DeviceDefaults(**{**asdict(device), "out": s.out})
    if not device.data_dir and s.data_dir:
        device = DeviceDefaults(**{**asdict(device), "data_dir": s.data_dir})
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    failure: list[BaseException] = []
    state = FleetServer(s, on_round)    # OUT/, the data, --fleet-dir: checked before Ray starts
    if state.ck.round >= s.rounds:
        return state.ck
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            run_server(grid, s, on_round, state)
        except BaseException as err:      # re-raised below, outside Flower's thread
            failure.append(err)
            raise

    run_simulation(server_app=server, client_app=make_client_app(device, s.out, s.fleet_dir),
                   num_supernodes=s.devices,
                   backend_config={"client_resources": {"num_cpus": cpus_per_device,
                                                        "num_gpus": 0.0},
                                   "init_args": {"logging_level": "ERROR",
                                                 "log_to_driver": verbose}},
                   verbose_logging=verbose)
    if failure:
        raise failure[0]
    ck = fstore.FleetCheckpoint.load(Path(s.fleet_dir))
    if ck is None or ck.round < s.rounds:
        done = 0 if ck is None else ck.round
        raise DataError(f"the simulation stopped after {done} of {s.rounds} rounds",
                        hint="rerun with --verbose to see Flower's log")
    return ck



def write_app(app_dir: Path, s: FleetSettings) -> Path:
    """APP_DIR/pyproject.toml + APP_DIR/bnnc_fleet_app.py: the Flower App `flwr run` submits
    (its run config = `s`; `flwr run APP --run-config 'rounds=5'` overrides)."""
    app_dir = Path(app_dir)
    app_dir.mkdir(parents=True, exist_ok=True)
    doc = {"build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
           "project": {"name": "bnnc-fleet", "version": "1.0.0",
                       "description": "Federated training of a bnnc-compiled trainer",
                       "license": "Apache-2.0", "dependencies": [f"flwr>={FLOWER_VERSION}"]},
           "tool": {"flwr": {"app": {"publisher": "bnnc",
                                     "components": {"serverapp": f"{APP_MODULE}:server_app",
                                                    "clientapp": f"{APP_MODULE}:client_app"},
                                     "config": s.run_config()}}}}
    (app_dir / "pyproject.toml").write_text(tomli_w.dumps(doc))
    (app_dir / f"{APP_MODULE}.py").write_text(
        '"""A bnnc fleet as a Flower App (written by `bnnc fleet app`)."""\n'
        "from bnnc.runtime.fleet_flower import make_client_app, make_server_app\n\n"
        "server_app = make_server_app()\n"
        "client_app = make_client_app()\n")
    return app_dir


def flower_executable(name: str) -> str:
    """A Flower command next to this Python (its venv), else on PATH."""
    here = Path(sys.executable).parent / name
    if here.is_file():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise ConfigError(f"{name} not found", hint=f"pip install 'flwr[simulation]=="
                                                    f"{FLOWER_VERSION}'")
    return found


def node_config(pid: int, devices: int, **extra: Any) -> str:
    """A --node-config string (TOML values: strings quoted)."""
    parts = [f"partition-id={pid}", f"num-partitions={devices}"]
    for k, v in extra.items():
        if v is None or v == "":
            continue
        val = str(v).lower() if isinstance(v, bool) else (
            v if isinstance(v, (int, float)) else '"' + str(v).replace('"', '') + '"')
        parts.append(f"{k}={val}")
    return " ".join(parts)


def wait_port(port: int, *, timeout: float) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:PORT."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise DataError(f"nothing listens on 127.0.0.1:{port} after {timeout:g} s",
                                hint="see the flower-superlink log") from None
            time.sleep(0.3)


class LocalFederation:
    """A real Flower federation on loopback: one `flower-superlink` and one `flower-supernode`
    per device, each a process group of its own (so a device can be killed), logs under WORK/."""

    def __init__(self, work: Path, *, port: int):
        self.work = Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.home = self.work / "flwr-home"
        self.home.mkdir(exist_ok=True)
        (self.home / "config.toml").write_text(
            '[superlink]\ndefault = "bnnc-local"\n\n[superlink.bnnc-local]\n'
            f'address = "127.0.0.1:{port}"\ninsecure = true\n')
        # Flower's components start each other by name (flower-superexec): this Python's first
        bindir = str(Path(sys.executable).parent)
        self.env = dict(os.environ, FLWR_HOME=str(self.home), FLWR_TELEMETRY_ENABLED="0",
                        PATH=bindir + os.pathsep + os.environ.get("PATH", ""))
        self.procs: dict[str, subprocess.Popen] = {}

    def _start(self, key: str, argv: list[str]) -> subprocess.Popen:
        logf = open(self.work / f"{key}.log", "w")
        p = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env=self.env, cwd=self.work, start_new_session=True)
        logf.close()
        self.procs[key] = p
        return p

    def start_superlink(self) -> None:
        self._start("superlink", [flower_executable("flower-superlink"), "--insecure",
                                  "--port", str(self.port),
                                  "--disable-runtime-dependency-installation"])

    def start_supernode(self, pid: int, devices: int, *, port: int, **node: Any) -> None:
        self._start(f"supernode-{pid}", [flower_executable("flower-supernode"), "--insecure",
                                         "--superlink", f"127.0.0.1:{self.port}",
                                         "--port", str(port),
                                         "--node-config", node_config(pid, devices, **node)])

    def kill(self, key: str) -> None:
        """SIGKILL a component and everything it started (its ClientApp process)."""
        p = self.procs[key]
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()

    def log_text(self, key: str) -> str:
        path = self.work / f"{key}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def run(self, app_dir: Path, *, timeout: float, run_config: str | None = None
            ) -> subprocess.CompletedProcess:
        """`flwr run APP bnnc-local --stream` (after the SuperLink answers); its output in
        WORK/flwr-run.log."""
        argv = [flower_executable("flwr"), "run", str(app_dir), "bnnc-local", "--stream"]
        if run_config:
            argv += ["--run-config", run_config]
        wait_port(self.port, timeout=60.0)
        res = subprocess.run(argv, capture_output=True, text=True, env=self.env,
                             stdin=subprocess.DEVNULL, cwd=self.work, timeout=timeout)
        (self.work / "flwr-run.log").write_text(res.stdout + res.stderr)
        return res

    def stop(self) -> None:
        for key in list(self.procs):
            p = self.procs[key]
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.kill(key)

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def deploy_local(s: FleetSettings, work: Path, *, port: int = 19090,
                 device: DeviceDefaults | None = None, timeout: float = 3600.0
                 ) -> fstore.FleetCheckpoint:
    """`bnnc fleet deploy`: a SuperLink and `s.devices` SuperNodes on loopback, `flwr run`."""
    s.check()
    device = device or DeviceDefaults()
    app = write_app(Path(work) / "app", s)
    with LocalFederation(Path(work), port=port) as fed:
        fed.start_superlink()
        for pid in range(s.devices):
            fed.start_supernode(pid, s.devices, port=port + 10 + pid, out=device.out or s.out,
                                workdir=str(Path(s.fleet_dir) / "devices" / f"device-{pid}"),
                                **{"data-dir": device.data_dir or s.data_dir,
                                   "emulate": device.emulate or None,
                                   "device": device.device})
        res = fed.run(app, timeout=timeout)
    ck = fstore.FleetCheckpoint.load(Path(s.fleet_dir))
    if res.returncode != 0 or ck is None or ck.round < s.rounds:
        tail = (res.stdout + res.stderr).strip().splitlines()[-5:]
        raise DataError(f"the deployed fleet stopped after {0 if ck is None else ck.round} of "
                        f"{s.rounds} rounds: {' | '.join(tail)}",
                        hint=f"logs: {work}/*.log")
    return ck

