"""What a `bnnc compile` output directory holds besides the C, and how bnnc writes it: OUT/ is
bnnc's own.

    OUT/model.onnx           the source model (a zoo model serialized deterministically; a model
                             with external data has its tensors embedded)
    OUT/init_state.npz       every state tensor at step 0 (runtime.reference.init_state)
    OUT/report.txt           the memory tables and the C kernels used (`compile_graph`)
    OUT/final_state.npz      written by `bnnc run`: the state after training (for `bnnc export`)
    OUT/state.bin            written by `bnnc run`: the C's versioned state blob (resume with
                             --resume; runtime/state_blob.py reads it without the C)
    OUT/.bnnc-owned.json     the files bnnc wrote here and the model hash they belong to
    OUT/.bnnc.lock           the per-OUT lock (flock) of `compile` and `run`
    OUT/data.json            written by `bnnc run`: the data it packed (source, split, class names
                             index -> name, the transform to the model's input); `bnnc eval` and
                             `bnnc export` read the class names from it

Ownership rules (every command that writes into OUT/ goes through `OutDir`):
- OUT itself must be a real directory: a symbolic link is refused, so nothing is written through it;
- every file is written to a fresh temporary file in its directory (O_EXCL: never through a link
  planted under the temporary name), fsynced and renamed into place: a crash, a full disk or a
  read-only filesystem leaves the old file or the new one, never a torn one, and never a symlink's
  target (rename replaces the link itself);
- `bnnc compile` writes into a private staging directory inside OUT and publishes the files only
  when every one of them was written; it refuses to replace a file it did not write (not listed in
  .bnnc-owned.json) unless `--force`, and removes the files it wrote for an earlier compile that
  this one does not write (another model's .c/.h; state.bin, final_state.npz and data/ too unless
  the model hash is unchanged, i.e. the same model, config and target compiled again);
- .bnnc-owned.json records the compiled model's hash; `run` and `export` refuse an OUT whose record
  names another model than its manifest, and every state file bnnc writes carries the hash too;
- `compile` and `run` hold an exclusive lock on OUT (`fcntl.flock`, released when the process ends,
  also by kill -9): a second one on the same OUT is refused with a message naming the first;
- files inside OUT are read with O_NOFOLLOW: a symbolic link bnnc did not create is never followed.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import onnx

from ..compiler.config import TrainConfig, make_config
from ..compiler.contract import MANIFEST, Manifest, read_manifest
from ..compiler.errors import ConfigError, DataError, ModelError, OutDirError, TargetError
from ..compiler.export import load_state_npz, save_state_npz
from ..compiler.frontend import load_model
from ..compiler.ir import Graph
from ..compiler.pipeline import Compiled, compile_to_c
from ..compiler.preprocess import Preprocess
from ..compiler.report import format_report
from ..compiler.target import Target
from . import reference as ref
from .model_source import model_preprocess

MODEL_FILE = "model.onnx"
INIT_STATE = "init_state.npz"
FINAL_STATE = "final_state.npz"
STATE_BLOB = "state.bin"
OWNED = ".bnnc-owned.json"
RUN_OUTPUTS = ("state.bin", "final_state.npz", "init_state.f32", "data", "data.json")  # `bnnc run`
LOCK = ".bnnc.lock"
_STAGE_PREFIX = ".bnnc-stage-"
_OWNED_SCHEMA = "bnnc-owned"
DATA_RECORD = "data.json"


# --------------------------------------------------------------------------------------------------
# writing files: temp file + fsync + rename, errors as one line

def os_error(err: OSError, what: str) -> OutDirError:
    """An OSError of a file operation as a one-line OutDirError with what to do."""
    hints = {errno.ENOSPC: "free some space or write elsewhere",
             errno.EDQUOT: "free some space or write elsewhere",
             errno.EROFS: "the filesystem is read-only: choose a writable directory",
             errno.EACCES: "choose a directory you may write to",
             errno.EPERM: "choose a directory you may write to",
             errno.ELOOP: "a symbolic link is in the way; remove it or write elsewhere"}
    return OutDirError(f"cannot {what}: {err.strerror or err}", hint=hints.get(err.errno))


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()


def _fsync_dir(path: Path) -> None:
    try:
        dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def _atomically(path: Path, write: Callable[[str], None]) -> None:
    """Write `path` through `write(tmp)` into a fresh temporary file next to it (O_EXCL, so never
    through a planted link), fsync it, rename it over `path` (a link at `path` is replaced, not
    followed), fsync the directory. Any OSError is an OutDirError; the temporary file never stays."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_UMASK)          # mkstemp's 0600 -> what open() would give
        os.close(fd)
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except OSError as err:
        raise os_error(err, f"write {path}") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def write_atomic(path: Path, data: bytes) -> None:
    """`path` replaced by `data` atomically (any file bnnc writes, inside or outside OUT/)."""
    _atomically(path, lambda tmp: Path(tmp).write_bytes(data))


