"""Run emitted C on the host: build it as a shared library (cached by content hash) and drive it
from Python through cffi in ABI mode.

Input: a `bnnc compile` output directory (`<model>.c`, `<model>.h`, `bnnc_manifest.json`, written by
`compiler.codegen.emit_c`). Output: `HostProgram`, a thin wrapper over the generated C API that
speaks numpy: `init`, `load_state` / `read_state` (name -> float32 array), `train_step`, `predict`,
`get_state` / `set_state` (the versioned blob), and `tensor(name)` to read any schedule tensor.

Invariants:
- the library is named by the sha256 of everything that decides its bytes (sources, compiler,
  flags), so an edit or a different flag set never reuses a stale build; it is built in a
  temporary entry directory with the sha256 of its bytes and renamed into place (atomic on
  POSIX), so concurrent builds of the same sources are safe, and a damaged entry is detected
  before it is loaded and rebuilt with one warning line (`build_cached`);
- the cffi cdef is the CDEF section of the emitted header itself, never a hand-kept copy.

Decoding (`tensor`): f16/bf16 -> float32 values; BIT -> int8 0/1 in the tensor's logical NCHW
(or W) element order, whatever its packed layout; PO2 -> uint8 codes; I32 -> int32.
Limits: one process loads one copy of a given build (dlopen returns the same handle for the same
path, so two HostPrograms of identical sources share their static arena and state).
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
import warnings
import weakref
from pathlib import Path
from typing import Mapping, Sequence

import cffi
import numpy as np

from ..compiler.codegen import header_cdef
from ..compiler.contract import STATUSES, Manifest, TensorEntry, read_manifest
from ..compiler.errors import BnncWarning, DataError, TargetError
from ..compiler.numerics import LR_HORIZON_MAX, unpack_bits
from ..compiler.preprocess import input_channels, pixel_lut, to_pixels
from ..compiler.target import Target, load_target

_STATUS = tuple(text for _, text in STATUSES)

# The kernel variants a host build can be forced to (the C's compile options): "auto" lets the
# x86-64 program choose the widest ISA the CPU has at run time (AVX-512, AVX2, else SSE2; NEON on
# aarch64), the others cap that choice or take the portable C. Every variant computes the same
# bits (tests/test_neon.py, tests/test_dispatch.py); only the speed differs.
KERNEL_VARIANTS: dict[str, tuple[str, ...]] = {
    "auto": (), "avx2": ("-DBNNC_NO_AVX512",), "sse2": ("-DBNNC_NO_AVX2",),
    "portable": ("-DBNNC_NO_SIMD",)}


def thread_flags(m: Manifest) -> list[str]:
    """The compile and link flags a program of `m` needs for its threads (bnnc compile --threads)."""
    return ["-pthread"] if m.threads > 1 else []


def cache_dir() -> Path:
    """$BNNC_CACHE_DIR, else ~/.cache/bnnc/host."""
    env = os.environ.get("BNNC_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "bnnc" / "host"


def build_shared(source: Path, *, target: Target, extra_cflags: Sequence[str] = (),
                 cache: Path | None = None) -> Path:
    """Compile `source` (with its directory on the include path) into a cached shared library."""
    source = Path(source)
    header = source.with_suffix(".h")
    flags = list(target.cflags) + list(target.shared_flags) + list(extra_cflags)
    return build_cached(
        Path(cache) if cache is not None else cache_dir(), source.stem, ".so",
        (source.read_bytes(), header.read_bytes() if header.exists() else b"",
         target.cc.encode(), "\0".join(flags).encode()),
        lambda tmp: [target.cc, *flags, "-I", str(source.parent), str(source), "-o", tmp, "-lm"],
        what=f"compiling {source}",
        missing=TargetError(f"C compiler {target.cc!r} of target {target.name!r} not found",
                            hint="install gcc or clang, or set cc in the target's .toml"))


def build_cached(where: Path, stem: str, suffix: str, parts, argv_for, *, what: str,
                 missing: TargetError) -> Path:
    """WHERE/<stem>-<digest>/<stem><suffix>, the digest being the sha256 of `parts` (everything
    that decides the output's bytes): reused when present and intact, else built.

    An entry is a directory holding the program and `sha256`, the hash of the program's bytes,
    built under a temporary name and renamed into place whole: a concurrent builder never sees a
    half-written entry. Before reuse the program's hash is checked; a damaged entry (truncated,
    overwritten, hash missing) is rebuilt with a one-line BnncWarning instead of being loaded
    (a truncated shared library would crash the process with SIGBUS)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    where = Path(where)
    try:
        where.mkdir(parents=True, exist_ok=True)
        if not where.is_dir():
            raise NotADirectoryError(20, "Not a directory")
    except OSError as err:
        raise TargetError(f"build cache {where} is not a usable directory "
                          f"({err.strerror or err})",
                          hint="remove it, or set BNNC_CACHE_DIR to a writable directory") from None
    entry = where / f"{stem}-{h.hexdigest()[:24]}"
    prog = entry / f"{stem}{suffix}"
    if os.path.lexists(entry):
        if _intact(prog):
            return prog
        warnings.warn(BnncWarning(f"build cache entry {entry} is damaged (hash mismatch); "
                                  "rebuilding it"), stacklevel=2)
        _discard(entry)
    return compile_published(prog, argv_for, what=what, missing=missing)


