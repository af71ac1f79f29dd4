"""`bnnc compile` (ONNX -> static C training program) and `bnnc check` (emitted C vs numpy
reference).

`bnnc compile MODEL -o OUT/ [--target host] [--algorithm ...] [--batch N] [technique switches]` runs
frontend -> schedule -> liveness -> planner -> codegen and writes OUT/<model>.h, OUT/<model>.c,
OUT/Makefile, OUT/plan.json (the planner's report document, readable by `bnnc inspect OUT/`),
OUT/report.txt (the memory tables and the kernels used) and OUT/bnnc_manifest.json.

`bnnc check MODEL [--target T] [--steps K] [--batch N] ...` compiles into a temporary (or --keep)
directory, builds the C (host: in-process through cffi; cross targets: the debug trainer under QEMU,
runtime/trace.py) and compares K steps tensor by tensor with runtime/reference.py (runtime/check.py
states the rules). Exit 0 when every tensor is within tolerance, 1 when not.

MODEL is an ONNX/QONNX file or a zoo name (`bnnc zoo --list`); zoo names take --width.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import click

from ..compiler.config import ALGORITHMS, make_config
from ..compiler.errors import ConfigError
from ..compiler.planner import DEFAULT_GUARD_BYTES
from ..compiler.target import Target, load_target, parse_size
from ..runtime.check import debug_target, format_report, run_check
from ..compiler.preprocess import SPEC_HELP
from ..runtime.outdir import compile_graph, load_graph, model_bytes, model_preprocess
from .app import cli
from .memory_cmds import technique_options
from .train_cmds import lr_help, optimizer_options

# the technique switches of `bnnc inspect` / `bnnc train` (unset = the algorithm's default)
_TECHNIQUES = ("optimizer", "binary_dw", "po2", "po2_bias", "bn", "state_dtype", "save_bits",
               "bop_gamma", "bop_threshold", "bn_momentum")


def _config(algorithm: str | None, batch: int | None, lr: float | None, seed: int,
            default_batch: int, techniques: dict):
    given = {k: v for k, v in techniques.items() if v is not None and k in _TECHNIQUES}
    return make_config(algorithm or "proposed", batch=default_batch if batch is None else batch,
                       lr=lr, seed=seed, **given)


def _canonical_command(verb: str, model: str, cfg, target: str, width: float | None,
                       ram: str | None = None, flash: str | None = None) -> str:
    """The command line as written into generated files: only what decides their content."""
    parts = [f"bnnc {verb}", Path(model).name, f"--target {target}", f"--algorithm {cfg.algorithm}",
             f"--batch {cfg.batch}", f"--optimizer {cfg.optimizer}"]
    if width is not None:
        parts.append(f"--width {width:g}")
    parts += [f"--ram {ram}"] if ram else []
    parts += [f"--flash {flash}"] if flash else []
    return " ".join(parts)


def _common(f):
    opts = [
        click.argument("model"),
        click.option("--target", default="host", show_default=True,
                     help="target description targets/<name>.toml"),
        click.option("--algorithm", type=click.Choice(ALGORITHMS), default=None,
                     help="training algorithm [default: proposed]"),
        click.option("--batch", type=click.IntRange(min=1), default=None,
                     help="batch size compiled into the program"),
        click.option("--lr", type=float, default=None, help=lr_help()),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="seed of the stochastic rounding"),
        click.option("--width", type=float, default=None,
                     help="zoo models: scale every width/channel count"),
        click.option("--ram", default=None, metavar="SIZE",
                     help="bare-metal targets: RAM budget, e.g. 256K [default: the target's]"),
        click.option("--flash", default=None, metavar="SIZE",
                     help="bare-metal targets: flash budget, e.g. 1M [default: the target's]"),
    ]
    f = technique_options(optimizer_options(f))
    for o in reversed(opts):
        f = o(f)
    return f


def budget_target(name: str, ram: str | None, flash: str | None) -> Target:
    """targets/<name>.toml with --ram/--flash applied (bare-metal targets only)."""
    tgt = load_target(name)
    if ram is None and flash is None:
        return tgt
    if tgt.kind != "baremetal":
        raise ConfigError(f"--ram/--flash set the budget of bare-metal targets; {tgt.name} is "
                          f"{tgt.kind}", hint="drop them or pick --target cortex-m7/cortex-m4")
    changes = {}
    if ram is not None:
        changes["ram"] = parse_size(ram, "--ram")
    if flash is not None:
        changes["flash"] = parse_size(flash, "--flash")
    return dataclasses.replace(tgt, **changes)


@cli.command("compile")
@_common
@click.option("-o", "--out", "out_dir", required=True,
              type=click.Path(file_okay=False, path_type=Path), help="output directory")
@click.option("--guard", is_flag=True,
              help="debug build: canary bytes around every arena buffer, checked after every "
                   "kernel (a kernel writing outside its tensors stops the program, naming it)")
@click.option("--preprocess", default=None, metavar="SPEC",
              help=f"u8 pixel -> model input, recorded in OUT and used by run, eval, export and "
                   f"the trainers: {SPEC_HELP} [default: what the model file records, else "
                   "symmetric with a notice]")
def compile_cmd(model: str, target: str, algorithm: str | None, batch: int | None, lr: float | None,
                seed: int, width: float | None, out_dir: Path, ram: str | None, flash: str | None,
                guard: bool, preprocess: str | None, **techniques) -> None:
    """Compile MODEL into a static, malloc-free C99 training program in OUT.

    
    Targets (targets/<name>.toml): host (shared library + native trainer), rpi4 / rpi3 (static
    aarch64 trainer, NEON), cortex-m7 / cortex-m4 (bare-metal ELF, RAM/flash budget checked).
    
    Examples:
      bnnc compile mlp --target host -o out/mlp
      bnnc compile model.onnx --target rpi4 -o out/pi
      bnnc compile tfc --target cortex-m7 --ram 256K --batch 10 --optimizer bop -o out/m7
    """
    tgt = budget_target(target, ram, flash)
    cfg = _config(algorithm, batch, lr, seed, 100, techniques)
    graph = load_graph(model, width=width)
    source = model_bytes(model, width=width)
    pre = model_preprocess(source, model, preprocess)
    command = _canonical_command("compile", model, cfg, tgt.name, width, ram, flash) \
        + (" --guard" if guard else "") + (f" --preprocess {pre.spec()}" if preprocess else "")
    c, written = compile_graph(graph, cfg, tgt, out_dir, command, source,
                               guard_bytes=DEFAULT_GUARD_BYTES if guard else 0, preprocess=pre)
    click.echo(f"{graph.name}: {cfg.algorithm}, {cfg.optimizer}, batch {cfg.batch}, "
               f"{len(c.schedule.steps)} steps, {len(c.emitted.kernels)} C kernels; input "
               f"{c.emitted.doc.preprocess.describe()}")
    click.echo(f"arena {c.plan.arena_nbytes:,} B (lower bound {c.plan.lower_bound:,}, efficiency "
               f"{c.plan.efficiency:.3f}), state {c.plan.state_nbytes:,} B")
    for p in written:
        click.echo(f"wrote {p}")


@cli.command("check")
@_common
@click.option("--steps", type=click.IntRange(min=1), default=3, show_default=True,
              help="training steps to compare")
@click.option("--data-seed", type=int, default=0, show_default=True,
              help="seed of the random batches")
@click.option("--keep", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="emit the C into this directory (default: a temporary one)")
@click.option("--free", is_flag=True,
              help="do not feed the reference the C's layer inputs (rounding then compounds "
                   "through sign and PO2 thresholds; meaningful for all-f32 configurations)")
@click.option("--verbose", is_flag=True, help="list every tensor, also the bit-identical ones")
def check_cmd(model: str, target: str, algorithm: str | None, batch: int | None, lr: float | None,
              seed: int, width: float | None, steps: int, data_seed: int, keep: Path | None,
              free: bool, verbose: bool, ram: str | None, flash: str | None,
              **techniques) -> None:
    """Train MODEL for K steps in the emitted C and in the numpy reference; compare every tensor.

    
    --target host builds a debug shared library and drives it in-process; a cross target (rpi4,
    rpi3, cortex-m7, cortex-m4) runs its debug build under QEMU on the same batches, records every
    tensor of every step, and the same comparison replays that recording.
    """
    cfg = _config(algorithm, batch, lr, seed, 32, techniques)
    graph = load_graph(model, width=width)
    with tempfile.TemporaryDirectory(prefix="bnnc-check-") as tmp:
        tgt = debug_target(budget_target(target, ram, flash), ram=ram is not None,
                           flash=flash is not None)
        rep = run_check(graph, cfg, steps=steps, data_seed=data_seed, target=tgt,
                        work_dir=keep if keep is not None else tmp,
                        command=_canonical_command("check", model, cfg, target, width),
                        forcing=not free)
    click.echo(format_report(rep, verbose=verbose))
    if not rep.ok:
        bad = sorted({r.name for r in rep.failures})
        raise click.ClickException(f"{len(bad)} tensor(s) out of tolerance: {', '.join(bad[:8])}"
                                   + (" ..." if len(bad) > 8 else ""))
