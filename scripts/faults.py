"""End-to-end fault harness: the `bnnc` CLI under damaged files, hostile directories, full and
read-only filesystems, killed processes and concurrent invocations (issue 17).

    python scripts/faults.py [--cases 1200] [--seed 0] [--families a,b,...] [--work DIR] [-v]

Each case prepares a fresh copy of a small compiled, trained OUT/ (TFC at width 1/4, a 600-image
MNIST look-alike, batch 20), applies one fault and runs one CLI command with real argv: in-process
through `bnnc.cli.main` (cheap: no interpreter start) or, for kill and concurrency cases, as a
subprocess (`python -m bnnc.cli`... via the `bnnc` entry). It then asserts:

- the exit code is 0 or 2 (2: stderr has exactly one line starting with `error:`); never a
  traceback, an `internal error` (exit 70), a signal, or a hang (60 s alarm / subprocess timeout);
- no file outside OUT changed (a snapshot of every file under the case directory except OUT,
  plus a `victim/` directory that planted symbolic links point into; the command's own `-o`
  output file is the one exception);
- the last good checkpoint is intact: if OUT/state.bin was valid before and the fault did not
  target it, it is still a valid blob of the model afterwards (same or a later step).

Full filesystems are a tmpfs (`mount -t tmpfs -o size=...`, root only; skipped otherwise) filled
to a random level; read-only ones the same tmpfs remounted `ro`. Prints one line per failing case
and a summary; exit 1 when any case failed. Deterministic for a seed, except the kill timing.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from bnnc.cli import main as bnnc_main  # noqa: E402
from bnnc.compiler.contract import read_manifest  # noqa: E402
from bnnc.runtime.state_blob import read_state_blob  # noqa: E402
from mnist_like import idx_bytes, write_mnist_like  # noqa: E402

CASE_TIMEOUT_S = 60
BATCH = 20


# --------------------------------------------------------------------------------------------------
# outcome of one case

@dataclass
class Outcome:
    family: str
    name: str
    rc: int | None
    stderr: str
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _run_inprocess(argv: list[str]) -> tuple[int | None, str, str]:
    out, err = io.StringIO(), io.StringIO()

    def alarm(*_):
        raise TimeoutError("case timed out")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(CASE_TIMEOUT_S)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = bnnc_main(argv)
            except TimeoutError:
                rc = None
            except SystemExit as e:             # click may exit for --help and the like
                rc = e.code if isinstance(e.code, int) else 1
            except BaseException as e:  # noqa: BLE001 -- the harness reports what escaped
                import traceback
                err.write("Traceback (escaped main):\n" + traceback.format_exc())
                rc = -999
                del e
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return rc, out.getvalue(), err.getvalue()


def bnnc_argv0() -> list[str]:
    return [sys.executable, "-c", "import sys; from bnnc.cli import run; sys.argv[0]='bnnc'; run()"]


def _judge(o: Outcome) -> None:
    if o.rc is None:
        o.problems.append("hang")
        return
    if "Traceback" in o.stderr:
        o.problems.append("traceback")
    if o.rc == 70 or "internal error" in o.stderr:
        o.problems.append("internal error")
    if o.rc < 0 or o.rc >= 128:
        o.problems.append(f"signal/abnormal exit {o.rc}")
    elif o.rc not in (0, 2):
        o.problems.append(f"exit {o.rc}")
    if o.rc == 2:
        errs = [ln for ln in o.stderr.splitlines() if ln.startswith(("error:", "Error:"))]
        if len(errs) != 1:
            o.problems.append(f"{len(errs)} error lines")


# --------------------------------------------------------------------------------------------------
# the world every case starts from

class World:
    def __init__(self, work: Path, seed: int):
        self.work = Path(work)
        self.seed = seed
        self.base = self.work / "base"
        self.data = self.base / "data"
        self.model = self.base / "tiny.onnx"
        self.other = self.base / "other.onnx"
        self.ref_out = self.base / "out"
        if not (self.ref_out / "state.bin").is_file():
            self._build()
        self.manifest = read_manifest(self.ref_out)

    def _cli(self, *argv: str) -> None:
        rc, out, err = _run_inprocess(list(argv))
        if rc != 0:
            raise RuntimeError(f"setup: bnnc {' '.join(argv)} failed ({rc}): {err}{out}")

    def _build(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)
        self.base.mkdir(parents=True)
        write_mnist_like(self.data, 600, 200, seed=0)
        self._cli("zoo", "tfc", "--width", "0.25", "-o", str(self.model))
        self._cli("zoo", "tfc", "--width", "0.25", "--seed", "1", "-o", str(self.other))
        self._cli("compile", str(self.model), "--batch", str(BATCH), "-o", str(self.ref_out))
        self._cli("run", str(self.ref_out), "--data", "mnist", "--data-dir", str(self.data),
                  "--steps", "10")

    def case_dir(self, k: int) -> Path:
        d = self.work / "cases" / f"c{k:05d}"
        if d.exists():
            _force_rmtree(d)
        d.mkdir(parents=True)
        (d / "victim").mkdir()
        (d / "victim" / "precious.txt").write_text("the user's own file\n")
        return d

    def fresh_out(self, where: Path) -> Path:
        out = where / "out"
        shutil.copytree(self.ref_out, out, symlinks=True)
        return out


def _force_rmtree(d: Path) -> None:
    subprocess.run(["umount", "-l", str(d / "fs")], capture_output=True) if (d / "fs").is_mount() \
        else None
    shutil.rmtree(d, ignore_errors=True)


def snapshot(root: Path, exclude: Path | None) -> dict[str, tuple]:
    """path -> (kind, size, sha256/link target) of everything under root but `exclude`."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dp = Path(dirpath)
        if exclude is not None and (dp == exclude or exclude in dp.parents):
            dirnames[:] = []
            continue
        for name in filenames + [d for d in dirnames if (dp / d).is_symlink()]:
            p = dp / name
            if exclude is not None and p == exclude:
                continue
            try:
                st = os.lstat(p)
                if os.path.islink(p):
                    snap[str(p)] = ("link", os.readlink(p))
                else:
                    snap[str(p)] = ("file", st.st_size,
                                    hashlib.sha256(p.read_bytes()).hexdigest())
            except OSError:
                snap[str(p)] = ("unreadable",)
    return snap


