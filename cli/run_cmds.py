"""`bnnc run OUT/ --data mnist`: train with the standalone trainer compiled into OUT/ — natively
(host target), under QEMU (`--emulate`) or on a device over ssh (`--device user@host[:dir]`).

Input: a `bnnc compile` directory and a dataset. The data are packed for the model
(runtime/packed.py) into OUT/data/, the initial state (OUT/init_state.npz) is written as the
trainer's float32 --init file, and the trainer (runtime/programs.py builds it, cached) runs with
absolute targets: --epochs E / --steps N here count from where the run starts (a resumed run
continues the same batch sequence; see templates/trainer.c.j2). Its JSON lines are shown as epoch
lines. Output: OUT/state.bin (the checkpoint, written atomically at every epoch end, every --every
steps and at the end) and OUT/final_state.npz (decoded from it, for `bnnc export OUT/`).

`--count` (emulated targets): instead of training for keeps, measure the guest instructions per
training step with bnnc's QEMU plugin: one run of N steps and one of 0 steps of the same program,
without checkpoints or test evaluation, (I_N - I_0) / N.
"""

from __future__ import annotations

import math
from pathlib import Path

import click
from rich.console import Console

from ..compiler.errors import ConfigError, DataError, TargetError
from . import cli
from .train_cmds import data_options

TRAIN_FILE, TEST_FILE, INIT_FILE = "train.bnnd", "test.bnnd", "init_state.f32"


def pack_run_data(out_dir: Path, graph, data_name: str, data_dir, limit: int | None):
    """Pack the train/test splits shaped for the model into OUT/data/ (rewritten only when the
    bytes change, so a device copy can be reused). Returns (train path, test path, train count)."""
    from ..runtime import packed
    from .train_cmds import training_data

    data, x_train, y_train, x_test = training_data(graph, data_name, data_dir, limit)
    where = out_dir / "data"
    where.mkdir(exist_ok=True)
    paths = []
    for fname, x, y in ((TRAIN_FILE, x_train, y_train), (TEST_FILE, x_test, data.y_test)):
        tmp = where / f".{fname}.new"
        packed.pack(tmp, x.reshape(len(x), -1) if x.ndim == 2 else x, y, data.classes)
        dest = where / fname
        if dest.is_file() and dest.read_bytes() == tmp.read_bytes():
            tmp.unlink()
        else:
            tmp.replace(dest)
        paths.append(dest)
    return paths[0], paths[1], len(x_train), data


def until_step(start: int, per_epoch: int, epochs: int | None, steps: int | None) -> int:
    """The absolute step to train to: --steps more steps, or --epochs passes counting the current
    (possibly partial) epoch as the first, as `bnnc train` does."""
    if epochs is not None and steps is not None:
        raise ConfigError("give --epochs or --steps, not both")
    if steps is not None:
        return start + steps
    return (start // per_epoch + (epochs or 1)) * per_epoch


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
@click.option("--emulate", is_flag=True,
              help="run a cross-compiled target (rpi4, rpi3, cortex-m7, ...) under QEMU")
@click.option("--device", default=None, metavar="USER@HOST[:DIR]",
              help="copy the trainer and data to a device with scp and run it over ssh")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="--device: ssh port")
@click.option("--identity", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              default=None, help="--device: ssh private key")
@click.option("--ssh-option", "ssh_options", multiple=True, metavar="KEY=VALUE",
              help="--device: extra ssh/scp -o option (repeatable), e.g. ProxyJump=gw")
@click.option("--count", is_flag=True,
              help="--emulate: report guest instructions per training step instead of training")
