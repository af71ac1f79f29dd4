"""`bnnc inspect` (the memory plan of one training step: tables, --json, --html, --compare) and
`bnnc memory` (the paper's spreadsheet next to bnnc's plans, over batch sizes).

MODEL is an ONNX file or a zoo name (`bnnc zoo --list`); `bnnc inspect` also reads a compiled output
directory (or its plan.json) and re-verifies the plan before showing it. The pipeline is
frontend -> schedule -> liveness -> planner -> report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from dataclasses import replace

from ..compiler.config import (ALGORITHMS, BN_KINDS, FROZEN_BN, INPUT_HELP, INPUT_KINDS,
                               OPTIMIZERS, STATE_DTYPES, make_config, with_input,
                               resolve_frozen)
from ..compiler.errors import ConfigError
from ..compiler.preprocess import DEFAULT as DEFAULT_PREPROCESS
from ..compiler.preprocess import input_channels, pixel_affine
from ..compiler.liveness import IO_MODES
from ..compiler.memory_model import spreadsheet
from ..compiler.plan_check import check_plan
from ..compiler.planner import plan_schedule
from ..compiler.report import (describe_config, dump_plan_json, format_report, format_timeline,
                               load_plan_json, plan_from_json, plan_to_html, plan_to_json)
from ..compiler.schedule import build_schedule
from ..runtime.model_source import load_graph
from ..runtime.outdir import write_atomic
from .app import cli

MIB = float(1 << 20)


def pixel_input(cfg, graph, kind: str | None, pre=None):
    """`cfg` with `--input KIND` for `graph` under preprocessing `pre` (default: symmetric; the
    map's values change no byte of the plan)."""
    if kind in (None, "f32"):
        return cfg
    return with_input(cfg, graph, kind, pixel_affine(pre or DEFAULT_PREPROCESS,
                                                     input_channels(graph.input_shape)))


def plan_document(graph, cfg, align: int, io: str = "arena") -> dict[str, Any]:
    """The verified plan of one training step of `graph` under `cfg`, as a report document."""
    schedule = build_schedule(graph, cfg)
    live, plan = plan_schedule(schedule, align=align, io=io)
    return plan_to_json(schedule, live, plan)


frozen_bn_option = click.option(
    "--frozen-bn", type=click.Choice(FROZEN_BN), default=None,
    help="partial training, frozen batch norms with nothing trainable before them: 'batch' = "
         "batch statistics, running statistics updated (adapts to a new input distribution, "
         "AdaBN); 'running' = inference mode (running statistics, constant: the features "
         "inference sees; up to 1 pp better on the model's own input distribution, far worse "
         "on shifted inputs) [default: batch]")


def technique_options(f):
    """The technique switches shared by inspect/compile/check (unset = the algorithm's default)."""
    opts = [
        click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=None,
                     help="optimizer [default: adam]"),
        click.option("--binary-dw/--no-binary-dw", default=None,
                     help="1-bit weight gradients [proposed: on]"),
        click.option("--po2/--no-po2", default=None,
                     help="5-bit power-of-two activation gradients [proposed: on]"),
        click.option("--po2-bias", type=int, default=None, help="PO2 exponent bias [default: 8]"),
        click.option("--bn", type=click.Choice(BN_KINDS), default=None,
                     help="batch norm: l1 (1-bit backward) or l2 [proposed: l1]"),
        click.option("--state-dtype", type=click.Choice(STATE_DTYPES), default=None,
                     help="storage of weights, moments, BN state [proposed: bf16]"),
        click.option("--save-bits/--no-save-bits", default=None,
                     help="binary layers keep saved inputs and masks as packed bits "
                          "[proposed: on]"),
        click.option("--fuse/--no-fuse", default=None,
                     help="memory fusions of the plan (with --save-bits): a conv feeding only a "
                          "max-pool, or only an l1 batch norm and sign, runs in batch chunks so "
                          "its f32 output never exists whole (CNV B=100: 6.29x less memory than "
                          "standard, about 14 % slower); --no-fuse: separate steps [on]"),
        click.option("--input", "input_kind", type=click.Choice(INPUT_KINDS), default=None,
                     help=INPUT_HELP),
        frozen_bn_option,
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def freeze_options(f):
    """--train / --train-from: partial training (compiler.config.resolve_frozen)."""
    opts = [
        click.option("--train", "train", default=None, metavar="LAYER[,LAYER...]|bn",
                     help="train only these layers (bnnc names: fc3, bn3, ...; `bnnc info "
                          "MODEL` lists them), or 'bn' for batch norms and biases only "
                          "(TinyTL style); the rest is frozen [default: everything]"),
        click.option("--train-from", "train_from", default=None, metavar="LAYER",
                     help="train LAYER and every layer after it (a trainable suffix); with "
                          "--train, the union is trained"),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def with_freeze(cfg, graph, train: str | None, train_from: str | None):
    """`cfg` with the freeze set of --train/--train-from on `graph`."""
    return replace(cfg, frozen=resolve_frozen(graph, train=train, train_from=train_from,
                                              bn=cfg.bn))


_IO_HELP = ("where the batch lives: 'arena' (copied in by the train-step entry, counted) or "
            "'caller' (read in place from the caller's buffers, as the paper counts it)")


def _write(path: Path, text: str) -> None:
    if not path.parent.is_dir():
        raise ConfigError(f"cannot write {path}: directory {path.parent} does not exist")
    write_atomic(path, text.encode())


def _is_plan_path(model: str) -> bool:
    p = Path(model)
    return p.is_dir() or (p.is_file() and p.suffix == ".json")


@cli.command("inspect")
@click.argument("model")
@click.option("--algorithm", type=click.Choice(ALGORITHMS), default=None,
              help="training algorithm [default: proposed]")
@click.option("--batch", type=int, default=None, help="batch size [default: 100]")
@technique_options
@freeze_options
@click.option("--align", type=int, default=None,
              help="byte alignment of every buffer [default: 16]")
@click.option("--width", type=float, default=None,
              help="zoo models: scale every width/channel count")
@click.option("--image-size", type=int, default=None, help="zoo ImageNet models: input size")
@click.option("--io", type=click.Choice(IO_MODES), default=None,
              help=_IO_HELP + " [default: arena]")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="write the plan document (schema bnnc-plan v1) to FILE")
@click.option("--html", "html_path", type=click.Path(dir_okay=False, path_type=Path),
              help="write a self-contained picture of the arena to FILE")
@click.option("--compare", default=None, metavar="ALG,ALG",
              help="plan several algorithms (e.g. standard,proposed) with the same options and "
                   "show them side by side")
@click.option("--tensors/--no-tensors", default=False, show_default=True,
              help="list every tensor with its offset and live interval")
@click.option("--timeline", is_flag=True, help="draw the arena as text, one line per step")
def inspect(model: str, algorithm: str | None, batch: int | None, align: int | None,
            width: float | None, image_size: int | None, io: str | None, json_path: Path | None,
            html_path: Path | None, compare: str | None, tensors: bool, timeline: bool,
            train: str | None, train_from: str | None, **techniques) -> None:
    """Show the static memory plan of one training step of MODEL.

    MODEL is an ONNX file, a zoo name, or a `bnnc compile` output directory (its plan.json).

    \b
    Examples:
      bnnc inspect mlp --batch 200
      bnnc inspect cnv.onnx --algorithm standard --tensors
      bnnc inspect binarynet --compare standard,proposed --html plan.html
      bnnc inspect tfc --batch 32 --train-from fc3
      bnnc inspect out/mlp
    """
    input_kind = techniques.pop("input_kind", None)
    given = {k: v for k, v in techniques.items() if v is not None}
    if input_kind is not None:
        given["input"] = input_kind
    if _is_plan_path(model):
        extra = [n for n, v in (("--algorithm", algorithm), ("--batch", batch), ("--align", align),
                                ("--width", width), ("--image-size", image_size), ("--io", io),
                                ("--compare", compare), ("--train", train),
                                ("--train-from", train_from)) if v is not None]
        extra += ["--" + k.replace("_", "-") for k in given]
        if extra:
            raise ConfigError(f"{model} is a compiled plan; {', '.join(extra)} cannot change it",
                              hint="inspect the ONNX model instead to try other options")
        docs = [load_plan_json(model)]
        live, plan = plan_from_json(docs[0])
        check_plan(live, plan)
    else:
        algorithms = [algorithm or "proposed"]
        if compare is not None:
            if algorithm is not None:
                raise ConfigError("give either --algorithm or --compare, not both")
            algorithms = [a.strip() for a in compare.split(",") if a.strip()]
            bad = [a for a in algorithms if a not in ALGORITHMS]
            if bad or len(algorithms) < 2 or len(set(algorithms)) != len(algorithms):
                raise ConfigError(f"--compare {compare!r}: list two or more distinct algorithms "
                                  f"from {', '.join(ALGORITHMS)}, e.g. --compare standard,proposed")
            if json_path is not None:
                raise ConfigError("--json writes one plan; drop --compare or run once per "
                                  "algorithm")
        graph = load_graph(model, width=width, image_size=image_size)
        given.pop("input", None)
        docs = []
        for alg in algorithms:
            cfg = make_config(alg, batch=batch if batch is not None else 100, **given)
            cfg = with_freeze(cfg, graph, train, train_from)
            if alg == "proposed" or compare is None:
                cfg = pixel_input(cfg, graph, input_kind)
            docs.append(plan_document(graph, cfg, 16 if align is None else align, io or "arena"))

    if len(docs) == 1:
        click.echo(format_report(docs[0], tensors=tensors), nl=False)
    else:
        click.echo(_comparison(docs), nl=False)
        if tensors:
            for d in docs:
                click.echo("")
                click.echo(format_report(d, tensors=True), nl=False)
    if timeline:
        for d in docs:
            click.echo("")
            click.echo(format_timeline(d), nl=False)
    if json_path is not None:
        _write(json_path, dump_plan_json(docs[0]))
        click.echo(f"wrote {json_path}")
    if html_path is not None:
        _write(html_path, plan_to_html(docs))
        click.echo(f"wrote {html_path}")


def _comparison(docs: list[dict[str, Any]]) -> str:
    base = docs[0]["total_nbytes"]
    lines = [f"bnnc memory plans: {docs[0]['model']}"]
    for d in docs:
        lines.append(f"  {d['config']['algorithm']}: {describe_config(d['config'])}")
    head = ("algorithm", "arena MiB", "state MiB", "total MiB", "efficiency",
            f"vs {docs[0]['config']['algorithm']}")
    rows = [(d["config"]["algorithm"], f"{d['arena']['nbytes'] / MIB:.3f}",
             f"{d['state']['nbytes'] / MIB:.3f}", f"{d['total_nbytes'] / MIB:.3f}",
             f"{d['arena']['efficiency']:.4f}", f"{base / d['total_nbytes']:.2f}x")
            for d in docs]
    return "\n".join(lines + [""] + _rows(head, rows)) + "\n"


def _rows(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))
    return [line(head), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]