def blob_ok(path: Path, manifest) -> int | None:
    try:
        return read_state_blob(path, manifest).step
    except Exception:   # noqa: BLE001
        return None


# --------------------------------------------------------------------------------------------------
# faults

BLOB_HEADER = struct.Struct("<IIQQIIQ")


def forge_blob(raw: bytes, *, step: int | None = None, mhash: int | None = None,
               version: int | None = None, payload: bytes | None = None) -> bytes:
    """A state blob with header fields replaced and a valid CRC (what a forger would write)."""
    magic, ver, mh, st, seed, _, nbytes = BLOB_HEADER.unpack_from(raw)
    body = raw[BLOB_HEADER.size:] if payload is None else payload
    head = BLOB_HEADER.pack(magic, ver if version is None else version,
                            mh if mhash is None else mhash, st if step is None else step, seed, 0,
                            nbytes)
    blob = bytearray(head + body)
    crc = zlib.crc32(bytes(blob[32:]), zlib.crc32(bytes(blob[:28])))
    struct.pack_into("<I", blob, 28, crc)
    return bytes(blob)


def mutate_bytes(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    kind = rng.choice(["flip", "flip", "truncate", "extend", "zero", "garbage", "empty"])
    b = bytearray(raw)
    if kind == "flip" and b:
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        b = b[:rng.randrange(max(len(b), 1))]
    elif kind == "extend":
        b += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    elif kind == "zero" and b:
        a = rng.randrange(len(b))
        b[a:a + rng.randint(1, 256)] = bytes(min(len(b) - a, 256))
    elif kind == "garbage":
        b = bytearray(rng.randbytes(rng.randint(1, 2048)))
    elif kind == "empty":
        b = bytearray()
    return bytes(b), kind


def npy_member(name: str, arr: np.ndarray) -> tuple[str, bytes]:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, allow_pickle=True)
    return f"{name}.npy", buf.getvalue()


