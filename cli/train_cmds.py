"""`bnnc train MODEL.onnx --data mnist`: train a model with the numpy reference (host emulation,
the default) or with the emitted C for the host (`--backend c`, compiled into a temp directory).

Input: an ONNX/QONNX file (compiler.frontend) and a dataset name (runtime.datasets). Output: a
progress bar per epoch and one line per epoch with the mean train loss and accuracy of its steps and
the test accuracy (inference mode, running BN statistics); the loop is runtime/train_loop.py.

Invariants: the run is deterministic for a given --seed (batch order from numpy's default_rng(seed),
one permutation per epoch; stochastic rounding keyed by the seed); the last partial batch of an
epoch is dropped, as the compiled C program has a fixed batch. Options the algorithm already has off
(`--no-po2` with standard) and techniques that cannot act on the model
(compiler.config.check_config_for_graph) are ConfigErrors, not silently ignored.
"""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

from ..compiler.config import ALGORITHMS, BN_KINDS, LR_SCHEDULES, OPTIMIZER_DEFAULTS, OPTIMIZERS, \
    STATE_DTYPES, TrainConfig, check_config_for_graph, make_config
from ..compiler.errors import ConfigError
from ..compiler.frontend import load_model
from ..compiler.preprocess import SPEC_HELP
from ..runtime.datasets import DataRequest, open_data
from ..runtime.model_source import model_preprocess
from ..runtime.outdir import save_state_atomic
from ..runtime.transforms import FIT_HELP, FIT_MODES, LAYOUTS
from ..runtime.train_loop import ReferenceBackend, c_backend, fit
from .memory_cmds import freeze_options, frozen_bn_option, with_freeze
from .app import cli

BACKENDS = ("reference", "c")


DATA_HELP = ("dataset: a name (mnist, fashion-mnist, cifar10, svhn), a .npz with x, y [x_test, "
             "y_test, class_names], an x.npy (+ y.npy), a .csv (with --label-column), or an image "
             "folder with one subfolder per class (optionally train/ and test/)")


def data_source_options(f=None, *, positional: bool = False):
    """--data (`positional`: a DATA argument) and how it is read, split and fitted to the model:
    shared by `bnnc train`, `run`, `eval` and `data pack` (runtime/datasets.py `DataRequest`)."""
    if f is None:
        return lambda g: data_source_options(g, positional=positional)
    opts = [
        click.argument("data_name", metavar="DATA") if positional else
        click.option("--data", "data_name", required=True, help=DATA_HELP),
        click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="root of the named datasets [default: $BNNC_DATA, else "
                          "~/.cache/bnnc/data]"),
        click.option("--test-data", default=None, metavar="SPEC",
                     help="the test split from a second source (same forms as --data) "
                          "[default: the data's own test split]"),
        click.option("--val-split", type=float, default=None, metavar="F",
                     help="hold out this fraction of the training data as the test split "
                          "(seeded by --split-seed)"),
        click.option("--split-seed", type=int, default=0, show_default=True,
                     help="seed of the --val-split permutation"),
        click.option("--label-column", default=None, metavar="NAME",
                     help="CSV data: the column holding each row's class"),
        click.option("--fit", type=click.Choice(FIT_MODES), default=None,
                     help=FIT_HELP + " [default: auto; `bnnc eval OUT`: what `bnnc run` used]"),
        click.option("--layout", type=click.Choice(LAYOUTS), default=None,
                     help="layout of 3-d array examples [default: guessed from the shape]"),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def data_request(data_name: str, data_dir: Path | None, test_data: str | None,
                 val_split: float | None, split_seed: int, label_column: str | None,
                 fit: str | None, layout: str | None, limit: int | None = None) -> DataRequest:
    """The DataRequest of the data options; `fit` None (not given) stays None so that `bnnc eval
    OUT` can take the one `bnnc run` recorded (`open_data` reads None as "auto")."""
    return DataRequest(data_name, data_dir, test_data, val_split, split_seed, label_column, fit,
                       layout, limit)


