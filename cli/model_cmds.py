"""Model commands: `bnnc info` (and `bnnc zoo`, registered from compiler.zoo's CLI module).

`bnnc info model.onnx [--batch N]` imports the model with the frontend and prints what bnnc sees:
one row per IR layer (bnnc name, kind, ONNX node, output shape, parameter count, binary/real) and
totals. Import errors are BnncErrors: one line and exit code 2 (cli/__init__.py).
"""

from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..compiler.frontend import load_model, printable
from ..compiler.ir import WEIGHT_KINDS, Graph, LayerKind
from .app import cli


def _weights_kind(layer) -> str:
    if layer.kind in WEIGHT_KINDS:
        return "binary" if layer.binary else "real"
    if layer.kind is LayerKind.BATCHNORM:
        return "real"
    if layer.kind is LayerKind.AFFINE:
        return "const"     # folded constants: Graph.param_count() does not count them
    return ""


def layer_table(graph: Graph, batch: int | None = None) -> Table:
    """A rich table of the graph's layers; shapes get a leading batch dim when `batch` is set."""
    lead = (batch,) if batch else ()
    t = Table(title=f"{graph.name}: input {list(lead + graph.input_shape)} "
              f"(ONNX layout {graph.input_layout})", title_justify="left")
    for col, just in (("layer", "left"), ("kind", "left"), ("ONNX node", "left"),
                      ("output shape", "left"), ("params", "right"), ("weights", "left")):
        t.add_column(col, justify=just, overflow="fold")
    for lay in graph.layers:
        n = sum(int(v.size) for v in lay.params.values())
        # ONNX names are untrusted: no rich markup ("[/x]" would raise), no control characters
        t.add_row(lay.name, lay.kind.value, Text(printable(lay.onnx_name)),
                  str(list(lead + lay.shape)),
                  f"{n:,}" if n else "", _weights_kind(lay))
    return t


def totals(graph: Graph) -> dict[str, int]:
    """Trainable parameter totals: all, binary weights (latent W of binary layers), real."""
    total = graph.param_count()
    binary = sum(int(lay.params["W"].size) for lay in graph.layers if lay.binary)
    return {"parameters": total, "binary weights": binary, "real parameters": total - binary}


@cli.command("info")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--batch", type=click.IntRange(min=1), default=None,
              help="Show shapes with this batch size (the file's batch dimension is ignored).")
def info(model: str, batch: int | None) -> None:
    """Show the layers bnnc imports from an ONNX/QONNX MODEL file."""
    graph = load_model(model)
    console = Console(width=max(Console().width, 110))
    console.print(layer_table(graph, batch))
    tot = totals(graph)
    console.print(f"layers: {len(graph.layers)}   classes: {graph.num_classes}   "
                  f"sha256: {graph.source_sha256[:16]}")
    console.print("   ".join(f"{k}: {v:,}" for k, v in tot.items()))