def hostile_npz(path: Path, good: Path, rng: random.Random) -> str:
    """A crafted .npz: huge header, zip bomb, object array, wrong names/shapes/values."""
    with np.load(good) as z:
        state = {k: z[k] for k in z.files}
    names = [k for k in state if not k.startswith("__")]
    kind = rng.choice(["huge_header", "bomb", "object", "nan", "missing", "extra", "shape",
                       "dtype_str", "flips", "not_npy", "big_member", "hash"])
    members: list[tuple[str, bytes]] = []
    if kind == "huge_header":
        victim = rng.choice(names)
        hdr = {"descr": "<f4", "fortran_order": False, "shape": (2**40,)}
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, hdr)
        members = [npy_member(k, v) for k, v in state.items() if k != victim]
        members.append((f"{victim}.npy", buf.getvalue() + b"\0" * 64))
    elif kind == "bomb":
        victim = rng.choice(names)
        hdr = {"descr": "<f4", "fortran_order": False, "shape": (1 << 28,)}
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, hdr)
        members = [npy_member(k, v) for k, v in state.items() if k != victim]
        members.append((f"{victim}.npy", buf.getvalue() + b"\0" * (1 << 30)))   # 1 GiB of zeros
    elif kind == "object":
        victim = rng.choice(names)
        members = [npy_member(k, (np.array([{"x": 1}], dtype=object) if k == victim else v))
                   for k, v in state.items()]
    elif kind == "nan":
        victim = rng.choice(names)
        members = [npy_member(k, (np.full_like(v, np.nan) if k == victim
                                  and v.dtype.kind == "f" else v)) for k, v in state.items()]
    elif kind == "missing":
        drop = rng.choice(names)
        members = [npy_member(k, v) for k, v in state.items() if k != drop]
    elif kind == "extra":
        members = [npy_member(k, v) for k, v in state.items()]
        members.append(npy_member("zz9.W", np.zeros(3, np.float32)))
    elif kind == "shape":
        victim = rng.choice(names)
        members = [npy_member(k, (np.zeros(v.size + 1, v.dtype) if k == victim else v))
                   for k, v in state.items()]
    elif kind == "dtype_str":
        victim = rng.choice(names)
        members = [npy_member(k, (np.array(["a"] * v.size) if k == victim else v))
                   for k, v in state.items()]
    elif kind == "flips":
        raw, _ = mutate_bytes(good.read_bytes(), rng)
        path.write_bytes(raw)
        return kind
    elif kind == "not_npy":
        members = [npy_member(k, v) for k, v in state.items()]
        members.append(("readme.txt", b"hello"))
    elif kind == "big_member":
        victim = rng.choice(names)
        members = [npy_member(k, (np.zeros(10_000_000, np.float32) if k == victim else v))
                   for k, v in state.items()]
    elif kind == "hash":
        members = [npy_member(k, (np.array([12345], np.uint64) if k == "__model_hash__" else v))
                   for k, v in state.items()]
        if not any(k == "__model_hash__" for k in state):
            members.append(npy_member("__model_hash__", np.array([12345], np.uint64)))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return kind


# --------------------------------------------------------------------------------------------------
# case families: each returns (name, argv or callable, allowed outside writes, checkpoint fault)

@dataclass
class Case:
    name: str
    argv: list[str] | None = None
    allowed: tuple[Path, ...] = ()       # outside OUT, the command may write these
    ckpt_targeted: bool = False          # the fault damaged OUT/state.bin itself
    subprocess_fn: Callable[[], tuple[int | None, str]] | None = None
    expect_ok: bool | None = None        # True: must exit 0; False: must exit 2


def fam_state_blob(w: World, d: Path, out: Path, rng: random.Random) -> Case:
    raw = (out / "state.bin").read_bytes()
    kind = rng.choice(["mutate", "step_huge", "step_max", "nan", "inf", "hash", "version",
                       "mutate", "other_model_size"])
    if kind == "mutate":
        bad, how = mutate_bytes(raw, rng)
        kind = f"mutate-{how}"
    elif kind == "step_huge":
        bad = forge_blob(raw, step=rng.choice([2**63, 2**64 - 1, 2**50]))
    elif kind == "step_max":
        bad = forge_blob(raw, step=2**48 + 1)
    elif kind in ("nan", "inf"):
        m = w.manifest
        st = rng.choice([s for s in m.state if m.tensor_by_name[s.name].dtype in
                         ("f32", "bf16", "f16")])
        t = m.tensor_by_name[st.name]
        payload = bytearray(raw[BLOB_HEADER.size:])
        fill = {"f32": (b"\x00\x00\xc0\x7f" if kind == "nan" else b"\x00\x00\x80\x7f"),
                "bf16": (b"\xc0\x7f" if kind == "nan" else b"\x80\x7f"),
                "f16": (b"\x00\x7e" if kind == "nan" else b"\x00\x7c")}[t.dtype]
        payload[t.offset:t.offset + len(fill)] = fill
        bad = forge_blob(raw, payload=bytes(payload))
    elif kind == "hash":
        bad = forge_blob(raw, mhash=rng.getrandbits(64))
    elif kind == "version":
        bad = forge_blob(raw, version=rng.choice([0, 1, 3, 2**32 - 1]))
    else:
        bad = raw[:-16]
    where = rng.choice(["resume", "export", "export_ckpt", "run_ckpt", "eval"])
    if where in ("export_ckpt", "run_ckpt"):
        (out / "state.bin").write_bytes(bad)
        (out / "final_state.npz").unlink()
        if where == "export_ckpt":
            return Case(f"blob-{kind}-export-ckpt", ["export", str(out), "-o", str(d / "t.onnx")],
                        allowed=(d / "t.onnx",), ckpt_targeted=True)
        return Case(f"blob-{kind}-run-resume-own", ["run", str(out), "--data", "mnist",
                                                    "--data-dir", str(w.data), "--steps", "2",
                                                    "--resume", str(out / "state.bin")],
                    ckpt_targeted=True)
    f = d / "ck.bin"
    f.write_bytes(bad)
    if where == "resume":
        return Case(f"blob-{kind}-resume", ["run", str(out), "--data", "mnist", "--data-dir",
                                            str(w.data), "--steps", "2", "--resume", str(f)])
    if where == "eval":
        return Case(f"blob-{kind}-eval", ["eval", str(out), "--data", "mnist", "--data-dir",
                                          str(w.data), "--state", str(f)])
    return Case(f"blob-{kind}-export", ["export", str(out), "--state", str(f), "-o",
                                        str(d / "t.onnx")], allowed=(d / "t.onnx",))


