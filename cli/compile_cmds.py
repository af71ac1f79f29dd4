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
`--classes K` re-initialises the model's head for K classes (compiler/head.py); `bnnc compile` then
writes the new-head model as OUT/model.onnx (QONNX), so `bnnc run` and `bnnc export` see K outputs.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import click

from ..compiler.codegen import MAX_THREADS, check_threads
from ..compiler.config import ALGORITHMS, make_config
from ..compiler.budget import fit_budget
from ..compiler.errors import BudgetError, ConfigError
from ..compiler.ops import eval_mode_bns
from ..compiler.planner import DEFAULT_GUARD_BYTES
from ..compiler.target import Target, load_target, parse_size
from ..runtime.check import debug_target, format_report, run_check
from ..compiler.preprocess import SPEC_HELP
from ..runtime.host import KERNEL_VARIANTS
from ..runtime.model_source import load_graph, model_bytes, model_preprocess, with_new_head
from ..runtime.outdir import compile_graph
from .app import cli
from .memory_cmds import freeze_options, pixel_input, technique_options, with_freeze
from .train_cmds import lr_help, optimizer_options

THREADS_HELP = ("Linux targets (host library and trainer, rpi4, rpi3): each training step's heavy "
                "kernels (conv and dense forward, dX, dW; BN; sign; pooling; PO2 quantization; "
                "Adam/SGD/Bop) split their output over N "
                "POSIX threads, started once and kept; any N gives the same bits. Recorded in "
                "OUT's manifest. Bare-metal targets take 1 only")

# the technique switches of `bnnc inspect` / `bnnc train` (unset = the algorithm's default)
_TECHNIQUES = ("optimizer", "binary_dw", "po2", "po2_bias", "bn", "state_dtype", "save_bits",
               "fuse", "bop_gamma", "bop_threshold", "bop_bn_shift", "lr_schedule", "bn_momentum",
               "frozen_bn")


def _config(algorithm: str | None, batch: int | None, lr: float | None, seed: int,
            default_batch: int, techniques: dict):
    given = {k: v for k, v in techniques.items() if v is not None and k in _TECHNIQUES}
    return make_config(algorithm or "proposed", batch=default_batch if batch is None else batch,
                       lr=lr, seed=seed, **given)


def _canonical_command(verb: str, model: str, cfg, target: str, width: float | None,
                       ram: str | None = None, flash: str | None = None,
                       classes: int | None = None, train: str | None = None,
                       train_from: str | None = None) -> str:
    """The command line as written into generated files: only what decides their content."""
    parts = [f"bnnc {verb}", Path(model).name, f"--target {target}", f"--algorithm {cfg.algorithm}",
             f"--batch {cfg.batch}", f"--optimizer {cfg.optimizer}"]
    if width is not None:
        parts.append(f"--width {width:g}")
    parts += [f"--classes {classes}"] if classes else []
    parts += [f"--train {train}"] if train else []
    parts += [f"--train-from {train_from}"] if train_from else []
    parts += [f"--frozen-bn {cfg.frozen_bn}"] if cfg.frozen_bn != "batch" else []
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
        click.option("--classes", type=click.IntRange(min=2), default=None, metavar="K",
                     help="new task head: re-initialise the last dense/conv layer (and its batch "
                          "norm/bias) for K classes with the seeded initialiser (--seed); every "
                          "other layer keeps its trained values"),
        click.option("--ram", default=None, metavar="SIZE",
                     help="bare-metal targets: RAM budget, e.g. 256K [default: the target's]"),
        click.option("--flash", default=None, metavar="SIZE",
                     help="bare-metal targets: flash budget, e.g. 1M [default: the target's]"),
    ]
    f = freeze_options(technique_options(optimizer_options(f)))
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
@click.option("--emit", type=click.Choice(["program", "library"]), default="program",
              show_default=True,
              help="program: the C and the target's trainer; library (bare-metal targets): a "
                   "firmware library -- CMake project + package, Arduino library, Zephyr module, "
                   "example firmware for the target's board (README: \"Use it in your firmware\")")
@click.option("--fit", is_flag=True,
              help="bare-metal targets: train the deepest suffix of the model (from a dense/"
                   "conv layer on) that fits --ram/--flash, at the largest batch up to --batch "
                   "that fits; prints the choice and the alternatives (instead of --train/"
                   "--train-from)")
@click.option("--force", is_flag=True,
              help="take over OUT even if it holds files bnnc did not write (they are replaced "
                   "where bnnc writes the same name; other files are left alone)")