def _batches(text: str) -> list[int]:
    bad = ConfigError(f"--batch {text!r}: give comma-separated positive integers, e.g. "
                      f"10,100,1000")
    try:
        out = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise bad from None
    if not out or any(b < 1 for b in out):
        raise bad
    return out


@cli.command("memory")
@click.argument("model")
@click.option("--batch", "batch_text", default="100", show_default=True, metavar="N[,N...]",
              help="batch sizes, comma-separated")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="adam", show_default=True)
@click.option("--align", type=int, default=16, show_default=True,
              help="byte alignment of every buffer")
@click.option("--width", type=float, default=None,
              help="zoo models: scale every width/channel count")
@click.option("--image-size", type=int, default=None, help="zoo ImageNet models: input size")
@click.option("--io", type=click.Choice(IO_MODES), default="arena", show_default=True,
              help=_IO_HELP)
@click.option("--input", "input_kind", type=click.Choice(INPUT_KINDS), default="f32",
              show_default=True,
              help="the proposed column's input storage: u8 = 8-bit pixels and the integer first "
                   "layer (bnnc compile --input; standard keeps f32: its first layer is float)")
@click.option("--fuse/--no-fuse", default=True, show_default=True,
              help="the proposed column's memory fusions (bnnc compile --fuse)")
