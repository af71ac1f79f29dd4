"""Federated against centralised training of the emitted C, measured side by side in one run.

The zoo MLP (proposed algorithm, B=100, Adam) compiled for the host; a fleet of D simulated devices
(Flower's simulation runtime, `bnnc fleet simulate`) with MNIST split non-IID by Dirichlet(alpha)
over the labels trains R rounds x 1 local epoch, once with the full uplink (16-bit latent weights)
and once with the 1-bit uplink (sign + per-tensor scale, error feedback on the devices), both with
bnnc fleet's defaults (the global model's BN statistics calibrated on the devices each round;
`--bn-stats mean`, `--no-error-feedback` and `--server-lr` give the ablations); the same compiled
program trains
centrally on the same examples (every device's partition, i.e. the whole training split) for R
epochs. Printed: global test accuracy after every round / epoch, the final gaps, and the bytes on
the wire per device and round next to a float32 copy of the same network's parameters.

    nice -n 10 python benchmarks/fleet.py                       # the issue's setting (20 rounds)
    nice -n 10 python benchmarks/fleet.py --rounds 3 --limit 6000   # a quick look

Results go to benchmarks/results/fleet.md and .json (with the command, machine and load).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path


from bnnc.cli import main as bnnc_main
from bnnc.runtime import fleet as fl
from bnnc.runtime import fleet_local as flocal
from bnnc.runtime.datasets import training_data
from bnnc.runtime.fleet_flower import FleetSettings
from bnnc.runtime.fleet_run import simulate
from bnnc.runtime.host import HostProgram
from bnnc.runtime.outdir import load_init_state, read_compiled


def central(out: Path, data: str, data_dir: str | None, limit: int | None, epochs: int,
            seed: int, calibration_batches: int) -> tuple[list[float], list[float]]:
    """Test accuracy after each epoch of centralised training (the fleet's batch order rule):
    with the program's own running BN statistics (the baseline), and with them recalibrated
    like the fleet's global model (calibration_stats on `calibration_batches` batches of the
    whole training set: the fleet's batches per device times its devices)."""
    manifest, graph, cfg = read_compiled(out)
    _, x, y, x_test, y_test = training_data(graph, data, data_dir, limit, manifest.preprocess)
    prog = HostProgram(out, target="host", debug=False)
    tensors, step, accs, cal_accs = dict(load_init_state(out, graph, cfg)), 0, [], []
    specs = fl.bn_stat_tensors(manifest)
    for e in range(epochs):
        res = flocal.train_host(prog, tensors, step, cfg.seed, x, y, epochs=1,
                                order_key=(seed, e + 1, 0xCE))
        tensors, step = res.tensors, step + res.steps
        accs.append(flocal.evaluate(prog, tensors, x_test, y_test, seed=cfg.seed))
        stats, _ = flocal.calibration_stats(prog, tensors, x, y, specs, batches=calibration_batches,
                                            momentum=cfg.bn_momentum, order_key=(seed, e + 1, 0xCA))
        cal = fl.pool_bn_stats([fl.Calibration(0, len(x), stats)], specs)
        cal_accs.append(flocal.evaluate(prog, {**tensors, **cal}, x_test, y_test, seed=cfg.seed))
        print(f"  central epoch {e + 1}: test acc {100 * accs[-1]:.2f} % (BN statistics "
              f"recalibrated: {100 * cal_accs[-1]:.2f} %)", flush=True)
    return accs, cal_accs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--lr", default=None, help="compile with this --lr (default: bnnc's)")
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--data", default="mnist")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--limit", type=int, default=None, help="first N training examples only")
    ap.add_argument("--uplinks", default="full,sign")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--server-lr", type=float, default=1.0)
    ap.add_argument("--share-moments", action="store_true")
    ap.add_argument("--bn-stats", default="calibrate", choices=fl.BN_STATS)
    ap.add_argument("--calibration-batches", type=int, default=20)
    ap.add_argument("--no-error-feedback", action="store_true")
    ap.add_argument("--no-central", action="store_true",
                    help="skip the central run (an ablation next to an earlier one)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bnnc-bench-fleet"))
    ap.add_argument("--results", type=Path,
                    default=Path(__file__).resolve().parent / "results" / "fleet")
    args = ap.parse_args()

    shutil.rmtree(args.work, ignore_errors=True)
    out = args.work / "out"
    lr = ["--lr", args.lr] if args.lr else []
    if bnnc_main(["compile", args.model, "--batch", str(args.batch), *lr, "-o", str(out)]) != 0:
        return 1
    manifest, _, _ = read_compiled(out)
    t0 = time.time()
    fleets: dict[str, list[dict]] = {}
    seconds: dict[str, float] = {}
    for uplink in args.uplinks.split(","):
        s = FleetSettings(out=str(out), fleet_dir=str(args.work / f"fleet-{uplink}"),
                          rounds=args.rounds, devices=args.devices, partition="dirichlet",
                          alpha=args.alpha, seed=args.seed, uplink=uplink, data=args.data,
                          server_lr=args.server_lr, share_moments=args.share_moments,
                          bn_stats=args.bn_stats, calibration_batches=args.calibration_batches,
                          error_feedback=not args.no_error_feedback,
                          data_dir=args.data_dir or "", limit=args.limit or 0)
        print(f"fleet, {uplink} uplink:", flush=True)
        t = time.time()
        ck = simulate(s, on_round=lambda r: print(
            f"  round {r['round']}: {len(r['devices'])} devices, test acc "
            f"{100 * r['test_acc']:.2f} %", flush=True))
        seconds[uplink] = time.time() - t
        fleets[uplink] = [r for r in ck.history if r["round"] > 0]
    print("central:", flush=True)
    t = time.time()
    cen, cen_cal = (([float("nan")] * args.rounds,) * 2 if args.no_central else
                    central(out, args.data, args.data_dir, args.limit, args.rounds, args.seed,
                            args.devices * args.calibration_batches))
    seconds["central"] = time.time() - t

    rows = []
    for i in range(args.rounds):
        rows.append([i + 1] + [100 * fleets[u][i]["test_acc"] for u in fleets]
                    + [100 * cen[i], 100 * cen_cal[i]])
    last = {u: 100 * fleets[u][-1]["test_acc"] for u in fleets}
    r0 = next(iter(fleets.values()))[0]
    doc = {"command": " ".join(["python", *sys.argv]), "machine": platform.processor() or
           platform.machine(), "cpus": os.cpu_count(), "load_avg": os.getloadavg(),
           "model": args.model, "batch": args.batch, "server_lr": args.server_lr, "lr": args.lr,
           "share_moments": args.share_moments, "bn_stats": args.bn_stats,
           "calibration_batches": args.calibration_batches,
           "error_feedback": not args.no_error_feedback,
           "devices": args.devices, "alpha": args.alpha,
           "rounds": args.rounds, "limit": args.limit, "model_sha256": manifest.model_sha256,
           "fleet": fleets, "central": cen, "central_recalibrated": cen_cal,
           "seconds": seconds,
           "wall_seconds": time.time() - t0}
    lines = [f"# Fleet vs central ({args.model}, {args.data}, {args.devices} devices, Dirichlet "
             f"alpha={args.alpha}, {args.rounds} rounds x 1 epoch, BN statistics "
             f"{args.bn_stats}, error feedback {'off' if args.no_error_feedback else 'on'}, "
             f"server lr {args.server_lr})",
             "",
             f"`{doc['command']}` ({os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f})", "",
             "| round / epoch | " + " | ".join(f"fleet, {u} uplink" for u in fleets)
             + " | central | central, BN recalibrated |", "|---" * (len(fleets) + 3) + "|"]
    lines += ["| " + " | ".join([str(r[0])] + [f"{v:.2f} %" for v in r[1:]]) + " |"
              for r in rows]
    lines += ["", "| | test acc | gap to central | gap to central, BN recalibrated |",
              "|---|---|---|---|"]
    lines += [f"| fleet, {u} uplink | {last[u]:.2f} % | {100 * cen[-1] - last[u]:+.2f} pp | "
              f"{100 * cen_cal[-1] - last[u]:+.2f} pp |" for u in fleets]
    lines += [f"| central | {100 * cen[-1]:.2f} % | | |",
              f"| central, BN recalibrated | {100 * cen_cal[-1]:.2f} % | | |", "",
              "| bytes per device and round | |", "|---|---|",
              f"| downlink (global fleet tensors) | {r0['downlink_bytes_per_device']:,} |"]
    lines += [f"| uplink, {u} | {fleets[u][0]['uplink_bytes_per_device']:,} |" for u in fleets]
    if "calibration_downlink_bytes_per_device" in r0:
        lines += [f"| calibration downlink (the new global fleet tensors) | "
                  f"{r0['calibration_downlink_bytes_per_device']:,} |",
                  f"| calibration uplink (BN statistics, float32) | "
                  f"{r0['calibration_uplink_bytes_per_device']:,} |"]
    lines += [f"| float32 parameters of the same network | {r0['float32_model_bytes']:,} |", "",
              "wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())]
    text = "\n".join(lines) + "\n"
    print(text)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.with_suffix(".md").write_text(text)
    args.results.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