def data_options(f):
    """data_source_options plus --epochs, --steps: shared by `bnnc train` and `bnnc run`."""
    opts = [
        click.option("--epochs", type=click.IntRange(min=1), default=None,
                     help="passes over the training set [default: 1, or as many as --steps needs]"),
        click.option("--steps", type=click.IntRange(min=1), default=None,
                     help="stop after this many optimizer steps in total"),
    ]
    for o in reversed(opts):
        f = o(f)
    return data_source_options(f)


def lr_help() -> str:
    """The --lr help of `train`, `compile` and `check`, with the defaults from compiler.config."""
    return (f"learning rate of Adam/SGD (with Bop: Adam's, on the real-valued tensors) "
            f"[default: {TrainConfig().lr:g}; bop: {OPTIMIZER_DEFAULTS['bop']['lr']:g}]")


def optimizer_options(f):
    """--bop-gamma, --bop-threshold, --bop-bn-shift, --lr-schedule, --bn-momentum: shared by
    `bnnc train`, `compile` and `check`
    (unset = TrainConfig's defaults, which the help states)."""
    d = TrainConfig()
    opts = [
        click.option("--bop-gamma", type=float, default=None,
                     help=f"Bop: momentum rate gamma [default: {d.bop_gamma:g}]"),
        click.option("--bop-threshold", type=float, default=None,
                     help="Bop: flip a weight when its momentum, counted in gradient steps of "
                          "mean magnitude (Larq's tau / (gamma mean|g|)), exceeds this "
                          f"[default: {d.bop_threshold:g}]"),
        click.option("--lr-schedule", default=None, metavar="|".join(LR_SCHEDULES),
                     help="learning rate over a run (Adam/SGD; Bop's real-valued tensors): "
                          "constant, or decaying from --lr to 0 at the run's last step, "
                          "linearly or as a half cosine; `bnnc run`, `bnnc train` and the "
                          "trainers decay over the steps they are asked for, the firmware "
                          "library and the fleet train at --lr (compiler/README.md, "
                          f"\"Learning-rate schedule\") [default: {d.lr_schedule}]"),
        click.option("--bop-bn-shift/--no-bop-bn-shift", default=None,
                     help="Bop: when a dense layer's weight flips, shift the running mean of the "
                          "batch norm it feeds by the flip's effect on the batch (compiler/"
                          f"README.md, \"Bop\") [default: {'on' if d.bop_bn_shift else 'off'}]"),
        click.option("--bn-momentum", type=float, default=None,
                     help="BN running statistics r = m r + (1 - m) batch "
                          f"[default: {d.bn_momentum:g}]"),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _redundant_flags(algorithm: str, no_binary_dw: bool, no_po2: bool) -> None:
    if algorithm == "standard":
        off = [f for f, on in (("--no-binary-dw", no_binary_dw), ("--no-po2", no_po2)) if on]
        if off:
            raise ConfigError(f"{' and '.join(off)} has no effect with --algorithm standard "
                              "(it never uses these techniques)", hint="drop the flag(s)")


def build_config(algorithm: str, **opts) -> TrainConfig:
    """TrainConfig from CLI options; None / unset flags keep the algorithm's defaults."""
    no_binary_dw = opts.pop("no_binary_dw", False)
    no_po2 = opts.pop("no_po2", False)
    _redundant_flags(algorithm, no_binary_dw, no_po2)
    if no_binary_dw:
        opts["binary_dw"] = False
    if no_po2:
        opts["po2"] = False
    return make_config(algorithm, **opts)


@cli.command("train")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--backend", type=click.Choice(BACKENDS), default="reference", show_default=True,
              help="reference = numpy host emulation of the training step; c = the emitted C "
                   "for the host (built and loaded through cffi)")
