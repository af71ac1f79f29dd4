"""What the emitted C and the Python runtime agree on: `bnnc_manifest.json` as a typed `Manifest`, the
state blob's header constants, the status codes of the generated API and the dtype/region codes of
its tensor table.

Written by compiler/codegen.py (`Manifest(...).to_json()`), read by everything in runtime/ through
`read_manifest(out_dir)`; both sides import the constants from here, so neither keeps a copy.

Invariants: `Manifest.from_json(m.to_json()) == m`; the JSON is deterministic (sorted keys, one
space of indent) and carries `schema`/`schema_version` plus the derived `tensor_index` (name ->
row) and `input_affine` (the pixel map `preprocess` resolves to) for readers without bnnc.
Reading checks every field: a missing field or one of the wrong JSON
type is a `ManifestError` naming it (e.g. `tensors[3].nbytes`), never a KeyError later on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from .errors import ManifestError, TargetError
from .preprocess import DEFAULT as DEFAULT_PREPROCESS
from .preprocess import Preprocess, input_channels, pixel_affine
from .schedule_ir import DType

MANIFEST = "bnnc_manifest.json"
SCHEMA, SCHEMA_VERSION = "bnnc-c-manifest", 1
STATE_BLOB_HEADER_BYTES = 40      # magic, version, model hash, step, seed, CRC-32, state bytes
STATE_BLOB_MAGIC = 0x534E4E42     # "BNNS" little-endian
STATE_BLOB_VERSION = 2            # 2: the CRC-32 field (was reserved, 0)
TRAINER_SOURCE = "trainer.c"      # the standalone trainer of host/linux targets
# the dtype codes of the C tensor table (and the manifest)
DTYPE_CODES = {d: i for i, d in enumerate((DType.F32, DType.F16, DType.BF16, DType.BIT, DType.PO2,
                                            DType.U8, DType.I32))}
REGION_CODES = {"arena": 0, "state": 1}
# returned by the generated API; the C enum and its string table are generated from this one list
STATUSES = (("OK", "ok"),
            ("ERR_LABEL", "a label is outside [0, classes)"),
            ("ERR_SIZE", "buffer size does not match the model"),
            ("ERR_BLOB", "state blob has a wrong magic, version or model hash"),
            ("ERR_CRC", "state blob is corrupted (CRC-32 mismatch)"),
            ("ERR_NONFINITE", "loss is not finite (training diverged)"),
            ("ERR_IO", "a read or write callback failed"),
            ("ERR_BUSY", "samples are pending: train or discard them first"))


@dataclass(frozen=True)
class TensorEntry:
    """One row of the C tensor table / manifest."""
    index: int
    name: str
    dtype: str
    shape: tuple[int, ...]
    region: str         # "arena" | "state"
    offset: int
    nbytes: int
    layout: str
    dump_offset: int    # in the -DBNNC_DEBUG_DUMP buffer (views: their base's)
    alias_of: str | None
    geom: dict[str, int] | None = None   # packed dense weights behind an NHWC input: {"hw", "wc"}


@dataclass(frozen=True)
class StateEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    role: str
    tensor_id: int
    layout: str
    init: str           # "normal" (W), "one" (gamma, running var/psi), "zero"
    fan_in: int


@dataclass(frozen=True)
class StepEntry:
    index: int
    kernel: str
    layer: str
    fn: str             # the C kernel function the step calls
    # the schedule step's operands and results (tensor or state names): what `bnnc profile`
    # counts as the bytes a step moves and reads the product's operand types from
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Manifest:
    """What runtime/ needs to drive and read a compiled program (module docstring)."""
    bnnc_version: str
    model: str
    prefix: str                      # of every C API function: `<prefix>_train_step`
    model_hash: int                  # in the state blob header
    model_sha256: str
    target: str
    target_kind: str                 # "host" | "linux" | "baremetal"
    config: dict[str, Any]           # TrainConfig.as_dict()
    batch: int
    input_shape: tuple[int, ...]      # with the batch: (B, C, H, W) or (B, F)
    classes: int
    seed: int
    arena_nbytes: int
    state_nbytes: int
    state_elems: int                 # float32 values of load_state_f32 / read_state_f32
    dump_nbytes: int
    header: str                      # file names in the output directory
    source: str
    trainer: str | None              # host/linux targets only
    tensors: tuple[TensorEntry, ...]
    state: tuple[StateEntry, ...]
    steps: tuple[StepEntry, ...]
    # partial training: the frozen parameters (config.frozen) and the state's tail that holds them
    # (bare-metal release builds read it from the start-state blob in flash)
    frozen: tuple[str, ...] = ()
    frozen_nbytes: int = 0
    blob_header_nbytes: int = STATE_BLOB_HEADER_BYTES
    blob_magic: int = STATE_BLOB_MAGIC
    blob_version: int = STATE_BLOB_VERSION
    # u8 pixel -> model input (compiler/preprocess.py), one mean/std per channel when "norm"
    preprocess: Preprocess = DEFAULT_PREPROCESS
    # threads a training step runs on (bnnc compile --threads; 1 on bare-metal targets)
    threads: int = 1

    @property
    def input_affine(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(a_c, b_c): the trainers' pixel tables hold float32(a_c * u + b_c)."""
        return pixel_affine(self.preprocess, input_channels(self.input_shape[1:]))

    @cached_property
    def state_hash(self) -> int:
        """64 bits naming what a state's values mean, independent of the target: the model file,
        the training config and the state table (name, dtype, shape). `.npz` states carry it, so
        a state trained on one target scores and resumes on another compiled from the same model
        and options, while another model's state is refused. (`model_hash`, in the C's state
        blob, also covers the step and the memory plan, which differ between targets.)"""
        h = hashlib.sha256()
        h.update(self.model_sha256.encode())
        h.update(json.dumps(self.config, sort_keys=True).encode())
        for st in self.state:
            h.update(f"{st.name}|{st.dtype}|{tuple(st.shape)}\n".encode())
        return int.from_bytes(h.digest()[:8], "little")

    @cached_property
    def tensor_by_name(self) -> dict[str, TensorEntry]:
        return {t.name: t for t in self.tensors}

    @property
    def blob_nbytes(self) -> int:
        """Bytes of a state blob of this program: the header and the (at least 16-byte) state."""
        return self.blob_header_nbytes + max(self.state_nbytes, 16)

    def to_json(self) -> str:
        doc = dataclasses.asdict(self)
        a, b = self.input_affine
        doc.update(schema=SCHEMA, schema_version=SCHEMA_VERSION,
                   tensor_index={t.name: t.index for t in self.tensors},
                   input_affine={"scale": list(a), "offset": list(b)})
        return json.dumps(doc, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, *, source: str = MANIFEST) -> Manifest:
        """Parse and check a manifest; ManifestError naming the field (and `source`) if not one."""
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as err:
            raise ManifestError(f"{source} is not JSON ({err})", hint=_REWRITE) from err
        if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
            raise ManifestError(f"{source} is not a bnnc manifest (schema is not {SCHEMA!r})",
                                hint=_REWRITE)
        if doc.get("schema_version") != SCHEMA_VERSION:
            raise ManifestError(f"{source}: manifest schema version {doc.get('schema_version')!r}, "
                                f"this bnnc reads {SCHEMA_VERSION}", hint=_REWRITE)
        m = _row(cls, doc, "", source)
        m.check_consistency(source)
        return m

    def check_consistency(self, source: str = MANIFEST) -> None:
        """ManifestError when the fields contradict each other or this bnnc's constants (an
        edited manifest would otherwise be found out only after a run replaced the checkpoint)."""
        def bad(what: str) -> ManifestError:
            return ManifestError(f"{source}: {what}", hint=_REWRITE)
        fixed = (("blob_header_nbytes", STATE_BLOB_HEADER_BYTES), ("blob_magic", STATE_BLOB_MAGIC),
                 ("blob_version", STATE_BLOB_VERSION))
        for name, want in fixed:
            if getattr(self, name) != want:
                raise bad(f"field {name} is {getattr(self, name)}, not {want}")
        if not 1 <= self.threads <= 64 or (self.threads > 1 and self.target_kind == "baremetal"):
            raise bad(f"field threads is {self.threads}, not 1..64 (1 on a bare-metal target)")
        if not 0 <= self.model_hash < 2**64:
            raise bad("field model_hash is not a 64-bit hash")
        if self.batch < 1 or self.classes < 2 or self.config.get("batch", self.batch) != self.batch:
            raise bad("fields batch / classes / config.batch disagree")
        ends = {"arena": 0, "state": 0}
        for t in self.tensors:
            if t.region not in ends or t.offset < 0 or t.nbytes < 0:
                raise bad(f"tensor row {t.name!r} has region {t.region!r}, offset {t.offset}, "
                          f"{t.nbytes} bytes")
            ends[t.region] = max(ends[t.region], t.offset + t.nbytes)
        if ends["arena"] > self.arena_nbytes or ends["state"] > self.state_nbytes:
            raise bad(f"tensors end at arena byte {ends['arena']:,} / state byte "
                      f"{ends['state']:,}, beyond arena_nbytes {self.arena_nbytes:,} / "
                      f"state_nbytes {self.state_nbytes:,}")
        if self.state_nbytes > ends["state"] + 256:      # at most the last buffer's alignment
            raise bad(f"field state_nbytes {self.state_nbytes:,} is larger than the state "
                      f"tensors ({ends['state']:,} bytes)")
        names = {t.name for t in self.tensors}
        for st in self.state:
            if st.name not in names or st.offset < 0 or st.offset + st.nbytes > self.state_nbytes:
                raise bad(f"state row {st.name!r} does not fit the state region")