@freeze_options
def memory(model: str, batch_text: str, optimizer: str, align: int, width: float | None,
           image_size: int | None, io: str, input_kind: str, fuse: bool, train: str | None,
           train_from: str | None) -> None:
    """The paper's memory spreadsheet next to bnnc's planned bytes, standard and proposed.

    Spreadsheet columns follow ALGORITHM.md §4 (every input live at once, two gradient buffers of
    the largest size); bnnc columns are arena + state of the verified liveness plan of the real
    training step. MiB = bytes / 2^20.

    \b
    Examples:
      bnnc memory mlp --batch 100,200
      bnnc memory binarynet --batch 10,100,1000 --optimizer bop
    """
    batches = _batches(batch_text)
    graph = load_graph(model, width=width, image_size=image_size)
    head = ("batch", "sheet std", "sheet prop", "ratio", "bnnc std", "bnnc prop", "ratio",
            "eff std", "eff prop")
    rows = []
    for b in batches:
        sheet = [spreadsheet(graph, b, alg, optimizer)["total"] for alg in ("standard", "proposed")]
        docs = [plan_document(graph, pixel_input(
                    with_freeze(make_config(alg, batch=b, optimizer=optimizer,
                                            fuse=fuse or alg == "standard"), graph, train,
                                train_from), graph, input_kind if alg == "proposed" else None),
                              align, io)
                for alg in ("standard", "proposed")]
        real = [d["total_nbytes"] / MIB for d in docs]
        rows.append((str(b), f"{sheet[0]:.2f}", f"{sheet[1]:.2f}", f"{sheet[0] / sheet[1]:.2f}x",
                     f"{real[0]:.2f}", f"{real[1]:.2f}", f"{real[0] / real[1]:.2f}x",
                     f"{docs[0]['arena']['efficiency']:.3f}",
                     f"{docs[1]['arena']['efficiency']:.3f}"))
    where = "copied into the arena" if io == "arena" else "read from the caller's buffers"
    click.echo(f"{graph.name}: memory of one training step in MiB, optimizer {optimizer} "
               f"(sheet = the paper's spreadsheet model; bnnc = planned arena + state, batch "
               f"{where})")
    click.echo("\n".join(_rows(head, rows)))
