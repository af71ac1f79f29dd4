"""`bnnc compile --threads N`: any thread count computes the bits of one thread.

(a) The debug trainer's trace (`--check-in/--check-out`: every tensor after every step, the state
before and after, the trace `bnnc check` reads) of a small CNN with conv and dense layers (both
algorithms; odd batches, 7 and for the proposed algorithm 33 (the fused conv -> BN -> sign step's
2-sample chunks, the last one short), so splits end in partial units and some threads get empty
ranges) is byte-identical
for N = 1 and 2 threads on the host, and for the proposed algorithm also for N = 3 with the
run-time dispatch capped at SSE2, built with -fsanitize=thread (a data race fails it), and for
N = 2 on rpi4 under qemu-aarch64 (Cortex-A72). (b) `bnnc check --threads 2` passes. (c) The cffi
library's threads start once, survive repeated loads of the same build and are joined by
`close()` (and by the finalizer): no thread is left behind. (d) Bare-metal targets refuse
--threads > 1 with one `error:` line; the manifest records N and a damaged value is refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from bnnc.compiler.config import make_config
from bnnc.compiler.contract import MANIFEST, read_manifest
from bnnc.compiler.errors import ManifestError, TargetError
from bnnc.compiler.frontend import load_model
from bnnc.compiler.pipeline import compile_to_c
from bnnc.compiler.target import load_target
from bnnc.compiler.zoo import build_zoo_model
from bnnc.runtime import reference as ref
from bnnc.runtime.check import run_check
from bnnc.runtime.host import HostProgram
from bnnc.runtime.programs import LocalRunner, build_trainer, check_result
from bnnc.runtime.trace import trace_input

from graphs import _binary_block, _Builder, residual, tiny_mlp

TSAN = ("-O1", "-g", "-fsanitize=thread")
ARM = all(shutil.which(t) for t in ("aarch64-linux-gnu-gcc", "qemu-aarch64"))
STEPS = 2


def _graph(name, width):
    return load_model(build_zoo_model(name, width=width))


def small_cnn():
    """Every fast conv kernel kind and every threaded step in a few small layers (compiles fast): a
    real first layer and a padded binary conv ('same', border columns), each followed directly by
    a max-pool (proposed: the fused conv -> max-pool step, 4 uneven chunks of the batch of 7), a
    4x4 map (the 4-sample lanes of the dX lookup), a max-pool of packed bits, then two dense
    layers; conv3 -> bn3 -> sign3 is the fused conv -> l1 BN -> sign step (proposed). Every PO2
    quantization has blocks to split (po2_quantize under threads)."""
    b = _Builder("cnn", (3, 18, 18), 0)
    for i, (c, pad) in enumerate(((8, 0), (16, 1), (24, 1)), start=1):
        b.conv(f"conv{i}", c, pad=pad)
        if i < 3:
            b.pool(f"pool{i}")
        _binary_block(b, i, last=False)
    b.pool("pool3")
    b.flatten("flatten3")
    for i, width in ((4, 32), (5, 10)):
        b.dense(f"fc{i}", width)
        _binary_block(b, i, last=i == 5)
    return b.build()


def _trace(root, label, target, threads, graph, cfg, trace_in, flags=()):
    out = root / label
    compile_to_c(graph, cfg, load_target(target), out, threads=threads)
    assert read_manifest(out).threads == threads
    exe = build_trainer(out, load_target(target), debug=True, extra_cflags=flags)
    fin, fout = root / f"{label}.in", root / f"{label}.out"
    fin.write_bytes(trace_in)
    res = LocalRunner(load_target(target)).run(exe, ["--check-in", str(fin), "--check-out",
                                                     str(fout)], timeout=600)
    check_result(res, f"the {label} check program")
    assert "ThreadSanitizer" not in (res.stderr or ""), res.stderr
    return fout.read_bytes()


def _traces(tmp_path, graph, algorithm: str, batch: int, builds, **cfg_kw) -> dict[str, bytes]:
    """The check traces of `builds` (label, target, threads, extra cflags), asserted
    byte-identical to the first's."""
    cfg = make_config(algorithm, batch=batch, **cfg_kw)
    rng = np.random.default_rng(5)
    batches = [((rng.integers(-128, 128, (batch,) + graph.input_shape) / 128.0).astype(np.float32),
                rng.integers(0, graph.num_classes, batch).astype(np.int32)) for _ in range(STEPS)]
    compile_to_c(graph, cfg, load_target("host"), tmp_path / "m")
    trace_in = trace_input(read_manifest(tmp_path / "m"), ref.init_state(graph, cfg).tensors,
                           batches)
    with ThreadPoolExecutor(max_workers=2) as pool:     # the builds dominate; two cores
        traces = dict(zip([b[0] for b in builds], pool.map(
            lambda b: _trace(tmp_path, b[0], b[1], b[2], graph, cfg, trace_in, b[3]), builds)))
    one = traces[builds[0][0]]
    assert len(one) > 8 and one[:4] == b"BNCO"
    for label, raw in traces.items():
        if raw != one:
            a, b = np.frombuffer(one, np.uint8), np.frombuffer(raw, np.uint8)
            diff = np.flatnonzero(a != b)[:8] if len(a) == len(b) else "lengths differ"
            raise AssertionError(f"{graph.name}/{algorithm}: the {label} trace differs from one "
                                 f"thread's (bytes {diff})")
    return traces


