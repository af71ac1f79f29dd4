"""`bnnc run OUT/ --data mnist`: train with the standalone trainer compiled into OUT/ — natively
(host target), under QEMU (`--emulate`) or on a device over ssh (`--device user@host[:dir]`).

This module parses the options and prints the run's events (epoch lines, the instruction count, the
files written); runtime/run.py does the run and states what it reads and writes.
"""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

from ..runtime.run import (Counted, Event, RunOptions, Saved, Started, TrainerEvent,
                           run_compiled)
from .app import cli
from .train_cmds import data_options


def where_options(f):
    """Where a compiled OUT's program runs (`bnnc run`, `bnnc eval`): natively, under QEMU
    (--emulate) or on a device over ssh (--device and its ssh options)."""
    for opt in reversed((
            click.option("--emulate", is_flag=True,
                         help="run a cross-compiled target (rpi4, rpi3, cortex-m7, ...) under QEMU"),
            click.option("--device", default=None, metavar="USER@HOST[:DIR]",
                         help="copy the program and data to a device with scp and run it over "
                              "ssh"),
            click.option("--port", type=click.IntRange(1, 65535), default=None,
                         help="--device: ssh port"),
            click.option("--identity", type=click.Path(dir_okay=False, exists=True,
                                                       path_type=Path),
                         default=None, help="--device: ssh private key"),
            click.option("--ssh-option", "ssh_options", multiple=True, metavar="KEY=VALUE",
                         help="--device: extra ssh/scp -o option (repeatable), e.g. "
                              "ProxyJump=gw"))):
        f = opt(f)
    return f


@cli.command("run")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@data_options
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="use only the first N training examples")
@click.option("--resume", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              default=None, help="start from a checkpoint (state blob) written by an earlier run, "
                                 "e.g. OUT/state.bin")
@click.option("--every", type=click.IntRange(min=1), default=None,
              help="also checkpoint every K steps (always: at each epoch end and at the end)")
@click.option("--log-every", type=click.IntRange(min=1), default=None,
              help="print the loss every K steps")
@click.option("--lr-horizon", type=int, default=None, metavar="STEP",
              help="the absolute step the compiled lr schedule (--lr-schedule) decays to; 0 = "
                   "train at the constant --lr [default: the step this run ends at]")
@where_options
@click.option("--count", is_flag=True,
              help="--emulate: report guest instructions per training step instead of training "
                   "(bare-metal targets: per function too, from the ELF's symbol table)")
@click.option("--timeout", type=float, default=None, help="give up after this many seconds")
def run_cmd(out_dir: Path, ssh_options: tuple[str, ...], **options) -> None:
    """Train with the program compiled into OUT_DIR on a dataset.

    \b
    Host target: runs natively. Raspberry Pi targets: --emulate (qemu-aarch64 with the Pi's CPU
    model) or --device pi@raspberrypi.local (static binary, no Python on the Pi). Cortex-M targets:
    --emulate (qemu-system-arm, MPS2 board, semihosting).
    One run (or compile) at a time per OUT_DIR: a second one is refused. --resume FILE is
    checked in full (model hash, CRC-32, step range, finite values) before OUT_DIR/state.bin
    is replaced by it.

    \b
    Example:
      bnnc compile mlp --target rpi4 -o out/mlp
      bnnc run out/mlp --emulate --data mnist --steps 50
      bnnc run out/mlp --device pi@raspberrypi.local --data mnist --epochs 1
      bnnc export out/mlp -o mlp_trained.onnx
      bnnc run out/cnv --data fashion-mnist               # grey -> RGB, padded to 3x32x32
      bnnc run out/tfc --data photos/ --fit resize --val-split 0.1 --epochs 5
    \b
    The data are fitted to the model (--fit), packed into OUT/data/ and recorded with their class
    names in OUT/data.json (`bnnc eval` and `bnnc export` read it).
    """
    run_compiled(out_dir, RunOptions(ssh_options=tuple(ssh_options), **options),
                 _Printer(Console(highlight=False, soft_wrap=True)))


class _Printer:
    """The run's events as lines: the trainer's epochs (and steps with --log-every), the count."""

    def __init__(self, console: Console):
        self.console = console
        self.started: Started | None = None

    def __call__(self, ev: Event) -> None:
        say = self.console.print
        if isinstance(ev, Started):
            self.started = ev
            if ev.elf is not None:
                tgt = ev.target
                say(f"{ev.model}: {tgt.name} bare-metal trainer ({ev.where}), RAM "
                    f"{ev.elf.ram_nbytes:,} of {tgt.ram:,} B, flash {ev.elf.flash_nbytes:,} of "
                    f"{tgt.flash:,} B")
        elif isinstance(ev, TrainerEvent) and self.started is not None:
            self._trainer(self.started, ev.fields)
        elif isinstance(ev, Counted):
            c = ev.count
            say(f"{ev.target.name} ({ev.emulator}): {c.instructions:,} instructions for "
                f"{c.steps} steps, {c.instructions_zero:,} for 0 steps -> {c.per_step:,.0f} "
                "instructions per training step")
            rows = c.per_function()
            if rows:
                say(f"  {'instructions/step':>17}  {'share':>6}  function")
                for name, n in rows:
                    say(f"  {n:17,.0f}  {100 * n / c.per_step:5.1f} %  {name}")
        elif isinstance(ev, Saved):
            say(f"wrote {ev.checkpoint} (step {ev.step}) and {ev.final}")

    def _trainer(self, run: Started, ev: dict) -> None:
        say, kind, baremetal = self.console.print, ev.get("event"), run.elf is not None
        if kind == "start" and baremetal:
            say(f"{ev['train']} train / {ev['test']} test {run.data}, batch {ev['batch']}; "
                f"step {ev['step']} -> {ev['until']}")
        elif kind == "start":
            cfg = run.config
            say(f"{run.model}: {run.target.name} trainer ({run.where}), {cfg.algorithm}, "
                f"{cfg.optimizer} (lr {cfg.lr:g}, {cfg.lr_schedule}), batch {cfg.batch}, arena "
                f"{ev['arena_bytes']:,} B + "
                f"state {ev['state_bytes']:,} B; {ev['train']} train / {ev['test']} test "
                f"{run.data}; step {ev['step']} -> {ev['until']}")
        elif kind == "step":
            say(f"  step {ev['step']}  loss {ev['loss']:.4f}  acc {100 * ev['acc']:.1f} %")
        elif kind == "epoch":
            timing = (f"{ev['seconds']:.1f} s host time" if baremetal else
                      f"{ev['seconds']:.1f} s, {ev['ms_per_step']:.2f} ms/step")
            test = (f"{100 * ev['test_acc']:.2f} %" if ev["test_acc"] >= 0
                    else "n/a (no test split)")
            say(f"epoch {ev['epoch']}/{run.epochs}  steps {ev['step']}  train loss "
                f"{ev['train_loss']:.4f}  train acc {100 * ev['train_acc']:.2f} %  test acc "
                f"{test}  ({timing})")
