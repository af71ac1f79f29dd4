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
from ..runtime.peak import measure_peaks
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
@click.option("--peak/--no-peak", default=True, show_default=True,
              help="measure this core's peak rates first (about a second) and print each "
                   "product's fraction of peak")
def profile_cmd(out_dir: Path, steps: int, warmup: int, variant: str, per_step: bool,
                peak: bool) -> None:
    """Time each kernel of OUT_DIR's training step (host build, random batches).

    \b
    Prints per kernel: schedule steps, median ms per training step, share of the step, the
    megabytes it reads and writes and their rate, and for the products of weight layers
    (dense/conv forward, dX, dW) the multiply-accumulates, their class (bit: XNOR-popcount of
    two 1-bit factors; int: u8 pixels or PO2 codes times a sign; float: a real-valued factor),
    the rate and its fraction of this core's peak for that class (measured by a probe loop,
    runtime/peak.py). Then the step's totals: MACs per class, bytes moved, and the time its
    products would take at peak against the time they took.
    The sum of the kernels is the step without the call's input copy. Times are the calling
    thread's CPU time; a --threads build is timed on the wall clock (its fraction of peak is
    against one core).
    \b
    Example:
      bnnc compile mlp -o out/mlp && bnnc profile out/mlp
      bnnc profile out/mlp --variant portable --steps-table
    """
    prof = profile(out_dir, steps=steps, warmup=warmup, extra_cflags=VARIANTS[variant])
    peaks = measure_peaks() if peak else None
    total = sum(s.ms for s in prof.steps)
    con = Console(highlight=False, soft_wrap=True)
    clock = f"wall clock, {prof.threads} threads" if prof.threads > 1 else "thread CPU time"
    con.print(f"{prof.model} ({prof.algorithm}, batch {prof.batch}, {variant} kernels, {clock}): "
              f"{total:.3f} ms in kernels, {prof.step_ms:.3f} ms per train_step call "
              f"(median of {steps})")
    if peaks:
        con.print(peaks.describe())
    t = Table(box=None, pad_edge=False)
    cols = ("kernel", "steps", "ms", "%", "MB", "GB/s", "class", "MMAC", "GMAC/s") + (
        ("% peak",) if peaks else ())
    for col in cols:
        t.add_column(col, justify="left" if col in ("kernel", "class") else "right")
    for r in prof.kernels():
        rate = r.macs / r.ms / 1e6 if r.macs and r.ms > 0 else 0.0
        row = [r.kernel, str(r.steps), f"{r.ms:.3f}", f"{100 * r.ms / total:.1f}" if total else "",
               f"{r.nbytes / 1e6:.2f}", f"{r.nbytes / r.ms / 1e6:.1f}" if r.ms > 0 else "",
               r.cls, f"{r.macs / 1e6:.1f}" if r.macs else "", f"{rate:.1f}" if rate else ""]
        if peaks:
            at_peak = sum(1e3 * n / peaks.mac_per_s[c] for c, n in r.macs_by_class.items())
            row.append(f"{100 * at_peak / r.ms:.1f}" if rate else "")
        t.add_row(*row)
    con.print(t)
    by = prof.macs_by_class()
    moved = sum(s.nbytes for s in prof.steps)
    line = (f"step: {by['bit'] / 1e6:.1f} M bit, {by['int'] / 1e6:.1f} M int, "
            f"{by['float'] / 1e6:.1f} M float multiply-accumulates; {moved / 1e6:.2f} MB read "
            f"and written")
    if peaks:
        prod_ms = sum(s.ms for s in prof.steps if s.macs)
        line += (f"; at this core's peak rates the products take {prof.ms_at_peak(peaks):.3f} ms "
                 f"of their {prod_ms:.3f} ms ({100 * prof.ms_at_peak(peaks) / prod_ms:.1f} % of "
                 f"peak), the other kernels {total - prod_ms:.3f} ms"
                 if prod_ms > 0 else "")
    con.print(line)
    if per_step:
        t = Table(box=None, pad_edge=False)
        for col in ("step", "layer", "function", "ms", "MMAC"):
            t.add_column(col, justify="right" if col in ("step", "ms", "MMAC") else "left")
        for s in prof.steps:
            t.add_row(str(s.index), s.layer, s.fn[:60], f"{s.ms:.3f}",
                      f"{s.macs / 1e6:.1f}" if s.macs else "")
        con.print(t)
