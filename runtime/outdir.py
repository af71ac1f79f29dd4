"""What a `bnnc compile` output directory holds besides the C: the model it was compiled from and
the initial training state, so `bnnc run OUT/` and `bnnc export OUT/` need nothing else; and the
MODEL argument of every command (an ONNX/QONNX file or a zoo name) as bytes or as an `ir.Graph`.

    OUT/model.onnx           the source model (a zoo model serialized deterministically)
    OUT/init_state.npz       every state tensor at step 0 (runtime.reference.init_state)
    OUT/report.txt           the memory tables and the C kernels used (`compile_graph`)
    OUT/final_state.npz      written by `bnnc run`: the state after training (for `bnnc export`)
    OUT/state.bin            written by `bnnc run`: the C's versioned state blob (resume with --resume)
    OUT/data.json            written by `bnnc run`: the data it packed (source, split, class names
                             index -> name, the transform to the model's input); `bnnc eval` and
                             `bnnc export` read the class names from it

The two files `bnnc run` writes are replaced atomically (temp file, fsync, rename), so a run killed
while saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from ..compiler.config import TrainConfig, make_config
from ..compiler.contract import (MANIFEST, STATE_BLOB_MAGIC, STATE_BLOB_VERSION, Manifest,
                                 read_manifest)
from ..compiler.errors import BnncWarning, ConfigError, DataError, ModelError, TargetError
from ..compiler.export import check_state, load_state_npz, save_state_npz
from ..compiler.frontend import load_model
from ..compiler.ir import Graph
from ..compiler.pipeline import Compiled, compile_to_c
from ..compiler.preprocess import DEFAULT as DEFAULT_PREPROCESS
from ..compiler.preprocess import DEFAULT_NOTICE, Preprocess, class_names_from_model, \
    parse_preprocess
from ..compiler.preprocess import from_model as preprocess_from_model
from ..compiler.report import format_report
from ..compiler.target import Target
from ..compiler.zoo import ZOO, build_zoo_model
from . import reference as ref
from .host import decode, flat_state

MODEL_FILE = "model.onnx"
INIT_STATE = "init_state.npz"
FINAL_STATE = "final_state.npz"
STATE_BLOB = "state.bin"
DATA_RECORD = "data.json"


def _publish(tmp: str, path: Path) -> None:
    """fsync `tmp`, rename it over `path`, fsync the directory: a crash at any moment leaves the
    old file or the new one, never a torn one."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _atomically(path: Path, write) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        _publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_atomic(path: Path, data: bytes) -> None:
    _atomically(path, lambda tmp: Path(tmp).write_bytes(data))


def save_state_atomic(path: Path, state) -> None:
    _atomically(path, lambda tmp: save_state_npz(tmp, state))


def model_bytes(model: str, *, width: float | None = None) -> bytes:
    """The bytes of an ONNX file, or of a zoo model built with `width`."""
    path = Path(model)
    if path.is_file():
        return path.read_bytes()
    if model in ZOO:
        kw = {} if width is None else {"width": width}
        return build_zoo_model(model, **kw).SerializeToString(deterministic=True)
    raise ModelError(f"{model}: no such file, and not a zoo model name")


def load_graph(model: str, *, width: float | None = None, image_size: int | None = None) -> Graph:
    """An ir.Graph from an ONNX file or a zoo name (zoo names take --width / --image-size)."""
    path = Path(model)
    if path.is_file():
        if width is not None or image_size is not None:
            raise ConfigError(f"--width/--image-size shape zoo models only; {model} is a file",
                              hint="drop them, or pass a zoo name such as 'cnv'")
        return load_model(path)
    if model in ZOO:
        kw: dict[str, Any] = {} if width is None else {"width": width}
        if image_size is not None:
            kw["image_size"] = image_size
        return load_model(build_zoo_model(model, **kw))
    raise ModelError(f"{model}: no such file, and not a zoo model name",
                     hint=f"zoo models: {', '.join(ZOO)}")