@click.option("--guard", is_flag=True,
              help="debug build: canary bytes around every arena buffer, checked after every "
                   "kernel (a kernel writing outside its tensors stops the program, naming it)")
@click.option("--preprocess", default=None, metavar="SPEC",
              help=f"u8 pixel -> model input, recorded in OUT and used by run, eval, export and "
                   f"the trainers: {SPEC_HELP} [default: what the model file records, else "
                   "symmetric with a notice]")
@click.option("--threads", type=click.IntRange(1, MAX_THREADS), default=1, show_default=True,
              metavar="N", help=THREADS_HELP)
def compile_cmd(model: str, target: str, algorithm: str | None, batch: int | None, lr: float | None,
                seed: int, width: float | None, classes: int | None, out_dir: Path,
                ram: str | None, flash: str | None, guard: bool, preprocess: str | None,
                emit: str, train: str | None, train_from: str | None, fit: bool, force: bool,
                threads: int, **techniques) -> None:
    """Compile MODEL into a static, malloc-free C99 training program in OUT.

    OUT is bnnc's own: it must be new, empty or written by bnnc (else --force); files of an
    earlier compile that this one does not write are removed, symbolic links are never followed,
    and a second compile or run on the same OUT is refused while one is working there.

    
    Targets (targets/<name>.toml): host (shared library + native trainer), rpi4 / rpi3 (static
    aarch64 trainer, NEON), cortex-m7 / cortex-m4 / cortex-m33 / cortex-m55 (bare-metal ELF under
    QEMU, RAM/flash budget checked), stm32f746 / stm32h743 / nrf52840 (real parts: budget and
    --emit library firmware).
    
    Examples:
      bnnc compile mlp --target host -o out/mlp
      bnnc compile model.onnx --target rpi4 -o out/pi
      bnnc compile tfc --target cortex-m7 --ram 256K --batch 10 --optimizer bop -o out/m7
      bnnc compile tfc --target cortex-m4 --optimizer bop --batch 8 --emit library -o out/lib
      bnnc compile pretrained.onnx --classes 5 -o out/new_task
      bnnc compile tfc.onnx --target cortex-m4 --ram 64K --batch 32 --fit -o out/m4
    """
    tgt = budget_target(target, ram, flash)
    check_threads(threads, tgt)
    cfg = _config(algorithm, batch, lr, seed, 100, techniques)
    graph = load_graph(model, width=width)
    if emit == "library" and guard:
        raise ConfigError("--guard builds report through stdio, which the firmware library has "
                          "none of", hint="drop --guard, or check the standalone trainer "
                                          "(without --emit library) with it")
    if emit == "library" and tgt.kind != "baremetal":
        raise ConfigError(f"--emit library needs a bare-metal target; {tgt.name} is {tgt.kind}",
                          hint="pick --target cortex-m4, cortex-m7, cortex-m33, cortex-m55, "
                               "stm32f746, stm32h743 or nrf52840")
    source = model_bytes(model, width=width)
    pre = model_preprocess(source, model, preprocess)     # the file's own convention
    if classes is not None:
        graph, source = with_new_head(graph, classes, seed)
    cfg = with_freeze(cfg, graph, train, train_from)
    cfg = pixel_input(cfg, graph, techniques.get("input_kind"), pre)
    if fit:
        if train is not None or train_from is not None:
            raise ConfigError("--fit chooses the trainable suffix itself; drop --train/--train-from")
        if tgt.kind != "baremetal":
            raise ConfigError(f"--fit fits a bare-metal budget; {tgt.name} is {tgt.kind}",
                              hint="use --target cortex-m4/cortex-m7 with --ram/--flash")
        chosen = fit_budget(graph, cfg, tgt)
        click.echo(f"{graph.name} on {tgt.name} (RAM {tgt.ram:,} B, flash {tgt.flash:,} B), "
                   f"batch up to {cfg.batch}: trainable suffixes")
        click.echo(chosen.format())
        if chosen.config is None:
            raise BudgetError(f"{graph.name}: no trainable suffix fits {tgt.name} at any batch "
                              f"up to {cfg.batch} (table above)",
                              hint="raise --ram/--flash, try --optimizer bop, or pick the "
                                   "layers yourself with --train and a smaller --batch")
        cfg = chosen.config
        row = chosen.rows[chosen.chosen]
        train_from = row.train_from
        click.echo(f"chosen: {'--train-from ' + row.train_from if row.train_from else 'the whole model'}"
                   f" --batch {cfg.batch} ({row.trained:,} parameters trained, RAM "
                   f"{row.ram_nbytes:,} B, flash {row.flash_nbytes:,} B)")
    command = _canonical_command("compile", model, cfg, tgt.name, width, ram, flash, classes,
                                 train, train_from) \
        + (" --guard" if guard else "") + (" --emit library" if emit == "library" else "") \
        + (f" --preprocess {pre.spec()}" if preprocess else "") \
        + (" --input u8" if cfg.input == "u8" else "") \
        + (f" --threads {threads}" if threads > 1 else "")
    c, written = compile_graph(graph, cfg, tgt, out_dir, command, source,
                               guard_bytes=DEFAULT_GUARD_BYTES if guard else 0, emit=emit,
                               force=force, preprocess=pre, threads=threads)
    click.echo(f"{graph.name}: {cfg.algorithm}, {cfg.optimizer}, batch {cfg.batch}, "
               f"{len(c.schedule.steps)} steps, {len(c.emitted.kernels)} C kernels; input "
               f"{c.emitted.doc.preprocess.describe()}"
               + (f"; {threads} threads" if threads > 1 else ""))
    click.echo(f"arena {c.plan.arena_nbytes:,} B (lower bound {c.plan.lower_bound:,}, efficiency "
               f"{c.plan.efficiency:.3f}), state {c.plan.state_nbytes:,} B")
    if cfg.frozen:
        where = " (read from flash, not RAM)" if tgt.kind == "baremetal" else ""
        evals = [lay.name for lay in graph.layers if lay.name in eval_mode_bns(graph, cfg)]
        stats = (f" + the running statistics of {', '.join(evals)} (inference mode)"
                 if evals else "")
        click.echo(f"frozen: {len(cfg.frozen)} parameters{stats}, {c.plan.frozen_nbytes:,} B of "
                   f"the state{where}: {', '.join(cfg.frozen)}")
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
@click.option("--variant", type=click.Choice(list(KERNEL_VARIANTS)), default="auto",
              show_default=True,
              help="--target host: force the kernels' run-time choice (x86-64): auto (the widest "
                   "the CPU has), avx2 or sse2 (capped there), portable (-DBNNC_NO_SIMD)")
