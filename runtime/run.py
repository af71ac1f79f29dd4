"""Train with the standalone trainer compiled into OUT/: `run_compiled(out_dir, options, on_event)`,
the one run entry behind `bnnc run` for every target.

Where it runs: the host target natively; a Linux target (rpi4, rpi3, ...) under its emulator
(`emulate`, qemu-aarch64: runtime/programs.py) or on a device over ssh (`device`,
runtime/device.py); a bare-metal target (cortex-m7, cortex-m4) under qemu-system-arm (`emulate`,
runtime/baremetal.py). Options that do not fit the target are ConfigErrors before anything runs.

Procedure: the data (`--data`: a dataset name or the user's files, runtime/datasets.py) are fitted
to the model and streamed into packed files (runtime/packed.py) in OUT/data/ (replaced only when the
bytes change, so a device copy can be reused); OUT/data.json records what was packed: the source,
the split, the class names (index -> name) and the transform; the start state is OUT/init_state.npz
(Linux: the trainer's float32 --init file; bare metal: the state blob loaded into flash) or the
checkpoint `resume`; the trainer runs to an absolute step (`until_step`: --epochs E / --steps N
count from where the run starts, so a resumed run continues the same batch sequence; see
templates/trainer/skeleton.c.j2); the lr schedule decays to `until` (or to `lr_horizon`). Output: OUT/state.bin (the checkpoint, written atomically at every epoch
end, every `every` steps and at the end) and OUT/final_state.npz (decoded from it, for
`bnnc export OUT/`).

`count` (emulated targets): instead of training for keeps, measure the guest instructions per
training step with bnnc's QEMU plugin: one run of N steps and one of 0 steps of the same program,
without checkpoints or test evaluation, (I_N - I_0) / N.

Events, in order: `Started` (just before the trainer runs), one `TrainerEvent` per JSON line the
trainer prints, then `Saved`; or a single `Counted`. The caller decides how to show them.
"""

from __future__ import annotations

import dataclasses
import filecmp
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

import numpy as np

from ..compiler import baremetal as bm
from ..compiler.config import TrainConfig
from ..compiler.contract import Manifest
from ..compiler.errors import ConfigError, DataError, OutDirError, TargetError
from ..compiler.ir import Graph
from ..compiler.numerics import LR_HORIZON_MAX
from ..compiler.target import Target
from . import baremetal, packed
from .data_sources import Subset
from .datasets import DataRequest, ModelData, open_data
from .device import SshRunner, parse_device
from .insncount import StepCount, count_instructions
from .outdir import (DATA_RECORD, FINAL_STATE, STATE_BLOB, OutDir, check_class_names,
                     load_init_state, os_error, read_compiled, save_state_atomic, write_atomic)
from .programs import LocalRunner, RunResult, build_trainer, check_result, emulator_argv, target_of
from .state_blob import parse_state_blob, read_state_blob, state_values_f32

INIT_FILE = "init_state.f32"
BAREMETAL_TIMEOUT_S = 24 * 3600.0     # a bare-metal run without --timeout


@dataclass(frozen=True)
class RunOptions:
    data_name: str                       # --data: a dataset name or a path (runtime/datasets.py)
    data_dir: Path | None = None
    epochs: int | None = None
    steps: int | None = None
    limit: int | None = None             # the first N training examples only
    test_data: str | None = None         # the test split from a second source
    val_split: float | None = None       # or a seeded held-out fraction of the training data
    split_seed: int = 0
    label_column: str | None = None      # CSV data
    fit: str | None = None               # runtime/transforms.py; None = "auto"
    layout: str | None = None
    resume: Path | None = None           # a checkpoint (state blob) of an earlier run
    every: int | None = None             # also checkpoint every K steps
    log_every: int | None = None         # a "step" event every K steps
    lr_horizon: int | None = None        # the step the lr schedule decays to (None: the run's
                                         # last step, `until`; 0: constant lr)
    emulate: bool = False
    device: str | None = None            # user@host[:dir]
    port: int | None = None              # device: ssh port, key, extra -o options
    identity: Path | None = None
    ssh_options: tuple[str, ...] = ()
    count: bool = False
    timeout: float | None = None
    indices: tuple[int, ...] | None = None   # train on these training examples only (a fleet
                                             # device's partition; after `limit`)
    resume_bytes: bytes | None = None    # the validated checkpoint (run_compiled fills these in)
    resume_step: int | None = None