def save_state_atomic(path: Path, state, *, model_hash: int | None = None) -> None:
    _atomically(path, lambda tmp: save_state_npz(tmp, state, model_hash=model_hash))


def read_nofollow(path: Path) -> bytes:
    """The bytes of a file bnnc owns, opened without following a symbolic link."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise OutDirError(f"{path} is a symbolic link bnnc did not create",
                              hint="remove it; bnnc reads and writes only real files in OUT")
        if err.errno == errno.ENOENT:
            raise OutDirError(f"{path} does not exist") from None
        raise os_error(err, f"read {path}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OutDirError(f"{path} is not a regular file")
        return f.read()


# --------------------------------------------------------------------------------------------------
# OUT/: ownership, lock, staging

def _is_link(path: Path) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        return False


class OutDir:
    """An output directory bnnc owns (module docstring). Use as a context manager to hold its lock:

        with OutDir(path, create=True, command="compile") as out: ...
    """

    def __init__(self, path: Path, *, create: bool = False, command: str = "bnnc"):
        self.path = Path(path)
        self.command = command
        self._lock_fd: int | None = None
        if _is_link(self.path):
            raise OutDirError(f"{self.path} is a symbolic link; bnnc writes only into a real "
                              "directory", hint="pass the directory it points to, or another one")
        if self.path.exists() and not self.path.is_dir():
            raise OutDirError(f"{self.path} exists and is not a directory",
                              hint="choose another -o directory")
        if not self.path.exists():
            if not create:
                raise TargetError(f"{self.path} is not a bnnc compile output (no such directory)",
                                  hint="run `bnnc compile MODEL -o DIR` first")
            try:
                self.path.mkdir(parents=True)
            except FileExistsError:
                pass
            except OSError as err:
                raise os_error(err, f"create directory {self.path}") from None
            if _is_link(self.path):
                raise OutDirError(f"{self.path} became a symbolic link while bnnc created it")

    # ---- lock
    def __enter__(self) -> OutDir:
        self.lock()
        return self

    def __exit__(self, *exc) -> None:
        self.unlock()

    def lock(self) -> None:
        """Exclusive per-OUT lock, refused (never waited for) when another bnnc holds it."""
        path = self.path / LOCK
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise OutDirError(f"{path} is a symbolic link bnnc did not create",
                                  hint="remove it") from None
            raise os_error(err, f"lock {self.path}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise OutDirError(f"{self.path} is in use by another bnnc process (a compile or run "
                              "on the same directory)",
                              hint="wait for it to finish (or stop it), then run this again")
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # ---- ownership record
    def owned(self) -> tuple[int | None, set[str]] | None:
        """(model hash, files) of .bnnc-owned.json; None when there is no record."""
        path = self.path / OWNED
        if not os.path.lexists(path):
            return None
        try:
            doc = json.loads(read_nofollow(path))
            if doc.get("schema") != _OWNED_SCHEMA:
                raise ValueError("schema")
            files = {str(f) for f in doc["files"]}
            mh = doc.get("model_hash")
            return (int(mh) if mh is not None else None), files
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
            raise OutDirError(f"{path} is damaged ({type(err).__name__})",
                              hint=f"compile again into {self.path} with --force") from None

    def write_owned(self, model_hash: int | None, files: Iterable[str]) -> None:
        doc = {"schema": _OWNED_SCHEMA, "model_hash": model_hash, "files": sorted(set(files))}
        write_atomic(self.path / OWNED, (json.dumps(doc, indent=1) + "\n").encode())

    def add_owned(self, *names: str) -> None:
        rec = self.owned()
        mh, files = rec if rec is not None else (None, set())
        self.write_owned(mh, files | set(names))

    def check_model(self, manifest: Manifest) -> None:
        """OutDirError when the ownership record names another model than the manifest (an OUT
        half-written by an interrupted compile, or edited by hand)."""
        rec = self.owned()
        if rec is not None and rec[0] is not None and rec[0] != manifest.model_hash:
            raise OutDirError(f"{self.path}: its files belong to model hash {rec[0]:#x}, the "
                              f"manifest to {manifest.model_hash:#x}",
                              hint=f"compile again into {self.path}")

    # ---- writing
    def file(self, name: str) -> Path:
        return self.path / name

    def subdir(self, name: str) -> Path:
        """OUT/<name>/, created if needed; a symbolic link there is refused."""
        d = self.path / name
        if _is_link(d):
            raise OutDirError(f"{d} is a symbolic link bnnc did not create",
                              hint="remove it; bnnc writes only into real directories in OUT")
        try:
            d.mkdir(exist_ok=True)
        except OSError as err:
            raise os_error(err, f"create directory {d}") from None
        if not d.is_dir() or _is_link(d):
            raise OutDirError(f"{d} is not a directory", hint="remove it")
        return d

    def write(self, name: str, data: bytes) -> Path:
        """OUT/<name> replaced atomically and recorded as bnnc's."""
        self._writable(name)
        write_atomic(self.path / name, data)
        self.add_owned(name)
        return self.path / name

    def write_with(self, name: str, write: Callable[[str], None]) -> Path:
        self._writable(name)
        _atomically(self.path / name, write)
        self.add_owned(name)
        return self.path / name

    def _writable(self, name: str) -> None:
        rec = self.owned()
        dest = self.path / name
        if os.path.lexists(dest) and (rec is None or name not in rec[1]):
            raise OutDirError(f"{dest} exists and was not written by bnnc",
                              hint=f"move it away, or compile again into {self.path} with --force")

    def publish(self, staging: Path, model_hash: int | None, *, force: bool) -> list[Path]:
        """Move every file of `staging` (a directory inside OUT) into OUT, replacing only files
        bnnc owns (all with `force`), then remove bnnc's files of an earlier compile that this one
        did not write. Returns the published paths."""
        rec = self.owned()
        old = rec[1] if rec is not None else set()
        names = sorted(p.name for p in staging.iterdir())
        if rec is None and not force:
            foreign = sorted(p.name for p in self.path.iterdir()
                             if p.name not in (LOCK, staging.name))
            if foreign:
                raise OutDirError(
                    f"{self.path} is not empty and was not written by bnnc (it holds "
                    f"{', '.join(foreign[:4])}{' ...' if len(foreign) > 4 else ''})",
                    hint="choose a new or empty directory, or pass --force to let bnnc take "
                         "it over")
        for name in names:
            dest = self.path / name
            if os.path.lexists(dest) and name not in old and not force:
                kind = "a symbolic link" if _is_link(dest) else "a file"
                raise OutDirError(f"{dest} is {kind} bnnc did not write",
                                  hint="move it away, or pass --force to replace it")
            if dest.is_dir() and not _is_link(dest) and name not in old:
                raise OutDirError(f"{dest} is a directory bnnc did not write",
                                  hint="move it away")
        stale = old - set(names) - {OWNED}
        kept: set[str] = set()
        if rec is not None and rec[0] == model_hash:
            # the same compiled model: its checkpoint, final state and packed data stay valid
            kept = stale & set(RUN_OUTPUTS)
            stale -= kept
        stale = sorted(stale)
        # a crash from here on leaves only files listed as bnnc's
        self.write_owned(model_hash, old | set(names))
        try:
            for name in names:
                dest = self.path / name
                if dest.is_dir() and not _is_link(dest):    # a directory of ours (--emit library)
                    shutil.rmtree(dest)
                os.replace(staging / name, dest)
        except OSError as err:
            raise os_error(err, f"write into {self.path}") from None
        _fsync_dir(self.path)
        for name in stale:
            self._remove(name)
        self.write_owned(model_hash, set(names) | kept)
        return [self.path / n for n in names]

    def _remove(self, name: str) -> None:
        p = self.path / name
        try:
            if p.is_dir() and not _is_link(p):
                shutil.rmtree(p)
            elif os.path.lexists(p):
                p.unlink()
        except OSError:
            pass

    def staging(self) -> Path:
        try:
            return Path(tempfile.mkdtemp(prefix=_STAGE_PREFIX, dir=self.path))
        except OSError as err:
            raise os_error(err, f"write into {self.path}") from None

    def clean_stale_staging(self) -> None:
        """Staging directories an interrupted compile left (only ours: the lock is held)."""
        for p in self.path.glob(_STAGE_PREFIX + "*"):
            if p.is_dir() and not _is_link(p):
                shutil.rmtree(p, ignore_errors=True)