def fam_npz(w: World, d: Path, out: Path, rng: random.Random) -> Case:
    where = rng.choice(["state_arg", "final", "init", "eval"])
    if where == "eval":
        f = d / "s.npz"
        kind = hostile_npz(f, out / "final_state.npz", rng)
        return Case(f"npz-{kind}-eval", ["eval", str(out), "--data", "mnist", "--data-dir",
                                         str(w.data), "--state", str(f)])
    if where == "state_arg":
        f = d / "s.npz"
        kind = hostile_npz(f, out / "final_state.npz", rng)
        return Case(f"npz-{kind}-state-arg", ["export", str(out), "--state", str(f), "-o",
                                              str(d / "t.onnx")], allowed=(d / "t.onnx",))
    if where == "final":
        tmp = d / "f.npz"
        kind = hostile_npz(tmp, out / "final_state.npz", rng)
        os.replace(tmp, out / "final_state.npz")
        return Case(f"npz-{kind}-final", ["export", str(out), "-o", str(d / "t.onnx")],
                    allowed=(d / "t.onnx",))
    tmp = d / "i.npz"
    kind = hostile_npz(tmp, out / "init_state.npz", rng)
    os.replace(tmp, out / "init_state.npz")
    return Case(f"npz-{kind}-init", ["run", str(out), "--data", "mnist", "--data-dir",
                                     str(w.data), "--steps", "2"])


def fam_manifest(w: World, d: Path, out: Path, rng: random.Random) -> Case:
    path = out / "bnnc_manifest.json"
    raw = path.read_bytes()
    doc = json.loads(raw)
    kind = rng.choice(["mutate", "drop", "retype", "drop_config", "config_value", "tensor_row",
                       "state_row", "model_name", "blob_field"])
    if kind == "mutate":
        bad, how = mutate_bytes(raw, rng)
        kind = f"mutate-{how}"
    else:
        if kind == "drop":
            doc.pop(rng.choice(sorted(doc)))
        elif kind == "retype":
            k = rng.choice(sorted(doc))
            doc[k] = rng.choice([None, "x", 3, -1, [], {}, 2**70, 1.5, True])
        elif kind == "drop_config":
            doc.pop("config")
        elif kind == "config_value":
            cfg = doc["config"]
            if rng.random() < 0.5:
                cfg.pop(rng.choice(sorted(cfg)))
            else:
                cfg[rng.choice(sorted(cfg))] = rng.choice([None, "nonsense", -5, 1e308, [], {}])
        elif kind == "tensor_row":
            row = rng.choice(doc["tensors"])
            row[rng.choice(sorted(row))] = rng.choice([None, -1, 2**40, "x", [], 0])
        elif kind == "state_row":
            row = rng.choice(doc["state"])
            row[rng.choice(sorted(row))] = rng.choice([None, -1, 2**40, "x", [], 0])
        elif kind == "model_name":
            doc["model"] = rng.choice(["../../etc", "a b", "", "x" * 500, "tiny\n#include"])
        elif kind == "blob_field":
            doc[rng.choice(["blob_header_nbytes", "state_nbytes", "model_hash", "batch",
                            "classes", "arena_nbytes"])] = rng.choice([0, -1, 2**63, 7, 1])
        bad = json.dumps(doc).encode()
    path.write_bytes(bad)
    cmd = rng.choice(["run", "export", "inspect", "pack", "eval"])
    if cmd == "eval":
        return Case(f"manifest-{kind}-eval", ["eval", str(out), "--data", "mnist", "--data-dir",
                                              str(w.data)])
    if cmd == "run":
        return Case(f"manifest-{kind}-run", ["run", str(out), "--data", "mnist", "--data-dir",
                                             str(w.data), "--steps", "2"])
    if cmd == "export":
        return Case(f"manifest-{kind}-export", ["export", str(out), "-o", str(d / "t.onnx")],
                    allowed=(d / "t.onnx",))
    if cmd == "pack":
        return Case(f"manifest-{kind}-pack", ["data", "pack", "mnist", "--data-dir", str(w.data),
                                              "--model", str(out), "-o", str(d / "p.bnnd")],
                    allowed=(d / "p.bnnd",))
    return Case(f"manifest-{kind}-inspect", ["inspect", str(out)])


def fam_model_in_out(w: World, d: Path, out: Path, rng: random.Random) -> Case:
    path = out / "model.onnx"
    bad, how = mutate_bytes(path.read_bytes(), rng)
    path.write_bytes(bad)
    if rng.random() < 0.5:
        return Case(f"outmodel-{how}-run", ["run", str(out), "--data", "mnist", "--data-dir",
                                            str(w.data), "--steps", "2"])
    return Case(f"outmodel-{how}-export", ["export", str(out), "-o", str(d / "t.onnx")],
                allowed=(d / "t.onnx",))


