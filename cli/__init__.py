"""The `bnnc` command line. One module per command family, registered on the group of cli/app.py;
this file holds the entry point and the error policy: a BnncError becomes one readable line (plus a
hint) and exit code 2, never a traceback; a BnncWarning becomes one `warning:` line."""

from __future__ import annotations

import sys
import warnings

import click

from ..compiler.errors import BnncError, BnncWarning
from . import (compile_cmds, data_cmds, eval_cmds, export_cmds, memory_cmds,  # noqa: F401
               model_cmds, run_cmds, train_cmds, zoo_cmds)
from .app import cli


def _show_warning(message, category, *_args, **_kwargs) -> None:
    if issubclass(category, BnncWarning):
        click.echo(f"warning: {message}", err=True)
    else:
        click.echo(warnings.formatwarning(message, category, *_args[:2]), err=True, nl=False)


def main(argv: list[str] | None = None) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("always", BnncWarning)
        warnings.showwarning = _show_warning
        return _main(argv)


def _main(argv: list[str] | None) -> int:
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
