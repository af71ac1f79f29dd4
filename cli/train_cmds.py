"""`bnnc train MODEL.onnx --data mnist`: train a model with the numpy reference (host emulation).

Input: an ONNX/QONNX file (compiler.frontend) and a dataset name (runtime.datasets). Output: a
progress bar per epoch and one line per epoch with the mean train loss and accuracy of its steps and
the test accuracy (inference mode, running BN statistics). Only `--backend reference` exists until
codegen lands.

Invariants: the run is deterministic for a given --seed (batch order from numpy's default_rng(seed),
one permutation per epoch; stochastic rounding keyed by the seed); the last partial batch of an
epoch is dropped, as the compiled C program has a fixed batch. Options the algorithm already has off
(`--no-po2` with standard) and techniques that cannot act on the model
(compiler.config.check_config_for_graph) are ConfigErrors, not silently ignored.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import click
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..compiler.config import ALGORITHMS, BN_KINDS, OPTIMIZERS, STATE_DTYPES, TrainConfig, \
    check_config_for_graph, make_config
from ..compiler.errors import ConfigError, DataError
from ..compiler.ir import Graph
from . import cli

BACKENDS = ("reference", "c")


def _fit_to_model(graph: Graph, x: np.ndarray, what: str) -> np.ndarray:
    """Reshape dataset images to the model's per-sample input shape when element counts agree."""
    if x.shape[1:] == graph.input_shape:
        return x
    if int(np.prod(x.shape[1:])) == int(np.prod(graph.input_shape)):
        return x.reshape((len(x),) + graph.input_shape)
    raise DataError(f"{what} images are {x.shape[1:]} but model {graph.name!r} expects input "
                    f"{graph.input_shape}", hint="pick the dataset the model was built for")


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
              help="reference = numpy host emulation of the training step")
@click.option("--data", "data_name", required=True, help="dataset: mnist | fashion-mnist | ...")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="data root [default: $BNNC_DATA, else ~/.cache/bnnc/data]")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="passes over the training set [default: 1, or as many as --steps needs]")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="stop after this many optimizer steps in total")
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
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="use only the first N training examples")
def train_cmd(model: Path, backend: str, data_name: str, data_dir: Path | None, epochs: int | None,
              steps: int | None, limit: int | None, **opts) -> None:
    """Train MODEL (ONNX/QONNX) on a dataset with the reference trainer; report loss, accuracy."""
    if backend != "reference":
        raise ConfigError(f"--backend {backend} is not available yet: --backend c arrives with "
                          "codegen",
                          hint="use --backend reference")
    from ..compiler.frontend import load_model
    from ..runtime import reference as ref
    from ..runtime.datasets import load_dataset

    cfg = build_config(opts.pop("algorithm"), **opts)
    graph = load_model(model)
    check_config_for_graph(graph, cfg)
    data = load_dataset(data_name, data_dir)
    if data.classes != graph.num_classes:
        raise DataError(f"{data.name} has {data.classes} classes but model {graph.name!r} outputs "
                        f"{graph.num_classes}")
    x_train = _fit_to_model(graph, data.x_train, f"{data.name} train")
    x_test = _fit_to_model(graph, data.x_test, f"{data.name} test")
    y_train = data.y_train
    if limit is not None:
        x_train, y_train = x_train[:limit], y_train[:limit]
    per_epoch = len(x_train) // cfg.batch
    if per_epoch == 0:
        raise DataError(f"{len(x_train)} training examples do not fill one batch of {cfg.batch}",
                        hint="lower --batch or raise --limit")
    if epochs is None:
        epochs = 1 if steps is None else math.ceil(steps / per_epoch)
    total = per_epoch * epochs if steps is None else min(steps, per_epoch * epochs)

    console = Console(highlight=False, soft_wrap=True)
    console.print(f"{graph.name}: {cfg.algorithm} ({_techniques(cfg)}), {cfg.optimizer} "
                  f"lr {cfg.lr:g}, "
                  f"batch {cfg.batch}, {len(x_train)} train / {len(x_test)} test {data.name}, "
                  f"{total} steps")
    state = ref.init_state(graph, cfg)
    rng = np.random.default_rng(cfg.seed)
    done = 0
    for epoch in range(1, epochs + 1):
        order = rng.permutation(len(x_train))
        n_steps = min(per_epoch, total - done)
        losses, accs = [], []
        t0 = time.perf_counter()
        with Progress(TextColumn(f"epoch {epoch}/{epochs}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(),
                      console=console, transient=True, disable=not console.is_terminal) as bar:
            task = bar.add_task("train", total=n_steps, loss="-")
            for i in range(n_steps):
                idx = order[i * cfg.batch:(i + 1) * cfg.batch]
                state, out = ref.train_step(graph, cfg, state, x_train[idx], y_train[idx])
                losses.append(float(out["loss"]))
                accs.append(float(out["accuracy"]))
                bar.update(task, advance=1, loss=f"{np.mean(losses[-50:]):.4f}")
        done += n_steps
        loss = float(np.mean(losses))
        if not math.isfinite(loss):
            raise ConfigError(f"training diverged in epoch {epoch} (loss {loss})",
                              hint="lower --lr or use --state-dtype bf16/f32")
        test_acc = ref.evaluate(graph, cfg, state, x_test, data.y_test)
        console.print(f"epoch {epoch}/{epochs}  steps {done}  train loss {loss:.4f}  "
                      f"train acc {100 * np.mean(accs):.2f} %  test acc {100 * test_acc:.2f} %  "
                      f"({time.perf_counter() - t0:.1f} s)")
        if done >= total:
            break


def _techniques(cfg: TrainConfig) -> str:
    on = [name for name, flag in (("binary dW", cfg.binary_dw), ("PO2", cfg.po2),
                                  ("1-bit saves", cfg.save_bits)) if flag]
    return ", ".join(on + [f"BN {cfg.bn}", f"state {cfg.state_dtype}"])
