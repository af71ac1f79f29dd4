"""The `bnnc` command line. One module per command family; this file holds the group and the error policy:
a BnncError becomes one readable line (plus a hint) and exit code 2, never a traceback."""

from __future__ import annotations

import sys

import click

from .. import __version__
from ..compiler.errors import BnncError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="bnnc")
def cli() -> None:
    """bnnc -- compile an ONNX binary neural network into a static C training program.

    \b
    Typical session:
      bnnc zoo mlp -o mlp.onnx                     write a built-in model
      bnnc info mlp.onnx                           what the importer sees
      bnnc inspect mlp.onnx --compare standard,proposed --html arena.html
                                                   training memory, planned statically
      bnnc compile mlp.onnx --target host -o out   emit the C trainer
      bnnc check mlp.onnx                          its gradients vs the numpy reference
      bnnc run out --data mnist --epochs 1         train the emitted C (bnnc data fetch mnist)
      bnnc export out -o trained.onnx              the trained model as inference ONNX
    """


def main(argv: list[str] | None = None) -> int:
    try:
        cli.main(args=argv, prog_name="bnnc", standalone_mode=False)
    except BnncError as e:
        click.echo(f"error: {e.message}", err=True)
        if e.hint:
            click.echo(f"hint: {e.hint}", err=True)
        return 2
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    return 0


def run() -> None:
    sys.exit(main())


# command modules register themselves on `cli` when imported
from . import model_cmds  # noqa: E402,F401
from . import zoo_cmds  # noqa: E402,F401
from . import data_cmds  # noqa: E402,F401
from . import train_cmds  # noqa: E402,F401
from . import memory_cmds  # noqa: E402,F401
from . import compile_cmds  # noqa: E402,F401
from . import export_cmds  # noqa: E402,F401
from . import run_cmds  # noqa: E402,F401
