"""Instructions per training step under QEMU Cortex-A72: NEON kernels vs the portable C.

Input: a zoo model (--model, the MLP 784-256x4-10 by default; full width unless --width),
compiled for the rpi4 target, standard and proposed (--algorithms). Output: a Markdown table on
stdout, one row per algorithm: instructions per step of the standalone trainer built as the
target builds it (NEON kernels) and built with -DBNNC_NO_SIMD (the portable C of the same
sources, which GCC still auto-vectorizes for AArch64; `--neon-only` skips it), and their ratio.

    python benchmarks/insns_a72.py [--model mlp] [--steps 2] [--batch 100] [--width 1.0]
                                   [--algorithms standard,proposed] [--neon-only] [--target rpi4]
    python benchmarks/insns_a72.py --model cnv --algorithms proposed --steps 1 --neon-only

Method: runtime/insncount.py runs the trainer under the target's emulator (`qemu-aarch64 -cpu
cortex-a72`) with bnnc's TCG plugin, once for 0 steps and once for --steps steps on the same
packed dataset (random inputs on the 1/128 grid, runtime/packed.py) and the same initial state;
(count(N) - count(0)) / N cancels start-up, so a step is the training step plus reading its batch
from the file. Counts are exact and deterministic (no timing involved), so one run suffices.
`measure()` is the entry point other benchmarks import.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bnnc.compiler.target import load_target
from bnnc.compiler.config import make_config
from bnnc.compiler.frontend import load_model
from bnnc.compiler.pipeline import compile_to_c
from bnnc.compiler.zoo import ZOO, build_zoo_model
from bnnc.runtime import packed
from bnnc.runtime import reference as ref
from bnnc.runtime.insncount import count_instructions
from bnnc.runtime.state_blob import state_values_f32
from bnnc.compiler.contract import read_manifest
from bnnc.runtime.programs import build_trainer, emulator_argv

VARIANTS = (("NEON", ()), ("portable", ("-DBNNC_NO_SIMD",)))


@dataclass(frozen=True)
class Row:
    algorithm: str
    batch: int
    insns: dict[str, int]        # variant name -> instructions per step

    @property
    def ratio(self) -> float | None:
        return self.insns["portable"] / self.insns["NEON"] if "portable" in self.insns else None


def insns_per_step(out_dir: Path, target, data: Path, init: Path, steps: int,
                   extra_cflags: tuple[str, ...] = (), cache: Path | None = None) -> int:
    """(instructions of `steps` steps - instructions of 0 steps) // steps of OUT/trainer.c."""
    exe = build_trainer(out_dir, target, extra_cflags=extra_cflags, cache=cache)
    base = [str(exe), "--train", str(data), "--init", str(init)]
    # a trainer that reads the clock would execute a time-dependent number of instructions
    if "--no-clock" in (out_dir / read_manifest(out_dir).trainer).read_text():
        base.append("--no-clock")
    counts = []
    for n in (0, steps):
        insns, proc = count_instructions(emulator_argv(target), [*base, "--steps", str(n)],
                                         timeout=7200)
        if proc.returncode != 0:
            raise RuntimeError(f"the trainer failed under QEMU (exit {proc.returncode}): "
                               f"{(proc.stdout + proc.stderr).strip()[-1000:]}")
        counts.append(insns)
    return (counts[1] - counts[0]) // steps


def measure(*, batch: int = 100, steps: int = 2, width: float = 1.0, target: str = "rpi4",
            algorithms=("standard", "proposed"), work: Path | None = None, model: str = "mlp",
            variants=VARIANTS) -> list[Row]:
    tgt = load_target(target)
    graph = load_model(build_zoo_model(model, width=width))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bnnc-insns-") as tmp:
        root = Path(work or tmp)
        rng = np.random.default_rng(0)
        data = root / "data.bnnd"
        n = batch * (steps + 1)
        x = (rng.integers(-128, 128, (n,) + graph.input_shape) / 128.0).astype(np.float32)
        packed.pack(data, x, rng.integers(0, graph.num_classes, n), graph.num_classes)
        for algorithm in algorithms:
            cfg = make_config(algorithm, batch=batch)
            out = root / f"{algorithm}-{target}"
            compile_to_c(graph, cfg, tgt, out, command="benchmarks/insns_a72.py")
            init = out / "init.f32"
            init.write_bytes(state_values_f32(read_manifest(out),
                                              ref.init_state(graph, cfg).tensors))
            rows.append(Row(algorithm, batch, {
                name: insns_per_step(out, tgt, data, init, steps, flags, cache=root / "cache")
                for name, flags in variants}))
    return rows


def format_table(rows: list[Row], target: str, width: float, model: str = "mlp") -> str:
    emu = " ".join(load_target(target).emulator)
    what = "MLP 784-256x4-10" if model == "mlp" else model
    lines = [f"{what} (width {width}), instructions per training step, `{emu}`\n",
             "| algorithm | batch | NEON kernels | portable C (-DBNNC_NO_SIMD) | portable / NEON |",
             "|---|---|---|---|---|"]
    for r in rows:
        port = f"{r.insns['portable']:,}" if r.ratio is not None else "(not run)"
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else ""
        lines.append(f"| {r.algorithm} | {r.batch} | {r.insns['NEON']:,} | {port} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2, help="steps counted (minus a 0-step run)")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--model", default="mlp", choices=sorted(ZOO), help="a zoo model")
    ap.add_argument("--width", type=float, default=1.0, help="zoo model width multiplier")
    ap.add_argument("--algorithms", default="standard,proposed",
                    help="comma-separated: standard, proposed")
    ap.add_argument("--neon-only", action="store_true",
                    help="count only the NEON build (the portable C of a CNV step takes minutes)")
    ap.add_argument("--target", default="rpi4", help="a targets/ name with simd = [\"neon\"]")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    algorithms = tuple(a for a in args.algorithms.split(",") if a)
    if not algorithms or set(algorithms) - {"standard", "proposed"}:
        ap.error("--algorithms takes standard and/or proposed")
    rows = measure(batch=args.batch, steps=args.steps, width=args.width, target=args.target,
                   algorithms=algorithms, model=args.model,
                   variants=VARIANTS[:1] if args.neon_only else VARIANTS)
    print(format_table(rows, args.target, args.width, args.model))


if __name__ == "__main__":
    main()