def fam_model_file(w: World, d: Path, out: Path, rng: random.Random) -> Case:
    m = d / "m.onnx"
    bad, how = mutate_bytes(w.model.read_bytes(), rng)
    m.write_bytes(bad)
    cmd = rng.choice(["compile", "info", "export"])
    if cmd == "compile":
        return Case(f"model-{how}-compile", ["compile", str(m), "--batch", str(BATCH), "-o",
                                             str(d / "newout")], allowed=(d / "newout",))
    if cmd == "info":
        return Case(f"model-{how}-info", ["info", str(m)])
    return Case(f"model-{how}-export", ["export", str(m), "--state",
                                        str(out / "final_state.npz"), "-o", str(d / "t.onnx")],
                allowed=(d / "t.onnx",))


def fam_data(w: World, d: Path, out: Path, rng: random.Random) -> Case:
    root = d / "data"
    shutil.copytree(w.data, root)
    files = sorted((root / "mnist").iterdir())
    f = rng.choice(files)
    kind = rng.choice(["mutate", "dims_huge", "label_range", "count_mismatch", "magic"])
    raw = f.read_bytes()
    if kind == "mutate":
        bad, how = mutate_bytes(raw, rng)
        kind = f"mutate-{how}"
    elif kind == "dims_huge":
        bad = bytearray(raw)
        nd = bad[3]
        for i in range(max(nd, 1)):
            if rng.random() < 0.7:
                bad[4 + 4 * i:8 + 4 * i] = struct.pack(">I", rng.choice([2**31 - 1, 2**32 - 1,
                                                                         0, 10**9]))
        bad = bytes(bad)
    elif kind == "label_range":
        labels = sorted(p for p in files if "labels" in p.name)
        f = rng.choice(labels)
        y = np.frombuffer(f.read_bytes()[8:], np.uint8).copy()
        y[rng.randrange(len(y))] = rng.choice([10, 200, 255])
        bad = idx_bytes(y)
    elif kind == "count_mismatch":
        labels = sorted(p for p in files if "labels" in p.name)
        f = rng.choice(labels)
        y = np.frombuffer(f.read_bytes()[8:], np.uint8)[:-rng.randint(1, 5)]
        bad = idx_bytes(y)
    else:
        bad = b"\x08\x03" + raw[2:]
    f.write_bytes(bad)
    cmd = rng.choice(["run", "info", "pack"])
    if cmd == "run":
        return Case(f"data-{kind}-run", ["run", str(out), "--data", "mnist", "--data-dir",
                                         str(root), "--steps", "2"])
    if cmd == "info":
        return Case(f"data-{kind}-info", ["data", "info", "mnist", "--data-dir", str(root)])
    return Case(f"data-{kind}-pack", ["data", "pack", "mnist", "--data-dir", str(root), "--model",
                                      str(out), "-o", str(d / "p.bnnd")], allowed=(d / "p.bnnd",))


_OUT_NAMES = ["tiny.c", "tiny.h", "report.txt", "Makefile", "plan.json", "state.bin",
              "final_state.npz", "init_state.f32", "model.onnx", "init_state.npz", "data",
              ".bnnc-owned.json", "state.bin.tmp", "trainer.c", "bnnc_manifest.json", ".bnnc.lock"]


def fam_outdir(w: World, d: Path, out: Path, rng: random.Random) -> Case:
    """Symbolic links at and in OUT, foreign files, a damaged ownership record."""
    victim = d / "victim" / "precious.txt"
    kind = rng.choice(["out_link", "inner_link", "inner_link", "foreign_file", "foreign_dir",
                       "owned_damaged", "owned_foreign_hash", "data_link", "fresh_foreign"])
    cmd = rng.choice(["compile", "run", "export"])
    if kind == "out_link":
        real = d / "realout"
        os.replace(out, real)
        out.symlink_to(rng.choice([real, d / "victim"]))
    elif kind == "inner_link":
        name = rng.choice(_OUT_NAMES)
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif os.path.lexists(p):
            p.unlink()
        p.symlink_to(rng.choice([victim, d / "victim", d / "victim" / "nothing"]))
        kind = f"inner_link-{name}"
    elif kind == "foreign_file":
        name = rng.choice(["Makefile", "report.txt", "tiny.c", "notes.txt"])
        rec = json.loads((out / ".bnnc-owned.json").read_text())
        rec["files"] = [f for f in rec["files"] if f != name]
        (out / ".bnnc-owned.json").write_text(json.dumps(rec))
        (out / name).write_text("user's own\n")
        kind = f"foreign_file-{name}"
    elif kind == "foreign_dir":
        (out / "tiny.c").unlink()
        (out / "tiny.c").mkdir()
        (out / "tiny.c" / "x").write_text("x")
    elif kind == "owned_damaged":
        bad, how = mutate_bytes((out / ".bnnc-owned.json").read_bytes(), rng)
        (out / ".bnnc-owned.json").write_bytes(bad)
        kind = f"owned_damaged-{how}"
    elif kind == "owned_foreign_hash":
        rec = json.loads((out / ".bnnc-owned.json").read_text())
        rec["model_hash"] = rng.getrandbits(63)
        (out / ".bnnc-owned.json").write_text(json.dumps(rec))
    elif kind == "data_link":
        shutil.rmtree(out / "data")
        (out / "data").symlink_to(d / "victim")
    elif kind == "fresh_foreign":
        shutil.rmtree(out)
        out.mkdir()
        (out / "Makefile").write_text("all:\n\techo mine\n")
        cmd = "compile"
    argv = {"compile": ["compile", str(w.model), "--batch", str(BATCH), "-o", str(out)],
            "run": ["run", str(out), "--data", "mnist", "--data-dir", str(w.data), "--steps", "2"],
            "export": ["export", str(out), "-o", str(d / "t.onnx")]}[cmd]
    if cmd == "compile" and rng.random() < 0.25:
        argv.append("--force")
        kind += "-force"
    return Case(f"outdir-{kind}-{cmd}", argv, allowed=(d / "t.onnx",),
                ckpt_targeted=kind.startswith(("inner_link", "out_link", "fresh", "foreign_dir",
                                               "owned", "data_link")) or "force" in kind)


