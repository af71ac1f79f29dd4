"""The CLI under faults and hostile local input (issue 17): one regression test per row of the
issue's table (D1-D11 and the two minor rows; D8 is tests/test_plan_scale.py), the 64-bit planning
of issue 18, and a short slice of the end-to-end harness `scripts/faults.py`.

Every command runs in-process through `bnnc.cli.main` with real argv, as a user would type it."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest

from bnnc.cli import main
from bnnc.compiler.contract import read_manifest
from bnnc.compiler.errors import TargetError
from bnnc.runtime.host import build_cached
from bnnc.runtime.outdir import OutDir
from bnnc.runtime.state_blob import read_state_blob
from mnist_like import write_mnist_like

REPO = Path(__file__).resolve().parents[1]
BATCH = 20


def bnnc(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def refused(res, *words) -> str:
    """Exit 2, exactly one `error:` line, no traceback; returns that line."""
    rc, out, err = res
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in err and "internal error" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    for w in words:
        assert w.lower() in err.lower(), (w, err)
    return lines[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    data = write_mnist_like(root / "data", 200, 60, seed=0)
    model, other = root / "a.onnx", root / "b.onnx"
    assert bnnc("zoo", "tfc", "--width", "0.25", "-o", model)[0] == 0
    assert bnnc("zoo", "tfc", "--width", "0.25", "--seed", "1", "-o", other)[0] == 0
    out = root / "ref"
    assert bnnc("compile", model, "--batch", BATCH, "-o", out)[0] == 0
    rc, o, e = bnnc("run", out, "--data", "mnist", "--data-dir", data, "--steps", "4")
    assert rc == 0, e
    return {"root": root, "data": data, "model": model, "other": other, "ref": out}


@pytest.fixture
def out(world, tmp_path):
    o = tmp_path / "out"
    shutil.copytree(world["ref"], o)
    return o


def run_argv(world, out, *extra):
    return ("run", out, "--data", "mnist", "--data-dir", world["data"], "--steps", "2", *extra)


# ------------------------------------------------------------------------------------------- D1
def _npy_header(shape) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False,
                                               "shape": shape})
    return buf.getvalue()


def test_d1_npz_with_a_huge_header_or_a_zip_bomb_is_refused_before_allocating(out, tmp_path):
    with np.load(out / "final_state.npz") as z:
        state = {k: z[k] for k in z.files}
    victim = next(k for k in state if k.endswith(".W"))
    for name, payload in (("huge", _npy_header((2**40,)) + b"\0" * 64),
                          ("bomb", _npy_header((1 << 24,)) + b"\0" * (1 << 26))):
        f = tmp_path / f"{name}.npz"
        with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as zf:
            for k, v in state.items():
                if k == victim:
                    zf.writestr(f"{k}.npy", payload)
                else:
                    buf = io.BytesIO()
                    np.lib.format.write_array(buf, v)
                    zf.writestr(f"{k}.npy", buf.getvalue())
        refused(bnnc("export", out, "--state", f, "-o", tmp_path / "t.onnx"), victim, "claims")
        assert not (tmp_path / "t.onnx").exists()


# ------------------------------------------------------------------------------------- D2, D3
def _tmpfs(where: Path, size: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")


@pytest.fixture
def tmpfs(tmp_path):
    fs = tmp_path / "fs"
    yield fs
    subprocess.run(["umount", "-l", str(fs)], capture_output=True)


def test_d2_full_disk_while_run_packs_data_leaves_no_temporary_and_the_checkpoint(
        world, tmpfs):
    _tmpfs(tmpfs, "2m")
    o = tmpfs / "out"
    shutil.copytree(world["ref"], o)
    shutil.rmtree(o / "data")
    before = (o / "state.bin").read_bytes()
    free = shutil.disk_usage(tmpfs).free
    (tmpfs / "filler").write_bytes(b"\0" * (free - 40_000))
    refused(bnnc(*run_argv(world, o)), "no space left")
    assert (o / "state.bin").read_bytes() == before
    leftovers = [p.name for p in o.rglob("*") if p.name.endswith((".tmp", ".new"))]
    assert leftovers == []


def test_d3_compile_into_a_read_only_place_is_one_error_line(world, tmpfs):
    _tmpfs(tmpfs, "1m")
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    refused(bnnc("compile", world["model"], "--batch", BATCH, "-o", tmpfs / "ro" / "out"),
            "read-only")


# ------------------------------------------------------------------------------------------- D4
def test_d4_out_that_is_a_symlink_is_refused(world, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (tmp_path / "out").symlink_to(victim)
    refused(bnnc("compile", world["model"], "--batch", BATCH, "-o", tmp_path / "out"),
            "symbolic link")
    assert list(victim.iterdir()) == []


def test_d4_links_inside_out_are_replaced_never_written_through(world, out, tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("mine\n")
    for name in ("tiny.c", "report.txt", "a.c"):
        p = out / name
        if p.exists():
            p.unlink()
        p.symlink_to(victim)
    rc, _, err = bnnc("compile", world["model"], "--batch", BATCH, "-o", out)
    assert rc == 0, err
    assert victim.read_text() == "mine\n"
    assert not (out / "a.c").is_symlink() and (out / "a.c").is_file()
    assert not (out / "report.txt").is_symlink()


def test_d4_a_users_own_files_are_not_replaced_without_force(world, tmp_path):
    o = tmp_path / "mine"
    o.mkdir()
    (o / "Makefile").write_text("all:\n\techo mine\n")
    refused(bnnc("compile", world["model"], "--batch", BATCH, "-o", o), "--force")
    assert (o / "Makefile").read_text() == "all:\n\techo mine\n"
    rc, _, err = bnnc("compile", world["model"], "--batch", BATCH, "-o", o, "--force")
    assert rc == 0, err
    assert "bnnc" in (o / "Makefile").read_text()
    # from now on OUT is bnnc's: a file bnnc did not write is still never replaced silently
    (o / "report.txt").unlink()
    (o / "report.txt").write_text("my notes\n")
    rec = json.loads((o / ".bnnc-owned.json").read_text())
    rec["files"].remove("report.txt")
    (o / ".bnnc-owned.json").write_text(json.dumps(rec))
    refused(bnnc("compile", world["model"], "--batch", BATCH, "-o", o), "report.txt")


# ------------------------------------------------------------------------------------------- D5
def test_d5_recompiling_another_model_removes_the_old_state_and_sources(world, out, tmp_path):
    assert (out / "state.bin").exists() and (out / "final_state.npz").exists()
    # the same model compiled again: same model hash, its checkpoint stays valid and stays
    ckpt = (out / "state.bin").read_bytes()
    assert bnnc("compile", world["model"], "--batch", BATCH, "-o", out)[0] == 0
    assert (out / "state.bin").read_bytes() == ckpt
    rc, _, err = bnnc("compile", world["other"], "--batch", BATCH, "-o", out)
    assert rc == 0, err
    names = {p.name for p in out.iterdir()}
    assert {"b.c", "b.h"} <= names and not {"a.c", "a.h", "tiny.c"} & names
    assert not {"state.bin", "final_state.npz", "init_state.f32", "data"} & names
    refused(bnnc("export", out, "-o", tmp_path / "t.onnx"), "does not exist")
    # A's final state smuggled back in is refused: it carries A's model hash
    shutil.copy(world["ref"] / "final_state.npz", out / "final_state.npz")
    refused(bnnc("export", out, "--state", out / "final_state.npz", "-o", tmp_path / "t.onnx"),
            "another compiled model")


# ------------------------------------------------------------------------------------------- D6
HEADER = struct.Struct("<IIQQIIQ")


def forge(raw: bytes, *, step=None, payload=None) -> bytes:
    magic, ver, mh, st, seed, _, n = HEADER.unpack_from(raw)
    body = raw[HEADER.size:] if payload is None else payload
    blob = bytearray(HEADER.pack(magic, ver, mh, st if step is None else step, seed, 0, n) + body)
    struct.pack_into("<I", blob, 28, zlib.crc32(bytes(blob[32:]), zlib.crc32(bytes(blob[:28]))))
    return bytes(blob)


def test_d6_resume_never_replaces_the_checkpoint_with_an_invalid_blob(world, out, tmp_path):
    good = (out / "state.bin").read_bytes()
    m = read_manifest(out)
    t = next(m.tensor_by_name[s.name] for s in m.state if m.tensor_by_name[s.name].dtype == "f32"
             or m.tensor_by_name[s.name].dtype == "bf16")
    payload = bytearray(good[HEADER.size:])
    payload[t.offset:t.offset + 2] = b"\xc0\x7f" if t.dtype == "bf16" else b"\x00\x00"
    if t.dtype == "f32":
        payload[t.offset:t.offset + 4] = b"\x00\x00\xc0\x7f"
    cases = {"step 2^64-1": forge(good, step=2**64 - 1), "step 2^63": forge(good, step=2**63),
             "NaN": forge(good, payload=bytes(payload))}
    for what, blob in cases.items():
        f = tmp_path / "forged.bin"
        f.write_bytes(blob)
        line = refused(bnnc(*run_argv(world, out, "--resume", f)))
        assert "out of range" in line or "non-finite" in line, (what, line)
        assert (out / "state.bin").read_bytes() == good, what
        refused(bnnc("export", out, "--state", f, "-o", tmp_path / "t.onnx"))
    # a valid checkpoint still resumes
    rc, _, err = bnnc(*run_argv(world, out, "--resume", out / "state.bin"))
    assert rc == 0, err
    assert read_state_blob(out / "state.bin", m).step == 6


# ------------------------------------------------------------------------------------------- D7
def test_d7_a_damaged_cache_entry_is_rebuilt_with_one_notice(tmp_path):
    src = tmp_path / "x.c"
    src.write_text("int bnnc_x(void) { return 42; }\n")

    def build():
        return build_cached(tmp_path / "cache", "x", ".so", (src.read_bytes(),),
                            lambda tmp: ["cc", "-shared", "-fPIC", str(src), "-o", tmp],
                            what="x", missing=TargetError("no cc"))
    good = build()
    data = good.read_bytes()
    good.write_bytes(data[:100])                      # truncated: would SIGBUS when loaded
    with pytest.warns(UserWarning, match="damaged"):
        again = build()
    assert again == good and again.read_bytes() == data
    with pytest.warns(UserWarning, match="damaged"):
        (good.parent / "sha256").unlink()
        build()
    (tmp_path / "file").write_text("x")
    with pytest.raises(TargetError, match="not a usable directory"):
        build_cached(tmp_path / "file", "x", ".so", (b"",), lambda tmp: ["true"], what="x",
                     missing=TargetError("no"))


# ------------------------------------------------------------------------------------------- D9
def test_d9_external_data_is_embedded_so_the_out_trains(world, tmp_path):
    proto = onnx.load(world["model"])
    d = tmp_path / "ext"
    d.mkdir()
    onnx.save_model(proto, d / "ext.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ok.bin", size_threshold=0)
    assert (d / "ok.bin").is_file()
    o = tmp_path / "out"
    rc, _, err = bnnc("compile", d / "ext.onnx", "--batch", BATCH, "-o", o)
    assert rc == 0, err
    saved = onnx.load_model_from_string((o / "model.onnx").read_bytes())
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in saved.graph.initializer)
    rc, _, err = bnnc(*run_argv(world, o))
    assert rc == 0, err


# ------------------------------------------------------------------------------------------ D10
def test_d10_a_damaged_manifest_is_one_error_line(world, out, tmp_path):
    path = out / "bnnc_manifest.json"
    raw = path.read_text()
    doc = json.loads(raw)
    for bad in (raw[:len(raw) // 2], json.dumps({k: v for k, v in doc.items() if k != "config"}),
                json.dumps({**doc, "config": {"algorithm": "nonsense"}}),
                json.dumps({**doc, "config": {**doc["config"], "batch": "x"}}),
                raw.encode()[:5000] + b"\xb0\xec" + raw.encode()[5000:]):     # not UTF-8
        path.write_bytes(bad if isinstance(bad, bytes) else bad.encode())
        refused(bnnc(*run_argv(world, out)), "bnnc_manifest.json")
        refused(bnnc("export", out, "-o", tmp_path / "t.onnx"), "bnnc_manifest.json")


# ------------------------------------------------------------------------------------------ D11
def test_d11_a_second_run_on_the_same_out_is_refused_with_a_message(world, out):
    before = (out / "state.bin").read_bytes()
    with OutDir(out, command="run"):
        refused(bnnc(*run_argv(world, out)), "in use by another bnnc")
        refused(bnnc("compile", world["model"], "--batch", BATCH, "-o", out), "in use")
    assert (out / "state.bin").read_bytes() == before
    rc, _, err = bnnc(*run_argv(world, out))              # free again once the first is done
    assert rc == 0, err


# ---------------------------------------------------------------------------------- minor rows
def test_idx_header_dims_of_2_31_give_a_positive_byte_count(tmp_path):
    root = write_mnist_like(tmp_path / "d", 20, 20, seed=0)
    f = root / "mnist" / "train-images-idx3-ubyte"
    raw = bytearray(f.read_bytes())
    dims = (2**31 - 1, 2**31 - 1, 4)        # 1.8e19 bytes: wraps negative in int64
    for i, v in enumerate(dims):
        raw[4 + 4 * i:8 + 4 * i] = struct.pack(">I", v)
    f.write_bytes(bytes(raw))
    line = refused(bnnc("data", "info", "mnist", "--data-dir", root), "truncated")
    assert f"needs {16 + dims[0] * dims[1] * dims[2]:,} bytes" in line, line


def test_a_bad_label_in_a_packed_file_stops_the_trainer_before_any_step(world, out, tmp_path):
    exe_dir = Path(os.environ.get("BNNC_CACHE_DIR") or Path.home() / ".cache/bnnc/host").parent
    exe = next((exe_dir / "programs").glob("a-host-*/a-host"))
    for split in ("train", "test"):
        raw = bytearray((out / "data" / f"{split}.bnnd").read_bytes())
        raw[64 + (7 if split == "test" else 199)] = 200      # one bad example each
        (tmp_path / f"{split}.bnnd").write_bytes(bytes(raw))
    for tr, te in ((tmp_path / "train.bnnd", None),
                   (out / "data" / "train.bnnd", tmp_path / "test.bnnd")):
        argv = [str(exe), "--train", str(tr), "--steps", "10", "--every", "1", "--log-every",
                "1", "--checkpoint", str(tmp_path / "ck.bin")] + (["--test", str(te)] if te
                                                                  else [])
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert r.returncode != 0
        assert "a label is outside" in r.stdout
        assert '"event": "step"' not in r.stdout and not (tmp_path / "ck.bin").exists()


# ------------------------------------------------------------------------------ issue 18: 64-bit
def test_plans_of_any_size_and_only_emitting_c_refuses(tmp_path):
    # MLP at batch 700,000: the f32 input batch alone is 2.2e9 bytes, past what an int indexes
    rc, _, err = bnnc("inspect", "mlp", "--batch", "700000")
    assert rc == 0, err
    rc, _, err = bnnc("memory", "mlp", "--batch", "700000")
    assert rc == 0, err
    refused(bnnc("compile", "mlp", "--batch", "700000", "-o", tmp_path / "o"), "32-bit",
            "bnnc inspect")
    assert not (tmp_path / "o" / "mlp.c").exists()


# ----------------------------------------------------------------------- the harness, a slice
def test_fault_harness_slice(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    import faults
    counts, failures = faults.run_harness(
        tmp_path, 14, seed=7, families=["state_blob", "npz", "manifest", "outdir", "data",
                                        "model_in_out", "stale"], say=lambda *_: None)
    assert counts["cases"] == 14
    assert failures == [], [(f.name, f.problems, f.stderr[-300:]) for f in failures]
