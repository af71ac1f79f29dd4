"""The fleet's state on disk: the server's global checkpoint and each device's own state, so a fleet
stopped at any moment resumes from its last committed round (the fleet itself: runtime/fleet.py).

Global checkpoint (`FleetCheckpoint`): FLEET_DIR/global-rNNNNN.bin, the full state as bnnc's state
blob (magic, model hash, CRC-32: `bnnc export` and `read_state_blob` read it), then
FLEET_DIR/fleet.json (round, the blob's name and sha256, the history) written atomically: the json
is the commit point, so a crash at any moment leaves the previous round's global state intact, and
a run resumes from the last committed round.

A device's own state (`DeviceStore`): DIR/state-rNNNNN.bin, its full state blob after round N
(optimizer moments, local BN statistics, step counter: Adam's moments and its bias-correction
count carry on from the device's previous round, [bnnc choice] measured in README "Train a
fleet"). Round N+1 starts from the newest blob of a
round <= N, so a resumed fleet repeats exactly what an uninterrupted one does. A device writes
nothing outside DIR (named by the device's configuration, never by a server message).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..compiler.contract import Manifest
from ..compiler.errors import DataError
from .fleet import FleetTensor
from .outdir import FINAL_STATE, load_init_state, read_compiled, save_state_atomic, write_atomic
from .state_blob import StateBlob, read_state_blob

log = logging.getLogger("bnnc.fleet")

CHECKPOINT_JSON = "fleet.json"


# --------------------------------------------------------------------------------------------------
# the global checkpoint

@dataclass
class FleetCheckpoint:
    """FLEET_DIR's committed state (module docstring)."""
    fleet_dir: Path
    round: int = 0
    blob: str | None = None          # file name of the global state blob of `round`
    blob_sha256: str | None = None
    settings: dict = field(default_factory=dict)
    history: list = field(default_factory=list)     # one record per finished round

    @classmethod
    def load(cls, fleet_dir: Path) -> FleetCheckpoint | None:
        path = Path(fleet_dir) / CHECKPOINT_JSON
        if not path.is_file():
            return None
        try:
            doc = json.loads(path.read_text())
            return cls(Path(fleet_dir), int(doc["round"]), doc["blob"], doc["blob_sha256"],
                       dict(doc["settings"]), list(doc["history"]))
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(f"{path} is not a bnnc fleet checkpoint ({err})",
                            hint="point --fleet-dir at a new directory") from err

    def global_blob(self, manifest: Manifest) -> StateBlob:
        """The committed global state, validated (sha256, then the blob's own header and CRC)."""
        path = self.fleet_dir / str(self.blob)
        raw = path.read_bytes() if path.is_file() else b""
        if hashlib.sha256(raw).hexdigest() != self.blob_sha256:
            raise DataError(f"{path} does not match {CHECKPOINT_JSON} (sha256)",
                            hint="the fleet directory was altered; start a new one")
        return read_state_blob(path, manifest)

    def commit(self, round_: int, blob: bytes, record: dict) -> None:
        """Publish round `round_`'s global state: the blob first, then fleet.json (atomic)."""
        name = f"global-r{round_:05d}.bin"
        write_atomic(self.fleet_dir / name, blob)
        self.round, self.blob = round_, name
        self.blob_sha256 = hashlib.sha256(blob).hexdigest()
        self.history.append(record)
        doc = {"round": self.round, "blob": self.blob, "blob_sha256": self.blob_sha256,
               "settings": self.settings, "history": self.history}
        write_atomic(self.fleet_dir / CHECKPOINT_JSON,
                     (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())
        for old in self.fleet_dir.glob("global-r*.bin"):
            if old.name != name and _round_of(old.name) < round_ - 1:
                old.unlink(missing_ok=True)


def _round_of(name: str) -> int:
    m = re.search(r"-r(\d+)\.(?:bin|npz)$", name)
    return int(m.group(1)) if m else -1


def export_final(fleet_dir: Path, out_dir: Path) -> Path:
    """FLEET_DIR/final_state.npz: the committed global state by name (for `bnnc export`)."""
    manifest, _, _ = read_compiled(out_dir)
    ck = FleetCheckpoint.load(fleet_dir)
    if ck is None or ck.blob is None:
        raise DataError(f"{fleet_dir} holds no finished fleet round")
    dest = Path(fleet_dir) / FINAL_STATE
    save_state_atomic(dest, ck.global_blob(manifest).tensors)
    return dest


# --------------------------------------------------------------------------------------------------
# a device's own state

class DeviceStore:
    """DIR/state-rNNNNN.bin: a device's full state after round N (module docstring)."""

    def __init__(self, where: Path):
        self.dir = Path(where)
        self.dir.mkdir(parents=True, exist_ok=True)

    def latest_before(self, round_: int, manifest: Manifest) -> StateBlob | None:
        """The newest valid state of a round < `round_`; a damaged file is logged and skipped."""
        found = self._latest(round_, manifest)
        return found[1] if found else None

    def _latest(self, round_: int, manifest: Manifest) -> tuple[int, StateBlob] | None:
        for path in sorted(self.dir.glob("state-r*.bin"), key=lambda p: -_round_of(p.name)):
            if _round_of(path.name) >= round_:
                continue
            try:
                return _round_of(path.name), read_state_blob(path, manifest)
            except DataError as err:
                log.warning("device state %s skipped: %s", path, err.message)
        return None

    def save(self, round_: int, blob: bytes,
             residual: Mapping[str, np.ndarray] | None = None) -> None:
        """The state after round `round_` (and the 1-bit uplink's error-feedback residual, first:
        a residual without its state is never read)."""
        if residual is not None:
            buf = io.BytesIO()
            np.savez(buf, **{k: np.asarray(v, np.float32) for k, v in residual.items()})
            write_atomic(self.dir / f"residual-r{round_:05d}.npz", buf.getvalue())
        write_atomic(self.dir / f"state-r{round_:05d}.bin", blob)
        for old in [*self.dir.glob("state-r*.bin"), *self.dir.glob("residual-r*.npz")]:
            if _round_of(old.name) < round_ - 1 or _round_of(old.name) > round_:
                old.unlink(missing_ok=True)

    def residual_before(self, round_: int, manifest: Manifest,
                        specs: Sequence[FleetTensor]) -> dict | None:
        """The error-feedback residual saved with the state `latest_before(round_)` starts from
        (None: none, or a damaged one, logged)."""
        start = self._latest(round_, manifest)
        if start is None:
            return None
        path = self.dir / f"residual-r{start[0]:05d}.npz"
        if not path.is_file():
            return None
        want = {ft.name: ft.shape for ft in specs if ft.dtype != "bit"}
        try:
            with np.load(path, allow_pickle=False) as z:
                got = {k: z[k] for k in z.files}
            if set(got) != set(want) or any(got[k].shape != want[k] or got[k].dtype != np.float32
                                             or not np.all(np.isfinite(got[k])) for k in got):
                raise ValueError("wrong tensors")
        except (OSError, ValueError) as err:
            log.warning("error-feedback residual %s skipped: %s", path, err)
            return None
        return got


def device_start(store: DeviceStore, round_: int, out_dir: Path, manifest: Manifest,
                 glob: Mapping[str, np.ndarray]) -> tuple[dict, int, int]:
    """(tensors, step, seed) a device trains round `round_` from: its own last state (or the
    compiled initial state), with the fleet tensors replaced by the global ones."""
    prev = store.latest_before(round_, manifest)
    if prev is not None:
        tensors, step, seed = dict(prev.tensors), prev.step, prev.seed
    else:
        _, graph, cfg = read_compiled(out_dir)
        tensors, step, seed = dict(load_init_state(out_dir, graph, cfg)), 0, cfg.seed
    tensors.update({k: np.asarray(v, np.float32) for k, v in glob.items()})
    return tensors, step, seed
