"""`bnnc export MODEL --state STATE.npz -o trained.onnx`: trained parameters -> inference ONNX.

Input: the model the state was trained from (ONNX/QONNX file or zoo name), an .npz of its state
tensors by name (`compiler.export.save_state_npz` or `np.savez(path, **state)`), and the training
options that decide the state's tensor names (--algorithm, --optimizer, --bn) and storage dtype
(--state-dtype). Output: one ONNX file, plain (`--format onnx`, runs in onnxruntime) or QONNX
(`--format qonnx`, latent weights behind BipolarQuant, the form to keep training from).
compiler/export.py states the semantics. A state that does not match the model and options is a
DataError naming the tensor, with a hint at the options its names suggest.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from ..compiler.config import ALGORITHMS, BN_KINDS, OPTIMIZERS, STATE_DTYPES, make_config
from ..compiler.errors import ConfigError
from ..compiler.export import FORMATS, export_onnx
from ..runtime.model_source import load_graph, model_bytes, model_preprocess
from ..runtime.outdir import class_names_of, read_compiled, saved_state_path, write_atomic
from ..runtime.state_blob import trained_state
from .app import cli


@cli.command("export", short_help="Write trained parameters as an inference ONNX/QONNX model.")
@click.argument("model")
@click.option("--state", "state_path", default=None,
              type=click.Path(dir_okay=False, path_type=Path),
              help=".npz of the state tensors by name (fc1.W, bn1.beta, bn1.running_mean, ...) "
                   "[default for a compiled OUT/: OUT/final_state.npz from `bnnc run`]")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="output .onnx file")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="onnx", show_default=True,
              help="onnx: +-1 weights folded, Where(x >= 0, 1, -1); qonnx: latent weights and "
                   "BipolarQuant")
@click.option("--algorithm", type=click.Choice(ALGORITHMS), default="proposed", show_default=True,
              help="the algorithm the state was trained with")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=None, help="[default: adam]")
@click.option("--bn", type=click.Choice(BN_KINDS), default=None,
              help="batch norm [default: l1 for proposed, l2 for standard]")
@click.option("--state-dtype", type=click.Choice(STATE_DTYPES), default=None,
              help="storage of the state [default: bf16 proposed, f32 standard]")
@click.option("--name", default=None, help="ONNX graph name [default: the model's]")
@click.option("--width", type=float, default=None, help="zoo models: the --width trained")
def export_cmd(model: str, state_path: Path | None, output: Path, fmt: str, algorithm: str,
               optimizer: str | None, bn: str | None, state_dtype: str | None, name: str | None,
               width: float | None) -> None:
    """Export MODEL with the trained state STATE.npz as an inference ONNX model (probabilities).

    MODEL may also be a `bnnc compile` output directory: its model, training options and the state
    `bnnc run` left there (OUT/final_state.npz, else the checkpoint OUT/state.bin) are used; --state
    may then also name a checkpoint blob the standalone trainer wrote (e.g. fetched from a device).
    The input preprocessing (OUT's, or the model file's) and the class names of the training data
    (OUT/data.json) go into the ONNX metadata ("bnnc.preprocess", "bnnc.classes").

    \b
    Examples:
      bnnc export mlp.onnx --state mlp_state.npz -o mlp_trained.onnx
      bnnc export cnv.onnx --state s.npz --algorithm standard --format qonnx -o cnv_q.onnx
      bnnc export out/mlp -o mlp_trained.onnx
      bnnc export out/mlp --state pi_checkpoint.bin -o mlp_trained.onnx
    """
    manifest, pre, names = None, None, None
    if Path(model).is_dir():
        manifest, graph, cfg = read_compiled(Path(model))
        pre, names = manifest.preprocess, class_names_of(Path(model))
        state_path = Path(state_path) if state_path is not None else saved_state_path(Path(model))
        if not os.path.lexists(state_path):
            raise ConfigError(f"{state_path} does not exist", hint=f"train first: bnnc run {model} "
                              "--data ...")
    else:
        if state_path is None:
            raise ConfigError("--state is required when MODEL is a model file",
                              hint="pass the .npz written by `bnnc train --save-state`")
        state_path = Path(state_path)
        cfg = make_config(algorithm, optimizer=optimizer, bn=bn, state_dtype=state_dtype)
        graph = load_graph(model, width=width)
        pre = model_preprocess(model_bytes(model, width=width), model, None)
    state = trained_state(graph, cfg, state_path, manifest)
    onnx_model = export_onnx(graph, cfg, state, fmt=fmt, name=name, preprocess=pre,
                             class_names=names)
    if not output.parent.is_dir():
        raise ConfigError(f"cannot write {output}: directory {output.parent} does not exist",
                          hint="create it first or choose another -o path")
    data = onnx_model.SerializeToString(deterministic=True)
    write_atomic(output, data)
    click.echo(f"wrote {output} ({len(data) / 1024:.1f} KiB): {onnx_model.graph.name}, "
               f"{'plain ONNX' if fmt == 'onnx' else 'QONNX'} opset 17, "
               f"{len(onnx_model.graph.node)} nodes, {len(state)} state tensors read "
               f"({cfg.algorithm}, {cfg.optimizer}, BN {cfg.bn}, {cfg.state_dtype}); "
               f"output 'probs' [N, {graph.num_classes}]")