@dataclass(frozen=True)
class Started:
    model: str
    target: Target
    config: TrainConfig
    data: str                            # the dataset's name
    where: str                           # "native", the emulator command, the device, the CPU
    epochs: int                          # the (absolute) epoch the run ends in
    elf: baremetal.Elf | None = None     # bare metal: the program's RAM and flash use


@dataclass(frozen=True)
class TrainerEvent:
    """One JSON line of the trainer (`event`: "start", "step", "epoch", ...), as it printed it."""
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str | None:
        return self.fields.get("event")


@dataclass(frozen=True)
class Counted:
    target: Target
    emulator: str                        # the QEMU command, for the report
    count: StepCount


@dataclass(frozen=True)
class Saved:
    checkpoint: Path
    step: int
    final: Path


Event = Union[Started, TrainerEvent, Counted, Saved]
OnEvent = Callable[[Event], None]


def until_step(start: int, per_epoch: int, epochs: int | None, steps: int | None) -> int:
    """The absolute step to train to: `steps` more steps, or `epochs` passes counting the current
    (possibly partial) epoch as the first, as `bnnc train` does."""
    if epochs is not None and steps is not None:
        raise ConfigError("give --epochs or --steps, not both")
    if steps is not None:
        return start + steps
    return (start // per_epoch + (epochs or 1)) * per_epoch


def data_request(opts: RunOptions) -> DataRequest:
    return DataRequest(opts.data_name, opts.data_dir, opts.test_data, opts.val_split,
                       opts.split_seed, opts.label_column, opts.fit, opts.layout, opts.limit)


def pack_run_data(out_dir: Path, graph: Graph, req: DataRequest, *, resume: bool = False,
                  indices: tuple[int, ...] | None = None
                  ) -> tuple[Path, Path | None, int, ModelData]:
    """Pack the train/test splits fitted to the model into OUT/data/ (replaced only when the
    bytes change; temp file + rename, so a full disk leaves the old files) and record them in
    OUT/data.json. `indices` keeps only those training examples (a fleet device's partition,
    after --limit). Returns (train path, test path or None when the data have no test split,
    train count, the fitted data)."""
    data = open_data(req, graph.input_shape, graph.num_classes, model_name=repr(graph.name))
    if indices is not None:
        pick = np.asarray(indices, np.int64)
        if pick.size and (pick.min() < 0 or pick.max() >= data.train.count):
            raise DataError(f"training example index out of range [0, {data.train.count})")
        data = dataclasses.replace(data, train=Subset(data.train, pick, data.train.name))
    if resume:
        check_class_names(out_dir, data.class_names, req.spec)
    out = OutDir(out_dir)
    where = out.subdir("data")
    out.add_owned("data")
    paths: list[Path | None] = []
    for fname, split in ((packed.TRAIN_FILE, "train"), (packed.TEST_FILE, "test")):
        dest = where / fname
        tmp = where / f".{fname}.new"
        try:
            if split == "test" and data.test is None:
                dest.unlink(missing_ok=True)
                paths.append(None)
                continue
            data.pack(split, tmp)            # its own temporary file, renamed when complete
            if dest.is_file() and not dest.is_symlink() and filecmp.cmp(dest, tmp, shallow=False):
                tmp.unlink()
            else:
                os.replace(tmp, dest)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise os_error(err, f"write {dest}") from None
        paths.append(dest)
    out.add_owned(DATA_RECORD)
    write_atomic(out_dir / DATA_RECORD, (json.dumps(data.record(), indent=1, sort_keys=True)
                                         + "\n").encode())
    return paths[0], paths[1], data.train.count, data


def run_compiled(out_dir: Path, opts: RunOptions, on_event: OnEvent) -> None:
    """Train the program compiled into `out_dir` as `opts` says (module docstring). Holds the
    per-OUT lock for the whole run: a second run on the same OUT is refused."""
    out_dir = Path(out_dir)
    with OutDir(out_dir, command="run"):
        manifest, graph, cfg = read_compiled(out_dir)
        tgt = target_of(out_dir)
        _check_mode(out_dir, tgt, opts)
        if opts.resume is not None:
            # validated in full (CRC, model hash, size, step range, finite values) before
            # anything in OUT changes; OUT/state.bin is replaced only by these same bytes
            if os.path.getsize(opts.resume) != manifest.blob_nbytes:
                read_state_blob(opts.resume, manifest)          # says what is wrong
            try:
                raw = opts.resume.read_bytes()
            except OSError as err:
                raise os_error(err, f"read {opts.resume}") from None
            step = parse_state_blob(raw, manifest, opts.resume).step
            opts = dataclasses.replace(opts, resume_bytes=raw, resume_step=step)
        run = _run_baremetal if tgt.kind == "baremetal" else _run_linux
        run(out_dir, tgt, manifest, graph, cfg, opts, on_event)


def _check_mode(out_dir: Path, tgt: Target, opts: RunOptions) -> None:
    """ConfigError when --emulate / --device / --count do not fit the target, or --lr-horizon is
    out of the C's uint32 range."""
    if opts.lr_horizon is not None and not 0 <= opts.lr_horizon <= LR_HORIZON_MAX:
        raise ConfigError(f"--lr-horizon {opts.lr_horizon} is outside [0, {LR_HORIZON_MAX}]",
                          hint="give the step the lr schedule should reach 0 at, or 0 for a "
                               "constant lr")
    if opts.emulate and opts.device:
        raise ConfigError("--emulate and --device exclude each other")
    if tgt.kind == "baremetal":
        if not opts.emulate:
            raise ConfigError(f"{out_dir} is a bare-metal {tgt.name} program",
                              hint="run it under QEMU with --emulate (flash a board yourself)")
        return
    if tgt.kind == "linux" and not (opts.emulate or opts.device):
        raise ConfigError(f"{out_dir} was compiled for {tgt.name} ({tgt.arch})",
                          hint="add --emulate (QEMU) or --device USER@HOST[:DIR]")
    if tgt.kind == "host" and opts.emulate:
        raise ConfigError("the host target runs natively; --emulate is for cross targets")
    if opts.count and not opts.emulate:
        raise ConfigError("--count measures instructions under QEMU; add --emulate")


@dataclass(frozen=True)
class _Plan:
    """A run's data and step range."""
    train: Path
    test: Path | None
    n_train: int
    data: ModelData
    start: int
    until: int
    epochs: int


def _plan(out_dir: Path, manifest: Manifest, graph: Graph, batch: int, opts: RunOptions) -> _Plan:
    start = 0
    if opts.resume is not None:
        start = (opts.resume_step if opts.resume_step is not None
                 else read_state_blob(opts.resume, manifest).step)
    train_f, test_f, n_train, data = pack_run_data(out_dir, graph, data_request(opts),
                                                   resume=opts.resume is not None,
                                                   indices=opts.indices)
    per_epoch = n_train // batch
    if per_epoch == 0:
        raise DataError(f"{n_train} training examples do not fill one batch of {batch}",
                        hint="lower --batch at compile time or raise --limit")
    until = until_step(start, per_epoch, opts.epochs, opts.steps)
    return _Plan(train_f, test_f, n_train, data, start, until, math.ceil(until / per_epoch))


def _save(out_dir: Path, manifest: Manifest, on_event: OnEvent) -> None:
    """OUT/final_state.npz decoded from the checkpoint OUT/state.bin."""
    ckpt = out_dir / STATE_BLOB
    blob = read_state_blob(ckpt, manifest)
    out = OutDir(out_dir)
    out.add_owned(STATE_BLOB, FINAL_STATE)
    save_state_atomic(out_dir / FINAL_STATE, blob.tensors, model_hash=manifest.state_hash)
    on_event(Saved(ckpt, blob.step, out_dir / FINAL_STATE))


# --------------------------------------------------------------------------------------------------
# host and Linux targets: the standalone trainer, here, under QEMU or over ssh

def _run_linux(out_dir: Path, tgt: Target, manifest: Manifest, graph: Graph, cfg: TrainConfig,
               opts: RunOptions, on_event: OnEvent) -> None:
    plan = _plan(out_dir, manifest, graph, cfg.batch, opts)
    out = OutDir(out_dir)
    out.write(INIT_FILE, state_values_f32(manifest, load_init_state(out_dir, graph, cfg,
                                                                    manifest)))
    ckpt = out_dir / STATE_BLOB
    _clear_trainer_temp(ckpt)
    if opts.resume_bytes is not None and not (
            os.path.lexists(ckpt) and _same_bytes(ckpt, opts.resume_bytes)):
        out.write(STATE_BLOB, opts.resume_bytes)      # validated by run_compiled
    if opts.count:
        on_event(_count_linux(out_dir, tgt, plan.train, plan.until - plan.start))
        return
    args = ["--train", packed.TRAIN_FILE, "--init", INIT_FILE,
            "--checkpoint", STATE_BLOB, "--steps", str(plan.until), "--limit", str(plan.n_train)]
    args += ["--test", packed.TEST_FILE] if plan.test is not None else []
    args += ["--resume"] if opts.resume is not None else []
    args += ["--every", str(opts.every)] if opts.every else []
    args += ["--log-every", str(opts.log_every)] if opts.log_every else []
    args += ["--lr-horizon", str(opts.lr_horizon)] if opts.lr_horizon is not None else []
    exe = build_trainer(out_dir, tgt)

    def started(where: str) -> None:
        on_event(Started(graph.name, tgt, cfg, plan.data.name, where, plan.epochs))

    def show(ev: dict) -> None:
        on_event(TrainerEvent(ev))

    if opts.device:
        runner = SshRunner(parse_device(opts.device, f"bnnc-{graph.name}"), tgt, port=opts.port,
                           identity=opts.identity, options=opts.ssh_options)
        where = runner.describe()
        runner.check()
        files = [(exe, "trainer"), (plan.train, packed.TRAIN_FILE),
                 (out_dir / INIT_FILE, INIT_FILE)]
        files += [(plan.test, packed.TEST_FILE)] if plan.test is not None else []
        files += [(ckpt, STATE_BLOB)] if opts.resume is not None else []
        runner.put(files)
        started(where)
        res = runner.run("trainer", args, on_event=show, timeout=opts.timeout)
        # fetched into a private temporary, validated, then published: a device never replaces
        # the local checkpoint with a blob that fails the checks of a resume
        with tempfile.TemporaryDirectory(prefix=".bnnc-fetch-", dir=out_dir) as tmp:
            got = Path(tmp) / STATE_BLOB
            fetched = runner.get(STATE_BLOB, got)
            check_result(res, f"the trainer on {opts.device}")
            if not fetched:
                raise TargetError(f"could not fetch {STATE_BLOB} from {opts.device}")
            raw = got.read_bytes()
            try:
                parse_state_blob(raw, manifest, f"{STATE_BLOB} fetched from {opts.device}")
            except DataError as err:
                raise DataError(f"{err.message}; {ckpt} is unchanged") from None
            out.write(STATE_BLOB, raw)
    else:
        local = LocalRunner(tgt)
        started(local.describe())
        res = _run_local(local, exe, out_dir, args, show, opts.timeout)
        check_result(res, f"the {tgt.name} trainer")
    _save(out_dir, manifest, on_event)


def _run_local(runner: LocalRunner, exe: Path, out_dir: Path, args: list[str],
               show: Callable[[dict], None], timeout: float | None) -> RunResult:
    """Local runs name the files by their paths under OUT/ (a device run by bare names)."""
    where = {packed.TRAIN_FILE: out_dir / "data" / packed.TRAIN_FILE,
             packed.TEST_FILE: out_dir / "data" / packed.TEST_FILE,
             INIT_FILE: out_dir / INIT_FILE, STATE_BLOB: out_dir / STATE_BLOB}
    return runner.run(exe, [str(where.get(a, a)) for a in args], on_event=show, timeout=timeout)


def _count_linux(out_dir: Path, tgt: Target, train_f: Path, n: int) -> Counted:
    exe = build_trainer(out_dir, tgt)
    emu = emulator_argv(tgt)
    base = ["--train", str(train_f), "--init", str(out_dir / INIT_FILE), "--no-clock"]
    i0, p0 = count_instructions(emu, [str(exe), *base, "--steps", "0"])
    i1, p1 = count_instructions(emu, [str(exe), *base, "--steps", str(n)])
    for p in (p0, p1):
        if p.returncode != 0:
            raise DataError(f"the counting run failed (exit {p.returncode}): "
                            f"{p.stdout.strip()[-500:]} {p.stderr.strip()[-500:]}")
    return Counted(tgt, " ".join(emu), StepCount(n, i1, i0))


# --------------------------------------------------------------------------------------------------
# bare-metal targets: the ELF under qemu-system-arm

def _run_baremetal(out_dir: Path, tgt: Target, manifest: Manifest, graph: Graph, cfg: TrainConfig,
                   opts: RunOptions, on_event: OnEvent) -> None:
    _, tgt = baremetal.compiled_program(out_dir, tgt)     # with the budget it was compiled with
    plan = _plan(out_dir, manifest, graph, manifest.batch, opts)
    blob = (opts.resume_bytes if opts.resume_bytes is not None
            else baremetal.start_state_blob(out_dir))
    timeout = opts.timeout if opts.timeout is not None else BAREMETAL_TIMEOUT_S
    if opts.count:
        n = opts.steps or 4
        c = baremetal.count_step_instructions(out_dir, tgt, train=plan.train, steps=n,
                                              start_blob=blob, timeout=timeout)
        on_event(Counted(tgt, " ".join(tgt.emulator[:3]), c))
        return
    elf = baremetal.build_elf(out_dir, tgt)
    on_event(Started(graph.name, tgt, cfg, plan.data.name, f"{bm.cpu_name(tgt)}, QEMU",
                     plan.epochs, elf))
    res = baremetal.run(out_dir, tgt, train=plan.train, test=plan.test, start_blob=blob,
                        steps=plan.until, limit=plan.n_train, log_every=opts.log_every or 0,
                        every=opts.every or 0, lr_horizon=opts.lr_horizon, checkpoint=True,
                        on_event=lambda ev: on_event(TrainerEvent(ev)), timeout=timeout)
    if res.returncode != 0:
        raise DataError(f"the {tgt.name} trainer failed (exit {res.returncode}): "
                        f"{res.error() or res.stderr.strip()[-800:] or 'no output'}")
    if res.checkpoint is None:
        raise DataError(f"the {tgt.name} trainer wrote no checkpoint")
    try:
        parse_state_blob(res.checkpoint, manifest, "the checkpoint")
    except DataError as err:
        raise DataError(f"the {tgt.name} trainer wrote an invalid checkpoint ({err.message}); "
                        f"{out_dir / STATE_BLOB} is unchanged") from None
    OutDir(out_dir).write(STATE_BLOB, res.checkpoint)
    _save(out_dir, manifest, on_event)


def _same_bytes(path: Path, data: bytes) -> bool:
    try:
        return (not path.is_symlink() and path.stat().st_size == len(data)
                and path.read_bytes() == data)
    except OSError:
        return False


def _clear_trainer_temp(ckpt: Path) -> None:
    """The trainer writes its checkpoint to CKPT.tmp and renames it; refuse a symbolic link or
    anything but a regular file there (a leftover of a killed run is removed)."""
    tmp = Path(f"{ckpt}.tmp")
    if not os.path.lexists(tmp):
        return
    if tmp.is_symlink() or not tmp.is_file():
        raise OutDirError(f"{tmp} is not a file bnnc left there (a symbolic link?)",
                          hint="remove it; the trainer writes its checkpoint through that name")
    try:
        tmp.unlink()
    except OSError as err:
        raise os_error(err, f"remove {tmp}") from None