_HASH_FILE = "sha256"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _intact(prog: Path) -> bool:
    """Whether a cache entry's program is a regular file whose bytes match the recorded hash."""
    try:
        entry = prog.parent
        if entry.is_symlink() or not entry.is_dir() or prog.is_symlink() or not prog.is_file():
            return False
        return (entry / _HASH_FILE).read_text().strip() == file_sha256(prog)
    except (OSError, UnicodeDecodeError):
        return False


def _discard(entry: Path) -> None:
    """Move a damaged entry out of the way (rename first: atomic for concurrent readers)."""
    trash = entry.with_name(f".trash-{entry.name}-{os.getpid()}")
    try:
        os.replace(entry, trash)
    except OSError:
        trash = entry
    try:
        if trash.is_dir() and not trash.is_symlink():
            shutil.rmtree(trash, ignore_errors=True)
        else:
            trash.unlink()
    except OSError:
        pass


def compile_published(prog: Path, argv_for, *, what: str, missing: TargetError) -> Path:
    """Run the compiler argv `argv_for(tmp)` into a temporary entry directory next to
    `prog.parent`, record the output's sha256 and rename the directory into place: concurrent
    builds of the same content are safe and a failed one leaves nothing. `missing` is raised when
    the compiler cannot be started."""
    entry = prog.parent
    try:
        tmpdir = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
    except OSError as err:
        raise TargetError(f"cannot write to the build cache {entry.parent}: "
                          f"{err.strerror or err}",
                          hint="free some space, or set BNNC_CACHE_DIR elsewhere") from None
    try:
        tmp = tmpdir / prog.name
        cmd = argv_for(str(tmp))
        try:
            res = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as err:
            raise missing from err
        if res.returncode != 0:
            raise TargetError(f"{what} failed ({shlex.join(cmd)}):\n{res.stderr.strip()[-4000:]}")
        try:
            os.chmod(tmp, 0o755)
            (tmpdir / _HASH_FILE).write_text(file_sha256(tmp) + "\n")
            os.rename(tmpdir, entry)
        except OSError as err:
            if _intact(prog):               # another builder published the same entry first
                return prog
            raise TargetError(f"cannot write to the build cache {entry.parent}: "
                              f"{err.strerror or err}",
                              hint="free some space, or set BNNC_CACHE_DIR elsewhere") from None
        return prog
    finally:
        if tmpdir.exists():
            shutil.rmtree(tmpdir, ignore_errors=True)


def _shutdown(lib, prefix: str) -> None:
    getattr(lib, f"{prefix}_shutdown")()


