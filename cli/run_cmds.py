"""`bnnc run OUT/ --data mnist`: build a compiled output directory for the host and train with it.

Input: a `bnnc compile --target host` directory (C sources, manifest, model.onnx, init_state.npz) and a
dataset. The library is built with the target's flags (cached by content hash, runtime/host.py) and
driven through cffi; the loop (batch order, metrics, progress) is runtime/train_loop.py, the same one
`bnnc train` uses. Output: per-epoch metrics, OUT/state.bin (the C's versioned state blob; `--resume`
reads it) and OUT/final_state.npz (what `bnnc export OUT/` turns into ONNX).
"""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

from ..compiler.errors import DataError
from . import cli
from .train_cmds import data_options


@cli.command("run")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@data_options
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="use only the first N training examples")
@click.option("--seed", type=int, default=0, show_default=True,
              help="batch order (a resumed run must use the seed it started with)")
@click.option("--resume", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              default=None, help="start from a state blob written by an earlier run")
def run_cmd(out_dir: Path, data_name: str, data_dir: Path | None, epochs: int | None,
            steps: int | None, limit: int | None, seed: int, resume: Path | None) -> None:
    """Train with the C program compiled into OUT_DIR (host target), on a dataset.

    \b
    Example:
      bnnc compile mlp.onnx --target host -o out/mlp
      bnnc run out/mlp --data mnist --epochs 1
      bnnc export out/mlp -o mlp_trained.onnx
    """
    from ..runtime.host import HostProgram
    from ..runtime.outdir import (FINAL_STATE, STATE_BLOB, load_init_state, read_compiled,
                                  save_state_atomic, write_atomic)
    from ..runtime.train_loop import HostBackend, fit
    from .train_cmds import training_data

    manifest, graph, cfg = read_compiled(out_dir)
    if manifest.get("target", "host") != "host":
        raise DataError(f"{out_dir} was compiled for target {manifest['target']!r}; `bnnc run` "
                        "drives host builds", hint="compile with --target host")
    data, x_train, y_train, x_test = training_data(graph, data_name, data_dir, limit)

    console = Console(highlight=False, soft_wrap=True)
    program = HostProgram(out_dir, debug=False)
    backend = HostBackend(program, load_init_state(out_dir, graph, cfg), seed=cfg.seed)
    if resume is not None:
        program.set_state(resume.read_bytes())
    console.print(f"{graph.name}: emitted C ({program.library.name}), {cfg.algorithm}, "
                  f"{cfg.optimizer}, batch {cfg.batch}, arena {manifest['arena_nbytes']:,} B + "
                  f"state {manifest['state_nbytes']:,} B; {len(x_train)} train / {len(x_test)} "
                  f"test {data.name}" + (f"; resumed at step {program.step_count}" if resume else ""))
    fit(backend, x_train, y_train, x_test, data.y_test, epochs=epochs, steps=steps, seed=seed,
        start=program.step_count, console=console)
    # atomic: a run killed while writing leaves the previous checkpoint intact
    write_atomic(out_dir / STATE_BLOB, program.get_state())
    save_state_atomic(out_dir / FINAL_STATE, backend.state())
    console.print(f"wrote {out_dir / STATE_BLOB} (step {program.step_count}) and "
                  f"{out_dir / FINAL_STATE}")
