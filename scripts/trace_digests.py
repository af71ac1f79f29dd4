"""Digests of `bnnc check` traces: proof that a refactoring left the emitted programs' bits alone.

    python scripts/trace_digests.py DIR [CASE ...]      # writes DIR/<case>-<config>-<target>/ and
                                                        # DIR/digests.json, prints one line each
    python scripts/trace_digests.py --compare A.json B.json

For each case (zoo model, width, batch, targets) and each training configuration, the model is
compiled for every target, the debug build runs two training steps on a fixed random batch from the
reference's initial state (`--check-in`), and the whole `--check-out` trace -- every tensor after
every step, state before and after -- is hashed. Run it before and after a change and compare: equal
digests mean every target computes the same bits as before. Cases: mlp and cnv on host and rpi4
(QEMU), tfc (QONNX) on host and cortex-m7 (QEMU), resnete18, birealnet18 and binarynet (small
widths) on the host; configurations proposed, standard, proposed with Bop.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from bnnc.compiler.config import make_config
from bnnc.compiler.contract import read_manifest
from bnnc.compiler.frontend import load_model
from bnnc.compiler.pipeline import compile_to_c
from bnnc.compiler.target import load_target
from bnnc.compiler.zoo import build_zoo_model
from bnnc.runtime import reference as ref
from bnnc.runtime.trace import run_trace, trace_input

CASES = {   # name: (zoo kwargs, batch, targets)
    "mlp": (dict(name="mlp"), 100, ("host", "rpi4")),
    "cnv": (dict(name="cnv", width=0.125), 7, ("host", "rpi4")),
    "tfcq": (dict(name="tfc", fmt="qonnx", width=0.5), 16, ("host", "cortex-m7")),
    "resnete": (dict(name="resnete18", width=0.0625, image_size=32, num_classes=10), 3, ("host",)),
    "bireal": (dict(name="birealnet18", width=0.0625, image_size=32, num_classes=10), 3, ("host",)),
    "binarynet": (dict(name="binarynet", width=0.125), 5, ("host",)),
}
CONFIGS = {"proposed": ("proposed", {}), "standard": ("standard", {}),
           "proposed-bop": ("proposed", {"optimizer": "bop"})}
STEPS = 2


def digests(root: Path, cases: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for case in cases:
        kw, batch, targets = CASES[case]
        kw = dict(kw)
        graph = load_model(build_zoo_model(kw.pop("name"), **kw))
        for cname, (algorithm, extra) in CONFIGS.items():
            cfg = make_config(algorithm, batch=batch, **extra)
            rng = np.random.default_rng(3)
            batches = [((rng.integers(-128, 128, (batch,) + graph.input_shape) / 128.0)
                        .astype(np.float32),
                        rng.integers(0, graph.num_classes, batch).astype(np.int32))
                       for _ in range(STEPS)]
            for t in targets:
                d = root / f"{case}-{cname}-{t}"
                shutil.rmtree(d, ignore_errors=True)
                tgt = load_target(t)
                compile_to_c(graph, cfg, tgt, d)
                raw = run_trace(d, tgt, trace_input(read_manifest(d),
                                                    ref.init_state(graph, cfg).tensors, batches))
                out[d.name] = hashlib.sha256(raw).hexdigest()
                print(d.name, out[d.name][:16], len(raw), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dir", nargs="?", type=Path)
    ap.add_argument("cases", nargs="*", metavar="CASE", help=f"of {', '.join(CASES)} (default all)")
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"))
    args = ap.parse_args(argv)
    if args.compare:
        a, b = (json.loads(p.read_text()) for p in args.compare)
        diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        print(f"{len(a.keys() & b.keys()) - len(diff)} equal, {len(diff)} differ: {diff}")
        return 1 if diff else 0
    if args.dir is None:
        ap.error("give DIR (or --compare A B)")
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    args.dir.mkdir(parents=True, exist_ok=True)
    res = digests(args.dir, args.cases or list(CASES))
    (args.dir / "digests.json").write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
