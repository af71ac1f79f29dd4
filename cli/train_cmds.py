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
import numpy as np
from rich.console import Console

from ..compiler.config import ALGORITHMS, BN_KINDS, OPTIMIZERS, STATE_DTYPES, TrainConfig, \
    check_config_for_graph, make_config
from ..compiler.errors import ConfigError, DataError
from ..compiler.ir import Graph
from ..runtime.train_loop import HostBackend, ReferenceBackend, fit
from . import cli

BACKENDS = ("reference", "c")


def fit_to_model(graph: Graph, x: np.ndarray, what: str) -> np.ndarray:
    """Reshape dataset images to the model's per-sample input shape when element counts agree."""
    if x.shape[1:] == graph.input_shape:
        return x
    if int(np.prod(x.shape[1:])) == int(np.prod(graph.input_shape)):
        return x.reshape((len(x),) + graph.input_shape)
    raise DataError(f"{what} images are {x.shape[1:]} but model {graph.name!r} expects input "
                    f"{graph.input_shape}", hint="pick the dataset the model was built for")


def data_options(f):
    """--data, --data-dir, --epochs, --steps: shared by `bnnc train` and `bnnc run`."""
    opts = [
        click.option("--data", "data_name", required=True,
                     help="dataset: mnist | fashion-mnist | ..."),
        click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="data root [default: $BNNC_DATA, else ~/.cache/bnnc/data]"),
        click.option("--epochs", type=click.IntRange(min=1), default=None,
                     help="passes over the training set [default: 1, or as many as --steps needs]"),
        click.option("--steps", type=click.IntRange(min=1), default=None,
                     help="stop after this many optimizer steps in total"),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def optimizer_options(f):
    """--bop-gamma, --bop-threshold, --bn-momentum: shared by `bnnc train`, `compile` and `check`
    (unset = TrainConfig's defaults, which the help states)."""
    d = TrainConfig()
    opts = [
        click.option("--bop-gamma", type=float, default=None,
                     help=f"Bop: momentum rate gamma [default: {d.bop_gamma:g}]"),
        click.option("--bop-threshold", type=float, default=None,
                     help="Bop: flip a weight when its momentum, counted in 1-bit gradient steps, "
                          f"exceeds this (Larq's tau / (gamma/sqrt(N_W))) "
                          f"[default: {d.bop_threshold:g}]"),
        click.option("--bn-momentum", type=float, default=None,
                     help="BN running statistics r = m r + (1 - m) batch "
                          f"[default: {d.bn_momentum:g}]"),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def training_data(graph: Graph, data_name: str, data_dir, limit: int | None):
    """(dataset, x_train, y_train, x_test) shaped for the model; `limit` cuts the training set."""
    from ..runtime.datasets import load_dataset

    data = load_dataset(data_name, data_dir)
    if data.classes != graph.num_classes:
        raise DataError(f"{data.name} has {data.classes} classes but model {graph.name!r} outputs "
                        f"{graph.num_classes}")
    x_train = fit_to_model(graph, data.x_train, f"{data.name} train")
    x_test = fit_to_model(graph, data.x_test, f"{data.name} test")
    y_train = data.y_train
    if limit is not None:
        x_train, y_train = x_train[:limit], y_train[:limit]
    return data, x_train, y_train, x_test


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
@click.option("--lr", type=float, default=None, help="learning rate [default: 1e-3]")
@optimizer_options
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="use only the first N training examples")
@click.option("--save-state", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="write the final training state (.npz) for `bnnc export`")
def train_cmd(model: Path, backend: str, data_name: str, data_dir: Path | None, epochs: int | None,
              steps: int | None, limit: int | None, save_state: Path | None, **opts) -> None:
    """Train MODEL (ONNX/QONNX) on a dataset with the numpy reference or the emitted C."""
    from ..compiler.frontend import load_model

    cfg = build_config(opts.pop("algorithm"), **opts)
    graph = load_model(model)
    check_config_for_graph(graph, cfg)
    data, x_train, y_train, x_test = training_data(graph, data_name, data_dir, limit)
    console = Console(highlight=False, soft_wrap=True)
    console.print(f"{graph.name}: {cfg.algorithm} ({_techniques(cfg)}), {cfg.optimizer} "
                  f"lr {cfg.lr:g}, "
                  f"batch {cfg.batch}, {len(x_train)} train / {len(x_test)} test {data.name}")
    if backend == "c":
        trainer, tmp = _c_backend(graph, cfg, model)
    else:
        trainer, tmp = ReferenceBackend(graph, cfg), None
    try:
        fit(trainer, x_train, y_train, x_test, data.y_test, epochs=epochs, steps=steps,
            seed=cfg.seed, console=console)
        if save_state is not None:
            from ..runtime.outdir import save_state_atomic
            save_state_atomic(save_state, trainer.state())     # a crash leaves the old file
            console.print(f"wrote {save_state} (training state; `bnnc export` turns it into ONNX)")
    finally:
        if tmp is not None:
            tmp.cleanup()


def _c_backend(graph, cfg, model: Path):
    """Emit the C for the host into a temporary directory and load it (built once per content)."""
    import tempfile

    from ..compiler.codegen import load_target
    from ..compiler.pipeline import compile_to_c
    from ..runtime import reference as ref
    from ..runtime.host import HostProgram

    tmp = tempfile.TemporaryDirectory(prefix="bnnc-train-")
    out = Path(tmp.name)
    compile_to_c(graph, cfg, load_target("host"), out,
                 command=f"bnnc train {model.name} --backend c")
    program = HostProgram(out, debug=False)
    return HostBackend(program, ref.init_state(graph, cfg).tensors, seed=cfg.seed), tmp


def _techniques(cfg: TrainConfig) -> str:
    on = [name for name, flag in (("binary dW", cfg.binary_dw), ("PO2", cfg.po2),
                                  ("1-bit saves", cfg.save_bits)) if flag]
    return ", ".join(on + [f"BN {cfg.bn}", f"state {cfg.state_dtype}"])
