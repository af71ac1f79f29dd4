"""`bnnc eval OUT|MODEL --data NAME [--state FILE|init]`: accuracy, mean loss and the confusion
matrix of a state of a model (runtime/eval.py does the work; this module parses and prints)."""

from __future__ import annotations

from pathlib import Path

import click

from ..compiler.config import ALGORITHMS, BN_KINDS, OPTIMIZERS, STATE_DTYPES, make_config
from ..compiler.errors import ConfigError
from ..compiler.preprocess import SPEC_HELP
from ..runtime import reference as ref
from ..runtime.datasets import open_data
from ..runtime.eval import (EvalOptions, EvalResult, confusion_png, confusion_text, eval_compiled,
                            eval_model, save_predictions)
from ..runtime.model_source import load_graph, model_bytes, model_class_names, model_preprocess
from ..runtime.state_blob import trained_state
from .app import cli
from .run_cmds import where_options
from .train_cmds import data_request, data_source_options


@cli.command("eval", short_help="Accuracy, mean loss and confusion matrix of a model's state.")
@click.argument("model")
@data_source_options
@click.option("--state", "state", default=None, metavar="FILE|init",
              help="the state to score: `init` (step 0), an .npz of state tensors, or a "
                   "checkpoint blob of a compiled OUT [default for OUT: the state `bnnc run` left "
                   "there, else step 0; for a model file: step 0]")
@click.option("--split", type=click.Choice(("test", "train")), default="test", show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="with --split train: the first N training examples only")
@click.option("--png", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="also draw the confusion matrix into this PNG file")
@click.option("--predictions", type=click.Path(dir_okay=False, path_type=Path), default=None,
              metavar="FILE.npy", help="also save each example's predicted class (int64 .npy, "
                                       "in the split's order)")
@where_options
@click.option("--timeout", type=float, default=None, help="give up after this many seconds")
@click.option("--preprocess", default=None, metavar="SPEC",
              help=f"model file only (OUT has its own): {SPEC_HELP} [default: the file's, else "
                   "symmetric]")
@click.option("--algorithm", type=click.Choice(ALGORITHMS), default="proposed", show_default=True,
              help="model file only: the algorithm whose inference is scored (BN kind)")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=None,
              help="model file only: the optimizer of the --state .npz [default: adam]")
@click.option("--bn", type=click.Choice(BN_KINDS), default=None, help="model file only")
@click.option("--state-dtype", type=click.Choice(STATE_DTYPES), default=None,
              help="model file only")
@click.option("--batch", type=click.IntRange(min=1), default=100, show_default=True,
              help="model file only: inference batch")
@click.option("--width", type=float, default=None, help="zoo models: the --width")
def eval_cmd(model: str, state: str | None, split: str, limit: int | None, png: Path | None,
             predictions: Path | None, emulate: bool, device: str | None, port: int | None, identity: Path | None,
             ssh_options: tuple[str, ...], timeout: float | None, preprocess: str | None,
             algorithm: str, optimizer: str | None, bn: str | None, state_dtype: str | None,
             batch: int, width: float | None, **data_opts) -> None:
    """Score a state of MODEL on a dataset split: accuracy, mean loss, confusion matrix.

    \b
    MODEL is a `bnnc compile` output directory (the compiled program scores itself where it
    runs: natively, --emulate under QEMU, --device over ssh) or an ONNX file / zoo name (the
    numpy reference). Step 0 is a state like any other (--state init).
    \b
    Examples:
      bnnc eval out/tfc --data mnist --state init         # before any training step
      bnnc eval out/tfc --data mnist --state init --predictions step0.npy
                            # then: python scripts/ort_eval.py tfc.onnx --compare step0.npy
      bnnc eval out/tfc --data mnist --png confusion.png  # after `bnnc run`
      bnnc eval out/m4 --emulate --data mnist --state out/m4/state.bin
      bnnc eval model.onnx --data photos/ --fit resize --val-split 0.2
    """
    req = data_request(**data_opts, limit=limit)
    if Path(model).is_dir():
        r = eval_compiled(Path(model), EvalOptions(req, split, state, emulate, device, port,
                                                   identity, tuple(ssh_options), timeout))
    else:
        if emulate or device:
            raise ConfigError("--emulate/--device run a compiled program; MODEL is a model file",
                              hint="compile it first: bnnc compile MODEL --target T -o OUT")
        cfg = make_config(algorithm, optimizer=optimizer, bn=bn, state_dtype=state_dtype,
                          batch=batch)
        graph = load_graph(model, width=width)
        source = model_bytes(model, width=width)
        pre = model_preprocess(source, model, preprocess)
        names = model_class_names(source)
        data = open_data(req, graph.input_shape, graph.num_classes, model_name=repr(graph.name))
        if state in (None, "init"):
            tensors, label = ref.init_state(graph, cfg).tensors, "step 0 (the model file's)"
        else:
            tensors, label = trained_state(graph, cfg, Path(state), None), state
        r = eval_model(graph, cfg, tensors, data, pre, split=split, state=label,
                       class_names=names)
    _print(r)
    if png is not None:
        confusion_png(r, png)
        click.echo(f"wrote {png}")
    if predictions is not None:
        save_predictions(r, predictions)
        click.echo(f"wrote {predictions}")


def _print(r: EvalResult) -> None:
    click.echo(f"{r.model}: {r.data} {r.split}, {r.count} examples, state {r.state}, on {r.where}")
    click.echo(f"accuracy {100 * r.accuracy:.2f} %   mean loss {r.mean_loss:.4f}")
    click.echo(confusion_text(r))