def model_preprocess(source: bytes, model: str, spec: str | None) -> Preprocess:
    """The preprocessing of a model: `spec` (--preprocess) when given, else what the file records
    (ONNX metadata, compiler/preprocess.py), else the default with one notice (a BnncWarning the
    CLI prints as one line)."""
    if spec is not None:
        return parse_preprocess(spec)
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(source)
    except DecodeError:               # the frontend names what is wrong with the file
        return DEFAULT_PREPROCESS
    found = preprocess_from_model(proto)
    if found is None:
        warnings.warn(BnncWarning(DEFAULT_NOTICE.format(model=Path(model).name)
                                  .removeprefix("notice: ")), stacklevel=2)
        return DEFAULT_PREPROCESS
    return found


def model_class_names(source: bytes) -> tuple[str, ...] | None:
    """The class names a model file records (an export's "bnnc.classes" metadata), or None."""
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(source)
    except DecodeError:
        return None
    return class_names_from_model(proto)


def write_run_inputs(out_dir: Path, graph, cfg: TrainConfig, source: bytes) -> list[Path]:
    out_dir = Path(out_dir)
    (out_dir / MODEL_FILE).write_bytes(source)
    save_state_npz(out_dir / INIT_STATE, ref.init_state(graph, cfg).tensors)
    return [out_dir / MODEL_FILE, out_dir / INIT_STATE]


def compile_graph(graph: Graph, cfg: TrainConfig, tgt: Target, out_dir: Path, command: str,
                  source: bytes, *, guard_bytes: int = 0,
                  preprocess: Preprocess | None = None) -> tuple[Compiled, tuple[Path, ...]]:
    """compiler.pipeline.compile_to_c plus what `bnnc run` and a reader need in out_dir (the model,
    the initial state, report.txt). `preprocess` None: the model file's (`model_preprocess`).
    Returns (compiled, files written)."""
    if preprocess is None:
        preprocess = model_preprocess(source, graph.name, None)
    c = compile_to_c(graph, cfg, tgt, out_dir, command=command, guard_bytes=guard_bytes,
                     preprocess=preprocess)
    run_inputs = write_run_inputs(out_dir, graph, cfg, source)
    report = out_dir / "report.txt"
    report.write_text(f"{command}\n\n" + format_report(c.plan_doc, tensors=True)
                      + "\nC kernels:\n" + "".join(f"  {k}\n" for k in c.emitted.kernels))
    return c, (*c.emitted.files, report, *run_inputs)


def read_compiled(out_dir: Path) -> tuple[Manifest, Graph, TrainConfig]:
    """(manifest, graph, cfg) of a compiled output directory; BnncError if it is not one."""
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    if not (out_dir / MODEL_FILE).is_file():
        raise TargetError(f"{out_dir} has no {MODEL_FILE}; it was written by an older bnnc",
                          hint="compile again")
    graph = load_model(onnx.load_model_from_string((out_dir / MODEL_FILE).read_bytes()),
                       name=manifest.model)
    known = {k: v for k, v in manifest.config.items() if k != "algorithm"}
    try:
        cfg = make_config(manifest.config["algorithm"], **known)
    except (KeyError, TypeError) as err:
        raise ConfigError(f"{out_dir / MANIFEST}: unreadable training config ({err})") from err
    return manifest, graph, cfg


def load_init_state(out_dir: Path, graph, cfg):
    return load_state_npz(Path(out_dir) / INIT_STATE, graph, cfg)


def saved_state_path(out_dir: Path) -> Path:
    """The state `bnnc run` left in OUT/: final_state.npz, else the checkpoint state.bin."""
    final = Path(out_dir) / FINAL_STATE
    return final if final.is_file() else Path(out_dir) / STATE_BLOB