def fam_stale(w: World, d: Path, out: Path, rng: random.Random) -> Case:
    """D5: compile another model into a trained OUT, then export: never A's weights."""
    rc, _, err = _run_inprocess(["compile", str(w.other), "--batch", str(BATCH), "-o", str(out)])
    if rc != 0:
        return Case("stale-compile-failed", ["info", str(w.model)], ckpt_targeted=True)
    return Case("stale-export", ["export", str(out), "-o", str(d / "t.onnx")],
                allowed=(d / "t.onnx",), ckpt_targeted=True, expect_ok=False)


def env_cache_dir() -> str:
    return os.environ.get("BNNC_CACHE_DIR") or str(Path.home() / ".cache" / "bnnc" / "host")


def fam_cache(w: World, d: Path, out: Path, rng: random.Random) -> Case:
    cache = d / "cache"
    kind = rng.choice(["truncate", "garbage", "path_is_file", "hash_missing", "empty_dir"])
    if kind == "path_is_file":
        cache.mkdir()
        (cache / "host").write_text("not a directory")
        (cache / "programs").write_text("not a directory")
    else:
        # the world's built trainer, copied into this case's cache, then damaged
        (cache / "programs").mkdir(parents=True)
        for e in (Path(env_cache_dir()).parent / "programs").glob("tiny-host-*"):
            if e.is_dir():
                shutil.copytree(e, cache / "programs" / e.name)
        entries = [p for p in (cache / "programs").iterdir() if p.is_dir()]
        for e in entries:
            progs = [p for p in e.iterdir() if p.name != "sha256"]
            for p in progs:
                if kind == "truncate":
                    p.write_bytes(p.read_bytes()[:rng.randrange(1, 4096)])
                elif kind == "garbage":
                    p.write_bytes(rng.randbytes(5000))
                elif kind == "empty_dir":
                    p.unlink()
            if kind == "hash_missing":
                (e / "sha256").unlink()
    os.environ["BNNC_CACHE_DIR"] = str(cache / "host")
    return Case(f"cache-{kind}-run", ["run", str(out), "--data", "mnist", "--data-dir",
                                      str(w.data), "--steps", "2"], allowed=(cache,))


# ---- filesystems (root only): a small tmpfs, full or read-only

def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


def fam_fullfs(w: World, d: Path, out: Path, rng: random.Random) -> Case:
    fs = d / "fs"
    if os.geteuid() != 0 or not _mount_tmpfs(fs, "4m"):
        return Case("fullfs-skipped", ["info", str(w.model)])
    cmd = rng.choice(["compile", "run", "run", "export", "zoo"])
    target_out = fs / "out"
    if cmd in ("run", "export"):
        shutil.copytree(out, target_out, symlinks=True)
        if cmd == "run":
            shutil.rmtree(target_out / "data", ignore_errors=True)
    free = shutil.disk_usage(fs).free
    left = rng.choice([0, 4096, 20_000, 100_000, 300_000, 700_000, rng.randrange(free)])
    with open(fs / "filler", "wb") as f:
        try:
            f.write(b"\0" * max(free - left, 0))
        except OSError:
            pass
    argv = {"compile": ["compile", str(w.model), "--batch", str(BATCH), "-o", str(target_out)],
            "run": ["run", str(target_out), "--data", "mnist", "--data-dir", str(w.data),
                    "--steps", "3"],
            "export": ["export", str(target_out), "-o", str(fs / "t.onnx")],
            "zoo": ["zoo", "tfc", "--width", "0.25", "-o", str(fs / "z.onnx")]}[cmd]
    return Case(f"fullfs-{left}-{cmd}", argv,
                allowed=(target_out, fs / "t.onnx", fs / "z.onnx"))