@click.option("--threads", type=click.IntRange(1, MAX_THREADS), default=1, show_default=True,
              metavar="N", help="check the C compiled with --threads N (Linux targets)")
def check_cmd(model: str, target: str, algorithm: str | None, batch: int | None, lr: float | None,
              seed: int, width: float | None, classes: int | None, steps: int, data_seed: int,
              keep: Path | None, free: bool, verbose: bool, variant: str, ram: str | None,
              flash: str | None, train: str | None, train_from: str | None, threads: int,
              **techniques) -> None:
    """Train MODEL for K steps in the emitted C and in the numpy reference; compare every tensor.

    
    --target host builds a debug shared library and drives it in-process; a cross target (rpi4,
    rpi3, cortex-m7, cortex-m4) runs its debug build under QEMU on the same batches, records every
    tensor of every step, and the same comparison replays that recording.
    """
    cfg = _config(algorithm, batch, lr, seed, 32, techniques)
    check_threads(threads, load_target(target))
    if variant != "auto" and load_target(target).kind != "host":
        raise ConfigError(f"--variant {variant} forces the host build's kernels; target {target!r} "
                          "runs its own build", hint="use --variant with --target host")
    graph = load_graph(model, width=width)
    if classes is not None:
        graph = with_new_head(graph, classes, seed)[0]
    cfg = with_freeze(cfg, graph, train, train_from)
    cfg = pixel_input(cfg, graph, techniques.get("input_kind"),
                      model_preprocess(model_bytes(model, width=width), model, None))
    with tempfile.TemporaryDirectory(prefix="bnnc-check-") as tmp:
        tgt = debug_target(budget_target(target, ram, flash), ram=ram is not None,
                           flash=flash is not None)
        rep = run_check(graph, cfg, steps=steps, data_seed=data_seed, target=tgt,
                        work_dir=keep if keep is not None else tmp,
                        command=_canonical_command("check", model, cfg, target, width,
                                                   classes=classes, train=train,
                                                   train_from=train_from)
                        + (f" --threads {threads}" if threads > 1 else ""),
                        forcing=not free, extra_cflags=KERNEL_VARIANTS[variant], threads=threads)
    click.echo(format_report(rep, verbose=verbose))
    if not rep.ok:
        bad = sorted({r.name for r in rep.failures})
        raise click.ClickException(f"{len(bad)} tensor(s) out of tolerance: {', '.join(bad[:8])}"
                                   + (" ..." if len(bad) > 8 else ""))