def trained_state(graph: Graph, cfg: TrainConfig, path: Path,
                  manifest: Manifest | None) -> dict[str, np.ndarray]:
    """The state tensors in `path`: an .npz by name, or a state blob of the compiled program
    `manifest` (the trainer's checkpoint, e.g. fetched from a device)."""
    if path.suffix == ".npz":
        return load_state_npz(path, graph, cfg)
    if manifest is not None:
        return check_state(graph, cfg, read_state_blob(path, manifest).tensors, source=str(path))
    raise ConfigError(f"{path}: a state blob (.bin) needs its compiled directory",
                      hint="pass the `bnnc compile` output directory as MODEL")


# --------------------------------------------------------------------------------------------------
# the C's state blob, read without the C (checkpoints written on a device, `bnnc export OUT/`)

BLOB_HEADER = struct.Struct("<IIQQIIQ")      # magic, version, model hash, step, seed, crc32, bytes


@dataclass(frozen=True)
class StateBlob:
    step: int
    seed: int
    tensors: dict      # state name -> float32 array (bit tensors as +-1), the C's read_state_f32


def read_state_blob(path: Path, manifest: Manifest) -> StateBlob:
    """Validate a state blob against the compiled model (magic, version, model hash, size, CRC-32)
    and decode every state tensor; DataError says which check failed."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint {path} does not exist")
    raw = path.read_bytes()
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
                        f"{manifest.model} is {manifest.model_hash:#x})")
    if len(raw) != want or nbytes != max(manifest.state_nbytes, 16):
        raise DataError(f"{path}: {len(raw)} bytes, the model's blob has {want} (truncated?)")
    if zlib.crc32(raw[32:], zlib.crc32(raw[:28])) != crc:
        raise DataError(f"{path} is corrupted (CRC-32 mismatch)",
                        hint="use an earlier checkpoint; this one was damaged after writing")
    payload = raw[BLOB_HEADER.size:]
    tensors = {}
    for st in manifest.state:
        t = manifest.tensor_by_name[st.name]
        v = decode(payload[t.offset:t.offset + t.nbytes], t).astype(np.float32)
        tensors[st.name] = (2 * v - 1) if t.dtype == "bit" else v
    return StateBlob(step, seed, tensors)


def state_values_f32(manifest: Manifest, tensors) -> bytes:
    """The trainer's --init file: `host.flat_state` as little-endian float32 bytes."""
    return flat_state(manifest, tensors).astype("<f4").tobytes()




# --------------------------------------------------------------------------------------------------
# the data record of `bnnc run` (OUT/data.json)

def read_data_record(out_dir: Path) -> dict | None:
    """OUT/data.json as a dict, None when no run wrote one; DataError when it is damaged."""
    path = Path(out_dir) / DATA_RECORD
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not a bnnc data record ({err})",
                        hint="delete it; the next `bnnc run` writes it again") from err
    names = doc.get("class_names") if isinstance(doc, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataError(f"{path}: field class_names should be a list of strings",
                        hint="delete it; the next `bnnc run` writes it again")
    return doc


def class_names_of(out_dir: Path) -> tuple[str, ...] | None:
    """The class names (index -> name) the last `bnnc run` into OUT trained with, or None."""
    doc = read_data_record(out_dir)
    return None if doc is None else tuple(doc["class_names"])


def check_class_names(out_dir: Path, names: tuple[str, ...], spec: str) -> None:
    """DataError when `names` (of --data `spec`) map indices to other classes than OUT's record:
    a checkpoint trained on one class order must not be continued or scored with another."""
    same_class_order(class_names_of(out_dir), names, spec, str(Path(out_dir) / DATA_RECORD))


def same_class_order(have: tuple[str, ...] | None, names: tuple[str, ...], spec: str,
                     where: str) -> None:
    """DataError when the data's class names (`names`, of `spec`) give an index another class than
    `have` (recorded in `where`: OUT/data.json or a model file's metadata) does."""
    if have is None:
        return
    n = min(len(have), len(names))
    diff = [k for k in range(n) if have[k] != names[k]]
    if diff:
        k = diff[0]
        raise DataError(f"{spec}: class {k} is {names[k]!r} but {where} trained it as "
                        f"{have[k]!r}",
                        hint="use data with the same class folders/labels as the training run")
