"""`bnnc profile OUT/`: time every kernel of one compiled training step on the host.

This module parses the options and prints the tables; runtime/profile.py builds OUT's C with
-DBNNC_PROFILE, runs the steps and states the method.
"""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from ..runtime.host import KERNEL_VARIANTS as VARIANTS
from ..runtime.profile import profile
from .app import cli


@cli.command("profile")
@click.argument("out_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--steps", type=click.IntRange(min=1), default=10, show_default=True,
              help="timed training steps (the table shows each kernel's median)")
@click.option("--warmup", type=click.IntRange(min=0), default=2, show_default=True,
              help="untimed steps first")
@click.option("--variant", type=click.Choice(sorted(VARIANTS)), default="auto", show_default=True,
              help="x86-64 kernels: auto (the widest the CPU has: AVX-512, AVX2, SSE2), or cap the "
                   "run-time choice at avx2 / sse2, or the portable C (-DBNNC_NO_SIMD)")
@click.option("--steps-table", "per_step", is_flag=True,
              help="also print one row per schedule step (layer, C function)")
def profile_cmd(out_dir: Path, steps: int, warmup: int, variant: str, per_step: bool) -> None:
    """Time each kernel of OUT_DIR's training step (host build, random batches).

    \b
    Prints per kernel: schedule steps, median ms per training step, share of the step, and for
    the products of weight layers (dense/conv forward, dX, dW) the multiply-accumulates and the
    rate. The sum of the kernels is the step without the call's input copy. Times are the
    calling thread's CPU time; a --threads build is timed on the wall clock.
    \b
    Example:
      bnnc compile mlp -o out/mlp && bnnc profile out/mlp
      bnnc profile out/mlp --variant portable --steps-table
    """
    prof = profile(out_dir, steps=steps, warmup=warmup, extra_cflags=VARIANTS[variant])
    total = sum(s.ms for s in prof.steps)
    con = Console(highlight=False, soft_wrap=True)
    clock = f"wall clock, {prof.threads} threads" if prof.threads > 1 else "thread CPU time"
    con.print(f"{prof.model} ({prof.algorithm}, batch {prof.batch}, {variant} kernels, {clock}): "
              f"{total:.3f} ms in kernels, {prof.step_ms:.3f} ms per train_step call "
              f"(median of {steps})")
    t = Table(box=None, pad_edge=False)
    for col in ("kernel", "steps", "ms", "%", "MMAC", "GMAC/s"):
        t.add_column(col, justify="left" if col == "kernel" else "right")
    for k, n, ms, macs in prof.by_kernel():
        rate = f"{macs / ms / 1e6:.1f}" if macs and ms > 0 else ""
        t.add_row(k, str(n), f"{ms:.3f}", f"{100 * ms / total:.1f}" if total else "",
                  f"{macs / 1e6:.1f}" if macs else "", rate)
    con.print(t)
    if per_step:
        t = Table(box=None, pad_edge=False)
        for col in ("step", "layer", "function", "ms", "MMAC"):
            t.add_column(col, justify="right" if col in ("step", "ms", "MMAC") else "left")
        for s in prof.steps:
            t.add_row(str(s.index), s.layer, s.fn[:60], f"{s.ms:.3f}",
                      f"{s.macs / 1e6:.1f}" if s.macs else "")
        con.print(t)