@click.option("--timeout", type=float, default=None, help="give up after this many seconds")
def run_cmd(out_dir: Path, data_name: str, data_dir: Path | None, epochs: int | None,
            steps: int | None, limit: int | None, resume: Path | None, every: int | None,
            log_every: int | None, emulate: bool, device: str | None, port: int | None,
            identity: Path | None, ssh_options: tuple[str, ...], count: bool,
            timeout: float | None) -> None:
    """Train with the program compiled into OUT_DIR on a dataset.

    \b
    Host target: runs natively. Raspberry Pi targets: --emulate (qemu-aarch64 with the Pi's CPU
    model) or --device pi@raspberrypi.local (static binary, no Python on the Pi). Cortex-M targets:
    --emulate (qemu-system-arm, MPS2 board, semihosting).
    \b
    Example:
      bnnc compile mlp --target rpi4 -o out/mlp
      bnnc run out/mlp --emulate --data mnist --steps 50
      bnnc run out/mlp --device pi@raspberrypi.local --data mnist --epochs 1
      bnnc export out/mlp -o mlp_trained.onnx
    """
    from ..runtime.outdir import FINAL_STATE, STATE_BLOB, read_compiled, read_state_blob
    from ..runtime.programs import target_of

    manifest, graph, cfg = read_compiled(out_dir)
    tgt = target_of(out_dir)
    if emulate and device:
        raise ConfigError("--emulate and --device exclude each other")
    if tgt.kind == "baremetal":
        if not emulate:
            raise ConfigError(f"{out_dir} is a bare-metal {tgt.name} program",
                              hint="run it under QEMU with --emulate (flash a board yourself)")
        return _run_baremetal(out_dir, tgt, manifest, graph, data_name, data_dir, epochs, steps,
                              limit, log_every, count, timeout)
    if tgt.kind == "linux" and not (emulate or device):
        raise ConfigError(f"{out_dir} was compiled for {tgt.name} ({tgt.arch})",
                          hint="add --emulate (QEMU) or --device USER@HOST[:DIR]")
    if tgt.kind == "host" and emulate:
        raise ConfigError("the host target runs natively; --emulate is for cross targets")
    if count and not emulate:
        raise ConfigError("--count measures instructions under QEMU; add --emulate")

    console = Console(highlight=False, soft_wrap=True)
    start = 0
    if resume is not None:
        start = read_state_blob(resume, manifest).step     # refuses a foreign/corrupt file first
    train_f, test_f, n_train, data = pack_run_data(out_dir, graph, data_name, data_dir, limit)
    per_epoch = n_train // cfg.batch
    if per_epoch == 0:
        raise DataError(f"{n_train} training examples do not fill one batch of {cfg.batch}",
                        hint="lower --batch at compile time or raise --limit")
    _write_init(out_dir, manifest, graph, cfg)
    ckpt = out_dir / STATE_BLOB
    if resume is not None:
        if resume.resolve() != ckpt.resolve():
            from ..runtime.outdir import write_atomic
            write_atomic(ckpt, resume.read_bytes())
    until = until_step(start, per_epoch, epochs, steps)
    if count:
        _count(out_dir, tgt, train_f, until - start, console)
        return

    args = ["--train", TRAIN_FILE, "--test", TEST_FILE, "--init", INIT_FILE,
            "--checkpoint", STATE_BLOB, "--steps", str(until), "--limit", str(n_train)]
    args += ["--resume"] if resume is not None else []
    args += ["--every", str(every)] if every else []
    args += ["--log-every", str(log_every)] if log_every else []
    epochs_total = math.ceil(until / per_epoch)

    def show(ev: dict) -> None:
        kind = ev.get("event")
        if kind == "start":
            console.print(f"{graph.name}: {tgt.name} trainer ({where}), {cfg.algorithm}, "
                          f"{cfg.optimizer}, batch {cfg.batch}, arena {ev['arena_bytes']:,} B + "
                          f"state {ev['state_bytes']:,} B; {ev['train']} train / {ev['test']} test "
                          f"{data.name}; step {ev['step']} -> {ev['until']}")
        elif kind == "step":
            console.print(f"  step {ev['step']}  loss {ev['loss']:.4f}  acc {100 * ev['acc']:.1f} %")
        elif kind == "epoch":
            console.print(f"epoch {ev['epoch']}/{epochs_total}  steps {ev['step']}  "
                          f"train loss {ev['train_loss']:.4f}  train acc "
                          f"{100 * ev['train_acc']:.2f} %  test acc {100 * ev['test_acc']:.2f} %  "
                          f"({ev['seconds']:.1f} s, {ev['ms_per_step']:.2f} ms/step)")

    from ..runtime.programs import build_trainer, check_result
    exe = build_trainer(out_dir, tgt)
    if device:
        from ..runtime.device import SshRunner, parse_device
        runner = SshRunner(parse_device(device, f"bnnc-{graph.name}"), tgt, port=port,
                           identity=identity, options=ssh_options)
        where = runner.describe()
        runner.check()
        files = [(exe, "trainer"), (train_f, TRAIN_FILE), (test_f, TEST_FILE),
                 (out_dir / INIT_FILE, INIT_FILE)]
        files += [(ckpt, STATE_BLOB)] if resume is not None else []
        runner.put(files)
        res = runner.run("trainer", args, on_event=show, timeout=timeout)
        fetched = runner.get(STATE_BLOB, ckpt)
        check_result(res, f"the trainer on {device}")
        if not fetched:
            raise TargetError(f"could not fetch {STATE_BLOB} from {device}")
    else:
        from ..runtime.programs import LocalRunner
        runner = LocalRunner(tgt)
        where = runner.describe()
        res = _run_local(runner, exe, out_dir, args, show, timeout)
        check_result(res, f"the {tgt.name} trainer")
    blob = read_state_blob(ckpt, manifest)
    from ..runtime.outdir import save_state_atomic
    save_state_atomic(out_dir / FINAL_STATE, blob.tensors)
    console.print(f"wrote {ckpt} (step {blob.step}) and {out_dir / FINAL_STATE}")


