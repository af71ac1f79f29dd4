"""The C's state blob read without the C: OUT/state.bin of `bnnc run`, checkpoints written on a
device, the fleet's global and per-device blobs, `bnnc export OUT/`.

Layout (written by the emitted C, compiler/contract.py): a 40-byte header `BLOB_HEADER` (magic,
version, model hash, step, seed, CRC-32, state bytes), then the state tensors at the offsets of the
manifest's tensor table, each in its storage dtype. `read_state_blob` / `parse_state_blob`
validate a blob against the compiled model (size, magic, version, model hash, CRC-32, step range,
finite values) before anything is decoded, so a checkpoint is replaced only by one that passed.
`state_values_f32` is the other direction for the trainer's --init file; `trained_state` reads a
state of either kind (a blob, or an .npz by name) for `bnnc eval` and `bnnc export`.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..compiler.config import TrainConfig
from ..compiler.contract import STATE_BLOB_MAGIC, STATE_BLOB_VERSION, Manifest
from ..compiler.errors import ConfigError, DataError
from ..compiler.export import check_state, load_state_npz
from ..compiler.ir import Graph
from .host import decode, flat_state
from .outdir import os_error

# the largest step a checkpoint may claim: far beyond any run, and small enough that every
# step counter derived from it (until = start + steps, epochs) stays exact in int64 and float64
MAX_STEP = 2**48

BLOB_HEADER = struct.Struct("<IIQQIIQ")      # magic, version, model hash, step, seed, crc32, bytes


@dataclass(frozen=True)
class StateBlob:
    step: int
    seed: int
    tensors: dict      # state name -> float32 array (bit tensors as +-1), the C's read_state_f32


def read_state_blob(path: Path, manifest: Manifest) -> StateBlob:
    """Validate a state blob against the compiled model (magic, version, model hash, size, CRC-32,
    step range, finite values) and decode every state tensor; DataError says which check failed.
    A checkpoint is replaced only by a blob that passed this (`run --resume`, `export --state`)."""
    path = Path(path)
    if not os.path.lexists(path):
        raise DataError(f"checkpoint {path} does not exist")
    try:
        size = os.stat(path).st_size
    except OSError as err:
        raise os_error(err, f"read {path}") from None
    want = manifest.blob_nbytes
    if size != want:
        try:
            with open(path, "rb") as f:
                head = f.read(BLOB_HEADER.size)
        except OSError as err:
            raise os_error(err, f"read {path}") from None
        if len(head) == BLOB_HEADER.size:
            parse_state_blob(head, manifest, path)   # another model's blob: says so, and why
        raise DataError(f"{path}: {size:,} bytes, the state blob of {manifest.model} has "
                        f"{want:,} (truncated, or another model's?)")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise os_error(err, f"read {path}") from None
    return parse_state_blob(raw, manifest, path)


def parse_state_blob(raw: bytes, manifest: Manifest, path: Path | str = "state blob") -> StateBlob:
    """`read_state_blob` on bytes already read (validate once, use those same bytes)."""
    want = manifest.blob_nbytes
    if len(raw) < BLOB_HEADER.size:
        raise DataError(f"{path}: {len(raw)} bytes is too short for a bnnc state blob")
    magic, version, mhash, step, seed, crc, nbytes = BLOB_HEADER.unpack_from(raw)
    if magic != STATE_BLOB_MAGIC:
        raise DataError(f"{path} is not a bnnc state blob (bad magic)")
    if version != STATE_BLOB_VERSION:
        raise DataError(f"{path}: state blob version {version}, this bnnc writes "
                        f"{STATE_BLOB_VERSION}", hint="train again with this bnnc version")
    if mhash != manifest.model_hash:
        raise DataError(f"{path} belongs to another compiled model (model hash {mhash:#x}, "
                        f"{manifest.model} is {manifest.model_hash:#x})",
                        hint="a checkpoint fits only the program that wrote it: same model, "
                             "options and freeze set (--train/--train-from/--frozen-bn"
                             + (f"; this one freezes {len(manifest.frozen)} parameters"
                                if manifest.frozen else "; this one trains everything") + ")")
    if len(raw) != want or nbytes != max(manifest.state_nbytes, 16):
        raise DataError(f"{path}: {len(raw)} bytes, the model's blob has {want} (truncated?)")
    if zlib.crc32(raw[32:], zlib.crc32(raw[:28])) != crc:
        raise DataError(f"{path} is corrupted (CRC-32 mismatch)",
                        hint="use an earlier checkpoint; this one was damaged after writing")
    if step > MAX_STEP:
        raise DataError(f"{path}: step {step:,} is out of range (at most {MAX_STEP:,})",
                        hint="the blob was not written by a bnnc trainer; use another checkpoint")
    payload = raw[BLOB_HEADER.size:]
    tensors = {}
    for st in manifest.state:
        t = manifest.tensor_by_name[st.name]
        v = decode(payload[t.offset:t.offset + t.nbytes], t).astype(np.float32)
        if not np.isfinite(v).all():
            raise DataError(f"{path}: state tensor '{st.name}' holds non-finite values",
                            hint="the run diverged or the blob was forged; use an earlier "
                                 "checkpoint")
        tensors[st.name] = (2 * v - 1) if t.dtype == "bit" else v
    return StateBlob(step, seed, tensors)


def state_values_f32(manifest: Manifest, tensors) -> bytes:
    """The trainer's --init file: `host.flat_state` as little-endian float32 bytes."""
    return flat_state(manifest, tensors).astype("<f4").tobytes()


def trained_state(graph: Graph, cfg: TrainConfig, path: Path,
                  manifest: Manifest | None) -> dict[str, np.ndarray]:
    """The state tensors in `path`: an .npz by name (bound to the compiled model when it carries
    a model hash), or a state blob of the compiled program `manifest` (validated like a resume)."""
    if path.suffix == ".npz":
        return load_state_npz(path, graph, cfg,
                              model_hash=manifest.state_hash if manifest is not None else None)
    if manifest is not None:
        return check_state(graph, cfg, read_state_blob(path, manifest).tensors, source=str(path))
    raise ConfigError(f"{path}: a state blob (.bin) needs its compiled directory",
                      hint="pass the `bnnc compile` output directory as MODEL")