def write_run_inputs(out_dir: Path, graph, cfg: TrainConfig, source: bytes) -> list[Path]:
    """OUT/model.onnx and OUT/init_state.npz next to C that compile_to_c wrote into out_dir
    directly (tests, benchmarks); `compile_graph` does this for `bnnc compile`."""
    out_dir = Path(out_dir)
    sh = read_manifest(out_dir).state_hash
    write_atomic(out_dir / MODEL_FILE, source)
    save_state_atomic(out_dir / INIT_STATE, ref.init_state(graph, cfg).tensors, model_hash=sh)
    return [out_dir / MODEL_FILE, out_dir / INIT_STATE]


def compile_graph(graph: Graph, cfg: TrainConfig, tgt: Target, out_dir: Path, command: str,
                  source: bytes, *, guard_bytes: int = 0,
                  emit: str = "program", force: bool = False,
                  preprocess: Preprocess | None = None,
                  threads: int = 1) -> tuple[Compiled, tuple[Path, ...]]:
    """compiler.pipeline.compile_to_c plus what `bnnc run` and a reader need in out_dir (the model,
    the initial state, report.txt), written into a staging directory and published into the
    owned OUT/ (module docstring). `emit`: "program" or "library" (compile_to_c); `preprocess`
    None: the model file's (`model_preprocess`); `threads`: compile_to_c's. Returns (compiled,
    files written)."""
    if preprocess is None:
        preprocess = model_preprocess(source, graph.name, None)
    created = not os.path.lexists(out_dir)
    try:
        return _compile_into(graph, cfg, tgt, out_dir, command, source, guard_bytes, force, emit,
                             preprocess, threads)
    except BaseException:
        # a refused compile into a new directory leaves no empty OUT behind
        if created and Path(out_dir).is_dir() and not _is_link(Path(out_dir)):
            left = {p.name for p in Path(out_dir).iterdir()}
            if left <= {LOCK}:
                shutil.rmtree(out_dir, ignore_errors=True)
        raise