def _run_local(runner, exe: Path, out_dir: Path, args: list[str], show, timeout):
    """Local runs name the files by their paths under OUT/ (a device run by bare names)."""
    where = {TRAIN_FILE: out_dir / "data" / TRAIN_FILE, TEST_FILE: out_dir / "data" / TEST_FILE,
             INIT_FILE: out_dir / INIT_FILE, "state.bin": out_dir / "state.bin"}
    return runner.run(exe, [str(where.get(a, a)) for a in args], on_event=show, timeout=timeout)


def _write_init(out_dir: Path, manifest: dict, graph, cfg) -> None:
    from ..runtime.outdir import load_init_state, state_values_f32, write_atomic

    write_atomic(out_dir / INIT_FILE, state_values_f32(manifest,
                                                       load_init_state(out_dir, graph, cfg)))


def _count(out_dir: Path, tgt, train_f: Path, n: int, console: Console) -> None:
    from ..runtime.insncount import count_instructions
    from ..runtime.programs import build_trainer, emulator_argv

    exe = build_trainer(out_dir, tgt)
    emu = emulator_argv(tgt)
    base = ["--train", str(train_f), "--init", str(out_dir / INIT_FILE), "--no-clock"]
    i0, p0 = count_instructions(emu, [str(exe), *base, "--steps", "0"])
    i1, p1 = count_instructions(emu, [str(exe), *base, "--steps", str(n)])
    for p in (p0, p1):
        if p.returncode != 0:
            raise DataError(f"the counting run failed (exit {p.returncode}): "
                            f"{p.stdout.strip()[-500:]} {p.stderr.strip()[-500:]}")
    console.print(f"{tgt.name} ({' '.join(emu)}): {i1:,} instructions for {n} steps, {i0:,} for 0 "
                  f"steps -> {(i1 - i0) / n:,.0f} instructions per training step")


def _run_baremetal(out_dir, tgt, manifest, graph, data_name, data_dir, epochs, steps, limit,
                   log_every, count, timeout) -> None:
    try:
        from ..runtime import baremetal
    except ImportError as err:      # pragma: no cover - the module ships with bnnc
        raise TargetError(f"bare-metal runs are not available: {err}") from err
    baremetal.run_cli(out_dir, tgt, manifest, graph, data_name=data_name, data_dir=data_dir,
                      epochs=epochs, steps=steps, limit=limit, log_every=log_every, count=count,
                      timeout=timeout)