class HostProgram:
    """The emitted training program of one `bnnc compile` output directory, loaded in-process."""

    def __init__(self, out_dir: str | Path, *, target: str | Target = "host", debug: bool = True,
                 extra_cflags: Sequence[str] = (), cache: Path | None = None):
        self.out_dir = Path(out_dir)
        self.manifest = m = read_manifest(self.out_dir)
        self.target = target if isinstance(target, Target) else load_target(target)
        self.debug = debug
        flags = (["-DBNNC_DEBUG_DUMP"] if debug else []) + list(extra_cflags) + thread_flags(m)
        source = self.out_dir / m.source
        self.library = build_shared(source, target=self.target, extra_cflags=flags, cache=cache)
        self.ffi = cffi.FFI()
        self.ffi.cdef(header_cdef((self.out_dir / m.header).read_text()))
        self.lib = self.ffi.dlopen(str(self.library))
        # a threaded build's workers must be joined before the library can go: close() or,
        # at the latest, when this object is collected (the finalizer holds the library)
        self._finalizer = weakref.finalize(self, _shutdown, self.lib, m.prefix)
        self.prefix = m.prefix
        self.batch = m.batch
        self.input_shape = m.input_shape
        self.classes = m.classes
        self.tensors = m.tensor_by_name
        self.state = m.state
        # `--input u8`: the pixel map the batch's floats are taken back through (None: f32 input)
        self.u8_affine = (m.config.get("input_affine") or None
                          if m.config.get("input") == "u8" else None)
        self._in_ptr = "uint8_t *" if self.u8_affine else "float *"

    def _fn(self, name: str):
        return getattr(self.lib, f"{self.prefix}_{name}")

    def close(self) -> None:
        """Stop and join the program's threads (a --threads build); the program stays usable
        (its next step starts them again)."""
        _shutdown(self.lib, self.prefix)

    def unload(self) -> None:
        """Join the program's threads and unload its shared library now; the object is unusable
        afterwards (a benchmark loading many builds in one process frees each one so)."""
        self._finalizer()               # runs the shutdown once; detached from collection
        self.ffi.dlclose(self.lib)

    def __enter__(self) -> HostProgram:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check(self, status: int, what: str) -> None:
        if status != 0:
            text = _STATUS[status] if 0 <= status < len(_STATUS) else f"status {status}"
            raise DataError(f"{self.prefix}_{what}: {text}")

    # ---- state
    def init(self, seed: int = 0) -> None:
        self._fn("init")(seed & 0xFFFFFFFF)

    def load_state(self, tensors: Mapping[str, np.ndarray], *, step: int = 0,
                   seed: int = 0) -> None:
        """Set every state tensor from float32 values (bit tensors: +-1) in state order."""
        flat = flat_state(self.manifest, tensors)
        ptr = self.ffi.cast("float *", self.ffi.from_buffer(flat))
        self._check(self._fn("load_state_f32")(ptr, flat.size, step, seed & 0xFFFFFFFF),
                    "load_state_f32")

    def read_state(self) -> dict[str, np.ndarray]:
        n = self.manifest.state_elems
        flat = np.zeros(n, np.float32)
        self._check(self._fn("read_state_f32")(self.ffi.cast("float *", self.ffi.from_buffer(flat)),
                                               n), "read_state_f32")
        return split_state(self.manifest, flat)

    @property
    def step_count(self) -> int:
        return int(self._fn("step_count")())

    def set_lr_horizon(self, steps: int) -> None:
        """The run's length the lr schedule decays over (0: none, the base lr); capped as the C's
        uint32 (numerics.LR_HORIZON_MAX)."""
        self._fn("set_lr_horizon")(min(max(int(steps), 0), LR_HORIZON_MAX))

    def lr_at(self, step: int) -> float:
        """The C's learning rate of step `step` (1-based) under the current horizon."""
        return float(self._fn("lr_at")(step))

    def get_state(self) -> bytes:
        n = int(self._fn("state_blob_bytes")())
        buf = bytearray(n)
        self._check(self._fn("get_state")(self.ffi.from_buffer(buf), n), "get_state")
        return bytes(buf)

    def set_state(self, blob: bytes) -> None:
        buf = bytearray(blob)
        self._check(self._fn("set_state")(self.ffi.from_buffer(buf), len(buf)), "set_state")

    # ---- running
    def pixel_batch(self, u) -> np.ndarray:
        """u8 pixels as this program takes them: as they are under `--input u8`, else their
        floats under the program's preprocessing (what the trainers feed it)."""
        u = np.asarray(u, np.uint8)
        if self.u8_affine:
            return u
        lut = pixel_lut(self.manifest.preprocess, input_channels(tuple(self.input_shape[1:])))
        c = lut.shape[0]
        return lut[np.arange(c).reshape(1, c, 1), u.reshape(len(u), c, -1)].reshape(u.shape)

    def _batch(self, x) -> np.ndarray:
        """The batch as the program takes it: float32, or under `--input u8` uint8 pixels (a u8
        batch as it is, or their float values under the program's preprocessing mapped back)."""
        if self.u8_affine:
            try:
                a = np.ascontiguousarray(to_pixels(x, self.u8_affine, self.input_shape[1:]))
            except ValueError as err:
                raise DataError(f"{self.out_dir}: the program takes u8 pixels (--input u8): {err}",
                                hint="float features (CSV, float arrays) need --input f32")
        else:
            a = np.ascontiguousarray(np.asarray(x, np.float32))
        if a.size != self.batch * int(np.prod(self.input_shape[1:])):
            raise DataError(f"input batch has {a.size} values; the compiled program takes exactly "
                            f"{list(self.input_shape)}", hint="compile with --batch to match")
        return a

    def train_step(self, x, labels) -> tuple[float, float]:
        """One training step; returns (loss, accuracy) of the batch."""
        a = self._batch(x)
        y = np.ascontiguousarray(np.asarray(labels, np.int32))
        if y.shape != (self.batch,):
            raise DataError(f"labels must be {self.batch} integers, got shape {y.shape}")
        loss = self.ffi.new("float *")
        acc = self.ffi.new("float *")
        st = self._fn("train_step")(self.ffi.cast(self._in_ptr, self.ffi.from_buffer(a)),
                                    self.ffi.cast("int32_t *", self.ffi.from_buffer(y)), loss, acc)
        self._check(st, "train_step")
        return float(loss[0]), float(acc[0])

    def predict(self, x) -> np.ndarray:
        a = self._batch(x)
        probs = np.zeros((self.batch, self.classes), np.float32)
        self._check(self._fn("predict")(self.ffi.cast(self._in_ptr, self.ffi.from_buffer(a)),
                                        self.ffi.cast("float *", self.ffi.from_buffer(probs))),
                    "predict")
        return probs

    # ---- debug hook
    def raw(self, name: str) -> bytes:
        """The stored bytes of tensor `name` after the last step (the dump copy in debug builds)."""
        t = self.tensors.get(name)
        if t is None:
            raise DataError(f"no tensor {name!r} in {self.prefix}; see bnnc_manifest.json")
        p = self._fn("tensor")(t.index)
        info = self._fn("tensor_info")(t.index)
        assert self.ffi.string(info.name).decode() == name and info.nbytes == t.nbytes, name
        return bytes(self.ffi.buffer(p, t.nbytes))

    def tensor(self, name: str) -> np.ndarray:
        """Tensor `name` decoded to numpy (see the module docstring for the dtype conventions)."""
        t = self.tensors[name]
        if t.alias_of:     # a view: the base's bytes in the base's layout, reshaped
            return decode(self.raw(name), self.tensors[t.alias_of]).reshape(t.shape)
        return decode(self.raw(name), t)


