"""Ablations of the fleet's choices, fast: the federation of `bnnc fleet simulate` run in one
process without Flower (no Ray, no messages), over the same runtime/fleet*.py functions --
partition, device_start's rule (the device's own optimizer state + the global tensors),
train_host with the same batch-order key, aggregate, the 1-bit uplink, calibration_stats and
pool_bn_stats -- so a 20-round MNIST run takes minutes. With `--bn-stats mean` it reproduces
`benchmarks/fleet.py --bn-stats mean`'s global accuracy round for round (93.85 % after 20 rounds).

Options beyond `bnnc fleet` (the ablations): `--adam reset` (every round starts Adam's moments
and bias-correction count from zero) or `avg` (the moments averaged, `--share-moments`),
`--server-momentum` (FedAvgM: the server's step is a momentum of the averaged updates),
`--pool naive` (psi pooled as the plain mean of the devices' psi, not about the global mean).

    nice -n 10 python benchmarks/fleet_ablation.py --bn-stats mean          # FedAvg as before
    nice -n 10 python benchmarks/fleet_ablation.py                          # calibrate (default)
    nice -n 10 python benchmarks/fleet_ablation.py --pool naive
    nice -n 10 python benchmarks/fleet_ablation.py --adam reset
    nice -n 10 python benchmarks/fleet_ablation.py --server-momentum 0.9
    nice -n 10 python benchmarks/fleet_ablation.py --uplink sign [--no-error-feedback]

Prints the global test accuracy after every round; `--json F` writes them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from bnnc.cli import main as bnnc_main
from bnnc.compiler.numerics import store
from bnnc.runtime import fleet as fl
from bnnc.runtime import fleet_local as flocal
from bnnc.runtime.datasets import training_data
from bnnc.runtime.host import HostProgram
from bnnc.runtime.outdir import load_init_state, read_compiled


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/bnnc-fleet-ablation/out"),
                    help="compiled here (zoo mlp, B=100) unless it exists")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bn-stats", choices=("calibrate", "mean"), default="calibrate")
    ap.add_argument("--calibration-batches", type=int, default=20)
    ap.add_argument("--pool", choices=("global", "naive"), default="global")
    ap.add_argument("--adam", choices=("carry", "reset", "avg"), default="carry")
    ap.add_argument("--server-momentum", type=float, default=0.0)
    ap.add_argument("--uplink", choices=fl.UPLINKS, default="full")
    ap.add_argument("--no-error-feedback", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()

    if not (a.out / "bnnc_manifest.json").is_file():
        if bnnc_main(["compile", "mlp", "--batch", "100", "-o", str(a.out)]) != 0:
            return 1
    manifest, graph, cfg = read_compiled(a.out)
    _, x, y, x_test, y_test = training_data(graph, "mnist", None, None, manifest.preprocess)
    prog = HostProgram(a.out, target="host", debug=False)
    init = dict(load_init_state(a.out, graph, cfg))
    parts = fl.partition(y, a.devices, "dirichlet", alpha=a.alpha, seed=a.seed,
                         min_examples=manifest.batch)
    specs = fl.fleet_tensors(manifest, a.bn_stats, moments=a.adam == "avg")
    cal_specs = fl.bn_stat_tensors(manifest)
    moments = [st.name for st in manifest.state if st.role == "optimizer state"]
    ef = a.uplink == "sign" and not a.no_error_feedback

    devices = [(dict(init), 0) for _ in parts]          # each device's state and step count
    residual: list[dict | None] = [None] * len(parts)
    full = dict(init)
    glob = {ft.name: np.asarray(init[ft.name], np.float32) for ft in specs}
    velocity = {ft.name: np.zeros(ft.shape) for ft in specs}
    accs, t0 = [], time.time()
    for r in range(1, a.rounds + 1):
        ups = []
        for pid, idx in enumerate(parts):
            tensors, step = devices[pid]
            tensors = {**tensors, **glob}
            if a.adam == "reset":
                tensors.update({n: np.zeros_like(tensors[n]) for n in moments})
                step = 0
            res = flocal.train_host(prog, tensors, step, cfg.seed, x[idx], y[idx], epochs=1,
                                    order_key=(a.seed, r, pid))
            devices[pid] = (res.tensors, step + res.steps)
            local = {ft.name: res.tensors[ft.name] for ft in specs}
            if a.uplink == "sign":
                wire = fl.encode_update(local, glob, specs, "sign", residual=residual[pid])
                if ef:
                    residual[pid] = fl.feedback_residual(local, glob, specs, wire, residual[pid])
                local = fl.decode_update(wire, glob, specs, "sign")
            ups.append(fl.Update(pid, len(idx), local))
        new = fl.aggregate(glob, ups, specs)
        if a.server_momentum:
            for ft in specs:
                if ft.kind == "param" and ft.rule == "mean":
                    step_ = np.asarray(new[ft.name], np.float64) - glob[ft.name]
                    velocity[ft.name] = a.server_momentum * velocity[ft.name] + step_
                    new[ft.name] = store((glob[ft.name] + velocity[ft.name]).astype(np.float32),
                                         ft.dtype).astype(np.float32)
        glob = new
        full.update(glob)
        if a.bn_stats == "calibrate":
            cals = []
            for pid, idx in enumerate(parts):
                stats, _ = flocal.calibration_stats(prog, full, x[idx], y[idx], cal_specs,
                                                    batches=a.calibration_batches,
                                                    momentum=cfg.bn_momentum,
                                                    order_key=(a.seed, r, pid, 0xCA1))
                cals.append(fl.Calibration(pid, len(idx), stats))
            full.update(fl.pool_bn_stats(cals, cal_specs) if a.pool == "global"
                        else _naive_pool(cals, cal_specs))
        accs.append(flocal.evaluate(prog, full, x_test, y_test, seed=cfg.seed))
        print(f"round {r}: test acc {100 * accs[-1]:.2f} %  ({time.time() - t0:.0f} s)",
              flush=True)
    if a.json:
        a.json.write_text(json.dumps({"argv": sys.argv, "test_acc": accs}, indent=1) + "\n")
    return 0


def _naive_pool(cals, specs) -> dict:
    """Every statistic the example-weighted mean of the devices' (psi about their own means)."""
    w = np.asarray([c.examples for c in cals], np.float64)
    w /= w.sum()
    return {ft.name: store(sum(wi * np.asarray(c.stats[ft.name], np.float64)
                               for wi, c in zip(w, cals)).astype(np.float32),
                           ft.dtype).astype(np.float32) for ft in specs}


if __name__ == "__main__":
    sys.exit(main())
