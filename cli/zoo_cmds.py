"""`bnnc zoo`: write one of the built-in models (compiler/zoo.py) to an ONNX file, or list them.

`bnnc zoo NAME -o FILE [--format onnx|qonnx] [--seed N] [--width F] [--image-size N] [--classes N]`;
`bnnc zoo --list` / `bnnc zoo list` (or `bnnc zoo` alone) prints the names, a description and the
weight count at the given --width/--classes. Bad names and options raise ConfigError from
compiler.zoo, which the CLI group turns into one `error:` line.
"""

from __future__ import annotations

from pathlib import Path

import click

from ..compiler.errors import ConfigError
from ..compiler.zoo import FORMATS, ZOO, build_zoo_model, zoo_weight_count
from ..runtime.outdir import write_atomic
from .app import cli


def _listing(width: float, classes: int | None) -> str:
    rows = []
    for name, e in ZOO.items():
        shape = f"{e.channels}x{e.image_size}x{e.image_size}"
        count = zoo_weight_count(name, width=width, num_classes=classes)
        rows.append((name, shape, f"{count:,}", e.description))
    head = ("name", "input", "weights", "description")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(3)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}"
             for r in [head] + rows]
    scale = f" at --width {width:g}" if width != 1.0 else ""
    lines.append(f"(weights: conv/dense W and b, BN excluded{scale}; ImageNet models take "
                 f"--image-size, default 224)")
    return "\n".join(lines)


@cli.command("zoo", short_help="Write a built-in model (mlp, cnv, binarynet, ...); --list.")
@click.argument("name", required=False)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="output file [default: NAME.onnx]")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="onnx", show_default=True,
              help="binarizer idiom: plain ONNX Where(x >= 0, 1, -1) or QONNX BipolarQuant")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the latent weights")
@click.option("--width", type=float, default=1.0, show_default=True,
              help="scale every hidden width / channel count (e.g. cnv --width 0.25 = CNV small)")
@click.option("--image-size", type=int, default=None,
              help="input height and width, ImageNet models only [default: 224]")
@click.option("--classes", type=int, default=None,
              help="number of classes [default: 10, ImageNet models 1000]")
@click.option("--list", "list_", is_flag=True, help="list the models and exit")
def zoo(name: str | None, output: Path | None, fmt: str, seed: int, width: float,
        image_size: int | None, classes: int | None, list_: bool) -> None:
    """Write a built-in model NAME (untrained) to an ONNX file; `bnnc zoo --list` shows the names.

    \b
    Examples:
      bnnc zoo mlp -o mlp.onnx
      bnnc zoo cnv --width 0.25 --format qonnx -o cnv_small.onnx
      bnnc zoo resnete18 --image-size 32 --width 0.125 -o r18_tiny.onnx
    """
    if list_ or name in (None, "list"):
        if output is not None:
            raise ConfigError("bnnc zoo --list writes no file; drop -o or give a model name")
        click.echo(_listing(width, classes))
        return
    assert name is not None
    model = build_zoo_model(name, fmt=fmt, seed=seed, width=width, image_size=image_size,
                            num_classes=classes)
    path = output if output is not None else Path(f"{name}.onnx")
    if not path.parent.is_dir():
        raise ConfigError(f"cannot write {path}: directory {path.parent} does not exist",
                          hint="create it first or choose another -o path")
    data = model.SerializeToString()
    write_atomic(path, data)
    props = {p.key: p.value for p in model.metadata_props}
    click.echo(f"wrote {path} ({len(data) / 2**20:.1f} MiB): {name} {props['bnnc.zoo.args']}, "
               f"{int(props['bnnc.zoo.weights']):,} weights")
