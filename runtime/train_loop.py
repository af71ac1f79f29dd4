"""The epoch loop of `bnnc train` (numpy reference or emitted C for the host): batches, progress
bar, per-epoch metrics; and its two backends.

Input: a backend (anything with `batch`, `set_horizon(steps)` (the lr schedule's),
`step(x, y) -> (loss, acc)`, `predict(x) -> probs`, `state() -> dict`), training and test arrays already shaped for the model. Output: one
`EpochResult` per epoch, printed as it completes.

Invariants: deterministic for a given seed (one numpy `default_rng(seed)` permutation per epoch);
the last partial batch of an epoch is dropped because a compiled program has a fixed batch; the
test set is evaluated in whole batches, the last one zero-padded and its padding ignored.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..compiler.config import TrainConfig
from ..compiler.errors import ConfigError, DataError
from ..compiler.ir import Graph
from ..compiler.pipeline import compile_to_c
from ..compiler.target import load_target
from . import reference as ref
from .host import HostProgram


@dataclass(frozen=True)
class EpochResult:
    epoch: int
    steps: int              # optimizer steps so far (a resumed run counts the earlier ones)
    train_loss: float       # mean over this epoch's steps
    train_acc: float
    test_acc: float         # nan when there is no test split
    seconds: float          # wall time of this epoch's training steps
    ms_per_step: float


class ReferenceBackend:
    """The numpy reference trainer (runtime/reference.py)."""

    name = "reference"

    def __init__(self, graph, cfg, state=None):
        self.graph, self.cfg, self.batch = graph, cfg, cfg.batch
        self.st = state if state is not None else ref.init_state(graph, cfg)

    def set_horizon(self, steps: int) -> None:
        self.st.horizon = steps

    def step(self, x, y) -> tuple[float, float]:
        self.st, out = ref.train_step(self.graph, self.cfg, self.st, x, y)
        return float(out["loss"]), float(out["accuracy"])

    def predict(self, x) -> np.ndarray:
        return ref.predict(self.graph, self.cfg, self.st, x)

    def state(self) -> dict[str, np.ndarray]:
        return dict(self.st.tensors)


class HostBackend:
    """Emitted C loaded in-process (runtime/host.py), started from the given state tensors."""

    name = "c"

    def __init__(self, program, init_tensors: dict[str, np.ndarray], *, seed: int = 0):
        self.prog, self.batch = program, program.batch
        program.load_state(init_tensors, step=0, seed=seed)

    def set_horizon(self, steps: int) -> None:
        self.prog.set_lr_horizon(steps)

    def step(self, x, y) -> tuple[float, float]:
        return self.prog.train_step(x, y)

    def predict(self, x) -> np.ndarray:
        return self.prog.predict(x)

    def state(self) -> dict[str, np.ndarray]:
        return self.prog.read_state()


def c_backend(graph: Graph, cfg: TrainConfig, command: str
              ) -> tuple[HostBackend, tempfile.TemporaryDirectory]:
    """Emit the C for the host into a temporary directory (the caller cleans it up) and load it,
    built once per content, started from the reference's initial state."""
    tmp = tempfile.TemporaryDirectory(prefix="bnnc-train-")
    out = Path(tmp.name)
    compile_to_c(graph, cfg, load_target("host"), out, command=command)
    program = HostProgram(out, debug=False)
    return HostBackend(program, ref.init_state(graph, cfg).tensors, seed=cfg.seed), tmp


def evaluate(backend, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy over (x, y) in whole batches of `backend.batch`."""
    b, hits = backend.batch, 0
    for i in range(0, len(y), b):
        xb = x[i:i + b]
        n = len(xb)
        if n < b:
            xb = np.concatenate([xb, np.zeros((b - n,) + xb.shape[1:], xb.dtype)])
        hits += int((backend.predict(xb)[:n].argmax(axis=1) == y[i:i + n]).sum())
    return hits / max(1, len(y))


def fit(backend, x_train, y_train, x_test, y_test, *, epochs: int | None, steps: int | None,
        seed: int, start: int = 0, console: Console | None = None) -> list[EpochResult]:
    """Train `epochs` passes (or `steps` steps) after `start` steps already taken; a resumed run
    sees exactly the batches an uninterrupted run with the same seed would have seen. The lr
    schedule's horizon is the run's last step (start + the steps trained here), as `bnnc run`'s."""
    console = console or Console(highlight=False, soft_wrap=True)
    b = backend.batch
    per_epoch = len(x_train) // b
    if per_epoch == 0:
        raise DataError(f"{len(x_train)} training examples do not fill one batch of {b}",
                        hint="lower --batch or raise --limit")
    skip = start % per_epoch                 # steps of the current epoch already trained
    if epochs is None:
        epochs = 1 if steps is None else math.ceil((skip + steps) / per_epoch)
    total = per_epoch * epochs - skip if steps is None else min(steps, per_epoch * epochs - skip)
    backend.set_horizon(start + total)       # the lr schedule decays to the run's last step
    rng = np.random.default_rng(seed)
    for _ in range(start // per_epoch):      # the permutations of epochs already trained
        rng.permutation(len(x_train))
    done, results = 0, []
    for epoch in range(1, epochs + 1):
        order = rng.permutation(len(x_train))[skip * b:]
        n_steps = min(per_epoch - skip, total - done)
        skip = 0
        losses, accs = [], []
        t0 = time.perf_counter()
        with Progress(TextColumn(f"epoch {epoch}/{epochs}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(),
                      console=console, transient=True, disable=not console.is_terminal) as bar:
            task = bar.add_task("train", total=n_steps, loss="-")
            for i in range(n_steps):
                idx = order[i * b:(i + 1) * b]
                loss, acc = backend.step(x_train[idx], y_train[idx])
                losses.append(loss)
                accs.append(acc)
                bar.update(task, advance=1, loss=f"{np.mean(losses[-50:]):.4f}")
        seconds = time.perf_counter() - t0
        done += n_steps
        loss = float(np.mean(losses))
        if not math.isfinite(loss):
            raise ConfigError(f"training diverged in epoch {epoch} (loss {loss})",
                              hint="lower --lr or use --state-dtype bf16/f32")
        test_acc = evaluate(backend, x_test, y_test) if len(y_test) else math.nan
        r = EpochResult(epoch, start + done, loss, float(np.mean(accs)), test_acc,
                        seconds, 1000 * seconds / max(1, n_steps))
        results.append(r)
        test = f"{100 * r.test_acc:.2f} %" if len(y_test) else "n/a (no test split)"
        console.print(f"epoch {epoch}/{epochs}  steps {start + done}  train loss {r.train_loss:.4f}  "
                      f"train acc {100 * r.train_acc:.2f} %  test acc {test}  "
                      f"({r.seconds:.1f} s, {r.ms_per_step:.2f} ms/step)")
        if done >= total:
            break
    return results
