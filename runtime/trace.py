"""`bnnc check` on a cross target: run K training steps in the target's debug build (under QEMU)
and replay its recorded tensors through the same comparison as the in-process host check.

Input: a compiled output directory for a Linux or bare-metal target, the initial state and K
batches. The trace formats are the ones documented in templates/trainer/skeleton.c.j2
(`--check-in` / `--check-out`): the program loads the state, and for each batch records the state
before the step, the status, loss and accuracy, every tensor of the tensor table after the step
(the -DBNNC_DEBUG_DUMP copies, so in-place reuse hides nothing) and the state after the step.

Output: a `RecordedProgram`, which answers the calls runtime/check.py makes of a live
`HostProgram` (`load_state`, `read_state`, `train_step`, `tensor`, `tensors`, `step_count`) from the
recording, so the comparison code is one and the same for host and device builds.
"""

from __future__ import annotations

import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..compiler.contract import STATUSES, Manifest, read_manifest
from ..compiler.errors import DataError, TargetError
from ..compiler.target import Target
from . import baremetal
from .host import decode, split_state
from .programs import LocalRunner, build_trainer, check_result
from .state_blob import state_values_f32

IN_MAGIC, OUT_MAGIC = 0x49434E42, 0x4F434E42        # "BNCI", "BNCO"


def trace_input(manifest: Manifest, init: Mapping[str, np.ndarray],
                batches: Sequence[tuple[np.ndarray, np.ndarray]]) -> bytes:
    parts = [struct.pack("<II", IN_MAGIC, len(batches)), state_values_f32(manifest, init)]
    u8 = manifest.config.get("input") == "u8"
    for x, y in batches:
        parts.append(np.ascontiguousarray(x, "u1" if u8 else "<f4").tobytes())
        parts.append(np.ascontiguousarray(y, "<i4").tobytes())
    return b"".join(parts)


@dataclass
class StepRecord:
    status: int
    loss: float
    accuracy: float
    pre: dict[str, np.ndarray]
    raw: dict[str, bytes]
    post: dict[str, np.ndarray]


def parse_trace(manifest: Manifest, raw: bytes) -> list[StepRecord]:
    n_state = manifest.state_elems
    if len(raw) < 8:
        raise DataError("the check trace is empty (the program wrote nothing)")
    magic, steps = struct.unpack_from("<II", raw)
    if magic != OUT_MAGIC:
        raise DataError("the check trace has a wrong magic number")
    at, records = 8, []
    table = manifest.tensors
    for _ in range(steps):
        status, loss, acc = struct.unpack_from("<iff", raw, at)
        at += 12
        pre = np.frombuffer(raw, "<f4", n_state, at).astype(np.float32)
        at += 4 * n_state
        tensors = {}
        for t in table:
            tensors[t.name] = raw[at:at + t.nbytes]
            at += t.nbytes
        post = np.frombuffer(raw, "<f4", n_state, at).astype(np.float32)
        at += 4 * n_state
        records.append(StepRecord(status, loss, acc, split_state(manifest, pre), tensors,
                                  split_state(manifest, post)))
    if at != len(raw):
        raise DataError(f"the check trace has {len(raw)} bytes, expected {at}")
    return records


def run_trace(out_dir: Path, target: Target, trace_in: bytes, *, timeout: float = 1800) -> bytes:
    """Run the target's debug build on `trace_in`; return the --check-out bytes."""
    if target.kind == "baremetal":
        return baremetal.check_trace(out_dir, target, trace_in)
    exe = build_trainer(out_dir, target, debug=True)
    with tempfile.TemporaryDirectory(prefix="bnnc-trace-") as tmp:
        fin, fout = Path(tmp) / "check.in", Path(tmp) / "check.out"
        fin.write_bytes(trace_in)
        res = LocalRunner(target).run(exe, ["--check-in", str(fin), "--check-out", str(fout)],
                                      timeout=timeout)
        check_result(res, f"the {target.name} check program")
        return fout.read_bytes()


class RecordedProgram:
    """A finished device run, answering HostProgram's calls step by step (module docstring)."""

    def __init__(self, out_dir: Path, target: Target, batches, init: Mapping[str, np.ndarray]):
        self.out_dir = Path(out_dir)
        self.manifest = m = read_manifest(out_dir)
        self.batch = m.batch
        self.tensors = m.tensor_by_name
        self.batches = list(batches)
        self.records = parse_trace(m, run_trace(self.out_dir, target,
                                                trace_input(m, init, self.batches)))
        if len(self.records) != len(self.batches):
            raise DataError(f"the check trace holds {len(self.records)} steps, expected "
                            f"{len(self.batches)}")
        self._k = 0           # steps replayed
        self._init = {k: np.asarray(v, np.float32) for k, v in init.items()}

    def load_state(self, tensors, *, step: int = 0, seed: int = 0) -> None:
        if step != 0 or any(not np.array_equal(np.asarray(tensors[k], np.float32), v)
                            for k, v in self._init.items()):
            raise AssertionError("a recorded program replays the state it was started with")

    @property
    def step_count(self) -> int:
        return self._k

    def read_state(self) -> dict[str, np.ndarray]:
        """The state after the last replayed step (before the first: the recorded start)."""
        return self.records[self._k - 1].post if self._k else self.records[0].pre

    def train_step(self, x, labels) -> tuple[float, float]:
        if self._k >= len(self.records):
            raise AssertionError("more steps replayed than recorded")
        bx, by = self.batches[self._k]
        if not (np.array_equal(bx, x) and np.array_equal(by, labels)):
            raise AssertionError("replayed batch differs from the recorded one")
        rec = self.records[self._k]
        self._k += 1
        if rec.status != 0:
            text = STATUSES[rec.status][1] if 0 <= rec.status < len(STATUSES) else rec.status
            raise DataError(f"train_step on the device: {text}")
        return rec.loss, rec.accuracy

    def raw(self, name: str) -> bytes:
        if name not in self.tensors:
            raise TargetError(f"no tensor {name!r} in the trace")
        return self.records[self._k - 1].raw[name]

    def tensor(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        if t.alias_of:
            return decode(self.raw(name), self.tensors[t.alias_of]).reshape(t.shape)
        return decode(self.raw(name), t)