def _source(out) -> str:
    return (out / read_manifest(out).source).read_text()


@pytest.mark.parametrize("algorithm", ["proposed", "standard"])
def test_traces_identical_for_any_thread_count(algorithm, tmp_path):
    # N = 3 with the run-time dispatch capped at SSE2: every thread runs the same variant, and
    # every variant has the same bits
    builds = [("host-1", "host", 1, ()), ("host-2", "host", 2, ())]
    if algorithm == "proposed":
        # ... and under ThreadSanitizer, which fails the run on any data race between the parts
        builds += [("host-3-sse2-tsan", "host", 3, ("-DBNNC_NO_AVX2",) + TSAN)]
        if ARM:
            builds += [("rpi4-2", "rpi4", 2, ())]
    # proposed: a batch of 33, so the fused conv -> BN -> sign step's chunks hold 2 samples (the
    # last 1): its sample splits have uneven and empty parts
    _traces(tmp_path, small_cnn(), algorithm, 33 if algorithm == "proposed" else 7, builds)
    # the threaded C really splits: the conv/dense steps call the pool
    src = _source(tmp_path / "host-2")
    assert "bnnc_par(step_" in src and "pthread_create" in src
    # ... and so do the steps that once ran on one thread: pooling, PO2 quantization (block
    # maxima, then each block's codes) and, for the proposed algorithm, the fused steps
    for step in ("maxpool_fwd", "maxpool_bwd") + (("po2_quantize",) if algorithm == "proposed"
                                                  else ()):
        assert re.search(rf"bnnc_par\(step_\d+_{step}\w*_(part|max|codes)\b", src), step
    if algorithm == "proposed":
        for conv in ("conv1", "conv2"):
            assert re.search(rf"bnnc_par\(step_\d+_conv_pool_fwd_{conv}_conv\b", src), conv
        # the fused conv -> BN -> sign step (conv3): the conv and the BN's output by samples, the
        # lane sums by channels
        for part in ("conv", "lanes", "out"):
            assert re.search(rf"bnnc_par\(step_\d+_conv_bn_sign_fwd_bn3_{part}\b", src), part
    # the real first layer's dW (conv_dw_direct) over output-channel ranges; the proposed
    # algorithm's sign bits need whole 64-bit words per range, which conv1's 8 channels of
    # 3 * 3 * 3 bits do not give, so there it is one part (a single unit of 64 channels)
    unit = 64 if algorithm == "proposed" else 1
    assert re.search(rf"bnnc_par\(step_\d+_conv_dw_\w+_conv1_part, 8, {unit}\)", src)
    assert "pthread" not in _source(tmp_path / "host-1")


def test_bop_split_with_the_same_bits(tmp_path):
    """Bop under threads: the conv layers' updates split by output channels and, without the
    running-mean compensation, the dense ones by 64 rows of W (whole packed words either way;
    3 threads under ThreadSanitizer); with it, dense updates stay whole (each element writes
    the means of all outputs)."""
    _traces(tmp_path, small_cnn(), "proposed", 7, [("host-1", "host", 1, ()),
                                                   ("host-3-tsan", "host", 3, TSAN)],
            optimizer="bop", bop_bn_shift=False)
    src = _source(tmp_path / "host-3-tsan")
    for layer in ("conv2", "fc4"):
        assert re.search(rf"bnnc_par\(step_\d+_bop_update_{layer}_part\b", src), layer
    compile_to_c(small_cnn(), make_config("proposed", batch=7, optimizer="bop"),
                 load_target("host"), tmp_path / "shift", threads=2)
    src = _source(tmp_path / "shift")
    assert re.search(r"bnnc_par\(step_\d+_bop_update_conv2_part\b", src)
    assert not re.search(r"bnnc_par\(step_\d+_bop_update_fc4_part\b", src)