def flat_state(manifest: Manifest, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
    """Every state tensor as float32 in state order (bit tensors: +-1): what
    `<model>_load_state_f32` and the trainer's --init file read."""
    parts = []
    for st in manifest.state:
        if st.name not in tensors:
            raise DataError(f"state tensor {st.name} missing from the values to load")
        v = np.asarray(tensors[st.name], np.float32).reshape(-1)
        if v.size != int(np.prod(st.shape)):
            raise DataError(f"state tensor {st.name}: {v.size} values, expected shape "
                            f"{list(st.shape)}")
        parts.append(v)
    return np.ascontiguousarray(np.concatenate(parts) if parts else np.zeros(0, np.float32))


def split_state(manifest: Manifest, flat: np.ndarray) -> dict[str, np.ndarray]:
    """The inverse of `flat_state`: state order float32 values -> tensor name -> array."""
    out, at = {}, 0
    for st in manifest.state:
        k = int(np.prod(st.shape))
        out[st.name] = flat[at:at + k].reshape(st.shape).copy()
        at += k
    return out


def decode(raw: bytes, t: TensorEntry) -> np.ndarray:
    """Stored bytes of a tensor-table entry -> numpy array in the tensor's logical shape."""
    shape = t.shape
    n = int(np.prod(shape)) if shape else 1
    dt = t.dtype
    buf = np.frombuffer(raw, np.uint8)
    if dt == "f32":
        return buf[:4 * n].view("<f4").reshape(shape).copy()
    if dt == "bf16":
        return (buf[:2 * n].view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
    if dt == "f16":
        return buf[:2 * n].view("<f2").astype(np.float32).reshape(shape)
    if dt in ("po2", "u8"):
        return buf[:n].reshape(shape).copy()
    if dt == "i32":
        return buf[:4 * n].view("<i4").reshape(shape).copy()
    assert dt == "bit", dt
    words = buf.view("<u8")
    return _decode_bits(words, t)


def _decode_bits(words: np.ndarray, t: TensorEntry) -> np.ndarray:
    shape = t.shape
    layout = t.layout
    geom = t.geom or {}
    if layout.startswith("bits NHWC"):
        b, c, h, w = shape
        wc = -(-c // 64)
        bits = unpack_bits(words.reshape(b * h * w, wc), c, pm1=False)
        return bits.reshape(b, h, w, c).transpose(0, 3, 1, 2).copy()
    if layout.startswith("bits rows"):
        b = shape[0]
        per = int(np.prod(shape[1:]))
        return unpack_bits(words.reshape(b, -1), per, pm1=False).reshape(shape)
    if layout.startswith("bits flat"):
        return unpack_bits(words.reshape(1, -1), int(np.prod(shape)), pm1=False).reshape(shape)
    if layout.startswith("bits W^T"):
        k, n = shape
        rows = words.reshape(n, -1)
        allbits = unpack_bits(rows, rows.shape[1] * 64, pm1=False)      # (n, words*64)
        hw, wc = int(geom.get("hw", 1)), int(geom.get("wc", 0))
        kk = np.arange(k)
        pos = (kk % hw) * wc * 64 + kk // hw if wc else kk
        return allbits[:, pos].T.copy()
    if layout.startswith("bits:"):
        co, ci, kh, kw = shape
        rows = words.reshape(co * kh * kw, -1)
        bits = unpack_bits(rows, ci, pm1=False).reshape(co, kh, kw, ci)
        return bits.transpose(0, 3, 1, 2).copy()
    raise AssertionError(f"unknown bit layout {layout!r} of {t.name}")