@data_options
@click.option("--batch", type=click.IntRange(min=1), default=None, help="batch size [default: 100]")
@click.option("--algorithm", type=click.Choice(ALGORITHMS), default="proposed", show_default=True)
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=None, help="[default: adam]")
@click.option("--no-binary-dw", is_flag=True, help="real-valued weight gradients (proposed only)")
@click.option("--no-po2", is_flag=True, help="float activation gradients (proposed only)")
@click.option("--bn", type=click.Choice(BN_KINDS), default=None,
              help="batch norm [default: l1 for proposed, l2 for standard]")
@click.option("--state-dtype", type=click.Choice(STATE_DTYPES), default=None,
              help="storage of weights/moments/BN [default: bf16 proposed, f32 standard]")
@click.option("--po2-bias", type=int, default=None, help="PO2 exponent bias [default: 8]")
@click.option("--lr", type=float, default=None, help=lr_help())
@optimizer_options
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="use only the first N training examples")
@click.option("--save-state", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="write the final training state (.npz) for `bnnc export`")
@click.option("--preprocess", default=None, metavar="SPEC",
              help=f"u8 pixel -> input map: {SPEC_HELP} [default: the model file's, else "
                   "symmetric]")
@freeze_options
@frozen_bn_option
def train_cmd(model: Path, backend: str, epochs: int | None, steps: int | None,
              limit: int | None, save_state: Path | None, preprocess: str | None,
              train: str | None, train_from: str | None, **opts) -> None:
    """Train MODEL (ONNX/QONNX) on a dataset with the numpy reference or the emitted C.

    The whole dataset is held in memory (float32); `bnnc run` streams it instead."""
    req = data_request(*(opts.pop(k) for k in ("data_name", "data_dir", "test_data", "val_split",
                                               "split_seed", "label_column", "fit", "layout")),
                       limit=limit)
    cfg = build_config(opts.pop("algorithm"), **opts)
    graph = load_model(model)
    cfg = with_freeze(cfg, graph, train, train_from)
    check_config_for_graph(graph, cfg)
    pre = model_preprocess(model.read_bytes(), str(model), preprocess)
    data = open_data(req, graph.input_shape, graph.num_classes, model_name=repr(graph.name))
    x_train, y_train = data.arrays("train", pre)
    x_test, y_test = (data.arrays("test", pre) if data.test is not None
                      else (x_train[:0], y_train[:0]))
    console = Console(highlight=False, soft_wrap=True)
    console.print(f"{graph.name}: {cfg.algorithm} ({_techniques(cfg)}), {cfg.optimizer} "
                  f"lr {cfg.lr:g} ({cfg.lr_schedule}), "
                  f"batch {cfg.batch}, {len(x_train)} train / {len(x_test)} test {data.name}; "
                  f"input: {data.fit.describe()}; pixels {pre.describe()}")
    if backend == "c":
        trainer, tmp = c_backend(graph, cfg, f"bnnc train {model.name} --backend c")
    else:
        trainer, tmp = ReferenceBackend(graph, cfg), None
    try:
        fit(trainer, x_train, y_train, x_test, y_test, epochs=epochs, steps=steps,
            seed=cfg.seed, console=console)
        if save_state is not None:
            save_state_atomic(save_state, trainer.state())     # a crash leaves the old file
            console.print(f"wrote {save_state} (training state; `bnnc export` turns it into ONNX)")
    finally:
        if tmp is not None:
            tmp.cleanup()


def _techniques(cfg: TrainConfig) -> str:
    on = [name for name, flag in (("binary dW", cfg.binary_dw), ("PO2", cfg.po2),
                                  ("1-bit saves", cfg.save_bits)) if flag]
    frozen = [f"{len(cfg.frozen)} parameters frozen"] if cfg.frozen else []
    return ", ".join(on + [f"BN {cfg.bn}", f"state {cfg.state_dtype}"] + frozen)