def test_average_pools_split_with_the_same_bits(tmp_path):
    """The residual model's average pool and global average pool (forward and backward), split
    over samples, with 3 threads on a batch of 5."""
    _traces(tmp_path, residual(), "proposed", 5, [("host-1", "host", 1, ()),
                                                   ("host-3", "host", 3, ())])
    src = _source(tmp_path / "host-3")
    for step in ("avgpool_fwd", "avgpool_bwd", "gap_fwd", "gap_bwd"):
        assert re.search(rf"bnnc_par\(step_\d+_{step}_\w+_part\b", src), step


def test_bnnc_check_passes_with_threads(tmp_path):
    rep = run_check(tiny_mlp(), make_config("proposed", batch=9), steps=2,
                    work_dir=tmp_path, threads=2)
    assert rep.ok, [r.name for r in rep.failures]


def _threads_now() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_library_threads_start_once_and_are_joined(tmp_path):
    graph = tiny_mlp()
    cfg = make_config("proposed", batch=8)
    compile_to_c(graph, cfg, load_target("host"), tmp_path, threads=3)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (8,) + graph.input_shape).astype(np.float32)
    y = rng.integers(0, graph.num_classes, 8).astype(np.int32)
    base = _threads_now()
    states = []
    for _ in range(3):          # the same build loaded again: one library, its pool restarted
        with HostProgram(tmp_path, debug=False) as hp:
            hp.init(0)
            assert _threads_now() == base            # nothing starts before the first step
            hp.train_step(x, y)
            assert _threads_now() == base + 2        # two workers, the caller is the third
            hp.train_step(x, y)
            assert _threads_now() == base + 2        # the same two: created once, not per call
            states.append(hp.get_state())
        assert _threads_now() == base
    assert states[0] == states[1] == states[2]
    hp = HostProgram(tmp_path, debug=False)
    hp.init(0)
    hp.train_step(x, y)
    assert _threads_now() == base + 2
    del hp                      # the finalizer joins them before the library can be unloaded
    import gc
    gc.collect()
    assert _threads_now() == base


def test_bare_metal_refuses_threads(tmp_path):
    with pytest.raises(TargetError, match="bare metal"):
        compile_to_c(_graph("tfc", 0.25), make_config("proposed", batch=4),
                     load_target("cortex-m7"), tmp_path, threads=2)
    res = subprocess.run([sys.executable, "-c", "from bnnc.cli import run; run()", "compile",
                          "tfc", "--width", "0.25", "--target", "cortex-m4", "--threads", "2",
                          "-o", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "--threads 2" in errors[0] and "cortex-m4" in errors[0]
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()


def test_manifest_threads_is_checked(tmp_path):
    compile_to_c(_graph("mlp", 0.25), make_config("proposed", batch=4), load_target("host"),
                 tmp_path, threads=2)
    assert read_manifest(tmp_path).threads == 2
    doc = json.loads((tmp_path / MANIFEST).read_text())
    doc["threads"] = 0
    (tmp_path / MANIFEST).write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match="threads"):
        read_manifest(tmp_path)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_unload_joins_threads_and_frees_the_library(tmp_path, monkeypatch):
    """`HostProgram.unload()` (a benchmark freeing each build it loaded): the workers are joined,
    the library is closed, and collecting the object afterwards raises nothing (it once ran the
    shutdown again on the closed library: "has already been closed", printed at exit)."""
    graph = tiny_mlp()
    compile_to_c(graph, make_config("proposed", batch=8), load_target("host"), tmp_path,
                 threads=2)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (8,) + graph.input_shape).astype(np.float32)
    y = rng.integers(0, graph.num_classes, 8).astype(np.int32)
    base = _threads_now()
    hp = HostProgram(tmp_path, debug=False)
    hp.init(0)
    hp.train_step(x, y)
    assert _threads_now() == base + 1
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    hp.unload()
    assert _threads_now() == base
    with pytest.raises(ValueError, match="closed"):
        hp.train_step(x, y)
    del hp
    import gc  # local: collect now, while the hook records
    gc.collect()
    assert unraisable == []
