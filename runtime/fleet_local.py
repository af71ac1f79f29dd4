"""A fleet device's work on the emitted C (the fleet itself: runtime/fleet.py): local training
in-process through cffi (`train_host`) or with the standalone trainer, natively, under QEMU or
over ssh (`train_standalone`, runtime/run.py); the BN statistics of the global weights on the
device's data (`calibration_stats`, `bn_stats="calibrate"`); the test accuracy of a state
(`evaluate`) and its state blob as the C encodes it (`state_blob_of`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..compiler.errors import DataError
from .baremetal import start_state_blob
from .fleet import FleetTensor
from .outdir import STATE_BLOB, read_compiled, write_atomic
from .run import RunOptions, TrainerEvent, run_compiled
from .state_blob import read_state_blob


# --------------------------------------------------------------------------------------------------
# BN calibration of the global model on the device's data (bn_stats="calibrate")

def calibration_stats(program, tensors: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray,
                      specs: Sequence[FleetTensor], *, batches: int, momentum: float,
                      order_key: Sequence[int]) -> tuple[dict[str, np.ndarray], int]:
    """Each BN layer's batch statistics at the weights of `tensors` on up to `batches` local
    batches (drawn by `order_key`), averaged per channel: {running stat name: float32 values} and
    the number of examples used. The emitted C computes them: a train step started from zero
    running statistics leaves `(1 - momentum) * batch statistic` in them (the weights it
    updates are discarded: every batch starts again from `tensors`)."""
    b = program.batch
    nb = min(batches, len(x) // b)
    if nb < 1:
        raise DataError(f"{len(x)} local examples do not fill one batch of {b}")
    start = dict(tensors)
    for ft in specs:
        start[ft.name] = np.zeros(ft.shape, np.float32)
    perm = np.random.default_rng([*order_key]).permutation(len(x))
    acc = {ft.name: np.zeros(ft.shape, np.float64) for ft in specs}
    for k in range(nb):
        idx = perm[k * b:(k + 1) * b]
        program.load_state(start, step=0, seed=0)
        program.train_step(x[idx], y[idx])
        got = program.read_state()
        for ft in specs:
            acc[ft.name] += np.asarray(got[ft.name], np.float64)
    scale = 1.0 / (nb * (1.0 - momentum))
    return {k: (v * scale).astype(np.float32) for k, v in acc.items()}, nb * b


# --------------------------------------------------------------------------------------------------
# local training: the emitted C in-process (host), or the standalone trainer (run.py)

@dataclass(frozen=True)
class LocalResult:
    tensors: dict             # the full state after training, by name (float32, bits +-1)
    blob: bytes               # the same as the program's state blob
    examples: int
    steps: int
    loss: float
    acc: float
    test_acc: float | None = None


def train_host(program, tensors: Mapping[str, np.ndarray], step: int, seed: int, x: np.ndarray,
               y: np.ndarray, *, epochs: int, order_key: Sequence[int]) -> LocalResult:
    """`epochs` passes over (x, y) with the emitted C loaded by cffi (runtime/host.py); batch order:
    a numpy permutation per epoch keyed by `order_key` (fleet seed, round, device). The lr is the
    constant --lr: a round's local epochs are a slice of a run no device sees whole
    (compiler/README.md, "Learning-rate schedule")."""
    b = program.batch
    per_epoch = len(x) // b
    if per_epoch == 0:
        raise DataError(f"{len(x)} local examples do not fill one batch of {b}")
    program.load_state(tensors, step=step, seed=seed)
    program.set_lr_horizon(0)
    losses, accs = [], []
    for e in range(epochs):
        perm = np.random.default_rng([*order_key, e]).permutation(len(x))
        for k in range(per_epoch):
            idx = perm[k * b:(k + 1) * b]
            loss, acc = program.train_step(x[idx], y[idx])
            losses.append(loss)
            accs.append(acc)
    return LocalResult(program.read_state(), program.get_state(), len(x), len(losses),
                       float(np.mean(losses)), float(np.mean(accs)))


def train_standalone(out_dir: Path, tensors: Mapping[str, np.ndarray], step: int, seed: int,
                     indices: np.ndarray, *, epochs: int, data_name: str, data_dir: Path | None,
                     emulate: bool, device: str | None,
                     timeout: float | None = None) -> LocalResult:
    """`epochs` passes over the training examples `indices` with the standalone trainer compiled
    into `out_dir` (a device's private copy): native, QEMU (`emulate`) or ssh (`device`), through
    runtime/run.py, started from a state blob of `tensors`, read back from its checkpoint."""
    manifest, _, _ = read_compiled(out_dir)
    start = Path(out_dir) / "fleet_start.bin"
    write_atomic(start, start_state_blob(out_dir, tensors, step=step, seed=seed))
    per_epoch = len(indices) // manifest.batch
    if per_epoch == 0:
        raise DataError(f"{len(indices)} local examples do not fill one batch of "
                        f"{manifest.batch}")
    seen: list[dict] = []
    run_compiled(Path(out_dir), RunOptions(data_name, data_dir, steps=epochs * per_epoch,
                                           resume=start, lr_horizon=0,     # constant lr, as
                                           emulate=emulate, device=device,  # train_host
                                           indices=tuple(int(i) for i in indices),
                                           timeout=timeout),
                 lambda ev: seen.append(ev.fields) if isinstance(ev, TrainerEvent) else None)
    raw = (Path(out_dir) / STATE_BLOB).read_bytes()
    blob = read_state_blob(Path(out_dir) / STATE_BLOB, manifest)
    ends = [e for e in seen if e.get("event") == "epoch"]
    loss = float(ends[-1].get("train_loss", float("nan"))) if ends else float("nan")
    acc = float(ends[-1].get("train_acc", float("nan"))) if ends else float("nan")
    return LocalResult(blob.tensors, raw, len(indices), blob.step - step, loss, acc)


# --------------------------------------------------------------------------------------------------
# evaluation of a global state

def evaluate(program, tensors: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray, *,
             seed: int = 0) -> float:
    """Test accuracy of `tensors` with the emitted C's predict (whole batches, the last padded)."""
    program.load_state(tensors, step=0, seed=seed)
    b, n, hits = program.batch, len(x), 0
    for at in range(0, n, b):
        xb = x[at:at + b]
        k = len(xb)
        if k < b:
            xb = np.concatenate([xb, np.zeros((b - k, *xb.shape[1:]), xb.dtype)])
        hits += int(np.sum(np.argmax(program.predict(xb)[:k], axis=1) == y[at:at + k]))
    return hits / max(n, 1)


def state_blob_of(program, tensors: Mapping[str, np.ndarray], *, step: int, seed: int) -> bytes:
    """The state blob of `tensors`, encoded by the emitted C (so its bytes are the C's own)."""
    program.load_state(tensors, step=step, seed=seed)
    return program.get_state()
