"""The `bnnc` command line. One module per command family, registered on the group of cli/app.py;
this file holds the entry point and the error policy, which every command gets for free:

- a BnncError becomes one `error:` line (its message; further lines of it indented) plus an
  optional `hint:` line, exit code 2;
- an OSError that no command turned into a BnncError (a full disk, a read-only filesystem, a file
  that vanished) becomes `error: cannot <what>: <reason>` naming the file, exit code 2;
- MemoryError becomes one `error:` line, exit code 2;
- anything else is a bug in bnnc: one `error: internal error ...` line, exit code 70 (the fault
  harness counts these as failures); `BNNC_TRACEBACK=1` shows the traceback instead;
- a BnncWarning becomes one `warning:` line.
Never a traceback."""

from __future__ import annotations

import os
import sys
import warnings

import click

from ..compiler.errors import BnncError, BnncWarning
from . import (compile_cmds, data_cmds, eval_cmds, export_cmds, fleet_cmds,  # noqa: F401
               memory_cmds, model_cmds, profile_cmds, run_cmds, train_cmds, zoo_cmds)
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


def _error(message: str, hint: str | None = None) -> None:
    lines = str(message).splitlines() or [""]
    click.echo(f"error: {lines[0]}", err=True)
    for line in lines[1:]:
        click.echo(f"  {line}", err=True)
    if hint:
        click.echo(f"hint: {hint}", err=True)


def _main(argv: list[str] | None) -> int:
    try:
        cli.main(args=argv, prog_name="bnnc", standalone_mode=False)
    except BnncError as e:
        _error(e.message, e.hint)
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
    except OSError as e:
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        _error(f"cannot access{where}: {e.strerror or e}",
               "check the path, free space and permissions")
        return 2
    except MemoryError:
        _error("out of memory", "use a smaller batch or model")
        return 2
    except Exception as e:  # noqa: BLE001 -- the last line of defence: a bug, reported as such
        if os.environ.get("BNNC_TRACEBACK"):
            raise
        _error(f"internal error ({type(e).__name__}: {str(e)[:300]}); this is a bug in bnnc",
               "please report it with the command line (BNNC_TRACEBACK=1 shows the traceback)")
        return INTERNAL_ERROR_EXIT
    return 0


INTERNAL_ERROR_EXIT = 70      # EX_SOFTWARE


def run() -> None:
    sys.exit(main())