def _compile_into(graph, cfg, tgt, out_dir, command, source, guard_bytes, force, emit,
                  preprocess, threads):
    with OutDir(out_dir, create=True, command="compile") as out:
        out.clean_stale_staging()
        stage = out.staging()
        try:
            try:
                c = compile_to_c(graph, cfg, tgt, stage, command=command,
                                 guard_bytes=guard_bytes, emit=emit, preprocess=preprocess,
                                 threads=threads)
                mh = c.emitted.doc.model_hash
                (stage / MODEL_FILE).write_bytes(source)
                save_state_npz(stage / INIT_STATE, ref.init_state(graph, cfg).tensors,
                               model_hash=c.emitted.doc.state_hash)
                (stage / "report.txt").write_text(
                    f"{command}\n\n" + format_report(c.plan_doc, tensors=True)
                    + "\nC kernels:\n" + "".join(f"  {k}\n" for k in c.emitted.kernels))
            except OSError as err:
                raise os_error(err, f"write into {out.path}") from None
            written = out.publish(stage, mh, force=force)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    return c, tuple(written)


def read_compiled(out_dir: Path) -> tuple[Manifest, Graph, TrainConfig]:
    """(manifest, graph, cfg) of a compiled output directory; BnncError if it is not one (a
    symbolic link, no or a damaged manifest, files of another model)."""
    out = OutDir(out_dir)
    manifest = read_manifest(out.path)
    out.check_model(manifest)
    if not os.path.lexists(out.path / MODEL_FILE):
        raise TargetError(f"{out.path} has no {MODEL_FILE}; it was written by an older bnnc",
                          hint="compile again")
    raw = read_nofollow(out.path / MODEL_FILE)
    try:
        proto = onnx.load_model_from_string(raw)
    except Exception as err:
        raise ModelError(f"{out.path / MODEL_FILE} is damaged ({type(err).__name__})",
                         hint=f"compile again into {out.path}") from None
    graph = load_model(proto, name=manifest.model)
    known = {k: v for k, v in manifest.config.items() if k != "algorithm"}
    try:
        cfg = make_config(manifest.config["algorithm"], **known)
    except ConfigError as err:
        raise ConfigError(f"{out.path / MANIFEST}: its training config is invalid "
                          f"({err.message})", hint=f"compile again into {out.path}") from None
    except (KeyError, TypeError, ValueError, OverflowError) as err:
        raise ConfigError(f"{out.path / MANIFEST}: unreadable training config "
                          f"({type(err).__name__}: {str(err)[:200]})",
                          hint=f"compile again into {out.path}") from None
    return manifest, graph, cfg


def load_init_state(out_dir: Path, graph, cfg, manifest: Manifest | None = None):
    return load_state_npz(OutDir(out_dir).file(INIT_STATE), graph, cfg,
                          model_hash=manifest.state_hash if manifest is not None else None)


def saved_state_path(out_dir: Path) -> Path:
    """The state `bnnc run` left in OUT/: final_state.npz, else the checkpoint state.bin."""
    final = Path(out_dir) / FINAL_STATE
    return final if final.is_file() and not _is_link(final) else Path(out_dir) / STATE_BLOB


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