_REWRITE = "compile the model again with this bnnc version"


def read_manifest(out_dir: str | Path) -> Manifest:
    """The manifest of a `bnnc compile` output directory; TargetError if it is not one."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise TargetError(f"{out_dir} is not a bnnc compile output (no {MANIFEST})",
                          hint="run `bnnc compile MODEL -o DIR` first")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ManifestError(f"{path} is not UTF-8 JSON (byte {err.start} is damaged)",
                            hint=_REWRITE) from None
    except OSError as err:
        raise ManifestError(f"cannot read {path}: {err.strerror or err}", hint=_REWRITE) from None
    return Manifest.from_json(text, source=str(path))


# --------------------------------------------------------------------------------------------------
# reading JSON values into the typed rows

def _row(cls: type, doc: Any, where: str, source: str):
    if not isinstance(doc, dict):
        raise _wrong(where or "(top level)", "an object", doc, source)
    values = {}
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        at = f"{where}.{f.name}" if where else f.name
        if f.name not in doc:
            if f.default is dataclasses.MISSING:
                raise ManifestError(f"{source}: field {at} is missing", hint=_REWRITE)
            continue
        values[f.name] = _typed(doc[f.name], hints[f.name], at, source)
    return cls(**values)


def _typed(value: Any, hint: Any, where: str, source: str) -> Any:
    """`value` (parsed JSON) as the annotation `hint` says, or ManifestError naming `where`."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (arm,) = [a for a in args if a is not type(None)]
        return _typed(value, arm, where, source)
    if dataclasses.is_dataclass(hint):
        return _row(hint, value, where, source)
    if origin is tuple:
        if not isinstance(value, list):
            raise _wrong(where, "a list", value, source)
        return tuple(_typed(v, args[0], f"{where}[{i}]", source) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise _wrong(where, "an object", value, source)
        return {k: _typed(v, args[1], f"{where}.{k}", source) for k, v in value.items()}
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    ok = isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    if not ok:
        raise _wrong(where, {int: "an integer", str: "a string"}.get(hint, hint.__name__), value,
                     source)
    return value


def _wrong(where: str, want: str, value: Any, source: str) -> ManifestError:
    got = "null" if value is None else type(value).__name__
    return ManifestError(f"{source}: field {where} should be {want}, not {got}", hint=_REWRITE)