def fam_rofs(w: World, d: Path, out: Path, rng: random.Random) -> Case:
    fs = d / "fs"
    if os.geteuid() != 0 or not _mount_tmpfs(fs, "8m"):
        return Case("rofs-skipped", ["info", str(w.model)])
    cmd = rng.choice(["compile", "compile_new", "run", "export"])
    shutil.copytree(out, fs / "out", symlinks=True)
    subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True, capture_output=True)
    argv = {"compile": ["compile", str(w.model), "--batch", str(BATCH), "-o", str(fs / "out")],
            "compile_new": ["compile", str(w.model), "--batch", str(BATCH), "-o",
                            str(fs / "new" / "out")],
            "run": ["run", str(fs / "out"), "--data", "mnist", "--data-dir", str(w.data),
                    "--steps", "2"],
            "export": ["export", str(fs / "out"), "-o", str(fs / "t.onnx")]}[cmd]
    return Case(f"rofs-{cmd}", argv, allowed=(fs / "out", fs / "new", fs / "t.onnx"),
                expect_ok=False if cmd != "export" else None)


# ---- processes: kill -9 mid-run, two invocations on one OUT

def _spawn(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([*bnnc_argv0(), *argv], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def fam_kill(w: World, d: Path, out: Path, rng: random.Random) -> Case:
    delay = rng.uniform(0.3, 4.0)
    cmd = rng.choice(["run", "run", "compile"])

    def go() -> tuple[int | None, str]:
        argv = (["run", str(out), "--data", "mnist", "--data-dir", str(w.data), "--steps",
                 "400", "--every", "7", "--resume", str(out / "state.bin")] if cmd == "run" else
                ["compile", str(w.model), "--batch", str(BATCH), "-o", str(out)])
        p = _spawn(argv)
        time.sleep(delay)
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate(timeout=CASE_TIMEOUT_S)
        # the same OUT must still work: resume (or a fresh compile + run) finishes cleanly
        after = (["run", str(out), "--data", "mnist", "--data-dir", str(w.data), "--steps", "3"]
                 + (["--resume", str(out / "state.bin")] if cmd == "run" else []))
        q = _spawn(after)
        try:
            _, err = q.communicate(timeout=CASE_TIMEOUT_S * 3)
        except subprocess.TimeoutExpired:
            os.killpg(q.pid, signal.SIGKILL)
            return None, "timeout"
        return q.returncode, err
    return Case(f"kill-{cmd}", subprocess_fn=go, ckpt_targeted=(cmd == "compile"),
                expect_ok=True)


def fam_concurrent(w: World, d: Path, out: Path, rng: random.Random) -> Case:
    pair = rng.choice([("run", "run"), ("run", "compile"), ("compile", "compile"),
                       ("run", "export")])
    gap = rng.uniform(0.0, 1.5)

    def argv(c: str) -> list[str]:
        return {"run": ["run", str(out), "--data", "mnist", "--data-dir", str(w.data), "--steps",
                        "150", "--resume", str(out / "state.bin")],
                "compile": ["compile", str(w.model), "--batch", str(BATCH), "-o", str(out)],
                "export": ["export", str(out), "-o", str(d / "t.onnx")]}[c]

    def go() -> tuple[int | None, str]:
        a = _spawn(argv(pair[0]))
        time.sleep(gap)
        b = _spawn(argv(pair[1]))
        rcs, errs = [], []
        for p in (a, b):
            try:
                _, err = p.communicate(timeout=CASE_TIMEOUT_S * 3)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                return None, "timeout"
            rcs.append(p.returncode)
            errs.append(err)
        bad = [rc for rc in rcs if rc not in (0, 2)]
        for rc, err in zip(rcs, errs):
            if rc == 2 and "in use by another bnnc" not in err and pair[1] != "export" \
                    and "compile" not in pair:
                return 3, err
        # each process's stderr is judged separately; report the worst
        worst = max(rcs, key=lambda r: (r not in (0, 2), r == 2))
        return (bad[0] if bad else worst), "\n".join(e for e in errs if e)
    return Case(f"concurrent-{pair[0]}-{pair[1]}", subprocess_fn=go,
                ckpt_targeted="compile" in pair, allowed=(d / "t.onnx",))


FAMILIES: dict[str, tuple[Callable, int]] = {
    # name: (factory, weight)
    "state_blob": (fam_state_blob, 14), "npz": (fam_npz, 14), "manifest": (fam_manifest, 14),
    "model_in_out": (fam_model_in_out, 5), "model_file": (fam_model_file, 6),
    "data": (fam_data, 10), "outdir": (fam_outdir, 14), "stale": (fam_stale, 3),
    "cache": (fam_cache, 1), "fullfs": (fam_fullfs, 8), "rofs": (fam_rofs, 4),
    "kill": (fam_kill, 2), "concurrent": (fam_concurrent, 2),
}


# --------------------------------------------------------------------------------------------------
# the driver

def run_case(w: World, k: int, family: str, rng: random.Random) -> Outcome:
    d = w.case_dir(k)
    out = w.fresh_out(d)
    env_cache = os.environ.get("BNNC_CACHE_DIR")
    try:
        before_ckpt = blob_ok(out / "state.bin", w.manifest)
        before_bytes = (out / "state.bin").read_bytes()
        case = FAMILIES[family][0](w, d, out, rng)
        snap = snapshot(d, exclude=out)
        if case.subprocess_fn is not None:
            rc, err = case.subprocess_fn()
        else:
            rc, _, err = _run_inprocess(case.argv)
        o = Outcome(family, case.name, rc, err)
        _judge(o)
        if case.expect_ok is True and rc != 0:
            o.problems.append(f"expected success, got exit {rc}")
        if case.expect_ok is False and rc == 0:
            o.problems.append("expected a refusal, got exit 0")
        after = snapshot(d, exclude=out)
        allowed = [str(a) for a in case.allowed]
        changed = sorted(p for p in set(snap) | set(after)
                         if snap.get(p) != after.get(p)
                         and not any(p == a or p.startswith(a + os.sep) for a in allowed))
        if (out.is_symlink()):
            changed = [p for p in changed if not p.startswith(str(d / "realout"))]
        if changed:
            o.problems.append(f"outside OUT changed: {', '.join(changed[:3])}")
        if before_ckpt is not None and not case.ckpt_targeted and out.is_dir() \
                and not out.is_symlink():
            # a refused or failed command leaves the checkpoint as it was; a successful one
            # leaves a valid one (a run without --resume starts a new one)
            now = blob_ok(out / "state.bin", w.manifest)
            # (two processes: one may have trained while the other was refused)
            if now is None or (rc != 0 and case.subprocess_fn is None
                               and (out / "state.bin").read_bytes() != before_bytes):
                o.problems.append("checkpoint lost")
        return o
    finally:
        if env_cache is None:
            os.environ.pop("BNNC_CACHE_DIR", None)
        else:
            os.environ["BNNC_CACHE_DIR"] = env_cache
        _force_rmtree(d)


def run_harness(work: Path, cases: int, seed: int, families: list[str] | None = None,
                verbose: bool = False, say=print) -> tuple[Counter, list[Outcome]]:
    w = World(work, seed)
    names = families or list(FAMILIES)
    weights = [FAMILIES[n][1] for n in names]
    rng = random.Random(seed)
    counts: Counter = Counter()
    failures: list[Outcome] = []
    for k in range(cases):
        family = rng.choices(names, weights)[0] if k >= len(names) else names[k]
        t = time.time()
        o = run_case(w, k, family, random.Random(rng.getrandbits(64)))
        counts[f"seconds {family}"] += time.time() - t
        counts["cases"] += 1
        counts[f"exit {o.rc}"] += 1
        counts[f"family {family}"] += 1
        for p in o.problems:
            counts["problem " + p.split(":")[0]] += 1
        if not o.ok:
            failures.append(o)
            say(f"FAIL [{k}] {o.name}: {'; '.join(o.problems)}\n    "
                + "\n    ".join(o.stderr.strip().splitlines()[-6:]))
        elif verbose:
            first = next((ln for ln in o.stderr.splitlines() if ln.startswith("error")), "")
            say(f"ok   [{k}] {o.name} ({time.time() - t:.1f} s): exit {o.rc} {first[:150]}")
    return counts, failures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=1200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--families", default=None, help=f"comma-separated: {', '.join(FAMILIES)}")
    ap.add_argument("--work", type=Path, default=None, help="work directory (default: a temp)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    fams = args.families.split(",") if args.families else None
    t0 = time.time()
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(
            prefix="bnnc-faults-")))
        os.environ.setdefault("BNNC_CACHE_DIR", str(Path(work) / "cache" / "host"))
        counts, failures = run_harness(work, args.cases, args.seed, fams, args.verbose)
    exits = {k: v for k, v in sorted(counts.items()) if k.startswith("exit")}
    print(f"\n{counts['cases']} cases in {time.time() - t0:.0f} s (seed {args.seed}): "
          + ", ".join(f"{k} x{v}" for k, v in exits.items()))
    print("families: " + ", ".join(f"{k[7:]} {v}" for k, v in sorted(counts.items())
                                   if k.startswith("family")))
    probs = {k[8:]: v for k, v in counts.items() if k.startswith("problem")}
    print(f"failures: {len(failures)}" + (f" ({', '.join(f'{k} x{v}' for k, v in probs.items())})"
                                          if probs else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
